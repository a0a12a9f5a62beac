//! Running the app's own commands (`migrate`, `restart`, `stop`) and the agent's own
//! (compose steps).
//!
//! An app command runs as `sh -c CMD`, an agent command as a plain argv (no shell), in
//! the release dir, in its own process group, with stdin
//! closed and stdout+stderr going to a log file rather than a pipe: a restart command
//! that leaves a daemon behind holding its output open must not hang the agent. On a
//! timeout the whole process group is killed.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use proto::{Stage, StepReport};

/// How much of a command's output a report carries.
pub const TAIL_BYTES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("could not start `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` exited with status {code}")]
    Status { command: String, code: i32 },
    #[error("`{command}` was killed by signal {signal}")]
    Signal { command: String, signal: i32 },
    #[error("`{command}` timed out after {}s and was killed", timeout.as_secs())]
    Timeout { command: String, timeout: Duration },
}

pub struct Command<'a> {
    pub stage: Stage,
    /// Run with `sh -c`; when `argv` is set, only how the command is shown.
    pub command: &'a str,
    /// Run this program with these arguments, without a shell.
    pub argv: Option<&'a [String]>,
    pub dir: &'a Path,
    pub env: &'a BTreeMap<String, String>,
    pub timeout: Duration,
    pub log: PathBuf,
}

/// Runs the command and returns its step report; `Err` carries the same report for a
/// failure so the caller can both show it and act on it.
pub async fn run(cmd: Command<'_>) -> Result<StepReport, (StepReport, ExecError)> {
    let started = Instant::now();
    let result = run_inner(&cmd).await;
    let report = |success: bool, code: Option<i32>, error: Option<String>| StepReport {
        stage: cmd.stage,
        command: Some(cmd.command.to_owned()),
        success,
        exit_code: code,
        output: tail(&cmd.log, TAIL_BYTES),
        duration_ms: started.elapsed().as_millis() as u64,
        error,
    };
    match result {
        Ok(()) => Ok(report(true, Some(0), None)),
        Err(e) => {
            let code = match &e {
                ExecError::Status { code, .. } => Some(*code),
                _ => None,
            };
            Err((report(false, code, Some(e.to_string())), e))
        }
    }
}

/// `error`, plus the last lines a failed command printed (compose's own message), on
/// one line: this is the summary that history, status and annotations show; the whole
/// output stays in the step's report.
pub fn with_output(error: &str, output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return error.to_owned();
    }
    let mut tail = lines[lines.len().saturating_sub(4)..].join(" | ");
    if tail.len() > 600 {
        let cut = (tail.len() - 600..tail.len())
            .find(|i| tail.is_char_boundary(*i))
            .unwrap_or(0);
        tail.replace_range(..cut, "...");
    }
    format!("{error}: {tail}")
}

async fn run_inner(cmd: &Command<'_>) -> Result<(), ExecError> {
    use std::os::unix::process::ExitStatusExt;
    let spawn_err = |source| ExecError::Spawn {
        command: cmd.command.to_owned(),
        source,
    };
    if let Some(parent) = cmd.log.parent() {
        std::fs::create_dir_all(parent).map_err(spawn_err)?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&cmd.log)
        .map_err(spawn_err)?;
    let log2 = log.try_clone().map_err(spawn_err)?;
    let mut command = match cmd.argv {
        Some([program, args @ ..]) => {
            let mut c = tokio::process::Command::new(program);
            c.args(args);
            c
        }
        Some([]) => {
            return Err(spawn_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "empty command",
            )));
        }
        None => {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(cmd.command);
            c
        }
    };
    let mut child = command
        .current_dir(cmd.dir)
        .envs(cmd.env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    let pid = child.id();
    match tokio::time::timeout(cmd.timeout, child.wait()).await {
        Ok(Ok(status)) => {
            if status.success() {
                Ok(())
            } else if let Some(code) = status.code() {
                Err(ExecError::Status {
                    command: cmd.command.to_owned(),
                    code,
                })
            } else {
                Err(ExecError::Signal {
                    command: cmd.command.to_owned(),
                    signal: status.signal().unwrap_or(0),
                })
            }
        }
        Ok(Err(e)) => Err(spawn_err(e)),
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.wait().await;
            Err(ExecError::Timeout {
                command: cmd.command.to_owned(),
                timeout: cmd.timeout,
            })
        }
    }
}

/// Rewrites a command's log with `mask` applied to every line (the secrets the
/// controller named), so what stays on disk holds no secret. Temp file (0600) and
/// rename; a log that cannot be rewritten is deleted rather than kept unmasked.
pub fn mask_log(path: &Path, mask: impl Fn(&str) -> String) {
    let result = (|| -> std::io::Result<()> {
        let src = std::fs::File::open(path)?;
        let tmp = path.with_extension("log.masking");
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut out = std::io::BufWriter::new(out);
        let mut reader = std::io::BufReader::new(src);
        let mut line = Vec::new();
        loop {
            line.clear();
            // Lines are bounded by the reader's buffer growth only; a command writing one
            // endless line is cut into 1 MiB pieces.
            let n = (&mut reader)
                .take(1024 * 1024)
                .read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            out.write_all(mask(&String::from_utf8_lossy(&line)).as_bytes())?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        tracing::warn!(
            "cannot mask {}: {e}; deleting it rather than keeping secrets",
            path.display()
        );
        let _ = std::fs::remove_file(path.with_extension("log.masking"));
        let _ = std::fs::remove_file(path);
    }
}

/// The last `max` bytes of a file, starting at a line boundary when possible.
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if start > 0
        && let Some(nl) = text.find('\n')
    {
        text.drain(..=nl);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_summary_is_one_line_with_the_end_of_the_output() {
        assert_eq!(with_output("`x` failed", "\n  \n"), "`x` failed");
        let out = "Pulling web ...\n\nERROR: for web  boom\n  in \"./a.yml\", line 3\n";
        assert_eq!(
            with_output("pull failed", out),
            "pull failed: Pulling web ... | ERROR: for web  boom | in \"./a.yml\", line 3"
        );
        let long = format!("{}\n", "é".repeat(1000));
        let s = with_output("e", &long);
        assert!(s.len() < 700 && s.starts_with("e: ...é"), "{s}");
        assert!(!s.contains('\n'));
    }

    fn cmd<'a>(
        command: &'a str,
        dir: &'a Path,
        env: &'a BTreeMap<String, String>,
        timeout: Duration,
    ) -> Command<'a> {
        Command {
            stage: Stage::Restart,
            command,
            argv: None,
            dir,
            env,
            timeout,
            log: dir.join("log/out.log"),
        }
    }

    #[tokio::test]
    async fn output_env_and_dir_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let env = BTreeMap::from([("DEPLOY_RELEASE".to_string(), "42".to_string())]);
        let r = run(cmd(
            "echo out $DEPLOY_RELEASE; echo err >&2; pwd",
            dir.path(),
            &env,
            Duration::from_secs(5),
        ))
        .await
        .unwrap();
        assert!(r.success);
        assert!(r.output.contains("out 42"), "{}", r.output);
        assert!(r.output.contains("err"), "{}", r.output);
        assert!(r.output.contains(dir.path().to_str().unwrap()));
    }

    #[tokio::test]
    async fn a_failure_keeps_its_status_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let env = BTreeMap::new();
        let (r, e) = run(cmd(
            "echo boom; exit 3",
            dir.path(),
            &env,
            Duration::from_secs(5),
        ))
        .await
        .unwrap_err();
        assert!(matches!(e, ExecError::Status { code: 3, .. }));
        assert_eq!(r.exit_code, Some(3));
        assert!(r.output.contains("boom"));
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let env = BTreeMap::new();
        let marker = dir.path().join("survived");
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let started = Instant::now();
        let (_, e) = run(cmd(&script, dir.path(), &env, Duration::from_millis(300)))
            .await
            .unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }));
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!marker.exists(), "the background child was not killed");
    }

    #[tokio::test]
    async fn an_argv_runs_without_a_shell() {
        let dir = tempfile::tempdir().unwrap();
        let env = BTreeMap::new();
        let argv = ["echo".to_string(), "$HOME; it's one arg".to_string()];
        let mut c = cmd("shown only", dir.path(), &env, Duration::from_secs(5));
        c.argv = Some(&argv);
        let r = run(c).await.unwrap();
        assert_eq!(r.output.trim(), "$HOME; it's one arg");
        assert_eq!(r.command.as_deref(), Some("shown only"));
        let missing = ["/nonexistent/docker".to_string()];
        let mut c = cmd("docker", dir.path(), &env, Duration::from_secs(5));
        c.argv = Some(&missing);
        let (_, e) = run(c).await.unwrap_err();
        assert!(matches!(e, ExecError::Spawn { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_daemon_left_behind_does_not_hang_us() {
        let dir = tempfile::tempdir().unwrap();
        let env = BTreeMap::new();
        // The background sleep inherits stdout; with a pipe we would wait for it.
        let started = Instant::now();
        let r = run(cmd(
            "sleep 20 & echo $! > daemon.pid; echo started",
            dir.path(),
            &env,
            Duration::from_secs(15),
        ))
        .await
        .unwrap();
        assert!(r.success);
        assert!(started.elapsed() < Duration::from_secs(5));
        // leave nothing running behind the test: stop the one we started, by PID
        let pid = std::fs::read_to_string(dir.path().join("daemon.pid")).unwrap();
        let _ = std::process::Command::new("kill").arg(pid.trim()).status();
    }
}

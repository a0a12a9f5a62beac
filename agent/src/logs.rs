//! `deployctl logs`: the app's log lines from its configured source, streamed to the
//! controller ([`crate::pump`]: bounded, masked, cut at [`proto::MAX_LINE_BYTES`]).
//!
//! - `unit`: `journalctl -u UNIT -n N [--since @T] [-f]` (argv, no shell; the unit name
//!   is checked first).
//! - `files`: globs (`*`, `?`) relative to the `current` release. A pattern may not be
//!   absolute or hold `..`; each file is opened, then the path the open file really has
//!   (`/proc/self/fd`) must be inside the release, so a symlink cannot lead out of it.
//!   The agent reads them itself: the last N lines of each, then (`follow`) what is
//!   appended, polling, reopening a file that was rotated (a new file at that name,
//!   checked again) and starting over one that was truncated. `since` keeps the files
//!   modified since then (file lines carry no time the agent could trust).
//! - compose: `compose logs --no-color --tail N [--since Ns] [-f]` with the current
//!   release's files (`--since` needs compose v2: v1 has no such flag).

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use proto::{ErrorCode, LogSource, Logs, OutputStream, ProtoError};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, BufReader};
use tokio::sync::mpsc;

use crate::pump::{self, Batcher, Masker, Source};
use crate::release::layout::Layout;

/// More matches than this is a pattern that is too wide.
pub const MAX_FILES: usize = 64;
/// How often a followed file is looked at for new lines.
const POLL: Duration = Duration::from_millis(200);

fn bad(m: impl Into<String>) -> ProtoError {
    ProtoError::new(ErrorCode::BadRequest, m)
}

/// A systemd unit name: letters, digits and `:-_.@\`, not starting with `-`.
pub fn check_unit(unit: &str) -> Result<(), ProtoError> {
    let ok = !unit.is_empty()
        && unit.len() <= 256
        && !unit.starts_with('-')
        && unit
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":-_.@\\".contains(c));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "logs unit {unit:?} is not a systemd unit name (letters, digits, `:-_.@`)"
        )))
    }
}

/// The argv of `journalctl` for a unit.
pub fn journalctl_argv(
    unit: &str,
    lines: u32,
    since: Option<SystemTime>,
    follow: bool,
) -> Vec<String> {
    let mut argv: Vec<String> = [
        "journalctl",
        "--no-pager",
        "--output",
        "short-iso",
        "--unit",
    ]
    .map(str::to_owned)
    .to_vec();
    argv.push(unit.to_owned());
    argv.push("--lines".into());
    argv.push(lines.to_string());
    if let Some(t) = since {
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        argv.push(format!("--since=@{secs}"));
    }
    if follow {
        argv.push("--follow".into());
    }
    argv
}

/// Checks a `files` pattern: relative, no `..`, not empty.
pub fn check_pattern(pattern: &str) -> Result<Vec<String>, ProtoError> {
    let refuse = |why: &str| {
        Err(bad(format!(
            "logs file pattern {pattern:?} {why}: patterns are relative to the release dir \
             (e.g. \"log/*.log\")"
        )))
    };
    if pattern.is_empty() {
        return refuse("is empty");
    }
    let path = Path::new(pattern);
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => return refuse("holds `..`"),
            Component::RootDir | Component::Prefix(_) => return refuse("is absolute"),
        }
    }
    if parts.is_empty() {
        return refuse("names no file");
    }
    Ok(parts)
}

/// `*` (any run of characters) and `?` (one character), as a shell glob matches one name.
pub fn wildcard(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// The files under `root` that `parts` (a checked pattern) matches, sorted. Hidden names
/// match only a part that starts with `.`.
pub fn expand(root: &Path, parts: &[String]) -> Vec<PathBuf> {
    let mut found = vec![root.to_path_buf()];
    for part in parts {
        let mut next = Vec::new();
        for dir in &found {
            if part.contains(['*', '?']) {
                let Ok(rd) = std::fs::read_dir(dir) else {
                    continue;
                };
                let mut names: Vec<String> = rd
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| (!n.starts_with('.') || part.starts_with('.')) && wildcard(part, n))
                    .collect();
                names.sort();
                next.extend(names.into_iter().map(|n| dir.join(n)));
            } else {
                next.push(dir.join(part));
            }
            if next.len() > MAX_FILES * 4 {
                break;
            }
        }
        found = next;
    }
    found.retain(|p| p.is_file());
    found
}

/// Opens `path` and checks that the file it opened is inside `root` (a real path).
pub fn open_confined(root: &Path, path: &Path) -> Result<std::fs::File, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let real = fd_path(&f).ok_or_else(|| format!("{}: cannot tell where it is", path.display()))?;
    if !real.starts_with(root) {
        return Err(format!(
            "{} leads outside the release (to {}); refusing to read it",
            path.display(),
            real.display()
        ));
    }
    if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Err(format!("{} is not a regular file", path.display()));
    }
    Ok(f)
}

fn fd_path(f: &std::fs::File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).ok()
}

/// Where the last `lines` lines of `f` start (a trailing line end does not count).
pub fn tail_offset(f: &mut std::fs::File, lines: u32) -> std::io::Result<u64> {
    let len = f.metadata()?.len();
    if lines == 0 {
        return Ok(len);
    }
    let mut pos = len;
    let mut seen = 0u32;
    let mut buf = vec![0u8; 64 * 1024];
    let mut first = true;
    while pos > 0 {
        let n = (pos as usize).min(buf.len());
        pos -= n as u64;
        f.seek(SeekFrom::Start(pos))?;
        f.read_exact(&mut buf[..n])?;
        let mut chunk = &buf[..n];
        if first {
            // The file's own last line end ends the last line; it starts nothing.
            if let [rest @ .., b'\n'] = chunk {
                chunk = rest;
            }
            first = false;
        }
        for (i, b) in chunk.iter().enumerate().rev() {
            if *b == b'\n' {
                seen += 1;
                if seen == lines {
                    return Ok(pos + i as u64 + 1);
                }
            }
        }
    }
    Ok(0)
}

/// Sends the last lines of one file, then (follow) what is appended to it.
async fn stream_file(
    root: PathBuf,
    path: PathBuf,
    file: std::fs::File,
    start: u64,
    follow: bool,
    tx: mpsc::Sender<proto::Output>,
    masker: Masker,
) {
    let mut batch = Batcher::new(OutputStream::Stdout, tx.clone());
    let mut ino = file.metadata().map(|m| m.ino()).unwrap_or(0);
    let mut file = tokio::fs::File::from_std(file);
    if file.seek(SeekFrom::Start(start)).await.is_err() {
        return;
    }
    let mut pos = start;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut line = Vec::new();
    loop {
        let room = (proto::MAX_LINE_BYTES + 1).saturating_sub(line.len()) as u64;
        let n = (&mut reader)
            .take(room.max(1))
            .read_until(b'\n', &mut line)
            .await
            .unwrap_or_default();
        pos += n as u64;
        let complete = line.ends_with(b"\n") || line.len() > proto::MAX_LINE_BYTES;
        if n > 0 && complete {
            // An overlong line: the rest of it is skipped when its end comes.
            let cut = !line.ends_with(b"\n");
            if !batch.push(masker.line(&line)).await {
                return;
            }
            line.clear();
            if cut {
                loop {
                    let mut skip = Vec::new();
                    match (&mut reader)
                        .take(64 * 1024)
                        .read_until(b'\n', &mut skip)
                        .await
                    {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            pos += k as u64;
                            if skip.ends_with(b"\n") {
                                break;
                            }
                        }
                    }
                }
            }
            if reader.buffer().is_empty() && !batch.flush().await {
                return;
            }
            continue;
        }
        if n > 0 {
            continue;
        }
        // End of the file for now.
        if !follow {
            if !line.is_empty() {
                batch.push(masker.line(&line)).await;
            }
            batch.flush().await;
            return;
        }
        if !batch.flush().await {
            return;
        }
        tokio::time::sleep(POLL).await;
        if tx.is_closed() {
            return;
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.ino() != ino => {
                // Rotated: a new file at the name. Read it from its start, if it is
                // still inside the release.
                match open_confined(&root, &path) {
                    Ok(f) => {
                        ino = f.metadata().map(|m| m.ino()).unwrap_or(0);
                        reader = BufReader::with_capacity(64 * 1024, tokio::fs::File::from_std(f));
                        pos = 0;
                        line.clear();
                    }
                    Err(e) => {
                        let mut err = Batcher::new(OutputStream::Stderr, tx.clone());
                        err.push(e).await;
                        err.flush().await;
                        return;
                    }
                }
            }
            Ok(m) if m.len() < pos => {
                // Truncated: start over.
                let mut f = reader.into_inner();
                if f.seek(SeekFrom::Start(0)).await.is_err() {
                    return;
                }
                reader = BufReader::with_capacity(64 * 1024, f);
                pos = 0;
                line.clear();
            }
            _ => {}
        }
    }
}

/// Opens the source of a `logs` request: a child (journalctl, compose) or the agent's
/// own reading of files. Nothing starts when the request is refused.
pub async fn open(layout: &Layout, l: &Logs) -> Result<Source, ProtoError> {
    let masker = Masker::new(&l.redact);
    let since = l
        .since_ms
        .map(|ms| SystemTime::now() - Duration::from_millis(ms));
    let spawn = |argv: Vec<String>, dir: Option<PathBuf>| {
        let mut c = tokio::process::Command::new(&argv[0]);
        c.args(&argv[1..]);
        if let Some(d) = dir {
            c.current_dir(d);
        }
        pump::spawn(c, &masker).map_err(|e| {
            ProtoError::new(
                ErrorCode::Internal,
                format!("cannot run `{}`: {e}", argv[0]),
            )
        })
    };
    match &l.source {
        LogSource::Unit { unit } => {
            check_unit(unit)?;
            spawn(journalctl_argv(unit, l.lines, since, l.follow), None)
        }
        LogSource::Compose { compose } => {
            let release = crate::oneoff::resolve_release(layout, None)?;
            let (c, spec) = crate::oneoff::compose_of(&l.app, layout, &release, compose).await?;
            let mut args: Vec<String> = vec!["logs".into(), "--no-color".into()];
            args.push(format!("--tail={}", l.lines));
            if let Some(ms) = l.since_ms {
                if c.name() == "docker-compose" {
                    return Err(bad(
                        "--since needs compose v2 (`docker compose`): docker-compose v1's \
                         logs has no --since; use -n LINES instead",
                    ));
                }
                args.push(format!("--since={}s", ms.div_ceil(1000).max(1)));
            }
            if l.follow {
                args.push("--follow".into());
            }
            let argv = crate::oneoff::compose_argv(&c, &spec, &args);
            spawn(argv, Some(layout.release(&release)))
        }
        LogSource::Files { files } => {
            let release = crate::oneoff::resolve_release(layout, None)?;
            let root = layout
                .release(&release)
                .canonicalize()
                .map_err(|e| ProtoError::new(ErrorCode::Io, format!("release {release}: {e}")))?;
            let mut paths = Vec::new();
            for pattern in files {
                let parts = check_pattern(pattern)?;
                paths.extend(expand(&root, &parts));
            }
            paths.sort();
            paths.dedup();
            if paths.is_empty() {
                return Err(ProtoError::new(
                    ErrorCode::NotFound,
                    format!("no file matches {} in release {release}", files.join(", ")),
                ));
            }
            if paths.len() > MAX_FILES {
                return Err(bad(format!(
                    "{} match {} files, more than {MAX_FILES}: narrow the pattern",
                    files.join(", "),
                    paths.len()
                )));
            }
            let mut opened = Vec::new();
            for p in paths {
                let mut f = open_confined(&root, &p).map_err(bad)?;
                if let Some(t) = since
                    && f.metadata().and_then(|m| m.modified()).is_ok_and(|m| m < t)
                {
                    continue;
                }
                let start = tail_offset(&mut f, l.lines)
                    .map_err(|e| ProtoError::new(ErrorCode::Io, format!("{}: {e}", p.display())))?;
                opened.push((p, f, start));
            }
            let (tx, rx) = mpsc::channel(pump::CHANNEL_BATCHES);
            for (p, f, start) in opened {
                tokio::spawn(stream_file(
                    root.clone(),
                    p,
                    f,
                    start,
                    l.follow,
                    tx.clone(),
                    masker.clone(),
                ));
            }
            if l.follow {
                // Following: the stream ends only when the controller goes away, even if
                // every file was refused or none was modified since `since`.
                tokio::spawn(async move { tx.closed().await });
            }
            Ok(Source { rx, child: None })
        }
    }
}

/// Serves a `logs` request: `Err` when the controller went away mid-stream (the
/// session ends), else the answer.
pub async fn serve<S>(
    conn: &mut proto::codec::Connection<S>,
    layout: &Layout,
    l: &Logs,
    bounds: pump::Bounds<'_>,
) -> Result<Result<proto::LogsEnd, ProtoError>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let source = match open(layout, l).await {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    match pump::drive(conn, source, bounds).await {
        pump::Ending::Finished { status, .. } => Ok(Ok(proto::LogsEnd {
            error: status
                .filter(|s| !s.success())
                .map(|s| format!("the log source ended with {s}")),
        })),
        pump::Ending::Gone(why) => Err(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard("*.log", "app.log"));
        assert!(wildcard("a?c*", "abcdef"));
        assert!(!wildcard("*.log", "app.log.1"));
        assert!(wildcard("*", ""));
        assert!(!wildcard("x", "y"));
    }

    #[test]
    fn patterns_stay_relative() {
        assert_eq!(check_pattern("log/*.log").unwrap(), vec!["log", "*.log"]);
        for p in ["../x.log", "/var/log/syslog", "log/../../x", "", "."] {
            assert!(check_pattern(p).is_err(), "{p}");
        }
    }

    #[test]
    fn units_are_checked() {
        assert!(check_unit("myapp").is_ok());
        assert!(check_unit("app@1.service").is_ok());
        for u in ["", "-x", "a b", "a;b", "$(x)"] {
            assert!(check_unit(u).is_err(), "{u}");
        }
        let argv = journalctl_argv("myapp", 5, None, true).join(" ");
        assert_eq!(
            argv,
            "journalctl --no-pager --output short-iso --unit myapp --lines 5 --follow"
        );
    }

    #[test]
    fn a_symlink_out_of_the_release_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rel");
        std::fs::create_dir_all(root.join("log")).unwrap();
        std::fs::write(dir.path().join("secret"), "x\n").unwrap();
        std::fs::write(root.join("log/a.log"), "a\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("log/b.log")).unwrap();
        let root = root.canonicalize().unwrap();
        let found = expand(&root, &check_pattern("log/*.log").unwrap());
        assert_eq!(found.len(), 2);
        assert!(open_confined(&root, &found[0]).is_ok());
        let e = open_confined(&root, &found[1]).unwrap_err();
        assert!(e.contains("outside the release"), "{e}");
    }

    #[test]
    fn tail_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "one\ntwo\nthree\n").unwrap();
        let mut f = std::fs::File::open(&p).unwrap();
        assert_eq!(tail_offset(&mut f, 1).unwrap(), 8);
        assert_eq!(tail_offset(&mut f, 2).unwrap(), 4);
        assert_eq!(tail_offset(&mut f, 9).unwrap(), 0);
        assert_eq!(tail_offset(&mut f, 0).unwrap(), 14);
    }
}

//! What the user sees while a command runs: one line per step per host, on stderr, so
//! stdout carries only the result (a table, or the `--json` document).
//!
//! - On a terminal: live lines and an upload bar per host.
//! - Under GitHub Actions (`GITHUB_ACTIONS=true`): each host's lines are held and printed
//!   as one `::group::` when the host is done (hosts run in parallel, and groups cannot
//!   interleave); failures also become `::error::` annotations; the final table goes to
//!   `$GITHUB_STEP_SUMMARY`.
//! - Everywhere: secrets are masked ([`set_secrets`], [`redact`]) before anything is
//!   printed, and announced to GitHub with `::add-mask::`.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, OnceLock};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

static SECRETS: OnceLock<Vec<String>> = OnceLock::new();

/// Values shorter than this are not masked: masking "1" or "true" would garble output.
const MIN_SECRET_LEN: usize = 4;

/// Registers the values that must never be printed. Call once, before any output.
pub fn set_secrets(values: Vec<String>) {
    let mut v: Vec<String> = values
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| s.len() >= MIN_SECRET_LEN)
        .collect();
    // Longest first, so a secret containing another is masked whole.
    v.sort_by_key(|s| std::cmp::Reverse(s.len()));
    v.dedup();
    if github_actions() {
        for s in &v {
            // GitHub masks these in its own log view too.
            let _ = writeln!(std::io::stdout(), "::add-mask::{}", s.replace('\n', "%0A"));
        }
    }
    let _ = SECRETS.set(v);
}

/// `text` with every registered secret replaced by `***`.
pub fn redact(text: &str) -> String {
    let mut out = text.to_owned();
    if let Some(secrets) = SECRETS.get() {
        for s in secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
    }
    out
}

/// Prints a result line (or block) to stdout, masked. A closed stdout (`| head`) is not an
/// error worth a panic: the command's own outcome decides the exit code.
pub fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", redact(text));
}

/// Prints a message line to stderr, masked; like [`emit`], a closed stderr is ignored
/// (`eprintln!` would panic with exit 101).
pub fn emit_err(text: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{}", redact(text));
}

/// A message without a leading `host: `, for places that name the host already.
pub fn without_host<'a>(host: &str, message: &'a str) -> &'a str {
    message
        .strip_prefix(host)
        .and_then(|m| m.strip_prefix(": "))
        .unwrap_or(message)
}

/// Colours on stderr: only on a terminal, and never with `NO_COLOR` set (no-color.org).
pub fn colour_on_stderr() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

pub fn github_actions() -> bool {
    std::env::var("GITHUB_ACTIONS").as_deref() == Ok("true")
}

/// Escapes a value for a workflow command (`::error::…`).
fn gh_escape(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Lines held per host until the host is done.
type HeldLines = HashMap<String, Vec<String>>;

#[derive(Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
    quiet: bool,
    /// Held lines per host, under GitHub Actions.
    github: Option<Arc<Mutex<HeldLines>>>,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        let github = github_actions().then(|| Arc::new(Mutex::new(HashMap::new())));
        let multi = (github.is_none() && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self {
            multi,
            quiet,
            github,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.multi.is_some()
    }

    fn print(&self, text: &str) {
        let text = redact(text);
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => emit_err(&text),
        }
    }

    pub fn line(&self, host: &str, message: &str) {
        if self.quiet {
            return;
        }
        if let Some(g) = &self.github {
            g.lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(host.to_owned())
                .or_default()
                .push(message.to_owned());
            return;
        }
        self.print(&format!("[{host}] {message}"));
    }

    pub fn info(&self, message: &str) {
        if self.quiet {
            return;
        }
        self.print(message);
    }

    /// Shown even when quiet; an annotation under GitHub Actions.
    pub fn error(&self, host: Option<&str>, message: &str) {
        let message = match host {
            Some(h) => without_host(h, message),
            None => message,
        };
        let text = match host {
            Some(h) => format!("[{h}] error: {message}"),
            None => format!("error: {message}"),
        };
        if self.github.is_some() {
            let title = match host {
                Some(h) => format!("deployctl: {h}"),
                None => "deployctl".to_owned(),
            };
            // Annotations go to stdout, where the runner reads workflow commands.
            emit(&format!(
                "::error title={}::{}",
                gh_escape(&title),
                gh_escape(message)
            ));
            if let Some(h) = host {
                self.line(h, &format!("error: {message}"));
            }
            return;
        }
        self.print(&text);
    }

    /// A host is done: under GitHub Actions, print its held lines as one group.
    pub fn finish_host(&self, host: &str, title: &str) {
        let Some(g) = &self.github else {
            return;
        };
        let lines = g
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(host)
            .unwrap_or_default();
        if self.quiet && lines.is_empty() {
            return;
        }
        let mut out = format!("::group::{host}: {title}\n");
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
        out.push_str("::endgroup::");
        emit(&out);
    }

    /// An upload bar on a terminal; nothing otherwise.
    pub fn upload_bar(&self, host: &str, len: u64) -> Option<ProgressBar> {
        if self.quiet {
            return None;
        }
        let m = self.multi.as_ref()?;
        let bar = m.add(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template(
                "[{prefix}] upload {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(host.to_owned());
        Some(bar)
    }
}

/// Appends markdown to `$GITHUB_STEP_SUMMARY`, when running under GitHub Actions.
pub fn step_summary(markdown: &str) {
    if !github_actions() {
        return;
    }
    let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY") else {
        return;
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{}", redact(markdown));
    }
}

/// A size for people: bytes, KiB, MiB or GiB, whichever keeps the number short
/// (`512 B`, `3.2 KiB`, `41.0 MiB`, `65.1 GiB`). Named `mib` for its callers' sake.
pub fn mib(bytes: u64) -> String {
    const K: f64 = 1024.0;
    let b = bytes as f64;
    if bytes < 1024 {
        format!("{bytes} B")
    } else if b < K * K {
        format!("{:.1} KiB", b / K)
    } else if b < K * K * K {
        format!("{:.1} MiB", b / (K * K))
    } else {
        format!("{:.1} GiB", b / (K * K * K))
    }
}

/// `println!` for results: masked by [`redact`], and never a panic on a closed stdout.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {
        $crate::output::emit(&format!($($t)*))
    };
}

/// `eprintln!` for messages: masked by [`redact`], and never a panic on a closed stderr.
#[macro_export]
macro_rules! err {
    ($($t:tt)*) => {
        $crate::output::emit_err(&format!($($t)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    // See: #18
    #[test]
    fn sizes_use_the_unit_that_fits() {
        assert_eq!(mib(0), "0 B");
        assert_eq!(mib(900), "900 B");
        assert_eq!(mib(3 * 1024 + 205), "3.2 KiB");
        assert_eq!(mib(41 * 1024 * 1024), "41.0 MiB");
        assert_eq!(mib(66_704 * 1024 * 1024 + 300 * 1024 * 1024), "65.4 GiB");
    }

    #[test]
    fn escaping_keeps_annotations_on_one_line() {
        assert_eq!(gh_escape("a\nb%c"), "a%0Ab%25c");
    }
}

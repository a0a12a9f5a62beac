//! What the user sees while a command runs: one line per step per host, on stderr, so
//! stdout carries only the result (a table, or the `--json` document).
//!
//! - On a terminal: each message is a line of its own (ended by a newline, never padded
//!   to the terminal's width, so scrollback and copy-paste stay lines), printed above the
//!   live indicatif bars: the upload, the delta upload (artifact read, files and bytes
//!   sent), and a spinner while the agent deploys (unpack, restart, health wait).
//!   Colours ([`colour_on_stderr`]) only there, and never with `NO_COLOR`.
//! - Elsewhere (a pipe, a file): plain lines only, no bars, no escape codes; a delta
//!   upload prints a progress line about every second.
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

/// The terminal indicatif draws on: stderr, where a failed write (a terminal that hung
/// up) is ignored like everywhere else in this module; indicatif would otherwise panic
/// on it while lifting the bars to print a line (`MultiProgress::suspend`).
#[derive(Debug)]
struct StderrTerm(console::Term);

impl indicatif::TermLike for StderrTerm {
    fn width(&self) -> u16 {
        self.0.size().1
    }
    fn height(&self) -> u16 {
        self.0.size().0
    }
    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        let _ = self.0.move_cursor_up(n);
        Ok(())
    }
    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        let _ = self.0.move_cursor_down(n);
        Ok(())
    }
    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        let _ = self.0.move_cursor_right(n);
        Ok(())
    }
    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        let _ = self.0.move_cursor_left(n);
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        let _ = self.0.write_line(s);
        Ok(())
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        let _ = self.0.write_str(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        let _ = self.0.clear_line();
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// SGR codes for the few colours used on a terminal.
const CYAN: &str = "\x1b[36m";
const BOLD_RED: &str = "\x1b[1;31m";
const RESET: &str = "\x1b[0m";

/// How often a delta upload reports progress as a plain line (not on a terminal), unless
/// `DEPLOYCTL_PROGRESS_EVERY` says otherwise.
pub const PLAIN_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The interval between plain progress lines: `DEPLOYCTL_PROGRESS_EVERY` (a duration
/// such as `5s` or `500ms`; at least 10ms), else [`PLAIN_PROGRESS_EVERY`].
pub fn plain_progress_every() -> std::time::Duration {
    match std::env::var("DEPLOYCTL_PROGRESS_EVERY") {
        Ok(v) if !v.trim().is_empty() => match humantime::parse_duration(v.trim()) {
            Ok(d) => d.max(std::time::Duration::from_millis(10)),
            Err(e) => {
                tracing::warn!("DEPLOYCTL_PROGRESS_EVERY={v:?} is not a duration ({e}); using 1s");
                PLAIN_PROGRESS_EVERY
            }
        },
        _ => PLAIN_PROGRESS_EVERY,
    }
}

#[derive(Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
    /// Colours: on a terminal and without `NO_COLOR`.
    colour: bool,
    quiet: bool,
    /// Held lines per host, under GitHub Actions.
    github: Option<Arc<Mutex<HeldLines>>>,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        let github = github_actions().then(|| Arc::new(Mutex::new(HashMap::new())));
        let multi = (github.is_none() && std::io::stderr().is_terminal()).then(|| {
            MultiProgress::with_draw_target(ProgressDrawTarget::term_like_with_hz(
                Box::new(StderrTerm(console::Term::stderr())),
                20,
            ))
        });
        let colour = multi.is_some() && colour_on_stderr();
        Self {
            multi,
            colour,
            quiet,
            github,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.multi.is_some()
    }

    /// One message line. On a terminal the bars are lifted, the line is written with its
    /// newline, and the bars are drawn again below it (`MultiProgress::println` would pad
    /// the line with spaces to the terminal's width and end it without a newline).
    fn print(&self, text: &str) {
        match &self.multi {
            Some(m) => m.suspend(|| emit_err(text)),
            None => emit_err(text),
        }
    }

    /// `[host]`, in colour where colours are on.
    fn host_tag(&self, host: &str) -> String {
        if self.colour {
            format!("{CYAN}[{host}]{RESET}")
        } else {
            format!("[{host}]")
        }
    }

    fn error_word(&self) -> String {
        if self.colour {
            format!("{BOLD_RED}error:{RESET}")
        } else {
            "error:".to_owned()
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
        self.print(&format!("{} {message}", self.host_tag(host)));
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
            Some(h) => format!("{} {} {message}", self.host_tag(h), self.error_word()),
            None => format!("{} {message}", self.error_word()),
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
    /// An error that the final report states in full (with its context): under GitHub
    /// Actions it still becomes an `::error::` annotation; elsewhere nothing is printed
    /// now, so the error is said once.
    pub fn annotate(&self, host: Option<&str>, message: &str) {
        if self.github.is_some() {
            self.error(host, message);
        }
    }

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

    /// A bar (or spinner) on a terminal, added below the others; `None` elsewhere or
    /// when quiet. `template` is an indicatif template after the `tag` (`[host]`, or
    /// nothing); `{bar}` in it gets colours where colours are on.
    fn bar(&self, tag: Option<&str>, template: &str, bar: ProgressBar) -> Option<ProgressBar> {
        if self.quiet {
            return None;
        }
        let m = self.multi.as_ref()?;
        let (prefix, bar_style) = if self.colour {
            ("{prefix:.cyan} ", "{bar:30.cyan/blue}")
        } else {
            ("{prefix} ", "{bar:30}")
        };
        let template = format!(
            "{}{}",
            if tag.is_some() { prefix } else { "" },
            template.replace("{bar}", bar_style)
        );
        // A bar dropped on an error path is cleared, not left half-drawn.
        let bar = m.add(bar.with_finish(indicatif::ProgressFinish::AndClear));
        bar.set_style(
            ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        if let Some(t) = tag {
            bar.set_prefix(t.to_owned());
        }
        Some(bar)
    }

    /// A bar on a terminal for reading the artifact (`len` bytes) before any host is
    /// involved, e.g. the delta manifest; its message counts files.
    pub fn read_bar(&self, what: &str, len: u64) -> Option<ProgressBar> {
        self.bar(
            None,
            &format!("{what} {{bar}} {{bytes}}/{{total_bytes}} {{msg}}"),
            ProgressBar::new(len),
        )
    }

    /// The upload bar on a terminal: bytes sent of `len`.
    pub fn upload_bar(&self, host: &str, len: u64) -> Option<ProgressBar> {
        self.bar(
            Some(&format!("[{host}]")),
            "upload {bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ProgressBar::new(len),
        )
    }

    /// The delta upload's bar on a terminal: the artifact read (of `len` bytes) while
    /// the files the host lacks are picked out; the message says files and bytes sent.
    pub fn delta_bar(&self, host: &str, len: u64) -> Option<ProgressBar> {
        self.bar(
            Some(&format!("[{host}]")),
            "delta {bar} {bytes}/{total_bytes} read, {msg}",
            ProgressBar::new(len),
        )
    }

    /// A spinner with the elapsed time while waiting on the agent (unpack, copy,
    /// restart, health checks); its message is the agent's latest step.
    pub fn wait_spinner(&self, host: &str, message: &str) -> Option<ProgressBar> {
        let bar = self.bar(
            Some(&format!("[{host}]")),
            "{spinner} {msg} ({elapsed})",
            ProgressBar::new_spinner(),
        )?;
        bar.set_message(redact(message));
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
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

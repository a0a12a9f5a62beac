//! What the user sees while a command runs: one line per step per host, on stderr, so
//! stdout carries only the result (a table, or the `--json` document).

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        let multi = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self { multi, quiet }
    }

    pub fn is_terminal(&self) -> bool {
        self.multi.is_some()
    }

    fn print(&self, text: String) {
        if self.quiet {
            return;
        }
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    pub fn line(&self, host: &str, message: &str) {
        self.print(format!("[{host}] {message}"));
    }

    pub fn info(&self, message: &str) {
        self.print(message.to_owned());
    }

    pub fn error(&self, host: Option<&str>, message: &str) {
        let text = match host {
            Some(h) => format!("[{h}] error: {message}"),
            None => format!("error: {message}"),
        };
        // Errors are shown even with --json (on stderr).
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
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

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

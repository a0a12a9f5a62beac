//! What a test needs from the machine, and what happens when it is missing.
//!
//! A test that cannot run because a tool is missing must not pass in CI: under `CI=true`
//! (as `.ci/run` runs) [`require`] and [`missing`] panic, naming what is missing and why
//! the test needs it. Outside CI they print a note and return `false`, and the caller
//! returns early (a developer's machine may lack sudo or systemd tools).
//! `scripts/test` installs everything these tests ask for, so in CI they really run.
//!
//! ```ignore
//! if !require("visudo", "checks systemd/sudoers.d/deploy-agent (apt-get install sudo)") {
//!     return;
//! }
//! ```

use std::process::{Command, Stdio};

/// Whether this run is CI (`CI=true`, as GitHub Actions and `.ci/run` set it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| {
        let v = v.trim();
        v.eq_ignore_ascii_case("true") || v == "1"
    })
}

/// Whether `tool` runs: `tool --version` exits 0. `tool` may be several words
/// (`"docker compose"`). When it does not: see [`missing`].
#[must_use = "return from the test when this is false"]
pub fn require(tool: &str, why: &str) -> bool {
    let mut words = tool.split_whitespace();
    let Some(program) = words.next() else {
        panic!("require: no tool named");
    };
    let runs = Command::new(program)
        .args(words)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    runs || missing(&format!("`{tool}`"), why)
}

/// Something the test needs is not there. Under `CI=true` this panics with `what` and
/// `why`; otherwise it prints a note and returns `false`.
#[must_use = "return from the test when this is false"]
pub fn missing(what: &str, why: &str) -> bool {
    if in_ci() {
        panic!(
            "{what} is missing, and this test needs it: {why}. CI=true, so this fails \
             instead of skipping (scripts/test installs it)"
        );
    }
    eprintln!("note: skipping: {what} is missing ({why}); under CI=true this test fails");
    false
}

/// A test that only makes sense on another kind of machine (e.g. one without systemd)
/// and finds itself on this one. The CI machine is of the kind the test expects, so
/// there a mismatch means the machine or the test changed: it fails, saying so,
/// rather than passing without having run. Outside CI it notes and returns `false`.
#[must_use = "return from the test when this is false"]
pub fn machine_kind(expected: &str, found: &str) -> bool {
    if in_ci() {
        panic!(
            "this test expects {expected}, but here {found}. CI's machine is meant to be \
             of that kind, so the test would pass without running: fix the machine or the test"
        );
    }
    eprintln!("note: skipping: this test expects {expected}, but here {found}");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_that_runs_is_there() {
        // `sh` has no --version; `ls` does (coreutils).
        assert!(require("ls", "unit test"));
    }

    #[test]
    fn a_missing_tool_fails_under_ci_and_is_a_note_otherwise() {
        let missing_tool = "deployctl-no-such-tool-3f9a";
        let result = std::panic::catch_unwind(|| require(missing_tool, "unit test"));
        if in_ci() {
            let err = result.expect_err("under CI=true a missing tool panics");
            let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.contains(missing_tool), "{msg}");
            assert!(msg.contains("unit test"), "{msg}");
        } else {
            assert_eq!(result.ok(), Some(false));
        }
    }
}

//! The day-two requests: `deployctl logs` ([`Logs`]) and `deployctl exec` ([`Exec`]).
//!
//! Both stream: the agent answers with any number of [`Output`]s (lines, secrets
//! already masked, each at most [`MAX_LINE_BYTES`]), then one final [`LogsEnd`] or
//! [`ExecEnd`]. An [`Output`] with no lines is a heartbeat: proof of life for a stream
//! that has nothing to say. Streams run until their source ends, or until the
//! controller closes the connection (how `logs -f` ends), which also kills what the
//! agent started for them.

use serde::{Deserialize, Serialize};

use crate::{AppRef, ComposeSpec, ReleaseSpec};

/// A longer line is cut there, with [`CUT_MARK`] appended.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// What ends a line that was cut at [`MAX_LINE_BYTES`].
pub const CUT_MARK: &str = " [...cut]";

/// Streams the app's log lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logs {
    pub app: AppRef,
    pub source: LogSource,
    /// The last lines to show first (per file, per unit, per container); 0: none.
    pub lines: u32,
    /// Only lines newer than this (the journal, containers), or files modified since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// Keep streaming new lines until the controller goes away.
    #[serde(default)]
    pub follow: bool,
    /// Values the agent masks (`***`) in every line it sends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact: Vec<String>,
}

/// Where an app's logs are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LogSource {
    /// The systemd journal of this unit (`journalctl -u`).
    Unit { unit: String },
    /// Files matched by these globs, relative to the `current` release; a match outside
    /// the release (through `..` or a symlink) is refused.
    Files { files: Vec<String> },
    /// The containers of the current release's compose project (`compose logs`).
    Compose { compose: ComposeSpec },
}

/// Which output a batch of lines came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A batch of lines, without their line ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub stream: OutputStream,
    pub lines: Vec<String>,
}

/// The end of a log stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsEnd {
    /// The source failed (journalctl or compose exited non-zero, a file was refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Runs `command` (an argv, no shell) in a release dir with the deploy variables, or for
/// compose in a service's container (`compose exec -T SERVICE ...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    pub app: AppRef,
    /// A release id; `None`: the current release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    pub command: Vec<String>,
    /// Compose: the service to exec into (required with `spec.compose`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Take the app's lock (without waiting) for as long as the command runs.
    #[serde(default)]
    pub lock: bool,
    pub holder: String,
    /// The environment's release settings: compose project, secrets to mask.
    pub spec: ReleaseSpec,
    /// Kill the command after this long; `None`: it runs as long as the controller
    /// stays connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// How a one-off command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEnd {
    /// The release it ran in.
    pub release: String,
    /// Its exit status; `None` when it was killed by a signal.
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Killed after `timeout_ms`.
    #[serde(default)]
    pub timed_out: bool,
}

/// Cuts `line` to [`MAX_LINE_BYTES`] (on a char boundary), marking the cut.
pub fn cap_line(mut line: String) -> String {
    if line.len() > MAX_LINE_BYTES {
        let mut end = MAX_LINE_BYTES;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push_str(CUT_MARK);
    }
    line
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;
    use crate::{Request, Response};

    fn golden<T>(value: T, golden: serde_json::Value)
    where
        T: Serialize + DeserializeOwned + PartialEq + Debug,
    {
        assert_eq!(
            serde_json::to_value(&value).unwrap(),
            golden,
            "wire format changed"
        );
        let back: T = serde_json::from_str(&serde_json::to_string(&value).unwrap()).unwrap();
        assert_eq!(back, value, "round trip");
        let from_golden: T = serde_json::from_value(golden).unwrap();
        assert_eq!(from_golden, value, "golden parses");
    }

    fn app() -> AppRef {
        AppRef {
            name: "myapp".into(),
            deploy_to: "/srv/myapp".into(),
            instance: None,
        }
    }

    fn spec() -> ReleaseSpec {
        ReleaseSpec {
            shared: vec![],
            migrate: None,
            restart: None,
            stop: None,
            command_timeout_ms: 1000,
            keep_releases: 5,
            health: None,
            max_unpacked_bytes: 1 << 20,
            compose: None,
            instance: None,
            redact: vec!["hunter2-secret".into()],
            hooks: None,
            notify: None,
            cutover: None,
        }
    }

    fn spec_json() -> serde_json::Value {
        json!({"shared": [], "migrate": null, "restart": null, "stop": null,
            "command_timeout_ms": 1000, "keep_releases": 5, "health": null,
            "max_unpacked_bytes": 1048576, "compose": null, "redact": ["hunter2-secret"]})
    }

    #[test]
    fn logs_requests() {
        golden(
            Request::Logs(Logs {
                app: app(),
                source: LogSource::Unit {
                    unit: "myapp".into(),
                },
                lines: 100,
                since_ms: Some(60_000),
                follow: true,
                redact: vec!["hunter2-secret".into()],
            }),
            json!({"type": "logs", "params": {
                "app": {"name": "myapp", "deploy_to": "/srv/myapp"},
                "source": {"kind": "unit", "unit": "myapp"},
                "lines": 100, "since_ms": 60000, "follow": true,
                "redact": ["hunter2-secret"]}}),
        );
        golden(
            Request::Logs(Logs {
                app: app(),
                source: LogSource::Files {
                    files: vec!["log/*.log".into()],
                },
                lines: 10,
                since_ms: None,
                follow: false,
                redact: vec![],
            }),
            json!({"type": "logs", "params": {
                "app": {"name": "myapp", "deploy_to": "/srv/myapp"},
                "source": {"kind": "files", "files": ["log/*.log"]},
                "lines": 10, "follow": false}}),
        );
        golden(
            LogSource::Compose {
                compose: ComposeSpec {
                    files: vec!["compose.yml".into()],
                    env_file: None,
                    project: "shop".into(),
                    pull: false,
                    command: Some("docker compose".into()),
                    zero_downtime: Vec::new(),
                    drain_ms: None,
                },
            },
            json!({"kind": "compose", "compose": {"files": ["compose.yml"], "env_file": null,
                "project": "shop", "pull": false, "command": "docker compose"}}),
        );
        // An older controller's request without the optional fields still parses.
        let r: Logs = serde_json::from_value(json!({
            "app": {"name": "myapp", "deploy_to": "/srv/myapp"},
            "source": {"kind": "unit", "unit": "myapp"}, "lines": 5}))
        .unwrap();
        assert!(!r.follow && r.since_ms.is_none() && r.redact.is_empty());
    }

    #[test]
    fn exec_request() {
        golden(
            Request::Exec(Exec {
                app: app(),
                release: Some("20261128070000".into()),
                command: vec!["bin/rails".into(), "console".into()],
                service: None,
                lock: true,
                holder: "alice@laptop".into(),
                spec: spec(),
                timeout_ms: None,
            }),
            json!({"type": "exec", "params": {
                "app": {"name": "myapp", "deploy_to": "/srv/myapp"},
                "release": "20261128070000", "command": ["bin/rails", "console"],
                "lock": true, "holder": "alice@laptop", "spec": spec_json()}}),
        );
        golden(
            Exec {
                app: app(),
                release: None,
                command: vec!["env".into()],
                service: Some("web".into()),
                lock: false,
                holder: "ci".into(),
                spec: spec(),
                timeout_ms: Some(5000),
            },
            json!({"app": {"name": "myapp", "deploy_to": "/srv/myapp"},
                "command": ["env"], "service": "web", "lock": false, "holder": "ci",
                "spec": spec_json(), "timeout_ms": 5000}),
        );
    }

    #[test]
    fn stream_responses() {
        golden(
            Response::Output(Output {
                stream: OutputStream::Stderr,
                lines: vec!["boom".into(), String::new()],
            }),
            json!({"type": "output", "params": {"stream": "stderr", "lines": ["boom", ""]}}),
        );
        golden(
            Response::LogsEnd(LogsEnd { error: None }),
            json!({"type": "logs_end", "params": {}}),
        );
        golden(
            Response::LogsEnd(LogsEnd {
                error: Some("journalctl exited with status 1".into()),
            }),
            json!({"type": "logs_end", "params": {"error": "journalctl exited with status 1"}}),
        );
        golden(
            Response::ExecEnd(ExecEnd {
                release: "20261128070000".into(),
                exit_code: Some(3),
                signal: None,
                timed_out: false,
            }),
            json!({"type": "exec_end", "params": {"release": "20261128070000",
                "exit_code": 3, "timed_out": false}}),
        );
        golden(
            ExecEnd {
                release: "1".into(),
                exit_code: None,
                signal: Some(9),
                timed_out: true,
            },
            json!({"release": "1", "exit_code": null, "signal": 9, "timed_out": true}),
        );
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        assert_eq!(cap_line("short".into()), "short");
        let long = "é".repeat(MAX_LINE_BYTES);
        let cut = cap_line(long);
        assert!(cut.ends_with(CUT_MARK));
        assert!(cut.len() <= MAX_LINE_BYTES + CUT_MARK.len());
    }
}

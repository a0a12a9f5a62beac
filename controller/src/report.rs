//! Results: per-host outcomes, the exit code they add up to, and how they are shown (a
//! table on stdout, or one JSON document with `--json`).

use std::time::Duration;

use proto::{DeployReport, Outcome};
use serde::Serialize;

use crate::config::Environment;
use crate::exit::{self, Failure};

/// How one host ended.
#[derive(Debug, Clone, Serialize)]
pub struct HostResult {
    pub host: String,
    /// `None` when the host failed before the agent reported an outcome.
    pub outcome: Option<Outcome>,
    pub release: Option<String>,
    pub previous: Option<String>,
    pub current: Option<String>,
    pub error: Option<String>,
    pub exit_code: u8,
    pub duration_ms: u64,
    pub report: Option<DeployReport>,
}

impl HostResult {
    pub fn from_report(host: &str, r: DeployReport) -> Self {
        let exit_code = match r.outcome {
            Outcome::Live => exit::OK,
            Outcome::Failed | Outcome::RolledBack => exit::DEPLOY_FAILED,
            Outcome::RollbackFailed => exit::NEEDS_HUMAN,
        };
        Self {
            host: host.to_owned(),
            outcome: Some(r.outcome),
            release: Some(r.release.clone()),
            previous: r.previous.clone(),
            current: r.current.clone(),
            error: r.error.clone(),
            exit_code,
            duration_ms: r.duration_ms,
            report: Some(r),
        }
    }

    pub fn from_failure(host: &str, f: Failure, took: Duration) -> Self {
        Self {
            host: host.to_owned(),
            outcome: None,
            release: None,
            previous: None,
            current: None,
            error: Some(f.message),
            exit_code: f.code,
            duration_ms: took.as_millis() as u64,
            report: None,
        }
    }
}

/// What the per-host results add up to (SPEC "Exit codes").
pub fn exit_code(results: &[HostResult]) -> u8 {
    if results.is_empty() {
        return exit::OK;
    }
    if results.iter().any(|r| r.exit_code == exit::NEEDS_HUMAN) {
        return exit::NEEDS_HUMAN;
    }
    let live = results
        .iter()
        .filter(|r| r.outcome == Some(Outcome::Live))
        .count();
    if live == results.len() {
        return exit::OK;
    }
    if live > 0 {
        // Some hosts run the new release and some do not.
        return exit::NEEDS_HUMAN;
    }
    results
        .iter()
        .map(|r| r.exit_code)
        .max()
        .unwrap_or(exit::DEPLOY_FAILED)
}

pub fn print_deploy(
    command: &str,
    env: &Environment,
    release: Option<&str>,
    results: &[HostResult],
    code: u8,
    took: Duration,
    json: bool,
) {
    if json {
        let doc = serde_json::json!({
            "command": command,
            "environment": env.name,
            "app": env.app,
            "release": release,
            "exit_code": code,
            "duration_ms": took.as_millis() as u64,
            "hosts": results,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return;
    }
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.host.clone(),
                r.outcome.map(outcome_name).unwrap_or("error").to_owned(),
                r.release.clone().unwrap_or_else(|| "-".into()),
                r.current.clone().unwrap_or_else(|| "-".into()),
                format!("{:.1}s", r.duration_ms as f64 / 1000.0),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["HOST", "OUTCOME", "RELEASE", "CURRENT", "TIME"], &rows)
    );
    for r in results {
        if let Some(e) = &r.error {
            println!("{}: {e}", r.host);
            if let Some(rep) = &r.report {
                if let Some(h) = &rep.health
                    && !h.healthy
                    && let Some(body) = h.body_snippet.as_deref().filter(|b| !b.is_empty())
                {
                    println!("  last response body: {}", one_line(body, 200));
                }
                for s in rep.steps.iter().filter(|s| !s.success) {
                    if !s.output.trim().is_empty() {
                        println!("  output of `{}`:", s.command.as_deref().unwrap_or("?"));
                        for l in s
                            .output
                            .lines()
                            .rev()
                            .take(15)
                            .collect::<Vec<_>>()
                            .into_iter()
                            .rev()
                        {
                            println!("    {l}");
                        }
                    }
                }
                if let Some(s) = rep
                    .steps
                    .iter()
                    .rev()
                    .find(|s| s.stage == proto::Stage::Restart && !s.output.trim().is_empty())
                    && s.success
                    && rep.outcome != Outcome::Live
                {
                    println!("  last restart output:");
                    for l in s
                        .output
                        .lines()
                        .rev()
                        .take(10)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                    {
                        println!("    {l}");
                    }
                }
            }
        }
    }
    let verdict = match code {
        exit::OK => "done".to_owned(),
        exit::DEPLOY_FAILED => "FAILED: every host is back on its previous release".to_owned(),
        exit::NEEDS_HUMAN => {
            "FAILED: a rollback failed or hosts are on mixed versions; a human must look".to_owned()
        }
        other => format!("FAILED (exit {other})"),
    };
    println!(
        "{command} {}: {verdict} in {:.1}s",
        env.name,
        took.as_secs_f64()
    );
}

pub fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Live => "live",
        Outcome::Failed => "failed",
        Outcome::RolledBack => "rolled_back",
        Outcome::RollbackFailed => "rollback_failed",
    }
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    flat.chars().take(max).collect()
}

/// A plain, left-aligned text table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let fmt_row = |cells: Vec<&str>| -> String {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![fmt_row(header.to_vec())];
    for r in rows {
        out.push(fmt_row(r.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(outcome: Option<Outcome>, code: u8) -> HostResult {
        HostResult {
            host: "h".into(),
            outcome,
            release: None,
            previous: None,
            current: None,
            error: None,
            exit_code: code,
            duration_ms: 0,
            report: None,
        }
    }

    #[test]
    fn exit_codes_add_up() {
        use Outcome::*;
        assert_eq!(exit_code(&[r(Some(Live), 0), r(Some(Live), 0)]), 0);
        assert_eq!(exit_code(&[r(Some(RolledBack), 1)]), 1);
        assert_eq!(exit_code(&[r(Some(Failed), 1), r(Some(RolledBack), 1)]), 1);
        assert_eq!(
            exit_code(&[r(Some(Live), 0), r(Some(RolledBack), 1)]),
            5,
            "mixed"
        );
        assert_eq!(
            exit_code(&[r(Some(RollbackFailed), 5), r(Some(Failed), 1)]),
            5
        );
        assert_eq!(exit_code(&[r(None, 3)]), 3);
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x");
    }
}

//! Results: per-host outcomes, the exit code they add up to, and how they are shown (a
//! table on stdout, or one JSON document with `--json`).

use std::time::Duration;

use proto::Outcome;

use crate::config::Environment;
use crate::exit;
use crate::outcome::{HostResult, RolloutReport};

/// A host is done: its failure as an error (an annotation under GitHub Actions), then
/// its held lines as one group.
pub fn announce(progress: &crate::output::Progress, r: &HostResult, title: &str) {
    if r.report.is_some()
        && r.outcome != Some(Outcome::Live)
        && let Some(e) = &r.error
    {
        progress.annotate(Some(&r.host), e);
    }
    let how = if r.outcome == Some(Outcome::Live) {
        "ok".to_owned()
    } else {
        r.outcome.map(outcome_name).unwrap_or("error").to_owned()
    };
    progress.finish_host(&r.host, &format!("{title}: {how}"));
}

/// What the per-host results add up to (SPEC "Exit codes").
///
/// 0 when every host that was deployed is live; 5 when a rollback failed or some hosts
/// run the new release while others do not; otherwise the worst failure (1 when every
/// host is back on, or never left, its previous release).
pub fn exit_code(results: &[HostResult]) -> u8 {
    let touched: Vec<&HostResult> = results.iter().filter(|r| !r.skipped).collect();
    if touched.is_empty() {
        return exit::OK;
    }
    let rollback_failed = touched.iter().any(|r| {
        r.exit_code == exit::NEEDS_HUMAN || r.fleet_rollback.is_some_and(|o| o != Outcome::Live)
    });
    if rollback_failed {
        return exit::NEEDS_HUMAN;
    }
    let all_live = touched.len() == results.len()
        && touched
            .iter()
            .all(|r| r.outcome == Some(Outcome::Live) && r.fleet_rollback.is_none());
    if all_live {
        return exit::OK;
    }
    if touched.iter().any(|r| r.on_new_release()) {
        // Some hosts run the new release and some do not.
        return exit::NEEDS_HUMAN;
    }
    touched
        .iter()
        .map(|r| r.exit_code)
        .filter(|&c| c != exit::OK)
        .max()
        .unwrap_or(exit::DEPLOY_FAILED)
}

/// The exit code of a rollout: as [`exit_code`], except that a rollout that stopped
/// (a failed host or failed verification) is never 0; if it left every host on the new
/// release (`on_failure = "stop"`), a human must look.
pub fn rollout_exit_code(results: &[HostResult], failed: bool) -> u8 {
    let code = exit_code(results);
    if failed && code == exit::OK {
        return exit::NEEDS_HUMAN;
    }
    code
}

/// Prints the result of a push or rollback. `fleet` carries the rollout's own findings
/// (verification, why it stopped) for the JSON document and the text summary.
#[allow(clippy::too_many_arguments)]
pub fn print_deploy(
    command: &str,
    env: &Environment,
    release: Option<&str>,
    results: &[HostResult],
    code: u8,
    took: Duration,
    json: bool,
    fleet: Option<&RolloutReport>,
) {
    crate::output::step_summary(&summary_markdown(
        command, env, release, results, code, fleet,
    ));
    if json {
        let mut doc = serde_json::json!({
            "command": command,
            "environment": env.name,
            "app": env.app,
            "release": release,
            "exit_code": code,
            "duration_ms": took.as_millis() as u64,
            "hosts": results,
        });
        if let Some(i) = &env.instance {
            doc["instance"] = serde_json::json!(i);
        }
        if let Some(f) = fleet {
            doc["verify"] = serde_json::json!(f.verify);
            doc["failure"] = serde_json::json!(f.failure);
            doc["on_failure"] = serde_json::json!(f.on_failure);
        }
        crate::out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return;
    }
    let batches = results.iter().any(|r| r.batch.is_some_and(|b| b > 1));
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let outcome = outcome_label(r);
            let mut row = vec![r.host.clone()];
            if batches {
                row.push(r.batch.map(|b| b.to_string()).unwrap_or_else(|| "-".into()));
            }
            row.extend([
                outcome,
                r.release.clone().unwrap_or_else(|| "-".into()),
                r.current.clone().unwrap_or_else(|| "-".into()),
                format!("{:.1}s", r.duration_ms as f64 / 1000.0),
            ]);
            row
        })
        .collect();
    let header: &[&str] = if batches {
        &["HOST", "BATCH", "OUTCOME", "RELEASE", "RUNNING NOW", "TIME"]
    } else {
        &["HOST", "OUTCOME", "RELEASE", "RUNNING NOW", "TIME"]
    };
    crate::out!("{}", table(header, &rows));
    if let Some(f) = fleet {
        for v in &f.verify {
            crate::out!(
                "verify {}: {} ({} attempt(s))",
                v.url,
                if v.ok { "ok" } else { "FAILED" },
                v.attempts
            );
        }
        // With one host, its own error below says it all.
        if let Some(why) = &f.failure
            && (results.len() > 1 || results.iter().all(|r| r.error.is_none()))
        {
            crate::out!("rollout stopped: {why}");
        }
    }
    for r in results {
        if let Some(e) = &r.error {
            crate::out!("{}: {e}", r.host);
            if let Some(rep) = &r.report {
                if let Some(h) = &rep.health
                    && !h.healthy
                    && let Some(body) = h.body_snippet.as_deref().filter(|b| !b.is_empty())
                {
                    crate::out!("  last response body: {}", one_line(body, 200));
                }
                for s in rep.steps.iter().filter(|s| !s.success) {
                    if !s.output.trim().is_empty() {
                        crate::out!("  output of `{}`:", s.command.as_deref().unwrap_or("?"));
                        print_tail(&s.output, 15);
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
                    crate::out!("  last restart output:");
                    print_tail(&s.output, 10);
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
    crate::out!(
        "{command} {}: {verdict} in {:.1}s",
        env_label(env),
        took.as_secs_f64()
    );
}

/// `review --instance pr-42` for a review-app instance, else the environment's name.
pub fn env_label(env: &Environment) -> String {
    match &env.instance {
        Some(i) => format!("{} --instance {i}", env.name),
        None => env.name.clone(),
    }
}

/// The results as a markdown table, for `$GITHUB_STEP_SUMMARY`.
fn summary_markdown(
    command: &str,
    env: &Environment,
    release: Option<&str>,
    results: &[HostResult],
    code: u8,
    fleet: Option<&RolloutReport>,
) -> String {
    let icon = if code == exit::OK { "✅" } else { "❌" };
    let mut md = format!(
        "### {icon} deployctl {command} {} ({}){}\n\n| host | outcome | release | running now | error |\n| --- | --- | --- | --- | --- |\n",
        env_label(env),
        env.app,
        release
            .map(|r| format!(": release `{r}`"))
            .unwrap_or_default()
    );
    for r in results {
        let outcome = outcome_label(r);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.host,
            outcome,
            r.release.as_deref().unwrap_or("-"),
            r.current.as_deref().unwrap_or("-"),
            r.error
                .as_deref()
                .map(|e| one_line(e, 300).replace('|', "\\|"))
                .unwrap_or_default()
        ));
    }
    if let Some(f) = fleet {
        for v in &f.verify {
            md.push_str(&format!(
                "\nverify `{}`: {}\n",
                v.url,
                if v.ok { "ok" } else { "**failed**" }
            ));
        }
        if let Some(why) = &f.failure {
            md.push_str(&format!("\n**rollout stopped:** {}\n", one_line(why, 500)));
        }
    }
    md.push_str(&format!("\nexit code {code}\n"));
    md
}

/// How a host ended, for tables: its outcome, and how a fleet rollback went on it.
fn outcome_label(r: &HostResult) -> String {
    if r.skipped {
        return "not started".to_owned();
    }
    let base = r.outcome.map(outcome_name).unwrap_or("error");
    match r.fleet_rollback {
        Some(Outcome::Live) => format!("{base}, rolled back"),
        Some(o) => format!("{base}, ROLLBACK {}", outcome_name(o)),
        None => base.to_owned(),
    }
}

/// The last `lines` lines of a command's output, indented.
pub fn print_tail(output: &str, lines: usize) {
    let all: Vec<&str> = output.lines().collect();
    for l in &all[all.len().saturating_sub(lines)..] {
        crate::out!("    {l}");
    }
}

pub fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Live => "live",
        Outcome::Failed => "failed",
        Outcome::RolledBack => "rolled_back",
        Outcome::RollbackFailed => "rollback_failed",
        Outcome::Removed => "removed",
    }
}

/// A stored timestamp (RFC 3339, to the nanosecond) as a table shows it: to the
/// second, in UTC (`2026-11-28 04:39:49Z`). Text that is not a timestamp is shown as is
/// (`--json` keeps the stored value).
pub fn short_time(stamp: &str) -> String {
    use time::format_description::well_known::Rfc3339;
    let Ok(t) = time::OffsetDateTime::parse(stamp, &Rfc3339) else {
        return if stamp.is_empty() {
            "-".into()
        } else {
            stamp.to_owned()
        };
    };
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A release's state as `releases` shows it. The stored status says whether a release
/// was ever confirmed live; only the one `current` points at is `live` now, the others
/// that were are `was live`. Other statuses are shown as stored.
pub fn release_state(r: &proto::ReleaseInfo) -> String {
    match r.status {
        proto::ReleaseStatus::Live if !r.current => "was live".into(),
        status => serde_json::to_value(status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
    }
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    flat.chars().take(max).collect()
}

/// The widest a table cell gets, in characters; longer text is cut with `…` (`--json`
/// has it whole).
pub const MAX_CELL_CHARS: usize = 200;

/// A cell as shown: control characters (a newline, a terminal escape) as `?`, at most
/// [`MAX_CELL_CHARS`] characters.
fn cell(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(MAX_CELL_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().nth(MAX_CELL_CHARS).is_some() {
        out.pop();
        out.push('…');
    }
    out
}

/// A plain, left-aligned text table. Total: any data renders (cells are cleaned and cut
/// by [`cell`], rows may be shorter or longer than the header).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|h| cell(h)).collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| cell(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            let n = c.chars().count();
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(n),
                None => widths.push(n),
            }
        }
    }
    // Padding by hand: `{:<w$}` panics for widths over u16::MAX.
    let fmt_row = |cells: &[String]| -> String {
        let mut line = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            let pad = widths[i].saturating_sub(c.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        line.trim_end().to_owned()
    };
    let mut out = vec![fmt_row(&header)];
    for r in &rows {
        out.push(fmt_row(r));
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
            batch: None,
            skipped: false,
            fleet_rollback: None,
        }
    }

    #[test]
    fn fleet_outcomes() {
        use Outcome::*;
        let back = |o| HostResult {
            fleet_rollback: Some(o),
            ..r(Some(Live), 0)
        };
        let skipped = HostResult::skipped("h3");
        // host 1 took it and went back cleanly, host 2 failed: one version, exit 1
        assert_eq!(
            exit_code(&[back(Live), r(Some(RolledBack), 1), skipped.clone()]),
            1
        );
        // the fleet rollback failed on host 1
        assert_eq!(exit_code(&[back(RollbackFailed), r(Some(Failed), 1)]), 5);
        // the rollback was itself undone: host 1 is still on the new release
        assert_eq!(exit_code(&[back(RolledBack), r(Some(Failed), 1)]), 5);
        // on_failure = "stop": host 1 stays on the new release
        assert_eq!(
            exit_code(&[r(Some(Live), 0), r(Some(Failed), 1), skipped]),
            5
        );
        // verification failed and every host was rolled back
        assert_eq!(rollout_exit_code(&[back(Live), back(Live)], true), 1);
        // verification failed and on_failure = "stop" left them all on it
        assert_eq!(
            rollout_exit_code(&[r(Some(Live), 0), r(Some(Live), 0)], true),
            5
        );
        assert_eq!(rollout_exit_code(&[r(Some(Live), 0)], false), 0);
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

    // See: #18
    #[test]
    fn tables_show_seconds_in_utc() {
        assert_eq!(
            short_time("2026-11-28T04:39:49.123456789Z"),
            "2026-11-28 04:39:49Z"
        );
        assert_eq!(
            short_time("2026-11-28T06:39:49.5+02:00"),
            "2026-11-28 04:39:49Z"
        );
        assert_eq!(short_time(""), "-");
        assert_eq!(short_time("yesterday"), "yesterday");
    }

    // See: #18
    #[test]
    fn only_the_current_release_is_live() {
        let r = |status, current| proto::ReleaseInfo {
            id: "20261128043949".into(),
            version: None,
            sha256: None,
            created: String::new(),
            status,
            current,
            content: None,
        };
        assert_eq!(release_state(&r(proto::ReleaseStatus::Live, true)), "live");
        assert_eq!(
            release_state(&r(proto::ReleaseStatus::Live, false)),
            "was live"
        );
        assert_eq!(
            release_state(&r(proto::ReleaseStatus::RolledBack, false)),
            "rolled_back"
        );
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x");
    }

    // See: #16
    #[test]
    fn tables_are_total() {
        // Wider than a format width may be, with control characters, ragged rows.
        let huge = "v".repeat(100_000);
        let t = table(
            &["A", "B"],
            &[
                vec![huge.clone(), "x\n\u{1b}[31my".into()],
                vec!["only".into()],
                vec!["a".into(), "b".into(), "extra".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[1].starts_with(&"v".repeat(MAX_CELL_CHARS - 1)));
        assert!(lines[1].contains("…  x??[31my"), "{}", lines[1]);
        assert!(lines[3].ends_with("extra"));
        assert!(!t.contains('\u{1b}'));
    }
}

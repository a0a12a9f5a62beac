//! Webhook notifications (`[notify] webhook` / `webhooks`): the agent posts one JSON
//! document per outcome of a deploy, a rollback, or a rollback it made alone (recovery
//! after a crash, the post-go-live watch), whether or not a controller is connected.
//!
//! - The document ([`document`]) has `app`, `environment`, `host`, `action`, `release`,
//!   `version`, `previous`, `outcome`, `error`, `who`, `when`, and a Slack-compatible
//!   `text`. It is built from the history line, which is already masked; the secret
//!   values the run knows are masked again over the whole document.
//! - Posting ([`send`]) happens in a background task: it never changes or delays the
//!   outcome. At most [`MAX_IN_FLIGHT`] posts run at once; each webhook gets
//!   [`ATTEMPTS`] tries with backoff (1 s, 2 s, 4 s), each bounded by
//!   [`REQUEST_TIMEOUT`]; the result is logged with the webhook's position in the list,
//!   never its URL (a Slack URL carries a token).
//! - The URLs reach the agent in each push and rollback ([`proto::NotifySpec`]). So that
//!   recovery can notify after a restart, [`store`] keeps them in
//!   `<deploy_to>/.deploy/notify.json` (mode 0600); the journal never holds them.
//! - https goes through reqwest with rustls (webpki roots). Its client is built on the
//!   first post only: an agent with no webhook never sets up rustls (its pages stay
//!   untouched, which is what keeps an idle agent's RSS low; see `health`).

use std::sync::OnceLock;
use std::time::Duration;

use proto::{HistoryEntry, NotifySpec, Outcome};
use tokio::sync::Semaphore;

use crate::release::layout::{Layout, write_atomic};

/// Tries per webhook and document.
pub const ATTEMPTS: u32 = 4;
/// The first wait between tries; doubled after each.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// One request's limit (connect to answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Posts in flight at once, over every app of this agent.
pub const MAX_IN_FLIGHT: usize = 4;

static IN_FLIGHT: Semaphore = Semaphore::const_new(MAX_IN_FLIGHT);

fn store_path(layout: &Layout) -> std::path::PathBuf {
    layout.state().join("notify.json")
}

/// Keeps `spec` (the webhooks of the latest push or rollback) for recovery, in
/// `.deploy/notify.json`, 0600; `None` removes it (the config has no `[notify]` now).
pub fn store(layout: &Layout, spec: Option<&NotifySpec>) -> std::io::Result<()> {
    let path = store_path(layout);
    match spec.filter(|s| !s.webhooks.is_empty()) {
        Some(spec) => {
            std::fs::create_dir_all(layout.state())?;
            write_atomic(&path, &serde_json::to_vec(spec)?)
        }
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// The webhooks [`store`] kept for this app, if any.
pub fn load(layout: &Layout) -> Option<NotifySpec> {
    let text = std::fs::read(store_path(layout)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// This machine's name, for the document's `host`.
pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// The words of an outcome, as in `--json` and `DEPLOY_OUTCOME`.
pub fn outcome_name(outcome: Outcome) -> String {
    serde_json::to_value(outcome)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The JSON document posted for `entry` of `app` in `environment`, with every value of
/// `redact` masked as `***`.
pub fn document(
    app: &str,
    environment: &str,
    host: &str,
    entry: &HistoryEntry,
    redact: &dyn Fn(&str) -> String,
) -> serde_json::Value {
    let outcome = outcome_name(entry.outcome);
    let action = serde_json::to_value(entry.action)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let name = match &entry.instance {
        Some(i) => format!("{app} ({i})"),
        None => app.to_owned(),
    };
    let what = match &entry.version {
        Some(v) => format!("release {} ({v})", entry.release),
        None => format!("release {}", entry.release),
    };
    let said = match entry.outcome {
        Outcome::Live => "is live".to_owned(),
        Outcome::Failed => "failed before the switch; current is unchanged".to_owned(),
        Outcome::RolledBack => match &entry.previous {
            Some(p) => format!("was rolled back; {p} serves again"),
            None => "was rolled back".to_owned(),
        },
        Outcome::RollbackFailed => "ROLLBACK FAILED: a human must look".to_owned(),
        Outcome::Removed => "was removed".to_owned(),
    };
    let mut text = format!(
        "{name} {environment} on {host}: {what} {said} ({action} by {})",
        entry.holder
    );
    if let Some(e) = &entry.error {
        text.push_str(&format!(": {e}"));
    }
    let doc = serde_json::json!({
        "text": text,
        "app": app,
        "instance": entry.instance,
        "environment": environment,
        "host": host,
        "action": action,
        "release": entry.release,
        "version": entry.version,
        "previous": entry.previous,
        "outcome": outcome,
        "error": entry.error,
        "who": entry.holder,
        "when": entry.finished,
    });
    // Every string masked, whatever field a secret ended up in.
    mask(doc, redact)
}

fn mask(v: serde_json::Value, redact: &dyn Fn(&str) -> String) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => Value::String(redact(&s)),
        Value::Object(m) => {
            Value::Object(m.into_iter().map(|(k, v)| (k, mask(v, redact))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(|v| mask(v, redact)).collect()),
        other => other,
    }
}

/// Posts the document for `entry` (an outcome just recorded in the history of the app
/// at `layout`) to the webhooks of `spec`, or else to those [`store`] kept, in the
/// background. Returns at once; does nothing without webhooks or outside a runtime.
/// Every way an outcome is recorded calls this: the deploy's end, recovery, the watch.
pub fn send(
    layout: &Layout,
    app: &str,
    spec: Option<&NotifySpec>,
    entry: &HistoryEntry,
    redact: &dyn Fn(&str) -> String,
) {
    let Some(spec) = spec.cloned().or_else(|| load(layout)) else {
        return;
    };
    if spec.webhooks.is_empty() {
        return;
    }
    let doc = document(app, &spec.environment, &hostname(), entry, redact);
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("webhook not sent: no runtime");
        return;
    };
    let body = doc.to_string();
    let what = format!("{} {} {}", app, entry.release, outcome_name(entry.outcome));
    let total = spec.webhooks.len();
    for (i, url) in spec.webhooks.into_iter().enumerate() {
        let body = body.clone();
        let what = what.clone();
        runtime.spawn(async move {
            let Ok(_permit) = IN_FLIGHT.acquire().await else {
                return;
            };
            let n = i + 1;
            let label = format!("webhook {n} of {total} ({what})");
            match post(&url, body, &label).await {
                Ok(tries) => tracing::info!("{label}: delivered (try {tries})"),
                Err(why) => {
                    tracing::warn!("{label}: not delivered after {ATTEMPTS} tries: {why}")
                }
            }
        });
    }
}

fn client() -> Option<&'static reqwest::Client> {
    static CLIENT: OnceLock<Option<reqwest::Client>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .connect_timeout(REQUEST_TIMEOUT)
                // A redirect would send the document somewhere the config does not name.
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("deploy-agent/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| tracing::warn!("webhooks disabled: {e}"))
                .ok()
        })
        .as_ref()
}

/// Posts `body` to `url` until a 2xx answer, at most [`ATTEMPTS`] tries. Ok: the try
/// that was answered 2xx. Each failed try is logged under `label`; neither the log nor
/// the error contains the URL.
async fn post(url: &str, body: String, label: &str) -> Result<u32, String> {
    let client = client().ok_or("no HTTP client")?;
    let mut wait = FIRST_BACKOFF;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let sent = client
            .post(url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return Ok(attempt),
            Ok(r) => last = format!("answered {}", r.status()),
            // reqwest's message names the URL: only the kind of failure is kept.
            Err(e) => last = describe(&e),
        }
        tracing::info!("{label}: try {attempt} of {ATTEMPTS}: {last}");
        if attempt < ATTEMPTS {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    Err(last)
}

fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_builder() {
        "invalid webhook URL"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    // The innermost cause (connection refused, certificate problem) has no URL.
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Action;

    fn entry(outcome: Outcome, error: Option<&str>) -> HistoryEntry {
        HistoryEntry {
            action: Action::Deploy,
            release: "20260101000000".into(),
            version: Some("v2".into()),
            previous: Some("20251231000000".into()),
            outcome,
            holder: "ana@laptop".into(),
            started: "2026-01-01T00:00:00Z".into(),
            finished: "2026-01-01T00:00:05Z".into(),
            error: error.map(str::to_owned),
            origin: None,
            instance: None,
        }
    }

    #[test]
    fn the_document_has_every_field_and_a_slack_text_with_secrets_masked() {
        let e = entry(Outcome::RolledBack, Some("health: token=hunter22 refused"));
        let doc = document("myapp", "production", "web1", &e, &|s| {
            s.replace("hunter22", "***")
        });
        assert_eq!(doc["app"], "myapp");
        assert_eq!(doc["environment"], "production");
        assert_eq!(doc["host"], "web1");
        assert_eq!(doc["release"], "20260101000000");
        assert_eq!(doc["version"], "v2");
        assert_eq!(doc["outcome"], "rolled_back");
        assert_eq!(doc["who"], "ana@laptop");
        assert_eq!(doc["when"], "2026-01-01T00:00:05Z");
        assert_eq!(doc["error"], "health: token=*** refused");
        let text = doc["text"].as_str().unwrap();
        assert!(
            text.starts_with(
                "myapp production on web1: release 20260101000000 (v2) was rolled back"
            ),
            "{text}"
        );
        assert!(!doc.to_string().contains("hunter22"));
    }

    #[test]
    fn the_store_is_0600_and_removed_when_the_config_has_no_webhooks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let spec = NotifySpec {
            webhooks: vec!["https://hooks.example.com/T/B/x".into()],
            environment: "prod".into(),
        };
        store(&layout, Some(&spec)).unwrap();
        let mode = std::fs::metadata(store_path(&layout))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load(&layout), Some(spec));
        store(&layout, None).unwrap();
        assert_eq!(load(&layout), None);
        assert!(!store_path(&layout).exists());
        // Removing what is not there is fine.
        store(&layout, None).unwrap();
    }

    #[test]
    fn outcome_names_are_the_wire_names() {
        assert_eq!(outcome_name(Outcome::RollbackFailed), "rollback_failed");
        assert_eq!(outcome_name(Outcome::Live), "live");
    }
}

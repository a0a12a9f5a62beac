//! Health polling: GET the URL until it answers the expected status, `retries` times,
//! `interval` apart, each request bounded by `request_timeout`.
//!
//! The agent fetches the URL on the server itself, so it is nearly always a plain
//! `http://127.0.0.1:PORT/...`; a small HTTP/1.1 client covers that without pulling a
//! TLS stack into the agent. An `https://` URL is refused with a clear message.

use std::time::Duration;

use proto::{HealthReport, HealthSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_RESPONSE: usize = 64 * 1024;
const SNIPPET: usize = 512;

/// One answer, or why there was none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Status { code: u16, body: String },
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub path: String,
}

pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.starts_with("https://") {
        return Err(format!(
            "{url}: the agent checks health on the server itself and speaks plain http; \
             point health.url at the app's local port (e.g. http://127.0.0.1:4000/...)"
        ));
    } else {
        return Err(format!("{url}: a health URL must start with http://"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or_else(|| format!("{url}: bad IPv6 host"))?;
        let host = &v6[..end];
        let port = v6[end + 1..].strip_prefix(':').unwrap_or("80");
        (host.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p),
            None => (authority.to_owned(), "80"),
        }
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("{url}: bad port {port:?}"))?;
    Ok(Target {
        host,
        port,
        path: path.to_owned(),
    })
}

/// One GET, bounded by `timeout` from connect to the last byte read.
pub async fn probe(target: &Target, timeout: Duration) -> Probe {
    match tokio::time::timeout(timeout, get(target)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => Probe::Error(e),
        Err(_) => Probe::Error(format!("no answer within {}ms", timeout.as_millis())),
    }
}

async fn get(t: &Target) -> Result<Probe, String> {
    let addr = if t.host.contains(':') {
        format!("[{}]:{}", t.host, t.port)
    } else {
        format!("{}:{}", t.host, t.port)
    };
    let mut stream = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let host_header = if t.port == 80 {
        t.host.clone()
    } else {
        addr.clone()
    };
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: deploy-agent/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        t.path,
        env!("CARGO_PKG_VERSION")
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() >= MAX_RESPONSE {
                    break;
                }
            }
            Err(e) if buf.is_empty() => return Err(format!("read: {e}")),
            Err(_) => break,
        }
    }
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> Result<Probe, String> {
    let text = String::from_utf8_lossy(buf);
    let status_line = text.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/") {
        return Err(format!(
            "not an HTTP response: {:?}",
            truncate(status_line, 80)
        ));
    }
    let code = parts
        .next()
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line: {:?}", truncate(status_line, 80)))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok(Probe::Status {
        code,
        body: truncate(body, SNIPPET).to_owned(),
    })
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Polls until healthy or out of tries. `on_attempt` sees each result (for progress).
pub async fn wait_healthy(
    spec: &HealthSpec,
    mut on_attempt: impl FnMut(u32, &Probe),
) -> HealthReport {
    let mut report = HealthReport {
        url: spec.url.clone(),
        healthy: false,
        attempts: 0,
        last_status: None,
        last_error: None,
        body_snippet: None,
    };
    let target = match parse_url(&spec.url) {
        Ok(t) => t,
        Err(e) => {
            report.last_error = Some(e);
            return report;
        }
    };
    let tries = spec.retries.max(1);
    for attempt in 1..=tries {
        let p = probe(&target, Duration::from_millis(spec.request_timeout_ms)).await;
        report.attempts = attempt;
        on_attempt(attempt, &p);
        match p {
            Probe::Status { code, body } => {
                report.last_status = Some(code);
                report.last_error = None;
                report.body_snippet = Some(body);
                if code == spec.expect_status {
                    report.healthy = true;
                    return report;
                }
            }
            Probe::Error(e) => {
                report.last_error = Some(e);
            }
        }
        if attempt < tries {
            tokio::time::sleep(Duration::from_millis(spec.interval_ms)).await;
        }
    }
    report
}

/// A one-line reason for a failed report.
pub fn describe(report: &HealthReport) -> String {
    let last = match (&report.last_status, &report.last_error) {
        (_, Some(e)) => e.clone(),
        (Some(code), None) => format!("status {code}"),
        (None, None) => "no answer".into(),
    };
    format!(
        "health check {} failed after {} attempt(s): {last}",
        report.url, report.attempts
    )
}

/// What the URL answered at the last attempt, for a person: the status and the start
/// of the body, or why there was no answer.
pub fn answer(report: &HealthReport) -> String {
    match (&report.last_status, &report.last_error) {
        (_, Some(e)) => e.clone(),
        (Some(code), None) => {
            let body: String = report
                .body_snippet
                .as_deref()
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            if body.is_empty() {
                format!("status {code}, empty body")
            } else {
                let snippet: String = body.chars().take(80).collect();
                format!("status {code}, body {snippet:?}")
            }
        }
        (None, None) => "no answer".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:4000/api/v1/status/").unwrap(),
            Target {
                host: "127.0.0.1".into(),
                port: 4000,
                path: "/api/v1/status/".into()
            }
        );
        assert_eq!(parse_url("http://localhost").unwrap().port, 80);
        assert_eq!(parse_url("http://[::1]:81/x").unwrap().host, "::1");
        assert!(parse_url("https://x/").unwrap_err().contains("plain http"));
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("http://x:notaport/").is_err());
    }

    #[test]
    fn responses() {
        assert_eq!(
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\nX: y\r\n\r\ndown").unwrap(),
            Probe::Status {
                code: 503,
                body: "down".into()
            }
        );
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n").is_err());
    }

    async fn serve(status: &'static str, count: usize) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            for _ in 0..count {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let resp = format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok");
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        port
    }

    fn spec(port: u16, retries: u32) -> HealthSpec {
        HealthSpec {
            url: format!("http://127.0.0.1:{port}/api/v1/status/"),
            expect_status: 200,
            retries,
            interval_ms: 10,
            request_timeout_ms: 1000,
            watch_ms: 0,
            watch_failures: 0,
        }
    }

    #[tokio::test]
    async fn healthy_on_first_try() {
        let port = serve("200 OK", 1).await;
        let r = wait_healthy(&spec(port, 3), |_, _| {}).await;
        assert!(r.healthy);
        assert_eq!(r.attempts, 1);
        assert_eq!(r.body_snippet.as_deref(), Some("ok"));
    }

    #[tokio::test]
    async fn wrong_status_uses_every_try() {
        let port = serve("500 Internal Server Error", 3).await;
        let mut seen = 0;
        let r = wait_healthy(&spec(port, 3), |_, _| seen += 1).await;
        assert!(!r.healthy);
        assert_eq!((r.attempts, seen), (3, 3));
        assert_eq!(r.last_status, Some(500));
        assert!(describe(&r).contains("status 500"));
    }

    #[tokio::test]
    async fn connection_refused_is_reported() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let r = wait_healthy(&spec(port, 2), |_, _| {}).await;
        assert!(!r.healthy);
        assert!(r.last_error.unwrap().contains("connect"));
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let _keep = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let mut s = spec(port, 1);
        s.request_timeout_ms = 200;
        let r = wait_healthy(&s, |_, _| {}).await;
        assert!(r.last_error.unwrap().contains("no answer"));
    }
}

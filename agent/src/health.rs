//! Health polling: GET the URL until it answers the expected status, `retries` times,
//! `interval` apart, each request bounded by `request_timeout`.
//!
//! The agent fetches the URL on the server itself, so it is nearly always a plain
//! `http://127.0.0.1:PORT/...`; an `https://` URL is refused with a clear message. One
//! HTTP/1.1 connection per request, through hyper's low-level client: it decodes chunked
//! and Content-Length bodies alike. Only the first [`SNIPPET`] bytes of a body are read,
//! so an endless body costs no memory.
//!
//! Why hyper and not reqwest (the controller's client): reqwest sets up rustls and its
//! roots on the first request, and the code pages that touches kept an idle agent at
//! about 9 MiB after its first health check, over the 8 MiB the agent is held to (#15).

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use proto::{HealthReport, HealthSpec};
use tokio::net::TcpStream;

/// The most of a body kept (and read) for the report.
pub const SNIPPET: usize = 512;

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

impl Target {
    /// `host:port`, with an IPv6 host in brackets.
    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The `Host` header: without the port when it is 80.
    fn host_header(&self) -> String {
        if self.port == 80 && !self.host.contains(':') {
            self.host.clone()
        } else if self.port == 80 {
            format!("[{}]", self.host)
        } else {
            self.addr()
        }
    }
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
    let addr = t.addr();
    let req = hyper::Request::get(t.path.as_str())
        .header(hyper::header::HOST, t.host_header())
        .header(
            hyper::header::USER_AGENT,
            concat!("deploy-agent/", env!("CARGO_PKG_VERSION")),
        )
        .header(hyper::header::ACCEPT, "*/*")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("http://{addr}{}: {e}", t.path))?;
    let stream = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let no_answer = |e: hyper::Error| format!("no HTTP answer from {addr}: {e}");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(no_answer)?;
    // The connection is driven beside the request and dropped with it.
    let conn = AbortOnDrop(tokio::spawn(conn));
    let resp = sender.send_request(req).await.map_err(no_answer)?;
    let code = resp.status().as_u16();
    // Read only as much as the snippet keeps; a broken body after the status line
    // still leaves an answer (the status) and what came of the body.
    let mut body = Vec::new();
    let mut incoming = resp.into_body();
    while body.len() < SNIPPET {
        match incoming.frame().await {
            Some(Ok(frame)) => {
                if let Some(c) = frame.data_ref() {
                    body.extend_from_slice(&c[..c.len().min(SNIPPET - body.len())]);
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    drop(conn);
    Ok(Probe::Status {
        code,
        body: snippet(&body),
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The body's first bytes as text; a character cut at the end is dropped, not replaced.
fn snippet(bytes: &[u8]) -> String {
    let text = match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(e) if e.error_len().is_none() => {
            String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned()
        }
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    };
    truncate(&text, SNIPPET).to_owned()
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

    /// A local HTTP server that reads one request per connection and writes `answer`
    /// in the given pieces, `count` times.
    async fn serve_raw(pieces: Vec<Vec<u8>>, count: usize) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            for _ in 0..count {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                for p in &pieces {
                    if s.write_all(p).await.is_err() {
                        break;
                    }
                    let _ = s.flush().await;
                    tokio::task::yield_now().await;
                }
            }
        });
        port
    }

    // See: #15
    #[tokio::test]
    async fn a_chunked_body_is_decoded_in_the_report() {
        let port = serve_raw(
            vec![
                b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                b"5\r\ndatab\r\n".to_vec(),
                b"c\r\nase is down\n\r\n".to_vec(),
                b"0\r\n\r\n".to_vec(),
            ],
            1,
        )
        .await;
        let r = wait_healthy(&spec(port, 1), |_, _| {}).await;
        assert!(!r.healthy);
        assert_eq!(r.last_status, Some(503));
        assert_eq!(r.body_snippet.as_deref(), Some("database is down\n"));
        assert_eq!(answer(&r), "status 503, body \"database is down\"");
    }

    #[tokio::test]
    async fn an_endless_body_is_cut_at_the_snippet() {
        let mut pieces = vec![b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()];
        // 16 MiB announced in 1 MiB chunks: the probe must stop reading long before.
        let chunk = [b"100000\r\n".as_slice(), &[b'x'; 1 << 20], b"\r\n"].concat();
        pieces.extend(std::iter::repeat_n(chunk, 16));
        let port = serve_raw(pieces, 1).await;
        let r = wait_healthy(&spec(port, 1), |_, _| {}).await;
        assert!(r.healthy, "{r:?}");
        assert_eq!(r.body_snippet.unwrap(), "x".repeat(SNIPPET));
    }

    #[tokio::test]
    async fn a_non_http_answer_is_an_error() {
        let port = serve_raw(vec![b"SSH-2.0-OpenSSH_9.2\r\n".to_vec()], 1).await;
        let r = wait_healthy(&spec(port, 1), |_, _| {}).await;
        assert!(!r.healthy);
        assert_eq!(r.last_status, None);
        let e = r.last_error.unwrap();
        assert!(e.contains("no HTTP answer"), "{e}");
    }

    #[test]
    fn a_cut_character_is_dropped() {
        assert_eq!(snippet("h\u{e9}".as_bytes()), "h\u{e9}");
        assert_eq!(snippet(&"h\u{e9}".as_bytes()[..2]), "h");
        assert_eq!(snippet(b"\xff!"), "\u{fffd}!");
    }

    async fn serve(status: &'static str, count: usize) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

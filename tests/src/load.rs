//! A small, steady HTTP load for the cutover tests: N requests per second, each on a NEW
//! TCP connection (as many independent visitors would make them), counting every request
//! that did not get a 2xx answer.
//!
//! * The schedule is fixed: request `i` is due at `start + i / rate`. A pool of worker
//!   threads takes the due requests; if they fall behind, requests go out late rather
//!   than being dropped, and [`LoadReport::max_lag`] says by how much.
//! * Everything is bounded: every request by [`LoadConfig::request_timeout`] (connect,
//!   write and read), the run by [`LoadConfig::max_requests`] and
//!   [`LoadConfig::max_duration`]; [`Load::stop`] ends it earlier and waits at most one
//!   request timeout for the requests in flight.
//! * A failure is a connect error (e.g. refused), a timeout, another I/O error (reset,
//!   closed before the status line), or a non-2xx status (nginx's `502 Bad Gateway` while
//!   the app is down). The first [`SAMPLES`] failures are kept with their time.
//!
//! ```ignore
//! let load = Load::start(nginx.port, LoadConfig::default());
//! app.push_ok("v2");
//! let report = load.stop();
//! println!("{report}");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How many failures a report keeps word for word.
pub const SAMPLES: usize = 20;
/// Worker threads: enough to keep 150/s going even while every request takes over a
/// second (a proxy that holds connections until they time out).
const WORKERS: usize = 256;

/// What to send, how fast, and for how long at most.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Requests per second (default 150).
    pub rate: u32,
    /// The path to GET (default `/`).
    pub path: String,
    /// Bound on connect + write + read of one request (default 2 s).
    pub request_timeout: Duration,
    /// The run ends after this many requests (default 150 × 600).
    pub max_requests: u64,
    /// The run ends after this long (default 10 minutes).
    pub max_duration: Duration,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            rate: 150,
            path: "/".into(),
            request_timeout: Duration::from_secs(2),
            max_requests: 150 * 600,
            max_duration: Duration::from_secs(600),
        }
    }
}

/// Why one request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The TCP connect failed (refused, unreachable, ...).
    Connect(String),
    /// No complete answer within the request timeout.
    Timeout,
    /// Another I/O error, or the connection closed before a status line.
    Io(String),
    /// An answer with a status outside 200..=299.
    Status(u16),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect: {e}"),
            Failure::Timeout => write!(f, "timeout"),
            Failure::Io(e) => write!(f, "i/o: {e}"),
            Failure::Status(code) => write!(f, "status {code}"),
        }
    }
}

/// What a run saw.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Requests sent (each got an answer, a failure, or a timeout).
    pub sent: u64,
    /// Requests answered with a 2xx status.
    pub ok: u64,
    /// Requests that failed, in all.
    pub failed: u64,
    pub connect_errors: u64,
    pub timeouts: u64,
    pub io_errors: u64,
    /// Non-2xx answers by status.
    pub bad_status: BTreeMap<u16, u64>,
    /// The first [`SAMPLES`] failures: time since the start of the run, and why.
    pub samples: Vec<(Duration, Failure)>,
    /// The latest any request went out after its due time.
    pub max_lag: Duration,
    /// How long the run lasted.
    pub elapsed: Duration,
    /// The bodies of 2xx answers, counted by their first line (which version served).
    pub served: BTreeMap<String, u64>,
}

impl LoadReport {
    fn record(&mut self, at: Duration, result: Result<String, Failure>) {
        self.sent += 1;
        let failure = match result {
            Ok(body) => {
                self.ok += 1;
                let first = body.lines().next().unwrap_or("").trim().to_owned();
                *self.served.entry(first).or_default() += 1;
                return;
            }
            Err(f) => f,
        };
        self.failed += 1;
        match &failure {
            Failure::Connect(_) => self.connect_errors += 1,
            Failure::Timeout => self.timeouts += 1,
            Failure::Io(_) => self.io_errors += 1,
            Failure::Status(code) => *self.bad_status.entry(*code).or_default() += 1,
        }
        if self.samples.len() < SAMPLES {
            self.samples.push((at, failure));
        }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests in {:.1}s: {} ok, {} failed (connect {}, timeout {}, i/o {}, status {:?}); \
             max lag {} ms",
            self.sent,
            self.elapsed.as_secs_f64(),
            self.ok,
            self.failed,
            self.connect_errors,
            self.timeouts,
            self.io_errors,
            self.bad_status,
            self.max_lag.as_millis(),
        )?;
        for (at, why) in &self.samples {
            write!(f, "\n  at {:.3}s: {why}", at.as_secs_f64())?;
        }
        if self.failed as usize > self.samples.len() {
            write!(
                f,
                "\n  ... and {} more",
                self.failed as usize - self.samples.len()
            )?;
        }
        Ok(())
    }
}

/// A load running in the background; [`Load::stop`] ends it and returns the counts.
pub struct Load {
    stop: Arc<AtomicBool>,
    scheduler: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    report: Arc<Mutex<LoadReport>>,
    started: Instant,
}

impl Load {
    /// Starts sending `GET cfg.path` to `127.0.0.1:port` at `cfg.rate` per second.
    pub fn start(port: u16, cfg: LoadConfig) -> Load {
        assert!(cfg.rate > 0, "a load needs a rate above 0");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let started = Instant::now();
        let (tx, rx) = mpsc::channel::<Instant>();
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..WORKERS)
            .map(|_| {
                let rx = Arc::clone(&rx);
                let report = Arc::clone(&report);
                let path = cfg.path.clone();
                let timeout = cfg.request_timeout;
                thread::spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next due request.
                        let due = match rx.lock().unwrap().recv() {
                            Ok(due) => due,
                            Err(_) => return,
                        };
                        let sent_at = Instant::now();
                        let result = request(addr, &path, timeout);
                        let mut r = report.lock().unwrap();
                        r.max_lag = r.max_lag.max(sent_at.saturating_duration_since(due));
                        r.record(sent_at.duration_since(started), result);
                    }
                })
            })
            .collect();
        let scheduler = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let step = Duration::from_secs(1) / cfg.rate;
                for i in 0..cfg.max_requests {
                    let due = started + step * i as u32;
                    if due.duration_since(started) >= cfg.max_duration {
                        break;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        if now >= due {
                            break;
                        }
                        thread::sleep((due - now).min(Duration::from_millis(50)));
                    }
                    if stop.load(Ordering::Relaxed) || tx.send(due).is_err() {
                        break;
                    }
                }
                // Dropping `tx` lets the workers finish what is queued and end.
            })
        };
        Load {
            stop,
            scheduler: Some(scheduler),
            workers,
            report,
            started,
        }
    }

    /// How many requests were answered so far (ok + failed).
    pub fn sent(&self) -> u64 {
        self.report.lock().unwrap().sent
    }

    /// Stops sending, waits for the requests in flight (each bounded by the request
    /// timeout), and returns the counts.
    pub fn stop(mut self) -> LoadReport {
        self.finish()
    }

    fn finish(&mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.scheduler.take() {
            let _ = s.join();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let mut r = self.report.lock().unwrap().clone();
        r.elapsed = self.started.elapsed();
        r
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if self.scheduler.is_some() {
            self.finish();
        }
    }
}

/// One GET on a new connection; the 2xx body, or why not.
fn request(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, Failure> {
    let deadline = Instant::now() + timeout;
    let io = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::Io(e.to_string()),
    };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::Connect(e.to_string()),
    })?;
    let left = |d: Instant| {
        d.checked_duration_since(Instant::now())
            .filter(|l| !l.is_zero())
            .ok_or(Failure::Timeout)
    };
    s.set_write_timeout(Some(left(deadline)?)).map_err(io)?;
    // One write: a request split over several segments is not what a browser sends.
    let req =
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: deployctl-e2e-load\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        s.set_read_timeout(Some(left(deadline)?)).map_err(io)?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 1 << 20 {
                    return Err(Failure::Io("answer over 1 MiB".into()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let code: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            Failure::Io(format!(
                "no status line in the answer ({} bytes)",
                buf.len()
            ))
        })?;
    if !(200..300).contains(&code) {
        return Err(Failure::Status(code));
    }
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A tiny server on loopback answering each connection with `status` and closing.
    fn server(status: u16, conns: usize) -> (u16, JoinHandle<()>) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let h = thread::spawn(move || {
            for s in l.incoming().take(conns) {
                let mut s = s.unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(s, "HTTP/1.0 {status} X\r\n\r\nhello\n");
            }
        });
        (port, h)
    }

    fn cfg(n: u64) -> LoadConfig {
        LoadConfig {
            rate: 200,
            max_requests: n,
            max_duration: Duration::from_secs(30),
            request_timeout: Duration::from_secs(2),
            ..LoadConfig::default()
        }
    }

    #[test]
    fn counts_answers_and_bad_statuses_on_new_connections() {
        let (port, h) = server(200, 20);
        let load = Load::start(port, cfg(20));
        h.join().unwrap(); // 20 connections were accepted: one per request
        let r = load.stop();
        assert_eq!((r.sent, r.ok, r.failed), (20, 20, 0), "{r}");
        assert_eq!(r.served.get("hello"), Some(&20), "{r}");

        let (port, h) = server(502, 10);
        let r = {
            let load = Load::start(port, cfg(10));
            h.join().unwrap();
            load.stop()
        };
        assert_eq!((r.sent, r.failed), (10, 10), "{r}");
        assert_eq!(r.bad_status.get(&502), Some(&10), "{r}");
        assert_eq!(r.samples[0].1, Failure::Status(502));
    }

    #[test]
    fn a_closed_port_is_a_connect_error() {
        let port = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap().port()
        };
        let r = Load::start(port, cfg(5)).stop_after(5);
        assert_eq!((r.sent, r.connect_errors), (5, 5), "{r}");
        assert!(matches!(r.samples[0].1, Failure::Connect(_)), "{r}");
    }

    #[test]
    fn a_server_that_never_answers_is_a_timeout_within_the_bound() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let r = Load::start(
            port,
            LoadConfig {
                request_timeout: Duration::from_millis(300),
                ..cfg(3)
            },
        )
        .stop_after(3);
        drop(l);
        assert_eq!((r.sent, r.timeouts), (3, 3), "{r}");
    }

    impl Load {
        /// Waits (10 s) until `n` requests were answered, then stops.
        fn stop_after(self, n: u64) -> LoadReport {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.sent() < n {
                assert!(Instant::now() < deadline, "load did not send {n} requests");
                thread::sleep(Duration::from_millis(10));
            }
            self.stop()
        }
    }
}

//! Streaming lines to the controller for `logs` and `exec`: a producer (a child's pipes,
//! or the agent reading files) fills a small bounded channel with batches of lines; the
//! driver sends them on as fast as the connection takes them. Memory stays bounded: a
//! line is cut at [`proto::MAX_LINE_BYTES`], a batch at [`BATCH_LINES`] lines, and the
//! channel holds [`CHANNEL_BATCHES`] batches, so a fast source waits (a child blocks on
//! its full pipe) while a slow controller reads.
//!
//! The driver also watches the connection: when the controller closes it (Ctrl-C on
//! `logs -f`, a lost SSH session) or stays silent past the agent's idle limit (the
//! controller pings while it streams), the child's whole process group is killed, so
//! nothing outlives the controller. A heartbeat (an empty [`Output`]) goes out every
//! [`HEARTBEAT`] so the controller can tell a quiet stream from a dead one.

use std::process::ExitStatus;
use std::time::Duration;

use proto::codec::Connection;
use proto::{MAX_LINE_BYTES, Output, OutputStream, Response};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::SessionLimits;

/// Lines per [`Output`] at most.
pub const BATCH_LINES: usize = 256;
/// Batches waiting to be sent at most (per stream).
pub const CHANNEL_BATCHES: usize = 8;
/// How often a stream with nothing to say sends an empty [`Output`].
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// The controller pings every few seconds while it streams: silence shorter than this
/// never counts as gone, whatever a (test) `idle_timeout_secs` says.
pub const MIN_SILENCE: Duration = Duration::from_secs(30);
/// After the child exits, how long output still held open by something it left behind
/// (a background process) is waited for before its process group is killed.
pub const EXIT_GRACE: Duration = Duration::from_secs(2);

/// Secret values, masked as `***` in every line.
#[derive(Debug, Clone, Default)]
pub struct Masker(Vec<String>);

impl Masker {
    /// Like the deploy's redaction: values shorter than 4 bytes are not masked (they
    /// would mask half of every line), longer values first.
    pub fn new(values: &[String]) -> Self {
        let mut v: Vec<String> = values.iter().filter(|s| s.len() >= 4).cloned().collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Masker(v)
    }

    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.0 {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }

    /// One line as sent: masked, without its line end, cut to [`MAX_LINE_BYTES`].
    pub fn line(&self, raw: &[u8]) -> String {
        let mut raw = raw;
        while let [rest @ .., b'\n' | b'\r'] = raw {
            raw = rest;
        }
        proto::cap_line(self.mask(&String::from_utf8_lossy(raw)))
    }
}

/// Collects lines into batches and sends each when full or when `flush` is asked.
pub struct Batcher {
    stream: OutputStream,
    tx: mpsc::Sender<Output>,
    lines: Vec<String>,
}

impl Batcher {
    pub fn new(stream: OutputStream, tx: mpsc::Sender<Output>) -> Self {
        Batcher {
            stream,
            tx,
            lines: Vec::new(),
        }
    }

    /// Adds a line; false once the driver has gone (stop producing).
    pub async fn push(&mut self, line: String) -> bool {
        self.lines.push(line);
        if self.lines.len() >= BATCH_LINES {
            return self.flush().await;
        }
        true
    }

    pub async fn flush(&mut self) -> bool {
        if self.lines.is_empty() {
            return !self.tx.is_closed();
        }
        let lines = std::mem::take(&mut self.lines);
        self.tx
            .send(Output {
                stream: self.stream,
                lines,
            })
            .await
            .is_ok()
    }
}

/// Reads `pipe` line by line (each cut at [`MAX_LINE_BYTES`], the rest of a longer line
/// skipped) into `tx`, batching lines that are already there and sending at once when
/// the reader has nothing more buffered.
pub async fn read_lines<R: AsyncRead + Unpin>(
    pipe: R,
    stream: OutputStream,
    tx: mpsc::Sender<Output>,
    masker: Masker,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, pipe);
    let mut batch = Batcher::new(stream, tx);
    let mut buf = Vec::with_capacity(1024);
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
            .unwrap_or_default();
        if n == 0 {
            batch.flush().await;
            return;
        }
        if !buf.ends_with(b"\n") && buf.len() > MAX_LINE_BYTES {
            // Skip the rest of an overlong line, a bounded piece at a time.
            let mut skip = Vec::new();
            loop {
                skip.clear();
                match (&mut reader)
                    .take(64 * 1024)
                    .read_until(b'\n', &mut skip)
                    .await
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) if skip.ends_with(b"\n") => break,
                    Ok(_) => {}
                }
            }
        }
        if !batch.push(masker.line(&buf)).await {
            return;
        }
        if reader.buffer().is_empty() && !batch.flush().await {
            return;
        }
    }
}

/// What is being streamed: batches from `rx`, and the child that produces them (if any).
pub struct Source {
    pub rx: mpsc::Receiver<Output>,
    pub child: Option<Child>,
}

/// How a stream ended.
#[derive(Debug)]
pub enum Ending {
    /// The source ended: the child's status (`None` without a child).
    Finished {
        status: Option<ExitStatus>,
        timed_out: bool,
    },
    /// The controller went away, or stayed silent too long; the child was killed.
    Gone(String),
}

/// The bounds of one stream.
pub struct Bounds<'a> {
    /// Kill the child after this long.
    pub timeout: Option<Duration>,
    /// The controller's silence that counts as gone (it pings while streaming).
    pub idle: Duration,
    /// How long the controller has been silent.
    pub silent_for: &'a (dyn Fn() -> Duration + Send + Sync),
    /// Resolves when the agent is shutting down: the child is killed then.
    pub stopping: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>,
}

/// Spawns a child with piped stdout and stderr in its own process group, and the
/// readers that turn its output into batches.
pub fn spawn(mut command: tokio::process::Command, masker: &Masker) -> std::io::Result<Source> {
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(read_lines(
            out,
            OutputStream::Stdout,
            tx.clone(),
            masker.clone(),
        ));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(read_lines(err, OutputStream::Stderr, tx, masker.clone()));
    }
    Ok(Source {
        rx,
        child: Some(child),
    })
}

fn kill_group(child: &Child) {
    if let Some(pid) = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    out: Output,
) -> Result<(), String> {
    match tokio::time::timeout(
        SessionLimits::SEND_TIMEOUT,
        conn.tx.send(&Response::Output(out)),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("sending to the controller: {e}")),
        Err(_) => Err(format!(
            "the controller took nothing for {:?}",
            SessionLimits::SEND_TIMEOUT
        )),
    }
}

/// Streams `source` to the controller until it ends or the controller goes away.
pub async fn drive<S>(
    conn: &mut Connection<S>,
    mut source: Source,
    mut bounds: Bounds<'_>,
) -> Ending
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    let kill_at = bounds.timeout.map_or(far, |t| Instant::now() + t);
    let mut timed_out = false;
    let mut status: Option<ExitStatus> = None;
    let mut grace_until = far;
    let mut output_done = false;
    let gone = |child: &Option<Child>, why: String| {
        if let Some(c) = child {
            kill_group(c);
        }
        Ending::Gone(why)
    };
    loop {
        let child_running = source.child.is_some() && status.is_none();
        tokio::select! {
            m = source.rx.recv(), if !output_done => match m {
                Some(out) => {
                    if let Err(e) = send(conn, out).await {
                        return gone(&source.child, e);
                    }
                }
                None => output_done = true,
            },
            s = async { source.child.as_mut().expect("running").wait().await }, if child_running => {
                status = s.ok();
                grace_until = Instant::now() + EXIT_GRACE;
            }
            f = conn.rx.recv() => {
                // The controller sends nothing while a stream runs (pings are answered
                // below us): a frame or a close means it is done with the stream.
                let why = match f {
                    Ok(_) => "the controller sent a request during a stream".to_owned(),
                    Err(e) => format!("the controller went away ({e})"),
                };
                return gone(&source.child, why);
            }
            () = &mut bounds.stopping => {
                return gone(&source.child, "deploy-agent is shutting down".to_owned());
            }
            _ = heartbeat.tick() => {
                if (bounds.silent_for)() > bounds.idle.max(MIN_SILENCE) {
                    return gone(&source.child, format!("the controller was silent for {:?}", bounds.idle));
                }
                let beat = Output { stream: OutputStream::Stdout, lines: Vec::new() };
                if let Err(e) = send(conn, beat).await {
                    return gone(&source.child, e);
                }
            }
            _ = tokio::time::sleep_until(kill_at), if child_running && !timed_out => {
                timed_out = true;
                if let Some(c) = &source.child {
                    kill_group(c);
                }
            }
            _ = tokio::time::sleep_until(grace_until), if status.is_some() && !output_done => {
                // The child exited but something it started still holds its output open.
                if let Some(c) = &source.child {
                    kill_group(c);
                }
                grace_until = far;
            }
        }
        let child_done = source.child.is_none() || status.is_some();
        if output_done && child_done {
            if let Some(c) = &source.child {
                // Nothing of the command's may outlive it.
                kill_group(c);
            }
            return Ending::Finished { status, timed_out };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_and_line_ends() {
        let m = Masker::new(&["hunter2-secret".into(), "abc".into()]);
        assert_eq!(m.line(b"pw=hunter2-secret abc\r\n"), "pw=*** abc");
        assert_eq!(m.line(b"\n"), "");
    }

    #[tokio::test]
    async fn an_endless_line_is_cut_and_the_next_one_kept() {
        let mut data = vec![b'x'; MAX_LINE_BYTES * 3];
        data.extend_from_slice(b"\nnext\n");
        let (tx, mut rx) = mpsc::channel(CHANNEL_BATCHES);
        tokio::spawn(read_lines(
            std::io::Cursor::new(data),
            OutputStream::Stdout,
            tx,
            Masker::default(),
        ));
        let mut lines = Vec::new();
        while let Some(o) = rx.recv().await {
            lines.extend(o.lines);
        }
        assert_eq!(
            lines.len(),
            2,
            "{:?}",
            lines.iter().map(|l| l.len()).collect::<Vec<_>>()
        );
        assert!(lines[0].ends_with(proto::CUT_MARK));
        assert!(lines[0].len() <= MAX_LINE_BYTES + proto::CUT_MARK.len());
        assert_eq!(lines[1], "next");
    }

    #[tokio::test]
    async fn a_fast_source_waits_for_a_slow_reader() {
        // The producer can run ahead by at most the channel's batches: memory is bounded.
        let data = "line\n".repeat(BATCH_LINES * CHANNEL_BATCHES * 20);
        let (tx, mut rx) = mpsc::channel(CHANNEL_BATCHES);
        let producer = tokio::spawn(read_lines(
            std::io::Cursor::new(data.into_bytes()),
            OutputStream::Stdout,
            tx,
            Masker::default(),
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !producer.is_finished(),
            "the producer did not wait for the reader"
        );
        let mut n = 0;
        while let Some(o) = rx.recv().await {
            n += o.lines.len();
        }
        assert_eq!(n, BATCH_LINES * CHANNEL_BATCHES * 20);
    }
}

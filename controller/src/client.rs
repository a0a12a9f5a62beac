//! Typed calls to one agent over a framed connection.
//!
//! Every wait here has a way out: an answer is awaited for at most a time limit (the
//! connection's default, or one the caller derives from the deploy's own timeouts), a send
//! that makes no progress for [`SEND_STALL`] fails, and while data goes out the incoming
//! side is watched, so a connection the agent (or the SSH session under it) closed ends
//! the send at once instead of leaving it waiting for flow-control credit that never comes.

use std::time::Duration;

use proto::codec::{self, Connection, Frame};
use proto::{
    ErrorCode, Event, Hello, HelloReply, PROTOCOL_VERSION, ProtoError, Request, Response, Rpc,
};
use tokio::time::Instant;

use crate::exit::{self, Failure};
use crate::io::Io;

mod stream;
pub use stream::{PING_EVERY, STREAM_IDLE};

/// A send (one control message, or one [`proto::CHUNK_SIZE`] chunk of an upload) that makes
/// no progress for this long counts as a lost connection.
pub const SEND_STALL: Duration = Duration::from_secs(30);
/// The most file data in one WebSocket frame. Frames leave through
/// [`crate::packets::Packets`], which hands them to the SSH channel a packet at a time
/// without shifting them. Smaller frames cost the agent more per byte (32 KiB frames, one
/// per SSH packet, made a 100 MiB push about 20% slower); larger ones stay in tungstenite's
/// write buffer, which keeps its size for the connection's life (1 MiB per host).
pub const FRAME_DATA: usize = 256 * 1024;
/// The WebSocket and `Hello` handshake must end within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest wait for an answer when the caller sets no limit of its own.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest wait for an answer to a request that runs none of the app's commands
/// (the lock without `--lock-wait`, listing releases, starting an upload).
pub const QUICK_REPLY: Duration = Duration::from_secs(120);
/// While the agent streams a release to us, the longest gap between two frames.
pub const FETCH_IDLE: Duration = Duration::from_secs(60);
/// Closing the connection politely may take this long; then it is dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent answered with an error.
    #[error("{}", .0.message)]
    Agent(ProtoError),
    #[error("connection to the agent failed: {0}")]
    Codec(#[from] codec::CodecError),
    #[error("the agent answered out of turn: {0}")]
    Unexpected(String),
    /// No answer within the limit for this request.
    #[error("no answer from the agent within {}s", .0.as_secs())]
    Timeout(Duration),
    /// Data could not be sent: the connection accepted nothing for [`SEND_STALL`].
    #[error("the connection accepted no data for {}s", .0.as_secs())]
    Stalled(Duration),
}

pub struct AgentClient {
    conn: Connection<Box<dyn Io>>,
    pub hello: HelloReply,
    /// How long [`AgentClient::call`] waits for an answer.
    reply_timeout: Duration,
    /// The connection failed (closed, timed out, stalled): closing it politely is moot.
    broken: bool,
}

impl AgentClient {
    /// The WebSocket handshake, then `Hello` both ways, within [`HANDSHAKE_TIMEOUT`].
    pub async fn handshake(io: Box<dyn Io>, host: &str) -> Result<Self, ClientError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::handshake_inner(io, host))
            .await
            .unwrap_or(Err(ClientError::Timeout(HANDSHAKE_TIMEOUT)))
    }

    async fn handshake_inner(io: Box<dyn Io>, host: &str) -> Result<Self, ClientError> {
        // Frames leave through a buffer drained by offset: none is shifted per packet.
        let io: Box<dyn Io> = Box::new(crate::packets::Packets::new(io));
        let mut conn = codec::connect(io).await?;
        conn.send(&Request::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            version: env!("CARGO_PKG_VERSION").into(),
        }))
        .await?;
        match conn.recv_json::<Response>().await? {
            Response::Hello(hello) => Ok(Self {
                conn,
                hello,
                reply_timeout: DEFAULT_REPLY_TIMEOUT,
                broken: false,
            }),
            Response::Error(e) => Err(ClientError::Agent(e)),
            other => Err(ClientError::Unexpected(format!(
                "{host}: expected hello, got {other:?}"
            ))),
        }
    }

    /// Sets how long [`AgentClient::call`] and [`AgentClient::call_with`] wait for an answer.
    pub fn set_reply_timeout(&mut self, limit: Duration) {
        self.reply_timeout = limit;
    }

    pub fn reply_timeout(&self) -> Duration {
        self.reply_timeout
    }

    /// One request and its response, passing progress events to `on_event`.
    pub async fn call_with<R: Rpc>(
        &mut self,
        request: R,
        on_event: impl FnMut(Event),
    ) -> Result<R::Response, ClientError> {
        let limit = self.reply_timeout;
        self.call_within(request, limit, on_event).await
    }

    /// Like [`AgentClient::call_with`], waiting at most `limit` for the answer.
    pub async fn call_within<R: Rpc>(
        &mut self,
        request: R,
        limit: Duration,
        mut on_event: impl FnMut(Event),
    ) -> Result<R::Response, ClientError> {
        let request: Request = request.into();
        self.send_request(request).await?;
        self.response_within::<R>(limit, &mut on_event).await
    }

    pub async fn call<R: Rpc>(&mut self, request: R) -> Result<R::Response, ClientError> {
        self.call_with(request, |_| {}).await
    }

    /// Reads events until the response to `R` arrives, for at most the default limit.
    pub async fn response<R: Rpc>(
        &mut self,
        on_event: &mut impl FnMut(Event),
    ) -> Result<R::Response, ClientError> {
        let limit = self.reply_timeout;
        self.response_within::<R>(limit, on_event).await
    }

    /// Reads events until the response to `R` arrives; gives up after `limit`.
    pub async fn response_within<R: Rpc>(
        &mut self,
        limit: Duration,
        on_event: &mut impl FnMut(Event),
    ) -> Result<R::Response, ClientError> {
        let r = self.response_inner::<R>(limit, on_event).await;
        self.note(r)
    }

    async fn response_inner<R: Rpc>(
        &mut self,
        limit: Duration,
        on_event: &mut impl FnMut(Event),
    ) -> Result<R::Response, ClientError> {
        let deadline = Instant::now() + limit;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.conn.recv_json::<Response>())
                .await
                .map_err(|_| ClientError::Timeout(limit))??;
            match msg {
                Response::Event(e) => on_event(e),
                Response::Error(e) => return Err(ClientError::Agent(e)),
                other => {
                    return R::unwrap_response(other)
                        .map_err(|o| ClientError::Unexpected(format!("{o:?}")));
                }
            }
        }
    }

    /// Receives a release's content after [`proto::Fetch`] was answered with
    /// `FetchReady`: binary frames into `out`, until `FetchEnd`. Returns the sha256 and
    /// size of what arrived, checked against what the agent says it sent. A gap of more
    /// than [`FETCH_IDLE`] between two frames ends it.
    pub async fn receive_fetch(
        &mut self,
        out: &mut impl std::io::Write,
    ) -> Result<(String, u64), ClientError> {
        let r = self.receive_fetch_inner(out).await;
        self.note(r)
    }

    async fn receive_fetch_inner(
        &mut self,
        out: &mut impl std::io::Write,
    ) -> Result<(String, u64), ClientError> {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        loop {
            let frame = tokio::time::timeout(FETCH_IDLE, self.conn.recv())
                .await
                .map_err(|_| ClientError::Timeout(FETCH_IDLE))??;
            match frame {
                Frame::Data(d) => {
                    hasher.update(&d);
                    size += d.len() as u64;
                    out.write_all(&d).map_err(|e| {
                        ClientError::Unexpected(format!("writing the fetched release: {e}"))
                    })?;
                }
                Frame::Text(t) => {
                    match serde_json::from_str::<Response>(&t).map_err(codec::CodecError::from)? {
                        Response::FetchEnd(end) => {
                            let sha = hex::encode(hasher.finalize());
                            if end.sha256 != sha || end.size != size {
                                return Err(ClientError::Unexpected(format!(
                                    "the release arrived damaged: {size} bytes with sha256 {sha}, \
                                 the agent sent {} bytes with sha256 {}",
                                    end.size, end.sha256
                                )));
                            }
                            return Ok((sha, size));
                        }
                        Response::Error(e) => return Err(ClientError::Agent(e)),
                        Response::Event(_) => {}
                        other => return Err(ClientError::Unexpected(format!("{other:?}"))),
                    }
                }
            }
        }
    }

    /// Sends one control message; fails after [`SEND_STALL`] without progress.
    pub async fn send_request(&mut self, request: impl Into<Request>) -> Result<(), ClientError> {
        let request = request.into();
        let r = match tokio::time::timeout(SEND_STALL, self.conn.send(&request)).await {
            Ok(r) => r.map_err(ClientError::from),
            Err(_) => Err(ClientError::Stalled(SEND_STALL)),
        };
        self.note(r)
    }

    /// Remembers a failed connection, so [`AgentClient::close`] does not wait on it.
    fn note<T>(&mut self, r: Result<T, ClientError>) -> Result<T, ClientError> {
        if let Err(e) = &r
            && !matches!(e, ClientError::Agent(_) | ClientError::Unexpected(_))
        {
            self.broken = true;
        }
        r
    }

    /// Sends one chunk of an upload. Meanwhile it reads what the agent sends: progress
    /// events go to `on_event`; an error from the agent (it refused the upload, or is
    /// shutting down) or the connection closing ends the send at once, and so does a
    /// send that makes no progress for [`SEND_STALL`].
    ///
    /// The chunk goes out as frames of at most [`FRAME_DATA`] bytes (slices of it, not
    /// copies).
    pub async fn send_data(
        &mut self,
        chunk: impl Into<bytes::Bytes>,
        on_event: &mut impl FnMut(Event),
    ) -> Result<(), ClientError> {
        let r = self.send_data_inner(chunk.into(), on_event).await;
        self.note(r)
    }

    async fn send_data_inner(
        &mut self,
        chunk: bytes::Bytes,
        on_event: &mut impl FnMut(Event),
    ) -> Result<(), ClientError> {
        let Connection { tx, rx } = &mut self.conn;
        let send = async {
            let mut at = 0;
            while at < chunk.len() {
                let to = (at + FRAME_DATA).min(chunk.len());
                tx.send_data(chunk.slice(at..to)).await?;
                at = to;
            }
            Ok::<(), codec::CodecError>(())
        };
        tokio::pin!(send);
        let stall = tokio::time::sleep(SEND_STALL);
        tokio::pin!(stall);
        loop {
            tokio::select! {
                r = &mut send => return r.map_err(ClientError::from),
                frame = rx.recv() => match frame? {
                    Frame::Text(t) => {
                        match serde_json::from_str::<Response>(&t).map_err(codec::CodecError::from)? {
                            Response::Event(e) => on_event(e),
                            Response::Error(e) => return Err(ClientError::Agent(e)),
                            other => {
                                return Err(ClientError::Unexpected(format!(
                                    "during the upload: {other:?}"
                                )));
                            }
                        }
                    }
                    Frame::Data(_) => {
                        return Err(ClientError::Unexpected(
                            "a binary frame during the upload".into(),
                        ));
                    }
                },
                () = &mut stall => return Err(ClientError::Stalled(SEND_STALL)),
            }
        }
    }

    /// Closes the WebSocket, or gives up after [`CLOSE_TIMEOUT`]; at once when the
    /// connection already failed.
    /// Tells the agent this connection is alive while it waits for its turn (a fleet
    /// rollout's later batches): the agent closes sessions that stay silent for its
    /// `idle_timeout_secs`, freeing their locks. Bounded by [`SEND_STALL`]; an error is
    /// left for the next real request to report.
    pub async fn keepalive(&mut self) {
        if self.broken {
            return;
        }
        if !matches!(
            tokio::time::timeout(SEND_STALL, self.conn.tx.ping()).await,
            Ok(Ok(()))
        ) {
            self.broken = true;
        }
    }

    pub async fn close(mut self) {
        if self.broken {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.conn.tx.close()).await;
    }
}

/// Maps an agent error to an exit code and message.
pub fn agent_failure(host: &str, e: ClientError) -> Failure {
    let code = match &e {
        ClientError::Agent(p) => match p.code {
            ErrorCode::Locked => exit::LOCKED,
            ErrorCode::PathNotAllowed | ErrorCode::BadRequest | ErrorCode::NotFound => exit::USAGE,
            // The agent is stopping: it took nothing on (an upload is discarded).
            ErrorCode::VersionMismatch | ErrorCode::ShuttingDown => exit::CONNECT,
            ErrorCode::RollbackFailed => exit::NEEDS_HUMAN,
            _ => exit::DEPLOY_FAILED,
        },
        _ => exit::CONNECT,
    };
    let mut msg = format!("{host}: {e}");
    if code == exit::LOCKED {
        msg.push_str("; retry later, or pass --lock-wait 5m to wait for it");
    }
    Failure::new(code, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{ErrorCode, Stage};

    /// An agent that answers `Hello`, then sends `frames` and never reads again.
    async fn client_against(frames: Vec<Response>) -> (AgentClient, tokio::task::JoinHandle<()>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let agent = tokio::spawn(async move {
            let mut conn = codec::accept(b).await.unwrap();
            let _hello: Request = conn.recv_json().await.unwrap();
            conn.send(&Response::Hello(HelloReply {
                protocol: PROTOCOL_VERSION,
                version: "test".into(),
                hostname: "test".into(),
            }))
            .await
            .unwrap();
            for f in &frames {
                conn.send(f).await.unwrap();
            }
            // hold the connection open, reading nothing: the client's send blocks
            std::future::pending::<()>().await;
        });
        let client = AgentClient::handshake(Box::new(a), "test").await.unwrap();
        (client, agent)
    }

    #[tokio::test]
    async fn an_error_from_the_agent_ends_a_send_it_never_reads() {
        // See: #16
        let (mut client, agent) = client_against(vec![
            Response::Event(Event {
                stage: Stage::Upload,
                message: "unpacking".into(),
            }),
            Response::Error(ProtoError::new(
                ErrorCode::ShuttingDown,
                "deploy-agent is shutting down; the upload was discarded",
            )),
        ])
        .await;
        let mut events = Vec::new();
        // far more than the pipe holds: without watching the incoming side, this blocks
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            client.send_data(vec![0u8; 8 << 20], &mut |e| events.push(e.message)),
        )
        .await
        .expect("the send ends once the agent's error arrives");
        match r {
            Err(ClientError::Agent(e)) => assert_eq!(e.code, ErrorCode::ShuttingDown),
            other => panic!("expected the agent's error, got {other:?}"),
        }
        assert_eq!(events, vec!["unpacking".to_string()]);
        agent.abort();
    }

    #[tokio::test]
    async fn a_reply_that_never_comes_times_out() {
        // See: #16
        let (mut client, agent) = client_against(Vec::new()).await;
        let r = client
            .response_within::<proto::Releases>(Duration::from_millis(300), &mut |_| {})
            .await;
        assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
        agent.abort();
    }
}

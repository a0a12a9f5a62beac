//! Typed calls to one agent over a framed connection.

use proto::codec::{self, Connection};
use proto::{Event, Hello, HelloReply, PROTOCOL_VERSION, ProtoError, Request, Response, Rpc};

use crate::transport::Io;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent answered with an error.
    #[error("{}", .0.message)]
    Agent(ProtoError),
    #[error("connection to the agent failed: {0}")]
    Codec(#[from] codec::CodecError),
    #[error("the agent answered out of turn: {0}")]
    Unexpected(String),
}

pub struct AgentClient {
    conn: Connection<Box<dyn Io>>,
    pub hello: HelloReply,
}

impl AgentClient {
    /// The WebSocket handshake, then `Hello` both ways.
    pub async fn handshake(io: Box<dyn Io>, host: &str) -> Result<Self, ClientError> {
        let mut conn = codec::connect(io).await?;
        conn.send(&Request::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            version: env!("CARGO_PKG_VERSION").into(),
        }))
        .await?;
        match conn.recv_json::<Response>().await? {
            Response::Hello(hello) => Ok(Self { conn, hello }),
            Response::Error(e) => Err(ClientError::Agent(e)),
            other => Err(ClientError::Unexpected(format!(
                "{host}: expected hello, got {other:?}"
            ))),
        }
    }

    /// One request and its response, passing progress events to `on_event`.
    pub async fn call_with<R: Rpc>(
        &mut self,
        request: R,
        mut on_event: impl FnMut(Event),
    ) -> Result<R::Response, ClientError> {
        let request: Request = request.into();
        self.conn.send(&request).await?;
        self.response::<R>(&mut on_event).await
    }

    pub async fn call<R: Rpc>(&mut self, request: R) -> Result<R::Response, ClientError> {
        self.call_with(request, |_| {}).await
    }

    /// Reads events until the response to `R` arrives.
    pub async fn response<R: Rpc>(
        &mut self,
        on_event: &mut impl FnMut(Event),
    ) -> Result<R::Response, ClientError> {
        loop {
            match self.conn.recv_json::<Response>().await? {
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
    /// size of what arrived, checked against what the agent says it sent.
    pub async fn receive_fetch(
        &mut self,
        out: &mut impl std::io::Write,
    ) -> Result<(String, u64), ClientError> {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        loop {
            match self.conn.recv().await? {
                proto::codec::Frame::Data(d) => {
                    hasher.update(&d);
                    size += d.len() as u64;
                    out.write_all(&d).map_err(|e| {
                        ClientError::Unexpected(format!("writing the fetched release: {e}"))
                    })?;
                }
                proto::codec::Frame::Text(t) => {
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

    pub async fn send_request(&mut self, request: impl Into<Request>) -> Result<(), ClientError> {
        self.conn.send(&request.into()).await?;
        Ok(())
    }

    pub async fn send_data(&mut self, chunk: Vec<u8>) -> Result<(), ClientError> {
        self.conn.tx.send_data(chunk).await?;
        Ok(())
    }

    pub async fn close(mut self) {
        let _ = self.conn.tx.close().await;
    }
}

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

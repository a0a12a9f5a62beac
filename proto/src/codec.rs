//! Framing: JSON control messages as WebSocket text frames, file data as binary frames,
//! over any `AsyncRead + AsyncWrite` stream (a Unix socket, an SSH channel, or
//! `tokio::io::duplex` in a test).

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::MAX_MESSAGE_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("connection error: {0}")]
    WebSocket(#[from] tungstenite::Error),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("expected a control message, got {0}")]
    Unexpected(&'static str),
    #[error("the peer closed the connection")]
    Closed,
}

/// One received frame.
#[derive(Debug)]
pub enum Frame {
    /// A JSON control message, still to be parsed.
    Text(String),
    /// A chunk of file data, as the WebSocket layer received it (not copied again).
    Data(bytes::Bytes),
}

/// The controller side's WebSocket read buffer.
const CONTROLLER_READ_BUFFER: usize = 16 * 1024;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_SIZE))
        .max_frame_size(Some(MAX_MESSAGE_SIZE))
}

/// The agent side of the handshake.
pub async fn accept<S>(stream: S) -> Result<Connection<S>, CodecError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ws = tokio_tungstenite::accept_async_with_config(stream, Some(config())).await?;
    Ok(Connection::from_ws(ws))
}

/// The controller side of the handshake.
pub async fn connect<S>(stream: S) -> Result<Connection<S>, CodecError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The controller reads small control messages (and, for `promote`, a release's frames,
    // whose full size is reserved as each arrives): a 16 KiB read buffer instead of the
    // default 128 KiB, which every connection kept zero-filled for its life (a fleet's
    // waiting hosts hold theirs the whole rollout).
    let config = config().read_buffer_size(CONTROLLER_READ_BUFFER);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config("ws://deploy-agent/v1", stream, Some(config))
            .await?;
    Ok(Connection::from_ws(ws))
}

/// Both halves of a framed connection.
pub struct Connection<S> {
    pub tx: Sender<S>,
    pub rx: Receiver<S>,
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn from_ws(ws: WebSocketStream<S>) -> Self {
        let (sink, stream) = ws.split();
        Self {
            tx: Sender { sink },
            rx: Receiver { stream },
        }
    }

    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), CodecError> {
        self.tx.send(message).await
    }

    pub async fn recv(&mut self) -> Result<Frame, CodecError> {
        self.rx.recv().await
    }

    pub async fn recv_json<T: DeserializeOwned>(&mut self) -> Result<T, CodecError> {
        self.rx.recv_json().await
    }
}

pub struct Sender<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
}

impl<S> Sender<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), CodecError> {
        let text = serde_json::to_string(message)?;
        self.sink.send(Message::text(text)).await?;
        Ok(())
    }

    /// One binary frame. A shared [`bytes::Bytes`] goes out without a copy of its own.
    pub async fn send_data(&mut self, data: impl Into<bytes::Bytes>) -> Result<(), CodecError> {
        self.sink.send(Message::binary(data)).await?;
        Ok(())
    }

    /// A WebSocket ping: proof of life for a peer that counts silence. The pong that
    /// comes back is skipped by [`Receiver::recv`].
    pub async fn ping(&mut self) -> Result<(), CodecError> {
        self.sink.send(Message::Ping(Vec::new().into())).await?;
        Ok(())
    }

    pub async fn close(&mut self) -> Result<(), CodecError> {
        self.sink.close().await?;
        Ok(())
    }
}

pub struct Receiver<S> {
    stream: SplitStream<WebSocketStream<S>>,
}

impl<S> Receiver<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// The next text or binary frame. Pings are answered by the WebSocket layer.
    pub async fn recv(&mut self) -> Result<Frame, CodecError> {
        loop {
            match self.stream.next().await {
                None => return Err(CodecError::Closed),
                Some(Err(tungstenite::Error::ConnectionClosed))
                | Some(Err(tungstenite::Error::AlreadyClosed)) => return Err(CodecError::Closed),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => return Ok(Frame::Text(t.as_str().to_owned())),
                Some(Ok(Message::Binary(b))) => return Ok(Frame::Data(b)),
                Some(Ok(Message::Close(_))) => return Err(CodecError::Closed),
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn recv_json<T: DeserializeOwned>(&mut self) -> Result<T, CodecError> {
        match self.recv().await? {
            Frame::Text(t) => Ok(serde_json::from_str(&t)?),
            Frame::Data(_) => Err(CodecError::Unexpected("a binary frame")),
        }
    }
}

/// A blocking `Write` that ships [`crate::CHUNK_SIZE`] chunks over a channel to an
/// async task that sends them as data frames (a tar or gzip writer on a blocking thread
/// feeding a connection).
pub struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    pub fn new(tx: tokio::sync::mpsc::Sender<Vec<u8>>) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(crate::CHUNK_SIZE),
        }
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= crate::CHUNK_SIZE {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(crate::CHUNK_SIZE));
            self.tx
                .blocking_send(chunk)
                .map_err(|_| std::io::Error::other("the receiving side went away"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Hello, PROTOCOL_VERSION, Request};

    #[tokio::test]
    async fn text_and_data_cross_a_duplex_pipe() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = accept(b).await.unwrap();
            let req: Request = conn.recv_json().await.unwrap();
            let data = match conn.recv().await.unwrap() {
                Frame::Data(d) => d,
                Frame::Text(t) => panic!("expected data, got {t}"),
            };
            (req, data)
        });
        let mut conn = connect(a).await.unwrap();
        let hello = Request::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            version: "1.2.3".into(),
        });
        conn.send(&hello).await.unwrap();
        conn.tx.send_data(vec![7u8; 300_000]).await.unwrap();
        let (req, data) = server.await.unwrap();
        assert_eq!(req, hello);
        assert_eq!(data.len(), 300_000);
        assert!(data.iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn a_dropped_peer_reads_as_closed() {
        let (a, b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move {
            let mut conn = accept(b).await.unwrap();
            conn.recv().await
        });
        let conn = connect(a).await.unwrap();
        drop(conn);
        assert!(matches!(
            server.await.unwrap(),
            Err(CodecError::Closed) | Err(CodecError::WebSocket(_))
        ));
    }
}

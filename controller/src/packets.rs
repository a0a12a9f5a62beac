//! A write buffer that drains from an offset, under the WebSocket layer.
//!
//! tungstenite writes each frame from its own buffer and, after a partial write, shifts
//! what is left to the front; an SSH channel takes one packet (32 KiB with OpenSSH) per
//! write, so a 1 MiB frame was shifted about 32 times. Here a frame is taken whole in one
//! copy and handed to the channel a packet at a time by moving an offset: nothing is
//! shifted, whatever the frame's size.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes held before a write waits for the stream: a chunk and its frame header.
const HOLD: usize = proto::CHUNK_SIZE + 64 * 1024;
/// A buffer larger than this is freed after a drain of less than this.
const KEEP: usize = 64 * 1024;

pub struct Packets<S> {
    inner: S,
    buf: Vec<u8>,
    /// `buf[..at]` has been written.
    at: usize,
}

impl<S> Packets<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            at: 0,
        }
    }
}

impl<S: AsyncWrite + Unpin> Packets<S> {
    /// Writes everything held, as far as the stream takes it.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.at < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.at += n;
        }
        // Held between the frames of an upload; let go once only small messages pass
        // (a host that is done keeps no upload-sized buffer).
        if self.at < KEEP && self.buf.capacity() > KEEP {
            self.buf = Vec::new();
        }
        self.buf.clear();
        self.at = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Packets<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Packets<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() - this.at + data.len() > HOLD {
            ready!(this.poll_drain(cx))?;
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn what_goes_in_comes_out_in_order_through_a_small_pipe() {
        // A pipe that takes 1 KiB at a time, like a channel taking a packet per write.
        let (a, mut b) = tokio::io::duplex(1024);
        let data: Vec<u8> = (0..3 * HOLD).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let mut w = Packets::new(a);
            for part in sent.chunks(300_000) {
                w.write_all(part).await.unwrap();
                w.flush().await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got == data);
    }
}

//! Streaming requests (`logs`, `exec`): any number of [`Output`]s, then the answer.
//!
//! While it waits, the client pings the agent every [`PING_EVERY`] (the agent counts a
//! silent controller as gone and kills what it runs for it), and it counts the agent
//! silent after [`STREAM_IDLE`] without a frame (the agent sends a heartbeat every few
//! seconds, even when it has no line to send): the connection is then lost, never
//! waited on forever.

use std::time::Duration;

use proto::codec::Connection;
use proto::{Output, Request, Response, Rpc};

use super::{AgentClient, ClientError, SEND_STALL};

/// How often the client proves it is alive while a stream runs.
pub const PING_EVERY: Duration = Duration::from_secs(5);
/// No frame from the agent for this long: the connection is lost.
pub const STREAM_IDLE: Duration = Duration::from_secs(60);

impl AgentClient {
    /// Sends `request` and passes each [`Output`] to `on_output` until the answer comes.
    pub async fn stream<R: Rpc>(
        &mut self,
        request: R,
        mut on_output: impl FnMut(Output),
    ) -> Result<R::Response, ClientError> {
        let request: Request = request.into();
        self.send_request(request).await?;
        let r = self.stream_inner::<R>(&mut on_output).await;
        self.note(r)
    }

    async fn stream_inner<R: Rpc>(
        &mut self,
        on_output: &mut impl FnMut(Output),
    ) -> Result<R::Response, ClientError> {
        let Connection { tx, rx } = &mut self.conn;
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut last = tokio::time::Instant::now();
        loop {
            let idle = tokio::time::sleep_until(last + STREAM_IDLE);
            tokio::select! {
                frame = rx.recv_json::<Response>() => {
                    last = tokio::time::Instant::now();
                    match frame? {
                        Response::Output(o) => on_output(o),
                        Response::Event(_) => {}
                        Response::Error(e) => return Err(ClientError::Agent(e)),
                        other => {
                            return R::unwrap_response(other)
                                .map_err(|o| ClientError::Unexpected(format!("{o:?}")));
                        }
                    }
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(SEND_STALL, tx.ping()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(ClientError::Codec(e)),
                        Err(_) => return Err(ClientError::Stalled(SEND_STALL)),
                    }
                }
                () = idle => return Err(ClientError::Timeout(STREAM_IDLE)),
            }
        }
    }
}

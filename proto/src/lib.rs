//! The wire format spoken between `deployctl` (the controller) and `deploy-agent`.
//!
//! # Layout
//!
//! - [`messages`]: every request and response, and the [`Rpc`] trait that ties each
//!   request type to its response type.
//! - [`error`]: the structured error an agent answers with ([`ProtoError`]).
//! - [`codec`]: JSON text frames for control messages and binary frames for file data,
//!   over a WebSocket on any `AsyncRead + AsyncWrite` stream.
//!
//! A session opens with [`Request::Hello`]; the agent answers [`Response::Hello`] or an
//! error with [`ErrorCode::VersionMismatch`]. After that the controller sends one request
//! at a time. The agent may send any number of [`Response::Event`] messages (progress)
//! before the one final response for that request.
//!
//! Bump [`PROTOCOL_VERSION`] on any change that an older peer would misread.

pub mod codec;
pub mod dayops;
pub mod error;
pub mod label;
pub mod manifest;
pub mod messages;

pub use error::{ErrorCode, ProtoError};
pub use messages::*;

/// The version of this wire format. Both sides must speak the same one.
///
/// 2: `ReleaseSpec.compose` (an agent speaking 1 would deploy a compose release as
/// plain files), stages `validate` and `pull`.
///
/// 3: `AppRef.instance` (an agent speaking 2 would deploy a review-app instance over
/// the app itself), `Destroy`, `Instances`, history actions `destroy` and `expire`.
///
/// 4: `ReleaseSpec` hooks and notifications, `[cutover]` slots, `[health] watch`,
/// `compose.zero_downtime`, `DeltaPlan`, `Logs`, `Exec` (an agent speaking 3 would ignore the
/// hooks and the cutover and restart the app in place, and would drop the connection on
/// `logs`/`exec`).
pub const PROTOCOL_VERSION: u32 = 4;

/// Size of one binary frame of file data. 1 MiB measured well over SSH channels.
pub const CHUNK_SIZE: usize = 1024 * 1024;

/// The largest WebSocket message either side accepts (a chunk plus headroom).
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

//! The byte stream under an agent connection, whatever carries it (an SSH channel, the
//! local Unix socket, or an in-memory duplex in tests). Its own module so that [`crate::ssh`]
//! (which opens one) and [`crate::client`] (which talks over one) need not know each other
//! or [`crate::transport`] (which joins them).

use tokio::io::{AsyncRead, AsyncWrite};

/// Any byte stream to an agent.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

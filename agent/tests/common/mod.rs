//! What the agent's in-process tests share: a session with the real session code over an
//! in-memory stream, and reading its answer past the progress events.

use std::path::Path;
use std::sync::Arc;

use agent::config::{AgentConfig, Overrides};
use agent::context::Shared;
use proto::codec;
use proto::{Hello, PROTOCOL_VERSION, Request, Response};

/// A session of an agent allowed to deploy under `root`, past its hello. `buffer`: the
/// in-memory stream's capacity each way.
pub async fn session(root: &Path, buffer: usize) -> codec::Connection<tokio::io::DuplexStream> {
    let config = AgentConfig::load(&Overrides {
        config: None,
        socket: Some(root.join("s.sock")),
        socket_group: None,
        allowed_roots: vec![root.to_path_buf()],
    })
    .unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    std::mem::forget(tx);
    let shared = Arc::new(Shared::new(config, rx));
    let (a, b) = tokio::io::duplex(buffer);
    let slot = shared.sessions.admit(8).unwrap();
    tokio::spawn(agent::session::serve(shared, b, slot));
    let mut conn = codec::connect(a).await.unwrap();
    conn.send(&Request::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        version: "test".into(),
    }))
    .await
    .unwrap();
    assert!(matches!(
        conn.recv_json::<Response>().await.unwrap(),
        Response::Hello(_)
    ));
    conn
}

/// The next response that is not a progress event.
pub async fn answer(conn: &mut codec::Connection<tokio::io::DuplexStream>) -> Response {
    loop {
        match conn.recv_json::<Response>().await.unwrap() {
            Response::Event(_) => continue,
            other => return other,
        }
    }
}

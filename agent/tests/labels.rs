//! The agent checks version labels itself (issue 16 item 7): a controller that skips the
//! check (an old or a hand-made one) cannot put a label that breaks tables into the
//! history. Talks to the real session code over an in-memory stream.

mod common;

use common::{answer, session};
use proto::{AppRef, ErrorCode, Lock, Push, ReleaseSpec, Request, Response};

// See: #16 (item 7)
#[tokio::test]
async fn the_agent_refuses_bad_labels_on_lock_and_push() {
    let dir = tempfile::tempdir().unwrap();
    let app = AppRef {
        name: "app".into(),
        deploy_to: dir.path().join("app").display().to_string(),
        instance: None,
    };
    let long = "x".repeat(100_000);
    for bad in [long.as_str(), "a\nb", "\u{1b}[31m"] {
        let mut conn = session(dir.path(), 64 * 1024).await;
        conn.send(&Request::Lock(Lock {
            app: app.clone(),
            holder: "t".into(),
            version: Some(bad.into()),
            wait_ms: 0,
        }))
        .await
        .unwrap();
        match answer(&mut conn).await {
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::BadRequest);
                assert!(e.message.contains("version label"), "{}", e.message);
                assert!(e.message.len() < 300, "not echoed back");
            }
            other => panic!("lock with {bad:.20?}: {other:?}"),
        }

        let mut conn = session(dir.path(), 64 * 1024).await;
        let spec: ReleaseSpec = serde_json::from_value(serde_json::json!({
            "shared": [], "migrate": null, "restart": null, "stop": null,
            "command_timeout_ms": 1000, "keep_releases": 2, "health": null,
            "max_unpacked_bytes": 1000000, "compose": null, "instance": null
        }))
        .unwrap();
        conn.send(&Request::Push(Push {
            app: app.clone(),
            release: "20260101000000".into(),
            version: Some(bad.into()),
            holder: "t".into(),
            size: 10,
            skip_migrations: true,
            spec,
            expect_content: None,
            origin: None,
            check: proto::StreamCheck::Sha256,
        }))
        .await
        .unwrap();
        match answer(&mut conn).await {
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::BadRequest);
                assert!(e.message.contains("version label"), "{}", e.message);
            }
            other => panic!("push with {bad:.20?}: {other:?}"),
        }
    }
    assert!(
        !dir.path().join("app/.deploy/history.jsonl").exists(),
        "nothing reached the history"
    );
}

//! The agent checks an upload's bytes end to end (issue 14 item 1): with the SHA-256 of
//! the stream that deployctl asks for, and with the CRC-32 check the protocol offers, a
//! stream that is not the one the controller sent (other bytes of the same length, a lost
//! or a repeated chunk) is refused, and nothing is left behind: no release, `current`
//! unchanged. Talks to the real session code over an in-memory stream.

mod common;

use std::io::Write;
use std::path::Path;

use common::{answer, session};
use proto::codec;
use proto::{AppRef, ErrorCode, Push, ReleaseSpec, Request, Response, StreamCheck, UploadEnd};
use sha2::Digest;

/// A release whose one file is `fill` repeated: `len` bytes of tar.gz, stored (so two
/// releases of the same file size have artifacts of the same size).
fn artifact(fill: u8) -> Vec<u8> {
    let data = vec![fill; 300 * 1024];
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::none(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    b.append_data(&mut h, "public/data.bin", data.as_slice())
        .unwrap();
    let mut gz = b.into_inner().unwrap();
    gz.flush().unwrap();
    gz.finish().unwrap()
}

type Conn = codec::Connection<tokio::io::DuplexStream>;

/// Pushes `frames` as release `id`, ending with what the controller says it sent
/// (`sent`'s sha256, size and CRC-32); returns the agent's answer.
async fn push(
    conn: &mut Conn,
    root: &Path,
    id: &str,
    check: StreamCheck,
    frames: &[&[u8]],
    sent: &[u8],
) -> Response {
    let app = AppRef {
        name: "app".into(),
        deploy_to: root.join("app").display().to_string(),
        instance: None,
    };
    let spec: ReleaseSpec = serde_json::from_value(serde_json::json!({
        "shared": [], "migrate": null, "restart": null, "stop": null,
        "command_timeout_ms": 10000, "keep_releases": 5, "health": null,
        "max_unpacked_bytes": 100_000_000u64, "compose": null, "instance": null
    }))
    .unwrap();
    conn.send(&Request::Push(Push {
        app,
        release: id.into(),
        version: Some(id.into()),
        holder: "t".into(),
        size: sent.len() as u64,
        skip_migrations: true,
        spec,
        expect_content: None,
        origin: None,
        check,
    }))
    .await
    .unwrap();
    match answer(conn).await {
        Response::PushReady(_) => {}
        other => panic!("expected push_ready, got {other:?}"),
    }
    for f in frames {
        conn.tx.send_data(f.to_vec()).await.unwrap();
    }
    conn.send(&Request::UploadEnd(UploadEnd {
        sha256: hex::encode(sha2::Sha256::digest(sent)),
        size: sent.len() as u64,
        crc32: Some(crc32fast::hash(sent)),
    }))
    .await
    .unwrap();
    answer(conn).await
}

fn releases(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("app/releases"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn current(root: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_link(root.join("app/current")).ok()
}

// See: #14 (item 1)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_is_not_the_one_sent_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let good = artifact(b'a');
    let (h1, h2) = good.split_at(good.len() / 2);
    // One session for every push: the lock of one push is free once it is answered.
    let mut conn = session(root, 256 * 1024).await;
    for check in [StreamCheck::Crc32, StreamCheck::Sha256] {
        let id = if check == StreamCheck::Crc32 {
            "20260101000000"
        } else {
            "20260101000001"
        };
        match push(&mut conn, root, id, check, &[h1, h2], &good).await {
            Response::Deploy(_) => {}
            other => panic!("{check:?}: a good upload: {other:?}"),
        }
    }
    let live = current(root).expect("current after a good upload");
    let before = releases(root);
    assert_eq!(before.len(), 2, "{before:?}");

    // Another release's bytes, the same length, unpacking fine: only the check of the
    // stream can tell.
    let other = artifact(b'b');
    assert_eq!(other.len(), good.len());
    // A chunk repeated in place of the next one, and a chunk lost (the rest of the stream
    // still a valid gzip'd tar only by luck, so the unpacker may refuse it first).
    let third = good.len() / 3;
    let repeated = [&good[..third], &good[..third], &good[2 * third..]].concat();
    let lost = [&good[..third], &good[2 * third..]].concat();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("other bytes", other, "upload corrupted"),
        ("a repeated chunk", repeated, ""),
        ("a lost chunk", lost, ""),
    ];
    let mut n = 0;
    for check in [StreamCheck::Crc32, StreamCheck::Sha256] {
        for (what, bytes, says) in &cases {
            n += 1;
            let id = format!("202601020000{n:02}");
            let r = push(&mut conn, root, &id, check, &[bytes], &good).await;
            match r {
                Response::Error(e) => {
                    assert!(
                        matches!(e.code, ErrorCode::ChecksumMismatch | ErrorCode::BadArtifact),
                        "{check:?}, {what}: {e:?}"
                    );
                    assert!(e.message.contains(says), "{check:?}, {what}: {}", e.message);
                    assert!(e.message.contains("nothing was changed"), "{}", e.message);
                    if !says.is_empty() {
                        assert_eq!(e.code, ErrorCode::ChecksumMismatch, "{check:?}, {what}");
                    }
                }
                other => panic!("{check:?}, {what}: accepted: {other:?}"),
            }
            assert_eq!(releases(root), before, "{check:?}, {what}: no release left");
            assert_eq!(current(root).as_ref(), Some(&live), "{check:?}, {what}");
        }
    }
}

// See: #14 (item 1)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crc32_upload_without_its_crc32_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let good = artifact(b'c');
    let app = AppRef {
        name: "app".into(),
        deploy_to: root.join("app").display().to_string(),
        instance: None,
    };
    let spec: ReleaseSpec = serde_json::from_value(serde_json::json!({
        "shared": [], "migrate": null, "restart": null, "stop": null,
        "command_timeout_ms": 10000, "keep_releases": 5, "health": null,
        "max_unpacked_bytes": 100_000_000u64, "compose": null, "instance": null
    }))
    .unwrap();
    let mut conn = session(root, 256 * 1024).await;
    conn.send(&Request::Push(Push {
        app,
        release: "20260103000000".into(),
        version: None,
        holder: "t".into(),
        size: good.len() as u64,
        skip_migrations: true,
        spec,
        expect_content: None,
        origin: None,
        check: StreamCheck::Crc32,
    }))
    .await
    .unwrap();
    assert!(matches!(answer(&mut conn).await, Response::PushReady(_)));
    conn.tx.send_data(good.clone()).await.unwrap();
    conn.send(&Request::UploadEnd(UploadEnd {
        sha256: hex::encode(sha2::Sha256::digest(&good)),
        size: good.len() as u64,
        crc32: None,
    }))
    .await
    .unwrap();
    match answer(&mut conn).await {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::ChecksumMismatch, "{e:?}");
            assert!(e.message.contains("crc32"), "{}", e.message);
        }
        other => panic!("accepted: {other:?}"),
    }
    assert!(releases(root).is_empty());
    assert!(current(root).is_none());
}

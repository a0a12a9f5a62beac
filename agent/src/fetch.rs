//! `Fetch`: streams a release's content back to the controller as a `.tar.gz`, built
//! from the release's manifest (what was unpacked, file by file), for `promote`.
//!
//! Every file is hashed again as it is read and must still match the manifest: a release
//! modified on disk since it was deployed is refused, naming the file, rather than
//! promoted as something it is not.

use std::io::{Read, Write};
use std::path::{Component, Path};

use proto::codec::{CodecError, Connection};
use proto::manifest::Entry;
use proto::{ErrorCode, FetchEnd, FetchReady, ProtoError, Response};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::release::layout::{Layout, release_id_problem};

/// Sends the release; the outer error ends the session, the inner one answers the
/// request (it may come after some data frames: the controller discards them).
pub async fn send<S>(
    conn: &mut Connection<S>,
    layout: &Layout,
    release: &str,
) -> Result<Result<FetchEnd, ProtoError>, CodecError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(problem) = release_id_problem(release) {
        return Ok(Err(ProtoError::new(ErrorCode::BadRequest, problem)));
    }
    let Some(info) = layout.read_meta(release) else {
        return Ok(Err(ProtoError::new(
            ErrorCode::NotFound,
            format!("no release {release} on this host"),
        )));
    };
    let Some(manifest) = layout.read_manifest(release) else {
        return Ok(Err(ProtoError::new(
            ErrorCode::NotFound,
            format!(
                "release {release} has no content manifest (it was deployed by an older \
                 deploy-agent); push it again to promote it"
            ),
        )));
    };
    let mut info = info;
    info.current = layout.current_release().as_deref() == Some(release);
    conn.send(&Response::FetchReady(FetchReady { release: info }))
        .await?;

    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    let dir = layout.release(release);
    let worker = tokio::task::spawn_blocking(move || pack(&dir, &manifest, tx));
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = rx.recv().await {
        hasher.update(&chunk);
        size += chunk.len() as u64;
        conn.tx.send_data(chunk).await?;
    }
    match worker.await {
        Ok(Ok(())) => Ok(Ok(FetchEnd {
            sha256: hex::encode(hasher.finalize()),
            size,
        })),
        Ok(Err(e)) => Ok(Err(e)),
        Err(e) => Ok(Err(ProtoError::new(
            ErrorCode::Internal,
            format!("fetch task: {e}"),
        ))),
    }
}

fn pack(dir: &Path, manifest: &[Entry], tx: mpsc::Sender<Vec<u8>>) -> Result<(), ProtoError> {
    let io = |what: &str, e: std::io::Error| ProtoError::new(ErrorCode::Io, format!("{what}: {e}"));
    let writer = proto::codec::ChunkWriter::new(tx);
    let gz = flate2::write::GzEncoder::new(writer, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for entry in manifest {
        let path = entry.path();
        check_path(dir, path)?;
        match entry {
            Entry::File {
                mode, size, sha256, ..
            } => {
                let full = dir.join(path);
                let mut f =
                    std::fs::File::open(&full).map_err(|e| changed(path, &e.to_string()))?;
                let mut header = tar::Header::new_gnu();
                header.set_size(*size);
                header.set_mode(*mode);
                header.set_mtime(0);
                header.set_entry_type(tar::EntryType::Regular);
                let mut hashing = HashingRead {
                    inner: (&mut f).take(*size),
                    hasher: Sha256::new(),
                    read: 0,
                };
                tar.append_data(&mut header, path, &mut hashing)
                    .map_err(|e| io("packing the release", e))?;
                if hashing.read != *size || hex::encode(hashing.hasher.finalize()) != *sha256 {
                    return Err(changed(path, "its content differs from what was deployed"));
                }
            }
            Entry::Symlink { target, .. } => {
                let mut header = tar::Header::new_gnu();
                header.set_size(0);
                header.set_mode(0o777);
                header.set_mtime(0);
                header.set_entry_type(tar::EntryType::Symlink);
                tar.append_link(&mut header, path, target)
                    .map_err(|e| io("packing the release", e))?;
            }
        }
    }
    let gz = tar.into_inner().map_err(|e| io("packing the release", e))?;
    let mut writer = gz.finish().map_err(|e| io("packing the release", e))?;
    writer.flush().map_err(|e| io("sending the release", e))
}

/// The manifest path must still be a plain path inside the release (a shared link
/// may have replaced a shipped directory since).
fn check_path(dir: &Path, path: &str) -> Result<(), ProtoError> {
    let rel = Path::new(path);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(changed(path, "not a plain relative path"));
    }
    let mut p = dir.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for c in &parts[..parts.len().saturating_sub(1)] {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(changed(
                    path,
                    "a parent directory was replaced (by a `shared` link?) after the deploy",
                ));
            }
            Err(e) => return Err(changed(path, &e.to_string())),
        }
    }
    Ok(())
}

fn changed(path: &str, why: &str) -> ProtoError {
    ProtoError::new(
        ErrorCode::BadArtifact,
        format!("cannot send the release as deployed: {path}: {why}"),
    )
    .with("entry", path)
}

struct HashingRead<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> Read for HashingRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

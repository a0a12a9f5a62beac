//! One read and one hash of the artifact per push, shared by every host that uploads it.
//!
//! A [`Feed`] reads the file once, in [`proto::CHUNK_SIZE`] chunks, hashing as it goes,
//! into a ring of at most [`RING_CHUNKS`] chunks. Every host uploading at the same time
//! takes the same chunks (reference-counted, never copied). A chunk leaves the ring only
//! when the ring is full and every host still uploading is past it, so the reader waits for
//! the slowest host (backpressure) and memory stays at the ring's size whatever the number
//! of hosts. A host that starts once the ring has moved past the start (a later host of a
//! sliding window, on an artifact larger than the ring) reads the file on its own, without
//! hashing it again once the feed knows the digest. An artifact no larger than the ring
//! stays in it: then every host of the push shares one read.
//!
//! Every read also takes a CRC-32 of the bytes (a few milliseconds per 100 MiB), sent in
//! `UploadEnd` beside the SHA-256; an agent asked for [`proto::StreamCheck::Crc32`] checks
//! the upload with it instead of a second SHA-256. deployctl asks for the SHA-256 check.

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::{Notify, mpsc};

/// Chunks the ring holds at most (8 MiB).
pub const RING_CHUNKS: usize = 8;

/// The chunk of a host's own read: small, since every host at work past the ring holds a
/// few (1 MiB chunks, four read ahead, were 5-6 MiB per host: most of a 50-host push's
/// peak, bench/README.md "Results: issue 14 mem"). One WebSocket frame's worth.
const OWN_CHUNK: usize = 256 * 1024;
/// Chunks of an own read waiting for the upload (besides the one being read and the one
/// being sent): about 1 MiB per host in all.
const OWN_AHEAD: usize = 2;

/// What one read of the whole artifact found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// Hex sha256 (computed, or known from the delta scan).
    pub sha256: String,
    pub size: u64,
    /// CRC-32 of the bytes read (always computed).
    pub crc32: u32,
}

/// The artifact, read once for every host of a push.
#[derive(Clone)]
pub struct Feed {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    /// The file's sha256 and size, when already known (from the delta scan): then
    /// nothing hashes the file again.
    known: Option<(String, u64)>,
    state: Mutex<State>,
    /// A chunk arrived, or the read ended.
    grew: Notify,
    /// A host moved on (or left): the reader may have room again.
    moved: Notify,
}

#[derive(Default)]
struct State {
    /// Chunks `first .. first + ring.len()`.
    ring: VecDeque<Bytes>,
    first: usize,
    /// The next chunk of each host taking chunks from the ring; `None`: left.
    takers: Vec<Option<usize>>,
    started: bool,
    /// The whole file was read: its digest, or why it could not be.
    end: Option<Result<Digest, String>>,
    /// Nobody took chunks and the ring was full: the reader stopped.
    abandoned: bool,
}

impl Feed {
    /// The feed of the file at `path`, whose sha256 and size may be `known` already.
    pub fn new(path: &Path, known: Option<(String, u64)>) -> Self {
        Self {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                known,
                state: Mutex::new(State::default()),
                grew: Notify::new(),
                moved: Notify::new(),
            }),
        }
    }

    /// Where one host's upload gets its chunks: the shared ring if it still holds the
    /// start of the file, else a read of its own.
    pub fn source(&self) -> Source {
        let mut st = self.shared.lock();
        let joins = st.first == 0 && !st.abandoned;
        if joins {
            st.takers.push(Some(0));
            let id = st.takers.len() - 1;
            if !st.started {
                st.started = true;
                let shared = self.shared.clone();
                tokio::spawn(read_into_ring(shared));
            }
            return Source::Ring(Taker {
                shared: self.shared.clone(),
                id,
            });
        }
        let digest = match &st.end {
            Some(Ok(d)) => Some((d.sha256.clone(), d.size)),
            _ => self.shared.known.clone(),
        };
        drop(st);
        Source::Own(own_read(&self.shared.path, digest))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Chunks for one host's upload, then the file's sha256 and size.
pub enum Source {
    Ring(Taker),
    Own(OwnRead),
}

impl Source {
    /// The next chunk; `None` at the end of the file.
    pub async fn next(&mut self) -> Result<Option<Bytes>, String> {
        match self {
            Source::Ring(t) => t.next().await,
            Source::Own(o) => Ok(o.rx.recv().await),
        }
    }

    /// The digest of the whole file, once [`Source::next`] returned `None`.
    pub async fn finish(self) -> Result<Digest, String> {
        match self {
            Source::Ring(t) => t.finish(),
            Source::Own(o) => o
                .reader
                .await
                .map_err(|e| format!("reading the artifact: {e}"))?,
        }
    }
}

/// A host taking chunks from the ring.
pub struct Taker {
    shared: Arc<Shared>,
    id: usize,
}

impl Taker {
    async fn next(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            let grew = self.shared.grew.notified();
            tokio::pin!(grew);
            {
                let mut st = self.shared.lock();
                let pos = st.takers[self.id].expect("a taker that has not left");
                if let Some(chunk) = pos.checked_sub(st.first).and_then(|i| st.ring.get(i)) {
                    let chunk = chunk.clone();
                    st.takers[self.id] = Some(pos + 1);
                    drop(st);
                    self.shared.moved.notify_one();
                    return Ok(Some(chunk));
                }
                match &st.end {
                    Some(Ok(_)) => return Ok(None),
                    Some(Err(e)) => return Err(e.clone()),
                    None => {}
                }
                // Registered before the lock is released: no wake-up is missed.
                grew.as_mut().enable();
            }
            grew.await;
        }
    }

    fn finish(self) -> Result<Digest, String> {
        self.shared
            .lock()
            .end
            .clone()
            .unwrap_or_else(|| Err("the artifact's read never ended".into()))
    }
}

impl Drop for Taker {
    fn drop(&mut self) {
        self.shared.lock().takers[self.id] = None;
        self.shared.moved.notify_one();
    }
}

/// Reads the file into the ring, hashing it, a chunk at a time on a blocking thread.
async fn read_into_ring(shared: Arc<Shared>) {
    let path = shared.path.clone();
    let opened = tokio::task::spawn_blocking(move || std::fs::File::open(path)).await;
    let mut file = match opened {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return end(&shared, Err(format!("reading the artifact: {e}"))),
        Err(e) => return end(&shared, Err(format!("reading the artifact: {e}"))),
    };
    let mut hasher = shared.known.is_none().then(Sha256::new);
    let mut crc = crc32fast::Hasher::new();
    let mut size = 0u64;
    loop {
        // Wait for room: a full ring drops its oldest chunk once every host is past it.
        loop {
            let moved = shared.moved.notified();
            tokio::pin!(moved);
            {
                let mut st = shared.lock();
                let slowest = st.takers.iter().flatten().min().copied();
                if st.ring.len() < RING_CHUNKS {
                    break;
                }
                match slowest {
                    Some(p) if p > st.first => {
                        st.ring.pop_front();
                        st.first += 1;
                        break;
                    }
                    Some(_) => {
                        moved.as_mut().enable();
                    }
                    // Nobody left to take the next chunk: hosts that start later read on
                    // their own.
                    None => {
                        st.abandoned = true;
                        return;
                    }
                }
            }
            moved.await;
        }
        let read = tokio::task::spawn_blocking(move || {
            let r = read_chunk(&mut file, proto::CHUNK_SIZE).inspect(|c| {
                crc.update(c);
                if let Some(h) = &mut hasher {
                    h.update(c);
                }
            });
            (file, hasher, crc, r)
        })
        .await;
        let chunk;
        (file, hasher, crc, chunk) = match read {
            Ok(v) => v,
            Err(e) => return end(&shared, Err(format!("reading the artifact: {e}"))),
        };
        match chunk {
            Ok(c) if c.is_empty() => {
                let sha256 = match (hasher, &shared.known) {
                    (Some(h), _) => hex::encode(h.finalize()),
                    (None, Some(k)) => k.0.clone(),
                    (None, None) => unreachable!("a hasher when the digest is unknown"),
                };
                let crc32 = crc.finalize();
                return end(
                    &shared,
                    Ok(Digest {
                        sha256,
                        size,
                        crc32,
                    }),
                );
            }
            Ok(c) => {
                size += c.len() as u64;
                shared.lock().ring.push_back(c);
                shared.grew.notify_waiters();
            }
            Err(e) => return end(&shared, Err(format!("reading the artifact: {e}"))),
        }
    }
}

fn end(shared: &Shared, r: Result<Digest, String>) {
    shared.lock().end = Some(r);
    shared.grew.notify_waiters();
}

/// Up to `len` bytes of `file`, read into spare capacity (never zeroed first); empty at
/// the end.
fn read_chunk(file: &mut std::fs::File, len: usize) -> std::io::Result<Bytes> {
    let mut buf = Vec::with_capacity(len);
    file.take(len as u64).read_to_end(&mut buf)?;
    Ok(Bytes::from(buf))
}

/// One host's own read of the file, [`OWN_AHEAD`] chunks of [`OWN_CHUNK`] ahead; hashed
/// unless the digest is known.
pub struct OwnRead {
    rx: mpsc::Receiver<Bytes>,
    reader: tokio::task::JoinHandle<Result<Digest, String>>,
}

fn own_read(path: &Path, known: Option<(String, u64)>) -> OwnRead {
    let (tx, rx) = mpsc::channel::<Bytes>(OWN_AHEAD);
    let path = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || {
        let shown = path.display().to_string();
        let mut file = std::fs::File::open(&path).map_err(|e| format!("reading {shown}: {e}"))?;
        let mut hasher = known.is_none().then(Sha256::new);
        let mut crc = crc32fast::Hasher::new();
        let mut size = 0u64;
        loop {
            let chunk =
                read_chunk(&mut file, OWN_CHUNK).map_err(|e| format!("reading {shown}: {e}"))?;
            if chunk.is_empty() {
                break;
            }
            size += chunk.len() as u64;
            crc.update(&chunk);
            if let Some(h) = &mut hasher {
                h.update(&chunk);
            }
            if tx.blocking_send(chunk).is_err() {
                // The upload stopped; its error is reported by the sending side.
                break;
            }
        }
        let sha256 = match (known, hasher) {
            (Some(k), _) => k.0,
            (None, Some(h)) => hex::encode(h.finalize()),
            (None, None) => unreachable!("a hasher when the digest is unknown"),
        };
        Ok(Digest {
            sha256,
            size,
            crc32: crc.finalize(),
        })
    });
    OwnRead { rx, reader }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &data).unwrap();
        (f, data)
    }

    async fn drain(mut s: Source) -> (Vec<u8>, (String, u64)) {
        let mut got = Vec::new();
        while let Some(c) = s.next().await.unwrap() {
            got.extend_from_slice(&c);
        }
        let d = s.finish().await.unwrap();
        assert_eq!(
            d.crc32,
            crc32fast::hash(&got),
            "the crc32 of what was handed out"
        );
        (got, (d.sha256, d.size))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hosts_at_once_share_one_read_and_get_every_byte() {
        let (f, data) = file_of(3 * proto::CHUNK_SIZE + 123);
        let want = hex::encode(Sha256::digest(&data));
        let feed = Feed::new(f.path(), None);
        let sources: Vec<Source> = (0..3).map(|_| feed.source()).collect();
        assert!(sources.iter().all(|s| matches!(s, Source::Ring(_))));
        let runs = sources.into_iter().map(drain);
        for (got, (sha, size)) in futures_util::future::join_all(runs).await {
            assert!(got == data);
            assert_eq!((sha.as_str(), size), (want.as_str(), data.len() as u64));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_ring_waits_for_the_slowest_host_and_a_late_host_reads_on_its_own() {
        let (f, data) = file_of((RING_CHUNKS + 4) * proto::CHUNK_SIZE);
        let want = hex::encode(Sha256::digest(&data));
        let feed = Feed::new(f.path(), None);
        let fast = feed.source();
        let mut slow = feed.source();
        let first = slow.next().await.unwrap().unwrap();
        // The fast host takes what the ring can hold, then waits for the slow one.
        let fast = tokio::spawn(drain(fast));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        {
            let st = feed.shared.lock();
            assert!(
                st.ring.len() <= RING_CHUNKS,
                "{} chunks held",
                st.ring.len()
            );
            // The slow host took chunk 0 only: chunk 1 stays until it takes it.
            assert!(st.first <= 1, "chunk {} is the oldest held", st.first);
        }
        let mut got = first.to_vec();
        while let Some(c) = slow.next().await.unwrap() {
            got.extend_from_slice(&c);
        }
        assert!(got == data);
        assert_eq!(slow.finish().await.unwrap().sha256, want);
        let (fast_got, (fast_sha, _)) = fast.await.unwrap();
        assert!(fast_got == data);
        assert_eq!(fast_sha, want);
        // The ring has moved past the start: a later host reads the file itself, and
        // gets the digest without hashing again.
        let late = feed.source();
        assert!(matches!(late, Source::Own(_)));
        let (late_got, (late_sha, size)) = drain(late).await;
        assert!(late_got == data);
        assert_eq!((late_sha, size), (want, data.len() as u64));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_reading_on_its_own_holds_little_ahead_of_its_upload() {
        let (f, data) = file_of(8 * proto::CHUNK_SIZE);
        let mut own = own_read(f.path(), None);
        // The upload has not taken anything yet: the reader runs ahead until it waits.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let queued = own.rx.len();
        let mut got = Vec::new();
        for _ in 0..queued {
            got.extend_from_slice(&own.rx.try_recv().unwrap());
        }
        assert!(
            got.len() <= OWN_AHEAD * OWN_CHUNK && got.len() <= 512 * 1024,
            "{} bytes read ahead in {queued} chunks",
            got.len()
        );
        while let Some(c) = own.rx.recv().await {
            assert!(c.len() <= OWN_CHUNK, "a chunk of {} bytes", c.len());
            got.extend_from_slice(&c);
        }
        assert!(got == data);
        assert_eq!(own.reader.await.unwrap().unwrap().size, data.len() as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_artifact_stays_in_the_ring_for_every_later_host() {
        let (f, data) = file_of(2 * proto::CHUNK_SIZE);
        let feed = Feed::new(f.path(), None);
        for _ in 0..3 {
            let s = feed.source();
            assert!(matches!(s, Source::Ring(_)));
            assert!(drain(s).await.0 == data);
        }
    }
}

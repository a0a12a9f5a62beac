//! Safe extraction of a streamed release tarball (`.tar.gz`) into a fresh directory.
//!
//! The archive is untrusted. [`unpack_tar_gz`] guarantees that nothing outside the
//! destination directory is ever created, modified or followed, and refuses (returns an
//! error immediately, leaving the partial directory for the caller to delete) anything
//! it cannot extract safely.
//!
//! Decisions:
//! - Paths: absolute paths and `..` components are refused; `.` components (e.g. the
//!   common `./` prefix) are dropped; an empty name is refused. A directory entry that
//!   names the archive root (`./`) is accepted and ignored (the destination's own mode
//!   is the caller's business).
//! - Nothing is ever replaced. Every parent component of an entry must be a real
//!   directory (checked with `lstat`); missing parents are created (mode 0o755 minus
//!   umask). An entry whose path (or a parent of it) is an existing symlink is refused
//!   ([`UnpackError::ThroughSymlink`]), even if that symlink points inside the
//!   destination (`link -> sub` then `link/file` is refused). A file, symlink or hard
//!   link whose path already exists, or a directory entry whose path is an existing
//!   non-directory, is refused as [`UnpackError::Duplicate`]. Repeated directory entries
//!   are fine (the last mode wins). Files are opened with `O_CREAT|O_EXCL|O_NOFOLLOW`.
//! - Symlinks: the target must be relative, and any `..` components must all come
//!   first and may not climb above the destination (counted from the link's parent
//!   directory). `..` after a name (`a/../b`) is refused even when it looks harmless
//!   lexically, because the kernel resolves `..` after following `a`, which could
//!   itself be a symlink. With these rules every symlink in the destination resolves
//!   inside it, so descending through one is safe too.
//! - Hard links: the target must be a regular file (or hard link to one) extracted
//!   earlier from this same archive; links to directories, symlinks or missing paths
//!   are refused. Hard links count as files in [`Unpacked::files`] and add no bytes.
//! - Character/block devices, fifos, sparse files (GNU `S` type and PAX `GNU.sparse.*`
//!   files), and any other or unknown entry types are refused as
//!   [`UnpackError::Special`]. PAX global headers are ignored; GNU long names and PAX
//!   local headers are handled by the `tar` crate.
//! - Modes: files get `mode & 0o777` (setuid, setgid and sticky dropped); directories get
//!   `(mode & 0o777) | 0o700` so the owner can always finish extraction and delete the
//!   tree. Owners (uid/gid) are ignored. File mtimes come from the archive; directory
//!   and symlink mtimes are not set.
//! - Limits: file content actually written is counted against
//!   [`Limits::max_total_bytes`] (a file whose declared size alone exceeds what is left
//!   is refused before it is written), every entry the `tar` crate yields counts against
//!   [`Limits::max_entries`]. Everything else the decompressor yields (headers, padding,
//!   skipped data, data after the end-of-archive marker) is capped at 64 MiB plus 16 KiB
//!   per entry ([`UnpackError::Overhead`]), so a gzip bomb cannot burn CPU or memory.
//! - Integrity: a tar stream without its end-of-archive block, a file shorter than its
//!   header says, bad headers, bad gzip data or a bad gzip CRC are
//!   [`UnpackError::Corrupt`]. Concatenated gzip members are read as one stream (like
//!   `gzip -d`); bytes after the last member that don't start another member are
//!   trailing garbage and are ignored, but still read to the very end so a caller checking
//!   the input ([`ChannelReader`], [`SummingReader`]) sees every byte. The file content is
//!   hashed (sha256) as it is written: that is the release's manifest.
//! - Concurrency: the destination must not be modified by anyone else while unpacking
//!   (the checks are `lstat`-then-create on paths).

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use flate2::bufread::GzDecoder;
use sha2::{Digest, Sha256};
use tar::EntryType;

/// Non-file-content bytes (headers, padding, skipped data, trailing data) allowed
/// regardless of the entry count.
const OVERHEAD_BASE: u64 = 64 * 1024 * 1024;
/// Extra non-file-content bytes allowed per tar header (the header and the padding
/// of its data); the data of GNU long names and PAX headers is granted as it is read.
const OVERHEAD_PER_ENTRY: u64 = 1024;
/// The longest entry path (or link target) accepted, in bytes: Linux's `PATH_MAX`.
pub const MAX_PATH_BYTES: usize = 4096;
/// The most path components an entry may have.
pub const MAX_DEPTH: usize = 128;
/// The largest GNU long name / long link record read (a name up to
/// [`MAX_PATH_BYTES`] plus its NUL fits).
pub const MAX_LONG_NAME_BYTES: u64 = 2 * MAX_PATH_BYTES as u64;
/// The largest PAX extended header read.
pub const MAX_PAX_BYTES: u64 = 64 * 1024;
/// Memory the unpacker may spend remembering what it extracted (the manifest, hard link
/// targets, verified directories), counted per entry from its path length.
pub const MAX_BOOKKEEPING_BYTES: u64 = 32 * 1024 * 1024;
/// Entry names in error messages are cut to this many characters.
const MAX_SHOWN_NAME: usize = 200;
/// Size of the input buffer (for a reader that has none of its own) and of the drain buffer.
const BUF_SIZE: usize = 64 * 1024;
/// Size of the buffer file content is inflated into and written from: one write per
/// 256 KiB, not per 64 KiB.
const WRITE_BUF: usize = 256 * 1024;

/// Limits applied while unpacking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum sum of the sizes of all extracted files, counted as written.
    pub max_total_bytes: u64,
    /// Maximum number of archive entries (files, dirs, links, ...).
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total_bytes: 10 * 1024 * 1024 * 1024,
            max_entries: 1_000_000,
        }
    }
}

/// What was extracted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Regular files, including hard links.
    pub files: u64,
    /// Directory entries in the archive (implicitly created parents are not counted).
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// What was written, file by file (hashed while writing), in archive order.
    pub manifest: Vec<proto::manifest::Entry>,
}

impl Unpacked {
    /// The content digest of what was unpacked ([`proto::manifest::content_digest`]).
    pub fn content_digest(&self) -> String {
        proto::manifest::content_digest(&self.manifest)
    }
}

/// Why an archive was refused. `entry` is the path as written in the archive.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("entry {entry:?}: absolute paths are not allowed")]
    AbsolutePath { entry: String },
    #[error("entry {entry:?}: `..` path components are not allowed")]
    ParentDir { entry: String },
    #[error("entry {entry:?}: empty path")]
    EmptyPath { entry: String },
    #[error("symlink {entry:?} -> {target:?} could point outside the destination")]
    LinkEscapes { entry: String, target: String },
    #[error("hard link {entry:?} -> {target:?} points outside the destination")]
    HardlinkEscapes { entry: String, target: String },
    #[error(
        "hard link {entry:?} -> {target:?}: target is not a regular file extracted earlier from this archive"
    )]
    HardlinkTarget { entry: String, target: String },
    #[error("entry {entry:?}: {kind} entries are not allowed")]
    Special { entry: String, kind: String },
    #[error("entry {entry:?}: path is, or goes through, an existing symlink")]
    ThroughSymlink { entry: String },
    #[error("entry {entry:?}: path already exists (duplicate entry)")]
    Duplicate { entry: String },
    #[error("entry {entry:?}: a parent path component is not a directory")]
    NotADirectory { entry: String },
    #[error("archive content exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("archive has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error(
        "archive has more than {limit} bytes of headers, padding or skipped data (decompression bomb?)"
    )]
    Overhead { limit: u64 },
    #[error("corrupt archive: {detail}")]
    Corrupt { detail: String },
    #[error("reading the archive stream: {source}")]
    Read { source: io::Error },
    #[error("entry {entry:?}: path has more than {limit} components")]
    TooDeep { entry: String, limit: usize },
    #[error("entry {entry:?}: path or link target is longer than {limit} bytes")]
    PathTooLong { entry: String, limit: usize },
    #[error("{what} of {size} bytes is over the limit of {limit} bytes")]
    HeaderTooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error(
        "archive lists too many entries or too long names: tracking them would take more than {limit} bytes of memory"
    )]
    TooMuchBookkeeping { limit: u64 },
    #[error("the disk is full while unpacking entry {entry:?}: {detail}")]
    DiskFull { entry: String, detail: String },
    #[error("entry {entry:?}: {source}")]
    Io { entry: String, source: io::Error },
}

impl UnpackError {
    /// The archive entry at fault, when there is one.
    pub fn entry(&self) -> Option<&str> {
        use UnpackError::*;
        match self {
            AbsolutePath { entry }
            | ParentDir { entry }
            | EmptyPath { entry }
            | LinkEscapes { entry, .. }
            | HardlinkEscapes { entry, .. }
            | HardlinkTarget { entry, .. }
            | Special { entry, .. }
            | ThroughSymlink { entry }
            | Duplicate { entry }
            | NotADirectory { entry }
            | TooDeep { entry, .. }
            | PathTooLong { entry, .. }
            | DiskFull { entry, .. }
            | Io { entry, .. } => Some(entry),
            _ => None,
        }
    }

    /// The archive itself is at fault (as opposed to the server: a full disk, a
    /// filesystem error, or the upload stream breaking off).
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            UnpackError::DiskFull { .. } | UnpackError::Io { .. } | UnpackError::Read { .. }
        )
    }
}

/// A name as error messages show it: at most [`MAX_SHOWN_NAME`] characters.
fn shown(name: &[u8]) -> String {
    let text = String::from_utf8_lossy(name);
    if text.chars().count() <= MAX_SHOWN_NAME {
        return text.into_owned();
    }
    let head: String = text.chars().take(MAX_SHOWN_NAME).collect();
    format!("{head}…({} bytes)", name.len())
}

/// Unpack a gzip'd tar read from `reader` into `dest` (an existing, empty directory).
///
/// Reads `reader` to its very end (also after the tar end-of-archive blocks) so a caller
/// checking the reader sees every byte. On error, returns at once; `dest` may then hold a
/// partial extraction that the caller must delete, but nothing outside `dest` has been
/// touched. Pass `&mut reader` to keep using the reader afterwards (e.g. a
/// [`SummingReader`]).
pub fn unpack_tar_gz<R: Read>(
    reader: R,
    dest: &Path,
    limits: &Limits,
) -> Result<Unpacked, UnpackError> {
    unpack_impl(
        BufReader::with_capacity(BUF_SIZE, reader),
        dest,
        limits,
        OVERHEAD_BASE,
    )
}

/// [`unpack_tar_gz`] for a reader with a buffer of its own (a [`ChannelReader`] hands
/// out the received chunks themselves): the gzip decoder reads from it without a copy.
pub fn unpack_tar_gz_buffered<R: BufRead>(
    reader: R,
    dest: &Path,
    limits: &Limits,
) -> Result<Unpacked, UnpackError> {
    unpack_impl(reader, dest, limits, OVERHEAD_BASE)
}

fn unpack_impl<R: BufRead>(
    reader: R,
    dest: &Path,
    limits: &Limits,
    overhead_base: u64,
) -> Result<Unpacked, UnpackError> {
    let state = Rc::new(StreamState::default());
    state.allowed.set(overhead_base);
    let source = Source {
        inner: reader,
        state: Rc::clone(&state),
    };
    let gz = GzMembers::new(source);
    let budget = Budget {
        inner: gz,
        state: Rc::clone(&state),
    };
    let mut archive = tar::Archive::new(budget);
    let mut ex = Extractor {
        dest,
        limits,
        state: Rc::clone(&state),
        out: Unpacked::default(),
        entries: 0,
        files: HashSet::new(),
        dirs: HashMap::new(),
        bookkeeping: 0,
        buf: vec![0; WRITE_BUF],
    };

    // Raw entries: GNU long names and PAX headers are read here, with a hard limit,
    // rather than whole into memory by the `tar` crate.
    let mut ext = Extensions::default();
    let entries = archive.entries().map_err(|e| state.classify(e))?.raw(true);
    for entry in entries {
        let mut entry = entry.map_err(|e| state.classify(e))?;
        state.grant(OVERHEAD_PER_ENTRY);
        let header = entry.header();
        let recognized = header.as_gnu().is_some() || header.as_ustar().is_some();
        let kind = header.entry_type();
        if recognized && (kind.is_gnu_longname() || kind.is_gnu_longlink()) {
            let long = kind.is_gnu_longname();
            let what = if long {
                "GNU long name"
            } else {
                "GNU long link"
            };
            let slot = if long { &mut ext.name } else { &mut ext.link };
            if slot.is_some() {
                return Err(UnpackError::Corrupt {
                    detail: format!("two {what} records for one entry"),
                });
            }
            let mut data = read_record(&mut entry, &state, what, MAX_LONG_NAME_BYTES)?;
            if data.last() == Some(&0) {
                data.pop();
            }
            *slot = Some(data);
            continue;
        }
        if recognized && kind.is_pax_local_extensions() {
            if ext.pax.is_some() {
                return Err(UnpackError::Corrupt {
                    detail: "two PAX headers for one entry".into(),
                });
            }
            ext.pax = Some(read_record(
                &mut entry,
                &state,
                "PAX header",
                MAX_PAX_BYTES,
            )?);
            continue;
        }
        if recognized && kind.is_pax_global_extensions() {
            read_record(&mut entry, &state, "PAX global header", MAX_PAX_BYTES)?;
            continue;
        }
        ex.entry(&mut entry, std::mem::take(&mut ext))?;
    }
    if ext.name.is_some() || ext.link.is_some() || ext.pax.is_some() {
        return Err(UnpackError::Corrupt {
            detail: "long name or PAX header at the end of the archive describes no entry".into(),
        });
    }
    if state.eof.get() {
        return Err(UnpackError::Corrupt {
            detail: "tar stream ends without an end-of-archive block (truncated?)".into(),
        });
    }

    // Rest of the decompressed stream (normally zero padding); this also checks the
    // gzip CRC. Then whatever follows the last gzip member.
    let mut budget = archive.into_inner();
    drain(&mut budget).map_err(|e| state.classify(e))?;
    let mut raw = budget.inner.into_inner();
    drain(&mut raw).map_err(|e| state.classify(e))?;
    Ok(ex.out)
}

/// Shared between the reader layers and the extractor, to classify errors and to
/// enforce the overhead budget.
#[derive(Default)]
struct StreamState {
    /// First error returned by the caller's reader.
    raw_error: RefCell<Option<io::Error>>,
    /// Decompressed bytes read so far.
    read: Cell<u64>,
    /// Decompressed bytes that may be read so far.
    allowed: Cell<u64>,
    /// Part of `allowed` granted for declared file content.
    content: Cell<u64>,
    over_budget: Cell<bool>,
    /// The decompressed stream has ended.
    eof: Cell<bool>,
}

impl StreamState {
    fn grant(&self, bytes: u64) {
        self.allowed.set(self.allowed.get().saturating_add(bytes));
    }

    fn classify(&self, e: io::Error) -> UnpackError {
        if let Some(source) = self.raw_error.borrow_mut().take() {
            UnpackError::Read { source }
        } else if self.over_budget.get() {
            UnpackError::Overhead {
                limit: self.allowed.get() - self.content.get(),
            }
        } else {
            let msg = e.to_string();
            let detail = if msg.starts_with("gzip: ") {
                msg
            } else {
                format!("tar: {msg}")
            };
            UnpackError::Corrupt { detail }
        }
    }
}

/// The caller's reader; remembers its errors so they are not reported as corruption.
struct Source<R> {
    inner: R,
    state: Rc<StreamState>,
}

impl<R> Source<R> {
    /// Keeps the first error for [`StreamState::classify`]; hands back a copy.
    fn keep(&self, e: io::Error) -> io::Error {
        let copy = io::Error::new(e.kind(), e.to_string());
        let mut slot = self.state.raw_error.borrow_mut();
        if slot.is_none() {
            *slot = Some(e);
        }
        copy
    }
}

impl<R: BufRead> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = {
            let have = self.fill_buf()?;
            let n = have.len().min(buf.len());
            buf[..n].copy_from_slice(&have[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Source<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        // A retry after `Interrupted` must not hold a borrow of `inner` across the loop.
        loop {
            match self.inner.fill_buf() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.keep(e)),
                Ok(_) => break,
            }
        }
        self.inner.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        self.inner.consume(n);
    }
}

/// Decodes a sequence of gzip members; stops (EOF) at the end of the input or at the
/// first byte after a member that does not start another member (trailing garbage,
/// left unread in the inner reader).
struct GzMembers<B> {
    member: Option<GzDecoder<B>>,
    rest: Option<B>,
}

impl<B: BufRead> GzMembers<B> {
    fn new(inner: B) -> Self {
        GzMembers {
            member: Some(GzDecoder::new(inner)),
            rest: None,
        }
    }

    fn into_inner(self) -> B {
        match (self.member, self.rest) {
            (Some(d), _) => d.into_inner(),
            (None, Some(b)) => b,
            (None, None) => unreachable!("GzMembers always holds its reader"),
        }
    }
}

impl<B: BufRead> Read for GzMembers<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let Some(decoder) = self.member.as_mut() else {
                return Ok(0);
            };
            let n = decoder
                .read(buf)
                .map_err(|e| io::Error::new(e.kind(), format!("gzip: {e}")))?;
            if n > 0 {
                return Ok(n);
            }
            // End of a member: does another one follow?
            let decoder = self.member.take().expect("checked above");
            let mut inner = decoder.into_inner();
            let next = match inner.fill_buf() {
                Ok(peek) => matches!(peek, [0x1f, 0x8b, ..] | [0x1f]),
                Err(e) => {
                    self.rest = Some(inner);
                    return Err(e);
                }
            };
            if next {
                self.member = Some(GzDecoder::new(inner));
            } else {
                self.rest = Some(inner);
                return Ok(0);
            }
        }
    }
}

/// Counts decompressed bytes and refuses to read more than the budget allows.
struct Budget<R> {
    inner: R,
    state: Rc<StreamState>,
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let st = &self.state;
        let left = st.allowed.get().saturating_sub(st.read.get());
        // With no budget left, still read one byte to tell EOF from excess data.
        let max = left.clamp(1, buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            st.eof.set(true);
            return Ok(0);
        }
        if left == 0 {
            st.over_budget.set(true);
            return Err(io::Error::other("decompressed data exceeds the budget"));
        }
        st.read.set(st.read.get() + n as u64);
        Ok(n)
    }
}

/// GNU long name / long link / PAX data waiting for the entry it describes.
#[derive(Default)]
struct Extensions {
    name: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

/// Reads the data of an extension record (long name, PAX header), refusing one larger
/// than `limit` before reading any of it.
fn read_record<T: Read>(
    e: &mut tar::Entry<'_, T>,
    state: &StreamState,
    what: &'static str,
    limit: u64,
) -> Result<Vec<u8>, UnpackError> {
    let size = e.size();
    if size > limit {
        return Err(UnpackError::HeaderTooLarge { what, size, limit });
    }
    state.grant(size);
    let mut data = Vec::with_capacity(size as usize);
    e.take(limit)
        .read_to_end(&mut data)
        .map_err(|err| state.classify(err))?;
    if data.len() as u64 != size {
        return Err(UnpackError::Corrupt {
            detail: format!("{what}: truncated ({} of {size} bytes)", data.len()),
        });
    }
    Ok(data)
}

fn drain<R: Read>(r: &mut R) -> io::Result<()> {
    let mut buf = vec![0; BUF_SIZE];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// What is at the final path of an entry before it is created.
enum Existing {
    Nothing,
    Dir,
    Other,
}

struct Extractor<'a> {
    dest: &'a Path,
    limits: &'a Limits,
    state: Rc<StreamState>,
    out: Unpacked,
    entries: u64,
    /// Regular files extracted so far (relative, normalized): valid hard link targets.
    files: HashSet<PathBuf>,
    /// Directories known to be real directories (created or checked), as a tree:
    /// (parent node, name) -> node; node 0 is `dest`. Each entry's parents are then
    /// checked once each, so the cost of an entry is linear in its path length, and the
    /// memory linear in the names of distinct directories.
    dirs: HashMap<(u32, Vec<u8>), u32>,
    /// Bytes of memory spent on `out.manifest`, `files` and `dirs` (estimated).
    bookkeeping: u64,
    buf: Vec<u8>,
}

impl Extractor<'_> {
    fn entry<T: Read>(
        &mut self,
        e: &mut tar::Entry<'_, T>,
        ext: Extensions,
    ) -> Result<(), UnpackError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        let mut raw_path = ext.name.unwrap_or_else(|| e.path_bytes().into_owned());
        let mut raw_link = ext.link;
        if let Some(pax) = &ext.pax {
            for rec in tar::PaxExtensions::new(pax) {
                let rec = rec.map_err(|err| UnpackError::Corrupt {
                    detail: format!("entry {:?}: bad PAX header: {err}", shown(&raw_path)),
                })?;
                match rec.key_bytes() {
                    b"path" => raw_path = rec.value_bytes().to_vec(),
                    b"linkpath" => raw_link = Some(rec.value_bytes().to_vec()),
                    // The `tar` crate reads raw entries by the header's size; a PAX size
                    // that says otherwise would make us read a different archive than
                    // GNU tar does.
                    b"size" if rec.value().ok() != Some(e.size().to_string().as_str()) => {
                        return Err(UnpackError::Corrupt {
                            detail: format!(
                                "entry {:?}: PAX size differs from the header's size",
                                shown(&raw_path)
                            ),
                        });
                    }
                    k if k.starts_with(b"GNU.sparse.") => {
                        return Err(UnpackError::Special {
                            entry: shown(&raw_path),
                            kind: "sparse file".into(),
                        });
                    }
                    _ => {}
                }
            }
        }
        let name = shown(&raw_path);
        let header = e.header();
        let mut kind = header.entry_type();
        // Old (v7) archives mark directories only with a trailing slash; like GNU tar,
        // a "regular file" whose name ends in `/` is a directory.
        if matches!(kind, EntryType::Regular | EntryType::Continuous) && raw_path.ends_with(b"/") {
            kind = EntryType::Directory;
        }
        match kind {
            EntryType::XGlobalHeader => return Ok(()),
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link => {}
            other => {
                return Err(UnpackError::Special {
                    entry: name,
                    kind: kind_name(other),
                });
            }
        }
        let mode = header.mode().map_err(|err| UnpackError::Corrupt {
            detail: format!("entry {name:?}: {err}"),
        })?;
        let mtime = header.mtime().ok();
        let rel = normalize(&name, &raw_path)?;
        if rel.as_os_str().is_empty() && kind != EntryType::Directory {
            return Err(UnpackError::EmptyPath { entry: name });
        }

        match kind {
            EntryType::Directory => self.dir(&name, &rel, mode),
            EntryType::Symlink => {
                let target = raw_link.unwrap_or_else(|| link_target(e));
                self.check_target(&name, &target)?;
                self.symlink(&name, &rel, &target)
            }
            EntryType::Link => {
                let target = raw_link.unwrap_or_else(|| link_target(e));
                self.check_target(&name, &target)?;
                self.hardlink(&name, &rel, &target)
            }
            _ => self.file(e, &name, &rel, mode, mtime),
        }
    }

    fn dir(&mut self, name: &str, rel: &Path, mode: u32) -> Result<(), UnpackError> {
        if rel.as_os_str().is_empty() {
            return Ok(()); // `./`: the destination itself
        }
        let (full, existing) = self.prepare(name, rel)?;
        match existing {
            Existing::Nothing => DirBuilder::new()
                .mode(0o755)
                .create(&full)
                .map_err(self.io_err(name))?,
            Existing::Dir => {}
            Existing::Other => return Err(UnpackError::Duplicate { entry: name.into() }),
        }
        // `full` is a real directory (checked or just created), so chmod cannot follow a
        // symlink.
        fs::set_permissions(&full, fs::Permissions::from_mode((mode & 0o777) | 0o700))
            .map_err(self.io_err(name))?;
        self.out.dirs += 1;
        Ok(())
    }

    fn file<T: Read>(
        &mut self,
        e: &mut tar::Entry<'_, T>,
        name: &str,
        rel: &Path,
        mode: u32,
        mtime: Option<u64>,
    ) -> Result<(), UnpackError> {
        let size = e.size();
        let limit = self.limits.max_total_bytes;
        if size > limit - self.out.bytes {
            return Err(UnpackError::TooLarge { limit });
        }
        self.charge(2 * rel.as_os_str().len() as u64 + 256)?;
        let (full, existing) = self.prepare(name, rel)?;
        if !matches!(existing, Existing::Nothing) {
            return Err(UnpackError::Duplicate { entry: name.into() });
        }
        // O_EXCL also refuses a symlink at the final component; O_NOFOLLOW for good measure.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&full)
            .map_err(self.io_err(name))?;

        self.state.grant(size);
        self.state
            .content
            .set(self.state.content.get().saturating_add(size));
        let mut written = 0u64;
        let mut flushed = 0u64;
        let mut hasher = Sha256::new();
        loop {
            let n = match e.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(self.state.classify(err)),
            };
            written += n as u64;
            if written > limit - self.out.bytes {
                return Err(UnpackError::TooLarge { limit });
            }
            file.write_all(&self.buf[..n]).map_err(self.io_err(name))?;
            hasher.update(&self.buf[..n]);
            if written - flushed >= WRITEBACK_EVERY {
                start_writeback(&file, flushed, written);
                flushed = written;
            }
        }
        start_writeback(&file, flushed, written);
        if written != size {
            return Err(UnpackError::Corrupt {
                detail: format!("entry {name:?}: truncated ({written} of {size} bytes)"),
            });
        }
        file.set_permissions(fs::Permissions::from_mode(mode & 0o777))
            .map_err(self.io_err(name))?;
        if let Some(t) =
            mtime.and_then(|s| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        {
            file.set_modified(t).map_err(self.io_err(name))?;
        }
        self.out.files += 1;
        self.out.bytes += written;
        self.files.insert(rel.to_path_buf());
        self.out.manifest.push(proto::manifest::Entry::File {
            path: manifest_path(rel),
            mode: mode & 0o777,
            size: written,
            sha256: hex::encode(hasher.finalize()),
        });
        Ok(())
    }

    fn symlink(&mut self, name: &str, rel: &Path, target: &[u8]) -> Result<(), UnpackError> {
        let escapes = || UnpackError::LinkEscapes {
            entry: name.into(),
            target: shown(target),
        };
        if target.is_empty() {
            return Err(UnpackError::Corrupt {
                detail: format!("symlink {name:?} has an empty target"),
            });
        }
        let target = Path::new(OsStr::from_bytes(target));
        // Directories we can climb from the link's parent without leaving `dest`.
        let mut up = rel.components().count().saturating_sub(1);
        let mut seen_name = false;
        for c in target.components() {
            match c {
                Component::CurDir => {}
                Component::Normal(_) => seen_name = true,
                Component::ParentDir if !seen_name && up > 0 => up -= 1,
                Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                    return Err(escapes());
                }
            }
        }
        self.charge(rel.as_os_str().len() as u64 + target.as_os_str().len() as u64 + 128)?;
        let (full, existing) = self.prepare(name, rel)?;
        if !matches!(existing, Existing::Nothing) {
            return Err(UnpackError::Duplicate { entry: name.into() });
        }
        std::os::unix::fs::symlink(target, &full).map_err(self.io_err(name))?;
        self.out.symlinks += 1;
        self.out.manifest.push(proto::manifest::Entry::Symlink {
            path: manifest_path(rel),
            target: target.to_string_lossy().into_owned(),
        });
        Ok(())
    }

    fn hardlink(&mut self, name: &str, rel: &Path, target: &[u8]) -> Result<(), UnpackError> {
        let target_name = shown(target);
        let target_rel = match normalize(&target_name, target) {
            Ok(t) => t,
            Err(UnpackError::AbsolutePath { .. } | UnpackError::ParentDir { .. }) => {
                return Err(UnpackError::HardlinkEscapes {
                    entry: name.into(),
                    target: target_name,
                });
            }
            Err(_) => PathBuf::new(),
        };
        let bad_target = || UnpackError::HardlinkTarget {
            entry: name.into(),
            target: target_name.clone(),
        };
        if !self.files.contains(&target_rel) {
            return Err(bad_target());
        }
        let src = self.dest.join(&target_rel);
        match fs::symlink_metadata(&src) {
            Ok(m) if m.file_type().is_file() => {}
            _ => return Err(bad_target()),
        }
        self.charge(2 * rel.as_os_str().len() as u64 + 256)?;
        let (full, existing) = self.prepare(name, rel)?;
        if !matches!(existing, Existing::Nothing) {
            return Err(UnpackError::Duplicate { entry: name.into() });
        }
        // link(2) does not follow a symlink in `src` (and `src` is a regular file).
        fs::hard_link(&src, &full).map_err(self.io_err(name))?;
        self.out.files += 1;
        self.files.insert(rel.to_path_buf());
        // A hard link holds the same content as its target: list it as that file.
        let target_path = manifest_path(&target_rel);
        let shared = self.out.manifest.iter().rev().find_map(|m| match m {
            proto::manifest::Entry::File {
                path,
                mode,
                size,
                sha256,
            } if *path == target_path => Some((*mode, *size, sha256.clone())),
            _ => None,
        });
        if let Some((mode, size, sha256)) = shared {
            self.out.manifest.push(proto::manifest::Entry::File {
                path: manifest_path(rel),
                mode,
                size,
                sha256,
            });
        }
        Ok(())
    }

    /// Makes sure every parent of `rel` under `dest` is a real directory (creating
    /// missing ones) and reports what is at `rel` itself. Refuses symlinks anywhere.
    /// Parents already known ([`Extractor::dirs`]) are not checked again.
    fn prepare(&mut self, name: &str, rel: &Path) -> Result<(PathBuf, Existing), UnpackError> {
        let comps: Vec<&OsStr> = rel.components().map(|c| c.as_os_str()).collect();
        let Some((last, parents)) = comps.split_last() else {
            return Err(UnpackError::EmptyPath { entry: name.into() });
        };
        let mut full = self.dest.to_path_buf();
        let mut node = 0u32;
        for c in parents {
            full.push(c);
            let key = (node, c.as_bytes().to_vec());
            if let Some(&known) = self.dirs.get(&key) {
                node = known;
                continue;
            }
            match fs::symlink_metadata(&full) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(UnpackError::ThroughSymlink { entry: name.into() });
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(UnpackError::NotADirectory { entry: name.into() }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
                    .mode(0o755)
                    .create(&full)
                    .map_err(self.io_err(name))?,
                Err(e) => return Err(self.io_err(name)(e)),
            }
            self.charge(c.len() as u64 + 64)?;
            let id = u32::try_from(self.dirs.len() + 1).map_err(|_| {
                UnpackError::TooMuchBookkeeping {
                    limit: MAX_BOOKKEEPING_BYTES,
                }
            })?;
            self.dirs.insert(key, id);
            node = id;
        }
        full.push(last);
        let existing = match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(UnpackError::ThroughSymlink { entry: name.into() });
            }
            Ok(m) if m.is_dir() => Existing::Dir,
            Ok(_) => Existing::Other,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Existing::Nothing,
            Err(e) => return Err(self.io_err(name)(e)),
        };
        Ok((full, existing))
    }

    /// Counts memory kept for the rest of the unpack against [`MAX_BOOKKEEPING_BYTES`].
    fn charge(&mut self, bytes: u64) -> Result<(), UnpackError> {
        self.bookkeeping = self.bookkeeping.saturating_add(bytes);
        if self.bookkeeping > MAX_BOOKKEEPING_BYTES {
            return Err(UnpackError::TooMuchBookkeeping {
                limit: MAX_BOOKKEEPING_BYTES,
            });
        }
        Ok(())
    }

    /// A link target's length (its components are checked by the link kind).
    fn check_target(&self, name: &str, target: &[u8]) -> Result<(), UnpackError> {
        if target.len() > MAX_PATH_BYTES {
            return Err(UnpackError::PathTooLong {
                entry: name.into(),
                limit: MAX_PATH_BYTES,
            });
        }
        Ok(())
    }

    /// An I/O error on `name`; a full disk says so, with the filesystem and its free
    /// space, instead of blaming the artifact.
    fn io_err<'n>(&self, name: &'n str) -> impl Fn(io::Error) -> UnpackError + 'n {
        let dest = self.dest.to_path_buf();
        move |source| {
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT)
            ) {
                UnpackError::DiskFull {
                    entry: name.into(),
                    detail: crate::release::layout::describe_io(&dest, &source),
                }
            } else {
                UnpackError::Io {
                    entry: name.into(),
                    source,
                }
            }
        }
    }
}

fn link_target<T: Read>(e: &tar::Entry<'_, T>) -> Vec<u8> {
    e.link_name_bytes().map(Cow::into_owned).unwrap_or_default()
}

/// Relative path made of normal components only; `.` components are dropped.
fn normalize(name: &str, raw: &[u8]) -> Result<PathBuf, UnpackError> {
    if raw.is_empty() {
        return Err(UnpackError::EmptyPath { entry: name.into() });
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err(UnpackError::PathTooLong {
            entry: name.into(),
            limit: MAX_PATH_BYTES,
        });
    }
    let mut out = PathBuf::new();
    let mut depth = 0;
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(p) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(UnpackError::TooDeep {
                        entry: name.into(),
                        limit: MAX_DEPTH,
                    });
                }
                out.push(p)
            }
            Component::CurDir => {}
            Component::ParentDir => return Err(UnpackError::ParentDir { entry: name.into() }),
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::AbsolutePath { entry: name.into() });
            }
        }
    }
    Ok(out)
}

/// A normalized relative path as the manifest writes it: `/`-separated.
fn manifest_path(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn kind_name(kind: EntryType) -> String {
    match kind {
        EntryType::Char => "character device".into(),
        EntryType::Block => "block device".into(),
        EntryType::Fifo => "fifo".into(),
        EntryType::GNUSparse => "sparse file".into(),
        EntryType::XHeader => "stray pax header".into(),
        EntryType::GNULongName | EntryType::GNULongLink => "stray GNU long name".into(),
        other => format!("unsupported type {:?}", other.as_byte() as char),
    }
}

/// How much of a file is written before its writeback is started ([`start_writeback`]).
const WRITEBACK_EVERY: u64 = 8 * 1024 * 1024;

/// Starts writing `[from, to)` of a file to disk, without waiting. The release is synced
/// (`syncfs`) before it counts as complete; started here, that writeback runs while the
/// upload goes on, so the final sync has little left to wait for. `POSIX_FADV_DONTNEED`
/// on Linux starts the writeback of the dirty pages of the range (and drops the clean
/// ones from the cache). Advice only: an error changes nothing.
fn start_writeback(file: &fs::File, from: u64, to: u64) {
    if let Some(len) = std::num::NonZeroU64::new(to.saturating_sub(from)) {
        let _ = rustix::fs::fadvise(file, from, Some(len), rustix::fs::Advice::DontNeed);
    }
}

/// The check of an upload's bytes ([`proto::StreamCheck`]): their count, their CRC-32
/// (always: it costs a few milliseconds per 100 MiB), and their SHA-256 only when the
/// controller asked for that check.
pub struct StreamSum {
    crc: crc32fast::Hasher,
    sha: Option<Sha256>,
    bytes: u64,
}

/// What [`StreamSum`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summed {
    pub bytes: u64,
    pub crc32: u32,
    /// Hex SHA-256, for [`proto::StreamCheck::Sha256`].
    pub sha256: Option<String>,
}

impl StreamSum {
    pub fn new(check: proto::StreamCheck) -> Self {
        StreamSum {
            crc: crc32fast::Hasher::new(),
            sha: check.is_sha256().then(Sha256::new),
            bytes: 0,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.crc.update(data);
        if let Some(h) = &mut self.sha {
            h.update(data);
        }
        self.bytes += data.len() as u64;
    }

    pub fn finish(self) -> Summed {
        Summed {
            bytes: self.bytes,
            crc32: self.crc.finalize(),
            sha256: self.sha.map(|h| hex::encode(h.finalize())),
        }
    }
}

/// A `Read` adapter that checks ([`StreamSum`]) everything read through it.
pub struct SummingReader<R> {
    inner: R,
    sum: StreamSum,
}

impl<R> SummingReader<R> {
    pub fn new(inner: R, check: proto::StreamCheck) -> Self {
        SummingReader {
            inner,
            sum: StreamSum::new(check),
        }
    }

    pub fn finish(self) -> Summed {
        self.sum.finish()
    }
}

impl<R: Read> Read for SummingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sum.update(&buf[..n]);
        Ok(n)
    }
}

/// A blocking reader over chunks received from a channel (an async upload handler
/// feeding a `spawn_blocking` unpacker), checking ([`StreamSum`]) each chunk as it
/// takes it. It hands out the chunks themselves ([`BufRead`]): nothing is copied on the
/// way to the gzip decoder. EOF when every sender is dropped; a producer that fails
/// mid-upload should just drop its sender: the truncated gzip/tar stream is then
/// reported as corrupt.
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    chunk: bytes::Bytes,
    sum: StreamSum,
}

impl ChannelReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>, check: proto::StreamCheck) -> Self {
        ChannelReader {
            rx,
            chunk: bytes::Bytes::new(),
            sum: StreamSum::new(check),
        }
    }

    /// The check of every chunk taken so far (all of them once the unpacker read to the
    /// end, as it does on success).
    pub fn finish(self) -> Summed {
        self.sum.finish()
    }
}

impl BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.sum.update(&chunk);
                    self.chunk = chunk;
                }
                None => break,
            }
        }
        Ok(&self.chunk)
    }

    fn consume(&mut self, n: usize) {
        bytes::Buf::advance(&mut self.chunk, n);
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = {
            let have = self.fill_buf()?;
            let n = have.len().min(buf.len());
            buf[..n].copy_from_slice(&have[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::os::unix::fs::MetadataExt;
    use tar::Header;

    // ---- archive building -------------------------------------------------------

    struct Tb(tar::Builder<Vec<u8>>);

    impl Tb {
        fn new() -> Self {
            Tb(tar::Builder::new(Vec::new()))
        }

        /// Appends a header written byte by byte, bypassing the builder's path checks.
        fn raw(mut self, name: &[u8], ty: EntryType, mode: u32, link: &[u8], data: &[u8]) -> Self {
            let mut h = Header::new_gnu();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
            h.set_entry_type(ty);
            if ty == EntryType::GNUSparse {
                h.as_gnu_mut().unwrap().set_real_size(0);
            }
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_mtime(1_600_000_000);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        fn file(self, name: &str, mode: u32, data: &[u8]) -> Self {
            self.raw(name.as_bytes(), EntryType::Regular, mode, b"", data)
        }

        fn dir(self, name: &str, mode: u32) -> Self {
            self.raw(name.as_bytes(), EntryType::Directory, mode, b"", b"")
        }

        fn symlink(self, name: &str, target: &str) -> Self {
            let t = target.as_bytes();
            self.raw(name.as_bytes(), EntryType::Symlink, 0o777, t, b"")
        }

        fn hardlink(self, name: &str, target: &str) -> Self {
            let t = target.as_bytes();
            self.raw(name.as_bytes(), EntryType::Link, 0o644, t, b"")
        }

        /// Long path: the builder emits a GNU long-name entry.
        fn long_file(mut self, path: &str, data: &[u8]) -> Self {
            let mut h = Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            self.0.append_data(&mut h, path, data).unwrap();
            self
        }

        fn tar(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }

        fn tgz(self) -> Vec<u8> {
            gz(&self.tar())
        }
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn sha256_hex(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    // ---- sandbox ------------------------------------------------------------------

    /// `root/dest` is the destination; `root/sentinel.txt` must never change and
    /// nothing else may appear in `root`.
    struct Sandbox {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        dest: PathBuf,
    }

    fn sandbox() -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let dest = root.join("dest");
        fs::create_dir(&dest).unwrap();
        fs::write(root.join("sentinel.txt"), b"sentinel").unwrap();
        Sandbox {
            _tmp: tmp,
            root,
            dest,
        }
    }

    impl Sandbox {
        fn unpack(&self, data: &[u8]) -> Result<Unpacked, UnpackError> {
            unpack_tar_gz(data, &self.dest, &Limits::default())
        }

        fn assert_contained(&self) {
            let mut names: Vec<_> = fs::read_dir(&self.root)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            assert_eq!(names, ["dest", "sentinel.txt"]);
            let sentinel = self.root.join("sentinel.txt");
            let meta = fs::symlink_metadata(&sentinel).unwrap();
            assert!(meta.file_type().is_file());
            assert_eq!(meta.nlink(), 1);
            assert_eq!(fs::read(&sentinel).unwrap(), b"sentinel");
            assert!(fs::symlink_metadata(&self.dest).unwrap().is_dir());
        }

        /// Unpacks an archive that must be refused; checks containment.
        fn refuse(&self, data: &[u8]) -> UnpackError {
            let err = self.unpack(data).expect_err("archive must be refused");
            self.assert_contained();
            err
        }

        fn absent(&self, rel: &str) -> bool {
            fs::symlink_metadata(self.dest.join(rel)).is_err()
        }
    }

    fn mode_of(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    // ---- happy path ---------------------------------------------------------------

    #[test]
    fn normal_archive() {
        let sb = sandbox();
        let long = format!("app/{}/deep.txt", "x".repeat(150));
        let data = Tb::new()
            .dir("./", 0o755)
            .dir("./app/", 0o755)
            .dir("app/bin/", 0o750)
            .file("app/bin/run", 0o755, b"#!/bin/sh\necho hi\n")
            .file("./app/data/config.txt", 0o644, b"key=value\n") // implicit parent
            .symlink("app/current", "bin/run")
            .symlink("app/lib/up", "../data/config.txt")
            .symlink("app/self", ".")
            .hardlink("app/hard", "./app/data/config.txt")
            .dir("app/bin", 0o755) // repeated directory entry is fine
            .long_file(&long, b"long")
            .tgz();
        let out = sb.unpack(&data).unwrap();
        sb.assert_contained();
        // The manifest: files hashed as written, symlinks with targets, no dirs, and the
        // hard link listed as the file it shares.
        use proto::manifest::Entry;
        let m = |p: &str| out.manifest.iter().find(|e| e.path() == p).cloned();
        match m("app/bin/run") {
            Some(Entry::File {
                mode, size, sha256, ..
            }) => {
                assert_eq!((mode, size), (0o755, 18));
                assert_eq!(sha256, sha256_hex(b"#!/bin/sh\necho hi\n"));
            }
            other => panic!("{other:?}"),
        }
        match (m("app/data/config.txt"), m("app/hard")) {
            (Some(Entry::File { sha256: a, .. }), Some(Entry::File { sha256: b, .. })) => {
                assert_eq!(a, b)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            m("app/lib/up"),
            Some(Entry::Symlink {
                path: "app/lib/up".into(),
                target: "../data/config.txt".into()
            })
        );
        assert_eq!(out.manifest.len(), 4 + 3, "4 files and 3 symlinks, no dirs");
        assert!(out.content_digest().starts_with("c1:"));
        assert_eq!(
            out,
            Unpacked {
                files: 4,
                dirs: 3,
                symlinks: 3,
                bytes: 18 + 10 + 4,
                manifest: out.manifest.clone(),
            }
        );
        let d = &sb.dest;
        assert_eq!(
            fs::read(d.join("app/bin/run")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(mode_of(&d.join("app/bin/run")), 0o755);
        assert_eq!(mode_of(&d.join("app/data/config.txt")), 0o644);
        assert_eq!(mode_of(&d.join("app/bin")), 0o755);
        assert_eq!(
            fs::read_link(d.join("app/current")).unwrap(),
            Path::new("bin/run")
        );
        assert_eq!(
            fs::read(d.join("app/current")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(fs::read(d.join("app/lib/up")).unwrap(), b"key=value\n");
        assert_eq!(fs::read(d.join("app/hard")).unwrap(), b"key=value\n");
        assert_eq!(fs::metadata(d.join("app/hard")).unwrap().nlink(), 2);
        assert_eq!(fs::read(d.join(&long)).unwrap(), b"long");
        let mtime = fs::metadata(d.join("app/bin/run")).unwrap().mtime();
        assert_eq!(mtime, 1_600_000_000);
    }

    #[test]
    fn old_style_directory_with_trailing_slash() {
        let sb = sandbox();
        let data = Tb::new()
            .raw(b"olddir/", EntryType::Regular, 0o755, b"", b"")
            .raw(b"olddir/f", EntryType::Regular, 0o644, b"", b"x")
            .tar();
        // v7 type flag NUL instead of '0' (checksum is unaffected: both headers hold
        // the same sum after recomputing below).
        let mut data = data;
        for off in [156, 512 + 156] {
            data[off] = 0;
            let mut h = Header::new_old();
            h.as_mut_bytes()
                .copy_from_slice(&data[off - 156..off - 156 + 512]);
            h.set_cksum();
            data[off - 156..off - 156 + 512].copy_from_slice(h.as_bytes());
        }
        let data = gz(&data);
        let out = sb.unpack(&data).unwrap();
        assert_eq!((out.dirs, out.files), (1, 1));
        assert!(sb.dest.join("olddir").is_dir());
        assert_eq!(fs::read(sb.dest.join("olddir/f")).unwrap(), b"x");
    }

    // ---- path refusals ------------------------------------------------------------

    #[test]
    fn refuses_absolute_path() {
        let sb = sandbox();
        // Points into the sandbox root, so a bug would show up in assert_contained.
        let abs = format!("{}/abs_evil", sb.root.display());
        assert!(abs.len() < 100);
        let data = Tb::new().file(&abs, 0o644, b"evil").tgz();
        let err = sb.refuse(&data);
        assert!(
            matches!(err, UnpackError::AbsolutePath { ref entry } if *entry == abs),
            "{err}"
        );
    }

    #[test]
    fn refuses_parent_dir() {
        for name in [
            "../evil",
            "a/../../evil",
            "./a/b/../../../sentinel.txt",
            "a/..",
        ] {
            let sb = sandbox();
            let data = Tb::new()
                .file("ok", 0o644, b"ok")
                .file(name, 0o644, b"evil")
                .tgz();
            let err = sb.refuse(&data);
            assert!(
                matches!(err, UnpackError::ParentDir { ref entry } if entry == name),
                "{err}"
            );
        }
    }

    #[test]
    fn refuses_empty_name() {
        for name in ["", ".", "./."] {
            let sb = sandbox();
            let data = Tb::new().file(name, 0o644, b"x").tgz();
            let err = sb.refuse(&data);
            assert!(
                matches!(err, UnpackError::EmptyPath { .. }),
                "{name:?}: {err}"
            );
        }
    }

    // ---- symlinks -----------------------------------------------------------------

    #[test]
    fn refuses_symlink_escaping_relative() {
        for (name, target) in [
            ("link", ".."),
            ("link", "../"),
            ("a/link", "../../etc"),
            ("a/b/link", "../../../sentinel.txt"),
            ("self", "./.."),
        ] {
            let sb = sandbox();
            // Even if the link were created, the next entry would write through it.
            let data = Tb::new()
                .symlink(name, target)
                .file(&format!("{name}/evil"), 0o644, b"evil")
                .tgz();
            let err = sb.refuse(&data);
            assert!(
                matches!(err, UnpackError::LinkEscapes { ref entry, target: ref t }
                    if entry == name && t == target),
                "{err}"
            );
            assert!(sb.absent(name));
        }
    }

    #[test]
    fn refuses_symlink_absolute_target() {
        let sb = sandbox();
        let target = sb.root.join("sentinel.txt").display().to_string();
        let data = Tb::new()
            .symlink("abs", &target)
            .file("abs", 0o644, b"overwritten")
            .tgz();
        let err = sb.refuse(&data);
        assert!(matches!(err, UnpackError::LinkEscapes { .. }), "{err}");
        assert!(sb.absent("abs"));
    }

    #[test]
    fn refuses_dotdot_after_name_in_symlink_target() {
        // `top -> .` is fine. `a/up -> ../top/..` stays inside dest lexically, but the
        // kernel follows `top` to dest and then `..` leads to dest's parent.
        for (name, target) in [("up", "top/.."), ("a/up", "../top/..")] {
            let sb = sandbox();
            let data = Tb::new()
                .symlink("top", ".")
                .dir("a/", 0o755)
                .symlink(name, target)
                .file(&format!("{name}/evil"), 0o644, b"evil")
                .tgz();
            let err = sb.refuse(&data);
            assert!(
                matches!(err, UnpackError::LinkEscapes { ref entry, .. } if entry == name),
                "{err}"
            );
            assert!(sb.absent(name));
        }
    }

    #[test]
    fn refuses_hardlink_to_file_not_from_archive() {
        let sb = sandbox();
        fs::write(sb.dest.join("preexisting"), b"x").unwrap();
        let err = sb.refuse(&Tb::new().hardlink("h", "preexisting").tgz());
        assert!(matches!(err, UnpackError::HardlinkTarget { .. }), "{err}");
        assert!(sb.absent("h"));
    }

    #[test]
    fn refuses_writing_through_internal_symlink() {
        let sb = sandbox();
        let data = Tb::new()
            .dir("sub/", 0o755)
            .symlink("link", "sub")
            .file("link/file", 0o644, b"x")
            .tgz();
        let err = sb.refuse(&data);
        assert!(
            matches!(err, UnpackError::ThroughSymlink { ref entry } if entry == "link/file"),
            "{err}"
        );
        assert!(sb.absent("sub/file"));
    }

    #[test]
    fn refuses_entry_replacing_symlink() {
        let kinds: [fn(Tb) -> Tb; 4] = [
            |t| t.file("l", 0o644, b"overwrite"),
            |t| t.dir("l/", 0o755),
            |t| t.symlink("l", "other"),
            |t| t.hardlink("l", "sub/f"),
        ];
        for add in kinds {
            let sb = sandbox();
            let data = add(Tb::new()
                .file("sub/f", 0o644, b"orig")
                .symlink("l", "sub/f"))
            .tgz();
            let err = sb.refuse(&data);
            assert!(
                matches!(err, UnpackError::ThroughSymlink { ref entry } if entry.starts_with('l')),
                "{err}"
            );
            assert_eq!(fs::read(sb.dest.join("sub/f")).unwrap(), b"orig");
            assert_eq!(
                fs::read_link(sb.dest.join("l")).unwrap(),
                Path::new("sub/f")
            );
        }
    }

    // ---- hard links ---------------------------------------------------------------

    #[test]
    fn refuses_hardlink_outside() {
        for target in ["../sentinel.txt", "/etc/passwd"] {
            let sb = sandbox();
            let data = Tb::new().hardlink("h", target).tgz();
            let err = sb.refuse(&data);
            assert!(
                matches!(err, UnpackError::HardlinkEscapes { ref entry, target: ref t }
                    if entry == "h" && t == target),
                "{err}"
            );
            assert!(sb.absent("h"));
        }
    }

    #[test]
    fn refuses_hardlink_to_missing_dir_or_symlink() {
        for target in ["missing", "d", "s", "later", ""] {
            let sb = sandbox();
            let data = Tb::new()
                .dir("d/", 0o755)
                .file("f", 0o644, b"f")
                .symlink("s", "f")
                .hardlink("h", target)
                .file("later", 0o644, b"x")
                .tgz();
            let err = sb.refuse(&data);
            assert!(
                matches!(err, UnpackError::HardlinkTarget { ref entry, .. } if entry == "h"),
                "{target}: {err}"
            );
            assert!(sb.absent("h"));
        }
    }

    // ---- special types ------------------------------------------------------------

    #[test]
    fn refuses_special_files() {
        for (ty, kind) in [
            (EntryType::Char, "character device"),
            (EntryType::Block, "block device"),
            (EntryType::Fifo, "fifo"),
            (EntryType::GNUSparse, "sparse file"),
            (EntryType::new(b'V'), "unsupported type 'V'"),
        ] {
            let sb = sandbox();
            let data = Tb::new().raw(b"dev/thing", ty, 0o644, b"", b"").tgz();
            let err = sb.refuse(&data);
            assert!(
                matches!(err, UnpackError::Special { ref entry, kind: ref k }
                    if entry == "dev/thing" && k == kind),
                "{err}"
            );
            assert!(sb.absent("dev"));
        }
    }

    #[test]
    fn refuses_pax_sparse_file() {
        let sb = sandbox();
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("GNU.sparse.major", b"1".as_slice())])
            .unwrap();
        let mut h = Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, "sparse", b"abc".as_slice()).unwrap();
        let err = sb.refuse(&gz(&b.into_inner().unwrap()));
        assert!(
            matches!(err, UnpackError::Special { ref kind, .. } if kind == "sparse file"),
            "{err}"
        );
    }

    #[test]
    fn refuses_duplicate_file_and_file_as_parent() {
        let sb = sandbox();
        let err = sb.refuse(
            &Tb::new()
                .file("f", 0o644, b"1")
                .file("./f", 0o644, b"2")
                .tgz(),
        );
        assert!(
            matches!(err, UnpackError::Duplicate { ref entry } if entry == "./f"),
            "{err}"
        );
        assert_eq!(fs::read(sb.dest.join("f")).unwrap(), b"1");

        let sb = sandbox();
        let err = sb.refuse(&Tb::new().file("f", 0o644, b"1").dir("f/", 0o755).tgz());
        assert!(matches!(err, UnpackError::Duplicate { .. }), "{err}");

        let sb = sandbox();
        let err = sb.refuse(
            &Tb::new()
                .file("f", 0o644, b"1")
                .file("f/g", 0o644, b"2")
                .tgz(),
        );
        assert!(matches!(err, UnpackError::NotADirectory { .. }), "{err}");
    }

    // ---- modes --------------------------------------------------------------------

    #[test]
    fn drops_setuid_setgid_sticky_and_keeps_dirs_usable() {
        let sb = sandbox();
        let data = Tb::new()
            .file("suid", 0o4755, b"x")
            .file("sgid", 0o2750, b"x")
            .file("none", 0o000, b"x")
            .dir("sticky/", 0o1777)
            .dir("ro/", 0o555)
            .file("ro/inside", 0o644, b"x")
            .tgz();
        sb.unpack(&data).unwrap();
        let d = &sb.dest;
        assert_eq!(mode_of(&d.join("suid")), 0o755);
        assert_eq!(mode_of(&d.join("sgid")), 0o750);
        assert_eq!(mode_of(&d.join("none")), 0o000);
        assert_eq!(mode_of(&d.join("sticky")), 0o777);
        assert_eq!(mode_of(&d.join("ro")), 0o755);
        assert!(d.join("ro/inside").is_file());
    }

    // ---- limits -------------------------------------------------------------------

    #[test]
    fn size_cap() {
        let data = Tb::new()
            .file("a", 0o644, &[1; 600])
            .file("b", 0o644, &[2; 400])
            .tgz();
        let limits = |max_total_bytes| Limits {
            max_total_bytes,
            ..Limits::default()
        };
        let sb = sandbox();
        let out = unpack_tar_gz(data.as_slice(), &sb.dest, &limits(1000)).unwrap();
        assert_eq!(out.bytes, 1000);

        let sb = sandbox();
        let err = unpack_tar_gz(data.as_slice(), &sb.dest, &limits(999)).unwrap_err();
        sb.assert_contained();
        assert!(matches!(err, UnpackError::TooLarge { limit: 999 }), "{err}");
        assert!(sb.absent("b"));
    }

    #[test]
    fn entry_cap() {
        let data = Tb::new()
            .dir("d/", 0o755)
            .file("d/a", 0o644, b"a")
            .file("d/b", 0o644, b"b")
            .tgz();
        let limits = |max_entries| Limits {
            max_entries,
            ..Limits::default()
        };
        let sb = sandbox();
        assert!(unpack_tar_gz(data.as_slice(), &sb.dest, &limits(3)).is_ok());
        let sb = sandbox();
        let err = unpack_tar_gz(data.as_slice(), &sb.dest, &limits(2)).unwrap_err();
        sb.assert_contained();
        assert!(
            matches!(err, UnpackError::TooManyEntries { limit: 2 }),
            "{err}"
        );
        assert!(sb.absent("d/b"));
    }

    #[test]
    fn overhead_cap_stops_decompression_bombs() {
        let limits = Limits::default();
        // Zeros after the end-of-archive blocks.
        let mut tar = Tb::new().file("f", 0o644, b"x").tar();
        let ok_len = tar.len();
        tar.resize(ok_len + 300_000, 0);
        let sb = sandbox();
        let err = unpack_impl(gz(&tar).as_slice(), &sb.dest, &limits, 100_000).unwrap_err();
        sb.assert_contained();
        assert!(matches!(err, UnpackError::Overhead { .. }), "{err}");
        // ... but a little padding is fine.
        tar.truncate(ok_len + 10_240);
        let sb = sandbox();
        unpack_impl(gz(&tar).as_slice(), &sb.dest, &limits, 100_000).unwrap();

        // A directory entry claiming lots of (skipped) data.
        let data = Tb::new()
            .raw(b"d/", EntryType::Directory, 0o755, b"", &[0; 300_000])
            .tgz();
        let sb = sandbox();
        let err = unpack_impl(data.as_slice(), &sb.dest, &limits, 100_000).unwrap_err();
        sb.assert_contained();
        assert!(matches!(err, UnpackError::Overhead { .. }), "{err}");
    }

    // ---- hostile shapes (#16) -------------------------------------------------------

    /// A GNU long-name (or long-link) record of `len` bytes, then a file.
    fn long_name_record(kind: EntryType, len: usize) -> Vec<u8> {
        let mut h = Header::new_gnu();
        h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(len as u64);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend(std::iter::repeat_n(b'a', len));
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    // See: #16
    #[test]
    fn deep_paths_are_refused_and_repeats_cost_linear_time() {
        // 300 repeats of one 2,000-deep directory: refused at once.
        let deep = "d/".repeat(2000);
        let mut tb = Tb::new();
        for _ in 0..300 {
            tb = tb.long_file(&deep, b"");
        }
        let sb = sandbox();
        let err = sb.refuse(&tb.tgz());
        assert!(
            matches!(
                err,
                UnpackError::TooDeep {
                    limit: MAX_DEPTH,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().len() < 400, "the name is cut: {err}");

        // At the limit it works, and each repeat checks no parent twice.
        let ok = format!("{}f", "d/".repeat(MAX_DEPTH - 1));
        let mut tb = Tb::new().long_file(&ok, b"x");
        for i in 0..300 {
            tb = tb.long_file(&format!("{}g{i}", "d/".repeat(MAX_DEPTH - 1)), b"y");
        }
        let sb = sandbox();
        let out = sb.unpack(&tb.tgz()).unwrap();
        assert_eq!(out.files, 301);

        let long = format!("{}/f", "x".repeat(MAX_PATH_BYTES));
        let sb = sandbox();
        let err = sb.refuse(&Tb::new().long_file(&long, b"x").tgz());
        assert!(matches!(err, UnpackError::PathTooLong { .. }), "{err}");
    }

    // See: #16
    #[test]
    fn long_names_and_pax_headers_have_a_hard_limit() {
        for kind in [EntryType::GNULongName, EntryType::GNULongLink] {
            let mut tar = long_name_record(kind, 50 * 1024 * 1024);
            tar.extend(Tb::new().file("f", 0o644, b"x").tar());
            let sb = sandbox();
            let err = sb.refuse(&gz(&tar));
            assert!(
                matches!(err, UnpackError::HeaderTooLarge { size, .. } if size == 50 * 1024 * 1024),
                "{err}"
            );
            assert!(err.to_string().len() < 200, "{err}");
        }
        let mut b = tar::Builder::new(Vec::new());
        let big = vec![b'x'; 200 * 1024];
        b.append_pax_extensions([("comment", big.as_slice())])
            .unwrap();
        let mut h = Header::new_ustar();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, "f", b"x".as_slice()).unwrap();
        let sb = sandbox();
        let err = sb.refuse(&gz(&b.into_inner().unwrap()));
        assert!(
            matches!(
                err,
                UnpackError::HeaderTooLarge {
                    what: "PAX header",
                    ..
                }
            ),
            "{err}"
        );
    }

    // See: #16
    #[test]
    fn pax_path_and_linkpath_are_honoured_and_size_must_agree() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("path", b"dir/from-pax".as_slice())])
            .unwrap();
        let mut h = Header::new_ustar();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "ignored", b"hi".as_slice()).unwrap();
        b.append_pax_extensions([("linkpath", b"from-pax".as_slice())])
            .unwrap();
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_link_name("nowhere").unwrap();
        b.append_data(&mut h, "dir/link", b"".as_slice()).unwrap();
        let sb = sandbox();
        sb.unpack(&gz(&b.into_inner().unwrap())).unwrap();
        assert_eq!(fs::read(sb.dest.join("dir/from-pax")).unwrap(), b"hi");
        assert_eq!(
            fs::read_link(sb.dest.join("dir/link")).unwrap(),
            Path::new("from-pax")
        );

        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", b"999".as_slice())])
            .unwrap();
        let mut h = Header::new_ustar();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "f", b"hi".as_slice()).unwrap();
        let sb = sandbox();
        let err = sb.refuse(&gz(&b.into_inner().unwrap()));
        assert!(matches!(err, UnpackError::Corrupt { .. }), "{err}");
    }

    // ---- corruption ---------------------------------------------------------------

    #[test]
    fn corrupt_gzip() {
        let good = Tb::new().file("f", 0o644, &[7; 5000]).tgz();
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        let mut bad_crc = good.clone();
        let n = bad_crc.len();
        bad_crc[n - 8] ^= 0xff;
        for data in [
            b"definitely not gzip".to_vec(),
            Vec::new(),
            flipped,
            bad_crc,
        ] {
            let sb = sandbox();
            let err = sb.refuse(&data);
            assert!(matches!(err, UnpackError::Corrupt { .. }), "{err}");
        }
    }

    #[test]
    fn truncated_archives() {
        let tar = Tb::new()
            .file("a", 0o644, &[1; 3000])
            .file("b", 0o644, &[2; 3000])
            .tar();
        let tgz = gz(&tar);
        let cases = [
            gz(&tar[..512 + 1000]),        // inside file data
            gz(&tar[..512 + 3072]),        // at an entry boundary, no end blocks
            gz(&tar[..512 + 3072 + 100]),  // inside a header
            tgz[..tgz.len() - 4].to_vec(), // gzip trailer cut
            tgz[..tgz.len() / 2].to_vec(), // gzip stream cut
        ];
        for data in cases {
            let sb = sandbox();
            let err = sb.refuse(&data);
            assert!(matches!(err, UnpackError::Corrupt { .. }), "{err}");
        }
    }

    #[test]
    fn reader_errors_are_reported_as_read_errors() {
        struct Failing<'a>(&'a [u8]);
        impl Read for Failing<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::ConnectionReset, "boom"));
                }
                self.0.read(buf)
            }
        }
        let data = Tb::new().file("f", 0o644, &[1; 100_000]).tgz();
        let sb = sandbox();
        let err = unpack_tar_gz(
            Failing(&data[..data.len() / 2]),
            &sb.dest,
            &Limits::default(),
        )
        .unwrap_err();
        sb.assert_contained();
        assert!(
            matches!(err, UnpackError::Read { ref source } if source.kind() == io::ErrorKind::ConnectionReset),
            "{err}"
        );
    }

    // ---- hashing and streaming ----------------------------------------------------

    #[test]
    fn the_check_sees_the_whole_input_including_trailing_garbage() {
        let tar = Tb::new().file("f", 0o644, b"hello").tar();
        let mut padded = tar.clone();
        padded.resize(tar.len() + 8192, 0); // decompressed padding after the end blocks
        for mut data in [gz(&tar), gz(&padded)] {
            data.extend_from_slice(b"trailing garbage that is not gzip");
            let sb = sandbox();
            let mut hr = SummingReader::new(data.as_slice(), proto::StreamCheck::Sha256);
            let out = unpack_tar_gz(&mut hr, &sb.dest, &Limits::default()).unwrap();
            assert_eq!(out.files, 1);
            assert_eq!(hr.finish(), summed(&data, true));
        }
    }

    /// What a [`StreamSum`] over all of `data` says.
    fn summed(data: &[u8], sha: bool) -> Summed {
        Summed {
            bytes: data.len() as u64,
            crc32: crc32fast::hash(data),
            sha256: sha.then(|| sha256_hex(data)),
        }
    }

    #[test]
    fn the_check_equals_the_input_check() {
        let data = Tb::new()
            .dir("d/", 0o755)
            .file(
                "d/big",
                0o644,
                &(0..200_000u32).map(|i| i as u8).collect::<Vec<_>>(),
            )
            .tgz();
        for check in [proto::StreamCheck::Sha256, proto::StreamCheck::Crc32] {
            let sb = sandbox();
            let mut hr = SummingReader::new(data.as_slice(), check);
            unpack_tar_gz(&mut hr, &sb.dest, &Limits::default()).unwrap();
            assert_eq!(hr.finish(), summed(&data, check.is_sha256()));
            assert_eq!(fs::metadata(sb.dest.join("d/big")).unwrap().len(), 200_000);
        }
    }

    #[test]
    fn concatenated_gzip_members() {
        let tar = Tb::new()
            .file("a", 0o644, b"aaa")
            .file("b", 0o644, b"bbb")
            .tar();
        let mut data = gz(&tar[..700]);
        data.extend(gz(&tar[700..]));
        let sb = sandbox();
        let out = sb.unpack(&data).unwrap();
        assert_eq!(out.files, 2);
        assert_eq!(fs::read(sb.dest.join("b")).unwrap(), b"bbb");
    }

    #[test]
    fn channel_reader_from_another_thread() {
        let data = Tb::new()
            .file("x/one", 0o644, &[1; 70_000])
            .symlink("x/two", "one")
            .tgz();
        for check in [proto::StreamCheck::Sha256, proto::StreamCheck::Crc32] {
            let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
            let chunks: Vec<bytes::Bytes> = data
                .chunks(777)
                .map(bytes::Bytes::copy_from_slice)
                .collect();
            let producer = std::thread::spawn(move || {
                tx.blocking_send(bytes::Bytes::new()).unwrap(); // empty chunks are skipped
                for c in chunks {
                    tx.blocking_send(c).unwrap();
                }
            });
            let sb = sandbox();
            let mut reader = ChannelReader::new(rx, check);
            let out = unpack_tar_gz_buffered(&mut reader, &sb.dest, &Limits::default()).unwrap();
            producer.join().unwrap();
            assert_eq!(out.files, 1);
            assert_eq!(out.symlinks, 1);
            assert_eq!(reader.finish(), summed(&data, check.is_sha256()));
            assert_eq!(fs::read(sb.dest.join("x/two")).unwrap(), vec![1; 70_000]);
        }
    }

    #[test]
    fn a_changed_or_reordered_chunk_changes_the_check() {
        // See: #14 (item 1). The upload is checked with a CRC-32 of the stream instead of a
        // second SHA-256; it must still tell a damaged stream from the one sent, also where
        // the gzip and tar checks cannot (two whole gzip members swapped).
        let a = gz(&Tb::new().file("a", 0o644, &[b'a'; 3000]).tar()[..1024]);
        let b = gz(&Tb::new().file("a", 0o644, &[b'a'; 3000]).tar()[1024..]);
        let sent = [a.clone(), b.clone()].concat();
        let swapped = [b, a].concat();
        assert_eq!(sent.len(), swapped.len());
        assert_ne!(summed(&sent, false).crc32, summed(&swapped, false).crc32);
        let mut flipped = sent.clone();
        flipped[sent.len() / 2] ^= 1;
        assert_ne!(summed(&sent, false).crc32, summed(&flipped, false).crc32);
    }
}

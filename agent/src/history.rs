//! The history log, `<deploy_to>/.deploy/history.jsonl`: one JSON line per deploy,
//! rollback, destroy or expiry, appended whole or not at all. Also the agent's clock
//! format ([`now_rfc3339`]).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use proto::HistoryEntry;

use crate::release::layout::Layout;

/// Appends one line to `history.jsonl`, whole or not at all: one `write` of the whole
/// line, then fsync; on any failure (a full disk tears a write part way) the file is cut
/// back to its old length, so no torn line is left to run into the next one. A file
/// that already ends in a torn line (from an older agent) gets a newline first, so the
/// damage stays on that one line.
pub fn append_history(layout: &Layout, entry: &HistoryEntry) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    std::fs::create_dir_all(layout.state())?;
    let mut line = serde_json::to_vec(entry)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(layout.history())?;
    let len = f.metadata()?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            line.insert(0, b'\n');
        }
    }
    let result = match f.write(&line) {
        Ok(n) if n == line.len() => f.sync_data(),
        Ok(n) => Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!("short write ({n} of {} bytes)", line.len()),
        )),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        let _ = f.set_len(len).and_then(|()| f.sync_data());
        return Err(e);
    }
    Ok(())
}

/// The newest `limit` entries (all when 0), oldest first. Unreadable lines are skipped.
pub fn read_history(layout: &Layout, limit: usize) -> Vec<HistoryEntry> {
    read_history_counted(layout, limit).0
}

/// Like [`read_history`], and how many lines could not be read (a torn line, bytes that
/// are not UTF-8, not an entry): those are skipped, one by one, and the rest is shown.
pub fn read_history_counted(layout: &Layout, limit: usize) -> (Vec<HistoryEntry>, u64) {
    let bytes = std::fs::read(layout.history()).unwrap_or_default();
    let mut bad = 0u64;
    let all: Vec<HistoryEntry> = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .filter_map(|l| match serde_json::from_slice(l) {
            Ok(e) => Some(e),
            Err(_) => {
                bad += 1;
                None
            }
        })
        .collect();
    if bad > 0 {
        tracing::warn!(
            "{}: skipped {bad} unreadable line(s)",
            layout.history().display()
        );
    }
    let skip = if limit == 0 {
        0
    } else {
        all.len().saturating_sub(limit)
    };
    (all.into_iter().skip(skip).collect(), bad)
}

/// Now, as RFC 3339 UTC with seconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Action, Outcome};

    #[test]
    fn history_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        for i in 0..5 {
            append_history(&l, &entry(&format!("2026010100000{i}"))).unwrap();
        }
        let last2 = read_history(&l, 2);
        assert_eq!(last2.len(), 2);
        assert_eq!(last2[1].release, "20260101000004");
        assert_eq!(read_history(&l, 0).len(), 5);
    }

    fn entry(release: &str) -> HistoryEntry {
        HistoryEntry {
            action: Action::Deploy,
            release: release.into(),
            version: None,
            previous: None,
            outcome: Outcome::Live,
            holder: "t".into(),
            started: now_rfc3339(),
            finished: now_rfc3339(),
            error: None,
            origin: None,
            instance: None,
        }
    }

    // See: #16
    #[test]
    fn bad_lines_are_skipped_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        append_history(&l, &entry("20260101000001")).unwrap();
        // A line that is not UTF-8, and a torn line with no newline (a full disk).
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(l.history())
            .unwrap();
        f.write_all(b"{\"action\":\"deploy\xff\"}\n{\"action\":\"depl")
            .unwrap();
        drop(f);
        // The next line starts on a line of its own.
        append_history(&l, &entry("20260101000002")).unwrap();
        let (all, bad) = read_history_counted(&l, 0);
        let ids: Vec<&str> = all.iter().map(|e| e.release.as_str()).collect();
        assert_eq!(ids, ["20260101000001", "20260101000002"]);
        assert_eq!(bad, 2);
    }
}

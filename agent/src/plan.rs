//! `deployctl push --plan`: answers read-only questions about what a push would do.
//! Nothing here writes: no lock, no journal, no partial release, not even `ensure()`.

use proto::DeltaOffer;

use crate::release::delta::{Sources, need};
use crate::release::layout::Layout;

/// The indices into `offer.entries` a push of this offer would ask for now: what
/// [`need`] answers inside an upload, from the same index of the releases here.
pub async fn delta_need(layout: Layout, offer: DeltaOffer) -> Result<Vec<u32>, String> {
    tokio::task::spawn_blocking(move || need(&offer, &Sources::index(&layout)))
        .await
        .map_err(|e| format!("delta plan task: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::manifest::Entry;

    // A layout that does not exist yet is not created by a plan, and lacks every file.
    #[tokio::test]
    async fn a_missing_layout_needs_everything_and_stays_missing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("app");
        let offer = DeltaOffer {
            entries: vec![
                Entry::File {
                    path: "a".into(),
                    mode: 0o644,
                    size: 1,
                    sha256: "aa".repeat(32),
                },
                Entry::File {
                    path: "b".into(),
                    mode: 0o644,
                    size: 1,
                    sha256: "aa".repeat(32),
                },
            ],
            dirs: Vec::new(),
            artifact_sha256: "bb".repeat(32),
            artifact_size: 10,
        };
        let need = delta_need(Layout::new(&root), offer).await.unwrap();
        assert_eq!(need, vec![0], "one entry per content");
        assert!(!root.exists());
    }
}

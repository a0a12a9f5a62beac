//! Moving `current`: a new symlink next to it, then `rename(2)` over it, so any reader
//! sees either the old or the new release, never a missing link.

use std::path::Path;

use super::layout::{Layout, sync_dir};

/// Points `current` at `releases/<id>` atomically.
pub fn switch(layout: &Layout, id: &str) -> std::io::Result<()> {
    let target = Path::new("releases").join(id);
    if !layout.release(id).is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("release {id} does not exist"),
        ));
    }
    let tmp = layout
        .root
        .join(format!(".current.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp)?;
    if let Err(e) = std::fs::rename(&tmp, layout.current()) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(&layout.root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_replaces_the_link_and_refuses_missing_releases() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        l.ensure().unwrap();
        std::fs::create_dir(l.release("20260101000000")).unwrap();
        std::fs::create_dir(l.release("20260102000000")).unwrap();
        switch(&l, "20260101000000").unwrap();
        assert_eq!(l.current_release().unwrap(), "20260101000000");
        switch(&l, "20260102000000").unwrap();
        assert_eq!(l.current_release().unwrap(), "20260102000000");
        assert_eq!(
            std::fs::read_link(l.current()).unwrap(),
            Path::new("releases/20260102000000")
        );
        assert!(switch(&l, "20260109000000").is_err());
        assert_eq!(l.current_release().unwrap(), "20260102000000");
        // no temp links left behind
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    }
}

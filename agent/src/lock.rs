//! One deploy per app per host.
//!
//! The lock lives in the agent's memory, tied to a [`LockGuard`]: the session that took
//! it holds the guard, and hands it to the deploy task once the upload is complete. The
//! lock is freed when the guard drops, so a session that dies (a cancelled CI job, a
//! killed controller) frees it with no stale lock left. `<deploy_to>/.deploy/lock`
//! mirrors the holder for people looking at the server; a lock file left by an earlier
//! agent process is stale by definition and is removed at start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::LockInfo;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Locks {
    held: Mutex<HashMap<PathBuf, LockInfo>>,
    freed: Notify,
}

/// Holding this means holding the app's lock.
pub struct LockGuard {
    locks: Arc<Locks>,
    key: PathBuf,
    file: PathBuf,
    pub info: LockInfo,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key)
            .field("info", &self.info)
            .finish()
    }
}

impl Locks {
    /// Takes the lock for `deploy_to`, waiting up to `wait`. On failure returns who
    /// holds it.
    pub async fn acquire(
        self: &Arc<Self>,
        deploy_to: &Path,
        lock_file: PathBuf,
        info: LockInfo,
        wait: Duration,
    ) -> Result<LockGuard, LockInfo> {
        let deadline = Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            {
                let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                match held.get(deploy_to) {
                    None => {
                        held.insert(deploy_to.to_path_buf(), info.clone());
                        drop(held);
                        if let Ok(text) = serde_json::to_vec_pretty(&info) {
                            if let Some(dir) = lock_file.parent() {
                                let _ = std::fs::create_dir_all(dir);
                            }
                            let _ = std::fs::write(&lock_file, text);
                        }
                        return Ok(LockGuard {
                            locks: self.clone(),
                            key: deploy_to.to_path_buf(),
                            file: lock_file,
                            info,
                        });
                    }
                    Some(holder) => {
                        let now = Instant::now();
                        if now >= deadline {
                            return Err(holder.clone());
                        }
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), freed).await;
        }
    }

    pub fn holder(&self, deploy_to: &Path) -> Option<LockInfo> {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(deploy_to)
            .cloned()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        self.locks
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        self.locks.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(who: &str) -> LockInfo {
        LockInfo {
            holder: who.into(),
            version: None,
            since: "now".into(),
        }
    }

    #[tokio::test]
    async fn second_taker_sees_the_holder_and_gets_it_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".deploy/lock");
        let locks = Arc::new(Locks::default());
        let app = dir.path();
        let a = locks
            .acquire(app, file.clone(), info("alice"), Duration::ZERO)
            .await
            .unwrap();
        assert!(file.exists());
        let err = locks
            .acquire(app, file.clone(), info("bob"), Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(err.holder, "alice");
        // bob waits; alice lets go after 100 ms
        let l3 = locks.clone();
        let f3 = file.clone();
        let app2 = app.to_path_buf();
        let waiter = tokio::spawn(async move {
            let g = l3
                .acquire(&app2, f3, info("bob"), Duration::from_secs(5))
                .await;
            g.map(|g| g.info.holder.clone())
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(a);
        assert_eq!(waiter.await.unwrap().unwrap(), "bob");
        assert!(
            locks.holder(app).is_none(),
            "bob's guard dropped with the task"
        );
        assert!(!file.exists());
    }

    #[tokio::test]
    async fn waiting_gives_up_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lock");
        let locks = Arc::new(Locks::default());
        let _a = locks
            .acquire(dir.path(), file.clone(), info("alice"), Duration::ZERO)
            .await
            .unwrap();
        let started = Instant::now();
        let err = locks
            .acquire(dir.path(), file, info("bob"), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(err.holder, "alice");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}

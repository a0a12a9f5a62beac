//! A sliding window over a fleet: at most `max_parallel` hosts at work at once, each on its
//! own task on the multi-threaded runtime, and a new one started as soon as one ends (not
//! in fixed waves, where one slow host holds its whole wave).
//!
//! A host's connection moves into its task and comes back with the result, so what a host
//! holds while it works (its upload's chunks, its frames) lives only as long as its task:
//! the controller's memory follows the window, not the number of hosts.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;

use proto::Rpc;

use crate::client::ClientError;
use crate::transport::HostConn;

/// How often a connection that waits for its turn tells its agent it is alive; well under
/// the agent's shortest sensible `idle_timeout_secs`.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(20);

/// Tasks, at most `limit` of them running at once.
pub struct Window<T> {
    set: JoinSet<T>,
    limit: usize,
}

impl<T: Send + 'static> Window<T> {
    /// A window of `limit` tasks (at least one).
    pub fn new(limit: usize) -> Self {
        Self {
            set: JoinSet::new(),
            limit: limit.max(1),
        }
    }

    /// Whether another task may start now.
    pub fn has_room(&self) -> bool {
        self.set.len() < self.limit
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// How many tasks run now.
    pub fn running(&self) -> usize {
        self.set.len()
    }

    /// Starts `job` on its own task. The caller checks [`Window::has_room`] first.
    pub fn spawn(&mut self, job: impl Future<Output = T> + Send + 'static) {
        debug_assert!(self.has_room());
        self.set.spawn(job);
    }

    /// The next task to end, as soon as it ends; `None` when none runs. A task that
    /// panicked panics here, as it would have without its own task.
    pub async fn next(&mut self) -> Option<T> {
        match self.set.join_next().await? {
            Ok(v) => Some(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Tasks are only cancelled when the window is dropped.
            Err(e) => unreachable!("a window task was cancelled: {e}"),
        }
    }
}

/// Runs `job` on every item, at most `limit` at once, each on its own task; the results
/// come back in the items' order.
pub async fn map<I, R, F, Fut>(items: Vec<I>, limit: usize, mut job: F) -> Vec<R>
where
    I: Send + 'static,
    R: Send + 'static,
    F: FnMut(I) -> Fut,
    Fut: Future<Output = R> + Send + 'static,
{
    let n = items.len();
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    let mut window = Window::new(limit);
    let mut queue = items.into_iter().enumerate();
    loop {
        while window.has_room() {
            let Some((i, item)) = queue.next() else { break };
            let fut = job(item);
            window.spawn(async move { (i, fut.await) });
        }
        match window.next().await {
            Some((i, r)) => out[i] = Some(r),
            None => break,
        }
    }
    out.into_iter()
        .map(|r| r.expect("every item's task ran"))
        .collect()
}

/// Runs `job` on the hosts at the indices `which` of `conns`, in that order, at most `limit`
/// at once, each on its own task with its connection moved in (the job hands it back with
/// its result). `done` takes each result as it comes, and returns false to start no more
/// hosts (those running finish). The hosts not at work (waiting for their turn, or done)
/// hold their locks on idle sessions: they are pinged every
/// [`KEEPALIVE_EVERY`] meanwhile, or their agents would close them.
pub async fn hosts<R, J, Fut>(
    conns: &mut Vec<HostConn>,
    which: &[usize],
    limit: usize,
    mut job: J,
    done: impl FnMut(usize, R) -> bool,
) where
    R: Send + 'static,
    J: FnMut(usize, HostConn) -> Fut,
    Fut: Future<Output = (HostConn, R)> + Send + 'static,
{
    let mut slots: Vec<Option<HostConn>> = conns.drain(..).map(Some).collect();
    slot_hosts(
        &mut slots,
        which,
        limit,
        |i, c| {
            let fut = job(i, c);
            async move {
                let (c, r) = fut.await;
                (Some(c), r)
            }
        },
        done,
    )
    .await;
    conns.extend(slots.into_iter().flatten());
}

/// Like [`hosts`], over `slots` (a host's index stays its index): a job that hands back
/// `None` has closed its host's connection, which frees what the connection held (its
/// buffers, its SSH session) as soon as the host is done instead of at the end of the
/// command. A slot already empty is skipped.
pub async fn slot_hosts<R, J, Fut>(
    slots: &mut [Option<HostConn>],
    which: &[usize],
    limit: usize,
    mut job: J,
    mut done: impl FnMut(usize, R) -> bool,
) where
    R: Send + 'static,
    J: FnMut(usize, HostConn) -> Fut,
    Fut: Future<Output = (Option<HostConn>, R)> + Send + 'static,
{
    let mut window = Window::new(limit);
    let mut queue = which.iter().copied();
    let mut more = true;
    let every = KEEPALIVE_EVERY;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while more && window.has_room() {
            let Some(i) = queue.next() else { break };
            // An index twice in `which`: its host is already at work or done.
            let Some(c) = slots.get_mut(i).and_then(Option::take) else {
                continue;
            };
            let fut = job(i, c);
            window.spawn(async move { (i, fut.await) });
        }
        if window.is_empty() {
            break;
        }
        let ended = tokio::select! {
            r = window.next() => r,
            _ = tick.tick() => {
                keep_alive(slots).await;
                continue;
            }
        };
        let Some((i, (c, r))) = ended else { break };
        slots[i] = c;
        more = done(i, r) && more;
    }
}

/// Sends `request(host)` to every host, at most `limit` at once, and waits for each answer
/// for at most `within` (`None`: the connection's own limit); the answers come back in
/// the hosts' order.
pub async fn call_all<Q>(
    conns: &mut Vec<HostConn>,
    limit: usize,
    within: Option<Duration>,
    request: impl Fn(&HostConn) -> Q,
) -> Vec<Result<Q::Response, ClientError>>
where
    Q: Rpc + Send + 'static,
    Q::Response: Send + 'static,
{
    let mut out: Vec<Option<Result<Q::Response, ClientError>>> =
        (0..conns.len()).map(|_| None).collect();
    let all: Vec<usize> = (0..conns.len()).collect();
    hosts(
        conns,
        &all,
        limit,
        |_, mut c| {
            let q = request(&c);
            async move {
                let within = within.unwrap_or_else(|| c.client.reply_timeout());
                let r = c.client.call_within(q, within, |_| {}).await;
                (c, r)
            }
        },
        |i, r| {
            out[i] = Some(r);
            true
        },
    )
    .await;
    out.into_iter()
        .map(|r| r.expect("every host was asked"))
        .collect()
}

/// Pings every idle host's agent, all at once.
async fn keep_alive(slots: &mut [Option<HostConn>]) {
    futures_util::future::join_all(slots.iter_mut().flatten().map(|c| c.client.keepalive())).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_than_the_limit_and_results_in_order() {
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let out = map((0..9u64).collect(), 3, |i| {
            let (now, peak) = (now.clone(), peak.clone());
            async move {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                for _ in 0..(9 - i) {
                    tokio::task::yield_now().await;
                }
                now.fetch_sub(1, Ordering::SeqCst);
                i * 2
            }
        })
        .await;
        assert_eq!(out, (0..9).map(|i| i * 2).collect::<Vec<_>>());
        let peak = peak.load(Ordering::SeqCst);
        assert!((1..=3).contains(&peak), "{peak} at once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_item_does_not_hold_the_others() {
        // Item 0 ends only after item 3 ran: with fixed waves of 2, item 3 would start
        // only after item 0 ended, and item 0 gives up.
        let gate = Arc::new(tokio::sync::Notify::new());
        let out = map((0..4u64).collect(), 2, |i| {
            let gate = gate.clone();
            async move {
                match i {
                    0 => tokio::time::timeout(Duration::from_secs(10), gate.notified())
                        .await
                        .is_ok(),
                    3 => {
                        gate.notify_one();
                        true
                    }
                    _ => true,
                }
            }
        })
        .await;
        assert_eq!(out, vec![true; 4], "item 0 waited for item 3 in vain");
    }

    #[tokio::test]
    async fn an_empty_list_is_no_work() {
        let out: Vec<u8> = map(Vec::<u8>::new(), 4, |i| async move { i }).await;
        assert!(out.is_empty());
    }
}

//! A wake-up for one waiting task that needs no future to wait with.
//!
//! `tokio::sync::Notify` makes its waiter hold a `Notified` future (64 bytes) for as long as it
//! waits; a connection task waiting on several of them carries all of them, for every idle
//! connection. A [`Signal`] is polled instead (`poll` registers the task's waker), so a task
//! can wait on many with one hand-written `poll_fn` and nothing stored between polls. Like
//! `Notify::notify_one`, a notification with nobody waiting is kept as a permit, so a
//! notification between the waiter's last check and its next poll is not missed.

use std::fmt;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct Signal {
    state: Mutex<Wakeup>,
    /// The state's permit: read and written only under its lock (see [`Wakeup`]).
    permit: AtomicBool,
}

/// A signal's state without its lock, for a holder that keeps it under a lock of its own (an
/// outbox, under its items' lock): the waker. The permit is the holder's too, an `AtomicBool`
/// it reads and writes only under that lock (so `Relaxed` is enough), where it has room for one:
/// beside the waker it took 8 bytes, and an outbox's fill 16 (jemalloc's 112 class for a direct
/// sink with its `Arc`'s counts, the 96 with the permit among its counters; issue 18).
#[derive(Debug, Default)]
pub(crate) struct Wakeup {
    waker: Option<Waker>,
}

impl Wakeup {
    /// Leaves the permit; returns the waiting task's waker, to wake once the lock is let go.
    pub(crate) fn notify(&mut self, permit: &AtomicBool) -> Option<Waker> {
        permit.store(true, Ordering::Relaxed);
        self.waker.take()
    }

    /// `Ready` (taking the permit) once notified; otherwise `cx`'s task is the one woken next.
    pub(crate) fn poll(&mut self, permit: &AtomicBool, cx: &mut Context<'_>) -> Poll<()> {
        // A load and a store, not a swap: under the lock nothing else writes it, and a swap is
        // a locked instruction on every poll.
        if permit.load(Ordering::Relaxed) {
            permit.store(false, Ordering::Relaxed);
            return Poll::Ready(());
        }
        match &self.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => self.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl fmt::Debug for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signal").field("permit", &self.permit.load(Ordering::Relaxed)).finish()
    }
}

impl Signal {
    pub fn new() -> Signal {
        Signal::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Wakeup> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the waiting task, or leaves a permit for its next poll.
    pub fn notify(&self) {
        let waker = self.lock().notify(&self.permit);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// `Ready` (taking the permit) once notified; otherwise the task is woken by the next
    /// [`Signal::notify`]. One task waits on a signal: a poll from another replaces its waker.
    pub fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.lock().poll(&self.permit, cx)
    }

    /// Resolves once notified (at once if a permit is stored).
    pub async fn notified(&self) {
        poll_fn(|cx| self.poll(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_notification_before_waiting_is_kept_once() {
        let s = Signal::new();
        s.notify();
        s.notify();
        tokio::time::timeout(Duration::from_secs(5), s.notified()).await.expect("permit kept");
        // Two notifications make one permit.
        assert!(tokio::time::timeout(Duration::from_millis(20), s.notified()).await.is_err());
    }

    #[tokio::test]
    async fn a_waiting_task_is_woken() {
        let s = Arc::new(Signal::new());
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.notified().await }
        });
        tokio::task::yield_now().await;
        s.notify();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").unwrap();
    }
}

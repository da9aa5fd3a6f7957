//! The broker's one timer for queue deadlines: the head message's TTL (`x-message-ttl`,
//! per-message `expiration`) and a queue's `x-expires`.
//!
//! There is no timer per message or per queue. A queue reports a deadline in its
//! [`Effects`](crate::queue::Effects) only when it is earlier than the last one it reported
//! (the head changed, a message arrived at an empty queue, the last consumer left); the vhost
//! hands it to [`Timer::arm`], which costs one atomic `fetch_min` and wakes the housekeeping
//! task only when the deadline is earlier than the one it sleeps until. The housekeeping task
//! ([`Broker::run_housekeeping`](crate::broker::Broker::run_housekeeping)) then expires what is
//! due in every queue and sleeps until the earliest deadline the queues report, or until woken.
//!
//! No wake-up is lost: the task [`Timer::start_round`]s before it asks the queues, so a deadline
//! armed while it asks is kept, and `Notify` keeps one permit for a wake-up that comes while it
//! is not waiting yet.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::message::Millis;

/// See the module documentation.
#[derive(Debug)]
pub struct Timer {
    /// The earliest deadline armed since the current round started (`u64::MAX`: none).
    next: AtomicU64,
    wake: Notify,
}

impl Default for Timer {
    fn default() -> Timer {
        Timer { next: AtomicU64::new(u64::MAX), wake: Notify::new() }
    }
}

impl Timer {
    pub fn new() -> Timer {
        Timer::default()
    }

    /// Something is due at `deadline`: wakes the housekeeping task if it sleeps until later.
    pub fn arm(&self, deadline: Millis) {
        if deadline < self.next.fetch_min(deadline, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// The earliest deadline armed in this round.
    pub fn next(&self) -> Option<Millis> {
        Some(self.next.load(Ordering::Acquire)).filter(|&d| d != u64::MAX)
    }

    /// Starts a round: what was armed is forgotten, as the round asks every queue again. Call it
    /// before asking them.
    pub fn start_round(&self) {
        self.next.store(u64::MAX, Ordering::Release);
    }

    /// Records the deadline the queues reported in this round, without a wake-up (the caller
    /// is the task that would be woken).
    pub fn end_round(&self, deadline: Option<Millis>) {
        if let Some(d) = deadline {
            self.next.fetch_min(d, Ordering::AcqRel);
        }
    }

    /// Resolves when an earlier deadline was armed (at once if one was armed since the last
    /// wake-up).
    pub async fn woken(&self) {
        self.wake.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    /// Whether the task would be woken now: one poll of `woken`, no clock.
    fn woken_now(t: &Timer) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        matches!(pin!(t.woken()).poll(&mut cx), Poll::Ready(()))
    }

    #[test]
    fn only_an_earlier_deadline_wakes_the_task() {
        let t = Timer::new();
        t.start_round();
        t.end_round(Some(1_000));
        assert!(!woken_now(&t), "nothing armed yet");
        t.arm(1_500);
        assert!(!woken_now(&t), "a later deadline does not wake it");
        assert_eq!(t.next(), Some(1_000));
        t.arm(200);
        assert_eq!(t.next(), Some(200));
        assert!(woken_now(&t), "an earlier one does");
        assert!(!woken_now(&t), "once");
    }

    #[test]
    fn a_deadline_armed_during_a_round_is_kept() {
        let t = Timer::new();
        t.start_round();
        t.arm(300); // a publish while the task asks the queues
        t.end_round(Some(900));
        assert_eq!(t.next(), Some(300));
        assert!(woken_now(&t));
        t.start_round();
        assert_eq!(t.next(), None);
        t.end_round(None);
        assert_eq!(t.next(), None);
    }
}

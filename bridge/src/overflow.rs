//! Overflow of a bridge's local queue, logged once per episode rather than once per message.
//!
//! The core drops (`drop-head`), refuses or holds (`block`: refused when the publisher waits for
//! no acknowledgement, taken with the acknowledgement withheld when it does) on the publisher's
//! path and counts it in the queue's stats; a publisher flooding a bridge whose remote is down
//! would otherwise give one log line per message. [`OverflowWatch`] turns the counters into episodes: one line
//! when the queue starts overflowing (by either limit), one when it has drained below 90 % of
//! its limits again, with what the episode cost. [`watch`] samples the queue once a second.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::frontend::Shutdown;
use ferry_core::queue::{Queue, QueueStats};
use tracing::{info, warn};

/// How often the queue's counters are looked at: an episode is logged at most this late.
pub const SAMPLE: Duration = Duration::from_secs(1);

/// What one sample says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverflowEvent {
    /// The queue started overflowing: messages were dropped, refused or held since the last
    /// sample.
    Started { dropped: u64, rejected: u64, held: u64, queued: u64, queued_bytes: u64 },
    /// The queue is below 90 % of its limits again; what was dropped, refused and held in the
    /// episode, in all.
    Ended { dropped: u64, rejected: u64, held: u64 },
}

/// The episode state of one queue, fed with its stats (no clock, no I/O).
#[derive(Debug, Clone)]
pub struct OverflowWatch {
    max_messages: Option<u64>,
    max_bytes: Option<u64>,
    /// The counters at the last sample.
    dropped: u64,
    rejected: u64,
    held: u64,
    /// The counters when the current episode started.
    episode: Option<(u64, u64, u64)>,
}

impl OverflowWatch {
    /// Starts from the queue's counters now (what an earlier run counted is not an episode).
    pub fn new(max_messages: Option<u64>, max_bytes: Option<u64>, stats: &QueueStats) -> OverflowWatch {
        OverflowWatch {
            max_messages,
            max_bytes,
            dropped: stats.dropped_overflow,
            rejected: stats.rejected_overflow,
            held: stats.held_overflow,
            episode: None,
        }
    }

    /// Whether the queue has drained below 90 % of each limit (hysteresis: a queue hovering at
    /// its limit is one episode, not one per message).
    fn has_room(&self, stats: &QueueStats) -> bool {
        let below = |value: u64, max: Option<u64>| max.is_none_or(|m| value.saturating_mul(10) < m.saturating_mul(9));
        below(u64::from(stats.ready), self.max_messages) && below(stats.ready_bytes, self.max_bytes)
    }

    pub fn observe(&mut self, stats: &QueueStats) -> Option<OverflowEvent> {
        let grew = stats.dropped_overflow > self.dropped
            || stats.rejected_overflow > self.rejected
            || stats.held_overflow > self.held;
        let before = (self.dropped, self.rejected, self.held);
        self.dropped = stats.dropped_overflow;
        self.rejected = stats.rejected_overflow;
        self.held = stats.held_overflow;
        match self.episode {
            None if grew => {
                self.episode = Some(before);
                Some(OverflowEvent::Started {
                    dropped: self.dropped - before.0,
                    rejected: self.rejected - before.1,
                    held: self.held - before.2,
                    queued: u64::from(stats.ready),
                    queued_bytes: stats.ready_bytes,
                })
            }
            Some(start) if !grew && self.has_room(stats) => {
                self.episode = None;
                Some(OverflowEvent::Ended {
                    dropped: self.dropped - start.0,
                    rejected: self.rejected - start.1,
                    held: self.held - start.2,
                })
            }
            _ => None,
        }
    }
}

/// Samples `queue` every [`SAMPLE`] and logs its overflow episodes, until `shutdown`.
pub(crate) async fn watch(who: String, queue: Arc<Queue>, mut shutdown: Shutdown) {
    let args = queue.args();
    let (max_messages, max_bytes) = (args.max_length, args.max_length_bytes);
    if max_messages.is_none() && max_bytes.is_none() {
        return;
    }
    let limits = match (max_messages, max_bytes) {
        (Some(m), Some(b)) => format!("{m} messages / {b} bytes"),
        (Some(m), None) => format!("{m} messages"),
        (None, Some(b)) => format!("{b} bytes"),
        (None, None) => unreachable!("returned above"),
    };
    let mut w = OverflowWatch::new(max_messages, max_bytes, &queue.stats());
    let mut tick = tokio::time::interval(SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        match w.observe(&queue.stats()) {
            Some(OverflowEvent::Started { dropped, rejected, held, queued, queued_bytes }) => warn!(
                bridge = %who,
                "{who}: local queue {} full ({queued} messages, {queued_bytes} bytes; limit {limits}): \
                 {} (so far {dropped} dropped, {rejected} refused, {held} held)",
                queue.name(),
                if rejected > 0 || held > 0 {
                    "holding the acknowledgements of publishers that wait for one, refusing the others (overflow = block)"
                } else {
                    "dropping the oldest"
                },
            ),
            Some(OverflowEvent::Ended { dropped, rejected, held }) => info!(
                bridge = %who,
                "{who}: local queue {} has room again; the overflow dropped {dropped}, refused {rejected} and \
                 held {held} messages",
                queue.name(),
            ),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(ready: u32, ready_bytes: u64, dropped: u64, rejected: u64) -> QueueStats {
        QueueStats {
            ready,
            ready_bytes,
            dropped_overflow: dropped,
            rejected_overflow: rejected,
            ..QueueStats::default()
        }
    }
    fn held(ready: u32, held: u64) -> QueueStats {
        QueueStats { ready, held_overflow: held, ..QueueStats::default() }
    }

    #[test]
    fn an_episode_is_reported_once_when_it_starts_and_once_when_it_ends() {
        let mut w = OverflowWatch::new(Some(10), None, &stats(0, 0, 0, 0));
        assert_eq!(w.observe(&stats(5, 50, 0, 0)), None);
        assert_eq!(
            w.observe(&stats(10, 100, 3, 0)),
            Some(OverflowEvent::Started { dropped: 3, rejected: 0, held: 0, queued: 10, queued_bytes: 100 })
        );
        // Still overflowing, then full and quiet: the same episode, nothing new to say.
        assert_eq!(w.observe(&stats(10, 100, 40, 0)), None);
        assert_eq!(w.observe(&stats(10, 100, 40, 0)), None);
        // Drained, but only to the limit's 90 %: still the episode.
        assert_eq!(w.observe(&stats(9, 90, 40, 0)), None);
        assert_eq!(w.observe(&stats(8, 80, 40, 0)), Some(OverflowEvent::Ended { dropped: 40, rejected: 0, held: 0 }));
        assert_eq!(w.observe(&stats(0, 0, 40, 0)), None);
    }

    #[test]
    fn the_bytes_limit_counts_and_refusals_are_told_apart() {
        let mut w = OverflowWatch::new(None, Some(1000), &stats(0, 0, 0, 0));
        assert_eq!(
            w.observe(&stats(3, 990, 0, 2)),
            Some(OverflowEvent::Started { dropped: 0, rejected: 2, held: 0, queued: 3, queued_bytes: 990 })
        );
        // Few messages, but still most of the bytes.
        assert_eq!(w.observe(&stats(1, 950, 0, 2)), None);
        assert_eq!(w.observe(&stats(1, 100, 0, 2)), Some(OverflowEvent::Ended { dropped: 0, rejected: 2, held: 0 }));
    }

    #[test]
    fn counts_from_before_the_watch_started_are_no_episode() {
        let mut w = OverflowWatch::new(Some(10), None, &stats(10, 0, 7, 0));
        assert_eq!(w.observe(&stats(10, 0, 7, 0)), None);
        assert!(matches!(w.observe(&stats(10, 0, 8, 0)), Some(OverflowEvent::Started { dropped: 1, .. })));
    }

    #[test]
    fn a_new_overflow_after_the_end_is_a_new_episode() {
        let mut w = OverflowWatch::new(Some(10), None, &stats(0, 0, 0, 0));
        assert!(w.observe(&stats(10, 0, 1, 0)).is_some());
        assert!(matches!(w.observe(&stats(0, 0, 1, 0)), Some(OverflowEvent::Ended { .. })));
        assert!(matches!(w.observe(&stats(10, 0, 3, 0)), Some(OverflowEvent::Started { dropped: 2, .. })));
    }

    #[test]
    fn held_publishers_make_an_episode_too() {
        let mut w = OverflowWatch::new(Some(10), None, &held(0, 0));
        assert_eq!(
            w.observe(&held(12, 2)),
            Some(OverflowEvent::Started { dropped: 0, rejected: 0, held: 2, queued: 12, queued_bytes: 0 })
        );
        assert_eq!(w.observe(&held(13, 3)), None);
        assert_eq!(w.observe(&held(5, 3)), Some(OverflowEvent::Ended { dropped: 0, rejected: 0, held: 3 }));
    }
}

//! What a bridge reports about itself: [`BridgeStatus`], read through
//! [`Bridges::status`](crate::Bridges::status).

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

/// Where a bridge's link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Connecting (TCP, CONNECT, CONNACK).
    Connecting,
    /// Connected: messages flow.
    Up,
    /// The last attempt or connection failed ([`BridgeStatus::last_error`]); waiting to retry.
    BackingOff,
    /// Not running (shut down, a `start_type = "once"` link that failed, or the local queue
    /// could not be consumed).
    Stopped,
    /// A `start_type = "lazy"` link, disconnected until enough messages wait.
    Idle,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::BackingOff => "backing off",
            LinkState::Stopped => "stopped",
            LinkState::Idle => "idle",
        }
    }
}

/// A snapshot of one bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeStatus {
    pub name: String,
    /// The remote's `host:port` in use (connected, or being tried), as configured: one of
    /// the bridge's addresses.
    pub remote: String,
    pub state: LinkState,
    /// When it entered that state (ms since the epoch).
    pub since: u64,
    /// Why the link last went down or a connect failed; cleared when it comes up (a refused
    /// subscription sets it while up).
    pub last_error: Option<String>,
    /// Messages waiting in the local queue (not yet handed to the link).
    pub queued: u64,
    /// Bytes of message bodies waiting in the local queue.
    pub queued_bytes: u64,
    /// Messages handed to the link and not yet acknowledged by the remote.
    pub in_flight: u64,
    /// Sent to the remote and acknowledged by it (QoS 0: written).
    pub forwarded_out: u64,
    /// Received from the remote and published locally.
    pub forwarded_in: u64,
    /// Dropped from the local queue by `max_queued_messages` (`drop-oldest`).
    pub dropped_overflow: u64,
    /// Refused by the local queue at its limits (`block`, publishers that wait for no
    /// acknowledgement: MQTT QoS 0, AMQP without confirms).
    pub rejected_overflow: u64,
    /// Taken by the local queue past its limits with the publisher's acknowledgement withheld
    /// until it had room (`block`, MQTT QoS 1/2, AMQP with confirms).
    pub held_overflow: u64,
    /// Not forwarded: they had crossed `max_hops` bridges already.
    pub dropped_max_hops: u64,
    /// Not forwarded: they came in over this link (an `out` rule overlapping an `in` rule).
    pub dropped_loop: u64,
    /// Not forwarded: no rule covers their topic any more (queued under a rule that a later
    /// config removed; its binding goes at that start, what it queued before is dropped).
    pub dropped_no_rule: u64,
    /// Refused by the remote (an MQTT 5.0 PUBACK / PUBREC reason code 0x80 or above).
    pub dropped_refused: u64,
    /// `dropped_refused` by the remote's reason code, lowest code first (0x87 not authorized,
    /// 0x97 quota exceeded, 0x99 payload format invalid, …).
    pub dropped_refused_by_reason: Vec<(u8, u64)>,
    /// Publishes the remote refused with a basic.nack (AMQP shovels): they go again, in order,
    /// on the next connection.
    pub nacked: u64,
    /// Not forwarded: larger than the remote accepts (a 5.0 remote's Maximum Packet Size), or
    /// a message the remote closed the link on, again and again (see docs/bridges.md).
    pub dropped_too_large: u64,
    /// Connections established since the start.
    pub connects: u64,
    /// Connection attempts since the start, failed ones included.
    pub attempts: u64,
}

/// The link's counters; relaxed atomics, read for [`BridgeStatus`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub forwarded_out: AtomicU64,
    pub forwarded_in: AtomicU64,
    pub dropped_max_hops: AtomicU64,
    pub dropped_loop: AtomicU64,
    pub dropped_no_rule: AtomicU64,
    pub dropped_refused: AtomicU64,
    /// `dropped_refused` by reason code (at most the 128 codes from 0x80).
    pub refused_by_reason: std::sync::Mutex<std::collections::BTreeMap<u8, u64>>,
    pub nacked: AtomicU64,
    pub dropped_too_large: AtomicU64,
    pub connects: AtomicU64,
    pub attempts: AtomicU64,
}

impl Counters {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// The state and last error, in a watch channel so that a caller can wait for a change, and
/// when the state last changed (ms since the epoch).
#[derive(Debug)]
pub(crate) struct StateCell(watch::Sender<(LinkState, Option<String>)>, AtomicU64);

impl StateCell {
    pub fn new() -> StateCell {
        StateCell(watch::Sender::new((LinkState::Connecting, None)), AtomicU64::new(ferry_core::message::now_millis()))
    }

    /// Sets the state; an error replaces the last one, `None` keeps it unless the link is up.
    pub fn set(&self, state: LinkState, error: Option<String>) {
        self.0.send_modify(|g| {
            if g.0 != state {
                self.1.store(ferry_core::message::now_millis(), Ordering::Relaxed);
            }
            g.0 = state;
            if error.is_some() || state == LinkState::Up {
                g.1 = error;
            }
        });
    }

    pub fn set_error(&self, error: String) {
        self.0.send_modify(|g| g.1 = Some(error));
    }

    pub fn get(&self) -> (LinkState, Option<String>) {
        self.0.borrow().clone()
    }

    /// When the state last changed (ms since the epoch).
    pub fn since(&self) -> u64 {
        self.1.load(Ordering::Relaxed)
    }

    pub fn subscribe(&self) -> watch::Receiver<(LinkState, Option<String>)> {
        self.0.subscribe()
    }
}

/// A bridge's or shovel's status now: its state cell, its backlog's stats (none without a
/// local queue) and its counters.
pub(crate) fn snapshot(
    name: &str,
    remote: String,
    cell: &StateCell,
    queue: Option<&std::sync::Arc<ferry_core::queue::Queue>>,
    c: &Counters,
) -> BridgeStatus {
    let (state, last_error) = cell.get();
    let stats = queue.map(|q| q.stats()).unwrap_or_default();
    BridgeStatus {
        name: name.to_string(),
        remote,
        state,
        since: cell.since(),
        last_error,
        queued: u64::from(stats.ready),
        queued_bytes: stats.ready_bytes,
        in_flight: u64::from(stats.unacked),
        forwarded_out: Counters::get(&c.forwarded_out),
        forwarded_in: Counters::get(&c.forwarded_in),
        dropped_overflow: stats.dropped_overflow,
        rejected_overflow: stats.rejected_overflow,
        held_overflow: stats.held_overflow,
        dropped_max_hops: Counters::get(&c.dropped_max_hops),
        dropped_loop: Counters::get(&c.dropped_loop),
        dropped_no_rule: Counters::get(&c.dropped_no_rule),
        dropped_refused: Counters::get(&c.dropped_refused),
        dropped_refused_by_reason: c
            .refused_by_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(code, n)| (*code, *n))
            .collect(),
        nacked: Counters::get(&c.nacked),
        dropped_too_large: Counters::get(&c.dropped_too_large),
        connects: Counters::get(&c.connects),
        attempts: Counters::get(&c.attempts),
    }
}

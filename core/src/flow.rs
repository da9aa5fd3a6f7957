//! Publisher flow control, written once for every frontend, without I/O and without a clock.
//!
//! A connection that publishes is held back — stops reading its socket *and* stops decoding
//! what it has already read — while any of these holds:
//!
//! - **its publish rate** (`max_publish_rate`, a [`TokenBucket`], one token per publish): a
//!   publish taken on credit is served, then the connection waits until the debt is paid;
//! - **a congested target** ([`Target`]): a subscriber it published to took the message over its
//!   outbox's capacity ([`Offer::Congested`](crate::sink::Offer)), or a queue it published to
//!   falls behind its consumers ([`Effects::congested`](crate::queue::Effects)); the connection
//!   waits for that target to have room, at most [`CONGESTION_PAUSE`], and tells it how long
//!   that took ([`Outbox::waited`], [`Queue::waited`]), so one that does not keep up is found
//!   lagging and holds nobody back any more (see [`crate::sink`] and [`crate::queue`]);
//! - **an alarm** (memory, or disk where the protocol has no better answer), once the
//!   connection has published at all: consumers keep draining;
//! - **acknowledgements waiting for the store**: [`MAX_PENDING_ACKS`] of them.
//!
//! The rule for when decoding stops is the same for every protocol: at the first publish that
//! runs into debt or finds a target congested ([`Decode::Stop`]). The rest of what was read stays
//! in the connection's buffer, in order, and is decoded once the hold is over: however large a
//! read, a publisher cannot overrun a congested subscriber past the point where it drops
//! messages.
//!
//! [`PublisherFlow`] is fed events and the time (`now`) by the connection's task, which owns
//! the waiting: it sleeps until [`PublisherFlow::next_wakeup`], waits for
//! [`PublisherFlow::congested_target`] to have room, watches the alarms, then calls
//! [`PublisherFlow::update`] again. The pause accounting ([`Pause`]) tells the driver when it
//! stops reading and, when it starts again, for how long it did not, so that its own silence
//! does not count against the client's keep alive or heartbeats.
//!
//! [`AckQueue`] is the other half: a publish's acknowledgement (PUBACK, PUBREC, a publisher
//! confirm) leaves only after its store commit, and in the order the publishes came, whatever
//! order their commits finish in.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::message::Millis;
use crate::queue::Queue;
use crate::rate::TokenBucket;
use crate::sink::{DirectSink, Outbox, SinkDelivery};
use crate::store::{Commit, StoreError};

pub use crate::sink::CONGESTION_PAUSE;

/// While this many acknowledgements wait for the store, the connection stops reading (the
/// publisher is slowed instead of buffered).
pub const MAX_PENDING_ACKS: usize = 1024;

/// What a publish went to that holds its publisher back until it has room: the same pause, the
/// same lagging rule, for both.
#[derive(Debug, Clone)]
pub enum Target {
    /// A direct sink's outbox past its capacity ([`crate::sink`]).
    Sink(Arc<DirectSink>),
    /// A queue past its backlog mark with consumers that pace publishers ([`crate::queue`]).
    Queue(Arc<Queue>),
}

impl Target {
    pub fn has_room(&self) -> bool {
        match self {
            Target::Sink(s) => s.outbox().has_room(),
            Target::Queue(q) => q.has_room(),
        }
    }
    /// How many times it has drained something (a queue: deliveries).
    pub fn drains(&self) -> u64 {
        match self {
            Target::Sink(s) => s.outbox().drains(),
            Target::Queue(q) => q.drains(),
        }
    }
    /// A publisher waited this long for it: whether it is lagging now
    /// ([`Outbox::waited`], [`Queue::waited`]).
    pub fn waited(&self, got_room: bool, waited: Duration, drains: u64, now_ms: Millis) -> bool {
        match self {
            Target::Sink(s) => s.outbox().waited(got_room, waited, drains, now_ms),
            Target::Queue(q) => q.waited(got_room, waited, drains, now_ms),
        }
    }
    /// Resolves once it has room.
    pub async fn room(&self) {
        match self {
            Target::Sink(s) => s.outbox().room().await,
            Target::Queue(q) => q.room().await,
        }
    }
    /// Whether this is `outbox`.
    pub fn is_outbox(&self, outbox: &Outbox<SinkDelivery>) -> bool {
        matches!(self, Target::Sink(s) if std::ptr::eq(s.outbox(), outbox))
    }
}

/// Whether to go on decoding what has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decode {
    Go,
    /// The connection is held back: what is left in the buffer waits.
    Stop,
    /// Go on, after letting the other tasks run: the connection publishes into a queue that
    /// held it back, and shares the room the queue makes with that queue's other publishers
    /// ([`FAIR_BATCH`]).
    Yield,
}

/// A connection that a queue has held back yields to the other tasks after this many publishes
/// decoded in a row ([`Decode::Yield`]). When a queue lets its publishers go, the first to run
/// would otherwise decode all it has buffered and take all the room the queue made (2,048
/// messages), and the others would wait for the next round: with 16 publishers into one queue
/// that made the latency of the unlucky ones' messages several rounds long.
pub const FAIR_BATCH: u8 = 32;

/// A change in whether the connection reads, for the driver's keep alive or heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Reading stopped now.
    Started,
    /// Reading goes on after a pause this long.
    Ended(Duration),
}

/// The congested target being waited for.
#[derive(Debug)]
struct Hold {
    target: Target,
    since: Instant,
    /// The target's drain count when the wait started ([`Outbox::drains`]).
    drains: u64,
}

/// One connection's publisher flow control (see the module's documentation).
#[derive(Debug)]
pub struct PublisherFlow {
    /// `None`: no publish rate limit. Boxed, as `hold` is: most connections have neither, and
    /// every connection carries this struct (at 10,000 idle connections, bytes count).
    bucket: Option<Box<TokenBucket>>,
    /// In debt to the bucket until then.
    throttled_until: Option<Instant>,
    /// Targets found congested since the last wait for one ended.
    congested: Vec<Target>,
    hold: Option<Box<Hold>>,
    /// Whether an alarm at the disk holds this connection back (an MQTT 5.0 client is refused
    /// QoS 1/2 publishes with 0x97 instead, and goes on reading).
    disk_holds: bool,
    memory_alarm: bool,
    disk_alarm: bool,
    /// The connection has published: alarms hold it back.
    publisher: bool,
    /// Saturated at `u16::MAX` (the limit, [`MAX_PENDING_ACKS`], is far below). Small, like
    /// `batch`: with them the struct stays 80 bytes, and every MQTT connection's state fits
    /// jemalloc's 640-byte class (`mqtt-frontend`'s `the_connection_state_fits_jemallocs_640_class`).
    acks_waiting: u16,
    /// A queue held this connection back together with other connections, and let them go:
    /// from then on it yields every [`FAIR_BATCH`] publishes (`Queue::was_contended`).
    queue_paced: bool,
    /// Publishes decoded since the last yield (while `queue_paced`).
    batch: u8,
    /// Since when the connection has not been reading. (No running total is kept: no driver
    /// reports one, and every connection carries this struct.)
    paused_since: Option<Instant>,
}

impl PublisherFlow {
    /// `max_publish_rate`: publishes per second (and the burst), 0 for no limit. `disk_holds`:
    /// whether the disk alarm holds this connection back (see [`PublisherFlow::alarm_holds`]).
    pub fn new(max_publish_rate: u32, disk_holds: bool, now: Instant) -> PublisherFlow {
        PublisherFlow {
            bucket: (max_publish_rate > 0).then(|| Box::new(TokenBucket::new(max_publish_rate, max_publish_rate, now))),
            throttled_until: None,
            congested: Vec::new(),
            hold: None,
            disk_holds,
            memory_alarm: false,
            disk_alarm: false,
            publisher: false,
            acks_waiting: 0,
            queue_paced: false,
            batch: 0,
            paused_since: None,
        }
    }

    /// A frame or packet was handled: it completed `publishes` publishes (0 for anything else),
    /// whose routing found `congested` targets congested. Says whether to decode the next one.
    /// `now` gives the time; it is asked only when a publish rate is set (the hot path of a
    /// connection without one reads no clock: a clock read per publish was 1.5 % of the
    /// broker's CPU in an AMQP profile).
    pub fn after_publish(
        &mut self,
        publishes: u32,
        congested: impl IntoIterator<Item = Target>,
        now: impl FnOnce() -> Instant,
    ) -> Decode {
        let before = self.congested.len();
        self.congested.extend(congested);
        if publishes == 0 && self.congested.len() == before {
            return Decode::Go;
        }
        self.publisher |= publishes > 0;
        if let (Some(bucket), true) = (self.bucket.as_mut(), publishes > 0) {
            let now = now();
            if let Some(wait) = bucket.take(publishes, now) {
                self.throttled_until = Some(self.throttled_until.map_or(now + wait, |t| t.max(now + wait)));
            }
        }
        if self.throttled_until.is_some() || !self.congested.is_empty() {
            self.batch = 0;
            Decode::Stop
        } else if self.queue_paced && publishes > 0 {
            self.batch = self.batch.saturating_add(u8::try_from(publishes).unwrap_or(u8::MAX));
            if self.batch >= FAIR_BATCH {
                self.batch = 0;
                Decode::Yield
            } else {
                Decode::Go
            }
        } else {
            Decode::Go
        }
    }

    /// The alarms as they are now.
    pub fn set_alarms(&mut self, memory: bool, disk: bool) {
        self.memory_alarm = memory;
        self.disk_alarm = disk;
    }

    /// How many acknowledgements wait for the store ([`AckQueue::len`]).
    pub fn set_acks_waiting(&mut self, n: usize) {
        self.acks_waiting = u16::try_from(n).unwrap_or(u16::MAX);
    }

    /// Whether the connection has published (the alarms hold only publishers).
    pub fn is_publisher(&self) -> bool {
        self.publisher
    }

    /// The connection has published before this state was made (a driver that gave an idle
    /// connection's state back, [`PublisherFlow::is_at_rest`], and made it again).
    pub fn mark_publisher(&mut self) {
        self.publisher = true;
    }

    /// Whether this state holds nothing a new one would not: no publish rate (its bucket
    /// remembers what was spent), no hold, no congested target, no pause, no ack waiting. A
    /// driver may then give it back and make it again when needed, keeping only
    /// [`PublisherFlow::is_publisher`].
    pub fn is_at_rest(&self) -> bool {
        self.bucket.is_none()
            && self.throttled_until.is_none()
            && self.hold.is_none()
            && self.congested.is_empty()
            && self.paused_since.is_none()
            && self.acks_waiting == 0
    }

    /// Whether an alarm holds this connection back now.
    pub fn alarm_holds(&self) -> bool {
        self.publisher && (self.memory_alarm || (self.disk_alarm && self.disk_holds))
    }

    /// Whether an alarm in this state would hold this connection back (for a driver checking
    /// that an alarm did not change before it started watching it).
    pub fn would_hold(&self, memory: bool, disk: bool) -> bool {
        self.publisher && (memory || (disk && self.disk_holds))
    }

    /// Takes stock at `now` (`now_ms`: the same moment on the clock the sinks' lag is kept
    /// in, [`crate::message::now_millis`]): a paid debt ends the rate hold; a congested target
    /// that has room, or whose pause is over, ends the congestion hold, and is told how long it
    /// made us wait; the next congested target (if it still has no room) starts one. Returns a
    /// change in whether the connection reads.
    pub fn update(&mut self, now: Instant, now_ms: Millis) -> Option<Pause> {
        if self.throttled_until.is_some_and(|t| t <= now) {
            self.throttled_until = None;
        }
        if let Some(h) = &self.hold {
            let room = h.target.has_room();
            let waited = now.saturating_duration_since(h.since);
            if room || waited >= CONGESTION_PAUSE {
                let drains = h.target.drains() - h.drains;
                if h.target.waited(room, waited, drains, now_ms) {
                    match &h.target {
                        Target::Sink(s) => tracing::debug!(
                            len = s.outbox().len(),
                            "a subscriber is lagging: its QoS 0 past its outbox is dropped"
                        ),
                        Target::Queue(q) => tracing::debug!(
                            queue = %q.name(),
                            "a queue's consumers are lagging: it holds no publisher back for a while"
                        ),
                    }
                }
                // Released by a queue: take turns with its other publishers from the first
                // time it held others too. A yield lets the other worker steal this
                // connection's task and its consumer's: with one publisher it halved AMQP's
                // auto-ack rate (1→1 steady state: 1.8 µs of broker CPU per delivery against
                // 0.9 without) for no one's benefit.
                if let (true, Target::Queue(q)) = (room, &h.target) {
                    self.queue_paced |= q.was_contended();
                }
                self.hold = None;
                // The wait was for all of them (as long as the longest allowed): those still
                // full are found again by the next publish that goes to them.
                self.congested.clear();
            }
        }
        if self.hold.is_none() {
            self.congested.retain(|o| !o.has_room());
            if let Some(target) = self.congested.first() {
                self.hold = Some(Box::new(Hold { target: target.clone(), since: now, drains: target.drains() }));
            }
        }
        let reading = self.should_read();
        match (reading, self.paused_since) {
            (false, None) => {
                self.paused_since = Some(now);
                Some(Pause::Started)
            }
            (true, Some(since)) => {
                let paused = now.saturating_duration_since(since);
                self.paused_since = None;
                Some(Pause::Ended(paused))
            }
            _ => None,
        }
    }

    /// Whether to read the socket and decode what was read (as of the last
    /// [`PublisherFlow::update`] for the holds that end with time).
    pub fn should_read(&self) -> bool {
        self.throttled_until.is_none()
            && self.hold.is_none()
            && self.congested.is_empty()
            && !self.alarm_holds()
            && (self.acks_waiting as usize) < MAX_PENDING_ACKS
    }

    /// When a hold ends with time (the rate's debt is paid, a congestion pause is over): the
    /// driver calls [`PublisherFlow::update`] then.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let pause_over = self.hold.as_ref().map(|h| h.since + CONGESTION_PAUSE);
        match (self.throttled_until, pause_over) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The congested target being waited for: the driver calls [`PublisherFlow::update`] when
    /// it has room ([`Target::room`]).
    pub fn congested_target(&self) -> Option<&Target> {
        self.hold.as_ref().map(|h| &h.target)
    }

    /// Whether the publish rate holds the connection back.
    pub fn is_throttled(&self) -> bool {
        self.throttled_until.is_some()
    }

    /// Since when the connection has not been reading.
    pub fn paused_since(&self) -> Option<Instant> {
        self.paused_since
    }
}

/// Acknowledgements waiting for their store commits, released in the order they were pushed
/// (see the module's documentation). `A` is what the protocol sends: a packet, a confirm's
/// channel and sequence number.
#[derive(Debug)]
pub struct AckQueue<A> {
    /// Made with the first ack and kept while acks come (an ack per publish would otherwise
    /// allocate it again and again); given back by [`AckQueue::shed`]. Every MQTT session and
    /// AMQP channel holds a queue, and most never push to it: a `VecDeque` inline was 32 bytes
    /// of every idle MQTT connection (issue 18).
    #[allow(clippy::box_collection)]
    entries: Option<Box<VecDeque<(A, Commit)>>>,
}

impl<A> Default for AckQueue<A> {
    fn default() -> AckQueue<A> {
        AckQueue { entries: None }
    }
}

impl<A> AckQueue<A> {
    pub fn new() -> AckQueue<A> {
        AckQueue::default()
    }

    /// `ack` leaves once `commit` has resolved and every ack pushed before it has left.
    pub fn push(&mut self, ack: A, commit: Commit) {
        self.entries.get_or_insert_with(Box::default).push_back((ack, commit));
    }

    /// The next ack that may leave, with its commit's result (an ack whose commit failed is
    /// still the protocol's to answer: a nack, a failure code, a closed connection).
    pub fn take_ready(&mut self) -> Option<(A, Result<(), StoreError>)> {
        let entries = self.entries.as_mut()?;
        let (_, commit) = entries.front_mut()?;
        if !commit.try_resolve() {
            return None;
        }
        let (ack, commit) = entries.pop_front().expect("looked at");
        let result = commit.try_result().expect("resolved");
        Some((ack, result))
    }

    /// `Ready` when the first ack may leave ([`AckQueue::take_ready`]); otherwise the task is
    /// woken when its commit resolves. Never ready when empty.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.entries.as_mut().and_then(|e| e.front_mut()) {
            Some((_, commit)) => commit.poll_resolve(cx),
            None => Poll::Pending,
        }
    }

    /// Resolves when the first ack may leave (never when empty).
    pub async fn ready(&mut self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await
    }

    pub fn len(&self) -> usize {
        self.entries.as_ref().map_or(0, |e| e.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives the room back when no ack waits (an idle connection's).
    pub fn shed(&mut self) {
        if self.is_empty() {
            self.entries = None;
        }
    }

    /// The acks waiting, in order.
    pub fn iter(&self) -> impl Iterator<Item = &A> {
        self.entries.iter().flat_map(|e| e.iter()).map(|(a, _)| a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ConnectionId, Message};
    use crate::sink::{Cookies, DirectSink, Offer};
    use bytes::Bytes;

    fn none() -> Vec<Target> {
        Vec::new()
    }

    /// A sink with a one-message outbox, full and congested.
    fn congested_sink() -> Arc<DirectSink> {
        let sink = DirectSink::new(Outbox::new(1));
        let d = || SinkDelivery {
            message: Arc::new(Message::new("", "k", Bytes::from_static(b"x"))),
            cookies: Cookies::One(1),
        };
        assert_eq!(sink.offer(d(), 0), Offer::Accepted);
        assert_eq!(sink.offer(d(), 0), Offer::Congested);
        sink
    }

    fn ms(d: Duration) -> Millis {
        d.as_millis() as Millis
    }

    #[test]
    fn a_publish_on_credit_stops_decoding_until_the_debt_is_paid() {
        let t0 = Instant::now();
        let mut f = PublisherFlow::new(10, true, t0);
        for _ in 0..10 {
            assert_eq!(f.after_publish(1, none(), || t0), Decode::Go);
        }
        // The 11th is served on credit: a tenth of a second to pay.
        assert_eq!(f.after_publish(1, none(), || t0), Decode::Stop);
        assert_eq!(f.update(t0, 0), Some(Pause::Started));
        assert!(!f.should_read() && f.is_throttled());
        let wake = f.next_wakeup().expect("the debt's end");
        assert_eq!(wake - t0, Duration::from_millis(100));
        assert_eq!(f.update(wake - Duration::from_millis(1), 99), None, "not yet");
        assert!(!f.should_read());
        assert_eq!(f.update(wake, 100), Some(Pause::Ended(Duration::from_millis(100))));
        assert!(f.should_read() && f.next_wakeup().is_none());
        // Paid, but the bucket is empty: the next one is on credit again.
        assert_eq!(f.after_publish(1, none(), || wake), Decode::Stop);
    }

    #[test]
    fn no_rate_limit_never_throttles() {
        let t0 = Instant::now();
        let mut f = PublisherFlow::new(0, true, t0);
        for _ in 0..100_000 {
            assert_eq!(f.after_publish(1, none(), || t0), Decode::Go);
        }
        assert_eq!(f.update(t0, 0), None);
        assert!(f.should_read());
    }

    #[test]
    fn a_congested_target_holds_until_it_has_room() {
        let t0 = Instant::now();
        let mut f = PublisherFlow::new(0, true, t0);
        let sink = congested_sink();
        assert_eq!(f.after_publish(1, [Target::Sink(sink.clone())], || t0), Decode::Stop, "stop at that publish");
        assert_eq!(f.update(t0, 0), Some(Pause::Started));
        assert!(f.congested_target().expect("waiting for it").is_outbox(sink.outbox()));
        assert_eq!(f.next_wakeup(), Some(t0 + CONGESTION_PAUSE));
        // Something else woke the driver: still no room, still held, the same deadline.
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(f.update(t1, 10), None);
        assert_eq!(f.next_wakeup(), Some(t0 + CONGESTION_PAUSE), "other wake-ups do not extend the pause");
        // It drains: the hold ends, and a quick drain is not lagging.
        sink.outbox().drain_all();
        let t2 = t0 + Duration::from_millis(20);
        assert_eq!(f.update(t2, 20), Some(Pause::Ended(Duration::from_millis(20))));
        assert!(f.should_read() && f.congested_target().is_none());
        assert!(!sink.outbox().is_lagging(20));
    }

    #[test]
    fn a_target_that_does_not_drain_within_the_pause_is_released_and_lags() {
        let t0 = Instant::now();
        let mut f = PublisherFlow::new(0, true, t0);
        let sink = congested_sink();
        assert_eq!(f.after_publish(1, [Target::Sink(sink.clone())], || t0), Decode::Stop);
        f.update(t0, 0);
        let end = f.next_wakeup().unwrap();
        assert_eq!(f.update(end, ms(CONGESTION_PAUSE)), Some(Pause::Ended(CONGESTION_PAUSE)));
        assert!(f.should_read());
        assert!(sink.outbox().is_lagging(ms(CONGESTION_PAUSE)), "it holds nobody back any more");
        // Its next offer is not congested, so the publisher is not held again.
        let d = SinkDelivery { message: Arc::new(Message::new("", "k", Bytes::new())), cookies: Cookies::One(1) };
        assert_eq!(sink.offer(d, ms(CONGESTION_PAUSE)), Offer::Dropped);
    }

    /// A queue past its backlog mark, with a consumer that paces publishers but takes nothing.
    fn congested_queue() -> (Arc<Queue>, crate::queue::ConsumerId) {
        #[derive(Debug)]
        struct Stalled;
        impl crate::queue::ConsumerSink for Stalled {
            fn has_room(&self) -> bool {
                false
            }
            fn deliver(&self, _: crate::queue::Delivery) {
                unreachable!("never has room")
            }
            fn paces_publishers(&self) -> bool {
                true
            }
        }
        let q = Arc::new(Queue::new("q".into(), Default::default(), 0).unwrap());
        let spec = crate::queue::ConsumerSpec {
            tag: "c".into(),
            owner: crate::queue::OwnerId(1),
            connection: ConnectionId(1),
            prefetch: 0,
            no_ack: false,
            exclusive: false,
            priority: 0,
            sink: Arc::new(Stalled),
        };
        let (id, _) = q.consume(spec, 0).unwrap();
        let mut congested = false;
        for _ in 0..crate::queue::BACKLOG_HIGH {
            congested = q.enqueue(Arc::new(Message::new("", "q", Bytes::new())), 0).1.congested;
        }
        assert!(congested);
        (q, id)
    }

    #[test]
    fn a_queue_falling_behind_holds_like_an_outbox_and_lags_by_the_same_rule() {
        let t0 = Instant::now();
        let mut f = PublisherFlow::new(0, true, t0);
        let (q, id) = congested_queue();
        assert_eq!(f.after_publish(1, [Target::Queue(q.clone())], || t0), Decode::Stop);
        assert_eq!(f.update(t0, 0), Some(Pause::Started));
        assert!(matches!(f.congested_target(), Some(Target::Queue(_))));
        assert_eq!(f.next_wakeup(), Some(t0 + CONGESTION_PAUSE));
        // Nothing delivered within the pause: released, and the queue lags.
        let end = t0 + CONGESTION_PAUSE;
        assert_eq!(f.update(end, ms(CONGESTION_PAUSE)), Some(Pause::Ended(CONGESTION_PAUSE)));
        assert!(f.should_read() && q.has_room());
        let more = q.enqueue(Arc::new(Message::new("", "q", Bytes::new())), ms(CONGESTION_PAUSE));
        assert!(!more.1.congested, "a lagging queue holds nobody");

        // Another queue: its last consumer leaves while a publisher waits, which ends the hold.
        let (q2, id2) = congested_queue();
        let mut g = PublisherFlow::new(0, true, t0);
        g.after_publish(1, [Target::Queue(q2.clone())], || t0);
        assert_eq!(g.update(t0, 0), Some(Pause::Started));
        drop(q2.cancel(id2, 0));
        assert_eq!(g.update(t0 + Duration::from_millis(1), 1), Some(Pause::Ended(Duration::from_millis(1))));
        drop(q.cancel(id, 0));
    }

    #[test]
    fn a_connection_a_queue_held_with_others_yields_every_fair_batch() {
        let t0 = Instant::now();
        let mut f = PublisherFlow::new(0, true, t0);
        for _ in 0..FAIR_BATCH {
            assert_eq!(f.after_publish(1, none(), || t0), Decode::Go, "never held by a queue: no yield");
        }
        // Held alone (the queue's publishes all came from one connection): no turns to take.
        let (q, id) = congested_queue();
        assert_eq!(f.after_publish(1, [Target::Queue(q.clone())], || t0), Decode::Stop);
        f.update(t0, 0);
        drop(q.cancel(id, 0));
        assert_eq!(f.update(t0, 0), Some(Pause::Ended(Duration::ZERO)));
        assert!(!q.was_contended());
        for _ in 0..2 * FAIR_BATCH {
            assert_eq!(f.after_publish(1, none(), || t0), Decode::Go, "the queue's only publisher: no yield");
        }

        // Held with another connection: the two share the room the queue makes.
        let (q, id) = congested_queue();
        let mut other = Message::new("", "q", Bytes::new());
        other.origin.connection = ConnectionId(7);
        assert!(q.enqueue(Arc::new(other), 0).1.congested);
        assert_eq!(f.after_publish(1, [Target::Queue(q.clone())], || t0), Decode::Stop);
        f.update(t0, 0);
        drop(q.cancel(id, 0));
        assert_eq!(f.update(t0, 0), Some(Pause::Ended(Duration::ZERO)));
        assert!(q.was_contended());
        let decoded: Vec<Decode> = (0..2 * FAIR_BATCH).map(|_| f.after_publish(1, none(), || t0)).collect();
        let yields: Vec<usize> =
            decoded.iter().enumerate().filter(|(_, d)| **d == Decode::Yield).map(|(i, _)| i).collect();
        assert_eq!(yields, [FAIR_BATCH as usize - 1, 2 * FAIR_BATCH as usize - 1]);
        assert_eq!(f.after_publish(0, none(), || t0), Decode::Go, "other frames count for nothing");
    }

    #[test]
    fn a_target_that_found_room_before_the_wait_does_not_hold() {
        let t0 = Instant::now();
        let mut f = PublisherFlow::new(0, true, t0);
        let sink = congested_sink();
        assert_eq!(f.after_publish(1, [Target::Sink(sink.clone())], || t0), Decode::Stop);
        sink.outbox().drain_all();
        assert_eq!(f.update(t0, 0), None);
        assert!(f.should_read() && f.next_wakeup().is_none());
    }

    #[test]
    fn alarms_hold_only_publishers_and_the_disk_alarm_only_where_it_holds() {
        let t0 = Instant::now();
        let mut f = PublisherFlow::new(0, true, t0);
        f.set_alarms(true, false);
        assert_eq!(f.update(t0, 0), None, "a consumer goes on");
        assert!(f.should_read());
        f.after_publish(1, none(), || t0);
        assert_eq!(f.update(t0, 0), Some(Pause::Started));
        assert!(f.alarm_holds() && f.next_wakeup().is_none(), "an alarm ends when it is cleared, not with time");
        let t1 = t0 + Duration::from_secs(3);
        f.set_alarms(false, true);
        assert_eq!(f.update(t1, 0), None, "the disk alarm holds too");
        f.set_alarms(false, false);
        assert_eq!(f.update(t1, 0), Some(Pause::Ended(Duration::from_secs(3))));

        // A connection answered otherwise at the disk alarm (MQTT 5.0) is not held by it.
        let mut v5 = PublisherFlow::new(0, false, t0);
        v5.after_publish(1, none(), || t0);
        v5.set_alarms(false, true);
        assert_eq!(v5.update(t0, 0), None);
        assert!(v5.should_read() && v5.would_hold(true, false) && !v5.would_hold(false, true));
    }

    #[test]
    fn the_flow_state_stays_80_bytes() {
        // Every connection carries it (inside the MQTT connection's state, which must fit
        // jemalloc's 640-byte class).
        assert!(std::mem::size_of::<PublisherFlow>() <= 80, "{}", std::mem::size_of::<PublisherFlow>());
    }

    #[test]
    fn too_many_acks_waiting_stop_reading() {
        let t0 = Instant::now();
        let mut f = PublisherFlow::new(0, true, t0);
        f.set_acks_waiting(MAX_PENDING_ACKS);
        assert_eq!(f.update(t0, 0), Some(Pause::Started));
        f.set_acks_waiting(MAX_PENDING_ACKS - 1);
        assert_eq!(f.update(t0 + Duration::from_millis(5), 0), Some(Pause::Ended(Duration::from_millis(5))));
    }

    #[test]
    fn acks_leave_in_order_when_commits_finish_out_of_order() {
        let mut q: AckQueue<u32> = AckQueue::new();
        let (tx1, c1) = Commit::pending();
        let (tx2, c2) = Commit::pending();
        q.push(1, c1);
        q.push(2, c2);
        q.push(3, Commit::done(Ok(())));
        assert!(q.take_ready().is_none(), "1 is not committed");
        tx2.send(Ok(())).unwrap();
        assert!(q.take_ready().is_none(), "2 is, but it waits for 1");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(q.poll_ready(&mut cx).is_pending());
        tx1.send(Err(StoreError::Full)).unwrap();
        assert!(q.poll_ready(&mut cx).is_ready());
        assert_eq!(q.take_ready(), Some((1, Err(StoreError::Full))), "a failed commit is answered too");
        assert_eq!(q.take_ready(), Some((2, Ok(()))));
        assert_eq!(q.take_ready(), Some((3, Ok(()))));
        assert!(q.take_ready().is_none() && q.is_empty());
        assert!(q.poll_ready(&mut cx).is_pending(), "empty: nothing to wait for");
    }

    #[test]
    fn a_joined_commit_is_ready_when_both_halves_are() {
        let mut q: AckQueue<&str> = AckQueue::new();
        let (ta, a) = Commit::pending();
        let (tb, b) = Commit::pending();
        q.push("both", a.join(b));
        ta.send(Ok(())).unwrap();
        assert!(q.take_ready().is_none());
        drop(tb); // the store went away
        assert_eq!(q.take_ready(), Some(("both", Err(StoreError::Closed))));
    }
}

//! Direct sinks: destinations that are not queues.
//!
//! A transient subscriber (an MQTT clean session with no expiry) needs no queue state: routing
//! pushes straight into its connection's bounded [`Outbox`], like RabbitMQ's QoS 0
//! pseudo-queue. This is what keeps a million idle sensors cheap.
//!
//! **One slow subscriber does not slow a publisher for everyone else.** A subscriber whose
//! outbox is full is *congested*: its publishers stop reading for a moment
//! ([`crate::flow::PublisherFlow`]), which is all a subscriber that keeps up needs to lose nothing in a
//! burst. One that does not drain within [`CONGESTION_PAUSE`], or drains less often than every
//! [`SLOW_DRAIN`] while a publisher waits, is *lagging* ([`Outbox::waited`]): for a while (1 s, doubling with every
//! further time up to 64 s, and in any case until it drains again) it no longer holds anyone
//! back, QoS 0 past its outbox is dropped and counted (`VHostStats::dropped_at_sinks`), and
//! QoS 1/2 past `max_queued` is dropped likewise, as Mosquitto's `max_queued_messages` does.
//! The publisher and every other subscriber keep their rate: a subscriber that never reads
//! costs them one pause, one that reads in slow bursts a pause per lagging period.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;

use crate::message::Message;
use crate::signal::Wakeup;

/// A bounded multi-producer, single-consumer mailbox for one connection's task. Producers
/// never block: [`Outbox::try_push`] hands the item back when full. The owner waits with
/// [`Outbox::notified`] (or polls [`Outbox::poll_notified`]) and drains everything ready in one
/// go (coalesced writes), or as much as it is about to write ([`Outbox::drain_budget`]).
///
/// Full means `capacity` items or, for an outbox made with [`Outbox::bounded`], `max_bytes` of
/// them ([`Weigh`]): a count alone lets 1,000 messages of 128 KiB hold 128 MB in front of one
/// subscriber, and every byte held is latency for the messages behind it.
pub struct Outbox<T> {
    /// The items, and the owner's wake-up under the same lock: a push into an empty outbox
    /// stores the permit and takes the waker while it holds the lock anyway.
    items: Mutex<Items<T>>,
    /// `items.len()`, written under its lock, read without: a queue asks [`Outbox::has_room`]
    /// of its consumers under its own lock for every message, and takes no outbox lock for it.
    /// `u32`, as `capacity` and `max_bytes` (saturated: pushes past the capacity are bounded
    /// by it anyway). Every MQTT session makes an outbox: 192 bytes with these as `usize`, 176
    /// as `u32`, 112 with the wake-up under the items' lock and what only a congested outbox
    /// needs made when one is (`Items::congestion`), 96 with the weight from the item's type
    /// ([`Weigh`]) and that state under the lock too: jemalloc's 112 class with the `Arc`'s
    /// counts instead of 192; 64 and the 80 class with the wake-up's permit beside `starved`
    /// (`an_outbox_stays_small`, issue 18). A direct sink's is inline in the sink.
    len: AtomicU32,
    capacity: u32,
    /// The items' [`Weigh::weight`] summed, kept like `len`; always 0 without a byte bound.
    bytes: AtomicUsize,
    /// `u32::MAX`: no byte bound (a bound of 4 GiB or more is none either), and the items are
    /// not weighed.
    max_bytes: u32,
    /// A producer found the outbox full ([`Outbox::has_room_or_starve`]) and stopped; the owner
    /// must prompt it again after draining ([`Outbox::take_starved`]).
    starved: std::sync::atomic::AtomicBool,
    /// The items' wake-up's permit, read and written only under their lock (see [`Wakeup`]).
    permit: std::sync::atomic::AtomicBool,
}

struct Items<T> {
    queue: Ready<T>,
    /// The owner's wake-up: a push into an empty outbox while nobody waited leaves it for the
    /// owner's next poll.
    wakeup: Wakeup,
    /// Made by the first publisher that waits for room or asks how often the owner drained
    /// ([`Outbox::drains`]); most outboxes never fill. Under the lock the owner drains under,
    /// so a drain and the state's making are ordered.
    congestion: Option<Arc<Congestion>>,
}

/// An outbox's ready items: a `VecDeque` made with the first item and kept while items come,
/// given back when its owner sheds what it does not need ([`Outbox::shed`], at an MQTT
/// connection's park). Boxed: every MQTT session has an outbox, most of them idle, and inline
/// the deque was 24 bytes more of each (a direct sink 112 bytes, jemalloc's 128 class with the
/// `Arc`'s counts; 88 and the 112 class boxed), and its buffer stayed after the last delivery.
#[allow(clippy::box_collection)] // one word in every outbox, where the deque is 32 bytes
struct Ready<T>(Option<Box<VecDeque<T>>>);

impl<T> Ready<T> {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn push_back(&mut self, item: T) {
        self.0.get_or_insert_with(Box::default).push_back(item);
    }
    fn front(&self) -> Option<&T> {
        self.0.as_ref()?.front()
    }
    fn pop_front(&mut self) -> Option<T> {
        self.0.as_mut()?.pop_front()
    }
    fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.0.iter_mut().flat_map(|q| q.drain(..))
    }
}

/// What a full outbox's publishers wait on, and how its owner is judged.
#[derive(Default)]
struct Congestion {
    /// Woken when the owner drains: publishers held back by a full outbox wait on it.
    drained: Notify,
    lag: Mutex<Lag>,
    /// Drains since this was made.
    drains: AtomicU64,
}

/// The longest a publisher waits for one congested subscriber to drain.
pub const CONGESTION_PAUSE: Duration = Duration::from_millis(250);
/// A subscriber that drains less often than this while a publisher waits for room is slow,
/// even if it drains in the end (one that reads a burst just before every [`CONGESTION_PAUSE`]
/// would otherwise hold its publishers to its pace). One that keeps up drains a batch every
/// millisecond or so on loopback, however many publishers race for the room it makes.
pub const SLOW_DRAIN: Duration = Duration::from_millis(100);
const FIRST_LAG: u64 = 1_000;
const MAX_LAG_DOUBLINGS: u32 = 6;
/// A subscriber that has not been found slow for this long starts again from [`FIRST_LAG`].
const LAG_MEMORY: u64 = 300_000;

/// Whether (and until when) an outbox's subscriber (or a queue's consumers, see
/// [`crate::queue::Queue::waited`]) is treated as slow, in milliseconds of the caller's clock.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Lag {
    /// Lagging until then at least.
    until: u64,
    /// It did not drain at all within a pause: lagging until it drains something.
    stuck: bool,
    /// Times found slow, and when last.
    strikes: u32,
    last: u64,
}

impl Lag {
    /// Whether it is treated as slow at `now_ms`.
    pub(crate) fn is_lagging(&self, now_ms: u64) -> bool {
        self.stuck || now_ms < self.until
    }

    /// It drained something: a lag for not draining at all is over.
    pub(crate) fn drained(&mut self) {
        self.stuck = false;
    }

    /// The rule of [`Outbox::waited`]: a publisher waited `waited` for room, and got it or not,
    /// while the owner drained `drains` times. Returns whether it is now lagging.
    pub(crate) fn waited(&mut self, got_room: bool, waited: Duration, drains: u64, now_ms: u64) -> bool {
        // Many publishers may wait on one subscriber and race for the room each drain makes: a
        // publisher that lost a few races waited long although the subscriber kept draining. So
        // the subscriber is judged by how often it drained meanwhile.
        let slow = match drains {
            0 => waited >= SLOW_DRAIN,
            n => waited / n.min(u32::MAX as u64) as u32 >= SLOW_DRAIN,
        };
        if !slow {
            return false;
        }
        self.strikes = if now_ms.saturating_sub(self.last) > LAG_MEMORY { 1 } else { self.strikes.saturating_add(1) };
        self.last = now_ms;
        let hold = FIRST_LAG << (self.strikes - 1).min(MAX_LAG_DOUBLINGS);
        self.until = self.until.max(now_ms + hold);
        self.stuck |= !got_room && drains == 0;
        true
    }
}

impl<T: Weigh> fmt::Debug for Outbox<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .field("bytes", &self.bytes())
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

/// What an item costs against an outbox's byte bound ([`Outbox::bounded`]). Items of an outbox
/// without one are not weighed (the default: nothing).
pub trait Weigh {
    fn weight(&self) -> usize {
        0
    }
}

/// Queue deliveries go to outboxes bounded by count (their consumers' prefetch bounds them).
impl Weigh for crate::queue::Delivery {}

/// A message's payload and routing key: what it puts on the wire, give or take a header. The
/// `Arc<Message>` is shared with the other destinations of a fan-out, but each subscriber's
/// socket carries the bytes again, and the time they take is what waits behind them.
impl Weigh for SinkDelivery {
    fn weight(&self) -> usize {
        self.message.payload.len() + self.message.routing_key.len()
    }
}

impl<T: Weigh> Outbox<T> {
    /// An outbox bounded by count only.
    pub fn new(capacity: usize) -> Outbox<T> {
        Outbox::bounded(capacity, usize::MAX)
    }
    /// An outbox full at `capacity` items or `max_bytes` of them, whichever comes first.
    pub fn bounded(capacity: usize, max_bytes: usize) -> Outbox<T> {
        Outbox {
            items: Mutex::new(Items { queue: Ready(None), wakeup: Wakeup::default(), congestion: None }),
            len: AtomicU32::new(0),
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX).max(1),
            bytes: AtomicUsize::new(0),
            max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX).max(1),
            starved: std::sync::atomic::AtomicBool::new(false),
            permit: std::sync::atomic::AtomicBool::new(false),
        }
    }
    fn items(&self) -> MutexGuard<'_, Items<T>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// What `item` counts against the byte bound (nothing without one).
    fn weigh(&self, item: &T) -> usize {
        if self.max_bytes == u32::MAX {
            0
        } else {
            item.weight()
        }
    }
    /// The congestion state, made now if it was not (by a publisher).
    fn congestion(&self) -> Arc<Congestion> {
        self.items().congestion.get_or_insert_with(Arc::default).clone()
    }
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }
    /// Records `items.len()` (under the items' lock).
    fn set_len(&self, n: usize) {
        self.len.store(u32::try_from(n).unwrap_or(u32::MAX), Ordering::SeqCst);
    }
    /// The byte bound (`usize::MAX`: none).
    pub fn max_bytes(&self) -> usize {
        match self.max_bytes {
            u32::MAX => usize::MAX,
            m => m as usize,
        }
    }
    /// Lock-free: the items' weight as of the last push or drain (0 without a byte bound).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }
    /// Whether the outbox holds `times` × its capacity, or `times` × its byte bound in at least
    /// `times` items: an item heavier than the bound fills an empty outbox alone, and a second
    /// one is still within twice (a publisher told to wait adds no more than that one).
    fn holds(&self, times: usize) -> bool {
        let len = self.len();
        len >= self.capacity().saturating_mul(times)
            || (len >= times && self.bytes() >= self.max_bytes().saturating_mul(times))
    }
    /// Lock-free: the length as of the last push or drain.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst) as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn has_room(&self) -> bool {
        !self.holds(1)
    }
    /// [`Outbox::has_room`] for a producer that stops when it is full and waits to be prompted
    /// (a queue delivering to a consumer): a `false` is remembered so the owner cannot miss it.
    /// No lock: the producer marks itself starved, then looks at the length again; the owner
    /// drains (the length drops), then takes the mark ([`Outbox::take_starved`]). All four in
    /// one total order (SeqCst): either the second look sees the drain (room: the producer goes
    /// on, and the owner may prompt once for nothing), or the owner's take sees the mark.
    pub fn has_room_or_starve(&self) -> bool {
        if self.has_room() {
            return true;
        }
        self.starved.store(true, Ordering::SeqCst);
        self.has_room()
    }
    /// Whether a producer went without room since the last call (call after draining).
    pub fn take_starved(&self) -> bool {
        self.starved.swap(false, Ordering::SeqCst)
    }
    /// Adds an item, or gives it back when the outbox is full.
    pub fn try_push(&self, item: T) -> Result<(), T> {
        let mut q = self.items();
        if q.queue.len() >= self.capacity() || self.bytes.load(Ordering::SeqCst) >= self.max_bytes() {
            return Err(item);
        }
        let waker = self.push_locked(&mut q, item);
        drop(q);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
    /// Pushes under the lock; a push into an empty outbox leaves the permit and returns the
    /// owner's waker, woken once the lock is let go.
    fn push_locked(&self, q: &mut Items<T>, item: T) -> Option<Waker> {
        let was_empty = q.queue.is_empty();
        self.bytes.fetch_add(self.weigh(&item), Ordering::SeqCst);
        q.queue.push_back(item);
        self.set_len(q.queue.len());
        if was_empty {
            q.wakeup.notify(&self.permit)
        } else {
            None
        }
    }
    /// Adds an item whatever the capacity. Only for producers that are bounded some other way:
    /// queue consumers, whose deliveries are bounded by their prefetch credit (the queue checks
    /// [`Outbox::has_room`] first, but two queues feeding one outbox may both pass that check).
    pub fn push(&self, item: T) {
        let mut q = self.items();
        let waker = self.push_locked(&mut q, item);
        drop(q);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Gives back the room kept for ready items when there are none (an owner going idle).
    pub fn shed(&self) {
        let mut q = self.items();
        if q.queue.is_empty() {
            q.queue.0 = None;
        }
    }

    /// Moves every ready item into `out`; returns how many.
    pub fn drain_into(&self, out: &mut Vec<T>) -> usize {
        let mut q = self.items();
        let n = q.queue.len();
        out.extend(q.queue.drain());
        self.set_len(0);
        self.bytes.store(0, Ordering::SeqCst);
        let congestion = if n > 0 { q.congestion.clone() } else { None };
        drop(q);
        drained_some(congestion);
        n
    }
    /// Moves every ready item into `out` through `f` (an owner's own backlog, wrapped in its
    /// own type); returns how many. Nothing is allocated once `out` has grown to its working size.
    pub fn drain_with<U>(&self, out: &mut impl Extend<U>, f: impl FnMut(T) -> U) -> usize {
        let mut q = self.items();
        let n = q.queue.len();
        if n == 0 {
            return 0;
        }
        out.extend(q.queue.drain().map(f));
        self.set_len(0);
        self.bytes.store(0, Ordering::SeqCst);
        let congestion = q.congestion.clone();
        drop(q);
        drained_some(congestion);
        n
    }
    /// [`Outbox::drain_with`] for an owner that takes only what it is about to write: items
    /// from the front while their weight stays within `budget` bytes (at least one); the rest
    /// stays in the outbox, where it counts against the bound and holds publishers back. An
    /// owner that drained everything into a backlog of its own would hold up to twice the
    /// outbox's worth beside it, unbounded by it. Each item goes to `take`, which keeps it (a
    /// push, inlined: an `Extend` of one item at a time was a call into `VecDeque::extend` per
    /// delivery, 5 % of the broker's CPU in a fan-out's profile). Returns how many.
    pub fn drain_budget(&self, budget: usize, mut take: impl FnMut(T)) -> usize {
        let mut q = self.items();
        let (mut n, mut taken) = (0, 0);
        while let Some(item) = q.queue.front() {
            let w = self.weigh(item);
            if n > 0 && taken + w > budget {
                break;
            }
            taken += w;
            n += 1;
            if let Some(item) = q.queue.pop_front() {
                take(item);
            }
        }
        if n == 0 {
            return 0;
        }
        self.set_len(q.queue.len());
        self.bytes.fetch_sub(taken, Ordering::SeqCst);
        let congestion = q.congestion.clone();
        drop(q);
        drained_some(congestion);
        n
    }
    /// Every ready item, in a vector made for them (none when there are none): for an owner
    /// that keeps no scratch vector. The lock is held only for the copy, not while the owner
    /// handles them (producers contend for it: 50 publishers feeding one subscriber).
    pub fn drain_all(&self) -> Vec<T> {
        let mut q = self.items();
        if q.queue.is_empty() {
            return Vec::new();
        }
        let items: Vec<T> = q.queue.drain().collect();
        self.set_len(0);
        self.bytes.store(0, Ordering::SeqCst);
        let congestion = q.congestion.clone();
        drop(q);
        drained_some(congestion);
        items
    }
    /// How many times the owner has drained something (counted from the first time a
    /// publisher asked: callers take differences).
    pub fn drains(&self) -> u64 {
        self.congestion().drains.load(Ordering::Relaxed)
    }

    /// Whether the outbox's owner is treated as slow at `now_ms` (see the module's doc).
    pub fn is_lagging(&self, now_ms: u64) -> bool {
        let congestion = self.items().congestion.clone();
        congestion.is_some_and(|c| c.lag.lock().unwrap_or_else(|e| e.into_inner()).is_lagging(now_ms))
    }

    /// A publisher waited `waited` for room, and got it or not, while the owner drained `drains`
    /// times ([`Outbox::drains`]): a subscriber that did not drain within the pause, or drained
    /// less often than every [`SLOW_DRAIN`], is lagging from `now_ms` for 1 s, doubling with
    /// each further time (up to 64 s), and (if it did not drain at all) until it drains.
    /// Returns whether it is now lagging.
    pub fn waited(&self, got_room: bool, waited: Duration, drains: u64, now_ms: u64) -> bool {
        self.congestion().lag.lock().unwrap_or_else(|e| e.into_inner()).waited(got_room, waited, drains, now_ms)
    }

    /// Resolves once the outbox has room (at once if it has). For publishers that were told a
    /// destination is congested: they stop reading their socket until this resolves.
    pub async fn room(&self) {
        let congestion = self.congestion();
        loop {
            let drained = congestion.drained.notified();
            tokio::pin!(drained);
            // Register before checking, so a drain in between is not missed.
            drained.as_mut().enable();
            if self.has_room() {
                return;
            }
            drained.await;
        }
    }
    /// Resolves after a push into an empty outbox (a permit is stored if none was waiting, so a
    /// push between a drain and this call is not missed).
    pub async fn notified(&self) {
        std::future::poll_fn(|cx| self.poll_notified(cx)).await
    }
    /// [`Outbox::notified`] without a future: `Ready` after a push into an empty outbox,
    /// otherwise the task is woken by the next one.
    pub fn poll_notified(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.items().wakeup.poll(&self.permit, cx)
    }
}

/// The owner drained something: a lag for not draining at all is over, and publishers waiting
/// for room look again. Nothing to do for an outbox that never filled.
fn drained_some(congestion: Option<Arc<Congestion>>) {
    let Some(c) = congestion else { return };
    c.lag.lock().unwrap_or_else(|e| e.into_inner()).drained();
    c.drains.fetch_add(1, Ordering::Relaxed);
    c.drained.notify_waiters();
}

/// A connection's outbox is itself a queue consumer's receiving end: deliveries land in it, for
/// consumers bounded by their prefetch (an MQTT session's queue, a bridge's backlog). The
/// prefetch keeps them under the outbox's capacity, so none is dropped.
impl crate::queue::ConsumerSink for Outbox<crate::queue::Delivery> {
    fn has_room(&self) -> bool {
        Outbox::has_room(self)
    }
    fn deliver(&self, delivery: crate::queue::Delivery) {
        self.push(delivery)
    }
}

/// Which bindings of a sink matched a message. Most messages match one binding, so that case
/// allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cookies {
    One(u64),
    Many(Vec<u64>),
}

impl Cookies {
    pub fn push(&mut self, c: u64) {
        match self {
            Cookies::One(first) => *self = Cookies::Many(vec![*first, c]),
            Cookies::Many(v) => v.push(c),
        }
    }
    pub fn as_slice(&self) -> &[u64] {
        match self {
            Cookies::One(c) => std::slice::from_ref(c),
            Cookies::Many(v) => v,
        }
    }
}

/// A message routed to a direct sink, with the cookies of the bindings that matched it (the
/// frontend uses them to find the subscriptions: QoS, subscription identifiers).
#[derive(Debug, Clone)]
pub struct SinkDelivery {
    pub message: Arc<Message>,
    pub cookies: Cookies,
}

/// What became of a message offered to a direct sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Accepted,
    /// Accepted over capacity: the publisher should wait for room ([`crate::flow`]).
    Congested,
    /// Dropped: a transient message met a full outbox, or any message met a lagging
    /// subscriber's full one.
    Dropped,
}

/// A broker-wide unique sink number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SinkId(pub u64);

/// A queue-less destination feeding one connection's outbox, which it holds inline: one per
/// MQTT session, made with it. 80 bytes, jemalloc's 96 class with the `Arc`'s counts (112 and
/// the 128 with the outbox's deque inline, 88 and the 112 with its wake-up's permit beside the
/// waker; `an_outbox_stays_small`); apart,
/// the outbox was the 112 class and the sink the 48 (issue 18: 32 bytes of every subscribed
/// device; 16 more of one that never subscribes, whose session made an outbox anyway). It kept
/// counts of its deliveries and drops, which only tests read, and an atomic add per delivery;
/// the vhost counts drops (`VHostStats::dropped_at_sinks`).
#[derive(Debug)]
pub struct DirectSink {
    id: SinkId,
    /// Persistent messages a lagging subscriber may have waiting (MQTT's
    /// `max_queued_messages`); 0: no limit. Saturated at `u32::MAX`.
    max_queued: u32,
    outbox: Outbox<SinkDelivery>,
}

impl DirectSink {
    pub fn new(outbox: Outbox<SinkDelivery>) -> Arc<DirectSink> {
        DirectSink::with_max_queued(outbox, 0)
    }
    /// A sink whose lagging subscriber keeps at most `max_queued` persistent messages waiting
    /// (at least the outbox's capacity; 0: no limit).
    pub fn with_max_queued(outbox: Outbox<SinkDelivery>, max_queued: usize) -> Arc<DirectSink> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let max_queued = if max_queued == 0 { 0 } else { max_queued.max(outbox.capacity()) };
        Arc::new(DirectSink {
            id: SinkId(NEXT.fetch_add(1, Ordering::Relaxed)),
            max_queued: u32::try_from(max_queued).unwrap_or(u32::MAX),
            outbox,
        })
    }
    pub fn id(&self) -> SinkId {
        self.id
    }
    pub fn outbox(&self) -> &Outbox<SinkDelivery> {
        &self.outbox
    }
    /// Offers a message at `now_ms`. Past the outbox's capacity (its count or its bytes, see
    /// [`Outbox::bounded`]) the sink is *congested*: the
    /// message goes in and the publisher is told to wait for room ([`crate::flow`]), so a
    /// fast publisher is slowed rather than its messages lost. A transient message (MQTT QoS 0)
    /// is dropped and counted past twice the capacity (many publishers at once, or one that
    /// does not wait); a persistent one (QoS 1/2) is not. Once the subscriber is lagging (see
    /// the module's doc) nobody is held back for it: a transient message past the capacity and
    /// a persistent one past `max_queued` are dropped and counted.
    pub fn offer(&self, delivery: SinkDelivery, now_ms: u64) -> Offer {
        let len = self.outbox.len();
        let full = self.outbox.holds(1);
        let persistent = delivery.message.is_persistent();
        let over = if !full {
            false
        } else if self.outbox.is_lagging(now_ms) {
            !persistent || (self.max_queued > 0 && len >= self.max_queued as usize)
        } else {
            !persistent && self.outbox.holds(2)
        };
        if over {
            return Offer::Dropped;
        }
        self.outbox.push(delivery);
        if full && !self.outbox.is_lagging(now_ms) {
            Offer::Congested
        } else {
            Offer::Accepted
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Weigh for u8 {}
    impl Weigh for u32 {}
    use bytes::Bytes;

    fn delivery(n: u8) -> SinkDelivery {
        SinkDelivery { message: Arc::new(Message::new("", "k", Bytes::from(vec![n]))), cookies: Cookies::One(7) }
    }

    /// One per MQTT session, its outbox inline (see [`DirectSink`]): the 96 class with the
    /// `Arc`'s counts, where the sink apart was the 48 class and its outbox the 112.
    #[test]
    fn a_sink_stays_small() {
        let size = std::mem::size_of::<DirectSink>();
        assert!(size + 16 <= 96, "DirectSink is {size} bytes");
    }

    /// Every MQTT session makes an outbox for its direct sink at its start: 192 bytes with the
    /// length and the capacity as `usize`, jemalloc's 224 class with the `Arc`'s counts; 176
    /// and the 192 class with them as `u32`; 112 and the 128 class; 96 and the 112 class; now 64
    /// and the 80 (a direct sink, the outbox inline, 80 and the 96).
    #[test]
    fn an_outbox_stays_small() {
        let size = std::mem::size_of::<Outbox<SinkDelivery>>();
        assert!(size + 16 <= 80, "Outbox is {size} bytes");
        let sink = std::mem::size_of::<DirectSink>();
        assert!(sink + 16 <= 96, "DirectSink is {sink} bytes");
    }

    /// The ready items' room is made with the first and given back by a shed once drained.
    #[test]
    fn an_outbox_sheds_its_room_when_empty() {
        let outbox: Outbox<SinkDelivery> = Outbox::new(4);
        outbox.push(delivery(1));
        outbox.shed();
        assert!(outbox.items().queue.0.is_some(), "not while an item waits");
        let mut out = Vec::new();
        assert_eq!(outbox.drain_into(&mut out), 1);
        assert!(outbox.items().queue.0.is_some(), "kept while items come");
        outbox.shed();
        assert!(outbox.items().queue.0.is_none());
        outbox.push(delivery(2));
        assert_eq!(outbox.drain_all().len(), 1);
    }

    #[test]
    fn a_full_sink_slows_then_drops_transient_messages_and_counts() {
        let sink = DirectSink::new(Outbox::new(2));
        assert_eq!(sink.offer(delivery(1), 0), Offer::Accepted);
        assert_eq!(sink.offer(delivery(2), 0), Offer::Accepted);
        assert_eq!(sink.offer(delivery(3), 0), Offer::Congested, "over capacity: the publisher is slowed");
        assert_eq!(sink.offer(delivery(4), 0), Offer::Congested);
        assert_eq!(sink.offer(delivery(5), 0), Offer::Dropped, "past twice the capacity QoS 0 is dropped");
        let mut out = Vec::new();
        assert_eq!(sink.outbox().drain_into(&mut out), 4);
        assert_eq!(out[0].message.payload[0], 1);
        assert_eq!(sink.offer(delivery(6), 0), Offer::Accepted);
    }

    fn persistent(n: u8) -> SinkDelivery {
        let props = crate::message::Properties {
            delivery_mode: Some(crate::message::DeliveryMode::Persistent),
            ..Default::default()
        };
        let m = Message::new("", "k", Bytes::from(vec![n])).with_properties(props);
        SinkDelivery { message: Arc::new(m), cookies: Cookies::One(7) }
    }

    #[tokio::test]
    async fn a_full_sink_never_drops_persistent_messages_but_reports_congestion() {
        let sink = DirectSink::new(Outbox::new(1));
        assert_eq!(sink.offer(persistent(1), 0), Offer::Accepted);
        assert_eq!(sink.offer(persistent(2), 0), Offer::Congested);
        assert_eq!(sink.outbox().len(), 2);
        let waiting = sink.clone();
        let waiter = tokio::spawn(async move { waiting.outbox().room().await });
        let mut out = Vec::new();
        sink.outbox().drain_into(&mut out);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("room after a drain").unwrap();
    }

    fn sized(n: u8, payload: usize, persistent: bool) -> SinkDelivery {
        let mut m = Message::new("", "k", Bytes::from(vec![n; payload]));
        if persistent {
            m = m.with_properties(crate::message::Properties {
                delivery_mode: Some(crate::message::DeliveryMode::Persistent),
                ..Default::default()
            });
        }
        SinkDelivery { message: Arc::new(m), cookies: Cookies::One(7) }
    }

    #[test]
    fn a_sink_is_congested_by_bytes_long_before_its_count() {
        // Room for 1,000 messages but 100 bytes: each weighs 40 + 1 (payload and key).
        let sink = DirectSink::new(Outbox::bounded(1000, 100));
        for n in 0..3 {
            assert_eq!(sink.offer(sized(n, 40, false), 0), Offer::Accepted);
        }
        assert_eq!(sink.outbox().bytes(), 123);
        assert!(!sink.outbox().has_room());
        assert_eq!(sink.offer(sized(3, 40, false), 0), Offer::Congested, "past the bytes: the publisher waits");
        assert_eq!(sink.offer(sized(4, 40, false), 0), Offer::Congested);
        assert_eq!(sink.offer(sized(5, 40, false), 0), Offer::Dropped, "past twice the bytes QoS 0 is dropped");
        assert_eq!(sink.offer(sized(6, 40, true), 0), Offer::Congested, "QoS 1/2 never is");
        assert_eq!(sink.outbox().len(), 6);
        let mut out = Vec::new();
        sink.outbox().drain_into(&mut out);
        assert_eq!((sink.outbox().bytes(), out.len()), (0, 6));
        assert_eq!(sink.offer(sized(7, 40, false), 0), Offer::Accepted);
    }

    #[test]
    fn a_message_heavier_than_the_bound_still_goes_into_an_empty_outbox() {
        let sink = DirectSink::new(Outbox::bounded(10, 100));
        assert_eq!(sink.offer(sized(1, 500, false), 0), Offer::Accepted);
        assert_eq!(sink.offer(sized(2, 500, false), 0), Offer::Congested, "the next waits, it is not dropped");
        assert_eq!(sink.offer(sized(3, 500, false), 0), Offer::Dropped, "past two of them it is");
        let ob: Outbox<SinkDelivery> = Outbox::bounded(10, 100);
        assert!(ob.try_push(sized(1, 500, false)).is_ok());
        assert!(ob.try_push(sized(2, 1, false)).is_err(), "it fills the outbox alone");
        let mut out = Vec::new();
        assert_eq!(ob.drain_budget(100, |d| out.push(d)), 1, "one at least, whatever the budget");
        assert!(ob.try_push(sized(3, 1, false)).is_ok());
    }

    #[test]
    fn a_budgeted_drain_takes_what_fits_and_leaves_the_rest_counted() {
        let ob: Outbox<SinkDelivery> = Outbox::bounded(100, 1_000);
        for n in 0..10 {
            ob.push(sized(n, 99, false)); // 100 bytes each
        }
        assert!(!ob.has_room());
        let mut out: Vec<u8> = Vec::new();
        // Drains are counted from the first time a publisher asks (a congested one does).
        let drains = ob.drains();
        assert_eq!(ob.drain_budget(350, |d| out.push(d.message.payload[0])), 3);
        assert_eq!(out, [0, 1, 2], "from the front, in order");
        assert_eq!((ob.len(), ob.bytes()), (7, 700));
        assert!(ob.has_room(), "what was taken made room");
        assert_eq!(ob.drains() - drains, 1);
        assert_eq!(ob.drain_budget(usize::MAX, |d| out.push(d.message.payload[0])), 7);
        assert_eq!((ob.len(), ob.bytes()), (0, 0));
        assert_eq!(ob.drain_budget(10, |d| out.push(d.message.payload[0])), 0);
    }

    #[test]
    fn an_outbox_without_a_byte_bound_counts_no_bytes() {
        let ob: Outbox<SinkDelivery> = Outbox::new(2);
        ob.push(sized(1, 1 << 20, false));
        assert_eq!(ob.bytes(), 0);
        assert!(ob.has_room());
    }

    #[test]
    fn cookies_grow_from_one_to_many() {
        let mut c = Cookies::One(1);
        c.push(2);
        assert_eq!(c.as_slice(), &[1, 2]);
    }

    #[test]
    fn a_producer_turned_away_is_remembered_until_the_owner_asks() {
        let ob: Outbox<u8> = Outbox::new(1);
        assert!(ob.has_room_or_starve());
        ob.push(1);
        assert!(!ob.has_room_or_starve());
        let mut out = Vec::new();
        ob.drain_into(&mut out);
        assert!(ob.take_starved());
        assert!(!ob.take_starved());
    }

    /// A producer that stops when turned away and an owner that prompts it after draining, on
    /// two threads, many times: the lock-free mark is never missed (a miss leaves the producer
    /// waiting for a prompt that never comes).
    #[test]
    fn a_producer_turned_away_is_never_forgotten_across_threads() {
        use std::sync::mpsc;
        const ITEMS: u32 = 20_000;
        let ob: Arc<Outbox<u32>> = Arc::new(Outbox::new(2));
        let (prompt, prompted) = mpsc::channel::<()>();
        let producer = {
            let ob = ob.clone();
            std::thread::spawn(move || {
                for n in 0..ITEMS {
                    while !ob.has_room_or_starve() {
                        prompted.recv_timeout(Duration::from_secs(5)).expect("a starved producer was not prompted");
                    }
                    ob.push(n);
                }
            })
        };
        let mut got = Vec::new();
        // As a connection does: the mark is looked at only after a drain that took something.
        while got.len() < ITEMS as usize && !producer.is_finished() {
            if ob.drain_into(&mut got) > 0 && ob.take_starved() {
                let _ = prompt.send(());
            }
            std::thread::yield_now();
        }
        producer.join().unwrap();
        ob.drain_into(&mut got);
        assert!(got.iter().copied().eq(0..ITEMS));
    }

    #[tokio::test]
    async fn a_push_before_waiting_is_not_missed() {
        let ob: Outbox<u8> = Outbox::new(4);
        ob.try_push(1).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), ob.notified()).await.expect("permit stored");
    }

    #[test]
    fn a_subscriber_that_does_not_drain_within_the_pause_lags_until_it_drains() {
        let sink = DirectSink::with_max_queued(Outbox::new(2), 3);
        for n in 0..2 {
            assert_eq!(sink.offer(delivery(n), 0), Offer::Accepted);
        }
        assert_eq!(sink.offer(delivery(2), 0), Offer::Congested);
        // The publisher waited the whole pause for nothing.
        assert!(sink.outbox().waited(false, CONGESTION_PAUSE, 0, 10));
        // Nobody is held back for it any more: QoS 0 past the capacity is dropped, QoS 1/2 up
        // to max_queued goes in without congestion, and past it is dropped too.
        assert_eq!(sink.offer(delivery(3), 20), Offer::Dropped);
        assert_eq!(sink.offer(persistent(4), 20), Offer::Dropped, "3 waiting: max_queued reached");
        let mut out = Vec::new();
        sink.outbox().drain_into(&mut out);
        assert_eq!(sink.offer(persistent(5), 20), Offer::Accepted);
        assert_eq!(sink.offer(persistent(6), 20), Offer::Accepted);
        assert_eq!(sink.offer(persistent(7), 20), Offer::Accepted, "over capacity, not congested: lagging");
        assert_eq!(sink.offer(persistent(8), 20), Offer::Dropped);
        // It drained, and its first lagging second is over: it holds publishers back again.
        sink.outbox().drain_into(&mut out);
        assert!(!sink.outbox().is_lagging(1_010));
        sink.offer(delivery(9), 1_010);
        sink.offer(delivery(10), 1_010);
        assert_eq!(sink.offer(delivery(11), 1_010), Offer::Congested);
    }

    #[test]
    fn slow_drains_lag_for_longer_each_time() {
        let ob: Outbox<u8> = Outbox::new(1);
        assert!(!ob.waited(true, Duration::from_millis(5), 1, 0), "a quick drain is what keeping up looks like");
        assert!(
            !ob.waited(false, CONGESTION_PAUSE, 50, 0),
            "a publisher that lost the race for room 50 times: the subscriber kept draining"
        );
        assert!(!ob.is_lagging(0));
        let mut now = 0;
        let mut holds = Vec::new();
        for _ in 0..9 {
            assert!(ob.waited(true, SLOW_DRAIN, 1, now));
            let mut t = now;
            while ob.is_lagging(t) {
                t += 100;
            }
            holds.push(t - now);
            now = t;
        }
        assert_eq!(holds, [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 64_000, 64_000]);
        // Long after, it starts again from one second.
        now += LAG_MEMORY + 1;
        ob.waited(true, SLOW_DRAIN, 1, now);
        assert!(ob.is_lagging(now + 999) && !ob.is_lagging(now + 1_000));
    }
}

//! Direct sinks: destinations that are not queues.
//!
//! A transient subscriber (an MQTT clean session with no expiry) needs no queue state: routing
//! pushes straight into its connection's bounded [`Outbox`], like RabbitMQ's QoS 0
//! pseudo-queue. When the outbox is full the message is dropped and counted — this is what
//! keeps a million idle sensors cheap and a slow transient subscriber from growing memory
//! without bound. Nothing that needs an acknowledgement goes to a direct sink.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::task::{Context, Poll};

use tokio::sync::Notify;

use crate::message::{ConnectionId, Message};
use crate::signal::Signal;

/// A bounded multi-producer, single-consumer mailbox for one connection's task. Producers
/// never block: [`Outbox::try_push`] hands the item back when full. The owner waits with
/// [`Outbox::notified`] (or polls [`Outbox::poll_notified`]) and drains everything ready in one
/// go (coalesced writes).
pub struct Outbox<T> {
    items: Mutex<VecDeque<T>>,
    capacity: usize,
    notify: Signal,
    /// Woken when the owner drains: publishers held back by a full outbox wait on it.
    drained: Notify,
    /// A producer found the outbox full ([`Outbox::has_room_or_starve`]) and stopped; the owner
    /// must prompt it again after draining ([`Outbox::take_starved`]).
    starved: std::sync::atomic::AtomicBool,
}

impl<T> fmt::Debug for Outbox<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox").field("len", &self.len()).field("capacity", &self.capacity).finish()
    }
}

impl<T> Outbox<T> {
    pub fn new(capacity: usize) -> Outbox<T> {
        Outbox {
            items: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            notify: Signal::new(),
            drained: Notify::new(),
            starved: std::sync::atomic::AtomicBool::new(false),
        }
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn len(&self) -> usize {
        self.items.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn has_room(&self) -> bool {
        self.len() < self.capacity
    }
    /// [`Outbox::has_room`] for a producer that stops when it is full and waits to be prompted
    /// (a queue delivering to a consumer): a `false` is remembered, under the same lock the
    /// owner drains with, so the owner cannot miss it.
    pub fn has_room_or_starve(&self) -> bool {
        let q = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let room = q.len() < self.capacity;
        if !room {
            self.starved.store(true, Ordering::Relaxed);
        }
        room
    }
    /// Whether a producer went without room since the last call (call after draining).
    pub fn take_starved(&self) -> bool {
        self.starved.swap(false, Ordering::Relaxed)
    }
    /// Adds an item, or gives it back when the outbox is full.
    pub fn try_push(&self, item: T) -> Result<(), T> {
        let mut q = self.items.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.capacity {
            return Err(item);
        }
        let was_empty = q.is_empty();
        q.push_back(item);
        drop(q);
        if was_empty {
            self.notify.notify();
        }
        Ok(())
    }
    /// Adds an item whatever the capacity. Only for producers that are bounded some other way:
    /// queue consumers, whose deliveries are bounded by their prefetch credit (the queue checks
    /// [`Outbox::has_room`] first, but two queues feeding one outbox may both pass that check).
    pub fn push(&self, item: T) {
        let mut q = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let was_empty = q.is_empty();
        q.push_back(item);
        drop(q);
        if was_empty {
            self.notify.notify();
        }
    }

    /// Moves every ready item into `out`; returns how many.
    pub fn drain_into(&self, out: &mut Vec<T>) -> usize {
        let mut q = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let n = q.len();
        out.extend(q.drain(..));
        drop(q);
        if n > 0 {
            self.drained.notify_waiters();
        }
        n
    }
    /// Every ready item, in a vector made for them (none when there are none): for an owner
    /// that keeps no scratch vector. The lock is held only for the copy, not while the owner
    /// handles them (producers contend for it: 50 publishers feeding one subscriber).
    pub fn drain_all(&self) -> Vec<T> {
        let mut q = self.items.lock().unwrap_or_else(|e| e.into_inner());
        if q.is_empty() {
            return Vec::new();
        }
        let items: Vec<T> = q.drain(..).collect();
        drop(q);
        self.drained.notify_waiters();
        items
    }
    /// Resolves once the outbox has room (at once if it has). For publishers that were told a
    /// destination is congested: they stop reading their socket until this resolves.
    pub async fn room(&self) {
        loop {
            let drained = self.drained.notified();
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
        self.notify.notified().await
    }
    /// [`Outbox::notified`] without a future: `Ready` after a push into an empty outbox,
    /// otherwise the task is woken by the next one.
    pub fn poll_notified(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.notify.poll(cx)
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
    /// Accepted over capacity: the publisher should wait for [`Outbox::room`].
    Congested,
    /// A transient message met a full outbox.
    Dropped,
}

/// A broker-wide unique sink number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SinkId(pub u64);

/// A queue-less destination feeding one connection's outbox.
#[derive(Debug)]
pub struct DirectSink {
    id: SinkId,
    connection: ConnectionId,
    outbox: Arc<Outbox<SinkDelivery>>,
    dropped: AtomicU64,
    delivered: AtomicU64,
}

impl DirectSink {
    pub fn new(connection: ConnectionId, outbox: Arc<Outbox<SinkDelivery>>) -> Arc<DirectSink> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Arc::new(DirectSink {
            id: SinkId(NEXT.fetch_add(1, Ordering::Relaxed)),
            connection,
            outbox,
            dropped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        })
    }
    pub fn id(&self) -> SinkId {
        self.id
    }
    pub fn connection(&self) -> ConnectionId {
        self.connection
    }
    pub fn outbox(&self) -> &Arc<Outbox<SinkDelivery>> {
        &self.outbox
    }
    /// Offers a message. Past the outbox's capacity the sink is *congested*: the message goes in
    /// and the publisher is told to stop reading until [`Outbox::room`], so a fast publisher is
    /// slowed rather than its messages lost. A transient message (MQTT QoS 0) is dropped and
    /// counted only past twice the capacity (many publishers at once, or one that does not
    /// wait); a persistent one (QoS 1/2, whose publisher may already hold its PUBACK) is never
    /// dropped. The overshoot is bounded by the publishers' pauses.
    pub fn offer(&self, delivery: SinkDelivery) -> Offer {
        let len = self.outbox.len();
        let capacity = self.outbox.capacity();
        if !delivery.message.is_persistent() && len >= capacity.saturating_mul(2) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Offer::Dropped;
        }
        self.outbox.push(delivery);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if len >= capacity {
            Offer::Congested
        } else {
            Offer::Accepted
        }
    }
    /// Messages dropped because the outbox was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn delivery(n: u8) -> SinkDelivery {
        SinkDelivery { message: Arc::new(Message::new("", "k", Bytes::from(vec![n]))), cookies: Cookies::One(7) }
    }

    #[test]
    fn a_full_sink_slows_then_drops_transient_messages_and_counts() {
        let sink = DirectSink::new(ConnectionId(1), Arc::new(Outbox::new(2)));
        assert_eq!(sink.offer(delivery(1)), Offer::Accepted);
        assert_eq!(sink.offer(delivery(2)), Offer::Accepted);
        assert_eq!(sink.offer(delivery(3)), Offer::Congested, "over capacity: the publisher is slowed");
        assert_eq!(sink.offer(delivery(4)), Offer::Congested);
        assert_eq!(sink.offer(delivery(5)), Offer::Dropped, "past twice the capacity QoS 0 is dropped");
        assert_eq!((sink.delivered(), sink.dropped()), (4, 1));
        let mut out = Vec::new();
        assert_eq!(sink.outbox().drain_into(&mut out), 4);
        assert_eq!(out[0].message.payload[0], 1);
        assert_eq!(sink.offer(delivery(6)), Offer::Accepted);
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
        let sink = DirectSink::new(ConnectionId(1), Arc::new(Outbox::new(1)));
        assert_eq!(sink.offer(persistent(1)), Offer::Accepted);
        assert_eq!(sink.offer(persistent(2)), Offer::Congested);
        assert_eq!((sink.outbox().len(), sink.dropped()), (2, 0));
        let outbox = sink.outbox().clone();
        let waiter = tokio::spawn(async move { outbox.room().await });
        let mut out = Vec::new();
        sink.outbox().drain_into(&mut out);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("room after a drain").unwrap();
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

    #[tokio::test]
    async fn a_push_before_waiting_is_not_missed() {
        let ob: Outbox<u8> = Outbox::new(4);
        ob.try_push(1).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), ob.notified()).await.expect("permit stored");
    }
}

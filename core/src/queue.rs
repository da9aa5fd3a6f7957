//! Queues: the ready FIFO, the unacked map, consumers with credit, TTL, length limits,
//! dead-lettering, priorities, single active consumer and consumer priority.
//!
//! A queue is sans-I/O: every operation takes the current time and returns [`Effects`] for the
//! caller (the vhost) to carry out after the queue's lock is released — dead letters to route,
//! persistent messages to forget in the store, a request to delete the queue. Deliveries are
//! pushed into each consumer's [`ConsumerSink`], which never blocks.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::CoreError;
use crate::message::{ConnectionId, FieldTable, Message, Millis, ShortString};

/// Queue names are short strings.
pub type QueueName = ShortString;

/// A broker-wide unique consumer number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub u64);

impl ConsumerId {
    pub fn next() -> ConsumerId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ConsumerId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Who holds unacked messages: an AMQP channel or an MQTT session. When the owner goes away
/// ([`Queue::release_owner`]) its unacked messages return to the queue, marked redelivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerId(pub u64);

impl OwnerId {
    pub fn next() -> OwnerId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        OwnerId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// What a queue does when `x-max-length` or `x-max-length-bytes` is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest ready message to make room (RabbitMQ's default).
    #[default]
    DropHead,
    /// Refuse the new message; a confirming publisher gets a nack.
    RejectPublish,
    /// Refuse the new message and dead-letter it.
    RejectPublishDlx,
}

/// The queue arguments the core understands, parsed and validated from the declare arguments.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueArgs {
    /// `x-message-ttl`, milliseconds.
    pub message_ttl: Option<u64>,
    /// `x-expires`, milliseconds without use before the queue is deleted.
    pub expires: Option<u64>,
    /// `x-max-length`, ready messages.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`, total body bytes of ready messages.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-dead-letter-exchange` (the empty string is the default exchange).
    pub dead_letter_exchange: Option<ShortString>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<ShortString>,
    /// `x-max-priority` (1..=255).
    pub max_priority: Option<u8>,
    /// `x-single-active-consumer`.
    pub single_active_consumer: bool,
}

impl QueueArgs {
    /// Parses and validates declare arguments the way RabbitMQ does; an invalid value is a
    /// [`CoreError::PreconditionFailed`] naming the argument. Unknown arguments are ignored.
    pub fn from_table(_table: &FieldTable) -> Result<QueueArgs, CoreError> {
        unimplemented!("queue helper")
    }
}

/// How a queue was declared.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueOptions {
    pub durable: bool,
    /// The connection that owns an exclusive queue.
    pub exclusive: Option<ConnectionId>,
    pub auto_delete: bool,
    /// The declare arguments as sent (kept for equivalence checks and for the store).
    pub arguments: FieldTable,
}

/// The receiving end of a consumer, implemented by the frontends (and by test sinks).
/// Called with the queue's lock held: it must not block and must not call back into the queue.
pub trait ConsumerSink: Send + Sync + fmt::Debug {
    /// Whether the consumer's connection can take another delivery now (room in its outbox,
    /// channel-wide prefetch). When it returns false the queue stops delivering to it until
    /// [`Queue::pump`] is called.
    fn has_room(&self) -> bool;
    /// Hands over a delivery.
    fn deliver(&self, delivery: Delivery);
    /// The broker cancelled this consumer (its queue was deleted): AMQP's consumer cancel
    /// notification.
    fn cancelled(&self, _queue: &QueueName, _consumer: ConsumerId) {}
}

/// A consumer subscribing to a queue.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub tag: ShortString,
    pub owner: OwnerId,
    pub connection: ConnectionId,
    /// Per-consumer prefetch: unacked deliveries allowed at once; 0 means no limit.
    pub prefetch: u32,
    /// Deliveries count as acked when sent.
    pub no_ack: bool,
    /// No other consumer may join while this one is there.
    pub exclusive: bool,
    /// `x-priority`: higher-priority consumers are served first while they have credit.
    pub priority: i32,
    pub sink: Arc<dyn ConsumerSink>,
}

/// A message handed to a consumer or returned by [`Queue::get`].
#[derive(Debug, Clone)]
pub struct Delivery {
    pub queue: QueueName,
    /// `None` for a `get`.
    pub consumer: Option<ConsumerId>,
    /// The message's number in this queue; acks and rejects name it.
    pub seq: u64,
    pub message: Arc<Message>,
    pub redelivered: bool,
}

/// Why a message was dead-lettered (the `reason` in `x-death`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    Rejected,
    Expired,
    MaxLen,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::Expired => "expired",
            DeadLetterReason::MaxLen => "maxlen",
        }
    }
}

/// A message leaving a queue for its dead-letter exchange. `message` already carries the
/// updated `x-death`, `x-first-death-*` and `x-last-death-*` headers, and its exchange and
/// routing key are the ones to route it with.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub message: Arc<Message>,
}

/// What the caller must do after a queue operation, once the queue's lock is released.
#[derive(Debug, Default)]
pub struct Effects {
    /// Route these through their exchanges.
    pub dead_letters: Vec<DeadLetter>,
    /// Sequence numbers of persistent messages of a durable queue that left the queue for good
    /// (acked, dropped, expired, purged, dead-lettered): the store deletes them.
    pub forgotten: Vec<u64>,
    /// The queue asks to be deleted: auto-delete after its last consumer left, or `x-expires`.
    pub delete_queue: bool,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.dead_letters.is_empty() && self.forgotten.is_empty() && !self.delete_queue
    }
    pub fn merge(&mut self, other: Effects) {
        self.dead_letters.extend(other.dead_letters);
        self.forgotten.extend(other.forgotten);
        self.delete_queue |= other.delete_queue;
    }
}

/// The result of offering a message to a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// The queue took it (it may already have been delivered).
    Accepted { seq: u64 },
    /// `x-overflow = reject-publish(-dlx)` and the queue is full: a confirming publisher gets a
    /// nack.
    Rejected,
}

/// Counts reported by declare-ok, purge, delete and management.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    pub ready: u32,
    pub unacked: u32,
    pub consumers: u32,
    pub ready_bytes: u64,
}

/// A queue.
#[derive(Debug)]
pub struct Queue {
    name: QueueName,
    options: QueueOptions,
    args: QueueArgs,
    #[allow(dead_code)]
    state: Mutex<()>,
}

impl Queue {
    /// Makes a queue; validates `options.arguments` into [`QueueArgs`].
    pub fn new(name: QueueName, options: QueueOptions, now: Millis) -> Result<Queue, CoreError> {
        let _ = now;
        let args = QueueArgs::from_table(&options.arguments)?;
        Ok(Queue { name, options, args, state: Mutex::new(()) })
    }
    pub fn name(&self) -> &QueueName {
        &self.name
    }
    pub fn options(&self) -> &QueueOptions {
        &self.options
    }
    pub fn args(&self) -> &QueueArgs {
        &self.args
    }
    /// Offers a message; delivers at once to a consumer with room, or keeps it ready.
    pub fn enqueue(&self, _message: Arc<Message>, _now: Millis) -> (EnqueueOutcome, Effects) {
        unimplemented!("queue helper")
    }
    /// Adds a consumer. Refused with `AccessRefused` when an exclusive consumer is there or
    /// when `spec.exclusive` and any consumer is there.
    pub fn consume(&self, _spec: ConsumerSpec, _now: Millis) -> Result<(ConsumerId, Effects), CoreError> {
        unimplemented!("queue helper")
    }
    /// Removes a consumer; its unacked messages stay with its owner.
    pub fn cancel(&self, _consumer: ConsumerId, _now: Millis) -> Effects {
        unimplemented!("queue helper")
    }
    /// Takes one ready message (AMQP basic.get), with the count of messages left.
    pub fn get(&self, _owner: OwnerId, _no_ack: bool, _now: Millis) -> (Option<(Delivery, u32)>, Effects) {
        unimplemented!("queue helper")
    }
    /// Acknowledges an unacked message.
    pub fn ack(&self, _seq: u64, _now: Millis) -> Result<Effects, CoreError> {
        unimplemented!("queue helper")
    }
    /// Rejects an unacked message: back to its place in the queue (redelivered) or dead-lettered.
    pub fn reject(&self, _seq: u64, _requeue: bool, _now: Millis) -> Result<Effects, CoreError> {
        unimplemented!("queue helper")
    }
    /// Requeues every unacked message of `owner` (channel closed, basic.recover requeue=true).
    pub fn release_owner(&self, _owner: OwnerId, _now: Millis) -> Effects {
        unimplemented!("queue helper")
    }
    /// Delivers to consumers that have room again.
    pub fn pump(&self, _now: Millis) -> Effects {
        unimplemented!("queue helper")
    }
    /// Expires messages whose TTL has passed, checks `x-expires`; returns the next deadline.
    pub fn tick(&self, _now: Millis) -> (Effects, Option<Millis>) {
        unimplemented!("queue helper")
    }
    /// Marks the queue as used now (a redeclare), for `x-expires`.
    pub fn touch(&self, _now: Millis) {
        unimplemented!("queue helper")
    }
    /// Removes every ready message; returns how many.
    pub fn purge(&self, _now: Millis) -> (u32, Effects) {
        unimplemented!("queue helper")
    }
    /// Checks delete's `if_unused` / `if_empty` conditions.
    pub fn check_delete(&self, _if_unused: bool, _if_empty: bool) -> Result<(), CoreError> {
        unimplemented!("queue helper")
    }
    /// Tears the queue down: cancels every consumer (notifying their sinks) and returns the
    /// number of messages it held.
    pub fn shutdown(&self) -> (u32, Effects) {
        unimplemented!("queue helper")
    }
    pub fn stats(&self) -> QueueStats {
        unimplemented!("queue helper")
    }
}

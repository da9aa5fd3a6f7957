//! Queues: the ready FIFO, the unacked map, consumers with credit, TTL, length limits,
//! dead-lettering, priorities, single active consumer and consumer priority.
//!
//! A queue is sans-I/O: every operation takes the current time and returns [`Effects`] for the
//! caller (the vhost) to carry out after the queue's lock is released — dead letters to route,
//! persistent messages to forget in the store, a request to delete the queue. Deliveries are
//! pushed into each consumer's [`ConsumerSink`], which never blocks.
//!
//! # Locks
//!
//! How the core's locks nest, outermost first; a lock is never taken while a later one in this
//! list is held, and none is held across an `.await`:
//!
//! 1. The vhost's `exchanges` / `queues` maps and the broker's `vhosts` (`RwLock`): held to look
//!    up or clone an `Arc`, and by the default exchange while it checks the installed
//!    `TopicPolicy` (an `ArcSwap` load, no lock). Nothing else is taken under them.
//! 2. An exchange's binding `table` (`RwLock`, read to route): the router collects targets
//!    under it and takes no other lock; the deliveries happen after it is released.
//! 3. A queue's `state` (`Mutex`, this module): at most one queue's at a time. Dead letters and
//!    deletions come out as [`Effects`], carried out after it is released. Under it the queue
//!    asks consumers [`ConsumerSink::has_room`] — lock-free in both frontends' sinks (an
//!    atomic mirror of the outbox length, channel credit in atomics), so choosing a consumer
//!    for a message takes no other lock — and hands deliveries to [`ConsumerSink::deliver`].
//!    Publishers held back by an `x-overflow = block` queue are released through the
//!    [`Effects`] too: each is told when the effects are dropped, after the lock is released.
//! 4. An outbox's `items` (`Mutex`, `sink.rs`): a leaf, taken by `deliver` / `offer` to push and
//!    by its owner to drain; released before the owner's [`crate::signal::Signal`] is
//!    notified.
//! 5. Leaves, never held with another: an outbox's `lag`, a `Signal`'s state (wakers are woken
//!    after it is released), the retained store's map, the login throttle's table.
//!
//! # Publishers held back by a queue that falls behind
//!
//! A queue whose consumers do not keep up holds its publishers back, as a congested outbox
//! does ([`crate::flow`]): past [`BACKLOG_HIGH`] ready messages (or [`BACKLOG_HIGH_BYTES`]) it
//! tells each publish it takes ([`Effects::congested`]), and the publisher's connection stops
//! reading until the queue is back to half of that ([`Queue::room`]), at most
//! [`crate::flow::CONGESTION_PAUSE`]. This is RabbitMQ's credit flow in effect: 16 publishers
//! into one queue are held to its consumer's pace instead of growing it until the memory alarm.
//! Only consumers that ask for it count ([`ConsumerSink::paces_publishers`]: AMQP's; MQTT
//! sessions and bridges keep their own bounds), so a queue nobody consumes from (a work queue
//! filling overnight) holds nobody and grows until the memory alarm, as in RabbitMQ. A queue
//! whose consumers did not drain within the pause, or drained slowly, is *lagging* by the
//! outbox's rule ([`Queue::waited`]) and holds nobody for a while. A publisher is never held by
//! a queue its own connection consumes from: that would hold back its acks too.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::error::CoreError;
use crate::hash::FastMap;
use crate::message::{ConnectionId, FieldTable, FieldValue, Message, Millis, ShortString};
use crate::sink::Lag;
use crate::store::{Commit, StoreError};

/// A queue with consumers that holds this many ready messages holds its publishers back (see
/// the module's documentation), until it is down to [`BACKLOG_LOW`]. At 45,000 deliveries a
/// second (one AMQP consumer of persistent messages on 2 CPUs) this is ~90 ms of waiting.
pub const BACKLOG_HIGH: u64 = 4_096;
/// Where a queue that held its publishers back lets them go again.
pub const BACKLOG_LOW: u64 = BACKLOG_HIGH / 2;
/// [`BACKLOG_HIGH`] in body bytes: large messages are held back by their bytes first.
pub const BACKLOG_HIGH_BYTES: u64 = 8 << 20;
/// [`BACKLOG_LOW`] in body bytes.
pub const BACKLOG_LOW_BYTES: u64 = BACKLOG_HIGH_BYTES / 2;

/// Queue names are short strings.
pub type QueueName = ShortString;

/// A queue that pages ([`pages`]) keeps at most this many ready messages in memory (or
/// [`PAGE_WINDOW_BYTES`]); the ones after them wait in its tail on disk, read back when memory
/// holds three quarters of the window or less (`want_load`). Above [`BACKLOG_HIGH`]: a
/// queue whose consumers keep up (and pace its publishers) never gets there, so it never pages.
/// Chosen by measurement (docs/benchmarks.md, "Queues larger than memory"): with 4,096 a consumer
/// draining a tail of 1 KiB messages sometimes waited for the loads (59–118k msgs/s over two
/// runs), with 16,384 it did not (107–111k), at the same CPU per message; 16 MiB of 1 KiB
/// messages in memory is the price. 32,768 / 32 MiB was no better while another process flooded
/// the disk (+9, +13 and −5 % in three rounds) and 12–14 % slower on a quiet machine at 27–29 %
/// more CPU per message ("A reproducible busy machine"): not taken.
pub const PAGE_WINDOW: u64 = 16_384;
/// [`PAGE_WINDOW`] in body bytes.
pub const PAGE_WINDOW_BYTES: u64 = 16 << 20;

/// Whether a queue declared so pages its ready messages to disk past [`PAGE_WINDOW`]: a durable,
/// non-exclusive queue (the store holds it) with one priority level. A priority queue does not
/// (its levels would each need a tail, and a message's place depends on its priority, not on
/// its sequence), nor a queue the store does not hold (non-durable or exclusive).
pub fn pages(name: &QueueName, options: &QueueOptions) -> bool {
    // (The tail's messages are counted against `x-max-length` and dropped from the head by
    // `drop-head` once they are back in memory, so length limits and dead-lettering do not stop a
    // queue from paging.)
    options.durable
        && options.exclusive.is_none()
        && QueueArgs::from_table_for(name, &options.arguments).is_ok_and(|a| a.max_priority.is_none())
}

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
    /// `block` (Ferry's own; RabbitMQ has no such value): a publisher that waits for an
    /// acknowledgement has its message taken past the limit, and its acknowledgement held until
    /// the queue is back within its limits ([`Queue::enqueue_waiting`]); a publisher that
    /// waits for nothing is refused, as with `reject-publish`.
    Block,
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
    /// `x-ferry-transient-needs-consumer` (Ferry's own): a transient message arriving while the
    /// queue has no consumer is dropped instead of kept. MQTT persistent sessions use it so
    /// QoS 0 messages are not queued while the client is away (Mosquitto's default,
    /// `queue_qos0_messages false`).
    pub transient_needs_consumer: bool,
}

/// The largest `x-message-ttl` / `x-expires` RabbitMQ accepts (`?MAX_EXPIRY_TIMER`, 2^32 - 1 ms).
const MAX_EXPIRY_MILLIS: i128 = 4_294_967_295;

/// The AMQP type name RabbitMQ uses for a field value in `{unacceptable_type,…}` errors.
fn type_name(v: &FieldValue) -> &'static str {
    match v {
        FieldValue::Bool(_) => "bool",
        FieldValue::I8(_) => "byte",
        FieldValue::U8(_) => "unsignedbyte",
        FieldValue::I16(_) => "short",
        FieldValue::U16(_) => "unsignedshort",
        FieldValue::I32(_) => "signedint",
        FieldValue::U32(_) => "unsignedint",
        FieldValue::I64(_) | FieldValue::U64(_) => "long",
        FieldValue::F32(_) => "float",
        FieldValue::F64(_) => "double",
        FieldValue::Decimal(_) => "decimal",
        FieldValue::LongString(_) => "longstr",
        FieldValue::Bytes(_) => "binary",
        FieldValue::Array(_) => "array",
        FieldValue::Timestamp(_) => "timestamp",
        FieldValue::Table(_) => "table",
        FieldValue::Void => "void",
    }
}

/// Any integer width, as RabbitMQ accepts for numeric arguments (`i128` so a `u64` above
/// `i64::MAX` is still a number, not a type error).
fn int_value(v: &FieldValue) -> Option<i128> {
    match *v {
        FieldValue::U64(n) => Some(n as i128),
        _ => v.as_i64().map(i128::from),
    }
}

/// Reads declare arguments for one queue, wording errors as RabbitMQ does.
struct ArgReader<'a> {
    queue: &'a str,
    table: &'a FieldTable,
}

impl<'a> ArgReader<'a> {
    fn invalid(&self, key: &str, detail: impl fmt::Display) -> CoreError {
        CoreError::PreconditionFailed(format!("invalid arg '{key}' for queue '{}': {detail}", self.queue))
    }
    fn unacceptable(&self, key: &str, v: &FieldValue) -> CoreError {
        self.invalid(key, format_args!("{{unacceptable_type,{}}}", type_name(v)))
    }
    fn int(&self, key: &str) -> Result<Option<i128>, CoreError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(v) => int_value(v).map(Some).ok_or_else(|| self.unacceptable(key, v)),
        }
    }
    fn non_negative(&self, key: &str) -> Result<Option<u64>, CoreError> {
        match self.int(key)? {
            None => Ok(None),
            Some(n) if n < 0 => Err(self.invalid(key, format_args!("{{value_negative,{n}}}"))),
            Some(n) => Ok(Some(u64::try_from(n).unwrap_or(u64::MAX))),
        }
    }
    fn expiry(&self, key: &str, zero_allowed: bool) -> Result<Option<u64>, CoreError> {
        match self.int(key)? {
            None => Ok(None),
            Some(0) if !zero_allowed => Err(self.invalid(key, "{value_zero,0}")),
            Some(n) if n < 0 => Err(self.invalid(key, format_args!("{{value_negative,{n}}}"))),
            Some(n) if n > MAX_EXPIRY_MILLIS => Err(self.invalid(key, format_args!("{{value_too_large,{n}}}"))),
            Some(n) => Ok(Some(n as u64)),
        }
    }
    /// A long string (`S`), kept as the bytes received.
    fn longstr(&self, key: &str) -> Result<Option<&'a Bytes>, CoreError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(FieldValue::LongString(b)) => Ok(Some(b)),
            Some(v) => Err(self.unacceptable(key, v)),
        }
    }
}

impl QueueArgs {
    /// Parses and validates declare arguments the way RabbitMQ does; an invalid value is a
    /// [`CoreError::PreconditionFailed`] naming the argument. Unknown arguments are ignored.
    /// The queue's name is not known here, so errors say `for queue ''`; [`QueueArgs::from_table_for`]
    /// (used by [`Queue::new`]) names it.
    pub fn from_table(table: &FieldTable) -> Result<QueueArgs, CoreError> {
        QueueArgs::parse("", table)
    }

    /// [`QueueArgs::from_table`] with the queue's name in error texts, as RabbitMQ words them:
    /// `invalid arg 'x-message-ttl' for queue 'q': {value_negative,-1}`.
    pub fn from_table_for(queue: &QueueName, table: &FieldTable) -> Result<QueueArgs, CoreError> {
        QueueArgs::parse(&queue.to_string_lossy(), table)
    }

    fn parse(queue: &str, table: &FieldTable) -> Result<QueueArgs, CoreError> {
        let r = ArgReader { queue, table };
        if let Some(v) = table.get("x-queue-type") {
            match v {
                FieldValue::LongString(b) if b.as_ref() == b"classic" => {}
                FieldValue::LongString(b) => {
                    return Err(r.invalid(
                        "x-queue-type",
                        format_args!("{{unsupported_queue_type,{}}}", String::from_utf8_lossy(b)),
                    ))
                }
                v => return Err(r.unacceptable("x-queue-type", v)),
            }
        }
        let overflow = match r.longstr("x-overflow")? {
            None => Overflow::DropHead,
            Some(b) => match b.as_ref() {
                b"drop-head" => Overflow::DropHead,
                b"reject-publish" => Overflow::RejectPublish,
                b"reject-publish-dlx" => Overflow::RejectPublishDlx,
                b"block" => Overflow::Block,
                _ => return Err(r.invalid("x-overflow", "invalid_overflow")),
            },
        };
        let dead_letter_exchange = r.longstr("x-dead-letter-exchange")?.map(|b| ShortString::from_bytes(b.clone()));
        let dead_letter_routing_key =
            r.longstr("x-dead-letter-routing-key")?.map(|b| ShortString::from_bytes(b.clone()));
        if dead_letter_routing_key.is_some() && dead_letter_exchange.is_none() {
            return Err(r.invalid("x-dead-letter-routing-key", "routing_key_but_no_dlx_defined"));
        }
        let max_priority = match r.non_negative("x-max-priority")? {
            None | Some(0) => None,
            Some(n) => Some(
                u8::try_from(n).map_err(|_| r.invalid("x-max-priority", format_args!("{{max_value_exceeded,{n}}}")))?,
            ),
        };
        let single_active_consumer = match table.get("x-single-active-consumer") {
            None => false,
            Some(FieldValue::Bool(b)) => *b,
            Some(v) => return Err(r.unacceptable("x-single-active-consumer", v)),
        };
        let transient_needs_consumer = match table.get("x-ferry-transient-needs-consumer") {
            None => false,
            Some(FieldValue::Bool(b)) => *b,
            Some(v) => return Err(r.unacceptable("x-ferry-transient-needs-consumer", v)),
        };
        Ok(QueueArgs {
            transient_needs_consumer,
            message_ttl: r.expiry("x-message-ttl", true)?,
            expires: r.expiry("x-expires", false)?,
            max_length: r.non_negative("x-max-length")?,
            max_length_bytes: r.non_negative("x-max-length-bytes")?,
            overflow,
            dead_letter_exchange,
            dead_letter_routing_key,
            max_priority,
            single_active_consumer,
        })
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
    /// Whether the queue holds its publishers back to this consumer's pace when it falls behind
    /// (see the module's documentation). Asked once, when it starts consuming.
    fn paces_publishers(&self) -> bool {
        false
    }
    /// Whether a message handed to this consumer is marked delivered in the store, so that after
    /// a restart it comes back flagged redelivered (asked once, when it starts consuming). A
    /// consumer that says no (a bridge's link: its only use of the flag is MQTT's DUP, which
    /// means "perhaps sent before") saves the store a write per message, and gets every message
    /// restored at start-up flagged redelivered instead: it may have had any of them before.
    fn records_deliveries(&self) -> bool {
        true
    }
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

/// A consumer as listings show it ([`Queue::consumers`]).
#[derive(Debug, Clone)]
pub struct ConsumerInfo {
    pub id: ConsumerId,
    pub tag: ShortString,
    pub owner: OwnerId,
    pub connection: ConnectionId,
    pub prefetch: u32,
    pub no_ack: bool,
    pub exclusive: bool,
    pub priority: i32,
    /// Unacked deliveries to it.
    pub unacked: u32,
    /// Whether the queue serves it: always, except the waiting ones of a single active
    /// consumer queue.
    pub active: bool,
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
    /// Sequence numbers of persistent messages of a durable queue handed out for the first time
    /// to a consumer that must ack them: the store marks them, so that after a restart they come
    /// back with the redelivered flag.
    pub delivered: Vec<u64>,
    /// The queue asks to be deleted: auto-delete after its last consumer left, or `x-expires`.
    pub delete_queue: bool,
    /// The queue's next deadline (its head message's TTL, `x-expires`) is now earlier than the
    /// one it last reported: the caller arms the broker's [`Timer`](crate::timer::Timer) for it.
    pub deadline: Option<Millis>,
    /// Publishers an `x-overflow = block` queue held back, released because it is back within
    /// its limits (or purged, or deleted). Each is told when these effects are dropped — after
    /// the queue's lock is released, since the effects outlive it — so nothing is ever woken
    /// under a queue's lock and nothing the caller forgets to carry out holds a publisher.
    pub(crate) released: Vec<Waiter>,
    /// The queue took the message but falls behind its consumers: its publisher should stop
    /// reading until it has room ([`Queue::room`]; see the module's documentation).
    pub congested: bool,
    /// The publishers waiting for this queue to have room ([`Queue::room`]) go: woken when these
    /// effects are dropped, like `released`.
    pub(crate) unheld: Option<Unheld>,
    /// The message just enqueued went to the queue's tail on disk ([`pages`]): the store must
    /// hold it even if it is transient (the queue keeps nothing of it in memory).
    pub paged: bool,
    /// The queue asks for messages of its tail to be read back ([`crate::store::Store::read_range`])
    /// and handed to [`Queue::loaded`].
    pub load: Option<Load>,
    /// A range of sequence numbers whose stored messages left for good (a purge of the tail): the
    /// store deletes them with one `DeleteRange`.
    pub forgotten_range: Option<(u64, u64)>,
    /// Like `forgotten`, for messages whose put is committed (read back from the tail, or
    /// recovered), in runs of consecutive sequence numbers `(first, last)`: a queue draining its
    /// tail to no-ack consumers, or acked in order, forgets its head in order, and the store
    /// deletes each run with one `DeleteRun` (one walk over the leaves instead of a descent from
    /// the root per message). Messages whose put may still be waiting in the writer's group stay
    /// in `forgotten`: a put and its `DeleteMessage` in one group are not written at all.
    pub forgotten_runs: Vec<(u64, u64)>,
}

/// A page-in request of a queue's tail ([`Effects::load`]): read up to `max_count` messages /
/// `max_bytes` of body from `from_seq` and give them to [`Queue::loaded`] with this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub from_seq: u64,
    pub max_count: usize,
    pub max_bytes: u64,
    /// How many loads in a row found the next message missing (its put not submitted yet): the
    /// caller waits a little before reading again.
    pub retry: u32,
    /// Which request this is (0: one made for `get`, which the queue does not track).
    id: u64,
    /// The tail's generation: a purge starts a new one and the answer to an older load is ignored.
    epoch: u64,
}

/// A queue's messages on disk (see [`pages`]): sequence numbers `first_seq..=last_seq`, every
/// one of them a stored message except the known holes (seqs allocated to messages that never
/// entered the tail) and, up to `gaps_upto`, seqs of messages gone before a restart. No memory
/// per message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tail {
    first_seq: u64,
    last_seq: u64,
    count: u64,
    /// Body bytes. Exact: each message's size is added when it enters and taken off when it is
    /// read back.
    bytes: u64,
    /// Seqs up to this may be missing for good (what recovery found; nothing is in flight there).
    gaps_upto: u64,
}

impl Tail {
    fn push(&mut self, seq: u64, bytes: u64) {
        if self.count == 0 {
            self.first_seq = seq;
        }
        self.last_seq = seq;
        self.count += 1;
        self.bytes += bytes;
    }
}

/// Wakes the publishers waiting for a queue to have room when dropped (see [`Effects`]).
#[derive(Debug)]
pub(crate) struct Unheld(Arc<tokio::sync::Notify>);

impl Drop for Unheld {
    fn drop(&mut self) {
        self.0.notify_waiters();
    }
}

/// A publisher held back by an `x-overflow = block` queue: the sending half of the pending
/// [`Commit`] its acknowledgement waits behind. Dropping it releases the publisher with `Ok`:
/// the message was enqueued (the store's own commit, joined with this one, says whether it is
/// durable), so there is never anything to refuse here, only a wait to end. A publisher that
/// went away meanwhile (a dropped receiver) is simply not told.
#[derive(Debug)]
pub(crate) struct Waiter(Option<oneshot::Sender<Result<(), StoreError>>>);

impl Waiter {
    fn is_gone(&self) -> bool {
        self.0.as_ref().is_none_or(|tx| tx.is_closed())
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Ok(()));
        }
    }
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.dead_letters.is_empty()
            && self.forgotten.is_empty()
            && self.delivered.is_empty()
            && !self.delete_queue
            && self.deadline.is_none()
            && self.load.is_none()
            && self.forgotten_range.is_none()
            && self.forgotten_runs.is_empty()
    }

    /// Adds `seq` to [`Effects::forgotten_runs`], extending the last run when it follows it.
    fn forget_run(&mut self, seq: u64) {
        match self.forgotten_runs.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(seq) => *last = seq,
            _ => self.forgotten_runs.push((seq, seq)),
        }
    }
    pub fn merge(&mut self, other: Effects) {
        self.dead_letters.extend(other.dead_letters);
        self.forgotten.extend(other.forgotten);
        self.delivered.extend(other.delivered);
        self.delete_queue |= other.delete_queue;
        self.released.extend(other.released);
        self.congested |= other.congested;
        self.paged |= other.paged;
        self.load = self.load.or(other.load);
        self.forgotten_range = self.forgotten_range.or(other.forgotten_range);
        for (first, last) in other.forgotten_runs {
            match self.forgotten_runs.last_mut() {
                Some((_, end)) if end.checked_add(1) == Some(first) => *end = last,
                _ => self.forgotten_runs.push((first, last)),
            }
        }
        if self.unheld.is_none() {
            self.unheld = other.unheld;
        }
        self.deadline = match (self.deadline, other.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// The result of offering a message to a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// The queue took it (it may already have been delivered).
    Accepted { seq: u64 },
    /// `x-overflow = reject-publish(-dlx)` and the queue is full, or `block` and the publisher
    /// waits for no acknowledgement: a confirming publisher gets a nack.
    Rejected,
}

/// Counts reported by declare-ok, purge, delete and management.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    pub ready: u32,
    pub unacked: u32,
    pub consumers: u32,
    pub ready_bytes: u64,
    /// Body bytes of the messages delivered and not yet acknowledged.
    pub unacked_bytes: u64,
    /// Messages dropped from the head by `x-max-length`(-bytes) with `drop-head`, since the
    /// queue was made (not kept across a restart).
    pub dropped_overflow: u64,
    /// Publishes refused by `x-max-length`(-bytes) with `reject-publish`(-dlx), or with `block`
    /// from a publisher that waits for no acknowledgement, likewise.
    pub rejected_overflow: u64,
    /// Messages offered to the queue (accepted or not), since it was made: what management's
    /// `publish` rate is computed from.
    pub published: u64,
    /// Messages handed to consumers or `get`, redeliveries included (`deliver_get`).
    pub delivered: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Publishes an `x-overflow = block` queue took past its limits, their acknowledgement
    /// withheld until it had room again, likewise.
    pub held_overflow: u64,
    /// Publishes told to wait because the queue fell behind its consumers
    /// ([`Effects::congested`]), likewise.
    pub held_publishers: u64,
    /// Of `ready`, the messages in the queue's tail on disk ([`pages`]; RabbitMQ's
    /// `messages_paged_out`): they cost no memory.
    pub paged_out: u32,
    /// Of `ready_bytes`, the body bytes of the tail (`message_bytes_paged_out`).
    pub paged_out_bytes: u64,
}

/// What one message held by a queue costs in memory besides its body: the shared `Message`
/// (an `Arc` allocation, rounded up to the allocator's size class), the queue's [`Entry`] with
/// the slack of the `VecDeque` / map it sits in, and the body's own allocation header. The
/// memory alarm counts it (a backlog of tiny messages is almost all overhead). Measured on
/// 2026-12-06 (release build, jemalloc): 1,000,000 persistent 16-byte messages in one durable
/// queue raised the broker's RSS by 423 MB, of which the store's 64 MB page cache: 359 B per
/// message, 343 beside the body, where this gives 368 (`Message` is 208 bytes; with 488 it was
/// 650 B measured, 656 given).
pub const MESSAGE_MEMORY: u64 = {
    let arc = std::mem::size_of::<Message>() + 2 * std::mem::size_of::<usize>();
    // jemalloc's size classes are 32 bytes apart from 128 to 256, 64 apart up to 512, 128
    // apart up to 1 KiB.
    let step = if arc <= 256 {
        32
    } else if arc <= 512 {
        64
    } else {
        128
    };
    let class = arc.div_ceil(step) * step;
    (class + 2 * std::mem::size_of::<Entry>() + 64) as u64
};

impl QueueStats {
    /// What the queue's messages (ready and unacked) cost in memory, as the memory alarm counts
    /// it: their bodies plus [`MESSAGE_MEMORY`] each. A message routed to several queues is
    /// counted in each (it is shared, so this errs on the side of raising the alarm early).
    pub fn memory(&self) -> u64 {
        let ready = u64::from(self.ready.saturating_sub(self.paged_out));
        let ready_bytes = self.ready_bytes.saturating_sub(self.paged_out_bytes);
        (ready + u64::from(self.unacked)) * MESSAGE_MEMORY + ready_bytes + self.unacked_bytes
    }
}

/// A message in the queue (ready, or unacked inside [`Unacked`]).
#[derive(Debug)]
struct Entry {
    seq: u64,
    message: Arc<Message>,
    /// When it expires: enqueue time + min(queue TTL, per-message TTL). Fixed at enqueue, so
    /// a requeue does not give it more time.
    expires_at: Option<Millis>,
    redelivered: bool,
    /// The store holds it and its put is committed: it was read back from the tail (a transient
    /// one too: it was paged out; it is deleted from the store when it leaves, like a persistent
    /// one) or recovered at start-up. Its delete may go in a run ([`Effects::forgotten_runs`]).
    stored: bool,
}

impl Entry {
    fn is_expired(&self, now: Millis) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// A delivered message waiting for its ack.
#[derive(Debug)]
struct Unacked {
    entry: Entry,
    owner: OwnerId,
    /// `None` for a `get`.
    consumer: Option<ConsumerId>,
}

#[derive(Debug)]
struct Consumer {
    id: ConsumerId,
    spec: ConsumerSpec,
    /// Unacked deliveries to this consumer, counted against `spec.prefetch`.
    unacked: u32,
    /// When it was last served (a queue-local counter): among consumers of equal priority the
    /// least recently served goes next, which is round-robin.
    last_served: u64,
    /// [`ConsumerSink::paces_publishers`], asked once.
    paces: bool,
    /// [`ConsumerSink::records_deliveries`], asked once.
    marks: bool,
}

impl Consumer {
    fn has_credit(&self) -> bool {
        self.spec.no_ack || self.spec.prefetch == 0 || self.unacked < self.spec.prefetch
    }
}

#[derive(Debug)]
struct QueueState {
    /// Ready messages, one FIFO per priority level; the highest index is served first. A queue
    /// without `x-max-priority` has one level.
    levels: Vec<VecDeque<Entry>>,
    ready_count: u64,
    ready_bytes: u64,
    unacked: FastMap<u64, Unacked>,
    /// Body bytes of `unacked`.
    unacked_bytes: u64,
    /// In registration order (the first is the single active consumer).
    consumers: Vec<Consumer>,
    next_seq: u64,
    /// The highest seq restored at start-up (in memory or in the tail): a message at or below
    /// it may have been handed out before the restart ([`ConsumerSink::records_deliveries`]).
    restored_through: u64,
    serve_clock: u64,
    /// For `x-expires`: creation, consume, cancel, get, touch.
    last_used: Millis,
    /// For auto-delete: only a queue that has had a consumer is deleted when the last leaves.
    had_consumer: bool,
    /// Set by `shutdown`: the queue takes no more messages or consumers.
    closed: bool,
    /// A dead-letter cycle is logged once per queue, not once per message.
    cycle_warned: bool,
    /// A message with an expiry has entered (so the heads are worth looking at for deadlines).
    timed: bool,
    /// Counted for [`QueueStats::dropped_overflow`] and [`QueueStats::rejected_overflow`].
    dropped_overflow: u64,
    rejected_overflow: u64,
    /// For [`QueueStats::published`], [`QueueStats::delivered`] and [`QueueStats::acked`]:
    /// counted under the lock the operation holds anyway, so they cost no atomic.
    published: u64,
    delivered: u64,
    acked: u64,
    held_overflow: u64,
    held_publishers: u64,
    /// `x-overflow = block`: the publishers whose acknowledgement waits for the queue to be back
    /// within its limits, oldest first; all released together when it is
    /// ([`Queue::release_waiters`]). Waiters whose publisher went away are pruned as it grows.
    waiters: VecDeque<Waiter>,
    /// The deadline last reported to the broker's timer (in [`Effects::deadline`] or by
    /// [`Queue::tick`]); only an earlier one is reported again.
    armed: Option<Millis>,
    /// Whether the consumers are treated as slow: the queue then holds no publisher back
    /// ([`Queue::waited`]).
    lag: Lag,
    /// The ready messages on disk, after every ready message in memory ([`pages`]).
    tail: Tail,
    /// Seqs in the tail's range that were allocated to a message that did not enter it (refused,
    /// expired at once, dropped): a load skips them instead of waiting for their put.
    holes: std::collections::BTreeSet<u64>,
    /// The load in flight ([`Load::id`]), if any.
    loading: Option<u64>,
    last_load: u64,
    /// The tail's generation ([`Load::epoch`]).
    epoch: u64,
}

impl QueueState {
    fn ready_at_or_above(&self, level: usize) -> bool {
        self.levels[level..].iter().any(|l| !l.is_empty())
    }

    /// The consumer to serve next: able to take a message (credit and room), highest priority,
    /// least recently served. With single active consumer only the first registered qualifies.
    fn pick_consumer(&self, single_active: bool) -> Option<usize> {
        if single_active {
            let c = self.consumers.first()?;
            return (c.has_credit() && c.spec.sink.has_room()).then_some(0);
        }
        let mut best: Option<usize> = None;
        for (i, c) in self.consumers.iter().enumerate() {
            if !c.has_credit() {
                continue;
            }
            if let Some(b) = best {
                let b = &self.consumers[b];
                let better = c.spec.priority > b.spec.priority
                    || (c.spec.priority == b.spec.priority && c.last_served < b.last_served);
                if !better {
                    continue;
                }
            }
            // Asked last: `has_room` may take the sink's own lock.
            if c.spec.sink.has_room() {
                best = Some(i);
            }
        }
        best
    }

    /// Ready messages, in memory and in the tail.
    fn total_count(&self) -> u64 {
        self.ready_count + self.tail.count
    }
    fn total_bytes(&self) -> u64 {
        self.ready_bytes + self.tail.bytes
    }

    fn push_ready(&mut self, level: usize, entry: Entry) {
        self.ready_count += 1;
        self.ready_bytes += entry.message.body_size() as u64;
        self.levels[level].push_back(entry);
    }

    /// Puts a message back at its original place (by seq) in its level.
    fn requeue(&mut self, level: usize, mut entry: Entry) {
        entry.redelivered = true;
        self.ready_count += 1;
        self.ready_bytes += entry.message.body_size() as u64;
        let l = &mut self.levels[level];
        let at = l.partition_point(|e| e.seq < entry.seq);
        l.insert(at, entry);
    }

    fn pop_level(&mut self, level: usize) -> Option<Entry> {
        let e = self.levels[level].pop_front()?;
        self.ready_count -= 1;
        self.ready_bytes -= e.message.body_size() as u64;
        Some(e)
    }

    /// Frees the credit an unacked message held with its consumer.
    fn release_credit(&mut self, consumer: Option<ConsumerId>) {
        if let Some(id) = consumer {
            if let Some(c) = self.consumers.iter_mut().find(|c| c.id == id) {
                c.unacked = c.unacked.saturating_sub(1);
            }
        }
    }

    /// Takes an unacked message out, freeing its consumer's credit.
    fn take_unacked(&mut self, seq: u64) -> Result<Unacked, CoreError> {
        let u = self
            .unacked
            .remove(&seq)
            .ok_or_else(|| CoreError::PreconditionFailed(format!("unknown delivery tag {seq}")))?;
        self.unacked_bytes -= u.entry.message.body_size() as u64;
        self.release_credit(u.consumer);
        Ok(u)
    }
}

fn lock_state(m: &Mutex<QueueState>) -> MutexGuard<'_, QueueState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A queue.
#[derive(Debug)]
pub struct Queue {
    name: QueueName,
    options: QueueOptions,
    args: QueueArgs,
    state: Mutex<QueueState>,
    /// Whether the installed `TopicPolicy` reserves this queue for a frontend, as last asked:
    /// `(policy epoch << 1) | reserved`, `u64::MAX` when not asked yet. Lets the default
    /// exchange skip the policy (an `ArcSwap` load, 2 % of an AMQP publisher's broker CPU) on
    /// every publish ([`Queue::reserved_as_of`]).
    reserved: AtomicU64,
    /// The queue holds its publishers back (see the module's documentation). Written under the
    /// state's lock, read without it by the publishers waiting ([`Queue::has_room`]).
    holding: AtomicBool,
    /// The first connection held back in the current holding period (`u64::MAX`: none yet),
    /// and whether another one was held in it too; [`Queue::was_contended`] says it of the
    /// last period once it ended. Written under the state's lock.
    held_first: AtomicU64,
    contending: AtomicBool,
    last_contended: AtomicBool,
    /// Wakes the publishers waiting for room; made the first time the queue holds any.
    unheld: OnceLock<Arc<tokio::sync::Notify>>,
    /// [`pages`], asked once.
    pages: bool,
}

impl Queue {
    /// Makes a queue; validates `options.arguments` into [`QueueArgs`].
    pub fn new(name: QueueName, options: QueueOptions, now: Millis) -> Result<Queue, CoreError> {
        let args = QueueArgs::from_table_for(&name, &options.arguments)?;
        let levels = (0..=args.max_priority.unwrap_or(0)).map(|_| VecDeque::new()).collect();
        let state = QueueState {
            levels,
            ready_count: 0,
            ready_bytes: 0,
            unacked: FastMap::default(),
            unacked_bytes: 0,
            consumers: Vec::new(),
            next_seq: 1,
            restored_through: 0,
            serve_clock: 0,
            last_used: now,
            had_consumer: false,
            closed: false,
            cycle_warned: false,
            timed: args.message_ttl.is_some(),
            dropped_overflow: 0,
            rejected_overflow: 0,
            published: 0,
            delivered: 0,
            acked: 0,
            held_overflow: 0,
            held_publishers: 0,
            waiters: VecDeque::new(),
            armed: None,
            lag: Lag::default(),
            tail: Tail::default(),
            holes: std::collections::BTreeSet::new(),
            loading: None,
            last_load: 0,
            epoch: 0,
        };
        let pages = pages(&name, &options);
        Ok(Queue {
            name,
            options,
            args,
            state: Mutex::new(state),
            reserved: AtomicU64::new(u64::MAX),
            holding: AtomicBool::new(false),
            held_first: AtomicU64::new(u64::MAX),
            contending: AtomicBool::new(false),
            last_contended: AtomicBool::new(false),
            unheld: OnceLock::new(),
            pages,
        })
    }
    /// Whether the policy of `epoch` reserves this queue, asking `policy` only when this queue
    /// has not been asked under that epoch yet. A name's answer never changes under one policy.
    pub fn reserved_as_of(&self, epoch: u64, policy: impl FnOnce() -> bool) -> bool {
        let cached = self.reserved.load(Ordering::Relaxed);
        if cached != u64::MAX && cached >> 1 == epoch {
            return cached & 1 == 1;
        }
        let reserved = policy();
        self.reserved.store(epoch << 1 | reserved as u64, Ordering::Relaxed);
        reserved
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

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        lock_state(&self.state)
    }

    /// The priority level of a message: its priority capped at `x-max-priority`.
    fn level_of(&self, message: &Message) -> usize {
        match self.args.max_priority {
            None => 0,
            Some(max) => message.properties.priority.unwrap_or(0).min(max) as usize,
        }
    }

    fn expiry_of(&self, message: &Message, now: Millis) -> Option<Millis> {
        let ttl = match (self.args.message_ttl, message.properties.ttl_millis()) {
            (Some(q), Some(m)) => q.min(m),
            (q, m) => q.or(m)?,
        };
        Some(now.saturating_add(ttl))
    }

    fn over_limits(&self, st: &QueueState, extra_count: u64, extra_bytes: u64) -> bool {
        self.args.max_length.is_some_and(|m| st.total_count() + extra_count > m)
            || self.args.max_length_bytes.is_some_and(|m| st.total_bytes() + extra_bytes > m)
    }

    /// Whether this queue pages its ready messages to disk past [`PAGE_WINDOW`] ([`pages`]).
    pub fn pages(&self) -> bool {
        self.pages
    }

    /// Keeps a ready message: in memory, or in the tail on disk when the tail is not empty (FIFO)
    /// or memory holds the window already. A message in the tail is dropped here: the store's
    /// put (built by the caller, told through [`Effects::paged`]) holds it until it is written.
    fn keep(&self, st: &mut QueueState, level: usize, entry: Entry, fx: &mut Effects) {
        let size = entry.message.body_size() as u64;
        let to_tail = self.pages
            && (st.tail.count > 0
                || (st.ready_count > 0
                    && (st.ready_count >= PAGE_WINDOW || st.ready_bytes + size > PAGE_WINDOW_BYTES)));
        if to_tail {
            st.tail.push(entry.seq, size);
            fx.paged = true;
        } else {
            st.push_ready(level, entry);
        }
    }

    /// Asks for the tail's head to be read back when memory holds three quarters of the window or
    /// less and no load is in flight (or, with `retry`, again after a load that found nothing to
    /// take). Three quarters rather than half: a load then has a quarter of the window's messages
    /// to read and three quarters left to deliver while it runs on the store's reader thread, which
    /// on a busy machine waits for a CPU (2 M x 1 KiB drained 1.15-1.91x faster than at half, the
    /// same CPU per message; docs/benchmarks.md, "Queues larger than memory").
    fn want_load(&self, st: &mut QueueState, fx: &mut Effects, retry: u32) {
        if st.tail.count == 0 || st.closed || (st.loading.is_some() && retry == 0) {
            return;
        }
        if st.ready_count > PAGE_WINDOW * 3 / 4 || st.ready_bytes > PAGE_WINDOW_BYTES * 3 / 4 {
            return;
        }
        st.last_load += 1;
        st.loading = Some(st.last_load);
        fx.load = Some(Load {
            from_seq: st.tail.first_seq,
            max_count: (PAGE_WINDOW - st.ready_count.min(PAGE_WINDOW)).max(1) as usize,
            max_bytes: (PAGE_WINDOW_BYTES - st.ready_bytes.min(PAGE_WINDOW_BYTES)).max(1),
            retry,
            id: st.last_load,
            epoch: st.epoch,
        });
    }

    /// A load of the tail's head for `get`, which waits for it (the queue does not track it:
    /// whichever answer comes first is taken, the other finds its messages taken already).
    pub fn load_for_get(&self) -> Option<Load> {
        let st = self.lock();
        (st.tail.count > 0 && !st.closed).then(|| Load {
            from_seq: st.tail.first_seq,
            max_count: (PAGE_WINDOW / 2) as usize,
            max_bytes: PAGE_WINDOW_BYTES / 2,
            retry: 0,
            id: 0,
            epoch: st.epoch,
        })
    }

    /// Messages in the tail on disk.
    pub fn paged_out(&self) -> u64 {
        self.lock().tail.count
    }

    /// What a recovered queue holds on disk beyond the messages restored into memory
    /// ([`crate::store::Snapshot::tails`]). Seqs in it may be missing (messages that went before
    /// the restart); later enqueues get higher ones.
    pub fn restore_tail(&self, tail: crate::store::TailSummary) {
        let mut st = self.lock();
        st.next_seq = st.next_seq.max(tail.last_seq.saturating_add(1));
        st.restored_through = st.restored_through.max(tail.last_seq);
        st.tail = Tail {
            first_seq: tail.first_seq,
            last_seq: tail.last_seq,
            count: tail.count,
            bytes: tail.bytes,
            gaps_upto: tail.last_seq,
        };
    }

    /// Takes the answer to a [`Load`]: the contiguous run of the tail's head it holds goes to
    /// memory (a seq missing that is no hole is a put not submitted yet: the rest waits for the
    /// next load), then deliveries are pumped. An answer to an older generation (the tail was
    /// purged since) is ignored.
    pub fn loaded(
        &self,
        load: Load,
        result: Result<Vec<crate::store::StoredMessage>, StoreError>,
        now: Millis,
    ) -> Effects {
        let mut fx = Effects::default();
        let mut guard = self.lock();
        let st = &mut *guard;
        if load.id != 0 && st.loading == Some(load.id) {
            st.loading = None;
        }
        if load.epoch != st.epoch || st.closed {
            return fx;
        }
        let mut took = 0u64;
        match result {
            Err(StoreError::Closed) => {
                // The broker is shutting down: no more loads (a load "in flight" for ever).
                st.loading = Some(u64::MAX);
                return fx;
            }
            Err(e) => {
                if load.retry == 0 {
                    tracing::warn!(queue = %self.name, error = %e, "reading the queue's messages on disk failed; retrying");
                }
            }
            Ok(batch) => {
                let mut expected = st.tail.first_seq;
                for m in batch {
                    if st.tail.count == 0 || m.seq > st.tail.last_seq {
                        break;
                    }
                    if m.seq < st.tail.first_seq {
                        // Taken by another load already.
                        continue;
                    }
                    while expected < m.seq && (expected <= st.tail.gaps_upto || st.holes.contains(&expected)) {
                        expected += 1;
                    }
                    if m.seq != expected {
                        break;
                    }
                    expected = m.seq + 1;
                    let size = m.message.body_size() as u64;
                    st.tail.first_seq = m.seq + 1;
                    st.tail.count -= 1;
                    st.tail.bytes = st.tail.bytes.saturating_sub(size);
                    let entered = if m.message.published_at == 0 { now } else { m.message.published_at.min(now) };
                    let expires_at = self.expiry_of(&m.message, entered);
                    st.timed |= expires_at.is_some();
                    let stored = true;
                    st.push_ready(
                        0,
                        Entry { seq: m.seq, message: m.message, expires_at, redelivered: m.delivered, stored },
                    );
                    took += 1;
                }
                if st.tail.count == 0 {
                    st.tail = Tail::default();
                    st.holes.clear();
                } else if !st.holes.is_empty() {
                    st.holes = st.holes.split_off(&st.tail.first_seq);
                }
            }
        }
        self.pump_locked(st, now, &mut fx);
        self.drop_head_to_limits(st, now, &mut fx);
        if took == 0 {
            self.want_load(st, &mut fx, load.retry.saturating_add(1));
        }
        self.rearm(st, &mut fx);
        fx
    }

    /// Whether the store holds this queue and its persistent messages: durable and not
    /// exclusive (an exclusive queue ends with its connection, so it never outlives a restart).
    pub fn stores_messages(&self) -> bool {
        self.options.durable && self.options.exclusive.is_none()
    }

    /// Records a message that left the queue for good, for the store.
    fn forget(&self, entry: &Entry, fx: &mut Effects) {
        if !self.stores_messages() {
            return;
        }
        if entry.stored {
            fx.forget_run(entry.seq);
        } else if entry.message.is_persistent() {
            fx.forgotten.push(entry.seq);
        }
    }

    /// A message leaves for good with a dead-letter reason: dead-lettered if the queue has a
    /// dead-letter exchange, dropped otherwise.
    fn discard(&self, st: &mut QueueState, entry: Entry, reason: DeadLetterReason, now: Millis, fx: &mut Effects) {
        self.forget(&entry, fx);
        self.dead_letter(st, &entry.message, reason, now, fx);
    }

    /// Hands a message to consumer `i`.
    fn deliver_to(&self, st: &mut QueueState, i: usize, entry: Entry, fx: &mut Effects) {
        st.serve_clock += 1;
        st.delivered += 1;
        st.lag.drained();
        let clock = st.serve_clock;
        let restored = entry.seq <= st.restored_through;
        let c = &mut st.consumers[i];
        c.last_served = clock;
        let (seq, consumer) = (entry.seq, Some(c.id));
        let redelivered = entry.redelivered || (!c.marks && restored);
        if c.spec.no_ack {
            self.forget(&entry, fx);
            let delivery = Delivery { queue: self.name.clone(), consumer, seq, message: entry.message, redelivered };
            c.spec.sink.deliver(delivery);
        } else {
            c.unacked += 1;
            let owner = c.spec.owner;
            if !redelivered && c.marks && self.stores_messages() && entry.message.is_persistent() {
                fx.delivered.push(seq);
            }
            let message = entry.message.clone();
            c.spec.sink.deliver(Delivery { queue: self.name.clone(), consumer, seq, message, redelivered });
            st.unacked_bytes += entry.message.body_size() as u64;
            st.unacked.insert(seq, Unacked { entry, owner, consumer });
        }
    }

    /// Pops the first live ready message, expiring the expired ones met at the heads.
    fn pop_live(&self, st: &mut QueueState, now: Millis, fx: &mut Effects) -> Option<Entry> {
        for level in (0..st.levels.len()).rev() {
            while let Some(e) = st.pop_level(level) {
                if e.is_expired(now) {
                    self.discard(st, e, DeadLetterReason::Expired, now, fx);
                } else {
                    return Some(e);
                }
            }
        }
        None
    }

    /// Removes expired messages at the head of every level.
    fn expire_heads(&self, st: &mut QueueState, now: Millis, fx: &mut Effects) {
        for level in 0..st.levels.len() {
            while st.levels[level].front().is_some_and(|e| e.is_expired(now)) {
                if let Some(e) = st.pop_level(level) {
                    self.discard(st, e, DeadLetterReason::Expired, now, fx);
                }
            }
        }
    }

    /// `drop-head`: drops (dead-letters) messages from the head until the limits hold.
    fn drop_head_to_limits(&self, st: &mut QueueState, now: Millis, fx: &mut Effects) {
        if self.args.overflow != Overflow::DropHead {
            return;
        }
        while st.ready_count > 0 && self.over_limits(st, 0, 0) {
            let Some(level) = st.levels.iter().rposition(|l| !l.is_empty()) else {
                break;
            };
            if let Some(e) = st.pop_level(level) {
                st.dropped_overflow += 1;
                self.discard(st, e, DeadLetterReason::MaxLen, now, fx);
            }
        }
    }

    /// The next time something is due: the earliest head message's expiry, and `x-expires`
    /// while the queue has no consumer. RabbitMQ times the head only: a message behind the head
    /// expires when it reaches it.
    fn next_deadline(&self, st: &QueueState) -> Option<Millis> {
        let heads = if st.timed { st.levels.iter().filter_map(|l| l.front()?.expires_at).min() } else { None };
        let unused = match self.args.expires {
            Some(expires) if st.consumers.is_empty() && !st.closed => Some(st.last_used.saturating_add(expires)),
            _ => None,
        };
        match (heads, unused) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// After an operation: reports the next deadline in `fx` when it is earlier than the one
    /// last reported (a later one needs nothing: the timer fires early and finds it).
    /// Also asks for a load of the tail when there is room for one: every operation ends here,
    /// and whatever took ready messages may have made room.
    fn rearm(&self, st: &mut QueueState, fx: &mut Effects) {
        self.want_load(st, fx, 0);
        self.rearm_deadline(st, fx);
    }

    /// [`Queue::rearm`]'s deadline part alone.
    fn rearm_deadline(&self, st: &mut QueueState, fx: &mut Effects) {
        if let Some(d) = self.next_deadline(st) {
            if st.armed.is_none_or(|a| d < a) {
                st.armed = Some(d);
                fx.deadline = Some(d);
            }
        }
    }

    fn pump_locked(&self, st: &mut QueueState, now: Millis, fx: &mut Effects) {
        while st.ready_count > 0 {
            let Some(i) = st.pick_consumer(self.args.single_active_consumer) else {
                break;
            };
            let Some(entry) = self.pop_live(st, now, fx) else {
                break;
            };
            self.deliver_to(st, i, entry, fx);
        }
        self.release_waiters(st, fx);
    }

    /// Builds the dead-lettered copy of `message` and adds it to the effects (or drops it when
    /// the queue has no dead-letter exchange or the message is in a dead-letter cycle).
    fn dead_letter(
        &self,
        st: &mut QueueState,
        message: &Message,
        reason: DeadLetterReason,
        now: Millis,
        fx: &mut Effects,
    ) {
        let Some(dlx) = &self.args.dead_letter_exchange else {
            return;
        };
        let queue = self.name.as_bytes();
        let old_deaths = match message.properties.header("x-death") {
            Some(FieldValue::Array(a)) => a.as_slice(),
            _ => &[],
        };
        if reason != DeadLetterReason::Rejected && is_cycle(old_deaths, queue) {
            if !st.cycle_warned {
                st.cycle_warned = true;
                tracing::warn!(
                    queue = %self.name,
                    reason = reason.as_str(),
                    "dead-letter cycle detected, message dropped (logged once per queue)"
                );
            }
            return;
        }

        let mut m = message.clone();
        // The copy enters the dead-letter queue now: TTLs there (and after a restart) count
        // from here.
        m.published_at = now;
        let original_expiration = m.properties.take_expiration();
        let exchange = FieldValue::LongString(message.exchange.bytes().clone());
        let queue_value = FieldValue::LongString(self.name.bytes().clone());
        let reason_value = FieldValue::LongString(Bytes::from_static(reason.as_str().as_bytes()));
        let headers = m.properties.headers.get_or_insert_with(FieldTable::new);
        let mut deaths = match headers.remove("x-death") {
            Some(FieldValue::Array(a)) => a,
            _ => Vec::new(),
        };
        let same = deaths.iter().position(|d| match d {
            FieldValue::Table(t) => {
                t.get("queue").is_some_and(|q| bytes_of(q) == Some(queue))
                    && t.get("reason").is_some_and(|r| bytes_of(r) == Some(reason.as_str().as_bytes()))
            }
            _ => false,
        });
        let death = match same {
            Some(i) => {
                let mut d = deaths.remove(i);
                if let FieldValue::Table(t) = &mut d {
                    let count = t.get("count").and_then(FieldValue::as_i64).unwrap_or(0);
                    t.insert("count", FieldValue::I64(count.saturating_add(1)));
                }
                d
            }
            None => {
                // Keys sorted, as RabbitMQ writes the table.
                let mut t = FieldTable::new();
                t.insert("count", FieldValue::I64(1));
                t.insert("exchange", exchange.clone());
                if let Some(exp) = &original_expiration {
                    t.insert("original-expiration", FieldValue::LongString(exp.bytes().clone()));
                }
                t.insert("queue", queue_value.clone());
                t.insert("reason", reason_value.clone());
                t.insert(
                    "routing-keys",
                    FieldValue::Array(vec![FieldValue::LongString(message.routing_key.bytes().clone())]),
                );
                t.insert("time", FieldValue::Timestamp(now / 1000));
                FieldValue::Table(t)
            }
        };
        deaths.insert(0, death);
        headers.insert("x-death", FieldValue::Array(deaths));
        for (key, value) in [
            ("x-first-death-reason", &reason_value),
            ("x-first-death-queue", &queue_value),
            ("x-first-death-exchange", &exchange),
        ] {
            if headers.get(key).is_none() {
                headers.insert(key, value.clone());
            }
        }
        headers.insert("x-last-death-reason", reason_value);
        headers.insert("x-last-death-queue", queue_value);
        headers.insert("x-last-death-exchange", exchange);

        m.exchange = dlx.clone();
        if let Some(rk) = &self.args.dead_letter_routing_key {
            m.routing_key = rk.clone();
        }
        fx.dead_letters.push(DeadLetter {
            exchange: m.exchange.clone(),
            routing_key: m.routing_key.clone(),
            message: Arc::new(m),
        });
    }

    /// Offers a message from a publisher that waits for no acknowledgement; delivers at once to
    /// a consumer with room, or keeps it ready.
    pub fn enqueue(&self, message: Arc<Message>, now: Millis) -> (EnqueueOutcome, Effects) {
        let (outcome, _held, fx) = self.enqueue_waiting(message, now, false);
        (outcome, fx)
    }

    /// [`Queue::enqueue`], saying whether the publisher waits for an acknowledgement (an MQTT
    /// QoS 1/2 publish, an AMQP channel in confirm mode) that the caller holds behind a commit.
    ///
    /// Only `x-overflow = block` makes a difference: when the queue is at its limits, a waiting
    /// publisher's message is taken anyway (the limit is soft for it) and the returned commit
    /// resolves once the queue is back within its limits (or is purged or deleted); the caller
    /// joins it with the store's commit, so the acknowledgement is held until then. A publisher
    /// that waits for nothing is refused (`Rejected`, counted in `rejected_overflow`).
    pub fn enqueue_waiting(
        &self,
        message: Arc<Message>,
        now: Millis,
        waits: bool,
    ) -> (EnqueueOutcome, Option<Commit>, Effects) {
        let mut fx = Effects::default();
        let mut guard = self.lock();
        let st = &mut *guard;
        st.published += 1;
        let from = message.origin.connection;
        let (outcome, held) = self.enqueue_locked(st, message, now, waits, &mut fx);
        self.release_waiters(st, &mut fx);
        if matches!(outcome, EnqueueOutcome::Accepted { .. }) {
            self.hold_publisher(st, from, now, &mut fx);
        }
        self.rearm(st, &mut fx);
        (outcome, held, fx)
    }

    fn enqueue_locked(
        &self,
        st: &mut QueueState,
        message: Arc<Message>,
        now: Millis,
        waits: bool,
        fx: &mut Effects,
    ) -> (EnqueueOutcome, Option<Commit>) {
        if st.closed {
            return (EnqueueOutcome::Rejected, None);
        }
        let level = self.level_of(&message);
        let expires_at = self.expiry_of(&message, now);
        st.timed |= expires_at.is_some();
        let seq = st.next_seq;
        st.next_seq += 1;
        let entry = Entry { seq, message, expires_at, redelivered: false, stored: false };
        // Older messages wait on disk: this one goes behind them (or is refused), never past.
        let behind_tail = st.tail.count > 0;
        let (outcome, held) = self.enqueue_entry(st, level, entry, now, waits, behind_tail, fx);
        if behind_tail && !fx.paged {
            // Its seq never reaches the store: a load must not wait for it.
            st.holes.insert(seq);
        }
        (outcome, held)
    }

    #[allow(clippy::too_many_arguments)]
    fn enqueue_entry(
        &self,
        st: &mut QueueState,
        level: usize,
        entry: Entry,
        now: Millis,
        waits: bool,
        behind_tail: bool,
        fx: &mut Effects,
    ) -> (EnqueueOutcome, Option<Commit>) {
        let seq = entry.seq;
        // Straight to a consumer when nothing is ahead of it and one can take it now.
        if !st.consumers.is_empty() && !behind_tail {
            if st.ready_at_or_above(level) {
                // Credit may have come back without a pump: let the older messages go first.
                self.pump_locked(st, now, fx);
            }
            if !st.ready_at_or_above(level) {
                if let Some(i) = st.pick_consumer(self.args.single_active_consumer) {
                    self.deliver_to(st, i, entry, fx);
                    return (EnqueueOutcome::Accepted { seq }, None);
                }
            }
        }
        // Nobody to take a transient message now, and the queue was asked not to keep those.
        if self.args.transient_needs_consumer && st.consumers.is_empty() && !entry.message.is_persistent() {
            return (EnqueueOutcome::Accepted { seq }, None);
        }
        // TTL 0: only a consumer ready at once would have got it.
        if entry.is_expired(now) {
            self.discard(st, entry, DeadLetterReason::Expired, now, fx);
            return (EnqueueOutcome::Accepted { seq }, None);
        }
        let size = entry.message.body_size() as u64;
        if self.args.overflow != Overflow::DropHead && self.over_limits(st, 1, size) {
            self.expire_heads(st, now, fx);
            if self.over_limits(st, 1, size) {
                if self.args.overflow == Overflow::Block && waits {
                    // Taken past the limit; the publisher's acknowledgement waits for room.
                    self.keep(st, level, entry, fx);
                    return (EnqueueOutcome::Accepted { seq }, Some(self.hold(st)));
                }
                // Never entered the queue: nothing for the store to forget.
                if self.args.overflow == Overflow::RejectPublishDlx {
                    self.dead_letter(st, &entry.message, DeadLetterReason::MaxLen, now, fx);
                }
                st.rejected_overflow += 1;
                return (EnqueueOutcome::Rejected, None);
            }
        }
        self.keep(st, level, entry, fx);
        if self.over_limits(st, 0, 0) {
            self.expire_heads(st, now, fx);
            self.drop_head_to_limits(st, now, fx);
        }
        (EnqueueOutcome::Accepted { seq }, None)
    }

    /// `block`: adds a waiter for a publisher whose message went in past the limits and returns
    /// the commit its acknowledgement waits behind. Waiters whose publisher went away (its
    /// connection closed) are pruned each time the list reaches a power of two from 64 on:
    /// amortized O(1) per held publish, and the dead ones cannot pile up while the queue stays
    /// over its limits.
    fn hold(&self, st: &mut QueueState) -> Commit {
        let n = st.waiters.len();
        if n >= 64 && n.is_power_of_two() {
            st.waiters.retain(|w| !w.is_gone());
        }
        let (tx, commit) = Commit::pending();
        st.waiters.push_back(Waiter(Some(tx)));
        st.held_overflow += 1;
        commit
    }

    /// `block`: once the queue is within its limits again, every held publisher goes (their
    /// waiters move to the effects, told when those are dropped, outside the lock).
    fn release_waiters(&self, st: &mut QueueState, fx: &mut Effects) {
        if !st.waiters.is_empty() && (st.closed || !self.over_limits(st, 0, 0)) {
            fx.released.extend(st.waiters.drain(..));
        }
        self.release_held(st, fx);
    }

    /// After a message was taken: past [`BACKLOG_HIGH`] with a consumer that paces its
    /// publishers, and not lagging, the queue holds publishers back; this one is told to wait
    /// unless its own connection consumes from the queue (its acks would wait too).
    fn hold_publisher(&self, st: &mut QueueState, from: ConnectionId, now: Millis, fx: &mut Effects) {
        if !self.holding.load(Ordering::Relaxed) {
            if st.total_count() < BACKLOG_HIGH && st.total_bytes() < BACKLOG_HIGH_BYTES {
                return;
            }
            if !st.consumers.iter().any(|c| c.paces) || st.lag.is_lagging(now) {
                return;
            }
            self.unheld.get_or_init(|| Arc::new(tokio::sync::Notify::new()));
            self.holding.store(true, Ordering::SeqCst);
        }
        fx.congested = !st.consumers.iter().any(|c| c.spec.connection == from);
        st.held_publishers += u64::from(fx.congested);
        if fx.congested {
            match self.held_first.load(Ordering::Relaxed) {
                u64::MAX => self.held_first.store(from.0, Ordering::Relaxed),
                first if first != from.0 => self.contending.store(true, Ordering::Relaxed),
                _ => {}
            }
        }
    }

    /// Lets the publishers held back go once the queue is down to [`BACKLOG_LOW`], has no
    /// consumer that paces them any more, or is closed.
    fn release_held(&self, st: &QueueState, fx: &mut Effects) {
        if self.holding.load(Ordering::Relaxed)
            && (st.closed
                || (st.total_count() <= BACKLOG_LOW && st.total_bytes() <= BACKLOG_LOW_BYTES)
                || !st.consumers.iter().any(|c| c.paces))
        {
            self.unhold(fx);
        }
    }

    fn unhold(&self, fx: &mut Effects) {
        // Before `holding`, which the publishers read (SeqCst) before asking this.
        self.last_contended.store(self.contending.swap(false, Ordering::Relaxed), Ordering::Relaxed);
        self.held_first.store(u64::MAX, Ordering::Relaxed);
        self.holding.store(false, Ordering::SeqCst);
        fx.unheld = self.unheld.get().map(|n| Unheld(n.clone()));
    }

    /// Whether the last time the queue held its publishers back it held more than one
    /// connection: they then share the room it made, a few publishes at a time
    /// (`ferry_core::flow::FAIR_BATCH`). A queue with one publisher needs no such turns.
    pub fn was_contended(&self) -> bool {
        self.last_contended.load(Ordering::Relaxed)
    }

    /// Whether the queue lets its publishers read (it is not holding them back).
    pub fn has_room(&self) -> bool {
        !self.holding.load(Ordering::SeqCst)
    }

    /// Resolves once the queue lets its publishers read again (at once if it does): for a
    /// publisher told the queue is congested ([`Effects::congested`]).
    pub async fn room(&self) {
        loop {
            let Some(notify) = self.unheld.get() else {
                return;
            };
            let unheld = notify.notified();
            tokio::pin!(unheld);
            // Register before checking, so a release in between is not missed.
            unheld.as_mut().enable();
            if self.has_room() {
                return;
            }
            unheld.await;
        }
    }

    /// Messages handed to consumers (or `get`) so far: how a waiting publisher sees whether
    /// the queue drains ([`Queue::waited`]).
    pub fn drains(&self) -> u64 {
        self.lock().delivered
    }

    /// [`crate::sink::Outbox::waited`] for a queue: a publisher waited `waited` for it, and got
    /// room or not, while it delivered `drains` messages. Consumers that delivered nothing within
    /// the pause, or less than one message every [`crate::sink::SLOW_DRAIN`], are lagging by the
    /// outbox's rule (1 s, doubling, and until they take something): the queue then holds nobody
    /// back and the other publishers waiting for it go. Found once per lagging period, however
    /// many publishers waited. Returns whether it is lagging.
    pub fn waited(&self, got_room: bool, waited: std::time::Duration, drains: u64, now_ms: Millis) -> bool {
        let mut fx = Effects::default();
        let lagging = {
            let mut st = self.lock();
            if st.lag.is_lagging(now_ms) {
                true
            } else if st.lag.waited(got_room, waited, drains, now_ms) {
                if self.holding.load(Ordering::Relaxed) {
                    self.unhold(&mut fx);
                }
                true
            } else {
                false
            }
        };
        // The other publishers waiting are woken here, after the lock.
        drop(fx);
        lagging
    }

    /// Puts back a message recovered from the store at start-up, at its place by `seq`, marked
    /// redelivered if it was `delivered` before the restart. Its TTL counts from when it was
    /// published (the time the broker was down counts; an expired message goes at the next
    /// tick, dead-lettered if the queue says so). Later enqueues get higher sequence numbers.
    /// Length limits are not applied.
    pub fn restore(&self, seq: u64, message: Arc<Message>, delivered: bool, now: Millis) {
        let mut st = self.lock();
        let level = self.level_of(&message);
        let entered = if message.published_at == 0 { now } else { message.published_at.min(now) };
        let expires_at = self.expiry_of(&message, entered);
        st.timed |= expires_at.is_some();
        st.next_seq = st.next_seq.max(seq.saturating_add(1));
        st.restored_through = st.restored_through.max(seq);
        let stored = message.is_persistent();
        st.requeue(level, Entry { seq, message, expires_at, redelivered: true, stored });
        if !delivered {
            // `requeue` marks it redelivered; a message never handed out is not.
            if let Some(e) = st.levels[level].iter_mut().rev().find(|e| e.seq == seq) {
                e.redelivered = false;
            }
        }
    }

    /// Adds a consumer. Refused with `AccessRefused` when an exclusive consumer is there or
    /// when `spec.exclusive` and any consumer is there.
    pub fn consume(&self, spec: ConsumerSpec, now: Millis) -> Result<(ConsumerId, Effects), CoreError> {
        let mut fx = Effects::default();
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.closed {
            return Err(CoreError::NotFound(format!("no queue '{}'", self.name)));
        }
        if (spec.exclusive && !st.consumers.is_empty()) || st.consumers.iter().any(|c| c.spec.exclusive) {
            return Err(CoreError::AccessRefused(format!("queue '{}' in exclusive use", self.name)));
        }
        let id = ConsumerId::next();
        // A newcomer queues behind the consumers already there for round-robin.
        st.serve_clock += 1;
        let (paces, marks) = (spec.sink.paces_publishers(), spec.sink.records_deliveries());
        st.consumers.push(Consumer { id, spec, unacked: 0, last_served: st.serve_clock, paces, marks });
        st.had_consumer = true;
        st.last_used = now;
        self.pump_locked(st, now, &mut fx);
        self.rearm(st, &mut fx);
        Ok((id, fx))
    }

    /// Removes a consumer; its unacked messages stay with its owner.
    pub fn cancel(&self, consumer: ConsumerId, now: Millis) -> Effects {
        let mut fx = Effects::default();
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(i) = st.consumers.iter().position(|c| c.id == consumer) else {
            return fx;
        };
        st.consumers.remove(i);
        st.last_used = now;
        if st.consumers.is_empty() {
            fx.delete_queue = self.options.auto_delete && st.had_consumer;
            // Nobody consumes: it holds nobody back.
            self.release_held(st, &mut fx);
        } else {
            // With single active consumer the next one may just have become active.
            self.pump_locked(st, now, &mut fx);
        }
        // The last consumer leaving starts `x-expires`.
        self.rearm(st, &mut fx);
        fx
    }

    /// The consumers, in the order they came.
    pub fn consumers(&self) -> Vec<ConsumerInfo> {
        let st = self.lock();
        let single = self.args.single_active_consumer;
        st.consumers
            .iter()
            .enumerate()
            .map(|(i, c)| ConsumerInfo {
                id: c.id,
                tag: c.spec.tag.clone(),
                owner: c.spec.owner,
                connection: c.spec.connection,
                prefetch: c.spec.prefetch,
                no_ack: c.spec.no_ack,
                exclusive: c.spec.exclusive,
                priority: c.spec.priority,
                unacked: c.unacked,
                active: !single || i == 0,
            })
            .collect()
    }

    /// Takes one ready message (AMQP basic.get), with the count of messages left.
    pub fn get(&self, owner: OwnerId, no_ack: bool, now: Millis) -> (Option<(Delivery, u32)>, Effects) {
        let mut fx = Effects::default();
        let mut guard = self.lock();
        let st = &mut *guard;
        st.last_used = now;
        let entry = self.pop_live(st, now, &mut fx);
        self.release_waiters(st, &mut fx);
        self.rearm(st, &mut fx);
        let Some(entry) = entry else {
            return (None, fx);
        };
        st.delivered += 1;
        st.lag.drained();
        let delivery = Delivery {
            queue: self.name.clone(),
            consumer: None,
            seq: entry.seq,
            message: entry.message.clone(),
            redelivered: entry.redelivered,
        };
        if no_ack {
            self.forget(&entry, &mut fx);
        } else {
            if !entry.redelivered && self.stores_messages() && entry.message.is_persistent() {
                fx.delivered.push(entry.seq);
            }
            st.unacked_bytes += entry.message.body_size() as u64;
            st.unacked.insert(entry.seq, Unacked { entry, owner, consumer: None });
        }
        let left = u32::try_from(st.total_count()).unwrap_or(u32::MAX);
        (Some((delivery, left)), fx)
    }

    /// Acknowledges an unacked message.
    pub fn ack(&self, seq: u64, now: Millis) -> Result<Effects, CoreError> {
        let mut fx = Effects::default();
        let mut guard = self.lock();
        let st = &mut *guard;
        let u = st.take_unacked(seq)?;
        st.acked += 1;
        self.forget(&u.entry, &mut fx);
        self.pump_locked(st, now, &mut fx);
        self.rearm(st, &mut fx);
        Ok(fx)
    }

    /// [`Queue::ack`] of several messages under one lock, pumping once after them all (a
    /// bridge's link acks what its remote acknowledged in one turn). Those not unacked here are
    /// returned with their error; the others are acked whatever they are.
    pub fn ack_all(&self, seqs: &[u64], now: Millis) -> (Effects, Vec<(u64, CoreError)>) {
        let mut fx = Effects::default();
        let mut failed = Vec::new();
        let mut guard = self.lock();
        let st = &mut *guard;
        for &seq in seqs {
            match st.take_unacked(seq) {
                Ok(u) => {
                    st.acked += 1;
                    self.forget(&u.entry, &mut fx);
                }
                Err(e) => failed.push((seq, e)),
            }
        }
        self.pump_locked(st, now, &mut fx);
        self.rearm(st, &mut fx);
        (fx, failed)
    }

    /// Rejects an unacked message: back to its place in the queue (redelivered) or dead-lettered.
    pub fn reject(&self, seq: u64, requeue: bool, now: Millis) -> Result<Effects, CoreError> {
        let mut fx = Effects::default();
        let mut guard = self.lock();
        let st = &mut *guard;
        let u = st.take_unacked(seq)?;
        if requeue {
            st.requeue(self.level_of(&u.entry.message), u.entry);
            self.pump_locked(st, now, &mut fx);
            self.drop_head_to_limits(st, now, &mut fx);
        } else {
            self.discard(st, u.entry, DeadLetterReason::Rejected, now, &mut fx);
            self.pump_locked(st, now, &mut fx);
        }
        self.rearm(st, &mut fx);
        Ok(fx)
    }

    /// Requeues every unacked message of `owner` (channel closed, basic.recover requeue=true).
    pub fn release_owner(&self, owner: OwnerId, now: Millis) -> Effects {
        let mut fx = Effects::default();
        let mut guard = self.lock();
        let st = &mut *guard;
        let seqs: Vec<u64> = st.unacked.iter().filter(|(_, u)| u.owner == owner).map(|(&s, _)| s).collect();
        if seqs.is_empty() {
            return fx;
        }
        for seq in seqs {
            if let Ok(u) = st.take_unacked(seq) {
                st.requeue(self.level_of(&u.entry.message), u.entry);
            }
        }
        self.pump_locked(st, now, &mut fx);
        self.drop_head_to_limits(st, now, &mut fx);
        self.rearm(st, &mut fx);
        fx
    }

    /// Delivers to consumers that have room again.
    pub fn pump(&self, now: Millis) -> Effects {
        let mut fx = Effects::default();
        let mut guard = self.lock();
        self.pump_locked(&mut guard, now, &mut fx);
        self.rearm(&mut guard, &mut fx);
        fx
    }

    /// Expires messages whose TTL has passed, checks `x-expires`; returns the next deadline.
    pub fn tick(&self, now: Millis) -> (Effects, Option<Millis>) {
        let mut fx = Effects::default();
        let mut guard = self.lock();
        let st = &mut *guard;
        self.expire_heads(st, now, &mut fx);
        self.release_waiters(st, &mut fx);
        self.want_load(st, &mut fx, 0);
        let mut next = self.next_deadline(st);
        if let Some(expires) = self.args.expires {
            if st.consumers.is_empty() && !st.closed && now >= st.last_used.saturating_add(expires) {
                fx.delete_queue = true;
                next = st.levels.iter().filter_map(|l| l.front()?.expires_at).min();
            }
        }
        // The caller arms the timer with what this returns.
        st.armed = next;
        (fx, next)
    }

    /// The queue's next deadline, if the broker's timer is not armed for it yet (a new queue
    /// with `x-expires`).
    pub fn arm(&self) -> Option<Millis> {
        let mut fx = Effects::default();
        // Not `rearm`: these effects are dropped, and a load asked for here would never run.
        self.rearm_deadline(&mut self.lock(), &mut fx);
        fx.deadline
    }

    /// Marks the queue as used now (a redeclare), for `x-expires`.
    pub fn touch(&self, now: Millis) {
        self.lock().last_used = now;
    }

    /// Removes every ready message; returns how many.
    pub fn purge(&self, _now: Millis) -> (u32, Effects) {
        let mut fx = Effects::default();
        let mut st = self.lock();
        let count = u32::try_from(st.total_count()).unwrap_or(u32::MAX);
        for level in st.levels.iter_mut() {
            for e in level.drain(..) {
                self.forget(&e, &mut fx);
            }
        }
        st.ready_count = 0;
        st.ready_bytes = 0;
        if st.tail.count > 0 {
            fx.forgotten_range = Some((st.tail.first_seq, st.tail.last_seq));
        }
        // A load in flight finds a new generation and is ignored.
        st.tail = Tail::default();
        st.holes.clear();
        st.loading = None;
        st.epoch += 1;
        self.release_waiters(&mut st, &mut fx);
        (count, fx)
    }

    /// Checks delete's `if_unused` / `if_empty` conditions.
    pub fn check_delete(&self, if_unused: bool, if_empty: bool) -> Result<(), CoreError> {
        let st = self.lock();
        if if_unused && !st.consumers.is_empty() {
            return Err(CoreError::PreconditionFailed(format!("queue '{}' in use", self.name)));
        }
        if if_empty && st.total_count() > 0 {
            return Err(CoreError::PreconditionFailed(format!("queue '{}' not empty", self.name)));
        }
        Ok(())
    }

    /// Tears the queue down: cancels every consumer (notifying their sinks) and returns the
    /// number of messages it held.
    ///
    /// The count is of ready messages (AMQP delete-ok's `message-count`). The effects hold only
    /// the publishers a `block` queue held back, released: the store's queue deletion removes
    /// every message of the queue at once. Afterwards the
    /// queue refuses messages (`Rejected`) and consumers (`NotFound`).
    pub fn shutdown(&self) -> (u32, Effects) {
        let mut st = self.lock();
        let count = u32::try_from(st.total_count()).unwrap_or(u32::MAX);
        st.tail = Tail::default();
        st.holes.clear();
        st.epoch += 1;
        for c in st.consumers.drain(..) {
            c.spec.sink.cancelled(&self.name, c.id);
        }
        for level in st.levels.iter_mut() {
            level.clear();
        }
        st.unacked.clear();
        st.unacked_bytes = 0;
        st.ready_count = 0;
        st.ready_bytes = 0;
        st.closed = true;
        // Held publishers go: their messages went with the queue, as everyone else's did.
        let mut fx = Effects::default();
        self.release_waiters(&mut st, &mut fx);
        drop(st);
        (count, fx)
    }

    pub fn stats(&self) -> QueueStats {
        let st = self.lock();
        QueueStats {
            ready: u32::try_from(st.total_count()).unwrap_or(u32::MAX),
            unacked: u32::try_from(st.unacked.len()).unwrap_or(u32::MAX),
            consumers: u32::try_from(st.consumers.len()).unwrap_or(u32::MAX),
            ready_bytes: st.total_bytes(),
            paged_out: u32::try_from(st.tail.count).unwrap_or(u32::MAX),
            paged_out_bytes: st.tail.bytes,
            unacked_bytes: st.unacked_bytes,
            dropped_overflow: st.dropped_overflow,
            rejected_overflow: st.rejected_overflow,
            published: st.published,
            delivered: st.delivered,
            acked: st.acked,
            held_overflow: st.held_overflow,
            held_publishers: st.held_publishers,
        }
    }
}

/// The bytes of a string field value (`S` or `x`).
fn bytes_of(v: &FieldValue) -> Option<&[u8]> {
    match v {
        FieldValue::LongString(b) | FieldValue::Bytes(b) => Some(b),
        _ => None,
    }
}

/// RabbitMQ's cycle rule: walking `x-death` from the newest entry, meeting this queue before
/// any `rejected` death means the message went round without a client's decision — drop it.
/// An entry that is not a table was put there by a client, so it breaks the cycle too.
fn is_cycle(deaths: &[FieldValue], queue: &[u8]) -> bool {
    for d in deaths {
        let FieldValue::Table(t) = d else {
            return false;
        };
        if t.get("reason").and_then(bytes_of) == Some(b"rejected".as_slice()) {
            return false;
        }
        if t.get("queue").and_then(bytes_of) == Some(queue) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{DeliveryMode, MoreProperties, Properties};
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    const UNLIMITED: usize = usize::MAX;

    /// A consumer sink that takes `room` more deliveries (`UNLIMITED` for no bound).
    #[derive(Debug)]
    struct TestSink {
        room: AtomicUsize,
        got: Mutex<Vec<Delivery>>,
        cancelled: Mutex<Vec<ConsumerId>>,
        /// [`ConsumerSink::paces_publishers`] (an AMQP consumer's sink says yes).
        paces: bool,
        /// [`ConsumerSink::records_deliveries`] (a bridge link's sink says no).
        marks: bool,
    }

    impl TestSink {
        fn new() -> Arc<TestSink> {
            TestSink::with_room(UNLIMITED)
        }
        fn with_room(room: usize) -> Arc<TestSink> {
            Arc::new(TestSink {
                room: AtomicUsize::new(room),
                got: Mutex::new(Vec::new()),
                cancelled: Mutex::new(Vec::new()),
                paces: false,
                marks: true,
            })
        }
        /// A consumer that paces its publishers, taking `room` deliveries.
        fn pacing(room: usize) -> Arc<TestSink> {
            Arc::new(TestSink {
                room: AtomicUsize::new(room),
                got: Mutex::new(Vec::new()),
                cancelled: Mutex::new(Vec::new()),
                paces: true,
                marks: true,
            })
        }
        fn set_room(&self, room: usize) {
            self.room.store(room, Ordering::SeqCst);
        }
        fn take(&self) -> Vec<Delivery> {
            std::mem::take(&mut *self.got.lock().unwrap())
        }
        fn bodies(&self) -> Vec<String> {
            bodies(&self.take())
        }
    }

    impl ConsumerSink for TestSink {
        fn has_room(&self) -> bool {
            self.room.load(Ordering::SeqCst) > 0
        }
        fn deliver(&self, delivery: Delivery) {
            let _ = self
                .room
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| (r != UNLIMITED).then(|| r.saturating_sub(1)));
            self.got.lock().unwrap().push(delivery);
        }
        fn cancelled(&self, _queue: &QueueName, consumer: ConsumerId) {
            self.cancelled.lock().unwrap().push(consumer);
        }
        fn paces_publishers(&self) -> bool {
            self.paces
        }
        fn records_deliveries(&self) -> bool {
            self.marks
        }
    }

    fn body(d: &Delivery) -> String {
        String::from_utf8(d.message.payload.to_vec()).unwrap()
    }
    fn bodies(ds: &[Delivery]) -> Vec<String> {
        ds.iter().map(body).collect()
    }

    fn table(pairs: Vec<(&str, FieldValue)>) -> FieldTable {
        pairs.into_iter().map(|(k, v)| (ShortString::from(k), v)).collect()
    }
    fn s(text: &str) -> FieldValue {
        FieldValue::string(text)
    }
    fn parse(pairs: Vec<(&str, FieldValue)>) -> Result<QueueArgs, CoreError> {
        QueueArgs::from_table_for(&"q".into(), &table(pairs))
    }
    fn refused(pairs: Vec<(&str, FieldValue)>) -> String {
        match parse(pairs) {
            Err(CoreError::PreconditionFailed(text)) => text,
            other => panic!("expected PreconditionFailed, got {other:?}"),
        }
    }

    #[test]
    fn whether_a_queue_is_reserved_is_asked_once_per_policy_epoch() {
        let q = queue(vec![]);
        assert!(q.reserved_as_of(0, || true));
        assert!(q.reserved_as_of(0, || panic!("cached under epoch 0")));
        // A new policy (a reload) is asked again.
        assert!(!q.reserved_as_of(1, || false));
        assert!(!q.reserved_as_of(1, || panic!("cached under epoch 1")));
    }

    fn queue(pairs: Vec<(&str, FieldValue)>) -> Queue {
        Queue::new("q".into(), QueueOptions { arguments: table(pairs), ..Default::default() }, 0).unwrap()
    }
    fn durable_queue(pairs: Vec<(&str, FieldValue)>) -> Queue {
        Queue::new("q".into(), QueueOptions { durable: true, arguments: table(pairs), ..Default::default() }, 0)
            .unwrap()
    }
    fn dlx_queue(mut pairs: Vec<(&str, FieldValue)>) -> Queue {
        pairs.push(("x-dead-letter-exchange", s("dlx")));
        queue(pairs)
    }

    fn msg(text: &str) -> Arc<Message> {
        msg_with(text, Properties::default())
    }
    fn msg_with(text: &str, properties: Properties) -> Arc<Message> {
        Arc::new(Message::new("ex", "rk", Bytes::copy_from_slice(text.as_bytes())).with_properties(properties))
    }
    fn with_priority(text: &str, p: u8) -> Arc<Message> {
        msg_with(text, Properties { priority: Some(p), ..Default::default() })
    }
    fn with_expiration(text: &str, ms: &str) -> Arc<Message> {
        msg_with(
            text,
            Properties::default().with_more(MoreProperties { expiration: Some(ms.into()), ..Default::default() }),
        )
    }
    fn persistent(text: &str) -> Arc<Message> {
        msg_with(text, Properties { delivery_mode: Some(DeliveryMode::Persistent), ..Default::default() })
    }

    fn spec(sink: &Arc<TestSink>, owner: u64) -> ConsumerSpec {
        ConsumerSpec {
            tag: "ctag".into(),
            owner: OwnerId(owner),
            connection: ConnectionId(1),
            prefetch: 0,
            no_ack: false,
            exclusive: false,
            priority: 0,
            sink: sink.clone(),
        }
    }

    /// The queue's depths and overflow counts, without its traffic counters.
    fn depths(q: &Queue) -> QueueStats {
        QueueStats { published: 0, delivered: 0, acked: 0, ..q.stats() }
    }

    fn put(q: &Queue, m: Arc<Message>, now: Millis) -> u64 {
        match q.enqueue(m, now).0 {
            EnqueueOutcome::Accepted { seq } => seq,
            EnqueueOutcome::Rejected => panic!("rejected"),
        }
    }
    fn get_body(q: &Queue, now: Millis) -> Option<String> {
        q.get(OwnerId(99), true, now).0.map(|(d, _)| body(&d))
    }
    fn drain(q: &Queue, now: Millis) -> Vec<String> {
        std::iter::from_fn(|| get_body(q, now)).collect()
    }

    fn header_str(m: &Message, key: &str) -> Option<String> {
        m.properties.header(key).and_then(FieldValue::as_str).map(str::to_string)
    }
    fn deaths(m: &Message) -> Vec<FieldTable> {
        match m.properties.header("x-death") {
            Some(FieldValue::Array(a)) => a
                .iter()
                .map(|d| match d {
                    FieldValue::Table(t) => t.clone(),
                    other => panic!("x-death entry is not a table: {other:?}"),
                })
                .collect(),
            other => panic!("no x-death array: {other:?}"),
        }
    }
    fn field_str(t: &FieldTable, key: &str) -> Option<String> {
        t.get(key).and_then(FieldValue::as_str).map(str::to_string)
    }

    // ---- arguments ----

    #[test]
    fn absent_arguments_give_defaults() {
        assert_eq!(parse(vec![]).unwrap(), QueueArgs::default());
    }

    #[test]
    fn unknown_arguments_are_ignored() {
        assert_eq!(parse(vec![("x-whatever", s("x")), ("x-queue-mode", s("lazy"))]).unwrap(), QueueArgs::default());
    }

    #[test]
    fn integer_arguments_accept_every_width() {
        let values = [
            FieldValue::I8(7),
            FieldValue::U8(7),
            FieldValue::I16(7),
            FieldValue::U16(7),
            FieldValue::I32(7),
            FieldValue::U32(7),
            FieldValue::I64(7),
            FieldValue::U64(7),
        ];
        for v in values {
            let a = parse(vec![
                ("x-message-ttl", v.clone()),
                ("x-expires", v.clone()),
                ("x-max-length", v.clone()),
                ("x-max-length-bytes", v.clone()),
                ("x-max-priority", v.clone()),
            ])
            .unwrap();
            assert_eq!(
                (a.message_ttl, a.expires, a.max_length, a.max_length_bytes, a.max_priority),
                (Some(7), Some(7), Some(7), Some(7), Some(7)),
                "{v:?}"
            );
        }
    }

    #[test]
    fn message_ttl_accepts_zero_and_refuses_negative_or_text() {
        assert_eq!(parse(vec![("x-message-ttl", FieldValue::I32(0))]).unwrap().message_ttl, Some(0));
        assert_eq!(
            refused(vec![("x-message-ttl", FieldValue::I32(-1))]),
            "invalid arg 'x-message-ttl' for queue 'q': {value_negative,-1}"
        );
        assert_eq!(
            refused(vec![("x-message-ttl", s("1000"))]),
            "invalid arg 'x-message-ttl' for queue 'q': {unacceptable_type,longstr}"
        );
        assert_eq!(
            refused(vec![("x-message-ttl", FieldValue::I64(4_294_967_296))]),
            "invalid arg 'x-message-ttl' for queue 'q': {value_too_large,4294967296}"
        );
    }

    #[test]
    fn expires_must_be_a_positive_integer() {
        assert_eq!(parse(vec![("x-expires", FieldValue::I16(1))]).unwrap().expires, Some(1));
        assert_eq!(
            refused(vec![("x-expires", FieldValue::I32(0))]),
            "invalid arg 'x-expires' for queue 'q': {value_zero,0}"
        );
        assert_eq!(
            refused(vec![("x-expires", FieldValue::I8(-5))]),
            "invalid arg 'x-expires' for queue 'q': {value_negative,-5}"
        );
        assert_eq!(
            refused(vec![("x-expires", FieldValue::F64(1.0))]),
            "invalid arg 'x-expires' for queue 'q': {unacceptable_type,double}"
        );
    }

    #[test]
    fn max_length_arguments_must_be_non_negative_integers() {
        let a = parse(vec![("x-max-length", FieldValue::I32(0)), ("x-max-length-bytes", FieldValue::U64(u64::MAX))])
            .unwrap();
        assert_eq!((a.max_length, a.max_length_bytes), (Some(0), Some(u64::MAX)));
        assert_eq!(
            refused(vec![("x-max-length", FieldValue::I32(-2))]),
            "invalid arg 'x-max-length' for queue 'q': {value_negative,-2}"
        );
        assert_eq!(
            refused(vec![("x-max-length-bytes", FieldValue::Bool(true))]),
            "invalid arg 'x-max-length-bytes' for queue 'q': {unacceptable_type,bool}"
        );
    }

    #[test]
    fn overflow_takes_the_three_rabbitmq_values_and_ferrys_block() {
        for (text, want) in [
            ("drop-head", Overflow::DropHead),
            ("reject-publish", Overflow::RejectPublish),
            ("reject-publish-dlx", Overflow::RejectPublishDlx),
            ("block", Overflow::Block),
        ] {
            assert_eq!(parse(vec![("x-overflow", s(text))]).unwrap().overflow, want);
        }
        assert_eq!(
            refused(vec![("x-overflow", s("drop-tail"))]),
            "invalid arg 'x-overflow' for queue 'q': invalid_overflow"
        );
        assert_eq!(
            refused(vec![("x-overflow", FieldValue::I8(1))]),
            "invalid arg 'x-overflow' for queue 'q': {unacceptable_type,byte}"
        );
    }

    #[test]
    fn dead_letter_routing_key_needs_a_dead_letter_exchange() {
        let a = parse(vec![("x-dead-letter-exchange", s("")), ("x-dead-letter-routing-key", s("dead"))]).unwrap();
        assert_eq!(a.dead_letter_exchange, Some("".into()));
        assert_eq!(a.dead_letter_routing_key, Some("dead".into()));
        assert_eq!(
            refused(vec![("x-dead-letter-routing-key", s("dead"))]),
            "invalid arg 'x-dead-letter-routing-key' for queue 'q': routing_key_but_no_dlx_defined"
        );
        assert_eq!(
            refused(vec![("x-dead-letter-exchange", FieldValue::I32(1))]),
            "invalid arg 'x-dead-letter-exchange' for queue 'q': {unacceptable_type,signedint}"
        );
    }

    #[test]
    fn max_priority_is_capped_at_255_and_zero_means_none() {
        assert_eq!(parse(vec![("x-max-priority", FieldValue::U8(0))]).unwrap().max_priority, None);
        assert_eq!(parse(vec![("x-max-priority", FieldValue::I32(255))]).unwrap().max_priority, Some(255));
        assert_eq!(
            refused(vec![("x-max-priority", FieldValue::I32(256))]),
            "invalid arg 'x-max-priority' for queue 'q': {max_value_exceeded,256}"
        );
        assert_eq!(
            refused(vec![("x-max-priority", FieldValue::I32(-1))]),
            "invalid arg 'x-max-priority' for queue 'q': {value_negative,-1}"
        );
    }

    #[test]
    fn single_active_consumer_must_be_a_bool() {
        assert!(parse(vec![("x-single-active-consumer", FieldValue::Bool(true))]).unwrap().single_active_consumer);
        assert_eq!(
            refused(vec![("x-single-active-consumer", s("true"))]),
            "invalid arg 'x-single-active-consumer' for queue 'q': {unacceptable_type,longstr}"
        );
    }

    #[test]
    fn queue_type_must_be_classic() {
        assert!(parse(vec![("x-queue-type", s("classic"))]).is_ok());
        assert_eq!(
            refused(vec![("x-queue-type", s("quorum"))]),
            "invalid arg 'x-queue-type' for queue 'q': {unsupported_queue_type,quorum}"
        );
        assert_eq!(
            refused(vec![("x-queue-type", FieldValue::Bool(true))]),
            "invalid arg 'x-queue-type' for queue 'q': {unacceptable_type,bool}"
        );
    }

    #[test]
    fn queue_new_refuses_invalid_arguments_naming_the_queue() {
        let err = Queue::new(
            "orders".into(),
            QueueOptions { arguments: table(vec![("x-max-length", FieldValue::I64(-1))]), ..Default::default() },
            0,
        )
        .unwrap_err();
        assert_eq!(
            err,
            CoreError::PreconditionFailed("invalid arg 'x-max-length' for queue 'orders': {value_negative,-1}".into())
        );
    }

    // ---- ready messages ----

    // ----- paging: the tail on disk -------------------------------------------------------------

    /// The store's side of a paging queue in these tests: what was paged out, by seq.
    #[derive(Default)]
    struct Disk(std::collections::BTreeMap<u64, Arc<Message>>);

    impl Disk {
        /// Enqueues like the vhost does: a message paged out goes to the disk.
        fn put(&mut self, q: &Queue, m: Arc<Message>) -> (u64, Effects) {
            let (outcome, fx) = q.enqueue(m.clone(), 0);
            let EnqueueOutcome::Accepted { seq } = outcome else { panic!("refused") };
            if fx.paged {
                self.0.insert(seq, m);
            }
            (seq, fx)
        }
        /// Answers every load the effects ask for (and the loads those answers ask for).
        fn serve(&self, q: &Queue, mut fx: Effects) {
            while let Some(load) = fx.load.take() {
                fx = q.loaded(load, Ok(self.read(load)), 0);
            }
        }
        fn read(&self, load: Load) -> Vec<crate::store::StoredMessage> {
            self.0
                .range(load.from_seq..)
                .take(load.max_count)
                .map(|(seq, m)| crate::store::StoredMessage { seq: *seq, message: m.clone(), delivered: false })
                .collect()
        }
        /// `get` until empty, serving loads: the bodies in the order they came.
        fn drain(&self, q: &Queue) -> Vec<String> {
            let mut out = Vec::new();
            loop {
                let (got, fx) = q.get(OwnerId(1), true, 0);
                match got {
                    Some((d, _)) => {
                        out.push(body(&d));
                        self.serve(q, fx);
                    }
                    None if fx.load.is_some() => self.serve(q, fx),
                    None => return out,
                }
            }
        }
    }

    const W: u64 = PAGE_WINDOW;

    #[test]
    fn a_durable_queue_pages_messages_past_the_window_and_serves_them_in_order() {
        let q = durable_queue(vec![]);
        let mut disk = Disk::default();
        let n = W + 100;
        for i in 0..n {
            let (_, fx) = disk.put(&q, persistent(&i.to_string()));
            assert_eq!(fx.paged, i >= W, "message {i}");
        }
        let st = q.stats();
        assert_eq!((st.ready, st.paged_out), (n as u32, 100));
        assert_eq!(st.paged_out_bytes, (W..n).map(|i| i.to_string().len() as u64).sum::<u64>());
        // What the memory alarm counts leaves the tail out.
        let in_memory =
            QueueStats { ready: W as u32, ready_bytes: st.ready_bytes - st.paged_out_bytes, ..QueueStats::default() };
        assert_eq!(st.memory(), in_memory.memory());
        let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        assert_eq!(disk.drain(&q), want);
        assert_eq!(q.stats().ready, 0);
    }

    #[test]
    fn while_the_tail_is_not_empty_new_messages_go_behind_it_even_with_a_consumer_waiting() {
        let q = durable_queue(vec![]);
        let mut disk = Disk::default();
        for i in 0..W + 3 {
            disk.put(&q, persistent(&i.to_string()));
        }
        let sink = TestSink::new();
        let (_, fx) = q.consume(ConsumerSpec { no_ack: true, ..spec(&sink, 1) }, 0).unwrap();
        // The consumer took the window; the tail's load is asked for. A message published now
        // must not overtake the tail.
        assert!(fx.load.is_some());
        let (_, fx2) = disk.put(&q, persistent("new"));
        assert!(fx2.paged);
        disk.serve(&q, fx);
        let got = sink.bodies();
        assert_eq!(got.len() as u64, W + 4);
        let w = W as usize;
        assert_eq!(got[w..], [w.to_string(), (w + 1).to_string(), (w + 2).to_string(), "new".into()]);
    }

    #[test]
    fn a_requeued_message_goes_back_before_the_tail() {
        let q = durable_queue(vec![]);
        let mut disk = Disk::default();
        for i in 0..W + 2 {
            disk.put(&q, persistent(&i.to_string()));
        }
        let (got, fx) = q.get(OwnerId(1), false, 0);
        let first = got.unwrap().0;
        disk.serve(&q, fx);
        // Take everything in memory but one, so the tail's head is loaded behind it.
        for _ in 0..W - 1 {
            let (got, fx) = q.get(OwnerId(2), true, 0);
            assert!(got.is_some());
            disk.serve(&q, fx);
        }
        let fx = q.reject(first.seq, true, 0).unwrap();
        disk.serve(&q, fx);
        assert_eq!(disk.drain(&q), ["0".to_string(), W.to_string(), (W + 1).to_string()]);
    }

    #[test]
    fn a_load_takes_only_the_contiguous_head_and_asks_again_for_a_missing_put() {
        let q = durable_queue(vec![]);
        let mut disk = Disk::default();
        for i in 0..W + 3 {
            disk.put(&q, persistent(&i.to_string()));
        }
        // The put of the tail's second message has not reached the store yet.
        let missing = *disk.0.keys().nth(1).unwrap();
        let late = disk.0.remove(&missing).unwrap();
        // The load is asked for once memory is down to three quarters of the window.
        let mut load = None;
        for _ in 0..W {
            let (got, fx) = q.get(OwnerId(1), true, 0);
            assert!(got.is_some());
            load = load.or(fx.load);
        }
        let load = load.expect("a load of the tail");
        let fx = q.loaded(load, Ok(disk.read(load)), 0);
        assert_eq!(q.stats().paged_out, 2);
        let retry = fx.load.expect("asks again");
        assert_eq!((retry.from_seq, retry.retry), (missing, 0));
        // Nothing new yet: asked again, with a retry count (the caller waits a little).
        let fx = q.loaded(retry, Ok(disk.read(retry)), 0);
        let again = fx.load.expect("asks again");
        assert_eq!(again.retry, 1);
        disk.0.insert(missing, late);
        disk.serve(&q, Effects { load: Some(again), ..Effects::default() });
        assert_eq!(disk.drain(&q), [W.to_string(), (W + 1).to_string(), (W + 2).to_string()]);
    }

    #[test]
    fn seqs_refused_behind_the_tail_are_holes_a_load_skips() {
        let q =
            durable_queue(vec![("x-max-length", FieldValue::I32((W + 3) as i32)), ("x-overflow", s("reject-publish"))]);
        let mut disk = Disk::default();
        for i in 0..W + 1 {
            disk.put(&q, persistent(&i.to_string()));
        }
        disk.put(&q, persistent("a"));
        disk.put(&q, persistent("b"));
        // Refused: its seq is never stored.
        let (outcome, _) = q.enqueue(persistent("refused"), 0);
        assert_eq!(outcome, EnqueueOutcome::Rejected);
        assert_eq!(q.stats().rejected_overflow, 1);
        let (got, _) = q.get(OwnerId(1), true, 0);
        assert!(got.is_some());
        disk.put(&q, persistent("c"));
        let got = disk.drain(&q);
        assert_eq!(got[got.len() - 4..], [W.to_string(), "a".into(), "b".into(), "c".into()]);
    }

    #[test]
    fn purge_removes_the_tail_with_one_range_and_ignores_a_load_answered_after_it() {
        let q = durable_queue(vec![]);
        let mut disk = Disk::default();
        for i in 0..W + 10 {
            disk.put(&q, persistent(&i.to_string()));
        }
        let sink = TestSink::new();
        let (id, fx) = q.consume(ConsumerSpec { no_ack: true, ..spec(&sink, 1) }, 0).unwrap();
        let stale = fx.load.expect("a load");
        q.cancel(id, 0);
        let (count, fx) = q.purge(0);
        assert_eq!(count, 10);
        assert_eq!(fx.forgotten_range, Some((W + 1, W + 10)));
        let fx = q.loaded(stale, Ok(disk.read(stale)), 0);
        assert!(fx.load.is_none());
        assert_eq!(q.stats().ready, 0);
        // It pages again from an empty tail.
        let (_, fx) = disk.put(&q, persistent("after"));
        assert!(!fx.paged);
        assert_eq!(disk.drain(&q), ["after"]);
    }

    #[test]
    fn max_length_counts_the_tail_and_drop_head_drops_from_memory_in_order() {
        let q = durable_queue(vec![("x-max-length", FieldValue::I32((W + 10) as i32))]);
        let mut disk = Disk::default();
        for i in 0..W + 20 {
            let (_, fx) = disk.put(&q, persistent(&i.to_string()));
            disk.serve(&q, fx);
        }
        let st = q.stats();
        assert_eq!((st.ready as u64, st.dropped_overflow, st.paged_out), (W + 10, 10, 20));
        let got = disk.drain(&q);
        let want: Vec<String> = (10..W + 20).map(|i| i.to_string()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_transient_message_past_the_window_is_paged_and_forgotten_like_a_persistent_one() {
        let q = durable_queue(vec![]);
        let mut disk = Disk::default();
        for i in 0..W {
            disk.put(&q, persistent(&i.to_string()));
        }
        let (seq, fx) = disk.put(&q, msg("transient"));
        assert!(fx.paged);
        for _ in 0..W {
            let (_, fx) = q.get(OwnerId(1), true, 0);
            disk.serve(&q, fx);
        }
        let (got, fx) = q.get(OwnerId(1), false, 0);
        assert_eq!(body(&got.unwrap().0), "transient");
        // Not marked delivered (it does not outlive a restart), but deleted when acked.
        assert!(!fx.delivered.contains(&seq));
        let fx = q.ack(seq, 0).unwrap();
        assert_eq!(fx.forgotten_runs, [(seq, seq)]);
    }

    #[test]
    fn a_load_is_asked_for_once_memory_is_down_to_three_quarters_of_the_window() {
        let q = durable_queue(vec![]);
        let mut disk = Disk::default();
        for i in 0..W + 10 {
            disk.put(&q, persistent(&i.to_string()));
        }
        for _ in 0..W / 4 - 1 {
            let (got, fx) = q.get(OwnerId(1), true, 0);
            assert!(got.is_some());
            assert!(fx.load.is_none(), "memory holds more than three quarters of the window");
        }
        let (_, fx) = q.get(OwnerId(1), true, 0);
        let load = fx.load.expect("a load at three quarters");
        assert_eq!((load.from_seq, load.max_count as u64), (W + 1, W / 4));
    }

    #[test]
    fn messages_read_back_from_the_tail_are_forgotten_in_runs_the_window_one_by_one() {
        let q = durable_queue(vec![]);
        let mut disk = Disk::default();
        for i in 0..W + 100 {
            disk.put(&q, persistent(&i.to_string()));
        }
        let sink = TestSink::new();
        let (_, mut fx) = q.consume(ConsumerSpec { no_ack: true, ..spec(&sink, 1) }, 0).unwrap();
        let mut all = Effects::default();
        loop {
            let load = fx.load.take();
            all.merge(fx);
            let Some(load) = load else { break };
            fx = q.loaded(load, Ok(disk.read(load)), 0);
        }
        assert_eq!(sink.bodies().len() as u64, W + 100);
        // The window's puts may still be in the writer's group (a put and its delete in one
        // group are not written): one delete each. The tail's are committed: one run.
        assert_eq!(all.forgotten, (1..=W).collect::<Vec<u64>>());
        assert_eq!(all.forgotten_runs, [(W + 1, W + 100)]);
    }

    #[test]
    fn acks_of_messages_read_back_make_runs_only_where_they_follow_each_other() {
        let q = durable_queue(vec![]);
        let mut disk = Disk::default();
        for i in 0..W + 4 {
            disk.put(&q, persistent(&i.to_string()));
        }
        let mut fx = Effects::default();
        for _ in 0..W {
            let (got, more) = q.get(OwnerId(1), true, 0);
            assert!(got.is_some());
            fx.merge(more);
        }
        disk.serve(&q, fx);
        let seqs: Vec<u64> = (0..4).map(|_| q.get(OwnerId(1), false, 0).0.unwrap().0.seq).collect();
        assert_eq!(seqs, [W + 1, W + 2, W + 3, W + 4]);
        let mut acks = Effects::default();
        for seq in [W + 1, W + 2, W + 4, W + 3] {
            acks.merge(q.ack(seq, 0).unwrap());
        }
        assert!(acks.forgotten.is_empty());
        assert_eq!(acks.forgotten_runs, [(W + 1, W + 2), (W + 4, W + 4), (W + 3, W + 3)]);
    }

    #[test]
    fn a_priority_queue_and_a_non_durable_queue_do_not_page() {
        for q in [durable_queue(vec![("x-max-priority", FieldValue::I32(3))]), queue(vec![])] {
            assert!(!q.pages());
            for i in 0..W + 1 {
                let (_, fx) = q.enqueue(persistent(&i.to_string()), 0);
                assert!(!fx.paged);
            }
            assert_eq!(q.stats().paged_out, 0);
        }
    }

    #[test]
    fn a_tail_message_with_a_ttl_expires_when_it_comes_back() {
        let q = durable_queue(vec![]);
        let mut disk = Disk::default();
        for i in 0..W {
            disk.put(&q, persistent(&i.to_string()));
        }
        let m = Arc::new(
            Message::new("ex", "rk", Bytes::from_static(b"ttl"))
                .with_properties(
                    Properties { delivery_mode: Some(DeliveryMode::Persistent), ..Default::default() }
                        .with_more(MoreProperties { expiration: Some("10".into()), ..Default::default() }),
                )
                .at(0),
        );
        disk.put(&q, m);
        disk.put(&q, persistent("live"));
        for _ in 0..W {
            let (_, fx) = q.get(OwnerId(1), true, 0);
            disk.serve(&q, fx);
        }
        assert_eq!(q.stats().paged_out, 0);
        // Its expiry came back with it (published at 0, 10 ms): at 1,000 ms it is gone.
        let (got, fx) = q.get(OwnerId(1), true, 1_000);
        assert_eq!(body(&got.unwrap().0), "live");
        assert_eq!(fx.forgotten_runs, [(W + 1, W + 2)], "the expired one and the one taken");
    }

    #[test]
    fn ready_messages_come_out_in_fifo_order() {
        let q = queue(vec![]);
        for b in ["a", "b", "c"] {
            put(&q, msg(b), 0);
        }
        assert_eq!(drain(&q, 0), ["a", "b", "c"]);
    }

    #[test]
    fn each_enqueue_gets_a_fresh_increasing_seq() {
        let q = queue(vec![]);
        assert_eq!([put(&q, msg("a"), 0), put(&q, msg("b"), 0), put(&q, msg("c"), 0)], [1, 2, 3]);
    }

    #[test]
    fn higher_priority_levels_are_served_first_and_capped_at_max_priority() {
        let q = queue(vec![("x-max-priority", FieldValue::U8(5))]);
        put(&q, msg("none"), 0);
        put(&q, with_priority("p1", 1), 0);
        put(&q, with_priority("p9", 9), 0); // capped to 5
        put(&q, with_priority("p5", 5), 0);
        put(&q, with_priority("p1b", 1), 0);
        assert_eq!(drain(&q, 0), ["p9", "p5", "p1", "p1b", "none"]);
    }

    #[test]
    fn without_max_priority_message_priority_is_ignored() {
        let q = queue(vec![]);
        put(&q, with_priority("low", 0), 0);
        put(&q, with_priority("high", 9), 0);
        assert_eq!(drain(&q, 0), ["low", "high"]);
    }

    // ---- consumers ----

    #[test]
    fn consumers_of_equal_priority_are_served_round_robin() {
        let q = queue(vec![]);
        let (a, b) = (TestSink::new(), TestSink::new());
        q.consume(spec(&a, 1), 0).unwrap();
        q.consume(spec(&b, 1), 0).unwrap();
        for m in ["1", "2", "3", "4", "5"] {
            put(&q, msg(m), 0);
        }
        assert_eq!(a.bodies(), ["1", "3", "5"]);
        assert_eq!(b.bodies(), ["2", "4"]);
    }

    #[test]
    fn a_new_consumer_receives_the_ready_backlog() {
        let q = queue(vec![]);
        put(&q, msg("a"), 0);
        put(&q, msg("b"), 0);
        let sink = TestSink::new();
        q.consume(spec(&sink, 1), 0).unwrap();
        let got = sink.take();
        assert_eq!(bodies(&got), ["a", "b"]);
        assert_eq!((got[0].seq, got[0].consumer.is_some(), got[0].queue.clone()), (1, true, "q".into()));
        assert_eq!(
            depths(&q),
            QueueStats {
                ready: 0,
                unacked: 2,
                consumers: 1,
                ready_bytes: 0,
                unacked_bytes: 2,
                ..QueueStats::default()
            }
        );
    }

    #[test]
    fn prefetch_bounds_unacked_and_an_ack_frees_credit() {
        let q = queue(vec![]);
        let sink = TestSink::new();
        q.consume(ConsumerSpec { prefetch: 2, ..spec(&sink, 1) }, 0).unwrap();
        for m in ["a", "b", "c", "d"] {
            put(&q, msg(m), 0);
        }
        let got = sink.take();
        assert_eq!(bodies(&got), ["a", "b"]);
        assert_eq!((q.stats().ready, q.stats().unacked), (2, 2));
        q.ack(got[0].seq, 0).unwrap();
        assert_eq!(sink.bodies(), ["c"]);
        assert_eq!((q.stats().ready, q.stats().unacked), (1, 2));
    }

    #[test]
    fn a_full_sink_stops_delivery_until_pump() {
        let q = queue(vec![]);
        let sink = TestSink::with_room(1);
        q.consume(spec(&sink, 1), 0).unwrap();
        put(&q, msg("a"), 0);
        put(&q, msg("b"), 0);
        put(&q, msg("c"), 0);
        assert_eq!(sink.bodies(), ["a"]);
        assert_eq!(q.stats().ready, 2);
        assert!(q.pump(0).is_empty());
        assert!(sink.take().is_empty(), "no room, no delivery");
        sink.set_room(UNLIMITED);
        q.pump(0);
        assert_eq!(sink.bodies(), ["b", "c"]);
        assert_eq!(q.stats().ready, 0);
    }

    #[test]
    fn a_message_does_not_overtake_older_ready_ones_when_room_returns() {
        let q = queue(vec![]);
        let sink = TestSink::with_room(0);
        q.consume(spec(&sink, 1), 0).unwrap();
        put(&q, msg("old"), 0);
        sink.set_room(UNLIMITED);
        put(&q, msg("new"), 0);
        assert_eq!(sink.bodies(), ["old", "new"]);
    }

    #[test]
    fn higher_priority_consumer_is_served_while_it_has_credit() {
        let q = queue(vec![]);
        let (low, high) = (TestSink::new(), TestSink::new());
        q.consume(spec(&low, 1), 0).unwrap();
        q.consume(ConsumerSpec { priority: 10, prefetch: 2, ..spec(&high, 1) }, 0).unwrap();
        for m in ["1", "2", "3", "4"] {
            put(&q, msg(m), 0);
        }
        let h = high.take();
        assert_eq!(bodies(&h), ["1", "2"]);
        assert_eq!(low.bodies(), ["3", "4"]);
        q.ack(h[0].seq, 0).unwrap();
        put(&q, msg("5"), 0);
        assert_eq!(high.bodies(), ["5"]);
        assert!(low.take().is_empty());
    }

    #[test]
    fn an_exclusive_consumer_refuses_others_and_needs_an_empty_queue() {
        let q = queue(vec![]);
        let (a, b) = (TestSink::new(), TestSink::new());
        let refused = CoreError::AccessRefused("queue 'q' in exclusive use".into());
        q.consume(ConsumerSpec { exclusive: true, ..spec(&a, 1) }, 0).unwrap();
        assert_eq!(q.consume(spec(&b, 2), 0).unwrap_err(), refused);

        let q2 = queue(vec![]);
        q2.consume(spec(&a, 1), 0).unwrap();
        assert_eq!(q2.consume(ConsumerSpec { exclusive: true, ..spec(&b, 2) }, 0).unwrap_err(), refused);
        assert_eq!(q2.stats().consumers, 1);
    }

    #[test]
    fn single_active_consumer_hands_over_to_the_next_registered_on_cancel() {
        let q = queue(vec![("x-single-active-consumer", FieldValue::Bool(true))]);
        let (a, b, c) = (TestSink::new(), TestSink::new(), TestSink::new());
        let (ida, _) = q.consume(ConsumerSpec { prefetch: 1, ..spec(&a, 1) }, 0).unwrap();
        q.consume(spec(&b, 2), 0).unwrap();
        q.consume(spec(&c, 3), 0).unwrap();
        put(&q, msg("1"), 0);
        put(&q, msg("2"), 0);
        put(&q, msg("3"), 0);
        assert_eq!(a.bodies(), ["1"]);
        assert!(b.take().is_empty() && c.take().is_empty(), "only the active consumer receives");
        q.cancel(ida, 0);
        assert_eq!(b.bodies(), ["2", "3"]);
        assert!(c.take().is_empty());
    }

    #[test]
    fn no_ack_deliveries_leave_the_queue_at_once() {
        let q = durable_queue(vec![]);
        let sink = TestSink::new();
        q.consume(ConsumerSpec { no_ack: true, prefetch: 1, ..spec(&sink, 1) }, 0).unwrap();
        let (_, fx1) = q.enqueue(persistent("a"), 0);
        let (_, fx2) = q.enqueue(persistent("b"), 0);
        assert_eq!(sink.bodies(), ["a", "b"], "prefetch does not apply to no-ack consumers");
        assert_eq!((fx1.forgotten, fx2.forgotten), (vec![1], vec![2]));
        assert_eq!(q.stats().unacked, 0);
        assert!(q.ack(1, 0).is_err());
    }

    #[test]
    fn get_returns_the_head_with_the_count_left_and_keeps_it_unacked() {
        let q = queue(vec![]);
        put(&q, msg("a"), 0);
        put(&q, msg("b"), 0);
        put(&q, msg("c"), 0);
        let (got, _) = q.get(OwnerId(7), false, 0);
        let (d, left) = got.unwrap();
        assert_eq!((body(&d), left, d.consumer, d.seq, d.redelivered), ("a".to_string(), 2, None, 1, false));
        assert_eq!((q.stats().ready, q.stats().unacked), (2, 1));
        q.ack(d.seq, 0).unwrap();
        assert_eq!(q.stats().unacked, 0);
        let (d, left) = q.get(OwnerId(7), true, 0).0.unwrap();
        assert_eq!((body(&d), left), ("b".to_string(), 1));
        assert_eq!(q.stats().unacked, 0, "get with no-ack leaves nothing unacked");
    }

    #[test]
    fn get_on_an_empty_queue_returns_none() {
        let q = queue(vec![]);
        assert!(q.get(OwnerId(1), false, 0).0.is_none());
    }

    #[test]
    fn ack_of_an_unknown_tag_is_a_precondition_failure() {
        let q = queue(vec![]);
        assert_eq!(q.ack(42, 0).unwrap_err(), CoreError::PreconditionFailed("unknown delivery tag 42".into()));
        assert_eq!(q.reject(42, true, 0).unwrap_err(), CoreError::PreconditionFailed("unknown delivery tag 42".into()));
        let seq = put(&q, msg("a"), 0);
        let (d, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        q.ack(d.seq, 0).unwrap();
        assert!(q.ack(seq, 0).is_err(), "a second ack of the same tag fails");
    }

    #[test]
    fn reject_with_requeue_restores_the_original_position_and_marks_redelivered() {
        let q = queue(vec![]);
        for m in ["a", "b", "c"] {
            put(&q, msg(m), 0);
        }
        let (a, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        let (b, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        q.reject(b.seq, true, 0).unwrap();
        q.reject(a.seq, true, 0).unwrap();
        let got: Vec<(String, bool)> =
            std::iter::from_fn(|| q.get(OwnerId(1), true, 0).0.map(|(d, _)| (body(&d), d.redelivered))).collect();
        assert_eq!(got, [("a".to_string(), true), ("b".to_string(), true), ("c".to_string(), false)]);
    }

    #[test]
    fn reject_without_requeue_dead_letters_with_x_death() {
        let q = dlx_queue(vec![]);
        put(&q, msg("a"), 0);
        let (d, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        let fx = q.reject(d.seq, false, 7_500).unwrap();
        assert_eq!(fx.dead_letters.len(), 1);
        let dl = &fx.dead_letters[0];
        assert_eq!((dl.exchange.clone(), dl.routing_key.clone()), ("dlx".into(), "rk".into()));
        assert_eq!((dl.message.exchange.clone(), dl.message.routing_key.clone()), ("dlx".into(), "rk".into()));
        assert_eq!(dl.message.payload, d.message.payload);
        let x = deaths(&dl.message);
        assert_eq!(x.len(), 1);
        let want: FieldTable = table(vec![
            ("count", FieldValue::I64(1)),
            ("exchange", s("ex")),
            ("queue", s("q")),
            ("reason", s("rejected")),
            ("routing-keys", FieldValue::Array(vec![s("rk")])),
            ("time", FieldValue::Timestamp(7)),
        ]);
        assert_eq!(x[0], want);
        for (key, value) in [
            ("x-first-death-reason", "rejected"),
            ("x-first-death-queue", "q"),
            ("x-first-death-exchange", "ex"),
            ("x-last-death-reason", "rejected"),
            ("x-last-death-queue", "q"),
            ("x-last-death-exchange", "ex"),
        ] {
            assert_eq!(header_str(&dl.message, key).as_deref(), Some(value), "{key}");
        }
        assert_eq!(depths(&q), QueueStats::default());
    }

    #[test]
    fn dead_letter_routing_key_replaces_the_original() {
        let q = dlx_queue(vec![("x-dead-letter-routing-key", s("dead"))]);
        put(&q, msg("a"), 0);
        let (d, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        let fx = q.reject(d.seq, false, 0).unwrap();
        assert_eq!(fx.dead_letters[0].routing_key, "dead");
        assert_eq!(fx.dead_letters[0].message.routing_key, "dead");
        assert_eq!(deaths(&fx.dead_letters[0].message)[0].get("routing-keys"), Some(&FieldValue::Array(vec![s("rk")])));
    }

    #[test]
    fn reject_without_requeue_and_without_dlx_drops() {
        let q = queue(vec![]);
        put(&q, msg("a"), 0);
        let (d, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        let fx = q.reject(d.seq, false, 0).unwrap();
        assert!(fx.is_empty());
        assert_eq!(depths(&q), QueueStats::default());
    }

    #[test]
    fn release_owner_requeues_only_that_owners_messages() {
        let q = queue(vec![]);
        for m in ["a", "b", "c", "d"] {
            put(&q, msg(m), 0);
        }
        let (a, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        let (_b, _) = q.get(OwnerId(2), false, 0).0.unwrap();
        let (c, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        q.release_owner(OwnerId(1), 0);
        assert_eq!((q.stats().ready, q.stats().unacked), (3, 1));
        let got: Vec<(String, bool)> =
            std::iter::from_fn(|| q.get(OwnerId(3), true, 0).0.map(|(d, _)| (body(&d), d.redelivered))).collect();
        assert_eq!(got, [("a".to_string(), true), ("c".to_string(), true), ("d".to_string(), false)]);
        assert!(q.ack(a.seq, 0).is_err() && q.ack(c.seq, 0).is_err());
    }

    #[test]
    fn release_owner_frees_credit_and_redelivers_to_consumers() {
        let q = queue(vec![]);
        let sink = TestSink::new();
        q.consume(ConsumerSpec { prefetch: 1, ..spec(&sink, 1) }, 0).unwrap();
        put(&q, msg("a"), 0);
        put(&q, msg("b"), 0);
        assert_eq!(sink.bodies(), ["a"]);
        q.release_owner(OwnerId(1), 0);
        let got = sink.take();
        assert_eq!((bodies(&got), got[0].redelivered), (vec!["a".to_string()], true));
    }

    #[test]
    fn cancel_keeps_unacked_messages_with_their_owner() {
        let q = queue(vec![]);
        let sink = TestSink::new();
        let (id, _) = q.consume(spec(&sink, 5), 0).unwrap();
        put(&q, msg("a"), 0);
        let seq = sink.take()[0].seq;
        q.cancel(id, 0);
        assert_eq!(
            depths(&q),
            QueueStats {
                ready: 0,
                unacked: 1,
                consumers: 0,
                ready_bytes: 0,
                unacked_bytes: 1,
                ..QueueStats::default()
            }
        );
        q.release_owner(OwnerId(5), 0);
        assert_eq!(
            depths(&q),
            QueueStats { ready: 1, unacked: 0, consumers: 0, ready_bytes: 1, ..QueueStats::default() }
        );
        let (d, _) = q.get(OwnerId(6), false, 0).0.unwrap();
        assert_eq!((d.seq, d.redelivered), (seq, true));
    }

    #[test]
    fn an_ack_after_cancel_still_works() {
        let q = queue(vec![]);
        let sink = TestSink::new();
        let (id, _) = q.consume(spec(&sink, 5), 0).unwrap();
        put(&q, msg("a"), 0);
        let seq = sink.take()[0].seq;
        q.cancel(id, 0);
        q.ack(seq, 0).unwrap();
        assert_eq!(q.stats().unacked, 0);
    }

    #[test]
    fn auto_delete_is_requested_when_the_last_consumer_leaves() {
        let q = Queue::new("q".into(), QueueOptions { auto_delete: true, ..Default::default() }, 0).unwrap();
        let (a, b) = (TestSink::new(), TestSink::new());
        assert!(!q.cancel(ConsumerId(u64::MAX), 0).delete_queue, "never had a consumer");
        let (ida, _) = q.consume(spec(&a, 1), 0).unwrap();
        let (idb, _) = q.consume(spec(&b, 1), 0).unwrap();
        assert!(!q.cancel(ida, 0).delete_queue);
        assert!(q.cancel(idb, 0).delete_queue);

        let plain = queue(vec![]);
        let (id, _) = plain.consume(spec(&a, 1), 0).unwrap();
        assert!(!plain.cancel(id, 0).delete_queue, "not auto-delete");
    }

    // ---- TTL ----

    #[test]
    fn queue_ttl_expires_messages_counted_from_enqueue() {
        let q = queue(vec![("x-message-ttl", FieldValue::I32(1000))]);
        put(&q, msg("a"), 100);
        put(&q, msg("b"), 500);
        assert_eq!(get_body(&q, 1099).as_deref(), Some("a"));
        assert_eq!(get_body(&q, 1500), None, "b expired at 1500");
        assert_eq!(q.stats().ready, 0);
    }

    #[test]
    fn a_message_is_live_until_the_millisecond_before_its_deadline_and_expired_at_it() {
        let q = dlx_queue(vec![("x-message-ttl", FieldValue::I32(1000))]);
        put(&q, msg("a"), 5_000);
        put(&q, msg("b"), 5_000);
        assert_eq!(get_body(&q, 5_999).as_deref(), Some("a"), "just before the deadline: delivered");
        let (got, fx) = q.get(OwnerId(99), true, 6_000);
        assert!(got.is_none(), "at the deadline: expired");
        assert_eq!(fx.dead_letters.len(), 1);
        assert_eq!(header_str(&fx.dead_letters[0].message, "x-first-death-reason").as_deref(), Some("expired"));
    }

    #[test]
    fn a_restored_message_counts_its_ttl_from_its_publish_before_the_restart() {
        // Published at 1 000 into a queue with a 2 s TTL; the broker was down until 3 500.
        let stamped = |text: &str| Arc::new((*msg(text)).clone().at(1_000));
        let q = dlx_queue(vec![("x-message-ttl", FieldValue::I32(2000))]);
        q.restore(1, stamped("gone"), false, 3_500);
        let (fx, next) = q.tick(3_500);
        assert_eq!(fx.dead_letters.len(), 1, "expired at the first tick after the restart");
        assert_eq!(next, None);

        // Back by 2 500: it has 500 ms left, not 2 s.
        let q = dlx_queue(vec![("x-message-ttl", FieldValue::I32(2000))]);
        q.restore(1, stamped("left"), false, 2_500);
        assert_eq!(q.tick(2_500).1, Some(3_000));
        assert_eq!(get_body(&q, 2_999).as_deref(), Some("left"));
    }

    #[test]
    fn per_message_ttl_and_queue_ttl_take_the_smaller() {
        let q = queue(vec![("x-message-ttl", FieldValue::I32(1000))]);
        put(&q, with_expiration("short", "200"), 0);
        put(&q, with_expiration("long", "5000"), 0);
        let (_, next) = q.tick(0);
        assert_eq!(next, Some(200));
        q.tick(200);
        let (_, next) = q.tick(200);
        assert_eq!(next, Some(1000), "the long one is capped by the queue TTL");
        assert_eq!(get_body(&q, 999).as_deref(), Some("long"));

        let plain = queue(vec![]);
        put(&plain, with_expiration("m", "300"), 0);
        assert_eq!(plain.tick(0).1, Some(300));
        assert_eq!(get_body(&plain, 300), None);
    }

    #[test]
    fn ttl_zero_is_delivered_only_to_a_consumer_ready_at_once() {
        let q = dlx_queue(vec![("x-message-ttl", FieldValue::I32(0))]);
        let (outcome, fx) = q.enqueue(msg("nobody"), 10);
        assert_eq!(outcome, EnqueueOutcome::Accepted { seq: 1 });
        assert_eq!(fx.dead_letters.len(), 1);
        assert_eq!(header_str(&fx.dead_letters[0].message, "x-first-death-reason").as_deref(), Some("expired"));
        assert_eq!(q.stats().ready, 0);

        let sink = TestSink::new();
        q.consume(spec(&sink, 1), 10).unwrap();
        let (_, fx) = q.enqueue(msg("taken"), 10);
        assert!(fx.is_empty());
        assert_eq!(sink.bodies(), ["taken"]);

        sink.set_room(0);
        let (_, fx) = q.enqueue(with_expiration("full", "0"), 10);
        assert_eq!(fx.dead_letters.len(), 1);
        assert_eq!(q.stats().ready, 0);
    }

    #[test]
    fn tick_expires_heads_and_returns_the_next_deadline() {
        let q = dlx_queue(vec![("x-max-priority", FieldValue::I8(2))]);
        put(&q, with_expiration("a", "100"), 0);
        put(&q, with_expiration("b", "300"), 0);
        put(
            &q,
            msg_with(
                "hi",
                Properties { priority: Some(2), ..Default::default() }
                    .with_more(MoreProperties { expiration: Some("250".into()), ..Default::default() }),
            ),
            0,
        );
        assert_eq!(q.tick(50).1, Some(100));
        let (fx, next) = q.tick(100);
        assert_eq!(fx.dead_letters.iter().map(|d| d.message.payload.to_vec()).collect::<Vec<_>>(), [b"a".to_vec()]);
        assert_eq!(next, Some(250));
        let (fx, next) = q.tick(300);
        assert_eq!(fx.dead_letters.len(), 2);
        assert_eq!(next, None);
        assert_eq!(q.stats().ready, 0);
    }

    #[test]
    fn only_the_head_expires_even_if_a_later_message_is_past_its_ttl() {
        let q = queue(vec![]);
        put(&q, with_expiration("long", "1000"), 0);
        put(&q, with_expiration("short", "10"), 0);
        let (_, next) = q.tick(500);
        assert_eq!(next, Some(1000));
        assert_eq!(q.stats().ready, 2, "the expired message behind the head waits until it reaches it");
        q.tick(1000);
        assert_eq!(q.stats().ready, 0);
    }

    #[test]
    fn a_requeued_message_keeps_its_enqueue_time_for_ttl() {
        let q = queue(vec![("x-message-ttl", FieldValue::I32(100))]);
        put(&q, msg("a"), 0);
        let (d, _) = q.get(OwnerId(1), false, 90).0.unwrap();
        q.reject(d.seq, true, 150).unwrap();
        assert_eq!(q.get(OwnerId(1), false, 150).0.map(|(d, _)| d.seq), None);
        assert_eq!(q.stats().ready, 0);
    }

    #[test]
    fn expired_dead_letter_keeps_original_expiration_and_drops_the_property() {
        let q = dlx_queue(vec![]);
        put(&q, with_expiration("a", "100"), 0);
        let (fx, _) = q.tick(2_000);
        let m = &fx.dead_letters[0].message;
        assert_eq!(m.properties.more().expiration, None);
        let x = deaths(m);
        assert_eq!(field_str(&x[0], "original-expiration").as_deref(), Some("100"));
        assert_eq!(field_str(&x[0], "reason").as_deref(), Some("expired"));
        assert_eq!(x[0].get("time"), Some(&FieldValue::Timestamp(2)));
    }

    #[test]
    fn queue_ttl_dead_letter_has_no_original_expiration() {
        let q = dlx_queue(vec![("x-message-ttl", FieldValue::I32(10))]);
        put(&q, msg("a"), 0);
        let (fx, _) = q.tick(10);
        assert_eq!(deaths(&fx.dead_letters[0].message)[0].get("original-expiration"), None);
    }

    // ---- the deadlines a queue reports to the broker's timer ----

    #[test]
    fn a_message_reaching_an_empty_queue_reports_its_expiry() {
        let q = queue(vec![("x-message-ttl", FieldValue::I32(100))]);
        let (_, fx) = q.enqueue(msg("a"), 1_000);
        assert_eq!(fx.deadline, Some(1_100), "the head's deadline arms the timer");
        let (_, fx) = q.enqueue(msg("b"), 1_020);
        assert_eq!(fx.deadline, None, "a later deadline behind the head needs no wake-up");
        // Taking the head leaves a later head: nothing to report either.
        assert_eq!(q.get(OwnerId(1), true, 1_050).1.deadline, None);
        // The timer fires at 1_120 for b (what tick returns is what the broker re-arms).
        let (fx, next) = q.tick(1_119);
        assert_eq!((fx.dead_letters.len(), next), (0, Some(1_120)));
        let (_, next) = q.tick(1_120);
        assert_eq!((q.stats().ready, next), (0, None));
        // Empty again: the next message reports its deadline again.
        assert_eq!(q.enqueue(msg("c"), 2_000).1.deadline, Some(2_100));
    }

    #[test]
    fn an_earlier_per_message_expiry_at_the_head_is_reported() {
        let q = queue(vec![]);
        assert_eq!(q.enqueue(msg("no-ttl"), 0).1.deadline, None, "no expiry, no deadline");
        assert_eq!(q.enqueue(with_expiration("long", "5000"), 0).1.deadline, None, "not at the head");
        assert_eq!(q.enqueue(with_expiration("short", "100"), 0).1.deadline, None, "not at the head");
        assert_eq!(q.get(OwnerId(1), true, 10).1.deadline, Some(5_000), "long is the head now");
        // Long handed out: short is the head, due long before 5_000.
        let ((d, _), fx) = match q.get(OwnerId(1), false, 20) {
            (Some(got), fx) => (got, fx),
            (None, _) => panic!("long"),
        };
        assert_eq!((body(&d).as_str(), fx.deadline), ("long", Some(100)));
        // Requeued: long is the head again, later than what was reported; nothing to wake.
        assert_eq!(q.reject(d.seq, true, 30).unwrap().deadline, None);
        let (fx, next) = q.tick(100);
        assert_eq!((fx.dead_letters.len(), next, q.stats().ready), (0, Some(5_000), 2), "short waits behind long");
    }

    #[test]
    fn x_expires_is_reported_when_the_queue_is_made_and_when_its_last_consumer_leaves() {
        let q = queue(vec![("x-expires", FieldValue::I32(1_000))]);
        assert_eq!(q.arm(), Some(1_000), "a new queue's x-expires");
        assert_eq!(q.arm(), None, "reported once");
        let sink = TestSink::new();
        let (id, fx) = q.consume(spec(&sink, 1), 500).unwrap();
        assert_eq!(fx.deadline, None);
        let (_, next) = q.tick(1_000);
        assert_eq!(next, None, "nothing is due while a consumer is attached");
        assert_eq!(q.cancel(id, 600).deadline, Some(1_600));
        assert!(q.tick(1_600).0.delete_queue);
    }

    // ---- x-expires ----

    #[test]
    fn x_expires_deletes_an_unused_queue_on_tick() {
        let q = queue(vec![("x-expires", FieldValue::I32(1000))]);
        let (fx, next) = q.tick(0);
        assert_eq!((fx.is_empty(), next), (true, Some(1000)));
        q.touch(500);
        let (fx, next) = q.tick(1200);
        assert_eq!((fx.delete_queue, next), (false, Some(1500)));
        q.get(OwnerId(1), false, 1400);
        let (fx, next) = q.tick(2399);
        assert_eq!((fx.delete_queue, next), (false, Some(2400)));
        assert!(q.tick(2400).0.delete_queue);
    }

    #[test]
    fn x_expires_waits_while_a_consumer_is_attached() {
        let q = queue(vec![("x-expires", FieldValue::I32(1000))]);
        let sink = TestSink::new();
        let (id, _) = q.consume(spec(&sink, 1), 100).unwrap();
        let (fx, next) = q.tick(5000);
        assert_eq!((fx.delete_queue, next), (false, None));
        q.cancel(id, 6000);
        assert!(!q.tick(6999).0.delete_queue);
        assert!(q.tick(7000).0.delete_queue);
    }

    // ---- length limits ----

    #[test]
    fn max_length_drop_head_dead_letters_the_oldest() {
        let q = dlx_queue(vec![("x-max-length", FieldValue::I32(2))]);
        put(&q, msg("a"), 0);
        put(&q, msg("b"), 0);
        let (outcome, fx) = q.enqueue(msg("c"), 0);
        assert_eq!(outcome, EnqueueOutcome::Accepted { seq: 3 });
        assert_eq!(fx.dead_letters.len(), 1);
        assert_eq!(fx.dead_letters[0].message.payload, Bytes::from_static(b"a"));
        assert_eq!(field_str(&deaths(&fx.dead_letters[0].message)[0], "reason").as_deref(), Some("maxlen"));
        assert_eq!(drain(&q, 0), ["b", "c"]);
    }

    #[test]
    fn max_length_drop_head_without_dlx_just_drops() {
        let q = queue(vec![("x-max-length", FieldValue::I32(1))]);
        put(&q, msg("a"), 0);
        let (_, fx) = q.enqueue(msg("b"), 0);
        assert!(fx.is_empty());
        assert_eq!(drain(&q, 0), ["b"]);
    }

    #[test]
    fn max_length_zero_drops_unless_delivered_directly() {
        let q = dlx_queue(vec![("x-max-length", FieldValue::I32(0))]);
        let (outcome, fx) = q.enqueue(msg("a"), 0);
        assert_eq!(outcome, EnqueueOutcome::Accepted { seq: 1 });
        assert_eq!(fx.dead_letters.len(), 1);
        assert_eq!(q.stats().ready, 0);
        let sink = TestSink::new();
        q.consume(spec(&sink, 1), 0).unwrap();
        let (_, fx) = q.enqueue(msg("b"), 0);
        assert!(fx.is_empty());
        assert_eq!(sink.bodies(), ["b"]);
    }

    #[test]
    fn messages_delivered_directly_do_not_count_against_max_length() {
        let q = queue(vec![("x-max-length", FieldValue::I32(1)), ("x-overflow", s("reject-publish"))]);
        let sink = TestSink::new();
        q.consume(spec(&sink, 1), 0).unwrap();
        for m in ["a", "b", "c"] {
            assert!(matches!(q.enqueue(msg(m), 0).0, EnqueueOutcome::Accepted { .. }));
        }
        assert_eq!(q.stats().unacked, 3);
    }

    #[test]
    fn publishes_deliveries_and_acks_are_counted() {
        let q = queue(vec![]);
        put(&q, msg("a"), 0);
        put(&q, msg("b"), 0);
        let (got, _) = q.get(OwnerId(1), false, 0);
        let (delivery, _) = got.expect("a message");
        q.ack(delivery.seq, 0).unwrap();
        let st = q.stats();
        assert_eq!((st.published, st.delivered, st.acked), (2, 1, 1));
    }

    #[test]
    fn reject_publish_counts_refused_messages() {
        let q = queue(vec![("x-max-length", FieldValue::I32(1)), ("x-overflow", s("reject-publish"))]);
        put(&q, msg("a"), 0);
        assert!(matches!(q.enqueue(msg("b"), 0).0, EnqueueOutcome::Rejected));
        assert!(matches!(q.enqueue(msg("c"), 0).0, EnqueueOutcome::Rejected));
        assert_eq!((q.stats().rejected_overflow, q.stats().dropped_overflow), (2, 0));
    }

    // ---- x-overflow = block ----

    fn block_queue(max_length: i32) -> Queue {
        queue(vec![("x-max-length", FieldValue::I32(max_length)), ("x-overflow", s("block"))])
    }

    /// A publish that must be taken; returns its held commit, if any.
    fn put_waiting(q: &Queue, m: Arc<Message>, waits: bool) -> Option<Commit> {
        let (outcome, held, _fx) = q.enqueue_waiting(m, 0, waits);
        assert!(matches!(outcome, EnqueueOutcome::Accepted { .. }), "a waiting publisher's message is taken");
        held
    }
    fn released(c: &mut Commit) -> Option<Result<(), StoreError>> {
        c.try_resolve();
        c.try_result()
    }

    #[test]
    fn block_takes_a_waiting_publish_past_the_limit_and_holds_it_until_deliveries_make_room() {
        let q = block_queue(2);
        assert!(put_waiting(&q, msg("a"), true).is_none());
        assert!(put_waiting(&q, msg("b"), true).is_none());
        let mut c = put_waiting(&q, msg("c"), true).expect("held at the limit");
        let mut d = put_waiting(&q, msg("d"), true).expect("held past the limit");
        assert_eq!(q.stats().ready, 4);
        assert_eq!((q.stats().rejected_overflow, q.stats().held_overflow), (0, 2), "held, not refused");
        assert_eq!(get_body(&q, 0).as_deref(), Some("a"));
        assert_eq!((released(&mut c), released(&mut d)), (None, None), "3 ready, still over 2");
        assert_eq!(get_body(&q, 0).as_deref(), Some("b"));
        assert_eq!((released(&mut c), released(&mut d)), (Some(Ok(())), Some(Ok(()))));
        assert_eq!(drain(&q, 0), ["c", "d"]);
    }

    #[test]
    fn block_releases_when_a_consumer_takes_the_backlog() {
        let q = block_queue(1);
        put_waiting(&q, msg("a"), true);
        let mut held = put_waiting(&q, msg("b"), true).expect("held");
        let sink = TestSink::new();
        let (_, fx) = q.consume(spec(&sink, 1), 0).unwrap();
        assert_eq!(released(&mut held), None, "told only when the effects are dropped");
        drop(fx);
        assert_eq!(released(&mut held), Some(Ok(())));
        assert_eq!(sink.bodies(), ["a", "b"]);
    }

    #[test]
    fn block_refuses_a_publisher_that_waits_for_nothing_and_counts_it() {
        let q = block_queue(1);
        put(&q, msg("a"), 0);
        let (outcome, held, _) = q.enqueue_waiting(msg("b"), 0, false);
        assert_eq!((outcome, held.is_none()), (EnqueueOutcome::Rejected, true));
        assert_eq!(q.enqueue(msg("c"), 0).0, EnqueueOutcome::Rejected);
        assert!(put_waiting(&q, msg("d"), true).is_some());
        assert_eq!(q.stats().rejected_overflow, 2);
        assert_eq!(drain(&q, 0), ["a", "d"]);
    }

    #[test]
    fn block_by_bytes_holds_a_message_larger_than_the_limit_until_it_is_delivered() {
        let q = queue(vec![("x-max-length-bytes", FieldValue::I32(3)), ("x-overflow", s("block"))]);
        let mut held = put_waiting(&q, msg("abcd"), true).expect("over the byte limit alone");
        assert_eq!(released(&mut held), None);
        assert_eq!(drain(&q, 0), ["abcd"]);
        assert_eq!(released(&mut held), Some(Ok(())));
    }

    #[test]
    fn block_releases_held_publishers_on_purge() {
        let q = block_queue(1);
        put_waiting(&q, msg("a"), true);
        let mut held = put_waiting(&q, msg("b"), true).expect("held");
        let (count, fx) = q.purge(0);
        assert_eq!(count, 2);
        drop(fx);
        assert_eq!(released(&mut held), Some(Ok(())));
    }

    #[test]
    fn block_releases_held_publishers_on_delete() {
        let q = block_queue(0);
        let mut held = put_waiting(&q, msg("a"), true).expect("held");
        let (_, fx) = q.shutdown();
        assert_eq!(released(&mut held), None, "told only when the effects are dropped");
        drop(fx);
        assert_eq!(released(&mut held), Some(Ok(())));
    }

    #[test]
    fn block_releases_when_messages_expire() {
        let q = queue(vec![
            ("x-max-length", FieldValue::I32(1)),
            ("x-overflow", s("block")),
            ("x-message-ttl", FieldValue::I32(10)),
        ]);
        put_waiting(&q, msg("a"), true);
        let mut held = put_waiting(&q, msg("b"), true).expect("held");
        let (fx, _) = q.tick(5);
        drop(fx);
        assert_eq!(released(&mut held), None);
        let (fx, _) = q.tick(10);
        drop(fx);
        assert_eq!(released(&mut held), Some(Ok(())));
    }

    #[test]
    fn block_forgets_publishers_that_went_away() {
        let q = block_queue(0);
        for i in 0..1_000 {
            // The publisher's connection closed: its commit (the receiver) is gone.
            drop(put_waiting(&q, msg(&i.to_string()), true).expect("held"));
            assert!(q.lock().waiters.len() <= 64, "dead waiters are pruned");
        }
        let mut live = put_waiting(&q, msg("live"), true).expect("held");
        assert_eq!(q.purge(0).0, 1_001);
        assert_eq!(released(&mut live), Some(Ok(())));
    }

    #[test]
    fn max_length_bytes_counts_body_bytes() {
        let q = queue(vec![("x-max-length-bytes", FieldValue::I32(5))]);
        put(&q, msg("aa"), 0);
        put(&q, msg("bbb"), 0);
        assert_eq!(q.stats().ready_bytes, 5);
        put(&q, msg("c"), 0);
        assert_eq!(
            q.stats(),
            QueueStats {
                ready: 2,
                unacked: 0,
                consumers: 0,
                ready_bytes: 4,
                unacked_bytes: 0,
                dropped_overflow: 1,
                rejected_overflow: 0,
                published: 3,
                delivered: 0,
                acked: 0,
                held_overflow: 0,
                held_publishers: 0,
                paged_out: 0,
                paged_out_bytes: 0,
            }
        );
        assert_eq!(drain(&q, 0), ["bbb", "c"]);
    }

    #[test]
    fn reject_publish_refuses_without_dead_lettering() {
        let q = dlx_queue(vec![("x-max-length", FieldValue::I32(1)), ("x-overflow", s("reject-publish"))]);
        put(&q, msg("a"), 0);
        let (outcome, fx) = q.enqueue(msg("b"), 0);
        assert_eq!(outcome, EnqueueOutcome::Rejected);
        assert!(fx.is_empty());
        assert_eq!(drain(&q, 0), ["a"]);
    }

    #[test]
    fn reject_publish_dlx_refuses_and_dead_letters_the_new_message() {
        let q = dlx_queue(vec![("x-max-length-bytes", FieldValue::I32(3)), ("x-overflow", s("reject-publish-dlx"))]);
        put(&q, msg("abc"), 0);
        let (outcome, fx) = q.enqueue(msg("d"), 0);
        assert_eq!(outcome, EnqueueOutcome::Rejected);
        assert_eq!(fx.dead_letters.len(), 1);
        assert_eq!(fx.dead_letters[0].message.payload, Bytes::from_static(b"d"));
        assert_eq!(header_str(&fx.dead_letters[0].message, "x-last-death-reason").as_deref(), Some("maxlen"));
        assert_eq!(drain(&q, 0), ["abc"]);
    }

    // ---- dead-letter headers and cycles ----

    #[test]
    fn x_death_count_increments_for_the_same_queue_and_reason() {
        let q = dlx_queue(vec![]);
        let other = Queue::new(
            "other".into(),
            QueueOptions { arguments: table(vec![("x-dead-letter-exchange", s("dlx2"))]), ..Default::default() },
            0,
        )
        .unwrap();
        // q rejects, other rejects, then q rejects again.
        put(&q, msg("m"), 0);
        let (d, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        let m1 = q.reject(d.seq, false, 1000).unwrap().dead_letters.remove(0).message;
        put(&other, m1, 0);
        let (d, _) = other.get(OwnerId(1), false, 0).0.unwrap();
        let m2 = other.reject(d.seq, false, 2000).unwrap().dead_letters.remove(0).message;
        put(&q, m2, 0);
        let (d, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        let m3 = q.reject(d.seq, false, 3000).unwrap().dead_letters.remove(0).message;
        let x = deaths(&m3);
        assert_eq!(x.len(), 2);
        assert_eq!((field_str(&x[0], "queue").as_deref(), x[0].get("count")), (Some("q"), Some(&FieldValue::I64(2))));
        assert_eq!(x[0].get("time"), Some(&FieldValue::Timestamp(1)), "the entry keeps its first time");
        assert_eq!(
            (field_str(&x[1], "queue").as_deref(), x[1].get("count")),
            (Some("other"), Some(&FieldValue::I64(1)))
        );
        assert_eq!(header_str(&m3, "x-first-death-queue").as_deref(), Some("q"));
        assert_eq!(header_str(&m3, "x-first-death-exchange").as_deref(), Some("ex"));
        assert_eq!(header_str(&m3, "x-last-death-queue").as_deref(), Some("q"));
        assert_eq!(header_str(&m3, "x-last-death-exchange").as_deref(), Some("dlx2"), "the exchange it came from last");
    }

    #[test]
    fn an_automatic_dead_letter_cycle_is_dropped() {
        let q = dlx_queue(vec![("x-message-ttl", FieldValue::I32(10))]);
        put(&q, msg("m"), 0);
        let (fx, _) = q.tick(10);
        let once = fx.dead_letters[0].message.clone();
        put(&q, once, 10);
        let (fx, _) = q.tick(20);
        assert!(fx.dead_letters.is_empty(), "expired again in the same queue with no reject in between");
        assert_eq!(q.stats().ready, 0);
    }

    #[test]
    fn a_reject_in_the_history_breaks_the_cycle() {
        let q = dlx_queue(vec![("x-message-ttl", FieldValue::I32(10))]);
        put(&q, msg("m"), 0);
        let m1 = q.tick(10).0.dead_letters.remove(0).message;
        put(&q, m1, 10);
        let (d, _) = q.get(OwnerId(1), false, 10).0.unwrap();
        let m2 = q.reject(d.seq, false, 10).unwrap().dead_letters.remove(0).message;
        put(&q, m2, 10);
        let (fx, _) = q.tick(20);
        assert_eq!(fx.dead_letters.len(), 1);
        let reasons: Vec<_> =
            deaths(&fx.dead_letters[0].message).iter().map(|t| field_str(t, "reason").unwrap()).collect();
        assert_eq!(reasons, ["expired", "rejected"]);
        assert_eq!(deaths(&fx.dead_letters[0].message)[0].get("count"), Some(&FieldValue::I64(2)));
    }

    // ---- store bookkeeping ----

    #[test]
    fn forgotten_lists_only_persistent_messages_of_durable_queues() {
        let q = durable_queue(vec![]);
        let p = put(&q, persistent("p"), 0);
        put(&q, msg("t"), 0);
        let (d, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        assert_eq!(q.ack(d.seq, 0).unwrap().forgotten, vec![p]);
        let (d, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        assert!(q.ack(d.seq, 0).unwrap().forgotten.is_empty(), "transient");

        let transient_queue = queue(vec![]);
        put(&transient_queue, persistent("p"), 0);
        let (d, _) = transient_queue.get(OwnerId(1), false, 0).0.unwrap();
        assert!(transient_queue.ack(d.seq, 0).unwrap().forgotten.is_empty(), "non-durable queue");
    }

    #[test]
    fn forgotten_covers_every_way_out_but_requeue() {
        let q = Queue::new(
            "q".into(),
            QueueOptions {
                durable: true,
                arguments: table(vec![("x-max-length", FieldValue::I32(3)), ("x-dead-letter-exchange", s("dlx"))]),
                ..Default::default()
            },
            0,
        )
        .unwrap();
        for m in ["1", "2", "3"] {
            put(&q, persistent(m), 0);
        }
        // Dropped by max-length.
        assert_eq!(q.enqueue(persistent("4"), 0).1.forgotten, vec![1]);
        // get no-ack.
        assert_eq!(q.get(OwnerId(1), true, 0).1.forgotten, vec![2]);
        // Rejected with requeue: stays; without: forgotten.
        let (d, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        assert!(q.reject(d.seq, true, 0).unwrap().forgotten.is_empty());
        let (d, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        assert_eq!(q.reject(d.seq, false, 0).unwrap().forgotten, vec![3]);
        // Expired (after 4 leaves the head with a no-ack get).
        let expiring = persistent("x")
            .properties
            .clone()
            .with_more(MoreProperties { expiration: Some("5".into()), ..Default::default() });
        put(&q, msg_with("5", expiring), 0);
        assert_eq!(q.get(OwnerId(1), true, 0).1.forgotten, vec![4]);
        assert_eq!(q.tick(100).0.forgotten, vec![5]);
    }

    #[test]
    fn forgotten_includes_purged_messages() {
        let q = durable_queue(vec![]);
        put(&q, persistent("a"), 0);
        put(&q, msg("b"), 0);
        put(&q, persistent("c"), 0);
        let (n, fx) = q.purge(0);
        assert_eq!((n, fx.forgotten), (3, vec![1, 3]));
    }

    #[test]
    fn purge_removes_ready_messages_only() {
        let q = queue(vec![]);
        put(&q, msg("a"), 0);
        put(&q, msg("bb"), 0);
        put(&q, msg("c"), 0);
        let (d, _) = q.get(OwnerId(1), false, 0).0.unwrap();
        assert_eq!(q.purge(0).0, 2);
        assert_eq!(
            depths(&q),
            QueueStats {
                ready: 0,
                unacked: 1,
                consumers: 0,
                ready_bytes: 0,
                unacked_bytes: 1,
                ..QueueStats::default()
            }
        );
        q.ack(d.seq, 0).unwrap();
    }

    #[test]
    fn check_delete_enforces_if_unused_and_if_empty() {
        let q = queue(vec![]);
        assert_eq!(q.check_delete(true, true), Ok(()));
        put(&q, msg("a"), 0);
        assert_eq!(q.check_delete(false, true), Err(CoreError::PreconditionFailed("queue 'q' not empty".into())));
        assert_eq!(q.check_delete(true, false), Ok(()));
        let sink = TestSink::with_room(0);
        q.consume(spec(&sink, 1), 0).unwrap();
        assert_eq!(q.check_delete(true, false), Err(CoreError::PreconditionFailed("queue 'q' in use".into())));
        assert_eq!(q.check_delete(false, false), Ok(()));
    }

    #[test]
    fn shutdown_cancels_every_consumer_and_returns_the_ready_count() {
        let q = queue(vec![]);
        let (a, b) = (TestSink::with_room(1), TestSink::with_room(0));
        let (ida, _) = q.consume(spec(&a, 1), 0).unwrap();
        let (idb, _) = q.consume(spec(&b, 1), 0).unwrap();
        for m in ["1", "2", "3"] {
            put(&q, msg(m), 0);
        }
        let (n, fx) = q.shutdown();
        assert_eq!(n, 2);
        assert!(fx.is_empty());
        assert_eq!(*a.cancelled.lock().unwrap(), [ida]);
        assert_eq!(*b.cancelled.lock().unwrap(), [idb]);
        assert_eq!(depths(&q), QueueStats::default());
        assert_eq!(q.enqueue(msg("late"), 0).0, EnqueueOutcome::Rejected);
    }

    #[test]
    fn restore_puts_recovered_messages_in_seq_order_and_continues_numbering() {
        let q = queue(vec![]);
        q.restore(7, msg("b"), false, 0);
        q.restore(3, msg("a"), true, 0);
        assert_eq!(put(&q, msg("c"), 0), 8);
        let got: Vec<(String, u64, bool)> =
            std::iter::from_fn(|| q.get(OwnerId(1), true, 0).0.map(|(d, _)| (body(&d), d.seq, d.redelivered)))
                .collect();
        assert_eq!(got, [("a".to_string(), 3, true), ("b".to_string(), 7, false), ("c".to_string(), 8, false)]);
    }

    #[test]
    fn a_consumer_that_keeps_no_marks_gets_every_restored_message_redelivered_and_no_mark_is_stored() {
        let unmarked = Arc::new(TestSink { marks: false, ..Arc::into_inner(TestSink::with_room(UNLIMITED)).unwrap() });
        let q = durable_queue(vec![]);
        q.restore(3, persistent("a"), true, 0);
        q.restore(4, persistent("b"), false, 0);
        let (_, fx) = q.consume(spec(&unmarked, 1), 0).unwrap();
        assert!(fx.delivered.is_empty(), "no mark for a consumer that keeps none: {:?}", fx.delivered);
        let got: Vec<(u64, bool)> = unmarked.take().iter().map(|d| (d.seq, d.redelivered)).collect();
        assert_eq!(got, [(3, true), (4, true)], "both may have gone out before the restart");
        assert_eq!(put(&q, persistent("c"), 0), 5);
        let (_, fx) = q.enqueue(persistent("d"), 0);
        assert!(fx.delivered.is_empty());
        let got: Vec<(u64, bool)> = unmarked.take().iter().map(|d| (d.seq, d.redelivered)).collect();
        assert_eq!(got, [(5, false), (6, false)], "new since the restart: not redelivered");
        // The tail's seqs, restored on disk and loaded later, count as restored too.
        let q = durable_queue(vec![]);
        q.restore_tail(crate::store::TailSummary { first_seq: 5, last_seq: 9, count: 5, bytes: 5 });
        assert_eq!(q.lock().restored_through, 9);
        // A consumer that keeps marks is marked and not flagged, as before.
        let sink = TestSink::with_room(UNLIMITED);
        let q = durable_queue(vec![]);
        q.restore(4, persistent("b"), false, 0);
        let (_, fx) = q.consume(spec(&sink, 1), 0).unwrap();
        assert_eq!(fx.delivered, [4]);
        assert_eq!(sink.take().iter().map(|d| d.redelivered).collect::<Vec<_>>(), [false]);
    }

    #[test]
    fn ack_all_acks_each_under_one_lock_reports_the_unknown_and_pumps_once_for_all() {
        let q = durable_queue(vec![]);
        let sink = TestSink::with_room(UNLIMITED);
        q.consume(ConsumerSpec { prefetch: 3, ..spec(&sink, 1) }, 0).unwrap();
        for i in 1..=6 {
            put(&q, persistent(&format!("m{i}")), 0);
        }
        assert_eq!(sink.bodies(), ["m1", "m2", "m3"], "the prefetch holds the rest");
        let (fx, failed) = q.ack_all(&[1, 2, 99, 3], 0);
        assert_eq!(failed.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [99]);
        assert_eq!(fx.forgotten, [1, 2, 3], "each acked one leaves the store");
        assert_eq!(sink.bodies(), ["m4", "m5", "m6"], "and the room they left is filled");
        let st = q.stats();
        assert_eq!((st.acked, st.unacked, st.ready), (3, 3, 0));
    }

    #[test]
    fn a_queue_is_shared_across_threads() {
        let q = Arc::new(queue(vec![]));
        let sink = TestSink::new();
        q.consume(ConsumerSpec { prefetch: 10, ..spec(&sink, 1) }, 0).unwrap();
        let producers: Vec<_> = (0..4)
            .map(|t| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for i in 0..250 {
                        put(&q, msg(&format!("{t}-{i}")), 0);
                    }
                })
            })
            .collect();
        let mut acked = 0;
        while acked < 1000 {
            for d in sink.take() {
                q.ack(d.seq, 0).unwrap();
                acked += 1;
            }
            std::thread::yield_now();
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(
            depths(&q),
            QueueStats { ready: 0, unacked: 0, consumers: 1, ready_bytes: 0, ..QueueStats::default() }
        );
    }

    #[test]
    fn transient_messages_need_a_consumer_when_asked() {
        let q = Queue::new(
            "q".into(),
            QueueOptions {
                arguments: [("x-ferry-transient-needs-consumer".into(), FieldValue::Bool(true))].into_iter().collect(),
                ..Default::default()
            },
            0,
        )
        .unwrap();
        let transient = Arc::new(Message::new("", "q", Bytes::from_static(b"t")));
        let persistent =
            Arc::new(Message::new("", "q", Bytes::from_static(b"p")).with_properties(crate::message::Properties {
                delivery_mode: Some(crate::message::DeliveryMode::Persistent),
                ..Default::default()
            }));
        assert!(matches!(q.enqueue(transient, 0).0, EnqueueOutcome::Accepted { .. }));
        q.enqueue(persistent, 0);
        assert_eq!(q.stats().ready, 1, "only the persistent message is kept while nobody consumes");
    }

    // ----- publishers held back by a queue that falls behind ----------------------------------

    /// Enqueues `n` messages from connection 0 (the internal origin); returns whether the last
    /// one was told to wait.
    fn fill(q: &Queue, n: u64, now: Millis) -> bool {
        let mut congested = false;
        for i in 0..n {
            congested = q.enqueue(msg(&i.to_string()), now).1.congested;
        }
        congested
    }

    #[tokio::test]
    async fn a_queue_falling_behind_its_consumer_holds_publishers_until_down_to_the_low_mark() {
        let q = Arc::new(queue(vec![]));
        let sink = TestSink::pacing(0);
        q.consume(spec(&sink, 1), 0).unwrap();
        assert!(!fill(&q, BACKLOG_HIGH - 1, 0), "below the mark nobody waits");
        assert!(q.has_room());
        assert!(fill(&q, 1, 0), "at the mark the publisher is told to wait");
        assert!(!q.has_room());
        assert!(fill(&q, 1, 0), "and every publish after it, while it holds");
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.room().await }
        });
        // The consumer takes all but BACKLOG_LOW + 1: still held.
        let before = q.drains();
        sink.set_room((BACKLOG_HIGH + 1 - BACKLOG_LOW - 1) as usize);
        drop(q.pump(0));
        assert_eq!(depths(&q).ready as u64, BACKLOG_LOW + 1);
        assert!(!q.has_room() && !waiter.is_finished());
        assert_eq!(q.drains() - before, BACKLOG_HIGH - BACKLOG_LOW);
        // One more: at the low mark the publishers go.
        sink.set_room(1);
        drop(q.pump(0));
        assert!(q.has_room());
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").unwrap();
        assert!(!q.waited(true, Duration::from_millis(3), BACKLOG_HIGH, 0), "it drained: not lagging");
        assert!(!fill(&q, 1, 0), "between the marks a queue that let go holds nobody");
    }

    #[test]
    fn a_queue_without_consumers_holds_nobody() {
        let q = queue(vec![]);
        assert!(!fill(&q, 2 * BACKLOG_HIGH, 0));
        assert!(q.has_room());
        // Nor does one whose consumers keep their own bounds (MQTT sessions, bridges).
        let sink = TestSink::with_room(0);
        q.consume(spec(&sink, 1), 0).unwrap();
        assert!(!fill(&q, 1, 0));
    }

    #[test]
    fn a_queue_holds_by_bytes_too() {
        let q = queue(vec![]);
        q.consume(spec(&TestSink::pacing(0), 1), 0).unwrap();
        let big = Arc::new(Message::new("ex", "rk", Bytes::from(vec![0u8; 1 << 20])));
        let n = BACKLOG_HIGH_BYTES >> 20;
        for _ in 0..n - 1 {
            assert!(!q.enqueue(big.clone(), 0).1.congested);
        }
        assert!(q.enqueue(big, 0).1.congested, "{n} MiB in {n} messages");
    }

    #[test]
    fn a_publisher_is_not_held_by_a_queue_its_own_connection_consumes_from() {
        let q = queue(vec![]);
        q.consume(spec(&TestSink::pacing(0), 1), 0).unwrap();
        fill(&q, BACKLOG_HIGH, 0);
        assert!(!q.has_room());
        let own = Message::new("ex", "rk", Bytes::from_static(b"x")).with_origin(crate::message::Origin {
            protocol: crate::message::Protocol::Amqp,
            connection: ConnectionId(1),
        });
        assert!(!q.enqueue(Arc::new(own), 0).1.congested, "its acks would wait behind its publishes");
        assert!(fill(&q, 1, 0), "another connection is held");
    }

    #[tokio::test]
    async fn consumers_that_drain_nothing_within_the_pause_lag_and_hold_nobody() {
        let q = Arc::new(queue(vec![]));
        let sink = TestSink::pacing(0);
        q.consume(spec(&sink, 1), 0).unwrap();
        assert!(fill(&q, BACKLOG_HIGH, 0));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.room().await }
        });
        let pause = crate::sink::CONGESTION_PAUSE;
        assert!(q.waited(false, pause, 0, 250), "nothing delivered during the pause: lagging");
        assert!(q.has_room(), "it holds nobody back any more");
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("the others go too").unwrap();
        assert!(q.waited(false, pause, 0, 250), "a second publisher finds it lagging");
        assert!(!fill(&q, 100, 10_000), "lagging until it delivers, however long");
        // It delivers one: lagging 1 s from when it was found, then it holds again.
        sink.set_room(1);
        drop(q.pump(10_000));
        assert!(fill(&q, 1, 10_000));
    }

    #[tokio::test]
    async fn the_last_pacing_consumer_leaving_lets_the_publishers_go() {
        let q = Arc::new(queue(vec![]));
        let (id, _) = q.consume(spec(&TestSink::pacing(0), 1), 0).unwrap();
        assert!(fill(&q, BACKLOG_HIGH, 0));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.room().await }
        });
        drop(q.cancel(id, 0));
        assert!(q.has_room());
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").unwrap();
        assert!(!fill(&q, 1, 0), "a work queue without consumers grows");
    }
}

//! Virtual hosts: a namespace of exchanges and queues, the routing of publishes, and the
//! bookkeeping that ties exchanges, queues and the store together.
//!
//! Locks are short and never nested in the publish path: the exchange map is read-locked to find
//! the exchange, the exchange's binding table is read-locked while it lists destinations, and
//! each queue's lock is taken in turn to enqueue. Effects a queue returns (dead letters, a
//! request to delete it) are carried out after its lock is released.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;
use smallvec::SmallVec;

use crate::error::CoreError;
use crate::exchange::{Binding, BindingKey, Destination, Exchange, ExchangeKind, ExchangeOptions, Owner, SinkRef};
use crate::flow::Target;
use crate::hash::KeyedMap;
use crate::message::{ConnectionId, FieldTable, FieldValue, Message, Millis, ShortString};
use crate::permissions::AccessPolicy;
use crate::queue::{
    ConsumerId, ConsumerSpec, Delivery, Effects, EnqueueOutcome, Load, OwnerId, Queue, QueueOptions, QueueStats,
};
use crate::retained::RetainedStore;
use crate::sink::{Cookies, DirectSink, Offer, SinkDelivery};
use crate::store::{BindingRecord, Commit, ExchangeRecord, QueueRecord, Store, StoreOp};
use crate::timer::Timer;

/// Dead letters can feed queues that dead-letter again; the queue's cycle rule stops true
/// cycles, and this bounds any remaining chain within one operation.
const MAX_DEAD_LETTER_HOPS: usize = 32;
/// Messages read back per store read when recovery brings a queue's whole tail into memory.
const RESTORE_SLICE: usize = 4_096;

/// Exchanges every vhost has, as in RabbitMQ.
pub const PREDECLARED: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

/// An exchange declaration.
#[derive(Debug, Clone)]
pub struct ExchangeDeclare {
    pub name: ShortString,
    /// The type as the client sent it (`direct`, `fanout`, `topic`, `headers`).
    pub kind: String,
    /// Only check that it exists.
    pub passive: bool,
    pub options: ExchangeOptions,
}

/// A queue declaration. An empty name asks the broker to name the queue.
#[derive(Debug, Clone)]
pub struct QueueDeclare {
    pub name: ShortString,
    pub passive: bool,
    pub options: QueueOptions,
    /// The declaring connection (exclusive queues are owned by it; `options.exclusive` must
    /// name it when the client asked for an exclusive queue).
    pub connection: ConnectionId,
}

/// What a queue declaration returns.
#[derive(Debug, Clone)]
pub struct QueueDeclared {
    pub queue: Arc<Queue>,
    pub stats: QueueStats,
    /// Whether this call created it.
    pub created: bool,
}

/// What a publish did.
#[derive(Debug)]
pub struct PublishOutcome {
    /// Queues and sinks the message was routed to (0 means unroutable, for `mandatory`).
    pub routed: usize,
    /// A queue refused it (`x-overflow = reject-publish`, or `block` for a publisher that waits
    /// for no acknowledgement): a confirming publisher gets a nack.
    pub rejected: bool,
    /// Resolves when the message is durable in every durable queue it reached and, for a
    /// publisher that waits ([`VHost::publish_waiting`]), when every `x-overflow = block` queue
    /// that took it past its limits has room again. A confirm or PUBACK waits on it.
    pub commit: Commit,
    /// Outboxes of direct sinks that took a message over capacity, and queues that took it
    /// while falling behind their consumers: the publisher stops reading until each has room
    /// ([`Target::room`]). Usually empty (no allocation).
    pub congested: Vec<Target>,
}

/// Counters for statistics (`$SYS`, management).
#[derive(Debug, Default)]
pub struct VHostStats {
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub unroutable: AtomicU64,
    pub dropped_at_sinks: AtomicU64,
    /// The counters of the queues deleted so far ([`QueueStats`]'s), so that totals over the
    /// vhost's queues never go down when one is deleted. Added to under the queue map's write
    /// lock; read with the queue list ([`VHost::queues_and_retired`]).
    pub retired: RetiredQueues,
}

/// What the queues deleted from a vhost had counted ([`VHostStats::retired`]).
#[derive(Debug, Default)]
pub struct RetiredQueues {
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub dropped_overflow: AtomicU64,
    pub rejected_overflow: AtomicU64,
}

impl RetiredQueues {
    fn add(&self, st: &QueueStats) {
        self.published.fetch_add(st.published, Ordering::Relaxed);
        self.delivered.fetch_add(st.delivered, Ordering::Relaxed);
        self.acked.fetch_add(st.acked, Ordering::Relaxed);
        self.dropped_overflow.fetch_add(st.dropped_overflow, Ordering::Relaxed);
        self.rejected_overflow.fetch_add(st.rejected_overflow, Ordering::Relaxed);
    }

    /// The counters as a [`QueueStats`] (the depths are 0).
    pub fn totals(&self) -> QueueStats {
        QueueStats {
            published: self.published.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            dropped_overflow: self.dropped_overflow.load(Ordering::Relaxed),
            rejected_overflow: self.rejected_overflow.load(Ordering::Relaxed),
            ..QueueStats::default()
        }
    }
}

/// One namespace of exchanges and queues.
pub struct VHost {
    name: String,
    store: Arc<dyn Store>,
    exchanges: RwLock<KeyedMap<ShortString, Arc<Exchange>>>,
    queues: RwLock<KeyedMap<ShortString, Arc<Queue>>>,
    retained: RetainedStore,
    stats: VHostStats,
    /// The broker's timer, armed with the deadlines queues report (message TTL, `x-expires`).
    timer: Arc<Timer>,
    /// The broker's access policy, whose topic policy names the queues the default exchange
    /// does not route into (a frontend's own).
    access: Arc<ArcSwap<AccessPolicy>>,
    /// Bumped by the broker after each swap of `access`, so a queue's cached answer to "is this
    /// one reserved" is asked again under a new policy.
    access_epoch: Arc<AtomicU64>,
    /// This vhost, for the tasks that read a queue's tail back ([`VHost::start_load`]); set by
    /// the broker ([`VHost::attach`]). Without it a load that does not answer at once is waited
    /// for on the calling thread.
    me: std::sync::OnceLock<std::sync::Weak<VHost>>,
}

impl fmt::Debug for VHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VHost").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Destinations of one publish, without duplicates: a queue gets one copy however many of its
/// bindings match; a sink gets one copy with every matching binding's cookie.
///
/// Inline up to two of each: a publish to one subscriber or one queue allocates no list.
#[derive(Default)]
struct Targets {
    queues: SmallVec<[Arc<Queue>; 2]>,
    sinks: SmallVec<[(Arc<DirectSink>, Cookies); 2]>,
}

impl Targets {
    fn is_empty(&self) -> bool {
        self.queues.is_empty() && self.sinks.is_empty()
    }
    fn len(&self) -> usize {
        self.queues.len() + self.sinks.len()
    }
    fn add_queue(&mut self, q: &Arc<Queue>) {
        if !self.queues.iter().any(|x| Arc::ptr_eq(x, q)) {
            self.queues.push(q.clone());
        }
    }
    fn add_sink(&mut self, s: &SinkRef) {
        // By address, without reading the sinks: each holds a connection's outbox, whose lines
        // its connection's thread keeps writing (a fan-out to 50 read 1,225 ids a message).
        match self.sinks.iter_mut().find(|(x, _)| Arc::ptr_eq(x, &s.sink)) {
            Some((_, cookies)) => cookies.push(s.cookie),
            None => self.sinks.push((s.sink.clone(), Cookies::One(s.cookie))),
        }
    }
}

/// Exchanges a publish went through (cycles stop at the second visit), by address: each is
/// held by the routing frame that visits it, so no reference is taken. Inline: an ordinary
/// publish visits one exchange, and allocates nothing for this.
type Visited = SmallVec<[usize; 4]>;

fn lock_err<T>(e: std::sync::PoisonError<T>) -> T {
    e.into_inner()
}

fn not_found_exchange(name: &ShortString, vhost: &str) -> CoreError {
    CoreError::NotFound(format!("no exchange '{name}' in vhost '{vhost}'"))
}

fn not_found_queue(name: &ShortString, vhost: &str) -> CoreError {
    CoreError::NotFound(format!("no queue '{name}' in vhost '{vhost}'"))
}

fn default_exchange_refused() -> CoreError {
    CoreError::AccessRefused("operation not permitted on the default exchange".into())
}

/// Queue arguments whose values must match on a redeclare (RabbitMQ's list).
const EQUIVALENT_QUEUE_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-single-active-consumer",
    "x-queue-type",
];

fn same_arg(a: Option<&FieldValue>, b: Option<&FieldValue>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x == y,
        },
        _ => false,
    }
}

fn describe_arg(v: Option<&FieldValue>) -> String {
    match v {
        None => "none".into(),
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(i), _) => format!("'{i}'"),
            (_, Some(s)) => format!("'{s}'"),
            _ => format!("{v:?}"),
        },
    }
}

/// A server-generated queue name, `amq.gen-` and 22 URL-safe base64 characters as RabbitMQ
/// makes them. Unique within the process (a counter) and unlikely to repeat across restarts
/// (mixed with a random seed drawn at start, [`process_seed`](crate::message::process_seed)).
pub fn generated_queue_name() -> ShortString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let seed =
        crate::message::process_seed() ^ (COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    // SplitMix64 twice gives 128 bits; 22 base64 characters use 132 bits, so the last one
    // repeats a few bits, which does no harm.
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let bits = ((next() as u128) << 64) | next() as u128;
    let mut name = String::from("amq.gen-");
    for i in 0..22 {
        name.push(ALPHABET[((bits >> ((i * 6) % 126)) & 63) as usize] as char);
    }
    ShortString::from(name)
}

impl VHost {
    /// A vhost with the predeclared exchanges and a timer of its own (tests; the broker's
    /// vhosts share the broker's, [`VHost::with_timer`]).
    pub fn new(name: &str, store: Arc<dyn Store>) -> VHost {
        VHost::with_timer(name, store, Arc::new(Timer::new()))
    }

    /// A vhost with the predeclared exchanges whose queues' deadlines arm `timer`.
    pub fn with_timer(name: &str, store: Arc<dyn Store>, timer: Arc<Timer>) -> VHost {
        let exchanges = PREDECLARED
            .iter()
            .map(|(n, kind)| (ShortString::from(*n), Arc::new(Exchange::new(*n, *kind, ExchangeOptions::default()))))
            .collect();
        VHost {
            name: name.to_string(),
            store,
            exchanges: RwLock::new(exchanges),
            queues: RwLock::new(KeyedMap::default()),
            retained: RetainedStore::new(),
            stats: VHostStats::default(),
            timer,
            access: Arc::new(ArcSwap::from_pointee(AccessPolicy::default())),
            access_epoch: Arc::new(AtomicU64::new(0)),
            me: std::sync::OnceLock::new(),
        }
    }

    /// Lets the vhost hand itself to the tasks that page queues' tails in (the broker calls it
    /// once the vhost is in its `Arc`).
    pub fn attach(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// The vhost reading the broker's access policy (swapped on a reload) for the queues a
    /// frontend reserves.
    /// `epoch` grows after each swap (queues cache their answer per epoch).
    pub fn with_access(mut self, access: Arc<ArcSwap<AccessPolicy>>, epoch: Arc<AtomicU64>) -> VHost {
        self.access = access;
        self.access_epoch = epoch;
        self
    }

    /// The timer this vhost's queues arm.
    pub fn timer(&self) -> &Arc<Timer> {
        &self.timer
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
    pub fn stats(&self) -> &VHostStats {
        &self.stats
    }
    pub fn retained(&self) -> &RetainedStore {
        &self.retained
    }

    pub fn exchange(&self, name: &str) -> Option<Arc<Exchange>> {
        self.exchange_by_bytes(name.as_bytes())
    }
    /// [`VHost::exchange`] by the name's bytes (what routing has): no key is built.
    fn exchange_by_bytes(&self, name: &[u8]) -> Option<Arc<Exchange>> {
        self.exchanges.read().unwrap_or_else(lock_err).get(name).cloned()
    }
    pub fn exchange_names(&self) -> Vec<ShortString> {
        let mut v: Vec<_> = self.exchanges.read().unwrap_or_else(lock_err).keys().cloned().collect();
        v.sort();
        v
    }
    /// The queue, whoever owns it (management, tests). Frontends use [`VHost::queue_for`].
    pub fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.queues.read().unwrap_or_else(lock_err).get(name.as_bytes()).cloned()
    }
    /// Every queue (unordered) and, read at the same moment, what the deleted ones counted: a
    /// queue is in exactly one of the two, so sums over both never go down between two calls.
    pub fn queues_and_retired(&self) -> (Vec<Arc<Queue>>, QueueStats) {
        let map = self.queues.read().unwrap_or_else(lock_err);
        let retired = self.stats.retired.totals();
        (map.values().cloned().collect(), retired)
    }

    pub fn queue_count(&self) -> usize {
        self.queues.read().unwrap_or_else(lock_err).len()
    }

    pub fn queue_names(&self) -> Vec<ShortString> {
        let mut v: Vec<_> = self.queues.read().unwrap_or_else(lock_err).keys().cloned().collect();
        v.sort();
        v
    }

    /// The queue as `connection` may use it: 404 when missing, 405 when another connection's
    /// exclusive queue.
    pub fn queue_for(&self, name: &ShortString, connection: ConnectionId) -> Result<Arc<Queue>, CoreError> {
        let q = self
            .queues
            .read()
            .unwrap_or_else(lock_err)
            .get(name)
            .cloned()
            .ok_or_else(|| not_found_queue(name, &self.name))?;
        self.check_exclusive(&q, connection)?;
        Ok(q)
    }

    fn check_exclusive(&self, q: &Queue, connection: ConnectionId) -> Result<(), CoreError> {
        match q.options().exclusive {
            Some(owner) if owner != connection => Err(CoreError::ResourceLocked(format!(
                "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                q.name(),
                self.name
            ))),
            _ => Ok(()),
        }
    }

    fn submit(&self, ops: Vec<StoreOp>) -> Commit {
        if ops.is_empty() {
            Commit::done(Ok(()))
        } else {
            self.store.submit(ops)
        }
    }

    // ----- exchanges -------------------------------------------------------------------------

    /// Declares an exchange (or checks it, when passive). A redeclare must match the existing
    /// type, durability, auto-delete, internal flag and alternate exchange.
    ///
    /// The default exchange `""` cannot be declared, not even passively (403, as RabbitMQ 3.10
    /// answers whatever the type and flags).
    pub fn declare_exchange(&self, decl: ExchangeDeclare) -> Result<Arc<Exchange>, CoreError> {
        if decl.name.is_empty() {
            return Err(default_exchange_refused());
        }
        if decl.passive {
            return self.exchange_or_404(&decl.name);
        }
        let kind = ExchangeKind::parse(&decl.kind)
            .ok_or_else(|| CoreError::precondition(format!("invalid exchange type '{}'", decl.kind)))?;
        if let Some(existing) = self.exchange(&decl.name.to_string_lossy()) {
            self.check_exchange_equivalence(&existing, kind, &decl.options)?;
            return Ok(existing);
        }
        if decl.name.as_bytes().starts_with(b"amq.") {
            return Err(CoreError::AccessRefused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                decl.name
            )));
        }
        let mut map = self.exchanges.write().unwrap_or_else(lock_err);
        if let Some(existing) = map.get(&decl.name) {
            // Lost a race with another declare of the same name.
            let existing = existing.clone();
            drop(map);
            self.check_exchange_equivalence(&existing, kind, &decl.options)?;
            return Ok(existing);
        }
        let x = Arc::new(Exchange::new(decl.name.clone(), kind, decl.options.clone()));
        map.insert(decl.name.clone(), x.clone());
        drop(map);
        if decl.options.durable {
            self.submit(vec![StoreOp::PutExchange(self.exchange_record(&x))]);
        }
        Ok(x)
    }

    fn exchange_record(&self, x: &Exchange) -> ExchangeRecord {
        ExchangeRecord {
            vhost: self.name.clone(),
            name: x.name().clone(),
            kind: x.kind().as_str().to_string(),
            auto_delete: x.options().auto_delete,
            internal: x.options().internal,
            arguments: x.options().arguments.clone(),
        }
    }

    fn check_exchange_equivalence(
        &self,
        x: &Exchange,
        kind: ExchangeKind,
        o: &ExchangeOptions,
    ) -> Result<(), CoreError> {
        let cur = x.options();
        let differ = |arg: &str, received: String, current: String| {
            Err(CoreError::precondition(format!(
                "inequivalent arg '{arg}' for exchange '{}' in vhost '{}': received '{received}' but current is '{current}'",
                x.name(),
                self.name
            )))
        };
        if x.kind() != kind {
            return differ("type", kind.to_string(), x.kind().to_string());
        }
        if cur.durable != o.durable {
            return differ("durable", o.durable.to_string(), cur.durable.to_string());
        }
        if cur.auto_delete != o.auto_delete {
            return differ("auto_delete", o.auto_delete.to_string(), cur.auto_delete.to_string());
        }
        if cur.internal != o.internal {
            return differ("internal", o.internal.to_string(), cur.internal.to_string());
        }
        let (a, b) = (o.arguments.get("alternate-exchange"), cur.arguments.get("alternate-exchange"));
        if !same_arg(a, b) {
            return Err(CoreError::precondition(format!(
                "inequivalent arg 'alternate-exchange' for exchange '{}' in vhost '{}': received {} but current is {}",
                x.name(),
                self.name,
                describe_arg(a),
                describe_arg(b)
            )));
        }
        Ok(())
    }

    fn exchange_or_404(&self, name: &ShortString) -> Result<Arc<Exchange>, CoreError> {
        self.exchanges
            .read()
            .unwrap_or_else(lock_err)
            .get(name)
            .cloned()
            .ok_or_else(|| not_found_exchange(name, &self.name))
    }

    /// Deletes an exchange. Deleting one that does not exist succeeds (as in RabbitMQ).
    pub fn delete_exchange(&self, name: &ShortString, if_unused: bool) -> Result<(), CoreError> {
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        if name.as_bytes().starts_with(b"amq.") {
            return Err(CoreError::AccessRefused(format!(
                "operation not permitted on exchange '{name}' in vhost '{}'",
                self.name
            )));
        }
        let Some(x) = self.exchange(&name.to_string_lossy()) else { return Ok(()) };
        if if_unused && x.binding_count() > 0 {
            return Err(CoreError::precondition(format!("exchange '{name}' in vhost '{}' in use", self.name)));
        }
        self.remove_exchange(&x);
        Ok(())
    }

    fn remove_exchange(&self, x: &Arc<Exchange>) {
        let removed = self.exchanges.write().unwrap_or_else(lock_err).remove(x.name());
        let Some(removed) = removed else { return };
        // Publishers that cached it look it up again (`publish_cached`).
        removed.mark_removed();
        // Bindings that lead *to* it from other exchanges go too (and may empty an auto-delete
        // source).
        self.unbind_everywhere(&Owner::Exchange(x.name().clone()));
        if x.options().durable {
            self.submit(vec![StoreOp::DeleteExchange { vhost: self.name.clone(), name: x.name().clone() }]);
        }
    }

    /// Removes the bindings of `owner` from every exchange, persists the removal, and deletes
    /// auto-delete exchanges left without bindings.
    fn unbind_everywhere(&self, owner: &Owner) {
        let all: Vec<Arc<Exchange>> = self.exchanges.read().unwrap_or_else(lock_err).values().cloned().collect();
        let mut ops = Vec::new();
        let mut emptied = Vec::new();
        for x in all {
            let removed = x.unbind_owner(owner);
            if removed.is_empty() {
                continue;
            }
            for b in &removed {
                if let Some(rec) = self.binding_record(&x, b) {
                    ops.push(StoreOp::DeleteBinding(rec));
                }
            }
            if x.options().auto_delete && x.binding_count() == 0 {
                emptied.push(x);
            }
        }
        self.submit(ops);
        for x in emptied {
            self.remove_exchange(&x);
        }
    }

    /// The store record of a binding, when both ends are durable.
    fn binding_record(&self, source: &Exchange, b: &Binding) -> Option<BindingRecord> {
        if !source.options().durable {
            return None;
        }
        let (to_exchange, destination) = match &b.destination {
            Destination::Queue(q) if q.options().durable && q.options().exclusive.is_none() => {
                (false, q.name().clone())
            }
            Destination::Exchange(n) => {
                let durable = self.exchange(&n.to_string_lossy()).is_some_and(|x| x.options().durable);
                if !durable {
                    return None;
                }
                (true, (**n).clone())
            }
            _ => return None,
        };
        // Bindings with a frontend-parsed pattern (MQTT) are session state, not stored here.
        if b.key.pattern.is_parsed() {
            return None;
        }
        Some(BindingRecord {
            vhost: self.name.clone(),
            source: source.name().clone(),
            to_exchange,
            destination,
            routing_key: b.key.routing_key.clone(),
            arguments: b.key.arguments.clone(),
        })
    }

    // ----- queues ----------------------------------------------------------------------------

    /// Declares a queue (or checks it, when passive).
    pub fn declare_queue(&self, decl: QueueDeclare, now: Millis) -> Result<QueueDeclared, CoreError> {
        self.declare_queue_inner(decl, false, now)
    }

    /// Declares a queue whose name may use the reserved `amq.` prefix: for the broker's own
    /// queues (the AMQP frontend's direct reply-to queues), never for a client-given name.
    pub fn declare_reserved_queue(&self, decl: QueueDeclare, now: Millis) -> Result<QueueDeclared, CoreError> {
        self.declare_queue_inner(decl, true, now)
    }

    fn declare_queue_inner(
        &self,
        decl: QueueDeclare,
        reserved_ok: bool,
        now: Millis,
    ) -> Result<QueueDeclared, CoreError> {
        if decl.passive {
            let q = self.queue_for(&decl.name, decl.connection)?;
            return Ok(QueueDeclared { stats: q.stats(), queue: q, created: false });
        }
        let name = if decl.name.is_empty() { generated_queue_name() } else { decl.name.clone() };
        if let Some(existing) = self.queue(&name.to_string_lossy()) {
            return self.redeclare_queue(existing, &decl, now);
        }
        if name.as_bytes().starts_with(b"amq.") && !decl.name.is_empty() && !reserved_ok {
            return Err(CoreError::AccessRefused(format!("queue name '{name}' contains reserved prefix 'amq.*'")));
        }
        let queue = Arc::new(Queue::new(name.clone(), decl.options.clone(), now)?);
        let mut map = self.queues.write().unwrap_or_else(lock_err);
        if let Some(existing) = map.get(&name) {
            let existing = existing.clone();
            drop(map);
            return self.redeclare_queue(existing, &decl, now);
        }
        map.insert(name, queue.clone());
        drop(map);
        if let Some(deadline) = queue.arm() {
            self.timer.arm(deadline);
        }
        if queue.options().durable && queue.options().exclusive.is_none() {
            self.submit(vec![StoreOp::PutQueue(QueueRecord {
                vhost: self.name.clone(),
                name: queue.name().clone(),
                options: queue.options().clone(),
            })]);
        }
        Ok(QueueDeclared { stats: queue.stats(), queue, created: true })
    }

    fn redeclare_queue(&self, q: Arc<Queue>, decl: &QueueDeclare, now: Millis) -> Result<QueueDeclared, CoreError> {
        self.check_exclusive(&q, decl.connection)?;
        let cur = q.options();
        if cur.exclusive.is_some() != decl.options.exclusive.is_some() {
            // RabbitMQ answers a mismatch of the exclusive flag as a lock conflict.
            return Err(CoreError::ResourceLocked(format!(
                "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                q.name(),
                self.name
            )));
        }
        let differ = |arg: &str, received: bool, current: bool| {
            Err(CoreError::precondition(format!(
                "inequivalent arg '{arg}' for queue '{}' in vhost '{}': received '{received}' but current is '{current}'",
                q.name(),
                self.name
            )))
        };
        if cur.durable != decl.options.durable {
            return differ("durable", decl.options.durable, cur.durable);
        }
        if cur.auto_delete != decl.options.auto_delete {
            return differ("auto_delete", decl.options.auto_delete, cur.auto_delete);
        }
        for arg in EQUIVALENT_QUEUE_ARGS {
            let (a, b) = (decl.options.arguments.get(arg), cur.arguments.get(arg));
            // RabbitMQ lets a redeclare leave out `x-queue-type` of a classic queue.
            if *arg == "x-queue-type" && (a.is_none() || b.is_none()) {
                continue;
            }
            if !same_arg(a, b) {
                return Err(CoreError::precondition(format!(
                    "inequivalent arg '{arg}' for queue '{}' in vhost '{}': received {} but current is {}",
                    q.name(),
                    self.name,
                    describe_arg(a),
                    describe_arg(b)
                )));
            }
        }
        q.touch(now);
        Ok(QueueDeclared { stats: q.stats(), queue: q, created: false })
    }

    /// Deletes a queue; returns the number of ready messages it held. Deleting a queue that does
    /// not exist succeeds with 0 (as in RabbitMQ).
    pub fn delete_queue(
        &self,
        name: &ShortString,
        connection: ConnectionId,
        if_unused: bool,
        if_empty: bool,
        now: Millis,
    ) -> Result<u32, CoreError> {
        let Some(q) = self.queue(&name.to_string_lossy()) else { return Ok(0) };
        self.check_exclusive(&q, connection)?;
        q.check_delete(if_unused, if_empty)?;
        Ok(self.remove_queue(&q, now))
    }

    fn remove_queue(&self, q: &Arc<Queue>, now: Millis) -> u32 {
        let removed = {
            let mut map = self.queues.write().unwrap_or_else(lock_err);
            match map.get(q.name()) {
                Some(cur) if Arc::ptr_eq(cur, q) => {
                    // Lock order: the queue map, then the queue (only here and only to read).
                    self.stats.retired.add(&q.stats());
                    map.remove(q.name()).is_some()
                }
                _ => false,
            }
        };
        if !removed {
            return 0;
        }
        self.unbind_everywhere(&Owner::Queue(q.name().clone()));
        let (count, effects) = q.shutdown();
        if q.stores_messages() {
            self.submit(vec![StoreOp::DeleteQueue { vhost: self.name.clone(), name: q.name().clone() }]);
        }
        // Messages still held are dropped with the queue (RabbitMQ does not dead-letter them).
        // The store dropped the queue's messages with it; nothing else to forget.
        let mut ops = Vec::new();
        let effects = Effects {
            forgotten: Vec::new(),
            delivered: Vec::new(),
            load: None,
            forgotten_range: None,
            forgotten_runs: Vec::new(),
            ..effects
        };
        self.carry_out(q, effects, now, 0, &mut ops);
        self.submit(ops);
        count
    }

    /// Removes every ready message of a queue; returns how many.
    pub fn purge_queue(&self, name: &ShortString, connection: ConnectionId, now: Millis) -> Result<u32, CoreError> {
        let q = self.queue_for(name, connection)?;
        let (count, effects) = q.purge(now);
        self.settle(&q, effects, now);
        Ok(count)
    }

    /// Deletes the exclusive queues of a connection that closed.
    pub fn connection_closed(&self, connection: ConnectionId, now: Millis) {
        let owned: Vec<Arc<Queue>> = self
            .queues
            .read()
            .unwrap_or_else(lock_err)
            .values()
            .filter(|q| q.options().exclusive == Some(connection))
            .cloned()
            .collect();
        for q in owned {
            self.remove_queue(&q, now);
        }
    }

    // ----- bindings --------------------------------------------------------------------------

    fn source_for_binding(&self, exchange: &ShortString) -> Result<Arc<Exchange>, CoreError> {
        if exchange.is_empty() {
            return Err(default_exchange_refused());
        }
        self.exchange_or_404(exchange)
    }

    /// Binds a queue to an exchange.
    pub fn bind_queue(
        &self,
        queue: &ShortString,
        exchange: &ShortString,
        key: BindingKey,
        connection: ConnectionId,
    ) -> Result<(), CoreError> {
        let x = self.source_for_binding(exchange)?;
        let q = self.queue_for(queue, connection)?;
        self.bind(&x, Binding { key, destination: Destination::Queue(q) })
    }

    /// Unbinds a queue. Removing a binding that does not exist succeeds, and so does naming an
    /// exchange or a queue that no longer exists (an auto-delete exchange gone with its last
    /// binding, say): RabbitMQ 3.10 answers unbind-ok, so a client's clean-up is idempotent.
    /// The default exchange is still refused.
    pub fn unbind_queue(
        &self,
        queue: &ShortString,
        exchange: &ShortString,
        key: BindingKey,
        connection: ConnectionId,
    ) -> Result<(), CoreError> {
        if exchange.is_empty() {
            return Err(default_exchange_refused());
        }
        let q = match self.queue_for(queue, connection) {
            Ok(q) => q,
            Err(CoreError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let Ok(x) = self.exchange_or_404(exchange) else {
            return Ok(());
        };
        self.unbind(&x, Binding { key, destination: Destination::Queue(q) });
        Ok(())
    }

    /// Binds exchange `destination` to exchange `source`.
    pub fn bind_exchange(
        &self,
        destination: &ShortString,
        source: &ShortString,
        key: BindingKey,
    ) -> Result<(), CoreError> {
        let x = self.source_for_binding(source)?;
        if destination.is_empty() {
            return Err(default_exchange_refused());
        }
        self.exchange_or_404(destination)?;
        self.bind(&x, Binding { key, destination: Destination::Exchange(Box::new(destination.clone())) })
    }

    /// Removes an exchange-to-exchange binding. As [`VHost::unbind_queue`]: a missing source or
    /// destination exchange is not an error (RabbitMQ 3.10), the default exchange is.
    pub fn unbind_exchange(
        &self,
        destination: &ShortString,
        source: &ShortString,
        key: BindingKey,
    ) -> Result<(), CoreError> {
        if source.is_empty() || destination.is_empty() {
            return Err(default_exchange_refused());
        }
        let Ok(x) = self.exchange_or_404(source) else {
            return Ok(());
        };
        // A binding to a destination that is gone was removed with it; unbinding is a no-op.
        if self.exchange_or_404(destination).is_err() {
            return Ok(());
        }
        self.unbind(&x, Binding { key, destination: Destination::Exchange(Box::new(destination.clone())) });
        Ok(())
    }

    fn bind(&self, x: &Arc<Exchange>, b: Binding) -> Result<(), CoreError> {
        if x.bind(b.key.clone(), b.destination.clone())? {
            if let Some(rec) = self.binding_record(x, &b) {
                self.submit(vec![StoreOp::PutBinding(rec)]);
            }
        }
        Ok(())
    }

    fn unbind(&self, x: &Arc<Exchange>, b: Binding) {
        if x.unbind(&b.key, &b.destination) {
            if let Some(rec) = self.binding_record(x, &b) {
                self.submit(vec![StoreOp::DeleteBinding(rec)]);
            }
            if x.options().auto_delete && x.binding_count() == 0 {
                self.remove_exchange(x);
            }
        }
    }

    /// Binds a direct sink (a transient subscription); never stored.
    pub fn bind_sink(&self, exchange: &ShortString, key: BindingKey, sink: SinkRef) -> Result<(), CoreError> {
        let x = self.source_for_binding(exchange)?;
        x.bind(key, Destination::Sink(sink))?;
        Ok(())
    }

    /// Removes one sink binding; returns whether it existed.
    pub fn unbind_sink(&self, exchange: &ShortString, key: &BindingKey, sink: SinkRef) -> Result<bool, CoreError> {
        let x = self.source_for_binding(exchange)?;
        let existed = x.unbind(key, &Destination::Sink(sink));
        if existed && x.options().auto_delete && x.binding_count() == 0 {
            self.remove_exchange(&x);
        }
        Ok(existed)
    }

    /// Removes every binding of a sink (its connection closed): `bound`, its bindings to
    /// `exchange` by key and cookie, and whatever else it has anywhere. A sink's bindings that
    /// the topic trie alone keeps (MQTT subscriptions) can only be found by key.
    pub fn unbind_sink_all(
        &self,
        exchange: &ShortString,
        sink: &Arc<DirectSink>,
        bound: impl IntoIterator<Item = (BindingKey, u64)>,
    ) {
        if let Ok(x) = self.source_for_binding(exchange) {
            let mut any = false;
            for (key, cookie) in bound {
                any |= x.unbind(&key, &Destination::Sink(SinkRef { sink: sink.clone(), cookie }));
            }
            if any && x.options().auto_delete && x.binding_count() == 0 {
                self.remove_exchange(&x);
            }
        }
        self.unbind_everywhere(&Owner::Sink(sink.id()));
    }

    // ----- consumers -------------------------------------------------------------------------

    /// Adds a consumer to a queue.
    pub fn consume(
        &self,
        queue: &ShortString,
        spec: ConsumerSpec,
        now: Millis,
    ) -> Result<(Arc<Queue>, ConsumerId), CoreError> {
        let q = self.queue_for(queue, spec.connection)?;
        let (id, effects) = q.consume(spec, now)?;
        self.settle(&q, effects, now);
        Ok((q, id))
    }

    /// Removes a consumer (an auto-delete queue may go with its last consumer).
    pub fn cancel(&self, queue: &Arc<Queue>, consumer: ConsumerId, now: Millis) {
        let effects = queue.cancel(consumer, now);
        self.settle(queue, effects, now)
    }

    /// Carries out what a queue operation returned (ack, reject, get, release, pump…): routes
    /// dead letters, deletes forgotten messages from the store, deletes the queue if it asked.
    /// Its store changes are submitted lazily ([`Store::submit_lazy`]): no one waits for them,
    /// and a crash before they are committed only brings messages back, flagged redelivered.
    /// A caller that must answer only once they are durable uses [`VHost::settle_waited`].
    pub fn settle(&self, queue: &Arc<Queue>, effects: Effects, now: Millis) {
        if effects.is_empty() {
            return;
        }
        let mut ops = Vec::new();
        self.carry_out(queue, effects, now, 0, &mut ops);
        if !ops.is_empty() {
            self.store.submit_lazy(ops);
        }
    }

    /// [`VHost::settle`] for a caller that waits (a `tx.commit`): the commit resolves when its
    /// store changes are durable.
    pub fn settle_waited(&self, queue: &Arc<Queue>, effects: Effects, now: Millis) -> Commit {
        if effects.is_empty() {
            return Commit::done(Ok(()));
        }
        let mut ops = Vec::new();
        self.carry_out(queue, effects, now, 0, &mut ops);
        self.submit(ops)
    }

    fn carry_out(&self, queue: &Arc<Queue>, effects: Effects, now: Millis, depth: usize, ops: &mut Vec<StoreOp>) {
        if let Some(deadline) = effects.deadline {
            self.timer.arm(deadline);
        }
        if queue.stores_messages() {
            // Marks first: a message delivered and acked in one go is marked, then deleted.
            ops.extend(effects.delivered.into_iter().map(|seq| StoreOp::MarkDelivered {
                vhost: self.name.clone(),
                queue: queue.name().clone(),
                seq,
            }));
            ops.extend(effects.forgotten.into_iter().map(|seq| StoreOp::DeleteMessage {
                vhost: self.name.clone(),
                queue: queue.name().clone(),
                seq,
            }));
            ops.extend(effects.forgotten_runs.into_iter().map(|(from_seq, to_seq)| StoreOp::DeleteRun {
                vhost: self.name.clone(),
                queue: queue.name().clone(),
                from_seq,
                to_seq,
            }));
            if let Some((from_seq, to_seq)) = effects.forgotten_range {
                ops.push(StoreOp::DeleteRange {
                    vhost: self.name.clone(),
                    queue: queue.name().clone(),
                    from_seq,
                    to_seq,
                });
            }
        }
        if let Some(load) = effects.load {
            self.start_load(queue, load, now);
        }
        for dl in effects.dead_letters {
            if depth >= MAX_DEAD_LETTER_HOPS {
                tracing::warn!(vhost = %self.name, queue = %queue.name(), "dead-letter chain too long; message dropped");
                continue;
            }
            let Some(x) = self.exchange(&dl.exchange.to_string_lossy()) else {
                tracing::debug!(vhost = %self.name, exchange = %dl.exchange, "dead-letter exchange does not exist; message dropped");
                continue;
            };
            let message = if dl.message.routing_key == dl.routing_key {
                dl.message
            } else {
                let mut m = (*dl.message).clone();
                m.routing_key = dl.routing_key.clone();
                Arc::new(m)
            };
            let targets = self.targets(&x, &message);
            // No publisher to hold back here: a congested sink just takes it, a `block` queue at
            // its limits refuses it.
            self.deliver(&targets, &message, now, depth + 1, ops, &mut Vec::new(), None);
        }
        if effects.delete_queue {
            // Deleting takes the queue map lock; no queue lock is held here.
            let name = queue.name().clone();
            let vhost = self.name.clone();
            tracing::debug!(%vhost, queue = %name, "queue deleted (auto-delete or x-expires)");
            self.remove_queue(queue, now);
        }
    }

    // ----- paging ----------------------------------------------------------------------------

    /// Reads a queue's tail back ([`Effects::load`]): at once when the store answers at once (the
    /// memory store), else in a task that hands the answer to the queue when the store's writer
    /// has run the read. A load that found the next message missing (its put not submitted yet)
    /// waits `retry` ms first (at most 100).
    fn start_load(&self, queue: &Arc<Queue>, load: Load, now: Millis) {
        let me = self.me.get().and_then(std::sync::Weak::upgrade);
        let runtime = tokio::runtime::Handle::try_current().ok();
        if let (Some(me), Some(runtime)) = (me, runtime) {
            let queue = queue.clone();
            runtime.spawn(async move {
                if load.retry > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(u64::from(load.retry.min(100)))).await;
                }
                let range = me.store.read_range(&me.name, queue.name(), load.from_seq, load.max_count, load.max_bytes);
                let result = range.wait().await;
                let now = crate::message::now_millis();
                let effects = queue.loaded(load, result, now);
                me.settle(&queue, effects, now);
            });
            return;
        }
        if load.retry > 0 {
            // No task to wait in (a vhost outside a broker, tests): a put that is not there yet
            // is being submitted by another thread right now.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let range = self.store.read_range(&self.name, queue.name(), load.from_seq, load.max_count, load.max_bytes);
        let effects = queue.loaded(load, range.blocking_wait(), now);
        self.settle(queue, effects, now);
    }

    /// Takes one ready message (AMQP basic.get), with the count left: [`Queue::get`], and when
    /// memory holds none but the queue's tail on disk does, reads the tail's head back first
    /// (waiting on this thread for the store's read: a get does not answer empty while the queue
    /// holds messages, unless the store cannot give them within a few milliseconds). Its effects
    /// are settled.
    pub fn get(&self, queue: &Arc<Queue>, owner: OwnerId, no_ack: bool, now: Millis) -> Option<(Delivery, u32)> {
        // Each round takes the tail's head or finds it missing: its put is not committed yet
        // (page-in reads see the last commit), so the second round first has the store commit
        // everything submitted (a flush ends a gathering writer's wait at once); a put not even
        // submitted yet (its publisher is between the enqueue and the submit) gets a moment per
        // round after that. Bounded, so that a failing store holds this thread (an async
        // worker) for a few milliseconds at most, not for ever.
        for round in 0..8u64 {
            let (got, effects) = queue.get(owner, no_ack, now);
            self.settle(queue, effects, now);
            if got.is_some() {
                return got;
            }
            let load = queue.load_for_get()?;
            match round {
                0 => {}
                1 => {
                    let _ = self.store.flush().blocking_wait();
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
            let range = self.store.read_range(&self.name, queue.name(), load.from_seq, load.max_count, load.max_bytes);
            let effects = queue.loaded(load, range.blocking_wait(), now);
            self.settle(queue, effects, now);
        }
        None
    }

    // ----- publishing ------------------------------------------------------------------------

    /// Publishes a message to an exchange (`""` is the default exchange) for a publisher that
    /// waits for no acknowledgement (MQTT QoS 0, AMQP without confirms, the broker's own).
    pub fn publish(&self, exchange: &ShortString, message: Message, now: Millis) -> Result<PublishOutcome, CoreError> {
        self.publish_waiting(exchange, message, now, false)
    }

    /// [`VHost::publish`], saying whether the publisher waits for an acknowledgement held behind
    /// [`PublishOutcome::commit`] (MQTT QoS 1/2, an AMQP channel in confirm mode, a bridge's
    /// incoming QoS 1/2). A queue with `x-overflow = block` at its limits takes such a message
    /// and holds the commit until it has room again ([`Queue::enqueue_waiting`]); it refuses one
    /// from a publisher that waits for nothing.
    pub fn publish_waiting(
        &self,
        exchange: &ShortString,
        message: Message,
        now: Millis,
        waits: bool,
    ) -> Result<PublishOutcome, CoreError> {
        let x = self.exchange_or_404(exchange)?;
        self.publish_to(&x, message, now, waits)
    }

    /// [`VHost::publish_waiting`] for a publisher that keeps the exchange it last published to
    /// in `cache`: publishing to the same one again takes no lock, no lookup and no reference
    /// count (the lookup was 3.6 % of the broker's CPU on MQTT QoS 0 1->1). The cached one is
    /// looked up again once it is removed from the vhost ([`Exchange::is_removed`]).
    /// The exchange is the message's own (`Message::exchange`).
    pub fn publish_cached(
        &self,
        cache: &mut Option<Arc<Exchange>>,
        message: Message,
        now: Millis,
        waits: bool,
    ) -> Result<PublishOutcome, CoreError> {
        let x = match cache {
            Some(x) if *x.name() == message.exchange && !x.is_removed() => x,
            _ => cache.insert(self.exchange_or_404(&message.exchange)?),
        };
        self.publish_to(x, message, now, waits)
    }

    fn publish_to(
        &self,
        x: &Arc<Exchange>,
        message: Message,
        now: Millis,
        waits: bool,
    ) -> Result<PublishOutcome, CoreError> {
        if x.options().internal {
            return Err(CoreError::AccessRefused(format!(
                "cannot publish to internal exchange '{}' in vhost '{}'",
                x.name(),
                self.name
            )));
        }
        self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_in.fetch_add(message.payload.len() as u64, Ordering::Relaxed);
        let message = Arc::new(message);
        let targets = self.targets(x, &message);
        if targets.is_empty() {
            self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
        }
        let mut ops = Vec::new();
        let mut congested = Vec::new();
        let mut held = waits.then(|| Commit::done(Ok(())));
        let rejected = self.deliver(&targets, &message, now, 0, &mut ops, &mut congested, held.as_mut());
        let mut commit = self.submit(ops);
        if let Some(held) = held {
            commit = commit.join(held);
        }
        Ok(PublishOutcome { routed: targets.len(), rejected, commit, congested })
    }

    /// Every destination of a message published to `x`, following exchange-to-exchange bindings
    /// and alternate exchanges, without cycles.
    fn targets(&self, x: &Arc<Exchange>, message: &Message) -> Targets {
        let mut targets = Targets::default();
        let mut visited: Visited = SmallVec::new();
        self.route_into(x, message, &mut targets, &mut visited);
        targets
    }

    fn route_into(&self, x: &Arc<Exchange>, message: &Message, targets: &mut Targets, visited: &mut Visited) {
        let at = Arc::as_ptr(x) as usize;
        if visited.contains(&at) {
            return;
        }
        visited.push(at);
        let before = targets.len();
        if x.name().is_empty() {
            // The default exchange: every queue is bound under its own name, except a frontend's
            // own, which only its subscriptions fill (`TopicPolicy::queue_refusal`).
            if let Some(q) = self.queues.read().unwrap_or_else(lock_err).get(&message.routing_key) {
                // Acquire: a policy swapped before the epoch was bumped is the one loaded.
                let epoch = self.access_epoch.load(Ordering::Acquire);
                let reserved = q.reserved_as_of(epoch, || {
                    self.access.load().topic_policy.reserves_queue(message.routing_key.as_bytes())
                });
                if !reserved {
                    targets.add_queue(q);
                }
            }
        } else {
            let mut next: Vec<ShortString> = Vec::new();
            x.route(message, |d| match d {
                Destination::Queue(q) => targets.add_queue(q),
                Destination::Sink(s) => targets.add_sink(s),
                Destination::Exchange(n) => {
                    if !next.contains(n) {
                        next.push((**n).clone())
                    }
                }
            });
            for n in next {
                if let Some(child) = self.exchange_by_bytes(n.as_bytes()) {
                    self.route_into(&child, message, targets, visited);
                }
            }
        }
        if targets.len() == before {
            if let Some(ae) = x.alternate().and_then(|n| self.exchange_by_bytes(n.as_bytes())) {
                self.route_into(&ae, message, targets, visited);
            }
        }
    }

    /// Offers the message to every target; returns whether some queue rejected it. `held` is
    /// given when the publisher waits for an acknowledgement: what `block` queues at their
    /// limits hold it behind is joined into it.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &self,
        targets: &Targets,
        message: &Arc<Message>,
        now: Millis,
        depth: usize,
        ops: &mut Vec<StoreOp>,
        congested: &mut Vec<Target>,
        mut held: Option<&mut Commit>,
    ) -> bool {
        let mut rejected = false;
        for q in &targets.queues {
            let (outcome, hold, effects) = q.enqueue_waiting(message.clone(), now, held.is_some());
            if let (Some(hold), Some(held)) = (hold, held.as_deref_mut()) {
                *held = std::mem::replace(held, Commit::done(Ok(()))).join(hold);
            }
            match outcome {
                EnqueueOutcome::Accepted { seq } => {
                    // A transient message the queue paged out is stored too.
                    if q.stores_messages() && (message.is_persistent() || effects.paged) {
                        ops.push(StoreOp::PutMessage {
                            vhost: self.name.clone(),
                            queue: q.name().clone(),
                            seq,
                            message: message.clone(),
                        });
                    }
                }
                EnqueueOutcome::Rejected => rejected = true,
            }
            if effects.congested {
                congested.push(Target::Queue(q.clone()));
            }
            if !effects.is_empty() {
                self.carry_out(q, effects, now, depth, ops);
            }
        }
        for (sink, cookies) in &targets.sinks {
            match sink.offer(SinkDelivery { message: message.clone(), cookies: cookies.clone() }, now) {
                Offer::Accepted => {}
                Offer::Congested => congested.push(Target::Sink(sink.clone())),
                Offer::Dropped => {
                    self.stats.dropped_at_sinks.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        rejected
    }

    /// Keeps (or clears, with an empty payload) the retained message for a routing key, and
    /// stores the change. The commit resolves when it is durable.
    pub fn set_retained(&self, key: &ShortString, message: Arc<Message>) -> Commit {
        let clear = message.payload.is_empty();
        if !self.retained.set(&key.to_string_lossy(), message.clone()) {
            return Commit::done(Ok(()));
        }
        let op = if clear {
            StoreOp::DeleteRetained { vhost: self.name.clone(), key: key.clone() }
        } else {
            StoreOp::PutRetained { vhost: self.name.clone(), key: key.clone(), message }
        };
        self.submit(vec![op])
    }

    // ----- time ------------------------------------------------------------------------------

    /// What the messages held by every queue of the vhost cost in memory (ready and unacked,
    /// [`crate::queue::QueueStats::memory`]): what the memory alarm watches.
    pub fn queued_memory(&self) -> u64 {
        self.queues.read().unwrap_or_else(lock_err).values().map(|q| q.stats().memory()).sum()
    }

    /// Expires messages and idle queues; returns the earliest next deadline.
    pub fn tick(&self, now: Millis) -> Option<Millis> {
        let queues: Vec<Arc<Queue>> = self.queues.read().unwrap_or_else(lock_err).values().cloned().collect();
        let mut next: Option<Millis> = None;
        for q in queues {
            let (effects, deadline) = q.tick(now);
            self.settle(&q, effects, now);
            if let Some(d) = deadline {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        }
        next
    }

    // ----- recovery --------------------------------------------------------------------------

    /// Re-creates durable exchanges, queues (with their persistent messages, in order, those
    /// delivered but not acked marked redelivered), bindings and retained
    /// messages read back from the store. Used by
    /// [`Broker::recover`](crate::broker::Broker::recover); writes nothing back.
    pub(crate) fn restore(&self, snapshot: &crate::store::Snapshot, now: Millis) {
        {
            let mut map = self.exchanges.write().unwrap_or_else(lock_err);
            for r in snapshot.exchanges.iter().filter(|r| r.vhost == self.name) {
                let Some(kind) = ExchangeKind::parse(&r.kind) else {
                    tracing::warn!(vhost = %self.name, exchange = %r.name, kind = %r.kind, "stored exchange has an unknown type; skipped");
                    continue;
                };
                let opts = ExchangeOptions {
                    durable: true,
                    auto_delete: r.auto_delete,
                    internal: r.internal,
                    arguments: r.arguments.clone(),
                };
                if let Some(old) = map.insert(r.name.clone(), Arc::new(Exchange::new(r.name.clone(), kind, opts))) {
                    old.mark_removed();
                }
            }
        }
        {
            let mut map = self.queues.write().unwrap_or_else(lock_err);
            for r in snapshot.queues.iter().filter(|r| r.vhost == self.name) {
                match Queue::new(r.name.clone(), r.options.clone(), now) {
                    Ok(q) => {
                        map.insert(r.name.clone(), Arc::new(q));
                    }
                    Err(e) => {
                        tracing::warn!(vhost = %self.name, queue = %r.name, error = %e, "stored queue is invalid; skipped")
                    }
                }
            }
        }
        for b in snapshot.bindings.iter().filter(|b| b.vhost == self.name) {
            let Some(x) = self.exchange(&b.source.to_string_lossy()) else { continue };
            let destination = if b.to_exchange {
                Destination::Exchange(Box::new(b.destination.clone()))
            } else {
                match self.queue(&b.destination.to_string_lossy()) {
                    Some(q) => Destination::Queue(q),
                    None => continue,
                }
            };
            let key = BindingKey {
                routing_key: b.routing_key.clone(),
                arguments: b.arguments.clone(),
                pattern: Default::default(),
            };
            if let Err(e) = x.bind(key, destination) {
                tracing::warn!(vhost = %self.name, source = %b.source, error = %e, "stored binding is invalid; skipped");
            }
        }
        for ((vhost, queue), messages) in &snapshot.messages {
            if *vhost != self.name {
                continue;
            }
            let Some(q) = self.queue(&queue.to_string_lossy()).filter(|q| q.stores_messages()) else {
                tracing::warn!(vhost = %self.name, queue = %queue, count = messages.len(), "stored messages of a missing queue; deleted");
                self.submit(vec![StoreOp::DeleteQueue { vhost: self.name.clone(), name: queue.clone() }]);
                continue;
            };
            for m in messages {
                q.restore(m.seq, m.message.clone(), m.delivered, now);
            }
        }
        for ((vhost, queue), tail) in &snapshot.tails {
            if *vhost != self.name {
                continue;
            }
            let Some(q) = self.queue(&queue.to_string_lossy()).filter(|q| q.stores_messages()) else {
                if !snapshot.messages.contains_key(&(vhost.clone(), queue.clone())) {
                    tracing::warn!(vhost = %self.name, queue = %queue, count = tail.count, "stored messages of a missing queue; deleted");
                    self.submit(vec![StoreOp::DeleteQueue { vhost: self.name.clone(), name: queue.clone() }]);
                }
                continue;
            };
            if q.pages() {
                // Stays on disk; read back as the queue drains.
                q.restore_tail(*tail);
                continue;
            }
            // A queue that does not page (the store thought it did): read it back whole.
            let mut from = tail.first_seq;
            while from <= tail.last_seq {
                let range = self.store.read_range(vhost, queue, from, RESTORE_SLICE, u64::MAX);
                let slice = match range.blocking_wait() {
                    Ok(slice) => slice,
                    Err(e) => {
                        tracing::error!(vhost = %self.name, queue = %queue, error = %e, "reading a queue's stored messages failed");
                        break;
                    }
                };
                let Some(last) = slice.last() else { break };
                from = last.seq + 1;
                for m in slice {
                    q.restore(m.seq, m.message, m.delivered, now);
                }
            }
        }
        for (vhost, key, message) in &snapshot.retained {
            if *vhost == self.name {
                self.retained.set(&key.to_string_lossy(), message.clone());
            }
        }
    }
}

/// The arguments of a declare as a client would send them, for tests and tools.
pub fn arguments(pairs: &[(&str, FieldValue)]) -> FieldTable {
    pairs.iter().map(|(k, v)| (ShortString::from(*k), v.clone())).collect()
}

#[cfg(test)]
mod tests;

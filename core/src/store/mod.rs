//! Persistence: the [`Store`] trait, the in-memory store ([`MemoryStore`]) and the redb store
//! ([`RedbStore`], the server's store; see `docs/storage.md`).
//!
//! The trait is shaped for a group-committing disk store (the redb store): the
//! broker *submits* a batch of operations and gets a [`Commit`] back at once; the store may
//! gather many batches from many connections into one fsync'd transaction and resolve all
//! their commits together. A frontend sends its acknowledgement (publisher confirm, PUBACK)
//! only after the commit resolves. Non-durable queues are never submitted; a transient message
//! is submitted only when a durable queue pages it out (it enters the queue's on-disk tail, see
//! `docs/core.md`, "Queues larger than memory"): the store flags it transient and recovery
//! deletes it.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::oneshot;

pub(crate) mod codec;
mod memory;
mod redb;

pub use self::memory::MemoryStore;
pub use self::redb::{FileStats, RedbStore};

use crate::message::{FieldTable, Message, ShortString};
use crate::queue::QueueOptions;

/// A store failure. Callers refuse new persistent work while the store fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store i/o error: {0}")]
    Io(String),
    #[error("store is full")]
    Full,
    #[error("store is closed")]
    Closed,
    #[error("store is corrupt: {0}")]
    Corrupt(String),
}

/// A durable exchange as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeRecord {
    pub vhost: String,
    pub name: ShortString,
    /// `direct`, `fanout`, `topic` or `headers`.
    pub kind: String,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

/// A durable queue as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueRecord {
    pub vhost: String,
    pub name: ShortString,
    pub options: QueueOptions,
}

/// A binding between durable objects, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct BindingRecord {
    pub vhost: String,
    pub source: ShortString,
    /// `true` when the destination is an exchange.
    pub to_exchange: bool,
    pub destination: ShortString,
    pub routing_key: ShortString,
    pub arguments: FieldTable,
}

/// One change to durable state.
#[derive(Debug, Clone)]
pub enum StoreOp {
    PutVhost(String),
    DeleteVhost(String),
    PutExchange(ExchangeRecord),
    DeleteExchange {
        vhost: String,
        name: ShortString,
    },
    PutQueue(QueueRecord),
    /// Deletes the queue and every message it holds.
    DeleteQueue {
        vhost: String,
        name: ShortString,
    },
    PutBinding(BindingRecord),
    DeleteBinding(BindingRecord),
    /// A message entering a durable queue at `seq`: a persistent one, or a transient one the queue
    /// pages out to disk (its tail). A store flags the latter transient (from the message's
    /// delivery mode) and deletes it at recovery instead of restoring it.
    PutMessage {
        vhost: String,
        queue: ShortString,
        seq: u64,
        message: Arc<Message>,
    },
    /// A message that left a durable queue for good. It may arrive *before* the `PutMessage` of
    /// the same `(queue, seq)`: a consumer can receive and ack a message in the moment between
    /// the publisher's enqueue and the publisher submitting its batch. A store must then drop
    /// the later put (the memory store keeps a tombstone; see `MemoryState::early_deletes`).
    DeleteMessage {
        vhost: String,
        queue: ShortString,
        seq: u64,
    },
    /// The messages `from_seq..=to_seq` of a durable queue left it for good: exactly what one
    /// `DeleteMessage` per sequence number in the range does (one missing leaves its tombstone),
    /// in one walk over the leaves that hold the range instead of a descent from the root per
    /// message. A queue sends it for messages whose puts are committed (read back from its tail,
    /// or recovered), forgotten in order: a tail drained to no-ack consumers, or acked in order
    /// ([`crate::queue::Effects::forgotten_runs`]).
    DeleteRun {
        vhost: String,
        queue: ShortString,
        from_seq: u64,
        to_seq: u64,
    },
    /// Every message of a durable queue with `from_seq <= seq <= to_seq`, in either layout: a
    /// purge of a queue's on-disk tail, whose sequence numbers the queue knows only as a range.
    /// Like a `DeleteMessage` it may arrive before some of its puts (a publisher enqueued into
    /// the tail and had not submitted its batch yet): a store drops those puts too (it keeps the
    /// range as a tombstone, bounded like the early deletes).
    DeleteRange {
        vhost: String,
        queue: ShortString,
        from_seq: u64,
        to_seq: u64,
    },
    /// A message of a durable queue was handed to a consumer that must ack it: after a restart
    /// it comes back with the redelivered flag. A mark for a message the store does not hold
    /// (acked already, or its put not submitted yet) does nothing.
    MarkDelivered {
        vhost: String,
        queue: ShortString,
        seq: u64,
    },
    PutRetained {
        vhost: String,
        key: ShortString,
        message: Arc<Message>,
    },
    DeleteRetained {
        vhost: String,
        key: ShortString,
    },
    /// A frontend's session state (MQTT persistent sessions), opaque to the core: the frontend
    /// encodes and versions it. Replaces what was stored for the same client id.
    PutSession {
        vhost: String,
        client_id: String,
        state: Bytes,
    },
    DeleteSession {
        vhost: String,
        client_id: String,
    },
    /// A definition an operator made at run time (users, permissions, bridges through the
    /// management API), opaque to the store: the owner encodes it and namespaces the key
    /// (`user/<name>`, …). Replaces what was stored under the same key.
    PutSetting {
        key: String,
        value: Bytes,
    },
    DeleteSetting {
        key: String,
    },
}

/// A persistent message of a durable queue, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub seq: u64,
    pub message: Arc<Message>,
    /// Handed to a consumer and not acked before the store was closed: redeliver with the
    /// redelivered flag.
    pub delivered: bool,
}

/// A session record whose client id starts with this character belongs to a part of the broker
/// itself (a bridge's QoS 2 receive ids), not to a frontend's client: U+0000 cannot occur in an
/// MQTT client id (MQTT 3.1.1 §1.5.3, 5.0 §1.5.4), so no client's session shares its key.
pub const INTERNAL_SESSION_PREFIX: char = '\0';

/// A frontend's stored session (see [`StoreOp::PutSession`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub vhost: String,
    pub client_id: String,
    pub state: Bytes,
}

/// The messages of each durable queue, keyed by `(vhost, queue)`, in sequence order.
pub type StoredMessages = BTreeMap<(String, ShortString), Vec<StoredMessage>>;

/// A queue's messages on disk that recovery did not read into memory: every stored message of
/// the queue after its window ([`Snapshot::messages`]), known only by its sequence numbers and
/// totals. The queue pages them in with [`Store::read_range`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TailSummary {
    pub first_seq: u64,
    pub last_seq: u64,
    pub count: u64,
    /// Body bytes.
    pub bytes: u64,
}

/// The on-disk tails of durable queues, keyed by `(vhost, queue)`.
pub type StoredTails = BTreeMap<(String, ShortString), TailSummary>;

/// How much of a queue that pages ([`crate::queue::pages`]) recovery reads into memory: its
/// lowest sequence numbers up to this many messages or [`RECOVER_WINDOW_BYTES`] (at least one);
/// the rest is its [`TailSummary`]. The queue's own window ([`crate::queue::PAGE_WINDOW`]).
pub const RECOVER_WINDOW: u64 = crate::queue::PAGE_WINDOW;
/// [`RECOVER_WINDOW`] in body bytes.
pub const RECOVER_WINDOW_BYTES: u64 = crate::queue::PAGE_WINDOW_BYTES;

/// Splits one queue's stored messages, in sequence order, into what recovery returns: the
/// window (all of them for a queue that does not page) and the tail's summary. Used by both
/// stores, so they return the same shapes.
#[derive(Debug)]
pub(crate) struct WindowSplit {
    pages: bool,
    window_count: u64,
    window_bytes: u64,
    tail: Option<TailSummary>,
}

impl WindowSplit {
    pub(crate) fn new(pages: bool) -> WindowSplit {
        WindowSplit { pages, window_count: 0, window_bytes: 0, tail: None }
    }
    /// Whether the next message (`seq`, `bytes` of body) goes in the window; if not it is
    /// counted in the tail.
    pub(crate) fn take(&mut self, seq: u64, bytes: u64) -> bool {
        let full = self.pages
            && (self.tail.is_some()
                || (self.window_count > 0
                    && (self.window_count >= RECOVER_WINDOW || self.window_bytes + bytes > RECOVER_WINDOW_BYTES)));
        if !full {
            self.window_count += 1;
            self.window_bytes += bytes;
            return true;
        }
        let t = self.tail.get_or_insert(TailSummary { first_seq: seq, ..TailSummary::default() });
        t.last_seq = seq;
        t.count += 1;
        t.bytes += bytes;
        false
    }
    pub(crate) fn tail(&self) -> Option<TailSummary> {
        self.tail
    }
}

/// Which stored queues page: those whose record says so ([`crate::queue::pages`]), and those
/// with no record (their messages are deleted at recovery, so none is read into memory).
pub(crate) fn paging_queues(queues: &[QueueRecord]) -> impl Fn(&str, &ShortString) -> bool + '_ {
    move |vhost, name| {
        queues
            .iter()
            .find(|r| r.vhost == vhost && r.name == *name)
            .is_none_or(|r| crate::queue::pages(&r.name, &r.options))
    }
}

/// Everything durable, as read back at start-up.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub vhosts: Vec<String>,
    pub exchanges: Vec<ExchangeRecord>,
    pub queues: Vec<QueueRecord>,
    pub bindings: Vec<BindingRecord>,
    /// Per `(vhost, queue)`, messages in sequence order: all of them for a queue that does not
    /// page, the window (the lowest sequence numbers) for one that does.
    pub messages: StoredMessages,
    /// Per `(vhost, queue)` that pages, what is stored beyond its window. Transient messages a
    /// queue paged out are not in either: recovery deletes them.
    pub tails: StoredTails,
    pub retained: Vec<(String, ShortString, Arc<Message>)>,
    pub sessions: Vec<SessionRecord>,
    /// Run-time definitions ([`StoreOp::PutSetting`]), sorted by key.
    pub settings: Vec<(String, Bytes)>,
}

/// Resolves when a submitted batch is durable.
#[derive(Debug)]
pub struct Commit(CommitState);

#[derive(Debug)]
enum CommitState {
    Done(Result<(), StoreError>),
    Pending(oneshot::Receiver<Result<(), StoreError>>),
    Both(Box<Commit>, Box<Commit>),
}

impl Commit {
    /// Waits for the commit, blocking the thread ([`ReadRange::blocking_wait`]'s way).
    pub fn blocking_wait(mut self) -> Result<(), StoreError> {
        park_until(|cx| self.poll_resolve(cx));
        self.try_result().unwrap_or(Err(StoreError::Closed))
    }

    /// A commit that is already done (nothing to write, or an in-memory store).
    pub fn done(result: Result<(), StoreError>) -> Commit {
        Commit(CommitState::Done(result))
    }
    /// A commit a store resolves later through the returned sender.
    pub fn pending() -> (oneshot::Sender<Result<(), StoreError>>, Commit) {
        let (tx, rx) = oneshot::channel();
        (tx, Commit(CommitState::Pending(rx)))
    }
    /// A commit that resolves when both have: `Ok` only if both are. A done `Ok` side is
    /// dropped, so joining onto a done commit costs nothing.
    pub fn join(self, other: Commit) -> Commit {
        match (self.0, other.0) {
            (CommitState::Done(Ok(())), o) | (o, CommitState::Done(Ok(()))) => Commit(o),
            (e @ CommitState::Done(Err(_)), _) | (_, e @ CommitState::Done(Err(_))) => Commit(e),
            (a, b) => Commit(CommitState::Both(Box::new(Commit(a)), Box::new(Commit(b)))),
        }
    }
    /// Whether it is resolved already, without waiting.
    pub fn is_done(&self) -> bool {
        matches!(self.0, CommitState::Done(_))
    }
    /// The result, if it is resolved already (a done commit), without waiting.
    pub fn try_result(&self) -> Option<Result<(), StoreError>> {
        match &self.0 {
            CommitState::Done(r) => Some(r.clone()),
            CommitState::Pending(_) | CommitState::Both(..) => None,
        }
    }
    /// Looks, without waiting, whether it has resolved since it was made; a resolved commit
    /// becomes a done one ([`Commit::try_result`] then answers).
    pub fn try_resolve(&mut self) -> bool {
        self.resolve(None).is_ready()
    }
    /// [`Commit::try_resolve`] for a task that waits: `Pending` registers the task to be woken
    /// when the store resolves it.
    pub fn poll_resolve(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.resolve(Some(cx))
    }
    fn resolve(&mut self, mut cx: Option<&mut Context<'_>>) -> Poll<()> {
        let result = match &mut self.0 {
            CommitState::Done(_) => return Poll::Ready(()),
            CommitState::Pending(rx) => match &mut cx {
                Some(cx) => match Pin::new(rx).poll(cx) {
                    Poll::Ready(r) => r.unwrap_or(Err(StoreError::Closed)),
                    Poll::Pending => return Poll::Pending,
                },
                None => match rx.try_recv() {
                    Ok(r) => r,
                    Err(oneshot::error::TryRecvError::Empty) => return Poll::Pending,
                    Err(oneshot::error::TryRecvError::Closed) => Err(StoreError::Closed),
                },
            },
            CommitState::Both(a, b) => {
                // Both looked at, so a waiting task is woken by whichever resolves last.
                let (ra, rb) = (a.resolve(cx.as_deref_mut()), b.resolve(cx));
                if ra.is_pending() || rb.is_pending() {
                    return Poll::Pending;
                }
                let (a, b) = (a.try_result().expect("resolved"), b.try_result().expect("resolved"));
                a.and(b)
            }
        };
        self.0 = CommitState::Done(result);
        Poll::Ready(())
    }
    /// Waits until the batch is durable (or failed).
    pub async fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            CommitState::Done(r) => r,
            CommitState::Pending(rx) => rx.await.unwrap_or(Err(StoreError::Closed)),
            CommitState::Both(a, b) => {
                let (a, b) = tokio::join!(Box::pin(a.wait()), Box::pin(b.wait()));
                a.and(b)
            }
        }
    }
}

/// The answer to [`Store::read_range`]: resolves with the messages read.
#[derive(Debug)]
pub struct ReadRange(oneshot::Receiver<Result<Vec<StoredMessage>, StoreError>>);

impl ReadRange {
    /// An answer that is there already (the memory store).
    pub fn done(result: Result<Vec<StoredMessage>, StoreError>) -> ReadRange {
        let (tx, range) = ReadRange::pending();
        let _ = tx.send(result);
        range
    }
    /// An answer a store gives later through the returned sender.
    pub fn pending() -> (oneshot::Sender<Result<Vec<StoredMessage>, StoreError>>, ReadRange) {
        let (tx, rx) = oneshot::channel();
        (tx, ReadRange(rx))
    }
    /// The answer, if it is there, without waiting.
    pub fn try_take(&mut self) -> Option<Result<Vec<StoredMessage>, StoreError>> {
        match self.0.try_recv() {
            Ok(r) => Some(r),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(StoreError::Closed)),
        }
    }
    /// Waits for the answer, blocking the thread (recovery, off the async workers).
    /// Usable on an async worker too (a `get`, which waits for the read): it parks the thread
    /// rather than asking the runtime.
    pub fn blocking_wait(mut self) -> Result<Vec<StoredMessage>, StoreError> {
        if let Some(r) = self.try_take() {
            return r;
        }
        let mut rx = Pin::new(&mut self.0);
        park_until(|cx| rx.as_mut().poll(cx)).unwrap_or(Err(StoreError::Closed))
    }
    /// Waits for the answer.
    pub async fn wait(self) -> Result<Vec<StoredMessage>, StoreError> {
        self.0.await.unwrap_or(Err(StoreError::Closed))
    }
}

/// Polls `poll` until it is ready, parking the thread in between (woken by the waker it is
/// given): a wait that does not need an async runtime, nor blocks one's scheduler.
fn park_until<T>(mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>) -> T {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(r) = poll(&mut cx) {
            return r;
        }
        std::thread::park();
    }
}

/// Upper bounds of [`CommitStats`]' latency buckets, in seconds (Prometheus' default buckets
/// from 0.5 ms, where an fsync on an SSD lands, to 2.5 s, a disk in trouble).
pub const COMMIT_LATENCY_BOUNDS: [f64; 12] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// How many commits a store made and how long their fsync took: a histogram of relaxed
/// atomics, recorded once per commit by the writer (never per message).
#[derive(Debug, Default)]
pub struct CommitStats {
    count: std::sync::atomic::AtomicU64,
    sum_micros: std::sync::atomic::AtomicU64,
    /// Per bucket of [`COMMIT_LATENCY_BOUNDS`] (not cumulative); slower ones count only in `count`.
    buckets: [std::sync::atomic::AtomicU64; COMMIT_LATENCY_BOUNDS.len()],
}

/// [`CommitStats`] read at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommitSnapshot {
    pub count: u64,
    pub sum_seconds: f64,
    /// Cumulative: commits that took at most the bound of the same index in [`COMMIT_LATENCY_BOUNDS`].
    pub cumulative: [u64; COMMIT_LATENCY_BOUNDS.len()],
}

impl CommitStats {
    pub fn record(&self, took: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let secs = took.as_secs_f64();
        if let Some(i) = COMMIT_LATENCY_BOUNDS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.sum_micros.fetch_add(took.as_micros() as u64, Relaxed);
        // Last: a reader that sees the count sees the bucket (give or take a commit in flight).
        self.count.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> CommitSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        let mut cumulative = [0; COMMIT_LATENCY_BOUNDS.len()];
        let mut running = 0;
        for (c, b) in cumulative.iter_mut().zip(&self.buckets) {
            running += b.load(Relaxed);
            *c = running;
        }
        let count = self.count.load(Relaxed).max(running);
        CommitSnapshot { count, sum_seconds: self.sum_micros.load(Relaxed) as f64 / 1e6, cumulative }
    }
}

/// Durable storage for the broker's state.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Queues a batch of operations, applied atomically and in submission order.
    fn submit(&self, ops: Vec<StoreOp>) -> Commit;
    /// Queues a batch that no one waits for: changes whose loss in a crash could only bring
    /// a message back, flagged redelivered (acks and rejects, delivered marks, and what they
    /// carry out: dead letters, requeues). A disk store may hold it and commit it with the next
    /// batch someone waits for (or a flush, a read, the close), or by itself after a short
    /// bound ([`RedbStore`]: `LAZY_BOUND`, 20 ms); it stays in submission order, so what is on
    /// disk after a crash is still everything submitted up to some point.
    fn submit_lazy(&self, ops: Vec<StoreOp>) {
        drop(self.submit(ops));
    }
    /// Reads back everything durable (start-up), but of each queue that pages only its window
    /// and its tail's summary ([`Snapshot::tails`]); deletes the transient messages queues had
    /// paged out.
    fn recover(&self) -> Result<Snapshot, StoreError>;
    /// Reads a durable queue's stored messages with `seq >= from_seq`, in sequence order: at most
    /// `max_count`, and no more once `max_bytes` of body are read (at least one). It sees at
    /// least every batch that was committed before it was called (a disk store reads the last
    /// commit while its writer goes on), so a message missing from a sequence the queue expects
    /// is one whose put is not written yet: the queue asks again a little later.
    fn read_range(
        &self,
        vhost: &str,
        queue: &ShortString,
        from_seq: u64,
        max_count: usize,
        max_bytes: u64,
    ) -> ReadRange {
        let _ = (vhost, queue, from_seq, max_count, max_bytes);
        ReadRange::done(Err(StoreError::Io("this store does not read ranges".into())))
    }
    /// Resolves once everything submitted so far is durable (shutdown).
    fn flush(&self) -> Commit;
    /// Whether the last commit failed (a full or failing disk); the disk alarm watches this.
    fn is_failing(&self) -> bool {
        false
    }
    /// Commits what was submitted and releases the storage (the file); later submits fail
    /// with [`StoreError::Closed`]. A server calls it last in its shutdown.
    fn close(&self) {}
    /// Commit counts and fsync latency, for a store that writes to disk (`None`: it does not).
    fn commit_stats(&self) -> Option<std::sync::Arc<CommitStats>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pending_commit_resolves_when_the_store_says() {
        let (tx, c) = Commit::pending();
        assert!(!c.is_done());
        tx.send(Err(StoreError::Full)).unwrap();
        assert_eq!(c.wait().await, Err(StoreError::Full));
        let (tx, c) = Commit::pending();
        drop(tx);
        assert_eq!(c.wait().await, Err(StoreError::Closed));
    }

    #[tokio::test]
    async fn a_joined_commit_waits_for_both_and_fails_if_either_fails() {
        assert!(Commit::done(Ok(())).join(Commit::done(Ok(()))).is_done());
        let (_tx, pending) = Commit::pending();
        assert_eq!(Commit::done(Err(StoreError::Full)).join(pending).try_result(), Some(Err(StoreError::Full)));
        let (tx1, c1) = Commit::pending();
        let (tx2, c2) = Commit::pending();
        let both = c1.join(c2);
        assert!(!both.is_done());
        let waiter = tokio::spawn(both.wait());
        tx1.send(Ok(())).unwrap();
        tx2.send(Err(StoreError::Io("disk".into()))).unwrap();
        assert_eq!(waiter.await.unwrap(), Err(StoreError::Io("disk".into())));
    }
}

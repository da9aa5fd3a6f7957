//! Persistence: the [`Store`] trait and its in-memory implementation.
//!
//! The trait is shaped for a group-committing disk store (the redb store of a later issue): the
//! broker *submits* a batch of operations and gets a [`Commit`] back at once; the store may
//! gather many batches from many connections into one fsync'd transaction and resolve all
//! their commits together. A frontend sends its acknowledgement (publisher confirm, PUBACK)
//! only after the commit resolves. Transient messages and non-durable queues are never
//! submitted.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

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
    /// A persistent message entering a durable queue at `seq`.
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
    PutRetained {
        vhost: String,
        key: ShortString,
        message: Arc<Message>,
    },
    DeleteRetained {
        vhost: String,
        key: ShortString,
    },
}

/// The messages of each durable queue, keyed by `(vhost, queue)`, in sequence order.
pub type StoredMessages = BTreeMap<(String, ShortString), Vec<(u64, Arc<Message>)>>;

/// Everything durable, as read back at start-up.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub vhosts: Vec<String>,
    pub exchanges: Vec<ExchangeRecord>,
    pub queues: Vec<QueueRecord>,
    pub bindings: Vec<BindingRecord>,
    /// Per `(vhost, queue)`, messages in sequence order.
    pub messages: StoredMessages,
    pub retained: Vec<(String, ShortString, Arc<Message>)>,
}

/// Resolves when a submitted batch is durable.
#[derive(Debug)]
pub struct Commit(CommitState);

#[derive(Debug)]
enum CommitState {
    Done(Result<(), StoreError>),
    Pending(oneshot::Receiver<Result<(), StoreError>>),
}

impl Commit {
    /// A commit that is already done (nothing to write, or an in-memory store).
    pub fn done(result: Result<(), StoreError>) -> Commit {
        Commit(CommitState::Done(result))
    }
    /// A commit a store resolves later through the returned sender.
    pub fn pending() -> (oneshot::Sender<Result<(), StoreError>>, Commit) {
        let (tx, rx) = oneshot::channel();
        (tx, Commit(CommitState::Pending(rx)))
    }
    /// Whether it is resolved already, without waiting.
    pub fn is_done(&self) -> bool {
        matches!(self.0, CommitState::Done(_))
    }
    /// The result, if it is resolved already (a done commit), without waiting.
    pub fn try_result(&self) -> Option<Result<(), StoreError>> {
        match &self.0 {
            CommitState::Done(r) => Some(r.clone()),
            CommitState::Pending(_) => None,
        }
    }
    /// Waits until the batch is durable (or failed).
    pub async fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            CommitState::Done(r) => r,
            CommitState::Pending(rx) => rx.await.unwrap_or(Err(StoreError::Closed)),
        }
    }
}

/// Durable storage for the broker's state.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Queues a batch of operations, applied atomically and in submission order.
    fn submit(&self, ops: Vec<StoreOp>) -> Commit;
    /// Reads back everything durable (start-up).
    fn recover(&self) -> Result<Snapshot, StoreError>;
    /// Resolves once everything submitted so far is durable (shutdown).
    fn flush(&self) -> Commit;
}

/// A store that keeps its "durable" state in memory: durable objects survive a broker being
/// dropped and rebuilt over the same `MemoryStore` (which is how the core's recovery is tested),
/// but not the process. Commits resolve at once.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    vhosts: BTreeMap<String, ()>,
    exchanges: BTreeMap<(String, ShortString), ExchangeRecord>,
    queues: BTreeMap<(String, ShortString), QueueRecord>,
    bindings: Vec<BindingRecord>,
    messages: BTreeMap<(String, ShortString), BTreeMap<u64, Arc<Message>>>,
    retained: BTreeMap<(String, ShortString), Arc<Message>>,
    /// Operations applied, for tests that check what reached the store.
    ops_applied: u64,
    /// Deletes that came before their put (see [`StoreOp::DeleteMessage`]).
    early_deletes: std::collections::BTreeSet<(String, ShortString, u64)>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }
    /// How many operations have been applied so far.
    pub fn ops_applied(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).ops_applied
    }
    /// How many messages the store holds for a queue.
    pub fn message_count(&self, vhost: &str, queue: &str) -> usize {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.messages.get(&(vhost.to_string(), queue.into())).map_or(0, |m| m.len())
    }
}

impl MemoryState {
    fn apply(&mut self, op: StoreOp) {
        self.ops_applied += 1;
        match op {
            StoreOp::PutVhost(v) => {
                self.vhosts.insert(v, ());
            }
            StoreOp::DeleteVhost(v) => {
                self.vhosts.remove(&v);
                self.exchanges.retain(|(vh, _), _| *vh != v);
                self.queues.retain(|(vh, _), _| *vh != v);
                self.bindings.retain(|b| b.vhost != v);
                self.messages.retain(|(vh, _), _| *vh != v);
                self.retained.retain(|(vh, _), _| *vh != v);
            }
            StoreOp::PutExchange(r) => {
                self.exchanges.insert((r.vhost.clone(), r.name.clone()), r);
            }
            StoreOp::DeleteExchange { vhost, name } => {
                self.exchanges.remove(&(vhost.clone(), name.clone()));
                self.bindings
                    .retain(|b| !(b.vhost == vhost && (b.source == name || (b.to_exchange && b.destination == name))));
            }
            StoreOp::PutQueue(r) => {
                self.queues.insert((r.vhost.clone(), r.name.clone()), r);
            }
            StoreOp::DeleteQueue { vhost, name } => {
                self.queues.remove(&(vhost.clone(), name.clone()));
                self.bindings.retain(|b| !(b.vhost == vhost && !b.to_exchange && b.destination == name));
                self.early_deletes.retain(|(v, q, _)| !(*v == vhost && *q == name));
                self.messages.remove(&(vhost, name));
            }
            StoreOp::PutBinding(r) => {
                if !self.bindings.contains(&r) {
                    self.bindings.push(r);
                }
            }
            StoreOp::DeleteBinding(r) => self.bindings.retain(|b| *b != r),
            StoreOp::PutMessage { vhost, queue, seq, message } => {
                if !self.early_deletes.remove(&(vhost.clone(), queue.clone(), seq)) {
                    self.messages.entry((vhost, queue)).or_default().insert(seq, message);
                }
            }
            StoreOp::DeleteMessage { vhost, queue, seq } => {
                let removed =
                    self.messages.get_mut(&(vhost.clone(), queue.clone())).and_then(|m| m.remove(&seq)).is_some();
                if !removed {
                    self.early_deletes.insert((vhost, queue, seq));
                }
            }
            StoreOp::PutRetained { vhost, key, message } => {
                self.retained.insert((vhost, key), message);
            }
            StoreOp::DeleteRetained { vhost, key } => {
                self.retained.remove(&(vhost, key));
            }
        }
    }
}

impl Store for MemoryStore {
    fn submit(&self, ops: Vec<StoreOp>) -> Commit {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for op in ops {
            st.apply(op);
        }
        Commit::done(Ok(()))
    }

    fn recover(&self) -> Result<Snapshot, StoreError> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Snapshot {
            vhosts: st.vhosts.keys().cloned().collect(),
            exchanges: st.exchanges.values().cloned().collect(),
            queues: st.queues.values().cloned().collect(),
            bindings: st.bindings.clone(),
            messages: st
                .messages
                .iter()
                .map(|(k, m)| (k.clone(), m.iter().map(|(s, msg)| (*s, msg.clone())).collect()))
                .collect(),
            retained: st.retained.iter().map(|((v, k), m)| (v.clone(), k.clone(), m.clone())).collect(),
        })
    }

    fn flush(&self) -> Commit {
        Commit::done(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn memory_store_applies_batches_in_order() {
        let s = MemoryStore::new();
        let m = Arc::new(Message::new("", "q", Bytes::from_static(b"x")));
        let put = |seq| StoreOp::PutMessage { vhost: "/".into(), queue: "q".into(), seq, message: m.clone() };
        s.submit(vec![put(1), put(2), put(3)]).wait().await.unwrap();
        s.submit(vec![StoreOp::DeleteMessage { vhost: "/".into(), queue: "q".into(), seq: 2 }]).wait().await.unwrap();
        let snap = s.recover().unwrap();
        let seqs: Vec<u64> = snap.messages[&("/".to_string(), "q".into())].iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![1, 3]);
    }

    #[tokio::test]
    async fn a_delete_before_its_put_cancels_the_put() {
        let s = MemoryStore::new();
        let m = Arc::new(Message::new("", "q", Bytes::new()));
        s.submit(vec![StoreOp::DeleteMessage { vhost: "/".into(), queue: "q".into(), seq: 9 }]).wait().await.unwrap();
        s.submit(vec![StoreOp::PutMessage { vhost: "/".into(), queue: "q".into(), seq: 9, message: m }])
            .wait()
            .await
            .unwrap();
        assert_eq!(s.message_count("/", "q"), 0);
    }

    #[tokio::test]
    async fn deleting_a_queue_drops_its_messages_and_bindings() {
        let s = MemoryStore::new();
        let m = Arc::new(Message::new("", "q", Bytes::new()));
        s.submit(vec![
            StoreOp::PutQueue(QueueRecord {
                vhost: "/".into(),
                name: "q".into(),
                options: QueueOptions { durable: true, ..Default::default() },
            }),
            StoreOp::PutBinding(BindingRecord {
                vhost: "/".into(),
                source: "amq.topic".into(),
                to_exchange: false,
                destination: "q".into(),
                routing_key: "a.#".into(),
                arguments: FieldTable::new(),
            }),
            StoreOp::PutMessage { vhost: "/".into(), queue: "q".into(), seq: 1, message: m },
            StoreOp::DeleteQueue { vhost: "/".into(), name: "q".into() },
        ])
        .wait()
        .await
        .unwrap();
        let snap = s.recover().unwrap();
        assert!(snap.queues.is_empty() && snap.bindings.is_empty() && snap.messages.is_empty());
    }

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
}

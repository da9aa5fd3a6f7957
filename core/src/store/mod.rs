//! Persistence: the [`Store`] trait, the in-memory store ([`MemoryStore`]) and the redb store
//! ([`RedbStore`], not wired into the server yet; see `docs/storage.md`).
//!
//! The trait is shaped for a group-committing disk store (the redb store): the
//! broker *submits* a batch of operations and gets a [`Commit`] back at once; the store may
//! gather many batches from many connections into one fsync'd transaction and resolve all
//! their commits together. A frontend sends its acknowledgement (publisher confirm, PUBACK)
//! only after the commit resolves. Transient messages and non-durable queues are never
//! submitted.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use tokio::sync::oneshot;

pub(crate) mod codec;
mod memory;
mod redb;

pub use self::memory::MemoryStore;
pub use self::redb::RedbStore;

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
}

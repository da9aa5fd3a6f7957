//! [`MemoryStore`]: the store the core's recovery is tested with.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{
    BindingRecord, Commit, ExchangeRecord, QueueRecord, SessionRecord, Snapshot, Store, StoreError, StoreOp,
    StoredMessage,
};
use crate::message::{Message, ShortString};

/// A store that keeps its "durable" state in memory: durable objects survive a broker being
/// dropped and rebuilt over the same `MemoryStore` (which is how the core's recovery is tested),
/// but not the process. Commits resolve at once.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
}

/// A queue's stored messages: seq → (message, delivered).
type QueueMessages = BTreeMap<u64, (Arc<Message>, bool)>;

#[derive(Debug, Default)]
struct MemoryState {
    vhosts: BTreeMap<String, ()>,
    exchanges: BTreeMap<(String, ShortString), ExchangeRecord>,
    queues: BTreeMap<(String, ShortString), QueueRecord>,
    bindings: Vec<BindingRecord>,
    messages: BTreeMap<(String, ShortString), QueueMessages>,
    retained: BTreeMap<(String, ShortString), Arc<Message>>,
    sessions: BTreeMap<(String, String), bytes::Bytes>,
    settings: BTreeMap<String, bytes::Bytes>,
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
                self.sessions.retain(|(vh, _), _| *vh != v);
                // As for `DeleteQueue`: the vhost's queues are gone, and their tombstones with them.
                self.early_deletes.retain(|(vh, _, _)| *vh != v);
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
                    self.messages.entry((vhost, queue)).or_default().insert(seq, (message, false));
                }
            }
            StoreOp::DeleteMessage { vhost, queue, seq } => {
                let removed =
                    self.messages.get_mut(&(vhost.clone(), queue.clone())).and_then(|m| m.remove(&seq)).is_some();
                if !removed {
                    self.early_deletes.insert((vhost, queue, seq));
                }
            }
            StoreOp::MarkDelivered { vhost, queue, seq } => {
                if let Some((_, delivered)) = self.messages.get_mut(&(vhost, queue)).and_then(|m| m.get_mut(&seq)) {
                    *delivered = true;
                }
            }
            StoreOp::PutSession { vhost, client_id, state } => {
                self.sessions.insert((vhost, client_id), state);
            }
            StoreOp::DeleteSession { vhost, client_id } => {
                self.sessions.remove(&(vhost, client_id));
            }
            StoreOp::PutSetting { key, value } => {
                self.settings.insert(key, value);
            }
            StoreOp::DeleteSetting { key } => {
                self.settings.remove(&key);
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
                .map(|(k, m)| {
                    let msgs = m
                        .iter()
                        .map(|(s, (msg, d))| StoredMessage { seq: *s, message: msg.clone(), delivered: *d })
                        .collect();
                    (k.clone(), msgs)
                })
                .collect(),
            retained: st.retained.iter().map(|((v, k), m)| (v.clone(), k.clone(), m.clone())).collect(),
            sessions: st
                .sessions
                .iter()
                .map(|((v, c), state)| SessionRecord { vhost: v.clone(), client_id: c.clone(), state: state.clone() })
                .collect(),
            settings: st.settings.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
    }

    fn flush(&self) -> Commit {
        Commit::done(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::FieldTable;
    use crate::queue::QueueOptions;
    use bytes::Bytes;

    #[tokio::test]
    async fn memory_store_applies_batches_in_order() {
        let s = MemoryStore::new();
        let m = Arc::new(Message::new("", "q", Bytes::from_static(b"x")));
        let put = |seq| StoreOp::PutMessage { vhost: "/".into(), queue: "q".into(), seq, message: m.clone() };
        s.submit(vec![put(1), put(2), put(3)]).wait().await.unwrap();
        s.submit(vec![StoreOp::DeleteMessage { vhost: "/".into(), queue: "q".into(), seq: 2 }]).wait().await.unwrap();
        let snap = s.recover().unwrap();
        let seqs: Vec<u64> = snap.messages[&("/".to_string(), "q".into())].iter().map(|m| m.seq).collect();
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
}

//! [`MemoryStore`]: the store the core's recovery is tested with.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{
    BindingRecord, Commit, ExchangeRecord, QueueRecord, ReadRange, SessionRecord, Snapshot, Store, StoreError, StoreOp,
    StoredMessage, WindowSplit,
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
    /// Range deletes, kept for the puts in their range that come after them (see
    /// [`StoreOp::DeleteRange`]): per queue, `(from_seq, to_seq)`, the newest last.
    early_ranges: BTreeMap<(String, ShortString), Vec<(u64, u64)>>,
}

/// Range deletes remembered per queue at most ([`MemoryState::early_ranges`]).
const MAX_EARLY_RANGES: usize = 64;

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
                self.early_ranges.retain(|(vh, _), _| *vh != v);
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
                self.early_ranges.remove(&(vhost.clone(), name.clone()));
                self.messages.remove(&(vhost, name));
            }
            StoreOp::PutBinding(r) => {
                if !self.bindings.contains(&r) {
                    self.bindings.push(r);
                }
            }
            StoreOp::DeleteBinding(r) => self.bindings.retain(|b| *b != r),
            StoreOp::PutMessage { vhost, queue, seq, message } => {
                let key = (vhost, queue);
                let in_range =
                    self.early_ranges.get(&key).is_some_and(|r| r.iter().any(|&(a, b)| a <= seq && seq <= b));
                if !self.early_deletes.remove(&(key.0.clone(), key.1.clone(), seq)) && !in_range {
                    self.messages.entry(key).or_default().insert(seq, (message, false));
                }
            }
            StoreOp::DeleteRange { vhost, queue, from_seq, to_seq } => {
                let key = (vhost, queue);
                if let Some(m) = self.messages.get_mut(&key) {
                    let gone: Vec<u64> = m.range(from_seq..=to_seq).map(|(s, _)| *s).collect();
                    for s in gone {
                        m.remove(&s);
                    }
                }
                let ranges = self.early_ranges.entry(key).or_default();
                ranges.push((from_seq, to_seq));
                if ranges.len() > MAX_EARLY_RANGES {
                    ranges.remove(0);
                }
            }
            StoreOp::DeleteRun { vhost, queue, from_seq, to_seq } => {
                // One `DeleteMessage` per seq: a missing one leaves its tombstone.
                let key = (vhost, queue);
                for seq in from_seq..=to_seq {
                    if self.messages.get_mut(&key).and_then(|m| m.remove(&seq)).is_none() {
                        self.early_deletes.insert((key.0.clone(), key.1.clone(), seq));
                    }
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
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Transient messages a queue paged out do not outlive the broker.
        for m in st.messages.values_mut() {
            m.retain(|_, (msg, _)| msg.is_persistent());
        }
        st.messages.retain(|_, m| !m.is_empty());
        let queues: Vec<QueueRecord> = st.queues.values().cloned().collect();
        let pages = super::paging_queues(&queues);
        let mut messages = super::StoredMessages::new();
        let mut tails = super::StoredTails::new();
        for ((vhost, queue), m) in &st.messages {
            let mut split = WindowSplit::new(pages(vhost, queue));
            let window = m
                .iter()
                .filter(|(s, (msg, _))| split.take(**s, msg.body_size() as u64))
                .map(|(s, (msg, d))| StoredMessage { seq: *s, message: msg.clone(), delivered: *d })
                .collect();
            messages.insert((vhost.clone(), queue.clone()), window);
            if let Some(t) = split.tail() {
                tails.insert((vhost.clone(), queue.clone()), t);
            }
        }
        drop(pages);
        Ok(Snapshot {
            vhosts: st.vhosts.keys().cloned().collect(),
            exchanges: st.exchanges.values().cloned().collect(),
            queues,
            bindings: st.bindings.clone(),
            messages,
            tails,
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

    fn read_range(
        &self,
        vhost: &str,
        queue: &ShortString,
        from_seq: u64,
        max_count: usize,
        max_bytes: u64,
    ) -> ReadRange {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        let mut bytes = 0;
        if let Some(m) = st.messages.get(&(vhost.to_string(), queue.clone())) {
            for (s, (msg, d)) in m.range(from_seq..) {
                if out.len() >= max_count || (!out.is_empty() && bytes >= max_bytes) {
                    break;
                }
                bytes += msg.body_size() as u64;
                out.push(StoredMessage { seq: *s, message: msg.clone(), delivered: *d });
            }
        }
        ReadRange::done(Ok(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::FieldTable;
    use crate::queue::QueueOptions;
    use bytes::Bytes;

    fn put(q: &str, seq: u64, message: &Arc<Message>) -> StoreOp {
        StoreOp::PutMessage { vhost: "/".into(), queue: q.into(), seq, message: message.clone() }
    }
    fn persistent(body: &'static [u8]) -> Arc<Message> {
        let props = crate::message::Properties {
            delivery_mode: Some(crate::message::DeliveryMode::Persistent),
            ..Default::default()
        };
        Arc::new(Message::new("", "q", Bytes::from_static(body)).with_properties(props))
    }
    fn paging_queue(name: &str) -> StoreOp {
        StoreOp::PutQueue(QueueRecord {
            vhost: "/".into(),
            name: name.into(),
            options: QueueOptions { durable: true, ..Default::default() },
        })
    }

    #[test]
    fn read_range_reads_in_order_bounded_by_count_and_bytes() {
        let s = MemoryStore::new();
        let m = persistent(b"0123456789");
        drop(s.submit((1..=5).map(|seq| put("q", seq, &m)).chain([put("r", 9, &m)]).collect()));
        let seqs = |from, count, bytes| -> Vec<u64> {
            s.read_range("/", &"q".into(), from, count, bytes).blocking_wait().unwrap().iter().map(|m| m.seq).collect()
        };
        assert_eq!(seqs(0, 100, u64::MAX), vec![1, 2, 3, 4, 5]);
        assert_eq!(seqs(2, 2, u64::MAX), vec![2, 3]);
        assert_eq!(seqs(1, 100, 15), vec![1, 2]);
        assert_eq!(seqs(1, 100, 1), vec![1]);
        assert_eq!(seqs(6, 100, u64::MAX), Vec::<u64>::new());
    }

    #[test]
    fn delete_range_removes_the_range_and_drops_a_later_put_in_it() {
        let s = MemoryStore::new();
        let m = persistent(b"x");
        drop(s.submit((1..=5).map(|seq| put("q", seq, &m)).collect()));
        drop(s.submit(vec![StoreOp::DeleteRange { vhost: "/".into(), queue: "q".into(), from_seq: 2, to_seq: 6 }]));
        drop(s.submit(vec![put("q", 6, &m), put("q", 7, &m)]));
        let snap = s.recover().unwrap();
        let seqs: Vec<u64> = snap.messages[&("/".to_string(), "q".into())].iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![1, 7]);
    }

    #[test]
    fn delete_run_deletes_like_one_delete_per_seq_and_leaves_a_tombstone_per_missing_one() {
        let s = MemoryStore::new();
        let m = persistent(b"x");
        drop(s.submit([1, 2, 3, 5, 6].into_iter().map(|seq| put("q", seq, &m)).collect()));
        drop(s.submit(vec![StoreOp::DeleteRun { vhost: "/".into(), queue: "q".into(), from_seq: 2, to_seq: 5 }]));
        // 4 was missing: its late put is dropped; 3 was there: a new put of it is kept.
        drop(s.submit(vec![put("q", 4, &m), put("q", 3, &m)]));
        let snap = s.recover().unwrap();
        let seqs: Vec<u64> = snap.messages[&("/".to_string(), "q".into())].iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![1, 3, 6]);
    }

    #[test]
    fn recovery_returns_a_paging_queues_window_and_tail_and_deletes_transient_messages() {
        use crate::store::{TailSummary, RECOVER_WINDOW};
        let s = MemoryStore::new();
        let (m, t) = (persistent(b"12345"), Arc::new(Message::new("", "q", Bytes::from_static(b"paged"))));
        let n = RECOVER_WINDOW + 10;
        let mut ops = vec![paging_queue("q")];
        ops.extend((1..=n).map(|seq| put("q", seq, &m)));
        ops.push(put("q", n + 1, &t));
        drop(s.submit(ops));
        let snap = s.recover().unwrap();
        let window = &snap.messages[&("/".to_string(), "q".into())];
        assert_eq!(window.len() as u64, RECOVER_WINDOW);
        assert_eq!(window.last().unwrap().seq, RECOVER_WINDOW);
        let tail = snap.tails[&("/".to_string(), "q".into())];
        assert_eq!(tail, TailSummary { first_seq: RECOVER_WINDOW + 1, last_seq: n, count: 10, bytes: 50 });
        assert_eq!(s.message_count("/", "q") as u64, n);
    }

    #[tokio::test]
    async fn memory_store_applies_batches_in_order() {
        let s = MemoryStore::new();
        let m = persistent(b"x");
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
        let m = persistent(b"");
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
        let m = persistent(b"");
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

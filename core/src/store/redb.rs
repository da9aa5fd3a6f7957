//! [`RedbStore`]: durable state in one redb file, written by one thread with group commit.
//!
//! `docs/storage.md` describes the tables, the keys and the commit protocol.
//!
//! # Group commit
//!
//! [`Store::submit`] hands the batch to the writer thread over a bounded channel and returns a
//! pending [`Commit`]. The writer takes the first waiting batch and then everything else already
//! queued (up to [`MAX_GROUP_OPS`] operations or [`MAX_GROUP_BYTES`] of payload), applies them in
//! submission order in ONE write transaction with [`Durability::Immediate`] (fsync), commits,
//! and only then resolves every batch's commit — or fails them all with [`StoreError::Io`]. So
//! the more connections wait on the disk, the more each fsync carries.
//!
//! When a waited batch was submitted while the last commit ran (a stream: a lone synchronous
//! publisher only submits in answer to a commit), the writer gathers: it waits for more until
//! the group's waited batches hold [`GATHER_OPS`] operations, none came for [`GATHER_GAP`], or
//! the first of them may have waited [`GATHER_BOUND`] ([`decide`]); a flush or a read ends it at
//! once, and a gather that ended by the gap pauses gathering ([`GATHER_PAUSE`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use ::redb::{Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, Value, WriteTransaction};
use tokio::sync::oneshot;

use super::codec::{self, Reader};
use super::{
    Commit, ExchangeRecord, QueueRecord, ReadRange, SessionRecord, Snapshot, Store, StoreError, StoreOp, StoredMessage,
    WindowSplit,
};
use crate::message::{Message, ShortString};

/// `key(vhost)` → empty.
const VHOSTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("vhosts");
/// `key(vhost, name)` → kind, flags, arguments.
const EXCHANGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("exchanges");
/// `key(vhost, name)` → queue options.
const QUEUES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("queues");
/// `key(vhost, source, to_exchange, destination, routing key, arguments)` → empty.
const BINDINGS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("bindings");
/// `key(vhost, queue) ++ seq (u64 BE)` → body id, with [`DELIVERED`] set once the message was
/// handed to a consumer that must ack it. Sorted by sequence within a queue.
const MESSAGES: TableDefinition<&[u8], u64> = TableDefinition::new("messages");
/// `key(vhost, queue) ++ seq (u64 BE)`, as `MESSAGES` → a flags byte ([`QUEUED_DELIVERED`])
/// then the encoded message: a message held by one queue (the usual case), whose put and delete
/// then touch this one table. A message put in several queues in one group (a fan-out) uses
/// `MESSAGES`, `BODIES` and `BODY_REFS` instead; a key is in one of the two tables, never both.
/// Files written before this table hold every message in `MESSAGES`.
const QUEUED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("queued");
/// Body id → encoded message, stored once however many queues hold it.
const BODIES: TableDefinition<u64, &[u8]> = TableDefinition::new("bodies");
/// Body id → how many `MESSAGES` entries point at it. A body goes when its count reaches 0.
const BODY_REFS: TableDefinition<u64, u64> = TableDefinition::new("body_refs");
/// `key(vhost, key)` → encoded message.
const RETAINED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("retained");
/// `key(vhost, client id)` → a frontend's session state (opaque; MQTT encodes its own).
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
/// Run-time definitions (`StoreOp::PutSetting`): key (UTF-8) → the owner's encoding.
const SETTINGS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("settings");

/// The top bit of a `MESSAGES` value: delivered, not acked (body ids never reach 2^62).
const DELIVERED: u64 = 1 << 63;
/// The next bit of a `MESSAGES` value: a transient message a queue paged out (see
/// [`QUEUED_TRANSIENT`]).
const TRANSIENT: u64 = 1 << 62;
/// The body id in a `MESSAGES` value.
const ID_MASK: u64 = !(DELIVERED | TRANSIENT);
/// Bit of a `QUEUED` value's flags byte: delivered, not acked.
const QUEUED_DELIVERED: u8 = 1;
/// Bit of a `QUEUED` value's flags byte: a transient message, stored only because its queue
/// paged it out to disk (its tail). Recovery deletes it; it is never restored.
const QUEUED_TRANSIENT: u8 = 2;
/// Range deletes ([`StoreOp::DeleteRange`]) remembered per queue for the puts in their range
/// still to come; past it the oldest is forgotten (the cost: a purged message comes back after
/// a restart, never a loss).
const MAX_RANGE_TOMBSTONES: usize = 64;

/// Batches that may wait for the writer before `submit` blocks. A full channel means the disk
/// is behind by over a thousand batches; blocking the submitter briefly is the backpressure.
const CHANNEL_BOUND: usize = 1024;
/// A lazy batch ([`Store::submit_lazy`]: acks, delivered marks) waits at most this long for a
/// commit someone waits for before it is committed by itself. At 5,000 msgs/s with confirms the
/// publisher's commits carry them and the bound is never reached; with no publisher it makes
/// acks cost at most 50 commits a second.
pub const LAZY_BOUND: std::time::Duration = std::time::Duration::from_millis(20);
/// At most this many operations in one transaction, so one commit's latency stays bounded.
pub const MAX_GROUP_OPS: usize = 10_000;
/// At most about this many payload bytes in one transaction (4 MiB), for the same reason.
pub const MAX_GROUP_BYTES: usize = 4 << 20;
/// Early deletes remembered at most (see [`Tombstones`]).
pub const MAX_TOMBSTONES: usize = 100_000;

/// Gathering (see [`decide`] and docs/storage.md, "Gathering"): a group whose waited batches
/// hold this many operations is committed at once. A commit writes about 8 pages (32 KiB)
/// whatever it holds, so 16 messages bring that to 2 KiB each; a windowed publisher fills it
/// at once, so its rate is not held to one group per [`GATHER_BOUND`].
pub const GATHER_OPS: usize = 32;
/// ... or this many bytes ([`weight`]): past it the group's own pages outweigh the fixed ones.
pub const GATHER_BYTES: usize = 64 << 10;
/// ... or when no waited batch came for this long: the stream paused. Longer than the 1 ms
/// between the bursts of a publisher paced by a millisecond timer (tokio's, ferry-bench's).
pub const GATHER_GAP: std::time::Duration = std::time::Duration::from_micros(1500);
/// ... or when the group's first waited batch may have waited this long (counted from before
/// the previous commit, when the writer last saw the channel empty): the hard bound a gathered
/// publisher's confirm is delayed by.
pub const GATHER_BOUND: std::time::Duration = std::time::Duration::from_millis(3);
/// A gather that ended by the gap waited for nothing at its end: the stream paused, or it is a
/// closed loop (every publisher of the "stream" waits for this commit: a few synchronous ones, or
/// a window smaller than [`GATHER_OPS`]). After one, gathering waits for new evidence of a
/// stream; after this many in a row (no gather filled or reached the bound in between: a
/// closed loop, not a stream that hiccupped) it stops for [`GATHER_PAUSE`].
pub const GATHER_GAPS_TO_PAUSE: u32 = 3;
/// How long gathering stops after [`GATHER_GAPS_TO_PAUSE`] gathers ended by the gap in a row;
/// doubled each time it happens again up to [`GATHER_PAUSE_MAX`], and back at this after a gather
/// that filled or reached the bound. A closed loop thus pays [`GATHER_GAP`] three times per
/// pause, at most 9 % of its time at the first pause and under 0.3 % at the longest.
pub const GATHER_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
pub const GATHER_PAUSE_MAX: std::time::Duration = std::time::Duration::from_millis(1600);

/// Compaction pays when this many bytes of the file are free pages (and more than are in use).
pub const COMPACT_MIN_FREE_BYTES: u64 = 64 << 20;
/// The writer looks at the file's free space after this many commits, once it has been idle for
/// [`COMPACT_IDLE`] (and once after start-up): a compaction stops commits while it runs, so it
/// waits for a pause in the traffic.
const COMPACT_CHECK_EVERY: u64 = 4096;
const COMPACT_IDLE: std::time::Duration = std::time::Duration::from_secs(5);
/// redb's page cache. Every message is in memory anyway (the store is write-behind), so the cache
/// only serves the B-tree pages commits touch and the one scan at recovery; redb's default of
/// 1 GiB would only grow the process.
const CACHE_BYTES: usize = 64 << 20;

/// Where a batch's result goes: `None` for a lazy batch ([`Store::submit_lazy`]), which no one
/// waits for.
type Reply = Option<oneshot::Sender<Result<(), StoreError>>>;

/// Work for the writer thread, which owns the database.
enum Request {
    Batch {
        ops: Vec<StoreOp>,
        reply: Reply,
    },
    /// A read (recovery, statistics) run on the writer thread between groups.
    Read(Box<dyn FnOnce(&Database) + Send>),
    /// Work that needs the database to itself (a compaction): run once no reader holds it.
    Exclusive(Box<dyn FnOnce(&mut Database) + Send>),
}

/// The open database as readers on other threads share it ([`Store::read_range`]): `None` while
/// the writer has it to itself (a compaction), after a failed commit and once closed; readers
/// then go through the writer's queue.
type Shared = Arc<RwLock<Option<Arc<Database>>>>;

/// A read for the reader thread.
type ReadJob = Box<dyn FnOnce() + Send>;

/// Reads queued for the reader thread before `read_range` waits for room (each is one page-in).
const READS_BOUND: usize = 256;

/// What the store's file holds, for logs and the compaction decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileStats {
    /// The file's length (estimated from redb's page counts for a store that is no file).
    pub file_bytes: u64,
    /// Bytes of keys and values stored.
    pub stored_bytes: u64,
    /// Bytes of free pages inside the file.
    pub free_bytes: u64,
}

fn io(e: impl fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// A [`Store`] in one redb file. See the module documentation for the commit protocol.
///
/// Dropping it lets the writer thread commit every batch already submitted, then joins it and
/// closes the file.
pub struct RedbStore {
    /// `None` once closed.
    /// `None` once closed. An `ArcSwapOption`, not a lock: every submit reads it, from the
    /// publishers' and the consumers' threads at once, and a read lock's shared counter made its
    /// cache line bounce between them (the `lock cmpxchg` of `RwLock::read` was 1.7 % of a
    /// bridging Ferry's CPU samples).
    sender: arc_swap::ArcSwapOption<SyncSender<Request>>,
    /// The database for reads off the writer thread.
    shared: Shared,
    /// The reader thread's queue ([`Store::read_range`] off the writer thread); `None` once closed.
    /// One thread, not tokio's blocking pool: the messages it decodes come from one allocator
    /// arena (the pool's many threads left some 200 MB more RSS behind a drained tail).
    reads: Mutex<Option<SyncSender<ReadJob>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    transactions: Arc<AtomicU64>,
    /// Set while commits fail (the disk alarm watches it); cleared by the next good commit.
    failing: Arc<AtomicBool>,
    compactions: Arc<AtomicU64>,
    /// The file, when the store is one (its length is what `file_stats` reports).
    path: Option<std::path::PathBuf>,
    commit_stats: Arc<super::CommitStats>,
    /// Waited batches (and flushes) sent to the writer: see `Writer::submitted`.
    submitted: Arc<AtomicU64>,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore").field("transactions", &self.transactions()).finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens the store at `path`, creating the file if it does not exist. redb repairs a file
    /// that was not closed cleanly (a crash) before this returns.
    pub fn open(path: impl AsRef<Path>) -> Result<RedbStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let create = |p: &Path| Database::builder().set_cache_size(CACHE_BYTES).create(p).map_err(io);
        let db = create(&path)?;
        let reopen = {
            let path = path.clone();
            move || create(&path)
        };
        RedbStore::start(db, Box::new(reopen), Some(path), LAZY_BOUND, GATHER)
    }

    /// [`RedbStore::open`] with another bound for lazy batches (tests).
    #[cfg(test)]
    pub(crate) fn open_with_lazy_bound(
        path: impl AsRef<Path>,
        lazy_bound: std::time::Duration,
    ) -> Result<RedbStore, StoreError> {
        RedbStore::open_with(path, lazy_bound, GATHER)
    }

    /// [`RedbStore::open`] with other timings (tests).
    #[cfg(test)]
    fn open_with(
        path: impl AsRef<Path>,
        lazy_bound: std::time::Duration,
        gather: GatherRules,
    ) -> Result<RedbStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db = Database::builder().create(&path).map_err(io)?;
        let reopen = {
            let path = path.clone();
            move || Database::builder().create(&path).map_err(io)
        };
        RedbStore::start(db, Box::new(reopen), Some(path), lazy_bound, gather)
    }

    /// Opens the store over any redb storage backend (tests inject failing disks this way).
    #[cfg(test)]
    pub(crate) fn with_backend(backend: impl ::redb::StorageBackend + Clone) -> Result<RedbStore, StoreError> {
        RedbStore::with_backend_and(backend, GATHER)
    }

    /// [`RedbStore::with_backend`] with other gathering rules (tests).
    #[cfg(test)]
    fn with_backend_and(
        backend: impl ::redb::StorageBackend + Clone,
        gather: GatherRules,
    ) -> Result<RedbStore, StoreError> {
        let db = Database::builder().create_with_backend(backend.clone()).map_err(io)?;
        let reopen = move || Database::builder().create_with_backend(backend.clone()).map_err(io);
        RedbStore::start(db, Box::new(reopen), None, LAZY_BOUND, gather)
    }

    fn start(
        db: Database,
        reopen: Reopen,
        path: Option<std::path::PathBuf>,
        lazy_bound: std::time::Duration,
        gather: GatherRules,
    ) -> Result<RedbStore, StoreError> {
        // Create every table, so readers never meet a missing one, and find the next body id.
        let txn = db.begin_write().map_err(io)?;
        let next_body = {
            let tables = Tables::open(&txn)?;
            let last = tables.bodies.last().map_err(io)?.map(|(k, _)| k.value());
            last.map_or(1, |k| k + 1)
        };
        txn.commit().map_err(io)?;

        let transactions = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let compactions = Arc::new(AtomicU64::new(0));
        let commit_stats = Arc::new(super::CommitStats::default());
        let submitted = Arc::new(AtomicU64::new(0));
        let (sender, receiver) = mpsc::sync_channel(CHANNEL_BOUND);
        let db = Arc::new(db);
        let shared: Shared = Arc::new(RwLock::new(Some(db.clone())));
        let writer = Writer {
            db: Some(db),
            shared: shared.clone(),
            reopen,
            path: path.clone(),
            compact_floor: COMPACT_MIN_FREE_BYTES,
            receiver,
            transactions: transactions.clone(),
            failing: failing.clone(),
            compactions: compactions.clone(),
            commit_stats: commit_stats.clone(),
            next_body,
            tombstones: Tombstones::default(),
            ranges: HashMap::new(),
            lazy_bound,
            gatherer: Gatherer::new(gather),
            submitted: submitted.clone(),
            taken: 0,
        };
        let handle = std::thread::Builder::new().name("ferry-store".into()).spawn(move || writer.run()).map_err(io)?;
        let (reads, jobs) = mpsc::sync_channel::<ReadJob>(READS_BOUND);
        std::thread::Builder::new()
            .name("ferry-store-read".into())
            .spawn(move || {
                while let Ok(job) = jobs.recv() {
                    job();
                }
            })
            .map_err(io)?;
        Ok(RedbStore {
            sender: arc_swap::ArcSwapOption::from_pointee(sender),
            shared,
            reads: Mutex::new(Some(reads)),
            writer: Mutex::new(Some(handle)),
            transactions,
            failing,
            compactions,
            path,
            commit_stats,
            submitted,
        })
    }

    /// Compactions done since the store was opened (at open, or when the writer was idle).
    pub fn compactions(&self) -> u64 {
        self.compactions.load(Ordering::Relaxed)
    }

    /// The file's size and how much of it is in use.
    pub fn file_stats(&self) -> Result<FileStats, StoreError> {
        let mut st = self.read(file_stats)?;
        if let Some(len) = self.path.as_ref().and_then(|p| std::fs::metadata(p).ok()).map(|m| m.len()) {
            st.file_bytes = len;
        }
        Ok(st)
    }

    /// Compacts the file now if at least `min_free_bytes` of it are free pages and they are more
    /// than half of it (the writer does this by itself with [`COMPACT_MIN_FREE_BYTES`]); returns
    /// whether it compacted.
    pub fn compact(&self, min_free_bytes: u64) -> Result<bool, StoreError> {
        let compactions = self.compactions.clone();
        let path = self.path.clone();
        let (tx, rx) = mpsc::sync_channel(1);
        let request = Request::Exclusive(Box::new(move |db| {
            let _ = tx.send(Ok(compact_if_it_pays(db, min_free_bytes, path.as_deref(), &compactions).is_some()));
        }));
        {
            let sender = self.sender.load();
            let Some(sender) = sender.as_ref() else { return Err(StoreError::Closed) };
            sender.send(request).map_err(|_| StoreError::Closed)?;
        }
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Runs `f` on the writer thread (which owns the database), after everything submitted
    /// before it.
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let request = Request::Read(Box::new(move |db| {
            let _ = tx.send(f(db));
        }));
        {
            let sender = self.sender.load();
            let Some(sender) = sender.as_ref() else { return Err(StoreError::Closed) };
            sender.send(request).map_err(|_| StoreError::Closed)?;
        }
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Commits everything submitted, stops the writer and closes the file. Later submits fail
    /// with [`StoreError::Closed`].
    fn shut(&self) {
        // The reader thread ends once its queue is drained (the writer waits for its reads).
        drop(self.reads.lock().unwrap_or_else(|e| e.into_inner()).take());
        self.sender.store(None);
        if let Some(handle) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = handle.join();
        }
    }

    /// Write transactions committed so far (each is one fsync).
    pub fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }

    fn send(&self, ops: Vec<StoreOp>) -> Commit {
        let sender = self.sender.load();
        let Some(sender) = sender.as_ref() else { return Commit::done(Err(StoreError::Closed)) };
        let (reply, commit) = Commit::pending();
        // Counted before it is sent, so the writer never sees a batch it was not told of.
        self.submitted.fetch_add(1, Ordering::Relaxed);
        match sender.send(Request::Batch { ops, reply: Some(reply) }) {
            Ok(()) => commit,
            Err(_) => Commit::done(Err(StoreError::Closed)),
        }
    }

    /// Stored copies of message bodies: `BODIES` entries and `QUEUED` entries (tests).
    #[cfg(test)]
    fn body_count(&self) -> u64 {
        self.read(|db| {
            use ::redb::ReadableTableMetadata;
            let txn = db.begin_read().unwrap();
            let bodies = txn.open_table(BODIES).unwrap();
            let n = bodies.len().unwrap();
            // Every body is pointed at by as many message entries as its count says (no entry:
            // one), and every count belongs to a body.
            let mut pointing: HashMap<u64, u64> = HashMap::new();
            for item in txn.open_table(MESSAGES).unwrap().iter().unwrap() {
                *pointing.entry(item.unwrap().1.value() & ID_MASK).or_default() += 1;
            }
            let refs = txn.open_table(BODY_REFS).unwrap();
            for item in bodies.iter().unwrap() {
                let id = item.unwrap().0.value();
                let count = refs.get(id).unwrap().map_or(1, |g| g.value());
                assert_eq!(pointing.remove(&id), Some(count), "body {id}: messages and refs disagree");
            }
            assert!(pointing.is_empty(), "messages point at missing bodies: {pointing:?}");
            for item in refs.iter().unwrap() {
                let id = item.unwrap().0.value();
                assert!(bodies.get(id).unwrap().is_some(), "a count for a missing body {id}");
            }
            // A key is in one layout only.
            let queued = txn.open_table(QUEUED).unwrap();
            let messages = txn.open_table(MESSAGES).unwrap();
            for item in queued.iter().unwrap() {
                let k = item.unwrap().0;
                assert!(messages.get(k.value()).unwrap().is_none(), "a key in both layouts");
            }
            Ok(n + queued.len().unwrap())
        })
        .unwrap()
    }
}

fn file_stats(db: &Database) -> Result<FileStats, StoreError> {
    let txn = db.begin_write().map_err(io)?;
    let st = txn.stats().map_err(io)?;
    txn.abort().map_err(io)?;
    let page = st.page_size() as u64;
    let allocated = st.allocated_pages() * page;
    // redb does not report the file length; the pages it tracks plus the free ones are it.
    let free = st.fragmented_bytes();
    Ok(FileStats { file_bytes: allocated + free, stored_bytes: st.stored_bytes(), free_bytes: free })
}

/// Compacts the file when its free pages are both many (at least `min_free_bytes`) and more
/// than half of the file (its real length when `path` is known). Returns the file's length before
/// and after, when it compacted.
fn compact_if_it_pays(
    db: &mut Database,
    min_free_bytes: u64,
    path: Option<&Path>,
    compactions: &AtomicU64,
) -> Option<(u64, u64)> {
    let length = |st: &FileStats| path.and_then(|p| std::fs::metadata(p).ok()).map_or(st.file_bytes, |m| m.len());
    let before = file_stats(db).ok()?;
    let before_len = length(&before);
    if before.free_bytes < min_free_bytes || before.free_bytes < before_len / 2 {
        return None;
    }
    let started = Instant::now();
    match db.compact() {
        Ok(_) => {
            let after = file_stats(db).unwrap_or_default();
            let after_len = length(&after);
            compactions.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                before = before_len,
                after = after_len,
                stored = after.stored_bytes,
                ms = started.elapsed().as_millis() as u64,
                "store compacted"
            );
            Some((before_len, after_len))
        }
        Err(e) => {
            tracing::warn!(error = %e, "store compaction failed; carrying on uncompacted");
            None
        }
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer once it has committed everything queued.
        self.shut();
    }
}

impl Store for RedbStore {
    /// Never waits for the disk; blocks only while the writer's channel is full
    /// (`CHANNEL_BOUND`, 1,024 batches behind), which is the store's backpressure.
    fn submit(&self, ops: Vec<StoreOp>) -> Commit {
        if ops.is_empty() {
            return Commit::done(Ok(()));
        }
        self.send(ops)
    }

    fn recover(&self) -> Result<Snapshot, StoreError> {
        self.read(|db| {
            let (snap, transient) = read_snapshot(db)?;
            if !transient.is_empty() {
                delete_transient(db, &transient)?;
            }
            Ok(snap)
        })
    }

    /// Runs on the store's reader thread over a read transaction of the last commit, while the
    /// writer goes on (during a compaction, through the writer): a put not committed yet reads
    /// as missing, and the queue asks again ([`Store::read_range`]).
    fn read_range(
        &self,
        vhost: &str,
        queue: &ShortString,
        from_seq: u64,
        max_count: usize,
        max_bytes: u64,
    ) -> ReadRange {
        let (tx, range) = ReadRange::pending();
        let prefix = codec::key(&[vhost.as_bytes(), queue.as_bytes()]);
        let shared = self.shared.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(db) = shared {
            // Off the writer thread, which goes on committing meanwhile: a read transaction sees
            // the last commit (what is not committed yet reads as missing, and is asked again).
            let read: ReadJob = Box::new(move || {
                let _ = tx.send(read_range(&db, &prefix, from_seq, max_count, max_bytes));
            });
            let reads = self.reads.lock().unwrap_or_else(|e| e.into_inner()).clone();
            // A failed send drops the job and its `tx`: the range answers `Closed`.
            if let Some(reads) = reads {
                let _ = reads.send(read);
            }
            return range;
        }
        let request = Request::Read(Box::new(move |db| {
            let _ = tx.send(read_range(db, &prefix, from_seq, max_count, max_bytes));
        }));
        let sender = self.sender.load();
        if let Some(sender) = sender.as_ref() {
            // A failed send drops `tx`: the range answers `Closed`.
            let _ = sender.send(request);
        }
        range
    }

    fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    fn close(&self) {
        self.shut();
    }

    fn commit_stats(&self) -> Option<Arc<super::CommitStats>> {
        Some(self.commit_stats.clone())
    }

    /// Held by the writer until the next batch someone waits for, a read, a flush or the close,
    /// and at most [`LAZY_BOUND`]; then committed with them, in submission order.
    fn submit_lazy(&self, ops: Vec<StoreOp>) {
        if ops.is_empty() {
            return;
        }
        let sender = self.sender.load();
        if let Some(sender) = sender.as_ref() {
            let _ = sender.send(Request::Batch { ops, reply: None });
        }
    }

    /// Resolves after every batch submitted before it is committed (the channel is FIFO and the
    /// writer resolves groups in order).
    fn flush(&self) -> Commit {
        self.send(Vec::new())
    }
}

/// A key of `QUEUED` or `MESSAGES`.
type StoredKey = Vec<u8>;

/// Everything durable, with each paging queue's window and tail summary; also the keys of the
/// transient messages queues paged out, which recovery deletes.
fn read_snapshot(db: &Database) -> Result<(Snapshot, Vec<StoredKey>), StoreError> {
    let txn = db.begin_read().map_err(io)?;
    let mut snap = Snapshot::default();
    let mut transient = Vec::new();

    for item in txn.open_table(VHOSTS).map_err(io)?.iter().map_err(io)? {
        let (k, _) = item.map_err(io)?;
        let mut r = Reader::new(k.value());
        snap.vhosts.push(r.string()?);
        r.finish()?;
    }
    for item in txn.open_table(EXCHANGES).map_err(io)?.iter().map_err(io)? {
        let (k, v) = item.map_err(io)?;
        let (vhost, name) = decode_pair(k.value())?;
        let (kind, auto_delete, internal, arguments) = codec::decode_exchange(v.value())?;
        snap.exchanges.push(ExchangeRecord { vhost, name, kind, auto_delete, internal, arguments });
    }
    for item in txn.open_table(QUEUES).map_err(io)?.iter().map_err(io)? {
        let (k, v) = item.map_err(io)?;
        let (vhost, name) = decode_pair(k.value())?;
        snap.queues.push(QueueRecord { vhost, name, options: codec::decode_queue_options(v.value())? });
    }
    for item in txn.open_table(BINDINGS).map_err(io)?.iter().map_err(io)? {
        let (k, _) = item.map_err(io)?;
        snap.bindings.push(codec::decode_binding_key(k.value())?);
    }

    read_messages(&txn, &mut snap, &mut transient)?;

    for item in txn.open_table(RETAINED).map_err(io)?.iter().map_err(io)? {
        let (k, v) = item.map_err(io)?;
        let (vhost, key) = decode_pair(k.value())?;
        snap.retained.push((vhost, key, Arc::new(codec::decode_message(v.value())?)));
    }
    for item in txn.open_table(SESSIONS).map_err(io)?.iter().map_err(io)? {
        let (k, v) = item.map_err(io)?;
        let mut r = Reader::new(k.value());
        let (vhost, client_id) = (r.string()?, r.string()?);
        r.finish()?;
        snap.sessions.push(SessionRecord { vhost, client_id, state: bytes::Bytes::copy_from_slice(v.value()) });
    }
    for item in txn.open_table(SETTINGS).map_err(io)?.iter().map_err(io)? {
        let (k, v) = item.map_err(io)?;
        let key = String::from_utf8(k.value().to_vec()).map_err(|_| StoreError::Corrupt("a setting key".into()))?;
        snap.settings.push((key, bytes::Bytes::copy_from_slice(v.value())));
    }
    Ok((snap, transient))
}

/// One queue's messages while recovery reads them: the key prefix, the queue, the window read,
/// and where the tail starts.
struct QueueRun {
    prefix: Vec<u8>,
    name: (String, ShortString),
    window: Vec<StoredMessage>,
    split: WindowSplit,
}

impl QueueRun {
    fn finish(self, snap: &mut Snapshot) {
        if let Some(t) = self.split.tail() {
            snap.tails.insert(self.name.clone(), t);
        }
        if !self.window.is_empty() {
            snap.messages.insert(self.name, self.window);
        }
    }
}

/// A stored message as the merge of `QUEUED` and `MESSAGES` meets it.
enum Stored<'a> {
    /// Flags byte, encoded message.
    Queued(u8, &'a [u8]),
    /// A `MESSAGES` value (body id and flag bits).
    Shared(u64),
}

/// Walks `QUEUED` and `MESSAGES` together in key order — (vhost, queue, seq): a queue's messages
/// in sequence order, whichever table holds each (files from before `QUEUED` hold them all in
/// `MESSAGES`) — and calls `f` with each key and value.
fn merge_messages<'a>(
    queued: ::redb::Range<'a, &'static [u8], &'static [u8]>,
    messages: ::redb::Range<'a, &'static [u8], u64>,
    mut f: impl FnMut(&[u8], Stored<'_>) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let (mut qi, mut mi) = (queued, messages);
    let mut qn = qi.next().transpose().map_err(io)?;
    let mut mn = mi.next().transpose().map_err(io)?;
    loop {
        let from_queued = match (&qn, &mn) {
            (None, None) => return Ok(()),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((qk, _)), Some((mk, _))) => qk.value() <= mk.value(),
        };
        let more = if from_queued {
            let (k, v) = qn.take().expect("checked");
            let Some((&flags, encoded)) = v.value().split_first() else {
                return Err(StoreError::Corrupt("an empty queued message".into()));
            };
            let more = f(k.value(), Stored::Queued(flags, encoded))?;
            qn = qi.next().transpose().map_err(io)?;
            more
        } else {
            let (k, v) = mn.take().expect("checked");
            let more = f(k.value(), Stored::Shared(v.value()))?;
            mn = mi.next().transpose().map_err(io)?;
            more
        };
        if !more {
            return Ok(());
        }
    }
}

/// Reads each queue's window into `snap.messages` and the rest of it into `snap.tails`, in one
/// pass over the two message tables; a tail message is not decoded (its body size is read in
/// place). Bodies shared by a fan-out are decoded once (one `Arc<Message>` again).
fn read_messages(
    txn: &::redb::ReadTransaction,
    snap: &mut Snapshot,
    transient: &mut Vec<StoredKey>,
) -> Result<(), StoreError> {
    let bodies = txn.open_table(BODIES).map_err(io)?;
    let mut shared: HashMap<u64, Arc<Message>> = HashMap::new();
    let queues = std::mem::take(&mut snap.queues);
    let pages = super::paging_queues(&queues);
    let mut run: Option<QueueRun> = None;
    let queued = txn.open_table(QUEUED).map_err(io)?;
    let messages = txn.open_table(MESSAGES).map_err(io)?;
    merge_messages(queued.iter().map_err(io)?, messages.iter().map_err(io)?, |key, stored| {
        let (prefix, seq) = split_message_key(key)?;
        if run.as_ref().is_none_or(|r| r.prefix.as_slice() != prefix) {
            let (vhost, queue, _) = codec::decode_message_key(key)?;
            let split = WindowSplit::new(pages(&vhost, &queue));
            let next = QueueRun { prefix: prefix.to_vec(), name: (vhost, queue), window: Vec::new(), split };
            if let Some(done) = run.replace(next) {
                done.finish(snap);
            }
        }
        let r = run.as_mut().expect("set above");
        match stored {
            Stored::Queued(flags, _) if flags & QUEUED_TRANSIENT != 0 => transient.push(key.to_vec()),
            Stored::Shared(v) if v & TRANSIENT != 0 => transient.push(key.to_vec()),
            Stored::Queued(flags, encoded) => {
                if r.split.take(seq, codec::payload_len(encoded)?) {
                    let message = Arc::new(codec::decode_message(encoded)?);
                    r.window.push(StoredMessage { seq, message, delivered: flags & QUEUED_DELIVERED != 0 });
                }
            }
            Stored::Shared(v) => {
                let id = v & ID_MASK;
                let body = bodies.get(id).map_err(io)?;
                let Some(body) = body else {
                    return Err(StoreError::Corrupt(format!("message body {id} is missing")));
                };
                if r.split.take(seq, codec::payload_len(body.value())?) {
                    let message = match shared.get(&id) {
                        Some(m) => m.clone(),
                        None => {
                            let m = Arc::new(codec::decode_message(body.value())?);
                            shared.insert(id, m.clone());
                            m
                        }
                    };
                    r.window.push(StoredMessage { seq, message, delivered: v & DELIVERED != 0 });
                }
            }
        }
        Ok(true)
    })?;
    if let Some(done) = run {
        done.finish(snap);
    }
    drop(pages);
    snap.queues = queues;
    Ok(())
}

/// Deletes the transient messages recovery found (queues paged them out before the restart),
/// in one transaction.
fn delete_transient(db: &Database, keys: &[StoredKey]) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(io)?;
    txn.set_durability(Durability::Immediate).map_err(io)?;
    {
        let mut t = Tables::open(&txn)?;
        for k in keys {
            t.remove_message(k)?;
        }
    }
    txn.commit().map_err(io)?;
    tracing::info!(count = keys.len(), "deleted the transient messages queues had paged out");
    Ok(())
}

/// [`Store::read_range`] on the writer thread.
fn read_range(
    db: &Database,
    prefix: &[u8],
    from_seq: u64,
    max_count: usize,
    max_bytes: u64,
) -> Result<Vec<StoredMessage>, StoreError> {
    let txn = db.begin_read().map_err(io)?;
    let bodies = txn.open_table(BODIES).map_err(io)?;
    let queued = txn.open_table(QUEUED).map_err(io)?;
    let messages = txn.open_table(MESSAGES).map_err(io)?;
    let mut start = prefix.to_vec();
    start.extend_from_slice(&from_seq.to_be_bytes());
    let mut out: Vec<StoredMessage> = Vec::new();
    let mut bytes = 0u64;
    let mut shared: HashMap<u64, Arc<Message>> = HashMap::new();
    merge_messages(
        queued.range::<&[u8]>(start.as_slice()..).map_err(io)?,
        messages.range::<&[u8]>(start.as_slice()..).map_err(io)?,
        |key, stored| {
            let (p, seq) = split_message_key(key)?;
            if p != prefix || out.len() >= max_count || (!out.is_empty() && bytes >= max_bytes) {
                return Ok(false);
            }
            let (message, delivered) = match stored {
                Stored::Queued(flags, encoded) => {
                    (Arc::new(codec::decode_message(encoded)?), flags & QUEUED_DELIVERED != 0)
                }
                Stored::Shared(v) => {
                    let id = v & ID_MASK;
                    let m = match shared.get(&id) {
                        Some(m) => m.clone(),
                        None => {
                            let body = bodies.get(id).map_err(io)?;
                            let Some(body) = body else {
                                return Err(StoreError::Corrupt(format!("message body {id} is missing")));
                            };
                            let m = Arc::new(codec::decode_message(body.value())?);
                            shared.insert(id, m.clone());
                            m
                        }
                    };
                    (m, v & DELIVERED != 0)
                }
            };
            bytes += message.body_size() as u64;
            out.push(StoredMessage { seq, message, delivered });
            Ok(true)
        },
    )?;
    Ok(out)
}

fn decode_pair(k: &[u8]) -> Result<(String, ShortString), StoreError> {
    let mut r = Reader::new(k);
    let out = (r.string()?, r.short()?);
    r.finish()?;
    Ok(out)
}

/// A message's identity in the store.
type MessageId = (String, ShortString, u64);

/// `DeleteMessage`s that arrived before their `PutMessage` (see [`StoreOp::DeleteMessage`]):
/// the put that follows is dropped. Kept in memory by the writer — after a restart the put can
/// no longer come — and bounded by [`MAX_TOMBSTONES`]: past it the oldest are forgotten. A
/// tombstone only outlives its put when the put never comes (a delete for a message already
/// gone), so the bound only matters if that many such puts were still due; the cost of
/// forgetting one is that an acked message is stored and comes back after a restart, as a
/// redelivered duplicate — never a loss.
#[derive(Debug, Default)]
struct Tombstones {
    by_id: HashMap<MessageId, u64>,
    by_age: BTreeMap<u64, MessageId>,
    next: u64,
}

impl Tombstones {
    fn insert(&mut self, id: MessageId) {
        if self.by_id.contains_key(&id) {
            return;
        }
        self.next += 1;
        self.by_id.insert(id.clone(), self.next);
        self.by_age.insert(self.next, id);
        while self.by_id.len() > MAX_TOMBSTONES {
            match self.by_age.pop_first() {
                Some((_, old)) => self.by_id.remove(&old),
                None => break,
            };
        }
    }
    fn remove(&mut self, id: &MessageId) -> bool {
        match self.by_id.remove(id) {
            Some(age) => {
                self.by_age.remove(&age);
                true
            }
            None => false,
        }
    }
    /// Removes the tombstones `drop` selects, returning them.
    fn remove_where(&mut self, drop: impl Fn(&MessageId) -> bool) -> Vec<MessageId> {
        let gone: Vec<MessageId> = self.by_id.keys().filter(|id| drop(id)).cloned().collect();
        for id in &gone {
            self.remove(id);
        }
        gone
    }
}

/// A tombstone change made by a transaction, undone if it fails.
enum Undo {
    Added(MessageId),
    Removed(MessageId),
    /// A range tombstone added to the queue's list (the last one).
    RangeAdded((String, ShortString)),
    /// A queue's range tombstones removed (its queue or vhost was deleted).
    RangesRemoved((String, ShortString), Vec<(u64, u64)>),
}

struct Tables<'t> {
    vhosts: Table<'t, &'static [u8], &'static [u8]>,
    exchanges: Table<'t, &'static [u8], &'static [u8]>,
    queues: Table<'t, &'static [u8], &'static [u8]>,
    bindings: Table<'t, &'static [u8], &'static [u8]>,
    messages: Table<'t, &'static [u8], u64>,
    queued: Table<'t, &'static [u8], &'static [u8]>,
    bodies: Table<'t, u64, &'static [u8]>,
    body_refs: Table<'t, u64, u64>,
    retained: Table<'t, &'static [u8], &'static [u8]>,
    sessions: Table<'t, &'static [u8], &'static [u8]>,
    settings: Table<'t, &'static [u8], &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Tables<'t>, StoreError> {
        Ok(Tables {
            vhosts: txn.open_table(VHOSTS).map_err(io)?,
            exchanges: txn.open_table(EXCHANGES).map_err(io)?,
            queues: txn.open_table(QUEUES).map_err(io)?,
            bindings: txn.open_table(BINDINGS).map_err(io)?,
            messages: txn.open_table(MESSAGES).map_err(io)?,
            queued: txn.open_table(QUEUED).map_err(io)?,
            bodies: txn.open_table(BODIES).map_err(io)?,
            body_refs: txn.open_table(BODY_REFS).map_err(io)?,
            retained: txn.open_table(RETAINED).map_err(io)?,
            sessions: txn.open_table(SESSIONS).map_err(io)?,
            settings: txn.open_table(SETTINGS).map_err(io)?,
        })
    }

    /// Drops one reference to a body, and the body with its last one.
    /// One reference to body `id` fewer; the body goes with its last. `BODY_REFS` holds the
    /// count of a body with two references or more; no entry means one (files written before
    /// that rule have entries of 1, which read the same).
    fn unref(&mut self, id: u64) -> Result<(), StoreError> {
        let refs = self.body_refs.get(id).map_err(io)?.map(|g| g.value());
        match refs {
            Some(n) if n > 2 => {
                self.body_refs.insert(id, n - 1).map_err(io)?;
            }
            Some(2) => {
                self.body_refs.remove(id).map_err(io)?;
            }
            Some(_) => {
                self.body_refs.remove(id).map_err(io)?;
                self.bodies.remove(id).map_err(io)?;
            }
            None => {
                self.bodies.remove(id).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Removes every message of the keys starting with `prefix`, with their body references.
    fn remove_messages(&mut self, prefix: &[u8]) -> Result<(), StoreError> {
        remove_prefix(&mut self.queued, prefix)?;
        let mut gone = Vec::new();
        for item in self.messages.range::<&[u8]>(prefix..).map_err(io)? {
            let (k, v) = item.map_err(io)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            gone.push((k.value().to_vec(), v.value()));
        }
        for (k, id) in gone {
            self.messages.remove(k.as_slice()).map_err(io)?;
            self.unref(id & ID_MASK)?;
        }
        Ok(())
    }

    /// Removes the messages stored under the keys `from..=to` (one queue's, so `from` and `to`
    /// differ only in their last 8 bytes, the seq), in either layout, with their body
    /// references; `removed` gets each seq taken, in key order per table. One walk over the
    /// leaves that hold the range per table (redb's `retain_in`), where a `remove` per key
    /// descends from the root and rewrites the leaf and its branches each time: that was most of
    /// the writer's work while a queue drained its tail (docs/benchmarks.md, "Queues larger than
    /// memory").
    fn remove_message_range(&mut self, from: &[u8], to: &[u8], removed: &mut Vec<u64>) -> Result<(), StoreError> {
        let seq_of = |k: &[u8]| split_message_key(k).map_or(0, |(_, seq)| seq);
        self.queued
            .retain_in::<&[u8], _>(from..=to, |k, _| {
                removed.push(seq_of(k));
                false
            })
            .map_err(io)?;
        let mut ids = Vec::new();
        self.messages
            .retain_in::<&[u8], _>(from..=to, |k, v| {
                removed.push(seq_of(k));
                ids.push(v & ID_MASK);
                false
            })
            .map_err(io)?;
        for id in ids {
            self.unref(id)?;
        }
        Ok(())
    }

    /// Removes the message stored under `k`, in either layout; whether there was one.
    fn remove_message(&mut self, k: &[u8]) -> Result<bool, StoreError> {
        if self.queued.remove(k).map_err(io)?.is_some() {
            return Ok(true);
        }
        let removed = self.messages.remove(k).map_err(io)?.map(|g| g.value());
        match removed {
            Some(id) => {
                self.unref(id & ID_MASK)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Removes the bindings of `vhost` that `drop` selects.
    fn remove_bindings(&mut self, vhost: &str, drop: impl Fn(&super::BindingRecord) -> bool) -> Result<(), StoreError> {
        let prefix = codec::key(&[vhost.as_bytes()]);
        let mut gone = Vec::new();
        for item in self.bindings.range::<&[u8]>(prefix.as_slice()..).map_err(io)? {
            let (k, _) = item.map_err(io)?;
            let k = k.value();
            if !k.starts_with(&prefix) {
                break;
            }
            if drop(&codec::decode_binding_key(k)?) {
                gone.push(k.to_vec());
            }
        }
        for k in gone {
            self.bindings.remove(k.as_slice()).map_err(io)?;
        }
        Ok(())
    }
}

/// Removes every key of `table` that starts with `prefix`.
fn remove_prefix<V: Value + 'static>(table: &mut Table<'_, &'static [u8], V>, prefix: &[u8]) -> Result<(), StoreError> {
    let mut gone = Vec::new();
    for item in table.range::<&[u8]>(prefix..).map_err(io)? {
        let (k, _) = item.map_err(io)?;
        if !k.value().starts_with(prefix) {
            break;
        }
        gone.push(k.value().to_vec());
    }
    for k in gone {
        table.remove(k.as_slice()).map_err(io)?;
    }
    Ok(())
}

/// The writer thread's state.
/// Opens the database again (after an I/O error redb refuses every transaction until then).
type Reopen = Box<dyn FnMut() -> Result<Database, StoreError> + Send>;

struct Writer {
    /// `None` after a failed commit: the next request reopens it (redb's repair runs then).
    db: Option<Arc<Database>>,
    /// `db` for readers on other threads ([`Shared`]).
    shared: Shared,
    reopen: Reopen,
    path: Option<std::path::PathBuf>,
    /// Free bytes a compaction needs to be tried: [`COMPACT_MIN_FREE_BYTES`], raised after one
    /// that hardly shrank the file (pages in use spread over it), so it is not retried in a loop.
    compact_floor: u64,
    receiver: Receiver<Request>,
    transactions: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
    compactions: Arc<AtomicU64>,
    commit_stats: Arc<super::CommitStats>,
    /// The next body id; ids are never reused (one lost to a failed transaction is skipped).
    next_body: u64,
    tombstones: Tombstones,
    /// Range deletes kept for the puts in their range still to come ([`StoreOp::DeleteRange`]),
    /// per queue, newest last, at most [`MAX_RANGE_TOMBSTONES`] each.
    ranges: HashMap<(String, ShortString), Vec<(u64, u64)>>,
    /// [`LAZY_BOUND`], but for tests.
    lazy_bound: std::time::Duration,
    gatherer: Gatherer,
    /// Waited batches submitted ([`RedbStore::send`] counts them before sending), and taken
    /// into groups that were committed: when, as a commit's replies are about to go out, more
    /// were submitted than taken, one was submitted while the commit ran — not in answer to it,
    /// which is all a lone synchronous publisher does. That is the evidence of a stream that
    /// gathering needs ([`Gatherer::evidence`]).
    submitted: Arc<AtomicU64>,
    taken: u64,
}

/// The message an operation on a queued message names.
type MessageRef<'a> = (&'a str, &'a ShortString, u64);

fn message_ref(op: &StoreOp) -> Option<MessageRef<'_>> {
    match op {
        StoreOp::PutMessage { vhost, queue, seq, .. }
        | StoreOp::DeleteMessage { vhost, queue, seq }
        | StoreOp::MarkDelivered { vhost, queue, seq } => Some((vhost.as_str(), queue, *seq)),
        _ => None,
    }
}

/// What a group's message operations come to, found before anything is written.
///
/// - `settled`: messages put and deleted within the group: a consumer received and acked them
///   while their put waited for this commit (a consumer keeping up with its publishers, the usual
///   case). Their net effect on the file is nothing, so none of their operations is written: the
///   put, the delivered mark and the delete cost three B-tree updates each, which was most of the
///   writer's work. The publisher's confirm still waits for this commit; RabbitMQ likewise
///   confirms a persistent message that was consumed and acked before it reached the disk
///   without writing it. Only a message with exactly one put and one delete in the group counts
///   (a second put of the same key is left to the usual path); its delete still removes a copy an
///   earlier group stored under the same key (`Writer::write`). The delete must come after the
///   put: a delete before its put is a tombstone that cancels the put, whatever comes between (a
///   vhost deleted and the put made again in a new one: found by the
///   `recovers_what_the_memory_store_holds` proptest).
/// - `marked`: messages put and then marked delivered within the group, and not deleted in it (a
///   consumer with room, such as a bridge's link, took them at once): the put writes the mark
///   with the entry and the mark is not applied, one B-tree read and update fewer each.
///
/// Keyed by queue names, which clients choose: the map uses foldhash with a per-process random
/// seed (a keyed hash, as HashDoS resistance asks), which cost a third of SipHash here.
#[derive(Default)]
struct GroupPlan<'a> {
    settled: Refs<'a>,
    marked: Refs<'a>,
    /// Messages (by `Arc` pointer) put, and not settled, in more than one place in the group:
    /// a fan-out, stored once in `BODIES` with a reference count. Every other put goes in
    /// `QUEUED`.
    shared: HashSet<*const Message, foldhash::fast::RandomState>,
}

type Refs<'a> = HashSet<MessageRef<'a>, foldhash::fast::RandomState>;

impl<'a> GroupPlan<'a> {
    fn of(group: &'a [(Vec<StoreOp>, Reply)]) -> GroupPlan<'a> {
        #[derive(Clone, Copy, PartialEq, Eq)]
        enum Seen {
            Put,
            PutThenMarked,
            PutThenDeleted,
            Other,
        }
        let mut seen: HashMap<MessageRef<'a>, Seen, foldhash::fast::RandomState> = HashMap::default();
        for op in group.iter().flat_map(|(ops, _)| ops) {
            let Some(id) = message_ref(op) else { continue };
            let prior = seen.get(&id).copied();
            let next = match (prior, op) {
                (None, StoreOp::PutMessage { .. }) => Seen::Put,
                (Some(Seen::Put), StoreOp::MarkDelivered { .. }) => Seen::PutThenMarked,
                (Some(Seen::PutThenMarked), StoreOp::MarkDelivered { .. }) => Seen::PutThenMarked,
                (Some(Seen::Put | Seen::PutThenMarked), StoreOp::DeleteMessage { .. }) => Seen::PutThenDeleted,
                // A mark alone (of a message stored earlier) is applied as it comes.
                (None, StoreOp::MarkDelivered { .. }) => continue,
                _ => Seen::Other,
            };
            seen.insert(id, next);
        }
        let mut plan = GroupPlan::default();
        let mut puts: HashMap<*const Message, bool, foldhash::fast::RandomState> = HashMap::default();
        for op in group.iter().flat_map(|(ops, _)| ops) {
            if let StoreOp::PutMessage { vhost, queue, seq, message } = op {
                if seen.get(&(vhost.as_str(), queue, *seq)) == Some(&Seen::PutThenDeleted) {
                    continue;
                }
                let ptr = Arc::as_ptr(message);
                if puts.insert(ptr, true).is_some() {
                    plan.shared.insert(ptr);
                }
            }
        }
        for (id, n) in seen {
            match n {
                Seen::PutThenDeleted => {
                    plan.settled.insert(id);
                }
                Seen::PutThenMarked => {
                    plan.marked.insert(id);
                }
                Seen::Put | Seen::Other => {}
            }
        }
        plan
    }
}

/// What a batch weighs against [`MAX_GROUP_BYTES`]: payloads plus a little per operation.
fn weight(ops: &[StoreOp]) -> usize {
    ops.iter()
        .map(|op| match op {
            StoreOp::PutMessage { message, .. } | StoreOp::PutRetained { message, .. } => 64 + message.payload.len(),
            _ => 64,
        })
        .sum()
}

/// When a group that could be committed now waits for more (the constants, or other values in
/// tests).
#[derive(Debug, Clone, Copy)]
struct GatherRules {
    ops: usize,
    bytes: usize,
    gap: std::time::Duration,
    bound: std::time::Duration,
    pause: std::time::Duration,
    pause_max: std::time::Duration,
}

const GATHER: GatherRules = GatherRules {
    ops: GATHER_OPS,
    bytes: GATHER_BYTES,
    gap: GATHER_GAP,
    bound: GATHER_BOUND,
    pause: GATHER_PAUSE,
    pause_max: GATHER_PAUSE_MAX,
};

/// A group being gathered, as [`decide`] sees it.
#[derive(Debug, Clone, Copy)]
struct Gathering {
    /// No waited batch of the group was submitted before this: the writer last saw the channel
    /// empty then.
    since: Instant,
    /// When the writer last received a waited batch (or began gathering).
    last: Instant,
    /// Operations and [`weight`] of the group's waited batches.
    ops: usize,
    bytes: usize,
}

/// Why a gather ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Big enough ([`GATHER_OPS`], [`GATHER_BYTES`], or a group's maximum).
    Full,
    /// The first waiter reached [`GATHER_BOUND`].
    Bound,
    /// No waited batch for [`GATHER_GAP`].
    Gap,
    /// A flush or a read came, or the store closed: they do not wait for gathering.
    Asked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Commit(Ended),
    /// Wait for another batch until then at the latest.
    Wait(Instant),
}

/// Whether a gathered group is committed at `now`, or until when it waits for more.
fn decide(rules: &GatherRules, g: &Gathering, now: Instant) -> Decision {
    if g.ops >= rules.ops || g.bytes >= rules.bytes {
        return Decision::Commit(Ended::Full);
    }
    let bound = g.since + rules.bound;
    if now >= bound {
        return Decision::Commit(Ended::Bound);
    }
    let gap = g.last + rules.gap;
    if now >= gap {
        return Decision::Commit(Ended::Gap);
    }
    Decision::Wait(bound.min(gap))
}

/// Whether the writer gathers: from the evidence of a stream (a waited batch submitted while a
/// commit ran, which a lone synchronous publisher never gives) until a gather ends by the gap,
/// and then not for a while.
#[derive(Debug)]
struct Gatherer {
    rules: GatherRules,
    streaming: bool,
    /// Gathers ended by the gap in a row.
    gaps: u32,
    paused_until: Option<Instant>,
    /// The next pause.
    pause: std::time::Duration,
}

impl Gatherer {
    fn new(rules: GatherRules) -> Gatherer {
        Gatherer { rules, streaming: false, gaps: 0, paused_until: None, pause: rules.pause }
    }

    /// A waited batch was submitted while a commit ran.
    fn evidence(&mut self) {
        self.streaming = true;
    }

    /// Whether a group holding a waited batch waits for more.
    fn may_gather(&self, now: Instant) -> bool {
        self.streaming && self.paused_until.is_none_or(|t| now >= t)
    }

    fn ended(&mut self, why: Ended, now: Instant) {
        match why {
            Ended::Gap => {
                self.streaming = false;
                self.gaps += 1;
                if self.gaps >= GATHER_GAPS_TO_PAUSE {
                    self.gaps = 0;
                    self.paused_until = Some(now + self.pause);
                    self.pause = (self.pause * 2).min(self.rules.pause_max);
                }
            }
            Ended::Full | Ended::Bound => {
                self.gaps = 0;
                self.paused_until = None;
                self.pause = self.rules.pause;
            }
            Ended::Asked => {}
        }
    }
}

/// A `messages` / `queued` key as its queue's prefix (`key(vhost, queue)`) and its sequence.
fn split_message_key(key: &[u8]) -> Result<(&[u8], u64), StoreError> {
    let Some(n) = key.len().checked_sub(8) else {
        return Err(StoreError::Corrupt("a message key is too short".into()));
    };
    let (prefix, seq) = key.split_at(n);
    Ok((prefix, u64::from_be_bytes(seq.try_into().expect("8 bytes"))))
}

impl Writer {
    fn run(mut self) {
        self.serve();
        // Release the file: no new reader, and the ones in flight (a few milliseconds) end first.
        *self.shared.write().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(db) = self.db.take() {
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            while Arc::strong_count(&db) > 1 && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    fn serve(&mut self) {
        // `recv` fails once the store is closed and the channel drained: every batch submitted
        // before the close is committed first.
        let mut carried: Option<Request> = None;
        let mut since_check = 0u64;
        // Checked once after start-up too: a backlog drained before a restart leaves free pages.
        let mut check_due = true;
        // Lazy batches held for the next commit (see `LAZY_BOUND`), and when the first of them
        // must be committed at the latest.
        let mut held: Vec<(Vec<StoreOp>, Reply)> = Vec::new();
        let mut held_until = Instant::now();
        // When the writer last saw the channel empty: what it takes later was submitted after.
        let mut empty_at = Instant::now();
        loop {
            // No waited batch of the group was submitted before this (see `Gathering::since`).
            let mut since = empty_at;
            let first = match carried.take().map_or_else(|| self.receiver.try_recv().ok(), Some) {
                Some(r) => r,
                None if !held.is_empty() => {
                    match self.receiver.recv_timeout(held_until.saturating_duration_since(Instant::now())) {
                        Ok(r) => {
                            since = Instant::now();
                            r
                        }
                        Err(e) => {
                            self.commit_and_reply(std::mem::take(&mut held));
                            since_check += 1;
                            if e == mpsc::RecvTimeoutError::Disconnected {
                                return;
                            }
                            continue;
                        }
                    }
                }
                None if check_due => match self.receiver.recv_timeout(COMPACT_IDLE) {
                    Ok(r) => {
                        since = Instant::now();
                        r
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        check_due = false;
                        since_check = 0;
                        self.maybe_compact();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                },
                None => match self.receiver.recv() {
                    Ok(r) => {
                        since = Instant::now();
                        r
                    }
                    Err(_) => return,
                },
            };
            let (ops0, reply0) = match first {
                Request::Read(f) => {
                    // A read sees every batch submitted before it, lazy ones too.
                    if !held.is_empty() {
                        self.commit_and_reply(std::mem::take(&mut held));
                        since_check += 1;
                    }
                    // Dropping `f` unanswered tells the caller the store is closed.
                    if let Ok(db) = self.db() {
                        f(db);
                    }
                    continue;
                }
                Request::Exclusive(f) => {
                    if !held.is_empty() {
                        self.commit_and_reply(std::mem::take(&mut held));
                        since_check += 1;
                    }
                    if let Some(db) = self.db_mut() {
                        f(db);
                    }
                    self.publish();
                    continue;
                }
                Request::Batch { ops, reply } => (ops, reply),
            };
            let was_holding = !held.is_empty();
            let mut group = std::mem::take(&mut held);
            let mut ops: usize = group.iter().map(|(o, _)| o.len()).sum();
            let mut bytes: usize = group.iter().map(|(o, _)| weight(o)).sum();
            // The waited batches' operations and weight, and whether one is a flush.
            let (mut waited_ops, mut waited_bytes, mut flush) = (0, 0, false);
            let mut next = Some((ops0, reply0));
            while let Some((o, reply)) = next.take() {
                let w = weight(&o);
                if reply.is_some() {
                    flush |= o.is_empty();
                    waited_ops += o.len();
                    waited_bytes += w;
                }
                ops += o.len();
                bytes += w;
                group.push((o, reply));
                if ops >= MAX_GROUP_OPS || bytes >= MAX_GROUP_BYTES {
                    break;
                }
                match self.receiver.try_recv() {
                    Ok(Request::Batch { ops: o, reply }) => next = Some((o, reply)),
                    // A read waits for the group before it, so it sees what was submitted first.
                    Ok(read) => carried = Some(read),
                    Err(_) => empty_at = Instant::now(),
                }
            }
            // Only lazy batches, room for more and time left: hold them for the next commit
            // someone waits for (or the bound). Commits stay a prefix of what was submitted.
            if carried.is_none()
                && ops < MAX_GROUP_OPS
                && bytes < MAX_GROUP_BYTES
                && group.iter().all(|(_, reply)| reply.is_none())
            {
                if !was_holding {
                    held_until = Instant::now() + self.lazy_bound;
                }
                if Instant::now() < held_until {
                    held = group;
                    continue;
                }
            }
            // A stream of waited batches: wait for more while [`decide`] says so, unless a read
            // or a flush asks for what is there.
            if waited_ops > 0 && !flush && carried.is_none() && ops < MAX_GROUP_OPS && bytes < MAX_GROUP_BYTES {
                let now = Instant::now();
                if self.gatherer.may_gather(now) {
                    let g = Gathering { since, last: now, ops: waited_ops, bytes: waited_bytes };
                    let why = self.gather(&mut group, &mut carried, g, (ops, bytes), &mut empty_at);
                    self.gatherer.ended(why, Instant::now());
                }
            }
            self.commit_and_reply(group);
            since_check += 1;
            if since_check >= COMPACT_CHECK_EVERY {
                check_due = true;
            }
        }
    }

    /// Adds the batches that come to `group` until [`decide`] commits it, a flush or a read
    /// comes (a read is left in `carried`, after the group), the group is at its maximum or the
    /// store is closed. `(ops, bytes)` are the whole group's so far.
    fn gather(
        &mut self,
        group: &mut Vec<(Vec<StoreOp>, Reply)>,
        carried: &mut Option<Request>,
        mut g: Gathering,
        (mut ops, mut bytes): (usize, usize),
        empty_at: &mut Instant,
    ) -> Ended {
        loop {
            let now = Instant::now();
            let until = match decide(&self.gatherer.rules, &g, now) {
                Decision::Commit(why) => return why,
                Decision::Wait(until) => until,
            };
            match self.receiver.recv_timeout(until.saturating_duration_since(now)) {
                Ok(Request::Batch { ops: o, reply }) => {
                    let w = weight(&o);
                    let waited = reply.is_some();
                    let flush = waited && o.is_empty();
                    ops += o.len();
                    bytes += w;
                    if waited {
                        g.ops += o.len();
                        g.bytes += w;
                        g.last = Instant::now();
                    }
                    group.push((o, reply));
                    if flush {
                        return Ended::Asked;
                    }
                    if ops >= MAX_GROUP_OPS || bytes >= MAX_GROUP_BYTES {
                        return Ended::Full;
                    }
                }
                Ok(read) => {
                    *carried = Some(read);
                    return Ended::Asked;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => *empty_at = Instant::now(),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ended::Asked,
            }
        }
    }

    /// Commits a group (nothing to write for a group of flushes only: what came before is
    /// committed) and resolves its batches' commits.
    fn commit_and_reply(&mut self, group: Vec<(Vec<StoreOp>, Reply)>) {
        let ops: usize = group.iter().map(|(o, _)| o.len()).sum();
        let result = if ops == 0 { Ok(()) } else { self.commit(&group) };
        match &result {
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %e, batches = group.len(), "store commit failed");
                }
            }
            Ok(()) if ops > 0 => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("store commits succeed again");
                }
            }
            Ok(()) => {}
        }
        // Before the replies go out: nothing submitted by now answers this commit.
        self.taken += group.iter().filter(|(_, reply)| reply.is_some()).count() as u64;
        if self.submitted.load(Ordering::Relaxed) > self.taken {
            self.gatherer.evidence();
        }
        for (_, reply) in group {
            if let Some(reply) = reply {
                let _ = reply.send(result.clone());
            }
        }
    }

    /// The idle check: compacts when it pays, backing off when it did not shrink the file.
    fn maybe_compact(&mut self) {
        let (floor, compactions, path) = (self.compact_floor, self.compactions.clone(), self.path.clone());
        let Some(db) = self.db_mut() else {
            self.publish();
            return;
        };
        let compacted = compact_if_it_pays(db, floor, path.as_deref(), &compactions);
        self.publish();
        match compacted {
            Some((before, after)) if after > before - before / 4 => {
                // Hardly smaller: the pages in use are spread over the file. Wait for twice the
                // free space before trying again.
                self.compact_floor = floor.saturating_mul(2);
            }
            Some(_) => self.compact_floor = COMPACT_MIN_FREE_BYTES,
            None => {}
        }
    }

    /// The database, opened again if a failure closed it.
    fn db(&mut self) -> Result<&Database, StoreError> {
        if self.db.is_none() {
            let db = (self.reopen)()?;
            tracing::info!("store reopened after a failed commit");
            self.db = Some(Arc::new(db));
            self.publish();
        }
        Ok(self.db.as_deref().expect("just opened"))
    }

    /// The database to itself (a compaction): readers on other threads are turned away (they go
    /// through the writer meanwhile) and the ones in flight are waited for. [`Writer::publish`]
    /// lets them in again.
    fn db_mut(&mut self) -> Option<&mut Database> {
        self.db().ok()?;
        *self.shared.write().unwrap_or_else(|e| e.into_inner()) = None;
        let db = self.db.as_mut()?;
        while Arc::strong_count(db) > 1 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Arc::get_mut(db)
    }

    /// Shares the open database with readers on other threads again.
    fn publish(&self) {
        *self.shared.write().unwrap_or_else(|e| e.into_inner()) = self.db.clone();
    }

    /// Writes a group in one fsync'd transaction; on failure nothing of it is applied.
    fn commit(&mut self, group: &[(Vec<StoreOp>, Reply)]) -> Result<(), StoreError> {
        let mut undo = Vec::new();
        let result = self.write(group, &mut undo);
        if result.is_err() {
            // After an I/O error redb refuses everything until it is reopened: close it now, the
            // next request reopens it (and redb repairs what the failed commit left).
            self.db = None;
            self.publish();
            for u in undo.into_iter().rev() {
                match u {
                    Undo::Added(id) => {
                        self.tombstones.remove(&id);
                    }
                    Undo::Removed(id) => self.tombstones.insert(id),
                    Undo::RangeAdded(q) => {
                        if let Some(r) = self.ranges.get_mut(&q) {
                            r.pop();
                        }
                    }
                    Undo::RangesRemoved(q, r) => {
                        self.ranges.insert(q, r);
                    }
                }
            }
        }
        result
    }

    fn write(&mut self, group: &[(Vec<StoreOp>, Reply)], undo: &mut Vec<Undo>) -> Result<(), StoreError> {
        let mut txn = self.db()?.begin_write().map_err(io)?;
        txn.set_durability(Durability::Immediate).map_err(io)?;
        {
            let mut tables = Tables::open(&txn)?;
            // Bodies written in this transaction, by message pointer: puts of one `Arc<Message>`
            // (a fan-out) share one body. The pointers stay valid: `group` holds the Arcs.
            let mut bodies: HashMap<*const Message, u64, foldhash::fast::RandomState> = HashMap::default();
            let plan = GroupPlan::of(group);
            for (ops, _) in group {
                for op in ops {
                    if !plan.settled.is_empty() && message_ref(op).is_some_and(|id| plan.settled.contains(&id)) {
                        // Its put and mark are not written. The delete still removes what an
                        // earlier commit stored under the same key (a second put of a key: the
                        // proptest found it), without leaving a tombstone when there is none.
                        if let StoreOp::DeleteMessage { vhost, queue, seq } = op {
                            tables.remove_message(&codec::message_key(vhost, queue, *seq))?;
                        }
                        continue;
                    }
                    let marked = !plan.marked.is_empty() && message_ref(op).is_some_and(|id| plan.marked.contains(&id));
                    if marked && matches!(op, StoreOp::MarkDelivered { .. }) {
                        // Written with its put.
                        continue;
                    }
                    self.apply(&mut tables, op, &mut bodies, &plan, undo, marked)?;
                }
            }
        }
        let started = Instant::now();
        txn.commit().map_err(io)?;
        self.commit_stats.record(started.elapsed());
        self.transactions.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn apply(
        &mut self,
        t: &mut Tables<'_>,
        op: &StoreOp,
        bodies: &mut HashMap<*const Message, u64, foldhash::fast::RandomState>,
        plan: &GroupPlan<'_>,
        undo: &mut Vec<Undo>,
        delivered: bool,
    ) -> Result<(), StoreError> {
        const EMPTY: &[u8] = &[];
        match op {
            StoreOp::PutVhost(v) => {
                t.vhosts.insert(codec::key(&[v.as_bytes()]).as_slice(), EMPTY).map_err(io)?;
            }
            StoreOp::DeleteVhost(v) => {
                let prefix = codec::key(&[v.as_bytes()]);
                t.vhosts.remove(prefix.as_slice()).map_err(io)?;
                remove_prefix(&mut t.exchanges, &prefix)?;
                remove_prefix(&mut t.queues, &prefix)?;
                remove_prefix(&mut t.bindings, &prefix)?;
                remove_prefix(&mut t.retained, &prefix)?;
                remove_prefix(&mut t.sessions, &prefix)?;
                t.remove_messages(&prefix)?;
                undo.extend(self.tombstones.remove_where(|(vh, _, _)| vh == v).into_iter().map(Undo::Removed));
                let gone: Vec<(String, ShortString)> = self.ranges.keys().filter(|(vh, _)| vh == v).cloned().collect();
                for q in gone {
                    if let Some(r) = self.ranges.remove(&q) {
                        undo.push(Undo::RangesRemoved(q, r));
                    }
                }
            }
            StoreOp::PutExchange(r) => {
                let k = codec::key(&[r.vhost.as_bytes(), r.name.as_bytes()]);
                let v = codec::encode_exchange(&r.kind, r.auto_delete, r.internal, &r.arguments);
                t.exchanges.insert(k.as_slice(), v.as_slice()).map_err(io)?;
            }
            StoreOp::DeleteExchange { vhost, name } => {
                t.exchanges.remove(codec::key(&[vhost.as_bytes(), name.as_bytes()]).as_slice()).map_err(io)?;
                t.remove_bindings(vhost, |b| b.source == *name || (b.to_exchange && b.destination == *name))?;
            }
            StoreOp::PutQueue(r) => {
                let k = codec::key(&[r.vhost.as_bytes(), r.name.as_bytes()]);
                t.queues.insert(k.as_slice(), codec::encode_queue_options(&r.options).as_slice()).map_err(io)?;
            }
            StoreOp::DeleteQueue { vhost, name } => {
                let k = codec::key(&[vhost.as_bytes(), name.as_bytes()]);
                t.queues.remove(k.as_slice()).map_err(io)?;
                t.remove_bindings(vhost, |b| !b.to_exchange && b.destination == *name)?;
                t.remove_messages(&k)?;
                let gone = self.tombstones.remove_where(|(v, q, _)| v == vhost && q == name);
                undo.extend(gone.into_iter().map(Undo::Removed));
                let q = (vhost.clone(), name.clone());
                if let Some(r) = self.ranges.remove(&q) {
                    undo.push(Undo::RangesRemoved(q, r));
                }
            }
            StoreOp::PutBinding(r) => {
                t.bindings.insert(codec::binding_key(r).as_slice(), EMPTY).map_err(io)?;
            }
            StoreOp::DeleteBinding(r) => {
                t.bindings.remove(codec::binding_key(r).as_slice()).map_err(io)?;
            }
            StoreOp::PutMessage { vhost, queue, seq, message } => {
                if !self.tombstones.by_id.is_empty() {
                    let id = (vhost.clone(), queue.clone(), *seq);
                    if self.tombstones.remove(&id) {
                        undo.push(Undo::Removed(id));
                        return Ok(());
                    }
                }
                if !self.ranges.is_empty()
                    && self
                        .ranges
                        .get(&(vhost.clone(), queue.clone()))
                        .is_some_and(|r| r.iter().any(|&(a, b)| a <= *seq && *seq <= b))
                {
                    // Purged before it came (see `StoreOp::DeleteRange`).
                    return Ok(());
                }
                let k = codec::message_key(vhost, queue, *seq);
                let ptr = Arc::as_ptr(message);
                let transient = !message.is_persistent();
                if !plan.shared.contains(&ptr) {
                    // Held by this queue alone: the message goes in its entry, one table. A copy
                    // stored earlier under the same key in the other layout goes.
                    let flags =
                        if delivered { QUEUED_DELIVERED } else { 0 } | if transient { QUEUED_TRANSIENT } else { 0 };
                    let value = codec::encode_message_after(message, &[flags]);
                    t.queued.insert(k.as_slice(), value.as_slice()).map_err(io)?;
                    let old = t.messages.remove(k.as_slice()).map_err(io)?.map(|g| g.value());
                    if let Some(old) = old {
                        t.unref(old & ID_MASK)?;
                    }
                    return Ok(());
                }
                // A body with one reference has no `BODY_REFS` entry (see `Tables::unref`).
                let body = match bodies.get(&ptr).copied() {
                    Some(id) if t.bodies.get(id).map_err(io)?.is_some() => {
                        let n = t.body_refs.get(id).map_err(io)?.map_or(1, |g| g.value());
                        t.body_refs.insert(id, n + 1).map_err(io)?;
                        id
                    }
                    // A new body, or one this transaction already wrote and freed again.
                    id => {
                        let id = id.unwrap_or_else(|| {
                            self.next_body += 1;
                            self.next_body - 1
                        });
                        t.bodies.insert(id, codec::encode_message(message).as_slice()).map_err(io)?;
                        bodies.insert(ptr, id);
                        id
                    }
                };
                let value = body | if delivered { DELIVERED } else { 0 } | if transient { TRANSIENT } else { 0 };
                let replaced = t.messages.insert(k.as_slice(), value).map_err(io)?.map(|g| g.value());
                if let Some(old) = replaced {
                    t.unref(old & ID_MASK)?;
                }
                t.queued.remove(k.as_slice()).map_err(io)?;
            }
            StoreOp::DeleteMessage { vhost, queue, seq } => {
                let k = codec::message_key(vhost, queue, *seq);
                match t.remove_message(&k)? {
                    true => {}
                    false => {
                        let id = (vhost.clone(), queue.clone(), *seq);
                        if !self.tombstones.by_id.contains_key(&id) {
                            self.tombstones.insert(id.clone());
                            undo.push(Undo::Added(id));
                        }
                    }
                }
            }
            StoreOp::DeleteRun { vhost, queue, from_seq, to_seq } => {
                let (from, to) =
                    (codec::message_key(vhost, queue, *from_seq), codec::message_key(vhost, queue, *to_seq));
                let mut removed = Vec::new();
                t.remove_message_range(&from, &to, &mut removed)?;
                if (removed.len() as u64) <= to_seq.saturating_sub(*from_seq) {
                    // Some were not there: a tombstone each, as a `DeleteMessage` leaves.
                    removed.sort_unstable();
                    for seq in *from_seq..=*to_seq {
                        if removed.binary_search(&seq).is_err() {
                            let id = (vhost.clone(), queue.clone(), seq);
                            if !self.tombstones.by_id.contains_key(&id) {
                                self.tombstones.insert(id.clone());
                                undo.push(Undo::Added(id));
                            }
                        }
                    }
                }
            }
            StoreOp::DeleteRange { vhost, queue, from_seq, to_seq } => {
                let (from, to) =
                    (codec::message_key(vhost, queue, *from_seq), codec::message_key(vhost, queue, *to_seq));
                t.remove_message_range(&from, &to, &mut Vec::new())?;
                let q = (vhost.clone(), queue.clone());
                let ranges = self.ranges.entry(q.clone()).or_default();
                if ranges.len() >= MAX_RANGE_TOMBSTONES {
                    // Forgotten for good (not undone with a failed transaction: at worst a purged
                    // message comes back after a restart).
                    ranges.remove(0);
                }
                ranges.push((*from_seq, *to_seq));
                undo.push(Undo::RangeAdded(q));
            }
            StoreOp::MarkDelivered { vhost, queue, seq } => {
                let k = codec::message_key(vhost, queue, *seq);
                let inline = t.queued.get(k.as_slice()).map_err(io)?.map(|g| {
                    let v = g.value();
                    (v.first().is_some_and(|f| f & QUEUED_DELIVERED == 0)).then(|| v.to_vec())
                });
                if let Some(value) = inline {
                    if let Some(mut value) = value {
                        value[0] |= QUEUED_DELIVERED;
                        t.queued.insert(k.as_slice(), value.as_slice()).map_err(io)?;
                    }
                    return Ok(());
                }
                let current = t.messages.get(k.as_slice()).map_err(io)?.map(|g| g.value());
                if let Some(id) = current.filter(|id| id & DELIVERED == 0) {
                    t.messages.insert(k.as_slice(), id | DELIVERED).map_err(io)?;
                }
            }
            StoreOp::PutSession { vhost, client_id, state } => {
                let k = codec::key(&[vhost.as_bytes(), client_id.as_bytes()]);
                t.sessions.insert(k.as_slice(), state.as_ref()).map_err(io)?;
            }
            StoreOp::DeleteSession { vhost, client_id } => {
                t.sessions.remove(codec::key(&[vhost.as_bytes(), client_id.as_bytes()]).as_slice()).map_err(io)?;
            }
            StoreOp::PutSetting { key, value } => {
                t.settings.insert(key.as_bytes(), value.as_ref()).map_err(io)?;
            }
            StoreOp::DeleteSetting { key } => {
                t.settings.remove(key.as_bytes()).map_err(io)?;
            }
            StoreOp::PutRetained { vhost, key, message } => {
                let k = codec::key(&[vhost.as_bytes(), key.as_bytes()]);
                t.retained.insert(k.as_slice(), codec::encode_message(message).as_slice()).map_err(io)?;
            }
            StoreOp::DeleteRetained { vhost, key } => {
                t.retained.remove(codec::key(&[vhost.as_bytes(), key.as_bytes()]).as_slice()).map_err(io)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{FieldTable, FieldValue, Properties};
    use crate::queue::QueueOptions;
    use crate::store::BindingRecord;
    use ::redb::StorageBackend;
    use bytes::Bytes;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(30);

    async fn commit(s: &RedbStore, ops: Vec<StoreOp>) {
        tokio::time::timeout(WAIT, s.submit(ops).wait()).await.expect("commit timed out").expect("commit failed");
    }

    fn msg(body: &'static [u8]) -> Arc<Message> {
        let mut headers = FieldTable::new();
        headers.insert("n", FieldValue::I64(-3));
        headers.insert("s", FieldValue::string("x"));
        let props = Properties {
            headers: Some(headers),
            delivery_mode: Some(crate::message::DeliveryMode::Persistent),
            ..Default::default()
        }
        .with_more(crate::message::MoreProperties { message_id: Some("id".into()), ..Default::default() });
        Arc::new(Message::new("amq.topic", "a.b", Bytes::from_static(body)).with_properties(props).at(1234))
    }

    /// A transient message, as a queue pages one out.
    fn transient(body: &'static [u8]) -> Arc<Message> {
        Arc::new(Message::new("", "q", Bytes::from_static(body)).at(1234))
    }

    fn put(q: &str, seq: u64, m: &Arc<Message>) -> StoreOp {
        StoreOp::PutMessage { vhost: "/".into(), queue: q.into(), seq, message: m.clone() }
    }
    fn del(q: &str, seq: u64) -> StoreOp {
        StoreOp::DeleteMessage { vhost: "/".into(), queue: q.into(), seq }
    }
    fn queue(vhost: &str, name: &str) -> QueueRecord {
        let mut arguments = FieldTable::new();
        arguments.insert("x-max-length", FieldValue::I32(10));
        QueueRecord {
            vhost: vhost.into(),
            name: name.into(),
            options: QueueOptions { durable: true, arguments, ..Default::default() },
        }
    }
    fn exchange(vhost: &str, name: &str) -> ExchangeRecord {
        ExchangeRecord {
            vhost: vhost.into(),
            name: name.into(),
            kind: "topic".into(),
            auto_delete: false,
            internal: true,
            arguments: [("alternate-exchange".into(), FieldValue::string("ae"))].into_iter().collect(),
        }
    }
    fn binding(vhost: &str, source: &str, to_exchange: bool, dest: &str, key: &str) -> BindingRecord {
        BindingRecord {
            vhost: vhost.into(),
            source: source.into(),
            to_exchange,
            destination: dest.into(),
            routing_key: key.into(),
            arguments: FieldTable::new(),
        }
    }
    fn seqs(snap: &Snapshot, q: &str) -> Vec<u64> {
        snap.messages.get(&("/".to_string(), q.into())).map_or(vec![], |m| m.iter().map(|m| m.seq).collect())
    }
    fn reopen(dir: &tempfile::TempDir) -> RedbStore {
        RedbStore::open(dir.path().join("ferry.redb")).unwrap()
    }

    #[tokio::test]
    async fn every_put_survives_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let m = msg(b"hello");
        let r = msg(b"retained");
        {
            let s = reopen(&dir);
            commit(
                &s,
                vec![
                    StoreOp::PutVhost("/".into()),
                    StoreOp::PutVhost("other".into()),
                    StoreOp::PutExchange(exchange("/", "ex")),
                    StoreOp::PutQueue(queue("/", "q")),
                    StoreOp::PutBinding(binding("/", "ex", false, "q", "a.#")),
                    StoreOp::PutBinding(binding("/", "amq.topic", true, "ex", "b.*")),
                    put("q", 7, &m),
                    put("q", 3, &m),
                    StoreOp::PutRetained { vhost: "/".into(), key: "t/1".into(), message: r.clone() },
                ],
            )
            .await;
        }
        let snap = reopen(&dir).recover().unwrap();
        assert_eq!(snap.vhosts, vec!["/".to_string(), "other".to_string()]);
        assert_eq!(snap.exchanges, vec![exchange("/", "ex")]);
        assert_eq!(snap.queues, vec![queue("/", "q")]);
        let mut bindings = snap.bindings.clone();
        bindings.sort_by_key(|b| b.source.clone());
        assert_eq!(bindings, vec![binding("/", "amq.topic", true, "ex", "b.*"), binding("/", "ex", false, "q", "a.#")]);
        assert_eq!(seqs(&snap, "q"), vec![3, 7]);
        let msgs = &snap.messages[&("/".to_string(), "q".into())];
        assert_eq!(*msgs[0].message, *m);
        assert!(Arc::ptr_eq(&msgs[0].message, &msgs[1].message), "one body comes back as one Arc");
        assert_eq!(snap.retained.len(), 1);
        assert_eq!((snap.retained[0].0.as_str(), &snap.retained[0].1), ("/", &ShortString::from("t/1")));
        assert_eq!(*snap.retained[0].2, *r);
    }

    #[tokio::test]
    async fn settings_are_replaced_deleted_and_survive_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let put = |k: &str, v: &'static [u8]| StoreOp::PutSetting { key: k.into(), value: Bytes::from_static(v) };
        {
            let s = reopen(&dir);
            commit(&s, vec![put("user/a", b"1"), put("user/b", b"2"), put("permission/a", b"3")]).await;
            commit(&s, vec![put("user/a", b"one"), StoreOp::DeleteSetting { key: "user/b".into() }]).await;
        }
        let snap = reopen(&dir).recover().unwrap();
        assert_eq!(
            snap.settings,
            vec![
                ("permission/a".to_string(), Bytes::from_static(b"3")),
                ("user/a".to_string(), Bytes::from_static(b"one"))
            ]
        );
    }

    #[tokio::test]
    async fn delivered_marks_and_sessions_survive_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let m = msg(b"x");
        let mark = |seq| StoreOp::MarkDelivered { vhost: "/".into(), queue: "q".into(), seq };
        let session = |c: &str, b: &'static [u8]| StoreOp::PutSession {
            vhost: "/".into(),
            client_id: c.into(),
            state: Bytes::from_static(b),
        };
        {
            let s = reopen(&dir);
            // A mark before its put does nothing; a mark of a deleted message neither.
            commit(&s, vec![mark(1), put("q", 1, &m), put("q", 2, &m), put("q", 3, &m), mark(2), mark(2)]).await;
            commit(&s, vec![del("q", 3), mark(3), session("c1", b"one"), session("c2", b"two")]).await;
            commit(
                &s,
                vec![session("c1", b"uno"), StoreOp::DeleteSession { vhost: "/".into(), client_id: "c2".into() }],
            )
            .await;
        }
        let s = reopen(&dir);
        let snap = s.recover().unwrap();
        let msgs: Vec<(u64, bool)> =
            snap.messages[&("/".to_string(), "q".into())].iter().map(|m| (m.seq, m.delivered)).collect();
        assert_eq!(msgs, vec![(1, false), (2, true)]);
        assert_eq!(
            snap.sessions,
            vec![SessionRecord { vhost: "/".into(), client_id: "c1".into(), state: Bytes::from_static(b"uno") }]
        );
        // A delivered message's body goes with it.
        commit(&s, vec![del("q", 2), del("q", 1)]).await;
        assert_eq!(s.body_count(), 0);
    }

    #[tokio::test]
    async fn a_drained_backlog_is_compacted_away_and_steady_churn_does_not_grow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(&dir);
        let body: &'static [u8] = Box::leak(vec![7u8; 8 * 1024].into_boxed_slice());
        let m = msg(body);
        // A standing backlog of 200 messages, churned through 10 times.
        let mut sizes = Vec::new();
        for round in 0..10u64 {
            let puts = (0..200).map(|i| put("q", round * 200 + i, &Arc::new((*m).clone()))).collect();
            commit(&s, puts).await;
            if round > 0 {
                commit(&s, (0..200).map(|i| del("q", (round - 1) * 200 + i)).collect()).await;
            }
            sizes.push(s.file_stats().unwrap().file_bytes);
        }
        // Freed pages are reused: after the first rounds the file stops growing.
        assert!(sizes[9] <= sizes[3] + sizes[3] / 4, "file keeps growing under churn: {sizes:?}");
        // A big backlog, drained: mostly free pages, which a compaction gives back.
        commit(&s, (0..2000).map(|i| put("big", i, &Arc::new((*m).clone()))).collect()).await;
        commit(&s, (0..2000).map(|i| del("big", i)).collect()).await;
        let before = s.file_stats().unwrap();
        assert!(before.free_bytes > before.file_bytes / 2, "{before:?}");
        assert!(!s.compact(u64::MAX).unwrap(), "not worth it under the threshold");
        assert!(s.compact(1 << 20).unwrap());
        let after = s.file_stats().unwrap();
        assert!(after.file_bytes < before.file_bytes / 2, "{before:?} -> {after:?}");
        assert_eq!(s.compactions(), 1);
        assert_eq!(seqs(&s.recover().unwrap(), "q").len(), 200, "compaction keeps what is stored");
    }

    #[tokio::test]
    async fn every_delete_survives_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let m = msg(b"x");
        {
            let s = reopen(&dir);
            commit(
                &s,
                vec![
                    StoreOp::PutVhost("/".into()),
                    StoreOp::PutVhost("gone".into()),
                    StoreOp::PutQueue(queue("gone", "q")),
                    StoreOp::PutExchange(exchange("/", "ex")),
                    StoreOp::PutExchange(exchange("/", "ex2")),
                    StoreOp::PutQueue(queue("/", "q")),
                    StoreOp::PutQueue(queue("/", "q2")),
                    StoreOp::PutBinding(binding("/", "ex", false, "q", "k")),
                    StoreOp::PutBinding(binding("/", "ex2", true, "ex", "k")),
                    StoreOp::PutBinding(binding("/", "ex2", false, "q2", "k1")),
                    StoreOp::PutBinding(binding("/", "ex2", false, "q2", "k2")),
                    StoreOp::PutBinding(binding("/", "ex2", false, "q", "k")),
                    put("q", 1, &m),
                    put("q", 2, &m),
                    put("q2", 1, &m),
                    StoreOp::PutRetained { vhost: "/".into(), key: "t".into(), message: m.clone() },
                    StoreOp::PutRetained { vhost: "gone".into(), key: "t".into(), message: m.clone() },
                ],
            )
            .await;
            commit(
                &s,
                vec![
                    StoreOp::DeleteVhost("gone".into()),
                    // Drops `ex` and the bindings to and from it.
                    StoreOp::DeleteExchange { vhost: "/".into(), name: "ex".into() },
                    // Drops `q2`, its message and the bindings to it.
                    StoreOp::DeleteQueue { vhost: "/".into(), name: "q2".into() },
                    StoreOp::DeleteBinding(binding("/", "ex2", false, "q", "k")),
                    del("q", 1),
                    StoreOp::DeleteRetained { vhost: "/".into(), key: "t".into() },
                ],
            )
            .await;
        }
        let s = reopen(&dir);
        let snap = s.recover().unwrap();
        assert_eq!(snap.vhosts, vec!["/".to_string()]);
        assert_eq!(snap.exchanges, vec![exchange("/", "ex2")]);
        assert_eq!(snap.queues, vec![queue("/", "q")]);
        assert!(snap.bindings.is_empty(), "{:?}", snap.bindings);
        assert_eq!(seqs(&snap, "q"), vec![2]);
        assert_eq!(snap.messages.len(), 1);
        assert!(snap.retained.is_empty());
        assert_eq!(s.body_count(), 1);
    }

    #[tokio::test]
    async fn a_fan_out_stores_its_body_once_until_the_last_reference_goes() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(&dir);
        let m = msg(b"fan-out");
        let other = msg(b"fan-out"); // equal, but another Arc: its own body
        commit(&s, vec![put("a", 1, &m), put("b", 1, &m), put("c", 1, &m), put("d", 1, &other)]).await;
        assert_eq!(s.body_count(), 2);
        commit(&s, vec![del("a", 1), del("b", 1)]).await;
        assert_eq!(s.body_count(), 2);
        drop(s);
        let s = reopen(&dir);
        assert_eq!(seqs(&s.recover().unwrap(), "c"), vec![1]);
        commit(&s, vec![del("c", 1)]).await;
        assert_eq!(s.body_count(), 1);
        commit(&s, vec![StoreOp::DeleteQueue { vhost: "/".into(), name: "d".into() }]).await;
        assert_eq!(s.body_count(), 0);
        assert!(s.recover().unwrap().messages.is_empty());
    }

    #[tokio::test]
    async fn body_ids_are_not_reused_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (m1, m2) = (msg(b"one"), msg(b"two"));
        {
            let s = reopen(&dir);
            commit(&s, vec![put("q", 1, &m1)]).await;
        }
        let s = reopen(&dir);
        commit(&s, vec![put("q", 2, &m2)]).await;
        let snap = s.recover().unwrap();
        let msgs = &snap.messages[&("/".to_string(), "q".into())];
        assert_eq!((&*msgs[0].message, &*msgs[1].message), (&*m1, &*m2));
    }

    #[tokio::test]
    async fn a_delete_before_its_put_cancels_the_put() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(&dir);
        let m = msg(b"early");
        commit(&s, vec![del("q", 9)]).await;
        commit(&s, vec![put("q", 9, &m), put("q", 10, &m)]).await;
        // In one batch too.
        commit(&s, vec![del("q", 11), put("q", 11, &m)]).await;
        drop(s);
        let s = reopen(&dir);
        assert_eq!(seqs(&s.recover().unwrap(), "q"), vec![10]);
        assert_eq!(s.body_count(), 1);
    }

    #[tokio::test]
    async fn a_message_put_and_acked_within_one_group_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(&dir);
        let (a, b) = (msg(b"acked"), msg(b"kept"));
        let mark = |q: &str, seq| StoreOp::MarkDelivered { vhost: "/".into(), queue: q.into(), seq };
        // One batch: `a` is put in two queues and acked in one; `b` is put and marked only.
        commit(&s, vec![put("q", 1, &a), put("r", 1, &a), mark("q", 1), put("q", 2, &b), mark("q", 2), del("q", 1)])
            .await;
        let group = [(vec![put("q", 1, &a), mark("q", 1), del("q", 1), put("q", 2, &b), mark("q", 2)], None)];
        let plan = GroupPlan::of(&group);
        assert_eq!((plan.settled.len(), plan.marked.len()), (1, 1), "q 1 settled, q 2 marked with its put");
        // A delete before its put is a tombstone, not a settled message; a mark before its put
        // is not written with it.
        let group = [(vec![del("q", 1), put("q", 1, &a), mark("q", 2), put("q", 2, &b)], None)];
        let plan = GroupPlan::of(&group);
        assert!(plan.settled.is_empty() && plan.marked.is_empty());
        // Put and delete in different groups take the usual path.
        commit(&s, vec![put("q", 3, &a)]).await;
        commit(&s, vec![del("q", 3)]).await;
        drop(s);
        let s = reopen(&dir);
        let snap = s.recover().unwrap();
        assert_eq!((seqs(&snap, "q"), seqs(&snap, "r")), (vec![2], vec![1]));
        // `a`'s body once (for r), `b`'s once; the delivered mark of `b` was written.
        assert_eq!(s.body_count(), 2);
        assert!(snap.messages[&("/".to_string(), "q".into())][0].delivered);
    }

    #[tokio::test]
    async fn tombstones_are_bounded_oldest_first() {
        let mut t = Tombstones::default();
        for seq in 0..(MAX_TOMBSTONES as u64 + 10) {
            t.insert(("/".into(), "q".into(), seq));
        }
        assert_eq!(t.by_id.len(), MAX_TOMBSTONES);
        assert_eq!(t.by_age.len(), MAX_TOMBSTONES);
        assert!(!t.remove(&("/".into(), "q".into(), 9)));
        assert!(t.remove(&("/".into(), "q".into(), 10)));
    }

    #[tokio::test]
    async fn group_commit_puts_many_batches_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(reopen(&dir));
        let m = msg(b"g");
        let commits: Vec<Commit> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4u64)
                .map(|t| {
                    let (s, m) = (&s, &m);
                    scope.spawn(move || {
                        (0..250u64).map(|i| s.submit(vec![put("q", t * 1000 + i, m)])).collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(commits.len(), 1000);
        for c in commits {
            tokio::time::timeout(WAIT, c.wait()).await.unwrap().unwrap();
        }
        let txns = s.transactions();
        assert!(txns < 200, "1000 batches took {txns} transactions");
        assert_eq!(s.recover().unwrap().messages[&("/".to_string(), "q".into())].len(), 1000);
    }

    #[tokio::test]
    async fn a_resolved_commit_is_on_disk_after_a_drop() {
        let dir = tempfile::tempdir().unwrap();
        let m = msg(b"durable");
        {
            let s = reopen(&dir);
            let c = s.submit(vec![StoreOp::PutQueue(queue("/", "q")), put("q", 1, &m)]);
            assert!(!c.is_done(), "a disk commit cannot be done before the writer ran");
            tokio::time::timeout(WAIT, c.wait()).await.unwrap().unwrap();
            // Batches still pending at drop are committed too.
            let _unwaited = s.submit(vec![put("q", 2, &m)]);
        }
        let snap = reopen(&dir).recover().unwrap();
        assert_eq!(snap.queues.len(), 1);
        assert_eq!(seqs(&snap, "q"), vec![1, 2]);
    }

    #[tokio::test]
    async fn a_lazy_batch_waits_for_the_next_waited_commit_and_is_durable_after_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.redb");
        let m = msg(b"lazy");
        let s = RedbStore::open_with_lazy_bound(&path, Duration::from_secs(3600)).unwrap();
        s.submit_lazy(vec![put("q", 1, &m)]);
        s.submit_lazy(vec![put("q", 2, &m), del("q", 1)]);
        // Nothing waits for them: no commit of their own (a store that committed them at once
        // would have by now).
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(s.transactions(), 0);
        // They ride with the next commit someone waits for, in submission order.
        commit(&s, vec![put("q", 3, &m)]).await;
        assert_eq!(s.transactions(), 1);
        assert_eq!(seqs(&s.recover().unwrap(), "q"), vec![2, 3]);
        assert_eq!(s.transactions(), 1, "nothing was left to commit for the read");
        // One left held at the close is committed by it.
        s.submit_lazy(vec![del("q", 2)]);
        drop(s);
        let s = reopen(&dir);
        assert_eq!(seqs(&s.recover().unwrap(), "q"), vec![3]);
    }

    #[tokio::test]
    async fn a_lazy_batch_alone_is_committed_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(&dir);
        s.submit_lazy(vec![put("q", 1, &(msg(b"alone")))]);
        // No other submit, read or flush comes: only the bound commits it.
        tokio::time::timeout(WAIT, async {
            while s.transactions() == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the lazy batch was never committed by itself");
        assert_eq!(seqs(&s.recover().unwrap(), "q"), vec![1]);
    }

    /// Entries in `MESSAGES`, `QUEUED` and `BODIES`.
    fn table_lens(s: &RedbStore) -> (u64, u64, u64) {
        s.read(|db| {
            use ::redb::ReadableTableMetadata;
            let txn = db.begin_read().unwrap();
            Ok((
                txn.open_table(MESSAGES).unwrap().len().unwrap(),
                txn.open_table(QUEUED).unwrap().len().unwrap(),
                txn.open_table(BODIES).unwrap().len().unwrap(),
            ))
        })
        .unwrap()
    }

    #[tokio::test]
    async fn a_message_of_one_queue_is_stored_in_its_entry_and_a_fan_out_shares_a_body() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(&dir);
        let (one, fan) = (msg(b"one"), msg(b"fan"));
        commit(&s, vec![put("q", 1, &one), put("q", 2, &fan), put("r", 1, &fan)]).await;
        // `one` in `QUEUED` alone; `fan` twice in `MESSAGES` over one body.
        assert_eq!(table_lens(&s), (2, 1, 1));
        let mark = StoreOp::MarkDelivered { vhost: "/".into(), queue: "q".into(), seq: 1 };
        commit(&s, vec![mark]).await;
        drop(s);
        let s = reopen(&dir);
        let snap = s.recover().unwrap();
        let q = &snap.messages[&("/".to_string(), "q".into())];
        assert_eq!((q[0].seq, q[0].delivered, &q[0].message), (1, true, &one));
        assert_eq!((q[1].seq, q[1].delivered, &q[1].message), (2, false, &fan));
        assert!(Arc::ptr_eq(&q[1].message, &snap.messages[&("/".to_string(), "r".into())][0].message));
        commit(&s, vec![del("q", 1), del("q", 2)]).await;
        assert_eq!(table_lens(&s), (1, 0, 1));
        commit(&s, vec![del("r", 1)]).await;
        assert_eq!(table_lens(&s), (0, 0, 0));
    }

    #[tokio::test]
    async fn a_file_in_the_old_layout_recovers_exactly_and_takes_new_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (msg(b"a"), msg(b"b"), msg(b"c"));
        {
            // Every message in `MESSAGES` over `BODIES`, as files before `QUEUED` were; `b`'s
            // count of 1 as files before the no-entry-for-one rule hold them.
            let db = Database::create(dir.path().join("ferry.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut messages = txn.open_table(MESSAGES).unwrap();
                let mut bodies = txn.open_table(BODIES).unwrap();
                let mut refs = txn.open_table(BODY_REFS).unwrap();
                bodies.insert(1, codec::encode_message(&a).as_slice()).unwrap();
                bodies.insert(2, codec::encode_message(&b).as_slice()).unwrap();
                refs.insert(1, 2).unwrap();
                refs.insert(2, 1).unwrap();
                let k = |q: &str, seq| codec::message_key("/", &q.into(), seq);
                messages.insert(k("q", 1).as_slice(), 1).unwrap();
                messages.insert(k("r", 1).as_slice(), 1).unwrap();
                messages.insert(k("q", 2).as_slice(), 2 | DELIVERED).unwrap();
            }
            txn.commit().unwrap();
        }
        let s = reopen(&dir);
        let snap = s.recover().unwrap();
        let q = &snap.messages[&("/".to_string(), "q".into())];
        let r = &snap.messages[&("/".to_string(), "r".into())];
        assert_eq!(q.len(), 2);
        assert_eq!((q[0].seq, q[0].delivered, &q[0].message), (1, false, &a));
        assert_eq!((q[1].seq, q[1].delivered, &q[1].message), (2, true, &b));
        assert_eq!((r.len(), r[0].seq, r[0].delivered), (1, 1, false));
        assert!(Arc::ptr_eq(&q[0].message, &r[0].message), "a shared body comes back shared");
        // New messages go in the new layout, between and after the old ones in sequence order;
        // marks and deletes find the old entries.
        let mark = |q: &str, seq| StoreOp::MarkDelivered { vhost: "/".into(), queue: q.into(), seq };
        commit(&s, vec![put("q", 3, &c), put("r", 0, &msg(b"d")), mark("q", 1), del("r", 1)]).await;
        assert_eq!(table_lens(&s), (2, 2, 2));
        drop(s);
        let s = reopen(&dir);
        let snap = s.recover().unwrap();
        let q = &snap.messages[&("/".to_string(), "q".into())];
        let seen: Vec<(u64, bool)> = q.iter().map(|m| (m.seq, m.delivered)).collect();
        assert_eq!(seen, vec![(1, true), (2, true), (3, false)]);
        assert_eq!(q[2].message, c);
        assert_eq!(seqs(&snap, "r"), vec![0]);
        assert_eq!(s.body_count(), 4);
        commit(&s, vec![del("q", 1), del("q", 2), del("q", 3), del("r", 0)]).await;
        assert_eq!(s.body_count(), 0);
    }

    #[tokio::test]
    async fn flush_resolves_after_everything_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(&dir);
        let m = msg(b"f");
        let before: Vec<Commit> = (0..50).map(|i| s.submit(vec![put("q", i, &m)])).collect();
        tokio::time::timeout(WAIT, s.flush().wait()).await.unwrap().unwrap();
        // Everything before the flush is resolved now, so `try`-style polling sees it at once.
        for c in before {
            tokio::time::timeout(Duration::from_millis(1), c.wait()).await.unwrap().unwrap();
        }
        assert_eq!(seqs(&s.recover().unwrap(), "q").len(), 50);
    }

    #[test]
    fn opening_an_impossible_path_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"not a directory").unwrap();
        assert!(matches!(RedbStore::open(file.join("ferry.redb")), Err(StoreError::Io(_))));
    }

    /// A disk that fails writes and syncs while `fail` is set.
    #[derive(Debug, Clone)]
    struct FailingDisk {
        inner: Arc<::redb::backends::InMemoryBackend>,
        fail: Arc<AtomicBool>,
    }

    impl FailingDisk {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.fail.load(Ordering::SeqCst) {
                Err(std::io::Error::other("injected disk failure"))
            } else {
                Ok(())
            }
        }
    }

    impl StorageBackend for FailingDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    #[tokio::test]
    async fn a_failing_disk_fails_commits_without_panicking() {
        let fail = Arc::new(AtomicBool::new(false));
        let s = RedbStore::with_backend(FailingDisk { inner: Default::default(), fail: fail.clone() }).unwrap();
        let m = msg(b"doomed");
        commit(&s, vec![put("q", 1, &m)]).await;
        fail.store(true, Ordering::SeqCst);
        let commits: Vec<Commit> = (2..20).map(|i| s.submit(vec![put("q", i, &m)])).collect();
        for c in commits {
            let r = tokio::time::timeout(WAIT, c.wait()).await.unwrap();
            assert!(matches!(r, Err(StoreError::Io(_))), "{r:?}");
        }
        let r = tokio::time::timeout(WAIT, s.submit(vec![del("q", 1)]).wait()).await.unwrap();
        assert!(matches!(r, Err(StoreError::Io(_))), "{r:?}");
        assert!(s.is_failing(), "the disk alarm sees the failure");
        // What was committed before the failure is still there; nothing after it is.
        fail.store(false, Ordering::SeqCst);
        assert_eq!(seqs(&s.recover().unwrap(), "q"), vec![1]);
        // Once the disk takes writes again, so does the store: the alarm clears by itself.
        let r = tokio::time::timeout(WAIT, s.submit(vec![put("q", 30, &m)]).wait()).await.unwrap();
        assert_eq!(r, Ok(()));
        assert!(!s.is_failing());
        assert_eq!(seqs(&s.recover().unwrap(), "q"), vec![1, 30]);
        drop(s);
    }

    /// An in-memory disk whose next sync can be held, so a test can submit while a commit runs.
    #[derive(Debug, Clone, Default)]
    struct GatedDisk {
        inner: Arc<::redb::backends::InMemoryBackend>,
        gate: Arc<(Mutex<Gate>, std::sync::Condvar)>,
    }

    #[derive(Debug, Default)]
    struct Gate {
        armed: bool,
        entered: bool,
    }

    impl GatedDisk {
        /// The next sync waits for [`GatedDisk::release`].
        fn arm(&self) {
            *self.gate.0.lock().unwrap() = Gate { armed: true, entered: false };
        }
        /// Returns once a commit is held in its sync (panics after [`WAIT`]).
        fn wait_entered(&self) {
            let (lock, cv) = &*self.gate;
            let (_g, t) = cv.wait_timeout_while(lock.lock().unwrap(), WAIT, |g| !g.entered).unwrap();
            assert!(!t.timed_out(), "no commit reached its sync");
        }
        fn release(&self) {
            self.gate.0.lock().unwrap().armed = false;
            self.gate.1.notify_all();
        }
    }

    impl StorageBackend for GatedDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            let (lock, cv) = &*self.gate;
            let mut g = lock.lock().unwrap();
            if g.armed {
                g.entered = true;
                cv.notify_all();
                drop(cv.wait_while(g, |g| g.armed).unwrap());
            }
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.inner.write(offset, data)
        }
    }

    /// Gathering that ends only when the group is full ([`GATHER_OPS`]) or asked to: timings
    /// cannot decide these tests.
    fn patient() -> GatherRules {
        let hour = Duration::from_secs(3600);
        GatherRules { bytes: usize::MAX, gap: hour, bound: hour, pause: hour, pause_max: hour, ..GATHER }
    }

    /// Commits put 0, and submits puts 1, 2 and 3 while that commit runs: a stream. Returns
    /// their commits once put 0's has resolved.
    async fn a_stream_of_three(s: &RedbStore, disk: &GatedDisk, m: &Arc<Message>) -> Vec<Commit> {
        disk.arm();
        let first = s.submit(vec![put("q", 0, m)]);
        disk.wait_entered();
        let commits = (1..4).map(|i| s.submit(vec![put("q", i, m)])).collect();
        disk.release();
        tokio::time::timeout(WAIT, first.wait()).await.unwrap().unwrap();
        commits
    }

    #[tokio::test]
    async fn a_stream_of_waited_batches_is_gathered_into_fewer_commits() {
        let disk = GatedDisk::default();
        let s = RedbStore::with_backend_and(disk.clone(), patient()).unwrap();
        let m = msg(b"stream");
        let mut commits = a_stream_of_three(&s, &disk, &m).await;
        // A writer that did not gather would have committed the three by now.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(s.transactions(), 1, "the stream's first batches were committed without gathering");
        // The stream goes on: the group is committed once it holds GATHER_OPS operations.
        commits.extend((4..4 + GATHER_OPS as u64 - 3).map(|i| s.submit(vec![put("q", i, &m)])));
        for c in commits {
            tokio::time::timeout(WAIT, c.wait()).await.unwrap().unwrap();
        }
        assert_eq!(s.transactions(), 2, "{} batches took more than one commit", GATHER_OPS);
        assert_eq!(seqs(&s.recover().unwrap(), "q"), (0..=GATHER_OPS as u64).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_lone_synchronous_publisher_is_never_gathered() {
        // Gathering would hold each batch for an hour: each is committed on its own at once.
        let disk = GatedDisk::default();
        let s = RedbStore::with_backend_and(disk, patient()).unwrap();
        let m = msg(b"lone");
        for i in 0..50 {
            commit(&s, vec![put("q", i, &m)]).await;
        }
        assert_eq!(s.transactions(), 50);
    }

    #[tokio::test]
    async fn a_flush_a_read_or_the_close_ends_a_gather_at_once() {
        let m = msg(b"asked");
        // Each on a new store: the first gathered group of a patient store never ends by itself.
        let fresh = || {
            let disk = GatedDisk::default();
            (RedbStore::with_backend_and(disk.clone(), patient()).unwrap(), disk)
        };
        // A flush: the gathered batches are committed with it.
        let (s, disk) = fresh();
        let commits = a_stream_of_three(&s, &disk, &m).await;
        tokio::time::timeout(WAIT, s.flush().wait()).await.unwrap().unwrap();
        for mut c in commits {
            assert!(c.try_resolve(), "flushed before the gathered batches");
            assert_eq!(c.try_result(), Some(Ok(())));
        }
        // A read sees them.
        let (s, disk) = fresh();
        let commits = a_stream_of_three(&s, &disk, &m).await;
        assert_eq!(seqs(&s.recover().unwrap(), "q"), vec![0, 1, 2, 3]);
        for c in commits {
            tokio::time::timeout(WAIT, c.wait()).await.unwrap().unwrap();
        }
        // The close commits them.
        let (s, disk) = fresh();
        let commits = a_stream_of_three(&s, &disk, &m).await;
        drop(s);
        for c in commits {
            tokio::time::timeout(WAIT, c.wait()).await.unwrap().unwrap();
        }
        let s = RedbStore::with_backend(disk).unwrap();
        assert_eq!(seqs(&s.recover().unwrap(), "q"), vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_gathered_group_waits_no_longer_than_the_bound() {
        let since = Instant::now();
        // A batch every 100 µs (well within the gap), never enough to fill the group.
        let mut g = Gathering { since, last: since + Duration::from_micros(300), ops: 1, bytes: 64 };
        let mut now = g.last;
        loop {
            match decide(&GATHER, &g, now) {
                Decision::Wait(until) => {
                    assert!(until > now && until <= since + GATHER_BOUND, "waits past the bound");
                }
                Decision::Commit(why) => {
                    assert_eq!(why, Ended::Bound);
                    assert!(now >= since + GATHER_BOUND);
                    assert!(now < since + GATHER_BOUND + Duration::from_micros(100));
                    break;
                }
            }
            now += Duration::from_micros(100);
            g.last = now;
        }
        // Full: at once, however young.
        let full = Gathering { ops: GATHER_OPS, ..g };
        assert_eq!(decide(&GATHER, &full, since), Decision::Commit(Ended::Full));
        let heavy = Gathering { bytes: GATHER_BYTES, ..g };
        assert_eq!(decide(&GATHER, &heavy, since), Decision::Commit(Ended::Full));
        // Nothing came for the gap: commit.
        let quiet = Gathering { since, last: since, ops: 1, bytes: 64 };
        assert_eq!(decide(&GATHER, &quiet, since), Decision::Wait(since + GATHER_GAP));
        assert_eq!(decide(&GATHER, &quiet, since + GATHER_GAP), Decision::Commit(Ended::Gap));
    }

    #[test]
    fn gathers_ended_by_the_gap_in_a_row_pause_gathering_longer_each_time() {
        let us = Duration::from_micros(1);
        let mut g = Gatherer::new(GATHER);
        let t = Instant::now();
        assert!(!g.may_gather(t), "no stream seen yet");
        g.evidence();
        assert!(g.may_gather(t));
        // One ended by the gap: gathering waits for new evidence of a stream, no pause.
        g.ended(Ended::Gap, t);
        assert!(!g.may_gather(t));
        g.evidence();
        assert!(g.may_gather(t));
        // A stream that hiccupped: one that reaches the bound clears the count.
        g.ended(Ended::Bound, t);
        for _ in 1..GATHER_GAPS_TO_PAUSE {
            g.ended(Ended::Gap, t);
            g.evidence();
            assert!(g.may_gather(t));
        }
        // That many in a row: a closed loop. Paused.
        g.ended(Ended::Gap, t);
        g.evidence();
        assert!(!g.may_gather(t + GATHER_PAUSE - us));
        let t = t + GATHER_PAUSE;
        assert!(g.may_gather(t));
        // Again: twice as long.
        for _ in 0..GATHER_GAPS_TO_PAUSE {
            g.ended(Ended::Gap, t);
        }
        g.evidence();
        assert!(!g.may_gather(t + 2 * GATHER_PAUSE - us));
        let t = t + 2 * GATHER_PAUSE;
        assert!(g.may_gather(t));
        // And bounded.
        for _ in 0..10 * GATHER_GAPS_TO_PAUSE {
            g.ended(Ended::Gap, t);
        }
        g.evidence();
        assert!(!g.may_gather(t + GATHER_PAUSE_MAX - us));
        let t = t + GATHER_PAUSE_MAX;
        assert!(g.may_gather(t), "the pause is bounded");
        // A flush or a read says nothing about the stream.
        g.ended(Ended::Asked, t);
        assert!(g.may_gather(t));
        // One that filled up: the stream goes on, and the pause is short again.
        g.ended(Ended::Full, t);
        for _ in 0..GATHER_GAPS_TO_PAUSE {
            g.ended(Ended::Gap, t);
        }
        g.evidence();
        assert!(!g.may_gather(t + GATHER_PAUSE - us));
        assert!(g.may_gather(t + GATHER_PAUSE));
    }

    fn paging_queue(name: &str) -> QueueRecord {
        QueueRecord {
            vhost: "/".into(),
            name: name.into(),
            options: QueueOptions { durable: true, ..Default::default() },
        }
    }

    fn range_seqs(s: &RedbStore, q: &str, from: u64, count: usize, bytes: u64) -> Vec<u64> {
        s.read_range("/", &q.into(), from, count, bytes).blocking_wait().unwrap().iter().map(|m| m.seq).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn read_range_reads_both_layouts_in_order_bounded_by_count_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(&dir);
        let (a, shared) = (msg(b"0123456789"), msg(b"fan"));
        // Seqs 1, 3, 5 in `queued`, 2 and 4 a fan-out (in `messages`, with q2), 6 in another queue.
        commit(&s, vec![put("q", 1, &a), put("q", 2, &shared), put("q2", 2, &shared), put("q", 3, &a)]).await;
        commit(&s, vec![put("q", 4, &shared), put("q2", 4, &shared), put("q", 5, &a), put("r", 6, &a)]).await;
        commit(&s, vec![StoreOp::MarkDelivered { vhost: "/".into(), queue: "q".into(), seq: 3 }]).await;
        let s2 = Arc::new(s);
        let st = s2.clone();
        tokio::task::spawn_blocking(move || {
            assert_eq!(range_seqs(&st, "q", 0, 100, u64::MAX), vec![1, 2, 3, 4, 5]);
            assert_eq!(range_seqs(&st, "q", 2, 2, u64::MAX), vec![2, 3]);
            // 10 + 3 bytes reach 12: no third one.
            assert_eq!(range_seqs(&st, "q", 1, 100, 12), vec![1, 2]);
            // At least one, however large.
            assert_eq!(range_seqs(&st, "q", 1, 100, 1), vec![1]);
            assert_eq!(range_seqs(&st, "q", 6, 100, u64::MAX), Vec::<u64>::new());
            let got = st.read_range("/", &"q".into(), 3, 2, u64::MAX).blocking_wait().unwrap();
            assert!(got[0].delivered && !got[1].delivered);
            assert_eq!(got[1].message, shared);
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn read_range_reads_off_the_writer_thread_and_during_a_compaction_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(reopen(&dir));
        let m = msg(b"x");
        commit(&s, vec![put("q", 1, &m), put("q", 2, &m)]).await;
        // A reader holds the shared database: the read answers without the writer.
        assert!(s.shared.read().unwrap().is_some());
        let st = s.clone();
        let seqs = tokio::task::spawn_blocking(move || range_seqs(&st, "q", 1, 10, u64::MAX)).await.unwrap();
        assert_eq!(seqs, vec![1, 2]);
        // While the writer has it to itself, reads go through it (and still answer).
        let taken = s.shared.write().unwrap().take();
        let st = s.clone();
        let seqs = tokio::task::spawn_blocking(move || range_seqs(&st, "q", 2, 10, u64::MAX)).await.unwrap();
        assert_eq!(seqs, vec![2]);
        *s.shared.write().unwrap() = taken;
        // A compaction waits for readers and shares the database again afterwards.
        let st = s.clone();
        tokio::task::spawn_blocking(move || st.compact(0).unwrap()).await.unwrap();
        // (The writer shares it again right after answering: a flush comes after that.)
        s.flush().wait().await.unwrap();
        assert!(s.shared.read().unwrap().is_some());
    }

    #[tokio::test]
    async fn delete_range_removes_both_layouts_frees_bodies_and_drops_a_later_put_in_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(&dir);
        // One `Arc` each, but for the fan-out: those alone go in `queued`.
        let (a, shared) = (|| msg(b"a"), msg(b"fan"));
        commit(
            &s,
            vec![put("q", 1, &a()), put("q", 2, &shared), put("q2", 2, &shared), put("q", 3, &a()), put("q", 9, &a())],
        )
        .await;
        let range = |from_seq, to_seq| StoreOp::DeleteRange { vhost: "/".into(), queue: "q".into(), from_seq, to_seq };
        commit(&s, vec![range(2, 5)]).await;
        // A put of the purged range that comes after the purge (its publisher was late) is dropped;
        // one outside the range is kept.
        commit(&s, vec![put("q", 4, &a()), put("q", 6, &a())]).await;
        let snap = s.recover().unwrap();
        assert_eq!(seqs(&snap, "q"), vec![1, 6, 9]);
        assert_eq!(seqs(&snap, "q2"), vec![2]);
        // The shared body lost one of its two references; q2 still reads it.
        s.body_count();
        commit(&s, vec![StoreOp::DeleteMessage { vhost: "/".into(), queue: "q2".into(), seq: 2 }]).await;
        assert_eq!(table_lens(&s).2, 0);
        drop(s);
        let s = reopen(&dir);
        assert_eq!(seqs(&s.recover().unwrap(), "q"), vec![1, 6, 9]);
    }

    #[tokio::test]
    async fn delete_run_removes_both_layouts_frees_bodies_and_leaves_a_tombstone_per_missing_seq() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(&dir);
        // One `Arc` each, but for the fan-out: those alone go in `queued`.
        let (a, shared) = (|| msg(b"a"), msg(b"fan"));
        commit(
            &s,
            vec![
                put("q", 1, &a()),
                put("q", 2, &shared),
                put("q2", 2, &shared),
                put("q", 3, &a()),
                put("q", 5, &a()),
                put("q", 6, &a()),
            ],
        )
        .await;
        let run = |from_seq, to_seq| StoreOp::DeleteRun { vhost: "/".into(), queue: "q".into(), from_seq, to_seq };
        commit(&s, vec![run(2, 5)]).await;
        assert_eq!(seqs(&s.recover().unwrap(), "q"), vec![1, 6]);
        // 4 was not there: its put, late, is dropped as after a `DeleteMessage`; a put in the
        // run's range that was there (3) is not (no range tombstone: it is a new message).
        commit(&s, vec![put("q", 4, &a()), put("q", 3, &a())]).await;
        let snap = s.recover().unwrap();
        assert_eq!(seqs(&snap, "q"), vec![1, 3, 6]);
        assert_eq!(seqs(&snap, "q2"), vec![2]);
        // The shared body lost one of its two references; q2 still reads it.
        commit(&s, vec![StoreOp::DeleteMessage { vhost: "/".into(), queue: "q2".into(), seq: 2 }]).await;
        assert_eq!(table_lens(&s).2, 0);
        drop(s);
        let s = reopen(&dir);
        assert_eq!(seqs(&s.recover().unwrap(), "q"), vec![1, 3, 6]);
    }

    #[tokio::test]
    async fn recovery_returns_a_paging_queues_window_and_its_tail_and_all_of_a_priority_queue() {
        use crate::store::{TailSummary, RECOVER_WINDOW};
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(&dir);
        let mut prio = paging_queue("p");
        prio.options.arguments.insert("x-max-priority", FieldValue::I32(5));
        commit(&s, vec![StoreOp::PutQueue(paging_queue("q")), StoreOp::PutQueue(prio)]).await;
        let m = msg(b"12345");
        let n = RECOVER_WINDOW + 10;
        let ops: Vec<StoreOp> = (1..=n).flat_map(|seq| [put("q", seq, &m), put("p", seq, &m)]).collect();
        commit(&s, ops).await;
        drop(s);
        let s = reopen(&dir);
        let snap = s.recover().unwrap();
        let window = seqs(&snap, "q");
        assert_eq!(window, (1..=RECOVER_WINDOW).collect::<Vec<u64>>());
        let tail = snap.tails[&("/".to_string(), "q".into())];
        assert_eq!(tail, TailSummary { first_seq: RECOVER_WINDOW + 1, last_seq: n, count: 10, bytes: 50 });
        assert_eq!(seqs(&snap, "p").len() as u64, n);
        assert!(!snap.tails.contains_key(&("/".to_string(), "p".into())));
    }

    #[tokio::test]
    async fn recovery_deletes_transient_messages_a_queue_paged_out() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(&dir);
        let (p, t) = (|| msg(b"kept"), transient(b"paged"));
        commit(
            &s,
            vec![
                StoreOp::PutQueue(paging_queue("q")),
                put("q", 1, &p()),
                put("q", 2, &transient(b"x")),
                put("q", 3, &p()),
            ],
        )
        .await;
        // A transient fan-out (in `messages`) too.
        commit(&s, vec![put("q", 4, &t), put("q2", 4, &t)]).await;
        drop(s);
        let s = reopen(&dir);
        let snap = s.recover().unwrap();
        assert_eq!(seqs(&snap, "q"), vec![1, 3]);
        assert!(!snap.messages.contains_key(&("/".to_string(), "q2".into())));
        // Deleted from the file, bodies included, not just left out.
        assert_eq!(table_lens(&s), (0, 2, 0));
        assert_eq!(seqs(&s.recover().unwrap(), "q"), vec![1, 3]);
    }

    mod against_the_memory_store {
        use super::*;
        use crate::store::MemoryStore;
        use proptest::prelude::*;

        fn name() -> impl Strategy<Value = &'static str> {
            prop_oneof![Just("a"), Just("b")]
        }
        fn vhost() -> impl Strategy<Value = &'static str> {
            prop_oneof![Just("/"), Just("v")]
        }

        /// Operations over a small world, so puts and deletes often meet.
        fn op(messages: Vec<Arc<Message>>) -> impl Strategy<Value = StoreOp> {
            let m = proptest::sample::select(messages);
            prop_oneof![
                1 => vhost().prop_map(|v| StoreOp::PutVhost(v.into())),
                1 => vhost().prop_map(|v| StoreOp::DeleteVhost(v.into())),
                1 => (vhost(), name()).prop_map(|(v, n)| StoreOp::PutExchange(exchange(v, n))),
                1 => (vhost(), name()).prop_map(|(v, n)| StoreOp::DeleteExchange { vhost: v.into(), name: n.into() }),
                1 => (vhost(), name()).prop_map(|(v, n)| StoreOp::PutQueue(queue(v, n))),
                1 => (vhost(), name()).prop_map(|(v, n)| StoreOp::DeleteQueue { vhost: v.into(), name: n.into() }),
                1 => (vhost(), name(), any::<bool>(), name(), name())
                    .prop_map(|(v, s, x, d, k)| StoreOp::PutBinding(binding(v, s, x, d, k))),
                1 => (vhost(), name(), any::<bool>(), name(), name())
                    .prop_map(|(v, s, x, d, k)| StoreOp::DeleteBinding(binding(v, s, x, d, k))),
                3 => (vhost(), name(), 0..4u64, m.clone()).prop_map(|(v, q, seq, message)| StoreOp::PutMessage {
                    vhost: v.into(),
                    queue: q.into(),
                    seq,
                    message
                }),
                3 => (vhost(), name(), 0..4u64).prop_map(|(v, q, seq)| StoreOp::DeleteMessage {
                    vhost: v.into(),
                    queue: q.into(),
                    seq
                }),
                1 => (vhost(), name(), 0..4u64, 0..4u64).prop_map(|(v, q, a, b)| StoreOp::DeleteRun {
                    vhost: v.into(),
                    queue: q.into(),
                    from_seq: a.min(b),
                    to_seq: a.max(b),
                }),
                1 => (vhost(), name(), 0..4u64, 0..4u64).prop_map(|(v, q, a, b)| StoreOp::DeleteRange {
                    vhost: v.into(),
                    queue: q.into(),
                    from_seq: a.min(b),
                    to_seq: a.max(b),
                }),
                1 => (vhost(), name(), m).prop_map(|(v, k, message)| StoreOp::PutRetained {
                    vhost: v.into(),
                    key: k.into(),
                    message
                }),
                1 => (vhost(), name()).prop_map(|(v, k)| StoreOp::DeleteRetained { vhost: v.into(), key: k.into() }),
                2 => (vhost(), name(), 0..4u64).prop_map(|(v, q, seq)| StoreOp::MarkDelivered {
                    vhost: v.into(),
                    queue: q.into(),
                    seq
                }),
                1 => (vhost(), name(), any::<u8>()).prop_map(|(v, c, b)| StoreOp::PutSession {
                    vhost: v.into(),
                    client_id: c.into(),
                    state: Bytes::from(vec![b; 3]),
                }),
                1 => (vhost(), name()).prop_map(|(v, c)| StoreOp::DeleteSession { vhost: v.into(), client_id: c.into() }),
            ]
        }

        /// A snapshot in a form that ignores the order of unordered parts.
        fn normal(s: Snapshot) -> Vec<String> {
            let mut parts: Vec<String> = s.vhosts.iter().map(|v| format!("vhost {v:?}")).collect();
            parts.extend(s.exchanges.iter().map(|x| format!("{x:?}")));
            parts.extend(s.queues.iter().map(|x| format!("{x:?}")));
            parts.extend(s.bindings.iter().map(|x| format!("{x:?}")));
            parts.extend(s.retained.iter().map(|x| format!("{x:?}")));
            parts.extend(s.sessions.iter().map(|x| format!("{x:?}")));
            parts.extend(s.settings.iter().map(|x| format!("{x:?}")));
            parts.sort();
            // Messages last and in their own order: the order within a queue matters. (The memory
            // store keeps an empty list for a queue whose messages all went.)
            parts.extend(s.messages.iter().filter(|(_, m)| !m.is_empty()).map(|x| format!("{x:?}")));
            parts
        }

        /// A memory store holding what `m` holds, without its tombstones.
        fn rebuilt(m: &MemoryStore) -> MemoryStore {
            let s = m.recover().unwrap();
            let mut ops: Vec<StoreOp> = s.vhosts.into_iter().map(StoreOp::PutVhost).collect();
            ops.extend(s.exchanges.into_iter().map(StoreOp::PutExchange));
            ops.extend(s.queues.into_iter().map(StoreOp::PutQueue));
            ops.extend(s.bindings.into_iter().map(StoreOp::PutBinding));
            for ((vhost, queue), msgs) in s.messages {
                for m in msgs {
                    let (vhost, queue, seq) = (vhost.clone(), queue.clone(), m.seq);
                    ops.push(StoreOp::PutMessage {
                        vhost: vhost.clone(),
                        queue: queue.clone(),
                        seq,
                        message: m.message,
                    });
                    if m.delivered {
                        ops.push(StoreOp::MarkDelivered { vhost, queue, seq });
                    }
                }
            }
            ops.extend(s.retained.into_iter().map(|(vhost, key, message)| StoreOp::PutRetained {
                vhost,
                key,
                message,
            }));
            ops.extend(s.sessions.into_iter().map(|r| StoreOp::PutSession {
                vhost: r.vhost,
                client_id: r.client_id,
                state: r.state,
            }));
            ops.extend(s.settings.into_iter().map(|(key, value)| StoreOp::PutSetting { key, value }));
            let fresh = MemoryStore::new();
            fresh.submit(ops);
            fresh
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
            #[test]
            fn recovers_what_the_memory_store_holds(
                batches in proptest::collection::vec(
                    (proptest::collection::vec(op(vec![msg(b"one"), msg(b"two"), transient(b"paged")]), 1..8), any::<bool>()), 1..6),
                reopen_after in 0..6usize,
            ) {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let dir = tempfile::tempdir().unwrap();
                let mut memory = MemoryStore::new();
                let mut disk = Some(super::reopen(&dir));
                for (i, (batch, lazy)) in batches.into_iter().enumerate() {
                    if i == reopen_after {
                        // Tombstones live in the writer, so a reopen forgets them: the model
                        // forgets its own the same way.
                        drop(disk.take());
                        disk = Some(super::reopen(&dir));
                        // A restart recovers (deleting the transient messages paged out).
                        disk.as_ref().unwrap().recover().unwrap();
                        memory = rebuilt(&memory);
                    }
                    memory.submit(batch.clone());
                    if lazy {
                        // Held by the writer; the next batch, the reopen or the last close commits it.
                        disk.as_ref().unwrap().submit_lazy(batch);
                        continue;
                    }
                    let commit = disk.as_ref().unwrap().submit(batch);
                    rt.block_on(async { tokio::time::timeout(WAIT, commit.wait()).await }).unwrap().unwrap();
                }
                drop(disk);
                let disk = super::reopen(&dir);
                prop_assert_eq!(normal(disk.recover().unwrap()), normal(memory.recover().unwrap()));
                // Bodies, their counts and the message entries agree (panics otherwise).
                disk.body_count();
            }
        }
    }
}

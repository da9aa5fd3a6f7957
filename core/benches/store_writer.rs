//! The redb store's writer thread per persistent message, in the shapes the broker gives it:
//!
//! - `backlog`: a durable queue holding `DEPTH` messages, as a bridge's backlog while its link
//!   forwards (or a consumer behind its publishers): each message is put and marked delivered in
//!   one batch, and deleted `DEPTH` messages later in a batch of its own, `GROUP` messages per
//!   group commit (what the bridge benchmark saw: about 56 messages a commit).
//! - `keeping_up`: a consumer that acks before the put's commit: put, mark and delete in one
//!   group, which the writer settles without writing.
//!
//! The file lives in `/dev/shm` when there is one, so that an fsync costs next to nothing and the
//! time measured is the writer's CPU (B-tree updates, page copies, allocation), the part that
//! changes with the code; the fsync the disk adds is the same for any code.
//!
//! Run: `cargo bench -p ferry-core --bench store_writer -- --warm-up-time 1 --measurement-time 5`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_core::message::{DeliveryMode, Message, Properties};
use ferry_core::store::{Commit, RedbStore, Store, StoreOp};

const DEPTH: u64 = 500;
const GROUP: u64 = 50;

fn message(seq: u64) -> Arc<Message> {
    let props = Properties { delivery_mode: Some(DeliveryMode::Persistent), ..Default::default() };
    let mut payload = vec![0u8; 64];
    payload[..8].copy_from_slice(&seq.to_be_bytes());
    Arc::new(Message::new("amq.topic", "bench.bridge", Bytes::from(payload)).with_properties(props))
}

fn put(seq: u64) -> StoreOp {
    StoreOp::PutMessage { vhost: "/".into(), queue: "bridge.remote".into(), seq, message: message(seq) }
}

fn mark(seq: u64) -> StoreOp {
    StoreOp::MarkDelivered { vhost: "/".into(), queue: "bridge.remote".into(), seq }
}

fn delete(seq: u64) -> StoreOp {
    StoreOp::DeleteMessage { vhost: "/".into(), queue: "bridge.remote".into(), seq }
}

fn dir() -> tempfile::TempDir {
    match tempfile::tempdir_in("/dev/shm") {
        Ok(d) => d,
        Err(_) => tempfile::tempdir().expect("a temporary directory"),
    }
}

/// Submits `batches` one by one (as many connections would) and waits for the last commit,
/// which resolves after every earlier one.
fn run(rt: &tokio::runtime::Runtime, store: &RedbStore, batches: Vec<Vec<StoreOp>>) {
    let mut last: Option<Commit> = None;
    for b in batches {
        last = Some(store.submit(b));
    }
    if let Some(c) = last {
        rt.block_on(c.wait()).expect("commit");
    }
}

fn store_writer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut g = c.benchmark_group("store_writer");
    g.throughput(Throughput::Elements(GROUP));

    g.bench_function("backlog", |b| {
        let d = dir();
        let store = RedbStore::open(d.path().join("store.redb")).unwrap();
        // The backlog, then groups that each add GROUP messages and delete the GROUP oldest.
        run(&rt, &store, (0..DEPTH).map(|s| vec![put(s), mark(s)]).collect());
        let mut next = DEPTH;
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let batches: Vec<Vec<StoreOp>> =
                    (next..next + GROUP).flat_map(|s| [vec![put(s), mark(s)], vec![delete(s - DEPTH)]]).collect();
                next += GROUP;
                let started = Instant::now();
                run(&rt, &store, batches);
                total += started.elapsed();
            }
            total
        });
    });

    g.bench_function("keeping_up", |b| {
        let d = dir();
        let store = RedbStore::open(d.path().join("store.redb")).unwrap();
        let mut next = 0;
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let batches: Vec<Vec<StoreOp>> =
                    (next..next + GROUP).flat_map(|s| [vec![put(s), mark(s)], vec![delete(s)]]).collect();
                next += GROUP;
                let started = Instant::now();
                run(&rt, &store, batches);
                total += started.elapsed();
            }
            total
        });
    });
    g.finish();
}

criterion_group!(benches, store_writer);
criterion_main!(benches);

//! Publishers held back by a queue that falls behind its consumers (`ferry_core::queue`, issue
//! 18): RabbitMQ's credit flow in effect. Real clients (lapin) on both ends; counts and queue
//! depths are asserted, never times: the waits are bounded by timeouts only.
//!
//! The consumer that does not keep up is paced by the test (a pause after every batch), so the
//! publishers outrun it whatever the machine's speed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_core::queue::{Queue, BACKLOG_HIGH};
use ferry_integration_tests::amqp::{lapin, lapin_channel};
use ferry_integration_tests::{within, TestServer};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

/// The consumer's pace: it stops for `PAUSE` after every `BATCH` deliveries (at most 20,000 a
/// second, far below what a publisher sends through Ferry).
const BATCH: u64 = 200;
const PAUSE: Duration = Duration::from_millis(10);
/// How far past the mark the queue may go: the publish that found it full, per publisher, and
/// what the consumers handed back meanwhile.
const SLACK: u64 = 64;

fn queue_of(server: &TestServer, name: &str) -> Arc<Queue> {
    server.server.broker().vhost("/").expect("vhost /").queue(name).expect("the queue")
}

/// Publishes `n` messages numbered from 0 to `queue`, all handed to lapin at once (large reads
/// reach the broker), and waits until lapin has written them (and, with confirms, for every
/// confirm, each an ack).
async fn publish(ch: &Channel, queue: &str, n: u64) {
    let publishes = (0..n).map(|i| {
        let body = i.to_be_bytes();
        let options = BasicPublishOptions::default();
        async move { ch.basic_publish("".into(), queue.into(), options, &body, BasicProperties::default()).await }
    });
    let confirms: Vec<_> = futures_util::future::join_all(publishes).await;
    for c in confirms {
        let confirm = c.expect("basic.publish").await.expect("confirm");
        assert!(!confirm.is_nack(), "no publish is refused");
    }
}

/// A manual-ack consumer on `queue` with a prefetch of 100.
async fn start_consumer(ch: &Channel, queue: &str) -> lapin::Consumer {
    within("basic.qos", ch.basic_qos(100, BasicQosOptions::default())).await.unwrap();
    within(
        "basic.consume",
        ch.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
    .unwrap()
}

/// Consumes `n` messages from `queue` with manual acks (prefetch 100, `multiple` every 50),
/// checking they come in order, stopping for [`PAUSE`] every [`BATCH`] when `paced`.
async fn consume(ch: Channel, queue: String, n: u64, paced: bool) {
    let mut consumer = start_consumer(&ch, &queue).await;
    for i in 0..n {
        let d = within("a delivery", consumer.next()).await.expect("consumer open").expect("delivery");
        assert_eq!(d.data, i.to_be_bytes(), "in order");
        if i % 50 == 49 || i + 1 == n {
            d.acker.ack(BasicAckOptions { multiple: true }).await.expect("basic.ack");
        }
        if paced && i % BATCH == BATCH - 1 {
            tokio::time::sleep(PAUSE).await;
        }
    }
}

/// Samples the queue's ready messages every millisecond until `done`; returns the largest seen
/// (a sampler: the queue gives no event for its depth).
fn watch_depth(queue: Arc<Queue>, done: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let max = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while !done.load(Ordering::SeqCst) {
            max.fetch_max(u64::from(queue.stats().ready), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        max.load(Ordering::SeqCst)
    })
}

/// Two publishers into a queue whose one consumer does not keep up are held to its pace: the
/// queue stays near the mark instead of taking everything they send. A publisher to another
/// queue, on another connection, is not held at all, and gets every message through.
///
/// The depth bound holds only while the queue does not judge its consumer slow: a consumer task
/// the machine stalls for a whole pause (250 ms; it happened once in a fresh-clone CI, where this
/// binary's tests run side by side on 2 cores) makes the queue hold nobody for a second, by
/// design, and the queue grows meanwhile. So the scenario runs up to three times on fresh
/// queues and the bound must hold in one of them; everything else is checked in every round.
/// Without credit flow the queue takes nearly all the publishers send, in every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_are_held_to_the_pace_of_a_consumer_that_falls_behind() {
    let server = TestServer::amqp().await;
    let mut depths = Vec::new();
    for round in 0..3 {
        let max = pace_round(&server, round).await;
        depths.push(max);
        if max <= BACKLOG_HIGH + SLACK {
            return;
        }
    }
    panic!(
        "the queue grew to {depths:?} ready messages in three rounds, past the mark of {BACKLOG_HIGH}: its publishers \
         outran its consumer"
    );
}

/// One round of [`publishers_are_held_to_the_pace_of_a_consumer_that_falls_behind`] on queues of
/// its own: returns the largest depth the slow queue reached.
async fn pace_round(server: &TestServer, round: u32) -> u64 {
    let (slow_name, other_name) = (format!("slow.q.{round}"), format!("other.q.{round}"));
    let (_c, ch) = lapin_channel(server).await;
    let slow = declare_on(server, &ch, &slow_name).await;
    let other = declare_on(server, &ch, &other_name).await;
    let per_publisher = 4 * BACKLOG_HIGH;

    let done = Arc::new(AtomicBool::new(false));
    let depth = watch_depth(slow.clone(), done.clone());
    // Two publishers on connections of their own: each sends its own numbers, so the consumer
    // sees two interleaved sequences, each in order.
    let (_c1, p1) = lapin_channel(server).await;
    let (_c2, p2) = lapin_channel(server).await;
    let consumer = tokio::spawn(consume_two(ch.clone(), slow_name.clone(), per_publisher));
    let (n1, n2) = (slow_name.clone(), slow_name.clone());
    let one = tokio::spawn(async move { publish(&p1, &n1, per_publisher).await });
    let two = tokio::spawn(async move { publish(&p2, &n2, per_publisher).await });

    // Once the slow queue holds its publishers, another publisher to another queue, with
    // confirms, and its consumer: fewer messages than the mark, so that queue holds nobody
    // whatever the speeds, and the publisher is not held by the slow one.
    // Polled within a bound: the queue gives no event for the moment it starts holding.
    within("the slow queue holds its publishers", async {
        while slow.has_room() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let (_c3, p3) = lapin_channel(server).await;
    within("confirm.select", p3.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    let (_c4, c4) = lapin_channel(server).await;
    let bystander = tokio::spawn(consume(c4, other_name.clone(), BACKLOG_HIGH / 2, false));
    within("the other queue's publisher", publish(&p3, &other_name, BACKLOG_HIGH / 2)).await;
    within("the other queue's consumer", bystander).await.unwrap();

    tokio::time::timeout(Duration::from_secs(60), async {
        one.await.unwrap();
        two.await.unwrap();
        consumer.await.unwrap();
    })
    .await
    .expect("every message through within 60 s");
    done.store(true, Ordering::SeqCst);
    let max = depth.await.unwrap();
    assert!(slow.stats().held_publishers > 0, "the publishers were held");
    assert_eq!(other.stats().held_publishers, 0, "a queue below the mark holds nobody");
    max
}

/// [`consume`], paced, for two publishers' interleaved sequences (each in order).
async fn consume_two(ch: Channel, queue: String, per_publisher: u64) {
    let mut consumer = start_consumer(&ch, &queue).await;
    // The next number expected from each publisher: a message is the next of one of them.
    let mut next = [0u64; 2];
    let total = 2 * per_publisher;
    for i in 0..total {
        let d = within("a delivery", consumer.next()).await.expect("consumer open").expect("delivery");
        let n = u64::from_be_bytes(d.data[..8].try_into().unwrap());
        let from = next.iter().position(|&e| e == n).unwrap_or_else(|| panic!("{n} is the next of neither: {next:?}"));
        next[from] += 1;
        if i % 50 == 49 || i + 1 == total {
            d.acker.ack(BasicAckOptions { multiple: true }).await.expect("basic.ack");
        }
        if i % BATCH == BATCH - 1 {
            tokio::time::sleep(PAUSE).await;
        }
    }
    assert_eq!(next, [per_publisher; 2]);
}

async fn declare_on(server: &TestServer, ch: &Channel, name: &str) -> Arc<Queue> {
    within("queue.declare", ch.queue_declare(name.into(), QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .unwrap();
    queue_of(server, name)
}

/// A work queue nobody consumes from holds nobody: it takes everything, as in RabbitMQ, until
/// the memory alarm.
#[tokio::test]
async fn a_queue_without_consumers_holds_nobody() {
    let server = TestServer::amqp().await;
    let (_c, ch) = lapin_channel(&server).await;
    let q = declare_on(&server, &ch, "work.q").await;
    within("confirm.select", ch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    within("every confirm", publish(&ch, "work.q", 3 * BACKLOG_HIGH)).await;
    let st = q.stats();
    assert_eq!(u64::from(st.ready), 3 * BACKLOG_HIGH);
    assert_eq!(st.held_publishers, 0);
}

/// A consumer that stops acknowledging (its prefetch used up) holds its queue's publisher
/// once, for the pause: the queue, found not draining, is lagging and holds nobody back until
/// it delivers again, so every publish is confirmed.
#[tokio::test]
async fn a_stalled_consumer_holds_its_publisher_once_for_the_pause() {
    let server = TestServer::amqp().await;
    let (_c, ch) = lapin_channel(&server).await;
    let q = declare_on(&server, &ch, "stalled.q").await;
    within("basic.qos", ch.basic_qos(10, BasicQosOptions::default())).await.unwrap();
    let _consumer = within(
        "basic.consume",
        ch.basic_consume("stalled.q".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
    .unwrap();
    let (_p, p) = lapin_channel(&server).await;
    within("confirm.select", p.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    within("every confirm", publish(&p, "stalled.q", 3 * BACKLOG_HIGH)).await;
    let st = q.stats();
    assert_eq!(st.held_publishers, 1, "held once, then the queue lags");
    assert_eq!(u64::from(st.ready) + u64::from(st.unacked), 3 * BACKLOG_HIGH);
}

/// One connection that publishes into the queue it consumes from is never held by that queue:
/// its acks would wait behind its own publishes. Its consumer reads nothing until every publish
/// is written (its prefetch fills, the queue goes far past the mark), then takes them all.
#[tokio::test]
async fn a_connection_consuming_what_it_publishes_is_not_held_by_that_queue() {
    let server = TestServer::amqp().await;
    let conn = lapin(&server).await;
    let consumer_ch = within("channel", conn.create_channel()).await.unwrap();
    let publisher_ch = within("channel", conn.create_channel()).await.unwrap();
    let q = declare_on(&server, &consumer_ch, "self.q").await;
    within("basic.qos", consumer_ch.basic_qos(100, BasicQosOptions::default())).await.unwrap();
    let mut consumer = within(
        "basic.consume",
        consumer_ch.basic_consume("self.q".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
    .unwrap();
    let n = 3 * BACKLOG_HIGH;
    within("every publish", publish(&publisher_ch, "self.q", n)).await;
    within("every publish in the queue", async {
        while q.stats().published < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let st = q.stats();
    assert!(u64::from(st.ready) > BACKLOG_HIGH, "the queue went past the mark ({}): the case is made", st.ready);
    assert_eq!(st.held_publishers, 0);
    for i in 0..n {
        let d = within("a delivery", consumer.next()).await.expect("consumer open").expect("delivery");
        assert_eq!(d.data, i.to_be_bytes(), "in order");
        if i % 50 == 49 || i + 1 == n {
            d.acker.ack(BasicAckOptions { multiple: true }).await.expect("basic.ack");
        }
    }
}

/// Two connections, each consuming (slowly) the queue the other publishes into: each may be
/// held by the other's queue while its own acks wait behind its publishes, so neither queue
/// drains during the pause. The pause and the lagging rule end it: every message gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_consuming_what_the_other_publishes_do_not_wedge() {
    let server = TestServer::amqp().await;
    let (a, b) = (lapin(&server).await, lapin(&server).await);
    let (a_consumes, a_publishes) =
        (within("channel", a.create_channel()).await.unwrap(), within("channel", a.create_channel()).await.unwrap());
    let (b_consumes, b_publishes) =
        (within("channel", b.create_channel()).await.unwrap(), within("channel", b.create_channel()).await.unwrap());
    let qa = declare_on(&server, &a_consumes, "a.q").await;
    let qb = declare_on(&server, &b_consumes, "b.q").await;
    let n = 3 * BACKLOG_HIGH;
    let consumers = [
        tokio::spawn(consume(a_consumes, "a.q".into(), n, true)),
        tokio::spawn(consume(b_consumes, "b.q".into(), n, true)),
    ];
    let publishers = [
        tokio::spawn(async move { publish(&a_publishes, "b.q", n).await }),
        tokio::spawn(async move { publish(&b_publishes, "a.q", n).await }),
    ];
    tokio::time::timeout(Duration::from_secs(90), async {
        for t in publishers.into_iter().chain(consumers) {
            t.await.unwrap();
        }
    })
    .await
    .expect("every message through within 90 s");
    let held = qa.stats().held_publishers + qb.stats().held_publishers;
    assert!(held > 0, "the queues held their publishers");
}

//! Queues larger than memory (issue 18), through the `ferry` binary and lapin: a durable queue
//! holding more persistent messages than its window in memory (`ferry_core::queue::PAGE_WINDOW`)
//! keeps the rest on disk. Every confirmed message is there, in order, after a SIGKILL; a tail
//! consumed in part and acked in order (its deletes go in runs, `StoreOp::DeleteRun`) comes back
//! after a SIGKILL as exactly what was not acked; and a consumer draining a tail while a publisher keeps
//! publishing gets every message once, in order.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use common::{Serving, PATIENCE};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// More than the window (16,384), so some of them wait on disk.
const N: u32 = 30_000;
/// `ferry_core::queue::PAGE_WINDOW`.
const WINDOW: u64 = 16_384;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start(dir: &Path, amqp: u16, http: u16) -> Serving {
    let toml = format!(
        "[broker]\ndata_dir = \"data\"\n\
         [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:{amqp}\"\n\
         [[listeners]]\nprotocol = \"http\"\nbind = \"127.0.0.1:{http}\"\n"
    );
    std::fs::write(dir.join("ferry.toml"), toml).unwrap();
    let mut ferry = Serving::start(dir, &["--config", "ferry.toml"]);
    ferry.wait_for("ferry ready", |l| l.contains("ferry ready").then_some(()));
    ferry
}

/// The queue's `messages_paged_out` in the management API (curl; `None` when curl is missing).
fn paged_out(http: u16, q: &str) -> Option<u64> {
    let out = Command::new("curl")
        .args(["-s", "-u", "guest:guest", &format!("http://127.0.0.1:{http}/api/queues/%2F/{q}")])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("queue JSON");
    Some(v["messages_paged_out"].as_u64().expect("messages_paged_out"))
}

async fn channel(amqp: u16) -> (Connection, Channel) {
    let url = format!("amqp://guest:guest@127.0.0.1:{amqp}/%2F");
    let conn = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// Declares the durable queue; its message count.
async fn declare(ch: &Channel, q: &str) -> u32 {
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(q.into(), durable, FieldTable::default()).await.unwrap().message_count()
}

/// Publishes `from..to` as 4-byte bodies (persistent), with confirms, all confirmed.
async fn publish(ch: &Channel, q: &str, from: u32, to: u32) {
    let mut pending = Vec::new();
    for i in from..to {
        let props = BasicProperties::default().with_delivery_mode(2);
        let body = i.to_be_bytes();
        pending
            .push(ch.basic_publish("".into(), q.into(), BasicPublishOptions::default(), &body, props).await.unwrap());
        if pending.len() >= 500 {
            for p in pending.drain(..) {
                assert!(p.await.unwrap().is_ack());
            }
        }
    }
    for p in pending {
        assert!(p.await.unwrap().is_ack());
    }
}

/// Consumes `count` messages with manual acks (prefetch 200, each acked): their numbers, in
/// arrival order.
async fn consume(ch: &Channel, q: &str, count: u32) -> Vec<u32> {
    consume_with(ch, q, count, 200, 1).await
}

/// Consumes `count` messages with manual acks, `prefetch` at a time, acking in order with
/// `multiple` every `ack_every` deliveries and at the end (1: each alone): their numbers, in
/// arrival order. Unacked deliveries past `count` stay unacked.
async fn consume_with(ch: &Channel, q: &str, count: u32, prefetch: u16, ack_every: usize) -> Vec<u32> {
    ch.basic_qos(prefetch, BasicQosOptions::default()).await.unwrap();
    let tag = format!("c{prefetch}-{ack_every}");
    let mut consumer = ch
        .basic_consume(q.into(), tag.as_str().into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut got = Vec::new();
    while (got.len() as u32) < count {
        let d = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("stalled after {} of {count}", got.len()))
            .expect("a delivery")
            .unwrap();
        got.push(u32::from_be_bytes(d.data[..].try_into().unwrap()));
        if got.len() % ack_every == 0 || got.len() as u32 == count {
            d.ack(BasicAckOptions { multiple: ack_every > 1 }).await.unwrap();
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_the_window_survives_sigkill_complete_and_in_order() {
    let (amqp, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let ferry = start(dir.path(), amqp, http);
    {
        let (_conn, ch) = channel(amqp).await;
        declare(&ch, "big").await;
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        publish(&ch, "big", 0, N).await;
        assert_eq!(declare(&ch, "big").await, N, "the count includes what is on disk");
    }
    assert!(Command::new("kill").args(["-KILL", &ferry.pid().to_string()]).status().unwrap().success());
    drop(ferry);

    let _ferry = start(dir.path(), amqp, http);
    let (_conn, ch) = channel(amqp).await;
    assert_eq!(declare(&ch, "big").await, N);
    // Recovery read the window back; the rest stays on disk until the consumer gets there.
    if let Some(paged) = paged_out(http, "big") {
        assert_eq!(paged, u64::from(N) - WINDOW);
    }
    let got = consume(&ch, "big", N).await;
    assert_eq!(got, (0..N).collect::<Vec<u32>>(), "every confirmed message, once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_acked_in_part_in_order_comes_back_after_sigkill_as_what_was_not_acked() {
    // Past the window, so that part of what is consumed was read back from the tail.
    const TAKEN: u32 = 25_000;
    let (amqp, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let ferry = start(dir.path(), amqp, http);
    {
        let (_conn, ch) = channel(amqp).await;
        declare(&ch, "part").await;
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        publish(&ch, "part", 0, N).await;
        let (_cconn, cch) = channel(amqp).await;
        assert_eq!(consume_with(&cch, "part", TAKEN, 1_000, 500).await, (0..TAKEN).collect::<Vec<u32>>());
        // What was delivered past TAKEN goes back to the queue.
        cch.close(200, "done".into()).await.unwrap();
        // A confirmed publish after the acks: their deletes were submitted before it, so its
        // commit holds them (the store commits in submission order).
        publish(&ch, "part", N, N + 1).await;
    }
    assert!(Command::new("kill").args(["-KILL", &ferry.pid().to_string()]).status().unwrap().success());
    drop(ferry);

    let _ferry = start(dir.path(), amqp, http);
    let (_conn, ch) = channel(amqp).await;
    assert_eq!(declare(&ch, "part").await, N + 1 - TAKEN, "nothing acked came back, nothing else went");
    let got = consume(&ch, "part", N + 1 - TAKEN).await;
    assert_eq!(got, (TAKEN..=N).collect::<Vec<u32>>(), "the rest, once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_drains_a_tail_while_the_publisher_keeps_publishing() {
    let (amqp, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let _ferry = start(dir.path(), amqp, http);
    let (_conn, ch) = channel(amqp).await;
    declare(&ch, "live").await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    publish(&ch, "live", 0, N).await;
    if let Some(paged) = paged_out(http, "live") {
        assert_eq!(paged, u64::from(N) - WINDOW);
    }
    // The consumer starts on the backlog while the publisher adds as much again.
    let (_cconn, cch) = channel(amqp).await;
    let consumer = tokio::spawn(async move { consume(&cch, "live", 2 * N).await });
    publish(&ch, "live", N, 2 * N).await;
    let got = tokio::time::timeout(PATIENCE * 4, consumer).await.expect("drained in time").unwrap();
    assert_eq!(got, (0..2 * N).collect::<Vec<u32>>(), "every message, once, in order");
    assert_eq!(declare(&ch, "live").await, 0);
}

//! Allocations per message on the QoS 0 path from one MQTT publisher to one MQTT subscriber
//! (issue 18, "Per-message cost"), counted with a counting global allocator.
//!
//! The path is the one the driver runs, without sockets: the publisher's bytes are decoded from
//! a read buffer, handled by its session (topic checks, PUBLISH → core message, the vhost's
//! publish: exchange, topic trie, the subscriber's direct sink), then the subscriber's session
//! pumps its outbox and encodes the PUBLISH into its out buffer, which the driver writes and
//! clears. One message per wake-up on both sides: the worst case, nothing amortised over a batch.
//!
//! This file holds one test only: the allocator counts globally, and another test running at
//! the same time would add its allocations.

use std::alloc::System;
use std::sync::Arc;

use bytes::BytesMut;
use ferry_core::message::ConnectionId;
use ferry_core::store::MemoryStore;
use ferry_core::vhost::VHost;
use ferry_mqtt::codec::{encode, Connect, Decoder, Packet, ProtocolVersion, Publish, QoS, Str, SubOptions, Subscribe};
use ferry_mqtt::session::Session;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const V311: ProtocolVersion = ProtocolVersion::V311;

fn start(vhost: &Arc<VHost>, id: u64) -> Session {
    let client_id = format!("c{id}");
    let connect = Connect {
        bridge: false,
        version: V311,
        clean_start: true,
        keep_alive: 0,
        client_id: Str::from(client_id.as_str()),
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    };
    let mut s =
        Session::start(connect, client_id, false, ConnectionId(id), vhost.clone(), Default::default(), None, None, 0)
            .unwrap();
    s.out.clear();
    s
}

/// Publishes `n` messages and delivers each before the next; returns allocations and
/// reallocations counted over the run.
fn run(publisher: &mut Session, subscriber: &mut Session, wire: &[u8], inbuf: &mut BytesMut, n: usize) -> usize {
    let mut decoder = Decoder::with_version(u32::MAX, V311);
    let region = Region::new(GLOBAL);
    for _ in 0..n {
        // What `read_buf` does: the bytes land in the connection's read buffer.
        inbuf.extend_from_slice(wire);
        let packet = decoder.decode(inbuf).unwrap().expect("a whole PUBLISH");
        publisher.handle(packet, 0).unwrap();
        assert!(publisher.out.is_empty(), "QoS 0: nothing goes back to the publisher");
        subscriber.pump(0);
        // What the driver does after its write.
        assert_eq!(subscriber.out.len(), wire.len(), "one PUBLISH, as published");
        subscriber.out.clear();
    }
    let stats = region.change();
    stats.allocations + stats.reallocations
}

#[test]
fn a_qos0_message_to_one_subscriber_allocates_nothing_in_steady_state() {
    let vhost = Arc::new(VHost::new("/", Arc::new(MemoryStore::new())));
    let mut subscriber = start(&vhost, 1);
    let options = SubOptions { qos: QoS::AtMostOnce, ..SubOptions::default() };
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Default::default(),
        filters: vec![(Str::from("sensors/+/temperature"), options)],
    });
    subscriber.handle(subscribe, 0).unwrap();
    while subscriber.is_subscribing() {
        subscriber.resume(0).unwrap();
    }
    subscriber.out.clear();
    let mut publisher = start(&vhost, 2);

    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: Str::from("sensors/42/temperature"),
        packet_id: None,
        properties: Default::default(),
        payload: vec![7u8; 64].into(),
    });
    let mut wire = BytesMut::new();
    encode(&publish, V311, &mut wire);
    let mut inbuf = BytesMut::with_capacity(64 * 1024);

    // Warm-up: buffers reach their working size, lazily built state is built.
    run(&mut publisher, &mut subscriber, &wire, &mut inbuf, 1_000);

    const N: usize = 10_000;
    let allocations = run(&mut publisher, &mut subscriber, &wire, &mut inbuf, N);
    let per_message = allocations as f64 / N as f64;
    println!("{allocations} allocations for {N} messages: {per_message:.2} per message");
    // Allocations left per message, each named (docs/benchmarks.md, "Allocations per message"):
    // 1. `VHost::publish` puts the message in an `Arc`, the one copy every destination of a
    //    fan-out shares (CONVENTIONS.md). Reusing it would take a pool of messages whose payloads
    //    pin the publishers' read buffers.
    // Before issue 18 this path made 13: the routing key and the topic back (strings grown char
    // by char, a lossy copy), exchange lookups building keys, the target and visited lists, and
    // a vector per outbox drain.
    const EXPECTED: usize = 1;
    assert_eq!(allocations, EXPECTED * N, "{per_message:.2} allocations per message, expected {EXPECTED}");
}

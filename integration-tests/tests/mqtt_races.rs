//! Races between a client's connections and between clients (issue 14): a DISCONNECT sent just
//! before a reconnect always counts (no will, no stale session), a will delay is cancelled by any
//! new connection, a takeover publishes the will only when the session ends, and a client that
//! has its SUBACK gets every publish that arrives after it.
//!
//! The races need two workers: on one thread the connections' tasks run in the order they were
//! woken, which hides them.

use std::time::Duration;

use ferry_integration_tests::mqtt::{
    connect_packet, packet_bytes, publish_packet, sub_options, will, RawClient, QUIET,
};
use ferry_integration_tests::TestServer;
use ferry_mqtt::codec::{Connect, Disconnect, Packet, Properties, ProtocolVersion, QoS};

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

fn disconnect(version: ProtocolVersion, expiry: Option<u32>) -> Packet {
    let mut d = Disconnect { reason: 0, properties: Properties::default() };
    if version == V5 {
        d.properties.session_expiry_interval = expiry;
    }
    Packet::Disconnect(d)
}

fn connect(version: ProtocolVersion, client_id: &str, clean: bool, expiry: Option<u32>) -> Connect {
    let mut c = connect_packet(version, client_id, clean);
    if version == V5 {
        c.properties.session_expiry_interval = expiry;
    }
    c
}

/// Every PUBLISH that reaches `w` until it has been quiet for [`QUIET`].
async fn publishes_until_quiet(w: &mut RawClient) -> Vec<String> {
    let mut seen = Vec::new();
    while let Ok(p) = w.next_within(QUIET).await {
        match p {
            Some(Packet::Publish(p)) => seen.push(p.topic.as_str().to_string()),
            Some(other) => panic!("watcher: unexpected {other:?}"),
            None => panic!("watcher: the broker closed the connection"),
        }
    }
    seen
}

// ----- DISCONNECT, then reconnect at once ------------------------------------------------------

/// `cycles` times: connect with a will (5.0: session expiry 60), PUBLISH + DISCONNECT (5.0:
/// session expiry 0, which ends the session) in one write, close, and connect again at once
/// with the same client id and clean start 0. Returns the wills published and the CONNACKs that
/// said session present.
async fn reconnect_storm(version: ProtocolVersion, cycles: usize) -> (Vec<String>, usize) {
    let server = TestServer::mqtt().await;
    let addr = server.mqtt_addr();
    let mut w = RawClient::connect_ok(addr, V5, "storm-watcher", true).await;
    w.subscribe(1, "storm/will/#", sub_options(QoS::AtMostOnce)).await;
    let mut present = 0;
    for i in 0..cycles {
        let id = format!("storm-{}", i % 10);
        let mut first = connect(version, &id, true, Some(60));
        first.will = Some(will(&format!("storm/will/{id}"), b"gone", QoS::AtMostOnce, false));
        let (mut c, ack) = RawClient::connect(addr, first).await;
        assert_eq!(ack.code, 0, "{ack:?}");
        let mut bytes = packet_bytes(&Packet::Publish(publish_packet("storm/data", QoS::AtMostOnce, 0, b"x")), version);
        bytes.extend(packet_bytes(&disconnect(version, Some(0)), version));
        c.send_bytes(&bytes).await;
        c.drop_connection();

        let (mut again, ack) = RawClient::connect(addr, connect(version, &id, false, Some(60))).await;
        assert_eq!(ack.code, 0, "{ack:?}");
        present += usize::from(ack.session_present);
        // Leave for good (3.1.1: the session is kept, and the next cycle's clean start ends it).
        again.send(&disconnect(version, Some(0))).await;
        again.expect_close(None).await;
    }
    (publishes_until_quiet(&mut w).await, present)
}

// Before the fix (the takeover kick polled before the DISCONNECT already in the socket), a storm
// of 300 cycles against a debug build published 227 wills (3.1.1) and 204 wills and 204 wrong
// session-present flags (5.0).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_reconnect_storm_publishes_no_will() {
    let (wills, present) = reconnect_storm(V311, 300).await;
    assert_eq!(wills.len(), 0, "wills published after a DISCONNECT: {wills:?}");
    assert_eq!(present, 0, "session present after a clean session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_reconnect_storm_publishes_no_will_and_resumes_no_ended_session() {
    let (wills, present) = reconnect_storm(V5, 300).await;
    assert_eq!(wills.len(), 0, "wills published after a DISCONNECT: {wills:?}");
    assert_eq!(present, 0, "session present after DISCONNECT with session expiry 0 [MQTT-3.2.2-3]");
}

// ----- will delay -------------------------------------------------------------------------------

/// A 5.0 CONNECT with a will delayed `delay` s and session expiry `expiry` s.
fn delayed_will(client_id: &str, delay: u32, expiry: u32) -> Connect {
    let mut c = connect(V5, client_id, true, Some(expiry));
    let mut wl = will(&format!("wills/{client_id}"), b"late", QoS::AtMostOnce, false);
    wl.properties.will_delay_interval = Some(delay);
    c.will = Some(wl);
    c
}

async fn watcher(server: &TestServer) -> RawClient {
    let mut w = RawClient::connect_ok(server.mqtt_addr(), V5, "will-watcher", true).await;
    w.subscribe(1, "wills/#", sub_options(QoS::AtMostOnce)).await;
    w
}

#[tokio::test]
async fn v5_a_reconnect_with_clean_start_inside_the_will_delay_cancels_the_will() {
    // 07-will-delay-recover: the new connection ends the old session and then its own (session
    // expiry 0), which once left the will's timer nothing to find and it published at the
    // original deadline [MQTT-3.1.3-9].
    let server = TestServer::mqtt().await;
    let mut w = watcher(&server).await;
    for (clean, expiry) in [(true, None), (false, Some(0)), (true, Some(30))] {
        let (c, _) = RawClient::connect(server.mqtt_addr(), delayed_will("recover", 1, 30)).await;
        c.drop_connection();
        let (mut back, ack) = RawClient::connect(server.mqtt_addr(), connect(V5, "recover", clean, expiry)).await;
        assert_eq!((ack.code, ack.session_present), (0, !clean), "clean {clean}");
        back.send(&disconnect(V5, None)).await;
        back.expect_close(None).await;
        // The will was due 1 s after the drop: wait past that (bounded) to see it does not come.
        let seen = w.next_within(Duration::from_millis(2000)).await;
        assert!(seen.is_err(), "clean {clean}, expiry {expiry:?}: the old will came: {seen:?}");
    }
}

#[tokio::test]
async fn v5_a_takeover_inside_the_will_delay_cancels_the_will() {
    let server = TestServer::mqtt().await;
    let mut w = watcher(&server).await;
    let (mut first, _) = RawClient::connect(server.mqtt_addr(), delayed_will("taken", 1, 30)).await;
    let (mut second, ack) = RawClient::connect(server.mqtt_addr(), connect(V5, "taken", true, None)).await;
    assert_eq!(ack.code, 0);
    first.expect_close(Some(0x8E)).await;
    second.send(&disconnect(V5, None)).await;
    second.expect_close(None).await;
    let seen = w.next_within(Duration::from_millis(2000)).await;
    assert!(seen.is_err(), "the will came after a takeover inside its delay: {seen:?}");
}

#[tokio::test]
async fn v5_a_session_shorter_than_the_will_delay_publishes_the_will_when_it_ends() {
    // §3.1.3.2.2: at the will delay or the session's end, whichever comes first. Both timers
    // are due: whichever runs first publishes it, once.
    let server = TestServer::mqtt().await;
    let mut w = watcher(&server).await;
    for (delay, expiry) in [(5, 1), (1, 1)] {
        let (c, _) = RawClient::connect(server.mqtt_addr(), delayed_will("short", delay, expiry)).await;
        c.drop_connection();
        let p = w.recv_publish().await;
        assert_eq!((p.topic.as_str(), &p.payload[..]), ("wills/short", &b"late"[..]));
        assert_eq!(publishes_until_quiet(&mut w).await, Vec::<String>::new(), "published twice");
    }
}

// ----- takeover -----------------------------------------------------------------------------------

#[tokio::test]
async fn a_takeover_publishes_the_will_only_when_the_session_ends() {
    // As Mosquitto's 07-will-takeover: the will of a connection taken over is published unless
    // its session goes on (it is persistent and the new connection resumes it).
    let server = TestServer::mqtt().await;
    let mut w = watcher(&server).await;
    for version in [V311, V5] {
        for (clean1, clean2) in [(true, true), (false, true), (true, false), (false, false)] {
            let expiry = |clean: bool| if clean { Some(0) } else { Some(60) };
            let mut c1 = connect(version, "takeover", clean1, expiry(clean1));
            c1.will = Some(will("wills/takeover", b"LWT", QoS::AtMostOnce, false));
            let (mut first, _) = RawClient::connect(server.mqtt_addr(), c1).await;
            let (mut second, ack) =
                RawClient::connect(server.mqtt_addr(), connect(version, "takeover", clean2, expiry(clean2))).await;
            assert_eq!(ack.session_present, !clean1 && !clean2, "{version:?} {clean1} {clean2}");
            first.closed().await;
            second.send(&Packet::Publish(publish_packet("wills/takeover", QoS::AtMostOnce, 0, b"ready"))).await;
            // The will, if any, was published before the new connection was answered.
            let expected: &[u8] = if clean1 || clean2 { b"LWT" } else { b"ready" };
            let p = w.recv_publish().await;
            assert_eq!(&p.payload[..], expected, "{version:?} clean {clean1} then {clean2}");
            if expected == b"LWT" {
                assert_eq!(&w.recv_publish().await.payload[..], b"ready");
            }
            second.send(&disconnect(version, Some(0))).await;
            second.expect_close(None).await;
            // A 3.1.1 persistent session is kept: the next round starts without it.
            let mut clear = RawClient::connect_ok(server.mqtt_addr(), version, "takeover", true).await;
            clear.send(&disconnect(version, None)).await;
            clear.expect_close(None).await;
        }
    }
}

// ----- ordering across connections -------------------------------------------------------------

/// `rounds` times: a subscriber (a new client each round, or the same client with a new topic
/// each round, alternately) subscribes and has its SUBACK; then another client publishes QoS 1
/// to the topic and has its PUBACK. The subscriber must get the message, every time.
async fn publish_after_suback(version: ProtocolVersion, persistent: bool, rounds: usize) {
    let server = TestServer::mqtt().await;
    let addr = server.mqtt_addr();
    let mut publisher = RawClient::connect_ok(addr, version, "order-pub", true).await;
    let expiry = persistent.then_some(60);
    let (mut same, _) = RawClient::connect(addr, connect(version, "order-same", !persistent, expiry)).await;
    for round in 0..rounds {
        let fresh = round % 2 == 0;
        let topic = format!("order/{round}");
        let mut new_client = None;
        let sub = if fresh {
            let id = format!("order-sub-{round}");
            let (c, ack) = RawClient::connect(addr, connect(version, &id, !persistent, expiry)).await;
            assert_eq!(ack.code, 0);
            new_client.insert(c)
        } else {
            &mut same
        };
        let id = (round % 60000 + 1) as u16;
        let ack = sub.subscribe(id, &topic, sub_options(QoS::AtLeastOnce)).await;
        assert_eq!(ack.reasons, vec![1]);
        publisher.publish(publish_packet(&topic, QoS::AtLeastOnce, id, b"after the SUBACK")).await;
        let p = sub.recv_publish().await;
        assert_eq!(p.topic.as_str(), topic, "round {round}");
        sub.send(&Packet::PubAck(ferry_mqtt::codec::PubResp::ok(p.packet_id.unwrap()))).await;
        if let Some(mut c) = new_client {
            // A persistent session ends too (5.0: expiry 0; 3.1.1: a clean session replaces it).
            c.send(&disconnect(version, Some(0))).await;
            c.expect_close(None).await;
            if persistent && version == V311 {
                let mut clear = RawClient::connect_ok(addr, version, &format!("order-sub-{round}"), true).await;
                clear.send(&disconnect(version, None)).await;
                clear.expect_close(None).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_a_publish_after_the_suback_reaches_a_clean_subscriber() {
    publish_after_suback(V5, false, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_a_publish_after_the_suback_reaches_a_persistent_subscriber() {
    publish_after_suback(V5, true, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_a_publish_after_the_suback_reaches_a_clean_subscriber() {
    publish_after_suback(V311, false, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_a_publish_after_the_suback_reaches_a_persistent_subscriber() {
    publish_after_suback(V311, true, 200).await;
}

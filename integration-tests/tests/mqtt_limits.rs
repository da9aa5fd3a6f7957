//! The limits as MQTT clients meet them: connection limits (the listener's `max_connections`
//! and the broker's, across protocols) refused with CONNACK 0x97 Quota exceeded (5.0) / 3
//! Server unavailable (3.1.1); `[mqtt] max_queued_messages` keeping the newest messages of an
//! offline session (drop-head); the listener's `max_publish_rate` slowing a publisher down
//! without losing its messages; the listener's `max_connection_rate` making clients wait (in
//! the backlog) rather than refusing them; one SUBSCRIBE with 50,000 filters not stalling the
//! other clients, and `[mqtt] max_subscriptions_per_client` / `max_subscriptions_per_packet`
//! answered SUBACK 0x97 Quota exceeded (5.0) / 0x80 Failure (3.1.1). (Timing is checked only as
//! a lower bound: a limit that does nothing fails it; a slow machine never does. The huge
//! SUBSCRIBE's victim gets a generous upper bound per round trip, 5 s, against the 8.7 s stall
//! it saw before issue 13.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::frontend::Frontend;
use ferry_integration_tests::amqp::{lapin, AMQP_LISTENER};
use ferry_integration_tests::mqtt::{connect_packet, publish_packet, sub_options, RawClient, MQTT_LISTENER};
use ferry_integration_tests::{within, TestServer};
use ferry_mqtt::codec::{Disconnect, Packet, Properties, ProtocolVersion, PubResp, QoS, Str, SubAck, Subscribe};
use ferry_server::config::MqttConfig;

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// CONNACK 0x97 Quota exceeded (5.0).
const QUOTA_EXCEEDED: u8 = 0x97;
/// CONNACK return code 3 Server unavailable (3.1.1).
const SERVER_UNAVAILABLE: u8 = 3;

fn frontends(max_queued_messages: u32) -> Vec<Arc<dyn Frontend>> {
    ferry_server::frontends::builtin(&MqttConfig { max_queued_messages, ..MqttConfig::default() })
}

/// The CONNACK code a client over a connection limit gets.
fn refused_code(version: ProtocolVersion) -> u8 {
    if version == V5 {
        QUOTA_EXCEEDED
    } else {
        SERVER_UNAVAILABLE
    }
}

/// A client over the limit: CONNACK with the refusal code, no session, then the broker closes.
async fn assert_refused(addr: SocketAddr, version: ProtocolVersion, client_id: &str) {
    let (mut c, ack) = RawClient::connect(addr, connect_packet(version, client_id, true)).await;
    assert_eq!(ack.code, refused_code(version), "{version:?} client {client_id}: {ack:?}");
    assert!(!ack.session_present);
    let after = c.closed().await;
    assert!(after.is_empty(), "nothing after the refusal, got {after:?}");
}

/// Disconnects normally and waits for the broker to close the connection.
async fn disconnect(mut c: RawClient) {
    c.send(&Packet::Disconnect(Disconnect { reason: 0, properties: Properties::default() })).await;
    c.expect_close(None).await;
}

/// Connects once a slot is free. A connection frees its slot when its task ends, a moment
/// after its client sees the close, so a client right after may still be refused: it tries
/// again (each try a whole CONNECT/CONNACK exchange, no sleeping), refused meanwhile with
/// the refusal code only.
async fn connect_when_free(addr: SocketAddr, version: ProtocolVersion, client_id: &str) -> RawClient {
    within("a freed slot admits a new client", async {
        loop {
            let (c, ack) = RawClient::connect(addr, connect_packet(version, client_id, true)).await;
            if ack.code == 0 {
                return c;
            }
            assert_eq!(ack.code, refused_code(version), "{ack:?}");
        }
    })
    .await
}

// ----- connection limits -------------------------------------------------------------------------

#[tokio::test]
async fn listener_max_connections_refuses_the_third_client_in_its_protocol_version() {
    let server = TestServer::start(&format!("{MQTT_LISTENER}max_connections = 2\n"), &frontends(1000)).await;
    let addr = server.mqtt_addr();
    let first = RawClient::connect_ok(addr, V5, "first", true).await;
    let mut second = RawClient::connect_ok(addr, V311, "second", true).await;

    assert_refused(addr, V5, "third-v5").await;
    assert_refused(addr, V311, "third-v311").await;
    // A refused client claimed nothing: its client id is free, and the admitted ones are
    // untouched.
    second.ping().await;

    disconnect(first).await;
    let mut fourth = connect_when_free(addr, V5, "third-v5").await;
    fourth.ping().await;
    // Full again.
    assert_refused(addr, V311, "fifth").await;
    second.ping().await;
}

#[tokio::test]
async fn broker_max_connections_counts_every_protocol() {
    let toml = format!("[broker]\nmax_connections = 2\n{MQTT_LISTENER}{AMQP_LISTENER}");
    let server = TestServer::start(&toml, &frontends(1000)).await;
    let addr = server.mqtt_addr();
    let mut mqtt = RawClient::connect_ok(addr, V311, "mqtt-1", true).await;
    let amqp = lapin(&server).await;

    // One MQTT and one AMQP connection fill the broker's two slots.
    assert_refused(addr, V5, "mqtt-2").await;
    assert_refused(addr, V311, "mqtt-3").await;
    mqtt.ping().await;

    // The AMQP connection leaves: an MQTT client takes its slot.
    within("AMQP connection closes", amqp.close(200, "bye".into())).await.expect("connection.close");
    let mut next = connect_when_free(addr, V5, "mqtt-2").await;
    next.ping().await;
    assert_refused(addr, V5, "mqtt-4").await;
}

// ----- max_queued_messages -----------------------------------------------------------------------

/// A persistent 3.1.1 session subscribed to `limits/#` at QoS 1, then offline.
async fn offline_session(addr: SocketAddr, client_id: &str) {
    let mut c = RawClient::connect_ok(addr, V311, client_id, false).await;
    c.subscribe(1, "limits/#", sub_options(QoS::AtLeastOnce)).await;
    // Once the broker closes the connection, the session no longer consumes: what is
    // published now is queued.
    disconnect(c).await;
}

/// Publishes `n` QoS 1 messages `0`, `1`, ... to `limits/q`, each acknowledged (so routed and
/// queued) before the next.
async fn publish_numbered(addr: SocketAddr, n: u16) {
    let mut p = RawClient::connect_ok(addr, V5, "publisher", true).await;
    for i in 0..n {
        p.publish(publish_packet("limits/q", QoS::AtLeastOnce, i + 1, i.to_string().as_bytes())).await;
    }
    disconnect(p).await;
}

/// Resumes the session and takes what it had queued: the payloads, in order, each acked.
async fn resume_and_drain(addr: SocketAddr, client_id: &str, expected: usize) -> Vec<String> {
    let (mut c, ack) = RawClient::connect(addr, connect_packet(V311, client_id, false)).await;
    assert_eq!(ack.code, 0, "{ack:?}");
    assert!(ack.session_present, "the session was kept");
    let mut got = Vec::new();
    for _ in 0..expected {
        let p = c.recv_publish().await;
        assert_eq!(p.qos, QoS::AtLeastOnce);
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
        c.send(&Packet::PubAck(PubResp::ok(p.packet_id.unwrap()))).await;
    }
    // Nothing else was queued (bounded wait for a message that must not come).
    c.quiet().await;
    disconnect(c).await;
    got
}

fn numbered(range: std::ops::Range<u16>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

#[tokio::test]
async fn max_queued_messages_keeps_the_newest_of_an_offline_session() {
    let server = TestServer::start(MQTT_LISTENER, &frontends(5)).await;
    let addr = server.mqtt_addr();
    offline_session(addr, "sleeper").await;
    publish_numbered(addr, 20).await;
    // Drop-head: the 15 oldest made room for the newer ones.
    assert_eq!(resume_and_drain(addr, "sleeper", 5).await, numbered(15..20));
}

#[tokio::test]
async fn max_queued_messages_of_a_session_queue_holds_across_a_restart() {
    let server = TestServer::start(MQTT_LISTENER, &frontends(5)).await;
    offline_session(server.mqtt_addr(), "sleeper").await;
    // The limit is the queue's (stored with it): after a restart with the default setting
    // (1000), the session's queue still holds 5.
    let server = server.restart().await;
    let addr = server.mqtt_addr();
    publish_numbered(addr, 20).await;
    assert_eq!(resume_and_drain(addr, "sleeper", 5).await, numbered(15..20));
}

#[tokio::test]
async fn a_session_queue_made_without_a_limit_is_resumed_as_it_is() {
    // max_queued_messages = 0: no limit on the queue.
    let server = TestServer::start(MQTT_LISTENER, &frontends(0)).await;
    offline_session(server.mqtt_addr(), "old").await;
    // Restarted with a limit of 5: the existing queue is resumed (the CONNECT succeeds) and
    // keeps its arguments; the limit applies to session queues made from now on.
    let dir = server.stop().await;
    let server = TestServer::resume_with(dir, &frontends(5)).await;
    let addr = server.mqtt_addr();
    offline_session(addr, "new").await;
    publish_numbered(addr, 20).await;
    assert_eq!(resume_and_drain(addr, "old", 20).await, numbered(0..20));
    assert_eq!(resume_and_drain(addr, "new", 5).await, numbered(15..20));
}

// ----- max_publish_rate --------------------------------------------------------------------------

#[tokio::test]
async fn max_publish_rate_slows_a_publisher_down_without_dropping() {
    let server = TestServer::start(&format!("{MQTT_LISTENER}max_publish_rate = 20\n"), &frontends(1000)).await;
    let addr = server.mqtt_addr();
    let mut sub = RawClient::connect_ok(addr, V5, "sub", true).await;
    sub.subscribe(1, "rate/#", sub_options(QoS::AtMostOnce)).await;
    let mut publisher = RawClient::connect_ok(addr, V311, "fast", true).await;

    // 60 QoS 0 PUBLISHes in one write.
    let mut bytes = Vec::new();
    for i in 0..60u16 {
        let p = publish_packet("rate/t", QoS::AtMostOnce, 0, i.to_string().as_bytes());
        bytes.extend(ferry_integration_tests::mqtt::packet_bytes(&Packet::Publish(p), V311));
    }
    let started = Instant::now();
    publisher.send_bytes(&bytes).await;
    let mut got = Vec::new();
    for _ in 0..60 {
        let p = sub.recv_publish().await;
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    let took = started.elapsed();
    assert_eq!(got, numbered(0..60), "all delivered, in order");
    // 20 at once (the bucket holds one second's worth), then 20 a second: the last 40 take at
    // least 2 s. Only a lower bound, and a loose one.
    assert!(took >= Duration::from_millis(1500), "60 messages at 20/s took {took:?}");
    // The publisher was paused, not dropped.
    publisher.ping().await;
}

#[tokio::test]
async fn max_connection_rate_makes_clients_wait_and_refuses_none() {
    let server = TestServer::start(&format!("{MQTT_LISTENER}max_connection_rate = 5\n"), &frontends(1000)).await;
    let started = Instant::now();
    let mut clients = Vec::new();
    // A burst of 5, then 5 per second: the 12th is accepted no sooner than 1.4 s in.
    for i in 0..12 {
        let (c, ack) = RawClient::connect(server.mqtt_addr(), connect_packet(V5, &format!("rate-{i}"), true)).await;
        assert_eq!(ack.code, 0, "client {i} is let in, only later");
        clients.push(c);
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1200), "12 connections at 5/s took only {took:?}");
}

// ----- subscriptions -----------------------------------------------------------------------------

fn subscription_limits(per_client: u32, per_packet: u32) -> Vec<Arc<dyn Frontend>> {
    ferry_server::frontends::builtin(&MqttConfig {
        max_subscriptions_per_client: per_client,
        max_subscriptions_per_packet: per_packet,
        ..MqttConfig::default()
    })
}

/// One SUBSCRIBE with `n` distinct filters `atk/<i>/x` at QoS 1.
fn huge_subscribe(n: usize) -> Subscribe {
    let options = sub_options(QoS::AtLeastOnce);
    Subscribe {
        packet_id: 7,
        properties: Properties::default(),
        filters: (0..n).map(|i| (Str::from(format!("atk/{i}/x").as_str()), options)).collect(),
    }
}

/// What a round trip of the victim may take at most while the attacker works: generous (a debug
/// build on a shared machine), and well under the seconds-long stalls a huge SUBSCRIBE caused.
const VICTIM_PATIENCE: Duration = Duration::from_secs(5);

/// The victim's QoS 1 round trips (publish, PUBACK, its own message back) until `done` ends;
/// each must finish within [`VICTIM_PATIENCE`]. Returns how many there were.
async fn victim_round_trips<T>(
    victim: &mut RawClient,
    next_id: &mut u16,
    done: tokio::task::JoinHandle<T>,
) -> (usize, T) {
    let mut rounds = 0;
    tokio::pin!(done);
    loop {
        let id = *next_id;
        *next_id = if id == u16::MAX { 1 } else { id + 1 };
        let round = async {
            victim.publish(publish_packet("victim/t", QoS::AtLeastOnce, id, &id.to_be_bytes())).await;
            let p = victim
                .expect("the victim's own message", |p| match p {
                    Packet::Publish(p) => Some(p.clone()),
                    _ => None,
                })
                .await;
            assert_eq!(&p.payload[..], &id.to_be_bytes(), "the victim's messages arrive, in order");
            victim.send(&Packet::PubAck(PubResp::ok(p.packet_id.expect("QoS 1")))).await;
        };
        match tokio::time::timeout(VICTIM_PATIENCE, round).await {
            Ok(()) => rounds += 1,
            Err(_) => panic!("a victim round trip took over {VICTIM_PATIENCE:?} (after {rounds})"),
        }
        if done.is_finished() {
            return (rounds, done.await.expect("the attacker's task"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_subscribe_and_its_teardown_do_not_stall_other_clients() {
    // No per-packet limit, so that all 50,000 filters are worked on (40,000 of them bound).
    const FILTERS: usize = 50_000;
    const ALLOWED: usize = 40_000;
    let server = TestServer::start(MQTT_LISTENER, &subscription_limits(ALLOWED as u32, 0)).await;
    let addr = server.mqtt_addr();
    let mut victim = RawClient::connect_ok(addr, V311, "victim", true).await;
    victim.subscribe(1, "victim/t", sub_options(QoS::AtLeastOnce)).await;
    let mut next_id = 1;

    // The packet is under the default 1 MiB limit.
    let subscribe = huge_subscribe(FILTERS);
    let size = ferry_integration_tests::mqtt::packet_bytes(&Packet::Subscribe(subscribe.clone()), V5).len();
    assert!(size < 1 << 20, "{size} bytes");
    let mut attacker = RawClient::connect_ok(addr, V5, "attacker", true).await;
    let subscribing = tokio::spawn(async move {
        let ack: SubAck = attacker.subscribe_with(subscribe).await;
        (attacker, ack)
    });
    let (during_subscribe, (mut attacker, ack)) = victim_round_trips(&mut victim, &mut next_id, subscribing).await;
    assert_eq!(ack.reasons.len(), FILTERS);
    assert!(ack.reasons[..ALLOWED].iter().all(|&c| c == 1), "granted QoS 1 up to the limit");
    assert!(ack.reasons[ALLOWED..].iter().all(|&c| c == QUOTA_EXCEEDED), "0x97 past it");
    let topic = server.server.broker().vhost("/").unwrap().exchange("amq.topic").unwrap();
    assert_eq!(topic.binding_count(), ALLOWED + 1, "the attacker's and the victim's");
    // The subscriptions work: a message to one of them reaches the attacker.
    victim.publish(publish_packet("atk/39999/x", QoS::AtLeastOnce, 60_000, b"hit")).await;
    let hit = attacker.recv_publish().await;
    assert_eq!((hit.topic.as_str(), &hit.payload[..]), ("atk/39999/x", &b"hit"[..]));

    // The attacker leaves: its 40,000 subscriptions go while the victim goes on.
    let leaving = tokio::spawn(async move { disconnect(attacker).await });
    let (during_teardown, ()) = victim_round_trips(&mut victim, &mut next_id, leaving).await;
    within("the attacker's bindings are removed", async {
        while topic.binding_count() != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    eprintln!("victim round trips: {during_subscribe} during the subscribe, {during_teardown} during the teardown");
    victim.ping().await;
}

#[tokio::test]
async fn filters_past_max_subscriptions_per_packet_get_quota_exceeded_or_failure() {
    // The defaults: 1,000 filters per SUBSCRIBE, 10,000 subscriptions per client.
    let server = TestServer::start(MQTT_LISTENER, &frontends(1000)).await;
    let addr = server.mqtt_addr();
    for (version, refused) in [(V5, QUOTA_EXCEEDED), (V311, 0x80)] {
        let mut c = RawClient::connect_ok(addr, version, &format!("many-{version:?}"), true).await;
        let ack = c.subscribe_with(huge_subscribe(1_500)).await;
        assert_eq!(ack.reasons.len(), 1_500);
        assert!(ack.reasons[..1_000].iter().all(|&r| r == 1), "{version:?}");
        assert!(ack.reasons[1_000..].iter().all(|&r| r == refused), "{version:?}");
        disconnect(c).await;
    }
}

#[tokio::test]
async fn max_subscriptions_per_client_counts_new_filters_only() {
    let server = TestServer::start(MQTT_LISTENER, &subscription_limits(3, 0)).await;
    let addr = server.mqtt_addr();
    for (version, refused) in [(V5, QUOTA_EXCEEDED), (V311, 0x80)] {
        let mut c = RawClient::connect_ok(addr, version, &format!("capped-{version:?}"), true).await;
        assert_eq!(c.subscribe_with(huge_subscribe(2)).await.reasons, vec![1, 1]);
        // `atk/0/x` and `atk/1/x` again replace theirs; `atk/2/x` is the third; `atk/3/x` is one too many.
        assert_eq!(c.subscribe_with(huge_subscribe(4)).await.reasons, vec![1, 1, 1, refused], "{version:?}");
        // The refused filter was not subscribed: a message to it goes nowhere, one to a granted
        // filter arrives.
        c.publish(publish_packet("atk/3/x", QoS::AtMostOnce, 0, b"no")).await;
        c.publish(publish_packet("atk/2/x", QoS::AtMostOnce, 0, b"yes")).await;
        assert_eq!(&c.recv_publish().await.payload[..], b"yes");
        disconnect(c).await;
    }
}

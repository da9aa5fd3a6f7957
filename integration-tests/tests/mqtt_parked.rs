//! Idle MQTT connections parked without a task (issue 18, `ferry_mqtt::park`): a parked
//! connection is still a connection in every way its client and the broker can see. It gets its
//! messages, answers its PINGREQs, is closed when its keep alive runs out, is taken over, closed
//! from outside and at shutdown (within the grace period, counted as closed), holds its place
//! under the connection limit, and publishes its will when its client goes away; a DISCONNECT
//! sent just before a reconnect still counts. The counts of parked and unparked connections say
//! that the connection in each test was parked when the thing happened.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::frontend::Frontend;
use ferry_integration_tests::mqtt::{connect_packet, publish_packet, sub_options, will, RawClient, MQTT_LISTENER};
use ferry_integration_tests::{within, TestServer};
use ferry_mqtt::codec::{Disconnect, Packet, Properties, ProtocolVersion, PubResp, QoS};
use ferry_mqtt::{MqttFrontend, Settings};

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// A server with one MQTT listener (`listener_keys` added to it) and the frontend, to read its
/// counts from.
async fn server(broker_keys: &str, listener_keys: &str) -> (TestServer, Arc<MqttFrontend>) {
    let frontend = Arc::new(MqttFrontend::new(Settings::default()));
    let as_frontend: Arc<dyn Frontend> = frontend.clone();
    let toml = format!("{broker_keys}{MQTT_LISTENER}{listener_keys}");
    (TestServer::start(&toml, &[as_frontend]).await, frontend)
}

/// (parked now, unparked so far).
fn counts(frontend: &MqttFrontend) -> (usize, usize) {
    frontend.shared().parked_connections().unwrap_or((0, 0))
}

/// Waits until `n` connections are parked (a connection that has subscribed and moved no message
/// yet parks as soon as it is idle; any other, after two sweeps of 250 ms).
async fn parked(frontend: &MqttFrontend, n: usize) {
    within(&format!("{n} parked (counts {:?})", counts(frontend)), frontend.shared().parked_reaches(n)).await;
}

/// A client that watches for wills.
async fn will_watcher(addr: std::net::SocketAddr) -> RawClient {
    let mut watcher = RawClient::connect_ok(addr, V5, "watcher", true).await;
    watcher.subscribe(1, "wills/#", sub_options(QoS::AtLeastOnce)).await;
    watcher
}

fn disconnect() -> Packet {
    Packet::Disconnect(Disconnect { reason: 0, properties: Properties::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_subscriber_gets_its_messages_and_parks_again() {
    let (server, frontend) = server("", "").await;
    let addr = server.mqtt_addr();
    for version in [V311, V5] {
        let mut sub = RawClient::connect_ok(addr, version, "device", true).await;
        assert_eq!(sub.subscribe(1, "devices/device/cmd", sub_options(QoS::AtLeastOnce)).await.reasons, vec![1]);
        parked(&frontend, 1).await;
        let mut publisher = RawClient::connect_ok(addr, version, "backend", true).await;
        parked(&frontend, 2).await;
        let unparked = counts(&frontend).1;
        for round in 0..3u16 {
            let payload = format!("command {round}");
            publisher
                .publish(publish_packet("devices/device/cmd", QoS::AtLeastOnce, round + 1, payload.as_bytes()))
                .await;
            let p = within("the command", sub.recv_publish()).await;
            assert_eq!(&p.payload[..], payload.as_bytes(), "{version:?}");
            sub.send(&Packet::PubAck(PubResp::ok(p.packet_id.expect("QoS 1")))).await;
            // Both moved a message: they park again once the sweep finds them idle.
            parked(&frontend, 2).await;
        }
        assert!(counts(&frontend).1 >= unparked + 6, "each command unparked both: {:?}", counts(&frontend));
        // A QoS 0 message too, and one to a topic it did not subscribe to does not wake it.
        publisher.publish(publish_packet("devices/other/cmd", QoS::AtMostOnce, 0, b"not yours")).await;
        publisher.publish(publish_packet("devices/device/cmd", QoS::AtMostOnce, 0, b"qos 0")).await;
        assert_eq!(&within("the QoS 0 command", sub.recv_publish()).await.payload[..], b"qos 0");
        publisher.send(&disconnect()).await;
        publisher.expect_close(None).await;
        sub.send(&disconnect()).await;
        sub.expect_close(None).await;
        parked(&frontend, 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_answers_its_pings_and_is_closed_when_its_keep_alive_runs_out() {
    let (server, frontend) = server("", "").await;
    let mut c = connect_packet(V5, "pinger", true);
    c.keep_alive = 1;
    let (mut client, ack) = RawClient::connect(server.mqtt_addr(), c).await;
    assert_eq!(ack.code, 0);
    // Not subscribed: it parks once the sweep has found it idle twice.
    let mut pinged = Instant::now();
    for _ in 0..3 {
        parked(&frontend, 1).await;
        let unparked = counts(&frontend).1;
        pinged = Instant::now();
        within("PINGRESP", client.ping()).await;
        assert!(counts(&frontend).1 > unparked);
        // Not parked again at once, only once two sweeps 250 ms apart found it idle: PINGREQs
        // back to back do not park and unpark it for each.
        parked(&frontend, 1).await;
        assert!(pinged.elapsed() >= Duration::from_millis(200), "parked again {:?} after", pinged.elapsed());
    }
    parked(&frontend, 1).await;
    // Silent past 1.5 × 1 s: DISCONNECT 0x8D Keep Alive timeout, parked or not. Not before 1.5 s
    // after its last packet (the broker read it after it was sent; the registry keeps deadlines
    // in whole milliseconds). Counted from here it was only about a second: the re-park above
    // takes two sweeps 250 ms apart after the ping, and took just over 500 ms once in CI.
    client.expect_close(Some(0x8D)).await;
    assert!(pinged.elapsed() >= Duration::from_millis(1_498), "closed {:?} after its last ping", pinged.elapsed());
    parked(&frontend, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_taken_over_and_closed_from_outside() {
    let (server, frontend) = server("", "").await;
    let addr = server.mqtt_addr();
    let mut watcher = will_watcher(addr).await;

    // Taken over while parked: DISCONNECT 0x8E, and its will (a new connection with a clean
    // start ends the session).
    let mut c = connect_packet(V5, "device", true);
    c.will = Some(will("wills/device", b"gone", QoS::AtLeastOnce, false));
    let (mut old, _) = RawClient::connect(addr, c).await;
    parked(&frontend, 2).await;
    let mut new = RawClient::connect_ok(addr, V5, "device", true).await;
    old.expect_close(Some(0x8E)).await;
    assert_eq!(&within("the will", watcher.recv_publish()).await.payload[..], b"gone");
    parked(&frontend, 2).await;

    // Closed from outside (the management API's close) while parked: DISCONNECT 0x98.
    let broker = server.server.broker().clone();
    let id = broker
        .connections()
        .list()
        .into_iter()
        .find(|c| c.client_id.as_deref() == Some("device"))
        .expect("the device's connection")
        .id;
    assert!(broker.connections().close(id, "maintenance"));
    new.expect_close(Some(0x98)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_sent_to_a_parked_connection_just_before_a_reconnect_counts() {
    let (server, frontend) = server("", "").await;
    let addr = server.mqtt_addr();
    let mut watcher = will_watcher(addr).await;
    for version in [V311, V5] {
        for round in 0..10 {
            let mut c = connect_packet(version, "device", true);
            c.will = Some(will("wills/device", b"gone", QoS::AtLeastOnce, false));
            let (mut old, ack) = RawClient::connect(addr, c).await;
            assert_eq!(ack.code, 0);
            parked(&frontend, 2).await;
            // DISCONNECT, close, and connect again at once: the old connection is woken by the
            // takeover and by its socket; the DISCONNECT must count (no will).
            old.send(&disconnect()).await;
            old.drop_connection();
            let mut new = RawClient::connect_ok(addr, version, "device", true).await;
            new.send(&disconnect()).await;
            new.expect_close(None).await;
            let seen = watcher.next_within(Duration::from_millis(100)).await;
            assert!(seen.is_err(), "{version:?} round {round}: a will after a DISCONNECT: {seen:?}");
        }
    }
    // Its client gone without a DISCONNECT, a parked connection publishes its will.
    let mut c = connect_packet(V311, "device", true);
    c.will = Some(will("wills/device", b"lost", QoS::AtLeastOnce, false));
    let (old, _) = RawClient::connect(addr, c).await;
    parked(&frontend, 2).await;
    old.drop_connection();
    assert_eq!(&within("the will", watcher.recv_publish()).await.payload[..], b"lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_holds_its_slot_and_is_closed_at_shutdown_within_the_grace() {
    let (server, frontend) = server("[broker]\nshutdown_grace_secs = 5\n", "max_connections = 2\n").await;
    let addr = server.mqtt_addr();
    let mut a = RawClient::connect_ok(addr, V5, "a", true).await;
    let mut b = RawClient::connect_ok(addr, V311, "b", true).await;
    parked(&frontend, 2).await;
    // Both slots are taken by parked connections: a third is refused (CONNACK 0x97).
    let (mut c, ack) = RawClient::connect(addr, connect_packet(V5, "c", true)).await;
    assert_eq!(ack.code, 0x97);
    c.closed().await;
    assert_eq!(counts(&frontend).0, 2);

    let TestServer { server, dir: _dir } = server;
    let started = Instant::now();
    let report = within("shutdown", server.shutdown()).await.expect("shutdown");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    // None aborted. (The closed count is what was open when the listener stopped accepting:
    // the frontend's shutdown watcher may have ended parked connections a moment before.)
    assert_eq!(report.connections_aborted, 0);
    assert!(report.connections_closed <= 2, "{report:?}");
    // 5.0: DISCONNECT 0x8B Server shutting down; 3.1.1: the connection closes.
    a.expect_close(Some(0x8B)).await;
    b.expect_close(None).await;
}

/// A connection parks without its publisher flow control's state (made again when needed,
/// issue 18), and still remembers that it published: an alarm raised while it is parked holds
/// its next PUBLISH back (3.1.1: the disk alarm; no PUBACK, nothing routed) until the alarm
/// clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_publisher_is_still_held_back_by_an_alarm() {
    let (server, frontend) = server("", "").await;
    let addr = server.mqtt_addr();
    let mut sub = RawClient::connect_ok(addr, V311, "watcher", true).await;
    sub.subscribe(1, "telemetry/#", sub_options(QoS::AtLeastOnce)).await;
    let mut publisher = RawClient::connect_ok(addr, V311, "sensor", true).await;
    publisher.publish(publish_packet("telemetry/sensor", QoS::AtLeastOnce, 1, b"before")).await;
    assert_eq!(&within("before", sub.recv_publish()).await.payload[..], b"before");
    parked(&frontend, 2).await;

    let disk = server.server.broker().disk();
    let mut alarm = disk.subscribe();
    disk.watch_free_space(u64::MAX, Box::new(|| None));
    within("the disk alarm", alarm.wait_for(|up| *up)).await.expect("alarm");
    publisher.send(&Packet::Publish(publish_packet("telemetry/sensor", QoS::AtLeastOnce, 2, b"held"))).await;
    // Not read while the alarm is up: no PUBACK, nothing routed.
    publisher.quiet().await;
    assert!(sub.next_within(Duration::from_millis(100)).await.is_err(), "routed while the alarm was up");

    disk.watch_free_space(0, Box::new(|| None));
    within("the alarm clears", alarm.wait_for(|up| !*up)).await.expect("alarm");
    publisher.expect("PUBACK", |p| matches!(p, Packet::PubAck(a) if a.packet_id == 2).then_some(())).await;
    assert_eq!(&within("held", sub.recv_publish()).await.payload[..], b"held");
}

/// A parked session keeps neither its client id nor its user: both come back from the
/// connection's login when it resumes (issue 18). The ACL's `%u` and `%c` grant and refuse after
/// each park as before it, and its own deliveries still reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_resumes_as_its_user_and_client_id() {
    let hash = ferry_core::auth::PasswordHash::argon2id(b"s3cret");
    let keys = format!(
        "[[users]]\nname = \"sensor\"\npassword_hash = \"{hash}\"\n\
         [[acl]]\nuser = \"sensor\"\ntopic = \"sensors/%u/#\"\naccess = \"readwrite\"\n\
         [[acl]]\ntopic = \"clients/%c/out\"\naccess = \"readwrite\"\n"
    );
    let (server, frontend) = server(&keys, "").await;
    // (version, granted with nobody subscribed, refused): 5.0 says 0x10 and 0x87; 3.1.1 has no
    // reason codes, and drops what it refuses (Mosquitto).
    for (version, unheard, denied) in [(V5, 0x10, 0x87), (V311, 0x00, 0x00)] {
        let mut c = connect_packet(version, "dev-1", true);
        c.username = Some("sensor".into());
        c.password = Some(bytes::Bytes::from_static(b"s3cret"));
        let (mut dev, ack) = RawClient::connect(server.mqtt_addr(), c).await;
        assert_eq!(ack.code, 0);
        assert_eq!(dev.subscribe(1, "clients/dev-1/out", sub_options(QoS::AtLeastOnce)).await.reasons, vec![1]);
        parked(&frontend, 1).await;
        let unparked = counts(&frontend).1;
        assert_eq!(dev.puback("sensors/sensor/t", 2).await, unheard, "{version:?}: %u after a park");
        assert!(counts(&frontend).1 > unparked, "the publish unparked it");
        assert_eq!(dev.puback("sensors/other/t", 3).await, denied, "{version:?}");
        parked(&frontend, 1).await;
        assert_eq!(dev.puback("clients/dev-1/out", 4).await, 0x00, "{version:?}: %c after a park");
        let p = within("its own message", dev.recv_publish()).await;
        assert_eq!(p.topic.as_str(), "clients/dev-1/out");
        dev.send(&Packet::PubAck(PubResp::ok(p.packet_id.expect("QoS 1")))).await;
        assert_eq!(dev.puback("clients/dev-2/out", 5).await, denied, "{version:?}");
        dev.send(&disconnect()).await;
        dev.expect_close(None).await;
        parked(&frontend, 0).await;
    }
}

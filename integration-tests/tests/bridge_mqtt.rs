//! MQTT bridges (`[[bridges]]`, the ferry-bridge crate) end to end: a local Ferry bridged to a
//! remote Ferry (another server in this process) or to a real Mosquitto, with rumqttc clients
//! publishing and subscribing on either side. Out and in rules, QoS 1 and 2, 5.0 and 3.1.1
//! remotes, a remote outage and a local restart with a backlog, and two Ferrys bridged both
//! ways without a loop.

use std::net::SocketAddr;
use std::sync::Arc;

use ferry_bridge::{BridgeStatus, LinkState};
use ferry_integration_tests::mosquitto::Mosquitto;
use ferry_integration_tests::mqtt::{text, v311, v5, MQTT_LISTENER};
use ferry_integration_tests::{within, TestServer};

const Q1: rumqttc::QoS = rumqttc::QoS::AtLeastOnce;
const Q2: rumqttc::QoS = rumqttc::QoS::ExactlyOnce;
const V5Q1: v5::QoSOf = v5::QoSOf::AtLeastOnce;
const V5Q2: v5::QoSOf = v5::QoSOf::ExactlyOnce;

fn mqtt_frontend() -> Arc<dyn ferry_core::frontend::Frontend> {
    Arc::new(ferry_mqtt::MqttFrontend::default())
}

/// A port nobody listens on now (the OS's pick), for a server that must come back on it.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A remote that takes TCP connections (in the kernel's backlog) and never answers: the link
/// stays down, and no other test's broker can be given its port while the listener is held.
fn silent_remote() -> (std::net::TcpListener, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// A config with one MQTT listener (on `port`, 0 for any) and bridge `b` to `remote`.
fn bridged_toml(port: u16, remote: SocketAddr, version: &str, rules: &str, extra: &str) -> String {
    format!(
        "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\n\
         [[bridges]]\nname = \"b\"\naddress = \"{remote}\"\nprotocol_version = \"{version}\"\n\
         reconnect_initial_ms = 50\nreconnect_max_ms = 400\n{extra}topics = [{rules}]\n"
    )
}

/// A Ferry with an MQTT listener and bridge `b` to `remote` with `rules`.
async fn bridged(remote: SocketAddr, version: &str, rules: &str) -> TestServer {
    TestServer::start(&bridged_toml(0, remote, version, rules, ""), &[mqtt_frontend()]).await
}

/// A Ferry with one MQTT listener on `port`.
async fn ferry_on(port: u16) -> TestServer {
    TestServer::start(&format!("[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\n"), &[mqtt_frontend()])
        .await
}

async fn status_when(server: &TestServer, what: &str, pred: impl Fn(&BridgeStatus) -> bool) -> BridgeStatus {
    let bridges = server.server.bridges();
    within(what, bridges.wait_for("b", pred)).await.expect("bridge b is running")
}

async fn up(server: &TestServer) {
    status_when(server, "bridge up", |s| s.state == LinkState::Up).await;
}

fn hops_v5(p: &rumqttc::v5::mqttbytes::v5::Publish) -> Option<String> {
    let props = p.properties.as_ref()?;
    props.user_properties.iter().find(|(k, _)| k == ferry_bridge::HOPS).map(|(_, v)| v.clone())
}

fn topic_v5(p: &rumqttc::v5::mqttbytes::v5::Publish) -> &str {
    std::str::from_utf8(&p.topic).expect("UTF-8 topic")
}

// ----- out rules --------------------------------------------------------------------------------

#[tokio::test]
async fn out_rule_forwards_qos1_to_a_v5_remote_in_order_with_prefixes_and_the_hop_count() {
    let remote = TestServer::mqtt().await;
    let mut sub = v5::connect(&remote, "remote-sub").await;
    sub.subscribe("site/#", V5Q1).await;
    let rule = r#"{ pattern = "s/#", direction = "out", qos = 1, local_prefix = "edge/", remote_prefix = "site/" }"#;
    let local = bridged(remote.mqtt_addr(), "5.0", rule).await;
    up(&local).await;
    let mut publisher = v5::connect(&local, "pub").await;
    for i in 0..20 {
        publisher.publish("edge/s/temp", V5Q1, false, format!("m{i}").as_bytes()).await;
    }
    // Not covered by the rule: stays local.
    publisher.publish("other/x", V5Q1, false, b"no").await;
    for i in 0..20 {
        let p = sub.publish_received().await;
        assert_eq!((topic_v5(&p), text(&p.payload)), ("site/s/temp", format!("m{i}").as_str()));
        assert_eq!(p.qos, V5Q1);
        assert_eq!(hops_v5(&p).as_deref(), Some("1"), "one bridge crossed");
    }
    sub.no_publish().await;
    let st = status_when(&local, "20 acknowledged by the remote", |s| s.forwarded_out == 20).await;
    assert_eq!((st.queued, st.in_flight, st.dropped_no_rule), (0, 0, 0), "{st:?}");
    assert_eq!(st.remote, remote.mqtt_addr().to_string());
}

#[tokio::test]
async fn out_rule_forwards_qos2_to_a_v311_remote_in_order() {
    let remote = TestServer::mqtt().await;
    let mut sub = v311::connect(&remote, "remote-sub").await;
    sub.subscribe("s/#", Q2).await;
    let local = bridged(remote.mqtt_addr(), "3.1.1", r##"{ pattern = "s/#", direction = "out", qos = 2 }"##).await;
    up(&local).await;
    let mut publisher = v311::connect(&local, "pub").await;
    for i in 0..20 {
        publisher.publish("s/1", Q2, false, format!("m{i}").as_bytes()).await;
    }
    for i in 0..20 {
        let p = sub.publish_received().await;
        assert_eq!((p.topic.as_str(), text(&p.payload)), ("s/1", format!("m{i}").as_str()));
        assert_eq!(p.qos, Q2, "QoS 2 end to end");
    }
    sub.no_publish().await;
    let st = status_when(&local, "20 completed (PUBCOMP)", |s| s.forwarded_out == 20).await;
    assert_eq!((st.queued, st.in_flight), (0, 0), "{st:?}");
}

#[tokio::test]
async fn a_message_goes_out_at_the_lower_of_its_qos_and_the_rules() {
    let remote = TestServer::mqtt().await;
    let mut sub = v5::connect(&remote, "remote-sub").await;
    sub.subscribe("#", V5Q2).await;
    let local = bridged(remote.mqtt_addr(), "5.0", r##"{ pattern = "#", direction = "out", qos = 1 }"##).await;
    up(&local).await;
    let mut publisher = v5::connect(&local, "pub").await;
    publisher.publish("a", V5Q2, false, b"two").await;
    let p = sub.publish_received().await;
    assert_eq!((text(&p.payload), p.qos), ("two", V5Q1));
}

// ----- in rules ---------------------------------------------------------------------------------

#[tokio::test]
async fn in_rule_brings_qos1_from_a_v5_remote_in_order() {
    let remote = TestServer::mqtt().await;
    let rule = r#"{ pattern = "cmd/#", direction = "in", qos = 1, local_prefix = "here/", remote_prefix = "there/" }"#;
    let local = bridged(remote.mqtt_addr(), "5.0", rule).await;
    let mut sub = v5::connect(&local, "local-sub").await;
    sub.subscribe("here/#", V5Q1).await;
    up(&local).await;
    let mut publisher = v5::connect(&remote, "remote-pub").await;
    for i in 0..20 {
        publisher.publish("there/cmd/7", V5Q1, false, format!("m{i}").as_bytes()).await;
    }
    publisher.publish("elsewhere/cmd/7", V5Q1, false, b"no").await;
    for i in 0..20 {
        let p = sub.publish_received().await;
        assert_eq!((topic_v5(&p), text(&p.payload)), ("here/cmd/7", format!("m{i}").as_str()));
        assert_eq!(p.qos, V5Q1);
        assert_eq!(hops_v5(&p).as_deref(), Some("1"), "the local message carries its hop count");
    }
    sub.no_publish().await;
    let st = status_when(&local, "20 in", |s| s.forwarded_in == 20).await;
    assert_eq!(st.dropped_no_rule, 0, "the remote sends only what the bridge subscribed to");
}

#[tokio::test]
async fn in_rule_brings_qos2_from_a_v311_remote_in_order() {
    let remote = TestServer::mqtt().await;
    let local = bridged(remote.mqtt_addr(), "3.1.1", r##"{ pattern = "cmd/#", direction = "in", qos = 2 }"##).await;
    let mut sub = v311::connect(&local, "local-sub").await;
    sub.subscribe("cmd/#", Q2).await;
    up(&local).await;
    let mut publisher = v311::connect(&remote, "remote-pub").await;
    for i in 0..20 {
        publisher.publish("cmd/1", Q2, false, format!("m{i}").as_bytes()).await;
    }
    for i in 0..20 {
        let p = sub.publish_received().await;
        assert_eq!((p.topic.as_str(), text(&p.payload)), ("cmd/1", format!("m{i}").as_str()));
        assert_eq!(p.qos, Q2);
    }
    sub.no_publish().await;
}

// ----- outages and restarts ---------------------------------------------------------------------

/// A persistent 3.1.1 subscription to `filter` at QoS 1 on `server`, left disconnected.
async fn persistent_subscriber(server: &TestServer, id: &str, filter: &str) {
    let mut o = v311::options(server, id);
    o.set_clean_session(false);
    let (mut c, _) = v311::Client::connect(o).await;
    c.subscribe(filter, Q1).await;
    c.disconnect().await;
}

/// Reconnects that persistent subscriber and reads `n` messages.
async fn read_persistent(server: &TestServer, id: &str, n: usize) -> Vec<String> {
    let mut o = v311::options(server, id);
    o.set_clean_session(false);
    let (mut c, ack) = v311::Client::connect(o).await;
    assert!(ack.session_present);
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        got.push(text(&c.publish_received().await.payload).to_string());
    }
    c.no_publish().await;
    got
}

#[tokio::test]
async fn a_remote_outage_loses_nothing_and_keeps_the_order() {
    const N: usize = 50;
    let port = free_port();
    let remote = ferry_on(port).await;
    persistent_subscriber(&remote, "remote-sub", "s/#").await;
    let rule = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    let local = TestServer::start(&bridged_toml(0, remote.mqtt_addr(), "3.1.1", rule, ""), &[mqtt_frontend()]).await;
    up(&local).await;

    let remote_dir = remote.stop().await;
    let st = status_when(&local, "the bridge notices the outage", |s| s.state != LinkState::Up).await;
    assert!(st.state == LinkState::Connecting || st.state == LinkState::BackingOff, "{st:?}");
    let mut publisher = v311::connect(&local, "pub").await;
    for i in 0..N {
        publisher.publish("s/1", Q1, false, format!("m{i}").as_bytes()).await;
    }
    let st = status_when(&local, "backing off with a cause", |s| s.state == LinkState::BackingOff).await;
    assert_eq!(st.queued + st.in_flight, N as u64, "{st:?}");
    assert!(st.last_error.is_some(), "{st:?}");

    let remote = TestServer::resume(remote_dir).await;
    assert_eq!(remote.mqtt_addr().port(), port);
    let st = status_when(&local, "the backlog forwarded", |s| s.forwarded_out == N as u64).await;
    assert_eq!((st.queued, st.in_flight), (0, 0), "{st:?}");
    assert!(st.connects >= 2, "{st:?}");
    let expected: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(read_persistent(&remote, "remote-sub", N).await, expected);
}

#[tokio::test]
async fn a_backlog_survives_a_restart_of_the_bridging_broker() {
    const N: usize = 30;
    let port = free_port();
    let remote = ferry_on(port).await;
    persistent_subscriber(&remote, "remote-sub", "s/#").await;
    let remote_dir = remote.stop().await;

    let rule = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    let remote_addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let local = TestServer::start(&bridged_toml(0, remote_addr, "5.0", rule, ""), &[mqtt_frontend()]).await;
    let mut publisher = v5::connect(&local, "pub").await;
    for i in 0..N {
        publisher.publish("s/1", V5Q1, false, format!("m{i}").as_bytes()).await;
    }
    drop(publisher);
    // The backlog is in the bridge's durable queue: a restart finds it in the store.
    let local = local.restart().await;
    let st = local.server.bridges().status().remove(0);
    assert_eq!(st.queued + st.in_flight, N as u64, "{st:?}");

    let remote = TestServer::resume(remote_dir).await;
    status_when(&local, "the backlog forwarded", |s| s.forwarded_out == N as u64).await;
    let expected: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(read_persistent(&remote, "remote-sub", N).await, expected);
}

#[tokio::test]
async fn drop_oldest_keeps_the_newest_max_queued_messages_and_counts_the_rest() {
    let (_silent, remote_addr) = silent_remote();
    let rule = r##"{ pattern = "#", direction = "out", qos = 1 }"##;
    let toml = bridged_toml(0, remote_addr, "5.0", rule, "max_queued_messages = 5\nmax_inflight = 1\n");
    let local = TestServer::start(&toml, &[mqtt_frontend()]).await;
    let mut publisher = v5::connect(&local, "pub").await;
    for i in 0..12 {
        publisher.publish("a", V5Q1, false, format!("m{i}").as_bytes()).await;
    }
    let st = local.server.bridges().status().remove(0);
    // One message sits with the link (its prefetch window of 1) and five in the queue.
    assert_eq!((st.in_flight, st.queued, st.dropped_overflow), (1, 5, 6), "{st:?}");
}

#[tokio::test]
async fn block_refuses_qos0_publishes_past_max_queued_messages_and_counts_them() {
    let (_silent, remote_addr) = silent_remote();
    let rule = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    let extra = "max_queued_messages = 3\nmax_inflight = 1\noverflow = \"block\"\n";
    let local = TestServer::start(&bridged_toml(0, remote_addr, "5.0", rule, extra), &[mqtt_frontend()]).await;
    // QoS 0: nobody waits for an acknowledgement, so there is nothing to hold; refused.
    let mut publisher = v311::connect(&local, "pub").await;
    for i in 0..6 {
        publisher.publish("s/1", rumqttc::QoS::AtMostOnce, false, format!("m{i}").as_bytes()).await;
    }
    // Handled in order: once this one (not bridged) is acknowledged, the six were handled.
    publisher.publish("elsewhere", Q1, false, b"sync").await;
    let st = local.server.bridges().status().remove(0);
    assert_eq!((st.in_flight, st.queued, st.rejected_overflow, st.dropped_overflow), (1, 3, 2, 0), "{st:?}");
    assert_eq!(st.held_overflow, 0, "{st:?}");
}

/// Reads `n` PUBACKs (3.1.1 client).
async fn pubacks_311(c: &mut v311::Client, n: usize) {
    for _ in 0..n {
        c.expect("PUBACK", |p| matches!(p, v311::Incoming::PubAck(_)).then_some(())).await;
    }
}

#[tokio::test]
async fn block_withholds_the_pubacks_of_a_3_1_1_publisher_until_the_remote_drains_the_queue() {
    let port = free_port();
    let remote_dir = remote_down_with_a_subscriber(port).await;
    let rule = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    let extra = "max_queued_messages = 5\nmax_inflight = 1\noverflow = \"block\"\n";
    let local =
        TestServer::start(&bridged_toml(0, ([127, 0, 0, 1], port).into(), "3.1.1", rule, extra), &[mqtt_frontend()])
            .await;
    let mut publisher = v311::connect(&local, "pub").await;
    for i in 0..8 {
        publisher.client.publish("s/1", Q1, false, format!("m{i}").into_bytes()).await.expect("publish request");
    }
    // m0 sits with the link (its window of 1), m1..m5 fill the queue: six PUBACKs. m6 and m7
    // are taken past the limit, their PUBACKs withheld.
    pubacks_311(&mut publisher, 6).await;
    let st = status_when(&local, "all eight taken", |s| s.queued + s.in_flight == 8).await;
    assert_eq!((st.in_flight, st.queued, st.held_overflow), (1, 7, 2), "{st:?}");
    assert_eq!((st.rejected_overflow, st.dropped_overflow), (0, 0), "{st:?}");
    publisher.none_of("PUBACK", |p| matches!(p, v311::Incoming::PubAck(_))).await;

    // The remote comes back, the queue drains: the withheld PUBACKs come, nothing was lost.
    let remote = TestServer::resume(remote_dir).await;
    pubacks_311(&mut publisher, 2).await;
    let st = status_when(&local, "all forwarded", |s| s.forwarded_out == 8).await;
    assert_eq!((st.queued, st.in_flight, st.rejected_overflow, st.dropped_overflow), (0, 0, 0, 0), "{st:?}");
    let expected: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
    assert_eq!(read_persistent(&remote, "remote-sub", 8).await, expected);
}

/// A remote Ferry on `port` with a persistent subscriber to `s/#` ("remote-sub"), stopped: the
/// bridge backs off until it is resumed, and the subscriber then gets what was forwarded.
async fn remote_down_with_a_subscriber(port: u16) -> tempfile::TempDir {
    let remote = ferry_on(port).await;
    persistent_subscriber(&remote, "remote-sub", "s/#").await;
    remote.stop().await
}

/// Ten bytes each, so that a bytes limit counts messages exactly.
fn ten_bytes(i: usize) -> String {
    format!("m{i:02}-------")
}

#[tokio::test]
async fn drop_oldest_by_max_queued_bytes_keeps_the_newest_and_the_remote_gets_them_in_order() {
    let port = free_port();
    let remote_dir = remote_down_with_a_subscriber(port).await;
    let rule = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    // Bytes only: 50 bytes hold five messages of ten.
    let extra = "max_queued_messages = 0\nmax_queued_bytes = 50\nmax_inflight = 1\n";
    let local =
        TestServer::start(&bridged_toml(0, ([127, 0, 0, 1], port).into(), "5.0", rule, extra), &[mqtt_frontend()])
            .await;
    let mut publisher = v5::connect(&local, "pub").await;
    for i in 0..12 {
        publisher.publish("s/1", V5Q1, false, ten_bytes(i).as_bytes()).await;
    }
    let st = local.server.bridges().status().remove(0);
    // m00 sits with the link (its window of 1); m07..m11 are the newest 50 bytes.
    assert_eq!((st.in_flight, st.queued, st.queued_bytes, st.dropped_overflow), (1, 5, 50, 6), "{st:?}");
    assert_eq!(st.rejected_overflow, 0, "{st:?}");

    let remote = TestServer::resume(remote_dir).await;
    let st = status_when(&local, "the window forwarded", |s| s.forwarded_out == 6).await;
    assert_eq!((st.queued, st.in_flight), (0, 0), "{st:?}");
    let expected: Vec<String> = [0, 7, 8, 9, 10, 11].into_iter().map(ten_bytes).collect();
    assert_eq!(read_persistent(&remote, "remote-sub", 6).await, expected);
}

#[tokio::test]
async fn block_by_max_queued_bytes_holds_local_publishers_and_the_remote_gets_everything_taken() {
    use ferry_integration_tests::amqp::{lapin_uri, AMQP_LISTENER, QUIET};
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::BasicProperties;
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    use rumqttc::v5::Incoming;
    let port = free_port();
    let remote_dir = remote_down_with_a_subscriber(port).await;
    let rule = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    let extra = "max_queued_messages = 0\nmax_queued_bytes = 50\nmax_inflight = 1\noverflow = \"block\"\n";
    let toml = format!("{AMQP_LISTENER}{}", bridged_toml(0, ([127, 0, 0, 1], port).into(), "5.0", rule, extra));
    let local = TestServer::start(&toml, &ferry_server::frontends::builtin(&Default::default())).await;
    let puback = |p: &Incoming| if let Incoming::PubAck(a) = p { Some(a.reason) } else { None };
    // A 5.0 publisher: m00 goes to the link (its window of 1), m01..m05 fill the 50 bytes and
    // are acknowledged; m06 and m07 are taken past the limit, their PUBACKs withheld.
    let mut publisher = v5::connect(&local, "pub5").await;
    for i in 0..8 {
        publisher.client.publish("s/1", V5Q1, false, ten_bytes(i).into_bytes()).await.expect("publish request");
    }
    for _ in 0..6 {
        assert_eq!(publisher.expect("PUBACK", puback).await, PubAckReason::Success);
    }
    status_when(&local, "all eight taken", |s| s.queued + s.in_flight == 8).await;
    // A 3.1.1 publisher is held the same way (it has no negative PUBACK to be told with).
    let mut old = v311::connect(&local, "pub311").await;
    old.client.publish("s/1", Q1, false, b"x-3.1.1---".to_vec()).await.expect("publish request");
    status_when(&local, "the 3.1.1 publish taken", |s| s.queued + s.in_flight == 9).await;
    // An AMQP publisher with confirms: its confirm is withheld.
    let conn = lapin_uri(&format!("amqp://guest:guest@{}/%2f", local.amqp_addr())).await;
    let ch = conn.create_channel().await.unwrap();
    within("confirm.select", ch.confirm_select(ConfirmSelectOptions::default())).await.unwrap();
    let props = BasicProperties::default().with_delivery_mode(2);
    let mut confirm = within(
        "basic.publish",
        ch.basic_publish("amq.topic".into(), "s.1".into(), BasicPublishOptions::default(), b"amqp------", props),
    )
    .await
    .unwrap();
    status_when(&local, "the AMQP publish taken", |s| s.queued + s.in_flight == 10).await;
    assert!(tokio::time::timeout(QUIET, &mut confirm).await.is_err(), "the confirm is withheld");
    publisher.none_of("PUBACK", |p| matches!(p, Incoming::PubAck(_))).await;
    old.none_of("PUBACK", |p| matches!(p, v311::Incoming::PubAck(_))).await;
    // QoS 0 waits for nothing: refused, counted.
    old.publish("s/1", rumqttc::QoS::AtMostOnce, false, b"x-qos0-no-").await;
    let st = status_when(&local, "the QoS 0 publish refused", |s| s.rejected_overflow == 1).await;
    assert_eq!((st.in_flight, st.queued, st.queued_bytes, st.dropped_overflow), (1, 9, 90, 0), "{st:?}");
    assert_eq!(st.held_overflow, 4, "m06, m07, the 3.1.1 and the AMQP publish: {st:?}");

    // The remote comes back and the queue drains: every withheld acknowledgement comes.
    let remote = TestServer::resume(remote_dir).await;
    for _ in 0..2 {
        assert_eq!(publisher.expect("PUBACK", puback).await, PubAckReason::Success);
    }
    old.published(Q1).await;
    assert!(within("the confirm", confirm).await.unwrap().is_ack());
    let st = status_when(&local, "all ten forwarded", |s| s.forwarded_out == 10).await;
    assert_eq!((st.queued, st.in_flight, st.rejected_overflow), (0, 0, 1), "{st:?}");
    let mut expected: Vec<String> = (0..8).map(ten_bytes).collect();
    expected.extend(["x-3.1.1---".to_string(), "amqp------".to_string()]);
    assert_eq!(read_persistent(&remote, "remote-sub", 10).await, expected, "everything taken, in order");
}

#[tokio::test]
async fn a_v5_link_announces_a_receive_maximum_bounding_what_a_remote_can_have_held() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let rule = r##"{ pattern = "#", direction = "in", qos = 1 }"##;
    let _local = bridged(listener.local_addr().expect("addr"), "5.0", rule).await;
    let (mut stream, _) = within("the link connects", listener.accept()).await.expect("accept");
    let mut decoder = ferry_mqtt::codec::Decoder::new(u32::MAX);
    let mut buf = bytes::BytesMut::new();
    let first = within("CONNECT", async {
        loop {
            if let Some(p) = decoder.decode(&mut buf).expect("a decodable packet") {
                return p;
            }
            assert!(stream.read_buf(&mut buf).await.expect("read") > 0, "closed before CONNECT");
        }
    })
    .await;
    let ferry_mqtt::codec::Packet::Connect(c) = first else { panic!("expected CONNECT, got {first:?}") };
    assert_eq!(c.properties.receive_maximum, Some(ferry_core::flow::MAX_PENDING_ACKS as u16));
}

#[tokio::test]
async fn a_refused_login_is_reported_and_retried() {
    let remote = TestServer::start(
        &format!(
            "{MQTT_LISTENER}[[users]]\nname = \"edge\"\npassword_hash = \"{}\"\n",
            ferry_core::auth::PasswordHash::argon2id(b"right")
        ),
        &[mqtt_frontend()],
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("pw"), "wrong\n").expect("write password");
    let rule = r##"{ pattern = "#", direction = "out", qos = 1 }"##;
    let extra = format!("username = \"edge\"\npassword_file = \"{}\"\n", dir.path().join("pw").display());
    let local = TestServer::start(&bridged_toml(0, remote.mqtt_addr(), "5.0", rule, &extra), &[mqtt_frontend()]).await;
    let st = status_when(&local, "refused", |s| s.state == LinkState::BackingOff && s.last_error.is_some()).await;
    let error = st.last_error.unwrap();
    assert!(error.contains("bad user name or password"), "{error}");
    assert_eq!(st.connects, 0);
    assert!(!error.contains("wrong"), "the password is never shown: {error}");
    // The password is read at each attempt: the right one gets the link up.
    std::fs::write(dir.path().join("pw"), "right\n").expect("write password");
    up(&local).await;
}

/// Bindings on the bridge's queue, as routing keys, sorted.
fn queue_bindings(server: &TestServer) -> Vec<String> {
    let vhost = server.server.broker().vhost("/").expect("vhost");
    let x = vhost.exchange("amq.topic").expect("amq.topic");
    let mut keys: Vec<String> = x
        .bindings()
        .into_iter()
        .filter(|b| b.destination.describe() == "queue 'ferry-bridge.b'")
        .map(|b| b.key.routing_key.to_string_lossy())
        .collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn a_rule_removed_from_the_config_takes_its_binding_with_it_at_the_next_start() {
    let (_silent, remote_addr) = silent_remote();
    let a = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    let b = r##"{ pattern = "r/#", direction = "out", qos = 1 }"##;
    let toml = |rules: &str| bridged_toml(0, remote_addr, "5.0", rules, "max_inflight = 1\n");
    let local = TestServer::start(&toml(&format!("{a}, {b}")), &[mqtt_frontend()]).await;
    assert_eq!(queue_bindings(&local), ["r.#", "s.#"]);
    let local = TestServer::start_in(local.stop().await, &toml(a), &[mqtt_frontend()]).await.expect("restart");
    assert_eq!(queue_bindings(&local), ["s.#"], "B's binding is gone");
    let mut publisher = v5::connect(&local, "pub").await;
    publisher.publish("r/1", V5Q1, false, b"B: not for the bridge any more").await;
    publisher.publish("s/1", V5Q1, false, b"A").await;
    let st = local.server.bridges().status().remove(0);
    assert_eq!((st.queued + st.in_flight, st.dropped_no_rule), (1, 0), "only A's message is queued: {st:?}");
    drop(publisher);
    // With B back, its binding is made again; a config without any out rule unbinds the queue
    // and keeps what it holds.
    let local = TestServer::start_in(local.stop().await, &toml(&format!("{a}, {b}")), &[mqtt_frontend()])
        .await
        .expect("restart");
    assert_eq!(queue_bindings(&local), ["r.#", "s.#"]);
    let in_only = r##"{ pattern = "c/#", direction = "in", qos = 1 }"##;
    let local = TestServer::start_in(local.stop().await, &toml(in_only), &[mqtt_frontend()]).await.expect("restart");
    assert_eq!(queue_bindings(&local), Vec::<String>::new());
    let q = local.server.broker().vhost("/").unwrap().queue("ferry-bridge.b").expect("the queue is kept");
    assert_eq!(q.stats().ready, 1, "with its message");
}

// ----- loops ------------------------------------------------------------------------------------

#[tokio::test]
async fn two_ferrys_bridged_both_ways_on_everything_deliver_once_and_never_loop() {
    let (port_a, port_b) = (free_port(), free_port());
    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let rule = r##"{ pattern = "#", direction = "out", qos = 1 }"##;
    let a = TestServer::start(&bridged_toml(port_a, addr(port_b), "5.0", rule, ""), &[mqtt_frontend()]).await;
    let b = TestServer::start(&bridged_toml(port_b, addr(port_a), "5.0", rule, ""), &[mqtt_frontend()]).await;
    up(&a).await;
    up(&b).await;
    let mut sub_a = v5::connect(&a, "sub-a").await;
    sub_a.subscribe("t/#", V5Q1).await;
    let mut sub_b = v5::connect(&b, "sub-b").await;
    sub_b.subscribe("t/#", V5Q1).await;

    let mut pub_a = v5::connect(&a, "pub-a").await;
    pub_a.publish("t/1", V5Q1, false, b"from a").await;
    assert_eq!(text(&sub_a.publish_received().await.payload), "from a");
    let p = sub_b.publish_received().await;
    assert_eq!((text(&p.payload), hops_v5(&p).as_deref()), ("from a", Some("1")));
    // On B the message is at max_hops: B's bridge does not send it back.
    status_when(&b, "B holds it back", |s| s.dropped_max_hops == 1).await;
    sub_a.no_publish().await;
    sub_b.no_publish().await;

    let mut pub_b = v5::connect(&b, "pub-b").await;
    pub_b.publish("t/2", V5Q1, false, b"from b").await;
    assert_eq!(text(&sub_b.publish_received().await.payload), "from b");
    assert_eq!(text(&sub_a.publish_received().await.payload), "from b");
    status_when(&a, "A holds it back", |s| s.dropped_max_hops == 1).await;
    sub_a.no_publish().await;
    sub_b.no_publish().await;
}

#[tokio::test]
async fn a_ring_of_three_with_max_hops_2_delivers_once_everywhere_and_never_comes_back() {
    let ports = [free_port(), free_port(), free_port()];
    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let rule = r##"{ pattern = "#", direction = "out", qos = 1 }"##;
    let mut nodes = Vec::new();
    for i in 0..3 {
        let toml = bridged_toml(ports[i], addr(ports[(i + 1) % 3]), "5.0", rule, "max_hops = 2\n");
        nodes.push(TestServer::start(&toml, &[mqtt_frontend()]).await);
    }
    let mut subs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        up(node).await;
        let mut sub = v5::connect(node, &format!("sub-{i}")).await;
        sub.subscribe("t/#", V5Q1).await;
        subs.push(sub);
    }
    let mut publisher = v5::connect(&nodes[0], "pub").await;
    publisher.publish("t/1", V5Q1, false, b"round").await;
    // A → B (1 hop) → C (2 hops); C holds it back instead of sending it to A again.
    for (i, hops) in [(0, None), (1, Some("1")), (2, Some("2"))] {
        let p = subs[i].publish_received().await;
        assert_eq!((text(&p.payload), hops_v5(&p).as_deref()), ("round", hops), "node {i}");
    }
    status_when(&nodes[2], "C holds it back", |s| s.dropped_max_hops == 1).await;
    for sub in &mut subs {
        sub.no_publish().await;
    }
}

#[tokio::test]
async fn one_bridge_both_ways_on_everything_does_not_echo() {
    let remote = TestServer::mqtt().await;
    let local = bridged(remote.mqtt_addr(), "5.0", r##"{ pattern = "#", direction = "both", qos = 1 }"##).await;
    up(&local).await;
    let mut sub_l = v5::connect(&local, "sub-l").await;
    sub_l.subscribe("t/#", V5Q1).await;
    let mut sub_r = v5::connect(&remote, "sub-r").await;
    sub_r.subscribe("t/#", V5Q1).await;

    let mut pub_l = v5::connect(&local, "pub-l").await;
    pub_l.publish("t/1", V5Q1, false, b"local").await;
    assert_eq!(text(&sub_l.publish_received().await.payload), "local");
    assert_eq!(text(&sub_r.publish_received().await.payload), "local");
    sub_l.no_publish().await;
    sub_r.no_publish().await;

    let mut pub_r = v5::connect(&remote, "pub-r").await;
    pub_r.publish("t/2", V5Q1, false, b"remote").await;
    assert_eq!(text(&sub_r.publish_received().await.payload), "remote");
    assert_eq!(text(&sub_l.publish_received().await.payload), "remote");
    // Routed into the bridge's own queue by the `#` out rule, and held back there.
    status_when(&local, "held back", |s| s.dropped_loop + s.dropped_max_hops == 1).await;
    sub_l.no_publish().await;
    sub_r.no_publish().await;
    let st = local.server.bridges().status().remove(0);
    assert_eq!((st.forwarded_out, st.forwarded_in), (1, 1), "{st:?}");
}

// ----- a real Mosquitto -------------------------------------------------------------------------

async fn mosquitto_round_trip(version: &str) {
    let Some(mosquitto) = Mosquitto::start("").await else { return };
    let rules = r#"{ pattern = "up/#", direction = "out", qos = 1, remote_prefix = "edge/" },
                   { pattern = "down/#", direction = "in", qos = 2 }"#;
    let local = bridged(mosquitto.addr(), version, rules).await;
    let mut o = rumqttc::v5::MqttOptions::new("mosq-client", "127.0.0.1", mosquitto.port);
    o.set_keep_alive(std::time::Duration::from_secs(30));
    let (mut remote_client, _) = v5::Client::connect(o).await;
    remote_client.subscribe("edge/#", V5Q1).await;
    let mut local_client = v5::connect(&local, "local").await;
    local_client.subscribe("down/#", V5Q2).await;
    up(&local).await;

    for i in 0..10 {
        local_client.publish("up/t", V5Q1, false, format!("u{i}").as_bytes()).await;
        remote_client.publish("down/t", V5Q2, false, format!("d{i}").as_bytes()).await;
    }
    for i in 0..10 {
        let p = remote_client.publish_received().await;
        assert_eq!((topic_v5(&p), text(&p.payload)), ("edge/up/t", format!("u{i}").as_str()));
        let p = local_client.publish_received().await;
        assert_eq!((topic_v5(&p), text(&p.payload), p.qos), ("down/t", format!("d{i}").as_str(), V5Q2));
    }
    let st = status_when(&local, "all acknowledged", |s| s.forwarded_out == 10 && s.forwarded_in == 10).await;
    assert_eq!((st.queued, st.in_flight), (0, 0), "{st:?}");
    drop(mosquitto);
}

#[tokio::test]
async fn mosquitto_v5_remote_both_directions() {
    mosquitto_round_trip("5.0").await;
}

#[tokio::test]
async fn mosquitto_v311_remote_both_directions() {
    mosquitto_round_trip("3.1.1").await;
}

// ----- TLS --------------------------------------------------------------------------------------

/// A remote with a plain MQTT listener (0) and a TLS one that requires a client certificate (1).
async fn tls_remote() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    ferry_integration_tests::write_pki(dir.path());
    let toml = format!(
        "{MQTT_LISTENER}[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
         tls = {{ cert = \"server.pem\", key = \"server.key\", client_ca = \"ca.pem\", require_client_cert = true }}\n"
    );
    TestServer::start_in(dir, &toml, &[mqtt_frontend()]).await.unwrap_or_else(|e| panic!("{e}"))
}

fn tls_table(remote: &TestServer, server_name: &str) -> String {
    let d = remote.dir.path();
    format!(
        "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\", server_name = \"{server_name}\" }}\n",
        d.join("ca.pem").display(),
        d.join("client.pem").display(),
        d.join("client.key").display()
    )
}

#[tokio::test]
async fn a_bridge_over_tls_with_a_client_certificate_forwards() {
    let remote = tls_remote().await;
    let mut sub = v5::connect(&remote, "remote-sub").await;
    sub.subscribe("s/#", V5Q1).await;
    let rule = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    let toml = bridged_toml(0, remote.addr(1), "5.0", rule, &tls_table(&remote, "localhost"));
    let local = TestServer::start(&toml, &[mqtt_frontend()]).await;
    up(&local).await;
    let mut publisher = v5::connect(&local, "pub").await;
    publisher.publish("s/1", V5Q1, false, b"over TLS").await;
    assert_eq!(text(&sub.publish_received().await.payload), "over TLS");
}

#[tokio::test]
async fn a_tls_name_mismatch_is_reported_and_retried_without_harm() {
    let remote = tls_remote().await;
    let rule = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    let toml = bridged_toml(0, remote.addr(1), "5.0", rule, &tls_table(&remote, "wrong.example"));
    let local = TestServer::start(&toml, &[mqtt_frontend()]).await;
    let st = status_when(&local, "refused", |s| s.state == LinkState::BackingOff && s.last_error.is_some()).await;
    let error = st.last_error.unwrap();
    assert!(error.contains("TLS handshake failed") && error.contains("not valid for name"), "{error}");
    let st = status_when(&local, "tried again", |s| s.attempts >= 3).await;
    assert_eq!((st.connects, st.forwarded_out), (0, 0), "{st:?}");
    // The broker itself goes on serving.
    let mut publisher = v5::connect(&local, "pub").await;
    publisher.publish("s/1", V5Q1, false, b"kept").await;
    assert_eq!(local.server.bridges().status()[0].queued + local.server.bridges().status()[0].in_flight, 1);
}

// ----- check-config -----------------------------------------------------------------------------

#[test]
fn check_config_loads_a_bridges_password_file_and_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.toml");
    let toml = format!(
        "{MQTT_LISTENER}[[bridges]]\nname = \"b\"\naddress = \"localhost:1883\"\nusername = \"u\"\n\
         password_file = \"missing.pw\"\ntls = {{ ca = \"missing-ca.pem\" }}\n\
         topics = [{{ pattern = \"#\", direction = \"out\" }}]\n"
    );
    std::fs::write(&path, &toml).unwrap();
    let msg = ferry_server::check_file(&path).unwrap_err().to_string();
    assert!(msg.contains("bridges[0].password_file: ") && msg.contains("missing.pw"), "{msg}");
    assert!(msg.contains("bridges[0].tls.ca: cannot read ") && msg.contains("missing-ca.pem"), "{msg}");
    ferry_integration_tests::write_pki(dir.path());
    std::fs::write(dir.path().join("missing.pw"), "secret\n").unwrap();
    std::fs::write(&path, toml.replace("missing-ca.pem", "ca.pem")).unwrap();
    ferry_server::check_file(&path).unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_v5_remote_that_caps_qos_and_refuses_retain_gets_what_it_allows() {
    let Some(mosquitto) = Mosquitto::start("max_qos 1\nretain_available false\n").await else { return };
    let local = bridged(mosquitto.addr(), "5.0", r##"{ pattern = "#", direction = "out", qos = 2 }"##).await;
    let mut o = rumqttc::v5::MqttOptions::new("mosq-client", "127.0.0.1", mosquitto.port);
    o.set_keep_alive(std::time::Duration::from_secs(30));
    let (mut remote_client, _) = v5::Client::connect(o).await;
    remote_client.subscribe("t/#", V5Q1).await;
    up(&local).await;
    let mut publisher = v5::connect(&local, "pub").await;
    publisher.publish("t/1", V5Q2, true, b"capped").await;
    let p = remote_client.publish_received().await;
    assert_eq!((text(&p.payload), p.qos, p.retain), ("capped", V5Q1, false));
    let st = status_when(&local, "acknowledged", |s| s.forwarded_out == 1).await;
    assert_eq!(st.connects, 1, "the remote never had to close the link: {st:?}");
}

// ----- messages larger than the remote accepts ----------------------------------------------------

/// Mosquitto with `max_packet_size 200`: a 5.0 link learns it from the CONNACK and never sends
/// a larger PUBLISH; a 3.1.1 link cannot know, Mosquitto closes the connection on it, and the
/// bridge finds the culprit by probing it alone. Either way the message is dropped (counted,
/// acked locally) and what follows it still goes, in order: the link is not wedged.
async fn mosquitto_too_large(version: &str) -> Option<BridgeStatus> {
    let mosquitto = Mosquitto::start("max_packet_size 200\n").await?;
    let local = bridged(mosquitto.addr(), version, r##"{ pattern = "t/#", direction = "out", qos = 1 }"##).await;
    let mut o = rumqttc::v5::MqttOptions::new("mosq-client", "127.0.0.1", mosquitto.port);
    o.set_keep_alive(std::time::Duration::from_secs(30));
    let (mut remote_client, _) = v5::Client::connect(o).await;
    remote_client.subscribe("t/#", V5Q1).await;
    up(&local).await;
    let mut publisher = v5::connect(&local, "pub").await;
    publisher.publish("t/1", V5Q1, false, b"first").await;
    status_when(&local, "the first acknowledged", |s| s.forwarded_out == 1).await;
    publisher.publish("t/1", V5Q1, false, &[b'x'; 500]).await;
    publisher.publish("t/1", V5Q1, false, b"second").await;
    assert_eq!(text(&remote_client.publish_received().await.payload), "first");
    assert_eq!(text(&remote_client.publish_received().await.payload), "second");
    let st = status_when(&local, "the second acknowledged", |s| s.forwarded_out == 2).await;
    assert_eq!((st.dropped_too_large, st.queued, st.in_flight), (1, 0, 0), "{st:?}");
    remote_client.no_publish().await;
    Some(st)
}

#[tokio::test]
async fn a_message_over_a_v5_remotes_maximum_packet_size_is_dropped_and_the_link_goes_on() {
    let Some(st) = mosquitto_too_large("5.0").await else { return };
    assert_eq!(st.connects, 1, "never sent, so the remote never had to close: {st:?}");
}

#[tokio::test]
async fn a_message_a_v311_remote_closes_the_link_on_is_dropped_after_probing_and_the_link_goes_on() {
    let Some(st) = mosquitto_too_large("3.1.1").await else { return };
    // Closed on it with the window, then twice when it was probed alone.
    assert_eq!(st.connects, 4, "{st:?}");
}

// ----- QoS 2 packet ids across a restart of Ferry ---------------------------------------------------

/// The first whole MQTT packet in `buf` (fixed header byte, remaining length as a varint, body),
/// taken out of it, with the length of its fixed header.
fn next_packet(buf: &mut Vec<u8>) -> Option<(Vec<u8>, usize)> {
    let (mut len, mut shift, mut i) = (0usize, 0, 1);
    loop {
        let &b = buf.get(i)?;
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    (buf.len() >= i + len).then(|| (buf.drain(..i + len).collect(), i))
}

/// A TCP proxy between the bridge and its remote that, while `hold` is set, swallows the
/// bridge's packets of type `packet_type` (reporting each). PUBREL (6): the remote is left
/// holding the packet id of a QoS 2 message it has PUBREC'd, as when Ferry stops between PUBREC
/// and PUBCOMP. PUBREC (5): the remote never learns that Ferry took its QoS 2 message, as when
/// Ferry stops right after taking it.
async fn swallowing_proxy(
    remote: SocketAddr,
    hold: Arc<std::sync::atomic::AtomicBool>,
    packet_type: u8,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (swallowed_tx, swallowed) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(remote).await else { return };
            let (mut from_remote, mut to_remote) = server.into_split();
            let (mut from_bridge, mut to_bridge) = client.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_remote, &mut to_bridge).await;
            });
            let (hold, swallowed_tx) = (hold.clone(), swallowed_tx.clone());
            tokio::spawn(async move {
                // Whole packets: fixed header byte, remaining length (varint), body.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match from_bridge.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some((packet, _)) = next_packet(&mut buf) {
                        if packet[0] >> 4 == packet_type && hold.load(std::sync::atomic::Ordering::SeqCst) {
                            let _ = swallowed_tx.send(());
                            continue;
                        }
                        if to_remote.write_all(&packet).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, swallowed)
}

/// Ferry stops after the remote PUBREC'd QoS 2 message m1 and before it got the PUBREL; m1 is
/// still in the bridge's queue and the remote (a persistent session) still holds m1's packet
/// id. After the restart m1 must go with that id (so that the remote completes it, once), and
/// no new message may get it (the remote would take it for m1's resend). What `remote_client`
/// (subscribed to `t/#` at QoS 2 on the remote) received, in order.
async fn qos2_across_a_restart(remote: SocketAddr, remote_client: &mut v5::Client) -> Vec<String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let hold = Arc::new(AtomicBool::new(false));
    let (proxy, mut swallowed) = swallowing_proxy(remote, hold.clone(), 6).await;
    let rule = r##"{ pattern = "t/#", direction = "out", qos = 2 }"##;
    let toml = bridged_toml(0, proxy, "5.0", rule, "clean_session = false\n");
    let local = TestServer::start(&toml, &[mqtt_frontend()]).await;
    up(&local).await;
    let mut publisher = v5::connect(&local, "pub").await;
    for m in ["m0", "m0b"] {
        publisher.publish("t/1", V5Q2, false, m.as_bytes()).await;
    }
    status_when(&local, "two completed", |s| s.forwarded_out == 2).await;
    hold.store(true, Ordering::SeqCst);
    publisher.publish("t/1", V5Q2, false, b"m1").await;
    within("m1's PUBREL swallowed", swallowed.recv()).await.expect("proxy running");
    drop(publisher);

    let dir = local.stop().await;
    hold.store(false, Ordering::SeqCst);
    let local = TestServer::start_in(dir, &toml, &[mqtt_frontend()]).await.expect("restart");
    let st = local.server.bridges().status().remove(0);
    assert_eq!(st.queued + st.in_flight, 1, "m1 waits in the queue: {st:?}");
    let mut publisher = v5::connect(&local, "pub").await;
    for m in ["m2", "m3", "m4"] {
        publisher.publish("t/1", V5Q2, false, m.as_bytes()).await;
    }
    status_when(&local, "all completed", |s| s.forwarded_out == 4).await;
    let mut got = Vec::new();
    // Six if all is well; a seventh would be a duplicate.
    for _ in 0..6 {
        got.push(text(&remote_client.publish_received().await.payload).to_string());
    }
    remote_client.no_publish().await;
    got
}

/// Another Ferry as the remote: its session keeps the ids of the QoS 2 messages it PUBREC'd
/// (and published), and a PUBLISH with one of them is answered as a resend.
#[tokio::test]
async fn qos2_packet_ids_survive_a_restart_of_ferry_with_a_persistent_remote_session() {
    let remote = TestServer::mqtt().await;
    let mut remote_client = v5::connect(&remote, "remote-sub").await;
    remote_client.subscribe("t/#", V5Q2).await;
    let got = qos2_across_a_restart(remote.mqtt_addr(), &mut remote_client).await;
    assert_eq!(got, ["m0", "m0b", "m1", "m2", "m3", "m4"], "each once, in order");
}

/// Mosquitto as the remote. It also compares contents: a held id reused for another message
/// is "Reused message ID … detected. Clearing from storage." (the held message then dropped),
/// so the ids must match for m1 to be completed as the resend it is.
#[tokio::test]
async fn qos2_packet_ids_survive_a_restart_of_ferry_with_a_persistent_mosquitto_session() {
    let Some(mosquitto) = Mosquitto::start("").await else { return };
    let mut o = rumqttc::v5::MqttOptions::new("mosq-client", "127.0.0.1", mosquitto.port);
    o.set_keep_alive(std::time::Duration::from_secs(30));
    let (mut remote_client, _) = v5::Client::connect(o).await;
    remote_client.subscribe("t/#", V5Q2).await;
    let got = qos2_across_a_restart(mosquitto.addr(), &mut remote_client).await;
    assert_eq!(got, ["m0", "m0b", "m1", "m2", "m3", "m4"], "each once, in order");
    let reused: Vec<String> = mosquitto.log().into_iter().filter(|l| l.contains("Reused message ID")).collect();
    assert!(reused.is_empty(), "no held id was given to another message: {reused:?}");
}

/// A QoS 2 message from the remote that Ferry published locally and PUBREC'd, but whose PUBREC
/// the remote never got before Ferry stopped: after the restart the remote (keeping the session)
/// sends it again with DUP and the same packet id, and Ferry must know the id from its store and
/// not publish the message a second time (fails without `qos2_ids`: m1 twice). Its PUBREL then
/// frees the id, and a second restart finds nothing held: later messages all arrive.
#[tokio::test]
async fn a_qos2_message_from_the_remote_is_published_once_across_a_restart_of_ferry() {
    use ferry_integration_tests::amqp::{lapin_uri, AMQP_LISTENER};
    use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use std::sync::atomic::{AtomicBool, Ordering};

    let remote = TestServer::mqtt().await;
    let hold = Arc::new(AtomicBool::new(false));
    let (proxy, mut swallowed) = swallowing_proxy(remote.mqtt_addr(), hold.clone(), 5).await;
    let rule = r##"{ pattern = "t/#", direction = "in", qos = 2 }"##;
    let toml = format!("{AMQP_LISTENER}{}", bridged_toml(0, proxy, "5.0", rule, "clean_session = false\n"));
    let frontends = ferry_server::frontends::builtin(&Default::default());
    let local = TestServer::start(&toml, &frontends).await;
    up(&local).await;
    // What arrives locally lands in a durable queue, kept across the restarts.
    let conn = lapin_uri(&format!("amqp://guest:guest@{}/%2f", local.amqp_addr())).await;
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("seen".into(), durable, FieldTable::default()).await.unwrap();
    let bind = ch.queue_bind(
        "seen".into(),
        "amq.topic".into(),
        "t.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    );
    bind.await.unwrap();
    drop(conn);

    let mut remote_publisher = v5::connect(&remote, "remote-pub").await;
    hold.store(true, Ordering::SeqCst);
    remote_publisher.publish("t/1", V5Q2, false, b"m1").await;
    within("m1's PUBREC swallowed", swallowed.recv()).await.expect("proxy running");

    let dir = local.stop().await;
    hold.store(false, Ordering::SeqCst);
    let local = TestServer::start_in(dir, &toml, &frontends).await.expect("restart");
    up(&local).await;
    // The remote resends m1 first, on taking up the session; m2 comes after it.
    remote_publisher.publish("t/1", V5Q2, false, b"m2").await;
    status_when(&local, "m2 taken", |s| s.forwarded_in >= 1).await;
    let dir = local.stop().await;
    let local = TestServer::start_in(dir, &toml, &frontends).await.expect("second restart");
    up(&local).await;
    remote_publisher.publish("t/1", V5Q2, false, b"m3").await;
    status_when(&local, "m3 taken", |s| s.forwarded_in >= 1).await;

    let conn = lapin_uri(&format!("amqp://guest:guest@{}/%2f", local.amqp_addr())).await;
    let ch = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = within("get", ch.basic_get("seen".into(), BasicGetOptions { no_ack: true })).await.unwrap() {
        got.push(String::from_utf8_lossy(&m.delivery.data).to_string());
    }
    assert_eq!(got, ["m1", "m2", "m3"], "each once, in order");
}

/// A remote that speaks just enough MQTT 3.1.1 to record what a bridge sends: it answers
/// CONNECT and PINGREQ, records each PUBLISH's DUP flag and payload, and PUBACKs them only while
/// `ack` is set.
async fn recording_remote(
    ack: Arc<std::sync::atomic::AtomicBool>,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<(bool, String)>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (ack, tx) = (ack.clone(), tx.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some((packet, i)) = next_packet(&mut buf) {
                        let body = &packet[i..];
                        let reply: &[u8] = match packet[0] >> 4 {
                            1 => &[0x20, 2, 0, 0],
                            12 => &[0xd0, 0],
                            3 => {
                                let (dup, qos) = (packet[0] & 0x08 != 0, (packet[0] >> 1) & 3);
                                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                                let mut at = 2 + topic_len;
                                let id = (qos > 0).then(|| [body[at], body[at + 1]]);
                                if qos > 0 {
                                    at += 2;
                                }
                                let _ = tx.send((dup, String::from_utf8_lossy(&body[at..]).to_string()));
                                let acking = ack.load(std::sync::atomic::Ordering::SeqCst);
                                let Some([a, b]) = id.filter(|_| acking) else { continue };
                                if conn.write_all(&[0x40, 2, a, b]).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            _ => continue,
                        };
                        if conn.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// The link keeps no delivered marks in the store: a message in the bridge's queue at a restart
/// may have gone out before it, so it goes with DUP; one published after the restart goes
/// without (fails without `restored_through`: m1 without DUP; and with every message flagged,
/// m2 with it).
#[tokio::test]
async fn a_message_restored_at_a_restart_goes_with_dup_and_a_new_one_without() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let ack = Arc::new(AtomicBool::new(false));
    let (remote, mut sent) = recording_remote(ack.clone()).await;
    let rule = r##"{ pattern = "t/#", direction = "out", qos = 1 }"##;
    let toml = bridged_toml(0, remote, "3.1.1", rule, "notifications = false\n");
    let local = TestServer::start(&toml, &[mqtt_frontend()]).await;
    up(&local).await;
    let mut publisher = v5::connect(&local, "pub").await;
    publisher.publish("t/1", V5Q1, false, b"m1").await;
    let first = within("m1 sent", sent.recv()).await.expect("remote running");
    assert_eq!(first, (false, "m1".to_string()), "first sent without DUP");
    drop(publisher);
    let dir = local.stop().await;
    ack.store(true, Ordering::SeqCst);
    let local = TestServer::start_in(dir, &toml, &[mqtt_frontend()]).await.expect("restart");
    up(&local).await;
    let again = within("m1 sent again", sent.recv()).await.expect("remote running");
    assert_eq!(again, (true, "m1".to_string()), "perhaps sent before the restart: DUP");
    let mut publisher = v5::connect(&local, "pub").await;
    publisher.publish("t/1", V5Q1, false, b"m2").await;
    let new = within("m2 sent", sent.recv()).await.expect("remote running");
    assert_eq!(new, (false, "m2".to_string()), "new since the restart: no DUP");
    status_when(&local, "both acked", |s| s.queued + s.in_flight == 0).await;
}

// ----- the connection registry ------------------------------------------------------------------

#[tokio::test]
async fn a_link_is_listed_in_the_connection_registry_and_reconnects_when_closed_there() {
    let remote = TestServer::mqtt().await;
    let local = bridged(remote.mqtt_addr(), "5.0", r##"{ pattern = "#", direction = "out", qos = 1 }"##).await;
    up(&local).await;
    let connections = local.server.broker().connections();
    let link = connections.list().into_iter().find(|c| c.client_id.as_deref() == Some("ferry-bridge-b"));
    let link = link.expect("the link is listed");
    assert_eq!((link.listener.as_deref(), link.peer, link.version), (None, remote.mqtt_addr(), "5.0"));
    assert!(link.bytes_out > 0 && link.bytes_in > 0, "{link:?}");

    assert!(connections.close(link.id, "maintenance"));
    let st = status_when(&local, "reconnected", |s| s.connects == 2 && s.state == LinkState::Up).await;
    assert!(st.last_error.is_none(), "cleared once up again: {st:?}");
    let mut sub = v5::connect(&remote, "remote-sub").await;
    sub.subscribe("t", V5Q1).await;
    let mut publisher = v5::connect(&local, "pub").await;
    publisher.publish("t", V5Q1, false, b"after").await;
    assert_eq!(text(&sub.publish_received().await.payload), "after");
    status_when(&local, "forwarded", |s| s.forwarded_out == 1).await;
    let link = connections.list().into_iter().find(|c| c.id == link.id).expect("listed again");
    assert_eq!((link.messages_out, link.messages_in), (1, 0), "{link:?}");
}

// ----- keep alive -------------------------------------------------------------------------------

#[tokio::test]
async fn a_remote_that_goes_silent_is_pinged_then_dropped_and_reconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A 3.1.1 "broker" that accepts the CONNECT and then answers nothing, not even PINGREQ.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (pinged_tx, pinged) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 256];
        let _connect = s.read(&mut buf).await.unwrap();
        s.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
        let mut seen = Vec::new();
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if seen.windows(2).any(|w| w == [0xC0, 0x00]) {
                let _ = pinged_tx.send(());
                break;
            }
        }
        // Hold the socket open and silent until the bridge gives up on it.
        let _ = s.read(&mut buf).await;
    });
    let rule = r##"{ pattern = "#", direction = "out", qos = 1 }"##;
    let toml = bridged_toml(0, addr, "3.1.1", rule, "keep_alive = 1\n");
    let local = TestServer::start(&toml, &[mqtt_frontend()]).await;
    up(&local).await;
    within("PINGREQ after a keep alive period of silence", pinged).await.expect("pinged");
    let st = status_when(&local, "dropped for silence", |s| s.state == LinkState::BackingOff).await;
    assert!(st.last_error.as_deref().unwrap_or("").contains("keep alive"), "{st:?}");
}

/// A bridge's backlog is the bridge's: an AMQP client, even the unrestricted default user, can
/// neither consume, get, purge nor delete it, nor publish or bind into it (a 403 each), so the
/// messages the bridge owes its remote stay there.
#[tokio::test]
async fn amqp_clients_cannot_touch_a_bridges_backlog() {
    use ferry_integration_tests::amqp::{assert_code, lapin_uri, AMQP_LISTENER};
    use lapin::options::{
        BasicConsumeOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
        QueuePurgeOptions,
    };
    use lapin::types::FieldTable;

    let (_silent, remote_addr) = silent_remote();
    let rule = r##"{ pattern = "#", direction = "out", qos = 1 }"##;
    let toml = format!("{AMQP_LISTENER}{}", bridged_toml(0, remote_addr, "5.0", rule, "max_inflight = 1\n"));
    let frontends = ferry_server::frontends::builtin(&Default::default());
    let local = TestServer::start(&toml, &frontends).await;
    let mut publisher = v5::connect(&local, "pub").await;
    for i in 0..3 {
        publisher.publish("a", V5Q1, false, format!("m{i}").as_bytes()).await;
    }
    let queue = "ferry-bridge.b";
    let conn = lapin_uri(&format!("amqp://guest:guest@{}/%2f", local.amqp_addr())).await;
    let ch = conn.create_channel().await.unwrap();
    let consumed = ch.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default());
    assert_code(within("consume", consumed).await, 403);
    let ch = conn.create_channel().await.unwrap();
    assert_code(within("get", ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })).await, 403);
    let ch = conn.create_channel().await.unwrap();
    assert_code(within("purge", ch.queue_purge(queue.into(), QueuePurgeOptions::default())).await, 403);
    let ch = conn.create_channel().await.unwrap();
    assert_code(within("delete", ch.queue_delete(queue.into(), QueueDeleteOptions::default())).await, 403);
    let ch = conn.create_channel().await.unwrap();
    let bound =
        ch.queue_bind(queue.into(), "amq.topic".into(), "#".into(), QueueBindOptions::default(), FieldTable::default());
    assert_code(within("bind", bound).await, 403);
    // Nothing was taken: one message with the link (its window of 1), two in the queue.
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
    let q = within("passive declare", ch.queue_declare(queue.into(), passive, FieldTable::default())).await.unwrap();
    assert_eq!(q.message_count(), 2);
    let st = local.server.bridges().status().remove(0);
    assert_eq!((st.in_flight, st.queued), (1, 2), "{st:?}");
}

/// A queue's limits do not change once made: a start with other limits makes an empty backlog
/// queue again with them, and keeps one that holds messages (with a warning) rather than lose
/// them.
#[tokio::test]
async fn new_queue_limits_apply_to_an_empty_backlog_and_never_cost_a_queued_message() {
    let (_silent, remote_addr) = silent_remote();
    let rule = r##"{ pattern = "#", direction = "out", qos = 1 }"##;
    let limits =
        |n: u32| bridged_toml(0, remote_addr, "5.0", rule, &format!("max_queued_messages = {n}\nmax_inflight = 1\n"));
    let local = TestServer::start(&limits(5), &[mqtt_frontend()]).await;
    // Empty: made again with the new limit of 3.
    let dir = local.stop().await;
    let local = TestServer::start_in(dir, &limits(3), &[mqtt_frontend()]).await.expect("restart");
    let mut publisher = v5::connect(&local, "pub").await;
    for i in 0..6 {
        publisher.publish("a", V5Q1, false, format!("m{i}").as_bytes()).await;
    }
    drop(publisher);
    let st = local.server.bridges().status().remove(0);
    assert_eq!((st.in_flight, st.queued, st.dropped_overflow), (1, 3, 2), "{st:?}");
    // Holding messages: the old limit stays, and nothing is lost.
    let dir = local.stop().await;
    let local = TestServer::start_in(dir, &limits(10), &[mqtt_frontend()]).await.expect("restart");
    let st = local.server.bridges().status().remove(0);
    assert_eq!(st.queued + st.in_flight, 4, "{st:?}");
}

// ----- the bridge mark on 3.1.1 (try_private) -----------------------------------------------------

/// A 3.1.1 bridge marks its CONNECT (level 0x84): a Mosquitto remote then gives its
/// subscription *no local*, so a `both` rule on `#` does not bring the bridge's own messages
/// back (3.1.1 carries no hop count to catch them by).
async fn v311_both_ways_without_echo(remote: std::net::SocketAddr, remote_port: u16) {
    let local = bridged(remote, "3.1.1", r##"{ pattern = "#", direction = "both", qos = 1 }"##).await;
    up(&local).await;
    let mut sub_l = v5::connect(&local, "sub-l").await;
    sub_l.subscribe("t/#", V5Q1).await;
    let (mut sub_r, _) = v311::Client::connect(rumqttc::MqttOptions::new("sub-r", "127.0.0.1", remote_port)).await;
    sub_r.subscribe("t/#", Q1).await;
    let mut pub_l = v5::connect(&local, "pub-l").await;
    pub_l.publish("t/1", V5Q1, false, b"local").await;
    assert_eq!(text(&sub_r.publish_received().await.payload), "local");
    // Published on the remote after it had the local message: an echo of that message would
    // come back over the link before this one.
    let (mut pub_r, _) = v311::Client::connect(rumqttc::MqttOptions::new("pub-r", "127.0.0.1", remote_port)).await;
    pub_r.publish("t/2", Q1, false, b"remote").await;
    assert_eq!(text(&sub_l.publish_received().await.payload), "local");
    assert_eq!(text(&sub_l.publish_received().await.payload), "remote", "the local message came back");
    let st = status_when(&local, "in and out", |s| s.forwarded_out == 1 && s.forwarded_in == 1).await;
    assert_eq!(st.dropped_loop, 1, "the remote's message is not sent back to it: {st:?}");
}

#[tokio::test]
async fn a_v311_bridge_marks_its_connect_so_a_mosquitto_remote_does_not_echo() {
    let Some(mosquitto) = Mosquitto::start("").await else { return };
    v311_both_ways_without_echo(mosquitto.addr(), mosquitto.port).await;
    assert!(mosquitto.log().iter().any(|l| l.contains("New bridge connected")), "{:?}", mosquitto.log());
}

#[tokio::test]
async fn a_v311_bridge_marks_its_connect_so_a_ferry_remote_does_not_echo() {
    let remote = TestServer::mqtt().await;
    v311_both_ways_without_echo(remote.mqtt_addr(), remote.mqtt_addr().port()).await;
}

#[tokio::test]
async fn a_remote_that_refuses_the_bridge_mark_is_connected_to_without_it() {
    use ferry_mqtt::codec::{Decoder, Packet};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A 3.1.1 broker that does not know the mark: CONNACK 1 (unacceptable protocol version) to
    // a CONNECT at level 0x84, and a session to one at level 4.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (marks_tx, mut marks) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let mut decoder = Decoder::new(1 << 20);
            let mut buf = bytes::BytesMut::new();
            let connect = loop {
                if let Ok(Some(Packet::Connect(c))) = decoder.decode(&mut buf) {
                    break c;
                }
                if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
            };
            let _ = marks_tx.send(connect.bridge);
            let code = if connect.bridge { 1 } else { 0 };
            let _ = s.write_all(&[0x20, 2, 0, code]).await;
            if code == 0 {
                held.push(s); // up: the link stays connected
            }
        }
    });
    let local = bridged(addr, "3.1.1", r##"{ pattern = "a/#", direction = "out", qos = 1 }"##).await;
    assert_eq!(within("first CONNECT", marks.recv()).await, Some(true));
    assert_eq!(within("second CONNECT", marks.recv()).await, Some(false));
    let st = status_when(&local, "up without the mark", |s| s.state == LinkState::Up).await;
    assert_eq!((st.attempts, st.connects), (2, 1), "{st:?}");
}

#[tokio::test]
async fn a_remote_name_that_does_not_resolve_is_reported_and_retried_while_clients_are_served() {
    let rule = r##"{ pattern = "a/#", direction = "out", qos = 1 }"##;
    let toml = bridged_toml(0, "127.0.0.1:1".parse().unwrap(), "5.0", rule, "")
        .replace("address = \"127.0.0.1:1\"", "address = \"no-such-host.invalid:1883\"");
    let local = TestServer::start(&toml, &[mqtt_frontend()]).await;
    let st = status_when(&local, "two failed attempts", |s| s.attempts >= 2 && s.state == LinkState::BackingOff).await;
    let error = st.last_error.expect("an error");
    assert!(error.starts_with("cannot connect"), "{error}");
    assert_eq!((st.connects, st.remote.as_str()), (0, "no-such-host.invalid:1883"));
    // The rest of the broker does not notice; what the rule takes waits in the backlog.
    let mut sub = v5::connect(&local, "sub").await;
    sub.subscribe("a/#", V5Q1).await;
    let mut publisher = v5::connect(&local, "pub").await;
    publisher.publish("a/1", V5Q1, false, b"kept").await;
    assert_eq!(text(&sub.publish_received().await.payload), "kept");
    // Routed to the subscriber and into the backlog in one step (taken into the link's window
    // while it is down, so counted in flight).
    let st = local.server.bridges().status().remove(0);
    assert_eq!((st.queued + st.in_flight, st.forwarded_out, st.state), (1, 0, LinkState::BackingOff), "{st:?}");
}

#[tokio::test]
async fn a_stalled_remote_leaves_qos0_messages_in_the_bounded_queue_not_in_memory() {
    let remote = TestServer::mqtt().await;
    let (port, stall) = ferry_integration_tests::stalling_proxy(remote.mqtt_addr()).await;
    let rule = r##"{ pattern = "t/#", direction = "out", qos = 0 }"##;
    let local = TestServer::start(
        &bridged_toml(0, ([127, 0, 0, 1], port).into(), "5.0", rule, "keep_alive = 0\nmax_queued_messages = 100\n"),
        &[mqtt_frontend()],
    )
    .await;
    up(&local).await;
    stall.send_replace(true);
    let n = 2_000;
    let body = vec![b'x'; 8 * 1024];
    let mut p = v5::connect(&local, "pub").await;
    for _ in 0..n {
        p.publish("t/1", v5::QoSOf::AtMostOnce, false, &body).await;
    }
    // Known to have reached the queue: a QoS 1 message behind them, acknowledged after routing.
    p.publish("x/1", V5Q1, false, b"marker").await;
    // The bound holds at every moment of the stall, so it is checked as soon as everything
    // was published.
    // Settled (handed to the writer) at most what the socket buffers and the 1 MiB writer
    // backlog hold: the rest stayed in the queue, bounded by max_queued_messages (drop-oldest).
    let st = local.server.bridges().status().remove(0);
    assert!(st.forwarded_out < 1_500 && st.dropped_overflow > 0, "{st:?}");
    assert!(st.queued <= 100, "{st:?}");
}

#[tokio::test]
async fn a_bridge_removed_from_the_config_leaves_no_queue_taking_messages() {
    let (_silent, remote_addr) = silent_remote();
    let rule = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    let toml = bridged_toml(0, remote_addr, "5.0", rule, "max_inflight = 1\n");
    let without = MQTT_LISTENER.to_string();
    let backlog = |s: &TestServer| s.server.broker().vhost("/").unwrap().queue("ferry-bridge.b");
    // Empty: deleted once the bridge is gone.
    let local = TestServer::start(&toml, &[mqtt_frontend()]).await;
    assert!(backlog(&local).is_some());
    let local = TestServer::start_in(local.stop().await, &without, &[mqtt_frontend()]).await.expect("restart");
    assert!(backlog(&local).is_none(), "the empty queue of a removed bridge is deleted");
    // Holding messages: kept with them, unbound.
    let local = TestServer::start_in(local.stop().await, &toml, &[mqtt_frontend()]).await.expect("restart");
    let mut publisher = v5::connect(&local, "pub").await;
    for i in 0..3 {
        publisher.publish("s/1", V5Q1, false, format!("m{i}").as_bytes()).await;
    }
    drop(publisher);
    let local = TestServer::start_in(local.stop().await, &without, &[mqtt_frontend()]).await.expect("restart");
    assert_eq!(queue_bindings(&local), Vec::<String>::new(), "it takes nothing new");
    let mut publisher = v5::connect(&local, "pub").await;
    publisher.publish("s/1", V5Q1, false, b"after").await;
    let q = backlog(&local).expect("kept while it holds messages");
    assert_eq!(q.stats().ready, 3, "with exactly its backlog");
}

// ----- more than one address ----------------------------------------------------------------------

/// A bridge whose main address is down connects to the next one; once the main one answers, it
/// leaves the alternate for it (Mosquitto's `round_robin false`), and nothing is lost on the way.
#[tokio::test]
async fn a_bridge_falls_back_to_its_next_address_and_returns_to_the_main_one_when_it_answers() {
    let main_port = free_port();
    let alternate = ferry_on(0).await;
    persistent_subscriber(&alternate, "alt-sub", "s/#").await;
    let rule = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    let addresses = format!("address = [\"127.0.0.1:{main_port}\", \"{}\"]\n", alternate.mqtt_addr());
    let toml = format!(
        "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n[[bridges]]\nname = \"b\"\n{addresses}\
         protocol_version = \"3.1.1\"\nreconnect_initial_ms = 50\nreconnect_max_ms = 400\nprimary_retry_ms = 100\n\
         topics = [{rule}]\n"
    );
    let local = TestServer::start(&toml, &[mqtt_frontend()]).await;
    let alt = alternate.mqtt_addr().to_string();
    let st = status_when(&local, "up on the alternate", |s| s.state == LinkState::Up && s.remote == alt).await;
    assert!(st.attempts >= 2, "the main address was tried first: {st:?}");
    let mut publisher = v311::connect(&local, "pub").await;
    for i in 0..10 {
        publisher.publish("s/1", Q1, false, format!("m{i}").as_bytes()).await;
    }
    let first: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(read_persistent(&alternate, "alt-sub", 10).await, first);

    // The main broker comes up: the link moves there by itself.
    let main = ferry_on(main_port).await;
    persistent_subscriber(&main, "main-sub", "s/#").await;
    let main_addr = format!("127.0.0.1:{main_port}");
    status_when(&local, "back on the main address", |s| s.state == LinkState::Up && s.remote == main_addr).await;
    for i in 10..20 {
        publisher.publish("s/1", Q1, false, format!("m{i}").as_bytes()).await;
    }
    let second: Vec<String> = (10..20).map(|i| format!("m{i}")).collect();
    assert_eq!(read_persistent(&main, "main-sub", 10).await, second);
    let st = status_when(&local, "all forwarded", |s| s.forwarded_out >= 20).await;
    assert_eq!((st.queued, st.in_flight), (0, 0), "{st:?}");
}

/// With `round_robin`, a link that loses its remote goes on to the next address in the list
/// (here wrapping round to the first), not back to a main one.
#[tokio::test]
async fn with_round_robin_a_lost_remote_moves_the_link_to_the_next_address() {
    let first = ferry_on(0).await;
    let second_port = free_port();
    persistent_subscriber(&first, "first-sub", "s/#").await;
    let rule = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    let toml = format!(
        "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n[[bridges]]\nname = \"b\"\n\
         address = [\"127.0.0.1:{second_port}\", \"{}\"]\nround_robin = true\nprotocol_version = \"3.1.1\"\n\
         reconnect_initial_ms = 50\nreconnect_max_ms = 400\nprimary_retry_ms = 50\ntopics = [{rule}]\n",
        first.mqtt_addr()
    );
    let local = TestServer::start(&toml, &[mqtt_frontend()]).await;
    let first_addr = first.mqtt_addr().to_string();
    status_when(&local, "up on the second address listed", |s| s.state == LinkState::Up && s.remote == first_addr)
        .await;
    // The first address listed comes up; with round_robin the link stays, and moves only when
    // its remote goes away.
    let second = ferry_on(second_port).await;
    persistent_subscriber(&second, "second-sub", "s/#").await;
    let mut publisher = v311::connect(&local, "pub").await;
    publisher.publish("s/1", Q1, false, b"before").await;
    assert_eq!(read_persistent(&first, "first-sub", 1).await, ["before"]);
    let st = local.server.bridges().status().into_iter().find(|s| s.name == "b").expect("bridge b");
    assert_eq!(st.remote, first_addr, "round_robin does not go back to the first address listed: {st:?}");
    let _first_dir = first.stop().await;
    let second_addr = format!("127.0.0.1:{second_port}");
    status_when(&local, "moved on to the next address", |s| s.state == LinkState::Up && s.remote == second_addr).await;
    publisher.publish("s/1", Q1, false, b"after").await;
    assert_eq!(read_persistent(&second, "second-sub", 1).await, ["after"]);
}

// ----- state notifications (Mosquitto's `notifications`) -------------------------------------------

const STATE_TOPIC: &str = "$SYS/broker/connection/ferry-bridge-b/state";

/// A subscriber to the state topic on Mosquitto, and the next state it hears.
async fn mosquitto_state_watcher(mosquitto: &Mosquitto, id: &str) -> v5::Client {
    let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", mosquitto.port);
    o.set_keep_alive(std::time::Duration::from_secs(30));
    let (mut c, _) = v5::Client::connect(o).await;
    c.subscribe(STATE_TOPIC, V5Q1).await;
    c
}

async fn next_state(c: &mut v5::Client) -> (String, bool) {
    let p = c.publish_received().await;
    assert_eq!(topic_v5(&p), STATE_TOPIC);
    (text(&p.payload).to_string(), p.retain)
}

/// On by default, as in Mosquitto: `1` retained on the remote once the link is up, the will's `0`
/// when the link dies without a DISCONNECT, `1` again after the reconnect, `0` before a clean
/// DISCONNECT at shutdown; and the same states retained locally.
#[tokio::test]
async fn the_links_state_is_published_retained_on_a_mosquitto_remote_and_locally() {
    let Some(mosquitto) = Mosquitto::start("").await else { return };
    let local = bridged(mosquitto.addr(), "3.1.1", r##"{ pattern = "t/#", direction = "out", qos = 1 }"##).await;
    up(&local).await;
    // Retained: a subscriber that comes after the link is up gets `1`.
    let mut remote_watch = mosquitto_state_watcher(&mosquitto, "watch-1").await;
    assert_eq!(next_state(&mut remote_watch).await, ("1".to_string(), true));
    let mut local_watch = v5::connect(&local, "local-watch").await;
    local_watch.subscribe(STATE_TOPIC, V5Q1).await;
    assert_eq!(next_state(&mut local_watch).await, ("1".to_string(), true));

    // The link dropped without a DISCONNECT: Mosquitto publishes the will.
    let connections = local.server.broker().connections();
    let link = connections.list().into_iter().find(|c| c.client_id.as_deref() == Some("ferry-bridge-b")).expect("link");
    assert!(connections.close(link.id, "maintenance"));
    assert_eq!(next_state(&mut remote_watch).await.0, "0", "the will");
    assert_eq!(next_state(&mut local_watch).await.0, "0");
    assert_eq!(next_state(&mut remote_watch).await.0, "1", "up again");
    assert_eq!(next_state(&mut local_watch).await.0, "1");

    // A clean stop: `0` before the DISCONNECT (which discards the will).
    let _dir = local.stop().await;
    assert_eq!(next_state(&mut remote_watch).await.0, "0");
    let mut later = mosquitto_state_watcher(&mosquitto, "watch-2").await;
    assert_eq!(next_state(&mut later).await, ("0".to_string(), true), "retained on the remote");
}

/// `notifications = false` publishes nothing and sends no will; `notifications_local_only`
/// keeps the states local; `notification_topic` moves them.
#[tokio::test]
async fn notifications_can_be_turned_off_kept_local_or_moved() {
    let Some(mosquitto) = Mosquitto::start("").await else { return };
    let rule = r##"{ pattern = "t/#", direction = "out", qos = 1 }"##;
    let mut remote_watch = mosquitto_state_watcher(&mosquitto, "watch").await;
    remote_watch.subscribe("bridges/#", V5Q1).await;

    let extra = "notifications = false\n";
    let off = TestServer::start(&bridged_toml(0, mosquitto.addr(), "3.1.1", rule, extra), &[mqtt_frontend()]).await;
    up(&off).await;
    let mut local_watch = v5::connect(&off, "local-watch").await;
    local_watch.subscribe("$SYS/broker/connection/#", V5Q1).await;
    local_watch.no_publish().await;
    let _ = off.stop().await;

    let extra = "notifications_local_only = true\nnotification_topic = \"bridges/b/up\"\n";
    let local_only =
        TestServer::start(&bridged_toml(0, mosquitto.addr(), "3.1.1", rule, extra), &[mqtt_frontend()]).await;
    up(&local_only).await;
    let mut local_watch = v5::connect(&local_only, "local-watch").await;
    local_watch.subscribe("bridges/b/up", V5Q1).await;
    let p = local_watch.publish_received().await;
    assert_eq!((topic_v5(&p), text(&p.payload), p.retain), ("bridges/b/up", "1", true));
    let _ = local_only.stop().await;
    remote_watch.no_publish().await;
}

// ----- start types (Mosquitto's `start_type`) -------------------------------------------------------

/// `start_type = "lazy"`: no connection until `threshold` messages wait; then everything goes,
/// and after `idle_timeout` without traffic the link disconnects until the threshold is reached
/// again.
#[tokio::test]
async fn a_lazy_bridge_connects_at_its_threshold_and_leaves_when_idle() {
    let remote = TestServer::mqtt().await;
    persistent_subscriber(&remote, "remote-sub", "s/#").await;
    let rule = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    let extra = "start_type = \"lazy\"\nthreshold = 5\nidle_timeout = 1\n";
    let local = TestServer::start(&bridged_toml(0, remote.mqtt_addr(), "3.1.1", rule, extra), &[mqtt_frontend()]).await;
    let mut publisher = v311::connect(&local, "pub").await;
    for i in 0..4 {
        publisher.publish("s/1", Q1, false, format!("m{i}").as_bytes()).await;
    }
    let st =
        status_when(&local, "idle below the threshold", |s| s.state == LinkState::Idle && s.queued + s.in_flight == 4)
            .await;
    assert_eq!((st.attempts, st.connects), (0, 0), "{st:?}");
    publisher.publish("s/1", Q1, false, b"m4").await;
    let first: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
    assert_eq!(read_persistent(&remote, "remote-sub", 5).await, first);
    let st = status_when(&local, "disconnected when idle", |s| s.state == LinkState::Idle && s.connects == 1).await;
    assert_eq!((st.forwarded_out, st.queued, st.in_flight), (5, 0, 0), "{st:?}");
    for i in 5..10 {
        publisher.publish("s/1", Q1, false, format!("m{i}").as_bytes()).await;
    }
    let second: Vec<String> = (5..10).map(|i| format!("m{i}")).collect();
    assert_eq!(read_persistent(&remote, "remote-sub", 5).await, second);
    let st = status_when(&local, "all forwarded", |s| s.forwarded_out == 10).await;
    assert_eq!(st.connects, 2, "{st:?}");
}

/// `start_type = "once"`: a failed connect is not retried.
#[tokio::test]
async fn a_once_bridge_stops_after_its_first_failure() {
    let dead = free_port();
    let rule = r##"{ pattern = "s/#", direction = "out", qos = 1 }"##;
    let toml = bridged_toml(0, format!("127.0.0.1:{dead}").parse().unwrap(), "3.1.1", rule, "start_type = \"once\"\n");
    let local = TestServer::start(&toml, &[mqtt_frontend()]).await;
    let st = status_when(&local, "stopped", |s| s.state == LinkState::Stopped).await;
    assert_eq!((st.attempts, st.connects), (1, 0), "{st:?}");
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("cannot connect")), "{st:?}");
}

/// A message a 5.0 remote refuses (PUBACK reason 0x80 or above: here Ferry refusing a client's
/// publish under `$SYS/`, 0x87) leaves the queue counted by its reason code, and the link goes on.
#[tokio::test]
async fn messages_a_v5_remote_refuses_are_counted_by_reason_code() {
    let remote = TestServer::mqtt().await;
    let rules = r##"{ pattern = "s/#", direction = "out", qos = 1, remote_prefix = "$SYS/" },
                    { pattern = "ok/#", direction = "out", qos = 1 }"##;
    let local = bridged(remote.mqtt_addr(), "5.0", rules).await;
    let mut sub = v5::connect(&remote, "remote-sub").await;
    sub.subscribe("ok/#", V5Q1).await;
    up(&local).await;
    let mut publisher = v5::connect(&local, "pub").await;
    for i in 0..3 {
        publisher.publish("s/1", V5Q1, false, format!("r{i}").as_bytes()).await;
    }
    publisher.publish("ok/1", V5Q1, false, b"after").await;
    assert_eq!(text(&sub.publish_received().await.payload), "after", "the link is not wedged");
    let st = status_when(&local, "refused and forwarded", |s| s.dropped_refused == 3 && s.forwarded_out == 1).await;
    assert_eq!(st.dropped_refused_by_reason, [(0x87, 3)], "{st:?}");
    assert_eq!((st.queued, st.in_flight), (0, 0), "{st:?}");
}

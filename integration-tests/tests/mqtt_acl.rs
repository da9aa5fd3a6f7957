//! MQTT topic ACL (issue 7): `[[acl]]` entries per user and for all users, `%u` / `%c`, read
//! checks on SUBSCRIBE (wildcard-aware coverage), write checks on PUBLISH and on the will, each
//! refusal in the version's own terms (Mosquitto's behaviour).

use ferry_core::auth::PasswordHash;
use ferry_integration_tests::mqtt::{connect_packet, publish_packet, sub_options, will, RawClient as MqttRaw};
use ferry_integration_tests::{within, write_config, TestServer};
use ferry_mqtt::codec::{
    reason, return_code, Disconnect, Packet, Properties, ProtocolVersion, PubResp, QoS, Str, SubOptions, Subscribe,
};

use ProtocolVersion::{V311, V5};

const ACL: &str = r#"
[[acl]]
user = "sensor"
topic = "sensors/%u/#"
access = "readwrite"

[[acl]]
user = "sensor"
topic = "cmd/+"
access = "read"

[[acl]]
user = "bob"
topic = "sensors/+/t"
access = "read"

[[acl]]
topic = "public/#"
access = "read"

[[acl]]
topic = "clients/%c/out"
access = "write"
"#;

fn config(acl: &str) -> String {
    let hash = PasswordHash::argon2id(b"s3cret");
    format!(
        "[[users]]\nname = \"sensor\"\npassword_hash = \"{hash}\"\n[[users]]\nname = \"bob\"\npassword_hash = \"{hash}\"\n\
         {acl}\n[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n"
    )
}

async fn server(acl: &str) -> TestServer {
    let frontends = ferry_server::frontends::builtin(&Default::default());
    TestServer::start(&config(acl), &frontends).await
}

fn login(version: ProtocolVersion, id: &str, user: Option<&str>) -> ferry_mqtt::codec::Connect {
    let mut c = connect_packet(version, id, true);
    c.username = user.map(Str::from);
    c.password = user.map(|_| bytes::Bytes::from_static(b"s3cret"));
    c
}

async fn client(s: &TestServer, version: ProtocolVersion, id: &str, user: Option<&str>) -> MqttRaw {
    let (c, ack) = MqttRaw::connect(s.mqtt_addr(), login(version, id, user)).await;
    assert_eq!(ack.code, 0, "{id} connects");
    c
}

/// Subscribes to all `filters` in one SUBSCRIBE; returns the SUBACK's codes.
async fn suback(c: &mut MqttRaw, id: u16, filters: &[&str]) -> Vec<u8> {
    let filters: Vec<(Str, SubOptions)> =
        filters.iter().map(|f| (Str::from(*f), sub_options(QoS::AtLeastOnce))).collect();
    c.subscribe_with(Subscribe { packet_id: id, properties: Properties::default(), filters }).await.reasons
}

#[tokio::test]
async fn writes_are_checked_per_user_in_each_version() {
    let s = server(ACL).await;
    let mut bob = client(&s, V5, "bob-reader", Some("bob")).await;
    assert_eq!(suback(&mut bob, 1, &["sensors/+/t"]).await, vec![1]);

    // 5.0: a denied QoS 1 / QoS 2 publish gets 0x87 and reaches nobody.
    let mut sensor = client(&s, V5, "sensor-5", Some("sensor")).await;
    assert_eq!(sensor.puback("sensors/other/t", 1).await, reason::NOT_AUTHORIZED);
    sensor.send(&Packet::Publish(publish_packet("sensors/other/t", QoS::ExactlyOnce, 2, b"x"))).await;
    let rec = sensor
        .expect("PUBREC", |p| match p {
            Packet::PubRec(a) if a.packet_id == 2 => Some(a.reason),
            _ => None,
        })
        .await;
    assert_eq!(rec, reason::NOT_AUTHORIZED);
    sensor.send(&Packet::Publish(publish_packet("sensors/other/t", QoS::AtMostOnce, 0, b"x"))).await;
    assert_eq!(sensor.puback("sensors/sensor/t", 3).await, reason::SUCCESS);
    let p = within("delivery", bob.recv_publish()).await;
    assert_eq!(p.topic.as_str(), "sensors/sensor/t", "only the granted publish arrives");
    if let Some(id) = p.packet_id {
        bob.send(&Packet::PubAck(PubResp::ok(id))).await;
    }
    // Another user has no write grant there.
    let mut bob_writer = client(&s, V5, "bob-writer", Some("bob")).await;
    assert_eq!(bob_writer.puback("sensors/sensor/t", 1).await, reason::NOT_AUTHORIZED);

    // 3.1.1: acknowledged as usual, dropped (Mosquitto).
    let mut sensor3 = client(&s, V311, "sensor-3", Some("sensor")).await;
    sensor3.publish(publish_packet("sensors/other/t", QoS::AtLeastOnce, 1, b"x")).await;
    sensor3.publish(publish_packet("sensors/other/t", QoS::ExactlyOnce, 2, b"x")).await;
    sensor3.publish(publish_packet("sensors/other/t", QoS::AtMostOnce, 0, b"x")).await;
    sensor3.ping().await;
    sensor3.publish(publish_packet("sensors/sensor/t", QoS::AtLeastOnce, 3, b"y")).await;
    let p = within("delivery", bob.recv_publish()).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("sensors/sensor/t", &b"y"[..]));
    if let Some(id) = p.packet_id {
        bob.send(&Packet::PubAck(PubResp::ok(id))).await;
    }
    bob.quiet().await;
}

#[tokio::test]
async fn subscribe_filters_must_be_covered_by_a_read_grant() {
    let s = server(ACL).await;
    let filters = [
        "sensors/sensor/#",
        "sensors/sensor/+",
        "sensors/#",
        "cmd/+",
        "cmd/#",
        "cmd/x",
        "cmd/x/y",
        "public/#",
        "#",
        "$share/g/sensors/sensor/a",
    ];
    let mut sensor = client(&s, V5, "sensor-sub5", Some("sensor")).await;
    let d = reason::NOT_AUTHORIZED;
    assert_eq!(suback(&mut sensor, 1, &filters).await, vec![1, 1, d, 1, d, 1, d, 1, d, 1]);
    let mut sensor3 = client(&s, V311, "sensor-sub3", Some("sensor")).await;
    let d = 0x80;
    assert_eq!(suback(&mut sensor3, 1, &filters).await, vec![1, 1, d, 1, d, 1, d, 1, d, 1]);

    // A denied filter is not bound: nothing published on `cmd/x/y` reaches the client.
    let mut anon = client(&s, V5, "writer", None).await;
    anon.send(&Packet::Publish(publish_packet("cmd/x/y", QoS::AtMostOnce, 0, b"x"))).await;
    anon.ping().await;
    sensor.quiet().await;
}

#[tokio::test]
async fn anonymous_clients_get_only_the_all_user_entries_and_c_is_the_client_id() {
    let s = server(ACL).await;
    let mut anon = client(&s, V5, "dev1", None).await;
    let d = reason::NOT_AUTHORIZED;
    assert_eq!(
        suback(&mut anon, 1, &["public/#", "sensors/%u/#", "sensors/+/t", "public/a/+"]).await,
        vec![1, d, d, 1]
    );
    assert_eq!(anon.puback("clients/dev1/out", 2).await, reason::NO_MATCHING_SUBSCRIBERS);
    assert_eq!(anon.puback("clients/dev2/out", 3).await, d);
    assert_eq!(anon.puback("public/x", 4).await, d, "read-only for everyone");
    // The all-user entries apply to named users too.
    let mut bob = client(&s, V5, "bob1", Some("bob")).await;
    assert_eq!(bob.puback("clients/bob1/out", 1).await, reason::NO_MATCHING_SUBSCRIBERS);
    assert_eq!(suback(&mut bob, 2, &["public/#"]).await, vec![1]);
}

#[tokio::test]
async fn without_acl_entries_everything_is_allowed() {
    let s = server("").await;
    let mut anon = client(&s, V5, "free", None).await;
    assert_eq!(suback(&mut anon, 1, &["#", "sensors/+/t"]).await, vec![1, 1]);
    assert_eq!(anon.puback("anything/at/all", 2).await, reason::SUCCESS);
    let p = within("delivery", anon.recv_publish()).await;
    assert_eq!(p.topic.as_str(), "anything/at/all");
}

#[tokio::test]
async fn a_will_on_a_denied_topic_refuses_the_connect() {
    let s = server(ACL).await;
    for (version, refused) in [(V5, reason::NOT_AUTHORIZED), (V311, return_code::NOT_AUTHORIZED)] {
        let mut c = login(version, "willing", Some("sensor"));
        c.will = Some(will("sensors/other/status", b"gone", QoS::AtLeastOnce, false));
        let (_c, ack) = MqttRaw::connect(s.mqtt_addr(), c).await;
        assert_eq!(ack.code, refused, "{version:?}");
        let mut c = login(version, "willing", Some("sensor"));
        c.will = Some(will("sensors/sensor/status", b"gone", QoS::AtLeastOnce, false));
        let (_c, ack) = MqttRaw::connect(s.mqtt_addr(), c).await;
        assert_eq!(ack.code, 0, "{version:?} granted will");
    }
}

#[tokio::test]
async fn a_reload_replaces_the_acl_and_deliveries_are_checked_against_it() {
    let before = "[[acl]]\ntopic = \"public/#\"\naccess = \"readwrite\"\n";
    let s = server(before).await;
    // A persistent session subscribed while reading was granted.
    let (mut c, ack) = MqttRaw::connect(s.mqtt_addr(), connect_packet(V311, "keeper", false)).await;
    assert_eq!(ack.code, 0);
    assert_eq!(suback(&mut c, 1, &["public/#"]).await, vec![1]);
    c.send(&Packet::Publish(publish_packet("public/a", QoS::AtMostOnce, 0, b"1"))).await;
    assert_eq!(within("delivery", c.recv_publish()).await.topic.as_str(), "public/a");
    c.send(&Packet::Disconnect(Disconnect { reason: 0, properties: Properties::default() })).await;
    c.closed().await;

    let after = "[[acl]]\ntopic = \"public/#\"\naccess = \"write\"\n";
    s.server.reload(&write_config(s.dir.path(), &config(after))).expect("reload");
    let mut fresh = client(&s, V5, "fresh", None).await;
    assert_eq!(suback(&mut fresh, 1, &["public/#"]).await, vec![reason::NOT_AUTHORIZED]);
    // The session comes back with its subscription, but what it may no longer read is not
    // delivered.
    let (mut c, ack) = MqttRaw::connect(s.mqtt_addr(), connect_packet(V311, "keeper", false)).await;
    assert_eq!(ack.code, 0);
    assert!(ack.session_present);
    fresh.send(&Packet::Publish(publish_packet("public/a", QoS::AtMostOnce, 0, b"2"))).await;
    fresh.ping().await;
    c.quiet().await;
}

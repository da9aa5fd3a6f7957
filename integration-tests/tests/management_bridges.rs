//! The bridges' and shovels' status through the management API (issue 17): `GET /api/bridges`
//! for an MQTT bridge to a real Mosquitto, `GET /api/shovels` (RabbitMQ's shovel status shape)
//! for a shovel into a real RabbitMQ, read with reqwest while rumqttc clients publish. SKIPPED
//! (printed) when Mosquitto or RabbitMQ is not installed.

use std::time::{Duration, Instant};

use ferry_bridge::LinkState;
use ferry_core::auth::PasswordHash;
use ferry_integration_tests::mosquitto::Mosquitto;
use ferry_integration_tests::mqtt::{text, v311, v5};
use ferry_integration_tests::rabbitmq::rabbit;
use ferry_integration_tests::{within, TestServer};
use serde_json::Value;

const PASSWORD: &str = "s3cret";

/// Users `admin` (administrator) and `owner` (management, with permissions on vhost `other`
/// only); MQTT, AMQP and HTTP listeners; `extra` (bridges, shovels) after.
async fn ferry(extra: &str) -> TestServer {
    let hash = PasswordHash::argon2id(PASSWORD.as_bytes());
    let toml = format!(
        "[[users]]\nname = \"admin\"\npassword_hash = \"{hash}\"\ntags = [\"administrator\"]\n\
         [[users]]\nname = \"owner\"\npassword_hash = \"{hash}\"\ntags = [\"management\"]\n\
         [[permissions]]\nuser = \"owner\"\nvhost = \"other\"\nconfigure = \".*\"\nwrite = \".*\"\nread = \".*\"\n\
         [[permissions]]\nuser = \"admin\"\nvhost = \"/\"\nconfigure = \".*\"\nwrite = \".*\"\nread = \".*\"\n\
         [[permissions]]\nuser = \"anonymous\"\nvhost = \"/\"\nconfigure = \".*\"\nwrite = \".*\"\nread = \".*\"\n\
         [[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = true\n\
         [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"http\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\nvhost = \"other\"\n{extra}"
    );
    let frontends = ferry_server::frontends::builtin(&Default::default());
    TestServer::start(&toml, &frontends).await
}

async fn get(server: &TestServer, user: &str, path: &str) -> (u16, Value) {
    let url = format!("http://{}{path}", server.server.http_addrs()[0]);
    let r = within(path, reqwest::Client::new().get(url).basic_auth(user, Some(PASSWORD)).send()).await.expect("GET");
    let status = r.status().as_u16();
    (status, within("body", r.json::<Value>()).await.expect("JSON"))
}

/// Reads `path` until `done` holds for its JSON. The counters move with no event to wait on
/// through HTTP; the bridge's own status (`wait_for`) is the event where there is one.
async fn poll(server: &TestServer, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, v) = get(server, "admin", path).await;
        assert_eq!(status, 200, "{v}");
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "GET {path}: not as expected; last:\n{v:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_bridge_to_mosquitto_is_listed_up_with_what_it_forwarded() {
    let Some(mosquitto) = Mosquitto::start("").await else { return };
    let bridge = format!(
        "[[bridges]]\nname = \"edge\"\naddress = \"{}\"\nprotocol_version = \"5.0\"\n\
         reconnect_initial_ms = 50\nreconnect_max_ms = 400\n\
         topics = [{{ pattern = \"up/#\", direction = \"out\", qos = 1, remote_prefix = \"edge/\" }}]\n",
        mosquitto.addr()
    );
    let local = ferry(&bridge).await;
    let mut o = rumqttc::v5::MqttOptions::new("mosq-client", "127.0.0.1", mosquitto.port);
    o.set_keep_alive(Duration::from_secs(30));
    let (mut remote, _) = v5::Client::connect(o).await;
    remote.subscribe("edge/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await;
    within("bridge up", local.server.bridges().wait_for("edge", |s| s.state == LinkState::Up)).await.unwrap();

    let (status, list) = get(&local, "admin", "/api/bridges").await;
    assert_eq!(status, 200);
    let b = &list[0];
    assert_eq!(b["name"], "edge");
    assert_eq!(b["state"], "up");
    assert_eq!(b["remote"], mosquitto.addr().to_string());
    assert_eq!(b["protocol"], "MQTT 5.0");
    assert_eq!(b["source"], "config");
    assert_eq!(b["topics"][0]["pattern"], "up/#");
    assert_eq!(b["topics"][0]["remote_prefix"], "edge/");
    assert!(b["last_error"].is_null(), "{b}");
    assert_eq!(b["since"].as_str().unwrap().len(), "2024-01-01 00:00:00".len());

    let mut publisher = v311::connect(&local, "pub").await;
    for i in 0..3 {
        publisher.publish(&format!("up/{i}"), rumqttc::QoS::AtLeastOnce, false, b"x").await;
    }
    for _ in 0..3 {
        let p = remote.publish_received().await;
        assert!(text(&p.topic).starts_with("edge/up/"));
    }
    let one = poll(&local, "/api/bridges/edge", |b| b["ferry"]["forwarded"]["out"] == 3).await;
    assert_eq!(one["ferry"]["queued_messages"], 0);
    assert_eq!(one["ferry"]["dropped"]["overflow"], 0);
    assert_eq!(one["ferry"]["connects"], 1);

    // A management user sees the bridges of its vhosts only; an unknown one is 404.
    let (status, mine) = get(&local, "owner", "/api/bridges").await;
    assert_eq!((status, mine), (200, Value::Array(Vec::new())));
    assert_eq!(get(&local, "owner", "/api/bridges/edge").await.0, 404);
    assert_eq!(get(&local, "admin", "/api/bridges/nope").await.0, 404);
    assert_eq!(get(&local, "admin", "/api/shovels").await.1, Value::Array(Vec::new()));

    // The remote goes away: the state says so, with the reason.
    drop(mosquitto);
    within("bridge down", local.server.bridges().wait_for("edge", |s| s.state != LinkState::Up)).await.unwrap();
    let down = poll(&local, "/api/bridges/edge", |b| !b["last_error"].is_null()).await;
    assert_ne!(down["state"], "up", "{down}");
}

#[tokio::test]
async fn a_shovel_into_rabbitmq_is_listed_in_rabbitmq_s_shape() {
    let Some(rabbit) = rabbit().await else { return };
    let (_rc, rch) = rabbit.channel().await;
    let work = format!("work-{}", std::process::id());
    rch.queue_declare(
        work.as_str().into(),
        lapin::options::QueueDeclareOptions { durable: true, ..Default::default() },
        Default::default(),
    )
    .await
    .unwrap();
    let shovel = format!(
        "[[shovels]]\nname = \"s\"\nreconnect_initial_ms = 50\nreconnect_max_ms = 400\n\
         src_uri = \"local\"\nsrc_exchange = \"amq.topic\"\nsrc_exchange_key = \"telemetry.#\"\n\
         dest_uri = \"{}\"\ndest_queue = \"{work}\"\n",
        rabbit.uri()
    );
    let local = ferry(&shovel).await;
    within("shovel up", local.server.bridges().wait_for("s", |s| s.state == LinkState::Up)).await.unwrap();
    let mut publisher = v311::connect(&local, "pub").await;
    publisher.publish("telemetry/a", rumqttc::QoS::AtLeastOnce, false, b"x").await;

    let list = poll(&local, "/api/shovels", |l| l[0]["ferry"]["forwarded"]["out"] == 1).await;
    let s = &list[0];
    assert_eq!(s["name"], "s");
    assert_eq!(s["vhost"], "/");
    assert_eq!(s["type"], "static");
    assert_eq!(s["state"], "running");
    assert_eq!(s["src_uri"], "amqp://");
    assert_eq!(s["dest_uri"], rabbit.uri());
    assert!(!s.to_string().contains("guest:"), "no password anywhere: {s}");
    assert_eq!(s["src_exchange"], "amq.topic");
    assert_eq!(s["src_exchange_key"], "telemetry.#");
    assert_eq!(s["dest_queue"], work.as_str());
    assert_eq!(s["ack_mode"], "on-confirm");
    assert!(s["timestamp"].as_str().unwrap().starts_with("20"), "{s}");
    assert_eq!(get(&local, "admin", "/api/shovels/%2F").await.1, list);
    assert_eq!(get(&local, "admin", "/api/shovels/other").await.1, Value::Array(Vec::new()));
    assert_eq!(get(&local, "admin", "/api/shovels/nowhere").await.0, 404);
}

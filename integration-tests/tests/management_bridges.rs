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
    assert_eq!(b["addresses"], serde_json::json!([mosquitto.addr().to_string()]));
    assert_eq!(b["round_robin"], false);
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
    // The file's bridge is not the API's to change.
    let body = serde_json::json!({"address": "127.0.0.1:1", "topics": [{"pattern": "#", "direction": "out"}]});
    let (status, refused) = send(&local, reqwest::Method::PUT, "/api/bridges/edge", Some(body)).await;
    assert_eq!(status, 405, "{refused}");
    assert!(refused["reason"].as_str().unwrap().contains("configured in the server's file"), "{refused}");
    assert_eq!(send(&local, reqwest::Method::DELETE, "/api/bridges/edge", None).await.0, 405);

    // The remote goes away: the state says so, with the reason.
    drop(mosquitto);
    within("bridge down", local.server.bridges().wait_for("edge", |s| s.state != LinkState::Up)).await.unwrap();
    let down = poll(&local, "/api/bridges/edge", |b| !b["last_error"].is_null()).await;
    assert_ne!(down["state"], "up", "{down}");
}

/// `method path` as admin with an optional JSON body: the status and the JSON answer (`Null`
/// when empty).
async fn send(server: &TestServer, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("http://{}{path}", server.server.http_addrs()[0]);
    let mut r = reqwest::Client::new().request(method, url).basic_auth("admin", Some(PASSWORD));
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = within(path, r.send()).await.expect("request");
    let status = r.status().as_u16();
    let bytes = within("body", r.bytes()).await.expect("body");
    (status, if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("JSON") })
}

/// The next message the remote subscriber gets: topic and payload.
async fn forwarded(remote: &mut v5::Client) -> (String, String) {
    let p = remote.publish_received().await;
    (text(&p.topic).to_string(), text(&p.payload).to_string())
}

async fn up(server: &TestServer, name: &str) {
    within("bridge up", server.server.bridges().wait_for(name, |s| s.state == LinkState::Up))
        .await
        .unwrap_or_else(|| panic!("no bridge {name}"));
}

#[tokio::test]
async fn a_bridge_put_through_the_api_forwards_changes_survives_a_restart_and_is_removed() {
    let Some(mosquitto) = Mosquitto::start("").await else { return };
    let local = ferry("").await;
    let table = |prefix: &str| {
        serde_json::json!({
            "address": mosquitto.addr().to_string(),
            "protocol_version": "5.0",
            "reconnect_initial_ms": 50,
            "reconnect_max_ms": 400,
            "topics": [{"pattern": "up/#", "direction": "out", "qos": 1, "remote_prefix": prefix}],
        })
    };
    // Checked as the file's tables are, every problem named.
    let (status, bad) =
        send(&local, reqwest::Method::PUT, "/api/bridges/b1", Some(serde_json::json!({"address": "x"}))).await;
    assert_eq!(status, 400, "{bad}");
    let reason = bad["reason"].as_str().unwrap();
    assert!(
        reason.contains("address: \"x\" is not host:port") && reason.contains("at least one topic rule"),
        "{reason}"
    );
    let mut unknown = table("api/");
    unknown["colour"] = "red".into();
    let (status, bad) = send(&local, reqwest::Method::PUT, "/api/bridges/b1", Some(unknown)).await;
    assert!(status == 400 && bad["reason"].as_str().unwrap().contains("colour"), "{bad}");
    let mut relative = table("api/");
    relative["password_file"] = "pw.txt".into();
    relative["username"] = "u".into();
    let (status, bad) = send(&local, reqwest::Method::PUT, "/api/bridges/b1", Some(relative)).await;
    assert!(status == 400 && bad["reason"].as_str().unwrap().contains("absolute"), "{bad}");
    let (status, _) = send(
        &local,
        reqwest::Method::PUT,
        "/api/bridges/other-name",
        Some({
            let mut t = table("api/");
            t["name"] = "b1".into();
            t
        }),
    )
    .await;
    assert_eq!(status, 400, "the name in the body must be the path's");
    let mut elsewhere = table("api/");
    elsewhere["vhost"] = "nowhere".into();
    let (status, bad) = send(&local, reqwest::Method::PUT, "/api/bridges/b1", Some(elsewhere)).await;
    assert!(status == 400 && bad["reason"].as_str().unwrap().contains("vhost \"nowhere\" does not exist"), "{bad}");
    assert_eq!(send(&local, reqwest::Method::GET, "/api/bridges/b1", None).await.0, 404, "nothing made");
    let url = format!("http://{}/api/bridges/b1", local.server.http_addrs()[0]);
    let r =
        reqwest::Client::new().put(url).basic_auth("owner", Some(PASSWORD)).json(&table("api/")).send().await.unwrap();
    assert_eq!(r.status(), 401, "administrators only");

    let mut o = rumqttc::v5::MqttOptions::new("mosq-client", "127.0.0.1", mosquitto.port);
    o.set_keep_alive(Duration::from_secs(30));
    let (mut remote, _) = v5::Client::connect(o).await;
    remote.subscribe("#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await;

    assert_eq!(send(&local, reqwest::Method::PUT, "/api/bridges/b1", Some(table("api/"))).await.0, 201);
    up(&local, "b1").await;
    let mut publisher = v311::connect(&local, "pub").await;
    publisher.publish("up/1", rumqttc::QoS::AtLeastOnce, false, b"one").await;
    assert_eq!(forwarded(&mut remote).await, ("api/up/1".to_string(), "one".to_string()));
    let (_, listed) = send(&local, reqwest::Method::GET, "/api/bridges/b1", None).await;
    assert_eq!(listed["source"], "api");
    assert_eq!(listed["definition"]["topics"][0]["remote_prefix"], "api/");

    // Part of the definitions, under Ferry's own key: exported, imported again as it is, and
    // into another Ferry.
    let (_, defs) = send(&local, reqwest::Method::GET, "/api/definitions", None).await;
    assert_eq!(defs["ferry_bridges"][0]["name"], "b1", "{defs:#}");
    let (status, again) = send(&local, reqwest::Method::POST, "/api/definitions", Some(defs.clone())).await;
    assert_eq!(status, 204, "{again}");
    let mut other_settings = defs.clone();
    other_settings["ferry_bridges"][0]["max_hops"] = 3.into();
    let (status, refused) = send(&local, reqwest::Method::POST, "/api/definitions", Some(other_settings)).await;
    assert!(status == 400 && refused["reason"].as_str().unwrap().contains("bridge 'b1' exists with other settings"));
    let other = ferry("").await;
    let mut renamed = defs.clone();
    renamed["ferry_bridges"][0]["name"] = "b9".into();
    renamed["users"] = Value::Array(Vec::new());
    assert_eq!(send(&other, reqwest::Method::POST, "/api/definitions", Some(renamed)).await.0, 204);
    up(&other, "b9").await;
    let mut other_publisher = v311::connect(&other, "pub9").await;
    other_publisher.publish("up/9", rumqttc::QoS::AtLeastOnce, false, b"nine").await;
    assert_eq!(forwarded(&mut remote).await, ("api/up/9".to_string(), "nine".to_string()));
    drop(other_publisher);
    drop(other);

    // Changed: the new rules apply.
    assert_eq!(send(&local, reqwest::Method::PUT, "/api/bridges/b1", Some(table("api2/"))).await.0, 204);
    up(&local, "b1").await;
    publisher.publish("up/2", rumqttc::QoS::AtLeastOnce, false, b"two").await;
    assert_eq!(forwarded(&mut remote).await, ("api2/up/2".to_string(), "two".to_string()));

    // A restart starts it again, as changed.
    drop(publisher);
    let local = local.restart().await;
    up(&local, "b1").await;
    let mut publisher = v311::connect(&local, "pub").await;
    publisher.publish("up/3", rumqttc::QoS::AtLeastOnce, false, b"three").await;
    assert_eq!(forwarded(&mut remote).await, ("api2/up/3".to_string(), "three".to_string()));

    // Removed: gone, with its queue, and it does not come back.
    assert_eq!(send(&local, reqwest::Method::DELETE, "/api/bridges/b1", None).await.0, 204);
    assert_eq!(send(&local, reqwest::Method::GET, "/api/bridges/b1", None).await.0, 404);
    assert_eq!(send(&local, reqwest::Method::DELETE, "/api/bridges/b1", None).await.0, 404);
    assert_eq!(send(&local, reqwest::Method::GET, "/api/queues/%2F/ferry-bridge.b1", None).await.0, 404);
    publisher.publish("up/4", rumqttc::QoS::AtLeastOnce, false, b"four").await;
    drop(publisher);
    let local = local.restart().await;
    assert_eq!(send(&local, reqwest::Method::GET, "/api/bridges", None).await.1, Value::Array(Vec::new()));
    remote.no_publish().await;
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

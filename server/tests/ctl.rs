//! `ferry ctl`, the binary, against a real Ferry started in-process (MQTT, AMQP and HTTP
//! listeners on loopback ports of the kernel's choosing; a lapin client declares and fills a
//! queue, a rumqttc 5.0 client is the connection closed), and against a small axum stub for
//! the endpoints this Ferry does not serve yet (`/api/mqtt/sessions`, `/api/bridges`,
//! `/api/shovels`, `/api/definitions`), in the shapes docs/management.md gives them.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use common::{FERRY, PATIENCE};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::{json, Value};

/// Runs `ferry ctl --url URL args…` (no FERRY_CTL_* from the environment unless `env` sets
/// them) off the async workers, killed if it outlives [`PATIENCE`].
async fn ctl(url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(FERRY);
    cmd.arg("ctl").arg("--url").arg(url).args(args);
    for var in ["FERRY_CTL_URL", "FERRY_CTL_USER", "FERRY_CTL_PASSWORD"] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn ferry ctl");
    let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(PATIENCE, waited).await {
        Ok(out) => out.expect("join").expect("ferry ctl output"),
        Err(_) => panic!("ferry ctl {args:?} did not exit within {PATIENCE:?}"),
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Succeeded, with its standard output.
fn ok(o: &Output) -> String {
    assert!(o.status.success(), "exit {:?}; stderr: {}; stdout: {}", o.status, stderr(o), stdout(o));
    stdout(o)
}

/// Failed with exit code 1, with its standard error.
fn failed(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "stdout: {}; stderr: {}", stdout(o), stderr(o));
    assert!(o.stdout.is_empty(), "nothing on stdout: {}", stdout(o));
    stderr(o)
}

/// A Ferry with its embedded defaults' users (none: `guest` / `guest` on loopback) and one
/// listener of each protocol; the temporary directory lives as long as it does.
struct Ferry {
    server: ferry_server::Server,
    _dir: tempfile::TempDir,
}

impl Ferry {
    async fn start() -> Ferry {
        Ferry::start_with(tempfile::tempdir().unwrap(), "").await
    }

    /// With `http_keys` added to the HTTP listener, in `dir` (for its TLS files).
    async fn start_with(dir: tempfile::TempDir, http_keys: &str) -> Ferry {
        let toml = format!(
            "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
             [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
             [[listeners]]\nprotocol = \"http\"\nbind = \"127.0.0.1:0\"\n{http_keys}"
        );
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, toml).unwrap();
        let mut config = ferry_server::Config::load(&path).unwrap();
        config.broker.data_dir = dir.path().join("data");
        let mut builder = ferry_server::Server::builder(config);
        for f in ferry_server::frontends::builtin(&Default::default()) {
            builder = builder.frontend(f);
        }
        Ferry { server: builder.start().await.expect("ferry starts"), _dir: dir }
    }

    fn url(&self) -> String {
        format!("http://{}", self.server.http_addrs()[0])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_brokers_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("server.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), certified.key_pair.serialize_pem()).unwrap();
    let ca = dir.path().join("server.pem").to_str().unwrap().to_string();
    let ferry = Ferry::start_with(dir, "tls = { cert = \"server.pem\", key = \"server.key\" }\n").await;
    let url = format!("https://localhost:{}", ferry.server.http_addrs()[0].port());
    let x: Value =
        serde_json::from_str(&ok(&ctl(&url, &["--ca", &ca, "-f", "json", "list", "exchanges"], &[]).await)).unwrap();
    assert!(named(&x, "amq.topic").is_some(), "{x}");
    // Without it, Mozilla's roots do not know the broker's certificate.
    let unknown = failed(&ctl(&url, &["list", "exchanges"], &[]).await);
    assert!(
        unknown.starts_with(&format!("ferry ctl: cannot reach {url}: ")) && unknown.contains("certificate"),
        "{unknown}"
    );
    let plain = failed(&ctl(&url.replace("https", "http"), &["list", "exchanges"], &[]).await);
    assert!(plain.starts_with("ferry ctl: cannot reach http://localhost:"), "{plain}");
}

/// The item of a JSON list whose `name` is `name`.
fn named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array().expect("a JSON list").iter().find(|q| q["name"] == name)
}

async fn queues_json(url: &str) -> Value {
    serde_json::from_str(&ok(&ctl(url, &["--format", "json", "list", "queues"], &[]).await)).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_purges_and_deletes_a_queue_an_amqp_client_declared() {
    let ferry = Ferry::start().await;
    let url = ferry.url();
    let amqp = format!("amqp://guest:guest@{}/%2F", ferry.server.local_addr(1));
    let conn = lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("orders".into(), durable, FieldTable::default()).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for n in 0..3 {
        let body = format!("order {n}");
        let confirm = ch
            .basic_publish(
                "".into(),
                "orders".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
        // Confirmed: in the queue.
        assert!(confirm.await.unwrap().is_ack());
    }

    let table = ok(&ctl(&url, &["list", "queues"], &[]).await);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[1], "| vhost | name   | messages | ready | unacked | consumers | publish/s | deliver/s |",
        "{table}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("| /     | orders | 3        | 3     | 0       | 0         |")),
        "{table}"
    );
    assert!(lines.iter().all(|l| l.chars().count() == lines[0].len()), "aligned: {table}");
    let q = queues_json(&url).await;
    assert_eq!(named(&q, "orders").expect("orders listed")["messages_ready"], 3, "{q}");
    // --vhost picks the vhost's path (percent-encoded).
    assert!(ok(&ctl(&url, &["list", "queues", "--vhost", "/"], &[]).await).contains("| orders |"));

    assert_eq!(ok(&ctl(&url, &["purge", "queue", "orders"], &[]).await), "queue \"orders\" in vhost \"/\" purged\n");
    assert_eq!(named(&queues_json(&url).await, "orders").expect("still there")["messages"], 0);

    assert_eq!(
        ok(&ctl(&url, &["delete", "queue", "orders", "--vhost", "/"], &[]).await),
        "queue \"orders\" in vhost \"/\" deleted\n"
    );
    assert!(named(&queues_json(&url).await, "orders").is_none());
    let again = failed(&ctl(&url, &["delete", "queue", "orders"], &[]).await);
    assert_eq!(again, "ferry ctl: not found: queue \"orders\" in vhost \"/\"\n");
    drop(conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_an_mqtt_clients_connection_with_the_reason() {
    let ferry = Ferry::start().await;
    let url = ferry.url();
    let addr = ferry.server.local_addr(0);
    let mut options = rumqttc::v5::MqttOptions::new("sensor-7", addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (_client, mut events) = rumqttc::v5::AsyncClient::new(options, 10);
    // Polled until the CONNACK; then its connection is in the list.
    loop {
        let e = tokio::time::timeout(PATIENCE, events.poll()).await.expect("CONNACK in time").expect("connects");
        if matches!(e, rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_))) {
            break;
        }
    }
    let table = ok(&ctl(&url, &["list", "connections"], &[]).await);
    assert!(table.contains("| MQTT 5.0 ") && table.contains("| sensor-7 "), "{table}");
    let list: Value = serde_json::from_str(&ok(&ctl(&url, &["-f", "json", "list", "connections"], &[]).await)).unwrap();
    let name = list.as_array().unwrap().iter().find(|c| c["ferry"]["client_id"] == "sensor-7").expect("listed")["name"]
        .as_str()
        .unwrap()
        .to_string();
    // `peer -> local`: spaces, `>` and `:` travel percent-encoded.
    let out = ok(&ctl(&url, &["close", "connection", &name, "--reason", "maintenance window"], &[]).await);
    assert_eq!(out, format!("connection {name:?} closed\n"));
    let error = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Err(e) = events.poll().await {
                return e;
            }
        }
    })
    .await
    .expect("closed in time");
    match error {
        rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => {
            assert_eq!(reason_code, rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::AdministrativeAction);
            assert_eq!(reason_string.as_deref(), Some("maintenance window"));
        }
        other => panic!("expected DISCONNECT 0x98, got {other:?}"),
    }
    let gone = failed(&ctl(&url, &["close", "connection", &name], &[]).await);
    assert!(gone.contains("not found: connection"), "{gone}");
    let bad = failed(&ctl(&url, &["close", "connection", &name, "--reason", "bye\n"], &[]).await);
    assert!(bad.contains("--reason: printable ASCII only"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_clear_and_exit_with_1() {
    let ferry = Ferry::start().await;
    let url = ferry.url();
    let wrong = failed(&ctl(&url, &["--user", "guest", "--password", "wrong", "list", "queues"], &[]).await);
    assert!(wrong.starts_with("ferry ctl: login refused for user \"guest\""), "{wrong}");
    let wrong =
        failed(&ctl(&url, &["list", "queues"], &[("FERRY_CTL_USER", "guest"), ("FERRY_CTL_PASSWORD", "nope")]).await);
    assert!(wrong.starts_with("ferry ctl: login refused for user \"guest\""), "{wrong}");
    // JSON parses; the default exchange and amq.* are there.
    let x: Value =
        serde_json::from_str(&ok(&ctl(&url, &["--format", "json", "list", "exchanges"], &[]).await)).unwrap();
    assert!(named(&x, "amq.topic").is_some(), "{x}");

    // A port nothing listens on.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let nowhere = format!("http://{free}");
    let refused = failed(&ctl(&nowhere, &["list", "queues"], &[]).await);
    assert!(refused.starts_with(&format!("ferry ctl: cannot reach {nowhere}: ")), "{refused}");
    // No guest away from loopback; no password.
    let remote = failed(&ctl("http://192.0.2.1:15672", &["list", "queues"], &[]).await);
    assert!(remote.contains("guest / guest is the default only for a loopback URL"), "{remote}");
    let no_password = failed(&ctl(&url, &["--user", "admin", "list", "queues"], &[]).await);
    assert!(no_password.contains("no password for user \"admin\""), "{no_password}");
    let not_http = failed(&ctl("ftp://127.0.0.1", &["list", "queues"], &[]).await);
    assert!(not_http.contains("an http:// or https:// URL"), "{not_http}");
}

/// What the stub saw: the Authorization headers and the bodies POSTed.
#[derive(Default)]
struct Seen {
    authorization: Vec<String>,
    posted: Vec<Value>,
}

type Shared = Arc<Mutex<Seen>>;

fn saw(seen: &Shared, headers: &HeaderMap) {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    seen.lock().unwrap().authorization.push(auth);
}

fn definitions() -> Value {
    json!({"rabbit_version": "3.10.8", "users": [], "vhosts": [{"name": "/"}],
           "queues": [{"name": "orders", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}}],
           "exchanges": [], "bindings": []})
}

/// The endpoints other parts of issue 17 add, in their contract's shapes; nothing else.
async fn stub() -> (SocketAddr, Shared) {
    let seen: Shared = Arc::default();
    let app = Router::new()
        .route(
            "/api/mqtt/sessions",
            get(|State(s): State<Shared>, h: HeaderMap| async move {
                saw(&s, &h);
                Json(json!([
                    {"client_id": "sensor-7", "vhost": "/", "user": "sensor", "connected": false, "messages": 12,
                     "subscriptions": [{"filter": "plant/+/temp", "qos": 1}, {"filter": "alarms/#", "qos": 2}]},
                    {"client_id": "svc", "vhost": "other", "user": "svc", "connected": true, "messages": 0, "subscriptions": []}
                ]))
            }),
        )
        .route(
            "/api/bridges",
            get(|| async {
                Json(json!([{"name": "to-cloud", "state": "up", "remote": "mqtts://cloud.example:8883",
                              "queued": 5, "in_flight": 2, "forwarded": 1000, "dropped": 1}]))
            }),
        )
        .route(
            "/api/shovels",
            get(|| async {
                Json(json!([{"name": "orders-out", "vhost": "/", "type": "static", "state": "running",
                              "src_uri": "amqp://", "src_queue": "orders", "dest_uri": "amqp://remote.example",
                              "dest_exchange": "incoming", "timestamp": "2026-12-06 12:00:00"}]))
            }),
        )
        .route(
            "/api/definitions",
            get(|| async { Json(definitions()) }).post(|State(s): State<Shared>, h: HeaderMap, Json(body): Json<Value>| async move {
                saw(&s, &h);
                s.lock().unwrap().posted.push(body);
                StatusCode::NO_CONTENT
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"error": "Object Not Found", "reason": "Not Found"}))) })
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_bridges_shovels_and_definitions_follow_the_contract() {
    let (addr, seen) = stub().await;
    let url = format!("http://{addr}");

    let sessions = ok(&ctl(&url, &["list", "sessions"], &[]).await);
    assert_eq!(
        sessions,
        "+-------+-----------+--------+-----------+----------+--------------------------------+\n\
         | vhost | client id | user   | connected | messages | subscriptions                  |\n\
         +-------+-----------+--------+-----------+----------+--------------------------------+\n\
         | /     | sensor-7  | sensor | false     | 12       | plant/+/temp (1), alarms/# (2) |\n\
         | other | svc       | svc    | true      | 0        |                                |\n\
         +-------+-----------+--------+-----------+----------+--------------------------------+\n"
    );
    // --vhost filters a list the API does not serve per vhost.
    let one: Value =
        serde_json::from_str(&ok(&ctl(&url, &["-f", "json", "list", "sessions", "--vhost", "other"], &[]).await))
            .unwrap();
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["client_id"], "svc");

    let bridges = ok(&ctl(&url, &["list", "bridges"], &[]).await);
    assert!(
        bridges
            .contains("| name     | state | remote                     | queued | in flight | forwarded | dropped |"),
        "{bridges}"
    );
    assert!(
        bridges
            .contains("| to-cloud | up    | mqtts://cloud.example:8883 | 5      | 2         | 1000      | 1       |"),
        "{bridges}"
    );
    let shovels = ok(&ctl(&url, &["list", "shovels"], &[]).await);
    assert!(
        shovels.contains(
            "| /     | orders-out | static | running | amqp:// | orders | amqp://remote.example | incoming |"
        ),
        "{shovels}"
    );

    // Export writes the definitions; import sends a file's back.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("defs.json");
    let file = file.to_str().unwrap();
    assert_eq!(ok(&ctl(&url, &["export", file], &[]).await), format!("definitions exported to {file}\n"));
    let exported: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    assert_eq!(exported, definitions());
    assert_eq!(
        ok(&ctl(&url, &["import", file], &[("FERRY_CTL_USER", "admin"), ("FERRY_CTL_PASSWORD", "pw")]).await),
        format!("definitions imported from {file}\n")
    );
    {
        let s = seen.lock().unwrap();
        assert_eq!(s.posted, [definitions()]);
        // guest / guest on loopback by default; the environment's user otherwise.
        assert_eq!(s.authorization.first().map(String::as_str), Some("Basic Z3Vlc3Q6Z3Vlc3Q="));
        assert_eq!(s.authorization.last().map(String::as_str), Some("Basic YWRtaW46cHc="));
    }

    // A path the server does not have.
    let unserved = failed(&ctl(&url, &["list", "queues"], &[]).await);
    assert_eq!(unserved, "ferry ctl: this server does not serve /api/queues\n");
}

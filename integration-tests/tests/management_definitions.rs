//! Users, permissions and definitions through the management API (issue 17), with real
//! clients: reqwest for the API, rumqttc 5.0 and lapin logging in as the users the API made,
//! `rabbitmqadmin export` / `import` (the script shipped in Debian's rabbitmq-server package;
//! SKIPPED when it is not installed), and an export made by a real RabbitMQ with `rabbitmqctl
//! export_definitions` (SKIPPED when RabbitMQ is not installed).

use ferry_core::auth::PasswordHash;
use ferry_integration_tests::amqp::reply_code;
use ferry_integration_tests::mqtt::{connect_packet, v5, RawClient};
use ferry_integration_tests::rabbitmq::rabbit;
use ferry_integration_tests::{within, TestServer};
use ferry_mqtt::codec::ProtocolVersion;
use futures_util::StreamExt;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Event, ExchangeKind};
use serde_json::{json, Value};

const PASSWORD: &str = "s3cret";

/// Users `admin` (administrator) and `watcher` (monitoring); MQTT (0), AMQP (1) and HTTP
/// listeners on loopback.
fn config() -> String {
    let hash = PasswordHash::argon2id(PASSWORD.as_bytes());
    format!(
        "[[users]]\nname = \"admin\"\npassword_hash = \"{hash}\"\ntags = [\"administrator\"]\n\
         [[users]]\nname = \"watcher\"\npassword_hash = \"{hash}\"\ntags = [\"monitoring\"]\n\
         [[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"http\"\nbind = \"127.0.0.1:0\"\n"
    )
}

async fn server() -> TestServer {
    let frontends = ferry_server::frontends::builtin(&Default::default());
    TestServer::start(&config(), &frontends).await
}

fn url(server: &TestServer, path: &str) -> String {
    format!("http://{}{path}", server.server.http_addrs()[0])
}

/// Sends `method path` as `user` (with the password `password`) with an optional JSON body;
/// the status and the body as JSON (`Null` when empty).
async fn call(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    user: (&str, &str),
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new().request(method.clone(), url(server, path)).basic_auth(user.0, Some(user.1));
    if let Some(b) = body {
        r = r.json(&b);
    }
    let response = within(path, r.send()).await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = response.status().as_u16();
    let bytes = within("body", response.bytes()).await.expect("body");
    let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("JSON") };
    (status, value)
}

async fn admin(server: &TestServer, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    call(server, method, path, ("admin", PASSWORD), body).await
}

async fn amqp_as(server: &TestServer, user: &str, password: &str) -> Result<lapin::Connection, lapin::Error> {
    let uri = format!("amqp://{user}:{password}@{}/%2f", server.addr(1));
    within("lapin connects", lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())).await
}

async fn mqtt_as(server: &TestServer, id: &str, user: &str, password: &str) -> (v5::Client, v5::ConnAckOf) {
    let mut o = v5::options(server, id);
    o.set_credentials(user, password);
    v5::Client::connect(o).await
}

#[tokio::test]
async fn a_user_made_through_the_api_logs_in_everywhere_and_once_deleted_is_closed_and_refused() {
    let server = server().await;
    let put = || Some(json!({"password": "bob-pw", "tags": "management"}));
    assert_eq!(admin(&server, reqwest::Method::PUT, "/api/users/bob", put()).await.0, 201);
    assert_eq!(admin(&server, reqwest::Method::PUT, "/api/users/bob", put()).await.0, 204, "replaced");

    // HTTP, AMQP and MQTT, at once.
    let (status, me) = call(&server, reqwest::Method::GET, "/api/whoami", ("bob", "bob-pw"), None).await;
    assert_eq!((status, me), (200, json!({"name": "bob", "tags": ["management"]})));
    let conn = amqp_as(&server, "bob", "bob-pw").await.expect("bob logs in over AMQP");
    let mut events = conn.events_listener();
    let (mut mqtt, ack) = mqtt_as(&server, "bob-device", "bob", "bob-pw").await;
    assert_eq!(ack.code, rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success);

    // Only an administrator changes users; the configured ones are not the API's.
    let (status, _) =
        call(&server, reqwest::Method::PUT, "/api/users/eve", ("bob", "bob-pw"), Some(json!({"password": "x"}))).await;
    assert_eq!(status, 401);
    let (status, body) = admin(&server, reqwest::Method::PUT, "/api/users/admin", Some(json!({"password": "x"}))).await;
    assert_eq!(status, 400);
    assert!(body["reason"].as_str().unwrap().contains("configured"), "{body}");
    let (status, body) = admin(&server, reqwest::Method::DELETE, "/api/users/watcher", None).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = admin(&server, reqwest::Method::PUT, "/api/users/x", Some(json!({"tags": "a"}))).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")), "{body}");

    // Deleted: its connections are closed and it cannot log in again.
    assert_eq!(admin(&server, reqwest::Method::DELETE, "/api/users/bob", None).await.0, 204);
    let error = within("connection.close", async {
        loop {
            match events.next().await {
                Some(Event::Error(e)) => return e,
                Some(_) => {}
                None => panic!("events ended without an error"),
            }
        }
    })
    .await;
    assert_eq!(reply_code(&error), Some(320), "{error:?}");
    assert!(error.to_string().contains("user 'bob' was deleted"), "{error}");
    match mqtt.error().await {
        rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect { reason_code, .. }) => {
            assert_eq!(reason_code, rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::AdministrativeAction)
        }
        other => panic!("expected DISCONNECT 0x98, got {other:?}"),
    }
    assert!(amqp_as(&server, "bob", "bob-pw").await.is_err(), "AMQP login refused");
    let mut connect = connect_packet(ProtocolVersion::V5, "bob-device", true);
    connect.username = Some("bob".into());
    connect.password = Some(bytes::Bytes::from_static(b"bob-pw"));
    let (_c, ack) = RawClient::connect(server.addr(0), connect).await;
    assert_eq!(ack.code, 0x86, "MQTT login refused: bad user name or password");
    let (status, _) = call(&server, reqwest::Method::GET, "/api/whoami", ("bob", "bob-pw"), None).await;
    assert_eq!(status, 401, "HTTP login refused");
    assert_eq!(admin(&server, reqwest::Method::DELETE, "/api/users/bob", None).await.0, 404);
}

#[tokio::test]
async fn permissions_set_through_the_api_apply_and_with_their_user_survive_a_restart() {
    let server = server().await;
    let hash = "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"; // RabbitMQ's example: test12
    let body = json!({"password_hash": hash, "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []});
    assert_eq!(admin(&server, reqwest::Method::PUT, "/api/users/carol", Some(body)).await.0, 201);
    let perms = json!({"configure": "^carol\\.", "write": ".*", "read": ".*"});
    let path = "/api/permissions/%2F/carol";
    assert_eq!(admin(&server, reqwest::Method::PUT, path, Some(perms.clone())).await.0, 201);
    assert_eq!(admin(&server, reqwest::Method::PUT, path, Some(perms)).await.0, 204);
    let bad = json!({"configure": "(", "write": "", "read": ""});
    let (status, body) = admin(&server, reqwest::Method::PUT, path, Some(bad)).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = admin(
        &server,
        reqwest::Method::PUT,
        "/api/permissions/%2F/nobody",
        Some(json!({"configure": "", "write": "", "read": ""})),
    )
    .await;
    assert_eq!(status, 400, "no such user");
    let (status, _) = admin(
        &server,
        reqwest::Method::PUT,
        "/api/permissions/nowhere/carol",
        Some(json!({"configure": "", "write": "", "read": ""})),
    )
    .await;
    assert_eq!(status, 404, "no such vhost");

    let check = |server: &TestServer| {
        let server_addr = server.addr(1);
        async move {
            let uri = format!("amqp://carol:test12@{server_addr}/%2f");
            let conn =
                within("lapin", lapin::Connection::connect(&uri, Default::default())).await.expect("carol logs in");
            let ch = conn.create_channel().await.unwrap();
            ch.queue_declare("carol.q".into(), QueueDeclareOptions::default(), FieldTable::default())
                .await
                .expect("carol may configure carol.*");
            let ch = conn.create_channel().await.unwrap();
            let refused = ch.queue_declare("other".into(), QueueDeclareOptions::default(), FieldTable::default()).await;
            assert_eq!(reply_code(&refused.expect_err("refused")), Some(403));
        }
    };
    check(&server).await;
    let server = server.restart().await;
    check(&server).await;
    // The admin from the file has no permission entry now that one exists: as RabbitMQ, every
    // user then needs one for AMQP and MQTT (the API still lets it administer).
    assert!(amqp_as(&server, "admin", PASSWORD).await.is_err());
    assert_eq!(admin(&server, reqwest::Method::DELETE, "/api/permissions/%2F/carol", None).await.0, 204);
    assert!(amqp_as(&server, "admin", PASSWORD).await.is_ok(), "no permissions anywhere: open again");
    assert_eq!(admin(&server, reqwest::Method::DELETE, "/api/permissions/%2F/carol", None).await.0, 404);
}

/// RabbitMQ's `PUT|GET|DELETE /api/topic-permissions/{vhost}/{user}`: a topic permission set
/// through the API is enforced on an AMQP publish to the topic exchange at once and after a
/// restart, is listed and exported, and is gone once deleted.
#[tokio::test]
async fn topic_permissions_set_through_the_api_apply_survive_a_restart_and_are_deleted() {
    use lapin::options::ConfirmSelectOptions;
    let server = server().await;
    let hash = "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"; // RabbitMQ's example: test12
    let body = json!({"password_hash": hash, "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []});
    assert_eq!(admin(&server, reqwest::Method::PUT, "/api/users/dave", Some(body)).await.0, 201);
    let path = "/api/topic-permissions/%2F/dave";
    let topic = json!({"exchange": "amq.topic", "write": "^sensors\\.{username}\\.", "read": ".*"});
    assert_eq!(admin(&server, reqwest::Method::PUT, path, Some(topic.clone())).await.0, 201);
    assert_eq!(admin(&server, reqwest::Method::PUT, path, Some(topic)).await.0, 204);
    let (status, body) =
        admin(&server, reqwest::Method::PUT, path, Some(json!({"exchange": "amq.topic", "write": "(", "read": ""})))
            .await;
    assert_eq!(status, 400, "{body}");
    let nobody = json!({"exchange": "amq.topic", "write": "", "read": ""});
    assert_eq!(admin(&server, reqwest::Method::PUT, "/api/topic-permissions/%2F/nobody", Some(nobody)).await.0, 400);
    let watcher = call(&server, reqwest::Method::GET, "/api/topic-permissions", ("watcher", PASSWORD), None).await;
    assert_eq!(watcher.0, 200, "monitoring may read");
    assert_eq!(
        watcher.1,
        json!([{"user": "dave", "vhost": "/", "exchange": "amq.topic", "write": "^sensors\\.{username}\\.", "read": ".*"}])
    );
    let (status, _) = call(&server, reqwest::Method::DELETE, path, ("watcher", PASSWORD), None).await;
    assert_eq!(status, 401, "monitoring may not change");

    // `allowed`: whether dave's publish with `key` is confirmed (else the channel is closed 403).
    let publish = |server: &TestServer, key: &'static str| {
        let addr = server.addr(1);
        async move {
            let conn = within(
                "lapin",
                lapin::Connection::connect(&format!("amqp://dave:test12@{addr}/%2f"), Default::default()),
            )
            .await
            .expect("dave logs in");
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
            let confirm = ch
                .basic_publish(
                    "amq.topic".into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    b"x",
                    BasicProperties::default(),
                )
                .await;
            match confirm {
                Ok(c) => match within("confirm", c).await {
                    Ok(_) => true,
                    Err(e) => {
                        assert_eq!(reply_code(&e), Some(403), "{e:?}");
                        false
                    }
                },
                Err(e) => {
                    assert_eq!(reply_code(&e), Some(403), "{e:?}");
                    false
                }
            }
        }
    };
    assert!(publish(&server, "sensors.dave.t").await);
    assert!(!publish(&server, "sensors.eve.t").await, "another user's topic is refused");
    let server = server.restart().await;
    assert!(publish(&server, "sensors.dave.t").await);
    assert!(!publish(&server, "sensors.eve.t").await, "still refused after a restart");
    let (status, defs) = admin(&server, reqwest::Method::GET, "/api/definitions", None).await;
    assert_eq!(status, 200);
    assert_eq!(defs["topic_permissions"][0]["user"], "dave", "{defs}");

    assert_eq!(admin(&server, reqwest::Method::DELETE, path, None).await.0, 204);
    assert!(publish(&server, "sensors.eve.t").await, "no topic permission left: open");
    assert_eq!(admin(&server, reqwest::Method::DELETE, path, None).await.0, 404);
    assert_eq!(admin(&server, reqwest::Method::GET, path, None).await.0, 404);
}

/// The interesting parts of a definitions file: names of users, queues, exchanges, bindings.
fn names(defs: &Value, key: &str, field: &str) -> Vec<String> {
    let mut v: Vec<String> = defs[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} missing: {defs:#}"))
        .iter()
        .map(|x| x[field].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Runs rabbitmqadmin against `server` as `admin`; `None` when it is not installed.
async fn rabbitmqadmin(server: &TestServer, args: &[&str]) -> Option<std::process::Output> {
    ferry_integration_tests::management::rabbitmqadmin(server, "admin", PASSWORD, args).await
}

#[tokio::test]
async fn rabbitmqadmin_exports_what_was_defined_and_imports_it_into_another_ferry_only_adding() {
    let a = server().await;
    let conn = amqp_as(&a, "admin", PASSWORD).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(10));
    ch.queue_declare("orders".into(), durable, args).await.unwrap();
    ch.queue_declare("scratch".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let xopts = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare("events".into(), ExchangeKind::Topic, xopts, FieldTable::default()).await.unwrap();
    ch.queue_bind(
        "orders".into(),
        "events".into(),
        "order.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // An MQTT persistent session keeps a queue of its own: not a user definition.
    let mut o = v5::options(&a, "sensor-1");
    o.set_credentials("admin", PASSWORD).set_clean_start(false);
    let (mut sensor, _) = v5::Client::connect(o).await;
    sensor.subscribe("plant/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await;
    assert_eq!(
        admin(
            &a,
            reqwest::Method::PUT,
            "/api/users/dave",
            Some(json!({"password": "dave-pw", "tags": ["monitoring"]}))
        )
        .await
        .0,
        201
    );

    // Only an administrator exports (the hashes are in it).
    let (status, _) = call(&a, reqwest::Method::GET, "/api/definitions", ("watcher", PASSWORD), None).await;
    assert_eq!(status, 401);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("defs.json");
    let file_arg = file.to_str().unwrap().to_string();
    let Some(out) = rabbitmqadmin(&a, &["export", &file_arg]).await else { return };
    assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
    let defs: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(defs["rabbit_version"], "3.10.8");
    assert_eq!(defs["product_name"], "Ferry");
    assert_eq!(names(&defs, "queues", "name"), vec!["orders"], "durable user queues only: {defs:#}");
    assert_eq!(defs["queues"][0]["arguments"], json!({"x-max-length": 10}));
    assert_eq!(names(&defs, "exchanges", "name"), vec!["events"], "no amq.* or default exchange");
    assert_eq!(names(&defs, "bindings", "destination"), vec!["orders"], "{defs:#}");
    assert_eq!(defs["bindings"][0]["routing_key"], "order.#");
    assert_eq!(names(&defs, "users", "name"), vec!["admin", "dave", "watcher"]);
    let dave = defs["users"].as_array().unwrap().iter().find(|u| u["name"] == "dave").unwrap();
    assert_eq!(dave["hashing_algorithm"], "ferry_password_hashing_argon2id");
    assert!(dave["password_hash"].as_str().unwrap().starts_with("$argon2id$"));
    assert_eq!(dave["tags"], json!(["monitoring"]));
    assert_eq!(names(&defs, "vhosts", "name"), vec!["/"]);

    // Into a fresh Ferry: everything comes, and works.
    let b = server().await;
    let Some(out) = rabbitmqadmin(&b, &["import", &file_arg]).await else { return };
    assert!(
        out.status.success(),
        "import: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let conn_b = amqp_as(&b, "dave", "dave-pw").await.expect("dave logs in to the other Ferry");
    let ch_b = conn_b.create_channel().await.unwrap();
    ch_b.basic_publish(
        "events".into(),
        "order.7".into(),
        BasicPublishOptions::default(),
        b"o7",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let got = within("basic.get", async {
        loop {
            if let Some(m) = ch_b.basic_get("orders".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
                return m;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(got.delivery.data, b"o7", "the binding came too");
    let (_, exported_b) = admin(&b, reqwest::Method::GET, "/api/definitions", None).await;
    assert_eq!(exported_b["queues"], defs["queues"]);
    assert_eq!(exported_b["bindings"], defs["bindings"]);

    // Again: nothing differs, nothing to do.
    let (status, _) = admin(&b, reqwest::Method::POST, "/api/definitions", Some(defs.clone())).await;
    assert_eq!(status, 204);
    // A queue with other settings fails the whole import: the new queue beside it is not made.
    let mut changed = defs.clone();
    changed["queues"][0]["arguments"] = json!({"x-max-length": 99});
    changed["queues"].as_array_mut().unwrap().push(json!({"name": "extra", "vhost": "/", "durable": true}));
    let (status, body) = admin(&b, reqwest::Method::POST, "/api/definitions", Some(changed)).await;
    assert_eq!(status, 400, "{body}");
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains("inequivalent arg 'x-max-length' for queue 'orders'"), "{reason}");
    assert_eq!(admin(&b, reqwest::Method::GET, "/api/queues/%2F/extra", None).await.0, 404, "nothing applied");

    // rabbitmqadmin's own user and permission commands.
    let ok = |out: Option<std::process::Output>| {
        let out = out.expect("rabbitmqadmin is installed");
        assert!(
            out.status.success(),
            "{} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(rabbitmqadmin(&b, &["declare", "user", "name=erin", "password=erin-pw", "tags=monitoring"]).await);
    ok(rabbitmqadmin(&b, &["declare", "permission", "vhost=/", "user=erin", "configure=^erin", "write=.*", "read=.*"])
        .await);
    let (status, me) = call(&b, reqwest::Method::GET, "/api/whoami", ("erin", "erin-pw"), None).await;
    assert_eq!((status, me), (200, json!({"name": "erin", "tags": ["monitoring"]})));
    let (_, exported) = admin(&b, reqwest::Method::GET, "/api/definitions", None).await;
    assert_eq!(exported["permissions"][0]["configure"], "^erin", "{exported:#}");
    ok(rabbitmqadmin(&b, &["delete", "user", "name=erin"]).await);
    let (status, _) = call(&b, reqwest::Method::GET, "/api/whoami", ("erin", "erin-pw"), None).await;
    assert_eq!(status, 401);
    drop(sensor);
}

#[tokio::test]
async fn bad_definitions_are_refused_whole_with_reasons() {
    let server = server().await;
    let post = |v: Value| admin(&server, reqwest::Method::POST, "/api/definitions", Some(v));
    let reason = |(status, body): (u16, Value)| {
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"], "bad_request");
        body["reason"].as_str().unwrap().to_string()
    };
    let r = reqwest::Client::new()
        .post(url(&server, "/api/definitions"))
        .basic_auth("admin", Some(PASSWORD))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let huge = reqwest::Client::new()
        .post(url(&server, "/api/definitions"))
        .basic_auth("admin", Some(PASSWORD))
        .body(vec![b' '; 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), 413);
    assert_eq!(huge.json::<Value>().await.unwrap()["error"], "payload_too_large");
    assert!(reason(post(json!({"policies": [{"name": "p"}]})).await).contains("no policies"));
    // Shovel parameters are imported (tests/management_shovels.rs); others are not.
    assert!(reason(post(json!({"parameters": [{"component": "shovel"}]})).await)
        .contains("a runtime parameter without component or name"));
    let federation =
        json!({"parameters": [{"component": "federation-upstream", "name": "u", "vhost": "/", "value": {}}]});
    assert!(reason(post(federation).await).contains("only runtime parameter component is 'shovel'"));
    let md5 =
        json!({"users": [{"name": "u", "password_hash": "abc", "hashing_algorithm": "rabbit_password_hashing_md5"}]});
    assert!(reason(post(md5).await).contains("too weak"));
    let many: Vec<Value> = (0..101).map(|i| json!({"name": format!("u{i}"), "password": "p"})).collect();
    assert!(reason(post(json!({ "users": many })).await).contains("at most 100 per import"));
    let dangling = json!({"bindings": [{"source": "amq.direct", "vhost": "/", "destination": "nope", "destination_type": "queue", "routing_key": "k"}]});
    assert!(reason(post(dangling).await).contains("no queue 'nope'"));
    let internal = json!({"queues": [{"name": "mqtt-session.x", "vhost": "/", "durable": true}]});
    reason(post(internal).await);
    let missing_vhost = json!({"queues": [{"name": "q", "vhost": "elsewhere"}], "vhosts": []});
    assert!(reason(post(missing_vhost).await).contains("vhost 'elsewhere' does not exist"));
    // A new vhost in the same file is fine, and the queue lands in it.
    let with_vhost =
        json!({"vhosts": [{"name": "elsewhere"}], "queues": [{"name": "q", "vhost": "elsewhere", "durable": true}]});
    assert_eq!(post(with_vhost).await.0, 204);
    assert_eq!(admin(&server, reqwest::Method::GET, "/api/queues/elsewhere/q", None).await.0, 200);
    // The per-vhost forms.
    let (status, per_vhost) = admin(&server, reqwest::Method::GET, "/api/definitions/elsewhere", None).await;
    assert_eq!(status, 200);
    assert_eq!(per_vhost["queues"], json!([{"name": "q", "durable": true, "auto_delete": false, "arguments": {}}]));
    assert!(per_vhost.get("users").is_none(), "no users in a vhost's definitions");
    let into = json!({"queues": [{"name": "q2", "durable": true}]});
    let (status, _) = admin(&server, reqwest::Method::POST, "/api/definitions/elsewhere", Some(into)).await;
    assert_eq!(status, 204);
    assert_eq!(admin(&server, reqwest::Method::GET, "/api/queues/elsewhere/q2", None).await.0, 200);
}

#[tokio::test]
async fn an_export_from_a_real_rabbitmq_imports_and_its_users_log_in_with_their_passwords() {
    let Some(rabbit) = rabbit().await else { return };
    let user = format!("alice{}", std::process::id());
    rabbit.ctl(&["add_user", &user, "alice-pw"]);
    rabbit.ctl(&["set_user_tags", &user, "management"]);
    rabbit.ctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let (conn, ch) = rabbit.channel().await;
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let queue = format!("rq{}", std::process::id());
    ch.queue_declare(queue.as_str().into(), durable, FieldTable::default()).await.unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        "amq.direct".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    drop(conn);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rabbit.json");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    rabbit.ctl(&["export_definitions", file.to_str().unwrap()]);
    let defs: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(defs["rabbit_version"], "3.10.8", "{defs:#}");

    let server = server().await;
    let (status, body) = admin(&server, reqwest::Method::POST, "/api/definitions", Some(defs.clone())).await;
    assert_eq!(status, 204, "{body}");
    let conn = amqp_as(&server, &user, "alice-pw").await.expect("RabbitMQ's user logs in to Ferry");
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "amq.direct".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"hi",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let got = within("basic.get", async {
        loop {
            if let Some(m) = ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap() {
                return m;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(got.delivery.data, b"hi");
    let (status, me) = call(&server, reqwest::Method::GET, "/api/whoami", (&user, "alice-pw"), None).await;
    assert_eq!((status, me["tags"].clone()), (200, json!(["management"])));
    // Its hashes export as RabbitMQ wrote them.
    let (_, back) = admin(&server, reqwest::Method::GET, "/api/definitions", None).await;
    let theirs = defs["users"].as_array().unwrap().iter().find(|u| u["name"] == user.as_str()).unwrap();
    let ours = back["users"].as_array().unwrap().iter().find(|u| u["name"] == user.as_str()).unwrap();
    assert_eq!(ours["password_hash"], theirs["password_hash"]);
    assert_eq!(ours["hashing_algorithm"], "rabbit_password_hashing_sha256");
    // Importing it twice changes nothing.
    assert_eq!(admin(&server, reqwest::Method::POST, "/api/definitions", Some(defs)).await.0, 204);
}

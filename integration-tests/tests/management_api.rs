//! The management API's remaining endpoints (issue 17) through real clients: channels and
//! consumers of a lapin connection, users and permissions, exchanges declared and deleted,
//! bindings made and removed, messages published and got (to AMQP queues and to an MQTT
//! subscriber under the topic mapping), the aliveness test, MQTT sessions and retained messages
//! of rumqttc 5.0 clients listed and deleted, the refusals of the `monitoring` and
//! `management` tags, and RabbitMQ's own `rabbitmqadmin` (SKIPPED when not installed).

use ferry_integration_tests::management::{
    amqp, declare, encode, get_as, get_json, server, server_with, url, PASSWORD,
};
use ferry_integration_tests::mqtt::v5;
use ferry_integration_tests::{within, TestServer};
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};

async fn send(
    server: &TestServer,
    method: reqwest::Method,
    user: &str,
    path: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new().request(method, url(server, path)).basic_auth(user, Some(PASSWORD));
    if let Some(body) = body {
        request = request.json(&body);
    }
    within(path, request.send()).await.expect("request")
}

async fn put(server: &TestServer, user: &str, path: &str, body: Value) -> reqwest::Response {
    send(server, reqwest::Method::PUT, user, path, Some(body)).await
}

async fn post(server: &TestServer, user: &str, path: &str, body: Value) -> reqwest::Response {
    send(server, reqwest::Method::POST, user, path, Some(body)).await
}

async fn delete(server: &TestServer, user: &str, path: &str) -> reqwest::Response {
    send(server, reqwest::Method::DELETE, user, path, None).await
}

/// POSTs as admin, expecting 200 and JSON.
async fn post_json(server: &TestServer, path: &str, body: Value) -> Value {
    let r = post(server, "admin", path, body).await;
    assert_eq!(r.status(), 200, "POST {path}");
    r.json().await.expect("JSON")
}

async fn reason(r: reqwest::Response) -> String {
    r.json::<Value>().await.expect("JSON")["reason"].as_str().unwrap_or_default().to_string()
}

fn publish_body(key: &str, payload: &str) -> Value {
    json!({"properties": {}, "routing_key": key, "payload": payload, "payload_encoding": "string"})
}

fn get_body(count: u32, ackmode: &str) -> Value {
    json!({"count": count, "ackmode": ackmode, "encoding": "auto"})
}

fn payloads(list: &Value) -> Vec<&str> {
    list.as_array().expect("a list").iter().map(|m| m["payload"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn an_amqp_consumer_is_listed_with_its_channel() {
    let server = server().await;
    let conn = amqp(&server, "billing").await;
    let ch = within("channel", conn.create_channel()).await.unwrap();
    declare(&ch, "orders").await;
    within("qos", ch.basic_qos(7, BasicQosOptions::default())).await.unwrap();
    let _consumer = within(
        "consume",
        ch.basic_consume("orders".into(), "c1".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
    .unwrap();

    let channels = get_json(&server, "/api/channels").await;
    let list = channels.as_array().unwrap();
    assert_eq!(list.len(), 1, "{channels:#}");
    let c = &list[0];
    let conn_name = c["connection_details"]["name"].as_str().unwrap().to_string();
    assert_eq!(c["name"], format!("{conn_name} ({})", c["number"]));
    assert_eq!((c["user"].as_str(), c["vhost"].as_str()), (Some("admin"), Some("/")));
    assert_eq!((c["prefetch_count"].as_u64(), c["consumer_count"].as_u64()), (Some(7), Some(1)), "{c:#}");
    assert_eq!((c["confirm"].as_bool(), c["transactional"].as_bool()), (Some(false), Some(false)));
    let name = c["name"].as_str().unwrap().to_string();
    assert_eq!(get_json(&server, &format!("/api/channels/{}", encode(&name))).await["number"], c["number"]);
    let of_conn = get_json(&server, &format!("/api/connections/{}/channels", encode(&conn_name))).await;
    assert_eq!(of_conn.as_array().unwrap().len(), 1);
    assert_eq!(get_json(&server, "/api/vhosts/%2F/channels").await.as_array().unwrap().len(), 1);
    assert_eq!(get_as(&server, "admin", "/api/channels/nope%20(1)").await.status(), 404);

    let consumers = get_json(&server, "/api/consumers").await;
    let list = consumers.as_array().unwrap();
    assert_eq!(list.len(), 1, "{consumers:#}");
    let k = &list[0];
    assert_eq!(k["consumer_tag"], "c1");
    assert_eq!(k["queue"], json!({"name": "orders", "vhost": "/"}));
    assert_eq!(k["channel_details"]["connection_name"], conn_name.as_str());
    assert_eq!(k["channel_details"]["number"], c["number"]);
    assert_eq!((k["ack_required"].as_bool(), k["prefetch_count"].as_u64()), (Some(true), Some(7)));
    assert_eq!(get_json(&server, "/api/consumers/%2F").await.as_array().unwrap().len(), 1);
    // A management user sees the consumers and channels of its own connections only.
    let own: Value = get_as(&server, "owner", "/api/consumers").await.json().await.unwrap();
    assert_eq!(own, json!([]));
    let own: Value = get_as(&server, "owner", "/api/channels").await.json().await.unwrap();
    assert_eq!(own, json!([]));
    // A monitoring user sees them all.
    let all: Value = get_as(&server, "watcher", "/api/consumers").await.json().await.unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn exchanges_are_declared_and_deleted_as_rabbitmq_does() {
    let server = server().await;
    let body = json!({"type": "topic", "durable": true, "auto_delete": false, "internal": false, "arguments": {}});
    let r = put(&server, "watcher", "/api/exchanges/%2F/events", body.clone()).await;
    assert_eq!(r.status(), 401);
    assert_eq!(reason(r).await, "Not administrator user");
    assert!(server.server.broker().vhost("/").unwrap().exchange("events").is_none());
    assert_eq!(put(&server, "admin", "/api/exchanges/%2F/events", body.clone()).await.status(), 201);
    assert_eq!(put(&server, "admin", "/api/exchanges/%2F/events", body).await.status(), 204, "the same again");
    let x = get_json(&server, "/api/exchanges/%2F/events").await;
    assert_eq!((x["type"].as_str(), x["durable"].as_bool()), (Some("topic"), Some(true)));
    let other = put(&server, "admin", "/api/exchanges/%2F/events", json!({"type": "direct"})).await;
    assert_eq!(other.status(), 400);
    assert_eq!(
        reason(other).await,
        "inequivalent arg 'type' for exchange 'events' in vhost '/': received 'direct' but current is 'topic'"
    );
    let untyped = put(&server, "admin", "/api/exchanges/%2F/x", json!({"durable": true})).await;
    assert_eq!(untyped.status(), 400);
    let bad_type = put(&server, "admin", "/api/exchanges/%2F/x", json!({"type": "nonsense"})).await;
    assert_eq!(bad_type.status(), 400);
    let reserved = put(&server, "admin", "/api/exchanges/%2F/amq.mine", json!({"type": "direct"})).await;
    assert_eq!(reserved.status(), 401);
    assert!(reason(reserved).await.contains("reserved prefix 'amq.*'"));
    assert_eq!(put(&server, "admin", "/api/exchanges/%2F/amq.default", json!({"type": "direct"})).await.status(), 401);
    assert_eq!(delete(&server, "admin", "/api/exchanges/%2F/amq.topic").await.status(), 401);
    assert_eq!(delete(&server, "admin", "/api/exchanges/%2F/amq.default").await.status(), 401);

    // In use: if-unused refuses; a monitoring user may not delete it at all.
    assert_eq!(put(&server, "admin", "/api/queues/%2F/q", json!({})).await.status(), 201);
    let bind = post(&server, "admin", "/api/bindings/%2F/e/events/q/q", json!({"routing_key": "a.#"})).await;
    assert_eq!(bind.status(), 201);
    let r = delete(&server, "admin", "/api/exchanges/%2F/events?if-unused=true").await;
    assert_eq!(r.status(), 400);
    assert_eq!(reason(r).await, "exchange 'events' in vhost '/' in use");
    assert_eq!(delete(&server, "watcher", "/api/exchanges/%2F/events").await.status(), 401);
    assert_eq!(delete(&server, "admin", "/api/exchanges/%2F/events").await.status(), 204);
    assert!(server.server.broker().vhost("/").unwrap().exchange("events").is_none());
    assert_eq!(delete(&server, "admin", "/api/exchanges/%2F/events").await.status(), 404);
    assert_eq!(get_json(&server, "/api/queues/%2F/q/bindings").await.as_array().unwrap().len(), 1, "default only");
}

#[tokio::test]
async fn bindings_are_made_listed_and_removed() {
    let server = server().await;
    assert_eq!(put(&server, "admin", "/api/exchanges/%2F/ex", json!({"type": "direct"})).await.status(), 201);
    assert_eq!(put(&server, "admin", "/api/queues/%2F/q", json!({"durable": false})).await.status(), 201);
    let r = post(&server, "admin", "/api/bindings/%2F/e/ex/q/q", json!({"routing_key": "k", "arguments": {}})).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["location"], "k");
    let of_queue = get_json(&server, "/api/queues/%2F/q/bindings").await;
    let sources: Vec<&str> = of_queue.as_array().unwrap().iter().map(|b| b["source"].as_str().unwrap()).collect();
    assert_eq!(sources, ["", "ex"], "{of_queue:#}");
    let from = get_json(&server, "/api/exchanges/%2F/ex/bindings/source").await;
    assert_eq!(from[0]["destination"], "q");
    assert_eq!(from[0]["properties_key"], "k");
    assert_eq!(get_json(&server, "/api/exchanges/%2F/ex/bindings/destination").await, json!([]));
    assert_eq!(get_json(&server, "/api/bindings/%2F/e/ex/q/q").await.as_array().unwrap().len(), 1);
    assert_eq!(get_json(&server, "/api/bindings/%2F/e/ex/q/q/k").await["routing_key"], "k");

    // The binding routes an API publish.
    let routed = post_json(&server, "/api/exchanges/%2F/ex/publish", publish_body("k", "one")).await;
    assert_eq!(routed, json!({"routed": true}));
    // A monitoring user cannot unbind; the administrator can, and then nothing routes.
    assert_eq!(delete(&server, "watcher", "/api/bindings/%2F/e/ex/q/q/k").await.status(), 401);
    assert_eq!(delete(&server, "admin", "/api/bindings/%2F/e/ex/q/q/k").await.status(), 204);
    assert_eq!(get_as(&server, "admin", "/api/bindings/%2F/e/ex/q/q/k").await.status(), 404);
    assert_eq!(delete(&server, "admin", "/api/bindings/%2F/e/ex/q/q/k").await.status(), 404);
    let unrouted = post_json(&server, "/api/exchanges/%2F/ex/publish", publish_body("k", "two")).await;
    assert_eq!(unrouted, json!({"routed": false}));
    assert_eq!(
        post(&server, "admin", "/api/bindings/%2F/e/nope/q/q", json!({"routing_key": "k"})).await.status(),
        404,
        "no such exchange"
    );
}

#[tokio::test]
async fn messages_are_published_and_got_with_each_ackmode() {
    let server = server().await;
    assert_eq!(put(&server, "admin", "/api/queues/%2F/jobs", json!({})).await.status(), 201);
    for (i, p) in ["m1", "m2", "m3", "m4"].iter().enumerate() {
        let mut body = publish_body("jobs", p);
        if i == 0 {
            body["properties"] = json!({"delivery_mode": 2, "headers": {"attempt": 1}, "content_type": "text/plain"});
        }
        let routed = post_json(&server, "/api/exchanges/%2F/amq.default/publish", body).await;
        assert_eq!(routed, json!({"routed": true}));
    }
    let b64 = json!({"routing_key": "jobs", "payload": "AP8=", "payload_encoding": "base64", "properties": {}});
    assert_eq!(post_json(&server, "/api/exchanges/%2F/amq.default/publish", b64).await, json!({"routed": true}));
    let nowhere = post_json(&server, "/api/exchanges/%2F/amq.default/publish", publish_body("none", "x")).await;
    assert_eq!(nowhere, json!({"routed": false}));

    // Requeued: the same messages come back, in order, redelivered.
    let first = post_json(&server, "/api/queues/%2F/jobs/get", get_body(2, "ack_requeue_true")).await;
    assert_eq!(payloads(&first), ["m1", "m2"]);
    assert_eq!(first[0]["redelivered"], false);
    assert_eq!(
        first[0]["properties"],
        json!({"delivery_mode": 2, "headers": {"attempt": 1}, "content_type": "text/plain"})
    );
    assert_eq!((first[0]["exchange"].as_str(), first[0]["routing_key"].as_str()), (Some(""), Some("jobs")));
    assert_eq!((first[0]["message_count"].as_u64(), first[1]["message_count"].as_u64()), (Some(4), Some(3)));
    let again = post_json(&server, "/api/queues/%2F/jobs/get", get_body(3, "reject_requeue_true")).await;
    assert_eq!(payloads(&again), ["m1", "m2", "m3"]);
    let redelivered: Vec<bool> =
        again.as_array().unwrap().iter().map(|m| m["redelivered"].as_bool().unwrap()).collect();
    assert_eq!(redelivered, [true, true, false]);
    // Acknowledged: gone.
    let acked = post_json(&server, "/api/queues/%2F/jobs/get", get_body(1, "ack_requeue_false")).await;
    assert_eq!(payloads(&acked), ["m1"]);
    assert_eq!(get_json(&server, "/api/queues/%2F/jobs").await["messages"], 4);
    // Truncated and binary payloads.
    let cut = post_json(
        &server,
        "/api/queues/%2F/jobs/get",
        json!({"count": "3", "ackmode": "reject_requeue_false", "encoding": "auto", "truncate": 1}),
    )
    .await;
    assert_eq!(payloads(&cut), ["m", "m", "m"]);
    assert_eq!(cut[0]["payload_bytes"], 2);
    let binary = post_json(&server, "/api/queues/%2F/jobs/get", get_body(1, "ack_requeue_false")).await;
    assert_eq!((binary[0]["payload"].as_str(), binary[0]["payload_encoding"].as_str()), (Some("AP8="), Some("base64")));
    let forced = json!({"count": 1, "ackmode": "ack_requeue_true", "encoding": "base64"});
    assert_eq!(post_json(&server, "/api/queues/%2F/jobs/get", forced).await, json!([]), "empty by now");
    assert_eq!(get_json(&server, "/api/queues/%2F/jobs").await["messages"], 0);
    assert_eq!(post_json(&server, "/api/queues/%2F/jobs/get", get_body(5, "ack_requeue_true")).await, json!([]));

    // Bad requests and refusals.
    let too_many = post(&server, "admin", "/api/queues/%2F/jobs/get", get_body(1001, "ack_requeue_true")).await;
    assert_eq!(too_many.status(), 400);
    assert_eq!(post(&server, "admin", "/api/queues/%2F/jobs/get", get_body(1, "keep")).await.status(), 400);
    assert_eq!(post(&server, "admin", "/api/queues/%2F/none/get", get_body(1, "ack_requeue_true")).await.status(), 404);
    let bad = json!({"routing_key": "jobs", "payload": "%%", "payload_encoding": "base64"});
    assert_eq!(post(&server, "admin", "/api/exchanges/%2F/amq.default/publish", bad).await.status(), 400);
    let wrong_property = json!({"routing_key": "jobs", "payload": "x", "properties": {"delivery_mode": 7}});
    assert_eq!(post(&server, "admin", "/api/exchanges/%2F/amq.default/publish", wrong_property).await.status(), 400);
    let huge = json!({"routing_key": "jobs", "payload": "x".repeat(2 << 20)});
    let r = post(&server, "admin", "/api/exchanges/%2F/amq.default/publish", huge).await;
    assert_eq!(r.status(), 413, "past the 1 MiB body limit");
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "bad_request");
    let someone_else = json!({"routing_key": "jobs", "payload": "x", "properties": {"user_id": "bob"}});
    assert_eq!(post(&server, "admin", "/api/exchanges/%2F/amq.default/publish", someone_else).await.status(), 400);
    let r = post(&server, "watcher", "/api/exchanges/%2F/amq.default/publish", publish_body("jobs", "x")).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        post(&server, "watcher", "/api/queues/%2F/jobs/get", get_body(1, "ack_requeue_true")).await.status(),
        401
    );
    assert_eq!(get_json(&server, "/api/queues/%2F/jobs").await["messages"], 0, "the refused publish did nothing");
}

#[tokio::test]
async fn an_api_publish_reaches_an_mqtt_subscriber_under_the_topic_mapping() {
    let server = server().await;
    let mut options = v5::options(&server, "sensor-sub");
    options.set_credentials("admin", PASSWORD);
    let (mut sub, _) = v5::Client::connect(options).await;
    sub.subscribe("plant/+/temp", QoS::AtLeastOnce).await;
    let body = json!({"routing_key": "plant.7.temp", "payload": "21.5", "properties": {"delivery_mode": 2}});
    assert_eq!(post_json(&server, "/api/exchanges/%2F/amq.topic/publish", body).await, json!({"routed": true}));
    let p = sub.publish_received().await;
    assert_eq!((&p.topic[..], &p.payload[..]), (&b"plant/7/temp"[..], &b"21.5"[..]));
    assert_eq!(p.qos, QoS::AtLeastOnce);
}

#[tokio::test]
async fn the_aliveness_test_declares_publishes_and_gets() {
    let server = server().await;
    for _ in 0..2 {
        assert_eq!(get_json(&server, "/api/aliveness-test/%2F").await, json!({"status": "ok"}));
    }
    let q = get_json(&server, "/api/queues/%2F/aliveness-test").await;
    assert_eq!(q["messages"], 0, "the test message was taken back");
    let r = get_as(&server, "watcher", "/api/aliveness-test/%2F").await;
    assert_eq!(r.status(), 200, "a health check, open to monitoring");
    assert_eq!(get_as(&server, "admin", "/api/aliveness-test/nope").await.status(), 404);
}

#[tokio::test]
async fn users_and_permissions_are_listed_and_hashes_shown_to_administrators_only() {
    let server = server().await;
    let users = get_json(&server, "/api/users").await;
    let names: Vec<&str> = users.as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["admin", "owner", "plain", "watcher"]);
    assert_eq!(users[0]["tags"], json!(["administrator"]));
    assert!(users[0]["password_hash"].as_str().unwrap().starts_with("$argon2id$"), "{users:#}");
    assert_eq!(users[0]["hashing_algorithm"], "ferry_password_hashing_argon2id");
    let seen: Value = get_as(&server, "watcher", "/api/users/admin").await.json().await.unwrap();
    assert_eq!(seen["name"], "admin");
    assert!(seen.get("password_hash").is_none() && seen.get("hashing_algorithm").is_none(), "{seen:#}");
    let r = get_as(&server, "owner", "/api/users").await;
    assert_eq!(r.status(), 401);
    assert_eq!(get_as(&server, "owner", "/api/permissions").await.status(), 401);
    assert_eq!(get_as(&server, "admin", "/api/users/nobody").await.status(), 404);
    // No [[permissions]]: everyone may do everything, shown as .* on every vhost.
    let perms = get_json(&server, "/api/users/owner/permissions").await;
    assert_eq!(perms, json!([{"user": "owner", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}]));
    assert_eq!(get_json(&server, "/api/permissions").await.as_array().unwrap().len(), 4);
    assert_eq!(get_json(&server, "/api/vhosts/%2F/permissions").await.as_array().unwrap().len(), 4);
}

/// With `[[permissions]]`, a `management` user may do over HTTP what its permissions let it do
/// over AMQP, and no more.
#[tokio::test]
async fn a_management_user_writes_within_its_permissions() {
    let perm = |user: &str, c: &str, w: &str, r: &str| {
        format!("[[permissions]]\nuser = \"{user}\"\nconfigure = \"{c}\"\nwrite = \"{w}\"\nread = \"{r}\"\n")
    };
    let server = server_with(&format!(
        "{}{}",
        perm("admin", ".*", ".*", ".*"),
        perm("owner", "^own\\\\.", "^own\\\\.", "^own\\\\.")
    ))
    .await;
    assert_eq!(put(&server, "owner", "/api/exchanges/%2F/own.x", json!({"type": "fanout"})).await.status(), 201);
    let r = put(&server, "owner", "/api/exchanges/%2F/other", json!({"type": "fanout"})).await;
    assert_eq!(r.status(), 401);
    assert_eq!(reason(r).await, "configure access to exchange 'other' in vhost '/' refused for user 'owner'");
    assert_eq!(put(&server, "admin", "/api/queues/%2F/own.q", json!({})).await.status(), 201);
    assert_eq!(post(&server, "owner", "/api/bindings/%2F/e/own.x/q/own.q", json!({})).await.status(), 201);
    let published = post(&server, "owner", "/api/exchanges/%2F/own.x/publish", publish_body("", "hi")).await;
    assert_eq!(published.json::<Value>().await.unwrap(), json!({"routed": true}));
    let r = post(&server, "owner", "/api/exchanges/%2F/amq.default/publish", publish_body("own.q", "x")).await;
    assert_eq!(r.status(), 401, "write on amq.default is not granted");
    let got = post(&server, "owner", "/api/queues/%2F/own.q/get", get_body(1, "ack_requeue_false")).await;
    assert_eq!(payloads(&got.json::<Value>().await.unwrap()), ["hi"]);
    assert_eq!(delete(&server, "owner", "/api/exchanges/%2F/own.x").await.status(), 204);
    let perms = get_json(&server, "/api/users/owner/permissions").await;
    assert_eq!(
        perms,
        json!([{"user": "owner", "vhost": "/", "configure": "^own\\.", "write": "^own\\.", "read": "^own\\."}])
    );
}

#[tokio::test]
async fn mqtt_sessions_and_retained_messages_are_listed_and_deleted() {
    let server = server().await;
    let mut options = v5::options(&server, "keeper");
    options.set_credentials("admin", PASSWORD);
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(3600));
    let (mut keeper, _) = v5::Client::connect(options.clone()).await;
    keeper.subscribe("plant/+/temp", QoS::AtLeastOnce).await;
    let mut publisher_options = v5::options(&server, "publisher");
    publisher_options.set_credentials("admin", PASSWORD);
    let (mut publisher, _) = v5::Client::connect(publisher_options).await;
    publisher.publish("plant/7/temp", QoS::AtLeastOnce, true, b"21").await;
    publisher.publish("plant/8/temp", QoS::AtMostOnce, true, b"19.5").await;
    keeper.publish_received().await;
    keeper.publish_received().await;

    let sessions = get_json(&server, "/api/mqtt/sessions").await;
    let keeper_entry = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["client_id"] == "keeper")
        .unwrap_or_else(|| panic!("{sessions:#}"));
    assert_eq!(keeper_entry["user"], "admin");
    assert_eq!(keeper_entry["vhost"], "/");
    assert_eq!((keeper_entry["connected"].as_bool(), keeper_entry["clean_start"].as_bool()), (Some(true), Some(false)));
    assert_eq!(keeper_entry["expiry_interval"], 3600);
    assert_eq!(
        keeper_entry["subscriptions"],
        json!([{"filter": "plant/+/temp", "qos": 1, "no_local": false, "retain_as_published": false}])
    );
    let publisher_entry = sessions.as_array().unwrap().iter().find(|s| s["client_id"] == "publisher").unwrap();
    assert_eq!(
        (publisher_entry["clean_start"].as_bool(), publisher_entry["subscriptions"].clone()),
        (Some(true), json!([]))
    );
    let one = get_json(&server, "/api/mqtt/sessions/%2F?name=keep").await;
    assert_eq!(one.as_array().unwrap().len(), 1);
    // A management user sees only its own connected sessions (these are admin's).
    let own: Value = get_as(&server, "owner", "/api/mqtt/sessions").await.json().await.unwrap();
    assert_eq!(own, json!([]));
    let watched: Value = get_as(&server, "watcher", "/api/mqtt/sessions").await.json().await.unwrap();
    assert_eq!(watched.as_array().unwrap().len(), 2, "monitoring sees them all");

    let retained = get_json(&server, "/api/mqtt/retained?sort=topic&name=plant").await;
    assert_eq!(
        retained,
        json!([
            {"topic": "plant/7/temp", "vhost": "/", "qos": 1, "payload_bytes": 2},
            {"topic": "plant/8/temp", "vhost": "/", "qos": 0, "payload_bytes": 4},
        ])
    );
    let paged = get_json(&server, "/api/mqtt/retained/%2F?name=plant&page=2&page_size=1").await;
    assert_eq!(paged["items"][0]["topic"], "plant/8/temp");
    assert_eq!(get_json(&server, "/api/mqtt/retained?name=7").await.as_array().unwrap().len(), 1);

    // Deleting a retained message: not for monitoring; then a new subscriber gets only the other.
    let path = format!("/api/mqtt/retained/%2F/{}", encode("plant/7/temp"));
    assert_eq!(delete(&server, "watcher", &path).await.status(), 401);
    assert_eq!(delete(&server, "admin", &path).await.status(), 204);
    assert_eq!(delete(&server, "admin", &path).await.status(), 404);
    let mut late_options = v5::options(&server, "late");
    late_options.set_credentials("admin", PASSWORD);
    let (mut late, _) = v5::Client::connect(late_options).await;
    late.subscribe("plant/+/temp", QoS::AtMostOnce).await;
    let p = late.publish_received().await;
    assert_eq!(&p.topic[..], b"plant/8/temp");
    late.no_publish().await;
    assert!(server.server.broker().vhost("/").unwrap().retained().get("plant.7.temp").is_none());

    // Deleting the connected session: its client is told (0x98), and the session is gone.
    assert_eq!(delete(&server, "watcher", "/api/mqtt/sessions/%2F/keeper").await.status(), 401);
    let r = send(&server, reqwest::Method::DELETE, "admin", "/api/mqtt/sessions/%2F/keeper", None).await;
    assert_eq!(r.status(), 204);
    match keeper.error().await {
        rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect { reason_code, .. }) => {
            assert_eq!(reason_code, DisconnectReasonCode::AdministrativeAction);
        }
        other => panic!("expected DISCONNECT 0x98, got {other:?}"),
    }
    let sessions = get_json(&server, "/api/mqtt/sessions").await;
    assert!(sessions.as_array().unwrap().iter().all(|s| s["client_id"] != "keeper"), "{sessions:#}");
    assert!(server.server.broker().vhost("/").unwrap().queue("mqtt-session.keeper").is_none());
    assert_eq!(delete(&server, "admin", "/api/mqtt/sessions/%2F/keeper").await.status(), 404);
    // Its subscription no longer receives: back without a session, nothing comes.
    let (mut back, ack) = v5::Client::connect(options).await;
    assert!(!ack.session_present);
    publisher.publish("plant/7/temp", QoS::AtLeastOnce, false, b"22").await;
    back.no_publish().await;
    // The late subscriber (clean) still gets it: the publish did route.
    assert_eq!(&late.publish_received().await.payload[..], b"22");
}

#[tokio::test]
async fn a_session_kept_while_its_client_is_away_is_listed_and_deleted() {
    let server = server().await;
    let mut options = v5::options(&server, "away");
    options.set_credentials("admin", PASSWORD);
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(600));
    let (mut away, _) = v5::Client::connect(options.clone()).await;
    away.subscribe("alerts/#", QoS::ExactlyOnce).await;
    away.disconnect().await;
    let body = json!({"routing_key": "alerts.fire", "payload": "!", "properties": {"delivery_mode": 2}});
    // The session is stored before the connection leaves the registry: wait for that.
    within("the client gone", async {
        let mut count = server.server.broker().connections().subscribe();
        while *count.borrow_and_update() > 0 {
            count.changed().await.unwrap();
        }
    })
    .await;
    assert_eq!(post_json(&server, "/api/exchanges/%2F/amq.topic/publish", body).await, json!({"routed": true}));
    let sessions = get_json(&server, "/api/mqtt/sessions").await;
    let s = sessions.as_array().unwrap().iter().find(|s| s["client_id"] == "away").unwrap();
    assert_eq!(
        (s["user"].clone(), s["messages"].as_u64(), s["expiry_interval"].as_u64()),
        (Value::Null, Some(1), Some(600))
    );
    assert_eq!(s["subscriptions"][0]["qos"], 2);
    assert!(s["disconnected_at"].as_u64().unwrap() > 0);
    assert_eq!(delete(&server, "admin", "/api/mqtt/sessions/%2F/away").await.status(), 204);
    assert!(server.server.broker().vhost("/").unwrap().queue("mqtt-session.away").is_none());
    let (mut back, ack) = v5::Client::connect(options).await;
    assert!(!ack.session_present, "the session is gone");
    back.no_publish().await;
}

/// RabbitMQ's own client, as shipped in Debian's rabbitmq-server package.
fn rabbitmqadmin(server: &TestServer, args: &[&str]) -> Option<(bool, String)> {
    let addr = server.server.http_addrs()[0];
    let port = addr.port().to_string();
    let mut all = vec!["-H", "127.0.0.1", "-P", port.as_str(), "-u", "admin", "-p", PASSWORD];
    all.extend_from_slice(args);
    let out = std::process::Command::new("rabbitmqadmin").args(&all).output().ok()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Some((out.status.success(), text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmqadmin_declares_publishes_gets_and_lists() {
    let server = server().await;
    let run = |args: &'static [&'static str]| {
        let server = &server;
        async move { tokio::task::block_in_place(|| rabbitmqadmin(server, args)) }
    };
    let Some((ok, out)) = run(&["declare", "exchange", "name=ra.x", "type=fanout"]).await else {
        eprintln!("SKIPPED: rabbitmqadmin is not installed");
        return;
    };
    assert!(ok, "declare exchange: {out}");
    assert!(server.server.broker().vhost("/").unwrap().exchange("ra.x").is_some());
    let (ok, out) = run(&["declare", "queue", "name=ra.q", "durable=false"]).await.unwrap();
    assert!(ok, "declare queue: {out}");
    let (ok, out) = run(&["declare", "binding", "source=ra.x", "destination=ra.q"]).await.unwrap();
    assert!(ok, "declare binding: {out}");
    let (ok, out) =
        run(&["publish", "exchange=ra.x", "routing_key=any", "payload=hello from rabbitmqadmin"]).await.unwrap();
    assert!(ok && out.contains("Message published") && !out.contains("NOT routed"), "publish: {out}");
    let (ok, out) = run(&["publish", "routing_key=ra.q", "payload=via the default exchange"]).await.unwrap();
    assert!(ok && !out.contains("NOT routed"), "publish to amq.default: {out}");
    let (ok, out) = run(&["get", "queue=ra.q", "count=2", "ackmode=ack_requeue_false"]).await.unwrap();
    assert!(ok && out.contains("hello from rabbitmqadmin") && out.contains("via the default exchange"), "get: {out}");
    assert_eq!(get_json(&server, "/api/queues/%2F/ra.q").await["messages"], 0);

    let conn = amqp(&server, "ra-conn").await;
    let ch = within("channel", conn.create_channel()).await.unwrap();
    let _c = within(
        "consume",
        ch.basic_consume("ra.q".into(), "ra-tag".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
    .unwrap();
    let (ok, out) = run(&["list", "channels"]).await.unwrap();
    assert!(ok && out.contains("(1)") && out.contains("admin"), "list channels: {out}");
    let (ok, out) = run(&["list", "consumers"]).await.unwrap();
    assert!(ok && out.contains("ra-tag") && out.contains("consumer_tag"), "list consumers: {out}");
    let (ok, out) = run(&["list", "users"]).await.unwrap();
    assert!(ok && out.contains("watcher") && out.contains("monitoring"), "list users: {out}");
    let (ok, out) = run(&["delete", "exchange", "name=ra.x"]).await.unwrap();
    assert!(ok, "delete exchange: {out}");
    assert!(server.server.broker().vhost("/").unwrap().exchange("ra.x").is_none());
}

//! Dynamic shovels through RabbitMQ's runtime-parameter API (`PUT|GET|DELETE
//! /api/parameters/shovel/{vhost}/{name}`, `DELETE /api/shovels/vhost/{vhost}/{name}/restart`,
//! `parameters` in `/api/definitions`): made with reqwest and with RabbitMQ's own
//! `rabbitmqadmin`, moving messages from a local queue into a real RabbitMQ (started once for
//! this test binary) where lapin consumes them; kept across a restart of Ferry, changed,
//! deleted, refused when bad, hidden from who may not see passwords, and carried to another
//! Ferry by a definitions export and import. SKIPPED (printed) when RabbitMQ is not installed.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ferry_bridge::LinkState;
use ferry_core::auth::PasswordHash;
use ferry_integration_tests::management::poll_until;
use ferry_integration_tests::rabbitmq::{rabbit, Rabbit};
use ferry_integration_tests::{within, TestServer};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::{json, Value};

const PASSWORD: &str = "s3cret";
/// The password of RabbitMQ's `guest`, as it appears in the shovels' URIs.
const RABBIT_PASSWORD: &str = "guest";

/// A name no other test in this binary uses (they share one RabbitMQ).
fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Users `admin` (administrator), `watcher` (monitoring) and `maker` (policymaker on `/`);
/// AMQP (0) and HTTP listeners; `extra` after.
fn config(extra: &str) -> String {
    let hash = PasswordHash::argon2id(PASSWORD.as_bytes());
    format!(
        "[[users]]\nname = \"admin\"\npassword_hash = \"{hash}\"\ntags = [\"administrator\"]\n\
         [[users]]\nname = \"watcher\"\npassword_hash = \"{hash}\"\ntags = [\"monitoring\"]\n\
         [[users]]\nname = \"maker\"\npassword_hash = \"{hash}\"\ntags = [\"policymaker\"]\n\
         [[permissions]]\nuser = \"admin\"\nvhost = \"/\"\nconfigure = \".*\"\nwrite = \".*\"\nread = \".*\"\n\
         [[permissions]]\nuser = \"maker\"\nvhost = \"/\"\nconfigure = \".*\"\nwrite = \".*\"\nread = \".*\"\n\
         [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"http\"\nbind = \"127.0.0.1:0\"\n{extra}"
    )
}

async fn ferry(extra: &str) -> TestServer {
    let frontends = ferry_server::frontends::builtin(&Default::default());
    TestServer::start(&config(extra), &frontends).await
}

async fn send(
    server: &TestServer,
    user: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("http://{}{path}", server.server.http_addrs()[0]);
    let mut r = reqwest::Client::new().request(method, url);
    if let Some(u) = user {
        r = r.basic_auth(u, Some(PASSWORD));
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = within(path, r.send()).await.expect("request");
    let status = r.status().as_u16();
    let bytes = within("body", r.bytes()).await.expect("body");
    (status, if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("JSON") })
}

async fn get(server: &TestServer, user: &str, path: &str) -> (u16, Value) {
    send(server, Some(user), reqwest::Method::GET, path, None).await
}

async fn put(server: &TestServer, name: &str, value: Value) -> (u16, Value) {
    let path = format!("/api/parameters/shovel/%2F/{name}");
    send(server, Some("admin"), reqwest::Method::PUT, &path, Some(json!({"value": value}))).await
}

/// RabbitMQ's URI of `rabbit`, with guest's password in it as RabbitMQ users write it.
fn rabbit_uri(rabbit: &Rabbit) -> String {
    format!("amqp://guest:{RABBIT_PASSWORD}@127.0.0.1:{}/%2f", rabbit.port)
}

/// A shovel from local queue `src` to RabbitMQ queue `dest`, on-confirm.
fn to_rabbit(rabbit: &Rabbit, src: &str, dest: &str) -> Value {
    json!({"src-protocol": "amqp091", "src-uri": "amqp://", "src-queue": src,
           "dest-protocol": "amqp091", "dest-uri": rabbit_uri(rabbit), "dest-queue": dest,
           "ack-mode": "on-confirm", "src-prefetch-count": 10, "dest-add-forward-headers": true,
           "reconnect-delay": 1, "src-delete-after": "never"})
}

async fn lapin(uri: &str) -> (Connection, Channel) {
    let conn =
        within("lapin connects", Connection::connect(uri, ConnectionProperties::default())).await.expect("connect");
    let ch = within("channel", conn.create_channel()).await.expect("channel");
    (conn, ch)
}

async fn ferry_channel(server: &TestServer) -> (Connection, Channel) {
    let (conn, ch) = lapin(&format!("amqp://admin:{PASSWORD}@{}/%2f", server.addr(0))).await;
    within("confirm.select", ch.confirm_select(ConfirmSelectOptions::default())).await.expect("confirms");
    (conn, ch)
}

async fn declare(ch: &Channel, q: &str) -> u32 {
    let opts = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    within("queue.declare", ch.queue_declare(q.into(), opts, FieldTable::default()))
        .await
        .expect("declare")
        .message_count()
}

/// Publishes persistent messages `prefix-0`… to queue `q`, each confirmed.
async fn publish(ch: &Channel, q: &str, prefix: &str, n: usize) {
    for i in 0..n {
        let props = BasicProperties::default().with_delivery_mode(2);
        let body = format!("{prefix}-{i}");
        let confirm = within(
            "publish",
            ch.basic_publish("".into(), q.into(), BasicPublishOptions::default(), body.as_bytes(), props),
        )
        .await
        .expect("publish");
        within("confirm", confirm).await.expect("confirmed");
    }
}

async fn consume(ch: &Channel, q: &str) -> Consumer {
    let opts = BasicConsumeOptions::default();
    within("basic.consume", ch.basic_consume(q.into(), "".into(), opts, FieldTable::default())).await.expect("consume")
}

/// The next `n` bodies, acked.
async fn receive(consumer: &mut Consumer, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let d = within("a shovelled message", consumer.next()).await.expect("open").expect("delivery");
        within("ack", d.acker.ack(BasicAckOptions::default())).await.expect("ack");
        out.push(String::from_utf8_lossy(&d.data).into_owned());
    }
    out
}

fn bodies(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

async fn up(server: &TestServer, name: &str) {
    let s = within(name, server.server.bridges().wait_for(name, |s| s.state == LinkState::Up)).await;
    assert!(s.is_some(), "shovel {name} not running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_shovel_moves_messages_to_rabbitmq_survives_a_restart_changes_and_is_deleted() {
    let Some(rabbit) = rabbit().await else { return };
    let (src, dest, dest2) = (unique("src"), unique("dest"), unique("dest2"));
    let (_rc, rch) = rabbit.channel().await;
    declare(&rch, &dest).await;
    declare(&rch, &dest2).await;
    let mut local = ferry("").await;

    let (status, body) = put(&local, "out", to_rabbit(rabbit, &src, &dest)).await;
    assert_eq!(status, 201, "{body}");
    up(&local, "out").await;
    let (_fc, fch) = ferry_channel(&local).await;
    publish(&fch, &src, "a", 20).await;
    let mut at_rabbit = consume(&rch, &dest).await;
    assert_eq!(receive(&mut at_rabbit, 20).await, bodies("a", 20), "every message, in order");

    // RabbitMQ's parameter shape; the password shown only to who may write parameters.
    let (status, list) = get(&local, "admin", "/api/parameters").await;
    assert_eq!(status, 200);
    assert_eq!(
        list,
        json!([{"value": to_rabbit(rabbit, &src, &dest), "vhost": "/", "component": "shovel", "name": "out"}])
    );
    assert_eq!(get(&local, "admin", "/api/parameters/shovel").await.1, list);
    assert_eq!(get(&local, "maker", "/api/parameters/shovel/%2F").await.1, list);
    assert_eq!(get(&local, "admin", "/api/parameters/shovel/%2F/out").await.1, list[0]);
    assert_eq!(get(&local, "admin", "/api/parameters/federation-upstream").await.1, json!([]));
    let (status, seen) = get(&local, "watcher", "/api/parameters/shovel/%2F/out").await;
    assert_eq!(status, 200);
    assert_eq!(seen["value"]["dest-uri"], format!("amqp://guest:***@127.0.0.1:{}/%2f", rabbit.port));
    // /api/shovels: "dynamic", never a password, for anybody.
    for user in ["admin", "watcher"] {
        let (status, shovels) = get(&local, user, "/api/shovels").await;
        assert_eq!(status, 200);
        let s = &shovels[0];
        assert_eq!(
            (s["name"].as_str(), s["vhost"].as_str(), s["type"].as_str()),
            (Some("out"), Some("/"), Some("dynamic"))
        );
        assert_eq!(s["state"], "running");
        assert_eq!(s["src_uri"], "amqp://");
        assert_eq!(s["dest_uri"], format!("amqp://guest@127.0.0.1:{}/%2f", rabbit.port));
        assert!(!shovels.to_string().contains(&format!("guest:{RABBIT_PASSWORD}")), "{shovels}");
    }

    // Who may not write parameters cannot, and nobody without credentials reads them.
    let watcher_put = send(
        &local,
        Some("watcher"),
        reqwest::Method::PUT,
        "/api/parameters/shovel/%2F/x",
        Some(json!({"value": to_rabbit(rabbit, &src, &dest)})),
    )
    .await;
    assert_eq!(watcher_put.0, 401, "{}", watcher_put.1);
    assert_eq!(
        send(&local, Some("watcher"), reqwest::Method::DELETE, "/api/parameters/shovel/%2F/out", None).await.0,
        401
    );
    assert_eq!(send(&local, None, reqwest::Method::GET, "/api/parameters", None).await.0, 401);
    assert_eq!(
        send(&local, None, reqwest::Method::PUT, "/api/parameters/shovel/%2F/x", Some(json!({"value": {}}))).await.0,
        401
    );

    // RabbitMQ 3.10's restart. (Once RabbitMQ's confirms are in, here and below: what is
    // unconfirmed when a shovel stops goes again, at least once.)
    until(&local, |s| s["ferry"]["forwarded"]["out"] == 20 && s["ferry"]["in_flight"] == 0).await;
    let restart = "/api/shovels/vhost/%2F/out/restart";
    assert_eq!(send(&local, Some("admin"), reqwest::Method::DELETE, restart, None).await.0, 204);
    up(&local, "out").await;
    publish(&fch, &src, "b", 3).await;
    assert_eq!(receive(&mut at_rabbit, 3).await, bodies("b", 3));

    // Changed: PUT again with another destination.
    until(&local, |s| s["ferry"]["forwarded"]["out"] == 3 && s["ferry"]["in_flight"] == 0).await;
    let (status, body) = put(&local, "out", to_rabbit(rabbit, &src, &dest2)).await;
    assert_eq!(status, 204, "{body}");
    up(&local, "out").await;
    publish(&fch, &src, "c", 5).await;
    let mut at_rabbit2 = consume(&rch, &dest2).await;
    assert_eq!(receive(&mut at_rabbit2, 5).await, bodies("c", 5));

    // Ferry restarts: the shovel comes back from the store and goes on.
    until(&local, |s| s["ferry"]["forwarded"]["out"] == 5 && s["ferry"]["in_flight"] == 0).await;
    drop((_fc, fch));
    local = local.restart().await;
    up(&local, "out").await;
    let (_fc, fch) = ferry_channel(&local).await;
    publish(&fch, &src, "d", 5).await;
    assert_eq!(receive(&mut at_rabbit2, 5).await, bodies("d", 5));
    assert_eq!(get(&local, "admin", "/api/shovels").await.1[0]["type"], "dynamic");

    // Deleted: it stops, and what is published after stays in the source queue.
    let (status, body) =
        send(&local, Some("admin"), reqwest::Method::DELETE, "/api/parameters/shovel/%2F/out", None).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(get(&local, "admin", "/api/parameters").await.1, json!([]));
    assert_eq!(get(&local, "admin", "/api/shovels").await.1, json!([]));
    publish(&fch, &src, "e", 3).await;
    assert_eq!(declare(&fch, &src).await, 3, "kept in the source queue");
    assert_eq!(
        send(&local, Some("admin"), reqwest::Method::DELETE, "/api/parameters/shovel/%2F/out", None).await.0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shovels_are_refused_with_the_reason_and_nothing_starts() {
    let Some(rabbit) = rabbit().await else { return };
    let file = format!(
        "[[shovels]]\nname = \"filed\"\nsrc_uri = \"local\"\nsrc_queue = \"fq\"\ndest_uri = \"amqp://127.0.0.1:{}/%2f\"\ndest_queue = \"fq\"\n",
        rabbit.port
    );
    // A listener in vhost `other` makes that vhost.
    let other = "[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\nvhost = \"other\"\n";
    let local = ferry(&format!("{file}{other}")).await;
    let good = to_rabbit(rabbit, "q", "q");
    let with = |k: &str, v: Value| {
        let mut g = good.clone();
        g[k] = v;
        g
    };
    let mut no_src = good.clone();
    no_src.as_object_mut().unwrap().remove("src-queue");
    let cases = [
        (with("src-consumer-args", json!({})), 400, "src-consumer-args: not a key"),
        (no_src, 400, "src-queue: give src-queue or src-exchange"),
        (
            with("dest-uri", json!("amqp://guest:guest@127.0.0.1:0/%2f")),
            400,
            "dest-uri: \"amqp://guest@127.0.0.1:0/%2f\" port \"0\"",
        ),
        (with("dest-uri", json!("http://h")), 400, "dest-uri: \"http://h\" must start with amqp://"),
        (
            with("src-delete-after", json!("soon")),
            400,
            "src-delete-after: \"soon\": \"never\", \"queue-length\" or a number",
        ),
        (with("ack-mode", json!("sometimes")), 400, "ack-mode: \"sometimes\": expected"),
        (with("dest-protocol", json!("amqp10")), 400, "dest-protocol: \"amqp10\""),
        (with("dest-uri", json!("amqp://")), 400, "both ends are this broker"),
    ];
    for (value, status, reason) in cases {
        let (got, body) = put(&local, "bad", value.clone()).await;
        assert_eq!(got, status, "{value}: {body}");
        assert_eq!(body["error"], "bad_request", "{body}");
        assert!(body["reason"].as_str().unwrap().contains(reason), "{value}: {body}");
        assert!(!body.to_string().contains("guest:guest"), "a password in a reason: {body}");
    }
    // No value, another component, a name the file uses, a vhost that does not exist.
    let path = "/api/parameters/shovel/%2F/bad";
    let (status, body) = send(&local, Some("admin"), reqwest::Method::PUT, path, Some(json!({"vhost": "/"}))).await;
    assert_eq!((status, body["reason"].as_str()), (400, Some("value: is required")));
    let other = "/api/parameters/federation-upstream/%2F/up";
    let (status, body) =
        send(&local, Some("admin"), reqwest::Method::PUT, other, Some(json!({"value": {"uri": "amqp://h"}}))).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = put(&local, "filed", good.clone()).await;
    assert_eq!(status, 405, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("configured in the server's file"), "{body}");
    // A name a bridge made through the API has, and the other way round: 409.
    let bridge = json!({"address": "127.0.0.1:1", "topics": [{"pattern": "#", "direction": "out"}]});
    assert_eq!(
        send(&local, Some("admin"), reqwest::Method::PUT, "/api/bridges/clash", Some(bridge.clone())).await.0,
        201
    );
    let (status, body) = put(&local, "clash", good.clone()).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("is a bridge made through the API"), "{body}");
    assert_eq!(send(&local, Some("admin"), reqwest::Method::DELETE, "/api/bridges/clash", None).await.0, 204);
    // The local end in another vhost: it must exist, and the status names it.
    let (status, body) = put(&local, "elsewhere", with("src-uri", json!("amqp:///nowhere"))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["reason"], "vhost \"nowhere\" does not exist");
    assert_eq!(put(&local, "elsewhere", with("src-uri", json!("amqp:///other"))).await.0, 201);
    let (_, shovels) = get(&local, "admin", "/api/shovels/%2F").await;
    let s = shovels.as_array().unwrap().iter().find(|s| s["name"] == "elsewhere").expect("listed").clone();
    assert_eq!((s["vhost"].as_str(), s["src_uri"].as_str()), (Some("/"), Some("amqp:///other")));
    assert_eq!(get(&local, "admin", "/api/shovels/other").await.1, json!([]));
    let path = "/api/parameters/shovel/%2F/elsewhere";
    assert_eq!(send(&local, Some("admin"), reqwest::Method::DELETE, path, None).await.0, 204);
    // A policymaker of the vhost may make and delete one; then the bridge name is the shovel's.
    let path = "/api/parameters/shovel/%2F/clash";
    let (status, body) = send(&local, Some("maker"), reqwest::Method::PUT, path, Some(json!({"value": good}))).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = send(&local, Some("admin"), reqwest::Method::PUT, "/api/bridges/clash", Some(bridge)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(send(&local, Some("maker"), reqwest::Method::DELETE, path, None).await.0, 204);
    let (status, _) = send(
        &local,
        Some("admin"),
        reqwest::Method::PUT,
        "/api/parameters/shovel/nowhere/x",
        Some(json!({"value": good})),
    )
    .await;
    assert_eq!(status, 404);
    // The file's shovel is listed "static"; nothing was started.
    assert_eq!(get(&local, "admin", "/api/parameters").await.1, json!([]));
    let (_, shovels) = get(&local, "admin", "/api/shovels").await;
    let names: Vec<(&str, &str)> = shovels
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["type"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("filed", "static")]);
    assert_eq!(
        send(&local, Some("admin"), reqwest::Method::DELETE, "/api/shovels/vhost/%2F/filed/restart", None).await.0,
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_carry_a_dynamic_shovel_to_another_ferry_where_it_runs() {
    let Some(rabbit) = rabbit().await else { return };
    let (src, dest) = (unique("src"), unique("dest"));
    let (_rc, rch) = rabbit.channel().await;
    declare(&rch, &dest).await;
    let a = ferry("").await;
    assert_eq!(put(&a, "carried", to_rabbit(rabbit, &src, &dest)).await.0, 201);
    let (status, defs) = get(&a, "admin", "/api/definitions").await;
    assert_eq!(status, 200);
    let expected =
        json!([{"value": to_rabbit(rabbit, &src, &dest), "vhost": "/", "component": "shovel", "name": "carried"}]);
    assert_eq!(defs["parameters"], expected);
    // The per-vhost export holds it too.
    assert_eq!(get(&a, "admin", "/api/definitions/%2F").await.1["parameters"], expected);
    drop(a);

    let b = ferry("").await;
    let (status, body) = send(&b, Some("admin"), reqwest::Method::POST, "/api/definitions", Some(defs.clone())).await;
    assert_eq!(status, 204, "{body}");
    up(&b, "carried").await;
    let (_fc, fch) = ferry_channel(&b).await;
    publish(&fch, &src, "imported", 4).await;
    let mut at_rabbit = consume(&rch, &dest).await;
    assert_eq!(receive(&mut at_rabbit, 4).await, bodies("imported", 4));
    // Importing the same again changes nothing; another value under the name is refused.
    assert_eq!(send(&b, Some("admin"), reqwest::Method::POST, "/api/definitions", Some(defs.clone())).await.0, 204);
    let mut changed = defs.clone();
    changed["parameters"][0]["value"]["dest-queue"] = json!("elsewhere");
    let (status, body) = send(&b, Some("admin"), reqwest::Method::POST, "/api/definitions", Some(changed)).await;
    assert_eq!(status, 400);
    assert!(body["reason"].as_str().unwrap().contains("shovel 'carried' exists with other settings"), "{body}");
    let mut federation = defs;
    federation["parameters"] =
        json!([{"value": {"uri": "amqp://h"}, "vhost": "/", "component": "federation-upstream", "name": "up"}]);
    let (status, body) = send(&b, Some("admin"), reqwest::Method::POST, "/api/definitions", Some(federation)).await;
    assert_eq!(status, 400);
    assert!(body["reason"].as_str().unwrap().contains("only runtime parameter component is 'shovel'"), "{body}");
}

/// Runs rabbitmqadmin against `server` as `admin`; `None` when it is not installed.
async fn rabbitmqadmin(server: &TestServer, args: &[&str]) -> Option<std::process::Output> {
    ferry_integration_tests::management::rabbitmqadmin(server, "admin", PASSWORD, args).await
}

fn ok(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "rabbitmqadmin: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmqadmin_declares_lists_and_deletes_a_shovel_parameter() {
    let Some(rabbit) = rabbit().await else { return };
    let (src, dest) = (unique("src"), unique("dest"));
    let (_rc, rch) = rabbit.channel().await;
    declare(&rch, &dest).await;
    let local = ferry("").await;
    let value = to_rabbit(rabbit, &src, &dest).to_string();
    let name_arg = "name=by-admin";
    let Some(out) =
        rabbitmqadmin(&local, &["declare", "parameter", "component=shovel", name_arg, &format!("value={value}")]).await
    else {
        return;
    };
    assert!(ok(&out).contains("parameter declared"), "{out:?}");
    up(&local, "by-admin").await;
    let (_fc, fch) = ferry_channel(&local).await;
    publish(&fch, &src, "ra", 3).await;
    let mut at_rabbit = consume(&rch, &dest).await;
    assert_eq!(receive(&mut at_rabbit, 3).await, bodies("ra", 3));

    let listed = ok(&rabbitmqadmin(&local, &["list", "parameters"]).await.unwrap());
    assert!(listed.contains("by-admin") && listed.contains("shovel") && listed.contains(&dest), "{listed}");
    let json_list = ok(&rabbitmqadmin(&local, &["-f", "raw_json", "list", "parameters"]).await.unwrap());
    let parsed: Value = serde_json::from_str(&json_list).expect("raw_json");
    assert_eq!(parsed[0]["value"]["src-queue"], src.as_str());
    let deleted = ok(&rabbitmqadmin(&local, &["delete", "parameter", "component=shovel", name_arg]).await.unwrap());
    assert!(deleted.contains("parameter deleted"), "{deleted}");
    assert_eq!(get(&local, "admin", "/api/parameters").await.1, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_shovel_hands_what_the_remote_did_not_confirm_back_to_the_source() {
    let Some(rabbit) = rabbit().await else { return };
    let (src, dest) = (unique("src"), unique("dest"));
    let (_rc, rch) = rabbit.channel().await;
    declare(&rch, &dest).await;
    // RabbitMQ behind a proxy that stops passing what the shovel sends: nothing is confirmed.
    let (port, stall) = ferry_integration_tests::stalling_proxy(rabbit.addr()).await;
    let local = ferry("").await;
    let mut value = to_rabbit(rabbit, &src, &dest);
    value["dest-uri"] = json!(format!("amqp://guest:{RABBIT_PASSWORD}@127.0.0.1:{port}/%2f"));
    assert_eq!(put(&local, "held", value).await.0, 201);
    up(&local, "held").await;
    stall.send(true).expect("stall");
    // The proxy had a read pending when it was stalled: what the shovel sends first still
    // passes. A first message takes that read.
    let (_fc, fch) = ferry_channel(&local).await;
    publish(&fch, &src, "first", 1).await;
    until(&local, |s| s["ferry"]["forwarded"]["out"] == 1).await;
    publish(&fch, &src, "held", 5).await;
    // Taken from the source, sent, never confirmed.
    until(&local, |s| s["ferry"]["in_flight"] == 5).await;
    let (status, body) =
        send(&local, Some("admin"), reqwest::Method::DELETE, "/api/parameters/shovel/%2F/held", None).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(declare(&fch, &src).await, 5, "every unconfirmed message is back in the source queue");
    assert_eq!(declare(&rch, &dest).await, 1, "and only the first reached RabbitMQ");
}

/// Waits (at most 10 s) until the first shovel of `/api/shovels` satisfies `done`: queue
/// counters move without an event to wait on, so the library's poll asks the API.
async fn until(server: &TestServer, done: impl Fn(&Value) -> bool) {
    poll_until(server, "/api/shovels", Duration::from_secs(10), |v| done(&v[0])).await;
}

/// Waits (at most 10 s) until the shovels have deleted their parameters.
async fn until_no_parameters(server: &TestServer) {
    poll_until(server, "/api/parameters", Duration::from_secs(10), |v| *v == json!([])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn src_delete_after_moves_that_many_messages_then_deletes_the_shovel() {
    let Some(rabbit) = rabbit().await else { return };
    let (src, dest) = (unique("src"), unique("dest"));
    let (_rc, rch) = rabbit.channel().await;
    declare(&rch, &dest).await;
    let local = ferry("").await;
    let (_fc, fch) = ferry_channel(&local).await;
    declare(&fch, &src).await;
    publish(&fch, &src, "m", 10).await;

    // A number: four messages, then the shovel deletes itself; the rest stay at the source.
    let mut value = to_rabbit(rabbit, &src, &dest);
    value["src-delete-after"] = json!(4);
    value["dest-add-timestamp-header"] = json!(true);
    assert_eq!(put(&local, "four", value).await.0, 201);
    let mut at_rabbit = consume(&rch, &dest).await;
    // RabbitMQ's headers: x-shovelled says a dynamic shovel of vhost /, with a timestamp.
    let d = within("a shovelled message", at_rabbit.next()).await.expect("open").expect("delivery");
    within("ack", d.acker.ack(BasicAckOptions::default())).await.expect("ack");
    let headers = d.properties.headers().clone().expect("headers");
    let headers = headers.inner();
    let Some(AMQPValue::FieldArray(shovelled)) = headers.get("x-shovelled") else { panic!("{headers:?}") };
    let AMQPValue::FieldTable(entry) = &shovelled.as_slice()[0] else { panic!("{shovelled:?}") };
    let text = |k: &str| match entry.inner().get(k) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(
        (text("shovel-type"), text("shovel-vhost"), text("shovel-name")),
        ("dynamic".into(), "/".into(), "four".into())
    );
    assert!(!text("dest-uri").contains(&format!(":{RABBIT_PASSWORD}@")), "{entry:?}");
    let stamped = match headers.get("x-shovelled-timestamp") {
        Some(AMQPValue::LongLongInt(t)) => *t,
        other => panic!("x-shovelled-timestamp: {other:?}"),
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - 60..=now).contains(&stamped), "{stamped} vs {now}");
    let mut got = vec![String::from_utf8_lossy(&d.data).into_owned()];
    got.extend(receive(&mut at_rabbit, 3).await);
    assert_eq!(got, bodies("m", 4));
    until_no_parameters(&local).await;
    assert_eq!(get(&local, "admin", "/api/shovels").await.1, json!([]));
    assert_eq!(declare(&fch, &src).await, 6, "what the shovel took past its count went back");

    // queue-length: what the source held when the shovel started.
    let mut value = to_rabbit(rabbit, &src, &dest);
    value["src-delete-after"] = json!("queue-length");
    assert_eq!(put(&local, "the-rest", value).await.0, 201);
    let rest: Vec<String> = (4..10).map(|i| format!("m-{i}")).collect();
    assert_eq!(receive(&mut at_rabbit, 6).await, rest);
    until_no_parameters(&local).await;
    publish(&fch, &src, "after", 2).await;
    assert_eq!(declare(&fch, &src).await, 2, "published after it was done: not shovelled");
}

/// The two ends of a shovel from RabbitMQ: a queue there holding `n` messages (`in-0`, …)
/// published with confirms, and a Ferry with an empty local queue; the connections kept open.
struct FromRabbit {
    remote_q: String,
    local_q: String,
    rch: Channel,
    fch: Channel,
    local: TestServer,
    _conns: (Connection, Connection),
}

async fn from_rabbit(rabbit: &Rabbit, n: usize) -> FromRabbit {
    let (remote_q, local_q) = (unique("remote"), unique("local"));
    let (rc, rch) = rabbit.channel().await;
    declare(&rch, &remote_q).await;
    within("confirm.select", rch.confirm_select(ConfirmSelectOptions::default())).await.expect("confirms");
    publish(&rch, &remote_q, "in", n).await;
    let local = ferry("").await;
    let (fc, fch) = ferry_channel(&local).await;
    declare(&fch, &local_q).await;
    FromRabbit { remote_q, local_q, rch, fch, local, _conns: (rc, fc) }
}

/// `src-delete-after` with a remote source, as RabbitMQ's shovels have it: a count of messages
/// taken from RabbitMQ's queue (acknowledged there once stored here), then the shovel deletes
/// itself and what its consumer was sent past the count goes back to RabbitMQ's queue; or
/// `queue-length`, what that queue held when the shovel connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn src_delete_after_counts_what_a_remote_source_gives_then_deletes_the_shovel() {
    let Some(rabbit) = rabbit().await else { return };
    let FromRabbit { remote_q, local_q, rch, fch, local, _conns } = from_rabbit(rabbit, 10).await;
    let inbound = |after: Value| {
        json!({"src-uri": rabbit_uri(rabbit), "src-queue": remote_q, "dest-uri": "amqp://", "dest-queue": local_q,
               "ack-mode": "on-confirm", "src-prefetch-count": 3, "src-delete-after": after})
    };
    assert_eq!(put(&local, "four", inbound(json!(4))).await.0, 201);
    let mut here = consume(&fch, &local_q).await;
    assert_eq!(receive(&mut here, 4).await, bodies("in", 4));
    until_no_parameters(&local).await;
    assert_eq!(get(&local, "admin", "/api/shovels").await.1, json!([]));
    // RabbitMQ hands back the deliveries past the count when the channel closes: a consumer
    // there gets all six, in order.
    let (_rc2, rch2) = rabbit.channel().await;
    let mut there = consume(&rch2, &remote_q).await;
    let rest: Vec<String> = (4..10).map(|i| format!("in-{i}")).collect();
    assert_eq!(receive(&mut there, 6).await, rest, "what the shovel was sent past its count went back");
    drop(there);
    within("close", rch2.close(200, "bye".into())).await.expect("channel closed");

    // queue-length: what RabbitMQ's queue held when the shovel connected.
    publish(&rch, &remote_q, "more", 3).await;
    assert_eq!(put(&local, "the-rest", inbound(json!("queue-length"))).await.0, 201);
    assert_eq!(receive(&mut here, 3).await, bodies("more", 3));
    until_no_parameters(&local).await;
    publish(&rch, &remote_q, "after", 2).await;
    assert_eq!(declare(&rch, &remote_q).await, 2, "published after it was done: not shovelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_shovel_brings_messages_from_rabbitmq_into_a_local_queue() {
    let Some(rabbit) = rabbit().await else { return };
    let FromRabbit { remote_q, local_q, rch, fch, local, _conns } = from_rabbit(rabbit, 6).await;
    // RabbitMQ's form: the source a list of URIs (the first is used), the local end amqp://.
    let value = json!({"src-uri": [rabbit_uri(rabbit), "amqp://unused.example"], "src-queue": remote_q,
                       "dest-uri": "amqp://", "dest-queue": local_q, "ack-mode": "on-confirm"});
    assert_eq!(put(&local, "inbound", value).await.0, 201);
    up(&local, "inbound").await;
    let mut here = consume(&fch, &local_q).await;
    assert_eq!(receive(&mut here, 6).await, bodies("in", 6));
    let (_, shovels) = get(&local, "watcher", "/api/shovels").await;
    assert_eq!(
        (shovels[0]["src_uri"].as_str(), shovels[0]["dest_uri"].as_str()),
        (Some(rabbit.uri().replace("127.0.0.1", "guest@127.0.0.1").as_str()), Some("amqp://"))
    );
    // Acknowledged to RabbitMQ once stored here: nothing is left there.
    until(&local, |s| s["ferry"]["forwarded"]["in"] == 6).await;
    let path = "/api/parameters/shovel/%2F/inbound";
    assert_eq!(send(&local, Some("admin"), reqwest::Method::DELETE, path, None).await.0, 204);
    assert_eq!(declare(&rch, &remote_q).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_shovel_whose_name_the_file_takes_is_not_started_and_can_be_deleted() {
    let Some(rabbit) = rabbit().await else { return };
    let local = ferry("").await;
    assert_eq!(put(&local, "taken", to_rabbit(rabbit, "q1", "q1")).await.0, 201);
    let dir = local.stop().await;
    // The file now has a shovel of that name: it is the file's.
    let file = format!(
        "[[shovels]]\nname = \"taken\"\nsrc_uri = \"local\"\nsrc_queue = \"q2\"\ndest_uri = \"amqp://127.0.0.1:{}/%2f\"\ndest_queue = \"q2\"\n",
        rabbit.port
    );
    let toml = std::fs::read_to_string(dir.path().join("ferry.toml")).expect("ferry.toml");
    std::fs::write(dir.path().join("ferry.toml"), format!("{toml}{file}")).expect("ferry.toml");
    let local = TestServer::resume(dir).await;
    let (_, shovels) = get(&local, "admin", "/api/shovels").await;
    let listed: Vec<(&str, &str)> = shovels
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["type"].as_str().unwrap(), s["src_queue"].as_str().unwrap()))
        .collect();
    assert_eq!(listed, [("static", "q2")]);
    assert_eq!(get(&local, "admin", "/api/parameters").await.1, json!([]));
    // The stored one is forgotten by a DELETE; a second is 404.
    let path = "/api/parameters/shovel/%2F/taken";
    assert_eq!(send(&local, Some("admin"), reqwest::Method::DELETE, path, None).await.0, 204);
    assert_eq!(send(&local, Some("admin"), reqwest::Method::DELETE, path, None).await.0, 404);
    let local = local.restart().await;
    assert_eq!(get(&local, "admin", "/api/shovels").await.1.as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shovel_from_a_local_exchange_keeps_a_backlog_retired_when_it_no_longer_needs_it() {
    let Some(rabbit) = rabbit().await else { return };
    let dest = unique("dest");
    let (_rc, rch) = rabbit.channel().await;
    declare(&rch, &dest).await;
    let local = ferry("").await;
    let value = json!({"src-uri": "amqp://", "src-exchange": "amq.direct", "src-exchange-key": "orders",
                       "dest-uri": rabbit_uri(rabbit), "dest-queue": dest});
    assert_eq!(put(&local, "from-x", value).await.0, 201);
    up(&local, "from-x").await;
    let backlog = "/api/queues/%2F/ferry-bridge.from-x";
    assert_eq!(get(&local, "admin", backlog).await.0, 200);
    let (_fc, fch) = ferry_channel(&local).await;
    for i in 0..3 {
        let props = BasicProperties::default().with_delivery_mode(2);
        let body = format!("x-{i}");
        let opts = BasicPublishOptions::default();
        let confirm =
            within("publish", fch.basic_publish("amq.direct".into(), "orders".into(), opts, body.as_bytes(), props))
                .await
                .expect("publish");
        within("confirm", confirm).await.expect("confirmed");
    }
    let mut at_rabbit = consume(&rch, &dest).await;
    assert_eq!(receive(&mut at_rabbit, 3).await, bodies("x", 3));
    // Changed to a queue source: the backlog, empty, goes.
    until(&local, |s| s["ferry"]["forwarded"]["out"] == 3 && s["ferry"]["in_flight"] == 0).await;
    let value =
        json!({"src-uri": "amqp://", "src-queue": unique("src"), "dest-uri": rabbit_uri(rabbit), "dest-queue": dest});
    assert_eq!(put(&local, "from-x", value).await.0, 204);
    assert_eq!(get(&local, "admin", backlog).await.0, 404);
}

//! `$SYS/broker/...` (issue 17): Mosquitto's tree, retained, updated every `[mqtt]
//! sys_interval` with only the values that changed, readable by MQTT subscribers of `$SYS/#`
//! and by AMQP queues bound to `$SYS.#` on the MQTT exchange; `sys_interval = 0` turns it off.
//! Driven through rumqttc and lapin against a server whose frontends come from the config file,
//! as `ferry` builds them.

use std::collections::HashMap;
use std::sync::Arc;

use ferry_core::frontend::Frontend;

use ferry_integration_tests::amqp::{lapin_channel, AMQP_LISTENER};
use ferry_integration_tests::cross::{bound_queue, consume, next_delivery, MQTT_EXCHANGE};
use ferry_integration_tests::mqtt::{text, v311, v5, MQTT_LISTENER};
use ferry_integration_tests::{within, write_config, TestServer, TIMEOUT};

/// A server with an MQTT and an AMQP listener and `[mqtt] sys_interval = interval`.
async fn server(interval: u32) -> TestServer {
    server_and_frontends(interval).await.0
}

async fn server_and_frontends(interval: u32) -> (TestServer, Vec<Arc<dyn Frontend>>) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let toml = format!("[mqtt]\nsys_interval = {interval}\n{MQTT_LISTENER}{AMQP_LISTENER}");
    let config = write_config(dir.path(), &toml);
    let frontends = ferry_server::frontends::builtin_with(&config.mqtt, &config.amqp);
    let server =
        TestServer::start_in(dir, &toml, &frontends).await.unwrap_or_else(|e| panic!("server did not start:\n{e}"));
    (server, frontends)
}

/// The next `$SYS` publish as (topic, payload, retain flag).
async fn next(c: &mut v311::Client) -> (String, String, bool) {
    let p = c.publish_received().await;
    (p.topic.clone(), text(&p.payload).to_string(), p.retain)
}

/// Reads publishes into `latest` until `topic`'s value is one `accept` takes (within
/// [`TIMEOUT`]: other values keep coming every round).
async fn until(c: &mut v311::Client, latest: &mut HashMap<String, String>, topic: &str, accept: impl Fn(&str) -> bool) {
    if latest.get(topic).is_some_and(|v| accept(v)) {
        return;
    }
    let found = tokio::time::timeout(TIMEOUT, async {
        loop {
            let (t, v, _) = next(c).await;
            let done = t == topic && accept(&v);
            latest.insert(t, v);
            if done {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "{topic}: not the value expected within {TIMEOUT:?}; the tree: {latest:#?}");
}

#[tokio::test]
async fn the_tree_is_retained_and_follows_clients_and_messages() {
    let server = server(1).await;
    // The first client starts the tree; once it has seen a value, the tree is retained.
    let mut first = v311::connect(&server, "first").await;
    first.subscribe("$SYS/broker/uptime", rumqttc::QoS::AtMostOnce).await;
    next(&mut first).await;
    let mut watcher = v311::connect(&server, "watcher").await;
    watcher.subscribe("$SYS/#", rumqttc::QoS::AtMostOnce).await;
    // The retained tree, as a new subscriber gets it; each topic once, and ended by the first
    // live (not retained) publish.
    let mut tree = HashMap::new();
    loop {
        let (t, v, retained) = next(&mut watcher).await;
        if !retained {
            break;
        }
        assert!(tree.insert(t.clone(), v).is_none(), "{t} retained twice");
    }
    for topic in [
        "version",
        "uptime",
        "clients/connected",
        "clients/active",
        "clients/disconnected",
        "clients/inactive",
        "clients/total",
        "clients/maximum",
        "clients/expired",
        "messages/received",
        "messages/sent",
        "messages/stored",
        "store/messages/count",
        "store/messages/bytes",
        "publish/messages/received",
        "publish/messages/sent",
        "publish/messages/dropped",
        "publish/bytes/received",
        "publish/bytes/sent",
        "bytes/received",
        "bytes/sent",
        "subscriptions/count",
        "shared_subscriptions/count",
        "retained messages/count",
        "heap/current",
        "heap/maximum",
        "load/messages/received/1min",
        "load/messages/sent/5min",
        "load/bytes/received/15min",
        "load/publish/received/1min",
        "load/publish/dropped/1min",
        "load/connections/1min",
        "load/sockets/15min",
    ] {
        assert!(tree.contains_key(&format!("$SYS/broker/{topic}")), "$SYS/broker/{topic} missing from {tree:?}");
    }
    assert!(tree["$SYS/broker/version"].starts_with("ferry version "), "{tree:?}");
    assert!(tree["$SYS/broker/uptime"].ends_with(" seconds"), "{tree:?}");
    // The watcher is counted if the round after its CONNECT came before its SUBSCRIBE.
    assert!(["1", "2"].contains(&tree["$SYS/broker/clients/connected"].as_str()), "{tree:?}");
    assert!(tree["$SYS/broker/heap/current"].parse::<u64>().unwrap() > 1_000_000, "RSS in bytes: {tree:?}");
    let received: u64 = tree["$SYS/broker/messages/received"].parse().unwrap();
    let payload_sent: u64 = tree["$SYS/broker/publish/bytes/sent"].parse().unwrap();

    // Another client, a persistent session that goes away, and a message: the counts follow.
    let mut options = v5::options(&server, "sensor");
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(600));
    let (mut sensor, _) = v5::Client::connect(options).await;
    sensor.subscribe("plant/+/temp", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await;
    until(&mut watcher, &mut tree, "$SYS/broker/clients/connected", |v| v == "3").await;
    // first's, the watcher's and the sensor's.
    until(&mut watcher, &mut tree, "$SYS/broker/subscriptions/count", |v| v == "3").await;
    sensor.publish("plant/7/temp", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, b"21.5").await;
    until(&mut watcher, &mut tree, "$SYS/broker/publish/messages/received", |v| v.parse::<u64>().unwrap() > received)
        .await;
    until(&mut watcher, &mut tree, "$SYS/broker/load/publish/received/1min", |v| v.parse::<f64>().unwrap() > 0.0).await;
    // The sensor's own message came back to it (and the watcher gets the tree).
    until(&mut watcher, &mut tree, "$SYS/broker/publish/bytes/sent", |v| v.parse::<u64>().unwrap() > payload_sent + 4)
        .await;
    sensor.disconnect().await;
    until(&mut watcher, &mut tree, "$SYS/broker/clients/disconnected", |v| v == "1").await;
    until(&mut watcher, &mut tree, "$SYS/broker/clients/connected", |v| v == "2").await;
    assert_eq!(tree["$SYS/broker/clients/total"], "3", "connected + away");
    assert_eq!(tree["$SYS/broker/clients/maximum"], "3");
}

#[tokio::test]
async fn unchanged_values_are_not_published_again() {
    let server = server(1).await;
    let mut watcher = v311::connect(&server, "watcher").await;
    for topic in ["$SYS/broker/version", "$SYS/broker/clients/connected", "$SYS/broker/uptime"] {
        watcher.subscribe(topic, rumqttc::QoS::AtMostOnce).await;
    }
    // Live publishes (retain flag false) per topic, over the rounds that end with `rounds`
    // live uptimes (published every round).
    async fn live(watcher: &mut v311::Client, rounds: usize) -> HashMap<String, Vec<String>> {
        let mut seen: HashMap<String, Vec<String>> = HashMap::new();
        within("rounds of $SYS", async {
            while seen.get("$SYS/broker/uptime").map_or(0, Vec::len) < rounds {
                let (t, v, retained) = next(watcher).await;
                if !retained {
                    seen.entry(t).or_default().push(v);
                }
            }
        })
        .await;
        seen
    }
    // A round that saw the watcher connected, then two more with nothing changed.
    live(&mut watcher, 1).await;
    let quiet = live(&mut watcher, 2).await;
    assert_eq!(quiet.get("$SYS/broker/version"), None, "{quiet:?}");
    assert_eq!(quiet.get("$SYS/broker/clients/connected"), None, "{quiet:?}");
    // A change is published once, live.
    let _other = v311::connect(&server, "other").await;
    let changed = live(&mut watcher, 3).await;
    assert_eq!(changed.get("$SYS/broker/clients/connected"), Some(&vec!["2".to_string()]), "{changed:?}");
    assert_eq!(changed.get("$SYS/broker/version"), None, "{changed:?}");
}

#[tokio::test]
async fn an_amqp_queue_bound_to_sys_gets_the_tree() {
    let server = server(1).await;
    let (_conn, ch) = lapin_channel(&server).await;
    let queue = bound_queue(&ch, MQTT_EXCHANGE, &["$SYS.broker.clients.connected"]).await;
    let mut consumer = consume(&ch, &queue, true).await;
    // The first MQTT client starts the tree; a second one changes it.
    let _first = v311::connect(&server, "first").await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.routing_key.as_str(), "$SYS.broker.clients.connected");
    assert_eq!(std::str::from_utf8(&d.data).unwrap(), "1");
    let _second = v311::connect(&server, "second").await;
    assert_eq!(std::str::from_utf8(&next_delivery(&mut consumer).await.data).unwrap(), "2");
}

#[tokio::test]
async fn sys_interval_zero_publishes_nothing() {
    let server = server(0).await;
    let mut watcher = v311::connect(&server, "watcher").await;
    watcher.subscribe("$SYS/#", rumqttc::QoS::AtMostOnce).await;
    let mut publisher = v311::connect(&server, "publisher").await;
    publisher.publish("plant/7/temp", rumqttc::QoS::AtLeastOnce, false, b"21.5").await;
    // With any other interval the retained tree would be there at once (it is published when
    // the first client connects).
    watcher.no_publish().await;
}

#[tokio::test]
async fn a_frontend_served_by_a_new_broker_publishes_the_tree_there() {
    let (server, frontends) = server_and_frontends(1).await;
    drop(v311::connect(&server, "before").await);
    let dir = server.stop().await;
    // The same frontend instances on the restarted broker (the store kept the old retained
    // tree, which comes first): the rounds go on for the new broker.
    let server = TestServer::resume_with(dir, &frontends).await;
    let mut watcher = v311::connect(&server, "watcher").await;
    watcher.subscribe("$SYS/broker/clients/connected", rumqttc::QoS::AtMostOnce).await;
    let mut fresh = v311::connect(&server, "fresh").await;
    fresh.subscribe("$SYS/broker/uptime", rumqttc::QoS::AtMostOnce).await;
    within("a live $SYS round", async { while next(&mut fresh).await.2 {} }).await;
    // And the new broker's count: the watcher and `fresh`.
    let mut latest = HashMap::new();
    until(&mut watcher, &mut latest, "$SYS/broker/clients/connected", |v| v == "2").await;
}

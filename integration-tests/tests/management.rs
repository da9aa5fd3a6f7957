//! The HTTP listener (issue 17) through a real HTTP client (reqwest): HTTP Basic against
//! `[[users]]` with RabbitMQ's tags, the management API's JSON in RabbitMQ's shapes (a
//! KEDA-shaped queue read, lists with `columns`, `page`, `name`), closing connections that
//! rumqttc 5.0 and lapin clients see closed in their protocol's terms, and `/metrics` checked
//! by `promtool check metrics` under both prefixes (SKIPPED when promtool is not installed).

use std::time::Duration;

use ferry_integration_tests::amqp::reply_code;
use ferry_integration_tests::management::{
    amqp, declare, encode, get_as, get_json, poll_until, publish, server, server_with, url, PASSWORD,
};
use ferry_integration_tests::mqtt::v5;
use ferry_integration_tests::{within, TestServer};
use futures_util::StreamExt;
use lapin::Event;
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use serde_json::Value;

#[tokio::test]
async fn no_credentials_get_401_with_the_basic_challenge() {
    let server = server().await;
    let client = reqwest::Client::new();
    for path in ["/api/overview", "/api/queues", "/metrics"] {
        let r = within("GET", client.get(url(&server, path)).send()).await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"Ferry\"", "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "not_authorized", "{body}");
    }
    let wrong =
        within("GET", client.get(url(&server, "/api/whoami")).basic_auth("admin", Some("nope")).send()).await.unwrap();
    assert_eq!(wrong.status(), 401);
    // A user without a management tag logs in but is not let into the API.
    let plain = get_as(&server, "plain", "/api/overview").await;
    assert_eq!(plain.status(), 401);
    assert_eq!(plain.json::<Value>().await.unwrap()["reason"], "Not management user");
    let me = get_json(&server, "/api/whoami").await;
    assert_eq!(me, serde_json::json!({"name": "admin", "tags": ["administrator"]}));
    let unknown = get_as(&server, "admin", "/api/nonsense").await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.json::<Value>().await.unwrap()["error"], "Object Not Found");
}

#[tokio::test]
async fn a_monitoring_user_sees_everything_and_cannot_delete() {
    let server = server().await;
    let conn = amqp(&server, "billing").await;
    let ch = within("channel", conn.create_channel()).await.unwrap();
    declare(&ch, "orders").await;

    let r = get_as(&server, "watcher", "/api/connections").await;
    assert_eq!(r.status(), 200);
    let list: Value = r.json().await.unwrap();
    let name = list[0]["name"].as_str().expect("a connection name").to_string();
    assert_eq!(list[0]["user"], "admin", "{list:#}");

    let client = reqwest::Client::new();
    for path in [format!("/api/connections/{}", encode(&name)), "/api/queues/%2F/orders".to_string()] {
        let r = within("DELETE", client.delete(url(&server, &path)).basic_auth("watcher", Some(PASSWORD)).send())
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "DELETE {path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["reason"], "Not administrator user", "{body}");
    }
    // Nothing was closed or deleted.
    assert_eq!(server.server.broker().connections().len(), 1);
    assert!(server.server.broker().vhost("/").unwrap().queue("orders").is_some());
    // A management user sees its own connections only (it has none).
    let own: Value = get_as(&server, "owner", "/api/connections").await.json().await.unwrap();
    assert_eq!(own, serde_json::json!([]));

    // The administrator may.
    let r = within(
        "DELETE",
        client.delete(url(&server, "/api/queues/%2F/orders")).basic_auth("admin", Some(PASSWORD)).send(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    assert!(server.server.broker().vhost("/").unwrap().queue("orders").is_none());
    assert_eq!(get_as(&server, "admin", "/api/queues/%2F/orders").await.status(), 404);
}

/// What KEDA's RabbitMQ scaler reads (`GET /api/queues/{vhost}/{queue}`): the depth and the
/// publish rate, while a publisher runs.
#[tokio::test]
async fn a_keda_shaped_request_reads_the_depth_and_the_publish_rate() {
    let server = server().await;
    let conn = amqp(&server, "producer").await;
    let ch = within("channel", conn.create_channel()).await.unwrap();
    declare(&ch, "jobs").await;
    let publisher = tokio::spawn(async move {
        loop {
            publish(&ch, "jobs", b"work").await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // Rates come from samples taken every 5 s: two samples after the publishing started.
    let q = poll_until(&server, "/api/queues/%2F/jobs", Duration::from_secs(30), |q| {
        q["message_stats"]["publish_details"]["rate"].as_f64().unwrap_or(0.0) > 0.0
    })
    .await;
    publisher.abort();
    let messages = q["messages"].as_u64().expect("messages");
    assert!(messages > 0, "{q:#}");
    assert_eq!(q["messages_ready"].as_u64(), Some(messages), "no consumer: all ready");
    assert_eq!(q["messages_unacknowledged"].as_u64(), Some(0));
    assert_eq!((q["name"].as_str(), q["vhost"].as_str()), (Some("jobs"), Some("/")));
    assert_eq!(
        (q["durable"].as_bool(), q["auto_delete"].as_bool(), q["exclusive"].as_bool()),
        (Some(false), Some(false), Some(false))
    );
    assert!(q["message_stats"]["publish"].as_u64().unwrap() >= messages, "{q:#}");

    // The same through `columns`, as KEDA can ask.
    let picked = get_json(&server, "/api/queues/%2F/jobs?columns=messages,message_stats.publish_details.rate").await;
    let keys: Vec<&String> = picked.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["message_stats", "messages"], "{picked:#}");
    // And in the overview.
    let overview = get_json(&server, "/api/overview").await;
    for key in ["queue_totals", "object_totals", "message_stats"] {
        assert!(overview[key].is_object(), "{key} missing: {overview:#}");
    }
    assert!(overview["queue_totals"]["messages"].as_u64().unwrap() >= messages);
    assert_eq!(overview["object_totals"]["queues"], 1);
    assert!(overview["message_stats"]["publish_details"]["rate"].is_number());
    assert!(overview["message_stats"]["deliver_get_details"]["rate"].is_number());
}

#[tokio::test]
async fn lists_filter_page_sort_and_pick_columns() {
    let server = server().await;
    let conn = amqp(&server, "lister").await;
    let ch = within("channel", conn.create_channel()).await.unwrap();
    for q in ["alpha", "beta", "gamma", "alpine"] {
        declare(&ch, q).await;
    }
    publish(&ch, "beta", b"x").await;
    let names = |v: &Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|q| q["name"].as_str().unwrap().to_string()).collect()
    };
    let beta = poll_until(&server, "/api/queues/%2F/beta", Duration::from_secs(10), |q| q["messages"] == 1).await;
    assert_eq!(beta["messages_ready"], 1);

    assert_eq!(names(&get_json(&server, "/api/queues").await), ["alpha", "alpine", "beta", "gamma"]);
    assert_eq!(names(&get_json(&server, "/api/queues/%2F?name=ALP").await), ["alpha", "alpine"]);
    assert_eq!(names(&get_json(&server, "/api/queues?name=%5Ea.*a%24&use_regex=true").await), ["alpha"]);
    let sorted = get_json(&server, "/api/queues?sort=messages&sort_reverse=true&columns=name,messages").await;
    assert_eq!(sorted[0], serde_json::json!({"name": "beta", "messages": 1}));
    let page = get_json(&server, "/api/queues?page=2&page_size=3").await;
    assert_eq!(names(&page["items"]), ["gamma"]);
    assert_eq!((page["page_count"].as_u64(), page["total_count"].as_u64()), (Some(2), Some(4)));
    let bad = get_as(&server, "admin", "/api/queues?page=0").await;
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.json::<Value>().await.unwrap()["error"], "bad_request");

    let vhosts = get_json(&server, "/api/vhosts").await;
    assert_eq!(vhosts[0]["name"], "/");
    let exchanges = get_json(&server, "/api/exchanges/%2F?columns=name,type").await;
    assert!(exchanges.as_array().unwrap().contains(&serde_json::json!({"name": "amq.topic", "type": "topic"})));
    let bindings = get_json(&server, "/api/bindings").await;
    assert!(
        bindings.as_array().unwrap().iter().any(|b| b["source"] == "" && b["destination"] == "gamma"),
        "the default exchange's bindings: {bindings:#}"
    );
    let health = get_json(&server, "/api/health/checks/alarms").await;
    assert_eq!(health, serde_json::json!({"status": "ok"}));
}

#[tokio::test]
async fn an_administrator_declares_a_queue_and_a_monitoring_user_cannot() {
    let server = server().await;
    let client = reqwest::Client::new();
    let put = |user: &'static str, path: &'static str, body: &'static str| {
        let request = client.put(url(&server, path)).basic_auth(user, Some(PASSWORD)).body(body);
        async move { within("PUT", request.send()).await.unwrap() }
    };
    let body = r#"{"durable": true, "auto_delete": false, "arguments": {"x-max-length": 5}}"#;
    assert_eq!(put("watcher", "/api/queues/%2F/made", body).await.status(), 401);
    assert!(server.server.broker().vhost("/").unwrap().queue("made").is_none());
    assert_eq!(put("admin", "/api/queues/%2F/made", body).await.status(), 201);
    assert_eq!(put("admin", "/api/queues/%2F/made", body).await.status(), 204, "the same again");
    let q = get_json(&server, "/api/queues/%2F/made").await;
    assert_eq!((q["durable"].as_bool(), q["arguments"]["x-max-length"].as_i64()), (Some(true), Some(5)));
    let other = put("admin", "/api/queues/%2F/made", r#"{"arguments": {"x-max-length": 6}}"#).await;
    assert_eq!(other.status(), 400, "a redeclare with other arguments");
    let bad = put("admin", "/api/queues/%2F/x", "{not json").await;
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.json::<Value>().await.unwrap()["error"], "bad_request");
    assert_eq!(put("admin", "/api/queues/nope/x", "{}").await.status(), 404, "no such vhost");
}

#[tokio::test]
async fn deleting_a_connection_closes_mqtt_5_with_0x98_and_amqp_with_320() {
    let server = server().await;
    let mut options = v5::options(&server, "five");
    options.set_credentials("admin", PASSWORD);
    let (mut five, _) = v5::Client::connect(options).await;
    let conn = amqp(&server, "billing").await;
    let mut events = conn.events_listener();

    let list = get_json(&server, "/api/connections").await;
    let name_of = |pick: &dyn Fn(&Value) -> bool| -> String {
        let c = list.as_array().unwrap().iter().find(|c| pick(c)).unwrap_or_else(|| panic!("not listed: {list:#}"));
        c["name"].as_str().unwrap().to_string()
    };
    let mqtt_name = name_of(&|c| c["client_properties"]["client_id"] == "five");
    let amqp_name = name_of(&|c| c["client_properties"]["connection_name"] == "billing");
    let mqtt_entry = list.as_array().unwrap().iter().find(|c| c["name"] == mqtt_name.as_str()).unwrap();
    assert_eq!(mqtt_entry["protocol"], "MQTT 5.0");
    assert_eq!(mqtt_entry["user"], "admin");

    let client = reqwest::Client::new();
    let close = |name: String| {
        let request = client
            .delete(url(&server, &format!("/api/connections/{}", encode(&name))))
            .basic_auth("admin", Some(PASSWORD))
            .header("X-Reason", "maintenance window");
        async move { within("DELETE", request.send()).await.unwrap().status() }
    };
    assert_eq!(close(mqtt_name.clone()).await, 204);
    match five.error().await {
        rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => {
            assert_eq!(reason_code, DisconnectReasonCode::AdministrativeAction);
            assert_eq!(reason_string.as_deref(), Some("maintenance window"));
        }
        other => panic!("expected DISCONNECT 0x98, got {other:?}"),
    }
    assert_eq!(close(amqp_name).await, 204);
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
    assert!(error.to_string().contains("maintenance window"), "{error}");
    within("both gone", async {
        let mut count = server.server.broker().connections().subscribe();
        while *count.borrow_and_update() > 0 {
            count.changed().await.unwrap();
        }
    })
    .await;
    assert_eq!(close(mqtt_name).await, 404, "no longer there");
}

/// `promtool check metrics` on `text`; `None` when promtool is not installed.
fn promtool(text: &str) -> Option<(bool, String)> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    Some((
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    ))
}

#[tokio::test]
async fn metrics_pass_promtool_under_both_prefixes_and_cap_the_queues() {
    let server = server_with("metrics_max_queues = 2\n").await;
    let conn = amqp(&server, "metrics").await;
    let ch = within("channel", conn.create_channel()).await.unwrap();
    for q in ["a\"quoted\\queue", "b", "c"] {
        declare(&ch, q).await;
    }
    for _ in 0..3 {
        publish(&ch, "b", b"x").await;
    }
    let mut options = v5::options(&server, "sensor");
    options.set_credentials("admin", PASSWORD);
    let (_five, _) = v5::Client::connect(options).await;
    poll_until(&server, "/api/queues/%2F/b", Duration::from_secs(10), |q| q["messages"] == 3).await;

    let scrape = |prefix: &'static str| {
        let request = reqwest::Client::new()
            .get(url(&server, &format!("/metrics{prefix}")))
            .basic_auth("watcher", Some(PASSWORD));
        async move {
            let r = within("scrape", request.send()).await.unwrap();
            assert_eq!(r.status(), 200);
            assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
            r.text().await.unwrap()
        }
    };
    // The idle MQTT client parks once two keep alive sweeps have found it without work.
    let mqtt = server.server.mqtt().expect("the MQTT frontend").clone();
    within("the idle MQTT client parked", mqtt.parked_reaches(1)).await;
    let ferry = scrape("").await;
    let rabbit = scrape("?prefix=rabbitmq").await;
    for line in [
        "ferry_connections{protocol=\"mqtt\"} 1",
        "ferry_connections{protocol=\"amqp\"} 1",
        "ferry_queue_messages_ready{vhost=\"/\",queue=\"b\"} 3",
        "ferry_queue_messages_ready{vhost=\"/\",queue=\"a\\\"quoted\\\\queue\"} 0",
        "ferry_queues_omitted 1",
        "ferry_mqtt_connections_parked 1",
        "ferry_queues{vhost=\"/\"} 3",
        "ferry_messages_ready{vhost=\"/\"} 3",
        "ferry_alarm{resource=\"memory\"} 0",
        "ferry_store_commit_seconds_bucket{le=\"+Inf\"}",
    ] {
        assert!(ferry.contains(line), "missing {line:?} in:\n{ferry}");
    }
    assert!(ferry.contains("ferry_messages_received_total{protocol=\"amqp\"} 3"), "{ferry}");
    for line in [
        "rabbitmq_queue_messages_ready{vhost=\"/\",queue=\"b\"} 3",
        "rabbitmq_queue_messages{vhost=\"/\",queue=\"b\"} 3",
        "rabbitmq_queue_messages_unacked{vhost=\"/\",queue=\"b\"} 0",
        "rabbitmq_connections 2",
        "rabbitmq_queues 3",
        "rabbitmq_global_messages_received_total{protocol=\"amqp091\"} 3",
    ] {
        assert!(rabbit.contains(line), "missing {line:?} in:\n{rabbit}");
    }
    let bad = get_as(&server, "watcher", "/metrics?prefix=nope").await;
    assert_eq!(bad.status(), 400);
    // A management user sees only its vhosts: not the broker-wide metrics.
    assert_eq!(get_as(&server, "owner", "/metrics").await.status(), 401);

    for (name, text) in [("ferry", &ferry), ("rabbitmq", &rabbit)] {
        match promtool(text) {
            None => {
                println!("SKIPPED: promtool is not installed (apt-get install prometheus)");
                return;
            }
            Some((ok, report)) => assert!(ok, "promtool check metrics ({name}):\n{report}\n{text}"),
        }
    }
}

#[tokio::test]
async fn an_http_listener_off_loopback_without_users_is_refused() {
    let toml = "[[listeners]]\nprotocol = \"http\"\nbind = \"0.0.0.0:0\"\n";
    let dir = tempfile::tempdir().unwrap();
    let err = TestServer::start_in(dir, toml, &[]).await.expect_err("must not start");
    let text = err.to_string();
    assert!(text.contains("listeners[0] (http 0.0.0.0:0): not on loopback and no way to authenticate"), "{text}");
}

#[tokio::test]
async fn the_loopback_guest_is_an_administrator_when_no_user_is_configured() {
    let toml = "[[listeners]]\nprotocol = \"http\"\nbind = \"127.0.0.1:0\"\n";
    let server = TestServer::start(toml, &[]).await;
    let client = reqwest::Client::new();
    let r =
        within("GET", client.get(url(&server, "/api/whoami")).basic_auth("guest", Some("guest")).send()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["tags"], serde_json::json!(["administrator"]));
}

//! What the management API tests share: a server with an HTTP listener and users of each
//! RabbitMQ tag, and HTTP and AMQP helpers (reqwest, lapin).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_core::auth::PasswordHash;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::Value;

use crate::{within, TestServer};

pub const PASSWORD: &str = "s3cret";

/// Users `admin` (administrator), `watcher` (monitoring), `owner` (management) and `plain` (no
/// tag); an MQTT listener (0), an AMQP listener (1) and an HTTP listener, on loopback.
pub async fn server_with(http_keys: &str) -> TestServer {
    let hash = PasswordHash::argon2id(PASSWORD.as_bytes());
    let user = |name: &str, tags: &str| format!("[[users]]\nname = \"{name}\"\npassword_hash = \"{hash}\"\n{tags}");
    let toml = format!(
        "{}{}{}{}\
         [[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"http\"\nbind = \"127.0.0.1:0\"\n{http_keys}",
        user("admin", "tags = [\"administrator\"]\n"),
        user("watcher", "tags = [\"monitoring\"]\n"),
        user("owner", "tags = [\"management\"]\n"),
        user("plain", ""),
    );
    let frontends = ferry_server::frontends::builtin(&Default::default());
    TestServer::start(&toml, &frontends).await
}

pub async fn server() -> TestServer {
    server_with("").await
}

pub fn http(server: &TestServer) -> SocketAddr {
    server.server.http_addrs()[0]
}

pub fn url(server: &TestServer, path: &str) -> String {
    format!("http://{}{path}", http(server))
}

/// Every byte but letters and digits percent-encoded (a path segment).
pub fn encode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

pub async fn get_as(server: &TestServer, user: &str, path: &str) -> reqwest::Response {
    let client = reqwest::Client::new();
    within(path, client.get(url(server, path)).basic_auth(user, Some(PASSWORD)).send()).await.expect("GET")
}

/// GETs `path` as `admin`, expecting 200 and JSON.
pub async fn get_json(server: &TestServer, path: &str) -> Value {
    let r = get_as(server, "admin", path).await;
    assert_eq!(r.status(), 200, "GET {path}");
    within("body", r.json::<Value>()).await.expect("JSON")
}

pub async fn amqp(server: &TestServer, name: &str) -> lapin::Connection {
    let uri = format!("amqp://admin:{PASSWORD}@{}/%2f", server.addr(1));
    let properties = lapin::ConnectionProperties::default().with_connection_name(name.into());
    within("lapin connects", lapin::Connection::connect(&uri, properties)).await.expect("connect")
}

pub async fn declare(ch: &lapin::Channel, queue: &str) {
    within("declare", ch.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .expect("queue.declare");
}

pub async fn publish(ch: &lapin::Channel, queue: &str, body: &[u8]) {
    within(
        "publish",
        ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, BasicProperties::default()),
    )
    .await
    .expect("basic.publish");
}

/// Polls `path` (as admin) until `done` holds for its JSON, for at most `limit`.
pub async fn poll_until(server: &TestServer, path: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = get_json(server, path).await;
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "GET {path}: not as expected within {limit:?}; last answer:\n{v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `rabbitmqadmin` script of Debian's rabbitmq-server package (RabbitMQ 3.10.8).
pub const RABBITMQADMIN: &str =
    "/usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8/plugins/rabbitmq_management-3.10.8/priv/www/cli/rabbitmqadmin";

/// Runs RabbitMQ's `rabbitmqadmin` against `server`'s first HTTP listener as `user` /
/// `password`, off the runtime's threads (the server is in this process); `None` when it is not
/// installed.
pub async fn rabbitmqadmin(
    server: &TestServer,
    user: &str,
    password: &str,
    args: &[&str],
) -> Option<std::process::Output> {
    if !std::path::Path::new(RABBITMQADMIN).exists() {
        eprintln!("SKIPPED: {RABBITMQADMIN} is not installed (`apt-get install -y rabbitmq-server`)");
        return None;
    }
    let port = server.server.http_addrs()[0].port().to_string();
    let login: Vec<String> = ["-H", "127.0.0.1", "-P", &port, "-u", user, "-p", password].map(String::from).into();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(RABBITMQADMIN)
            .args(&login)
            .args(&args)
            .output()
            .expect("run rabbitmqadmin")
    });
    Some(within("rabbitmqadmin", run).await.expect("rabbitmqadmin task"))
}

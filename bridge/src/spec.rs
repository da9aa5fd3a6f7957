//! A `[[bridges]]` table as its keys are written — TOML in the server's file, JSON through the
//! management API (`PUT /api/bridges/{name}`) — and the checks that make it a [`BridgeConfig`]:
//! one set of serde types and one set of checks for both, so a bridge is accepted or refused
//! the same way wherever it comes from. The shovels' `tls` and password keys share
//! [`RawBridgeTls`], [`remote_tls`] and [`remote_password`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::{BridgeConfig, Overflow};

/// What checking a table needs from where it came from.
pub trait Checker {
    /// Records a problem with `key`; checking goes on.
    fn report_problem(&self, key: String, reason: String);
    /// A file named for `key`, as it will be opened; `None` when refused (reported).
    fn path(&self, key: &str, p: PathBuf) -> Option<PathBuf>;
    /// The vhost named for `key` (the default one when `None`); `None` when refused (reported).
    fn vhost(&self, key: String, vhost: Option<String>) -> Option<String>;
}

fn report(c: &dyn Checker, key: impl Into<String>, reason: impl Into<String>) {
    c.report_problem(key.into(), reason.into());
}

/// A bridge's or shovel's `overflow` value.
pub fn overflow(value: &str) -> Option<Overflow> {
    match value {
        "drop-oldest" => Some(Overflow::DropOldest),
        "block" => Some(Overflow::Block),
        _ => None,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBridge {
    pub name: String,
    pub address: RawAddress,
    pub round_robin: Option<bool>,
    pub primary_retry_ms: Option<u64>,
    pub tls: Option<RawBridgeTls>,
    pub protocol_version: Option<String>,
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    pub keep_alive: Option<u16>,
    pub clean_session: Option<bool>,
    pub try_private: Option<bool>,
    pub vhost: Option<String>,
    pub exchange: Option<String>,
    #[serde(default)]
    pub topics: Vec<RawTopicRule>,
    pub max_hops: Option<u32>,
    pub start_type: Option<String>,
    pub threshold: Option<u32>,
    pub idle_timeout: Option<u64>,
    pub notifications: Option<bool>,
    pub notifications_local_only: Option<bool>,
    pub notification_topic: Option<String>,
    pub max_queued_messages: Option<u32>,
    pub max_queued_bytes: Option<u64>,
    pub overflow: Option<String>,
    pub max_inflight: Option<u16>,
    pub reconnect_initial_ms: Option<u64>,
    pub reconnect_max_ms: Option<u64>,
    pub connect_timeout_secs: Option<u64>,
}

/// `address`: one `host:port`, or the remote's list (Mosquitto's `address a:1883 b:1883`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawAddress {
    One(String),
    Many(Vec<String>),
}

impl RawAddress {
    fn list(&self) -> Vec<&str> {
        match self {
            RawAddress::One(s) => vec![s.as_str()],
            RawAddress::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBridgeTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTopicRule {
    pub pattern: String,
    pub direction: String,
    pub qos: Option<u8>,
    #[serde(default)]
    pub local_prefix: String,
    #[serde(default)]
    pub remote_prefix: String,
}

/// A bridge's or shovel's password source: a file or an environment variable, not both.
pub fn remote_password(
    c: &dyn Checker,
    key: &dyn Fn(&str) -> String,
    file: Option<PathBuf>,
    env: Option<String>,
) -> Option<crate::PasswordSource> {
    match (file, env) {
        (Some(_), Some(_)) => {
            report(c, key("password_file"), "give password_file or password_env, not both");
            None
        }
        (Some(file), None) => c.path(&key("password_file"), file).map(crate::PasswordSource::File),
        (None, Some(var)) if var.is_empty() => {
            report(c, key("password_env"), "must not be empty");
            None
        }
        (None, Some(var)) => Some(crate::PasswordSource::Env(var)),
        (None, None) => None,
    }
}

/// A bridge's or shovel's `tls` table. No `ca`: the system's trusted CAs; a `ca` that does
/// not resolve is reported (and leaves TLS unconfigured).
pub fn remote_tls(c: &dyn Checker, key: &dyn Fn(&str) -> String, t: RawBridgeTls) -> Option<crate::BridgeTls> {
    let ca = t.ca.map(|ca| c.path(&key("tls.ca"), ca));
    let client_cert = match (t.cert, t.key) {
        (None, None) => None,
        (Some(cert), Some(k)) => {
            let cert = c.path(&key("tls.cert"), cert);
            let k = c.path(&key("tls.key"), k);
            cert.zip(k)
        }
        (Some(_), None) => {
            report(c, key("tls.key"), "a client certificate needs its key");
            None
        }
        (None, Some(_)) => {
            report(c, key("tls.cert"), "a key needs its client certificate");
            None
        }
    };
    if t.server_name.as_deref() == Some("") {
        report(c, key("tls.server_name"), "must not be empty");
    }
    match ca {
        Some(None) => None,
        Some(Some(ca)) => Some(crate::BridgeTls { ca: Some(ca), client_cert, server_name: t.server_name }),
        None => Some(crate::BridgeTls { ca: None, client_cert, server_name: t.server_name }),
    }
}

/// One `[[bridges]]` table, checked (`key` names its keys in problems: `bridges[0].address`).
/// Unique names are the caller's to check.
pub fn bridge(c: &dyn Checker, key: &dyn Fn(&str) -> String, raw: RawBridge) -> BridgeConfig {
    let name_ok =
        !raw.name.is_empty() && raw.name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !name_ok {
        report(c, key("name"), "must be non-empty letters, digits, '-', '_' or '.'");
    }
    let addresses = raw.address.list();
    let mut b = crate::BridgeConfig::new(&raw.name, addresses.first().copied().unwrap_or_default());
    if addresses.is_empty() {
        report(c, key("address"), "at least one host:port is required");
    }
    for (i, a) in addresses.iter().enumerate() {
        let akey = || match raw.address {
            RawAddress::One(_) => key("address"),
            RawAddress::Many(_) => key(&format!("address[{i}]")),
        };
        match a.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => report(c, akey(), format!("{a:?} is not host:port")),
        }
        if addresses[..i].contains(a) {
            report(c, akey(), format!("{a:?} is listed twice"));
        }
    }
    b.alternates = addresses.iter().skip(1).map(|a| a.to_string()).collect();
    if let Some(r) = raw.round_robin {
        b.round_robin = r;
    }
    if let Some(ms) = raw.primary_retry_ms {
        if ms == 0 {
            report(c, key("primary_retry_ms"), "must be at least 1");
        }
        b.primary_retry = Duration::from_millis(ms);
    }
    match raw.protocol_version.as_deref() {
        None | Some("5") | Some("5.0") => b.version = ferry_mqtt::codec::ProtocolVersion::V5,
        Some("3.1.1") => b.version = ferry_mqtt::codec::ProtocolVersion::V311,
        Some(other) => report(c, key("protocol_version"), format!("{other:?}: expected \"5.0\" or \"3.1.1\"")),
    }
    if let Some(id) = raw.client_id {
        if id.is_empty() || id.len() > 65_535 {
            report(c, key("client_id"), "must not be empty");
        }
        b.client_id = id;
    }
    if let Some(t) = raw.tls {
        b.tls = remote_tls(c, &key, t);
    }
    b.username = raw.username;
    b.password = remote_password(c, &key, raw.password_file, raw.password_env);
    if b.password.is_some() && b.username.is_none() && !b.version.is_v5() {
        report(c, key("username"), "MQTT 3.1.1 sends a password only with a user name");
    }
    if let Some(k) = raw.keep_alive {
        b.keep_alive = k;
    }
    if let Some(c) = raw.clean_session {
        b.clean_session = c;
    }
    if let Some(t) = raw.try_private {
        b.try_private = t;
    }
    if let Some(v) = c.vhost(key("vhost"), raw.vhost) {
        b.vhost = v;
    }
    if let Some(x) = raw.exchange {
        if x.is_empty() {
            report(c, key("exchange"), "must not be empty");
        }
        b.exchange = x;
    }
    if raw.topics.is_empty() {
        report(c, key("topics"), "at least one topic rule is required");
    }
    for (t, rule) in raw.topics.into_iter().enumerate() {
        let tkey = |k: &str| key(&format!("topics[{t}].{k}"));
        let direction = match rule.direction.as_str() {
            "out" => crate::Direction::Out,
            "in" => crate::Direction::In,
            "both" => crate::Direction::Both,
            other => {
                report(c, tkey("direction"), format!("{other:?}: expected \"out\", \"in\" or \"both\""));
                continue;
            }
        };
        let Some(qos) = ferry_mqtt::codec::QoS::from_u8(rule.qos.unwrap_or(1)) else {
            report(c, tkey("qos"), "must be 0, 1 or 2");
            continue;
        };
        for (k, prefix) in [("local_prefix", &rule.local_prefix), ("remote_prefix", &rule.remote_prefix)] {
            if prefix.contains(['+', '#']) {
                report(c, tkey(k), "must not contain wildcards");
            }
        }
        for text in
            [format!("{}{}", rule.local_prefix, rule.pattern), format!("{}{}", rule.remote_prefix, rule.pattern)]
        {
            if let Err(e) = ferry_mqtt::topic::check_filter(&text) {
                report(c, tkey("pattern"), format!("{text:?}: {e}"));
            } else if text.starts_with("$share/") {
                report(c, tkey("pattern"), format!("{text:?}: shared subscriptions cannot be bridged"));
            }
        }
        b.topics.push(crate::TopicRule {
            pattern: rule.pattern,
            direction,
            qos,
            local_prefix: rule.local_prefix,
            remote_prefix: rule.remote_prefix,
        });
    }
    if let Some(h) = raw.max_hops {
        if h == 0 {
            report(c, key("max_hops"), "must be at least 1 (0 would forward nothing)");
        }
        b.max_hops = h;
    }
    match raw.start_type.as_deref() {
        None | Some("automatic") => {}
        Some("lazy") => b.start_type = crate::StartType::Lazy,
        Some("once") => b.start_type = crate::StartType::Once,
        Some(other) => report(c, key("start_type"), format!("{other:?}: expected \"automatic\", \"lazy\" or \"once\"")),
    }
    if let Some(t) = raw.threshold {
        if t == 0 {
            report(c, key("threshold"), "must be at least 1");
        }
        b.threshold = t;
    }
    if let Some(s) = raw.idle_timeout {
        if s == 0 {
            report(c, key("idle_timeout"), "must be at least 1");
        }
        b.idle_timeout = Duration::from_secs(s);
    }
    if b.start_type == crate::StartType::Lazy && !b.topics.iter().any(|t| t.direction.is_out()) {
        report(
            c,
            key("start_type"),
            "a lazy bridge connects when messages wait to go out: it needs an \"out\" or \"both\" rule",
        );
    }
    if let Some(n) = raw.notifications {
        b.notifications = n;
    }
    if let Some(n) = raw.notifications_local_only {
        b.notifications_local_only = n;
    }
    if let Some(t) = raw.notification_topic {
        if let Err(e) = ferry_mqtt::topic::check_topic_name(&t) {
            report(c, key("notification_topic"), format!("{t:?}: {e}"));
        }
        b.notification_topic = Some(t);
    }
    if let Some(m) = raw.max_queued_messages {
        b.max_queued_messages = m;
    }
    if let Some(m) = raw.max_queued_bytes {
        b.max_queued_bytes = m;
    }
    if let Some(o) = raw.overflow.as_deref() {
        match overflow(o) {
            Some(o) => b.overflow = o,
            None => report(c, key("overflow"), format!("{o:?}: expected \"drop-oldest\" or \"block\"")),
        }
    }
    if let Some(m) = raw.max_inflight {
        if m == 0 {
            report(c, key("max_inflight"), "must be at least 1");
        }
        b.max_inflight = m;
    }
    if let Some(ms) = raw.reconnect_initial_ms {
        if ms == 0 {
            report(c, key("reconnect_initial_ms"), "must be at least 1");
        }
        b.backoff_initial = Duration::from_millis(ms);
    }
    if let Some(ms) = raw.reconnect_max_ms {
        b.backoff_max = Duration::from_millis(ms);
    }
    if b.backoff_max < b.backoff_initial {
        report(c, key("reconnect_max_ms"), "must not be below reconnect_initial_ms");
    }
    if let Some(s) = raw.connect_timeout_secs {
        if s == 0 {
            report(c, key("connect_timeout_secs"), "must be at least 1");
        }
        b.connect_timeout = Duration::from_secs(s);
    }
    b
}

//! A `[[shovels]]` table as its keys are written — TOML in the server's file — and the checks
//! that make it a [`ShovelConfig`]. The management API's dynamic shovels (RabbitMQ's
//! `PUT /api/parameters/shovel/{vhost}/{name}`, [`super::dynamic`]) are mapped onto the same
//! table and go through the same checks, so a shovel is accepted or refused the same way
//! wherever it comes from.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{AckMode, AmqpUri, Destination, ShovelConfig, ShovelDirection, Source};
use crate::spec::{overflow, remote_password, remote_tls, Checker, RawBridgeTls};

fn report(c: &dyn Checker, key: impl Into<String>, reason: impl Into<String>) {
    c.report_problem(key.into(), reason.into());
}

/// `src_uri` / `dest_uri`: one URI, or the remote's list (the nodes of a cluster).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawUri {
    One(String),
    Many(Vec<String>),
}

impl RawUri {
    fn is_local(&self) -> bool {
        matches!(self, RawUri::One(s) if s == "local")
    }
    fn list(&self) -> Vec<&str> {
        match self {
            RawUri::One(s) => vec![s.as_str()],
            RawUri::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

impl From<&str> for RawUri {
    fn from(s: &str) -> RawUri {
        RawUri::One(s.to_string())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShovel {
    pub name: String,
    pub src_uri: RawUri,
    pub dest_uri: RawUri,
    pub src_queue: Option<String>,
    pub src_exchange: Option<String>,
    pub src_exchange_key: Option<String>,
    pub dest_queue: Option<String>,
    pub dest_exchange: Option<String>,
    pub dest_exchange_key: Option<String>,
    /// RabbitMQ's `src-queue-args` / `dest-queue-args`: a TOML table (or JSON object).
    pub src_queue_args: Option<serde_json::Map<String, serde_json::Value>>,
    pub dest_queue_args: Option<serde_json::Map<String, serde_json::Value>>,
    pub src_predeclared: Option<bool>,
    pub dest_predeclared: Option<bool>,
    /// RabbitMQ's `dest-publish-properties`: a TOML table (or JSON object).
    pub dest_publish_properties: Option<serde_json::Map<String, serde_json::Value>>,
    pub ack_mode: Option<String>,
    pub prefetch_count: Option<u16>,
    pub add_forward_headers: Option<bool>,
    pub max_hops: Option<u32>,
    pub max_queued_messages: Option<u32>,
    pub max_queued_bytes: Option<u64>,
    pub overflow: Option<String>,
    pub vhost: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    pub tls: Option<RawBridgeTls>,
    pub heartbeat_secs: Option<u16>,
    pub reconnect_initial_ms: Option<u64>,
    pub reconnect_max_ms: Option<u64>,
    pub connect_timeout_secs: Option<u64>,
}

/// One `[[shovels]]` table, checked (`key` names its keys in problems: `shovels[0].src_uri`);
/// `None` when it is refused outright (every problem reported). Unique names are the caller's
/// to check.
pub fn shovel(c: &dyn Checker, key: &dyn Fn(&str) -> String, raw: RawShovel) -> Option<ShovelConfig> {
    let name_ok =
        !raw.name.is_empty() && raw.name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !name_ok {
        report(c, key("name"), "must be non-empty letters, digits, '-', '_' or '.'");
    }
    let uri = |k: &str, text: &str| match AmqpUri::parse(text) {
        Ok(u) => Some(u),
        // A URI holding a password is not repeated (the password would be in the log).
        Err(e @ crate::shovel::UriError::Password) => {
            report(c, key(k), format!("the URI {e}"));
            None
        }
        Err(e) => {
            report(c, key(k), format!("{text:?} {e}"));
            None
        }
    };
    let (direction, remote_key, uris) = match (raw.src_uri.is_local(), raw.dest_uri.is_local()) {
        (true, true) => {
            report(c, key("dest_uri"), "one side must be a remote amqp:// or amqps:// URI");
            (ShovelDirection::Out, "dest_uri", Vec::new())
        }
        (true, false) => (ShovelDirection::Out, "dest_uri", raw.dest_uri.list()),
        (false, true) => (ShovelDirection::In, "src_uri", raw.src_uri.list()),
        (false, false) => {
            report(c, key("src_uri"), "one side must be \"local\" (this broker)");
            (ShovelDirection::Out, "src_uri", Vec::new())
        }
    };
    // The remote: one URI or a list, all of one scheme and one query (they share the TLS
    // files, the heartbeat and the login).
    let one_remote = raw.src_uri.is_local() != raw.dest_uri.is_local();
    if one_remote && uris.is_empty() {
        report(c, key(remote_key), "an empty list: give the remote's URI, or a list of them");
    }
    let parsed: Vec<Option<AmqpUri>> = uris.iter().map(|text| uri(remote_key, text)).collect();
    let (remote, alternates) = match parsed.split_first() {
        Some((Some(first), rest)) if rest.iter().all(Option::is_some) => {
            let rest: Vec<AmqpUri> = rest.iter().flatten().cloned().collect();
            if rest.iter().any(|u| u.tls != first.tls || u.query != first.query) {
                report(
                    c,
                    key(remote_key),
                    "the URIs of a list must have the same scheme and query (they share the TLS files, \
                     the heartbeat and the login); host, port, user and vhost may differ",
                );
            }
            (Some(first.clone()), rest)
        }
        _ => (None, Vec::new()),
    };
    let source = match (raw.src_queue, raw.src_exchange) {
        (Some(q), None) if !q.is_empty() => {
            if raw.src_exchange_key.is_some() {
                report(c, key("src_exchange_key"), "goes with src_exchange, not src_queue");
            }
            Some(Source::Queue(q))
        }
        (None, Some(x)) => {
            Some(Source::Exchange { exchange: x, key: raw.src_exchange_key.unwrap_or_else(|| "#".into()) })
        }
        (Some(_), Some(_)) => {
            report(c, key("src_queue"), "give src_queue or src_exchange, not both");
            None
        }
        (Some(_), None) => {
            report(c, key("src_queue"), "must not be empty");
            None
        }
        (None, None) => {
            report(c, key("src_queue"), "give src_queue or src_exchange (with src_exchange_key)");
            None
        }
    };
    let destination = match (raw.dest_queue, raw.dest_exchange) {
        (Some(_), Some(_)) => {
            report(c, key("dest_queue"), "give dest_queue or dest_exchange, not both");
            Destination::AsPublished
        }
        (Some(q), None) => {
            if raw.dest_exchange_key.is_some() {
                report(c, key("dest_exchange_key"), "goes with dest_exchange, not dest_queue");
            }
            Destination::Queue(q)
        }
        (None, Some(x)) => Destination::Exchange { exchange: x, key: raw.dest_exchange_key },
        (None, None) => {
            if raw.dest_exchange_key.is_some() {
                report(c, key("dest_exchange_key"), "goes with dest_exchange");
            }
            Destination::AsPublished
        }
    };
    // Queue arguments and `predeclared` are about a named queue.
    let src_named = matches!(source, Some(Source::Queue(_)));
    let dest_named = matches!(destination, Destination::Queue(_));
    for (k, set, named, goes) in [
        ("src_queue_args", raw.src_queue_args.is_some(), src_named, "src_queue"),
        ("src_predeclared", raw.src_predeclared.is_some(), src_named, "src_queue"),
        ("dest_queue_args", raw.dest_queue_args.is_some(), dest_named, "dest_queue"),
        ("dest_predeclared", raw.dest_predeclared.is_some(), dest_named, "dest_queue"),
    ] {
        if set && !named {
            report(c, key(k), format!("goes with {goes}"));
        }
    }
    let (Some(remote), Some(source)) = (remote, source) else { return None };
    let mut s = ShovelConfig::new(&raw.name, direction, remote, source);
    s.alternates = alternates.into_iter().map(|uri| super::Alternate { uri, password: None }).collect();
    s.destination = destination;
    let args = |m: Option<serde_json::Map<String, serde_json::Value>>| {
        m.map(|m| super::args::json_table(&m)).unwrap_or_default()
    };
    s.src_queue_args = args(raw.src_queue_args);
    s.dest_queue_args = args(raw.dest_queue_args);
    if let Some(m) = raw.dest_publish_properties {
        match super::args::publish_properties(&m) {
            Ok(_) if m.is_empty() => {}
            Ok(p) => s.publish_properties = Some(p),
            Err(problems) => {
                for problem in problems {
                    report(c, key("dest_publish_properties"), problem);
                }
            }
        }
    }
    s.src_predeclared = raw.src_predeclared.unwrap_or(false);
    s.dest_predeclared = raw.dest_predeclared.unwrap_or(false);
    if let Some(m) = raw.ack_mode {
        match AckMode::parse(&m) {
            Some(m) => s.ack_mode = m,
            None => report(c, key("ack_mode"), format!("{m:?}: expected \"on-confirm\", \"on-publish\" or \"no-ack\"")),
        }
    }
    if let Some(p) = raw.prefetch_count {
        if p == 0 {
            report(c, key("prefetch_count"), "must be at least 1");
        }
        s.prefetch = p;
    }
    s.add_forward_headers = raw.add_forward_headers.unwrap_or(false);
    if let Some(h) = raw.max_hops {
        if h == 0 {
            report(c, key("max_hops"), "must be at least 1 (0 would shovel nothing)");
        }
        s.max_hops = h;
    }
    // The limits are those of the shovel's own backlog; a source queue has its own.
    let own_backlog =
        matches!(s.source, crate::shovel::Source::Exchange { .. }) && s.direction == crate::ShovelDirection::Out;
    for (k, set) in [
        ("max_queued_messages", raw.max_queued_messages.is_some()),
        ("max_queued_bytes", raw.max_queued_bytes.is_some()),
        ("overflow", raw.overflow.is_some()),
    ] {
        if set && !own_backlog {
            report(
                c,
                key(k),
                "limits the backlog of a shovel from a local exchange (src_uri = \"local\", src_exchange); \
                 a source queue keeps its own limits (x-max-length)",
            );
        }
    }
    if let Some(m) = raw.max_queued_messages {
        s.max_queued_messages = m;
    }
    if let Some(m) = raw.max_queued_bytes {
        s.max_queued_bytes = m;
    }
    if let Some(o) = raw.overflow.as_deref() {
        match overflow(o) {
            Some(o) => s.overflow = o,
            None => report(c, key("overflow"), format!("{o:?}: expected \"drop-oldest\" or \"block\"")),
        }
    }
    if let Some(v) = c.vhost(key("vhost"), raw.vhost) {
        s.vhost = v;
    }
    s.password = remote_password(c, &key, raw.password_file, raw.password_env);
    // RabbitMQ's URI carries TLS files in its query; Ferry's `tls` table is the other way
    // to say them, not both.
    let q = s.remote.query.clone();
    let uri_key = if s.direction == crate::ShovelDirection::Out { "dest_uri" } else { "src_uri" };
    let uri_tls = q.has_tls().then(|| RawBridgeTls {
        ca: q.cacertfile.map(PathBuf::from),
        cert: q.certfile.map(PathBuf::from),
        key: q.keyfile.map(PathBuf::from),
        server_name: q.server_name_indication,
    });
    let raw_tls = match (raw.tls, uri_tls) {
        (Some(_), Some(_)) => {
            report(c, key("tls"), format!("the {uri_key} query gives TLS files too: give them in one place"));
            None
        }
        (t, u) => t.or(u),
    };
    match (raw_tls, s.remote.tls) {
        (Some(t), true) => s.tls = remote_tls(c, &key, t),
        (Some(_), false) => report(c, key("tls"), "is for an amqps:// remote; this one is amqp://"),
        // amqps:// without a table: the system's trusted CAs, no client certificate.
        (None, true) => s.tls = Some(crate::BridgeTls { ca: None, client_cert: None, server_name: None }),
        (None, false) => {}
    }
    if let Some(h) = raw.heartbeat_secs {
        if s.remote.query.heartbeat.is_some_and(|u| u != h) {
            report(c, key("heartbeat_secs"), format!("the {uri_key} query says another heartbeat"));
        }
        s.heartbeat = h;
    }
    if s.auth_mechanisms.contains(&crate::shovel::AuthMechanism::External)
        && s.tls.as_ref().is_none_or(|t| t.client_cert.is_none())
    {
        report(
            c,
            key(uri_key),
            "auth_mechanism=external logs in with a TLS client certificate: an amqps:// remote and a \
             certificate (tls.cert / tls.key, or certfile / keyfile in the query)",
        );
    }
    if let Some(ms) = raw.reconnect_initial_ms {
        if ms == 0 {
            report(c, key("reconnect_initial_ms"), "must be at least 1");
        }
        s.backoff_initial = Duration::from_millis(ms);
    }
    if let Some(ms) = raw.reconnect_max_ms {
        s.backoff_max = Duration::from_millis(ms);
    }
    if s.backoff_max < s.backoff_initial {
        report(c, key("reconnect_max_ms"), "must not be below reconnect_initial_ms");
    }
    if let Some(secs) = raw.connect_timeout_secs {
        if s.remote.query.connection_timeout.is_some_and(|u| u != Duration::from_secs(secs)) {
            report(c, key("connect_timeout_secs"), format!("the {uri_key} query says another connection_timeout"));
        }
        if secs == 0 {
            report(c, key("connect_timeout_secs"), "must be at least 1");
        }
        s.connect_timeout = Duration::from_secs(secs);
    }
    Some(s)
}

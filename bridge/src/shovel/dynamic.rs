//! RabbitMQ's dynamic shovels: the `value` of a runtime parameter of component `shovel`
//! (`PUT /api/parameters/shovel/{vhost}/{name}`, RabbitMQ 3.10's keys: `src-uri`, `src-queue`,
//! `dest-exchange`, `ack-mode`...) mapped onto a `[[shovels]]` table ([`super::spec`]) and
//! checked as the file's are.
//!
//! What differs from the file: a URI may carry its password (`amqp://user:secret@host`), as
//! RabbitMQ's do; it is taken out of the URI into [`PasswordSource::Inline`] and never printed
//! (the stored value keeps it as given). A URI without a host (`amqp://`, `amqp:///vhost`) is
//! the local broker, in the vhost of its path or else the parameter's. `src-uri` and `dest-uri`
//! may be lists, as RabbitMQ allows (a cluster's nodes): each URI keeps its own password, and each
//! connect picks one (see [`ShovelConfig::alternates`]).
//! Keys and values Ferry does not take are refused by name, never ignored.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Map, Value};

use super::spec::{RawShovel, RawUri};
use super::{DeleteAfter, ShovelConfig};
use crate::config::PasswordSource;
use crate::spec::Checker;

/// The keys Ferry takes (RabbitMQ 3.10's dynamic shovel, AMQP 0-9-1 on both sides).
pub const KEYS: &[&str] = &[
    "src-uri",
    "src-protocol",
    "src-queue",
    "src-exchange",
    "src-exchange-key",
    "src-prefetch-count",
    "src-delete-after",
    "src-queue-args",
    "src-predeclared",
    "dest-uri",
    "dest-protocol",
    "dest-queue",
    "dest-exchange",
    "dest-exchange-key",
    "dest-queue-args",
    "dest-predeclared",
    "dest-add-forward-headers",
    "add-forward-headers",
    "dest-add-timestamp-header",
    "dest-publish-properties",
    "ack-mode",
    "reconnect-delay",
];

/// One end of a dynamic shovel.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// This broker, in this vhost.
    Local(String),
    /// Another broker: the URI without its password, and the password.
    Remote(String, Option<String>),
}

/// Decodes `%xx` in a URI part (a bad escape leaves the text as it is: the URI parser refuses
/// it later, naming it).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%').then(|| b.get(i + 1..i + 3)).flatten();
        match hex.and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

/// Splits an `amqp[s]://` URI into a local or a remote end; `vhost`: the parameter's.
fn end(uri: &str, vhost: &str) -> Result<End, String> {
    let (scheme, rest) = uri.split_once("://").ok_or("must start with amqp:// or amqps://")?;
    if scheme != "amqp" && scheme != "amqps" {
        return Err("must start with amqp:// or amqps://".into());
    }
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, after) = rest.split_at(cut);
    if authority.is_empty() {
        // RabbitMQ's direct connection to the local broker.
        let (path, query) = after.split_once('?').unwrap_or((after, ""));
        if !query.is_empty() {
            return Err("the local broker's URI takes no query parameters".into());
        }
        let path = path.strip_prefix('/').unwrap_or(path);
        return Ok(End::Local(if path.is_empty() { vhost.to_string() } else { decode(path) }));
    }
    // The user info ends at the last `@` before the query (as in `redact_uri`): a password
    // with an unescaped `/` or `@` is still taken out whole, never left in the URI.
    let head = &rest[..rest.find('?').unwrap_or(rest.len())];
    match head.rfind('@').map(|at| rest.split_at(at)) {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, password)) => Ok(End::Remote(format!("{scheme}://{user}{host}"), Some(decode(password)))),
            None => Ok(End::Remote(uri.to_string(), None)),
        },
        None => Ok(End::Remote(uri.to_string(), None)),
    }
}

/// `uri` with the password of its user info replaced by `***` (RabbitMQ's status hides it).
/// Taken up to the last `@` before the query, so that a password with an unescaped `/` or `@`
/// (a URI the parser then refuses) is hidden too; at worst more than the password is.
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else { return uri.to_string() };
    let head = &rest[..rest.find('?').unwrap_or(rest.len())];
    match head.rfind('@').map(|at| rest.split_at(at)) {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***{host}"),
            None => uri.to_string(),
        },
        None => uri.to_string(),
    }
}

/// A parameter's value with every URI's password replaced by `***`.
pub fn redact(value: &Value) -> Value {
    let mut v = value.clone();
    if let Some(o) = v.as_object_mut() {
        for k in ["src-uri", "dest-uri"] {
            match o.get_mut(k) {
                Some(Value::String(s)) => *s = redact_uri(s),
                Some(Value::Array(list)) => {
                    for u in list.iter_mut() {
                        if let Value::String(s) = u {
                            *s = redact_uri(s);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    v
}

/// The file's keys as RabbitMQ names them, each before the keys it contains (for [`parse`]'s reasons).
const FILE_KEYS: &[(&str, &str)] = &[
    ("dest_publish_properties", "dest-publish-properties"),
    ("src_queue_args", "src-queue-args"),
    ("dest_queue_args", "dest-queue-args"),
    ("src_predeclared", "src-predeclared"),
    ("dest_predeclared", "dest-predeclared"),
    ("src_exchange_key", "src-exchange-key"),
    ("dest_exchange_key", "dest-exchange-key"),
    ("src_exchange", "src-exchange"),
    ("dest_exchange", "dest-exchange"),
    ("src_queue", "src-queue"),
    ("dest_queue", "dest-queue"),
    ("src_uri", "src-uri"),
    ("dest_uri", "dest-uri"),
    ("prefetch_count", "src-prefetch-count"),
];

/// The name RabbitMQ gives the key Ferry's file names `k` (for problems).
fn rabbit_key(k: &str) -> String {
    match k {
        "prefetch_count" => "src-prefetch-count".into(),
        "add_forward_headers" => "dest-add-forward-headers".into(),
        "vhost" => "src-uri".into(),
        "name" => "name".into(),
        other => other.replace('_', "-"),
    }
}

/// Problems found while checking, as `key: reason`.
#[derive(Default)]
struct Problems(Mutex<Vec<String>>);

impl Problems {
    fn add(&self, key: &str, reason: impl Into<String>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{key}: {}", reason.into()));
    }
}

impl Checker for Problems {
    fn report_problem(&self, key: String, reason: String) {
        self.add(&key, reason);
    }
    fn path(&self, key: &str, p: PathBuf) -> Option<PathBuf> {
        if p.is_absolute() {
            Some(p)
        } else {
            self.add(key, format!("{}: give an absolute path", p.display()));
            None
        }
    }
    fn vhost(&self, key: String, vhost: Option<String>) -> Option<String> {
        match vhost {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                self.add(&key, "the local vhost must not be empty");
                None
            }
        }
    }
}

fn string(o: &Map<String, Value>, k: &str, p: &Problems) -> Option<String> {
    match o.get(k)? {
        Value::String(s) => Some(s.clone()),
        other => {
            p.add(k, format!("{other} is not a string"));
            None
        }
    }
}

fn boolean(o: &Map<String, Value>, k: &str, p: &Problems) -> Option<bool> {
    match o.get(k)? {
        Value::Bool(b) => Some(*b),
        other => {
            p.add(k, format!("{other} is not true or false"));
            None
        }
    }
}

fn object(o: &Map<String, Value>, k: &str, p: &Problems) -> Option<Map<String, Value>> {
    match o.get(k)? {
        Value::Object(m) => Some(m.clone()),
        other => {
            p.add(k, format!("{other} is not a JSON object"));
            None
        }
    }
}

/// `src-uri` / `dest-uri`: a string, or a non-empty list of them.
fn uri(o: &Map<String, Value>, k: &str, p: &Problems) -> Option<Vec<String>> {
    match o.get(k) {
        None => {
            p.add(k, "is required");
            None
        }
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(Value::Array(list)) if !list.is_empty() && list.iter().all(Value::is_string) => {
            Some(list.iter().filter_map(Value::as_str).map(str::to_string).collect())
        }
        Some(_) => {
            p.add(k, "a URI or a non-empty list of URIs");
            None
        }
    }
}

/// A dynamic shovel's value → its configuration, with the file's checks; `vhost` and `name`
/// are the parameter's. The reason lists every problem, naming RabbitMQ's keys; it never
/// holds a password.
pub fn parse(vhost: &str, name: &str, value: &Value) -> Result<ShovelConfig, String> {
    let o = value.as_object().ok_or("value: a shovel's value is a JSON object")?;
    let p = Problems::default();
    let unknown: Vec<&str> = o.keys().map(String::as_str).filter(|k| !KEYS.contains(k)).collect();
    if !unknown.is_empty() {
        p.add(&unknown.join(", "), format!("not a key Ferry's shovels take (they take {})", KEYS.join(", ")));
    }
    for k in ["src-protocol", "dest-protocol"] {
        if let Some(proto) = string(o, k, &p) {
            if proto != "amqp091" {
                p.add(k, format!("{proto:?}: Ferry's shovels speak AMQP 0-9-1 only (\"amqp091\")"));
            }
        }
    }
    let src = uri(o, "src-uri", &p);
    let dest = uri(o, "dest-uri", &p);
    let mut local_vhost = None;
    // The remote's URIs' passwords, in the list's order.
    let mut passwords = Vec::new();
    let mut side = |k: &str, list: Option<Vec<String>>| -> Option<RawUri> {
        let list = list?;
        let mut remotes = Vec::new();
        for u in &list {
            match end(u, vhost) {
                Ok(End::Local(v)) if list.len() == 1 => {
                    local_vhost = Some(v);
                    return Some(RawUri::from("local"));
                }
                Ok(End::Local(_)) => {
                    p.add(k, "this broker (a URI without a host) cannot be one of a list of remotes");
                    return None;
                }
                Ok(End::Remote(u, pw)) => {
                    passwords.push(pw);
                    remotes.push(u);
                }
                Err(why) => {
                    p.add(k, format!("{:?} {why}", redact_uri(u)));
                    return None;
                }
            }
        }
        Some(if remotes.len() == 1 { RawUri::One(remotes.remove(0)) } else { RawUri::Many(remotes) })
    };
    let (src_uri, dest_uri) = (side("src-uri", src), side("dest-uri", dest));
    let local = |u: &Option<RawUri>| u.as_ref().map(|u| *u == RawUri::from("local"));
    match (local(&src_uri), local(&dest_uri)) {
        (Some(true), Some(true)) => p.add(
            "dest-uri",
            "both ends are this broker: Ferry's shovels move messages between this broker and another one \
             (one of src-uri and dest-uri must name a remote host)",
        ),
        (Some(false), Some(false)) => p.add(
            "src-uri",
            "both ends are other brokers: one of src-uri and dest-uri must be this broker (amqp:// without a host)",
        ),
        _ => {}
    }
    let delete_after = match o.get("src-delete-after") {
        None => None,
        Some(v) if v == "never" => None,
        Some(v) if v == "queue-length" => Some(DeleteAfter::QueueLength),
        Some(v) => match v.as_u64() {
            Some(n) => Some(DeleteAfter::Messages(n)),
            None => {
                p.add("src-delete-after", format!("{v}: \"never\", \"queue-length\" or a number of messages"));
                None
            }
        },
    };
    let prefetch = match o.get("src-prefetch-count") {
        None => None,
        Some(v) => match v.as_u64().and_then(|n| u16::try_from(n).ok()) {
            Some(n) => Some(n),
            None => {
                p.add("src-prefetch-count", format!("{v}: a number from 1 to 65535"));
                None
            }
        },
    };
    let reconnect = match o.get("reconnect-delay") {
        None => None,
        Some(v) => match v.as_f64().filter(|s| *s > 0.0 && *s <= 86_400.0) {
            Some(s) => Some(Duration::from_secs_f64(s)),
            None => {
                p.add(
                    "reconnect-delay",
                    format!("{v}: seconds, above 0 and at most a day (Ferry's shovels always reconnect)"),
                );
                None
            }
        },
    };
    let forward = match (boolean(o, "dest-add-forward-headers", &p), boolean(o, "add-forward-headers", &p)) {
        (Some(a), Some(b)) if a != b => {
            p.add("add-forward-headers", "says otherwise than dest-add-forward-headers");
            None
        }
        (a, b) => a.or(b),
    };
    let timestamp = boolean(o, "dest-add-timestamp-header", &p);
    let raw = RawShovel {
        name: name.to_string(),
        src_uri: src_uri.unwrap_or_else(|| RawUri::from("")),
        dest_uri: dest_uri.unwrap_or_else(|| RawUri::from("")),
        src_queue: string(o, "src-queue", &p),
        src_exchange: string(o, "src-exchange", &p),
        src_exchange_key: string(o, "src-exchange-key", &p),
        dest_queue: string(o, "dest-queue", &p),
        dest_exchange: string(o, "dest-exchange", &p),
        dest_exchange_key: string(o, "dest-exchange-key", &p),
        src_queue_args: object(o, "src-queue-args", &p),
        dest_queue_args: object(o, "dest-queue-args", &p),
        dest_publish_properties: object(o, "dest-publish-properties", &p),
        src_predeclared: boolean(o, "src-predeclared", &p),
        dest_predeclared: boolean(o, "dest-predeclared", &p),
        ack_mode: string(o, "ack-mode", &p),
        prefetch_count: prefetch,
        add_forward_headers: forward,
        max_hops: None,
        max_queued_messages: None,
        max_queued_bytes: None,
        overflow: None,
        vhost: Some(local_vhost.clone().unwrap_or_else(|| vhost.to_string())),
        password_file: None,
        password_env: None,
        tls: None,
        heartbeat_secs: None,
        reconnect_initial_ms: None,
        reconnect_max_ms: None,
        connect_timeout_secs: None,
    };
    let before = p.0.lock().unwrap_or_else(|e| e.into_inner()).len();
    let config = if before == 0 { super::spec::shovel(&p, &|k: &str| rabbit_key(k), raw) } else { None };
    let problems = p.0.into_inner().unwrap_or_else(|e| e.into_inner());
    match config {
        Some(mut s) if problems.is_empty() => {
            s.dynamic = Some(vhost.to_string());
            let mut passwords = passwords.into_iter().map(|pw| pw.map(PasswordSource::Inline));
            s.password = passwords.next().flatten();
            for (a, pw) in s.alternates.iter_mut().zip(passwords) {
                a.password = pw;
            }
            s.add_timestamp_header = timestamp.unwrap_or(false);
            if delete_after == Some(DeleteAfter::QueueLength)
                && s.direction == super::ShovelDirection::In
                && !matches!(s.source, super::Source::Queue(_))
            {
                // The remote's queue for an exchange source is made afresh: always empty.
                return Err(
                    "src-delete-after: \"queue-length\" needs a source queue (src-queue), not an exchange".into()
                );
            }
            s.delete_after = delete_after;
            if let Some(d) = reconnect {
                // RabbitMQ waits `reconnect-delay` between attempts, always the same.
                s.backoff_initial = d;
                s.backoff_max = d;
            }
            Ok(s)
        }
        _ if problems.is_empty() => Err("not a shovel".into()),
        // The file's checks word their reasons with the file's keys: say RabbitMQ's.
        _ => Err(FILE_KEYS.iter().fold(problems.join("; "), |text, (file, rabbit)| text.replace(file, rabbit))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shovel::{AckMode, Destination, ShovelDirection, Source};
    use serde_json::json;

    #[test]
    fn a_rabbitmq_value_maps_onto_a_shovel() {
        let v = json!({"src-uri": "amqp://", "src-queue": "orders", "dest-uri": ["amqp://ferry:s%40cret@rabbit:5673/%2fprod", "amqp://other"],
                       "dest-exchange": "x", "dest-exchange-key": "k", "ack-mode": "on-publish", "src-prefetch-count": 50,
                       "add-forward-headers": true, "dest-add-timestamp-header": true, "reconnect-delay": 2,
                       "src-protocol": "amqp091", "dest-protocol": "amqp091", "src-delete-after": "never",
                       "dest-publish-properties": {}});
        let s = parse("site", "orders-out", &v).unwrap();
        assert_eq!((s.direction, s.vhost.as_str(), s.dynamic.as_deref()), (ShovelDirection::Out, "site", Some("site")));
        assert_eq!(s.source, Source::Queue("orders".into()));
        assert_eq!(s.destination, Destination::Exchange { exchange: "x".into(), key: Some("k".into()) });
        assert_eq!((s.remote.host.as_str(), s.remote.port, s.remote.vhost.as_str()), ("rabbit", 5673, "/prod"));
        assert_eq!(s.remote.user.as_deref(), Some("ferry"));
        assert_eq!(s.password.as_ref().unwrap().read().unwrap(), b"s@cret");
        assert!(!format!("{s:?}").contains("s@cret") && !format!("{s:?}").contains("s%40cret"));
        assert_eq!(
            (s.ack_mode, s.prefetch, s.add_forward_headers, s.add_timestamp_header),
            (AckMode::OnPublish, 50, true, true)
        );
        assert_eq!((s.backoff_initial, s.backoff_max), (Duration::from_secs(2), Duration::from_secs(2)));
    }

    #[test]
    fn the_local_end_takes_the_vhost_of_its_path_or_the_parameters() {
        let v = json!({"src-uri": "amqp://rabbit", "src-queue": "q", "dest-uri": "amqp:///other%2fv"});
        let s = parse("/", "in", &v).unwrap();
        assert_eq!((s.direction, s.vhost.as_str(), s.dynamic.as_deref()), (ShovelDirection::In, "other/v", Some("/")));
        assert_eq!(s.password, None);
        let v = json!({"src-uri": "amqp://rabbit", "src-queue": "q", "dest-uri": "amqp://"});
        assert_eq!(parse("v1", "in", &v).unwrap().vhost, "v1");
    }

    #[test]
    fn what_ferry_does_not_take_is_refused_by_name() {
        let refused = |v: Value| parse("/", "s", &v).unwrap_err();
        let why =
            refused(json!({"src-uri": "amqp://", "src-queue": "q", "dest-uri": "amqp://h", "src-consumer-args": {}}));
        assert!(why.starts_with("src-consumer-args: not a key"), "{why}");
        let why =
            refused(json!({"src-uri": "amqp://", "src-queue": "q", "dest-uri": "amqp://h", "dest-protocol": "amqp10"}));
        assert!(why.contains("dest-protocol: \"amqp10\""), "{why}");
        let why = refused(
            json!({"src-uri": "amqp://", "src-queue": "q", "dest-uri": "amqp://h", "src-delete-after": "soon"}),
        );
        assert!(why.contains("src-delete-after: \"soon\": \"never\""), "{why}");
        let remote = |after: Value| {
            let v = json!({"src-uri": "amqp://h", "src-queue": "q", "dest-uri": "amqp://", "src-delete-after": after});
            parse("/", "s", &v).unwrap().delete_after
        };
        assert_eq!(remote(json!(5)), Some(DeleteAfter::Messages(5)), "a remote source counts too");
        assert_eq!(remote(json!("queue-length")), Some(DeleteAfter::QueueLength));
        let why = refused(json!({"src-uri": "amqp://h", "src-exchange": "x", "dest-uri": "amqp://",
                                 "src-delete-after": "queue-length"}));
        assert!(why.starts_with("src-delete-after: \"queue-length\" needs a source queue"), "{why}");
        let ok = |after: Value| {
            let v = json!({"src-uri": "amqp://", "src-queue": "q", "dest-uri": "amqp://h", "src-delete-after": after});
            parse("/", "s", &v).unwrap().delete_after
        };
        assert_eq!(ok(json!("never")), None);
        assert_eq!(ok(json!("queue-length")), Some(DeleteAfter::QueueLength));
        assert_eq!(ok(json!(7)), Some(DeleteAfter::Messages(7)));
        let why = refused(json!({"src-uri": "amqp://", "dest-uri": "amqp://h"}));
        assert!(why.contains("src-queue: give src-queue or src-exchange"), "{why}");
        let why = refused(json!({"src-uri": "amqp://", "src-queue": "q", "dest-uri": "amqp:///x"}));
        assert!(why.contains("both ends are this broker"), "{why}");
        let why = refused(json!({"src-uri": "ftp://u:pw@h", "src-queue": "q", "dest-uri": "amqp://"}));
        assert!(why.contains("src-uri: \"ftp://u:***@h\" must start with amqp://"), "{why}");
        assert!(!why.contains("pw"), "{why}");
        let why = refused(json!({"src-uri": "amqp://u:p/w@h:99999", "src-queue": "q", "dest-uri": "amqp://"}));
        assert!(why.contains("src-uri: \"amqp://u@h:99999\" port") && !why.contains("p/w"), "{why}");
        let why = refused(json!({"src-uri": "amqp://u:pw@h:99999", "src-queue": "q", "dest-uri": "amqp://"}));
        assert!(why.contains("src-uri: ") && !why.contains("pw"), "{why}");
        let why =
            refused(json!({"src-uri": "amqp://", "src-queue": "q", "dest-uri": "amqp://h", "ack-mode": "sometimes"}));
        assert!(why.contains("ack-mode: \"sometimes\""), "{why}");
        assert!(parse("/", "a b", &json!({"src-uri": "amqp://", "src-queue": "q", "dest-uri": "amqp://h"}))
            .unwrap_err()
            .contains("name: "));
        assert!(refused(json!("amqp://h")).starts_with("value: "));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_uri("amqp://u:secret@h:5672/v?heartbeat=5"), "amqp://u:***@h:5672/v?heartbeat=5");
        assert_eq!(redact_uri("amqp://u@h"), "amqp://u@h");
        assert_eq!(redact_uri("amqp://"), "amqp://");
        assert_eq!(redact_uri("amqp://u:pa/ss@h/v"), "amqp://u:***@h/v");
        assert_eq!(redact_uri("amqp://u:p@ss@h"), "amqp://u:***@h");
        assert_eq!(redact_uri("amqp://h/v?x=a@b"), "amqp://h/v?x=a@b");
        let v = redact(&json!({"src-uri": ["amqp://a:b@h", "amqp://c:d@h2"], "dest-uri": "amqp://"}));
        assert_eq!(v, json!({"src-uri": ["amqp://a:***@h", "amqp://c:***@h2"], "dest-uri": "amqp://"}));
    }

    #[test]
    fn queue_arguments_and_predeclared_map_onto_the_named_queues() {
        let v = json!({"src-uri": "amqp://", "src-queue": "q", "src-queue-args": {"x-max-length": 5},
                       "dest-uri": "amqp://h", "dest-queue": "d", "dest-queue-args": {"x-queue-mode": "lazy"},
                       "dest-predeclared": true});
        let s = parse("/", "s", &v).unwrap();
        assert_eq!(s.src_queue_args.get("x-max-length"), Some(&ferry_core::message::FieldValue::I64(5)));
        assert_eq!(s.dest_queue_args.get("x-queue-mode"), Some(&ferry_core::message::FieldValue::string("lazy")));
        assert!(s.dest_predeclared && !s.src_predeclared);
        let refused = |v: Value| parse("/", "s", &v).unwrap_err();
        let why =
            refused(json!({"src-uri": "amqp://", "src-queue": "q", "src-queue-args": [1], "dest-uri": "amqp://h"}));
        assert!(why.contains("src-queue-args: [1] is not a JSON object"), "{why}");
        let why = refused(json!({"src-uri": "amqp://", "src-exchange": "x", "src-queue-args": {},
                                 "dest-uri": "amqp://h", "dest-exchange": "y", "dest-predeclared": true}));
        assert!(why.contains("src-queue-args: goes with src-queue"), "{why}");
        assert!(why.contains("dest-predeclared: goes with dest-queue"), "{why}");
    }

    #[test]
    fn a_list_of_uris_keeps_each_password_and_may_not_hold_this_broker() {
        let v = json!({"src-uri": ["amqp://fred:one@host1/v", "amqp://john:two@host2/v"], "src-queue": "q",
                       "dest-uri": "amqp://"});
        let s = parse("/", "s", &v).unwrap();
        assert_eq!(s.remote_count(), 2);
        let (u, pw) = s.remote_at(1);
        assert_eq!((u.host.as_str(), u.user.as_deref()), ("host2", Some("john")));
        assert_eq!(pw, Some(&PasswordSource::Inline("two".into())));
        assert_eq!(s.remote_at(0).1, Some(&PasswordSource::Inline("one".into())));
        let v = json!({"src-uri": ["amqp://u:s3cretA@h", "amqp://"], "src-queue": "q", "dest-uri": "amqp://"});
        let why = parse("/", "s", &v).unwrap_err();
        assert!(why.contains("cannot be one of a list of remotes"), "{why}");
        assert!(!why.contains("s3cretA"), "{why}");
    }
}

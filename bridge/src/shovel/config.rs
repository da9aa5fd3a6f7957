//! What one `[[shovels]]` table says, validated (the server's config module parses the TOML):
//! an AMQP 0-9-1 shovel between the local broker and a remote one, modelled on RabbitMQ's
//! shovel plugin (`src-uri`, `src-queue`, `src-exchange`, `dest-exchange`, `ack-mode`...).

use std::fmt;
use std::time::Duration;

use ferry_core::message::{FieldTable, ShortString};

use crate::config::{BridgeTls, PasswordSource, QUEUE_PREFIX};

/// When a message leaves the source (RabbitMQ's `ack-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckMode {
    /// Acknowledged at the source once the destination has confirmed it: a publisher confirm
    /// from a remote destination, the store commit at a local one. Nothing is lost.
    #[default]
    OnConfirm,
    /// Acknowledged at the source once it has been handed to the destination (written to the
    /// remote's socket; published into the local vhost), without waiting for a confirmation.
    OnPublish,
    /// Acknowledged at the source as soon as the shovel has it (a remote source is consumed
    /// with `no-ack`). The fastest and the least safe.
    NoAck,
}

impl AckMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::OnConfirm => "on-confirm",
            AckMode::OnPublish => "on-publish",
            AckMode::NoAck => "no-ack",
        }
    }

    pub fn parse(s: &str) -> Option<AckMode> {
        Some(match s {
            "on-confirm" => AckMode::OnConfirm,
            "on-publish" => AckMode::OnPublish,
            "no-ack" => AckMode::NoAck,
            _ => return None,
        })
    }
}

/// When a shovel has done its work (RabbitMQ's `src-delete-after`): it stops, and a dynamic
/// shovel is deleted. Counted from each start of the shovel, as RabbitMQ counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteAfter {
    /// After this many messages taken from the source.
    Messages(u64),
    /// After as many messages as the source queue held when the shovel started.
    QueueLength,
}

/// Which way the shovel carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShovelDirection {
    /// Local source, remote destination (`src_uri = "local"`).
    Out,
    /// Remote source, local destination (`dest_uri = "local"`).
    In,
}

/// Where messages are taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A named queue, declared durable (with `src_queue_args`) where it does not exist, on
    /// either side, unless `src_predeclared`.
    Queue(String),
    /// An exchange and a binding key: a queue bound to it is made (locally the durable
    /// `ferry-bridge.<name>`, on a remote a server-named exclusive one).
    Exchange { exchange: String, key: String },
}

/// Where messages are published to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Destination {
    /// To an exchange, with `key` or, when `None`, the message's own routing key.
    Exchange { exchange: String, key: Option<String> },
    /// To a queue (through the default exchange).
    Queue(String),
    /// The message's own exchange and routing key.
    #[default]
    AsPublished,
}

impl Destination {
    /// The exchange and routing key a message published with `routing_key` goes to.
    pub fn route<'a>(&'a self, exchange: &'a str, routing_key: &'a str) -> (&'a str, &'a str) {
        match self {
            Destination::Exchange { exchange, key } => (exchange.as_str(), key.as_deref().unwrap_or(routing_key)),
            Destination::Queue(q) => ("", q.as_str()),
            Destination::AsPublished => (exchange, routing_key),
        }
    }

    /// [`Destination::route`] for a delivery's own short strings.
    pub fn route_bytes(&self, exchange: &ShortString, routing_key: &ShortString) -> (ShortString, ShortString) {
        match self {
            Destination::Exchange { exchange, key } => (
                ShortString::from(exchange.as_str()),
                key.as_deref().map(ShortString::from).unwrap_or_else(|| routing_key.clone()),
            ),
            Destination::Queue(q) => (ShortString::default(), ShortString::from(q.as_str())),
            Destination::AsPublished => (exchange.clone(), routing_key.clone()),
        }
    }
}

/// A remote broker's address as an AMQP URI says it:
/// `amqp[s]://[user@]host[:port][/vhost][?query]`. The password is never part of it
/// (`password_file` / `password_env`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpUri {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub vhost: String,
    /// The query parameters of RabbitMQ's URI spec that Ferry takes.
    pub query: UriQuery,
}

/// A SASL mechanism the shovel can log in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMechanism {
    /// User name and password.
    Plain,
    /// User name and password in a field table (`LOGIN`, `PASSWORD`): RabbitMQ's older
    /// mechanism, which some brokers offer without PLAIN.
    AmqPlain,
    /// The TLS client certificate is the identity (RabbitMQ's `rabbitmq_auth_mechanism_ssl`,
    /// Ferry's `cert_login`); needs `amqps://` with a client certificate.
    External,
}

impl AuthMechanism {
    /// The mechanism's name in `connection.start` / `start-ok`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMechanism::Plain => "PLAIN",
            AuthMechanism::AmqPlain => "AMQPLAIN",
            AuthMechanism::External => "EXTERNAL",
        }
    }
}

/// The query parameters of RabbitMQ's AMQP URI spec (its `amqp_uri` module, as shovel URIs use
/// them) that Ferry takes. Others are refused by name rather than ignored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UriQuery {
    /// `heartbeat`: seconds.
    pub heartbeat: Option<u16>,
    /// `connection_timeout`: milliseconds.
    pub connection_timeout: Option<Duration>,
    /// `auth_mechanism` (repeatable: tried in order against what the remote offers).
    pub auth_mechanisms: Vec<AuthMechanism>,
    /// `cacertfile`, `certfile`, `keyfile`: TLS files (paths as given).
    pub cacertfile: Option<String>,
    pub certfile: Option<String>,
    pub keyfile: Option<String>,
    /// `server_name_indication`: the name the remote's certificate must be valid for.
    pub server_name_indication: Option<String>,
    /// `frame_max`: an upper bound on the frame size agreed with the remote.
    pub frame_max: Option<u32>,
}

impl UriQuery {
    /// Whether any TLS file or name is given.
    pub fn has_tls(&self) -> bool {
        self.cacertfile.is_some()
            || self.certfile.is_some()
            || self.keyfile.is_some()
            || self.server_name_indication.is_some()
    }

    fn parse(query: &str) -> Result<UriQuery, UriError> {
        let mut q = UriQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (percent_decode(k)?, percent_decode(v)?);
            let bad = |why: &str| UriError::Query(format!("{k}={v}: {why}"));
            match k.as_str() {
                "heartbeat" => q.heartbeat = Some(v.parse().map_err(|_| bad("seconds from 0 to 65535"))?),
                "connection_timeout" => {
                    let ms: u64 = v.parse().ok().filter(|ms| *ms > 0).ok_or_else(|| bad("milliseconds, above 0"))?;
                    q.connection_timeout = Some(Duration::from_millis(ms));
                }
                "auth_mechanism" => q.auth_mechanisms.push(match v.to_ascii_lowercase().as_str() {
                    "plain" => AuthMechanism::Plain,
                    "amqplain" => AuthMechanism::AmqPlain,
                    "external" => AuthMechanism::External,
                    _ => return Err(bad("Ferry's shovel logs in with plain, amqplain or external")),
                }),
                "cacertfile" => q.cacertfile = Some(v),
                "certfile" => q.certfile = Some(v),
                "keyfile" => q.keyfile = Some(v),
                "server_name_indication" if v == "disable" => {
                    return Err(bad("Ferry always checks the remote's certificate against a name"))
                }
                "server_name_indication" => q.server_name_indication = Some(v),
                "verify" if v == "verify_peer" => {}
                "verify" => return Err(bad("Ferry always verifies the remote's certificate (verify_peer)")),
                "frame_max" => q.frame_max = Some(v.parse().map_err(|_| bad("a number of bytes"))?),
                // The shovel uses one channel; any limit the URI sets leaves room for it.
                "channel_max" => {
                    v.parse::<u16>().map_err(|_| bad("a number of channels"))?;
                }
                _ => {
                    return Err(UriError::Query(format!(
                        "{k}: not a parameter Ferry takes (heartbeat, connection_timeout, auth_mechanism, \
                         cacertfile, certfile, keyfile, server_name_indication, verify, frame_max, channel_max)"
                    )))
                }
            }
        }
        Ok(q)
    }
}

/// Why an AMQP URI was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("must start with amqp:// or amqps://")]
    Scheme,
    #[error("has no host")]
    NoHost,
    #[error("port {0:?} is not a number from 1 to 65535")]
    Port(String),
    #[error("holds a password: give it with password_file or password_env, never in the URI")]
    Password,
    #[error("bad percent-encoding in {0:?}")]
    Percent(String),
    #[error("query parameter {0}")]
    Query(String),
}

fn percent_decode(s: &str) -> Result<String, UriError> {
    let bad = || UriError::Percent(s.to_string());
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

impl AmqpUri {
    /// Parses `amqp[s]://[user@]host[:port][/vhost][?query]`. The vhost is percent-decoded
    /// (`%2f` is `/`); without a path, or with an empty one, it is `/`. The query: [`UriQuery`].
    pub fn parse(uri: &str) -> Result<AmqpUri, UriError> {
        let (tls, rest) = if let Some(r) = uri.strip_prefix("amqps://") {
            (true, r)
        } else if let Some(r) = uri.strip_prefix("amqp://") {
            (false, r)
        } else {
            return Err(UriError::Scheme);
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, UriQuery::parse(q)?),
            None => (rest, UriQuery::default()),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (rest, None),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hp)) => {
                if userinfo.contains(':') {
                    return Err(UriError::Password);
                }
                (Some(percent_decode(userinfo)?), hp)
            }
            None => (None, authority),
        };
        let default_port = if tls { 5671 } else { 5672 };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or(UriError::NoHost)?;
            match after.strip_prefix(':') {
                Some(p) => (h.to_string(), Some(p)),
                None if after.is_empty() => (h.to_string(), None),
                None => return Err(UriError::Port(after.to_string())),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(UriError::NoHost);
        }
        let port = match port {
            None => default_port,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| UriError::Port(p.to_string()))?,
        };
        let vhost = match path {
            None | Some("") => "/".to_string(),
            Some(p) => percent_decode(p)?,
        };
        Ok(AmqpUri { tls, host, port, user, vhost, query })
    }

    /// `host:port` to connect to (an IPv6 literal in brackets).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for AmqpUri {
    /// The URI again, for logs and headers, without its query: never a password (there is none
    /// in it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        let user = self.user.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
        let vhost = if self.vhost == "/" { "%2f".to_string() } else { self.vhost.replace('/', "%2f") };
        write!(f, "{scheme}://{user}{}/{vhost}", self.address())
    }
}

/// Another URI of a shovel's remote (see [`ShovelConfig::alternates`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alternate {
    pub uri: AmqpUri,
    /// Its own password (a dynamic shovel's URI carries one); `None`: the shovel's.
    pub password: Option<PasswordSource>,
}

/// One AMQP shovel.
#[derive(Debug, Clone, PartialEq)]
pub struct ShovelConfig {
    /// Unique among bridges and shovels; names the local queue (`ferry-bridge.<name>`).
    pub name: String,
    pub direction: ShovelDirection,
    /// The remote broker: the first URI of its list.
    pub remote: AmqpUri,
    /// Its password, read at each connect.
    pub password: Option<PasswordSource>,
    /// The other URIs of the remote's list (RabbitMQ's `src-uri` / `dest-uri` may be lists, the
    /// nodes of a cluster): each connect picks one of the list at random, and after a failure
    /// one other than the one that failed. Same scheme and query as `remote` (they share the
    /// TLS files, heartbeat and login); host, port, user, vhost and password may differ.
    pub alternates: Vec<Alternate>,
    /// TLS for an `amqps://` remote (required then).
    pub tls: Option<BridgeTls>,
    /// The local vhost (the remote's is in the URI).
    pub vhost: String,
    pub source: Source,
    pub destination: Destination,
    /// The arguments a missing source / destination queue is declared with (RabbitMQ's
    /// `src-queue-args` / `dest-queue-args`; an existing queue is taken as it is).
    pub src_queue_args: FieldTable,
    pub dest_queue_args: FieldTable,
    /// The source / destination queue must exist: it is looked up, never declared (RabbitMQ's
    /// `src-predeclared` / `dest-predeclared`).
    pub src_predeclared: bool,
    pub dest_predeclared: bool,
    pub ack_mode: AckMode,
    /// Messages taken from the source and not yet settled, at most (the consumer's prefetch).
    pub prefetch: u16,
    /// Add RabbitMQ's `x-shovelled` header (where the message was shovelled from and to).
    pub add_forward_headers: bool,
    /// Bridges and shovels a message may have crossed and still be shovelled.
    pub max_hops: u32,
    /// Limits of the shovel's own backlog (`ferry-bridge.<name>`, an `out` shovel whose source
    /// is an exchange); a source queue keeps its own arguments.
    pub max_queued_messages: u32,
    pub max_queued_bytes: u64,
    pub overflow: crate::config::Overflow,
    /// Heartbeat asked for, in seconds (0: none); the remote may ask for less.
    pub heartbeat: u16,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long the TCP connect plus the AMQP handshake may take.
    pub connect_timeout: Duration,
    /// SASL mechanisms to log in with, the first the remote offers (default: PLAIN).
    pub auth_mechanisms: Vec<AuthMechanism>,
    /// An upper bound on the frame size agreed with the remote (`frame_max` in the URI).
    pub frame_max: Option<u32>,
    /// Made through the management API (RabbitMQ's dynamic shovel): the vhost of its
    /// parameter. `None`: the server's file's (`static`).
    pub dynamic: Option<String>,
    /// Add RabbitMQ's `x-shovelled-timestamp` header (`dest-add-timestamp-header`).
    pub add_timestamp_header: bool,
    /// RabbitMQ's `dest-publish-properties`: properties laid over each message's on the way out
    /// ([`super::args::overlay`]); `None`: the message's own.
    pub publish_properties: Option<ferry_core::message::Properties>,
    /// `src-delete-after` (dynamic shovels from a local queue); `None`: never.
    pub delete_after: Option<DeleteAfter>,
}

impl ShovelConfig {
    /// A shovel with Ferry's defaults: vhost `/`, ack mode on-confirm, prefetch 1000 (as
    /// RabbitMQ's), no forward headers, max hops 1, a backlog of at most 100,000 messages
    /// dropping the oldest (as a bridge's), heartbeat 60 s, back-off 1 s to 60 s, connect
    /// timeout 10 s, PLAIN login — or what the URI's query says for the heartbeat, the connect
    /// timeout, the login mechanisms and the frame size (its TLS files are the caller's to
    /// resolve into [`ShovelConfig::tls`]).
    pub fn new(name: &str, direction: ShovelDirection, remote: AmqpUri, source: Source) -> ShovelConfig {
        let q = remote.query.clone();
        ShovelConfig {
            name: name.to_string(),
            direction,
            remote,
            password: None,
            alternates: Vec::new(),
            tls: None,
            vhost: ferry_core::broker::DEFAULT_VHOST.to_string(),
            source,
            destination: Destination::AsPublished,
            src_queue_args: FieldTable::new(),
            dest_queue_args: FieldTable::new(),
            src_predeclared: false,
            dest_predeclared: false,
            ack_mode: AckMode::OnConfirm,
            prefetch: 1000,
            add_forward_headers: false,
            max_hops: 1,
            max_queued_messages: 100_000,
            max_queued_bytes: 0,
            overflow: crate::config::Overflow::DropOldest,
            heartbeat: q.heartbeat.unwrap_or(60),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            connect_timeout: q.connection_timeout.unwrap_or(Duration::from_secs(10)),
            auth_mechanisms: if q.auth_mechanisms.is_empty() { vec![AuthMechanism::Plain] } else { q.auth_mechanisms },
            frame_max: q.frame_max,
            dynamic: None,
            add_timestamp_header: false,
            publish_properties: None,
            delete_after: None,
        }
    }

    /// The local durable queue of an `out` shovel whose source is an exchange.
    pub fn queue_name(&self) -> String {
        format!("{QUEUE_PREFIX}{}", self.name)
    }

    /// The local queue an `out` shovel consumes.
    pub fn local_queue(&self) -> String {
        match &self.source {
            Source::Queue(q) => q.clone(),
            Source::Exchange { .. } => self.queue_name(),
        }
    }

    /// The source and destination as URIs (`local` for this broker's side).
    /// How many URIs the remote's list has.
    pub fn remote_count(&self) -> usize {
        1 + self.alternates.len()
    }

    /// The `i`th URI of the remote's list (0: [`ShovelConfig::remote`]) and its password.
    pub fn remote_at(&self, i: usize) -> (&AmqpUri, Option<&PasswordSource>) {
        match i.checked_sub(1).and_then(|j| self.alternates.get(j)) {
            Some(a) => (&a.uri, a.password.as_ref().or(self.password.as_ref())),
            None => (&self.remote, self.password.as_ref()),
        }
    }

    /// The URI to connect to next, `seed` a random number: any of the list, or after a failure
    /// of `failed` any other.
    pub fn pick_remote(&self, seed: u64, failed: Option<usize>) -> usize {
        let n = self.remote_count() as u64;
        match failed {
            Some(f) if n > 1 => ((f as u64 + 1 + seed % (n - 1)) % n) as usize,
            _ => (seed % n) as usize,
        }
    }

    /// The source and destination URIs as RabbitMQ shows them (`local` for this broker), with
    /// the first URI of the remote's list.
    pub fn uris(&self) -> (String, String) {
        self.uris_at(0)
    }

    /// [`ShovelConfig::uris`] with the `i`th URI of the remote's list.
    pub fn uris_at(&self, i: usize) -> (String, String) {
        let remote = self.remote_at(i).0.to_string();
        match self.direction {
            ShovelDirection::Out => ("local".to_string(), remote),
            ShovelDirection::In => (remote, "local".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_with_defaults() {
        let u = AmqpUri::parse("amqp://rabbit.example").unwrap();
        assert_eq!(
            u,
            AmqpUri {
                tls: false,
                host: "rabbit.example".into(),
                port: 5672,
                user: None,
                vhost: "/".into(),
                query: UriQuery::default()
            }
        );
        let u = AmqpUri::parse("amqps://ferry@rabbit.example/").unwrap();
        assert_eq!((u.tls, u.port, u.user.as_deref(), u.vhost.as_str()), (true, 5671, Some("ferry"), "/"));
        let u = AmqpUri::parse("amqp://a%40b@10.0.0.1:5673/%2fprod").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.user.as_deref(), u.vhost.as_str()),
            ("10.0.0.1", 5673, Some("a@b"), "/prod")
        );
        let u = AmqpUri::parse("amqp://[::1]:5999/site7").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.vhost.as_str()), ("::1", 5999, "site7"));
        assert_eq!(u.address(), "[::1]:5999");
        assert_eq!(AmqpUri::parse("amqp://h/%2f").unwrap().vhost, "/");
    }

    #[test]
    fn bad_uris_are_refused_with_the_reason() {
        assert_eq!(AmqpUri::parse("http://h"), Err(UriError::Scheme));
        assert_eq!(AmqpUri::parse("amqp://"), Err(UriError::NoHost));
        assert_eq!(AmqpUri::parse("amqp://user@:5672"), Err(UriError::NoHost));
        assert_eq!(AmqpUri::parse("amqp://h:0"), Err(UriError::Port("0".into())));
        assert_eq!(AmqpUri::parse("amqp://h:99999"), Err(UriError::Port("99999".into())));
        assert_eq!(AmqpUri::parse("amqp://u:secret@h"), Err(UriError::Password));
        assert_eq!(AmqpUri::parse("amqp://h/%zz"), Err(UriError::Percent("%zz".into())));
        let refused = |uri: &str| match AmqpUri::parse(uri) {
            Err(UriError::Query(why)) => why,
            other => panic!("{uri}: {other:?}"),
        };
        assert!(refused("amqp://h/v?heartbeat=-1").contains("heartbeat=-1: seconds"));
        assert!(refused("amqp://h/v?connection_timeout=0").contains("milliseconds"));
        assert!(refused("amqps://h/v?verify=verify_none").contains("always verifies"));
        assert!(refused("amqps://h/v?server_name_indication=disable").contains("always checks"));
        assert!(refused("amqp://h/v?auth_mechanism=cram-md5").contains("plain, amqplain or external"));
        let q = AmqpUri::parse("amqp://h/v?auth_mechanism=amqplain&auth_mechanism=plain").unwrap().query;
        assert_eq!(q.auth_mechanisms, vec![AuthMechanism::AmqPlain, AuthMechanism::Plain]);
        assert!(refused("amqp://h/v?password=x").starts_with("password: not a parameter Ferry takes"));
        assert!(!UriError::Password.to_string().contains("secret"));
    }

    #[test]
    fn rabbitmq_uri_query_parameters_are_taken() {
        let u = AmqpUri::parse(
            "amqps://shovel@rabbit.example/%2f?heartbeat=10&connection_timeout=5000&auth_mechanism=external\
             &auth_mechanism=plain&cacertfile=%2Fetc%2Fca.pem&certfile=/etc/c.pem&keyfile=/etc/k.pem\
             &server_name_indication=rabbit.internal&verify=verify_peer&frame_max=131072&channel_max=8",
        )
        .unwrap();
        let q = &u.query;
        assert_eq!((q.heartbeat, q.connection_timeout), (Some(10), Some(Duration::from_secs(5))));
        assert_eq!(q.auth_mechanisms, [AuthMechanism::External, AuthMechanism::Plain]);
        assert_eq!(
            (q.cacertfile.as_deref(), q.certfile.as_deref(), q.keyfile.as_deref()),
            (Some("/etc/ca.pem"), Some("/etc/c.pem"), Some("/etc/k.pem"))
        );
        assert_eq!((q.server_name_indication.as_deref(), q.frame_max), (Some("rabbit.internal"), Some(131072)));
        assert!(q.has_tls());
        assert_eq!((u.vhost.as_str(), u.to_string().as_str()), ("/", "amqps://shovel@rabbit.example:5671/%2f"));
        assert_eq!(AmqpUri::parse("amqp://h?").unwrap().query, UriQuery::default());
    }

    #[test]
    fn a_uri_prints_without_a_password_and_with_its_vhost_encoded() {
        let u = AmqpUri::parse("amqp://ferry@h:5672").unwrap();
        assert_eq!(u.to_string(), "amqp://ferry@h:5672/%2f");
        assert_eq!(AmqpUri::parse(&u.to_string()).unwrap(), u);
    }

    #[test]
    fn destinations_route_as_configured() {
        let x = Destination::Exchange { exchange: "work".into(), key: Some("k".into()) };
        assert_eq!(x.route("amq.topic", "a.b"), ("work", "k"));
        let x = Destination::Exchange { exchange: "work".into(), key: None };
        assert_eq!(x.route("amq.topic", "a.b"), ("work", "a.b"));
        assert_eq!(Destination::Queue("q".into()).route("amq.topic", "a.b"), ("", "q"));
        assert_eq!(Destination::AsPublished.route("amq.topic", "a.b"), ("amq.topic", "a.b"));
    }

    #[test]
    fn ack_modes_parse_by_their_rabbitmq_names() {
        for m in [AckMode::OnConfirm, AckMode::OnPublish, AckMode::NoAck] {
            assert_eq!(AckMode::parse(m.as_str()), Some(m));
        }
        assert_eq!(AckMode::parse("on_confirm"), None);
    }

    #[test]
    fn a_connect_picks_any_uri_of_the_list_and_after_a_failure_another() {
        let mut s = ShovelConfig::new(
            "s",
            ShovelDirection::Out,
            AmqpUri::parse("amqp://a").unwrap(),
            Source::Queue("q".into()),
        );
        assert!((0..10).all(|seed| s.pick_remote(seed, None) == 0 && s.pick_remote(seed, Some(0)) == 0));
        for h in ["b", "c"] {
            s.alternates.push(Alternate { uri: AmqpUri::parse(&format!("amqp://{h}")).unwrap(), password: None });
        }
        let firsts: std::collections::BTreeSet<usize> = (0..30).map(|seed| s.pick_remote(seed, None)).collect();
        assert_eq!(firsts.into_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
        for failed in 0..3 {
            let next: std::collections::BTreeSet<usize> =
                (0..30).map(|seed| s.pick_remote(seed, Some(failed))).collect();
            assert!(!next.contains(&failed), "never the one that failed");
            assert_eq!(next.len(), 2, "either other");
        }
        assert_eq!(s.remote_at(2).0.host, "c");
    }
}

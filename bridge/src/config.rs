//! What one `[[bridges]]` table says, validated (the server's config module parses the TOML).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use ferry_mqtt::codec::{ProtocolVersion, QoS};

/// Which way a topic rule carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Local messages go to the remote.
    Out,
    /// Remote messages come into the local broker.
    In,
    Both,
}

impl Direction {
    pub fn is_out(self) -> bool {
        matches!(self, Direction::Out | Direction::Both)
    }
    pub fn is_in(self) -> bool {
        matches!(self, Direction::In | Direction::Both)
    }
}

/// One topic rule, as Mosquitto's `topic <pattern> <out|in|both> <qos> <local-prefix> <remote-prefix>`:
/// a message on local topic `local_prefix + t` (with `t` matching `pattern`) goes out as
/// `remote_prefix + t`, and the other way round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRule {
    /// An MQTT filter (`+`, `#`), without the prefixes.
    pub pattern: String,
    pub direction: Direction,
    /// The highest QoS used: out, a message goes with the lower of its own QoS and this one;
    /// in, the remote subscription asks for this QoS.
    pub qos: QoS,
    pub local_prefix: String,
    pub remote_prefix: String,
}

impl TopicRule {
    /// The filter on the local side.
    pub fn local_filter(&self) -> String {
        format!("{}{}", self.local_prefix, self.pattern)
    }
    /// The filter on the remote side.
    pub fn remote_filter(&self) -> String {
        format!("{}{}", self.remote_prefix, self.pattern)
    }
}

/// What happens when the bridge's local queue holds `max_queued_messages` or
/// `max_queued_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// The oldest queued message is dropped (the queue's `x-overflow = drop-head`).
    #[default]
    DropOldest,
    /// The local publishers are held back (`x-overflow = block`): a QoS 1/2 publisher's message
    /// is taken, its PUBACK / PUBREC (an AMQP publisher's confirm) withheld until the queue is
    /// back within its limits; a QoS 0 message (AMQP without confirms) is refused and counted.
    Block,
}

/// Where the remote password comes from: never the config file itself, never logged.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// The file's contents, without a trailing newline.
    File(PathBuf),
    /// The environment variable's value.
    Env(String),
    /// Given with the shovel itself: the password of a dynamic shovel's URI (RabbitMQ's
    /// `amqp://user:password@host`), kept in the store as given. Never printed.
    Inline(String),
}

impl fmt::Debug for PasswordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordSource::File(p) => write!(f, "File({})", p.display()),
            PasswordSource::Env(v) => write!(f, "Env({v})"),
            PasswordSource::Inline(_) => write!(f, "Inline(<redacted>)"),
        }
    }
}

/// Why a password could not be read. Names where it was looked for, never the value.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password_file {}: {error}", path.display())]
    File { path: PathBuf, error: std::io::Error },
    #[error("password_env {name}: not set or not UTF-8")]
    Env { name: String },
}

impl PasswordSource {
    /// Reads the password now (at each connect, so a rotated secret is picked up).
    pub fn read(&self) -> Result<Vec<u8>, PasswordError> {
        match self {
            PasswordSource::File(path) => {
                let mut bytes =
                    std::fs::read(path).map_err(|error| PasswordError::File { path: path.clone(), error })?;
                while matches!(bytes.last(), Some(b'\n' | b'\r')) {
                    bytes.pop();
                }
                Ok(bytes)
            }
            PasswordSource::Env(name) => {
                std::env::var(name).map(String::into_bytes).map_err(|_| PasswordError::Env { name: name.clone() })
            }
            PasswordSource::Inline(p) => Ok(p.clone().into_bytes()),
        }
    }
}

/// TLS towards the remote: whom to trust, what to present, which name to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeTls {
    /// PEM certificates the remote's chain must lead to; `None`: the system's trusted CAs
    /// (Debian: /etc/ssl/certs, from the ca-certificates package; `SSL_CERT_FILE` /
    /// `SSL_CERT_DIR` override).
    pub ca: Option<PathBuf>,
    /// A client certificate chain (PEM) and its private key, for a remote that asks for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The name the remote's certificate must be valid for (default: the host of `address`).
    pub server_name: Option<String>,
}

/// One MQTT bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// Unique among the bridges; names the local queue (`ferry-bridge.<name>`) and the logs.
    pub name: String,
    /// `host:port` of the remote broker (resolved at each connect); with [`alternates`], the
    /// first of the remote's addresses (Mosquitto's `address a b c`), the *main* one unless
    /// [`round_robin`].
    ///
    /// [`alternates`]: BridgeConfig::alternates
    /// [`round_robin`]: BridgeConfig::round_robin
    pub address: String,
    /// The remote's other addresses (`host:port`), tried in turn after `address`: a connect
    /// that fails, or a connection that ends, moves the link to the next one (wrapping).
    pub alternates: Vec<String>,
    /// Mosquitto's `round_robin`: `false` (its default) treats `address` as the main remote:
    /// while connected to an alternate, the link tries a TCP connect to `address` every
    /// [`primary_retry`](BridgeConfig::primary_retry) and, once one succeeds, leaves the
    /// alternate for it. `true`: all addresses are equals; the link stays where it is until
    /// that connection ends.
    pub round_robin: bool,
    /// How often a link on an alternate checks whether `address` is back (without
    /// `round_robin`).
    pub primary_retry: Duration,
    /// TLS to the remote; plain TCP when `None`.
    pub tls: Option<BridgeTls>,
    /// 3.1.1 or 5.0.
    pub version: ProtocolVersion,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<PasswordSource>,
    /// Seconds; 0 turns keep alive off.
    pub keep_alive: u16,
    /// Start a clean remote session at each connect; `false` asks the remote to keep the
    /// session (and queue for the `in` rules) while the link is down.
    pub clean_session: bool,
    /// 3.1.1 remotes: mark the CONNECT as a bridge's (protocol level 0x84, Mosquitto's
    /// `try_private`), so that a remote that knows the mark (Mosquitto, Ferry) gives the
    /// bridge's subscriptions *no local* and *retain as published*. A remote that refuses it
    /// (CONNACK 1) is connected to again without it. Not used for 5.0 remotes.
    pub try_private: bool,
    /// The local vhost and exchange the rules route on (the MQTT listeners' defaults).
    pub vhost: String,
    pub exchange: String,
    pub topics: Vec<TopicRule>,
    /// Bridges a message may have crossed and still be forwarded across this one.
    pub max_hops: u32,
    /// The local queue's `x-max-length` (0: unbounded).
    pub max_queued_messages: u32,
    /// The local queue's `x-max-length-bytes`: body bytes waiting, at most (0: unbounded).
    pub max_queued_bytes: u64,
    pub overflow: Overflow,
    /// QoS 1/2 messages sent and not yet acknowledged by the remote, at most; also the local
    /// consumer's prefetch.
    pub max_inflight: u16,
    /// When the link connects (Mosquitto's `start_type`).
    pub start_type: StartType,
    /// `lazy`: connect once this many messages wait in the local queue (Mosquitto's `threshold`).
    pub threshold: u32,
    /// `lazy`: disconnect after this long without a message either way (Mosquitto's
    /// `idle_timeout`).
    pub idle_timeout: Duration,
    /// Mosquitto's `notifications`: the link's state, `1` (up) or `0` (down), published
    /// retained on [`notification_topic`](BridgeConfig::notification_topic) locally and, unless
    /// `notifications_local_only`, on the remote (with a will of `0` for a link that dies).
    pub notifications: bool,
    pub notifications_local_only: bool,
    /// `None`: `$SYS/broker/connection/<client_id>/state`, as Mosquitto.
    pub notification_topic: Option<String>,
    /// Reconnect back-off: the first delay, doubled after each failure up to the maximum,
    /// with jitter.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long a TCP connect plus CONNACK may take.
    pub connect_timeout: Duration,
}

impl BridgeConfig {
    /// A bridge with Ferry's defaults: MQTT 5.0, client id `ferry-bridge-<name>`, keep alive
    /// 60 s, clean session, vhost `/`, exchange `amq.topic`, no rules, `max_hops` 1,
    /// 100,000 queued messages (no bytes limit) dropping the oldest, 32 in flight, back-off 1 s to 60 s.
    pub fn new(name: &str, address: &str) -> BridgeConfig {
        BridgeConfig {
            name: name.to_string(),
            address: address.to_string(),
            alternates: Vec::new(),
            round_robin: false,
            primary_retry: Duration::from_secs(5),
            tls: None,
            version: ProtocolVersion::V5,
            client_id: format!("ferry-bridge-{name}"),
            username: None,
            password: None,
            keep_alive: 60,
            clean_session: true,
            try_private: true,
            vhost: ferry_core::broker::DEFAULT_VHOST.to_string(),
            exchange: "amq.topic".to_string(),
            topics: Vec::new(),
            max_hops: 1,
            max_queued_messages: 100_000,
            max_queued_bytes: 0,
            overflow: Overflow::DropOldest,
            max_inflight: 32,
            start_type: StartType::Automatic,
            threshold: 10,
            idle_timeout: Duration::from_secs(60),
            notifications: true,
            notifications_local_only: false,
            notification_topic: None,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// The local durable queue that holds what waits to go out.
    pub fn queue_name(&self) -> String {
        format!("{QUEUE_PREFIX}{}", self.name)
    }

    /// The host part of `address` (brackets of an IPv6 literal removed).
    pub fn host(&self) -> &str {
        host_of(&self.address)
    }

    /// Where the link's state is published (see [`BridgeConfig::notifications`]).
    pub fn state_topic(&self) -> String {
        match &self.notification_topic {
            Some(t) => t.clone(),
            None => format!("$SYS/broker/connection/{}/state", self.client_id),
        }
    }

    /// How many addresses the remote has: `address` and the alternates.
    pub fn address_count(&self) -> usize {
        1 + self.alternates.len()
    }

    /// Whether a link on address `i` should leave it for the main address once that answers
    /// (Mosquitto's `round_robin false`).
    pub fn leaves_for_main(&self, i: usize) -> bool {
        !self.round_robin && !i.is_multiple_of(self.address_count())
    }

    /// Address `i` (0: `address`; wraps around).
    pub fn address_at(&self, i: usize) -> &str {
        match (i % self.address_count()).checked_sub(1) {
            None => &self.address,
            Some(j) => &self.alternates[j],
        }
    }

    pub fn has_out_rules(&self) -> bool {
        self.topics.iter().any(|t| t.direction.is_out())
    }
}

/// When a bridge's link connects, as Mosquitto's `start_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartType {
    /// At start, and again after every failure (with back-off).
    Automatic,
    /// When `threshold` messages wait for the remote; disconnected again after `idle_timeout`
    /// without traffic (a metered or on-demand link).
    Lazy,
    /// At start; a failure stops the bridge for good (until a restart of Ferry).
    Once,
}

/// The host part of a `host:port` (brackets of an IPv6 literal removed).
pub fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Bridge queues are named with this prefix and the bridge's name.
pub const QUEUE_PREFIX: &str = ferry_mqtt::acl::BRIDGE_QUEUE_PREFIX;

#[cfg(test)]
mod tests {
    use super::*;

    fn with(addresses: &[&str], round_robin: bool) -> BridgeConfig {
        let mut b = BridgeConfig::new("b", addresses[0]);
        b.alternates = addresses[1..].iter().map(|a| a.to_string()).collect();
        b.round_robin = round_robin;
        b
    }

    #[test]
    fn addresses_wrap_round_main_first() {
        let b = with(&["a:1", "b:2", "c:3"], false);
        let order: Vec<&str> = (0..5).map(|i| b.address_at(i)).collect();
        assert_eq!(order, ["a:1", "b:2", "c:3", "a:1", "b:2"]);
        assert_eq!(with(&["a:1"], false).address_at(7), "a:1");
    }

    #[test]
    fn only_a_link_on_an_alternate_without_round_robin_goes_back_to_the_main_address() {
        let b = with(&["a:1", "b:2", "c:3"], false);
        assert_eq!((0..4).map(|i| b.leaves_for_main(i)).collect::<Vec<_>>(), [false, true, true, false]);
        let rr = with(&["a:1", "b:2"], true);
        assert!(!(0..3).any(|i| rr.leaves_for_main(i)), "round_robin: every address is as good");
        assert!(!with(&["a:1"], false).leaves_for_main(0));
    }

    #[test]
    fn the_host_of_an_address_drops_the_port_and_ipv6_brackets() {
        assert_eq!(host_of("central.example:8883"), "central.example");
        assert_eq!(host_of("[::1]:1883"), "::1");
    }
}

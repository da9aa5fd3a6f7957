//! The TOML configuration: what a file may say, the defaults for what it leaves out, and the
//! checks that refuse a bad file with its path, the key and the reason.
//!
//! Parsing goes through private `Raw*` structs that mirror the file (every one
//! `deny_unknown_fields`, so a misspelt key is an error naming it), then [`Config::from_toml_str`]
//! validates them into the public types, resolving relative paths against the file's directory.
//! Reading certificates and binding sockets happen at start-up, not here: see
//! [`crate::server::check`] and [`crate::server::ServerBuilder::start`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_core::auth::{AuthPolicy, PasswordHash, User, ANONYMOUS_USER, GUEST_USER};
use ferry_core::cert_login::CertLogin;
use ferry_core::frontend::{Limits, DEFAULT_SOCKET_BUFFER};
use ferry_core::permissions::{AccessPolicy, MqttExchange, Pattern, TopicPermissions, VhostPermissions};
use ferry_core::size::ByteSize;
use ferry_core::Protocol;
use serde::Deserialize;

use crate::logging::LogFormat;

/// Where the data directory is when nothing says otherwise (relative to the working directory).
pub const DEFAULT_DATA_DIR: &str = "./ferry-data";
pub const DEFAULT_LOG_LEVEL: &str = "info";
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_VHOST: &str = ferry_core::broker::DEFAULT_VHOST;
/// Open connections one listener accepts before it stops accepting until one closes.
pub const DEFAULT_MAX_CONNECTIONS: usize = 65_536;
/// The most connections a limit may allow (tokio's semaphore bound).
pub const MAX_CONNECTIONS_CEILING: usize = tokio::sync::Semaphore::MAX_PERMITS;
/// New connections per second a listener accepts by default (EMQX's `max_conn_rate`).
pub const DEFAULT_MAX_CONNECTION_RATE: u32 = 1000;
/// AMQP 0-9-1's `frame-min-size`: every peer must accept frames this large, so an AMQP listener
/// may not be configured below it.
pub const AMQP_FRAME_MIN_SIZE: u32 = 4096;
/// The request path a WebSocket listener upgrades on when the file names none: what mosquitto's
/// and HiveMQ's WebSocket listeners use and what browser MQTT clients (MQTT.js, Paho JS) ask for.
pub const DEFAULT_WEBSOCKET_PATH: &str = "/mqtt";

/// Where a [`Config`] came from. Only the embedded defaults may name a protocol no frontend
/// serves (see [`crate::server`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// No file was given: the built-in defaults.
    Embedded,
    /// Read from this file.
    File(PathBuf),
}

impl ConfigSource {
    pub fn is_embedded(&self) -> bool {
        matches!(self, ConfigSource::Embedded)
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::Embedded => f.write_str("built-in defaults"),
            ConfigSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A validated configuration. Paths are already resolved against the file's directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub source: ConfigSource,
    pub broker: BrokerConfig,
    pub mqtt: MqttConfig,
    pub amqp: AmqpConfig,
    pub listeners: Vec<ListenerConfig>,
    /// The `[[users]]` tables: who may log in, with their password hashes.
    pub users: Vec<User>,
    /// The `[[acl]]` tables: MQTT topic access (none: everything allowed).
    pub acl: Vec<ferry_mqtt::acl::AclEntry>,
    /// The `[[permissions]]` tables: per user and vhost, RabbitMQ's configure / write / read
    /// regexes (none: every user may do everything in every vhost).
    pub permissions: Vec<VhostPermissions>,
    /// The `[[topic_permissions]]` tables: per user, vhost and topic exchange.
    pub topic_permissions: Vec<TopicPermissions>,
    /// The `[[bridges]]` tables: links to other brokers (docs/bridges.md).
    pub bridges: Vec<ferry_bridge::BridgeConfig>,
    /// The `[[listeners]]` tables with `protocol = "http"`: Prometheus `/metrics` and the
    /// management API (docs/management.md), in file order.
    pub http: Vec<HttpListenerConfig>,
    /// The `[[shovels]]` tables: AMQP shovels to or from other brokers (docs/bridges.md).
    pub shovels: Vec<ferry_bridge::ShovelConfig>,
}

impl Config {
    /// The authorization policy this config describes, with the MQTT frontend's topic policy
    /// (the ACL, and its own queues) installed: the ACL covers AMQP connections on the
    /// exchanges MQTT listeners publish to.
    pub fn access_policy(&self) -> AccessPolicy {
        let mut mqtt_exchanges: Vec<MqttExchange> = Vec::new();
        for l in self.listeners.iter().filter(|l| l.protocol == Protocol::Mqtt) {
            let exchange = l.mqtt_exchange.clone().unwrap_or_else(|| DEFAULT_MQTT_EXCHANGE.to_string());
            let m = MqttExchange { vhost: l.vhost.clone(), exchange };
            if !mqtt_exchanges.contains(&m) {
                mqtt_exchanges.push(m);
            }
        }
        AccessPolicy {
            permissions: self.permissions.clone(),
            topic_permissions: self.topic_permissions.clone(),
            topic_policy: std::sync::Arc::new(ferry_mqtt::acl::MqttPolicy::new(ferry_mqtt::acl::Acl::new(
                self.acl.clone(),
            ))),
            mqtt_exchanges,
        }
    }
}

/// Where MQTT listeners publish unless `mqtt_exchange` says otherwise.
pub const DEFAULT_MQTT_EXCHANGE: &str = "amq.topic";

/// The `[mqtt]` table: settings of the MQTT frontend, for every MQTT listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// Keep QoS 0 messages for persistent sessions while their client is away (Mosquitto's
    /// `queue_qos0_messages`).
    pub queue_qos0_offline: bool,
    /// Outbound QoS 1/2 messages in flight to a 3.1.1 client (5.0 clients set their own
    /// Receive Maximum).
    pub max_inflight: u16,
    /// QoS 1/2 publishes a 5.0 client may have unacknowledged towards Ferry.
    pub receive_maximum: u16,
    /// Topic aliases a 5.0 client may use towards Ferry.
    pub topic_alias_maximum: u16,
    /// The longest keep alive allowed, seconds; 0 accepts what clients ask (a longer request,
    /// or none, is answered with Server Keep Alive).
    pub max_keep_alive: u16,
    /// QoS 1/2 messages (and QoS 0 with `queue_qos0_offline`) one session may have queued
    /// beyond those in flight (Mosquitto's `max_queued_messages`); 0: no limit.
    pub max_queued_messages: u32,
    /// Subscriptions one client may hold; a new filter past it gets SUBACK 0x97 Quota exceeded
    /// (5.0) / 0x80 Failure (3.1.1). 0: no limit.
    pub max_subscriptions_per_client: u32,
    /// Topic filters one SUBSCRIBE may carry; the ones past it get the same refusal. 0: no limit.
    pub max_subscriptions_per_packet: u32,
    /// Seconds between updates of `$SYS/broker/...` (Mosquitto's `sys_interval`); 0: none.
    pub sys_interval: u32,
}

/// The `[amqp]` table: settings of the AMQP frontend, for every AMQP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpConfig {
    /// Channels per connection (offered in connection.tune; RabbitMQ's `channel_max`).
    pub channel_max: u16,
    /// Consumers per channel (RabbitMQ's `consumer_max_per_channel`).
    pub consumer_max_per_channel: u32,
    /// The largest message body accepted (RabbitMQ's `max_message_size`).
    pub max_message_size: u64,
}

impl Default for AmqpConfig {
    fn default() -> AmqpConfig {
        let d = ferry_amqp::connection::Settings::default();
        AmqpConfig {
            channel_max: d.channel_max,
            consumer_max_per_channel: d.consumer_max_per_channel,
            max_message_size: d.max_message_size,
        }
    }
}

/// RabbitMQ's hard ceiling on `max_message_size` (512 MiB).
pub const AMQP_MAX_MESSAGE_SIZE_CEILING: u64 = 512 * 1024 * 1024;

impl Default for MqttConfig {
    fn default() -> MqttConfig {
        let d = ferry_mqtt::Settings::default();
        MqttConfig {
            queue_qos0_offline: d.queue_qos0_offline,
            max_inflight: d.max_inflight,
            receive_maximum: d.receive_maximum,
            topic_alias_maximum: d.topic_alias_maximum,
            max_keep_alive: d.max_keep_alive,
            max_queued_messages: d.max_queued_messages,
            max_subscriptions_per_client: d.max_subscriptions_per_client,
            max_subscriptions_per_packet: d.max_subscriptions_per_packet,
            sys_interval: d.sys_interval.as_secs() as u32,
        }
    }
}

/// The `[broker]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerConfig {
    pub data_dir: PathBuf,
    /// A level (`error`…`trace`) or an `EnvFilter` directive; `--log-level` and `RUST_LOG` win.
    pub log_level: String,
    /// Text or JSON lines; `--log-format` wins.
    pub log_format: LogFormat,
    /// Log lines are appended to this file instead of stderr; `--log-file` wins.
    pub log_file: Option<PathBuf>,
    /// How long connections get to close after shutdown starts before they are aborted.
    pub shutdown_grace: Duration,
    /// The memory alarm's high watermark for queued message bodies.
    pub memory_high_watermark: MemoryWatermark,
    /// The disk alarm goes up when the data directory's file system has less free space than
    /// this many bytes (0 = no free-space check; failing writes still raise it).
    pub disk_free_limit: u64,
    /// Open connections on all listeners together; past it new ones are refused in their
    /// protocol's terms.
    pub max_connections: usize,
}

/// RabbitMQ's default `disk_free_limit.absolute` (50 MB).
pub const DEFAULT_DISK_FREE_LIMIT: u64 = 50_000_000;

/// When publishers are blocked (see `ferry_core::broker::MemoryAlarm`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryWatermark {
    /// A fraction of the machine's memory (RabbitMQ's `vm_memory_high_watermark.relative`).
    Relative(f64),
    /// Bytes (RabbitMQ's `vm_memory_high_watermark.absolute`).
    Absolute(u64),
}

/// RabbitMQ's default `vm_memory_high_watermark`.
pub const DEFAULT_MEMORY_HIGH_WATERMARK: f64 = 0.4;

impl MemoryWatermark {
    /// The watermark in bytes on a machine with `total_memory` bytes.
    pub fn bytes(self, total_memory: u64) -> u64 {
        match self {
            MemoryWatermark::Relative(f) => (total_memory as f64 * f) as u64,
            MemoryWatermark::Absolute(b) => b,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> BrokerConfig {
        BrokerConfig {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            log_level: DEFAULT_LOG_LEVEL.to_string(),
            log_format: LogFormat::Text,
            log_file: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            memory_high_watermark: MemoryWatermark::Relative(DEFAULT_MEMORY_HIGH_WATERMARK),
            disk_free_limit: DEFAULT_DISK_FREE_LIMIT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// How a listener's clients carry protocol bytes, under TLS if the listener has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Straight on the TCP (or TLS) stream.
    Tcp,
    /// In binary WebSocket frames after an HTTP upgrade on `path` (MQTT 5.0 §6, 3.1.1 §6).
    WebSocket { path: String },
}

impl Transport {
    pub fn is_websocket(&self) -> bool {
        matches!(self, Transport::WebSocket { .. })
    }
}

/// `tcp` or `ws`, as listener names in logs show it (`mqtt ws 127.0.0.1:8083`).
impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::WebSocket { .. } => "ws",
        })
    }
}

/// The default largest MQTT packet, in bytes.
pub const MQTT_DEFAULT_MAX_PACKET: u32 = 1_048_576;

/// One `[[listeners]]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub protocol: Protocol,
    pub bind: SocketAddr,
    pub transport: Transport,
    pub vhost: String,
    /// MQTT listeners: the exchange MQTT publishes go to and subscriptions bind on (`None`:
    /// the frontend's default, `amq.topic`).
    pub mqtt_exchange: Option<String>,
    pub max_connections: usize,
    /// New connections accepted per second (a token bucket holding one second's worth); past
    /// it, clients wait in the kernel's backlog. 0: no limit.
    pub max_connection_rate: u32,
    /// Messages one connection may publish per second; 0: no limit.
    pub max_publish_rate: u32,
    /// Bytes of direct deliveries waiting for one connection before its publishers are held
    /// back (see `Limits::outbox_bytes`).
    pub outbox_bytes: usize,
    /// SO_SNDBUF / SO_RCVBUF of accepted sockets (see `Limits::socket_send_buffer`); 0: the
    /// kernel's autotuning.
    pub socket_send_buffer: usize,
    pub socket_recv_buffer: usize,
    pub max_frame_size: u32,
    pub handshake_timeout: Duration,
    pub tls: Option<TlsConfig>,
    /// Clients without credentials are let in (as `anonymous`). Defaults to whether `bind` is a
    /// loopback address.
    pub allow_anonymous: bool,
    /// A verified client certificate is the identity (`cert_login`; TLS with `client_ca` only).
    pub cert_login: Option<CertLogin>,
}

impl ListenerConfig {
    /// A listener with every optional key at its default.
    pub fn new(protocol: Protocol, bind: SocketAddr) -> ListenerConfig {
        let limits = Limits::default();
        // MQTT packets carry a whole message (AMQP splits bodies into frames), so MQTT gets a
        // larger default: 1 MiB, EMQX's default `max_packet_size`.
        let max_frame_size = if protocol == Protocol::Mqtt { MQTT_DEFAULT_MAX_PACKET } else { limits.max_frame_size };
        // Bounded for MQTT only, where it was measured to help (see the constant).
        let socket_buffer = if protocol == Protocol::Mqtt { DEFAULT_SOCKET_BUFFER } else { 0 };
        ListenerConfig {
            protocol,
            bind,
            transport: Transport::Tcp,
            vhost: DEFAULT_VHOST.to_string(),
            mqtt_exchange: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connection_rate: DEFAULT_MAX_CONNECTION_RATE,
            max_publish_rate: 0,
            outbox_bytes: limits.outbox_bytes,
            socket_send_buffer: socket_buffer,
            socket_recv_buffer: socket_buffer,
            max_frame_size,
            handshake_timeout: limits.handshake_timeout,
            tls: None,
            allow_anonymous: is_loopback(bind),
            cert_login: None,
        }
    }

    /// Whether the listener is only reachable from this machine (127.0.0.0/8, `::1`, or `::1`
    /// mapped into IPv6). `0.0.0.0` and `[::]` are not: they listen on every interface.
    pub fn is_loopback(&self) -> bool {
        is_loopback(self.bind)
    }

    /// What clients of this listener may log in with besides configured users: anonymous as
    /// `allow_anonymous` says, and RabbitMQ's `guest` / `guest` on loopback only.
    pub fn auth_policy(&self) -> AuthPolicy {
        AuthPolicy { anonymous: self.allow_anonymous, guest: self.is_loopback(), cert_login: self.cert_login }
    }

    /// The limits handed to the frontend; what the file does not set keeps the core's default.
    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_size: self.max_frame_size,
            handshake_timeout: self.handshake_timeout,
            max_publish_rate: self.max_publish_rate,
            outbox_bytes: self.outbox_bytes,
            socket_send_buffer: self.socket_send_buffer,
            socket_recv_buffer: self.socket_recv_buffer,
            ..Limits::default()
        }
    }
}

fn is_loopback(bind: SocketAddr) -> bool {
    bind.ip().to_canonical().is_loopback()
}

/// RabbitMQ's management listener port, where the embedded defaults serve HTTP.
pub const DEFAULT_HTTP_PORT: u16 = 15672;
/// Open HTTP connections one HTTP listener serves at once (monitoring and a few operators, not
/// clients: RabbitMQ's management listener has no limit, Ferry keeps one).
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 256;
/// Queues `/metrics` lists one by one (RabbitMQ's per-object metrics get slow past a few
/// thousand); the rest are counted in `ferry_queues_omitted`.
pub const DEFAULT_METRICS_MAX_QUEUES: usize = 1000;
/// How long an HTTP client has to send a request's headers.
pub const DEFAULT_HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// One `[[listeners]]` table with `protocol = "http"`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpListenerConfig {
    /// Where the table is in the file's `[[listeners]]` (for messages).
    pub index: usize,
    pub bind: SocketAddr,
    pub tls: Option<TlsConfig>,
    pub max_connections: usize,
    /// `handshake_timeout_secs`: the time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// `metrics_max_queues`: queues listed one by one in `/metrics`.
    pub metrics_max_queues: usize,
}

impl HttpListenerConfig {
    pub fn new(index: usize, bind: SocketAddr) -> HttpListenerConfig {
        HttpListenerConfig {
            index,
            bind,
            tls: None,
            max_connections: DEFAULT_HTTP_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HTTP_HEADER_TIMEOUT,
            metrics_max_queues: DEFAULT_METRICS_MAX_QUEUES,
        }
    }

    pub fn is_loopback(&self) -> bool {
        is_loopback(self.bind)
    }
}

/// A listener's `tls` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates are checked against.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate signed by `client_ca`. Without it, a certificate is
    /// asked for, checked if sent, and optional.
    pub require_client_cert: bool,
}

/// Why a configuration was refused. Each message names the file, and the key where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    /// Bad TOML, an unknown key, a missing key or a value of the wrong type: the toml error
    /// names the key and shows the line and column.
    #[error("{}: {error}", path.display())]
    Parse { path: PathBuf, error: toml::de::Error },
    /// The file parses but values are not acceptable: every one found, one line each.
    #[error("{}", Lines(path, problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

/// One value that is not acceptable: the key (`listeners[0].vhost`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

/// `FILE: key: reason`, one line per problem.
struct Lines<'a>(&'a Path, &'a [Problem]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, Problem { key, reason }) in self.1.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {key}: {reason}", self.0.display())?;
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Config {
        Config::embedded_defaults()
    }
}

impl Config {
    /// What Ferry runs with when no file is given: MQTT on 127.0.0.1:1883, AMQP on
    /// 127.0.0.1:5672, data in `./ferry-data`.
    pub fn embedded_defaults() -> Config {
        let localhost = std::net::Ipv4Addr::LOCALHOST;
        Config {
            source: ConfigSource::Embedded,
            broker: BrokerConfig::default(),
            mqtt: MqttConfig::default(),
            amqp: AmqpConfig::default(),
            listeners: vec![
                ListenerConfig::new(Protocol::Mqtt, SocketAddr::from((localhost, 1883))),
                ListenerConfig::new(Protocol::Amqp, SocketAddr::from((localhost, 5672))),
            ],
            users: Vec::new(),
            acl: Vec::new(),
            permissions: Vec::new(),
            topic_permissions: Vec::new(),
            bridges: Vec::new(),
            // RabbitMQ's management listener: on by default, on loopback.
            http: vec![HttpListenerConfig::new(2, SocketAddr::from((localhost, DEFAULT_HTTP_PORT)))],
            shovels: Vec::new(),
        }
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_path_buf(), error })?;
        Config::from_toml_str(&text, path)
    }

    /// Parses and validates `text` as if read from `path`: `path` names the file in errors and
    /// its directory is what relative paths are resolved against.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let (config, problems) = Config::from_toml_str_with_problems(text, path)?;
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { path: path.to_path_buf(), problems })
        }
    }

    /// Reads a file as far as it can be read: the configuration with every refused value left
    /// at its default (a refused user, ACL entry or permission left out), and every problem.
    /// For `ferry check-config`, which goes on to check what it can of the rest (TLS files).
    /// Fails only when the file cannot be read or is not TOML of the expected shape.
    pub fn load_with_problems(path: &Path) -> Result<(Config, Vec<Problem>), ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_path_buf(), error })?;
        Config::from_toml_str_with_problems(&text, path)
    }

    fn from_toml_str_with_problems(text: &str, path: &Path) -> Result<(Config, Vec<Problem>), ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|error| ConfigError::Parse { path: path.to_path_buf(), error })?;
        let validator =
            Validator { path, base: path.parent().unwrap_or(Path::new("")), problems: RefCell::new(Vec::new()) };
        let config = validator.config(raw);
        Ok((config, validator.problems.into_inner()))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    broker: RawBroker,
    #[serde(default)]
    mqtt: RawMqtt,
    #[serde(default)]
    amqp: RawAmqp,
    listeners: Option<Vec<RawListener>>,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    acl: Vec<RawAcl>,
    #[serde(default)]
    permissions: Vec<RawPermissions>,
    #[serde(default)]
    topic_permissions: Vec<RawTopicPermissions>,
    #[serde(default)]
    bridges: Vec<RawBridge>,
    #[serde(default)]
    shovels: Vec<RawShovel>,
}

use ferry_bridge::shovel::spec::RawShovel;
use ferry_bridge::spec::RawBridge;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPermissions {
    user: String,
    vhost: Option<String>,
    configure: String,
    write: String,
    read: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopicPermissions {
    user: String,
    vhost: Option<String>,
    exchange: String,
    write: String,
    read: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcl {
    user: Option<String>,
    topic: String,
    access: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    password_hash: String,
    #[serde(default)]
    tags: Vec<String>,
}

/// Names the user only: the hash stays out of debug output.
impl fmt::Debug for RawUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawUser").field("name", &self.name).finish_non_exhaustive()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    queue_qos0_offline: Option<bool>,
    max_inflight: Option<u16>,
    receive_maximum: Option<u16>,
    topic_alias_maximum: Option<u16>,
    max_keep_alive: Option<u16>,
    max_queued_messages: Option<u32>,
    max_subscriptions_per_client: Option<u32>,
    max_subscriptions_per_packet: Option<u32>,
    sys_interval: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAmqp {
    channel_max: Option<u16>,
    consumer_max_per_channel: Option<u32>,
    max_message_size: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    data_dir: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<String>,
    log_file: Option<PathBuf>,
    shutdown_grace_secs: Option<u64>,
    memory_high_watermark: Option<f64>,
    memory_high_watermark_bytes: Option<u64>,
    disk_free_limit_bytes: Option<u64>,
    max_connections: Option<usize>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawProtocol {
    Mqtt,
    Amqp,
    Http,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawTransport {
    Tcp,
    Websocket,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    protocol: RawProtocol,
    bind: SocketAddr,
    transport: Option<RawTransport>,
    path: Option<String>,
    vhost: Option<String>,
    mqtt_exchange: Option<String>,
    max_connections: Option<usize>,
    max_connection_rate: Option<u32>,
    max_publish_rate: Option<u32>,
    outbox_bytes: Option<usize>,
    socket_send_buffer: Option<usize>,
    socket_recv_buffer: Option<usize>,
    max_frame_size: Option<u32>,
    handshake_timeout_secs: Option<u64>,
    tls: Option<RawTls>,
    allow_anonymous: Option<bool>,
    cert_login: Option<String>,
    metrics_max_queues: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    #[serde(default)]
    require_client_cert: bool,
}

struct Validator<'a> {
    path: &'a Path,
    /// The config file's directory: relative paths in the file are relative to it.
    base: &'a Path,
    /// Every problem found so far: validation goes on past one, so that a file is refused
    /// with all of them at once.
    problems: RefCell<Vec<Problem>>,
}

impl ferry_bridge::spec::Checker for Validator<'_> {
    fn report_problem(&self, key: String, reason: String) {
        self.report(key, reason);
    }
    fn path(&self, key: &str, p: PathBuf) -> Option<PathBuf> {
        self.check(self.resolve(key, p))
    }
    fn vhost(&self, key: String, vhost: Option<String>) -> Option<String> {
        Validator::vhost(self, key, vhost)
    }
}

impl Validator<'_> {
    fn invalid(&self, key: impl Into<String>, reason: impl Into<String>) -> Problem {
        Problem { key: key.into(), reason: reason.into() }
    }

    /// Records a problem; validation goes on.
    fn report(&self, key: impl Into<String>, reason: impl Into<String>) {
        self.problems.borrow_mut().push(self.invalid(key, reason));
    }

    /// The value, or `None` with its problem recorded.
    fn check<T>(&self, result: Result<T, Problem>) -> Option<T> {
        result.map_err(|p| self.problems.borrow_mut().push(p)).ok()
    }

    fn resolve(&self, key: &str, p: PathBuf) -> Result<PathBuf, Problem> {
        if p.as_os_str().is_empty() {
            return Err(self.invalid(key, "must not be empty"));
        }
        Ok(if p.is_absolute() { p } else { self.base.join(p) })
    }

    /// The configuration, with what was refused left at its default (a listener without the
    /// bad key, a user or an ACL entry left out); the problems are in `self.problems`.
    fn config(&self, raw: RawConfig) -> Config {
        let broker = self.broker(raw.broker);
        let mqtt = self.mqtt(raw.mqtt);
        let amqp = self.amqp(raw.amqp);
        let raw_listeners = raw.listeners.unwrap_or_default();
        if raw_listeners.is_empty() {
            self.report("listeners", "at least one [[listeners]] table is required");
        }
        let mut listeners = Vec::with_capacity(raw_listeners.len());
        let mut http = Vec::new();
        let mut binds: HashMap<SocketAddr, usize> = HashMap::new();
        for (index, raw) in raw_listeners.into_iter().enumerate() {
            let bind = raw.bind;
            if matches!(raw.protocol, RawProtocol::Http) {
                http.push(self.http_listener(index, raw));
            } else {
                listeners.push(self.listener(index, raw));
            }
            // Port 0 asks the OS for a fresh port each time, so it never clashes.
            if bind.port() != 0 {
                if let Some(first) = binds.insert(bind, index) {
                    self.report(
                        format!("listeners[{index}].bind"),
                        format!("{bind} is already used by listeners[{first}]"),
                    );
                }
            }
        }
        let users = self.users(raw.users);
        // With a cert_login listener any name may be a certificate's, which [[users]] never lists.
        let certificates = listeners.iter().any(|l| l.cert_login.is_some());
        let acl = self.acl(raw.acl, &users, certificates);
        let permissions = self.permissions(raw.permissions, &users, certificates);
        let topic_permissions = self.topic_permissions(raw.topic_permissions, &users, certificates);
        let bridges = self.bridges(raw.bridges);
        let shovels = self.shovels(raw.shovels, &bridges);
        Config {
            source: ConfigSource::File(self.path.to_path_buf()),
            broker,
            mqtt,
            amqp,
            listeners,
            users,
            acl,
            permissions,
            topic_permissions,
            bridges,
            http,
            shovels,
        }
    }

    /// The `[[shovels]]` tables (checked by `ferry_bridge::shovel::spec`, as the management
    /// API's); a refused shovel is left out. Names are unique among bridges and shovels (both
    /// name a local queue `ferry-bridge.<name>`).
    fn shovels(&self, raw: Vec<RawShovel>, bridges: &[ferry_bridge::BridgeConfig]) -> Vec<ferry_bridge::ShovelConfig> {
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (index, raw) in raw.into_iter().enumerate() {
            let before = self.problems.borrow().len();
            let key = |k: &str| format!("shovels[{index}].{k}");
            if let Some(first) = names.insert(raw.name.clone(), index) {
                self.report(key("name"), format!("{:?} is already shovels[{first}]", raw.name));
            } else if let Some(b) = bridges.iter().position(|b| b.name == raw.name) {
                self.report(key("name"), format!("{:?} is already bridges[{b}]", raw.name));
            }
            let s = ferry_bridge::shovel::spec::shovel(self, &key, raw);
            if let (Some(s), true) = (s, self.problems.borrow().len() == before) {
                out.push(s);
            }
        }
        out
    }

    /// The `[[bridges]]` tables (checked by `ferry_bridge::spec`, as the management API's);
    /// a refused bridge is left out.
    fn bridges(&self, raw: Vec<RawBridge>) -> Vec<ferry_bridge::BridgeConfig> {
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (index, raw) in raw.into_iter().enumerate() {
            let before = self.problems.borrow().len();
            let key = |k: &str| format!("bridges[{index}].{k}");
            if let Some(first) = names.insert(raw.name.clone(), index) {
                self.report(key("name"), format!("{:?} is already bridges[{first}]", raw.name));
            }
            let b = ferry_bridge::spec::bridge(self, &key, raw);
            if self.problems.borrow().len() == before {
                out.push(b);
            }
        }
        out
    }

    /// A permission or an ACL entry must name a user that can log in: a configured one, `guest`
    /// (on loopback listeners) or `anonymous`, as `rabbitmqctl set_permissions` refuses unknown
    /// users; or, when a listener takes client certificates as identities (`certificates`), any
    /// name.
    fn known_user(&self, key: String, user: &str, users: &[User], certificates: bool) -> Result<(), Problem> {
        if user.is_empty() {
            return Err(self.invalid(key, "must not be empty"));
        }
        if certificates || users.iter().any(|u| u.name == user) || user == GUEST_USER || user == ANONYMOUS_USER {
            return Ok(());
        }
        Err(self.invalid(
            key,
            format!("{user:?} is not a configured user (nor guest or anonymous, and no listener has cert_login)"),
        ))
    }

    /// A vhost named in an entry (the default one when left out).
    fn vhost(&self, key: String, vhost: Option<String>) -> Option<String> {
        let vhost = vhost.unwrap_or_else(|| DEFAULT_VHOST.to_string());
        if vhost.is_empty() {
            self.report(key, "must not be empty");
            return None;
        }
        Some(vhost)
    }

    fn permissions(&self, raw: Vec<RawPermissions>, users: &[User], certificates: bool) -> Vec<VhostPermissions> {
        let mut seen: HashMap<(String, String), usize> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (index, RawPermissions { user, vhost, configure, write, read }) in raw.into_iter().enumerate() {
            let known = self.check(self.known_user(format!("permissions[{index}].user"), &user, users, certificates));
            let vhost = self.vhost(format!("permissions[{index}].vhost"), vhost);
            if let Some(vhost) = &vhost {
                if let Some(first) = seen.insert((user.clone(), vhost.clone()), index) {
                    self.report(
                        format!("permissions[{index}]"),
                        format!("user {user:?} on vhost {vhost:?} is already permissions[{first}]"),
                    );
                }
            }
            let pattern = |field: &str, source: &str| {
                self.check(
                    Pattern::new(source)
                        .map_err(|reason| self.invalid(format!("permissions[{index}].{field}"), reason)),
                )
            };
            let (configure, write, read) =
                (pattern("configure", &configure), pattern("write", &write), pattern("read", &read));
            if let (Some(()), Some(vhost), Some(configure), Some(write), Some(read)) =
                (known, vhost, configure, write, read)
            {
                out.push(VhostPermissions { configure, write, read, user, vhost });
            }
        }
        out
    }

    fn topic_permissions(
        &self,
        raw: Vec<RawTopicPermissions>,
        users: &[User],
        certificates: bool,
    ) -> Vec<TopicPermissions> {
        let mut seen: HashMap<(String, String, String), usize> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (index, RawTopicPermissions { user, vhost, exchange, write, read }) in raw.into_iter().enumerate() {
            let mut ok = self
                .check(self.known_user(format!("topic_permissions[{index}].user"), &user, users, certificates))
                .is_some();
            let vhost = self.vhost(format!("topic_permissions[{index}].vhost"), vhost);
            if exchange.is_empty() {
                self.report(format!("topic_permissions[{index}].exchange"), "must not be empty");
                ok = false;
            }
            if let Some(vhost) = &vhost {
                if let Some(first) = seen.insert((user.clone(), vhost.clone(), exchange.clone()), index) {
                    self.report(
                        format!("topic_permissions[{index}]"),
                        format!("user {user:?} on exchange {exchange:?} in vhost {vhost:?} is already topic_permissions[{first}]"),
                    );
                }
            }
            for (field, template) in [("write", &write), ("read", &read)] {
                let valid = TopicPermissions::validate(template)
                    .map_err(|reason| self.invalid(format!("topic_permissions[{index}].{field}"), reason));
                ok &= self.check(valid).is_some();
            }
            if let (true, Some(vhost)) = (ok, vhost) {
                out.push(TopicPermissions { user, vhost, exchange, write, read });
            }
        }
        out
    }

    fn acl(&self, raw: Vec<RawAcl>, users: &[User], certificates: bool) -> Vec<ferry_mqtt::acl::AclEntry> {
        use ferry_mqtt::acl::{Access, AclEntry};
        let mut entries = Vec::with_capacity(raw.len());
        for (index, RawAcl { user, topic, access }) in raw.into_iter().enumerate() {
            let key = format!("acl[{index}].user");
            let known = match user.as_deref() {
                None => true,
                Some("") => {
                    self.report(key, "must not be empty (leave it out for all users)");
                    false
                }
                // The rule [[permissions]] follow: a name nobody can log in as is a mistake.
                Some(name) => self.check(self.known_user(key, name, users, certificates)).is_some(),
            };
            let topic_ok = self.check(
                AclEntry::validate_topic(&topic).map_err(|reason| self.invalid(format!("acl[{index}].topic"), reason)),
            );
            let access = self.check(Access::parse(&access).ok_or_else(|| {
                self.invalid(format!("acl[{index}].access"), format!("{access:?}: expected read, write or readwrite"))
            }));
            if let (true, Some(()), Some(access)) = (known, topic_ok, access) {
                entries.push(AclEntry { user, topic, access });
            }
        }
        entries
    }

    fn users(&self, raw: Vec<RawUser>) -> Vec<User> {
        let mut users = Vec::with_capacity(raw.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        for (index, RawUser { name, password_hash, tags }) in raw.into_iter().enumerate() {
            let mut ok = true;
            if name.is_empty() {
                self.report(format!("users[{index}].name"), "must not be empty");
                ok = false;
            } else if let Some(first) = names.insert(name.clone(), index) {
                self.report(format!("users[{index}].name"), format!("{name:?} is already users[{first}]"));
                ok = false;
            }
            // The reason never repeats the hash.
            let hash = self.check(
                PasswordHash::parse(&password_hash)
                    .map_err(|reason| self.invalid(format!("users[{index}].password_hash"), reason)),
            );
            for tag in &tags {
                if tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                    self.report(
                        format!("users[{index}].tags"),
                        format!(
                            "{tag:?}: a tag is letters, digits, '_' or '-' (administrator, monitoring, management…)"
                        ),
                    );
                    ok = false;
                }
            }
            if let (true, Some(hash)) = (ok, hash) {
                users.push(User { name, hash, tags });
            }
        }
        users
    }

    fn mqtt(&self, raw: RawMqtt) -> MqttConfig {
        let mut m = MqttConfig::default();
        if let Some(v) = raw.queue_qos0_offline {
            m.queue_qos0_offline = v;
        }
        for (key, value, slot) in [
            ("mqtt.max_inflight", raw.max_inflight, &mut m.max_inflight),
            ("mqtt.receive_maximum", raw.receive_maximum, &mut m.receive_maximum),
        ] {
            match value {
                // MQTT 5 §3.1.2.11.3: a Receive Maximum of 0 is a protocol error; a window of 0
                // would deliver nothing.
                Some(0) => self.report(key, "must be at least 1"),
                Some(v) => *slot = v,
                None => {}
            }
        }
        if let Some(v) = raw.topic_alias_maximum {
            m.topic_alias_maximum = v;
        }
        if let Some(v) = raw.max_keep_alive {
            m.max_keep_alive = v;
        }
        if let Some(v) = raw.max_queued_messages {
            m.max_queued_messages = v;
        }
        if let Some(v) = raw.max_subscriptions_per_client {
            m.max_subscriptions_per_client = v;
        }
        if let Some(v) = raw.max_subscriptions_per_packet {
            m.max_subscriptions_per_packet = v;
        }
        if let Some(v) = raw.sys_interval {
            m.sys_interval = v;
        }
        m
    }

    fn amqp(&self, raw: RawAmqp) -> AmqpConfig {
        let mut a = AmqpConfig::default();
        match raw.channel_max {
            Some(0) => self.report("amqp.channel_max", "must be at least 1"),
            Some(v) => a.channel_max = v,
            None => {}
        }
        match raw.consumer_max_per_channel {
            Some(0) => self.report("amqp.consumer_max_per_channel", "must be at least 1"),
            Some(v) => a.consumer_max_per_channel = v,
            None => {}
        }
        if let Some(v) = raw.max_message_size {
            if v == 0 || v > AMQP_MAX_MESSAGE_SIZE_CEILING {
                self.report(
                    "amqp.max_message_size",
                    format!(
                        "must be between 1 and {AMQP_MAX_MESSAGE_SIZE_CEILING} ({}, RabbitMQ's ceiling)",
                        ByteSize(AMQP_MAX_MESSAGE_SIZE_CEILING)
                    ),
                );
            } else {
                a.max_message_size = v;
            }
        }
        a
    }

    fn broker(&self, raw: RawBroker) -> BrokerConfig {
        let mut broker = BrokerConfig::default();
        if let Some(dir) = raw.data_dir {
            if let Some(dir) = self.check(self.resolve("broker.data_dir", dir)) {
                broker.data_dir = dir;
            }
        }
        if let Some(level) = raw.log_level {
            match crate::logging::parse_filter(&level) {
                Ok(_) => broker.log_level = level,
                Err(e) => self.report("broker.log_level", e.to_string()),
            }
        }
        if let Some(format) = raw.log_format {
            match format.parse() {
                Ok(format) => broker.log_format = format,
                Err(reason) => self.report("broker.log_format", reason),
            }
        }
        if let Some(file) = raw.log_file {
            broker.log_file = self.check(self.resolve("broker.log_file", file));
        }
        if let Some(secs) = raw.shutdown_grace_secs {
            broker.shutdown_grace = Duration::from_secs(secs);
        }
        match (raw.memory_high_watermark, raw.memory_high_watermark_bytes) {
            (Some(_), Some(_)) => self.report(
                "broker.memory_high_watermark_bytes",
                "give either memory_high_watermark (a fraction) or memory_high_watermark_bytes, not both",
            ),
            (Some(f), None) => {
                if f > 0.0 && f <= 1.0 {
                    broker.memory_high_watermark = MemoryWatermark::Relative(f);
                } else {
                    self.report(
                        "broker.memory_high_watermark",
                        format!("must be a fraction of memory above 0 and at most 1, not {f}"),
                    );
                }
            }
            (None, Some(b)) => broker.memory_high_watermark = MemoryWatermark::Absolute(b),
            (None, None) => {}
        }
        if let Some(b) = raw.disk_free_limit_bytes {
            broker.disk_free_limit = b;
        }
        if let Some(n) = raw.max_connections {
            if n == 0 || n > MAX_CONNECTIONS_CEILING {
                self.report("broker.max_connections", format!("must be between 1 and {MAX_CONNECTIONS_CEILING}"));
            } else {
                broker.max_connections = n;
            }
        }
        broker
    }

    fn transport(
        &self,
        index: usize,
        protocol: Protocol,
        transport: Option<RawTransport>,
        path: Option<String>,
    ) -> Result<Transport, Problem> {
        let key = |name: &str| format!("listeners[{index}].{name}");
        match transport.unwrap_or(RawTransport::Tcp) {
            RawTransport::Tcp => match path {
                None => Ok(Transport::Tcp),
                Some(_) => Err(self.invalid(key("path"), "only valid with transport = \"websocket\"")),
            },
            // RabbitMQ's AMQP 0-9-1 clients connect over TCP only; AMQP over WebSocket would need a
            // subprotocol no client here speaks.
            RawTransport::Websocket if protocol != Protocol::Mqtt => Err(self.invalid(
                key("transport"),
                format!("\"websocket\" is only available with protocol = \"mqtt\", not \"{protocol}\""),
            )),
            RawTransport::Websocket => {
                let path = path.unwrap_or_else(|| DEFAULT_WEBSOCKET_PATH.to_string());
                check_websocket_path(&path).map_err(|reason| self.invalid(key("path"), reason))?;
                Ok(Transport::WebSocket { path })
            }
        }
    }

    /// The listener, with any key that was refused left at its default.
    fn listener(&self, index: usize, raw: RawListener) -> ListenerConfig {
        let key = |name: &str| format!("listeners[{index}].{name}");
        let protocol = match raw.protocol {
            RawProtocol::Mqtt => Protocol::Mqtt,
            RawProtocol::Amqp => Protocol::Amqp,
            RawProtocol::Http => unreachable!("http listeners are read by Validator::http_listener"),
        };
        if raw.metrics_max_queues.is_some() {
            self.report(key("metrics_max_queues"), format!("only valid with protocol = \"http\", not \"{protocol}\""));
        }
        let mut listener = ListenerConfig::new(protocol, raw.bind);
        let client_ca_given = raw.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if let Some(transport) = self.check(self.transport(index, protocol, raw.transport, raw.path)) {
            listener.transport = transport;
        }
        match raw.vhost {
            Some(vhost) if vhost.is_empty() => self.report(key("vhost"), "must not be empty"),
            Some(vhost) => listener.vhost = vhost,
            None => {}
        }
        if let Some(exchange) = raw.mqtt_exchange {
            match check_mqtt_exchange(protocol, &exchange) {
                Ok(()) => listener.mqtt_exchange = Some(exchange),
                Err(reason) => self.report(key("mqtt_exchange"), reason),
            }
        }
        if let Some(n) = raw.max_connections {
            if n == 0 {
                self.report(key("max_connections"), "must be at least 1");
            } else if n > tokio::sync::Semaphore::MAX_PERMITS {
                self.report(key("max_connections"), format!("must be at most {}", tokio::sync::Semaphore::MAX_PERMITS));
            } else {
                listener.max_connections = n;
            }
        }
        if let Some(rate) = raw.max_connection_rate {
            listener.max_connection_rate = rate;
        }
        if let Some(rate) = raw.max_publish_rate {
            listener.max_publish_rate = rate;
        }
        if let Some(bytes) = raw.outbox_bytes {
            // Below one packet's worth it would hold every message alone; 0 would mean none.
            if bytes < 1024 {
                self.report(key("outbox_bytes"), "must be at least 1024");
            } else {
                listener.outbox_bytes = bytes;
            }
        }
        // The kernel clamps what is asked to net.core.wmem_max / rmem_max; below 4 KiB a
        // buffer holds less than one full-sized segment.
        for (name, given, set) in [
            ("socket_send_buffer", raw.socket_send_buffer, &mut listener.socket_send_buffer),
            ("socket_recv_buffer", raw.socket_recv_buffer, &mut listener.socket_recv_buffer),
        ] {
            match given {
                Some(n) if n != 0 && n < 4096 => {
                    self.report(key(name), "must be 0 (the kernel's autotuning) or at least 4096")
                }
                Some(n) => *set = n,
                None => {}
            }
        }
        if let Some(size) = raw.max_frame_size {
            let min = if protocol == Protocol::Amqp { AMQP_FRAME_MIN_SIZE } else { 1 };
            if size < min {
                let why = if protocol == Protocol::Amqp { " (AMQP 0-9-1 frame-min-size)" } else { "" };
                self.report(key("max_frame_size"), format!("must be at least {min}{why}"));
            } else {
                listener.max_frame_size = size;
            }
        }
        match raw.handshake_timeout_secs {
            Some(0) => self.report(key("handshake_timeout_secs"), "must be at least 1"),
            Some(secs) => listener.handshake_timeout = Duration::from_secs(secs),
            None => {}
        }
        if let Some(allow) = raw.allow_anonymous {
            listener.allow_anonymous = allow;
        }
        if let Some(tls) = raw.tls {
            let mut ok = true;
            if tls.require_client_cert && tls.client_ca.is_none() {
                self.report(
                    key("tls.require_client_cert"),
                    format!("requires {} (the CA that signs client certificates)", key("tls.client_ca")),
                );
                ok = false;
            }
            let cert = self.check(self.resolve(&key("tls.cert"), tls.cert));
            let tls_key = self.check(self.resolve(&key("tls.key"), tls.key));
            let client_ca = tls.client_ca.map(|p| self.check(self.resolve(&key("tls.client_ca"), p)));
            // A listener whose tls table was refused has none: `check` then loads no files for it.
            if let (true, Some(cert), Some(key), Some(client_ca)) =
                (ok, cert, tls_key, client_ca.map_or(Some(None), |c| c.map(Some)))
            {
                listener.tls = Some(TlsConfig { cert, key, client_ca, require_client_cert: tls.require_client_cert });
            }
        }
        if let Some(from) = raw.cert_login {
            match CertLogin::parse(&from) {
                None => self.report(key("cert_login"), format!("{from:?}: expected common_name or distinguished_name")),
                // A client_ca in a tls table refused for another reason still counts: that is
                // reported on its own.
                Some(_) if !client_ca_given => self.report(
                    key("cert_login"),
                    format!("requires {} (client certificates are verified against it)", key("tls.client_ca")),
                ),
                Some(parsed) => listener.cert_login = Some(parsed),
            }
        }
        listener
    }
}

impl Validator<'_> {
    /// A `protocol = "http"` listener; keys that only a protocol listener has are refused.
    fn http_listener(&self, index: usize, raw: RawListener) -> HttpListenerConfig {
        let key = |name: &str| format!("listeners[{index}].{name}");
        let mut http = HttpListenerConfig::new(index, raw.bind);
        let not_http = [
            ("transport", raw.transport.is_some()),
            ("path", raw.path.is_some()),
            ("vhost", raw.vhost.is_some()),
            ("mqtt_exchange", raw.mqtt_exchange.is_some()),
            ("max_connection_rate", raw.max_connection_rate.is_some()),
            ("max_publish_rate", raw.max_publish_rate.is_some()),
            ("outbox_bytes", raw.outbox_bytes.is_some()),
            ("socket_send_buffer", raw.socket_send_buffer.is_some()),
            ("socket_recv_buffer", raw.socket_recv_buffer.is_some()),
            ("max_frame_size", raw.max_frame_size.is_some()),
            ("allow_anonymous", raw.allow_anonymous.is_some()),
            ("cert_login", raw.cert_login.is_some()),
        ];
        for (name, given) in not_http {
            if given {
                self.report(
                    key(name),
                    "not valid with protocol = \"http\" (the management API always asks for a user)",
                );
            }
        }
        if let Some(n) = raw.max_connections {
            if n == 0 || n > MAX_CONNECTIONS_CEILING {
                self.report(key("max_connections"), format!("must be between 1 and {MAX_CONNECTIONS_CEILING}"));
            } else {
                http.max_connections = n;
            }
        }
        match raw.handshake_timeout_secs {
            Some(0) => self.report(key("handshake_timeout_secs"), "must be at least 1"),
            Some(secs) => http.header_timeout = Duration::from_secs(secs),
            None => {}
        }
        if let Some(n) = raw.metrics_max_queues {
            http.metrics_max_queues = n;
        }
        if let Some(tls) = raw.tls {
            if tls.client_ca.is_some() || tls.require_client_cert {
                self.report(key("tls.client_ca"), "client certificates are not used by the HTTP listener");
            }
            let cert = self.check(self.resolve(&key("tls.cert"), tls.cert));
            let tls_key = self.check(self.resolve(&key("tls.key"), tls.key));
            if let (Some(cert), Some(key)) = (cert, tls_key) {
                http.tls = Some(TlsConfig { cert, key, client_ca: None, require_client_cert: false });
            }
        }
        http
    }
}

/// An MQTT listener's exchange: a name an AMQP client could declare (or `amq.topic`), since
/// MQTT sessions declare it as a durable topic exchange when it does not exist yet.
fn check_mqtt_exchange(protocol: Protocol, name: &str) -> Result<(), String> {
    if protocol != Protocol::Mqtt {
        return Err(format!("only valid with protocol = \"mqtt\", not \"{protocol}\""));
    }
    if name.is_empty() {
        return Err("must not be empty (the default exchange cannot route by topic)".into());
    }
    if name.len() > 255 {
        return Err(format!("{} bytes; exchange names are at most 255", name.len()));
    }
    if name.starts_with("amq.") && name != "amq.topic" {
        return Err(format!("{name:?}: of the predeclared amq.* exchanges only \"amq.topic\" routes by topic"));
    }
    Ok(())
}

/// A request path as it appears in an HTTP request line: absolute, and without a query, a
/// fragment or anything a request line cannot carry.
fn check_websocket_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with '/'"));
    }
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic() || matches!(c, '?' | '#')) {
        return Err(format!("{path:?} must not contain {c:?} (only the path of a URL, in printable ASCII)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("/etc/ferry/ferry.toml"))
    }

    /// The error's message, asserting it names the file.
    fn error(text: &str) -> String {
        let err = parse(text).expect_err("config should be refused");
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/ferry/ferry.toml: "), "message does not name the file: {msg}");
        msg
    }

    const MINIMAL: &str = "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:1883\"\n";

    #[test]
    fn embedded_defaults_listen_on_mqtt_and_amqp_ports() {
        let c = Config::embedded_defaults();
        assert_eq!(c.source, ConfigSource::Embedded);
        assert_eq!(c.broker.data_dir, PathBuf::from("./ferry-data"));
        assert_eq!(c.broker.log_level, "info");
        assert_eq!(c.broker.shutdown_grace, Duration::from_secs(10));
        let binds: Vec<_> = c.listeners.iter().map(|l| (l.protocol, l.bind.to_string())).collect();
        assert_eq!(binds, vec![(Protocol::Mqtt, "127.0.0.1:1883".into()), (Protocol::Amqp, "127.0.0.1:5672".into())]);
        assert!(c.listeners.iter().all(|l| l.tls.is_none() && l.vhost == "/"));
    }

    #[test]
    fn embedded_defaults_serve_http_on_rabbitmqs_management_port() {
        let c = Config::embedded_defaults();
        let http: Vec<_> = c.http.iter().map(|h| h.bind.to_string()).collect();
        assert_eq!(http, ["127.0.0.1:15672"]);
        assert_eq!(c.http[0].metrics_max_queues, DEFAULT_METRICS_MAX_QUEUES);
    }

    #[test]
    fn an_http_listener_and_user_tags_are_read() {
        let c = parse(&format!(
            "{MINIMAL}[[listeners]]\nprotocol = \"http\"\nbind = \"127.0.0.1:15672\"\nmetrics_max_queues = 50\n\
             max_connections = 8\nhandshake_timeout_secs = 3\n\
             [[users]]\nname = \"ops\"\npassword_hash = \"{}\"\ntags = [\"administrator\", \"monitoring\"]\n",
            PasswordHash::argon2id(b"pw")
        ))
        .unwrap();
        assert_eq!(c.listeners.len(), 1, "http listeners are kept apart");
        let h = &c.http[0];
        assert_eq!((h.index, h.bind.port(), h.metrics_max_queues, h.max_connections), (1, 15672, 50, 8));
        assert_eq!(h.header_timeout, Duration::from_secs(3));
        assert_eq!(c.users[0].tags, ["administrator", "monitoring"]);
    }

    #[test]
    fn keys_of_the_other_listener_kind_are_refused() {
        let msg =
            error(&format!("{MINIMAL}[[listeners]]\nprotocol = \"http\"\nbind = \"127.0.0.1:1\"\nvhost = \"v\"\n"));
        assert!(msg.contains("listeners[1].vhost: not valid with protocol = \"http\""), "{msg}");
        let msg = error(&format!("{MINIMAL}metrics_max_queues = 5\n"));
        assert!(msg.contains("listeners[0].metrics_max_queues: only valid with protocol = \"http\""), "{msg}");
        let msg = error(&format!("{MINIMAL}[[listeners]]\nprotocol = \"http\"\nbind = \"127.0.0.1:1883\"\n"));
        assert!(msg.contains("listeners[1].bind: 127.0.0.1:1883 is already used by listeners[0]"), "{msg}");
        let msg = error(&format!(
            "{MINIMAL}[[users]]\nname = \"u\"\npassword_hash = \"{}\"\ntags = [\"a b\"]\n",
            PasswordHash::argon2id(b"pw")
        ));
        assert!(msg.contains("users[0].tags: \"a b\""), "{msg}");
    }

    #[test]
    fn minimal_file_gets_defaults_for_every_optional_key() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.source, ConfigSource::File("/etc/ferry/ferry.toml".into()));
        assert_eq!(c.broker, BrokerConfig::default());
        let l = &c.listeners[0];
        assert_eq!(l.vhost, "/");
        assert_eq!(l.max_connections, 65_536);
        assert_eq!(l.max_frame_size, MQTT_DEFAULT_MAX_PACKET, "MQTT listeners take whole messages in one packet");
        assert_eq!(l.handshake_timeout, Duration::from_secs(10));
        assert_eq!(l.tls, None);
        assert_eq!(l.transport, Transport::Tcp);
        assert_eq!(
            l.limits(),
            Limits {
                max_frame_size: MQTT_DEFAULT_MAX_PACKET,
                socket_send_buffer: DEFAULT_SOCKET_BUFFER,
                socket_recv_buffer: DEFAULT_SOCKET_BUFFER,
                ..Limits::default()
            }
        );
        assert_eq!(ListenerConfig::new(Protocol::Amqp, l.bind).max_frame_size, Limits::default().max_frame_size);
    }

    #[test]
    fn websocket_transport_defaults_to_the_mqtt_path() {
        let c = parse(&format!("{MINIMAL}transport = \"websocket\"\n")).unwrap();
        assert_eq!(c.listeners[0].transport, Transport::WebSocket { path: "/mqtt".into() });
        assert_eq!(c.listeners[0].transport.to_string(), "ws");
    }

    #[test]
    fn websocket_path_and_tls_are_read() {
        let c = parse(&format!(
            "{MINIMAL}transport = \"websocket\"\npath = \"/brokers/ferry/mqtt\"\ntls = {{ cert = \"c\", key = \"k\" }}\n"
        ))
        .unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.transport, Transport::WebSocket { path: "/brokers/ferry/mqtt".into() });
        assert!(l.tls.is_some(), "tls + websocket is wss");
    }

    #[test]
    fn explicit_tcp_transport_is_the_default() {
        let c = parse(&format!("{MINIMAL}transport = \"tcp\"\n")).unwrap();
        assert_eq!(c.listeners[0].transport, Transport::Tcp);
        assert_eq!(c.listeners[0].transport.to_string(), "tcp");
    }

    #[test]
    fn path_without_websocket_is_refused() {
        for transport in ["", "transport = \"tcp\"\n"] {
            let msg = error(&format!("{MINIMAL}{transport}path = \"/mqtt\"\n"));
            assert!(msg.contains("listeners[0].path: only valid with transport = \"websocket\""), "{msg}");
        }
    }

    #[test]
    fn websocket_for_amqp_is_refused_naming_the_transport() {
        let msg = error("[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:1\"\ntransport = \"websocket\"\n");
        assert!(
            msg.contains("listeners[0].transport: \"websocket\" is only available with protocol = \"mqtt\""),
            "{msg}"
        );
    }

    #[test]
    fn bad_websocket_paths_are_refused() {
        for (path, why) in [
            ("mqtt", "must start with '/'"),
            ("", "must start with '/'"),
            ("/mqtt?x=1", "must not contain '?'"),
            ("/mq tt", "must not contain ' '"),
            ("/mqtt#top", "must not contain '#'"),
        ] {
            let msg = error(&format!("{MINIMAL}transport = \"websocket\"\npath = \"{path}\"\n"));
            assert!(msg.contains("listeners[0].path: ") && msg.contains(why), "{path}: {msg}");
        }
    }

    #[test]
    fn unknown_transport_is_refused() {
        let msg = error(&format!("{MINIMAL}transport = \"quic\"\n"));
        assert!(msg.contains("unknown variant `quic`"), "{msg}");
        assert!(msg.contains("`tcp`") && msg.contains("`websocket`"), "{msg}");
    }

    #[test]
    fn the_mqtt_table_sets_the_frontend() {
        let c = parse(&format!(
            "[mqtt]\nqueue_qos0_offline = true\nmax_inflight = 20\nreceive_maximum = 50\ntopic_alias_maximum = 0\nmax_keep_alive = 300\nmax_queued_messages = 0\n\
             max_subscriptions_per_client = 50\nmax_subscriptions_per_packet = 0\nsys_interval = 0\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            c.mqtt,
            MqttConfig {
                queue_qos0_offline: true,
                max_inflight: 20,
                receive_maximum: 50,
                topic_alias_maximum: 0,
                max_keep_alive: 300,
                max_queued_messages: 0,
                max_subscriptions_per_client: 50,
                max_subscriptions_per_packet: 0,
                sys_interval: 0,
            }
        );
        assert_eq!(parse(MINIMAL).unwrap().mqtt, MqttConfig::default());
        assert_eq!(MqttConfig::default().sys_interval, 10, "Mosquitto's default");
        assert!(error(&format!("[mqtt]\nreceive_maximum = 0\n{MINIMAL}")).contains("mqtt.receive_maximum"));
        assert!(error(&format!("[mqtt]\nqos0 = true\n{MINIMAL}")).contains("qos0"));
    }

    #[test]
    fn the_amqp_table_sets_the_frontend_and_limits_are_checked() {
        let c = parse(&format!(
            "[amqp]\nchannel_max = 16\nconsumer_max_per_channel = 8\nmax_message_size = 1048576\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.amqp, AmqpConfig { channel_max: 16, consumer_max_per_channel: 8, max_message_size: 1_048_576 });
        let d = parse(MINIMAL).unwrap();
        assert_eq!(
            d.amqp,
            AmqpConfig { channel_max: 2047, consumer_max_per_channel: 1024, max_message_size: 134_217_728 }
        );
        assert_eq!(d.mqtt.max_queued_messages, 1000);
        assert_eq!((d.mqtt.max_subscriptions_per_client, d.mqtt.max_subscriptions_per_packet), (10_000, 1_000));
        assert_eq!(d.broker.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!((d.listeners[0].max_connection_rate, d.listeners[0].max_publish_rate), (1000, 0));
        for (text, key) in [
            ("[amqp]\nchannel_max = 0\n", "amqp.channel_max: must be at least 1"),
            ("[amqp]\nconsumer_max_per_channel = 0\n", "amqp.consumer_max_per_channel: must be at least 1"),
            ("[amqp]\nmax_message_size = 536870913\n", "amqp.max_message_size: must be between 1 and"),
            ("[broker]\nmax_connections = 0\n", "broker.max_connections: must be between 1 and"),
        ] {
            let msg = error(&format!("{text}{MINIMAL}"));
            assert!(msg.contains(key), "{text}: {msg}");
        }
        let c =
            parse(&format!("[broker]\nmax_connections = 5\n{MINIMAL}max_connection_rate = 0\nmax_publish_rate = 50\n"))
                .unwrap();
        assert_eq!(c.broker.max_connections, 5);
        assert_eq!((c.listeners[0].max_connection_rate, c.listeners[0].limits().max_publish_rate), (0, 50));
    }

    #[test]
    fn outbox_bytes_and_socket_buffers_are_listener_keys_with_bounds() {
        let d = parse(MINIMAL).unwrap().listeners[0].limits();
        assert_eq!((d.outbox_bytes, d.socket_send_buffer, d.socket_recv_buffer), (1 << 20, 262_144, 262_144));
        let amqp = ListenerConfig::new(Protocol::Amqp, "127.0.0.1:5672".parse().unwrap()).limits();
        assert_eq!((amqp.socket_send_buffer, amqp.socket_recv_buffer), (0, 0), "AMQP keeps autotuning");
        let c = parse(&format!("{MINIMAL}outbox_bytes = 4096\nsocket_send_buffer = 0\nsocket_recv_buffer = 262144\n"))
            .unwrap();
        let l = c.listeners[0].limits();
        assert_eq!((l.outbox_bytes, l.socket_send_buffer, l.socket_recv_buffer), (4096, 0, 262_144));
        for (text, key) in [
            ("outbox_bytes = 100\n", "outbox_bytes"),
            ("socket_send_buffer = 100\n", "socket_send_buffer"),
            ("socket_recv_buffer = 1\n", "socket_recv_buffer"),
        ] {
            let msg = error(&format!("{MINIMAL}{text}"));
            assert!(msg.contains(key), "{text}: {msg}");
        }
    }

    #[test]
    fn the_memory_watermark_is_a_fraction_or_bytes_not_both() {
        let c = parse(&format!("[broker]\nmemory_high_watermark_bytes = 1000\n{MINIMAL}")).unwrap();
        assert_eq!(c.broker.memory_high_watermark, MemoryWatermark::Absolute(1000));
        assert_eq!(c.broker.memory_high_watermark.bytes(1 << 30), 1000);
        assert_eq!(MemoryWatermark::Relative(0.5).bytes(1000), 500);
        assert!(error(&format!("[broker]\nmemory_high_watermark = 1.5\n{MINIMAL}"))
            .contains("broker.memory_high_watermark"));
        assert!(error(&format!("[broker]\nmemory_high_watermark = 0.0\n{MINIMAL}"))
            .contains("broker.memory_high_watermark"));
        let both = error(&format!("[broker]\nmemory_high_watermark = 0.5\nmemory_high_watermark_bytes = 9\n{MINIMAL}"));
        assert!(both.contains("not both"), "{both}");
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            r#"
            [broker]
            data_dir = "/var/lib/ferry"
            log_level = "ferry=debug,warn"
            shutdown_grace_secs = 3
            memory_high_watermark = 0.5
            disk_free_limit_bytes = 1000000

            [[listeners]]
            protocol = "amqp"
            bind = "0.0.0.0:5671"
            vhost = "plant"
            max_connections = 10
            max_frame_size = 8192
            handshake_timeout_secs = 4
            tls = { cert = "/tls/server.pem", key = "/tls/server.key", client_ca = "/tls/ca.pem", require_client_cert = true }
            allow_anonymous = true

            [[users]]
            name = "alice"
            password_hash = "rabbitmq-sha256:kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.broker,
            BrokerConfig {
                data_dir: "/var/lib/ferry".into(),
                log_level: "ferry=debug,warn".into(),
                log_format: LogFormat::Text,
                log_file: None,
                shutdown_grace: Duration::from_secs(3),
                memory_high_watermark: MemoryWatermark::Relative(0.5),
                disk_free_limit: 1_000_000,
                max_connections: DEFAULT_MAX_CONNECTIONS,
            }
        );
        let l = &c.listeners[0];
        assert_eq!(l.protocol, Protocol::Amqp);
        assert_eq!(l.bind, "0.0.0.0:5671".parse().unwrap());
        assert_eq!(l.vhost, "plant");
        assert_eq!(l.max_connections, 10);
        assert_eq!(l.limits().max_frame_size, 8192);
        assert_eq!(l.limits().handshake_timeout, Duration::from_secs(4));
        assert_eq!(
            l.tls,
            Some(TlsConfig {
                cert: "/tls/server.pem".into(),
                key: "/tls/server.key".into(),
                client_ca: Some("/tls/ca.pem".into()),
                require_client_cert: true,
            })
        );
        assert!(l.allow_anonymous);
        assert_eq!(c.users.len(), 1);
        assert_eq!(c.users[0].name, "alice");
        assert!(c.users[0].hash.verify(b"test12"));
    }

    const ALICE_ARGON2ID: &str =
        "$argon2id$v=19$m=19456,t=2,p=1$p9SK88tHuRI5dj6IHt1Chg$WtT9rdVBFc6k9P0PWYnog5e4rswn0e8JBhutj9TUqco";
    const ALICE_MOSQUITTO: &str =
        "$7$101$AQIDBAUGBwgJCgsM$STSCmE+fzbvU6dsOSP/YYMWBLb6TpCPpOg2l6B/cibzXpYwr89dDHWD70LZ6MP80Yb+qgVcLdO6pKMCAw7FYKw==";

    #[test]
    fn users_are_read_in_every_accepted_format() {
        let c = parse(&format!(
            "{MINIMAL}[[users]]\nname = \"alice\"\npassword_hash = \"{ALICE_ARGON2ID}\"\n\
             [[users]]\nname = \"bob\"\npassword_hash = \"{ALICE_MOSQUITTO}\"\n"
        ))
        .unwrap();
        let users: Vec<_> = c.users.iter().map(|u| (u.name.as_str(), u.hash.scheme())).collect();
        assert_eq!(users, vec![("alice", "argon2id"), ("bob", "mosquitto-pbkdf2-sha512")]);
        assert!(c.users[1].hash.verify(b"s3cret pass"));
        assert!(parse(MINIMAL).unwrap().users.is_empty());
        assert!(Config::embedded_defaults().users.is_empty());
    }

    #[test]
    fn acl_entries_are_read_and_bad_ones_refused_naming_the_entry() {
        use ferry_mqtt::acl::{Access, AclEntry};
        let c = parse(&format!(
            "{MINIMAL}[[users]]\nname = \"alice\"\npassword_hash = \"{ALICE_ARGON2ID}\"\n\
             [[acl]]\nuser = \"alice\"\ntopic = \"sensors/%u/#\"\naccess = \"readwrite\"\n\
             [[acl]]\ntopic = \"public/+\"\naccess = \"read\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.acl,
            vec![
                AclEntry { user: Some("alice".into()), topic: "sensors/%u/#".into(), access: Access::ReadWrite },
                AclEntry { user: None, topic: "public/+".into(), access: Access::Read },
            ]
        );
        assert!(parse(MINIMAL).unwrap().acl.is_empty());
        let entry = |topic: &str, access: &str| format!("[[acl]]\ntopic = \"{topic}\"\naccess = \"{access}\"\n");
        let msg = error(&format!("{MINIMAL}{}{}", entry("a", "read"), entry("a/#/b", "read")));
        assert!(msg.contains("acl[1].topic: "), "{msg}");
        let msg = error(&format!("{MINIMAL}{}", entry("a", "all")));
        assert!(msg.contains("acl[0].access: \"all\""), "{msg}");
        let msg = error(&format!("{MINIMAL}[[acl]]\nuser = \"\"\ntopic = \"a\"\naccess = \"read\"\n"));
        assert!(msg.contains("acl[0].user: "), "{msg}");
    }

    #[test]
    fn an_acl_entry_must_name_a_user_that_can_log_in_unless_certificates_name_users() {
        let acl = |user: &str| format!("[[acl]]\nuser = \"{user}\"\ntopic = \"a/#\"\naccess = \"read\"\n");
        let msg = error(&format!("{MINIMAL}{}", acl("bob")));
        assert!(msg.contains("acl[0].user: \"bob\" is not a configured user"), "{msg}");
        // As [[permissions]]: guest and anonymous can log in without being configured.
        for user in ["guest", "anonymous"] {
            assert_eq!(parse(&format!("{MINIMAL}{}", acl(user))).unwrap().acl.len(), 1, "{user}");
        }
        // A cert_login listener: any name may be a certificate's.
        let cert_listener = "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:8883\"\n\
             tls = { cert = \"c\", key = \"k\", client_ca = \"ca\" }\ncert_login = \"common_name\"\n";
        let c = parse(&format!("{MINIMAL}{cert_listener}{}", acl("sensor-7"))).unwrap();
        assert_eq!(c.acl[0].user.as_deref(), Some("sensor-7"));
    }

    #[test]
    fn every_problem_in_a_file_is_reported_at_once() {
        let text = format!(
            "[broker]\nlog_level = \"ferry=loud\"\nmax_connections = 0\n\
             [amqp]\nchannel_max = 0\n\
             {MINIMAL}vhost = \"\"\nmax_frame_size = 0\n\
             [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:1883\"\ntransport = \"websocket\"\n\
             [[users]]\nname = \"\"\npassword_hash = \"{ALICE_ARGON2ID}\"\n\
             [[acl]]\nuser = \"carol\"\ntopic = \"a/#/b\"\naccess = \"all\"\n\
             [[permissions]]\nuser = \"dave\"\nconfigure = \"(\"\nwrite = \"\"\nread = \"\"\n"
        );
        let msg = error(&text);
        let lines: Vec<&str> = msg.lines().collect();
        let expected = [
            "broker.log_level: ",
            "broker.max_connections: must be between 1 and ",
            "amqp.channel_max: must be at least 1",
            "listeners[0].vhost: must not be empty",
            "listeners[0].max_frame_size: must be at least 1",
            "listeners[1].transport: \"websocket\" is only available with protocol = \"mqtt\"",
            "listeners[1].bind: 127.0.0.1:1883 is already used by listeners[0]",
            "users[0].name: must not be empty",
            "acl[0].user: \"carol\" is not a configured user",
            "acl[0].topic: ",
            "acl[0].access: \"all\"",
            "permissions[0].user: \"dave\" is not a configured user",
            "permissions[0].configure: not a valid regular expression",
        ];
        assert_eq!(lines.len(), expected.len(), "{msg}");
        for (line, want) in lines.iter().zip(expected) {
            assert!(line.starts_with(&format!("/etc/ferry/ferry.toml: {want}")), "{want:?} in:\n{msg}");
        }
    }

    #[test]
    fn permissions_are_read_and_bad_ones_refused_naming_the_entry() {
        let user = format!("[[users]]\nname = \"alice\"\npassword_hash = \"{ALICE_ARGON2ID}\"\n");
        let c = parse(&format!(
            "{MINIMAL}{user}[[permissions]]\nuser = \"alice\"\nconfigure = \"^alice\\\\.\"\nwrite = \".*\"\nread = \"\"\n\
             [[permissions]]\nuser = \"guest\"\nvhost = \"plant\"\nconfigure = \"\"\nwrite = \"\"\nread = \".*\"\n\
             [[topic_permissions]]\nuser = \"alice\"\nexchange = \"amq.topic\"\nwrite = \"^s\\\\.{{username}}\\\\.\"\nread = \".*\"\n"
        ))
        .unwrap();
        assert_eq!(c.permissions.len(), 2);
        assert_eq!((c.permissions[0].vhost.as_str(), c.permissions[0].configure.as_str()), ("/", "^alice\\."));
        assert_eq!((c.permissions[1].user.as_str(), c.permissions[1].vhost.as_str()), ("guest", "plant"));
        assert_eq!(c.topic_permissions[0].write, "^s\\.{username}\\.");
        let policy = c.access_policy();
        assert_eq!(policy.mqtt_exchanges.len(), 1, "the MQTT listener's exchange is covered by the ACL");
        assert_eq!(policy.mqtt_exchanges[0].exchange, "amq.topic");

        let perm = |u: &str, extra: &str| {
            format!("[[permissions]]\nuser = \"{u}\"\nconfigure = \".*\"\nwrite = \".*\"\nread = \".*\"\n{extra}")
        };
        let msg = error(&format!("{MINIMAL}{user}{}", perm("bob", "")));
        assert!(msg.contains("permissions[0].user: \"bob\" is not a configured user"), "{msg}");
        let msg = error(&format!("{MINIMAL}{user}{}{}", perm("alice", ""), perm("alice", "")));
        assert!(msg.contains("permissions[1]: user \"alice\" on vhost \"/\" is already permissions[0]"), "{msg}");
        let msg = error(&format!(
            "{MINIMAL}{user}[[permissions]]\nuser = \"alice\"\nconfigure = \"(\"\nwrite = \"\"\nread = \"\"\n"
        ));
        assert!(msg.contains("permissions[0].configure: not a valid regular expression"), "{msg}");
        let msg = error(&format!("{MINIMAL}{user}[[permissions]]\nuser = \"alice\"\nconfigure = \".*\"\n"));
        assert!(msg.contains("missing field"), "{msg}");
        let msg = error(&format!(
            "{MINIMAL}{user}[[topic_permissions]]\nuser = \"alice\"\nexchange = \"x\"\nwrite = \"(?=a)\"\nread = \"\"\n"
        ));
        assert!(msg.contains("topic_permissions[0].write: "), "{msg}");
    }

    #[test]
    fn bad_users_are_refused_naming_the_entry_but_not_the_hash() {
        let user = |name: &str, hash: &str| format!("[[users]]\nname = \"{name}\"\npassword_hash = \"{hash}\"\n");
        let msg = error(&format!("{MINIMAL}{}", user("", ALICE_ARGON2ID)));
        assert!(msg.contains("users[0].name: must not be empty"), "{msg}");
        let msg = error(&format!("{MINIMAL}{}{}", user("alice", ALICE_ARGON2ID), user("alice", ALICE_MOSQUITTO)));
        assert!(msg.contains("users[1].name: \"alice\" is already users[0]"), "{msg}");
        let truncated = &ALICE_MOSQUITTO[..40];
        let msg = error(&format!("{MINIMAL}{}{}", user("alice", ALICE_ARGON2ID), user("bob", truncated)));
        assert!(msg.contains("users[1].password_hash: a Mosquitto hash is"), "{msg}");
        assert!(!msg.contains("AQIDBAUGBwgJCgsM"), "the hash is not repeated: {msg}");
        let msg = error(&format!("{MINIMAL}{}", user("alice", "hunter2")));
        assert!(msg.contains("users[0].password_hash: not a known hash format") && !msg.contains("hunter2"), "{msg}");
        let msg = error(&format!("{MINIMAL}[[users]]\nname = \"alice\"\npassword = \"x\"\n"));
        assert!(msg.contains("unknown field `password`"), "{msg}");
    }

    #[test]
    fn anonymous_and_guest_default_to_loopback_only() {
        let policy = |bind: &str, extra: &str| {
            let c = parse(&format!("[[listeners]]\nprotocol = \"mqtt\"\nbind = \"{bind}\"\n{extra}")).unwrap();
            (c.listeners[0].allow_anonymous, c.listeners[0].auth_policy())
        };
        let open = AuthPolicy { anonymous: true, guest: true, cert_login: None };
        let closed = AuthPolicy { anonymous: false, guest: false, cert_login: None };
        for bind in ["127.0.0.1:1883", "127.8.9.1:1883", "[::1]:1883", "[::ffff:127.0.0.1]:1883"] {
            assert_eq!(policy(bind, ""), (true, open), "{bind}");
            assert_eq!(
                policy(bind, "allow_anonymous = false\n"),
                (false, AuthPolicy { anonymous: false, guest: true, cert_login: None })
            );
        }
        for bind in ["0.0.0.0:1883", "[::]:1883", "192.0.2.7:1883"] {
            assert_eq!(policy(bind, ""), (false, closed), "{bind}");
            assert_eq!(
                policy(bind, "allow_anonymous = true\n"),
                (true, AuthPolicy { anonymous: true, guest: false, cert_login: None })
            );
        }
        let c = Config::embedded_defaults();
        assert!(c.listeners.iter().all(|l| l.auth_policy() == open));
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let c = parse(
            r#"
            [broker]
            data_dir = "data"
            [[listeners]]
            protocol = "mqtt"
            bind = "127.0.0.1:8883"
            tls = { cert = "tls/server.pem", key = "../keys/server.key", client_ca = "/abs/ca.pem" }
            "#,
        )
        .unwrap();
        assert_eq!(c.broker.data_dir, PathBuf::from("/etc/ferry/data"));
        let tls = c.listeners[0].tls.as_ref().unwrap();
        assert_eq!(tls.cert, PathBuf::from("/etc/ferry/tls/server.pem"));
        assert_eq!(tls.key, PathBuf::from("/etc/ferry/../keys/server.key"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/abs/ca.pem")));
        assert!(!tls.require_client_cert);
    }

    #[test]
    fn a_file_in_the_working_directory_resolves_against_it() {
        let c = Config::from_toml_str(
            "[broker]\ndata_dir = \"d\"\n[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:1\"\n",
            Path::new("ferry.toml"),
        )
        .unwrap();
        assert_eq!(c.broker.data_dir, PathBuf::from("d"));
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let msg = error(&format!("colour = \"blue\"\n{MINIMAL}"));
        assert!(msg.contains("unknown field `colour`"), "{msg}");
        assert!(msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn unknown_broker_key_is_named() {
        let msg = error(&format!("[broker]\ndata_dri = \"x\"\n{MINIMAL}"));
        assert!(msg.contains("unknown field `data_dri`"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn unknown_listener_key_is_named() {
        let msg = error(&format!("{MINIMAL}port = 1883\n"));
        assert!(msg.contains("unknown field `port`"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn unknown_tls_key_is_named() {
        let msg = error(&format!("{MINIMAL}tls = {{ cert = \"c\", key = \"k\", verify = true }}\n"));
        assert!(msg.contains("unknown field `verify`"), "{msg}");
    }

    #[test]
    fn bad_protocol_value_is_refused() {
        let msg = error("[[listeners]]\nprotocol = \"xmpp\"\nbind = \"127.0.0.1:1\"\n");
        assert!(msg.contains("unknown variant `xmpp`"), "{msg}");
        assert!(msg.contains("`mqtt`") && msg.contains("`amqp`"), "{msg}");
    }

    #[test]
    fn bad_bind_address_is_refused() {
        let msg = error("[[listeners]]\nprotocol = \"mqtt\"\nbind = \"localhost\"\n");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("socket address"), "{msg}");
    }

    #[test]
    fn missing_required_listener_key_is_named() {
        let msg = error("[[listeners]]\nprotocol = \"mqtt\"\n");
        assert!(msg.contains("missing field `bind`"), "{msg}");
    }

    #[test]
    fn empty_or_missing_listeners_are_refused() {
        for text in ["listeners = []\n", "[broker]\ndata_dir = \"x\"\n", ""] {
            let msg = error(text);
            assert!(msg.contains(": listeners: at least one"), "{msg}");
        }
    }

    #[test]
    fn duplicate_bind_is_refused_naming_both_listeners() {
        let msg = error(&format!("{MINIMAL}[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:1883\"\n"));
        assert!(msg.contains("listeners[1].bind: 127.0.0.1:1883 is already used by listeners[0]"), "{msg}");
    }

    #[test]
    fn several_listeners_on_port_zero_are_not_duplicates() {
        let text = "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n";
        assert_eq!(parse(text).unwrap().listeners.len(), 2);
    }

    #[test]
    fn require_client_cert_without_client_ca_is_refused() {
        let msg = error(&format!("{MINIMAL}tls = {{ cert = \"c\", key = \"k\", require_client_cert = true }}\n"));
        assert!(msg.contains("listeners[0].tls.require_client_cert: requires listeners[0].tls.client_ca"), "{msg}");
    }

    #[test]
    fn zero_values_are_refused_where_meaningless() {
        for (line, key) in [
            ("max_connections = 0", "listeners[0].max_connections: must be at least 1"),
            ("max_frame_size = 0", "listeners[0].max_frame_size: must be at least 1"),
            ("handshake_timeout_secs = 0", "listeners[0].handshake_timeout_secs: must be at least 1"),
            ("vhost = \"\"", "listeners[0].vhost: must not be empty"),
        ] {
            let msg = error(&format!("{MINIMAL}{line}\n"));
            assert!(msg.contains(key), "{line}: {msg}");
        }
    }

    #[test]
    fn mqtt_exchange_is_read_for_mqtt_listeners_only() {
        assert_eq!(parse(MINIMAL).unwrap().listeners[0].mqtt_exchange, None);
        let c = parse(&format!("{MINIMAL}mqtt_exchange = \"iot\"\n")).unwrap();
        assert_eq!(c.listeners[0].mqtt_exchange.as_deref(), Some("iot"));
        let msg = error("[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:1\"\nmqtt_exchange = \"iot\"\n");
        assert!(msg.contains("listeners[0].mqtt_exchange: only valid with protocol = \"mqtt\""), "{msg}");
        for (value, why) in [
            ("", "must not be empty"),
            ("amq.direct", "only \"amq.topic\" routes by topic"),
            (&"x".repeat(256), "at most 255"),
        ] {
            let msg = error(&format!("{MINIMAL}mqtt_exchange = \"{value}\"\n"));
            assert!(msg.contains("listeners[0].mqtt_exchange: ") && msg.contains(why), "{value}: {msg}");
        }
        assert!(parse(&format!("{MINIMAL}mqtt_exchange = \"amq.topic\"\n")).is_ok());
    }

    #[test]
    fn zero_grace_is_allowed() {
        let c = parse(&format!("[broker]\nshutdown_grace_secs = 0\n{MINIMAL}")).unwrap();
        assert_eq!(c.broker.shutdown_grace, Duration::ZERO);
    }

    #[test]
    fn negative_numbers_are_refused() {
        for line in ["max_connections = -1", "max_frame_size = -5", "handshake_timeout_secs = -1"] {
            let msg = error(&format!("{MINIMAL}{line}\n"));
            assert!(msg.contains("invalid value: integer `-"), "{line}: {msg}");
        }
        let msg = error(&format!("[broker]\nshutdown_grace_secs = -1\n{MINIMAL}"));
        assert!(msg.contains("invalid value: integer `-1`"), "{msg}");
    }

    #[test]
    fn amqp_frame_size_below_the_protocol_minimum_is_refused() {
        let msg = error("[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:1\"\nmax_frame_size = 1024\n");
        assert!(msg.contains("listeners[0].max_frame_size: must be at least 4096"), "{msg}");
    }

    #[test]
    fn wrong_type_is_refused() {
        let msg = error(&format!("{MINIMAL}max_connections = \"many\"\n"));
        assert!(msg.contains("invalid type"), "{msg}");
    }

    #[test]
    fn log_format_and_file_are_read_and_the_file_resolved_against_the_config() {
        let c = parse(&format!("[broker]\nlog_format = \"json\"\nlog_file = \"log/ferry.log\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.broker.log_format, LogFormat::Json);
        assert_eq!(c.broker.log_file, Some(PathBuf::from("/etc/ferry/log/ferry.log")));
        let c = parse(MINIMAL).unwrap();
        assert_eq!((c.broker.log_format, c.broker.log_file), (LogFormat::Text, None));
        let msg = error(&format!("[broker]\nlog_format = \"xml\"\n{MINIMAL}"));
        assert!(msg.contains("broker.log_format: \"xml\": expected \"text\" or \"json\""), "{msg}");
        let msg = error(&format!("[broker]\nlog_file = \"\"\n{MINIMAL}"));
        assert!(msg.contains("broker.log_file: must not be empty"), "{msg}");
    }

    #[test]
    fn bad_log_filter_is_refused() {
        let msg = error(&format!("[broker]\nlog_level = \"ferry=loud\"\n{MINIMAL}"));
        assert!(msg.contains("broker.log_level: "), "{msg}");
    }

    #[test]
    fn unreadable_file_names_it() {
        let err = Config::load(Path::new("/nonexistent/ferry.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().starts_with("/nonexistent/ferry.toml: cannot read: "), "{err}");
    }

    const BRIDGE: &str = "[[bridges]]\nname = \"up\"\naddress = \"central.example:1883\"\n";

    #[test]
    fn a_bridge_is_read_with_its_rules_and_defaults() {
        let c = parse(&format!(
            "{MINIMAL}{BRIDGE}protocol_version = \"3.1.1\"\nusername = \"edge\"\npassword_env = \"BRIDGE_PW\"\n\
             clean_session = false\ntry_private = false\nmax_queued_messages = 10\nmax_queued_bytes = 65536\noverflow = \"block\"\n\
             topics = [{{ pattern = \"s/#\", direction = \"out\", qos = 2, local_prefix = \"edge/\", remote_prefix = \"site/\" }},\
             {{ pattern = \"cmd/+\", direction = \"in\" }}]\n"
        ))
        .unwrap();
        let b = &c.bridges[0];
        assert_eq!((b.name.as_str(), b.address.as_str()), ("up", "central.example:1883"));
        assert_eq!(b.version, ferry_mqtt::codec::ProtocolVersion::V311);
        assert_eq!(b.password, Some(ferry_bridge::PasswordSource::Env("BRIDGE_PW".into())));
        assert!(!b.clean_session && !b.try_private);
        assert_eq!((b.max_queued_messages, b.max_queued_bytes, b.overflow), (10, 65536, ferry_bridge::Overflow::Block));
        assert_eq!(b.max_hops, 1);
        assert_eq!(b.client_id, "ferry-bridge-up");
        assert_eq!(b.topics.len(), 2);
        assert_eq!(b.topics[0].local_filter(), "edge/s/#");
        assert_eq!(b.topics[0].remote_filter(), "site/s/#");
        assert_eq!(b.topics[0].qos, ferry_mqtt::codec::QoS::ExactlyOnce);
        assert_eq!(b.topics[1].direction, ferry_bridge::Direction::In);
        assert_eq!(b.topics[1].qos, ferry_mqtt::codec::QoS::AtLeastOnce, "QoS 1 unless said");
    }

    #[test]
    fn bad_bridges_are_refused_naming_the_key() {
        let rule = "topics = [{ pattern = \"#\", direction = \"out\" }]\n";
        let msg = error(&format!("{MINIMAL}{BRIDGE}{rule}colour = 1\n"));
        assert!(msg.contains("unknown field `colour`"), "{msg}");
        let msg = error(&format!("{MINIMAL}{BRIDGE}topics = [{{ pattern = \"#\", direction = \"out\", prio = 1 }}]\n"));
        assert!(msg.contains("unknown field `prio`"), "{msg}");
        let msg = error(&format!("{MINIMAL}{BRIDGE}"));
        assert!(msg.contains("bridges[0].topics: at least one topic rule is required"), "{msg}");
        let msg = error(&format!(
            "{MINIMAL}[[bridges]]\nname = \"a b\"\naddress = \"nowhere\"\n{rule}\
             password_file = \"pw\"\npassword_env = \"PW\"\nmax_hops = 0\noverflow = \"spill\"\n\
             reconnect_initial_ms = 5000\nreconnect_max_ms = 1000\n"
        ));
        for expected in [
            "bridges[0].name: must be",
            "bridges[0].address: \"nowhere\" is not host:port",
            "bridges[0].password_file: give password_file or password_env, not both",
            "bridges[0].max_hops: must be at least 1",
            "bridges[0].overflow: \"spill\"",
            "bridges[0].reconnect_max_ms: must not be below",
        ] {
            assert!(msg.contains(expected), "{expected:?} not in {msg}");
        }
        let msg = error(&format!(
            "{MINIMAL}{BRIDGE}topics = [{{ pattern = \"a/#/b\", direction = \"sideways\" }}, \
             {{ pattern = \"a/#/b\", direction = \"in\", qos = 3 }}, {{ pattern = \"x/#/y\", direction = \"in\" }}]\n"
        ));
        assert!(msg.contains("bridges[0].topics[0].direction: \"sideways\""), "{msg}");
        assert!(msg.contains("bridges[0].topics[1].qos: must be 0, 1 or 2"), "{msg}");
        assert!(msg.contains("bridges[0].topics[2].pattern: \"x/#/y\""), "{msg}");
        let msg = error(&format!("{MINIMAL}{BRIDGE}{rule}{BRIDGE}{rule}"));
        assert!(msg.contains("bridges[1].name: \"up\" is already bridges[0]"), "{msg}");
    }

    #[test]
    fn a_bridge_takes_a_list_of_addresses_main_first() {
        let rule = "topics = [{ pattern = \"#\", direction = \"out\" }]\n";
        let c = parse(&format!(
            "{MINIMAL}[[bridges]]\nname = \"up\"\naddress = [\"a.example:1883\", \"[::1]:1884\", \"c.example:1885\"]\n\
             round_robin = true\nprimary_retry_ms = 250\n{rule}"
        ))
        .unwrap();
        let b = &c.bridges[0];
        assert_eq!(b.address, "a.example:1883");
        assert_eq!(b.alternates, ["[::1]:1884", "c.example:1885"]);
        assert_eq!((b.address_count(), b.address_at(1), b.address_at(3)), (3, "[::1]:1884", "a.example:1883"));
        assert_eq!(ferry_bridge::config::host_of(b.address_at(1)), "::1");
        assert!(b.round_robin);
        assert_eq!(b.primary_retry, std::time::Duration::from_millis(250));
        let one = parse(&format!("{MINIMAL}{BRIDGE}{rule}")).unwrap();
        let b = &one.bridges[0];
        assert!(b.alternates.is_empty() && !b.round_robin, "one address, and the first is the main one");
        assert_eq!(b.primary_retry, std::time::Duration::from_secs(5), "Mosquitto's interval");
        let msg = error(&format!(
            "{MINIMAL}[[bridges]]\nname = \"up\"\naddress = [\"a:1\", \"b\", \"a:1\"]\nprimary_retry_ms = 0\n{rule}"
        ));
        for expected in [
            "bridges[0].address[1]: \"b\" is not host:port",
            "bridges[0].address[2]: \"a:1\" is listed twice",
            "bridges[0].primary_retry_ms: must be at least 1",
        ] {
            assert!(msg.contains(expected), "{expected:?} not in {msg}");
        }
        let msg = error(&format!("{MINIMAL}[[bridges]]\nname = \"up\"\naddress = []\n{rule}"));
        assert!(msg.contains("bridges[0].address: at least one host:port is required"), "{msg}");
    }

    #[test]
    fn bridge_start_types_are_mosquittos() {
        let out = "topics = [{ pattern = \"#\", direction = \"out\" }]\n";
        let b = &parse(&format!("{MINIMAL}{BRIDGE}{out}")).unwrap().bridges[0];
        assert_eq!((b.start_type, b.threshold, b.idle_timeout.as_secs()), (ferry_bridge::StartType::Automatic, 10, 60));
        let c =
            parse(&format!("{MINIMAL}{BRIDGE}{out}start_type = \"lazy\"\nthreshold = 3\nidle_timeout = 5\n")).unwrap();
        let b = &c.bridges[0];
        assert_eq!((b.start_type, b.threshold, b.idle_timeout.as_secs()), (ferry_bridge::StartType::Lazy, 3, 5));
        let once = parse(&format!("{MINIMAL}{BRIDGE}{out}start_type = \"once\"\n")).unwrap();
        assert_eq!(once.bridges[0].start_type, ferry_bridge::StartType::Once);
        let msg = error(&format!(
            "{MINIMAL}{BRIDGE}topics = [{{ pattern = \"#\", direction = \"in\" }}]\nstart_type = \"lazy\"\nthreshold = 0\nidle_timeout = 0\n"
        ));
        for expected in [
            "bridges[0].start_type: a lazy bridge connects when messages wait to go out",
            "bridges[0].threshold: must be at least 1",
            "bridges[0].idle_timeout: must be at least 1",
        ] {
            assert!(msg.contains(expected), "{expected:?} not in {msg}");
        }
        let msg = error(&format!("{MINIMAL}{BRIDGE}{out}start_type = \"manual\"\n"));
        assert!(msg.contains("bridges[0].start_type: \"manual\""), "{msg}");
    }

    #[test]
    fn bridge_notifications_default_to_mosquittos_and_can_be_moved_or_turned_off() {
        let rule = "topics = [{ pattern = \"#\", direction = \"out\" }]\n";
        let b = &parse(&format!("{MINIMAL}{BRIDGE}{rule}")).unwrap().bridges[0];
        assert!(b.notifications && !b.notifications_local_only);
        assert_eq!(b.state_topic(), "$SYS/broker/connection/ferry-bridge-up/state");
        let c = parse(&format!(
            "{MINIMAL}{BRIDGE}{rule}notifications_local_only = true\nnotification_topic = \"edge/link\"\n"
        ))
        .unwrap();
        assert!(c.bridges[0].notifications_local_only);
        assert_eq!(c.bridges[0].state_topic(), "edge/link");
        assert!(!parse(&format!("{MINIMAL}{BRIDGE}{rule}notifications = false\n")).unwrap().bridges[0].notifications);
        let msg = error(&format!("{MINIMAL}{BRIDGE}{rule}notification_topic = \"edge/+\"\n"));
        assert!(msg.contains("bridges[0].notification_topic: \"edge/+\""), "{msg}");
    }

    #[test]
    fn a_bridge_password_file_is_resolved_against_the_config_directory() {
        let c = parse(&format!(
            "{MINIMAL}{BRIDGE}password_file = \"secrets/pw\"\ntopics = [{{ pattern = \"#\", direction = \"in\" }}]\n"
        ))
        .unwrap();
        assert_eq!(c.bridges[0].password, Some(ferry_bridge::PasswordSource::File("/etc/ferry/secrets/pw".into())));
    }

    #[test]
    fn a_bridge_tls_table_is_resolved_and_a_half_client_certificate_refused() {
        let rule = "topics = [{ pattern = \"#\", direction = \"out\" }]\n";
        let c =
            parse(&format!("{MINIMAL}{BRIDGE}{rule}tls = {{ ca = \"ca.pem\", cert = \"c.pem\", key = \"c.key\" }}\n"))
                .unwrap();
        let tls = c.bridges[0].tls.as_ref().unwrap();
        assert_eq!(tls.ca.as_deref(), Some(Path::new("/etc/ferry/ca.pem")));
        assert_eq!(tls.client_cert, Some(("/etc/ferry/c.pem".into(), "/etc/ferry/c.key".into())));
        assert_eq!(tls.server_name, None, "the host of the address is checked");
        assert_eq!(c.bridges[0].host(), "central.example");
        let msg = error(&format!("{MINIMAL}{BRIDGE}{rule}tls = {{ ca = \"ca.pem\", cert = \"c.pem\" }}\n"));
        assert!(msg.contains("bridges[0].tls.key: a client certificate needs its key"), "{msg}");
        let msg = error(&format!("{MINIMAL}{BRIDGE}{rule}tls = {{ ca = \"ca.pem\", verify = false }}\n"));
        assert!(msg.contains("unknown field `verify`"), "{msg}");
        let c = parse(&format!("{MINIMAL}{BRIDGE}{rule}tls = {{ server_name = \"central.example.net\" }}\n")).unwrap();
        let tls = c.bridges[0].tls.as_ref().unwrap();
        assert_eq!(tls.ca, None, "no ca: the system's trusted CAs");
        let c = parse(&format!("{MINIMAL}{BRIDGE}{rule}tls = {{}}\n")).unwrap();
        assert_eq!(c.bridges[0].tls.as_ref().map(|t| t.ca.clone()), Some(None), "tls = {{}}: TLS, system CAs");
    }

    const SHOVEL: &str = "[[shovels]]\nname = \"telemetry\"\n";

    #[test]
    fn a_shovels_dest_publish_properties_are_checked_by_name_and_type() {
        let out =
            "src_uri = \"local\"\nsrc_exchange = \"amq.topic\"\nsrc_exchange_key = \"s.#\"\ndest_uri = \"amqp://r\"\n";
        let c = parse(&format!("{MINIMAL}{SHOVEL}{out}dest_publish_properties = {{ delivery_mode = 2 }}\n")).unwrap();
        let p = c.shovels[0].publish_properties.as_ref().expect("set");
        assert_eq!(p.delivery_mode, Some(ferry_core::message::DeliveryMode::Persistent));
        assert!(parse(&format!("{MINIMAL}{SHOVEL}{out}")).unwrap().shovels[0].publish_properties.is_none());
        let msg = error(&format!(
            "{MINIMAL}{SHOVEL}{out}dest_publish_properties = {{ delivery_mode = 3, colour = \"red\" }}\n"
        ));
        for expected in [
            "shovels[0].dest_publish_properties: delivery_mode: 3 is not 1 or 2",
            "shovels[0].dest_publish_properties: \"colour\" is not a basic property",
        ] {
            assert!(msg.contains(expected), "{expected:?} not in {msg}");
        }
    }

    #[test]
    fn a_shovels_limits_apply_to_its_own_backlog_only() {
        let out =
            "src_uri = \"local\"\nsrc_exchange = \"amq.topic\"\nsrc_exchange_key = \"s.#\"\ndest_uri = \"amqp://r\"\n";
        let c = parse(&format!(
            "{MINIMAL}{SHOVEL}{out}max_queued_messages = 10\nmax_queued_bytes = 4096\noverflow = \"block\"\n"
        ))
        .unwrap();
        let s = &c.shovels[0];
        assert_eq!((s.max_queued_messages, s.max_queued_bytes, s.overflow), (10, 4096, ferry_bridge::Overflow::Block));
        let d = parse(&format!("{MINIMAL}{SHOVEL}{out}")).unwrap();
        let s = &d.shovels[0];
        assert_eq!(
            (s.max_queued_messages, s.max_queued_bytes, s.overflow),
            (100_000, 0, ferry_bridge::Overflow::DropOldest)
        );
        // A source queue keeps its own arguments; an in shovel has no backlog of its own.
        let msg = parse(&format!(
            "{MINIMAL}{SHOVEL}src_uri = \"local\"\nsrc_queue = \"q\"\ndest_uri = \"amqp://r\"\nmax_queued_messages = 5\n\
             [[shovels]]\nname = \"in\"\nsrc_uri = \"amqp://r\"\nsrc_queue = \"q\"\ndest_uri = \"local\"\noverflow = \"spill\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("shovels[0].max_queued_messages: limits the backlog of a shovel from a local exchange"),
            "{msg}"
        );
        assert!(msg.contains("shovels[1].overflow: limits the backlog"), "{msg}");
        assert!(msg.contains("shovels[1].overflow: \"spill\": expected"), "{msg}");
    }

    #[test]
    fn a_shovel_is_read_with_its_defaults() {
        let c = parse(&format!(
            "{MINIMAL}{SHOVEL}src_uri = \"local\"\nsrc_exchange = \"amq.topic\"\nsrc_exchange_key = \"sensors.#\"\n\
             dest_uri = \"amqp://ferry@rabbit.example:5673/prod\"\ndest_queue = \"work\"\npassword_env = \"RABBIT_PW\"\n\
             [[shovels]]\nname = \"orders\"\nsrc_uri = \"amqp://rabbit.example\"\nsrc_queue = \"orders\"\n\
             dest_uri = \"local\"\ndest_exchange = \"amq.direct\"\ndest_exchange_key = \"o\"\nack_mode = \"no-ack\"\n\
             prefetch_count = 10\nadd_forward_headers = true\nmax_hops = 2\n"
        ))
        .unwrap();
        let [out, inn] = &c.shovels[..] else { panic!("{:?}", c.shovels) };
        assert_eq!(out.direction, ferry_bridge::ShovelDirection::Out);
        assert_eq!(out.remote.address(), "rabbit.example:5673");
        assert_eq!((out.remote.user.as_deref(), out.remote.vhost.as_str()), (Some("ferry"), "prod"));
        assert_eq!(
            out.source,
            ferry_bridge::shovel::Source::Exchange { exchange: "amq.topic".into(), key: "sensors.#".into() }
        );
        assert_eq!(out.destination, ferry_bridge::shovel::Destination::Queue("work".into()));
        assert_eq!(out.password, Some(ferry_bridge::PasswordSource::Env("RABBIT_PW".into())));
        assert_eq!((out.ack_mode, out.prefetch, out.max_hops), (ferry_bridge::AckMode::OnConfirm, 1000, 1));
        assert!(!out.add_forward_headers);
        assert_eq!(out.local_queue(), "ferry-bridge.telemetry");
        assert_eq!(inn.direction, ferry_bridge::ShovelDirection::In);
        assert_eq!(inn.source, ferry_bridge::shovel::Source::Queue("orders".into()));
        assert_eq!(
            inn.destination,
            ferry_bridge::shovel::Destination::Exchange { exchange: "amq.direct".into(), key: Some("o".into()) }
        );
        assert_eq!((inn.ack_mode, inn.prefetch, inn.max_hops), (ferry_bridge::AckMode::NoAck, 10, 2));
        assert!(inn.add_forward_headers);
        assert_eq!(inn.remote.to_string(), "amqp://rabbit.example:5672/%2f");
    }

    #[test]
    fn a_shovel_remote_may_be_a_list_of_uris_of_one_scheme_and_query() {
        let c = parse(&format!(
            "{MINIMAL}{SHOVEL}src_uri = \"local\"\nsrc_queue = \"q\"\n\
             dest_uri = [\"amqp://fred@host1/v\", \"amqp://john@host2:5673/v\"]\npassword_env = \"PW\"\n"
        ))
        .unwrap();
        let s = &c.shovels[0];
        assert_eq!(s.remote_count(), 2);
        let (second, pw) = s.remote_at(1);
        assert_eq!((second.address(), second.user.as_deref()), ("host2:5673".to_string(), Some("john")));
        assert_eq!(pw, Some(&ferry_bridge::PasswordSource::Env("PW".into())), "the shovel's password for every URI");
        assert_eq!(s.remote_at(0).0.address(), "host1:5672");
        let msg = error(&format!(
            "{MINIMAL}{SHOVEL}src_uri = \"local\"\nsrc_queue = \"q\"\n\
             dest_uri = [\"amqp://host1\", \"amqps://host2\"]\n\
             [[shovels]]\nname = \"x\"\nsrc_uri = [\"amqp://h1?heartbeat=5\", \"amqp://h2\"]\ndest_uri = \"local\"\nsrc_queue = \"q\"\n\
             [[shovels]]\nname = \"y\"\nsrc_uri = []\ndest_uri = \"local\"\nsrc_queue = \"q\"\n"
        ));
        for expected in [
            "shovels[0].dest_uri: the URIs of a list must have the same scheme and query",
            "shovels[1].src_uri: the URIs of a list must have the same scheme and query",
            "shovels[2].src_uri: an empty list",
        ] {
            assert!(msg.contains(expected), "missing {expected:?} in:\n{msg}");
        }
    }

    #[test]
    fn a_shovel_uri_query_sets_what_rabbitmq_puts_there_and_conflicts_are_refused() {
        let c = parse(&format!(
            "{MINIMAL}{SHOVEL}src_uri = \"local\"\nsrc_queue = \"q\"\n\
             dest_uri = \"amqps://h/%2f?heartbeat=15&connection_timeout=2500&cacertfile=%2Fca.pem&server_name_indication=rabbit\"\n"
        ))
        .unwrap();
        let s = &c.shovels[0];
        assert_eq!((s.heartbeat, s.connect_timeout), (15, Duration::from_millis(2500)));
        let tls = s.tls.as_ref().unwrap();
        assert_eq!((tls.ca.as_deref(), tls.server_name.as_deref()), (Some(Path::new("/ca.pem")), Some("rabbit")));
        assert_eq!(s.auth_mechanisms, [ferry_bridge::shovel::AuthMechanism::Plain]);
        let msg = error(&format!(
            "{MINIMAL}{SHOVEL}src_uri = \"local\"\nsrc_queue = \"q\"\n\
             dest_uri = \"amqps://h?cacertfile=%2Fca.pem&heartbeat=5\"\ntls = {{ ca = \"/ca.pem\" }}\nheartbeat_secs = 6\n\
             [[shovels]]\nname = \"x\"\nsrc_uri = \"amqps://h?auth_mechanism=external\"\ndest_uri = \"local\"\nsrc_queue = \"q\"\n\
             [[shovels]]\nname = \"y\"\nsrc_uri = \"amqp://h?verify=verify_none\"\ndest_uri = \"local\"\nsrc_queue = \"q\"\n"
        ));
        for expected in [
            "shovels[0].tls: the dest_uri query gives TLS files too: give them in one place",
            "shovels[0].heartbeat_secs: the dest_uri query says another heartbeat",
            "shovels[1].src_uri: auth_mechanism=external logs in with a TLS client certificate",
            "shovels[2].src_uri: \"amqp://h?verify=verify_none\" query parameter verify=verify_none: Ferry always verifies",
        ] {
            assert!(msg.contains(expected), "missing {expected:?} in:\n{msg}");
        }
    }

    #[test]
    fn bad_shovels_are_refused_naming_the_key() {
        let msg = error(&format!(
            "{MINIMAL}{SHOVEL}src_uri = \"local\"\ndest_uri = \"amqp://u:pw@h\"\nsrc_queue = \"q\"\n\
             [[shovels]]\nname = \"b\"\nsrc_uri = \"amqp://h\"\ndest_uri = \"amqp://h2\"\nsrc_queue = \"q\"\n\
             [[shovels]]\nname = \"c\"\nsrc_uri = \"local\"\ndest_uri = \"amqps://h\"\n\
             [[shovels]]\nname = \"d\"\nsrc_uri = \"amqp://h\"\ndest_uri = \"local\"\nsrc_queue = \"q\"\n\
             dest_queue = \"x\"\ndest_exchange = \"y\"\nack_mode = \"sometimes\"\nprefetch_count = 0\nmax_hops = 0\n\
             tls = {{ ca = \"ca.pem\" }}\n\
             [[shovels]]\nname = \"d\"\nsrc_uri = \"amqp://h\"\ndest_uri = \"local\"\nsrc_queue = \"q\"\n\
             [[shovels]]\nname = \"e\"\nsrc_uri = \"ftp://h\"\ndest_uri = \"local\"\nsrc_queue = \"q\"\n\
             src_exchange = \"x\"\n"
        ));
        for expected in [
            "shovels[0].dest_uri: the URI holds a password: give it with password_file or password_env",
            "shovels[1].src_uri: one side must be \"local\"",
            "shovels[2].src_queue: give src_queue or src_exchange",
            "shovels[3].dest_queue: give dest_queue or dest_exchange, not both",
            "shovels[3].ack_mode: \"sometimes\": expected \"on-confirm\", \"on-publish\" or \"no-ack\"",
            "shovels[3].prefetch_count: must be at least 1",
            "shovels[3].max_hops: must be at least 1",
            "shovels[3].tls: is for an amqps:// remote",
            "shovels[4].name: \"d\" is already shovels[3]",
            "shovels[5].src_uri: \"ftp://h\" must start with amqp:// or amqps://",
            "shovels[5].src_queue: give src_queue or src_exchange, not both",
        ] {
            assert!(msg.contains(expected), "missing {expected:?} in:\n{msg}");
        }
        assert!(!msg.contains("pw@"), "the password is not repeated: {msg}");
        let msg = error(&format!(
            "{MINIMAL}{BRIDGE}topics = [{{ pattern = \"#\", direction = \"out\" }}]\n\
             [[shovels]]\nname = \"up\"\nsrc_uri = \"local\"\ndest_uri = \"amqp://h\"\nsrc_queue = \"q\"\n"
        ));
        assert!(msg.contains("shovels[0].name: \"up\" is already bridges[0]"), "{msg}");
    }
}

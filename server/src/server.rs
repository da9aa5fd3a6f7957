//! Start-up, wiring and shutdown.
//!
//! [`ServerBuilder::start`] checks every listener (TLS material, a frontend for its protocol,
//! the bind) and reports all the problems it finds at once, then creates the data directory and
//! the broker and spawns one accept loop per listener. [`Server::shutdown`] trips the shared
//! [`Shutdown`] signal, which stops the accept loops and tells every connection; each loop
//! waits up to the grace period for its connections and aborts the rest; then the store is
//! flushed.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ferry_core::auth::User;
use ferry_core::frontend::{Frontend, ListenerSettings, Shutdown};
use ferry_core::size::ByteSize;
use ferry_core::store::{RedbStore, Store, StoreError};
use ferry_core::{Broker, Protocol};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{
    AmqpConfig, BrokerConfig, Config, ConfigError, ConfigSource, HttpListenerConfig, ListenerConfig, MqttConfig,
    Transport,
};
use crate::listener::{Drained, Handler, Listener};
use crate::tls::{self, TlsError};
use crate::websocket::Upgrade;

/// One reason the server would not start.
#[derive(Debug, thiserror::Error)]
pub enum StartProblem {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("listeners[{index}].protocol: no {protocol} frontend is built into this ferry")]
    NoFrontend { index: usize, protocol: Protocol },
    /// Mosquitto 2's and RabbitMQ's safe default: a listener other machines can reach needs a
    /// way to tell clients apart, or an explicit `allow_anonymous = true`.
    #[error(
        "listeners[{index}] ({protocol} {addr}): not on loopback and no way to authenticate: add [[users]] \
         (see `ferry passwd`), take client certificates as identities (cert_login), or set allow_anonymous = true"
    )]
    NoAuthentication { index: usize, protocol: Protocol, addr: SocketAddr },
    #[error("listeners[{index}] ({protocol} {addr}): cannot bind: {error}")]
    Bind { index: usize, protocol: Protocol, addr: SocketAddr, error: io::Error },
    /// The HTTP API off loopback with no user to log in as (it has no anonymous access).
    #[error(
        "listeners[{index}] (http {addr}): not on loopback and no way to authenticate: add [[users]] \
         with tags = [\"administrator\"] or [\"monitoring\"] (see `ferry passwd`)"
    )]
    HttpNoAuthentication { index: usize, addr: SocketAddr },
    #[error("listeners[{index}] (http {addr}): cannot bind: {error}")]
    HttpBind { index: usize, addr: SocketAddr, error: io::Error },
    #[error("broker.data_dir: cannot create {}: {error}", path.display())]
    DataDir { path: PathBuf, error: io::Error },
    #[error("broker.data_dir: cannot open the store {}: {error}", path.display())]
    Store { path: PathBuf, error: StoreError },
    #[error("{0}")]
    Bridge(#[from] ferry_bridge::BridgeError),
    /// A bridge's TLS files do not load, or its server name is not one.
    #[error("bridges[{index}].{error}")]
    BridgeTls { index: usize, error: ferry_bridge::tls::TlsError },
    /// A bridge's `password_file` cannot be read (the value is never shown).
    #[error("bridges[{index}].password_file: {error}")]
    BridgePassword { index: usize, error: ferry_bridge::config::PasswordError },
    /// A shovel's TLS files do not load, or its server name is not one.
    #[error("shovels[{index}].{error}")]
    ShovelTls { index: usize, error: ferry_bridge::tls::TlsError },
    /// A shovel's `password_file` cannot be read (the value is never shown).
    #[error("shovels[{index}].password_file: {error}")]
    ShovelPassword { index: usize, error: ferry_bridge::config::PasswordError },
}

/// Why the server did not start: every problem found, each named with the config's source.
#[derive(Debug)]
pub struct StartError {
    pub config: ConfigSource,
    pub problems: Vec<StartProblem>,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_problems(f, &self.config, &self.problems)
    }
}

/// One line per problem, each named with the config's source.
fn write_problems(f: &mut fmt::Formatter<'_>, config: &ConfigSource, problems: &[StartProblem]) -> fmt::Result {
    for (i, problem) in problems.iter().enumerate() {
        if i > 0 {
            f.write_str("\n")?;
        }
        write!(f, "{config}: {problem}")?;
    }
    Ok(())
}

impl std::error::Error for StartError {}

/// Why a graceful shutdown did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("flushing the store: {0}")]
    Flush(#[from] StoreError),
}

/// How the connections ended during a shutdown.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections that closed by themselves within the grace period.
    pub connections_closed: usize,
    /// Connections still open after the grace period, aborted.
    pub connections_aborted: usize,
}

/// The store's file in the data directory.
pub const STORE_FILE: &str = "ferry.redb";

/// A listener the server is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundListener {
    pub protocol: Protocol,
    /// The address actually bound (the port is the OS's choice when the config said 0).
    pub addr: SocketAddr,
    /// TCP or WebSocket (with its path); with `tls`, WebSocket is wss.
    pub transport: Transport,
    pub tls: bool,
    /// `false` when no frontend serves the protocol and clients are refused in its own terms
    /// (embedded defaults only).
    pub served: bool,
}

/// What [`ServerBuilder::start`] and `ferry check-config` verify beyond parsing: that every
/// listener's TLS files load, and that no listener off loopback lets everyone in for want of
/// users. Binds nothing.
pub fn check(config: &Config) -> Result<(), StartError> {
    let mut problems = unauthenticated(config);
    problems.extend(http_unauthenticated(&config.http, &config.users));
    problems.extend(tls_problems(config));
    problems.extend(bridge_password_problems(config));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(StartError { config: config.source.clone(), problems })
    }
}

/// The listeners whose TLS files do not load.
fn tls_problems(config: &Config) -> impl Iterator<Item = StartProblem> + '_ {
    config
        .listeners
        .iter()
        .enumerate()
        .filter_map(|(index, l)| l.tls.as_ref().map(|t| (index, t)))
        .chain(config.http.iter().filter_map(|h| h.tls.as_ref().map(|t| (h.index, t))))
        .filter_map(|(index, t)| tls::server_config(t, &format!("listeners[{index}].tls")).err())
        .map(StartProblem::from)
}

/// The bridges whose `password_file` or TLS files cannot be read now (an environment variable is read at
/// each connect, and may be set only for the running server).
fn bridge_password_problems(config: &Config) -> impl Iterator<Item = StartProblem> + '_ {
    let passwords = config.bridges.iter().enumerate().filter_map(|(index, b)| match &b.password {
        Some(source @ ferry_bridge::PasswordSource::File(_)) => {
            source.read().err().map(|error| StartProblem::BridgePassword { index, error })
        }
        _ => None,
    });
    let tls = config.bridges.iter().enumerate().filter_map(|(index, b)| {
        ferry_bridge::tls::check(b).err().map(|error| StartProblem::BridgeTls { index, error })
    });
    let shovel_passwords = config.shovels.iter().enumerate().filter_map(|(index, s)| match &s.password {
        Some(source @ ferry_bridge::PasswordSource::File(_)) => {
            source.read().err().map(|error| StartProblem::ShovelPassword { index, error })
        }
        _ => None,
    });
    let shovel_tls = config.shovels.iter().enumerate().filter_map(|(index, s)| {
        ferry_bridge::shovel::check_tls(s).err().map(|error| StartProblem::ShovelTls { index, error })
    });
    passwords.chain(tls).chain(shovel_passwords).chain(shovel_tls)
}

/// Why `ferry check-config` refused a file: every problem found, the file's values first, then
/// what [`check`] finds (TLS files, listeners nobody could log in to).
#[derive(Debug)]
pub struct CheckError {
    /// The file could not be read or parsed, or values in it are not acceptable.
    pub config: Option<Box<ConfigError>>,
    /// What [`check`] found in the rest.
    pub start: Option<StartError>,
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = self.config.iter().map(|e| e as &dyn fmt::Display).chain(self.start.iter().map(|e| e as _));
        if let Some(first) = lines.next() {
            write!(f, "{first}")?;
        }
        for next in lines {
            write!(f, "\n{next}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CheckError {}

/// `ferry check-config FILE`: validates the file and runs [`check`] on it, reporting every
/// problem in one go. Values the file gets wrong do not stop the TLS files of the other
/// listeners from being loaded; only a file that cannot be read or parsed stops at that.
pub fn check_file(path: &std::path::Path) -> Result<(), CheckError> {
    let (config, problems) = match Config::load_with_problems(path) {
        Ok(loaded) => loaded,
        Err(e) => return Err(CheckError { config: Some(Box::new(e)), start: None }),
    };
    // With a user refused, "no way to authenticate" may only be its consequence.
    let users_refused = problems.iter().any(|p| p.key.starts_with("users["));
    let mut start = if users_refused { Vec::new() } else { unauthenticated(&config) };
    if !users_refused {
        start.extend(http_unauthenticated(&config.http, &config.users));
    }
    start.extend(tls_problems(&config));
    start.extend(bridge_password_problems(&config));
    if problems.is_empty() && start.is_empty() {
        return Ok(());
    }
    Err(CheckError {
        config: (!problems.is_empty()).then(|| Box::new(ConfigError::Invalid { path: path.to_path_buf(), problems })),
        start: (!start.is_empty()).then(|| StartError { config: config.source.clone(), problems: start }),
    })
}

/// The listeners reachable from other machines that refuse anonymous clients while no user is
/// configured: nobody could log in there (until client certificates name users, issue 7).
fn unauthenticated(config: &Config) -> Vec<StartProblem> {
    unauthenticated_with(&config.listeners, &config.users)
}

/// [`unauthenticated`] for `listeners` (the running ones, on a reload) and `users`.
fn unauthenticated_with(listeners: &[ListenerConfig], users: &[User]) -> Vec<StartProblem> {
    if !users.is_empty() {
        return Vec::new();
    }
    listeners
        .iter()
        .enumerate()
        // A listener that takes client certificates as identities has a way in without users.
        .filter(|(_, l)| !l.is_loopback() && !l.allow_anonymous && l.cert_login.is_none())
        .map(|(index, l)| StartProblem::NoAuthentication { index, protocol: l.protocol, addr: l.bind })
        .collect()
}

/// The HTTP listeners off loopback while no user is configured: the API takes no anonymous
/// requests, and the loopback-only guest does not count there.
fn http_unauthenticated(http: &[HttpListenerConfig], users: &[User]) -> Vec<StartProblem> {
    if !users.is_empty() {
        return Vec::new();
    }
    http.iter()
        .filter(|h| !h.is_loopback())
        .map(|h| StartProblem::HttpNoAuthentication { index: h.index, addr: h.bind })
        .collect()
}

/// The listen backlog: clients the kernel holds while the accept loop catches up (a burst of
/// connections, or the accept rate limit). `TcpListener::bind` gives 128, which a burst of a
/// few hundred clients overflows, each overflow costing that client a 1 s SYN retransmit; the
/// kernel caps it at `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listening socket as `TcpListener::bind` does (SO_REUSEADDR), with [`LISTEN_BACKLOG`].
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Collects the frontends and starts a [`Server`].
pub struct ServerBuilder {
    config: Config,
    frontends: HashMap<Protocol, Arc<dyn Frontend>>,
    /// Replaces the store in the data directory (tests).
    store: Option<Arc<dyn Store>>,
}

impl fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("config", &self.config)
            .field("frontends", &self.frontends.keys().collect::<Vec<_>>())
            .field("store", &self.store.as_ref().map(|_| "given"))
            .finish()
    }
}

impl ServerBuilder {
    /// Registers the frontend for its [`Frontend::protocol`], replacing any registered before.
    pub fn frontend(mut self, frontend: Arc<dyn Frontend>) -> ServerBuilder {
        self.frontends.insert(frontend.protocol(), frontend);
        self
    }

    /// Runs the server on `store` instead of opening [`STORE_FILE`] in the data directory (the
    /// broker is still recovered from it). For tests: an injected failing store, say.
    pub fn store(mut self, store: Arc<dyn Store>) -> ServerBuilder {
        self.store = Some(store);
        self
    }

    /// Binds every listener and starts serving. Nothing is left running on error.
    pub async fn start(self) -> Result<Server, StartError> {
        let ServerBuilder { config, frontends, store: given_store } = self;
        let mut problems = unauthenticated(&config);
        let mut ready = Vec::new();
        for (index, l) in config.listeners.iter().enumerate() {
            let tls = match &l.tls {
                None => Ok(None),
                Some(t) => {
                    tls::server_config(t, &format!("listeners[{index}].tls")).map(|c| Some(Arc::new(ArcSwap::new(c))))
                }
            };
            let handler = match frontends.get(&l.protocol) {
                Some(frontend) => Some(Handler::Frontend(frontend.clone())),
                None if config.source.is_embedded() => Some(Handler::Unserved(l.protocol)),
                None => None,
            };
            let bound = bind(l.bind).and_then(|tcp| Ok((tcp.local_addr()?, tcp)));
            match (tls, handler, bound) {
                (Ok(tls), Some(handler), Ok((addr, tcp))) => ready.push((l, tls, handler, addr, tcp)),
                (tls, handler, bound) => {
                    if let Err(e) = tls {
                        problems.push(e.into());
                    }
                    if handler.is_none() {
                        problems.push(StartProblem::NoFrontend { index, protocol: l.protocol });
                    }
                    if let Err(error) = bound {
                        problems.push(StartProblem::Bind { index, protocol: l.protocol, addr: l.bind, error });
                    }
                }
            }
        }
        problems.extend(http_unauthenticated(&config.http, &config.users));
        let mut http_ready = Vec::new();
        for h in &config.http {
            let tls = match &h.tls {
                None => Ok(None),
                Some(t) => tls::server_config(t, &format!("listeners[{}].tls", h.index))
                    .map(|c| Some(Arc::new(ArcSwap::new(c)))),
            };
            let bound = bind(h.bind).and_then(|tcp| Ok((tcp.local_addr()?, tcp)));
            match (tls, bound) {
                (Ok(tls), Ok((addr, tcp))) => http_ready.push((h, tls, addr, tcp)),
                (tls, bound) => {
                    if let Err(e) = tls {
                        problems.push(e.into());
                    }
                    if let Err(error) = bound {
                        problems.push(StartProblem::HttpBind { index: h.index, addr: h.bind, error });
                    }
                }
            }
        }
        if problems.is_empty() {
            let data_dir = &config.broker.data_dir;
            // A few blocking syscalls, once, before anything is served.
            if let Err(error) = std::fs::create_dir_all(data_dir) {
                problems.push(StartProblem::DataDir { path: data_dir.clone(), error });
            }
        }
        if !problems.is_empty() {
            return Err(StartError { config: config.source.clone(), problems });
        }

        // Open the store (redb repairs a file that was not closed cleanly) and rebuild the
        // broker from it; both block, so they run off the async workers.
        let path = config.broker.data_dir.join(STORE_FILE);
        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || -> Result<Arc<Broker>, StoreError> {
                if let Some(store) = given_store {
                    info!("store: the one given to the server ({} not opened)", path.display());
                    return Broker::recover(store, ferry_core::message::now_millis());
                }
                let started = std::time::Instant::now();
                let store = Arc::new(RedbStore::open(&path)?);
                let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                info!(
                    bytes = size,
                    "store {}: {}, opened in {} ms",
                    path.display(),
                    ByteSize(size).exact(),
                    started.elapsed().as_millis()
                );
                let store: Arc<dyn Store> = store;
                Broker::recover(store, ferry_core::message::now_millis())
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Io(format!("recovery task failed: {e}"))))
        };
        let broker = match opened {
            Ok(b) => b,
            Err(error) => {
                return Err(StartError {
                    config: config.source.clone(),
                    problems: vec![StartProblem::Store { path, error }],
                })
            }
        };
        for frontend in frontends.values() {
            frontend.recover(&broker);
        }
        broker.auth().replace_users(config.users.clone());
        info!("{} user(s) configured", config.users.len());
        broker.set_access(config.access_policy());
        info!(
            "{} MQTT ACL entr(y/ies), {} vhost and {} topic permission(s) configured",
            config.acl.len(),
            config.permissions.len(),
            config.topic_permissions.len()
        );
        let free_dir = config.broker.data_dir.clone();
        broker.disk().watch_free_space(
            config.broker.disk_free_limit,
            Box::new(move || {
                let st = rustix::fs::statvfs(&free_dir).ok()?;
                Some(st.f_bavail.saturating_mul(st.f_frsize))
            }),
        );
        info!(
            "disk alarm below {} free in {}",
            ByteSize(config.broker.disk_free_limit),
            config.broker.data_dir.display()
        );
        let total = total_memory();
        let watermark = config.broker.memory_high_watermark.bytes(total);
        broker.set_memory_limit(watermark);
        info!("memory alarm at {} of queued messages ({} of memory)", ByteSize(watermark), ByteSize(total));
        let (shutdown_tx, shutdown) = Shutdown::channel();
        // The bridges' queues and bindings are declared before anything is served, so that no
        // message published from the first connection on misses them.
        let bridges = match ferry_bridge::Bridges::start_with_shovels(
            &broker,
            &config.bridges,
            &config.shovels,
            shutdown.clone(),
        ) {
            Ok(b) => b,
            Err(e) => return Err(StartError { config: config.source.clone(), problems: vec![e.into()] }),
        };
        let grace = config.broker.shutdown_grace;
        let mut listeners = Vec::with_capacity(ready.len());
        let mut tasks = Vec::with_capacity(ready.len());
        let mut tasks_http = Vec::new();
        let broker_connections = Arc::new(tokio::sync::Semaphore::new(config.broker.max_connections));
        let mut tls_slots = Vec::with_capacity(ready.len());
        for (l, tls, handler, addr, tcp) in ready {
            tls_slots.push(tls.clone());
            broker.add_vhost(&l.vhost);
            let name = match (&l.transport, &tls) {
                (Transport::Tcp, _) => format!("{} {addr}", l.protocol),
                (Transport::WebSocket { .. }, None) => format!("{} ws {addr}", l.protocol),
                (Transport::WebSocket { .. }, Some(_)) => format!("{} wss {addr}", l.protocol),
            };
            let served = matches!(handler, Handler::Frontend(_));
            if served {
                let path = match &l.transport {
                    Transport::WebSocket { path } => format!(" on {path}"),
                    Transport::Tcp => String::new(),
                };
                info!("{name}: listening{path}{}", if tls.is_some() { " (TLS)" } else { "" });
                if l.allow_anonymous && !l.is_loopback() {
                    warn!("{name}: allow_anonymous = true on an address other machines can reach: anyone may connect");
                }
            } else {
                let refusal = match l.protocol {
                    Protocol::Mqtt => "CONNACK 0x03",
                    _ => "the AMQP 0-9-1 protocol header",
                };
                warn!(
                    "{} listener {addr}: no {} frontend built in yet; connections are refused with {refusal}",
                    l.protocol, l.protocol
                );
            }
            listeners.push(BoundListener {
                protocol: l.protocol,
                addr,
                transport: l.transport.clone(),
                tls: tls.is_some(),
                served,
            });
            let settings = Arc::new(ListenerSettings {
                name,
                protocol: l.protocol,
                vhost: l.vhost.clone(),
                exchange: l.mqtt_exchange.clone(),
                limits: l.limits(),
                auth: l.auth_policy(),
            });
            let websocket = match &l.transport {
                Transport::Tcp => None,
                Transport::WebSocket { path } => Some(Arc::new(Upgrade::new(path.clone(), l.max_frame_size))),
            };
            let listener = Listener {
                tcp,
                settings,
                tls,
                websocket,
                handler,
                max_connections: l.max_connections,
                max_connection_rate: l.max_connection_rate,
                broker_connections: broker_connections.clone(),
                broker_max_connections: config.broker.max_connections,
            };
            tasks.push(tokio::spawn(listener.run(broker.clone(), shutdown.clone(), grace)));
        }
        // The HTTP listeners (metrics and the management API) share one sampler and login cache.
        let mut http = Vec::with_capacity(http_ready.len());
        if !http_ready.is_empty() {
            let infos = listeners
                .iter()
                .map(|l| {
                    let mut protocol = l.protocol.to_string();
                    if l.transport.is_websocket() {
                        protocol = format!("http/web-{protocol}");
                    } else if l.tls {
                        protocol.push_str("/ssl");
                    }
                    ferry_management::ListenerInfo { protocol, addr: l.addr }
                })
                .chain(http_ready.iter().map(|(_, tls, addr, _)| ferry_management::ListenerInfo {
                    protocol: if tls.is_some() { "https" } else { "http" }.to_string(),
                    addr: *addr,
                }))
                .collect();
            let management =
                ferry_management::Management::start(broker.clone(), bridges.status_reader(), infos, shutdown.clone());
            if let Some(mqtt) =
                frontends.get(&Protocol::Mqtt).and_then(|f| f.as_any()?.downcast_ref::<ferry_mqtt::MqttFrontend>())
            {
                management.set_mqtt(mqtt.shared().clone());
            }
            for (h, tls, addr, tcp) in http_ready {
                let settings = ferry_management::HttpSettings {
                    name: format!("http {addr}"),
                    max_connections: h.max_connections,
                    header_timeout: h.header_timeout,
                    metrics_max_queues: h.metrics_max_queues,
                    // RabbitMQ's guest / guest, on loopback only.
                    auth: ferry_core::auth::AuthPolicy { anonymous: false, guest: h.is_loopback(), cert_login: None },
                    grace,
                };
                http.push(addr);
                tasks_http.push(management.serve(tcp, tls, settings, shutdown.clone()));
            }
        }
        // Message TTL and idle-queue expiry run on the broker's own timer; it ends with the
        // shutdown signal.
        tokio::spawn(broker.clone().run_housekeeping(shutdown.clone()));
        info!("data directory {}", config.broker.data_dir.display());
        let running = Running {
            broker: config.broker.clone(),
            mqtt: config.mqtt.clone(),
            amqp: config.amqp.clone(),
            listeners: config.listeners,
            bridges: config.bridges,
            http: config.http,
            shovels: config.shovels,
        };
        let mqtt = frontends
            .get(&Protocol::Mqtt)
            .and_then(|f| f.as_any()?.downcast_ref::<ferry_mqtt::MqttFrontend>())
            .map(|m| m.shared().clone());
        Ok(Server {
            broker,
            listeners,
            running,
            tls: tls_slots,
            shutdown_tx,
            tasks,
            grace,
            bridges,
            http,
            tasks_http,
            mqtt,
        })
    }
}

/// A running server. Dropping it without [`Server::shutdown`] also stops the listeners (the
/// shutdown signal fires when its sender goes), but nobody waits for them or flushes the store.
#[derive(Debug)]
pub struct Server {
    broker: Arc<Broker>,
    listeners: Vec<BoundListener>,
    /// The configuration started with, minus the users: what a reload compares against.
    running: Running,
    /// Per listener (config order), the TLS configuration new connections get: what a reload
    /// swaps.
    tls: Vec<Option<Arc<ArcSwap<rustls::ServerConfig>>>>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Drained>>,
    grace: Duration,
    bridges: ferry_bridge::Bridges,
    /// The MQTT frontend's shared state (its sessions), when it is the built-in one.
    mqtt: Option<Arc<ferry_mqtt::Shared>>,
    /// The HTTP listeners' addresses (config order) and their tasks.
    http: Vec<SocketAddr>,
    tasks_http: Vec<JoinHandle<()>>,
}

impl Server {
    pub fn builder(config: Config) -> ServerBuilder {
        ServerBuilder { config, frontends: HashMap::new(), store: None }
    }

    /// The listeners, in config order.
    pub fn listeners(&self) -> &[BoundListener] {
        &self.listeners
    }

    /// The address listener `index` (config order) is bound to.
    ///
    /// # Panics
    /// If there is no such listener.
    pub fn local_addr(&self, index: usize) -> SocketAddr {
        self.listeners[index].addr
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// The addresses the `protocol = "http"` listeners are bound to, in config order.
    pub fn http_addrs(&self) -> &[SocketAddr] {
        &self.http
    }

    /// The running bridges (`[[bridges]]`): their state and counters.
    pub fn bridges(&self) -> &ferry_bridge::Bridges {
        &self.bridges
    }

    /// The built-in MQTT frontend's shared state (its sessions), as the management API reads
    /// it; `None` without that frontend.
    pub fn mqtt(&self) -> Option<&Arc<ferry_mqtt::Shared>> {
        self.mqtt.as_ref()
    }

    /// Applies what can change while running from a freshly loaded `config` (the caller reads
    /// the file): each TLS listener's certificate, key and client CA, reloaded from their files
    /// and swapped in for new connections (established ones keep theirs), the users, and with
    /// them the MQTT ACL and the vhost and topic permissions.
    /// Everything else (listeners added, removed or moved, `[broker]`, `[mqtt]`, other listener
    /// keys) is left as it is and listed in [`ReloadReport::needs_restart`].
    ///
    /// A listener whose TLS files do not load keeps its current certificate; users that would
    /// leave a listener reachable from other machines with nobody able to log in are not
    /// applied. Either is an error, which still carries the report of what was applied.
    pub fn reload(&self, config: &Config) -> Result<ReloadReport, ReloadError> {
        let mut report = ReloadReport::default();
        let mut problems = Vec::new();
        let running = &self.running.listeners;
        for (index, (old, new)) in running.iter().zip(&config.listeners).enumerate() {
            if old.protocol != new.protocol
                || old.bind != new.bind
                || old.transport != new.transport
                || old.tls.is_some() != new.tls.is_some()
            {
                report.needs_restart.push(format!(
                    "listeners[{index}]: protocol, bind, transport or TLS on/off changed ({} {} → {} {})",
                    old.protocol, old.bind, new.protocol, new.bind
                ));
                continue;
            }
            let mut others = new.clone();
            others.tls.clone_from(&old.tls);
            if others != *old {
                report.needs_restart.push(format!("listeners[{index}]: settings other than tls changed"));
            }
            let (Some(slot), Some(tls)) = (&self.tls[index], &new.tls) else { continue };
            match tls::server_config(tls, &format!("listeners[{index}].tls")) {
                Ok(server_config) => {
                    slot.store(server_config);
                    report.tls_reloaded.push(index);
                }
                Err(e) => problems.push(StartProblem::Tls(e)),
            }
        }
        for index in config.listeners.len()..running.len() {
            report.needs_restart.push(format!("listeners[{index}] removed"));
        }
        for index in running.len()..config.listeners.len() {
            report.needs_restart.push(format!("listeners[{index}] added"));
        }
        if config.broker != self.running.broker {
            report.needs_restart.push("[broker] changed".to_string());
        }
        if config.mqtt != self.running.mqtt {
            report.needs_restart.push("[mqtt] changed".to_string());
        }
        if config.amqp != self.running.amqp {
            report.needs_restart.push("[amqp] changed".to_string());
        }
        if config.bridges != self.running.bridges {
            report.needs_restart.push("[[bridges]] changed".to_string());
        }
        if config.shovels != self.running.shovels {
            report.needs_restart.push("[[shovels]] changed".to_string());
        }
        if config.http != self.running.http {
            report.needs_restart.push("http listeners changed".to_string());
        }
        let mut locked_out = unauthenticated_with(running, &config.users);
        locked_out.extend(http_unauthenticated(&self.running.http, &config.users));
        if locked_out.is_empty() {
            self.broker.auth().replace_users(config.users.clone());
            report.users = Some(config.users.len());
            // The ACL and permissions go with the users (the users they name are the ones now
            // configured). MQTT connections keep the ACL of their CONNECT for writes and
            // subscriptions; AMQP connections take the new policy at their next operation.
            self.broker.set_access(config.access_policy());
            report.access = Some(AccessCounts {
                acl: config.acl.len(),
                permissions: config.permissions.len(),
                topic_permissions: config.topic_permissions.len(),
            });
        } else {
            problems.extend(locked_out);
        }
        if problems.is_empty() {
            Ok(report)
        } else {
            Err(ReloadError { config: config.source.clone(), problems, report: Box::new(report) })
        }
    }

    /// Stops accepting, tells every connection to close, waits up to the grace period for them,
    /// aborts the rest, and flushes the store.
    pub async fn shutdown(self) -> Result<ShutdownReport, ShutdownError> {
        let Server { broker, shutdown_tx, tasks, grace, mut bridges, tasks_http, .. } = self;
        info!("shutdown: stopping listeners and closing connections (grace {grace:?})");
        shutdown_tx.send_replace(true);
        // Each bridge sends DISCONNECT and hands what the remote has not acknowledged back to
        // its queue, where the store keeps it.
        bridges.stopped().await;
        for task in tasks_http {
            if let Err(e) = task.await {
                error!("shutdown: an http listener task failed: {e}");
            }
        }
        let mut report = ShutdownReport::default();
        for task in tasks {
            match task.await {
                Ok(drained) => {
                    report.connections_closed += drained.closed;
                    report.connections_aborted += drained.aborted;
                }
                Err(e) => error!("shutdown: a listener task failed: {e}"),
            }
        }
        info!(
            "shutdown: {} connection(s) closed, {} aborted; flushing the store",
            report.connections_closed, report.connections_aborted
        );
        broker.store().flush().wait().await?;
        // Tasks that outlive the connections (timers) may still hold the broker; the file is
        // closed now all the same, so a new server can open it.
        broker.store().close();
        info!("shutdown: store flushed and closed");
        Ok(report)
    }
}

/// The settings a reload cannot change, as the server started with them.
#[derive(Debug)]
struct Running {
    broker: BrokerConfig,
    mqtt: MqttConfig,
    amqp: AmqpConfig,
    listeners: Vec<ListenerConfig>,
    bridges: Vec<ferry_bridge::BridgeConfig>,
    http: Vec<HttpListenerConfig>,
    shovels: Vec<ferry_bridge::ShovelConfig>,
}

/// What [`Server::reload`] applied, and what it left for a restart. Names no secret.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// The listeners (config indices) whose TLS certificate, key and client CA were reloaded.
    pub tls_reloaded: Vec<usize>,
    /// How many users are configured now; `None` when the users were kept.
    pub users: Option<usize>,
    /// The authorization policy applied with the users: how many ACL entries, vhost
    /// permissions and topic permissions; `None` when it was kept (with the users).
    pub access: Option<AccessCounts>,
    /// Changes in the file that take effect only after a restart, one line each.
    pub needs_restart: Vec<String>,
}

/// What a reload applied of the authorization tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccessCounts {
    pub acl: usize,
    pub permissions: usize,
    pub topic_permissions: usize,
}

/// Why [`Server::reload`] applied only part of a config: every problem, named with the config's
/// source, and what was applied all the same.
#[derive(Debug)]
pub struct ReloadError {
    pub config: ConfigSource,
    pub problems: Vec<StartProblem>,
    /// Boxed: the report is large and errors travel by value.
    pub report: Box<ReloadReport>,
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_problems(f, &self.config, &self.problems)
    }
}

impl std::error::Error for ReloadError {}

/// The machine's memory in bytes (`MemTotal` in /proc/meminfo); 0 when unknown, which leaves a
/// relative watermark off.
fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0)
}

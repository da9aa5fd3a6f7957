//! Ferry's bridges: outbound links to other brokers, with store and forward on the core's
//! durable queues (DESIGN.md, "Services beside the frontends"). This first slice has MQTT
//! bridges (to MQTT 3.1.1 and 5.0 brokers over TCP or TLS) and AMQP shovels ([`shovel`]).
//!
//! # Layout
//!
//! - [`config`]: one `[[bridges]]` table as values ([`BridgeConfig`], [`TopicRule`]); the
//!   server's config module parses and validates the TOML into it.
//! - [`spec`]: a `[[bridges]]` table as written (TOML, or JSON through the management API) and
//!   its checks, one set for both.
//! - [`runtime`]: bridges added, changed and removed through the management API, kept in the
//!   store and started again with the server.
//! - [`rules`]: which topic rule a topic falls under and its name on the other side.
//! - [`backoff`]: reconnect delays, exponential with jitter.
//! - [`tls`]: a bridge's `tls` table → a rustls `ClientConfig` and the name to check.
//! - `link`: one task per bridge. `out` rules: the core routes matching messages into the
//!   bridge's durable queue `ferry-bridge.<name>` (bound to the rules' exchange like an MQTT
//!   persistent session's queue), the task consumes it with a prefetch window, publishes to the
//!   remote with ferry-mqtt's codec and acks the queue when the remote acknowledged. `in` rules:
//!   the task subscribes on the remote, publishes what arrives into the local vhost and
//!   acknowledges the remote after the local store commit.
//! - [`overflow`]: the queue's overflow counters → one log line per overflow episode.
//! - [`status`]: [`BridgeStatus`], what [`Bridges::status`] reports per bridge.
//! - [`shovel`]: AMQP shovels (`[[shovels]]`): [`ShovelConfig`], a sans-I/O AMQP 0-9-1 client
//!   on ferry-amqp's codec, and one task per shovel, with the same store and forward and the
//!   same [`BridgeStatus`]; RabbitMQ's dynamic shovels made through the management API
//!   (`shovel::dynamic`, `shovel::runtime`). [`Bridges::start_with_shovels`] starts bridges
//!   and shovels.
//!
//! Data flows: local publisher → exchange → `ferry-bridge.<name>` (redb) → link → remote;
//! remote → link → vhost publish → store commit → PUBACK/PUBREC to the remote.

pub mod backlog;
pub mod backoff;
pub mod config;
mod link;
pub mod overflow;
mod qos2_ids;
pub mod rules;
pub mod runtime;
pub mod shovel;
pub mod spec;
pub mod status;
pub mod tls;
pub mod writer;

use std::sync::Arc;

use ferry_core::error::CoreError;
use ferry_core::exchange::BindingKey;
use ferry_core::frontend::Shutdown;
use ferry_core::message::{now_millis, ConnectionId, ShortString};
use ferry_core::Broker;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use config::{BridgeConfig, BridgeTls, Direction, Overflow, PasswordSource, StartType, TopicRule};
pub use link::{LinkError, HOPS};
pub use shovel::{AckMode, AmqpUri, ShovelConfig, ShovelDirection};
pub use status::{BridgeStatus, LinkState};

use crate::link::Link;
use crate::status::{Counters, StateCell};

/// Why the bridges could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("bridges[{index}] ({name}): exchange {exchange:?} does not exist in vhost {vhost:?}")]
    NoExchange { index: usize, name: String, vhost: String, exchange: String },
    #[error("bridges[{index}] ({name}): topic {filter:?}: {reason}")]
    BadFilter { index: usize, name: String, filter: String, reason: String },
    #[error("bridges[{index}] ({name}): local queue {queue}: {error}")]
    Queue { index: usize, name: String, queue: String, error: CoreError },
    #[error("shovels[{index}] ({name}): {reason}")]
    Shovel { index: usize, name: String, reason: String },
}

/// The running bridges.
#[derive(Debug, Default)]
pub struct Bridges {
    links: Vec<Arc<Link>>,
    tasks: Vec<JoinHandle<()>>,
    /// The AMQP shovels (`[[shovels]]`), after the bridges in [`Bridges::status`].
    shovels: Vec<Arc<shovel::Shovel>>,
    /// Bridges made through the management API, after the file's in [`Bridges::status`].
    runtime: Arc<runtime::RuntimeBridges>,
    /// Shovels made through the management API (RabbitMQ's dynamic shovels), last.
    dynamic: Arc<shovel::runtime::DynamicShovels>,
}

impl Bridges {
    /// Declares each bridge's local queue and bindings, then starts one task per bridge; they
    /// run until `shutdown`. Nothing is started when one bridge cannot be set up.
    pub fn start(broker: &Arc<Broker>, configs: &[BridgeConfig], shutdown: Shutdown) -> Result<Bridges, BridgeError> {
        let now = now_millis();
        let mut ready = Vec::with_capacity(configs.len());
        for (index, config) in configs.iter().enumerate() {
            ready.push(Bridges::prepare(broker, index, config, now)?);
        }
        let mut bridges = Bridges::default();
        for (i, (link, vhost)) in ready.into_iter().enumerate() {
            bridges.tasks.extend(Bridges::spawn(&link, vhost, &shutdown, now, i));
            bridges.links.push(link);
        }
        if !bridges.links.is_empty() {
            info!("{} bridge(s) started", bridges.links.len());
        }
        Ok(bridges)
    }

    /// Declares bridge `config`'s local queue and bindings (`index` names it in errors).
    fn prepare(
        broker: &Arc<Broker>,
        index: usize,
        config: &BridgeConfig,
        now: ferry_core::Millis,
    ) -> Result<(Arc<Link>, Arc<ferry_core::vhost::VHost>), BridgeError> {
        let name = config.name.clone();
        let vhost = broker.add_vhost(&config.vhost);
        let exchange = ShortString::from(config.exchange.as_str());
        if vhost.exchange(&config.exchange).is_none() {
            return Err(BridgeError::NoExchange {
                index,
                name,
                vhost: config.vhost.clone(),
                exchange: config.exchange.clone(),
            });
        }
        let id = ConnectionId::next();
        let queue = if config.has_out_rules() {
            let queue_name = config.queue_name();
            let qerr = |error| BridgeError::Queue { index, name: name.clone(), queue: queue_name.clone(), error };
            let limits = backlog::Limits {
                max_messages: config.max_queued_messages,
                max_bytes: config.max_queued_bytes,
                overflow: config.overflow,
            };
            let queue =
                backlog::declare(&vhost, &queue_name, limits, id, &format!("bridge {name}"), now).map_err(qerr)?;
            let mut wanted = Vec::new();
            for rule in config.topics.iter().filter(|r| r.direction.is_out()) {
                let text = rule.local_filter();
                let filter = ferry_mqtt::topic::Filter::parse(&text).map_err(|e| BridgeError::BadFilter {
                    index,
                    name: name.clone(),
                    filter: text.clone(),
                    reason: e.to_string(),
                })?;
                let key = BindingKey::new(filter.binding_key()).with_pattern(filter.pattern());
                wanted.push(key.routing_key.clone());
                vhost.bind_queue(queue.name(), &exchange, key, id).map_err(qerr)?;
            }
            backlog::unbind_stale(&vhost, &queue, &exchange, &wanted, &format!("bridge {name}"), id).map_err(qerr)?;
            Some(queue)
        } else {
            // No `out` rule any more: a queue left from an earlier config gets nothing new.
            if let Some(old) = vhost.queue(&config.queue_name()) {
                backlog::unbind_stale(&vhost, &old, &exchange, &[], &format!("bridge {name}"), id).map_err(
                    |error| BridgeError::Queue { index, name: name.clone(), queue: config.queue_name(), error },
                )?;
                let held = old.stats().ready;
                if held > 0 {
                    warn!(
                        "bridge {name}: queue {} holds {held} messages from an earlier config with out rules; \
                         they wait there until an out rule is configured again",
                        config.queue_name()
                    );
                }
            }
            None
        };
        let link = Arc::new(Link {
            owner: ferry_core::queue::OwnerId::next(),
            config: config.clone(),
            id,
            connections: broker.connections().clone(),
            queue,
            state: StateCell::new(),
            counters: Counters::default(),
            changes: watch::Sender::new(0),
            private_refused: Default::default(),
            recovered_qos2: std::sync::Mutex::new(qos2_ids::recover(broker, &config.vhost, &config.name)),
            current: std::sync::atomic::AtomicUsize::new(0),
            will_refused: std::sync::atomic::AtomicBool::new(false),
        });
        Ok((link, vhost))
    }

    /// Starts a prepared bridge's task (and its overflow watch) until `shutdown`.
    fn spawn(
        link: &Arc<Link>,
        vhost: Arc<ferry_core::vhost::VHost>,
        shutdown: &Shutdown,
        now: ferry_core::Millis,
        i: usize,
    ) -> Vec<JoinHandle<()>> {
        let seed = now ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ link.id.0;
        let mut tasks = Vec::with_capacity(2);
        if let Some(queue) = &link.queue {
            let watch = overflow::watch(format!("bridge {}", link.config.name), queue.clone(), shutdown.clone());
            tasks.push(tokio::spawn(watch));
        }
        tasks.push(tokio::spawn(link.clone().run(vhost, shutdown.clone(), seed)));
        tasks
    }

    /// Starts the MQTT bridges and the AMQP shovels: the one entry point the server uses.
    /// Each shovel's local queue and bindings are set up first; nothing is started when one
    /// bridge or shovel cannot be set up.
    pub fn start_with_shovels(
        broker: &Arc<Broker>,
        configs: &[BridgeConfig],
        shovels: &[ShovelConfig],
        shutdown: Shutdown,
    ) -> Result<Bridges, BridgeError> {
        let ready = shovel::prepare(broker, shovels)?;
        let mut bridges = Bridges::start(broker, configs, shutdown.clone())?;
        let configured: Vec<String> =
            configs.iter().map(|c| c.name.clone()).chain(shovels.iter().map(|s| s.name.clone())).collect();
        bridges.runtime.start(broker, configured.clone(), &shutdown);
        // What is left of stored QoS 2 ids belongs to bridges no longer configured.
        qos2_ids::forget_others(broker);
        let runtime = bridges.runtime.names();
        bridges.dynamic.start(broker, configured.clone(), &runtime, &shutdown);
        let dynamic = bridges.dynamic.names();
        let names: Vec<&str> = configured.iter().chain(&runtime).chain(&dynamic).map(String::as_str).collect();
        backlog::retire_orphans(broker, &names, now_millis());
        bridges.shovels = shovel::spawn(ready, &shutdown, &mut bridges.tasks);
        if !bridges.shovels.is_empty() {
            info!("{} shovel(s) started", bridges.shovels.len());
        }
        Ok(bridges)
    }

    /// A snapshot of every bridge, in config order, then those made through the API, then
    /// every shovel.
    pub fn status(&self) -> Vec<BridgeStatus> {
        self.status_reader().status()
    }

    /// A handle that reads [`Bridges::status`] from elsewhere (the HTTP listener's metrics)
    /// while the server keeps the bridges themselves.
    pub fn status_reader(&self) -> StatusReader {
        StatusReader {
            links: self.links.clone(),
            shovels: self.shovels.clone(),
            runtime: self.runtime.clone(),
            dynamic: self.dynamic.clone(),
        }
    }

    /// Waits until bridge `name`'s status satisfies `pred` (checked now, then whenever its state
    /// or its link's counters change) and returns it; `None` if there is no such bridge or its
    /// task ended first. Queue counts (`queued`) move without a wake-up: wait on the link's own
    /// counters.
    pub async fn wait_for(&self, name: &str, pred: impl Fn(&BridgeStatus) -> bool) -> Option<BridgeStatus> {
        if let Some(s) = self.shovels.iter().find(|s| s.config.name == name) {
            return s.wait_for(pred).await;
        }
        if self.dynamic.names().iter().any(|n| n == name) {
            return self.dynamic.wait_for(name, pred).await;
        }
        let link = self.link(name)?;
        let link = &link;
        let mut states = link.state.subscribe();
        let mut changes = link.changes.subscribe();
        loop {
            let status = Bridges::status_of(link);
            if pred(&status) {
                return Some(status);
            }
            tokio::select! {
                r = states.changed() => r.ok()?,
                r = changes.changed() => r.ok()?,
            }
        }
    }

    fn status_of(l: &Link) -> BridgeStatus {
        status::snapshot(&l.config.name, l.address().to_string(), &l.state, l.queue.as_ref(), &l.counters)
    }

    /// The state of bridge `name` as a watch: `wait_for` on it to wait for a state.
    pub fn watch(&self, name: &str) -> Option<watch::Receiver<(LinkState, Option<String>)>> {
        let shovel = || self.shovels.iter().find(|s| s.config.name == name).map(|s| s.state.subscribe());
        self.link(name).map(|l| l.state.subscribe()).or_else(shovel)
    }

    /// Bridge `name`'s link: the file's, or one made through the API.
    fn link(&self, name: &str) -> Option<Arc<Link>> {
        let runtime =
            || self.runtime.running.lock().unwrap_or_else(|e| e.into_inner()).get(name).map(|r| r.link.clone());
        self.links.iter().find(|l| l.config.name == name).cloned().or_else(runtime)
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
            && self.shovels.is_empty()
            && self.runtime.names().is_empty()
            && self.dynamic.names().is_empty()
    }

    /// Waits for every bridge task to end (after the shutdown signal): each sends DISCONNECT
    /// and hands its unacknowledged messages back to its queue.
    pub async fn stopped(&mut self) {
        let runtime = self.runtime.take_tasks();
        let dynamic = self.dynamic.take_tasks();
        for task in self.tasks.drain(..).chain(runtime).chain(dynamic) {
            if let Err(e) = task.await {
                warn!("a bridge task failed: {e}");
            }
        }
    }
}

/// Reads the bridges' status ([`Bridges::status_reader`]); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct StatusReader {
    links: Vec<Arc<Link>>,
    shovels: Vec<Arc<shovel::Shovel>>,
    runtime: Arc<runtime::RuntimeBridges>,
    dynamic: Arc<shovel::runtime::DynamicShovels>,
}

/// A bridge as [`StatusReader::bridges`] lists it.
#[derive(Debug, Clone)]
pub struct BridgeEntry {
    pub config: BridgeConfig,
    pub status: BridgeStatus,
    /// Made through the management API (not the server's file).
    pub runtime: bool,
}

impl StatusReader {
    /// A snapshot of every bridge (the file's, then those made through the API), then every
    /// shovel (the file's, then the dynamic ones) ([`Bridges::status`]).
    pub fn status(&self) -> Vec<BridgeStatus> {
        let shovels = self.shovels.iter().map(|s| s.status());
        let dynamic = self.dynamic.list().into_iter().map(|d| d.status);
        self.bridges().into_iter().map(|b| b.status).chain(shovels).chain(dynamic).collect()
    }

    /// Each MQTT bridge's configuration with a snapshot of its status: the file's in its order,
    /// then those made through the API by name.
    pub fn bridges(&self) -> Vec<BridgeEntry> {
        let entry =
            |l: &Link, runtime| BridgeEntry { config: l.config.clone(), status: Bridges::status_of(l), runtime };
        let mut all: Vec<BridgeEntry> = self.links.iter().map(|l| entry(l, false)).collect();
        let running = self.runtime.running.lock().unwrap_or_else(|e| e.into_inner());
        all.extend(running.values().map(|r| entry(&r.link, true)));
        all
    }

    /// The JSON table a bridge made through the API was given with (`None`: no such bridge).
    pub fn runtime_table(&self, name: &str) -> Option<serde_json::Value> {
        self.runtime.running.lock().unwrap_or_else(|e| e.into_inner()).get(name).map(|r| r.table.clone())
    }

    /// Whether the server's file names a bridge or shovel `name` (the API may not change it).
    pub fn is_configured(&self, name: &str) -> bool {
        self.runtime.is_configured(name)
    }

    /// Adds or replaces bridge `name` from its `[[bridges]]` keys as JSON (checked as the
    /// file's), kept in the store; `Ok(true)` when it replaced one ([`runtime`]).
    pub async fn put_bridge(&self, name: &str, table: serde_json::Value) -> Result<bool, runtime::ChangeError> {
        if self.dynamic.names().iter().any(|n| n == name) {
            return Err(runtime::ChangeError::Taken(format!("{name:?} is a shovel made through the API")));
        }
        self.runtime.put(name, table).await
    }

    /// Removes bridge `name` made through the API ([`runtime`]).
    pub async fn delete_bridge(&self, name: &str) -> Result<(), runtime::ChangeError> {
        self.runtime.delete(name).await
    }

    /// Each AMQP shovel of the server's file, its configuration with a snapshot of its status,
    /// in config order.
    pub fn shovels(&self) -> Vec<(&ShovelConfig, BridgeStatus)> {
        self.shovels.iter().map(|s| (&s.config, s.status())).collect()
    }

    /// The dynamic shovels (RabbitMQ's shovel parameters), by name.
    pub fn dynamic_shovels(&self) -> Vec<shovel::runtime::DynamicShovel> {
        self.dynamic.list()
    }

    /// Adds or replaces dynamic shovel `name` of `vhost` from RabbitMQ's parameter value
    /// (checked as the file's shovels are), kept in the store; `Ok(true)` when it replaced one
    /// ([`shovel::runtime`]).
    pub async fn put_shovel(
        &self,
        vhost: &str,
        name: &str,
        value: serde_json::Value,
    ) -> Result<bool, runtime::ChangeError> {
        let taken = self.runtime.names().iter().any(|n| n == name);
        self.dynamic.put(vhost, name, value, taken).await
    }

    /// Removes dynamic shovel `name` of `vhost`.
    pub async fn delete_shovel(&self, vhost: &str, name: &str) -> Result<(), runtime::ChangeError> {
        self.dynamic.delete(vhost, name).await
    }

    /// Stops dynamic shovel `name` of `vhost` and starts it again.
    pub async fn restart_shovel(&self, vhost: &str, name: &str) -> Result<(), runtime::ChangeError> {
        self.dynamic.restart(vhost, name).await
    }
}

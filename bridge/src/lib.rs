//! Ferry's bridges: outbound links to other brokers, with store and forward on the core's
//! durable queues (DESIGN.md, "Services beside the frontends"). This first slice has MQTT
//! bridges (to MQTT 3.1.1 and 5.0 brokers over TCP or TLS); AMQP shovels come later.
//!
//! # Layout
//!
//! - [`config`]: one `[[bridges]]` table as values ([`BridgeConfig`], [`TopicRule`]); the
//!   server's config module parses and validates the TOML into it.
//! - [`rules`]: which topic rule a topic falls under and its name on the other side.
//! - [`backoff`]: reconnect delays, exponential with jitter.
//! - [`tls`]: a bridge's `tls` table → a rustls `ClientConfig` and the name to check.
//! - `link`: one task per bridge. `out` rules: the core routes matching messages into the
//!   bridge's durable queue `ferry-bridge.<name>` (bound to the rules' exchange like an MQTT
//!   persistent session's queue), the task consumes it with a prefetch window, publishes to the
//!   remote with ferry-mqtt's codec and acks the queue when the remote acknowledged. `in` rules:
//!   the task subscribes on the remote, publishes what arrives into the local vhost and
//!   acknowledges the remote after the local store commit.
//! - [`status`]: [`BridgeStatus`], what [`Bridges::status`] reports per bridge.
//!
//! Data flows: local publisher → exchange → `ferry-bridge.<name>` (redb) → link → remote;
//! remote → link → vhost publish → store commit → PUBACK/PUBREC to the remote.

pub mod backoff;
pub mod config;
mod link;
pub mod rules;
pub mod status;
pub mod tls;

use std::sync::Arc;

use ferry_core::error::CoreError;
use ferry_core::exchange::BindingKey;
use ferry_core::frontend::Shutdown;
use ferry_core::message::{now_millis, ConnectionId, FieldTable, FieldValue, ShortString};
use ferry_core::queue::QueueOptions;
use ferry_core::vhost::QueueDeclare;
use ferry_core::Broker;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use config::{BridgeConfig, BridgeTls, Direction, Overflow, PasswordSource, TopicRule};
pub use link::{LinkError, HOPS};
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
}

/// The running bridges.
#[derive(Debug, Default)]
pub struct Bridges {
    links: Vec<Arc<Link>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Bridges {
    /// Declares each bridge's local queue and bindings, then starts one task per bridge; they
    /// run until `shutdown`. Nothing is started when one bridge cannot be set up.
    pub fn start(broker: &Arc<Broker>, configs: &[BridgeConfig], shutdown: Shutdown) -> Result<Bridges, BridgeError> {
        let now = now_millis();
        let mut ready = Vec::with_capacity(configs.len());
        for (index, config) in configs.iter().enumerate() {
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
                let mut arguments = FieldTable::new();
                if config.max_queued_messages > 0 {
                    arguments.insert("x-max-length", FieldValue::I64(i64::from(config.max_queued_messages)));
                    let overflow = match config.overflow {
                        Overflow::DropOldest => "drop-head",
                        Overflow::Block => "reject-publish",
                    };
                    arguments.insert("x-overflow", FieldValue::LongString(overflow.as_bytes().to_vec().into()));
                }
                let options = QueueOptions { durable: true, exclusive: None, auto_delete: false, arguments };
                let decl = QueueDeclare {
                    name: ShortString::from(queue_name.as_str()),
                    passive: false,
                    options,
                    connection: id,
                };
                let queue = match vhost.declare_queue(decl.clone(), now) {
                    Ok(d) => d.queue,
                    Err(CoreError::PreconditionFailed(why)) => {
                        // Made with other limits by an earlier config. A queue's arguments do
                        // not change: an empty one is made again with the new limits; one
                        // holding a backlog keeps its limits (deleting it would lose the
                        // backlog) until a start finds it empty.
                        let old =
                            vhost.queue(&queue_name).ok_or_else(|| qerr(CoreError::NotFound(queue_name.clone())))?;
                        let stats = old.stats();
                        if stats.ready == 0 && stats.unacked == 0 {
                            vhost.delete_queue(&decl.name, id, false, true, now).map_err(qerr)?;
                            info!("bridge {name}: queue {queue_name} made again with the new limits ({why})");
                            vhost.declare_queue(decl, now).map_err(qerr)?.queue
                        } else {
                            warn!(
                                "bridge {name}: queue {queue_name} keeps the limits it was made with ({why}) while it \
                                 holds {} messages; the new max_queued_messages / overflow apply at a start that finds it empty",
                                stats.ready
                            );
                            old
                        }
                    }
                    Err(e) => return Err(qerr(e)),
                };
                for rule in config.topics.iter().filter(|r| r.direction.is_out()) {
                    let text = rule.local_filter();
                    let filter = ferry_mqtt::topic::Filter::parse(&text).map_err(|e| BridgeError::BadFilter {
                        index,
                        name: name.clone(),
                        filter: text.clone(),
                        reason: e.to_string(),
                    })?;
                    let key = BindingKey::new(filter.binding_key()).with_pattern(filter.pattern());
                    vhost.bind_queue(queue.name(), &exchange, key, id).map_err(qerr)?;
                }
                Some(queue)
            } else {
                None
            };
            let link = Arc::new(Link {
                config: config.clone(),
                id,
                connections: broker.connections().clone(),
                queue,
                state: StateCell::new(),
                counters: Counters::default(),
                changes: watch::Sender::new(0),
            });
            ready.push((link, vhost));
        }
        let mut bridges = Bridges::default();
        for (i, (link, vhost)) in ready.into_iter().enumerate() {
            let seed = now ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ link.id.0;
            bridges.tasks.push(tokio::spawn(link.clone().run(vhost, shutdown.clone(), seed)));
            bridges.links.push(link);
        }
        if !bridges.links.is_empty() {
            info!("{} bridge(s) started", bridges.links.len());
        }
        Ok(bridges)
    }

    /// A snapshot of every bridge, in config order.
    pub fn status(&self) -> Vec<BridgeStatus> {
        self.links.iter().map(|l| Bridges::status_of(l)).collect()
    }

    /// Waits until bridge `name`'s status satisfies `pred` (checked now, then whenever its state
    /// or its link's counters change) and returns it; `None` if there is no such bridge or its
    /// task ended first. Queue counts (`queued`) move without a wake-up: wait on the link's own
    /// counters.
    pub async fn wait_for(&self, name: &str, pred: impl Fn(&BridgeStatus) -> bool) -> Option<BridgeStatus> {
        let link = self.links.iter().find(|l| l.config.name == name)?;
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
        let (state, last_error) = l.state.get();
        let stats = l.queue.as_ref().map(|q| q.stats()).unwrap_or_default();
        let c = &l.counters;
        BridgeStatus {
            name: l.config.name.clone(),
            remote: l.config.address.clone(),
            state,
            last_error,
            queued: u64::from(stats.ready),
            queued_bytes: stats.ready_bytes,
            in_flight: u64::from(stats.unacked),
            forwarded_out: Counters::get(&c.forwarded_out),
            forwarded_in: Counters::get(&c.forwarded_in),
            dropped_overflow: stats.dropped_overflow,
            rejected_overflow: stats.rejected_overflow,
            dropped_max_hops: Counters::get(&c.dropped_max_hops),
            dropped_loop: Counters::get(&c.dropped_loop),
            dropped_no_rule: Counters::get(&c.dropped_no_rule),
            dropped_refused: Counters::get(&c.dropped_refused),
            connects: Counters::get(&c.connects),
            attempts: Counters::get(&c.attempts),
        }
    }

    /// The state of bridge `name` as a watch: `wait_for` on it to wait for a state.
    pub fn watch(&self, name: &str) -> Option<watch::Receiver<(LinkState, Option<String>)>> {
        self.links.iter().find(|l| l.config.name == name).map(|l| l.state.subscribe())
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Waits for every bridge task to end (after the shutdown signal): each sends DISCONNECT
    /// and hands its unacknowledged messages back to its queue.
    pub async fn stopped(&mut self) {
        for task in self.tasks.drain(..) {
            if let Err(e) = task.await {
                warn!("a bridge task failed: {e}");
            }
        }
    }
}

//! AMQP shovels: move messages between the local broker and a remote AMQP 0-9-1 broker
//! (RabbitMQ, another Ferry), with store and forward on the core's durable queues.
//!
//! - [`config`]: one `[[shovels]]` table as values ([`ShovelConfig`], [`AmqpUri`]).
//! - [`spec`]: a `[[shovels]]` table as written and its checks, for the file and the API.
//! - [`dynamic`]: RabbitMQ's dynamic shovel parameter (`src-uri`, `dest-queue`...) mapped onto
//!   a `[[shovels]]` table; [`runtime`]: the dynamic shovels, kept in the store.
//! - [`client`]: the AMQP client as a sans-I/O state machine on ferry-amqp's codec.
//! - `link`: one task per shovel (connect, set up, move messages, back off).
//!
//! Data flows: out, local publisher → exchange → local queue (redb) → shovel → remote
//! basic.publish → publisher confirm → local ack; in, remote basic.deliver → local vhost
//! publish → store commit → remote basic.ack.

pub mod args;
pub mod client;
pub mod config;
pub mod dynamic;
mod link;
pub mod runtime;
pub mod spec;

use std::sync::Arc;

use ferry_core::error::CoreError;
use ferry_core::exchange::BindingKey;
use ferry_core::frontend::Shutdown;
use ferry_core::message::{now_millis, ConnectionId, ShortString};
use ferry_core::queue::{Queue, QueueOptions};
use ferry_core::vhost::{QueueDeclare, VHost};
use ferry_core::Broker;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{
    AckMode, Alternate, AmqpUri, AuthMechanism, DeleteAfter, Destination, ShovelConfig, ShovelDirection, Source,
    UriError, UriQuery,
};
pub use link::{ShovelError, RECEIVED_FROM, SHOVELLED, SHOVELLED_TIMESTAMP};

pub(crate) use link::Shovel;

use crate::status::{Counters, StateCell};
use crate::BridgeError;

/// The name a shovel's remote certificate must be valid for: `tls.server_name`, else the
/// URI's host.
pub fn server_name(config: &ShovelConfig) -> Result<rustls::pki_types::ServerName<'static>, crate::tls::TlsError> {
    server_name_for(config, &config.remote)
}

/// [`server_name`] for one URI of the remote's list.
pub fn server_name_for(
    config: &ShovelConfig,
    remote: &AmqpUri,
) -> Result<rustls::pki_types::ServerName<'static>, crate::tls::TlsError> {
    let name = config.tls.as_ref().and_then(|t| t.server_name.clone()).unwrap_or_else(|| remote.host.clone());
    rustls::pki_types::ServerName::try_from(name.clone()).map_err(|_| crate::tls::TlsError::ServerName(name))
}

/// Everything the shovel's TLS needs loads, for `ferry check-config` and the start.
pub fn check_tls(config: &ShovelConfig) -> Result<(), crate::tls::TlsError> {
    if let Some(tls) = &config.tls {
        crate::tls::client_config(tls)?;
        for i in 0..config.remote_count() {
            server_name_for(config, config.remote_at(i).0)?;
        }
    }
    Ok(())
}

/// A shovel set up and the local vhost it works in, ready to start.
pub(crate) type Prepared = (Arc<Shovel>, Arc<VHost>);

/// Declares each shovel's local queue and bindings (`out` shovels) and checks its local
/// destination exchange (`in` shovels); nothing is started yet.
pub(crate) fn prepare(broker: &Arc<Broker>, configs: &[ShovelConfig]) -> Result<Vec<Prepared>, BridgeError> {
    let now = now_millis();
    let mut ready = Vec::with_capacity(configs.len());
    for (index, config) in configs.iter().enumerate() {
        let name = config.name.clone();
        let err = |reason: String| BridgeError::Shovel { index, name: name.clone(), reason };
        let vhost = broker.add_vhost(&config.vhost);
        let id = ConnectionId::next();
        let queue = match config.direction {
            ShovelDirection::Out => {
                let queue_name = config.local_queue();
                let queue = match &config.source {
                    // The shovel's own backlog, with its limits.
                    Source::Exchange { .. } => {
                        let limits = crate::backlog::Limits {
                            max_messages: config.max_queued_messages,
                            max_bytes: config.max_queued_bytes,
                            overflow: config.overflow,
                        };
                        crate::backlog::declare(&vhost, &queue_name, limits, id, &format!("shovel {name}"), now)
                            .map_err(|e: CoreError| err(format!("local queue {queue_name}: {e}")))?
                    }
                    // A queue of the user's: taken as it is, declared durable with
                    // `src_queue_args` if it does not exist (unless `src_predeclared`).
                    Source::Queue(_) => local_queue(&vhost, config, &queue_name, id, now).map_err(err)?,
                };
                if let Source::Exchange { exchange, key } = &config.source {
                    if vhost.exchange(exchange).is_none() {
                        return Err(err(format!(
                            "src_exchange {exchange:?} does not exist in vhost {:?}",
                            config.vhost
                        )));
                    }
                    vhost
                        .bind_queue(
                            queue.name(),
                            &ShortString::from(exchange.as_str()),
                            BindingKey::new(key.as_str()),
                            id,
                        )
                        .map_err(|e| err(format!("binding {queue_name} to {exchange}: {e}")))?;
                    let wanted = [ShortString::from(key.as_str())];
                    let who = format!("shovel {name}");
                    crate::backlog::unbind_stale(
                        &vhost,
                        &queue,
                        &ShortString::from(exchange.as_str()),
                        &wanted,
                        &who,
                        id,
                    )
                    .map_err(|e| err(format!("unbinding {queue_name}: {e}")))?;
                }
                Some(queue)
            }
            ShovelDirection::In => {
                match &config.destination {
                    Destination::Exchange { exchange, .. } if vhost.exchange(exchange).is_none() => {
                        return Err(err(format!(
                            "dest_exchange {exchange:?} does not exist in vhost {:?}",
                            config.vhost
                        )));
                    }
                    Destination::Queue(q) => {
                        local_queue(&vhost, config, q, id, now).map_err(err)?;
                    }
                    _ => {}
                }
                None
            }
        };
        let shovel = Arc::new(Shovel {
            owner: ferry_core::queue::OwnerId::next(),
            config: config.clone(),
            id,
            connections: broker.connections().clone(),
            queue,
            state: StateCell::new(),
            counters: Counters::default(),
            changes: watch::Sender::new(0),
            finished: watch::Sender::new(false),
            current: std::sync::atomic::AtomicUsize::new(0),
        });
        ready.push((shovel, vhost));
    }
    Ok(ready)
}

/// A shovel's named local queue (its source for `out`, its destination for `in`): taken as it
/// is when it exists; otherwise declared durable with the side's queue arguments, as
/// RabbitMQ's shovels declare theirs, unless the shovel says it is predeclared.
fn local_queue(
    vhost: &Arc<VHost>,
    config: &ShovelConfig,
    name: &str,
    id: ConnectionId,
    now: u64,
) -> Result<Arc<Queue>, String> {
    if let Some(q) = vhost.queue(name) {
        return Ok(q);
    }
    let (key, arguments, predeclared) = match config.direction {
        ShovelDirection::Out => ("src_queue", &config.src_queue_args, config.src_predeclared),
        ShovelDirection::In => ("dest_queue", &config.dest_queue_args, config.dest_predeclared),
    };
    if predeclared {
        return Err(format!("{key} {name:?} does not exist in vhost {:?} (predeclared)", config.vhost));
    }
    let options = QueueOptions { durable: true, exclusive: None, auto_delete: false, arguments: arguments.clone() };
    let decl = QueueDeclare { name: ShortString::from(name), passive: false, options, connection: id };
    vhost.declare_queue(decl, now).map(|d| d.queue).map_err(|e: CoreError| format!("local queue {name}: {e}"))
}

/// Starts one task per prepared shovel.
pub(crate) fn spawn(ready: Vec<Prepared>, shutdown: &Shutdown, tasks: &mut Vec<JoinHandle<()>>) -> Vec<Arc<Shovel>> {
    let now = now_millis();
    let mut shovels = Vec::with_capacity(ready.len());
    for (i, (shovel, vhost)) in ready.into_iter().enumerate() {
        let seed = now ^ ((i as u64) << 32).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ shovel.id.0;
        if let (Some(queue), Source::Exchange { .. }) = (&shovel.queue, &shovel.config.source) {
            let who = format!("shovel {}", shovel.config.name);
            tasks.push(tokio::spawn(crate::overflow::watch(who, queue.clone(), shutdown.clone())));
        }
        tasks.push(tokio::spawn(shovel.clone().run(vhost, shutdown.clone(), seed)));
        shovels.push(shovel);
    }
    shovels
}

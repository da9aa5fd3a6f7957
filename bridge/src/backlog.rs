//! The local durable queue a bridge or shovel forwards from (`ferry-bridge.<name>`): declared
//! with the configured limits, and made again when they changed, without ever costing a queued
//! message.

use std::sync::Arc;

use ferry_core::error::CoreError;
use ferry_core::exchange::Destination;
use ferry_core::message::{ConnectionId, FieldTable, FieldValue, Millis, ShortString};
use ferry_core::queue::{Queue, QueueOptions};
use ferry_core::vhost::{QueueDeclare, VHost};
use tracing::{info, warn};

use crate::config::Overflow;

/// How far a backlog may grow, and what happens past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `x-max-length` (0: none).
    pub max_messages: u32,
    /// `x-max-length-bytes` (0: none).
    pub max_bytes: u64,
    pub overflow: Overflow,
}

impl Limits {
    /// The queue arguments that carry the limits.
    pub fn arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::new();
        if self.max_messages > 0 {
            arguments.insert("x-max-length", FieldValue::I64(i64::from(self.max_messages)));
        }
        if self.max_bytes > 0 {
            arguments.insert("x-max-length-bytes", FieldValue::I64(i64::try_from(self.max_bytes).unwrap_or(i64::MAX)));
        }
        if self.max_messages > 0 || self.max_bytes > 0 {
            let overflow = match self.overflow {
                Overflow::DropOldest => "drop-head",
                Overflow::Block => "block",
            };
            arguments.insert("x-overflow", FieldValue::LongString(overflow.as_bytes().to_vec().into()));
        }
        arguments
    }
}

/// Declares the durable backlog `queue_name` with `limits`. A queue's arguments do not change:
/// one made with other limits by an earlier config is made again with the new ones when it is
/// empty, and keeps its old ones while it holds a backlog (deleting it would lose the backlog;
/// `who`, "bridge central", says so in the log) until a start finds it empty.
pub fn declare(
    vhost: &Arc<VHost>,
    queue_name: &str,
    limits: Limits,
    connection: ConnectionId,
    who: &str,
    now: Millis,
) -> Result<Arc<Queue>, CoreError> {
    let options = QueueOptions { durable: true, exclusive: None, auto_delete: false, arguments: limits.arguments() };
    let decl = QueueDeclare { name: ShortString::from(queue_name), passive: false, options, connection };
    match vhost.declare_queue(decl.clone(), now) {
        Ok(d) => Ok(d.queue),
        Err(CoreError::PreconditionFailed(why)) => {
            let old = vhost.queue(queue_name).ok_or_else(|| CoreError::NotFound(queue_name.to_string()))?;
            let stats = old.stats();
            if stats.ready == 0 && stats.unacked == 0 {
                vhost.delete_queue(&decl.name, connection, false, true, now)?;
                info!("{who}: queue {queue_name} made again with the new limits ({why})");
                Ok(vhost.declare_queue(decl, now)?.queue)
            } else {
                warn!(
                    "{who}: queue {queue_name} keeps the limits it was made with ({why}) while it holds {} messages; \
                     the new max_queued_messages / max_queued_bytes / overflow apply at a start that finds it empty",
                    stats.ready
                );
                Ok(old)
            }
        }
        Err(e) => Err(e),
    }
}

/// Removes the bindings of backlog `queue` that the config no longer makes (a bridge's `out`
/// rule removed, a shovel's `src_exchange_key` changed, the exchange changed): the queue is the
/// bridge's or shovel's alone, so every binding on it is one it made. `wanted` are the routing
/// keys of the bindings the config makes on `exchange`.
pub(crate) fn unbind_stale(
    vhost: &VHost,
    queue: &Arc<Queue>,
    exchange: &ShortString,
    wanted: &[ShortString],
    who: &str,
    id: ConnectionId,
) -> Result<(), CoreError> {
    for x in vhost.exchange_names() {
        let Some(source) = vhost.exchange(&x.to_string_lossy()) else { continue };
        for binding in source.bindings() {
            let ours = matches!(&binding.destination, Destination::Queue(q) if Arc::ptr_eq(q, queue));
            if !ours || (&x == exchange && wanted.contains(&binding.key.routing_key)) {
                continue;
            }
            info!(
                "{who}: binding {:?} from exchange {x:?} to queue {} removed: the config no longer makes it",
                binding.key.routing_key.to_string_lossy(),
                queue.name()
            );
            vhost.unbind_queue(queue.name(), &x, binding.key, id)?;
        }
    }
    Ok(())
}

/// Backlogs (`ferry-bridge.<name>` in any vhost) of bridges and shovels no longer configured
/// (`configured` holds the names of those that are): an empty one is deleted; one that still
/// holds messages loses its bindings, so it takes nothing new, and is kept with them (a
/// warning says how many) until a bridge or shovel of that name forwards them, or an operator
/// deletes it.
pub fn retire_orphans(broker: &ferry_core::Broker, configured: &[&str], now: Millis) {
    for vhost_name in broker.vhost_names() {
        let Some(vhost) = broker.vhost(&vhost_name) else { continue };
        for queue_name in vhost.queue_names() {
            let text = queue_name.to_string_lossy();
            let Some(name) = text.strip_prefix(crate::config::QUEUE_PREFIX) else { continue };
            if !configured.contains(&name) {
                retire_queue(&vhost, name, now);
            }
        }
    }
}

/// The backlog of bridge or shovel `name` (in any vhost), retired as [`retire_orphans`] does:
/// when it is removed at run time.
pub fn retire(broker: &ferry_core::Broker, name: &str, now: Millis) {
    for vhost_name in broker.vhost_names() {
        if let Some(vhost) = broker.vhost(&vhost_name) {
            retire_queue(&vhost, name, now);
        }
    }
}

fn retire_queue(vhost: &VHost, name: &str, now: Millis) {
    let id = ConnectionId::next();
    let vhost_name = vhost.name();
    let text = format!("{}{name}", crate::config::QUEUE_PREFIX);
    let Some(queue) = vhost.queue(&text) else { return };
    let who = format!("{name} (no longer configured)");
    let stats = queue.stats();
    let outcome = if stats.ready == 0 && stats.unacked == 0 {
        vhost.delete_queue(queue.name(), id, false, true, now).map(|_| {
            info!("bridge or shovel {who}: its empty queue {text} in vhost {vhost_name:?} deleted");
        })
    } else {
        unbind_stale(vhost, &queue, &ShortString::from(""), &[], &who, id).map(|()| {
            warn!(
                "bridge or shovel {who}: its queue {text} in vhost {vhost_name:?} holds {} messages; it takes \
                 nothing new, and they wait there until a bridge or shovel named {name:?} is configured again",
                stats.ready
            );
        })
    };
    if let Err(e) = outcome {
        warn!("bridge or shovel {who}: queue {text} in vhost {vhost_name:?}: {e}");
    }
}

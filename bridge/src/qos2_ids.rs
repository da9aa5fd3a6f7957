//! The packet ids of the QoS 2 messages a bridge received from its remote, published locally and
//! PUBREC'd, and not yet released (PUBREL), kept in the store so that they survive a restart of
//! Ferry.
//!
//! Without them, a remote that keeps its session (`clean_session = false`) and did not get the
//! PUBREC before Ferry stopped sends the message again (DUP) after the restart, and Ferry, having
//! forgotten the id, publishes it a second time: a duplicate where QoS 2 promises exactly once.
//! Each id is one session record of the store (`sessions` table), written in the order that makes
//! a crash at any point safe:
//!
//! - taken: the record is submitted right after the message's own batch (no await between them),
//!   and the PUBREC waits for both commits. The store's writer applies batches in the order they
//!   were submitted, so a record is never durable without its message (a resend would then be
//!   dropped as a duplicate of nothing: a loss); a crash between the two commits, when they land
//!   in different groups, leaves at worst the duplicate of before.
//! - released: the record is deleted before the PUBCOMP goes, so that an id the remote may reuse
//!   for a new message is never taken for a resend after a restart.
//! - a connection without a session on the remote (`session present = 0`) forgets them all.
//!
//! One record per id, keyed `"\0bridge/<name>/<id>"`: U+0000 cannot occur in an MQTT client id
//! ([`INTERNAL_SESSION_PREFIX`]), so no MQTT session shares the key, and records of different
//! ids never overwrite each other whatever order their commits take.

use std::collections::HashSet;

use bytes::Bytes;
use ferry_core::store::{Commit, StoreOp, INTERNAL_SESSION_PREFIX};
use ferry_core::vhost::VHost;
use ferry_core::Broker;

/// The prefix of every record of bridge `name`.
fn prefix(name: &str) -> String {
    format!("{INTERNAL_SESSION_PREFIX}bridge/{name}/")
}

/// The record key of `id` for bridge `name`.
fn key(name: &str, id: u16) -> String {
    format!("{}{id}", prefix(name))
}

/// Takes the recovered records of bridge `name` in `vhost` (once, at start-up): the ids still
/// awaiting their PUBREL.
pub(crate) fn recover(broker: &Broker, vhost: &str, name: &str) -> HashSet<u16> {
    let prefix = prefix(name);
    broker
        .take_recovered_sessions(|r| r.vhost == vhost && r.client_id.starts_with(&prefix))
        .into_iter()
        .filter_map(|r| r.client_id[prefix.len()..].parse().ok())
        .collect()
}

/// Deletes the recovered records of bridges no longer configured (their remote sessions are
/// not this configuration's business; a bridge of the same name added later starts clean).
pub(crate) fn forget_others(broker: &Broker) {
    let ours = format!("{INTERNAL_SESSION_PREFIX}bridge/");
    let stale = broker.take_recovered_sessions(|r| r.client_id.starts_with(&ours));
    if stale.is_empty() {
        return;
    }
    let ops = stale.into_iter().map(|r| StoreOp::DeleteSession { vhost: r.vhost, client_id: r.client_id }).collect();
    let _ = broker.store().submit(ops);
}

/// Records `id`, submitted after the batch of the message it names (see above); the returned
/// commit resolves when both `published` and the record have.
pub(crate) fn record(vhost: &VHost, name: &str, id: u16, published: Commit) -> Commit {
    let op = StoreOp::PutSession { vhost: vhost.name().to_string(), client_id: key(name, id), state: Bytes::new() };
    published.join(vhost.store().submit(vec![op]))
}

/// Deletes the record of `id` (released).
pub(crate) fn release(vhost: &VHost, name: &str, id: u16) -> Commit {
    vhost.store().submit(vec![StoreOp::DeleteSession { vhost: vhost.name().to_string(), client_id: key(name, id) }])
}

/// Deletes the records of `ids` (the remote has no session any more).
pub(crate) fn forget(vhost: &VHost, name: &str, ids: impl Iterator<Item = u16>) {
    let ops: Vec<StoreOp> =
        ids.map(|id| StoreOp::DeleteSession { vhost: vhost.name().to_string(), client_id: key(name, id) }).collect();
    if !ops.is_empty() {
        let _ = vhost.store().submit(ops);
    }
}

//! Channels, consumers, users and permissions, in RabbitMQ 3.10's shapes.
//!
//! - Channels are AMQP's: each connection's registry entry holds its channel list (number,
//!   prefetch, confirm / transaction mode, consumers, unacked), which the AMQP driver hands
//!   over with its counters. A channel's name is RabbitMQ's: `<connection name> (<number>)`.
//!   Who sees which: as for connections (`management` users their own).
//! - Consumers are read from every visible queue. Their `channel_details` name the AMQP
//!   channel; a consumer of another protocol (an MQTT session's queue) shows its connection
//!   with channel number 0.
//! - Users and permissions: `administrator` and `monitoring` only (RabbitMQ lets only
//!   administrators read them; Ferry's `monitoring` sees everything, so it may list them too),
//!   and only an administrator sees `password_hash` and `hashing_algorithm`. With no
//!   `[[permissions]]` configured every user may do everything everywhere, which the list
//!   shows as `.*` for each user on each vhost.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::Router;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ferry_core::auth::PasswordHash;
use ferry_core::connections::{ChannelInfo, ConnectionSnapshot};
use ferry_core::queue::ConsumerInfo;
use ferry_core::vhost::VHost;
use ferry_core::ConnectionId;
use serde_json::{json, Value};

use crate::api::{
    connection_name, json_response, node, render, vhost_list, visible_connections, visible_vhost, ApiResult, AppState,
    Params,
};
use crate::error::ApiError;
use crate::login::Caller;
use crate::query::ListQuery;
use crate::Shared;

/// The routes of this module and of `topology`, `messages` and `mqtt` (one merge in
/// `api::router`).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .merge(crate::topology::routes())
        .merge(crate::messages::routes())
        .merge(crate::mqtt::routes())
        .route("/api/channels", get(channels_all))
        .route("/api/channels/{name}", get(channel_one))
        .route("/api/vhosts/{vhost}/channels", get(channels_of_vhost))
        .route("/api/connections/{name}/channels", get(channels_of_connection))
        .route("/api/consumers", get(consumers_all))
        .route("/api/consumers/{vhost}", get(consumers_of_vhost))
        .route("/api/users", get(users))
        .route("/api/users/{name}", get(user_one))
        .route("/api/users/{name}/permissions", get(permissions_of_user))
        .route("/api/permissions", get(permissions_all))
        .route("/api/vhosts/{vhost}/permissions", get(permissions_of_vhost))
}

// ----- channels ----------------------------------------------------------------------------------

/// RabbitMQ's channel name: the connection's name and the channel number.
fn channel_name(conn: &ConnectionSnapshot, number: u16) -> String {
    format!("{} ({number})", connection_name(conn))
}

fn channel_json(conn: &ConnectionSnapshot, ch: &ChannelInfo) -> Value {
    let user = conn.user.clone().unwrap_or_default();
    json!({
        "name": channel_name(conn, ch.number),
        "number": ch.number,
        "node": node(),
        "user": user,
        "user_who_performed_action": user,
        "vhost": conn.vhost.clone().unwrap_or_default(),
        "connection_details": {
            "name": connection_name(conn),
            "peer_host": conn.peer.ip().to_string(),
            "peer_port": conn.peer.port(),
        },
        "state": if conn.closing.is_some() { "closing" } else { "running" },
        "consumer_count": ch.consumers,
        "messages_unacknowledged": ch.unacked,
        "messages_unconfirmed": 0,
        "messages_uncommitted": 0,
        "acks_uncommitted": 0,
        "prefetch_count": ch.prefetch_count,
        "global_prefetch_count": ch.global_prefetch_count,
        "confirm": ch.confirm,
        "transactional": ch.transactional,
    })
}

/// Every channel of the visible connections that `keep` lets through, by connection then
/// number.
fn channel_list(shared: &Shared, caller: &Caller, keep: impl Fn(&ConnectionSnapshot) -> bool) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for c in visible_connections(shared, caller).iter().filter(|c| keep(c)) {
        let Some(entry) = shared.broker.connections().get(c.id) else { continue };
        for ch in entry.channel_list() {
            out.push((channel_name(c, ch.number), channel_json(c, &ch)));
        }
    }
    out
}

fn finish_named(q: &ListQuery, all: Vec<(String, Value)>) -> Result<Value, ApiError> {
    let total = all.len();
    let items = all.into_iter().filter(|(n, _)| q.matches(n)).map(|(_, v)| v).collect();
    q.finish(items, total)
}

async fn channels_all(State(state): State<AppState>, caller: Caller, Query(params): Params) -> ApiResult {
    let q = ListQuery::parse(&params)?;
    let body = render(&state, move |shared| finish_named(&q, channel_list(shared, &caller, |_| true))).await??;
    Ok(json_response(body))
}

async fn channels_of_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(params): Params,
) -> ApiResult {
    let q = ListQuery::parse(&params)?;
    visible_vhost(&state.shared, &caller, &vhost)?;
    let body = render(&state, move |shared| {
        finish_named(&q, channel_list(shared, &caller, |c| c.vhost.as_deref() == Some(vhost.as_str())))
    })
    .await??;
    Ok(json_response(body))
}

async fn channels_of_connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(params): Params,
) -> ApiResult {
    let q = ListQuery::parse(&params)?;
    let conns = visible_connections(&state.shared, &caller);
    if !conns.iter().any(|c| connection_name(c) == name) {
        return Err(ApiError::not_found());
    }
    let list = channel_list(&state.shared, &caller, |c| connection_name(c) == name);
    Ok(json_response(finish_named(&q, list)?))
}

async fn channel_one(State(state): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult {
    // `<connection name> (<number>)`: the connection is everything before the last " (".
    let (conn, _) = name.rsplit_once(" (").ok_or_else(ApiError::not_found)?;
    let list = channel_list(&state.shared, &caller, |c| connection_name(c) == conn);
    let (_, v) = list.into_iter().find(|(n, _)| *n == name).ok_or_else(ApiError::not_found)?;
    Ok(json_response(v))
}

// ----- consumers ---------------------------------------------------------------------------------

/// The channel of each (connection, owner) that has one, to name a consumer's channel.
type ChannelIndex = HashMap<ConnectionId, (ConnectionSnapshot, Vec<ChannelInfo>)>;

fn channel_index(shared: &Shared) -> ChannelIndex {
    shared
        .broker
        .connections()
        .entries_by_id()
        .into_iter()
        .map(|e| (e.id(), (e.snapshot(), e.channel_list())))
        .collect()
}

fn consumer_json(vhost: &str, queue: &str, c: &ConsumerInfo, index: &ChannelIndex) -> Value {
    let channel_details = match index.get(&c.connection) {
        Some((conn, channels)) => {
            let number = channels.iter().find(|ch| ch.owner == c.owner).map_or(0, |ch| ch.number);
            json!({
                "name": channel_name(conn, number),
                "number": number,
                "connection_name": connection_name(conn),
                "peer_host": conn.peer.ip().to_string(),
                "peer_port": conn.peer.port(),
                "node": node(),
                "user": conn.user.clone().unwrap_or_default(),
            })
        }
        None => json!({}),
    };
    json!({
        "consumer_tag": c.tag.to_string_lossy(),
        "queue": {"name": queue, "vhost": vhost},
        "channel_details": channel_details,
        "ack_required": !c.no_ack,
        "prefetch_count": c.prefetch,
        "exclusive": c.exclusive,
        "active": c.active,
        "activity_status": if c.active { "up" } else { "waiting" },
        "arguments": if c.priority != 0 { json!({"x-priority": c.priority}) } else { json!({}) },
        "consumer_unacknowledged_messages": c.unacked,
    })
}

/// Every consumer of `vhosts`' queues, a `management` caller seeing only those of its own
/// connections' (as RabbitMQ filters them by the channel's user).
fn consumer_list(shared: &Shared, caller: &Caller, vhosts: &[Arc<VHost>], q: &ListQuery) -> Result<Value, ApiError> {
    let index = channel_index(shared);
    let mut items = Vec::new();
    for v in vhosts {
        let (mut live, _) = v.queues_and_retired();
        live.sort_by(|a, b| a.name().cmp(b.name()));
        for queue in live {
            let qname = queue.name().to_string_lossy();
            for c in queue.consumers() {
                if !caller.sees_all()
                    && index.get(&c.connection).and_then(|(s, _)| s.user.as_deref()) != Some(caller.user.as_str())
                {
                    continue;
                }
                items.push((c.tag.to_string_lossy(), consumer_json(v.name(), &qname, &c, &index)));
            }
        }
    }
    finish_named(q, items)
}

async fn consumers_all(State(state): State<AppState>, caller: Caller, Query(params): Params) -> ApiResult {
    vhost_list(&state, caller, None, &params, consumer_list).await
}

async fn consumers_of_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(params): Params,
) -> ApiResult {
    vhost_list(&state, caller, Some(vhost), &params, consumer_list).await
}

// ----- users -------------------------------------------------------------------------------------

/// A stored hash as RabbitMQ's definitions carry it: `password_hash` and `hashing_algorithm`.
/// RabbitMQ's own schemes come out in its form (base64 of salt and digest, and its module
/// name), so they can be imported into RabbitMQ; argon2id and Mosquitto's PBKDF2 keep their
/// own strings under Ferry's names for them.
pub(crate) fn hash_fields(h: &PasswordHash) -> (String, &'static str) {
    match h {
        PasswordHash::Argon2id(phc) => (phc.clone(), "ferry_password_hashing_argon2id"),
        PasswordHash::Pbkdf2Sha512 { iterations, salt, hash } => (
            format!("$7${iterations}${}${}", BASE64.encode(salt), BASE64.encode(hash)),
            "ferry_password_hashing_mosquitto_pbkdf2_sha512",
        ),
        PasswordHash::RabbitSha256 { salt, hash } => {
            (BASE64.encode([salt.as_slice(), hash].concat()), "rabbit_password_hashing_sha256")
        }
        PasswordHash::RabbitSha512 { salt, hash } => {
            (BASE64.encode([salt.as_slice(), hash].concat()), "rabbit_password_hashing_sha512")
        }
    }
}

fn require_sees_all(caller: &Caller) -> Result<(), ApiError> {
    if caller.sees_all() {
        Ok(())
    } else {
        Err(ApiError::not_allowed("Not administrator user"))
    }
}

fn user_json(caller: &Caller, name: &str, account: &ferry_core::auth::Account) -> Value {
    let mut v = json!({ "name": name, "tags": account.tags.to_vec(), "limits": {} });
    if caller.role == crate::login::Role::Administrator {
        let (hash, algorithm) = hash_fields(&account.hash);
        v["password_hash"] = json!(hash);
        v["hashing_algorithm"] = json!(algorithm);
    }
    v
}

async fn users(State(state): State<AppState>, caller: Caller, Query(params): Params) -> ApiResult {
    require_sees_all(&caller)?;
    let q = ListQuery::parse(&params)?;
    let all: Vec<(String, Value)> = state
        .shared
        .broker
        .auth()
        .accounts()
        .iter()
        .map(|(name, a)| (name.clone(), user_json(&caller, name, a)))
        .collect();
    Ok(json_response(finish_named(&q, all)?))
}

async fn user_one(State(state): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult {
    require_sees_all(&caller)?;
    let account = state.shared.broker.auth().account(&name).ok_or_else(ApiError::not_found)?;
    Ok(json_response(user_json(&caller, &name, &account)))
}

// ----- permissions -------------------------------------------------------------------------------

/// Every (user, vhost) permission, filtered; as the module says when none are configured.
fn permission_list(shared: &Shared, keep: impl Fn(&str, &str) -> bool) -> Vec<Value> {
    let access = shared.broker.access();
    let entry = |user: &str, vhost: &str, c: &str, w: &str, r: &str| json!({"user": user, "vhost": vhost, "configure": c, "write": w, "read": r});
    if access.permissions.is_empty() {
        let mut vhosts = shared.broker.vhost_names();
        vhosts.sort();
        let mut out = Vec::new();
        for (user, _) in shared.broker.auth().accounts() {
            for v in vhosts.iter().filter(|v| keep(&user, v)) {
                out.push(entry(&user, v, ".*", ".*", ".*"));
            }
        }
        return out;
    }
    let mut out: Vec<Value> = access
        .permissions
        .iter()
        .filter(|p| keep(&p.user, &p.vhost))
        .map(|p| entry(&p.user, &p.vhost, p.configure.as_str(), p.write.as_str(), p.read.as_str()))
        .collect();
    out.sort_by(|a, b| (a["user"].as_str(), a["vhost"].as_str()).cmp(&(b["user"].as_str(), b["vhost"].as_str())));
    out
}

fn finish_all(q: &ListQuery, items: Vec<Value>) -> Result<Value, ApiError> {
    let total = items.len();
    q.finish(items, total)
}

async fn permissions_all(State(state): State<AppState>, caller: Caller, Query(params): Params) -> ApiResult {
    require_sees_all(&caller)?;
    let q = ListQuery::parse(&params)?;
    Ok(json_response(finish_all(&q, permission_list(&state.shared, |_, _| true))?))
}

async fn permissions_of_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    Query(params): Params,
) -> ApiResult {
    require_sees_all(&caller)?;
    let q = ListQuery::parse(&params)?;
    state.shared.broker.auth().account(&user).ok_or_else(ApiError::not_found)?;
    Ok(json_response(finish_all(&q, permission_list(&state.shared, |u, _| u == user))?))
}

async fn permissions_of_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(params): Params,
) -> ApiResult {
    require_sees_all(&caller)?;
    let q = ListQuery::parse(&params)?;
    state.shared.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    Ok(json_response(finish_all(&q, permission_list(&state.shared, |_, v| v == vhost))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rabbitmq_hashes_come_out_in_rabbitmq_form() {
        // RabbitMQ's documented example (password test12), as the core's auth tests use it.
        let b64 = "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR";
        let h = PasswordHash::parse(&format!("rabbitmq-sha256:{b64}")).unwrap();
        assert_eq!(hash_fields(&h), (b64.to_string(), "rabbit_password_hashing_sha256"));
        let phc = PasswordHash::argon2id(b"x");
        let (s, alg) = hash_fields(&PasswordHash::parse(&phc).unwrap());
        assert_eq!((s.as_str(), alg), (phc.as_str(), "ferry_password_hashing_argon2id"));
    }

    #[test]
    fn a_mosquitto_hash_round_trips() {
        let s = "$7$101$AQIDBAUGBwgJCgsM$STSCmE+fzbvU6dsOSP/YYMWBLb6TpCPpOg2l6B/cibzXpYwr89dDHWD70LZ6MP80Yb+qgVcLdO6pKMCAw7FYKw==";
        let h = PasswordHash::parse(s).unwrap();
        assert_eq!(hash_fields(&h).0, s);
    }
}

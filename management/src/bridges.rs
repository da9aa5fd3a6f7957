//! The bridges' and shovels' status: `GET /api/bridges` (+ `/{name}`), Ferry's MQTT bridges
//! with their counters; `PUT|DELETE /api/bridges/{name}` (administrator), bridges made, changed
//! and removed while the server runs (`ferry_bridge::runtime`: the `[[bridges]]` keys as JSON,
//! checked as the file's, kept in the store); and `GET /api/shovels` (+ `/{vhost}`), the AMQP shovels in the shape of
//! RabbitMQ's shovel management plugin (`name`, `vhost`, `type`, `state`, `src_uri`, `dest_uri`
//! without passwords, `timestamp`), with Ferry's counters beside: the file's (`"type":
//! "static"`) and the dynamic ones made through `/api/parameters/shovel` (`"dynamic"`,
//! `parameters`).
//!
//! Who sees what: users who see everything (`administrator`, `monitoring`) see every bridge and
//! shovel; a `management` user those of the vhosts it may open.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ferry_bridge::runtime::ChangeError;
use ferry_bridge::shovel::{Destination, Source};
use ferry_bridge::{BridgeEntry, BridgeStatus, Direction, LinkState, ShovelConfig, ShovelDirection};
use serde_json::{json, Value};

use crate::api::AppState;
use crate::error::ApiError;
use crate::login::Caller;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/bridges", get(bridges))
        .route("/api/bridges/{name}", get(bridge_one).put(put_bridge).delete(delete_bridge))
        .route("/api/shovels", get(shovels_all))
        .route("/api/shovels/{vhost}", get(shovels_of_vhost))
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a time in ms since the epoch: RabbitMQ's shovel timestamp.
fn timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

fn may_see(state: &AppState, caller: &Caller, vhost: &str) -> bool {
    caller.sees_all() || state.shared.broker.access().grant(&caller.user, false, vhost).is_ok()
}

/// The counters bridges and shovels share.
fn counters(s: &BridgeStatus) -> Value {
    json!({
        "queued_messages": s.queued,
        "queued_bytes": s.queued_bytes,
        "in_flight": s.in_flight,
        "forwarded": {"out": s.forwarded_out, "in": s.forwarded_in},
        "dropped": {
            "overflow": s.dropped_overflow,
            "rejected_overflow": s.rejected_overflow,
            "max_hops": s.dropped_max_hops,
            "loop": s.dropped_loop,
            "no_rule": s.dropped_no_rule,
            "refused": s.dropped_refused,
            "refused_by_reason": s
                .dropped_refused_by_reason
                .iter()
                .map(|(code, n)| (format!("0x{code:02x}"), json!(n)))
                .collect::<serde_json::Map<String, Value>>(),
            "too_large": s.dropped_too_large,
        },
        "held_overflow": s.held_overflow,
        "nacked": s.nacked,
        "connects": s.connects,
        "connect_attempts": s.attempts,
    })
}

fn bridge_json(entry: &BridgeEntry, definition: Option<Value>) -> Value {
    let (c, s) = (&entry.config, &entry.status);
    let topics: Vec<Value> = c
        .topics
        .iter()
        .map(|t| {
            let direction = match t.direction {
                Direction::Out => "out",
                Direction::In => "in",
                Direction::Both => "both",
            };
            json!({"pattern": t.pattern, "direction": direction, "qos": t.qos as u8,
                   "local_prefix": t.local_prefix, "remote_prefix": t.remote_prefix})
        })
        .collect();
    json!({
        "name": c.name,
        "vhost": c.vhost,
        "exchange": c.exchange,
        "remote": s.remote,
        "addresses": std::iter::once(&c.address).chain(&c.alternates).collect::<Vec<_>>(),
        "round_robin": c.round_robin,
        "protocol": match c.version {
            ferry_mqtt::codec::ProtocolVersion::V31 => "MQTT 3.1",
            ferry_mqtt::codec::ProtocolVersion::V311 => "MQTT 3.1.1",
            ferry_mqtt::codec::ProtocolVersion::V5 => "MQTT 5.0",
        },
        "tls": c.tls.is_some(),
        "client_id": c.client_id,
        "username": c.username,
        "topics": topics,
        "state": s.state.as_str(),
        "since": timestamp(s.since),
        "last_error": s.last_error,
        "ferry": counters(s),
        "source": if entry.runtime { "api" } else { "config" },
        "definition": definition,
    })
}

/// What a bridge made through the API was given (administrators only: it may name files).
fn definition(state: &AppState, caller: &Caller, entry: &BridgeEntry) -> Option<Value> {
    (entry.runtime && caller.require_admin().is_ok())
        .then(|| state.shared.bridges.runtime_table(&entry.config.name))
        .flatten()
}

async fn bridges(State(state): State<AppState>, caller: Caller) -> Response {
    let list: Vec<Value> = state
        .shared
        .bridges
        .bridges()
        .iter()
        .filter(|b| may_see(&state, &caller, &b.config.vhost))
        .map(|b| bridge_json(b, definition(&state, &caller, b)))
        .collect();
    Json(Value::Array(list)).into_response()
}

async fn bridge_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let all = state.shared.bridges.bridges();
    let b = all.iter().find(|b| b.config.name == name).ok_or_else(ApiError::not_found)?;
    if !may_see(&state, &caller, &b.config.vhost) {
        return Err(ApiError::not_found());
    }
    Ok(Json(bridge_json(b, definition(&state, &caller, b))).into_response())
}

pub(crate) fn change_error(e: ChangeError) -> ApiError {
    match e {
        ChangeError::NotFound(_) => ApiError::not_found(),
        ChangeError::Store(_) | ChangeError::ShuttingDown => ApiError::unavailable(e.to_string()),
        ChangeError::Configured(name) => ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            error: "method_not_allowed",
            reason: format!(
                "bridge or shovel {name:?} is configured in the server's file ([[bridges]] / [[shovels]]); \
                 change it there"
            ),
        },
        ChangeError::Taken(_) => ApiError { status: StatusCode::CONFLICT, error: "conflict", reason: e.to_string() },
        other => ApiError::bad_request(other.to_string()),
    }
}

/// `201` when made, `204` when it replaced one.
async fn put_bridge(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let body = crate::users::body_of(body)?;
    let table: Value = serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
    let replaced = state.shared.bridges.put_bridge(&name, table).await.map_err(change_error)?;
    tracing::info!(user = %caller.user, "management: bridge {name:?} {}", if replaced { "changed" } else { "added" });
    Ok(if replaced { StatusCode::NO_CONTENT } else { StatusCode::CREATED }.into_response())
}

async fn delete_bridge(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    state.shared.bridges.delete_bridge(&name).await.map_err(change_error)?;
    tracing::info!(user = %caller.user, "management: bridge {name:?} removed");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// RabbitMQ's shovel states: `running` while the link is up, `starting` while it connects,
/// `terminated` (with a `reason`) when it failed and waits to retry, or stopped.
fn shovel_state(s: &BridgeStatus) -> &'static str {
    match s.state {
        LinkState::Up | LinkState::Idle => "running",
        LinkState::Connecting => "starting",
        LinkState::BackingOff | LinkState::Stopped => "terminated",
    }
}

/// A vhost as a URI path segment (`/` is `%2f`, as in RabbitMQ's URIs).
fn encode_vhost(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02x}"),
        })
        .collect()
}

fn shovel_json(c: &ShovelConfig, s: &BridgeStatus) -> Value {
    // RabbitMQ names a shovel's local end `amqp://` (its direct connection), with the vhost
    // in the path when a dynamic shovel's local end is not in its parameter's vhost.
    let local = match c.dynamic.as_deref() {
        Some(listed) if listed != c.vhost => format!("amqp:///{}", encode_vhost(&c.vhost)),
        _ => "amqp://".to_string(),
    };
    let remote = c.remote.to_string();
    let (src_uri, dest_uri) = match c.direction {
        ShovelDirection::Out => (local, remote),
        ShovelDirection::In => (remote, local),
    };
    let mut o = json!({
        "node": crate::api::node(),
        "timestamp": timestamp(s.since),
        "name": c.name,
        // A dynamic shovel is listed under its parameter's vhost (its local end may be another).
        "vhost": c.dynamic.as_deref().unwrap_or(&c.vhost),
        "type": if c.dynamic.is_some() { "dynamic" } else { "static" },
        "state": shovel_state(s),
        "src_uri": src_uri,
        "src_protocol": "amqp091",
        "dest_uri": dest_uri,
        "dest_protocol": "amqp091",
        "ack_mode": c.ack_mode.as_str(),
        "prefetch_count": c.prefetch,
        "ferry": counters(s),
    });
    match &c.source {
        Source::Queue(q) => o["src_queue"] = json!(q),
        Source::Exchange { exchange, key } => {
            o["src_exchange"] = json!(exchange);
            o["src_exchange_key"] = json!(key);
        }
    }
    match &c.destination {
        Destination::Queue(q) => o["dest_queue"] = json!(q),
        Destination::Exchange { exchange, key } => {
            o["dest_exchange"] = json!(exchange);
            if let Some(k) = key {
                o["dest_exchange_key"] = json!(k);
            }
        }
        Destination::AsPublished => {}
    }
    if s.state != LinkState::Up {
        if let Some(e) = &s.last_error {
            o["reason"] = json!(e);
        }
    }
    o
}

/// The file's shovels, then the dynamic ones.
fn shovel_list(state: &AppState, caller: &Caller, vhost: Option<&str>) -> Vec<Value> {
    let dynamic = state.shared.bridges.dynamic_shovels();
    let file = state.shared.bridges.shovels();
    let dynamic = dynamic.iter().map(|d| (&d.config, &d.status));
    file.iter()
        .map(|(c, s)| (*c, s))
        .chain(dynamic)
        .filter(|(c, _)| {
            let listed = c.dynamic.as_deref().unwrap_or(&c.vhost);
            vhost.is_none_or(|v| listed == v) && may_see(state, caller, listed)
        })
        .map(|(c, s)| shovel_json(c, s))
        .collect()
}

async fn shovels_all(State(state): State<AppState>, caller: Caller) -> Response {
    Json(Value::Array(shovel_list(&state, &caller, None))).into_response()
}

async fn shovels_of_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Response, ApiError> {
    state.shared.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    Ok(Json(Value::Array(shovel_list(&state, &caller, Some(&vhost)))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vhost_is_percent_encoded_in_a_local_uri() {
        assert_eq!(encode_vhost("/"), "%2f");
        assert_eq!(encode_vhost("site-7/a b"), "site-7%2fa%20b");
    }

    #[test]
    fn timestamps_are_rabbitmq_s_utc_date_and_time() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00");
        // date -u -d @1709251199 → 2024-02-29 23:59:59 (a leap day)
        assert_eq!(timestamp(1_709_251_199_999), "2024-02-29 23:59:59");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29 00:00:00");
    }
}

//! Beyond RabbitMQ: MQTT sessions and retained messages, listed and deleted.
//!
//! - `GET /api/mqtt/sessions[/{vhost}]`: every session the MQTT frontend holds, connected or
//!   kept while its client is away, with its subscriptions and the messages waiting in its
//!   queue (a clean session has none: its messages go straight to its connection).
//! - `DELETE /api/mqtt/sessions/{vhost}/{client_id}`: a connected client is disconnected
//!   first (MQTT 5.0 DISCONNECT 0x98 with the `X-Reason` text), then the session's state, queue
//!   and subscriptions go.
//! - `GET /api/mqtt/retained[/{vhost}]`: the retained messages (topic, QoS, size), filtered
//!   by topic with `name`, paged like the other lists.
//! - `DELETE /api/mqtt/retained/{vhost}/{topic}`: clears one, as an empty retained PUBLISH
//!   would (the topic percent-encoded in the path).
//!
//! Seeing them follows the vhost rules of the other lists; deleting is for administrators.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{delete, get};
use axum::Router;
use bytes::Bytes;
use ferry_core::topic::{Level, Pattern};
use ferry_core::vhost::VHost;
use ferry_core::{Message, ShortString};
use ferry_mqtt::acl::SESSION_QUEUE_PREFIX;
use ferry_mqtt::registry::SessionInfo;
use ferry_mqtt::topic::swap_separators;
use serde_json::{json, Value};

use crate::api::{vhost_list, visible_vhost, x_reason, ApiResult, AppState, Params};
use crate::error::ApiError;
use crate::login::Caller;
use crate::query::ListQuery;
use crate::Shared;

/// The default `X-Reason` of a session deleted with its client connected.
const DEFAULT_REASON: &str = "Session deleted via management API";

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/mqtt/sessions", get(sessions_all))
        .route("/api/mqtt/sessions/{vhost}", get(sessions_of_vhost))
        .route("/api/mqtt/sessions/{vhost}/{client_id}", delete(delete_session))
        .route("/api/mqtt/retained", get(retained_all))
        .route("/api/mqtt/retained/{vhost}", get(retained_of_vhost))
        .route("/api/mqtt/retained/{vhost}/{topic}", delete(delete_retained))
}

// ----- sessions ----------------------------------------------------------------------------------

fn mqtt(shared: &Shared) -> Result<&Arc<ferry_mqtt::Shared>, ApiError> {
    shared.mqtt.get().ok_or_else(|| ApiError::unavailable("no MQTT frontend in this server"))
}

fn session_json(v: Option<&Arc<VHost>>, s: &SessionInfo) -> Value {
    let messages = v.and_then(|v| v.queue(&format!("{SESSION_QUEUE_PREFIX}{}", s.client_id))).map_or(0, |q| {
        let st = q.stats();
        st.ready as u64 + st.unacked as u64
    });
    let subscriptions: Vec<Value> = s
        .subscriptions
        .iter()
        .map(|sub| {
            json!({
                "filter": sub.filter,
                "qos": sub.options.qos as u8,
                "no_local": sub.options.no_local,
                "retain_as_published": sub.options.retain_as_published,
            })
        })
        .collect();
    json!({
        "client_id": s.client_id,
        "vhost": s.vhost,
        "user": s.user,
        "connected": s.connection.is_some(),
        "clean_start": s.clean_start,
        "expiry_interval": s.expiry,
        "disconnected_at": if s.disconnected_at == 0 { Value::Null } else { json!(s.disconnected_at) },
        "subscriptions": subscriptions,
        "messages": messages,
    })
}

/// The sessions of the vhosts `caller` sees (a `management` user: only its own connected
/// ones and those kept on its vhosts).
fn session_list(shared: &Shared, caller: &Caller, vhosts: &[Arc<VHost>], q: &ListQuery) -> Result<Value, ApiError> {
    let all = mqtt(shared)?.sessions();
    let mut items = Vec::new();
    let mut total = 0;
    for s in &all {
        let Some(v) = vhosts.iter().find(|v| v.name() == s.vhost) else { continue };
        if !caller.sees_all() && s.user.as_deref().is_some_and(|u| u != caller.user) {
            continue;
        }
        total += 1;
        if q.matches(&s.client_id) {
            items.push(session_json(Some(v), s));
        }
    }
    q.finish(items, total)
}

async fn sessions_all(State(state): State<AppState>, caller: Caller, Query(params): Params) -> ApiResult {
    vhost_list(&state, caller, None, &params, session_list).await
}

async fn sessions_of_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(params): Params,
) -> ApiResult {
    vhost_list(&state, caller, Some(vhost), &params, session_list).await
}

async fn delete_session(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, client_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    caller.require_admin()?;
    visible_vhost(&state.shared, &caller, &vhost)?;
    let mqtt = mqtt(&state.shared)?.clone();
    let reason = x_reason(&headers, DEFAULT_REASON);
    tracing::info!(user = %caller.user, %vhost, client_id, "management: deleting MQTT session: {reason}");
    match mqtt.delete_session(&state.shared.broker, &vhost, &client_id, &reason).await {
        ferry_mqtt::SessionDeleted::Deleted => Ok(StatusCode::NO_CONTENT.into_response()),
        ferry_mqtt::SessionDeleted::NotFound => Err(ApiError::not_found()),
        ferry_mqtt::SessionDeleted::Busy => {
            Err(ApiError::unavailable("the session's connection did not end in time; try again"))
        }
    }
}

// ----- retained messages -------------------------------------------------------------------------

/// The MQTT QoS a retained message was published with (the MQTT frontend's reading of it).
fn retained_json(vhost: &str, key: &str, m: &Message) -> Value {
    json!({
        "topic": swap_separators(key),
        "vhost": vhost,
        "qos": ferry_mqtt::mapping::message_qos(m) as u8,
        "payload_bytes": m.payload.len(),
    })
}

fn retained_list(_: &Shared, _: &Caller, vhosts: &[Arc<VHost>], q: &ListQuery) -> Result<Value, ApiError> {
    // `#` without MQTT's `$` rule: every key, `$SYS` ones too.
    let everything = Pattern { levels: vec![Level::Many], dollar_rule: false };
    let mut items = Vec::new();
    let mut total = 0;
    for v in vhosts {
        for (key, m) in v.retained().lookup(&everything) {
            total += 1;
            let topic = swap_separators(&key);
            if q.matches(&topic) {
                items.push(retained_json(v.name(), &key, &m));
            }
        }
    }
    q.finish(items, total)
}

async fn retained_all(State(state): State<AppState>, caller: Caller, Query(params): Params) -> ApiResult {
    vhost_list(&state, caller, None, &params, retained_list).await
}

async fn retained_of_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(params): Params,
) -> ApiResult {
    vhost_list(&state, caller, Some(vhost), &params, retained_list).await
}

async fn delete_retained(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, topic)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let key = swap_separators(&topic);
    if key.len() > ShortString::MAX_LEN || v.retained().get(&key).is_none() {
        return Err(ApiError::not_found());
    }
    let key = ShortString::from(key.as_str());
    // An empty payload clears it, as an empty retained PUBLISH does.
    let commit = v.set_retained(&key, Arc::new(Message::new("", key.clone(), Bytes::new())));
    commit.wait().await.map_err(|e| ApiError::internal(format!("store: {e}")))?;
    tracing::info!(user = %caller.user, %vhost, topic, "management: retained message deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

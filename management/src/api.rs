//! The routes and the JSON endpoints, in the shapes of RabbitMQ's management API
//! (`rabbitmq_management` 3.10's `api/index.html`; field names checked against it and against
//! what `rabbitmqadmin` reads).
//!
//! Who sees what ([`Caller`]): `administrator` and `monitoring` see every vhost and connection;
//! `management` sees the vhosts its `[[permissions]]` let it into (all of them when no
//! permissions are configured) and its own connections; only `administrator` may close
//! connections and delete or purge queues.
//!
//! Lists that walk every queue run on the blocking pool, at most
//! [`MAX_CONCURRENT_RENDERS`](crate::MAX_CONCURRENT_RENDERS) at once.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use ferry_core::connections::ConnectionSnapshot;
use ferry_core::exchange::Destination;
use ferry_core::message::now_millis;
use ferry_core::policy::QueueUse;
use ferry_core::queue::{Queue, QueueStats};
use ferry_core::vhost::VHost;
use ferry_core::{ConnectionId, FieldTable, FieldValue, Protocol, ShortString};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::login::Caller;
use crate::metrics::{Snapshot, CONTENT_TYPE};
use crate::query::ListQuery;
use crate::rates::PerSecond;
use crate::{HttpSettings, Shared, MAX_BODY_BYTES, RABBITMQ_API_VERSION};

/// What every handler gets.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub shared: Arc<Shared>,
    pub settings: Arc<HttpSettings>,
}

pub(crate) type Params = Query<HashMap<String, String>>;
pub(crate) type ApiResult = Result<Response, ApiError>;

pub(crate) fn router(shared: Arc<Shared>, settings: &HttpSettings) -> Router {
    let state = AppState { shared, settings: Arc::new(settings.clone()) };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/overview", get(overview))
        .route("/api/whoami", get(whoami))
        .route("/api/vhosts", get(vhosts))
        .route("/api/vhosts/{vhost}", get(vhost_one))
        .route("/api/connections", get(connections))
        .route("/api/connections/{name}", get(connection_one).delete(close_connection))
        .route("/api/queues", get(queues_all))
        .route("/api/queues/{vhost}", get(queues_of_vhost))
        .route("/api/queues/{vhost}/{name}", get(queue_one).put(declare_queue).delete(delete_queue))
        .route("/api/queues/{vhost}/{name}/contents", delete(purge_queue))
        .route("/api/exchanges", get(exchanges_all))
        .route("/api/exchanges/{vhost}", get(exchanges_of_vhost))
        .route("/api/exchanges/{vhost}/{name}", get(exchange_one))
        .route("/api/bindings", get(bindings_all))
        .route("/api/bindings/{vhost}", get(bindings_of_vhost))
        .route("/api/health/checks/alarms", get(alarms))
        .route("/api/health/checks/local-alarms", get(alarms))
        .merge(crate::dashboard::routes())
        .merge(crate::objects::routes())
        .merge(crate::definitions::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(crate::dashboard::no_challenge_for_scripts))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found()
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        error: "method_not_allowed",
        reason: "Method Not Allowed".into(),
    }
}

/// `ferry@<host name>`: RabbitMQ's node name shape.
pub(crate) fn node() -> &'static str {
    static NODE: OnceLock<String> = OnceLock::new();
    NODE.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        format!("ferry@{host}")
    })
}

pub(crate) fn json_response(v: Value) -> Response {
    Json(v).into_response()
}

/// Runs `f` on the blocking pool within the render limit.
pub(crate) async fn render<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Shared) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let _permit = state.shared.renders.acquire().await.map_err(|_| ApiError::unavailable("shutting down"))?;
    let shared = state.shared.clone();
    tokio::task::spawn_blocking(move || f(&shared)).await.map_err(|e| ApiError::internal(format!("render failed: {e}")))
}

/// The vhosts `caller` may see, sorted.
pub(crate) fn visible_vhosts(shared: &Shared, caller: &Caller) -> Vec<Arc<VHost>> {
    let mut names = shared.broker.vhost_names();
    names.sort();
    let access = shared.broker.access();
    names
        .iter()
        .filter(|v| caller.sees_all() || access.grant(&caller.user, false, v).is_ok())
        .filter_map(|v| shared.broker.vhost(v))
        .collect()
}

/// A list over the vhosts `caller` sees (`vhost`: only that one, if it may see it), made by
/// `list` on the blocking pool: what the `/api/x` and `/api/x/{vhost}` lists share.
pub(crate) async fn vhost_list(
    state: &AppState,
    caller: Caller,
    vhost: Option<String>,
    params: &HashMap<String, String>,
    list: impl FnOnce(&Shared, &Caller, &[Arc<VHost>], &ListQuery) -> Result<Value, ApiError> + Send + 'static,
) -> ApiResult {
    let q = ListQuery::parse(params)?;
    let one = vhost.map(|v| visible_vhost(&state.shared, &caller, &v)).transpose()?;
    let body = render(state, move |shared| {
        let vhosts = match one {
            Some(v) => vec![v],
            None => visible_vhosts(shared, &caller),
        };
        list(shared, &caller, &vhosts, &q)
    })
    .await??;
    Ok(json_response(body))
}

/// The vhost named in a path, if `caller` may see it.
pub(crate) fn visible_vhost(shared: &Shared, caller: &Caller, name: &str) -> Result<Arc<VHost>, ApiError> {
    let v = shared.broker.vhost(name).ok_or_else(ApiError::not_found)?;
    if caller.sees_all() || shared.broker.access().grant(&caller.user, false, name).is_ok() {
        Ok(v)
    } else {
        Err(ApiError::not_allowed(format!("access to vhost '{name}' refused for user '{}'", caller.user)))
    }
}

// ----- /metrics ----------------------------------------------------------------------------------

async fn metrics(State(state): State<AppState>, caller: Caller, Query(params): Params) -> ApiResult {
    if !caller.sees_all() {
        return Err(ApiError::not_allowed("Not monitoring user"));
    }
    let rabbitmq = match params.get("prefix").map(String::as_str) {
        None | Some("ferry") => false,
        Some("rabbitmq") => true,
        Some(other) => return Err(ApiError::bad_request(format!("prefix: {other:?}: expected ferry or rabbitmq"))),
    };
    let max = state.settings.metrics_max_queues;
    let text = render(&state, move |shared| {
        let mqtt = shared.mqtt.get().map(|m| &**m);
        let snap = Snapshot::take(&shared.broker, mqtt, &shared.bridges, max, shared.started.elapsed().as_secs_f64());
        if rabbitmq {
            snap.render_rabbitmq()
        } else {
            snap.render_ferry()
        }
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}

// ----- field tables ------------------------------------------------------------------------------

pub(crate) fn field_json(v: &FieldValue) -> Value {
    match v {
        FieldValue::Bool(b) => json!(b),
        FieldValue::F32(f) => json!(f),
        FieldValue::F64(f) => json!(f),
        FieldValue::Decimal(d) => json!(d.value as f64 / 10f64.powi(d.scale as i32)),
        FieldValue::LongString(b) | FieldValue::Bytes(b) => json!(String::from_utf8_lossy(b)),
        FieldValue::Array(a) => Value::Array(a.iter().map(field_json).collect()),
        FieldValue::Timestamp(t) => json!(t),
        FieldValue::Table(t) => table_json(t),
        FieldValue::Void => Value::Null,
        FieldValue::U64(u) => json!(u),
        other => other.as_i64().map_or(Value::Null, |i| json!(i)),
    }
}

pub(crate) fn table_json(t: &FieldTable) -> Value {
    Value::Object(t.iter().map(|(k, v)| (k.to_string_lossy(), field_json(v))).collect::<Map<_, _>>())
}

pub(crate) fn rate(r: f64) -> Value {
    json!({ "rate": r })
}

// ----- overview, whoami, vhosts -----------------------------------------------------------------

async fn whoami(caller: Caller) -> Json<Value> {
    Json(json!({ "name": caller.user, "tags": caller.tags.to_vec() }))
}

/// Sums over the queues of some vhosts: depths of the live ones, counters of live and deleted;
/// with the number of queues and exchanges.
fn queue_totals(vhosts: &[Arc<VHost>]) -> (QueueStats, u64, u64) {
    let mut total = QueueStats::default();
    let (mut queues, mut exchanges) = (0u64, 0u64);
    for v in vhosts {
        let (st, q, x) = queue_totals_of(v);
        total.ready = total.ready.saturating_add(st.ready);
        total.unacked = total.unacked.saturating_add(st.unacked);
        total.consumers = total.consumers.saturating_add(st.consumers);
        total.published += st.published;
        total.delivered += st.delivered;
        total.acked += st.acked;
        queues += q;
        exchanges += x;
    }
    (total, queues, exchanges)
}

async fn overview(State(state): State<AppState>, caller: Caller) -> ApiResult {
    let body = render(&state, move |shared| {
        let vhosts = visible_vhosts(shared, &caller);
        let (totals, queues, exchanges) = queue_totals(&vhosts);
        let published: u64 =
            vhosts.iter().map(|v| v.stats().messages_in.load(std::sync::atomic::Ordering::Relaxed)).sum();
        let conns = visible_connections(shared, &caller);
        let channels: u64 = conns.iter().map(|c| c.channels as u64).sum();
        // Broker-wide figures (every delivery, direct MQTT subscribers included) and rates for
        // those who see everything; a `management` user gets its vhosts' queue counts.
        let (delivered, rates) = if caller.sees_all() {
            let out: u64 = shared.broker.connections().totals().iter().map(|t| t.messages_out).sum();
            (out, shared.rates.overview())
        } else {
            (totals.delivered, PerSecond::default())
        };
        let listeners: Vec<Value> = shared
            .listeners
            .iter()
            .map(|l| json!({"node": node(), "protocol": l.protocol, "ip_address": l.addr.ip().to_string(), "port": l.addr.port()}))
            .collect();
        json!({
            "management_version": RABBITMQ_API_VERSION,
            "rabbitmq_version": RABBITMQ_API_VERSION,
            "product_name": "Ferry",
            "product_version": env!("CARGO_PKG_VERSION"),
            "rates_mode": "basic",
            "cluster_name": node(),
            "node": node(),
            "statistics_db_event_queue": 0,
            "exchange_types": [
                {"name": "direct", "description": "AMQP direct exchange", "enabled": true},
                {"name": "fanout", "description": "AMQP fanout exchange", "enabled": true},
                {"name": "headers", "description": "AMQP headers exchange", "enabled": true},
                {"name": "topic", "description": "AMQP topic exchange", "enabled": true},
            ],
            "message_stats": {
                "publish": published,
                "publish_details": rate(rates.published),
                "deliver_get": delivered,
                "deliver_get_details": rate(rates.delivered),
                "ack": totals.acked,
                "ack_details": rate(rates.acked),
            },
            "queue_totals": {
                "messages": totals.ready as u64 + totals.unacked as u64,
                "messages_details": rate(rates.messages),
                "messages_ready": totals.ready,
                "messages_ready_details": rate(rates.ready),
                "messages_unacknowledged": totals.unacked,
                "messages_unacknowledged_details": rate(rates.unacked),
            },
            "object_totals": {
                "connections": conns.len(),
                "channels": channels,
                "consumers": totals.consumers,
                "exchanges": exchanges,
                "queues": queues,
            },
            "listeners": listeners,
            "contexts": [],
        })
    })
    .await?;
    Ok(json_response(body))
}

fn vhost_json(v: &VHost) -> Value {
    let (totals, _, _) = queue_totals_of(v);
    let published = v.stats().messages_in.load(std::sync::atomic::Ordering::Relaxed);
    json!({
        "name": v.name(),
        "description": "",
        "tags": [],
        "default_queue_type": "classic",
        "tracing": false,
        "messages": totals.ready as u64 + totals.unacked as u64,
        "messages_ready": totals.ready,
        "messages_unacknowledged": totals.unacked,
        "message_stats": {"publish": published, "deliver_get": totals.delivered, "ack": totals.acked},
    })
}

fn queue_totals_of(v: &VHost) -> (QueueStats, u64, u64) {
    let (live, retired) = v.queues_and_retired();
    let mut total = retired;
    for q in &live {
        let st = q.stats();
        total.ready = total.ready.saturating_add(st.ready);
        total.unacked = total.unacked.saturating_add(st.unacked);
        total.consumers = total.consumers.saturating_add(st.consumers);
        total.published += st.published;
        total.delivered += st.delivered;
        total.acked += st.acked;
    }
    (total, live.len() as u64, v.exchange_names().len() as u64)
}

async fn vhosts(State(state): State<AppState>, caller: Caller, Query(params): Params) -> ApiResult {
    let q = ListQuery::parse(&params)?;
    let body = render(&state, move |shared| {
        let all = visible_vhosts(shared, &caller);
        let total = all.len();
        let items = all.iter().filter(|v| q.matches(v.name())).map(|v| vhost_json(v)).collect();
        q.finish(items, total)
    })
    .await??;
    Ok(json_response(body))
}

async fn vhost_one(State(state): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &name)?;
    Ok(json_response(vhost_json(&v)))
}

// ----- connections ---------------------------------------------------------------------------

/// RabbitMQ's connection name: `peer -> local`.
pub(crate) fn connection_name(c: &ConnectionSnapshot) -> String {
    format!("{} -> {}", c.peer, c.local)
}

pub(crate) fn visible_connections(shared: &Shared, caller: &Caller) -> Vec<ConnectionSnapshot> {
    let mut all = shared.broker.connections().list();
    if !caller.sees_all() {
        all.retain(|c| c.user.as_deref() == Some(caller.user.as_str()));
    }
    all
}

fn connection_json(c: &ConnectionSnapshot) -> Value {
    let protocol = match c.protocol {
        Protocol::Amqp => "AMQP 0-9-1".to_string(),
        Protocol::Mqtt => format!("MQTT {}", c.version),
        Protocol::Internal => format!("Ferry {}", c.version),
    };
    let client_properties = match &c.client_id {
        Some(id) if c.protocol == Protocol::Amqp => json!({ "connection_name": id }),
        Some(id) => json!({ "client_id": id }),
        None => json!({}),
    };
    json!({
        "name": connection_name(c),
        "node": node(),
        "type": "network",
        "state": if c.closing.is_some() { "closing" } else { "running" },
        "protocol": protocol,
        "user": c.user.clone().unwrap_or_default(),
        "vhost": c.vhost.clone().unwrap_or_default(),
        "peer_host": c.peer.ip().to_string(),
        "peer_port": c.peer.port(),
        "host": c.local.ip().to_string(),
        "port": c.local.port(),
        "ssl": c.tls.is_some(),
        "peer_cert_subject": c.tls.as_ref().and_then(|t| t.peer_subject.clone()),
        "channels": c.channels,
        "connected_at": c.connected_at,
        "recv_oct": c.bytes_in,
        "send_oct": c.bytes_out,
        "recv_cnt": c.messages_in,
        "send_cnt": c.messages_out,
        "client_properties": client_properties,
        "ferry": {
            "id": c.id.0,
            "client_id": c.client_id,
            "listener": c.listener,
            "messages_in": c.messages_in,
            "messages_out": c.messages_out,
        },
    })
}

async fn connections(State(state): State<AppState>, caller: Caller, Query(params): Params) -> ApiResult {
    let q = ListQuery::parse(&params)?;
    let body = render(&state, move |shared| {
        let all = visible_connections(shared, &caller);
        let total = all.len();
        let items = all.iter().filter(|c| q.matches(&connection_name(c))).map(connection_json).collect();
        q.finish(items, total)
    })
    .await??;
    Ok(json_response(body))
}

fn find_connection(shared: &Shared, caller: &Caller, name: &str) -> Result<ConnectionSnapshot, ApiError> {
    visible_connections(shared, caller).into_iter().find(|c| connection_name(c) == name).ok_or_else(ApiError::not_found)
}

async fn connection_one(State(state): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult {
    Ok(json_response(connection_json(&find_connection(&state.shared, &caller, &name)?)))
}

/// The longest close reason passed on (an AMQP reply text is a short string).
const MAX_REASON: usize = 200;

/// RabbitMQ's `X-Reason` header (or `default`), cut to [`MAX_REASON`] bytes: the reason a
/// client told to go sees.
pub(crate) fn x_reason(headers: &HeaderMap, default: &str) -> String {
    let mut reason =
        headers.get("x-reason").and_then(|v| v.to_str().ok()).filter(|r| !r.is_empty()).unwrap_or(default).to_string();
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// Closes a connection with the reason its client sees (MQTT 5.0 DISCONNECT 0x98, AMQP
/// connection.close 320): RabbitMQ's `X-Reason` header, or its default text.
async fn close_connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    caller.require_admin()?;
    let c = find_connection(&state.shared, &caller, &name)?;
    let reason = x_reason(&headers, "Closed via management plugin");
    tracing::info!(user = %caller.user, connection = %name, "management: closing connection: {reason}");
    if state.shared.broker.connections().close(c.id, reason) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found())
    }
}

// ----- queues --------------------------------------------------------------------------------

#[derive(serde::Serialize)]
struct Rate {
    rate: f64,
}

#[derive(serde::Serialize)]
struct QueueMessageStats {
    publish: u64,
    publish_details: Rate,
    deliver_get: u64,
    deliver_get_details: Rate,
    ack: u64,
    ack_details: Rate,
}

/// A queue as the API shows it ([`queue_json`]'s fields), serialized without building a JSON
/// value first: what keeps a list of 10,000 queues fast.
#[derive(serde::Serialize)]
struct QueueItem<'a> {
    name: String,
    vhost: &'a str,
    durable: bool,
    auto_delete: bool,
    exclusive: bool,
    exclusive_consumer_tag: Option<()>,
    arguments: Value,
    node: &'static str,
    state: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    policy: Option<()>,
    messages: u64,
    messages_details: Rate,
    messages_ready: u32,
    messages_ready_details: Rate,
    messages_unacknowledged: u32,
    messages_unacknowledged_details: Rate,
    message_bytes: u64,
    message_bytes_ready: u64,
    message_bytes_unacknowledged: u64,
    /// Of the ready messages, those only on disk (the queue's tail), as RabbitMQ names them.
    messages_paged_out: u32,
    message_bytes_paged_out: u64,
    /// What the queue's messages cost in memory as the memory alarm counts it.
    memory: u64,
    consumers: u32,
    message_stats: QueueMessageStats,
}

fn queue_item<'a>(vhost: &'a str, q: &Queue, st: &QueueStats, r: &PerSecond) -> QueueItem<'a> {
    let o = q.options();
    QueueItem {
        name: q.name().to_string_lossy(),
        vhost,
        durable: o.durable,
        auto_delete: o.auto_delete,
        exclusive: o.exclusive.is_some(),
        exclusive_consumer_tag: None,
        arguments: if o.arguments.is_empty() { Value::Object(Map::new()) } else { table_json(&o.arguments) },
        node: node(),
        state: "running",
        kind: "classic",
        policy: None,
        messages: st.ready as u64 + st.unacked as u64,
        messages_details: Rate { rate: r.messages },
        messages_ready: st.ready,
        messages_ready_details: Rate { rate: r.ready },
        messages_unacknowledged: st.unacked,
        messages_unacknowledged_details: Rate { rate: r.unacked },
        message_bytes: st.ready_bytes + st.unacked_bytes,
        message_bytes_ready: st.ready_bytes,
        message_bytes_unacknowledged: st.unacked_bytes,
        messages_paged_out: st.paged_out,
        message_bytes_paged_out: st.paged_out_bytes,
        memory: st.memory(),
        consumers: st.consumers,
        message_stats: QueueMessageStats {
            publish: st.published,
            publish_details: Rate { rate: r.published },
            deliver_get: st.delivered,
            deliver_get_details: Rate { rate: r.delivered },
            ack: st.acked,
            ack_details: Rate { rate: r.acked },
        },
    }
}

#[cfg(test)]
fn queue_json(vhost: &str, q: &Queue, st: &QueueStats, r: &PerSecond) -> Value {
    let o = q.options();
    json!({
        "name": q.name().to_string_lossy(),
        "vhost": vhost,
        "durable": o.durable,
        "auto_delete": o.auto_delete,
        "exclusive": o.exclusive.is_some(),
        "exclusive_consumer_tag": Value::Null,
        "arguments": table_json(&o.arguments),
        "node": node(),
        "state": "running",
        "type": "classic",
        "policy": Value::Null,
        "messages": st.ready as u64 + st.unacked as u64,
        "messages_details": rate(r.messages),
        "messages_ready": st.ready,
        "messages_ready_details": rate(r.ready),
        "messages_unacknowledged": st.unacked,
        "messages_unacknowledged_details": rate(r.unacked),
        "message_bytes": st.ready_bytes + st.unacked_bytes,
        "message_bytes_ready": st.ready_bytes,
        "message_bytes_unacknowledged": st.unacked_bytes,
        "messages_paged_out": st.paged_out,
        "message_bytes_paged_out": st.paged_out_bytes,
        "memory": st.memory(),
        "consumers": st.consumers,
        "message_stats": {
            "publish": st.published,
            "publish_details": rate(r.published),
            "deliver_get": st.delivered,
            "deliver_get_details": rate(r.delivered),
            "ack": st.acked,
            "ack_details": rate(r.acked),
        },
    })
}

/// Every queue of `vhosts` that passes the name filter, by vhost and name, as JSON bytes. Without
/// `sort`, only the page sent is built; items are serialized straight from structs, and
/// `columns` and `sort` read only the fields they name (no JSON value per queue).
fn queue_list(shared: &Shared, vhosts: &[Arc<VHost>], q: &ListQuery) -> Result<Vec<u8>, ApiError> {
    let mut rows: Vec<(&str, Arc<Queue>)> = Vec::new();
    let mut total = 0;
    for v in vhosts {
        let (mut live, _) = v.queues_and_retired();
        total += live.len();
        live.sort_by(|a, b| a.name().cmp(b.name()));
        rows.extend(live.into_iter().filter(|x| q.matches(&x.name().to_string_lossy())).map(|x| (v.name(), x)));
    }
    let items = |range: std::ops::Range<usize>| {
        let rows = &rows[range];
        let rates = shared.rates.queues(rows.iter().map(|(v, x)| (*v, x.name())));
        rows.iter().zip(&rates).map(|((v, x), r)| queue_item(v, x, &x.stats(), r)).collect::<Vec<_>>()
    };
    if !q.needs_values() {
        return q.finish_typed(rows.len(), total, items);
    }
    q.finish_projected(rows.len(), total, items)
}

pub(crate) fn json_bytes(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn queues_all(State(state): State<AppState>, caller: Caller, Query(params): Params) -> ApiResult {
    let q = ListQuery::parse(&params)?;
    let body = render(&state, move |shared| {
        let vhosts = visible_vhosts(shared, &caller);
        queue_list(shared, &vhosts, &q)
    })
    .await??;
    Ok(json_bytes(body))
}

async fn queues_of_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(params): Params,
) -> ApiResult {
    let q = ListQuery::parse(&params)?;
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let body = render(&state, move |shared| queue_list(shared, &[v], &q)).await??;
    Ok(json_bytes(body))
}

async fn queue_one(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(params): Params,
) -> ApiResult {
    let q = ListQuery::parse(&params)?;
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let queue = v.queue(&name).ok_or_else(ApiError::not_found)?;
    let r = state.shared.rates.queue(&vhost, queue.name());
    let item = serde_json::to_value(queue_item(&vhost, &queue, &queue.stats(), &r))
        .map_err(|e| ApiError::internal(format!("JSON: {e}")))?;
    Ok(json_response(q.pick(item)))
}

/// Management is not a connection: it owns no exclusive queue (connection ids start at 1).
pub(crate) const MANAGEMENT_CONNECTION: ConnectionId = ConnectionId(0);

pub(crate) fn core_error(e: ferry_core::CoreError) -> ApiError {
    use ferry_core::CoreError as E;
    match e {
        E::NotFound(_) => ApiError::not_found(),
        E::PreconditionFailed(r) => ApiError::bad_request(r),
        E::AccessRefused(r) | E::ResourceLocked(r) => ApiError::not_allowed(r),
        E::ResourceError(r) => ApiError::unavailable(r),
    }
}

/// A queue a frontend or a bridge keeps for itself is not the API's to delete or purge.
pub(crate) fn refuse_reserved(state: &AppState, vhost: &str, name: &str, what: QueueUse) -> Result<(), ApiError> {
    match state.shared.broker.reserved_queue_refusal(vhost, name.as_bytes(), what) {
        Some(why) => Err(ApiError::not_allowed(why)),
        None => Ok(()),
    }
}

async fn delete_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(params): Params,
) -> ApiResult {
    caller.require_admin()?;
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    v.queue(&name).ok_or_else(ApiError::not_found)?;
    refuse_reserved(&state, &vhost, &name, QueueUse::Delete)?;
    let if_unused = params.get("if-unused").is_some_and(|s| s == "true");
    let if_empty = params.get("if-empty").is_some_and(|s| s == "true");
    v.delete_queue(&ShortString::from(name.as_str()), MANAGEMENT_CONNECTION, if_unused, if_empty, now_millis())
        .map_err(core_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// JSON arguments as field tables: the shovels' conversion, so a queue argument means the same
/// through the API as in a shovel's `src-queue-args`.
pub(crate) use ferry_bridge::shovel::args::json_table;

/// The body of `PUT /api/queues/{vhost}/{name}` (RabbitMQ's: durable by default). Other keys
/// (rabbitmqadmin repeats `name` and `vhost`, and sends `node`) are ignored, as RabbitMQ does.
#[derive(Debug, serde::Deserialize)]
struct QueueBody {
    #[serde(default = "yes", deserialize_with = "flag")]
    durable: bool,
    #[serde(default, deserialize_with = "flag")]
    auto_delete: bool,
    #[serde(default)]
    arguments: Map<String, Value>,
}

pub(crate) fn yes() -> bool {
    true
}

/// A boolean as RabbitMQ takes it: `true`, or the string `"true"` (what rabbitmqadmin sends).
pub(crate) fn flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::Bool(b) => Ok(b),
        Value::String(s) if s == "true" => Ok(true),
        Value::String(s) if s == "false" => Ok(false),
        other => Err(D::Error::custom(format!("expected true or false, not {other}"))),
    }
}

/// Declares a queue as `queue.declare` would (administrator): `201` when made, `204` when it
/// existed with the same settings, `400` when it exists with others.
async fn declare_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult {
    caller.require_admin()?;
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    if name.is_empty() || name.len() > ShortString::MAX_LEN {
        return Err(ApiError::bad_request(format!("queue names are 1 to {} bytes", ShortString::MAX_LEN)));
    }
    let body: QueueBody = if body.is_empty() {
        QueueBody { durable: true, auto_delete: false, arguments: Map::new() }
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("body: {e}")))?
    };
    refuse_reserved(&state, &vhost, &name, QueueUse::Declare)?;
    let options = ferry_core::queue::QueueOptions {
        durable: body.durable,
        exclusive: None,
        auto_delete: body.auto_delete,
        arguments: json_table(&body.arguments),
    };
    let decl = ferry_core::vhost::QueueDeclare {
        name: ShortString::from(name.as_str()),
        passive: false,
        options,
        connection: MANAGEMENT_CONNECTION,
    };
    let declared = v.declare_queue(decl, now_millis()).map_err(core_error)?;
    Ok(if declared.created { StatusCode::CREATED } else { StatusCode::NO_CONTENT }.into_response())
}

async fn purge_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    refuse_reserved(&state, &vhost, &name, QueueUse::Purge)?;
    v.purge_queue(&ShortString::from(name.as_str()), MANAGEMENT_CONNECTION, now_millis()).map_err(core_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- exchanges and bindings --------------------------------------------------------------------

fn exchange_json(vhost: &str, x: &ferry_core::exchange::Exchange) -> Value {
    let o = x.options();
    json!({
        "name": x.name().to_string_lossy(),
        "vhost": vhost,
        "type": x.kind().as_str(),
        "durable": o.durable,
        "auto_delete": o.auto_delete,
        "internal": o.internal,
        "arguments": table_json(&o.arguments),
        "user_who_performed_action": "",
    })
}

fn exchange_list(vhosts: &[Arc<VHost>], q: &ListQuery) -> Result<Value, ApiError> {
    let mut items = Vec::new();
    let mut total = 0;
    for v in vhosts {
        for name in v.exchange_names() {
            total += 1;
            let name = name.to_string_lossy();
            if !q.matches(&name) {
                continue;
            }
            if let Some(x) = v.exchange(&name) {
                items.push(exchange_json(v.name(), &x));
            }
        }
    }
    q.finish(items, total)
}

async fn exchanges_all(State(state): State<AppState>, caller: Caller, Query(params): Params) -> ApiResult {
    let q = ListQuery::parse(&params)?;
    let body = render(&state, move |shared| exchange_list(&visible_vhosts(shared, &caller), &q)).await??;
    Ok(json_response(body))
}

async fn exchanges_of_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(params): Params,
) -> ApiResult {
    let q = ListQuery::parse(&params)?;
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    Ok(json_response(exchange_list(&[v], &q)?))
}

async fn exchange_one(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let x = v.exchange(&name).ok_or_else(ApiError::not_found)?;
    Ok(json_response(exchange_json(&vhost, &x)))
}

/// RabbitMQ's `properties_key`: the routing key, with `~` and a digest of the arguments when
/// there are any.
pub(crate) fn properties_key(routing_key: &str, arguments: &FieldTable) -> String {
    if arguments.is_empty() {
        return routing_key.to_string();
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (k, v) in arguments.iter() {
        k.hash(&mut h);
        format!("{v:?}").hash(&mut h);
    }
    format!("{routing_key}~{:x}", h.finish())
}

fn binding_list(vhosts: &[Arc<VHost>], q: &ListQuery) -> Result<Value, ApiError> {
    let items: Vec<Value> = vhosts.iter().flat_map(|v| vhost_bindings(v)).collect();
    let total = items.len();
    q.finish(items, total)
}

/// Every binding of a vhost as the API shows it: the default exchange's implicit binding of
/// each queue first, then each exchange's.
pub(crate) fn vhost_bindings(v: &VHost) -> Vec<Value> {
    let mut items = Vec::new();
    // The default exchange's implicit binding of every queue under its own name.
    let (mut live, _) = v.queues_and_retired();
    live.sort_by(|a, b| a.name().cmp(b.name()));
    for queue in &live {
        let name = queue.name().to_string_lossy();
        items.push(json!({
            "source": "", "vhost": v.name(), "destination": name, "destination_type": "queue",
            "routing_key": name, "arguments": {}, "properties_key": name,
        }));
    }
    for xname in v.exchange_names() {
        let Some(x) = v.exchange(&xname.to_string_lossy()) else { continue };
        for b in x.bindings() {
            let (destination, kind) = match &b.destination {
                Destination::Queue(queue) => (queue.name().to_string_lossy(), "queue"),
                Destination::Exchange(e) => (e.to_string_lossy(), "exchange"),
                // MQTT subscribers that keep no queue are not RabbitMQ bindings.
                Destination::Sink(_) => continue,
            };
            let key = b.key.routing_key.to_string_lossy();
            items.push(json!({
                "source": xname.to_string_lossy(), "vhost": v.name(), "destination": destination,
                "destination_type": kind, "routing_key": key, "arguments": table_json(&b.key.arguments),
                "properties_key": properties_key(&key, &b.key.arguments),
            }));
        }
    }
    items
}

async fn bindings_all(State(state): State<AppState>, caller: Caller, Query(params): Params) -> ApiResult {
    let q = ListQuery::parse(&params)?;
    let body = render(&state, move |shared| binding_list(&visible_vhosts(shared, &caller), &q)).await??;
    Ok(json_response(body))
}

async fn bindings_of_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(params): Params,
) -> ApiResult {
    let q = ListQuery::parse(&params)?;
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let body = render(&state, move |_| binding_list(&[v], &q)).await??;
    Ok(json_response(body))
}

// ----- health ---------------------------------------------------------------------------------

/// `200 {"status":"ok"}`, or `503` with the alarms in effect (RabbitMQ's shape).
async fn alarms(State(state): State<AppState>, _caller: Caller) -> Response {
    let broker = &state.shared.broker;
    let mut alarms = Vec::new();
    if broker.memory().is_raised() {
        alarms.push(json!({"node": node(), "resource": "memory"}));
    }
    if broker.disk().is_raised() {
        alarms.push(json!({"node": node(), "resource": "disk"}));
    }
    if alarms.is_empty() {
        json_response(json!({"status": "ok"}))
    } else {
        let body = json!({"status": "failed", "reason": "There are alarms in effect in the cluster", "alarms": alarms});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::queue::{QueueName, QueueOptions};

    #[test]
    fn a_typed_queue_item_serializes_as_the_json_shape() {
        let mut options = QueueOptions { durable: true, ..QueueOptions::default() };
        options.arguments.insert("x-max-length", FieldValue::I32(10));
        let q = Queue::new(QueueName::from("orders"), options, 0).unwrap();
        let st = QueueStats { ready: 3, unacked: 1, consumers: 2, published: 9, ..QueueStats::default() };
        let r = PerSecond { published: 1.5, ..PerSecond::default() };
        let typed = serde_json::to_value(queue_item("/", &q, &st, &r)).unwrap();
        assert_eq!(typed, queue_json("/", &q, &st, &r));
        assert_eq!(typed["arguments"], json!({"x-max-length": 10}));
        assert_eq!(typed["message_stats"]["publish_details"]["rate"], 1.5);
    }
}

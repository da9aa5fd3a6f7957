//! Messages through the API: publish to an exchange, get from a queue, and RabbitMQ's aliveness
//! test.
//!
//! - `POST /api/exchanges/{vhost}/{name}/publish` goes through the vhost's publish as an AMQP
//!   client's does (so MQTT subscribers get it under the topic mapping), waits for the store
//!   to hold a persistent message, and answers `{"routed": bool}`. While a memory or disk alarm
//!   blocks publishers it answers `503` rather than holding the request.
//! - `POST /api/queues/{vhost}/{name}/get` takes up to [`MAX_GET_COUNT`] messages (RabbitMQ has
//!   no limit; each one is held in the answer), and stops early once their payloads (after
//!   `truncate`) reach [`MAX_GET_BYTES`]; then it acknowledges, requeues or rejects them all,
//!   as `ackmode` says. Requeued messages go back to their places (their order is kept)
//!   and are redelivered next time.
//! - `GET /api/aliveness-test/{vhost}` declares the queue `aliveness-test`, publishes a
//!   message to it through the default exchange and gets it back, as RabbitMQ does.
//!
//! Who may: publishing needs write permission on the exchange, getting read permission on
//! the queue (see `topology` for the roles); the aliveness test, any caller who sees the
//! vhost (it is a health check).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use ferry_core::message::{now_millis, DeliveryMode, Properties};
use ferry_core::permissions::{Permission, Resource};
use ferry_core::policy::QueueUse;
use ferry_core::queue::{OwnerId, Queue};
use ferry_core::vhost::{QueueDeclare, VHost};
use ferry_core::{FieldTable, Message, ShortString};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::{
    core_error, json_response, json_table, refuse_reserved, table_json, visible_vhost, ApiResult, AppState,
    MANAGEMENT_CONNECTION,
};
use crate::error::ApiError;
use crate::login::Caller;
use crate::topology::{authorize, authorize_topic, exchange_name, parse_body, Body};

/// The most messages one get takes (RabbitMQ has no limit).
pub const MAX_GET_COUNT: usize = 1000;
/// A get stops taking messages once their payloads reach this many bytes (at least one message
/// is taken), so that one answer stays bounded whatever the queue holds.
pub const MAX_GET_BYTES: usize = 16 * 1024 * 1024;
/// How long a publish waits for the store to hold a persistent message.
const COMMIT_WAIT: Duration = Duration::from_secs(30);
/// RabbitMQ's aliveness queue and message.
const ALIVENESS_QUEUE: &str = "aliveness-test";
const ALIVENESS_MESSAGE: &[u8] = b"test_message";

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/exchanges/{vhost}/{name}/publish", post(publish))
        .route("/api/queues/{vhost}/{name}/get", post(get_messages))
        .route("/api/aliveness-test/{vhost}", get(aliveness))
}

// ----- publish -----------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct PublishBody {
    routing_key: Option<String>,
    payload: Option<String>,
    #[serde(default)]
    payload_encoding: Option<String>,
    #[serde(default)]
    properties: Map<String, Value>,
}

fn short(field: &str, v: &Value) -> Result<ShortString, ApiError> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => return Err(ApiError::bad_request(format!("properties.{field}: expected a string, not {other}"))),
    };
    if s.len() > ShortString::MAX_LEN {
        return Err(ApiError::bad_request(format!("properties.{field}: longer than {} bytes", ShortString::MAX_LEN)));
    }
    Ok(ShortString::from(s.as_str()))
}

fn integer(field: &str, v: &Value) -> Result<u64, ApiError> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| ApiError::bad_request(format!("properties.{field}: expected a non-negative integer, not {v}")))
}

/// RabbitMQ's `properties` object as message properties; unknown keys are refused, as
/// RabbitMQ refuses them.
fn properties(map: &Map<String, Value>) -> Result<Properties, ApiError> {
    let mut p = Properties::default();
    for (k, v) in map {
        match k.as_str() {
            "content_type" => p.content_type = Some(short(k, v)?),
            "content_encoding" => p.more_mut().content_encoding = Some(short(k, v)?),
            "headers" => match v {
                Value::Object(o) => p.headers = Some(json_table(o)),
                other => {
                    return Err(ApiError::bad_request(format!("properties.headers: expected an object, not {other}")))
                }
            },
            "delivery_mode" => {
                p.delivery_mode = Some(match integer(k, v)? {
                    1 => DeliveryMode::Transient,
                    2 => DeliveryMode::Persistent,
                    n => return Err(ApiError::bad_request(format!("properties.delivery_mode: {n}: expected 1 or 2"))),
                })
            }
            "priority" => {
                let n = integer(k, v)?;
                p.priority =
                    Some(u8::try_from(n).map_err(|_| ApiError::bad_request("properties.priority: at most 255"))?);
            }
            "correlation_id" => p.more_mut().correlation_id = Some(short(k, v)?),
            "reply_to" => p.more_mut().reply_to = Some(short(k, v)?),
            "expiration" => {
                let e = short(k, v)?;
                if !ferry_core::message::valid_expiration(&e) {
                    return Err(ApiError::bad_request(format!("invalid expiration '{e}'")));
                }
                p.more_mut().expiration = Some(e);
            }
            "message_id" => p.more_mut().message_id = Some(short(k, v)?),
            "timestamp" => p.timestamp = Some(integer(k, v)?),
            "type" => p.more_mut().kind = Some(short(k, v)?),
            "user_id" => p.more_mut().user_id = Some(short(k, v)?),
            "app_id" => p.more_mut().app_id = Some(short(k, v)?),
            "cluster_id" => p.more_mut().cluster_id = Some(short(k, v)?),
            other => return Err(ApiError::bad_request(format!("properties: unknown property '{other}'"))),
        }
    }
    Ok(p)
}

fn payload(body: &PublishBody) -> Result<Bytes, ApiError> {
    let payload = body.payload.as_deref().ok_or_else(|| ApiError::bad_request("payload: required"))?;
    match body.payload_encoding.as_deref().unwrap_or("string") {
        "string" => Ok(Bytes::copy_from_slice(payload.as_bytes())),
        "base64" => BASE64
            .decode(payload.trim())
            .map(Bytes::from)
            .map_err(|e| ApiError::bad_request(format!("payload: not base64: {e}"))),
        other => Err(ApiError::bad_request(format!("payload_encoding: {other:?}: expected string or base64"))),
    }
}

async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let exchange = exchange_name(&name).to_string();
    authorize(&state, &caller, &vhost, Permission::Write, Resource::Exchange, &exchange)?;
    let body: PublishBody = parse_body(body)?;
    let routing_key = body.routing_key.clone().ok_or_else(|| ApiError::bad_request("routing_key: required"))?;
    if routing_key.len() > ShortString::MAX_LEN {
        return Err(ApiError::bad_request(format!("routing_key: longer than {} bytes", ShortString::MAX_LEN)));
    }
    authorize_topic(&state, &caller, &v, Permission::Write, &exchange, &routing_key)?;
    if exchange.is_empty() {
        refuse_reserved(&state, &vhost, &routing_key, QueueUse::Publish)?;
    }
    let properties = properties(&body.properties)?;
    // RabbitMQ's validated user id: the publisher may only claim itself.
    if let Some(user_id) = &properties.more().user_id {
        if user_id.as_bytes() != caller.user.as_bytes() {
            return Err(ApiError::bad_request(format!(
                "user_id property set to '{user_id}' but authenticated user was '{}'",
                caller.user
            )));
        }
    }
    let payload = payload(&body)?;
    let broker = &state.shared.broker;
    if broker.memory().is_raised() || broker.disk().is_raised() {
        return Err(ApiError::unavailable("a resource alarm blocks publishers; try again later"));
    }
    let now = now_millis();
    let message = Message::new(exchange.as_str(), routing_key.as_str(), payload).with_properties(properties).at(now);
    let outcome = v.publish(&ShortString::from(exchange.as_str()), message, now).map_err(core_error)?;
    match tokio::time::timeout(COMMIT_WAIT, outcome.commit.wait()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ApiError::internal(format!("store: {e}"))),
        Err(_) => return Err(ApiError::unavailable("the store did not take the message in time")),
    }
    Ok(json_response(json!({ "routed": outcome.routed > 0 })))
}

// ----- get ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckMode {
    /// `ack_requeue_false`: the messages are acknowledged (gone).
    Ack,
    /// `ack_requeue_true` and `reject_requeue_true`: back to the queue, redelivered.
    Requeue,
    /// `reject_requeue_false`: rejected (dead-lettered when the queue says so).
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Auto,
    Base64,
}

/// A number as RabbitMQ takes it: a JSON number or a string of digits (rabbitmqadmin sends
/// strings).
fn number_field(field: &str, v: Option<&Value>) -> Result<Option<u64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or(()),
        Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| ()),
        Some(_) => Err(()),
    }
    .map_err(|()| ApiError::bad_request(format!("{field}: expected a non-negative integer")))
}

#[derive(Debug)]
struct GetRequest {
    count: usize,
    ackmode: AckMode,
    encoding: Encoding,
    truncate: Option<usize>,
}

fn get_request(body: &Map<String, Value>) -> Result<GetRequest, ApiError> {
    let count = number_field("count", body.get("count"))?.ok_or_else(|| ApiError::bad_request("count: required"))?;
    if count as usize > MAX_GET_COUNT || count == 0 {
        return Err(ApiError::bad_request(format!("count: between 1 and {MAX_GET_COUNT}")));
    }
    let ackmode = match body.get("ackmode").and_then(Value::as_str) {
        Some("ack_requeue_true") | Some("reject_requeue_true") => AckMode::Requeue,
        Some("ack_requeue_false") => AckMode::Ack,
        Some("reject_requeue_false") => AckMode::Reject,
        other => {
            return Err(ApiError::bad_request(format!(
                "ackmode: {other:?}: expected ack_requeue_true, ack_requeue_false, reject_requeue_true or reject_requeue_false"
            )))
        }
    };
    let encoding = match body.get("encoding").and_then(Value::as_str) {
        Some("auto") => Encoding::Auto,
        Some("base64") => Encoding::Base64,
        other => return Err(ApiError::bad_request(format!("encoding: {other:?}: expected auto or base64"))),
    };
    let truncate = number_field("truncate", body.get("truncate"))?.map(|t| t as usize);
    Ok(GetRequest { count: count as usize, ackmode, encoding, truncate })
}

/// Message properties as RabbitMQ's answers show them: only those set.
fn properties_json(p: &Properties) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| json!(s.to_string_lossy()));
    put("content_type", s(&p.content_type));
    put("content_encoding", s(&p.more().content_encoding));
    put("headers", p.headers.as_ref().map(|h: &FieldTable| table_json(h)));
    put("delivery_mode", p.delivery_mode.map(|d| json!(if d == DeliveryMode::Persistent { 2 } else { 1 })));
    put("priority", p.priority.map(|n| json!(n)));
    put("correlation_id", s(&p.more().correlation_id));
    put("reply_to", s(&p.more().reply_to));
    put("expiration", s(&p.more().expiration));
    put("message_id", s(&p.more().message_id));
    put("timestamp", p.timestamp.map(|n| json!(n)));
    put("type", s(&p.more().kind));
    put("user_id", s(&p.more().user_id));
    put("app_id", s(&p.more().app_id));
    put("cluster_id", s(&p.more().cluster_id));
    Value::Object(m)
}

fn message_json(m: &Message, redelivered: bool, left: u32, req: &GetRequest) -> Value {
    let body = match req.truncate {
        Some(t) if t < m.payload.len() => &m.payload[..t],
        _ => &m.payload[..],
    };
    let (payload, encoding) = match (req.encoding, std::str::from_utf8(body)) {
        (Encoding::Auto, Ok(text)) => (text.to_string(), "string"),
        _ => (BASE64.encode(body), "base64"),
    };
    json!({
        "payload_bytes": m.payload.len(),
        "redelivered": redelivered,
        "exchange": m.exchange.to_string_lossy(),
        "routing_key": m.routing_key.to_string_lossy(),
        "message_count": left,
        "properties": properties_json(&m.properties),
        "payload": payload,
        "payload_encoding": encoding,
    })
}

/// Takes up to `req.count` messages, then settles them all as `req.ackmode` says (all taken
/// first, so a requeued message is not taken twice).
fn take(v: &VHost, q: &std::sync::Arc<Queue>, req: &GetRequest) -> Vec<Value> {
    let owner = OwnerId::next();
    let mut out = Vec::new();
    let mut seqs = Vec::new();
    let mut bytes = 0usize;
    for _ in 0..req.count {
        if bytes >= MAX_GET_BYTES {
            break;
        }
        let now = now_millis();
        let Some((d, left)) = v.get(q, owner, false, now) else { break };
        bytes += req.truncate.map_or(d.message.payload.len(), |t| t.min(d.message.payload.len()));
        out.push(message_json(&d.message, d.redelivered, left, req));
        seqs.push(d.seq);
    }
    for seq in seqs {
        let now = now_millis();
        let settled = match req.ackmode {
            AckMode::Ack => q.ack(seq, now),
            AckMode::Requeue => q.reject(seq, true, now),
            AckMode::Reject => q.reject(seq, false, now),
        };
        match settled {
            Ok(effects) => {
                v.settle(q, effects, now);
            }
            // Only if the queue went away meanwhile (deleted): its messages went with it.
            Err(e) => tracing::debug!(queue = %q.name(), "management get: settling {seq}: {e}"),
        }
    }
    out
}

async fn get_messages(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    authorize(&state, &caller, &vhost, Permission::Read, Resource::Queue, &name)?;
    let body: Map<String, Value> = parse_body(body)?;
    let req = get_request(&body)?;
    refuse_reserved(&state, &vhost, &name, QueueUse::Consume)?;
    let q = v.queue_for(&ShortString::from(name.as_str()), MANAGEMENT_CONNECTION).map_err(core_error)?;
    let items = crate::api::render(&state, move |_| take(&v, &q, &req)).await?;
    Ok(json_response(Value::Array(items)))
}

// ----- aliveness test ----------------------------------------------------------------------------

fn failed(reason: impl Into<String>) -> ApiResult {
    let body = json!({"status": "failed", "reason": reason.into()});
    Ok((axum::http::StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response())
}

async fn aliveness(State(state): State<AppState>, caller: Caller, Path(vhost): Path<String>) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let now = now_millis();
    let decl = QueueDeclare {
        name: ShortString::from(ALIVENESS_QUEUE),
        passive: false,
        options: ferry_core::queue::QueueOptions { durable: false, ..Default::default() },
        connection: MANAGEMENT_CONNECTION,
    };
    let q = match v.declare_queue(decl, now) {
        Ok(d) => d.queue,
        Err(e) => return failed(format!("declaring {ALIVENESS_QUEUE}: {e}")),
    };
    let message = Message::new("", ALIVENESS_QUEUE, Bytes::from_static(ALIVENESS_MESSAGE)).at(now);
    match v.publish(&ShortString::from(""), message, now) {
        Ok(o) if o.routed > 0 => {}
        Ok(_) => return failed(format!("the message to {ALIVENESS_QUEUE} was not routed")),
        Err(e) => return failed(format!("publishing to {ALIVENESS_QUEUE}: {e}")),
    }
    // Anything else in the queue (left by an earlier test that failed half way) goes first.
    for _ in 0..MAX_GET_COUNT {
        let now = now_millis();
        match v.get(&q, OwnerId::next(), true, now) {
            Some((d, _)) if &d.message.payload[..] == ALIVENESS_MESSAGE => {
                return Ok(json_response(json!({"status": "ok"})));
            }
            Some(_) => continue,
            None => break,
        }
    }
    failed(format!("the message published to {ALIVENESS_QUEUE} did not come back"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> Result<GetRequest, ApiError> {
        get_request(v.as_object().unwrap())
    }

    #[test]
    fn get_requests_take_rabbitmqadmin_strings_and_are_bounded() {
        let r = req(json!({"count": "5", "ackmode": "ack_requeue_true", "encoding": "auto"})).unwrap();
        assert_eq!((r.count, r.ackmode, r.encoding, r.truncate), (5, AckMode::Requeue, Encoding::Auto, None));
        let r = req(json!({"count": 2, "ackmode": "reject_requeue_false", "encoding": "base64", "truncate": 10}));
        assert_eq!(r.unwrap().truncate, Some(10));
        assert!(req(json!({"count": 1001, "ackmode": "ack_requeue_true", "encoding": "auto"})).is_err());
        assert!(req(json!({"count": 0, "ackmode": "ack_requeue_true", "encoding": "auto"})).is_err());
        assert!(req(json!({"count": 1, "ackmode": "requeue", "encoding": "auto"})).is_err());
        assert!(req(json!({"count": 1, "ackmode": "ack_requeue_true"})).is_err());
    }

    #[test]
    fn properties_are_read_and_shown_as_rabbitmq_does() {
        let map = json!({"delivery_mode": 2, "headers": {"a": 1}, "content_type": "text/plain", "priority": "3"});
        let p = properties(map.as_object().unwrap()).unwrap();
        assert!(p.is_persistent());
        assert_eq!(p.priority, Some(3));
        let shown = properties_json(&p);
        assert_eq!(
            shown,
            json!({"delivery_mode": 2, "headers": {"a": 1}, "content_type": "text/plain", "priority": 3})
        );
        assert!(properties(json!({"nope": 1}).as_object().unwrap()).is_err());
        assert!(properties(json!({"delivery_mode": 3}).as_object().unwrap()).is_err());
        assert!(properties(json!({"expiration": "soon"}).as_object().unwrap()).is_err());
    }

    #[tokio::test]
    async fn a_get_stops_at_its_byte_bound_and_requeues_in_order() {
        let v = VHost::new("/", std::sync::Arc::new(ferry_core::store::MemoryStore::new()));
        let decl = QueueDeclare {
            name: ShortString::from("big"),
            passive: false,
            options: ferry_core::queue::QueueOptions::default(),
            connection: MANAGEMENT_CONNECTION,
        };
        let q = v.declare_queue(decl, 0).unwrap().queue;
        let nine_mib = Bytes::from(vec![b'x'; 9 * 1024 * 1024]);
        for i in 0..3u8 {
            let mut payload = nine_mib.to_vec();
            payload[0] = b'0' + i;
            v.publish(&ShortString::from(""), Message::new("", "big", Bytes::from(payload)), 0).unwrap();
        }
        let req = GetRequest { count: 3, ackmode: AckMode::Requeue, encoding: Encoding::Auto, truncate: Some(1) };
        // Truncated, all three fit.
        let all = take(&v, &q, &req);
        let firsts: Vec<&str> = all.iter().map(|m| m["payload"].as_str().unwrap()).collect();
        assert_eq!(firsts, ["0", "1", "2"]);
        // Whole, the first two reach 16 MiB: the third stays, the order is kept.
        let whole = GetRequest { truncate: None, ..req };
        let got = take(&v, &q, &whole);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["redelivered"], true);
        assert_eq!(&got[1]["payload"].as_str().unwrap()[..1], "1");
        assert_eq!(q.stats().ready, 3);
    }

    #[test]
    fn payloads_are_text_when_they_can_be_and_truncated_on_request() {
        let r = GetRequest { count: 1, ackmode: AckMode::Ack, encoding: Encoding::Auto, truncate: Some(3) };
        let m = Message::new("x", "k", Bytes::from_static(b"hello"));
        let v = message_json(&m, false, 0, &r);
        assert_eq!((v["payload"].as_str(), v["payload_bytes"].as_u64()), (Some("hel"), Some(5)));
        let bin = Message::new("x", "k", Bytes::from_static(&[0xff, 0x00]));
        let v = message_json(&bin, true, 4, &r);
        assert_eq!((v["payload"].as_str(), v["payload_encoding"].as_str()), (Some("/wA="), Some("base64")));
        assert_eq!((v["redelivered"].as_bool(), v["message_count"].as_u64()), (Some(true), Some(4)));
    }
}

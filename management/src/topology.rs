//! Declaring and deleting exchanges, and bindings: listed per queue and per exchange, made and
//! removed, as RabbitMQ's management API does it.
//!
//! Who may change things (RabbitMQ's rule, within Ferry's roles): an `administrator`; and a
//! `management` user whose vhost permissions allow the operation as they would over AMQP
//! (configure on the exchange to declare or delete it; write on the destination and read on
//! the source to bind), under the same topic permissions and MQTT ACL. A `monitoring` user
//! changes nothing. Every operation goes through the vhost's own methods, as an AMQP client's
//! would: the same equivalence checks, reserved names (`amq.*`, the default exchange) and the
//! MQTT frontend's reserved queues.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use ferry_core::exchange::{BindingKey, Destination, ExchangeOptions};
use ferry_core::permissions::{Permission, Resource};
use ferry_core::policy::QueueUse;
use ferry_core::vhost::{ExchangeDeclare, VHost};
use ferry_core::ShortString;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::api::{
    core_error, flag, json_response, json_table, properties_key, refuse_reserved, vhost_bindings, visible_vhost, yes,
    ApiResult, AppState, Params, MANAGEMENT_CONNECTION,
};
use crate::error::ApiError;
use crate::login::{Caller, Role};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/exchanges/{vhost}/{name}", axum::routing::put(declare_exchange).delete(delete_exchange))
        .route("/api/exchanges/{vhost}/{name}/bindings/source", get(bindings_from_exchange))
        .route("/api/exchanges/{vhost}/{name}/bindings/destination", get(bindings_to_exchange))
        .route("/api/queues/{vhost}/{name}/bindings", get(bindings_of_queue))
        .route("/api/bindings/{vhost}/e/{source}/{kind}/{destination}", post(bind).get(bindings_between))
        .route("/api/bindings/{vhost}/e/{source}/{kind}/{destination}/{props}", get(binding_one).delete(unbind))
}

/// RabbitMQ's name for the default exchange in paths and bodies.
pub(crate) fn exchange_name(name: &str) -> &str {
    if name == "amq.default" {
        ""
    } else {
        name
    }
}

/// Whether `caller` may do `permission` on the `resource` called `name` in `vhost` (the module
/// says who may).
pub(crate) fn authorize(
    state: &AppState,
    caller: &Caller,
    vhost: &str,
    permission: Permission,
    resource: Resource,
    name: &str,
) -> Result<(), ApiError> {
    match caller.role {
        Role::Administrator => Ok(()),
        Role::Monitoring => Err(ApiError::not_allowed("Not administrator user")),
        Role::Management => {
            let grant = state
                .shared
                .broker
                .access()
                .grant(&caller.user, false, vhost)
                .map_err(|d| ApiError::not_allowed(d.0))?;
            grant.check(permission, resource, name).map_err(|d| ApiError::not_allowed(d.0))
        }
    }
}

/// Topic permissions (and the MQTT ACL on MQTT exchanges) for a `management` caller; an
/// administrator is not held to them, as for the other checks.
pub(crate) fn authorize_topic(
    state: &AppState,
    caller: &Caller,
    v: &VHost,
    permission: Permission,
    exchange: &str,
    routing_key: &str,
) -> Result<(), ApiError> {
    if caller.role != Role::Management {
        return Ok(());
    }
    let grant =
        state.shared.broker.access().grant(&caller.user, false, v.name()).map_err(|d| ApiError::not_allowed(d.0))?;
    let is_topic = || v.exchange(exchange).is_some_and(|x| x.kind().as_str() == "topic");
    grant.check_topic(permission, exchange, is_topic, routing_key).map_err(|d| ApiError::not_allowed(d.0))
}

/// A request body, or why it could not be read (too large: past [`MAX_BODY_BYTES`]).
///
/// [`MAX_BODY_BYTES`]: crate::MAX_BODY_BYTES
pub(crate) type Body = Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>;

/// An empty body is `{}`; otherwise JSON, or an error in RabbitMQ's shape saying why not (`413`
/// for a body past the limit, `400` otherwise).
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let body = body.map_err(|r| ApiError { status: r.status(), error: "bad_request", reason: r.body_text() })?;
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { &body[..] };
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("body: {e}")))
}

fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if name.len() > ShortString::MAX_LEN {
        return Err(ApiError::bad_request(format!("{what} names are at most {} bytes", ShortString::MAX_LEN)));
    }
    Ok(())
}

// ----- exchanges ---------------------------------------------------------------------------------

/// RabbitMQ's body for `PUT /api/exchanges/{vhost}/{name}`: `type` is required, the flags
/// default as RabbitMQ's (durable), `"true"` / `"false"` strings are taken (rabbitmqadmin sends
/// them); other keys are ignored.
#[derive(Debug, Deserialize)]
struct ExchangeBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default = "yes", deserialize_with = "flag")]
    durable: bool,
    #[serde(default, deserialize_with = "flag")]
    auto_delete: bool,
    #[serde(default, deserialize_with = "flag")]
    internal: bool,
    #[serde(default)]
    arguments: Map<String, Value>,
}

/// `201` when made, `204` when it existed with the same settings, `400` with RabbitMQ's text
/// when with others; the default exchange and `amq.*` names are refused (`401`, RabbitMQ's
/// access refusal).
async fn declare_exchange(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let name = exchange_name(&name);
    check_name("exchange", name)?;
    authorize(&state, &caller, &vhost, Permission::Configure, Resource::Exchange, name)?;
    let body: ExchangeBody = parse_body(body)?;
    let kind = body.kind.ok_or_else(|| ApiError::bad_request("type: the exchange type is required"))?;
    let arguments = json_table(&body.arguments);
    if let Some(ae) = arguments.get("alternate-exchange").and_then(|a| a.as_str()) {
        // Routing into the alternate exchange is writing to it, as for exchange.declare.
        authorize(&state, &caller, &vhost, Permission::Write, Resource::Exchange, ae)?;
    }
    let existed = v.exchange(name).is_some();
    let decl = ExchangeDeclare {
        name: ShortString::from(name),
        kind,
        passive: false,
        options: ExchangeOptions {
            durable: body.durable,
            auto_delete: body.auto_delete,
            internal: body.internal,
            arguments,
        },
    };
    v.declare_exchange(decl).map_err(core_error)?;
    tracing::info!(user = %caller.user, vhost = %vhost, exchange = %name, "management: exchange declared");
    Ok(if existed { StatusCode::NO_CONTENT } else { StatusCode::CREATED }.into_response())
}

/// `if-unused=true` as RabbitMQ; `404` when there is no such exchange. `204`.
async fn delete_exchange(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    axum::extract::Query(params): Params,
) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let name = exchange_name(&name);
    authorize(&state, &caller, &vhost, Permission::Configure, Resource::Exchange, name)?;
    // The default and `amq.*` exchanges are refused with the core's text before the lookup.
    if !name.is_empty() && !name.starts_with("amq.") && v.exchange(name).is_none() {
        return Err(ApiError::not_found());
    }
    let if_unused = params.get("if-unused").is_some_and(|s| s == "true");
    v.delete_exchange(&ShortString::from(name), if_unused).map_err(core_error)?;
    tracing::info!(user = %caller.user, vhost = %vhost, exchange = %name, "management: exchange deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- listing bindings --------------------------------------------------------------------------

fn is(v: &Value, key: &str, want: &str) -> bool {
    v[key].as_str() == Some(want)
}

fn filtered(v: &VHost, keep: impl Fn(&Value) -> bool) -> Value {
    Value::Array(vhost_bindings(v).into_iter().filter(|b| keep(b)).collect())
}

async fn bindings_of_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    v.queue(&name).ok_or_else(ApiError::not_found)?;
    Ok(json_response(filtered(&v, |b| is(b, "destination_type", "queue") && is(b, "destination", &name))))
}

async fn bindings_from_exchange(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let name = exchange_name(&name);
    v.exchange(name).ok_or_else(ApiError::not_found)?;
    Ok(json_response(filtered(&v, |b| is(b, "source", name))))
}

async fn bindings_to_exchange(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let name = exchange_name(&name);
    v.exchange(name).ok_or_else(ApiError::not_found)?;
    Ok(json_response(filtered(&v, |b| is(b, "destination_type", "exchange") && is(b, "destination", name))))
}

/// `q` or `e` in a binding path: RabbitMQ's destination kinds.
fn destination_kind(kind: &str) -> Result<&'static str, ApiError> {
    match kind {
        "q" => Ok("queue"),
        "e" => Ok("exchange"),
        _ => Err(ApiError::not_found()),
    }
}

type BindingPath = Path<(String, String, String, String)>;

async fn bindings_between(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, destination)): BindingPath,
) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let kind = destination_kind(&kind)?;
    let source = exchange_name(&source);
    ends_exist(&v, source, kind, &destination)?;
    Ok(json_response(filtered(&v, |b| {
        is(b, "source", source) && is(b, "destination_type", kind) && is(b, "destination", &destination)
    })))
}

async fn binding_one(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let kind = destination_kind(&kind)?;
    let source = exchange_name(&source);
    ends_exist(&v, source, kind, &destination)?;
    let all = filtered(&v, |b| {
        is(b, "source", source)
            && is(b, "destination_type", kind)
            && is(b, "destination", &destination)
            && is(b, "properties_key", &props)
    });
    let one = all.as_array().and_then(|a| a.first()).cloned().ok_or_else(ApiError::not_found)?;
    Ok(json_response(one))
}

fn ends_exist(v: &VHost, source: &str, kind: &str, destination: &str) -> Result<(), ApiError> {
    v.exchange(source).ok_or_else(ApiError::not_found)?;
    let found = match kind {
        "queue" => v.queue(destination).is_some(),
        _ => v.exchange(destination).is_some(),
    };
    if found {
        Ok(())
    } else {
        Err(ApiError::not_found())
    }
}

// ----- binding and unbinding ---------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct BindBody {
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    arguments: Map<String, Value>,
}

/// Binds, as queue.bind / exchange.bind would: `201` with the new binding's path (relative,
/// its `properties_key`) in `Location`, as RabbitMQ answers.
async fn bind(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, destination)): BindingPath,
    body: Body,
) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let kind = destination_kind(&kind)?;
    let source = exchange_name(&source).to_string();
    let body: BindBody = parse_body(body)?;
    check_name("routing key", &body.routing_key)?;
    let resource = if kind == "queue" { Resource::Queue } else { Resource::Exchange };
    authorize(&state, &caller, &vhost, Permission::Write, resource, &destination)?;
    authorize(&state, &caller, &vhost, Permission::Read, Resource::Exchange, &source)?;
    authorize_topic(&state, &caller, &v, Permission::Read, &source, &body.routing_key)?;
    if kind == "exchange" {
        route_into_check(&state, &caller, &vhost, &destination)?;
    }
    let arguments = json_table(&body.arguments);
    let props = properties_key(&body.routing_key, &arguments);
    let key = BindingKey::new(body.routing_key.as_str()).with_arguments(arguments);
    let (src, dst) = (ShortString::from(source.as_str()), ShortString::from(destination.as_str()));
    if kind == "queue" {
        refuse_reserved(&state, &vhost, &destination, QueueUse::Bind)?;
        v.bind_queue(&dst, &src, key, MANAGEMENT_CONNECTION).map_err(core_error)?;
    } else {
        v.bind_exchange(&dst, &src, key).map_err(core_error)?;
    }
    Ok((StatusCode::CREATED, [(header::LOCATION, percent_encode(&props))]).into_response())
}

/// A `management` caller binding an exchange into an MQTT exchange must be let publish there
/// with every key (as for AMQP's exchange.bind).
fn route_into_check(state: &AppState, caller: &Caller, vhost: &str, destination: &str) -> Result<(), ApiError> {
    if caller.role != Role::Management {
        return Ok(());
    }
    let grant =
        state.shared.broker.access().grant(&caller.user, false, vhost).map_err(|d| ApiError::not_allowed(d.0))?;
    grant.check_route_into(destination, "#").map_err(|d| ApiError::not_allowed(d.0))
}

/// Percent-encodes what is not unreserved (RFC 3986), for a path segment.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Removes the binding whose `properties_key` is `props`; `404` when there is none.
async fn unbind(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
) -> ApiResult {
    let v = visible_vhost(&state.shared, &caller, &vhost)?;
    let kind = destination_kind(&kind)?;
    let source = exchange_name(&source);
    let resource = if kind == "queue" { Resource::Queue } else { Resource::Exchange };
    authorize(&state, &caller, &vhost, Permission::Write, resource, &destination)?;
    authorize(&state, &caller, &vhost, Permission::Read, Resource::Exchange, source)?;
    if source.is_empty() {
        // The default exchange's bindings are implicit (RabbitMQ refuses them too).
        return Err(ApiError::not_allowed(format!(
            "operation not permitted on the default exchange in vhost '{vhost}'"
        )));
    }
    if kind == "queue" {
        refuse_reserved(&state, &vhost, &destination, QueueUse::Unbind)?;
    }
    let x = v.exchange(source).ok_or_else(ApiError::not_found)?;
    let binding = x
        .bindings()
        .into_iter()
        .find(|b| {
            let to = match &b.destination {
                Destination::Queue(q) => kind == "queue" && q.name().as_bytes() == destination.as_bytes(),
                Destination::Exchange(e) => kind == "exchange" && e.as_bytes() == destination.as_bytes(),
                Destination::Sink(_) => false,
            };
            to && properties_key(&b.key.routing_key.to_string_lossy(), &b.key.arguments) == props
        })
        .ok_or_else(ApiError::not_found)?;
    let (src, dst) = (ShortString::from(source), ShortString::from(destination.as_str()));
    if kind == "queue" {
        v.unbind_queue(&dst, &src, binding.key, MANAGEMENT_CONNECTION).map_err(core_error)?;
    } else {
        v.unbind_exchange(&dst, &src, binding.key).map_err(core_error)?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amq_default_names_the_default_exchange() {
        assert_eq!(exchange_name("amq.default"), "");
        assert_eq!(exchange_name("amq.topic"), "amq.topic");
    }

    #[test]
    fn properties_keys_are_percent_encoded_for_a_path() {
        assert_eq!(percent_encode("a.b~1f"), "a.b~1f");
        assert_eq!(percent_encode("a/b #"), "a%2Fb%20%23");
    }
}

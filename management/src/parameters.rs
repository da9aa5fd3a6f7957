//! RabbitMQ's runtime parameters, of which Ferry has one component, `shovel` (dynamic
//! shovels, `ferry_bridge::shovel::runtime`): `GET /api/parameters` (+ `/{component}`,
//! `/shovel/{vhost}`, `/shovel/{vhost}/{name}`), `PUT|DELETE /api/parameters/shovel/{vhost}/{name}`
//! with RabbitMQ's body `{"value": {"src-uri": …, …}}`, and RabbitMQ 3.10's
//! `DELETE /api/shovels/vhost/{vhost}/{name}/restart`.
//!
//! Who may do what (RabbitMQ's rules): writing a parameter — and reading one with its URIs'
//! passwords — takes `administrator`, or `policymaker` with access to the vhost. Anyone else
//! who sees the vhost (`monitoring` sees all) reads it with every password replaced by `***`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use ferry_bridge::shovel::dynamic::redact;
use ferry_bridge::shovel::runtime::DynamicShovel;
use serde_json::{json, Value};

use crate::api::AppState;
use crate::error::ApiError;
use crate::login::{Caller, Role, POLICYMAKER};

/// The one component Ferry has.
pub(crate) const SHOVEL: &str = "shovel";

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/parameters", get(all))
        .route("/api/parameters/{component}", get(of_component))
        .route("/api/parameters/{component}/{vhost}", get(of_vhost))
        .route("/api/parameters/{component}/{vhost}/{name}", get(one).put(put).delete(remove))
        .route("/api/shovels/vhost/{vhost}/{name}/restart", delete(restart))
}

/// Whether `caller` may write parameters in `vhost` (and read them with their passwords).
pub(crate) fn may_write(state: &AppState, caller: &Caller, vhost: &str) -> bool {
    caller.role == Role::Administrator
        || (caller.tags.iter().any(|t| t == POLICYMAKER)
            && state.shared.broker.access().grant(&caller.user, false, vhost).is_ok())
}

fn may_see(state: &AppState, caller: &Caller, vhost: &str) -> bool {
    caller.sees_all() || state.shared.broker.access().grant(&caller.user, false, vhost).is_ok()
}

/// A dynamic shovel in RabbitMQ's parameter shape.
pub(crate) fn parameter_json(d: &DynamicShovel, with_passwords: bool) -> Value {
    let value = if with_passwords { d.value.clone() } else { redact(&d.value) };
    json!({"value": value, "vhost": d.vhost, "component": SHOVEL, "name": d.name})
}

fn list(state: &AppState, caller: &Caller, vhost: Option<&str>) -> Vec<Value> {
    state
        .shared
        .bridges
        .dynamic_shovels()
        .iter()
        .filter(|d| vhost.is_none_or(|v| d.vhost == v) && may_see(state, caller, &d.vhost))
        .map(|d| parameter_json(d, may_write(state, caller, &d.vhost)))
        .collect()
}

fn component(c: &str) -> Result<(), ApiError> {
    if c == SHOVEL {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "component {c:?}: Ferry's only runtime parameter component is \"shovel\" (federation is not supported)"
        )))
    }
}

async fn all(State(state): State<AppState>, caller: Caller) -> Response {
    Json(Value::Array(list(&state, &caller, None))).into_response()
}

async fn of_component(
    State(state): State<AppState>,
    caller: Caller,
    Path(c): Path<String>,
) -> Result<Response, ApiError> {
    // Another component has no parameters here (none can be made).
    let items = if c == SHOVEL { list(&state, &caller, None) } else { Vec::new() };
    Ok(Json(Value::Array(items)).into_response())
}

async fn of_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path((c, vhost)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    state.shared.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let items = if c == SHOVEL { list(&state, &caller, Some(&vhost)) } else { Vec::new() };
    Ok(Json(Value::Array(items)).into_response())
}

async fn one(
    State(state): State<AppState>,
    caller: Caller,
    Path((c, vhost, name)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    component(&c).map_err(|_| ApiError::not_found())?;
    if !may_see(&state, &caller, &vhost) {
        return Err(ApiError::not_found());
    }
    let all = state.shared.bridges.dynamic_shovels();
    let d = all.iter().find(|d| d.vhost == vhost && d.name == name).ok_or_else(ApiError::not_found)?;
    Ok(Json(parameter_json(d, may_write(&state, &caller, &vhost))).into_response())
}

fn require_write(state: &AppState, caller: &Caller, vhost: &str) -> Result<(), ApiError> {
    if may_write(state, caller, vhost) {
        Ok(())
    } else {
        Err(ApiError::not_allowed("Not administrator or policymaker of this vhost"))
    }
}

/// RabbitMQ's body: `{"value": {...}}`, with `vhost`, `component` and `name` optional (when
/// given they must be the path's). `201` when made, `204` when it replaced one.
async fn put(
    State(state): State<AppState>,
    caller: Caller,
    Path((c, vhost, name)): Path<(String, String, String)>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    require_write(&state, &caller, &vhost)?;
    component(&c)?;
    state.shared.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let body = crate::users::body_of(body)?;
    let mut body: Value = serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
    let obj = body.as_object_mut().ok_or_else(|| ApiError::bad_request("body: a JSON object with a value"))?;
    for (k, path) in [("vhost", &vhost), ("component", &c), ("name", &name)] {
        match obj.get(k) {
            None => {}
            Some(Value::String(s)) if s == path => {}
            Some(other) => return Err(ApiError::bad_request(format!("{k}: {other} is not the path's {path:?}"))),
        }
    }
    let value = obj.remove("value").ok_or_else(|| ApiError::bad_request("value: is required"))?;
    let replaced = state.shared.bridges.put_shovel(&vhost, &name, value).await.map_err(crate::bridges::change_error)?;
    tracing::info!(
        user = %caller.user,
        "management: shovel {name:?} in vhost {vhost:?} {}",
        if replaced { "changed" } else { "added" }
    );
    Ok(if replaced { StatusCode::NO_CONTENT } else { StatusCode::CREATED }.into_response())
}

async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path((c, vhost, name)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    require_write(&state, &caller, &vhost)?;
    component(&c)?;
    state.shared.bridges.delete_shovel(&vhost, &name).await.map_err(crate::bridges::change_error)?;
    tracing::info!(user = %caller.user, "management: shovel {name:?} in vhost {vhost:?} removed");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn restart(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    require_write(&state, &caller, &vhost)?;
    if state.shared.bridges.is_configured(&name) {
        return Err(ApiError::bad_request(format!(
            "shovel {name:?} is configured in the server's file: it restarts with the server"
        )));
    }
    state.shared.bridges.restart_shovel(&vhost, &name).await.map_err(crate::bridges::change_error)?;
    tracing::info!(user = %caller.user, "management: shovel {name:?} in vhost {vhost:?} restarted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

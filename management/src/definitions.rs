//! RabbitMQ's definitions: `GET|POST /api/definitions` and `GET|POST /api/definitions/{vhost}`
//! (administrator only), in the format of `rabbitmqctl export_definitions` and `rabbitmqadmin
//! export` / `import`.
//!
//! **Export** lists what an operator defined: vhosts; users (configured and run-time) with
//! `password_hash` and `hashing_algorithm`; vhost and topic permissions; durable exchanges
//! other than the default and `amq.*` ones; durable queues other than the ones the MQTT frontend
//! and the bridges keep for themselves (MQTT sessions' and shared subscriptions' queues, bridge
//! backlogs); and the bindings among what is exported (with those of `amq.*` exchanges to
//! exported queues); `parameters`: the dynamic shovels (component `shovel`, their values as
//! given, passwords included). `global_parameters` and `policies` are empty: Ferry has none.
//!
//! **Import** only adds, and is checked whole before anything is applied: an object that exists
//! with the same settings is left as it is; one that exists with other settings fails the
//! import with RabbitMQ's "inequivalent arg" reason (RabbitMQ's import fails the same way on
//! queues and exchanges; it would overwrite users and permissions, Ferry refuses instead), as
//! does anything Ferry cannot hold (policies, runtime parameters other than shovels, a hash it
//! cannot verify), and nothing is applied. Then vhosts, exchanges, queues, bindings, and users
//! with their permissions (one store batch) are made and the store is flushed before the `204`.
//! Users and permissions the server's file configures are left as the file has them (the
//! file wins a clash everywhere), whatever the import says of them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ferry_core::exchange::{BindingKey, Destination, ExchangeKind, ExchangeOptions};
use ferry_core::message::now_millis;
use ferry_core::permissions::VhostPermissions;
use ferry_core::policy::QueueUse;
use ferry_core::queue::{Queue, QueueName, QueueOptions};
use ferry_core::vhost::{ExchangeDeclare, QueueDeclare, VHost};
use ferry_core::ShortString;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::{core_error, flag, json_table, table_json, yes, AppState, MANAGEMENT_CONNECTION};
use crate::error::ApiError;
use crate::login::Caller;
use crate::users::{
    committed, hash_for_export, PermissionBody, TopicPermissionBody, UserBody, UserSpec, MAX_NAME_BYTES,
};
use crate::{Shared, RABBITMQ_API_VERSION};

/// Ferry's key for the MQTT bridges made through the API (`[[bridges]]` tables as JSON, as
/// `PUT /api/bridges/{name}` takes them); RabbitMQ's import ignores it.
const FERRY_BRIDGES: &str = "ferry_bridges";

/// A body as read, or why it could not be.
type RawBody = Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>;

/// Users given with a plain `password` (not a hash) in one import, at most: each costs an
/// argon2id hash (tens of milliseconds of CPU and 19 MiB).
const MAX_PLAIN_PASSWORDS: usize = 100;

/// Problems listed at most in one refusal (the rest are counted).
const MAX_LISTED_PROBLEMS: usize = 20;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/definitions", get(export_all).post(import_all))
        .route("/api/definitions/{vhost}", get(export_vhost).post(import_vhost))
        .merge(crate::users::routes())
        .merge(crate::bridges::routes())
        .merge(crate::parameters::routes())
}

// ----- export ------------------------------------------------------------------------------------

fn header() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("rabbit_version".into(), json!(RABBITMQ_API_VERSION));
    m.insert("rabbitmq_version".into(), json!(RABBITMQ_API_VERSION));
    m.insert("product_name".into(), json!("Ferry"));
    m.insert("product_version".into(), json!(env!("CARGO_PKG_VERSION")));
    m
}

/// Whether a queue is one a frontend or a bridge keeps for itself (not a user definition).
fn internal_queue(shared: &Shared, vhost: &str, name: &[u8]) -> bool {
    shared.broker.reserved_queue_refusal(vhost, name, QueueUse::Declare).is_some()
}

/// The durable, user-defined queues, exchanges and bindings of `v` (with `vhost` keys when
/// `with_vhost`).
fn objects_of(shared: &Shared, v: &VHost, with_vhost: bool, out: &mut [Vec<Value>; 3]) {
    let put_vhost = |mut o: Value| {
        if with_vhost {
            o["vhost"] = json!(v.name());
        }
        o
    };
    let mut queues: BTreeSet<ShortString> = BTreeSet::new();
    let mut live = v.queues_and_retired().0;
    live.sort_by(|a, b| a.name().cmp(b.name()));
    for q in live {
        let o = q.options();
        if !o.durable || o.exclusive.is_some() || internal_queue(shared, v.name(), q.name().as_bytes()) {
            continue;
        }
        queues.insert(q.name().clone());
        out[0].push(put_vhost(json!({
            "name": q.name().to_string_lossy(),
            "durable": true,
            "auto_delete": o.auto_delete,
            "arguments": table_json(&o.arguments),
        })));
    }
    let mut exchanges: BTreeSet<ShortString> = BTreeSet::new();
    let mut names = v.exchange_names();
    names.sort();
    for name in &names {
        let Some(x) = v.exchange(&name.to_string_lossy()) else { continue };
        let o = x.options();
        if name.is_empty() || !o.durable {
            continue;
        }
        exchanges.insert(name.clone());
        if name.as_bytes().starts_with(b"amq.") {
            continue;
        }
        out[1].push(put_vhost(json!({
            "name": name.to_string_lossy(),
            "type": x.kind().as_str(),
            "durable": true,
            "auto_delete": o.auto_delete,
            "internal": o.internal,
            "arguments": table_json(&o.arguments),
        })));
    }
    for name in &names {
        if !exchanges.contains(name) {
            continue;
        }
        let Some(x) = v.exchange(&name.to_string_lossy()) else { continue };
        let mut rows: Vec<Value> = Vec::new();
        for b in x.bindings() {
            let (destination, kind) = match &b.destination {
                Destination::Queue(q) if queues.contains(q.name()) => (q.name().to_string_lossy(), "queue"),
                Destination::Exchange(e) if exchanges.contains(&**e) => (e.to_string_lossy(), "exchange"),
                _ => continue,
            };
            rows.push(put_vhost(json!({
                "source": name.to_string_lossy(),
                "destination": destination,
                "destination_type": kind,
                "routing_key": b.key.routing_key.to_string_lossy(),
                "arguments": table_json(&b.key.arguments),
            })));
        }
        rows.sort_by_key(|r| (r["destination"].to_string(), r["routing_key"].to_string()));
        out[2].extend(rows);
    }
}

fn export(shared: &Shared, only: Option<&Arc<VHost>>) -> Value {
    let mut m = header();
    let mut objects: [Vec<Value>; 3] = Default::default();
    match only {
        Some(v) => objects_of(shared, v, false, &mut objects),
        None => {
            let broker = &shared.broker;
            let users: Vec<Value> = broker
                .auth()
                .users()
                .into_iter()
                .map(|(u, _)| {
                    let (hash, algorithm) = hash_for_export(&u.hash);
                    json!({"name": u.name, "password_hash": hash, "hashing_algorithm": algorithm, "tags": u.tags, "limits": {}})
                })
                .collect();
            let names = broker.vhost_names();
            let vhosts: Vec<Value> = names
                .iter()
                .map(|n| json!({"name": n, "limits": [], "metadata": {"description": "", "tags": []}}))
                .collect();
            let access = broker.access();
            let mut permissions: Vec<&VhostPermissions> = access.permissions.iter().collect();
            permissions.sort_by(|a, b| (&a.user, &a.vhost).cmp(&(&b.user, &b.vhost)));
            let permissions: Vec<Value> = permissions
                .iter()
                .map(|p| {
                    json!({"user": p.user, "vhost": p.vhost, "configure": p.configure.as_str(),
                           "write": p.write.as_str(), "read": p.read.as_str()})
                })
                .collect();
            let topic_permissions: Vec<Value> = access
                .topic_permissions
                .iter()
                .map(|t| json!({"user": t.user, "vhost": t.vhost, "exchange": t.exchange, "write": t.write, "read": t.read}))
                .collect();
            m.insert("users".into(), json!(users));
            m.insert("vhosts".into(), json!(vhosts));
            m.insert("permissions".into(), json!(permissions));
            m.insert("topic_permissions".into(), json!(topic_permissions));
            for n in &names {
                if let Some(v) = broker.vhost(n) {
                    objects_of(shared, &v, true, &mut objects);
                }
            }
            m.insert("global_parameters".into(), json!([]));
            // Ferry's own: the bridges made through the API, as they were given.
            let bridges: Vec<Value> = shared
                .bridges
                .bridges()
                .iter()
                .filter(|b| b.runtime)
                .filter_map(|b| shared.bridges.runtime_table(&b.config.name))
                .collect();
            m.insert(FERRY_BRIDGES.into(), json!(bridges));
        }
    }
    // RabbitMQ's runtime parameters: the dynamic shovels, as given (passwords included, as
    // RabbitMQ exports them; only administrators export).
    let parameters: Vec<Value> = shared
        .bridges
        .dynamic_shovels()
        .iter()
        .filter(|d| only.is_none_or(|v| v.name() == d.vhost.as_str()))
        .map(|d| crate::parameters::parameter_json(d, true))
        .collect();
    m.insert("parameters".into(), json!(parameters));
    m.insert("policies".into(), json!([]));
    let [queues, exchanges, bindings] = objects;
    m.insert("queues".into(), json!(queues));
    m.insert("exchanges".into(), json!(exchanges));
    m.insert("bindings".into(), json!(bindings));
    Value::Object(m)
}

async fn export_all(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let body = crate::api::render(&state, |shared| export(shared, None)).await?;
    Ok(Json(body).into_response())
}

async fn export_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let v = state.shared.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let body = crate::api::render(&state, move |shared| export(shared, Some(&v))).await?;
    Ok(Json(body).into_response())
}

// ----- import ------------------------------------------------------------------------------------

/// The definitions file; unknown keys are ignored, as RabbitMQ does (`rabbit_version`, …).
#[derive(Debug, Default, Deserialize)]
struct Definitions {
    #[serde(default)]
    users: Vec<UserBody>,
    #[serde(default)]
    vhosts: Vec<VhostBody>,
    #[serde(default)]
    permissions: Vec<PermissionBody>,
    #[serde(default)]
    topic_permissions: Vec<TopicPermissionBody>,
    #[serde(default)]
    parameters: Vec<Value>,
    #[serde(default)]
    global_parameters: Vec<GlobalParameter>,
    #[serde(default)]
    policies: Vec<Value>,
    #[serde(default)]
    queues: Vec<QueueBody>,
    #[serde(default)]
    exchanges: Vec<ExchangeBody>,
    #[serde(default)]
    bindings: Vec<BindingBody>,
    #[serde(default)]
    ferry_bridges: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct VhostBody {
    name: String,
}

#[derive(Debug, Deserialize)]
struct GlobalParameter {
    name: String,
}

#[derive(Debug, Deserialize)]
struct QueueBody {
    name: String,
    #[serde(default)]
    vhost: Option<String>,
    #[serde(default = "yes", deserialize_with = "flag")]
    durable: bool,
    #[serde(default, deserialize_with = "flag")]
    auto_delete: bool,
    #[serde(default)]
    arguments: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct ExchangeBody {
    name: String,
    #[serde(default)]
    vhost: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "yes", deserialize_with = "flag")]
    durable: bool,
    #[serde(default, deserialize_with = "flag")]
    auto_delete: bool,
    #[serde(default, deserialize_with = "flag")]
    internal: bool,
    #[serde(default)]
    arguments: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct BindingBody {
    source: String,
    #[serde(default)]
    vhost: Option<String>,
    destination: String,
    destination_type: String,
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    arguments: Map<String, Value>,
}

/// RabbitMQ's cluster identity: meaningless to Ferry, skipped on import.
const IGNORED_GLOBAL_PARAMETERS: &[&str] = &["cluster_name", "internal_cluster_id"];

/// What an import will do, checked.
#[derive(Default)]
struct Plan {
    vhosts: Vec<String>,
    exchanges: Vec<(String, ExchangeDeclare)>,
    queues: Vec<(String, QueueDeclare)>,
    bindings: Vec<(String, BindingBody)>,
    users: Vec<UserSpec>,
    permissions: Vec<VhostPermissions>,
    topic_permissions: Vec<ferry_core::permissions::TopicPermissions>,
    /// Bridges to make through `ferry_bridge::runtime`: (name, table).
    bridges: Vec<(String, Value)>,
    /// Dynamic shovels to make: (vhost, name, value).
    shovels: Vec<(String, String, Value)>,
}

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, p: impl Into<String>) {
        self.0.push(p.into());
    }
    fn into_result(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let n = self.0.len();
        let mut reason = self.0.into_iter().take(MAX_LISTED_PROBLEMS).collect::<Vec<_>>().join("; ");
        if n > MAX_LISTED_PROBLEMS {
            reason.push_str(&format!("; and {} more", n - MAX_LISTED_PROBLEMS));
        }
        Err(ApiError::bad_request(format!("definitions not imported, nothing was changed: {reason}")))
    }
}

fn short(what: &str, name: &str) -> Result<ShortString, String> {
    if name.len() > ShortString::MAX_LEN {
        return Err(format!("{what} '{name}': names are at most {} bytes", ShortString::MAX_LEN));
    }
    Ok(ShortString::from(name))
}

/// Checks everything; `forced_vhost` is the path's vhost of `POST /api/definitions/{vhost}`.
fn plan(shared: &Shared, mut defs: Definitions, forced_vhost: Option<&str>) -> Result<Plan, ApiError> {
    let broker = &shared.broker;
    let mut problems = Problems::default();
    let mut plan = Plan::default();
    let now = now_millis();

    if !defs.policies.is_empty() {
        problems.add(format!(
            "{} policies: Ferry has no policies (give queues their x- arguments instead)",
            defs.policies.len()
        ));
    }
    for g in defs.global_parameters.iter().filter(|g| !IGNORED_GLOBAL_PARAMETERS.contains(&g.name.as_str())) {
        problems.add(format!("global parameter '{}': not supported", g.name));
    }

    // Vhosts: those that exist, and those the import makes.
    let mut vhosts: BTreeSet<String> = broker.vhost_names().into_iter().collect();
    for v in &defs.vhosts {
        if v.name.is_empty() || v.name.len() > MAX_NAME_BYTES || v.name.chars().any(char::is_control) {
            problems
                .add(format!("vhost {:?}: names are 1 to {MAX_NAME_BYTES} bytes without control characters", v.name));
        } else if vhosts.insert(v.name.clone()) {
            plan.vhosts.push(v.name.clone());
        }
    }
    let vhost_of = |given: &Option<String>, what: &str, problems: &mut Problems| -> Option<String> {
        let v = match (forced_vhost, given) {
            (Some(f), _) => f.to_string(),
            (None, Some(v)) => v.clone(),
            (None, None) => {
                problems.add(format!("{what}: no vhost"));
                return None;
            }
        };
        if vhosts.contains(&v) {
            Some(v)
        } else {
            problems.add(format!("{what}: vhost '{v}' does not exist"));
            None
        }
    };

    // Exchanges: existing ones must be equivalent; new ones must be declarable.
    let mut new_exchanges: BTreeSet<(String, ShortString)> = BTreeSet::new();
    for x in defs.exchanges {
        let what = format!("exchange '{}'", x.name);
        let Some(vhost) = vhost_of(&x.vhost, &what, &mut problems) else { continue };
        let name = match short("exchange", &x.name) {
            Ok(n) => n,
            Err(e) => {
                problems.add(e);
                continue;
            }
        };
        let decl = ExchangeDeclare {
            name: name.clone(),
            kind: x.kind.clone(),
            passive: false,
            options: ExchangeOptions {
                durable: x.durable,
                auto_delete: x.auto_delete,
                internal: x.internal,
                arguments: json_table(&x.arguments),
            },
        };
        let existing = broker.vhost(&vhost).filter(|v| v.exchange(&x.name).is_some());
        if let Some(v) = existing {
            // A redeclare of an existing exchange changes nothing; it checks equivalence.
            if let Err(e) = v.declare_exchange(decl) {
                problems.add(format!("{what} in vhost '{vhost}': {}", core_error(e).reason));
            }
            continue;
        }
        if x.name.is_empty() || x.name.starts_with("amq.") {
            problems.add(format!("{what}: the default exchange and amq.* names are the broker's"));
        } else if ExchangeKind::parse(&x.kind).is_none() {
            problems.add(format!("{what}: invalid exchange type '{}'", x.kind));
        } else if new_exchanges.insert((vhost.clone(), name)) {
            plan.exchanges.push((vhost, decl));
        }
    }

    // Queues: the same, and never one a frontend or a bridge keeps for itself.
    let mut new_queues: BTreeSet<(String, ShortString)> = BTreeSet::new();
    for q in defs.queues {
        let what = format!("queue '{}'", q.name);
        let Some(vhost) = vhost_of(&q.vhost, &what, &mut problems) else { continue };
        let name = match short("queue", &q.name) {
            Ok(n) if !n.is_empty() => n,
            Ok(_) => {
                problems.add("a queue without a name");
                continue;
            }
            Err(e) => {
                problems.add(e);
                continue;
            }
        };
        if let Some(why) = broker.reserved_queue_refusal(&vhost, name.as_bytes(), QueueUse::Declare) {
            problems.add(format!("{what} in vhost '{vhost}': {why}"));
            continue;
        }
        let options = QueueOptions {
            durable: q.durable,
            exclusive: None,
            auto_delete: q.auto_delete,
            arguments: json_table(&q.arguments),
        };
        let decl = QueueDeclare { name: name.clone(), passive: false, options, connection: MANAGEMENT_CONNECTION };
        let existing = broker.vhost(&vhost).filter(|v| v.queue(&q.name).is_some());
        if let Some(v) = existing {
            if let Err(e) = v.declare_queue(decl, now) {
                problems.add(format!("{what} in vhost '{vhost}': {}", core_error(e).reason));
            }
            continue;
        }
        if name.as_bytes().starts_with(b"amq.") {
            problems.add(format!("{what}: the amq. prefix is reserved"));
            continue;
        }
        // Building the queue checks its arguments as a declare would.
        if let Err(e) = Queue::new(QueueName::from(name.clone()), decl.options.clone(), now) {
            problems.add(format!("{what} in vhost '{vhost}': {}", core_error(e).reason));
        } else if new_queues.insert((vhost.clone(), name)) {
            plan.queues.push((vhost, decl));
        }
    }

    // Bindings: both ends must exist or be made by this import.
    for b in defs.bindings {
        let what = format!("binding of '{}' to {} '{}'", b.source, b.destination_type, b.destination);
        let Some(vhost) = vhost_of(&b.vhost, &what, &mut problems) else { continue };
        let v = broker.vhost(&vhost);
        let exchange_there = |name: &str| {
            v.as_ref().is_some_and(|v| v.exchange(name).is_some())
                || new_exchanges.contains(&(vhost.clone(), ShortString::from(name)))
        };
        if b.source.is_empty() {
            // The default exchange's bindings are implicit; RabbitMQ does not export them.
            continue;
        }
        if !exchange_there(&b.source) {
            problems.add(format!("{what} in vhost '{vhost}': no exchange '{}'", b.source));
            continue;
        }
        let there = match b.destination_type.as_str() {
            "queue" => {
                if let Some(why) = broker.reserved_queue_refusal(&vhost, b.destination.as_bytes(), QueueUse::Declare) {
                    problems.add(format!("{what} in vhost '{vhost}': {why}"));
                    continue;
                }
                v.as_ref().is_some_and(|v| v.queue(&b.destination).is_some())
                    || new_queues.contains(&(vhost.clone(), ShortString::from(b.destination.as_str())))
            }
            "exchange" => exchange_there(&b.destination),
            other => {
                problems.add(format!("{what}: destination_type {other:?} is not queue or exchange"));
                continue;
            }
        };
        if !there {
            problems.add(format!("{what} in vhost '{vhost}': no {} '{}'", b.destination_type, b.destination));
        } else if let Err(e) = short("routing key", &b.routing_key) {
            problems.add(e);
        } else {
            plan.bindings.push((vhost, b));
        }
    }

    // Users (not for a per-vhost import, as RabbitMQ's holds none) and permissions.
    let mut user_names: BTreeSet<String> = BTreeSet::new();
    let mut skipped: Vec<String> = Vec::new();
    let current: BTreeMap<String, ferry_core::auth::User> =
        broker.auth().users().into_iter().map(|(u, _)| (u.name.clone(), u)).collect();
    let plain = defs.users.iter().filter(|u| u.password.is_some()).count();
    if plain > MAX_PLAIN_PASSWORDS {
        problems.add(format!(
            "{plain} users with a plain password: at most {MAX_PLAIN_PASSWORDS} per import (each takes an argon2id \
             hash to check or make); give password_hash for the others"
        ));
        defs.users.clear();
    }
    for u in defs.users {
        let Some(name) = u.name.clone() else {
            problems.add("a user without a name");
            continue;
        };
        match u.check(&name) {
            Err(e) => problems.add(format!("user '{name}': {e}")),
            // The server's file wins over anything else by that name.
            Ok(_) if broker.auth().is_configured(&name) => skipped.push(format!("user '{name}'")),
            Ok(spec) => match current.get(&name) {
                Some(existing) if spec.same_as(existing) => {}
                Some(_) => problems.add(format!("user '{name}' exists with another password or other tags")),
                None if user_names.insert(name) => plan.users.push(spec),
                None => {}
            },
        }
    }
    if broker.runtime_users().len() + plan.users.len() > crate::users::MAX_RUNTIME_USERS {
        problems.add(format!("more than {} users made through the API", crate::users::MAX_RUNTIME_USERS));
    }
    let access = broker.access();
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    for p in defs.permissions {
        let (Some(user), Some(given_vhost)) = (p.user.clone(), p.vhost.clone()) else {
            problems.add("a permission without user or vhost");
            continue;
        };
        let what = format!("permissions of '{user}' in vhost '{given_vhost}'");
        let Some(vhost) = vhost_of(&Some(given_vhost), &what, &mut problems) else { continue };
        if broker.permission_is_configured(&vhost, &user) {
            skipped.push(what);
            continue;
        }
        if !crate::users::may_hold_permissions(broker, &user) && !user_names.contains(&user) {
            problems.add(format!("{what}: no user '{user}'"));
            continue;
        }
        let wanted = match p.check(&vhost, &user) {
            Ok(w) => w,
            Err(e) => {
                problems.add(format!("{what}: {e}"));
                continue;
            }
        };
        match access.permissions.iter().find(|e| e.user == user && e.vhost == vhost) {
            Some(existing) if *existing == wanted => {}
            Some(_) => problems.add(format!("{what}: exist with other patterns")),
            None if seen.insert((vhost, user)) => plan.permissions.push(wanted),
            None => {}
        }
    }
    let mut seen_topics = BTreeSet::new();
    for t in defs.topic_permissions {
        let (Some(user), Some(given_vhost)) = (t.user.clone(), t.vhost.clone()) else {
            problems.add("a topic permission without user or vhost");
            continue;
        };
        let what = format!("topic permissions of '{user}' in vhost '{given_vhost}' on '{}'", t.exchange);
        let Some(vhost) = vhost_of(&Some(given_vhost), &what, &mut problems) else { continue };
        if broker.topic_permission_is_configured(&vhost, &user, &t.exchange) {
            skipped.push(what);
            continue;
        }
        if !crate::users::may_hold_permissions(broker, &user) && !user_names.contains(&user) {
            problems.add(format!("{what}: no user '{user}'"));
            continue;
        }
        let wanted = match t.check(&vhost, &user) {
            Ok(w) => w,
            Err(e) => {
                problems.add(format!("{what}: {e}"));
                continue;
            }
        };
        let same = |e: &&ferry_core::permissions::TopicPermissions| {
            e.user == user && e.vhost == vhost && e.exchange == wanted.exchange
        };
        match access.topic_permissions.iter().find(same) {
            Some(existing) if *existing == wanted => {}
            Some(_) => problems.add(format!("{what}: exist with other templates")),
            None if seen_topics.insert((vhost, user, wanted.exchange.clone())) => plan.topic_permissions.push(wanted),
            None => {}
        }
    }
    if broker.runtime_topic_permissions().len() + plan.topic_permissions.len()
        > crate::users::MAX_RUNTIME_TOPIC_PERMISSIONS
    {
        problems.add(format!(
            "more than {} topic permissions set through the API",
            crate::users::MAX_RUNTIME_TOPIC_PERMISSIONS
        ));
    }
    if broker.runtime_permissions().len() + plan.permissions.len() > crate::users::MAX_RUNTIME_PERMISSIONS {
        problems.add(format!("more than {} permissions set through the API", crate::users::MAX_RUNTIME_PERMISSIONS));
    }
    // Bridges made through the API, checked as `PUT /api/bridges/{name}` checks them.
    for table in defs.ferry_bridges {
        let Some(name) = table.get("name").and_then(Value::as_str).map(str::to_string) else {
            problems.add("a bridge without a name");
            continue;
        };
        if shared.bridges.is_configured(&name) {
            skipped.push(format!("bridge '{name}'"));
            continue;
        }
        let (config, table) = match ferry_bridge::runtime::parse(&name, table) {
            Ok(parsed) => parsed,
            Err(e) => {
                problems.add(e.to_string());
                continue;
            }
        };
        if !vhosts.contains(&config.vhost) {
            problems.add(format!("bridge '{name}': vhost '{}' does not exist", config.vhost));
            continue;
        }
        let exchange_there = broker.vhost(&config.vhost).is_some_and(|v| v.exchange(&config.exchange).is_some())
            || new_exchanges.contains(&(config.vhost.clone(), ShortString::from(config.exchange.as_str())));
        if !exchange_there {
            problems.add(format!("bridge '{name}': no exchange '{}' in vhost '{}'", config.exchange, config.vhost));
            continue;
        }
        match shared.bridges.runtime_table(&name) {
            Some(existing) if existing == table => {}
            Some(_) => problems.add(format!("bridge '{name}' exists with other settings")),
            None if plan.bridges.iter().all(|(n, _)| *n != name) => plan.bridges.push((name, table)),
            None => {}
        }
    }
    // Runtime parameters: dynamic shovels, checked as `PUT /api/parameters/shovel/…` checks them.
    let dynamic = shared.bridges.dynamic_shovels();
    for p in defs.parameters {
        let text = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_string);
        let (Some(component), Some(name)) = (text("component"), text("name")) else {
            problems.add("a runtime parameter without component or name");
            continue;
        };
        let what = format!("parameter '{name}' of component '{component}'");
        if component != crate::parameters::SHOVEL {
            problems.add(format!("{what}: Ferry's only runtime parameter component is 'shovel'"));
            continue;
        }
        let Some(vhost) = vhost_of(&text("vhost"), &what, &mut problems) else { continue };
        let Some(value) = p.get("value").cloned() else {
            problems.add(format!("{what}: no value"));
            continue;
        };
        let config = match ferry_bridge::shovel::dynamic::parse(&vhost, &name, &value) {
            Ok(c) => c,
            Err(e) => {
                problems.add(format!("shovel '{name}': {e}"));
                continue;
            }
        };
        if !vhosts.contains(&config.vhost) {
            problems.add(format!("shovel '{name}': vhost '{}' does not exist", config.vhost));
            continue;
        }
        if shared.bridges.is_configured(&name) {
            problems.add(format!("shovel '{name}': a bridge or shovel of the server's file has that name"));
            continue;
        }
        if plan.bridges.iter().any(|(n, _)| *n == name) || shared.bridges.runtime_table(&name).is_some() {
            problems.add(format!("shovel '{name}': a bridge made through the API has that name"));
            continue;
        }
        match dynamic.iter().find(|d| d.name == name) {
            Some(d) if d.vhost == vhost && d.value == value => {}
            Some(d) if d.vhost == vhost => problems.add(format!("shovel '{name}' exists with other settings")),
            Some(d) => problems.add(format!("shovel '{name}': a shovel of vhost '{}' has that name", d.vhost)),
            None if plan.shovels.iter().all(|(_, n, _)| *n != name) => plan.shovels.push((vhost, name, value)),
            None => problems.add(format!("shovel '{name}': given twice")),
        }
    }
    if dynamic.len() + plan.shovels.len() > ferry_bridge::shovel::runtime::MAX_DYNAMIC_SHOVELS {
        problems.add(format!(
            "more than {} shovels made through the API",
            ferry_bridge::shovel::runtime::MAX_DYNAMIC_SHOVELS
        ));
    }
    problems.into_result()?;
    if !skipped.is_empty() {
        tracing::info!("definitions import: left as the server's file has them: {}", skipped.join(", "));
    }
    Ok(plan)
}

/// Makes what `plan` holds; what fails now (a race with a client) is reported.
/// The store commit to wait for, and the bridges and shovels to make then (they start
/// asynchronously).
type Applied = (ferry_core::store::Commit, Vec<(String, Value)>, Vec<(String, String, Value)>);

fn apply(shared: &Shared, plan: Plan) -> Result<Applied, ApiError> {
    let broker = &shared.broker;
    let now = now_millis();
    let mut problems = Problems::default();
    for v in &plan.vhosts {
        broker.add_vhost(v);
    }
    let vhost = |name: &str| broker.vhost(name).ok_or_else(ApiError::not_found);
    for (v, decl) in plan.exchanges {
        if let Err(e) = vhost(&v)?.declare_exchange(decl) {
            problems.add(core_error(e).reason);
        }
    }
    for (v, decl) in plan.queues {
        if let Err(e) = vhost(&v)?.declare_queue(decl, now) {
            problems.add(core_error(e).reason);
        }
    }
    for (v, b) in plan.bindings {
        let key = BindingKey::new(b.routing_key.as_str()).with_arguments(json_table(&b.arguments));
        let (source, destination) = (ShortString::from(b.source.as_str()), ShortString::from(b.destination.as_str()));
        let vh = vhost(&v)?;
        let r = if b.destination_type == "queue" {
            vh.bind_queue(&destination, &source, key, MANAGEMENT_CONNECTION)
        } else {
            vh.bind_exchange(&destination, &source, key)
        };
        if let Err(e) = r {
            problems.add(core_error(e).reason);
        }
    }
    let users = plan.users.into_iter().map(UserSpec::finish).collect();
    let mut commit = broker.put_runtime(users, plan.permissions);
    for t in plan.topic_permissions {
        commit = commit.join(broker.put_runtime_topic_permission(t));
    }
    if !problems.0.is_empty() {
        let reason = problems.0.join("; ");
        return Err(ApiError::bad_request(format!("definitions imported in part: {reason}")));
    }
    Ok((commit, plan.bridges, plan.shovels))
}

async fn import(state: AppState, caller: Caller, body: RawBody, vhost: Option<String>) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let body = crate::users::body_of(body)?;
    let mut defs: Definitions =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("definitions: {e}")))?;
    if let Some(v) = &vhost {
        state.shared.broker.vhost(v).ok_or_else(ApiError::not_found)?;
        // A per-vhost file holds no users, vhosts or permissions (RabbitMQ ignores them).
        defs.users.clear();
        defs.vhosts.clear();
        defs.permissions.clear();
        defs.topic_permissions.clear();
        defs.ferry_bridges.clear();
    }
    let (vhosts, users) = (defs.vhosts.len(), defs.users.len());
    let (queues, exchanges, bindings) = (defs.queues.len(), defs.exchanges.len(), defs.bindings.len());
    // Planning redeclares and applying hashes passwords: both off the async workers.
    let (commit, bridges, shovels) =
        crate::api::render(&state, move |shared| plan(shared, defs, vhost.as_deref()).and_then(|p| apply(shared, p)))
            .await??;
    committed(commit).await?;
    for (name, table) in bridges {
        state
            .shared
            .bridges
            .put_bridge(&name, table)
            .await
            .map_err(|e| ApiError::bad_request(format!("definitions imported in part: bridge '{name}': {e}")))?;
    }
    for (vhost, name, value) in shovels {
        state
            .shared
            .bridges
            .put_shovel(&vhost, &name, value)
            .await
            .map_err(|e| ApiError::bad_request(format!("definitions imported in part: shovel '{name}': {e}")))?;
    }
    committed(state.shared.broker.store().flush()).await?;
    tracing::info!(
        user = %caller.user,
        "management: definitions imported ({vhosts} vhosts, {users} users, {exchanges} exchanges, {queues} queues, {bindings} bindings)"
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn import_all(State(state): State<AppState>, caller: Caller, body: RawBody) -> Result<Response, ApiError> {
    import(state, caller, body, None).await
}

async fn import_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    body: RawBody,
) -> Result<Response, ApiError> {
    import(state, caller, body, Some(vhost)).await
}

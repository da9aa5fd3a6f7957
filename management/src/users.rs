//! Users and vhost permissions made at run time, in RabbitMQ's shapes:
//! `PUT|DELETE /api/users/{name}`, `PUT|DELETE /api/permissions/{vhost}/{user}` (administrator
//! only). They are the broker's run-time layer (`ferry_core::runtime`): in force at once for
//! MQTT, AMQP and HTTP logins, committed to the store before the answer, merged under the
//! configuration's `[[users]]` and `[[permissions]]`, which the API does not change.
//!
//! The body parsing here is shared with the definitions import (`definitions`), so a user or a
//! permission is accepted or refused the same way through either.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::Router;
use ferry_core::auth::{PasswordHash, User};
use ferry_core::permissions::{Pattern, TopicPermissions, VhostPermissions};
use ferry_core::store::Commit;
use serde::Deserialize;
use serde_json::Value;

use crate::api::{render, AppState};
use crate::error::ApiError;
use crate::login::Caller;

/// Run-time users kept at most (each costs a few hundred bytes and a store record).
pub const MAX_RUNTIME_USERS: usize = 10_000;
/// Run-time permissions kept at most.
pub const MAX_RUNTIME_PERMISSIONS: usize = 10_000;
/// The longest user name, tag or vhost name accepted.
pub const MAX_NAME_BYTES: usize = 255;
/// Tags per user at most.
pub const MAX_TAGS: usize = 32;

/// RabbitMQ's names of its hash formats, and Ferry's for its own (`hashing_algorithm`).
pub const RABBIT_SHA256: &str = "rabbit_password_hashing_sha256";
pub const RABBIT_SHA512: &str = "rabbit_password_hashing_sha512";
pub const RABBIT_MD5: &str = "rabbit_password_hashing_md5";
pub const FERRY_ARGON2ID: &str = "ferry_password_hashing_argon2id";
pub const FERRY_MOSQUITTO: &str = "ferry_password_hashing_mosquitto_pbkdf2_sha512";

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/users/{name}", put(put_user).delete(delete_user))
        .route("/api/permissions/{vhost}/{user}", put(put_permission).delete(delete_permission))
        .route("/api/topic-permissions", axum::routing::get(topic_permissions_all))
        .route(
            "/api/topic-permissions/{vhost}/{user}",
            axum::routing::get(topic_permissions_of).put(put_topic_permission).delete(delete_topic_permissions),
        )
}

/// A user as RabbitMQ's API and definitions carry it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct UserBody {
    /// In a definitions file; the path gives it to `PUT /api/users/{name}`.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub hashing_algorithm: Option<String>,
    /// `"administrator,monitoring"` or `["administrator", "monitoring"]`.
    #[serde(default)]
    pub tags: Option<Value>,
}

/// A user's hash as RabbitMQ's definitions carry it: `(password_hash, hashing_algorithm)`.
pub(crate) fn hash_for_export(hash: &PasswordHash) -> (String, &'static str) {
    let stored = hash.to_stored();
    match hash {
        PasswordHash::RabbitSha256 { .. } => {
            (stored.trim_start_matches(ferry_core::auth::RABBITMQ_SHA256_PREFIX).to_string(), RABBIT_SHA256)
        }
        PasswordHash::RabbitSha512 { .. } => {
            (stored.trim_start_matches(ferry_core::auth::RABBITMQ_SHA512_PREFIX).to_string(), RABBIT_SHA512)
        }
        PasswordHash::Argon2id(_) => (stored, FERRY_ARGON2ID),
        PasswordHash::Pbkdf2Sha512 { .. } => (stored, FERRY_MOSQUITTO),
    }
}

/// `password_hash` under `hashing_algorithm` → a hash Ferry verifies.
fn import_hash(hash: &str, algorithm: Option<&str>) -> Result<PasswordHash, String> {
    if hash.is_empty() {
        return Err("an empty password_hash (a user without a password) is not supported: Ferry's users log in \
                    with a password"
            .into());
    }
    let text = match algorithm {
        Some(RABBIT_SHA256) => format!("{}{hash}", ferry_core::auth::RABBITMQ_SHA256_PREFIX),
        Some(RABBIT_SHA512) => format!("{}{hash}", ferry_core::auth::RABBITMQ_SHA512_PREFIX),
        Some(RABBIT_MD5) => {
            return Err(format!(
                "{RABBIT_MD5} hashes (unsalted MD5) are too weak to accept; set the password again, or export from \
                 a RabbitMQ that hashes with SHA-256"
            ))
        }
        // Ferry's own names, or none: the hash says its format (`$argon2id$`, `$7$`, a prefix).
        Some(FERRY_ARGON2ID) | Some(FERRY_MOSQUITTO) | None => hash.to_string(),
        Some(other) => {
            return Err(format!(
                "hashing_algorithm {other:?} is not known; expected {RABBIT_SHA256}, {RABBIT_SHA512}, \
                 {FERRY_ARGON2ID} or {FERRY_MOSQUITTO}"
            ))
        }
    };
    PasswordHash::parse(&text)
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!("{what} names are 1 to {MAX_NAME_BYTES} bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{what} name {name:?} holds a control character"));
    }
    Ok(())
}

fn tags(v: Option<&Value>) -> Result<Vec<String>, String> {
    let list: Vec<String> = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.split(',').map(|t| t.trim().to_string()).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(|s| s.trim().to_string()).ok_or_else(|| format!("tags: {t} is not a string")))
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(format!("tags: expected a comma-separated string or a list, not {other}")),
    };
    let mut out: Vec<String> = Vec::new();
    for t in list.into_iter().filter(|t| !t.is_empty()) {
        check_name("tag", &t)?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.len() > MAX_TAGS {
        return Err(format!("at most {MAX_TAGS} tags"));
    }
    Ok(out)
}

/// What a user body asks for, checked; a plain `password` is hashed later ([`UserSpec::finish`])
/// because argon2id is slow.
#[derive(Debug, Clone)]
pub(crate) struct UserSpec {
    pub name: String,
    pub secret: Secret,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) enum Secret {
    Hash(PasswordHash),
    Password(String),
}

impl UserBody {
    pub fn check(self, name: &str) -> Result<UserSpec, String> {
        check_name("user", name)?;
        let secret = match (self.password, self.password_hash) {
            (Some(_), Some(_)) => return Err("give password or password_hash, not both".into()),
            (Some(p), None) if p.is_empty() => return Err("an empty password is not accepted".into()),
            (Some(p), None) => Secret::Password(p),
            (None, Some(h)) => Secret::Hash(import_hash(&h, self.hashing_algorithm.as_deref())?),
            (None, None) => return Err("password or password_hash is required".into()),
        };
        Ok(UserSpec { name: name.to_string(), secret, tags: tags(self.tags.as_ref())? })
    }
}

impl UserSpec {
    /// The user, hashing a plain password with argon2id (tens of milliseconds: call it off the
    /// async workers).
    pub fn finish(self) -> User {
        let hash = match self.secret {
            Secret::Hash(h) => h,
            Secret::Password(p) => PasswordHash::parse(&PasswordHash::argon2id(p.as_bytes()))
                .expect("a hash made by PasswordHash::argon2id parses"),
        };
        User { name: self.name, hash, tags: self.tags }
    }

    /// Whether `existing` is what this asks for (a plain password matches if it verifies).
    pub fn same_as(&self, existing: &User) -> bool {
        let same_secret = match &self.secret {
            Secret::Hash(h) => h.to_stored() == existing.hash.to_stored(),
            Secret::Password(p) => existing.hash.verify(p.as_bytes()),
        };
        same_secret && self.tags == existing.tags
    }
}

/// `configure`, `write`, `read` as RabbitMQ's API and definitions carry them.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PermissionBody {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub vhost: Option<String>,
    pub configure: String,
    pub write: String,
    pub read: String,
}

impl PermissionBody {
    pub fn check(&self, vhost: &str, user: &str) -> Result<VhostPermissions, String> {
        let pattern = |what: &str, s: &str| Pattern::new(s).map_err(|e| format!("{what} {s:?}: {e}"));
        Ok(VhostPermissions {
            user: user.to_string(),
            vhost: vhost.to_string(),
            configure: pattern("configure", &self.configure)?,
            write: pattern("write", &self.write)?,
            read: pattern("read", &self.read)?,
        })
    }
}

/// A request body, or RabbitMQ's JSON error when it could not be read (over the 1 MiB limit:
/// `413`).
pub(crate) fn body_of(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    body.map_err(|r| ApiError {
        status: r.status(),
        error: if r.status() == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "bad_request" },
        reason: r.body_text(),
    })
}

/// Waits until `commit` is durable: the answer is sent only then.
pub(crate) async fn committed(commit: Commit) -> Result<(), ApiError> {
    commit.wait().await.map_err(|e| ApiError::unavailable(format!("not stored: {e}")))
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("body: {e}")))
}

fn configured_refusal(name: &str) -> ApiError {
    ApiError::bad_request(format!(
        "user '{name}' is configured in the server's file ([[users]]); change it there and reload"
    ))
}

/// `201` when made, `204` when replaced (RabbitMQ's answers).
async fn put_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let spec = parse_body::<UserBody>(&body_of(body)?)?.check(&name).map_err(ApiError::bad_request)?;
    let broker = &state.shared.broker;
    if broker.auth().is_configured(&name) {
        return Err(configured_refusal(&name));
    }
    let existing = broker.runtime_users();
    let exists = existing.iter().any(|u| u.name == name);
    if !exists && existing.len() >= MAX_RUNTIME_USERS {
        return Err(ApiError::bad_request(format!("at most {MAX_RUNTIME_USERS} users can be made through the API")));
    }
    let user = render(&state, move |_| spec.finish()).await?;
    tracing::info!(user = %caller.user, "management: user {name:?} {}", if exists { "changed" } else { "added" });
    committed(broker.put_runtime(vec![user], Vec::new())).await?;
    Ok(if exists { StatusCode::NO_CONTENT } else { StatusCode::CREATED }.into_response())
}

/// Deletes a run-time user with its permissions and closes its connections, as RabbitMQ does.
async fn delete_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let broker = &state.shared.broker;
    if broker.auth().is_configured(&name) {
        return Err(configured_refusal(&name));
    }
    let commit = broker.delete_runtime_user(&name).ok_or_else(ApiError::not_found)?;
    let reason = format!("user '{name}' was deleted");
    let connections = broker.connections();
    let mut closed = 0;
    for c in connections.list().into_iter().filter(|c| c.user.as_deref() == Some(name.as_str())) {
        closed += usize::from(connections.close(c.id, reason.clone()));
    }
    tracing::info!(user = %caller.user, "management: user {name:?} deleted, {closed} connection(s) closed");
    committed(commit).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Whether permissions may name `name`: a user (configured or made at run time), or `guest`
/// or `anonymous`, as `[[permissions]]` in the file may.
pub(crate) fn may_hold_permissions(broker: &ferry_core::Broker, name: &str) -> bool {
    broker.auth().account(name).is_some()
        || name == ferry_core::auth::GUEST_USER
        || name == ferry_core::auth::ANONYMOUS_USER
}

async fn put_permission(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let broker = &state.shared.broker;
    broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let permission =
        parse_body::<PermissionBody>(&body_of(body)?)?.check(&vhost, &user).map_err(ApiError::bad_request)?;
    if !may_hold_permissions(broker, &user) {
        return Err(ApiError::bad_request(format!("no user '{user}'")));
    }
    if broker.permission_is_configured(&vhost, &user) {
        return Err(ApiError::bad_request(format!(
            "the permissions of user '{user}' in vhost '{vhost}' are configured in the server's file \
             ([[permissions]]); change them there and reload"
        )));
    }
    let existing = broker.runtime_permissions();
    let exists = existing.iter().any(|p| p.vhost == vhost && p.user == user);
    if !exists && existing.len() >= MAX_RUNTIME_PERMISSIONS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_RUNTIME_PERMISSIONS} permissions can be set through the API"
        )));
    }
    tracing::info!(user = %caller.user, "management: permissions of {user:?} in vhost {vhost:?} set");
    committed(broker.put_runtime(Vec::new(), vec![permission])).await?;
    Ok(if exists { StatusCode::NO_CONTENT } else { StatusCode::CREATED }.into_response())
}

async fn delete_permission(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let broker = &state.shared.broker;
    if broker.permission_is_configured(&vhost, &user) {
        return Err(ApiError::bad_request(format!(
            "the permissions of user '{user}' in vhost '{vhost}' are configured in the server's file \
             ([[permissions]]); change them there and reload"
        )));
    }
    let commit = broker.delete_runtime_permission(&vhost, &user).ok_or_else(ApiError::not_found)?;
    committed(commit).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- topic permissions ---------------------------------------------------------------------

/// A topic permission as RabbitMQ's API and definitions carry it: the exchange and the `write`
/// and `read` templates (`{username}` and `{vhost}` filled per connection).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct TopicPermissionBody {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub vhost: Option<String>,
    pub exchange: String,
    pub write: String,
    pub read: String,
}

impl TopicPermissionBody {
    pub fn check(&self, vhost: &str, user: &str) -> Result<TopicPermissions, String> {
        if self.exchange.is_empty() {
            return Err("exchange: must name a topic exchange".into());
        }
        for (what, t) in [("write", &self.write), ("read", &self.read)] {
            TopicPermissions::validate(t).map_err(|e| format!("{what} {t:?}: {e}"))?;
        }
        Ok(TopicPermissions {
            user: user.to_string(),
            vhost: vhost.to_string(),
            exchange: self.exchange.clone(),
            write: self.write.clone(),
            read: self.read.clone(),
        })
    }
}

/// Run-time topic permissions at most (each is a regex pair compiled per connection).
pub const MAX_RUNTIME_TOPIC_PERMISSIONS: usize = 10_000;

fn topic_permission_json(t: &TopicPermissions) -> Value {
    serde_json::json!({"user": t.user, "vhost": t.vhost, "exchange": t.exchange, "write": t.write, "read": t.read})
}

/// The topic permissions in force (the file's and the run-time ones), `keep` choosing.
fn topic_permission_list(state: &AppState, keep: impl Fn(&TopicPermissions) -> bool) -> Vec<Value> {
    let access = state.shared.broker.access();
    let mut all: Vec<&TopicPermissions> = access.topic_permissions.iter().filter(|t| keep(t)).collect();
    all.sort_by(|a, b| (&a.user, &a.vhost, &a.exchange).cmp(&(&b.user, &b.vhost, &b.exchange)));
    all.into_iter().map(topic_permission_json).collect()
}

async fn topic_permissions_all(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    if !caller.sees_all() {
        return Err(ApiError::not_allowed("Not administrator user"));
    }
    Ok(axum::Json(topic_permission_list(&state, |_| true)).into_response())
}

async fn topic_permissions_of(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    if !caller.sees_all() {
        return Err(ApiError::not_allowed("Not administrator user"));
    }
    let list = topic_permission_list(&state, |t| t.vhost == vhost && t.user == user);
    if list.is_empty() {
        return Err(ApiError::not_found());
    }
    Ok(axum::Json(list).into_response())
}

/// RabbitMQ's `PUT /api/topic-permissions/{vhost}/{user}`: one exchange's templates, added or
/// replaced.
async fn put_topic_permission(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let broker = &state.shared.broker;
    broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let t = parse_body::<TopicPermissionBody>(&body_of(body)?)?.check(&vhost, &user).map_err(ApiError::bad_request)?;
    if !may_hold_permissions(broker, &user) {
        return Err(ApiError::bad_request(format!("no user '{user}'")));
    }
    if broker.topic_permission_is_configured(&vhost, &user, &t.exchange) {
        return Err(ApiError::bad_request(format!(
            "the topic permissions of user '{user}' in vhost '{vhost}' on exchange '{}' are configured in the \
             server's file ([[topic_permissions]]); change them there and reload",
            t.exchange
        )));
    }
    let existing = broker.runtime_topic_permissions();
    let exists = existing.iter().any(|e| e.vhost == vhost && e.user == user && e.exchange == t.exchange);
    if !exists && existing.len() >= MAX_RUNTIME_TOPIC_PERMISSIONS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_RUNTIME_TOPIC_PERMISSIONS} topic permissions can be set through the API"
        )));
    }
    tracing::info!(user = %caller.user, "management: topic permissions of {user:?} in vhost {vhost:?} on {:?} set", t.exchange);
    committed(broker.put_runtime_topic_permission(t)).await?;
    Ok(if exists { StatusCode::NO_CONTENT } else { StatusCode::CREATED }.into_response())
}

/// RabbitMQ's `DELETE /api/topic-permissions/{vhost}/{user}`: every exchange's (the run-time
/// ones; the file's stay the file's).
async fn delete_topic_permissions(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let commit = state.shared.broker.delete_runtime_topic_permissions(&vhost, &user).ok_or_else(ApiError::not_found)?;
    committed(commit).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> UserBody {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn tags_come_as_a_string_or_a_list() {
        let spec =
            body(serde_json::json!({"password": "p", "tags": "administrator, monitoring,,"})).check("u").unwrap();
        assert_eq!(spec.tags, vec!["administrator", "monitoring"]);
        let spec = body(serde_json::json!({"password": "p", "tags": ["management"]})).check("u").unwrap();
        assert_eq!(spec.tags, vec!["management"]);
        assert!(body(serde_json::json!({"password": "p", "tags": 3})).check("u").is_err());
    }

    #[test]
    fn rabbitmq_hashes_import_and_verify_and_export_as_they_came() {
        // RabbitMQ's documented example: the password test12.
        let h = "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR";
        let spec =
            body(serde_json::json!({"password_hash": h, "hashing_algorithm": RABBIT_SHA256})).check("u").unwrap();
        let user = spec.finish();
        assert!(user.hash.verify(b"test12"));
        assert_eq!(hash_for_export(&user.hash), (h.to_string(), RABBIT_SHA256));
        let md5 = body(serde_json::json!({"password_hash": h, "hashing_algorithm": RABBIT_MD5})).check("u");
        assert!(md5.unwrap_err().contains("too weak"));
        let unknown = body(serde_json::json!({"password_hash": h, "hashing_algorithm": "x"})).check("u");
        assert!(unknown.unwrap_err().contains("not known"));
        // Without an algorithm the hash must say its format.
        assert!(body(serde_json::json!({"password_hash": h})).check("u").is_err());
        assert!(body(serde_json::json!({"password_hash": ""})).check("u").is_err());
    }

    #[test]
    fn a_user_needs_exactly_one_secret_and_a_sane_name() {
        assert!(body(serde_json::json!({})).check("u").is_err());
        assert!(body(serde_json::json!({"password": "p", "password_hash": "x"})).check("u").is_err());
        assert!(body(serde_json::json!({"password": ""})).check("u").is_err());
        assert!(body(serde_json::json!({"password": "p"})).check("").is_err());
        assert!(body(serde_json::json!({"password": "p"})).check("a\nb").is_err());
        assert!(body(serde_json::json!({"password": "p"})).check(&"x".repeat(256)).is_err());
        let spec = body(serde_json::json!({"password": "p"})).check("u").unwrap();
        let user = spec.clone().finish();
        assert!(spec.same_as(&user));
    }

    #[test]
    fn bad_permission_patterns_are_refused_with_the_field() {
        let p: PermissionBody =
            serde_json::from_value(serde_json::json!({"configure": "(", "write": "", "read": ".*"})).unwrap();
        assert!(p.check("/", "u").unwrap_err().starts_with("configure"));
    }
}

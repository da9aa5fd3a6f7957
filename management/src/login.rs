//! HTTP Basic logins, RabbitMQ's user tags, and the cache that spares a scraper an argon2
//! verification per request.
//!
//! A request's credentials go to the broker's [`Authenticator`](ferry_core::auth::Authenticator)
//! like a protocol login: on its checking threads, behind the per-address throttle, with the
//! listener's policy (guest / guest on loopback only). A success is remembered for [`CACHE_TTL`]
//! under SHA-256(process key ‖ user ‖ password), where the process key is 32 random bytes drawn
//! at start: the cache holds neither passwords nor anything a password could be guessed from
//! offline. A cached answer counts only while the user still has the same hash (a reload that
//! changes or removes the user ends it at once), and the cache holds at most [`CACHE_MAX`]
//! entries. Failures are never cached (the throttle deals with them).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ferry_core::auth::{AuthError, AuthPolicy, PasswordHash, GUEST_USER};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

use crate::api::AppState;
use crate::error::ApiError;
use crate::http::Peer;

/// How long a successful login is remembered.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// Logins remembered at most; when full, expired ones go, and if none has expired, all.
pub const CACHE_MAX: usize = 1024;

/// RabbitMQ's tags that open the management API, most powerful first.
pub const ADMINISTRATOR: &str = "administrator";
pub const MONITORING: &str = "monitoring";
pub const POLICYMAKER: &str = "policymaker";
pub const MANAGEMENT: &str = "management";

/// What a caller may see and do, from its tags (RabbitMQ's rules: each tag includes the ones
/// below it; `policymaker` sees as `management` does here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Role {
    /// Its own vhosts (those its permissions name) and its own connections.
    Management,
    /// Everything, read-only.
    Monitoring,
    /// Everything, and may close, delete and purge.
    Administrator,
}

impl Role {
    pub fn of(tags: &[String]) -> Option<Role> {
        let has = |t: &str| tags.iter().any(|x| x == t);
        if has(ADMINISTRATOR) {
            Some(Role::Administrator)
        } else if has(MONITORING) {
            Some(Role::Monitoring)
        } else if has(MANAGEMENT) || has(POLICYMAKER) {
            Some(Role::Management)
        } else {
            None
        }
    }
}

/// Who sent a request, logged in.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub user: String,
    pub tags: Arc<[String]>,
    pub role: Role,
}

impl Caller {
    /// Whether the caller sees every vhost and connection.
    pub fn sees_all(&self) -> bool {
        self.role >= Role::Monitoring
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.role == Role::Administrator {
            Ok(())
        } else {
            Err(ApiError::not_allowed("Not administrator user"))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized("Login failed: no credentials (HTTP Basic)"));
        };
        let (user, password) = basic(value.as_bytes()).ok_or_else(|| ApiError::unauthorized("Login failed"))?;
        let peer = parts.extensions.get::<Peer>().map(|p| p.0.ip()).ok_or_else(|| ApiError::internal("no peer"))?;
        state.shared.logins.login(&state.shared.broker, &state.settings.auth, peer, user, &password).await
    }
}

/// `Basic base64(user:password)` → the user and the password; `None` if it is not that.
fn basic(value: &[u8]) -> Option<(String, Vec<u8>)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = BASE64.decode(encoded.trim()).ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    if user.is_empty() {
        return None;
    }
    Some((user, decoded[colon + 1..].to_vec()))
}

#[derive(Debug)]
struct Cached {
    user: String,
    /// The user's hash when the login was checked; `None`: the loopback guest.
    hash: Option<Arc<PasswordHash>>,
    until: Instant,
}

/// Successful logins, by keyed digest (see the module).
#[derive(Debug)]
pub(crate) struct LoginCache {
    key: [u8; 32],
    entries: Mutex<HashMap<[u8; 32], Cached>>,
}

impl LoginCache {
    pub fn new() -> LoginCache {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        LoginCache { key, entries: Mutex::new(HashMap::new()) }
    }

    fn digest(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        // Lengths first, so that ("ab", "c") and ("a", "bc") differ.
        h.update((user.len() as u64).to_be_bytes());
        h.update(user.as_bytes());
        h.update(password);
        h.finalize().into()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Cached>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn login(
        &self,
        broker: &ferry_core::Broker,
        policy: &AuthPolicy,
        peer: IpAddr,
        user: String,
        password: &[u8],
    ) -> Result<Caller, ApiError> {
        let digest = self.digest(&user, password);
        let now = Instant::now();
        let cached = self.entries().get(&digest).filter(|c| c.until > now && c.user == user).map(|c| c.hash.clone());
        let hash = match cached {
            Some(hash) if still_valid(broker, policy, &user, hash.as_ref()) => hash,
            _ => {
                let identity = broker.auth().login(policy, peer, Some(&user), Some(password)).await.map_err(refusal)?;
                let hash = broker.auth().account(&identity.user).map(|a| a.hash);
                let mut entries = self.entries();
                if entries.len() >= CACHE_MAX {
                    entries.retain(|_, c| c.until > now);
                    if entries.len() >= CACHE_MAX {
                        entries.clear();
                    }
                }
                entries.insert(digest, Cached { user: user.clone(), hash: hash.clone(), until: now + CACHE_TTL });
                hash
            }
        };
        let tags: Arc<[String]> = match hash {
            Some(_) => broker.auth().account(&user).map(|a| a.tags).unwrap_or_else(|| Arc::from(Vec::new())),
            // RabbitMQ's default guest is an administrator.
            None => Arc::from(vec![ADMINISTRATOR.to_string()]),
        };
        let role = Role::of(&tags).ok_or_else(|| ApiError::not_allowed("Not management user"))?;
        Ok(Caller { user, tags, role })
    }
}

/// Whether a cached login still stands: the same user with the same hash, or the loopback
/// guest while no user is called guest.
fn still_valid(broker: &ferry_core::Broker, policy: &AuthPolicy, user: &str, hash: Option<&Arc<PasswordHash>>) -> bool {
    let account = broker.auth().account(user);
    match (hash, account) {
        (Some(h), Some(a)) => Arc::ptr_eq(h, &a.hash),
        (None, None) => policy.guest && user == GUEST_USER,
        _ => false,
    }
}

fn refusal(e: AuthError) -> ApiError {
    match e {
        AuthError::BadCredentials | AuthError::NotAllowed(_) => ApiError::unauthorized("Login failed"),
        AuthError::Busy => ApiError::unavailable("too many logins being checked; try again"),
        AuthError::Throttled(why) => ApiError::too_many(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_parsed() {
        let v = format!("Basic {}", BASE64.encode("alice:s3:cret"));
        assert_eq!(basic(v.as_bytes()), Some(("alice".to_string(), b"s3:cret".to_vec())));
        assert_eq!(basic(b"Bearer abc"), None);
        assert_eq!(basic(b"Basic !!!"), None);
        let no_colon = format!("Basic {}", BASE64.encode("alice"));
        assert_eq!(basic(no_colon.as_bytes()), None);
    }

    #[test]
    fn tags_give_the_strongest_role() {
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(Role::of(&tags(&["management", "administrator"])), Some(Role::Administrator));
        assert_eq!(Role::of(&tags(&["monitoring"])), Some(Role::Monitoring));
        assert_eq!(Role::of(&tags(&["policymaker"])), Some(Role::Management));
        assert_eq!(Role::of(&tags(&["impersonator"])), None);
    }

    #[test]
    fn the_digest_depends_on_the_key_the_user_and_the_password() {
        let (a, b) = (LoginCache::new(), LoginCache::new());
        assert_ne!(a.digest("u", b"p"), b.digest("u", b"p"), "per-process key");
        assert_ne!(a.digest("ab", b"c"), a.digest("a", b"bc"));
        assert_eq!(a.digest("u", b"p"), a.digest("u", b"p"));
    }
}

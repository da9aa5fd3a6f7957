//! Run-time definitions: the users and vhost permissions an operator makes through the
//! management API (`PUT /api/users/{name}`, `PUT /api/permissions/{vhost}/{user}`, a definitions
//! import), kept beside the configuration's and persisted in the store as settings
//! ([`StoreOp::PutSetting`]) so that they come back after a restart.
//!
//! The configuration's `[[users]]` and `[[permissions]]` stay the server's: a reload replaces
//! them and leaves these alone. Where both name the same user (or user and vhost), the
//! configuration's wins ([`Authenticator`](crate::auth::Authenticator) and
//! [`Broker::set_access`](crate::Broker::set_access) merge the layers).
//!
//! Other services keep their own run-time definitions under their own key prefix through
//! [`RuntimeDefinitions::settings`] and [`Broker::put_setting`](crate::Broker::put_setting).
//!
//! Stored encodings (the store's [`codec`](crate::store::codec) primitives, a version byte
//! first): a user is `1, name, hash (as `PasswordHash::parse` reads it), tag count, tags`; a
//! permission is `1, user, vhost, configure, write, read`; a topic permission is
//! `1, user, vhost, exchange, write, read` (the templates as given).

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::auth::{PasswordHash, User};
use crate::permissions::{Pattern, TopicPermissions, VhostPermissions};
use crate::store::codec::{Reader, Writer};
use crate::store::StoreError;

/// Key prefix of a run-time user: `user/<name>`.
pub const USER_PREFIX: &str = "user/";
/// Key prefix of a run-time permission: `permission/<vhost>/<user>` (each part length-prefixed,
/// see [`permission_key`]).
pub const PERMISSION_PREFIX: &str = "permission/";
/// Key prefix of a run-time topic permission: `topic-permission/<vhost>/<user>/<exchange>`
/// (length-prefixed, see [`topic_permission_key`]).
pub const TOPIC_PERMISSION_PREFIX: &str = "topic-permission/";

const VERSION: u8 = 1;

/// What the broker holds of the run-time layer.
#[derive(Debug, Default)]
pub struct RuntimeDefinitions {
    pub users: BTreeMap<String, User>,
    /// By (vhost, user).
    pub permissions: BTreeMap<(String, String), VhostPermissions>,
    /// By (vhost, user, exchange).
    pub topic_permissions: BTreeMap<(String, String, String), TopicPermissions>,
    /// Everything else stored as a setting, by key (other services' definitions).
    pub settings: BTreeMap<String, Bytes>,
}

impl RuntimeDefinitions {
    /// Reads back what the store held. A user or permission that no longer decodes is left out
    /// with a warning rather than keeping the broker from starting.
    pub fn restore(settings: Vec<(String, Bytes)>) -> RuntimeDefinitions {
        let mut defs = RuntimeDefinitions::default();
        for (key, value) in settings {
            if key.starts_with(USER_PREFIX) {
                match decode_user(&value) {
                    Ok(u) => {
                        defs.users.insert(u.name.clone(), u);
                    }
                    Err(e) => tracing::warn!("stored run-time user {key:?} left out: {e}"),
                }
            } else if key.starts_with(TOPIC_PERMISSION_PREFIX) {
                match decode_topic_permission(&value) {
                    Ok(t) => {
                        defs.topic_permissions.insert((t.vhost.clone(), t.user.clone(), t.exchange.clone()), t);
                    }
                    Err(e) => tracing::warn!("stored run-time topic permission {key:?} left out: {e}"),
                }
            } else if key.starts_with(PERMISSION_PREFIX) {
                match decode_permission(&value) {
                    Ok(p) => {
                        defs.permissions.insert((p.vhost.clone(), p.user.clone()), p);
                    }
                    Err(e) => tracing::warn!("stored run-time permission {key:?} left out: {e}"),
                }
            } else {
                defs.settings.insert(key, value);
            }
        }
        defs
    }
}

pub fn user_key(name: &str) -> String {
    format!("{USER_PREFIX}{name}")
}

/// Unambiguous whatever `/` the names hold: the vhost's length comes first.
pub fn permission_key(vhost: &str, user: &str) -> String {
    format!("{PERMISSION_PREFIX}{}/{vhost}/{user}", vhost.len())
}

/// Unambiguous whatever `/` the names hold: the vhost's and the user's lengths come first.
pub fn topic_permission_key(vhost: &str, user: &str, exchange: &str) -> String {
    format!("{TOPIC_PERMISSION_PREFIX}{}/{}/{vhost}/{user}/{exchange}", vhost.len(), user.len())
}

pub(crate) fn encode_topic_permission(t: &TopicPermissions) -> Bytes {
    let mut w = Writer::value();
    w.u8(VERSION)
        .bytes(t.user.as_bytes())
        .bytes(t.vhost.as_bytes())
        .bytes(t.exchange.as_bytes())
        .bytes(t.write.as_bytes())
        .bytes(t.read.as_bytes());
    Bytes::from(w.into_vec())
}

fn decode_topic_permission(buf: &[u8]) -> Result<TopicPermissions, StoreError> {
    let mut r = Reader::value(buf)?;
    if r.u8()? != VERSION {
        return Err(StoreError::Corrupt("unknown run-time topic permission version".into()));
    }
    let t = TopicPermissions {
        user: r.string()?,
        vhost: r.string()?,
        exchange: r.string()?,
        write: r.string()?,
        read: r.string()?,
    };
    r.finish()?;
    for template in [&t.write, &t.read] {
        TopicPermissions::validate(template).map_err(StoreError::Corrupt)?;
    }
    Ok(t)
}

pub(crate) fn encode_user(u: &User) -> Bytes {
    let mut w = Writer::value();
    w.u8(VERSION).bytes(u.name.as_bytes()).bytes(u.hash.to_stored().as_bytes()).u32(u.tags.len() as u32);
    for t in &u.tags {
        w.bytes(t.as_bytes());
    }
    Bytes::from(w.into_vec())
}

fn decode_user(buf: &[u8]) -> Result<User, StoreError> {
    let mut r = Reader::value(buf)?;
    if r.u8()? != VERSION {
        return Err(StoreError::Corrupt("unknown run-time user version".into()));
    }
    let name = r.string()?;
    let hash = PasswordHash::parse(&r.string()?).map_err(StoreError::Corrupt)?;
    let n = r.u32()?;
    let mut tags = Vec::new();
    for _ in 0..n {
        tags.push(r.string()?);
    }
    r.finish()?;
    Ok(User { name, hash, tags })
}

pub(crate) fn encode_permission(p: &VhostPermissions) -> Bytes {
    let mut w = Writer::value();
    w.u8(VERSION)
        .bytes(p.user.as_bytes())
        .bytes(p.vhost.as_bytes())
        .bytes(p.configure.as_str().as_bytes())
        .bytes(p.write.as_str().as_bytes())
        .bytes(p.read.as_str().as_bytes());
    Bytes::from(w.into_vec())
}

fn decode_permission(buf: &[u8]) -> Result<VhostPermissions, StoreError> {
    let mut r = Reader::value(buf)?;
    if r.u8()? != VERSION {
        return Err(StoreError::Corrupt("unknown run-time permission version".into()));
    }
    let (user, vhost) = (r.string()?, r.string()?);
    let mut pattern = || -> Result<Pattern, StoreError> { Pattern::new(&r.string()?).map_err(StoreError::Corrupt) };
    let (configure, write, read) = (pattern()?, pattern()?, pattern()?);
    r.finish()?;
    Ok(VhostPermissions { user, vhost, configure, write, read })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_permissions_round_trip_through_their_encoding() {
        let hash = PasswordHash::parse("rabbitmq-sha256:kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR").unwrap();
        let u = User { name: "a/b".into(), hash, tags: vec!["administrator".into(), "x".into()] };
        let p = VhostPermissions {
            user: "a/b".into(),
            vhost: "/".into(),
            configure: Pattern::new("^a").unwrap(),
            write: Pattern::new(".*").unwrap(),
            read: Pattern::new("").unwrap(),
        };
        let defs = RuntimeDefinitions::restore(vec![
            (user_key(&u.name), encode_user(&u)),
            (permission_key("/", "a/b"), encode_permission(&p)),
            ("bridge/x".into(), Bytes::from_static(b"opaque")),
            ("user/broken".into(), Bytes::from_static(b"\x07")),
        ]);
        assert_eq!(defs.users.values().collect::<Vec<_>>(), vec![&u]);
        assert_eq!(defs.permissions[&("/".to_string(), "a/b".to_string())], p);
        assert_eq!(defs.settings.keys().collect::<Vec<_>>(), vec!["bridge/x"]);
        assert!(defs.users["a/b"].hash.verify(b"test12"));
        assert_ne!(permission_key("a/b", "c"), permission_key("a", "b/c"));
    }

    #[test]
    fn topic_permissions_round_trip_and_a_bad_template_is_left_out() {
        let t = TopicPermissions {
            user: "a/b".into(),
            vhost: "/".into(),
            exchange: "amq.topic".into(),
            write: "^sensors\\.{username}\\.".into(),
            read: ".*".into(),
        };
        let bad = TopicPermissions { write: "(".into(), exchange: "x".into(), ..t.clone() };
        let defs = RuntimeDefinitions::restore(vec![
            (topic_permission_key("/", "a/b", "amq.topic"), encode_topic_permission(&t)),
            (topic_permission_key("/", "a/b", "x"), encode_topic_permission(&bad)),
        ]);
        assert_eq!(defs.topic_permissions.values().collect::<Vec<_>>(), vec![&t]);
        assert!(defs.settings.is_empty() && defs.permissions.is_empty());
        assert_ne!(topic_permission_key("a/b", "c", "x"), topic_permission_key("a", "b/c", "x"));
        assert_ne!(topic_permission_key("v", "u/x", "y"), topic_permission_key("v", "u", "x/y"));
    }

    #[test]
    fn run_time_permissions_merge_under_the_configured_ones_and_come_back_after_a_restart() {
        use crate::permissions::{AccessPolicy, Permission, Resource};
        use crate::store::{MemoryStore, Store};
        use std::sync::Arc;
        let perm = |user: &str, configure: &str| VhostPermissions {
            user: user.into(),
            vhost: "/".into(),
            configure: Pattern::new(configure).unwrap(),
            write: Pattern::new(".*").unwrap(),
            read: Pattern::new(".*").unwrap(),
        };
        let configured = || AccessPolicy { permissions: vec![perm("cfg", "^c")], ..AccessPolicy::default() };
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let b = crate::Broker::recover(store.clone(), 0).unwrap();
        b.set_access(configured());
        let rt = User::new("rt", PasswordHash::parse(crate::auth::DUMMY_ARGON2ID).unwrap());
        b.put_runtime(vec![rt], vec![perm("rt", "^r"), perm("cfg", "^x")]);
        let check = |b: &crate::Broker, user: &str, queue: &str| {
            b.access().grant(user, false, "/").and_then(|g| g.check(Permission::Configure, Resource::Queue, queue))
        };
        assert!(check(&b, "rt", "r1").is_ok());
        assert!(check(&b, "rt", "c1").is_err());
        assert!(check(&b, "cfg", "c1").is_ok());
        assert!(check(&b, "cfg", "x1").is_err(), "the configured entry wins");
        assert!(b.permission_is_configured("/", "cfg") && !b.permission_is_configured("/", "rt"));

        // A restart: the run-time layer comes back from the store, under the configured one.
        let b = crate::Broker::recover(store.clone(), 0).unwrap();
        b.set_access(configured());
        assert!(b.auth().account("rt").is_some());
        assert!(check(&b, "rt", "r1").is_ok() && check(&b, "rt", "c1").is_err());
        // A reload keeps it.
        b.set_access(configured());
        assert!(check(&b, "rt", "r1").is_ok());
        // Deleting the user takes its permissions with it.
        assert!(b.delete_runtime_user("rt").is_some());
        assert!(b.delete_runtime_user("rt").is_none());
        assert!(check(&b, "rt", "r1").is_err(), "no entry any more");
        let b = crate::Broker::recover(store, 0).unwrap();
        assert!(b.auth().account("rt").is_none());
        let left: Vec<String> = b.runtime_permissions().into_iter().map(|p| p.user).collect();
        assert_eq!(left, vec!["cfg".to_string()], "only the deleted user's permissions went");
    }
}

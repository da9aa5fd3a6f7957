//! MQTT topic access control: Mosquitto's `acl_file` semantics from the config's `[[acl]]`,
//! and the frontend's [`TopicPolicy`] (the ACL and the queues the frontend keeps for itself),
//! which the core and the AMQP frontend ask in routing keys.
//!
//! With no entries everything is allowed. With any, an access is allowed only when an entry for
//! the client's user or for all users grants it; anonymous clients match only all-user entries.
//! `%u` in an entry's filter stands for the user name, `%c` for the client id.
//!
//! The ACL is about MQTT topics whichever protocol touches them: the session checks its
//! PUBLISH / SUBSCRIBE / deliveries with [`Acl`], and AMQP connections publishing to, binding on
//! or routing into an MQTT exchange are checked with it through [`MqttPolicy`], which the server
//! installs in the broker's [`AccessPolicy`] and which maps their routing keys to topics
//! ([`swap_separators`]) and binding keys to filters ([`binding_key_filter`]).

use std::any::Any;
use std::sync::Arc;

use ferry_core::permissions::AccessPolicy;
use ferry_core::policy::{QueueUse, TopicPolicy};

use crate::topic::swap_separators;

/// What an entry grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

impl Access {
    /// Parses `read`, `write` or `readwrite`.
    pub fn parse(s: &str) -> Option<Access> {
        match s {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            "readwrite" => Some(Access::ReadWrite),
            _ => None,
        }
    }
    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }
    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// One `[[acl]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclEntry {
    /// `None`: every user (and anonymous clients).
    pub user: Option<String>,
    /// An MQTT filter, possibly with `%u` and `%c`.
    pub topic: String,
    pub access: Access,
}

impl AclEntry {
    /// Checks the entry's filter (with `%u`/`%c` as they are: they fill a level's text): not
    /// empty, `+` and `#` only as whole levels, `#` only last (MQTT §4.7.1).
    pub fn validate_topic(topic: &str) -> Result<(), String> {
        if topic.is_empty() {
            return Err("empty topic".into());
        }
        let levels: Vec<&str> = topic.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            match *level {
                "#" if i + 1 == levels.len() => {}
                "+" => {}
                l if l.contains(['+', '#']) => {
                    return Err("'+' and '#' must be whole levels and '#' the last level".into())
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The configured entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<AclEntry>,
}

impl Acl {
    pub fn new(entries: Vec<AclEntry>) -> Acl {
        Acl { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// May `user` (`None`: anonymous) publish to `topic`?
    pub fn can_write(&self, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.check(user, client_id, Access::writes, |acl| topic_matches(acl, topic))
    }

    /// May `user` subscribe to `filter` (every topic it can match must be readable)?
    pub fn can_subscribe(&self, user: Option<&str>, client_id: &str, filter: &str) -> bool {
        self.check(user, client_id, Access::reads, |acl| filter_covered(filter, acl))
    }

    /// May `user` publish to every topic `filter` can match (an AMQP binding into an MQTT
    /// exchange, which forwards whatever matches)?
    pub fn can_write_all(&self, user: Option<&str>, client_id: &str, filter: &str) -> bool {
        self.check(user, client_id, Access::writes, |acl| filter_covered(filter, acl))
    }

    /// May `user` receive a message on `topic`?
    pub fn can_read(&self, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.check(user, client_id, Access::reads, |acl| topic_matches(acl, topic))
    }

    fn check(
        &self,
        user: Option<&str>,
        client_id: &str,
        grants: fn(Access) -> bool,
        matches: impl Fn(&str) -> bool,
    ) -> bool {
        if self.entries.is_empty() {
            return true;
        }
        self.entries.iter().any(|e| {
            let applies = match &e.user {
                None => true,
                Some(u) => user == Some(u.as_str()),
            };
            if !applies || !grants(e.access) {
                return false;
            }
            match substitute(&e.topic, user, client_id) {
                Some(filter) => matches(&filter),
                None => false,
            }
        })
    }
}

/// The prefix of a persistent session's queue: `mqtt-session.<client id>`.
pub const SESSION_QUEUE_PREFIX: &str = "mqtt-session.";

/// The prefix of a shared subscription's queue: `mqtt-shared.<group>.<filter>`.
pub const SHARED_QUEUE_PREFIX: &str = "mqtt-shared.";

/// The prefix of an MQTT bridge's backlog: `ferry-bridge.<bridge name>` (the `ferry-bridge`
/// crate names its queues with it). Only the bridge consumes it.
pub const BRIDGE_QUEUE_PREFIX: &str = "ferry-bridge.";

/// The queues the frontend keeps for persistent sessions, shared subscriptions and bridges:
/// what MQTT subscriptions and bridge rules fill, so other protocols' clients are kept out.
const QUEUE_PREFIXES: [&str; 3] = [SESSION_QUEUE_PREFIX, SHARED_QUEUE_PREFIX, BRIDGE_QUEUE_PREFIX];

/// The MQTT frontend's [`TopicPolicy`]: the ACL in routing keys, and its own queues.
#[derive(Debug, Clone, Default)]
pub struct MqttPolicy {
    acl: Arc<Acl>,
}

impl MqttPolicy {
    pub fn new(acl: Acl) -> MqttPolicy {
        MqttPolicy { acl: Arc::new(acl) }
    }

    pub fn acl(&self) -> &Arc<Acl> {
        &self.acl
    }

    /// The ACL of the broker's policy in force (empty, allowing everything, when no MQTT
    /// policy is installed).
    pub fn acl_of(access: &AccessPolicy) -> Arc<Acl> {
        match access.topic_policy.clone().into_any().downcast::<MqttPolicy>() {
            Ok(p) => p.acl.clone(),
            Err(_) => Arc::default(),
        }
    }
}

impl TopicPolicy for MqttPolicy {
    fn restricts(&self) -> bool {
        !self.acl.is_empty()
    }

    /// An AMQP connection has no client id: `%c` entries never match it.
    fn may_publish(&self, user: Option<&str>, routing_key: &str) -> bool {
        self.acl.can_write(user, "", &swap_separators(routing_key))
    }

    fn may_publish_matching(&self, user: Option<&str>, binding_key: &str) -> bool {
        self.acl.can_write_all(user, "", &binding_key_filter(binding_key))
    }

    fn may_read_matching(&self, user: Option<&str>, binding_key: &str) -> bool {
        let filter = binding_key_filter(binding_key);
        // An AMQP `#` or `*` first word also matches `$`-topics ($SYS), which an MQTT
        // wildcard does not: such a binding needs read on `$SYS/#` as well.
        let dollar = filter.starts_with('#') || filter.starts_with('+');
        self.acl.can_subscribe(user, "", &filter) && (!dollar || self.acl.can_subscribe(user, "", "$SYS/#"))
    }

    fn may_read_everything(&self, user: Option<&str>) -> bool {
        self.acl.can_subscribe(user, "", "#")
    }

    fn reserves_queue(&self, name: &[u8]) -> bool {
        QUEUE_PREFIXES.iter().any(|p| name.starts_with(p.as_bytes()))
    }

    /// Issue 13: only MQTT subscriptions fill these queues, and only their clients empty them:
    /// a message that no MQTT client could have published must never reach one (it could push
    /// a client's own messages out, past `max_queued_messages`), nor may anyone else add
    /// bindings to, purge, delete or create one. Consuming from a shared subscription's queue
    /// is the one exception: AMQP consumers may join a group as its MQTT members do (under the
    /// same read checks). A passive declare, which changes nothing, is not asked about.
    fn queue_refusal(&self, vhost: &str, name: &str, what: QueueUse) -> Option<String> {
        if name.starts_with(BRIDGE_QUEUE_PREFIX) {
            // A bridge's backlog: whoever else consumed, purged or deleted it would take the
            // messages the bridge owes its remote.
            return Some(format!(
                "cannot {} queue '{name}' in vhost '{vhost}': it holds an MQTT bridge's backlog and only the bridge consumes it",
                what.verb()
            ));
        }
        let session = name.starts_with(SESSION_QUEUE_PREFIX);
        if !session && !name.starts_with(SHARED_QUEUE_PREFIX) {
            return None;
        }
        if !session && what == QueueUse::Consume {
            return None;
        }
        let whose = if session { "an MQTT client's session" } else { "an MQTT shared subscription" };
        Some(format!(
            "cannot {} queue '{name}' in vhost '{vhost}': it holds {whose} and only MQTT subscriptions fill it",
            what.verb()
        ))
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// The MQTT filter an AMQP binding key stands for: separators swapped, a `*` word becomes `+`.
/// A `#` word not at the end (which MQTT cannot express) stays `#`, which [`filter_covered`]
/// treats as wider than any `+` or literal, so the check errs on the side of refusing.
pub fn binding_key_filter(binding_key: &str) -> String {
    swap_separators(binding_key).split('/').map(|w| if w == "*" { "+" } else { w }).collect::<Vec<_>>().join("/")
}

/// Fills `%u` and `%c`. `None` when the value would not be one plain level (Mosquitto refuses
/// a user or client id with `+`, `#` or `/` in a pattern, so such a client gets nothing from it),
/// or when `%u` is needed and the client is anonymous.
fn substitute(topic: &str, user: Option<&str>, client_id: &str) -> Option<String> {
    if !topic.contains('%') {
        return Some(topic.to_string());
    }
    let plain = |s: &str| !s.is_empty() && !s.contains(['+', '#', '/']);
    let mut out = topic.to_string();
    if out.contains("%u") {
        let u = user.filter(|u| plain(u))?;
        out = out.replace("%u", u);
    }
    if out.contains("%c") {
        if !plain(client_id) {
            return None;
        }
        out = out.replace("%c", client_id);
    }
    Some(out)
}

/// Does the ACL filter `acl` match the topic name `topic`? (`$`-topics are not matched by a
/// leading wildcard, as in subscriptions.)
pub fn topic_matches(acl: &str, topic: &str) -> bool {
    let mut t = topic.split('/');
    let mut first = true;
    for a in acl.split('/') {
        let dollar_guard = first && topic.starts_with('$');
        first = false;
        match a {
            "#" => return !dollar_guard,
            "+" => match t.next() {
                Some(_) if dollar_guard => return false,
                Some(_) => {}
                None => return false,
            },
            lit => {
                if t.next() != Some(lit) {
                    return false;
                }
            }
        }
    }
    t.next().is_none()
}

/// Is every topic the subscription filter `sub` matches also matched by the ACL filter `acl`?
/// Level by level: ACL `#` covers the rest, ACL `+` covers one level (a literal or `+`, not
/// `#`), a literal covers only the same literal.
pub fn filter_covered(sub: &str, acl: &str) -> bool {
    let mut s = sub.split('/');
    let mut first = true;
    for a in acl.split('/') {
        let dollar_guard = first && sub.starts_with('$');
        first = false;
        match a {
            "#" => return !dollar_guard,
            "+" => match s.next() {
                Some("#") | None => return false,
                Some(_) if dollar_guard => return false,
                Some(_) => {}
            },
            lit => {
                if s.next() != Some(lit) {
                    return false;
                }
            }
        }
    }
    s.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::permissions::{MqttExchange, Permission, Resource};

    /// The broker's access policy with `entries` as the ACL on `amq.topic` of `/`.
    fn access(entries: Vec<AclEntry>) -> Arc<AccessPolicy> {
        Arc::new(AccessPolicy {
            topic_policy: Arc::new(MqttPolicy::new(Acl::new(entries))),
            mqtt_exchanges: vec![MqttExchange { vhost: "/".into(), exchange: "amq.topic".into() }],
            ..AccessPolicy::default()
        })
    }

    #[test]
    fn subset_matcher() {
        assert!(filter_covered("a/b", "a/b"));
        assert!(filter_covered("a/b", "a/+"));
        assert!(filter_covered("a/+", "a/+"));
        assert!(!filter_covered("a/#", "a/+"));
        assert!(filter_covered("a/#", "a/#"));
        assert!(filter_covered("a/b/+/c", "a/#"));
        assert!(filter_covered("a", "a/#"));
        assert!(!filter_covered("a/+", "a/b"));
        assert!(!filter_covered("a/b/c", "a/+"));
        assert!(!filter_covered("a", "a/+"));
        assert!(!filter_covered("#", "a/#"));
        assert!(filter_covered("#", "#"));
        assert!(!filter_covered("$SYS/x", "#"));
        assert!(filter_covered("$SYS/x", "$SYS/#"));
    }

    #[test]
    fn amqp_keys_map_to_mqtt_topics_and_filters() {
        assert_eq!(swap_separators("plant.7/1.temp"), "plant/7.1/temp");
        assert_eq!(binding_key_filter("a.*.#"), "a/+/#");
        assert_eq!(binding_key_filter("a.#.b"), "a/#/b");
        assert!(!filter_covered(&binding_key_filter("a.#.b"), "a/+/b"));
        assert!(filter_covered(&binding_key_filter("a.#.b"), "a/#"));
        assert!(AclEntry::validate_topic("a/+/#").is_ok());
        assert!(AclEntry::validate_topic("a/#/b").is_err());
        assert!(AclEntry::validate_topic("a/b+").is_err());
        assert!(AclEntry::validate_topic("").is_err());
    }

    #[test]
    fn topic_matcher() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(!topic_matches("+/x", "$SYS/x"));
    }

    #[test]
    fn semantics() {
        let e = |user: Option<&str>, topic: &str, access| AclEntry {
            user: user.map(str::to_string),
            topic: topic.into(),
            access,
        };
        assert!(Acl::default().can_write(None, "c", "x"));
        let acl = Acl::new(vec![
            e(Some("sensor"), "sensors/%u/#", Access::ReadWrite),
            e(None, "public/#", Access::Read),
            e(None, "clients/%c", Access::Write),
        ]);
        assert!(acl.can_write(Some("sensor"), "c", "sensors/sensor/t"));
        assert!(!acl.can_write(Some("other"), "c", "sensors/sensor/t"));
        assert!(acl.can_subscribe(Some("sensor"), "c", "sensors/sensor/+"));
        assert!(!acl.can_subscribe(Some("sensor"), "c", "sensors/+/t"));
        assert!(acl.can_subscribe(None, "c", "public/#"));
        assert!(!acl.can_write(None, "c", "public/x"));
        assert!(acl.can_write(None, "c1", "clients/c1"));
        assert!(!acl.can_write(None, "c1", "clients/c2"));
        assert!(!acl.can_write(Some("a"), "c/x", "clients/c/x"));
    }
    #[test]
    fn the_mqtt_acl_covers_amqp_on_mqtt_exchanges() {
        let acl = vec![
            AclEntry { user: Some("alice".into()), topic: "sensors/#".into(), access: Access::ReadWrite },
            AclEntry { user: None, topic: "public/+".into(), access: Access::Read },
            AclEntry { user: None, topic: "c/%c".into(), access: Access::Write },
        ];
        let policy = access(acl);
        let g = policy.grant("alice", false, "/").unwrap();
        assert!(g.check_topic(Permission::Write, "amq.topic", || true, "sensors.t1").is_ok());
        assert!(g.check_topic(Permission::Write, "amq.topic", || true, "public.x").is_err());
        assert!(g.check_topic(Permission::Read, "amq.topic", || true, "sensors.*").is_ok());
        assert!(g.check_topic(Permission::Read, "amq.topic", || true, "public.*").is_ok());
        assert!(g.check_topic(Permission::Read, "amq.topic", || true, "public.#").is_err());
        assert!(g.check_topic(Permission::Write, "amq.topic", || true, "c.").is_err(), "%c never matches AMQP");
        assert!(g.check_topic(Permission::Write, "other", || true, "public.x").is_ok());
        let anon = policy.grant("alice", true, "/").unwrap();
        assert!(anon.check_topic(Permission::Write, "amq.topic", || true, "sensors.t1").is_err());
        assert!(policy.grant("alice", false, "/v2").unwrap().unrestricted());
    }

    #[test]
    fn under_the_acl_amqp_cannot_route_around_it_nor_read_mqtt_queues_or_sys() {
        let acl = vec![
            AclEntry { user: Some("alice".into()), topic: "alice/#".into(), access: Access::ReadWrite },
            AclEntry { user: Some("admin".into()), topic: "#".into(), access: Access::ReadWrite },
            AclEntry { user: Some("admin".into()), topic: "$SYS/#".into(), access: Access::Read },
        ];
        let policy = access(acl);
        let alice = policy.grant("alice", false, "/").unwrap();
        // Routing into the MQTT exchange from elsewhere is publishing there.
        assert!(alice.check_route_into("amq.topic", "alice.#").is_ok());
        assert_eq!(
            alice.check_route_into("amq.topic", "#").unwrap_err().0,
            "write access to topic '#' in exchange 'amq.topic' in vhost '/' refused for user 'alice'"
        );
        assert!(alice.check_route_into("amq.topic", "secret.t").is_err());
        assert!(alice.check_route_into("other", "#").is_ok(), "not an MQTT exchange");
        // The MQTT frontend's queues: only for who may read everything.
        for q in ["mqtt-session.bob", "mqtt-shared.g.a/b"] {
            assert!(alice.check(Permission::Read, Resource::Queue, q).is_err(), "{q}");
        }
        assert!(alice.check(Permission::Read, Resource::Queue, "alice.q").is_ok());
        // A leading AMQP wildcard also matches $SYS, which MQTT wildcards do not.
        assert!(alice.check_topic(Permission::Read, "amq.topic", || true, "alice.#").is_ok());
        let admin = policy.grant("admin", false, "/").unwrap();
        assert!(admin.check(Permission::Read, Resource::Queue, "mqtt-session.bob").is_ok());
        assert!(admin.check_route_into("amq.topic", "#").is_ok());
        assert!(admin.check_topic(Permission::Read, "amq.topic", || true, "#").is_ok());
        let no_sys = access(vec![AclEntry { user: None, topic: "#".into(), access: Access::Read }]);
        let g = no_sys.grant("u", false, "/").unwrap();
        assert!(g.check_topic(Permission::Read, "amq.topic", || true, "#").is_err(), "# would take $SYS too");
        assert!(g.check_topic(Permission::Read, "amq.topic", || true, "*.x").is_err());
        assert!(g.check_topic(Permission::Read, "amq.topic", || true, "a.#").is_ok());
    }

    #[test]
    fn reserved_queues_are_refused_to_other_protocols_but_shared_ones_may_be_consumed() {
        let p = MqttPolicy::default();
        assert!(!p.restricts(), "an empty ACL restricts nothing");
        assert!(p.reserves_queue(b"mqtt-session.c1"));
        assert!(p.reserves_queue(b"mqtt-shared.g.a/b"));
        assert!(!p.reserves_queue(b"mqtt-sessions"));
        assert_eq!(
            p.queue_refusal("/", "mqtt-session.c1", QueueUse::Publish).unwrap(),
            "cannot publish to queue 'mqtt-session.c1' in vhost '/': it holds an MQTT client's session and only MQTT subscriptions fill it"
        );
        assert!(p.queue_refusal("/", "mqtt-session.c1", QueueUse::Consume).is_some());
        assert!(p.queue_refusal("/", "mqtt-shared.g.a/b", QueueUse::Consume).is_none());
        assert!(p
            .queue_refusal("/", "mqtt-shared.g.a/b", QueueUse::Bind)
            .unwrap()
            .contains("an MQTT shared subscription"));
        assert!(p.queue_refusal("/", "work", QueueUse::Delete).is_none());
        // A bridge's backlog, for every use, consuming included.
        assert!(p.reserves_queue(b"ferry-bridge.central"));
        for what in [QueueUse::Publish, QueueUse::Bind, QueueUse::Consume, QueueUse::Purge, QueueUse::Delete] {
            assert!(p.queue_refusal("/", "ferry-bridge.central", what).is_some(), "{what:?}");
        }
    }

    #[test]
    fn the_frontend_takes_its_acl_back_from_the_broker_policy() {
        let entries = vec![AclEntry { user: None, topic: "a/#".into(), access: Access::Read }];
        let policy = access(entries.clone());
        assert_eq!(*MqttPolicy::acl_of(&policy), Acl::new(entries));
        assert!(MqttPolicy::acl_of(&AccessPolicy::default()).is_empty(), "no MQTT policy: everything allowed");
    }
}

//! MQTT topic access control: Mosquitto's `acl_file` semantics from the config's `[[acl]]`.
//!
//! With no entries everything is allowed. With any, an access is allowed only when an entry for
//! the client's user or for all users grants it; anonymous clients match only all-user entries.
//! `%u` in an entry's filter stands for the user name, `%c` for the client id.
//!
//! The ACL is about MQTT topics whichever protocol touches them: the MQTT frontend checks its
//! PUBLISH / SUBSCRIBE / deliveries, and AMQP connections are checked with it when they publish
//! to or bind on an MQTT exchange ([`routing_key_topic`], [`binding_key_filter`]), through
//! [`permissions::Grant`](crate::permissions::Grant). It lives in the core for that reason.

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

/// The queues the MQTT frontend keeps for persistent sessions (`mqtt-session.<client id>`) and
/// for shared subscriptions (`mqtt-shared.<group>.<filter>`): what MQTT clients' subscriptions
/// fill, so AMQP connections held to the ACL may touch them only with read access to
/// everything.
pub const MQTT_QUEUE_PREFIXES: [&str; 2] = ["mqtt-session.", "mqtt-shared."];

/// Whether `name` is one of the MQTT frontend's own queues ([`MQTT_QUEUE_PREFIXES`]).
pub fn is_mqtt_queue(name: &[u8]) -> bool {
    MQTT_QUEUE_PREFIXES.iter().any(|p| name.starts_with(p.as_bytes()))
}

/// What an outside client (an AMQP connection) asks to do with a queue by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueUse {
    /// `queue.declare` that may create it (not passive).
    Declare,
    Bind,
    Unbind,
    Purge,
    Delete,
    /// `basic.consume` or `basic.get`.
    Consume,
    /// A publish to the default exchange with the queue's name as the routing key.
    Publish,
}

/// Why an outside client may not `what` the MQTT frontend's queue `name` (issue 13). Only
/// MQTT subscriptions fill these queues, and only their clients empty them: a message that no
/// MQTT client could have published must never reach one (it could push a client's own
/// messages out, past `max_queued_messages`), nor may anyone else add bindings to, purge,
/// delete or create one. Consuming from a shared subscription's queue is the one exception:
/// AMQP consumers may join a group as its MQTT members do (under the same read checks). A
/// passive declare, which changes nothing, is always allowed. `None`: allowed.
pub fn mqtt_queue_refusal(vhost: &str, name: &str, what: QueueUse) -> Option<String> {
    let session = name.starts_with(MQTT_QUEUE_PREFIXES[0]);
    if !session && !name.starts_with(MQTT_QUEUE_PREFIXES[1]) {
        return None;
    }
    if !session && what == QueueUse::Consume {
        return None;
    }
    let whose = if session { "an MQTT client's session" } else { "an MQTT shared subscription" };
    let verb = match what {
        QueueUse::Declare => "declare",
        QueueUse::Bind => "bind",
        QueueUse::Unbind => "unbind",
        QueueUse::Purge => "purge",
        QueueUse::Delete => "delete",
        QueueUse::Consume => "consume from",
        QueueUse::Publish => "publish to",
    };
    Some(format!(
        "cannot {verb} queue '{name}' in vhost '{vhost}': it holds {whose} and only MQTT subscriptions fill it"
    ))
}

/// The MQTT topic an AMQP routing key stands for on an MQTT exchange: `/` and `.` swapped, as
/// the MQTT frontend maps them (`docs/mapping.md`).
pub fn routing_key_topic(routing_key: &str) -> String {
    routing_key
        .chars()
        .map(|c| match c {
            '/' => '.',
            '.' => '/',
            c => c,
        })
        .collect()
}

/// The MQTT filter an AMQP binding key stands for: separators swapped, a `*` word becomes `+`.
/// A `#` word not at the end (which MQTT cannot express) stays `#`, which [`filter_covered`]
/// treats as wider than any `+` or literal, so the check errs on the side of refusing.
pub fn binding_key_filter(binding_key: &str) -> String {
    routing_key_topic(binding_key).split('/').map(|w| if w == "*" { "+" } else { w }).collect::<Vec<_>>().join("/")
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
        assert_eq!(routing_key_topic("plant.7/1.temp"), "plant/7.1/temp");
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
}

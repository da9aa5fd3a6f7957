//! Authorization: what an authenticated user may do, RabbitMQ's model for AMQP.
//!
//! - **Vhost permissions** (`[[permissions]]`, RabbitMQ's `set_permissions`): per user and vhost,
//!   three regular expressions over resource names, for *configure*, *write* and *read*. A user
//!   needs an entry to open the vhost at all. With no entries configured anywhere, every user may
//!   do everything everywhere (Ferry before authorization, and Mosquitto without an ACL).
//! - **Topic permissions** (`[[topic_permissions]]`, `set_topic_permissions`): per user, vhost
//!   and topic exchange, a *write* regex over routing keys (checked on publish) and a *read* regex
//!   over binding keys (checked on bind). `{username}` and `{vhost}` stand for the connection's.
//!   No entry for an exchange: no restriction on it.
//! - **A frontend's topic policy** ([`TopicPolicy`], the MQTT frontend's ACL) on the MQTT
//!   exchanges: an AMQP connection publishing to, binding on or routing into an exchange MQTT
//!   clients use is held to the same rules as an MQTT client of that user, and only a user the
//!   policy lets read everything may touch the MQTT frontend's own queues.
//!
//! A connection works with a [`Grant`]: the policy resolved for its user and vhost, with topic
//! templates expanded and compiled once. [`AccessPolicy`] is swapped whole on a reload; a
//! connection notices (a pointer comparison) and takes a fresh grant before its next check.
//!
//! The regexes are Rust's `regex` crate rather than Erlang's PCRE: the same syntax for what
//! permission patterns use (anchors, classes, alternation, repetition), no look-around or
//! back-references (refused when the config is read), and matching in linear time. As in
//! RabbitMQ, a match is an unanchored search and an empty pattern matches nothing (it is `^$`).

use std::fmt;
use std::sync::Arc;

use regex::{Regex, RegexBuilder};

use crate::policy::{Open, QueueUse, TopicPolicy};

/// A compiled pattern may use at most this much memory (a config with absurd repetitions is
/// refused instead of slowing every check).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The three kinds of access a vhost permission grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Configure,
    Write,
    Read,
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Permission::Configure => "configure",
            Permission::Write => "write",
            Permission::Read => "read",
        })
    }
}

/// What a resource check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Exchange,
    Queue,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Exchange => "exchange",
            Resource::Queue => "queue",
        })
    }
}

/// A permission regex as configured; `""` matches nothing (RabbitMQ reads it as `^$`).
#[derive(Clone)]
pub struct Pattern {
    source: String,
    regex: Regex,
}

impl Pattern {
    pub fn new(source: &str) -> Result<Pattern, String> {
        let effective = if source.is_empty() { "^$" } else { source };
        let regex = RegexBuilder::new(effective).size_limit(REGEX_SIZE_LIMIT).build().map_err(|e| match e {
            regex::Error::Syntax(s) => format!("not a valid regular expression: {}", s.lines().last().unwrap_or(&s)),
            other => other.to_string(),
        })?;
        Ok(Pattern { source: source.to_string(), regex })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_match(&self, name: &str) -> bool {
        self.regex.is_match(name)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.source == other.source
    }
}

/// One `[[permissions]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct VhostPermissions {
    pub user: String,
    pub vhost: String,
    pub configure: Pattern,
    pub write: Pattern,
    pub read: Pattern,
}

impl VhostPermissions {
    fn pattern(&self, p: Permission) -> &Pattern {
        match p {
            Permission::Configure => &self.configure,
            Permission::Write => &self.write,
            Permission::Read => &self.read,
        }
    }
}

/// One `[[topic_permissions]]` entry. The patterns are templates: `{username}` and `{vhost}`
/// are filled (regex-escaped) per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPermissions {
    pub user: String,
    pub vhost: String,
    pub exchange: String,
    pub write: String,
    pub read: String,
}

impl TopicPermissions {
    /// Checks that both templates compile (with sample values in the variables).
    pub fn validate(template: &str) -> Result<(), String> {
        Pattern::new(&expand(template, "user", "vhost")).map(|_| ())
    }
}

/// Fills `{username}` and `{vhost}`, escaped: a user name with regex characters in it cannot
/// widen its own grant. (RabbitMQ substitutes them as they are.)
fn expand(template: &str, user: &str, vhost: &str) -> String {
    template.replace("{username}", &regex::escape(user)).replace("{vhost}", &regex::escape(vhost))
}

/// An MQTT exchange: where MQTT clients publish, so where the [`TopicPolicy`] applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttExchange {
    pub vhost: String,
    pub exchange: String,
}

/// Everything the authorization checks read; the server builds it from the config and swaps it
/// on a reload ([`Broker::set_access`](crate::Broker::set_access)).
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// Empty: everyone may do everything (no `[[permissions]]` configured).
    pub permissions: Vec<VhostPermissions>,
    pub topic_permissions: Vec<TopicPermissions>,
    /// The MQTT frontend's rules (its `[[acl]]` and its own queues); [`Open`] until the server
    /// installs them.
    pub topic_policy: Arc<dyn TopicPolicy>,
    /// The exchanges the topic policy covers for AMQP connections.
    pub mqtt_exchanges: Vec<MqttExchange>,
}

impl Default for AccessPolicy {
    fn default() -> AccessPolicy {
        AccessPolicy {
            permissions: Vec::new(),
            topic_permissions: Vec::new(),
            topic_policy: Arc::new(Open),
            mqtt_exchanges: Vec::new(),
        }
    }
}

/// A refused check, with RabbitMQ's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AccessPolicy {
    /// [`Broker::reserved_queue_refusal`](crate::Broker::reserved_queue_refusal) under this
    /// policy, for a connection that holds the policy in force already.
    pub fn reserved_queue_refusal(&self, vhost: &str, name: &[u8], what: QueueUse) -> Option<String> {
        if !self.topic_policy.reserves_queue(name) {
            return None;
        }
        self.topic_policy.queue_refusal(vhost, &String::from_utf8_lossy(name), what)
    }

    /// Resolves the policy for `user` on `vhost`. Refused (RabbitMQ's 530 text) when vhost
    /// permissions are configured and none names this user and vhost. `anonymous`: the user
    /// is the anonymous identity (which the ACL's per-user entries never match).
    pub fn grant(self: &Arc<Self>, user: &str, anonymous: bool, vhost: &str) -> Result<Grant, Denied> {
        let resources = if self.permissions.is_empty() {
            None
        } else {
            match self.permissions.iter().find(|p| p.user == user && p.vhost == vhost) {
                Some(p) => Some(p.clone()),
                None => return Err(Denied(format!("access to vhost '{vhost}' refused for user '{user}'"))),
            }
        };
        let topics = self
            .topic_permissions
            .iter()
            .filter(|t| t.user == user && t.vhost == vhost)
            .filter_map(|t| {
                // The templates were validated when the config was read; escaping keeps them valid.
                let write = Pattern::new(&expand(&t.write, user, vhost)).ok()?;
                let read = Pattern::new(&expand(&t.read, user, vhost)).ok()?;
                Some(TopicGrant { exchange: t.exchange.clone(), write, read })
            })
            .collect();
        let acl_exchanges = if !self.topic_policy.restricts() {
            Vec::new()
        } else {
            self.mqtt_exchanges.iter().filter(|m| m.vhost == vhost).map(|m| m.exchange.clone()).collect()
        };
        Ok(Grant {
            policy: self.clone(),
            user: user.to_string(),
            anonymous,
            vhost: vhost.to_string(),
            resources,
            topics,
            acl_exchanges,
        })
    }
}

#[derive(Debug, Clone)]
struct TopicGrant {
    exchange: String,
    write: Pattern,
    read: Pattern,
}

/// The policy resolved for one connection's user and vhost.
#[derive(Debug, Clone)]
pub struct Grant {
    policy: Arc<AccessPolicy>,
    user: String,
    anonymous: bool,
    vhost: String,
    /// `None`: no vhost permissions configured, everything allowed.
    resources: Option<VhostPermissions>,
    topics: Vec<TopicGrant>,
    /// Exchanges of this vhost the topic policy covers (empty when it restricts nothing).
    acl_exchanges: Vec<String>,
}

impl Grant {
    /// The policy this grant was resolved from (to notice a reload: compare with
    /// [`Arc::ptr_eq`]).
    pub fn policy(&self) -> &Arc<AccessPolicy> {
        &self.policy
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// `true` when nothing restricts this user on this vhost (no checks needed).
    pub fn unrestricted(&self) -> bool {
        self.resources.is_none() && self.topics.is_empty() && self.acl_exchanges.is_empty()
    }

    /// May the user `permission` the exchange or queue `name`? The default exchange `""` is
    /// checked as `amq.default`, as RabbitMQ does.
    pub fn check(&self, permission: Permission, resource: Resource, name: &str) -> Result<(), Denied> {
        let name = if resource == Resource::Exchange && name.is_empty() { "amq.default" } else { name };
        let denied = || {
            Denied(format!(
                "{permission} access to {resource} '{name}' in vhost '{}' refused for user '{}'",
                self.vhost, self.user
            ))
        };
        // The MQTT frontend's own queues hold what MQTT subscriptions (other clients') let
        // through: under its policy, only a user who may read everything may touch them.
        let topics = &self.policy.topic_policy;
        if resource == Resource::Queue
            && !self.acl_exchanges.is_empty()
            && topics.reserves_queue(name.as_bytes())
            && !topics.may_read_everything(self.acl_user())
        {
            return Err(denied());
        }
        let Some(p) = &self.resources else { return Ok(()) };
        if p.pattern(permission).is_match(name) {
            return Ok(());
        }
        Err(denied())
    }

    /// The user as the topic policy sees it (`None`: anonymous).
    fn acl_user(&self) -> Option<&str> {
        (!self.anonymous).then_some(self.user.as_str())
    }

    /// May messages be routed into the MQTT exchange `destination` with keys matching `key`
    /// (an exchange-to-exchange binding, an alternate or a dead-letter exchange, `#` for
    /// whatever key a message has)? Under the topic policy that is publishing with every key
    /// `key` can match; other destinations are not its business.
    pub fn check_route_into(&self, destination: &str, key: &str) -> Result<(), Denied> {
        if !self.acl_exchanges.iter().any(|e| e == destination) {
            return Ok(());
        }
        if self.policy.topic_policy.may_publish_matching(self.acl_user(), key) {
            return Ok(());
        }
        Err(Denied(format!(
            "write access to topic '{key}' in exchange '{destination}' in vhost '{}' refused for user '{}'",
            self.vhost, self.user
        )))
    }

    /// May the user publish with `routing_key` to (`Write`), or bind with the binding key
    /// `routing_key` on (`Read`), the exchange `exchange`? Topic permissions apply to topic
    /// exchanges (`is_topic`, asked only when a topic permission names the exchange); the topic
    /// policy to the MQTT exchanges, whatever their type.
    pub fn check_topic(
        &self,
        permission: Permission,
        exchange: &str,
        is_topic: impl FnOnce() -> bool,
        routing_key: &str,
    ) -> Result<(), Denied> {
        let denied = || {
            Denied(format!(
                "{permission} access to topic '{routing_key}' in exchange '{exchange}' in vhost '{}' refused for user '{}'",
                self.vhost, self.user
            ))
        };
        if let Some(t) = self.topics.iter().find(|t| t.exchange == exchange) {
            if is_topic() {
                let pattern = if permission == Permission::Read { &t.read } else { &t.write };
                if !pattern.is_match(routing_key) {
                    return Err(denied());
                }
            }
        }
        if self.acl_exchanges.iter().any(|e| e == exchange) {
            let user = self.acl_user();
            let topics = &self.policy.topic_policy;
            let allowed = match permission {
                Permission::Read => topics.may_read_matching(user, routing_key),
                _ => topics.may_publish(user, routing_key),
            };
            if !allowed {
                return Err(denied());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::OwnKeys;

    fn perms(user: &str, configure: &str, write: &str, read: &str) -> VhostPermissions {
        VhostPermissions {
            user: user.into(),
            vhost: "/".into(),
            configure: Pattern::new(configure).unwrap(),
            write: Pattern::new(write).unwrap(),
            read: Pattern::new(read).unwrap(),
        }
    }

    #[test]
    fn no_permissions_configured_means_everything_allowed() {
        let policy = Arc::new(AccessPolicy::default());
        let g = policy.grant("anyone", false, "/other").unwrap();
        assert!(g.unrestricted());
        assert!(g.check(Permission::Configure, Resource::Queue, "q").is_ok());
        assert!(g.check_topic(Permission::Write, "amq.topic", || true, "a.b").is_ok());
    }

    #[test]
    fn vhost_access_and_resource_checks_as_rabbitmq() {
        let policy = Arc::new(AccessPolicy {
            permissions: vec![perms("alice", "^alice\\.", "^(alice\\.|amq\\.default$)", "")],
            ..AccessPolicy::default()
        });
        assert_eq!(policy.grant("bob", false, "/").unwrap_err().0, "access to vhost '/' refused for user 'bob'");
        assert!(policy.grant("alice", false, "other").is_err());
        let g = policy.grant("alice", false, "/").unwrap();
        assert!(g.check(Permission::Configure, Resource::Queue, "alice.q").is_ok());
        assert_eq!(
            g.check(Permission::Configure, Resource::Queue, "bob.q").unwrap_err().0,
            "configure access to queue 'bob.q' in vhost '/' refused for user 'alice'"
        );
        assert!(g.check(Permission::Write, Resource::Exchange, "").is_ok(), "the default exchange is amq.default");
        assert!(g.check(Permission::Write, Resource::Exchange, "amq.default.x").is_err());
        // An empty pattern matches nothing, not everything.
        assert!(g.check(Permission::Read, Resource::Queue, "alice.q").is_err());
        // Unanchored search, as Erlang's re:run.
        let g = Arc::new(AccessPolicy { permissions: vec![perms("u", "q", "q", "q")], ..AccessPolicy::default() })
            .grant("u", false, "/")
            .unwrap();
        assert!(g.check(Permission::Read, Resource::Queue, "my-queue").is_ok());
    }

    #[test]
    fn topic_permissions_expand_variables_escaped_and_apply_to_topic_exchanges_only() {
        let policy = Arc::new(AccessPolicy {
            topic_permissions: vec![TopicPermissions {
                user: "a.b".into(),
                vhost: "/".into(),
                exchange: "amq.topic".into(),
                write: "^sensors\\.{username}\\.".into(),
                read: "^sensors\\.".into(),
            }],
            ..AccessPolicy::default()
        });
        let g = policy.grant("a.b", false, "/").unwrap();
        assert!(g.check_topic(Permission::Write, "amq.topic", || true, "sensors.a.b.t").is_ok());
        // `.` in the user name is a literal dot, not "any character".
        assert_eq!(
            g.check_topic(Permission::Write, "amq.topic", || true, "sensors.aXb.t").unwrap_err().0,
            "write access to topic 'sensors.aXb.t' in exchange 'amq.topic' in vhost '/' refused for user 'a.b'"
        );
        assert!(g.check_topic(Permission::Read, "amq.topic", || true, "sensors.#").is_ok());
        assert!(g.check_topic(Permission::Read, "amq.topic", || true, "other.#").is_err());
        assert!(g.check_topic(Permission::Write, "amq.topic", || false, "anything").is_ok(), "not a topic exchange");
        assert!(g.check_topic(Permission::Write, "other", || true, "anything").is_ok(), "no entry for the exchange");
        assert!(policy.grant("someone", false, "/").unwrap().unrestricted());
    }

    #[test]
    fn the_topic_policy_covers_amqp_on_the_mqtt_exchanges_only() {
        let policy = Arc::new(AccessPolicy {
            topic_policy: Arc::new(OwnKeys),
            mqtt_exchanges: vec![MqttExchange { vhost: "/".into(), exchange: "amq.topic".into() }],
            ..AccessPolicy::default()
        });
        let alice = policy.grant("alice", false, "/").unwrap();
        assert!(!alice.unrestricted());
        assert!(alice.check_topic(Permission::Write, "amq.topic", || true, "alice.t").is_ok());
        assert_eq!(
            alice.check_topic(Permission::Write, "amq.topic", || true, "bob.t").unwrap_err().0,
            "write access to topic 'bob.t' in exchange 'amq.topic' in vhost '/' refused for user 'alice'"
        );
        assert!(alice.check_topic(Permission::Read, "amq.topic", || true, "alice.#").is_ok());
        assert!(alice.check_topic(Permission::Read, "amq.topic", || true, "#").is_err());
        assert!(alice.check_topic(Permission::Write, "other", || true, "bob.t").is_ok(), "not an MQTT exchange");
        // Routing into the MQTT exchange from elsewhere is publishing there.
        assert!(alice.check_route_into("amq.topic", "alice.#").is_ok());
        assert_eq!(
            alice.check_route_into("amq.topic", "#").unwrap_err().0,
            "write access to topic '#' in exchange 'amq.topic' in vhost '/' refused for user 'alice'"
        );
        assert!(alice.check_route_into("other", "#").is_ok(), "not an MQTT exchange");
        // The frontend's own queues: only for who may read everything.
        assert!(alice.check(Permission::Read, Resource::Queue, "own.bob").is_err());
        assert!(alice.check(Permission::Read, Resource::Queue, "alice.q").is_ok());
        let root = policy.grant("root", false, "/").unwrap();
        assert!(root.check(Permission::Read, Resource::Queue, "own.bob").is_ok());
        // An anonymous client is no user to the policy, whatever its name.
        let anon = policy.grant("alice", true, "/").unwrap();
        assert!(anon.check_topic(Permission::Write, "amq.topic", || true, "alice.t").is_err());
        // Other vhosts' exchanges are not covered; a policy that restricts nothing covers none.
        assert!(policy.grant("alice", false, "/v2").unwrap().unrestricted());
        let open = Arc::new(AccessPolicy { topic_policy: Arc::new(Open), ..(*policy).clone() });
        assert!(open.grant("alice", false, "/").unwrap().unrestricted());
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(Pattern::new("(").is_err());
        assert!(Pattern::new("^(?=x)").is_err(), "no look-ahead");
        assert!(TopicPermissions::validate("^a\\.{username}$").is_ok());
        assert!(TopicPermissions::validate("{username}(").is_err());
    }
}

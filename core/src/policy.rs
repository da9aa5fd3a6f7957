//! What a frontend decides about the names it owns, asked by the core and by the other
//! frontends: who may publish or read which routing keys on the frontend's exchanges, and which
//! queue names the frontend keeps for its own clients.
//!
//! The core knows no topic syntax. A frontend whose clients are held to topic rules of their
//! own (the MQTT frontend's ACL, with its `%u`/`%c` patterns and `+`/`#` wildcards) implements
//! [`TopicPolicy`]; the server builds it from the config and installs it with the rest of the
//! [`AccessPolicy`](crate::permissions::AccessPolicy) (swapped whole on a reload). The
//! questions come in the core's words, routing keys and binding keys: the implementation maps
//! them to its own topics. Then:
//! - an AMQP connection publishing to, binding on or routing into an exchange the frontend's
//!   clients publish to is held to the same rules ([`Grant`](crate::permissions::Grant));
//! - the frontend's reserved queues are refused to other protocols' verbs
//!   ([`TopicPolicy::queue_refusal`]), and the default exchange does not route into them
//!   ([`TopicPolicy::reserves_queue`], asked on the publish path).
//!
//! With no frontend policy installed, [`Open`] allows everything and reserves nothing.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

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

impl QueueUse {
    /// The verb for a refusal's text ("cannot {verb} queue ...").
    pub fn verb(self) -> &'static str {
        match self {
            QueueUse::Declare => "declare",
            QueueUse::Bind => "bind",
            QueueUse::Unbind => "unbind",
            QueueUse::Purge => "purge",
            QueueUse::Delete => "delete",
            QueueUse::Consume => "consume from",
            QueueUse::Publish => "publish to",
        }
    }
}

/// A frontend's rules over its exchanges' routing keys and its own queues. `user` is `None`
/// for an anonymous client. The `may_*` questions are about the exchanges the frontend's
/// clients publish to (which ones, per vhost, is the
/// [`AccessPolicy`](crate::permissions::AccessPolicy)'s business); they are asked only when
/// [`restricts`](TopicPolicy::restricts) says so.
pub trait TopicPolicy: Send + Sync + fmt::Debug + 'static {
    /// Does any rule restrict anyone? `false`: every `may_*` answers `true`.
    fn restricts(&self) -> bool;

    /// May `user` publish a message with `routing_key`?
    fn may_publish(&self, user: Option<&str>, routing_key: &str) -> bool;

    /// May `user` publish with every key `binding_key` matches (an exchange-to-exchange binding,
    /// an alternate or a dead-letter exchange routing into the frontend's exchange)?
    fn may_publish_matching(&self, user: Option<&str>, binding_key: &str) -> bool;

    /// May `user` read every message `binding_key` matches (a queue bound on the frontend's
    /// exchange with it)?
    fn may_read_matching(&self, user: Option<&str>, binding_key: &str) -> bool;

    /// May `user` read everything (and so touch the queues the frontend's subscriptions fill)?
    fn may_read_everything(&self, user: Option<&str>) -> bool;

    /// Is `name` one of the frontend's own queues? Asked on the publish path of the default
    /// exchange: a prefix check, no allocation.
    fn reserves_queue(&self, name: &[u8]) -> bool;

    /// Why another protocol's client may not `what` the queue `name` of `vhost` (`None`: it
    /// may). Only for names [`reserves_queue`](TopicPolicy::reserves_queue) accepts.
    fn queue_refusal(&self, vhost: &str, name: &str, what: QueueUse) -> Option<String>;

    /// The policy as `Any`, for its frontend to take its own type back (its clients' checks
    /// speak the frontend's syntax, which this trait does not).
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

/// No frontend rules: everything allowed, no queue reserved. The default of a broker nobody
/// installed a policy in (a test, an embedding): there, the default exchange also reaches the
/// MQTT frontend's session queues. The server installs the frontends' policy
/// (`Broker::set_access`) before it accepts a connection or starts housekeeping.
#[derive(Debug, Clone, Copy, Default)]
pub struct Open;

impl TopicPolicy for Open {
    fn restricts(&self) -> bool {
        false
    }
    fn may_publish(&self, _: Option<&str>, _: &str) -> bool {
        true
    }
    fn may_publish_matching(&self, _: Option<&str>, _: &str) -> bool {
        true
    }
    fn may_read_matching(&self, _: Option<&str>, _: &str) -> bool {
        true
    }
    fn may_read_everything(&self, _: Option<&str>) -> bool {
        true
    }
    fn reserves_queue(&self, _: &[u8]) -> bool {
        false
    }
    fn queue_refusal(&self, _: &str, _: &str, _: QueueUse) -> Option<String> {
        None
    }
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// What the core's tests install as a frontend's policy.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// For tests: a topic policy in neutral words: a user may publish and read the keys under its own
    /// name, `root` may read everything, and queues named `own.*` are the frontend's.
    #[derive(Debug)]
    pub(crate) struct OwnKeys;

    impl OwnKeys {
        fn own(user: Option<&str>, key: &str) -> bool {
            user.is_some_and(|u| key.strip_prefix(u).is_some_and(|rest| rest.starts_with('.')))
        }
    }

    impl TopicPolicy for OwnKeys {
        fn restricts(&self) -> bool {
            true
        }
        fn may_publish(&self, user: Option<&str>, routing_key: &str) -> bool {
            OwnKeys::own(user, routing_key)
        }
        fn may_publish_matching(&self, user: Option<&str>, binding_key: &str) -> bool {
            OwnKeys::own(user, binding_key)
        }
        fn may_read_matching(&self, user: Option<&str>, binding_key: &str) -> bool {
            user == Some("root") || OwnKeys::own(user, binding_key)
        }
        fn may_read_everything(&self, user: Option<&str>) -> bool {
            user == Some("root")
        }
        fn reserves_queue(&self, name: &[u8]) -> bool {
            name.starts_with(b"own.")
        }
        fn queue_refusal(&self, vhost: &str, name: &str, what: QueueUse) -> Option<String> {
            self.reserves_queue(name.as_bytes()).then(|| format!("cannot {} '{name}' in '{vhost}'", what.verb()))
        }
        fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
            self
        }
    }
}

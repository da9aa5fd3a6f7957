//! Authorization of an AMQP connection's methods: the user's [`Grant`] on its vhost, refreshed
//! when a reload replaces the broker's policy, and RabbitMQ's 403 for what it refuses. Which
//! method needs which permission is decided where the method is handled (its class's file under
//! `connection/`), as in RabbitMQ's `rabbit_channel`; the table is in `docs/configuration.md`.

use std::sync::Arc;

use ferry_core::permissions::{Denied, Grant, Permission, Resource};
use ferry_core::policy::QueueUse;
use ferry_core::Broker;

use crate::codec::reply_code;
use crate::errors::AmqpError;

/// The connection's access after connection.open.
#[derive(Debug)]
pub struct Access {
    user: String,
    anonymous: bool,
    vhost: String,
    /// `Err` when a reload took the vhost away from the user: everything is refused with the
    /// vhost's text until the connection closes.
    grant: Result<Grant, Denied>,
    /// The policy `grant` was resolved from (also when it was refused).
    policy: Arc<ferry_core::permissions::AccessPolicy>,
}

fn refused(d: Denied) -> AmqpError {
    AmqpError::new(reply_code::ACCESS_REFUSED, d.0)
}

impl Access {
    /// Resolves the user's grant on `vhost`; refused with RabbitMQ's 530 NOT_ALLOWED (a
    /// connection error) when the user has no permissions there.
    pub fn open(broker: &Broker, user: &str, anonymous: bool, vhost: &str) -> Result<Access, AmqpError> {
        let policy = broker.access();
        let grant = policy.grant(user, anonymous, vhost).map_err(|d| AmqpError::new(reply_code::NOT_ALLOWED, d.0))?;
        Ok(Access { user: user.to_string(), anonymous, vhost: vhost.to_string(), grant: Ok(grant), policy })
    }

    /// The grant under the policy in force now (a pointer comparison when nothing changed).
    fn current(&mut self, broker: &Broker) -> Result<&Grant, AmqpError> {
        if !broker.access_is(&self.policy) {
            self.policy = broker.access();
            self.grant = self.policy.grant(&self.user, self.anonymous, &self.vhost);
        }
        self.grant.as_ref().map_err(|d| refused(d.clone()))
    }

    /// `true` when nothing restricts the connection (the common case: no permissions configured).
    pub fn unrestricted(&mut self, broker: &Broker) -> bool {
        self.current(broker).is_ok_and(Grant::unrestricted)
    }

    /// [`Broker::reserved_queue_refusal`] under the policy the last check found in force, without
    /// loading the broker's again: a publish to the default exchange asks right after
    /// [`Access::unrestricted`].
    pub fn reserved_queue_refusal(&self, vhost: &str, name: &[u8], what: QueueUse) -> Option<String> {
        self.policy.reserved_queue_refusal(vhost, name, what)
    }

    /// RabbitMQ's `check_{configure,write,read}_permitted`.
    pub fn check(
        &mut self,
        broker: &Broker,
        permission: Permission,
        resource: Resource,
        name: &str,
    ) -> Result<(), AmqpError> {
        self.current(broker)?.check(permission, resource, name).map_err(refused)
    }

    /// Routing into an MQTT exchange (an exchange-to-exchange binding, an alternate or a
    /// dead-letter exchange) is publishing there: the MQTT ACL's write rules, for every key.
    pub fn check_route_into(&mut self, broker: &Broker, destination: &str, key: &str) -> Result<(), AmqpError> {
        self.current(broker)?.check_route_into(destination, key).map_err(refused)
    }

    /// RabbitMQ's `check_{write,read}_permitted_on_topic`, plus the MQTT ACL on MQTT exchanges.
    /// `is_topic` is asked only when a topic permission could apply.
    pub fn check_topic(
        &mut self,
        broker: &Broker,
        permission: Permission,
        exchange: &str,
        is_topic: impl FnOnce() -> bool,
        routing_key: &str,
    ) -> Result<(), AmqpError> {
        self.current(broker)?.check_topic(permission, exchange, is_topic, routing_key).map_err(refused)
    }
}

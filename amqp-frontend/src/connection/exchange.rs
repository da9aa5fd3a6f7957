//! The exchange class: exchange.declare, delete, bind, unbind.

use ferry_core::exchange::{BindingKey, ExchangeOptions};
use ferry_core::permissions::{Permission, Resource};
use ferry_core::vhost::ExchangeDeclare;

use super::Connection;
use crate::codec::{self, ExchangeBindOk, ExchangeDeclareOk, ExchangeDeleteOk, ExchangeUnbindOk, Method};
use crate::errors::AmqpError;

impl Connection {
    pub(super) fn on_exchange_declare(&mut self, ch: u16, d: codec::ExchangeDeclare) -> Result<(), AmqpError> {
        if !d.passive && self.restricted() {
            self.authorize(Permission::Configure, Resource::Exchange, &d.exchange)?;
            if let Some(ae) = Self::exchange_argument(&d.arguments, "alternate-exchange") {
                self.authorize(Permission::Read, Resource::Exchange, &d.exchange)?;
                self.authorize(Permission::Write, Resource::Exchange, &ae)?;
                // Unroutable messages go there with whatever key they have.
                self.authorize_route_into(&ae, "#")?;
            }
        }
        let decl = ExchangeDeclare {
            name: d.exchange.clone(),
            kind: d.kind.to_string_lossy(),
            passive: d.passive,
            options: ExchangeOptions {
                durable: d.durable,
                auto_delete: d.auto_delete,
                internal: d.internal,
                arguments: d.arguments,
            },
        };
        self.vhost().declare_exchange(decl)?;
        if !d.nowait {
            self.send(ch, Method::ExchangeDeclareOk(ExchangeDeclareOk {}));
        }
        Ok(())
    }

    pub(super) fn on_exchange_delete(&mut self, ch: u16, d: codec::ExchangeDelete) -> Result<(), AmqpError> {
        if self.restricted() {
            self.authorize(Permission::Configure, Resource::Exchange, &d.exchange)?;
        }
        self.vhost().delete_exchange(&d.exchange, d.if_unused)?;
        if !d.nowait {
            self.send(ch, Method::ExchangeDeleteOk(ExchangeDeleteOk {}));
        }
        Ok(())
    }

    pub(super) fn on_exchange_bind(&mut self, ch: u16, b: codec::ExchangeBind) -> Result<(), AmqpError> {
        if self.restricted() {
            self.authorize(Permission::Write, Resource::Exchange, &b.destination)?;
            self.authorize(Permission::Read, Resource::Exchange, &b.source)?;
            self.authorize_topic(Permission::Read, &b.source, &b.routing_key)?;
            self.authorize_route_into(&b.destination, &b.routing_key.to_string_lossy())?;
        }
        let key = BindingKey::new(b.routing_key).with_arguments(b.arguments);
        self.vhost().bind_exchange(&b.destination, &b.source, key)?;
        if !b.nowait {
            self.send(ch, Method::ExchangeBindOk(ExchangeBindOk {}));
        }
        Ok(())
    }

    pub(super) fn on_exchange_unbind(&mut self, ch: u16, b: codec::ExchangeUnbind) -> Result<(), AmqpError> {
        if self.restricted() {
            self.authorize(Permission::Write, Resource::Exchange, &b.destination)?;
            self.authorize(Permission::Read, Resource::Exchange, &b.source)?;
            self.authorize_topic(Permission::Read, &b.source, &b.routing_key)?;
        }
        let key = BindingKey::new(b.routing_key).with_arguments(b.arguments);
        self.vhost().unbind_exchange(&b.destination, &b.source, key)?;
        if !b.nowait {
            self.send(ch, Method::ExchangeUnbindOk(ExchangeUnbindOk {}));
        }
        Ok(())
    }
}

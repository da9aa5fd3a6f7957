//! The queue class: queue.declare (with direct reply-to's pseudo-queue), bind, unbind, purge,
//! delete.

use ferry_core::exchange::BindingKey;
use ferry_core::message::{FieldTable, Millis, ShortString};
use ferry_core::permissions::{Permission, Resource};
use ferry_core::policy::QueueUse;
use ferry_core::queue::QueueOptions;
use ferry_core::vhost::{generated_queue_name, QueueDeclare};

use super::{Connection, REPLY_TO};
use crate::codec::{self, reply_code, Method, QueueBindOk, QueueDeclareOk, QueueDeleteOk, QueuePurgeOk, QueueUnbindOk};
use crate::errors::AmqpError;

impl Connection {
    pub(super) fn on_queue_declare(&mut self, ch: u16, d: codec::QueueDeclare, now: Millis) -> Result<(), AmqpError> {
        let conn = self.id;
        if d.queue.as_bytes().starts_with(REPLY_TO.as_bytes()) {
            return self.declare_reply_to(ch, d.queue, d.nowait);
        }
        let mut name = if d.passive && d.queue.is_empty() { self.queue_name(ch, d.queue)? } else { d.queue };
        // A server-named queue is checked under the name it will get, as RabbitMQ does.
        let mut server_named = false;
        if !d.passive && self.restricted() {
            if name.is_empty() {
                name = generated_queue_name();
                server_named = true;
            }
            self.authorize(Permission::Configure, Resource::Queue, &name)?;
            if let Some(dlx) = Self::exchange_argument(&d.arguments, "x-dead-letter-exchange") {
                self.authorize(Permission::Read, Resource::Queue, &name)?;
                self.authorize(Permission::Write, Resource::Exchange, &dlx)?;
                // Dead letters go there with the configured key, or their own (any).
                let key = d.arguments.get("x-dead-letter-routing-key").and_then(|v| v.as_str());
                let key = key.map(str::to_string).unwrap_or_else(|| "#".to_string());
                self.authorize_route_into(&dlx, &key)?;
            }
        }
        if !d.passive {
            self.guard_reserved_queue(&name, QueueUse::Declare)?;
        }
        let options = QueueOptions {
            durable: d.durable,
            exclusive: d.exclusive.then_some(conn),
            auto_delete: d.auto_delete,
            arguments: d.arguments,
        };
        let decl = QueueDeclare { name, passive: d.passive, options, connection: conn };
        let declared = if server_named {
            self.vhost().declare_reserved_queue(decl, now)?
        } else {
            self.vhost().declare_queue(decl, now)?
        };
        let qname = declared.queue.name().clone();
        self.channel(ch).last_queue = Some(qname.clone());
        if !d.nowait {
            self.send(
                ch,
                Method::QueueDeclareOk(QueueDeclareOk {
                    queue: qname,
                    message_count: declared.stats.ready,
                    consumer_count: declared.stats.consumers,
                }),
            );
        }
        Ok(())
    }

    /// queue.declare of `amq.rabbitmq.reply-to` (passive or not, whatever the flags): the
    /// pseudo-queue always exists, as in RabbitMQ 3.10, which answers declare-ok with 0 messages
    /// and 1 consumer and checks no permission (FastStream / aio-pika declare it passively before
    /// an RPC call). A channel's own reply queue name (`amq.rabbitmq.reply-to.<token>`) exists
    /// while its consumer does; another name under the prefix is 404, never a real declaration.
    pub(super) fn declare_reply_to(&mut self, ch: u16, name: ShortString, nowait: bool) -> Result<(), AmqpError> {
        if name != REPLY_TO && self.vhost().queue(&name.to_string_lossy()).is_none() {
            return Err(AmqpError::new(
                reply_code::NOT_FOUND,
                format!("no queue '{name}' in vhost '{}'", self.vhost().name()),
            ));
        }
        self.channel(ch).last_queue = Some(name.clone());
        if !nowait {
            self.send(ch, Method::QueueDeclareOk(QueueDeclareOk { queue: name, message_count: 0, consumer_count: 1 }));
        }
        Ok(())
    }

    pub(super) fn on_queue_bind(&mut self, ch: u16, b: codec::QueueBind) -> Result<(), AmqpError> {
        let (q, key) = self.binding_of(ch, b.queue, &b.exchange, b.routing_key, b.arguments, QueueUse::Bind)?;
        self.vhost().bind_queue(&q, &b.exchange, key, self.id)?;
        if !b.nowait {
            self.send(ch, Method::QueueBindOk(QueueBindOk {}));
        }
        Ok(())
    }

    pub(super) fn on_queue_unbind(&mut self, ch: u16, b: codec::QueueUnbind) -> Result<(), AmqpError> {
        let (q, key) = self.binding_of(ch, b.queue, &b.exchange, b.routing_key, b.arguments, QueueUse::Unbind)?;
        self.vhost().unbind_queue(&q, &b.exchange, key, self.id)?;
        self.send(ch, Method::QueueUnbindOk(QueueUnbindOk {}));
        Ok(())
    }

    /// The queue and binding key of a `queue.bind` / `queue.unbind`, once the user may make or
    /// remove it (RabbitMQ's checks: write on the queue, read on the exchange, the topic
    /// permission on the key) and the queue is not one of the MQTT frontend's.
    fn binding_of(
        &mut self,
        ch: u16,
        queue: ShortString,
        exchange: &ShortString,
        routing_key: ShortString,
        arguments: FieldTable,
        what: QueueUse,
    ) -> Result<(ShortString, BindingKey), AmqpError> {
        let q = self.queue_name(ch, queue)?;
        if self.restricted() {
            self.authorize(Permission::Write, Resource::Queue, &q)?;
            self.authorize(Permission::Read, Resource::Exchange, exchange)?;
            self.authorize_topic(Permission::Read, exchange, &routing_key)?;
        }
        self.guard_reserved_queue(&q, what)?;
        Ok((q, BindingKey::new(routing_key).with_arguments(arguments)))
    }

    pub(super) fn on_queue_purge(&mut self, ch: u16, p: codec::QueuePurge, now: Millis) -> Result<(), AmqpError> {
        let conn = self.id;
        let q = self.queue_name(ch, p.queue)?;
        if self.restricted() {
            self.authorize(Permission::Read, Resource::Queue, &q)?;
        }
        self.guard_reserved_queue(&q, QueueUse::Purge)?;
        let n = self.vhost().purge_queue(&q, conn, now)?;
        if !p.nowait {
            self.send(ch, Method::QueuePurgeOk(QueuePurgeOk { message_count: n }));
        }
        Ok(())
    }

    pub(super) fn on_queue_delete(&mut self, ch: u16, d: codec::QueueDelete, now: Millis) -> Result<(), AmqpError> {
        let conn = self.id;
        let q = self.queue_name(ch, d.queue)?;
        if self.restricted() {
            self.authorize(Permission::Configure, Resource::Queue, &q)?;
        }
        self.guard_reserved_queue(&q, QueueUse::Delete)?;
        let n = self.vhost().delete_queue(&q, conn, d.if_unused, d.if_empty, now)?;
        if !d.nowait {
            self.send(ch, Method::QueueDeleteOk(QueueDeleteOk { message_count: n }));
        }
        Ok(())
    }
}

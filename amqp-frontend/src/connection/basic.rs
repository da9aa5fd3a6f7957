//! The basic class: qos, consume (and direct reply-to's consumer), cancel, the publish method
//! (its content is assembled in `content.rs`), get, ack / nack / reject, recover; and
//! deliveries, encoded from the outbox.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use ferry_core::message::{process_seed, FieldTable, Millis, ShortString};
use ferry_core::permissions::{Permission, Resource};
use ferry_core::policy::QueueUse;
use ferry_core::queue::{ConsumerSpec, Queue, QueueOptions};
use ferry_core::vhost::QueueDeclare;

use super::{consumer_tag, Connection, REPLY_TO};
use crate::channel::{AmqpConsumerSink, Outgoing, PartialPublish, TxOp};
use crate::codec::*;
use crate::errors::AmqpError;

impl Connection {
    pub(super) fn on_basic_qos(&mut self, ch: u16, q: BasicQos, now: Millis) -> Result<(), AmqpError> {
        if q.prefetch_size != 0 {
            return Err(AmqpError::new(reply_code::NOT_IMPLEMENTED, format!("prefetch_size!=0 ({})", q.prefetch_size)));
        }
        let c = self.channel(ch);
        if q.global {
            c.credit.limit.store(q.prefetch_count as u32, Ordering::Relaxed);
        } else {
            c.consumer_prefetch = q.prefetch_count;
        }
        self.send(ch, Method::BasicQosOk(BasicQosOk {}));
        self.pump_channel_queues(ch, now);
        Ok(())
    }

    pub(super) fn on_basic_consume(&mut self, ch: u16, c: BasicConsume, now: Millis) -> Result<(), AmqpError> {
        let conn = self.id;
        // RabbitMQ 3.12+ (`consumer_max_per_channel`): checked first, for a tag not in use (a
        // reused tag gets its own error below); a connection error.
        let max = self.settings.consumer_max_per_channel;
        let consumers = &self.channel(ch).consumers;
        if consumers.len() >= max as usize && !consumers.contains_key(&c.consumer_tag) {
            return Err(AmqpError::new(
                reply_code::NOT_ALLOWED,
                format!("reached maximum ({max}) of consumers per channel"),
            ));
        }
        let qname = if c.queue == REPLY_TO {
            // Direct reply-to needs no permission (as in RabbitMQ): the pseudo-queue is the
            // connection's own.
            self.reply_queue(ch, c.no_ack, now)?
        } else {
            let q = self.queue_name(ch, c.queue)?;
            if self.restricted() {
                self.authorize(Permission::Read, Resource::Queue, &q)?;
            }
            self.guard_reserved_queue(&q, QueueUse::Consume)?;
            q
        };
        let tag = if c.consumer_tag.is_empty() { consumer_tag() } else { c.consumer_tag };
        if self.channel(ch).consumers.contains_key(&tag) {
            return Err(AmqpError::new(reply_code::NOT_ALLOWED, format!("attempt to reuse consumer tag '{tag}'")));
        }
        let q = self.vhost().queue_for(&qname, conn)?;
        let priority = match c.arguments.get("x-priority") {
            None => 0,
            Some(v) => v.as_i64().and_then(|p| i32::try_from(p).ok()).ok_or_else(|| {
                AmqpError::new(reply_code::PRECONDITION_FAILED, format!("invalid x-priority argument {v:?}"))
            })?,
        };
        let channel = self.channels.get(&ch).expect("open");
        let sink = Arc::new(AmqpConsumerSink {
            channel: ch,
            consumer_tag: tag.clone(),
            no_ack: c.no_ack,
            queue: Arc::downgrade(&q),
            outbox: self.outbox.clone(),
            credit: channel.credit.clone(),
        });
        let spec = ConsumerSpec {
            tag: tag.clone(),
            owner: channel.owner,
            connection: conn,
            prefetch: if c.no_ack { 0 } else { channel.consumer_prefetch as u32 },
            no_ack: c.no_ack,
            exclusive: c.exclusive,
            priority,
            sink,
        };
        // consume-ok goes out before any delivery: deliveries wait in the outbox until the
        // driver pumps, after this method's reply is in `out`.
        let mark = self.out.len();
        if !c.nowait {
            self.send(ch, Method::BasicConsumeOk(BasicConsumeOk { consumer_tag: tag.clone() }));
        }
        let (q, id) = match self.vhost().consume(q.name(), spec, now) {
            Ok(r) => r,
            Err(e) => {
                // Take back the consume-ok written above.
                self.out.truncate(mark);
                return Err(e.into());
            }
        };
        self.channel(ch).consumers.insert(tag, (q, id));
        Ok(())
    }

    /// Direct reply-to (RabbitMQ's `amq.rabbitmq.reply-to`): the channel gets an exclusive,
    /// auto-delete queue `amq.rabbitmq.reply-to.<token>`; its consumer must be no-ack. Replies are
    /// published to the default exchange with that name as routing key.
    pub(super) fn reply_queue(&mut self, ch: u16, no_ack: bool, now: Millis) -> Result<ShortString, AmqpError> {
        if !no_ack {
            return Err(AmqpError::new(reply_code::PRECONDITION_FAILED, "reply consumer cannot acknowledge"));
        }
        if let Some(q) = &self.channel(ch).reply_to {
            return Err(AmqpError::new(
                reply_code::PRECONDITION_FAILED,
                format!("channel {ch} already consumes from direct reply-to ({q})"),
            ));
        }
        static N: AtomicU64 = AtomicU64::new(1);
        let name = ShortString::from(format!(
            "{REPLY_TO}.g{:x}{:x}.{}",
            process_seed(),
            N.fetch_add(1, Ordering::Relaxed),
            self.id.0
        ));
        let options =
            QueueOptions { durable: false, exclusive: Some(self.id), auto_delete: true, arguments: FieldTable::new() };
        let decl = QueueDeclare { name: name.clone(), passive: false, options, connection: self.id };
        self.vhost().declare_reserved_queue(decl, now)?;
        self.channel(ch).reply_to = Some(name.clone());
        Ok(name)
    }

    pub(super) fn on_basic_cancel(&mut self, ch: u16, c: BasicCancel, now: Millis) -> Result<(), AmqpError> {
        if let Some((q, id)) = self.channel(ch).consumers.remove(&c.consumer_tag) {
            let chan = self.channel(ch);
            if chan.reply_to.as_ref() == Some(q.name()) {
                chan.reply_to = None;
            }
            self.vhost().cancel(&q, id, now);
        }
        if !c.nowait {
            self.send(ch, Method::BasicCancelOk(BasicCancelOk { consumer_tag: c.consumer_tag }));
        }
        Ok(())
    }

    /// basic.publish: the message is complete once its header and body follow (`content.rs`).
    pub(super) fn on_basic_publish(&mut self, ch: u16, p: BasicPublish) -> Result<(), AmqpError> {
        if p.immediate {
            return Err(AmqpError::new(reply_code::NOT_IMPLEMENTED, "immediate=true"));
        }
        if self.restricted() {
            self.authorize(Permission::Write, Resource::Exchange, &p.exchange)?;
            self.authorize_topic(Permission::Write, &p.exchange, &p.routing_key)?;
        }
        if p.exchange.is_empty() {
            // Under the policy `restricted` just loaded: one load of the broker's per publish.
            self.guard_reserved_queue_checked(&p.routing_key, QueueUse::Publish)?;
        }
        self.channel(ch).content =
            Some(PartialPublish { method: p, header: None, body: None, body_buf: BytesMut::new() });
        Ok(())
    }

    pub(super) fn on_basic_get(&mut self, ch: u16, g: BasicGet, now: Millis) -> Result<(), AmqpError> {
        let conn = self.id;
        let qname = self.queue_name(ch, g.queue)?;
        if self.restricted() {
            self.authorize(Permission::Read, Resource::Queue, &qname)?;
        }
        self.guard_reserved_queue(&qname, QueueUse::Consume)?;
        let q = self.vhost().queue_for(&qname, conn)?;
        let owner = self.channel(ch).owner;
        // Through the vhost: a queue whose messages are on disk reads them back first.
        let got = self.vhost().get(&q, owner, g.no_ack, now);
        match got {
            None => self.send(ch, Method::BasicGetEmpty(BasicGetEmpty { cluster_id: ShortString::default() })),
            Some((d, count)) => {
                let c = self.channel(ch);
                c.next_tag += 1;
                let tag = c.next_tag;
                if !g.no_ack {
                    c.unacked
                        .insert(tag, crate::channel::Unacked { queue: q.clone(), seq: d.seq, counts_credit: false });
                }
                let m = &d.message;
                if let Err(e) = encode_get_ok(
                    &mut self.out,
                    ch,
                    tag,
                    d.redelivered,
                    &m.exchange,
                    &m.routing_key,
                    count,
                    &m.properties,
                    &m.payload,
                    self.frame_max,
                ) {
                    tracing::warn!(conn = %self.id, error = %e, "get-ok not encodable");
                } else {
                    self.messages_out += 1;
                }
            }
        }
        Ok(())
    }

    pub(super) fn on_basic_ack(&mut self, ch: u16, a: BasicAck, now: Millis) -> Result<(), AmqpError> {
        if let Some(tx) = &mut self.channel(ch).tx {
            tx.push(TxOp::Ack { tag: a.delivery_tag, multiple: a.multiple });
            return Ok(());
        }
        self.settle(ch, a.delivery_tag, a.multiple, None, now)
    }

    pub(super) fn on_basic_reject(&mut self, ch: u16, r: BasicReject, now: Millis) -> Result<(), AmqpError> {
        if let Some(tx) = &mut self.channel(ch).tx {
            tx.push(TxOp::Reject { tag: r.delivery_tag, multiple: false, requeue: r.requeue });
            return Ok(());
        }
        self.settle(ch, r.delivery_tag, false, Some(r.requeue), now)
    }

    pub(super) fn on_basic_nack(&mut self, ch: u16, n: BasicNack, now: Millis) -> Result<(), AmqpError> {
        if let Some(tx) = &mut self.channel(ch).tx {
            tx.push(TxOp::Reject { tag: n.delivery_tag, multiple: n.multiple, requeue: n.requeue });
            return Ok(());
        }
        self.settle(ch, n.delivery_tag, n.multiple, Some(n.requeue), now)
    }

    pub(super) fn on_basic_recover(&mut self, ch: u16, r: BasicRecover, now: Millis) -> Result<(), AmqpError> {
        if !r.requeue {
            return Err(AmqpError::new(reply_code::NOT_IMPLEMENTED, "requeue=false"));
        }
        self.recover(ch, now);
        self.send(ch, Method::BasicRecoverOk(BasicRecoverOk {}));
        Ok(())
    }

    pub(super) fn on_basic_recover_async(
        &mut self,
        ch: u16,
        r: BasicRecoverAsync,
        now: Millis,
    ) -> Result<(), AmqpError> {
        if !r.requeue {
            return Err(AmqpError::new(reply_code::NOT_IMPLEMENTED, "requeue=false"));
        }
        self.recover(ch, now);
        Ok(())
    }

    /// Acks (requeue `None`) or rejects deliveries.
    pub(super) fn settle(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
        now: Millis,
    ) -> Result<(), AmqpError> {
        // No one waits for an ack's store changes: they go lazily (`VHost::settle`).
        self.settle_inner(ch, tag, multiple, requeue, now, false).map(drop)
    }

    /// [`Connection::settle`], returning the commit of what it changed in the store.
    pub(super) fn settle_commit(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
        now: Millis,
    ) -> Result<ferry_core::store::Commit, AmqpError> {
        self.settle_inner(ch, tag, multiple, requeue, now, true)
    }

    fn settle_inner(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
        now: Millis,
        waited: bool,
    ) -> Result<ferry_core::store::Commit, AmqpError> {
        let mut commit = ferry_core::store::Commit::done(Ok(()));
        let c = self.channel(ch);
        let Some(items) = c.take_unacked(tag, multiple) else {
            return Err(AmqpError::new(reply_code::PRECONDITION_FAILED, format!("unknown delivery tag {tag}")));
        };
        let credit = c.credit.clone();
        let counted = items.iter().filter(|u| u.counts_credit).count() as u32;
        credit.release(counted);
        let vhost = self.vhost().clone();
        let mut touched: Vec<Arc<Queue>> = Vec::new();
        // One settle per run of items of one queue: a multiple ack of messages read back from a
        // queue's tail then deletes them as one run (`Effects::forgotten_runs`).
        let mut pending: Option<(Arc<Queue>, ferry_core::queue::Effects)> = None;
        for u in items {
            let r = match requeue {
                None => u.queue.ack(u.seq, now),
                Some(rq) => u.queue.reject(u.seq, rq, now),
            };
            match r {
                Ok(effects) if waited => commit = commit.join(vhost.settle_waited(&u.queue, effects, now)),
                Ok(effects) => match &mut pending {
                    Some((q, fx)) if Arc::ptr_eq(q, &u.queue) => fx.merge(effects),
                    _ => {
                        if let Some((q, fx)) = pending.replace((u.queue.clone(), effects)) {
                            vhost.settle(&q, fx, now);
                        }
                    }
                },
                Err(e) => tracing::debug!(conn = %self.id, error = %e, "settling a delivery the queue no longer holds"),
            }
            if !touched.iter().any(|q| Arc::ptr_eq(q, &u.queue)) {
                touched.push(u.queue);
            }
        }
        if let Some((q, fx)) = pending {
            vhost.settle(&q, fx, now);
        }
        if counted > 0 {
            self.pump_channel_queues(ch, now);
        }
        Ok(commit)
    }

    pub(super) fn recover(&mut self, ch: u16, now: Millis) {
        let c = self.channel(ch);
        let owner = c.owner;
        let items: Vec<_> = std::mem::take(&mut c.unacked).into_values().collect();
        let counted = items.iter().filter(|u| u.counts_credit).count() as u32;
        c.credit.release(counted);
        let vhost = self.vhost().clone();
        let mut queues: Vec<Arc<Queue>> = Vec::new();
        for u in items {
            if !queues.iter().any(|q| Arc::ptr_eq(q, &u.queue)) {
                queues.push(u.queue);
            }
        }
        for q in queues {
            let effects = q.release_owner(owner, now);
            vhost.settle(&q, effects, now);
        }
    }

    /// Lets the queues this channel consumes deliver again (credit came back).
    pub(super) fn pump_channel_queues(&mut self, ch: u16, now: Millis) {
        let Some(vhost) = self.vhost.clone() else { return };
        let queues: Vec<Arc<Queue>> = self.channel(ch).consumers.values().map(|(q, _)| q.clone()).collect();
        for q in queues {
            let effects = q.pump(now);
            vhost.settle(&q, effects, now);
        }
    }

    /// Lets every consumed queue deliver again (the outbox drained).
    pub fn pump_all(&mut self, now: Millis) {
        let chans: Vec<u16> = self.channels.keys().copied().collect();
        for ch in chans {
            self.pump_channel_queues(ch, now);
        }
    }

    // ----- deliveries ------------------------------------------------------------------------

    /// Encodes deliveries waiting in the outbox; returns whether a queue found it full and
    /// stopped (the caller then prompts the queues with [`Connection::pump_all`]).
    pub fn pump(&mut self, scratch: &mut Vec<Outgoing>, now: Millis) -> bool {
        self.outbox.drain_into(scratch);
        let was_full = self.outbox.take_starved();
        let mut undeliverable: Vec<(Arc<Queue>, u64)> = Vec::new();
        for o in scratch.drain(..) {
            match o {
                Outgoing::Deliver { channel, consumer_tag, no_ack, queue, delivery } => {
                    let frame_max = self.frame_max;
                    let Some(c) = self.channels.get_mut(&channel).filter(|c| !c.closing) else {
                        // The channel closed meanwhile: its unacked messages were requeued.
                        continue;
                    };
                    c.next_tag += 1;
                    let tag = c.next_tag;
                    let acked_by = if no_ack {
                        None
                    } else {
                        match queue.upgrade() {
                            Some(q) => Some(q),
                            None => continue,
                        }
                    };
                    let m = &delivery.message;
                    match encode_deliver(
                        &mut self.out,
                        channel,
                        &consumer_tag,
                        tag,
                        delivery.redelivered,
                        &m.exchange,
                        &m.routing_key,
                        &m.properties,
                        &m.payload,
                        frame_max,
                    ) {
                        Ok(()) => {
                            self.messages_out += 1;
                            if let Some(q) = acked_by {
                                let unacked =
                                    crate::channel::Unacked { queue: q, seq: delivery.seq, counts_credit: true };
                                c.unacked.insert(tag, unacked);
                            }
                        }
                        Err(e) => {
                            // A short string over 255 bytes (an MQTT topic as routing key, say).
                            tracing::warn!(conn = %self.id, error = %e, "delivery not encodable; dropped");
                            // The client never sees it, so never acknowledges it: settle it
                            // here, or it would hold the consumer's credit for good.
                            if let Some(q) = acked_by {
                                undeliverable.push((q, delivery.seq));
                            }
                        }
                    }
                }
                Outgoing::Cancelled { channel, consumer_tag } => {
                    if let Some(c) = self.channels.get_mut(&channel).filter(|c| !c.closing) {
                        if c.consumers.remove(&consumer_tag).is_some() {
                            self.send(channel, Method::BasicCancel(BasicCancel { consumer_tag, nowait: true }));
                        }
                    }
                }
            }
        }
        if !undeliverable.is_empty() {
            for (q, seq) in undeliverable {
                if let Ok(effects) = q.ack(seq, now) {
                    self.vhost().settle(&q, effects, now);
                }
            }
        }
        was_full
    }
}

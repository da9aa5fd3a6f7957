//! Content: a basic.publish's header and body frames assembled into a message, and the publish
//! into the core (mandatory returns, confirms, transactions).

use bytes::Bytes;
use ferry_core::message::{valid_expiration, Message, Millis, Origin, Protocol, ShortString};
use ferry_core::size::ByteSize;

use super::{Connection, REPLY_TO};
use crate::channel::{PartialPublish, PendingConfirm, TxOp};
use crate::codec::{encode_return, reply_code, ContentHeader};
use crate::errors::AmqpError;

impl Connection {
    pub(super) fn on_header(&mut self, ch: u16, payload: Bytes, now: Millis) -> Result<(), AmqpError> {
        let max = self.settings.max_message_size;
        let Some(c) = self.channels.get_mut(&ch).filter(|c| !c.closing) else {
            if self.channels.get(&ch).is_some_and(|c| c.closing) {
                return Ok(());
            }
            return Err(AmqpError::new(
                reply_code::UNEXPECTED_FRAME,
                format!("content header on channel {ch} without basic.publish"),
            ));
        };
        let Some(p) = c.content.as_mut().filter(|p| p.header.is_none()) else {
            return Err(AmqpError::new(
                reply_code::UNEXPECTED_FRAME,
                "expected a method frame, got a content header frame instead",
            ));
        };
        let header = ContentHeader::decode(payload).map_err(|e| AmqpError {
            code: e.reply_code(),
            text: e.reply_text().to_string_lossy(),
            class_id: 60,
            method_id: 40,
        })?;
        if header.body_size > max {
            c.content = None;
            let e = AmqpError::new(
                reply_code::PRECONDITION_FAILED,
                format!("message size {} is larger than configured max size {max}", header.body_size),
            )
            .on(60, 40);
            self.close_channel(ch, &e, now);
            return Ok(());
        }
        if header.body_size == 0 {
            let mut p = c.content.take().expect("checked above");
            p.header = Some(header);
            return self.complete_publish(ch, p, now);
        }
        p.header = Some(header);
        Ok(())
    }

    pub(super) fn on_body(&mut self, ch: u16, payload: Bytes, now: Millis) -> Result<(), AmqpError> {
        let Some(c) = self.channels.get_mut(&ch) else {
            return Err(AmqpError::new(
                reply_code::UNEXPECTED_FRAME,
                format!("content body on channel {ch} without basic.publish"),
            ));
        };
        if c.closing {
            return Ok(());
        }
        let Some(p) = c.content.as_mut().filter(|p| p.header.is_some()) else {
            return Err(AmqpError::new(
                reply_code::UNEXPECTED_FRAME,
                "expected a method frame, got a content body frame instead",
            ));
        };
        let expected = p.header.as_ref().map_or(0, |h| h.body_size);
        let have = p.body.as_ref().map_or(0, |b| b.len()) + p.body_buf.len();
        let total = (have + payload.len()) as u64;
        if total > expected {
            return Err(AmqpError::new(
                reply_code::FRAME_ERROR,
                format!(
                    "content body of {} exceeds the {} the header declared",
                    ByteSize(total).exact(),
                    ByteSize(expected).exact()
                ),
            ));
        }
        // A body in one frame is kept as a slice of that frame (no copy).
        if p.body.is_none() && p.body_buf.is_empty() && payload.len() as u64 == expected {
            p.body = Some(payload);
        } else {
            if let Some(first) = p.body.take() {
                p.body_buf.reserve(expected as usize);
                p.body_buf.extend_from_slice(&first);
            }
            if p.body_buf.is_empty() {
                // Bounded by max_message_size, checked at the header.
                p.body_buf.reserve(expected as usize);
            }
            p.body_buf.extend_from_slice(&payload);
        }
        if total == expected {
            let p = c.content.take().expect("checked above");
            return self.complete_publish(ch, p, now);
        }
        Ok(())
    }

    /// A publish whose content is complete, taken off its channel by the frame that completed
    /// it (one channel lookup for that frame, not one more here).
    pub(super) fn complete_publish(&mut self, ch: u16, p: PartialPublish, now: Millis) -> Result<(), AmqpError> {
        self.publishes = self.publishes.saturating_add(1);
        self.messages_in += 1;
        let header = p.header.unwrap_or_default();
        let body = match p.body {
            Some(b) => b,
            None => p.body_buf.freeze(),
        };
        let mut properties = header.properties;
        if properties.more().reply_to.as_ref().is_some_and(|r| *r == REPLY_TO) {
            match &self.channel(ch).reply_to {
                Some(q) => properties.more_mut().reply_to = Some(q.clone()),
                None => {
                    let e = AmqpError::new(reply_code::PRECONDITION_FAILED, "fast reply consumer does not exist")
                        .on(60, 40);
                    self.close_channel(ch, &e, now);
                    return Ok(());
                }
            }
        }
        // One literal, the names moved out of the method: the builder's steps each moved the
        // message (memmove under `Message::at` and `with_properties`, 2 % of the broker's CPU on
        // auto-ack 1->1), and cloning the names cost two reference counts per message.
        let message = Message {
            exchange: p.method.exchange,
            routing_key: p.method.routing_key,
            properties,
            payload: body,
            origin: Origin { protocol: Protocol::Amqp, connection: self.id },
            published_at: now,
        };
        if let Some(exp) = &message.properties.more().expiration {
            if !valid_expiration(exp) {
                let e =
                    AmqpError::new(reply_code::PRECONDITION_FAILED, format!("invalid expiration '{exp}'")).on(60, 40);
                self.close_channel(ch, &e, now);
                return Ok(());
            }
        }
        if let Some(tx) = &mut self.channel(ch).tx {
            tx.push(TxOp::Publish { message: Box::new(message), mandatory: p.method.mandatory });
            return Ok(());
        }
        match self.route(ch, message, p.method.mandatory, now) {
            Ok(_) => Ok(()),
            Err(e) if e.is_hard() => Err(e),
            Err(e) => {
                self.close_channel(ch, &e.on(60, 40), now);
                Ok(())
            }
        }
    }

    /// Publishes a complete message: mandatory returns and publisher confirms. Returns the
    /// commit of its persistent copies, unless a publisher confirm waits on it.
    pub(super) fn route(
        &mut self,
        ch: u16,
        message: Message,
        mandatory: bool,
        now: Millis,
    ) -> Result<ferry_core::store::Commit, AmqpError> {
        let returned = mandatory.then(|| message.clone());
        // A channel in confirm mode waits for its confirm: a `block` queue at its limits holds
        // that instead of refusing the message.
        let c = self.channel(ch);
        let waits = c.confirm_seq.is_some();
        let mut cache = c.exchange.take();
        let outcome = self.vhost().publish_cached(&mut cache, message, now, waits);
        // The cache goes back and the confirm is numbered in one lookup of the channel.
        let c = self.channel(ch);
        c.exchange = cache;
        let owner = c.owner;
        let confirm = match (&outcome, c.confirm_seq.as_mut()) {
            (Ok(_), Some(seq)) => {
                let n = *seq;
                *seq += 1;
                Some(n)
            }
            _ => None,
        };
        let outcome = outcome?;
        self.congested.extend(outcome.congested.iter().cloned());
        if outcome.routed == 0 {
            if let Some(m) = returned {
                if let Err(e) = encode_return(
                    &mut self.out,
                    ch,
                    reply_code::NO_ROUTE,
                    &ShortString::from_static("NO_ROUTE"),
                    &m.exchange,
                    &m.routing_key,
                    &m.properties,
                    &m.payload,
                    self.frame_max,
                ) {
                    tracing::warn!(conn = %self.id, error = %e, "basic.return not encodable");
                }
            }
        }
        if let Some(n) = confirm {
            self.pending.push(PendingConfirm { channel: ch, owner, seq: n, nack: outcome.rejected }, outcome.commit);
            return Ok(ferry_core::store::Commit::done(Ok(())));
        }
        Ok(outcome.commit)
    }
}

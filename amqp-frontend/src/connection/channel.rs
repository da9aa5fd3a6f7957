//! The channel class (channel.open, close, flow) and access.request, and closing a channel on a
//! soft error: what it releases in the core.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use ferry_core::message::Millis;
use ferry_core::queue::Queue;

use super::Connection;
use crate::channel::Channel;
use crate::codec::{
    reply_code, AccessRequestOk, ChannelClose, ChannelCloseOk, ChannelFlow, ChannelFlowOk, ChannelOpenOk, Method,
};
use crate::errors::AmqpError;

impl Connection {
    /// channel.open of a channel number not in use.
    pub(super) fn open_channel(&mut self, ch: u16) -> Result<(), AmqpError> {
        // channel_max bounds how many channels are open, not their numbers: RabbitMQ
        // opens channel 65535 under channel_max 2047, and refuses one channel more
        // than negotiated with this connection error (class and method 0, as it sends).
        if self.channels.len() >= usize::from(self.channel_max) {
            return Err(AmqpError::new(
                reply_code::NOT_ALLOWED,
                format!(
                    "number of channels opened ({}) has reached the negotiated channel_max ({})",
                    self.channels.len(),
                    self.channel_max
                ),
            ));
        }
        self.channels.insert(ch, Box::new(Channel::new(ch)));
        self.send(ch, Method::ChannelOpenOk(ChannelOpenOk { channel_id: Bytes::new() }));
        Ok(())
    }

    /// channel.close from the client: releases what the channel held.
    pub(super) fn on_channel_close(&mut self, ch: u16, c: ChannelClose, now: Millis) -> Result<(), AmqpError> {
        tracing::debug!(conn = %self.id, channel = ch, code = c.reply_code, text = %c.reply_text, "client closed a channel");
        self.release_channel(ch, now);
        self.channels.remove(&ch);
        self.send(ch, Method::ChannelCloseOk(ChannelCloseOk {}));
        Ok(())
    }

    /// channel.flow: pauses or resumes deliveries to the channel.
    pub(super) fn on_channel_flow(&mut self, ch: u16, f: ChannelFlow, now: Millis) -> Result<(), AmqpError> {
        let credit = self.channel(ch).credit.clone();
        credit.paused.store(!f.active, Ordering::Relaxed);
        self.send(ch, Method::ChannelFlowOk(ChannelFlowOk { active: f.active }));
        if f.active {
            self.pump_channel_queues(ch, now);
        }
        Ok(())
    }

    /// access.request (deprecated in 0-9-1): always granted, as RabbitMQ does.
    pub(super) fn on_access_request(&mut self, ch: u16) -> Result<(), AmqpError> {
        self.send(ch, Method::AccessRequestOk(AccessRequestOk { ticket: 1 }));
        Ok(())
    }

    /// Closes a channel with an error (a soft error: the connection stays).
    pub(super) fn close_channel(&mut self, ch: u16, e: &AmqpError, now: Millis) {
        tracing::debug!(conn = %self.id, channel = ch, code = e.code, text = %e.text, "closing channel");
        self.release_channel(ch, now);
        if let Some(c) = self.channels.get_mut(&ch) {
            c.closing = true;
            c.content = None;
        }
        self.send(
            ch,
            Method::ChannelClose(ChannelClose {
                reply_code: e.code,
                reply_text: e.reply_text(),
                class_id: e.class_id,
                method_id: e.method_id,
            }),
        );
    }

    /// Cancels a channel's consumers and requeues its unacknowledged deliveries.
    pub(super) fn release_channel(&mut self, ch: u16, now: Millis) {
        let Some(vhost) = self.vhost.clone() else { return };
        let Some(c) = self.channels.get_mut(&ch) else { return };
        let owner = c.owner;
        let consumers: Vec<_> = c.consumers.drain().map(|(_, v)| v).collect();
        let mut queues: Vec<Arc<Queue>> = Vec::new();
        for u in std::mem::take(&mut c.unacked).into_values() {
            if !queues.iter().any(|q| Arc::ptr_eq(q, &u.queue)) {
                queues.push(u.queue);
            }
        }
        c.tx = None;
        for (q, id) in consumers {
            vhost.cancel(&q, id, now);
            if !queues.iter().any(|x| Arc::ptr_eq(x, &q)) {
                queues.push(q);
            }
        }
        for q in queues {
            let effects = q.release_owner(owner, now);
            vhost.settle(&q, effects, now);
        }
    }

    /// Releases every channel (connection closing or lost) and exclusive queues.
    pub fn release_all(&mut self, now: Millis) {
        let chans: Vec<u16> = self.channels.keys().copied().collect();
        for ch in chans {
            self.release_channel(ch, now);
        }
        self.channels.clear();
        self.broker.connection_closed(self.id, now);
    }
}

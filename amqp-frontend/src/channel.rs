//! Per-channel state: consumers, delivery tags and unacknowledged deliveries, prefetch,
//! publisher confirms, transactions, and the content of a publish being assembled.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use bytes::{Bytes, BytesMut};
use ferry_core::message::{Message, ShortString};
use ferry_core::queue::{ConsumerId, ConsumerSink, Delivery, OwnerId, Queue, QueueName};
use ferry_core::sink::Outbox;

use crate::codec::{BasicPublish, ContentHeader};

/// Something a queue hands to this connection for a channel.
#[derive(Debug)]
pub enum Outgoing {
    Deliver {
        channel: u16,
        consumer_tag: ShortString,
        no_ack: bool,
        queue: Weak<Queue>,
        delivery: Delivery,
    },
    /// The broker cancelled the consumer (its queue was deleted).
    Cancelled {
        channel: u16,
        consumer_tag: ShortString,
    },
}

/// A connection's outbox is bounded by count (its consumers' prefetch bounds it).
impl ferry_core::sink::Weigh for Outgoing {}

/// Channel-wide limits a consumer's sink consults: the global prefetch (basic.qos with
/// global=true) and channel.flow.
#[derive(Debug, Default)]
pub struct ChannelCredit {
    /// Unacknowledged consumer deliveries on the channel.
    pub unacked: AtomicU32,
    /// 0 = no channel-wide limit.
    pub limit: AtomicU32,
    /// channel.flow active=false stops deliveries.
    pub paused: AtomicBool,
}

impl ChannelCredit {
    fn has_room(&self) -> bool {
        if self.paused.load(Ordering::Relaxed) {
            return false;
        }
        let limit = self.limit.load(Ordering::Relaxed);
        limit == 0 || self.unacked.load(Ordering::Relaxed) < limit
    }
    pub fn release(&self, n: u32) {
        let _ = self.unacked.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(n)));
    }
}

/// A consumer's receiving end: deliveries go into the connection's outbox.
#[derive(Debug)]
pub struct AmqpConsumerSink {
    pub channel: u16,
    pub consumer_tag: ShortString,
    pub no_ack: bool,
    pub queue: Weak<Queue>,
    pub outbox: Arc<Outbox<Outgoing>>,
    pub credit: Arc<ChannelCredit>,
}

impl ConsumerSink for AmqpConsumerSink {
    fn has_room(&self) -> bool {
        // A full outbox is remembered so the driver prompts the queue after draining (a no-ack
        // consumer has no acks that would).
        self.outbox.has_room_or_starve() && (self.no_ack || self.credit.has_room())
    }
    fn deliver(&self, delivery: Delivery) {
        if !self.no_ack {
            self.credit.unacked.fetch_add(1, Ordering::Relaxed);
        }
        // Bounded by credit (prefetch) and by `has_room`, which the queue checked.
        self.outbox.push(Outgoing::Deliver {
            channel: self.channel,
            consumer_tag: self.consumer_tag.clone(),
            no_ack: self.no_ack,
            queue: self.queue.clone(),
            delivery,
        });
    }
    fn cancelled(&self, _queue: &QueueName, _consumer: ConsumerId) {
        self.outbox.push(Outgoing::Cancelled { channel: self.channel, consumer_tag: self.consumer_tag.clone() });
    }
    /// A queue an AMQP client consumes from holds its publishers to the client's pace when it
    /// falls behind (RabbitMQ's credit flow; `ferry_core::queue`).
    fn paces_publishers(&self) -> bool {
        true
    }
}

/// A delivery waiting for the client's ack.
#[derive(Debug, Clone)]
pub struct Unacked {
    pub queue: Arc<Queue>,
    pub seq: u64,
    /// Consumer deliveries count against the channel's global prefetch; gets do not.
    pub counts_credit: bool,
}

/// A basic.publish whose content is arriving.
#[derive(Debug)]
pub struct PartialPublish {
    pub method: BasicPublish,
    pub header: Option<ContentHeader>,
    /// Body frames so far; a body that arrives in one frame is kept as that frame's bytes.
    pub body: Option<Bytes>,
    pub body_buf: BytesMut,
}

/// What a transaction holds until commit.
#[derive(Debug)]
pub enum TxOp {
    Publish { message: Box<Message>, mandatory: bool },
    Ack { tag: u64, multiple: bool },
    Reject { tag: u64, multiple: bool, requeue: bool },
}

/// A publisher confirm (or, with `seq` 0, a tx.commit-ok) to send once its commit resolves
/// (see [`ferry_core::flow::AckQueue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingConfirm {
    pub channel: u16,
    /// The channel's [`Channel::owner`], unique to this opening of the channel number: a
    /// confirm for a channel closed and opened again before its commit resolved is not sent on
    /// the new one.
    pub owner: OwnerId,
    pub seq: u64,
    pub nack: bool,
}

/// One open channel.
#[derive(Debug)]
pub struct Channel {
    pub id: u16,
    pub owner: OwnerId,
    /// We sent channel.close and wait for close-ok; everything else is dropped meanwhile.
    pub closing: bool,
    pub next_tag: u64,
    pub unacked: BTreeMap<u64, Unacked>,
    pub consumers: HashMap<ShortString, (Arc<Queue>, ConsumerId)>,
    /// basic.qos global=false: prefetch for consumers created after it.
    pub consumer_prefetch: u16,
    pub credit: Arc<ChannelCredit>,
    /// `Some(next publish sequence number)` in confirm mode.
    pub confirm_seq: Option<u64>,
    /// `Some(ops)` in transaction mode.
    pub tx: Option<Vec<TxOp>>,
    pub content: Option<PartialPublish>,
    /// The last queue declared on the channel: an empty queue name in later methods means it.
    pub last_queue: Option<ShortString>,
    /// The channel's direct reply-to queue (`amq.rabbitmq.reply-to.<token>`), once it consumes
    /// from the `amq.rabbitmq.reply-to` pseudo-queue.
    pub reply_to: Option<ShortString>,
    /// Confirms (in confirm mode) not yet sent, in order.
    pub confirms: VecDeque<PendingConfirm>,
    /// The exchange the channel last published to (`VHost::publish_cached`).
    pub exchange: Option<Arc<ferry_core::exchange::Exchange>>,
}

impl Channel {
    pub fn new(id: u16) -> Channel {
        Channel {
            id,
            owner: OwnerId::next(),
            closing: false,
            next_tag: 0,
            unacked: BTreeMap::new(),
            consumers: HashMap::new(),
            consumer_prefetch: 0,
            credit: Arc::new(ChannelCredit::default()),
            confirm_seq: None,
            tx: None,
            content: None,
            last_queue: None,
            reply_to: None,
            confirms: VecDeque::new(),
            exchange: None,
        }
    }

    /// Takes the unacked deliveries an ack, reject or nack names: one tag, or with `multiple`
    /// every tag up to it (0 with `multiple` means all). `None` when a named tag is unknown.
    pub fn take_unacked(&mut self, tag: u64, multiple: bool) -> Option<Vec<Unacked>> {
        if multiple {
            let keys: Vec<u64> = if tag == 0 {
                self.unacked.keys().copied().collect()
            } else {
                self.unacked.range(..=tag).map(|(k, _)| *k).collect()
            };
            if tag != 0 && keys.is_empty() {
                return None;
            }
            Some(keys.into_iter().filter_map(|k| self.unacked.remove(&k)).collect())
        } else {
            self.unacked.remove(&tag).map(|u| vec![u])
        }
    }
}

//! The MQTT session state machine: one per connection, fed decoded packets, deliveries and the
//! current time; it writes packets to send into [`Session::out`] and calls the core directly
//! (the core is synchronous and in memory). No sockets, so it is tested without any.
//!
//! Where messages come from:
//! - a clean session (3.1.1 clean session, 5.0 session expiry 0) subscribes through a **direct
//!   sink** bound once per subscription (the binding's cookie names the subscription);
//! - a persistent session has a durable queue `mqtt-session.<client id>` bound once per
//!   subscription; the connection consumes it with the outbound inflight window as prefetch;
//! - each shared subscription `$share/<group>/<filter>` consumes the group's queue
//!   `mqtt-shared.<group>.<filter>`, shared with the group's other members (AMQP consumers too).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use bytes::BytesMut;
use ferry_core::connections::ConnectionEntry;
use ferry_core::exchange::{BindingKey, ExchangeKind, ExchangeOptions, SinkRef};
use ferry_core::flow::{AckQueue, PublisherFlow};
use ferry_core::hash::FastMap;
use ferry_core::message::{ConnectionId, FieldTable, FieldValue, Message, Millis, Origin, Protocol, ShortString};
use ferry_core::queue::{ConsumerId, ConsumerSpec, Delivery, OwnerId, Queue, QueueName, QueueOptions};
use ferry_core::sink::{DirectSink, Outbox, SinkDelivery};
use ferry_core::store::{Commit, StoreOp};
use ferry_core::vhost::{ExchangeDeclare, QueueDeclare, VHost};
use ferry_core::CoreError;

use crate::codec::{
    encode, encoded_len, reason, ConnAck, Connect, Disconnect, Packet, ProtocolVersion, PubResp, Publish, QoS, Str,
    SubAck, SubOptions, Subscribe, UnsubAck, Unsubscribe, Will,
};
use crate::errors::MqttError;
use crate::mapping::{message_qos, message_retain, remaining_expiry, to_message, to_message_keyed, to_publish_on};
use crate::registry::{StoredSession, StoredSubscription};
use crate::session_store::encode_session;
use crate::subscriptions::{Subscription, Subscriptions};
use crate::topic::{
    check_filter, check_topic_name, server_only, swap_separators, swap_separators_in, Filter, TopicError,
};

/// Frontend-wide MQTT settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The exchange MQTT publishes go to and subscriptions bind to.
    pub exchange: ShortString,
    /// Largest packet accepted from clients (advertised in 5.0 CONNACK).
    pub max_packet_size: u32,
    /// Unacknowledged QoS 1/2 publishes a client may have in flight to us (5.0 Receive Maximum).
    pub receive_maximum: u16,
    /// Outbound inflight window for 3.1.1 clients (5.0 clients set theirs).
    pub max_inflight: u16,
    /// Topic aliases a client may use towards us.
    pub topic_alias_maximum: u16,
    /// Keep alive the server allows at most (0 = whatever the client asks).
    pub max_keep_alive: u16,
    /// Deliveries waiting for one connection before QoS 0 ones are dropped.
    pub outbox_capacity: usize,
    /// Bytes (payload and topic) of direct deliveries waiting for one connection before its
    /// publishers are held back, as `outbox_capacity` counts them (see `Outbox::bounded`).
    pub outbox_bytes: usize,
    /// Keep QoS 0 messages for a persistent session while its client is away (Mosquitto's
    /// `queue_qos0_messages`, off by default there and here).
    pub queue_qos0_offline: bool,
    /// Messages a session's queue may hold beyond those in flight (Mosquitto's
    /// `max_queued_messages`, 1000 by default there and here); 0: no limit.
    pub max_queued_messages: u32,
    /// Subscriptions one session may hold (EMQX's `max_subscriptions`); a SUBSCRIBE for a new
    /// filter past it is answered 0x97 Quota exceeded (5.0) / 0x80 Failure (3.1.1). 0: no limit.
    pub max_subscriptions_per_client: u32,
    /// Topic filters one SUBSCRIBE may carry; the ones past it are answered as above, and
    /// nothing is done for them. 0: no limit.
    pub max_subscriptions_per_packet: u32,
    /// The topic ACL this connection is checked against.
    pub acl: Arc<crate::acl::Acl>,
    /// How often `$SYS/broker/...` is brought up to date (Mosquitto's `sys_interval`); zero:
    /// no `$SYS` tree.
    pub sys_interval: std::time::Duration,
}

impl Settings {
    /// The same settings: every field equal, the ACL too (the same `Arc` or the same entries:
    /// with no MQTT policy each connection is given an empty ACL of its own).
    pub fn same_as(&self, other: &Settings) -> bool {
        let Settings {
            exchange,
            max_packet_size,
            receive_maximum,
            max_inflight,
            topic_alias_maximum,
            max_keep_alive,
            outbox_capacity,
            outbox_bytes,
            queue_qos0_offline,
            max_queued_messages,
            max_subscriptions_per_client,
            max_subscriptions_per_packet,
            acl,
            sys_interval,
        } = self;
        *exchange == other.exchange
            && *max_packet_size == other.max_packet_size
            && *receive_maximum == other.receive_maximum
            && *max_inflight == other.max_inflight
            && *topic_alias_maximum == other.topic_alias_maximum
            && *max_keep_alive == other.max_keep_alive
            && *outbox_capacity == other.outbox_capacity
            && *outbox_bytes == other.outbox_bytes
            && *queue_qos0_offline == other.queue_qos0_offline
            && *max_queued_messages == other.max_queued_messages
            && *max_subscriptions_per_client == other.max_subscriptions_per_client
            && *max_subscriptions_per_packet == other.max_subscriptions_per_packet
            && (Arc::ptr_eq(acl, &other.acl) || **acl == *other.acl)
            && *sys_interval == other.sys_interval
    }
}

impl Default for Settings {
    fn default() -> Settings {
        // Receive maximum and inflight window of 100 keep a 1→1 QoS 1 stream busy on loopback
        // (Mosquitto's max_inflight_messages is 20); alias maximum 10 is Mosquitto's default.
        Settings {
            exchange: ShortString::from_static("amq.topic"),
            max_packet_size: 268_435_455,
            receive_maximum: 100,
            max_inflight: 100,
            topic_alias_maximum: 10,
            max_keep_alive: 0,
            outbox_capacity: 1000,
            outbox_bytes: ferry_core::frontend::DEFAULT_OUTBOX_BYTES,
            queue_qos0_offline: false,
            max_queued_messages: 1000,
            max_subscriptions_per_client: DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT,
            max_subscriptions_per_packet: DEFAULT_MAX_SUBSCRIPTIONS_PER_PACKET,
            acl: Arc::default(),
            sys_interval: crate::sys::SYS_INTERVAL,
        }
    }
}

/// See [`Settings::max_subscriptions_per_client`]. Far above what devices and services use (a
/// few to a few hundred filters; AWS IoT Core allows 50 per connection), and low enough that
/// one client's share stays bounded: 10,000 five-level filters took 19 MB of RSS, 30 ms to
/// subscribe and 25 ms to remove (release build; scripts/bench-subscribe.py, docs/configuration.md).
pub const DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT: u32 = 10_000;

/// See [`Settings::max_subscriptions_per_packet`]. A client resubscribing after a reconnect
/// sends all its filters at once; 1,000 covers that for all but the largest clients, which can
/// send several SUBSCRIBEs. It bounds what one packet asks of the broker before it is answered.
pub const DEFAULT_MAX_SUBSCRIPTIONS_PER_PACKET: u32 = 1_000;

/// Filters handled before the session hands back to its driver, which yields to other tasks
/// before asking for the next ones ([`Session::resume`]): a huge SUBSCRIBE (or the teardown of
/// a session with many subscriptions) is worked through in slices of about a millisecond (a filter
/// took 3.5 µs in a release build: 60,000 in 210 ms, scripts/bench-subscribe.py).
pub const SUBSCRIBE_SLICE: usize = 256;

/// A SUBSCRIBE being worked through in slices (see [`SUBSCRIBE_SLICE`]).
#[derive(Debug)]
struct PendingSubscribe {
    packet_id: u16,
    identifier: Option<u32>,
    filters: std::vec::IntoIter<(Str, SubOptions)>,
    reasons: Vec<u8>,
    /// Filters past `max_subscriptions_per_packet`, answered Quota exceeded after the others.
    refused: usize,
    /// Retained messages owed to the new subscriptions: sent after the SUBACK.
    retained: Vec<RetainedDue>,
}

/// A subscription's retained messages, looked up and sent once its SUBACK is out (clients and
/// Mosquitto's tests expect the SUBACK first; 5.0 §3.8.4 asks only that the SUBACK follows the
/// SUBSCRIBE, so either order is allowed).
#[derive(Debug)]
struct RetainedDue {
    pattern: ferry_core::topic::Pattern,
    qos: QoS,
    identifier: Option<u32>,
}

/// Why the session ends; decides the will and what the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// The client sent DISCONNECT (reason 0x04 asks for the will).
    ClientDisconnect { with_will: bool },
    /// The connection broke or keepalive expired: the will is published.
    Lost,
    /// A protocol violation: 5.0 clients get DISCONNECT with this reason, then the will.
    Violation { reason: u8, detail: String },
    /// Another connection took the client id over.
    TakenOver,
    /// The server is shutting down.
    Shutdown,
    /// Closed from outside (the core connection registry) with this reason: 5.0 clients get
    /// DISCONNECT 0x98 with it as the reason string, then the will.
    Administrative { reason: String },
}

/// What becomes of the will when a connection closes ([`Session::will_on_close`]).
#[derive(Debug, Clone, PartialEq)]
pub struct WillOnClose {
    /// The will to publish, if it is due at all.
    pub will: Option<Will>,
    /// Seconds to wait first: the will delay, cut to the session expiry (§3.1.3.2.2: the will
    /// goes when the delay has passed or the session ends, whichever comes first); 0: now.
    pub delay: u32,
}

/// Where an outbound QoS 1/2 delivery came from, to settle it when the client acknowledges.
#[derive(Debug, Clone)]
enum Source {
    Sink,
    Queue { queue: Arc<Queue>, seq: u64 },
}

#[derive(Debug)]
#[allow(clippy::enum_variant_names)] // the names are the packets awaited
enum Inflight {
    /// QoS 1 sent, PUBACK awaited.
    AwaitingPubAck(Source),
    /// QoS 2 sent, PUBREC awaited.
    AwaitingPubRec(Source),
    /// PUBREL sent, PUBCOMP awaited.
    AwaitingPubComp,
}

enum Mode {
    /// `bound`: the session's sink was bound with a subscription (most idle clients never
    /// subscribe, and their end need not look for bindings).
    Transient {
        bound: bool,
    },
    Persistent {
        queue: Arc<Queue>,
        consumer: ConsumerId,
    },
}

/// A delivery taken from an outbox and not yet sent (the inflight window was full).
enum Pending {
    Sink(SinkDelivery),
    Queue(Delivery),
}

/// See [`Session::traffic`].
#[derive(Default)]
struct Traffic {
    inflight: FastMap<u16, Inflight>,
    /// Deliveries taken from the outboxes and not sent yet (the inflight window was full, or
    /// the write is full enough, see [`Session::pump`]).
    backlog: VecDeque<Pending>,
    /// Outboxes of subscribers that took our QoS 1/2 messages over capacity, and queues that
    /// took them while falling behind their consumers: the driver stops reading this client
    /// until they have room (or briefly, see the driver; [`Session::take_congested`]).
    congested: Vec<ferry_core::flow::Target>,
    /// Where topics become routing keys and back (`topic::swap_separators_in`): one buffer
    /// reused from message to message instead of a string per message.
    topics: BytesMut,
    /// The exchange this session last published to (`VHost::publish_cached`).
    exchange: Option<Arc<ferry_core::exchange::Exchange>>,
}

/// See [`Session::extras`].
#[derive(Default)]
struct Extras {
    /// QoS 2 packet ids received and not yet released (PUBREL).
    incoming_qos2: HashSet<u16>,
    inbound_aliases: HashMap<u16, Str>,
    outbound_aliases: HashMap<Str, u16>,
    /// Original packet ids of queue deliveries unacked at the last disconnect.
    resend_ids: HashMap<u64, u16>,
}

/// An MQTT session bound to one connection.
pub struct Session {
    pub version: ProtocolVersion,
    /// The client id, then the logged-in user's name, in one allocation: two `Box<str>` were 16
    /// bytes more of every connection's state, and one allocation more of an authenticated
    /// one's (issue 18). [`Session::client_id`], [`Session::user`].
    names: Box<str>,
    /// Where the client id ends in `names` (an MQTT string: at most 65,535 bytes).
    client_id_len: u16,
    /// The client logged in as a user (`None` is not the empty name).
    has_user: bool,
    connection: ConnectionId,
    owner: OwnerId,
    vhost: Arc<VHost>,
    /// Shared by the connections of a listener (issue 18: a copy was 128 bytes of each).
    settings: Arc<Settings>,
    mode: Mode,
    /// Made with the first subscription (most idle clients never subscribe).
    subs: Option<Box<Subscriptions>>,
    /// A SUBSCRIBE not finished yet ([`Session::resume`]).
    subscribing: Option<Box<PendingSubscribe>>,
    /// Boxed: most clients have none, and inline it is 470 bytes of every session.
    pub will: Option<Box<Will>>,
    /// Effective keep alive in seconds (0 = none).
    pub keep_alive: u16,
    /// Session expiry in seconds (`u32::MAX` never); 0 ends the session with the connection.
    pub session_expiry: u32,
    persistent: bool,
    // Inbound state.
    /// What most sessions never need (QoS 2 ids, topic aliases, resend ids), allocated on
    /// first use: inline it was 190 bytes of every idle connection.
    extras: Option<Box<Extras>>,
    // Outbound state.
    window: u16,
    /// What a session needs once messages flow (inflight window, backlog, the topic buffer,
    /// congested subscribers), made on first use: a device that only waits for its commands
    /// does without it (issue 18: 112 bytes of every idle connection, which took `Conn` from
    /// jemalloc's 640-byte class to 512).
    traffic: Option<Box<Traffic>>,
    next_packet_id: u16,
    client_alias_max: u16,
    client_max_packet: u32,
    problem_info: bool,
    /// A 3.1 / 3.1.1 bridge (`Connect::bridge`): its subscriptions get *no local* and *retain
    /// as published*.
    bridge: bool,
    /// The session's direct sink (`ferry_core::sink`), with the outbox it delivers to: bound
    /// by a transient session's subscriptions; a persistent session's own deliveries (retained
    /// messages) go to its outbox too.
    sink: Arc<DirectSink>,
    /// Deliveries from queues (the session's own, shared subscriptions'); made with the first
    /// consumer, as most clean sessions have none.
    queue_outbox: Option<Arc<Outbox<Delivery>>>,
    /// [`Session::pump`] stopped with deliveries ready because [`Session::out`] is full enough
    /// for one write: the driver writes, then pumps again before it waits for anything.
    pub more: bool,
    /// Acks (PUBACK, PUBREC, and what must follow them) waiting for store commits, in order.
    pub acks: AckQueue<Packet>,
    /// While sending a SUBSCRIBE's retained messages: a packet goes behind the acks waiting
    /// for commits (the SUBACK among them) instead of straight out.
    after_acks: bool,
    /// The CONNACK was larger than the client's Maximum Packet Size and was not sent: the
    /// driver closes the connection at once, sending nothing.
    pub connack_withheld: bool,
    /// The connection closes without a DISCONNECT (a second CONNECT, a server packet from the
    /// client, a withheld CONNACK).
    quiet: bool,
    /// Bytes to write to the socket.
    pub out: Vec<u8>,
    /// Counters for `$SYS`.
    pub stats: SessionStats,
    /// The broker's disk alarm, as the driver last saw it: while it is up, 5.0 QoS 1/2
    /// publishes get 0x97.
    disk_alarm: bool,
    /// The registry's view of this session, kept current for the management API when
    /// subscriptions or the expiry change ([`Session::attach_listing`]).
    listing: Option<Arc<crate::registry::Kick>>,
}

/// What the session counted since the driver last took it ([`SessionStats::take`]) and added
/// it into the connection's entry and the frontend's totals, once per wake-up. Counts since
/// then fit a `u32` (saturated), and with three of them the connection's state is 8 bytes
/// smaller than with running `u64` totals (issue 18).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    pub messages_in: u32,
    pub messages_out: u32,
    /// Payload bytes of the PUBLISHes sent (`$SYS/broker/publish/bytes/sent`).
    pub payload_out: u32,
}

impl SessionStats {
    /// The counts since the last call.
    pub fn take(&mut self) -> SessionStats {
        std::mem::take(self)
    }
}

/// A session while its connection is parked (`crate::park`): what it keeps then, without what
/// a parked session has none of (its write buffer, empty at a park; a SUBSCRIBE in progress;
/// deliveries in flight; acks waiting for the store; counts not handed over; the driver's
/// publisher flow control) unless it has, in one box then ([`ParkedRest`]). Its queue side (a
/// persistent session's queue and consumer, the outbox of its queue deliveries) is one box too;
/// the connection's id, client id and user are its entry's (the login the driver recorded
/// before the claim), made into the session's names again at [`ParkedSession::resume`]. 96
/// bytes where a [`Session`] is 200: with the driver's part the parked record is jemalloc's 128
/// class (issue 18: it was the 256 with the session whole, then the 160 with the names and the
/// flow control in it, and the names' own allocation; `a_parked_session_stays_small`).
pub(crate) struct ParkedSession {
    vhost: Arc<VHost>,
    settings: Arc<Settings>,
    sink: Arc<DirectSink>,
    owner: OwnerId,
    subs: Option<Box<Subscriptions>>,
    will: Option<Box<Will>>,
    listing: Option<Arc<crate::registry::Kick>>,
    queues: Option<Box<ParkedQueues>>,
    rest: Option<Box<ParkedRest>>,
    session_expiry: u32,
    client_max_packet: u32,
    keep_alive: u16,
    window: u16,
    next_packet_id: u16,
    client_alias_max: u16,
    version: ProtocolVersion,
    has_user: bool,
    persistent: bool,
    problem_info: bool,
    bridge: bool,
    disk_alarm: bool,
    /// `Mode::Transient`'s `bound`.
    bound: bool,
}

/// A parked session's queue side: a persistent session's queue and consumer
/// (`Mode::Persistent`), the outbox of its queue deliveries (a persistent session's, a shared
/// subscription's).
struct ParkedQueues {
    persistent: Option<(Arc<Queue>, ConsumerId)>,
    outbox: Option<Arc<Outbox<Delivery>>>,
}

/// What a parked session rarely has (see [`ParkedSession`]).
struct ParkedRest {
    subscribing: Option<Box<PendingSubscribe>>,
    extras: Option<Box<Extras>>,
    traffic: Option<Box<Traffic>>,
    /// The driver's (`Conn::flow`), kept when it holds something (a publish rate's bucket).
    flow: Option<Box<PublisherFlow>>,
    acks: AckQueue<Packet>,
    out: Vec<u8>,
    stats: SessionStats,
    more: bool,
    after_acks: bool,
    connack_withheld: bool,
    quiet: bool,
}

impl Session {
    /// The session as a parked connection keeps it ([`ParkedSession::resume`] gives it back).
    /// Both list every field of [`Session`] (no `..`): a field added to it must be placed here
    /// and there, or neither compiles, so a park never drops a part of a session. `flow` is the
    /// driver's publisher flow control, kept with the session's rare parts.
    pub(crate) fn park(self, flow: Option<Box<PublisherFlow>>) -> ParkedSession {
        let Session {
            version,
            // The entry's login has both ([`ParkedSession::resume`]).
            names: _,
            client_id_len: _,
            has_user,
            connection: _,
            owner,
            vhost,
            settings,
            mode,
            subs,
            subscribing,
            will,
            keep_alive,
            session_expiry,
            persistent,
            extras,
            window,
            traffic,
            next_packet_id,
            client_alias_max,
            client_max_packet,
            problem_info,
            bridge,
            sink,
            queue_outbox,
            more,
            acks,
            after_acks,
            connack_withheld,
            quiet,
            out,
            stats,
            disk_alarm,
            listing,
        } = self;
        let (persistent_queue, bound) = match mode {
            Mode::Transient { bound } => (None, bound),
            Mode::Persistent { queue, consumer } => (Some((queue, consumer)), false),
        };
        let queues = (persistent_queue.is_some() || queue_outbox.is_some())
            .then(|| Box::new(ParkedQueues { persistent: persistent_queue, outbox: queue_outbox }));
        let rest = (subscribing.is_some()
            || extras.is_some()
            || traffic.is_some()
            || flow.is_some()
            || !acks.is_empty()
            || !out.is_empty()
            || stats != SessionStats::default()
            || more
            || after_acks
            || connack_withheld
            || quiet)
            .then(|| {
                Box::new(ParkedRest {
                    subscribing,
                    extras,
                    traffic,
                    flow,
                    acks,
                    out,
                    stats,
                    more,
                    after_acks,
                    connack_withheld,
                    quiet,
                })
            });
        ParkedSession {
            vhost,
            settings,
            sink,
            owner,
            subs,
            will,
            listing,
            queues,
            rest,
            session_expiry,
            client_max_packet,
            keep_alive,
            window,
            next_packet_id,
            client_alias_max,
            version,
            has_user,
            persistent,
            problem_info,
            bridge,
            disk_alarm,
            bound,
        }
    }
}

impl ParkedSession {
    /// The session served again by `connection`, its own entry: the entry's id, and the client
    /// id and user of its login made into the session's names again. With the driver's flow
    /// control, if it was kept ([`Session::park`]).
    pub(crate) fn resume(self, connection: &ConnectionEntry) -> (Session, Option<Box<PublisherFlow>>) {
        let ParkedSession {
            vhost,
            settings,
            sink,
            owner,
            subs,
            will,
            listing,
            queues,
            rest,
            session_expiry,
            client_max_packet,
            keep_alive,
            window,
            next_packet_id,
            client_alias_max,
            version,
            has_user,
            persistent,
            problem_info,
            bridge,
            disk_alarm,
            bound,
        } = self;
        // Recorded before the claim, so before any session is made (`driver::establish`); an
        // entry keeps an empty client id as none.
        let client_id = connection.client_id().unwrap_or_default();
        let user = if has_user { connection.user().unwrap_or_default() } else { "" };
        let client_id_len = client_id.len() as u16;
        let names = [client_id, user].concat().into_boxed_str();
        let (mode, queue_outbox) = match queues.map(|q| *q) {
            Some(ParkedQueues { persistent: Some((queue, consumer)), outbox }) => {
                (Mode::Persistent { queue, consumer }, outbox)
            }
            Some(ParkedQueues { persistent: None, outbox }) => (Mode::Transient { bound }, outbox),
            None => (Mode::Transient { bound }, None),
        };
        let ParkedRest {
            subscribing,
            extras,
            traffic,
            flow,
            acks,
            out,
            stats,
            more,
            after_acks,
            connack_withheld,
            quiet,
        } = match rest {
            Some(rest) => *rest,
            None => ParkedRest {
                subscribing: None,
                extras: None,
                traffic: None,
                flow: None,
                acks: AckQueue::new(),
                out: Vec::new(),
                stats: SessionStats::default(),
                more: false,
                after_acks: false,
                connack_withheld: false,
                quiet: false,
            },
        };
        let session = Session {
            version,
            names,
            client_id_len,
            has_user,
            connection: connection.id(),
            owner,
            vhost,
            settings,
            mode,
            subs,
            subscribing,
            will,
            keep_alive,
            session_expiry,
            persistent,
            extras,
            window,
            traffic,
            next_packet_id,
            client_alias_max,
            client_max_packet,
            problem_info,
            bridge,
            sink,
            queue_outbox,
            more,
            acks,
            after_acks,
            connack_withheld,
            quiet,
            out,
            stats,
            disk_alarm,
            listing,
        };
        (session, flow)
    }

    /// See [`Session::kick`].
    pub(crate) fn kick(&self) -> &Arc<crate::registry::Kick> {
        self.listing.as_ref().expect("the driver attaches the kick before serving")
    }

    /// See [`Session::sink_outbox`].
    pub(crate) fn sink_outbox(&self) -> &Outbox<SinkDelivery> {
        self.sink.outbox()
    }

    /// See [`Session::queue_outbox`].
    pub(crate) fn queue_outbox(&self) -> Option<&Arc<Outbox<Delivery>>> {
        self.queues.as_ref()?.outbox.as_ref()
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").field("client_id", &self.client_id()).field("version", &self.version).finish()
    }
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pending::Sink(_) => "Pending::Sink",
            Pending::Queue(_) => "Pending::Queue",
        })
    }
}

/// The prefix of RabbitMQ-style direct reply-to queues (`amq.rabbitmq.reply-to.<token>`, made
/// by the AMQP frontend). An AMQP requester's `reply_to` reaches an MQTT responder as the
/// response topic `amq/rabbitmq/reply-to/<token>`; its reply is routed by the default exchange,
/// which is the only way to reach these queues (they are bound to nothing else).
pub const DIRECT_REPLY_TO_PREFIX: &str = "amq.rabbitmq.reply-to.";
/// [`DIRECT_REPLY_TO_PREFIX`] as an MQTT topic (checked on the topic, so no swap per publish).
const DIRECT_REPLY_TO_TOPIC: &str = "amq/rabbitmq/reply-to/";

/// Makes sure the listener's MQTT exchange exists and routes by topic: declared durable and of
/// type `topic` when missing (an operator may name a new exchange in `mqtt_exchange`), refused
/// when an exchange of another type has the name.
pub fn ensure_exchange(vhost: &VHost, name: &ShortString) -> Result<(), CoreError> {
    let kind = match vhost.exchange(&name.to_string_lossy()) {
        Some(x) => x.kind(),
        None => {
            let decl = ExchangeDeclare {
                name: name.clone(),
                kind: ExchangeKind::Topic.as_str().to_string(),
                passive: false,
                options: ExchangeOptions::default(),
            };
            vhost.declare_exchange(decl)?.kind()
        }
    };
    if kind != ExchangeKind::Topic {
        return Err(CoreError::precondition(format!(
            "the MQTT exchange '{name}' is a {} exchange, not a topic exchange",
            kind.as_str()
        )));
    }
    Ok(())
}

/// How much output [`Session::pump`] makes before the driver writes it.
pub const PUMP_BATCH: usize = 64 * 1024;

pub(crate) fn session_queue_name(client_id: &str) -> QueueName {
    QueueName::from(format!("{}{client_id}", crate::acl::SESSION_QUEUE_PREFIX))
}

/// Encodes a CONNACK refusal into `out` (what a CONNECT gets when it is refused); nothing when
/// `version` closes without a packet for `why` (see [`MqttError::codes`]).
pub fn refuse(version: ProtocolVersion, why: MqttError, out: &mut BytesMut) {
    if let Some(code) = why.code(version) {
        encode(
            &Packet::ConnAck(ConnAck { session_present: false, code, properties: Default::default() }),
            version,
            out,
        );
    }
}

impl Session {
    /// Starts a session for an accepted CONNECT whose client id is claimed (`stored` is what
    /// the registry kept for it). Writes the CONNACK.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        connect: Connect,
        client_id: String,
        assigned_id: bool,
        connection: ConnectionId,
        vhost: Arc<VHost>,
        settings: Arc<Settings>,
        user: Option<String>,
        stored: Option<StoredSession>,
        now: Millis,
    ) -> Result<Session, CoreError> {
        let v5 = connect.version == ProtocolVersion::V5;
        let p = &connect.properties;
        let session_expiry = if v5 {
            p.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        let persistent = session_expiry > 0;
        // An MQTT string, so never longer; refused rather than cut if it were.
        let client_id_len = u16::try_from(client_id.len())
            .map_err(|_| CoreError::PreconditionFailed("client id longer than 65,535 bytes".into()))?;
        ensure_exchange(&vhost, &settings.exchange)?;
        let owner = OwnerId::next();
        let queue_name = session_queue_name(&client_id);
        let sink = DirectSink::with_max_queued(
            Outbox::bounded(settings.outbox_capacity, settings.outbox_bytes),
            settings.max_queued_messages as usize,
        );
        let mut queue_outbox = None;
        let window = if v5 { p.receive_maximum.unwrap_or(u16::MAX) } else { settings.max_inflight };

        // A clean start discards any previous session.
        let mut stored = stored;
        if connect.clean_start {
            if stored.take().is_some() || vhost.queue(&queue_name.to_string_lossy()).is_some() {
                vhost.store().submit(vec![StoreOp::DeleteSession {
                    vhost: vhost.name().to_string(),
                    client_id: client_id.clone(),
                }]);
            }
            vhost.delete_queue(&queue_name, connection, false, false, now)?;
        }
        let existing = vhost.queue(&queue_name.to_string_lossy());
        let session_present = !connect.clean_start && (existing.is_some() || stored.is_some());
        let mode = if persistent || existing.is_some() {
            let queue = match existing {
                // An existing queue is resumed as it is, never declared again: its arguments
                // are the ones it was created with (a queue's arguments cannot change, and a
                // redeclare with others would be refused as inequivalent). So a changed
                // `max_queued_messages`, or one introduced after the queue was made, applies to
                // session queues created from then on.
                Some(q) => q,
                None => {
                    // No `x-expires`: the expiry interval may change (a later CONNECT, or
                    // DISCONNECT in 5.0) and may exceed x-expires' 2^32-1 ms; the driver deletes
                    // the queue when the session expires (see `Registry::expire`).
                    let mut arguments = FieldTable::new();
                    if !settings.queue_qos0_offline {
                        arguments.insert("x-ferry-transient-needs-consumer", FieldValue::Bool(true));
                    }
                    // `max_queued_messages` as `x-max-length`: it counts ready messages, not
                    // those delivered and unacknowledged (in flight), as Mosquitto counts
                    // queued messages beyond the inflight ones. Past it the core's default
                    // overflow, drop-head (RabbitMQ's), drops the oldest queued message. Brokers
                    // differ here: Mosquitto drops the newest (the incoming message), EMQX the
                    // oldest (as here).
                    if settings.max_queued_messages > 0 {
                        arguments.insert("x-max-length", FieldValue::I64(i64::from(settings.max_queued_messages)));
                    }
                    let options = QueueOptions { durable: true, exclusive: None, auto_delete: false, arguments };
                    vhost
                        .declare_queue(QueueDeclare { name: queue_name, passive: false, options, connection }, now)?
                        .queue
                }
            };
            let spec = ConsumerSpec {
                tag: ShortString::from(format!("mqtt-{}", connection.0)),
                owner,
                connection,
                prefetch: window as u32,
                no_ack: false,
                exclusive: false,
                priority: 0,
                // The outbox is the sink (ferry_core::sink); the inflight window bounds it.
                sink: queue_outbox.get_or_insert_with(|| Arc::new(Outbox::new(settings.outbox_capacity))).clone(),
            };
            let (queue, consumer) = vhost.consume(queue.name(), spec, now)?;
            Mode::Persistent { queue, consumer }
        } else {
            Mode::Transient { bound: false }
        };

        let keep_alive = if settings.max_keep_alive > 0
            && (connect.keep_alive == 0 || connect.keep_alive > settings.max_keep_alive)
        {
            settings.max_keep_alive
        } else {
            connect.keep_alive
        };
        let mut s = Session {
            version: connect.version,
            bridge: connect.bridge && connect.version != ProtocolVersion::V5,
            client_id_len,
            has_user: user.is_some(),
            names: [client_id.as_str(), user.as_deref().unwrap_or("")].concat().into_boxed_str(),
            connection,
            owner,
            vhost,
            mode,
            subs: None,
            subscribing: None,
            will: connect.will.clone().map(Box::new),
            keep_alive,
            session_expiry,
            persistent,
            extras: None,
            window: window.max(1),
            traffic: None,
            next_packet_id: 1,
            client_alias_max: if v5 { p.topic_alias_maximum.unwrap_or(0) } else { 0 },
            client_max_packet: if v5 { p.maximum_packet_size.unwrap_or(u32::MAX) } else { u32::MAX },
            problem_info: p.request_problem_information.unwrap_or(1) == 1,
            sink,
            queue_outbox,
            more: false,
            acks: AckQueue::new(),
            after_acks: false,
            connack_withheld: false,
            quiet: false,
            // Grows with what is written at once; an idle connection keeps next to nothing.
            out: Vec::new(),
            stats: SessionStats::default(),
            settings,
            disk_alarm: false,
            listing: None,
        };

        let mut ack = ConnAck { session_present, code: reason::SUCCESS, properties: Default::default() };
        if v5 {
            let ap = &mut ack.properties;
            ap.receive_maximum = Some(s.settings.receive_maximum);
            ap.maximum_packet_size = Some(s.settings.max_packet_size);
            ap.topic_alias_maximum = Some(s.settings.topic_alias_maximum);
            if assigned_id {
                ap.assigned_client_identifier = Some(Str::from(client_id.as_str()));
            }
            if keep_alive != connect.keep_alive {
                ap.server_keep_alive = Some(keep_alive);
            }
        }
        let connack = Packet::ConnAck(ack);
        if encoded_len(&connack, s.version) > s.client_max_packet as usize {
            // [MQTT-3.1.2-24]: not even the CONNACK may exceed the client's Maximum Packet
            // Size; the connection is closed without it (see `connack_withheld`), and a client
            // that was never connected leaves no will.
            s.connack_withheld = true;
            s.will = None;
            return Ok(s);
        }
        s.send(connack);

        // Resume a stored session: its subscriptions (re-consuming shared queues), QoS 2 state,
        // and the PUBRELs still owed.
        if let Some(st) = stored.filter(|_| session_present) {
            if !st.incoming_qos2.is_empty() || !st.inflight_ids.is_empty() {
                let extras = s.extras();
                extras.incoming_qos2 = st.incoming_qos2;
                extras.resend_ids = st.inflight_ids;
            }
            for sub in st.subscriptions {
                if let Ok(filter) = Filter::parse(&sub.filter) {
                    // Bindings of the session queue survived; shared consumers are per connection.
                    let _ = s.add_subscription(filter, sub.options, sub.identifier, None, now);
                }
            }
            for id in st.outgoing_pubrel {
                s.traffic().inflight.insert(id, Inflight::AwaitingPubComp);
                s.send(Packet::PubRel(PubResp::ok(id)));
            }
        }
        // The session as it now is (with this connection's will) is stored: a broker crash
        // from here on is this client's connection loss.
        s.persist();
        Ok(s)
    }

    /// Whether the broker's disk alarm is up (the driver tells before each batch of packets).
    pub fn set_disk_alarm(&mut self, raised: bool) {
        self.disk_alarm = raised;
    }

    /// Takes the will out of the session and says whether and when it is published, now that
    /// the connection ends for `close`. `resumed`: for a takeover, whether the new connection
    /// resumes this session.
    pub fn will_on_close(&mut self, close: &Close, resumed: bool) -> WillOnClose {
        let will = self.will.take().map(|w| *w);
        let will_delay = will.as_ref().and_then(|w| w.properties.will_delay_interval).unwrap_or(0);
        let publish = match close {
            Close::ClientDisconnect { with_will } => *with_will,
            // Taken over by a connection that resumes the session: it goes on, and the will is
            // not due (Mosquitto's 07-will-takeover; 5.0 §3.1.2.5: a new connection for the
            // client id came before the connection closed). A session that ends here (expiry
            // 0, or the new connection starts clean) publishes it.
            Close::TakenOver => !(self.session_expiry > 0 && resumed),
            Close::Lost | Close::Violation { .. } | Close::Shutdown | Close::Administrative { .. } => true,
        };
        WillOnClose { will: will.filter(|_| publish), delay: will_delay.min(self.session_expiry) }
    }

    /// Whether this session's state is kept in the store.
    fn stores_state(&self) -> bool {
        self.session_expiry > 0 && matches!(self.mode, Mode::Persistent { .. })
    }

    /// The session's state as stored: subscriptions, QoS 2 ids, packet ids in flight, expiry.
    fn stored_state(&self, will: Option<Will>, disconnected_at: u64) -> StoredSession {
        let mut inflight_ids = HashMap::new();
        let mut outgoing_pubrel = Vec::new();
        let own = match &self.mode {
            Mode::Persistent { queue, .. } => Some(queue),
            Mode::Transient { .. } => None,
        };
        for (id, i) in self.traffic.iter().flat_map(|t| &t.inflight) {
            match i {
                Inflight::AwaitingPubAck(Source::Queue { queue: q, seq })
                | Inflight::AwaitingPubRec(Source::Queue { queue: q, seq })
                    if own.is_some_and(|own| Arc::ptr_eq(q, own)) =>
                {
                    inflight_ids.insert(*seq, *id);
                }
                Inflight::AwaitingPubComp => outgoing_pubrel.push(*id),
                _ => {}
            }
        }
        outgoing_pubrel.sort_unstable();
        StoredSession {
            subscriptions: self
                .subs
                .iter()
                .flat_map(|s| s.values())
                .map(|s| StoredSubscription {
                    filter: s.filter.text().to_string(),
                    options: s.options,
                    identifier: s.identifier.map(std::num::NonZeroU32::get),
                })
                .collect(),
            incoming_qos2: self.extras.as_ref().map(|e| e.incoming_qos2.clone()).unwrap_or_default(),
            outgoing_pubrel,
            inflight_ids,
            expiry: self.session_expiry,
            exchange: self.settings.exchange.to_string_lossy(),
            will,
            disconnected_at,
        }
    }

    /// Stores the session's state (a no-op for a session that ends with its connection); the
    /// commit resolves when it is durable.
    fn persist(&self) -> Commit {
        if !self.stores_state() {
            return Commit::done(Ok(()));
        }
        let state = encode_session(&self.stored_state(self.will.as_deref().cloned(), 0));
        self.vhost.store().submit(vec![StoreOp::PutSession {
            vhost: self.vhost.name().to_string(),
            client_id: self.client_id().to_string(),
            state,
        }])
    }

    /// See the field: allocated now if it was not.
    fn extras(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Default::default)
    }
    pub fn vhost(&self) -> &Arc<VHost> {
        &self.vhost
    }
    /// The exchange publishes (and wills) go to.
    pub fn exchange(&self) -> &ShortString {
        &self.settings.exchange
    }
    pub fn sink_outbox(&self) -> &Outbox<SinkDelivery> {
        self.sink.outbox()
    }
    pub fn sink(&self) -> &Arc<DirectSink> {
        &self.sink
    }
    pub fn queue_outbox(&self) -> Option<&Arc<Outbox<Delivery>>> {
        self.queue_outbox.as_ref()
    }
    pub fn is_v5(&self) -> bool {
        self.version == ProtocolVersion::V5
    }

    /// The user the client logged in as; `None` for an anonymous client.
    pub fn user(&self) -> Option<&str> {
        self.has_user.then(|| &self.names[usize::from(self.client_id_len)..])
    }

    pub fn client_id(&self) -> &str {
        &self.names[..usize::from(self.client_id_len)]
    }

    fn send(&mut self, packet: Packet) {
        encode(&packet, self.version, &mut self.out);
    }

    /// Sends a packet that may carry a reason string / user properties, dropping them when the
    /// client asked for no problem information or when they would exceed its packet limit.
    fn send_trimmed(&mut self, mut packet: Packet) {
        let strip = |p: &mut Packet| {
            let props = match p {
                Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => &mut r.properties,
                Packet::SubAck(a) => &mut a.properties,
                Packet::UnsubAck(a) => &mut a.properties,
                Packet::Disconnect(d) => &mut d.properties,
                _ => return,
            };
            if !props.is_empty() {
                props.reason_string = None;
                props.user_properties.clear();
            }
        };
        if !self.problem_info && !matches!(packet, Packet::Disconnect(_)) {
            strip(&mut packet);
        }
        if encoded_len(&packet, self.version) > self.client_max_packet as usize {
            strip(&mut packet);
            if encoded_len(&packet, self.version) > self.client_max_packet as usize {
                // [MQTT-3.1.2-24]: never above the client's limit, not even without extras.
                return;
            }
        }
        self.send(packet);
    }

    /// An acknowledgement of the wrong type for a packet id in flight (PUBACK for QoS 2, PUBREC or
    /// PUBCOMP for QoS 1, PUBCOMP before PUBREL): a protocol error (5.0 §4.3, §4.13), which closes
    /// the connection without a DISCONNECT, as Mosquitto does (the DISCONNECT is a MAY); the
    /// message stays unacknowledged and is sent again to a persistent session.
    fn wrong_ack(&mut self, detail: &str) -> Close {
        self.quiet = true;
        MqttError::ProtocolError.close(detail)
    }

    /// The connection is to close without a DISCONNECT (see the `quiet` field).
    pub fn close_quietly(&mut self) {
        self.quiet = true;
    }

    /// Sends DISCONNECT with `reason` to a 5.0 client (3.1.1 has no server DISCONNECT).
    pub fn send_disconnect(&mut self, reason_code: u8, detail: &str) {
        if self.is_v5() && !self.connack_withheld && !self.quiet {
            let mut d = Disconnect { reason: reason_code, properties: Default::default() };
            if !detail.is_empty() {
                // A detail may quote what the client sent (a 65,535-byte filter): kept short.
                let mut end = detail.len().min(200);
                while !detail.is_char_boundary(end) {
                    end -= 1;
                }
                d.properties.reason_string = Some(Str::from(&detail[..end]));
            }
            self.send_trimmed(Packet::Disconnect(d));
        }
    }

    fn next_id(&mut self) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.is_inflight(id) {
                return id;
            }
        }
    }

    // ----- inbound packets -------------------------------------------------------------------

    /// Handles one packet from the client. `Err` ends the connection.
    pub fn handle(&mut self, packet: Packet, now: Millis) -> Result<(), Close> {
        // Packets are handled in order: a SUBSCRIBE still being worked through (a driver
        // should have resumed it to the end) is finished first.
        while self.subscribing.is_some() {
            self.resume(now)?;
        }
        match packet {
            Packet::Publish(p) => self.on_publish(p, now),
            Packet::PubAck(r) => self.on_puback(r, now),
            Packet::PubRec(r) => self.on_pubrec(r, now),
            Packet::PubRel(r) => {
                let known = self.extras.as_mut().is_some_and(|e| e.incoming_qos2.remove(&r.packet_id));
                // An unknown id is answered 0x00 too, as Mosquitto does: it is most often a
                // PUBREL sent again after a reconnect whose PUBCOMP was lost, and 0x92 would tell
                // that client the message was lost (5.0 §4.3.3 only asks for a PUBCOMP).
                let _ = known;
                let code = reason::SUCCESS;
                // The id is free again only once that is stored: else a crash would bring it back
                // and the client's next QoS 2 message with this id would be taken for a resend.
                let commit = if known { self.persist() } else { Commit::done(Ok(())) };
                let packet =
                    Packet::PubComp(PubResp { packet_id: r.packet_id, reason: code, properties: Default::default() });
                self.queue_ack(commit, packet);
                Ok(())
            }
            Packet::PubComp(r) => match self.traffic.as_ref().and_then(|t| t.inflight.get(&r.packet_id)) {
                Some(Inflight::AwaitingPubComp) => {
                    self.take_inflight(r.packet_id);
                    self.persist();
                    Ok(())
                }
                Some(Inflight::AwaitingPubAck(_)) => Err(self.wrong_ack("PUBCOMP for a QoS 1 message")),
                Some(Inflight::AwaitingPubRec(_)) => Err(self.wrong_ack("PUBCOMP before PUBREC/PUBREL")),
                // An id we do not know: ignored (a duplicate after a reconnect).
                None => Ok(()),
            },
            Packet::Subscribe(s) => self.on_subscribe(s, now),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u, now),
            Packet::PingReq => {
                self.send(Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => {
                if self.is_v5() {
                    if let Some(e) = d.properties.session_expiry_interval {
                        if self.session_expiry == 0 && e > 0 {
                            return Err(MqttError::ProtocolError
                                .close("session expiry cannot be set on DISCONNECT when it was 0 at CONNECT"));
                        }
                        self.session_expiry = e;
                        if let Some(kick) = &self.listing {
                            kick.view().set_expiry(e);
                        }
                    }
                }
                Err(Close::ClientDisconnect { with_will: d.reason == reason::DISCONNECT_WITH_WILL })
            }
            Packet::Connect(_) => {
                // [MQTT-3.1.0-2] (3.1.1 [MQTT-3.1.0-2] too): a protocol error that closes the
                // connection. Closed without a DISCONNECT, as Mosquitto does (5.0 §4.13 makes it
                // optional): the client is past listening to this connection (docs/conformance.md).
                self.quiet = true;
                Err(MqttError::ProtocolError.close("second CONNECT"))
            }
            Packet::Auth(_) => Err(MqttError::ProtocolError.close("AUTH without an authentication method")),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                // Closed without a DISCONNECT, like a second CONNECT.
                self.quiet = true;
                Err(MqttError::ProtocolError.close("a server-to-client packet from the client"))
            }
        }
    }

    fn on_publish(&mut self, mut p: Publish, now: Millis) -> Result<(), Close> {
        let v5 = self.is_v5();
        // Topic aliases (5.0 §3.3.2.3.4).
        if let Some(alias) = p.properties.topic_alias {
            if alias == 0 || alias > self.settings.topic_alias_maximum {
                return Err(MqttError::TopicAliasInvalid.close(format!("topic alias {alias}")));
            }
            if p.topic.is_empty() {
                match self.extras.as_ref().and_then(|e| e.inbound_aliases.get(&alias)) {
                    Some(t) => p.topic = t.clone(),
                    None => return Err(MqttError::ProtocolError.close(format!("unknown topic alias {alias}"))),
                }
            } else {
                self.extras().inbound_aliases.insert(alias, p.topic.clone());
            }
        }
        // The decoder checked the topic's UTF-8; `as_str` checks it again, so once here.
        let topic = p.topic.as_str();
        match check_topic_name(topic) {
            // `$share/...` is refused below, as not authorized (Mosquitto's answer), and the
            // connection stays.
            Ok(()) | Err(TopicError::SharedName) => {}
            Err(e) => {
                // Deeper than MAX_LEVELS: a protocol error, as Mosquitto closes past its limit
                // of 200; the rest (empty) are invalid names.
                let why = if e == TopicError::TooDeep { MqttError::TopicTooDeep } else { MqttError::TopicNameInvalid };
                return Err(why.close(e.to_string()));
            }
        }
        if v5 && p.qos > QoS::AtMostOnce && self.unacked_inbound() >= self.settings.receive_maximum as usize {
            return Err(
                MqttError::ReceiveMaximumExceeded.close("more QoS 1/2 publishes in flight than Receive Maximum")
            );
        }
        let id = p.packet_id.unwrap_or(0);
        if p.qos == QoS::ExactlyOnce && self.extras.as_ref().is_some_and(|e| e.incoming_qos2.contains(&id)) {
            // A resend of a QoS 2 publish we already have: answer again, route nothing.
            self.queue_ack(Commit::done(Ok(())), Packet::PubRec(PubResp::ok(id)));
            return Ok(());
        }
        self.stats.messages_in = self.stats.messages_in.saturating_add(1);
        if server_only(topic) || !self.settings.acl.can_write(self.user(), self.client_id(), topic) {
            // Not authorized (Mosquitto's behaviour): 5.0 QoS 1/2 get 0x87; QoS 0 and 3.1.1
            // publishes are dropped, 3.1.1 QoS 1/2 still acknowledged.
            tracing::debug!(client_id = %self.client_id(), topic = %topic, "publish denied by the ACL");
            let code = MqttError::PublishNotAuthorized.ack_code(self.version);
            let packet = PubResp { packet_id: id, reason: code, properties: Default::default() };
            match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.queue_ack(Commit::done(Ok(())), Packet::PubAck(packet)),
                // 3.1.1 answers an unknown PUBREL with PUBCOMP anyway.
                QoS::ExactlyOnce => self.queue_ack(Commit::done(Ok(())), Packet::PubRec(packet)),
            }
            return Ok(());
        }
        if v5 && p.qos > QoS::AtMostOnce && self.disk_alarm {
            // The disk alarm: refused, not routed (QoS 0 is never stored, so it still goes).
            let packet = PubResp {
                packet_id: id,
                reason: MqttError::PublishQuotaExceeded.reason(),
                properties: Default::default(),
            };
            let packet = if p.qos == QoS::AtLeastOnce { Packet::PubAck(packet) } else { Packet::PubRec(packet) };
            self.queue_ack(Commit::done(Ok(())), packet);
            return Ok(());
        }
        let (routed, rejected, mut commit) = self.route(&mut p, now);
        let code = if rejected {
            MqttError::PublishQuotaExceeded.ack_code(self.version)
        } else if routed == 0 && v5 && p.qos == QoS::AtLeastOnce {
            // 5.0 §3.4.2.1 / §3.5.2.1: 0x10 is a MAY. PUBACK says it; PUBREC says 0x00, as
            // Mosquitto does (it routes a QoS 2 message at PUBREL) and its tests expect.
            reason::NO_MATCHING_SUBSCRIBERS
        } else {
            reason::SUCCESS
        };
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.queue_ack(
                commit,
                Packet::PubAck(PubResp { packet_id: id, reason: code, properties: Default::default() }),
            ),
            QoS::ExactlyOnce => {
                if code < 0x80 {
                    self.extras().incoming_qos2.insert(id);
                    commit = commit.join(self.persist());
                }
                self.queue_ack(
                    commit,
                    Packet::PubRec(PubResp { packet_id: id, reason: code, properties: Default::default() }),
                )
            }
        }
        Ok(())
    }

    fn unacked_inbound(&self) -> usize {
        self.acks.len() + self.extras.as_ref().map_or(0, |e| e.incoming_qos2.len())
    }

    /// Publishes into the core (and the retained store). Returns (routed, rejected, commit).
    /// Moves the payload out of `p` into the message.
    fn route(&mut self, p: &mut Publish, now: Millis) -> (usize, bool, Commit) {
        let topic = p.topic.as_str();
        let origin = Origin { protocol: Protocol::Mqtt, connection: self.connection };
        let exchange = if topic.starts_with(DIRECT_REPLY_TO_TOPIC) {
            ShortString::default()
        } else {
            self.settings.exchange.clone()
        };
        let key = ShortString::from_bytes(swap_separators_in(topic.as_bytes(), &mut self.traffic().topics));
        let payload = std::mem::take(&mut p.payload);
        let message = to_message_keyed(p, payload, key, &exchange, origin, now);
        let retained_commit = if p.retain {
            let key = message.routing_key.clone();
            // The retained copy is delivered later with RETAIN set; its header says so already.
            Some(self.vhost.set_retained(&key, Arc::new(message.clone())))
        } else {
            None
        };
        // A QoS 1/2 publisher waits for its PUBACK / PUBREC: a `block` queue at its limits holds
        // that instead of refusing the message.
        let waits = p.qos != QoS::AtMostOnce;
        let cache = &mut self.traffic.get_or_insert_with(Default::default).exchange;
        match self.vhost.publish_cached(cache, message, now, waits) {
            Ok(o) => {
                // Our own outbox is drained by this very task; waiting on it would deadlock.
                if !o.congested.is_empty() {
                    let own = self.sink.outbox();
                    let traffic = self.traffic.get_or_insert_with(Default::default);
                    traffic.congested.extend(o.congested.into_iter().filter(|c| !c.is_outbox(own)));
                }
                let commit = match retained_commit {
                    Some(rc) => rc.join(o.commit),
                    None => o.commit,
                };
                (o.routed, o.rejected, commit)
            }
            Err(e) => {
                tracing::warn!(client_id = %self.client_id(), error = %e, "MQTT publish refused by the core");
                (0, true, Commit::done(Ok(())))
            }
        }
    }

    fn queue_ack(&mut self, commit: Commit, packet: Packet) {
        if commit.is_done() && self.acks.is_empty() {
            self.send(packet);
        } else {
            self.acks.push(packet, commit);
        }
    }

    /// Sends an acknowledgement whose commit resolved (called by the driver, in order). A
    /// failed commit of a 3.1.1 publish closes the connection: 3.1.1 has no negative PUBACK, and
    /// the client resends what was not acknowledged when it reconnects.
    pub fn commit_done(&mut self, packet: Packet, ok: bool) -> Result<(), Close> {
        let packet = match (ok, packet) {
            (true, p) => p,
            // A failed commit: 5.0 clients are told.
            (false, Packet::PubAck(mut r)) if self.is_v5() => {
                r.reason = MqttError::StoreFailed.reason();
                Packet::PubAck(r)
            }
            (false, Packet::PubRec(mut r)) if self.is_v5() => {
                r.reason = MqttError::StoreFailed.reason();
                Packet::PubRec(r)
            }
            (false, Packet::PubAck(_) | Packet::PubRec(_)) => {
                return Err(MqttError::StoreFailed.close("a publish could not be stored"))
            }
            // The subscription (or the freed QoS 2 id) works in memory; only its storage failed.
            (false, p) => p,
        };
        self.send_trimmed(packet);
        Ok(())
    }

    fn on_puback(&mut self, r: PubResp, now: Millis) -> Result<(), Close> {
        match self.take_inflight(r.packet_id) {
            Some(Inflight::AwaitingPubAck(src)) => {
                self.settle(src, now);
                Ok(())
            }
            Some(other) => {
                self.traffic().inflight.insert(r.packet_id, other);
                Err(self.wrong_ack("PUBACK for a QoS 2 message"))
            }
            // An ack for an id we do not know: ignore it (a duplicate after reconnect).
            None => Ok(()),
        }
    }

    fn on_pubrec(&mut self, r: PubResp, now: Millis) -> Result<(), Close> {
        match self.take_inflight(r.packet_id) {
            Some(Inflight::AwaitingPubRec(src)) => {
                // The client owns the message now: settle it, then finish the handshake.
                self.settle(src, now);
                if r.reason < 0x80 {
                    self.traffic().inflight.insert(r.packet_id, Inflight::AwaitingPubComp);
                    self.persist();
                    self.send(Packet::PubRel(PubResp::ok(r.packet_id)));
                }
            }
            Some(Inflight::AwaitingPubComp) => {
                self.traffic().inflight.insert(r.packet_id, Inflight::AwaitingPubComp);
                self.send(Packet::PubRel(PubResp::ok(r.packet_id)));
            }
            Some(other) => {
                self.traffic().inflight.insert(r.packet_id, other);
                return Err(self.wrong_ack("PUBREC for a QoS 1 message"));
            }
            None => {
                if let Some(code) = MqttError::PacketIdentifierNotFound.code(self.version) {
                    self.send(Packet::PubRel(PubResp {
                        packet_id: r.packet_id,
                        reason: code,
                        properties: Default::default(),
                    }));
                }
            }
        }
        Ok(())
    }

    fn settle(&mut self, src: Source, now: Millis) {
        if let Source::Queue { queue, seq } = src {
            match queue.ack(seq, now) {
                Ok(effects) => {
                    self.vhost.settle(&queue, effects, now);
                }
                Err(e) => tracing::debug!(client_id = %self.client_id(), error = %e, "ack of a queue delivery"),
            }
        }
    }

    // ----- subscriptions ---------------------------------------------------------------------

    fn on_subscribe(&mut self, s: Subscribe, now: Millis) -> Result<(), Close> {
        let identifier = s.properties.subscription_identifiers.first().copied();
        let mut filters = s.filters;
        let mut refused = 0;
        let per_packet = self.settings.max_subscriptions_per_packet as usize;
        if per_packet > 0 && filters.len() > per_packet {
            // Past the per-packet limit nothing is done, not even parsing.
            refused = filters.len() - per_packet;
            filters.truncate(per_packet);
            tracing::debug!(client_id = %self.client_id(), refused, "SUBSCRIBE over max_subscriptions_per_packet");
        }
        self.subscribing = Some(Box::new(PendingSubscribe {
            packet_id: s.packet_id,
            identifier,
            reasons: Vec::with_capacity(filters.len() + refused),
            filters: filters.into_iter(),
            refused,
            retained: Vec::new(),
        }));
        self.resume(now)
    }

    /// Whether the session holds at least one subscription.
    pub fn is_subscribed(&self) -> bool {
        self.subs.as_ref().is_some_and(|s| s.len() > 0)
    }
    /// Whether a SUBSCRIBE is being worked through: the driver yields to other tasks and
    /// calls [`Session::resume`] until it is done, before handling the next packet.
    pub fn is_subscribing(&self) -> bool {
        self.subscribing.is_some()
    }

    /// Handles the next slice of a SUBSCRIBE ([`SUBSCRIBE_SLICE`] filters); the SUBACK is
    /// written with the last one.
    pub fn resume(&mut self, now: Millis) -> Result<(), Close> {
        let Some(mut pending) = self.subscribing.take() else { return Ok(()) };
        for _ in 0..SUBSCRIBE_SLICE {
            let Some((text, options)) = pending.filters.next() else { break };
            let code = self.subscribe_one(text, options, pending.identifier, &mut pending.retained, now)?;
            pending.reasons.push(code);
        }
        if pending.filters.len() > 0 {
            self.subscribing = Some(pending);
            return Ok(());
        }
        let PendingSubscribe { packet_id, mut reasons, refused, retained, .. } = *pending;
        let quota = self.suback_refusal(MqttError::SubscriptionQuotaExceeded);
        reasons.resize(reasons.len() + refused, quota);
        if self.version == ProtocolVersion::V31 && reasons.iter().any(|&r| r > 2) {
            // 3.1's SUBACK has no failure code (0x80 came with 3.1.1): a 3.1 client would take
            // it for a granted QoS. The only refusal left is closing (docs/conformance.md).
            let why = MqttError::SubscribeRefusedIn31;
            return Err(why.close(why.to_string()));
        }
        // A persistent session's subscriptions are stored before the SUBACK: what a client was
        // told it subscribed to survives a crash.
        let commit = self.persist();
        self.queue_ack(commit, Packet::SubAck(SubAck { packet_id, properties: Default::default(), reasons }));
        // Then the retained messages: behind the SUBACK even when it waits for its commit.
        self.after_acks = true;
        for due in retained {
            for (_, m) in self.vhost.retained().lookup(&due.pattern) {
                let qos = message_qos(&m).min(due.qos);
                self.send_message(&m, qos, true, due.identifier.as_slice(), Source::Sink, false, now);
            }
        }
        self.after_acks = false;
        Ok(())
    }

    /// The SUBACK code for a refused topic filter.
    fn suback_refusal(&self, why: MqttError) -> u8 {
        why.ack_code(self.version)
    }

    /// One filter of a SUBSCRIBE: its SUBACK code.
    fn subscribe_one(
        &mut self,
        text: Str,
        options: SubOptions,
        identifier: Option<u32>,
        retained: &mut Vec<RetainedDue>,
        now: Millis,
    ) -> Result<u8, Close> {
        let filter = match Filter::parse(text.as_str()) {
            // A well-formed filter we do not take (a `$share/` without group or filter).
            Err(TopicError::BadShare) => return Ok(self.suback_refusal(MqttError::SharedFilterInvalid)),
            Err(e) => return Err(malformed_filter(&text, e)),
            Ok(filter) => filter,
        };
        if !self.settings.acl.can_subscribe(self.user(), self.client_id(), filter.topic_filter()) {
            tracing::debug!(client_id = %self.client_id(), filter = %filter.text(), "subscribe denied by the ACL");
            return Ok(self.suback_refusal(MqttError::SubscribeNotAuthorized));
        }
        if self.is_v5() && filter.share_group().is_some() && options.no_local {
            // 5.0 §3.8.3.1: No Local on a shared subscription is a protocol error.
            return Err(MqttError::ProtocolError.close("No Local on a shared subscription"));
        }
        // A 3.1.1 bridge (Mosquitto's `try_private`): what it publishes does not come back to
        // it, and retained messages keep their RETAIN flag, as Mosquitto serves bridges. Not on
        // a shared subscription: skipping its own messages there would take them from the group.
        let options = if self.bridge && filter.share_group().is_none() {
            SubOptions { no_local: true, retain_as_published: true, ..options }
        } else {
            options
        };
        let limit = self.settings.max_subscriptions_per_client as usize;
        if limit > 0 {
            let (count, existing) =
                self.subs.as_ref().map_or((0, false), |s| (s.len(), s.get(filter.text()).is_some()));
            // A resubscription replaces the subscription: it does not count.
            if !existing && count >= limit {
                tracing::debug!(client_id = %self.client_id(), filter = %filter.text(), "subscribe over max_subscriptions_per_client");
                return Ok(self.suback_refusal(MqttError::SubscriptionQuotaExceeded));
            }
        }
        match self.add_subscription(filter, options, identifier, Some(retained), now) {
            Ok(()) => Ok(options.qos as u8),
            Err(e) => {
                tracing::warn!(client_id = %self.client_id(), error = %e, "subscribe failed");
                Ok(self.suback_refusal(MqttError::SubscribeFailed))
            }
        }
    }

    /// Adds or replaces a subscription; with `retained`, notes there the retained messages its
    /// retain handling asks for (sent after the SUBACK).
    fn add_subscription(
        &mut self,
        filter: Filter,
        options: SubOptions,
        identifier: Option<u32>,
        retained: Option<&mut Vec<RetainedDue>>,
        now: Millis,
    ) -> Result<(), CoreError> {
        let exchange = self.settings.exchange.clone();
        let key = BindingKey::new(filter.binding_key()).with_pattern(filter.pattern());
        let persistent = matches!(self.mode, Mode::Persistent { .. });
        let subs = self.subs.get_or_insert_with(|| Box::new(Subscriptions::new(persistent)));
        let existing = subs.get(filter.text()).map(|old| old.cookie);
        let existed = existing.is_some();
        let cookie = existing.unwrap_or_else(|| subs.next_cookie());
        let mut shared = None;
        if let Some(qname) = filter.shared_queue_name() {
            if let Some(old) = subs.get_mut(filter.text()) {
                // Same group and filter: only the options change.
                old.options = options;
                old.identifier = identifier.and_then(std::num::NonZeroU32::new);
                return Ok(());
            }
            let options_q =
                QueueOptions { durable: false, exclusive: None, auto_delete: true, arguments: FieldTable::new() };
            let decl = QueueDeclare {
                name: qname.as_str().into(),
                passive: false,
                options: options_q,
                connection: self.connection,
            };
            let q = self.vhost.declare_queue(decl, now)?.queue;
            self.vhost.bind_queue(q.name(), &exchange, key, self.connection)?;
            let spec = ConsumerSpec {
                tag: ShortString::from(format!("mqtt-{}-{}", self.connection.0, cookie)),
                owner: self.owner,
                connection: self.connection,
                prefetch: self.window as u32,
                no_ack: false,
                exclusive: false,
                priority: 0,
                sink: self
                    .queue_outbox
                    .get_or_insert_with(|| Arc::new(Outbox::new(self.settings.outbox_capacity)))
                    .clone(),
            };
            let (q, consumer) = self.vhost.consume(q.name(), spec, now)?;
            shared = Some((q, consumer));
        } else {
            match &mut self.mode {
                Mode::Transient { bound } => {
                    if !existed {
                        *bound = true;
                        let sink = SinkRef { sink: self.sink.clone(), cookie };
                        self.vhost.bind_sink(&exchange, key, sink)?;
                    }
                }
                Mode::Persistent { queue, .. } => {
                    let name = queue.name().clone();
                    self.vhost.bind_queue(&name, &exchange, key, self.connection)?;
                }
            }
        }
        let retain_handling = options.retain_handling;
        let is_shared = filter.share_group().is_some();
        let pattern = filter.pattern();
        if let Some(kick) = &self.listing {
            kick.view().subscribed(filter.shared_text(), options, identifier);
        }
        let subs = self.subs.get_or_insert_with(|| Box::new(Subscriptions::new(persistent)));
        let id = identifier.and_then(std::num::NonZeroU32::new);
        subs.insert(Subscription { filter, options, identifier: id, cookie, shared: shared.map(Box::new) });
        // Retained messages (§3.3.1.3): not for shared subscriptions; handling 1 only for a new
        // subscription; 2 never.
        if let Some(retained) = retained {
            if !is_shared && (retain_handling == 0 || (retain_handling == 1 && !existed)) {
                retained.push(RetainedDue { pattern, qos: options.qos, identifier });
            }
        }
        Ok(())
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe, now: Millis) -> Result<(), Close> {
        let mut reasons = Vec::with_capacity(u.filters.len());
        for f in u.filters {
            if let Err(e) = check_filter(f.as_str()) {
                return Err(malformed_filter(&f, e));
            }
            let code = match self.subs.as_mut().and_then(|s| s.remove(f.as_str())) {
                Some(sub) => {
                    if let Some(kick) = &self.listing {
                        kick.view().unsubscribed(f.as_str());
                    }
                    self.drop_subscription(sub, now);
                    reason::SUCCESS
                }
                None => reason::NO_SUBSCRIPTION_EXISTED,
            };
            reasons.push(code);
        }
        if !self.is_v5() {
            reasons.clear();
        }
        let commit = self.persist();
        self.queue_ack(
            commit,
            Packet::UnsubAck(UnsubAck { packet_id: u.packet_id, properties: Default::default(), reasons }),
        );
        Ok(())
    }

    fn drop_subscription(&mut self, sub: Subscription, now: Millis) {
        let exchange = self.settings.exchange.clone();
        let key = BindingKey::new(sub.filter.binding_key()).with_pattern(sub.filter.pattern());
        if let Some((q, consumer)) = sub.shared.map(|s| *s) {
            self.vhost.cancel(&q, consumer, now);
            let effects = q.release_owner(self.owner, now);
            self.vhost.settle(&q, effects, now);
            // Our unacked deliveries from it went back to the group.
            if let Some(t) = &mut self.traffic {
                t.inflight.retain(|_, i| !matches!(i, Inflight::AwaitingPubAck(Source::Queue { queue, .. }) | Inflight::AwaitingPubRec(Source::Queue { queue, .. }) if Arc::ptr_eq(queue, &q)));
            }
            return;
        }
        let result = match &self.mode {
            Mode::Transient { bound: true } => self
                .vhost
                .unbind_sink(&exchange, &key, SinkRef { sink: self.sink.clone(), cookie: sub.cookie })
                .map(|_| ()),
            // Nothing was ever bound.
            Mode::Transient { bound: false } => Ok(()),
            Mode::Persistent { queue, .. } => {
                let name = queue.name().clone();
                self.vhost.unbind_queue(&name, &exchange, key, self.connection)
            }
        };
        if let Err(e) = result {
            tracing::debug!(client_id = %self.client_id(), error = %e, "unsubscribe");
        }
    }

    // ----- outbound deliveries ---------------------------------------------------------------

    /// Moves deliveries from the outboxes into PUBLISH packets, within the inflight window, up
    /// to [`PUMP_BATCH`] bytes of output (then [`Session::more`] is set).
    ///
    /// The batch bound keeps the outboxes draining in small steps: a subscriber whose socket is
    /// full writes one batch and comes back for more, instead of taking everything its
    /// publishers keep adding into one ever larger write that blocks for as long as the client
    /// takes to read it all (its publishers would wait for it that long, and treat it as
    /// lagging, see `ferry_core::sink`).
    pub fn pump(&mut self, now: Millis) {
        self.more = false;
        // Nothing has flowed yet and nothing waits: no `Traffic` to make.
        if self.traffic.is_none()
            && self.sink.outbox().is_empty()
            && self.queue_outbox.as_ref().is_none_or(|o| o.is_empty())
        {
            return;
        }
        loop {
            while let Some(p) = self.traffic().backlog.pop_front() {
                if self.out.len() >= PUMP_BATCH {
                    self.traffic().backlog.push_front(p);
                    self.more = true;
                    return;
                }
                if self.traffic().inflight.len() >= self.window as usize && self.would_need_window(&p) {
                    self.traffic().backlog.push_front(p);
                    return;
                }
                match p {
                    Pending::Sink(d) => self.deliver_from_sink(d, now),
                    Pending::Queue(d) => self.deliver_from_queue(d, now),
                }
            }
            // Straight into the backlog: no vector per drain.
            let traffic = self.traffic.get_or_insert_with(Default::default);
            let queued = self.queue_outbox.as_ref().map_or(0, |o| o.drain_with(&mut traffic.backlog, Pending::Queue));
            // Only what this write will carry: the rest stays in the outbox, where it counts
            // against its bounds and holds the publishers back (a queue's deliveries are
            // bounded by the inflight window instead). Draining it all made a backlog of up to
            // twice the outbox beside it, and latency behind it (docs/benchmarks.md).
            let budget = PUMP_BATCH.saturating_sub(self.out.len());
            let sunk = self.sink.outbox().drain_budget(budget, |d| traffic.backlog.push_back(Pending::Sink(d)));
            let drained = queued + sunk;
            if drained == 0 {
                return;
            }
            if self.out.len() >= PUMP_BATCH {
                self.more = true;
                return;
            }
        }
    }

    /// Whether there are deliveries waiting for the inflight window.
    pub fn has_backlog(&self) -> bool {
        self.traffic.as_ref().is_some_and(|t| !t.backlog.is_empty())
    }

    /// The session's [`Traffic`], made on first use.
    fn traffic(&mut self) -> &mut Traffic {
        self.traffic.get_or_insert_with(Default::default)
    }

    fn is_inflight(&self, id: u16) -> bool {
        self.traffic.as_ref().is_some_and(|t| t.inflight.contains_key(&id))
    }

    fn take_inflight(&mut self, id: u16) -> Option<Inflight> {
        self.traffic.as_mut()?.inflight.remove(&id)
    }

    /// The connection parks (`crate::park`): what is kept only for traffic goes, to be made
    /// again with the next message: the traffic state (its inflight table, its backlog's and
    /// topic buffer's room, the cached exchange) when nothing is in flight or waiting, and the
    /// write buffer's room. Packet ids go on from where they were (`next_packet_id` is the
    /// session's).
    pub fn shed(&mut self) {
        if self
            .traffic
            .as_ref()
            .is_some_and(|t| t.inflight.is_empty() && t.backlog.is_empty() && t.congested.is_empty())
        {
            self.traffic = None;
        }
        if self.out.is_empty() {
            self.out = Vec::new();
        }
        self.acks.shed();
        self.sink.outbox().shed();
        if let Some(outbox) = &self.queue_outbox {
            outbox.shed();
        }
    }

    /// Whether this client's publishes found a subscriber or a queue congested since the last
    /// [`Session::take_congested`].
    pub fn is_congested(&self) -> bool {
        self.traffic.as_ref().is_some_and(|t| !t.congested.is_empty())
    }

    /// The subscribers and queues found congested by this client's publishes since the last
    /// call (see [`Traffic::congested`]).
    pub fn take_congested(&mut self) -> impl Iterator<Item = ferry_core::flow::Target> + '_ {
        self.traffic.iter_mut().flat_map(|t| t.congested.drain(..))
    }

    fn would_need_window(&self, p: &Pending) -> bool {
        match p {
            Pending::Queue(d) => message_qos(&d.message) > QoS::AtMostOnce,
            Pending::Sink(d) => message_qos(&d.message) > QoS::AtMostOnce,
        }
    }

    fn deliver_from_sink(&mut self, d: SinkDelivery, now: Millis) {
        let mut qos: Option<QoS> = None;
        let mut retain = false;
        let mut ids: Vec<u32> = Vec::new();
        let own = d.message.origin.protocol == Protocol::Mqtt && d.message.origin.connection == self.connection;
        for cookie in d.cookies.as_slice() {
            let Some(sub) = self.subs.as_ref().and_then(|s| s.by_cookie(*cookie)).filter(|s| s.shared.is_none()) else {
                continue;
            };
            if own && sub.options.no_local {
                continue;
            }
            qos = Some(qos.map_or(sub.options.qos, |q| q.max(sub.options.qos)));
            retain |= sub.options.retain_as_published && message_retain(&d.message);
            if let Some(id) = sub.identifier {
                ids.push(id.get());
            }
        }
        let Some(sub_qos) = qos else { return };
        let qos = message_qos(&d.message).min(sub_qos);
        self.send_message(&d.message, qos, retain, &ids, Source::Sink, false, now);
    }

    fn deliver_from_queue(&mut self, d: Delivery, now: Millis) {
        let queue = self.queue_of(&d);
        let Some(queue) = queue else { return };
        let own = d.message.origin.protocol == Protocol::Mqtt && d.message.origin.connection == self.connection;
        let mut qos: Option<QoS> = None;
        let mut retain = false;
        let mut ids: Vec<u32> = Vec::new();
        let key = d.message.routing_key.to_string_lossy();
        let from_session_queue = matches!(&self.mode, Mode::Persistent { queue: sq, .. } if Arc::ptr_eq(sq, &queue));
        let mut take = |sub: &Subscription| {
            if own && sub.options.no_local {
                return;
            }
            qos = Some(qos.map_or(sub.options.qos, |q| q.max(sub.options.qos)));
            retain |= sub.options.retain_as_published && message_retain(&d.message);
            if let Some(id) = sub.identifier {
                ids.push(id.get());
            }
        };
        if let Some(subs) = &self.subs {
            if from_session_queue {
                // Every subscription (not shared) whose filter matches: the queue does not say
                // which binding took the message.
                subs.matching(&key, &mut take);
            } else if let Some(sub) = subs.by_queue(&d.queue) {
                // A shared subscription's group queue (which AMQP clients may bind elsewhere).
                if sub.filter.pattern().matches(&key) {
                    take(sub);
                }
            }
        }
        let Some(sub_qos) = qos else {
            // No subscription wants it any more (unsubscribed meanwhile, or no-local).
            self.settle(Source::Queue { queue, seq: d.seq }, now);
            return;
        };
        let qos = message_qos(&d.message).min(sub_qos);
        let src = Source::Queue { queue, seq: d.seq };
        self.send_message(&d.message, qos, retain, &ids, src, d.redelivered, now);
    }

    fn queue_of(&self, d: &Delivery) -> Option<Arc<Queue>> {
        if let Mode::Persistent { queue, .. } = &self.mode {
            if *queue.name() == d.queue {
                return Some(queue.clone());
            }
        }
        self.subs.as_ref()?.by_queue(&d.queue)?.shared.as_deref().map(|(q, _)| q.clone())
    }

    /// Writes one PUBLISH for `m` at `qos`, tracking it in flight when QoS > 0.
    #[allow(clippy::too_many_arguments)]
    fn send_message(
        &mut self,
        m: &Arc<Message>,
        qos: QoS,
        retain: bool,
        sub_ids: &[u32],
        src: Source,
        redelivered: bool,
        now: Millis,
    ) {
        if remaining_expiry(m, now) == Some(0) {
            self.settle(src, now);
            return;
        }
        let v5 = self.is_v5();
        // Checked once, after the swap (which keeps UTF-8 UTF-8: it exchanges two ASCII bytes).
        let topic = match Str::from_utf8(swap_separators_in(m.routing_key.as_bytes(), &mut self.traffic().topics)) {
            Some(topic) => topic,
            // Not UTF-8 (an AMQP publisher's key): its lossy text, as `to_publish` gives.
            None => Str::from(swap_separators(&m.routing_key.to_string_lossy())),
        };
        let mut p = to_publish_on(m, topic, qos, retain, v5, now);
        // Read access is checked on delivery too (Mosquitto does): a reload may have taken away
        // what a subscription was granted.
        if !self.settings.acl.is_empty() && !self.settings.acl.can_read(self.user(), self.client_id(), p.topic.as_str())
        {
            self.settle(src, now);
            return;
        }
        // A topic alias this packet sets up; recorded only once the packet is really sent, or
        // a later packet would use an alias the client never learnt.
        let mut new_alias = None;
        if v5 {
            if !sub_ids.is_empty() {
                p.properties.subscription_identifiers = sub_ids.to_vec();
            }
            if self.client_alias_max > 0 {
                let max_aliases = self.client_alias_max as usize;
                let aliases = &self.extras().outbound_aliases;
                match aliases.get(&p.topic) {
                    Some(&alias) => {
                        p.properties.topic_alias = Some(alias);
                        p.topic = Str::default();
                    }
                    None if aliases.len() < max_aliases => {
                        let alias = aliases.len() as u16 + 1;
                        new_alias = Some((p.topic.clone(), alias));
                        p.properties.topic_alias = Some(alias);
                    }
                    None => {}
                }
            }
        }
        if qos > QoS::AtMostOnce {
            let original = match &src {
                Source::Queue { seq, .. } if redelivered => self.extras.as_mut().and_then(|e| e.resend_ids.remove(seq)),
                _ => None,
            };
            let id = match original {
                Some(id) if !self.is_inflight(id) => id,
                _ => self.next_id(),
            };
            p.packet_id = Some(id);
            p.dup = redelivered;
        }
        let payload = p.payload.len() as u64;
        let packet = Packet::Publish(p);
        if encoded_len(&packet, self.version) > self.client_max_packet as usize {
            // §3.1.2.11.4: never send a packet above the client's limit; discard as if sent.
            self.settle(src, now);
            return;
        }
        if let Some((topic, alias)) = new_alias {
            self.extras().outbound_aliases.insert(topic, alias);
        }
        self.stats.messages_out = self.stats.messages_out.saturating_add(1);
        self.stats.payload_out = self.stats.payload_out.saturating_add(u32::try_from(payload).unwrap_or(u32::MAX));
        match qos {
            QoS::AtMostOnce => self.settle(src, now),
            QoS::AtLeastOnce => {
                let id = packet_id(&packet);
                self.traffic().inflight.insert(id, Inflight::AwaitingPubAck(src));
            }
            QoS::ExactlyOnce => {
                let id = packet_id(&packet);
                self.traffic().inflight.insert(id, Inflight::AwaitingPubRec(src));
            }
        }
        if self.after_acks && !self.acks.is_empty() {
            // A retained message behind a SUBACK still waiting for its commit.
            self.acks.push(packet, Commit::done(Ok(())));
        } else {
            self.send(packet);
        }
    }

    // ----- the end ---------------------------------------------------------------------------

    /// Before [`Session::finish`]: unbinds up to `n` of a transient session's subscriptions
    /// (each binding a short hold of the exchange's lock); true while some are left, so that a
    /// driver can yield between slices. A persistent session's bindings stay with its queue.
    pub fn wind_down(&mut self, n: usize, now: Millis) -> bool {
        self.subscribing = None;
        if !matches!(self.mode, Mode::Transient { bound: true }) {
            return false;
        }
        let Some(subs) = self.subs.as_mut() else { return false };
        for sub in subs.take_some(n) {
            self.drop_subscription(sub, now);
        }
        self.subs.as_ref().is_some_and(|s| s.len() > 0)
    }

    /// Ends the session: consumers cancelled, unacked queue deliveries requeued, direct sink
    /// unbound; a persistent session's state is stored (with `will`, a will whose delay is still
    /// running) and returned for the registry, an ended one's stored state deleted.
    pub fn finish(self, now: Millis, will: Option<Will>) -> Option<StoredSession> {
        let mut this = self;
        // Subscriptions' shared consumers go back to their groups.
        let shared: Vec<(Arc<Queue>, ConsumerId)> =
            this.subs.iter_mut().flat_map(|s| s.values_mut()).filter_map(|s| s.shared.take().map(|s| *s)).collect();
        for (q, consumer) in shared {
            this.vhost.cancel(&q, consumer, now);
            let effects = q.release_owner(this.owner, now);
            this.vhost.settle(&q, effects, now);
        }
        let keep = this.session_expiry > 0;
        match &this.mode {
            Mode::Transient { bound } => {
                if *bound {
                    // By key: the exchange's topic trie alone keeps them.
                    let bound =
                        this.subs.iter().flat_map(|s| s.values()).filter(|s| s.filter.share_group().is_none()).map(
                            |s| (BindingKey::new(s.filter.binding_key()).with_pattern(s.filter.pattern()), s.cookie),
                        );
                    this.vhost.unbind_sink_all(&this.settings.exchange, &this.sink, bound);
                }
                None
            }
            Mode::Persistent { queue, consumer } => {
                let queue = queue.clone();
                this.vhost.cancel(&queue, *consumer, now);
                let stored = this.stored_state(will, now);
                let effects = queue.release_owner(this.owner, now);
                this.vhost.settle(&queue, effects, now);
                let (vhost, client_id) = (this.vhost.name().to_string(), this.client_id().to_string());
                if !keep {
                    this.vhost.store().submit(vec![StoreOp::DeleteSession { vhost, client_id }]);
                    let _ = this.vhost.delete_queue(queue.name(), this.connection, false, false, now);
                    return None;
                }
                this.vhost.store().submit(vec![StoreOp::PutSession {
                    vhost,
                    client_id,
                    state: encode_session(&stored),
                }]);
                Some(stored)
            }
        }
    }

    /// Whether this session keeps state after the connection (for logs).
    /// A 3.1 / 3.1.1 client that marked itself a bridge (`Connect::bridge`).
    pub fn is_bridge(&self) -> bool {
        self.bridge
    }

    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// Starts keeping `kick`'s view current (the subscriptions the session resumed with go in
    /// now); `clean_start` is the CONNECT's.
    /// The registry's kick of this session's connection ([`Session::attach_listing`]): how the
    /// registry tells the connection to go (takeover, shutdown, keep alive, a close from
    /// outside, through the connection entry's wake-up, which the kick shares). It also keeps
    /// the keep alive deadline, which the registry enforces (`Registry::sweep`), and the
    /// management API's view of the session.
    ///
    /// # Panics
    /// Before `attach_listing` (a driver attaches it before serving).
    /// A decoder of this session's packets: the version and the listener's maximum packet
    /// size (two fields: made where needed rather than kept in every connection's state).
    pub fn decoder(&self) -> crate::codec::Decoder {
        crate::codec::Decoder::with_version(self.settings.max_packet_size, self.version)
    }

    pub fn kick(&self) -> &Arc<crate::registry::Kick> {
        self.listing.as_ref().expect("the driver attaches the kick before serving")
    }

    pub fn attach_listing(&mut self, kick: Arc<crate::registry::Kick>, clean_start: bool) {
        let view = kick.view();
        view.set_session(clean_start, self.session_expiry);
        for sub in self.subs.iter().flat_map(|s| s.values()) {
            view.subscribed(sub.filter.shared_text(), sub.options, sub.identifier.map(std::num::NonZeroU32::get));
        }
        self.listing = Some(kick);
    }
}

/// A topic filter that breaks §4.7 (empty, `#` not last, a wildcard inside a level) or is deeper
/// than [`crate::topic::MAX_LEVELS`], in SUBSCRIBE or UNSUBSCRIBE: a malformed packet (5.0's
/// SUBACK 0x8F is for correctly formed filters), which closes the connection (5.0: DISCONNECT
/// 0x81), as Mosquitto does; 3.1.1 §4.8 closes on a protocol violation too.
fn malformed_filter(filter: &Str, e: TopicError) -> Close {
    MqttError::MalformedPacket.close(format!("topic filter {filter:?}: {e}"))
}

fn packet_id(p: &Packet) -> u16 {
    match p {
        Packet::Publish(p) => p.packet_id.unwrap_or(0),
        _ => 0,
    }
}

/// Publishes a will message (or any broker-made publish on a client's behalf).
pub fn publish_will(vhost: &VHost, exchange: &ShortString, will: &Will, connection: ConnectionId, now: Millis) {
    let p = Publish {
        dup: false,
        qos: will.qos,
        retain: will.retain,
        topic: will.topic.clone(),
        packet_id: None,
        properties: will.properties.clone(),
        payload: will.payload.clone(),
    };
    let origin = Origin { protocol: Protocol::Mqtt, connection };
    let message = to_message(&p, will.topic.as_str(), exchange, origin, now);
    if will.retain {
        vhost.set_retained(&message.routing_key.clone(), Arc::new(message.clone()));
    }
    if let Err(e) = vhost.publish(exchange, message, now) {
        tracing::warn!(error = %e, "will message refused by the core");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Decoder, Properties};
    use bytes::Bytes;
    use ferry_core::store::MemoryStore;

    const V5: ProtocolVersion = ProtocolVersion::V5;
    const V311: ProtocolVersion = ProtocolVersion::V311;

    fn vhost() -> Arc<VHost> {
        Arc::new(VHost::new("/", Arc::new(MemoryStore::new())))
    }

    fn settings(per_client: u32, per_packet: u32) -> Settings {
        Settings {
            max_subscriptions_per_client: per_client,
            max_subscriptions_per_packet: per_packet,
            ..Settings::default()
        }
    }

    /// A clean session (`expiry` 0) or a persistent one, its CONNACK taken.
    fn start(vhost: &Arc<VHost>, version: ProtocolVersion, id: u64, expiry: u32, settings: Settings) -> Session {
        let mut properties = Properties::default();
        if version == V5 && expiry > 0 {
            properties.session_expiry_interval = Some(expiry);
        }
        let connect = Connect {
            bridge: false,
            version,
            clean_start: expiry == 0,
            keep_alive: 0,
            client_id: Str::from(format!("c{id}").as_str()),
            will: None,
            username: None,
            password: None,
            properties,
        };
        let client_id = format!("c{id}");
        let mut s = Session::start(
            connect,
            client_id,
            false,
            ConnectionId(id),
            vhost.clone(),
            Arc::new(settings),
            None,
            None,
            0,
        )
        .unwrap();
        assert!(matches!(packets(&mut s)[..], [Packet::ConnAck(_)]));
        s
    }

    /// A 5.0 session with a will delayed `will_delay` seconds and a session expiry of `expiry`.
    fn with_will(vhost: &Arc<VHost>, id: u64, will_delay: u32, expiry: u32) -> Session {
        let properties = crate::codec::PropertyValues {
            session_expiry_interval: (expiry > 0).then_some(expiry),
            ..Default::default()
        }
        .into();
        let will_properties = crate::codec::PropertyValues {
            will_delay_interval: (will_delay > 0).then_some(will_delay),
            ..Default::default()
        }
        .into();
        let connect = Connect {
            bridge: false,
            version: V5,
            clean_start: true,
            keep_alive: 0,
            client_id: Str::from(format!("w{id}").as_str()),
            will: Some(Will {
                topic: Str::from("status"),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: will_properties,
            }),
            username: None,
            password: None,
            properties,
        };
        let mut s = Session::start(
            connect,
            format!("w{id}"),
            false,
            ConnectionId(id),
            vhost.clone(),
            Arc::default(),
            None,
            None,
            0,
        )
        .unwrap();
        packets(&mut s);
        s
    }

    fn disconnect_with_expiry(expiry: Option<u32>) -> Packet {
        let properties = crate::codec::PropertyValues { session_expiry_interval: expiry, ..Default::default() }.into();
        Packet::Disconnect(crate::codec::Disconnect { reason: 0, properties })
    }

    /// The session expiry a stored session is kept for, decided with no clock: the one the
    /// DISCONNECT gives replaces the CONNECT's, and a resumed session takes its new
    /// connection's (5.0 §3.1.2.11.2, §3.14.2.2.2). `mqtt_session.rs` checks the expiry itself
    /// end to end.
    #[test]
    fn the_session_expiry_is_the_latest_one_given() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 1, settings(0, 0));
        assert!(matches!(
            s.handle(disconnect_with_expiry(Some(60)), 0),
            Err(Close::ClientDisconnect { with_will: false })
        ));
        let stored = s.finish(0, None).expect("kept");
        assert_eq!(stored.expiry, 60, "DISCONNECT's expiry replaces CONNECT's");

        // Resumed by a connection asking for 5 s: the stored 60 s no longer applies.
        let connect = Connect {
            bridge: false,
            version: V5,
            clean_start: false,
            keep_alive: 0,
            client_id: Str::from("c1"),
            will: None,
            username: None,
            password: None,
            properties: crate::codec::PropertyValues { session_expiry_interval: Some(5), ..Default::default() }.into(),
        };
        let mut again = Session::start(
            connect,
            "c1".into(),
            false,
            ConnectionId(2),
            vhost.clone(),
            Arc::new(settings(0, 0)),
            None,
            Some(stored),
            0,
        )
        .unwrap();
        packets(&mut again);
        assert_eq!(again.finish(0, None).expect("kept").expiry, 5);

        // Set to 0 on DISCONNECT: the session ends with the connection.
        let mut ending = start(&vhost, V5, 3, 60, settings(0, 0));
        let _ = ending.handle(disconnect_with_expiry(Some(0)), 0);
        assert!(ending.finish(0, None).is_none());
        // A session that had 0 at CONNECT may not get one at DISCONNECT.
        let mut clean = start(&vhost, V5, 4, 0, settings(0, 0));
        assert!(matches!(
            clean.handle(disconnect_with_expiry(Some(60)), 0),
            Err(Close::Violation { reason: reason::PROTOCOL_ERROR, .. })
        ));
    }

    #[test]
    fn the_will_goes_for_every_close_but_a_normal_disconnect() {
        let vhost = vhost();
        let closes = [
            (Close::ClientDisconnect { with_will: false }, false),
            (Close::ClientDisconnect { with_will: true }, true),
            (Close::Lost, true),
            (Close::Violation { reason: reason::PROTOCOL_ERROR, detail: "x".into() }, true),
            (Close::Shutdown, true),
            (Close::Administrative { reason: "ops".into() }, true),
        ];
        for (n, (close, due)) in closes.into_iter().enumerate() {
            let mut s = with_will(&vhost, n as u64, 0, 0);
            let w = s.will_on_close(&close, false);
            assert_eq!((w.will.is_some(), w.delay), (due, 0), "{close:?}");
            // Taken once: the session holds it no more.
            assert!(s.will_on_close(&close, false).will.is_none());
        }
    }

    #[test]
    fn a_takeover_publishes_the_will_only_when_the_session_ends() {
        let vhost = vhost();
        // Expiry 0: the session ends with this connection, whatever the new one asks.
        assert!(with_will(&vhost, 1, 0, 0).will_on_close(&Close::TakenOver, true).will.is_some());
        // A session that outlives the connection and is resumed goes on: no will.
        assert!(with_will(&vhost, 2, 0, 60).will_on_close(&Close::TakenOver, true).will.is_none());
        // The new connection starts clean: this session ends, its will is due.
        assert!(with_will(&vhost, 3, 0, 60).will_on_close(&Close::TakenOver, false).will.is_some());
    }

    #[test]
    fn the_will_waits_for_its_delay_or_the_sessions_end_whichever_comes_first() {
        let vhost = vhost();
        for (will_delay, expiry, delay) in [(30, 10, 10), (5, 60, 5), (5, 0, 0), (0, 60, 0)] {
            let w = with_will(&vhost, 1, will_delay, expiry).will_on_close(&Close::Lost, false);
            assert_eq!(w.delay, delay, "will delay {will_delay}, expiry {expiry}");
            assert_eq!(w.will.unwrap().payload, Bytes::from_static(b"gone"));
        }
    }

    /// What the session wrote since the last call.
    fn packets(s: &mut Session) -> Vec<Packet> {
        let mut d = Decoder::with_version(u32::MAX, s.version);
        let mut out = Vec::new();
        let mut written = BytesMut::from(&s.out[..]);
        s.out.clear();
        while let Some(p) = d.decode(&mut written).unwrap() {
            out.push(p);
        }
        assert!(written.is_empty(), "a partial packet written");
        out
    }

    fn subscribe_packet(id: u16, filters: &[String], identifier: Option<u32>) -> Packet {
        let mut properties = Properties::default();
        properties.subscription_identifiers.extend(identifier);
        let options = SubOptions { qos: QoS::AtLeastOnce, ..SubOptions::default() };
        Packet::Subscribe(Subscribe {
            packet_id: id,
            properties,
            filters: filters.iter().map(|f| (Str::from(f.as_str()), options)).collect(),
        })
    }

    /// Subscribes as a driver does (resuming until done) and returns the SUBACK's codes.
    fn subscribe(s: &mut Session, filters: &[String]) -> Vec<u8> {
        s.handle(subscribe_packet(1, filters, None), 0).unwrap();
        while s.is_subscribing() {
            s.resume(0).unwrap();
        }
        match &packets(s)[..] {
            [Packet::SubAck(a)] => a.reasons.clone(),
            other => panic!("expected a SUBACK, got {other:?}"),
        }
    }

    fn filters(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}/{i}")).collect()
    }

    fn bindings(vhost: &VHost) -> usize {
        vhost.exchange("amq.topic").unwrap().binding_count()
    }

    fn publish(vhost: &VHost, topic: &str) {
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: Str::from(topic),
            packet_id: Some(1),
            properties: Properties::default(),
            payload: bytes::Bytes::from_static(b"m"),
        };
        let origin = Origin { protocol: Protocol::Mqtt, connection: ConnectionId(999) };
        let exchange = ShortString::from_static("amq.topic");
        vhost.publish(&exchange, to_message(&p, topic, &exchange, origin, 0), 0).unwrap();
    }

    #[test]
    fn a_parked_session_stays_small() {
        let size = std::mem::size_of::<ParkedSession>();
        assert!(size <= 96, "ParkedSession is {size} bytes");
    }

    fn entry(id: u64, client_id: &str, user: &str) -> Arc<ConnectionEntry> {
        crate::registry::logged_in_entry(id, "/", client_id, user)
    }

    /// A routing key is made a topic once per delivery, checked once: UTF-8 keys go out as they
    /// are with the separators swapped, a key that is not UTF-8 (an AMQP publisher's) as its
    /// lossy text.
    #[test]
    fn a_routing_key_becomes_a_topic_checked_once() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        s.handle(subscribe_packet(1, &["#".to_string()], None), 0).unwrap();
        packets(&mut s);
        let exchange = ShortString::from_static("amq.topic");
        for key in [&b"a.b/c"[..], &b"x.\xff"[..]] {
            let m = Message::new(
                exchange.clone(),
                ShortString::from_bytes(bytes::Bytes::copy_from_slice(key)),
                bytes::Bytes::new(),
            );
            vhost.publish(&exchange, m, 0).unwrap();
        }
        s.pump(0);
        let topics: Vec<String> = packets(&mut s)
            .iter()
            .map(|p| match p {
                Packet::Publish(p) => p.topic.as_str().to_string(),
                other => panic!("expected PUBLISH, got {other:?}"),
            })
            .collect();
        assert_eq!(topics, ["a/b.c", "x/\u{fffd}"]);
    }

    /// A session parked and resumed goes on where it was: a SUBSCRIBE it was working through
    /// (kept in the parked session's rest), its subscriptions, its queue side, the driver's
    /// flow control; its client id and user come back from the entry's login.
    #[test]
    fn a_session_parked_and_resumed_goes_on_where_it_was() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        let n = 2 * SUBSCRIBE_SLICE + 1;
        s.handle(subscribe_packet(9, &filters("a", n), None), 0).unwrap();
        assert!(s.is_subscribing());
        let parked = s.park(None);
        assert!(parked.rest.is_some(), "a SUBSCRIBE in progress is kept");
        let (mut s, flow) = parked.resume(&entry(1, "c1", "anonymous"));
        assert_eq!((s.client_id(), s.user(), s.connection), ("c1", None, ConnectionId(1)));
        assert!(flow.is_none());
        s.handle(Packet::PingReq, 0).unwrap();
        match &packets(&mut s)[..] {
            [Packet::SubAck(a), Packet::PingResp] => assert_eq!((a.packet_id, a.reasons.len()), (9, n)),
            other => panic!("expected SUBACK then PINGRESP, got {other:?}"),
        }
        s.shed();
        let parked = s.park(None);
        assert!(parked.rest.is_none() && parked.queues.is_none(), "an idle device keeps neither box");
        let (mut s, _) = parked.resume(&entry(1, "c1", "anonymous"));
        assert!(s.is_subscribed());
        assert_eq!(bindings(&vhost), n);
        publish(&vhost, "a/3");
        s.pump(0);
        assert!(matches!(&packets(&mut s)[..], [Packet::Publish(p)] if p.topic.as_str() == "a/3"));

        // A persistent session keeps its queue and its queue deliveries' outbox.
        let s = start(&vhost, V5, 2, 60, settings(0, 0));
        assert!(s.queue_outbox().is_some());
        let parked = s.park(None);
        assert!(parked.queue_outbox().is_some());
        let (s, _) = parked.resume(&entry(2, "c2", "anonymous"));
        assert!(matches!(s.mode, Mode::Persistent { .. }) && s.queue_outbox().is_some());

        // The flow control the driver hands over is kept with the rare parts, and given back.
        let s = start(&vhost, V311, 3, 0, settings(0, 0));
        let flow = PublisherFlow::new(0, true, std::time::Instant::now());
        let parked = s.park(Some(Box::new(flow)));
        assert!(parked.rest.is_some());
        let (_, flow) = parked.resume(&entry(3, "c3", "anonymous"));
        assert!(flow.is_some());
    }

    #[test]
    fn past_max_subscriptions_per_client_a_new_filter_gets_quota_exceeded() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(3, 0));
        assert_eq!(subscribe(&mut s, &filters("a", 5)), vec![1, 1, 1, 0x97, 0x97]);
        assert_eq!(bindings(&vhost), 3, "nothing bound for the refused ones");

        let mut old = start(&vhost, V311, 2, 0, settings(3, 0));
        assert_eq!(subscribe(&mut old, &filters("a", 4)), vec![1, 1, 1, 0x80], "3.1.1 Failure");
    }

    #[test]
    fn a_resubscription_does_not_count_and_an_unsubscribe_frees_room() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(2, 0));
        assert_eq!(subscribe(&mut s, &filters("a", 2)), vec![1, 1]);
        // The same two again (replaced), and a third (refused).
        let mut again = filters("a", 2);
        again.push("b".into());
        assert_eq!(subscribe(&mut s, &again), vec![1, 1, 0x97]);
        s.handle(
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 2,
                properties: Default::default(),
                filters: vec![Str::from("a/0")],
            }),
            0,
        )
        .unwrap();
        assert!(matches!(packets(&mut s)[..], [Packet::UnsubAck(_)]));
        assert_eq!(subscribe(&mut s, &["b".to_string()]), vec![1]);
        assert_eq!(bindings(&vhost), 2);
    }

    #[test]
    fn filters_past_max_subscriptions_per_packet_are_refused_without_work() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 2));
        // Invalid filters past the limit are not even parsed: Quota exceeded, not 0x8F.
        let mut f = filters("a", 2);
        f.extend(["bad/#/x".to_string(), "c".to_string()]);
        assert_eq!(subscribe(&mut s, &f), vec![1, 1, 0x97, 0x97]);
        assert_eq!(bindings(&vhost), 2);

        let mut old = start(&vhost, V311, 2, 0, settings(0, 2));
        assert_eq!(subscribe(&mut old, &filters("b", 3)), vec![1, 1, 0x80]);
    }

    #[test]
    fn zero_means_no_limit() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        let n = 3 * SUBSCRIBE_SLICE + 7;
        assert_eq!(subscribe(&mut s, &filters("a", n)), vec![1; n]);
        assert_eq!(bindings(&vhost), n);
    }

    #[test]
    fn a_large_subscribe_is_worked_through_in_slices_and_in_order() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        let n = 2 * SUBSCRIBE_SLICE + 1;
        s.handle(subscribe_packet(9, &filters("a", n), None), 0).unwrap();
        assert!(s.is_subscribing());
        assert!(packets(&mut s).is_empty(), "no SUBACK before the last slice");
        assert_eq!(bindings(&vhost), SUBSCRIBE_SLICE);
        // A packet that comes meanwhile is handled after the SUBSCRIBE is done.
        s.handle(Packet::PingReq, 0).unwrap();
        assert!(!s.is_subscribing());
        match &packets(&mut s)[..] {
            [Packet::SubAck(a), Packet::PingResp] => assert_eq!((a.packet_id, a.reasons.len()), (9, n)),
            other => panic!("expected SUBACK then PINGRESP, got {other:?}"),
        }
    }

    #[test]
    fn wind_down_unbinds_a_transient_session_in_slices() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        let n = SUBSCRIBE_SLICE + 10;
        subscribe(&mut s, &filters("a", n));
        assert!(s.wind_down(SUBSCRIBE_SLICE, 0));
        assert_eq!(bindings(&vhost), 10);
        assert!(!s.wind_down(SUBSCRIBE_SLICE, 0));
        assert_eq!(bindings(&vhost), 0);
        assert!(s.finish(0, None).is_none());
    }

    #[test]
    fn deliveries_find_their_subscriptions_among_many() {
        for expiry in [0, 3600] {
            let vhost = vhost();
            let mut s = start(&vhost, V5, 1, expiry, settings(0, 0));
            subscribe(&mut s, &filters("a", 1000));
            s.handle(subscribe_packet(2, &["a/+".to_string()], Some(7)), 0).unwrap();
            assert!(matches!(packets(&mut s)[..], [Packet::SubAck(_)]));
            publish(&vhost, "a/500");
            publish(&vhost, "a/x");
            s.pump(0);
            let got: Vec<(String, Vec<u32>)> = packets(&mut s)
                .into_iter()
                .map(|p| match p {
                    Packet::Publish(p) => (p.topic.as_str().to_string(), p.properties.subscription_identifiers.clone()),
                    other => panic!("expected PUBLISH, got {other:?}"),
                })
                .collect();
            // `a/500` matches `a/500` (no identifier) and `a/+` (7): one PUBLISH with both.
            assert_eq!(got, vec![("a/500".into(), vec![7]), ("a/x".into(), vec![7])], "session expiry {expiry}");
        }
    }
    // ----- issue 14: conformance -----------------------------------------------------------

    fn publish_packet(topic: &str, qos: QoS, id: u16, retain: bool) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            topic: Str::from(topic),
            packet_id: (qos > QoS::AtMostOnce).then_some(id),
            properties: Properties::default(),
            payload: bytes::Bytes::from_static(b"m"),
        })
    }

    #[test]
    fn suback_comes_before_the_retained_messages() {
        let vhost = vhost();
        let mut p = start(&vhost, V311, 2, 0, settings(0, 0));
        p.handle(publish_packet("r/1", QoS::AtMostOnce, 0, true), 0).unwrap();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        s.handle(subscribe_packet(7, &["r/#".to_string()], None), 0).unwrap();
        match &packets(&mut s)[..] {
            [Packet::SubAck(a), Packet::Publish(m)] => {
                assert_eq!(a.packet_id, 7);
                assert!(m.retain);
                assert_eq!(m.topic.as_str(), "r/1");
            }
            other => panic!("expected SUBACK then the retained PUBLISH, got {other:?}"),
        }
    }

    #[test]
    fn suback_waiting_for_its_commit_still_comes_before_the_retained_messages() {
        let vhost = vhost();
        let mut p = start(&vhost, V311, 2, 0, settings(0, 0));
        p.handle(publish_packet("r/1", QoS::AtMostOnce, 0, true), 0).unwrap();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        // An ack already waiting for a commit puts the SUBACK behind it.
        s.acks.push(Packet::PingResp, Commit::done(Ok(())));
        s.handle(subscribe_packet(7, &["r/#".to_string()], None), 0).unwrap();
        assert!(packets(&mut s).is_empty());
        let order: Vec<&str> = s
            .acks
            .iter()
            .map(|a| match a {
                Packet::PingResp => "ping",
                Packet::SubAck(_) => "suback",
                Packet::Publish(_) => "publish",
                _ => "other",
            })
            .collect();
        assert_eq!(order, ["ping", "suback", "publish"]);
    }

    #[test]
    fn publishing_into_sys_is_refused() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        s.handle(publish_packet("$SYS/broker/uptime", QoS::AtLeastOnce, 3, false), 0).unwrap();
        match &packets(&mut s)[..] {
            [Packet::PubAck(a)] => assert_eq!(a.reason, reason::NOT_AUTHORIZED),
            other => panic!("{other:?}"),
        }
        let mut old = start(&vhost, V311, 2, 0, settings(0, 0));
        old.handle(publish_packet("$SYS/broker/uptime", QoS::ExactlyOnce, 3, true), 0).unwrap();
        // 3.1.1 has no refusal: acknowledged, and nothing retained.
        assert!(matches!(packets(&mut old)[..], [Packet::PubRec(_)]));
        assert!(vhost.retained().lookup(&Filter::parse("$SYS/#").unwrap().pattern()).is_empty());
    }

    #[test]
    fn publishing_to_a_share_topic_is_refused_and_the_connection_stays() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        s.handle(publish_packet("$share/g/t", QoS::AtLeastOnce, 3, false), 0).unwrap();
        match &packets(&mut s)[..] {
            [Packet::PubAck(a)] => assert_eq!(a.reason, reason::NOT_AUTHORIZED),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_mosquitto_bridge_may_report_its_state_under_sys() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        s.handle(publish_packet("$SYS/broker/connection/edge-1/state", QoS::AtLeastOnce, 3, true), 0).unwrap();
        match &packets(&mut s)[..] {
            [Packet::PubAck(a)] => assert_eq!(a.reason, reason::NO_MATCHING_SUBSCRIBERS),
            other => panic!("{other:?}"),
        }
        let kept = vhost.retained().lookup(&Filter::parse("$SYS/broker/connection/+/state").unwrap().pattern());
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn an_ack_of_the_wrong_type_closes_without_disconnect() {
        let vhost = vhost();
        for (sub_qos, wrong) in [
            (QoS::AtLeastOnce, Packet::PubRec(PubResp::ok(1))),
            (QoS::AtLeastOnce, Packet::PubComp(PubResp::ok(1))),
            (QoS::ExactlyOnce, Packet::PubAck(PubResp::ok(1))),
            (QoS::ExactlyOnce, Packet::PubComp(PubResp::ok(1))),
        ] {
            let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
            let options = SubOptions { qos: sub_qos, ..SubOptions::default() };
            let sub =
                Subscribe { packet_id: 1, properties: Properties::default(), filters: vec![("w".into(), options)] };
            s.handle(Packet::Subscribe(sub), 0).unwrap();
            s.handle(publish_packet("w", QoS::ExactlyOnce, 9, false), 0).unwrap();
            s.pump(0);
            let sent = packets(&mut s);
            assert!(sent.iter().any(|p| matches!(p, Packet::Publish(m) if m.packet_id == Some(1))), "{sent:?}");
            let close = s.handle(wrong.clone(), 0).unwrap_err();
            assert!(matches!(close, Close::Violation { reason: reason::PROTOCOL_ERROR, .. }), "{wrong:?}");
            s.send_disconnect(reason::PROTOCOL_ERROR, "x");
            assert!(packets(&mut s).is_empty(), "no DISCONNECT after {wrong:?}");
        }
    }

    /// A parking connection sheds its traffic state only when nothing is in flight, and packet
    /// ids go on after it (a reused id would be a new message to the client only once acked).
    #[test]
    fn a_parking_session_sheds_its_traffic_state_only_when_nothing_is_in_flight() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        assert_eq!(subscribe(&mut s, &["cmd".to_string()]), vec![1]);
        publish(&vhost, "cmd");
        s.pump(0);
        let first = match &packets(&mut s)[..] {
            [Packet::Publish(p)] => p.packet_id.expect("QoS 1"),
            other => panic!("{other:?}"),
        };
        s.shed();
        assert!(s.traffic.is_some(), "awaiting its PUBACK: kept");
        s.handle(Packet::PubAck(PubResp::ok(first)), 0).unwrap();
        s.shed();
        assert!(s.traffic.is_none() && s.out.capacity() == 0, "nothing in flight: shed");
        publish(&vhost, "cmd");
        s.pump(0);
        match &packets(&mut s)[..] {
            [Packet::Publish(p)] => assert_eq!(p.packet_id, Some(first + 1)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_second_connect_closes_without_disconnect() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        let connect = Connect {
            bridge: false,
            version: V5,
            clean_start: true,
            keep_alive: 0,
            client_id: "c1".into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        };
        let close = s.handle(Packet::Connect(Box::new(connect)), 0).unwrap_err();
        assert!(matches!(close, Close::Violation { reason: reason::PROTOCOL_ERROR, .. }));
        s.send_disconnect(reason::PROTOCOL_ERROR, "second CONNECT");
        assert!(packets(&mut s).is_empty());
    }

    #[test]
    fn malformed_filters_close_with_0x81() {
        let vhost = vhost();
        for filter in ["", "#/x", "a+/b", &"/".repeat(201)] {
            let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
            let close = s.handle(subscribe_packet(1, &[filter.to_string()], None), 0).unwrap_err();
            assert!(matches!(close, Close::Violation { reason: reason::MALFORMED_PACKET, .. }), "{filter:?}");
            let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
            let u = Unsubscribe { packet_id: 1, properties: Properties::default(), filters: vec![filter.into()] };
            let close = s.handle(Packet::Unsubscribe(u), 0).unwrap_err();
            assert!(matches!(close, Close::Violation { reason: reason::MALFORMED_PACKET, .. }), "{filter:?}");
        }
        // A correctly formed filter Ferry does not take is still answered in the SUBACK.
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        assert_eq!(subscribe(&mut s, &["$share/g".to_string()]), vec![reason::TOPIC_FILTER_INVALID]);
        // 200 separators are fine (Mosquitto's depth).
        assert_eq!(subscribe(&mut s, &["/".repeat(200)]), vec![1]);
    }

    #[test]
    fn a_topic_deeper_than_the_limit_is_a_protocol_error() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        let close = s.handle(publish_packet(&"/".repeat(201), QoS::AtMostOnce, 0, false), 0).unwrap_err();
        assert!(matches!(close, Close::Violation { reason: reason::PROTOCOL_ERROR, .. }));
    }

    #[test]
    fn pubrec_without_subscribers_is_success_and_puback_says_no_subscribers() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        s.handle(publish_packet("nobody", QoS::ExactlyOnce, 1, false), 0).unwrap();
        s.handle(publish_packet("nobody", QoS::AtLeastOnce, 2, false), 0).unwrap();
        match &packets(&mut s)[..] {
            [Packet::PubRec(r), Packet::PubAck(a)] => {
                assert_eq!(r.reason, reason::SUCCESS);
                assert_eq!(a.reason, reason::NO_MATCHING_SUBSCRIBERS);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pubrel_for_an_unknown_id_is_answered_pubcomp_success() {
        let vhost = vhost();
        let mut s = start(&vhost, V5, 1, 0, settings(0, 0));
        s.handle(Packet::PubRel(PubResp::ok(42)), 0).unwrap();
        match &packets(&mut s)[..] {
            [Packet::PubComp(c)] => assert_eq!((c.packet_id, c.reason), (42, reason::SUCCESS)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_connack_above_the_clients_maximum_packet_size_is_withheld() {
        let vhost = vhost();
        let properties = crate::codec::PropertyValues { maximum_packet_size: Some(2), ..Default::default() }.into();
        let connect = Connect {
            bridge: false,
            version: V5,
            clean_start: true,
            keep_alive: 0,
            client_id: "tiny".into(),
            will: None,
            username: None,
            password: None,
            properties,
        };
        let mut s =
            Session::start(connect, "tiny".into(), false, ConnectionId(1), vhost, Arc::default(), None, None, 0)
                .unwrap();
        assert!(s.connack_withheld);
        assert!(s.out.is_empty());
        s.send_disconnect(reason::PACKET_TOO_LARGE, "x");
        assert!(s.out.is_empty());
    }

    /// The client id and the user's name share one allocation; an empty name is a name. A
    /// parked session gets both back from the entry's login (which keeps an empty client id as
    /// none, and a user for an anonymous client too).
    #[test]
    fn the_client_id_and_the_user_read_back_as_given() {
        let vhost = vhost();
        let connect = |id: &str| Connect {
            bridge: false,
            version: V5,
            clean_start: true,
            keep_alive: 0,
            client_id: id.into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        };
        let start = |id: &str, user: Option<&str>| {
            let user = user.map(str::to_string);
            let v = vhost.clone();
            Session::start(connect(id), id.into(), false, ConnectionId(1), v, Arc::default(), user, None, 0).unwrap()
        };
        for (id, user) in
            [("dev-7", Some("alice")), ("dev-7", Some("")), ("dev-7", None), ("", Some("bob")), ("é", None)]
        {
            let s = start(id, user);
            assert_eq!((s.client_id(), s.user()), (id, user));
            let (s, _) = s.park(None).resume(&entry(1, id, user.unwrap_or("anonymous")));
            assert_eq!((s.client_id(), s.user()), (id, user), "after a park");
            s.finish(0, None);
        }
        let long = "x".repeat(65_536);
        let refused = Session::start(connect("x"), long, false, ConnectionId(1), vhost, Arc::default(), None, None, 0);
        assert!(refused.is_err(), "longer than an MQTT string");
    }

    #[test]
    fn mqtt31_connack_has_no_session_present_flag() {
        let vhost = vhost();
        let connect = |clean| Connect {
            bridge: false,
            version: ProtocolVersion::V31,
            clean_start: clean,
            keep_alive: 0,
            client_id: "old".into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        };
        let s = Session::start(
            connect(false),
            "old".into(),
            false,
            ConnectionId(1),
            vhost.clone(),
            Arc::default(),
            None,
            None,
            0,
        )
        .unwrap();
        let stored = s.finish(0, None);
        let mut s = Session::start(
            connect(false),
            "old".into(),
            false,
            ConnectionId(2),
            vhost,
            Arc::default(),
            None,
            stored,
            0,
        )
        .unwrap();
        // The raw CONNACK: flags byte 0 although the session was resumed.
        assert_eq!(&s.out[..], &[0x20, 2, 0, 0]);
        s.out.clear();
    }

    #[test]
    fn mqtt31_subscribe_with_a_refused_filter_closes() {
        let vhost = vhost();
        let mut s = start(&vhost, ProtocolVersion::V31, 1, 0, settings(1, 0));
        assert_eq!(subscribe(&mut s, &["a".to_string()]), vec![1]);
        // Over max_subscriptions_per_client: 3.1 has no failure code.
        let close = s.handle(subscribe_packet(2, &["b".to_string()], None), 0).unwrap_err();
        assert!(matches!(close, Close::Violation { .. }));
        assert!(packets(&mut s).is_empty());
    }
}

//! One bridge's task: connect to the remote, serve the link, back off, connect again.
//!
//! The local side is a consumer on the bridge's durable queue, registered once for the task's
//! whole life: deliveries wait in its outbox (bounded by the prefetch window) while the link is
//! down, and what was sent but not acknowledged stays in flight across reconnects, resent with
//! its packet id (DUP) as MQTT §4.4 asks. A local message is acked only when the remote has
//! acknowledged it (PUBACK, PUBCOMP; QoS 0: when handed to the socket writer); when the task
//! ends, the consumer is cancelled and its unacked messages go back to the queue in order.
//!
//! Incoming PUBLISHes are published into the local vhost and answered (PUBACK, PUBREC) only
//! when the store has committed them, in arrival order (`ferry_core::flow::AckQueue`).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_core::connections::{ConnectionInfo, Connections, Login};
use ferry_core::flow::{AckQueue, MAX_PENDING_ACKS};
use ferry_core::frontend::Shutdown;
use ferry_core::message::{now_millis, ConnectionId, FieldTable, FieldValue, Message, Origin, Protocol, ShortString};
use ferry_core::queue::{ConsumerId, ConsumerSink, ConsumerSpec, Delivery, OwnerId, Queue};
use ferry_core::sink::Outbox;
use ferry_core::store::Commit;
use ferry_core::vhost::VHost;
use ferry_mqtt::codec::{
    self, ConnAck, Connect, Decoder, Disconnect, Packet, Properties, ProtocolVersion, PubResp, Publish, QoS, Str,
    SubOptions, Subscribe, Will,
};
use ferry_mqtt::mapping;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config::{BridgeConfig, StartType};
use crate::rules;
use crate::status::{Counters, LinkState, StateCell};

/// The hop count: how many bridges a message has crossed. An MQTT 5.0 user property on the
/// remote side, a header of the same name on the local message.
pub const HOPS: &str = "x-ferry-hops";

/// Largest packet the bridge accepts from the remote (the protocol's own limit).
const MAX_PACKET: u32 = codec::VARINT_MAX;

/// Why a connection ended (each is logged once, and becomes the status's last error).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no CONNACK within {0:?}")]
    ConnectTimeout(Duration),
    #[error("the remote refused the connection: {0}")]
    Refused(String),
    #[error("{0}")]
    Password(#[from] crate::config::PasswordError),
    #[error("{0}")]
    TlsConfig(#[from] crate::tls::TlsError),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("connection lost: {0}")]
    Io(std::io::Error),
    #[error("the remote closed the connection")]
    Closed,
    #[error("closed from the connection registry: {0}")]
    ClosedLocally(String),
    #[error("the remote sent DISCONNECT (reason 0x{0:02x})")]
    Disconnected(u8),
    #[error("malformed packet from the remote: {0}")]
    Decode(codec::DecodeError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("nothing heard from the remote for {0:?} (keep alive)")]
    KeepAlive(Duration),
    #[error("local broker refused a bridged message: {0}")]
    Local(String),
    #[error("local store failed: {0}")]
    Store(String),
    #[error("the main address {0} answers again; leaving this one for it")]
    MainBack(String),
    #[error("idle for {0:?} (start_type lazy)")]
    Idle(Duration),
}

/// Both ends of the TCP connection.
#[derive(Debug, Clone, Copy)]
struct Addrs {
    peer: std::net::SocketAddr,
    local: std::net::SocketAddr,
    /// Bytes of the CONNECT and of what was read up to the CONNACK.
    sent: u64,
    received: u64,
}

/// TCP or TLS, one type to the rest of the link.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The bridge as the status API and the task see it.
#[derive(Debug)]
pub(crate) struct Link {
    /// Owns what its consumer takes from the queue ([`Link::release`]).
    pub owner: OwnerId,
    pub config: BridgeConfig,
    /// The link's connection id in the core: the origin of what it publishes locally, so that
    /// an `out` rule does not send a message straight back where it came from.
    pub id: ConnectionId,
    /// The broker's connection registry, where the link is listed while connected.
    pub connections: Arc<Connections>,
    /// The local queue for `out` rules (none without them).
    pub queue: Option<Arc<Queue>>,
    pub state: StateCell,
    pub counters: Counters,
    /// Bumped when counters move, for [`Bridges::wait_for`](crate::Bridges::wait_for).
    pub changes: tokio::sync::watch::Sender<u64>,
    /// The remote refused the bridge mark on a 3.1.1 CONNECT (`try_private`): later connects
    /// go without it.
    pub private_refused: std::sync::atomic::AtomicBool,
    /// The QoS 2 ids received and not yet released when Ferry last stopped (`qos2_ids`), taken
    /// by the link's task when it starts; given back when it stops.
    pub recovered_qos2: std::sync::Mutex<HashSet<u16>>,
    /// Which of the remote's addresses the link uses ([`BridgeConfig::address_at`]).
    pub current: std::sync::atomic::AtomicUsize,
    /// A 5.0 remote refused the retained will of the state notification (CONNACK 0x9A, retain
    /// not supported): later connects go without it.
    pub will_refused: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // named for the packets awaited
enum Stage {
    /// QoS 1 sent, PUBACK awaited.
    PubAck,
    /// QoS 2 sent, PUBREC awaited.
    PubRec,
    /// PUBREL sent, PUBCOMP awaited.
    PubComp,
}

#[derive(Debug)]
struct OutFlight {
    pid: u16,
    seq: u64,
    publish: Publish,
    stage: Stage,
}

/// What outlives one connection to the remote.
#[derive(Debug, Default)]
struct Carry {
    /// Deliveries taken from the outbox, not sent yet (the remote's receive maximum was reached).
    pending: VecDeque<Delivery>,
    /// Sent and not acknowledged, in send order.
    inflight: VecDeque<OutFlight>,
    /// QoS 2 PUBLISHes from the remote already published locally and PUBREC'd, awaiting PUBREL:
    /// a resend of one (DUP) is answered without publishing it again.
    incoming_qos2: HashSet<u16>,
    /// The oldest message in flight when the remote closed the link: it may be what the remote
    /// closes on (a packet larger than it accepts, which a 3.1.1 remote cannot announce).
    probe: Option<Probe>,
    /// Local messages done with (acknowledged by the remote, or not to be sent), acked in the
    /// local queue together once per turn of the loop: one store request for all of them
    /// instead of one per message.
    to_ack: Vec<u64>,
    /// The last local routing key mapped by the `out` rules, and what it mapped to (the rule's
    /// QoS and the remote topic; none without a rule): a backlog is mostly runs of one topic,
    /// and mapping one costs two conversions and an allocation or three.
    last_route: Option<(ShortString, Option<(QoS, Str)>)>,
}

/// A message under suspicion. The next connections send it alone, right after a PINGREQ: a
/// remote that answers the PINGREQ and then closes without acknowledging the message closed
/// on it. After [`PROBE_STRIKES`] such closes it is dropped (`dropped_too_large`), so that one
/// message the remote will never take cannot wedge the link; a remote that is merely going
/// down (no PINGRESP) or that takes it ends the probe without harm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probe {
    /// The local message's sequence number.
    seq: u64,
    strikes: u8,
}

/// Closes on a probed message (PINGRESP received, then the close) before it is dropped.
const PROBE_STRIKES: u8 = 2;

impl Carry {
    /// The first in-flight message if it is still to be PUBLISHed (not at PUBREL).
    fn head_publish(&self) -> Option<&OutFlight> {
        self.inflight.front().filter(|f| f.stage != Stage::PubComp)
    }
}

/// The packet id of the bridge's SUBSCRIBE (one per connection, at its start); never a
/// PUBLISH's.
const SUBSCRIBE_PID: u16 = 1;

/// How many packet ids PUBLISHes cycle through: 2 to 65,535.
const PID_SPAN: u64 = 65_534;

/// The packet id a local message is published with: a function of its sequence number in the
/// bridge's durable queue, which the store keeps across restarts. So a message resent after a
/// restart of Ferry carries the id it had before, and a remote that kept the session (and
/// still holds that id from a PUBREC) takes it as the resend it is, while a new message never
/// gets an id the remote may still hold: those belong to messages still in the queue (a
/// message leaves it only once the remote has completed it). The same scheme needs nothing
/// stored beyond the queue itself; Mosquitto's bridge gets the same effect by persisting its
/// in-flight messages with their ids.
fn packet_id(seq: u64) -> u16 {
    // Sequence numbers start at 1; 1 is the SUBSCRIBE's.
    (seq.wrapping_sub(1) % PID_SPAN + 2) as u16
}

/// The hop count of a local message (0 when it has none).
pub fn message_hops(m: &Message) -> u32 {
    match m.properties.header(HOPS) {
        Some(FieldValue::LongString(b)) | Some(FieldValue::Bytes(b)) => {
            std::str::from_utf8(b).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
        }
        Some(v) => v.as_i64().and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
        None => 0,
    }
}

/// The hop count a remote PUBLISH carries (0 without one: a 3.1.1 remote, or a message that
/// was published there).
pub fn publish_hops(p: &Publish) -> u32 {
    p.properties
        .user_properties
        .iter()
        .filter(|(k, _)| k.as_str() == HOPS)
        .filter_map(|(_, v)| v.as_str().trim().parse().ok())
        .max()
        .unwrap_or(0)
}

fn set_message_hops(m: &mut Message, hops: u32) {
    let headers = m.properties.headers.get_or_insert_with(FieldTable::new);
    headers.insert(HOPS, FieldValue::LongString(Bytes::from(hops.to_string())));
}

fn set_publish_hops(p: &mut Publish, hops: u32) {
    p.properties.user_properties.retain(|(k, _)| k.as_str() != HOPS);
    p.properties.user_properties.push((Str::from(HOPS), Str::from(hops.to_string())));
}

/// How long a connection must have stayed up for the reconnect back-off to start again from
/// its first delay: half the maximum delay, at most 30 s. Shorter-lived connections count as
/// failures, so a remote that accepts and then drops the link (a broker that closes at once,
/// a proxy in front of a dead one) makes the bridge back off up to the maximum.
pub(crate) fn stable_after(config: &BridgeConfig) -> Duration {
    (config.backoff_max / 2).min(Duration::from_secs(30))
}

/// A CONNACK refusal in words, for the log.
fn refusal(version: ProtocolVersion, code: u8) -> String {
    let text = if version.is_v5() {
        match code {
            0x84 => "unsupported protocol version",
            0x85 => "client identifier not valid",
            0x86 => "bad user name or password",
            0x87 => "not authorized",
            0x88 => "server unavailable",
            0x89 => "server busy",
            0x8A => "banned",
            0x8C => "bad authentication method",
            0x9F => "connection rate exceeded",
            _ => "refused",
        }
    } else {
        match code {
            1 => "unacceptable protocol version",
            2 => "identifier rejected",
            3 => "server unavailable",
            4 => "bad user name or password",
            5 => "not authorized",
            _ => "refused",
        }
    };
    format!("{text} (CONNACK 0x{code:02x})")
}

impl Link {
    /// Hands what the stopped link took and the remote had not acknowledged back to its queue,
    /// in order and marked redelivered, for the link that may follow (a run-time bridge
    /// changed or removed). Not at the server's shutdown: the store keeps them unacked for the
    /// next start, where a full drop-oldest queue would otherwise drop one now.
    pub(crate) fn release(&self, vhost: &VHost) {
        if let Some(queue) = &self.queue {
            let now = now_millis();
            vhost.settle(queue, queue.release_owner(self.owner, now), now);
        }
    }

    /// The link's state as a retained PUBLISH on its notification topic (`1`: up, `0`: down).
    fn state_publish(&self, up: bool, qos: QoS) -> Publish {
        Publish {
            dup: false,
            qos,
            retain: true,
            topic: Str::from(self.config.state_topic().as_str()),
            packet_id: None,
            properties: Properties::default(),
            payload: Bytes::from_static(if up { b"1" } else { b"0" }),
        }
    }

    /// Publishes the link's state locally, retained (Mosquitto's `notifications`).
    fn notify_local(&self, vhost: &VHost, up: bool) {
        if !self.config.notifications {
            return;
        }
        let p = self.state_publish(up, QoS::AtLeastOnce);
        let now = now_millis();
        let exchange = ShortString::from(self.config.exchange.as_str());
        let origin = Origin { protocol: Protocol::Mqtt, connection: self.id };
        let m = mapping::to_message(&p, p.topic.as_str(), &exchange, origin, now);
        // Nobody waits for these commits: a state lost in a crash is published again at the
        // next start (`0`) and connect (`1`).
        let _ = vhost.set_retained(&m.routing_key.clone(), Arc::new(m.clone()));
        if let Err(e) = vhost.publish_waiting(&exchange, m, now, false) {
            warn!(bridge = %self.config.name, "bridge {}: state notification not published: {e}", self.config.name);
        }
    }

    /// Messages waiting for the remote: in the local queue, and taken by the link and not
    /// acknowledged yet.
    fn waiting(&self) -> u64 {
        self.queue.as_ref().map_or(0, |q| {
            let st = q.stats();
            u64::from(st.ready) + u64::from(st.unacked)
        })
    }

    /// `start_type = "lazy"`: idle until `threshold` messages wait (checked every 100 ms, a
    /// lock of the queue each time); `false` at shutdown.
    async fn wait_for_threshold(&self, shutdown: &mut Shutdown) -> bool {
        if self.waiting() >= u64::from(self.config.threshold) {
            return true;
        }
        self.state.set(LinkState::Idle, None);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if self.waiting() >= u64::from(self.config.threshold) {
                        return true;
                    }
                }
                _ = shutdown.wait() => return false,
            }
        }
    }

    /// The remote's address the link uses now.
    pub(crate) fn address(&self) -> &str {
        self.config.address_at(self.current.load(Ordering::Relaxed))
    }

    /// Whether the link is on an alternate it should leave for the main address once that
    /// answers (Mosquitto's `round_robin false`).
    fn off_main(&self) -> bool {
        self.config.leaves_for_main(self.current.load(Ordering::Relaxed))
    }

    pub(crate) fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Runs the bridge until `shutdown`.
    pub(crate) async fn run(self: Arc<Self>, vhost: Arc<VHost>, mut shutdown: Shutdown, seed: u64) {
        let window = u32::from(self.config.max_inflight.max(1));
        let outbox = Arc::new(Outbox::new(window as usize + 1));
        let consumer = match &self.queue {
            Some(q) => {
                let spec = ConsumerSpec {
                    tag: ShortString::from(format!("bridge-{}", self.config.name)),
                    owner: self.owner,
                    connection: self.id,
                    prefetch: window,
                    no_ack: false,
                    exclusive: false,
                    priority: 0,
                    // Deliveries land in the outbox (ferry_core::sink); the prefetch, below its
                    // capacity, bounds them.
                    sink: Arc::new(LinkSink(outbox.clone())),
                };
                match vhost.consume(q.name(), spec, now_millis()) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        warn!(bridge = %self.config.name, "bridge {}: cannot consume its queue: {e}", self.config.name);
                        self.state.set(LinkState::Stopped, Some(format!("cannot consume the local queue: {e}")));
                        return;
                    }
                }
            }
            None => None,
        };
        let mut carry = Carry {
            incoming_qos2: std::mem::take(&mut *self.recovered_qos2.lock().unwrap_or_else(|e| e.into_inner())),
            ..Carry::default()
        };
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max, seed);
        self.notify_local(&vhost, false);
        info!(bridge = %self.config.name, "bridge {}: connecting to {}", self.config.name, self.address());
        loop {
            if self.config.start_type == StartType::Lazy && !self.wait_for_threshold(&mut shutdown).await {
                break;
            }
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            self.state.set(LinkState::Connecting, None);
            let mut conn = Conn {
                link: &self,
                vhost: &vhost,
                outbox: &outbox,
                consumer: &consumer,
                carry: &mut carry,
                session_present: false,
                probing: false,
                probe_pinged: false,
            };
            let mut up_at = None;
            let ended = conn.serve(&mut shutdown, &mut up_at).await;
            if let Err(e) = &ended {
                if up_at.is_some() && !shutdown.is_shutting_down() {
                    conn.judge_close(e);
                }
            }
            // The back-off starts again from its first delay only after a connection that
            // stayed up: a remote that takes the CONNACK and closes at once (or every second)
            // is retried ever more slowly, not in a tight loop.
            if up_at.is_some_and(|t: Instant| t.elapsed() >= stable_after(&self.config)) {
                backoff.reset();
            }
            // What the remote acknowledged before the connection ended leaves the queue.
            self.settle_local(&vhost, &consumer, &mut carry.to_ack);
            if up_at.is_some() {
                self.notify_local(&vhost, false);
            }
            match ended {
                Ok(()) => break,
                Err(e) if shutdown.is_shutting_down() => {
                    info!(bridge = %self.config.name, "bridge {}: stopped ({e})", self.config.name);
                    break;
                }
                Err(LinkError::Idle(idle)) => {
                    info!(
                        bridge = %self.config.name,
                        "bridge {}: no messages for {} s; disconnected until {} wait (start_type lazy)",
                        self.config.name,
                        idle.as_secs(),
                        self.config.threshold
                    );
                }
                Err(e) if self.config.start_type == StartType::Once && !matches!(e, LinkError::MainBack(_)) => {
                    warn!(bridge = %self.config.name, "bridge {} to {}: {e}; not restarted (start_type once)", self.config.name, self.address());
                    self.state.set(LinkState::Stopped, Some(e.to_string()));
                    break;
                }
                Err(LinkError::MainBack(main)) => {
                    // Not a failure: straight back to the main address, no back-off.
                    self.current.store(0, Ordering::Relaxed);
                    info!(bridge = %self.config.name, "bridge {}: the main address {main} answers again; moving to it", self.config.name);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    let failed = self.address().to_string();
                    // The next attempt goes to the remote's next address (Mosquitto does the
                    // same, whether the connect failed or an established connection ended).
                    let next = self.current.load(Ordering::Relaxed).wrapping_add(1) % self.config.address_count();
                    self.current.store(next, Ordering::Relaxed);
                    let then = if self.config.address_count() > 1 {
                        format!("; trying {} in {:.1} s", self.address(), delay.as_secs_f64())
                    } else {
                        format!("; reconnecting in {:.1} s", delay.as_secs_f64())
                    };
                    warn!(bridge = %self.config.name, "bridge {} to {failed}: {e}{then}", self.config.name);
                    self.state.set(LinkState::BackingOff, Some(e.to_string()));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.wait() => break,
                    }
                }
            }
        }
        if let (Some((queue, consumer)), Some(_)) = (&consumer, &self.queue) {
            // Unacked messages (pending or in flight) stay with the consumer's owner (as after
            // basic.cancel): at the server's shutdown the store keeps them for the next start
            // (requeued now, a full drop-oldest queue would drop one); a run-time bridge
            // stopped on its own is released by whoever stopped it (`release`).
            vhost.cancel(queue, *consumer, now_millis());
        }
        // For whoever stops the bridge for good (a run-time bridge removed or changed).
        *self.recovered_qos2.lock().unwrap_or_else(|e| e.into_inner()) = std::mem::take(&mut carry.incoming_qos2);
        self.state.set(LinkState::Stopped, None);
    }

    /// Acks the local messages the remote has taken (or that are not to be sent), emptying
    /// `seqs`: their effects (the store's deletes, the deliveries the freed window lets through)
    /// are carried out together.
    fn settle_local(&self, vhost: &VHost, consumer: &Option<(Arc<Queue>, ConsumerId)>, seqs: &mut Vec<u64>) {
        let Some((queue, _)) = consumer else {
            seqs.clear();
            return;
        };
        if seqs.is_empty() {
            return;
        }
        let now = now_millis();
        let (all, failed) = queue.ack_all(seqs, now);
        seqs.clear();
        for (seq, e) in failed {
            warn!(bridge = %self.config.name, "bridge {}: ack of local message {seq}: {e}", self.config.name)
        }
        vhost.settle(queue, all, now);
    }
}

/// While the link is on an alternate address (without `round_robin`): a task that tries a TCP
/// connect to the main address every `primary_retry` and says when one succeeded, as
/// Mosquitto's bridges do. Stopped when dropped.
struct MainWatch {
    task: tokio::task::JoinHandle<()>,
    answered: tokio::sync::oneshot::Receiver<()>,
}

impl MainWatch {
    fn spawn(config: &BridgeConfig) -> MainWatch {
        let (tx, answered) = tokio::sync::oneshot::channel();
        let (address, every, timeout) = (config.address.clone(), config.primary_retry, config.connect_timeout);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Ok(Ok(_probe)) = tokio::time::timeout(timeout, TcpStream::connect(address.as_str())).await {
                    let _ = tx.send(());
                    return;
                }
            }
        });
        MainWatch { task, answered }
    }
}

impl Drop for MainWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// CONNACK reason code 0x9A (5.0, §3.2.2.2): the server does not support retained messages.
const RETAIN_NOT_SUPPORTED: u8 = 0x9A;

/// What the remote's CONNACK allows.
#[derive(Debug, Clone, Copy)]
struct Remote {
    max_qos: QoS,
    retain_available: bool,
    /// A 5.0 remote's Maximum Packet Size (§3.2.2.3.6): larger packets must not be sent.
    max_packet: Option<u32>,
}

/// One connection to the remote.
struct Conn<'a> {
    link: &'a Arc<Link>,
    vhost: &'a Arc<VHost>,
    outbox: &'a Arc<Outbox<Delivery>>,
    consumer: &'a Option<(Arc<Queue>, ConsumerId)>,
    carry: &'a mut Carry,
    /// The CONNACK said the remote kept the session.
    session_present: bool,
    /// This connection sent only the probed message (after a PINGREQ) and holds the rest.
    probing: bool,
    /// The PINGRESP to the probe's PINGREQ came: the remote was reading up to the message.
    probe_pinged: bool,
}

impl Conn<'_> {
    fn config(&self) -> &BridgeConfig {
        &self.link.config
    }

    fn encode(&self, packet: &Packet, out: &mut BytesMut) {
        codec::encode(packet, self.config().version, out);
    }

    /// Whether the CONNECT carries the state notification's will (`0`, retained).
    fn sends_will(&self) -> bool {
        let config = self.config();
        config.notifications
            && !config.notifications_local_only
            && !self.link.will_refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// TCP connect, CONNECT, CONNACK.
    async fn connect(
        &self,
        rx: &mut BytesMut,
        decoder: &mut Decoder,
    ) -> Result<(Box<dyn Stream>, ConnAck, Addrs), LinkError> {
        let config = self.config();
        // The TLS files are read before the socket is opened: a bad file is reported as such.
        let tls = match &config.tls {
            Some(t) => Some((crate::tls::client_config(t)?, crate::tls::server_name(self.link.address(), t)?)),
            None => None,
        };
        let tcp = TcpStream::connect(self.link.address()).await.map_err(LinkError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let mut addrs = Addrs {
            peer: tcp.peer_addr().map_err(LinkError::Connect)?,
            local: tcp.local_addr().map_err(LinkError::Connect)?,
            sent: 0,
            received: 0,
        };
        let mut stream: Box<dyn Stream> = match tls {
            Some((client, name)) => {
                Box::new(tokio_rustls::TlsConnector::from(client).connect(name, tcp).await.map_err(LinkError::Tls)?)
            }
            None => Box::new(tcp),
        };
        let password = match &config.password {
            Some(source) => Some(Bytes::from(source.read()?)),
            None => None,
        };
        let mut properties = Properties::default();
        if config.version.is_v5() && !config.clean_session {
            // The session outlives the link for as long as the remote allows.
            properties.session_expiry_interval = Some(u32::MAX);
        }
        if config.version.is_v5() {
            // What the remote may have unacknowledged towards us: acknowledgements wait for
            // the local commit, and for room in a local `x-overflow = block` queue, so this
            // bounds how many such a queue holds past its limit for this link.
            properties.receive_maximum = Some(u16::try_from(MAX_PENDING_ACKS).unwrap_or(u16::MAX));
        }
        let private = config.try_private
            && !config.version.is_v5()
            && !self.link.private_refused.load(std::sync::atomic::Ordering::Relaxed);
        let connect = Connect {
            bridge: private,
            version: config.version,
            clean_start: config.clean_session,
            keep_alive: config.keep_alive,
            client_id: Str::from(config.client_id.as_str()),
            // The remote publishes `0` on the state topic if the link dies without a word.
            will: self.sends_will().then(|| {
                let p = self.link.state_publish(false, QoS::AtLeastOnce);
                Will { topic: p.topic, payload: p.payload, qos: p.qos, retain: true, properties: Properties::default() }
            }),
            username: config.username.as_deref().map(Str::from),
            password,
            properties,
        };
        let mut out = BytesMut::new();
        self.encode(&Packet::Connect(Box::new(connect)), &mut out);
        stream.write_all(&out).await.map_err(LinkError::Io)?;
        addrs.sent = out.len() as u64;
        loop {
            if let Some(packet) = decoder.decode(rx).map_err(LinkError::Decode)? {
                return match packet {
                    Packet::ConnAck(ack) if ack.code == 0 => Ok((stream, ack, addrs)),
                    // 1: unacceptable protocol version, the answer of a remote that does not
                    // know the bridge mark. As Mosquitto's bridges do, the next attempt goes
                    // without it.
                    Packet::ConnAck(ack) if ack.code == 1 && private => {
                        self.link.private_refused.store(true, std::sync::atomic::Ordering::Relaxed);
                        Err(LinkError::Refused(format!(
                            "{}; the remote does not take the bridge mark (try_private), the next attempt goes without it",
                            refusal(config.version, ack.code)
                        )))
                    }
                    Packet::ConnAck(ack) if ack.code == RETAIN_NOT_SUPPORTED && self.sends_will() => {
                        self.link.will_refused.store(true, std::sync::atomic::Ordering::Relaxed);
                        Err(LinkError::Refused(format!(
                            "{}; the remote does not keep the retained state notification, the next attempt goes without it",
                            refusal(config.version, ack.code)
                        )))
                    }
                    Packet::ConnAck(ack) => Err(LinkError::Refused(refusal(config.version, ack.code))),
                    other => Err(LinkError::Protocol(format!("expected CONNACK, got {other:?}"))),
                };
            }
            match stream.read_buf(rx).await.map_err(LinkError::Io)? {
                0 => return Err(LinkError::Closed),
                n => addrs.received += n as u64,
            }
        }
    }

    /// One connection, until it ends; `up_at` is set when the CONNACK came.
    async fn serve(&mut self, shutdown: &mut Shutdown, up_at: &mut Option<Instant>) -> Result<(), LinkError> {
        let config = self.config().clone();
        let name = config.name.as_str();
        let mut rx = BytesMut::with_capacity(8 * 1024);
        let mut decoder = Decoder::with_version(MAX_PACKET, config.version);
        let connected = tokio::select! {
            r = tokio::time::timeout(config.connect_timeout, self.connect(&mut rx, &mut decoder)) => r,
            _ = shutdown.wait() => return Ok(()),
        };
        let (stream, connack, addrs) = connected.map_err(|_| LinkError::ConnectTimeout(config.connect_timeout))??;
        // In the core's connection registry while connected, as every connection is: listed by
        // management, counted, and closable from outside (the link then reconnects).
        let handle = self.link.connections.register(ConnectionInfo {
            id: self.link.id,
            protocol: Protocol::Mqtt,
            version: config.version.name(),
            peer: addrs.peer,
            local: addrs.local,
            listener: None,
            tls: None,
            connected_at: now_millis(),
        });
        handle.set_login(Login {
            user: config.username.clone().unwrap_or_default(),
            vhost: config.vhost.clone(),
            client_id: Some(config.client_id.clone()),
        });
        handle.counters.add_bytes_out(addrs.sent);
        handle.counters.add_bytes_in(addrs.received);
        let counters = &self.link.counters;
        let (in_at_start, out_at_start) =
            (counters.forwarded_in.load(Ordering::Relaxed), counters.forwarded_out.load(Ordering::Relaxed));
        let remote_max = connack.properties.receive_maximum.unwrap_or(u16::MAX);
        // A 5.0 remote may cap QoS and refuse RETAIN (§3.2.2.3.4, §3.2.2.3.5): sending more is
        // a protocol error there, so messages go within what it allows.
        let remote = Remote {
            max_qos: connack.properties.maximum_qos.and_then(QoS::from_u8).unwrap_or(QoS::ExactlyOnce),
            retain_available: connack.properties.retain_available != Some(0),
            max_packet: connack.properties.maximum_packet_size.filter(|_| config.version.is_v5()),
        };
        let limit = usize::from(config.max_inflight.min(remote_max).max(1));
        self.link.counters.connects.fetch_add(1, Ordering::Relaxed);
        let up_line = format!(
            "bridge {name}: up, connected to {} (MQTT {}, session present: {})",
            self.link.address(),
            config.version.name(),
            connack.session_present
        );
        *up_at = Some(Instant::now());

        let (mut reader, writer) = tokio::io::split(stream);
        let (tx, unwritten, mut write_task) = crate::writer::spawn(writer);
        let mut out = BytesMut::new();
        if config.notifications {
            // Up: `1` on the remote (replacing the will's `0`; QoS 0, so that it takes no packet
            // id from the queue's messages: a link that dies before it is read leaves the will)
            // and locally.
            if !config.notifications_local_only && remote.retain_available {
                self.encode(&Packet::Publish(self.link.state_publish(true, QoS::AtMostOnce)), &mut out);
            }
            self.link.notify_local(self.vhost, true);
        }

        // What was in flight when the last connection ended goes again, in order (§4.4).
        self.session_present = connack.session_present;
        if !connack.session_present && !self.carry.incoming_qos2.is_empty() {
            let name = &self.link.config.name;
            crate::qos2_ids::forget(self.vhost, name, self.carry.incoming_qos2.drain());
        }
        self.drop_oversized_inflight(&remote);
        if self.carry.probe.is_some() && self.carry.head_publish().map(|f| f.seq) != self.carry.probe.map(|p| p.seq) {
            // The suspect left (acknowledged, or dropped above).
            self.carry.probe = None;
        }
        if self.carry.probe.is_some() {
            // The suspect alone, after a PINGREQ; the rest waits for its acknowledgement.
            self.probing = true;
            self.encode(&Packet::PingReq, &mut out);
            self.resend(0..1, &mut out);
        } else {
            self.resend(0..self.carry.inflight.len(), &mut out);
        }
        // The remote subscriptions of the `in` rules.
        let filters: Vec<(Str, SubOptions)> = config
            .topics
            .iter()
            .filter(|r| r.direction.is_in())
            .map(|r| {
                let options = SubOptions {
                    qos: r.qos,
                    // 5.0: what the bridge publishes there does not come back on this link.
                    no_local: config.version.is_v5(),
                    retain_as_published: true,
                    retain_handling: 0,
                };
                (Str::from(r.remote_filter()), options)
            })
            .collect();
        // The link counts as up once the remote has answered the subscriptions (at once
        // without `in` rules), so that a message published there from then on is bridged.
        let mut subscribing = None;
        if filters.is_empty() {
            info!(bridge = %name, "{up_line}");
            self.link.state.set(LinkState::Up, None);
        } else {
            let pid = SUBSCRIBE_PID;
            let sub = Subscribe { packet_id: pid, properties: Properties::default(), filters };
            self.encode(&Packet::Subscribe(sub), &mut out);
            subscribing = Some(pid);
        }

        // A 5.0 remote may set the keep alive itself (§3.2.2.3.14).
        let keep_alive = connack.properties.server_keep_alive.unwrap_or(config.keep_alive);
        let keep_alive = Duration::from_secs(u64::from(keep_alive));
        let mut last_sent = Instant::now();
        let mut last_heard = Instant::now();
        let mut last_ping = Instant::now();
        let mut acks: AckQueue<Packet> = AckQueue::new();
        let far = Duration::from_secs(86_400 * 365);
        // On an alternate without `round_robin`: back to the main address once it answers.
        let mut main_watch = self.link.off_main().then(|| MainWatch::spawn(&config));
        // `start_type = "lazy"`: when a message last went either way (or one was in flight).
        let lazy = config.start_type == StartType::Lazy;
        let mut traffic = (u64::MAX, u64::MAX);
        let mut last_traffic = Instant::now();
        loop {
            // Acks first: the window they free is filled in the same turn.
            self.link.settle_local(self.vhost, self.consumer, &mut self.carry.to_ack);
            if self.pump_out(limit, &remote, &unwritten, &mut out) {
                self.link.changed();
            }
            self.link.settle_local(self.vhost, self.consumer, &mut self.carry.to_ack);
            let counters = &self.link.counters;
            handle.counters.set_messages(
                counters.forwarded_in.load(Ordering::Relaxed) - in_at_start,
                counters.forwarded_out.load(Ordering::Relaxed) - out_at_start,
            );
            if !out.is_empty() {
                handle.counters.add_bytes_out(out.len() as u64);
                if tx.send(out.split().freeze()).is_err() {
                    return Err(writer_ended(write_task.await));
                }
                last_sent = Instant::now();
            }
            // A ping when we have been silent, or have heard nothing (an out link that only
            // sends QoS 0 gets no answers otherwise), for a keep alive period.
            if lazy {
                let now_traffic =
                    (counters.forwarded_in.load(Ordering::Relaxed), counters.forwarded_out.load(Ordering::Relaxed));
                if now_traffic != traffic || !self.carry.inflight.is_empty() || !self.carry.pending.is_empty() {
                    traffic = now_traffic;
                    last_traffic = Instant::now();
                }
            }
            let idle_at = if lazy { last_traffic + config.idle_timeout } else { last_sent + far };
            let quiet_since = last_sent.min(last_heard).max(last_ping);
            let ping_at = if keep_alive.is_zero() { last_sent + far } else { quiet_since + keep_alive };
            let dead_at = if keep_alive.is_zero() { last_heard + far } else { last_heard + keep_alive * 2 };
            tokio::select! {
                read = reader.read_buf(&mut rx) => {
                    match read {
                        Ok(0) => return Err(LinkError::Closed),
                        Ok(n) => handle.counters.add_bytes_in(n as u64),
                        Err(e) => return Err(LinkError::Io(e)),
                    }
                    last_heard = Instant::now();
                    while let Some(packet) = decoder.decode(&mut rx).map_err(LinkError::Decode)? {
                        let suback = match &packet {
                            Packet::SubAck(a) => Some(a.packet_id),
                            _ => None,
                        };
                        self.on_packet(packet, &mut acks, &mut out)?;
                        if suback.is_some() && suback == subscribing {
                            subscribing = None;
                            info!(bridge = %name, "{up_line}");
                            self.link.state.set(LinkState::Up, None);
                        }
                    }
                    self.link.changed();
                }
                _ = self.outbox.notified() => {}
                _ = unwritten.drained(), if unwritten.is_full() => {}
                _ = acks.ready(), if !acks.is_empty() => {
                    while let Some((packet, result)) = acks.take_ready() {
                        // Unanswered, the remote sends it again after the reconnect.
                        result.map_err(|e| LinkError::Store(e.to_string()))?;
                        self.encode(&packet, &mut out);
                    }
                }
                _ = tokio::time::sleep_until(ping_at) => {
                    self.encode(&Packet::PingReq, &mut out);
                    // Once per period, not on every turn until the answer.
                    last_ping = Instant::now();
                }
                _ = tokio::time::sleep_until(dead_at) => return Err(LinkError::KeepAlive(keep_alive * 2)),
                _ = tokio::time::sleep_until(idle_at), if lazy => {
                    if self.carry.inflight.is_empty() && self.carry.pending.is_empty() && self.outbox.is_empty() {
                        self.disconnect(tx, write_task, &remote).await;
                        return Err(LinkError::Idle(config.idle_timeout));
                    }
                    last_traffic = Instant::now();
                }
                ended = &mut write_task => return Err(writer_ended(ended)),
                reason = handle.entry().closed() => return Err(LinkError::ClosedLocally(reason.to_string())),
                answered = async { (&mut main_watch.as_mut().expect("guarded").answered).await }, if main_watch.is_some() => {
                    if answered.is_err() {
                        main_watch = None;
                        continue;
                    }
                    // What is in flight goes again on the main address, as after any reconnect.
                    self.disconnect(tx, write_task, &remote).await;
                    return Err(LinkError::MainBack(config.address.clone()));
                }
                _ = shutdown.wait() => {
                    self.disconnect(tx, write_task, &remote).await;
                    info!(bridge = %name, "bridge {name}: disconnected (shutdown)");
                    return Ok(());
                }
            }
        }
    }

    /// A DISCONNECT (normal) as the last packet, after the state notification's `0`, given a
    /// second to be written.
    async fn disconnect(
        &self,
        tx: crate::writer::Writer,
        write_task: tokio::task::JoinHandle<std::io::Result<()>>,
        remote: &Remote,
    ) {
        let mut bye = BytesMut::new();
        let config = self.config();
        if config.notifications && !config.notifications_local_only && remote.retain_available {
            // A DISCONNECT discards the will: the remote is told `0` first.
            self.encode(&Packet::Publish(self.link.state_publish(false, QoS::AtMostOnce)), &mut bye);
        }
        self.encode(&Packet::Disconnect(Disconnect { reason: 0, properties: Properties::default() }), &mut bye);
        let _ = tx.send(bye.freeze());
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(1), write_task).await;
    }

    /// Sends in-flight messages `range` again (DUP), or their PUBREL where the remote kept the
    /// session and had answered PUBREC.
    fn resend(&mut self, range: std::ops::Range<usize>, out: &mut BytesMut) {
        let version = self.config().version;
        for i in range {
            let f = &mut self.carry.inflight[i];
            let packet = match f.stage {
                Stage::PubComp if self.session_present => Packet::PubRel(PubResp::ok(f.pid)),
                stage => {
                    if stage == Stage::PubComp {
                        // The remote forgot the exchange: the message goes again from the start.
                        f.stage = Stage::PubRec;
                    }
                    let mut p = f.publish.clone();
                    p.dup = true;
                    Packet::Publish(p)
                }
            };
            codec::encode(&packet, version, out);
        }
    }

    /// A message the remote will not take leaves the local queue, counted and logged.
    fn drop_too_large(&self, seq: u64, topic: &str, size: usize, why: &str) {
        let link = self.link;
        link.counters.dropped_too_large.fetch_add(1, Ordering::Relaxed);
        warn!(
            bridge = %link.config.name,
            "bridge {}: a message on {topic} ({size} bytes as a PUBLISH) is {why}; dropped",
            link.config.name
        );
        link.settle_local(self.vhost, self.consumer, &mut vec![seq]);
        link.changed();
    }

    /// In-flight messages larger than a 5.0 remote's Maximum Packet Size (which may have
    /// shrunk since they were sent) are dropped rather than sent.
    fn drop_oversized_inflight(&mut self, remote: &Remote) {
        let Some(max) = remote.max_packet else { return };
        let version = self.config().version;
        let mut i = 0;
        while i < self.carry.inflight.len() {
            let f = &self.carry.inflight[i];
            let size =
                if f.stage == Stage::PubComp { 0 } else { encoded_len(&Packet::Publish(f.publish.clone()), version) };
            if size > max as usize {
                let f = self.carry.inflight.remove(i).expect("looked at");
                let why = format!("larger than the remote accepts (maximum packet size {max})");
                self.drop_too_large(f.seq, f.publish.topic.as_str(), size, &why);
            } else {
                i += 1;
            }
        }
    }

    /// The probed message was answered: the rest of what is in flight goes now.
    fn end_probe(&mut self, out: &mut BytesMut) {
        let Some(probe) = self.carry.probe.filter(|_| self.probing) else { return };
        if self.carry.head_publish().map(|f| f.seq) == Some(probe.seq) {
            return;
        }
        self.probing = false;
        self.carry.probe = None;
        // What was in flight behind it was not sent on this connection (the probe itself may
        // still be first, at PUBREL, which went already).
        let from = usize::from(self.carry.inflight.front().is_some_and(|f| f.seq == probe.seq));
        self.resend(from..self.carry.inflight.len(), out);
    }

    /// The remote ended a connection that was up: decides whether the oldest message in flight
    /// is to be suspected, struck, or dropped (see [`Probe`]).
    fn judge_close(&mut self, e: &LinkError) {
        if !matches!(e, LinkError::Closed | LinkError::Io(_) | LinkError::Disconnected(_)) {
            // Keep alive, closed locally, a protocol error: not the remote refusing a packet.
            return;
        }
        let Some(head) = self.carry.head_publish() else {
            self.carry.probe = None;
            return;
        };
        let (seq, topic, size) = (
            head.seq,
            head.publish.topic.clone(),
            encoded_len(&Packet::Publish(head.publish.clone()), self.config().version),
        );
        match self.carry.probe {
            Some(p) if p.seq == seq && self.probing => {
                if !self.probe_pinged {
                    // Gone before answering the PINGREQ: not the message's doing.
                    return;
                }
                let strikes = p.strikes + 1;
                if strikes < PROBE_STRIKES {
                    self.carry.probe = Some(Probe { seq, strikes });
                    return;
                }
                self.carry.inflight.pop_front();
                self.carry.probe = None;
                let why = format!(
                    "refused by the remote: it closed the connection on it {strikes} times, each time right after \
                     answering a PINGREQ (larger than it accepts?)"
                );
                self.drop_too_large(seq, topic.as_str(), size, &why);
            }
            _ => self.carry.probe = Some(Probe { seq, strikes: 0 }),
        }
    }

    /// Sends what waits in the outbox and the pending list while the remote has room; whether
    /// a counter moved.
    fn pump_out(
        &mut self,
        limit: usize,
        remote: &Remote,
        unwritten: &crate::writer::Unwritten,
        out: &mut BytesMut,
    ) -> bool {
        let mut moved = false;
        let mut fresh = Vec::new();
        self.outbox.drain_into(&mut fresh);
        self.carry.pending.extend(fresh);
        if self.probing {
            // Nothing new before the remote has answered the probed message.
            return false;
        }
        let link = self.link.clone();
        let config = &link.config;
        let v5 = config.version.is_v5();
        while let Some(d) = self.carry.pending.front() {
            // QoS 0 is settled once handed to the writer: what the socket has not taken yet
            // bounds how far ahead it goes.
            if unwritten.is_full_with(out) {
                break;
            }
            let m = &d.message;
            let hops = message_hops(m);
            let skip = if m.origin.connection == link.id {
                // Came in over this very link.
                Some(&link.counters.dropped_loop)
            } else if hops >= config.max_hops {
                Some(&link.counters.dropped_max_hops)
            } else {
                None
            };
            let route = match &self.carry.last_route {
                Some((key, route)) if *key == m.routing_key => route.clone(),
                _ => {
                    let topic = ferry_mqtt::topic::swap_separators(&m.routing_key.to_string_lossy());
                    let route = rules::outbound(&config.topics, &topic).map(|(rule, t)| (rule.qos, Str::from(t)));
                    self.carry.last_route = Some((m.routing_key.clone(), route.clone()));
                    route
                }
            };
            let Some((rule_qos, remote_topic)) = route.filter(|_| skip.is_none()) else {
                let counter = skip.unwrap_or(&link.counters.dropped_no_rule);
                counter.fetch_add(1, Ordering::Relaxed);
                self.carry.to_ack.push(d.seq);
                self.carry.pending.pop_front();
                moved = true;
                continue;
            };
            let qos = rule_qos.min(mapping::message_qos(m)).min(remote.max_qos);
            if qos > QoS::AtMostOnce && self.carry.inflight.len() >= limit {
                break;
            }
            let pid = packet_id(d.seq);
            if qos > QoS::AtMostOnce
                && self.carry.inflight.front().is_some_and(|f| d.seq.saturating_sub(f.seq) >= PID_SPAN)
                && self.carry.inflight.iter().any(|f| f.pid == pid)
            {
                // A message 65,534 sequence numbers older still holds this id: wait for it.
                break;
            }
            let redelivered = d.redelivered;
            let retain = mapping::message_retain(m) && remote.retain_available;
            let mut p = mapping::to_publish_on(m, remote_topic, qos, retain, v5, now_millis());
            if v5 {
                set_publish_hops(&mut p, hops + 1);
            }
            let d = self.carry.pending.pop_front().expect("looked at");
            if qos > QoS::AtMostOnce {
                p.packet_id = Some(pid);
                // Perhaps sent before a restart, with this same id.
                p.dup = redelivered;
            }
            let mark = out.len();
            let packet = Packet::Publish(p);
            codec::encode(&packet, config.version, out);
            let Packet::Publish(p) = packet else { unreachable!("built above") };
            if let Some(max) = remote.max_packet.filter(|m| out.len() - mark > *m as usize) {
                let size = out.len() - mark;
                out.truncate(mark);
                let why = format!("larger than the remote accepts (maximum packet size {max})");
                self.drop_too_large(d.seq, p.topic.as_str(), size, &why);
                moved = true;
                continue;
            }
            if qos == QoS::AtMostOnce {
                link.counters.forwarded_out.fetch_add(1, Ordering::Relaxed);
                self.carry.to_ack.push(d.seq);
                moved = true;
            } else {
                let stage = if qos == QoS::ExactlyOnce { Stage::PubRec } else { Stage::PubAck };
                self.carry.inflight.push_back(OutFlight { pid, seq: d.seq, publish: p, stage });
            }
        }
        moved
    }

    fn on_packet(&mut self, packet: Packet, acks: &mut AckQueue<Packet>, out: &mut BytesMut) -> Result<(), LinkError> {
        let link = self.link.clone();
        match packet {
            Packet::Publish(p) => self.on_publish(p, acks)?,
            Packet::PubAck(r) => {
                self.done_out(r, Stage::PubAck)?;
                self.end_probe(out);
            }
            Packet::PubRec(r) => {
                let Some(i) = self.carry.inflight.iter().position(|f| f.pid == r.packet_id) else {
                    return Err(LinkError::Protocol(format!("PUBREC for unknown packet id {}", r.packet_id)));
                };
                if self.carry.inflight[i].stage == Stage::PubRec && r.reason < 0x80 {
                    self.carry.inflight[i].stage = Stage::PubComp;
                    self.encode(&Packet::PubRel(PubResp::ok(r.packet_id)), out);
                    self.end_probe(out);
                } else if self.carry.inflight[i].stage == Stage::PubComp {
                    self.encode(&Packet::PubRel(PubResp::ok(r.packet_id)), out);
                } else {
                    self.done_out(r, Stage::PubRec)?;
                    self.end_probe(out);
                }
            }
            Packet::PubComp(r) => self.done_out(r, Stage::PubComp)?,
            Packet::PubRel(r) => {
                // The id's record goes before the PUBCOMP: the remote may reuse the id at once.
                let commit = if self.carry.incoming_qos2.remove(&r.packet_id) {
                    crate::qos2_ids::release(self.vhost, &self.link.config.name, r.packet_id)
                } else {
                    Commit::done(Ok(()))
                };
                acks.push(Packet::PubComp(PubResp::ok(r.packet_id)), commit);
            }
            Packet::SubAck(ack) => {
                let refused: Vec<u8> = ack.reasons.iter().copied().filter(|c| *c >= 0x80).collect();
                if !refused.is_empty() {
                    let e =
                        format!("the remote refused {} of the bridge's subscriptions ({refused:02x?})", refused.len());
                    warn!(bridge = %link.config.name, "bridge {}: {e}", link.config.name);
                    link.state.set_error(e);
                }
            }
            Packet::PingResp => self.probe_pinged |= self.probing,
            Packet::UnsubAck(_) => {}
            Packet::Disconnect(d) => return Err(LinkError::Disconnected(d.reason)),
            other => return Err(LinkError::Protocol(format!("unexpected packet from the remote: {other:?}"))),
        }
        Ok(())
    }

    /// The remote acknowledged (or refused, with a 5.0 reason code of 0x80 or above) an
    /// outgoing message: it leaves the local queue either way, counted.
    fn done_out(&mut self, r: PubResp, expected: Stage) -> Result<(), LinkError> {
        let Some(i) = self.carry.inflight.iter().position(|f| f.pid == r.packet_id && f.stage == expected) else {
            return Err(LinkError::Protocol(format!(
                "{expected:?} acknowledgement for unknown packet id {}",
                r.packet_id
            )));
        };
        let f = self.carry.inflight.remove(i).expect("found");
        let counters = &self.link.counters;
        if r.reason >= 0x80 {
            counters.dropped_refused.fetch_add(1, Ordering::Relaxed);
            *counters.refused_by_reason.lock().unwrap_or_else(|e| e.into_inner()).entry(r.reason).or_default() += 1;
            warn!(
                bridge = %self.link.config.name,
                "bridge {}: the remote refused a message on {} (reason 0x{:02x}); dropped",
                self.link.config.name,
                f.publish.topic,
                r.reason
            );
        } else {
            counters.forwarded_out.fetch_add(1, Ordering::Relaxed);
        }
        self.carry.to_ack.push(f.seq);
        Ok(())
    }

    /// A message from the remote: published locally, acknowledged after the local commit.
    fn on_publish(&mut self, p: Publish, acks: &mut AckQueue<Packet>) -> Result<(), LinkError> {
        let link = self.link.clone();
        let config = &link.config;
        let pid = p.packet_id.unwrap_or(0);
        if p.qos == QoS::ExactlyOnce && self.carry.incoming_qos2.contains(&pid) {
            // A resend of one already taken.
            acks.push(Packet::PubRec(PubResp::ok(pid)), Commit::done(Ok(())));
            return Ok(());
        }
        let hops = publish_hops(&p);
        let commit = match rules::inbound(&config.topics, p.topic.as_str()) {
            Some(_) if hops >= config.max_hops => {
                link.counters.dropped_max_hops.fetch_add(1, Ordering::Relaxed);
                Commit::done(Ok(()))
            }
            None => {
                link.counters.dropped_no_rule.fetch_add(1, Ordering::Relaxed);
                Commit::done(Ok(()))
            }
            Some((_, local_topic)) => {
                let now = now_millis();
                let exchange = ShortString::from(config.exchange.as_str());
                let origin = Origin { protocol: Protocol::Mqtt, connection: link.id };
                let mut m = mapping::to_message(&p, &local_topic, &exchange, origin, now);
                set_message_hops(&mut m, hops + 1);
                let retained = p.retain.then(|| (m.routing_key.clone(), Arc::new(m.clone())));
                // A QoS 1/2 message is acknowledged to the remote after the local commit: a
                // `block` queue at its limits holds that acknowledgement.
                let waits = p.qos != QoS::AtMostOnce;
                let outcome = self
                    .vhost
                    .publish_waiting(&exchange, m, now, waits)
                    .map_err(|e| LinkError::Local(e.to_string()))?;
                let mut commit = outcome.commit;
                if let Some((key, message)) = retained {
                    commit = commit.join(self.vhost.set_retained(&key, message));
                }
                link.counters.forwarded_in.fetch_add(1, Ordering::Relaxed);
                commit
            }
        };
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => acks.push(Packet::PubAck(PubResp::ok(pid)), commit),
            QoS::ExactlyOnce => {
                self.carry.incoming_qos2.insert(pid);
                // Recorded in the store behind the message, before the PUBREC (see qos2_ids): a
                // resend after a restart of Ferry is not published again.
                let commit = crate::qos2_ids::record(self.vhost, &config.name, pid, commit);
                acks.push(Packet::PubRec(PubResp::ok(pid)), commit);
            }
        }
        Ok(())
    }
}

/// A packet's size on the wire.
fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let mut buf = BytesMut::new();
    codec::encode(packet, version, &mut buf);
    buf.len()
}

/// Why the writer stopped.
fn writer_ended(ended: Result<std::io::Result<()>, tokio::task::JoinError>) -> LinkError {
    match ended {
        Ok(Err(e)) => LinkError::Io(e),
        Ok(Ok(())) => LinkError::Closed,
        Err(e) => LinkError::Protocol(format!("writer task failed: {e}")),
    }
}

/// The link's end of its queue: the outbox, without delivered marks in the store. The link's
/// only use of `redelivered` is DUP ("perhaps sent before", MQTT 3.3.1.1), and the queue flags
/// every message restored at start-up redelivered for a consumer that keeps no marks
/// ([`ConsumerSink::records_deliveries`]), which is what DUP needs: a message in the backlog at
/// a restart may have gone out before it. That saves the store a B-tree update per forwarded
/// message where the put was committed before the link took it.
#[derive(Debug)]
struct LinkSink(Arc<Outbox<Delivery>>);

impl ConsumerSink for LinkSink {
    fn has_room(&self) -> bool {
        self.0.has_room()
    }
    fn deliver(&self, delivery: Delivery) {
        self.0.push(delivery)
    }
    fn records_deliveries(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_round_trip_through_a_message_header_and_a_user_property() {
        let mut m = Message::new("amq.topic", "a.b", Bytes::from_static(b"x"));
        assert_eq!(message_hops(&m), 0);
        set_message_hops(&mut m, 2);
        assert_eq!(message_hops(&m), 2);
        let mut p = mapping::to_publish(&m, QoS::AtLeastOnce, false, true, 0);
        assert_eq!(publish_hops(&p), 2, "the header travels as a user property");
        set_publish_hops(&mut p, 3);
        assert_eq!(publish_hops(&p), 3);
        assert_eq!(p.properties.user_properties.iter().filter(|(k, _)| k.as_str() == HOPS).count(), 1);
    }

    #[test]
    fn packet_ids_follow_the_queue_sequence_and_never_take_the_subscribes() {
        assert_eq!(packet_id(1), 2);
        assert_eq!(packet_id(2), 3);
        assert_eq!(packet_id(PID_SPAN), u16::MAX);
        assert_eq!(packet_id(PID_SPAN + 1), 2, "wraps past 0 and SUBSCRIBE_PID");
        let ids: HashSet<u16> = (1..=3 * PID_SPAN).map(packet_id).collect();
        assert_eq!(ids.len() as u64, PID_SPAN);
        assert!(!ids.contains(&0) && !ids.contains(&SUBSCRIBE_PID));
    }

    #[test]
    fn refusals_are_named() {
        assert_eq!(refusal(ProtocolVersion::V311, 4), "bad user name or password (CONNACK 0x04)");
        assert_eq!(refusal(ProtocolVersion::V5, 0x87), "not authorized (CONNACK 0x87)");
    }
}

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
use ferry_core::flow::AckQueue;
use ferry_core::frontend::Shutdown;
use ferry_core::message::{now_millis, ConnectionId, FieldTable, FieldValue, Message, Origin, Protocol, ShortString};
use ferry_core::queue::{ConsumerId, ConsumerSpec, Delivery, OwnerId, Queue};
use ferry_core::sink::Outbox;
use ferry_core::store::Commit;
use ferry_core::vhost::VHost;
use ferry_mqtt::codec::{
    self, ConnAck, Connect, Decoder, Disconnect, Packet, Properties, ProtocolVersion, PubResp, Publish, QoS, Str,
    SubOptions, Subscribe,
};
use ferry_mqtt::mapping;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config::BridgeConfig;
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
    next_pid: u16,
    /// QoS 2 PUBLISHes from the remote already published locally and PUBREC'd, awaiting PUBREL:
    /// a resend of one (DUP) is answered without publishing it again.
    incoming_qos2: HashSet<u16>,
    /// Local messages done with (acknowledged by the remote, or not to be sent), acked in the
    /// local queue together once per turn of the loop: one store request for all of them
    /// instead of one per message.
    to_ack: Vec<u64>,
    /// The last local routing key mapped by the `out` rules, and what it mapped to (the rule's
    /// QoS and the remote topic; none without a rule): a backlog is mostly runs of one topic,
    /// and mapping one costs two conversions and an allocation or three.
    last_route: Option<(ShortString, Option<(QoS, Str)>)>,
}

impl Carry {
    fn next_pid(&mut self) -> u16 {
        loop {
            self.next_pid = self.next_pid.wrapping_add(1).max(1);
            let pid = self.next_pid;
            if !self.inflight.iter().any(|f| f.pid == pid) {
                return pid;
            }
        }
    }
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
                    owner: OwnerId::next(),
                    connection: self.id,
                    prefetch: window,
                    no_ack: false,
                    exclusive: false,
                    priority: 0,
                    // Deliveries land in the outbox (ferry_core::sink); the prefetch, below its
                    // capacity, bounds them.
                    sink: outbox.clone(),
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
        let mut carry = Carry::default();
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max, seed);
        info!(bridge = %self.config.name, "bridge {}: connecting to {}", self.config.name, self.config.address);
        loop {
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            self.state.set(LinkState::Connecting, None);
            let mut conn = Conn { link: &self, vhost: &vhost, outbox: &outbox, consumer: &consumer, carry: &mut carry };
            let ended = conn.serve(&mut shutdown, &mut backoff).await;
            // What the remote acknowledged before the connection ended leaves the queue.
            self.settle_local(&vhost, &consumer, &mut carry.to_ack);
            match ended {
                Ok(()) => break,
                Err(e) if shutdown.is_shutting_down() => {
                    info!(bridge = %self.config.name, "bridge {}: stopped ({e})", self.config.name);
                    break;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(
                        bridge = %self.config.name,
                        "bridge {} to {}: {e}; reconnecting in {:.1} s",
                        self.config.name,
                        self.config.address,
                        delay.as_secs_f64()
                    );
                    self.state.set(LinkState::BackingOff, Some(e.to_string()));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.wait() => break,
                    }
                }
            }
        }
        if let (Some((queue, consumer)), Some(_)) = (&consumer, &self.queue) {
            // Unacked messages (pending or in flight) go back to the queue, in order.
            vhost.cancel(queue, *consumer, now_millis());
        }
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
        let mut all = ferry_core::queue::Effects::default();
        for seq in seqs.drain(..) {
            match queue.ack(seq, now) {
                Ok(effects) => all.merge(effects),
                Err(e) => {
                    warn!(bridge = %self.config.name, "bridge {}: ack of local message {seq}: {e}", self.config.name)
                }
            }
        }
        vhost.settle(queue, all, now);
    }
}

/// What the remote's CONNACK allows.
#[derive(Debug, Clone, Copy)]
struct Remote {
    max_qos: QoS,
    retain_available: bool,
}

/// One connection to the remote.
struct Conn<'a> {
    link: &'a Arc<Link>,
    vhost: &'a Arc<VHost>,
    outbox: &'a Arc<Outbox<Delivery>>,
    consumer: &'a Option<(Arc<Queue>, ConsumerId)>,
    carry: &'a mut Carry,
}

impl Conn<'_> {
    fn config(&self) -> &BridgeConfig {
        &self.link.config
    }

    fn encode(&self, packet: &Packet, out: &mut BytesMut) {
        codec::encode(packet, self.config().version, out);
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
            Some(t) => Some((crate::tls::client_config(t)?, crate::tls::server_name(config, t)?)),
            None => None,
        };
        let tcp = TcpStream::connect(config.address.as_str()).await.map_err(LinkError::Connect)?;
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
        let connect = Connect {
            version: config.version,
            clean_start: config.clean_session,
            keep_alive: config.keep_alive,
            client_id: Str::from(config.client_id.as_str()),
            will: None,
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

    async fn serve(&mut self, shutdown: &mut Shutdown, backoff: &mut Backoff) -> Result<(), LinkError> {
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
        };
        let limit = usize::from(config.max_inflight.min(remote_max).max(1));
        self.link.counters.connects.fetch_add(1, Ordering::Relaxed);
        let up_line = format!(
            "bridge {name}: up, connected to {} (MQTT {}, session present: {})",
            config.address,
            config.version.name(),
            connack.session_present
        );
        backoff.reset();

        let (mut reader, writer) = tokio::io::split(stream);
        let (tx, wrx) = mpsc::unbounded_channel::<Bytes>();
        let mut write_task = tokio::spawn(write_loop(writer, wrx));
        let mut out = BytesMut::new();

        // What was in flight when the last connection ended goes again, in order (§4.4).
        if !connack.session_present {
            self.carry.incoming_qos2.clear();
        }
        for i in 0..self.carry.inflight.len() {
            let f = &mut self.carry.inflight[i];
            let packet = match f.stage {
                Stage::PubComp if connack.session_present => Packet::PubRel(PubResp::ok(f.pid)),
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
            codec::encode(&packet, config.version, &mut out);
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
            let pid = self.carry.next_pid();
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
        loop {
            // Acks first: the window they free is filled in the same turn.
            self.link.settle_local(self.vhost, self.consumer, &mut self.carry.to_ack);
            if self.pump_out(limit, &remote, &mut out) {
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
                ended = &mut write_task => return Err(writer_ended(ended)),
                reason = handle.entry().closed() => return Err(LinkError::ClosedLocally(reason.to_string())),
                _ = shutdown.wait() => {
                    let mut bye = BytesMut::new();
                    self.encode(&Packet::Disconnect(Disconnect { reason: 0, properties: Properties::default() }), &mut bye);
                    let _ = tx.send(bye.freeze());
                    drop(tx);
                    let _ = tokio::time::timeout(Duration::from_secs(1), write_task).await;
                    info!(bridge = %name, "bridge {name}: disconnected (shutdown)");
                    return Ok(());
                }
            }
        }
    }

    /// Sends what waits in the outbox and the pending list while the remote has room; whether
    /// a counter moved.
    fn pump_out(&mut self, limit: usize, remote: &Remote, out: &mut BytesMut) -> bool {
        let mut moved = false;
        let mut fresh = Vec::new();
        self.outbox.drain_into(&mut fresh);
        self.carry.pending.extend(fresh);
        let link = self.link.clone();
        let config = &link.config;
        let v5 = config.version.is_v5();
        while let Some(d) = self.carry.pending.front() {
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
            let retain = mapping::message_retain(m) && remote.retain_available;
            let mut p = mapping::to_publish_on(m, remote_topic, qos, retain, v5, now_millis());
            if v5 {
                set_publish_hops(&mut p, hops + 1);
            }
            let d = self.carry.pending.pop_front().expect("looked at");
            if qos == QoS::AtMostOnce {
                codec::encode(&Packet::Publish(p), config.version, out);
                link.counters.forwarded_out.fetch_add(1, Ordering::Relaxed);
                self.carry.to_ack.push(d.seq);
                moved = true;
            } else {
                let pid = self.carry.next_pid();
                p.packet_id = Some(pid);
                codec::encode(&Packet::Publish(p.clone()), config.version, out);
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
            Packet::PubAck(r) => self.done_out(r, Stage::PubAck)?,
            Packet::PubRec(r) => {
                let Some(i) = self.carry.inflight.iter().position(|f| f.pid == r.packet_id) else {
                    return Err(LinkError::Protocol(format!("PUBREC for unknown packet id {}", r.packet_id)));
                };
                if self.carry.inflight[i].stage == Stage::PubRec && r.reason < 0x80 {
                    self.carry.inflight[i].stage = Stage::PubComp;
                    self.encode(&Packet::PubRel(PubResp::ok(r.packet_id)), out);
                } else if self.carry.inflight[i].stage == Stage::PubComp {
                    self.encode(&Packet::PubRel(PubResp::ok(r.packet_id)), out);
                } else {
                    self.done_out(r, Stage::PubRec)?;
                }
            }
            Packet::PubComp(r) => self.done_out(r, Stage::PubComp)?,
            Packet::PubRel(r) => {
                self.carry.incoming_qos2.remove(&r.packet_id);
                acks.push(Packet::PubComp(PubResp::ok(r.packet_id)), Commit::done(Ok(())));
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
            Packet::PingResp | Packet::UnsubAck(_) => {}
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
                let outcome = self.vhost.publish(&exchange, m, now).map_err(|e| LinkError::Local(e.to_string()))?;
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
                acks.push(Packet::PubRec(PubResp::ok(pid)), commit);
            }
        }
        Ok(())
    }
}

/// Why the writer stopped.
fn writer_ended(ended: Result<std::io::Result<()>, tokio::task::JoinError>) -> LinkError {
    match ended {
        Ok(Err(e)) => LinkError::Io(e),
        Ok(Ok(())) => LinkError::Closed,
        Err(e) => LinkError::Protocol(format!("writer task failed: {e}")),
    }
}

/// Writes what the connection hands over, coalescing what is queued into one write.
async fn write_loop(
    mut writer: impl AsyncWrite + Unpin,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        buf.extend_from_slice(&first);
        while let Ok(more) = rx.try_recv() {
            buf.extend_from_slice(&more);
        }
        writer.write_all(&buf).await?;
        buf.clear();
    }
    let _ = writer.shutdown().await;
    Ok(())
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
    fn packet_ids_skip_those_in_flight_and_zero() {
        let mut c = Carry { next_pid: u16::MAX - 1, ..Carry::default() };
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: Str::from("t"),
            packet_id: Some(1),
            properties: Properties::default(),
            payload: Bytes::new(),
        };
        c.inflight.push_back(OutFlight { pid: 1, seq: 1, publish: p, stage: Stage::PubAck });
        assert_eq!(c.next_pid(), u16::MAX);
        assert_eq!(c.next_pid(), 2, "0 is not a packet id and 1 is in flight");
    }

    #[test]
    fn refusals_are_named() {
        assert_eq!(refusal(ProtocolVersion::V311, 4), "bad user name or password (CONNACK 0x04)");
        assert_eq!(refusal(ProtocolVersion::V5, 0x87), "not authorized (CONNACK 0x87)");
    }
}

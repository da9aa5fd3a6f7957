//! One shovel's task: connect to the remote AMQP broker, set up the channel, move messages,
//! back off, connect again.
//!
//! `out` (local source): the local queue is consumed for the task's whole life with a prefetch
//! window; its deliveries wait in an outbox while the link is down. Each one is published to
//! the remote and, in `on-confirm` mode, stays unacked locally until the remote's publisher
//! confirm (basic.ack) for it arrives; what was sent and not confirmed when a connection ends
//! goes again, first and in order, on the next one. A basic.nack ends the connection: the
//! message goes again after the back-off.
//!
//! `in` (remote source): the remote queue is consumed with `prefetch`; each delivery is
//! published into the local vhost and acked to the remote only once the local store has
//! committed it (in order, `ferry_core::flow::AckQueue`). Unacked deliveries go back to the
//! remote queue when a connection ends.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ferry_amqp::codec::{
    BasicConsume, BasicQos, ConfirmSelect, FrameDecoder, Method, QueueBind, QueueDeclare as AmqpQueueDeclare,
};
use ferry_core::connections::{ConnectionInfo, Connections, Login};
use ferry_core::flow::AckQueue;
use ferry_core::frontend::Shutdown;
use ferry_core::message::{
    now_millis, ConnectionId, FieldTable, FieldValue, Message, Origin, Properties, Protocol, ShortString,
};
use ferry_core::queue::{ConsumerId, ConsumerSpec, Delivery, OwnerId, Queue};
use ferry_core::sink::Outbox;
use ferry_core::store::Commit;
use ferry_core::vhost::VHost;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::client::{Client, ClientError, ClientParams, Event, Incoming};
use super::config::{AckMode, ShovelConfig, ShovelDirection, Source};
use crate::backoff::Backoff;
use crate::link::HOPS;
use crate::status::{BridgeStatus, Counters, LinkState, StateCell};

/// RabbitMQ's header listing the shovels a message went through.
pub const SHOVELLED: &str = "x-shovelled";

/// RabbitMQ's header with the time a message was shovelled (`dest-add-timestamp-header`).
pub const SHOVELLED_TIMESTAMP: &str = "x-shovelled-timestamp";

/// Federation's header listing the upstreams a message was received from (added by `in`
/// shovels with `add_forward_headers`).
pub const RECEIVED_FROM: &str = "x-received-from";

/// Why a shovel's connection ended (logged once, and the status's last error).
#[derive(Debug, thiserror::Error)]
pub enum ShovelError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no AMQP handshake within {0:?}")]
    ConnectTimeout(Duration),
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
    #[error("the remote closed the connection during login: user name or password refused?")]
    LoginClosed,
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("closed from the connection registry: {0}")]
    ClosedLocally(String),
    #[error("nothing heard from the remote for {0:?} (heartbeat)")]
    Heartbeat(Duration),
    #[error("the remote refused a message (basic.nack); it goes again after the back-off")]
    Nacked,
    #[error("the remote cancelled the shovel's consumer (its queue was deleted?)")]
    Cancelled,
    #[error("local broker refused a shovelled message: {0}")]
    Local(String),
    #[error("local store failed: {0}")]
    Store(String),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A shovel as the status API and its task see it.
#[derive(Debug)]
pub(crate) struct Shovel {
    /// Owns what its consumer takes from the local queue ([`Shovel::release`]).
    pub owner: OwnerId,
    pub config: ShovelConfig,
    /// Its connection id in the core: the origin of what it publishes locally.
    pub id: ConnectionId,
    pub connections: Arc<Connections>,
    /// The local source queue (`out` shovels).
    pub queue: Option<Arc<Queue>>,
    pub state: StateCell,
    pub counters: Counters,
    pub changes: watch::Sender<u64>,
    /// Set when the shovel has done what `src-delete-after` asked and stopped.
    pub finished: watch::Sender<bool>,
    /// Which URI of the remote's list it connects to, or last did ([`ShovelConfig::remote_at`]).
    pub current: std::sync::atomic::AtomicUsize,
}

/// Sent to the remote, its confirm awaited.
#[derive(Debug)]
struct Flight {
    remote_seq: u64,
    delivery: Delivery,
    /// The remote refused it (basic.nack): it goes again on the next connection.
    nacked: bool,
}

/// After a basic.nack, how long the confirms of what was sent before it are awaited before the
/// connection is ended anyway.
const NACK_WAIT: Duration = Duration::from_secs(5);

/// What outlives one connection.
#[derive(Debug, Default)]
struct Carry {
    /// Taken from the outbox and not sent yet, in order (resends first).
    pending: VecDeque<Delivery>,
    /// Sent and not confirmed, in send order.
    inflight: VecDeque<Flight>,
    /// `src-delete-after`: messages to take from the source in all (`None`: no end).
    limit: Option<u64>,
    /// Messages taken from the source so far (counted against `limit`). What the consumer
    /// delivers past it is left unacked, and handed back to the queue when the shovel stops.
    taken: u64,
    /// From a remote source: messages acknowledged to it (or delivered without acks). At each
    /// connection `taken` starts again from here: what was taken and not acknowledged, the
    /// remote delivers again.
    settled: u64,
}

impl Carry {
    /// Whether `src-delete-after`'s count is taken and settled.
    fn done(&self) -> bool {
        self.limit.is_some_and(|l| self.taken >= l) && self.pending.is_empty() && self.inflight.is_empty()
    }
}

/// The hop count in a message's headers (0 without one).
pub(crate) fn hops_of(p: &Properties) -> u32 {
    match p.header(HOPS) {
        Some(FieldValue::LongString(b)) | Some(FieldValue::Bytes(b)) => {
            std::str::from_utf8(b).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
        }
        Some(v) => v.as_i64().and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
        None => 0,
    }
}

fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("ferry@{}", if host.is_empty() { "localhost" } else { host })
}

impl Shovel {
    /// Hands what the stopped shovel took and the remote had not confirmed back to its source
    /// queue, in order and marked redelivered (a dynamic shovel changed, restarted or deleted).
    /// Not at the server's shutdown: the store keeps them unacked for the next start.
    pub(crate) fn release(&self, vhost: &VHost) {
        if let Some(queue) = &self.queue {
            let now = now_millis();
            vhost.settle(queue, queue.release_owner(self.owner, now), now);
        }
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The URI of the remote's list it connects to, or last did.
    fn remote(&self) -> &super::AmqpUri {
        self.config.remote_at(self.current.load(Ordering::Relaxed)).0
    }

    pub(crate) fn status(&self) -> BridgeStatus {
        let remote = self.remote().to_string();
        crate::status::snapshot(&self.config.name, remote, &self.state, self.queue.as_ref(), &self.counters)
    }

    pub(crate) async fn wait_for(&self, pred: impl Fn(&BridgeStatus) -> bool) -> Option<BridgeStatus> {
        let mut states = self.state.subscribe();
        let mut changes = self.changes.subscribe();
        loop {
            let status = self.status();
            if pred(&status) {
                return Some(status);
            }
            tokio::select! {
                r = states.changed() => r.ok()?,
                r = changes.changed() => r.ok()?,
            }
        }
    }

    /// Runs the shovel until `shutdown`.
    pub(crate) async fn run(self: Arc<Self>, vhost: Arc<VHost>, mut shutdown: Shutdown, seed: u64) {
        let name = self.config.name.clone();
        let window = u32::from(self.config.prefetch.max(1));
        let outbox = Arc::new(Outbox::new(window as usize + 1));
        let consumer = match &self.queue {
            Some(q) => {
                let spec = ConsumerSpec {
                    tag: ShortString::from(format!("shovel-{name}")),
                    owner: self.owner,
                    connection: self.id,
                    prefetch: window,
                    no_ack: false,
                    exclusive: false,
                    priority: 0,
                    sink: outbox.clone(),
                };
                match vhost.consume(q.name(), spec, now_millis()) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        warn!(shovel = %name, "shovel {name}: cannot consume its local queue: {e}");
                        self.state.set(LinkState::Stopped, Some(format!("cannot consume the local queue: {e}")));
                        return;
                    }
                }
            }
            None => None,
        };
        let limit = match (self.config.delete_after, &consumer) {
            (Some(super::config::DeleteAfter::Messages(n)), _) => Some(n),
            (Some(super::config::DeleteAfter::QueueLength), Some((q, _))) => {
                let st = q.stats();
                Some(u64::from(st.ready) + u64::from(st.unacked))
            }
            _ => None,
        };
        let mut carry = Carry { limit, ..Carry::default() };
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max, seed);
        let node = node_name();
        // Which URI of the remote's list: any at first, another after a failure.
        let mut rng = seed | 1;
        let mut failed = None;
        loop {
            if carry.done() {
                break;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let at = self.config.pick_remote(rng, failed);
            self.current.store(at, Ordering::Relaxed);
            if failed.is_none() || self.config.remote_count() > 1 {
                info!(shovel = %name, "shovel {name}: connecting to {}", self.remote());
            }
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            self.state.set(LinkState::Connecting, None);
            // What was sent and not confirmed goes again first, in order.
            while let Some(f) = carry.inflight.pop_back() {
                carry.pending.push_front(f.delivery);
            }
            let mut conn = Conn {
                shovel: &self,
                vhost: &vhost,
                outbox: &outbox,
                consumer: &consumer,
                carry: &mut carry,
                node: &node,
                nack_deadline: None,
                cluster: None,
            };
            let ended = conn.serve(&mut shutdown, &mut backoff).await;
            match ended {
                Ok(()) => break,
                Err(e) if shutdown.is_shutting_down() => {
                    info!(shovel = %name, "shovel {name}: stopped ({e})");
                    break;
                }
                Err(e) => {
                    failed = Some(at);
                    let delay = backoff.next_delay();
                    warn!(
                        shovel = %name,
                        "shovel {name} to {}: {e}; reconnecting in {:.1} s",
                        self.remote(),
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
        if carry.done() {
            let n = carry.taken;
            info!(shovel = %name, "shovel {name}: done after {n} message(s) (src-delete-after)");
            if let Some((queue, consumer)) = &consumer {
                vhost.cancel(queue, *consumer, now_millis());
            }
            self.state.set(LinkState::Stopped, Some(format!("done after {n} message(s) (src-delete-after)")));
            let _ = self.finished.send(true);
            return;
        }
        if let Some((queue, consumer)) = &consumer {
            // The consumer's unacked messages stay with its owner (as after basic.cancel): at
            // the server's shutdown the store keeps them for the next start; a shovel stopped
            // on its own (changed, deleted) is released by whoever stopped it (`release`).
            vhost.cancel(queue, *consumer, now_millis());
        }
        self.state.set(LinkState::Stopped, None);
    }

    /// Acks local messages the remote has taken (or that are not to be sent) in one turn of the
    /// queue (`Queue::ack_all`, as the MQTT bridge's link does): one lock, one pump, and their
    /// store deletes submitted together.
    fn settle_local(&self, vhost: &VHost, consumer: &Option<(Arc<Queue>, ConsumerId)>, seqs: &[u64]) {
        let Some((queue, _)) = consumer else { return };
        if seqs.is_empty() {
            return;
        }
        let now = now_millis();
        let (effects, failed) = queue.ack_all(seqs, now);
        for (seq, e) in failed {
            warn!(shovel = %self.config.name, "shovel {}: ack of local message {seq}: {e}", self.config.name)
        }
        vhost.settle(queue, effects, now);
    }

    /// RabbitMQ's `x-shovelled` entry for this shovel.
    fn shovelled_entry(&self, node: &str) -> FieldValue {
        let c = &self.config;
        let (src_uri, dest_uri) = c.uris_at(self.current.load(Ordering::Relaxed));
        let mut t = FieldTable::new();
        t.insert("shovel-name", FieldValue::string(&c.name));
        t.insert("shovel-type", FieldValue::string(if c.dynamic.is_some() { "dynamic" } else { "static" }));
        t.insert("shovel-vhost", FieldValue::string(c.dynamic.as_deref().unwrap_or(&c.vhost)));
        t.insert("shovelled-by", FieldValue::string(node));
        t.insert("src-uri", FieldValue::string(&src_uri));
        match &c.source {
            Source::Queue(q) => t.insert("src-queue", FieldValue::string(q)),
            Source::Exchange { exchange, key } => {
                t.insert("src-exchange", FieldValue::string(exchange));
                t.insert("src-exchange-key", FieldValue::string(key));
            }
        }
        t.insert("dest-uri", FieldValue::string(&dest_uri));
        match &c.destination {
            super::config::Destination::Queue(q) => t.insert("dest-queue", FieldValue::string(q)),
            super::config::Destination::Exchange { exchange, key } => {
                t.insert("dest-exchange", FieldValue::string(exchange));
                if let Some(k) = key {
                    t.insert("dest-exchange-key", FieldValue::string(k));
                }
            }
            super::config::Destination::AsPublished => {}
        }
        FieldValue::Table(t)
    }

    /// The properties a message crosses with: the hop count raised, `x-shovelled` added when
    /// asked for, `dest-publish-properties` laid over; everything else as it was.
    fn crossing(&self, mut p: Properties, hops: u32, node: &str, received_from: Option<FieldValue>) -> Properties {
        let headers = p.headers.get_or_insert_with(FieldTable::new);
        headers.insert(HOPS, FieldValue::I64(i64::from(hops) + 1));
        if let (true, Some(entry)) = (self.config.add_forward_headers, received_from) {
            let mut list = match headers.remove(RECEIVED_FROM) {
                Some(FieldValue::Array(a)) => a,
                _ => Vec::new(),
            };
            list.push(entry);
            headers.insert(RECEIVED_FROM, FieldValue::Array(list));
        }
        if self.config.add_forward_headers {
            let entry = self.shovelled_entry(node);
            let mut list = match headers.remove(SHOVELLED) {
                Some(FieldValue::Array(a)) => a,
                _ => Vec::new(),
            };
            list.push(entry);
            headers.insert(SHOVELLED, FieldValue::Array(list));
        }
        if self.config.add_timestamp_header {
            // RabbitMQ's shovel stamps seconds since the epoch (rabbit_amqp091_shovel.erl,
            // `add_timestamp_header`).
            headers.insert(SHOVELLED_TIMESTAMP, FieldValue::I64((now_millis() / 1000) as i64));
        }
        if let Some(over) = &self.config.publish_properties {
            super::args::overlay(&mut p, over);
        }
        p
    }
}

struct Conn<'a> {
    shovel: &'a Arc<Shovel>,
    vhost: &'a Arc<VHost>,
    outbox: &'a Arc<Outbox<Delivery>>,
    consumer: &'a Option<(Arc<Queue>, ConsumerId)>,
    carry: &'a mut Carry,
    node: &'a str,
    /// Set by a basic.nack: the connection ends once every message sent is confirmed or
    /// refused, or at this instant.
    nack_deadline: Option<Instant>,
    /// The remote's `cluster_name` (from connection.start), for `x-received-from`.
    cluster: Option<String>,
}

/// The socket and what was read but not yet decoded.
struct Wire {
    stream: Box<dyn Stream>,
    rx: BytesMut,
    peer: std::net::SocketAddr,
    local: std::net::SocketAddr,
    sent: u64,
    received: u64,
}

impl Wire {
    async fn write(&mut self, out: &mut BytesMut) -> Result<(), ShovelError> {
        if !out.is_empty() {
            self.stream.write_all(out).await.map_err(ShovelError::Io)?;
            self.sent += out.len() as u64;
            out.clear();
        }
        Ok(())
    }

    /// Reads until `client` has something to say; returns the events.
    async fn events(&mut self, client: &mut Client, out: &mut BytesMut) -> Result<Vec<Event>, ShovelError> {
        let mut events = Vec::new();
        loop {
            let decoder: FrameDecoder = client.decoder();
            while let Some(frame) = decoder.decode(&mut self.rx).map_err(|e| ClientError::Frame(e.to_string()))? {
                client.handle(frame, out, &mut events)?;
            }
            self.write(out).await?;
            if !events.is_empty() {
                return Ok(events);
            }
            match self.stream.read_buf(&mut self.rx).await {
                Ok(0) if client.in_login() => return Err(ShovelError::LoginClosed),
                Ok(0) => return Err(ShovelError::Closed),
                Ok(n) => self.received += n as u64,
                Err(e) => return Err(ShovelError::Io(e)),
            }
        }
    }

    /// Sends a set-up method and waits for its reply; deliveries that come with it are kept.
    async fn call(
        &mut self,
        client: &mut Client,
        method: Method,
        early: &mut Vec<Event>,
    ) -> Result<Method, ShovelError> {
        let mut out = BytesMut::new();
        client.call(method, &mut out)?;
        self.write(&mut out).await?;
        loop {
            let mut reply = None;
            for e in self.events(client, &mut out).await? {
                match e {
                    Event::Reply(m) if reply.is_none() => reply = Some(m),
                    other => early.push(other),
                }
            }
            if let Some(m) = reply {
                return Ok(m);
            }
        }
    }

    /// [`Wire::call`] for a passive declare ([`Client::probe`]): `Some(reply)` when the object
    /// exists, `None` when the remote said 404 (once the channel is open again).
    async fn probe(
        &mut self,
        client: &mut Client,
        method: Method,
        early: &mut Vec<Event>,
    ) -> Result<Option<Method>, ShovelError> {
        let mut out = BytesMut::new();
        client.probe(method, &mut out)?;
        self.write(&mut out).await?;
        let (mut missing, mut reopened, mut reply) = (false, false, None);
        loop {
            for e in self.events(client, &mut out).await? {
                match e {
                    Event::Reply(m) if !missing && reply.is_none() => reply = Some(m),
                    Event::NotFound => missing = true,
                    Event::Ready if missing => reopened = true,
                    other => early.push(other),
                }
            }
            if reply.is_some() || reopened {
                return Ok(reply);
            }
        }
    }
}

/// A shovel's named queue on the remote, as RabbitMQ's shovels have it: looked up (a passive
/// declare) and, when it is not there, declared durable with `arguments` (`src-queue-args` /
/// `dest-queue-args`) — unless the shovel says it is `predeclared`, when a missing queue is the
/// remote's 404 and the link backs off. An existing queue is taken as it is, whatever its
/// arguments (RabbitMQ 3.10 declared it again and failed on a queue with other arguments;
/// RabbitMQ 4 looks first, as this does).
async fn remote_queue(
    wire: &mut Wire,
    client: &mut Client,
    queue: &str,
    predeclared: bool,
    arguments: &FieldTable,
    early: &mut Vec<Event>,
) -> Result<Option<u32>, ShovelError> {
    let name = ShortString::from(queue);
    let check = AmqpQueueDeclare { queue: name.clone(), passive: true, ..Default::default() };
    let count = |m: Method| match m {
        Method::QueueDeclareOk(ok) => Some(ok.message_count),
        _ => None,
    };
    if predeclared {
        // A queue that is not there would make every message unroutable (and confirmed):
        // refuse instead, the remote names the problem (404).
        return Ok(count(wire.call(client, Method::QueueDeclare(check), early).await?));
    }
    match wire.probe(client, Method::QueueDeclare(check), early).await? {
        Some(m) => Ok(count(m)),
        None => {
            let declare =
                AmqpQueueDeclare { queue: name, durable: true, arguments: arguments.clone(), ..Default::default() };
            Ok(count(wire.call(client, Method::QueueDeclare(declare), early).await?))
        }
    }
}

impl Conn<'_> {
    fn config(&self) -> &ShovelConfig {
        &self.shovel.config
    }

    /// TCP (and TLS) connect and the AMQP handshake up to an open channel.
    async fn connect(&self) -> Result<(Wire, Client), ShovelError> {
        let config = self.config();
        let (remote, password) = config.remote_at(self.shovel.current.load(Ordering::Relaxed));
        let tls = match &config.tls {
            Some(t) => Some((crate::tls::client_config(t)?, super::server_name_for(config, remote)?)),
            None => None,
        };
        let password = match password {
            Some(source) => source.read()?,
            None if remote.user.is_none() => b"guest".to_vec(),
            None => Vec::new(),
        };
        let tcp = TcpStream::connect(remote.address()).await.map_err(ShovelError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let peer = tcp.peer_addr().map_err(ShovelError::Connect)?;
        let local = tcp.local_addr().map_err(ShovelError::Connect)?;
        let stream: Box<dyn Stream> = match tls {
            Some((client, name)) => {
                Box::new(tokio_rustls::TlsConnector::from(client).connect(name, tcp).await.map_err(ShovelError::Tls)?)
            }
            None => Box::new(tcp),
        };
        let mut wire = Wire { stream, rx: BytesMut::with_capacity(16 * 1024), peer, local, sent: 0, received: 0 };
        let mut client = Client::new(ClientParams {
            user: remote.user.clone().unwrap_or_else(|| "guest".to_string()),
            password,
            vhost: remote.vhost.clone(),
            heartbeat: config.heartbeat,
            connection_name: format!("Ferry shovel {}", config.name),
            mechanisms: config.auth_mechanisms.clone(),
            frame_max: config.frame_max,
        });
        let mut out = BytesMut::new();
        client.start(&mut out);
        wire.write(&mut out).await?;
        loop {
            let events = wire.events(&mut client, &mut out).await?;
            if events.contains(&Event::Ready) {
                return Ok((wire, client));
            }
        }
    }

    /// The channel set-up: confirms for an `out` shovel; qos, the source queue and the
    /// consumer for an `in` one. Returns deliveries that arrived with the last reply, and the
    /// messages the remote source queue held (for `src-delete-after` `queue-length`).
    async fn set_up(&self, wire: &mut Wire, client: &mut Client) -> Result<(Vec<Event>, Option<u32>), ShovelError> {
        let config = self.config();
        let mut early = Vec::new();
        let mut held = None;
        match config.direction {
            ShovelDirection::Out => {
                if let super::config::Destination::Queue(q) = &config.destination {
                    remote_queue(wire, client, q, config.dest_predeclared, &config.dest_queue_args, &mut early).await?;
                }
                if config.ack_mode == AckMode::OnConfirm {
                    wire.call(client, Method::ConfirmSelect(ConfirmSelect::default()), &mut early).await?;
                }
            }
            ShovelDirection::In => {
                if config.ack_mode != AckMode::NoAck {
                    let qos = BasicQos { prefetch_size: 0, prefetch_count: config.prefetch, global: false };
                    wire.call(client, Method::BasicQos(qos), &mut early).await?;
                }
                let queue = match &config.source {
                    Source::Queue(q) => {
                        held =
                            remote_queue(wire, client, q, config.src_predeclared, &config.src_queue_args, &mut early)
                                .await?;
                        ShortString::from(q.as_str())
                    }
                    Source::Exchange { exchange, key } => {
                        let decl = AmqpQueueDeclare { exclusive: true, auto_delete: true, ..Default::default() };
                        let Method::QueueDeclareOk(ok) =
                            wire.call(client, Method::QueueDeclare(decl), &mut early).await?
                        else {
                            return Err(
                                ClientError::Protocol("queue.declare answered with another method".into()).into()
                            );
                        };
                        let bind = QueueBind {
                            queue: ok.queue.clone(),
                            exchange: ShortString::from(exchange.as_str()),
                            routing_key: ShortString::from(key.as_str()),
                            ..Default::default()
                        };
                        wire.call(client, Method::QueueBind(bind), &mut early).await?;
                        ok.queue
                    }
                };
                let consume = BasicConsume {
                    queue,
                    consumer_tag: ShortString::from(format!("ferry-shovel-{}", config.name)),
                    no_ack: config.ack_mode == AckMode::NoAck,
                    ..Default::default()
                };
                wire.call(client, Method::BasicConsume(consume), &mut early).await?;
            }
        }
        Ok((early, held))
    }

    async fn serve(&mut self, shutdown: &mut Shutdown, backoff: &mut Backoff) -> Result<(), ShovelError> {
        let config = self.config().clone();
        let name = config.name.as_str();
        let timeout = config.connect_timeout;
        let connected = tokio::select! {
            r = tokio::time::timeout(timeout, async {
                let (mut wire, mut client) = self.connect().await?;
                let early = self.set_up(&mut wire, &mut client).await?;
                Ok::<_, ShovelError>((wire, client, early))
            }) => r,
            _ = shutdown.wait() => return Ok(()),
        };
        let (wire, mut client, (early, held)) = connected.map_err(|_| ShovelError::ConnectTimeout(timeout))??;
        if config.direction == ShovelDirection::In {
            // What was taken and not acknowledged comes again from the remote.
            self.carry.taken = self.carry.settled;
            if config.delete_after == Some(super::config::DeleteAfter::QueueLength) && self.carry.limit.is_none() {
                // As many as the source queue held when the shovel first connected.
                self.carry.limit = Some(u64::from(held.unwrap_or(0)));
            }
        }
        self.cluster = client.server_property("cluster_name");
        let handle = self.shovel.connections.register(ConnectionInfo {
            id: self.shovel.id,
            protocol: Protocol::Amqp,
            version: "0-9-1",
            peer: wire.peer,
            local: wire.local,
            listener: None,
            tls: None,
            connected_at: now_millis(),
        });
        handle.set_login(Login {
            user: self.shovel.remote().user.clone().unwrap_or_else(|| "guest".into()),
            vhost: config.vhost.clone(),
            client_id: Some(format!("shovel {name}")),
        });
        handle.counters.add_bytes_out(wire.sent);
        handle.counters.add_bytes_in(wire.received);
        let counters = &self.shovel.counters;
        let (in_at_start, out_at_start) =
            (counters.forwarded_in.load(Ordering::Relaxed), counters.forwarded_out.load(Ordering::Relaxed));
        counters.connects.fetch_add(1, Ordering::Relaxed);
        backoff.reset();
        let (src_uri, dest_uri) = config.uris_at(self.shovel.current.load(Ordering::Relaxed));
        let source = match &config.source {
            Source::Queue(q) => format!("queue {q}"),
            Source::Exchange { exchange, key } => format!("exchange {exchange} ({key})"),
        };
        info!(
            shovel = %name,
            "shovel {name}: up, connected to {} ({}): {src_uri} {source} → {dest_uri}, ack mode {}",
            self.shovel.remote(),
            client.server_product(),
            config.ack_mode.as_str()
        );
        self.shovel.state.set(LinkState::Up, None);

        let Wire { stream, mut rx, .. } = wire;
        let (mut reader, writer) = tokio::io::split(stream);
        let (tx, unwritten, mut write_task) = crate::writer::spawn(writer);
        let mut out = BytesMut::new();
        let mut acks: AckQueue<u64> = AckQueue::new();
        for e in early {
            self.on_event(e, &mut client, &mut acks)?;
        }
        let heartbeat = Duration::from_secs(u64::from(client.heartbeat()));
        let far = Duration::from_secs(86_400 * 365);
        let mut last_sent = Instant::now();
        let mut last_heard = Instant::now();
        let window = usize::from(config.prefetch.max(1));
        let mut events = Vec::new();
        loop {
            let published = self.pump_out(window, &unwritten, &mut client, &mut out)?;
            let moved = !published.is_empty() || !out.is_empty();
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
            // on-publish: settled once handed to the writer.
            self.shovel.settle_local(self.vhost, self.consumer, &published);
            counters.forwarded_out.fetch_add(published.len() as u64, Ordering::Relaxed);
            if moved {
                self.shovel.changed();
            }
            if self.carry.done() && acks.is_empty() {
                // src-delete-after's count is confirmed (from a remote source: acknowledged to
                // it): close the connection and stop. What the remote delivered past the count
                // goes back to its queue with the channel.
                let _ = client.close(&mut out);
                let _ = tx.send(out.split().freeze());
                drop(tx);
                let _ = tokio::time::timeout(Duration::from_secs(1), write_task).await;
                return Ok(());
            }
            let beat_at = if heartbeat.is_zero() { last_sent + far } else { last_sent + heartbeat / 2 };
            let dead_at = if heartbeat.is_zero() { last_heard + far } else { last_heard + heartbeat * 2 };
            tokio::select! {
                read = reader.read_buf(&mut rx) => {
                    match read {
                        Ok(0) => return Err(ShovelError::Closed),
                        Ok(n) => handle.counters.add_bytes_in(n as u64),
                        Err(e) => return Err(ShovelError::Io(e)),
                    }
                    last_heard = Instant::now();
                    let decoder = client.decoder();
                    let decoded = loop {
                        match decoder.decode(&mut rx) {
                            Ok(Some(frame)) => {
                                if let Err(e) = client.handle(frame, &mut out, &mut events) {
                                    break Err(ShovelError::from(e));
                                }
                            }
                            Ok(None) => break Ok(()),
                            Err(e) => break Err(ClientError::Frame(e.to_string()).into()),
                        }
                    };
                    if let Err(e) = decoded {
                        // A close-ok the client wrote goes out before the socket is dropped.
                        if !out.is_empty() {
                            let _ = tx.send(out.split().freeze());
                            drop(tx);
                            let _ = tokio::time::timeout(Duration::from_secs(1), write_task).await;
                        }
                        return Err(e);
                    }
                    for e in events.drain(..) {
                        self.on_event(e, &mut client, &mut acks)?;
                    }
                    self.shovel.changed();
                    if self.nack_deadline.is_some() && self.carry.inflight.iter().all(|f| f.nacked) {
                        return Err(ShovelError::Nacked);
                    }
                }
                _ = self.outbox.notified() => {}
                _ = unwritten.drained(), if unwritten.is_full() => {}
                _ = acks.ready(), if !acks.is_empty() => {
                    let mut last = None;
                    while let Some((tag, result)) = acks.take_ready() {
                        // Unacked, the remote delivers it again after the reconnect.
                        result.map_err(|e| ShovelError::Store(e.to_string()))?;
                        last = Some(tag);
                        self.carry.settled += 1;
                    }
                    if let Some(tag) = last {
                        client.ack(tag, true, &mut out)?;
                    }
                }
                _ = tokio::time::sleep_until(beat_at) => {
                    client.heartbeat_frame(&mut out);
                }
                _ = tokio::time::sleep_until(dead_at) => return Err(ShovelError::Heartbeat(heartbeat * 2)),
                _ = tokio::time::sleep_until(self.nack_deadline.unwrap_or(dead_at)), if self.nack_deadline.is_some() => {
                    return Err(ShovelError::Nacked);
                }
                ended = &mut write_task => return Err(writer_ended(ended)),
                reason = handle.entry().closed() => return Err(ShovelError::ClosedLocally(reason.to_string())),
                _ = shutdown.wait() => {
                    // Deliveries already published locally are acked once committed (within a
                    // second), so that the remote does not deliver them again after a restart.
                    let mut bye = BytesMut::new();
                    let drain = async {
                        while !acks.is_empty() {
                            acks.ready().await;
                            let mut last = None;
                            while let Some((tag, result)) = acks.take_ready() {
                                if result.is_err() {
                                    return last;
                                }
                                last = Some(tag);
                            }
                            if let Some(tag) = last {
                                let _ = client.ack(tag, true, &mut bye);
                            }
                        }
                        None
                    };
                    if let Ok(Some(tag)) = tokio::time::timeout(Duration::from_secs(1), drain).await {
                        let _ = client.ack(tag, true, &mut bye);
                    }
                    let _ = client.close(&mut bye);
                    let _ = tx.send(bye.freeze());
                    drop(tx);
                    let _ = tokio::time::timeout(Duration::from_secs(1), write_task).await;
                    info!(shovel = %name, "shovel {name}: disconnected (shutdown)");
                    return Ok(());
                }
            }
        }
    }

    fn on_event(&mut self, event: Event, client: &mut Client, acks: &mut AckQueue<u64>) -> Result<(), ShovelError> {
        let shovel = self.shovel.clone();
        let name = &shovel.config.name;
        match event {
            Event::Delivery(d) => self.on_delivery(*d, acks)?,
            Event::Confirm { tag, multiple, ack } => {
                let confirmed = |f: &Flight| if multiple { f.remote_seq <= tag } else { f.remote_seq == tag };
                if !ack {
                    // Nothing more is sent; the confirms of what went before are awaited (a
                    // remote may nack at once and ack persistent messages after its fsync),
                    // then the connection ends and the refused messages go again, in order.
                    let mut n = 0;
                    for f in self.carry.inflight.iter_mut().filter(|f| !f.nacked && confirmed(f)) {
                        f.nacked = true;
                        n += 1;
                    }
                    shovel.counters.nacked.fetch_add(n, Ordering::Relaxed);
                    self.nack_deadline.get_or_insert(Instant::now() + NACK_WAIT);
                    return Ok(());
                }
                let mut settled = Vec::new();
                while let Some(i) = self.carry.inflight.iter().position(|f| !f.nacked && confirmed(f)) {
                    let f = self.carry.inflight.remove(i).expect("found");
                    settled.push(f.delivery.seq);
                }
                shovel.counters.forwarded_out.fetch_add(settled.len() as u64, Ordering::Relaxed);
                shovel.settle_local(self.vhost, self.consumer, &settled);
            }
            Event::Blocked(Some(reason)) => {
                warn!(shovel = %name, "shovel {name}: the remote blocks publishing ({reason})");
            }
            Event::Blocked(None) => info!(shovel = %name, "shovel {name}: the remote takes publishes again"),
            Event::Cancelled => return Err(ShovelError::Cancelled),
            Event::Ready | Event::Reply(_) | Event::Closed | Event::NotFound => {}
        }
        let _ = client;
        Ok(())
    }

    /// Federation's `x-received-from` entry for a delivery from the remote.
    fn received_from(&self, d: &Incoming) -> FieldValue {
        let mut t = FieldTable::new();
        t.insert("uri", FieldValue::string(&self.shovel.remote().to_string()));
        t.insert("exchange", FieldValue::LongString(d.exchange.bytes().clone()));
        t.insert("redelivered", FieldValue::Bool(d.redelivered));
        if let Some(cluster) = &self.cluster {
            t.insert("cluster-name", FieldValue::string(cluster));
        }
        FieldValue::Table(t)
    }

    /// A message from the remote: published into the local vhost; acked per the ack mode.
    fn on_delivery(&mut self, d: Incoming, acks: &mut AckQueue<u64>) -> Result<(), ShovelError> {
        let shovel = self.shovel.clone();
        let config = &shovel.config;
        if self.carry.limit.is_some_and(|l| self.carry.taken >= l) && config.ack_mode != AckMode::NoAck {
            // Past src-delete-after's count: left unacknowledged, it goes back to the remote's
            // queue when the shovel closes its channel. (Without acks the remote counts it
            // delivered already: it is published rather than lost.)
            return Ok(());
        }
        self.carry.taken += 1;
        if config.ack_mode == AckMode::NoAck {
            self.carry.settled += 1;
        }
        let hops = hops_of(&d.properties);
        let commit = if hops >= config.max_hops {
            shovel.counters.dropped_max_hops.fetch_add(1, Ordering::Relaxed);
            Commit::done(Ok(()))
        } else {
            let now = now_millis();
            let (exchange, key) = config.destination.route_bytes(&d.exchange, &d.routing_key);
            let received_from = self.received_from(&d);
            let message = Message {
                exchange: exchange.clone(),
                routing_key: key,
                properties: shovel.crossing(d.properties, hops, self.node, Some(received_from)),
                payload: d.body,
                origin: Origin { protocol: Protocol::Amqp, connection: shovel.id },
                published_at: now,
            };
            // on-confirm acks the remote after the local commit: a local `x-overflow = block`
            // queue at its limit holds that ack (and so the remote's prefetch window).
            let waits = config.ack_mode == AckMode::OnConfirm;
            let outcome = self
                .vhost
                .publish_waiting(&exchange, message, now, waits)
                .map_err(|e| ShovelError::Local(e.to_string()))?;
            if outcome.rejected {
                return Err(ShovelError::Local("a local queue is full (x-overflow reject-publish)".into()));
            }
            shovel.counters.forwarded_in.fetch_add(1, Ordering::Relaxed);
            match config.ack_mode {
                AckMode::OnConfirm => outcome.commit,
                _ => Commit::done(Ok(())),
            }
        };
        if config.ack_mode != AckMode::NoAck {
            acks.push(d.delivery_tag, commit);
        }
        Ok(())
    }

    /// Publishes what waits locally while the window has room. Returns the local sequence
    /// numbers to settle once the bytes are handed to the writer (`on-publish`).
    fn pump_out(
        &mut self,
        window: usize,
        unwritten: &crate::writer::Unwritten,
        client: &mut Client,
        out: &mut BytesMut,
    ) -> Result<Vec<u64>, ShovelError> {
        let mut after_write = Vec::new();
        if self.consumer.is_none() || self.nack_deadline.is_some() {
            return Ok(after_write);
        }
        let mut fresh = Vec::new();
        self.outbox.drain_into(&mut fresh);
        if let Some(limit) = self.carry.limit {
            // Past `src-delete-after`'s count: left unacked, handed back when the shovel stops.
            let room = usize::try_from(limit.saturating_sub(self.carry.taken)).unwrap_or(usize::MAX);
            fresh.truncate(room);
        }
        self.carry.taken += fresh.len() as u64;
        self.carry.pending.extend(fresh);
        let shovel = self.shovel.clone();
        let config = &shovel.config;
        // The window bounds what waits for confirms; the writer's backlog bounds what waits
        // for the socket (on-publish and no-ack settle before the bytes leave: without it a
        // slow remote would pull the local queue into memory).
        while self.carry.inflight.len() < window && !unwritten.is_full_with(out) {
            let Some(d) = self.carry.pending.pop_front() else { break };
            let m = &d.message;
            let hops = hops_of(&m.properties);
            let skip = if m.origin.connection == shovel.id {
                Some(&shovel.counters.dropped_loop)
            } else if hops >= config.max_hops {
                Some(&shovel.counters.dropped_max_hops)
            } else {
                None
            };
            if let Some(counter) = skip {
                counter.fetch_add(1, Ordering::Relaxed);
                shovel.settle_local(self.vhost, self.consumer, &[d.seq]);
                continue;
            }
            if config.ack_mode == AckMode::NoAck {
                // Gone from the local queue as soon as the shovel has it.
                shovel.settle_local(self.vhost, self.consumer, &[d.seq]);
            }
            let exchange = m.exchange.to_string_lossy();
            let routing_key = m.routing_key.to_string_lossy();
            let (x, key) = config.destination.route(&exchange, &routing_key);
            let properties = shovel.crossing(m.properties.clone(), hops, self.node, None);
            let seq = match client.publish(x, key, properties, &m.payload, out) {
                Ok(seq) => seq,
                Err(e) => {
                    warn!(shovel = %config.name, "shovel {}: a message cannot be sent ({e}); dropped", config.name);
                    shovel.counters.dropped_too_large.fetch_add(1, Ordering::Relaxed);
                    if config.ack_mode != AckMode::NoAck {
                        shovel.settle_local(self.vhost, self.consumer, &[d.seq]);
                    }
                    continue;
                }
            };
            match config.ack_mode {
                AckMode::OnConfirm => {
                    self.carry.inflight.push_back(Flight { remote_seq: seq, delivery: d, nacked: false })
                }
                AckMode::OnPublish => after_write.push(d.seq),
                AckMode::NoAck => {
                    shovel.counters.forwarded_out.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(after_write)
    }
}

fn writer_ended(ended: Result<std::io::Result<()>, tokio::task::JoinError>) -> ShovelError {
    match ended {
        Ok(Err(e)) => ShovelError::Io(e),
        Ok(Ok(())) => ShovelError::Closed,
        Err(e) => ShovelError::Client(ClientError::Protocol(format!("writer task failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_are_read_from_integers_and_strings() {
        let mut p = Properties::default();
        assert_eq!(hops_of(&p), 0);
        let h = p.headers.get_or_insert_with(FieldTable::new);
        h.insert(HOPS, FieldValue::I64(2));
        assert_eq!(hops_of(&p), 2);
        p.headers.as_mut().unwrap().insert(HOPS, FieldValue::string("3"));
        assert_eq!(hops_of(&p), 3);
    }
}

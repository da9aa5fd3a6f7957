//! The connection driver: one tokio task per connection. It reads with `read_buf`
//! (cancel-safe), feeds the decoder and the session, and writes everything the session produced
//! in one write per wake-up. Nothing that `select!` may drop holds state: the decoder, the
//! session and the pending commit live outside the `select!`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use ferry_core::auth::{AuthError, ANONYMOUS_USER};
use ferry_core::broker::Broker;
use ferry_core::connections::{ConnectionHandle, ConnectionInfo, Login, TlsInfo};
use ferry_core::flow::{Decode, Pause, PublisherFlow};
use ferry_core::frontend::{
    sleep_until, ClientStream, ConnectionContext, ConnectionError, ConnectionSlot, ReadSizer, Transport, READ_MAX,
    READ_MIN,
};
use ferry_core::log_limited;
use ferry_core::message::{now_millis, Millis, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tracing::{debug, info};

use ferry_core::message::ConnectionId;
use ferry_core::store::StoreOp;
use ferry_core::vhost::VHost;

use crate::codec::{Connect, DecodeError, Decoder, Packet, ProtocolVersion};
use crate::connect::{self, ClientId};
use crate::errors::MqttError;
use crate::park::{Parked, Parker};
use crate::registry::Kicked;
use crate::session::{
    publish_will, refuse, session_queue_name, Close, ParkedSession, Session, SessionStats, WillOnClose, SUBSCRIBE_SLICE,
};
use crate::session_store::encode_session;
use crate::Shared;

/// How much a connection ending for a reason of ours still reads of what its client sent (see
/// [`Conn::drain`]): a DISCONNECT after a few packets, not a backlog.
const DRAIN_MAX: usize = 64 * 1024;

fn assigned_client_id() -> String {
    // Unique per process (connection numbers never repeat) and across restarts (time).
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("ferry-{:x}-{:x}", now_millis(), N.fetch_add(1, Ordering::Relaxed))
}

/// The most write buffer a connection keeps between bursts.
const OUT_KEEP: usize = 64 * 1024;

/// Reads the CONNECT (bounded by the listener's handshake timeout), adding the bytes read to
/// `read`.
async fn read_connect(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    sizer: &mut ReadSizer,
    decoder: &mut Decoder,
    read: &mut u64,
) -> Result<Option<Connect>, DecodeError> {
    loop {
        if let Some(p) = decoder.decode(buf)? {
            return match p {
                Packet::Connect(c) => Ok(Some(*c)),
                _ => Err(DecodeError::Protocol("first packet must be CONNECT".into())),
            };
        }
        let room = sizer.prepare(buf);
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => {
                *read += n as u64;
                sizer.read(n, room);
            }
        }
    }
}

/// Serves one MQTT connection to its end.
///
/// The task's own future stays small whatever the connection does: the CONNECT and the login
/// run in a boxed future that ends when the session has started; everything the connection
/// then holds is one boxed [`Conn`]; an idle connection waits in [`Conn::poll_idle`], which
/// keeps nothing between polls; and waiting on anything else (a store commit, a congested
/// subscriber, an alarm, the publish rate) is a boxed future made for that wait. With 10,000
/// idle connections this is most of what each one costs (docs/benchmarks.md).
pub fn run(
    stream: ClientStream,
    mut ctx: ConnectionContext,
    shared: Arc<Shared>,
) -> impl Future<Output = Result<(), ConnectionError>> + Send {
    // The connection's slot under the limits stays with the connection, parked or not.
    let slot = std::mem::take(&mut ctx.slot);
    // Not an `async fn`: its arguments would stay in its state after being handed on.
    let establishing = Box::pin(establish(stream, ctx, shared));
    async move {
        let conn = match establishing.await {
            Ok(conn) => conn,
            Err(ended) => return ended,
        };
        live(conn, slot).await
    }
}

/// Serves an established connection until it ends or parks (`crate::park`).
async fn live(mut conn: Box<Conn>, slot: ConnectionSlot) -> Result<(), ConnectionError> {
    let close = loop {
        if let Some(close) = conn.serve().await {
            break close;
        }
        let Some(parker) = Shared::parker(&conn.shared, &conn.broker).cloned() else {
            conn.parkable = false;
            continue;
        };
        match conn.park(&parker, slot) {
            Ok(()) => return Ok(()),
            Err((conn, slot)) => return Box::pin(ended(conn, slot, Close::Lost)).await,
        }
    };
    Box::pin(ended(conn, slot, close)).await
}

/// The connection's end ([`Conn::end`]), in a boxed future of its own; its slot is given back
/// last.
async fn ended(conn: Box<Conn>, slot: ConnectionSlot, close: Close) -> Result<(), ConnectionError> {
    let ended = conn.end(close).await;
    drop(slot);
    ended
}

/// A parked connection's task, made when it is unparked: what its socket already holds is read
/// first (the reactor reports a socket's readiness only after it is registered again, and
/// [`Conn::drain`] looks once), then it is served as before.
pub(crate) fn resume(parked: Parked, broker: Arc<Broker>, shared: Arc<Shared>) -> impl Future<Output = ()> + Send {
    let Parked { conn, tcp, slot } = parked;
    async move {
        let mut conn = conn.resume(broker, shared);
        let mut closed = conn.read_parked(&tcp);
        match tokio::net::TcpStream::from_std(tcp) {
            Ok(tcp) => conn.stream = Box::new(tcp),
            Err(e) => {
                debug!(conn = %conn.conn.id(), error = %e, "a parked connection could not be resumed");
                closed.get_or_insert(Close::Lost);
            }
        }
        let served = match closed {
            Some(close) => Box::pin(ended(conn, slot, close)).await,
            None => live(conn, slot).await,
        };
        if let Err(e) = served {
            debug!("connection ended: {e}");
        }
    }
}

/// What a parked connection's `Conn` holds in place of its stream, which the parker keeps: no
/// allocation (a zero-sized type), and an error for anything tried with it.
struct NoStream;

impl AsyncRead for NoStream {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()))
    }
}

impl tokio::io::AsyncWrite for NoStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What a parked connection keeps of its [`Conn`] (`crate::park`): its session as a parked one
/// keeps it ([`ParkedSession`]) and what serves it again. Not its stream (the parker holds the
/// socket), its read buffer (empty at a park), the state of a read in progress, or the broker
/// and the frontend (the parker's, the same for all its connections). 120 bytes, jemalloc's
/// 128 class, where a `Conn` is the 320 (issue 18: it was 250 bytes and the 256 class with the
/// session whole, the broker and the frontend, then 152 and the 160 with the session's names and
/// the flow control; `a_parked_connection_fits_jemallocs_128_class`).
pub(crate) struct ParkedConn {
    /// With the flow control, when it is kept (a publish rate's bucket): a rare part.
    session: ParkedSession,
    conn: ConnectionHandle,
    generation: u64,
    published: bool,
    sizer: ReadSizer,
}

impl ParkedConn {
    /// The connection served again, with no stream yet ([`resume`] gives it its socket), by
    /// the frontend and broker it was served by.
    // The parker keeps the record boxed; it is taken apart here, not moved out of its box first.
    #[allow(clippy::boxed_local)]
    fn resume(self: Box<Self>, broker: Arc<Broker>, shared: Arc<Shared>) -> Box<Conn> {
        let ParkedConn { session, conn, generation, published, sizer } = *self;
        let (session, flow) = session.resume(conn.entry());
        Box::new(Conn {
            stream: Box::new(NoStream),
            broker,
            shared,
            session,
            buf: BytesMut::new(),
            sizer,
            conn,
            flow,
            published,
            undecoded: false,
            yielded: false,
            parkable: true,
            parked_before: true,
            generation,
        })
    }

    /// Registers a parked connection's waker with everything that wakes it from outside: the
    /// registry's kick and the two outboxes. `true`: one of them is ready already (a kick's
    /// reason is kept for the connection's next look; a delivery is found by its next pump).
    #[inline(never)]
    pub(crate) fn poll_parked(&self, cx: &mut Context<'_>) -> bool {
        let kicked = self.session.kick().poll_kicked(cx).is_ready();
        if kicked {
            self.session.kick().wake_again();
        }
        let sink = self.session.sink_outbox().poll_notified(cx).is_ready();
        let queue = self.session.queue_outbox().is_some_and(|o| o.poll_notified(cx).is_ready());
        kicked || sink || queue
    }
}

/// Everything a connection holds once its session has started (see [`run`]).
pub(crate) struct Conn {
    stream: Box<dyn Transport>,
    broker: Arc<Broker>,
    shared: Arc<Shared>,
    session: Session,
    buf: BytesMut,
    sizer: ReadSizer,
    /// The connection's entry in the core registry (peer, connected-since, counters); dropped
    /// with the connection, which unregisters it.
    conn: ConnectionHandle,
    // When the connection stops reading and decoding (the listener's `max_publish_rate`, one
    // token per PUBLISH; alarms; congested subscribers; acks waiting for the store): the
    // client's further packets wait in `buf` and in the kernel's buffers, so TCP slows the
    // publisher down; nothing is dropped. Deliveries to the client go on meanwhile. Our pause is
    // not the client's silence, so the keep alive deadline is held meanwhile and moves on by as
    // long (the client's packets meanwhile, PINGREQ too, wait unread and reset it once read).
    //
    // Made with the first PUBLISH or the first ack waiting for the store, and given back at a
    // park when it holds nothing (`Conn::flow`): a device that only waits for its commands
    // does without it (issue 18: inline it was 80 bytes of every connection's state).
    flow: Option<Box<PublisherFlow>>,
    /// The flow control, given back, had seen this connection publish: the alarms still hold
    /// it back when it is made again.
    published: bool,
    // `buf` may hold whole packets not decoded yet: those that came with the CONNECT, or those
    // left when the connection was held back.
    undecoded: bool,
    /// Whether this read's packets have already let the tasks woken with it go first (see
    /// [`Conn::work`]).
    yielded: bool,
    /// A plain TCP connection, which may park while idle (`crate::park`).
    parkable: bool,
    /// It has parked before: from then on it parks only once the sweep finds it idle.
    parked_before: bool,
    generation: u64,
}

/// How many connections are handling a SUBSCRIBE at this moment, across the process. A
/// connection about to route the first PUBLISH of a read lets them finish first (at most
/// [`MAX_SUBSCRIBE_TURNS`] turns of the scheduler), so that a subscription whose SUBSCRIBE
/// arrived before the PUBLISH, but is being handled on the other worker at the same time, is in
/// place when the PUBLISH is routed. Subscribes are rare; a publisher pays one atomic load per
/// read.
static SUBSCRIBING: AtomicUsize = AtomicUsize::new(0);
/// Bounds the wait: a client subscribing without end cannot stall publishers.
const MAX_SUBSCRIBE_TURNS: u32 = 64;

/// Counts one SUBSCRIBE in [`SUBSCRIBING`] while it lives (also when its handling fails).
struct SubscribeInProgress;

impl SubscribeInProgress {
    fn start() -> SubscribeInProgress {
        SUBSCRIBING.fetch_add(1, Ordering::AcqRel);
        SubscribeInProgress
    }
}

impl Drop for SubscribeInProgress {
    fn drop(&mut self) {
        SUBSCRIBING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Refuses a would-be connection for a protocol error before its session starts: logged at
/// `info` with the peer, limited (a client can send bad CONNECTs at will).
fn protocol_refusal(
    id: ConnectionId,
    peer: SocketAddr,
    detail: String,
) -> Result<Box<Conn>, Result<(), ConnectionError>> {
    log_limited!(info, "MQTT connection refused", conn = %id, %peer, "MQTT connection refused: {detail}");
    Err(Err(ConnectionError::Protocol(detail)))
}

/// How long the client may stay silent: 1.5 × the session's keep alive (§3.1.2.10). Worked out
/// when needed rather than kept in `Conn`, where it was 16 bytes of every connection.
fn keep_alive_limit(session: &Session) -> Option<Duration> {
    (session.keep_alive > 0).then(|| Duration::from_millis(u64::from(session.keep_alive) * 1500))
}

/// The CONNECT, the login, the claim of the client id and the session's start: the connection
/// ready to serve, or how it ended.
async fn establish(
    mut stream: ClientStream,
    ctx: ConnectionContext,
    shared: Arc<Shared>,
) -> Result<Box<Conn>, Result<(), ConnectionError>> {
    let limits = &ctx.listener.limits;
    let peer = stream.peer;
    let mut buf = BytesMut::new();
    let mut sizer = ReadSizer::new();
    let mut decoder = Decoder::new(limits.max_frame_size);
    let mut read = 0;
    let connect = match tokio::time::timeout(
        limits.handshake_timeout,
        read_connect(&mut stream, &mut buf, &mut sizer, &mut decoder, &mut read),
    )
    .await
    {
        Err(_) => {
            let timeout = limits.handshake_timeout;
            log_limited!(info, "MQTT handshake timeout", conn = %ctx.id, %peer, "MQTT CONNECT not received within {timeout:?}");
            return Err(Err(ConnectionError::HandshakeTimeout(timeout)));
        }
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => return Err(Ok(())),
        Ok(Err(DecodeError::UnsupportedProtocol { name, level })) => {
            // 3.1.1 §3.1.2.2 / 5.0 §3.1.2.2: answer in the 3.1.1 form, which both understand.
            let mut out = BytesMut::new();
            refuse(ProtocolVersion::V311, MqttError::UnsupportedProtocolVersion, &mut out);
            let _ = stream.write_all(&out).await;
            return protocol_refusal(ctx.id, peer, format!("unsupported protocol {name:?} level {level}"));
        }
        Ok(Err(e)) => return protocol_refusal(ctx.id, peer, format!("bad CONNECT: {e}")),
    };
    let version = connect.version;
    let mut out = BytesMut::new();

    // Over a connection limit (the listener's or the broker's): refused before anything else,
    // without a login check, a client id claim or any session state.
    if let Some(refusal) = &ctx.refusal {
        refuse(version, MqttError::ConnectionLimit, &mut out);
        let _ = tokio::time::timeout(limits.handshake_timeout, stream.write_all(&out)).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
        debug!(conn = %ctx.id, %peer, client_id = connect.client_id.as_str(), ?version, "MQTT CONNECT refused: {refusal}");
        return Err(Ok(()));
    }
    // In the core registry from its CONNECT (when its version is known) until its task ends;
    // user, vhost and client id once the session starts.
    let handle = ctx.broker.connections().register(ConnectionInfo {
        id: ctx.id,
        protocol: Protocol::Mqtt,
        version: version.name(),
        peer,
        local: stream.local,
        listener: Some(ctx.listener.clone()),
        tls: stream.tls.as_deref().map(|t| Box::new(TlsInfo::of(t))),
        connected_at: now_millis(),
    });
    handle.counters.add_bytes_in(read);

    // CONNECT checks the session cannot make (§3.1.2, §3.1.3).
    let ClientId { id: client_id, assigned } = match connect::admit(&connect, assigned_client_id) {
        Ok(c) => c,
        Err(r) => {
            if r.answer {
                refuse(version, r.why, &mut out);
                let _ = stream.write_all(&out).await;
            }
            return protocol_refusal(ctx.id, peer, r.detail);
        }
    };

    // Who the client is (§3.1.4: the server may check the credentials and refuse). The check
    // runs on the blocking pool, bounded, within the handshake time.
    // On a `cert_login` listener a client certificate is the identity and the CONNECT's user
    // name and password are not looked at (Mosquitto's `use_identity_as_username`); a client
    // without one (the certificate is optional unless `require_client_cert`) logs in as usual.
    let username = connect.username.as_ref().map(|u| u.as_str().to_string());
    let certificates = stream.tls.as_ref().map(|t| t.peer_certificates.as_slice()).unwrap_or_default();
    let result = match ctx.listener.auth.cert_login {
        Some(from) if !certificates.is_empty() => ferry_core::cert_login::certificate_identity(certificates, from),
        _ => {
            let login = ctx.broker.auth().login(
                &ctx.listener.auth,
                stream.peer.ip(),
                username.as_deref(),
                connect.password.as_deref(),
            );
            // Boxed: the login's state is large and needed once.
            Box::pin(tokio::time::timeout(limits.handshake_timeout, login)).await.unwrap_or(Err(AuthError::Busy))
        }
    };
    let identity = match result {
        Ok(identity) => identity,
        Err(e) => {
            refuse(version, connect::login_refusal(&e), &mut out);
            let _ = stream.write_all(&out).await;
            log_limited!(info, "MQTT login refused", conn = %ctx.id, %peer, client_id, user = username.as_deref().unwrap_or(""), "MQTT login refused: {e}");
            return Err(Err(ConnectionError::Protocol(format!("login refused: {e}"))));
        }
    };
    // Each connection takes the ACL current at its CONNECT (a reload swaps the broker's).
    let acl = crate::acl::MqttPolicy::acl_of(&ctx.broker.access());
    let user = (!identity.anonymous).then(|| identity.user.clone());
    if let Err(r) = connect::check_will(&connect, &acl, user.as_deref(), &client_id) {
        refuse(version, r.why, &mut out);
        let _ = stream.write_all(&out).await;
        log_limited!(info, "MQTT CONNECT refused", conn = %ctx.id, %peer, client_id, user = %identity.user, "MQTT CONNECT refused: {}", r.detail);
        return Err(Err(ConnectionError::Protocol(r.detail)));
    }
    let vhost_name = ctx.listener.vhost.clone();
    let vhost = match ctx.broker.vhost(&vhost_name) {
        Some(v) => v,
        None => ctx.broker.add_vhost(&vhost_name),
    };
    let group = shared.group(&ctx.shutdown);
    let resume = !connect.clean_start;
    // Before the claim: the registry keys the connection's slot by its login.
    handle.set_login(Login {
        user: identity.user.clone(),
        vhost: vhost_name.clone(),
        client_id: Some(client_id.clone()),
    });
    let claim = Box::pin(shared.registry.claim(handle.entry(), group, resume)).await;
    if claim.expired {
        // The session expired while its client was away and its timer has not ended it yet: a
        // queue left behind would be resumed as if the session were present.
        end_session(&vhost, &client_id, ctx.id, now_millis());
    }
    if let Some(due) = &claim.ended_will {
        // That session ended before this connection came: its will was due.
        publish_will(&vhost, &due.exchange.as_str().into(), &due.will, ConnectionId(0), now_millis());
    }
    let mut settings = shared.settings.clone();
    if let Some(exchange) = &ctx.listener.exchange {
        settings.exchange = exchange.as_str().into();
    }
    settings.max_packet_size = limits.max_frame_size;
    settings.acl = acl;
    settings.outbox_capacity = limits.outbox_capacity;
    settings.outbox_bytes = limits.outbox_bytes;
    let settings = shared.session_settings(settings);
    let now = now_millis();
    let keep_alive_requested = connect.keep_alive;
    let mut session = match Session::start(
        connect,
        client_id.clone(),
        assigned,
        ctx.id,
        vhost.clone(),
        settings,
        user,
        claim.stored.map(|b| *b),
        now,
    ) {
        Ok(s) => s,
        Err(e) => {
            shared.registry.release(&vhost_name, &client_id, ctx.id, None);
            refuse(version, MqttError::ServerUnavailable, &mut out);
            let _ = stream.write_all(&out).await;
            // Not the client's doing (the store, say): not limited.
            info!(conn = %ctx.id, %peer, client_id, "MQTT session could not start: {e}");
            return Err(Err(ConnectionError::Protocol(format!("session could not start: {e}"))));
        }
    };
    // One line per connection at `info`, and one when it ends (`Conn::wind_up`).
    info!(
        conn = %ctx.id, %peer, protocol = "MQTT", version = version.name(), client_id, user = %identity.user,
        keep_alive = keep_alive_requested, persistent = session.is_persistent(), took_over = claim.took_over,
        bridge = session.is_bridge(), "MQTT client connected"
    );
    shared.ensure_sys(&ctx.broker, &vhost);

    let keep_alive = keep_alive_limit(&session);
    session.set_disk_alarm(ctx.broker.disk().is_raised());
    claim.kick.set_deadline(keep_alive.map(|k| Instant::now() + k));
    session.attach_listing(claim.kick, !resume);
    let undecoded = !buf.is_empty();
    sizer.drained(&mut buf);
    let parkable = stream.tls.is_none() && stream.is::<tokio::net::TcpStream>();
    Ok(Box::new(Conn {
        parkable,
        parked_before: false,
        conn: handle,
        flow: None,
        published: false,
        undecoded,
        yielded: false,
        generation: claim.generation,
        stream: stream.into_io(),
        broker: ctx.broker,
        shared,
        session,
        buf,
        sizer,
    }))
}

impl Conn {
    /// Serves the connection until it closes, and says why; or until it is idle and may park
    /// (`None`, see `crate::park`).
    async fn serve(&mut self) -> Option<Close> {
        if self.session.connack_withheld {
            // [MQTT-3.1.2-24]: the CONNACK exceeded the client's Maximum Packet Size.
            return Some(
                MqttError::PacketTooLarge.close("the CONNACK is larger than the client's Maximum Packet Size"),
            );
        }
        loop {
            if let Err(close) = self.work().await {
                return Some(close);
            }
            self.update_flow();
            let reading = self.should_read();
            if reading && self.undecoded {
                // Packets read and left undecoded at a congestion that is over: they go first.
                continue;
            }
            if self.session.more {
                // Deliveries left for the next write (see `Session::pump`); a kick is still
                // heard between batches.
                if let Poll::Ready(why) =
                    std::future::poll_fn(|cx| Poll::Ready(self.session.kick().poll_kicked(cx))).await
                {
                    return Some(kicked(why, &self.conn));
                }
                continue;
            }
            let closed = if reading && self.session.acks.is_empty() {
                // Err: nothing to do, and the connection may park.
                let idle = std::future::poll_fn(|cx| match self.poll_idle(cx) {
                    Poll::Pending if self.may_park() => Poll::Ready(Err(())),
                    polled => polled.map(Ok),
                });
                match idle.await {
                    Ok(closed) => closed,
                    Err(()) => return None,
                }
            } else {
                Box::pin(self.wait_busy(reading)).await
            };
            if let Some(close) = closed {
                return Some(close);
            }
        }
    }

    /// Whether the connection, idle now ([`Conn::poll_idle`] is pending), may park: a plain
    /// TCP connection with nothing read and not handled and nothing to write, which has
    /// subscribed and moved no message yet and not parked before (a device after its SUBACK,
    /// waiting for its first command) or which the sweep found idle twice
    /// (`Kick::park_asked`). A busy connection that pauses for a moment is not parked and
    /// woken at every message, and a client sending PINGREQs back to back does not make the
    /// broker park and unpark its connection for each.
    ///
    /// Not at once after the CONNACK: what a parked connection's client sends is handled a
    /// moment later than what an active connection's does (its task is made again, on the
    /// runtime's shared queue), so a client that connects and publishes at once would see its
    /// first PUBLISH routed after a SUBSCRIBE that another client sent just after it.
    // Out of line, as `poll_parked` and `read_parked`: rarely run, kept out of the serving loop's
    // code.
    #[inline(never)]
    fn may_park(&self) -> bool {
        let counters = &self.conn.counters;
        let moved = counters.messages_in.load(Ordering::Relaxed) + counters.messages_out.load(Ordering::Relaxed);
        let fresh_device = !self.parked_before && moved == 0 && self.session.is_subscribed();
        self.parkable
            && self.buf.is_empty()
            && self.session.out.is_empty()
            && !self.session.is_subscribing()
            && (fresh_device || self.session.kick().park_asked())
    }

    /// Parks the connection (see `crate::park`): its socket out of tokio's hands and into the
    /// parker's epoll set, its state and its slot into the parker's records; its task ends.
    /// Given back if its socket cannot be taken out.
    fn park(
        mut self: Box<Self>,
        parker: &Arc<Parker>,
        slot: ConnectionSlot,
    ) -> Result<(), (Box<Conn>, ConnectionSlot)> {
        let io = std::mem::replace(&mut self.stream, Box::new(NoStream));
        let Ok(tcp) = io.into_any().downcast::<tokio::net::TcpStream>() else {
            // `parkable` says it is TCP.
            return Err((self, slot));
        };
        match tcp.into_std() {
            Ok(tcp) => {
                self.session.shed();
                if self.flow.as_ref().is_some_and(|f| f.is_at_rest()) {
                    self.published |= self.flow.take().is_some_and(|f| f.is_publisher());
                }
                self.session.kick().parked();
                // Nothing is kept for the next read (`may_park`: the buffer is empty): it goes
                // through the stack.
                let Conn { session, conn, flow, generation, published, sizer, .. } = *self;
                let conn = Box::new(ParkedConn { session: session.park(flow), conn, generation, published, sizer });
                parker.park(Parked { conn, tcp, slot });
                Ok(())
            }
            Err(e) => {
                debug!(conn = %self.conn.id(), error = %e, "a connection could not be parked");
                Err((self, slot))
            }
        }
    }

    /// What a parked connection's socket holds now, read without waiting (up to [`READ_MAX`]);
    /// `Some` when the client closed it or it failed.
    #[inline(never)]
    fn read_parked(&mut self, tcp: &std::net::TcpStream) -> Option<Close> {
        use std::io::Read;
        let mut total = 0;
        while total < READ_MAX {
            let room = self.sizer.prepare(&mut self.buf);
            let start = self.buf.len();
            self.buf.resize(start + room, 0);
            let read = (&*tcp).read(&mut self.buf[start..]);
            let n = *read.as_ref().unwrap_or(&0);
            self.buf.truncate(start + n);
            match read {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                read => {
                    if let Some(close) = self.on_read(read, room) {
                        return Some(close);
                    }
                }
            }
            total += n;
            if n < room {
                break;
            }
        }
        self.sizer.drained(&mut self.buf);
        None
    }

    /// The connection ends for a reason of ours (taken over, a failed write): what the client
    /// sent before that still counts, above all a DISCONNECT. A client that sends DISCONNECT,
    /// closes and connects again at once has its DISCONNECT in this socket before its new
    /// connection's CONNECT reaches the broker, but this task may see the takeover first (the
    /// kick is polled before the socket, and a `select!` picks among ready branches at random):
    /// without this, 5 in 18 such reconnects published the will and up to 14 in 20 resumed a
    /// session the DISCONNECT had ended (issue 14). So everything already readable is handled
    /// first, without waiting and at most [`DRAIN_MAX`] bytes; what it ends with (DISCONNECT,
    /// a protocol error) is why the connection closes.
    async fn drain(&mut self) -> Option<Close> {
        let mut budget = DRAIN_MAX;
        loop {
            loop {
                match self.session.decoder().decode(&mut self.buf) {
                    Ok(Some(p)) => {
                        if let Err(close) = self.session.handle(p, now_millis()) {
                            return Some(close);
                        }
                        while self.session.is_subscribing() {
                            if let Err(close) = self.session.resume(now_millis()) {
                                return Some(close);
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Some(self.undecodable(e)),
                }
            }
            if budget == 0 {
                return None;
            }
            let room = self.sizer.prepare(&mut self.buf).min(budget);
            let mut chunk = vec![0u8; room];
            let mut rb = ReadBuf::new(&mut chunk);
            // Polled once: only what is there now.
            let ready = std::future::poll_fn(|cx| {
                Poll::Ready(match Pin::new(&mut self.stream).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => rb.filled().len(),
                    Poll::Ready(Err(_)) | Poll::Pending => 0,
                })
            })
            .await;
            if ready == 0 {
                return None;
            }
            self.conn.counters.add_bytes_in(ready as u64);
            budget -= ready;
            self.buf.extend_from_slice(&chunk[..ready]);
        }
    }

    /// The publisher flow control's state, made when first needed (see [`Conn::flow`]'s field).
    fn flow(&mut self) -> &mut PublisherFlow {
        Conn::flow_of(&mut self.flow, &self.conn, &self.session, self.published)
    }

    /// [`Conn::flow`] for a caller that holds another field of the connection borrowed.
    fn flow_of<'f>(
        flow: &'f mut Option<Box<PublisherFlow>>,
        conn: &ferry_core::connections::ConnectionEntry,
        session: &Session,
        published: bool,
    ) -> &'f mut PublisherFlow {
        flow.get_or_insert_with(|| {
            let rate = conn.listener().map_or(0, |l| l.limits.max_publish_rate);
            // 5.0 clients are answered 0x97 at the disk alarm instead of being held back.
            let mut flow = PublisherFlow::new(rate, !session.is_v5(), Instant::now().into_std());
            if published {
                flow.mark_publisher();
            }
            Box::new(flow)
        })
    }

    /// Whether the flow control lets the connection read and decode (as of the last
    /// [`Conn::update_flow`]).
    fn should_read(&self) -> bool {
        self.flow.as_ref().is_none_or(|f| f.should_read())
    }

    /// Tells the publisher flow control how things stand (alarms, acks waiting) and moves the
    /// keep alive deadline by our pauses. The memory alarm holds back clients that publish
    /// (subscribers keep draining); so does the disk alarm for 3.1.1 clients (5.0 clients are
    /// answered 0x97 instead).
    fn update_flow(&mut self) {
        let (memory, disk, acks) =
            (self.broker.memory().is_raised(), self.broker.disk().is_raised(), self.session.acks.len());
        // Without the state (nothing published since it was made, or given back at rest):
        // made again only when something would hold the connection back, an alarm (for a
        // connection that published) or acks waiting.
        let alarm_holds = self.published && (memory || (disk && !self.session.is_v5()));
        if self.flow.is_none() && acks == 0 && !alarm_holds {
            return;
        }
        let flow = self.flow();
        flow.set_alarms(memory, disk);
        flow.set_acks_waiting(acks);
        match flow.update(Instant::now().into_std(), now_millis()) {
            Some(Pause::Started) => self.session.kick().hold_deadline(),
            Some(Pause::Ended(paused)) => self.session.kick().release_deadline(paused),
            None => {}
        }
    }

    /// Everything ready: packets read and not yet handled (unless the connection is held back,
    /// see [`ferry_core::flow`]), acks whose commits are done, deliveries; then one write.
    async fn work(&mut self) -> Result<(), Close> {
        self.session.kick().worked();
        if self.undecoded {
            // An alarm raised since the last look holds back what was just read.
            self.update_flow();
        }
        if self.undecoded && self.should_read() {
            self.session.set_disk_alarm(self.broker.disk().is_raised());
            let mut heard = false;
            // The wall clock is read once per CLOCK_PACKETS packets and after every yield, not
            // per packet (the AMQP driver does the same; there a clock read per frame took 7 %
            // of the broker's CPU). Times are in milliseconds.
            const CLOCK_PACKETS: u32 = 64;
            let mut now = now_millis();
            let mut packets = 0u32;
            loop {
                if !self.yielded && Decoder::whole_publish_next(&self.buf) {
                    // What arrived first should take effect first, across connections too: a
                    // SUBSCRIBE that reached the broker just before this PUBLISH, on another
                    // connection, handled before it is routed. Tasks woken by one poll of the
                    // I/O driver do not run in that order (tokio runs the last one woken first,
                    // from its LIFO slot), so with the SUBSCRIBE sent 0-300 µs before, the
                    // PUBLISH was routed first in 424 of 1,200 rounds; with one yield per read,
                    // which lets the tasks woken before this one go first, in 53 (issue 14). Not
                    // a guarantee: two workers may still run the two connections at once. A
                    // publisher reading many packets at once pays it once.
                    //
                    // Done before the PUBLISH is decoded, so that no decoded packet is kept
                    // across the yields: a `Packet` in this future's state made the task of
                    // every connection, idle ones too, about 1 KB larger (docs/benchmarks.md).
                    self.yielded = true;
                    tokio::task::yield_now().await;
                    // The other case: the SUBSCRIBE is being handled on the other worker right
                    // now. Wait for it, a bounded number of turns (with a 300 µs gap on a loaded
                    // machine this saved about 1 round in 70; the rounds still lost are those
                    // whose SUBSCRIBE was not read yet).
                    let mut turns = 0;
                    while SUBSCRIBING.load(Ordering::Acquire) > 0 && turns < MAX_SUBSCRIBE_TURNS {
                        turns += 1;
                        tokio::task::yield_now().await;
                    }
                    now = now_millis();
                }
                // The packet is handled within this statement: nothing awaited below keeps it
                // (or the decoder's result) in this future's state.
                let publish = match self.session.decoder().decode(&mut self.buf) {
                    Ok(Some(p)) => {
                        heard = true;
                        packets += 1;
                        if packets.is_multiple_of(CLOCK_PACKETS) {
                            now = now_millis();
                        }
                        let publish = matches!(p, Packet::Publish(_));
                        // Counted only while its first slice is handled: a client flooding
                        // SUBSCRIBEs, however large, holds publishers back a few turns at most.
                        let making = matches!(p, Packet::Subscribe(_)).then(SubscribeInProgress::start);
                        self.session.handle(p, now)?;
                        drop(making);
                        publish
                    }
                    Ok(None) => {
                        self.undecoded = false;
                        self.sizer.drained(&mut self.buf);
                        break;
                    }
                    Err(e) => return Err(self.undecodable(e)),
                };
                // A large SUBSCRIBE is worked through in slices, other tasks running between them
                // (this one's deliveries wait in its outboxes).
                while self.session.is_subscribing() {
                    tokio::task::yield_now().await;
                    now = now_millis();
                    self.session.resume(now)?;
                }
                // Over the publish rate, or a subscriber this went to is congested: the rest of
                // what was read waits (see `ferry_core::flow`).
                if publish {
                    // The usual case, nothing congested, without the drain's iterator: its
                    // `extend` was 1.5-3 % of the broker's CPU at QoS 0 1→1 (perf).
                    let clock = || Instant::now().into_std();
                    let decode = if self.session.is_congested() {
                        let flow = Conn::flow_of(&mut self.flow, &self.conn, &self.session, self.published);
                        flow.after_publish(1, self.session.take_congested(), clock)
                    } else {
                        self.flow().after_publish(1, std::iter::empty(), clock)
                    };
                    if decode == Decode::Stop {
                        break;
                    }
                }
            }
            // §3.1.2.10: a whole control packet within 1.5 × the keep alive.
            if let (true, Some(k)) = (heard, keep_alive_limit(&self.session)) {
                // Held while the flow control pauses (see `update_flow`).
                self.session.kick().set_deadline(Some(Instant::now() + k));
            }
        }
        while let Some((packet, result)) = self.session.acks.take_ready() {
            self.session.commit_done(packet, result.is_ok())?;
        }
        self.session.pump(now_millis());
        // The session counts its messages; the registry gets its totals once per wake-up, before
        // the write, so a client sees its PUBACK only once its publish is counted.
        let stats = self.session.stats.take();
        if stats != SessionStats::default() {
            self.conn.counters.add_messages(stats.messages_in.into(), stats.messages_out.into());
            self.shared.stats.publish_bytes_out.fetch_add(stats.payload_out.into(), Ordering::Relaxed);
        }
        if !self.session.out.is_empty() {
            let n = self.session.out.len();
            if let Err(e) = self.stream.write_all(&self.session.out).await {
                debug!(conn = %self.conn.id(), error = %e, "write failed");
                self.session.out.clear();
                return Err(Close::Lost);
            }
            self.session.out.clear();
            // A burst's buffer is not kept for an idle connection.
            if self.session.out.capacity() > OUT_KEEP {
                self.session.out = Vec::new();
            }
            self.conn.counters.add_bytes_out(n as u64);
        }
        Ok(())
    }

    /// What a packet that does not decode ends the connection with.
    fn undecodable(&mut self, e: DecodeError) -> Close {
        // A server-to-client packet type (CONNACK, SUBACK, UNSUBACK, PINGRESP) closes silently
        // even when its flags are bad (see `Session::handle`); the fixed header is refused
        // before anything is taken from `buf`.
        if self.buf.first().is_some_and(|b| matches!(b >> 4, 2 | 9 | 11 | 13)) {
            self.session.close_quietly();
        }
        MqttError::from(&e).close(e.to_string())
    }

    /// A read's outcome.
    fn on_read(&mut self, r: std::io::Result<usize>, room: usize) -> Option<Close> {
        match r {
            Ok(0) => Some(Close::Lost),
            Err(e) => {
                debug!(conn = %self.conn.id(), error = %e, "read failed");
                Some(Close::Lost)
            }
            Ok(n) => {
                self.conn.counters.add_bytes_in(n as u64);
                self.sizer.read(n, room);
                self.yielded = false;
                // The keep alive is reset by whole packets (see `Conn::work`), not by bytes: a
                // PUBLISH trickled a byte at a time does not keep a connection open (§3.1.2.10).
                self.undecoded = true;
                None
            }
        }
    }

    /// Waiting while the connection reads and nothing else is pending, which is where an idle
    /// connection spends its life: the socket, the two outboxes and the registry's kick
    /// (takeover, shutdown, keep alive), polled directly so that nothing is stored between
    /// polls. `Ready(None)`: there is work. An alarm raised meanwhile is noticed at the next
    /// read (see [`Conn::work`]).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<Option<Close>> {
        if let Poll::Ready(why) = self.session.kick().poll_kicked(cx) {
            return Poll::Ready(Some(kicked(why, &self.conn)));
        }
        // Both polled, so both wakers are registered whichever is ready.
        let sink = self.session.sink_outbox().poll_notified(cx).is_ready();
        let queue = self.session.queue_outbox().is_some_and(|o| o.poll_notified(cx).is_ready());
        if sink || queue {
            return Poll::Ready(None);
        }
        let read = if self.buf.capacity() == 0 && self.sizer.want() == READ_MIN {
            // No buffer is kept while idle: a small read goes through the stack.
            let mut chunk = [0u8; READ_MIN];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.stream).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    self.buf.extend_from_slice(rb.filled());
                    Poll::Ready((Ok(rb.filled().len()), READ_MIN))
                }
                Poll::Ready(Err(e)) => Poll::Ready((Err(e), READ_MIN)),
                Poll::Pending => Poll::Pending,
            }
        } else {
            let room = self.sizer.prepare(&mut self.buf);
            // A `read_buf` future holds no state of its own: one made per poll loses nothing.
            let read = self.stream.read_buf(&mut self.buf);
            tokio::pin!(read);
            read.poll(cx).map(|r| (r, room))
        };
        read.map(|(r, room)| self.on_read(r, room))
    }

    /// Waiting for anything else: a commit, a congested subscriber, an alarm to clear, the
    /// publish rate. Boxed by the caller, so that its room is taken only while it waits. Whatever
    /// ends the wait, the next [`Conn::update_flow`] takes stock.
    async fn wait_busy(&mut self, reading: bool) -> Option<Close> {
        // The alarms' receivers are made for this wait (they are 32 bytes a connection kept
        // otherwise); one that changed before it was made is caught by looking again.
        let mut alarm = self.broker.memory().subscribe();
        let mut disk_alarm = self.broker.disk().subscribe();
        let (memory, disk) = (self.broker.memory().is_raised(), self.broker.disk().is_raised());
        let flow = self.flow();
        if flow.would_hold(memory, disk) != flow.alarm_holds() {
            return None;
        }
        let room = if reading { self.sizer.prepare(&mut self.buf) } else { 0 };
        let sink = self.session.sink().clone();
        let queue_outbox = self.session.queue_outbox().cloned();
        // A hold that ends with time (the publish rate's debt, a congestion pause), and the
        // congested subscriber we wait for: it may drain first (ferry_core::flow).
        let flow = self.flow.as_deref().expect("made above");
        let wake = flow.next_wakeup().map(Instant::from_std);
        let congested = flow.congested_target().cloned();
        let kick = self.session.kick().clone();
        let acks = &mut self.session.acks;
        tokio::select! {
            r = self.stream.read_buf(&mut self.buf), if reading => return self.on_read(r, room),
            _ = sleep_until(wake), if wake.is_some() => {}
            _ = sink.outbox().notified() => {}
            _ = alarm.changed() => {}
            _ = disk_alarm.changed() => {}
            _ = async { congested.as_ref().expect("guarded").room().await }, if congested.is_some() => {}
            _ = async { queue_outbox.as_deref().expect("guarded").notified().await }, if queue_outbox.is_some() => {}
            _ = acks.ready(), if !acks.is_empty() => {}
            why = kick.kicked() => return Some(kicked(why, &self.conn)),
        }
        None
    }

    /// The end, for `close`: what the client still sent ([`Conn::drain`]) where the close was
    /// ours, then [`Conn::wind_up`].
    async fn end(mut self: Box<Self>, mut close: Close) -> Result<(), ConnectionError> {
        if matches!(close, Close::TakenOver | Close::Lost | Close::Administrative { .. }) {
            if let Some(sent) = self.drain().await {
                close = sent;
            }
        }
        self.wind_up(close).await
    }

    /// The end: the last writes, the will, the session handed to the registry (or ended).
    async fn wind_up(self: Box<Self>, close: Close) -> Result<(), ConnectionError> {
        let Conn { mut stream, broker, shared, mut session, generation, conn, .. } = *self;
        let (id, kick) = (conn.id(), session.kick().clone());
        log_disconnect(id, conn.peer(), &session, &close, conn.connected_at());
        // Say why, to 5.0 clients.
        match &close {
            Close::Violation { reason: r, detail } => session.send_disconnect(*r, detail),
            Close::TakenOver => {
                session.send_disconnect(MqttError::SessionTakenOver.reason(), "another connection took this client id")
            }
            Close::Shutdown => session.send_disconnect(MqttError::ServerShuttingDown.reason(), "server shutting down"),
            Close::Administrative { reason } => {
                session.send_disconnect(MqttError::AdministrativeAction.reason(), reason)
            }
            Close::ClientDisconnect { .. } | Close::Lost => {}
        }
        // Acks still waiting for commits are sent if they complete promptly.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                while let Some((packet, result)) = session.acks.take_ready() {
                    if session.commit_done(packet, result.is_ok()).is_err() {
                        return;
                    }
                }
                if session.acks.is_empty() {
                    return;
                }
                session.acks.ready().await;
            }
        })
        .await;
        if !session.out.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&session.out)).await;
        }

        let stats = session.stats.take();
        conn.counters.add_messages(stats.messages_in.into(), stats.messages_out.into());
        shared.stats.publish_bytes_out.fetch_add(stats.payload_out.into(), Ordering::Relaxed);
        let client_id = session.client_id().to_string();
        let vhost = session.vhost().clone();
        // Wills go to the listener's exchange, as publishes do.
        let exchange = session.exchange().clone();
        let WillOnClose { will, delay } = session.will_on_close(&close, kick.resumed());
        // A will whose delay is still running is stored with the session, so a restart meanwhile
        // does not lose it.
        let delayed_will = will.clone().filter(|_| delay > 0);
        // Many subscriptions are unbound in slices, other tasks running between them.
        while session.wind_down(SUBSCRIBE_SLICE, now_millis()) {
            tokio::task::yield_now().await;
        }
        let stored = session.finish(now_millis(), delayed_will);
        let expiry = stored.as_ref().map(|st| st.expiry);
        if let Some(will) = will.as_ref().filter(|_| delay == 0) {
            // Before the client id is released: a connection taking this one over is answered
            // after the will (as Mosquitto's 07-will-takeover expects), and the session, no
            // longer bound, does not get its own will.
            publish_will(&vhost, &exchange, will, id, now_millis());
        }
        shared.registry.release(vhost.name(), &client_id, id, stored);
        if let Some(secs) = expiry.filter(|&e| e != u32::MAX) {
            spawn_expiry(
                shared.clone(),
                vhost.clone(),
                client_id.clone(),
                generation,
                Duration::from_secs(secs as u64),
            );
        }
        broker.connection_closed(id, now_millis());
        // Close the socket only now: once a client sees the close, its session no longer takes
        // deliveries and is stored for the next connection (a QoS 0 message published after that
        // is not caught by the old consumer and requeued as if queued offline).
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;

        if will.is_some() && delay > 0 {
            // 5.0 §3.1.3.2.2: wait, and publish only if no connection came meanwhile. The will
            // waits in the stored session (`finish` above), not here.
            let at = Duration::from_secs(delay as u64);
            spawn_will(shared.clone(), vhost.clone(), client_id.clone(), generation, at);
        }
        match close {
            Close::Violation { detail, .. } => Err(ConnectionError::Protocol(detail)),
            _ => Ok(()),
        }
    }
}

/// The connection's last line: who, how long, and why it ended. A protocol violation (keep
/// alive timeouts included) is something a client can repeat at will, so those lines are
/// limited; the others are one per connection, like the connect line.
fn log_disconnect(id: ConnectionId, peer: SocketAddr, session: &Session, close: &Close, connected_at: Millis) {
    let duration = Duration::from_millis(now_millis().saturating_sub(connected_at));
    let user = session.user().unwrap_or(ANONYMOUS_USER);
    let (client_id, version) = (session.client_id(), session.version.name());
    let reason = match close {
        Close::Violation { detail, .. } => {
            log_limited!(
                info, "MQTT client disconnected (protocol violation)",
                conn = %id, %peer, protocol = "MQTT", version, client_id, user, ?duration,
                reason = %format_args!("protocol violation: {detail}"), "MQTT client disconnected"
            );
            return;
        }
        Close::ClientDisconnect { with_will: false } => "client disconnected",
        Close::ClientDisconnect { with_will: true } => "client disconnected with its will",
        Close::Lost => "connection lost",
        Close::TakenOver => "taken over by another connection",
        Close::Shutdown => "server shutting down",
        Close::Administrative { reason } => {
            info!(
                conn = %id, %peer, protocol = "MQTT", version, client_id, user, ?duration,
                reason = %format_args!("closed from outside: {reason}"), "MQTT client disconnected"
            );
            return;
        }
    };
    info!(conn = %id, %peer, protocol = "MQTT", version, client_id, user, ?duration, reason, "MQTT client disconnected");
}

fn kicked(why: Kicked, conn: &ConnectionHandle) -> Close {
    match why {
        Kicked::TakenOver => Close::TakenOver,
        Kicked::Shutdown => Close::Shutdown,
        Kicked::KeepAlive => MqttError::KeepAliveTimeout.close("keep alive timeout"),
        Kicked::Closed => Close::Administrative { reason: conn.close_reason().unwrap_or_default().to_string() },
    }
}

/// Ends a stored session: its queue and its stored state go.
pub(crate) fn end_session(vhost: &Arc<VHost>, client_id: &str, connection: ConnectionId, now: Millis) {
    let _ = vhost.delete_queue(&session_queue_name(client_id), connection, false, false, now);
    vhost
        .store()
        .submit(vec![StoreOp::DeleteSession { vhost: vhost.name().to_string(), client_id: client_id.to_string() }]);
}

/// 5.0 §3.1.2.11.2: the session (its queue and stored state) ends `after` this, unless a
/// connection resumes it meanwhile (claim `generation` is then no longer the latest); a will it
/// still held is published then (§3.1.3.2.2: at the will delay or the session's end, whichever
/// comes first).
pub(crate) fn spawn_expiry(
    shared: Arc<Shared>,
    vhost: Arc<VHost>,
    client_id: String,
    generation: u64,
    after: Duration,
) {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let ended = shared.registry.expire(vhost.name(), &client_id, generation, || {
            end_session(&vhost, &client_id, ConnectionId(0), now_millis());
        });
        if let Some(Some(due)) = ended {
            publish_will(&vhost, &due.exchange.as_str().into(), &due.will, ConnectionId(0), now_millis());
        }
    });
}

/// Publishes the will a stored session holds `after` this unless a connection claimed the
/// client id meanwhile (5.0 §3.1.3.2.2, [MQTT-3.1.3-9]); then stores the session without it.
pub(crate) fn spawn_will(shared: Arc<Shared>, vhost: Arc<VHost>, client_id: String, generation: u64, after: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let Some((due, st)) = shared.registry.take_will(vhost.name(), &client_id, generation) else { return };
        publish_will(&vhost, &due.exchange.as_str().into(), &due.will, ConnectionId(0), now_millis());
        vhost.store().submit(vec![StoreOp::PutSession {
            vhost: vhost.name().to_string(),
            client_id,
            state: encode_session(&st),
        }]);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of `F`, the future a function of three arguments returns, without calling it.
    fn returned_size<A, B, C, F>(_: impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle connection's one box: `Conn` with its `Session` inline. 760 bytes, jemalloc's
    /// 768 class, while each session held its own copy of the settings (128 bytes) and the
    /// connection its keep alive (16); 640 then, the 640 class; 504, the 512 class, with the
    /// session's traffic state made on first use and the keep alive deadline kept only in the
    /// registry's `Kick`; 384, the 384 class, with the flow control's state (80) and the acks'
    /// queue (32) made on first use, the client id boxed and the payload counted as a delta;
    /// now 320, the 320 class: the connection id, listener and kick read from the connection's
    /// entry and session, the decoder made where it is used, the read size as an exponent, the
    /// session's counts as `u32` deltas and its write buffer a `Vec` (x86_64).
    #[test]
    fn the_connection_state_fits_jemallocs_320_class() {
        let size = std::mem::size_of::<Conn>();
        assert!(size <= 320, "Conn is {size} bytes");
    }

    /// What a parked connection keeps (`ParkedConn`): the session as a parked one keeps it
    /// (120 bytes) and what serves it again; without the stream, the read buffer, the read's
    /// state, the broker and the frontend: half a `Conn`, two classes lower.
    #[test]
    fn a_parked_connection_fits_jemallocs_128_class() {
        let size = std::mem::size_of::<ParkedConn>();
        assert!(size <= 128, "ParkedConn is {size} bytes");
    }

    #[test]
    fn the_connection_task_stays_small() {
        // `run`'s future is boxed by the frontend and kept while the connection is served (not
        // while it is parked). A decoded `Packet` (472 bytes) kept across an await in
        // `Conn::work` made it 1,088 bytes; without it, 136; with the connection's slot (32)
        // and the parking, 224 (debug build, x86_64).
        let size = returned_size(run);
        assert!(size <= 256, "the connection's future is {size} bytes");
        // The task of a connection unparked: the same, with the socket and the slot.
        fn three<A, B, C, F>(_: impl Fn(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = three(resume);
        assert!(size <= 320, "an unparked connection's future is {size} bytes");
    }
}

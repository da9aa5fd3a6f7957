//! One accept loop per listener, and the task that takes one connection through TLS and the
//! WebSocket upgrade (each if configured) to its frontend.
//!
//! The loop owns its connection tasks in a `JoinSet`, so that on shutdown it can wait for them
//! (up to the grace period) and abort the rest.
//!
//! Limits, in the order a new client meets them:
//! - **Accept rate** (`max_connection_rate`): a token bucket holding one second's worth; when
//!   it is empty the loop stops accepting until it refills, and the kernel's backlog holds the
//!   clients meanwhile.
//! - **Connection count**: the broker's `max_connections` and the listener's, as semaphores
//!   (as mini-redis's `MAX_CONNECTIONS`). A client over either limit is still accepted, but
//!   only to be refused in its protocol's terms ([`Refusal`]): MQTT CONNACK *quota exceeded* /
//!   *server unavailable*, AMQP 530 at start-ok, without a login check. At most
//!   [`MAX_REFUSING`] such clients are being refused at once per listener; beyond that the
//!   socket is closed at once.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ferry_core::frontend::{
    ClientStream, ConnectionContext, ConnectionError, ConnectionSlot, Frontend, LimitScope, ListenerSettings, Refusal,
    Shutdown, TlsIdentity,
};
use ferry_core::logging::LogLimiter;
use ferry_core::rate::TokenBucket;
use ferry_core::{log_limited, log_limited_by};
use ferry_core::{Broker, ConnectionId, Protocol};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn, Instrument};

use crate::tls;
use crate::websocket::Upgrade;

/// What serves a listener's connections.
#[derive(Clone)]
pub(crate) enum Handler {
    Frontend(Arc<dyn Frontend>),
    /// No frontend is built in for this protocol: answer "unavailable" and close.
    Unserved(Protocol),
}

/// A bound listener, ready to run.
pub(crate) struct Listener {
    pub tcp: TcpListener,
    pub settings: Arc<ListenerSettings>,
    /// The TLS configuration new connections get; a reload swaps it (connections already
    /// established keep the one they were accepted with).
    pub tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    /// `Some` on a WebSocket listener: the HTTP upgrade that follows TLS.
    pub websocket: Option<Arc<Upgrade>>,
    pub handler: Handler,
    pub max_connections: usize,
    /// New connections per second (0: no limit).
    pub max_connection_rate: u32,
    /// The broker's connection slots, shared by every listener, and how many there are.
    pub broker_connections: Arc<Semaphore>,
    pub broker_max_connections: usize,
}

/// Clients over a connection limit being refused at once, per listener (each costs a task, a
/// socket and maybe a TLS handshake for up to the handshake timeout).
pub(crate) const MAX_REFUSING: usize = 64;

/// How a listener's connections ended once shutdown started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drained {
    /// Closed by themselves within the grace period.
    pub closed: usize,
    /// Still open when the grace period ran out, and aborted.
    pub aborted: usize,
}

/// Back-off after an accept error that is not about one connection (EMFILE, ENFILE, ENOBUFS):
/// retrying at once would spin; waiting lets connections close and free descriptors.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Listener {
    /// Accepts until `shutdown` fires, then waits up to `grace` for the connections to close.
    pub(crate) async fn run(self, broker: Arc<Broker>, mut shutdown: Shutdown, grace: Duration) -> Drained {
        let Listener {
            tcp,
            settings,
            tls,
            websocket,
            handler,
            max_connections,
            max_connection_rate,
            broker_connections,
            broker_max_connections,
        } = self;
        let name = settings.name.clone();
        let limit = Arc::new(Semaphore::new(max_connections));
        let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
        let mut rate = (max_connection_rate > 0)
            .then(|| TokenBucket::new(max_connection_rate, max_connection_rate, std::time::Instant::now()));
        // When the accept rate allows the next client.
        let mut next_accept: Option<Instant> = None;
        // One warning per 10 s while clients are refused, then a count of the rest.
        let refusals = LogLimiter::new(1, Duration::from_secs(10));
        let mut tasks = JoinSet::new();
        let mut backoff = ACCEPT_BACKOFF_START;
        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    report(&name, done);
                    continue;
                }
                _ = tokio::time::sleep_until(next_accept.unwrap_or_else(Instant::now)), if next_accept.is_some() => {
                    next_accept = None;
                    continue;
                }
                accepted = tcp.accept(), if next_accept.is_none() => accepted,
            };
            let (socket, peer) = match accepted {
                Ok(accepted) => {
                    backoff = ACCEPT_BACKOFF_START;
                    accepted
                }
                Err(e) if is_per_connection(&e) => {
                    debug!(listener = %name, "accept: {e}");
                    continue;
                }
                Err(e) => {
                    warn!(listener = %name, "accept failed: {e}; retrying in {backoff:?}");
                    tokio::select! {
                        _ = shutdown.wait() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            if let Some(bucket) = &mut rate {
                next_accept = bucket.take(1, std::time::Instant::now()).map(|wait| Instant::now() + wait);
            }
            // The broker's slot first, then the listener's: a client refused by either holds
            // neither.
            let admitted = match broker_connections.clone().try_acquire_owned() {
                Err(_) => Err(Refusal::ConnectionLimit { limit: broker_max_connections, scope: LimitScope::Broker }),
                Ok(b) => match limit.clone().try_acquire_owned() {
                    Ok(l) => Ok(ConnectionSlot::new([Some(b), Some(l)])),
                    Err(_) => Err(Refusal::ConnectionLimit { limit: max_connections, scope: LimitScope::Listener }),
                },
            };
            let (slots, refusal) = match admitted {
                Ok(slots) => (slots, None),
                Err(refusal) => {
                    log_limited_by!(
                        &refusals, std::time::Instant::now(), warn, format_args!("{name}: connections refused"),
                        listener = %name, %peer, "{refusal}: refusing new connections"
                    );
                    match refusing.clone().try_acquire_owned() {
                        Ok(p) => (ConnectionSlot::new([Some(p), None]), Some(refusal)),
                        Err(_) => {
                            // Too many being refused already: close at once.
                            debug!(listener = %name, %peer, "{refusal}; closed without an answer");
                            continue;
                        }
                    }
                }
            };
            let id = ConnectionId::next();
            let ctx = ConnectionContext {
                id,
                broker: broker.clone(),
                listener: settings.clone(),
                shutdown: shutdown.clone(),
                refusal,
                slot: slots,
            };
            let span = tracing::debug_span!("connection", %id, %peer, listener = %name);
            let tls = tls.as_ref().map(|t| TlsAcceptor::from(t.load_full()));
            let transport = Handshakes { tls, websocket: websocket.clone() };
            tasks.spawn(connection(socket, peer, transport, handler.clone(), ctx).instrument(span));
        }
        // Closing the socket makes new clients see "connection refused" instead of waiting.
        drop(tcp);
        // Every connection holds a slot, whether a task serves it or its frontend parked it
        // without one (an idle MQTT connection, see ferry_mqtt's `park`): the slots tell how many
        // are open, and the drain waits for all of them to be given back. (Counted when the
        // listener sees the shutdown: a frontend that ends its connections at the same signal
        // may have ended some a moment before, which are then counted nowhere.)
        let open_now = || (max_connections - limit.available_permits()) + (MAX_REFUSING - refusing.available_permits());
        let open = open_now().max(tasks.len());
        info!(listener = %name, "stopped accepting; waiting up to {grace:?} for {open} connection(s)");
        let drained = tokio::time::timeout(grace, async {
            while let Some(done) = tasks.join_next().await {
                report(&name, done);
            }
            // Parked connections woken by the shutdown end in tasks of their own: their slots
            // come back when they end. (Refusals hold no slot of the listener's, and their tasks
            // are all joined. A limit above 2^32 - 1, which nobody configures, waits for all
            // but the rest.)
            let _all = limit.acquire_many(u32::try_from(max_connections).unwrap_or(u32::MAX)).await;
        })
        .await;
        let aborted = if drained.is_err() { open_now().max(tasks.len()) } else { 0 };
        if aborted > 0 {
            warn!(listener = %name, "aborting {aborted} connection(s) still open after {grace:?}");
            tasks.shutdown().await;
        }
        Drained { closed: open.saturating_sub(aborted), aborted }
    }
}

/// Errors about one would-be connection that went away before it was accepted.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted)
}

fn report(listener: &str, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            error!(listener, "connection task panicked: {e}");
        }
    }
}

/// What a connection goes through before its handler sees it, in this order.
struct Handshakes {
    tls: Option<TlsAcceptor>,
    websocket: Option<Arc<Upgrade>>,
}

/// A connection being served by its handler.
type Serving = Pin<Box<dyn Future<Output = Result<(), ConnectionError>> + Send>>;

/// One connection: TCP options, the TLS handshake and the WebSocket upgrade if configured, then
/// its handler. Its connection slot is in `ctx`, which the handler keeps for as long as the
/// connection lives.
///
/// Not an `async fn`: the task would keep room for its arguments and for the handshakes for
/// the connection's whole life. What the task holds while the handler serves is the handler's
/// boxed future; the rest is in a boxed future that ends with the handshakes.
fn connection(
    socket: TcpStream,
    peer: SocketAddr,
    handshakes: Handshakes,
    handler: Handler,
    ctx: ConnectionContext,
) -> impl Future<Output = ()> + Send {
    let starting = Box::pin(start(socket, peer, handshakes, handler, ctx));
    async move {
        let Some(serving) = starting.await else { return };
        if let Err(e) = serving.await {
            debug!("connection ended: {e}");
        }
    }
}

/// TCP options and the transport's handshakes; then the handler's future, not yet polled.
async fn start(
    socket: TcpStream,
    peer: SocketAddr,
    handshakes: Handshakes,
    handler: Handler,
    mut ctx: ConnectionContext,
) -> Option<Serving> {
    let local = match socket.local_addr() {
        Ok(local) => local,
        Err(e) => {
            debug!("local_addr: {e}");
            return None;
        }
    };
    if let Err(e) = socket.set_nodelay(true) {
        debug!("set_nodelay: {e}");
    }
    // Set before the first byte, so that the window the peer is told never exceeds them.
    let limits = &ctx.listener.limits;
    if limits.socket_send_buffer > 0 {
        if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(&socket, limits.socket_send_buffer) {
            debug!("SO_SNDBUF: {e}");
        }
    }
    if limits.socket_recv_buffer > 0 {
        if let Err(e) = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, limits.socket_recv_buffer) {
            debug!("SO_RCVBUF: {e}");
        }
    }
    let stream = transport(socket, peer, local, handshakes, &mut ctx).await?;
    Some(match handler {
        Handler::Frontend(frontend) => frontend.serve(stream, ctx),
        Handler::Unserved(protocol) => Box::pin(async move {
            let ConnectionContext { mut shutdown, slot: _slot, .. } = ctx;
            tokio::select! {
                r = crate::unserved::serve(protocol, stream) => r.map_err(ConnectionError::from),
                _ = shutdown.wait() => Ok(()),
            }
        }),
    })
}

/// TLS (if the listener has it), then the WebSocket upgrade (if it has one): the stream the
/// handler gets, or `None` when a handshake failed, timed out or shutdown came first.
async fn transport(
    socket: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    handshakes: Handshakes,
    ctx: &mut ConnectionContext,
) -> Option<ClientStream> {
    // One deadline for the transport's handshakes together, so that wss gets no more time than
    // TLS alone; the protocol handshake gets its own timeout in the frontend.
    let handshake_timeout = ctx.listener.limits.handshake_timeout;
    let deadline = Instant::now() + handshake_timeout;
    let websocket = handshakes.websocket.as_deref();
    match handshakes.tls {
        None => upgrade(socket, peer, local, None, websocket, deadline, ctx).await,
        Some(acceptor) => {
            let handshake = tokio::select! {
                _ = ctx.shutdown.wait() => return None,
                r = tokio::time::timeout_at(deadline, acceptor.accept(socket)) => r,
            };
            match handshake {
                Ok(Ok(stream)) => {
                    let identity = tls::identity(stream.get_ref().1);
                    upgrade(stream, peer, local, Some(identity), websocket, deadline, ctx).await
                }
                Ok(Err(e)) => {
                    log_limited!(info, "TLS handshake failed", listener = %ctx.listener.name, %peer, "TLS handshake failed: {e}");
                    None
                }
                Err(_) => {
                    log_limited!(
                        info, "TLS handshake timeout", listener = %ctx.listener.name, %peer,
                        "TLS handshake not completed within {handshake_timeout:?}"
                    );
                    None
                }
            }
        }
    }
}

/// The WebSocket upgrade if the listener has one, then the `ClientStream` the handler gets;
/// `None` when the upgrade failed, timed out or shutdown came first.
async fn upgrade<S>(
    io: S,
    peer: SocketAddr,
    local: SocketAddr,
    tls: Option<TlsIdentity>,
    websocket: Option<&Upgrade>,
    deadline: Instant,
    ctx: &mut ConnectionContext,
) -> Option<ClientStream>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Some(websocket) = websocket else {
        return Some(ClientStream::new(io, peer, local, tls));
    };
    let upgraded = tokio::select! {
        _ = ctx.shutdown.wait() => return None,
        r = tokio::time::timeout_at(deadline, websocket.accept(io)) => r,
    };
    match upgraded {
        Ok(Ok(ws)) => Some(ClientStream::new(ws, peer, local, tls)),
        Ok(Err(e)) => {
            log_limited!(info, "WebSocket upgrade refused", listener = %ctx.listener.name, %peer, "WebSocket upgrade refused: {e}");
            None
        }
        Err(_) => {
            let timeout = ctx.listener.limits.handshake_timeout;
            log_limited!(
                info, "WebSocket upgrade timeout", listener = %ctx.listener.name, %peer,
                "WebSocket upgrade not completed within {timeout:?}"
            );
            None
        }
    }
}

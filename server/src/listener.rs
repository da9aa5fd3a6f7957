//! One accept loop per listener, and the task that takes one connection through TLS and the
//! WebSocket upgrade (each if configured) to its frontend.
//!
//! The loop owns its connection tasks in a `JoinSet`, so that on shutdown it can wait for them
//! (up to the grace period) and abort the rest. Accepting is bounded by a semaphore of
//! `max_connections` permits (as mini-redis's `MAX_CONNECTIONS`): with none free the loop stops
//! accepting, and the kernel's backlog holds new clients until a connection closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ferry_core::frontend::{ClientStream, ConnectionContext, Frontend, ListenerSettings, Shutdown, TlsIdentity};
use ferry_core::{Broker, ConnectionId, Protocol};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
}

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
        let Listener { tcp, settings, tls, websocket, handler, max_connections } = self;
        let name = settings.name.clone();
        let limit = Arc::new(Semaphore::new(max_connections));
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
                accepted = accept(&tcp, &limit) => accepted,
            };
            let (socket, peer, permit) = match accepted {
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
            let id = ConnectionId::next();
            let ctx = ConnectionContext {
                id,
                broker: broker.clone(),
                listener: settings.clone(),
                shutdown: shutdown.clone(),
            };
            let span = tracing::debug_span!("connection", %id, %peer, listener = %name);
            let tls = tls.as_ref().map(|t| TlsAcceptor::from(t.load_full()));
            let transport = Handshakes { tls, websocket: websocket.clone() };
            tasks.spawn(connection(socket, peer, permit, transport, handler.clone(), ctx).instrument(span));
        }
        // Closing the socket makes new clients see "connection refused" instead of waiting.
        drop(tcp);
        let open = tasks.len();
        info!(listener = %name, "stopped accepting; waiting up to {grace:?} for {open} connection(s)");
        let drained = tokio::time::timeout(grace, async {
            while let Some(done) = tasks.join_next().await {
                report(&name, done);
            }
        })
        .await;
        let aborted = if drained.is_err() { tasks.len() } else { 0 };
        if aborted > 0 {
            warn!(listener = %name, "aborting {aborted} connection(s) still open after {grace:?}");
            tasks.shutdown().await;
        }
        Drained { closed: open - aborted, aborted }
    }
}

/// Waits for a free connection slot, then for a client. Cancel-safe: a permit or accept lost
/// to a cancelled `select!` costs nothing.
async fn accept(
    tcp: &TcpListener,
    limit: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = limit.clone().acquire_owned().await.expect("the listener never closes its semaphore");
    let (socket, peer) = tcp.accept().await?;
    Ok((socket, peer, permit))
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

/// One connection: TCP options, the TLS handshake and the WebSocket upgrade if configured, then
/// its handler. Holds its connection slot until it returns.
async fn connection(
    socket: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    handshakes: Handshakes,
    handler: Handler,
    mut ctx: ConnectionContext,
) {
    let local = match socket.local_addr() {
        Ok(local) => local,
        Err(e) => {
            debug!("local_addr: {e}");
            return;
        }
    };
    if let Err(e) = socket.set_nodelay(true) {
        debug!("set_nodelay: {e}");
    }
    // One deadline for the transport's handshakes together, so that wss gets no more time than
    // TLS alone; the protocol handshake gets its own timeout in the frontend.
    let handshake_timeout = ctx.listener.limits.handshake_timeout;
    let deadline = Instant::now() + handshake_timeout;
    let websocket = handshakes.websocket.as_deref();
    let stream = match handshakes.tls {
        None => upgrade(socket, peer, local, None, websocket, deadline, &mut ctx).await,
        Some(acceptor) => {
            let handshake = tokio::select! {
                _ = ctx.shutdown.wait() => return,
                r = tokio::time::timeout_at(deadline, acceptor.accept(socket)) => r,
            };
            match handshake {
                Ok(Ok(stream)) => {
                    let identity = tls::identity(stream.get_ref().1);
                    upgrade(stream, peer, local, Some(identity), websocket, deadline, &mut ctx).await
                }
                Ok(Err(e)) => {
                    debug!("TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    debug!("TLS handshake not completed within {handshake_timeout:?}");
                    return;
                }
            }
        }
    };
    let Some(stream) = stream else { return };
    match handler {
        Handler::Frontend(frontend) => {
            if let Err(e) = frontend.serve(stream, ctx).await {
                debug!("connection ended: {e}");
            }
        }
        Handler::Unserved(protocol) => {
            let result = tokio::select! {
                r = crate::unserved::serve(protocol, stream) => r,
                _ = ctx.shutdown.wait() => Ok(()),
            };
            if let Err(e) = result {
                debug!("connection ended: {e}");
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
            debug!("WebSocket upgrade refused: {e}");
            None
        }
        Err(_) => {
            debug!("WebSocket upgrade not completed within {:?}", ctx.listener.limits.handshake_timeout);
            None
        }
    }
}

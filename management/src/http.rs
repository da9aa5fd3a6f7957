//! One HTTP listener's accept loop.
//!
//! Limits, in the order a client meets them: `max_connections` (a semaphore taken before
//! `accept`, so past it clients wait in the kernel's backlog, as mini-redis does), the TLS
//! handshake within `header_timeout`, the request headers within `header_timeout` and at most
//! [`MAX_HEADER_BYTES`], the body within [`MAX_BODY_BYTES`](crate::MAX_BODY_BYTES) (axum's
//! limit, set on the router). HTTP/1.1 only: the API's clients (curl, Prometheus,
//! rabbitmqadmin, KEDA) all speak it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use ferry_core::frontend::Shutdown;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::HttpSettings;

/// hyper's read buffer, which bounds a request's headers (hyper's minimum is 8 KiB).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The client's address, put into every request's extensions (the login throttle counts
/// failures per address).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub SocketAddr);

/// Back-off after an accept error that is not about one connection (EMFILE and the like).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub(crate) async fn run(
    tcp: TcpListener,
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    router: Router,
    settings: HttpSettings,
    mut shutdown: Shutdown,
) {
    let name = settings.name.clone();
    info!("{name}: listening{} (metrics and management API)", if tls.is_some() { " (TLS)" } else { "" });
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = GracefulShutdown::new();
    // The connections' tasks, aborted if still running after the grace period.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        // Finished tasks are taken out as new ones come (the set holds at most
        // `max_connections` running ones).
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            accepted = tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!("{name}: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = router.clone().map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(Peer(peer));
            req
        });
        let service = TowerToHyperService::new(service);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(settings.header_timeout).max_buf_size(MAX_HEADER_BYTES);
        let timeout = settings.header_timeout;
        match &tls {
            None => {
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tasks.spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(%peer, "http connection ended: {e}");
                    }
                    drop(permit);
                });
            }
            Some(config) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(config.load_full());
                // The handshake runs in the connection's task; the graceful shutdown watches
                // the connection once it is up (a handshake in progress ends with its timeout).
                let watcher = graceful.watcher();
                tasks.spawn(async move {
                    let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            debug!(%peer, "http TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "http TLS handshake timed out");
                            return;
                        }
                    };
                    let conn = watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
                    if let Err(e) = conn.await {
                        debug!(%peer, "https connection ended: {e}");
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(tcp);
    // Connections finish the request they are on (keep-alive ends), within the grace period.
    if tokio::time::timeout(settings.grace, graceful.shutdown()).await.is_err() {
        debug!("{name}: {} connection(s) still open after the grace period, aborted", tasks.len());
    }
    tasks.shutdown().await;
    info!("{name}: stopped");
}

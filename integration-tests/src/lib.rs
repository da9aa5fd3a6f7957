//! Helpers shared by Ferry's end-to-end tests (the tests themselves are in `tests/`).
//!
//! # Layout
//!
//! - [`EchoFrontend`]: a test-only frontend that tells the client how many TLS peer certificates
//!   it saw, then echoes bytes until the client closes or the server shuts down.
//! - [`DeafFrontend`]: a frontend that ignores the shutdown signal, to exercise the grace period.
//! - [`FailingStore`]: a [`MemoryStore`](ferry_core::store::MemoryStore) whose writes fail at
//!   the flip of a switch (a full or failing disk), for [`TestServer::start_with_store`].
//! - [`TestServer`]: writes a config into a temporary directory and starts a server in-process
//!   with the given frontends (listeners normally bind `127.0.0.1:0`); [`TestServer::restart`]
//!   shuts it down gracefully and starts a new one on the same directory and store.
//! - [`within`]: awaits a future or fails the test after [`TIMEOUT`].
//! - [`mqtt`]: [`TestServer::mqtt`] (the real MQTT frontend), rumqttc 3.1.1 / 5.0 clients driven
//!   from their own tasks, and a raw client for malformed input.
//! - [`amqp`]: [`TestServer::amqp`], lapin and amqprs connections, and a raw AMQP client.
//! - [`rabbitmq`]: a real RabbitMQ started once per test binary (shovels, definitions), or
//!   `None` where it is not installed.
//! - [`cross`]: [`TestServer::both`] (one MQTT and one AMQP listener on one broker) and the
//!   lapin / rumqttc 5 helpers the cross-protocol tests share.
//! - [`management`]: a server with an HTTP listener and a user of each RabbitMQ tag, and the
//!   reqwest / lapin helpers the management API tests share.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::frontend::{ClientStream, ConnectionContext, Frontend, Serving};
use ferry_core::Protocol;
use ferry_server::{Config, Server, StartError};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub mod amqp;
pub mod cross;
pub mod management;
pub mod mosquitto;
pub mod mqtt;
pub mod rabbitmq;

/// How long any single awaited event may take before a test fails (generous: debug builds on a
/// shared machine).
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test if it takes longer than [`TIMEOUT`].
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: not done within {TIMEOUT:?}"),
    }
}

/// A TCP connection to `addr` from the local address `from` (any of 127.0.0.0/8 on loopback):
/// a client on another host, as the broker sees it (login failures count per address).
pub async fn tcp_connect_from(addr: std::net::SocketAddr, from: std::net::IpAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(std::net::SocketAddr::new(from, 0)).expect("bind the client's address");
    within("TCP connect", socket.connect(addr)).await.expect("TCP connect")
}

/// Sends one byte (the number of TLS peer certificates, 0 for plain TCP, capped at 254), then
/// echoes everything until EOF or shutdown, then closes its side. A connection the listener
/// hands over only to be refused (over a connection limit) gets [`EchoFrontend::REFUSED`] and
/// is closed.
#[derive(Debug)]
pub struct EchoFrontend {
    protocol: Protocol,
}

impl EchoFrontend {
    /// The greeting of a refused connection.
    pub const REFUSED: u8 = 0xFF;

    pub fn new(protocol: Protocol) -> Arc<EchoFrontend> {
        Arc::new(EchoFrontend { protocol })
    }
}

impl Frontend for EchoFrontend {
    fn protocol(&self) -> Protocol {
        self.protocol
    }

    fn serve(&self, mut stream: ClientStream, mut ctx: ConnectionContext) -> Serving {
        Box::pin(async move {
            // Its slot is held while it lives (the block captures only the fields it uses).
            let _slot = std::mem::take(&mut ctx.slot);
            if ctx.refusal.is_some() {
                stream.write_all(&[EchoFrontend::REFUSED]).await?;
                stream.shutdown().await?;
                return Ok(());
            }
            let certs = stream.tls.as_ref().map_or(0, |t| t.peer_certificates.len());
            stream.write_all(&[certs.min(254) as u8]).await?;
            let mut buf = vec![0u8; 4096];
            loop {
                // `read` is cancel-safe: nothing is lost if shutdown wins the race.
                let n = tokio::select! {
                    r = stream.read(&mut buf) => r?,
                    _ = ctx.shutdown.wait() => break,
                };
                if n == 0 {
                    break;
                }
                stream.write_all(&buf[..n]).await?;
            }
            stream.shutdown().await?;
            Ok(())
        })
    }
}

/// Sends one byte, then holds the connection until the client closes, ignoring shutdown.
#[derive(Debug)]
pub struct DeafFrontend {
    protocol: Protocol,
}

impl DeafFrontend {
    pub fn new(protocol: Protocol) -> Arc<DeafFrontend> {
        Arc::new(DeafFrontend { protocol })
    }
}

impl Frontend for DeafFrontend {
    fn protocol(&self) -> Protocol {
        self.protocol
    }

    fn serve(&self, mut stream: ClientStream, ctx: ConnectionContext) -> Serving {
        Box::pin(async move {
            // Its slot is held while it lives.
            let _slot = ctx.slot;
            stream.write_all(b"!").await?;
            let mut buf = [0u8; 64];
            while stream.read(&mut buf).await? > 0 {}
            Ok(())
        })
    }
}

/// A [`MemoryStore`](ferry_core::store::MemoryStore) whose writes can be made to fail, like a
/// full or failing disk. While [`FailingStore::set_failing`] is on, every `submit` fails at once
/// with `StoreError::Io` (nothing of it is applied); like the redb store, it then reports itself
/// failing (`is_failing`, which raises the disk alarm) until a submit succeeds again — the
/// broker's own probe write once the switch is off. `recover` and `flush` are the inner store's.
#[derive(Debug, Default)]
pub struct FailingStore {
    inner: ferry_core::store::MemoryStore,
    /// The switch: submits fail while it is on.
    fail: std::sync::atomic::AtomicBool,
    /// The last submit failed.
    failing: std::sync::atomic::AtomicBool,
    /// Submits refused so far.
    refused: std::sync::atomic::AtomicU64,
}

impl FailingStore {
    pub fn new() -> Arc<FailingStore> {
        Arc::new(FailingStore::default())
    }
    /// Turns failing writes on or off.
    pub fn set_failing(&self, on: bool) {
        self.fail.store(on, std::sync::atomic::Ordering::SeqCst);
    }
    /// How many submits failed so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// The store underneath (what was written while the switch was off).
    pub fn inner(&self) -> &ferry_core::store::MemoryStore {
        &self.inner
    }
}

impl ferry_core::store::Store for FailingStore {
    fn submit(&self, ops: Vec<ferry_core::store::StoreOp>) -> ferry_core::store::Commit {
        use std::sync::atomic::Ordering::SeqCst;
        if self.fail.load(SeqCst) {
            self.failing.store(true, SeqCst);
            self.refused.fetch_add(1, SeqCst);
            return ferry_core::store::Commit::done(Err(ferry_core::store::StoreError::Io(
                "injected: no space left on device".into(),
            )));
        }
        self.failing.store(false, SeqCst);
        self.inner.submit(ops)
    }
    fn recover(&self) -> Result<ferry_core::store::Snapshot, ferry_core::store::StoreError> {
        self.inner.recover()
    }
    fn flush(&self) -> ferry_core::store::Commit {
        self.inner.flush()
    }
    fn read_range(
        &self,
        vhost: &str,
        queue: &ferry_core::message::ShortString,
        from_seq: u64,
        max_count: usize,
        max_bytes: u64,
    ) -> ferry_core::store::ReadRange {
        self.inner.read_range(vhost, queue, from_seq, max_count, max_bytes)
    }
    fn is_failing(&self) -> bool {
        self.failing.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A server started in-process from a config file in its own temporary directory.
#[derive(Debug)]
pub struct TestServer {
    pub server: Server,
    /// Holds the config, the data directory and whatever the test put there (certificates).
    pub dir: TempDir,
}

impl TestServer {
    /// Writes `toml` to `dir/ferry.toml`, loads it (relative paths resolve against `dir`), puts
    /// the data directory inside `dir`, and starts a server with `frontends`.
    pub async fn start_in(dir: TempDir, toml: &str, frontends: &[Arc<dyn Frontend>]) -> Result<TestServer, StartError> {
        let config = write_config(dir.path(), toml);
        let mut builder = Server::builder(config);
        for frontend in frontends {
            builder = builder.frontend(frontend.clone());
        }
        let server = builder.start().await?;
        Ok(TestServer { server, dir })
    }

    /// [`TestServer::start_in`] a fresh temporary directory, panicking if the server does not
    /// start.
    pub async fn start(toml: &str, frontends: &[Arc<dyn Frontend>]) -> TestServer {
        let dir = tempfile::tempdir().expect("temporary directory");
        TestServer::start_in(dir, toml, frontends).await.unwrap_or_else(|e| panic!("server did not start:\n{e}"))
    }

    /// [`TestServer::start`] on `store` (a [`FailingStore`], say) instead of the redb file in the
    /// data directory; the broker is recovered from it.
    pub async fn start_with_store(
        toml: &str,
        frontends: &[Arc<dyn Frontend>],
        store: Arc<dyn ferry_core::store::Store>,
    ) -> TestServer {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut builder = Server::builder(write_config(dir.path(), toml)).store(store);
        for frontend in frontends {
            builder = builder.frontend(frontend.clone());
        }
        let server = builder.start().await.unwrap_or_else(|e| panic!("server did not start:\n{e}"));
        TestServer { server, dir }
    }

    /// The address listener `index` (config order) is bound to.
    pub fn addr(&self, index: usize) -> std::net::SocketAddr {
        self.server.local_addr(index)
    }

    /// The address of the first listener for `protocol` (listener 0 when there is none).
    pub fn addr_of(&self, protocol: Protocol) -> std::net::SocketAddr {
        let index = self.server.listeners().iter().position(|l| l.protocol == protocol).unwrap_or(0);
        self.addr(index)
    }

    /// Restarts the broker: [`TestServer::stop`], then [`TestServer::resume`] on the same
    /// directory (same config file, same data directory and store, fresh frontends with default
    /// settings). Listeners on port 0 get new ports: take addresses from the returned server.
    /// A server started with [`TestServer::start_with_store`] comes back on the redb file of its
    /// data directory, not on that store.
    pub async fn restart(self) -> TestServer {
        let dir = self.stop().await;
        TestServer::resume(dir).await
    }

    /// Shuts the server down gracefully (connections told to close, the store flushed and
    /// closed, as on SIGTERM) and hands back its directory for [`TestServer::resume`]. There is
    /// no in-process SIGKILL; the crash test drives the `ferry` binary.
    pub async fn stop(self) -> TempDir {
        let TestServer { server, dir } = self;
        // Bounded by the grace period (10 s by default) plus the usual allowance.
        let limit = Duration::from_secs(10) + TIMEOUT;
        match tokio::time::timeout(limit, server.shutdown()).await {
            Ok(Ok(_report)) => {}
            Ok(Err(e)) => panic!("shutdown failed: {e}"),
            Err(_) => panic!("shutdown: not done within {limit:?}"),
        }
        dir
    }

    /// Starts a server again in a directory a stopped [`TestServer`] left: `dir/ferry.toml` as
    /// it was, the same data directory, and a new frontend with default settings for each
    /// protocol the config has listeners for. The old frontends are not reused: they hold
    /// per-broker state (the MQTT session registry), which a real restart loses.
    pub async fn resume(dir: TempDir) -> TestServer {
        let config = write_config(dir.path(), &read_config(dir.path()));
        // One frontend per protocol, as the `ferry` binary builds them.
        let mut frontends: Vec<Arc<dyn Frontend>> = Vec::new();
        for protocol in config.listeners.iter().map(|l| l.protocol) {
            if frontends.iter().any(|f| f.protocol() == protocol) {
                continue;
            }
            match protocol {
                Protocol::Mqtt => frontends.push(Arc::new(ferry_mqtt::MqttFrontend::default())),
                Protocol::Amqp => frontends.push(Arc::new(ferry_amqp::AmqpFrontend::default())),
                Protocol::Internal => {}
            }
        }
        TestServer::resume_with(dir, &frontends).await
    }

    /// [`TestServer::resume`] with the given (new) frontends.
    pub async fn resume_with(dir: TempDir, frontends: &[Arc<dyn Frontend>]) -> TestServer {
        let toml = read_config(dir.path());
        TestServer::start_in(dir, &toml, frontends).await.unwrap_or_else(|e| panic!("server did not restart:\n{e}"))
    }
}

/// The text of `dir/ferry.toml`.
fn read_config(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("ferry.toml")).expect("read ferry.toml")
}

/// Writes and loads `dir/ferry.toml`, with the data directory moved into `dir/data` so that
/// tests never write to the working directory.
pub fn write_config(dir: &Path, toml: &str) -> Config {
    let path = dir.join("ferry.toml");
    std::fs::write(&path, toml).expect("write config");
    let mut config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    config.broker.data_dir = dir.join("data");
    config
}

/// A TCP proxy to `target` on a loopback port, whose client-to-target direction can be stalled
/// (`true` sent on the returned watch): it stops reading what the client sends, while the
/// target keeps talking to the client. For bridges and shovels facing a remote that does not
/// read.
pub async fn stalling_proxy(target: std::net::SocketAddr) -> (u16, tokio::sync::watch::Sender<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stall, stalled) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(target).await else { continue };
            let (mut from_shovel, mut to_shovel) = inbound.into_split();
            let (mut from_remote, mut to_remote) = outbound.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_remote, &mut to_shovel).await;
            });
            let mut stalled = stalled.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                loop {
                    if stalled.wait_for(|s| !*s).await.is_err() {
                        return;
                    }
                    match from_shovel.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if to_remote.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (port, stall)
}

/// A CA, a server certificate for `localhost` and a client certificate (CN `edge`), as PEM files
/// in `dir`: ca.pem, server.pem, server.key, client.pem, client.key. For bridges and shovels
/// over TLS.
pub fn write_pki(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name.push(DnType::CommonName, "ferry test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        (params.signed_by(&key, &ca, &ca_key).unwrap(), key)
    };
    let (server, server_key) = leaf(vec!["localhost".into()], "remote");
    let (client, client_key) = leaf(vec!["edge".into()], "edge");
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("client.pem"), client.pem()).unwrap();
    std::fs::write(dir.join("client.key"), client_key.serialize_pem()).unwrap();
}

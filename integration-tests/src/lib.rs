//! Helpers shared by Ferry's end-to-end tests (the tests themselves are in `tests/`).
//!
//! # Layout
//!
//! - [`EchoFrontend`]: a test-only frontend that tells the client how many TLS peer certificates
//!   it saw, then echoes bytes until the client closes or the server shuts down.
//! - [`DeafFrontend`]: a frontend that ignores the shutdown signal, to exercise the grace period.
//! - [`TestServer`]: writes a config into a temporary directory and starts a server in-process
//!   with the given frontends (listeners normally bind `127.0.0.1:0`).
//! - [`within`]: awaits a future or fails the test after [`TIMEOUT`].
//! - [`mqtt`]: [`TestServer::mqtt`] (the real MQTT frontend), rumqttc 3.1.1 / 5.0 clients driven
//!   from their own tasks, and a raw client for malformed input.
//! - [`amqp`]: [`TestServer::amqp`], lapin and amqprs connections, and a raw AMQP client.
//! - [`cross`]: [`TestServer::both`] (one MQTT and one AMQP listener on one broker) and the
//!   lapin / rumqttc 5 helpers the cross-protocol tests share.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferry_core::frontend::{ClientStream, ConnectionContext, ConnectionError, Frontend};
use ferry_core::Protocol;
use ferry_server::{Config, Server, StartError};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub mod amqp;
pub mod cross;
pub mod mqtt;

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

/// Sends one byte (the number of TLS peer certificates, 0 for plain TCP, capped at 255), then
/// echoes everything until EOF or shutdown, then closes its side.
#[derive(Debug)]
pub struct EchoFrontend {
    protocol: Protocol,
}

impl EchoFrontend {
    pub fn new(protocol: Protocol) -> Arc<EchoFrontend> {
        Arc::new(EchoFrontend { protocol })
    }
}

#[async_trait]
impl Frontend for EchoFrontend {
    fn protocol(&self) -> Protocol {
        self.protocol
    }

    async fn serve(&self, mut stream: ClientStream, mut ctx: ConnectionContext) -> Result<(), ConnectionError> {
        let certs = stream.tls.as_ref().map_or(0, |t| t.peer_certificates.len());
        stream.write_all(&[certs.min(255) as u8]).await?;
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

#[async_trait]
impl Frontend for DeafFrontend {
    fn protocol(&self) -> Protocol {
        self.protocol
    }

    async fn serve(&self, mut stream: ClientStream, _ctx: ConnectionContext) -> Result<(), ConnectionError> {
        stream.write_all(b"!").await?;
        let mut buf = [0u8; 64];
        while stream.read(&mut buf).await? > 0 {}
        Ok(())
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

    /// The address listener `index` (config order) is bound to.
    pub fn addr(&self, index: usize) -> std::net::SocketAddr {
        self.server.local_addr(index)
    }

    /// The address of the first listener for `protocol` (listener 0 when there is none).
    pub fn addr_of(&self, protocol: Protocol) -> std::net::SocketAddr {
        let index = self.server.listeners().iter().position(|l| l.protocol == protocol).unwrap_or(0);
        self.addr(index)
    }
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

//! Ferry's server: the `ferry` binary's library, so tests can start a server in-process.
//!
//! # Layout
//!
//! - [`cli`]: the command line (`ferry`, `ferry --config FILE`, `ferry check-config FILE`,
//!   `ferry passwd`, `ferry ctl …`).
//! - [`config`]: the TOML file → a validated [`Config`] (or the embedded defaults), refusing bad
//!   input with the file, the key and the reason.
//! - [`passwd`]: `ferry passwd`: a password from the terminal or stdin → an argon2id hash.
//! - [`ctl`]: `ferry ctl`: a blocking client of a running Ferry's management API (lists as
//!   tables or JSON, purge, delete, close, definitions export / import).
//! - [`logging`]: the `tracing` subscriber; `--log-level` > `RUST_LOG` > `broker.log_level`.
//! - [`tls`]: a listener's `tls` table → a rustls `ServerConfig`; a session → `TlsIdentity`.
//! - [`server`]: [`Server::builder`] takes a [`Config`] and the frontends,
//!   [`start`](ServerBuilder::start) binds the listeners and wires them to one
//!   [`Broker`](ferry_core::Broker); [`Server::reload`] swaps in new TLS material and users;
//!   [`Server::shutdown`] stops them gracefully.
//! - `listener`: one accept loop per listener (bounded by `max_connections`); each connection
//!   gets TCP_NODELAY, the TLS handshake if configured, the WebSocket upgrade if configured,
//!   then its frontend's `serve`.
//! - `websocket`: MQTT over WebSocket: the HTTP upgrade (path, `mqtt` subprotocol) and the
//!   adapter that makes binary WebSocket messages a byte stream again.
//! - `unserved`: what a default listener whose protocol has no frontend yet answers (AMQP's
//!   protocol header, MQTT's CONNACK "server unavailable").
//! - [`signals`]: SIGINT / SIGTERM (shut down), SIGHUP (reload: [`Server::reload`]).
//! - `protocol = "http"` listeners are served by the `ferry-management` crate (Prometheus
//!   `/metrics` and the management API), started beside the protocol listeners.
//!
//! A connection flows: `TcpListener::accept` (listener) → TLS (tls) → WebSocket (websocket) →
//! `ClientStream` + `ConnectionContext` → `Frontend::serve` (a protocol crate) → the broker core.

pub mod cli;
pub mod config;
pub mod ctl;
pub mod frontends;
mod listener;
pub mod logging;
pub mod passwd;
pub mod server;
pub mod signals;
pub mod tls;
mod unserved;
mod websocket;

pub use config::{Config, ConfigError, ConfigSource, HttpListenerConfig, ListenerConfig, TlsConfig, Transport};
pub use server::{
    check, check_file, BoundListener, CheckError, ReloadError, ReloadReport, Server, ServerBuilder, ShutdownError,
    ShutdownReport, StartError, StartProblem,
};

//! Ferry's HTTP side (issue 17): Prometheus `GET /metrics` and the RabbitMQ-compatible
//! management API (`/api/...`), served by every `protocol = "http"` listener.
//!
//! # Layout
//!
//! - [`Management`]: what every HTTP listener of one server shares: the broker, the bridges'
//!   status, the login cache and the rate sampler. [`Management::serve`] runs one listener.
//! - `http`: the accept loop: a connection limit, TLS if configured, then hyper's HTTP/1.1
//!   with a header read timeout and a bounded header buffer, serving the axum router; graceful
//!   shutdown with the server's signal.
//! - `login`: HTTP Basic credentials → a [`Caller`](login::Caller) with RabbitMQ's user tags,
//!   checked by the broker's authenticator (its argon2 pool and per-address throttle) and then
//!   cached for a short while under a keyed hash of user and password.
//! - `rates`: samples the counters the core keeps in place (vhost, queue and connection
//!   counters) every few seconds, so message rates need no stats database.
//! - `metrics`: the Prometheus text exposition, under Ferry's names or RabbitMQ's.
//! - `users`: users and permissions made at run time (`PUT|DELETE /api/users/…`,
//!   `/api/permissions/…`), the broker's run-time layer; `definitions`: RabbitMQ's definitions
//!   export and import (`/api/definitions`); `bridges`: the bridges' and shovels' status
//!   (`/api/bridges`, `/api/shovels`); `parameters`: RabbitMQ's runtime parameters, the
//!   dynamic shovels (`/api/parameters/shovel/…`).
//! - `api`: the JSON endpoints, in RabbitMQ's shapes; `query` holds what lists share
//!   (`columns`, `sort`, `page`, `name` + `use_regex`); `error` the JSON errors. Beside it:
//!   `objects` (channels, consumers, users, permissions), `topology` (declaring and deleting
//!   exchanges, bindings), `messages` (publish, get, aliveness test) and `mqtt` (MQTT
//!   sessions and retained messages).
//! - `dashboard`: the web dashboard at `/` (HTML, JS and CSS from `assets/`, embedded), which
//!   reads the API from the browser.
//!
//! A request flows: accept (http) → hyper → axum router → `login::Caller` extractor → a handler
//! in `api` or `metrics`, which reads the broker (off the async workers when it walks every
//! queue) and renders.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ferry_core::auth::AuthPolicy;
use ferry_core::frontend::Shutdown;
use ferry_core::Broker;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

mod api;
mod bridges;
mod dashboard;
mod definitions;
mod error;
mod http;
mod login;
mod messages;
mod metrics;
mod mqtt;
mod objects;
mod parameters;
mod query;
mod rates;
mod topology;
mod users;

/// The RabbitMQ management API version whose shapes Ferry's answers follow (checked against
/// the rabbitmq-server 3.10.8 package's `api/index.html` and `rabbitmqadmin`).
pub const RABBITMQ_API_VERSION: &str = "3.10.8";

/// How often message counters are sampled for rates (RabbitMQ's `collect_statistics_interval`
/// default, 5 s).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// The largest request body accepted (a definitions import would be the largest; 1 MiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Requests that walk every queue (lists, `/metrics`) served at once; the rest wait their turn,
/// so that scrapers cannot take every core from the broker.
const MAX_CONCURRENT_RENDERS: usize = 2;

/// One HTTP listener's settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// As logs name it (`http 127.0.0.1:15672`).
    pub name: String,
    pub max_connections: usize,
    /// The time a client has for a request's headers (and a TLS handshake).
    pub header_timeout: Duration,
    /// Queues `/metrics` lists one by one.
    pub metrics_max_queues: usize,
    /// `guest` / `guest` is accepted (as an administrator, RabbitMQ's default user) when no
    /// user is called guest: on loopback listeners only.
    pub auth: AuthPolicy,
    /// How long a connection gets to finish its request once shutdown starts.
    pub grace: Duration,
}

/// A protocol listener, as `/api/overview` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    /// RabbitMQ's names: `amqp`, `mqtt`, `http` (with `/ws` or `/tls` variants as RabbitMQ's).
    pub protocol: String,
    pub addr: SocketAddr,
}

/// What the HTTP listeners of one server share.
#[derive(Debug, Clone)]
pub struct Management {
    shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub broker: Arc<Broker>,
    pub bridges: ferry_bridge::StatusReader,
    pub listeners: Vec<ListenerInfo>,
    pub rates: rates::Rates,
    pub logins: login::LoginCache,
    pub started: Instant,
    pub renders: Semaphore,
    /// The MQTT frontend's sessions, once the server hands them over ([`Management::set_mqtt`]).
    pub mqtt: std::sync::OnceLock<Arc<ferry_mqtt::Shared>>,
}

impl Management {
    /// Starts the rate sampler (every [`SAMPLE_INTERVAL`], until `shutdown`).
    pub fn start(
        broker: Arc<Broker>,
        bridges: ferry_bridge::StatusReader,
        listeners: Vec<ListenerInfo>,
        shutdown: Shutdown,
    ) -> Management {
        Management::start_with_interval(broker, bridges, listeners, shutdown, SAMPLE_INTERVAL)
    }

    /// [`Management::start`] sampling every `interval`.
    pub fn start_with_interval(
        broker: Arc<Broker>,
        bridges: ferry_bridge::StatusReader,
        listeners: Vec<ListenerInfo>,
        shutdown: Shutdown,
        interval: Duration,
    ) -> Management {
        let shared = Arc::new(Shared {
            broker,
            bridges,
            listeners,
            rates: rates::Rates::default(),
            logins: login::LoginCache::new(),
            started: Instant::now(),
            renders: Semaphore::new(MAX_CONCURRENT_RENDERS),
            mqtt: std::sync::OnceLock::new(),
        });
        tokio::spawn(rates::run(Arc::downgrade(&shared), interval, shutdown));
        Management { shared }
    }

    /// Lets `/api/mqtt/sessions` list and delete the MQTT frontend's sessions (without it
    /// they answer `503`). The first call counts.
    pub fn set_mqtt(&self, mqtt: Arc<ferry_mqtt::Shared>) {
        let _ = self.shared.mqtt.set(mqtt);
    }

    /// Serves one HTTP listener until `shutdown`; `tls` is swapped by a reload for new
    /// connections.
    pub fn serve(
        &self,
        tcp: TcpListener,
        tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
        settings: HttpSettings,
        shutdown: Shutdown,
    ) -> JoinHandle<()> {
        let router = api::router(self.shared.clone(), &settings);
        tokio::spawn(http::run(tcp, tls, router, settings, shutdown))
    }
}

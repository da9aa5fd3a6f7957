//! Ferry's MQTT 3.1.1 and 5.0 frontend.
//!
//! # Layout
//!
//! Three layers, kept apart as DESIGN.md asks:
//!
//! 1. [`codec`]: packets as values and their wire form; pure functions over `BytesMut`, no tokio.
//! 2. [`session`]: the session state machine, fed packets, deliveries and the time; it maps MQTT
//!    onto the core (publishes to the listener's exchange, subscriptions as bindings of a direct
//!    sink or of the session's queue, shared subscriptions as shared queues). [`topic`] converts
//!    topics and filters, [`mapping`] converts PUBLISH ↔ core message, [`registry`] holds client
//!    ids (takeover) and persistent session state between connections.
//! 3. [`driver`]: the tokio task per connection: reads, feeds the session, writes coalesced.
//!
//! [`sys`] publishes `$SYS/broker/...` statistics.

pub mod codec;
pub mod driver;
pub mod mapping;
pub mod registry;
pub mod session;
pub mod sys;
pub mod topic;

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ferry_core::frontend::{ClientStream, ConnectionContext, ConnectionError, Frontend};
use ferry_core::message::Protocol;
use ferry_core::vhost::VHost;

pub use session::Settings;

/// Totals across connections, for `$SYS`.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections_total: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// State shared by every connection of the frontend.
#[derive(Debug)]
pub struct Shared {
    pub settings: Settings,
    pub registry: Arc<registry::Registry>,
    pub stats: Stats,
    started: std::time::Instant,
    sys_vhosts: Mutex<HashSet<String>>,
}

impl Shared {
    /// Starts the `$SYS` publisher for a vhost the first time a client connects to it.
    fn ensure_sys(self: &Arc<Self>, vhost: &Arc<VHost>) {
        let mut seen = self.sys_vhosts.lock().unwrap_or_else(|e| e.into_inner());
        if seen.insert(vhost.name().to_string()) {
            tokio::spawn(sys::run(Arc::downgrade(self), vhost.clone()));
        }
    }
}

/// The MQTT frontend: serve it on `protocol = "mqtt"` listeners.
#[derive(Debug, Clone)]
pub struct MqttFrontend {
    shared: Arc<Shared>,
}

impl MqttFrontend {
    pub fn new(settings: Settings) -> MqttFrontend {
        MqttFrontend {
            shared: Arc::new(Shared {
                settings,
                registry: Arc::new(registry::Registry::new()),
                stats: Stats::default(),
                started: std::time::Instant::now(),
                sys_vhosts: Mutex::new(HashSet::new()),
            }),
        }
    }
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Default for MqttFrontend {
    fn default() -> Self {
        MqttFrontend::new(Settings::default())
    }
}

#[async_trait]
impl Frontend for MqttFrontend {
    fn protocol(&self) -> Protocol {
        Protocol::Mqtt
    }

    async fn serve(&self, stream: ClientStream, ctx: ConnectionContext) -> Result<(), ConnectionError> {
        driver::run(stream, ctx, self.shared.clone()).await
    }
}

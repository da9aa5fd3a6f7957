//! Ferry's MQTT 3.1.1 and 5.0 frontend.
//!
//! # Layout
//!
//! Three layers, kept apart as DESIGN.md asks:
//!
//! 1. [`codec`]: packets as values and their wire form; pure functions over `BytesMut`, no tokio.
//! 2. [`session`]: the session state machine, fed packets, deliveries and the time; it maps MQTT
//!    onto the core (publishes to the listener's exchange, subscriptions as bindings of a direct
//!    sink or of the session's queue, shared subscriptions as shared queues), and keeps its
//!    subscriptions indexed by filter, cookie, queue and pattern (`subscriptions`). [`topic`] converts
//!    topics and filters, [`mapping`] converts PUBLISH ↔ core message, [`registry`] holds client
//!    ids (takeover) and persistent session state between connections, on top of the core's
//!    connection registry (`ferry_core::connections`), through which it kicks connections; it
//!    also lists sessions for the management API ([`Shared::sessions`], each connected
//!    session keeping a small view of its subscriptions there) and ends one from outside
//!    ([`Shared::delete_session`]).
//!    [`connect`] decides a CONNECT before the session starts (client id rules, will topic,
//!    login outcome, will ACL).
//! 3. [`driver`]: the tokio task per connection (none while it is parked: [`park`] keeps idle
//!    plain TCP connections without a task, their sockets in one epoll set): reads, feeds the
//!    session, writes coalesced;
//!    registers the connection in the core's registry at its CONNECT and counts its traffic
//!    there, and obeys a close from outside (5.0 DISCONNECT 0x98, 3.x a plain close). When to
//!    stop reading and decoding, and the order acks leave in, are the core's
//!    (`ferry_core::flow`: `PublisherFlow`, `AckQueue`), shared with the AMQP driver.
//!
//! [`errors`] names what the session and the driver refuse or close for ([`errors::MqttError`])
//! and holds the one table that chooses its MQTT 5.0 reason code and its 3.1.1 / 3.1 answer
//! among the codec's wire values (`codec::reason`, `codec::return_code`).
//!
//! [`acl`] is the topic ACL (`[[acl]]`) the session checks, and [`acl::MqttPolicy`], the
//! frontend's [`TopicPolicy`](ferry_core::policy::TopicPolicy): the ACL in routing keys and the
//! frontend's own queues, installed by the server in the broker's access policy so the AMQP
//! side is held to the ACL on MQTT exchanges and kept out of those queues.
//!
//! [`sys`] publishes Mosquitto's `$SYS/broker/...` tree every `sys_interval`, only what changed.

pub mod acl;
pub mod codec;
pub mod connect;
pub mod driver;
pub mod errors;
pub mod mapping;
pub mod park;
pub mod registry;
pub mod session;
pub mod session_store;
mod subscriptions;
pub mod sys;
pub mod topic;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::exchange::BindingKey;
use ferry_core::frontend::{ClientStream, ConnectionContext, Frontend, Serving, Shutdown};
use ferry_core::message::{now_millis, ConnectionId, Protocol, ShortString};
use ferry_core::store::StoreOp;
use ferry_core::vhost::VHost;
use ferry_core::Broker;

pub use session::Settings;

/// Totals across the frontend's connections that the core's connection registry does not
/// keep, for `$SYS` (which reads connections, messages and bytes from the registry).
#[derive(Debug, Default)]
pub struct Stats {
    /// Payload bytes of the PUBLISHes sent to clients, added once per wake-up.
    pub publish_bytes_out: AtomicU64,
}

/// State shared by every connection of the frontend.
#[derive(Debug)]
pub struct Shared {
    pub settings: Settings,
    pub registry: Arc<registry::Registry>,
    pub stats: Stats,
    started: std::time::Instant,
    /// Where `$SYS` is published.
    sys: sys::Joiner,
    /// The shutdown signals of the connections served so far; a connection's group in the
    /// registry is its signal's index here.
    shutdowns: Mutex<Vec<Shutdown>>,
    /// The settings sessions hold, one `Arc` for each listener's combination in use
    /// ([`Shared::session_settings`]).
    session_settings: Mutex<Vec<Arc<Settings>>>,
    /// Where idle connections park ([`park`]), made with the first one.
    parker: std::sync::OnceLock<Option<Arc<park::Parker>>>,
    /// Told after every park and unpark ([`Shared::parked_reaches`]).
    parked_changed: Arc<tokio::sync::Notify>,
}

/// How long [`Shared::delete_session`] waits for a connected client to let its session go.
const DELETE_WAIT: Duration = Duration::from_secs(5);

/// What [`Shared::delete_session`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionDeleted {
    /// There was no such session.
    NotFound,
    /// It ended (its client, if connected, was disconnected first).
    Deleted,
    /// Its connection did not let it go in time.
    Busy,
}

impl Shared {
    /// Every session, connected or kept while its client is away (for the management API).
    pub fn sessions(&self) -> Vec<registry::SessionInfo> {
        self.registry.sessions()
    }

    /// Ends a session from outside (the management API): a connected client is disconnected
    /// first through the core registry, with `reason` (MQTT 5.0 DISCONNECT 0x98, administrative
    /// action); then whatever the session kept — its state, its queue with what waited there,
    /// its subscriptions — goes, and a will it still held is published, as at its expiry.
    pub async fn delete_session(&self, broker: &Broker, vhost: &str, client_id: &str, reason: &str) -> SessionDeleted {
        let mut found = false;
        if let Some(conn) = self.registry.live_connection(vhost, client_id) {
            found = true;
            broker.connections().close(conn, reason);
            if !self.registry.wait_released(vhost, client_id, conn, DELETE_WAIT).await {
                return SessionDeleted::Busy;
            }
        }
        let Some(v) = broker.vhost(vhost) else {
            return if found { SessionDeleted::Deleted } else { SessionDeleted::NotFound };
        };
        let ended = self.registry.end_stored(vhost, client_id, || {
            driver::end_session(&v, client_id, ConnectionId(0), now_millis());
        });
        match ended {
            Some(will) => {
                if let Some(due) = will {
                    session::publish_will(&v, &due.exchange.as_str().into(), &due.will, ConnectionId(0), now_millis());
                }
                SessionDeleted::Deleted
            }
            None if found => SessionDeleted::Deleted,
            None => SessionDeleted::NotFound,
        }
    }
}

/// How often the registry looks for clients whose keep alive ran out: a client is closed up to
/// this long after 1.5 × its keep alive.
const KEEP_ALIVE_SWEEP: Duration = Duration::from_millis(250);

impl Shared {
    /// The frontend's settings as a listener changes them, shared by all the sessions that see
    /// the same (issue 18: a copy in each session was 128 bytes of every connection). Those no
    /// session holds any more are dropped when another is added; a listener or two and the ACL
    /// in force make a handful at most.
    fn session_settings(&self, wanted: Settings) -> Arc<Settings> {
        let mut all = self.session_settings.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = all.iter().find(|s| s.same_as(&wanted)) {
            return s.clone();
        }
        all.retain(|s| Arc::strong_count(s) > 1);
        let s = Arc::new(wanted);
        all.push(s.clone());
        s
    }

    /// The parker of idle connections, made on the first call (on the runtime that serves the
    /// connections); `None` where no epoll set could be made.
    pub(crate) fn parker<'a>(this: &'a Arc<Shared>, broker: &Arc<Broker>) -> Option<&'a Arc<park::Parker>> {
        this.parker
            .get_or_init(|| park::Parker::start(this.parked_changed.clone(), broker.clone(), Arc::downgrade(this)))
            .as_ref()
    }

    /// How many connections are parked now, and how many were unparked so far (`None` before
    /// the first parked).
    pub fn parked_connections(&self) -> Option<(usize, usize)> {
        self.parker.get()?.as_ref().map(|p| (p.parked(), p.unparked()))
    }

    /// Resolves once exactly `n` connections are parked (at once if they are): for a test or a
    /// tool that waits on the parker rather than polling its counts.
    pub async fn parked_reaches(&self, n: usize) {
        loop {
            let changed = self.parked_changed.notified();
            tokio::pin!(changed);
            // Registered before the look, so a change in between is not missed.
            changed.as_mut().enable();
            if self.parked_connections().map_or(0, |(parked, _)| parked) == n {
                return;
            }
            changed.await;
        }
    }

    /// Publishes `$SYS` into a vhost from the first time a client connects to it.
    fn ensure_sys(self: &Arc<Self>, broker: &Arc<Broker>, vhost: &Arc<VHost>) {
        sys::Joiner::join(self, broker, vhost);
    }

    /// The registry group of connections ended by `shutdown`. The first connection of a signal
    /// starts its watcher: a task that checks their keep alives a few times a second and kicks
    /// them all when the signal fires.
    fn group(&self, shutdown: &Shutdown) -> usize {
        let mut known = self.shutdowns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(group) = known.iter().position(|s| s.same_as(shutdown)) {
            return group;
        }
        known.push(shutdown.clone());
        let group = known.len() - 1;
        let registry = self.registry.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(KEEP_ALIVE_SWEEP);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = sweep.tick() => registry.sweep(group, registry::ticks(tokio::time::Instant::now())),
                }
            }
            registry.shut_down(group);
        });
        group
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
                sys: sys::Joiner::default(),
                shutdowns: Mutex::new(Vec::new()),
                session_settings: Mutex::new(Vec::new()),
                parker: std::sync::OnceLock::new(),
                parked_changed: Arc::new(tokio::sync::Notify::new()),
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

impl Frontend for MqttFrontend {
    fn protocol(&self) -> Protocol {
        Protocol::Mqtt
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn serve(&self, stream: ClientStream, ctx: ConnectionContext) -> Serving {
        Box::pin(driver::run(stream, ctx, self.shared.clone()))
    }

    /// Brings back the persistent sessions the store holds: each session queue is bound again
    /// for its subscriptions (so messages published before the client returns are kept), the
    /// registry holds the state for the client's return, and the expiry and will timers run
    /// again from when the client went away (a client connected at the crash went away now).
    fn recover(&self, broker: &Arc<Broker>) {
        // Records of the broker's own parts (a bridge's QoS 2 ids) are theirs to take.
        let records =
            broker.take_recovered_sessions(|r| !r.client_id.starts_with(ferry_core::store::INTERNAL_SESSION_PREFIX));
        let now = now_millis();
        let mut restored = 0usize;
        for r in records {
            let forget = || {
                broker
                    .store()
                    .submit(vec![StoreOp::DeleteSession { vhost: r.vhost.clone(), client_id: r.client_id.clone() }]);
            };
            let st = match session_store::decode_session(&r.state) {
                Ok(st) => st,
                Err(e) => {
                    tracing::warn!(vhost = %r.vhost, client_id = %r.client_id, error = %e, "stored MQTT session dropped");
                    forget();
                    continue;
                }
            };
            let vhost = broker.add_vhost(&r.vhost);
            let queue = session::session_queue_name(&r.client_id);
            if vhost.queue(&queue.to_string_lossy()).is_none() {
                tracing::warn!(vhost = %r.vhost, client_id = %r.client_id, "stored MQTT session without its queue; dropped");
                forget();
                continue;
            }
            let exchange = ShortString::from(st.exchange.as_str());
            if let Err(e) = session::ensure_exchange(&vhost, &exchange) {
                tracing::warn!(vhost = %r.vhost, exchange = %exchange, error = %e, "MQTT exchange unusable; session dropped");
                forget();
                continue;
            }
            for sub in &st.subscriptions {
                let Ok(filter) = topic::Filter::parse(&sub.filter) else { continue };
                // Shared subscriptions consume their group's queue per connection.
                if filter.share_group().is_some() {
                    continue;
                }
                let key = BindingKey::new(filter.binding_key()).with_pattern(filter.pattern());
                if let Err(e) = vhost.bind_queue(&queue, &exchange, key, ConnectionId(0)) {
                    tracing::warn!(client_id = %r.client_id, filter = %sub.filter, error = %e, "stored subscription not bound");
                }
            }
            let away = if st.disconnected_at == 0 { 0 } else { now.saturating_sub(st.disconnected_at) };
            let away = Duration::from_millis(away);
            let released_at = Instant::now().checked_sub(away).unwrap_or_else(Instant::now);
            let (expiry, will) = (st.expiry, st.will.clone());
            let generation = self.shared.registry.restore(&r.vhost, &r.client_id, st, released_at);
            if expiry != u32::MAX {
                let left = Duration::from_secs(expiry as u64).saturating_sub(away);
                driver::spawn_expiry(self.shared.clone(), vhost.clone(), r.client_id.clone(), generation, left);
            }
            if let Some(will) = will {
                let delay = will.properties.will_delay_interval.unwrap_or(0).min(expiry);
                let left = Duration::from_secs(delay as u64).saturating_sub(away);
                driver::spawn_will(self.shared.clone(), vhost, r.client_id.clone(), generation, left);
            }
            restored += 1;
        }
        if restored > 0 {
            tracing::info!(sessions = restored, "MQTT persistent sessions recovered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_share_their_listeners_settings() {
        let frontend = MqttFrontend::new(Settings::default());
        let shared = &frontend.shared;
        let a = shared.session_settings(Settings::default());
        let b = shared.session_settings(Settings::default());
        assert!(Arc::ptr_eq(&a, &b), "the same settings, one Arc");
        let other = Settings { exchange: "amq.other".into(), ..Settings::default() };
        let c = shared.session_settings(other.clone());
        assert!(!Arc::ptr_eq(&a, &c));
        let entry = acl::AclEntry { user: None, topic: "a/#".into(), access: acl::Access::Read };
        let acl = Settings { acl: Arc::new(acl::Acl::new(vec![entry])), ..Settings::default() };
        assert!(!Arc::ptr_eq(&a, &shared.session_settings(acl)), "another ACL, other settings");
        // Those no session holds go when another is added.
        drop(c);
        let _d = shared.session_settings(Settings { max_packet_size: 1024, ..Settings::default() });
        let kept = shared.session_settings.lock().unwrap().len();
        assert_eq!(kept, 2, "the default's and the last one's");
        assert!(Arc::ptr_eq(&a, &shared.session_settings(Settings::default())));
        assert!(!Arc::ptr_eq(&shared.session_settings(other), &a));
    }
}

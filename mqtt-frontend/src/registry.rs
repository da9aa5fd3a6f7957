//! The sessions registry: which connection holds a client id (for takeover), and the state of
//! persistent sessions between connections.
//!
//! A new connection [`Registry::claim`]s its client id. If another connection holds it, that
//! one is kicked (it sends DISCONNECT 0x8E in 5.0 and closes) and the claim waits, bounded, for it
//! to [`Registry::release`] the id with its session state; the new connection then resumes that
//! state.
//!
//! The registry also ends live connections for their frontend: at shutdown
//! ([`Registry::shut_down`]) and when a client's keep alive runs out ([`Registry::sweep`], run
//! a few times a second). Each connection then needs neither a timer nor a shutdown future of
//! its own, only its [`Kick`], which it polls while idle.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_core::message::ConnectionId;
use ferry_core::signal::Signal;
use tokio::sync::Notify;

use crate::codec::SubOptions;

/// One subscription as a session remembers it between connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSubscription {
    pub filter: String,
    pub options: SubOptions,
    pub identifier: Option<u32>,
}

/// What a persistent session keeps while its client is away.
#[derive(Debug, Clone, Default)]
pub struct StoredSession {
    pub subscriptions: Vec<StoredSubscription>,
    /// QoS 2 packet ids received (PUBREC sent) whose PUBREL has not come yet.
    pub incoming_qos2: HashSet<u16>,
    /// QoS 2 deliveries whose PUBREC came (PUBREL sent) but not their PUBCOMP.
    pub outgoing_pubrel: Vec<u16>,
    /// Packet ids of deliveries from the session queue that were unacknowledged, by queue
    /// sequence number, so the resend after reconnect uses the original ids (§4.4).
    pub inflight_ids: HashMap<u64, u16>,
    /// Seconds (5.0 session expiry; `u32::MAX` never).
    pub expiry: u32,
    /// The exchange the subscriptions are bound on (the listener's MQTT exchange).
    pub exchange: String,
    /// The will still to be published: stored while the client is connected (a broker crash
    /// is a connection loss) and while a will delay runs.
    pub will: Option<crate::codec::Will>,
    /// When the client went away, in ms since the epoch; 0 while it is connected.
    pub disconnected_at: u64,
}

/// Why a connection was kicked (see [`Kick::poll_kicked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kicked {
    /// Another connection claimed its client id.
    TakenOver,
    /// The server is shutting down.
    Shutdown,
    /// Nothing was heard from the client within 1.5 × its keep alive.
    KeepAlive,
}

/// Signals to a live connection from the registry: another connection taking its client id
/// over, shutdown, an expired keep alive; and back, that the connection released the id.
/// Small (no watch channel: that was 300 bytes per connection), and polled by the connection
/// without a future.
#[derive(Debug)]
pub struct Kick {
    kicked: Signal,
    /// 0 until kicked, then the first reason (a [`Kicked`] + 1).
    why: AtomicU8,
    /// The keep alive deadline the connection keeps here, in ms of [`ticks`]; `u64::MAX`: none.
    deadline: AtomicU64,
    /// Which shutdown signal ends this connection ([`Registry::shut_down`]).
    group: usize,
    released: AtomicBool,
    on_release: Notify,
}

impl Kick {
    fn new(group: usize) -> Kick {
        Kick {
            kicked: Signal::new(),
            why: AtomicU8::new(0),
            deadline: AtomicU64::new(u64::MAX),
            group,
            released: AtomicBool::new(false),
            on_release: Notify::new(),
        }
    }
    /// Tells the connection to go; the first reason given is the one it sees.
    fn kick(&self, why: Kicked) {
        let _ = self.why.compare_exchange(0, why as u8 + 1, Ordering::AcqRel, Ordering::Acquire);
        self.kicked.notify();
    }
    fn reason(&self) -> Kicked {
        match self.why.load(Ordering::Acquire) {
            2 => Kicked::Shutdown,
            3 => Kicked::KeepAlive,
            _ => Kicked::TakenOver,
        }
    }
    /// Resolves when the connection is to go, with why.
    pub async fn kicked(&self) -> Kicked {
        std::future::poll_fn(|cx| self.poll_kicked(cx)).await
    }
    /// [`Kick::kicked`] without a future.
    pub fn poll_kicked(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Kicked> {
        self.kicked.poll(cx).map(|()| self.reason())
    }
    /// The connection's keep alive deadline (`None`: none, or not counting while it pauses).
    pub fn set_deadline(&self, deadline: Option<tokio::time::Instant>) {
        self.deadline.store(deadline.map_or(u64::MAX, ticks), Ordering::Relaxed);
    }
    fn release(&self) {
        self.released.store(true, Ordering::Release);
        self.on_release.notify_waiters();
    }
    async fn released(&self) {
        loop {
            let notified = self.on_release.notified();
            tokio::pin!(notified);
            // Registered before the check, so a release in between is not missed.
            notified.as_mut().enable();
            if self.released.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// Milliseconds of tokio's clock since the first call (so that tests with a paused clock see
/// keep alives run out with it).
pub(crate) fn ticks(at: tokio::time::Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(tokio::time::Instant::now);
    at.saturating_duration_since(epoch).as_millis() as u64
}

#[derive(Debug)]
struct Live {
    connection: ConnectionId,
    kick: std::sync::Arc<Kick>,
}

#[derive(Debug, Default)]
struct Slot {
    live: Option<Live>,
    /// Boxed: a slot per client id lives in the map for every connection, and most are live
    /// connections without a stored session (650 bytes inline in each map entry).
    stored: Option<Box<StoredSession>>,
    /// When `stored` was handed in, to tell whether its expiry interval has passed.
    released_at: Option<Instant>,
    /// The latest claim's number, so a delayed will can tell whether the session was resumed
    /// meanwhile.
    generation: u64,
}

/// What a claim gives the new connection.
#[derive(Debug)]
pub struct Claim {
    /// Boxed: the connection's task holds the claim across awaits (see the driver).
    pub stored: Option<Box<StoredSession>>,
    pub kick: std::sync::Arc<Kick>,
    pub generation: u64,
    /// Whether a live connection had to be taken over.
    pub took_over: bool,
    /// Whether a stored session was dropped because its expiry interval had passed (its queue,
    /// if the core has not expired it yet, must go too).
    pub expired: bool,
}

/// Client ids → live connections and stored sessions, per vhost.
#[derive(Debug, Default)]
pub struct Registry {
    slots: Mutex<HashMap<Box<str>, Slot>>,
    connected: AtomicUsize,
    /// Claim numbers are unique across client ids, so a slot removed and made again never
    /// repeats one (a delayed will or expiry timer must not mistake a new claim for its own).
    next_generation: AtomicU64,
    /// The groups [`Registry::shut_down`] has ended: a claim in one is kicked at once. Locked
    /// after `slots`, never before.
    down: Mutex<Vec<usize>>,
}

/// A slot's key: the vhost and the client id in one allocation (a tuple of two `String`s was
/// 48 bytes in every entry, and two allocations), length-prefixed so that no two pairs meet.
fn slot_key(vhost: &str, client_id: &str) -> Box<str> {
    format!("{}:{vhost}{client_id}", vhost.len()).into_boxed_str()
}

/// How long a takeover waits for the old connection to hand its session over.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the client id for `connection`, kicking and waiting for a live holder. `group`
    /// names the shutdown signal that ends the connection ([`Registry::shut_down`]).
    pub async fn claim(&self, vhost: &str, client_id: &str, connection: ConnectionId, group: usize) -> Claim {
        let key = slot_key(vhost, client_id);
        let mut took_over = false;
        for _ in 0..2 {
            let old = {
                let mut slots = self.slots();
                let slot = slots.entry(key.clone()).or_default();
                match &slot.live {
                    Some(l) if l.connection != connection => l.kick.clone(),
                    _ => return self.take(slot, connection, took_over, group),
                }
            };
            took_over = true;
            old.kick(Kicked::TakenOver);
            if tokio::time::timeout(TAKEOVER_WAIT, old.released()).await.is_err() {
                tracing::warn!(client_id, "session takeover: the old connection did not hand over in time");
                break;
            }
        }
        let mut slots = self.slots();
        let slot = slots.entry(key).or_default();
        if slot.live.take().is_some() {
            self.connected.fetch_sub(1, Ordering::Relaxed);
        }
        self.take(slot, connection, took_over, group)
    }

    fn take(&self, slot: &mut Slot, connection: ConnectionId, took_over: bool, group: usize) -> Claim {
        let kick = std::sync::Arc::new(Kick::new(group));
        if self.down.lock().unwrap_or_else(|e| e.into_inner()).contains(&group) {
            kick.kick(Kicked::Shutdown);
        }
        if slot.live.is_none() {
            self.connected.fetch_add(1, Ordering::Relaxed);
        }
        slot.live = Some(Live { connection, kick: kick.clone() });
        slot.generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let mut stored = slot.stored.take();
        let released_at = slot.released_at.take();
        // 5.0 §3.1.2.11.2: a session ends when its expiry interval has passed since the
        // connection closed; `u32::MAX` never expires.
        let expired = match (&stored, released_at) {
            (Some(st), Some(at)) if st.expiry != u32::MAX => at.elapsed() >= Duration::from_secs(st.expiry as u64),
            _ => false,
        };
        if expired {
            stored = None;
        }
        Claim { stored, kick, generation: slot.generation, took_over, expired }
    }

    /// Shutdown: every live connection of `group` is kicked, and so is any that claims an id
    /// from now on.
    pub fn shut_down(&self, group: usize) {
        let slots = self.slots();
        self.down.lock().unwrap_or_else(|e| e.into_inner()).push(group);
        for live in slots.values().filter_map(|s| s.live.as_ref()) {
            if live.kick.group == group {
                live.kick.kick(Kicked::Shutdown);
            }
        }
    }

    /// Kicks the live connections of `group` whose keep alive deadline is before `now` (in
    /// [`ticks`]).
    pub fn sweep(&self, group: usize, now: u64) {
        let slots = self.slots();
        for live in slots.values().filter_map(|s| s.live.as_ref()) {
            if live.kick.group == group && live.kick.deadline.load(Ordering::Relaxed) <= now {
                live.kick.kick(Kicked::KeepAlive);
            }
        }
    }

    /// The connection is done with the client id; `stored` is kept for a persistent session.
    pub fn release(&self, vhost: &str, client_id: &str, connection: ConnectionId, stored: Option<StoredSession>) {
        let mut slots = self.slots();
        let key = slot_key(vhost, client_id);
        let Some(slot) = slots.get_mut(&key) else { return };
        match &slot.live {
            Some(l) if l.connection == connection => {
                let kick = slot.live.take().map(|l| l.kick);
                self.connected.fetch_sub(1, Ordering::Relaxed);
                slot.stored = stored.map(Box::new);
                slot.released_at = Some(Instant::now());
                if slot.stored.is_none() {
                    slots.remove(&key);
                }
                if let Some(k) = kick {
                    k.release();
                }
            }
            // Taken over by force after a timeout: this connection's state is stale.
            _ => {}
        }
    }

    /// Puts back a session read from the store at start-up (no connection holds it), as if
    /// released at `released_at`; returns its claim number for the expiry and will timers.
    pub fn restore(&self, vhost: &str, client_id: &str, stored: StoredSession, released_at: Instant) -> u64 {
        let mut slots = self.slots();
        let slot = slots.entry(slot_key(vhost, client_id)).or_default();
        slot.stored = Some(Box::new(stored));
        slot.released_at = Some(released_at);
        slot.generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        slot.generation
    }

    /// The will of a stored session was published: forgets it, and returns the session's state
    /// to store again (`None` when a connection resumed or the session ended meanwhile).
    pub fn will_published(&self, vhost: &str, client_id: &str, generation: u64) -> Option<StoredSession> {
        let mut slots = self.slots();
        let slot = slots.get_mut(&slot_key(vhost, client_id))?;
        if slot.generation != generation || slot.live.is_some() {
            return None;
        }
        let st = slot.stored.as_mut()?;
        st.will = None;
        Some((**st).clone())
    }

    /// Forgets a stored session (clean start, or its queue expired).
    pub fn forget(&self, vhost: &str, client_id: &str) {
        let mut slots = self.slots();
        let key = slot_key(vhost, client_id);
        if let Some(slot) = slots.get_mut(&key) {
            slot.stored = None;
            if slot.live.is_none() {
                slots.remove(&key);
            }
        }
    }

    /// Ends a stored session whose expiry interval has passed: if no connection claimed the
    /// client id since claim `generation`, forgets the stored state and runs `end` (which
    /// deletes the session's queue) under the registry lock, so that a concurrent claim sees
    /// either the whole session or none of it.
    pub fn expire(&self, vhost: &str, client_id: &str, generation: u64, end: impl FnOnce()) -> bool {
        let mut slots = self.slots();
        let key = slot_key(vhost, client_id);
        let Some(slot) = slots.get_mut(&key) else { return false };
        if slot.generation != generation || slot.live.is_some() || slot.stored.is_none() {
            return false;
        }
        slots.remove(&key);
        end();
        true
    }

    /// The latest claim of a client id (see [`Claim::generation`]), 0 when none is known.
    pub fn generation(&self, vhost: &str, client_id: &str) -> u64 {
        self.slots().get(&slot_key(vhost, client_id)).map_or(0, |s| s.generation)
    }

    /// Whether a connection claimed the client id after claim `generation`.
    pub fn claimed_since(&self, vhost: &str, client_id: &str, generation: u64) -> bool {
        self.slots().get(&slot_key(vhost, client_id)).is_some_and(|s| s.generation != generation)
    }

    /// Whether a connection currently holds the client id.
    pub fn is_live(&self, vhost: &str, client_id: &str) -> bool {
        self.slots().get(&slot_key(vhost, client_id)).is_some_and(|s| s.live.is_some())
    }

    /// Connected clients.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_second_claim_kicks_the_first_and_gets_its_state() {
        let r = Arc::new(Registry::new());
        let first = r.claim("/", "c", ConnectionId(1), 0).await;
        assert!(first.stored.is_none());
        assert_eq!(r.connected(), 1);
        let r2 = r.clone();
        let holder = tokio::spawn(async move {
            first.kick.kicked().await;
            let stored = StoredSession { expiry: 60, ..Default::default() };
            r2.release("/", "c", ConnectionId(1), Some(stored));
        });
        let second = tokio::time::timeout(Duration::from_secs(5), r.claim("/", "c", ConnectionId(2), 0)).await.unwrap();
        holder.await.unwrap();
        assert!(second.took_over);
        assert_eq!(second.stored.unwrap().expiry, 60);
        assert_eq!(r.connected(), 1);
        assert!(second.generation > first.generation);
    }

    #[tokio::test]
    async fn release_by_a_stale_connection_is_ignored() {
        let r = Registry::new();
        let _c = r.claim("/", "c", ConnectionId(1), 0).await;
        r.release("/", "c", ConnectionId(9), None);
        assert!(r.is_live("/", "c"));
        r.release("/", "c", ConnectionId(1), None);
        assert!(!r.is_live("/", "c"));
        assert_eq!(r.connected(), 0);
    }

    #[tokio::test]
    async fn a_stored_session_past_its_expiry_is_not_resumed() {
        let r = Registry::new();
        let _c = r.claim("/", "c", ConnectionId(1), 0).await;
        r.release("/", "c", ConnectionId(1), Some(StoredSession { expiry: 0, ..Default::default() }));
        let again = r.claim("/", "c", ConnectionId(2), 0).await;
        assert!(again.stored.is_none() && again.expired);
        r.release("/", "c", ConnectionId(2), Some(StoredSession { expiry: u32::MAX, ..Default::default() }));
        let never = r.claim("/", "c", ConnectionId(3), 0).await;
        assert!(never.stored.is_some() && !never.expired);
    }

    #[tokio::test]
    async fn expire_ends_only_a_session_nobody_resumed() {
        let r = Registry::new();
        let first = r.claim("/", "c", ConnectionId(1), 0).await;
        r.release("/", "c", ConnectionId(1), Some(StoredSession { expiry: 60, ..Default::default() }));
        let second = r.claim("/", "c", ConnectionId(2), 0).await;
        assert!(r.claimed_since("/", "c", first.generation));
        assert!(!r.expire("/", "c", first.generation, || panic!("resumed: must not end")));
        r.release("/", "c", ConnectionId(2), Some(StoredSession { expiry: 60, ..Default::default() }));
        let mut ended = false;
        assert!(r.expire("/", "c", second.generation, || ended = true));
        assert!(ended && !r.claimed_since("/", "c", second.generation));
        let third = r.claim("/", "c", ConnectionId(3), 0).await;
        assert!(third.stored.is_none());
        assert!(third.generation > second.generation, "claim numbers never repeat");
    }

    #[tokio::test]
    async fn ids_are_per_vhost() {
        let r = Registry::new();
        let a = r.claim("/", "c", ConnectionId(1), 0).await;
        let b = r.claim("other", "c", ConnectionId(2), 0).await;
        assert!(!a.took_over && !b.took_over);
        assert_eq!(r.connected(), 2);
    }
}

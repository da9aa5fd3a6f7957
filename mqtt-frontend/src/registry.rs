//! The sessions registry: which connection holds a client id (for takeover), and the state of
//! persistent sessions between connections.
//!
//! A new connection [`Registry::claim`]s its client id. If another connection holds it, that
//! one is kicked (it sends DISCONNECT 0x8E in 5.0 and closes) and the claim waits, bounded, for it
//! to [`Registry::release`] the id with its session state; the new connection then resumes that
//! state.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_core::message::ConnectionId;
use tokio::sync::{watch, Notify};

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

/// Signals between a connection holding a client id and one taking it over.
#[derive(Debug)]
pub struct Kick {
    kicked: Notify,
    released: watch::Sender<bool>,
}

impl Kick {
    fn new() -> Kick {
        Kick { kicked: Notify::new(), released: watch::Sender::new(false) }
    }
    /// Resolves when another connection takes this client id over.
    pub async fn kicked(&self) {
        self.kicked.notified().await
    }
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
    slots: Mutex<HashMap<(String, String), Slot>>,
    connected: AtomicUsize,
    /// Claim numbers are unique across client ids, so a slot removed and made again never
    /// repeats one (a delayed will or expiry timer must not mistake a new claim for its own).
    next_generation: AtomicU64,
}

/// How long a takeover waits for the old connection to hand its session over.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the client id for `connection`, kicking and waiting for a live holder.
    pub async fn claim(&self, vhost: &str, client_id: &str, connection: ConnectionId) -> Claim {
        let key = (vhost.to_string(), client_id.to_string());
        let mut took_over = false;
        for _ in 0..2 {
            let old = {
                let mut slots = self.slots();
                let slot = slots.entry(key.clone()).or_default();
                match &slot.live {
                    Some(l) if l.connection != connection => l.kick.clone(),
                    _ => return self.take(slot, connection, took_over),
                }
            };
            took_over = true;
            old.kicked.notify_one();
            let mut released = old.released.subscribe();
            if tokio::time::timeout(TAKEOVER_WAIT, released.wait_for(|r| *r)).await.is_err() {
                tracing::warn!(client_id, "session takeover: the old connection did not hand over in time");
                break;
            }
        }
        let mut slots = self.slots();
        let slot = slots.entry(key).or_default();
        if slot.live.take().is_some() {
            self.connected.fetch_sub(1, Ordering::Relaxed);
        }
        self.take(slot, connection, took_over)
    }

    fn take(&self, slot: &mut Slot, connection: ConnectionId, took_over: bool) -> Claim {
        let kick = std::sync::Arc::new(Kick::new());
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

    /// The connection is done with the client id; `stored` is kept for a persistent session.
    pub fn release(&self, vhost: &str, client_id: &str, connection: ConnectionId, stored: Option<StoredSession>) {
        let mut slots = self.slots();
        let key = (vhost.to_string(), client_id.to_string());
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
                    k.released.send_replace(true);
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
        let slot = slots.entry((vhost.to_string(), client_id.to_string())).or_default();
        slot.stored = Some(Box::new(stored));
        slot.released_at = Some(released_at);
        slot.generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        slot.generation
    }

    /// The will of a stored session was published: forgets it, and returns the session's state
    /// to store again (`None` when a connection resumed or the session ended meanwhile).
    pub fn will_published(&self, vhost: &str, client_id: &str, generation: u64) -> Option<StoredSession> {
        let mut slots = self.slots();
        let slot = slots.get_mut(&(vhost.to_string(), client_id.to_string()))?;
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
        let key = (vhost.to_string(), client_id.to_string());
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
        let key = (vhost.to_string(), client_id.to_string());
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
        self.slots().get(&(vhost.to_string(), client_id.to_string())).map_or(0, |s| s.generation)
    }

    /// Whether a connection claimed the client id after claim `generation`.
    pub fn claimed_since(&self, vhost: &str, client_id: &str, generation: u64) -> bool {
        self.slots().get(&(vhost.to_string(), client_id.to_string())).is_some_and(|s| s.generation != generation)
    }

    /// Whether a connection currently holds the client id.
    pub fn is_live(&self, vhost: &str, client_id: &str) -> bool {
        self.slots().get(&(vhost.to_string(), client_id.to_string())).is_some_and(|s| s.live.is_some())
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
        let first = r.claim("/", "c", ConnectionId(1)).await;
        assert!(first.stored.is_none());
        assert_eq!(r.connected(), 1);
        let r2 = r.clone();
        let holder = tokio::spawn(async move {
            first.kick.kicked().await;
            let stored = StoredSession { expiry: 60, ..Default::default() };
            r2.release("/", "c", ConnectionId(1), Some(stored));
        });
        let second = tokio::time::timeout(Duration::from_secs(5), r.claim("/", "c", ConnectionId(2))).await.unwrap();
        holder.await.unwrap();
        assert!(second.took_over);
        assert_eq!(second.stored.unwrap().expiry, 60);
        assert_eq!(r.connected(), 1);
        assert!(second.generation > first.generation);
    }

    #[tokio::test]
    async fn release_by_a_stale_connection_is_ignored() {
        let r = Registry::new();
        let _c = r.claim("/", "c", ConnectionId(1)).await;
        r.release("/", "c", ConnectionId(9), None);
        assert!(r.is_live("/", "c"));
        r.release("/", "c", ConnectionId(1), None);
        assert!(!r.is_live("/", "c"));
        assert_eq!(r.connected(), 0);
    }

    #[tokio::test]
    async fn a_stored_session_past_its_expiry_is_not_resumed() {
        let r = Registry::new();
        let _c = r.claim("/", "c", ConnectionId(1)).await;
        r.release("/", "c", ConnectionId(1), Some(StoredSession { expiry: 0, ..Default::default() }));
        let again = r.claim("/", "c", ConnectionId(2)).await;
        assert!(again.stored.is_none() && again.expired);
        r.release("/", "c", ConnectionId(2), Some(StoredSession { expiry: u32::MAX, ..Default::default() }));
        let never = r.claim("/", "c", ConnectionId(3)).await;
        assert!(never.stored.is_some() && !never.expired);
    }

    #[tokio::test]
    async fn expire_ends_only_a_session_nobody_resumed() {
        let r = Registry::new();
        let first = r.claim("/", "c", ConnectionId(1)).await;
        r.release("/", "c", ConnectionId(1), Some(StoredSession { expiry: 60, ..Default::default() }));
        let second = r.claim("/", "c", ConnectionId(2)).await;
        assert!(r.claimed_since("/", "c", first.generation));
        assert!(!r.expire("/", "c", first.generation, || panic!("resumed: must not end")));
        r.release("/", "c", ConnectionId(2), Some(StoredSession { expiry: 60, ..Default::default() }));
        let mut ended = false;
        assert!(r.expire("/", "c", second.generation, || ended = true));
        assert!(ended && !r.claimed_since("/", "c", second.generation));
        let third = r.claim("/", "c", ConnectionId(3)).await;
        assert!(third.stored.is_none());
        assert!(third.generation > second.generation, "claim numbers never repeat");
    }

    #[tokio::test]
    async fn ids_are_per_vhost() {
        let r = Registry::new();
        let a = r.claim("/", "c", ConnectionId(1)).await;
        let b = r.claim("other", "c", ConnectionId(2)).await;
        assert!(!a.took_over && !b.took_over);
        assert_eq!(r.connected(), 2);
    }
}

//! The sessions registry: which connection holds a client id (for takeover), and the state of
//! persistent sessions between connections.
//!
//! A new connection [`Registry::claim`]s its client id. If another connection holds it, that
//! one is kicked (it sends DISCONNECT 0x8E in 5.0 and closes) and the claim waits, bounded, for it
//! to [`Registry::release`] the id with its session state; the new connection then resumes that
//! state. The kicked connection first handles what its client had already sent (see the
//! driver's `Conn::drain`), so a DISCONNECT sent before the new connection's CONNECT counts: no
//! will, and the session expiry it set.
//!
//! A will whose delay is still running lives in the stored session ([`StoredSession::will`])
//! and nowhere else: its timer takes it from there ([`Registry::take_will`]) only if no
//! connection claimed the client id since, the session's expiry takes it if that comes first
//! ([`Registry::expire`]), and any claim in between (a takeover, a resume, a clean start)
//! removes it with the stored session, so a will never outlives a new connection
//! [MQTT-3.1.3-9].
//!
//! The registry also ends live connections for their frontend: at shutdown
//! ([`Registry::shut_down`]) and when a client's keep alive runs out ([`Registry::sweep`], run
//! a few times a second). Each connection then needs neither a timer nor a shutdown future of
//! its own, only its [`Kick`], which it polls while idle.
//!
//! It builds on the core's connection registry ([`ferry_core::connections`]): a claim is made
//! with the connection's core entry, which is how the registry knows the connection (its id)
//! and how it wakes it. A kick records its reason here and wakes the task through the entry's
//! one wake-up, the same one a close from outside (management) uses, so a connection polls one
//! signal for every reason to go ([`Kicked::Closed`] is the close from outside).

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::hash::BuildHasher;

use ferry_core::connections::ConnectionEntry;
use ferry_core::hash::KeyedState;
use ferry_core::message::ConnectionId;
use hashbrown::hash_table::{Entry, OccupiedEntry};
use hashbrown::HashTable;
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

/// A will to publish now, and the exchange it goes to (the session's).
#[derive(Debug, Clone)]
pub struct DueWill {
    pub will: crate::codec::Will,
    pub exchange: String,
}

impl StoredSession {
    /// Takes the will it holds, with its exchange.
    fn take_will(&mut self) -> Option<DueWill> {
        let will = self.will.take()?;
        Some(DueWill { will, exchange: self.exchange.clone() })
    }
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
    /// Closed from outside through the core registry ([`ConnectionEntry::close`]), with the
    /// reason the entry holds.
    Closed,
}

/// Signals to a live connection from the registry: another connection taking its client id
/// over, shutdown, an expired keep alive; and back, that the connection released the id.
/// Small (no watch channel: that was 300 bytes per connection), and polled by the connection
/// without a future.
#[derive(Debug)]
pub struct Kick {
    /// The connection's core entry: its id, and the wake-up a kick goes through (shared with a
    /// close from outside).
    conn: std::sync::Arc<ConnectionEntry>,
    /// 0 until kicked, then the first reason (a [`Kicked`] + 1).
    why: AtomicU8,
    /// The keep alive deadline the connection keeps here, in ms of [`ticks`]; `u64::MAX`: none.
    deadline: AtomicU64,
    /// The connection is not reading (its flow control paused it): the deadline does not
    /// count meanwhile ([`Kick::hold_deadline`]).
    held: AtomicBool,
    /// How long the connection has been idle, as the sweep sees it: [`WORKED`] since the last
    /// sweep, [`QUIET`] through one sweep, [`PARK`] through two, when the sweep asks it to park
    /// (see `crate::park`).
    idle: AtomicU8,
    /// Which shutdown signal ends this connection ([`Registry::shut_down`]): one per listener,
    /// so a `u32` is room enough, and with it the kick is 64 bytes, jemalloc's 80 class with
    /// the `Arc`'s counts (`a_kick_stays_small`).
    group: u32,
    /// [`RESUMED`], set with a takeover: whether the new connection resumes the session (clean
    /// start 0). The session then goes on, and the taken-over connection's will is not
    /// published (as Mosquitto does; 5.0 §3.1.2.5: a new connection came before the will was
    /// due). [`RELEASED`]: the connection let its client id go. One byte for both, so that the
    /// kick stays 64 bytes with `idle`.
    ends: AtomicU8,
    /// What the management API shows of the session while this connection holds it.
    view: SessionView,
}

/// [`Kick::ends`]' bits.
const RESUMED: u8 = 1;
const RELEASED: u8 = 2;

/// [`Kick::idle`]'s states.
const WORKED: u8 = 0;
const QUIET: u8 = 1;
const PARK: u8 = 2;

/// A session's subscriptions as its view keeps them: filter → options and identifier. One
/// inline (a device has one subscription: no allocation for it, 24 bytes in the kick), a list
/// of a few (searched linearly; a B-tree's first node has room for 11), a B-tree past
/// [`VIEW_FEW`].
#[derive(Debug, Default)]
enum ViewSubscriptions {
    #[default]
    None,
    One(ViewEntry),
    #[allow(clippy::box_collection)] // one word in every kick, where the list is 24 bytes
    Few(Box<Vec<ViewEntry>>),
    Many(Box<ViewMap>),
}

/// Past [`VIEW_FEW`]: filter → options and identifier.
type ViewMap = std::collections::BTreeMap<Arc<str>, (SubOptions, Option<NonZeroU32>)>;

/// The filter's text is the session's own ([`crate::topic::Filter::shared_text`]): a copy was
/// 32 bytes of every subscribed connection (issue 18). The identifier is never 0 (5.0
/// §3.8.2.1.2).
type ViewEntry = (Arc<str>, SubOptions, Option<NonZeroU32>);

const VIEW_FEW: usize = 8;

impl ViewSubscriptions {
    fn insert(&mut self, filter: Arc<str>, options: SubOptions, identifier: Option<NonZeroU32>) {
        match self {
            ViewSubscriptions::None => {
                *self = ViewSubscriptions::One((filter, options, identifier));
                return;
            }
            ViewSubscriptions::One(e) if *e.0 == *filter => {
                e.1 = options;
                e.2 = identifier;
                return;
            }
            ViewSubscriptions::One(_) => {
                if let ViewSubscriptions::One(first) = std::mem::take(self) {
                    *self = ViewSubscriptions::Few(Box::new(vec![first]));
                }
            }
            _ => {}
        }
        if let ViewSubscriptions::Few(v) = self {
            if let Some(e) = v.iter_mut().find(|e| *e.0 == *filter) {
                e.1 = options;
                e.2 = identifier;
                return;
            }
            if v.len() < VIEW_FEW {
                v.reserve_exact(1);
                v.push((filter, options, identifier));
                return;
            }
            let map = std::mem::take(&mut **v).into_iter().map(|(f, o, i)| (f, (o, i))).collect();
            *self = ViewSubscriptions::Many(Box::new(map));
        }
        if let ViewSubscriptions::Many(m) = self {
            m.insert(filter, (options, identifier));
        }
    }

    fn remove(&mut self, filter: &str) {
        match self {
            ViewSubscriptions::None => {}
            ViewSubscriptions::One(e) => {
                if *e.0 == *filter {
                    *self = ViewSubscriptions::None;
                }
            }
            ViewSubscriptions::Few(v) => {
                v.retain(|e| *e.0 != *filter);
                if v.is_empty() {
                    *self = ViewSubscriptions::None;
                }
            }
            ViewSubscriptions::Many(m) => {
                m.remove(filter);
            }
        }
    }

    /// Sorted by filter.
    fn list(&self) -> Vec<StoredSubscription> {
        let stored = |f: &Arc<str>, o: &SubOptions, i: &Option<NonZeroU32>| StoredSubscription {
            filter: f.to_string(),
            options: *o,
            identifier: i.map(NonZeroU32::get),
        };
        let mut out: Vec<StoredSubscription> = match self {
            ViewSubscriptions::None => Vec::new(),
            ViewSubscriptions::One((f, o, i)) => vec![stored(f, o, i)],
            ViewSubscriptions::Few(v) => v.iter().map(|(f, o, i)| stored(f, o, i)).collect(),
            ViewSubscriptions::Many(m) => m.iter().map(|(f, (o, i))| stored(f, o, i)).collect(),
        };
        out.sort_by(|a, b| a.filter.cmp(&b.filter));
        out
    }
}

/// A connected session as listings show it ([`Registry::sessions`]): the session keeps it
/// current when its subscriptions or expiry change (rare events; never per message).
#[derive(Debug, Default)]
pub struct SessionView {
    /// Filter → options and identifier, inline: a device's one subscription in a box of its
    /// own was 48 bytes beside the kick's 64, and is 16 more of the kick's (80 with the `Arc`'s
    /// counts; a connection that never subscribes pays those 16, issue 18).
    subscriptions: Mutex<ViewSubscriptions>,
    expiry: std::sync::atomic::AtomicU32,
    clean_start: AtomicBool,
}

impl SessionView {
    fn subs(&self) -> std::sync::MutexGuard<'_, ViewSubscriptions> {
        self.subscriptions.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn subscribed(&self, filter: Arc<str>, options: SubOptions, identifier: Option<u32>) {
        self.subs().insert(filter, options, identifier.and_then(NonZeroU32::new));
    }
    pub fn unsubscribed(&self, filter: &str) {
        self.subs().remove(filter);
    }
    pub fn set_session(&self, clean_start: bool, expiry: u32) {
        self.clean_start.store(clean_start, Ordering::Relaxed);
        self.set_expiry(expiry);
    }
    pub fn set_expiry(&self, expiry: u32) {
        self.expiry.store(expiry, Ordering::Relaxed);
    }
    fn subscriptions(&self) -> Vec<StoredSubscription> {
        self.subs().list()
    }
}

/// A session as the management API lists it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub vhost: String,
    pub client_id: String,
    /// The connection holding it, if its client is connected.
    pub connection: Option<ConnectionId>,
    /// The connection's user; `None` for a session kept while its client is away.
    pub user: Option<String>,
    /// The CONNECT's clean start (clean session); a session kept while its client is away
    /// was not.
    pub clean_start: bool,
    /// Seconds (`u32::MAX` never).
    pub expiry: u32,
    pub subscriptions: Vec<StoredSubscription>,
    /// When its client went away (ms since the epoch); 0 while connected.
    pub disconnected_at: u64,
}

impl Kick {
    fn new(conn: std::sync::Arc<ConnectionEntry>, group: usize) -> Kick {
        Kick {
            conn,
            why: AtomicU8::new(0),
            deadline: AtomicU64::new(u64::MAX),
            held: AtomicBool::new(false),
            idle: AtomicU8::new(WORKED),
            // One group per shutdown signal, a handful per process.
            group: u32::try_from(group).unwrap_or(u32::MAX),
            ends: AtomicU8::new(0),
            view: SessionView::default(),
        }
    }
    /// What the session keeps current for listings.
    pub fn view(&self) -> &SessionView {
        &self.view
    }
    /// Tells the connection to go; the first reason given is the one it sees.
    fn kick(&self, why: Kicked) {
        let _ = self.why.compare_exchange(0, why as u8 + 1, Ordering::AcqRel, Ordering::Acquire);
        self.conn.wake();
    }
    /// The connection worked (read, wrote, delivered) in this wake-up: it is not idle.
    pub fn worked(&self) {
        // A load first: a busy connection does not write the line at every wake-up.
        if self.idle.load(Ordering::Relaxed) != WORKED {
            self.idle.store(WORKED, Ordering::Relaxed);
        }
    }
    /// The connection parked: the sweep does not ask it again.
    pub fn parked(&self) {
        self.idle.store(PARK, Ordering::Relaxed);
    }
    /// Wakes the connection again: a kick seen while it parked is seen again when it resumes.
    pub fn wake_again(&self) {
        self.conn.wake();
    }
    /// Whether the sweep found the connection idle through two sweeps and asked it to park.
    pub fn park_asked(&self) -> bool {
        self.idle.load(Ordering::Relaxed) == PARK
    }
    /// The sweep's look at the connection's idleness: after two sweeps with no work in between,
    /// it is asked to park, once (a parked connection is not woken again by the sweep).
    fn sweep_idle(&self) {
        match self.idle.load(Ordering::Relaxed) {
            WORKED => {
                let _ = self.idle.compare_exchange(WORKED, QUIET, Ordering::Relaxed, Ordering::Relaxed);
            }
            // Without a reason: `poll_kicked` passes it over, and the connection sees
            // `park_asked`.
            QUIET if self.idle.compare_exchange(QUIET, PARK, Ordering::Relaxed, Ordering::Relaxed).is_ok() => {
                self.conn.wake();
            }
            _ => {}
        }
    }
    fn reason(&self) -> Kicked {
        match self.why.load(Ordering::Acquire) {
            1 => Kicked::TakenOver,
            2 => Kicked::Shutdown,
            3 => Kicked::KeepAlive,
            // Woken with no reason of ours: only a close from outside does that.
            _ => Kicked::Closed,
        }
    }
    /// The connection this kick is for.
    pub fn connection(&self) -> ConnectionId {
        self.conn.id()
    }
    /// Resolves when the connection is to go, with why.
    pub async fn kicked(&self) -> Kicked {
        std::future::poll_fn(|cx| self.poll_kicked(cx)).await
    }
    /// [`Kick::kicked`] without a future.
    pub fn poll_kicked(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Kicked> {
        loop {
            if self.conn.poll_wake(cx).is_pending() {
                return std::task::Poll::Pending;
            }
            // A wake without a reason of ours or a close from outside is the sweep's nudge to
            // park (see `sweep_idle`), not a kick.
            if self.why.load(Ordering::Acquire) != 0 || self.conn.close_reason().is_some() {
                return std::task::Poll::Ready(self.reason());
            }
        }
    }
    /// After a takeover: whether the new connection resumes this session (see the field).
    pub fn resumed(&self) -> bool {
        self.ends.load(Ordering::Acquire) & RESUMED != 0
    }
    /// The connection's keep alive deadline (`None`: none, or not counting while it pauses).
    pub fn set_deadline(&self, deadline: Option<tokio::time::Instant>) {
        self.deadline.store(deadline.map_or(u64::MAX, ticks), Ordering::Relaxed);
    }
    /// The connection stopped reading for a reason of ours: its client's silence meanwhile
    /// does not count (its packets wait unread).
    pub fn hold_deadline(&self) {
        self.held.store(true, Ordering::Relaxed);
    }
    /// The connection reads again after pausing for `paused`: the deadline moves on by as long.
    pub fn release_deadline(&self, paused: Duration) {
        let by = u64::try_from(paused.as_millis()).unwrap_or(u64::MAX);
        // Only the connection's task writes the deadline: no update is lost between the two.
        let d = self.deadline.load(Ordering::Relaxed);
        if d != u64::MAX {
            self.deadline.store(d.saturating_add(by).min(u64::MAX - 1), Ordering::Relaxed);
        }
        // Release, with the sweep's Acquire: a sweep that sees it reading sees the new deadline.
        self.held.store(false, Ordering::Release);
    }
    /// Lets the client id go; the registry tells those waiting ([`Registry::released`]).
    fn release(&self) {
        self.ends.fetch_or(RELEASED, Ordering::Release);
    }
}

/// Milliseconds of tokio's clock since the first call (so that tests with a paused clock see
/// keep alives run out with it).
pub(crate) fn ticks(at: tokio::time::Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(tokio::time::Instant::now);
    at.saturating_duration_since(epoch).as_millis() as u64
}

/// The connection holding a client id: its kick, which knows the connection's core entry.
#[derive(Debug)]
struct Live {
    kick: std::sync::Arc<Kick>,
}

/// A client id's slot. It knows its key (vhost and client id): a live one by its connection's
/// login ([`ConnectionEntry::vhost`], [`ConnectionEntry::client_id`]), a stored one in its
/// record ([`Released::key`]); a slot is one of the two whenever the registry's lock is let go.
#[derive(Debug, Default)]
struct Slot {
    live: Option<Live>,
    /// Boxed: a slot per client id lives in the map for every connection, and most are live
    /// connections without a stored session (650 bytes inline in each map entry).
    stored: Option<Box<Released>>,
    /// The latest claim's number, so a delayed will can tell whether the session was resumed
    /// meanwhile.
    generation: u64,
}

/// A stored session and when it was handed in, to tell whether its expiry interval has
/// passed. The time is kept with the session, not in every slot: 16 bytes of each live
/// connection's map entry (issue 18).
#[derive(Debug)]
struct Released {
    session: StoredSession,
    at: Instant,
    /// The slot's key while no connection holds it ([`slot_key`]).
    key: Box<str>,
}

impl Slot {
    /// The vhost and the client id.
    fn key(&self) -> (&str, &str) {
        if let Some(live) = &self.live {
            let conn = &live.kick.conn;
            return (conn.vhost().unwrap_or_default(), conn.client_id().unwrap_or_default());
        }
        self.stored.as_ref().and_then(|r| split_key(&r.key)).unwrap_or_default()
    }
}

/// The slots: a table of slots that know their own keys ([`Slot::key`]), 24 bytes a slot, where
/// a map from the key to the slot was 40 and the key one allocation more: with 10,000 devices
/// connected, 67 and 12 bytes of each, now 41 (issue 18). Keyed per registry (a client chooses
/// its client id, see `ferry_core::hash`).
#[derive(Debug, Default)]
struct Slots {
    hasher: KeyedState,
    table: HashTable<Slot>,
}

impl Slots {
    fn hash(&self, vhost: &str, client_id: &str) -> u64 {
        self.hasher.hash_one((vhost, client_id))
    }

    fn get(&self, vhost: &str, client_id: &str) -> Option<&Slot> {
        self.table.find(self.hash(vhost, client_id), |s| s.key() == (vhost, client_id))
    }

    fn get_mut(&mut self, vhost: &str, client_id: &str) -> Option<&mut Slot> {
        let hash = self.hash(vhost, client_id);
        self.table.find_mut(hash, |s| s.key() == (vhost, client_id))
    }

    /// The slot, found to change or remove it whatever becomes of its key meanwhile.
    fn find_entry(&mut self, vhost: &str, client_id: &str) -> Option<OccupiedEntry<'_, Slot>> {
        let hash = self.hash(vhost, client_id);
        self.table.find_entry(hash, |s| s.key() == (vhost, client_id)).ok()
    }

    /// The slot, made empty if there is none: the caller gives it a holder or a stored session
    /// before it lets the lock go (its key is theirs).
    fn get_or_insert(&mut self, vhost: &str, client_id: &str) -> &mut Slot {
        let hash = self.hash(vhost, client_id);
        let hasher = &self.hasher;
        match self.table.entry(hash, |s| s.key() == (vhost, client_id), |s| hasher.hash_one(s.key())) {
            Entry::Occupied(found) => found.into_mut(),
            Entry::Vacant(vacant) => vacant.insert(Slot::default()).into_mut(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.table.iter()
    }
}

impl std::ops::Deref for Released {
    type Target = StoredSession;
    fn deref(&self) -> &StoredSession {
        &self.session
    }
}

impl std::ops::DerefMut for Released {
    fn deref_mut(&mut self) -> &mut StoredSession {
        &mut self.session
    }
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
    /// The will that session still held: it ended before this connection came, so the will is
    /// due (its timers had not run yet).
    pub ended_will: Option<DueWill>,
}

/// Client ids → live connections and stored sessions, per vhost.
#[derive(Debug, Default)]
pub struct Registry {
    slots: Mutex<Slots>,
    connected: AtomicUsize,
    /// Stored sessions ended by their expiry interval since the start (`$SYS/broker/clients/expired`).
    expired: AtomicU64,
    /// Claim numbers are unique across client ids, so a slot removed and made again never
    /// repeats one (a delayed will or expiry timer must not mistake a new claim for its own).
    next_generation: AtomicU64,
    /// The groups [`Registry::shut_down`] has ended: a claim in one is kicked at once. Locked
    /// after `slots`, never before.
    down: Mutex<Vec<usize>>,
    /// Told whenever a connection lets its client id go ([`Registry::released`]). One for the
    /// registry, not one per connection: only a takeover waits on it, and in every `Kick` it
    /// was 32 bytes of every connection (issue 18: 80 bytes, jemalloc's 96 class; now 48 and
    /// the 64 class).
    released: Notify,
}

/// A slot's key: the vhost and the client id in one allocation (a tuple of two `String`s was
/// 48 bytes in every entry, and two allocations), length-prefixed so that no two pairs meet.
fn slot_key(vhost: &str, client_id: &str) -> Box<str> {
    format!("{}:{vhost}{client_id}", vhost.len()).into_boxed_str()
}

/// [`slot_key`] back into the vhost and the client id.
fn split_key(key: &str) -> Option<(&str, &str)> {
    let (len, rest) = key.split_once(':')?;
    let len: usize = len.parse().ok()?;
    rest.is_char_boundary(len).then(|| rest.split_at(len))
}

/// How long a takeover waits for the old connection to hand its session over.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the client id for `connection`, kicking and waiting for a live holder (until it
    /// has released the id, so its session state, as its last packets left it, is what this
    /// claim gets). `group` names the shutdown signal that ends the connection
    /// ([`Registry::shut_down`]); `resume`: the new connection resumes the session (clean start
    /// 0), which a connection taken over is told ([`Kick::resumed`]).
    pub async fn claim(&self, conn: &std::sync::Arc<ConnectionEntry>, group: usize, resume: bool) -> Claim {
        let connection = conn.id();
        let (vhost, client_id) = (conn.vhost().unwrap_or_default(), conn.client_id().unwrap_or_default());
        let mut took_over = false;
        for _ in 0..2 {
            let old = {
                let mut slots = self.slots();
                let slot = slots.get_or_insert(vhost, client_id);
                match &slot.live {
                    Some(l) if l.kick.connection() != connection => l.kick.clone(),
                    _ => return self.take(slot, conn, took_over, group),
                }
            };
            took_over = true;
            // Before the kick, which publishes it (Release / Acquire on `why`).
            if resume {
                old.ends.fetch_or(RESUMED, Ordering::Release);
            } else {
                old.ends.fetch_and(!RESUMED, Ordering::Release);
            }
            old.kick(Kicked::TakenOver);
            if tokio::time::timeout(TAKEOVER_WAIT, self.released(&old)).await.is_err() {
                tracing::warn!(client_id, "session takeover: the old connection did not hand over in time");
                break;
            }
        }
        let mut slots = self.slots();
        let slot = slots.get_or_insert(vhost, client_id);
        if slot.live.take().is_some() {
            self.connected.fetch_sub(1, Ordering::Relaxed);
        }
        self.take(slot, conn, took_over, group)
    }

    fn take(&self, slot: &mut Slot, conn: &std::sync::Arc<ConnectionEntry>, took_over: bool, group: usize) -> Claim {
        let kick = std::sync::Arc::new(Kick::new(conn.clone(), group));
        if self.down.lock().unwrap_or_else(|e| e.into_inner()).contains(&group) {
            kick.kick(Kicked::Shutdown);
        }
        if slot.live.is_none() {
            self.connected.fetch_add(1, Ordering::Relaxed);
        }
        slot.live = Some(Live { kick: kick.clone() });
        slot.generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let released = slot.stored.take();
        // 5.0 §3.1.2.11.2: a session ends when its expiry interval has passed since the
        // connection closed; `u32::MAX` never expires.
        let expired = match &released {
            Some(r) if r.expiry != u32::MAX => r.at.elapsed() >= Duration::from_secs(r.expiry as u64),
            _ => false,
        };
        let mut stored = released.map(|r| Box::new(r.session));
        let mut ended_will = None;
        if expired {
            ended_will = stored.take().and_then(|mut st| st.take_will());
        }
        Claim { stored, kick, generation: slot.generation, took_over, expired, ended_will }
    }

    /// Shutdown: every live connection of `group` is kicked, and so is any that claims an id
    /// from now on.
    pub fn shut_down(&self, group: usize) {
        let slots = self.slots();
        self.down.lock().unwrap_or_else(|e| e.into_inner()).push(group);
        for live in slots.iter().filter_map(|s| s.live.as_ref()) {
            if live.kick.group as usize == group {
                live.kick.kick(Kicked::Shutdown);
            }
        }
    }

    /// Kicks the live connections of `group` whose keep alive deadline is before `now` (in
    /// [`ticks`]).
    pub fn sweep(&self, group: usize, now: u64) {
        let slots = self.slots();
        for live in slots.iter().filter_map(|s| s.live.as_ref()) {
            let kick = &live.kick;
            if kick.group as usize != group {
                continue;
            }
            if !kick.held.load(Ordering::Acquire) && kick.deadline.load(Ordering::Relaxed) <= now {
                live.kick.kick(Kicked::KeepAlive);
            } else {
                kick.sweep_idle();
            }
        }
    }

    /// The connection is done with the client id; `stored` is kept for a persistent session.
    pub fn release(&self, vhost: &str, client_id: &str, connection: ConnectionId, stored: Option<StoredSession>) {
        let mut slots = self.slots();
        let Some(mut found) = slots.find_entry(vhost, client_id) else { return };
        let slot = found.get_mut();
        match &slot.live {
            Some(l) if l.kick.connection() == connection => {
                let kick = slot.live.take().map(|l| l.kick);
                self.connected.fetch_sub(1, Ordering::Relaxed);
                let key = slot_key(vhost, client_id);
                slot.stored = stored.map(|session| Box::new(Released { session, at: Instant::now(), key }));
                if slot.stored.is_none() {
                    found.remove();
                }
                if let Some(k) = kick {
                    k.release();
                    self.released.notify_waiters();
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
        let slot = slots.get_or_insert(vhost, client_id);
        slot.stored = Some(Box::new(Released { session: stored, at: released_at, key: slot_key(vhost, client_id) }));
        slot.generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        slot.generation
    }

    /// The delay of a stored session's will has passed (claim `generation` released it): takes
    /// the will, to publish, and returns it with the session's state to store again without it.
    /// `None` when a connection claimed the client id since (the will is gone with it), or the
    /// session ended and its expiry took the will.
    pub fn take_will(&self, vhost: &str, client_id: &str, generation: u64) -> Option<(DueWill, StoredSession)> {
        let mut slots = self.slots();
        let slot = slots.get_mut(vhost, client_id)?;
        if slot.generation != generation || slot.live.is_some() {
            return None;
        }
        let st = slot.stored.as_mut()?;
        let will = st.take_will()?;
        Some((will, st.session.clone()))
    }

    /// Forgets a stored session (clean start, or its queue expired).
    pub fn forget(&self, vhost: &str, client_id: &str) {
        let mut slots = self.slots();
        if let Some(mut found) = slots.find_entry(vhost, client_id) {
            let slot = found.get_mut();
            slot.stored = None;
            if slot.live.is_none() {
                found.remove();
            }
        }
    }

    /// Ends a stored session whose expiry interval has passed: if no connection claimed the
    /// client id since claim `generation`, forgets the stored state and runs `end` (which
    /// deletes the session's queue) under the registry lock, so that a concurrent claim sees
    /// either the whole session or none of it. `Some` when it ended, with the will it still
    /// held: the session's end makes it due (5.0 §3.1.3.2.2), whichever timer runs first.
    pub fn expire(&self, vhost: &str, client_id: &str, generation: u64, end: impl FnOnce()) -> Option<Option<DueWill>> {
        let mut slots = self.slots();
        let found = slots.find_entry(vhost, client_id)?;
        let slot = found.get();
        if slot.generation != generation || slot.live.is_some() || slot.stored.is_none() {
            return None;
        }
        let will = found.remove().0.stored.and_then(|mut st| st.take_will());
        self.expired.fetch_add(1, Ordering::Relaxed);
        end();
        Some(will)
    }

    /// The latest claim of a client id (see [`Claim::generation`]), 0 when none is known.
    pub fn generation(&self, vhost: &str, client_id: &str) -> u64 {
        self.slots().get(vhost, client_id).map_or(0, |s| s.generation)
    }

    /// Whether a connection claimed the client id after claim `generation`.
    pub fn claimed_since(&self, vhost: &str, client_id: &str, generation: u64) -> bool {
        self.slots().get(vhost, client_id).is_some_and(|s| s.generation != generation)
    }

    /// Whether a connection currently holds the client id.
    pub fn is_live(&self, vhost: &str, client_id: &str) -> bool {
        self.slots().get(vhost, client_id).is_some_and(|s| s.live.is_some())
    }

    /// Every session, connected or kept while its client is away, by vhost and client id.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let slots = self.slots();
        let mut out: Vec<SessionInfo> = slots
            .iter()
            .filter_map(|slot| {
                let (vhost, client_id) = slot.key();
                let (vhost, client_id) = (vhost.to_string(), client_id.to_string());
                if let Some(live) = &slot.live {
                    let k = &live.kick;
                    return Some(SessionInfo {
                        vhost,
                        client_id,
                        connection: Some(k.connection()),
                        user: k.conn.user().map(str::to_string),
                        clean_start: k.view.clean_start.load(Ordering::Relaxed),
                        expiry: k.view.expiry.load(Ordering::Relaxed),
                        subscriptions: k.view.subscriptions(),
                        disconnected_at: 0,
                    });
                }
                let st = slot.stored.as_ref()?;
                Some(SessionInfo {
                    vhost,
                    client_id,
                    connection: None,
                    user: None,
                    clean_start: false,
                    expiry: st.expiry,
                    subscriptions: st.subscriptions.clone(),
                    disconnected_at: st.disconnected_at,
                })
            })
            .collect();
        drop(slots);
        out.sort_by(|a, b| (&a.vhost, &a.client_id).cmp(&(&b.vhost, &b.client_id)));
        out
    }

    /// The connection holding a client id, if one does.
    pub fn live_connection(&self, vhost: &str, client_id: &str) -> Option<ConnectionId> {
        self.slots().get(vhost, client_id).and_then(|s| s.live.as_ref()).map(|l| l.kick.connection())
    }

    /// Waits (up to `limit`) until `connection` no longer holds the client id; whether it let go.
    pub async fn wait_released(&self, vhost: &str, client_id: &str, connection: ConnectionId, limit: Duration) -> bool {
        let kick = {
            let slots = self.slots();
            match slots.get(vhost, client_id).and_then(|s| s.live.as_ref()) {
                Some(l) if l.kick.connection() == connection => l.kick.clone(),
                _ => return true,
            }
        };
        tokio::time::timeout(limit, self.released(&kick)).await.is_ok()
    }

    /// Resolves once the connection of `kick` has let its client id go.
    async fn released(&self, kick: &Kick) {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Registered before the check, so a release in between is not missed.
            notified.as_mut().enable();
            if kick.ends.load(Ordering::Acquire) & RELEASED != 0 {
                return;
            }
            notified.await;
        }
    }

    /// Ends a session kept while its client is away (deleted through the management API):
    /// forgets its state and runs `end` (which deletes its queue) under the registry lock, as
    /// [`Registry::expire`] does. `None` when there is no such session or a connection holds
    /// it; otherwise the will it still held, which its end makes due.
    pub fn end_stored(&self, vhost: &str, client_id: &str, end: impl FnOnce()) -> Option<Option<DueWill>> {
        let mut slots = self.slots();
        let found = slots.find_entry(vhost, client_id)?;
        let slot = found.get();
        if slot.live.is_some() || slot.stored.is_none() {
            return None;
        }
        let will = found.remove().0.stored.and_then(|mut st| st.take_will());
        end();
        Some(will)
    }

    /// Connected clients.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Persistent sessions kept while their client is away (Mosquitto's disconnected clients).
    /// Walks every client id under the lock: for `$SYS`, once per `sys_interval`.
    pub fn disconnected(&self) -> usize {
        self.slots().iter().filter(|s| s.live.is_none() && s.stored.is_some()).count()
    }

    /// Stored sessions ended by their expiry interval since the start.
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }
}

/// A core entry for MQTT connection `id`, logged in to `vhost` as `client_id` and `user`, as the
/// driver records it before its claim (registered in a registry of its own, which the tests do
/// not look at).
#[cfg(test)]
pub(crate) fn logged_in_entry(id: u64, vhost: &str, client_id: &str, user: &str) -> Arc<ConnectionEntry> {
    use ferry_core::connections::{ConnectionInfo, Connections, Login};
    use ferry_core::message::{ConnectionId, Protocol};
    let info = ConnectionInfo {
        id: ConnectionId(id),
        protocol: Protocol::Mqtt,
        version: "5.0",
        peer: "127.0.0.1:50000".parse().unwrap(),
        local: "127.0.0.1:1883".parse().unwrap(),
        listener: None,
        tls: None,
        connected_at: 0,
    };
    let entry = Connections::new().register(info).entry().clone();
    let login = Login { user: user.into(), vhost: vhost.into(), client_id: Some(client_id.into()) };
    assert!(entry.set_login(login));
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_lists_subscriptions_sorted_few_or_many() {
        let view = SessionView::default();
        assert!(view.subscriptions().is_empty());
        let o = SubOptions::default();
        view.subscribed("devices/d1/cmd".into(), o, None);
        assert!(matches!(&*view.subs(), ViewSubscriptions::One(_)));
        view.subscribed("devices/d1/cmd".into(), o, Some(3));
        assert_eq!(view.subscriptions().len(), 1);
        assert_eq!(view.subscriptions()[0].identifier, Some(3));
        for i in (0..(VIEW_FEW + 4)).rev() {
            view.subscribed(format!("t/{i:02}").into(), o, None);
        }
        assert!(matches!(&*view.subs(), ViewSubscriptions::Many(_)));
        view.unsubscribed("t/03");
        let listed: Vec<String> = view.subscriptions().into_iter().map(|s| s.filter).collect();
        let mut sorted = listed.clone();
        sorted.sort();
        assert_eq!(listed, sorted);
        assert_eq!(listed.len(), VIEW_FEW + 4);
        assert!(!listed.contains(&"t/03".to_string()));
    }

    fn conn(id: u64, vhost: &str, client_id: &str) -> Arc<ConnectionEntry> {
        logged_in_entry(id, vhost, client_id, "u")
    }

    /// The slots know their keys (a live one by its connection's login, a stored one in its
    /// record): they stay found as the table grows and rehashes them, as a slot goes from live
    /// to stored and back, and listings read the keys from them.
    #[tokio::test]
    async fn slots_are_found_by_the_keys_they_keep() {
        let r = Registry::new();
        let mut claims = Vec::new();
        for i in 0..200u64 {
            let vhost = if i % 2 == 0 { "/" } else { "other" };
            claims.push(r.claim(&conn(i + 1, vhost, &format!("c{i}")), 0, false).await);
        }
        assert_eq!(r.connected(), 200);
        for i in 0..200u64 {
            let vhost = if i % 2 == 0 { "/" } else { "other" };
            assert_eq!(r.live_connection(vhost, &format!("c{i}")), Some(ConnectionId(i + 1)));
            let other = if i % 2 == 0 { "other" } else { "/" };
            assert!(!r.is_live(other, &format!("c{i}")), "the vhost is part of the key");
        }
        // Live to stored (the key moves into the record), stored to gone, stored restored.
        r.release("/", "c0", ConnectionId(1), Some(StoredSession { expiry: 60, ..Default::default() }));
        r.release("other", "c1", ConnectionId(2), None);
        let restored = r.restore("/", "kept", StoredSession { expiry: 5, ..Default::default() }, Instant::now());
        assert!(restored > 0 && r.generation("/", "kept") == restored);
        assert!(!r.is_live("/", "c0") && r.generation("/", "c0") > 0);
        assert_eq!(r.generation("other", "c1"), 0, "released without a session: gone");
        assert_eq!(r.disconnected(), 2);
        let sessions = r.sessions();
        assert_eq!(sessions.len(), 200);
        let c0 = sessions.iter().find(|s| s.vhost == "/" && s.client_id == "c0").unwrap();
        assert!(c0.connection.is_none() && c0.expiry == 60);
        let c3 = sessions.iter().find(|s| s.vhost == "other" && s.client_id == "c3").unwrap();
        assert_eq!((c3.connection, c3.user.as_deref()), (Some(ConnectionId(4)), Some("u")));
        // A stored session claimed again is live again under the same key.
        let again = r.claim(&conn(500, "/", "c0"), 0, true).await;
        assert_eq!(again.stored.map(|s| s.expiry), Some(60));
        assert_eq!(r.live_connection("/", "c0"), Some(ConnectionId(500)));
        r.forget("/", "kept");
        assert_eq!(r.generation("/", "kept"), 0);
        assert_eq!(r.disconnected(), 0);
    }

    #[tokio::test]
    async fn a_second_claim_kicks_the_first_and_gets_its_state() {
        let r = Arc::new(Registry::new());
        let first = r.claim(&conn(1, "/", "c"), 0, false).await;
        assert!(first.stored.is_none());
        assert_eq!(r.connected(), 1);
        let r2 = r.clone();
        let holder = tokio::spawn(async move {
            first.kick.kicked().await;
            let stored = StoredSession { expiry: 60, ..Default::default() };
            r2.release("/", "c", ConnectionId(1), Some(stored));
        });
        let second = tokio::time::timeout(Duration::from_secs(5), r.claim(&conn(2, "/", "c"), 0, false)).await.unwrap();
        holder.await.unwrap();
        assert!(second.took_over);
        assert_eq!(second.stored.unwrap().expiry, 60);
        assert_eq!(r.connected(), 1);
        assert!(second.generation > first.generation);
    }

    /// The registry's part of every idle MQTT connection (issue 18): 88 bytes with the group
    /// as a `usize`, jemalloc's 112 class with the `Arc`'s counts; 80 and the 96 class; 48
    /// and the 64 class with one release notification for the whole registry; 64 and the 80
    /// class with a session's one subscription inline in its view (where it was a box of 48).
    #[test]
    fn a_kick_stays_small() {
        let size = std::mem::size_of::<Kick>();
        assert!(size + 16 <= 80, "Kick is {size} bytes");
        assert!(std::mem::size_of::<ViewSubscriptions>() <= 24);
    }

    /// Every client id has a slot in the registry's map, each live connection one: 40 bytes
    /// with the time a session was handed in kept in the slot (16 of them, for the few that
    /// have a stored session), 24 with it kept beside the session; with the key, a map entry
    /// of 40 bytes instead of 56.
    #[test]
    fn a_slot_stays_small() {
        assert_eq!(std::mem::size_of::<Slot>(), 24);
    }

    /// A device's one subscription is kept without a list (a list of one was an allocation of
    /// 32 bytes more); a second makes the list, and the listing is the same either way.
    #[test]
    fn the_view_keeps_one_subscription_inline() {
        let o = SubOptions::default();
        let mut v = ViewSubscriptions::default();
        v.insert("devices/a/cmd".into(), o, None);
        assert!(matches!(v, ViewSubscriptions::One(_)));
        v.insert("devices/a/cmd".into(), o, NonZeroU32::new(7));
        assert!(matches!(v, ViewSubscriptions::One(_)));
        assert_eq!(v.list()[0].identifier, Some(7));
        v.insert("a/#".into(), o, None);
        let filters = |v: &ViewSubscriptions| v.list().into_iter().map(|s| s.filter).collect::<Vec<_>>();
        assert_eq!(filters(&v), ["a/#", "devices/a/cmd"]);
        v.remove("a/#");
        v.remove("devices/a/cmd");
        assert!(v.list().is_empty());
        v.insert("x".into(), o, None);
        v.remove("x");
        assert!(matches!(v, ViewSubscriptions::None));
    }

    /// Keep alive on injected time: the sweep kicks a connection only once its deadline
    /// (1.5 × the keep alive after its last whole packet, set by the driver) has passed.
    #[tokio::test(start_paused = true)]
    async fn the_sweep_kicks_a_connection_only_past_its_keep_alive_deadline() {
        let r = Registry::new();
        let quiet = r.claim(&conn(1, "/", "quiet"), 0, false).await;
        let talking = r.claim(&conn(2, "/", "talking"), 0, false).await;
        let unlimited = r.claim(&conn(3, "/", "unlimited"), 0, false).await;
        let start = tokio::time::Instant::now();
        quiet.kick.set_deadline(Some(start + Duration::from_secs(90)));
        talking.kick.set_deadline(Some(start + Duration::from_secs(90)));
        unlimited.kick.set_deadline(None); // keep alive 0
        r.sweep(0, ticks(start + Duration::from_secs(89)));
        for c in [&quiet, &talking, &unlimited] {
            assert!(tokio::time::timeout(Duration::from_millis(1), c.kick.kicked()).await.is_err());
        }
        // A packet from `talking` moves its deadline on; `quiet` says nothing.
        talking.kick.set_deadline(Some(start + Duration::from_secs(150)));
        r.sweep(0, ticks(start + Duration::from_secs(90)));
        assert_eq!(quiet.kick.kicked().await, Kicked::KeepAlive);
        assert!(tokio::time::timeout(Duration::from_millis(1), talking.kick.kicked()).await.is_err());
        r.sweep(0, ticks(start + Duration::from_secs(3600)));
        assert_eq!(talking.kick.kicked().await, Kicked::KeepAlive);
        assert!(tokio::time::timeout(Duration::from_millis(1), unlimited.kick.kicked()).await.is_err());
    }

    /// The sweep asks a connection to park after two sweeps without work, once; the nudge
    /// wakes it but is not a kick, and work in between starts the count again (`crate::park`).
    #[tokio::test]
    async fn the_sweep_asks_an_idle_connection_to_park_once_and_the_nudge_is_not_a_kick() {
        let r = Registry::new();
        let c = r.claim(&conn(1, "/", "idle"), 0, false).await;
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let now = ticks(tokio::time::Instant::now());
        assert!(c.kick.poll_kicked(&mut cx).is_pending());
        r.sweep(0, now);
        assert!(!c.kick.park_asked(), "one sweep without work is not idle enough");
        c.kick.worked();
        r.sweep(0, now);
        assert!(!c.kick.park_asked(), "it worked since the last sweep");
        r.sweep(0, now);
        assert!(c.kick.park_asked());
        // The nudge woke it (a permit on the entry's signal), but is no reason to close.
        assert!(c.kick.poll_kicked(&mut cx).is_pending());
        // Parked: the sweep leaves it alone.
        c.kick.parked();
        r.sweep(0, now);
        r.sweep(0, now);
        assert!(c.kick.poll_kicked(&mut cx).is_pending());
        // A kick while parked is seen, and seen again once the parked connection resumes.
        c.kick.kick(Kicked::TakenOver);
        assert!(c.kick.poll_kicked(&mut cx).is_ready());
        c.kick.wake_again();
        assert_eq!(c.kick.poll_kicked(&mut cx), std::task::Poll::Ready(Kicked::TakenOver));
        // Work clears the request.
        c.kick.worked();
        assert!(!c.kick.park_asked());
    }

    /// While a connection's flow control pauses it, its client's silence does not count, and
    /// the deadline moves on by the pause (the driver keeps no deadline of its own).
    #[tokio::test(start_paused = true)]
    async fn a_held_deadline_does_not_run_out_and_moves_on_by_the_pause() {
        let r = Registry::new();
        let held = r.claim(&conn(1, "/", "held"), 0, false).await;
        let start = tokio::time::Instant::now();
        held.kick.set_deadline(Some(start + Duration::from_secs(90)));
        held.kick.hold_deadline();
        r.sweep(0, ticks(start + Duration::from_secs(100)));
        assert!(tokio::time::timeout(Duration::from_millis(1), held.kick.kicked()).await.is_err());
        // Paused for 30 s: due at 120 s now.
        held.kick.release_deadline(Duration::from_secs(30));
        r.sweep(0, ticks(start + Duration::from_secs(119)));
        assert!(tokio::time::timeout(Duration::from_millis(1), held.kick.kicked()).await.is_err());
        r.sweep(0, ticks(start + Duration::from_secs(120)));
        assert_eq!(held.kick.kicked().await, Kicked::KeepAlive);
    }

    #[tokio::test]
    async fn release_by_a_stale_connection_is_ignored() {
        let r = Registry::new();
        let _c = r.claim(&conn(1, "/", "c"), 0, false).await;
        r.release("/", "c", ConnectionId(9), None);
        assert!(r.is_live("/", "c"));
        r.release("/", "c", ConnectionId(1), None);
        assert!(!r.is_live("/", "c"));
        assert_eq!(r.connected(), 0);
    }

    #[tokio::test]
    async fn a_stored_session_past_its_expiry_is_not_resumed() {
        let r = Registry::new();
        let _c = r.claim(&conn(1, "/", "c"), 0, false).await;
        r.release("/", "c", ConnectionId(1), Some(StoredSession { expiry: 0, ..Default::default() }));
        let again = r.claim(&conn(2, "/", "c"), 0, false).await;
        assert!(again.stored.is_none() && again.expired);
        r.release("/", "c", ConnectionId(2), Some(StoredSession { expiry: u32::MAX, ..Default::default() }));
        let never = r.claim(&conn(3, "/", "c"), 0, false).await;
        assert!(never.stored.is_some() && !never.expired);
    }

    #[tokio::test]
    async fn expire_ends_only_a_session_nobody_resumed() {
        let r = Registry::new();
        let first = r.claim(&conn(1, "/", "c"), 0, false).await;
        r.release("/", "c", ConnectionId(1), Some(StoredSession { expiry: 60, ..Default::default() }));
        let second = r.claim(&conn(2, "/", "c"), 0, false).await;
        assert!(r.claimed_since("/", "c", first.generation));
        assert!(r.expire("/", "c", first.generation, || panic!("resumed: must not end")).is_none());
        r.release("/", "c", ConnectionId(2), Some(StoredSession { expiry: 60, ..Default::default() }));
        let mut ended = false;
        assert!(r.expire("/", "c", second.generation, || ended = true).is_some());
        assert!(ended && !r.claimed_since("/", "c", second.generation));
        let third = r.claim(&conn(3, "/", "c"), 0, false).await;
        assert!(third.stored.is_none());
        assert!(third.generation > second.generation, "claim numbers never repeat");
    }

    #[tokio::test]
    async fn ids_are_per_vhost() {
        let r = Registry::new();
        let a = r.claim(&conn(1, "/", "c"), 0, false).await;
        let b = r.claim(&conn(2, "other", "c"), 0, false).await;
        assert!(!a.took_over && !b.took_over);
        assert_eq!(r.connected(), 2);
    }

    fn will(topic: &str) -> crate::codec::Will {
        crate::codec::Will {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"gone"),
            qos: crate::codec::QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
        }
    }

    fn with_will(expiry: u32) -> StoredSession {
        StoredSession { expiry, will: Some(will("w")), exchange: "amq.topic".into(), ..Default::default() }
    }

    #[tokio::test]
    async fn a_delayed_will_is_taken_once_when_nobody_came() {
        let r = Registry::new();
        let c = r.claim(&conn(1, "/", "c"), 0, false).await;
        r.release("/", "c", ConnectionId(1), Some(with_will(60)));
        let (due, st) = r.take_will("/", "c", c.generation).expect("due");
        assert_eq!(due.will.topic.as_str(), "w");
        assert_eq!(due.exchange, "amq.topic");
        assert!(st.will.is_none(), "stored again without it");
        assert!(r.take_will("/", "c", c.generation).is_none(), "only once");
    }

    #[tokio::test]
    async fn a_new_connection_cancels_a_delayed_will_even_when_its_session_ends_first() {
        // 07-will-delay-recover: the client comes back with clean start 1 inside the delay,
        // then leaves with session expiry 0, which removes the client id's slot: the old will
        // must not come at its deadline [MQTT-3.1.3-9].
        let r = Registry::new();
        let first = r.claim(&conn(1, "/", "c"), 0, false).await;
        r.release("/", "c", ConnectionId(1), Some(with_will(60)));
        let second = r.claim(&conn(2, "/", "c"), 0, false).await;
        assert!(second.stored.is_some_and(|st| st.will.is_some()), "the new connection drops it");
        r.release("/", "c", ConnectionId(2), None);
        assert!(r.take_will("/", "c", first.generation).is_none());
        assert!(r.expire("/", "c", first.generation, || panic!("nothing to end")).is_none());
        // And one resumed and stored again: the old will is not in it any more.
        let third = r.claim(&conn(3, "/", "c"), 0, false).await;
        r.release("/", "c", ConnectionId(3), Some(with_will(60)));
        let fourth = r.claim(&conn(4, "/", "c"), 0, true).await;
        r.release("/", "c", ConnectionId(4), Some(StoredSession { expiry: 60, ..Default::default() }));
        assert!(r.take_will("/", "c", third.generation).is_none());
        assert!(r.take_will("/", "c", fourth.generation).is_none(), "no will was left");
    }

    #[tokio::test]
    async fn the_session_end_publishes_a_will_still_waiting() {
        let r = Registry::new();
        let c = r.claim(&conn(1, "/", "c"), 0, false).await;
        r.release("/", "c", ConnectionId(1), Some(with_will(5)));
        // The expiry timer ran before the will's (both due at the same time): it takes the will.
        let ended = r.expire("/", "c", c.generation, || {}).expect("ended");
        assert_eq!(ended.expect("the will").will.topic.as_str(), "w");
        assert!(r.take_will("/", "c", c.generation).is_none(), "not twice");
        // The will's timer first: the expiry finds none.
        let c = r.claim(&conn(2, "/", "c"), 0, false).await;
        r.release("/", "c", ConnectionId(2), Some(with_will(5)));
        assert!(r.take_will("/", "c", c.generation).is_some());
        assert!(r.expire("/", "c", c.generation, || {}).expect("ended").is_none());
    }

    #[tokio::test]
    async fn a_claim_after_the_expiry_gets_the_will_that_was_due() {
        let r = Registry::new();
        let _c = r.claim(&conn(1, "/", "c"), 0, false).await;
        r.release("/", "c", ConnectionId(1), Some(with_will(0)));
        let again = r.claim(&conn(2, "/", "c"), 0, true).await;
        assert!(again.expired && again.stored.is_none());
        assert_eq!(again.ended_will.expect("due").will.topic.as_str(), "w");
    }

    #[tokio::test]
    async fn a_takeover_tells_the_old_connection_whether_the_session_goes_on() {
        for resume in [false, true] {
            let r = Arc::new(Registry::new());
            let first = r.claim(&conn(1, "/", "c"), 0, false).await;
            assert!(!first.kick.resumed());
            let r2 = r.clone();
            let holder = tokio::spawn(async move {
                assert_eq!(first.kick.kicked().await, Kicked::TakenOver);
                let resumed = first.kick.resumed();
                r2.release("/", "c", ConnectionId(1), None);
                resumed
            });
            let entry = conn(2, "/", "c");
            let second = r.claim(&entry, 0, resume);
            let second = tokio::time::timeout(Duration::from_secs(5), second).await.unwrap();
            assert!(second.took_over);
            assert_eq!(holder.await.unwrap(), resume);
        }
    }

    #[tokio::test]
    async fn a_close_from_outside_kicks_the_holder_through_the_same_wake_up() {
        let r = Registry::new();
        let entry = conn(1, "/", "c");
        let c = r.claim(&entry, 0, false).await;
        assert_eq!(c.kick.connection(), ConnectionId(1));
        entry.close("maintenance");
        let why = tokio::time::timeout(Duration::from_secs(5), c.kick.kicked()).await.expect("woken");
        assert_eq!(why, Kicked::Closed);
        assert_eq!(entry.close_reason(), Some("maintenance"));
        // A reason of the registry's own is told as that, whatever woke the task.
        r.shut_down(0);
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), c.kick.kicked()).await.unwrap(), Kicked::Shutdown);
    }

    #[tokio::test]
    async fn a_claim_waits_for_the_old_connection_to_release() {
        let r = Arc::new(Registry::new());
        let first = r.claim(&conn(1, "/", "c"), 0, false).await;
        let claiming = tokio::spawn({
            let r = r.clone();
            async move { r.claim(&conn(2, "/", "c"), 0, true).await }
        });
        first.kick.kicked().await;
        // Kicked, not yet released: the claim is still waiting, and the old connection's last
        // word (a DISCONNECT with session expiry 0: nothing stored) decides what it gets.
        tokio::task::yield_now().await;
        assert!(!claiming.is_finished());
        assert!(r.is_live("/", "c"));
        r.release("/", "c", ConnectionId(1), None);
        let second = tokio::time::timeout(Duration::from_secs(5), claiming).await.unwrap().unwrap();
        assert!(second.took_over && second.stored.is_none());
    }
}

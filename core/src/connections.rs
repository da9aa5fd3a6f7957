//! The connection registry: every live connection of any protocol (and, once they exist, every
//! bridge link), with what management, metrics and `$SYS` read about it and a way to close it
//! from outside.
//!
//! A frontend [`Connections::register`]s a connection as soon as it knows its protocol version
//! (AMQP at the protocol header, MQTT at its CONNECT) and keeps the [`ConnectionHandle`] it gets
//! for the connection's life: dropping the handle unregisters it, whatever way the task ends.
//! What is known only after the login (user, vhost, client id) is set on the entry once, then
//! ([`ConnectionEntry::set_login`]); the counters are atomics the driver adds to once per read
//! and per write, never per byte or under a lock.
//!
//! Closing from outside ([`Connections::close`]) records the reason (the first one wins) and
//! wakes the connection's task through a [`Signal`] it polls with its other wake-ups; the
//! frontend then says goodbye in its protocol's terms (MQTT 5.0 DISCONNECT 0x98, AMQP
//! connection.close 320) and ends. The same signal can wake the task for a frontend's own
//! reasons ([`ConnectionEntry::wake`]): the MQTT client-id registry kicks a taken-over
//! connection through it, so a connection has one wake-up for every "go away", not one per
//! reason.
//!
//! Memory: an entry is one allocation of `size_of::<ConnectionEntry>()` (see the test
//! `an_entry_stays_small`), plus one allocation for the login's three strings together, and a
//! table slot; the listener and our end's address are shared by the connections that came in
//! through both (an [`Endpoint`]); the task holds a 16-byte handle.
//!
//! Locks: `Connections::entries` is taken alone, or before the count's `watch` lock (register
//! and unregister update the count under it); nothing else is taken under either.
//! `Connections::endpoints` and an entry's channel list lock are taken alone.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};

use tokio::sync::watch;

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;
use once_cell::race::OnceBox;

use crate::cert_login::{certificate_user, CertLogin};
use crate::frontend::{ListenerSettings, TlsIdentity};
use crate::hash::FastState;
use crate::message::{ConnectionId, Millis, Protocol};
use crate::queue::OwnerId;
use crate::signal::Signal;

/// What TLS established about a connection, as listings show it. Not the certificate chain
/// itself (a kilobyte or more per connection): its leaf's subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// The server name the client asked for (SNI).
    pub server_name: Option<String>,
    /// The negotiated ALPN protocol.
    pub alpn: Option<String>,
    /// The client certificate's subject as an RFC 4514 string (`CN=client,O=Acme`), when it
    /// presented one.
    pub peer_subject: Option<String>,
}

impl TlsInfo {
    pub fn of(identity: &TlsIdentity) -> TlsInfo {
        TlsInfo {
            server_name: identity.server_name.clone(),
            alpn: identity.alpn.as_ref().map(|a| String::from_utf8_lossy(a).into_owned()),
            peer_subject: identity
                .peer_certificates
                .first()
                .and_then(|leaf| certificate_user(leaf, CertLogin::DistinguishedName).ok()),
        }
    }
}

/// What is known of a connection when it registers, and does not change.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub id: ConnectionId,
    pub protocol: Protocol,
    /// The protocol version as its users write it: `3.1`, `3.1.1`, `5.0`, `0-9-1`.
    pub version: &'static str,
    pub peer: SocketAddr,
    /// Our end of the connection (the listener's address).
    pub local: SocketAddr,
    /// The listener it came through; `None` for links the broker makes itself (bridges).
    pub listener: Option<Arc<ListenerSettings>>,
    /// `Some` over TLS. Boxed: most connections have none.
    pub tls: Option<Box<TlsInfo>>,
    pub connected_at: Millis,
}

/// Who the connection logged in as; set once the login succeeded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub vhost: String,
    /// The MQTT client id; for AMQP the name the client gave its connection, if any. An empty
    /// one is none.
    pub client_id: Option<String>,
}

/// A [`Login`] as an entry keeps it: the three strings in one allocation (three `String`s were
/// 72 bytes inline and three allocations, for every idle connection), after the lengths of the
/// first two (`<user length>:<vhost length>:<user><vhost><client id>`; with the lengths as two
/// `u32`s beside the text the entry was 8 bytes larger).
#[derive(Debug)]
struct PackedLogin {
    text: Box<str>,
}

impl PackedLogin {
    fn new(login: &Login) -> PackedLogin {
        let client_id = login.client_id.as_deref().unwrap_or_default();
        let lengths = format!("{}:{}:", login.user.len(), login.vhost.len());
        PackedLogin { text: [lengths.as_str(), &login.user, &login.vhost, client_id].concat().into_boxed_str() }
    }
    /// User, vhost and client id.
    fn parts(&self) -> (&str, &str, &str) {
        let parse = |s: &str| s.parse::<usize>().unwrap_or(0);
        let (user_len, rest) = self.text.split_once(':').unwrap_or(("0", &self.text));
        let (vhost_len, rest) = rest.split_once(':').unwrap_or(("0", rest));
        let (user, rest) = rest.split_at_checked(parse(user_len)).unwrap_or(("", rest));
        let (vhost, client_id) = rest.split_at_checked(parse(vhost_len)).unwrap_or(("", rest));
        (user, vhost, client_id)
    }
    fn user(&self) -> &str {
        self.parts().0
    }
    fn vhost(&self) -> &str {
        self.parts().1
    }
    fn client_id(&self) -> Option<&str> {
        Some(self.parts().2).filter(|c| !c.is_empty())
    }
}

/// A [`ConnectionInfo`] as an entry keeps it: the version as one byte ([`version_index`]), 16
/// bytes less of every entry; the peer's address as a [`PackedAddr`], 13 less; the listener and
/// our end's address as a shared [`Endpoint`], 19 less; the TLS details with the rare parts
/// ([`Rare::tls`]), 8 less.
#[derive(Debug)]
struct Info {
    id: ConnectionId,
    peer: PackedAddr,
    endpoint: Arc<Endpoint>,
    connected_at: Millis,
    protocol: Protocol,
    version: u8,
}

/// Where connections came in: the listener and our end's address. One for all the connections
/// that have both (all of a listener's, when it is bound to one address), kept by
/// [`Connections::endpoints`] while one of them lives.
#[derive(Debug)]
struct Endpoint {
    listener: Option<Arc<ListenerSettings>>,
    local: SocketAddr,
}

/// The live [`Endpoint`]s, by our end's address and the listener (by its address in memory,
/// which the endpoint's own `Arc` keeps from being reused while it lives). A handful: a
/// listener's addresses are the host's; a bridge link's local port is its own, and its endpoint
/// goes with it (dead ones are dropped as the map doubles).
#[derive(Default)]
struct Endpoints {
    map: HashMap<(SocketAddr, usize), Weak<Endpoint>>,
    prune_at: usize,
}

impl Endpoints {
    fn get(&mut self, listener: Option<Arc<ListenerSettings>>, local: SocketAddr) -> Arc<Endpoint> {
        let key = (local, listener.as_ref().map_or(0, |l| Arc::as_ptr(l) as usize));
        if let Some(found) = self.map.get(&key).and_then(Weak::upgrade) {
            return found;
        }
        let endpoint = Arc::new(Endpoint { listener, local });
        self.map.insert(key, Arc::downgrade(&endpoint));
        if self.map.len() > self.prune_at {
            self.map.retain(|_, e| e.strong_count() > 0);
            self.prune_at = 2 * self.map.len().max(16);
        }
        endpoint
    }
}

/// A socket address in 19 bytes, where `SocketAddr` takes 32: an IPv6 address's flow info and
/// scope id are not kept (nothing lists them), and an IPv4 address is kept as IPv4-mapped
/// IPv6 with a flag, so it reads back as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PackedAddr {
    ip: [u8; 16],
    port: [u8; 2],
    v4: bool,
}

impl PackedAddr {
    fn new(addr: SocketAddr) -> PackedAddr {
        let (ip, v4) = match addr.ip() {
            std::net::IpAddr::V4(ip) => (ip.to_ipv6_mapped(), true),
            std::net::IpAddr::V6(ip) => (ip, false),
        };
        PackedAddr { ip: ip.octets(), port: addr.port().to_ne_bytes(), v4 }
    }

    fn get(&self) -> SocketAddr {
        let ip = std::net::Ipv6Addr::from(self.ip);
        let port = u16::from_ne_bytes(self.port);
        match ip.to_ipv4_mapped() {
            Some(v4) if self.v4 => SocketAddr::from((v4, port)),
            _ => SocketAddr::from((ip, port)),
        }
    }
}

/// The protocol versions connections registered with, in the order first seen: a handful
/// (`3.1`, `3.1.1`, `5.0`, `0-9-1`).
static VERSIONS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// `version`'s number in [`VERSIONS`] (255 past 255 of them, which no build has).
fn version_index(version: &'static str) -> u8 {
    let mut all = VERSIONS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = all.iter().position(|v| *v == version) {
        return i as u8;
    }
    if all.len() >= usize::from(u8::MAX) {
        return u8::MAX;
    }
    all.push(version);
    (all.len() - 1) as u8
}

fn version_name(index: u8) -> &'static str {
    VERSIONS.lock().unwrap_or_else(|e| e.into_inner()).get(usize::from(index)).copied().unwrap_or("?")
}

/// Traffic of one connection since it registered. The driver adds once per read or write
/// (`Relaxed`: readers want totals, not an order between them).
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages the client published.
    pub messages_in: AtomicU64,
    /// Messages delivered to the client.
    pub messages_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl Counters {
    pub fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }
    /// Sets the message counts from the connection's own running totals (a state machine that
    /// counts them itself hands them over once per wake-up).
    /// Adds messages published and delivered since the last call (a driver that counts its
    /// own between wake-ups).
    pub fn add_messages(&self, messages_in: u64, messages_out: u64) {
        if messages_in > 0 {
            self.messages_in.fetch_add(messages_in, Ordering::Relaxed);
        }
        if messages_out > 0 {
            self.messages_out.fetch_add(messages_out, Ordering::Relaxed);
        }
    }

    pub fn set_messages(&self, messages_in: u64, messages_out: u64) {
        self.messages_in.store(messages_in, Ordering::Relaxed);
        self.messages_out.store(messages_out, Ordering::Relaxed);
    }
}

/// One live connection.
pub struct ConnectionEntry {
    info: Info,
    /// Unset until the login; set once (readers never lock).
    login: OnceLock<PackedLogin>,
    pub counters: Counters,
    /// Wakes the connection's task: a close from outside, or its frontend's own reasons.
    wake: Signal,
    /// What most connections never need, made on first use: a close from outside, AMQP
    /// channels; made with the entry over TLS. Apart, their 40 bytes made the entry 264 bytes,
    /// jemalloc's 320 class with the `Arc`'s counts; 240 and the 256 class with them here; now
    /// 208 and the 224 class with the channel count here too, the version as one byte and the
    /// login's lengths in its text (`an_entry_stays_small`, issue 18). A `OnceBox` (a pointer;
    /// two racing first uses make one each and one is dropped), where a `OnceLock` is 16 bytes.
    rare: OnceBox<Rare>,
}

/// See [`ConnectionEntry::rare`].
#[derive(Debug, Default)]
struct Rare {
    /// Open channels (AMQP; 0 for protocols without channels).
    channels: AtomicU32,
    /// Why it was asked to close from outside; the first reason given wins.
    close_reason: OnceLock<Box<str>>,
    /// The AMQP channels as listings show them ([`ConnectionEntry::set_channel_list`]).
    channel_list: Mutex<Vec<ChannelInfo>>,
    /// `Some` over TLS (set when the entry is made).
    tls: Option<Box<TlsInfo>>,
}

/// One AMQP channel as the management API lists it. The frontend hands the list over with its
/// other counters, once per wake-up, and only a changed list is copied in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelInfo {
    pub number: u16,
    /// The channel's holder of unacked messages: what its consumers' [`ConsumerSpec::owner`]
    /// says (`crate::queue::ConsumerSpec`), to tell which channel a consumer is on.
    pub owner: OwnerId,
    /// basic.qos global=false: the prefetch of consumers made after it (0: none).
    pub prefetch_count: u16,
    /// basic.qos global=true: the channel-wide limit (0: none).
    pub global_prefetch_count: u32,
    pub confirm: bool,
    pub transactional: bool,
    pub consumers: u32,
    /// Deliveries and gets waiting for the client's ack.
    pub unacked: u32,
}

impl fmt::Debug for ConnectionEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionEntry")
            .field("info", &self.info)
            .field("login", &self.login())
            .field("counters", &self.counters)
            .field("close_reason", &self.close_reason())
            .finish_non_exhaustive()
    }
}

impl ConnectionEntry {
    fn new(info: ConnectionInfo, endpoint: Arc<Endpoint>) -> ConnectionEntry {
        let ConnectionInfo { id, protocol, version, peer, local: _, listener: _, tls, connected_at } = info;
        let rare = match tls {
            Some(tls) => OnceBox::with_value(Box::new(Rare { tls: Some(tls), ..Rare::default() })),
            None => OnceBox::new(),
        };
        ConnectionEntry {
            info: Info {
                id,
                peer: PackedAddr::new(peer),
                endpoint,
                connected_at,
                protocol,
                version: version_index(version),
            },
            login: OnceLock::new(),
            counters: Counters::default(),
            wake: Signal::new(),
            rare,
        }
    }

    fn rare(&self) -> &Rare {
        self.rare.get_or_init(Box::default)
    }

    pub fn id(&self) -> ConnectionId {
        self.info.id
    }

    pub fn protocol(&self) -> Protocol {
        self.info.protocol
    }

    /// The protocol version as its users write it (`3.1.1`, `0-9-1`).
    pub fn version(&self) -> &'static str {
        version_name(self.info.version)
    }

    pub fn peer(&self) -> SocketAddr {
        self.info.peer.get()
    }

    pub fn connected_at(&self) -> Millis {
        self.info.connected_at
    }

    /// The listener it came through (`None` for links the broker makes itself).
    pub fn listener(&self) -> Option<&Arc<ListenerSettings>> {
        self.info.endpoint.listener.as_ref()
    }

    /// Who the connection logged in as (`None` before the login).
    pub fn login(&self) -> Option<Login> {
        let l = self.login.get()?;
        Some(Login { user: l.user().into(), vhost: l.vhost().into(), client_id: l.client_id().map(Into::into) })
    }

    /// The user it logged in as (`None` before the login).
    pub fn user(&self) -> Option<&str> {
        self.login.get().map(PackedLogin::user)
    }

    pub fn vhost(&self) -> Option<&str> {
        self.login.get().map(PackedLogin::vhost)
    }

    pub fn client_id(&self) -> Option<&str> {
        self.login.get().and_then(PackedLogin::client_id)
    }

    /// Records the login; `false` (and nothing changes) when one was recorded before.
    pub fn set_login(&self, login: Login) -> bool {
        self.login.set(PackedLogin::new(&login)).is_ok()
    }

    pub fn channels(&self) -> u32 {
        self.rare.get().map_or(0, |r| r.channels.load(Ordering::Relaxed))
    }

    pub fn set_channels(&self, n: u32) {
        if n == 0 && self.rare.get().is_none() {
            return;
        }
        self.rare().channels.store(n, Ordering::Relaxed);
    }

    /// Replaces the channel list with `list` when it differs (a lock and a comparison when it
    /// does not; no allocation while the list does not grow).
    pub fn set_channel_list(&self, list: &[ChannelInfo]) {
        if list.is_empty() && self.rare.get().is_none() {
            return;
        }
        let mut cur = self.rare().channel_list.lock().unwrap_or_else(|e| e.into_inner());
        if cur.as_slice() != list {
            cur.clear();
            cur.extend_from_slice(list);
        }
    }

    /// The channels as last handed over, by number.
    pub fn channel_list(&self) -> Vec<ChannelInfo> {
        let mut list = match self.rare.get() {
            Some(rare) => rare.channel_list.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            None => Vec::new(),
        };
        list.sort_by_key(|c| c.number);
        list
    }

    /// Asks the connection to close, telling its client `reason`. `false` when it was asked
    /// before (the first reason stands; the connection is woken all the same).
    pub fn close(&self, reason: impl Into<String>) -> bool {
        let first = self.rare().close_reason.set(reason.into().into_boxed_str()).is_ok();
        self.wake.notify();
        first
    }

    /// Why the connection was asked to close from outside, if it was.
    pub fn close_reason(&self) -> Option<&str> {
        self.rare.get()?.close_reason.get().map(|r| &**r)
    }

    /// Wakes the connection's task for its frontend's own reason (which the frontend keeps
    /// itself); the task sees it as a ready [`ConnectionEntry::poll_wake`].
    pub fn wake(&self) {
        self.wake.notify();
    }

    /// `Ready` once woken ([`ConnectionEntry::close`] or [`ConnectionEntry::wake`]) since the
    /// last `Ready`; registers the task otherwise. Polled by the connection's own task only (one
    /// waiter, see [`Signal`]).
    pub fn poll_wake(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.wake.poll(cx)
    }

    /// `Ready` with the reason once the connection is asked to close from outside. For a
    /// frontend that has no reasons of its own to wake for (a wake without a close reason is
    /// passed over).
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<&str> {
        loop {
            if let Some(reason) = self.close_reason() {
                return Poll::Ready(reason);
            }
            if self.wake.poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Resolves with the reason once the connection is asked to close from outside.
    pub async fn closed(&self) -> &str {
        std::future::poll_fn(|cx| self.poll_closed(cx)).await
    }

    /// The entry as plain values, for listings.
    pub fn snapshot(&self) -> ConnectionSnapshot {
        let c = &self.counters;
        ConnectionSnapshot {
            id: self.info.id,
            protocol: self.info.protocol,
            version: self.version(),
            peer: self.info.peer.get(),
            local: self.info.endpoint.local,
            listener: self.info.endpoint.listener.as_ref().map(|l| l.name.clone()),
            tls: self.rare.get().and_then(|r| r.tls.as_deref()).cloned(),
            connected_at: self.info.connected_at,
            user: self.user().map(str::to_string),
            vhost: self.vhost().map(str::to_string),
            client_id: self.client_id().map(str::to_string),
            channels: self.channels(),
            messages_in: c.messages_in.load(Ordering::Relaxed),
            messages_out: c.messages_out.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            closing: self.close_reason().map(str::to_string),
        }
    }
}

/// A connection as a listing shows it, at the moment it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSnapshot {
    pub id: ConnectionId,
    pub protocol: Protocol,
    pub version: &'static str,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The listener's name (`mqtt 127.0.0.1:1883`).
    pub listener: Option<String>,
    pub tls: Option<TlsInfo>,
    pub connected_at: Millis,
    pub user: Option<String>,
    pub vhost: Option<String>,
    pub client_id: Option<String>,
    pub channels: u32,
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// `Some(reason)` once asked to close from outside.
    pub closing: Option<String>,
}

/// Traffic totals of one protocol's connections, closed ones included ([`Connections::totals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProtocolTotals {
    /// Connections registered since the start.
    pub opened: u64,
    /// Connections open now.
    pub open: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// What the closed connections of one protocol counted; added to when one unregisters.
#[derive(Debug, Default)]
struct Retired {
    opened: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// The protocols [`Connections::totals`] reports, in its order.
pub const PROTOCOLS: [Protocol; 3] = [Protocol::Mqtt, Protocol::Amqp, Protocol::Internal];

fn protocol_index(p: Protocol) -> usize {
    match p {
        Protocol::Mqtt => 0,
        Protocol::Amqp => 1,
        Protocol::Internal => 2,
    }
}

/// The live entries, by id: a table of entries that know their ids, 8 bytes a slot where a map
/// from the id to the entry was 16 (14 bytes of every connection at 10,000, issue 18). The
/// ids are the broker's: a fixed-seed hasher.
#[derive(Default)]
struct Entries {
    table: HashTable<Arc<ConnectionEntry>>,
}

impl Entries {
    fn hash(id: ConnectionId) -> u64 {
        FastState::default().hash_one(id)
    }

    fn get(&self, id: ConnectionId) -> Option<&Arc<ConnectionEntry>> {
        self.table.find(Self::hash(id), |e| e.id() == id)
    }

    /// Adds `entry`, replacing one with its id.
    fn insert(&mut self, entry: Arc<ConnectionEntry>) {
        let id = entry.id();
        match self.table.entry(Self::hash(id), |e| e.id() == id, |e| Self::hash(e.id())) {
            Entry::Occupied(mut found) => *found.get_mut() = entry,
            Entry::Vacant(vacant) => {
                vacant.insert(entry);
            }
        }
    }

    fn remove(&mut self, id: ConnectionId) {
        if let Ok(found) = self.table.find_entry(Self::hash(id), |e| e.id() == id) {
            found.remove();
        }
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn values(&self) -> impl Iterator<Item = &Arc<ConnectionEntry>> {
        self.table.iter()
    }
}

/// Every live connection, by id. Owned by the [`Broker`](crate::Broker).
pub struct Connections {
    entries: Mutex<Entries>,
    endpoints: Mutex<Endpoints>,
    /// Per protocol ([`PROTOCOLS`] order): what closed connections counted. Added to under the
    /// `entries` lock as an entry leaves, so that [`Connections::totals`] (which reads under
    /// it) counts every connection exactly once and its sums never go down.
    retired: [Retired; 3],
    /// How many are registered; changes wake [`Connections::gone`] (and whoever counts).
    count: watch::Sender<usize>,
}

impl fmt::Debug for Connections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connections").field("len", &self.len()).finish()
    }
}

impl Default for Connections {
    fn default() -> Connections {
        Connections {
            entries: Mutex::default(),
            endpoints: Mutex::default(),
            retired: Default::default(),
            count: watch::Sender::new(0),
        }
    }
}

impl Connections {
    pub fn new() -> Arc<Connections> {
        Arc::new(Connections::default())
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection until the returned handle is dropped. An id registered twice
    /// replaces the first entry (ids are unique per process, see [`ConnectionId::next`]).
    pub fn register(self: &Arc<Self>, info: ConnectionInfo) -> ConnectionHandle {
        let endpoint = self.endpoints.lock().unwrap_or_else(|e| e.into_inner()).get(info.listener.clone(), info.local);
        let entry = Arc::new(ConnectionEntry::new(info, endpoint));
        let mut entries = self.entries();
        entries.insert(entry.clone());
        self.retired[protocol_index(entry.info.protocol)].opened.fetch_add(1, Ordering::Relaxed);
        self.count.send_replace(entries.len());
        drop(entries);
        ConnectionHandle { entry, registry: self.clone() }
    }

    fn unregister(&self, entry: &Arc<ConnectionEntry>) {
        let mut entries = self.entries();
        // Only this entry: not one registered later under the same id.
        if entries.get(entry.id()).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            let r = &self.retired[protocol_index(entry.info.protocol)];
            let c = &entry.counters;
            r.messages_in.fetch_add(c.messages_in.load(Ordering::Relaxed), Ordering::Relaxed);
            r.messages_out.fetch_add(c.messages_out.load(Ordering::Relaxed), Ordering::Relaxed);
            r.bytes_in.fetch_add(c.bytes_in.load(Ordering::Relaxed), Ordering::Relaxed);
            r.bytes_out.fetch_add(c.bytes_out.load(Ordering::Relaxed), Ordering::Relaxed);
            entries.remove(entry.id());
            self.count.send_replace(entries.len());
        }
    }

    /// The live connection with this id.
    pub fn get(&self, id: ConnectionId) -> Option<Arc<ConnectionEntry>> {
        self.entries().get(id).cloned()
    }

    pub fn contains(&self, id: ConnectionId) -> bool {
        self.entries().get(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live connection, by id. The entries are cloned out (one `Arc` each) before any is
    /// read, so the registry is not locked while a listing is built.
    pub fn entries_by_id(&self) -> Vec<Arc<ConnectionEntry>> {
        let mut all: Vec<Arc<ConnectionEntry>> = self.entries().values().cloned().collect();
        all.sort_by_key(|e| e.id());
        all
    }

    /// Per protocol ([`PROTOCOLS`] order), the traffic of every connection since the start:
    /// closed ones and the live ones, read under the registry's lock (relaxed loads only, no
    /// allocation), so that each connection counts once and no sum goes down between calls.
    pub fn totals(&self) -> [ProtocolTotals; 3] {
        let entries = self.entries();
        let mut out = [ProtocolTotals::default(); 3];
        for (t, r) in out.iter_mut().zip(&self.retired) {
            t.opened = r.opened.load(Ordering::Relaxed);
            t.messages_in = r.messages_in.load(Ordering::Relaxed);
            t.messages_out = r.messages_out.load(Ordering::Relaxed);
            t.bytes_in = r.bytes_in.load(Ordering::Relaxed);
            t.bytes_out = r.bytes_out.load(Ordering::Relaxed);
        }
        for e in entries.values() {
            let t = &mut out[protocol_index(e.info.protocol)];
            let c = &e.counters;
            t.open += 1;
            t.messages_in += c.messages_in.load(Ordering::Relaxed);
            t.messages_out += c.messages_out.load(Ordering::Relaxed);
            t.bytes_in += c.bytes_in.load(Ordering::Relaxed);
            t.bytes_out += c.bytes_out.load(Ordering::Relaxed);
        }
        out
    }

    /// Every live connection as plain values, by id.
    pub fn list(&self) -> Vec<ConnectionSnapshot> {
        self.entries_by_id().iter().map(|e| e.snapshot()).collect()
    }

    /// Asks connection `id` to close, telling its client `reason` (MQTT 5.0 DISCONNECT 0x98
    /// with it as the reason string, AMQP connection.close 320 with it in the reply text).
    /// `false` when no such connection is registered.
    pub fn close(&self, id: ConnectionId, reason: impl Into<String>) -> bool {
        match self.get(id) {
            Some(entry) => {
                entry.close(reason);
                true
            }
            None => false,
        }
    }

    /// A receiver of the number of registered connections.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    /// Resolves once connection `id` is no longer registered (its task has ended).
    pub async fn gone(&self, id: ConnectionId) {
        let mut count = self.count.subscribe();
        loop {
            // Marked seen before looking, so an unregister in between is a change.
            count.borrow_and_update();
            if !self.contains(id) {
                return;
            }
            if count.changed().await.is_err() {
                return;
            }
        }
    }
}

/// A registered connection, held by its task: derefs to the [`ConnectionEntry`], and
/// unregisters it when dropped.
pub struct ConnectionHandle {
    entry: Arc<ConnectionEntry>,
    registry: Arc<Connections>,
}

impl ConnectionHandle {
    /// The entry, to hand to what wakes the connection for its own reasons (see the module).
    pub fn entry(&self) -> &Arc<ConnectionEntry> {
        &self.entry
    }
}

impl std::ops::Deref for ConnectionHandle {
    type Target = ConnectionEntry;
    fn deref(&self) -> &ConnectionEntry {
        &self.entry
    }
}

impl fmt::Debug for ConnectionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnectionHandle").field(&self.entry.id()).finish()
    }
}

impl Drop for ConnectionHandle {
    fn drop(&mut self) {
        self.registry.unregister(&self.entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn info(id: u64, protocol: Protocol) -> ConnectionInfo {
        ConnectionInfo {
            id: ConnectionId(id),
            protocol,
            version: "5.0",
            peer: "127.0.0.1:50000".parse().unwrap(),
            local: "127.0.0.1:1883".parse().unwrap(),
            listener: None,
            tls: None,
            connected_at: 1_000,
        }
    }

    #[test]
    fn a_handle_registers_until_it_is_dropped() {
        let reg = Connections::new();
        let a = reg.register(info(1, Protocol::Mqtt));
        let b = reg.register(info(2, Protocol::Amqp));
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.list().iter().map(|s| s.id.0).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(*reg.subscribe().borrow(), 2);
        drop(a);
        assert!(!reg.contains(ConnectionId(1)) && reg.contains(ConnectionId(2)));
        assert_eq!(*reg.subscribe().borrow(), 1);
        drop(b);
        assert!(reg.is_empty());
    }

    #[test]
    fn totals_keep_what_closed_connections_counted() {
        let reg = Connections::new();
        let a = reg.register(info(1, Protocol::Mqtt));
        let b = reg.register(info(2, Protocol::Mqtt));
        let c = reg.register(info(3, Protocol::Amqp));
        a.counters.set_messages(5, 7);
        a.counters.add_bytes_in(100);
        b.counters.set_messages(1, 0);
        c.counters.add_bytes_out(9);
        let before = reg.totals();
        assert_eq!((before[0].opened, before[0].open, before[0].messages_in, before[0].messages_out), (2, 2, 6, 7));
        drop(a);
        let after = reg.totals();
        assert_eq!(after[0], ProtocolTotals { open: 1, ..before[0] }, "a closed connection's counts stay");
        assert_eq!((after[1].opened, after[1].open, after[1].bytes_out), (1, 1, 9));
        drop((b, c));
    }

    #[test]
    fn a_stale_handle_does_not_unregister_a_newer_entry_with_its_id() {
        let reg = Connections::new();
        let old = reg.register(info(7, Protocol::Mqtt));
        let new = reg.register(info(7, Protocol::Amqp));
        drop(old);
        assert_eq!(reg.get(ConnectionId(7)).map(|e| e.protocol()), Some(Protocol::Amqp));
        drop(new);
        assert!(reg.is_empty());
    }

    #[test]
    fn the_snapshot_has_the_info_the_login_and_the_counters() {
        let reg = Connections::new();
        let h = reg.register(info(3, Protocol::Mqtt));
        let before = reg.list().remove(0);
        assert_eq!((before.user, before.vhost, before.client_id), (None, None, None));
        assert!(h.set_login(Login { user: "bob".into(), vhost: "/".into(), client_id: Some("sensor".into()) }));
        assert!(!h.set_login(Login::default()), "set once");
        h.counters.add_bytes_in(10);
        h.counters.add_bytes_in(5);
        h.counters.add_bytes_out(7);
        h.counters.set_messages(2, 3);
        h.set_channels(4);
        let s = reg.list().remove(0);
        assert_eq!(s.protocol, Protocol::Mqtt);
        assert_eq!(s.version, "5.0");
        assert_eq!(s.peer, "127.0.0.1:50000".parse().unwrap());
        assert_eq!(s.connected_at, 1_000);
        assert_eq!(s.user.as_deref(), Some("bob"));
        assert_eq!(s.vhost.as_deref(), Some("/"));
        assert_eq!(s.client_id.as_deref(), Some("sensor"));
        assert_eq!((s.bytes_in, s.bytes_out, s.messages_in, s.messages_out), (15, 7, 2, 3));
        assert_eq!(s.channels, 4);
        assert_eq!(s.closing, None);
    }

    /// Connections through one listener to one local address share an endpoint; another
    /// address or listener has its own. A listing shows each its own; the TLS details (in the
    /// rare box from the start) stay through a close from outside (which uses that box too).
    /// Dead endpoints let go of their listener and do not pile up.
    #[test]
    fn connections_share_their_listener_and_local_address() {
        let reg = Connections::new();
        let listener = Arc::new(ListenerSettings {
            name: "mqtt 127.0.0.1:1883".into(),
            protocol: Protocol::Mqtt,
            vhost: "/".into(),
            exchange: None,
            limits: Default::default(),
            auth: Default::default(),
        });
        let on = |id: u64, local: &str, l: Option<&Arc<ListenerSettings>>, tls: Option<&str>| {
            let tls = tls.map(|name| Box::new(TlsInfo { server_name: Some(name.into()), ..TlsInfo::default() }));
            reg.register(ConnectionInfo {
                local: local.parse().unwrap(),
                listener: l.cloned(),
                tls,
                ..info(id, Protocol::Mqtt)
            })
        };
        let a = on(1, "127.0.0.1:1883", Some(&listener), None);
        let b = on(2, "127.0.0.1:1883", Some(&listener), Some("ferry.example"));
        let c = on(3, "10.0.0.1:1883", Some(&listener), None);
        let d = on(4, "127.0.0.1:1883", None, None);
        assert!(Arc::ptr_eq(&a.info.endpoint, &b.info.endpoint));
        assert!(!Arc::ptr_eq(&a.info.endpoint, &c.info.endpoint));
        assert!(!Arc::ptr_eq(&a.info.endpoint, &d.info.endpoint));
        assert!(b.close("bye"));
        let list = reg.list();
        let locals: Vec<SocketAddr> = list.iter().map(|s| s.local).collect();
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert_eq!(locals, [at("127.0.0.1:1883"), at("127.0.0.1:1883"), at("10.0.0.1:1883"), at("127.0.0.1:1883")]);
        let listeners: Vec<Option<&str>> = list.iter().map(|s| s.listener.as_deref()).collect();
        let name = Some("mqtt 127.0.0.1:1883");
        assert_eq!(listeners, [name, name, name, None]);
        let tls: Vec<Option<&str>> =
            list.iter().map(|s| s.tls.as_ref().and_then(|t| t.server_name.as_deref())).collect();
        assert_eq!(tls, [None, Some("ferry.example"), None, None]);
        assert_eq!(list[1].closing.as_deref(), Some("bye"));
        drop((a, b, c, d));
        assert_eq!(Arc::strong_count(&listener), 1, "the endpoints let go of the listener");
        for i in 0..1000u16 {
            drop(on(10 + u64::from(i), &format!("127.0.0.1:{}", 2000 + i), None, None));
        }
        let kept = reg.endpoints.lock().unwrap().map.len();
        assert!(kept <= 33, "{kept} endpoints kept");
    }

    #[test]
    fn a_login_without_a_client_id_reads_back_as_given() {
        let reg = Connections::new();
        let h = reg.register(info(9, Protocol::Amqp));
        assert_eq!(h.login(), None);
        let login = Login { user: "ünïcode".into(), vhost: "prod".into(), client_id: None };
        h.set_login(login.clone());
        assert_eq!(h.login(), Some(login));
        assert_eq!((h.user(), h.vhost(), h.client_id()), (Some("ünïcode"), Some("prod"), None));
        let empty = reg.register(info(10, Protocol::Amqp));
        empty.set_login(Login { user: String::new(), vhost: "/".into(), client_id: Some(String::new()) });
        assert_eq!((empty.user(), empty.vhost(), empty.client_id()), (Some(""), Some("/"), None));
    }

    #[tokio::test]
    async fn close_wakes_the_connection_with_the_first_reason() {
        let reg = Connections::new();
        let h = reg.register(info(4, Protocol::Amqp));
        let entry = h.entry().clone();
        let waiter = tokio::spawn(async move { entry.closed().await.to_string() });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert!(reg.close(ConnectionId(4), "maintenance"));
        assert!(reg.close(ConnectionId(4), "second reason"), "still registered");
        assert!(!h.close("third"), "the first reason stands");
        let reason = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").unwrap();
        assert_eq!(reason, "maintenance");
        assert_eq!(reg.list()[0].closing.as_deref(), Some("maintenance"));
        assert!(!reg.close(ConnectionId(99), "nobody"), "unknown id");
    }

    #[tokio::test]
    async fn a_close_before_the_task_waits_is_not_missed() {
        let reg = Connections::new();
        let h = reg.register(info(5, Protocol::Mqtt));
        reg.close(ConnectionId(5), "early");
        let reason = tokio::time::timeout(Duration::from_secs(5), h.closed()).await.expect("kept");
        assert_eq!(reason, "early");
    }

    #[tokio::test]
    async fn a_wake_without_a_reason_is_not_a_close() {
        let reg = Connections::new();
        let h = reg.register(info(6, Protocol::Mqtt));
        h.wake();
        // The frontend's own wake-up is seen by poll_wake...
        std::future::poll_fn(|cx| h.poll_wake(cx)).await;
        h.wake();
        // ...and passed over by closed(), which takes the wake-up and waits on.
        let pending = std::future::poll_fn(|cx| Poll::Ready(h.poll_closed(cx).is_pending())).await;
        assert!(pending);
        h.close("now");
        assert_eq!(std::future::poll_fn(|cx| h.poll_closed(cx)).await, "now");
    }

    #[tokio::test]
    async fn gone_resolves_when_the_handle_drops() {
        let reg = Connections::new();
        let h = reg.register(info(8, Protocol::Mqtt));
        let waiting = tokio::spawn({
            let reg = reg.clone();
            async move { reg.gone(ConnectionId(8)).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(h);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("gone").unwrap();
        // Already gone: at once.
        tokio::time::timeout(Duration::from_secs(5), reg.gone(ConnectionId(8))).await.expect("at once");
    }

    #[test]
    fn tls_info_keeps_the_client_certificate_subject_not_the_chain() {
        let mut params = rcgen::CertificateParams::new(vec!["client".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "Acme");
        params.distinguished_name.push(rcgen::DnType::CommonName, "sensor-7");
        let der = params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().der().to_vec();
        let identity = TlsIdentity {
            peer_certificates: vec![der],
            server_name: Some("broker".into()),
            alpn: Some(b"mqtt".to_vec()),
        };
        let tls = TlsInfo::of(&identity);
        assert_eq!(tls.peer_subject.as_deref(), Some("CN=sensor-7,O=Acme"));
        assert_eq!((tls.server_name.as_deref(), tls.alpn.as_deref()), (Some("broker"), Some("mqtt")));
        assert_eq!(TlsInfo::of(&TlsIdentity::default()), TlsInfo::default(), "no certificate, no subject");
    }

    #[test]
    fn an_entry_stays_small() {
        // Issue 18 wants an idle MQTT connection under 1 KiB in all; this is the registry's part
        // of it (plus the login strings and a map slot). 264 bytes on x86_64 when first written:
        // info 120, login 32, counters 32, wake signal 32, close reason 24, channel list 16,
        // channels 4; 240 with the close reason and the channel list in one box made on first
        // use (jemalloc's 256 class with the `Arc`'s counts); now 208 and the 224 class with the
        // channel count in that box too, the version as one byte and the login's lengths in its
        // text; 176 and the 192 class with the addresses packed (`PackedAddr`); now 144 and the
        // 160 class with the listener and the local address shared (`Endpoint`), the TLS
        // details in the rare box and that box a `OnceBox`.
        let size = std::mem::size_of::<ConnectionEntry>();
        assert!(size + 16 <= 160, "ConnectionEntry is {size} bytes");
        assert_eq!(std::mem::size_of::<ConnectionHandle>(), 16);
    }

    #[test]
    fn a_packed_address_reads_back_as_given() {
        for a in ["127.0.0.1:1883", "0.0.0.0:0", "[::1]:8883", "[::ffff:10.0.0.7]:65535", "[fe80::1:2:3:4]:1"] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(PackedAddr::new(addr).get(), addr, "{a}");
        }
        assert_eq!(std::mem::size_of::<PackedAddr>(), 19);
    }

    #[test]
    fn a_login_and_a_version_read_back_as_given() {
        let reg = Arc::new(Connections::new());
        for (user, vhost, client_id) in
            [("", "/", None), ("12:3:", "v:h", Some("id:9")), ("ünï", "", Some("")), ("guest", "/", Some("sensor-1"))]
        {
            let mut i = info(1, Protocol::Mqtt);
            i.version = "3.1.1";
            let h = reg.register(i);
            let login = Login { user: user.into(), vhost: vhost.into(), client_id: client_id.map(Into::into) };
            assert!(h.set_login(login.clone()));
            let expected = Login { client_id: login.client_id.clone().filter(|c| !c.is_empty()), ..login };
            assert_eq!(h.login(), Some(expected));
            assert_eq!((h.user(), h.vhost()), (Some(user), Some(vhost)));
            assert_eq!(h.version(), "3.1.1");
            assert_eq!(h.snapshot().version, "3.1.1");
        }
        assert_eq!(reg.register(info(2, Protocol::Amqp)).version(), "5.0");
    }
}

//! Idle connections without a task.
//!
//! Most of a device fleet's connections are idle most of the time: the device subscribed to
//! its command topic and sends a PINGREQ now and then. Served by a tokio task each, an idle
//! connection costs the task's cell (256 bytes with jemalloc's classes), its `JoinSet` entry
//! (56), the driver's boxed future (160) and tokio's I/O registration (`ScheduledIo`, 256) on
//! top of its state (docs/benchmarks.md, issue 18). Mosquitto keeps one context per client and
//! one epoll set for all of them.
//!
//! An idle plain TCP connection is *parked* here instead: its socket is taken out of tokio's
//! reactor (`TcpStream::into_std`) and added to this module's own epoll set (rustix; one-shot,
//! edge-triggered, read interest), what the driver keeps of its state (`ParkedConn`, boxed: no
//! stream, no read buffer) and the connection's slot under the connection limits are kept in a
//! slab, and its task ends. One waker per parked
//! connection stands in for the task where the connection is woken from outside: the registry's
//! kick (takeover, shutdown, keep alive, a close from the management API) and its two outboxes
//! (a delivery). Whichever comes first, the socket turning readable or a wake, *unparks* it:
//! the record leaves the slab and a new task takes the connection on (`driver::resume`), with
//! the socket back in tokio's hands.
//!
//! Which connections park, and when, is the driver's choice (`Conn::serve`): a plain TCP
//! connection with nothing read and not handled, nothing to write, nothing in flight to the
//! store and its flow control not holding it back, once it is idle: at once while it has moved
//! no message yet (a device after its CONNACK and its SUBACK), otherwise when the registry's
//! sweep has found it idle twice (250-500 ms, see `Kick::park_asked`). TLS and WebSocket
//! connections are not parked: their state is the TLS session's or the upgrade's, in the stream.
//!
//! The epoll set is watched by one thread of the frontend's (`watch`), which hands each
//! connection whose socket turned readable to the runtime.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Wake, Waker};

use ferry_core::frontend::ConnectionSlot;
use rustix::event::epoll;
use tracing::debug;

use ferry_core::Broker;

use crate::driver::{self, ParkedConn};
use crate::Shared;

/// A connection parked: everything it is made of while it has no task.
pub(crate) struct Parked {
    pub conn: Box<ParkedConn>,
    pub tcp: std::net::TcpStream,
    pub slot: ConnectionSlot,
}

/// The parked connections of one frontend, and the epoll set their sockets are in.
pub struct Parker {
    epoll: Arc<OwnedFd>,
    slab: Mutex<Slab>,
    /// Where unparked connections get their new task.
    runtime: tokio::runtime::Handle,
    parked: AtomicUsize,
    unparked: AtomicUsize,
    /// Told after every park and unpark, for whoever waits on the counts (tests, tools).
    changed: Arc<tokio::sync::Notify>,
    /// The broker and the frontend every connection parked here is served by, kept once here
    /// rather than in each record (16 bytes of every parked connection, issue 18). The
    /// frontend by a `Weak`: it holds the parker.
    broker: Arc<Broker>,
    shared: Weak<Shared>,
}

impl std::fmt::Debug for Parker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parker").field("parked", &self.parked()).finish()
    }
}

/// The records, by index; a token is the index and the entry's generation, so that a stale
/// token (a waker kept by a signal after its connection was unparked, an epoll event that came
/// late) finds nothing once the entry has been reused.
///
/// The entries are in chunks of [`CHUNK`] that never move: a `Vec` of them doubled its room as
/// it grew, so at 10,000 parked connections it had room for 16,384, 52 bytes of each
/// connection's share instead of 32 (issue 18), and each doubling copied every entry under the
/// slab's lock.
#[derive(Default)]
struct Slab {
    chunks: Vec<Box<[Entry]>>,
    /// Entries ever used: the next new one's index.
    used: u32,
    free: Vec<u32>,
}

/// Entries per chunk (8 KiB).
const CHUNK: usize = 256;

/// A `Parked`, taken apart so that the socket's descriptor and the generation fill one word:
/// 32 bytes instead of 40 (issue 18).
#[derive(Default)]
struct Entry {
    conn: Option<Box<ParkedConn>>,
    slot: ConnectionSlot,
    tcp: Option<std::net::TcpStream>,
    generation: u32,
}

fn token(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

impl Slab {
    fn entry(&self, index: u32) -> Option<&Entry> {
        let i = index as usize;
        self.chunks.get(i / CHUNK).map(|c| &c[i % CHUNK])
    }

    fn entry_mut(&mut self, index: u32) -> Option<&mut Entry> {
        let i = index as usize;
        self.chunks.get_mut(i / CHUNK).map(|c| &mut c[i % CHUNK])
    }

    /// A free entry's index: one given back, or the next new one (in a new chunk if need be).
    fn vacant(&mut self) -> u32 {
        if let Some(i) = self.free.pop() {
            return i;
        }
        let index = self.used;
        self.used = index.checked_add(1).expect("fewer than 2^32 connections");
        if index as usize == self.chunks.len() * CHUNK {
            self.chunks.push((0..CHUNK).map(|_| Entry::default()).collect());
        }
        index
    }

    fn insert(&mut self, parked: Parked) -> u64 {
        let index = self.vacant();
        let entry = self.entry_mut(index).expect("made by vacant");
        entry.generation = entry.generation.wrapping_add(1);
        let Parked { conn, tcp, slot } = parked;
        (entry.conn, entry.tcp, entry.slot) = (Some(conn), Some(tcp), slot);
        token(index, entry.generation)
    }

    fn get(&self, token: u64) -> Option<(&ParkedConn, &std::net::TcpStream)> {
        let entry = self.entry((token & u64::from(u32::MAX)) as u32)?;
        if entry.generation != (token >> 32) as u32 {
            return None;
        }
        Some((entry.conn.as_deref()?, entry.tcp.as_ref()?))
    }

    fn take(&mut self, token: u64) -> Option<Parked> {
        let index = (token & u64::from(u32::MAX)) as u32;
        let entry = self.entry_mut(index)?;
        if entry.generation != (token >> 32) as u32 {
            return None;
        }
        let (conn, tcp) = (entry.conn.take()?, entry.tcp.take()?);
        let slot = std::mem::take(&mut entry.slot);
        self.free.push(index);
        Some(Parked { conn, tcp, slot })
    }
}

/// The waker a parked connection's signals hold: waking it unparks the connection.
struct ParkWaker {
    parker: Weak<Parker>,
    token: u64,
}

impl Wake for ParkWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(parker) = self.parker.upgrade() {
            parker.unpark(self.token);
        }
    }
}

/// How many epoll events one look takes.
const EVENTS: usize = 256;

impl Parker {
    /// A parker on the current runtime, with the task that watches its epoll set; `None` (and
    /// connections are not parked) when the set cannot be made.
    pub(crate) fn start(
        changed: Arc<tokio::sync::Notify>,
        broker: Arc<Broker>,
        shared: Weak<Shared>,
    ) -> Option<Arc<Parker>> {
        let epoll = match epoll::create(epoll::CreateFlags::CLOEXEC) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                tracing::warn!("idle MQTT connections will not be parked: epoll set: {e}");
                return None;
            }
        };
        let parker = Arc::new(Parker {
            epoll: epoll.clone(),
            slab: Mutex::new(Slab::default()),
            runtime: tokio::runtime::Handle::current(),
            parked: AtomicUsize::new(0),
            unparked: AtomicUsize::new(0),
            changed,
            broker,
            shared,
        });
        let weak = Arc::downgrade(&parker);
        let watcher = std::thread::Builder::new()
            .name("ferry-mqtt-parked".into())
            .stack_size(64 * 1024)
            .spawn(move || watch(weak, &epoll));
        if let Err(e) = watcher {
            tracing::warn!("idle MQTT connections will not be parked: watcher thread: {e}");
            return None;
        }
        Some(parker)
    }

    fn slab(&self) -> MutexGuard<'_, Slab> {
        self.slab.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections parked now.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    /// Connections unparked so far (each park ends in one).
    pub fn unparked(&self) -> usize {
        self.unparked.load(Ordering::Relaxed)
    }

    /// Parks a connection: its socket joins the epoll set and its signals get a waker of ours.
    /// Something that came meanwhile (a delivery, a kick, bytes) unparks it at once.
    pub(crate) fn park(self: &Arc<Self>, parked: Parked) {
        let mut slab = self.slab();
        let token = slab.insert(parked);
        self.parked.fetch_add(1, Ordering::Relaxed);
        let (conn, tcp) = slab.get(token).expect("just inserted");
        let waker = Waker::from(Arc::new(ParkWaker { parker: Arc::downgrade(self), token }));
        // Under the slab's lock, so that a wake from another thread waits for the record to be
        // complete; a signal wakes outside its own lock, so the two locks are never taken in
        // the other order.
        let ready = conn.poll_parked(&mut Context::from_waker(&waker));
        // Edge-triggered and one-shot: one event at most, and one is reported at once if bytes
        // are already there.
        let flags =
            epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ET | epoll::EventFlags::ONESHOT;
        let added = epoll::add(&*self.epoll, tcp, epoll::EventData::new_u64(token), flags);
        drop(slab);
        if let Err(e) = &added {
            debug!(error = %e, "epoll add; the connection is not parked");
        }
        if ready || added.is_err() {
            self.unpark(token);
        }
        self.changed.notify_waiters();
    }

    /// Unparks the connection `token` names, if it is still parked: a new task takes it on.
    fn unpark(&self, token: u64) {
        let Some(parked) = self.slab().take(token) else { return };
        self.parked.fetch_sub(1, Ordering::Relaxed);
        self.unparked.fetch_add(1, Ordering::Relaxed);
        // Not registered (an add that failed) is as good as deleted.
        let _ = epoll::delete(&*self.epoll, &parked.tcp);
        // Without its frontend (dropped: the server is going) the connection just closes.
        let Some(shared) = self.shared.upgrade() else { return };
        self.runtime.spawn(driver::resume(parked, self.broker.clone(), shared));
        self.changed.notify_waiters();
    }
}

/// How long the watcher waits at most before it looks whether its parker is still there (a
/// frontend dropped, in tests).
const WATCH_TIMEOUT: rustix::event::Timespec = rustix::event::Timespec { tv_sec: 1, tv_nsec: 0 };

/// Watches the epoll set, on a thread of its own: a parked socket that turned readable (or
/// closed) is unparked. Tokio could watch the set's descriptor instead, but its `AsyncFd` is
/// registered only through an `unsafe` function now, and the crates forbid `unsafe`.
fn watch(parker: Weak<Parker>, epoll: &OwnedFd) {
    let mut events = Vec::with_capacity(EVENTS);
    loop {
        events.clear();
        if let Err(e) = epoll::wait(epoll, rustix::buffer::spare_capacity(&mut events), Some(&WATCH_TIMEOUT)) {
            if e != rustix::io::Errno::INTR {
                tracing::error!("the parked MQTT connections' epoll set failed: {e}");
                return;
            }
        }
        let Some(parker) = parker.upgrade() else { return };
        for event in &events {
            parker.unpark(event.data.u64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slab_entry_stays_small() {
        assert_eq!(std::mem::size_of::<Entry>(), 32);
    }

    /// Indexes across chunks find their entries; a freed index is used again, with a new
    /// generation, so the old token finds nothing.
    #[test]
    fn tokens_find_their_entries_across_chunks() {
        let mut slab = Slab::default();
        let mut tokens = Vec::new();
        for i in 0..(CHUNK * 2 + 3) as u32 {
            let index = slab.vacant();
            assert_eq!(index, i);
            let entry = slab.entry_mut(index).unwrap();
            entry.generation += 1;
            tokens.push(token(index, entry.generation));
        }
        assert_eq!(slab.chunks.len(), 3);
        assert!(slab.entry(CHUNK as u32 * 3).is_none());
        for (i, t) in tokens.iter().enumerate() {
            assert_eq!(slab.entry(i as u32).unwrap().generation, (t >> 32) as u32);
        }
        slab.free.push(7);
        assert_eq!(slab.vacant(), 7, "a freed index first");
        assert_eq!(slab.vacant() as usize, CHUNK * 2 + 3);
    }
}

//! Failed logins slow down, then stop, the address they come from, and only that address.
//!
//! A password check costs tens of milliseconds of a core (argon2id), and the checks run on a
//! small fixed pool ([`super::pool`]). Without this, a flood of bad logins from one host keeps
//! that pool's queue full and good clients from anywhere else are answered "server busy"
//! (issue 13: ~1,000 bad MQTT logins a second from 100 connections refused 37 of 42 good ones).
//! So each source address (an IPv4 address; an IPv6 /64, what one host or site usually holds)
//! gets a failure score:
//!
//! - every failed check adds one; the score falls by one every [`DECAY`] without a failure;
//! - up to [`FREE_FAILURES`] the address is not slowed at all (a mistyped password or two);
//! - past that, its next check waits until [`delay`] after its last failure: 250 ms, doubling
//!   with each further failure, up to 4 s;
//! - at [`REFUSE_AT`] its logins are refused at once, without a check, until the score has
//!   fallen below it again (one failure's worth: [`DECAY`]), so an address that keeps trying
//!   gets about one check per [`DECAY`];
//! - at most [`MAX_IN_FLIGHT`] of its logins are being checked or queued for a check at once;
//!   more wait their turn ([`Admit::WaitTurn`]; the handshake timeout bounds the wait), so a
//!   gateway with many devices behind one address is served in order, not refused.
//!
//! A login that succeeds neither adds nor clears anything (an attacker holding one valid
//! account cannot wash its score). Checks refused here never reach the pool, so the flood costs
//! the pool at most [`MAX_IN_FLIGHT`] checks per attacking address, and a good client from
//! another address waits behind those only.
//!
//! Sans-I/O: every call takes `now`; the caller sleeps. The table holds at most
//! [`MAX_SOURCES`] addresses; when full, addresses whose score has decayed to zero make room,
//! then the lowest scores.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failures an address may have before its checks are delayed.
pub const FREE_FAILURES: u32 = 3;
/// The score at which an address's logins are refused without a check.
pub const REFUSE_AT: u32 = 10;
/// Logins of one address being checked or waiting to be, at once.
pub const MAX_IN_FLIGHT: u32 = 4;
/// One failure is forgotten per this much time without a failure.
pub const DECAY: Duration = Duration::from_secs(10);
/// The delay after the first failure past [`FREE_FAILURES`].
const FIRST_DELAY: Duration = Duration::from_millis(250);
/// Shorter than [`DECAY`], so that an address that keeps failing one login at a time climbs
/// to [`REFUSE_AT`] instead of settling just below it.
const MAX_DELAY: Duration = Duration::from_secs(4);
/// Addresses tracked at once (about 100 bytes each).
pub const MAX_SOURCES: usize = 65_536;

/// Where logins come from, as the throttle groups them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// An IPv4 address as is (an IPv4-mapped IPv6 address as its IPv4 address); an IPv6 address
    /// by its /64 prefix.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Source(IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)))
                }
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// What a login from a source may do now.
#[derive(Debug)]
pub enum Admit {
    /// Check it; the ticket records the outcome and frees the place.
    Go(Ticket),
    /// Ask again at this instant (the address is being slowed down).
    WaitUntil(Instant),
    /// Ask again when one of the address's logins in flight is done ([`LoginThrottle::done`]).
    WaitTurn,
    /// Refuse it without a check; says why.
    Refuse(String),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Failures not yet forgotten, as of `at`.
    score: u32,
    /// When the score last changed (a failure, or the decay applied so far).
    at: Instant,
    /// When the last failure was recorded.
    last_failure: Instant,
    in_flight: u32,
}

impl Entry {
    /// Applies the decay up to `now`.
    fn decay(&mut self, now: Instant) {
        let idle = now.saturating_duration_since(self.at);
        let steps = (idle.as_nanos() / DECAY.as_nanos()) as u64;
        if steps > 0 {
            self.score = self.score.saturating_sub(steps.min(u32::MAX as u64) as u32);
            self.at += DECAY * steps.min(u32::MAX as u64) as u32;
        }
        if self.score == 0 {
            self.at = now;
        }
    }
}

/// How long after its last failure an address with `score` failures waits for its next check.
pub fn delay(score: u32) -> Duration {
    if score <= FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (score - FREE_FAILURES - 1).min(16);
    (FIRST_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
}

/// The failure scores of every source address with recent failures or logins in progress.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    sources: Mutex<HashMap<Source, Entry>>,
    /// Woken whenever a login in flight is done.
    turns: tokio::sync::Notify,
}

impl LoginThrottle {
    pub fn new() -> LoginThrottle {
        LoginThrottle::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Source, Entry>> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May a login from `source` be checked now?
    pub fn admit(self: &Arc<Self>, source: Source, now: Instant) -> Admit {
        let mut sources = self.lock();
        if !sources.contains_key(&source) && sources.len() >= MAX_SOURCES {
            make_room(&mut sources, now);
        }
        let e = sources.entry(source).or_insert(Entry { score: 0, at: now, last_failure: now, in_flight: 0 });
        e.decay(now);
        if e.score >= REFUSE_AT {
            return Admit::Refuse(format!("too many failed logins from {source}; try again later"));
        }
        if e.in_flight >= MAX_IN_FLIGHT {
            return Admit::WaitTurn;
        }
        let due = e.last_failure + delay(e.score);
        if due > now {
            return Admit::WaitUntil(due);
        }
        e.in_flight += 1;
        Admit::Go(Ticket { throttle: self.clone(), source, done: false })
    }

    /// Resolves when a login in flight is done (for a login told [`Admit::WaitTurn`]; make the
    /// future before asking, so a turn in between is not missed).
    pub fn done(&self) -> tokio::sync::futures::Notified<'_> {
        self.turns.notified()
    }

    /// The failure score of `source` as of `now` (for tests and logs).
    pub fn score(&self, source: Source, now: Instant) -> u32 {
        let mut sources = self.lock();
        match sources.get_mut(&source) {
            Some(e) => {
                e.decay(now);
                e.score
            }
            None => 0,
        }
    }

    /// Records `n` failures of `source` at `now`, as if its checks had failed.
    #[cfg(test)]
    pub(crate) fn record_failures(self: &Arc<Self>, source: Source, n: u32, now: Instant) {
        for _ in 0..n {
            self.lock()
                .entry(source)
                .or_insert(Entry { score: 0, at: now, last_failure: now, in_flight: 0 })
                .in_flight += 1;
            self.finish(source, true, now);
        }
    }

    /// Addresses tracked.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn finish(&self, source: Source, failed: bool, now: Instant) {
        self.record(source, failed, now);
        self.turns.notify_waiters();
    }

    fn record(&self, source: Source, failed: bool, now: Instant) {
        let mut sources = self.lock();
        let Some(e) = sources.get_mut(&source) else { return };
        e.in_flight = e.in_flight.saturating_sub(1);
        e.decay(now);
        if failed {
            e.score = e.score.saturating_add(1);
            e.at = now;
            e.last_failure = now;
        }
        if e.score == 0 && e.in_flight == 0 {
            sources.remove(&source);
        }
    }
}

/// Frees room in a full table: first every address with nothing to remember, then (if none)
/// the one with the lowest score that has nothing in flight.
fn make_room(sources: &mut HashMap<Source, Entry>, now: Instant) {
    sources.retain(|_, e| {
        e.decay(now);
        e.score > 0 || e.in_flight > 0
    });
    if sources.len() < MAX_SOURCES {
        return;
    }
    let victim = sources.iter().filter(|(_, e)| e.in_flight == 0).min_by_key(|(_, e)| e.score).map(|(s, _)| *s);
    if let Some(s) = victim {
        sources.remove(&s);
    }
}

/// A login admitted by the throttle. [`Ticket::finish`] records its outcome; dropped unfinished
/// (the client went away, the check was skipped) it only frees its place.
#[derive(Debug)]
pub struct Ticket {
    throttle: Arc<LoginThrottle>,
    source: Source,
    done: bool,
}

impl Ticket {
    pub fn finish(mut self, failed: bool, now: Instant) {
        self.done = true;
        self.throttle.finish(self.source, failed, now);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.throttle.finish(self.source, false, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `f` is ready at its first poll.
    fn futures_now(f: std::pin::Pin<&mut impl std::future::Future>) -> bool {
        let waker = std::task::Waker::noop();
        f.poll(&mut std::task::Context::from_waker(waker)).is_ready()
    }

    fn ip(s: &str) -> Source {
        Source::of(s.parse().unwrap())
    }

    fn go(t: &Arc<LoginThrottle>, s: Source, now: Instant) -> Ticket {
        match t.admit(s, now) {
            Admit::Go(ticket) => ticket,
            other => panic!("expected Go, got {other:?}"),
        }
    }

    #[test]
    fn the_first_failures_are_free_then_the_delay_grows() {
        let t = Arc::new(LoginThrottle::new());
        let a = ip("10.0.0.1");
        let mut now = Instant::now();
        for _ in 0..FREE_FAILURES {
            go(&t, a, now).finish(true, now);
        }
        // At the free limit: still no wait.
        go(&t, a, now).finish(true, now);
        assert_eq!(t.score(a, now), FREE_FAILURES + 1);
        let mut waits = Vec::new();
        for _ in 0..4 {
            match t.admit(a, now) {
                Admit::WaitUntil(at) => {
                    waits.push(at - now);
                    now = at;
                }
                other => panic!("{other:?}"),
            }
            go(&t, a, now).finish(true, now);
        }
        assert_eq!(
            waits,
            [250, 500, 1000, 2000].map(Duration::from_millis),
            "the delay doubles with each failure past the free ones"
        );
        assert_eq!(delay(FREE_FAILURES + 5), MAX_DELAY);
        assert_eq!(delay(40), MAX_DELAY);
    }

    #[test]
    fn past_the_limit_logins_are_refused_until_a_failure_is_forgotten() {
        let t = Arc::new(LoginThrottle::new());
        let a = ip("10.0.0.1");
        let mut now = Instant::now();
        // One login at a time, each as soon as it may: the score still climbs to the limit.
        for _ in 0..100 {
            if t.score(a, now) >= REFUSE_AT {
                break;
            }
            match t.admit(a, now) {
                Admit::Go(ticket) => ticket.finish(true, now),
                Admit::WaitUntil(at) => now = at,
                Admit::Refuse(why) => panic!("refused early: {why}"),
                Admit::WaitTurn => panic!("one login at a time never waits its turn"),
            }
        }
        assert_eq!(t.score(a, now), REFUSE_AT);
        assert!(matches!(t.admit(a, now), Admit::Refuse(why) if why.contains("too many failed logins from 10.0.0.1")));
        // Another address is not affected.
        go(&t, ip("10.0.0.2"), now).finish(false, now);
        // One decay step later one check is allowed again (after the delay its score asks).
        let later = now + DECAY;
        assert_eq!(t.score(a, later), REFUSE_AT - 1);
        assert!(matches!(t.admit(a, later), Admit::Go(_) | Admit::WaitUntil(_)));
        // And long after, the address is forgotten.
        assert_eq!(t.score(a, now + DECAY * REFUSE_AT), 0);
    }

    #[test]
    fn successes_neither_add_nor_clear() {
        let t = Arc::new(LoginThrottle::new());
        let a = ip("10.0.0.1");
        let now = Instant::now();
        for _ in 0..100 {
            go(&t, a, now).finish(false, now);
        }
        assert_eq!(t.score(a, now), 0);
        assert!(t.is_empty(), "nothing is kept for an address without failures");
        go(&t, a, now).finish(true, now);
        go(&t, a, now).finish(false, now);
        assert_eq!(t.score(a, now), 1);
    }

    #[test]
    fn an_address_has_a_bounded_number_of_logins_in_flight() {
        let t = Arc::new(LoginThrottle::new());
        let a = ip("10.0.0.1");
        let now = Instant::now();
        let mut held: Vec<Ticket> = (0..MAX_IN_FLIGHT).map(|_| go(&t, a, now)).collect();
        assert!(matches!(t.admit(a, now), Admit::WaitTurn));
        go(&t, ip("10.0.0.2"), now);
        let turn = t.done();
        tokio::pin!(turn);
        turn.as_mut().enable();
        held.pop();
        assert!(futures_now(turn), "a waiting login is told its turn came");
        go(&t, a, now);
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix_and_mapped_ipv4_as_ipv4() {
        assert_eq!(ip("2001:db8:1:2:aaaa::1"), ip("2001:db8:1:2:bbbb::2"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_eq!(ip("::ffff:10.0.0.1"), ip("10.0.0.1"));
        assert_eq!(ip("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn the_table_is_bounded() {
        let t = Arc::new(LoginThrottle::new());
        let now = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 10) {
            let s = Source::of(IpAddr::V4(std::net::Ipv4Addr::from(i)));
            go(&t, s, now).finish(true, now);
        }
        assert_eq!(t.len(), MAX_SOURCES);
    }
}

//! Heartbeats (AMQP 0-9-1 §4.2.7) on the time the driver passes in, quinn-style: the driver
//! tells the connection when bytes came in ([`Connection::received`]) and went out
//! ([`Connection::sent`]) and whether it reads at all ([`Connection::set_reading`]), asks when to
//! wake it ([`Connection::poll_timeout`]) and wakes it then ([`Connection::handle_timeout`]).
//!
//! This is monotonic time (`Instant`), unlike the wall-clock [`Millis`] that message TTLs count
//! in: a TTL must keep counting across a restart, a heartbeat must not jump with the system clock.

use std::time::{Duration, Instant};

use ferry_core::message::Millis;

use crate::codec::encode_heartbeat;

use super::{Connection, State};

/// The connection's heartbeat clock.
#[derive(Debug)]
pub(super) struct Heartbeats {
    /// When bytes last came from the client (plus the time the driver did not read since).
    last_read: Instant,
    /// When bytes last went to the client.
    last_write: Instant,
    /// Since when the driver has not been reading (a held-back publisher): that time does not
    /// count against the client.
    paused_since: Option<Instant>,
}

impl Heartbeats {
    pub(super) fn new(now: Instant) -> Heartbeats {
        Heartbeats { last_read: now, last_write: now, paused_since: None }
    }
}

impl Connection {
    /// The negotiated interval; `None` when heartbeats are off.
    fn heartbeat_interval(&self) -> Option<Duration> {
        (self.heartbeat > 0).then(|| Duration::from_secs(self.heartbeat as u64))
    }

    /// Bytes came from the client (any frame counts, not only heartbeats).
    pub fn received(&mut self, now: Instant) {
        if let Some(hb) = &mut self.heartbeats {
            hb.last_read = now;
        }
    }

    /// What [`Connection::out`] held went to the client.
    pub fn sent(&mut self, now: Instant) {
        if let Some(hb) = &mut self.heartbeats {
            hb.last_write = now;
        }
    }

    /// Whether the driver reads the socket. While it does not (it holds a publisher back), the
    /// client's silence is ours: the time is added to the client's last read when reading
    /// resumes, and no missed heartbeat is counted meanwhile.
    pub fn set_reading(&mut self, reading: bool, now: Instant) {
        let Some(hb) = &mut self.heartbeats else { return };
        match (reading, hb.paused_since) {
            (false, None) => hb.paused_since = Some(now),
            (true, Some(since)) => {
                hb.last_read += now.saturating_duration_since(since);
                hb.paused_since = None;
            }
            _ => {}
        }
    }

    /// When [`Connection::handle_timeout`] next has something to do: our next heartbeat, or
    /// the moment the client has been silent too long. `None`: nothing to wait for.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let h = self.heartbeat_interval()?;
        let hb = self.heartbeats.as_ref()?;
        if self.state == State::Closed {
            return None;
        }
        // Send one when we have been quiet for half the interval.
        let send_at = hb.last_write + h / 2;
        Some(match self.dead_at(h) {
            Some(dead_at) => send_at.min(dead_at),
            None => send_at,
        })
    }

    /// The client counts as gone after two intervals of silence (RabbitMQ's rule; the spec
    /// says "two heartbeat intervals or longer"), only on an open connection the driver reads.
    fn dead_at(&self, h: Duration) -> Option<Instant> {
        let hb = self.heartbeats.as_ref()?;
        (self.state == State::Open && hb.paused_since.is_none()).then(|| hb.last_read + h * 2)
    }

    /// The time [`Connection::poll_timeout`] gave has come: writes a heartbeat frame if we have
    /// been quiet for half the interval; closes a client silent for two intervals. That close
    /// sends nothing (§4.2.7: a peer that misses heartbeats closes the socket "without
    /// following the Connection.Close/Close-Ok handshaking"): the connection is released and
    /// [`Connection::is_closed`]; the disconnect line says "missed heartbeats from the client".
    /// `wall` is the time for the core (requeueing the client's unacknowledged messages).
    pub fn handle_timeout(&mut self, now: Instant, wall: Millis) {
        let Some(h) = self.heartbeat_interval() else { return };
        let Some(last_write) = self.heartbeats.as_ref().map(|hb| hb.last_write) else { return };
        if self.state == State::Closed {
            return;
        }
        if self.dead_at(h).is_some_and(|at| now >= at) {
            tracing::debug!(conn = %self.id, "missed heartbeats from the client; closing");
            self.ended("missed heartbeats from the client");
            self.release_all(wall);
            self.state = State::Closed;
            return;
        }
        if now >= last_write + h / 2 {
            encode_heartbeat(&mut self.out);
        }
    }
}

//! Rate-limited log lines, for the sites a client can trigger at will.
//!
//! A flood of bad logins, refused connections, failed TLS handshakes or malformed packets would
//! otherwise write one line each, thousands per second: the log fills the disk and buries
//! everything else. A [`LogLimiter`] lets a burst of lines through per window, counts the rest,
//! and the first line after the window rolls over is preceded by one summary line saying how
//! many similar lines were left out — the Linux kernel's `printk_ratelimit` ("N callbacks
//! suppressed") in tracing's terms. A count is reported once that site logs again; there is no
//! timer, so a limiter costs no task and nothing while its site is quiet.
//!
//! It lives in the core because both frontends (login failures, protocol violations, handshake
//! timeouts) and the server (TLS handshakes, connection limits) log such lines, and neither
//! frontend may depend on the other or on the server (DESIGN.md, "Crates").
//!
//! Use [`log_limited!`](crate::log_limited): each invocation is its own call site with its own
//! static limiter, so one flooded site does not silence another.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one call site writes per [`DEFAULT_WINDOW`] before it starts counting instead: enough
/// to show the shape of a burst (a few peers, a few user names), few enough that a flood costs
/// at most this many lines a second per site.
pub const DEFAULT_BURST: u32 = 10;
/// The window [`DEFAULT_BURST`] applies to.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(1);

/// Whether a line may be written now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Write it. `suppressed` lines were left out in earlier windows since the last line that
    /// was written: say so first (when non-zero).
    Log { suppressed: u64 },
    /// Leave it out; it is counted.
    Suppress,
}

/// At most `burst` lines per `window` from one call site; the rest are counted. Usable as a
/// `static` (its constructor is `const`); time is passed in, so it is tested without a clock.
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// When the current window started (`None` before the first line).
    started: Option<Instant>,
    /// Lines written in the current window.
    written: u32,
    /// Lines left out since the last written one.
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new(burst: u32, window: Duration) -> LogLimiter {
        LogLimiter { burst, window, state: Mutex::new(State { started: None, written: 0, suppressed: 0 }) }
    }

    /// Decides about one line at `now`. The lock is held for a few comparisons, never across
    /// the write of the line.
    pub fn admit(&self, now: Instant) -> Admit {
        // A poisoned lock only means a thread panicked between two comparisons: the counts are
        // still usable.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let rolled = s.started.is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if rolled {
            s.started = Some(now);
            s.written = 0;
        }
        if s.written < self.burst {
            s.written += 1;
            Admit::Log { suppressed: std::mem::take(&mut s.suppressed) }
        } else {
            s.suppressed += 1;
            Admit::Suppress
        }
    }
}

/// A `tracing` event at `$level` (`info`, `warn`, …), limited per call site to
/// [`DEFAULT_BURST`] lines per [`DEFAULT_WINDOW`]. `$site` names the kind of line in the summary
/// ("MQTT login refused (suppressed 1234 similar lines)"); the rest is what `tracing::$level!`
/// takes.
///
/// ```
/// # let peer = "192.0.2.7:50000";
/// ferry_core::log_limited!(info, "MQTT login refused", peer = %peer, "MQTT login refused: bad user name or password");
/// ```
#[macro_export]
macro_rules! log_limited {
    ($level:ident, $site:expr, $($event:tt)+) => {{
        static LIMITER: $crate::logging::LogLimiter =
            $crate::logging::LogLimiter::new($crate::logging::DEFAULT_BURST, $crate::logging::DEFAULT_WINDOW);
        $crate::log_limited_by!(&LIMITER, ::std::time::Instant::now(), $level, $site, $($event)+)
    }};
}

/// [`log_limited!`](crate::log_limited) with the limiter and the time given: for a site whose
/// limiter is shared or not static, and for tests.
#[macro_export]
macro_rules! log_limited_by {
    ($limiter:expr, $now:expr, $level:ident, $site:expr, $($event:tt)+) => {{
        if let $crate::logging::Admit::Log { suppressed } = $crate::logging::LogLimiter::admit($limiter, $now) {
            if suppressed > 0 {
                ::tracing::$level!(suppressed, "{} (suppressed {} similar lines)", $site, suppressed);
            }
            ::tracing::$level!($($event)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn run(limiter: &LogLimiter, at: Instant, n: usize) -> Vec<Admit> {
        (0..n).map(|_| limiter.admit(at)).collect()
    }

    #[test]
    fn a_burst_is_written_then_the_rest_of_the_window_is_counted() {
        let limiter = LogLimiter::new(3, SECOND);
        let t0 = Instant::now();
        let admits = run(&limiter, t0, 5);
        assert_eq!(admits[..3], [Admit::Log { suppressed: 0 }; 3]);
        assert_eq!(admits[3..], [Admit::Suppress; 2]);
        assert_eq!(limiter.admit(t0 + SECOND / 2), Admit::Suppress, "still the same window");
    }

    #[test]
    fn the_first_line_of_a_later_window_carries_the_count() {
        let limiter = LogLimiter::new(2, SECOND);
        let t0 = Instant::now();
        run(&limiter, t0, 2 + 1000);
        assert_eq!(limiter.admit(t0 + SECOND), Admit::Log { suppressed: 1000 });
        assert_eq!(limiter.admit(t0 + SECOND), Admit::Log { suppressed: 0 }, "the count is reported once");
        assert_eq!(limiter.admit(t0 + SECOND), Admit::Suppress);
    }

    #[test]
    fn a_count_waits_for_the_next_line_however_late() {
        let limiter = LogLimiter::new(1, SECOND);
        let t0 = Instant::now();
        run(&limiter, t0, 4);
        assert_eq!(limiter.admit(t0 + 3600 * SECOND), Admit::Log { suppressed: 3 });
    }

    #[test]
    fn a_flood_costs_at_most_the_burst_per_window_plus_one_summary() {
        let limiter = LogLimiter::new(10, SECOND);
        let t0 = Instant::now();
        let mut lines = 0;
        // 100,000 lines a second for 10 s, spread evenly.
        for i in 0..1_000_000u64 {
            if let Admit::Log { suppressed } = limiter.admit(t0 + Duration::from_micros(i * 10)) {
                lines += 1 + u64::from(suppressed > 0);
            }
        }
        assert!(lines <= 10 * (10 + 1), "{lines} lines");
        assert!(lines >= 10 * 10, "every window still gets its burst: {lines}");
    }

    #[test]
    fn a_quiet_site_is_not_limited() {
        let limiter = LogLimiter::new(2, SECOND);
        let t0 = Instant::now();
        for i in 0..100 {
            assert_eq!(limiter.admit(t0 + i * SECOND), Admit::Log { suppressed: 0 });
        }
    }

    #[test]
    fn time_going_backwards_does_not_open_a_window() {
        let limiter = LogLimiter::new(1, SECOND);
        let t0 = Instant::now() + 10 * SECOND;
        assert_eq!(limiter.admit(t0), Admit::Log { suppressed: 0 });
        assert_eq!(limiter.admit(t0 - 5 * SECOND), Admit::Suppress);
    }

    /// The lines written while `f` runs, as text.
    fn captured(f: impl FnOnce()) -> String {
        use std::sync::Arc;
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn the_macro_limits_each_call_site_on_its_own() {
        let started = Instant::now();
        let text = captured(|| {
            for i in 0..1000 {
                crate::log_limited!(debug, "site one", i, "flood");
            }
            crate::log_limited!(debug, "site two", n = 1, "quiet");
        });
        // The loop takes far less than a second; should the machine stall, each second it took
        // opens one more window.
        let windows = started.elapsed().as_secs() as usize + 1;
        let flood = text.lines().filter(|l| l.contains(": flood")).count();
        assert!((DEFAULT_BURST as usize..=DEFAULT_BURST as usize * windows).contains(&flood), "{text}");
        assert_eq!(text.lines().filter(|l| l.contains("quiet") && l.contains("n=1")).count(), 1, "{text}");
        assert!(text.lines().all(|l| !l.contains("site two (suppressed")), "{text}");
    }

    #[test]
    fn the_summary_line_comes_before_the_first_line_of_a_later_window() {
        let limiter = LogLimiter::new(2, SECOND);
        let t0 = Instant::now();
        let text = captured(|| {
            for i in 0..5 {
                crate::log_limited_by!(&limiter, t0, warn, "login refused", i, "login refused: bad password");
            }
            crate::log_limited_by!(&limiter, t0 + SECOND, warn, "login refused", i = 5, "login refused: bad password");
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].contains("i=0") && lines[1].contains("i=1"), "{text}");
        assert!(lines[2].contains("login refused (suppressed 3 similar lines)"), "{text}");
        assert!(lines[2].contains("suppressed=3") && lines[2].contains("WARN"), "{text}");
        assert!(lines[3].contains("i=5"), "{text}");
    }
}

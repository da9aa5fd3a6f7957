//! A token bucket: the rate limits on accepting connections (per listener) and on publishing
//! (per connection). Refilled lazily from the time of each call, so it costs no timer.

use std::time::{Duration, Instant};

/// `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` must be at least 1; `burst` at least 1 (one second's worth, the
    /// rate, is what the config gives).
    pub fn new(rate: u32, burst: u32, now: Instant) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket { rate: f64::from(rate.max(1)), burst, tokens: burst, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `n` tokens. `None`: taken, go on. `Some(wait)`: the tokens are taken on credit;
    /// the caller waits `wait` before its next action (stops reading, stops accepting), which
    /// pays the debt. The debt is bounded by what one call takes.
    pub fn take(&mut self, n: u32, now: Instant) -> Option<Duration> {
        self.refill(now);
        self.tokens -= f64::from(n);
        if self.tokens >= 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 10, t0);
        for _ in 0..10 {
            assert_eq!(b.take(1, t0), None);
        }
        // The 11th is on credit: a tenth of a second to pay it back.
        let wait = b.take(1, t0).unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // After that wait, the debt is paid, and the next token needs another tenth.
        let t1 = t0 + wait;
        let wait = b.take(1, t1).unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..10 {
            assert_eq!(b.take(1, t2), None);
        }
        assert!(b.take(1, t2).is_some());
    }

    #[test]
    fn time_going_backwards_does_not_panic_or_refill() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut b = TokenBucket::new(1, 1, t0);
        assert_eq!(b.take(1, t0), None);
        assert!(b.take(1, t0 - Duration::from_millis(500)).is_some());
    }
}

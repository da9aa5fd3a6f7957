//! Reconnect delays: exponential with jitter, so that many bridges cut off by one outage do
//! not all knock at the same instant when it ends.

use std::time::Duration;

/// Delays from `initial`, doubling after each failure up to `max`; each one drawn uniformly
/// from its upper half ("equal jitter"), so it is never less than half the nominal delay.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Backoff {
        let initial = initial.min(max);
        // xorshift must not start at 0.
        Backoff { initial, max, current: initial, rng: seed | 1 }
    }

    /// The delay before the next attempt; the one after it is twice as long (up to the max).
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = nominal / 2;
        let span = (nominal - half).as_nanos() as u64;
        let jitter = if span == 0 { 0 } else { self.next_random() % (span + 1) };
        half + Duration::from_nanos(jitter)
    }

    /// After a connection that stayed up (see `link::stable_after`): the next failure starts
    /// from the initial delay again.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: jitter needs spread, not cryptographic strength.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_max_within_their_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 42);
        let nominal = [1, 2, 4, 8, 16, 32, 60, 60];
        for n in nominal {
            let d = b.next_delay();
            let n = Duration::from_secs(n);
            assert!(d >= n / 2 && d <= n, "{d:?} not within [{:?}, {n:?}]", n / 2);
        }
    }

    #[test]
    fn reset_starts_again_from_the_initial_delay() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 7);
        for _ in 0..5 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let mut a = Backoff::new(Duration::from_secs(8), Duration::from_secs(8), 1);
        let delays: std::collections::HashSet<_> = (0..20).map(|_| a.next_delay()).collect();
        assert!(delays.len() > 10, "only {} distinct delays", delays.len());
    }
}

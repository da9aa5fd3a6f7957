//! A fixed-size log-linear histogram of latencies in microseconds: 64 buckets per power of two
//! (values below 128 are exact), so a percentile is within 1.6 % of the true value and the memory
//! is the same 30 KB whatever the number of samples. The maximum is kept exactly.
//!
//! Also [`CpuMeter`]: the generator's own CPU time over a run, for the reports.

use std::time::{Duration, Instant};

/// Values below `1 << SUB_BITS` get a bucket each; above, each octave has `1 << (SUB_BITS - 1)`.
const SUB_BITS: u32 = 7;
const HALF: usize = 1 << (SUB_BITS - 1);
/// Index of the top bucket for `u64::MAX`, plus one.
const BUCKETS: usize = HALF * (64 - SUB_BITS as usize + 1) + HALF;

/// The latency figures a report prints, in microseconds.
#[derive(Debug, serde::Serialize)]
pub struct Latency {
    pub p50: Option<u64>,
    pub p90: Option<u64>,
    pub p99: Option<u64>,
    /// p99.9.
    pub p999: Option<u64>,
    pub max: Option<u64>,
    pub mean: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    sum: u128,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram { counts: vec![0; BUCKETS].into_boxed_slice(), total: 0, sum: 0, max: 0 }
    }

    fn index(v: u64) -> usize {
        if v < (1 << SUB_BITS) {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let group = msb - SUB_BITS + 1;
        let mantissa = (v >> group) as usize; // in [HALF, 2 * HALF)
        HALF * group as usize + mantissa
    }

    /// The largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        if i < (1 << SUB_BITS) {
            return i as u64;
        }
        let group = (i / HALF - 1) as u32;
        let mantissa = (i - HALF * group as usize) as u128;
        let upper = ((mantissa + 1) << group) - 1;
        u64::try_from(upper).unwrap_or(u64::MAX)
    }

    pub fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> Option<f64> {
        (self.total > 0).then(|| self.sum as f64 / self.total as f64)
    }

    /// p50, p90, p99, p99.9, max and mean, for a report.
    pub fn summary(&self) -> Latency {
        Latency {
            p50: self.quantile(0.50),
            p90: self.quantile(0.90),
            p99: self.quantile(0.99),
            p999: self.quantile(0.999),
            max: (self.count() > 0).then(|| self.max()),
            mean: self.mean(),
        }
    }

    /// The value at quantile `q` (0..=1): the upper bound of the bucket holding the
    /// `ceil(q * count)`-th smallest sample, never above the exact maximum.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::upper(i).min(self.max));
            }
        }
        Some(self.max)
    }
}

/// The generator's own CPU time (user + system, all threads of the process) between `start` and
/// `stop`, from `CLOCK_PROCESS_CPUTIME_ID` (the total `getrusage(RUSAGE_SELF)` gives, at
/// nanosecond resolution; rustix has no `getrusage` and the workspace forbids `unsafe`).
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    cpu: Duration,
    wall: Instant,
}

/// What a [`CpuMeter`] measured.
#[derive(Debug, Clone, Copy)]
pub struct CpuUse {
    /// CPU seconds, user + system.
    pub secs: f64,
    /// CPU seconds / wall seconds x 100: 100 is one core busy, 200 two.
    pub pct: f64,
}

impl CpuMeter {
    pub fn start() -> CpuMeter {
        CpuMeter { cpu: process_cpu(), wall: Instant::now() }
    }

    pub fn stop(&self) -> CpuUse {
        let secs = process_cpu().saturating_sub(self.cpu).as_secs_f64();
        let wall = self.wall.elapsed().as_secs_f64();
        CpuUse { secs, pct: if wall > 0.0 { secs * 100.0 / wall } else { 0.0 } }
    }
}

fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(u64::try_from(t.tv_sec).unwrap_or(0), u32::try_from(t.tv_nsec).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_bound_their_values() {
        for v in (0..100_000u64).chain([u32::MAX as u64, u64::MAX / 3, u64::MAX]) {
            let i = Histogram::index(v);
            assert!(i < BUCKETS, "{v}");
            assert!(Histogram::upper(i) >= v, "{v}");
            if i > 0 {
                assert!(Histogram::upper(i - 1) < v, "{v}");
            }
            // Relative error of the upper bound.
            assert!((Histogram::upper(i) - v) as f64 <= v as f64 / HALF as f64, "{v}");
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        for v in 1..=1000 {
            h.record(v);
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.max(), 1000);
        let p50 = h.quantile(0.5).unwrap();
        assert!((500..=508).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((990..=1000).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), Some(1000));
        let mut other = Histogram::new();
        other.record(5000);
        h.merge(&other);
        assert_eq!(h.max(), 5000);
        assert_eq!(h.count(), 1001);
        let s = h.summary();
        assert!(s.p50 <= s.p90 && s.p90 <= s.p99 && s.p99 <= s.p999 && s.p999 <= s.max);
        assert_eq!(s.max, Some(5000));
    }

    #[test]
    fn cpu_meter_counts_busy_time() {
        let meter = CpuMeter::start();
        let mut x = 0u64;
        while meter.wall.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let used = meter.stop();
        assert!(used.secs > 0.0 && used.secs < 10.0, "{used:?}");
        assert!(used.pct > 0.0, "{used:?}");
    }
}

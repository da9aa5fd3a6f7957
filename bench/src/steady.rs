//! Steady-state measurement, shared by `ferry-bench mqtt`, `amqp` and `bridge`: a warm-up, then a
//! measure window in which the messages published and delivered are counted, the broker's CPU
//! time (`--pid`, from `/proc/<pid>/stat`) and the generator's own are sampled; then the
//! publishers stop and the run drains, and every acknowledged message (MQTT PUBACK/PUBCOMP, AMQP
//! confirm) is checked off against what each subscriber received.
//!
//! Why a window: a fixed number of messages timed from the first send to the last delivery
//! measures a broker while it drowns in a backlog of its own making (the publisher's socket
//! buffers and the broker's queues fill at the publisher's speed, then drain at the broker's),
//! and a broker that drops QoS 0 messages under that flood ends early and looks fast. Publishers
//! here also connect with a bounded socket send buffer ([`connect`], `--sndbuf`), so that what
//! they have written but the broker has not read stays small.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{sleep_until, timeout, Instant};

use crate::histogram::CpuMeter;

/// The default `--sndbuf` in steady state: 256 KiB, the independent load generator's setting
/// (issue 18). Linux doubles what is set (socket(7)) and caps it at `net.core.wmem_max`.
pub const DEFAULT_SNDBUF: u32 = 256 * 1024;
/// Messages per publisher at most in steady state; a publisher that gets there stops early (an
/// error in the report). 100 M is 12.5 MB of bitmap per subscriber and publisher at most, and at
/// the 4 M msgs/s no broker here reaches, 25 s of sending.
pub const STEADY_CAP: u32 = 100_000_000;

/// The steady-state options of `ferry-bench mqtt` and `amqp`.
#[derive(Debug, Clone, clap::Args)]
pub struct SteadyArgs {
    /// Steady state: seconds of the measure window. Publishers then send continuously (unpaced,
    /// or at --rate) from the start through --warmup and this window, and stop; --messages is
    /// ignored; the rates, CPU figures and latencies are those of the window, and the run then
    /// drains and checks every acknowledged message arrived. Without it: a fixed-count run.
    #[arg(long)]
    pub measure: Option<f64>,
    /// Steady state: seconds of sending before the measure window.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// SO_SNDBUF of the publishers' sockets in bytes, set before connecting (Linux doubles it
    /// and caps it at net.core.wmem_max; 0: the system's autotuned buffer). Default 262144 in
    /// steady state, the system's in fixed-count runs.
    #[arg(long)]
    pub sndbuf: Option<u32>,
    /// Steady state: a process (the broker) whose CPU time over the window is reported, also per
    /// delivered message (repeatable).
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
}

impl SteadyArgs {
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(m) = self.measure {
            if !(m > 0.0 && m <= 3600.0 && self.warmup >= 0.0 && self.warmup <= 3600.0) {
                anyhow::bail!("--measure must be in (0, 3600] and --warmup in [0, 3600] seconds");
            }
        }
        Ok(())
    }
    /// The publishers' send buffer to ask for, if any.
    pub fn sndbuf(&self) -> Option<u32> {
        match (self.sndbuf, self.measure) {
            (Some(0), _) => None,
            (Some(n), _) => Some(n),
            (None, Some(_)) => Some(DEFAULT_SNDBUF),
            (None, None) => None,
        }
    }
    /// The window, from `start`, in steady state.
    pub fn window(&self, start: Instant) -> Option<Window> {
        self.measure.map(|m| Window::new(start, self.warmup, m))
    }
}

/// The measure window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub warm_end: Instant,
    pub stop_at: Instant,
}

impl Window {
    pub fn new(start: Instant, warmup: f64, measure: f64) -> Window {
        let warm_end = start + Duration::from_secs_f64(warmup);
        Window { warm_end, stop_at: warm_end + Duration::from_secs_f64(measure) }
    }
    pub fn contains(&self, t: Instant) -> bool {
        t >= self.warm_end && t < self.stop_at
    }
    /// Publishers stop at the end of the window.
    pub fn over(&self, t: Instant) -> bool {
        t >= self.stop_at
    }
}

/// Connects over TCP with no Nagle delay and, with `sndbuf`, SO_SNDBUF set before the connect
/// (so that the window TCP negotiates agrees with it). Returns the stream and the send buffer
/// the kernel granted (what `getsockopt` reports, i.e. doubled), when one was set.
pub async fn connect(
    addr: SocketAddr,
    sndbuf: Option<u32>,
    limit: Duration,
) -> anyhow::Result<(TcpStream, Option<u32>)> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.context("socket")?;
    let mut granted = None;
    if let Some(n) = sndbuf {
        socket.set_send_buffer_size(n).context("SO_SNDBUF")?;
        granted = Some(socket.send_buffer_size().context("SO_SNDBUF")?);
    }
    let stream = timeout(limit, socket.connect(addr))
        .await
        .map_err(|_| anyhow!("connect to {addr}: timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok((stream, granted))
}

/// utime + stime of a process in seconds, from /proc/<pid>/stat.
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // Linux reports these in USER_HZ, 100 on every architecture Linux supports today.
    Some(ticks as f64 / 100.0)
}

/// CPU time of one process over the measure window.
#[derive(Debug, Serialize)]
pub struct ProcCpu {
    pub pid: u32,
    pub cpu_secs: f64,
    /// CPU microseconds per message delivered in the window.
    pub cpu_us_per_msg: Option<f64>,
}

/// What the measure window counted.
#[derive(Debug, Serialize)]
pub struct Measured {
    pub warmup_secs: f64,
    pub window_secs: f64,
    /// Messages the publishers wrote (completed writes) in the window.
    pub sent: u64,
    /// Distinct messages the subscribers received in the window (every copy counts: S
    /// subscribers receiving one message is S).
    pub delivered: u64,
    pub publish_rate: f64,
    pub delivery_rate: f64,
    /// `--pid`: each process's CPU time over the window.
    pub broker_cpu: Vec<ProcCpu>,
    /// The sum over `--pid` of CPU microseconds per delivered message.
    pub broker_cpu_us_per_msg: Option<f64>,
    /// The sum over `--pid` of CPU seconds / window seconds x 100 (100: one core busy).
    pub broker_cpu_pct: Option<f64>,
    pub generator_cpu_secs: f64,
    /// `generator_cpu_secs` / window seconds x 100.
    pub generator_cpu_pct: f64,
    pub generator_cpu_us_per_msg: Option<f64>,
    /// The send buffer the kernel granted the publishers (SO_SNDBUF as read back; Linux doubles
    /// what is set), when one was set.
    pub sndbuf_granted: Option<u32>,
}

/// Samples `sent` and `delivered` and the CPU times at the window's start and end; run it as a
/// task of its own, so that it is on time whatever the publishers do.
pub async fn measure(
    window: Window,
    pids: Vec<u32>,
    sent: impl Fn() -> u64,
    delivered: impl Fn() -> u64,
    warmup_secs: f64,
) -> Measured {
    sleep_until(window.warm_end).await;
    let t0 = Instant::now();
    let (s0, d0) = (sent(), delivered());
    let c0: Vec<Option<f64>> = pids.iter().map(|p| proc_cpu_secs(*p)).collect();
    let own = CpuMeter::start();
    sleep_until(window.stop_at).await;
    let own = own.stop();
    let t1 = Instant::now();
    let (s1, d1) = (sent(), delivered());
    let c1: Vec<Option<f64>> = pids.iter().map(|p| proc_cpu_secs(*p)).collect();
    let secs = t1.duration_since(t0).as_secs_f64();
    let n = d1.saturating_sub(d0);
    let per_msg = |cpu: f64| (n > 0).then(|| cpu * 1e6 / n as f64);
    let broker_cpu: Vec<ProcCpu> = pids
        .iter()
        .zip(c0.iter().zip(c1.iter()))
        .filter_map(|(pid, (a, b))| {
            let s = b.zip(*a).map(|(b, a)| b - a)?;
            Some(ProcCpu { pid: *pid, cpu_secs: s, cpu_us_per_msg: per_msg(s) })
        })
        .collect();
    let broker_total = (!broker_cpu.is_empty()).then(|| broker_cpu.iter().map(|c| c.cpu_secs).sum::<f64>());
    Measured {
        warmup_secs,
        window_secs: secs,
        sent: s1.saturating_sub(s0),
        delivered: n,
        publish_rate: s1.saturating_sub(s0) as f64 / secs,
        delivery_rate: n as f64 / secs,
        broker_cpu_us_per_msg: broker_total.and_then(per_msg),
        broker_cpu_pct: broker_total.map(|c| c * 100.0 / secs),
        broker_cpu,
        generator_cpu_secs: own.secs,
        generator_cpu_pct: own.secs * 100.0 / secs,
        generator_cpu_us_per_msg: per_msg(own.secs),
        sndbuf_granted: None,
    }
}

impl Measured {
    pub fn print_text(&self) {
        println!(
            "  window:     {:.1} s after {:.1} s warm-up: {} sent = {:.0} msgs/s, {} delivered = {:.0} msgs/s",
            self.window_secs, self.warmup_secs, self.sent, self.publish_rate, self.delivered, self.delivery_rate
        );
        for c in &self.broker_cpu {
            let per = c.cpu_us_per_msg.map(|u| format!(" = {u:.2} us/msg")).unwrap_or_default();
            println!("  cpu:        pid {} {:.3} s over the window{per}", c.pid, c.cpu_secs);
        }
        let per = self.generator_cpu_us_per_msg.map(|u| format!(" = {u:.2} us/msg")).unwrap_or_default();
        println!(
            "  cpu:        generator {:.3} s = {:.1} % over the window{per}",
            self.generator_cpu_secs, self.generator_cpu_pct
        );
        if let Some(b) = self.sndbuf_granted {
            println!("  sndbuf:     {b} B granted to each publisher");
        }
    }
}

/// A counter several tasks add to and the window task reads.
pub fn add(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, Ordering::AcqRel);
    }
}

/// Sequence numbers seen, one bit each, growing as needed (in steps of 64 Ki numbers).
#[derive(Debug, Default, Clone)]
pub struct Seen {
    bits: Vec<u64>,
    /// Highest sequence number seen + 1.
    pub top: u64,
}

impl Seen {
    /// Whether `seq` is new.
    pub fn insert(&mut self, seq: u32) -> bool {
        let (word, mask) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if word >= self.bits.len() {
            self.bits.resize(word + 1024, 0);
        }
        let fresh = self.bits[word] & mask == 0;
        self.bits[word] |= mask;
        self.top = self.top.max(u64::from(seq) + 1);
        fresh
    }
    pub fn has(&self, seq: u32) -> bool {
        self.bits.get((seq / 64) as usize).is_some_and(|w| w & (1u64 << (seq % 64)) != 0)
    }
    /// How many are set.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    /// Up to `limit` runs (first, last) of sequence numbers below `n` not seen.
    pub fn missing(&self, n: u32, limit: usize) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut seq = 0;
        while seq < n && out.len() < limit {
            if self.has(seq) {
                seq += 1;
                continue;
            }
            let from = seq;
            while seq < n && !self.has(seq) {
                seq += 1;
            }
            out.push((from, seq - 1));
        }
        out
    }
}

/// The loss check: of the sequence numbers in `acked` (acknowledged to the publisher), how many
/// `has` says were not received, and up to `limit` runs (first, last) of them.
pub fn unreceived(acked: &Seen, has: impl Fn(u32) -> bool, limit: usize) -> (u64, Vec<(u32, u32)>) {
    let mut lost = 0;
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for (w, &word) in acked.bits.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let seq = (w as u32) * 64 + bits.trailing_zeros();
            bits &= bits - 1;
            if has(seq) {
                continue;
            }
            lost += 1;
            let extends = runs.last().is_some_and(|r| r.1 + 1 == seq);
            if let (true, Some(r)) = (extends, runs.last_mut()) {
                r.1 = seq;
            } else if !extends && runs.len() < limit {
                runs.push((seq, seq));
            }
        }
    }
    (lost, runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(seqs: impl IntoIterator<Item = u32>) -> Seen {
        let mut s = Seen::default();
        for q in seqs {
            s.insert(q);
        }
        s
    }

    #[test]
    fn seen_counts_fresh_and_lists_gaps() {
        let mut s = Seen::default();
        assert!(s.insert(0));
        assert!(s.insert(5));
        assert!(!s.insert(5));
        assert!(s.insert(70_000));
        assert_eq!(s.top, 70_001);
        assert_eq!(s.count(), 3);
        assert!(s.has(5) && !s.has(4) && !s.has(u32::MAX));
        assert_eq!(s.missing(8, 4), vec![(1, 4), (6, 7)]);
        assert_eq!(s.missing(8, 1), vec![(1, 4)]);
    }

    #[test]
    fn every_acked_message_must_be_received() {
        // Acked 0..200 except 50 (unacked at the end: not required); received all but 10..=19,
        // 100 and 150..=199, plus 50 and 300 (delivered without an ack: not a loss either way).
        let acked = seen((0..200).filter(|s| *s != 50));
        let received = seen((0..200).filter(|s| !(10..20).contains(s) && *s != 100 && *s < 150).chain([50, 300]));
        let (lost, runs) = unreceived(&acked, |s| received.has(s), 8);
        assert_eq!(lost, 10 + 1 + 50);
        assert_eq!(runs, vec![(10, 19), (100, 100), (150, 199)]);
        // The sample is bounded, the count is not.
        let (lost, runs) = unreceived(&acked, |s| received.has(s), 1);
        assert_eq!((lost, runs), (61, vec![(10, 19)]));
        // Nothing lost, and nothing acked.
        assert_eq!(unreceived(&acked, |_| true, 4), (0, vec![]));
        assert_eq!(unreceived(&Seen::default(), |_| false, 4), (0, vec![]));
        // Across word boundaries: 63, 64 and 65 make one run.
        let acked = seen(60..70);
        assert_eq!(unreceived(&acked, |s| !(63..=65).contains(&s), 4), (3, vec![(63, 65)]));
    }

    #[test]
    fn window_bounds_and_sndbuf_defaults() {
        let start = Instant::now();
        let w = Window::new(start, 1.0, 5.0);
        assert!(!w.contains(start));
        assert!(w.contains(start + Duration::from_secs(1)));
        assert!(w.contains(start + Duration::from_millis(5999)));
        assert!(!w.contains(start + Duration::from_secs(6)) && w.over(start + Duration::from_secs(6)));
        let mut a = SteadyArgs { measure: None, warmup: 1.0, sndbuf: None, pids: vec![] };
        assert_eq!(a.sndbuf(), None);
        assert!(a.window(start).is_none());
        a.measure = Some(5.0);
        assert_eq!(a.sndbuf(), Some(DEFAULT_SNDBUF));
        a.sndbuf = Some(0);
        assert_eq!(a.sndbuf(), None);
        a.sndbuf = Some(4096);
        assert_eq!(a.sndbuf(), Some(4096));
        assert!(a.check().is_ok());
        a.measure = Some(0.0);
        assert!(a.check().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn measure_counts_only_the_window() {
        // Tokio's clock is paused: the sleeps below advance it without waiting, and the window
        // is exactly where it was set, whatever the machine's load. The 300 ms margins around
        // each boundary stay, so the test also holds on a real clock.
        let sent = std::sync::Arc::new(AtomicU64::new(0));
        let got = std::sync::Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let w = Window::new(start, 0.3, 0.6);
        let (s, g) = (sent.clone(), got.clone());
        let task =
            tokio::spawn(measure(w, vec![], move || s.load(Ordering::Acquire), move || g.load(Ordering::Acquire), 0.3));
        // 100 before the window, 1000 in it, 50 after.
        add(&sent, 100);
        add(&got, 100);
        sleep_until(start + Duration::from_millis(600)).await;
        add(&sent, 1000);
        add(&got, 1000);
        sleep_until(start + Duration::from_millis(1200)).await;
        add(&got, 50);
        let m = task.await.unwrap();
        assert_eq!((m.sent, m.delivered), (1000, 1000));
        // Both ends wake on a 1 ms timer, each possibly late.
        assert!(m.window_secs > 0.5, "{}", m.window_secs);
        assert!(m.broker_cpu_us_per_msg.is_none() && m.broker_cpu.is_empty());
    }
}

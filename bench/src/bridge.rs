//! `ferry-bench bridge`: QoS 1 through a bridge. A publisher sends to the bridging broker
//! (`--pub-port`), a subscriber counts what arrives on the remote broker (`--sub-port`), and
//! every message carries a sequence number, so losses, duplicates and reordering are counted
//! exactly.
//!
//! Payload: bytes 0..8 the send time (nanoseconds since the run's start, little-endian), 8..12
//! the run's `--tag`, 12..16 the sequence number (from 0); the rest is zero. A message with
//! another tag (left over from an earlier run) is not counted.
//!
//! Modes (`--mode`):
//! - `rate`: closed loop for `--warmup` + `--measure` seconds. The publisher keeps at most
//!   `--inflight` PUBLISHes unacknowledged by the bridging broker, and at most `--window`
//!   messages sent and not yet received at the remote (end to end), so that no broker on the
//!   way builds a backlog beyond that window: what is measured is the bridge's forwarding rate
//!   in steady state, not how it drowns. The rate is the distinct messages that arrived during
//!   the measure window divided by its length; with `--pid` (repeatable) the CPU time (utime +
//!   stime from `/proc/<pid>/stat`) each process used over the same window, per message
//!   arrived. Afterwards the publisher stops and the subscriber waits (up to `--settle` seconds
//!   without a delivery) for everything PUBACKed to arrive.
//! - `publish`: sends `--messages` messages and waits for every PUBACK (the backlog of the
//!   crash test: the remote is down, the bridging broker has acknowledged them).
//! - `subscribe`: makes a persistent session (clean session off) with the subscription on the
//!   remote and disconnects, so that the remote keeps what arrives meanwhile for a later
//!   `receive --clean-session false` under the same `--client-id` (across a restart of the
//!   remote when it persists sessions).
//! - `receive`: subscribes on the remote, prints `ready` on stdout, then counts deliveries until
//!   `--messages` distinct ones arrived, or `--settle` seconds passed without one (from the
//!   start when none arrived), or `--timeout`.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use ferry_mqtt::codec::{encode, Packet, Properties, ProtocolVersion, PubResp, QoS, Str, SubOptions, Subscribe};
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, timeout, Instant};

use crate::histogram::{CpuMeter, Histogram, Latency};
use crate::mqtt::{disconnect_error, Conn, Ids, Template};
use crate::steady::{proc_cpu_secs, ProcCpu, Seen};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_PACKET: u32 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Rate,
    Publish,
    Receive,
    Subscribe,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value_t = Mode::Rate)]
    pub mode: Mode,
    /// Both brokers' address; loopback only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// The bridging broker (the publisher's).
    #[arg(long, default_value_t = 1883)]
    pub pub_port: u16,
    /// The remote broker (the subscriber's).
    #[arg(long, default_value_t = 1884)]
    pub sub_port: u16,
    /// Topic published to on the bridging broker.
    #[arg(long, default_value = "bench/bridge")]
    pub topic: String,
    /// Topic subscribed to on the remote (default: `--topic`, for a bridge without prefixes).
    #[arg(long)]
    pub sub_topic: Option<String>,
    /// Payload bytes (at least 16: time, tag, sequence number).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=1024 * 1024))]
    pub size: u32,
    /// A number identifying this run's messages (default: the process id).
    #[arg(long)]
    pub tag: Option<u32>,
    /// PUBLISHes unacknowledged by the bridging broker, at most.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// `rate`: messages sent and not yet received at the remote, at most.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: u32,
    /// `rate`: seconds before the measure window.
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// `rate`: seconds of the measure window.
    #[arg(long, default_value_t = 10.0)]
    pub measure: f64,
    /// `publish` and `receive`: how many messages.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub messages: u32,
    /// Seconds without a delivery after which the rest counts as lost.
    #[arg(long, default_value_t = 5.0)]
    pub settle: f64,
    /// Seconds until the run is cut short.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// `rate`: processes whose CPU time is measured over the window (repeatable).
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// `receive`, `subscribe`: the subscriber's client id (default `fb<pid>-bridge-s`).
    #[arg(long)]
    pub client_id: Option<String>,
    /// `receive`: the subscriber's clean session flag; `false` takes up the session a
    /// `--mode subscribe` with the same `--client-id` left on the remote.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub clean_session: bool,
    /// Tokio worker threads of the generator.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    fn check(&self) -> anyhow::Result<()> {
        if !self.host.is_loopback() {
            bail!("--host {}: only loopback addresses are allowed", self.host);
        }
        for t in [Some(&self.topic), self.sub_topic.as_ref()].into_iter().flatten() {
            if t.is_empty() || t.len() > 1024 || t.contains(['+', '#', '\0']) {
                bail!("topics must be 1 to 1024 bytes without '+', '#' or NUL");
            }
        }
        if !(self.warmup >= 0.0 && self.measure > 0.0 && self.settle > 0.0 && self.timeout > 0.0) {
            bail!("--warmup must be >= 0, --measure, --settle and --timeout > 0");
        }
        Ok(())
    }
}

/// What one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub mode: Option<Mode>,
    pub pub_port: u16,
    pub sub_port: u16,
    pub tag: u32,
    pub size: u32,
    pub inflight: u16,
    pub window: Option<u32>,
    /// PUBLISHes written to the bridging broker.
    pub sent: u64,
    /// Of those, PUBACKed (with a reason code below 0x80).
    pub acked: u64,
    pub rejected: u64,
    /// Distinct messages that arrived at the remote's subscriber.
    pub received: u64,
    pub duplicates: u64,
    /// First arrivals with a lower sequence number than one that arrived before.
    pub out_of_order: u64,
    /// PUBACKed (`rate`, `publish`) or expected (`receive`) and never arrived.
    pub lost: u64,
    /// A few runs of missing sequence numbers.
    pub missing_sample: Vec<String>,
    /// `rate`: the measure window's length, arrivals in it and their rate.
    pub window_secs: Option<f64>,
    pub window_received: Option<u64>,
    pub rate: Option<f64>,
    pub cpu: Vec<ProcCpu>,
    /// `rate`: the generator's own CPU microseconds per message arrived, over the window.
    pub generator_cpu_us_per_msg: Option<f64>,
    pub latency_us: Option<Latency>,
    pub timed_out: bool,
    pub errors: Vec<String>,
}

impl Report {
    pub fn exit_code(&self) -> u8 {
        u8::from(!self.errors.is_empty())
    }

    pub fn print_text(&self) {
        println!(
            "bridge {:?}: publish to :{}, receive on :{}, tag {}, {} B, inflight {}{}",
            self.mode.unwrap_or(Mode::Rate),
            self.pub_port,
            self.sub_port,
            self.tag,
            self.size,
            self.inflight,
            self.window.map(|w| format!(", window {w}")).unwrap_or_default()
        );
        println!("  sent {}, acked {}, rejected {}", self.sent, self.acked, self.rejected);
        println!(
            "  received {}, lost {}, duplicates {}, out of order {}{}",
            self.received,
            self.lost,
            self.duplicates,
            self.out_of_order,
            if self.timed_out { ", TIMED OUT" } else { "" }
        );
        if let (Some(s), Some(n), Some(r)) = (self.window_secs, self.window_received, self.rate) {
            println!("  window:  {n} in {s:.3} s = {r:.0} msgs/s");
        }
        for c in &self.cpu {
            let per = c.cpu_us_per_msg.map(|u| format!(" = {u:.2} us/msg")).unwrap_or_default();
            println!("  cpu:     pid {} {:.3} s{per}", c.pid, c.cpu_secs);
        }
        if let Some(g) = self.generator_cpu_us_per_msg {
            println!("  cpu:     generator {g:.2} us/msg");
        }
        if let Some(l) = &self.latency_us {
            let us = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            println!("  latency: p50 {} us, p99 {} us, max {} us", us(l.p50), us(l.p99), us(l.max));
        }
        for m in &self.missing_sample {
            println!("  missing: {m}");
        }
        for e in &self.errors {
            println!("  error:   {e}");
        }
    }
}

/// Shared between the publisher and the subscriber.
#[derive(Debug)]
struct Ctx {
    base: Instant,
    tag: u32,
    /// Distinct messages arrived so far.
    received: AtomicU64,
    /// The subscriber made progress.
    progress: Notify,
}

#[derive(Debug, Default)]
struct SubState {
    seen: Seen,
    received: u64,
    duplicates: u64,
    out_of_order: u64,
    latency: Histogram,
}

/// Connects and subscribes; a session the remote kept (clean session off) already has the
/// subscription, and may start delivering at once: the deliveries stay in the read buffer.
async fn subscribe(addr: SocketAddr, client_id: String, topic: &str, clean: bool) -> anyhow::Result<Conn> {
    let (mut conn, _, present) = Conn::open_session(addr, ProtocolVersion::V311, client_id, MAX_PACKET, clean).await?;
    if present {
        return Ok(conn);
    }
    let sub = Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![(Str::from(topic), SubOptions { qos: QoS::AtLeastOnce, ..SubOptions::default() })],
    };
    conn.send(&Packet::Subscribe(sub)).await?;
    match timeout(HANDSHAKE_TIMEOUT, conn.next()).await.map_err(|_| anyhow!("SUBACK: timed out"))?? {
        Packet::SubAck(ack) if ack.reasons.first() == Some(&1) => Ok(conn),
        Packet::SubAck(ack) => bail!("SUBACK for QoS 1 returned {:02x?}", ack.reasons),
        other => Err(disconnect_error(&other)),
    }
}

/// Reads deliveries until `target` distinct ones arrived. Once `done` is true (at once for a
/// receiver that is told so from the start), `quiet` without a delivery ends it too; `deadline`
/// always does (returns true then).
async fn receive(
    conn: &mut Conn,
    ctx: &Ctx,
    st: &mut SubState,
    target: &AtomicU64,
    mut done: watch::Receiver<bool>,
    deadline: Instant,
    quiet: Duration,
) -> anyhow::Result<bool> {
    let mut since = Instant::now();
    let mut quiet_counts = *done.borrow_and_update();
    // What the subscription's set-up left in the buffer first.
    let mut buffered = !conn.rbuf.is_empty();
    while st.received < target.load(Ordering::Acquire) {
        let wake = if quiet_counts { (since + quiet).min(deadline) } else { deadline };
        if !std::mem::take(&mut buffered) {
            tokio::select! {
                r = Conn::read(&mut conn.stream, &mut conn.rbuf) => r?,
                _ = sleep_until(wake) => return Ok(wake == deadline),
                _ = done.changed(), if !quiet_counts => {
                    quiet_counts = true;
                    since = Instant::now();
                    continue;
                }
            }
        }
        let now = Instant::now();
        let now_ns = now.duration_since(ctx.base).as_nanos() as u64;
        let before = st.received;
        while let Some(p) = conn.dec.decode(&mut conn.rbuf).map_err(|e| anyhow!("decode: {e}"))? {
            match p {
                Packet::Publish(p) => {
                    if let Some(id) = p.packet_id {
                        encode(&Packet::PubAck(PubResp::ok(id)), ProtocolVersion::V311, &mut conn.wbuf);
                    }
                    let b = &p.payload[..];
                    if b.len() < 16 || u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()) != ctx.tag {
                        continue;
                    }
                    let sent = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
                    let seq = u32::from_le_bytes(b[12..16].try_into().unwrap_or_default());
                    let in_order = u64::from(seq) + 1 >= st.seen.top;
                    if st.seen.insert(seq) {
                        st.received += 1;
                        st.out_of_order += u64::from(!in_order);
                        st.latency.record(now_ns.saturating_sub(sent) / 1000);
                    } else {
                        st.duplicates += 1;
                    }
                }
                Packet::PingResp => {}
                other => return Err(disconnect_error(&other)),
            }
        }
        if st.received != before {
            since = now;
            ctx.received.store(st.received, Ordering::Release);
            ctx.progress.notify_one();
        }
        if !conn.wbuf.is_empty() {
            conn.flush().await?;
        }
    }
    Ok(false)
}

#[derive(Debug, Default)]
struct PubState {
    sent: u64,
    acked: u64,
    rejected: u64,
    inflight: u32,
}

/// Publishes until `stop_at` (or `limit` messages), keeping the windows; then waits (until
/// `deadline`) for the PUBACKs of what was sent.
#[allow(clippy::too_many_arguments)]
async fn publish(
    conn: &mut Conn,
    ctx: &Ctx,
    tpl: &Template,
    st: &mut PubState,
    inflight: u32,
    window: Option<u64>,
    limit: u64,
    stop_at: Instant,
    deadline: Instant,
) -> anyhow::Result<bool> {
    let mut ids = Ids::new();
    loop {
        let sending = Instant::now() < stop_at && st.sent < limit;
        if sending {
            let arrived = ctx.received.load(Ordering::Acquire);
            while st.inflight < inflight
                && st.sent < limit
                && window.is_none_or(|w| st.sent.saturating_sub(arrived) < w)
            {
                let now_ns = ctx.base.elapsed().as_nanos() as u64;
                tpl.write(&mut conn.wbuf, now_ns, ctx.tag, st.sent as u32, ids.take());
                st.sent += 1;
                st.inflight += 1;
            }
            if !conn.wbuf.is_empty() {
                conn.flush().await?;
            }
        } else if st.inflight == 0 {
            return Ok(false);
        }
        let wake = if sending { stop_at.min(deadline) } else { deadline };
        tokio::select! {
            r = Conn::read(&mut conn.stream, &mut conn.rbuf) => r?,
            _ = ctx.progress.notified(), if sending && window.is_some() => continue,
            _ = sleep_until(wake) => {
                if wake == deadline {
                    return Ok(true);
                }
                continue;
            }
        }
        while let Some(p) = conn.dec.decode(&mut conn.rbuf).map_err(|e| anyhow!("decode: {e}"))? {
            match p {
                Packet::PubAck(r) => {
                    if !ids.release(r.packet_id) {
                        bail!("PUBACK for packet id {} not in flight", r.packet_id);
                    }
                    st.inflight -= 1;
                    if r.reason >= 0x80 {
                        st.rejected += 1;
                    } else {
                        st.acked += 1;
                    }
                }
                Packet::PingResp => {}
                other => return Err(disconnect_error(&other)),
            }
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

pub async fn run(args: &Args) -> anyhow::Result<Report> {
    args.check()?;
    let pub_addr = SocketAddr::new(args.host, args.pub_port);
    let sub_addr = SocketAddr::new(args.host, args.sub_port);
    let tag = args.tag.unwrap_or_else(std::process::id);
    let sub_topic = args.sub_topic.clone().unwrap_or_else(|| args.topic.clone());
    let prefix = format!("fb{}", std::process::id());
    let mut report = Report {
        mode: Some(args.mode),
        pub_port: args.pub_port,
        sub_port: args.sub_port,
        tag,
        size: args.size,
        inflight: args.inflight,
        ..Report::default()
    };
    let base = Instant::now();
    let deadline = base + secs(args.timeout);
    let ctx = Arc::new(Ctx { base, tag, received: AtomicU64::new(0), progress: Notify::new() });
    let tpl = Template::new(&args.topic, QoS::AtLeastOnce, ProtocolVersion::V311, args.size as usize);
    match args.mode {
        Mode::Publish => {
            let (mut conn, _) = Conn::open(pub_addr, ProtocolVersion::V311, format!("{prefix}-bridge-p"), MAX_PACKET)
                .await
                .context("publisher")?;
            let mut st = PubState::default();
            let n = u64::from(args.messages);
            let r =
                publish(&mut conn, &ctx, &tpl, &mut st, u32::from(args.inflight), None, n, deadline, deadline).await;
            match r {
                Ok(t) => report.timed_out = t,
                Err(e) => report.errors.push(format!("publisher: {e:#}")),
            }
            conn.close().await;
            report.sent = st.sent;
            report.acked = st.acked;
            report.rejected = st.rejected;
            if st.acked < n {
                report.errors.push(format!("{} of {n} messages PUBACKed", st.acked));
            }
        }
        Mode::Receive => {
            let id = args.client_id.clone().unwrap_or_else(|| format!("{prefix}-bridge-s"));
            let mut conn = subscribe(sub_addr, id, &sub_topic, args.clean_session).await.context("subscriber")?;
            println!("ready");
            let _ = std::io::stdout().flush();
            let mut st = SubState::default();
            let n = u64::from(args.messages);
            let target = AtomicU64::new(n);
            let done = watch::channel(true).1;
            match receive(&mut conn, &ctx, &mut st, &target, done, deadline, secs(args.settle)).await {
                Ok(t) => report.timed_out = t,
                Err(e) => report.errors.push(format!("subscriber: {e:#}")),
            }
            conn.close().await;
            fill_sub(&mut report, &st, args.messages);
        }
        Mode::Subscribe => {
            let id = args.client_id.clone().unwrap_or_else(|| format!("{prefix}-bridge-s"));
            let conn = subscribe(sub_addr, id, &sub_topic, false).await.context("subscriber")?;
            conn.close().await;
        }
        Mode::Rate => {
            let mut sub =
                subscribe(sub_addr, format!("{prefix}-bridge-s"), &sub_topic, true).await.context("subscriber")?;
            let (mut conn, _) = Conn::open(pub_addr, ProtocolVersion::V311, format!("{prefix}-bridge-p"), MAX_PACKET)
                .await
                .context("publisher")?;
            let warm_end = Instant::now() + secs(args.warmup);
            let stop_at = warm_end + secs(args.measure);
            let sub_ctx = ctx.clone();
            let target = Arc::new(AtomicU64::new(u64::MAX));
            let sub_target = target.clone();
            let (pubs_done, done) = watch::channel(false);
            let settle = secs(args.settle);
            let subscriber = tokio::spawn(async move {
                let mut st = SubState::default();
                let r = receive(&mut sub, &sub_ctx, &mut st, &sub_target, done, deadline, settle).await;
                (sub, st, r)
            });
            // The measure window: sampled by a timer task, so that it is on time whatever the
            // publisher is doing.
            let pids = args.pids.clone();
            let win_ctx = ctx.clone();
            let window = tokio::spawn(async move {
                sleep_until(warm_end).await;
                let t0 = Instant::now();
                let n0 = win_ctx.received.load(Ordering::Acquire);
                let c0: Vec<Option<f64>> = pids.iter().map(|p| proc_cpu_secs(*p)).collect();
                let own = CpuMeter::start();
                sleep_until(stop_at).await;
                let own = own.stop().secs;
                let t1 = Instant::now();
                let n1 = win_ctx.received.load(Ordering::Acquire);
                let c1: Vec<Option<f64>> = pids.iter().map(|p| proc_cpu_secs(*p)).collect();
                (t1.duration_since(t0).as_secs_f64(), n1 - n0, pids, c0, c1, own)
            });
            let mut st = PubState::default();
            let w = Some(u64::from(args.window));
            let r =
                publish(&mut conn, &ctx, &tpl, &mut st, u32::from(args.inflight), w, u64::MAX, stop_at, deadline).await;
            match r {
                Ok(t) => report.timed_out |= t,
                Err(e) => report.errors.push(format!("publisher: {e:#}")),
            }
            // Everything PUBACKed should arrive; the subscriber waits for it, and gives up after
            // `settle` seconds without a delivery.
            target.store(st.acked, Ordering::Release);
            pubs_done.send_replace(true);
            let (win_secs, win_n, pids, c0, c1, own) = window.await.context("window task")?;
            let (sub, sst) = match subscriber.await {
                Ok((sub, sst, r)) => {
                    match r {
                        Ok(t) => report.timed_out |= t,
                        Err(e) => report.errors.push(format!("subscriber: {e:#}")),
                    }
                    (Some(sub), Some(sst))
                }
                Err(e) => {
                    report.errors.push(format!("subscriber task: {e}"));
                    (None, None)
                }
            };
            conn.close().await;
            if let Some(sub) = sub {
                sub.close().await;
            }
            report.window = Some(args.window);
            report.sent = st.sent;
            report.acked = st.acked;
            report.rejected = st.rejected;
            match sst {
                Some(sst) => fill_sub(&mut report, &sst, st.acked.min(u64::from(u32::MAX)) as u32),
                None => {
                    report.received = ctx.received.load(Ordering::Acquire);
                    report.lost = st.acked.saturating_sub(report.received);
                }
            }
            report.window_secs = Some(win_secs);
            report.window_received = Some(win_n);
            report.rate = Some(win_n as f64 / win_secs);
            report.generator_cpu_us_per_msg = (win_n > 0).then(|| own * 1e6 / win_n as f64);
            report.cpu = pids
                .iter()
                .zip(c0.iter().zip(c1.iter()))
                .filter_map(|(pid, (a, b))| {
                    let s = b.zip(*a).map(|(b, a)| b - a)?;
                    Some(ProcCpu {
                        pid: *pid,
                        cpu_secs: s,
                        cpu_us_per_msg: (win_n > 0).then(|| s * 1e6 / win_n as f64),
                    })
                })
                .collect();
        }
    }
    Ok(report)
}

fn fill_sub(report: &mut Report, st: &SubState, expected: u32) {
    report.received = st.received;
    report.duplicates = st.duplicates;
    report.out_of_order = st.out_of_order;
    report.lost = u64::from(expected).saturating_sub((0..expected).filter(|s| st.seen.has(*s)).count() as u64);
    report.missing_sample =
        st.seen.missing(expected, 4).into_iter().map(|(from, to)| format!("seq {from}..={to}")).collect();
    report.latency_us = Some(st.latency.summary());
}

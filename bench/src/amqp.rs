//! `ferry-bench amqp`: P publishers send N messages each to one queue through the default exchange;
//! C consumers share that queue (competing consumers, so the P×N messages are spread over them).
//! Each connection is a minimal AMQP 0-9-1 client on Ferry's codec (`ferry_amqp::codec`, no client
//! library), so the generator stays cheap and can pipeline.
//!
//! Every connection does the handshake itself: protocol header, connection.start-ok (PLAIN,
//! guest/guest), connection.tune-ok echoing the server's channel-max and frame-max with heartbeats
//! off, connection.open on vhost `/`, then channel 1. A setup connection declares the queue
//! (durable with `--persistent`; if it exists with the other durability it is deleted and declared
//! again) and purges it, before any consumer or publisher starts.
//!
//! Body: bytes 0..8 are the send time (nanoseconds since the run's start, little-endian); when
//! `--size` is at least 16, bytes 8..12 are the publisher's index and 12..16 the message's
//! sequence number, which lets consumers count duplicates and list missing runs; the rest is zero.
//!
//! Publishers encode basic.publish + content header + body frames once as a template and stamp
//! each copy in place: no allocation per message. Without `--confirm` they write batches of up to
//! [`BATCH_BYTES`] as fast as the socket takes them (the broker's flow control slows them down);
//! with `--confirm` they keep up to `--window` messages unconfirmed, counting basic.ack and
//! basic.nack (with `multiple`). Consumers set basic.qos (`--prefetch`) and consume with no-ack,
//! or with `--manual-ack` acknowledge with `basic.ack multiple=true` once `--ack-every`
//! deliveries are unacknowledged (1: one plain ack per message); the acks of one read go out in
//! one write.
//!
//! The run ends when the consumers together have every message, at `--timeout`, or `--settle`
//! seconds after the last publisher finished if no consumer received anything meanwhile. With
//! `--consumers 0` nobody consumes: the run fills the queue and ends when the publishers are done
//! (and, with `--confirm`, confirmed), leaving the messages in the queue.
//!
//! Steady load: `--rate R` paces the publishers (R messages per second over all of them, message
//! `k` of a publisher due at `k / (R / P)` seconds after the start, so a late publisher catches up
//! in a burst rather than drifting); `--backlog N` makes the consumers hold about N messages in the
//! queue: a consumer reads only while more than N published (with `--confirm`: confirmed)
//! messages are not yet received, so they start once the queue holds N and then follow the
//! publishers. Once every publisher is done the consumers drain the rest.
//!
//! Steady state (`--measure S`, see `steady.rs`): publishers send continuously (or at `--rate`)
//! through `--warmup` and the window, over sockets with a bounded send buffer (`--sndbuf`), then
//! stop (with `--confirm`: once their window is confirmed). Rates, latencies and CPU figures
//! (`--pid`) are those of the window. The consumers then drain until they have every message
//! sent, or `--settle` seconds pass without a delivery; with `--confirm`, every confirmed message
//! is checked off (per queue with `--fanout-queues`): one missing is a loss. Per-publisher
//! sequence numbers are tracked up to 2^28 bits over all publishers and queues (32 MB).
//!
//! Fan-out: `--fanout-queues K` publishes to the fanout exchange [`FANOUT_EXCHANGE`] (declared
//! non-durable and auto-delete by the setup connection) instead of the default exchange; each of
//! K consumers declares its own server-named exclusive queue, binds it there and consumes it, so
//! every message is expected K times (duplicates are counted per queue). `--consumers` and
//! `--queue` are ignored then; `--backlog` is refused.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::{Buf, BytesMut};
use ferry_amqp::codec::{
    check_protocol_header, encode_body_frames, encode_header_frame, encode_method_frame, BasicAck, BasicConsume,
    BasicPublish, BasicQos, ChannelClose, ChannelCloseOk, ChannelOpen, ConfirmSelect, ConnectionClose,
    ConnectionCloseOk, ConnectionOpen, ConnectionStartOk, ConnectionTuneOk, ContentHeader, ExchangeDeclare,
    ExchangeDelete, Frame, FrameDecoder, Method, ProtocolHeader, QueueBind, QueueDeclare, QueueDelete, QueuePurge,
    FRAME_MIN_SIZE, PROTOCOL_HEADER,
};
use ferry_core::message::{DeliveryMode, FieldTable, FieldValue, Properties};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};

use crate::histogram::{CpuMeter, Histogram, Latency};
use crate::mqtt::missing_ranges;
use crate::pacing::{paced_allowed, paced_due};
use crate::steady::{self, Measured, Seen, SteadyArgs, Window, STEADY_CAP};

/// Bytes of publishes an unconfirmed publisher encodes before it writes them.
pub const BATCH_BYTES: usize = 64 * 1024;
/// What one read asks the socket for.
const READ_CHUNK: usize = 64 * 1024;
/// Each step of the handshake and of the setup must complete within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Best-effort connection.close at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The one channel every connection uses.
const CH: u16 = 1;
/// Duplicate tracking needs one bit per message; above this many messages it is off.
const MAX_TRACKED: u64 = 1 << 30;
/// Steady state: bits of sequence-number tracking over all publishers and queues (32 MB,
/// allocated up front): a publisher may send 2^28 / (publishers x queues) messages, 26 M with
/// ten queues, more than a 7 s run at the fastest rate measured here.
const STEADY_TRACKED: u64 = 1 << 28;
/// With `--fanout-queues`: the exchange the publishers send to.
pub const FANOUT_EXCHANGE: &str = "bench.fanout";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Broker address; loopback only (this is a load generator, keep it on the machine).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    #[arg(long, default_value_t = 5672)]
    pub port: u16,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub publishers: u32,
    /// Consumers on the queue; they compete, so together they expect publishers x messages.
    /// 0: nobody consumes; the run fills the queue and leaves the messages there.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub consumers: u32,
    /// Messages per publisher.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub messages: u32,
    /// Body bytes (at least 8, the timestamp; 16 or more also enables duplicate counting).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=16 * 1024 * 1024))]
    pub size: u32,
    /// The queue, declared and purged before the run, published to through the default exchange.
    #[arg(long, default_value = "bench.q")]
    pub queue: String,
    /// Publish to the fanout exchange `bench.fanout` (non-durable, auto-delete) bound to K
    /// server-named exclusive queues with one consumer each: every message is expected K times.
    /// --consumers and --queue are then ignored (K consumers). 0: off, one queue.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub fanout_queues: u32,
    /// Publisher confirms (confirm.select), at most --window messages unconfirmed per publisher.
    #[arg(long)]
    pub confirm: bool,
    /// With --confirm: unconfirmed messages per publisher.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub window: u32,
    /// Consume with acknowledgements instead of no-ack.
    #[arg(long)]
    pub manual_ack: bool,
    /// With --manual-ack: send `basic.ack multiple=true` once this many deliveries are
    /// unacknowledged (1: a plain ack per message). Capped at half the prefetch.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub ack_every: u32,
    /// basic.qos prefetch-count per consumer (0: unlimited).
    #[arg(long, default_value_t = 200)]
    pub prefetch: u16,
    /// Durable queue and persistent messages (delivery-mode 2).
    #[arg(long)]
    pub persistent: bool,
    /// Publish at most this many messages per second over all publishers (0: as fast as the
    /// broker, the window and the socket allow).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Consumers keep about this many messages in the queue: they read only while more than N
    /// published (with --confirm: confirmed) messages are not yet received; once every publisher
    /// is done they drain the rest. Needs --manual-ack and a prefetch (else the backlog would
    /// sit in socket buffers, not in the queue).
    #[arg(long)]
    pub backlog: Option<u64>,
    /// Seconds from the first send until the run is cut short and the shortfall reported.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
    /// Seconds without a delivery, once every publisher is done, after which the rest counts as lost.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub settle: u64,
    #[command(flatten)]
    pub steady: SteadyArgs,
    /// Tokio worker threads of the generator.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// Messages per publisher: --messages, or in steady state what the tracking allows.
    fn messages(&self) -> u32 {
        if self.steady.measure.is_none() {
            return self.messages;
        }
        let copies = u64::from(self.fanout_queues.max(1));
        (STEADY_TRACKED / (u64::from(self.publishers) * copies)).min(u64::from(STEADY_CAP)) as u32
    }

    fn check(&self) -> anyhow::Result<()> {
        if !self.host.is_loopback() {
            bail!("--host {}: only loopback addresses are allowed", self.host);
        }
        if self.queue.is_empty() || self.queue.len() > 255 || self.queue.starts_with("amq.") {
            bail!("--queue must be 1 to 255 bytes and not start with \"amq.\"");
        }
        if self.backlog.is_some() && (!self.manual_ack || self.prefetch == 0 || self.consumers == 0) {
            bail!("--backlog needs consumers with --manual-ack and a prefetch above 0");
        }
        if self.backlog.is_some() && self.fanout_queues > 0 {
            bail!("--backlog cannot be combined with --fanout-queues");
        }
        self.steady.check()?;
        if self.steady.measure.is_some() {
            if self.size < 16 {
                bail!("--measure needs --size 16 or more (the loss check needs sequence numbers)");
            }
            if self.backlog.is_some() || self.consumer_count() == 0 {
                bail!("--measure needs consumers and no --backlog");
            }
        }
        Ok(())
    }

    /// Consumers actually started: one per queue with --fanout-queues.
    fn consumer_count(&self) -> u32 {
        if self.fanout_queues > 0 {
            self.fanout_queues
        } else {
            self.consumers
        }
    }

    /// The ack batch actually used: never more than half the prefetch, so the broker never
    /// waits for an ack the consumer is holding back.
    fn ack_batch(&self) -> u32 {
        match self.prefetch {
            0 => self.ack_every,
            p => self.ack_every.min((u32::from(p) / 2).max(1)),
        }
    }
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub broker: String,
    /// The server's `product` and `version` from connection.start.
    pub server: String,
    pub publishers: u32,
    pub consumers: u32,
    pub messages_per_publisher: u32,
    pub size: u32,
    pub queue: String,
    /// --fanout-queues: the queues bound to `bench.fanout`, each receiving every message (`queue`
    /// is then unused).
    pub fanout_queues: Option<u32>,
    pub persistent: bool,
    /// --rate: messages per second over all publishers (None: unpaced).
    pub rate: Option<u32>,
    /// --backlog: messages the consumers left in the queue while the publishers ran.
    pub backlog: Option<u64>,
    /// With --confirm: the window per publisher.
    pub confirm_window: Option<u32>,
    /// With --manual-ack: deliveries per `basic.ack multiple=true` (1: one ack per message).
    pub ack_every: Option<u32>,
    pub prefetch: u16,
    pub threads: u32,
    /// basic.publish written.
    pub sent: u64,
    /// With --confirm: messages confirmed by basic.ack.
    pub confirmed: u64,
    /// With --confirm: messages refused by basic.nack.
    pub nacked: u64,
    /// With --confirm: messages still unconfirmed at the end.
    pub unconfirmed: u64,
    pub expected_deliveries: u64,
    /// Distinct messages received, over all consumers.
    pub deliveries: u64,
    pub duplicates: u64,
    /// Deliveries flagged `redelivered`.
    pub redelivered: u64,
    pub lost: u64,
    pub loss_pct: f64,
    /// Every message sent and received.
    pub complete: bool,
    /// The run hit `--timeout`.
    pub timed_out: bool,
    pub publish_secs: f64,
    pub publish_rate: f64,
    pub delivery_secs: Option<f64>,
    pub delivery_rate: Option<f64>,
    /// Steady state: of the messages received in the window only.
    pub latency_us: Latency,
    /// Steady state: what the window measured (`None`: a fixed-count run).
    pub steady: Option<Measured>,
    pub per_consumer_min: Option<u64>,
    pub per_consumer_max: Option<u64>,
    /// A few runs of missing messages, when bodies are 16 B or more.
    pub missing_sample: Vec<String>,
    /// When messages are missing: the queue's message count after the run (passive
    /// queue.declare once every connection closed), to tell "stuck in the queue" from "dropped".
    pub left_in_queue: Option<u32>,
    /// CPU seconds (user + system) the generator used from the start of the run (everyone
    /// connected) to its end.
    pub generator_cpu_secs: f64,
    /// `generator_cpu_secs` / wall seconds x 100 (100: one core busy, 200: two).
    pub generator_cpu_pct: f64,
    pub errors: Vec<String>,
}

impl Report {
    /// 0: every message sent, received and (with --confirm) confirmed; 1 otherwise or on errors.
    pub fn exit_code(&self) -> u8 {
        u8::from(!(self.errors.is_empty() && self.complete && self.nacked == 0 && self.unconfirmed == 0))
    }

    pub fn print_text(&self) {
        let mut mode = Vec::new();
        if self.persistent {
            mode.push("persistent".to_string());
        }
        if let Some(r) = self.rate {
            mode.push(format!("{r} msgs/s"));
        }
        if let Some(n) = self.backlog {
            mode.push(format!("backlog {n}"));
        }
        if let Some(w) = self.confirm_window {
            mode.push(format!("confirms (window {w})"));
        }
        mode.push(match self.ack_every {
            Some(1) => "manual ack".to_string(),
            Some(n) => format!("manual ack (multiple, every {n})"),
            None => "no-ack".to_string(),
        });
        let n = match self.steady {
            Some(_) => "steady".to_string(),
            None => format!("{} msgs", self.messages_per_publisher),
        };
        println!(
            "amqp {} ({}): {} publisher(s) x {n} -> {} consumer(s) on {}, {} B body, {}, prefetch {}, {} thread(s)",
            self.broker,
            self.server,
            self.publishers,
            self.consumers,
            match self.fanout_queues {
                Some(k) => format!("{k} queue(s) of fanout exchange {FANOUT_EXCHANGE}"),
                None => self.queue.clone(),
            },
            self.size,
            mode.join(", "),
            self.prefetch,
            self.threads
        );
        match self.steady {
            Some(_) => println!("  publish:    {} sent in all (warm-up, window, drain)", self.sent),
            None => {
                println!(
                    "  publish:    {} sent in {:.3} s = {:.0} msgs/s",
                    self.sent, self.publish_secs, self.publish_rate
                )
            }
        }
        if self.confirm_window.is_some() {
            println!(
                "  confirms:   {} acked, {} nacked, {} unconfirmed",
                self.confirmed, self.nacked, self.unconfirmed
            );
        }
        if let Some(m) = &self.steady {
            m.print_text();
        }
        match (self.delivery_secs, self.delivery_rate) {
            _ if self.steady.is_some() => {
                println!("  delivery:   {} of {} in all", self.deliveries, self.expected_deliveries)
            }
            (Some(s), Some(r)) => {
                println!(
                    "  delivery:   {} of {} in {s:.3} s = {r:.0} msgs/s",
                    self.deliveries, self.expected_deliveries
                )
            }
            _ => println!("  delivery:   {} of {}", self.deliveries, self.expected_deliveries),
        }
        let us = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "  latency:    p50 {} us, p99 {} us, p99.9 {} us, max {} us{}",
            us(self.latency_us.p50),
            us(self.latency_us.p99),
            us(self.latency_us.p999),
            us(self.latency_us.max),
            if self.steady.is_some() { " (received in the window)" } else { "" }
        );
        println!("  per cons:   min {}, max {}", us(self.per_consumer_min), us(self.per_consumer_max));
        println!(
            "  lost:       {} ({:.3} %), duplicates {}, redelivered {}{}",
            self.lost,
            self.loss_pct,
            self.duplicates,
            self.redelivered,
            if self.timed_out { ", TIMED OUT" } else { "" }
        );
        for m in &self.missing_sample {
            println!("  missing:    {m}");
        }
        if let Some(n) = self.left_in_queue {
            println!("  in queue:   {n} messages left in {} after the run", self.queue);
        }
        println!(
            "  generator:  {:.3} s CPU = {:.1} % (200 % = 2 cores)",
            self.generator_cpu_secs, self.generator_cpu_pct
        );
        for e in &self.errors {
            println!("  error:      {e}");
        }
    }
}

/// Shared by every task of a run (also by `ferry-bench cross`, whose MQTT publishers feed these
/// consumers).
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) base: Instant,
    pub(crate) deadline: Instant,
    pub(crate) settle: Duration,
    pub(crate) messages: u32,
    publishers: u32,
    /// Over all consumers (0 without consumers).
    pub(crate) expected: u64,
    /// With --fanout-queues: bits per copy in `seen` (consumer `i` records at `i * copy_bits`);
    /// 0 when the consumers compete for one queue.
    copy_bits: u64,
    /// --rate per publisher, messages per second.
    pace: Option<f64>,
    /// --backlog.
    backlog: Option<u64>,
    /// Messages published (with confirms: confirmed), over all publishers; with --backlog the
    /// publishers wake the consumers through `progress` when it grows.
    published: AtomicU64,
    progress: Notify,
    /// One bit per (publisher, sequence) when bodies carry them and there are not too many.
    seen: Option<Box<[AtomicU64]>>,
    /// Distinct messages received by all consumers.
    pub(crate) received: AtomicU64,
    /// Nanoseconds since `base` of the latest delivery to any consumer.
    pub(crate) last_delivery_ns: AtomicU64,
    /// Nanoseconds since `base` when the last publisher finished.
    pubs_done_ns: AtomicU64,
    /// Publishers still sending; the last one to finish flips `pubs_done`.
    sending: AtomicUsize,
    /// Steady state: the measure window; publishers stop at its end.
    window: Option<Window>,
    /// basic.publish written, over all publishers.
    sent: AtomicU64,
    /// Copies of each message expected (queues with --fanout-queues, else 1; 0: no consumers).
    copies: u32,
    /// Deliveries after which the consumers are done: `expected`, or in steady state unknown
    /// (u64::MAX) until the publishers are done, then every message written x `copies`.
    target: AtomicU64,
    pubs_done: watch::Sender<bool>,
    /// Flipped by the consumer that receives the last expected message.
    all_received: watch::Sender<bool>,
    /// Flipped when every consumer has stopped.
    pub(crate) subs_done: watch::Sender<bool>,
}

impl Ctx {
    /// `publishers` x `messages` published, each expected by `copies` consumers (1: competing
    /// consumers on one queue, K: K fanout queues, 0: nobody consumes); unpaced, no backlog.
    pub(crate) fn new(
        base: Instant,
        deadline: Instant,
        settle: Duration,
        publishers: u32,
        messages: u32,
        copies: u32,
        size: usize,
    ) -> Ctx {
        let published = u64::from(publishers) * u64::from(messages);
        let expected = published * u64::from(copies);
        let tracked = size >= 16 && expected > 0 && expected <= MAX_TRACKED;
        Ctx {
            base,
            deadline,
            settle,
            messages,
            publishers,
            expected,
            copy_bits: if copies > 1 { published } else { 0 },
            pace: None,
            backlog: None,
            published: AtomicU64::new(0),
            progress: Notify::new(),
            seen: tracked.then(|| (0..expected.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()),
            received: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            pubs_done_ns: AtomicU64::new(0),
            sending: AtomicUsize::new(publishers as usize),
            window: None,
            sent: AtomicU64::new(0),
            copies,
            target: AtomicU64::new(expected),
            pubs_done: watch::channel(false).0,
            all_received: watch::channel(false).0,
            subs_done: watch::channel(false).0,
        }
    }
    /// Paces the publishers at `rate` messages per second over all of them (0: unpaced).
    pub(crate) fn with_rate(self, rate: u32) -> Ctx {
        Ctx { pace: (rate > 0).then(|| f64::from(rate) / f64::from(self.publishers)), ..self }
    }
    pub(crate) fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
    /// Steady state: measure over `window` (the target is set when the publishers are done).
    fn with_window(self, window: Option<Window>) -> Ctx {
        let target = AtomicU64::new(if window.is_some() { u64::MAX } else { self.expected });
        Ctx { window, target, ..self }
    }
    /// Steady state: the window is over, publishers stop.
    fn stopping(&self) -> bool {
        self.window.is_some_and(|w| w.over(Instant::now()))
    }
    pub(crate) fn publisher_finished(&self) {
        if self.sending.fetch_sub(1, Ordering::AcqRel) == 1 {
            if self.window.is_some() {
                // SeqCst with `record`'s: either it sees the target or this sees its delivery.
                let target = self.sent.load(Ordering::SeqCst) * u64::from(self.copies);
                self.target.store(target, Ordering::SeqCst);
                if self.received.load(Ordering::SeqCst) >= target {
                    self.all_received.send_replace(true);
                }
            }
            self.pubs_done_ns.store(self.now_ns(), Ordering::Release);
            self.pubs_done.send_replace(true);
        }
    }
    /// `n` more messages published (or confirmed): wake consumers holding a backlog.
    pub(crate) fn published(&self, n: u64) {
        if n > 0 {
            self.published.fetch_add(n, Ordering::AcqRel);
            if self.backlog.is_some() {
                self.progress.notify_waiters();
            }
        }
    }
    /// With --rate: how many messages a publisher may have sent by now.
    pub(crate) fn allowed(&self) -> u32 {
        match self.pace {
            None => self.messages,
            Some(per_sec) => paced_allowed(self.base.elapsed(), per_sec, self.messages),
        }
    }
    /// With --rate: when message `seq` of a publisher is due.
    pub(crate) fn due(&self, seq: u32) -> Instant {
        match self.pace {
            None => self.base,
            Some(per_sec) => self.base + paced_due(seq, per_sec),
        }
    }
}

/// A connection.close or channel.close from the server.
#[derive(Debug)]
struct ServerClose {
    connection: bool,
    code: u16,
    text: String,
    /// The method that caused it, when the server names one.
    method: Option<&'static str>,
}

impl fmt::Display for ServerClose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.connection { "connection.close" } else { "channel.close" };
        write!(f, "server sent {what} {} {}", self.code, self.text)?;
        if let Some(m) = self.method {
            write!(f, " (on {m})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerClose {}

/// One AMQP connection with channel 1 open: the socket, the decoder and the two buffers.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: TcpStream,
    dec: FrameDecoder,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Negotiated; 0 = no limit.
    frame_max: u32,
    pub(crate) server: String,
}

impl Conn {
    pub(crate) async fn open(addr: SocketAddr, name: &str) -> anyhow::Result<Conn> {
        Conn::open_with(addr, name, None).await.map(|(c, _)| c)
    }

    /// [`Conn::open`] with SO_SNDBUF set to `sndbuf` before connecting; also returns the send
    /// buffer the kernel granted.
    async fn open_with(addr: SocketAddr, name: &str, sndbuf: Option<u32>) -> anyhow::Result<(Conn, Option<u32>)> {
        let (stream, granted) = steady::connect(addr, sndbuf, HANDSHAKE_TIMEOUT).await?;
        let mut conn = Conn {
            stream,
            dec: FrameDecoder::new(FRAME_MIN_SIZE),
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(BATCH_BYTES * 2),
            frame_max: FRAME_MIN_SIZE,
            server: String::new(),
        };
        conn.wbuf.extend_from_slice(&PROTOCOL_HEADER);
        conn.flush().await?;
        timeout(HANDSHAKE_TIMEOUT, conn.handshake(name)).await.map_err(|_| anyhow!("handshake: timed out"))??;
        Ok((conn, granted))
    }

    async fn handshake(&mut self, name: &str) -> anyhow::Result<()> {
        // A server refusing our version answers with its own protocol header and closes.
        while self.rbuf.len() < 4 {
            Conn::read(&mut self.stream, &mut self.rbuf).await.context("waiting for connection.start")?;
        }
        if check_protocol_header(&self.rbuf[..4]) != ProtocolHeader::Wrong {
            bail!("the server refused AMQP 0-9-1 and answered with protocol header {:?}", &self.rbuf[..]);
        }
        let start = match self.next_method().await? {
            (0, Method::ConnectionStart(s)) => s,
            (ch, m) => bail!("expected connection.start, got {} on channel {ch}", m.name()),
        };
        let prop = |k: &str| start.server_properties.get(k).and_then(FieldValue::as_str).unwrap_or("?").to_string();
        self.server = format!("{} {}", prop("product"), prop("version"));
        if !start.mechanisms.split(|&b| b == b' ').any(|m| m == b"PLAIN") {
            bail!("the server does not offer PLAIN (mechanisms {:?})", String::from_utf8_lossy(&start.mechanisms));
        }
        let mut client_properties = FieldTable::new();
        client_properties.insert("product", FieldValue::string("ferry-bench"));
        client_properties.insert("connection_name", FieldValue::string(name));
        let start_ok = ConnectionStartOk {
            client_properties,
            response: bytes::Bytes::from_static(b"\0guest\0guest"),
            ..ConnectionStartOk::default()
        };
        self.send(0, &Method::ConnectionStartOk(start_ok)).await?;
        let tune = match self.next_method().await? {
            (0, Method::ConnectionTune(t)) => t,
            (_, Method::ConnectionClose(c)) => return Err(connection_closed(&c).into()),
            (ch, m) => bail!("expected connection.tune, got {} on channel {ch}", m.name()),
        };
        self.frame_max = tune.frame_max;
        // 0 is "no limit": still keep the decoder bounded.
        self.dec = FrameDecoder::new(if tune.frame_max == 0 { 16 << 20 } else { tune.frame_max });
        let tune_ok = ConnectionTuneOk { channel_max: tune.channel_max, frame_max: tune.frame_max, heartbeat: 0 };
        self.wbuf.clear();
        encode_method_frame(0, &Method::ConnectionTuneOk(tune_ok), &mut self.wbuf)?;
        encode_method_frame(0, &Method::ConnectionOpen(ConnectionOpen::default()), &mut self.wbuf)?;
        self.flush().await?;
        match self.next_method().await? {
            (0, Method::ConnectionOpenOk(_)) => {}
            (_, Method::ConnectionClose(c)) => return Err(connection_closed(&c).into()),
            (ch, m) => bail!("expected connection.open-ok, got {} on channel {ch}", m.name()),
        }
        self.rpc(&Method::ChannelOpen(ChannelOpen::default())).await.context("channel.open")?;
        Ok(())
    }

    /// Encodes `m` alone and writes it.
    async fn send(&mut self, channel: u16, m: &Method) -> anyhow::Result<()> {
        self.wbuf.clear();
        encode_method_frame(channel, m, &mut self.wbuf)?;
        self.flush().await
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        self.stream.write_all(&self.wbuf).await.context("write")?;
        self.wbuf.clear();
        Ok(())
    }

    /// One read into `rbuf`; an error when the broker closed the connection.
    async fn read(stream: &mut TcpStream, rbuf: &mut BytesMut) -> anyhow::Result<()> {
        if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
            rbuf.reserve(READ_CHUNK);
        }
        match stream.read_buf(rbuf).await {
            Ok(0) => bail!("connection closed by the broker"),
            Ok(_) => Ok(()),
            Err(e) => Err(anyhow!("read: {e}")),
        }
    }

    fn decode(&mut self) -> anyhow::Result<Option<Frame>> {
        self.dec.decode(&mut self.rbuf).map_err(|e| anyhow!("frame: {e}"))
    }

    async fn next_frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some(f) = self.decode()? {
                return Ok(f);
            }
            Conn::read(&mut self.stream, &mut self.rbuf).await?;
        }
    }

    /// The next method, skipping heartbeats; content frames here are a protocol error.
    async fn next_method(&mut self) -> anyhow::Result<(u16, Method)> {
        loop {
            match self.next_frame().await? {
                Frame::Method { channel, payload } => {
                    return Ok((channel, Method::decode_payload(payload).map_err(|e| anyhow!("method: {e}"))?));
                }
                Frame::Heartbeat => {}
                other => bail!("unexpected {} frame on channel {}", frame_kind(&other), other.channel()),
            }
        }
    }

    /// Sends a synchronous method on channel 1 and returns the server's answer. A channel.close
    /// or connection.close is answered (close-ok) and returned as a [`ServerClose`] error.
    pub(crate) async fn rpc(&mut self, m: &Method) -> anyhow::Result<Method> {
        self.send(CH, m).await?;
        let answer = timeout(HANDSHAKE_TIMEOUT, self.next_method())
            .await
            .map_err(|_| anyhow!("{}: no answer within {HANDSHAKE_TIMEOUT:?}", m.name()))??;
        match answer {
            (CH, Method::ChannelClose(c)) => {
                let _ = self.send(CH, &Method::ChannelCloseOk(ChannelCloseOk {})).await;
                Err(channel_closed(&c).into())
            }
            (_, Method::ConnectionClose(c)) => {
                let _ = self.send(0, &Method::ConnectionCloseOk(ConnectionCloseOk {})).await;
                Err(connection_closed(&c).into())
            }
            (CH, a) => Ok(a),
            (ch, a) => bail!("{}: got {} on channel {ch}", m.name(), a.name()),
        }
    }

    /// Sends connection.close and waits (briefly) for close-ok; errors do not matter any more.
    pub(crate) async fn close(mut self) {
        let close = ConnectionClose { reply_code: 200, reply_text: "bye".into(), class_id: 0, method_id: 0 };
        let _ = timeout(CLOSE_TIMEOUT, async {
            self.send(0, &Method::ConnectionClose(close)).await?;
            loop {
                if let Frame::Method { channel: 0, payload } = self.next_frame().await? {
                    if let Ok(Method::ConnectionCloseOk(_) | Method::ConnectionClose(_)) =
                        Method::decode_payload(payload)
                    {
                        break;
                    }
                }
            }
            let _ = self.stream.shutdown().await;
            anyhow::Ok(())
        })
        .await;
    }
}

fn frame_kind(f: &Frame) -> &'static str {
    match f {
        Frame::Method { .. } => "method",
        Frame::Header { .. } => "content header",
        Frame::Body { .. } => "body",
        Frame::Heartbeat => "heartbeat",
    }
}

fn channel_closed(c: &ChannelClose) -> ServerClose {
    ServerClose {
        connection: false,
        code: c.reply_code,
        text: c.reply_text.to_string_lossy(),
        method: Method::name_of(c.class_id, c.method_id),
    }
}

fn connection_closed(c: &ConnectionClose) -> ServerClose {
    ServerClose {
        connection: true,
        code: c.reply_code,
        text: c.reply_text.to_string_lossy(),
        method: Method::name_of(c.class_id, c.method_id),
    }
}

/// A method that arrived in the middle of the run where it has no business: the server's close,
/// or anything unexpected.
fn unexpected(channel: u16, m: &Method) -> anyhow::Error {
    match m {
        Method::ChannelClose(c) => channel_closed(c).into(),
        Method::ConnectionClose(c) => connection_closed(c).into(),
        other => anyhow!("unexpected {} on channel {channel}", other.name()),
    }
}

/// basic.publish + content header + body frames encoded once; copies are stamped in place.
#[derive(Debug)]
struct Template {
    bytes: Vec<u8>,
    /// Offset of the body's first byte (always in the first body frame: frame max ≥ 4096).
    body_at: usize,
    tracked: bool,
}

impl Template {
    fn new(
        exchange: &str,
        routing_key: &str,
        size: usize,
        persistent: bool,
        frame_max: u32,
    ) -> anyhow::Result<Template> {
        let publish =
            BasicPublish { exchange: exchange.into(), routing_key: routing_key.into(), ..BasicPublish::default() };
        let properties =
            Properties { delivery_mode: persistent.then_some(DeliveryMode::Persistent), ..Properties::default() };
        let mut out = BytesMut::new();
        encode_method_frame(CH, &Method::BasicPublish(publish), &mut out)?;
        encode_header_frame(CH, &ContentHeader::basic(size as u64, properties), &mut out)?;
        let body_at = out.len() + 7;
        encode_body_frames(&mut out, CH, &vec![0u8; size], frame_max);
        Ok(Template { bytes: out.to_vec(), body_at, tracked: size >= 16 })
    }

    fn len(&self) -> usize {
        self.bytes.len()
    }

    fn write(&self, out: &mut BytesMut, sent_ns: u64, publisher: u32, seq: u32) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        let p = start + self.body_at;
        out[p..p + 8].copy_from_slice(&sent_ns.to_le_bytes());
        if self.tracked {
            out[p + 8..p + 12].copy_from_slice(&publisher.to_le_bytes());
            out[p + 12..p + 16].copy_from_slice(&seq.to_le_bytes());
        }
    }
}

/// Outstanding publisher confirms: delivery tags `base..base + states.len()`, each pending or done.
#[derive(Debug)]
struct Confirms {
    base: u64,
    done: std::collections::VecDeque<bool>,
    pending: u64,
    /// The sequence numbers confirmed by basic.ack (delivery tag `t` is sequence `t - 1`).
    acked: Seen,
}

impl Confirms {
    fn new() -> Confirms {
        Confirms { base: 1, done: std::collections::VecDeque::new(), pending: 0, acked: Seen::default() }
    }
    /// Registers the next publish.
    fn push(&mut self) {
        self.done.push_back(false);
        self.pending += 1;
    }
    /// Settles `tag` (and with `multiple` every earlier tag), by basic.ack when `ack`, else by
    /// basic.nack; returns how many messages it settled. An error for a tag never published.
    fn settle(&mut self, tag: u64, multiple: bool, ack: bool) -> anyhow::Result<u64> {
        let end = self.base + self.done.len() as u64;
        if tag >= end || (tag < self.base && !multiple) || tag == 0 {
            bail!("confirm for delivery tag {tag}, outstanding are {}..{end}", self.base);
        }
        let mut settled = 0;
        let from = if multiple { self.base } else { tag };
        for t in from..=tag {
            if t < self.base {
                continue;
            }
            let state = &mut self.done[(t - self.base) as usize];
            if !*state {
                *state = true;
                settled += 1;
                if ack {
                    // Tags count from 1 per channel, one per publish; fewer than 2^32 here.
                    self.acked.insert((t - 1) as u32);
                }
            }
        }
        while self.done.front() == Some(&true) {
            self.done.pop_front();
            self.base += 1;
        }
        self.pending -= settled;
        Ok(settled)
    }
}

#[derive(Debug, Default)]
struct PubResult {
    first_send: Option<Instant>,
    last_send: Option<Instant>,
    sent: u64,
    confirmed: u64,
    /// With confirms: the sequence numbers confirmed by basic.ack.
    acked: Seen,
    nacked: u64,
    unconfirmed: u64,
    timed_out: bool,
    error: Option<String>,
}

async fn publisher(mut conn: Conn, ctx: Arc<Ctx>, index: u32, tpl: Arc<Template>, window: Option<u32>) -> PubResult {
    let mut res = PubResult::default();
    let run = match window {
        None => publish_unconfirmed(&mut conn, &ctx, index, &tpl, &mut res).await,
        Some(w) => publish_confirmed(&mut conn, &ctx, index, &tpl, w, &mut res).await,
    };
    if let Err(e) = run {
        res.error = Some(format!("publisher {index}: {e:#}"));
    }
    ctx.publisher_finished();
    // Stay connected until the consumers are done, so that closing cannot race the last messages.
    let mut done = ctx.subs_done.subscribe();
    let _ = timeout_at(ctx.deadline + ctx.settle, done.wait_for(|d| *d)).await;
    conn.close().await;
    res
}

async fn publish_unconfirmed(
    conn: &mut Conn,
    ctx: &Ctx,
    index: u32,
    tpl: &Template,
    res: &mut PubResult,
) -> anyhow::Result<()> {
    let mut seq = 0u32;
    while seq < ctx.messages {
        if ctx.stopping() {
            return Ok(());
        }
        if Instant::now() >= ctx.deadline {
            res.timed_out = true;
            break;
        }
        // Nothing is expected back, but a channel.close or connection.close must not go unnoticed.
        match conn.stream.try_read_buf(&mut conn.rbuf) {
            Ok(0) => bail!("connection closed by the broker"),
            Ok(_) => {
                while let Some(f) = conn.decode()? {
                    match f {
                        Frame::Heartbeat => {}
                        Frame::Method { channel, payload } => {
                            let m = Method::decode_payload(payload).map_err(|e| anyhow!("method: {e}"))?;
                            return Err(unexpected(channel, &m));
                        }
                        other => bail!("unexpected {} frame on channel {}", frame_kind(&other), other.channel()),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => bail!("read: {e}"),
        }
        let limit = ctx.allowed();
        if seq >= limit {
            // Paced (--rate): wait for the next message's turn.
            sleep_until(ctx.due(seq).min(ctx.deadline)).await;
            continue;
        }
        conn.wbuf.clear();
        let mut batch = 0u32;
        while seq < limit && (batch == 0 || conn.wbuf.len() + tpl.len() <= BATCH_BYTES) {
            tpl.write(&mut conn.wbuf, ctx.now_ns(), index, seq);
            seq += 1;
            batch += 1;
        }
        res.first_send.get_or_insert_with(Instant::now);
        match timeout_at(ctx.deadline, conn.flush()).await {
            Ok(r) => r?,
            Err(_) => {
                res.timed_out = true;
                break;
            }
        }
        res.sent += u64::from(batch);
        steady::add(&ctx.sent, u64::from(batch));
        ctx.published(u64::from(batch));
        res.last_send = Some(Instant::now());
    }
    cap_reached(ctx, seq)
}

/// Steady state: a publisher that sent its last allowed message before the window ended did not
/// measure what it was asked to.
fn cap_reached(ctx: &Ctx, seq: u32) -> anyhow::Result<()> {
    if ctx.window.is_some() && seq >= ctx.messages && !ctx.stopping() {
        bail!("sent the steady-state cap of {} messages before the window ended", ctx.messages);
    }
    Ok(())
}

async fn publish_confirmed(
    conn: &mut Conn,
    ctx: &Ctx,
    index: u32,
    tpl: &Template,
    window: u32,
    res: &mut PubResult,
) -> anyhow::Result<()> {
    match conn.rpc(&Method::ConfirmSelect(ConfirmSelect { nowait: false })).await? {
        Method::ConfirmSelectOk(_) => {}
        other => bail!("expected confirm.select-ok, got {}", other.name()),
    }
    let mut confirms = Confirms::new();
    let mut seq = 0u32;
    let result = async {
        loop {
            let mut wrote = false;
            let stopped = ctx.stopping();
            let limit = if stopped { seq } else { ctx.allowed() };
            while seq < limit && confirms.pending < u64::from(window) && conn.wbuf.len() < BATCH_BYTES {
                tpl.write(&mut conn.wbuf, ctx.now_ns(), index, seq);
                confirms.push();
                seq += 1;
                wrote = true;
            }
            if wrote {
                res.first_send.get_or_insert_with(Instant::now);
                match timeout_at(ctx.deadline, conn.flush()).await {
                    Ok(r) => r?,
                    Err(_) => {
                        res.timed_out = true;
                        return Ok(());
                    }
                }
                steady::add(&ctx.sent, u64::from(seq) - res.sent);
                res.sent = u64::from(seq);
                res.last_send = Some(Instant::now());
                // The window may still have room (a write is capped at BATCH_BYTES).
                if seq < limit && confirms.pending < u64::from(window) {
                    continue;
                }
            }
            if confirms.pending == 0 && (seq == ctx.messages || stopped) {
                return Ok(());
            }
            // Paced (--rate) with room in the window: also wake when the next message is due.
            let paced = !stopped && seq < ctx.messages && seq >= limit && confirms.pending < u64::from(window);
            let stop_at = ctx.window.map_or(ctx.deadline, |w| w.stop_at);
            tokio::select! {
                r = Conn::read(&mut conn.stream, &mut conn.rbuf) => r?,
                _ = sleep_until(ctx.due(seq).min(ctx.deadline)), if paced => continue,
                _ = sleep_until(stop_at), if !stopped && ctx.window.is_some() => continue,
                _ = sleep_until(ctx.deadline) => {
                    res.timed_out = true;
                    return Ok(());
                }
            }
            while let Some(f) = conn.decode()? {
                let (channel, payload) = match f {
                    Frame::Heartbeat => continue,
                    Frame::Method { channel, payload } => (channel, payload),
                    other => bail!("unexpected {} frame on channel {}", frame_kind(&other), other.channel()),
                };
                match Method::decode_payload(payload).map_err(|e| anyhow!("method: {e}"))? {
                    Method::BasicAck(a) if channel == CH => {
                        let n = confirms.settle(a.delivery_tag, a.multiple, true)?;
                        res.confirmed += n;
                        ctx.published(n);
                    }
                    Method::BasicNack(n) if channel == CH => {
                        res.nacked += confirms.settle(n.delivery_tag, n.multiple, false)?;
                    }
                    m => return Err(unexpected(channel, &m)),
                }
            }
        }
    }
    .await;
    res.unconfirmed = confirms.pending;
    res.acked = std::mem::take(&mut confirms.acked);
    result?;
    cap_reached(ctx, seq)
}

#[derive(Debug)]
pub(crate) struct SubResult {
    /// Distinct messages this consumer received first.
    pub(crate) received: u64,
    pub(crate) duplicates: u64,
    pub(crate) redelivered: u64,
    pub(crate) latency: Histogram,
    pub(crate) timed_out: bool,
    pub(crate) error: Option<String>,
    /// This consumer's first bit in `Ctx::seen` (fanout queues each have their own copy).
    offset: u64,
}

/// Where a consumer is in the frames of one delivery.
#[derive(Debug, Clone, Copy)]
enum Content {
    /// Waiting for basic.deliver.
    Method,
    Header {
        tag: u64,
    },
    /// `have` bytes of the first 16 collected in `head`, `left` body bytes still to come.
    Body {
        tag: u64,
        left: u64,
        head: [u8; 16],
        have: usize,
    },
}

pub(crate) async fn consumer(mut conn: Conn, ctx: Arc<Ctx>, index: u32, ack_every: Option<u32>) -> SubResult {
    let mut res = SubResult {
        received: 0,
        duplicates: 0,
        redelivered: 0,
        latency: Histogram::new(),
        timed_out: false,
        error: None,
        offset: u64::from(index) * ctx.copy_bits,
    };
    let mut acks = Acks { every: ack_every, last_tag: 0, pending: 0 };
    if let Err(e) = receive(&mut conn, &ctx, &mut res, &mut acks).await {
        res.error = Some(format!("consumer {index}: {e:#}"));
    } else if acks.pending > 0 {
        // Acknowledge the tail before closing, so the broker does not requeue it.
        acks.flush(&mut conn.wbuf);
        let _ = timeout(CLOSE_TIMEOUT, conn.flush()).await;
    }
    conn.close().await;
    res
}

/// Manual acknowledgements held back until `every` are pending.
#[derive(Debug)]
struct Acks {
    every: Option<u32>,
    last_tag: u64,
    pending: u32,
}

impl Acks {
    fn delivered(&mut self, tag: u64, out: &mut BytesMut) {
        let Some(every) = self.every else { return };
        self.last_tag = tag;
        self.pending += 1;
        if self.pending >= every {
            self.flush(out);
        }
    }
    fn flush(&mut self, out: &mut BytesMut) {
        if self.pending == 0 {
            return;
        }
        let ack = BasicAck { delivery_tag: self.last_tag, multiple: self.pending > 1 || self.every != Some(1) };
        // A fixed-size method: encoding cannot fail.
        let _ = encode_method_frame(CH, &Method::BasicAck(ack), out);
        self.pending = 0;
    }
}

async fn receive(conn: &mut Conn, ctx: &Ctx, res: &mut SubResult, acks: &mut Acks) -> anyhow::Result<()> {
    let mut pubs_done = ctx.pubs_done.subscribe();
    let mut all_received = ctx.all_received.subscribe();
    let mut publishers_finished = false;
    let mut state = Content::Method;
    loop {
        if let (Some(n), false) = (ctx.backlog, publishers_finished) {
            // Hold the backlog: read only while more than N published messages are unreceived.
            let progress = ctx.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if ctx.published.load(Ordering::Acquire) <= ctx.received.load(Ordering::Acquire) + n {
                tokio::select! {
                    _ = progress => {}
                    _ = pubs_done.wait_for(|d| *d) => publishers_finished = true,
                    _ = sleep_until(ctx.deadline) => {
                        res.timed_out = true;
                        return Ok(());
                    }
                }
                continue;
            }
        }
        let wake = if publishers_finished {
            let last = ctx.last_delivery_ns.load(Ordering::Acquire).max(ctx.pubs_done_ns.load(Ordering::Acquire));
            (ctx.base + Duration::from_nanos(last) + ctx.settle).min(ctx.deadline)
        } else {
            ctx.deadline
        };
        tokio::select! {
            r = Conn::read(&mut conn.stream, &mut conn.rbuf) => r?,
            _ = sleep_until(wake) => {
                if wake >= ctx.deadline {
                    res.timed_out = true;
                    return Ok(());
                }
                // Quiet for `settle` over all consumers (another may have received meanwhile).
                let last = ctx.last_delivery_ns.load(Ordering::Acquire).max(ctx.pubs_done_ns.load(Ordering::Acquire));
                if ctx.now_ns() >= last + ctx.settle.as_nanos() as u64 {
                    return Ok(());
                }
                continue;
            }
            _ = pubs_done.wait_for(|d| *d), if !publishers_finished => {
                publishers_finished = true;
                continue;
            }
            _ = all_received.wait_for(|d| *d) => return Ok(()),
        }
        let now_ns = ctx.now_ns();
        let mut delivered = false;
        while let Some(f) = conn.decode()? {
            state = match (state, f) {
                (_, Frame::Heartbeat) => state,
                (Content::Method, Frame::Method { channel, payload }) => {
                    match Method::decode_payload(payload).map_err(|e| anyhow!("method: {e}"))? {
                        Method::BasicDeliver(d) if channel == CH => {
                            res.redelivered += u64::from(d.redelivered);
                            Content::Header { tag: d.delivery_tag }
                        }
                        m => return Err(unexpected(channel, &m)),
                    }
                }
                (Content::Header { tag }, Frame::Header { channel: CH, payload }) => {
                    let header = ContentHeader::decode(payload).map_err(|e| anyhow!("content header: {e}"))?;
                    if header.body_size < 8 {
                        bail!("a {}-byte body (not from this run)", header.body_size);
                    }
                    Content::Body { tag, left: header.body_size, head: [0; 16], have: 0 }
                }
                (Content::Body { tag, left, mut head, mut have }, Frame::Body { channel: CH, payload }) => {
                    let n = payload.len() as u64;
                    if n > left {
                        bail!("body frames longer than the content header's body size");
                    }
                    let take = payload.len().min(16 - have);
                    head[have..have + take].copy_from_slice(&payload[..take]);
                    have += take;
                    if n < left {
                        Content::Body { tag, left: left - n, head, have }
                    } else {
                        delivered = true;
                        record(ctx, res, &head[..have], now_ns)?;
                        acks.delivered(tag, &mut conn.wbuf);
                        Content::Method
                    }
                }
                (state, f) => bail!("unexpected {} frame on channel {} in {state:?}", frame_kind(&f), f.channel()),
            };
        }
        if delivered {
            ctx.last_delivery_ns.fetch_max(now_ns, Ordering::AcqRel);
        }
        if !conn.wbuf.is_empty() {
            match timeout_at(ctx.deadline, conn.flush()).await {
                Ok(r) => r?,
                Err(_) => {
                    res.timed_out = true;
                    return Ok(());
                }
            }
        }
    }
}

/// Counts one delivered body (its first bytes in `head`).
fn record(ctx: &Ctx, res: &mut SubResult, mut head: &[u8], now_ns: u64) -> anyhow::Result<()> {
    let sent = head.get_u64_le();
    let mut fresh = true;
    if let Some(seen) = &ctx.seen {
        if head.len() < 8 {
            bail!("a body without publisher and sequence (not from this run)");
        }
        let publisher = head.get_u32_le();
        let seq = head.get_u32_le();
        if publisher >= ctx.publishers || seq >= ctx.messages {
            bail!("message from publisher {publisher} seq {seq}: not from this run");
        }
        let bit = res.offset + u64::from(publisher) * u64::from(ctx.messages) + u64::from(seq);
        let mask = 1u64 << (bit % 64);
        fresh = seen[(bit / 64) as usize].fetch_or(mask, Ordering::Relaxed) & mask == 0;
    }
    if fresh {
        res.received += 1;
        if ctx.window.is_none_or(|w| w.contains(ctx.base + Duration::from_nanos(now_ns))) {
            res.latency.record(now_ns.saturating_sub(sent) / 1000);
        }
        if ctx.received.fetch_add(1, Ordering::SeqCst) + 1 >= ctx.target.load(Ordering::SeqCst) {
            ctx.all_received.send_replace(true);
        }
    } else {
        res.duplicates += 1;
    }
    Ok(())
}

/// Declares the queue (again, after deleting it, if it exists with the other durability) and
/// purges it, on a connection of its own.
async fn setup_queue(addr: SocketAddr, args: &Args) -> anyhow::Result<String> {
    let mut conn = Conn::open(addr, "ferry-bench setup").await?;
    if args.fanout_queues > 0 {
        setup_fanout(&mut conn).await?;
        let server = conn.server.clone();
        conn.close().await;
        return Ok(server);
    }
    let declare = Method::QueueDeclare(QueueDeclare {
        queue: args.queue.as_str().into(),
        durable: args.persistent,
        ..QueueDeclare::default()
    });
    match conn.rpc(&declare).await {
        Ok(Method::QueueDeclareOk(_)) => {}
        Ok(other) => bail!("queue.declare: got {}", other.name()),
        Err(e) if e.downcast_ref::<ServerClose>().is_some_and(|c| !c.connection && c.code == 406) => {
            // PRECONDITION_FAILED: declared before with other flags. The channel is closed.
            conn.rpc(&Method::ChannelOpen(ChannelOpen::default())).await.context("channel.open")?;
            let delete =
                Method::QueueDelete(QueueDelete { queue: args.queue.as_str().into(), ..QueueDelete::default() });
            match conn.rpc(&delete).await.context("queue.delete")? {
                Method::QueueDeleteOk(_) => {}
                other => bail!("queue.delete: got {}", other.name()),
            }
            match conn.rpc(&declare).await.context("queue.declare after queue.delete")? {
                Method::QueueDeclareOk(_) => {}
                other => bail!("queue.declare: got {}", other.name()),
            }
        }
        Err(e) => return Err(e.context("queue.declare")),
    }
    let purge = Method::QueuePurge(QueuePurge { queue: args.queue.as_str().into(), ..QueuePurge::default() });
    match conn.rpc(&purge).await.context("queue.purge")? {
        Method::QueuePurgeOk(_) => {}
        other => bail!("queue.purge: got {}", other.name()),
    }
    let server = conn.server.clone();
    conn.close().await;
    Ok(server)
}

/// Declares [`FANOUT_EXCHANGE`] (again, after deleting it, if it exists with other flags).
async fn setup_fanout(conn: &mut Conn) -> anyhow::Result<()> {
    let declare = Method::ExchangeDeclare(ExchangeDeclare {
        exchange: FANOUT_EXCHANGE.into(),
        kind: "fanout".into(),
        auto_delete: true,
        ..ExchangeDeclare::default()
    });
    match conn.rpc(&declare).await {
        Ok(Method::ExchangeDeclareOk(_)) => Ok(()),
        Ok(other) => bail!("exchange.declare: got {}", other.name()),
        Err(e) if e.downcast_ref::<ServerClose>().is_some_and(|c| !c.connection && c.code == 406) => {
            conn.rpc(&Method::ChannelOpen(ChannelOpen::default())).await.context("channel.open")?;
            let delete = Method::ExchangeDelete(ExchangeDelete {
                exchange: FANOUT_EXCHANGE.into(),
                ..ExchangeDelete::default()
            });
            match conn.rpc(&delete).await.context("exchange.delete")? {
                Method::ExchangeDeleteOk(_) => {}
                other => bail!("exchange.delete: got {}", other.name()),
            }
            match conn.rpc(&declare).await.context("exchange.declare after exchange.delete")? {
                Method::ExchangeDeclareOk(_) => Ok(()),
                other => bail!("exchange.declare: got {}", other.name()),
            }
        }
        Err(e) => Err(e.context("exchange.declare")),
    }
}

/// Declares a server-named exclusive queue, binds it to `exchange` with `routing_key` and returns
/// its name.
pub(crate) async fn bind_exclusive_queue(conn: &mut Conn, exchange: &str, routing_key: &str) -> anyhow::Result<String> {
    let declare = Method::QueueDeclare(QueueDeclare { exclusive: true, auto_delete: true, ..QueueDeclare::default() });
    let queue = match conn.rpc(&declare).await.context("queue.declare")? {
        Method::QueueDeclareOk(ok) => ok.queue,
        other => bail!("queue.declare: got {}", other.name()),
    };
    let bind = Method::QueueBind(QueueBind {
        queue: queue.clone(),
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        ..QueueBind::default()
    });
    match conn.rpc(&bind).await.context("queue.bind")? {
        Method::QueueBindOk(_) => Ok(queue.to_string_lossy()),
        other => bail!("queue.bind: got {}", other.name()),
    }
}

/// Sets up the queue, the consumers (each consuming before any publisher starts), the publishers;
/// runs; reports.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    args.check()?;
    let addr = SocketAddr::new(args.host, args.port);
    let size = args.size as usize;
    let pid = std::process::id();
    let server = setup_queue(addr, args).await.context("setting up the queue")?;
    let ack_every = args.manual_ack.then(|| args.ack_batch());

    let mut setup = JoinSet::new();
    let fanout = args.fanout_queues > 0;
    for i in 0..args.consumer_count() {
        let queue = args.queue.clone();
        let (prefetch, no_ack) = (args.prefetch, !args.manual_ack);
        setup.spawn(async move {
            let mut conn = Conn::open(addr, &format!("fb{pid}-c{i}")).await?;
            let queue = if fanout { bind_exclusive_queue(&mut conn, FANOUT_EXCHANGE, "").await? } else { queue };
            let qos = Method::BasicQos(BasicQos { prefetch_count: prefetch, ..BasicQos::default() });
            match conn.rpc(&qos).await.context("basic.qos")? {
                Method::BasicQosOk(_) => {}
                other => bail!("basic.qos: got {}", other.name()),
            }
            let consume = Method::BasicConsume(BasicConsume {
                queue: queue.as_str().into(),
                consumer_tag: format!("fb{pid}-c{i}").into(),
                no_ack,
                ..BasicConsume::default()
            });
            match conn.rpc(&consume).await.context("basic.consume")? {
                Method::BasicConsumeOk(_) => Ok::<_, anyhow::Error>((i, conn)),
                other => bail!("basic.consume: got {}", other.name()),
            }
        });
    }
    let mut subs = join_all(setup).await.context("setting up consumers")?;
    subs.sort_by_key(|(i, _)| *i);

    let mut setup = JoinSet::new();
    let sndbuf = args.steady.sndbuf();
    for i in 0..args.publishers {
        setup.spawn(async move {
            let (conn, granted) = Conn::open_with(addr, &format!("fb{pid}-p{i}"), sndbuf)
                .await
                .with_context(|| format!("publisher {i}"))?;
            Ok((i, conn, granted))
        });
    }
    let mut pubs: Vec<(u32, Conn, Option<u32>)> = join_all(setup).await.context("setting up publishers")?;
    pubs.sort_by_key(|(i, _, _)| *i);
    let granted = pubs.first().and_then(|p| p.2);
    let pubs: Vec<(u32, Conn)> = pubs.into_iter().map(|(i, c, _)| (i, c)).collect();
    // Every connection negotiated the same frame max with the same server.
    let frame_max = pubs.first().map_or(FRAME_MIN_SIZE, |(_, c)| c.frame_max);
    let tpl = Arc::new(match fanout {
        true => Template::new(FANOUT_EXCHANGE, "", size, args.persistent, frame_max)?,
        false => Template::new("", &args.queue, size, args.persistent, frame_max)?,
    });

    let copies = if fanout { args.fanout_queues } else { u32::from(args.consumers > 0) };
    let cpu = CpuMeter::start();
    let base = Instant::now();
    let window = args.steady.window(base);
    let deadline = window.map_or(base, |w| w.stop_at) + Duration::from_secs(args.timeout);
    let settle = Duration::from_secs(args.settle);
    let ctx = Ctx::new(base, deadline, settle, args.publishers, args.messages(), copies, size)
        .with_rate(args.rate)
        .with_window(window);
    let ctx = Arc::new(Ctx { backlog: args.backlog, ..ctx });
    let measuring = window.map(|w| {
        let (c1, c2) = (ctx.clone(), ctx.clone());
        tokio::spawn(steady::measure(
            w,
            args.steady.pids.clone(),
            move || c1.sent.load(Ordering::Acquire),
            move || c2.received.load(Ordering::Acquire),
            args.steady.warmup,
        ))
    });

    let mut sub_tasks = JoinSet::new();
    for (i, conn) in subs {
        sub_tasks.spawn(consumer(conn, ctx.clone(), i, ack_every));
    }
    let window = args.confirm.then_some(args.window);
    let mut pub_tasks = JoinSet::new();
    for (i, conn) in pubs {
        pub_tasks.spawn(publisher(conn, ctx.clone(), i, tpl.clone(), window));
    }

    let mut sub_results = Vec::new();
    while let Some(r) = sub_tasks.join_next().await {
        sub_results.push(r.context("consumer task")?);
    }
    ctx.subs_done.send_replace(true);
    let mut pub_results = Vec::new();
    while let Some(r) = pub_tasks.join_next().await {
        pub_results.push(r.context("publisher task")?);
    }
    let cpu = cpu.stop();

    let mut report = report(args, server, &ctx, &pub_results, &sub_results);
    report.generator_cpu_secs = cpu.secs;
    report.generator_cpu_pct = cpu.pct;
    if let Some(task) = measuring {
        let mut m = task.await.context("window task")?;
        m.sndbuf_granted = granted;
        steady_report(&mut report, &m, &ctx, &pub_results, args.confirm);
        report.steady = Some(m);
    }
    if report.lost > 0 && !fanout {
        report.left_in_queue = queue_depth(addr, &args.queue).await.ok();
    }
    Ok(report)
}

/// Steady state: the window's rates, and the loss check: with confirms, every confirmed message
/// of every publisher must have reached every queue (message by message); without, the count
/// delivered against the count written.
fn steady_report(report: &mut Report, m: &Measured, ctx: &Ctx, pubs: &[PubResult], confirm: bool) {
    report.publish_secs = m.window_secs;
    report.publish_rate = m.publish_rate;
    report.delivery_secs = Some(m.window_secs);
    report.delivery_rate = Some(m.delivery_rate);
    let copies = u64::from(ctx.copies);
    if confirm {
        report.expected_deliveries = report.confirmed * copies;
        let mut lost = 0;
        let mut sample = Vec::new();
        for (pi, p) in pubs.iter().enumerate() {
            for c in 0..copies {
                let offset = c * ctx.copy_bits + pi as u64 * u64::from(ctx.messages);
                let has = |q: u32| match &ctx.seen {
                    Some(seen) => {
                        let bit = offset + u64::from(q);
                        seen.get((bit / 64) as usize)
                            .is_some_and(|w| w.load(Ordering::Relaxed) & (1u64 << (bit % 64)) != 0)
                    }
                    None => false,
                };
                let (n, runs) = steady::unreceived(&p.acked, has, 4);
                lost += n;
                for (from, to) in runs.into_iter().take(4usize.saturating_sub(sample.len())) {
                    sample.push(format!("queue {c} publisher {pi} seq {from}..={to} (confirmed)"));
                }
            }
        }
        report.lost = lost;
        report.missing_sample = sample;
    } else {
        report.expected_deliveries = report.sent * copies;
        report.lost = report.expected_deliveries.saturating_sub(report.deliveries);
    }
    report.loss_pct = if report.expected_deliveries > 0 {
        report.lost as f64 * 100.0 / report.expected_deliveries as f64
    } else {
        0.0
    };
    report.complete = report.lost == 0;
}

/// The queue's message count, by a passive queue.declare on a connection of its own.
async fn queue_depth(addr: SocketAddr, queue: &str) -> anyhow::Result<u32> {
    let mut conn = Conn::open(addr, "ferry-bench check").await?;
    let declare = Method::QueueDeclare(QueueDeclare { queue: queue.into(), passive: true, ..QueueDeclare::default() });
    let count = match conn.rpc(&declare).await? {
        Method::QueueDeclareOk(ok) => ok.message_count,
        other => bail!("queue.declare: got {}", other.name()),
    };
    conn.close().await;
    Ok(count)
}

async fn join_all<T: 'static>(mut set: JoinSet<anyhow::Result<T>>) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::with_capacity(set.len());
    while let Some(r) = set.join_next().await {
        out.push(r.context("setup task")??);
    }
    Ok(out)
}

fn report(args: &Args, server: String, ctx: &Ctx, pubs: &[PubResult], subs: &[SubResult]) -> Report {
    let first_send = pubs.iter().filter_map(|p| p.first_send).min();
    let last_send = pubs.iter().filter_map(|p| p.last_send).max();
    let last_delivery_ns = ctx.last_delivery_ns.load(Ordering::Acquire);
    let last_delivery = (last_delivery_ns > 0).then(|| ctx.base + Duration::from_nanos(last_delivery_ns));
    let sent: u64 = pubs.iter().map(|p| p.sent).sum();
    let secs = |from: Option<Instant>, to: Option<Instant>| match (from, to) {
        (Some(a), Some(b)) if b > a => Some(b.duration_since(a).as_secs_f64()),
        _ => None,
    };
    let publish_secs = secs(first_send, last_send).unwrap_or(0.0);
    let delivery_secs = secs(first_send, last_delivery);
    let deliveries: u64 = subs.iter().map(|s| s.received).sum();
    let lost = ctx.expected.saturating_sub(deliveries);
    let mut latency = Histogram::new();
    for s in subs {
        latency.merge(&s.latency);
    }
    let mut errors: Vec<String> = pubs.iter().filter_map(|p| p.error.clone()).collect();
    errors.extend(subs.iter().filter_map(|s| s.error.clone()));
    let missing_sample = match &ctx.seen {
        // Steady state: `steady_report` checks against what was confirmed instead.
        Some(seen) if lost > 0 && ctx.window.is_none() => {
            let bits: Vec<u64> = seen.iter().map(|w| w.load(Ordering::Relaxed)).collect();
            let copies = if ctx.copy_bits > 0 { args.fanout_queues } else { 1 };
            missing_ranges(&bits, ctx.publishers * copies, ctx.messages, 4)
                .into_iter()
                .map(|(p, from, to)| match ctx.copy_bits {
                    0 => format!("publisher {p} seq {from}..={to}"),
                    _ => format!("queue {} publisher {} seq {from}..={to}", p / ctx.publishers, p % ctx.publishers),
                })
                .collect()
        }
        _ => Vec::new(),
    };
    Report {
        broker: format!("{}:{}", args.host, args.port),
        server,
        publishers: args.publishers,
        consumers: args.consumer_count(),
        messages_per_publisher: args.messages,
        size: args.size,
        queue: args.queue.clone(),
        fanout_queues: (args.fanout_queues > 0).then_some(args.fanout_queues),
        persistent: args.persistent,
        rate: (args.rate > 0).then_some(args.rate),
        backlog: args.backlog,
        confirm_window: args.confirm.then_some(args.window),
        ack_every: args.manual_ack.then(|| args.ack_batch()),
        prefetch: args.prefetch,
        threads: args.threads,
        sent,
        confirmed: pubs.iter().map(|p| p.confirmed).sum(),
        nacked: pubs.iter().map(|p| p.nacked).sum(),
        unconfirmed: pubs.iter().map(|p| p.unconfirmed).sum(),
        expected_deliveries: ctx.expected,
        deliveries,
        duplicates: subs.iter().map(|s| s.duplicates).sum(),
        redelivered: subs.iter().map(|s| s.redelivered).sum(),
        lost,
        loss_pct: if ctx.expected > 0 { lost as f64 * 100.0 / ctx.expected as f64 } else { 0.0 },
        complete: lost == 0 && sent == u64::from(args.publishers) * u64::from(args.messages),
        timed_out: pubs.iter().any(|p| p.timed_out) || subs.iter().any(|s| s.timed_out),
        publish_secs,
        publish_rate: if publish_secs > 0.0 { sent as f64 / publish_secs } else { 0.0 },
        delivery_secs,
        delivery_rate: delivery_secs.map(|s| deliveries as f64 / s),
        latency_us: latency.summary(),
        steady: None,
        per_consumer_min: subs.iter().map(|s| s.received).min(),
        per_consumer_max: subs.iter().map(|s| s.received).max(),
        missing_sample,
        left_in_queue: None,
        generator_cpu_secs: 0.0,
        generator_cpu_pct: 0.0,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(dec: &FrameDecoder, buf: &mut BytesMut) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(f) = dec.decode(buf).unwrap() {
            frames.push(f);
        }
        frames
    }

    #[test]
    fn template_stamps_decode_back() {
        for (size, frame_max) in [(8usize, 4096u32), (16, 4096), (64, 131_072), (10_000, 4096), (300, 0)] {
            for persistent in [false, true] {
                let tpl = Template::new("", "bench.q", size, persistent, frame_max).unwrap();
                let mut out = BytesMut::new();
                tpl.write(&mut out, 0x0102_0304_0506_0708, 7, 42);
                tpl.write(&mut out, 99, 1, 2);
                let dec = FrameDecoder::new(if frame_max == 0 { 1 << 20 } else { frame_max });
                let frames = decode_all(&dec, &mut out);
                assert!(out.is_empty());
                let per_message = frames.len() / 2;
                for (n, msg) in frames.chunks(per_message).enumerate() {
                    let Frame::Method { channel: CH, payload } = &msg[0] else { panic!("not a method frame") };
                    let Method::BasicPublish(p) = Method::decode_payload(payload.clone()).unwrap() else {
                        panic!("not basic.publish")
                    };
                    assert_eq!(p.routing_key, "bench.q");
                    assert!(p.exchange.is_empty());
                    let Frame::Header { channel: CH, payload } = &msg[1] else { panic!("not a header frame") };
                    let h = ContentHeader::decode(payload.clone()).unwrap();
                    assert_eq!(h.body_size, size as u64);
                    assert_eq!(h.properties.delivery_mode, persistent.then_some(DeliveryMode::Persistent));
                    let body: Vec<u8> = msg[2..]
                        .iter()
                        .flat_map(|f| match f {
                            Frame::Body { channel: CH, payload } => payload.to_vec(),
                            other => panic!("not a body frame: {other:?}"),
                        })
                        .collect();
                    assert_eq!(body.len(), size);
                    let (ts, p, s) = if n == 0 { (0x0102_0304_0506_0708u64, 7u32, 42u32) } else { (99, 1, 2) };
                    assert_eq!(body[..8], ts.to_le_bytes());
                    if size >= 16 {
                        assert_eq!(body[8..12], p.to_le_bytes());
                        assert_eq!(body[12..16], s.to_le_bytes());
                    }
                }
            }
        }
    }

    #[test]
    fn confirms_single_multiple_and_out_of_order() {
        let mut c = Confirms::new();
        for _ in 0..10 {
            c.push();
        }
        assert_eq!(c.settle(3, false, true).unwrap(), 1);
        assert_eq!(c.pending, 9);
        assert_eq!(c.base, 1);
        assert_eq!(c.settle(5, true, false).unwrap(), 4); // 1, 2, 4, 5 nacked
        assert_eq!(c.base, 6);
        assert_eq!(c.settle(5, true, true).unwrap(), 0); // already settled: harmless
        assert!(c.settle(5, false, true).is_err());
        assert!(c.settle(11, false, true).is_err());
        assert!(c.settle(0, true, true).is_err());
        assert_eq!(c.settle(10, true, true).unwrap(), 5);
        assert_eq!(c.pending, 0);
        assert!(c.done.is_empty());
        c.push();
        assert_eq!(c.settle(11, false, true).unwrap(), 1);
        // Acked: tag 3 and 6..=11, i.e. sequence numbers 2 and 5..=10; the nacked ones are not.
        let acked: Vec<u32> = (0..12).filter(|q| c.acked.has(*q)).collect();
        assert_eq!(acked, vec![2, 5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn acks_batch_with_multiple_and_flush_the_tail() {
        let dec = FrameDecoder::new(4096);
        let mut out = BytesMut::new();
        let mut acks = Acks { every: Some(3), last_tag: 0, pending: 0 };
        for tag in 1..=7 {
            acks.delivered(tag, &mut out);
        }
        acks.flush(&mut out);
        let got: Vec<(u64, bool)> = decode_all(&dec, &mut out)
            .into_iter()
            .map(|f| match f {
                Frame::Method { payload, .. } => match Method::decode_payload(payload).unwrap() {
                    Method::BasicAck(a) => (a.delivery_tag, a.multiple),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, vec![(3, true), (6, true), (7, true)]);
        let mut acks = Acks { every: Some(1), last_tag: 0, pending: 0 };
        acks.delivered(1, &mut out);
        acks.delivered(2, &mut out);
        assert_eq!(decode_all(&dec, &mut out).len(), 2);
        let mut acks = Acks { every: None, last_tag: 0, pending: 0 };
        acks.delivered(1, &mut out);
        acks.flush(&mut out);
        assert!(out.is_empty());
    }
}

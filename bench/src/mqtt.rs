//! `ferry-bench mqtt`: S subscribers on one topic, P publishers sending N messages each, a minimal
//! client loop per connection on Ferry's codec (no client library), so the generator stays cheap
//! and can pipeline.
//!
//! Payload: bytes 0..8 are the send time (nanoseconds since the run's start, little-endian); when
//! `--size` is at least 16, bytes 8..12 are the publisher's index and 12..16 the message's
//! sequence number, which lets subscribers count duplicates; the rest is zero.
//!
//! Publishers encode one PUBLISH once as a template and stamp each copy in place (time, sequence,
//! packet id): no allocation per message. QoS 0 publishers write in batches of up to
//! [`BATCH_BYTES`]; QoS 1/2 publishers keep up to `--inflight` messages unacknowledged (less if an
//! MQTT 5 broker's Receive Maximum is lower). Subscribers answer PUBACK (QoS 1) or PUBREC, then
//! PUBCOMP on PUBREL (QoS 2), coalescing the answers of one read into one write.
//!
//! The run ends when every subscriber has every message, at `--timeout`, or `--settle` seconds
//! after the last publisher finished if no delivery arrives meanwhile (lost QoS 0 messages never
//! come, so there is no point waiting for the full timeout).
//!
//! Steady load: `--rate R` paces the publishers on an absolute schedule (R messages per second
//! over all of them; message `k` of a publisher is due `k / (R / P)` seconds after the start). A
//! publisher sleeps until its next message is due and never sends one early; one that fell behind
//! (the broker or the window held it back) sends the overdue messages in writes of at most
//! [`PACED_BURST`] worth each. The payload's timestamp is then the message's due time, not the
//! moment it was written, so a stall anywhere shows up as latency instead of as fewer
//! measurements (no coordinated omission). Tokio's timer has a 1 ms resolution, so a paced
//! message may be written up to about 1 ms after it is due; that counts as latency too. Unpaced,
//! the timestamp is the moment of the write.
//!
//! `--stall-subscribers`: the subscribers connect and subscribe, then never read again; they hold
//! their connections until `--settle` seconds after the publishers are done and then drop them.
//! Nothing is delivered to count, so the report counts only what was written: a broker's memory
//! ceiling with consumers that do not read (the caller samples its RSS meanwhile).
//!
//! Steady state (`--measure S`, see `steady.rs`): publishers send continuously (or at `--rate`)
//! through `--warmup` and the window, each over a socket with a bounded send buffer (`--sndbuf`),
//! then stop (QoS 1/2: once their window is acknowledged). The rates, the latencies and the CPU
//! figures (`--pid`) are those of the window: publishes written and deliveries received in it,
//! latencies of the messages received in it. Then the subscribers drain until they have every
//! message sent, or `--settle` seconds pass without a delivery, and each subscriber's messages
//! are checked against each publisher's acknowledged ones (PUBACK, PUBCOMP): at QoS 1/2 any of
//! those missing is a loss and the exit code 1; at QoS 0 the shortfall against what was sent is
//! reported. `--timeout` then counts from the end of the window.
//!
//! Persistent sessions (`--clean-session false`): each subscriber first connects with a clean
//! session under its client id (`<prefix>-s<i>`) and disconnects, which discards whatever an
//! earlier run left in that session, then connects again with clean session off (3.1.1) or clean
//! start off and a session expiry of one hour (5.0) and subscribes. Its messages then go through
//! the broker's store for persistent sessions. Publishers always use clean sessions.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::{Bytes, BytesMut};
use clap::builder::TypedValueParser as _;
use ferry_mqtt::codec::{
    encode, Connect, Decoder, Disconnect, Packet, Properties, ProtocolVersion, PubResp, Publish, QoS, Str, SubOptions,
    Subscribe,
};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};

use crate::histogram::{CpuMeter, Histogram, Latency};
use crate::pacing::{paced_allowed, paced_due};
use crate::steady::{self, Measured, Seen, SteadyArgs, Window, STEADY_CAP};

/// Bytes of PUBLISH a QoS 0 publisher encodes before it writes them.
pub const BATCH_BYTES: usize = 16 * 1024;
/// What one read asks the socket for.
const READ_CHUNK: usize = 64 * 1024;
/// CONNECT→CONNACK and SUBSCRIBE→SUBACK must each complete within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Best-effort DISCONNECT at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// With `--rate`: a publisher that fell behind its schedule writes at most this much of it at once.
const PACED_BURST: Duration = Duration::from_millis(5);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Broker address; loopback only (this is a load generator, keep it on the machine).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// QoS of the publishes and of the subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub publishers: u32,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub subscribers: u32,
    /// Messages per publisher.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub messages: u32,
    /// Payload bytes (at least 8, the timestamp; 16 or more also enables duplicate counting).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=16 * 1024 * 1024))]
    pub size: u32,
    /// Topic every publisher sends to and every subscriber subscribes to (no wildcards).
    #[arg(long, default_value = "bench/t")]
    pub topic: String,
    /// QoS 1/2: unacknowledged messages per publisher.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Subscribers' clean session flag (5.0: clean start); `false` makes persistent sessions
    /// (5.0: session expiry 3600 s), wiped by a clean connect first. Publishers are always clean.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub clean_session: bool,
    /// Client ids are `<prefix>-s<i>` (subscribers) and `<prefix>-p<i>` (publishers); default
    /// `fb<pid>`. A fixed prefix gives the same persistent sessions from run to run.
    #[arg(long)]
    pub client_id_prefix: Option<String>,
    /// MQTT version: 3 (3.1.1) or 5.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::PossibleValuesParser::new(["3", "5"]).map(|s| s.parse::<u8>().unwrap_or(3)))]
    pub version: u8,
    /// Seconds from the first send until the run is cut short and the shortfall reported.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
    /// Seconds without a delivery, once every publisher is done, after which the rest counts as lost.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub settle: u64,
    /// Publish this many messages per second over all publishers, on a fixed schedule; latency
    /// then counts from each message's due time (0: as fast as possible, from the write).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Subscribers connect and subscribe, then never read; they stay connected until --settle
    /// seconds after the publishers are done. Deliveries and losses are not counted.
    #[arg(long)]
    pub stall_subscribers: bool,
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
    /// Messages per publisher: --messages, or in steady state the cap.
    fn messages(&self) -> u32 {
        if self.steady.measure.is_some() {
            STEADY_CAP
        } else {
            self.messages
        }
    }
    fn protocol_version(&self) -> ProtocolVersion {
        if self.version == 5 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V311
        }
    }
    fn qos(&self) -> QoS {
        QoS::from_u8(self.qos).unwrap_or(QoS::AtMostOnce)
    }
    fn check(&self) -> anyhow::Result<()> {
        if !self.host.is_loopback() {
            bail!("--host {}: only loopback addresses are allowed", self.host);
        }
        if self.topic.is_empty() || self.topic.len() > 1024 || self.topic.contains(['+', '#', '\0']) {
            bail!("--topic must be 1 to 1024 bytes without '+', '#' or NUL");
        }
        if self.client_id_prefix.as_ref().is_some_and(|p| p.is_empty() || p.len() > 100) {
            bail!("--client-id-prefix must be 1 to 100 bytes");
        }
        self.steady.check()?;
        if self.steady.measure.is_some() && self.size < 16 {
            bail!("--measure needs --size 16 or more (the loss check needs sequence numbers)");
        }
        if self.steady.measure.is_some() && self.stall_subscribers {
            bail!("--measure cannot be combined with --stall-subscribers");
        }
        Ok(())
    }
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub broker: String,
    pub version: u8,
    pub qos: u8,
    pub publishers: u32,
    pub subscribers: u32,
    pub messages_per_publisher: u32,
    pub size: u32,
    pub topic: String,
    /// The subscribers' clean session flag (false: persistent sessions).
    pub clean_session: bool,
    /// QoS 1/2: the window used per publisher (the smallest over publishers).
    pub inflight: Option<u32>,
    pub threads: u32,
    /// --rate: messages per second over all publishers (None: unpaced).
    pub rate: Option<u32>,
    /// --stall-subscribers: the subscribers never read; deliveries and losses are not counted
    /// (`expected_deliveries`, `deliveries` and `lost` are 0) and `complete` means every message
    /// was written.
    pub stall_subscribers: bool,
    /// PUBLISH packets written.
    pub sent: u64,
    /// QoS 1/2: publishes the broker acknowledged (PUBACK, PUBCOMP) without refusing them.
    pub acked: u64,
    /// QoS 1/2: publishes the broker refused (reason code >= 0x80).
    pub rejected: u64,
    /// QoS 1/2: publishes still unacknowledged at the end.
    pub unacked: u64,
    /// Fixed count: publishers x messages x subscribers. Steady state: QoS 0 sent x subscribers,
    /// QoS 1/2 acked x subscribers.
    pub expected_deliveries: u64,
    /// Distinct messages received, over all subscribers.
    pub deliveries: u64,
    pub duplicates: u64,
    /// Expected and not received, over all subscribers (steady state, QoS 1/2: acknowledged
    /// messages some subscriber never received, checked message by message).
    pub lost: u64,
    pub loss_pct: f64,
    /// Every subscriber got every message (with --stall-subscribers: every message was written).
    pub complete: bool,
    /// The run hit `--timeout`.
    pub timed_out: bool,
    /// Fixed count: first write to last write. Steady state: the window.
    pub publish_secs: f64,
    pub publish_rate: f64,
    /// Fixed count: first write to last delivery. Steady state: the window.
    pub delivery_secs: Option<f64>,
    pub delivery_rate: Option<f64>,
    /// Steady state: of the messages received in the window only.
    pub latency_us: Latency,
    /// Steady state: what the window measured (`None`: a fixed-count run).
    pub steady: Option<Measured>,
    pub per_subscriber_min: Option<u64>,
    pub per_subscriber_max: Option<u64>,
    /// A few runs of missing messages (first subscribers with a loss), when payloads are 16 B or more.
    pub missing_sample: Vec<String>,
    /// CPU seconds (user + system) the generator used from the start of the run (everyone
    /// connected) to its end.
    pub generator_cpu_secs: f64,
    /// `generator_cpu_secs` / wall seconds x 100 (100: one core busy, 200: two).
    pub generator_cpu_pct: f64,
    pub errors: Vec<String>,
}

impl Report {
    /// 0: complete (or QoS 0, where loss is allowed and reported; or --stall-subscribers, where a
    /// broker's back-pressure is a result; or in steady state every acknowledged message
    /// received); 1: QoS 1/2 shortfall or errors.
    pub fn exit_code(&self) -> u8 {
        let ok = match self.steady {
            Some(_) => self.qos == 0 || self.lost == 0,
            None => self.complete || self.qos == 0 || self.stall_subscribers,
        };
        if self.errors.is_empty() && ok {
            0
        } else {
            1
        }
    }

    pub fn print_text(&self) {
        let w = self.inflight.map(|w| format!(", inflight {w}")).unwrap_or_default();
        let mut session = if self.clean_session { "" } else { " (persistent sessions)" }.to_string();
        if self.stall_subscribers {
            session.push_str(" (stalled: never read)");
        }
        let w = match self.rate {
            Some(r) => format!("{w}, {r} msgs/s"),
            None => w,
        };
        let n = match self.steady {
            Some(_) => "steady".to_string(),
            None => format!("{} msgs", self.messages_per_publisher),
        };
        println!(
            "mqtt {} v{} qos {}: {} publisher(s) x {n} -> {} subscriber(s){session}, {} B payload, topic {}{w}, {} thread(s)",
            self.broker,
            self.version,
            self.qos,
            self.publishers,
            self.subscribers,
            self.size,
            self.topic,
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
        if self.qos > 0 {
            println!("  acks:       {} acked, {} rejected, {} unacked", self.acked, self.rejected, self.unacked);
        }
        if let Some(m) = &self.steady {
            m.print_text();
        }
        let cpu = format!("{:.3} s CPU = {:.1} % (200 % = 2 cores)", self.generator_cpu_secs, self.generator_cpu_pct);
        if self.stall_subscribers {
            let total = u64::from(self.publishers) * u64::from(self.messages_per_publisher);
            println!(
                "  stalled:    {} subscriber(s) never read; {} of {} written{}",
                self.subscribers,
                self.sent,
                total,
                if self.timed_out { ", TIMED OUT" } else { "" }
            );
            println!("  generator:  {cpu}");
            for e in &self.errors {
                println!("  error:      {e}");
            }
            return;
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
            "  latency:    p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us{}",
            us(self.latency_us.p50),
            us(self.latency_us.p90),
            us(self.latency_us.p99),
            us(self.latency_us.p999),
            us(self.latency_us.max),
            match (self.rate.is_some(), self.steady.is_some()) {
                (true, true) => " (from the due time, received in the window)",
                (true, false) => " (from the due time)",
                (false, true) => " (received in the window)",
                (false, false) => "",
            }
        );
        println!("  per sub:    min {}, max {}", us(self.per_subscriber_min), us(self.per_subscriber_max));
        let note = if self.qos == 0 && self.lost > 0 { " (QoS 0: loss allowed)" } else { "" };
        println!(
            "  lost:       {} ({:.3} %){note}, duplicates {}{}",
            self.lost,
            self.loss_pct,
            self.duplicates,
            if self.timed_out { ", TIMED OUT" } else { "" }
        );
        for m in &self.missing_sample {
            println!("  missing:    {m}");
        }
        println!("  generator:  {cpu}");
        for e in &self.errors {
            println!("  error:      {e}");
        }
    }
}

/// Shared by every task of a run.
#[derive(Debug)]
struct Ctx {
    base: Instant,
    deadline: Instant,
    settle: Duration,
    qos: QoS,
    version: ProtocolVersion,
    messages: u32,
    /// Per subscriber: fixed count, publishers x messages; steady state, unknown (u64::MAX)
    /// until the publishers are done, then every message written.
    expected: AtomicU64,
    /// Steady state: the measure window; publishers stop at its end.
    window: Option<Window>,
    /// PUBLISHes written, over all publishers.
    sent_total: AtomicU64,
    /// Distinct deliveries, over all subscribers.
    received_total: AtomicU64,
    /// Sequence numbers in payloads (size >= 16).
    tracked: bool,
    publishers: u32,
    /// --rate per publisher, messages per second.
    pace: Option<f64>,
    /// With --rate: messages a publisher behind its schedule writes at once (PACED_BURST worth).
    burst: u32,
    /// Publishers still sending; the last one to finish flips `pubs_done`.
    sending: AtomicUsize,
    pubs_done: watch::Sender<bool>,
    subs_done: watch::Sender<bool>,
}

impl Ctx {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
    /// How many messages a publisher that has written `seq` may have written by now: all of them
    /// unpaced; with --rate those due, at most `burst` more than `seq`.
    fn allowed(&self, seq: u32) -> u32 {
        match self.pace {
            None => self.messages,
            Some(per_sec) => {
                paced_allowed(self.base.elapsed(), per_sec, self.messages).min(seq.saturating_add(self.burst))
            }
        }
    }
    /// With --rate: when message `seq` of a publisher is due.
    fn due(&self, seq: u32) -> Instant {
        match self.pace {
            None => self.base,
            Some(per_sec) => self.base + paced_due(seq, per_sec),
        }
    }
    /// The timestamp for message `seq`, in nanoseconds since `base`: its due time with --rate,
    /// else now.
    fn stamp(&self, seq: u32) -> u64 {
        match self.pace {
            None => self.now_ns(),
            Some(per_sec) => paced_due(seq, per_sec).as_nanos() as u64,
        }
    }
    fn publisher_finished(&self) {
        if self.sending.fetch_sub(1, Ordering::AcqRel) == 1 {
            if self.window.is_some() {
                self.expected.store(self.sent_total.load(Ordering::Acquire), Ordering::Release);
            }
            self.pubs_done.send_replace(true);
        }
    }
    /// Steady state: the window is over, publishers stop.
    fn stopping(&self) -> bool {
        self.window.is_some_and(|w| w.over(Instant::now()))
    }
    /// Whether a delivery at `now` counts in the latencies: all of them in a fixed-count run.
    fn measured(&self, now: Instant) -> bool {
        self.window.is_none_or(|w| w.contains(now))
    }
}

/// One MQTT connection: the socket, the decoder and the two buffers.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) dec: Decoder,
    pub(crate) rbuf: BytesMut,
    pub(crate) wbuf: BytesMut,
    version: ProtocolVersion,
}

impl Conn {
    /// Connects with a clean session.
    pub(crate) async fn open(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: String,
        max_packet: u32,
    ) -> anyhow::Result<(Conn, Properties)> {
        Conn::open_session(addr, version, client_id, max_packet, true).await.map(|(c, p, _)| (c, p))
    }

    /// Connects; with `clean` false the session persists (5.0: expiry 3600 s). Returns the
    /// CONNACK's properties and session-present flag.
    pub(crate) async fn open_session(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: String,
        max_packet: u32,
        clean: bool,
    ) -> anyhow::Result<(Conn, Properties, bool)> {
        let (conn, props, present, _) = Conn::open_with(addr, version, client_id, max_packet, clean, None).await?;
        Ok((conn, props, present))
    }

    /// [`Conn::open_session`] with SO_SNDBUF set to `sndbuf` before connecting; also returns
    /// the send buffer the kernel granted.
    pub(crate) async fn open_with(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: String,
        max_packet: u32,
        clean: bool,
        sndbuf: Option<u32>,
    ) -> anyhow::Result<(Conn, Properties, bool, Option<u32>)> {
        let (stream, granted) = steady::connect(addr, sndbuf, HANDSHAKE_TIMEOUT).await?;
        let mut conn = Conn {
            stream,
            dec: Decoder::with_version(max_packet, version),
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(BATCH_BYTES * 2),
            version,
        };
        let mut properties = Properties::default();
        if !clean && version == ProtocolVersion::V5 {
            properties.session_expiry_interval = Some(3600);
        }
        let connect = Connect {
            bridge: false,
            version,
            clean_start: clean,
            keep_alive: 0,
            client_id: Str::from(client_id),
            will: None,
            username: None,
            password: None,
            properties,
        };
        conn.send(&Packet::Connect(Box::new(connect))).await?;
        match timeout(HANDSHAKE_TIMEOUT, conn.next()).await.map_err(|_| anyhow!("CONNACK: timed out"))?? {
            Packet::ConnAck(ack) if ack.code == 0 => Ok((conn, ack.properties, ack.session_present, granted)),
            Packet::ConnAck(ack) => bail!("CONNACK refused with code 0x{:02X}", ack.code),
            other => bail!("expected CONNACK, got {}", name(&other)),
        }
    }

    pub(crate) async fn send(&mut self, p: &Packet) -> anyhow::Result<()> {
        self.wbuf.clear();
        encode(p, self.version, &mut self.wbuf);
        self.flush().await
    }

    pub(crate) async fn flush(&mut self) -> anyhow::Result<()> {
        self.stream.write_all(&self.wbuf).await.context("write")?;
        self.wbuf.clear();
        Ok(())
    }

    /// One read into `rbuf`; an error when the broker closed the connection.
    pub(crate) async fn read(stream: &mut TcpStream, rbuf: &mut BytesMut) -> anyhow::Result<()> {
        if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
            rbuf.reserve(READ_CHUNK);
        }
        match stream.read_buf(rbuf).await {
            Ok(0) => bail!("connection closed by the broker"),
            Ok(_) => Ok(()),
            Err(e) => Err(anyhow!("read: {e}")),
        }
    }

    pub(crate) async fn next(&mut self) -> anyhow::Result<Packet> {
        loop {
            if let Some(p) = self.dec.decode(&mut self.rbuf).map_err(|e| anyhow!("decode: {e}"))? {
                return Ok(p);
            }
            Conn::read(&mut self.stream, &mut self.rbuf).await?;
        }
    }

    /// Sends DISCONNECT and closes; errors do not matter any more.
    pub(crate) async fn close(mut self) {
        let d = Packet::Disconnect(Disconnect { reason: 0, properties: Properties::default() });
        let _ = timeout(CLOSE_TIMEOUT, async {
            let _ = self.send(&d).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

fn name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
        Packet::Auth(_) => "AUTH",
    }
}

pub(crate) fn disconnect_error(p: &Packet) -> anyhow::Error {
    match p {
        Packet::Disconnect(d) => anyhow!("broker sent DISCONNECT with reason 0x{:02X}", d.reason),
        other => anyhow!("unexpected {}", name(other)),
    }
}

/// One PUBLISH encoded once; copies are stamped in place.
#[derive(Debug)]
pub(crate) struct Template {
    bytes: Vec<u8>,
    /// Offset of the packet identifier (QoS 1/2).
    id_at: Option<usize>,
    payload_at: usize,
    tracked: bool,
}

impl Template {
    pub(crate) fn new(topic: &str, qos: QoS, version: ProtocolVersion, size: usize) -> Template {
        let publish = Publish {
            dup: false,
            qos,
            retain: false,
            topic: Str::from(topic),
            packet_id: (qos != QoS::AtMostOnce).then_some(1),
            properties: Properties::default(),
            payload: Bytes::from(vec![0u8; size]),
        };
        let mut out = BytesMut::new();
        encode(&Packet::Publish(publish), version, &mut out);
        let payload_at = out.len() - size;
        // Variable header: topic, packet id (QoS > 0), then in 5.0 the properties, empty = one 0 byte.
        let props = if version == ProtocolVersion::V5 { 1 } else { 0 };
        let id_at = (qos != QoS::AtMostOnce).then(|| payload_at - props - 2);
        Template { bytes: out.to_vec(), id_at, payload_at, tracked: size >= 16 }
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn write(&self, out: &mut BytesMut, sent_ns: u64, publisher: u32, seq: u32, packet_id: u16) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        let p = start + self.payload_at;
        out[p..p + 8].copy_from_slice(&sent_ns.to_le_bytes());
        if self.tracked {
            out[p + 8..p + 12].copy_from_slice(&publisher.to_le_bytes());
            out[p + 12..p + 16].copy_from_slice(&seq.to_le_bytes());
        }
        if let Some(at) = self.id_at {
            out[start + at..start + at + 2].copy_from_slice(&packet_id.to_be_bytes());
        }
    }
}

/// Packet identifiers in use by one publisher.
#[derive(Debug)]
pub(crate) struct Ids {
    used: Vec<bool>,
    next: u16,
}

impl Ids {
    pub(crate) fn new() -> Ids {
        Ids { used: vec![false; 65536], next: 1 }
    }
    /// A free identifier; the caller keeps fewer than 65,535 in use.
    pub(crate) fn take(&mut self) -> u16 {
        while self.used[self.next as usize] {
            self.next = self.next.checked_add(1).unwrap_or(1);
        }
        let id = self.next;
        self.used[id as usize] = true;
        self.next = self.next.checked_add(1).unwrap_or(1);
        id
    }
    /// False when `id` was not in use.
    pub(crate) fn release(&mut self, id: u16) -> bool {
        std::mem::replace(&mut self.used[id as usize], false)
    }
}

#[derive(Debug, Default)]
struct PubResult {
    first_send: Option<Instant>,
    last_send: Option<Instant>,
    sent: u64,
    /// QoS 1/2: the sequence numbers acknowledged without a refusal.
    acked: Seen,
    rejected: u64,
    unacked: u64,
    window: u32,
    timed_out: bool,
    error: Option<String>,
}

async fn publisher(mut conn: Conn, ctx: Arc<Ctx>, index: u32, topic: String, size: usize, window: u32) -> PubResult {
    let mut res = PubResult { window, ..PubResult::default() };
    let run = if ctx.qos == QoS::AtMostOnce {
        publish_qos0(&mut conn, &ctx, index, &topic, size, &mut res).await
    } else {
        publish_windowed(&mut conn, &ctx, index, &topic, size, window, &mut res).await
    };
    if let Err(e) = run {
        res.error = Some(format!("publisher {index}: {e:#}"));
    }
    ctx.publisher_finished();
    // Stay connected until the subscribers are done, so that closing cannot race the last messages.
    let mut done = ctx.subs_done.subscribe();
    let _ = timeout_at(ctx.deadline + ctx.settle, done.wait_for(|d| *d)).await;
    conn.close().await;
    res
}

async fn publish_qos0(
    conn: &mut Conn,
    ctx: &Ctx,
    index: u32,
    topic: &str,
    size: usize,
    res: &mut PubResult,
) -> anyhow::Result<()> {
    let tpl = Template::new(topic, QoS::AtMostOnce, ctx.version, size);
    let mut seq = 0u32;
    while seq < ctx.messages {
        if ctx.stopping() {
            return Ok(());
        }
        if Instant::now() >= ctx.deadline {
            res.timed_out = true;
            break;
        }
        let limit = ctx.allowed(seq);
        if seq >= limit {
            // Paced (--rate): wait for the next message's turn.
            sleep_until(ctx.due(seq).min(ctx.deadline)).await;
            continue;
        }
        conn.wbuf.clear();
        let mut batch = 0u32;
        while seq < limit && (batch == 0 || conn.wbuf.len() + tpl.len() <= BATCH_BYTES) {
            tpl.write(&mut conn.wbuf, ctx.stamp(seq), index, seq, 0);
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
        steady::add(&ctx.sent_total, u64::from(batch));
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

async fn publish_windowed(
    conn: &mut Conn,
    ctx: &Ctx,
    index: u32,
    topic: &str,
    size: usize,
    window: u32,
    res: &mut PubResult,
) -> anyhow::Result<()> {
    let tpl = Template::new(topic, ctx.qos, ctx.version, size);
    let mut ids = Ids::new();
    // The sequence number each packet identifier in flight carries.
    let mut seq_of = vec![0u32; 65536];
    let mut seq = 0u32;
    let mut inflight = 0u32;
    loop {
        let mut wrote_publishes = false;
        let stopped = ctx.stopping();
        let limit = if stopped { seq } else { ctx.allowed(seq) };
        while seq < limit && inflight < window {
            let id = ids.take();
            seq_of[usize::from(id)] = seq;
            tpl.write(&mut conn.wbuf, ctx.stamp(seq), index, seq, id);
            seq += 1;
            inflight += 1;
            wrote_publishes = true;
        }
        if !conn.wbuf.is_empty() {
            if wrote_publishes {
                res.first_send.get_or_insert_with(Instant::now);
            }
            match timeout_at(ctx.deadline, conn.flush()).await {
                Ok(r) => r?,
                Err(_) => {
                    res.timed_out = true;
                    break;
                }
            }
            if wrote_publishes {
                steady::add(&ctx.sent_total, u64::from(seq) - res.sent);
                res.sent = u64::from(seq);
                res.last_send = Some(Instant::now());
            }
        }
        if inflight == 0 && (seq == ctx.messages || stopped) {
            break;
        }
        // Paced (--rate) with room in the window: also wake when the next message is due (if
        // that is before the deadline).
        let paced = !stopped && seq < ctx.messages && seq >= limit && inflight < window && ctx.due(seq) < ctx.deadline;
        let stop_at = ctx.window.map_or(ctx.deadline, |w| w.stop_at);
        tokio::select! {
            r = Conn::read(&mut conn.stream, &mut conn.rbuf) => r?,
            _ = sleep_until(ctx.due(seq)), if paced => continue,
            _ = sleep_until(stop_at), if !stopped && ctx.window.is_some() => continue,
            _ = sleep_until(ctx.deadline) => {
                res.timed_out = true;
                break;
            }
        }
        while let Some(p) = conn.dec.decode(&mut conn.rbuf).map_err(|e| anyhow!("decode: {e}"))? {
            match p {
                Packet::PubAck(r) if ctx.qos == QoS::AtLeastOnce => {
                    if !ids.release(r.packet_id) {
                        bail!("PUBACK for packet id {} not in flight", r.packet_id);
                    }
                    inflight -= 1;
                    if r.reason >= 0x80 {
                        res.rejected += 1;
                    } else {
                        res.acked.insert(seq_of[usize::from(r.packet_id)]);
                    }
                }
                Packet::PubRec(r) if ctx.qos == QoS::ExactlyOnce => {
                    if r.reason >= 0x80 {
                        if !ids.release(r.packet_id) {
                            bail!("PUBREC for packet id {} not in flight", r.packet_id);
                        }
                        inflight -= 1;
                        res.rejected += 1;
                    } else {
                        encode(&Packet::PubRel(PubResp::ok(r.packet_id)), ctx.version, &mut conn.wbuf);
                    }
                }
                Packet::PubComp(r) if ctx.qos == QoS::ExactlyOnce => {
                    if !ids.release(r.packet_id) {
                        bail!("PUBCOMP for packet id {} not in flight", r.packet_id);
                    }
                    inflight -= 1;
                    res.acked.insert(seq_of[usize::from(r.packet_id)]);
                }
                Packet::PingResp => {}
                other => return Err(disconnect_error(&other)),
            }
        }
    }
    res.unacked = u64::from(inflight);
    cap_reached(ctx, seq)
}

/// Up to `limit` runs of messages missing from `seen`, as (publisher, first seq, last seq).
pub(crate) fn missing_ranges(seen: &[u64], publishers: u32, messages: u32, limit: usize) -> Vec<(u32, u32, u32)> {
    let mut out = Vec::new();
    if seen.is_empty() {
        return out;
    }
    let has = |bit: u64| seen[(bit / 64) as usize] & (1 << (bit % 64)) != 0;
    for p in 0..publishers {
        let base = u64::from(p) * u64::from(messages);
        let mut seq = 0;
        while seq < messages && out.len() < limit {
            if has(base + u64::from(seq)) {
                seq += 1;
                continue;
            }
            let from = seq;
            while seq < messages && !has(base + u64::from(seq)) {
                seq += 1;
            }
            out.push((p, from, seq - 1));
        }
    }
    out
}

#[derive(Debug)]
struct SubResult {
    /// A few runs of missing messages, for diagnosis.
    missing: Vec<String>,
    /// Per publisher, the sequence numbers received (empty when payloads carry none).
    seen: Vec<Seen>,
    /// Distinct messages (all messages when payloads carry no sequence number).
    received: u64,
    duplicates: u64,
    latency: Histogram,
    last_delivery: Option<Instant>,
    timed_out: bool,
    error: Option<String>,
}

async fn subscriber(mut conn: Conn, ctx: Arc<Ctx>, index: u32) -> SubResult {
    let mut res = SubResult {
        missing: Vec::new(),
        seen: Vec::new(),
        received: 0,
        duplicates: 0,
        latency: Histogram::new(),
        last_delivery: None,
        timed_out: false,
        error: None,
    };
    let mut seen: Vec<Seen> = if ctx.tracked { vec![Seen::default(); ctx.publishers as usize] } else { Vec::new() };
    if let Err(e) = receive(&mut conn, &ctx, &mut res, &mut seen).await {
        res.error = Some(format!("subscriber {index}: {e:#}"));
    }
    if ctx.window.is_none() {
        // Steady state: `run` checks against what was acknowledged instead.
        res.missing = seen
            .iter()
            .enumerate()
            .flat_map(|(p, s)| s.missing(ctx.messages, 4).into_iter().map(move |r| (p, r)))
            .take(4)
            .map(|(p, (from, to))| format!("subscriber {index} publisher {p} seq {from}..={to}"))
            .collect();
    }
    res.seen = seen;
    conn.close().await;
    res
}

/// --stall-subscribers: subscribed, never reads; holds the connection until `--settle` seconds after
/// the publishers are done (or the deadline), then drops it without a DISCONNECT.
async fn stalled_subscriber(conn: Conn, ctx: Arc<Ctx>) -> SubResult {
    let mut pubs_done = ctx.pubs_done.subscribe();
    let _ = timeout_at(ctx.deadline, pubs_done.wait_for(|d| *d)).await;
    tokio::time::sleep(ctx.settle).await;
    drop(conn);
    SubResult {
        missing: Vec::new(),
        seen: Vec::new(),
        received: 0,
        duplicates: 0,
        latency: Histogram::new(),
        last_delivery: None,
        timed_out: false,
        error: None,
    }
}

/// `seen`: per publisher, the sequence numbers received, when payloads carry them, else empty.
async fn receive(conn: &mut Conn, ctx: &Ctx, res: &mut SubResult, seen: &mut [Seen]) -> anyhow::Result<()> {
    let mut pubs_done = ctx.pubs_done.subscribe();
    let mut quiet_since: Option<Instant> = None;
    let mut pending_rel = 0u64;
    while res.received < ctx.expected.load(Ordering::Acquire) || pending_rel > 0 {
        let wake = match quiet_since {
            Some(t) => (t + ctx.settle).min(ctx.deadline),
            None => ctx.deadline,
        };
        tokio::select! {
            r = Conn::read(&mut conn.stream, &mut conn.rbuf) => r?,
            _ = sleep_until(wake) => {
                res.timed_out = wake == ctx.deadline;
                return Ok(());
            }
            _ = pubs_done.wait_for(|d| *d), if quiet_since.is_none() => {
                quiet_since = Some(Instant::now());
                continue;
            }
        }
        let now = Instant::now();
        let now_ns = now.duration_since(ctx.base).as_nanos() as u64;
        if quiet_since.is_some() {
            quiet_since = Some(now);
        }
        let measured = ctx.measured(now);
        let before = res.received;
        while let Some(p) = conn.dec.decode(&mut conn.rbuf).map_err(|e| anyhow!("decode: {e}"))? {
            match p {
                Packet::Publish(p) => {
                    let payload = &p.payload[..];
                    if payload.len() < 8 {
                        bail!("PUBLISH with a {}-byte payload (not from this run)", payload.len());
                    }
                    let sent = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                    let mut fresh = true;
                    if ctx.tracked && payload.len() >= 16 {
                        let publisher = u32::from_le_bytes(payload[8..12].try_into().unwrap_or_default());
                        let seq = u32::from_le_bytes(payload[12..16].try_into().unwrap_or_default());
                        if publisher >= ctx.publishers || seq >= ctx.messages {
                            bail!("PUBLISH from publisher {publisher} seq {seq}: not from this run");
                        }
                        fresh = seen[publisher as usize].insert(seq);
                    }
                    if fresh {
                        res.received += 1;
                        if measured {
                            res.latency.record(now_ns.saturating_sub(sent) / 1000);
                        }
                        res.last_delivery = Some(now);
                    } else {
                        res.duplicates += 1;
                    }
                    match (p.qos, p.packet_id) {
                        (QoS::AtLeastOnce, Some(id)) => {
                            encode(&Packet::PubAck(PubResp::ok(id)), ctx.version, &mut conn.wbuf)
                        }
                        (QoS::ExactlyOnce, Some(id)) => {
                            pending_rel += 1;
                            encode(&Packet::PubRec(PubResp::ok(id)), ctx.version, &mut conn.wbuf)
                        }
                        _ => {}
                    }
                }
                Packet::PubRel(r) => {
                    pending_rel = pending_rel.saturating_sub(1);
                    encode(&Packet::PubComp(PubResp::ok(r.packet_id)), ctx.version, &mut conn.wbuf);
                }
                Packet::PingResp => {}
                other => return Err(disconnect_error(&other)),
            }
        }
        steady::add(&ctx.received_total, res.received - before);
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
    Ok(())
}

/// Connects and subscribes S subscribers, connects P publishers, runs, reports.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    args.check()?;
    let addr = SocketAddr::new(args.host, args.port);
    let version = args.protocol_version();
    let qos = args.qos();
    let size = args.size as usize;
    let max_packet = (size + args.topic.len() + 1024).max(READ_CHUNK) as u32;
    let prefix = args.client_id_prefix.clone().unwrap_or_else(|| format!("fb{}", std::process::id()));
    let clean = args.clean_session;

    // Subscribers first, each subscribed before any publisher starts.
    let mut setup = JoinSet::new();
    for i in 0..args.subscribers {
        let topic = args.topic.clone();
        let client_id = format!("{prefix}-s{i}");
        setup.spawn(async move {
            if !clean {
                // Discard what an earlier run left in this session: a clean connect, then DISCONNECT.
                let (old, _) = Conn::open(addr, version, client_id.clone(), max_packet)
                    .await
                    .with_context(|| format!("subscriber {i}: clean connect"))?;
                old.close().await;
            }
            let (mut conn, _, present) = Conn::open_session(addr, version, client_id, max_packet, clean)
                .await
                .with_context(|| format!("subscriber {i}"))?;
            if present {
                bail!("subscriber {i}: CONNACK says a session is present after it was discarded");
            }
            let opts = SubOptions { qos, ..SubOptions::default() };
            let sub = Subscribe {
                packet_id: 1,
                properties: Properties::default(),
                filters: vec![(Str::from(topic.as_str()), opts)],
            };
            conn.send(&Packet::Subscribe(sub)).await?;
            match timeout(HANDSHAKE_TIMEOUT, conn.next()).await.map_err(|_| anyhow!("SUBACK: timed out"))?? {
                Packet::SubAck(ack) => match ack.reasons.first() {
                    Some(&granted) if granted == qos as u8 => Ok::<_, anyhow::Error>((i, conn)),
                    Some(&code) => bail!("SUBACK for QoS {} returned 0x{code:02X}", qos as u8),
                    None => bail!("SUBACK without a reason code"),
                },
                other => bail!("expected SUBACK, got {}", name(&other)),
            }
            .with_context(|| format!("subscriber {i}"))
        });
    }
    let mut subs = join_all(setup).await.context("setting up subscribers")?;
    subs.sort_by_key(|(i, _)| *i);

    let mut setup = JoinSet::new();
    let sndbuf = args.steady.sndbuf();
    for i in 0..args.publishers {
        let client_id = format!("{prefix}-p{i}");
        setup.spawn(async move {
            let (conn, props, _, granted) = Conn::open_with(addr, version, client_id, max_packet, true, sndbuf)
                .await
                .with_context(|| format!("publisher {i}"))?;
            Ok((i, conn, props.receive_maximum, granted))
        });
    }
    let mut pubs = join_all(setup).await.context("setting up publishers")?;
    pubs.sort_by_key(|(i, _, _, _)| *i);
    let granted = pubs.first().and_then(|p| p.3);

    let pace = (args.rate > 0).then(|| f64::from(args.rate) / f64::from(args.publishers));
    let cpu = CpuMeter::start();
    let base = Instant::now();
    let window = args.steady.window(base);
    let messages = args.messages();
    let ctx = Arc::new(Ctx {
        base,
        deadline: window.map_or(base, |w| w.stop_at) + Duration::from_secs(args.timeout),
        settle: Duration::from_secs(args.settle),
        qos,
        version,
        messages,
        expected: AtomicU64::new(match window {
            Some(_) => u64::MAX,
            None => u64::from(args.publishers) * u64::from(args.messages),
        }),
        window,
        sent_total: AtomicU64::new(0),
        received_total: AtomicU64::new(0),
        tracked: size >= 16,
        publishers: args.publishers,
        pace,
        burst: pace.map_or(u32::MAX, |per_sec| (per_sec * PACED_BURST.as_secs_f64()).ceil().clamp(1.0, 1e9) as u32),
        sending: AtomicUsize::new(args.publishers as usize),
        pubs_done: watch::channel(false).0,
        subs_done: watch::channel(false).0,
    });

    let mut sub_tasks = JoinSet::new();
    for (i, conn) in subs {
        if args.stall_subscribers {
            sub_tasks.spawn(stalled_subscriber(conn, ctx.clone()));
        } else {
            sub_tasks.spawn(subscriber(conn, ctx.clone(), i));
        }
    }
    let measuring = window.map(|w| {
        let (c1, c2) = (ctx.clone(), ctx.clone());
        tokio::spawn(steady::measure(
            w,
            args.steady.pids.clone(),
            move || c1.sent_total.load(Ordering::Acquire),
            move || c2.received_total.load(Ordering::Acquire),
            args.steady.warmup,
        ))
    });
    let mut pub_tasks = JoinSet::new();
    for (i, conn, receive_max, _) in pubs {
        let window = u32::from(args.inflight.min(receive_max.unwrap_or(u16::MAX)).min(u16::MAX - 1));
        pub_tasks.spawn(publisher(conn, ctx.clone(), i, args.topic.clone(), size, window));
    }

    let mut sub_results = Vec::new();
    while let Some(r) = sub_tasks.join_next().await {
        sub_results.push(r.context("subscriber task")?);
    }
    ctx.subs_done.send_replace(true);
    let mut pub_results = Vec::new();
    while let Some(r) = pub_tasks.join_next().await {
        pub_results.push(r.context("publisher task")?);
    }
    let cpu = cpu.stop();

    let mut report = report(args, &ctx, &pub_results, &sub_results);
    report.generator_cpu_secs = cpu.secs;
    report.generator_cpu_pct = cpu.pct;
    if let Some(task) = measuring {
        let mut m = task.await.context("window task")?;
        m.sndbuf_granted = granted;
        steady_report(&mut report, &m, &pub_results, &sub_results);
        report.steady = Some(m);
    }
    Ok(report)
}

/// Steady state: the window's rates, and the loss check of every subscriber against every
/// publisher's acknowledged messages (QoS 1/2) or the count written (QoS 0).
fn steady_report(report: &mut Report, m: &Measured, pubs: &[PubResult], subs: &[SubResult]) {
    report.publish_secs = m.window_secs;
    report.publish_rate = m.publish_rate;
    report.delivery_secs = Some(m.window_secs);
    report.delivery_rate = Some(m.delivery_rate);
    let n_subs = subs.len() as u64;
    if report.qos == 0 {
        report.expected_deliveries = report.sent * n_subs;
        report.lost = report.expected_deliveries.saturating_sub(report.deliveries);
    } else {
        report.expected_deliveries = report.acked * n_subs;
        let mut lost = 0;
        let mut sample = Vec::new();
        for (si, sub) in subs.iter().enumerate() {
            for (pi, p) in pubs.iter().enumerate() {
                let (n, runs) = match sub.seen.get(pi) {
                    Some(seen) => steady::unreceived(&p.acked, |q| seen.has(q), 4),
                    None => steady::unreceived(&p.acked, |_| false, 4),
                };
                lost += n;
                for (from, to) in runs.into_iter().take(4usize.saturating_sub(sample.len())) {
                    sample.push(format!("subscriber {si} publisher {pi} seq {from}..={to} (acknowledged)"));
                }
            }
        }
        report.lost = lost;
        report.missing_sample = sample;
    }
    report.loss_pct = if report.expected_deliveries > 0 {
        report.lost as f64 * 100.0 / report.expected_deliveries as f64
    } else {
        0.0
    };
    report.complete = report.lost == 0;
}

async fn join_all<T: 'static>(mut set: JoinSet<anyhow::Result<T>>) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::with_capacity(set.len());
    while let Some(r) = set.join_next().await {
        out.push(r.context("setup task")??);
    }
    Ok(out)
}

fn report(args: &Args, ctx: &Ctx, pubs: &[PubResult], subs: &[SubResult]) -> Report {
    let first_send = pubs.iter().filter_map(|p| p.first_send).min();
    let last_send = pubs.iter().filter_map(|p| p.last_send).max();
    let last_delivery = subs.iter().filter_map(|s| s.last_delivery).max();
    let sent: u64 = pubs.iter().map(|p| p.sent).sum();
    let secs = |from: Option<Instant>, to: Option<Instant>| match (from, to) {
        (Some(a), Some(b)) if b > a => Some(b.duration_since(a).as_secs_f64()),
        _ => None,
    };
    let publish_secs = secs(first_send, last_send).unwrap_or(0.0);
    let delivery_secs = secs(first_send, last_delivery);
    let deliveries: u64 = subs.iter().map(|s| s.received).sum();
    let stalled = args.stall_subscribers;
    let expected =
        if stalled { 0 } else { ctx.expected.load(Ordering::Acquire).saturating_mul(u64::from(args.subscribers)) };
    let lost = expected.saturating_sub(deliveries);
    let mut latency = Histogram::new();
    for s in subs {
        latency.merge(&s.latency);
    }
    let mut errors: Vec<String> = pubs.iter().filter_map(|p| p.error.clone()).collect();
    errors.extend(subs.iter().filter_map(|s| s.error.clone()));
    Report {
        broker: format!("{}:{}", args.host, args.port),
        version: args.version,
        qos: args.qos,
        publishers: args.publishers,
        subscribers: args.subscribers,
        messages_per_publisher: args.messages,
        size: args.size,
        topic: args.topic.clone(),
        clean_session: args.clean_session,
        inflight: (args.qos > 0).then(|| pubs.iter().map(|p| p.window).min().unwrap_or(0)),
        threads: args.threads,
        rate: (args.rate > 0).then_some(args.rate),
        stall_subscribers: stalled,
        sent,
        acked: pubs.iter().map(|p| p.acked.count()).sum(),
        rejected: pubs.iter().map(|p| p.rejected).sum(),
        unacked: pubs.iter().map(|p| p.unacked).sum(),
        expected_deliveries: expected,
        deliveries,
        duplicates: subs.iter().map(|s| s.duplicates).sum(),
        lost,
        loss_pct: if expected > 0 { lost as f64 * 100.0 / expected as f64 } else { 0.0 },
        complete: lost == 0 && sent == u64::from(args.publishers) * u64::from(args.messages),
        timed_out: pubs.iter().any(|p| p.timed_out) || subs.iter().any(|s| s.timed_out),
        publish_secs,
        publish_rate: if publish_secs > 0.0 { sent as f64 / publish_secs } else { 0.0 },
        delivery_secs,
        delivery_rate: delivery_secs.map(|s| deliveries as f64 / s),
        latency_us: latency.summary(),
        steady: None,
        per_subscriber_min: subs.iter().map(|s| s.received).min().filter(|_| !stalled),
        per_subscriber_max: subs.iter().map(|s| s.received).max().filter(|_| !stalled),
        missing_sample: subs.iter().flat_map(|s| s.missing.iter().cloned()).take(4).collect(),
        generator_cpu_secs: 0.0,
        generator_cpu_pct: 0.0,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_stamps_decode_back() {
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                for size in [8usize, 16, 64, 300] {
                    let tpl = Template::new("bench/t", qos, version, size);
                    let mut out = BytesMut::new();
                    tpl.write(&mut out, 0x0102_0304_0506_0708, 7, 42, 513);
                    tpl.write(&mut out, 99, 1, 2, 65535);
                    let mut dec = Decoder::with_version(1 << 20, version);
                    let Some(Packet::Publish(p)) = dec.decode(&mut out).unwrap() else { panic!("not a publish") };
                    assert_eq!(p.topic.as_str(), "bench/t");
                    assert_eq!(p.qos, qos);
                    assert_eq!(p.payload.len(), size);
                    assert_eq!(p.payload[..8], 0x0102_0304_0506_0708u64.to_le_bytes());
                    if size >= 16 {
                        assert_eq!(p.payload[8..12], 7u32.to_le_bytes());
                        assert_eq!(p.payload[12..16], 42u32.to_le_bytes());
                    }
                    assert_eq!(p.packet_id, (qos != QoS::AtMostOnce).then_some(513));
                    let Some(Packet::Publish(p)) = dec.decode(&mut out).unwrap() else { panic!("not a publish") };
                    assert_eq!(p.packet_id, (qos != QoS::AtMostOnce).then_some(65535));
                    assert!(out.is_empty());
                }
            }
        }
    }

    #[test]
    fn missing_ranges_lists_runs() {
        // 2 publishers x 100 messages; publisher 0 misses 10..=19, publisher 1 misses 99.
        let mut seen = vec![0u64; 200usize.div_ceil(64)];
        for bit in (0..200u64).filter(|b| !(10..20).contains(b) && *b != 199) {
            seen[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        assert_eq!(missing_ranges(&seen, 2, 100, 4), vec![(0, 10, 19), (1, 99, 99)]);
        assert_eq!(missing_ranges(&seen, 2, 100, 1), vec![(0, 10, 19)]);
        assert!(missing_ranges(&[], 2, 100, 4).is_empty());
    }

    #[test]
    fn ids_are_unique_while_in_use() {
        let mut ids = Ids::new();
        let a = ids.take();
        let b = ids.take();
        assert_ne!(a, b);
        assert!(ids.release(a));
        assert!(!ids.release(a));
        for _ in 0..70_000 {
            let id = ids.take();
            assert_ne!(id, 0);
            assert_ne!(id, b);
            ids.release(id);
        }
    }
}

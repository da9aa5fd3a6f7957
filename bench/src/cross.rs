//! `ferry-bench cross`: MQTT in, AMQP out. An AMQP consumer declares a server-named exclusive
//! queue, binds it to `amq.topic` with the routing key of the MQTT topic (`bench/cross` →
//! `bench.cross`: `/` and `.` swapped, as Ferry and RabbitMQ map them) and consumes it (no-ack, or
//! `--manual-ack`); then P MQTT 3.1.1 publishers send N messages each to the topic at `--qos`.
//!
//! The pieces are those of the other two scenarios: the AMQP connection, consumer and run
//! context of `ferry-bench amqp` (`crate::amqp`), the MQTT connection, PUBLISH template and
//! packet ids of `ferry-bench mqtt` (`crate::mqtt`). The payload is the same in both (bytes 0..8
//! the send time in nanoseconds since the run's start, little-endian; with `--size` ≥ 16 also the
//! publisher's index and the sequence number), and the broker hands the MQTT payload to the AMQP
//! consumer unchanged as the body, so the consumer counts duplicates and measures latency as in
//! the AMQP scenario.
//!
//! Publishers: QoS 0 writes batches of up to [`mqtt::BATCH_BYTES`]; QoS 1/2 keeps `--inflight`
//! messages unacknowledged. `--rate R` paces them (R messages per second over all publishers,
//! message `k` of a publisher due at `k / (R / P)` s); a paced message is stamped with its due
//! time, so a stall shows up as latency rather than as fewer messages.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use ferry_amqp::codec::{BasicConsume, BasicQos, Method};
use ferry_mqtt::codec::{encode, Packet, ProtocolVersion, PubResp, QoS};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::amqp::{self, Ctx};
use crate::histogram::{CpuMeter, Histogram, Latency};
use crate::mqtt::{self, Ids, Template};

/// The exchange MQTT publishes go to (Ferry's default `mqtt_exchange`, RabbitMQ's MQTT plugin's).
const MQTT_EXCHANGE: &str = "amq.topic";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Broker address; loopback only (this is a load generator, keep it on the machine).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// The broker's MQTT port (the publishers).
    #[arg(long, default_value_t = 1883)]
    pub mqtt_port: u16,
    /// The broker's AMQP port (the consumer).
    #[arg(long, default_value_t = 5672)]
    pub amqp_port: u16,
    /// QoS of the MQTT publishes.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub publishers: u32,
    /// Messages per publisher.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub messages: u32,
    /// Payload bytes (at least 8, the timestamp; 16 or more also enables duplicate counting).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=16 * 1024 * 1024))]
    pub size: u32,
    /// MQTT topic (no wildcards); the AMQP binding key is the topic with `/` and `.` swapped.
    #[arg(long, default_value = "bench/cross")]
    pub topic: String,
    /// QoS 1/2: unacknowledged messages per publisher.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Publish at most this many messages per second over all publishers (0: as fast as the
    /// broker, the window and the socket allow).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// The AMQP consumer acknowledges (basic.ack multiple=true every --ack-every deliveries)
    /// instead of consuming with no-ack.
    #[arg(long)]
    pub manual_ack: bool,
    /// With --manual-ack: deliveries per ack. Capped at half the prefetch.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub ack_every: u32,
    /// basic.qos prefetch-count of the AMQP consumer (0: unlimited).
    #[arg(long, default_value_t = 200)]
    pub prefetch: u16,
    /// Seconds from the first send until the run is cut short and the shortfall reported.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
    /// Seconds without a delivery, once every publisher is done, after which the rest counts as lost.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub settle: u64,
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
        if self.topic.is_empty() || self.topic.len() > 255 || self.topic.contains(['+', '#', '\0']) {
            bail!("--topic must be 1 to 255 bytes without '+', '#' or NUL");
        }
        Ok(())
    }

    fn qos(&self) -> QoS {
        QoS::from_u8(self.qos).unwrap_or(QoS::AtLeastOnce)
    }

    /// The AMQP routing key of the MQTT topic: `/` and `.` swapped.
    fn routing_key(&self) -> String {
        ferry_mqtt::topic::swap_separators(&self.topic)
    }

    fn ack_batch(&self) -> Option<u32> {
        self.manual_ack.then(|| match self.prefetch {
            0 => self.ack_every,
            p => self.ack_every.min((u32::from(p) / 2).max(1)),
        })
    }
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// host:port of the MQTT listener.
    pub mqtt_broker: String,
    /// host:port of the AMQP listener.
    pub amqp_broker: String,
    /// The server's `product` and `version` from connection.start.
    pub server: String,
    pub qos: u8,
    pub publishers: u32,
    pub messages_per_publisher: u32,
    pub size: u32,
    pub topic: String,
    pub routing_key: String,
    /// --rate: messages per second over all publishers (None: unpaced).
    pub rate: Option<u32>,
    /// QoS 1/2: the window per publisher.
    pub inflight: Option<u32>,
    /// With --manual-ack: deliveries per `basic.ack multiple=true` (None: no-ack).
    pub ack_every: Option<u32>,
    pub prefetch: u16,
    pub threads: u32,
    /// PUBLISH packets written.
    pub sent: u64,
    /// QoS 1/2: publishes the broker refused (reason code >= 0x80).
    pub rejected: u64,
    /// QoS 1/2: publishes still unacknowledged at the end.
    pub unacked: u64,
    pub expected_deliveries: u64,
    /// Distinct messages the AMQP consumer received.
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
    pub latency_us: Latency,
    /// CPU seconds (user + system) the generator used from the first send to the end.
    pub generator_cpu_secs: f64,
    /// `generator_cpu_secs` / wall seconds x 100 (100: one core busy, 200: two).
    pub generator_cpu_pct: f64,
    pub errors: Vec<String>,
}

impl Report {
    /// 0: complete (or QoS 0, where loss is allowed and reported); 1: QoS 1/2 shortfall or errors.
    pub fn exit_code(&self) -> u8 {
        u8::from(!(self.errors.is_empty() && (self.complete || self.qos == 0)))
    }

    pub fn print_text(&self) {
        let mut mode = Vec::new();
        if let Some(r) = self.rate {
            mode.push(format!("{r} msgs/s"));
        }
        if let Some(w) = self.inflight {
            mode.push(format!("inflight {w}"));
        }
        mode.push(match self.ack_every {
            Some(n) => format!("manual ack (every {n})"),
            None => "no-ack".to_string(),
        });
        println!(
            "cross mqtt {} qos {} -> amqp {} ({}): {} publisher(s) x {} msgs, topic {} -> {} key {}, {} B, {}, prefetch {}, {} thread(s)",
            self.mqtt_broker,
            self.qos,
            self.amqp_broker,
            self.server,
            self.publishers,
            self.messages_per_publisher,
            self.topic,
            MQTT_EXCHANGE,
            self.routing_key,
            self.size,
            mode.join(", "),
            self.prefetch,
            self.threads
        );
        println!("  publish:    {} sent in {:.3} s = {:.0} msgs/s", self.sent, self.publish_secs, self.publish_rate);
        if self.qos > 0 {
            println!("  acks:       {} rejected, {} unacked", self.rejected, self.unacked);
        }
        match (self.delivery_secs, self.delivery_rate) {
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
            "  latency:    p50 {} us, p99 {} us, max {} us",
            us(self.latency_us.p50),
            us(self.latency_us.p99),
            us(self.latency_us.max)
        );
        let note = if self.qos == 0 && self.lost > 0 { " (QoS 0: loss allowed)" } else { "" };
        println!(
            "  lost:       {} ({:.3} %){note}, duplicates {}, redelivered {}{}",
            self.lost,
            self.loss_pct,
            self.duplicates,
            self.redelivered,
            if self.timed_out { ", TIMED OUT" } else { "" }
        );
        println!("  generator:  {:.3} CPU s, {:.0} %", self.generator_cpu_secs, self.generator_cpu_pct);
        for e in &self.errors {
            println!("  error:      {e}");
        }
    }
}

/// The consumer first (bound and consuming), then the publishers; runs; reports.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    args.check()?;
    let mqtt_addr = SocketAddr::new(args.host, args.mqtt_port);
    let amqp_addr = SocketAddr::new(args.host, args.amqp_port);
    let size = args.size as usize;
    let pid = std::process::id();
    let qos = args.qos();
    let routing_key = args.routing_key();

    let mut consumer = amqp::Conn::open(amqp_addr, &format!("fb{pid}-cross")).await.context("AMQP consumer")?;
    let queue = amqp::bind_exclusive_queue(&mut consumer, MQTT_EXCHANGE, &routing_key).await?;
    let basic_qos = Method::BasicQos(BasicQos { prefetch_count: args.prefetch, ..BasicQos::default() });
    match consumer.rpc(&basic_qos).await.context("basic.qos")? {
        Method::BasicQosOk(_) => {}
        other => bail!("basic.qos: got {}", other.name()),
    }
    let consume = Method::BasicConsume(BasicConsume {
        queue: queue.as_str().into(),
        consumer_tag: format!("fb{pid}-cross").into(),
        no_ack: !args.manual_ack,
        ..BasicConsume::default()
    });
    match consumer.rpc(&consume).await.context("basic.consume")? {
        Method::BasicConsumeOk(_) => {}
        other => bail!("basic.consume: got {}", other.name()),
    }
    let server = consumer.server.clone();

    let max_packet = (size + args.topic.len() + 1024).max(64 * 1024) as u32;
    let mut setup = JoinSet::new();
    for i in 0..args.publishers {
        setup.spawn(async move {
            let (conn, _) = mqtt::Conn::open(mqtt_addr, ProtocolVersion::V311, format!("fb{pid}-x{i}"), max_packet)
                .await
                .with_context(|| format!("MQTT publisher {i}"))?;
            anyhow::Ok((i, conn))
        });
    }
    let mut pubs = Vec::new();
    while let Some(r) = setup.join_next().await {
        pubs.push(r.context("setup task")??);
    }
    pubs.sort_by_key(|(i, _)| *i);

    let window = u32::from(args.inflight.min(u16::MAX - 1));
    let tpl = Arc::new(Template::new(&args.topic, qos, ProtocolVersion::V311, size));
    let cpu = CpuMeter::start();
    let base = Instant::now();
    let deadline = base + Duration::from_secs(args.timeout);
    let settle = Duration::from_secs(args.settle);
    let ctx = Arc::new(Ctx::new(base, deadline, settle, args.publishers, args.messages, 1, size).with_rate(args.rate));

    let sub = tokio::spawn(amqp::consumer(consumer, ctx.clone(), 0, args.ack_batch()));
    let mut pub_tasks = JoinSet::new();
    for (i, conn) in pubs {
        let p = Publisher { ctx: ctx.clone(), index: i, tpl: tpl.clone(), qos, window, paced: args.rate > 0 };
        pub_tasks.spawn(p.run(conn));
    }
    let sub = sub.await.context("consumer task")?;
    ctx.subs_done.send_replace(true);
    let mut pub_results = Vec::new();
    while let Some(r) = pub_tasks.join_next().await {
        pub_results.push(r.context("publisher task")?);
    }
    let cpu = cpu.stop();

    let first_send = pub_results.iter().filter_map(|p| p.first_send).min();
    let last_send = pub_results.iter().filter_map(|p| p.last_send).max();
    let last_delivery_ns = ctx.last_delivery_ns.load(Ordering::Acquire);
    let last_delivery = (last_delivery_ns > 0).then(|| ctx.base + Duration::from_nanos(last_delivery_ns));
    let secs = |from: Option<Instant>, to: Option<Instant>| match (from, to) {
        (Some(a), Some(b)) if b > a => Some(b.duration_since(a).as_secs_f64()),
        _ => None,
    };
    let publish_secs = secs(first_send, last_send).unwrap_or(0.0);
    let delivery_secs = secs(first_send, last_delivery);
    let sent: u64 = pub_results.iter().map(|p| p.sent).sum();
    let lost = ctx.expected.saturating_sub(sub.received);
    let mut latency = Histogram::new();
    latency.merge(&sub.latency);
    let mut errors: Vec<String> = pub_results.iter().filter_map(|p| p.error.clone()).collect();
    errors.extend(sub.error.clone());
    Ok(Report {
        mqtt_broker: mqtt_addr.to_string(),
        amqp_broker: amqp_addr.to_string(),
        server,
        qos: args.qos,
        publishers: args.publishers,
        messages_per_publisher: args.messages,
        size: args.size,
        topic: args.topic.clone(),
        routing_key,
        rate: (args.rate > 0).then_some(args.rate),
        inflight: (args.qos > 0).then_some(window),
        ack_every: args.ack_batch(),
        prefetch: args.prefetch,
        threads: args.threads,
        sent,
        rejected: pub_results.iter().map(|p| p.rejected).sum(),
        unacked: pub_results.iter().map(|p| p.unacked).sum(),
        expected_deliveries: ctx.expected,
        deliveries: sub.received,
        duplicates: sub.duplicates,
        redelivered: sub.redelivered,
        lost,
        loss_pct: if ctx.expected > 0 { lost as f64 * 100.0 / ctx.expected as f64 } else { 0.0 },
        complete: lost == 0 && sent == u64::from(args.publishers) * u64::from(args.messages),
        timed_out: sub.timed_out || pub_results.iter().any(|p| p.timed_out),
        publish_secs,
        publish_rate: if publish_secs > 0.0 { sent as f64 / publish_secs } else { 0.0 },
        delivery_secs,
        delivery_rate: delivery_secs.map(|s| sub.received as f64 / s),
        latency_us: latency.summary(),
        generator_cpu_secs: cpu.secs,
        generator_cpu_pct: cpu.pct,
        errors,
    })
}

#[derive(Debug, Default)]
struct PubResult {
    first_send: Option<Instant>,
    last_send: Option<Instant>,
    sent: u64,
    rejected: u64,
    unacked: u64,
    timed_out: bool,
    error: Option<String>,
}

/// One MQTT publisher of the run.
#[derive(Debug)]
struct Publisher {
    ctx: Arc<Ctx>,
    index: u32,
    tpl: Arc<Template>,
    qos: QoS,
    /// QoS 1/2: messages unacknowledged at most.
    window: u32,
    /// --rate: stamp each message with its due time.
    paced: bool,
}

impl Publisher {
    async fn run(self, mut conn: mqtt::Conn) -> PubResult {
        let mut res = PubResult::default();
        if let Err(e) = self.publish(&mut conn, &mut res).await {
            res.error = Some(format!("publisher {}: {e:#}", self.index));
        }
        self.ctx.publisher_finished();
        // Stay connected until the consumer is done, so that closing cannot race the last messages.
        let mut done = self.ctx.subs_done.subscribe();
        let _ = timeout_at(self.ctx.deadline + self.ctx.settle, done.wait_for(|d| *d)).await;
        conn.close().await;
        res
    }

    async fn publish(&self, conn: &mut mqtt::Conn, res: &mut PubResult) -> anyhow::Result<()> {
        let ctx = &*self.ctx;
        let acked = self.qos != QoS::AtMostOnce;
        let mut ids = Ids::new();
        let mut seq = 0u32;
        let mut inflight = 0u32;
        loop {
            let limit = ctx.allowed();
            let mut wrote = 0u32;
            while seq < limit && (!acked || inflight < self.window) && conn.wbuf.len() < mqtt::BATCH_BYTES {
                let sent_ns = match self.paced {
                    true => ctx.due(seq).duration_since(ctx.base).as_nanos() as u64,
                    false => ctx.now_ns(),
                };
                let id = if acked { ids.take() } else { 0 };
                self.tpl.write(&mut conn.wbuf, sent_ns, self.index, seq, id);
                seq += 1;
                wrote += 1;
                inflight += u32::from(acked);
            }
            if !conn.wbuf.is_empty() {
                if wrote > 0 {
                    res.first_send.get_or_insert_with(Instant::now);
                }
                match timeout_at(ctx.deadline, conn.flush()).await {
                    Ok(r) => r?,
                    Err(_) => {
                        res.timed_out = true;
                        break;
                    }
                }
                if wrote > 0 {
                    res.sent += u64::from(wrote);
                    res.last_send = Some(Instant::now());
                }
            }
            if seq == ctx.messages && inflight == 0 {
                break;
            }
            // Room to write more now (a write is capped at BATCH_BYTES).
            if seq < limit && (!acked || inflight < self.window) {
                continue;
            }
            // Paced with room in the window: also wake when the next message is due.
            let paced = seq < ctx.messages && seq >= limit && (!acked || inflight < self.window);
            tokio::select! {
                r = mqtt::Conn::read(&mut conn.stream, &mut conn.rbuf) => r?,
                _ = sleep_until(ctx.due(seq).min(ctx.deadline)), if paced => continue,
                _ = sleep_until(ctx.deadline) => {
                    res.timed_out = true;
                    break;
                }
            }
            while let Some(p) = conn.dec.decode(&mut conn.rbuf).map_err(|e| anyhow!("decode: {e}"))? {
                match p {
                    Packet::PubAck(r) if self.qos == QoS::AtLeastOnce => {
                        if !ids.release(r.packet_id) {
                            bail!("PUBACK for packet id {} not in flight", r.packet_id);
                        }
                        inflight -= 1;
                        res.rejected += u64::from(r.reason >= 0x80);
                    }
                    Packet::PubRec(r) if self.qos == QoS::ExactlyOnce => {
                        if r.reason >= 0x80 {
                            if !ids.release(r.packet_id) {
                                bail!("PUBREC for packet id {} not in flight", r.packet_id);
                            }
                            inflight -= 1;
                            res.rejected += 1;
                        } else {
                            encode(&Packet::PubRel(PubResp::ok(r.packet_id)), ProtocolVersion::V311, &mut conn.wbuf);
                        }
                    }
                    Packet::PubComp(r) if self.qos == QoS::ExactlyOnce => {
                        if !ids.release(r.packet_id) {
                            bail!("PUBCOMP for packet id {} not in flight", r.packet_id);
                        }
                        inflight -= 1;
                    }
                    Packet::PingResp => {}
                    other => return Err(mqtt::disconnect_error(&other)),
                }
            }
        }
        res.unacked = u64::from(inflight);
        Ok(())
    }
}

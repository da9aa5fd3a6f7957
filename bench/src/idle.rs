//! `ferry-bench idle`: N idle MQTT connections, to measure what a connection costs the broker.
//!
//! Opens N connections (MQTT 3.1.1, or 5.0 with `--mqtt-version 5`; clean session, client ids
//! `<prefix>-<n>`, default prefix `idle`; with `--subscribe`, each then subscribes at QoS 1 to its
//! own command topic `devices/<client id>/cmd` and waits for the SUBACK, as a real device does), at most
//! `--rate` new ones per second so that neither the broker's accept-rate limit nor the kernel's
//! listen backlog decides the outcome, and waits for every CONNACK (or error). Then it prints one
//! line `ready <connected>` on stdout (flushed), for a script to sample the broker's memory, holds
//! the connections for `--hold` seconds, sending nothing but a PINGREQ every keep-alive / 2 (and
//! reading nothing but the PINGRESPs), then sends DISCONNECT on each, closes them and reports.
//!
//! Each connection is one task holding its socket and a 32-byte read buffer: the CONNECT is
//! encoded into a small buffer that is dropped once written, so the generator's memory per idle
//! connection is the task, the socket and its timer (well under a kilobyte).
//!
//! At start the process's RLIMIT_NOFILE soft limit is raised to the hard limit; a run that needs
//! more descriptors than that fails before it connects anything. One source address gives at
//! most as many connections to one broker port as `net.ipv4.ip_local_port_range` has ports
//! (28,232 by default): `--sources K` spreads the connections over the loopback source
//! addresses 127.0.0.1 … 127.0.0.K.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::BytesMut;
use ferry_mqtt::codec::{
    encode, Connect, Decoder, Packet, Properties, ProtocolVersion, QoS, Str, SubOptions, Subscribe,
};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// TCP connect + CONNECT → CONNACK must complete within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// DISCONNECT and close of all connections at the end, at most.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// File descriptors the process needs besides the connections (stdio, epoll, the runtime).
const SPARE_FDS: u64 = 64;
/// Error texts kept for the report.
const ERROR_SAMPLES: usize = 4;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Broker address; loopback only (this is a load generator, keep it on the machine).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub connections: u32,
    /// Seconds to hold the connections once all are connected.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub hold: u64,
    /// Keep-alive in the CONNECT, seconds; a PINGREQ goes out every keep-alive / 2 while holding
    /// (0: no keep-alive, no PINGREQ).
    #[arg(long, default_value_t = 60)]
    pub keep_alive: u16,
    /// New connections per second at most (0: all at once).
    #[arg(long, default_value_t = 2000)]
    pub rate: u32,
    /// Client ids are `<prefix>-<n>`, n from 0.
    #[arg(long, default_value = "idle")]
    pub client_id_prefix: String,
    /// MQTT version: 3 (3.1.1) or 5.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(3..=5))]
    pub mqtt_version: u8,
    /// After the CONNACK, subscribe at QoS 1 to `devices/<client id>/cmd` and wait for the SUBACK
    /// (a connection counts as connected once subscribed).
    #[arg(long)]
    pub subscribe: bool,
    /// Spread the connections over the source addresses 127.0.0.1 … 127.0.0.K (round robin),
    /// for more connections than one address has ephemeral ports. 1: let the kernel choose.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub sources: u8,
    /// Tokio worker threads of the generator.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,
    /// Print the report as one JSON object instead of text (the `ready` line is printed anyway).
    #[arg(long)]
    pub json: bool,
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub broker: String,
    pub connections: u32,
    /// 3 (3.1.1) or 5.
    pub mqtt_version: u8,
    /// Each connection subscribed to `devices/<client id>/cmd` at QoS 1.
    pub subscribe: bool,
    pub sources: u8,
    pub keep_alive: u16,
    /// --rate (None: unpaced).
    pub rate: Option<u32>,
    pub hold_secs: u64,
    pub threads: u32,
    /// RLIMIT_NOFILE soft limit after raising it.
    pub nofile_limit: Option<u64>,
    /// CONNACK 0 received.
    pub connected: u64,
    /// CONNACK with a non-zero return code (or a SUBACK refusing the subscription).
    pub refused: u64,
    /// Connection failed, timed out or closed before a CONNACK.
    pub errors: u64,
    /// From the first connect to the last CONNACK (or error).
    pub connect_secs: f64,
    /// connected / connect_secs.
    pub connect_rate: f64,
    /// Refusals by CONNACK return code, as "code: count".
    pub refused_codes: Vec<String>,
    /// Connections the broker closed (or that failed) while they were held.
    pub dropped: u64,
    pub pings_sent: u64,
    pub pings_answered: u64,
    /// Bytes received while holding that were not PINGRESP.
    pub unexpected_bytes: u64,
    /// From the end of the hold until every connection was closed.
    pub close_secs: f64,
    /// The first few errors (connect and hold).
    pub error_sample: Vec<String>,
}

impl Report {
    /// 0: every connection connected and held; 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(!(self.connected == u64::from(self.connections) && self.dropped == 0))
    }

    pub fn print_text(&self) {
        let rate = self.rate.map(|r| format!("{r}/s")).unwrap_or_else(|| "unpaced".into());
        println!(
            "idle {}: {} MQTT {} connection(s){}, keep-alive {} s, connect rate {rate}, hold {} s, {} thread(s), nofile {}",
            self.broker,
            self.connections,
            if self.mqtt_version == 5 { "5.0" } else { "3.1.1" },
            if self.subscribe { " with one subscription each" } else { "" },
            self.keep_alive,
            self.hold_secs,
            self.threads,
            self.nofile_limit.map(|n| n.to_string()).unwrap_or_else(|| "unlimited".into())
        );
        println!(
            "  connect:    {} connected, {} refused, {} errors in {:.3} s = {:.0} conn/s",
            self.connected, self.refused, self.errors, self.connect_secs, self.connect_rate
        );
        if !self.refused_codes.is_empty() {
            println!("  refused:    {}", self.refused_codes.join(", "));
        }
        println!(
            "  hold:       {} dropped, {} PINGREQ sent, {} answered, {} unexpected bytes",
            self.dropped, self.pings_sent, self.pings_answered, self.unexpected_bytes
        );
        println!("  close:      {:.3} s", self.close_secs);
        for e in &self.error_sample {
            println!("  error:      {e}");
        }
    }
}

/// How one connection's handshake ended.
#[derive(Debug)]
enum Outcome {
    Connected,
    Refused(u8),
    Error(String),
}

/// Counters of the hold phase, shared by every connection.
#[derive(Debug, Default)]
struct Hold {
    /// Set before the connections are told to close: a read error after it is not a drop.
    closing: AtomicBool,
    dropped: AtomicU64,
    pings_sent: AtomicU64,
    pings_answered: AtomicU64,
    unexpected_bytes: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Hold {
    fn error(&self, e: String) {
        if let Ok(mut v) = self.errors.lock() {
            if v.len() < ERROR_SAMPLES {
                v.push(e);
            }
        }
    }
}

/// Raises the RLIMIT_NOFILE soft limit to the hard limit; returns the soft limit in force
/// (None: unlimited).
fn raise_nofile() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let raised = Rlimit { current: lim.maximum, maximum: lim.maximum };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            eprintln!("ferry-bench: raising RLIMIT_NOFILE to the hard limit: {e}");
        }
    }
    getrlimit(Resource::Nofile).current
}

pub async fn run(args: &Args) -> anyhow::Result<Report> {
    if !args.host.is_loopback() {
        bail!("--host {}: only loopback addresses are allowed", args.host);
    }
    if args.mqtt_version == 4 {
        bail!("--mqtt-version must be 3 (3.1.1) or 5");
    }
    if args.sources > 1 && args.host != IpAddr::V4(Ipv4Addr::LOCALHOST) {
        bail!("--sources needs --host 127.0.0.1");
    }
    if args.client_id_prefix.is_empty() || args.client_id_prefix.len() > 100 {
        bail!("--client-id-prefix must be 1 to 100 bytes");
    }
    let nofile = raise_nofile();
    let needed = u64::from(args.connections) + SPARE_FDS;
    if let Some(limit) = nofile.filter(|&l| l < needed) {
        bail!(
            "--connections {} needs about {needed} file descriptors, but RLIMIT_NOFILE is {limit} (the hard \
             limit): raise it (`ulimit -Hn`, limits.conf, LimitNOFILE=) or open fewer connections",
            args.connections
        );
    }
    let addr = SocketAddr::new(args.host, args.port);
    let n = args.connections;
    let version = if args.mqtt_version == 5 { ProtocolVersion::V5 } else { ProtocolVersion::V311 };
    let sources = args.sources;
    let hold = Arc::new(Hold::default());
    let (close_tx, close_rx) = watch::channel(false);
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();

    // Spawn the connections at --rate, checking every millisecond how many are due.
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    let mut spawned = 0u32;
    while spawned < n {
        let due = match args.rate {
            0 => n,
            r => ((start.elapsed().as_secs_f64() * f64::from(r)) as u64 + 1).min(u64::from(n)) as u32,
        };
        while spawned < due {
            let client_id = format!("{}-{spawned}", args.client_id_prefix);
            let source =
                (sources > 1).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (spawned % u32::from(sources)) as u8)));
            let how = How { addr, source, version, keep_alive: args.keep_alive, subscribe: args.subscribe };
            tasks.spawn(connection(how, client_id, tx.clone(), close_rx.clone(), hold.clone()));
            spawned += 1;
        }
        if spawned < n {
            sleep(Duration::from_millis(1)).await;
        }
    }
    drop(tx);

    let (mut connected, mut refused, mut errors) = (0u64, 0u64, 0u64);
    let mut codes = std::collections::BTreeMap::<u8, u64>::new();
    let mut error_sample = Vec::new();
    for _ in 0..n {
        match rx.recv().await {
            Some(Outcome::Connected) => connected += 1,
            Some(Outcome::Refused(code)) => {
                refused += 1;
                *codes.entry(code).or_default() += 1;
            }
            Some(Outcome::Error(e)) => {
                errors += 1;
                if error_sample.len() < ERROR_SAMPLES {
                    error_sample.push(e);
                }
            }
            // Every task reports once before it can end; a panicked task reports nothing.
            None => {
                errors += 1;
                break;
            }
        }
    }
    let connect_secs = start.elapsed().as_secs_f64();
    println!("ready {connected}");
    std::io::stdout().flush().context("stdout")?;

    sleep(Duration::from_secs(args.hold)).await;
    let closing = Instant::now();
    hold.closing.store(true, Ordering::Release);
    close_tx.send_replace(true);
    let all_closed = timeout(CLOSE_TIMEOUT, async {
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                hold.error(format!("connection task: {e}"));
            }
        }
    })
    .await;
    if all_closed.is_err() {
        hold.error(format!("{} connection(s) not closed within {CLOSE_TIMEOUT:?}", tasks.len()));
        tasks.abort_all();
    }
    let close_secs = closing.elapsed().as_secs_f64();
    if let Ok(v) = hold.errors.lock() {
        error_sample.extend(v.iter().cloned());
    }

    Ok(Report {
        broker: addr.to_string(),
        connections: n,
        mqtt_version: args.mqtt_version,
        subscribe: args.subscribe,
        sources: args.sources,
        keep_alive: args.keep_alive,
        rate: (args.rate > 0).then_some(args.rate),
        hold_secs: args.hold,
        threads: args.threads,
        nofile_limit: nofile,
        connected,
        refused,
        errors,
        connect_secs,
        connect_rate: if connect_secs > 0.0 { connected as f64 / connect_secs } else { 0.0 },
        refused_codes: codes.iter().map(|(c, k)| format!("0x{c:02X}: {k}")).collect(),
        dropped: hold.dropped.load(Ordering::Relaxed),
        pings_sent: hold.pings_sent.load(Ordering::Relaxed),
        pings_answered: hold.pings_answered.load(Ordering::Relaxed),
        unexpected_bytes: hold.unexpected_bytes.load(Ordering::Relaxed),
        close_secs,
        error_sample,
    })
}

/// How to connect.
#[derive(Debug, Clone, Copy)]
struct How {
    addr: SocketAddr,
    /// Source address to bind (None: the kernel's choice).
    source: Option<IpAddr>,
    version: ProtocolVersion,
    keep_alive: u16,
    subscribe: bool,
}

/// Connects, reports the outcome, then (if connected) holds the connection until `close`.
async fn connection(
    how: How,
    client_id: String,
    tx: mpsc::UnboundedSender<Outcome>,
    mut close: watch::Receiver<bool>,
    hold: Arc<Hold>,
) {
    let keep_alive = how.keep_alive;
    let mut stream = match timeout(HANDSHAKE_TIMEOUT, handshake(how, &client_id)).await {
        Ok(Ok(Ok(stream))) => {
            let _ = tx.send(Outcome::Connected);
            stream
        }
        Ok(Ok(Err(code))) => {
            let _ = tx.send(Outcome::Refused(code));
            return;
        }
        Ok(Err(e)) => {
            let _ = tx.send(Outcome::Error(format!("{client_id}: {e:#}")));
            return;
        }
        Err(_) => {
            let _ = tx.send(Outcome::Error(format!("{client_id}: no CONNACK within {HANDSHAKE_TIMEOUT:?}")));
            return;
        }
    };
    drop(tx);
    drop(client_id);

    let ping_every = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 500));
    let mut next_ping = ping_every.map(|p| Instant::now() + p);
    let mut buf = [0u8; 32];
    // A PINGRESP split over two reads: its first byte was seen.
    let mut half = false;
    loop {
        tokio::select! {
            r = stream.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    if !hold.closing.load(Ordering::Acquire) {
                        hold.dropped.fetch_add(1, Ordering::Relaxed);
                        let why = match r {
                            Err(e) => format!("read: {e}"),
                            _ => "closed by the broker".into(),
                        };
                        hold.error(format!("while holding: {why}"));
                    }
                    return;
                }
                Ok(len) => {
                    for &b in &buf[..len] {
                        match (half, b) {
                            (false, 0xD0) => half = true,
                            (true, 0x00) => {
                                half = false;
                                hold.pings_answered.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                half = false;
                                hold.unexpected_bytes.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            },
            _ = sleep_until(next_ping.unwrap_or_else(Instant::now)), if next_ping.is_some() => {
                if stream.write_all(&[0xC0, 0x00]).await.is_err() {
                    hold.dropped.fetch_add(1, Ordering::Relaxed);
                    hold.error("while holding: PINGREQ write failed".into());
                    return;
                }
                hold.pings_sent.fetch_add(1, Ordering::Relaxed);
                next_ping = next_ping.zip(ping_every).map(|(t, p)| t + p);
            }
            _ = close.changed() => break,
        }
    }
    // DISCONNECT, then close.
    let _ = stream.write_all(&[0xE0, 0x00]).await;
    let _ = stream.shutdown().await;
}

/// TCP connect, CONNECT, CONNACK (and SUBSCRIBE, SUBACK): the stream when accepted, `Err(code)`
/// when refused.
async fn handshake(how: How, client_id: &str) -> anyhow::Result<Result<TcpStream, u8>> {
    let addr = how.addr;
    let mut stream = match how.source {
        None => TcpStream::connect(addr).await,
        Some(src) => {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(src, 0)).with_context(|| format!("bind {src}"))?;
            socket.connect(addr).await
        }
    }
    .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let version = how.version;
    let connect = Connect {
        bridge: false,
        version,
        clean_start: true,
        keep_alive: how.keep_alive,
        client_id: Str::from(client_id),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    };
    let mut out = BytesMut::with_capacity(64 + client_id.len());
    encode(&Packet::Connect(Box::new(connect)), version, &mut out);
    stream.write_all(&out).await.context("write CONNECT")?;
    let mut dec = Decoder::with_version(64 * 1024, version);
    let mut inb = BytesMut::with_capacity(64);
    match read_packet(&mut stream, &mut dec, &mut inb).await.context("CONNACK")? {
        Packet::ConnAck(ack) if ack.code == 0 => {}
        Packet::ConnAck(ack) => return Ok(Err(ack.code)),
        p => bail!("expected CONNACK, got {p:?}"),
    }
    if how.subscribe {
        out.clear();
        let sub = Subscribe {
            packet_id: 1,
            properties: Properties::default(),
            filters: vec![(
                Str::from(format!("devices/{client_id}/cmd").as_str()),
                SubOptions { qos: QoS::AtLeastOnce, ..SubOptions::default() },
            )],
        };
        encode(&Packet::Subscribe(sub), version, &mut out);
        stream.write_all(&out).await.context("write SUBSCRIBE")?;
        match read_packet(&mut stream, &mut dec, &mut inb).await.context("SUBACK")? {
            Packet::SubAck(ack) => match ack.reasons.first() {
                Some(&r) if r < 0x80 => {}
                Some(&r) => return Ok(Err(r)),
                None => bail!("SUBACK without a reason code"),
            },
            p => bail!("expected SUBACK, got {p:?}"),
        }
    }
    if !inb.is_empty() {
        bail!("{} unexpected bytes after the handshake", inb.len());
    }
    Ok(Ok(stream))
}

/// Reads until one whole packet is decoded.
async fn read_packet(stream: &mut TcpStream, dec: &mut Decoder, buf: &mut BytesMut) -> anyhow::Result<Packet> {
    loop {
        if let Some(p) = dec.decode(buf).map_err(|e| anyhow!("decode: {e}"))? {
            return Ok(p);
        }
        buf.reserve(64);
        match stream.read_buf(buf).await {
            Ok(0) => bail!("closed by the broker"),
            Ok(_) => {}
            Err(e) => bail!("read: {e}"),
        }
    }
}

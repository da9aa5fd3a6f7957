//! Overload (issue 7): clients past the connection limits and a flood of bad logins, both at
//! once, while the clients already connected keep being served. Every refusal must be in the
//! protocol's own terms (or a plain close once too many are being refused at once), nothing
//! over the limit may get in, and every message the connected clients exchange during the
//! storm must arrive, in order.
//!
//! The latencies of the connected clients' messages before and during the storm are printed
//! (run with `--nocapture`) for the record; they are not asserted (timing depends on the
//! machine).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_amqp::codec::{reply_code, ConnectionStartOk, Method};
use ferry_core::auth::PasswordHash;
use ferry_core::message::FieldValue;
use ferry_integration_tests::amqp::{plain_start_ok, RawClient as AmqpRaw};
use ferry_integration_tests::mqtt::{connect_packet, packet_bytes, publish_packet, sub_options, RawClient as MqttRaw};
use ferry_integration_tests::{within, TestServer};
use ferry_mqtt::codec::{
    reason, return_code, Decoder, Disconnect, Packet, Properties, ProtocolVersion, PubResp, QoS, Str,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections the MQTT listener takes.
const MQTT_LIMIT: usize = 20;
/// Connections over the limit attempted during the storm (`OVERLOAD_CLIENTS` to change it).
fn over_limit() -> usize {
    scale("OVERLOAD_CLIENTS", 150)
}
/// Bad logins during the storm (AMQP; the AMQP listener has room, so each is checked;
/// `OVERLOAD_LOGINS` to change it).
fn bad_logins() -> usize {
    scale("OVERLOAD_LOGINS", 150)
}

fn scale(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
/// Messages the connected clients exchange during the storm.
const MESSAGES: u16 = 200;

fn config() -> String {
    let hash = PasswordHash::argon2id(b"s3cret");
    format!(
        "[[users]]\nname = \"sensor\"\npassword_hash = \"{hash}\"\n\
         [[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = false\n\
         max_connections = {MQTT_LIMIT}\nmax_connection_rate = 0\n\
         [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = false\nmax_connection_rate = 0\n"
    )
}

fn login(version: ProtocolVersion, password: &[u8]) -> ferry_mqtt::codec::Connect {
    static N: AtomicUsize = AtomicUsize::new(0);
    let mut c = connect_packet(version, &format!("overload-{}", N.fetch_add(1, Ordering::Relaxed)), true);
    c.username = Some(Str::from("sensor"));
    c.password = Some(bytes::Bytes::copy_from_slice(password));
    c
}

fn start_ok_with_failure_close(user: &str, password: &str) -> ConnectionStartOk {
    let mut ok = plain_start_ok(user, password);
    let mut caps = ferry_core::message::FieldTable::new();
    caps.insert("authentication_failure_close", FieldValue::Bool(true));
    ok.client_properties.insert("capabilities", FieldValue::Table(caps));
    ok
}

/// How an attempt ended.
#[derive(Debug, Default)]
struct Tally {
    refused_in_protocol: AtomicUsize,
    closed_without_answer: AtomicUsize,
    let_in: AtomicUsize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Publishes `n` QoS 1 messages one at a time and returns each one's publish-to-delivery time.
async fn round_trips(publisher: &mut MqttRaw, subscriber: &mut MqttRaw, first_id: u16, n: u16) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n as usize);
    for i in 0..n {
        let id = first_id + i;
        let sent = Instant::now();
        publisher.publish(publish_packet("live/t", QoS::AtLeastOnce, id, &id.to_be_bytes())).await;
        let p = within("a delivery to the connected subscriber", subscriber.recv_publish()).await;
        times.push(sent.elapsed());
        assert_eq!(&p.payload[..], &id.to_be_bytes(), "in order, none lost");
        if let Some(pid) = p.packet_id {
            subscriber.send(&Packet::PubAck(PubResp::ok(pid))).await;
        }
    }
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_and_bad_logins_do_not_stop_the_connected_clients() {
    let frontends = ferry_server::frontends::builtin(&Default::default());
    let s = TestServer::start(&config(), &frontends).await;
    let (mqtt, amqp) = (s.addr(0), s.addr(1));

    // The connected clients: a publisher and a subscriber, and idle ones up to the limit.
    let (mut subscriber, ack) = MqttRaw::connect(mqtt, login(ProtocolVersion::V5, b"s3cret")).await;
    assert_eq!(ack.code, 0);
    subscriber.subscribe(1, "live/#", sub_options(QoS::AtLeastOnce)).await;
    let (mut publisher, ack) = MqttRaw::connect(mqtt, login(ProtocolVersion::V5, b"s3cret")).await;
    assert_eq!(ack.code, 0);
    let mut idle = Vec::new();
    for _ in 2..MQTT_LIMIT {
        let (c, ack) = MqttRaw::connect(mqtt, login(ProtocolVersion::V311, b"s3cret")).await;
        assert_eq!(ack.code, 0, "within the limit");
        idle.push(c);
    }
    let mut quiet = round_trips(&mut publisher, &mut subscriber, 1, 50).await;

    // The storm: MQTT clients over the limit (both versions) and bad AMQP logins, all at once.
    let tally = Arc::new(Tally::default());
    let logins_refused = Arc::new(AtomicUsize::new(0));
    let mut storm = Vec::new();
    let (over_limit, bad_logins) = (over_limit(), bad_logins());
    for i in 0..over_limit {
        let tally = tally.clone();
        storm.push(tokio::spawn(async move {
            let version = if i % 2 == 0 { ProtocolVersion::V5 } else { ProtocolVersion::V311 };
            let refused_code =
                if version == ProtocolVersion::V5 { reason::QUOTA_EXCEEDED } else { return_code::SERVER_UNAVAILABLE };
            // A raw socket: the broker may close it before or while we write (a refusal past
            // the ones answered at once), which the test clients would take for a failure.
            let mut socket = TcpStream::connect(mqtt).await.expect("TCP connect");
            let connect = packet_bytes(&Packet::Connect(Box::new(login(version, b"s3cret"))), version);
            let _ = socket.write_all(&connect).await;
            let mut bytes = Vec::new();
            let _ = within("an answer or a close for a client over the limit", socket.read_to_end(&mut bytes)).await;
            let mut buf = bytes::BytesMut::from(&bytes[..]);
            let first = Decoder::with_version(u32::MAX, version).decode(&mut buf).expect("a decodable answer");
            match first {
                Some(Packet::ConnAck(ack)) if ack.code == refused_code => {
                    tally.refused_in_protocol.fetch_add(1, Ordering::Relaxed);
                }
                Some(Packet::ConnAck(ack)) if ack.code == 0 => {
                    tally.let_in.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    tally.closed_without_answer.fetch_add(1, Ordering::Relaxed);
                }
                other => panic!("over the limit, {version:?}: {other:?}"),
            }
        }));
    }
    for _ in 0..bad_logins {
        let refused = logins_refused.clone();
        storm.push(tokio::spawn(async move {
            // From an address of their own: failed logins slow down and then refuse the address
            // they come from (the good logins below come from 127.0.0.1).
            let mut c = AmqpRaw::start_from(amqp, std::net::Ipv4Addr::new(127, 0, 0, 3).into()).await.0;
            c.send_method(0, Method::ConnectionStartOk(start_ok_with_failure_close("sensor", "guess"))).await;
            match within("a bad login's answer", c.recv_method()).await {
                (0, Method::ConnectionClose(close))
                    if close.reply_code == reply_code::ACCESS_REFUSED
                        || close.reply_text.to_string_lossy().contains("too many logins") =>
                {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                other => panic!("a bad login: {other:?}"),
            }
        }));
    }
    // Meanwhile the connected clients go on.
    let mut during = round_trips(&mut publisher, &mut subscriber, 1000, MESSAGES).await;
    for task in storm {
        within("the storm's clients", task).await.unwrap();
    }

    let (refused, closed, let_in) = (
        tally.refused_in_protocol.load(Ordering::Relaxed),
        tally.closed_without_answer.load(Ordering::Relaxed),
        tally.let_in.load(Ordering::Relaxed),
    );
    assert_eq!(let_in, 0, "nobody over the limit got in");
    assert_eq!(refused + closed, over_limit);
    assert!(refused > 0, "clients over the limit are told why (refused {refused}, closed {closed})");
    assert_eq!(logins_refused.load(Ordering::Relaxed), bad_logins, "every bad login refused");

    // A slot that frees up is usable again, and good logins still work.
    let mut freed = idle.pop().expect("idle clients");
    freed.send(&Packet::Disconnect(Disconnect { reason: 0, properties: Properties::default() })).await;
    freed.closed().await;
    // The slot comes back when the connection's task ends, a moment after the close: each try
    // is a whole CONNECT / CONNACK exchange, refused meanwhile with 0x97 only.
    let _admitted = within("the freed slot is given to a new client", async {
        loop {
            let (c, ack) = MqttRaw::connect(mqtt, login(ProtocolVersion::V5, b"s3cret")).await;
            if ack.code == 0 {
                return c;
            }
            assert_eq!(ack.code, reason::QUOTA_EXCEEDED);
        }
    })
    .await;
    let mut good = AmqpRaw::start(amqp).await.0;
    good.send_method(0, Method::ConnectionStartOk(plain_start_ok("sensor", "s3cret"))).await;
    within("tune after a good login", good.recv_tune()).await;

    quiet.sort();
    during.sort();
    eprintln!(
        "overload: {over_limit} MQTT clients over the limit ({refused} refused with CONNACK, {closed} closed), \
         {bad_logins} bad AMQP logins; connected clients' QoS 1 round trip p50/p99/max: \
         quiet {:?}/{:?}/{:?}, during {:?}/{:?}/{:?}",
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        quiet.last().unwrap(),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.last().unwrap(),
    );
}

//! What reaches the broker first takes effect first, across connections too (issue 14): a
//! client subscribes and, a few hundred microseconds later, another client publishes to that
//! topic without waiting for the SUBACK. No spec clause orders two connections, but users (and
//! interoperability suites) expect the subscriber to get the message, as Mosquitto always
//! delivers it. Ferry used to acknowledge the PUBLISH before the SUBSCRIBE took effect in 3 runs
//! out of 3 of such a suite.
//!
//! The `ferry` binary runs as its own process: inside the test's runtime, the test's clients
//! would take the broker's worker threads and decide the order themselves.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{Serving, PATIENCE};

/// The gap between the SUBSCRIBE and the PUBLISH leaving the test.
const GAP: Duration = Duration::from_micros(300);

/// [`GAP`], or `GAP_US` microseconds from the environment (for comparing builds at other gaps,
/// with `FERRY_BIN` naming the binary: see docs/mapping.md).
fn gap() -> Duration {
    std::env::var("GAP_US").ok().and_then(|v| v.parse().ok()).map(Duration::from_micros).unwrap_or(GAP)
}
const ROUNDS: usize = 200;
/// Rounds that may miss. The order across connections is what Ferry aims for, not what it can
/// guarantee with connections on several worker threads (`mqtt-frontend/src/driver.rs` says
/// why): a SUBSCRIBE whose socket the I/O driver has not reported yet cannot be waited for.
/// Before issue 14 424 of 1,200 rounds missed (35 %), after the first fix 53 (4.4 %); since,
/// 1 of 200 in a fresh-clone CI now and then (2026-12-05 at load ~10, 2026-12-06 16:07 UTC on
/// a quiet machine), 0 in other runs. Two of 200 (1 %) still fails either regression.
const MAY_MISS: usize = 2;

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    remaining_length(body.len(), &mut p);
    p.extend_from_slice(body);
    p
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Reads one whole packet: (first byte, body).
fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    s.read_exact(&mut first)?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        len |= ((b[0] & 0x7F) as usize) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body)?;
    Ok((first[0], body))
}

fn connect(port: u16, client_id: &str, v5: bool) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.extend_from_slice(&[if v5 { 5 } else { 4 }, 0x02, 0x00, 0x3C]);
    if v5 {
        body.push(0); // no properties
    }
    string(client_id.as_bytes(), &mut body);
    s.write_all(&packet(0x10, &body)).unwrap();
    let (first, ack) = read_packet(&mut s).expect("CONNACK");
    assert_eq!((first, ack[1]), (0x20, 0), "CONNACK");
    s
}

/// `ROUNDS` times: SUBSCRIBE on one connection, [`GAP`] later a QoS 1 PUBLISH to its topic on
/// another; returns the rounds whose subscriber did not get the message.
fn missed_rounds(port: u16, v5: bool) -> Vec<usize> {
    let tag = if v5 { "v5" } else { "v311" };
    let mut publisher = connect(port, &format!("order-pub-{tag}"), v5);
    let mut subscriber = connect(port, &format!("order-sub-{tag}"), v5);
    let mut missed = Vec::new();
    for round in 0..ROUNDS {
        let id = (round as u16 + 1).to_be_bytes();
        let topic = format!("order/{tag}/{round}");
        let mut sub = id.to_vec();
        if v5 {
            sub.push(0);
        }
        string(topic.as_bytes(), &mut sub);
        sub.push(0); // QoS 0
        let mut publish = Vec::new();
        string(topic.as_bytes(), &mut publish);
        publish.extend_from_slice(&id);
        if v5 {
            publish.push(0);
        }
        publish.extend_from_slice(b"after the SUBSCRIBE");
        let (sub, publish) = (packet(0x82, &sub), packet(0x32, &publish));

        subscriber.write_all(&sub).unwrap();
        let sent = Instant::now();
        // The gap is the scenario (an interoperability suite's client publishing right after
        // another subscribed), not a wait for an outcome: slept, so the core is free for the
        // broker (a busy wait took it: with 2 cores, the broker then often handled the
        // SUBSCRIBE only once the test stopped spinning, whatever the gap).
        std::thread::sleep(gap());
        publisher.write_all(&publish).unwrap();
        let t_pub = sent.elapsed();
        let (first, puback) = read_packet(&mut publisher).expect("PUBACK");
        let t_puback = sent.elapsed();
        assert_eq!(first, 0x40, "PUBACK");
        let code = puback.get(2).copied().unwrap_or(0);
        // The SUBACK, then the message; a round that missed it has its SUBACK only.
        subscriber.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let (mut suback, mut delivered) = (false, false);
        let mut t_suback = None;
        while !(suback && delivered) {
            match read_packet(&mut subscriber) {
                Ok((0x90, _)) => {
                    suback = true;
                    t_suback = Some(sent.elapsed());
                }
                Ok((first, _)) if first >> 4 == 3 => delivered = true,
                Ok((first, _)) => panic!("round {round}: unexpected packet {first:#04x}"),
                Err(_) if suback => break,
                Err(e) => panic!("round {round}: no SUBACK: {e}"),
            }
        }
        if !delivered {
            // Whether the PUBLISH found no subscriber (5.0 PUBACK 0x10) and when the SUBACK came.
            eprintln!(
                "round {round}: PUBACK {code:#04x}; PUBLISH sent after {t_pub:?}, PUBACK after {t_puback:?}, SUBACK after {t_suback:?}"
            );
            missed.push(round);
        }
    }
    missed
}

#[test]
fn a_publish_a_few_hundred_microseconds_after_a_subscribe_reaches_the_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config =
        format!("[broker]\ndata_dir = \"data\"\n[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\n");
    std::fs::write(dir.path().join("ferry.toml"), config).unwrap();
    let mut ferry = Serving::start(dir.path(), &["--config", "ferry.toml"]);
    ferry.wait_for("ferry ready", |l| l.contains("ferry ready").then_some(()));
    for v5 in [true, false] {
        let missed = missed_rounds(port, v5);
        println!("v5 {v5}: {} of {ROUNDS} rounds missed the message: {missed:?}", missed.len());
        assert!(
            missed.len() <= MAY_MISS,
            "v5 {v5}: {} of {ROUNDS} rounds missed the message: {missed:?}",
            missed.len()
        );
    }
}

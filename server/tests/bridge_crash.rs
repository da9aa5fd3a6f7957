//! A bridge's backlog survives a SIGKILL of the bridging broker (issue 16): the `ferry` binary
//! bridges to a second `ferry` that is down, takes N QoS 1 messages for it, is killed with
//! SIGKILL, and restarted on the same data directory once the remote is up; the remote's
//! subscriber gets every one, in order (duplicates of messages that were in flight allowed).
//! And its overflow, read in the binary's log: one warning per episode.
//! The same backlog test for an AMQP shovel (`[[shovels]]`) to a second `ferry` over AMQP 0-9-1.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use bytes::BytesMut;
use common::{Serving, PATIENCE};
use ferry_mqtt::codec::{
    encode, Connect, Decoder, Packet, Properties, ProtocolVersion, PubResp, Publish, QoS, Str, SubOptions, Subscribe,
};

const N: usize = 200;
const V: ProtocolVersion = ProtocolVersion::V311;

/// A blocking MQTT 3.1.1 client on Ferry's own codec.
struct Client {
    stream: TcpStream,
    rx: BytesMut,
    decoder: Decoder,
}

impl Client {
    fn connect(port: u16, id: &str, clean: bool) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut c = Client { stream, rx: BytesMut::new(), decoder: Decoder::with_version(1 << 20, V) };
        c.send(&Packet::Connect(Box::new(Connect {
            bridge: false,
            version: V,
            clean_start: clean,
            keep_alive: 60,
            client_id: Str::from(id),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        })));
        match c.recv() {
            Packet::ConnAck(a) => assert_eq!(a.code, 0, "CONNACK"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        c
    }

    fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        encode(p, V, &mut out);
        self.stream.write_all(&out).expect("write");
    }

    fn recv(&mut self) -> Packet {
        loop {
            if let Some(p) = self.decoder.decode(&mut self.rx).expect("decode") {
                return p;
            }
            let mut buf = [0u8; 4096];
            let n = self.stream.read(&mut buf).expect("read (timed out?)");
            assert!(n > 0, "the broker closed the connection");
            self.rx.extend_from_slice(&buf[..n]);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start(dir: &Path, toml: &str) -> Serving {
    std::fs::write(dir.join("ferry.toml"), toml).unwrap();
    let mut ferry = Serving::start(dir, &["--config", "ferry.toml"]);
    ferry.wait_for("ferry ready", |l| l.contains("ferry ready").then_some(()));
    ferry
}

#[test]
fn a_bridge_backlog_survives_sigkill_and_arrives_in_order() {
    let (port_a, port_b) = (free_port(), free_port());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let toml_a = format!(
        "[broker]\ndata_dir = \"data\"\n[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:{port_a}\"\n\
         [[bridges]]\nname = \"b\"\naddress = \"127.0.0.1:{port_b}\"\nprotocol_version = \"3.1.1\"\n\
         reconnect_initial_ms = 50\nreconnect_max_ms = 400\n\
         topics = [{{ pattern = \"s/#\", direction = \"out\", qos = 1 }}]\n"
    );
    let toml_b =
        format!("[broker]\ndata_dir = \"data\"\n[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:{port_b}\"\n");

    // The remote is down: every message waits in the bridge's queue.
    let a = start(dir_a.path(), &toml_a);
    let mut publisher = Client::connect(port_a, "pub", true);
    for i in 0..N {
        let id = (i + 1) as u16;
        publisher.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: Str::from("s/1"),
            packet_id: Some(id),
            properties: Properties::default(),
            payload: format!("m{i}").into_bytes().into(),
        }));
        match publisher.recv() {
            Packet::PubAck(a) => assert_eq!(a.packet_id, id),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    // Every PUBACK came after its commit; now the crash.
    let killed = Command::new("kill").args(["-KILL", &a.pid().to_string()]).status().unwrap();
    assert!(killed.success());
    drop(a);
    drop(publisher);

    let b = start(dir_b.path(), &toml_b);
    let mut subscriber = Client::connect(port_b, "sub", false);
    subscriber.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![(Str::from("s/#"), SubOptions { qos: QoS::AtLeastOnce, ..SubOptions::default() })],
    }));
    assert!(matches!(subscriber.recv(), Packet::SubAck(_)));

    let a = start(dir_a.path(), &toml_a);
    let mut seen = HashSet::new();
    let mut order = Vec::with_capacity(N);
    let mut duplicates = 0;
    while seen.len() < N {
        match subscriber.recv() {
            Packet::Publish(p) => {
                let body = String::from_utf8(p.payload.to_vec()).unwrap();
                if seen.insert(body.clone()) {
                    order.push(body);
                } else {
                    duplicates += 1;
                }
                if let Some(id) = p.packet_id {
                    subscriber.send(&Packet::PubAck(PubResp::ok(id)));
                }
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    let expected: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(order, expected, "all {N}, in order");
    eprintln!("{N} delivered after SIGKILL, {duplicates} duplicate(s)");
    let (status, _) = a.stop();
    assert!(status.success());
    let (status, _) = b.stop();
    assert!(status.success());
}

/// A bridge's overflow is logged once per episode, not once per message: two bursts into a
/// full queue while the remote is down give one warning, and the drain when it comes back one
/// line with what the episode dropped.
#[test]
fn a_bridge_overflow_is_logged_once_per_episode() {
    let (port_a, port_b) = (free_port(), free_port());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let toml_a = format!(
        "[broker]\ndata_dir = \"data\"\n[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:{port_a}\"\n\
         [[bridges]]\nname = \"b\"\naddress = \"127.0.0.1:{port_b}\"\nprotocol_version = \"3.1.1\"\n\
         reconnect_initial_ms = 50\nreconnect_max_ms = 400\nmax_queued_messages = 5\nmax_inflight = 1\n\
         topics = [{{ pattern = \"s/#\", direction = \"out\", qos = 1 }}]\n"
    );
    let toml_b =
        format!("[broker]\ndata_dir = \"data\"\n[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:{port_b}\"\n");
    let mut a = start(dir_a.path(), &toml_a);
    let mut publisher = Client::connect(port_a, "pub", true);
    let mut burst = |from: usize| {
        for i in from..from + 20 {
            let id = (i + 1) as u16;
            publisher.send(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: Str::from("s/1"),
                packet_id: Some(id),
                properties: Properties::default(),
                payload: format!("m{i}").into_bytes().into(),
            }));
            assert!(matches!(publisher.recv(), Packet::PubAck(_)));
        }
    };
    // 1 with the link, 5 queued, 14 dropped.
    burst(0);
    a.wait_for("the overflow warning", |l| l.contains("local queue ferry-bridge.b full").then_some(()));
    // 20 more dropped in the same episode: no new line.
    burst(20);
    let b = start(dir_b.path(), &toml_b);
    let summary = a.wait_for("the end of the episode", |l| l.contains("has room again").then(|| l.to_string()));
    assert!(summary.contains("dropped 34 and refused 0"), "{summary}");
    let (status, lines) = a.stop();
    assert!(status.success());
    let full = lines.iter().filter(|l| l.contains("full (")).count();
    assert_eq!(full, 1, "one warning for the episode:\n{}", lines.join("\n"));
    let (status, _) = b.stop();
    assert!(status.success());
}

/// The subscriber's side of the shovel test: every one of `n` messages `m0..` arrives, in order
/// of first arrival; returns the duplicates seen.
fn receive_all(subscriber: &mut Client, n: usize) -> usize {
    let mut seen = HashSet::new();
    let mut order = Vec::with_capacity(n);
    let mut duplicates = 0;
    while seen.len() < n {
        match subscriber.recv() {
            Packet::Publish(p) => {
                let body = String::from_utf8(p.payload.to_vec()).unwrap();
                if seen.insert(body.clone()) {
                    order.push(body);
                } else {
                    duplicates += 1;
                }
                if let Some(id) = p.packet_id {
                    subscriber.send(&Packet::PubAck(PubResp::ok(id)));
                }
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    let expected: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(order, expected, "all {n}, in order");
    duplicates
}

#[test]
fn a_shovel_backlog_survives_sigkill_and_arrives_in_order() {
    let (mqtt_a, amqp_b, mqtt_b) = (free_port(), free_port(), free_port());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let toml_a = format!(
        "[broker]\ndata_dir = \"data\"\n[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:{mqtt_a}\"\n\
         [[shovels]]\nname = \"s\"\nsrc_uri = \"local\"\nsrc_exchange = \"amq.topic\"\nsrc_exchange_key = \"s.#\"\n\
         dest_uri = \"amqp://127.0.0.1:{amqp_b}\"\ndest_exchange = \"amq.topic\"\nprefetch_count = 50\n\
         reconnect_initial_ms = 50\nreconnect_max_ms = 400\n"
    );
    let toml_b = format!(
        "[broker]\ndata_dir = \"data\"\n[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:{mqtt_b}\"\n\
         [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:{amqp_b}\"\n"
    );

    // The remote is down: every message waits in the shovel's queue.
    let a = start(dir_a.path(), &toml_a);
    let mut publisher = Client::connect(mqtt_a, "pub", true);
    for i in 0..N {
        let id = (i + 1) as u16;
        publisher.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: Str::from("s/1"),
            packet_id: Some(id),
            properties: Properties::default(),
            payload: format!("m{i}").into_bytes().into(),
        }));
        match publisher.recv() {
            Packet::PubAck(a) => assert_eq!(a.packet_id, id),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    let killed = Command::new("kill").args(["-KILL", &a.pid().to_string()]).status().unwrap();
    assert!(killed.success());
    drop(a);
    drop(publisher);

    let b = start(dir_b.path(), &toml_b);
    let mut subscriber = Client::connect(mqtt_b, "sub", false);
    subscriber.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![(Str::from("s/#"), SubOptions { qos: QoS::AtLeastOnce, ..SubOptions::default() })],
    }));
    assert!(matches!(subscriber.recv(), Packet::SubAck(_)));

    let a = start(dir_a.path(), &toml_a);
    let duplicates = receive_all(&mut subscriber, N);
    eprintln!("{N} shovelled after SIGKILL, {duplicates} duplicate(s)");
    let (status, _) = a.stop();
    assert!(status.success());
    let (status, _) = b.stop();
    assert!(status.success());
}

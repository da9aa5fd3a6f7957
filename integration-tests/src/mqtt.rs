//! Helpers for the MQTT end-to-end tests: a server with the real MQTT frontend, rumqttc
//! clients (3.1.1 and 5.0) whose event loops run in their own tasks, and a raw client that
//! speaks packets built with Ferry's codec (for what no well-behaved client would send).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_mqtt::codec::{
    encode, ConnAck, Connect, Decoder, Packet, Properties, ProtocolVersion, Publish, QoS, Str, SubAck, SubOptions,
    Subscribe, Will,
};
use ferry_mqtt::{MqttFrontend, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::{within, TestServer, TIMEOUT};

/// One MQTT listener on a free port; append listener keys (`max_frame_size = 200\n`) after it.
pub const MQTT_LISTENER: &str = "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n";

/// How long a "nothing arrives" check waits: long enough for a wrongly routed message to show
/// up on loopback, short enough to keep the suite fast.
pub const QUIET: Duration = Duration::from_millis(400);

impl TestServer {
    /// A server with one MQTT listener served by the real MQTT frontend.
    pub async fn mqtt() -> TestServer {
        TestServer::mqtt_with("").await
    }

    /// [`TestServer::mqtt`] with extra keys for the listener (`handshake_timeout_secs = 1\n`).
    pub async fn mqtt_with(listener_keys: &str) -> TestServer {
        TestServer::mqtt_with_settings(Settings::default(), listener_keys).await
    }

    /// [`TestServer::mqtt_with`] a frontend with non-default settings.
    pub async fn mqtt_with_settings(settings: Settings, listener_keys: &str) -> TestServer {
        let frontend: Arc<dyn ferry_core::frontend::Frontend> = Arc::new(MqttFrontend::new(settings));
        TestServer::start(&format!("{MQTT_LISTENER}{listener_keys}"), &[frontend]).await
    }

    /// The (first) MQTT listener's address.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.addr_of(ferry_core::Protocol::Mqtt)
    }
}

// ----- raw packets ------------------------------------------------------------------------------

/// A CONNECT with keep alive 30 s and no will.
pub fn connect_packet(version: ProtocolVersion, client_id: &str, clean: bool) -> Connect {
    Connect {
        bridge: false,
        version,
        clean_start: clean,
        keep_alive: 30,
        client_id: Str::from(client_id),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

/// A will on `topic`.
pub fn will(topic: &str, payload: &'static [u8], qos: QoS, retain: bool) -> Will {
    Will {
        topic: Str::from(topic),
        payload: Bytes::from_static(payload),
        qos,
        retain,
        properties: Properties::default(),
    }
}

/// A PUBLISH; `id` is used for QoS 1/2.
pub fn publish_packet(topic: &str, qos: QoS, id: u16, payload: &[u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: Str::from(topic),
        packet_id: (qos > QoS::AtMostOnce).then_some(id),
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

/// Subscription options at `qos`.
pub fn sub_options(qos: QoS) -> SubOptions {
    SubOptions { qos, ..SubOptions::default() }
}

/// The bytes of `packet` in `version`.
pub fn packet_bytes(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(packet, version, &mut out);
    out.to_vec()
}

/// A raw MQTT client over TCP: sends packets (or any bytes) and decodes what comes back.
#[derive(Debug)]
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
    /// Packets read while waiting for another one (a PUBLISH before the SUBACK it follows).
    stash: VecDeque<Packet>,
    decoder: Decoder,
    pub version: ProtocolVersion,
}

impl RawClient {
    /// Opens a TCP connection and sends nothing yet.
    pub async fn open(addr: SocketAddr, version: ProtocolVersion) -> RawClient {
        let stream = within("TCP connect", TcpStream::connect(addr)).await.expect("TCP connect");
        RawClient::over(stream, version)
    }

    /// [`RawClient::open`] from the local address `from` (any of 127.0.0.0/8 on loopback): a
    /// client on another host, as the broker sees it.
    pub async fn open_from(addr: SocketAddr, from: std::net::IpAddr, version: ProtocolVersion) -> RawClient {
        RawClient::over(crate::tcp_connect_from(addr, from).await, version)
    }

    fn over(stream: TcpStream, version: ProtocolVersion) -> RawClient {
        stream.set_nodelay(true).expect("nodelay");
        RawClient {
            stream,
            buf: BytesMut::new(),
            stash: VecDeque::new(),
            decoder: Decoder::with_version(u32::MAX, version),
            version,
        }
    }

    /// Opens a connection, sends `connect` and returns the CONNACK.
    pub async fn connect(addr: SocketAddr, connect: Connect) -> (RawClient, ConnAck) {
        let mut c = RawClient::open(addr, connect.version).await;
        c.send(&Packet::Connect(Box::new(connect))).await;
        match c.recv().await {
            Packet::ConnAck(a) => (c, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects with [`connect_packet`] and checks the CONNACK accepts.
    pub async fn connect_ok(addr: SocketAddr, version: ProtocolVersion, client_id: &str, clean: bool) -> RawClient {
        let (c, ack) = RawClient::connect(addr, connect_packet(version, client_id, clean)).await;
        assert_eq!(ack.code, 0, "CONNACK refused: {ack:?}");
        c
    }

    pub async fn send(&mut self, packet: &Packet) {
        let bytes = packet_bytes(packet, self.version);
        self.send_bytes(&bytes).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        within("write", self.stream.write_all(bytes)).await.expect("write to the broker");
    }

    /// [`RawClient::send_bytes`] to a broker that may have closed the connection.
    pub async fn try_send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        within("write", self.stream.write_all(bytes)).await
    }

    /// The next packet, `None` when the broker closed the connection; `Err` after `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Result<Option<Packet>, tokio::time::error::Elapsed> {
        tokio::time::timeout(wait, self.next()).await
    }

    /// The next packet, or `None` once the connection is closed (EOF or reset).
    async fn next(&mut self) -> Option<Packet> {
        if let Some(p) = self.stash.pop_front() {
            return Some(p);
        }
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(p)) => return Some(p),
                Ok(None) => {}
                Err(e) => panic!("the broker sent an undecodable packet: {e}"),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next packet (fails the test on close or after [`TIMEOUT`]).
    pub async fn recv(&mut self) -> Packet {
        match within("next packet from the broker", self.next()).await {
            Some(p) => p,
            None => panic!("the broker closed the connection"),
        }
    }

    /// The first packet `pick` accepts; packets before it are kept for later reads.
    pub async fn expect<T>(&mut self, what: &str, pick: impl Fn(&Packet) -> Option<T>) -> T {
        let mut skipped = VecDeque::new();
        let found = within(what, async {
            loop {
                match self.next().await {
                    Some(p) => match pick(&p) {
                        Some(t) => return t,
                        None => skipped.push_back(p),
                    },
                    None => panic!("{what}: the broker closed the connection (after {skipped:?})"),
                }
            }
        })
        .await;
        skipped.extend(self.stash.drain(..));
        self.stash = skipped;
        found
    }

    /// The next packet, which must be a PUBLISH.
    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Reads until the broker closes the connection; returns the packets that came first.
    pub async fn closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        while let Some(p) = within("the broker closes the connection", self.next()).await {
            seen.push(p);
        }
        seen
    }

    /// Asserts the broker closes the connection, sending at most a DISCONNECT with `reason`
    /// first (5.0), nothing (3.1.1 when `reason` is `None`).
    pub async fn expect_close(&mut self, reason: Option<u8>) {
        let seen = self.closed().await;
        match reason {
            None => assert!(seen.is_empty(), "expected a plain close, got {seen:?}"),
            Some(r) => match &seen[..] {
                [Packet::Disconnect(d)] => assert_eq!(d.reason, r, "DISCONNECT reason: {d:?}"),
                other => panic!("expected DISCONNECT 0x{r:02X} then close, got {other:?}"),
            },
        }
    }

    /// Asserts nothing arrives within [`QUIET`] (and the connection stays open).
    pub async fn quiet(&mut self) {
        match self.next_within(QUIET).await {
            Err(_) => {}
            Ok(Some(p)) => panic!("expected nothing, got {p:?}"),
            Ok(None) => panic!("expected nothing, the broker closed the connection"),
        }
    }

    /// Subscribes to one filter and returns the SUBACK.
    pub async fn subscribe(&mut self, id: u16, filter: &str, options: SubOptions) -> SubAck {
        self.subscribe_with(Subscribe {
            packet_id: id,
            properties: Properties::default(),
            filters: vec![(Str::from(filter), options)],
        })
        .await
    }

    pub async fn subscribe_with(&mut self, s: Subscribe) -> SubAck {
        let id = s.packet_id;
        self.send(&Packet::Subscribe(s)).await;
        // 5.0 §3.8.4 lets the broker send matching (retained) PUBLISHes before the SUBACK.
        self.expect("SUBACK", |p| match p {
            Packet::SubAck(a) if a.packet_id == id => Some(a.clone()),
            _ => None,
        })
        .await
    }

    /// Publishes and, for QoS 1/2, completes the handshake.
    pub async fn publish(&mut self, p: Publish) {
        let qos = p.qos;
        let id = p.packet_id.unwrap_or(0);
        self.send(&Packet::Publish(p)).await;
        // Deliveries to this client may come between the publish and its acknowledgement.
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.expect("PUBACK", |p| matches!(p, Packet::PubAck(a) if a.packet_id == id).then_some(())).await;
            }
            QoS::ExactlyOnce => {
                self.expect("PUBREC", |p| matches!(p, Packet::PubRec(a) if a.packet_id == id).then_some(())).await;
                self.send(&Packet::PubRel(ferry_mqtt::codec::PubResp::ok(id))).await;
                self.expect("PUBCOMP", |p| matches!(p, Packet::PubComp(a) if a.packet_id == id).then_some(())).await;
            }
        }
    }

    /// Publishes `x` to `topic` at QoS 1 with packet id `id` and returns its PUBACK's reason
    /// (3.1.1: always 0). Packets that come first are kept for the next reads.
    pub async fn puback(&mut self, topic: &str, id: u16) -> u8 {
        self.send(&Packet::Publish(publish_packet(topic, QoS::AtLeastOnce, id, b"x"))).await;
        self.expect("PUBACK", |p| match p {
            Packet::PubAck(a) if a.packet_id == id => Some(a.reason),
            _ => None,
        })
        .await
    }

    /// A PINGREQ answered by a PINGRESP: proves the connection is alive and every packet sent
    /// before it has been handled.
    pub async fn ping(&mut self) {
        self.send(&Packet::PingReq).await;
        match self.recv().await {
            Packet::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }

    /// Drops the TCP connection without DISCONNECT (an abnormal loss for the broker).
    pub fn drop_connection(self) {
        drop(self.stream);
    }
}

// ----- rumqttc clients --------------------------------------------------------------------------

macro_rules! rumqttc_client {
    ($(#[$doc:meta])* $name:ident, $m:ident, $publish:ty, $pingresp:pat) => {
        $(#[$doc])*
        pub struct $name {
            pub client: $m::AsyncClient,
            events: mpsc::UnboundedReceiver<Result<$m::Event, $m::ConnectionError>>,
            /// Incoming packets read while looking for another kind.
            stash: VecDeque<Incoming>,
            task: tokio::task::JoinHandle<()>,
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name)).field("stash", &self.stash).finish()
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                self.task.abort();
            }
        }

        impl $name {
            /// Connects (the event loop runs in its own task) and returns the CONNACK.
            pub async fn connect(options: $m::MqttOptions) -> ($name, ConnAckOf) {
                let (client, mut eventloop) = $m::AsyncClient::new(options, 100);
                let (tx, events) = mpsc::unbounded_channel();
                let task = tokio::spawn(async move {
                    loop {
                        let event = eventloop.poll().await;
                        let failed = event.is_err();
                        if tx.send(event).is_err() || failed {
                            return;
                        }
                    }
                });
                let mut c = $name { client, events, stash: VecDeque::new(), task };
                let ack = c.expect("CONNACK", |p| match p { Incoming::ConnAck(a) => Some(a.clone()), _ => None }).await;
                (c, ack)
            }

            /// The next incoming packet (PINGRESPs skipped); fails on a connection error.
            async fn incoming(&mut self) -> Incoming {
                if let Some(p) = self.stash.pop_front() {
                    return p;
                }
                loop {
                    match within("next event", self.events.recv()).await {
                        Some(Ok($m::Event::Incoming($pingresp))) => {}
                        Some(Ok($m::Event::Incoming(p))) => return p,
                        Some(Ok($m::Event::Outgoing(_))) => {}
                        Some(Err(e)) => panic!("connection error: {e:?}"),
                        None => panic!("event loop ended"),
                    }
                }
            }

            /// The first incoming packet `pick` accepts; others are stashed for later calls.
            pub async fn expect<T>(&mut self, what: &str, pick: impl Fn(&Incoming) -> Option<T>) -> T {
                let mut skipped = VecDeque::new();
                // Stashed packets first, in order.
                while let Some(p) = self.stash.pop_front() {
                    if let Some(t) = pick(&p) {
                        skipped.extend(self.stash.drain(..));
                        self.stash = skipped;
                        return t;
                    }
                    skipped.push_back(p);
                }
                let found = within(what, async {
                    loop {
                        let p = self.incoming().await;
                        match pick(&p) {
                            Some(t) => return t,
                            None => skipped.push_back(p),
                        }
                    }
                })
                .await;
                self.stash = skipped;
                found
            }

            /// The next PUBLISH received.
            pub async fn publish_received(&mut self) -> $publish {
                self.expect("PUBLISH", |p| match p { Incoming::Publish(p) => Some(p.clone()), _ => None })
                .await
            }

            /// Asserts no PUBLISH arrives within [`QUIET`] (other packets are kept).
            pub async fn no_publish(&mut self) {
                if let Some(p) = self.stash.iter().find(|p| matches!(p, Incoming::Publish(_))) {
                    panic!("expected no PUBLISH, got {p:?}");
                }
                let quiet = tokio::time::timeout(QUIET, async {
                    loop {
                        match self.events.recv().await {
                            Some(Ok($m::Event::Incoming(Incoming::Publish(p)))) => return p,
                            Some(Ok($m::Event::Incoming(p))) => self.stash.push_back(p),
                            Some(Ok(_)) => {}
                            Some(Err(e)) => panic!("connection error: {e:?}"),
                            None => panic!("event loop ended"),
                        }
                    }
                })
                .await;
                if let Ok(p) = quiet {
                    panic!("expected no PUBLISH, got {p:?}");
                }
            }

            /// Asserts no incoming packet `pick` accepts arrives within [`QUIET`] (others are
            /// kept): a bounded check that something withheld stays withheld.
            pub async fn none_of(&mut self, what: &str, pick: impl Fn(&Incoming) -> bool) {
                if let Some(p) = self.stash.iter().find(|p| pick(p)) {
                    panic!("expected no {what}, got {p:?}");
                }
                let quiet = tokio::time::timeout(QUIET, async {
                    loop {
                        match self.events.recv().await {
                            Some(Ok($m::Event::Incoming(p))) if pick(&p) => return p,
                            Some(Ok($m::Event::Incoming(p))) => self.stash.push_back(p),
                            Some(Ok(_)) => {}
                            Some(Err(e)) => panic!("connection error: {e:?}"),
                            None => panic!("event loop ended"),
                        }
                    }
                })
                .await;
                if let Ok(p) = quiet {
                    panic!("expected no {what}, got {p:?}");
                }
            }

            /// The connection error that ends the event loop.
            pub async fn error(&mut self) -> $m::ConnectionError {
                loop {
                    match within("connection error", self.events.recv()).await {
                        Some(Err(e)) => return e,
                        Some(Ok(_)) => {}
                        None => panic!("event loop ended without an error"),
                    }
                }
            }

            /// Subscribes and waits for the SUBACK.
            pub async fn subscribe(&mut self, filter: &str, qos: QoSOf) -> SubAckOf {
                self.client.subscribe(filter, qos).await.expect("subscribe request");
                self.suback().await
            }

            pub async fn suback(&mut self) -> SubAckOf {
                self.expect("SUBACK", |p| match p { Incoming::SubAck(a) => Some(a.clone()), _ => None })
                .await
            }

            /// Publishes and, for QoS 1/2, waits until the broker acknowledged it.
            pub async fn publish(&mut self, topic: &str, qos: QoSOf, retain: bool, payload: &[u8]) {
                self.client.publish(topic, qos, retain, payload.to_vec()).await.expect("publish request");
                self.published(qos).await;
            }

            /// Waits for the acknowledgement a publish at `qos` gets (none for QoS 0).
            pub async fn published(&mut self, qos: QoSOf) {
                match qos {
                    QoSOf::AtMostOnce => {}
                    QoSOf::AtLeastOnce => {
                        self.expect("PUBACK", |p| matches!(p, Incoming::PubAck(_)).then_some(()))
                        .await
                    }
                    QoSOf::ExactlyOnce => {
                        self.expect("PUBCOMP", |p| matches!(p, Incoming::PubComp(_)).then_some(()))
                        .await
                    }
                }
            }

            /// Sends DISCONNECT and waits until the event loop has written it.
            pub async fn disconnect(mut self) {
                self.client.disconnect().await.expect("disconnect request");
                within("DISCONNECT sent", async {
                    loop {
                        match self.events.recv().await {
                            Some(Ok($m::Event::Outgoing(o))) if format!("{o:?}") == "Disconnect" => return,
                            Some(Err(_)) | None => return,
                            _ => {}
                        }
                    }
                })
                .await;
                // Give the event loop the chance to flush: it ends once the request channel is
                // done, which the next poll reports as an error.
                let _ = tokio::time::timeout(TIMEOUT, async {
                    while let Some(Ok(_)) = self.events.recv().await {}
                })
                .await;
            }
        }
    };
}

/// rumqttc's 3.1.1 types under the names the shared client code uses.
pub mod v311 {
    use super::*;
    use rumqttc as m;
    pub use rumqttc::{ConnAck as ConnAckOf, Incoming, QoS as QoSOf, SubAck as SubAckOf};
    rumqttc_client!(
        /// A rumqttc MQTT 3.1.1 client.
        Client,
        m,
        rumqttc::Publish,
        Incoming::PingResp
    );

    /// Options for a 3.1.1 client of `server` (keep alive 30 s).
    pub fn options(server: &TestServer, id: &str) -> rumqttc::MqttOptions {
        let addr = server.mqtt_addr();
        let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Connects a clean-session client and checks the CONNACK accepts.
    pub async fn connect(server: &TestServer, id: &str) -> Client {
        let (c, ack) = Client::connect(options(server, id)).await;
        assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
        c
    }
}

/// rumqttc's 5.0 types under the names the shared client code uses.
pub mod v5 {
    use super::*;
    use rumqttc::v5 as m;
    pub use rumqttc::v5::mqttbytes::v5::{ConnAck as ConnAckOf, Packet as Incoming, SubAck as SubAckOf};
    pub use rumqttc::v5::mqttbytes::QoS as QoSOf;
    rumqttc_client!(
        /// A rumqttc MQTT 5.0 client.
        Client,
        m,
        rumqttc::v5::mqttbytes::v5::Publish,
        Incoming::PingResp(_)
    );

    /// Options for a 5.0 client of `server` (keep alive 30 s).
    pub fn options(server: &TestServer, id: &str) -> rumqttc::v5::MqttOptions {
        let addr = server.mqtt_addr();
        let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Connects a clean-start client and checks the CONNACK accepts.
    pub async fn connect(server: &TestServer, id: &str) -> Client {
        let (c, ack) = Client::connect(options(server, id)).await;
        assert_eq!(ack.code, rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success);
        c
    }
}

/// Reads the payload of a 3.1.1 / 5.0 rumqttc publish as text.
pub fn text(payload: &[u8]) -> &str {
    std::str::from_utf8(payload).expect("UTF-8 payload")
}

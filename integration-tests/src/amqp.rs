//! Helpers for the AMQP 0-9-1 end-to-end tests: a server with the real AMQP frontend, lapin and
//! amqprs connections to it, reply codes out of lapin errors, and a raw client that speaks frames
//! built with Ferry's codec (for what no well-behaved client would send).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_amqp::codec::{
    encode_body_frames, encode_header_frame, encode_method_frame, BasicPublish, ChannelOpen, ConnectionClose,
    ConnectionCloseOk, ConnectionOpen, ConnectionStart, ConnectionStartOk, ConnectionTune, ConnectionTuneOk,
    ContentHeader, Frame, FrameDecoder, Method, PROTOCOL_HEADER,
};
use ferry_amqp::connection::Settings;
use ferry_amqp::AmqpFrontend;
use ferry_core::message::{Properties, ShortString};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{within, TestServer};

/// One AMQP listener on a free port; append listener keys (`max_frame_size = 8192\n`) after it.
pub const AMQP_LISTENER: &str = "[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n";

/// How long a "nothing arrives" check waits: long enough for a wrongly sent frame to show up on
/// loopback, short enough to keep the suite fast.
pub const QUIET: Duration = Duration::from_millis(400);

impl TestServer {
    /// A server with one AMQP listener served by the real AMQP frontend.
    pub async fn amqp() -> TestServer {
        TestServer::amqp_with(Settings::default(), "").await
    }

    /// [`TestServer::amqp`] with frontend settings and extra listener keys.
    pub async fn amqp_with(settings: Settings, listener_keys: &str) -> TestServer {
        let frontend: Arc<dyn ferry_core::frontend::Frontend> = Arc::new(AmqpFrontend::new(settings));
        TestServer::start(&format!("{AMQP_LISTENER}{listener_keys}"), &[frontend]).await
    }

    /// The (first) AMQP listener's address.
    pub fn amqp_addr(&self) -> SocketAddr {
        self.addr_of(ferry_core::Protocol::Amqp)
    }

    /// `amqp://guest:guest@<addr>/%2f` followed by `query` (`?heartbeat=1`).
    pub fn amqp_uri(&self, query: &str) -> String {
        format!("amqp://guest:guest@{}/%2f{query}", self.amqp_addr())
    }
}

// ----- lapin -----------------------------------------------------------------------------------

/// A lapin connection to the default vhost (PLAIN, heartbeat as the server proposes).
pub async fn lapin(server: &TestServer) -> lapin::Connection {
    lapin_uri(&server.amqp_uri("")).await
}

/// A lapin connection to `uri`, failing the test if it does not open.
pub async fn lapin_uri(uri: &str) -> lapin::Connection {
    within("lapin connects", lapin::Connection::connect(uri, lapin::ConnectionProperties::default()))
        .await
        .unwrap_or_else(|e| panic!("lapin connect {uri}: {e}"))
}

/// A lapin connection and one channel on it.
pub async fn lapin_channel(server: &TestServer) -> (lapin::Connection, lapin::Channel) {
    let conn = lapin(server).await;
    let ch = within("channel opens", conn.create_channel()).await.expect("channel.open");
    (conn, ch)
}

/// The reply code of the AMQP error (channel or connection close) inside a lapin error.
pub fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}

/// Asserts that `r` failed with an AMQP error carrying `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: Result<T, lapin::Error>, code: u16) {
    match r {
        Ok(v) => panic!("expected reply code {code}, got Ok({v:?})"),
        Err(e) => assert_eq!(reply_code(&e), Some(code), "expected reply code {code}, got {e:?}"),
    }
}

/// Asserts that the channel was closed by the broker after an asynchronous method (publish,
/// ack) that drew a channel error: lapin reports the close on the next method with its code
/// (checked), or — when it processed the channel.close first — refuses the next method because
/// the channel is closing (then no code can be read from lapin; the raw-byte tests check codes).
#[track_caller]
pub fn assert_closed_after_async<T: std::fmt::Debug>(r: Result<T, lapin::Error>, code: u16) {
    match r {
        Ok(v) => panic!("expected the channel closed with {code}, got Ok({v:?})"),
        Err(e) => match reply_code(&e) {
            Some(got) => assert_eq!(got, code, "expected reply code {code}, got {e:?}"),
            None => assert!(
                matches!(e.kind(), lapin::ErrorKind::InvalidChannelState(..)),
                "expected reply code {code} or a closing channel, got {e:?}"
            ),
        },
    }
}

/// lapin arguments from `(key, value)` pairs.
pub fn args(pairs: &[(&str, lapin::types::AMQPValue)]) -> lapin::types::FieldTable {
    let mut t = lapin::types::FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

// ----- amqprs ----------------------------------------------------------------------------------

/// Arguments for an amqprs connection to `server` as guest with PLAIN.
pub fn amqprs_args(server: &TestServer) -> amqprs::connection::OpenConnectionArguments {
    let addr = server.amqp_addr();
    amqprs::connection::OpenConnectionArguments::new(&addr.ip().to_string(), addr.port(), "guest", "guest")
}

/// An amqprs connection opened with `args`.
pub async fn amqprs_open(args: &amqprs::connection::OpenConnectionArguments) -> amqprs::connection::Connection {
    within("amqprs connects", amqprs::connection::Connection::open(args)).await.expect("amqprs connection.open")
}

// ----- raw frames ------------------------------------------------------------------------------

/// A raw AMQP client over TCP: sends frames (or any bytes) and decodes what comes back.
#[derive(Debug)]
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
    decoder: FrameDecoder,
    /// What the server proposed in connection.tune.
    pub tune: Option<ConnectionTune>,
}

impl RawClient {
    /// Opens a TCP connection and sends nothing yet.
    pub async fn open(addr: SocketAddr) -> RawClient {
        let stream = within("TCP connect", TcpStream::connect(addr)).await.expect("TCP connect");
        RawClient::over(stream)
    }

    /// [`RawClient::start`] from the local address `from`: a client on another host, as the
    /// broker sees it.
    pub async fn start_from(addr: SocketAddr, from: std::net::IpAddr) -> (RawClient, ConnectionStart) {
        let mut c = RawClient::over(crate::tcp_connect_from(addr, from).await);
        c.send_bytes(&PROTOCOL_HEADER).await;
        match c.recv_method().await {
            (0, Method::ConnectionStart(s)) => (c, s),
            other => panic!("expected connection.start, got {other:?}"),
        }
    }

    fn over(stream: TcpStream) -> RawClient {
        stream.set_nodelay(true).expect("nodelay");
        // The client accepts frames of any size the server may send.
        RawClient { stream, buf: BytesMut::new(), decoder: FrameDecoder::new(16 * 1024 * 1024), tune: None }
    }

    /// Sends the protocol header and returns the server's connection.start.
    pub async fn start(addr: SocketAddr) -> (RawClient, ConnectionStart) {
        let mut c = RawClient::open(addr).await;
        c.send_bytes(&PROTOCOL_HEADER).await;
        match c.recv_method().await {
            (0, Method::ConnectionStart(s)) => (c, s),
            other => panic!("expected connection.start, got {other:?}"),
        }
    }

    /// A connection opened on vhost `/` with PLAIN guest/guest, taking the server's tune values
    /// and no heartbeat.
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let (mut c, _) = RawClient::start(addr).await;
        c.send_method(0, Method::ConnectionStartOk(plain_start_ok("guest", "guest"))).await;
        let tune = c.recv_tune().await;
        c.send_method(
            0,
            Method::ConnectionTuneOk(ConnectionTuneOk {
                channel_max: tune.channel_max,
                frame_max: tune.frame_max,
                heartbeat: 0,
            }),
        )
        .await;
        c.open_vhost("/").await;
        match c.recv_method().await {
            (0, Method::ConnectionOpenOk(_)) => c,
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
    }

    /// Reads connection.tune and remembers it.
    pub async fn recv_tune(&mut self) -> ConnectionTune {
        match self.recv_method().await {
            (0, Method::ConnectionTune(t)) => {
                self.tune = Some(t.clone());
                t
            }
            other => panic!("expected connection.tune, got {other:?}"),
        }
    }

    /// Sends connection.open for `vhost`.
    pub async fn open_vhost(&mut self, vhost: &str) {
        let open = ConnectionOpen {
            virtual_host: ShortString::from(vhost),
            capabilities: ShortString::default(),
            insist: false,
        };
        self.send_method(0, Method::ConnectionOpen(open)).await;
    }

    /// Opens channel `ch` and waits for open-ok.
    pub async fn open_channel(&mut self, ch: u16) {
        self.send_method(ch, Method::ChannelOpen(ChannelOpen::default())).await;
        match self.recv_method().await {
            (c, Method::ChannelOpenOk(_)) if c == ch => {}
            other => panic!("expected channel.open-ok on {ch}, got {other:?}"),
        }
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        within("write", self.stream.write_all(bytes)).await.expect("write");
    }

    /// Closes the client's sending side (the server reads end of stream).
    pub async fn shutdown_write(&mut self) {
        within("shutdown", self.stream.shutdown()).await.expect("shutdown");
    }

    pub async fn send_method(&mut self, ch: u16, method: Method) {
        self.send_bytes(&method_bytes(ch, &method)).await;
    }

    /// basic.publish, its content header and its body (in frames of at most `frame_max`).
    pub async fn publish(&mut self, ch: u16, exchange: &str, routing_key: &str, body: &[u8]) {
        let frame_max = self.tune.as_ref().map_or(131_072, |t| t.frame_max);
        let mut out = BytesMut::new();
        let publish = BasicPublish {
            exchange: ShortString::from(exchange),
            routing_key: ShortString::from(routing_key),
            ..BasicPublish::default()
        };
        encode_method_frame(ch, &Method::BasicPublish(publish), &mut out).expect("encode");
        encode_header_frame(ch, &ContentHeader::basic(body.len() as u64, Properties::default()), &mut out)
            .expect("encode");
        encode_body_frames(&mut out, ch, body, frame_max);
        self.send_bytes(&out).await;
    }

    /// The next frame, heartbeats included; `None` at end of stream (or a reset).
    pub async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.decoder.decode(&mut self.buf).expect("the server sends well-formed frames") {
                return Some(f);
            }
            let n = within("a frame from the server", self.stream.read_buf(&mut self.buf)).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// The next frame other than a heartbeat; `None` at end of stream.
    pub async fn recv_frame(&mut self) -> Option<Frame> {
        loop {
            match self.next_frame().await {
                Some(Frame::Heartbeat) => continue,
                other => return other,
            }
        }
    }

    /// The next method frame (content frames are skipped).
    pub async fn recv_method(&mut self) -> (u16, Method) {
        loop {
            match self.recv_frame().await {
                Some(Frame::Method { channel, payload }) => {
                    return (channel, Method::decode_payload(payload).expect("a method the codec knows"))
                }
                Some(_) => continue,
                None => panic!("the server closed the connection while a method was expected"),
            }
        }
    }

    /// Reads until connection.close (skipping anything else), answers close-ok, checks that the
    /// server then closes the socket, and returns the close.
    pub async fn expect_connection_close(&mut self) -> ConnectionClose {
        loop {
            match self.recv_frame().await {
                Some(Frame::Method { channel: 0, payload }) => {
                    if let Ok(Method::ConnectionClose(c)) = Method::decode_payload(payload) {
                        // The server may already have closed the socket after a frame error.
                        let ok = method_bytes(0, &Method::ConnectionCloseOk(ConnectionCloseOk {}));
                        let _ = within("write close-ok", self.stream.write_all(&ok)).await;
                        self.expect_eof().await;
                        return c;
                    }
                }
                Some(_) => {}
                None => panic!("the server closed the socket without connection.close"),
            }
        }
    }

    /// Waits until the server closes the socket; frames before that are ignored.
    pub async fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        // A reset also counts as closed.
        let _ = within("the server closes the socket", self.stream.read_to_end(&mut rest)).await;
    }

    /// Everything the server sends until it closes the socket, raw.
    pub async fn bytes_until_close(&mut self) -> Vec<u8> {
        let mut rest = self.buf.split().to_vec();
        let _ = within("the server closes the socket", self.stream.read_to_end(&mut rest)).await;
        rest
    }
}

/// A PLAIN connection.start-ok.
pub fn plain_start_ok(user: &str, password: &str) -> ConnectionStartOk {
    ConnectionStartOk {
        mechanism: ShortString::from("PLAIN"),
        response: Bytes::from(format!("\0{user}\0{password}")),
        ..ConnectionStartOk::default()
    }
}

/// The bytes of one method frame.
pub fn method_bytes(ch: u16, method: &Method) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_method_frame(ch, method, &mut out).expect("encode");
    out.to_vec()
}

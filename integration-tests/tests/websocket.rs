//! WebSocket listeners (MQTT over WebSocket, MQTT 5.0 §6): the upgrade (path, subprotocol),
//! binary messages read and written as a byte stream by a frontend that never sees WebSocket,
//! text frames refused, and wss. The client is tokio-tungstenite.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use ferry_core::frontend::{ClientStream, ConnectionContext, Frontend, Serving};
use ferry_core::Protocol;
use ferry_integration_tests::{within, EchoFrontend, TestServer};
use ferry_server::Transport;
use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

fn ws_listener(extra: &str) -> String {
    format!("[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\ntransport = \"websocket\"\n{extra}")
}

async fn start(extra: &str, frontend: Arc<dyn Frontend>) -> TestServer {
    TestServer::start(&ws_listener(extra), &[frontend]).await
}

/// Upgrades `io` with a request for `path`, offering `protocols` (one header value) if given.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    host: SocketAddr,
    path: &str,
    protocols: Option<&str>,
) -> Result<(WebSocketStream<S>, Response), WsError> {
    let mut request = format!("ws://{host}{path}").into_client_request().unwrap();
    if let Some(protocols) = protocols {
        request.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, protocols.parse().unwrap());
    }
    within("WebSocket upgrade", tokio_tungstenite::client_async(request, io)).await
}

async fn connect(
    addr: SocketAddr,
    path: &str,
    protocols: Option<&str>,
) -> Result<(WebSocketStream<TcpStream>, Response), WsError> {
    upgrade(TcpStream::connect(addr).await.unwrap(), addr, path, protocols).await
}

fn subprotocol(response: &Response) -> Option<&str> {
    response.headers().get(SEC_WEBSOCKET_PROTOCOL).map(|v| v.to_str().unwrap())
}

/// The next non-control message.
async fn next_message<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Option<Message> {
    within("next WebSocket message", async {
        loop {
            match ws.next().await? {
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(m) => return Some(m),
                Err(e) => panic!("WebSocket error: {e}"),
            }
        }
    })
    .await
}

/// Reads binary messages until `n` bytes have arrived, as a byte stream.
async fn read_bytes<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, n: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    while bytes.len() < n {
        match next_message(ws).await {
            Some(Message::Binary(payload)) => bytes.extend_from_slice(&payload),
            other => panic!("expected binary data, got {other:?}"),
        }
    }
    assert_eq!(bytes.len(), n, "more bytes than expected");
    bytes
}

/// The echo frontend's greeting: the number of TLS peer certificates it saw.
async fn greeting<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> u8 {
    read_bytes(ws, 1).await[0]
}

async fn send(ws: &mut WebSocketStream<impl AsyncRead + AsyncWrite + Unpin>, bytes: &[u8]) {
    within("send", ws.send(Message::binary(bytes.to_vec()))).await.unwrap();
}

#[tokio::test]
async fn bytes_echo_through_websocket_with_the_mqtt_subprotocol() {
    let server = start("", EchoFrontend::new(Protocol::Mqtt)).await;
    let bound = &server.server.listeners()[0];
    assert_eq!(bound.transport, Transport::WebSocket { path: "/mqtt".into() });
    assert!(!bound.tls);

    let (mut ws, response) = connect(server.addr(0), "/mqtt", Some("mqtt")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(subprotocol(&response), Some("mqtt"));
    assert_eq!(greeting(&mut ws).await, 0);
    send(&mut ws, b"hello ferry").await;
    assert_eq!(read_bytes(&mut ws, 11).await, b"hello ferry");
    let big = vec![7u8; 100_000];
    send(&mut ws, &big).await;
    assert_eq!(read_bytes(&mut ws, big.len()).await, big);
}

#[tokio::test]
async fn subprotocol_negotiation_follows_the_offer() {
    let server = start("path = \"/ws\"\n", EchoFrontend::new(Protocol::Mqtt)).await;
    for (offer, answer) in [(Some("mqttv3.1"), Some("mqttv3.1")), (Some("wamp, mqtt"), Some("mqtt")), (None, None)] {
        let (mut ws, response) = connect(server.addr(0), "/ws", offer).await.unwrap();
        assert_eq!(subprotocol(&response), answer, "offer {offer:?}");
        assert_eq!(greeting(&mut ws).await, 0);
        send(&mut ws, b"x").await;
        assert_eq!(read_bytes(&mut ws, 1).await, b"x");
    }
}

#[tokio::test]
async fn another_path_is_refused_with_404() {
    let server = start("", EchoFrontend::new(Protocol::Mqtt)).await;
    match connect(server.addr(0), "/other", Some("mqtt")).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), StatusCode::NOT_FOUND),
        other => panic!("expected a 404, got {:?}", other.map(|(_, r)| r)),
    }
}

#[tokio::test]
async fn an_unsupported_subprotocol_is_refused() {
    let server = start("", EchoFrontend::new(Protocol::Mqtt)).await;
    match connect(server.addr(0), "/mqtt", Some("amqp")).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), StatusCode::BAD_REQUEST),
        other => panic!("expected a 400, got {:?}", other.map(|(_, r)| r)),
    }
    // The listener keeps serving.
    let (mut ws, _) = connect(server.addr(0), "/mqtt", Some("mqtt")).await.unwrap();
    assert_eq!(greeting(&mut ws).await, 0);
}

#[tokio::test]
async fn plain_mqtt_bytes_on_a_websocket_listener_are_not_served() {
    let server = start("", EchoFrontend::new(Protocol::Mqtt)).await;
    let mut tcp = TcpStream::connect(server.addr(0)).await.unwrap();
    let connect = [0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x01, b'c'];
    tcp.write_all(&connect).await.unwrap();
    let mut answer = Vec::new();
    let _ = within("connection closed", tcp.read_to_end(&mut answer)).await;
    assert!(!answer.windows(4).any(|w| w == b"MQTT"), "raw MQTT was echoed: {answer:?}");
}

/// Reads packets `[length u8][body]` as a byte stream and answers each with one write of the
/// same packet: shows that packets may span messages and share one, and that each write is
/// one message.
#[derive(Debug)]
struct PacketFrontend;

impl Frontend for PacketFrontend {
    fn protocol(&self) -> Protocol {
        Protocol::Mqtt
    }

    fn serve(&self, mut stream: ClientStream, ctx: ConnectionContext) -> Serving {
        Box::pin(async move {
            // Its slot is held while it lives.
            let _slot = ctx.slot;
            loop {
                let mut len = [0u8; 1];
                if stream.read(&mut len).await? == 0 {
                    return Ok(());
                }
                let mut packet = vec![0u8; 1 + usize::from(len[0])];
                packet[0] = len[0];
                stream.read_exact(&mut packet[1..]).await?;
                stream.write_all(&packet).await?;
                stream.flush().await?;
            }
        })
    }
}

#[tokio::test]
async fn frames_are_a_byte_stream_and_each_write_is_one_message() {
    let server = start("", Arc::new(PacketFrontend)).await;
    let (mut ws, _) = connect(server.addr(0), "/mqtt", Some("mqtt")).await.unwrap();
    // "hello" spans two messages; "abc" starts in the second and ends in the third.
    send(&mut ws, &[5, b'h', b'e']).await;
    send(&mut ws, &[b'l', b'l', b'o', 3, b'a']).await;
    send(&mut ws, b"bc").await;
    // Two packets in one message.
    send(&mut ws, &[1, b'x', 2, b'y', b'z']).await;
    let expected: [&[u8]; 4] = [b"\x05hello", b"\x03abc", b"\x01x", b"\x02yz"];
    for packet in expected {
        match next_message(&mut ws).await {
            Some(Message::Binary(payload)) => assert_eq!(&payload[..], packet),
            other => panic!("expected {packet:?} as one binary message, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn ping_is_answered_with_pong() {
    let server = start("", EchoFrontend::new(Protocol::Mqtt)).await;
    let (mut ws, _) = connect(server.addr(0), "/mqtt", Some("mqtt")).await.unwrap();
    assert_eq!(greeting(&mut ws).await, 0);
    within("ping", ws.send(Message::Ping(b"are you there".to_vec().into()))).await.unwrap();
    let pong = within("pong", ws.next()).await.unwrap().unwrap();
    assert_eq!(pong, Message::Pong(b"are you there".to_vec().into()));
    send(&mut ws, b"still").await;
    assert_eq!(read_bytes(&mut ws, 5).await, b"still");
}

#[tokio::test]
async fn a_text_frame_closes_the_connection_with_protocol_error() {
    let server = start("", EchoFrontend::new(Protocol::Mqtt)).await;
    let (mut ws, _) = connect(server.addr(0), "/mqtt", Some("mqtt")).await.unwrap();
    assert_eq!(greeting(&mut ws).await, 0);
    within("send text", ws.send(Message::text("CONNECT"))).await.unwrap();
    match next_message(&mut ws).await {
        Some(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Protocol),
        other => panic!("expected a close frame with 1002, got {other:?}"),
    }
    // Nothing more: the text was not echoed and the stream ends.
    let rest = within("end of stream", ws.next()).await;
    assert!(!matches!(rest, Some(Ok(Message::Binary(_) | Message::Text(_)))), "{rest:?}");
}

#[tokio::test]
async fn a_message_beyond_the_size_limit_ends_the_connection() {
    let server = start("max_frame_size = 1024\n", EchoFrontend::new(Protocol::Mqtt)).await;
    let (mut ws, _) = connect(server.addr(0), "/mqtt", Some("mqtt")).await.unwrap();
    assert_eq!(greeting(&mut ws).await, 0);
    // 1024 bytes of packet plus 16 KiB of headroom is what a message may hold.
    let _ = ws.send(Message::binary(vec![0u8; 64 * 1024])).await;
    let end = within("connection ends", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(payload))) => return Some(payload.len()),
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return None,
            }
        }
    })
    .await;
    assert_eq!(end, None, "an oversized message was echoed");
}

#[tokio::test]
async fn shutdown_closes_websocket_clients_normally() {
    let TestServer { server, dir: _dir } =
        TestServer::start(&ws_listener(""), &[EchoFrontend::new(Protocol::Mqtt)]).await;
    let (mut ws, _) = connect(server.local_addr(0), "/mqtt", Some("mqtt")).await.unwrap();
    assert_eq!(greeting(&mut ws).await, 0);
    let report = within("shutdown", server.shutdown()).await.unwrap();
    assert_eq!((report.connections_closed, report.connections_aborted), (1, 0));
    match next_message(&mut ws).await {
        Some(Message::Close(frame)) => {
            assert!(!matches!(&frame, Some(f) if f.code != CloseCode::Normal), "{frame:?}")
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// A CA, a server certificate for localhost signed by it and a client certificate, as in
/// `tests/tls.rs`.
struct Pki {
    ca: CertificateDer<'static>,
    client_cert: CertificateDer<'static>,
    client_key: Vec<u8>,
}

fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name.push(DnType::CommonName, "ferry test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let server_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let server = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["sensor-7".to_string()]).unwrap();
    client_params.distinguished_name.push(DnType::CommonName, "sensor-7");
    let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();

    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    Pki { ca: ca.der().clone(), client_cert: client.der().clone(), client_key: client_key.serialize_der() }
}

fn connector(pki: &Pki) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.client_key.clone()));
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![pki.client_cert.clone()], key)
        .unwrap();
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn wss_upgrades_after_tls_and_keeps_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let toml = ws_listener(
        "path = \"/secure\"\n\
         tls = { cert = \"server.pem\", key = \"server.key\", client_ca = \"ca.pem\", require_client_cert = true }\n",
    );
    let server = TestServer::start_in(dir, &toml, &[EchoFrontend::new(Protocol::Mqtt)])
        .await
        .unwrap_or_else(|e| panic!("server did not start:\n{e}"));
    let bound = &server.server.listeners()[0];
    assert!(bound.tls && bound.transport.is_websocket());

    let tcp = TcpStream::connect(server.addr(0)).await.unwrap();
    let tls =
        within("TLS connect", connector(&pki).connect(ServerName::try_from("localhost").unwrap(), tcp)).await.unwrap();
    let (mut ws, response) = upgrade(tls, server.addr(0), "/secure", Some("mqtt")).await.unwrap();
    assert_eq!(subprotocol(&response), Some("mqtt"));
    assert_eq!(greeting(&mut ws).await, 1, "the frontend should see the client's certificate");
    send(&mut ws, b"over wss").await;
    assert_eq!(read_bytes(&mut ws, 8).await, b"over wss");
}

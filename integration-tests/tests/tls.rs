//! TLS listeners: certificates made with rcgen, clients with tokio-rustls (ring provider); client
//! certificates as identities (`cert_login`) for MQTT and AMQP's EXTERNAL mechanism, through raw
//! MQTT packets and AMQP frames over the TLS stream.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use ferry_amqp::codec::{
    reply_code, ConnectionClose, ConnectionCloseOk, ConnectionOpen, ConnectionStart, ConnectionStartOk,
    ConnectionTuneOk, Frame, FrameDecoder, Method, PROTOCOL_HEADER,
};
use ferry_core::auth::PasswordHash;
use ferry_core::cert_login::CertLogin;
use ferry_core::message::{FieldTable, FieldValue, ShortString};
use ferry_core::Protocol;
use ferry_integration_tests::amqp::method_bytes;
use ferry_integration_tests::mqtt::{connect_packet, packet_bytes, publish_packet, sub_options};
use ferry_integration_tests::{within, EchoFrontend, TestServer};
use ferry_mqtt::codec::{
    reason, return_code, ConnAck, Connect, Decoder, Packet, Properties as MqttProperties, ProtocolVersion, QoS, Str,
    Subscribe,
};
use ferry_server::StartProblem;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use ProtocolVersion::{V311, V5};

/// A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, both signed
/// by the CA, written as PEM into a directory.
struct Pki {
    ca: CertificateDer<'static>,
    client_cert: CertificateDer<'static>,
    client_key: Vec<u8>,
    /// The CA itself, to sign more client certificates ([`Pki::client`]).
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A client certificate and its private key (PKCS#8 DER).
struct ClientCert {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl Pki {
    /// A client certificate signed by the CA whose subject is exactly `subject`, in that order
    /// (least specific first, as in the certificate).
    fn client(&self, subject: &[(DnType, &str)]) -> ClientCert {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["client.example".to_string()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        for (t, v) in subject {
            params.distinguished_name.push(t.clone(), *v);
        }
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        ClientCert { cert: cert.der().clone(), key: key.serialize_der() }
    }
}

fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name.push(DnType::CommonName, "ferry test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut server_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    server_params.distinguished_name.push(DnType::CommonName, "ferry test server");
    let server = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["sensor-7".to_string()]).unwrap();
    client_params.distinguished_name.push(DnType::CommonName, "sensor-7");
    let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();

    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    Pki {
        ca: ca.der().clone(),
        client_cert: client.der().clone(),
        client_key: client_key.serialize_der(),
        ca_cert: ca,
        ca_key,
    }
}

fn connector(pki: &Pki, with_client_cert: bool) -> TlsConnector {
    if with_client_cert {
        connector_as(pki, Some(&ClientCert { cert: pki.client_cert.clone(), key: pki.client_key.clone() }))
    } else {
        connector_as(pki, None)
    }
}

/// A client trusting the CA that presents `client` (if any).
fn connector_as(pki: &Pki, client: Option<&ClientCert>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(c) => {
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key.clone()));
            builder.with_client_auth_cert(vec![c.cert.clone()], key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

/// Reads the echo frontend's greeting (the peer certificate count), then checks an echo.
async fn greeting_and_echo<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> std::io::Result<u8> {
    let mut greeting = [0u8; 1];
    stream.read_exact(&mut greeting).await?;
    stream.write_all(b"over TLS").await?;
    let mut echoed = [0u8; 8];
    stream.read_exact(&mut echoed).await?;
    assert_eq!(&echoed, b"over TLS");
    Ok(greeting[0])
}

fn tls_listener(tls: &str) -> String {
    format!("[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\ntls = {{ {tls} }}\n")
}

async fn start(pki_dir: tempfile::TempDir, tls: &str) -> TestServer {
    TestServer::start_in(pki_dir, &tls_listener(tls), &[EchoFrontend::new(Protocol::Mqtt)])
        .await
        .unwrap_or_else(|e| panic!("server did not start:\n{e}"))
}

#[tokio::test]
async fn tls_handshake_completes_and_bytes_echo() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let server = start(dir, r#"cert = "server.pem", key = "server.key""#).await;
    assert!(server.server.listeners()[0].tls);

    let mut client = within("TLS connect", tls_connect(server.addr(0), &connector(&pki, false))).await.unwrap();
    let certs = within("echo", greeting_and_echo(&mut client)).await.unwrap();
    assert_eq!(certs, 0, "no client certificate was sent");
}

#[tokio::test]
async fn required_client_certificate_is_enforced_and_reaches_the_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let server =
        start(dir, r#"cert = "server.pem", key = "server.key", client_ca = "ca.pem", require_client_cert = true"#)
            .await;

    // Without a certificate: with TLS 1.3 the client's side of the handshake may finish before the
    // server checks, so the refusal can surface at the first read instead.
    let refused = within("TLS without client cert", async {
        let mut client = tls_connect(server.addr(0), &connector(&pki, false)).await?;
        greeting_and_echo(&mut client).await
    })
    .await;
    assert!(refused.is_err(), "a client without a certificate was served: {refused:?}");

    let mut client = within("TLS with client cert", tls_connect(server.addr(0), &connector(&pki, true))).await.unwrap();
    let certs = within("echo", greeting_and_echo(&mut client)).await.unwrap();
    assert_eq!(certs, 1, "the frontend should see the client's certificate");
}

#[tokio::test]
async fn optional_client_certificate_is_accepted_either_way() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let server = start(dir, r#"cert = "server.pem", key = "server.key", client_ca = "ca.pem""#).await;

    let mut anonymous =
        within("TLS without client cert", tls_connect(server.addr(0), &connector(&pki, false))).await.unwrap();
    assert_eq!(within("echo", greeting_and_echo(&mut anonymous)).await.unwrap(), 0);
    let mut known = within("TLS with client cert", tls_connect(server.addr(0), &connector(&pki, true))).await.unwrap();
    assert_eq!(within("echo", greeting_and_echo(&mut known)).await.unwrap(), 1);
}

#[tokio::test]
async fn plain_tcp_on_a_tls_port_is_not_served_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let server = start(dir, r#"cert = "server.pem", key = "server.key""#).await;
    let tls = connector(&pki, false);

    let mut established = within("TLS connect", tls_connect(server.addr(0), &tls)).await.unwrap();
    within("echo", greeting_and_echo(&mut established)).await.unwrap();

    let mut plain = TcpStream::connect(server.addr(0)).await.unwrap();
    plain.write_all(b"hello, no TLS here\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    // The server answers with at most a TLS alert, then closes.
    let _ = within("plain connection closed", plain.read_to_end(&mut answer)).await;
    assert!(!answer.windows(5).any(|w| w == b"hello"), "plain bytes were echoed: {answer:?}");

    // The connection that was open keeps working, and new ones are accepted.
    established.write_all(b"still").await.unwrap();
    let mut echoed = [0u8; 5];
    within("echo after the bad client", established.read_exact(&mut echoed)).await.unwrap();
    assert_eq!(&echoed, b"still");
    let mut fresh = within("TLS connect after the bad client", tls_connect(server.addr(0), &tls)).await.unwrap();
    within("echo", greeting_and_echo(&mut fresh)).await.unwrap();
}

#[tokio::test]
async fn bad_tls_material_and_missing_frontend_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let toml = format!(
        "{}[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n",
        tls_listener(r#"cert = "empty.pem", key = "server.key""#)
    );
    let err = TestServer::start_in(dir, &toml, &[EchoFrontend::new(Protocol::Mqtt)]).await.unwrap_err();
    assert!(matches!(err.problems[0], StartProblem::Tls(_)), "{err}");
    assert!(matches!(err.problems[1], StartProblem::NoFrontend { index: 1, protocol: Protocol::Amqp }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("ferry.toml: listeners[0].tls.cert: no certificate found in "), "{msg}");
    assert!(msg.contains("ferry.toml: listeners[1].protocol: no amqp frontend is built into this ferry"), "{msg}");
}

// ----- client certificates as identities (`cert_login`) ------------------------------------------

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// `cert = "server.pem", key = "server.key", client_ca = "ca.pem"`, then `rest`.
fn verified(rest: &str) -> String {
    format!(r#"cert = "server.pem", key = "server.key", client_ca = "ca.pem"{rest}"#)
}

/// A listener for `protocol` on 127.0.0.1 with `tls` and the extra `keys`.
fn listener(protocol: &str, tls: &str, keys: &str) -> String {
    format!("[[listeners]]\nprotocol = \"{protocol}\"\nbind = \"127.0.0.1:0\"\ntls = {{ {tls} }}\n{keys}\n")
}

/// A server with the real MQTT and AMQP frontends on `toml`, in the directory holding the PKI.
async fn start_real(pki_dir: tempfile::TempDir, toml: &str) -> TestServer {
    let frontends = ferry_server::frontends::builtin(&Default::default());
    TestServer::start_in(pki_dir, toml, &frontends).await.unwrap_or_else(|e| panic!("server did not start:\n{e}"))
}

/// `[[users]]` `name` with password `password`.
fn user(name: &str, password: &[u8]) -> String {
    format!("[[users]]\nname = \"{name}\"\npassword_hash = \"{}\"\n", PasswordHash::argon2id(password))
}

/// A raw MQTT client over TLS, packets made and read with Ferry's codec.
struct MqttTls {
    stream: Tls,
    buf: BytesMut,
    /// Packets read while waiting for another one.
    stash: VecDeque<Packet>,
    decoder: Decoder,
    version: ProtocolVersion,
}

impl MqttTls {
    /// TLS with `connector`, then `connect`; returns the client and its CONNACK.
    async fn connect(addr: SocketAddr, connector: &TlsConnector, connect: Connect) -> (MqttTls, ConnAck) {
        let stream = within("TLS connect", tls_connect(addr, connector)).await.expect("TLS handshake");
        let version = connect.version;
        let mut c = MqttTls {
            stream,
            buf: BytesMut::new(),
            stash: VecDeque::new(),
            decoder: Decoder::with_version(u32::MAX, version),
            version,
        };
        c.send(&Packet::Connect(Box::new(connect))).await;
        match c.next().await {
            Some(Packet::ConnAck(a)) => (c, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, packet: &Packet) {
        let bytes = packet_bytes(packet, self.version);
        within("write", self.stream.write_all(&bytes)).await.expect("write to the broker");
    }

    /// The next packet; `None` once the broker closed the connection.
    async fn next(&mut self) -> Option<Packet> {
        if let Some(p) = self.stash.pop_front() {
            return Some(p);
        }
        within("next packet from the broker", async {
            loop {
                if let Some(p) = self.decoder.decode(&mut self.buf).expect("the broker sends well-formed packets") {
                    return Some(p);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// The first packet `pick` accepts; the others are kept for later.
    async fn expect<T>(&mut self, what: &str, pick: impl Fn(&Packet) -> Option<T>) -> T {
        let mut skipped = VecDeque::new();
        loop {
            match self.next().await {
                Some(p) => match pick(&p) {
                    Some(t) => {
                        skipped.extend(self.stash.drain(..));
                        self.stash = skipped;
                        return t;
                    }
                    None => skipped.push_back(p),
                },
                None => panic!("{what}: the broker closed the connection (after {skipped:?})"),
            }
        }
    }

    /// Publishes at QoS 1 and returns the PUBACK's reason code.
    async fn puback(&mut self, topic: &str, id: u16) -> u8 {
        self.send(&Packet::Publish(publish_packet(topic, QoS::AtLeastOnce, id, b"hello"))).await;
        self.expect("PUBACK", |p| match p {
            Packet::PubAck(a) if a.packet_id == id => Some(a.reason),
            _ => None,
        })
        .await
    }

    /// Subscribes to `filter` at QoS 1 and returns the SUBACK's codes.
    async fn subscribe(&mut self, filter: &str, id: u16) -> Vec<u8> {
        let s = Subscribe {
            packet_id: id,
            properties: MqttProperties::default(),
            filters: vec![(Str::from(filter), sub_options(QoS::AtLeastOnce))],
        };
        self.send(&Packet::Subscribe(s)).await;
        self.expect("SUBACK", |p| match p {
            Packet::SubAck(a) if a.packet_id == id => Some(a.reasons.clone()),
            _ => None,
        })
        .await
    }
}

/// A CONNECT with `user` / `password` (both left out when `user` is `None`).
fn login(version: ProtocolVersion, id: &str, user: Option<&str>, password: &[u8]) -> Connect {
    let mut c = connect_packet(version, id, true);
    c.username = user.map(Str::from);
    c.password = user.map(|_| Bytes::copy_from_slice(password));
    c
}

/// The CONNACK code for a TLS connection through `connector` logging in with `user`/`password`.
async fn mqtt_code(
    addr: SocketAddr,
    connector: &TlsConnector,
    version: ProtocolVersion,
    user: Option<&str>,
    password: &[u8],
) -> u8 {
    MqttTls::connect(addr, connector, login(version, "cert-client", user, password)).await.1.code
}

/// Only sensor-7 (the certificate's CN) may use its own tree; nothing for anyone else.
const SENSOR_ACL: &str = "[[acl]]\nuser = \"sensor-7\"\ntopic = \"sensors/%u/#\"\naccess = \"readwrite\"\n";

#[tokio::test]
async fn mqtt_cert_login_takes_the_common_name_and_ignores_the_connect_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let toml = format!(
        "{}{SENSOR_ACL}{}",
        user("mallory", b"mallory's password"),
        listener("mqtt", &verified(", require_client_cert = true"), "cert_login = \"common_name\"")
    );
    let server = start_real(dir, &toml).await;
    let sensor = connector(&pki, true);

    // Credentials that would be refused, and those of another configured user: neither is
    // looked at; the client is the certificate's CN.
    for (user, password) in [("nobody", &b"wrong"[..]), ("mallory", b"mallory's password")] {
        let connect = login(V5, &format!("as-{user}"), Some(user), password);
        let (mut c, ack) = MqttTls::connect(server.addr(0), &sensor, connect).await;
        assert_eq!(ack.code, reason::SUCCESS, "CONNACK with {user}'s credentials: {ack:?}");

        // sensor-7 may read and write sensors/sensor-7/#: its publish comes back to it.
        assert_eq!(c.subscribe("sensors/sensor-7/#", 1).await, vec![1]);
        assert_eq!(c.puback("sensors/sensor-7/temp", 2).await, reason::SUCCESS);
        let got = c
            .expect("own publish delivered", |p| match p {
                Packet::Publish(p) => Some(p.topic.as_str().to_string()),
                _ => None,
            })
            .await;
        assert_eq!(got, "sensors/sensor-7/temp");
        // ...and nothing else: not the tree %u would give mallory or nobody.
        assert_eq!(c.puback(&format!("sensors/{user}/temp"), 3).await, reason::NOT_AUTHORIZED);
        assert_eq!(c.puback("elsewhere", 4).await, reason::NOT_AUTHORIZED);
        assert_eq!(c.subscribe(&format!("sensors/{user}/#"), 5).await, vec![reason::NOT_AUTHORIZED]);
    }

    // 3.1.1 too, and without any credentials.
    assert_eq!(mqtt_code(server.addr(0), &sensor, V311, Some("nobody"), b"wrong").await, return_code::ACCEPTED);
    assert_eq!(mqtt_code(server.addr(0), &sensor, V5, None, b"").await, reason::SUCCESS);

    // A verified certificate without a CN names nobody: refused, whatever the CONNECT says.
    let no_cn = connector_as(&pki, Some(&pki.client(&[(DnType::OrganizationName, "Acme")])));
    let pw = b"mallory's password";
    assert_eq!(mqtt_code(server.addr(0), &no_cn, V5, Some("mallory"), pw).await, reason::NOT_AUTHORIZED);
    assert_eq!(mqtt_code(server.addr(0), &no_cn, V311, Some("mallory"), pw).await, return_code::NOT_AUTHORIZED);
}

#[tokio::test]
async fn mqtt_cert_login_without_a_certificate_falls_back_to_user_and_password() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let toml = format!(
        "{}{SENSOR_ACL}{}",
        user("sensor", b"s3cret"),
        listener("mqtt", &verified(""), "cert_login = \"common_name\"\nallow_anonymous = false")
    );
    let server = start_real(dir, &toml).await;
    let addr = server.addr(0);
    let anonymous = connector(&pki, false);

    assert_eq!(mqtt_code(addr, &anonymous, V5, Some("sensor"), b"s3cret").await, reason::SUCCESS);
    assert_eq!(mqtt_code(addr, &anonymous, V5, Some("sensor"), b"wrong").await, reason::BAD_USER_NAME_OR_PASSWORD);
    assert_eq!(mqtt_code(addr, &anonymous, V5, Some("sensor-7"), b"s3cret").await, reason::BAD_USER_NAME_OR_PASSWORD);
    assert_eq!(
        mqtt_code(addr, &anonymous, V311, Some("sensor"), b"wrong").await,
        return_code::BAD_USER_NAME_OR_PASSWORD
    );
    assert_ne!(mqtt_code(addr, &anonymous, V5, None, b"").await, reason::SUCCESS, "anonymous is off");

    // The user logged in by password is "sensor", not sensor-7.
    let (mut c, ack) = MqttTls::connect(addr, &anonymous, login(V5, "by-password", Some("sensor"), b"s3cret")).await;
    assert_eq!(ack.code, reason::SUCCESS);
    assert_eq!(c.puback("sensors/sensor-7/temp", 1).await, reason::NOT_AUTHORIZED);

    // On the same listener a certificate still wins over the (wrong) password.
    let (mut c, ack) =
        MqttTls::connect(addr, &connector(&pki, true), login(V5, "by-cert", Some("sensor"), b"wrong")).await;
    assert_eq!(ack.code, reason::SUCCESS);
    assert_eq!(c.puback("sensors/sensor-7/temp", 1).await, reason::NO_MATCHING_SUBSCRIBERS);
}

#[tokio::test]
async fn mqtt_cert_login_by_distinguished_name_uses_the_rfc_4514_subject() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let acl = r#"
[[acl]]
user = "CN=dev-1,O=Acme,C=DE"
topic = "devices/dev-1/#"
access = "readwrite"

[[acl]]
user = "dev-1"
topic = "by-cn/#"
access = "write"
"#;
    let toml = format!(
        "{acl}{}",
        listener("mqtt", &verified(", require_client_cert = true"), "cert_login = \"distinguished_name\"")
    );
    let server = start_real(dir, &toml).await;
    let dev1 =
        pki.client(&[(DnType::CountryName, "DE"), (DnType::OrganizationName, "Acme"), (DnType::CommonName, "dev-1")]);

    let (mut c, ack) =
        MqttTls::connect(server.addr(0), &connector_as(&pki, Some(&dev1)), login(V5, "dev-1", Some("dev-1"), b"x"))
            .await;
    assert_eq!(ack.code, reason::SUCCESS);
    assert_eq!(c.puback("devices/dev-1/t", 1).await, reason::NO_MATCHING_SUBSCRIBERS);
    // The whole subject is the name, not the CN alone.
    assert_eq!(c.puback("by-cn/t", 2).await, reason::NOT_AUTHORIZED);

    // Another certificate with the same CN but another subject is someone else.
    let other = pki.client(&[(DnType::OrganizationName, "Acme"), (DnType::CommonName, "dev-1")]);
    let (mut c, ack) =
        MqttTls::connect(server.addr(0), &connector_as(&pki, Some(&other)), login(V5, "other", None, b"")).await;
    assert_eq!(ack.code, reason::SUCCESS);
    assert_eq!(c.puback("devices/dev-1/t", 1).await, reason::NOT_AUTHORIZED);
}

/// A raw AMQP client over TLS, frames made and read with Ferry's codec.
struct AmqpTls {
    stream: Tls,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl AmqpTls {
    /// TLS with `connector`, then the protocol header; returns the client and connection.start.
    async fn start(addr: SocketAddr, connector: &TlsConnector) -> (AmqpTls, ConnectionStart) {
        let stream = within("TLS connect", tls_connect(addr, connector)).await.expect("TLS handshake");
        let mut c = AmqpTls { stream, buf: BytesMut::new(), decoder: FrameDecoder::new(16 * 1024 * 1024) };
        within("write", c.stream.write_all(&PROTOCOL_HEADER)).await.expect("write");
        match c.recv().await {
            Some(Method::ConnectionStart(s)) => (c, s),
            other => panic!("expected connection.start, got {other:?}"),
        }
    }

    async fn send(&mut self, method: Method) {
        within("write", self.stream.write_all(&method_bytes(0, &method))).await.expect("write");
    }

    /// The next method (heartbeats and content skipped); `None` once the server closed the
    /// connection.
    async fn recv(&mut self) -> Option<Method> {
        within("a frame from the server", async {
            loop {
                match self.decoder.decode(&mut self.buf).expect("the server sends well-formed frames") {
                    Some(Frame::Method { payload, .. }) => {
                        return Some(Method::decode_payload(payload).expect("a method the codec knows"))
                    }
                    Some(_) => continue,
                    None => {}
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// The rest of the login after start-ok: tune, tune-ok, connection.open of `/`. `Ok` on
    /// open-ok, the connection.close (answered) otherwise.
    async fn tune_and_open(&mut self) -> Result<(), ConnectionClose> {
        let tune = match self.recv().await {
            Some(Method::ConnectionTune(t)) => t,
            Some(Method::ConnectionClose(c)) => return Err(c),
            other => panic!("expected connection.tune, got {other:?}"),
        };
        let tune_ok = ConnectionTuneOk { channel_max: tune.channel_max, frame_max: tune.frame_max, heartbeat: 0 };
        self.send(Method::ConnectionTuneOk(tune_ok)).await;
        let open = ConnectionOpen {
            virtual_host: ShortString::from("/"),
            capabilities: ShortString::default(),
            insist: false,
        };
        self.send(Method::ConnectionOpen(open)).await;
        match self.recv().await {
            Some(Method::ConnectionOpenOk(_)) => Ok(()),
            Some(Method::ConnectionClose(c)) => Err(self.answer_close(c).await),
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
    }

    /// Answers the server's connection.close and waits for the socket to close.
    async fn answer_close(&mut self, close: ConnectionClose) -> ConnectionClose {
        let _ = within(
            "write close-ok",
            self.stream.write_all(&method_bytes(0, &Method::ConnectionCloseOk(ConnectionCloseOk {}))),
        )
        .await;
        let mut rest = Vec::new();
        let _ = within("the server closes the socket", self.stream.read_to_end(&mut rest)).await;
        close
    }

    /// The connection.close that comes next (answered).
    async fn expect_close(&mut self) -> ConnectionClose {
        match self.recv().await {
            Some(Method::ConnectionClose(c)) => self.answer_close(c).await,
            other => panic!("expected connection.close, got {other:?}"),
        }
    }
}

/// A start-ok choosing `mechanism` with `response`, asking for `authentication_failure_close`.
fn start_ok(mechanism: &str, response: &[u8]) -> ConnectionStartOk {
    let mut caps = FieldTable::new();
    caps.insert("authentication_failure_close", FieldValue::Bool(true));
    let mut ok = ConnectionStartOk {
        mechanism: ShortString::from(mechanism),
        response: Bytes::copy_from_slice(response),
        ..ConnectionStartOk::default()
    };
    ok.client_properties.insert("capabilities", FieldValue::Table(caps));
    ok
}

fn mechanisms(start: &ConnectionStart) -> Vec<String> {
    String::from_utf8_lossy(&start.mechanisms).split(' ').map(str::to_string).collect()
}

/// Logs in with EXTERNAL (`response` as the SASL response) and opens `/`.
async fn external_open(addr: SocketAddr, connector: &TlsConnector, response: &[u8]) -> Result<(), ConnectionClose> {
    let (mut c, start) = AmqpTls::start(addr, connector).await;
    assert!(mechanisms(&start).contains(&"EXTERNAL".to_string()), "{:?}", start.mechanisms);
    c.send(Method::ConnectionStartOk(start_ok("EXTERNAL", response))).await;
    c.tune_and_open().await
}

fn close_of(close: &ConnectionClose) -> (u16, String) {
    (close.reply_code, close.reply_text.to_string_lossy())
}

#[tokio::test]
async fn amqp_external_logs_in_as_the_certificate_and_permissions_decide_the_vhost() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    // sensor-7 is not a [[users]] entry: its certificate is its credential.
    let permissions = r#"
[[permissions]]
user = "sensor-7"
configure = ".*"
write = ".*"
read = ".*"

[[permissions]]
user = "app"
configure = ".*"
write = ".*"
read = ".*"
"#;
    let toml = format!(
        "{}{permissions}{}",
        user("app", b"app-pw"),
        listener("amqp", &verified(", require_client_cert = true"), "cert_login = \"common_name\"")
    );
    let server = start_real(dir, &toml).await;
    let addr = server.addr(0);
    let sensor = connector(&pki, true);

    let (_, start) = AmqpTls::start(addr, &sensor).await;
    assert_eq!(mechanisms(&start), ["PLAIN", "AMQPLAIN", "EXTERNAL"]);

    // The SASL response (an authorization identity some clients send) is not looked at.
    for response in [&b""[..], b"app", b"\0app\0app-pw"] {
        within("EXTERNAL login", external_open(addr, &sensor, response))
            .await
            .unwrap_or_else(|c| panic!("sensor-7 with response {response:?} refused: {c:?}"));
    }

    // A certificate the CA signed for a name without permissions on "/".
    let intruder = pki.client(&[(DnType::CommonName, "intruder")]);
    let close = external_open(addr, &connector_as(&pki, Some(&intruder)), b"sensor-7").await.unwrap_err();
    assert_eq!(close_of(&close), (530, "NOT_ALLOWED - access to vhost '/' refused for user 'intruder'".into()));

    // PLAIN still works on the same listener, as the user it names.
    let (mut c, _) = AmqpTls::start(addr, &sensor).await;
    c.send(Method::ConnectionStartOk(start_ok("PLAIN", b"\0app\0app-pw"))).await;
    c.tune_and_open().await.unwrap_or_else(|c| panic!("PLAIN app refused: {c:?}"));
    let (mut c, _) = AmqpTls::start(addr, &sensor).await;
    c.send(Method::ConnectionStartOk(start_ok("PLAIN", b"\0app\0wrong"))).await;
    assert_eq!(c.expect_close().await.reply_code, reply_code::ACCESS_REFUSED);
}

#[tokio::test]
async fn amqp_external_without_a_client_certificate_is_refused_and_plain_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let toml = listener("amqp", &verified(""), "cert_login = \"common_name\"");
    let server = start_real(dir, &toml).await;
    let addr = server.addr(0);
    let anonymous = connector(&pki, false);

    // Offered on the listener, but this client has no certificate to log in with.
    let (mut c, start) = AmqpTls::start(addr, &anonymous).await;
    assert_eq!(mechanisms(&start), ["PLAIN", "AMQPLAIN", "EXTERNAL"]);
    c.send(Method::ConnectionStartOk(start_ok("EXTERNAL", b""))).await;
    let close = c.expect_close().await;
    assert_eq!(close.reply_code, reply_code::ACCESS_REFUSED, "{close:?}");
    assert!(close.reply_text.to_string_lossy().contains("no client certificate"), "{close:?}");

    // A client that did not ask for authentication_failure_close sees the socket close.
    let (mut c, _) = AmqpTls::start(addr, &anonymous).await;
    let mut ok = start_ok("EXTERNAL", b"");
    ok.client_properties = FieldTable::new();
    c.send(Method::ConnectionStartOk(ok)).await;
    assert!(c.recv().await.is_none(), "expected the socket closed without a method");

    // With a certificate, EXTERNAL works on the same listener (no [[permissions]]: any vhost).
    within("EXTERNAL login", external_open(addr, &connector(&pki, true), b""))
        .await
        .unwrap_or_else(|c| panic!("sensor-7 refused: {c:?}"));

    // A verified certificate without a CN names nobody.
    let no_cn = connector_as(&pki, Some(&pki.client(&[(DnType::OrganizationName, "Acme")])));
    let (mut c, _) = AmqpTls::start(addr, &no_cn).await;
    c.send(Method::ConnectionStartOk(start_ok("EXTERNAL", b""))).await;
    let close = c.expect_close().await;
    assert_eq!(close.reply_code, reply_code::ACCESS_REFUSED, "{close:?}");
    assert!(close.reply_text.to_string_lossy().contains("no common name"), "{close:?}");

    // guest/guest (a loopback listener, no [[permissions]]) with PLAIN.
    let (mut c, _) = AmqpTls::start(addr, &anonymous).await;
    c.send(Method::ConnectionStartOk(start_ok("PLAIN", b"\0guest\0guest"))).await;
    c.tune_and_open().await.unwrap_or_else(|c| panic!("PLAIN guest refused: {c:?}"));
}

#[tokio::test]
async fn amqp_external_is_not_offered_without_cert_login() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let toml = listener("amqp", &verified(", require_client_cert = true"), "");
    let server = start_real(dir, &toml).await;

    let (mut c, start) = AmqpTls::start(server.addr(0), &connector(&pki, true)).await;
    assert_eq!(mechanisms(&start), ["PLAIN", "AMQPLAIN"]);
    c.send(Method::ConnectionStartOk(start_ok("EXTERNAL", b""))).await;
    let close = c.expect_close().await;
    assert_eq!(close_of(&close), (503, "COMMAND_INVALID - unknown authentication mechanism 'EXTERNAL'".into()));
}

#[test]
fn cert_login_needs_tls_with_a_client_ca_and_a_known_source() {
    let path = Path::new("/etc/ferry/ferry.toml");
    let with = |tls: &str, cert_login: &str| {
        let toml = format!(
            "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:8883\"\n{tls}\ncert_login = \"{cert_login}\"\n"
        );
        ferry_server::Config::from_toml_str(&toml, path).map(|c| c.listeners[0].cert_login)
    };
    let requires = "/etc/ferry/ferry.toml: listeners[0].cert_login: requires listeners[0].tls.client_ca";
    for tls in ["", r#"tls = { cert = "s.pem", key = "s.key" }"#] {
        let err = with(tls, "common_name").unwrap_err().to_string();
        assert!(err.starts_with(requires), "{err}");
    }
    let err = with(r#"tls = { cert = "s.pem", key = "s.key", client_ca = "ca.pem" }"#, "email").unwrap_err();
    assert!(
        err.to_string().contains("listeners[0].cert_login: \"email\": expected common_name or distinguished_name"),
        "{err}"
    );
    let tls = r#"tls = { cert = "s.pem", key = "s.key", client_ca = "ca.pem" }"#;
    assert_eq!(with(tls, "common_name").unwrap(), Some(CertLogin::CommonName));
    assert_eq!(with(tls, "distinguished_name").unwrap(), Some(CertLogin::DistinguishedName));
}

#[tokio::test]
async fn a_public_cert_login_listener_without_users_starts_and_lets_only_certificates_in() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let public = |keys: &str| listener("mqtt", &verified(""), keys).replace("127.0.0.1:0", "0.0.0.0:0");

    // Without cert_login nobody could log in there: refused, as before.
    let plain_dir = tempfile::tempdir().unwrap();
    make_pki(plain_dir.path());
    let err = TestServer::start_in(plain_dir, &public(""), &[EchoFrontend::new(Protocol::Mqtt)]).await.unwrap_err();
    assert!(matches!(err.problems[..], [StartProblem::NoAuthentication { index: 0, .. }]), "{err}");

    let server = start_real(dir, &public("cert_login = \"common_name\"")).await;
    let mut addr = server.addr(0);
    assert!(addr.ip().is_unspecified());
    addr.set_ip([127, 0, 0, 1].into());
    assert_eq!(mqtt_code(addr, &connector(&pki, true), V5, None, b"").await, reason::SUCCESS);
    // No certificate: no users and no anonymous access on a public listener.
    assert_ne!(mqtt_code(addr, &connector(&pki, false), V5, None, b"").await, reason::SUCCESS);
    assert_eq!(
        mqtt_code(addr, &connector(&pki, false), V5, Some("guest"), b"guest").await,
        reason::BAD_USER_NAME_OR_PASSWORD
    );
}

#[test]
fn permissions_may_name_certificate_identities_that_are_not_users() {
    // Certificate names cannot be listed in [[users]] (they have no password): a cert_login
    // listener's [[permissions]] and [[topic_permissions]] must be able to name them.
    let toml = r#"
[[listeners]]
protocol = "amqp"
bind = "0.0.0.0:5671"
cert_login = "distinguished_name"
tls = { cert = "s.pem", key = "s.key", client_ca = "ca.pem", require_client_cert = true }

[[permissions]]
user = "CN=dev-1,O=Acme,C=DE"
configure = "^dev-1\\."
write = ".*"
read = "^dev-1\\."

[[topic_permissions]]
user = "CN=dev-1,O=Acme,C=DE"
exchange = "amq.topic"
write = "^devices\\.dev-1\\."
read = "^devices\\."
"#;
    let config =
        ferry_server::Config::from_toml_str(toml, Path::new("/etc/ferry/ferry.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.permissions.len(), 1);
    assert_eq!(config.topic_permissions.len(), 1);
}

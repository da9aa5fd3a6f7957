//! TLS listeners: certificates made with rcgen, clients with tokio-rustls (ring provider).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use ferry_core::Protocol;
use ferry_integration_tests::{within, EchoFrontend, TestServer};
use ferry_server::StartProblem;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, both signed
/// by the CA, written as PEM into a directory.
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
    Pki { ca: ca.der().clone(), client_cert: client.der().clone(), client_key: client_key.serialize_der() }
}

fn connector(pki: &Pki, with_client_cert: bool) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = if with_client_cert {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.client_key.clone()));
        builder.with_client_auth_cert(vec![pki.client_cert.clone()], key).unwrap()
    } else {
        builder.with_no_client_auth()
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
    assert!(msg.contains("ferry.toml: listeners[1].protocol: no amqp frontend is built into this ferry yet"), "{msg}");
}

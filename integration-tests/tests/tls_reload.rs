//! Reloading while running (`Server::reload`, what SIGHUP does): a TLS listener's certificate and
//! key swapped for new connections while established ones carry on; broken TLS files that leave
//! the old certificate in use; users replaced.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use ferry_core::auth::PasswordHash;
use ferry_core::Protocol;
use ferry_integration_tests::mqtt::{connect_packet, RawClient as MqttRaw};
use ferry_integration_tests::{within, write_config, EchoFrontend, TestServer};
use ferry_mqtt::codec::{return_code, ProtocolVersion, Str};
use ferry_server::StartProblem;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A fresh CA and a server certificate for localhost signed by it, written over `dir/server.pem`
/// and `dir/server.key`; returns the CA, which a client must trust.
fn write_server_cert(dir: &Path, ca_name: &str) -> CertificateDer<'static> {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name.push(DnType::CommonName, ca_name);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut server_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    server_params.distinguished_name.push(DnType::CommonName, "ferry test server");
    let server = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();

    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    ca.der().clone()
}

/// A client that trusts only `ca`.
fn trusting(ca: &CertificateDer<'static>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

/// Reads the echo frontend's greeting byte, then checks an echo.
async fn greeting_and_echo<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> std::io::Result<()> {
    let mut greeting = [0u8; 1];
    stream.read_exact(&mut greeting).await?;
    echo(stream, b"over TLS").await
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    let mut echoed = vec![0u8; bytes.len()];
    stream.read_exact(&mut echoed).await?;
    assert_eq!(echoed, bytes);
    Ok(())
}

const TLS_LISTENER: &str =
    "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\ntls = { cert = \"server.pem\", key = \"server.key\" }\n";

/// A TLS listener (echo frontend) on certificate A; returns the server and A's CA.
async fn start_on_a() -> (TestServer, CertificateDer<'static>) {
    let dir = tempfile::tempdir().unwrap();
    let ca_a = write_server_cert(dir.path(), "ferry test CA A");
    let server = TestServer::start_in(dir, TLS_LISTENER, &[EchoFrontend::new(Protocol::Mqtt)])
        .await
        .unwrap_or_else(|e| panic!("server did not start:\n{e}"));
    (server, ca_a)
}

#[tokio::test]
async fn reload_swaps_the_certificate_for_new_connections_and_keeps_established_ones() {
    let (server, ca_a) = start_on_a().await;
    let a = trusting(&ca_a);
    let mut established = within("TLS connect on A", tls_connect(server.addr(0), &a)).await.unwrap();
    within("echo on A", greeting_and_echo(&mut established)).await.unwrap();

    let ca_b = write_server_cert(server.dir.path(), "ferry test CA B");
    let report = server.server.reload(&write_config(server.dir.path(), TLS_LISTENER)).unwrap();
    assert_eq!(report.tls_reloaded, vec![0]);
    assert_eq!(report.users, Some(0));
    assert!(report.needs_restart.is_empty(), "{:?}", report.needs_restart);

    let b = trusting(&ca_b);
    let mut fresh = within("TLS connect on B", tls_connect(server.addr(0), &b)).await.unwrap();
    within("echo on B", greeting_and_echo(&mut fresh)).await.unwrap();

    let refused = within("TLS connect trusting only A", async {
        let mut client = tls_connect(server.addr(0), &a).await?;
        greeting_and_echo(&mut client).await
    })
    .await;
    assert!(refused.is_err(), "a client trusting only A accepted the new certificate");

    within("echo on the connection made before the reload", echo(&mut established, b"still here")).await.unwrap();
}

#[tokio::test]
async fn a_broken_key_is_reported_and_the_old_certificate_stays() {
    let (server, ca_a) = start_on_a().await;
    let a = trusting(&ca_a);
    let mut established = within("TLS connect on A", tls_connect(server.addr(0), &a)).await.unwrap();
    within("echo on A", greeting_and_echo(&mut established)).await.unwrap();

    let config = write_config(server.dir.path(), TLS_LISTENER);
    std::fs::write(server.dir.path().join("server.key"), "-----BEGIN PRIVATE KEY-----\nbroken\n").unwrap();
    let err = server.server.reload(&config).unwrap_err();
    assert!(matches!(err.problems[..], [StartProblem::Tls(_)]), "{err}");
    assert!(err.to_string().contains("listeners[0].tls.key"), "{err}");
    assert!(err.report.tls_reloaded.is_empty());

    let mut fresh = within("TLS connect on A after the failed reload", tls_connect(server.addr(0), &a)).await.unwrap();
    within("echo on A", greeting_and_echo(&mut fresh)).await.unwrap();
    within("echo on the established connection", echo(&mut established, b"unharmed")).await.unwrap();
}

#[tokio::test]
async fn listener_changes_are_reported_as_needing_a_restart() {
    let (server, ca_a) = start_on_a().await;
    let changed = format!(
        "{TLS_LISTENER}[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n[broker]\nshutdown_grace_secs = 3\n"
    );
    let report = server.server.reload(&write_config(server.dir.path(), &changed)).unwrap();
    assert_eq!(report.tls_reloaded, vec![0], "the unchanged TLS listener is still reloaded");
    assert_eq!(report.needs_restart.len(), 2, "{:?}", report.needs_restart);
    assert!(report.needs_restart.iter().any(|c| c.contains("listeners[1] added")), "{:?}", report.needs_restart);
    assert!(report.needs_restart.iter().any(|c| c.contains("[broker]")), "{:?}", report.needs_restart);
    // Nothing was started for the new listener; the old one serves on.
    assert_eq!(server.server.listeners().len(), 1);
    let mut client = within("TLS connect", tls_connect(server.addr(0), &trusting(&ca_a))).await.unwrap();
    within("echo", greeting_and_echo(&mut client)).await.unwrap();
}

fn users_config(name: &str, password: &[u8]) -> String {
    let hash = PasswordHash::argon2id(password);
    format!(
        "[[users]]\nname = \"{name}\"\npassword_hash = \"{hash}\"\n\
         [[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = false\n"
    )
}

async fn mqtt_code(s: &TestServer, user: &str, password: &[u8]) -> u8 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let id = format!("reload-client-{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let mut c = connect_packet(ProtocolVersion::V311, &id, true);
    c.username = Some(Str::from(user));
    c.password = Some(bytes::Bytes::copy_from_slice(password));
    let (_client, ack) = within("MQTT connect", MqttRaw::connect(s.addr(0), c)).await;
    ack.code
}

#[tokio::test]
async fn reload_replaces_the_users() {
    let frontends = ferry_server::frontends::builtin(&Default::default());
    let s = TestServer::start(&users_config("sensor", b"old-pass"), &frontends).await;
    assert_eq!(mqtt_code(&s, "sensor", b"old-pass").await, return_code::ACCEPTED);

    let report = s.server.reload(&write_config(s.dir.path(), &users_config("sensor", b"new-pass"))).unwrap();
    assert_eq!(report.users, Some(1));
    assert!(report.needs_restart.is_empty(), "{:?}", report.needs_restart);
    assert_eq!(mqtt_code(&s, "sensor", b"new-pass").await, return_code::ACCEPTED);
    assert_eq!(mqtt_code(&s, "sensor", b"old-pass").await, return_code::BAD_USER_NAME_OR_PASSWORD);
}

#[tokio::test]
async fn users_that_would_lock_everyone_out_of_a_public_listener_are_not_applied() {
    let frontends = ferry_server::frontends::builtin(&Default::default());
    let public = users_config("sensor", b"pass").replace("127.0.0.1:0", "0.0.0.0:0");
    let s = TestServer::start(&public, &frontends).await;
    let no_users = "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"0.0.0.0:0\"\nallow_anonymous = false\n";
    let err = s.server.reload(&write_config(s.dir.path(), no_users)).unwrap_err();
    assert!(matches!(err.problems[..], [StartProblem::NoAuthentication { index: 0, .. }]), "{err}");
    assert_eq!(err.report.users, None);
    assert_eq!(mqtt_code(&s, "sensor", b"pass").await, return_code::ACCEPTED, "the old users stay");
}

//! The server over plain TCP: echo through a frontend, connection limits, graceful shutdown,
//! and what the default listeners answer while no frontend is built in.

use std::time::{Duration, Instant};

use ferry_core::Protocol;
use ferry_integration_tests::{within, DeafFrontend, EchoFrontend, TestServer};
use ferry_server::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ONE_MQTT_LISTENER: &str = "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n";

async fn greeting(stream: &mut TcpStream) -> u8 {
    let mut b = [0u8; 1];
    within("greeting", stream.read_exact(&mut b)).await.unwrap();
    b[0]
}

async fn echo(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).await.unwrap();
    let mut back = vec![0u8; bytes.len()];
    within("echo", stream.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, bytes);
}

#[tokio::test]
async fn plain_tcp_bytes_echo_through_the_frontend() {
    let server = TestServer::start(ONE_MQTT_LISTENER, &[EchoFrontend::new(Protocol::Mqtt)]).await;
    let bound = &server.server.listeners()[0];
    assert_ne!(bound.addr.port(), 0, "the real port is reported");
    assert!(bound.served && !bound.tls);
    assert!(server.dir.path().join("data").is_dir(), "data directory created at start");

    let mut client = TcpStream::connect(server.addr(0)).await.unwrap();
    assert_eq!(greeting(&mut client).await, 0);
    echo(&mut client, b"hello ferry").await;
    echo(&mut client, &[0u8; 10_000]).await;
}

#[tokio::test]
async fn listeners_of_both_protocols_and_their_vhosts_are_wired() {
    let toml = "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\nvhost = \"plant\"\n\
                [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n";
    let frontends = [EchoFrontend::new(Protocol::Mqtt) as _, EchoFrontend::new(Protocol::Amqp) as _];
    let server = TestServer::start(toml, &frontends).await;
    assert!(server.server.broker().vhost("plant").is_some(), "a listener's vhost exists at start");
    assert!(server.server.broker().vhost("/").is_some());
    for index in 0..2 {
        let mut client = TcpStream::connect(server.addr(index)).await.unwrap();
        assert_eq!(greeting(&mut client).await, 0);
        echo(&mut client, b"x").await;
    }
}

#[tokio::test]
async fn shutdown_with_an_open_connection_completes_within_the_grace_period() {
    let toml = format!("[broker]\nshutdown_grace_secs = 5\n{ONE_MQTT_LISTENER}");
    let TestServer { server, dir: _dir } = TestServer::start(&toml, &[EchoFrontend::new(Protocol::Mqtt)]).await;
    let addr = server.local_addr(0);
    let mut client = TcpStream::connect(addr).await.unwrap();
    greeting(&mut client).await;
    echo(&mut client, b"before").await;

    let started = Instant::now();
    let report = within("shutdown", server.shutdown()).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!((report.connections_closed, report.connections_aborted), (1, 0));

    let mut rest = Vec::new();
    within("client sees the close", client.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
    assert!(TcpStream::connect(addr).await.is_err(), "the listener still accepts after shutdown");
}

#[tokio::test]
async fn connections_that_ignore_shutdown_are_aborted_after_the_grace_period() {
    let toml = format!("[broker]\nshutdown_grace_secs = 1\n{ONE_MQTT_LISTENER}");
    let TestServer { server, dir: _dir } = TestServer::start(&toml, &[DeafFrontend::new(Protocol::Mqtt)]).await;
    let mut client = TcpStream::connect(server.local_addr(0)).await.unwrap();
    greeting(&mut client).await;

    let started = Instant::now();
    let report = within("shutdown", server.shutdown()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1), "did not wait for the grace period");
    assert_eq!((report.connections_closed, report.connections_aborted), (0, 1));
    let mut rest = Vec::new();
    let _ = within("client sees the abort", client.read_to_end(&mut rest)).await;
}

/// Over `max_connections` a client is handed to the frontend only to be refused in its
/// protocol's terms (here the echo frontend's refusal byte); a freed slot admits a new one.
#[tokio::test]
async fn max_connections_refuses_new_clients_until_a_slot_frees() {
    let toml = format!("{ONE_MQTT_LISTENER}max_connections = 1\n");
    let server = TestServer::start(&toml, &[EchoFrontend::new(Protocol::Mqtt)]).await;
    let mut first = TcpStream::connect(server.addr(0)).await.unwrap();
    assert_eq!(greeting(&mut first).await, 0);

    let mut second = TcpStream::connect(server.addr(0)).await.unwrap();
    assert_eq!(greeting(&mut second).await, EchoFrontend::REFUSED, "refused beyond max_connections = 1");
    let mut rest = Vec::new();
    within("the refused connection is closed", second.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
    echo(&mut first, b"still served").await;

    drop(first);
    // The slot comes back when the first connection's task ends, a moment after the close:
    // each try is a whole connect and greeting.
    let mut third = within("a freed slot admits a new client", async {
        loop {
            let mut c = TcpStream::connect(server.addr(0)).await.unwrap();
            if greeting(&mut c).await == 0 {
                return c;
            }
        }
    })
    .await;
    echo(&mut third, b"now").await;
}

/// The embedded defaults with their ports moved to 0, as `ferry` runs with no file.
async fn defaults_on_free_ports() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::embedded_defaults();
    config.broker.data_dir = dir.path().join("data");
    for l in &mut config.listeners {
        l.bind.set_port(0);
    }
    for h in &mut config.http {
        h.bind.set_port(0);
    }
    let server = Server::builder(config).start().await.unwrap();
    assert!(server.listeners().iter().all(|l| !l.served));
    (server, dir)
}

async fn exchange(addr: std::net::SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(hello).await.unwrap();
    let mut reply = Vec::new();
    within("reply and close", client.read_to_end(&mut reply)).await.unwrap();
    reply
}

#[tokio::test]
async fn default_amqp_listener_without_frontend_answers_the_protocol_header() {
    let (server, _dir) = defaults_on_free_ports().await;
    assert_eq!(exchange(server.local_addr(1), b"AMQP\x00\x00\x09\x01").await, b"AMQP\x00\x00\x09\x01");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn default_mqtt_listener_without_frontend_refuses_311_and_5_in_their_own_terms() {
    let (server, _dir) = defaults_on_free_ports().await;
    let connect_311 = [0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x01, b'c'];
    assert_eq!(exchange(server.local_addr(0), &connect_311).await, [0x20, 0x02, 0x00, 0x03]);
    let connect_5 = [0x10, 0x0e, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00, 0x01, b'c'];
    assert_eq!(exchange(server.local_addr(0), &connect_5).await, [0x20, 0x03, 0x00, 0x88, 0x00]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_data_dir_that_cannot_be_created_refuses_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ferry_integration_tests::write_config(dir.path(), ONE_MQTT_LISTENER);
    std::fs::write(dir.path().join("a-file"), "").unwrap();
    config.broker.data_dir = dir.path().join("a-file").join("data");
    let err = Server::builder(config).frontend(EchoFrontend::new(Protocol::Mqtt)).start().await.unwrap_err();
    assert!(matches!(err.problems[..], [ferry_server::StartProblem::DataDir { .. }]), "{err}");
    assert!(err.to_string().contains("ferry.toml: broker.data_dir: cannot create "), "{err}");
}

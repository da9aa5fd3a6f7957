//! AMQP connection set-up and tear-down through the real frontend: protocol header, start /
//! start-ok (PLAIN, AMQPLAIN), server properties, tune / tune-ok, open, heartbeats, close,
//! update-secret.

use std::time::{Duration, Instant};

use amqprs::channel::{BasicPublishArguments, QueueDeclareArguments};
use amqprs::security::SecurityCredentials;
use amqprs::BasicProperties;
use ferry_amqp::codec::{
    reply_code, ChannelClose, ChannelOpen, ConnectionClose, ConnectionTuneOk, Frame, Method, FRAME_MIN_SIZE,
    PROTOCOL_HEADER,
};
use ferry_amqp::connection::Settings;
use ferry_core::message::{FieldValue, ShortString};
use ferry_integration_tests::amqp::{
    amqprs_args, amqprs_open, assert_code, lapin, lapin_channel, lapin_uri, plain_start_ok, RawClient,
};
use ferry_integration_tests::{within, TestServer};
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties as LapinProperties;

/// Sends `bytes` as the first thing on a fresh connection and returns all the server sends
/// until it closes the socket.
async fn reply_to_header(server: &TestServer, bytes: &[u8]) -> Vec<u8> {
    let mut c = RawClient::open(server.amqp_addr()).await;
    c.send_bytes(bytes).await;
    c.bytes_until_close().await
}

#[tokio::test]
async fn wrong_protocol_version_gets_the_0_9_1_header_back_then_close() {
    let server = TestServer::amqp().await;
    assert_eq!(reply_to_header(&server, b"AMQP\x00\x00\x09\x00").await, PROTOCOL_HEADER);
    assert_eq!(reply_to_header(&server, b"AMQP\x01\x01\x00\x0a").await, PROTOCOL_HEADER, "AMQP 1.0");
}

#[tokio::test]
async fn http_request_gets_the_amqp_header_back_then_close() {
    let server = TestServer::amqp().await;
    let reply = reply_to_header(&server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(reply, PROTOCOL_HEADER);
}

#[tokio::test]
async fn lapin_plain_login_declares_publishes_and_gets() {
    let server = TestServer::amqp().await;
    let (_conn, ch) = lapin_channel(&server).await;
    let q =
        within("declare", ch.queue_declare("plain-q".into(), QueueDeclareOptions::default(), FieldTable::default()))
            .await
            .unwrap();
    assert_eq!(q.name().as_str(), "plain-q");
    within(
        "publish",
        ch.basic_publish(
            "".into(),
            "plain-q".into(),
            BasicPublishOptions::default(),
            b"hello",
            LapinProperties::default(),
        ),
    )
    .await
    .unwrap();
    let got = within("get", ch.basic_get("plain-q".into(), BasicGetOptions { no_ack: true })).await.unwrap();
    assert_eq!(got.expect("a message").delivery.data, b"hello");
}

#[tokio::test]
async fn lapin_amqplain_login_is_accepted() {
    let server = TestServer::amqp().await;
    let conn = lapin_uri(&server.amqp_uri("?auth_mechanism=amqplain")).await;
    let ch = within("channel", conn.create_channel()).await.unwrap();
    within("declare", ch.queue_declare("amqplain-q".into(), QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .unwrap();
}

#[tokio::test]
async fn amqprs_amqplain_login_publishes_to_a_declared_queue() {
    let server = TestServer::amqp().await;
    let mut args = amqprs_args(&server);
    args.credentials(SecurityCredentials::new_amqplain("guest", "guest"));
    let conn = amqprs_open(&args).await;
    let ch = within("channel", conn.open_channel(None)).await.unwrap();
    let (name, _, _) =
        within("declare", ch.queue_declare(QueueDeclareArguments::new("amqprs-q"))).await.unwrap().expect("declare-ok");
    assert_eq!(name, "amqprs-q");
    within(
        "publish",
        ch.basic_publish(BasicProperties::default(), b"x".to_vec(), BasicPublishArguments::new("", "amqprs-q")),
    )
    .await
    .unwrap();
    let (_, count, _) =
        within("passive declare", ch.queue_declare(QueueDeclareArguments::new("amqprs-q").passive(true).finish()))
            .await
            .unwrap()
            .expect("declare-ok");
    assert_eq!(count, 1);
    within("close", conn.close()).await.unwrap();
}

#[tokio::test]
async fn raw_amqplain_response_table_is_accepted() {
    let server = TestServer::amqp().await;
    let (mut c, _) = RawClient::start(server.amqp_addr()).await;
    // AMQPLAIN's response is a field table without its 4-byte length.
    let mut t = ferry_core::message::FieldTable::new();
    t.insert("LOGIN", FieldValue::string("guest"));
    t.insert("PASSWORD", FieldValue::string("guest"));
    let mut framed = bytes::BytesMut::new();
    ferry_amqp::codec::encode_field_table(&t, &mut framed).unwrap();
    let mut ok = plain_start_ok("x", "y");
    ok.mechanism = ShortString::from("AMQPLAIN");
    ok.response = framed.freeze().slice(4..);
    c.send_method(0, Method::ConnectionStartOk(ok)).await;
    let tune = c.recv_tune().await;
    assert_eq!(tune.frame_max, 131_072);
}

#[tokio::test]
async fn server_properties_advertise_rabbitmq_capabilities_and_both_mechanisms() {
    let server = TestServer::amqp().await;
    let (_c, start) = RawClient::start(server.amqp_addr()).await;
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    let mechanisms = String::from_utf8(start.mechanisms.to_vec()).unwrap();
    let mechanisms: Vec<&str> = mechanisms.split(' ').collect();
    assert!(mechanisms.contains(&"PLAIN") && mechanisms.contains(&"AMQPLAIN"), "{mechanisms:?}");
    let Some(FieldValue::Table(caps)) = start.server_properties.get("capabilities") else {
        panic!("no capabilities table in {:?}", start.server_properties);
    };
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        assert_eq!(caps.get(cap), Some(&FieldValue::Bool(true)), "capability {cap}");
    }
}

#[tokio::test]
async fn tune_ok_with_frame_max_above_the_servers_is_refused_with_530() {
    let server = TestServer::amqp().await;
    let (mut c, _) = RawClient::start(server.amqp_addr()).await;
    c.send_method(0, Method::ConnectionStartOk(plain_start_ok("guest", "guest"))).await;
    let tune = c.recv_tune().await;
    let ok = ConnectionTuneOk { channel_max: tune.channel_max, frame_max: tune.frame_max + 1, heartbeat: 0 };
    c.send_method(0, Method::ConnectionTuneOk(ok)).await;
    let close = c.expect_connection_close().await;
    assert_eq!(close.reply_code, reply_code::NOT_ALLOWED, "{close:?}");
}

#[tokio::test]
async fn tune_ok_with_frame_max_below_the_minimum_is_refused_with_530() {
    let server = TestServer::amqp().await;
    let (mut c, _) = RawClient::start(server.amqp_addr()).await;
    c.send_method(0, Method::ConnectionStartOk(plain_start_ok("guest", "guest"))).await;
    let tune = c.recv_tune().await;
    let ok = ConnectionTuneOk { channel_max: tune.channel_max, frame_max: FRAME_MIN_SIZE - 1, heartbeat: 0 };
    c.send_method(0, Method::ConnectionTuneOk(ok)).await;
    assert_eq!(c.expect_connection_close().await.reply_code, reply_code::NOT_ALLOWED);
}

#[tokio::test]
async fn tune_proposes_the_listener_frame_max_and_the_configured_channel_max() {
    let settings = Settings { channel_max: 7, heartbeat: 30, ..Settings::default() };
    let server = TestServer::amqp_with(settings, "max_frame_size = 8192\n").await;
    let (mut c, _) = RawClient::start(server.amqp_addr()).await;
    c.send_method(0, Method::ConnectionStartOk(plain_start_ok("guest", "guest"))).await;
    let tune = c.recv_tune().await;
    assert_eq!((tune.channel_max, tune.frame_max, tune.heartbeat), (7, 8192, 30));
}

/// channel_max bounds how many channels are open at once, not their numbers (RabbitMQ 3.10
/// opens channel 65535 under channel_max 2047); one more is a 530 connection error, with
/// RabbitMQ's text and class/method 0.
#[tokio::test]
async fn channel_max_limits_open_channels_not_their_numbers_with_530() {
    let settings = Settings { channel_max: 3, ..Settings::default() };
    let server = TestServer::amqp_with(settings, "").await;
    let mut c = RawClient::connect(server.amqp_addr()).await;
    assert_eq!(c.tune.as_ref().unwrap().channel_max, 3);
    c.open_channel(u16::MAX).await;
    c.open_channel(4).await;
    c.open_channel(3).await;
    c.send_method(1, Method::ChannelOpen(ChannelOpen::default())).await;
    let close = c.expect_connection_close().await;
    assert_eq!(
        (close.reply_code, close.reply_text.to_string_lossy().as_str(), close.class_id, close.method_id),
        (
            reply_code::NOT_ALLOWED,
            "NOT_ALLOWED - number of channels opened (3) has reached the negotiated channel_max (3)",
            0,
            0
        ),
        "{close:?}"
    );
}

#[tokio::test]
async fn a_closed_channel_frees_its_place_under_channel_max() {
    let settings = Settings { channel_max: 1, ..Settings::default() };
    let server = TestServer::amqp_with(settings, "").await;
    let mut c = RawClient::connect(server.amqp_addr()).await;
    c.open_channel(9).await;
    let close = ChannelClose { reply_code: 200, ..ChannelClose::default() };
    c.send_method(9, Method::ChannelClose(close)).await;
    assert!(matches!(c.recv_method().await, (9, Method::ChannelCloseOk(_))));
    c.open_channel(10).await;
    c.send_method(11, Method::ChannelOpen(ChannelOpen::default())).await;
    assert_eq!(c.expect_connection_close().await.reply_code, reply_code::NOT_ALLOWED);
}

#[tokio::test]
async fn channel_max_the_client_asks_below_the_servers_is_honoured() {
    let server = TestServer::amqp().await;
    let (mut c, _) = RawClient::start(server.amqp_addr()).await;
    c.send_method(0, Method::ConnectionStartOk(plain_start_ok("guest", "guest"))).await;
    let tune = c.recv_tune().await;
    c.send_method(
        0,
        Method::ConnectionTuneOk(ConnectionTuneOk { channel_max: 2, frame_max: tune.frame_max, heartbeat: 0 }),
    )
    .await;
    c.open_vhost("/").await;
    assert!(matches!(c.recv_method().await, (0, Method::ConnectionOpenOk(_))));
    c.open_channel(2).await;
    c.open_channel(3).await;
    c.send_method(4, Method::ChannelOpen(ChannelOpen::default())).await;
    assert_eq!(c.expect_connection_close().await.reply_code, reply_code::NOT_ALLOWED);
}

#[tokio::test]
async fn lapin_negotiates_the_servers_channel_max() {
    let settings = Settings { channel_max: 2, ..Settings::default() };
    let server = TestServer::amqp_with(settings, "").await;
    let conn = lapin(&server).await;
    let _a = within("channel 1", conn.create_channel()).await.unwrap();
    let _b = within("channel 2", conn.create_channel()).await.unwrap();
    let third = within("channel 3", conn.create_channel()).await;
    assert!(matches!(third.as_ref().map_err(|e| e.kind()), Err(lapin::ErrorKind::ChannelsLimitReached)), "{third:?}");
}

#[tokio::test]
async fn open_of_a_vhost_that_does_not_exist_is_refused_with_530() {
    let server = TestServer::amqp().await;
    let uri = format!("amqp://guest:guest@{}/no-such-vhost", server.amqp_addr());
    let r = within("connect", lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())).await;
    assert_code(r.map(|_| ()), reply_code::NOT_ALLOWED);
}

#[tokio::test]
async fn open_of_a_vhost_that_does_not_exist_closes_with_530_raw() {
    let server = TestServer::amqp().await;
    let (mut c, _) = RawClient::start(server.amqp_addr()).await;
    c.send_method(0, Method::ConnectionStartOk(plain_start_ok("guest", "guest"))).await;
    let tune = c.recv_tune().await;
    c.send_method(
        0,
        Method::ConnectionTuneOk(ConnectionTuneOk { channel_max: 0, frame_max: tune.frame_max, heartbeat: 0 }),
    )
    .await;
    c.open_vhost("nope").await;
    let close = c.expect_connection_close().await;
    assert_eq!(close.reply_code, reply_code::NOT_ALLOWED, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (10, 40), "names connection.open");
}

// On tokio's paused clock: the broker's heartbeat timers are tokio timers, so the two seconds
// pass in virtual time (the state machine's own deadlines are unit-tested in
// ferry-amqp's connection/time_tests.rs). Client and broker share this one-thread runtime.
#[tokio::test(start_paused = true)]
async fn silent_client_with_a_1s_heartbeat_gets_heartbeats_then_is_disconnected() {
    let server = TestServer::amqp().await;
    let (mut c, _) = RawClient::start(server.amqp_addr()).await;
    c.send_method(0, Method::ConnectionStartOk(plain_start_ok("guest", "guest"))).await;
    let tune = c.recv_tune().await;
    c.send_method(
        0,
        Method::ConnectionTuneOk(ConnectionTuneOk { channel_max: 0, frame_max: tune.frame_max, heartbeat: 1 }),
    )
    .await;
    c.open_vhost("/").await;
    let opened = tokio::time::Instant::now();
    assert!(matches!(c.recv_method().await, (0, Method::ConnectionOpenOk(_))));
    let mut heartbeats = 0;
    loop {
        match c.next_frame().await {
            Some(Frame::Heartbeat) => heartbeats += 1,
            Some(other) => panic!("unexpected frame {other:?}"),
            None => break,
        }
    }
    let silent_for = opened.elapsed();
    assert!(heartbeats >= 3, "the server sends heartbeats while it waits ({heartbeats})");
    // Two missed intervals (RabbitMQ's rule): not before 2 s, and not much after.
    assert!(silent_for >= Duration::from_secs(2), "disconnected after only {silent_for:?}");
    assert!(silent_for < Duration::from_millis(2100), "disconnected only after {silent_for:?}");
}

#[tokio::test(start_paused = true)]
async fn client_sending_heartbeats_stays_connected() {
    let server = TestServer::amqp().await;
    let (mut c, _) = RawClient::start(server.amqp_addr()).await;
    c.send_method(0, Method::ConnectionStartOk(plain_start_ok("guest", "guest"))).await;
    let tune = c.recv_tune().await;
    c.send_method(
        0,
        Method::ConnectionTuneOk(ConnectionTuneOk { channel_max: 0, frame_max: tune.frame_max, heartbeat: 1 }),
    )
    .await;
    c.open_vhost("/").await;
    assert!(matches!(c.recv_method().await, (0, Method::ConnectionOpenOk(_))));
    // Answer each server heartbeat with one of ours for 5 s of the paused clock (five
    // heartbeat intervals, past the 2 s after which a silent client is dropped).
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until {
        match c.next_frame().await {
            Some(Frame::Heartbeat) => c.send_bytes(&[8, 0, 0, 0, 0, 0, 0, 0xCE]).await,
            other => panic!("expected a heartbeat, got {other:?}"),
        }
    }
    c.open_channel(1).await;
}

#[tokio::test]
async fn lapin_with_a_1s_heartbeat_stays_connected_while_idle() {
    let server = TestServer::amqp().await;
    let conn = lapin_uri(&server.amqp_uri("?heartbeat=1")).await;
    // Idle for two and a half heartbeat intervals: a broker that missed lapin's heartbeats, or
    // sent none, would have dropped the connection after two. This is a bounded "nothing
    // happens" wait, on the real clock: lapin runs its own I/O threads, which a paused tokio
    // clock would not wait for. The only end-to-end check with a third-party client; the
    // deadlines themselves are unit-tested (ferry-amqp connection/time_tests.rs).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(conn.status().connected());
    let ch = within("channel after idling", conn.create_channel()).await.unwrap();
    within("declare", ch.queue_declare("".into(), QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .unwrap();
}

#[tokio::test]
async fn lapin_close_is_answered_with_close_ok() {
    let server = TestServer::amqp().await;
    let conn = lapin(&server).await;
    // close() resolves only once the broker's close-ok arrived.
    within("close", conn.close(200, "bye".into())).await.unwrap();
    // lapin then settles on Closed, or Error when it reads the socket's EOF first (the broker
    // closes the socket right after close-ok, as the spec says); never connected again.
    assert!(!conn.status().connected(), "{:?}", conn.status());
}

#[tokio::test]
async fn raw_close_gets_close_ok_then_the_socket_closes() {
    let server = TestServer::amqp().await;
    let mut c = RawClient::connect(server.amqp_addr()).await;
    c.open_channel(1).await;
    let close = ConnectionClose { reply_code: 200, reply_text: ShortString::from("bye"), class_id: 0, method_id: 0 };
    c.send_method(0, Method::ConnectionClose(close)).await;
    assert!(matches!(c.recv_method().await, (0, Method::ConnectionCloseOk(_))));
    c.expect_eof().await;
}

#[tokio::test]
async fn update_secret_is_acknowledged() {
    let server = TestServer::amqp().await;
    let (conn, ch) = lapin_channel(&server).await;
    within("update-secret", conn.update_secret("new-secret".into(), "rotation".into())).await.unwrap();
    within("still usable", ch.queue_declare("".into(), QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .unwrap();
}

#[tokio::test]
async fn client_that_stalls_the_handshake_is_dropped_after_the_handshake_timeout() {
    let server = TestServer::amqp_with(Settings::default(), "handshake_timeout_secs = 1\n").await;
    let (mut c, _) = RawClient::start(server.amqp_addr()).await;
    let started = Instant::now();
    c.expect_eof().await;
    assert!(started.elapsed() >= Duration::from_millis(800), "dropped after {:?}", started.elapsed());
}

#[tokio::test]
async fn pipelined_handshake_with_a_large_frame_right_after_tune_ok_is_accepted() {
    // A client may send tune-ok, open, channel.open and a publish in one write without waiting
    // for open-ok; the body frame (10 000 bytes) is above the 4096-byte pre-tune limit but
    // within the negotiated frame max, so it must be accepted.
    let server = TestServer::amqp().await;
    let (mut c, _) = RawClient::start(server.amqp_addr()).await;
    c.send_method(0, Method::ConnectionStartOk(plain_start_ok("guest", "guest"))).await;
    let tune = c.recv_tune().await;
    let mut out = bytes::BytesMut::new();
    let ok = ConnectionTuneOk { channel_max: 0, frame_max: tune.frame_max, heartbeat: 0 };
    let open = ferry_amqp::codec::ConnectionOpen { virtual_host: ShortString::from("/"), ..Default::default() };
    let declare = ferry_amqp::codec::QueueDeclare { queue: ShortString::from("piped"), ..Default::default() };
    for (ch, m) in [
        (0, Method::ConnectionTuneOk(ok)),
        (0, Method::ConnectionOpen(open)),
        (1, Method::ChannelOpen(ChannelOpen::default())),
        (1, Method::QueueDeclare(declare)),
    ] {
        ferry_amqp::codec::encode_method_frame(ch, &m, &mut out).unwrap();
    }
    let publish = ferry_amqp::codec::BasicPublish { routing_key: ShortString::from("piped"), ..Default::default() };
    ferry_amqp::codec::encode_method_frame(1, &Method::BasicPublish(publish), &mut out).unwrap();
    let header = ferry_amqp::codec::ContentHeader::basic(10_000, Default::default());
    ferry_amqp::codec::encode_header_frame(1, &header, &mut out).unwrap();
    ferry_amqp::codec::encode_body_frames(&mut out, 1, &[7u8; 10_000], tune.frame_max);
    // One write, so the server reads tune-ok and the large body frame in the same batch.
    c.send_bytes(&out).await;
    let get = ferry_amqp::codec::BasicGet { queue: ShortString::from("piped"), no_ack: true, ..Default::default() };
    c.send_method(1, Method::BasicGet(get)).await;
    loop {
        match c.recv_method().await {
            (1, Method::BasicGetOk(g)) => {
                assert_eq!(g.message_count, 0);
                break;
            }
            (_, Method::ConnectionClose(close)) => panic!("connection closed: {close:?}"),
            _ => {}
        }
    }
}

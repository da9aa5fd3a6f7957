//! AMQP limits through the real frontend, configured as the `ferry` binary configures them (the
//! TOML's `[amqp]` table into the frontend, listener and `[broker]` keys into the server):
//!
//! | limit | what the client sees |
//! |---|---|
//! | listener / `[broker]` `max_connections` | connection.close 530 at start-ok, credentials unchecked |
//! | `[amqp] consumer_max_per_channel` | connection.close 530 on the basic.consume over it |
//! | `[amqp] channel_max` | offered in connection.tune; a channel above it: connection.close 504 |
//! | `[amqp] max_message_size` | channel.close 406 on the publish over it |
//! | listener `max_publish_rate` | publishes throttled (reading paused), none dropped |

use std::time::{Duration, Instant};

use ferry_amqp::codec::{reply_code, BasicConsume, ChannelClose, ChannelCloseOk, ChannelOpen, Method, QueueDeclare};
use ferry_core::message::ShortString;
use ferry_integration_tests::amqp::{lapin_channel, lapin_uri, plain_start_ok, RawClient, AMQP_LISTENER};
use ferry_integration_tests::{within, write_config, TestServer};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;

/// A server on `toml` with the built-in frontends made from its `[mqtt]` and `[amqp]` tables.
async fn start(toml: &str) -> TestServer {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = write_config(dir.path(), toml);
    let frontends = ferry_server::frontends::builtin_with(&config.mqtt, &config.amqp);
    TestServer::start_in(dir, toml, &frontends).await.unwrap_or_else(|e| panic!("server did not start:\n{e}"))
}

/// Sends the protocol header and a start-ok with credentials no user has: a connection over a
/// limit is refused with 530 before they are looked at (a failed login would close the socket
/// without connection.close). Returns the close.
async fn refused(server: &TestServer) -> (u16, String) {
    let (mut c, _start) = RawClient::start(server.amqp_addr()).await;
    c.send_method(0, Method::ConnectionStartOk(plain_start_ok("nobody", "not-a-password"))).await;
    let close = c.expect_connection_close().await;
    (close.reply_code, close.reply_text.to_string_lossy())
}

/// lapin fails to connect with the server's close: 530 and `NOT_ALLOWED - {text}`.
async fn lapin_refused(server: &TestServer, text: &str) {
    let r = within("lapin connect", lapin::Connection::connect(&server.amqp_uri(""), Default::default())).await;
    match r {
        Ok(_) => panic!("a connection over the limit must be refused"),
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(p) => {
                assert_eq!(p.get_id(), reply_code::NOT_ALLOWED, "{e:?}");
                assert_eq!(p.get_message().as_str(), format!("NOT_ALLOWED - {text}"), "{e:?}");
            }
            _ => panic!("expected connection.close 530, got {e:?}"),
        },
    }
}

/// Connects until a connection opens: a closed connection's slot is free once its task has
/// ended, an instant after the client saw the socket close.
async fn connect_when_free(server: &TestServer) -> lapin::Connection {
    within("a slot frees up", async {
        loop {
            if let Ok(c) = lapin::Connection::connect(&server.amqp_uri(""), Default::default()).await {
                return c;
            }
        }
    })
    .await
}

/// Two connections are allowed (`limit_toml` sets a limit of 2), the third is refused with 530
/// and `NOT_ALLOWED - {text}`, and once one of the two closes a new one gets in.
async fn connection_limit_of_two(limit_toml: &str, text: &str) {
    let server = start(limit_toml).await;
    let first = lapin_uri(&server.amqp_uri("")).await;
    // The second is a raw client, so that the test can see its socket close.
    let mut second = RawClient::connect(server.amqp_addr()).await;

    assert_eq!(refused(&server).await, (reply_code::NOT_ALLOWED, format!("NOT_ALLOWED - {text}")));
    lapin_refused(&server, text).await;
    // The refused ones held no slot: still refused, and the two open ones still work.
    assert_eq!(refused(&server).await.0, reply_code::NOT_ALLOWED);
    let ch = within("channel on the first", first.create_channel()).await.expect("the first connection works");
    second.open_channel(1).await;

    second
        .send_method(
            0,
            Method::ConnectionClose(ferry_amqp::codec::ConnectionClose {
                reply_code: reply_code::REPLY_SUCCESS,
                reply_text: ShortString::from("bye"),
                class_id: 0,
                method_id: 0,
            }),
        )
        .await;
    match second.recv_method().await {
        (0, Method::ConnectionCloseOk(_)) => {}
        other => panic!("expected close-ok, got {other:?}"),
    }
    second.expect_eof().await;
    let third = connect_when_free(&server).await;
    within("channel on the new one", third.create_channel()).await.expect("the new connection works");
    lapin_refused(&server, text).await;
    within("queue.declare", ch.queue_declare("".into(), QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .expect("the first connection still works");
}

#[tokio::test]
async fn the_listeners_connection_limit_refuses_the_third_connection_with_530_until_one_closes() {
    connection_limit_of_two(
        &format!("{AMQP_LISTENER}max_connections = 2\n"),
        "connection limit (2) of the listener is reached",
    )
    .await;
}

#[tokio::test]
async fn the_brokers_connection_limit_refuses_the_third_connection_with_530_until_one_closes() {
    connection_limit_of_two(
        &format!("[broker]\nmax_connections = 2\n\n{AMQP_LISTENER}"),
        "connection limit (2) of the broker is reached",
    )
    .await;
}

#[tokio::test]
async fn a_refused_client_that_never_answers_is_dropped_within_the_handshake_timeout() {
    let server = start(&format!("{AMQP_LISTENER}max_connections = 1\nhandshake_timeout_secs = 1\n")).await;
    let _open = lapin_uri(&server.amqp_uri("")).await;
    let (mut c, _start) = RawClient::start(server.amqp_addr()).await;
    c.send_method(0, Method::ConnectionStartOk(plain_start_ok("guest", "guest"))).await;
    // No close-ok: the server gives up on its own (within the test's allowance).
    match c.recv_method().await {
        (0, Method::ConnectionClose(close)) => assert_eq!(close.reply_code, reply_code::NOT_ALLOWED),
        other => panic!("expected connection.close, got {other:?}"),
    }
    c.expect_eof().await;
}

#[tokio::test]
async fn the_consumer_over_consumer_max_per_channel_closes_the_connection_with_530() {
    let server = start(&format!("[amqp]\nconsumer_max_per_channel = 3\n\n{AMQP_LISTENER}")).await;
    let mut c = RawClient::connect(server.amqp_addr()).await;
    c.open_channel(1).await;
    let declare = QueueDeclare { queue: ShortString::from("limited"), ..Default::default() };
    c.send_method(1, Method::QueueDeclare(declare)).await;
    match c.recv_method().await {
        (1, Method::QueueDeclareOk(_)) => {}
        other => panic!("expected declare-ok, got {other:?}"),
    }
    let consume = |tag: &str| {
        Method::BasicConsume(BasicConsume {
            queue: ShortString::from("limited"),
            consumer_tag: ShortString::from(tag),
            ..Default::default()
        })
    };
    for tag in ["c1", "c2", "c3"] {
        c.send_method(1, consume(tag)).await;
        match c.recv_method().await {
            (1, Method::BasicConsumeOk(ok)) => assert_eq!(ok.consumer_tag.to_string_lossy(), tag),
            other => panic!("expected consume-ok for {tag}, got {other:?}"),
        }
    }
    c.send_method(1, consume("c4")).await;
    let close = c.expect_connection_close().await;
    assert_eq!(
        (close.reply_code, close.reply_text.to_string_lossy(), close.class_id, close.method_id),
        (reply_code::NOT_ALLOWED, "NOT_ALLOWED - reached maximum (3) of consumers per channel".to_string(), 60, 20)
    );

    // The same through lapin: three consumers, the fourth fails with 530.
    let (conn, ch) = lapin_channel(&server).await;
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let consume =
            ch.basic_consume("limited".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default());
        consumers.push(within("basic.consume", consume).await.expect("up to three consumers"));
    }
    let fourth = within(
        "fourth basic.consume",
        ch.basic_consume("limited".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await;
    match fourth {
        Ok(_) => panic!("the fourth consumer must be refused"),
        Err(e) => {
            assert_eq!(ferry_integration_tests::amqp::reply_code(&e), Some(reply_code::NOT_ALLOWED), "{e:?}");
        }
    }
    let after = within("channel.open after the 530", conn.create_channel()).await;
    assert!(after.is_err(), "a 530 closes the connection: {after:?}");
}

#[tokio::test]
async fn channel_max_from_the_amqp_table_is_offered_and_enforced() {
    let server = start(&format!("[amqp]\nchannel_max = 4\n\n{AMQP_LISTENER}")).await;
    let mut c = RawClient::connect(server.amqp_addr()).await;
    assert_eq!(c.tune.as_ref().expect("tune").channel_max, 4);
    for ch in 1..=4 {
        c.open_channel(ch).await;
    }
    c.send_method(5, Method::ChannelOpen(ChannelOpen::default())).await;
    let close = c.expect_connection_close().await;
    assert_eq!(
        (close.reply_code, close.reply_text.to_string_lossy()),
        (
            reply_code::NOT_ALLOWED,
            "NOT_ALLOWED - number of channels opened (4) has reached the negotiated channel_max (4)".to_string()
        )
    );
}

#[tokio::test]
async fn a_message_over_max_message_size_from_the_amqp_table_closes_the_channel_with_406() {
    let server = start(&format!("[amqp]\nmax_message_size = 1024\n\n{AMQP_LISTENER}")).await;
    let mut c = RawClient::connect(server.amqp_addr()).await;
    c.open_channel(1).await;
    c.open_channel(2).await;
    // At the limit: accepted (the channel stays open; a queue.declare round trip shows it).
    c.publish(1, "", "nowhere", &[7u8; 1024]).await;
    c.send_method(1, Method::QueueDeclare(QueueDeclare::default())).await;
    match c.recv_method().await {
        (1, Method::QueueDeclareOk(_)) => {}
        other => panic!("a 1024-byte message is within the limit, got {other:?}"),
    }
    c.publish(2, "", "nowhere", &[7u8; 2048]).await;
    let close: ChannelClose = match c.recv_method().await {
        (2, Method::ChannelClose(close)) => close,
        other => panic!("expected channel.close on 2, got {other:?}"),
    };
    assert_eq!(
        (close.reply_code, close.reply_text.to_string_lossy(), close.class_id, close.method_id),
        (
            reply_code::PRECONDITION_FAILED,
            "PRECONDITION_FAILED - message size 2048 is larger than configured max size 1024".to_string(),
            60,
            40
        )
    );
    c.send_method(2, Method::ChannelCloseOk(ChannelCloseOk {})).await;
    // Only the channel: the other one still works.
    c.send_method(1, Method::QueueDeclare(QueueDeclare::default())).await;
    match c.recv_method().await {
        (1, Method::QueueDeclareOk(_)) => {}
        other => panic!("channel 1 must still work, got {other:?}"),
    }
}

/// Publishes `n` messages with confirms through lapin to queue `queue` and returns how long it
/// took until all were confirmed.
async fn publish_confirmed(ch: &lapin::Channel, queue: &str, n: usize) -> Duration {
    within("confirm.select", ch.confirm_select(ConfirmSelectOptions::default())).await.expect("confirm.select");
    let started = Instant::now();
    let mut confirms = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!("m{i}");
        let publish = ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default(),
        );
        confirms.push(within("basic.publish", publish).await.expect("basic.publish"));
    }
    for (i, confirm) in confirms.into_iter().enumerate() {
        let confirmation = within("confirm", confirm).await.expect("confirm");
        assert!(confirmation.is_ack(), "message {i}: {confirmation:?}");
    }
    started.elapsed()
}

/// Takes `n` deliveries from `queue` on a new connection and checks their bodies, in order.
async fn expect_delivered(server: &TestServer, queue: &str, n: usize) {
    let (_conn, ch) = lapin_channel(server).await;
    let mut consumer = within(
        "basic.consume",
        ch.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
    .expect("basic.consume");
    for i in 0..n {
        let d = within("delivery", consumer.next()).await.expect("a delivery").expect("not an error");
        assert_eq!(d.data, format!("m{i}").into_bytes());
        within("ack", d.ack(BasicAckOptions::default())).await.expect("ack");
    }
}

#[tokio::test]
async fn publishes_over_max_publish_rate_are_throttled_not_dropped() {
    let server = start(&format!("{AMQP_LISTENER}max_publish_rate = 20\n")).await;
    let (_conn, ch) = lapin_channel(&server).await;
    within("queue.declare", ch.queue_declare("rated".into(), QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .expect("queue.declare");
    // 20 at once (a second's worth), then 20 a second: the other 40 take 2 s.
    let took = publish_confirmed(&ch, "rated", 60).await;
    assert!(took >= Duration::from_millis(1500), "60 publishes at 20/s took only {took:?}");
    expect_delivered(&server, "rated", 60).await;
}

#[tokio::test]
async fn a_throttled_publisher_with_a_1s_heartbeat_is_not_taken_for_a_silent_client() {
    // One publish a second: the four past the first keep the server from reading for about 4 s,
    // twice the 2 s after which a client that sends nothing counts as gone.
    let server = start(&format!("{AMQP_LISTENER}max_publish_rate = 1\n")).await;
    let conn = lapin_uri(&server.amqp_uri("?heartbeat=1")).await;
    let ch = within("channel", conn.create_channel()).await.expect("channel.open");
    within("queue.declare", ch.queue_declare("slow".into(), QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .expect("queue.declare");
    let took = publish_confirmed(&ch, "slow", 5).await;
    assert!(took >= Duration::from_millis(3000), "5 publishes at 1/s took only {took:?}");
    within("queue.declare", ch.queue_declare("slow".into(), QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .expect("the connection still works");
    expect_delivered(&server, "slow", 5).await;
}

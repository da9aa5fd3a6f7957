//! The memory alarm: once what queued messages cost in memory passes the high watermark, publishing
//! connections are not read (AMQP clients that support it get connection.blocked), and they
//! resume (connection.unblocked) when consumers bring the backlog down.

use ferry_amqp::codec::{ConnectionStartOk, Method, QueueDeclare};
use ferry_core::message::{FieldTable, FieldValue, ShortString};
use ferry_integration_tests::amqp::{plain_start_ok, RawClient};
use ferry_integration_tests::{within, TestServer};

fn capable_start_ok() -> ConnectionStartOk {
    let mut caps = FieldTable::new();
    caps.insert("connection.blocked", FieldValue::Bool(true));
    let mut props = FieldTable::new();
    props.insert("capabilities", FieldValue::Table(caps));
    ConnectionStartOk { client_properties: props, ..plain_start_ok("guest", "guest") }
}

async fn connect_capable(server: &TestServer) -> RawClient {
    let (mut c, _) = RawClient::start(server.amqp_addr()).await;
    c.send_method(0, Method::ConnectionStartOk(capable_start_ok())).await;
    let tune = c.recv_tune().await;
    c.send_method(
        0,
        Method::ConnectionTuneOk(ferry_amqp::codec::ConnectionTuneOk {
            channel_max: tune.channel_max,
            frame_max: tune.frame_max,
            heartbeat: 0,
        }),
    )
    .await;
    c.open_vhost("/").await;
    assert!(matches!(c.recv_method().await, (0, Method::ConnectionOpenOk(_))));
    c
}

#[tokio::test]
async fn a_publisher_past_the_watermark_is_blocked_then_unblocked_when_consumers_drain() {
    let server = TestServer::amqp().await;
    server.server.broker().set_memory_limit(1000);
    let mut publisher = connect_capable(&server).await;
    publisher.open_channel(1).await;
    publisher
        .send_method(
            1,
            Method::QueueDeclare(QueueDeclare { queue: ShortString::from("backlog"), ..Default::default() }),
        )
        .await;
    assert!(matches!(publisher.recv_method().await, (1, Method::QueueDeclareOk(_))));
    for _ in 0..3 {
        publisher.publish(1, "", "backlog", &[7u8; 500]).await;
    }
    // Housekeeping checks the alarm at least every second.
    let (ch, m) = within("connection.blocked", publisher.recv_method()).await;
    assert_eq!(ch, 0);
    let Method::ConnectionBlocked(b) = m else { panic!("expected connection.blocked, got {m:?}") };
    assert_eq!(b.reason, "low on memory");
    assert!(server.server.broker().memory().is_raised());

    // Another connection consumes the backlog away; the publisher is told it may go on.
    let vhost = server.server.broker().vhost("/").unwrap();
    let n = vhost.purge_queue(&ShortString::from("backlog"), ferry_core::ConnectionId(0), 0).unwrap();
    assert_eq!(n, 3);
    let (ch, m) = within("connection.unblocked", publisher.recv_method()).await;
    assert_eq!((ch, matches!(m, Method::ConnectionUnblocked(_))), (0, true), "{m:?}");
    // And it is read again: a publish lands.
    publisher.publish(1, "", "backlog", b"after").await;
    within("the publish after unblocking lands", async {
        while vhost.queue("backlog").unwrap().stats().ready != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// A publisher held back by the alarm still reads its close-ok once it is being closed (from
/// outside here; a shutdown likewise), instead of being dropped when the 5 s for close-ok run
/// out.
#[tokio::test]
async fn a_blocked_publisher_closed_from_outside_has_its_close_ok_read() {
    let server = TestServer::amqp().await;
    server.server.broker().set_memory_limit(1000);
    let mut publisher = connect_capable(&server).await;
    publisher.open_channel(1).await;
    publisher
        .send_method(1, Method::QueueDeclare(QueueDeclare { queue: ShortString::from("held"), ..Default::default() }))
        .await;
    assert!(matches!(publisher.recv_method().await, (1, Method::QueueDeclareOk(_))));
    for _ in 0..3 {
        publisher.publish(1, "", "held", &[7u8; 500]).await;
    }
    let (_, m) = within("connection.blocked", publisher.recv_method()).await;
    assert!(matches!(m, Method::ConnectionBlocked(_)), "{m:?}");

    let connections = server.server.broker().connections();
    let [c] = &connections.list()[..] else { panic!("one connection expected") };
    assert!(connections.close(c.id, "maintenance"));
    let (ch, m) = within("connection.close", publisher.recv_method()).await;
    let Method::ConnectionClose(close) = m else { panic!("expected connection.close, got {m:?}") };
    assert_eq!((ch, close.reply_code), (0, 320));
    publisher.send_method(0, Method::ConnectionCloseOk(ferry_amqp::codec::ConnectionCloseOk {})).await;
    // Read at once: well before the 5 s the broker gives a client to answer.
    tokio::time::timeout(std::time::Duration::from_secs(2), connections.gone(c.id))
        .await
        .expect("the close-ok was not read while the alarm holds the publisher");
    publisher.expect_eof().await;
}

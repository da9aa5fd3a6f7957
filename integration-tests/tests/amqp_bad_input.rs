//! Malformed AMQP input as raw bytes: every case gets connection.close with the reply code the
//! spec (or RabbitMQ, where the spec is silent) gives, the broker never hangs or panics, and a
//! client connected before keeps working.
//!
//! | input | reply |
//! |---|---|
//! | frame header announcing more than the negotiated frame max | 501 FRAME_ERROR |
//! | frame-end octet other than 0xCE | 501 FRAME_ERROR |
//! | unknown frame type, heartbeat on a channel | 501 FRAME_ERROR |
//! | unknown class/method id | 503 COMMAND_INVALID (RabbitMQ: "unknown method") |
//! | method arguments cut short | 502 SYNTAX_ERROR |
//! | content header or body with no basic.publish before it | 505 UNEXPECTED_FRAME |
//! | a method where content was expected | 505 UNEXPECTED_FRAME |
//! | body frames longer than the header's body size | 501 FRAME_ERROR (the frame sizes broke the header's contract) |
//! | method on a channel never opened, channel above channel-max | 504 CHANNEL_ERROR |

use bytes::{BufMut, BytesMut};
use ferry_amqp::codec::{encode_header_frame, reply_code, BasicPublish, ContentHeader, Method, QueueDeclare};
use ferry_core::message::{Properties, ShortString};
use ferry_integration_tests::amqp::{lapin_channel, method_bytes, RawClient};
use ferry_integration_tests::{within, TestServer};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

/// A lapin client connected before the bad input, checked after it.
struct Bystander {
    _conn: lapin::Connection,
    ch: lapin::Channel,
}

impl Bystander {
    async fn new(server: &TestServer) -> Bystander {
        let (conn, ch) = lapin_channel(server).await;
        Bystander { _conn: conn, ch }
    }
    async fn still_works(&self) {
        within(
            "the other client declares",
            self.ch.queue_declare("".into(), QueueDeclareOptions::default(), FieldTable::default()),
        )
        .await
        .expect("a connection open before the bad input keeps working");
    }
}

/// Opens a raw connection with channel 1, sends `bytes`, and returns the reply code of the
/// connection.close that follows; checks that a bystander and a new connection still work.
async fn close_code_after(bytes: &[u8]) -> u16 {
    let server = TestServer::amqp().await;
    let bystander = Bystander::new(&server).await;
    let mut c = RawClient::connect(server.amqp_addr()).await;
    c.open_channel(1).await;
    c.send_bytes(bytes).await;
    let close = c.expect_connection_close().await;
    bystander.still_works().await;
    let mut fresh = RawClient::connect(server.amqp_addr()).await;
    fresh.open_channel(1).await;
    close.reply_code
}

fn raw_frame(kind: u8, channel: u16, payload: &[u8], end: u8) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u8(kind);
    out.put_u16(channel);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    out.put_u8(end);
    out.to_vec()
}

fn publish_method(ch: u16) -> Vec<u8> {
    let p = BasicPublish { routing_key: ShortString::from("q"), ..BasicPublish::default() };
    method_bytes(ch, &Method::BasicPublish(p))
}

fn header(ch: u16, body_size: u64) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_header_frame(ch, &ContentHeader::basic(body_size, Properties::default()), &mut out).unwrap();
    out.to_vec()
}

#[tokio::test]
async fn truncated_frame_then_client_close_does_not_hang_the_broker() {
    let server = TestServer::amqp().await;
    let bystander = Bystander::new(&server).await;
    let mut c = RawClient::connect(server.amqp_addr()).await;
    let frame = method_bytes(0, &Method::QueueDeclare(QueueDeclare::default()));
    c.send_bytes(&frame[..frame.len() / 2]).await;
    // Half-close: the broker sees end of stream in the middle of a frame and must let go.
    c.shutdown_write().await;
    c.expect_eof().await;
    bystander.still_works().await;
}

#[tokio::test]
async fn frame_above_the_negotiated_frame_max_is_501() {
    // Only the 7-byte header: the broker must refuse it before waiting for the payload.
    let mut bytes = vec![1u8, 0, 1];
    bytes.extend_from_slice(&(131_072u32 - 7).to_be_bytes());
    assert_eq!(close_code_after(&bytes).await, reply_code::FRAME_ERROR);
}

#[tokio::test]
async fn frame_above_a_small_listener_frame_max_is_501() {
    // 8192, not 4096: lapin (the bystander) never accepts a frame max below 8192.
    let server = TestServer::amqp_with(Default::default(), "max_frame_size = 8192\n").await;
    let bystander = Bystander::new(&server).await;
    let mut c = RawClient::connect(server.amqp_addr()).await;
    c.open_channel(1).await;
    let body = vec![0u8; 8192];
    let mut bytes = publish_method(1);
    bytes.extend(header(1, body.len() as u64));
    bytes.extend(raw_frame(3, 1, &body, 0xCE));
    c.send_bytes(&bytes).await;
    assert_eq!(c.expect_connection_close().await.reply_code, reply_code::FRAME_ERROR);
    bystander.still_works().await;
}

#[tokio::test]
async fn wrong_frame_end_octet_is_501() {
    let mut frame = method_bytes(1, &Method::QueueDeclare(QueueDeclare::default()));
    *frame.last_mut().unwrap() = 0x00;
    assert_eq!(close_code_after(&frame).await, reply_code::FRAME_ERROR);
}

#[tokio::test]
async fn unknown_frame_type_is_501() {
    assert_eq!(close_code_after(&raw_frame(9, 0, b"", 0xCE)).await, reply_code::FRAME_ERROR);
}

#[tokio::test]
async fn heartbeat_on_a_channel_is_501() {
    assert_eq!(close_code_after(&raw_frame(8, 1, b"", 0xCE)).await, reply_code::FRAME_ERROR);
}

#[tokio::test]
async fn unknown_class_and_method_is_503() {
    let payload = [0u8, 99, 0, 99];
    assert_eq!(close_code_after(&raw_frame(1, 1, &payload, 0xCE)).await, reply_code::COMMAND_INVALID);
}

#[tokio::test]
async fn truncated_method_arguments_are_502() {
    // queue.declare (50.10) whose payload ends inside the queue name.
    let payload = [0u8, 50, 0, 10, 0, 0, 20, b'a'];
    assert_eq!(close_code_after(&raw_frame(1, 1, &payload, 0xCE)).await, reply_code::SYNTAX_ERROR);
}

#[tokio::test]
async fn content_header_without_basic_publish_is_505() {
    assert_eq!(close_code_after(&header(1, 3)).await, reply_code::UNEXPECTED_FRAME);
}

#[tokio::test]
async fn content_body_without_basic_publish_is_505() {
    assert_eq!(close_code_after(&raw_frame(3, 1, b"abc", 0xCE)).await, reply_code::UNEXPECTED_FRAME);
}

#[tokio::test]
async fn method_where_a_content_header_was_expected_is_505() {
    let mut bytes = publish_method(1);
    bytes.extend(method_bytes(1, &Method::QueueDeclare(QueueDeclare::default())));
    assert_eq!(close_code_after(&bytes).await, reply_code::UNEXPECTED_FRAME);
}

#[tokio::test]
async fn body_longer_than_the_header_declared_is_501() {
    let mut bytes = publish_method(1);
    bytes.extend(header(1, 3));
    bytes.extend(raw_frame(3, 1, b"abcdef", 0xCE));
    assert_eq!(close_code_after(&bytes).await, reply_code::FRAME_ERROR);
}

#[tokio::test]
async fn method_on_a_channel_never_opened_is_504() {
    let bytes = method_bytes(9, &Method::QueueDeclare(QueueDeclare::default()));
    assert_eq!(close_code_after(&bytes).await, reply_code::CHANNEL_ERROR);
}

#[tokio::test]
async fn method_on_unopened_channel_65535_is_504() {
    let bytes = method_bytes(u16::MAX, &Method::QueueDeclare(QueueDeclare::default()));
    assert_eq!(close_code_after(&bytes).await, reply_code::CHANNEL_ERROR);
}

#[tokio::test]
async fn content_header_on_a_channel_above_channel_max_is_an_error() {
    let code = close_code_after(&header(u16::MAX, 1)).await;
    assert!(matches!(code, reply_code::CHANNEL_ERROR | reply_code::UNEXPECTED_FRAME), "{code}");
}

#[tokio::test]
async fn garbage_after_open_never_reaches_a_panic() {
    // Frame types that do not exist, one per connection, each answered with a close.
    let server = TestServer::amqp().await;
    let bystander = Bystander::new(&server).await;
    for kind in [0u8, 4, 7, 0x41, 0xCE, 0xFF] {
        let mut c = RawClient::connect(server.amqp_addr()).await;
        c.send_bytes(&raw_frame(kind, 0, b"xyz", 0xCE)).await;
        assert_eq!(c.expect_connection_close().await.reply_code, reply_code::FRAME_ERROR, "frame type {kind}");
    }
    bystander.still_works().await;
}

//! The connection on injected time, quinn-proto style: frames and the time go in, frames come
//! out, no socket and no sleep. Heartbeats (monotonic `Instant`s from [`origin`]), message TTLs
//! and `x-expires` (wall-clock `Millis` from [`T0`]), each at its exact deadline.

use std::time::{Duration, Instant};

use super::tests::{feed_at, frames, open, open_with_heartbeat, origin, sent, T0};
use super::*;
use ferry_core::message::Properties;

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);

/// Plays the driver for one wake-up at `now`: the timeout, then the write. Returns how many
/// heartbeat frames were written.
fn wake(c: &mut Connection, now: Instant) -> usize {
    c.handle_timeout(now, T0);
    let mut out = c.out.split();
    if !out.is_empty() {
        // As the driver: only a write counts as one.
        c.sent(now);
    }
    let decoder = FrameDecoder::new(1 << 20);
    std::iter::from_fn(|| decoder.decode(&mut out).expect("well-formed"))
        .filter(|f| matches!(f, Frame::Heartbeat))
        .count()
}

/// Wakes the connection at each time it asks for, until `until` or until it closes; returns the
/// heartbeats it sent and when it closed.
fn run_until(c: &mut Connection, until: Instant) -> (usize, Option<Instant>) {
    let mut heartbeats = 0;
    while let Some(at) = c.poll_timeout().filter(|&at| at <= until) {
        heartbeats += wake(c, at);
        if c.is_closed() {
            return (heartbeats, Some(at));
        }
    }
    (heartbeats, None)
}

#[test]
fn no_heartbeat_negotiated_means_no_timer() {
    let c = open(Settings::default());
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn a_silent_client_gets_heartbeats_then_is_closed_after_exactly_two_intervals() {
    let mut c = open_with_heartbeat(Settings::default(), 1);
    let t0 = origin();
    assert_eq!(c.poll_timeout(), Some(t0 + SECOND / 2), "first: our heartbeat after half an interval");

    // A millisecond before two intervals of silence: still open, and we kept sending ours.
    let (heartbeats, closed) = run_until(&mut c, t0 + 2 * SECOND - MS);
    assert_eq!(closed, None);
    assert_eq!(heartbeats, 3, "at 0.5 s, 1 s and 1.5 s");
    assert!(c.is_open());

    let (_, closed) = run_until(&mut c, t0 + 10 * SECOND);
    assert_eq!(closed, Some(t0 + 2 * SECOND), "closed at two intervals, not later");
    assert!(c.is_closed());
    assert_eq!(c.end.as_deref(), Some("missed heartbeats from the client"));
    // §4.2.7: no connection.close handshake with a peer that went silent.
    assert!(sent(&mut c).is_empty());
    assert_eq!(c.poll_timeout(), None, "nothing left to time");
}

#[test]
fn our_heartbeat_is_sent_only_after_half_an_interval_without_other_writes() {
    let mut c = open_with_heartbeat(Settings::default(), 2);
    let t0 = origin();
    c.received(t0 + 900 * MS);
    c.sent(t0 + 900 * MS); // a reply went out
    assert_eq!(c.poll_timeout(), Some(t0 + 1900 * MS));
    assert_eq!(wake(&mut c, t0 + 1899 * MS), 0, "an early wake-up sends nothing");
    assert_eq!(wake(&mut c, t0 + 1900 * MS), 1);
    assert_eq!(c.poll_timeout(), Some(t0 + 2900 * MS));
}

#[test]
fn any_bytes_from_the_client_count_as_a_heartbeat() {
    let mut c = open_with_heartbeat(Settings::default(), 1);
    let t0 = origin();
    // A frame every 1.9 s: each one inside two intervals of the one before.
    for i in 1..=10u32 {
        let (_, closed) = run_until(&mut c, t0 + i * 1900 * MS - MS);
        assert_eq!(closed, None, "round {i}");
        c.received(t0 + i * 1900 * MS);
    }
    assert!(c.is_open());
    // Then silence: gone two intervals after the last frame.
    let (_, closed) = run_until(&mut c, t0 + 60 * SECOND);
    assert_eq!(closed, Some(t0 + 19 * SECOND + 2 * SECOND));
}

#[test]
fn time_the_driver_does_not_read_does_not_count_against_the_client() {
    let mut c = open_with_heartbeat(Settings::default(), 1);
    let t0 = origin();
    // A held-back publisher is not read from 1 s to 5 s: its silence then is ours.
    c.set_reading(false, t0 + SECOND);
    let (heartbeats, closed) = run_until(&mut c, t0 + 5 * SECOND);
    assert_eq!(closed, None, "not closed while not read");
    assert!(heartbeats >= 9, "our heartbeats go on meanwhile ({heartbeats})");
    c.set_reading(true, t0 + 5 * SECOND);
    // One second of silence before the pause and one after it make two intervals.
    let (_, closed) = run_until(&mut c, t0 + 60 * SECOND);
    assert_eq!(closed, Some(t0 + 6 * SECOND));
}

#[test]
fn heartbeats_lost_release_the_clients_unacknowledged_messages() {
    let mut c = open_with_heartbeat(Settings::default(), 1);
    let vhost = c.vhost().clone();
    declare(&mut c, "work", FieldTable::new(), T0);
    publish(&mut c, "work", "job", None, T0);
    feed_at(&mut c, 1, Method::BasicGet(BasicGet { queue: "work".into(), no_ack: false, ..Default::default() }), T0);
    assert!(matches!(sent(&mut c).as_slice(), [(1, Method::BasicGetOk(_))]));
    let q = vhost.queue("work").expect("declared");
    assert_eq!((q.stats().ready, q.stats().unacked), (0, 1));
    run_until(&mut c, origin() + 10 * SECOND);
    assert!(c.is_closed());
    assert_eq!((q.stats().ready, q.stats().unacked), (1, 0), "requeued for the next consumer");
}

// ----- message TTL and x-expires ---------------------------------------------------------------

fn declare(c: &mut Connection, name: &str, arguments: FieldTable, now: Millis) {
    let d = crate::codec::QueueDeclare { queue: ShortString::from(name), arguments, ..Default::default() };
    feed_at(c, 1, Method::QueueDeclare(d), now);
    match sent(c).as_slice() {
        [(1, Method::QueueDeclareOk(_))] => {}
        other => panic!("expected declare-ok for {name}, got {other:?}"),
    }
}

fn publish(c: &mut Connection, queue: &str, body: &str, expiration: Option<&str>, now: Millis) {
    let publish = BasicPublish { routing_key: ShortString::from(queue), ..Default::default() };
    let properties = Properties::default()
        .with_more(ferry_core::MoreProperties { expiration: expiration.map(ShortString::from), ..Default::default() });
    let header = ContentHeader::basic(body.len() as u64, properties);
    let mut all = frames(|out| encode_method_frame(1, &Method::BasicPublish(publish), out).expect("encode"));
    all.extend(frames(|out| {
        encode_header_frame(1, &header, out).expect("encode");
        encode_body_frames(out, 1, body.as_bytes(), 0);
    }));
    for f in all {
        c.handle(f, now);
    }
}

/// basic.get (no-ack) at `now`: the body, or `None` for get-empty.
fn get(c: &mut Connection, queue: &str, now: Millis) -> Option<String> {
    feed_at(c, 1, Method::BasicGet(BasicGet { queue: queue.into(), no_ack: true, ..Default::default() }), now);
    let mut out = c.out.split();
    let decoder = FrameDecoder::new(1 << 20);
    let all: Vec<Frame> = std::iter::from_fn(|| decoder.decode(&mut out).expect("well-formed")).collect();
    match all.as_slice() {
        [Frame::Method { .. }, Frame::Header { .. }, Frame::Body { payload, .. }] => {
            Some(String::from_utf8_lossy(payload).into_owned())
        }
        [Frame::Method { payload, .. }] => {
            assert!(matches!(Method::decode_payload(payload.clone()), Ok(Method::BasicGetEmpty(_))));
            None
        }
        other => panic!("expected get-ok with content or get-empty, got {other:?}"),
    }
}

fn ttl_args(ttl: i32, dead_letter_queue: &str) -> FieldTable {
    let mut a = FieldTable::new();
    a.insert("x-message-ttl", FieldValue::I32(ttl));
    a.insert("x-dead-letter-exchange", FieldValue::string(""));
    a.insert("x-dead-letter-routing-key", FieldValue::string(dead_letter_queue));
    a
}

#[test]
fn a_queue_ttl_message_is_got_a_millisecond_before_its_deadline_and_dead_lettered_at_it() {
    let mut c = open(Settings::default());
    declare(&mut c, "dead", FieldTable::new(), T0);
    declare(&mut c, "ttl", ttl_args(1000, "dead"), T0);
    publish(&mut c, "ttl", "early", None, T0);
    publish(&mut c, "ttl", "late", None, T0);
    assert_eq!(get(&mut c, "ttl", T0 + 999).as_deref(), Some("early"));
    assert_eq!(get(&mut c, "ttl", T0 + 1000), None, "expired at its deadline");
    assert_eq!(get(&mut c, "dead", T0 + 1000).as_deref(), Some("late"), "dead-lettered");
}

#[test]
fn a_per_message_expiration_counts_from_its_publish() {
    let mut c = open(Settings::default());
    declare(&mut c, "exp", FieldTable::new(), T0);
    publish(&mut c, "exp", "a", Some("500"), T0);
    publish(&mut c, "exp", "b", Some("500"), T0 + 100);
    assert_eq!(get(&mut c, "exp", T0 + 499).as_deref(), Some("a"));
    assert_eq!(get(&mut c, "exp", T0 + 599).as_deref(), Some("b"), "b's 500 ms run from T0 + 100");
    publish(&mut c, "exp", "c", Some("500"), T0 + 1000);
    assert_eq!(get(&mut c, "exp", T0 + 1500), None);
}

/// basic.consume at `now`, then the deliveries the driver would write: their bodies.
fn consume_and_pump(c: &mut Connection, queue: &str, now: Millis) -> Vec<String> {
    let consume = BasicConsume { queue: queue.into(), no_ack: true, ..Default::default() };
    feed_at(c, 1, Method::BasicConsume(consume), now);
    c.pump(&mut Vec::new(), now);
    let mut out = c.out.split();
    let decoder = FrameDecoder::new(1 << 20);
    std::iter::from_fn(|| decoder.decode(&mut out).expect("well-formed"))
        .filter_map(|f| match f {
            Frame::Body { payload, .. } => Some(String::from_utf8_lossy(&payload).into_owned()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_consumer_gets_a_waiting_message_only_before_its_deadline() {
    let mut c = open(Settings::default());
    declare(&mut c, "dead", FieldTable::new(), T0);
    declare(&mut c, "early", ttl_args(1000, "dead"), T0);
    declare(&mut c, "late", ttl_args(1000, "dead"), T0);
    publish(&mut c, "early", "in time", None, T0);
    publish(&mut c, "late", "too late", None, T0);
    assert_eq!(consume_and_pump(&mut c, "early", T0 + 999), ["in time"]);
    assert!(consume_and_pump(&mut c, "late", T0 + 1000).is_empty());
    assert_eq!(get(&mut c, "dead", T0 + 1000).as_deref(), Some("too late"));
}

fn passive(c: &mut Connection, name: &str, now: Millis) -> Result<(), u16> {
    let d = crate::codec::QueueDeclare { queue: ShortString::from(name), passive: true, ..Default::default() };
    feed_at(c, 1, Method::QueueDeclare(d), now);
    match sent(c).as_slice() {
        [(1, Method::QueueDeclareOk(_))] => Ok(()),
        [(1, Method::ChannelClose(close))] => {
            let code = close.reply_code;
            feed_at(c, 1, Method::ChannelCloseOk(ChannelCloseOk {}), now);
            feed_at(c, 1, Method::ChannelOpen(ChannelOpen::default()), now);
            sent(c);
            Err(code)
        }
        other => panic!("expected declare-ok or channel.close, got {other:?}"),
    }
}

#[test]
fn an_unused_queue_with_x_expires_goes_at_its_deadline_and_a_redeclare_restarts_it() {
    let mut c = open(Settings::default());
    let broker = c.broker.clone();
    let mut a = FieldTable::new();
    a.insert("x-expires", FieldValue::I32(1000));
    declare(&mut c, "idle", a.clone(), T0);
    assert_eq!(broker.expire(T0 + 999), Some(T0 + 1000), "the next deadline is reported");
    assert_eq!(passive(&mut c, "idle", T0 + 999), Ok(()));

    // A redeclare uses it: its second starts again from there (a passive one does not count).
    declare(&mut c, "idle", a, T0 + 500);
    broker.expire(T0 + 1000);
    assert_eq!(passive(&mut c, "idle", T0 + 1499), Ok(()));
    broker.expire(T0 + 1500);
    assert_eq!(passive(&mut c, "idle", T0 + 1500), Err(reply_code::NOT_FOUND));
}

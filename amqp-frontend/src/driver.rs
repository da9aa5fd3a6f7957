//! The connection driver: one tokio task per connection. Reads with `read_buf` (cancel-safe),
//! feeds frames to the [`Connection`], drains deliveries, and writes everything produced in one
//! write per wake-up. Heartbeats both ways; the handshake is bounded in time.
//!
//! Reading and decoding pause while the connection is held back ([`ferry_core::flow`], as for
//! MQTT): the memory or disk alarm (a publisher), a congested subscriber it publishes to, its
//! publish rate (`max_publish_rate`, one token per completed publish), or too many confirms
//! waiting for the store. Decoding stops at the publish that ran into debt or found a
//! subscriber congested; the frames after it stay in the buffer, in order, until the hold is
//! over. Our heartbeats go on meanwhile, and the time not reading does not count against the
//! client's heartbeats.
//!
//! The connection is in the core's connection registry from its protocol header to its end
//! (unless it is only to be refused): bytes counted per read and per write, messages, channels
//! and the login handed over once per wake-up, and a close from outside answered with
//! connection.close 320 CONNECTION_FORCED and its reason, then close-ok awaited as for any
//! connection error.

use std::time::Duration;

use bytes::BytesMut;
use ferry_core::connections::{ConnectionHandle, ConnectionInfo, Login, TlsInfo};
use ferry_core::flow::{Decode, PublisherFlow};
use ferry_core::frontend::{sleep_until, ClientStream, ConnectionContext, ConnectionError, ReadSizer};
use ferry_core::log_limited;
use ferry_core::message::{now_millis, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::codec::reply_code;
use crate::codec::{check_protocol_header, FrameDecoder, ProtocolHeader, FRAME_MIN_SIZE, PROTOCOL_HEADER};
use crate::connection::{Connection, Flow, Settings};
use crate::errors::AmqpError;

/// The write buffer a connection keeps whatever it writes.
const OUT_KEEP: usize = 4 * 1024;
/// A write smaller than this gives back a buffer larger than [`OUT_KEEP`].
const OUT_SMALL: usize = 512;
/// A buffer larger than this is given back after any write of under a quarter of it (one
/// large message does not leave its buffer with a connection that goes on with small ones).
const OUT_BURST: usize = 64 * 1024;

/// How long a client has to answer our connection.close with close-ok.
const CLOSE_OK_WAIT: Duration = Duration::from_secs(5);

/// Serves one AMQP connection to its end; an opened one ends with its disconnect line.
pub async fn run(stream: ClientStream, ctx: ConnectionContext, settings: Settings) -> Result<(), ConnectionError> {
    let limits = &ctx.listener.limits;
    let mut settings = settings;
    settings.frame_max = limits.max_frame_size;
    settings.outbox_capacity = limits.outbox_capacity;
    let mut conn = Connection::new(ctx.id, ctx.broker.clone(), ctx.listener.vhost.clone(), settings);
    conn.set_peer(stream.peer);
    let result = serve(stream, &ctx, &mut conn).await;
    conn.log_disconnect(now_millis());
    result
}

async fn serve(
    mut stream: ClientStream,
    ctx: &ConnectionContext,
    conn: &mut Connection,
) -> Result<(), ConnectionError> {
    let peer = stream.peer;
    let limits = ctx.listener.limits.clone();
    let handshake_deadline = Instant::now() + limits.handshake_timeout;
    // Sized by what the connection reads (ferry_core::frontend::ReadSizer): a busy publisher's
    // reads grow to 64 KiB (a fixed 8 KiB was about 68 publishes of 64 bytes per `recv`), an
    // idle connection's buffer goes back to 512 bytes.
    let mut buf = BytesMut::new();
    let mut sizer = ReadSizer::new();

    // The protocol header (§4.2.2): a wrong one gets ours back, then the socket closes.
    loop {
        match check_protocol_header(&buf) {
            ProtocolHeader::Ok => {
                let _ = buf.split_to(PROTOCOL_HEADER.len());
                break;
            }
            ProtocolHeader::Wrong => {
                log_limited!(info, "AMQP connection refused", conn = %ctx.id, %peer, "AMQP connection refused: not an AMQP 0-9-1 protocol header");
                let _ = stream.write_all(&PROTOCOL_HEADER).await;
                return Err(ConnectionError::Protocol("not an AMQP 0-9-1 protocol header".into()));
            }
            ProtocolHeader::Incomplete => {}
        }
        let room = sizer.prepare(&mut buf);
        match tokio::time::timeout_at(handshake_deadline, stream.read_buf(&mut buf)).await {
            Err(_) => {
                let timeout = limits.handshake_timeout;
                log_limited!(info, "AMQP handshake timeout", conn = %ctx.id, %peer, "AMQP protocol header not received within {timeout:?}");
                return Err(ConnectionError::HandshakeTimeout(timeout));
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
            Ok(Ok(n)) => sizer.read(n, room),
        }
    }

    if let Some(refusal) = &ctx.refusal {
        conn.refuse(refusal);
    }
    // A connection only to be refused is not one to list.
    let handle = ctx.refusal.is_none().then(|| {
        ctx.broker.connections().register(ConnectionInfo {
            id: ctx.id,
            protocol: Protocol::Amqp,
            version: "0-9-1",
            peer,
            local: stream.local,
            listener: Some(ctx.listener.clone()),
            tls: stream.tls.as_deref().map(|t| Box::new(TlsInfo::of(t))),
            connected_at: now_millis(),
        })
    });
    let mut logged_in = false;
    // The channel list handed to the registry, reused across wake-ups.
    let mut channel_infos = Vec::new();
    // Set once a close from outside was taken up.
    let mut closed_from_outside = false;
    if let Some(from) = ctx.listener.auth.cert_login {
        let certificates = stream.tls.as_ref().map(|t| t.peer_certificates.as_slice()).unwrap_or_default();
        conn.offer_external(ferry_core::cert_login::certificate_identity(certificates, from));
    }
    conn.start(Instant::now().into_std());
    let mut decoder = FrameDecoder::new(FRAME_MIN_SIZE);
    let outbox = conn.outbox().clone();
    let mut scratch = Vec::new();
    let mut shutdown = ctx.shutdown.clone();
    let mut shutting_down = false;
    // The memory and disk alarms: while either is up, connections that publish are not read
    // (RabbitMQ's behaviour); clients that support it are told with connection.blocked /
    // unblocked. Consuming connections go on.
    let mut alarm = ctx.broker.publishers_blocked();
    let mut told_blocked = false;
    // Set once we sent connection.close: the client gets CLOSE_OK_WAIT to answer close-ok.
    let mut closing_deadline: Option<Instant> = None;
    // When reading and decoding pause (ferry_core::flow); the connection's heartbeat clock is
    // told, so our pause does not look like a silent client.
    let mut flow = PublisherFlow::new(limits.max_publish_rate, true, Instant::now().into_std());
    // `buf` holds frames not decoded yet: pipelined behind the protocol header, or left when
    // the connection was held back.
    let mut undecoded = !buf.is_empty();

    loop {
        if let Some(h) = &handle {
            registry_update(h, conn, &mut logged_in, &mut channel_infos);
        }
        // Everything ready: confirms whose commits resolved, deliveries, then one write.
        conn.take_ready_confirms(now_millis());
        // A queue that found the outbox full stopped; prompt it. What it delivers now lands in
        // the (just drained) outbox, whose first push wakes this loop again, and the next pass
        // checks for starvation again — draining twice here would lose that check.
        if conn.is_open() && conn.pump(&mut scratch, now_millis()) {
            conn.pump_all(now_millis());
        }
        if conn.frame_max != 0 {
            decoder.max_frame_size = conn.frame_max;
        }
        if !conn.out.is_empty() {
            if let Err(e) = stream.write_all(&conn.out).await {
                tracing::debug!(conn = %ctx.id, error = %e, "write failed");
                conn.ended(format!("connection lost: {e}"));
                conn.release_all(now_millis());
                return Ok(());
            }
            let written = conn.out.len();
            if let Some(h) = &handle {
                h.counters.add_bytes_out(written as u64);
            }
            written_out(&mut conn.out, written);
            conn.sent(Instant::now().into_std());
        }
        if conn.is_closed() {
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
            return Ok(());
        }

        if conn.is_closing() && closing_deadline.is_none() {
            let mut deadline = Instant::now() + CLOSE_OK_WAIT;
            if ctx.refusal.is_some() {
                // A refused client's whole visit fits in the handshake timeout.
                deadline = deadline.min(handshake_deadline);
            }
            closing_deadline = Some(deadline);
        }

        let alarm_up = *alarm.borrow();
        if alarm_up != told_blocked && (flow.is_publisher() || !alarm_up) {
            conn.send_blocked(alarm_up);
            told_blocked = alarm_up;
            continue;
        }
        flow.set_alarms(ctx.broker.memory().is_raised(), ctx.broker.disk().is_raised());
        flow.set_acks_waiting(conn.pending.len());
        flow.update(Instant::now().into_std(), now_millis());
        // Once closing, the client's close-ok is read whatever holds a publisher (an alarm
        // would otherwise make a close from outside or a shutdown wait out CLOSE_OK_WAIT);
        // what else it sends is ignored in that state.
        let reading = flow.should_read() || conn.is_closing();
        // Our pause does not look like a silent client (the connection's heartbeat clock).
        conn.set_reading(reading, Instant::now().into_std());
        if reading && undecoded {
            // Frames left at a hold that is over go first.
            match decode(&mut decoder, &mut buf, &mut stream, ctx, handshake_deadline, conn, &mut flow).await {
                Ok(more) => undecoded = more,
                Err(e) => return Err(e),
            }
            if !undecoded {
                sizer.drained(&mut buf);
            }
            continue;
        }
        // A hold that ends with time (the publish rate's debt, a congestion pause), and the
        // congested subscriber we wait for: it may drain first.
        let wake = flow.next_wakeup().map(Instant::from_std);
        let congested = flow.congested_target().cloned();
        // Heartbeats both ways: ours when we are quiet, and the client's silence.
        let heartbeat_at = conn.poll_timeout().map(Instant::from_std);
        let dead_at = closing_deadline.or((!conn.is_open()).then_some(handshake_deadline));
        let room = if reading { sizer.prepare(&mut buf) } else { 0 };

        tokio::select! {
            _ = alarm.changed() => {}
            r = stream.read_buf(&mut buf), if reading => {
                match r {
                    Ok(0) => {
                        conn.ended("connection closed by the client");
                        conn.release_all(now_millis());
                        return Ok(());
                    }
                    Err(e) => {
                        conn.ended(format!("connection lost: {e}"));
                        conn.release_all(now_millis());
                        return Ok(());
                    }
                    Ok(n) => {
                        sizer.read(n, room);
                        conn.received(Instant::now().into_std());
                        if let Some(h) = &handle {
                            h.counters.add_bytes_in(n as u64);
                        }
                    }
                }
                undecoded = true;
            }
            _ = sleep_until(wake), if wake.is_some() => {}
            _ = outbox.notified() => {}
            _ = async { congested.as_ref().expect("guarded").room().await }, if congested.is_some() => {}
            _ = conn.pending.ready(), if !conn.pending.is_empty() => {}
            // A heartbeat to send, or the client missed two: it is then closed, and the next
            // pass sees it.
            _ = sleep_until(heartbeat_at), if heartbeat_at.is_some() => {
                conn.handle_timeout(Instant::now().into_std(), now_millis());
            }
            _ = sleep_until(dead_at), if dead_at.is_some() => {
                if conn.is_closing() {
                    tracing::debug!(conn = %ctx.id, "no close-ok from the client; dropping the connection");
                    return Ok(());
                }
                let timeout = limits.handshake_timeout;
                log_limited!(info, "AMQP handshake timeout", conn = %ctx.id, %peer, "AMQP connection not opened within {timeout:?}");
                conn.release_all(now_millis());
                return Err(ConnectionError::HandshakeTimeout(timeout));
            }
            _ = shutdown.wait(), if !shutting_down => {
                shutting_down = true;
                conn.shutdown(now_millis());
            }
            // Closed from outside (management): the client is told why, like RabbitMQ's
            // "CONNECTION_FORCED - Closed via management plugin", and has CLOSE_OK_WAIT to answer.
            reason = closed(handle.as_ref()), if !closed_from_outside => {
                closed_from_outside = true;
                tracing::debug!(conn = %ctx.id, reason, "AMQP connection closed from outside");
                conn.close_with(&AmqpError::new(reply_code::CONNECTION_FORCED, reason), now_millis());
            }
        }
    }
}

/// Decodes and handles what is in `buf` until it runs out (`Ok(false)`), or the connection is
/// held back by its publisher flow control, closes, or waits for its login answer
/// (`Ok(true)`: frames may be left).
async fn decode(
    decoder: &mut FrameDecoder,
    buf: &mut BytesMut,
    stream: &mut ClientStream,
    ctx: &ConnectionContext,
    handshake_deadline: Instant,
    conn: &mut Connection,
    flow: &mut PublisherFlow,
) -> Result<bool, ConnectionError> {
    // The wall clock is read once per CLOCK_FRAMES frames, not per frame: a publish is three
    // frames, and reading it per frame took 7 % of the broker's CPU for AMQP auto-ack 1->1
    // (perf, 2026-12-06). Times are kept in milliseconds, and a batch of frames is decoded in
    // well under one.
    const CLOCK_FRAMES: u32 = 64;
    let mut now = now_millis();
    let mut frames = 0u32;
    loop {
        match decoder.decode(buf) {
            Ok(Some(frame)) => {
                frames += 1;
                if frames.is_multiple_of(CLOCK_FRAMES) {
                    now = now_millis();
                }
                if conn.handle(frame, now) == Flow::Close {
                    return Ok(true);
                }
                if let Some((user, password, mechanism)) = conn.take_pending_login() {
                    // Checked on the blocking pool, bounded; within the handshake time.
                    let login =
                        ctx.broker.auth().login(&ctx.listener.auth, stream.peer.ip(), Some(&user), Some(&password));
                    let result = tokio::time::timeout_at(handshake_deadline, login)
                        .await
                        .unwrap_or(Err(ferry_core::auth::AuthError::Busy));
                    now = now_millis();
                    conn.login_done(&mechanism, result, now);
                    // Nothing the client pipelined before the answer counts.
                    if conn.is_closed() || conn.is_closing() {
                        return Ok(true);
                    }
                }
                // A tune-ok in this batch raises the limit for the frames after it:
                // a client may pipeline open and a large publish behind tune-ok.
                if conn.frame_max != 0 {
                    decoder.max_frame_size = conn.frame_max;
                }
                // Over the publish rate, or a subscriber this publish went to is congested:
                // the rest of the buffer waits, as for an MQTT publisher.
                let publishes = conn.take_publishes();
                if publishes > 0 || !conn.congested.is_empty() {
                    let congested = conn.congested.drain(..);
                    match flow.after_publish(publishes, congested, || Instant::now().into_std()) {
                        Decode::Stop => return Ok(true),
                        // Held by a queue before: the queue's other publishers get their turn.
                        Decode::Yield => tokio::task::yield_now().await,
                        Decode::Go => {}
                    }
                }
            }
            Ok(None) => return Ok(false),
            Err(e) => {
                let err = crate::errors::AmqpError {
                    code: e.reply_code(),
                    text: e.reply_text().to_string_lossy(),
                    class_id: 0,
                    method_id: 0,
                };
                conn.close_with(&err, now_millis());
                // The stream cannot be read any further: flush the close and go.
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&conn.out)).await;
                return Err(ConnectionError::Protocol(err.text));
            }
        }
    }
}

/// `written` bytes of `out` went out: it is emptied, and a burst's buffer is not kept once
/// the writes are small again (a heartbeat, a method's answer). An idle connection kept the
/// 8 KiB it was made with, more than half of its memory (docs/benchmarks.md, "Idle AMQP
/// connections").
fn written_out(out: &mut BytesMut, written: usize) {
    out.clear();
    let cap = out.capacity();
    if (written < OUT_SMALL && cap > OUT_KEEP) || (cap > OUT_BURST && written < cap / 4) {
        *out = BytesMut::new();
    }
}

/// Hands what the state machine counts to the connection's registry entry (once per wake-up:
/// a few relaxed stores, and the channel list, copied only when it changed), and its login
/// once connection.open succeeded.
fn registry_update(
    h: &ConnectionHandle,
    conn: &Connection,
    logged_in: &mut bool,
    channels: &mut Vec<ferry_core::connections::ChannelInfo>,
) {
    h.counters.set_messages(conn.messages_in, conn.messages_out);
    h.set_channels(conn.channel_count() as u32);
    conn.channel_infos(channels);
    h.set_channel_list(channels);
    if !*logged_in {
        if let Some(vhost) = conn.vhost_name() {
            *logged_in = true;
            h.set_login(Login {
                user: conn.user.clone().unwrap_or_default(),
                vhost: vhost.to_string(),
                client_id: conn.client_name.clone(),
            });
        }
    }
}

/// The reason a close from outside gives; never, for a connection not in the registry.
async fn closed(handle: Option<&ConnectionHandle>) -> &str {
    match handle {
        Some(h) => h.closed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_s_write_buffer_goes_once_the_writes_are_small_again() {
        let mut out = BytesMut::new();
        // A busy consumer's batches keep their buffer, whatever its size.
        out.extend_from_slice(&vec![0u8; 100_000]);
        written_out(&mut out, 100_000);
        assert!(out.is_empty() && out.capacity() >= 100_000);
        out.extend_from_slice(&vec![0u8; 30_000]);
        written_out(&mut out, 30_000);
        assert!(out.capacity() >= 100_000);
        // A large message's buffer goes once the writes are a quarter of it or less.
        out.extend_from_slice(&[0u8; 2_000]);
        written_out(&mut out, 2_000);
        assert_eq!(out.capacity(), 0);
        out.extend_from_slice(&vec![0u8; 50_000]);
        written_out(&mut out, 50_000);
        out.extend_from_slice(&[0u8; 2_000]);
        written_out(&mut out, 2_000);
        assert!(out.capacity() >= 50_000, "under 64 KiB, only small writes give it back");
        // A heartbeat gives it back.
        out.extend_from_slice(&[0u8; 8]);
        written_out(&mut out, 8);
        assert_eq!(out.capacity(), 0);
        // A small buffer is kept.
        out.extend_from_slice(&[0u8; 100]);
        let kept = out.capacity();
        written_out(&mut out, 100);
        assert_eq!(out.capacity(), kept);
    }
}

//! The connection driver: one tokio task per connection. Reads with `read_buf` (cancel-safe),
//! feeds frames to the [`Connection`], drains deliveries, and writes everything produced in one
//! write per wake-up. Heartbeats both ways; the handshake is bounded in time.
//!
//! Reading pauses while the connection is held back: the memory or disk alarm (a publisher),
//! a congested subscriber it publishes to, or its publish rate (`max_publish_rate`, a token
//! bucket; one token per completed publish — frames after the one that ran into debt stay in
//! the buffer until the wait is over). Our heartbeats go on meanwhile, and the time not
//! reading does not count against the client's heartbeats.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::BytesMut;
use ferry_core::frontend::{ClientStream, ConnectionContext, ConnectionError};
use ferry_core::log_limited;
use ferry_core::message::now_millis;
use ferry_core::rate::TokenBucket;
use ferry_core::store::StoreError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::channel::PendingConfirm;
use crate::codec::{check_protocol_header, FrameDecoder, ProtocolHeader, FRAME_MIN_SIZE, PROTOCOL_HEADER};
use crate::connection::{Connection, Flow, Settings};

/// How long a client has to answer our connection.close with close-ok.
const CLOSE_OK_WAIT: Duration = Duration::from_secs(5);

type ConfirmWait = Pin<Box<dyn Future<Output = (Result<(), StoreError>, PendingConfirm)> + Send>>;

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
    let mut buf = BytesMut::with_capacity(8 * 1024);

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
        match tokio::time::timeout_at(handshake_deadline, stream.read_buf(&mut buf)).await {
            Err(_) => {
                let timeout = limits.handshake_timeout;
                log_limited!(info, "AMQP handshake timeout", conn = %ctx.id, %peer, "AMQP protocol header not received within {timeout:?}");
                return Err(ConnectionError::HandshakeTimeout(timeout));
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }

    if let Some(refusal) = &ctx.refusal {
        conn.refuse(refusal);
    }
    if let Some(from) = ctx.listener.auth.cert_login {
        let certificates = stream.tls.as_ref().map(|t| t.peer_certificates.as_slice()).unwrap_or_default();
        conn.offer_external(ferry_core::cert_login::certificate_identity(certificates, from));
    }
    conn.start(Instant::now().into_std());
    let mut decoder = FrameDecoder::new(FRAME_MIN_SIZE);
    let outbox = conn.outbox().clone();
    let mut scratch = Vec::new();
    let mut shutdown = ctx.shutdown.clone();
    let mut waiting: Option<ConfirmWait> = None;
    let mut shutting_down = false;
    // The memory and disk alarms: while either is up, connections that publish are not read
    // (RabbitMQ's behaviour); clients that support it are told with connection.blocked /
    // unblocked. Consuming connections go on.
    let mut alarm = ctx.broker.publishers_blocked();
    let mut told_blocked = false;
    // Set once we sent connection.close: the client gets CLOSE_OK_WAIT to answer close-ok.
    let mut closing_deadline: Option<Instant> = None;
    // The publish rate: one token per publish; in debt, reading stops until `throttled_until`.
    let mut publish_rate = (limits.max_publish_rate > 0)
        .then(|| TokenBucket::new(limits.max_publish_rate, limits.max_publish_rate, Instant::now().into_std()));
    let mut throttled_until: Option<Instant> = None;

    loop {
        // Everything ready: confirms whose commits resolved, deliveries, then one write.
        conn.take_ready_confirms(now_millis());
        if waiting.is_none() {
            if let Some(p) = conn.pending.pop_front() {
                waiting = Some(Box::pin(async move {
                    // The commit is moved into the future; the pending entry carries no commit
                    // any more, so a done one stands in for it.
                    let mut p = p;
                    let commit = std::mem::replace(&mut p.commit, ferry_core::store::Commit::done(Ok(())));
                    (commit.wait().await, p)
                }));
            }
        }
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
            conn.out.clear();
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

        conn.congested.retain(|o| !o.has_room());
        let congested = conn.congested.first().cloned();
        let alarm_up = *alarm.borrow();
        if alarm_up != told_blocked && (conn.published || !alarm_up) {
            conn.send_blocked(alarm_up);
            told_blocked = alarm_up;
            continue;
        }
        let held = alarm_up && conn.published;
        let reading = congested.is_none() && !held && throttled_until.is_none();
        // Our pause does not look like a silent client (the connection's heartbeat clock).
        conn.set_reading(reading, Instant::now().into_std());
        // Heartbeats both ways: ours when we are quiet, and the client's silence.
        let heartbeat_at = conn.poll_timeout().map(Instant::from_std);
        let dead_at = closing_deadline.or((!conn.is_open()).then_some(handshake_deadline));

        // Whether to decode what is in the buffer after the select.
        let mut decode = false;
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
                    Ok(_) => conn.received(Instant::now().into_std()),
                }
                decode = true;
            }
            // The publish rate's wait is over: go on with the frames left in the buffer.
            _ = sleep_until(throttled_until), if throttled_until.is_some() => {
                throttled_until = None;
                decode = true;
            }
            _ = outbox.notified() => {}
            // A subscriber we publish to is full: hold this publisher back, at most
            // CONGESTION_PAUSE; one that does not keep up is lagging and holds nobody back any
            // more (ferry_core::sink).
            _ = async { ferry_core::sink::wait_for_room(congested.as_deref().expect("guarded")).await },
                if congested.is_some() => {
                conn.congested.clear();
            }
            (result, p) = async { waiting.as_mut().expect("guarded").await }, if waiting.is_some() => {
                waiting = None;
                conn.confirm_done(p, result.is_ok(), now_millis());
            }
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
        }
        if decode {
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        if conn.handle(frame, now_millis()) == Flow::Close {
                            break;
                        }
                        if let Some((user, password, mechanism)) = conn.take_pending_login() {
                            // Checked on the blocking pool, bounded; within the handshake time.
                            let login = ctx.broker.auth().login(
                                &ctx.listener.auth,
                                stream.peer.ip(),
                                Some(&user),
                                Some(&password),
                            );
                            let result = tokio::time::timeout_at(handshake_deadline, login)
                                .await
                                .unwrap_or(Err(ferry_core::auth::AuthError::Busy));
                            conn.login_done(&mechanism, result, now_millis());
                            // Nothing the client pipelined before the answer counts.
                            if conn.is_closed() || conn.is_closing() {
                                break;
                            }
                        }
                        // A tune-ok in this batch raises the limit for the frames after it:
                        // a client may pipeline open and a large publish behind tune-ok.
                        if conn.frame_max != 0 {
                            decoder.max_frame_size = conn.frame_max;
                        }
                        // Over the publish rate: the rest of the buffer waits.
                        if let Some(bucket) = &mut publish_rate {
                            let n = conn.take_publishes();
                            if n > 0 {
                                if let Some(wait) = bucket.take(n, Instant::now().into_std()) {
                                    throttled_until = Some(Instant::now() + wait);
                                    break;
                                }
                            }
                        }
                    }
                    Ok(None) => break,
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
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

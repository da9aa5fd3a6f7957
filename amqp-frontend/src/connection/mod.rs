//! The AMQP connection state machine: handshake, channels, every method, content assembly.
//! Fed frames and the time, it writes frames into [`Connection::out`] and calls the core
//! directly. No sockets: the driver owns I/O.
//!
//! This file holds [`Connection`], its entry points ([`Connection::handle`] and what the driver
//! calls), the connection class (start / tune / open / close, login) and the dispatch of channel
//! methods to one file per class, each an `impl Connection` block:
//! `channel.rs` (channel.open / close / flow, releasing a channel), `exchange.rs`, `queue.rs`,
//! `basic.rs` (qos, consume, cancel, get, acks, recover, the publish method, deliveries),
//! `confirm_tx.rs` (confirm.select, tx.*, confirms once a commit resolves), `content.rs`
//! (header and body assembly, the publish into the core) and `heartbeat.rs` (our heartbeats and
//! the client's, on the time the driver passes in). Nothing here reads a clock: every entry point
//! that needs the time takes it. Reply codes come from the one table in
//! [`crate::errors`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use ferry_core::auth::{AuthError, Identity};
use ferry_core::exchange::ExchangeKind;
use ferry_core::flow::AckQueue;
use ferry_core::hash::KeyedMap;
use ferry_core::message::{process_seed, ConnectionId, FieldTable, FieldValue, Millis, ShortString};
use ferry_core::permissions::{Permission, Resource};
use ferry_core::policy::QueueUse;
use ferry_core::sink::Outbox;
use ferry_core::vhost::VHost;
use ferry_core::{log_limited, Broker};

use crate::access::Access;
use crate::channel::{Channel, Outgoing, PendingConfirm};
use crate::codec::*;
use crate::errors::AmqpError;

mod basic;
mod channel;
mod confirm_tx;
mod content;
mod exchange;
mod heartbeat;
mod queue;

/// Server limits proposed in connection.tune.
#[derive(Debug, Clone)]
pub struct Settings {
    /// RabbitMQ's default `channel_max`.
    pub channel_max: u16,
    pub frame_max: u32,
    /// Seconds; RabbitMQ's default is 60.
    pub heartbeat: u16,
    /// Largest message body accepted (RabbitMQ's default `max_message_size` is 128 MiB).
    pub max_message_size: u64,
    /// Deliveries buffered for the connection before queues wait.
    pub outbox_capacity: usize,
    /// Consumers one channel may have (RabbitMQ's `consumer_max_per_channel`).
    pub consumer_max_per_channel: u32,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 60,
            max_message_size: 128 * 1024 * 1024,
            outbox_capacity: 1000,
            consumer_max_per_channel: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// connection.start sent; waiting for start-ok.
    AwaitStartOk,
    /// start-ok came; the driver checks the credentials ([`Connection::take_pending_login`]).
    Authenticating,
    /// connection.tune sent; waiting for tune-ok.
    AwaitTuneOk,
    /// Waiting for connection.open.
    AwaitOpen,
    Open,
    /// connection.close sent; waiting for close-ok (everything else is discarded).
    Closing,
    /// Done: the driver closes the socket after flushing.
    Closed,
}

/// What the driver must do after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Flush and close the socket.
    Close,
}

/// RabbitMQ's direct reply-to pseudo-queue.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A server-generated consumer tag: a counter makes it unique in the process, and a seed drawn
/// at start keeps it from repeating a tag of an earlier run (no clock read).
fn consumer_tag() -> ShortString {
    static N: AtomicU64 = AtomicU64::new(1);
    ShortString::from(format!("amq.ctag-{:x}-{}", process_seed(), N.fetch_add(1, Ordering::Relaxed)))
}

/// One AMQP connection.
pub struct Connection {
    pub id: ConnectionId,
    broker: Arc<Broker>,
    default_vhost: String,
    vhost: Option<Arc<VHost>>,
    state: State,
    settings: Settings,
    pub frame_max: u32,
    pub channel_max: u16,
    /// Negotiated heartbeat, seconds (0 = off).
    pub heartbeat: u16,
    /// Looked up several times per publish: foldhash, not SipHash (3.7 % of the broker's CPU
    /// for AMQP auto-ack 1->1 went to hashing, mostly here). Keyed per process: the client
    /// picks the numbers, at most `channel_max` of them.
    /// Boxed: a map of 488-byte channels took 2 KB for one channel (four slots).
    channels: KeyedMap<u16, Box<Channel>>,
    outbox: Arc<Outbox<Outgoing>>,
    /// Bytes to write.
    pub out: BytesMut,
    /// The user name the client authenticated with.
    pub user: Option<String>,
    /// The user is the anonymous identity.
    anonymous: bool,
    /// What the user may do on the vhost (from connection.open).
    access: Option<Access>,
    /// Credentials from start-ok for the driver to check (user, password, mechanism).
    pending_login: Option<(String, Bytes, ShortString)>,
    /// The EXTERNAL mechanism is offered (a `cert_login` listener), with the identity the
    /// client's certificate gives, or why it gives none.
    external: Option<Result<Identity, AuthError>>,
    /// The client asked to be told of a failed login with connection.close 403
    /// (`authentication_failure_close`); others just see the socket close, as with RabbitMQ.
    auth_failure_close: bool,
    /// Confirms whose commits are pending, across channels, in order.
    pub pending: AckQueue<PendingConfirm>,
    /// The client understands connection.blocked (its capabilities say so).
    pub blocked_capable: bool,
    /// Outboxes of (MQTT) subscribers that took our persistent messages over capacity, and
    /// queues that took them while falling behind their consumers: the driver hands them to its
    /// publisher flow control, which stops decoding at once and pauses reading until they have
    /// room (`ferry_core::flow`).
    pub congested: Vec<ferry_core::flow::Target>,
    /// The connection is only to be refused (over a connection limit): start-ok is answered
    /// with connection.close 530 and this text, credentials unchecked.
    refusal: Option<String>,
    /// Publishes completed since the driver last asked ([`Connection::take_publishes`]), for
    /// the listener's publish rate limit.
    publishes: u32,
    /// Messages published by the client and delivered to it (deliver and get-ok), since the
    /// connection began: the driver hands them to the core's connection registry.
    pub messages_in: u64,
    pub messages_out: u64,
    /// The name the client gave its connection (`connection_name` in its client properties,
    /// RabbitMQ's "user-provided name").
    pub client_name: Option<String>,
    /// The client's address, for log lines (set by the driver; `None` in tests).
    peer: Option<SocketAddr>,
    /// When connection.open succeeded: the connection's connect line was written and a
    /// disconnect line will be.
    opened_at: Option<Millis>,
    /// Why the connection ended, as its disconnect line says; the first reason given wins.
    end: Option<String>,
    /// The server closed the connection for an error (not for a shutdown or the client's own
    /// close).
    closed_for_error: bool,
    /// The heartbeat clock, from [`Connection::start`] on (see `heartbeat.rs`).
    heartbeats: Option<heartbeat::Heartbeats>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("id", &self.id).field("state", &self.state).finish_non_exhaustive()
    }
}

fn capabilities() -> FieldTable {
    let mut t = FieldTable::new();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
        "consumer_priorities",
        "direct_reply_to",
    ] {
        t.insert(cap, FieldValue::Bool(true));
    }
    t
}

fn server_properties() -> FieldTable {
    let mut t = FieldTable::new();
    t.insert("product", FieldValue::string("Ferry"));
    t.insert("version", FieldValue::string(env!("CARGO_PKG_VERSION")));
    t.insert("platform", FieldValue::string("Rust"));
    t.insert("information", FieldValue::string("MQTT 3.1.1, MQTT 5.0 and AMQP 0-9-1 on one core"));
    t.insert("capabilities", FieldValue::Table(capabilities()));
    t
}

/// connection.blocked's reason, worded as RabbitMQ words it: the alarms that are up, joined
/// with " & " ("low on memory", "low on disk", "low on memory & low on disk").
fn blocked_reason(broker: &Broker) -> String {
    let mut reasons = Vec::with_capacity(2);
    if broker.memory().is_raised() {
        reasons.push("low on memory");
    }
    if broker.disk().is_raised() {
        reasons.push("low on disk");
    }
    if reasons.is_empty() {
        // The alarm went down in the instant since the driver looked; unblocked follows.
        reasons.push("low on memory");
    }
    reasons.join(" & ")
}

/// The user in a PLAIN (`\0user\0password`) or AMQPLAIN (LOGIN/PASSWORD table) response.
fn parse_credentials(mechanism: &ShortString, response: &Bytes) -> Option<(String, Bytes)> {
    match mechanism.as_bytes() {
        b"PLAIN" => {
            // RFC 4616: [authzid] NUL authcid NUL passwd, no NUL inside a part.
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next()?;
            let user = std::str::from_utf8(parts.next()?).ok()?.to_string();
            let pass = Bytes::copy_from_slice(parts.next()?);
            if parts.next().is_some() {
                return None;
            }
            Some((user, pass))
        }
        b"AMQPLAIN" => {
            // AMQPLAIN's response is a field table without its length prefix.
            let mut framed = BytesMut::with_capacity(response.len() + 4);
            framed.extend_from_slice(&(response.len() as u32).to_be_bytes());
            framed.extend_from_slice(response);
            let t = decode_field_table(framed.freeze().slice(4..)).ok()?;
            let user = t.get("LOGIN")?.as_str()?.to_string();
            let pass = match t.get("PASSWORD")? {
                FieldValue::LongString(b) | FieldValue::Bytes(b) => b.clone(),
                _ => return None,
            };
            Some((user, pass))
        }
        _ => None,
    }
}

impl Connection {
    pub fn new(id: ConnectionId, broker: Arc<Broker>, default_vhost: String, settings: Settings) -> Connection {
        Connection {
            id,
            broker,
            default_vhost,
            vhost: None,
            state: State::AwaitStartOk,
            frame_max: FRAME_MIN_SIZE,
            channel_max: settings.channel_max,
            heartbeat: 0,
            channels: KeyedMap::default(),
            outbox: Arc::new(Outbox::new(settings.outbox_capacity)),
            // Grown by what is written; the driver gives a burst's buffer back (`OUT_KEEP`).
            out: BytesMut::new(),
            user: None,
            anonymous: false,
            access: None,
            pending_login: None,
            external: None,
            auth_failure_close: false,
            pending: AckQueue::new(),
            congested: Vec::new(),
            blocked_capable: false,
            refusal: None,
            publishes: 0,
            messages_in: 0,
            messages_out: 0,
            client_name: None,
            peer: None,
            opened_at: None,
            end: None,
            closed_for_error: false,
            heartbeats: None,
            settings,
        }
    }

    /// Marks the connection as one to refuse (a connection limit is reached): the client's
    /// start-ok is answered with connection.close 530 NOT_ALLOWED and `reason`, without looking
    /// at its credentials. Call before [`Connection::start`].
    pub fn refuse(&mut self, reason: impl std::fmt::Display) {
        self.refusal = Some(reason.to_string());
    }

    /// The client's address, for log lines.
    pub fn set_peer(&mut self, peer: SocketAddr) {
        self.peer = Some(peer);
    }

    /// Why the connection ended, unless a reason was given already (a close the client or
    /// the server sent comes before the socket closing after it).
    pub fn ended(&mut self, why: impl Into<String>) {
        if self.end.is_none() {
            self.end = Some(why.into());
        }
    }

    /// The disconnect line of a connection that was opened (its connect line was written):
    /// peer, user, vhost, how long and why. A close for an error is something a client can
    /// provoke at will, so those lines are limited; the others are one per connection.
    pub fn log_disconnect(&self, now: Millis) {
        let Some(opened_at) = self.opened_at else { return };
        let duration = std::time::Duration::from_millis(now.saturating_sub(opened_at));
        let vhost = self.vhost.as_ref().map(|v| v.name()).unwrap_or_default();
        let user = self.user.as_deref().unwrap_or_default();
        let reason = self.end.as_deref().unwrap_or("connection lost");
        if self.closed_for_error {
            log_limited!(
                info, "AMQP client disconnected (error)",
                conn = %self.id, peer = self.peer.map(tracing::field::display), protocol = "AMQP", version = "0-9-1", user, vhost,
                ?duration, reason, "AMQP client disconnected"
            );
        } else {
            tracing::info!(
                conn = %self.id, peer = self.peer.map(tracing::field::display), protocol = "AMQP", version = "0-9-1", user, vhost,
                ?duration, reason, "AMQP client disconnected"
            );
        }
    }

    /// The number of publishes completed since the last call (each basic.publish whose content
    /// arrived in full, including those in a transaction).
    pub fn take_publishes(&mut self) -> u32 {
        std::mem::take(&mut self.publishes)
    }

    pub fn outbox(&self) -> &Arc<Outbox<Outgoing>> {
        &self.outbox
    }
    /// The vhost, once connection.open succeeded.
    pub fn vhost_name(&self) -> Option<&str> {
        self.vhost.as_ref().map(|v| v.name())
    }
    /// Open channels (closing ones included until their close-ok).
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }
    /// The channels as the registry lists them, into `out` (cleared first; reused across
    /// wake-ups so that it allocates only when the connection opens more channels).
    pub fn channel_infos(&self, out: &mut Vec<ferry_core::connections::ChannelInfo>) {
        out.clear();
        out.extend(self.channels.values().map(|c| ferry_core::connections::ChannelInfo {
            number: c.id,
            owner: c.owner,
            prefetch_count: c.consumer_prefetch,
            global_prefetch_count: c.credit.limit.load(std::sync::atomic::Ordering::Relaxed),
            confirm: c.confirm_seq.is_some(),
            transactional: c.tx.is_some(),
            consumers: c.consumers.len() as u32,
            unacked: c.unacked.len() as u32,
        }));
        out.sort_unstable_by_key(|c| c.number);
    }
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }
    /// connection.close was sent; waiting for the client's close-ok.
    pub fn is_closing(&self) -> bool {
        self.state == State::Closing
    }

    fn send(&mut self, channel: u16, method: Method) {
        if let Err(e) = encode_method_frame(channel, &method, &mut self.out) {
            tracing::warn!(conn = %self.id, error = %e, "method not encodable; dropped");
        }
    }

    /// Offers SASL EXTERNAL (RabbitMQ's `rabbitmq_auth_mechanism_ssl`): a client that picks it
    /// logs in as `identity`, the user name its verified certificate stands for. Call before
    /// [`Connection::start`].
    pub fn offer_external(&mut self, identity: Result<Identity, AuthError>) {
        self.external = Some(identity);
    }

    /// Writes connection.start (after the client's protocol header, which came at `now`).
    pub fn start(&mut self, now: std::time::Instant) {
        self.heartbeats = Some(heartbeat::Heartbeats::new(now));
        let mechanisms: &'static [u8] =
            if self.external.is_some() { b"PLAIN AMQPLAIN EXTERNAL" } else { b"PLAIN AMQPLAIN" };
        self.send(
            0,
            Method::ConnectionStart(ConnectionStart {
                version_major: 0,
                version_minor: 9,
                server_properties: server_properties(),
                mechanisms: Bytes::from_static(mechanisms),
                locales: Bytes::from_static(b"en_US"),
            }),
        );
    }

    /// Closes the connection with an error: connection.close, then wait for close-ok.
    /// Credentials waiting to be checked: (user, password, mechanism).
    pub fn take_pending_login(&mut self) -> Option<(String, Bytes, ShortString)> {
        self.pending_login.take()
    }

    /// The outcome of the login: tune on success; on failure 403 ACCESS_REFUSED in a
    /// connection.close for clients that asked for it (`authentication_failure_close`), a
    /// plain close of the socket for the others (RabbitMQ's behaviour).
    pub fn login_done(&mut self, mechanism: &ShortString, result: Result<Identity, AuthError>, now: Millis) {
        if self.state != State::Authenticating {
            return;
        }
        match result {
            Ok(identity) => {
                self.user = Some(identity.user);
                self.anonymous = identity.anonymous;
                self.state = State::AwaitTuneOk;
                self.send(
                    0,
                    Method::ConnectionTune(ConnectionTune {
                        channel_max: self.settings.channel_max,
                        frame_max: self.settings.frame_max,
                        heartbeat: self.settings.heartbeat,
                    }),
                );
            }
            Err(e) => {
                let text = match &e {
                    AuthError::BadCredentials => format!(
                        "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
                    ),
                    other => other.to_string(),
                };
                log_limited!(info, "AMQP login refused", conn = %self.id, peer = self.peer.map(tracing::field::display), mechanism = %mechanism, "AMQP login refused: {e}");
                if self.auth_failure_close {
                    self.close_with(&AmqpError::new(reply_code::ACCESS_REFUSED, text), now);
                } else {
                    self.state = State::Closed;
                }
            }
        }
    }

    pub fn close_with(&mut self, e: &AmqpError, now: Millis) {
        if matches!(self.state, State::Closing | State::Closed) {
            return;
        }
        if self.opened_at.is_some() {
            // The disconnect line will say it.
            tracing::debug!(conn = %self.id, code = e.code, text = %e.text, "closing AMQP connection");
            if e.code != reply_code::CONNECTION_FORCED {
                self.closed_for_error = true;
            }
            self.ended(format!("closed by the server: {} {}", e.code, e.text));
        } else {
            // Before connection.open: whatever it was, a client can repeat it at will.
            log_limited!(
                info, "closing AMQP connection", conn = %self.id, peer = self.peer.map(tracing::field::display), code = e.code,
                text = %e.text, "closing AMQP connection"
            );
        }
        self.send_close(e);
        self.release_all(now);
    }

    /// Writes connection.close; close-ok is awaited next.
    fn send_close(&mut self, e: &AmqpError) {
        self.send(
            0,
            Method::ConnectionClose(ConnectionClose {
                reply_code: e.code,
                reply_text: e.reply_text(),
                class_id: e.class_id,
                method_id: e.method_id,
            }),
        );
        self.state = State::Closing;
    }

    /// Tells a client that supports it that it is blocked (memory or disk alarm) or unblocked.
    pub fn send_blocked(&mut self, blocked: bool) {
        if !self.blocked_capable || self.state != State::Open {
            return;
        }
        if blocked {
            let reason = ShortString::from(blocked_reason(&self.broker));
            self.send(0, Method::ConnectionBlocked(ConnectionBlocked { reason }));
        } else {
            self.send(0, Method::ConnectionUnblocked(ConnectionUnblocked {}));
        }
    }

    /// The server is shutting down: 320 CONNECTION_FORCED.
    pub fn shutdown(&mut self, now: Millis) {
        self.close_with(
            &AmqpError::new(reply_code::CONNECTION_FORCED, "broker forced connection closure with reason 'shutdown'"),
            now,
        );
    }

    // ----- frames ----------------------------------------------------------------------------

    /// Handles one frame. Errors close the channel or the connection as the spec says.
    pub fn handle(&mut self, frame: Frame, now: Millis) -> Flow {
        let result = match frame {
            Frame::Heartbeat => Ok(()),
            Frame::Method { channel, payload } => match Method::decode_payload(payload) {
                Ok(m) => self.on_method(channel, m, now),
                Err(e) => Err(AmqpError {
                    code: e.reply_code(),
                    text: e.reply_text().to_string_lossy(),
                    class_id: 0,
                    method_id: 0,
                }),
            },
            Frame::Header { channel, payload } => self.on_header(channel, payload, now),
            Frame::Body { channel, payload } => self.on_body(channel, payload, now),
        };
        if let Err(e) = result {
            self.close_with(&e, now);
        }
        if self.state == State::Closed {
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    fn on_method(&mut self, ch: u16, m: Method, now: Millis) -> Result<(), AmqpError> {
        let (class_id, method_id) = (m.class_id(), m.method_id());
        if self.state == State::Closing {
            // Only close-ok (or the client's own close) matter now.
            match m {
                Method::ConnectionCloseOk(_) => self.state = State::Closed,
                Method::ConnectionClose(_) => {
                    self.send(0, Method::ConnectionCloseOk(ConnectionCloseOk {}));
                }
                _ => {}
            }
            return Ok(());
        }
        if ch == 0 {
            return self.on_connection_method(m, now).map_err(|e| e.on(class_id, method_id));
        }
        if self.state != State::Open {
            return Err(AmqpError::new(reply_code::CHANNEL_ERROR, format!("channel {ch} used before connection.open"))
                .on(class_id, method_id));
        }
        match self.channels.get_mut(&ch) {
            None => {
                if let Method::ChannelOpen(_) = m {
                    return self.open_channel(ch);
                }
                Err(AmqpError::new(reply_code::CHANNEL_ERROR, format!("expected 'channel.open' on channel {ch}"))
                    .on(class_id, method_id))
            }
            Some(c) if c.closing => {
                match m {
                    Method::ChannelCloseOk(_) => {
                        self.channels.remove(&ch);
                    }
                    Method::ChannelClose(_) => self.send(ch, Method::ChannelCloseOk(ChannelCloseOk {})),
                    _ => {}
                }
                Ok(())
            }
            Some(c) => {
                if c.content.is_some() {
                    return Err(AmqpError::new(
                        reply_code::UNEXPECTED_FRAME,
                        format!(
                            "expected content header for class 60, got non content header frame instead ({})",
                            m.name()
                        ),
                    )
                    .on(class_id, method_id));
                }
                match self.on_channel_method(ch, m, now) {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_hard() => Err(e.on(class_id, method_id)),
                    Err(e) => {
                        self.close_channel(ch, &e.on(class_id, method_id), now);
                        Ok(())
                    }
                }
            }
        }
    }

    fn on_connection_method(&mut self, m: Method, now: Millis) -> Result<(), AmqpError> {
        match (self.state, m) {
            (State::AwaitStartOk, Method::ConnectionStartOk(ok)) => {
                if let Some(reason) = self.refusal.take() {
                    // Over a connection limit: refused before anything about the client counts,
                    // its mechanism and credentials included, and without touching the broker.
                    // Logged at debug level: the listener warns about refusals, at most every
                    // 10 s.
                    tracing::debug!(conn = %self.id, peer = self.peer.map(tracing::field::display), "AMQP connection refused: {reason}");
                    self.send_close(&AmqpError::new(reply_code::NOT_ALLOWED, reason).on(10, 11));
                    return Ok(());
                }
                let external = ok.mechanism.as_bytes() == b"EXTERNAL" && self.external.is_some();
                if !external && !matches!(ok.mechanism.as_bytes(), b"PLAIN" | b"AMQPLAIN") {
                    // RabbitMQ: an unknown mechanism is a command error, bad credentials 403.
                    return Err(AmqpError::new(
                        reply_code::COMMAND_INVALID,
                        format!("unknown authentication mechanism '{}'", ok.mechanism),
                    ));
                }
                let capability = |name: &str| {
                    matches!(
                        ok.client_properties.get("capabilities"),
                        Some(FieldValue::Table(t)) if t.get(name).and_then(FieldValue::as_bool) == Some(true)
                    )
                };
                self.client_name =
                    ok.client_properties.get("connection_name").and_then(FieldValue::as_str).map(str::to_string);
                self.blocked_capable = capability("connection.blocked");
                self.auth_failure_close = capability("authentication_failure_close");
                if external {
                    // The certificate was verified in the TLS handshake; the response (an
                    // authorization identity some clients send) is not looked at, as in RabbitMQ.
                    let result = self.external.take().expect("offered");
                    self.state = State::Authenticating;
                    self.login_done(&ok.mechanism, result, now);
                    return Ok(());
                }
                let Some((user, password)) = parse_credentials(&ok.mechanism, &ok.response) else {
                    return Err(AmqpError::new(
                        reply_code::ACCESS_REFUSED,
                        format!("malformed {} response", ok.mechanism),
                    ));
                };
                // The driver checks the credentials off this state machine (it takes time and
                // runs on the blocking pool) and calls `login_done`.
                self.pending_login = Some((user, password, ok.mechanism.clone()));
                self.state = State::Authenticating;
                Ok(())
            }
            (State::AwaitTuneOk, Method::ConnectionTuneOk(t)) => {
                if t.frame_max != 0 && t.frame_max < FRAME_MIN_SIZE {
                    return Err(AmqpError::new(
                        reply_code::NOT_ALLOWED,
                        format!("frame_max={} < {FRAME_MIN_SIZE} min size", t.frame_max),
                    ));
                }
                if t.frame_max > self.settings.frame_max || (t.frame_max == 0 && self.settings.frame_max != 0) {
                    return Err(AmqpError::new(
                        reply_code::NOT_ALLOWED,
                        format!("frame_max={} > {} max size", t.frame_max, self.settings.frame_max),
                    ));
                }
                self.frame_max = t.frame_max;
                self.channel_max = match t.channel_max {
                    0 => self.settings.channel_max,
                    n => n.min(self.settings.channel_max),
                };
                self.heartbeat = t.heartbeat;
                self.state = State::AwaitOpen;
                Ok(())
            }
            (State::AwaitOpen, Method::ConnectionOpen(o)) => {
                let name = o.virtual_host.to_string_lossy();
                let name = if name.is_empty() { self.default_vhost.clone() } else { name };
                match self.broker.vhost(&name) {
                    Some(v) => {
                        // RabbitMQ: the vhost must exist, then the user needs permissions on it
                        // (530 NOT_ALLOWED "access to vhost '/' refused for user 'bob'").
                        let user = self.user.as_deref().unwrap_or_default();
                        let access = Access::open(&self.broker, user, self.anonymous, &name)?;
                        self.access = Some(access);
                        // One line per connection at `info`, and one when it ends.
                        tracing::info!(
                            conn = %self.id, peer = self.peer.map(tracing::field::display), protocol = "AMQP", version = "0-9-1",
                            user, vhost = %name, heartbeat = self.heartbeat, frame_max = self.frame_max,
                            "AMQP client connected"
                        );
                        self.opened_at = Some(now);
                        self.vhost = Some(v);
                        self.state = State::Open;
                        self.send(
                            0,
                            Method::ConnectionOpenOk(ConnectionOpenOk { known_hosts: ShortString::default() }),
                        );
                        Ok(())
                    }
                    None => Err(AmqpError::new(reply_code::NOT_ALLOWED, format!("vhost {name} not found"))),
                }
            }
            (_, Method::ConnectionClose(c)) => {
                tracing::debug!(conn = %self.id, code = c.reply_code, text = %c.reply_text, "client closed the connection");
                self.ended(format!("client closed the connection: {} {}", c.reply_code, c.reply_text));
                self.release_all(now);
                self.send(0, Method::ConnectionCloseOk(ConnectionCloseOk {}));
                self.state = State::Closed;
                Ok(())
            }
            (State::Open, Method::ConnectionUpdateSecret(_)) => {
                self.send(0, Method::ConnectionUpdateSecretOk(ConnectionUpdateSecretOk {}));
                Ok(())
            }
            // A client may tell us it is blocked/unblocked? No: those go server → client only.
            (_, m) => Err(AmqpError::new(
                reply_code::COMMAND_INVALID,
                format!("{} is not valid on channel 0 in this state", m.name()),
            )),
        }
    }

    fn vhost(&self) -> &Arc<VHost> {
        self.vhost.as_ref().expect("channels exist only on an open connection")
    }

    fn channel(&mut self, ch: u16) -> &mut Channel {
        self.channels.get_mut(&ch).expect("checked by on_method")
    }

    /// Resolves an empty queue name to the channel's last declared queue (as RabbitMQ does).
    fn queue_name(&mut self, ch: u16, name: ShortString) -> Result<ShortString, AmqpError> {
        if !name.is_empty() {
            return Ok(name);
        }
        self.channel(ch)
            .last_queue
            .clone()
            .ok_or_else(|| AmqpError::new(reply_code::NOT_FOUND, "no previously declared queue"))
    }

    /// RabbitMQ's `check_{configure,write,read}_permitted` on an exchange or queue.
    fn authorize(&mut self, permission: Permission, resource: Resource, name: &ShortString) -> Result<(), AmqpError> {
        match &mut self.access {
            Some(a) => a.check(&self.broker, permission, resource, &name.to_string_lossy()),
            None => Ok(()),
        }
    }

    /// RabbitMQ's topic authorisation on `exchange` for `key` (topic exchanges with a topic
    /// permission for the user), and the MQTT ACL on MQTT exchanges.
    fn authorize_topic(
        &mut self,
        permission: Permission,
        exchange: &ShortString,
        key: &ShortString,
    ) -> Result<(), AmqpError> {
        let Some(a) = &mut self.access else { return Ok(()) };
        let exchange = exchange.to_string_lossy();
        let vhost = self.vhost.as_ref().expect("open");
        let is_topic = || vhost.exchange(&exchange).is_some_and(|e| e.kind() == ExchangeKind::Topic);
        a.check_topic(&self.broker, permission, &exchange, is_topic, &key.to_string_lossy())
    }

    /// Routing into `destination` with keys matching `key` (see [`Access::check_route_into`]).
    fn authorize_route_into(&mut self, destination: &ShortString, key: &str) -> Result<(), AmqpError> {
        match &mut self.access {
            Some(a) => a.check_route_into(&self.broker, &destination.to_string_lossy(), key),
            None => Ok(()),
        }
    }

    /// The queues another frontend keeps for its own clients (the MQTT frontend's sessions and
    /// shared subscriptions) are not for AMQP verbs, whoever asks
    /// ([`TopicPolicy::queue_refusal`](ferry_core::policy::TopicPolicy::queue_refusal)): 403
    /// ACCESS_REFUSED, a channel error.
    fn guard_reserved_queue(&self, name: &ShortString, what: QueueUse) -> Result<(), AmqpError> {
        self.guard_reserved_queue_under(name, what, false)
    }

    /// [`Connection::guard_reserved_queue`] right after [`Connection::restricted`], which brought
    /// the connection's policy up to date: asked of that policy, not of the broker's again (an
    /// atomic load and a pointer comparison less on every publish to the default exchange).
    fn guard_reserved_queue_checked(&self, name: &ShortString, what: QueueUse) -> Result<(), AmqpError> {
        self.guard_reserved_queue_under(name, what, true)
    }

    /// Asks the connection's own policy when `fresh` (and it has one), the broker's otherwise.
    fn guard_reserved_queue_under(&self, name: &ShortString, what: QueueUse, fresh: bool) -> Result<(), AmqpError> {
        let vhost = self.vhost.as_ref().map_or("", |v| v.name());
        let refusal = match &self.access {
            Some(access) if fresh => access.reserved_queue_refusal(vhost, name.as_bytes(), what),
            _ => self.broker.reserved_queue_refusal(vhost, name.as_bytes(), what),
        };
        match refusal {
            Some(why) => Err(AmqpError::new(reply_code::ACCESS_REFUSED, why)),
            None => Ok(()),
        }
    }

    /// Does anything restrict this connection? (Skips every check in the common case.)
    fn restricted(&mut self) -> bool {
        self.access.as_mut().is_some_and(|a| !a.unrestricted(&self.broker))
    }

    /// The exchange a declare argument names (`alternate-exchange`, `x-dead-letter-exchange`).
    fn exchange_argument(arguments: &FieldTable, key: &str) -> Option<ShortString> {
        arguments.get(key).and_then(|v| v.as_str()).map(ShortString::from)
    }
    /// A method on an open channel, dispatched to its class's handler (one file per class).
    fn on_channel_method(&mut self, ch: u16, m: Method, now: Millis) -> Result<(), AmqpError> {
        match m {
            Method::ChannelOpen(_) => {
                Err(AmqpError::new(reply_code::CHANNEL_ERROR, format!("second 'channel.open' seen on channel {ch}")))
            }
            Method::ChannelClose(c) => self.on_channel_close(ch, c, now),
            Method::ChannelCloseOk(_) => Ok(()),
            Method::ChannelFlow(f) => self.on_channel_flow(ch, f, now),
            Method::ChannelFlowOk(_) => Ok(()),
            Method::AccessRequest(_) => self.on_access_request(ch),

            Method::ExchangeDeclare(d) => self.on_exchange_declare(ch, d),
            Method::ExchangeDelete(d) => self.on_exchange_delete(ch, d),
            Method::ExchangeBind(b) => self.on_exchange_bind(ch, b),
            Method::ExchangeUnbind(b) => self.on_exchange_unbind(ch, b),

            Method::QueueDeclare(d) => self.on_queue_declare(ch, d, now),
            Method::QueueBind(b) => self.on_queue_bind(ch, b),
            Method::QueueUnbind(b) => self.on_queue_unbind(ch, b),
            Method::QueuePurge(p) => self.on_queue_purge(ch, p, now),
            Method::QueueDelete(d) => self.on_queue_delete(ch, d, now),

            Method::BasicQos(q) => self.on_basic_qos(ch, q, now),
            Method::BasicConsume(c) => self.on_basic_consume(ch, c, now),
            Method::BasicCancel(c) => self.on_basic_cancel(ch, c, now),
            Method::BasicPublish(p) => self.on_basic_publish(ch, p),
            Method::BasicGet(g) => self.on_basic_get(ch, g, now),
            Method::BasicAck(a) => self.on_basic_ack(ch, a, now),
            Method::BasicReject(r) => self.on_basic_reject(ch, r, now),
            Method::BasicNack(n) => self.on_basic_nack(ch, n, now),
            Method::BasicRecover(r) => self.on_basic_recover(ch, r, now),
            Method::BasicRecoverAsync(r) => self.on_basic_recover_async(ch, r, now),

            Method::ConfirmSelect(s) => self.on_confirm_select(ch, s),
            Method::TxSelect(_) => self.on_tx_select(ch),
            Method::TxCommit(_) => self.on_tx_commit(ch, now),
            Method::TxRollback(_) => self.on_tx_rollback(ch),
            m => Err(AmqpError::new(reply_code::COMMAND_INVALID, format!("{} is not a client method", m.name()))),
        }
    }
}

#[cfg(test)]
mod time_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::store::MemoryStore;
    use std::time::Instant;

    /// The wall-clock time (for message TTLs) the tests run at: any fixed value, nothing here
    /// reads the clock.
    pub(super) const T0: Millis = 1_700_000_000_000;

    /// The monotonic time (for heartbeats) connections start at; the tests add to it. An
    /// `Instant` can only be had from the clock, so this is its one read: an origin.
    pub(super) fn origin() -> Instant {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *ORIGIN.get_or_init(Instant::now)
    }

    pub(super) fn connection(settings: Settings) -> Connection {
        let broker = Broker::new(Arc::new(MemoryStore::default()));
        Connection::new(ConnectionId::next(), broker, "/".to_string(), settings)
    }

    pub(super) fn frames(encode: impl FnOnce(&mut BytesMut)) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        encode(&mut buf);
        let decoder = FrameDecoder::new(1 << 20);
        std::iter::from_fn(|| decoder.decode(&mut buf).expect("well-formed")).collect()
    }

    pub(super) fn feed(c: &mut Connection, ch: u16, m: Method) {
        feed_at(c, ch, m, T0);
    }

    pub(super) fn feed_at(c: &mut Connection, ch: u16, m: Method, now: Millis) {
        for f in frames(|out| encode_method_frame(ch, &m, out).expect("encode")) {
            c.handle(f, now);
        }
    }

    /// The methods the connection wrote since the last call.
    pub(super) fn sent(c: &mut Connection) -> Vec<(u16, Method)> {
        let mut out = c.out.split();
        let decoder = FrameDecoder::new(1 << 20);
        std::iter::from_fn(|| decoder.decode(&mut out).expect("well-formed"))
            .filter_map(|f| match f {
                Frame::Method { channel, payload } => Some((channel, Method::decode_payload(payload).expect("known"))),
                _ => None,
            })
            .collect()
    }

    fn start_ok(user: &str, password: &str) -> Method {
        Method::ConnectionStartOk(ConnectionStartOk {
            mechanism: ShortString::from("PLAIN"),
            response: Bytes::from(format!("\0{user}\0{password}")),
            ..ConnectionStartOk::default()
        })
    }

    /// A connection through the handshake (the login accepted as the driver would) with
    /// channel 1 open.
    pub(super) fn open(settings: Settings) -> Connection {
        open_with_heartbeat(settings, 0)
    }

    /// [`open`] with `heartbeat` seconds in tune-ok, started at [`origin`].
    pub(super) fn open_with_heartbeat(settings: Settings, heartbeat: u16) -> Connection {
        let mut c = connection(settings);
        c.start(origin());
        feed(&mut c, 0, start_ok("guest", "guest"));
        let (_, _, mechanism) = c.take_pending_login().expect("credentials to check");
        c.login_done(&mechanism, Ok(Identity { user: "guest".into(), anonymous: false }), T0);
        feed(&mut c, 0, Method::ConnectionTuneOk(ConnectionTuneOk { channel_max: 0, frame_max: 131_072, heartbeat }));
        feed(
            &mut c,
            0,
            Method::ConnectionOpen(ConnectionOpen {
                virtual_host: ShortString::from("/"),
                capabilities: ShortString::default(),
                insist: false,
            }),
        );
        feed(&mut c, 1, Method::ChannelOpen(ChannelOpen::default()));
        assert!(c.is_open());
        sent(&mut c);
        c
    }

    #[test]
    fn a_refused_connection_gets_530_at_start_ok_without_a_login() {
        let mut c = connection(Settings::default());
        c.refuse("connection limit (2) of the listener is reached");
        c.start(origin());
        assert!(matches!(sent(&mut c).as_slice(), [(0, Method::ConnectionStart(_))]));
        // Credentials that would be refused, and a mechanism that is not offered: neither counts.
        feed(&mut c, 0, start_ok("nobody", "wrong"));
        feed(&mut c, 0, Method::ConnectionStartOk(ConnectionStartOk::default()));
        assert!(c.take_pending_login().is_none(), "no login check");
        assert!(c.is_closing());
        match sent(&mut c).as_slice() {
            [(0, Method::ConnectionClose(close))] => {
                assert_eq!(close.reply_code, reply_code::NOT_ALLOWED);
                assert_eq!(
                    close.reply_text.to_string_lossy(),
                    "NOT_ALLOWED - connection limit (2) of the listener is reached"
                );
                assert_eq!((close.class_id, close.method_id), (10, 11));
            }
            other => panic!("expected one connection.close, got {other:?}"),
        }
        feed(&mut c, 0, Method::ConnectionCloseOk(ConnectionCloseOk {}));
        assert!(c.is_closed());
    }

    #[test]
    fn consumers_per_channel_are_limited_with_a_530_connection_error() {
        let mut c = open(Settings { consumer_max_per_channel: 2, ..Settings::default() });
        let declare = crate::codec::QueueDeclare { queue: ShortString::from("q"), ..Default::default() };
        feed(&mut c, 1, Method::QueueDeclare(declare));
        sent(&mut c);
        let consume = |tag: &str| {
            Method::BasicConsume(BasicConsume {
                queue: ShortString::from("q"),
                consumer_tag: ShortString::from(tag),
                ..BasicConsume::default()
            })
        };
        for tag in ["a", "b"] {
            feed(&mut c, 1, consume(tag));
            assert!(matches!(sent(&mut c).as_slice(), [(1, Method::BasicConsumeOk(_))]), "{tag}");
        }
        // Another channel has its own count.
        feed(&mut c, 2, Method::ChannelOpen(ChannelOpen::default()));
        feed(&mut c, 2, consume("a"));
        assert!(matches!(sent(&mut c).as_slice(), [(2, Method::ChannelOpenOk(_)), (2, Method::BasicConsumeOk(_))]));
        feed(&mut c, 1, consume("c"));
        match sent(&mut c).as_slice() {
            [(0, Method::ConnectionClose(close))] => {
                assert_eq!(close.reply_code, reply_code::NOT_ALLOWED);
                assert_eq!(
                    close.reply_text.to_string_lossy(),
                    "NOT_ALLOWED - reached maximum (2) of consumers per channel"
                );
                assert_eq!((close.class_id, close.method_id), (60, 20));
            }
            other => panic!("expected connection.close, got {other:?}"),
        }
        assert!(c.is_closing());
    }

    /// A confirm whose commit resolves after its channel was closed and the number opened
    /// again is not sent on the new channel (its delivery tags are the new channel's).
    #[test]
    fn a_confirm_for_a_closed_channel_does_not_reach_its_reopened_number() {
        let mut c = open(Settings::default());
        let (resolve, commit) = ferry_core::store::Commit::pending();
        let owner = c.channels[&1].owner;
        c.pending.push(PendingConfirm { channel: 1, owner, seq: 1, nack: false }, commit);
        let (resolve_new, commit_new) = ferry_core::store::Commit::pending();
        feed(&mut c, 1, Method::ChannelClose(ChannelClose { reply_code: 200, ..ChannelClose::default() }));
        feed(&mut c, 1, Method::ChannelOpen(ChannelOpen::default()));
        assert!(matches!(sent(&mut c).as_slice(), [(1, Method::ChannelCloseOk(_)), (1, Method::ChannelOpenOk(_))]));
        let owner = c.channels[&1].owner;
        c.pending.push(PendingConfirm { channel: 1, owner, seq: 1, nack: false }, commit_new);
        resolve.send(Ok(())).unwrap();
        resolve_new.send(Ok(())).unwrap();
        c.take_ready_confirms(T0);
        // One ack: the new channel's publish 1, not the old one's.
        assert!(matches!(sent(&mut c).as_slice(), [(1, Method::BasicAck(a))] if a.delivery_tag == 1));
    }

    #[test]
    fn channel_max_counts_open_channels_whatever_their_numbers() {
        let mut c = open(Settings { channel_max: 3, ..Settings::default() });
        // Channel 1 is open; numbers far above channel_max are fine while the count allows.
        for ch in [u16::MAX, 3000] {
            feed(&mut c, ch, Method::ChannelOpen(ChannelOpen::default()));
            assert!(matches!(sent(&mut c).as_slice(), [(n, Method::ChannelOpenOk(_))] if *n == ch), "{ch}");
        }
        // A closed channel no longer counts.
        let close = ChannelClose { reply_code: 200, ..ChannelClose::default() };
        feed(&mut c, 3000, Method::ChannelClose(close));
        feed(&mut c, 2, Method::ChannelOpen(ChannelOpen::default()));
        assert!(matches!(sent(&mut c).as_slice(), [(3000, Method::ChannelCloseOk(_)), (2, Method::ChannelOpenOk(_))]));
        feed(&mut c, 4, Method::ChannelOpen(ChannelOpen::default()));
        match sent(&mut c).as_slice() {
            [(0, Method::ConnectionClose(close))] => {
                assert_eq!(close.reply_code, reply_code::NOT_ALLOWED);
                assert_eq!(
                    close.reply_text.to_string_lossy(),
                    "NOT_ALLOWED - number of channels opened (3) has reached the negotiated channel_max (3)"
                );
                assert_eq!((close.class_id, close.method_id), (0, 0));
            }
            other => panic!("expected connection.close, got {other:?}"),
        }
        assert!(c.is_closing());
    }

    #[test]
    fn publishes_are_counted_when_their_content_is_complete() {
        let mut c = open(Settings::default());
        let publish =
            Method::BasicPublish(BasicPublish { routing_key: ShortString::from("nowhere"), ..Default::default() });
        for body in [&b""[..], b"0123456789"] {
            feed(&mut c, 1, publish.clone());
            assert_eq!(c.take_publishes(), 0, "no content yet");
            let header = ContentHeader::basic(body.len() as u64, Default::default());
            for f in frames(|out| {
                encode_header_frame(1, &header, out).expect("encode");
                encode_body_frames(out, 1, body, 4);
            }) {
                c.handle(f, T0);
            }
            assert_eq!(c.take_publishes(), 1);
        }
        assert_eq!(c.take_publishes(), 0);
        assert_eq!(c.messages_in, 2, "the registry's running total is not taken by the rate limit");
        assert!(c.is_open());
    }
}

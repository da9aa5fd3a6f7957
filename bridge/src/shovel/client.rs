//! The AMQP 0-9-1 client side of a shovel, without I/O: a state machine fed frames (decoded by
//! ferry-amqp's [`FrameDecoder`]) that writes the frames to send into a buffer and reports
//! [`Event`]s. The link task does the socket, the clock and the broker.
//!
//! Handshake (spec §2.2.4): protocol header → connection.start → start-ok (PLAIN) →
//! connection.tune → tune-ok (channel max, frame max and heartbeat negotiated down) →
//! connection.open (the vhost) → open-ok → channel.open on channel 1 → open-ok:
//! [`Event::Ready`]. Then the task sends its set-up methods ([`Client::call`]: confirm.select,
//! basic.qos, queue.declare/bind, basic.consume), each answered by an [`Event::Reply`];
//! deliveries are assembled from their method, header and body frames into
//! [`Event::Delivery`]; publisher confirms arrive as [`Event::Confirm`].
//!
//! A connection.close or channel.close from the remote is answered (close-ok) and becomes a
//! [`ClientError::Closed`] naming the reply code and text: the link ends and backs off.

use bytes::{Bytes, BytesMut};
use ferry_amqp::codec::{
    encode_body_frames, encode_field_table, encode_header_frame, encode_heartbeat, encode_method_frame, BasicAck,
    BasicDeliver, BasicPublish, ChannelClose, ChannelCloseOk, ChannelOpen, ConnectionClose, ConnectionCloseOk,
    ConnectionOpen, ConnectionStartOk, ConnectionTuneOk, ContentHeader, EncodeError, Frame, FrameDecoder, Method,
    PROTOCOL_HEADER,
};
use ferry_core::message::{FieldTable, FieldValue, Properties, ShortString};

use super::config::AuthMechanism;

/// The one channel a shovel uses.
pub const CHANNEL: u16 = 1;

/// The largest frame the shovel proposes (RabbitMQ's default).
pub const FRAME_MAX: u32 = 131_072;

/// Bodies above this are refused from a remote (the core's own message size limit is lower).
const MAX_BODY: u64 = 512 * 1024 * 1024;

/// Who logs in where.
#[derive(Clone)]
pub struct ClientParams {
    pub user: String,
    pub password: Vec<u8>,
    pub vhost: String,
    /// Seconds asked for (0: none).
    pub heartbeat: u16,
    /// Shown in RabbitMQ's management as the connection's name.
    pub connection_name: String,
    /// SASL mechanisms in order of preference: the first the remote offers is used.
    pub mechanisms: Vec<AuthMechanism>,
    /// An upper bound on the frame size (the URI's `frame_max`).
    pub frame_max: Option<u32>,
}

impl std::fmt::Debug for ClientParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientParams")
            .field("user", &self.user)
            .field("vhost", &self.vhost)
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

/// A message the remote delivered to the shovel's consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: Properties,
    pub body: Bytes,
}

/// What a frame meant.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The handshake is done and channel 1 is open.
    Ready,
    /// A synchronous reply on channel 1 (to a [`Client::call`]).
    Reply(Method),
    /// A whole delivery (boxed: the other events are small).
    Delivery(Box<Incoming>),
    /// A publisher confirm: `ack` false is a basic.nack.
    Confirm { tag: u64, multiple: bool, ack: bool },
    /// connection.blocked (`Some(reason)`) / unblocked (`None`): the remote holds publishes.
    Blocked(Option<String>),
    /// The remote cancelled the consumer (its queue was deleted).
    Cancelled,
    /// The remote answered our connection.close.
    Closed,
    /// A [`Client::probe`] found nothing (the remote closed the channel with 404): the channel
    /// is being opened again, and [`Event::Ready`] follows once it is.
    NotFound,
}

/// Why the connection cannot go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    #[error("malformed frame from the remote: {0}")]
    Frame(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// connection.close or channel.close from the remote.
    #[error("the remote closed the {what}: {code} {text}")]
    Closed { what: &'static str, code: u16, text: String },
    #[error("cannot encode: {0}")]
    Encode(String),
}

impl From<EncodeError> for ClientError {
    fn from(e: EncodeError) -> ClientError {
        ClientError::Encode(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Protocol header sent, connection.start awaited.
    Start,
    /// channel.open sent again after a probe's 404 ([`Client::probe`]).
    Reopen,
    /// start-ok sent, connection.tune awaited.
    Tune,
    /// connection.open sent.
    Open,
    /// channel.open sent.
    Channel,
    Ready,
    /// connection.close sent, close-ok awaited.
    Closing,
}

/// A delivery being assembled from its frames.
#[derive(Debug)]
struct Assembling {
    deliver: Option<BasicDeliver>,
    header: Option<ContentHeader>,
    body: BytesMut,
}

/// The client state machine.
#[derive(Debug)]
pub struct Client {
    params: ClientParams,
    phase: Phase,
    frame_max: u32,
    heartbeat: u16,
    content: Option<Assembling>,
    /// The sequence number the next publish gets once confirms are on (0: off).
    next_publish: u64,
    server_properties: FieldTable,
    /// A [`Client::probe`] is waiting for its reply: a 404 channel.close answers it.
    probing: bool,
}

fn close_error(what: &'static str, code: u16, text: &ShortString) -> ClientError {
    ClientError::Closed { what, code, text: text.to_string_lossy() }
}

impl Client {
    pub fn new(params: ClientParams) -> Client {
        Client {
            params,
            phase: Phase::Start,
            frame_max: ferry_amqp::codec::FRAME_MIN_SIZE,
            heartbeat: 0,
            content: None,
            next_publish: 0,
            server_properties: FieldTable::new(),
            probing: false,
        }
    }

    /// Writes the protocol header: the first bytes of the connection.
    pub fn start(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(&PROTOCOL_HEADER);
    }

    /// The decoder for what the remote sends, at the negotiated frame max.
    pub fn decoder(&self) -> FrameDecoder {
        FrameDecoder::new(self.frame_max)
    }

    /// The negotiated heartbeat in seconds (0: none).
    pub fn heartbeat(&self) -> u16 {
        self.heartbeat
    }

    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// What the remote says it is (`product`, `version`), for the log.
    pub fn server_product(&self) -> String {
        let get = |k: &str| self.server_properties.get(k).and_then(|v| v.as_str()).unwrap_or("?").to_string();
        format!("{} {}", get("product"), get("version"))
    }

    /// A text property of the remote's connection.start (`cluster_name`, `product`...).
    pub fn server_property(&self, key: &str) -> Option<String> {
        self.server_properties.get(key).and_then(|v| v.as_str()).map(str::to_string)
    }

    /// Whether the handshake got as far as the login (start-ok sent, tune not yet seen): a
    /// connection closed there is almost always a refused login.
    pub fn in_login(&self) -> bool {
        self.phase == Phase::Tune
    }

    fn send(&self, channel: u16, method: Method, out: &mut BytesMut) -> Result<(), ClientError> {
        encode_method_frame(channel, &method, out)?;
        Ok(())
    }

    /// Sends a method on channel 1 (a set-up call; its reply comes as [`Event::Reply`]).
    pub fn call(&mut self, method: Method, out: &mut BytesMut) -> Result<(), ClientError> {
        if matches!(method, Method::ConfirmSelect(_)) {
            self.next_publish = 1;
        }
        self.send(CHANNEL, method, out)
    }

    /// Sends a method that may be answered by a 404 channel.close (a passive `queue.declare`):
    /// its reply comes as [`Event::Reply`] when the object exists; when it does not, the client
    /// answers the close, opens the channel again and reports [`Event::NotFound`], then
    /// [`Event::Ready`]. Any other close still ends the connection. Only before confirms or a
    /// consumer are set up (they would be lost with the channel).
    pub fn probe(&mut self, method: Method, out: &mut BytesMut) -> Result<(), ClientError> {
        self.probing = true;
        self.send(CHANNEL, method, out)
    }

    /// Publishes a message on channel 1: method, header and body frames within the frame max.
    /// Returns its confirm sequence number (0 when confirms are off).
    pub fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        properties: Properties,
        body: &[u8],
        out: &mut BytesMut,
    ) -> Result<u64, ClientError> {
        if exchange.len() > ShortString::MAX_LEN || routing_key.len() > ShortString::MAX_LEN {
            return Err(ClientError::Encode("exchange or routing key over 255 bytes".into()));
        }
        let start = out.len();
        let method = Method::BasicPublish(BasicPublish {
            exchange: ShortString::from(exchange),
            routing_key: ShortString::from(routing_key),
            ..BasicPublish::default()
        });
        let header = ContentHeader::basic(body.len() as u64, properties);
        let written =
            encode_method_frame(CHANNEL, &method, out).and_then(|()| encode_header_frame(CHANNEL, &header, out));
        if let Err(e) = written {
            out.truncate(start);
            return Err(e.into());
        }
        encode_body_frames(out, CHANNEL, body, self.frame_max);
        let seq = self.next_publish;
        if seq > 0 {
            self.next_publish += 1;
        }
        Ok(seq)
    }

    /// Acknowledges a delivery (or all up to it).
    pub fn ack(&mut self, delivery_tag: u64, multiple: bool, out: &mut BytesMut) -> Result<(), ClientError> {
        self.send(CHANNEL, Method::BasicAck(BasicAck { delivery_tag, multiple }), out)
    }

    pub fn heartbeat_frame(&self, out: &mut BytesMut) {
        encode_heartbeat(out);
    }

    /// Starts a clean close (connection.close 200); [`Event::Closed`] follows.
    pub fn close(&mut self, out: &mut BytesMut) -> Result<(), ClientError> {
        self.phase = Phase::Closing;
        let close = ConnectionClose {
            reply_code: 200,
            reply_text: ShortString::from("shovel stopping"),
            class_id: 0,
            method_id: 0,
        };
        self.send(0, Method::ConnectionClose(close), out)
    }

    /// Takes one frame from the remote.
    pub fn handle(&mut self, frame: Frame, out: &mut BytesMut, events: &mut Vec<Event>) -> Result<(), ClientError> {
        match frame {
            Frame::Heartbeat => Ok(()),
            Frame::Method { channel, payload } => {
                let method = Method::decode_payload(payload).map_err(|e| ClientError::Frame(e.to_string()))?;
                if channel == 0 {
                    self.connection_method(method, out, events)
                } else if channel == CHANNEL {
                    self.channel_method(method, out, events)
                } else {
                    Err(ClientError::Protocol(format!("{} on channel {channel}, which is not open", method.name())))
                }
            }
            Frame::Header { channel, payload } => {
                let Some(a) = self.content.as_mut().filter(|a| a.header.is_none() && channel == CHANNEL) else {
                    return Err(ClientError::Protocol("content header without a method".into()));
                };
                let header = ContentHeader::decode(payload).map_err(|e| ClientError::Frame(e.to_string()))?;
                if header.body_size > MAX_BODY {
                    return Err(ClientError::Protocol(format!("a {} byte body is too large", header.body_size)));
                }
                a.body.reserve(header.body_size as usize);
                a.header = Some(header);
                self.finish_content(events);
                Ok(())
            }
            Frame::Body { channel, payload } => {
                let Some(a) = self.content.as_mut().filter(|a| a.header.is_some() && channel == CHANNEL) else {
                    return Err(ClientError::Protocol("body frame without a content header".into()));
                };
                a.body.extend_from_slice(&payload);
                let size = a.header.as_ref().map_or(0, |h| h.body_size);
                if a.body.len() as u64 > size {
                    return Err(ClientError::Protocol(format!("body longer than its header's {size} bytes")));
                }
                self.finish_content(events);
                Ok(())
            }
        }
    }

    /// Emits the assembled delivery once its body is complete.
    fn finish_content(&mut self, events: &mut Vec<Event>) {
        let complete = self
            .content
            .as_ref()
            .and_then(|a| a.header.as_ref().map(|h| a.body.len() as u64 == h.body_size))
            .unwrap_or(false);
        if !complete {
            return;
        }
        let a = self.content.take().expect("checked");
        let header = a.header.expect("checked");
        // A basic.return's content (no deliver) is dropped: the shovel does not publish
        // mandatory messages, so none is expected.
        if let Some(d) = a.deliver {
            events.push(Event::Delivery(Box::new(Incoming {
                delivery_tag: d.delivery_tag,
                redelivered: d.redelivered,
                exchange: d.exchange,
                routing_key: d.routing_key,
                properties: header.properties,
                body: a.body.freeze(),
            })));
        }
    }

    fn connection_method(
        &mut self,
        method: Method,
        out: &mut BytesMut,
        events: &mut Vec<Event>,
    ) -> Result<(), ClientError> {
        match (self.phase, method) {
            (_, Method::ConnectionClose(c)) => {
                let _ = self.send(0, Method::ConnectionCloseOk(ConnectionCloseOk {}), out);
                Err(close_error("connection", c.reply_code, &c.reply_text))
            }
            (Phase::Closing, Method::ConnectionCloseOk(_)) => {
                events.push(Event::Closed);
                Ok(())
            }
            (Phase::Closing, _) => Ok(()),
            (Phase::Start, Method::ConnectionStart(s)) => {
                if (s.version_major, s.version_minor) != (0, 9) {
                    return Err(ClientError::Protocol(format!(
                        "the remote speaks AMQP {}-{}, not 0-9-1",
                        s.version_major, s.version_minor
                    )));
                }
                let offered = String::from_utf8_lossy(&s.mechanisms).to_string();
                let Some(mechanism) =
                    self.params.mechanisms.iter().copied().find(|m| offered.split(' ').any(|o| o == m.as_str()))
                else {
                    let ours: Vec<&str> = self.params.mechanisms.iter().map(|m| m.as_str()).collect();
                    return Err(ClientError::Protocol(format!(
                        "the remote does not offer {} login (offers {offered})",
                        ours.join(" or ")
                    )));
                };
                self.server_properties = s.server_properties;
                let response = match mechanism {
                    AuthMechanism::Plain => {
                        let mut r = Vec::with_capacity(self.params.user.len() + self.params.password.len() + 2);
                        r.push(0);
                        r.extend_from_slice(self.params.user.as_bytes());
                        r.push(0);
                        r.extend_from_slice(&self.params.password);
                        r
                    }
                    AuthMechanism::AmqPlain => {
                        // A field table without its 32-bit size prefix.
                        let mut t = FieldTable::new();
                        t.insert("LOGIN", FieldValue::string(&self.params.user));
                        t.insert("PASSWORD", FieldValue::LongString(Bytes::copy_from_slice(&self.params.password)));
                        let mut framed = BytesMut::new();
                        encode_field_table(&t, &mut framed)?;
                        framed.split_off(4).to_vec()
                    }
                    // The identity is the client certificate the TLS handshake presented.
                    AuthMechanism::External => Vec::new(),
                };
                let start_ok = ConnectionStartOk {
                    client_properties: self.client_properties(),
                    mechanism: ShortString::from(mechanism.as_str()),
                    response: Bytes::from(response),
                    locale: ShortString::from("en_US"),
                };
                self.send(0, Method::ConnectionStartOk(start_ok), out)?;
                self.phase = Phase::Tune;
                Ok(())
            }
            (Phase::Tune, Method::ConnectionTune(t)) => {
                // 0 is "no limit" for the frame max and "none" for the heartbeat.
                let ours = self.params.frame_max.map_or(FRAME_MAX, |f| f.min(FRAME_MAX));
                let frame_max = match t.frame_max {
                    0 => ours,
                    n => n.min(ours),
                };
                if frame_max < ferry_amqp::codec::FRAME_MIN_SIZE {
                    return Err(ClientError::Protocol(format!("the remote's frame max {frame_max} is below 4096")));
                }
                let heartbeat = match (self.params.heartbeat, t.heartbeat) {
                    (0, _) => 0,
                    (ours, 0) => ours,
                    (ours, theirs) => ours.min(theirs),
                };
                let channel_max = match t.channel_max {
                    0 => 1,
                    n => n.min(1),
                };
                self.frame_max = frame_max;
                self.heartbeat = heartbeat;
                self.send(0, Method::ConnectionTuneOk(ConnectionTuneOk { channel_max, frame_max, heartbeat }), out)?;
                let open = ConnectionOpen {
                    virtual_host: ShortString::from(self.params.vhost.as_str()),
                    ..ConnectionOpen::default()
                };
                self.send(0, Method::ConnectionOpen(open), out)?;
                self.phase = Phase::Open;
                Ok(())
            }
            (Phase::Open, Method::ConnectionOpenOk(_)) => {
                self.send(CHANNEL, Method::ChannelOpen(ChannelOpen::default()), out)?;
                self.phase = Phase::Channel;
                Ok(())
            }
            (_, Method::ConnectionBlocked(b)) => {
                events.push(Event::Blocked(Some(b.reason.to_string_lossy())));
                Ok(())
            }
            (_, Method::ConnectionUnblocked(_)) => {
                events.push(Event::Blocked(None));
                Ok(())
            }
            (Phase::Tune, Method::ConnectionSecure(_)) => {
                Err(ClientError::Protocol("the remote asked for a SASL challenge; PLAIN and EXTERNAL have none".into()))
            }
            (phase, m) => Err(ClientError::Protocol(format!("unexpected {} (handshake at {phase:?})", m.name()))),
        }
    }

    fn channel_method(
        &mut self,
        method: Method,
        out: &mut BytesMut,
        events: &mut Vec<Event>,
    ) -> Result<(), ClientError> {
        if self.content.is_some() && !matches!(method, Method::ChannelClose(_)) {
            return Err(ClientError::Protocol(format!("{} in the middle of a message's content", method.name())));
        }
        match (self.phase, method) {
            (Phase::Ready, Method::ChannelClose(c)) if self.probing && c.reply_code == 404 => {
                self.probing = false;
                self.content = None;
                self.send(CHANNEL, Method::ChannelCloseOk(ChannelCloseOk {}), out)?;
                self.send(CHANNEL, Method::ChannelOpen(ChannelOpen::default()), out)?;
                self.phase = Phase::Reopen;
                events.push(Event::NotFound);
                Ok(())
            }
            (_, Method::ChannelClose(c)) => {
                let _ = self.send(CHANNEL, Method::ChannelCloseOk(ChannelCloseOk {}), out);
                Err(close_error("channel", c.reply_code, &c.reply_text))
            }
            (Phase::Closing, _) => Ok(()),
            (Phase::Channel | Phase::Reopen, Method::ChannelOpenOk(_)) => {
                self.phase = Phase::Ready;
                events.push(Event::Ready);
                Ok(())
            }
            (Phase::Ready, Method::BasicDeliver(d)) => {
                self.content = Some(Assembling { deliver: Some(d), header: None, body: BytesMut::new() });
                Ok(())
            }
            (Phase::Ready, Method::BasicReturn(_)) => {
                self.content = Some(Assembling { deliver: None, header: None, body: BytesMut::new() });
                Ok(())
            }
            (Phase::Ready, Method::BasicAck(a)) if self.next_publish > 0 => {
                events.push(Event::Confirm { tag: a.delivery_tag, multiple: a.multiple, ack: true });
                Ok(())
            }
            (Phase::Ready, Method::BasicNack(n)) if self.next_publish > 0 => {
                events.push(Event::Confirm { tag: n.delivery_tag, multiple: n.multiple, ack: false });
                Ok(())
            }
            (Phase::Ready, Method::BasicCancel(_)) => {
                events.push(Event::Cancelled);
                Ok(())
            }
            (Phase::Ready, Method::ChannelFlow(f)) => {
                let ok = ferry_amqp::codec::ChannelFlowOk { active: f.active };
                self.send(CHANNEL, Method::ChannelFlowOk(ok), out)
            }
            (
                Phase::Ready,
                m @ (Method::ConfirmSelectOk(_)
                | Method::BasicQosOk(_)
                | Method::QueueDeclareOk(_)
                | Method::QueueBindOk(_)
                | Method::BasicConsumeOk(_)
                | Method::ExchangeDeclareOk(_)),
            ) => {
                self.probing = false;
                events.push(Event::Reply(m));
                Ok(())
            }
            (phase, m) => Err(ClientError::Protocol(format!("unexpected {} on the channel ({phase:?})", m.name()))),
        }
    }

    fn client_properties(&self) -> FieldTable {
        let mut capabilities = FieldTable::new();
        for c in [
            "publisher_confirms",
            "authentication_failure_close",
            "consumer_cancel_notify",
            "connection.blocked",
            "basic.nack",
        ] {
            capabilities.insert(c, FieldValue::Bool(true));
        }
        let mut t = FieldTable::new();
        t.insert("product", FieldValue::string("Ferry shovel"));
        t.insert("version", FieldValue::string(env!("CARGO_PKG_VERSION")));
        t.insert("platform", FieldValue::string("Rust"));
        t.insert("connection_name", FieldValue::string(&self.params.connection_name));
        t.insert("capabilities", FieldValue::Table(capabilities));
        t
    }
}

/// channel.close as a method, for tests and the link's own close.
pub fn channel_close(code: u16, text: &str) -> Method {
    Method::ChannelClose(ChannelClose {
        reply_code: code,
        reply_text: ShortString::from(text),
        class_id: 0,
        method_id: 0,
    })
}

#[cfg(test)]
mod tests {
    use ferry_amqp::codec::{
        BasicNack, ChannelOpenOk, ConfirmSelect, ConfirmSelectOk, ConnectionOpenOk, ConnectionStart, ConnectionTune,
    };

    use super::*;

    fn params() -> ClientParams {
        ClientParams {
            user: "ferry".into(),
            password: b"s3cret".to_vec(),
            vhost: "/prod".into(),
            heartbeat: 30,
            connection_name: "shovel t".into(),
            mechanisms: vec![AuthMechanism::Plain],
            frame_max: None,
        }
    }

    fn frame(channel: u16, m: Method) -> Frame {
        let mut b = BytesMut::new();
        encode_method_frame(channel, &m, &mut b).unwrap();
        FrameDecoder::new(FRAME_MAX).decode(&mut b).unwrap().unwrap()
    }

    /// The methods written to `out` (consumed).
    fn sent(out: &mut BytesMut) -> Vec<(u16, Method)> {
        let mut v = Vec::new();
        while let Some(f) = FrameDecoder::new(FRAME_MAX).decode(out).unwrap() {
            if let Frame::Method { channel, payload } = f {
                v.push((channel, Method::decode_payload(payload).unwrap()));
            }
        }
        v
    }

    fn handshake(c: &mut Client, tune: ConnectionTune) -> Vec<Event> {
        let mut out = BytesMut::new();
        let mut ev = Vec::new();
        c.start(&mut out);
        assert_eq!(&out.split_to(8)[..], &PROTOCOL_HEADER[..]);
        c.handle(frame(0, Method::ConnectionStart(ConnectionStart::default())), &mut out, &mut ev).unwrap();
        c.handle(frame(0, Method::ConnectionTune(tune)), &mut out, &mut ev).unwrap();
        c.handle(frame(0, Method::ConnectionOpenOk(ConnectionOpenOk::default())), &mut out, &mut ev).unwrap();
        c.handle(frame(CHANNEL, Method::ChannelOpenOk(ChannelOpenOk::default())), &mut out, &mut ev).unwrap();
        ev
    }

    #[test]
    fn the_handshake_logs_in_with_plain_and_negotiates_down() {
        let mut c = Client::new(params());
        let mut out = BytesMut::new();
        let mut ev = Vec::new();
        c.start(&mut out);
        out.clear();
        c.handle(frame(0, Method::ConnectionStart(ConnectionStart::default())), &mut out, &mut ev).unwrap();
        let m = sent(&mut out);
        let Method::ConnectionStartOk(ok) = &m[0].1 else { panic!("{m:?}") };
        assert_eq!((ok.mechanism.as_str(), &ok.response[..]), (Some("PLAIN"), &b"\0ferry\0s3cret"[..]));
        assert!(c.in_login());
        let tune = ConnectionTune { channel_max: 2047, frame_max: 1_048_576, heartbeat: 60 };
        c.handle(frame(0, Method::ConnectionTune(tune)), &mut out, &mut ev).unwrap();
        let m = sent(&mut out);
        assert_eq!(
            m[0].1,
            Method::ConnectionTuneOk(ConnectionTuneOk { channel_max: 1, frame_max: FRAME_MAX, heartbeat: 30 })
        );
        let Method::ConnectionOpen(open) = &m[1].1 else { panic!("{m:?}") };
        assert_eq!(open.virtual_host.as_str(), Some("/prod"));
        assert_eq!((c.heartbeat(), c.decoder().max_frame_size), (30, FRAME_MAX));
        c.handle(frame(0, Method::ConnectionOpenOk(ConnectionOpenOk::default())), &mut out, &mut ev).unwrap();
        assert_eq!(sent(&mut out), vec![(CHANNEL, Method::ChannelOpen(ChannelOpen::default()))]);
        assert!(ev.is_empty() && !c.is_ready());
        c.handle(frame(CHANNEL, Method::ChannelOpenOk(ChannelOpenOk::default())), &mut out, &mut ev).unwrap();
        assert_eq!(ev, vec![Event::Ready]);
        assert!(c.is_ready());
    }

    #[test]
    fn a_heartbeat_the_remote_turns_off_stays_ours_and_zero_frame_max_is_ours() {
        let mut c = Client::new(params());
        handshake(&mut c, ConnectionTune { channel_max: 0, frame_max: 0, heartbeat: 0 });
        assert_eq!((c.heartbeat(), c.decoder().max_frame_size), (30, FRAME_MAX));
        let mut c = Client::new(ClientParams { heartbeat: 0, ..params() });
        handshake(&mut c, ConnectionTune { channel_max: 0, frame_max: 4096, heartbeat: 10 });
        assert_eq!((c.heartbeat(), c.decoder().max_frame_size), (0, 4096));
    }

    #[test]
    fn a_refused_login_is_an_error_naming_the_reply() {
        let mut c = Client::new(params());
        let mut out = BytesMut::new();
        let mut ev = Vec::new();
        c.handle(frame(0, Method::ConnectionStart(ConnectionStart::default())), &mut out, &mut ev).unwrap();
        out.clear();
        let close = ConnectionClose {
            reply_code: 403,
            reply_text: ShortString::from("ACCESS_REFUSED - Login was refused"),
            class_id: 0,
            method_id: 0,
        };
        let e = c.handle(frame(0, Method::ConnectionClose(close)), &mut out, &mut ev).unwrap_err();
        assert_eq!(e.to_string(), "the remote closed the connection: 403 ACCESS_REFUSED - Login was refused");
        assert_eq!(sent(&mut out), vec![(0, Method::ConnectionCloseOk(ConnectionCloseOk {}))]);
        assert!(!e.to_string().contains("s3cret"));
    }

    #[test]
    fn no_plain_no_login() {
        let mut c = Client::new(params());
        let start =
            ConnectionStart { mechanisms: Bytes::from_static(b"AMQPLAIN EXTERNAL"), ..ConnectionStart::default() };
        let e = c.handle(frame(0, Method::ConnectionStart(start)), &mut BytesMut::new(), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("does not offer PLAIN login (offers AMQPLAIN EXTERNAL)"), "{e}");
    }

    #[test]
    fn external_logs_in_with_an_empty_response_and_falls_back_in_order() {
        let start = |offers: &'static [u8]| {
            // ConnectionStart's default offers PLAIN only.
            frame(
                0,
                Method::ConnectionStart(ConnectionStart {
                    mechanisms: Bytes::from_static(offers),
                    ..ConnectionStart::default()
                }),
            )
        };
        let chosen = |mechanisms: Vec<AuthMechanism>, offers: &'static [u8]| {
            let mut c = Client::new(ClientParams { mechanisms, ..params() });
            let mut out = BytesMut::new();
            c.handle(start(offers), &mut out, &mut Vec::new()).map(|_| {
                let m = sent(&mut out);
                let Method::ConnectionStartOk(ok) = &m[0].1 else { panic!("{m:?}") };
                (ok.mechanism.as_str().unwrap_or_default().to_string(), ok.response.clone())
            })
        };
        use AuthMechanism::{External, Plain};
        let (m, r) = chosen(vec![External], b"PLAIN AMQPLAIN EXTERNAL").unwrap();
        assert_eq!((m.as_str(), &r[..]), ("EXTERNAL", &b""[..]));
        let (m, r) = chosen(vec![External, Plain], b"PLAIN AMQPLAIN").unwrap();
        assert_eq!((m.as_str(), &r[..]), ("PLAIN", &b"\0ferry\0s3cret"[..]), "the next one the remote offers");
        let e = chosen(vec![External], b"PLAIN AMQPLAIN").unwrap_err();
        assert!(e.to_string().contains("does not offer EXTERNAL login"), "{e}");
        // AMQPLAIN: LOGIN and PASSWORD in a field table without its size.
        let (m, r) = chosen(vec![AuthMechanism::AmqPlain], b"AMQPLAIN").unwrap();
        assert_eq!(m, "AMQPLAIN");
        let t = ferry_amqp::codec::decode_field_table(r.clone()).unwrap();
        assert_eq!(t.get("LOGIN").and_then(|v| v.as_str()), Some("ferry"));
        assert_eq!(t.get("PASSWORD"), Some(&FieldValue::LongString(Bytes::from_static(b"s3cret"))));
    }

    #[test]
    fn the_uri_frame_max_bounds_the_agreed_one() {
        let mut c = Client::new(ClientParams { frame_max: Some(8192), ..params() });
        handshake(&mut c, ConnectionTune { channel_max: 0, frame_max: 131_072, heartbeat: 0 });
        assert_eq!(c.decoder().max_frame_size, 8192);
    }

    #[test]
    fn a_delivery_is_assembled_from_its_frames() {
        let mut c = Client::new(params());
        handshake(&mut c, ConnectionTune { channel_max: 0, frame_max: 4096, heartbeat: 0 });
        let mut out = BytesMut::new();
        let mut ev = Vec::new();
        let deliver = BasicDeliver {
            consumer_tag: ShortString::from("t"),
            delivery_tag: 7,
            redelivered: true,
            exchange: ShortString::from("x"),
            routing_key: ShortString::from("k"),
        };
        c.handle(frame(CHANNEL, Method::BasicDeliver(deliver)), &mut out, &mut ev).unwrap();
        let body = vec![b'z'; 5000];
        let props = Properties::default()
            .with_more(ferry_core::MoreProperties { message_id: Some(ShortString::from("m1")), ..Default::default() });
        let mut wire = BytesMut::new();
        encode_header_frame(CHANNEL, &ContentHeader::basic(body.len() as u64, props.clone()), &mut wire).unwrap();
        encode_body_frames(&mut wire, CHANNEL, &body, 4096);
        let decoder = c.decoder();
        while let Some(f) = decoder.decode(&mut wire).unwrap() {
            assert!(ev.is_empty(), "nothing before the last body frame");
            c.handle(f, &mut out, &mut ev).unwrap();
        }
        let [Event::Delivery(d)] = &ev[..] else { panic!("{ev:?}") };
        assert_eq!((d.delivery_tag, d.redelivered, d.body.len()), (7, true, 5000));
        assert_eq!((d.exchange.as_str(), d.routing_key.as_str()), (Some("x"), Some("k")));
        assert_eq!(d.properties, props);
        // A method in the middle of content is a protocol error.
        let mut c2 = Client::new(params());
        handshake(&mut c2, ConnectionTune { channel_max: 0, frame_max: 4096, heartbeat: 0 });
        c2.handle(frame(CHANNEL, Method::BasicDeliver(BasicDeliver::default())), &mut out, &mut ev).unwrap();
        let e = c2.handle(frame(CHANNEL, Method::BasicAck(BasicAck::default())), &mut out, &mut ev).unwrap_err();
        assert!(matches!(e, ClientError::Protocol(_)), "{e}");
    }

    #[test]
    fn publishes_are_numbered_once_confirms_are_on_and_confirms_reported() {
        let mut c = Client::new(params());
        handshake(&mut c, ConnectionTune { channel_max: 0, frame_max: 4096, heartbeat: 0 });
        let mut out = BytesMut::new();
        let mut ev = Vec::new();
        assert_eq!(c.publish("", "q", Properties::default(), b"a", &mut out).unwrap(), 0);
        c.call(Method::ConfirmSelect(ConfirmSelect::default()), &mut out).unwrap();
        c.handle(frame(CHANNEL, Method::ConfirmSelectOk(ConfirmSelectOk {})), &mut out, &mut ev).unwrap();
        assert_eq!(ev, vec![Event::Reply(Method::ConfirmSelectOk(ConfirmSelectOk {}))]);
        ev.clear();
        out.clear();
        let body = vec![1u8; 9000];
        assert_eq!(c.publish("amq.topic", "a.b", Properties::default(), &body, &mut out).unwrap(), 1);
        assert_eq!(c.publish("amq.topic", "a.b", Properties::default(), b"", &mut out).unwrap(), 2);
        // method + header + 3 body frames (4088 + 4088 + 824), then method + header.
        let decoder = c.decoder();
        let mut kinds = Vec::new();
        while let Some(f) = decoder.decode(&mut out).unwrap() {
            kinds.push(match f {
                Frame::Method { .. } => 'm',
                Frame::Header { .. } => 'h',
                Frame::Body { .. } => 'b',
                Frame::Heartbeat => 'H',
            });
        }
        assert_eq!(kinds.iter().collect::<String>(), "mhbbbmh");
        c.handle(frame(CHANNEL, Method::BasicAck(BasicAck { delivery_tag: 2, multiple: true })), &mut out, &mut ev)
            .unwrap();
        let nack = BasicNack { delivery_tag: 3, multiple: false, requeue: true };
        c.handle(frame(CHANNEL, Method::BasicNack(nack)), &mut out, &mut ev).unwrap();
        assert_eq!(
            ev,
            vec![
                Event::Confirm { tag: 2, multiple: true, ack: true },
                Event::Confirm { tag: 3, multiple: false, ack: false }
            ]
        );
    }

    #[test]
    fn a_channel_close_is_answered_and_ends_the_link() {
        let mut c = Client::new(params());
        handshake(&mut c, ConnectionTune { channel_max: 0, frame_max: 4096, heartbeat: 0 });
        let mut out = BytesMut::new();
        let e = c
            .handle(frame(CHANNEL, channel_close(404, "NOT_FOUND - no queue 'q'")), &mut out, &mut Vec::new())
            .unwrap_err();
        assert_eq!(e.to_string(), "the remote closed the channel: 404 NOT_FOUND - no queue 'q'");
        assert_eq!(sent(&mut out), vec![(CHANNEL, Method::ChannelCloseOk(ChannelCloseOk {}))]);
        let e =
            c.handle(frame(5, Method::ChannelOpenOk(ChannelOpenOk::default())), &mut out, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("channel 5"), "{e}");
    }

    #[test]
    fn a_clean_close_ends_with_close_ok() {
        let mut c = Client::new(params());
        handshake(&mut c, ConnectionTune { channel_max: 0, frame_max: 4096, heartbeat: 0 });
        let mut out = BytesMut::new();
        c.close(&mut out).unwrap();
        let m = sent(&mut out);
        assert!(matches!(&m[..], [(0, Method::ConnectionClose(c))] if c.reply_code == 200), "{m:?}");
        let mut ev = Vec::new();
        c.handle(frame(0, Method::ConnectionCloseOk(ConnectionCloseOk {})), &mut out, &mut ev).unwrap();
        assert_eq!(ev, vec![Event::Closed]);
    }

    #[test]
    fn a_probe_answered_with_404_reopens_the_channel_and_any_other_close_still_ends_the_link() {
        use ferry_amqp::codec::{QueueDeclare, QueueDeclareOk};
        let mut c = Client::new(params());
        handshake(&mut c, ConnectionTune { channel_max: 0, frame_max: 4096, heartbeat: 0 });
        let (mut out, mut ev) = (BytesMut::new(), Vec::new());
        let passive = || Method::QueueDeclare(QueueDeclare { queue: "q".into(), passive: true, ..Default::default() });
        // Found: an ordinary reply.
        c.probe(passive(), &mut out).unwrap();
        out.clear();
        let ok = Method::QueueDeclareOk(QueueDeclareOk { queue: "q".into(), message_count: 0, consumer_count: 0 });
        c.handle(frame(CHANNEL, ok.clone()), &mut out, &mut ev).unwrap();
        assert_eq!(ev, vec![Event::Reply(ok)]);
        // Not found: close-ok, the channel opened again, then ready.
        ev.clear();
        c.probe(passive(), &mut out).unwrap();
        out.clear();
        c.handle(frame(CHANNEL, channel_close(404, "NOT_FOUND - no queue 'q'")), &mut out, &mut ev).unwrap();
        assert_eq!(ev, vec![Event::NotFound]);
        assert_eq!(
            sent(&mut out),
            vec![
                (CHANNEL, Method::ChannelCloseOk(ChannelCloseOk {})),
                (CHANNEL, Method::ChannelOpen(ChannelOpen::default()))
            ]
        );
        assert!(!c.is_ready());
        c.handle(frame(CHANNEL, Method::ChannelOpenOk(ChannelOpenOk::default())), &mut out, &mut ev).unwrap();
        assert_eq!(ev, vec![Event::NotFound, Event::Ready]);
        assert!(c.is_ready());
        // A 404 that answers no probe, or a probe answered with 403, ends the link as before.
        let e = c.handle(frame(CHANNEL, channel_close(404, "NOT_FOUND")), &mut out, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");
        let mut c = Client::new(params());
        handshake(&mut c, ConnectionTune { channel_max: 0, frame_max: 4096, heartbeat: 0 });
        c.probe(passive(), &mut out).unwrap();
        let e = c.handle(frame(CHANNEL, channel_close(403, "ACCESS_REFUSED")), &mut out, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("403"), "{e}");
    }
}

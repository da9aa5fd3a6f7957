//! MQTT over WebSocket (MQTT 5.0 §6, MQTT 3.1.1 §6): the HTTP upgrade on a listener's path, and
//! [`WsStream`], which turns the WebSocket back into a byte stream so that the frontend gets an
//! ordinary `ClientStream` and never knows it came through WebSocket.
//!
//! The upgrade ([`Upgrade::accept`]) refuses a request for another path (404) and a client that
//! offers only subprotocols other than `mqtt` / `mqttv3.1` (400); a client that offers none is
//! accepted without the header, as mosquitto does, because browser tools often send none.
//!
//! After the upgrade, MQTT is a byte stream cut into binary messages at the sender's whim: one
//! packet may span several messages and one message may hold several packets. [`WsStream`] hands
//! out the payloads in order, answers pings (tungstenite queues the pong), reads a close as EOF,
//! and closes with 1002 "protocol error" on a text frame, which the MQTT spec forbids. Each
//! `poll_write` becomes one binary message; the frontends coalesce their output, so that is one
//! message per flush.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{Callback, ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::header::{
    HeaderMap, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, SEC_WEBSOCKET_PROTOCOL,
};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// The subprotocols Ferry answers to, in order of preference: `mqtt` is the name MQTT 3.1.1 and
/// 5.0 register (§6: the server MUST select it); `mqttv3.1` is what MQTT 3.1 clients offered.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Room in a WebSocket message beyond one packet of `max_frame_size`: a client may send a
/// packet of the maximum size and the small ones that follow it (acks, PINGREQ) in one message.
/// The frontend enforces the packet limit itself; this only bounds what tungstenite buffers.
const MESSAGE_HEADROOM: usize = 16 * 1024;

/// tungstenite reads in chunks of this size (its default, 128 KiB, is allocated up front for
/// every connection, which a broker holding many idle clients cannot afford).
const READ_BUFFER_SIZE: usize = 8 * 1024;

/// A listener's WebSocket settings: the path it upgrades on and tungstenite's limits.
#[derive(Debug, Clone)]
pub(crate) struct Upgrade {
    path: String,
    config: WebSocketConfig,
}

impl Upgrade {
    pub(crate) fn new(path: String, max_frame_size: u32) -> Upgrade {
        let max_message = usize::try_from(max_frame_size).unwrap_or(usize::MAX).saturating_add(MESSAGE_HEADROOM);
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_SIZE)
            // Write each message out as it is sent, as a TCP write would: the frontends coalesce
            // their output already, and an echo-style writer that never flushes still delivers.
            .write_buffer_size(0)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        Upgrade { path, config }
    }

    /// Reads the client's HTTP upgrade request and answers it. Not bounded in time: the caller
    /// puts the handshake timeout around it.
    pub(crate) async fn accept<S>(&self, io: S) -> Result<WsStream<S>, WsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let answer = Answer { path: &self.path };
        let ws = tokio_tungstenite::accept_hdr_async_with_config(io, answer, Some(self.config)).await?;
        Ok(WsStream::new(ws))
    }
}

/// The upgrade decision: the path, then the subprotocol.
#[derive(Debug, Clone, Copy)]
struct Answer<'a> {
    path: &'a str,
}

impl Callback for Answer<'_> {
    fn on_request(self, request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
        let path = self.path;
        if request.uri().path() != path {
            return Err(refusal(StatusCode::NOT_FOUND, format!("no WebSocket endpoint here; MQTT is on {path}\n")));
        }
        match choose_subprotocol(request.headers()) {
            Ok(None) => Ok(response),
            Ok(Some(chosen)) => {
                response.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(chosen));
                Ok(response)
            }
            Err(()) => Err(refusal(
                StatusCode::BAD_REQUEST,
                format!("unsupported WebSocket subprotocol; this endpoint speaks {}\n", SUBPROTOCOLS.join(", ")),
            )),
        }
    }
}

/// `Ok(None)` when the client offers no subprotocol, `Ok(Some(_))` with the one to answer, `Err`
/// when it offers only others (or a header that is not text).
fn choose_subprotocol(headers: &HeaderMap) -> Result<Option<&'static str>, ()> {
    let mut offered = Vec::new();
    for value in headers.get_all(SEC_WEBSOCKET_PROTOCOL) {
        let value = value.to_str().map_err(|_| ())?;
        offered.extend(value.split(',').map(str::trim).filter(|p| !p.is_empty()));
    }
    if offered.is_empty() {
        return Ok(None);
    }
    // Subprotocol names are compared exactly (RFC 6455 §4.1: the server echoes one of the
    // client's values).
    SUBPROTOCOLS.into_iter().find(|ours| offered.contains(ours)).map(Some).ok_or(())
}

/// An HTTP error answer with a short plain-text body; the connection closes after it.
fn refusal(status: StatusCode, body: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(None);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    *response.body_mut() = Some(body);
    response
}

/// A WebSocket read and written as the byte stream it carries.
#[derive(Debug)]
pub(crate) struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// What the reader has not taken yet of the current binary message: a view into the message
    /// tungstenite assembled, so bytes are copied once, into the reader's buffer.
    unread: Bytes,
    /// Set when a text frame arrived: the close frame is being sent, then reads fail.
    refusing: Refusing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusing {
    No,
    /// The close frame still has to be queued.
    Queue,
    /// The close frame is queued and being written.
    Flush,
}

const TEXT_FRAME: &str = "MQTT over WebSocket must use binary frames (MQTT 5.0 §6, 3.1.1 §6)";

impl<S> WsStream<S> {
    fn new(ws: WebSocketStream<S>) -> WsStream<S> {
        WsStream { ws, unread: Bytes::new(), refusing: Refusing::No }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Sends the close frame for a text frame (1002, protocol error), then fails the read.
    fn poll_refuse(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.refusing == Refusing::Queue {
            // A write that fails here fails for good; the connection is going anyway.
            if ready!(Pin::new(&mut self.ws).poll_ready(cx)).is_ok() {
                let close = CloseFrame { code: CloseCode::Protocol, reason: Utf8Bytes::from_static(TEXT_FRAME) };
                let _ = Pin::new(&mut self.ws).start_send(Message::Close(Some(close)));
            }
            self.refusing = Refusing::Flush;
        }
        let _ = ready!(Pin::new(&mut self.ws).poll_flush(cx));
        Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, TEXT_FRAME)))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.refusing != Refusing::No {
                return this.poll_refuse(cx);
            }
            if !this.unread.is_empty() || buf.remaining() == 0 {
                let n = this.unread.len().min(buf.remaining());
                buf.put_slice(&this.unread[..n]);
                this.unread.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                // The close handshake is done (or the peer went away after one): EOF.
                None => return Poll::Ready(Ok(())),
                // An empty message leaves `unread` empty: read on.
                Some(Ok(Message::Binary(payload))) => this.unread = payload,
                Some(Ok(Message::Text(_))) => this.refusing = Refusing::Queue,
                // tungstenite has queued the pong or the close reply and sends it on the next
                // read or write; after a close the next read ends the stream.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let ws = &mut self.get_mut().ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(io_error)?;
        // tungstenite takes the payload by value; this copy is the one a socket write makes too.
        Pin::new(ws).start_send(Message::Binary(Bytes::copy_from_slice(buf))).map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_flush(cx).map_err(io_error)
    }

    /// Sends a close frame (1000) and flushes it; the TCP connection closes when the stream is
    /// dropped.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_close(cx).map_err(io_error)
    }
}

fn io_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::Error::new(io::ErrorKind::BrokenPipe, e),
        WsError::Capacity(_) | WsError::Protocol(_) | WsError::Utf8(_) | WsError::AttackAttempt => {
            io::Error::new(io::ErrorKind::InvalidData, e)
        }
        e => io::Error::other(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::http;

    fn request(path: &str, protocols: &[&str]) -> Request {
        let mut builder = http::Request::builder().uri(path);
        for p in protocols {
            builder = builder.header(SEC_WEBSOCKET_PROTOCOL, *p);
        }
        builder.body(()).unwrap()
    }

    fn chosen(response: &Response) -> Option<&str> {
        response.headers().get(SEC_WEBSOCKET_PROTOCOL).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn mqtt_is_chosen_among_other_offers() {
        let r = Answer { path: "/mqtt" }.on_request(&request("/mqtt", &["wamp, mqtt"]), Response::new(())).unwrap();
        assert_eq!(chosen(&r), Some("mqtt"));
        let r =
            Answer { path: "/mqtt" }.on_request(&request("/mqtt", &["mqttv3.1", "mqtt"]), Response::new(())).unwrap();
        assert_eq!(chosen(&r), Some("mqtt"), "mqtt is preferred over mqttv3.1");
    }

    #[test]
    fn old_clients_get_mqttv31() {
        let r = Answer { path: "/mqtt" }.on_request(&request("/mqtt", &["mqttv3.1"]), Response::new(())).unwrap();
        assert_eq!(chosen(&r), Some("mqttv3.1"));
    }

    #[test]
    fn no_offer_is_accepted_without_the_header() {
        let r = Answer { path: "/mqtt" }.on_request(&request("/mqtt?client=web", &[]), Response::new(())).unwrap();
        assert_eq!(chosen(&r), None);
    }

    #[test]
    fn only_other_subprotocols_are_refused_with_400() {
        for offer in ["amqp", "MQTT", "wamp, graphql-ws"] {
            let e = Answer { path: "/mqtt" }.on_request(&request("/mqtt", &[offer]), Response::new(())).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{offer}");
            assert!(e.body().as_deref().unwrap().contains("mqtt"), "{offer}");
        }
    }

    #[test]
    fn another_path_is_refused_with_404() {
        let e = Answer { path: "/mqtt" }.on_request(&request("/ws", &["mqtt"]), Response::new(())).unwrap_err();
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let body = e.body().as_deref().unwrap();
        assert_eq!(e.headers()[CONTENT_LENGTH], body.len().to_string().as_str());
    }

    #[test]
    fn message_limit_leaves_headroom_over_the_packet_limit() {
        let u = Upgrade::new("/mqtt".into(), 1000);
        assert_eq!(u.config.max_message_size, Some(1000 + MESSAGE_HEADROOM));
        assert_eq!(u.config.max_frame_size, Some(1000 + MESSAGE_HEADROOM));
    }
}

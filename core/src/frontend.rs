//! The boundary between the server and the protocol frontends.
//!
//! The server owns listeners (TCP, TLS, WebSocket) and knows nothing about any protocol beyond
//! picking the [`Frontend`] a listener names. It hands each accepted connection to that frontend
//! as one [`ClientStream`] — the same type whatever the transport — with a
//! [`ConnectionContext`].

use std::any::Any;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::auth::AuthPolicy;
use crate::broker::Broker;
use crate::message::{ConnectionId, Protocol};

/// Any byte stream a listener can produce.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The stream as what it is, for a frontend that treats one kind apart (the MQTT frontend
    /// parks idle plain TCP connections, which it takes out of tokio's hands).
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
    fn as_any(&self) -> &dyn Any;
}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Transport for T {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A connection's place under the connection limits: the broker's and its listener's slots (or,
/// for a client being refused, a refusal slot), given back when this is dropped. It goes with
/// the connection wherever the connection is kept: in its task, or in what a frontend keeps of
/// a connection it parked without a task (the listener's shutdown waits for every slot).
///
/// One permit of each semaphore, kept as the semaphore itself (the permit is forgotten when
/// taken and added back when this is dropped): 16 bytes instead of 32, in every connection's
/// task and in every parked connection's record (issue 18).
#[derive(Default)]
pub struct ConnectionSlot {
    held: [Option<Arc<Semaphore>>; 2],
}

impl ConnectionSlot {
    /// Holds these permits (one each) until dropped.
    pub fn new(held: [Option<OwnedSemaphorePermit>; 2]) -> ConnectionSlot {
        ConnectionSlot {
            held: held.map(|p| {
                p.map(|p| {
                    debug_assert_eq!(p.num_permits(), 1, "a connection holds one slot of each limit");
                    let semaphore = p.semaphore().clone();
                    p.forget();
                    semaphore
                })
            }),
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        for semaphore in self.held.iter().flatten() {
            semaphore.add_permits(1);
        }
    }
}

impl fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnectionSlot")
    }
}

/// What TLS established about the peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsIdentity {
    /// The client's certificate chain (DER), leaf first; empty when it sent none.
    pub peer_certificates: Vec<Vec<u8>>,
    /// The server name the client asked for (SNI).
    pub server_name: Option<String>,
    /// The negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
}

/// One client connection, whatever its transport: a boxed stream plus what the listener knows
/// about the peer.
pub struct ClientStream {
    io: Box<dyn Transport>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// `Some` when the connection came through TLS. Boxed: it is 72 bytes, and most
    /// connections have none.
    pub tls: Option<Box<TlsIdentity>>,
}

impl ClientStream {
    /// The byte stream alone, for a handler that keeps no more of it (the addresses and the
    /// TLS identity are 80 bytes).
    pub fn into_io(self) -> Box<dyn Transport> {
        self.io
    }
    /// Whether the byte stream is a `T` (a plain `tokio::net::TcpStream`, say).
    pub fn is<T: Any>(&self) -> bool {
        (*self.io).as_any().is::<T>()
    }
    pub fn new(io: impl Transport, peer: SocketAddr, local: SocketAddr, tls: Option<TlsIdentity>) -> ClientStream {
        ClientStream { io: Box::new(io), peer, local, tls: tls.map(Box::new) }
    }
}

impl fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientStream")
            .field("peer", &self.peer)
            .field("local", &self.local)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Per-listener limits every frontend honours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest packet (MQTT) or frame (AMQP) accepted, in bytes.
    pub max_frame_size: u32,
    /// Time a new connection has to complete its protocol handshake (CONNECT, AMQP open).
    pub handshake_timeout: Duration,
    /// Deliveries waiting in one connection's outbox before the sender is held back.
    pub outbox_capacity: usize,
    /// Bytes of direct deliveries (payload and routing key) waiting in one connection's outbox
    /// before the sender is held back, whichever of this and `outbox_capacity` comes first.
    pub outbox_bytes: usize,
    /// SO_SNDBUF and SO_RCVBUF the listener sets on each accepted TCP socket, in bytes (the
    /// kernel doubles them for its bookkeeping, as socket(7) says); 0 leaves the kernel's
    /// autotuning, which lets each grow to `tcp_wmem` / `tcp_rmem` max (4 MiB and 6 MiB by
    /// default, 32 MiB on some distributions). What the kernel holds for a connection is
    /// latency for everything behind it: a publisher held back for a slow subscriber parks its
    /// messages in Ferry's receive buffer, and a subscriber's in Ferry's send buffer.
    pub socket_send_buffer: usize,
    pub socket_recv_buffer: usize,
    /// Messages one connection may publish per second (a token bucket holding one second's
    /// worth); past it the frontend stops reading from the connection until the bucket refills.
    /// 0: no limit.
    pub max_publish_rate: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        // 128 KiB frames match RabbitMQ's default frame_max (131072); 10 s handshake matches
        // RabbitMQ's handshake_timeout; 1000 outbox entries matches Mosquitto's
        // max_queued_messages default.
        Limits {
            max_frame_size: 131_072,
            handshake_timeout: Duration::from_secs(10),
            outbox_capacity: 1000,
            outbox_bytes: DEFAULT_OUTBOX_BYTES,
            socket_send_buffer: 0,
            socket_recv_buffer: 0,
            max_publish_rate: 0,
        }
    }
}

/// The default byte bound of a connection's outbox. 1,000 deliveries of up to 1 KiB each (the
/// count bound, Mosquitto's `max_queued_messages`) stay within it, so small messages are held
/// as before; larger ones are held by bytes, at most 1 MiB, a quarter of what the kernel's
/// send buffer may autotune to (`tcp_wmem` max, 4 MiB by default): 1,000 messages of 16 KiB
/// were 16 MB waiting in front of one subscriber (docs/benchmarks.md, issue 18).
pub const DEFAULT_OUTBOX_BYTES: usize = 1 << 20;

/// The default SO_SNDBUF / SO_RCVBUF of MQTT listeners (AMQP listeners leave the kernel's
/// autotuning: measured with 64 KiB, 16 AMQP publishers into one queue cost 20 % more CPU per
/// message and their p99 did not improve): 256 KiB, which the kernel doubles to 512 KiB, no longer
/// autotuned. With the kernel's autotuning a publisher held back for a Python subscriber parked
/// 2.2 MB in Ferry's receive buffer and the subscriber's messages 3.1 MB in its send buffer
/// (`ss -tmi`), and QoS 0 p99 was 50-130 ms; with 64 KiB it was 22-65 ms, but 4 KiB messages
/// cost 14-29 % more broker CPU each when Ferry is the bottleneck (more, smaller writes); with
/// 256 KiB the CPU per message is main's (docs/benchmarks.md, issue 18). The cost: one
/// connection's window is at most ~512 KiB, ~10 MB/s per connection at 50 ms of round trip;
/// `0` restores autotuning for links with a larger bandwidth-delay product.
pub const DEFAULT_SOCKET_BUFFER: usize = 256 * 1024;

/// What a listener tells the frontend about where a connection belongs.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// For logs: `mqtt 127.0.0.1:1883`.
    pub name: String,
    pub protocol: Protocol,
    /// The vhost connections on this listener use (MQTT) or default to (AMQP).
    pub vhost: String,
    /// The exchange a protocol without exchanges of its own (MQTT) publishes to and binds its
    /// subscriptions on; `None` leaves the frontend's default (`amq.topic` for MQTT).
    pub exchange: Option<String>,
    pub limits: Limits,
    /// What a client may log in with besides configured users (anonymous, `guest`).
    pub auth: AuthPolicy,
}

/// A shutdown signal: `true` once the server is stopping.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A signal and the sender that trips it.
    pub fn channel() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }
    pub fn is_shutting_down(&self) -> bool {
        *self.0.borrow()
    }
    /// Whether both are the same signal.
    pub fn same_as(&self, other: &Shutdown) -> bool {
        self.0.same_channel(&other.0)
    }
    /// Resolves once shutdown starts (at once if it already has, or if the sender is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
}

/// Everything a frontend needs to serve one connection.
#[derive(Debug)]
pub struct ConnectionContext {
    pub id: ConnectionId,
    pub broker: Arc<Broker>,
    pub listener: Arc<ListenerSettings>,
    pub shutdown: Shutdown,
    /// `Some`: the connection is over a limit and is only to be refused, in the protocol's own
    /// terms, after its first packet (MQTT CONNACK, AMQP connection.close at start-ok), without
    /// checking credentials or touching any state.
    pub refusal: Option<Refusal>,
    /// The connection's place under the limits: the frontend keeps it as long as the connection
    /// lives (dropping the context with the connection's end does; an `async move` block that
    /// uses only some of the context's fields captures only those, and must take this one too).
    pub slot: ConnectionSlot,
}

/// Why a connection is refused before it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Too many connections: the broker's (`[broker] max_connections`) or the listener's.
    ConnectionLimit { limit: usize, scope: LimitScope },
}

/// Whose connection limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    Broker,
    Listener,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ConnectionLimit { limit, scope: LimitScope::Broker } => {
                write!(f, "connection limit ({limit}) of the broker is reached")
            }
            Refusal::ConnectionLimit { limit, scope: LimitScope::Listener } => {
                write!(f, "connection limit ({limit}) of the listener is reached")
            }
        }
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("handshake not completed within {0:?}")]
    HandshakeTimeout(Duration),
}

/// A connection being served: the future a [`Frontend`] gives for it. Boxed once, and owning
/// everything it needs (it borrows nothing from the frontend), so that the connection's task
/// holds only a pointer to it.
pub type Serving = Pin<Box<dyn std::future::Future<Output = Result<(), ConnectionError>> + Send + 'static>>;

/// A protocol implementation the server can put behind a listener.
pub trait Frontend: Send + Sync + 'static {
    fn protocol(&self) -> Protocol;
    /// Called once at start-up, after the broker was recovered from its store and before any
    /// connection is served: a frontend brings back what it stored itself (MQTT sessions, via
    /// [`Broker::take_recovered_sessions`]).
    fn recover(&self, _broker: &Arc<Broker>) {}
    /// The frontend as its concrete type, for the server to hand it protocol-specific settings
    /// (the MQTT topic ACL, on start and reload).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// Serves one connection until it closes. Must return promptly after `ctx.shutdown` fires.
    fn serve(&self, stream: ClientStream, ctx: ConnectionContext) -> Serving;
}

/// Sleeps until `deadline`, or forever without one: for a `select!` branch that waits on a
/// deadline a connection may not have (a heartbeat, the end of a publisher's hold).
pub async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A connection driver's read buffer size (both protocols). Most connections are idle most of
/// the time, and at 10,000 of them a fixed 8 KiB buffer each was most of their memory: an idle
/// connection keeps [`READ_MIN`]; one whose reads fill its buffer gets twice as much next time
/// (up to [`READ_MAX`]), and gives the space back once it has drained and its reads are small
/// again. The size is a power of two, kept as its exponent (one byte of every connection's
/// state, issue 18). A busy publisher's reads grow to [`READ_MAX`]: AMQP's reads were a fixed
/// 8 KiB, about 68 publishes of 64 bytes per `recv`.
#[derive(Debug)]
pub struct ReadSizer {
    shift: u8,
}

/// The least a connection reads into (and what an idle one keeps).
pub const READ_MIN: usize = 512;
/// The most a connection reads at once. A publisher stops decoding at the first publish that
/// finds a subscriber congested (see [`crate::flow`]), so the size of a read does not decide
/// how far it can overrun a subscriber.
pub const READ_MAX: usize = 64 * 1024;

impl Default for ReadSizer {
    fn default() -> Self {
        ReadSizer::new()
    }
}

impl ReadSizer {
    pub fn new() -> ReadSizer {
        ReadSizer { shift: READ_MIN.trailing_zeros() as u8 }
    }

    /// What the next read is given.
    pub fn want(&self) -> usize {
        1 << self.shift
    }

    /// Makes room for the next read; returns the room.
    pub fn prepare(&self, buf: &mut BytesMut) -> usize {
        if buf.capacity() - buf.len() < self.want() / 2 {
            buf.reserve(self.want());
        }
        buf.capacity() - buf.len()
    }

    /// A read of `n` bytes into `room`.
    pub fn read(&mut self, n: usize, room: usize) {
        if n >= room {
            self.shift = (self.shift + 1).min(READ_MAX.trailing_zeros() as u8);
        } else if n < self.want() / 4 {
            self.shift = (self.shift - 1).max(READ_MIN.trailing_zeros() as u8);
        }
    }

    /// Everything read was handled: a buffer much larger than needed now goes, and so does the
    /// buffer of a connection whose reads are small (the MQTT driver's next read of an idle
    /// connection goes through the stack).
    pub fn drained(&self, buf: &mut BytesMut) {
        if buf.is_empty() && (buf.capacity() > 2 * self.want() || self.want() == READ_MIN) {
            *buf = BytesMut::new();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_read_buffer_grows_with_full_reads_and_shrinks_when_idle() {
        let mut sizer = ReadSizer::new();
        let mut buf = BytesMut::new();
        let room = sizer.prepare(&mut buf);
        assert!((READ_MIN..2 * READ_MIN).contains(&room), "{room}");
        // Reads that fill the buffer double what the next one gets, up to the maximum.
        for _ in 0..20 {
            let room = sizer.prepare(&mut buf);
            buf.extend_from_slice(&vec![0u8; room]);
            sizer.read(room, room);
            buf.clear();
        }
        assert_eq!(sizer.want(), READ_MAX);
        assert!(sizer.prepare(&mut buf) >= READ_MAX / 2);
        // Small reads bring it back down, and a drained buffer much larger than that goes.
        for _ in 0..20 {
            sizer.read(10, READ_MAX);
        }
        assert_eq!(sizer.want(), READ_MIN);
        sizer.drained(&mut buf);
        assert_eq!(buf.capacity(), 0);
        // Not while it holds a partial packet.
        let room = sizer.prepare(&mut buf);
        buf.extend_from_slice(&vec![1u8; room]);
        sizer.read(room, room);
        sizer.prepare(&mut buf);
        let kept = buf.capacity();
        sizer.drained(&mut buf);
        assert_eq!(buf.capacity(), kept);
    }

    use super::*;

    #[test]
    fn a_slot_gives_its_permits_back_when_dropped_and_stays_small() {
        let (broker, listener) = (Arc::new(Semaphore::new(2)), Arc::new(Semaphore::new(1)));
        let slot = ConnectionSlot::new([
            Some(broker.clone().try_acquire_owned().unwrap()),
            Some(listener.clone().try_acquire_owned().unwrap()),
        ]);
        let refusal = ConnectionSlot::new([Some(broker.clone().try_acquire_owned().unwrap()), None]);
        assert_eq!((broker.available_permits(), listener.available_permits()), (0, 0));
        drop(slot);
        assert_eq!((broker.available_permits(), listener.available_permits()), (1, 1));
        drop(refusal);
        assert_eq!(broker.available_permits(), 2);
        assert_eq!(std::mem::size_of::<ConnectionSlot>(), 16);
    }

    /// `is` looks at the stream inside the box (a `Box<dyn Transport>` is a `Transport` too,
    /// and `as_any` on the box itself would name the box's type).
    #[tokio::test]
    async fn a_client_stream_knows_its_transport() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stream = ClientStream::new(tcp, addr, addr, None);
        assert!(stream.is::<tokio::net::TcpStream>());
        let io = stream.into_io();
        assert!(io.into_any().downcast::<tokio::net::TcpStream>().is_ok());
        let (a, _b) = tokio::io::duplex(64);
        let stream = ClientStream::new(a, addr, addr, None);
        assert!(!stream.is::<tokio::net::TcpStream>());
    }
}

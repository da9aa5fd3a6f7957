//! Ferry's AMQP 0-9-1 frontend.
//!
//! # Layout
//!
//! - [`codec`]: the wire format as values: frames ([`codec::FrameDecoder`]), methods generated
//!   from RabbitMQ's spec JSON ([`codec::Method`]), field tables, content headers, and the
//!   hand-written hot path that writes a whole delivery ([`codec::encode_deliver`]). Pure
//!   functions over `Bytes`/`BytesMut`; no tokio, no clock; fuzzed in `fuzz/`.
//!
//! - [`connection`]: the connection state machine, fed frames and the time, calling the core
//!   directly. `connection/mod.rs` holds [`connection::Connection`], its entry points, the
//!   connection class (handshake, login, close) and the dispatch of channel methods to one file
//!   per class: `channel.rs`, `exchange.rs`, `queue.rs`, `basic.rs` (with deliveries),
//!   `confirm_tx.rs` (confirms, transactions), `content.rs` (header and body assembly, the
//!   publish into the core) and `heartbeat.rs` (both directions' heartbeats, driven by
//!   `poll_timeout` / `handle_timeout`). It reads no clock: wall-clock `Millis` (message TTLs)
//!   and monotonic `Instant`s (heartbeats) come in as arguments, and `time_tests.rs` drives it
//!   with frames and time alone. [`channel`] holds per-channel state (consumers, delivery tags,
//!   prefetch credit); [`access`] checks permissions; [`errors`] maps core errors to reply codes
//!   in one table.
//! - [`driver`]: the tokio task per connection: protocol header, reads, the clock (the one
//!   place that reads it and passes the time in), coalesced writes; the connection's entry in
//!   the core's registry (`ferry_core::connections`): its counters, channels and login, and
//!   connection.close 320 when it is closed from outside; when to stop reading and decoding,
//!   and the order confirms leave in, are the core's (`ferry_core::flow`: `PublisherFlow`,
//!   `AckQueue`), shared with the MQTT driver.
//!
//! Bytes flow: socket → `BytesMut` → [`codec::FrameDecoder::decode`] → [`codec::Frame`] →
//! [`codec::Method::decode_payload`] / [`codec::ContentHeader::decode`] →
//! [`connection::Connection::handle`] → core → [`codec::encode_method_frame`] /
//! [`codec::encode_deliver`] → one `BytesMut` per wake-up → socket.

pub mod access;
pub mod channel;
pub mod codec;
pub mod connection;
pub mod driver;
pub mod errors;

use ferry_core::frontend::{ClientStream, ConnectionContext, Frontend, Serving};
use ferry_core::message::Protocol;

/// The AMQP 0-9-1 frontend: serve it on `protocol = "amqp"` listeners.
#[derive(Debug, Clone, Default)]
pub struct AmqpFrontend {
    settings: connection::Settings,
}

impl AmqpFrontend {
    pub fn new(settings: connection::Settings) -> AmqpFrontend {
        AmqpFrontend { settings }
    }
}

impl Frontend for AmqpFrontend {
    fn protocol(&self) -> Protocol {
        Protocol::Amqp
    }

    fn serve(&self, stream: ClientStream, ctx: ConnectionContext) -> Serving {
        Box::pin(driver::run(stream, ctx, self.settings.clone()))
    }
}

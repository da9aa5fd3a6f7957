//! Ferry's protocol-agnostic core.
//!
//! # Layout
//!
//! The core speaks AMQP's model — **vhost → exchange → binding → queue → consumer** — and names
//! no packet or method of any protocol. The frontends (`ferry-mqtt`, `ferry-amqp`) map their
//! protocol onto it.
//!
//! - [`message`]: the immutable, `Arc`-shared [`Message`](message::Message), its properties and
//!   the typed header table.
//! - [`topic`]: parsed topic patterns and the topic trie used by topic exchanges.
//! - [`exchange`]: exchange kinds and their binding tables (direct, fanout, topic, headers).
//! - [`queue`]: queues, consumers with credit, acks, TTL, limits, dead-lettering.
//! - [`sink`]: direct sinks (queue-less destinations for transient subscribers) and the bounded
//!   [`Outbox`](sink::Outbox) every connection drains (bounded by count, and by bytes for a
//!   transient subscriber's).
//! - [`retained`]: retained messages with wildcard lookup.
//! - [`vhost`]: one namespace of exchanges and queues; routes a publish to its destinations,
//!   carries out the effects queues return (dead letters, deletions) and writes durable changes
//!   to the store.
//! - [`broker`]: the vhosts, the store and the authenticator; what a connection gets a handle to.
//!   Its housekeeping task expires messages and idle queues when the [`timer`] says.
//! - [`connections`]: the connection registry: every live connection with its protocol, peer,
//!   login and counters, and the close-with-a-reason both frontends obey; what management and
//!   metrics read, and what the MQTT client-id registry wakes a taken-over connection through.
//! - [`timer`]: the one broker-wide timer queues arm with their next deadline (head message TTL,
//!   `x-expires`), re-armed only when a deadline comes earlier.
//! - [`auth`]: users, password hashes (argon2id; Mosquitto and RabbitMQ formats for migration)
//!   and the bounded, off-the-workers login check every frontend calls.
//! - [`cert_login`]: the user name a verified client certificate stands for.
//! - [`runtime`]: users and permissions made at run time (the management API), persisted as
//!   store settings and merged under the configuration's.
//! - [`permissions`]: RabbitMQ's vhost and topic permissions and the per-connection
//!   [`Grant`](permissions::Grant) the frontends check operations against.
//! - [`policy`]: the [`TopicPolicy`](policy::TopicPolicy) trait, a frontend's rules over its
//!   exchanges' routing keys and its own queues (the MQTT frontend's ACL implements it), which
//!   the permission checks and the default exchange ask.
//! - [`flow`]: publisher flow control for every frontend, sans-I/O: when a publisher stops
//!   reading and decoding (publish rate, congested targets, alarms, acks waiting for the store),
//!   the pause accounting, and the commit-ordered acknowledgement queue.
//! - [`rate`]: the token bucket behind the connection-accept and publish rate limits.
//! - [`logging`]: [`log_limited!`] for log lines a client can trigger at will (bad logins,
//!   refused connections, protocol errors): a burst per second per call site, then a count.
//! - [`hash`]: hash maps by who chooses their keys: keyed foldhash for clients' strings, fixed
//!   foldhash for the broker's own ids (std's SipHash is not used on the message path).
//! - [`size`]: [`ByteSize`](size::ByteSize), byte counts in log lines and errors ("128 KiB").
//! - [`store`]: the [`Store`](store::Store) trait (shaped for group commit), the in-memory store and
//!   the redb store (`store::RedbStore`, the server's).
//! - [`frontend`]: the [`Frontend`](frontend::Frontend) trait, [`ClientStream`](frontend::ClientStream)
//!   and [`ConnectionContext`](frontend::ConnectionContext) that the server hands to frontends.
//!
//! A publish flows: frontend → [`VHost::publish`](vhost::VHost::publish) → exchange bindings
//! (recursively through exchange-to-exchange bindings and alternate exchanges) → each queue's
//! [`Queue::enqueue`](queue::Queue::enqueue) (which pushes to a consumer's sink if one has room)
//! and each direct sink's outbox → the consumers' connection tasks, which drain their outboxes.

pub mod auth;
pub mod broker;
pub mod cert_login;
pub mod connections;
pub mod error;
pub mod exchange;
pub mod flow;
pub mod frontend;
pub mod hash;
pub mod logging;
pub mod message;
pub mod permissions;
pub mod policy;
pub mod queue;
pub mod rate;
pub mod retained;
pub mod runtime;
pub mod signal;
pub mod sink;
pub mod size;
pub mod store;
pub mod timer;
pub mod topic;
pub mod vhost;

pub use broker::Broker;
pub use error::CoreError;
pub use message::{
    ConnectionId, FieldTable, FieldValue, Message, Millis, MoreProperties, Origin, Properties, Protocol, ShortString,
};

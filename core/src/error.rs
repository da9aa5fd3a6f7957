//! Errors of the core. Each variant is a *kind* the frontends map to their own codes in one
//! table (AMQP reply codes in `ferry-amqp`, MQTT reason codes in `ferry-mqtt`); the text is the
//! detail a client sees, worded as RabbitMQ words it where RabbitMQ has the same error.

use thiserror::Error;

/// An operation on vhosts, exchanges, bindings or queues was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoreError {
    /// The named object does not exist (AMQP 404).
    #[error("{0}")]
    NotFound(String),
    /// A redeclare that differs, a delete with if-unused/if-empty that does not hold, an invalid
    /// argument value (AMQP 406).
    #[error("{0}")]
    PreconditionFailed(String),
    /// Reserved names, the default exchange, internal exchanges, exclusive consumers (AMQP 403).
    #[error("{0}")]
    AccessRefused(String),
    /// An exclusive queue used from another connection (AMQP 405).
    #[error("{0}")]
    ResourceLocked(String),
    /// A limit was reached (too many queues, store full) (AMQP 506).
    #[error("{0}")]
    ResourceError(String),
}

impl CoreError {
    pub fn not_found(what: impl std::fmt::Display) -> CoreError {
        CoreError::NotFound(what.to_string())
    }
    pub fn precondition(what: impl std::fmt::Display) -> CoreError {
        CoreError::PreconditionFailed(what.to_string())
    }
}

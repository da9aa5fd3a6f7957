//! Errors of the AMQP state machine and the one table that maps core errors to reply codes.
//!
//! | core error | AMQP reply (channel close) |
//! |---|---|
//! | `NotFound` | 404 NOT_FOUND |
//! | `AccessRefused` | 403 ACCESS_REFUSED |
//! | `ResourceLocked` | 405 RESOURCE_LOCKED |
//! | `PreconditionFailed` | 406 PRECONDITION_FAILED |
//! | `ResourceError` | 506 RESOURCE_ERROR |

use ferry_core::message::ShortString;
use ferry_core::CoreError;

use crate::codec::reply_code;

/// The name RabbitMQ prints before a reply text (`NOT_FOUND - no queue 'q' in vhost '/'`).
pub fn code_name(code: u16) -> &'static str {
    match code {
        reply_code::REPLY_SUCCESS => "OK",
        reply_code::CONTENT_TOO_LARGE => "CONTENT_TOO_LARGE",
        reply_code::NO_ROUTE => "NO_ROUTE",
        reply_code::NO_CONSUMERS => "NO_CONSUMERS",
        reply_code::CONNECTION_FORCED => "CONNECTION_FORCED",
        reply_code::INVALID_PATH => "INVALID_PATH",
        reply_code::ACCESS_REFUSED => "ACCESS_REFUSED",
        reply_code::NOT_FOUND => "NOT_FOUND",
        reply_code::RESOURCE_LOCKED => "RESOURCE_LOCKED",
        reply_code::PRECONDITION_FAILED => "PRECONDITION_FAILED",
        reply_code::FRAME_ERROR => "FRAME_ERROR",
        reply_code::SYNTAX_ERROR => "SYNTAX_ERROR",
        reply_code::COMMAND_INVALID => "COMMAND_INVALID",
        reply_code::CHANNEL_ERROR => "CHANNEL_ERROR",
        reply_code::UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        reply_code::RESOURCE_ERROR => "RESOURCE_ERROR",
        reply_code::NOT_ALLOWED => "NOT_ALLOWED",
        reply_code::NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        reply_code::INTERNAL_ERROR => "INTERNAL_ERROR",
        _ => "ERROR",
    }
}

/// A protocol error with the method that caused it: closes the channel (soft) or the
/// connection (hard), with `code` and `text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpError {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl AmqpError {
    pub fn new(code: u16, detail: impl std::fmt::Display) -> AmqpError {
        AmqpError { code, text: format!("{} - {detail}", code_name(code)), class_id: 0, method_id: 0 }
    }
    pub fn on(mut self, class_id: u16, method_id: u16) -> AmqpError {
        self.class_id = class_id;
        self.method_id = method_id;
        self
    }
    /// The reply text as a short string (cut at 255 bytes on a character boundary).
    pub fn reply_text(&self) -> ShortString {
        let mut end = self.text.len().min(255);
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        ShortString::from(&self.text[..end])
    }
    /// Connection errors per the spec's list (§1.2 of the 0-9-1 reference).
    pub fn is_hard(&self) -> bool {
        matches!(
            self.code,
            reply_code::CONNECTION_FORCED
                | reply_code::INVALID_PATH
                | reply_code::FRAME_ERROR
                | reply_code::SYNTAX_ERROR
                | reply_code::COMMAND_INVALID
                | reply_code::CHANNEL_ERROR
                | reply_code::UNEXPECTED_FRAME
                | reply_code::RESOURCE_ERROR
                | reply_code::NOT_ALLOWED
                | reply_code::NOT_IMPLEMENTED
                | reply_code::INTERNAL_ERROR
        )
    }
}

impl From<CoreError> for AmqpError {
    fn from(e: CoreError) -> AmqpError {
        let code = match &e {
            CoreError::NotFound(_) => reply_code::NOT_FOUND,
            CoreError::PreconditionFailed(_) => reply_code::PRECONDITION_FAILED,
            CoreError::AccessRefused(_) => reply_code::ACCESS_REFUSED,
            CoreError::ResourceLocked(_) => reply_code::RESOURCE_LOCKED,
            // A resource error is a channel error for queue/exchange limits in RabbitMQ.
            CoreError::ResourceError(_) => reply_code::RESOURCE_ERROR,
        };
        AmqpError::new(code, e)
    }
}

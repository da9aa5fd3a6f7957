//! SIGINT and SIGTERM, both meaning "shut down gracefully"; SIGHUP, meaning "reload".

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Installed signal handlers. Install them before the listeners bind, so that a signal arriving
/// as soon as the server is reachable is not taken by the default action (which exits at once).
#[derive(Debug)]
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGINT or SIGTERM (named): shut down gracefully.
    Shutdown(&'static str),
    /// SIGHUP: reload the configuration file.
    Reload,
}

impl Signals {
    /// Must be called inside a tokio runtime.
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the next SIGINT, SIGTERM or SIGHUP.
    pub async fn recv(&mut self) -> Request {
        tokio::select! {
            _ = self.interrupt.recv() => Request::Shutdown("SIGINT"),
            _ = self.terminate.recv() => Request::Shutdown("SIGTERM"),
            _ = self.hangup.recv() => Request::Reload,
        }
    }
}

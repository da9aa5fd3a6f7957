//! SIGINT and SIGTERM, both meaning "shut down gracefully".

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Installed signal handlers. Install them before the listeners bind, so that a signal arriving
/// as soon as the server is reachable is not taken by the default action (which exits at once).
#[derive(Debug)]
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    /// Must be called inside a tokio runtime.
    pub fn install() -> io::Result<Signals> {
        Ok(Signals { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    /// Waits for the next SIGINT or SIGTERM and returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

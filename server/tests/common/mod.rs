//! What the tests that run the `ferry` binary share: starting it, reading its log lines as they
//! come, and stopping it.
#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
/// Generous: a debug build on a loaded machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Kills the child if the test fails before it exits by itself.
pub struct Running(pub Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `ferry args…` serving in `dir`, its log lines (from stderr) coming through a channel.
pub struct Serving {
    running: Running,
    lines: mpsc::Receiver<String>,
    /// Every line received so far, for failure messages.
    seen: Vec<String>,
}

impl Serving {
    pub fn start(dir: &Path, args: &[&str]) -> Serving {
        // `FERRY_BIN` runs another build (a release one, an older one) under the same test.
        let mut child = Command::new(std::env::var("FERRY_BIN").unwrap_or(FERRY.to_string()))
            .args(args)
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let log = child.stderr.take().unwrap();
        Serving { running: Running(Some(child)), lines: read_lines(log), seen: Vec::new() }
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.running.0.as_ref().expect("running").id()
    }

    /// The next line `matches` accepts, skipping the others (within [`PATIENCE`]).
    pub fn wait_for<T>(&mut self, what: &str, mut matches: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = matches(&line);
                    self.seen.push(line);
                    if let Some(found) = found {
                        return found;
                    }
                }
                Err(e) => panic!("no {what} ({e}); the log:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// SIGTERM, then the exit status and every line it wrote to stderr.
    pub fn stop(mut self) -> (ExitStatus, Vec<String>) {
        let mut child = self.running.0.take().unwrap();
        let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        let (tx, status) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(child.wait().unwrap());
        });
        let status = status.recv_timeout(PATIENCE).expect("ferry did not exit after SIGTERM");
        // It exited: its stderr is closed, so the reader ends.
        self.seen.extend(self.lines.iter());
        (status, self.seen)
    }
}

/// The lines of `from`, through a channel (a thread reads them).
pub fn read_lines(from: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

//! A real Mosquitto broker for tests that bridge to or from one: started on a free loopback
//! port with a config of the test's choosing, killed on drop. Tests print SKIPPED and pass when
//! `mosquitto` is not installed (`.ci/run` installs it).

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use crate::within;

/// A Mosquitto broker on a free loopback port, killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
    /// Its log lines so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mosquitto {
    /// `None` (with the reason printed) when `mosquitto` is not installed. `extra` is appended
    /// to its configuration (a listener on its port, anonymous clients, no persistence, the
    /// whole log to stderr).
    pub async fn start(extra: &str) -> Option<Mosquitto> {
        // The port is free when picked, but another test may take it before Mosquitto binds
        // it; Mosquitto then exits ("Address already in use") and another port is tried.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
            match Mosquitto::start_on(port, extra).await {
                Ok(m) => return m,
                Err(log) => eprintln!("mosquitto did not start, trying another port:\n{}", log.join("\n")),
            }
        }
        panic!("mosquitto did not start on any of 5 ports");
    }

    /// `Ok(None)`: not installed; `Err(log)`: it exited before it was running.
    async fn start_on(port: u16, extra: &str) -> Result<Option<Mosquitto>, Vec<String>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\nlog_type all\n{extra}"
            ),
        )
        .expect("write mosquitto.conf");
        let spawned = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                eprintln!("SKIPPED: mosquitto is not on PATH ({e}); `apt-get install -y mosquitto` runs this test");
                return Ok(None);
            }
        };
        // Its log, read on a thread of its own (to the end, so that it never blocks on a full
        // pipe); "… running", logged once every listener is bound, is the event waited for (it
        // logs "Opening … listen socket" before binding).
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let running = line.contains("mosquitto version") && line.ends_with(" running");
                lines.lock().unwrap().push(line);
                if running {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let mosquitto = Mosquitto { child, port, _dir: dir, log };
        match within("mosquitto running", rx).await {
            Ok(()) => Ok(Some(mosquitto)),
            // Its log ended without it: it exited.
            Err(_) => Err(mosquitto.log()),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// Its log lines so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Options for a rumqttc 3.1.1 client of this broker (keep alive 30 s).
    pub fn v311_options(&self, id: &str) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", self.port);
        o.set_keep_alive(std::time::Duration::from_secs(30));
        o
    }
}

//! A real Mosquitto broker for tests that bridge to or from one: started on a free loopback
//! port with a config of the test's choosing, killed on drop. Tests print SKIPPED and pass when
//! `mosquitto` is not installed (`.ci/run` installs it).

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::Stdio;

use crate::within;

/// A Mosquitto broker on a free loopback port, killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
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
    /// whole log to stderr). `on_log` sees each log line, on the thread that reads them.
    pub async fn start_logging(extra: &str, on_log: impl FnMut(&str) + Send + 'static) -> Option<Mosquitto> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
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
                return None;
            }
        };
        // Its log, read on a thread of its own (to the end, so that it never blocks on a full
        // pipe); the line saying it listens is the event waited for.
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut on_log = on_log;
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                on_log(&line);
                if line.contains("Opening ipv4 listen socket") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let mosquitto = Mosquitto { child, port, _dir: dir };
        within("mosquitto listening", rx).await.expect("mosquitto exited before listening");
        Some(mosquitto)
    }

    /// [`Mosquitto::start_logging`] without looking at the log.
    pub async fn start(extra: &str) -> Option<Mosquitto> {
        Mosquitto::start_logging(extra, |_| {}).await
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// Options for a rumqttc 3.1.1 client of this broker (keep alive 30 s).
    pub fn v311_options(&self, id: &str) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", self.port);
        o.set_keep_alive(std::time::Duration::from_secs(30));
        o
    }
}

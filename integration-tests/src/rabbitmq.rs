//! A real RabbitMQ for tests that talk to one (shovels, definitions exported by RabbitMQ),
//! started once per test binary on free loopback ports; `None` (with SKIPPED printed) when
//! `rabbitmq-server` is not installed.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use lapin::{Channel, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

use crate::within;

/// Where Debian's rabbitmq-server package puts the server.
pub const RABBITMQ: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The RabbitMQ of this test binary. It runs under a small shell that holds the read end of a
/// pipe whose write end only this process has: when the test process exits (however it ends)
/// the shell reads EOF, stops RabbitMQ's whole process group and removes its directory, so no
/// beam process outlives `cargo test`.
#[derive(Debug)]
pub struct Rabbit {
    pub port: u16,
    /// Its HOME (the Erlang cookie), for rabbitmqctl.
    pub dir: std::path::PathBuf,
    _guard: std::process::ChildStdin,
}

static RABBIT: OnceCell<Option<Rabbit>> = OnceCell::const_new();

/// The shared RabbitMQ, started on first use; `None` (SKIPPED printed) when not installed.
pub async fn rabbit() -> Option<&'static Rabbit> {
    RABBIT.get_or_init(start_rabbit).await.as_ref()
}

async fn start_rabbit() -> Option<Rabbit> {
    if !Path::new(RABBITMQ).exists() {
        eprintln!("SKIPPED: {RABBITMQ} is not installed; `apt-get install -y rabbitmq-server` runs this test");
        return None;
    }
    // The ports are free when picked, but another test of this binary may bind one (or the
    // Erlang distribution port) before RabbitMQ does; RabbitMQ then stops, and the start is
    // tried again on other ports, as `Mosquitto::start` does. A node that neither comes up nor
    // stops within the limit (a machine busy compiling) gets another try too.
    let mut logs = Vec::new();
    for _ in 0..3 {
        match start_rabbit_once().await {
            Ok(rabbit) => return Some(rabbit),
            Err(log) => {
                eprintln!("RabbitMQ did not start, trying other ports:\n{log}");
                logs.push(log);
            }
        }
    }
    panic!("RabbitMQ did not start in 3 tries:\n{}", logs.join("\n---\n"));
}

/// One start on fresh ports: the node once it answers the AMQP header with connection.start,
/// or the tail of its log when it stopped or did not answer within 60 s (its process group is
/// then stopped and its directory removed).
async fn start_rabbit_once() -> Result<Rabbit, String> {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let (port, dist) = (free_port(), free_port());
    std::fs::write(dir.join(".erlang.cookie"), "FERRYSHOVELTESTCOOKIE").expect("cookie");
    let mut perms = std::fs::metadata(dir.join(".erlang.cookie")).expect("cookie").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o400);
    std::fs::set_permissions(dir.join(".erlang.cookie"), perms).expect("cookie mode");
    std::fs::write(dir.join("rabbitmq.conf"), "disk_free_limit.absolute = 1MB\nloopback_users = none\n")
        .expect("rabbitmq.conf");
    std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
    // RabbitMQ starts in the background of the shell (in a subshell that leaves `exited` behind
    // when the server stops); `read` waits for this process to end.
    let script = format!(
        "( {RABBITMQ} </dev/null >\"$D/rabbitmq.log\" 2>&1; touch \"$D/exited\" ) & pid=$!\n\
         trap '' TERM\n\
         read _\n\
         kill -TERM 0\n\
         wait $pid\n\
         rm -rf \"$D\"\n"
    );
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c").arg(script);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let d = dir.display().to_string();
    cmd.env("D", &d)
        .env("HOME", &d)
        .env("RABBITMQ_NODENAME", format!("ferrytest{port}@localhost"))
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist.to_string())
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_LOGS", "-")
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("spawn sh for rabbitmq-server");
    let guard = child.stdin.take().expect("stdin pipe");
    let exited = dir.join("exited");
    // Ready when it answers the protocol header with connection.start (startup takes seconds).
    let ready = async {
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let _ = s.write_all(b"AMQP\x00\x00\x09\x01").await;
                let mut b = [0u8; 1];
                if matches!(s.read(&mut b).await, Ok(1)) && b[0] == 1 {
                    return true;
                }
            }
            if exited.exists() || !matches!(child.try_wait(), Ok(None)) {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    let up = tokio::time::timeout(std::time::Duration::from_secs(60), ready).await;
    if up == Ok(true) {
        return Ok(Rabbit { port, dir, _guard: guard });
    }
    let log = std::fs::read_to_string(dir.join("rabbitmq.log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(15).collect();
    let why = if up.is_err() { "not up within 60 s" } else { "stopped" };
    // Closing the pipe stops the node's process group and removes its directory.
    drop(guard);
    let _ = child.wait();
    Err(format!("{why} (ports {port}, {dist}):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n")))
}

impl Rabbit {
    /// Runs `rabbitmqctl` against this node.
    pub fn ctl(&self, args: &[&str]) {
        let out = std::process::Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl")
            .arg("-n")
            .arg(format!("ferrytest{}@localhost", self.port))
            .args(args)
            .env("HOME", &self.dir)
            .output()
            .expect("rabbitmqctl");
        assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn uri(&self) -> String {
        format!("amqp://127.0.0.1:{}/%2f", self.port)
    }
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
    pub async fn channel(&self) -> (Connection, Channel) {
        let uri = format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port);
        let conn = within("lapin to RabbitMQ", Connection::connect(&uri, ConnectionProperties::default()))
            .await
            .expect("lapin connects to RabbitMQ");
        let ch = within("channel", conn.create_channel()).await.expect("channel");
        (conn, ch)
    }
}

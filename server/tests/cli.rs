//! The `ferry` binary, run as a user would.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
/// Generous: a debug build on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// Runs `ferry args…` in `dir` to completion (killed if it outlives [`PATIENCE`]).
fn ferry(dir: &Path, args: &[&str]) -> Output {
    let child = Command::new(FERRY)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(PATIENCE) {
        Ok(output) => output.expect("wait for ferry"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("ferry {args:?} did not exit within {PATIENCE:?}");
        }
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    std::fs::write(dir.join(name), text).unwrap();
    name.to_string()
}

/// Kills the child if the test fails before it exits by itself.
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn no_arguments_serves_the_default_ports_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(FERRY)
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    let pid = child.id();
    let log = child.stderr.take().unwrap();
    let mut running = Running(Some(child));

    let (lines_tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(log).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(PATIENCE) {
            Ok(line) if line.contains("ferry ready") => break,
            Ok(line) => seen.push(line),
            Err(e) => panic!("ferry did not become ready ({e}); its log:\n{}", seen.join("\n")),
        }
    }

    assert!(dir.path().join("ferry-data").is_dir(), "data directory not created");

    // AMQP is served by the built-in frontend: the protocol header is answered with
    // connection.start (a method frame on channel 0, class 10 method 10).
    let mut amqp = TcpStream::connect("127.0.0.1:5672").expect("connect to 5672");
    amqp.set_read_timeout(Some(PATIENCE)).unwrap();
    amqp.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    let mut start = [0u8; 11];
    amqp.read_exact(&mut start).unwrap();
    assert_eq!((start[0], &start[1..3], &start[7..11]), (1, &[0u8, 0][..], &[0u8, 10, 0, 10][..]));

    // MQTT 3.1.1 is served by the built-in frontend: CONNECT is accepted.
    let mut mqtt = TcpStream::connect("127.0.0.1:1883").expect("connect to 1883");
    mqtt.set_read_timeout(Some(PATIENCE)).unwrap();
    mqtt.write_all(&[0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x01, b'c'])
        .unwrap();
    let mut reply = [0u8; 4];
    mqtt.read_exact(&mut reply).unwrap();
    assert_eq!(reply, [0x20, 0x02, 0x00, 0x00]);

    drop((amqp, mqtt));
    let killed = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    let mut child = running.0.take().unwrap();
    let (status_tx, status) = mpsc::channel::<ExitStatus>();
    thread::spawn(move || {
        let _ = status_tx.send(child.wait().unwrap());
    });
    // Default grace is 10 s; nothing is connected, so it should be far quicker.
    let status = status.recv_timeout(Duration::from_secs(10)).expect("ferry did not exit after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn check_config_names_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "f.toml",
        "[broker]\ndata_dri = \"x\"\n[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:1883\"\n",
    );
    let out = ferry(dir.path(), &["check-config", &file]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("f.toml") && err.contains("unknown field `data_dri`") && err.contains("line 2"), "{err}");
}

#[test]
fn check_config_accepts_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "ok.toml",
        "[broker]\ndata_dir = \"d\"\n[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:1883\"\n[[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:5672\"\nvhost = \"v\"\n",
    );
    let out = ferry(dir.path(), &["check-config", &file]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok.toml: ok\n");
    assert!(!dir.path().join("d").exists(), "check-config must not create the data directory");
}

#[test]
fn a_taken_port_refuses_start_naming_the_listener() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let file =
        write(dir.path(), "f.toml", &format!("[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\n"));
    let out = ferry(dir.path(), &["--config", &file]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains(&format!("f.toml: listeners[0] (mqtt 127.0.0.1:{port}): cannot bind: ")), "{err}");
    assert!(!dir.path().join("ferry-data").exists(), "a refused start must not create the data directory");
}

#[test]
fn an_unreadable_certificate_is_refused_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "f.toml",
        "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\ntls = { cert = \"missing.pem\", key = \"missing.key\" }\n",
    );
    for args in [&["check-config", &file][..], &["--config", &file][..]] {
        let out = ferry(dir.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains("listeners[0].tls.cert: cannot read ") && err.contains("missing.pem"), "{args:?}: {err}");
    }
}

#[test]
fn a_bad_log_level_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(dir.path(), &["--log-level", "ferry=loud"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--log-level: "), "{}", stderr(&out));
}

#[test]
fn version_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(dir.path(), &["--version"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("ferry {}\n", env!("CARGO_PKG_VERSION")));
}

/// Runs `ferry args…` with `input` on its standard input (a pipe, not a terminal).
fn ferry_with_input(dir: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(FERRY)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(PATIENCE) {
        Ok(output) => output.expect("wait for ferry"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("ferry {args:?} did not exit within {PATIENCE:?}");
        }
    }
}

#[test]
fn passwd_hashes_a_password_read_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry_with_input(dir.path(), &["passwd", "alice"], b"correct horse\n");
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let phc = stdout.strip_suffix('\n').expect("one line");
    assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$") && !phc.contains('\n'), "{stdout:?}");
    let hash = ferry_core::auth::PasswordHash::parse(phc).unwrap();
    assert!(hash.verify(b"correct horse"), "the trailing newline is not part of the password");
    assert!(!hash.verify(b"correct horse\n"));
    let err = stderr(&out);
    assert!(err.contains("name = \"alice\"") && err.contains(&format!("password_hash = \"{phc}\"")), "{err}");
    assert!(!err.contains("correct horse") && !stdout.contains("correct horse"), "the password is never printed");

    // The printed table is a config that runs.
    let file = write(
        dir.path(),
        "f.toml",
        &format!("[[listeners]]\nprotocol = \"mqtt\"\nbind = \"0.0.0.0:1883\"\n[[users]]\nname = \"alice\"\npassword_hash = \"{phc}\"\n"),
    );
    let out = ferry(dir.path(), &["check-config", &file]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn passwd_refuses_an_empty_password() {
    let dir = tempfile::tempdir().unwrap();
    for input in [&b""[..], b"\n"] {
        let out = ferry_with_input(dir.path(), &["passwd"], input);
        assert_eq!(out.status.code(), Some(2), "{input:?}");
        assert!(stderr(&out).contains("the password is empty"), "{}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn a_public_listener_without_users_or_anonymous_access_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "f.toml", "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"0.0.0.0:0\"\n");
    for args in [&["check-config", &file][..], &["--config", &file][..]] {
        let out = ferry(dir.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains(
                "f.toml: listeners[0] (mqtt 0.0.0.0:0): not on loopback and no way to authenticate: add [[users]] \
                 (see `ferry passwd`), take client certificates as identities (cert_login), or set allow_anonymous = true"
            ),
            "{args:?}: {err}"
        );
    }
    assert!(!dir.path().join("ferry-data").exists(), "a refused start must not create the data directory");
    let open = write(
        dir.path(),
        "open.toml",
        "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"0.0.0.0:0\"\nallow_anonymous = true\n",
    );
    let out = ferry(dir.path(), &["check-config", &open]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn sighup_reloads_the_config_file_and_never_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let listener = "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n";
    let file = write(dir.path(), "ferry.toml", &format!("[broker]\ndata_dir = \"data\"\n{listener}"));
    let mut child = Command::new(FERRY)
        .args(["--config", &file])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    let pid = child.id().to_string();
    let log = child.stderr.take().unwrap();
    let mut running = Running(Some(child));
    let (lines_tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(log).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |what: &str| loop {
        match lines.recv_timeout(PATIENCE) {
            Ok(line) => {
                let found = line.contains(what);
                seen.push(line);
                if found {
                    return seen.last().unwrap().clone();
                }
            }
            Err(e) => panic!("no {what:?} in ferry's log ({e}):\n{}", seen.join("\n")),
        }
    };
    let hup = || assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    wait_for("ferry ready");

    // One user added: applied.
    let hash = ferry_core::auth::PasswordHash::argon2id(b"pw");
    let users = format!("[[users]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n");
    write(dir.path(), "ferry.toml", &format!("[broker]\ndata_dir = \"data\"\n{users}{listener}"));
    hup();
    let done = wait_for("reload done");
    assert!(done.contains("1 user(s) configured"), "{done}");
    assert!(!done.contains("$argon2id"), "no hash in the log: {done}");

    // A listener added: left for a restart.
    write(dir.path(), "ferry.toml", &format!("[broker]\ndata_dir = \"data\"\n{users}{listener}{listener}"));
    hup();
    let restart = wait_for("needs a restart");
    assert!(restart.contains("listeners[1] added"), "{restart}");
    wait_for("reload done");

    // A file that no longer parses: refused, the server keeps running.
    write(dir.path(), "ferry.toml", "[broker\n");
    hup();
    wait_for("reload refused");

    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut child = running.0.take().unwrap();
    let (status_tx, status) = mpsc::channel::<ExitStatus>();
    thread::spawn(move || {
        let _ = status_tx.send(child.wait().unwrap());
    });
    let status = status.recv_timeout(Duration::from_secs(10)).expect("ferry did not exit after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
}

//! The `ferry` binary, run as a user would.

mod common;

use common::{read_lines, Serving, FERRY, PATIENCE};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;

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

#[test]
fn no_arguments_serves_the_default_ports_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut ferry = Serving::start(dir.path(), &[]);
    ferry.wait_for("ferry ready", |l| l.contains("ferry ready").then_some(()));

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
    let (status, _) = ferry.stop();
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
    let mut ferry = Serving::start(dir.path(), &["--config", &file]);
    let pid = ferry.pid().to_string();
    let mut wait_for = |what: &str| ferry.wait_for(what, |l| l.contains(what).then(|| l.to_string()));
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

    let (status, _) = ferry.stop();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn data_dir_on_the_command_line_wins_over_the_file_and_survives_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "ferry.toml",
        "[broker]\ndata_dir = \"from-file\"\n[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n",
    );
    let mut ferry = Serving::start(dir.path(), &["--config", &file, "--data-dir", "from-cli"]);
    let pid = ferry.pid().to_string();
    ferry.wait_for("ferry ready", |l| l.contains("ferry ready").then_some(()));
    assert!(dir.path().join("from-cli/ferry.redb").is_file(), "the store is not in --data-dir");
    assert!(!dir.path().join("from-file").exists(), "the file's data_dir was used");

    // A reload compares the file with the running settings: --data-dir applies to it too, so
    // the unchanged file is not reported as a changed [broker].
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    ferry.wait_for("reload done", |l| l.contains("reload done").then_some(()));
    let (status, lines) = ferry.stop();
    assert!(status.success(), "exit status {status:?}");
    assert!(!lines.iter().any(|l| l.contains("needs a restart")), "{lines:#?}");
}

#[test]
fn the_packaged_sample_config_is_accepted_by_check_config() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/ferry.toml");
    let out = ferry(sample.parent().unwrap(), &["check-config", "ferry.toml"]);
    assert!(out.status.success(), "dist/ferry.toml refused:\n{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ferry.toml: ok\n");
}

/// The sample with every example line (`#` directly followed by TOML, as opposed to `# ` prose)
/// uncommented: the examples must be valid too, and together cover every section.
#[test]
fn every_example_in_the_packaged_sample_config_is_valid() {
    let sample = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/ferry.toml")).unwrap();
    let text: String = sample
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => format!("{rest}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("uncommented sample is not TOML: {e}\n{text}"));
    for section in [
        "broker",
        "mqtt",
        "amqp",
        "listeners",
        "users",
        "acl",
        "permissions",
        "topic_permissions",
        "bridges",
        "shovels",
    ] {
        assert!(table.contains_key(section), "the sample has no [{section}] example");
    }
    let listeners = table["listeners"].as_array().unwrap();
    let has = |f: &dyn Fn(&toml::Table) -> bool| listeners.iter().any(|l| f(l.as_table().unwrap()));
    for protocol in ["mqtt", "amqp", "http"] {
        assert!(
            has(&|l| l["protocol"].as_str() == Some(protocol) && l.contains_key("tls")),
            "no {protocol} TLS example"
        );
    }
    assert!(has(&|l| l.get("transport").and_then(|t| t.as_str()) == Some("websocket")), "no WebSocket example");

    // Its TLS files, relative to the file (tls/ beside it), made up for the check.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("tls/server.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls/ca.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls/server.key"), certified.key_pair.serialize_pem()).unwrap();
    let file = write(dir.path(), "ferry.toml", &text);
    let out = ferry(dir.path(), &["check-config", &file]);
    assert!(out.status.success(), "the sample's examples are refused:\n{}", stderr(&out));
}

/// A password's hash, from `ferry passwd`.
fn hash(dir: &Path, password: &str) -> String {
    let out = ferry_with_input(dir, &["passwd"], format!("{password}\n").as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A JSON log line's event if its message is `message` (every line must be JSON).
fn event(line: &str, message: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    (v["fields"]["message"] == message).then_some(v)
}

/// The address a listener of `protocol` bound, from its "listening" line.
fn listening(line: &str, protocol: &str) -> Option<std::net::SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let message = v["fields"]["message"].as_str()?;
    message.strip_prefix(&format!("{protocol} "))?.strip_suffix(": listening")?.parse().ok()
}

/// An MQTT 3.1.1 CONNECT (clean session, keep alive 60) with optional user name and password.
fn mqtt_connect(client_id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let string = |s: &str| [&(s.len() as u16).to_be_bytes()[..], s.as_bytes()].concat();
    let flags = if login.is_some() { 0xC2 } else { 0x02 };
    let mut body = [&[0x00, 0x04][..], b"MQTT", &[0x04, flags, 0x00, 0x3c]].concat();
    body.extend(string(client_id));
    if let Some((user, password)) = login {
        body.extend(string(user));
        body.extend(string(password));
    }
    assert!(body.len() < 128);
    [&[0x10, body.len() as u8][..], &body].concat()
}

/// A connection.start-ok with PLAIN credentials (sent after connection.start came: clients
/// wait for it).
fn amqp_start_ok(user: &str, password: &str) -> Vec<u8> {
    let response = format!("\0{user}\0{password}");
    let mut payload = vec![0, 10, 0, 11, 0, 0, 0, 0, 5];
    payload.extend(b"PLAIN");
    payload.extend((response.len() as u32).to_be_bytes());
    payload.extend(response.as_bytes());
    payload.push(5);
    payload.extend(b"en_US");
    amqp_method(&payload)
}

/// A method frame on channel 0.
fn amqp_method(payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![1, 0, 0];
    bytes.extend((payload.len() as u32).to_be_bytes());
    bytes.extend(payload);
    bytes.push(0xCE);
    bytes
}

/// Reads one frame; returns its payload.
fn amqp_read_frame(stream: &mut TcpStream) -> Vec<u8> {
    let mut header = [0u8; 7];
    stream.read_exact(&mut header).unwrap();
    let size = u32::from_be_bytes(header[3..7].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; size + 1];
    stream.read_exact(&mut payload).unwrap();
    payload.truncate(size);
    payload
}

/// The protocol header, then waits for connection.start.
fn amqp_hello(addr: std::net::SocketAddr) -> TcpStream {
    let mut amqp = TcpStream::connect(addr).unwrap();
    amqp.set_read_timeout(Some(PATIENCE)).unwrap();
    amqp.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    assert_eq!(amqp_read_frame(&mut amqp)[..4], [0, 10, 0, 10], "connection.start");
    amqp
}

#[test]
fn json_logs_name_the_peer_of_every_connection_and_login_failure() {
    let dir = tempfile::tempdir().unwrap();
    let alice = hash(dir.path(), "test12");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    write(dir.path(), "server.pem", &certified.cert.pem());
    write(dir.path(), "server.key", &certified.key_pair.serialize_pem());
    let file = write(
        dir.path(),
        "f.toml",
        &format!(
            "[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
             [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
             [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
             tls = {{ cert = \"server.pem\", key = \"server.key\" }}\n\
             [[users]]\nname = \"alice\"\npassword_hash = \"{alice}\"\n"
        ),
    );
    let mut ferry = Serving::start(dir.path(), &["--config", &file, "--log-format", "json"]);
    let mqtt_addr = ferry.wait_for("MQTT listening line", |l| listening(l, "mqtt"));
    let amqp_addr = ferry.wait_for("AMQP listening line", |l| listening(l, "amqp"));
    let amqps_addr = ferry.wait_for("AMQP TLS listening line", |l| {
        l.contains("(TLS)").then(|| listening(&l.replace(" (TLS)", ""), "amqp")).flatten()
    });
    let ready = ferry.wait_for("ready line", |l| event(l, "ferry ready"));
    assert_eq!(ready["level"], "INFO", "{ready}");
    assert_eq!(ready["fields"]["version"], env!("CARGO_PKG_VERSION"), "{ready}");
    assert!(ready["timestamp"].is_string() && ready["target"].is_string(), "{ready}");

    // A connection's connect and disconnect lines.
    let mut mqtt = TcpStream::connect(mqtt_addr).unwrap();
    mqtt.set_read_timeout(Some(PATIENCE)).unwrap();
    let peer = mqtt.local_addr().unwrap().to_string();
    mqtt.write_all(&mqtt_connect("sensor-1", Some(("alice", "test12")))).unwrap();
    let mut connack = [0u8; 4];
    mqtt.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    let connected = ferry.wait_for("MQTT connect line", |l| event(l, "MQTT client connected"));
    let f = &connected["fields"];
    assert_eq!(connected["level"], "INFO", "{connected}");
    assert_eq!((&f["peer"], &f["protocol"], &f["version"]), (&peer.clone().into(), &"MQTT".into(), &"3.1.1".into()));
    assert_eq!((&f["client_id"], &f["user"]), (&"sensor-1".into(), &"alice".into()), "{connected}");
    mqtt.write_all(&[0xE0, 0x00]).unwrap();
    let gone = ferry.wait_for("MQTT disconnect line", |l| event(l, "MQTT client disconnected"));
    let f = &gone["fields"];
    assert_eq!((&f["peer"], &f["client_id"], &f["user"]), (&peer.into(), &"sensor-1".into(), &"alice".into()));
    assert_eq!(f["reason"], "client disconnected", "{gone}");
    assert!(f["duration"].as_str().is_some_and(|d| d.ends_with('s')), "{gone}");

    // A bad MQTT login.
    let mut mqtt = TcpStream::connect(mqtt_addr).unwrap();
    mqtt.set_read_timeout(Some(PATIENCE)).unwrap();
    let peer = mqtt.local_addr().unwrap().to_string();
    mqtt.write_all(&mqtt_connect("sensor-2", Some(("alice", "wrong")))).unwrap();
    mqtt.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x04], "bad user name or password");
    let refused = ferry.wait_for("MQTT login line", |l| event(l, "MQTT login refused: bad user name or password"));
    assert_eq!((&refused["level"], &refused["fields"]["peer"]), (&"INFO".into(), &peer.into()), "{refused}");

    // An AMQP connection's connect and disconnect lines.
    let mut amqp = amqp_hello(amqp_addr);
    let peer = amqp.local_addr().unwrap().to_string();
    amqp.write_all(&amqp_start_ok("alice", "test12")).unwrap();
    assert_eq!(amqp_read_frame(&mut amqp)[..4], [0, 10, 0, 30], "connection.tune");
    amqp.write_all(&amqp_method(&[0, 10, 0, 31, 0, 0, 0, 2, 0, 0, 0, 0])).unwrap();
    amqp.write_all(&amqp_method(&[0, 10, 0, 40, 1, b'/', 0, 0])).unwrap();
    assert_eq!(amqp_read_frame(&mut amqp)[..4], [0, 10, 0, 41], "connection.open-ok");
    let connected = ferry.wait_for("AMQP connect line", |l| event(l, "AMQP client connected"));
    let f = &connected["fields"];
    assert_eq!((&f["peer"], &f["protocol"], &f["version"]), (&peer.clone().into(), &"AMQP".into(), &"0-9-1".into()));
    assert_eq!((&f["user"], &f["vhost"]), (&"alice".into(), &"/".into()), "{connected}");
    amqp.write_all(&amqp_method(&[0, 10, 0, 50, 0, 200, 3, b'b', b'y', b'e', 0, 0, 0, 0])).unwrap();
    assert_eq!(amqp_read_frame(&mut amqp)[..4], [0, 10, 0, 51], "connection.close-ok");
    let gone = ferry.wait_for("AMQP disconnect line", |l| event(l, "AMQP client disconnected"));
    let f = &gone["fields"];
    assert_eq!((&f["peer"], &f["user"], &f["vhost"]), (&peer.into(), &"alice".into(), &"/".into()), "{gone}");
    assert_eq!(f["reason"], "client closed the connection: 200 bye", "{gone}");
    assert!(f["duration"].is_string(), "{gone}");

    // A bad AMQP login (the socket just closes, as RabbitMQ does).
    let mut amqp = amqp_hello(amqp_addr);
    let peer = amqp.local_addr().unwrap().to_string();
    amqp.write_all(&amqp_start_ok("alice", "wrong")).unwrap();
    let mut rest = Vec::new();
    let _ = amqp.read_to_end(&mut rest);
    let refused = ferry.wait_for("AMQP login line", |l| event(l, "AMQP login refused: bad user name or password"));
    assert_eq!(refused["fields"]["peer"], peer.as_str(), "{refused}");
    assert_eq!(refused["fields"]["mechanism"], "PLAIN", "{refused}");

    // Not AMQP at all.
    let mut amqp = TcpStream::connect(amqp_addr).unwrap();
    amqp.set_read_timeout(Some(PATIENCE)).unwrap();
    let peer = amqp.local_addr().unwrap().to_string();
    amqp.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let _ = amqp.read_to_end(&mut rest);
    let refused =
        ferry.wait_for("AMQP refusal line", |l| event(l, "AMQP connection refused: not an AMQP 0-9-1 protocol header"));
    assert_eq!(refused["fields"]["peer"], peer.as_str(), "{refused}");

    // Plain AMQP on the TLS listener: the handshake fails.
    let mut amqps = TcpStream::connect(amqps_addr).unwrap();
    amqps.set_read_timeout(Some(PATIENCE)).unwrap();
    let peer = amqps.local_addr().unwrap().to_string();
    amqps.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    let _ = amqps.read_to_end(&mut rest);
    let failed = ferry.wait_for("TLS handshake line", |l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["fields"]["message"].as_str().is_some_and(|m| m.starts_with("TLS handshake failed: ")).then_some(v)
    });
    assert_eq!((&failed["level"], &failed["fields"]["peer"]), (&"INFO".into(), &peer.into()), "{failed}");
    assert_eq!(failed["fields"]["listener"], format!("amqp {amqps_addr}"), "{failed}");

    let (status, _) = ferry.stop();
    assert!(status.success(), "{status:?}");
}

#[test]
fn log_file_on_the_command_line_wins_over_the_config_and_gets_the_lines() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "f.toml",
        "[broker]\nlog_file = \"config.log\"\n[[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n",
    );
    // A named pipe: the test reads the lines as they come, with no polling of a file.
    let fifo = dir.path().join("cli.log");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let (opened_tx, opened) = mpsc::channel();
    {
        let fifo = fifo.clone();
        thread::spawn(move || {
            let _ = opened_tx.send(read_lines(std::fs::File::open(fifo).unwrap()));
        });
    }
    let ferry = Serving::start(dir.path(), &["--config", &file, "--log-file", "cli.log"]);
    let lines = opened.recv_timeout(PATIENCE).expect("ferry did not open its --log-file");
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(line) if line.contains("ferry ready") => {
                assert!(line.contains(" INFO "), "text format by default: {line}");
                break;
            }
            Ok(line) => seen.push(line),
            Err(e) => panic!("no ready line in the log file ({e}):\n{}", seen.join("\n")),
        }
    }
    assert!(!dir.path().join("config.log").exists(), "--log-file wins over broker.log_file");
    let (status, stderr) = ferry.stop();
    assert!(status.success(), "{status:?}");
    assert!(stderr.is_empty(), "nothing on stderr: {stderr:?}");
    // The rest of the run, up to the shutdown, went to the file too.
    assert!(lines.iter().any(|l| l.contains("bye")), "no shutdown lines in the log file");
}

#[test]
fn check_config_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "f.toml",
        "[broker]\nmax_connections = 0\n\
         [[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:1883\"\nvhost = \"\"\n\
         [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:5672\"\n\
         tls = { cert = \"missing.pem\", key = \"missing.key\" }\n\
         [[acl]]\nuser = \"carol\"\ntopic = \"a/#\"\naccess = \"read\"\n",
    );
    let out = ferry(dir.path(), &["check-config", &file]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(lines[0].starts_with("ferry: f.toml: broker.max_connections: must be between 1 and "), "{err}");
    assert_eq!(lines[1], "f.toml: listeners[0].vhost: must not be empty", "{err}");
    assert!(lines[2].starts_with("f.toml: acl[0].user: \"carol\" is not a configured user"), "{err}");
    assert!(
        lines[3].starts_with("f.toml: listeners[1].tls.cert: cannot read ") && lines[3].contains("missing.pem"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
}

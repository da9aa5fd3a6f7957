//! Password checks give their memory back (issue 13): argon2id takes 19 MiB per check, and run
//! on tokio's blocking pool 40 logins took the broker from 8 MB to 670 MB of RSS, never given
//! back. The `ferry` binary is run as a user would, and its RSS read from /proc.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use common::{Serving, PATIENCE};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// An MQTT 3.1.1 CONNECT with a user name and password.
fn connect_bytes(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xC2, 0x00, 0x3c];
    for field in [client_id.as_bytes(), user.as_bytes(), password.as_bytes()] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// One login; returns the CONNACK's return code.
fn login(port: u16, n: usize, password: &str) -> u8 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(&connect_bytes(&format!("c{n}"), "alice", password)).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).expect("CONNACK");
    assert_eq!(ack[0], 0x20);
    ack[3]
}

#[test]
fn rss_after_many_logins_stays_where_it_was() {
    const LOGINS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let hash = ferry_core::auth::PasswordHash::argon2id(b"pw");
    let config = format!(
        "[broker]\ndata_dir = \"data\"\n[[users]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n\
         [[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\n"
    );
    std::fs::write(dir.path().join("ferry.toml"), config).unwrap();
    let mut ferry = Serving::start(dir.path(), &["--config", "ferry.toml"]);
    let pid = ferry.pid();
    ferry.wait_for("ferry ready", |l| l.contains("ferry ready").then_some(()));

    let before = rss_kib(pid);
    // Eight clients at a time, more than the checks that run at once; each reads the broker's
    // RSS after its login, while other checks are running.
    let workers: Vec<_> = (0..8)
        .map(|w| {
            thread::spawn(move || {
                let mut peak = 0;
                for n in (w..LOGINS).step_by(8) {
                    assert_eq!(login(port, n, "pw"), 0, "login {n} refused");
                    peak = peak.max(rss_kib(pid));
                }
                peak
            })
        })
        .collect();
    let peak = workers.into_iter().map(|w| w.join().unwrap()).max().unwrap_or(0).max(before);
    // Every connection wound up (its disconnect line is logged at the end of its wind-up).
    for n in 0..LOGINS {
        ferry.wait_for(&format!("disconnect line {n}"), |l| l.contains("MQTT client disconnected").then_some(()));
    }
    let after = rss_kib(pid);
    println!("RSS {before} KiB before {LOGINS} logins, peak {peak} KiB, {after} KiB after");
    // Less than half of one check's 19 MiB: one working set kept would fail it. What remains is
    // the allocator's caches warmed up by the first logins, not growth per login: with jemalloc
    // (the broker's allocator since issue 18) 200 logins left 2.4-4.1 MiB, 800 logins 2.7 MiB
    // (2026-12-06); the old bound of 4 MiB failed once in CI at 4,104 KiB.
    assert!(
        after <= before + 8 * 1024,
        "RSS grew from {before} KiB to {after} KiB over {LOGINS} logins (peak {peak} KiB)"
    );
    // While checking, no more than the checks running at once (2 × 19 MiB) and their clients.
    assert!(peak <= before + 64 * 1024, "RSS peaked at {peak} KiB (from {before} KiB) during the logins");
}

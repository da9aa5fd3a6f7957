//! Users and permissions made through the management API (issue 17) survive a SIGKILL of the
//! `ferry` binary: each answer comes only after its store commit. curl is the HTTP client
//! (SKIPPED when it is not installed).

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use common::Serving;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start(dir: &Path, toml: &str) -> Serving {
    std::fs::write(dir.join("ferry.toml"), toml).unwrap();
    let mut ferry = Serving::start(dir, &["--config", "ferry.toml"]);
    ferry.wait_for("ferry ready", |l| l.contains("ferry ready").then_some(()));
    ferry
}

/// `curl` as `user:password`: the HTTP status and the body.
fn curl(port: u16, user: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-u", user, "-X", method, "-w", "\n%{http_code}", "-H", "content-type: application/json"]);
    if let Some(b) = body {
        cmd.args(["--data-binary", b]);
    }
    let out = cmd.arg(format!("http://127.0.0.1:{port}{path}")).output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("a status line");
    (code.trim().parse().expect("a status"), body.to_string())
}

#[test]
fn users_and_permissions_made_through_the_api_survive_sigkill() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIPPED: curl is not installed");
        return;
    }
    let (http, amqp) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    // No [[users]]: the loopback guest is the administrator.
    let toml = format!(
        "[broker]\ndata_dir = \"data\"\n\
         [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:{amqp}\"\n\
         [[listeners]]\nprotocol = \"http\"\nbind = \"127.0.0.1:{http}\"\n"
    );
    let ferry = start(dir.path(), &toml);
    let user = r#"{"password": "zoe-pw", "tags": "monitoring"}"#;
    assert_eq!(curl(http, "guest:guest", "PUT", "/api/users/zoe", Some(user)).0, 201);
    let perm = r#"{"configure": "^zoe\\.", "write": ".*", "read": ".*"}"#;
    assert_eq!(curl(http, "guest:guest", "PUT", "/api/permissions/%2F/zoe", Some(perm)).0, 201);
    let killed = Command::new("kill").args(["-KILL", &ferry.pid().to_string()]).status().unwrap();
    assert!(killed.success());
    drop(ferry);

    let ferry = start(dir.path(), &toml);
    let (status, me) = curl(http, "zoe:zoe-pw", "GET", "/api/whoami", None);
    assert_eq!((status, me.as_str()), (200, r#"{"name":"zoe","tags":["monitoring"]}"#));
    let (status, defs) = curl(http, "guest:guest", "GET", "/api/definitions", None);
    assert_eq!(status, 200);
    let defs: serde_json::Value = serde_json::from_str(&defs).unwrap();
    assert_eq!(
        defs["permissions"],
        serde_json::json!([{"user": "zoe", "vhost": "/", "configure": "^zoe\\.", "write": ".*", "read": ".*"}])
    );
    // Deleted, then killed again: it stays deleted.
    assert_eq!(curl(http, "guest:guest", "DELETE", "/api/users/zoe", None).0, 204);
    let killed = Command::new("kill").args(["-KILL", &ferry.pid().to_string()]).status().unwrap();
    assert!(killed.success());
    drop(ferry);
    let ferry = start(dir.path(), &toml);
    assert_eq!(curl(http, "zoe:zoe-pw", "GET", "/api/whoami", None).0, 401);
    let (_, defs) = curl(http, "guest:guest", "GET", "/api/definitions", None);
    let defs: serde_json::Value = serde_json::from_str(&defs).unwrap();
    assert_eq!(defs["permissions"], serde_json::json!([]), "its permissions went with it");
    let (status, _) = ferry.stop();
    assert!(status.success());
}

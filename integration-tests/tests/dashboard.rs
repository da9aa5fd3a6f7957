//! The web dashboard at `/` (issue 17).
//!
//! - Served by the HTTP listener without a login, with its security and cache headers, and a
//!   `401` to the dashboard's own requests without the Basic challenge (reqwest).
//! - In headless Chromium, driven through the DevTools protocol over a WebSocket
//!   (tokio-tungstenite, no browser-driving crate): the page loads with no console error, no
//!   exception and no failed request; a bad login is refused on the form; after the login the
//!   queues a test created are listed (one named like HTML, shown as text and never run), the
//!   filter narrows the list, the rate chart moves while an AMQP client publishes, an
//!   administrator closes a connection, the tabs for endpoints this broker may not have
//!   (`/api/mqtt/sessions`, `/api/bridges`, `/api/shovels`) settle on their data or on "not
//!   available"; after logging out, a monitoring user sees connections without a Close
//!   button; credentials that stop working bring the login form back.
//!
//! The browser test needs a `chromium` (Debian's package; `.ci/run` installs it). Without one
//! it prints SKIPPED and passes, except under `CI=true`, where it fails: CI must run it.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use ferry_integration_tests::amqp::reply_code;
use ferry_integration_tests::{within, TestServer};
use futures_util::{SinkExt, StreamExt};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Event};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// The password of `watcher`, a `monitoring` user.
const WATCHER_PASSWORD: &str = "w4tch";

/// An MQTT listener (0), an AMQP listener (1) and an HTTP listener (2), on loopback, where
/// `guest` / `guest` is an administrator of the HTTP API; and `watcher`, a monitoring user.
async fn server() -> TestServer {
    let hash = ferry_core::auth::PasswordHash::argon2id(WATCHER_PASSWORD.as_bytes());
    let toml = format!(
        "[[users]]\nname = \"watcher\"\npassword_hash = \"{hash}\"\ntags = [\"monitoring\"]\n\
         [[listeners]]\nprotocol = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"amqp\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nprotocol = \"http\"\nbind = \"127.0.0.1:0\"\n"
    );
    let frontends = ferry_server::frontends::builtin(&Default::default());
    TestServer::start(&toml, &frontends).await
}

#[tokio::test]
async fn the_page_and_its_files_are_served_without_login_with_security_headers() {
    let server = server().await;
    let base = format!("http://{}", server.server.http_addrs()[0]);
    let client = reqwest::Client::new();
    let get = |path: &'static str| within(path, client.get(format!("{base}{path}")).send());

    let page = get("/").await.expect("GET /");
    assert_eq!(page.status(), 200);
    let h = page.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline") && !csp.contains("http"), "{csp}");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["cache-control"], "no-cache");
    let body = page.text().await.unwrap();
    assert!(body.contains("/static/app.js") && body.contains("id=\"login-form\""), "{body}");

    for (path, kind) in [
        ("/static/app.js", "text/javascript; charset=utf-8"),
        ("/static/style.css", "text/css; charset=utf-8"),
        ("/static/favicon.svg", "image/svg+xml"),
    ] {
        let r = get(path).await.expect("GET");
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], kind, "{path}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{path}");
        // The browser's copy is revalidated, and answered 304 while it is current.
        let etag = r.headers()["etag"].clone();
        let again =
            within(path, client.get(format!("{base}{path}")).header("if-none-match", etag).send()).await.unwrap();
        assert_eq!(again.status(), 304, "{path}");
    }
    let missing = get("/static/nothing.js").await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["x-frame-options"], "DENY");

    // The API still asks for credentials; the dashboard's requests get no Basic challenge (it
    // would open the browser's own login dialog over the page's form).
    let plain = get("/api/overview").await.unwrap();
    assert_eq!(plain.status(), 401);
    assert_eq!(plain.headers()["www-authenticate"], "Basic realm=\"Ferry\"");
    let scripted =
        within("GET", client.get(format!("{base}/api/overview")).header("X-Requested-With", "XMLHttpRequest").send())
            .await
            .unwrap();
    assert_eq!(scripted.status(), 401);
    assert!(scripted.headers().get("www-authenticate").is_none());
    assert_eq!(scripted.json::<Value>().await.unwrap()["error"], "not_authorized");
}

// ----- the browser -------------------------------------------------------------------------

/// The Chromium binary on PATH (or `FERRY_CHROMIUM`), if any.
fn chromium() -> Option<std::path::PathBuf> {
    if let Some(given) = std::env::var_os("FERRY_CHROMIUM") {
        return Some(given.into());
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// How long one step in the browser may take (a debug broker and a browser on a loaded machine).
const STEP: Duration = Duration::from_secs(20);

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Headless Chromium with one page, driven through the DevTools protocol; killed on drop.
struct Browser {
    child: std::process::Child,
    _profile: tempfile::TempDir,
    socket: Socket,
    next_id: u64,
    /// The page's session (flattened target sessions).
    session: String,
    /// Every event of the page received so far.
    events: Vec<Value>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn launch(binary: &std::path::Path) -> Browser {
        let profile = tempfile::tempdir().expect("profile directory");
        let mut child = std::process::Command::new(binary)
            .args([
                "--headless=new",
                // Root (CI) cannot use the sandbox; the page is our own.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        // "DevTools listening on ws://…" on stderr is the event waited for; a thread reads
        // stderr to its end (so that it never blocks on a full pipe) and keeps the rest for a
        // failure message.
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut seen = Vec::new();
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                match line.strip_prefix("DevTools listening on ") {
                    Some(url) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(Ok(url.trim().to_string()));
                        }
                    }
                    None if tx.is_some() => seen.push(line),
                    None => {}
                }
            }
            if let Some(tx) = tx.take() {
                let _ = tx.send(Err(seen.join("\n")));
            }
        });
        let url = match within("chromium's DevTools address", rx).await {
            Ok(Ok(url)) => url,
            Ok(Err(log)) => panic!("chromium exited without a DevTools address:\n{log}"),
            Err(_) => panic!("chromium's stderr reader ended"),
        };
        let (socket, _) = within("DevTools WebSocket", tokio_tungstenite::connect_async(url.as_str()))
            .await
            .expect("connect to DevTools");
        let mut browser =
            Browser { child, _profile: profile, socket, next_id: 0, session: String::new(), events: Vec::new() };
        let target = browser.browser_call("Target.createTarget", json!({"url": "about:blank"})).await;
        let target = target["targetId"].as_str().expect("targetId").to_string();
        let attached =
            browser.browser_call("Target.attachToTarget", json!({"targetId": target, "flatten": true})).await;
        browser.session = attached["sessionId"].as_str().expect("sessionId").to_string();
        for domain in ["Runtime.enable", "Log.enable", "Network.enable", "Page.enable"] {
            browser.call(domain, json!({})).await;
        }
        browser
    }

    /// A command to the browser itself.
    async fn browser_call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None).await
    }

    /// A command to the page.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(method, params, Some(session)).await
    }

    async fn send(&mut self, method: &str, params: Value, session: Option<String>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            command["sessionId"] = Value::String(session);
        }
        self.socket.send(Message::text(command.to_string())).await.expect("send to DevTools");
        loop {
            let message = self.socket.next().await.expect("DevTools closed").expect("DevTools read");
            let Message::Text(text) = message else { continue };
            let v: Value = serde_json::from_str(text.as_str()).expect("DevTools sends JSON");
            if v["id"] == id {
                if let Some(error) = v.get("error") {
                    panic!("{method}: {error}");
                }
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Waits for the page's event `method` (one received before counts).
    async fn wait_event(&mut self, method: &str) {
        let seen = |events: &[Value]| events.iter().any(|e| e["method"] == method);
        within(method, async {
            while !seen(&self.events) {
                let message = self.socket.next().await.expect("DevTools closed").expect("DevTools read");
                let Message::Text(text) = message else { continue };
                let v: Value = serde_json::from_str(text.as_str()).expect("DevTools sends JSON");
                if v.get("method").is_some() {
                    self.events.push(v);
                }
            }
        })
        .await;
    }

    /// Evaluates `expression` in the page (awaiting a promise), its value as JSON.
    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true, "awaitPromise": true}))
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: threw {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `condition` (a JS expression) is truthy in the page, checked at once and at
    /// every change of the document (a MutationObserver: no polling); its value.
    async fn wait_for(&mut self, what: &str, condition: &str) -> Value {
        let expression = format!(
            "new Promise((resolve) => {{
                let observer = null;
                const check = () => {{
                    let v = false;
                    try {{ v = ({condition}); }} catch (e) {{ v = false; }}
                    if (v) {{ if (observer) observer.disconnect(); resolve(v); return true; }}
                    return false;
                }};
                if (!check()) {{
                    observer = new MutationObserver(check);
                    observer.observe(document, {{ subtree: true, childList: true, attributes: true, characterData: true }});
                }}
            }})"
        );
        match tokio::time::timeout(STEP, self.eval(&expression)).await {
            Ok(v) => v,
            Err(_) => {
                let page = self.eval("document.body.innerText").await;
                panic!("{what}: not within {STEP:?}; the page shows:\n{}", page.as_str().unwrap_or_default());
            }
        }
    }

    /// Console errors, exceptions and failed requests so far, but for the `allowed` ones
    /// (a URL ending and its status).
    fn problems(&self, allowed: &[(&str, u16)]) -> Vec<String> {
        let allowed_url = |url: &str, status: Option<u16>| {
            allowed
                .iter()
                .any(|(end, s)| url.split('?').next().unwrap_or(url).ends_with(end) && status.is_none_or(|x| x == *s))
        };
        // Request ids of allowed answers, to let their "failed to load" lines through.
        let mut urls = std::collections::HashMap::new();
        let mut found = Vec::new();
        for e in &self.events {
            let p = &e["params"];
            match e["method"].as_str().unwrap_or_default() {
                "Runtime.exceptionThrown" => found.push(format!("exception: {}", p["exceptionDetails"])),
                "Runtime.consoleAPICalled" if matches!(p["type"].as_str(), Some("error" | "assert" | "warning")) => {
                    found.push(format!("console.{}: {}", p["type"], p["args"]))
                }
                "Log.entryAdded" if matches!(p["entry"]["level"].as_str(), Some("error" | "warning")) => {
                    let url = p["entry"]["url"].as_str().unwrap_or_default();
                    if !(p["entry"]["source"] == "network" && allowed_url(url, None)) {
                        found.push(format!("log: {}", p["entry"]));
                    }
                }
                "Network.requestWillBeSent" => {
                    urls.insert(
                        p["requestId"].to_string(),
                        p["request"]["url"].as_str().unwrap_or_default().to_string(),
                    );
                }
                "Network.responseReceived" => {
                    let status = p["response"]["status"].as_u64().unwrap_or(0) as u16;
                    let url = p["response"]["url"].as_str().unwrap_or_default();
                    if status >= 400 && !allowed_url(url, Some(status)) {
                        found.push(format!("HTTP {status}: {url}"));
                    }
                }
                "Network.loadingFailed" => {
                    let url = urls.get(&p["requestId"].to_string()).cloned().unwrap_or_default();
                    found.push(format!("request failed: {url}: {}", p["errorText"]));
                }
                _ => {}
            }
        }
        found
    }

    /// Events so far are read; [`Browser::problems`] looks only at later ones.
    fn forget_events(&mut self) {
        self.events.clear();
    }

    /// Sets an input's value and fires its `input` and `change` events, as typing does.
    async fn set_value(&mut self, id: &str, value: &str) {
        let (id, value) = (json!(id), json!(value));
        self.eval(&format!(
            "(() => {{ const e = document.getElementById({id}); e.value = {value};
               e.dispatchEvent(new Event('input', {{bubbles: true}}));
               e.dispatchEvent(new Event('change', {{bubbles: true}})); return true; }})()"
        ))
        .await;
    }
}

async fn amqp(addr: SocketAddr, name: &str) -> lapin::Connection {
    let uri = format!("amqp://guest:guest@{addr}/%2f");
    let properties = lapin::ConnectionProperties::default().with_connection_name(name.into());
    within("lapin connects", lapin::Connection::connect(&uri, properties)).await.expect("connect")
}

/// A queue named like markup: shown as text, never run.
const HOSTILE_QUEUE: &str = "<img src=x onerror=\"window.__ferry_xss=1\">";

#[tokio::test]
async fn the_dashboard_in_chromium_lists_queues_charts_rates_and_closes_connections() {
    let Some(binary) = chromium() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and no chromium on PATH: the dashboard's browser test must run in CI (apt-get install -y chromium)");
        }
        println!("SKIPPED: no chromium on PATH (apt-get install -y chromium runs this test)");
        return;
    };
    let server = server().await;

    // The dashboard as the HTTP listener serves it, on a management instance of the same broker
    // that samples rates every 200 ms instead of every 5 s, so that the chart moves quickly.
    let (_stop, shutdown) = ferry_core::frontend::Shutdown::channel();
    let management = ferry_management::Management::start_with_interval(
        server.server.broker().clone(),
        server.server.bridges().status_reader(),
        Vec::new(),
        shutdown.clone(),
        Duration::from_millis(200),
    );
    if let Some(mqtt) = server.server.mqtt() {
        management.set_mqtt(mqtt.clone());
    }
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tcp.local_addr().unwrap();
    let settings = ferry_management::HttpSettings {
        name: format!("http {http}"),
        max_connections: 64,
        header_timeout: Duration::from_secs(10),
        metrics_max_queues: 1000,
        auth: ferry_core::auth::AuthPolicy { anonymous: false, guest: true, cert_login: None },
        grace: Duration::from_secs(1),
    };
    let _serving = management.serve(tcp, None, settings, shutdown);

    let publisher = amqp(server.addr(1), "dashboard-publisher").await;
    let mut events = publisher.events_listener();
    let ch = within("channel", publisher.create_channel()).await.unwrap();
    for queue in ["dashboard-orders", "dashboard-invoices", HOSTILE_QUEUE] {
        within("declare", ch.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default()))
            .await
            .expect("queue.declare");
    }

    let mut browser = Browser::launch(&binary).await;

    // (a) The page loads with no console error and no failed request, on the login form.
    browser.call("Page.navigate", json!({"url": format!("http://{http}/")})).await;
    browser.wait_event("Page.loadEventFired").await;
    browser
        .wait_for("the login form", "!document.getElementById('login').hidden && document.readyState === 'complete'")
        .await;
    let problems = browser.problems(&[]);
    assert!(problems.is_empty(), "loading the page: {problems:#?}");
    browser.forget_events();

    // A wrong password stays on the form, saying so (its 401 is the one failed request).
    browser.set_value("login-user", "guest").await;
    browser.set_value("login-password", "wrong").await;
    browser.eval("document.getElementById('login-form').requestSubmit(), true").await;
    let refused = browser.wait_for("the refusal", "document.getElementById('login-error').textContent").await;
    assert!(refused.as_str().unwrap().starts_with("Login failed"), "{refused}");
    assert!(browser.problems(&[("/api/whoami", 401)]).is_empty(), "{:#?}", browser.problems(&[("/api/whoami", 401)]));
    browser.forget_events();

    // (b) Logged in, the queues the test made are listed; the hostile name is text.
    browser.set_value("login-user", "guest").await;
    browser.set_value("login-password", "guest").await;
    browser.eval("document.getElementById('login-form').requestSubmit(), true").await;
    browser.wait_for("the login", "document.body.dataset.user === 'guest'").await;
    browser.set_value("refresh", "1").await;
    browser.eval("location.hash = '#queues', true").await;
    let rows = "[...document.querySelectorAll('#queue-list tbody tr')].map((r) => r.dataset.queue)";
    let listed = browser
        .wait_for("the queues", &format!("{rows}.includes('dashboard-orders') && {rows}.length >= 3 && {rows}"))
        .await;
    assert!(listed.as_array().unwrap().iter().any(|q| q == HOSTILE_QUEUE), "{listed}");
    let hostile = browser
        .eval(&format!(
            "[[...document.querySelectorAll('#queue-list td.name')].some((td) => td.textContent === {}),
              document.querySelectorAll('#queue-list img').length, typeof window.__ferry_xss]",
            json!(HOSTILE_QUEUE)
        ))
        .await;
    assert_eq!(hostile, json!([true, 0, "undefined"]), "the hostile queue name must be shown as text");

    // The filter narrows the list (the API's name filter).
    browser.set_value("queue-name", "orders").await;
    browser.wait_for("the filtered list", &format!("{rows}.length === 1 && {rows}[0] === 'dashboard-orders'")).await;

    // (c) The rate chart moves while a client publishes.
    browser.eval("location.hash = '#overview', true").await;
    let chart = "document.getElementById('rates-chart')";
    browser.wait_for("the chart's first points", &format!("Number({chart}.dataset.points) >= 2")).await;
    let before = browser.eval(&format!("[{chart}.dataset.publish, {chart}.toDataURL()]")).await;
    assert_eq!(before[0], "0", "nothing published yet");
    let publishing = {
        let ch = ch.clone();
        tokio::spawn(async move {
            // About 200 messages a second: a rate the chart shows, at little cost to the machine.
            let mut pace = tokio::time::interval(Duration::from_millis(5));
            loop {
                pace.tick().await;
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        "dashboard-orders".into(),
                        BasicPublishOptions::default(),
                        b"order",
                        BasicProperties::default(),
                    )
                    .await;
                if confirm.is_err() {
                    break;
                }
            }
        })
    };
    let rate = browser
        .wait_for(
            "a publish rate on the chart",
            &format!("Number({chart}.dataset.publish) > 0 && {chart}.dataset.publish"),
        )
        .await;
    let after = browser.eval(&format!("{chart}.toDataURL()")).await;
    assert_ne!(after, before[1], "the chart's drawing did not change with a publish rate of {rate}");
    let legend = browser.eval("document.getElementById('rates-legend').textContent").await;
    assert!(legend.as_str().unwrap().contains("/s"), "{legend}");
    publishing.abort();

    // An administrator closes a connection from the connections tab (two clicks: no dialog).
    let name = "[...document.querySelectorAll('#connection-list tbody tr')].find((r) => r.textContent.includes('dashboard-publisher'))";
    browser.eval("location.hash = '#connections', true").await;
    browser.wait_for("the publisher's connection", name).await;
    browser.eval(&format!("(window.__ferry_first = {name}.querySelector('button')).click(), true")).await;
    // The confirmation outlives the table's refresh (a new button, still asking to confirm).
    browser
        .wait_for(
            "the confirmation after a refresh",
            &format!(
                "{name}.querySelector('button') !== window.__ferry_first
                 && {name}.querySelector('button').textContent === 'Confirm close'"
            ),
        )
        .await;
    browser.eval(&format!("{name}.querySelector('button').click(), true")).await;
    browser
        .wait_for(
            "the connection gone",
            &format!("!{name} && document.getElementById('connection-list').dataset.state === 'loaded'"),
        )
        .await;
    let error = within("connection.close", async {
        loop {
            match events.next().await {
                Some(Event::Error(e)) => return e,
                Some(_) => {}
                None => panic!("events ended without an error"),
            }
        }
    })
    .await;
    assert_eq!(reply_code(&error), Some(320), "{error:?}");
    assert!(format!("{error:?}").contains("Closed via the Ferry dashboard"), "{error:?}");

    // The MQTT sessions, bridges and shovels tabs show their lists.
    let optional = [];
    browser.eval("location.hash = '#sessions', true").await;
    browser.wait_for("the sessions tab", "document.getElementById('session-list').dataset.state === 'loaded'").await;
    browser.eval("location.hash = '#bridges', true").await;
    for list in ["bridge-list", "shovel-list"] {
        browser.wait_for(list, &format!("document.getElementById('{list}').dataset.state === 'loaded'")).await;
    }
    let problems = browser.problems(&optional);
    assert!(problems.is_empty(), "after the login: {problems:#?}");
    browser.forget_events();

    // Logging out forgets the credentials; a monitoring user sees connections but gets no
    // Close button.
    let _watched = amqp(server.addr(1), "dashboard-watched").await;
    browser.eval("document.getElementById('logout').click(), true").await;
    browser.wait_for("the login form again", "!document.getElementById('login').hidden").await;
    assert_eq!(browser.eval("sessionStorage.length").await, 0);
    browser.set_value("login-user", "watcher").await;
    browser.set_value("login-password", WATCHER_PASSWORD).await;
    browser.eval("document.getElementById('login-form').requestSubmit(), true").await;
    browser.wait_for("the monitoring user's login", "document.body.dataset.user === 'watcher'").await;
    browser.eval("location.hash = '#connections', true").await;
    let watched =
        "[...document.querySelectorAll('#connection-list tbody tr')].find((r) => r.textContent.includes('dashboard-watched'))";
    browser
        .wait_for(
            "the watched connection",
            &format!(
                "{watched} && document.getElementById('tabs').querySelector('.active').dataset.tab === 'connections'"
            ),
        )
        .await;
    let buttons = browser.eval("document.querySelectorAll('#connection-list button').length").await;
    assert_eq!(buttons, 0, "a monitoring user may not close connections");
    let problems = browser.problems(&optional);
    assert!(problems.is_empty(), "as a monitoring user: {problems:#?}");

    // Credentials the API no longer accepts (a password changed, say): back to the login form.
    browser.eval("sessionStorage.setItem('ferry.authorization', 'Basic d2F0Y2hlcjpvbGQ='), true").await;
    let why = browser
        .wait_for(
            "the login form after a 401",
            "!document.getElementById('login').hidden && document.getElementById('login-error').textContent",
        )
        .await;
    assert!(why.as_str().unwrap().starts_with("Logged out"), "{why}");
}

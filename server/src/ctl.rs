//! `ferry ctl`: a small synchronous client of the management API (docs/management.md), for
//! operators at a shell: list queues, exchanges, bindings, connections, MQTT sessions, bridges
//! and shovels as tables aligned like `rabbitmqadmin`'s (or as JSON), purge and delete a queue,
//! close a connection, export and import the definitions.
//!
//! Every request is one HTTP call with Basic credentials (`--user` / `--password`, or
//! `FERRY_CTL_USER` / `FERRY_CTL_PASSWORD`; RabbitMQ's `guest` / `guest` when neither is given
//! and the URL is a loopback one), over rustls for `https` URLs, within `--timeout`. Answers are
//! read up to [`MAX_BODY`]. Names in paths are percent-encoded (the vhost `/` is `%2F`).
//! Errors say what went wrong in the operator's terms and make the process exit with 1.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use clap::{Args, Subcommand, ValueEnum};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;

/// The largest answer read (10,000 queues listed take 5.6 MB; see docs/management.md).
pub const MAX_BODY: u64 = 256 * 1024 * 1024;

/// The largest definitions file imported.
pub const MAX_IMPORT: u64 = 64 * 1024 * 1024;

/// What stays as it is in a path segment: RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// `ferry ctl`'s options and command.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The management API's base URL (an HTTP listener of Ferry, or RabbitMQ's).
    #[arg(long, global = true, env = "FERRY_CTL_URL", default_value = "http://127.0.0.1:15672", value_name = "URL")]
    pub url: String,

    /// The user to log in as [default: guest, for a loopback URL].
    #[arg(long, short = 'u', global = true, env = "FERRY_CTL_USER", value_name = "USER")]
    pub user: Option<String>,

    /// Its password (FERRY_CTL_PASSWORD keeps it out of the process list).
    #[arg(
        long,
        short = 'p',
        global = true,
        env = "FERRY_CTL_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub password: Option<String>,

    /// How lists are printed.
    #[arg(long, short = 'f', global = true, value_enum, default_value_t = Format::Table)]
    pub format: Format,

    /// For https URLs: trust the CA certificates of this PEM file instead of the built-in
    /// Mozilla roots (a broker with its own CA).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// Give up on a request after this many seconds.
    #[arg(long, global = true, default_value_t = 10, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,

    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List objects of one kind.
    List {
        #[arg(value_enum)]
        kind: Kind,
        /// Only those of this vhost.
        #[arg(long, value_name = "VHOST")]
        vhost: Option<String>,
    },
    /// Remove every ready message of a queue.
    Purge {
        #[command(subcommand)]
        target: QueueTarget,
    },
    /// Delete a queue with its messages.
    Delete {
        #[command(subcommand)]
        target: QueueTarget,
    },
    /// Close a connection (its client is told the reason where its protocol can say it).
    Close {
        #[command(subcommand)]
        target: ConnectionTarget,
    },
    /// Write the definitions (GET /api/definitions) to FILE ("-": standard output).
    Export {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Add the definitions of FILE (POST /api/definitions; "-": standard input).
    Import {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueTarget {
    /// A queue, by name.
    Queue {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(long, default_value = "/", value_name = "VHOST")]
        vhost: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConnectionTarget {
    /// A connection, by the name `list connections` shows.
    Connection {
        #[arg(value_name = "NAME")]
        name: String,
        /// What the client is told (MQTT 5.0 DISCONNECT reason string, AMQP close text).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
}

/// What `list` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Queues,
    Exchanges,
    Bindings,
    Connections,
    Sessions,
    Bridges,
    Shovels,
}

/// How a cell is made from an item's value.
#[derive(Debug, Clone, Copy)]
enum Cell {
    Plain,
    /// A rate per second, one decimal.
    Rate,
    /// MQTT subscriptions `[{filter, qos}]` as `filter (qos), …`.
    Subscriptions,
}

/// A column: its header and the dotted paths tried in turn for its value.
struct Column {
    header: &'static str,
    paths: &'static [&'static str],
    cell: Cell,
}

const fn col(header: &'static str, paths: &'static [&'static str]) -> Column {
    Column { header, paths, cell: Cell::Plain }
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Queues => "/api/queues",
            Kind::Exchanges => "/api/exchanges",
            Kind::Bindings => "/api/bindings",
            Kind::Connections => "/api/connections",
            Kind::Sessions => "/api/mqtt/sessions",
            Kind::Bridges => "/api/bridges",
            Kind::Shovels => "/api/shovels",
        }
    }

    /// Whether the API serves the kind per vhost (`/api/queues/{vhost}`, as RabbitMQ);
    /// otherwise `--vhost` filters the list here.
    fn per_vhost_path(self) -> bool {
        matches!(self, Kind::Queues | Kind::Exchanges | Kind::Bindings)
    }

    fn columns(self) -> &'static [Column] {
        match self {
            Kind::Queues => {
                const C: &[Column] = &[
                    col("vhost", &["vhost"]),
                    col("name", &["name"]),
                    col("messages", &["messages"]),
                    col("ready", &["messages_ready"]),
                    col("unacked", &["messages_unacknowledged"]),
                    col("consumers", &["consumers"]),
                    Column { header: "publish/s", paths: &["message_stats.publish_details.rate"], cell: Cell::Rate },
                    Column {
                        header: "deliver/s",
                        paths: &["message_stats.deliver_get_details.rate"],
                        cell: Cell::Rate,
                    },
                ];
                C
            }
            Kind::Exchanges => {
                const C: &[Column] = &[
                    col("vhost", &["vhost"]),
                    col("name", &["name"]),
                    col("type", &["type"]),
                    col("durable", &["durable"]),
                    col("auto_delete", &["auto_delete"]),
                    col("internal", &["internal"]),
                ];
                C
            }
            Kind::Bindings => {
                const C: &[Column] = &[
                    col("vhost", &["vhost"]),
                    col("source", &["source"]),
                    col("destination", &["destination"]),
                    col("destination_type", &["destination_type"]),
                    col("routing_key", &["routing_key"]),
                ];
                C
            }
            Kind::Connections => {
                const C: &[Column] = &[
                    col("name", &["name"]),
                    col("protocol", &["protocol"]),
                    col("user", &["user"]),
                    col("vhost", &["vhost"]),
                    col(
                        "client id",
                        &["ferry.client_id", "client_properties.client_id", "client_properties.connection_name"],
                    ),
                    col("ssl", &["ssl"]),
                    col("channels", &["channels"]),
                    col("recv bytes", &["recv_oct"]),
                    col("sent bytes", &["send_oct"]),
                ];
                C
            }
            Kind::Sessions => {
                const C: &[Column] = &[
                    col("vhost", &["vhost"]),
                    col("client id", &["client_id"]),
                    col("user", &["user"]),
                    col("connected", &["connected"]),
                    col("messages", &["messages"]),
                    Column { header: "subscriptions", paths: &["subscriptions"], cell: Cell::Subscriptions },
                ];
                C
            }
            Kind::Bridges => {
                const C: &[Column] = &[
                    col("name", &["name"]),
                    col("state", &["state"]),
                    col("remote", &["remote"]),
                    col("queued", &["queued"]),
                    col("in flight", &["in_flight"]),
                    col("forwarded", &["forwarded"]),
                    col("dropped", &["dropped"]),
                ];
                C
            }
            Kind::Shovels => {
                const C: &[Column] = &[
                    col("vhost", &["vhost"]),
                    col("name", &["name"]),
                    col("type", &["type"]),
                    col("state", &["state"]),
                    col("source", &["src_uri"]),
                    col("from", &["src_queue", "src_exchange"]),
                    col("destination", &["dest_uri"]),
                    col("to", &["dest_queue", "dest_exchange"]),
                ];
                C
            }
        }
    }
}

/// Why a command failed; each prints as one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("login refused for user {user:?}: {reason}")]
    LoginRefused { user: String, reason: String },
    #[error("refused for user {user:?}: {reason}")]
    Refused { user: String, reason: String },
    #[error("this server does not serve {path}")]
    Unserved { path: String },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("{method} {path}: HTTP {status}: {reason}")]
    Http { method: &'static str, path: String, status: u16, reason: String },
    #[error("{0}")]
    Io(String),
}

/// The management API at one base URL, as one user.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    user: String,
    authorization: String,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("base", &self.base).field("user", &self.user).finish_non_exhaustive()
    }
}

/// A request's method, and its body for POST.
enum Method<'a> {
    Get,
    Delete { reason: Option<&'a str> },
    Post { json: Vec<u8> },
}

impl Method<'_> {
    fn name(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Delete { .. } => "DELETE",
            Method::Post { .. } => "POST",
        }
    }
}

/// What a 404 means for the request: a path the server does not have at all, or an object
/// that is not there.
enum Missing<'a> {
    Endpoint,
    Object(&'a str),
}

/// One path segment, percent-encoded.
pub fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// Whether the URL's host is a loopback address (or `localhost`).
fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Client {
    pub fn new(args: &CtlArgs) -> Result<Client, CtlError> {
        let base = args.url.trim_end_matches('/').to_string();
        let lower = base.to_ascii_lowercase();
        if !lower.starts_with("http://") && !lower.starts_with("https://") {
            return Err(CtlError::Usage(format!("--url {base}: an http:// or https:// URL")));
        }
        let (user, password) = match (&args.user, &args.password) {
            (Some(u), Some(p)) => (u.clone(), p.clone()),
            (Some(u), None) => {
                return Err(CtlError::Usage(format!(
                    "no password for user {u:?}: give --password or FERRY_CTL_PASSWORD"
                )))
            }
            (None, _) if is_loopback(&base) => ("guest".to_string(), "guest".to_string()),
            (None, _) => {
                return Err(CtlError::Usage(format!(
                    "no user for {base}: give --user and --password (or FERRY_CTL_USER and FERRY_CTL_PASSWORD); \
                     guest / guest is the default only for a loopback URL"
                )))
            }
        };
        let mut tls = ureq::tls::TlsConfig::builder().provider(ureq::tls::TlsProvider::Rustls);
        if let Some(ca) = &args.ca {
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(read_ca(ca)?)));
        }
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(args.timeout)))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("ferry-ctl/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .build();
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Ok(Client { agent: config.into(), base, user, authorization: format!("Basic {token}") })
    }

    /// Sends one request; the answer's status and body when it is a success.
    fn call(&self, method: Method<'_>, path: &str, missing: Missing<'_>) -> Result<String, CtlError> {
        let url = format!("{}{path}", self.base);
        let auth = self.authorization.as_str();
        let sent = match &method {
            Method::Get => self.agent.get(&url).header("authorization", auth).call(),
            Method::Delete { reason } => {
                let mut r = self.agent.delete(&url).header("authorization", auth);
                if let Some(reason) = reason {
                    r = r.header("x-reason", *reason);
                }
                r.call()
            }
            Method::Post { json } => self
                .agent
                .post(&url)
                .header("authorization", auth)
                .header("content-type", "application/json")
                .send(&json[..]),
        };
        let mut answer = sent.map_err(|e| match e {
            ureq::Error::Io(io) => CtlError::Unreachable { url: self.base.clone(), reason: io.to_string() },
            other => CtlError::Unreachable { url: self.base.clone(), reason: other.to_string() },
        })?;
        let status = answer.status().as_u16();
        let body = answer.body_mut().with_config().limit(MAX_BODY).read_to_string().map_err(|e| {
            CtlError::Unreachable { url: self.base.clone(), reason: format!("reading the answer to {path}: {e}") }
        })?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let reason = error_reason(&body);
        Err(match status {
            401 if reason.starts_with("Login failed") || reason.is_empty() => {
                CtlError::LoginRefused { user: self.user.clone(), reason }
            }
            401 | 403 => CtlError::Refused { user: self.user.clone(), reason },
            404 => match missing {
                Missing::Endpoint => CtlError::Unserved { path: path.split('?').next().unwrap_or(path).to_string() },
                Missing::Object(what) => CtlError::NotFound(what.to_string()),
            },
            429 => CtlError::LoginRefused { user: self.user.clone(), reason: format!("throttled ({reason})") },
            _ => CtlError::Http { method: method.name(), path: path.to_string(), status, reason },
        })
    }

    /// GETs a JSON list (a bare array, or RabbitMQ's page object's `items`).
    fn list(&self, path: &str) -> Result<Vec<Value>, CtlError> {
        let body = self.call(Method::Get, path, Missing::Endpoint)?;
        match parse_json(&body, path)? {
            Value::Array(items) => Ok(items),
            Value::Object(mut o) => match o.remove("items") {
                Some(Value::Array(items)) => Ok(items),
                _ => Err(CtlError::Io(format!("{path}: the answer is not a list"))),
            },
            _ => Err(CtlError::Io(format!("{path}: the answer is not a list"))),
        }
    }
}

fn parse_json(body: &str, path: &str) -> Result<Value, CtlError> {
    serde_json::from_str(body).map_err(|e| CtlError::Io(format!("{path}: the answer is not JSON: {e}")))
}

/// RabbitMQ's `reason` (or `error`) from an error answer, else its first 200 characters.
fn error_reason(body: &str) -> String {
    if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(body) {
        for key in ["reason", "error"] {
            if let Some(Value::String(s)) = o.get(key) {
                return printable(s);
            }
        }
    }
    printable(&body.chars().take(200).collect::<String>()).trim().to_string()
}

fn read_ca(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, CtlError> {
    let pem = std::fs::read(path).map_err(|e| CtlError::Io(format!("--ca {}: {e}", path.display())))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => return Err(CtlError::Io(format!("--ca {}: {e}", path.display()))),
        }
    }
    if certs.is_empty() {
        return Err(CtlError::Io(format!("--ca {}: no PEM certificate in it", path.display())));
    }
    Ok(certs)
}

/// Control characters (a name may hold any) shown escaped, so that a table cannot move the
/// terminal's cursor.
fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars().map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() }).collect()
}

/// The value at a dotted path.
fn at<'a>(item: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(item, |v, key| v.get(key)).filter(|v| !v.is_null())
}

fn cell(item: &Value, column: &Column) -> String {
    let Some(v) = column.paths.iter().find_map(|p| at(item, p)) else { return String::new() };
    let text = match (column.cell, v) {
        (Cell::Rate, Value::Number(n)) => format!("{:.1}", n.as_f64().unwrap_or_default()),
        (Cell::Subscriptions, Value::Array(subs)) => subs
            .iter()
            .map(|s| match (s.get("filter").and_then(Value::as_str), s.get("qos")) {
                (Some(f), Some(q)) => format!("{f} ({q})"),
                _ => s.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", "),
        (_, Value::String(s)) => s.clone(),
        (_, other) => other.to_string(),
    };
    printable(&text)
}

/// The items as a table framed like rabbitmqadmin's (`No items` for none).
pub fn table(kind: Kind, items: &[Value]) -> String {
    if items.is_empty() {
        return "No items\n".to_string();
    }
    let columns = kind.columns();
    let rows: Vec<Vec<String>> = items.iter().map(|i| columns.iter().map(|c| cell(i, c)).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(n, c)| rows.iter().map(|r| r[n].chars().count()).chain([c.header.len()]).max().unwrap_or(0))
        .collect();
    let rule: String = widths.iter().map(|w| format!("+{}", "-".repeat(w + 2))).collect::<String>() + "+\n";
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        cells.zip(&widths).map(|(c, w)| format!("| {c}{} ", " ".repeat(w - c.chars().count()))).collect::<String>()
            + "|\n"
    };
    let mut out = rule.clone();
    out += &line(&mut columns.iter().map(|c| c.header));
    out += &rule;
    for r in &rows {
        out += &line(&mut r.iter().map(String::as_str));
    }
    out += &rule;
    out
}

/// Runs one `ferry ctl` command, printing its result to standard output.
pub fn run(args: &CtlArgs) -> Result<(), CtlError> {
    let client = Client::new(args)?;
    let mut stdout = std::io::stdout().lock();
    let out = |stdout: &mut std::io::StdoutLock<'_>, text: &str| {
        stdout.write_all(text.as_bytes()).map_err(|e| CtlError::Io(format!("standard output: {e}")))
    };
    match &args.command {
        CtlCommand::List { kind, vhost } => {
            let mut path = kind.path().to_string();
            if let (Some(v), true) = (vhost, kind.per_vhost_path()) {
                path = format!("{path}/{}", segment(v));
            }
            let mut items = client.list(&path)?;
            if let (Some(v), false) = (vhost, kind.per_vhost_path()) {
                items.retain(|i| i.get("vhost").and_then(Value::as_str) == Some(v.as_str()));
            }
            let text = match args.format {
                Format::Table => table(*kind, &items),
                Format::Json => pretty(&Value::Array(items)),
            };
            out(&mut stdout, &text)
        }
        CtlCommand::Purge { target: QueueTarget::Queue { name, vhost } } => {
            let path = format!("/api/queues/{}/{}/contents", segment(vhost), segment(name));
            let what = format!("queue {name:?} in vhost {vhost:?}");
            client.call(Method::Delete { reason: None }, &path, Missing::Object(&what))?;
            out(&mut stdout, &format!("{what} purged\n"))
        }
        CtlCommand::Delete { target: QueueTarget::Queue { name, vhost } } => {
            let path = format!("/api/queues/{}/{}", segment(vhost), segment(name));
            let what = format!("queue {name:?} in vhost {vhost:?}");
            client.call(Method::Delete { reason: None }, &path, Missing::Object(&what))?;
            out(&mut stdout, &format!("{what} deleted\n"))
        }
        CtlCommand::Close { target: ConnectionTarget::Connection { name, reason } } => {
            if let Some(r) = reason {
                // It travels in RabbitMQ's X-Reason header, which carries visible ASCII.
                if !r.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
                    return Err(CtlError::Usage(
                        "--reason: printable ASCII only (it is sent as an HTTP header)".into(),
                    ));
                }
            }
            let path = format!("/api/connections/{}", segment(name));
            let what = format!("connection {name:?}");
            client.call(Method::Delete { reason: reason.as_deref() }, &path, Missing::Object(&what))?;
            out(&mut stdout, &format!("{what} closed\n"))
        }
        CtlCommand::Export { file } => {
            let body = client.call(Method::Get, "/api/definitions", Missing::Endpoint)?;
            let text = pretty(&parse_json(&body, "/api/definitions")?);
            if file.as_os_str() == "-" {
                return out(&mut stdout, &text);
            }
            std::fs::write(file, text).map_err(|e| CtlError::Io(format!("{}: {e}", file.display())))?;
            out(&mut stdout, &format!("definitions exported to {}\n", file.display()))
        }
        CtlCommand::Import { file } => {
            let json = read_import(file)?;
            client.call(Method::Post { json }, "/api/definitions", Missing::Endpoint)?;
            out(&mut stdout, &format!("definitions imported from {}\n", file.display()))
        }
    }
}

/// The definitions to import, checked to be one JSON object before anything is sent.
fn read_import(file: &Path) -> Result<Vec<u8>, CtlError> {
    use std::io::Read;
    let name = file.display();
    let mut bytes = Vec::new();
    let read = if file.as_os_str() == "-" {
        std::io::stdin().lock().take(MAX_IMPORT + 1).read_to_end(&mut bytes)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(MAX_IMPORT + 1).read_to_end(&mut bytes))
    };
    read.map_err(|e| CtlError::Io(format!("{name}: {e}")))?;
    if bytes.len() as u64 > MAX_IMPORT {
        return Err(CtlError::Io(format!("{name}: larger than {MAX_IMPORT} bytes")));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(_)) => Ok(bytes),
        Ok(_) => Err(CtlError::Io(format!("{name}: not a definitions object (RabbitMQ's definitions JSON)"))),
        Err(e) => Err(CtlError::Io(format!("{name}: not JSON: {e}"))),
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("/"), "%2F");
        assert_eq!(segment("a b/c%d"), "a%20b%2Fc%25d");
        assert_eq!(segment("mqtt-session.x_y~z"), "mqtt-session.x_y~z");
        assert_eq!(segment("127.0.0.1:5000 -> 127.0.0.1:1883"), "127.0.0.1%3A5000%20-%3E%20127.0.0.1%3A1883");
        assert_eq!(segment("é"), "%C3%A9");
    }

    #[test]
    fn loopback_urls_are_told_apart() {
        for url in ["http://127.0.0.1:15672", "http://localhost", "https://[::1]:443/x", "http://u@127.0.0.2"] {
            assert!(is_loopback(url), "{url}");
        }
        for url in
            ["http://10.0.0.1:15672", "https://broker.example", "http://[2001:db8::1]", "http://127.0.0.1.example"]
        {
            assert!(!is_loopback(url), "{url}");
        }
    }

    #[test]
    fn tables_are_aligned_like_rabbitmqadmins() {
        let items = [
            json!({"vhost": "/", "name": "orders", "messages": 12, "messages_ready": 10,
                   "messages_unacknowledged": 2, "consumers": 1,
                   "message_stats": {"publish_details": {"rate": 3.27}}}),
            json!({"vhost": "/", "name": "q", "messages": 0, "messages_ready": 0,
                   "messages_unacknowledged": 0, "consumers": 0}),
        ];
        let t = table(Kind::Queues, &items);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 6, "{t}");
        assert_eq!(lines[0], "+-------+--------+----------+-------+---------+-----------+-----------+-----------+");
        assert_eq!(lines[1], "| vhost | name   | messages | ready | unacked | consumers | publish/s | deliver/s |");
        assert_eq!(lines[3], "| /     | orders | 12       | 10    | 2       | 1         | 3.3       |           |");
        assert_eq!(lines[4], "| /     | q      | 0        | 0     | 0       | 0         |           |           |");
        assert!(lines.iter().all(|l| l.chars().count() == lines[0].len()), "{t}");
        assert_eq!(table(Kind::Queues, &[]), "No items\n");
    }

    #[test]
    fn cells_take_the_first_path_present_and_escape_control_characters() {
        let conn = json!({"name": "a\u{1b}[2Jb", "client_properties": {"connection_name": "svc"}, "ferry": {"client_id": null}});
        let t = table(Kind::Connections, &[conn]);
        assert!(t.contains("| a\\u{1b}[2Jb |"), "{t}");
        assert!(t.contains("| svc "), "{t}");
        let session =
            json!({"client_id": "s1", "subscriptions": [{"filter": "a/+", "qos": 1}, {"filter": "#", "qos": 0}]});
        assert!(table(Kind::Sessions, &[session]).contains("| a/+ (1), # (0) |"));
    }

    #[test]
    fn error_reasons_come_from_rabbitmqs_json() {
        assert_eq!(error_reason(r#"{"error":"not_authorized","reason":"Login failed"}"#), "Login failed");
        assert_eq!(error_reason(r#"{"error":"Object Not Found"}"#), "Object Not Found");
        assert_eq!(error_reason("plain\ntext"), "plain\\ntext");
    }

    #[test]
    fn imports_must_be_a_json_object() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("defs.json");
        std::fs::write(&file, "[1]").unwrap();
        assert!(read_import(&file).unwrap_err().to_string().contains("not a definitions object"));
        std::fs::write(&file, "{oops").unwrap();
        assert!(read_import(&file).unwrap_err().to_string().contains("not JSON"));
        std::fs::write(&file, r#"{"queues": []}"#).unwrap();
        assert_eq!(read_import(&file).unwrap(), br#"{"queues": []}"#);
        assert!(read_import(&dir.path().join("missing.json")).is_err());
    }
}

//! Bridges added, changed and removed while the server runs (the management API's
//! `PUT|DELETE /api/bridges/{name}`), beside the file's `[[bridges]]`.
//!
//! Each is kept in the store as a setting `bridge/<name>` holding the table as JSON (the keys of
//! `[[bridges]]`, checked by [`crate::spec`] like the file's), so it starts again with the
//! server. A name the file uses (a bridge or a shovel) is the file's: such an entry is not
//! started (a warning says so) and the API refuses it.
//!
//! Each run-time bridge has a stop signal of its own, tripped by the server's shutdown too. A
//! change stops the running link — it sends DISCONNECT and hands what the remote has not
//! acknowledged back to its queue — then starts the new one on the same queue
//! (`ferry-bridge.<name>`, its limits and bindings brought to the new table). A removal stops
//! it and retires its queue as [`backlog::retire_orphans`] does (deleted when empty, unbound and
//! kept with a warning while it holds messages). Changes run one at a time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ferry_core::frontend::Shutdown;
use ferry_core::message::now_millis;
use ferry_core::Broker;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::link::Link;
use crate::spec::{Checker, RawBridge};
use crate::{backlog, BridgeConfig, Bridges};

/// Key prefix of a run-time bridge in the store's settings.
pub const SETTING_PREFIX: &str = "bridge/";
/// Run-time bridges at most.
pub const MAX_RUNTIME_BRIDGES: usize = 256;

/// A running run-time bridge.
#[derive(Debug)]
pub(crate) struct Running {
    pub link: Arc<Link>,
    /// Its JSON, as stored.
    pub table: serde_json::Value,
    /// Its own stop signal (the relay task trips it on the server's shutdown too).
    stop: Arc<watch::Sender<bool>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Why a run-time bridge could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The body is not a bridge table, or it does not pass the checks (every problem listed).
    #[error("{0}")]
    Invalid(String),
    /// The name is the server file's.
    #[error("{0:?} is configured in the server's file; change it there")]
    Configured(String),
    #[error("no bridge {0:?} made through the API")]
    NotFound(String),
    #[error("at most {MAX_RUNTIME_BRIDGES} bridges (and as many shovels) can be made through the API")]
    TooMany,
    /// Another bridge or shovel made through the API has the name (each names its backlog
    /// queue `ferry-bridge.<name>`).
    #[error("{0}: names are unique among bridges and shovels")]
    Taken(String),
    /// Its queue or bindings could not be set up.
    #[error("{0}")]
    Setup(String),
    #[error("not stored: {0}")]
    Store(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// The run-time bridges, shared by the server's [`Bridges`] and the management API.
#[derive(Debug, Default)]
pub(crate) struct RuntimeBridges {
    /// Set when the server starts them ([`RuntimeBridges::start`]).
    context: Mutex<Option<(Arc<Broker>, Shutdown)>>,
    /// Names of the file's bridges and shovels.
    configured: Mutex<Vec<String>>,
    pub running: Mutex<BTreeMap<String, Running>>,
    /// One change at a time: a change awaits the old link's end.
    changes: tokio::sync::Mutex<()>,
}

/// Checks for a table given through the API: files must be absolute paths (there is no file to
/// be relative to), vhosts default to `/`.
#[derive(Default)]
struct ApiChecker(Mutex<Vec<String>>);

impl Checker for ApiChecker {
    fn report_problem(&self, key: String, reason: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{key}: {reason}"));
    }
    fn path(&self, key: &str, p: PathBuf) -> Option<PathBuf> {
        if p.is_absolute() {
            Some(p)
        } else {
            self.report_problem(key.to_string(), format!("{}: give an absolute path", p.display()));
            None
        }
    }
    fn vhost(&self, key: String, vhost: Option<String>) -> Option<String> {
        let v = vhost.unwrap_or_else(|| ferry_core::broker::DEFAULT_VHOST.to_string());
        if v.is_empty() {
            self.report_problem(key, "must not be empty".into());
            return None;
        }
        Some(v)
    }
}

/// A bridge table as JSON → its configuration, with the file's checks; `name` must match the
/// table's (or the table may leave it out).
pub fn parse(name: &str, mut table: serde_json::Value) -> Result<(BridgeConfig, serde_json::Value), ChangeError> {
    let obj = table.as_object_mut().ok_or_else(|| ChangeError::Invalid("a bridge is a JSON object".into()))?;
    match obj.get("name") {
        None => {
            obj.insert("name".into(), serde_json::Value::String(name.to_string()));
        }
        Some(serde_json::Value::String(n)) if n == name => {}
        Some(other) => return Err(ChangeError::Invalid(format!("name: {other} is not the path's {name:?}"))),
    }
    let raw: RawBridge =
        serde_json::from_value(table.clone()).map_err(|e| ChangeError::Invalid(format!("bridge {name:?}: {e}")))?;
    let checker = ApiChecker::default();
    let config = crate::spec::bridge(&checker, &|k: &str| k.to_string(), raw);
    let problems = checker.0.into_inner().unwrap_or_else(|e| e.into_inner());
    if problems.is_empty() {
        Ok((config, table))
    } else {
        Err(ChangeError::Invalid(format!("bridge {name:?}: {}", problems.join("; "))))
    }
}

impl RuntimeBridges {
    /// Starts the stored run-time bridges (after the file's, whose names are `configured`).
    pub fn start(&self, broker: &Arc<Broker>, configured: Vec<String>, shutdown: &Shutdown) {
        *self.context.lock().unwrap_or_else(|e| e.into_inner()) = Some((broker.clone(), shutdown.clone()));
        *self.configured.lock().unwrap_or_else(|e| e.into_inner()) = configured.clone();
        for (key, value) in broker.settings(SETTING_PREFIX) {
            let name = key[SETTING_PREFIX.len()..].to_string();
            if configured.contains(&name) {
                warn!("bridge {name}: made through the API, but the server's file now has one of that name; the file's runs");
                continue;
            }
            let parsed = serde_json::from_slice(&value)
                .map_err(|e| ChangeError::Invalid(e.to_string()))
                .and_then(|table| parse(&name, table));
            match parsed.and_then(|(config, table)| self.launch(broker, shutdown, config, table)) {
                Ok(()) => info!("bridge {name}: started (made through the API)"),
                Err(e) => warn!("bridge {name}: made through the API, not started: {e}"),
            }
        }
    }

    /// The names of the running run-time bridges (their queues are not orphans).
    pub fn names(&self) -> Vec<String> {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    pub fn is_configured(&self, name: &str) -> bool {
        self.configured.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|n| n == name)
    }

    fn context(&self) -> Result<(Arc<Broker>, Shutdown), ChangeError> {
        let ctx = self.context.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match ctx {
            Some((_, s)) if s.is_shutting_down() => Err(ChangeError::ShuttingDown),
            Some(c) => Ok(c),
            None => Err(ChangeError::ShuttingDown),
        }
    }

    fn launch(
        &self,
        broker: &Arc<Broker>,
        shutdown: &Shutdown,
        config: BridgeConfig,
        table: serde_json::Value,
    ) -> Result<(), ChangeError> {
        let now = now_millis();
        let (link, vhost) = Bridges::prepare(broker, 0, &config, now).map_err(|e| ChangeError::Setup(e.to_string()))?;
        let (stop, own) = Shutdown::channel();
        let stop = Arc::new(stop);
        // The server's shutdown stops it too; the relay ends with either.
        let (mut global, mut mine, relay_stop) = (shutdown.clone(), own.clone(), stop.clone());
        let relay = tokio::spawn(async move {
            tokio::select! {
                _ = global.wait() => {
                    let _ = relay_stop.send(true);
                }
                _ = mine.wait() => {}
            }
        });
        let mut tasks = Bridges::spawn(&link, vhost, &own, now, 0);
        tasks.push(relay);
        let name = config.name.clone();
        self.running.lock().unwrap_or_else(|e| e.into_inner()).insert(name, Running { link, table, stop, tasks });
        Ok(())
    }

    /// Adds or replaces run-time bridge `name` from its JSON table, stored before it starts.
    /// `Ok(true)`: it replaced one.
    pub async fn put(&self, name: &str, table: serde_json::Value) -> Result<bool, ChangeError> {
        let (config, table) = parse(name, table)?;
        let _one = self.changes.lock().await;
        let (broker, shutdown) = self.context()?;
        if self.is_configured(name) {
            return Err(ChangeError::Configured(name.to_string()));
        }
        let replacing = self.running.lock().unwrap_or_else(|e| e.into_inner()).contains_key(name);
        if !replacing && self.running.lock().unwrap_or_else(|e| e.into_inner()).len() >= MAX_RUNTIME_BRIDGES {
            return Err(ChangeError::TooMany);
        }
        // What can be checked before the old link stops is checked first.
        // (Unlike the file's, a bridge made at run time does not create its vhost.)
        let vhost = broker
            .vhost(&config.vhost)
            .ok_or_else(|| ChangeError::Setup(format!("vhost {:?} does not exist", config.vhost)))?;
        if vhost.exchange(&config.exchange).is_none() {
            return Err(ChangeError::Setup(format!(
                "exchange {:?} does not exist in vhost {:?}",
                config.exchange, config.vhost
            )));
        }
        let bytes = Bytes::from(serde_json::to_vec(&table).map_err(|e| ChangeError::Invalid(e.to_string()))?);
        broker
            .put_setting(&format!("{SETTING_PREFIX}{name}"), Some(bytes))
            .wait()
            .await
            .map_err(|e| ChangeError::Store(e.to_string()))?;
        let old = if replacing { self.stop(name).await } else { None };
        if let Err(e) = self.launch(&broker, &shutdown, config, table) {
            // Put back what was there (in the store and running), so a failed change changes
            // nothing.
            let restored = match old {
                Some(old) => {
                    let bytes = Bytes::from(serde_json::to_vec(&old).unwrap_or_default());
                    let _ = broker.put_setting(&format!("{SETTING_PREFIX}{name}"), Some(bytes)).wait().await;
                    parse(name, old).and_then(|(c, t)| self.launch(&broker, &shutdown, c, t))
                }
                None => broker
                    .put_setting(&format!("{SETTING_PREFIX}{name}"), None)
                    .wait()
                    .await
                    .map_err(|e| ChangeError::Store(e.to_string())),
            };
            if let Err(r) = restored {
                warn!("bridge {name}: the change failed ({e}) and what was there could not be put back: {r}");
            }
            return Err(e);
        }
        info!("bridge {name}: {} through the API", if replacing { "changed" } else { "added" });
        Ok(replacing)
    }

    /// Removes run-time bridge `name`: stops it, forgets it in the store, retires its queue.
    pub async fn delete(&self, name: &str) -> Result<(), ChangeError> {
        let _one = self.changes.lock().await;
        let (broker, _) = self.context()?;
        if self.is_configured(name) {
            return Err(ChangeError::Configured(name.to_string()));
        }
        if !self.running.lock().unwrap_or_else(|e| e.into_inner()).contains_key(name) {
            return Err(ChangeError::NotFound(name.to_string()));
        }
        broker
            .put_setting(&format!("{SETTING_PREFIX}{name}"), None)
            .wait()
            .await
            .map_err(|e| ChangeError::Store(e.to_string()))?;
        self.stop(name).await;
        backlog::retire(&broker, name, now_millis());
        info!("bridge {name}: removed through the API");
        Ok(())
    }

    /// Stops run-time bridge `name`, waits for its tasks, and gives back its table. The QoS 2
    /// ids it held for its remote's session are forgotten (`qos2_ids`): the bridge that may
    /// follow under this name is another link, and a stale id kept for it could be taken for a
    /// resend of a new message; forgetting costs at most a duplicate.
    async fn stop(&self, name: &str) -> Option<serde_json::Value> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(name)?;
        let _ = running.stop.send(true);
        for task in running.tasks {
            if let Err(e) = task.await {
                warn!("bridge {name}: its task failed: {e}");
            }
        }
        let ids = std::mem::take(&mut *running.link.recovered_qos2.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(vhost) = self.context().ok().and_then(|(broker, _)| broker.vhost(&running.link.config.vhost)) {
            crate::qos2_ids::forget(&vhost, name, ids.into_iter());
            running.link.release(&vhost);
        }
        Some(running.table)
    }

    /// The tasks of every run-time bridge, to wait for at shutdown.
    pub fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.values_mut().flat_map(|r| std::mem::take(&mut r.tasks)).collect()
    }
}

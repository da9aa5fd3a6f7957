//! Dynamic shovels: shovels added, changed, restarted and removed while the server runs
//! (RabbitMQ's `PUT|DELETE /api/parameters/shovel/{vhost}/{name}`), beside the file's
//! `[[shovels]]`.
//!
//! Each is kept in the store as a setting `shovel/<vhost>/<name>` holding the parameter's value
//! as given — its URIs' passwords included, so the data directory holds them — and starts again
//! with the server. Names are unique among every bridge and shovel (each names its backlog
//! `ferry-bridge.<name>`), across vhosts: a name the file uses is the file's (such an entry is
//! not started, a warning says so, and the API refuses it).
//!
//! A change stops the running shovel and starts the new one; a removal stops it and retires its
//! backlog (`backlog::retire`). Stopping is the safe thing: an `out` shovel cancels its local
//! consumer, which hands every unacknowledged message back to the source queue; an `in` shovel
//! closes its connection, and the remote requeues what it had not acknowledged. Changes run one
//! at a time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ferry_core::frontend::Shutdown;
use ferry_core::message::now_millis;
use ferry_core::Broker;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{Shovel, ShovelConfig};
use crate::runtime::ChangeError;
use crate::status::BridgeStatus;

/// Key prefix of a dynamic shovel in the store's settings: `shovel/<vhost>/<name>`.
pub const SETTING_PREFIX: &str = "shovel/";
/// Dynamic shovels at most (as run-time bridges, `crate::runtime::MAX_RUNTIME_BRIDGES`).
pub const MAX_DYNAMIC_SHOVELS: usize = 256;

fn setting(vhost: &str, name: &str) -> String {
    format!("{SETTING_PREFIX}{vhost}/{name}")
}

/// A running dynamic shovel.
struct Running {
    shovel: Arc<Shovel>,
    /// The parameter's vhost.
    vhost: String,
    /// Its value, as stored (passwords included).
    value: Value,
    stop: Arc<watch::Sender<bool>>,
    tasks: Vec<JoinHandle<()>>,
}

/// A dynamic shovel as the management API lists it.
#[derive(Clone)]
pub struct DynamicShovel {
    pub vhost: String,
    pub name: String,
    /// The parameter's value as given (passwords included: redact before showing it).
    pub value: Value,
    pub config: ShovelConfig,
    pub status: BridgeStatus,
}

// Printed without the value: it holds the URIs' passwords.
impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("shovel", &self.shovel).field("vhost", &self.vhost).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DynamicShovel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = super::dynamic::redact(&self.value);
        f.debug_struct("DynamicShovel")
            .field("vhost", &self.vhost)
            .field("name", &self.name)
            .field("value", &value)
            .field("config", &self.config)
            .field("status", &self.status)
            .finish()
    }
}

/// The dynamic shovels, shared by the server's `Bridges` and the management API.
#[derive(Debug, Default)]
pub(crate) struct DynamicShovels {
    context: Mutex<Option<(Arc<Broker>, Shutdown)>>,
    /// Names of the file's bridges and shovels.
    configured: Mutex<Vec<String>>,
    running: Mutex<BTreeMap<String, Running>>,
    changes: tokio::sync::Mutex<()>,
}

impl DynamicShovels {
    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the stored dynamic shovels (after the file's, whose names are `configured`;
    /// `taken`: the run-time bridges').
    pub fn start(
        self: &Arc<Self>,
        broker: &Arc<Broker>,
        configured: Vec<String>,
        taken: &[String],
        shutdown: &Shutdown,
    ) {
        *self.context.lock().unwrap_or_else(|e| e.into_inner()) = Some((broker.clone(), shutdown.clone()));
        *self.configured.lock().unwrap_or_else(|e| e.into_inner()) = configured.clone();
        for (key, bytes) in broker.settings(SETTING_PREFIX) {
            // The name has no '/' (checked when it was put); the vhost may.
            let Some((vhost, name)) = key[SETTING_PREFIX.len()..].rsplit_once('/') else { continue };
            let (vhost, name) = (vhost.to_string(), name.to_string());
            if configured.contains(&name) || taken.contains(&name) {
                warn!("shovel {name}: made through the API, but a bridge or shovel of the server's file, or a bridge made through the API, has that name; not started");
                continue;
            }
            if let Some(r) = self.running().get(&name) {
                warn!("shovel {name} (vhost {vhost}): made through the API, but vhost {:?} has one of that name; not started", r.vhost);
                continue;
            }
            let started = serde_json::from_slice::<Value>(&bytes)
                .map_err(|e| ChangeError::Invalid(e.to_string()))
                .and_then(|value| {
                    let config = super::dynamic::parse(&vhost, &name, &value).map_err(ChangeError::Invalid)?;
                    self.launch(broker, shutdown, &vhost, config, value)
                });
            match started {
                Ok(()) => info!("shovel {name} (vhost {vhost}): started (dynamic)"),
                Err(e) => warn!("shovel {name} (vhost {vhost}): dynamic, not started: {e}"),
            }
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.running().keys().cloned().collect()
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

    pub fn list(&self) -> Vec<DynamicShovel> {
        self.running()
            .iter()
            .map(|(name, r)| DynamicShovel {
                vhost: r.vhost.clone(),
                name: name.clone(),
                value: r.value.clone(),
                config: r.shovel.config.clone(),
                status: r.shovel.status(),
            })
            .collect()
    }

    pub async fn wait_for(&self, name: &str, pred: impl Fn(&BridgeStatus) -> bool) -> Option<BridgeStatus> {
        let shovel = self.running().get(name).map(|r| r.shovel.clone())?;
        shovel.wait_for(pred).await
    }

    fn launch(
        self: &Arc<Self>,
        broker: &Arc<Broker>,
        shutdown: &Shutdown,
        vhost: &str,
        config: ShovelConfig,
        value: Value,
    ) -> Result<(), ChangeError> {
        // Unlike the file's, a dynamic shovel does not create its vhosts.
        for v in [vhost, config.vhost.as_str()] {
            if broker.vhost(v).is_none() {
                return Err(ChangeError::Setup(format!("vhost {v:?} does not exist")));
            }
        }
        let ready = super::prepare(broker, std::slice::from_ref(&config)).map_err(|e| match e {
            crate::BridgeError::Shovel { reason, .. } => ChangeError::Setup(reason),
            other => ChangeError::Setup(other.to_string()),
        })?;
        let (stop, own) = Shutdown::channel();
        let stop = Arc::new(stop);
        let (mut global, mut mine, relay_stop) = (shutdown.clone(), own.clone(), stop.clone());
        let relay = tokio::spawn(async move {
            tokio::select! {
                _ = global.wait() => {
                    let _ = relay_stop.send(true);
                }
                _ = mine.wait() => {}
            }
        });
        let mut tasks = vec![relay];
        let mut shovels = super::spawn(ready, &own, &mut tasks);
        let shovel = shovels.pop().ok_or_else(|| ChangeError::Setup("not started".into()))?;
        let name = config.name.clone();
        if config.delete_after.is_some() {
            // Done (src-delete-after): the shovel is deleted, as RabbitMQ deletes it. Not one
            // of its tasks: the deletion waits for those.
            let (me, mut done, mut stopped) = (self.clone(), shovel.finished.subscribe(), own.clone());
            let (vhost, name, id) = (vhost.to_string(), name.clone(), shovel.id);
            tokio::spawn(async move {
                let is_done = tokio::select! {
                    r = done.wait_for(|d| *d) => r.is_ok(),
                    _ = stopped.wait() => false,
                };
                if is_done {
                    me.finished(&vhost, &name, id).await;
                }
            });
        }
        self.running().insert(name, Running { shovel, vhost: vhost.to_string(), value, stop, tasks });
        Ok(())
    }

    /// Adds or replaces dynamic shovel `name` of `vhost`, stored before it starts; `taken`:
    /// whether a run-time bridge has the name. `Ok(true)`: it replaced one.
    pub async fn put(
        self: &Arc<Self>,
        vhost: &str,
        name: &str,
        value: Value,
        taken: bool,
    ) -> Result<bool, ChangeError> {
        let config = super::dynamic::parse(vhost, name, &value).map_err(ChangeError::Invalid)?;
        let _one = self.changes.lock().await;
        let (broker, shutdown) = self.context()?;
        if self.is_configured(name) {
            return Err(ChangeError::Configured(name.to_string()));
        }
        if taken {
            return Err(ChangeError::Taken(format!("{name:?} is a bridge made through the API")));
        }
        let (replacing, count) = {
            let running = self.running();
            match running.get(name) {
                Some(r) if r.vhost != vhost => {
                    return Err(ChangeError::Taken(format!("{name:?} is a shovel of vhost {:?}", r.vhost)))
                }
                other => (other.is_some(), running.len()),
            }
        };
        if !replacing && count >= MAX_DYNAMIC_SHOVELS {
            return Err(ChangeError::TooMany);
        }
        for v in [vhost, config.vhost.as_str()] {
            if broker.vhost(v).is_none() {
                return Err(ChangeError::Setup(format!("vhost {v:?} does not exist")));
            }
        }
        let bytes = Bytes::from(serde_json::to_vec(&value).map_err(|e| ChangeError::Invalid(e.to_string()))?);
        broker
            .put_setting(&setting(vhost, name), Some(bytes))
            .wait()
            .await
            .map_err(|e| ChangeError::Store(e.to_string()))?;
        let old = if replacing { self.stop(name).await } else { None };
        let own_backlog =
            matches!(config.source, super::Source::Exchange { .. }) && config.direction == super::ShovelDirection::Out;
        if let Err(e) = self.launch(&broker, &shutdown, vhost, config, value) {
            // Put back what was there, so a failed change changes nothing.
            let restored = match old {
                Some(old) => {
                    let bytes = Bytes::from(serde_json::to_vec(&old).unwrap_or_default());
                    let _ = broker.put_setting(&setting(vhost, name), Some(bytes)).wait().await;
                    super::dynamic::parse(vhost, name, &old)
                        .map_err(ChangeError::Invalid)
                        .and_then(|c| self.launch(&broker, &shutdown, vhost, c, old))
                }
                None => broker
                    .put_setting(&setting(vhost, name), None)
                    .wait()
                    .await
                    .map_err(|e| ChangeError::Store(e.to_string())),
            };
            if let Err(r) = restored {
                warn!("shovel {name}: the change failed ({e}) and what was there could not be put back: {r}");
            }
            return Err(e);
        }
        if replacing && !own_backlog {
            // A backlog the shovel had (from a local exchange) gets nothing new now.
            crate::backlog::retire(&broker, name, now_millis());
        }
        info!("shovel {name} (vhost {vhost}): {} through the API", if replacing { "changed" } else { "added" });
        Ok(replacing)
    }

    /// Removes dynamic shovel `name` of `vhost`: stops it, forgets it, retires its backlog.
    pub async fn delete(&self, vhost: &str, name: &str) -> Result<(), ChangeError> {
        let _one = self.changes.lock().await;
        let (broker, _) = self.context()?;
        if self.running().get(name).is_none_or(|r| r.vhost != vhost) {
            // Stored but not started at the server's start (its vhost gone, its name taken by
            // the file): deleting forgets it.
            let key = setting(vhost, name);
            if !broker.settings(&key).iter().any(|(k, _)| *k == key) {
                return Err(ChangeError::NotFound(name.to_string()));
            }
            broker.put_setting(&key, None).wait().await.map_err(|e| ChangeError::Store(e.to_string()))?;
            info!("shovel {name} (vhost {vhost}): removed through the API (it was not running)");
            return Ok(());
        }
        broker.put_setting(&setting(vhost, name), None).wait().await.map_err(|e| ChangeError::Store(e.to_string()))?;
        self.stop(name).await;
        crate::backlog::retire(&broker, name, now_millis());
        info!("shovel {name} (vhost {vhost}): removed through the API");
        Ok(())
    }

    /// Stops dynamic shovel `name` of `vhost` and starts it again from its stored value.
    pub async fn restart(self: &Arc<Self>, vhost: &str, name: &str) -> Result<(), ChangeError> {
        let _one = self.changes.lock().await;
        let (broker, shutdown) = self.context()?;
        if self.running().get(name).is_none_or(|r| r.vhost != vhost) {
            return Err(ChangeError::NotFound(name.to_string()));
        }
        let Some(value) = self.stop(name).await else { return Err(ChangeError::NotFound(name.to_string())) };
        let config = super::dynamic::parse(vhost, name, &value).map_err(ChangeError::Invalid)?;
        self.launch(&broker, &shutdown, vhost, config, value)?;
        info!("shovel {name} (vhost {vhost}): restarted through the API");
        Ok(())
    }

    /// Deletes dynamic shovel `name` of `vhost` once it is done (`src-delete-after`), unless it
    /// was changed or deleted meanwhile (`id`: the shovel that finished).
    async fn finished(&self, vhost: &str, name: &str, id: ferry_core::message::ConnectionId) {
        let _one = self.changes.lock().await;
        let Ok((broker, _)) = self.context() else { return };
        if self.running().get(name).is_none_or(|r| r.vhost != vhost || r.shovel.id != id) {
            return;
        }
        if let Err(e) = broker.put_setting(&setting(vhost, name), None).wait().await {
            warn!("shovel {name} (vhost {vhost}): done (src-delete-after), but not deleted from the store: {e}");
        }
        self.stop(name).await;
        crate::backlog::retire(&broker, name, now_millis());
        info!("shovel {name} (vhost {vhost}): done (src-delete-after), deleted");
    }

    /// Stops dynamic shovel `name`, waits for its tasks, and gives back its value.
    async fn stop(&self, name: &str) -> Option<Value> {
        let running = self.running().remove(name)?;
        let _ = running.stop.send(true);
        for task in running.tasks {
            if let Err(e) = task.await {
                warn!("shovel {name}: its task failed: {e}");
            }
        }
        let local = self.context.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(b, _)| b.clone());
        if let Some(vhost) = local.and_then(|b| b.vhost(&running.shovel.config.vhost)) {
            running.shovel.release(&vhost);
        }
        Some(running.value)
    }

    /// The tasks of every dynamic shovel, to wait for at shutdown.
    pub fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        self.running().values_mut().flat_map(|r| std::mem::take(&mut r.tasks)).collect()
    }
}

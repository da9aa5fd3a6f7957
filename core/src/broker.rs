//! The broker: its vhosts and its store.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::frontend::Shutdown;
use crate::message::{now_millis, ConnectionId, Millis};
use crate::store::{Store, StoreError, StoreOp};
use crate::vhost::VHost;

/// The name of the vhost that always exists.
pub const DEFAULT_VHOST: &str = "/";

/// How often housekeeping runs at the least (message TTL, `x-expires`): a TTL fires at most this
/// late when no earlier deadline is known.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(1);

/// The shared state every connection holds a handle to.
#[derive(Debug)]
pub struct Broker {
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    store: Arc<dyn Store>,
}

impl Broker {
    /// A broker with the default vhost `/` and nothing else (ignores what the store holds).
    pub fn new(store: Arc<dyn Store>) -> Arc<Broker> {
        let b = Broker { vhosts: RwLock::new(HashMap::new()), store };
        b.add_vhost(DEFAULT_VHOST);
        Arc::new(b)
    }

    /// A broker rebuilt from what `store` holds: vhosts, durable exchanges, queues, bindings and
    /// retained messages.
    pub fn recover(store: Arc<dyn Store>) -> Result<Arc<Broker>, StoreError> {
        let snapshot = store.recover()?;
        let b = Broker { vhosts: RwLock::new(HashMap::new()), store };
        b.add_vhost(DEFAULT_VHOST);
        for v in &snapshot.vhosts {
            b.add_vhost(v);
        }
        let now = now_millis();
        for v in b.vhosts.read().unwrap_or_else(|e| e.into_inner()).values() {
            v.restore(&snapshot, now);
        }
        Ok(Arc::new(b))
    }

    /// The vhost with this name, if it exists.
    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// Creates a vhost (idempotent) and returns it. New vhosts are stored.
    pub fn add_vhost(&self, name: &str) -> Arc<VHost> {
        let mut map = self.vhosts.write().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = map.get(name) {
            return v.clone();
        }
        let v = Arc::new(VHost::new(name, self.store.clone()));
        map.insert(name.to_string(), v.clone());
        drop(map);
        self.store.submit(vec![StoreOp::PutVhost(name.to_string())]);
        v
    }

    /// Deletes a vhost and everything in it. The default vhost cannot be deleted.
    pub fn delete_vhost(&self, name: &str) -> bool {
        if name == DEFAULT_VHOST {
            return false;
        }
        let removed = self.vhosts.write().unwrap_or_else(|e| e.into_inner()).remove(name);
        if removed.is_some() {
            self.store.submit(vec![StoreOp::DeleteVhost(name.to_string())]);
        }
        removed.is_some()
    }

    pub fn vhost_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.vhosts.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        v.sort();
        v
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// A connection closed: its exclusive queues go.
    pub fn connection_closed(&self, connection: ConnectionId) {
        let all: Vec<Arc<VHost>> = self.vhosts.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for v in all {
            v.connection_closed(connection);
        }
    }

    /// Expires messages and idle queues in every vhost; returns the earliest next deadline.
    pub fn tick(&self, now: Millis) -> Option<Millis> {
        let all: Vec<Arc<VHost>> = self.vhosts.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        all.iter().filter_map(|v| v.tick(now)).min()
    }

    /// Runs [`Broker::tick`] until shutdown: at the next deadline a queue reported, and at
    /// least every second.
    pub async fn run_housekeeping(self: Arc<Self>, mut shutdown: Shutdown) {
        loop {
            let now = now_millis();
            let next = self.tick(now);
            let wait = next
                .map_or(HOUSEKEEPING_PERIOD, |d| Duration::from_millis(d.saturating_sub(now)).min(HOUSEKEEPING_PERIOD));
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(wait.max(Duration::from_millis(1))) => {}
            }
        }
    }
}

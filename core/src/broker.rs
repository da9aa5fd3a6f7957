//! The broker: its vhosts and its store.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::store::Store;
use crate::vhost::VHost;

/// The name of the vhost that always exists.
pub const DEFAULT_VHOST: &str = "/";

/// The shared state every connection holds a handle to.
#[derive(Debug)]
pub struct Broker {
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    store: Arc<dyn Store>,
}

impl Broker {
    /// A broker with the default vhost `/`.
    pub fn new(store: Arc<dyn Store>) -> Arc<Broker> {
        let b = Broker { vhosts: RwLock::new(HashMap::new()), store };
        b.add_vhost(DEFAULT_VHOST);
        Arc::new(b)
    }
    /// The vhost with this name, if it exists.
    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }
    /// Creates a vhost (idempotent) and returns it.
    pub fn add_vhost(&self, name: &str) -> Arc<VHost> {
        let mut map = self.vhosts.write().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_string()).or_insert_with(|| Arc::new(VHost::new(name, self.store.clone()))).clone()
    }
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

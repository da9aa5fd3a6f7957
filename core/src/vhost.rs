//! Virtual hosts (filled in next).
use std::sync::Arc;

use crate::store::Store;

/// One namespace of exchanges and queues.
#[derive(Debug)]
pub struct VHost {
    name: String,
    #[allow(dead_code)]
    store: Arc<dyn Store>,
}

impl VHost {
    pub fn new(name: &str, store: Arc<dyn Store>) -> VHost {
        VHost { name: name.to_string(), store }
    }
    pub fn name(&self) -> &str {
        &self.name
    }
}

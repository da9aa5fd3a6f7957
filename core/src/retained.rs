//! The retained-message store: one message per routing key, per vhost, with wildcard lookup.
//!
//! Keys are routing keys (MQTT topics converted by the frontend). Lookup by a pattern walks only
//! the keys that share the pattern's literal prefix: a `BTreeMap` range scan, then the reference
//! matcher on each candidate. A subscribe to `plant/7/#` therefore touches plant 7's topics,
//! not the whole store.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::message::Message;
use crate::topic::{Level, Pattern};

#[derive(Debug, Default)]
pub struct RetainedStore {
    map: RwLock<BTreeMap<String, Arc<Message>>>,
}

impl RetainedStore {
    pub fn new() -> RetainedStore {
        RetainedStore::default()
    }
    /// Keeps `message` as the retained message for `key`; an empty payload clears it. Returns
    /// whether something changed.
    pub fn set(&self, key: &str, message: Arc<Message>) -> bool {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if message.payload.is_empty() {
            map.remove(key).is_some()
        } else {
            map.insert(key.to_string(), message);
            true
        }
    }
    pub fn get(&self, key: &str) -> Option<Arc<Message>> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every retained message whose key matches `pattern`, in key order.
    pub fn lookup(&self, pattern: &Pattern) -> Vec<(String, Arc<Message>)> {
        let literals: Vec<&str> = pattern
            .levels
            .iter()
            .map_while(|l| match l {
                Level::Literal(w) => Some(&**w),
                _ => None,
            })
            .collect();
        let prefix = literals.join(".");
        let exact = literals.len() == pattern.levels.len();
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        if exact {
            return map.get(&prefix).map(|m| vec![(prefix.clone(), m.clone())]).unwrap_or_default();
        }
        map.range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| pattern.matches(k))
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(p: &'static [u8]) -> Arc<Message> {
        Arc::new(Message::new("amq.topic", "", Bytes::from_static(p)))
    }

    fn mqtt(levels: Vec<Level>) -> Pattern {
        Pattern { levels, dollar_rule: true }
    }

    #[test]
    fn set_replace_and_clear_with_empty_payload() {
        let s = RetainedStore::new();
        assert!(s.set("a.b", msg(b"1")));
        assert!(s.set("a.b", msg(b"2")));
        assert_eq!(&s.get("a.b").unwrap().payload[..], b"2");
        assert!(s.set("a.b", msg(b"")));
        assert!(s.get("a.b").is_none());
        assert!(!s.set("a.b", msg(b"")));
    }

    #[test]
    fn wildcard_lookup_matches_like_routing() {
        let s = RetainedStore::new();
        for k in ["farm.1.soil.moisture", "farm.2.soil", "farm.2.air", "farmx.1.soil", "$SYS.uptime", "other"] {
            s.set(k, msg(b"v"));
        }
        let lit = |w: &str| Level::Literal(w.into());
        let keys = |p: Pattern| s.lookup(&p).into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            keys(mqtt(vec![lit("farm"), Level::One, lit("soil"), Level::Many])),
            vec!["farm.1.soil.moisture", "farm.2.soil"]
        );
        assert_eq!(keys(mqtt(vec![lit("farm"), lit("2"), lit("air")])), vec!["farm.2.air"]);
        // The `$` rule: `#` alone does not see `$SYS`, but `$SYS/#` does.
        assert_eq!(keys(mqtt(vec![Level::Many])).len(), 5);
        assert_eq!(keys(mqtt(vec![lit("$SYS"), Level::Many])), vec!["$SYS.uptime"]);
    }
}

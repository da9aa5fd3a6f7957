//! Hash maps by who chooses their keys (issue 18, "Per-message cost").
//!
//! std's default SipHash-1-3 resists hash flooding but costs several times a fast hash on the
//! short keys routing looks up per message (a topic word, an exchange name, a sequence number).
//! Ferry uses foldhash for both kinds of key:
//! - [`KeyedMap`] / [`KeyedSet`]: keys a client chooses (topics and their words, exchange and
//!   queue names, client ids, filters). foldhash's `RandomState` is seeded per process and per
//!   map, so a client cannot precompute colliding keys (the store already keys its maps so).
//! - [`FastMap`] / [`FastSet`]: keys the broker makes (sequence numbers, cookies, packet ids
//!   it hands out, addresses): a fixed seed, nothing to attack.

use std::collections::{HashMap, HashSet};

/// Seeded per process (and per map): for keys a client chooses.
pub type KeyedState = foldhash::fast::RandomState;
/// Fixed seed: for keys the broker makes.
pub type FastState = foldhash::fast::FixedState;

pub type KeyedMap<K, V> = HashMap<K, V, KeyedState>;
pub type KeyedSet<K> = HashSet<K, KeyedState>;
pub type FastMap<K, V> = HashMap<K, V, FastState>;
pub type FastSet<K> = HashSet<K, FastState>;

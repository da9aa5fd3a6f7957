//! Exchanges and their binding tables.
//!
//! An exchange only decides *where* a message goes: [`Exchange::route`] reports every
//! destination of every matching binding. The vhost follows exchange-to-exchange bindings and
//! alternate exchanges, removes duplicates and delivers.

use std::collections::HashMap;

use crate::hash::KeyedMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::CoreError;
use crate::message::{FieldTable, FieldValue, Message, ShortString};
use crate::queue::Queue;
use crate::sink::{DirectSink, SinkId};
use crate::topic::{Pattern, TopicTrie};

/// The four exchange types of AMQP 0.9.1 (and RabbitMQ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn parse(s: &str) -> Option<ExchangeKind> {
        Some(match s {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A direct sink bound under a cookie the frontend chose (one binding per subscription).
#[derive(Debug, Clone)]
pub struct SinkRef {
    pub sink: Arc<DirectSink>,
    pub cookie: u64,
}

/// Where a binding leads.
///
/// 24 bytes (`a_destination_stays_small`): every binding holds one in the exchange's index and
/// one in its routes (the topic trie's entry), one per MQTT subscription. The exchange's name
/// is boxed for it: inline, its 32 bytes made every destination 40.
#[derive(Debug, Clone)]
pub enum Destination {
    Queue(Arc<Queue>),
    Exchange(Box<ShortString>),
    Sink(SinkRef),
}

impl PartialEq for Destination {
    fn eq(&self, other: &Destination) -> bool {
        match (self, other) {
            (Destination::Queue(a), Destination::Queue(b)) => a.name() == b.name(),
            (Destination::Exchange(a), Destination::Exchange(b)) => a == b,
            (Destination::Sink(a), Destination::Sink(b)) => a.sink.id() == b.sink.id() && a.cookie == b.cookie,
            _ => false,
        }
    }
}

impl Destination {
    /// For messages: `queue 'q'`, `exchange 'x'`, `sink 7`.
    pub fn describe(&self) -> String {
        match self {
            Destination::Queue(q) => format!("queue '{}'", q.name()),
            Destination::Exchange(x) => format!("exchange '{x}'"),
            Destination::Sink(s) => format!("sink {}", s.sink.id().0),
        }
    }
}

/// What a client asks to bind with.
#[derive(Debug, Clone, Default)]
pub struct BindingKey {
    pub routing_key: ShortString,
    pub arguments: FieldTable,
    /// How a topic exchange reads `routing_key` as a pattern ([`BindingKey::with_pattern`]).
    pub pattern: KeyPattern,
}

/// How a binding's routing key is read as a topic pattern.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum KeyPattern {
    /// AMQP's topic syntax ([`Pattern::parse_amqp`]).
    #[default]
    Amqp,
    /// A pattern a frontend parsed (an MQTT filter) that the routing key spells exactly:
    /// AMQP's syntax with MQTT's `$` rule on (`+` is bound as `*`). Nothing is kept beside the
    /// key: a `Pattern` kept with every binding was 112 bytes of every MQTT subscription (its
    /// level list, and 32 bytes more of the binding index's entry; issue 18).
    Dollar,
    /// A pattern a frontend parsed that the key does not spell (an MQTT filter with a level
    /// that is a literal `*`, bound as the `*` a `+` is bound as too). Boxed: rare.
    Parsed(Box<Pattern>),
}

impl KeyPattern {
    /// Whether a frontend parsed it (MQTT's bindings are session state, not stored, and not
    /// counted as AMQP's).
    pub fn is_parsed(&self) -> bool {
        !matches!(self, KeyPattern::Amqp)
    }
}

impl BindingKey {
    pub fn new(routing_key: impl Into<ShortString>) -> BindingKey {
        BindingKey { routing_key: routing_key.into(), ..Default::default() }
    }
    pub fn with_arguments(mut self, arguments: FieldTable) -> BindingKey {
        self.arguments = arguments;
        self
    }
    /// A pattern the frontend parsed (MQTT filters), kept as [`KeyPattern::Dollar`] when the
    /// routing key spells it.
    pub fn with_pattern(mut self, pattern: Pattern) -> BindingKey {
        self.pattern = if pattern == dollar_pattern(&self.routing_key) {
            KeyPattern::Dollar
        } else {
            KeyPattern::Parsed(Box::new(pattern))
        };
        self
    }
    /// The pattern a frontend parsed; `None` for AMQP's syntax.
    pub fn parsed_pattern(&self) -> Option<Pattern> {
        match &self.pattern {
            KeyPattern::Amqp => None,
            _ => Some(topic_pattern(self)),
        }
    }
    fn same(&self, other: &BindingKey) -> bool {
        self.routing_key == other.routing_key
            && self.arguments.same_entries(&other.arguments)
            && self.pattern == other.pattern
    }
}

/// One binding, as listed for management and for deletions.
#[derive(Debug, Clone)]
pub struct Binding {
    pub key: BindingKey,
    pub destination: Destination,
}

/// `x-match` of a headers binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XMatch {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

#[derive(Debug, Clone)]
struct HeadersBinding {
    x_match: XMatch,
    binding: Binding,
}

/// Value equality as RabbitMQ's headers exchange sees it: integers compare by value whatever
/// their width (Erlang `=:=` on integers), everything else by type and value.
fn header_values_equal(a: &FieldValue, b: &FieldValue) -> bool {
    match (a.as_i64(), b.as_i64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

impl HeadersBinding {
    fn parse(binding: Binding) -> Result<HeadersBinding, CoreError> {
        let x_match = match binding.key.arguments.get("x-match") {
            None => XMatch::All,
            Some(v) => match v.as_str() {
                Some("all") => XMatch::All,
                Some("any") => XMatch::Any,
                Some("all-with-x") => XMatch::AllWithX,
                Some("any-with-x") => XMatch::AnyWithX,
                _ => {
                    return Err(CoreError::precondition(format!(
                        "Invalid x-match field value {v:?}; expected all, any, all-with-x, or any-with-x"
                    )))
                }
            },
        };
        Ok(HeadersBinding { x_match, binding })
    }

    fn matches(&self, headers: Option<&FieldTable>) -> bool {
        let with_x = matches!(self.x_match, XMatch::AllWithX | XMatch::AnyWithX);
        let mut wanted = self
            .binding
            .key
            .arguments
            .iter()
            .filter(|(k, _)| *k != "x-match" && (with_x || !k.as_bytes().starts_with(b"x-")));
        let present = |k: &ShortString, v: &FieldValue| {
            let Some(h) = headers.and_then(|h| h.iter().find(|(hk, _)| *hk == k).map(|(_, hv)| hv)) else {
                return false;
            };
            // A void binding value asks only that the header be present.
            matches!(v, FieldValue::Void) || header_values_equal(v, h)
        };
        match self.x_match {
            XMatch::All | XMatch::AllWithX => wanted.all(|(k, v)| present(k, v)),
            XMatch::Any | XMatch::AnyWithX => wanted.any(|(k, v)| present(k, v)),
        }
    }
}

/// Who a binding belongs to: deleting a queue, an exchange or a sink removes every binding
/// of its owner at once ([`Exchange::unbind_owner`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    Queue(ShortString),
    Exchange(ShortString),
    Sink(SinkId),
}

impl Destination {
    pub fn owner(&self) -> Owner {
        match self {
            Destination::Queue(q) => Owner::Queue(q.name().clone()),
            Destination::Exchange(x) => Owner::Exchange((**x).clone()),
            Destination::Sink(s) => Owner::Sink(s.sink.id()),
        }
    }
}

/// Bindings with the same owner and fingerprint: one, except for bindings that differ only in
/// their arguments (or a fingerprint collision).
#[derive(Debug)]
enum Bucket {
    One(Binding),
    Many(Vec<Binding>),
}

impl Bucket {
    fn as_slice(&self) -> &[Binding] {
        match self {
            Bucket::One(b) => std::slice::from_ref(b),
            Bucket::Many(v) => v,
        }
    }
}

/// Every binding of an exchange, indexed by owner and then by a fingerprint of what makes a
/// binding distinct (destination, routing key, pattern; arguments are compared within a
/// bucket). Adding, finding and removing one binding costs a hash of its key whatever the
/// number of bindings, and removing an owner's bindings costs only those: a client with 60,000
/// subscriptions no longer makes every bind a scan of the exchange's whole list (issue 13:
/// 60,000 filters took 7.5 s to subscribe and 8.7 s to remove, under the exchange's lock).
#[derive(Debug, Default)]
struct BindingIndex {
    /// Random keys: a client picks its filters, so it must not be able to pick collisions.
    hasher: RandomState,
    /// Queues' and exchanges' bindings.
    owners: HashMap<Owner, OwnBindings>,
    /// Direct sinks' bindings, apart: an MQTT device's sink is an owner per subscribed
    /// connection, and keyed by its number a slot is 32 bytes, keyed by an [`Owner`] 64.
    sinks: HashMap<SinkId, OwnBindings>,
    len: usize,
}

/// Up to this many bindings an owner keeps them in a list searched linearly.
const FEW_BINDINGS: usize = 4;

/// One owner's bindings by fingerprint: a short list while there are few (an MQTT device's
/// direct sink usually has one binding, and a hash map for one is a table of four), a hash map
/// past [`FEW_BINDINGS`].
#[derive(Debug)]
enum OwnBindings {
    Few(Vec<(u64, Bucket)>),
    /// Boxed: the map with its hasher is 48 bytes, the list 24.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<u64, Bucket>>),
}

impl Default for OwnBindings {
    fn default() -> Self {
        OwnBindings::Few(Vec::new())
    }
}

impl OwnBindings {
    fn len(&self) -> usize {
        match self {
            OwnBindings::Few(v) => v.len(),
            OwnBindings::Many(m) => m.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, fp: u64) -> Option<&Bucket> {
        match self {
            OwnBindings::Few(v) => v.iter().find(|(f, _)| *f == fp).map(|(_, b)| b),
            OwnBindings::Many(m) => m.get(&fp),
        }
    }

    fn get_mut(&mut self, fp: u64) -> Option<&mut Bucket> {
        match self {
            OwnBindings::Few(v) => v.iter_mut().find(|(f, _)| *f == fp).map(|(_, b)| b),
            OwnBindings::Many(m) => m.get_mut(&fp),
        }
    }

    fn remove(&mut self, fp: u64) -> Option<Bucket> {
        match self {
            OwnBindings::Few(v) => {
                let i = v.iter().position(|(f, _)| *f == fp)?;
                let (_, b) = v.swap_remove(i);
                if v.is_empty() {
                    *v = Vec::new();
                }
                Some(b)
            }
            OwnBindings::Many(m) => m.remove(&fp),
        }
    }

    /// Adds a bucket under a fingerprint not there.
    fn insert(&mut self, fp: u64, bucket: Bucket) {
        if let OwnBindings::Few(v) = self {
            if v.len() == FEW_BINDINGS {
                *self = OwnBindings::Many(Box::new(std::mem::take(v).into_iter().collect()));
            }
        }
        match self {
            OwnBindings::Few(v) => {
                // Grow one at a time: most owners keep one binding.
                v.reserve_exact(1);
                v.push((fp, bucket));
            }
            OwnBindings::Many(m) => {
                m.insert(fp, bucket);
            }
        }
    }

    fn values(&self) -> Box<dyn Iterator<Item = &Bucket> + '_> {
        match self {
            OwnBindings::Few(v) => Box::new(v.iter().map(|(_, b)| b)),
            OwnBindings::Many(m) => Box::new(m.values()),
        }
    }

    fn into_values(self) -> Vec<Bucket> {
        match self {
            OwnBindings::Few(v) => v.into_iter().map(|(_, b)| b).collect(),
            OwnBindings::Many(m) => m.into_values().collect(),
        }
    }
}

impl BindingIndex {
    fn fingerprint(&self, key: &BindingKey, destination: &Destination) -> u64 {
        let cookie = match destination {
            Destination::Sink(s) => s.cookie,
            _ => 0,
        };
        self.hasher.hash_one((cookie, &key.routing_key, &key.pattern))
    }

    fn contains(&self, key: &BindingKey, destination: &Destination) -> bool {
        let Some(own) = self.own(&destination.owner()) else { return false };
        own.get(self.fingerprint(key, destination))
            .is_some_and(|b| b.as_slice().iter().any(|x| x.destination == *destination && x.key.same(key)))
    }

    /// Adds a binding known not to be there.
    fn insert(&mut self, binding: Binding) {
        let fp = self.fingerprint(&binding.key, &binding.destination);
        let own = match binding.destination.owner() {
            Owner::Sink(id) => self.sinks.entry(id).or_default(),
            owner => self.owners.entry(owner).or_default(),
        };
        match own.remove(fp) {
            None => own.insert(fp, Bucket::One(binding)),
            Some(Bucket::One(first)) => own.insert(fp, Bucket::Many(vec![first, binding])),
            Some(Bucket::Many(mut v)) => {
                v.push(binding);
                own.insert(fp, Bucket::Many(v))
            }
        }
        self.len += 1;
    }

    /// Removes a binding; returns it, and whether a binding with the same destination and
    /// pattern is left (one that differs only in its arguments shares the trie entry).
    fn remove(&mut self, key: &BindingKey, destination: &Destination) -> Option<(Binding, bool)> {
        let owner = destination.owner();
        let fp = self.fingerprint(key, destination);
        let own = match &owner {
            Owner::Sink(id) => self.sinks.get_mut(id)?,
            owner => self.owners.get_mut(owner)?,
        };
        let bucket = own.get_mut(fp)?;
        let (removed, twin) = match bucket {
            Bucket::One(b) => {
                if !(b.destination == *destination && b.key.same(key)) {
                    return None;
                }
                match own.remove(fp) {
                    Some(Bucket::One(b)) => (b, false),
                    _ => return None,
                }
            }
            Bucket::Many(v) => {
                let i = v.iter().position(|x| x.destination == *destination && x.key.same(key))?;
                let b = v.swap_remove(i);
                let twin = v.iter().any(|x| {
                    x.destination == b.destination
                        && x.key.routing_key == b.key.routing_key
                        && x.key.pattern == b.key.pattern
                });
                if v.is_empty() {
                    own.remove(fp);
                }
                (b, twin)
            }
        };
        if own.is_empty() {
            self.take_owner(&owner);
        }
        self.len -= 1;
        Some((removed, twin))
    }

    /// Removes and returns every binding of `owner`.
    fn remove_owner(&mut self, owner: &Owner) -> Vec<Binding> {
        let Some(own) = self.take_owner(owner) else { return Vec::new() };
        let mut out = Vec::with_capacity(own.len());
        for bucket in own.into_values() {
            match bucket {
                Bucket::One(b) => out.push(b),
                Bucket::Many(v) => out.extend(v),
            }
        }
        self.len -= out.len();
        out
    }

    fn iter(&self) -> impl Iterator<Item = &Binding> {
        self.owners.values().chain(self.sinks.values()).flat_map(|own| own.values()).flat_map(|b| b.as_slice())
    }

    fn own(&self, owner: &Owner) -> Option<&OwnBindings> {
        match owner {
            Owner::Sink(id) => self.sinks.get(id),
            owner => self.owners.get(owner),
        }
    }

    fn take_owner(&mut self, owner: &Owner) -> Option<OwnBindings> {
        match owner {
            Owner::Sink(id) => self.sinks.remove(id),
            owner => self.owners.remove(owner),
        }
    }
}

/// How an exchange finds the destinations of a message (its bindings are in the index).
#[derive(Debug)]
enum Routes {
    Direct(KeyedMap<ShortString, Vec<Destination>>),
    Fanout(Vec<Destination>),
    Topic(TopicTrie<Destination>),
    Headers(Vec<HeadersBinding>),
}

#[derive(Debug)]
struct Table {
    index: BindingIndex,
    routes: Routes,
    /// Bindings the topic trie alone keeps ([`Exchange::in_trie_only`]).
    trie_only: usize,
}

impl Table {
    /// A topic exchange's trie (where [`Exchange::in_trie_only`] bindings are kept).
    fn trie_mut(&mut self) -> &mut TopicTrie<Destination> {
        match &mut self.routes {
            Routes::Topic(trie) => trie,
            _ => unreachable!("only a topic exchange keeps bindings in its trie alone"),
        }
    }

    /// Takes `binding` (already in the index: `shared` tells whether another binding of the
    /// same destination and pattern is, which keeps the trie entry) out of the routes.
    fn unroute(&mut self, binding: &Binding, shared: bool) {
        let remove_one = |list: &mut Vec<Destination>| {
            if let Some(i) = list.iter().position(|d| *d == binding.destination) {
                list.swap_remove(i);
            }
        };
        match &mut self.routes {
            Routes::Direct(map) => {
                if let Some(list) = map.get_mut(&binding.key.routing_key) {
                    remove_one(list);
                    if list.is_empty() {
                        map.remove(&binding.key.routing_key);
                    }
                }
            }
            // Order is kept for fanout and headers (it is the order deliveries are offered in).
            Routes::Fanout(list) => {
                if let Some(i) = list.iter().position(|d| *d == binding.destination) {
                    list.remove(i);
                }
            }
            Routes::Topic(trie) => {
                if !shared {
                    trie.remove(&topic_pattern(&binding.key), &binding.destination);
                }
            }
            Routes::Headers(list) => {
                if let Some(i) = list
                    .iter()
                    .position(|h| h.binding.destination == binding.destination && h.binding.key.same(&binding.key))
                {
                    list.remove(i);
                }
            }
        }
    }
}

/// How an exchange was declared.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeOptions {
    pub durable: bool,
    pub auto_delete: bool,
    /// Clients may not publish to an internal exchange; only exchange-to-exchange bindings and
    /// dead-lettering feed it.
    pub internal: bool,
    pub arguments: FieldTable,
}

impl Default for ExchangeOptions {
    fn default() -> Self {
        ExchangeOptions { durable: true, auto_delete: false, internal: false, arguments: FieldTable::new() }
    }
}

/// An exchange with its bindings.
#[derive(Debug)]
pub struct Exchange {
    name: ShortString,
    kind: ExchangeKind,
    options: ExchangeOptions,
    /// The `alternate-exchange` argument: where messages that match no binding go.
    alternate: Option<ShortString>,
    table: RwLock<Table>,
    /// Taken out of its vhost: a publisher that cached it must look its name up again.
    removed: AtomicBool,
}

impl Exchange {
    pub fn new(name: impl Into<ShortString>, kind: ExchangeKind, options: ExchangeOptions) -> Exchange {
        let alternate = options.arguments.get("alternate-exchange").and_then(|v| v.as_str()).map(ShortString::from);
        let routes = match kind {
            ExchangeKind::Direct => Routes::Direct(KeyedMap::default()),
            ExchangeKind::Fanout => Routes::Fanout(Vec::new()),
            ExchangeKind::Topic => Routes::Topic(TopicTrie::new()),
            ExchangeKind::Headers => Routes::Headers(Vec::new()),
        };
        let table = Table { index: BindingIndex::default(), routes, trie_only: 0 };
        Exchange {
            name: name.into(),
            kind,
            options,
            alternate,
            table: RwLock::new(table),
            removed: AtomicBool::new(false),
        }
    }
    /// Whether it was taken out of its vhost (deleted, or replaced at recovery).
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }
    pub(crate) fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }
    pub fn name(&self) -> &ShortString {
        &self.name
    }
    pub fn kind(&self) -> ExchangeKind {
        self.kind
    }
    pub fn options(&self) -> &ExchangeOptions {
        &self.options
    }
    pub fn alternate(&self) -> Option<&ShortString> {
        self.alternate.as_ref()
    }

    /// Whether the topic trie alone keeps a binding: a direct sink's, whose routing key spells
    /// its pattern ([`KeyPattern::Dollar`]: an MQTT subscription). Its routes' entry says all
    /// there is to say (the key is the entry's path, the destination its value), so it has no
    /// entry in the index: that entry, its routing key and the sink's slot were about 190
    /// bytes of every subscribed MQTT device (issue 18). The trie lists such bindings
    /// ([`Exchange::for_each_binding`]) and counts them; finding them by owner would be a
    /// walk of the whole trie, so [`Exchange::unbind_owner`] leaves them to be unbound by key
    /// (an MQTT session unbinds each subscription: `VHost::unbind_sink_all`). A sink's binding
    /// keeps no arguments: a topic exchange routes without them, and no frontend gives any.
    fn in_trie_only(&self, key: &BindingKey, destination: &Destination) -> bool {
        self.kind == ExchangeKind::Topic
            && key.pattern == KeyPattern::Dollar
            && matches!(destination, Destination::Sink(_))
    }

    /// Adds a binding; returns false when an identical one exists (binding is idempotent).
    pub fn bind(&self, key: BindingKey, destination: Destination) -> Result<bool, CoreError> {
        if self.in_trie_only(&key, &destination) {
            let mut pattern = dollar_pattern(&key.routing_key);
            let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
            let added = table.trie_mut().insert_sharing(&mut pattern, destination);
            table.trie_only += usize::from(added);
            return Ok(added);
        }
        let mut binding = Binding { key, destination };
        // Parsed before the lock: a bad `x-match` is refused without touching the table.
        let headers = match self.kind {
            ExchangeKind::Headers => Some(HeadersBinding::parse(binding.clone())?),
            _ => None,
        };
        let pattern = (self.kind == ExchangeKind::Topic).then(|| topic_pattern(&binding.key));
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if table.index.contains(&binding.key, &binding.destination) {
            return Ok(false);
        }
        match &mut table.routes {
            Routes::Direct(map) => {
                map.entry(binding.key.routing_key.clone()).or_default().push(binding.destination.clone())
            }
            Routes::Fanout(list) => list.push(binding.destination.clone()),
            Routes::Topic(trie) => {
                // False when a binding differing only in its arguments holds the entry already.
                let mut pattern = pattern.expect("topic");
                trie.insert_sharing(&mut pattern, binding.destination.clone());
                // A pattern the binding keeps shares the trie's words: one `devices` for every
                // device's `devices/<id>/cmd`, not one each.
                if let KeyPattern::Parsed(p) = &mut binding.key.pattern {
                    **p = pattern;
                }
            }
            Routes::Headers(list) => list.push(headers.expect("headers")),
        }
        table.index.insert(binding);
        Ok(true)
    }

    /// Removes a binding; returns false when there was no such binding.
    pub fn unbind(&self, key: &BindingKey, destination: &Destination) -> bool {
        if self.in_trie_only(key, destination) {
            let pattern = dollar_pattern(&key.routing_key);
            let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
            let removed = table.trie_mut().remove(&pattern, destination);
            table.trie_only -= usize::from(removed);
            return removed;
        }
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        match table.index.remove(key, destination) {
            Some((b, shared)) => {
                table.unroute(&b, shared);
                true
            }
            None => false,
        }
    }

    /// Removes every binding leading to `owner`'s destinations; returns them. Costs what the
    /// owner has, not what the exchange has. A sink's bindings that the trie alone keeps
    /// ([`Exchange::in_trie_only`]) are not found this way: they are unbound by key.
    pub fn unbind_owner(&self, owner: &Owner) -> Vec<Binding> {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let removed = table.index.remove_owner(owner);
        for b in &removed {
            // All of the owner's bindings go, twins included.
            table.unroute(b, false);
        }
        removed
    }

    /// Every binding of this exchange (as source), in no particular order.
    pub fn bindings(&self) -> Vec<Binding> {
        let mut out = Vec::with_capacity(self.binding_count());
        self.for_each_binding(|b| out.push(b.clone()));
        out
    }

    /// Calls `f` with every binding of this exchange (as source), in no particular order,
    /// under the table's read lock. The index's bindings are not copied; those the trie alone
    /// keeps are rebuilt from it, one at a time.
    pub fn for_each_binding(&self, mut f: impl FnMut(&Binding)) {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table.index.iter().for_each(&mut f);
        if table.trie_only == 0 {
            return;
        }
        let Routes::Topic(trie) = &table.routes else { return };
        trie.for_each_entry(|pattern, destination| {
            let Destination::Sink(sink) = destination else { return };
            if !pattern.dollar_rule {
                return;
            }
            let routing_key = ShortString::from(pattern.to_string());
            // A sink's entry the index holds the binding of (a pattern its key does not spell)
            // is listed from the index.
            let indexed = table.index.own(&Owner::Sink(sink.sink.id())).is_some_and(|own| {
                own.values()
                    .flat_map(Bucket::as_slice)
                    .any(|b| b.destination == *destination && topic_pattern(&b.key) == *pattern)
            });
            if indexed || dollar_pattern(&routing_key) != *pattern {
                return;
            }
            let key = BindingKey { routing_key, arguments: FieldTable::new(), pattern: KeyPattern::Dollar };
            f(&Binding { key, destination: destination.clone() });
        });
    }

    /// Calls `f` with every binding the index holds, without copying them, and returns how
    /// many more the trie alone keeps (sinks' bindings whose key spells their pattern: MQTT
    /// subscriptions; [`Exchange::in_trie_only`]): for counts over many bindings (`$SYS`'s
    /// subscriptions), where [`Exchange::for_each_binding`] would rebuild each of those.
    pub fn for_each_indexed_binding(&self, f: impl FnMut(&Binding)) -> usize {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table.index.iter().for_each(f);
        table.trie_only
    }

    pub fn binding_count(&self) -> usize {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table.index.len + table.trie_only
    }

    /// Reports the destination of every binding that matches `message` (duplicates included;
    /// the caller removes them).
    pub fn route(&self, message: &Message, mut out: impl FnMut(&Destination)) {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        match &table.routes {
            Routes::Direct(map) => {
                if let Some(list) = map.get(&message.routing_key) {
                    list.iter().for_each(out);
                }
            }
            Routes::Fanout(list) => list.iter().for_each(out),
            Routes::Topic(trie) => {
                // Routing keys that are not UTF-8 cannot match a textual pattern word by word
                // except through wildcards; match them on their lossy text.
                match message.routing_key.as_str() {
                    Some(k) => trie.for_each_match(k, out),
                    None => trie.for_each_match(&message.routing_key.to_string_lossy(), out),
                }
            }
            Routes::Headers(list) => {
                let headers = message.properties.headers.as_ref();
                list.iter().filter(|h| h.matches(headers)).for_each(|h| out(&h.binding.destination));
            }
        }
    }
}

fn topic_pattern(key: &BindingKey) -> Pattern {
    match &key.pattern {
        KeyPattern::Amqp => Pattern::parse_amqp(&key.routing_key.to_string_lossy()),
        KeyPattern::Dollar => dollar_pattern(&key.routing_key),
        KeyPattern::Parsed(p) => (**p).clone(),
    }
}

/// [`KeyPattern::Dollar`]'s reading of a routing key.
fn dollar_pattern(routing_key: &ShortString) -> Pattern {
    Pattern::parse_amqp(&routing_key.to_string_lossy()).with_dollar_rule(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Properties;
    use crate::queue::QueueOptions;
    use crate::sink::Outbox;
    use crate::topic::Level;
    use bytes::Bytes;

    fn queue(name: &str) -> Destination {
        Destination::Queue(Arc::new(Queue::new(name.into(), QueueOptions::default(), 0).unwrap()))
    }

    fn names(x: &Exchange, msg: &Message) -> Vec<String> {
        let mut v = Vec::new();
        x.route(msg, |d| v.push(d.describe()));
        v.sort();
        v
    }

    fn msg(key: &str) -> Message {
        Message::new("x", key, Bytes::from_static(b"p"))
    }

    fn with_headers(pairs: &[(&str, FieldValue)]) -> Message {
        let headers: FieldTable = pairs.iter().map(|(k, v)| (ShortString::from(*k), v.clone())).collect();
        msg("").with_properties(Properties { headers: Some(headers), ..Default::default() })
    }

    fn args(pairs: &[(&str, FieldValue)]) -> FieldTable {
        pairs.iter().map(|(k, v)| (ShortString::from(*k), v.clone())).collect()
    }

    #[test]
    fn direct_routes_on_exact_key() {
        let x = Exchange::new("x", ExchangeKind::Direct, ExchangeOptions::default());
        x.bind(BindingKey::new("a"), queue("q1")).unwrap();
        x.bind(BindingKey::new("b"), queue("q2")).unwrap();
        assert_eq!(names(&x, &msg("a")), vec!["queue 'q1'"]);
        assert!(names(&x, &msg("c")).is_empty());
    }

    #[test]
    fn binding_twice_is_idempotent_and_unbind_reports_absence() {
        let x = Exchange::new("x", ExchangeKind::Direct, ExchangeOptions::default());
        let q = queue("q");
        assert!(x.bind(BindingKey::new("a"), q.clone()).unwrap());
        assert!(!x.bind(BindingKey::new("a"), q.clone()).unwrap());
        assert_eq!(x.binding_count(), 1);
        assert!(x.unbind(&BindingKey::new("a"), &q));
        assert!(!x.unbind(&BindingKey::new("a"), &q));
        assert_eq!(x.binding_count(), 0);
    }

    #[test]
    fn fanout_ignores_the_key() {
        let x = Exchange::new("x", ExchangeKind::Fanout, ExchangeOptions::default());
        x.bind(BindingKey::new("ignored"), queue("q1")).unwrap();
        x.bind(BindingKey::new(""), queue("q2")).unwrap();
        assert_eq!(names(&x, &msg("anything")), vec!["queue 'q1'", "queue 'q2'"]);
    }

    #[test]
    fn topic_uses_amqp_wildcards_unless_given_a_pattern() {
        let x = Exchange::new("x", ExchangeKind::Topic, ExchangeOptions::default());
        x.bind(BindingKey::new("farm.*.soil.#"), queue("amqp")).unwrap();
        // An MQTT filter `farm/*` has a literal `*` level.
        let lit = Pattern {
            levels: vec![crate::topic::Level::Literal("farm".into()), crate::topic::Level::Literal("*".into())],
            dollar_rule: true,
        };
        x.bind(BindingKey::new("farm.*").with_pattern(lit), queue("mqtt")).unwrap();
        assert_eq!(names(&x, &msg("farm.7.soil")), vec!["queue 'amqp'"]);
        assert_eq!(names(&x, &msg("farm.7.soil.ph.raw")), vec!["queue 'amqp'"]);
        assert_eq!(names(&x, &msg("farm.*")), vec!["queue 'mqtt'"]);
        assert!(names(&x, &msg("farm.7")).is_empty());
        // Same routing key text, different pattern: two bindings.
        assert_eq!(x.binding_count(), 2);
        let (mut all, mut parsed) = (0, 0);
        x.for_each_binding(|b| {
            all += 1;
            parsed += usize::from(b.key.pattern.is_parsed());
        });
        assert_eq!((all, parsed), (2, 1), "every binding once, the MQTT one with its pattern");
    }

    #[test]
    fn topic_unbind_removes_from_the_trie() {
        let x = Exchange::new("x", ExchangeKind::Topic, ExchangeOptions::default());
        let q = queue("q");
        x.bind(BindingKey::new("a.#"), q.clone()).unwrap();
        assert!(x.unbind(&BindingKey::new("a.#"), &q));
        assert!(names(&x, &msg("a.b")).is_empty());
    }

    #[test]
    fn headers_all_needs_every_non_x_argument() {
        let x = Exchange::new("x", ExchangeKind::Headers, ExchangeOptions::default());
        x.bind(
            BindingKey::new("")
                .with_arguments(args(&[("format", FieldValue::string("pdf")), ("size", FieldValue::I32(5))])),
            queue("q"),
        )
        .unwrap();
        assert_eq!(
            names(&x, &with_headers(&[("format", FieldValue::string("pdf")), ("size", FieldValue::I64(5))])).len(),
            1
        );
        assert!(names(&x, &with_headers(&[("format", FieldValue::string("pdf"))])).is_empty());
        assert!(
            names(&x, &with_headers(&[("format", FieldValue::string("pdf")), ("size", FieldValue::I32(6))])).is_empty()
        );
        assert!(names(&x, &msg("")).is_empty());
    }

    #[test]
    fn headers_any_needs_one_argument_and_ignores_x_keys() {
        let x = Exchange::new("x", ExchangeKind::Headers, ExchangeOptions::default());
        x.bind(
            BindingKey::new("").with_arguments(args(&[
                ("x-match", FieldValue::string("any")),
                ("a", FieldValue::I8(1)),
                ("x-other", FieldValue::I8(2)),
            ])),
            queue("q"),
        )
        .unwrap();
        assert_eq!(names(&x, &with_headers(&[("a", FieldValue::U8(1))])).len(), 1);
        assert!(names(&x, &with_headers(&[("x-other", FieldValue::I8(2))])).is_empty());
    }

    #[test]
    fn headers_with_x_variants_compare_x_keys_and_void_means_present() {
        let x = Exchange::new("x", ExchangeKind::Headers, ExchangeOptions::default());
        x.bind(
            BindingKey::new("")
                .with_arguments(args(&[("x-match", FieldValue::string("all-with-x")), ("x-k", FieldValue::Void)])),
            queue("q"),
        )
        .unwrap();
        assert_eq!(names(&x, &with_headers(&[("x-k", FieldValue::string("anything"))])).len(), 1);
        assert!(names(&x, &with_headers(&[("y", FieldValue::Void)])).is_empty());
    }

    #[test]
    fn headers_all_with_no_arguments_matches_everything() {
        let x = Exchange::new("x", ExchangeKind::Headers, ExchangeOptions::default());
        x.bind(BindingKey::new(""), queue("q")).unwrap();
        assert_eq!(names(&x, &msg("")).len(), 1);
    }

    #[test]
    fn headers_bad_x_match_is_a_precondition_failure() {
        let x = Exchange::new("x", ExchangeKind::Headers, ExchangeOptions::default());
        let err = x
            .bind(BindingKey::new("").with_arguments(args(&[("x-match", FieldValue::string("some"))])), queue("q"))
            .unwrap_err();
        assert!(matches!(err, CoreError::PreconditionFailed(_)), "{err:?}");
    }

    #[test]
    fn sinks_are_bound_per_cookie_and_unbound_by_predicate() {
        let x = Exchange::new("x", ExchangeKind::Topic, ExchangeOptions::default());
        let sink = DirectSink::new(Outbox::new(8));
        let d = |cookie| Destination::Sink(SinkRef { sink: sink.clone(), cookie });
        x.bind(BindingKey::new("a.*"), d(1)).unwrap();
        x.bind(BindingKey::new("a.#"), d(2)).unwrap();
        x.bind(BindingKey::new("a.#"), queue("q")).unwrap();
        assert_eq!(names(&x, &msg("a.b")).len(), 3);
        let removed = x.unbind_owner(&Owner::Sink(sink.id()));
        assert_eq!(removed.len(), 2);
        assert_eq!(names(&x, &msg("a.b")), vec!["queue 'q'"]);
    }

    /// A direct sink's bindings are indexed by its number, apart from queues' and exchanges'
    /// (a slot of 32 bytes instead of 64, one per subscribed MQTT connection); both are listed,
    /// counted and removed by owner as one index.
    #[test]
    fn sinks_bindings_are_kept_apart_and_listed_with_the_others() {
        let x = Exchange::new("x", ExchangeKind::Topic, ExchangeOptions::default());
        let sink = DirectSink::new(Outbox::new(8));
        let d = |cookie| Destination::Sink(SinkRef { sink: sink.clone(), cookie });
        x.bind(BindingKey::new("a.*"), d(1)).unwrap();
        x.bind(BindingKey::new("a.#"), queue("q")).unwrap();
        {
            let table = x.table.read().unwrap();
            assert_eq!((table.index.sinks.len(), table.index.owners.len()), (1, 1));
        }
        assert_eq!(x.bindings().len(), 2);
        assert!(!x.bind(BindingKey::new("a.*"), d(1)).unwrap());
        assert!(x.unbind(&BindingKey::new("a.*"), &d(1)));
        assert!(x.table.read().unwrap().index.sinks.is_empty());
        assert_eq!(names(&x, &msg("a.b")), vec!["queue 'q'"]);
    }

    /// Every binding keeps a destination in the index and one in the routes: 40 bytes each
    /// while the exchange variant held its name inline.
    #[test]
    fn a_destination_stays_small() {
        assert!(std::mem::size_of::<Destination>() <= 24, "{}", std::mem::size_of::<Destination>());
    }

    /// A topic binding with a parsed pattern keeps the trie's words, not its own copies.
    #[test]
    fn a_topic_binding_shares_the_tries_words() {
        let x = Exchange::new("x", ExchangeKind::Topic, ExchangeOptions::default());
        for (i, q) in ["q1", "q2"].into_iter().enumerate() {
            let key = format!("devices.{i}.cmd");
            x.bind(BindingKey::new(key.as_str()).with_pattern(Pattern::parse_amqp(&key)), queue(q)).unwrap();
        }
        let bindings = x.bindings();
        let word = |b: &Binding| match &b.key.pattern {
            KeyPattern::Parsed(p) => match &p.levels[0] {
                crate::topic::Level::Literal(w) => w.clone(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        assert!(Arc::ptr_eq(&word(&bindings[0]), &word(&bindings[1])));
        assert_eq!(names(&x, &msg("devices.1.cmd")), vec!["queue 'q2'"]);
    }

    /// An MQTT filter's pattern that its routing key spells is not kept: the key is read again
    /// with the `$` rule when it is needed. One the key does not spell (a level that is a
    /// literal `*`) is kept. Both route, unbind and list as before.
    #[test]
    fn a_pattern_the_key_spells_is_not_kept() {
        let x = Exchange::new("x", ExchangeKind::Topic, ExchangeOptions::default());
        let mqtt =
            |key: &str, levels: Vec<Level>| BindingKey::new(key).with_pattern(Pattern { levels, dollar_rule: true });
        let lit = |w: &str| Level::Literal(w.into());
        let plus = mqtt("devices.*.cmd", vec![lit("devices"), Level::One, lit("cmd")]);
        let star = mqtt("devices.*.cmd", vec![lit("devices"), lit("*"), lit("cmd")]);
        let all = mqtt("#", vec![Level::Many]);
        assert_eq!(plus.pattern, KeyPattern::Dollar);
        assert!(matches!(star.pattern, KeyPattern::Parsed(_)));
        assert_eq!(plus.parsed_pattern().unwrap().levels, vec![lit("devices"), Level::One, lit("cmd")]);
        assert!(x.bind(plus.clone(), queue("plus")).unwrap());
        assert!(x.bind(star.clone(), queue("star")).unwrap());
        assert!(x.bind(all.clone(), queue("all")).unwrap());
        assert!(!x.bind(plus.clone(), queue("plus")).unwrap(), "the same binding again");
        assert_eq!(names(&x, &msg("devices.7.cmd")), vec!["queue 'all'", "queue 'plus'"]);
        assert_eq!(names(&x, &msg("devices.*.cmd")), vec!["queue 'all'", "queue 'plus'", "queue 'star'"]);
        // MQTT's `$` rule: a wildcard first level does not match a `$` topic.
        assert!(names(&x, &msg("$SYS.uptime")).is_empty());
        assert!(x.unbind(&plus, &queue("plus")));
        assert_eq!(names(&x, &msg("devices.7.cmd")), vec!["queue 'all'"]);
        assert!(x.unbind(&star, &queue("star")));
        assert!(x.unbind(&all, &queue("all")));
        assert_eq!(x.binding_count(), 0);
        assert!(names(&x, &msg("devices.*.cmd")).is_empty());
    }

    /// The binding index's entry for a binding of one: 120 bytes with a `Pattern` in every key
    /// (jemalloc's 128 class); 104 with [`KeyPattern`] (112).
    #[test]
    fn a_binding_stays_small() {
        assert!(std::mem::size_of::<(u64, Bucket)>() <= 112, "{}", std::mem::size_of::<(u64, Bucket)>());
    }

    #[test]
    fn unbind_owner_removes_only_that_owners_bindings() {
        for kind in [ExchangeKind::Direct, ExchangeKind::Fanout, ExchangeKind::Topic, ExchangeKind::Headers] {
            let x = Exchange::new("x", kind, ExchangeOptions::default());
            let (q1, q2) = (queue("q1"), queue("q2"));
            for key in ["a", "b", "c"] {
                x.bind(BindingKey::new(key), q1.clone()).unwrap();
            }
            x.bind(BindingKey::new("a"), q2.clone()).unwrap();
            assert_eq!(x.binding_count(), 4, "{kind}");
            assert_eq!(x.unbind_owner(&q1.owner()).len(), 3, "{kind}");
            assert_eq!(x.binding_count(), 1, "{kind}");
            assert_eq!(names(&x, &msg("a")), vec!["queue 'q2'"], "{kind}");
            assert!(x.unbind_owner(&q1.owner()).is_empty(), "{kind}");
            assert_eq!(x.bindings().len(), 1, "{kind}");
        }
    }

    #[test]
    fn bindings_differing_only_in_arguments_share_a_route_until_both_go() {
        for kind in [ExchangeKind::Direct, ExchangeKind::Topic] {
            let x = Exchange::new("x", kind, ExchangeOptions::default());
            let q = queue("q");
            let plain = BindingKey::new("a");
            let with_args = BindingKey::new("a").with_arguments(args(&[("k", FieldValue::I8(1))]));
            assert!(x.bind(plain.clone(), q.clone()).unwrap());
            assert!(x.bind(with_args.clone(), q.clone()).unwrap());
            assert!(!x.bind(with_args.clone(), q.clone()).unwrap());
            assert_eq!(x.binding_count(), 2);
            assert!(x.unbind(&plain, &q));
            assert_eq!(names(&x, &msg("a")), vec!["queue 'q'"], "{kind}: the other binding still routes");
            assert!(x.unbind(&with_args, &q));
            assert!(names(&x, &msg("a")).is_empty(), "{kind}");
            assert_eq!(x.binding_count(), 0);
        }
    }

    #[test]
    fn many_sink_bindings_are_added_and_removed_one_by_one() {
        let x = Exchange::new("x", ExchangeKind::Topic, ExchangeOptions::default());
        let sink = DirectSink::new(Outbox::new(8));
        let d = |cookie| Destination::Sink(SinkRef { sink: sink.clone(), cookie });
        let key = |i: u64| BindingKey::new(format!("t.{i}"));
        for i in 0..2000 {
            assert!(x.bind(key(i), d(i)).unwrap());
        }
        assert!(!x.bind(key(7), d(7)).unwrap());
        // Same key, another cookie: another binding.
        assert!(x.bind(key(7), d(9999)).unwrap());
        assert_eq!(x.binding_count(), 2001);
        assert_eq!(names(&x, &msg("t.7")).len(), 2);
        for i in 0..1000 {
            assert!(x.unbind(&key(i), &d(i)));
        }
        assert!(!x.unbind(&key(3), &d(3)));
        assert_eq!(names(&x, &msg("t.7")).len(), 1);
        assert_eq!(x.unbind_owner(&Owner::Sink(sink.id())).len(), 1001);
        assert_eq!(x.binding_count(), 0);
    }

    fn mqtt_key(levels: Vec<Level>) -> BindingKey {
        let pattern = Pattern { levels, dollar_rule: true };
        BindingKey::new(pattern.to_string()).with_pattern(pattern)
    }

    /// An MQTT subscription's binding (a sink's, its key spelling its pattern) has no entry in
    /// the index: the trie's entry is the binding, and it is listed, counted, found and
    /// removed by key from there (issue 18).
    #[test]
    fn a_sinks_binding_whose_key_spells_its_pattern_is_kept_by_the_trie_alone() {
        let x = Exchange::new("x", ExchangeKind::Topic, ExchangeOptions::default());
        let sink = DirectSink::new(Outbox::new(8));
        let d = |cookie| Destination::Sink(SinkRef { sink: sink.clone(), cookie });
        let lit = |w: &str| Level::Literal(w.into());
        let cmd = mqtt_key(vec![lit("devices"), lit("d1"), lit("cmd")]);
        let all = mqtt_key(vec![Level::Many]);
        // A literal `*` level: the key (`a.*`) does not spell the pattern, so the index keeps it.
        let star = BindingKey::new("a.*").with_pattern(Pattern { levels: vec![lit("a"), lit("*")], dollar_rule: true });
        assert_eq!(cmd.pattern, KeyPattern::Dollar);
        assert!(matches!(star.pattern, KeyPattern::Parsed(_)));
        assert!(x.bind(cmd.clone(), d(1)).unwrap());
        assert!(x.bind(all.clone(), d(2)).unwrap());
        assert!(x.bind(star.clone(), d(3)).unwrap());
        assert!(x.bind(BindingKey::new("devices.*.cmd"), queue("q")).unwrap());
        assert!(!x.bind(cmd.clone(), d(1)).unwrap(), "idempotent");
        {
            let table = x.table.read().unwrap();
            assert_eq!((table.index.len, table.trie_only), (2, 2));
            let own = table.index.own(&Owner::Sink(sink.id())).expect("the `*` one");
            assert_eq!(own.len(), 1);
        }
        assert_eq!(x.binding_count(), 4);
        let mut listed: Vec<(String, String, bool)> = x
            .bindings()
            .iter()
            .map(|b| (b.key.routing_key.to_string(), b.destination.describe(), b.key.parsed_pattern().is_some()))
            .collect();
        listed.sort();
        let sink_name = |_| format!("sink {}", sink.id().0);
        assert_eq!(
            listed,
            vec![
                ("#".into(), sink_name(2), true),
                ("a.*".into(), sink_name(3), true),
                ("devices.*.cmd".into(), "queue 'q'".into(), false),
                ("devices.d1.cmd".into(), sink_name(1), true),
            ]
        );
        // What the listing gives back unbinds.
        let again: Vec<Binding> = x.bindings();
        let listed_cmd = again.iter().find(|b| b.key.routing_key == "devices.d1.cmd").unwrap();
        assert_eq!(listed_cmd.key.pattern, KeyPattern::Dollar);
        assert_eq!(names(&x, &msg("devices.d1.cmd")).len(), 3);
        assert_eq!(names(&x, &msg("$SYS.x")).len(), 0, "the $ rule holds");
        // By owner: only the indexed one; the others are unbound by key.
        assert_eq!(x.unbind_owner(&Owner::Sink(sink.id())).len(), 1);
        assert!(x.unbind(&listed_cmd.key, &d(1)));
        assert!(!x.unbind(&cmd, &d(1)));
        assert!(!x.unbind(&all, &d(9)), "another cookie");
        assert!(x.unbind(&all, &d(2)));
        assert_eq!(x.binding_count(), 1);
        assert_eq!(names(&x, &msg("devices.d1.cmd")), vec!["queue 'q'"]);
        assert_eq!(x.table.read().unwrap().trie_only, 0);
    }

    #[test]
    fn alternate_exchange_comes_from_the_arguments() {
        let opts = ExchangeOptions {
            arguments: args(&[("alternate-exchange", FieldValue::string("ae"))]),
            ..Default::default()
        };
        let x = Exchange::new("x", ExchangeKind::Direct, opts);
        assert_eq!(x.alternate().unwrap(), "ae");
    }
}

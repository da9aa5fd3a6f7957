//! Exchanges and their binding tables.
//!
//! An exchange only decides *where* a message goes: [`Exchange::route`] reports every
//! destination of every matching binding. The vhost follows exchange-to-exchange bindings and
//! alternate exchanges, removes duplicates and delivers.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use crate::error::CoreError;
use crate::message::{FieldTable, FieldValue, Message, ShortString};
use crate::queue::Queue;
use crate::sink::DirectSink;
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
#[derive(Debug, Clone)]
pub enum Destination {
    Queue(Arc<Queue>),
    Exchange(ShortString),
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
    /// A pattern parsed by the frontend (MQTT filters); `None` parses `routing_key` with AMQP
    /// topic syntax when the exchange is a topic exchange.
    pub pattern: Option<Pattern>,
}

impl BindingKey {
    pub fn new(routing_key: impl Into<ShortString>) -> BindingKey {
        BindingKey { routing_key: routing_key.into(), ..Default::default() }
    }
    pub fn with_arguments(mut self, arguments: FieldTable) -> BindingKey {
        self.arguments = arguments;
        self
    }
    pub fn with_pattern(mut self, pattern: Pattern) -> BindingKey {
        self.pattern = Some(pattern);
        self
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

#[derive(Debug)]
enum Table {
    Direct(HashMap<ShortString, Vec<Binding>>),
    Fanout(Vec<Binding>),
    Topic { trie: TopicTrie<Destination>, list: Vec<Binding> },
    Headers(Vec<HeadersBinding>),
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
}

impl Exchange {
    pub fn new(name: impl Into<ShortString>, kind: ExchangeKind, options: ExchangeOptions) -> Exchange {
        let alternate = options.arguments.get("alternate-exchange").and_then(|v| v.as_str()).map(ShortString::from);
        let table = match kind {
            ExchangeKind::Direct => Table::Direct(HashMap::new()),
            ExchangeKind::Fanout => Table::Fanout(Vec::new()),
            ExchangeKind::Topic => Table::Topic { trie: TopicTrie::new(), list: Vec::new() },
            ExchangeKind::Headers => Table::Headers(Vec::new()),
        };
        Exchange { name: name.into(), kind, options, alternate, table: RwLock::new(table) }
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

    /// Adds a binding; returns false when an identical one exists (binding is idempotent).
    pub fn bind(&self, key: BindingKey, destination: Destination) -> Result<bool, CoreError> {
        let binding = Binding { key, destination };
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let exists =
            |list: &[Binding], b: &Binding| list.iter().any(|x| x.destination == b.destination && x.key.same(&b.key));
        match &mut *table {
            Table::Direct(map) => {
                let list = map.entry(binding.key.routing_key.clone()).or_default();
                if exists(list, &binding) {
                    return Ok(false);
                }
                list.push(binding);
            }
            Table::Fanout(list) => {
                if exists(list, &binding) {
                    return Ok(false);
                }
                list.push(binding);
            }
            Table::Topic { trie, list } => {
                if exists(list, &binding) {
                    return Ok(false);
                }
                let pattern = topic_pattern(&binding.key);
                trie.insert(&pattern, binding.destination.clone());
                list.push(binding);
            }
            Table::Headers(list) => {
                let hb = HeadersBinding::parse(binding)?;
                if list
                    .iter()
                    .any(|x| x.binding.destination == hb.binding.destination && x.binding.key.same(&hb.binding.key))
                {
                    return Ok(false);
                }
                list.push(hb);
            }
        }
        Ok(true)
    }

    /// Removes a binding; returns false when there was no such binding.
    pub fn unbind(&self, key: &BindingKey, destination: &Destination) -> bool {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let pos = |list: &[Binding]| list.iter().position(|x| x.destination == *destination && x.key.same(key));
        match &mut *table {
            Table::Direct(map) => {
                let Some(list) = map.get_mut(&key.routing_key) else { return false };
                let Some(i) = pos(list) else { return false };
                list.swap_remove(i);
                if list.is_empty() {
                    map.remove(&key.routing_key);
                }
                true
            }
            Table::Fanout(list) => match pos(list) {
                Some(i) => {
                    list.remove(i);
                    true
                }
                None => false,
            },
            Table::Topic { trie, list } => match pos(list) {
                Some(i) => {
                    let b = list.swap_remove(i);
                    trie.remove(&topic_pattern(&b.key), &b.destination);
                    true
                }
                None => false,
            },
            Table::Headers(list) => {
                match list.iter().position(|x| x.binding.destination == *destination && x.binding.key.same(key)) {
                    Some(i) => {
                        list.remove(i);
                        true
                    }
                    None => false,
                }
            }
        }
    }

    /// Removes every binding whose destination satisfies `pred`; returns them.
    pub fn unbind_where(&self, pred: impl Fn(&Destination) -> bool) -> Vec<Binding> {
        let mut removed = Vec::new();
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let take = |list: &mut Vec<Binding>, removed: &mut Vec<Binding>| {
            let mut i = 0;
            while i < list.len() {
                if pred(&list[i].destination) {
                    removed.push(list.remove(i));
                } else {
                    i += 1;
                }
            }
        };
        match &mut *table {
            Table::Direct(map) => {
                for list in map.values_mut() {
                    take(list, &mut removed);
                }
                map.retain(|_, l| !l.is_empty());
            }
            Table::Fanout(list) => take(list, &mut removed),
            Table::Topic { trie, list } => {
                let before = removed.len();
                take(list, &mut removed);
                for b in &removed[before..] {
                    trie.remove(&topic_pattern(&b.key), &b.destination);
                }
            }
            Table::Headers(list) => {
                let mut i = 0;
                while i < list.len() {
                    if pred(&list[i].binding.destination) {
                        removed.push(list.remove(i).binding);
                    } else {
                        i += 1;
                    }
                }
            }
        }
        removed
    }

    /// Every binding of this exchange (as source).
    pub fn bindings(&self) -> Vec<Binding> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        match &*table {
            Table::Direct(map) => map.values().flatten().cloned().collect(),
            Table::Fanout(list) | Table::Topic { list, .. } => list.clone(),
            Table::Headers(list) => list.iter().map(|h| h.binding.clone()).collect(),
        }
    }

    pub fn binding_count(&self) -> usize {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        match &*table {
            Table::Direct(map) => map.values().map(Vec::len).sum(),
            Table::Fanout(list) | Table::Topic { list, .. } => list.len(),
            Table::Headers(list) => list.len(),
        }
    }

    /// Reports the destination of every binding that matches `message` (duplicates included;
    /// the caller removes them).
    pub fn route(&self, message: &Message, mut out: impl FnMut(&Destination)) {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        match &*table {
            Table::Direct(map) => {
                if let Some(list) = map.get(&message.routing_key) {
                    list.iter().for_each(|b| out(&b.destination));
                }
            }
            Table::Fanout(list) => list.iter().for_each(|b| out(&b.destination)),
            Table::Topic { trie, .. } => {
                // Routing keys that are not UTF-8 cannot match a textual pattern word by word
                // except through wildcards; match them on their lossy text.
                match message.routing_key.as_str() {
                    Some(k) => trie.for_each_match(k, out),
                    None => trie.for_each_match(&message.routing_key.to_string_lossy(), out),
                }
            }
            Table::Headers(list) => {
                let headers = message.properties.headers.as_ref();
                list.iter().filter(|h| h.matches(headers)).for_each(|h| out(&h.binding.destination));
            }
        }
    }
}

fn topic_pattern(key: &BindingKey) -> Pattern {
    match &key.pattern {
        Some(p) => p.clone(),
        None => Pattern::parse_amqp(&key.routing_key.to_string_lossy()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ConnectionId, Properties};
    use crate::queue::QueueOptions;
    use crate::sink::Outbox;
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
        let sink = DirectSink::new(ConnectionId(1), Arc::new(Outbox::new(8)));
        let d = |cookie| Destination::Sink(SinkRef { sink: sink.clone(), cookie });
        x.bind(BindingKey::new("a.*"), d(1)).unwrap();
        x.bind(BindingKey::new("a.#"), d(2)).unwrap();
        x.bind(BindingKey::new("a.#"), queue("q")).unwrap();
        assert_eq!(names(&x, &msg("a.b")).len(), 3);
        let id = sink.id();
        let removed = x.unbind_where(|d| matches!(d, Destination::Sink(s) if s.sink.id() == id));
        assert_eq!(removed.len(), 2);
        assert_eq!(names(&x, &msg("a.b")), vec!["queue 'q'"]);
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

//! MQTT topic names and filters: validation, shared subscriptions, and the mapping onto the
//! core's routing keys and patterns.
//!
//! Topic ↔ routing key swaps `/` and `.` character by character: `plant/7.1/temp` is routed as
//! `plant.7/1.temp`. The swap is its own inverse and keeps levels intact, so an AMQP binding
//! `plant.*.temp` sees MQTT levels as AMQP words. Filters are parsed into core [`Pattern`]s
//! here, so a literal `*` in an MQTT filter stays a literal word.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use ferry_core::topic::{Level, Pattern};

/// Topics and filters deeper than this are refused: the trie and the matcher recurse per level,
/// and no real deployment comes near it. Mosquitto's limit is 200 separators (201 levels: its
/// broker tests use `"/" * 200` and expect a close at 201 separators); MQTT itself sets none.
pub const MAX_LEVELS: usize = 201;

/// Swaps `/` and `.` (topic → routing key, and back: the function is an involution). The one
/// copy in the workspace: the ACL's checks of AMQP routing keys and the load generator use it.
pub fn swap_separators(s: &str) -> String {
    // One allocation of the final size (collecting chars grows the string several times).
    let mut out = String::with_capacity(s.len());
    out.extend(s.chars().map(|c| match c {
        '/' => '.',
        '.' => '/',
        c => c,
    }));
    out
}

/// Bytes a [`swap_separators_in`] arena grows by when it has no room: about ten topics of
/// ordinary length. A connection that never publishes keeps none.
pub const TOPIC_ARENA: usize = 512;

/// [`swap_separators`] on bytes, written into `arena` and handed out as a slice of it: the
/// per-message path (topic → routing key on publish, and back on delivery). Once the slices
/// handed out earlier are dropped, `arena` reuses its buffer and nothing is allocated. `/` and
/// `.` are ASCII, so swapping bytes keeps valid UTF-8 valid (no UTF-8 check is needed here).
pub fn swap_separators_in(s: &[u8], arena: &mut BytesMut) -> Bytes {
    if arena.capacity() < s.len() {
        arena.reserve(s.len().max(TOPIC_ARENA));
    }
    arena.extend_from_slice(s);
    for b in arena.iter_mut() {
        *b = match *b {
            b'/' => b'.',
            b'.' => b'/',
            b => b,
        };
    }
    arena.split().freeze()
}

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicError {
    Empty,
    Wildcard,
    BadWildcard,
    TooDeep,
    BadShare,
    /// A PUBLISH (or will) topic starting `$share/`: that prefix names shared subscriptions.
    SharedName,
}

impl std::fmt::Display for TopicError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TopicError::Empty => "empty topic",
            TopicError::Wildcard => "wildcard in a topic name",
            TopicError::BadWildcard => "'+' and '#' must be whole levels and '#' the last level",
            TopicError::TooDeep => "too many levels",
            TopicError::BadShare => "invalid shared subscription ($share/<group>/<filter>)",
            TopicError::SharedName => "a topic name cannot start with $share/ (it names shared subscriptions)",
        })
    }
}

/// Checks a PUBLISH topic name (the codec already refused `+`, `#` and U+0000).
pub fn check_topic_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    // One pass over the bytes (every publish comes through here): the char-pattern `contains`
    // and `split('/')` decoded chars and called libc's `memcmp` per candidate.
    let mut levels = 1;
    let mut wildcard = false;
    for b in topic.bytes() {
        match b {
            b'+' | b'#' => wildcard = true,
            b'/' => levels += 1,
            _ => {}
        }
    }
    if wildcard {
        return Err(TopicError::Wildcard);
    }
    if topic.starts_with("$share/") {
        return Err(TopicError::SharedName);
    }
    if levels > MAX_LEVELS {
        return Err(TopicError::TooDeep);
    }
    Ok(())
}

/// Topics no client may publish to, whatever the ACL says; the publish is refused as not
/// authorized (5.0 QoS 1/2: 0x87), as Mosquitto does, and the connection stays:
/// - `$SYS` and `$SYS/...` are the broker's own (§4.7.2): a client cannot overwrite
///   `$SYS/broker/uptime`. One exception, as in Mosquitto: `$SYS/broker/connection/<id>/state`,
///   where a Mosquitto bridge connected to Ferry reports its link state (its `notifications`
///   are on by default); the ACL still applies to it.
/// - `$share/...` names shared subscriptions, not a topic (§4.8.2).
pub fn server_only(topic: &str) -> bool {
    if let Some(id) = topic.strip_prefix("$SYS/broker/connection/").and_then(|r| r.strip_suffix("/state")) {
        if !id.is_empty() && !id.contains('/') {
            return false;
        }
    }
    topic == "$SYS" || topic.starts_with("$SYS/") || topic.starts_with("$share/")
}

/// Checks a topic filter (§4.7.1): `+` and `#` only as whole levels, `#` only last.
pub fn check_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    let levels: Vec<&str> = filter.split('/').collect();
    if levels.len() > MAX_LEVELS {
        return Err(TopicError::TooDeep);
    }
    for (i, level) in levels.iter().enumerate() {
        let is_last = i + 1 == levels.len();
        match *level {
            "#" if is_last => {}
            "+" => {}
            l if l.contains(['+', '#']) => return Err(TopicError::BadWildcard),
            _ => {}
        }
    }
    Ok(())
}

/// A subscription filter as the broker sees it.
///
/// One string: the shared form's group and filter are slices of the text, not copies of it
/// (a device's one subscription held its filter twice, issue 18).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The filter text as the client sent it (the subscription's key in the session). Shared
    /// with the management view's copy of the subscription ([`Filter::shared_text`]).
    text: Arc<str>,
    /// Where the filter without the `$share/<group>/` prefix starts in `text` (0: not shared).
    start: u32,
}

impl Filter {
    /// Parses and checks a filter, including the shared-subscription form.
    pub fn parse(text: &str) -> Result<Filter, TopicError> {
        if let Some(rest) = text.strip_prefix("$share/") {
            let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
            if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
                return Err(TopicError::BadShare);
            }
            check_filter(filter)?;
            // The packet's length field bounds a filter to 65,535 bytes.
            let start = u32::try_from(text.len() - filter.len()).map_err(|_| TopicError::TooDeep)?;
            return Ok(Filter { text: text.into(), start });
        }
        check_filter(text)?;
        Ok(Filter { text: text.into(), start: 0 })
    }

    /// The filter text as the client sent it.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// [`Filter::text`], for a holder that keeps it too.
    pub fn shared_text(&self) -> Arc<str> {
        self.text.clone()
    }

    /// `Some(group)` for `$share/<group>/<filter>`.
    pub fn share_group(&self) -> Option<&str> {
        match self.start {
            0 => None,
            start => Some(&self.text["$share/".len()..start as usize - 1]),
        }
    }

    /// The filter without the `$share/<group>/` prefix.
    pub fn topic_filter(&self) -> &str {
        &self.text[self.start as usize..]
    }

    /// The core pattern: levels split on `/`, literals with `.` swapped to `/` (as routing keys
    /// carry them), and MQTT's `$` rule on.
    pub fn pattern(&self) -> Pattern {
        let levels = self
            .topic_filter()
            .split('/')
            .map(|l| match l {
                "+" => Level::One,
                "#" => Level::Many,
                lit => Level::Literal(Arc::from(swap_separators(lit))),
            })
            .collect();
        Pattern { levels, dollar_rule: true }
    }

    /// The routing-key text of the binding, as AMQP tools list it (`+` shown as `*`).
    pub fn binding_key(&self) -> String {
        self.topic_filter()
            .split('/')
            .map(|l| match l {
                "+" => "*".to_string(),
                "#" => "#".to_string(),
                lit => swap_separators(lit),
            })
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The name of the queue shared by a group's members: `mqtt-shared.<group>.<filter>`.
    pub fn shared_queue_name(&self) -> Option<String> {
        self.share_group().map(|g| format!("{}{g}.{}", crate::acl::SHARED_QUEUE_PREFIX, self.topic_filter()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separator_swap_is_an_involution() {
        for t in ["a/b.c", "plant/7.1/temp", "/", "..", "$SYS/broker/uptime", ""] {
            assert_eq!(swap_separators(&swap_separators(t)), t);
        }
        assert_eq!(swap_separators("a/b.c"), "a.b/c");
    }

    #[test]
    fn topic_names_refuse_wildcards_and_emptiness() {
        assert!(check_topic_name("a/b").is_ok());
        assert_eq!(check_topic_name(""), Err(TopicError::Empty));
        assert_eq!(check_topic_name("a/+"), Err(TopicError::Wildcard));
        assert_eq!(check_topic_name(&"a/".repeat(201)), Err(TopicError::TooDeep));
        assert!(check_topic_name(&"/".repeat(200)).is_ok());
        assert!(check_filter(&"/".repeat(200)).is_ok());
        assert_eq!(check_filter(&"/".repeat(201)), Err(TopicError::TooDeep));
        assert_eq!(check_topic_name("$share/g/t"), Err(TopicError::SharedName));
        assert!(check_topic_name("$shared/t").is_ok());
    }

    #[test]
    fn sys_and_share_topics_are_the_servers_but_a_bridge_may_report_its_state() {
        for own in ["$SYS", "$SYS/broker/uptime", "$SYS/broker/connection/me", "$SYS/broker/connection//state"] {
            assert!(server_only(own), "{own}");
        }
        for own in ["$SYS/broker/connection/a/b/state", "$share/g/t"] {
            assert!(server_only(own), "{own}");
        }
        for open in ["$SYS/broker/connection/edge-1/state", "$SYSTEM/x", "a/$SYS", "$shared/t", "t"] {
            assert!(!server_only(open), "{open}");
        }
    }

    #[test]
    fn filters_need_whole_level_wildcards_and_hash_last() {
        for ok in ["#", "+", "a/+/b", "a/#", "+/+", "/", "a//b", "$SYS/#"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/#/b", "a+", "a/b#", "#/a", "a/+b"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shared_filters_split_group_and_filter() {
        let f = Filter::parse("$share/g1/farm/+/soil").unwrap();
        assert_eq!(f.share_group(), Some("g1"));
        assert_eq!(f.topic_filter(), "farm/+/soil");
        assert_eq!(f.text(), "$share/g1/farm/+/soil");
        let plain = Filter::parse("farm/+/soil").unwrap();
        assert_eq!((plain.share_group(), plain.topic_filter()), (None, "farm/+/soil"));
        assert_eq!(f.shared_queue_name().unwrap(), "mqtt-shared.g1.farm/+/soil");
        for bad in ["$share/", "$share//a", "$share/g", "$share/g/", "$share/g+/a", "$share/g/a/#/b"] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_keep_literal_stars_and_swap_dots() {
        let f = Filter::parse("a.b/*/+/#").unwrap();
        let p = f.pattern();
        assert_eq!(p.levels, vec![Level::Literal("a/b".into()), Level::Literal("*".into()), Level::One, Level::Many]);
        assert!(p.dollar_rule);
        assert!(p.matches(&swap_separators("a.b/*/x/y/z")));
        assert!(!p.matches(&swap_separators("a.b/x/x/y")));
        assert_eq!(f.binding_key(), "a/b.*.*.#");
    }

    mod routing_props {
        use super::*;
        use ferry_core::topic::TopicTrie;
        use proptest::prelude::*;

        /// MQTT matching straight from the spec (§4.7), on topic and filter as MQTT writes them.
        fn naive_mqtt_match(filter: &str, topic: &str) -> bool {
            let f: Vec<&str> = filter.split('/').collect();
            let t: Vec<&str> = topic.split('/').collect();
            // §4.7.2: a leading wildcard does not match a topic starting with `$`.
            if t[0].starts_with('$') && matches!(f[0], "+" | "#") {
                return false;
            }
            let mut i = 0;
            for level in f {
                if level == "#" {
                    return true; // also matches the parent level: `a/#` matches `a`
                }
                if i == t.len() || (level != "+" && level != t[i]) {
                    return false;
                }
                i += 1;
            }
            i == t.len()
        }

        /// Levels made of characters that matter here: separators of the other side, AMQP's
        /// wildcard, the `$` of system topics, and plain letters (empty levels included).
        fn level() -> impl Strategy<Value = String> {
            proptest::collection::vec(proptest::sample::select(vec!['a', 'b', '.', '*', '$', 'x']), 0..3)
                .prop_map(|c| c.into_iter().collect())
        }

        fn topic() -> impl Strategy<Value = String> {
            proptest::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
        }

        /// A filter derived from a topic (so that it often matches): each level kept, replaced
        /// by `+` or by another literal, levels added or cut, and maybe a trailing `#`.
        fn topic_and_filter() -> impl Strategy<Value = (String, String)> {
            (topic(), proptest::collection::vec((0u8..4, level()), 0..6), 0usize..6, any::<bool>()).prop_map(
                |(topic, edits, keep, hash)| {
                    let levels: Vec<&str> = topic.split('/').collect();
                    let mut f: Vec<String> = Vec::new();
                    for (i, (op, other)) in edits.iter().enumerate().take(keep.max(1)) {
                        let own = levels.get(i).map(|s| s.to_string()).unwrap_or_else(|| other.clone());
                        f.push(match op {
                            0 | 1 => own,
                            2 => "+".to_string(),
                            _ => other.clone(),
                        });
                    }
                    if f.is_empty() || hash {
                        f.push("#".to_string());
                    }
                    (topic, f.join("/"))
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn swap_is_an_involution_on_any_string(s in any::<String>()) {
                prop_assert_eq!(swap_separators(&swap_separators(&s)), s.clone());
                prop_assert_eq!(swap_separators(&s).chars().count(), s.chars().count());
            }

            #[test]
            fn swap_keeps_levels(t in topic()) {
                let key = swap_separators(&t);
                let words: Vec<String> = key.split('.').map(swap_separators).collect();
                let levels: Vec<&str> = t.split('/').collect();
                prop_assert_eq!(words, levels);
            }

            #[test]
            fn core_routing_agrees_with_mqtt_matching((t, f) in topic_and_filter()) {
                prop_assume!(check_topic_name(&t).is_ok() && check_filter(&f).is_ok());
                let want = naive_mqtt_match(&f, &t);
                let filter = Filter::parse(&f).unwrap();
                let key = swap_separators(&t);
                prop_assert_eq!(filter.pattern().matches(&key), want, "pattern {:?} key {:?}", filter.pattern(), key);
                // The trie the exchange routes with agrees too.
                let mut trie = TopicTrie::new();
                trie.insert(&filter.pattern(), 1u8);
                let mut hits = 0;
                trie.for_each_match(&key, |_| hits += 1);
                prop_assert_eq!(hits == 1, want);
                // An AMQP binding with the filter's binding key (`+` shown as `*`) sees the same
                // routing keys, except where AMQP and MQTT differ by design: a literal `*` level
                // is a wildcard to AMQP, and AMQP bindings have no `$` rule.
                if !f.split('/').any(|l| l == "*") && !t.starts_with('$') {
                    let amqp = ferry_core::topic::Pattern::parse_amqp(&filter.binding_key());
                    prop_assert_eq!(amqp.matches(&key), want, "binding {:?} key {:?}", filter.binding_key(), key);
                }
            }
        }
    }
}

//! Topic patterns and the topic trie.
//!
//! Frontends parse their own wildcard syntax into [`Pattern`]s (AMQP `*`/`#` here in
//! [`Pattern::parse_amqp`]; MQTT `+`/`#` in `ferry-mqtt`), so a literal `*` in an MQTT filter
//! stays a literal. Routing keys are split on `.`; an empty routing key has zero levels, as in
//! RabbitMQ.

use std::fmt;
use std::sync::Arc;

/// One level of a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// Matches exactly this word.
    Literal(Arc<str>),
    /// Matches exactly one word (AMQP `*`, MQTT `+`).
    One,
    /// Matches zero or more words (AMQP `#`, MQTT `#`). AMQP allows it anywhere in a pattern.
    Many,
}

/// A parsed binding pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pattern {
    pub levels: Vec<Level>,
    /// MQTT's rule (MQTT 3.1.1 §4.7.2, 5.0 §4.7.2): a pattern whose *first* level is a wildcard
    /// does not match a key whose first word starts with `$`.
    pub dollar_rule: bool,
}

impl Pattern {
    /// Parses an AMQP topic binding key: words split on `.`, `*` and `#` are wildcards only when
    /// they are a whole word (as in RabbitMQ: `a*` is a literal word). The empty key has zero
    /// levels.
    pub fn parse_amqp(key: &str) -> Pattern {
        let levels = if key.is_empty() {
            Vec::new()
        } else {
            key.split('.')
                .map(|w| match w {
                    "*" => Level::One,
                    "#" => Level::Many,
                    lit => Level::Literal(Arc::from(lit)),
                })
                .collect()
        };
        Pattern { levels, dollar_rule: false }
    }

    pub fn with_dollar_rule(mut self, on: bool) -> Pattern {
        self.dollar_rule = on;
        self
    }

    /// The reference matcher: plain recursion over levels. The trie must agree with it (a
    /// proptest checks that); it is also what the retained store uses for one-off lookups.
    pub fn matches(&self, routing_key: &str) -> bool {
        let words: Vec<&str> = split_key(routing_key).collect();
        if self.dollar_rule
            && matches!(self.levels.first(), Some(Level::One | Level::Many))
            && words.first().is_some_and(|w| w.starts_with('$'))
        {
            return false;
        }
        match_levels(&self.levels, &words)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.levels.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match l {
                Level::Literal(s) => f.write_str(s)?,
                Level::One => f.write_str("*")?,
                Level::Many => f.write_str("#")?,
            }
        }
        Ok(())
    }
}

/// Splits a routing key into words; the empty key has none.
pub fn split_key(key: &str) -> impl Iterator<Item = &str> {
    let mut it = key.split('.');
    if key.is_empty() {
        it.next();
    }
    it
}

fn match_levels(pattern: &[Level], words: &[&str]) -> bool {
    match pattern.split_first() {
        None => words.is_empty(),
        Some((Level::Many, rest)) => (0..=words.len()).any(|skip| match_levels(rest, &words[skip..])),
        Some((Level::One, rest)) => !words.is_empty() && match_levels(rest, &words[1..]),
        Some((Level::Literal(lit), rest)) => words.first().is_some_and(|w| **w == **lit) && match_levels(rest, &words[1..]),
    }
}

/// Binding patterns indexed for matching routing keys.
///
/// Placeholder implementation (a linear scan); the trie replaces it behind the same API.
#[derive(Debug, Clone)]
pub struct TopicTrie<T> {
    entries: Vec<(Pattern, T)>,
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        TopicTrie { entries: Vec::new() }
    }
}

impl<T: PartialEq + Clone> TopicTrie<T> {
    pub fn new() -> TopicTrie<T> {
        TopicTrie::default()
    }
    /// Adds `value` under `pattern`; false if that exact pair is already there.
    pub fn insert(&mut self, pattern: &Pattern, value: T) -> bool {
        if self.entries.iter().any(|(p, v)| p == pattern && *v == value) {
            return false;
        }
        self.entries.push((pattern.clone(), value));
        true
    }
    /// Removes `value` from `pattern`; false if it was not there.
    pub fn remove(&mut self, pattern: &Pattern, value: &T) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(p, v)| !(p == pattern && v == value));
        before != self.entries.len()
    }
    /// Calls `f` once per (pattern, value) pair whose pattern matches `routing_key`.
    pub fn for_each_match(&self, routing_key: &str, mut f: impl FnMut(&T)) {
        for (p, v) in &self.entries {
            if p.matches(routing_key) {
                f(v)
            }
        }
    }
    /// Number of (pattern, value) pairs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

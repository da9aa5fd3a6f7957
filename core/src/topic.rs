//! Topic patterns and the topic trie.
//!
//! Frontends parse their own wildcard syntax into [`Pattern`]s (AMQP `*`/`#` here in
//! [`Pattern::parse_amqp`]; MQTT `+`/`#` in `ferry-mqtt`), so a literal `*` in an MQTT filter
//! stays a literal. Routing keys are split on `.`; an empty routing key has zero levels, as in
//! RabbitMQ.

use std::fmt;
use std::sync::Arc;

use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::hash::{FastSet, KeyedState};

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
        Some((Level::Literal(lit), rest)) => {
            words.first().is_some_and(|w| **w == **lit) && match_levels(rest, &words[1..])
        }
    }
}

/// Binding patterns indexed for matching routing keys.
///
/// # Structure
///
/// A trie with one edge per pattern level. Each node keeps its literal children in a short list
/// (up to [`FEW_LITERALS`], searched linearly), or past it a `HashMap<Arc<str>, Node>`, and separate slots for the `One` and `Many` children, plus the
/// entries (`value`, `dollar_rule`) whose pattern ends at that node. Insert and remove walk one
/// node per level; remove prunes nodes left empty, so subscribe/unsubscribe churn frees memory.
///
/// The `$` rule only concerns patterns whose first level is a wildcard, so those patterns
/// (when flagged) live under a second root, `guarded`, which a lookup skips when the key's first
/// word starts with `$`. Every other pattern lives under `root`; its flag is still stored in the
/// entry because `(pattern, value)` identity includes it (an AMQP binding `a.#` and an MQTT
/// subscription `a/#` with the same destination are two entries).
///
/// Lookup is a depth-first walk over the key's words, addressed by byte offset so the key is
/// never split into a `Vec`. A `Many` child is tried at every resume position. A node with at
/// most one `Many` on its path can be reached at a given position in only one way, so the walk
/// cannot report its entries twice; only below a second `Many` (`#.#`, `#.a.#`) can the same
/// (node, position) be reached again, and only there is a per-lookup seen set consulted. That
/// set also bounds the work for patterns like `#.#.#.#` to polynomial in the key length.
#[derive(Debug, Clone)]
pub struct TopicTrie<T> {
    /// Patterns without the `$` rule, and flagged patterns whose first level is a literal (or
    /// that have no levels): for those the rule never applies.
    root: Node<T>,
    /// Flagged patterns whose first level is `One` or `Many`. Only its `one`/`many` slots are used.
    guarded: Node<T>,
    len: usize,
    /// Words this trie made keys of lately ([`TopicTrie::insert_sharing`]), so that a word new
    /// to one node but known to another is one allocation: each device's `cmd` in
    /// `devices/<id>/cmd` is the same `Arc` (issue 18: 32 bytes of every device's subscription).
    /// Made by the first `insert_sharing` (exchanges'; the tries of persistent sessions do
    /// without).
    words: Option<Box<RecentWords>>,
}

/// A small direct-mapped cache of words by hash: a word shared by many patterns (`cmd`) stays,
/// a word of one (`<id>`) takes a slot until another word hashes to it.
#[derive(Debug, Clone, Default)]
struct RecentWords([Option<Arc<str>>; RECENT_WORDS]);

const RECENT_WORDS: usize = 16;

impl RecentWords {
    fn slot(word: &str) -> usize {
        // FNV-1a: a bind, not the hot path, and the keys need not be hard to collide.
        let h = word.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        (h % RECENT_WORDS as u64) as usize
    }
    /// The cached `Arc` of `word`, if there is one; otherwise `word` is cached.
    fn share(&mut self, word: &mut Arc<str>) {
        let slot = &mut self.0[Self::slot(word)];
        match slot {
            Some(w) if **w == **word => *word = w.clone(),
            _ => *slot = Some(word.clone()),
        }
    }
}

#[derive(Debug, Clone)]
struct Node<T> {
    literal: Literals<T>,
    one: Option<Box<Node<T>>>,
    many: Option<Box<Node<T>>>,
    /// Entries whose pattern ends here. Usually 0 or 1 long.
    entries: Entries<T>,
}

/// A node's entries: up to [`FEW_ENTRIES`] in a slice allocated to fit, a `Vec` past that (a
/// pattern thousands of clients share grows amortised, not by a copy per subscriber). 16
/// bytes, a `Vec`'s 24: with [`Literals`] at 16 a node is 48 bytes, jemalloc's 48 class (it was
/// 64), and a list of one child with its node 64 (was 80): 32 bytes of every device under
/// `devices/<id>/cmd` (issue 18).
#[derive(Debug, Clone)]
enum Entries<T> {
    Few(Box<[Entry<T>]>),
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Entry<T>>>),
}

const FEW_ENTRIES: usize = 4;

impl<T> Entries<T> {
    fn as_slice(&self) -> &[Entry<T>] {
        match self {
            Entries::Few(v) => v,
            Entries::Many(v) => v,
        }
    }

    fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    fn push(&mut self, entry: Entry<T>) {
        match self {
            Entries::Few(v) if v.len() < FEW_ENTRIES => {
                let mut grown = std::mem::take(v).into_vec();
                grown.reserve_exact(1);
                grown.push(entry);
                *v = grown.into_boxed_slice();
            }
            Entries::Few(v) => {
                let mut many = std::mem::take(v).into_vec();
                many.push(entry);
                *self = Entries::Many(Box::new(many));
            }
            Entries::Many(v) => v.push(entry),
        }
    }

    fn swap_remove(&mut self, i: usize) {
        match self {
            Entries::Few(v) => {
                let mut left = std::mem::take(v).into_vec();
                left.swap_remove(i);
                *v = left.into_boxed_slice();
            }
            Entries::Many(v) => {
                v.swap_remove(i);
                if v.len() <= FEW_ENTRIES {
                    *self = Entries::Few(std::mem::take(&mut **v).into_boxed_slice());
                } else if v.len() * 4 <= v.capacity() {
                    v.shrink_to_fit();
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Entry<T> {
    value: T,
    dollar_rule: bool,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node { literal: Literals::Few(Box::default()), one: None, many: None, entries: Entries::Few(Box::default()) }
    }
}

/// Up to this many literal children a node keeps them in a list: with one MQTT device per
/// subscription (`devices/<id>/cmd`) most nodes have one child, and a hash map for one child is
/// a table of four (about 440 bytes; the list of one, about 100).
const FEW_LITERALS: usize = 4;

/// A node's literal children.
#[derive(Debug, Clone)]
enum Literals<T> {
    /// At most [`FEW_LITERALS`], searched linearly (cheaper than hashing the word).
    Few(Box<[(Arc<str>, Node<T>)]>),
    /// Boxed: the map with its hasher is 48 bytes, the list 16, and every node holds one.
    Many(Box<Children<T>>),
}

/// A map of many literal children, each keeping its own word ([`Child::word`]): a table of
/// children, 16 bytes a slot, where a map from the word to the child was 32 (the word's `Arc`
/// beside the child). A map's table has room for up to twice its children: with 10,000 devices
/// under `devices/` its 16,384 slots were 54 bytes of every device, and are 27 (issue 18).
/// Looked up by the word's hash, keyed per map (a client chooses the words, see
/// [`crate::hash`]).
#[derive(Debug, Clone)]
struct Children<T> {
    hasher: KeyedState,
    table: HashTable<Child<T>>,
}

impl<T> Children<T> {
    fn new() -> Children<T> {
        Children { hasher: KeyedState::default(), table: HashTable::new() }
    }

    fn get(&self, word: &str) -> Option<&Child<T>> {
        self.table.find(self.hasher.hash_one(word), |c| c.word() == word)
    }

    fn get_mut(&mut self, word: &str) -> Option<&mut Child<T>> {
        let hash = self.hasher.hash_one(word);
        self.table.find_mut(hash, |c| c.word() == word)
    }

    /// Adds a child whose word is not in the map yet.
    fn insert_new(&mut self, child: Child<T>) {
        let hasher = &self.hasher;
        self.table.insert_unique(hasher.hash_one(child.word()), child, |c| hasher.hash_one(c.word()));
    }

    fn remove(&mut self, word: &str) {
        let hash = self.hasher.hash_one(word);
        if let Ok(found) = self.table.find_entry(hash, |c| c.word() == word) {
            found.remove();
        }
        // A map that once held many children keeps its table otherwise; give it back once it
        // is mostly empty (amortised: only after shrinking by 4x).
        if self.table.capacity() > 16 && self.table.len() * 4 <= self.table.capacity() {
            let hasher = &self.hasher;
            self.table.shrink_to_fit(|c| hasher.hash_one(c.word()));
        }
    }
}

/// A child in a map of many: a node with its word, or a *tail*, the rest of one pattern whose
/// levels from the map's key on are all literal words, with its one entry. A device's
/// `devices/<id>/cmd` is then one tail under `devices/` (48 bytes, and its words' text) where
/// it was the `<id>` node (48), its list of one child `cmd` with that node (64) and the entry's
/// list (32), issue 18. A second pattern through the same key makes the tail nodes again.
#[derive(Debug, Clone)]
enum Child<T> {
    Node(Box<WordNode<T>>),
    Tail(Box<Tail<T>>),
}

impl<T> Child<T> {
    /// The word the map finds this child by.
    fn word(&self) -> &str {
        match self {
            Child::Node(n) => &n.word,
            Child::Tail(t) => t.word(),
        }
    }
}

/// A node in a map of many, with its word.
#[derive(Debug, Clone)]
struct WordNode<T> {
    word: Arc<str>,
    node: Node<T>,
}

#[derive(Debug, Clone)]
struct Tail<T> {
    /// The map's key and the words after it, joined with `.` as a routing key spells them (a
    /// word holds no `.`: [`tail_text`]): a tail matches a key whose rest is this text. One
    /// allocation, where the key's `Arc` and a list of the words' `Arc`s were two or more (32
    /// and 16 bytes for `<id>` and `cmd`, issue 18).
    text: Box<str>,
    entry: Entry<T>,
}

impl<T> Tail<T> {
    /// The map's key: the text's first word.
    fn word(&self) -> &str {
        self.text.split('.').next().unwrap_or_default()
    }
}

impl<T: PartialEq> Tail<T> {
    /// Whether `levels` are this tail's words after its key.
    fn spells(&self, levels: &[Level]) -> bool {
        let mut words = self.text.split('.').skip(1);
        levels.iter().all(|l| matches!((l, words.next()), (Level::Literal(x), Some(w)) if **x == *w))
            && words.next().is_none()
    }

    /// The tail as a node under its key.
    fn into_node(self) -> Node<T> {
        let mut node = Node::default();
        let mut levels: Vec<Level> = self.text.split('.').skip(1).map(|w| Level::Literal(Arc::from(w))).collect();
        node.insert(&mut levels, self.entry);
        node
    }
}

/// The text of a tail for `word` then `levels`, when they are all literal words. A word with a
/// `.` (none is made so: words are a routing key's, or an MQTT filter's levels with `.` swapped
/// to `/`) would not split back into itself, and gets nodes.
fn tail_text(word: &str, levels: &[Level]) -> Option<Box<str>> {
    if word.contains('.') {
        return None;
    }
    let mut text = String::from(word);
    for level in levels {
        match level {
            Level::Literal(w) if !w.contains('.') => {
                text.push('.');
                text.push_str(w);
            }
            _ => return None,
        }
    }
    Some(text.into_boxed_str())
}

/// A literal child as a lookup finds it.
enum ChildRef<'a, T> {
    Node(&'a Node<T>),
    Tail(&'a Tail<T>),
}

enum ChildMut<'a, T> {
    Node(&'a mut Node<T>),
    Tail(&'a mut Tail<T>),
}

impl<T> Literals<T> {
    fn is_empty(&self) -> bool {
        match self {
            Literals::Few(v) => v.is_empty(),
            Literals::Many(m) => m.table.is_empty(),
        }
    }

    fn get(&self, word: &str) -> Option<ChildRef<'_, T>> {
        match self {
            Literals::Few(v) => v.iter().find(|(w, _)| **w == *word).map(|(_, n)| ChildRef::Node(n)),
            Literals::Many(m) => m.get(word).map(|c| match c {
                Child::Node(n) => ChildRef::Node(&n.node),
                Child::Tail(t) => ChildRef::Tail(t),
            }),
        }
    }

    fn get_mut(&mut self, word: &str) -> Option<ChildMut<'_, T>> {
        match self {
            Literals::Few(v) => v.iter_mut().find(|(w, _)| **w == *word).map(|(_, n)| ChildMut::Node(n)),
            Literals::Many(m) => m.get_mut(word).map(|c| match c {
                Child::Node(n) => ChildMut::Node(&mut n.node),
                Child::Tail(t) => ChildMut::Tail(t),
            }),
        }
    }

    /// Adds `entry` under `word` then `rest` (a bind, not the hot path); `word` is made the
    /// `Arc` the trie keeps. In a map, a new key whose `rest` is all literal gets a [`Tail`].
    fn insert(&mut self, word: &mut Arc<str>, rest: &mut [Level], entry: Entry<T>) -> bool
    where
        T: PartialEq,
    {
        if let Literals::Few(v) = self {
            if v.len() == FEW_LITERALS && !v.iter().any(|(w, _)| *w == *word) {
                let children = std::mem::take(v).into_vec().into_iter();
                let mut many = Children::new();
                for (word, node) in children {
                    many.insert_new(Child::Node(Box::new(WordNode { word, node })));
                }
                *self = Literals::Many(Box::new(many));
            }
        }
        match self {
            Literals::Few(v) => {
                let i = match v.iter().position(|(w, _)| *w == *word) {
                    Some(i) => i,
                    None => {
                        // Grow one at a time: most nodes keep one child.
                        let mut grown = std::mem::take(v).into_vec();
                        grown.reserve_exact(1);
                        grown.push((word.clone(), Node::default()));
                        *v = grown.into_boxed_slice();
                        v.len() - 1
                    }
                };
                let (kept, child) = &mut v[i];
                if !Arc::ptr_eq(kept, word) {
                    *word = kept.clone();
                }
                child.insert(rest, entry)
            }
            Literals::Many(m) => {
                let Some(child) = m.get_mut(word) else {
                    let child = match tail_text(word, rest) {
                        Some(text) => Child::Tail(Box::new(Tail { text, entry })),
                        None => {
                            let mut node = Node::default();
                            node.insert(rest, entry);
                            Child::Node(Box::new(WordNode { word: word.clone(), node }))
                        }
                    };
                    m.insert_new(child);
                    return true;
                };
                if let Child::Tail(t) = child {
                    if t.spells(rest) && t.entry == entry {
                        return false;
                    }
                    // Another pattern through this key: the tail becomes nodes.
                    let node = WordNode { word: word.clone(), node: Node::default() };
                    let Child::Tail(t) = std::mem::replace(child, Child::Node(Box::new(node))) else {
                        unreachable!("a tail")
                    };
                    if let Child::Node(n) = child {
                        n.node = t.into_node();
                    }
                }
                match child {
                    Child::Node(n) => {
                        if !Arc::ptr_eq(&n.word, word) {
                            *word = n.word.clone();
                        }
                        n.node.insert(rest, entry)
                    }
                    Child::Tail(_) => unreachable!("made a node above"),
                }
            }
        }
    }

    fn remove(&mut self, word: &str) {
        match self {
            Literals::Few(v) => {
                if let Some(i) = v.iter().position(|(w, _)| **w == *word) {
                    let mut left = std::mem::take(v).into_vec();
                    left.swap_remove(i);
                    *v = left.into_boxed_slice();
                }
            }
            Literals::Many(m) => m.remove(word),
        }
    }

    #[cfg(test)]
    fn count(&self) -> usize {
        match self {
            Literals::Few(v) => v.iter().map(|(_, n)| n.count()).sum(),
            Literals::Many(m) => m
                .table
                .iter()
                .map(|c| match c {
                    Child::Node(n) => n.node.count(),
                    Child::Tail(_) => 1,
                })
                .sum(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.literal.is_empty() && self.one.is_none() && self.many.is_none()
    }

    /// True when nothing hangs below this node: a `Many` leading here can only end at the end of
    /// the key, so the walk need not try every resume position.
    fn is_leaf(&self) -> bool {
        self.literal.is_empty() && self.one.is_none() && self.many.is_none()
    }

    #[cfg(test)]
    fn count(&self) -> usize {
        1 + self.literal.count()
            + self.one.as_deref().map_or(0, Node::count)
            + self.many.as_deref().map_or(0, Node::count)
    }
}

impl<T: PartialEq> Node<T> {
    /// Adds `entry` at the end of `levels`; false if it is there. Literal levels are made to
    /// share the words the trie keeps.
    fn insert(&mut self, levels: &mut [Level], entry: Entry<T>) -> bool {
        let Some((first, rest)) = levels.split_first_mut() else {
            if self.entries.as_slice().contains(&entry) {
                return false;
            }
            self.entries.push(entry);
            return true;
        };
        match first {
            Level::Literal(w) => self.literal.insert(w, rest, entry),
            Level::One => self.one.get_or_insert_with(Box::default).insert(rest, entry),
            Level::Many => self.many.get_or_insert_with(Box::default).insert(rest, entry),
        }
    }

    /// Removes the entry at the end of `levels`, pruning children left empty on the way back up.
    fn remove(&mut self, levels: &[Level], entry: &Entry<T>) -> bool {
        let Some((first, rest)) = levels.split_first() else {
            let Some(i) = self.entries.as_slice().iter().position(|e| e == entry) else {
                return false;
            };
            self.entries.swap_remove(i);
            return true;
        };
        match first {
            Level::Literal(w) => {
                let prune = match self.literal.get_mut(w) {
                    None => return false,
                    Some(ChildMut::Tail(t)) => {
                        if !(t.spells(rest) && t.entry == *entry) {
                            return false;
                        }
                        true
                    }
                    Some(ChildMut::Node(child)) => {
                        if !child.remove(rest, entry) {
                            return false;
                        }
                        child.is_empty()
                    }
                };
                if prune {
                    self.literal.remove(w);
                }
                true
            }
            Level::One => Self::remove_boxed(&mut self.one, rest, entry),
            Level::Many => Self::remove_boxed(&mut self.many, rest, entry),
        }
    }

    fn remove_boxed(slot: &mut Option<Box<Node<T>>>, rest: &[Level], entry: &Entry<T>) -> bool {
        let Some(child) = slot.as_deref_mut() else {
            return false;
        };
        if !child.remove(rest, entry) {
            return false;
        }
        if child.is_empty() {
            *slot = None;
        }
        true
    }
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        TopicTrie { root: Node::default(), guarded: Node::default(), len: 0, words: None }
    }
}

impl<T: PartialEq + Clone> TopicTrie<T> {
    pub fn new() -> TopicTrie<T> {
        TopicTrie::default()
    }

    /// Whether `pattern` lives under `guarded` rather than `root` (see the type's doc comment).
    fn is_guarded(pattern: &Pattern) -> bool {
        pattern.dollar_rule && matches!(pattern.levels.first(), Some(Level::One | Level::Many))
    }

    /// Adds `value` under `pattern`; false if that exact pair is already there.
    pub fn insert(&mut self, pattern: &Pattern, value: T) -> bool {
        self.insert_inner(&mut pattern.clone(), value)
    }

    /// [`TopicTrie::insert`], and `pattern`'s literal words are then the trie's own (one
    /// allocation of `devices` for every `devices/<id>/cmd` an exchange's bindings keep, not
    /// one per subscription).
    pub fn insert_sharing(&mut self, pattern: &mut Pattern, value: T) -> bool {
        let words = self.words.get_or_insert_with(Box::default);
        for level in &mut pattern.levels {
            if let Level::Literal(w) = level {
                words.share(w);
            }
        }
        self.insert_inner(pattern, value)
    }

    fn insert_inner(&mut self, pattern: &mut Pattern, value: T) -> bool {
        let root = if Self::is_guarded(pattern) { &mut self.guarded } else { &mut self.root };
        let added = root.insert(&mut pattern.levels, Entry { value, dollar_rule: pattern.dollar_rule });
        self.len += usize::from(added);
        added
    }

    /// Removes `value` from `pattern`; false if it was not there.
    pub fn remove(&mut self, pattern: &Pattern, value: &T) -> bool {
        let root = if Self::is_guarded(pattern) { &mut self.guarded } else { &mut self.root };
        // The entry is compared by value, so it needs an owned T; a clone of an Arc-holding enum
        // is a refcount bump, and remove is not the hot path.
        let entry = Entry { value: value.clone(), dollar_rule: pattern.dollar_rule };
        let removed = root.remove(&pattern.levels, &entry);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `f` once per (pattern, value) pair whose pattern matches `routing_key`.
    pub fn for_each_match(&self, routing_key: &str, f: impl FnMut(&T)) {
        let mut walk = Walk { key: routing_key, end: routing_key.len() + 1, f, seen: None };
        // Position `end` (one past the key) means "no words left"; the empty key has no words.
        let start = if routing_key.is_empty() { walk.end } else { 0 };
        walk.node(&self.root, start, 0);
        // `$`-words are hidden from flagged leading wildcards. An empty key has no first word.
        if !routing_key.starts_with('$') {
            walk.node(&self.guarded, start, 0);
        }
    }

    /// Calls `f` with every (pattern, value) pair, the pattern rebuilt from the trie's path
    /// (a listing, not the hot path: an exchange lists the bindings it keeps only here).
    pub fn for_each_entry(&self, mut f: impl FnMut(&Pattern, &T)) {
        let mut pattern = Pattern { levels: Vec::new(), dollar_rule: false };
        Self::entries_below(&self.root, &mut pattern, &mut f);
        Self::entries_below(&self.guarded, &mut pattern, &mut f);
    }

    fn entries_below(node: &Node<T>, pattern: &mut Pattern, f: &mut impl FnMut(&Pattern, &T)) {
        for e in node.entries.as_slice() {
            pattern.dollar_rule = e.dollar_rule;
            f(pattern, &e.value);
        }
        let depth = pattern.levels.len();
        let literal = |w: &Arc<str>, child: &Node<T>, pattern: &mut Pattern, f: &mut _| {
            pattern.levels.push(Level::Literal(w.clone()));
            Self::entries_below(child, pattern, f);
            pattern.levels.truncate(depth);
        };
        match &node.literal {
            Literals::Few(v) => v.iter().for_each(|(w, n)| literal(w, n, pattern, f)),
            Literals::Many(m) => {
                for child in m.table.iter() {
                    match child {
                        Child::Node(n) => literal(&n.word, &n.node, pattern, f),
                        Child::Tail(t) => {
                            pattern.levels.extend(t.text.split('.').map(|w| Level::Literal(Arc::from(w))));
                            pattern.dollar_rule = t.entry.dollar_rule;
                            f(pattern, &t.entry.value);
                            pattern.levels.truncate(depth);
                        }
                    }
                }
            }
        }
        for (level, child) in [(Level::One, &node.one), (Level::Many, &node.many)] {
            if let Some(n) = child {
                pattern.levels.push(level);
                Self::entries_below(n, pattern, f);
                pattern.levels.truncate(depth);
            }
        }
    }

    /// Number of (pattern, value) pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Nodes in both roots, the roots included (so an empty trie has 2).
    #[cfg(test)]
    fn node_count(&self) -> usize {
        self.root.count() + self.guarded.count()
    }
}

/// State of one lookup. Positions are byte offsets of the next word's start in `key`; `end`
/// (`key.len() + 1`) means every word has been consumed. Offsets rather than a split `Vec<&str>`
/// keep the lookup allocation-free.
struct Walk<'k, F> {
    key: &'k str,
    end: usize,
    f: F,
    /// (node address, position) pairs already visited below two or more `Many` levels. Created
    /// only when such a pattern is reached, so ordinary lookups neither hash nor allocate.
    seen: Option<FastSet<(usize, usize)>>,
}

impl<F> Walk<'_, F> {
    /// The word starting at `pos` (< end) and the position after it.
    fn word_at(&self, pos: usize) -> (&str, usize) {
        let rest = &self.key[pos..];
        // A byte search: `str::find('.')` went through the char searcher, which called libc's
        // `memcmp` for every candidate (with it 5 % of the broker's CPU on MQTT QoS 0 1->1).
        // `.` is ASCII, so the index is a char boundary.
        match rest.bytes().position(|b| b == b'.') {
            Some(i) => (&rest[..i], pos + i + 1),
            None => (rest, self.end),
        }
    }

    /// Visits `node`, whose pattern prefix has matched the words before `pos`. `manys` is the
    /// number of `Many` levels on the path to `node`.
    fn node<T>(&mut self, node: &Node<T>, pos: usize, manys: u32)
    where
        F: FnMut(&T),
    {
        // With at most one `Many` on the path, (node, pos) is reached at most once (the `Many`
        // absorbs a determined number of words), so only deeper nodes need the seen set.
        if manys >= 2 && !self.seen.get_or_insert_with(FastSet::default).insert((node as *const Node<T> as usize, pos))
        {
            return;
        }
        if pos == self.end {
            for e in node.entries.as_slice() {
                (self.f)(&e.value);
            }
            // A trailing `#` (or `#.#`…) matches zero words.
            if let Some(many) = node.many.as_deref() {
                self.node(many, pos, manys + 1);
            }
            return;
        }
        let (word, next) = self.word_at(pos);
        match node.literal.get(word) {
            Some(ChildRef::Node(child)) => self.node(child, next, manys),
            Some(ChildRef::Tail(tail)) => self.tail(tail, pos),
            None => {}
        }
        if let Some(child) = node.one.as_deref() {
            self.node(child, next, manys);
        }
        if let Some(many) = node.many.as_deref() {
            self.many(many, pos, manys + 1);
        }
    }

    /// Reports a tail's entry when the key from `pos` (its word's start) to the end is its text.
    fn tail<T>(&mut self, tail: &Tail<T>, pos: usize)
    where
        F: FnMut(&T),
    {
        if self.key.get(pos..) == Some(&*tail.text) {
            (self.f)(&tail.entry.value);
        }
    }

    /// Visits the child of a `Many` edge at every position from `pos` to the end: the `#` absorbs
    /// zero, one, … or all remaining words.
    fn many<T>(&mut self, many: &Node<T>, mut pos: usize, manys: u32)
    where
        F: FnMut(&T),
    {
        if many.is_leaf() {
            // Only the end position can report anything (`a.#`, the common case).
            return self.node(many, self.end, manys);
        }
        loop {
            self.node(many, pos, manys);
            if pos == self.end {
                return;
            }
            pos = self.word_at(pos).1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn amqp(key: &str) -> Pattern {
        Pattern::parse_amqp(key)
    }

    /// An AMQP-syntax pattern with MQTT's `$` rule, as the MQTT frontend builds it.
    fn flagged(key: &str) -> Pattern {
        Pattern::parse_amqp(key).with_dollar_rule(true)
    }

    fn trie_of(patterns: &[Pattern]) -> TopicTrie<usize> {
        let mut t = TopicTrie::new();
        for (i, p) in patterns.iter().enumerate() {
            assert!(t.insert(p, i));
        }
        t
    }

    /// Values reported for `key`, sorted (so duplicates stay visible).
    fn matched<T: PartialEq + Clone + Ord>(t: &TopicTrie<T>, key: &str) -> Vec<T> {
        let mut out = Vec::new();
        t.for_each_match(key, |v| out.push(v.clone()));
        out.sort();
        out
    }

    fn hits(pattern: Pattern, key: &str) -> usize {
        matched(&trie_of(&[pattern]), key).len()
    }

    /// The literal child `word` of `node`, which must be a node (not a [`Tail`]).
    fn child<'a, T>(node: &'a Node<T>, word: &str) -> &'a Node<T> {
        match node.literal.get(word) {
            Some(ChildRef::Node(n)) => n,
            Some(ChildRef::Tail(_)) => panic!("{word}: a tail"),
            None => panic!("{word}: none"),
        }
    }

    #[test]
    fn literal_children_move_to_a_map_past_a_few() {
        let patterns: Vec<Pattern> = (0..(FEW_LITERALS * 3)).map(|i| amqp(&format!("d.{i}.cmd"))).collect();
        let mut t = trie_of(&patterns);
        assert!(matches!(child(&t.root, "d").literal, Literals::Many(_)));
        for (i, p) in patterns.iter().enumerate() {
            assert_eq!(matched(&t, &format!("d.{i}.cmd")), vec![i]);
            // The first few were nodes before the map was made; the rest are tails.
            match child(&t.root, "d").literal.get(&i.to_string()).unwrap() {
                ChildRef::Node(n) => {
                    assert!(i < FEW_LITERALS);
                    assert!(matches!(&child(n, "cmd").entries, Entries::Few(v) if v.len() == 1));
                }
                ChildRef::Tail(tail) => {
                    assert!(i >= FEW_LITERALS);
                    assert_eq!(&*tail.text, format!("{i}.cmd"));
                }
            }
            assert!(t.remove(p, &i));
            assert!(matched(&t, &format!("d.{i}.cmd")).is_empty());
        }
        assert!(t.root.is_empty());
        assert_eq!(t.root.count(), 1);
    }

    #[test]
    fn insert_sharing_gives_the_pattern_the_tries_words() {
        let mut t = TopicTrie::new();
        let (mut a, mut b) = (amqp("devices.a.cmd"), amqp("devices.b.cmd"));
        assert!(t.insert_sharing(&mut a, 1));
        assert!(t.insert_sharing(&mut b, 2));
        let word = |p: &Pattern, i: usize| match &p.levels[i] {
            Level::Literal(w) => w.clone(),
            other => panic!("{other:?}"),
        };
        assert!(Arc::ptr_eq(&word(&a, 0), &word(&b, 0)));
        assert!(Arc::ptr_eq(&word(&a, 2), &word(&b, 2)), "different nodes share their `cmd` too");
        assert_eq!(b, amqp("devices.b.cmd"));
        assert!(t.remove(&amqp("devices.a.cmd"), &1));
        assert_eq!(matched(&t, "devices.b.cmd"), vec![2]);
    }

    /// Across a fleet, the words new to a node but known elsewhere (`cmd`) are mostly one
    /// allocation: a device's id evicts a cached word only when it hashes to its slot.
    #[test]
    fn a_fleet_of_devices_mostly_shares_one_cmd() {
        let mut t = TopicTrie::new();
        let mut cmds: Vec<Arc<str>> = Vec::new();
        for i in 0..1_000 {
            let mut p = amqp(&format!("devices.device-{i}.cmd"));
            assert!(t.insert_sharing(&mut p, i));
            match &p.levels[2] {
                Level::Literal(w) if !cmds.iter().any(|c| Arc::ptr_eq(c, w)) => cmds.push(w.clone()),
                _ => {}
            }
        }
        assert!(cmds.len() < 150, "{} allocations of `cmd` for 1,000 devices", cmds.len());
        assert_eq!(matched(&t, "devices.device-999.cmd"), vec![999]);
        // The plain insert (persistent sessions' tries) keeps no cache.
        let mut plain = TopicTrie::new();
        plain.insert(&amqp("a.b"), 1);
        assert!(plain.words.is_none());
    }

    #[test]
    fn a_node_stays_small() {
        // One per level of every binding pattern; it was 88 bytes with a HashMap for the
        // literal children (docs/benchmarks.md, idle connections with a subscription).
        // 64 with a `Vec` for the entries and for the literal children.
        assert!(std::mem::size_of::<Node<u64>>() <= 48, "{}", std::mem::size_of::<Node<u64>>());
        assert!(std::mem::size_of::<Node<crate::exchange::Destination>>() <= 48);
        let mut t = TopicTrie::new();
        t.insert(&amqp("devices.d1.cmd"), 1u64);
        assert!(matches!(&child(&t.root, "devices").literal, Literals::Few(v) if v.len() == 1));
        let tail = std::mem::size_of::<Tail<crate::exchange::Destination>>();
        assert!(tail <= 48, "a tail is {tail} bytes");
    }

    /// A tail's text is its words joined by `.`, so it is made only of literal words without a
    /// `.`; empty words are words, and a key with one word more or less does not match it.
    #[test]
    fn a_tail_is_its_words_text() {
        let lit = |w: &str| Level::Literal(Arc::from(w));
        assert_eq!(tail_text("d1", &[lit("cmd")]).as_deref(), Some("d1.cmd"));
        assert_eq!(tail_text("", &[lit(""), lit("x")]).as_deref(), Some("..x"));
        assert_eq!(tail_text("d1", &[]).as_deref(), Some("d1"));
        assert!(tail_text("d1", &[Level::One]).is_none());
        assert!(tail_text("d1", &[lit("a.b")]).is_none());
        assert!(tail_text("a.b", &[]).is_none());

        let mut patterns: Vec<Pattern> = (0..(FEW_LITERALS + 2)).map(|i| amqp(&format!("d.{i}.cmd"))).collect();
        patterns.extend([amqp("d..cmd"), amqp("d."), amqp("d.e..")]);
        let t = trie_of(&patterns);
        assert!(matches!(child(&t.root, "d").literal, Literals::Many(_)));
        for (i, p) in patterns.iter().enumerate() {
            assert_eq!(matched(&t, &p.to_string()), vec![i], "{p}");
        }
        for key in ["d..cmd.", "d", "d.e.", "d.e...", "d.5", "d.5.cmd.x", "d.5.cm", "d.5.cmdx"] {
            assert!(matched(&t, key).is_empty(), "{key}");
        }
        let mut listed = Vec::new();
        t.for_each_entry(|p, v| listed.push((p.to_string(), *v)));
        listed.sort_by_key(|(_, v)| *v);
        let expected: Vec<(String, usize)> = patterns.iter().enumerate().map(|(i, p)| (p.to_string(), i)).collect();
        assert_eq!(listed, expected);
    }

    /// A device's pattern under a map of many is one tail; a second pattern through the same
    /// key (its own, or one with a wildcard after it) makes the tail nodes, and the matches
    /// stay those of the reference matcher throughout.
    #[test]
    fn a_device_under_a_map_of_many_is_one_tail_until_another_pattern_shares_its_key() {
        let mut t = TopicTrie::new();
        let mut patterns: Vec<(Pattern, u32)> = (0..20).map(|i| (amqp(&format!("devices.d{i}.cmd")), i)).collect();
        for (p, v) in &patterns {
            assert!(t.insert(p, *v));
        }
        assert!(!t.insert(&amqp("devices.d7.cmd"), 7), "the same pattern and value");
        let tail =
            |t: &TopicTrie<u32>, id: &str| matches!(child(&t.root, "devices").literal.get(id), Some(ChildRef::Tail(_)));
        assert!(tail(&t, "d7"));
        patterns.push((amqp("devices.d7.cmd"), 100)); // another value: the tail goes
        patterns.push((amqp("devices.d8.status"), 101));
        patterns.push((amqp("devices.d9.#"), 102));
        patterns.push((amqp("devices.d10"), 103));
        patterns.push((flagged("devices.d11.cmd"), 104)); // the flag is part of the entry
        patterns.push((amqp("devices.d12.cmd.x"), 105));
        patterns.push((amqp("devices.new.a.b"), 106)); // a new key, a tail of two words
        for (p, v) in &patterns[20..] {
            assert!(t.insert(p, *v), "{p}");
        }
        for id in ["d7", "d8", "d9", "d10", "d11", "d12"] {
            assert!(!tail(&t, id), "{id}");
        }
        assert!(tail(&t, "d6") && tail(&t, "new"));
        let keys = [
            "devices.d7.cmd",
            "devices.d8.cmd",
            "devices.d8.status",
            "devices.d9",
            "devices.d9.a.b",
            "devices.d10",
            "devices.d10.cmd",
            "devices.d11.cmd",
            "devices.d12.cmd",
            "devices.d12.cmd.x",
            "devices.new.a.b",
            "devices.new.a",
            "devices.new",
            "devices.d3.cmd.",
            "devices.d3",
            "devices..cmd",
        ];
        let check = |t: &TopicTrie<u32>, patterns: &[(Pattern, u32)]| {
            for key in keys {
                let mut expected: Vec<u32> = patterns.iter().filter(|(p, _)| p.matches(key)).map(|(_, v)| *v).collect();
                expected.sort();
                assert_eq!(matched(t, key), expected, "{key}");
            }
            let mut listed = Vec::new();
            t.for_each_entry(|p, v| listed.push((p.clone(), *v)));
            listed.sort_by_key(|(_, v)| *v);
            let mut all = patterns.to_vec();
            all.sort_by_key(|(_, v)| *v);
            assert_eq!(listed, all);
        };
        check(&t, &patterns);
        assert!(!t.remove(&amqp("devices.d6.cmd.x"), &6), "not the tail's words");
        assert!(!t.remove(&amqp("devices.d6.cmd"), &7), "not the tail's value");
        while let Some((p, v)) = patterns.pop() {
            assert!(t.remove(&p, &v), "{p}");
            check(&t, &patterns);
        }
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 2, "pruned");
    }

    #[test]
    fn literal_matches_only_the_same_words() {
        let t = trie_of(&[amqp("a.b.c")]);
        assert_eq!(matched(&t, "a.b.c"), vec![0]);
        for key in ["a.b", "a.b.c.d", "a.b.x", "", "A.b.c"] {
            assert!(matched(&t, key).is_empty(), "{key}");
        }
    }

    #[test]
    fn one_matches_exactly_one_word() {
        let t = trie_of(&[amqp("a.*.c"), amqp("*")]);
        assert_eq!(matched(&t, "a.b.c"), vec![0]);
        assert_eq!(matched(&t, "a.c"), Vec::<usize>::new());
        assert_eq!(matched(&t, "a.b.b.c"), Vec::<usize>::new());
        assert_eq!(matched(&t, "x"), vec![1]);
        assert_eq!(matched(&t, ""), Vec::<usize>::new());
    }

    #[test]
    fn many_at_end_matches_any_suffix() {
        let t = trie_of(&[amqp("a.#")]);
        for key in ["a", "a.b", "a.b.c.d"] {
            assert_eq!(matched(&t, key), vec![0], "{key}");
        }
        assert!(matched(&t, "b.a").is_empty());
    }

    #[test]
    fn many_at_start_matches_any_prefix() {
        let t = trie_of(&[amqp("#.z")]);
        for key in ["z", "a.z", "a.b.z", "z.z"] {
            assert_eq!(matched(&t, key), vec![0], "{key}");
        }
        assert!(matched(&t, "z.a").is_empty());
    }

    #[test]
    fn many_in_middle_matches_any_run() {
        let t = trie_of(&[amqp("a.#.z")]);
        for key in ["a.z", "a.b.z", "a.b.c.z", "a.z.z"] {
            assert_eq!(matched(&t, key), vec![0], "{key}");
        }
        for key in ["a", "z", "a.z.b", "b.a.z"] {
            assert!(matched(&t, key).is_empty(), "{key}");
        }
    }

    #[test]
    fn many_matches_zero_words() {
        assert_eq!(hits(amqp("a.#"), "a"), 1);
        assert_eq!(hits(amqp("#"), ""), 1);
        assert_eq!(hits(amqp("#.a"), "a"), 1);
        assert_eq!(hits(amqp("a.#.b"), "a.b"), 1);
    }

    #[test]
    fn double_many_is_reported_once() {
        assert_eq!(hits(amqp("#.#"), ""), 1);
        assert_eq!(hits(amqp("#.#"), "a.b.c"), 1);
        assert_eq!(hits(amqp("a.#.#"), "a.b"), 1);
        assert_eq!(hits(amqp("#.a.#"), "a.a.a"), 1);
        assert_eq!(hits(amqp("a.#.b.#"), "a.b.b.b"), 1);
    }

    #[test]
    fn many_many_patterns_do_not_blow_up() {
        // Without the seen set this walk would take C(40 + 10, 10) ≈ 10^10 paths.
        let pattern = amqp(&["#"; 10].join("."));
        let key = ["w"; 40].join(".");
        assert_eq!(hits(pattern, &key), 1);
    }

    #[test]
    fn empty_key_has_zero_words() {
        let t = trie_of(&[amqp(""), amqp("#"), amqp("*"), amqp("#.#"), flagged("#")]);
        assert_eq!(matched(&t, ""), vec![0, 1, 3, 4]);
    }

    #[test]
    fn keys_with_empty_words_match_empty_literals_and_wildcards() {
        let t = trie_of(&[amqp("a..b"), amqp("a.*.b"), amqp("*.*"), amqp("."), amqp("#.b")]);
        assert_eq!(matched(&t, "a..b"), vec![0, 1, 4]);
        assert_eq!(matched(&t, "."), vec![2, 3]);
        assert_eq!(matched(&t, "a.b"), vec![2, 4]);
        assert_eq!(matched(&t, ".b"), vec![2, 4]);
    }

    #[test]
    fn dollar_rule_hides_dollar_words_from_leading_wildcards() {
        let t = trie_of(&[flagged("#"), flagged("*.x"), flagged("$SYS.#"), flagged("#.x")]);
        assert_eq!(matched(&t, "$SYS.x"), vec![2]);
        assert_eq!(matched(&t, "SYS.x"), vec![0, 1, 3]);
    }

    #[test]
    fn dollar_rule_applies_only_to_the_first_word() {
        let t = trie_of(&[flagged("a.#"), flagged("#"), flagged("a.*")]);
        assert_eq!(matched(&t, "a.$x"), vec![0, 1, 2]);
    }

    #[test]
    fn patterns_without_the_flag_match_dollar_words() {
        let t = trie_of(&[amqp("#"), amqp("*.x"), amqp("$SYS.x")]);
        assert_eq!(matched(&t, "$SYS.x"), vec![0, 1, 2]);
    }

    #[test]
    fn flag_is_part_of_an_entrys_identity() {
        let mut t = TopicTrie::new();
        assert!(t.insert(&amqp("#"), 7));
        assert!(t.insert(&flagged("#"), 7));
        assert!(t.insert(&amqp("a"), 7));
        assert!(t.insert(&flagged("a"), 7));
        assert_eq!(t.len(), 4);
        assert_eq!(matched(&t, "b"), vec![7, 7]);
        assert_eq!(matched(&t, "$b"), vec![7]);
        assert_eq!(matched(&t, "a"), vec![7, 7, 7, 7]);
        assert!(t.remove(&flagged("#"), &7));
        assert_eq!(matched(&t, "b"), vec![7]);
        assert!(t.remove(&flagged("a"), &7));
        assert_eq!(matched(&t, "a"), vec![7, 7]);
    }

    #[test]
    fn literal_star_word_matches_only_star() {
        let star = Pattern { levels: vec![Level::Literal("*".into()), Level::Literal("#".into())], dollar_rule: true };
        let t = trie_of(&[star]);
        assert_eq!(matched(&t, "*.#"), vec![0]);
        assert!(matched(&t, "a.b").is_empty());
        assert!(matched(&t, "*").is_empty());
    }

    #[test]
    fn every_entry_is_listed_with_its_pattern() {
        let patterns = [amqp("a.b"), amqp("a.*.c"), amqp("#"), flagged("#.x"), flagged("a.#"), amqp("")];
        let trie = trie_of(&patterns);
        let mut listed = Vec::new();
        trie.for_each_entry(|p, v| listed.push((p.clone(), *v)));
        listed.sort_by_key(|(_, v)| *v);
        let expected: Vec<(Pattern, usize)> = patterns.iter().cloned().zip(0..).collect();
        assert_eq!(listed, expected);
    }

    /// A pattern many subscribers share keeps them in a `Vec` past a few, and a slice again
    /// once few are left.
    #[test]
    fn a_shared_patterns_entries_grow_and_shrink() {
        let mut t = TopicTrie::new();
        let p = amqp("sensors.#");
        for i in 0..1000usize {
            assert!(t.insert(&p, i));
        }
        let node = |t: &TopicTrie<usize>| child(&t.root, "sensors").many.as_deref().unwrap().entries.clone();
        assert!(matches!(node(&t), Entries::Many(_)));
        assert_eq!(matched(&t, "sensors.a").len(), 1000);
        for i in 0..996usize {
            assert!(t.remove(&p, &i));
        }
        assert!(matches!(node(&t), Entries::Few(v) if v.len() == 4));
        assert_eq!(matched(&t, "sensors.a"), vec![996, 997, 998, 999]);
        for i in 996..1000usize {
            assert!(t.remove(&p, &i));
        }
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 2, "pruned");
    }

    #[test]
    fn duplicate_insert_returns_false() {
        let mut t = TopicTrie::new();
        assert!(t.insert(&amqp("a.*"), 1));
        assert!(!t.insert(&amqp("a.*"), 1));
        assert!(t.insert(&amqp("a.*"), 2));
        assert_eq!(t.len(), 2);
        assert_eq!(matched(&t, "a.b"), vec![1, 2]);
    }

    #[test]
    fn remove_returns_false_when_absent() {
        let mut t = TopicTrie::new();
        assert!(!t.remove(&amqp("a"), &1));
        assert!(t.insert(&amqp("a.b"), 1));
        assert!(!t.remove(&amqp("a.b"), &2), "other value");
        assert!(!t.remove(&amqp("a"), &1), "prefix");
        assert!(!t.remove(&amqp("a.b.c"), &1), "extension");
        assert!(!t.remove(&flagged("a.b"), &1), "other flag");
        assert!(t.remove(&amqp("a.b"), &1));
        assert!(!t.remove(&amqp("a.b"), &1), "already removed");
        assert!(t.is_empty());
    }

    #[test]
    fn remove_prunes_empty_nodes() {
        let mut t = TopicTrie::new();
        let empty_nodes = t.node_count();
        let patterns: Vec<Pattern> = (0..500)
            .map(|i| {
                let p = amqp(&format!("s{}.{}.*.#.m{}", i % 7, i, i % 3));
                if i % 2 == 0 {
                    p.with_dollar_rule(true)
                } else {
                    p
                }
            })
            .chain([flagged("#.#"), flagged("*"), amqp(""), amqp("#")])
            .collect();
        for (i, p) in patterns.iter().enumerate() {
            assert!(t.insert(p, i));
        }
        assert!(t.node_count() > 500);
        for (i, p) in patterns.iter().enumerate() {
            assert!(t.remove(p, &i));
        }
        assert_eq!(t.len(), 0);
        assert_eq!(t.node_count(), empty_nodes);
    }

    #[test]
    fn same_value_under_two_matching_patterns_is_reported_twice() {
        let mut t = TopicTrie::new();
        assert!(t.insert(&amqp("a.*"), "q"));
        assert!(t.insert(&amqp("a.#"), "q"));
        assert_eq!(matched(&t, "a.b"), vec!["q", "q"]);
    }

    #[test]
    fn parse_amqp_splits_words_and_wildcards() {
        let lit = |s: &str| Level::Literal(s.into());
        assert_eq!(amqp("a.*.#").levels, vec![lit("a"), Level::One, Level::Many]);
        assert_eq!(amqp("").levels, vec![]);
        assert_eq!(amqp(".").levels, vec![lit(""), lit("")]);
        assert_eq!(amqp("a*.#b").levels, vec![lit("a*"), lit("#b")]);
        assert!(!amqp("#").dollar_rule);
    }

    #[test]
    fn display_round_trips_through_parse_amqp() {
        for key in ["", "a", "a.*.#", "#.#", "a..b", ".", "$SYS.*", "*.a*.b#"] {
            assert_eq!(amqp(key).to_string(), key);
            assert_eq!(amqp(&amqp(key).to_string()), amqp(key));
        }
    }

    // ---- property tests -------------------------------------------------------------------

    /// More than [`FEW_LITERALS`] words, so that maps of many (and their tails) are made.
    const WORDS: [&str; 8] = ["a", "b", "$s", "", "*", "c", "d", "e"];

    fn level() -> impl Strategy<Value = Level> {
        prop_oneof![
            3 => prop::sample::select(&WORDS[..]).prop_map(|w| Level::Literal(w.into())),
            1 => Just(Level::One),
            2 => Just(Level::Many),
        ]
    }

    fn pattern() -> impl Strategy<Value = Pattern> {
        (prop::collection::vec(level(), 0..5), any::<bool>())
            .prop_map(|(levels, dollar_rule)| Pattern { levels, dollar_rule })
    }

    fn key() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(&WORDS[..]), 0..6).prop_map(|w| w.join("."))
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(usize, u8),
        Remove(usize, u8),
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn trie_agrees_with_reference_matcher(
            patterns in prop::collection::vec(pattern(), 0..24),
            keys in prop::collection::vec(key(), 1..8),
        ) {
            let t = trie_of(&patterns);
            prop_assert_eq!(t.len(), patterns.len());
            for key in &keys {
                let expected: Vec<usize> = (0..patterns.len()).filter(|&i| patterns[i].matches(key)).collect();
                prop_assert_eq!(matched(&t, key), expected, "key {:?}", key);
            }
        }

        #[test]
        fn insert_and_remove_agree_with_a_vec_model(
            pool in prop::collection::vec(pattern(), 1..6),
            ops in prop::collection::vec(
                prop_oneof![
                    (0..6usize, 0..3u8).prop_map(|(p, v)| Op::Insert(p, v)),
                    (0..6usize, 0..3u8).prop_map(|(p, v)| Op::Remove(p, v)),
                ],
                0..40,
            ),
            keys in prop::collection::vec(key(), 1..6),
        ) {
            let mut t = TopicTrie::new();
            let mut model: Vec<(Pattern, u8)> = Vec::new();
            for op in &ops {
                match *op {
                    Op::Insert(p, v) => {
                        let p = &pool[p % pool.len()];
                        let fresh = !model.iter().any(|(q, w)| q == p && *w == v);
                        if fresh {
                            model.push((p.clone(), v));
                        }
                        prop_assert_eq!(t.insert(p, v), fresh);
                    }
                    Op::Remove(p, v) => {
                        let p = &pool[p % pool.len()];
                        let before = model.len();
                        model.retain(|(q, w)| !(q == p && *w == v));
                        prop_assert_eq!(t.remove(p, &v), before != model.len());
                    }
                }
                prop_assert_eq!(t.len(), model.len());
            }
            for key in &keys {
                let mut expected: Vec<u8> = model.iter().filter(|(p, _)| p.matches(key)).map(|(_, v)| *v).collect();
                expected.sort();
                prop_assert_eq!(matched(&t, key), expected, "key {:?}", key);
            }
            for (p, v) in &model {
                prop_assert!(t.remove(p, v));
            }
            prop_assert!(t.is_empty());
            prop_assert_eq!(t.node_count(), TopicTrie::<u8>::new().node_count());
        }

        #[test]
        fn display_round_trips_for_patterns_without_literal_wildcards(p in pattern()) {
            // A single empty word displays as "", which parses as the empty pattern: the one
            // ambiguity of AMQP's text form.
            let plain = |l: &Level| !matches!(l, Level::Literal(w) if &**w == "*" || &**w == "#");
            prop_assume!(p.levels.iter().all(plain));
            prop_assume!(p.levels != [Level::Literal("".into())]);
            let p = Pattern { dollar_rule: false, ..p };
            prop_assert_eq!(Pattern::parse_amqp(&p.to_string()), p);
        }
    }
}

//! A session's subscriptions, indexed for each way the session looks them up, so that no
//! operation scans them all (issue 13: a client with 60,000 subscriptions made every delivery
//! to it a scan of 60,000):
//! - by filter text: SUBSCRIBE (replace), UNSUBSCRIBE;
//! - by cookie: a direct sink's delivery names the bindings that matched by their cookies;
//! - by queue name: a shared subscription's deliveries come from its group's queue;
//! - by pattern (persistent sessions only): a delivery from the session's own queue does not say
//!   which binding matched, so the routing key is matched again, in a trie of the session's
//!   patterns rather than against each filter.

use std::num::NonZeroU32;
use std::sync::Arc;

use ferry_core::hash::{FastMap, KeyedMap};
use ferry_core::queue::{ConsumerId, Queue, QueueName};
use ferry_core::topic::TopicTrie;

use crate::codec::SubOptions;
use crate::topic::Filter;

#[derive(Debug)]
pub(crate) struct Subscription {
    pub filter: Filter,
    pub options: SubOptions,
    /// 5.0's subscription identifier (never 0, §3.8.2.1.2).
    pub identifier: Option<NonZeroU32>,
    /// Names this subscription's binding (a direct sink's deliveries carry it).
    pub cookie: u64,
    /// Shared subscriptions consume the group's queue. Boxed: rare, and with it and the
    /// identifier as a `NonZeroU32` a subscription is 48 bytes instead of 64 (jemalloc's 48
    /// class; `a_subscription_stays_small`).
    pub shared: Option<Box<(Arc<Queue>, ConsumerId)>>,
}

/// Up to this many subscriptions a session keeps them in one list searched linearly (one
/// allocation: a device subscribed to its command topic holds one subscription, and three hash
/// maps for it cost more than the rest of its session); past it, in the indexes.
const SMALL: usize = 8;

/// A session's subscriptions, boxed in every subscribed session. A device's one subscription
/// is the box ([`Subscriptions::One`]: 48 bytes, jemalloc's 48 class), where it was a list of
/// one in a box of the list (48 and 32, issue 18; `a_subscription_stays_small`).
#[derive(Debug)]
pub(crate) enum Subscriptions {
    /// One subscription, whose cookie is the last the session gave, in a transient session
    /// (no pattern index).
    One(Subscription),
    List(List),
}

/// 32 bytes (48 with the index and the patterns in two fields and the list a `Vec`).
#[derive(Debug, Default)]
pub(crate) struct List {
    /// Every subscription while there are at most [`SMALL`] (and there is no index); a boxed
    /// slice, made again at each change (of at most eight).
    small: Box<[Subscription]>,
    more: Option<Box<More>>,
    last_cookie: u64,
}

/// What few sessions have: the index past [`SMALL`] subscriptions, the patterns of a persistent
/// session's.
#[derive(Debug, Default)]
struct More {
    index: Option<Box<Index>>,
    /// Patterns of the subscriptions that are not shared, for a persistent session (a transient
    /// one receives cookies). Boxed: inline, the trie was 136 of the 176 bytes every subscribed
    /// session paid for this, persistent or not.
    patterns: Option<Box<TopicTrie<u64>>>,
}

/// The subscriptions of a session with more than [`SMALL`] of them.
#[derive(Debug, Default)]
struct Index {
    by_cookie: FastMap<u64, Subscription>,
    by_filter: KeyedMap<String, u64>,
    /// Shared subscriptions by the name of their group's queue.
    by_queue: KeyedMap<QueueName, u64>,
}

impl Index {
    fn insert(&mut self, sub: Subscription) {
        let cookie = sub.cookie;
        self.by_filter.insert(sub.filter.text().to_string(), cookie);
        if let Some((q, _)) = sub.shared.as_deref() {
            self.by_queue.insert(q.name().clone(), cookie);
        }
        self.by_cookie.insert(cookie, sub);
    }

    fn remove(&mut self, filter: &str) -> Option<Subscription> {
        let cookie = self.by_filter.remove(filter)?;
        let sub = self.by_cookie.remove(&cookie).expect("indexed by filter, so by cookie");
        if let Some((q, _)) = sub.shared.as_deref() {
            self.by_queue.remove(q.name());
        }
        Some(sub)
    }
}

impl Subscriptions {
    /// `match_topics`: keep the pattern index (a persistent session's queue deliveries).
    pub fn new(match_topics: bool) -> Subscriptions {
        let more = match_topics.then(|| Box::new(More { index: None, patterns: Some(Box::new(TopicTrie::new())) }));
        Subscriptions::List(List { more, ..List::default() })
    }

    /// The list, made of the one subscription if need be.
    fn list(&mut self) -> &mut List {
        if let Subscriptions::One(_) = self {
            let Subscriptions::One(one) = std::mem::replace(self, Subscriptions::List(List::default())) else {
                unreachable!("one")
            };
            let last_cookie = one.cookie;
            *self = Subscriptions::List(List { small: Box::new([one]), more: None, last_cookie });
        }
        match self {
            Subscriptions::List(list) => list,
            Subscriptions::One(_) => unreachable!("made a list above"),
        }
    }

    /// The subscriptions kept in a list searched linearly (all of them without an index).
    fn small(&self) -> &[Subscription] {
        match self {
            Subscriptions::One(one) => std::slice::from_ref(one),
            Subscriptions::List(list) => &list.small,
        }
    }

    fn small_mut(&mut self) -> &mut [Subscription] {
        match self {
            Subscriptions::One(one) => std::slice::from_mut(one),
            Subscriptions::List(list) => &mut list.small,
        }
    }

    fn more(&self) -> Option<&More> {
        match self {
            Subscriptions::One(_) => None,
            Subscriptions::List(list) => list.more.as_deref(),
        }
    }

    fn more_mut(&mut self) -> Option<&mut More> {
        match self {
            Subscriptions::One(_) => None,
            Subscriptions::List(list) => list.more.as_deref_mut(),
        }
    }

    fn index(&self) -> Option<&Index> {
        self.more()?.index.as_deref()
    }

    fn index_mut(&mut self) -> Option<&mut Index> {
        self.more_mut()?.index.as_deref_mut()
    }

    fn patterns_mut(&mut self) -> Option<&mut TopicTrie<u64>> {
        self.more_mut()?.patterns.as_deref_mut()
    }

    pub fn len(&self) -> usize {
        match self.index() {
            Some(ix) => ix.by_cookie.len(),
            None => self.small().len(),
        }
    }

    pub fn get(&self, filter: &str) -> Option<&Subscription> {
        match self.index() {
            Some(ix) => ix.by_filter.get(filter).and_then(|c| ix.by_cookie.get(c)),
            None => self.small().iter().find(|s| s.filter.text() == filter),
        }
    }

    pub fn get_mut(&mut self, filter: &str) -> Option<&mut Subscription> {
        if self.index().is_some() {
            let ix = self.index_mut().expect("looked at");
            return ix.by_filter.get(filter).and_then(|c| ix.by_cookie.get_mut(c));
        }
        self.small_mut().iter_mut().find(|s| s.filter.text() == filter)
    }

    /// A cookie never used by this session (one that named a removed subscription could still
    /// be on deliveries waiting in the outbox).
    pub fn next_cookie(&mut self) -> u64 {
        let list = self.list();
        list.last_cookie += 1;
        list.last_cookie
    }

    /// Adds a subscription, replacing one with the same filter text.
    pub fn insert(&mut self, sub: Subscription) {
        if let Some(old) = self.remove(sub.filter.text()) {
            debug_assert_eq!(old.cookie, sub.cookie, "a replacement keeps its binding's cookie");
        }
        if sub.shared.is_none() {
            if let Some(trie) = self.patterns_mut() {
                trie.insert(&sub.filter.pattern(), sub.cookie);
            }
        }
        let list = self.list();
        if list.small.is_empty() && list.more.is_none() && list.last_cookie == sub.cookie {
            // The box is the subscription: a device's one.
            *self = Subscriptions::One(sub);
            return;
        }
        match list.more.as_mut().and_then(|m| m.index.as_deref_mut()) {
            Some(ix) => ix.insert(sub),
            None if list.small.len() < SMALL => {
                // Allocated to fit.
                let mut small = std::mem::take(&mut list.small).into_vec();
                small.reserve_exact(1);
                small.push(sub);
                list.small = small.into_boxed_slice();
            }
            None => {
                let mut ix = Box::<Index>::default();
                for s in std::mem::take(&mut list.small) {
                    ix.insert(s);
                }
                ix.insert(sub);
                list.more.get_or_insert_with(Box::default).index = Some(ix);
            }
        }
    }

    pub fn remove(&mut self, filter: &str) -> Option<Subscription> {
        let sub = match self.index_mut() {
            Some(ix) => ix.remove(filter)?,
            None => {
                let i = self.small().iter().position(|s| s.filter.text() == filter)?;
                let list = self.list();
                let mut small = std::mem::take(&mut list.small).into_vec();
                let sub = small.swap_remove(i);
                list.small = small.into_boxed_slice();
                sub
            }
        };
        if sub.shared.is_none() {
            if let Some(trie) = self.patterns_mut() {
                trie.remove(&sub.filter.pattern(), &sub.cookie);
            }
        }
        Some(sub)
    }

    /// Removes up to `n` subscriptions (any of them) and returns them.
    pub fn take_some(&mut self, n: usize) -> Vec<Subscription> {
        let filters: Vec<String> = match self.index() {
            Some(ix) => ix.by_filter.keys().take(n).cloned().collect(),
            None => self.small().iter().take(n).map(|s| s.filter.text().to_string()).collect(),
        };
        filters.iter().filter_map(|f| self.remove(f)).collect()
    }

    /// The subscription whose binding has this cookie.
    pub fn by_cookie(&self, cookie: u64) -> Option<&Subscription> {
        match self.index() {
            Some(ix) => ix.by_cookie.get(&cookie),
            None => self.small().iter().find(|s| s.cookie == cookie),
        }
    }

    /// The shared subscription consuming this queue.
    pub fn by_queue(&self, queue: &QueueName) -> Option<&Subscription> {
        match self.index() {
            Some(ix) => ix.by_queue.get(queue).and_then(|c| ix.by_cookie.get(c)),
            None => self.small().iter().find(|s| s.shared.as_deref().is_some_and(|(q, _)| q.name() == queue)),
        }
    }

    /// Calls `f` with each subscription that is not shared and whose pattern matches
    /// `routing_key` (persistent sessions only: none otherwise).
    pub fn matching(&self, routing_key: &str, mut f: impl FnMut(&Subscription)) {
        if let Some(trie) = self.more().and_then(|m| m.patterns.as_deref()) {
            trie.for_each_match(routing_key, |c| {
                if let Some(sub) = self.by_cookie(*c) {
                    f(sub)
                }
            });
        }
    }

    pub fn values(&self) -> impl Iterator<Item = &Subscription> {
        let (small, index) = match self.index() {
            Some(ix) => (None, Some(ix.by_cookie.values())),
            None => (Some(self.small().iter()), None),
        };
        small.into_iter().flatten().chain(index.into_iter().flatten())
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Subscription> {
        let (small, index) = match self {
            Subscriptions::One(one) => (Some(std::slice::from_mut(one).iter_mut()), None),
            Subscriptions::List(List { small, more, .. }) => {
                match more.as_deref_mut().and_then(|m| m.index.as_deref_mut()) {
                    Some(ix) => (None, Some(ix.by_cookie.values_mut())),
                    None => (Some(small.iter_mut()), None),
                }
            }
        };
        small.into_iter().flatten().chain(index.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(subs: &mut Subscriptions, filter: &str) -> Subscription {
        let cookie = subs.next_cookie();
        Subscription {
            filter: Filter::parse(filter).unwrap(),
            options: SubOptions::default(),
            identifier: None,
            cookie,
            shared: None,
        }
    }

    fn matched(subs: &Subscriptions, key: &str) -> Vec<String> {
        let mut v = Vec::new();
        subs.matching(key, |s| v.push(s.filter.text().to_string()));
        v.sort();
        v
    }

    /// A device's one subscription is one `Subscription` in `small`, allocated exactly (issue
    /// 18): 112 bytes, and a second string, while its filter was held twice (as text and as the
    /// filter without a `$share/` prefix, with the group a third string); 64 and one string;
    /// now 48, with the shared group's queue boxed and the identifier a `NonZeroU32`.
    #[test]
    fn a_subscription_stays_small() {
        let size = std::mem::size_of::<Subscription>();
        assert!(size <= 48, "Subscription is {size} bytes");
        assert_eq!(std::mem::size_of::<Filter>(), 24);
        // The session's box of them: 176 bytes while the pattern trie, which only persistent
        // sessions have, was inline; 48 with it and the index in fields of their own, and a
        // list of one beside it; now 48 with the one subscription in it.
        assert!(std::mem::size_of::<List>() <= 32);
        let all = std::mem::size_of::<Subscriptions>();
        assert!(all <= 48, "Subscriptions is {all} bytes");
    }

    #[test]
    fn found_by_filter_cookie_and_topic() {
        let mut subs = Subscriptions::new(true);
        let a = sub(&mut subs, "a/+");
        let a_cookie = a.cookie;
        subs.insert(a);
        let b = sub(&mut subs, "a/#");
        subs.insert(b);
        assert_eq!(subs.len(), 2);
        assert_eq!(subs.by_cookie(a_cookie).unwrap().filter.text(), "a/+");
        assert_eq!(subs.get("a/#").unwrap().filter.text(), "a/#");
        assert_eq!(matched(&subs, "a.b"), vec!["a/#", "a/+"]);
        assert_eq!(matched(&subs, "a.b.c"), vec!["a/#"]);
        let gone = subs.remove("a/+").unwrap();
        assert_eq!(gone.cookie, a_cookie);
        assert!(subs.by_cookie(a_cookie).is_none());
        assert_eq!(matched(&subs, "a.b"), vec!["a/#"]);
    }

    #[test]
    fn a_replacement_keeps_one_entry() {
        let mut subs = Subscriptions::new(true);
        let first = sub(&mut subs, "x/y");
        let cookie = first.cookie;
        subs.insert(first);
        let mut again = sub(&mut subs, "x/y");
        again.cookie = cookie;
        again.identifier = NonZeroU32::new(7);
        subs.insert(again);
        assert_eq!(subs.len(), 1);
        assert_eq!(subs.by_cookie(cookie).unwrap().identifier, NonZeroU32::new(7));
        assert_eq!(matched(&subs, "x.y"), vec!["x/y"]);
    }

    #[test]
    fn cookies_are_never_reused() {
        let mut subs = Subscriptions::new(false);
        let a = sub(&mut subs, "a");
        let first = a.cookie;
        subs.insert(a);
        subs.remove("a");
        assert_ne!(subs.next_cookie(), first);
    }

    #[test]
    fn a_transient_session_keeps_no_pattern_index() {
        let mut subs = Subscriptions::new(false);
        let a = sub(&mut subs, "a");
        subs.insert(a);
        assert!(matched(&subs, "a").is_empty());
    }

    #[test]
    fn take_some_empties_in_chunks() {
        let mut subs = Subscriptions::new(true);
        for i in 0..10 {
            let s = sub(&mut subs, &format!("t/{i}"));
            subs.insert(s);
        }
        assert_eq!(subs.take_some(4).len(), 4);
        assert_eq!(subs.len(), 6);
        assert_eq!(subs.take_some(100).len(), 6);
        assert_eq!(subs.len(), 0);
        assert!(matched(&subs, "t.1").is_empty());
    }

    #[test]
    fn past_the_small_list_the_indexes_take_over() {
        let mut subs = Subscriptions::new(true);
        let mut cookies = Vec::new();
        for i in 0..(SMALL + 3) {
            let s = sub(&mut subs, &format!("t/{i}"));
            cookies.push(s.cookie);
            subs.insert(s);
            assert_eq!(subs.len(), i + 1);
            assert_eq!(subs.index().is_some(), i + 1 > SMALL);
        }
        for (i, c) in cookies.iter().enumerate() {
            assert_eq!(subs.by_cookie(*c).unwrap().filter.text(), format!("t/{i}"));
            assert_eq!(subs.get(&format!("t/{i}")).unwrap().cookie, *c);
        }
        assert_eq!(subs.values().count(), SMALL + 3);
        assert_eq!(matched(&subs, "t.4"), vec!["t/4"]);
        assert_eq!(subs.remove("t/4").unwrap().cookie, cookies[4]);
        assert!(matched(&subs, "t.4").is_empty());
        assert_eq!(subs.values_mut().count(), SMALL + 2);
    }

    #[test]
    fn one_subscription_is_the_box() {
        let mut subs = Subscriptions::new(false);
        let a = sub(&mut subs, "devices/d1/cmd");
        let first = a.cookie;
        subs.insert(a);
        assert!(matches!(subs, Subscriptions::One(_)));
        assert_eq!(subs.values().count(), 1);
        assert_eq!(subs.values_mut().count(), 1);
        assert_eq!(subs.by_cookie(first).unwrap().filter.text(), "devices/d1/cmd");
        subs.get_mut("devices/d1/cmd").unwrap().identifier = NonZeroU32::new(3);
        assert_eq!(subs.get("devices/d1/cmd").unwrap().identifier, NonZeroU32::new(3));
        // A replacement keeps it one.
        let mut again = sub(&mut Subscriptions::new(false), "devices/d1/cmd");
        again.cookie = first;
        subs.insert(again);
        assert!(matches!(subs, Subscriptions::One(_)));
        // A second makes a list, with cookies still new.
        let b = sub(&mut subs, "devices/d1/other");
        assert!(b.cookie > first);
        subs.insert(b);
        assert!(matches!(&subs, Subscriptions::List(l) if l.small.len() == 2));
        subs.remove("devices/d1/cmd").unwrap();
        subs.remove("devices/d1/other").unwrap();
        assert_eq!(subs.len(), 0);
        // Emptied, it does not give an old cookie again, nor become one with an old cookie.
        let c = sub(&mut subs, "x");
        assert!(c.cookie > first + 1);
        subs.insert(c);
        assert!(matches!(subs, Subscriptions::One(_)));
        subs.remove("x").unwrap();
        assert!(matches!(&subs, Subscriptions::List(l) if l.small.is_empty()));
        assert!(subs.next_cookie() > first + 2);
    }

    /// A persistent session keeps its pattern index: never the one-subscription box.
    #[test]
    fn a_persistent_sessions_one_subscription_stays_in_the_list() {
        let mut subs = Subscriptions::new(true);
        let a = sub(&mut subs, "a/+");
        subs.insert(a);
        assert!(matches!(subs, Subscriptions::List(_)));
        assert_eq!(matched(&subs, "a.b"), vec!["a/+"]);
    }
}

//! `$SYS/broker/...`: Mosquitto's statistics tree (its 2.0 `sys_tree.c`: the same topics, the
//! same payload formats, the same loads), so that dashboards made for Mosquitto work.
//!
//! Every `sys_interval` ([`Settings::sys_interval`](crate::Settings::sys_interval), 10 s by
//! default as Mosquitto's; zero: no tree) one task reads the broker's counters into a
//! [`Sample`]; [`Tree::update`] turns it into the topics whose value changed since the last
//! round (all of them the first time, `uptime` every time, as Mosquitto does), and those are
//! published retained into every vhost an MQTT client has used, through the frontend's
//! exchange (so AMQP consumers bound to `$SYS.#` get them too). The first round runs when the
//! first MQTT client connects; a vhost joining later gets the whole tree as it stands.
//!
//! The values are the broker's, over all vhosts and all protocols where Mosquitto's meaning
//! allows it (docs/mapping.md says what each one counts in Ferry).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use ferry_core::exchange::Destination;
use ferry_core::message::{now_millis, Message, Origin, ShortString};
use ferry_core::vhost::VHost;
use ferry_core::Broker;

use crate::acl::{BRIDGE_QUEUE_PREFIX, SHARED_QUEUE_PREFIX};
use crate::topic::swap_separators;
use crate::Shared;

/// Mosquitto's default `sys_interval`.
pub const SYS_INTERVAL: Duration = Duration::from_secs(10);

/// One reading of what the tree shows. Counters count since the start; the rest are levels.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sample {
    /// Seconds since the frontend started.
    pub uptime: u64,
    /// MQTT clients connected now.
    pub connected: u64,
    /// Persistent MQTT sessions whose client is away.
    pub disconnected: u64,
    /// Persistent sessions ended by their expiry interval.
    pub expired: u64,
    /// Messages published by clients, all protocols.
    pub messages_received: u64,
    /// Messages delivered to clients, all protocols.
    pub messages_sent: u64,
    /// Messages dropped for a subscriber or queue over its limits.
    pub publish_dropped: u64,
    /// Payload bytes of the messages published into the vhosts (not `$SYS`'s own).
    pub publish_bytes_received: u64,
    /// Payload bytes of the PUBLISHes sent to MQTT clients.
    pub publish_bytes_sent: u64,
    /// Bytes read from / written to clients, all protocols.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Connections opened, all protocols (Mosquitto's sockets and connections).
    pub connections_opened: u64,
    /// MQTT subscriptions (bindings made from MQTT filters), shared ones apart (one per group).
    pub subscriptions: u64,
    pub shared_subscriptions: u64,
    pub retained: u64,
    /// Messages held by queues (ready and unacknowledged) and retained.
    pub stored: u64,
    /// Bytes of the ready messages held by queues.
    pub stored_bytes: u64,
    pub heap: Option<Heap>,
}

/// The process's memory (what `$SYS/broker/heap/...` shows): resident set size now and its peak
/// (`VmRSS` and `VmHWM` of `/proc/self/status`), in bytes. Mosquitto counts its own
/// allocations; Ferry does not wrap its allocator, and RSS is what an operator sizes for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Heap {
    pub current: u64,
    pub maximum: u64,
}

impl Heap {
    /// `None` where `/proc/self/status` is not there (not Linux).
    pub fn read() -> Option<Heap> {
        Heap::parse(&std::fs::read_to_string("/proc/self/status").ok()?)
    }

    fn parse(status: &str) -> Option<Heap> {
        let kib = |key: &str| -> Option<u64> {
            let line = status.lines().find_map(|l| l.strip_prefix(key))?;
            let n: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
            n.checked_mul(1024)
        };
        Some(Heap { current: kib("VmRSS:")?, maximum: kib("VmHWM:")? })
    }
}

/// A load: an exponentially decaying per-minute rate of a counter, over 1, 5 and 15 minutes.
struct Load {
    topics: [&'static str; 3],
    counter: fn(&Sample) -> u64,
}

/// Mosquitto's loads, in its order.
const LOADS: [Load; 9] = [
    Load {
        topics: [
            "$SYS/broker/load/messages/received/1min",
            "$SYS/broker/load/messages/received/5min",
            "$SYS/broker/load/messages/received/15min",
        ],
        counter: |s| s.messages_received,
    },
    Load {
        topics: [
            "$SYS/broker/load/messages/sent/1min",
            "$SYS/broker/load/messages/sent/5min",
            "$SYS/broker/load/messages/sent/15min",
        ],
        counter: |s| s.messages_sent,
    },
    Load {
        topics: [
            "$SYS/broker/load/publish/dropped/1min",
            "$SYS/broker/load/publish/dropped/5min",
            "$SYS/broker/load/publish/dropped/15min",
        ],
        counter: |s| s.publish_dropped,
    },
    Load {
        topics: [
            "$SYS/broker/load/publish/received/1min",
            "$SYS/broker/load/publish/received/5min",
            "$SYS/broker/load/publish/received/15min",
        ],
        counter: |s| s.messages_received,
    },
    Load {
        topics: [
            "$SYS/broker/load/publish/sent/1min",
            "$SYS/broker/load/publish/sent/5min",
            "$SYS/broker/load/publish/sent/15min",
        ],
        counter: |s| s.messages_sent,
    },
    Load {
        topics: [
            "$SYS/broker/load/bytes/received/1min",
            "$SYS/broker/load/bytes/received/5min",
            "$SYS/broker/load/bytes/received/15min",
        ],
        counter: |s| s.bytes_received,
    },
    Load {
        topics: [
            "$SYS/broker/load/bytes/sent/1min",
            "$SYS/broker/load/bytes/sent/5min",
            "$SYS/broker/load/bytes/sent/15min",
        ],
        counter: |s| s.bytes_sent,
    },
    Load {
        topics: ["$SYS/broker/load/sockets/1min", "$SYS/broker/load/sockets/5min", "$SYS/broker/load/sockets/15min"],
        counter: |s| s.connections_opened,
    },
    Load {
        topics: [
            "$SYS/broker/load/connections/1min",
            "$SYS/broker/load/connections/5min",
            "$SYS/broker/load/connections/15min",
        ],
        counter: |s| s.connections_opened,
    },
];

/// The windows of the loads, seconds.
const WINDOWS: [f64; 3] = [60.0, 300.0, 900.0];

/// The tree's state between rounds: what was last published, and the loads. No clock, no I/O:
/// the time is passed in.
#[derive(Debug, Default)]
pub struct Tree {
    published: BTreeMap<&'static str, String>,
    /// The previous sample and when it was taken (seconds on the caller's clock).
    previous: Option<(Sample, f64)>,
    loads: [[f64; 3]; LOADS.len()],
    clients_maximum: u64,
}

impl Tree {
    /// Takes `sample`, read at `at` seconds (any clock that does not go back), and returns the
    /// topics to publish with their payloads: those whose value changed, `uptime` always, and
    /// a load when it moved by 0.01 or more (Mosquitto's `calc_load`).
    pub fn update(&mut self, s: &Sample, at: f64) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let published = &mut self.published;
        let mut set = |topic: &'static str, value: String| {
            if published.get(topic) != Some(&value) {
                published.insert(topic, value.clone());
                out.push((topic, value));
            }
        };
        set("$SYS/broker/version", format!("ferry version {}", env!("CARGO_PKG_VERSION")));
        let total = s.connected + s.disconnected;
        self.clients_maximum = self.clients_maximum.max(total);
        for (topic, value) in [
            ("$SYS/broker/clients/total", total),
            ("$SYS/broker/clients/maximum", self.clients_maximum),
            ("$SYS/broker/clients/connected", s.connected),
            ("$SYS/broker/clients/active", s.connected),
            ("$SYS/broker/clients/disconnected", s.disconnected),
            ("$SYS/broker/clients/inactive", s.disconnected),
            ("$SYS/broker/clients/expired", s.expired),
            ("$SYS/broker/messages/stored", s.stored),
            ("$SYS/broker/store/messages/count", s.stored),
            ("$SYS/broker/store/messages/bytes", s.stored_bytes),
            ("$SYS/broker/subscriptions/count", s.subscriptions),
            ("$SYS/broker/shared_subscriptions/count", s.shared_subscriptions),
            ("$SYS/broker/retained messages/count", s.retained),
            ("$SYS/broker/messages/received", s.messages_received),
            ("$SYS/broker/messages/sent", s.messages_sent),
            ("$SYS/broker/publish/messages/dropped", s.publish_dropped),
            ("$SYS/broker/publish/messages/received", s.messages_received),
            ("$SYS/broker/publish/messages/sent", s.messages_sent),
            ("$SYS/broker/publish/bytes/received", s.publish_bytes_received),
            ("$SYS/broker/publish/bytes/sent", s.publish_bytes_sent),
            ("$SYS/broker/bytes/received", s.bytes_received),
            ("$SYS/broker/bytes/sent", s.bytes_sent),
        ] {
            set(topic, value.to_string());
        }
        if let Some(heap) = s.heap {
            set("$SYS/broker/heap/current", heap.current.to_string());
            set("$SYS/broker/heap/maximum", heap.maximum.to_string());
        }
        self.update_loads(s, at, &mut out);
        // Every round, changed or not (Mosquitto's too).
        let uptime = format!("{} seconds", s.uptime);
        self.published.insert("$SYS/broker/uptime", uptime.clone());
        out.push(("$SYS/broker/uptime", uptime));
        self.previous = Some((s.clone(), at));
        out
    }

    fn update_loads(&mut self, s: &Sample, at: f64, out: &mut Vec<(&'static str, String)>) {
        let elapsed = match &self.previous {
            Some((_, before)) => at - before,
            None => 0.0,
        };
        for (load, current) in LOADS.iter().zip(self.loads.iter_mut()) {
            let per_minute = match &self.previous {
                // Two rounds in the same instant (or a clock that went back) change nothing.
                Some((prev, _)) if elapsed > 0.0 => {
                    (load.counter)(s).saturating_sub((load.counter)(prev)) as f64 * 60.0 / elapsed
                }
                Some(_) => continue,
                // The first round publishes the loads as they start, 0.
                None => {
                    for topic in load.topics {
                        self.published.insert(topic, format!("{:.2}", 0.0));
                        out.push((topic, format!("{:.2}", 0.0)));
                    }
                    continue;
                }
            };
            for ((topic, window), value) in load.topics.iter().zip(WINDOWS).zip(current.iter_mut()) {
                let decay = (-elapsed / window).exp();
                let new = per_minute + decay * (*value - per_minute);
                if (new - *value).abs() >= 0.01 {
                    let text = format!("{new:.2}");
                    self.published.insert(topic, text.clone());
                    out.push((topic, text));
                }
                *value = new;
            }
        }
    }

    /// Every topic with the value it was last published with: the tree as a vhost that joins
    /// now should see it.
    pub fn all(&self) -> Vec<(&'static str, String)> {
        self.published.iter().map(|(t, v)| (*t, v.clone())).collect()
    }
}

/// Reads the counters: the core's connection registry (all protocols), every vhost's queues,
/// retained store and MQTT exchange bindings, the frontend's client id registry, and the
/// process's memory. `own_bytes`: payload bytes `$SYS` itself published.
pub fn sample(shared: &Shared, broker: &Broker, own_bytes: u64) -> Sample {
    let mut s = Sample {
        uptime: shared.started.elapsed().as_secs(),
        connected: shared.registry.connected() as u64,
        disconnected: shared.registry.disconnected() as u64,
        expired: shared.registry.expired(),
        publish_bytes_sent: shared.stats.publish_bytes_out.load(Ordering::Relaxed),
        heap: Heap::read(),
        ..Sample::default()
    };
    for t in broker.connections().totals() {
        s.messages_received += t.messages_in;
        s.messages_sent += t.messages_out;
        s.bytes_received += t.bytes_in;
        s.bytes_sent += t.bytes_out;
        s.connections_opened += t.opened;
    }
    let mut published_bytes = 0u64;
    for name in broker.vhost_names() {
        let Some(v) = broker.vhost(&name) else { continue };
        let stats = v.stats();
        published_bytes += stats.bytes_in.load(Ordering::Relaxed);
        s.publish_dropped += stats.dropped_at_sinks.load(Ordering::Relaxed);
        s.retained += v.retained().len() as u64;
        let (queues, retired) = v.queues_and_retired();
        s.publish_dropped += retired.dropped_overflow + retired.rejected_overflow;
        for q in &queues {
            let st = q.stats();
            s.stored += st.ready as u64 + st.unacked as u64;
            s.stored_bytes += st.ready_bytes;
            s.publish_dropped += st.dropped_overflow + st.rejected_overflow;
        }
        if let Some(x) = v.exchange(&shared.settings.exchange.to_string_lossy()) {
            // Sinks' bindings that the trie alone keeps are all MQTT subscriptions.
            s.subscriptions += x.for_each_indexed_binding(|b| {
                // Bindings from MQTT filters carry their parsed pattern; AMQP ones do not.
                if !b.key.pattern.is_parsed() {
                    return;
                }
                match &b.destination {
                    Destination::Sink(_) => s.subscriptions += 1,
                    Destination::Queue(q) => {
                        let qname = q.name().as_bytes();
                        if qname.starts_with(SHARED_QUEUE_PREFIX.as_bytes()) {
                            s.shared_subscriptions += 1;
                        } else if !qname.starts_with(BRIDGE_QUEUE_PREFIX.as_bytes()) {
                            s.subscriptions += 1;
                        }
                    }
                    Destination::Exchange(_) => {}
                }
            }) as u64;
        }
    }
    s.stored += s.retained;
    s.publish_bytes_received = published_bytes.saturating_sub(own_bytes);
    s
}

/// Publishes `values` retained into `vhost` through `exchange`; returns the payload bytes.
fn publish(vhost: &VHost, exchange: &ShortString, values: &[(&'static str, String)]) -> u64 {
    let now = now_millis();
    let mut bytes = 0;
    for (topic, value) in values {
        let key = swap_separators(topic);
        bytes += value.len() as u64;
        let m = Message::new(exchange.clone(), key.as_str(), Bytes::from(value.clone()))
            .with_origin(Origin::internal())
            .at(now);
        vhost.set_retained(&key.as_str().into(), Arc::new(m.clone()));
        let _ = vhost.publish(exchange, m, now);
    }
    bytes
}

/// The tree's state and the vhosts it is published into.
///
/// Lock order: this lock, then the vhosts' (a round publishes under it; the counters are read
/// before it is taken, except in the first round). Nothing in the core calls back into it.
#[derive(Debug, Default)]
pub struct Joiner {
    inner: Mutex<Rounds>,
}

#[derive(Debug, Default)]
struct Rounds {
    tree: Tree,
    /// Bounded by the broker's vhosts.
    vhosts: Vec<Arc<VHost>>,
    /// Payload bytes published by the tree, taken out of `publish/bytes/received`.
    own_bytes: u64,
    /// When the first round ran (the task runs from then on); loads are timed from it.
    since: Option<tokio::time::Instant>,
    /// The broker the rounds read. A frontend served by another broker (a test restarting
    /// one in-process) starts over, and the old task ends.
    broker: Weak<Broker>,
}

impl Rounds {
    /// Reads the counters and publishes what changed into every vhost.
    fn round(&mut self, shared: &Shared, broker: &Broker, since: tokio::time::Instant) {
        let sample = sample(shared, broker, self.own_bytes);
        self.publish(shared, &sample, since);
    }

    /// Publishes what changed with `sample` into every vhost.
    fn publish(&mut self, shared: &Shared, sample: &Sample, since: tokio::time::Instant) {
        let changed = self.tree.update(sample, since.elapsed().as_secs_f64());
        for vhost in &self.vhosts {
            self.own_bytes += publish(vhost, &shared.settings.exchange, &changed);
        }
    }

    /// Whether these are the rounds a task started at `since` for `broker` runs.
    fn current(&self, broker: &Arc<Broker>, since: tokio::time::Instant) -> bool {
        Weak::ptr_eq(&self.broker, &Arc::downgrade(broker)) && self.since == Some(since)
    }
}

impl Joiner {
    /// Publishes the tree into `vhost` from now on (once per vhost; nothing when `sys_interval`
    /// is zero), before this returns: the first vhost gets the first round, read now (so that
    /// the tree is there for the client that connects first, as Mosquitto's is from its start),
    /// and starts the task that runs the next ones until the frontend goes; a later one gets
    /// the tree as it stands.
    pub fn join(shared: &Arc<Shared>, broker: &Arc<Broker>, vhost: &Arc<VHost>) {
        let interval = shared.settings.sys_interval;
        if interval.is_zero() {
            return;
        }
        let mut st = shared.sys.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !Weak::ptr_eq(&st.broker, &Arc::downgrade(broker)) {
            *st = Rounds { broker: Arc::downgrade(broker), ..Rounds::default() };
        }
        match st.vhosts.iter().position(|v| v.name() == vhost.name()) {
            Some(i) if Arc::ptr_eq(&st.vhosts[i], vhost) => return,
            // Deleted and made again: the new one gets the tree.
            Some(i) => st.vhosts[i] = vhost.clone(),
            None => st.vhosts.push(vhost.clone()),
        }
        match st.since {
            Some(_) => {
                let all = st.tree.all();
                st.own_bytes += publish(vhost, &shared.settings.exchange, &all);
            }
            None => {
                let since = tokio::time::Instant::now();
                st.since = Some(since);
                st.round(shared, broker, since);
                tokio::spawn(run(Arc::downgrade(shared), Arc::downgrade(broker), since, interval));
            }
        }
    }
}

/// Runs a round every `interval` after `since` until the frontend or the broker is dropped.
async fn run(shared: Weak<Shared>, broker: Weak<Broker>, since: tokio::time::Instant, interval: Duration) {
    let mut tick = tokio::time::interval_at(since + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(shared), Some(broker)) = (shared.upgrade(), broker.upgrade()) else { return };
        // A round walks every queue and client id: off the workers that serve the clients.
        // The counters are read without the lock, which a CONNECT to a new vhost takes.
        let round = tokio::task::spawn_blocking(move || {
            let lock = || shared.sys.inner.lock().unwrap_or_else(|e| e.into_inner());
            let own_bytes = {
                let st = lock();
                if !st.current(&broker, since) {
                    return false;
                }
                st.own_bytes
            };
            let sample = sample(&shared, &broker, own_bytes);
            let mut st = lock();
            let current = st.current(&broker, since);
            if current {
                st.publish(&shared, &sample, since);
            }
            current
        });
        if !matches!(round.await, Ok(true)) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(out: &[(&'static str, String)]) -> Vec<&'static str> {
        out.iter().map(|(t, _)| *t).collect()
    }

    fn value<'a>(out: &'a [(&'static str, String)], topic: &str) -> Option<&'a str> {
        out.iter().find(|(t, _)| *t == topic).map(|(_, v)| v.as_str())
    }

    #[test]
    fn first_round_publishes_everything_and_loads_at_zero() {
        let mut tree = Tree::default();
        let out = tree.update(&Sample { connected: 2, disconnected: 1, ..Sample::default() }, 0.0);
        assert_eq!(value(&out, "$SYS/broker/clients/connected"), Some("2"));
        assert_eq!(value(&out, "$SYS/broker/clients/total"), Some("3"));
        assert_eq!(value(&out, "$SYS/broker/clients/inactive"), Some("1"));
        assert_eq!(value(&out, "$SYS/broker/load/bytes/sent/15min"), Some("0.00"));
        assert_eq!(value(&out, "$SYS/broker/uptime"), Some("0 seconds"));
        assert!(value(&out, "$SYS/broker/version").unwrap().starts_with("ferry version "));
        assert!(value(&out, "$SYS/broker/heap/current").is_none(), "no heap without a reading");
        assert_eq!(out.len(), tree.all().len(), "each topic once");
    }

    #[test]
    fn unchanged_values_are_not_published_again_but_uptime_is() {
        let mut tree = Tree::default();
        let s = Sample { connected: 1, messages_received: 5, ..Sample::default() };
        tree.update(&s, 0.0);
        let out = tree.update(&Sample { uptime: 10, ..s.clone() }, 10.0);
        assert_eq!(topics(&out), ["$SYS/broker/uptime"]);
        let out = tree.update(&Sample { uptime: 20, connected: 2, ..s }, 20.0);
        assert_eq!(
            topics(&out),
            [
                "$SYS/broker/clients/total",
                "$SYS/broker/clients/maximum",
                "$SYS/broker/clients/connected",
                "$SYS/broker/clients/active",
                "$SYS/broker/uptime"
            ]
        );
    }

    #[test]
    fn maximum_keeps_the_peak_of_total() {
        let mut tree = Tree::default();
        tree.update(&Sample { connected: 3, ..Sample::default() }, 0.0);
        let out = tree.update(&Sample { connected: 1, disconnected: 1, ..Sample::default() }, 1.0);
        assert_eq!(value(&out, "$SYS/broker/clients/total"), Some("2"));
        assert_eq!(value(&out, "$SYS/broker/clients/maximum"), None);
        assert_eq!(tree.all().iter().find(|(t, _)| *t == "$SYS/broker/clients/maximum").unwrap().1, "3");
    }

    #[test]
    fn loads_follow_mosquittos_decaying_average() {
        let mut tree = Tree::default();
        tree.update(&Sample::default(), 0.0);
        // 600 messages in 10 s: 3600 a minute.
        let out = tree.update(&Sample { messages_received: 600, ..Sample::default() }, 10.0);
        let one = 3600.0 * (1.0 - (-10.0f64 / 60.0).exp());
        let fifteen = 3600.0 * (1.0 - (-10.0f64 / 900.0).exp());
        assert_eq!(value(&out, "$SYS/broker/load/messages/received/1min"), Some(format!("{one:.2}").as_str()));
        assert_eq!(value(&out, "$SYS/broker/load/publish/received/15min"), Some(format!("{fifteen:.2}").as_str()));
        assert_eq!(value(&out, "$SYS/broker/load/messages/sent/1min"), None, "no traffic: unchanged");
        // Then nothing: it decays towards 0.
        let out = tree.update(&Sample { messages_received: 600, ..Sample::default() }, 20.0);
        let after = one * (-10.0f64 / 60.0).exp();
        assert_eq!(value(&out, "$SYS/broker/load/messages/received/1min"), Some(format!("{after:.2}").as_str()));
    }

    #[test]
    fn a_load_moving_less_than_a_hundredth_is_not_published() {
        let mut tree = Tree::default();
        let burst = Sample { bytes_received: 600, ..Sample::default() };
        tree.update(&Sample::default(), 0.0);
        tree.update(&burst, 10.0);
        // 1,000 s of quiet: the 1-minute load falls to 0.00, the 15-minute one to a third.
        let out = tree.update(&burst, 1010.0);
        assert_eq!(value(&out, "$SYS/broker/load/bytes/received/1min"), Some("0.00"));
        // 1,000 s more: the 1-minute load moves by far less than 0.01, the 15-minute one still falls.
        let out = tree.update(&burst, 2010.0);
        assert_eq!(value(&out, "$SYS/broker/load/bytes/received/1min"), None);
        assert!(value(&out, "$SYS/broker/load/bytes/received/15min").is_some());
    }

    #[test]
    fn heap_is_read_from_proc_status() {
        let status = "Name:\tferry\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(Heap::parse(status), Some(Heap { current: 10240 * 1024, maximum: 20480 * 1024 }));
        assert_eq!(Heap::parse("Name:\tferry\n"), None);
        assert_eq!(Heap::parse("VmRSS:\tlots kB\nVmHWM:\t1 kB\n"), None);
        if cfg!(target_os = "linux") {
            let h = Heap::read().expect("/proc/self/status");
            assert!(h.current > 0 && h.maximum >= h.current, "{h:?}");
        }
    }
}

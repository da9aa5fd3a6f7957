//! Message rates from counters the core keeps in place.
//!
//! Every sample interval the sampler reads the broker-wide totals and each queue's counters
//! ([`QueueStats`]: published, delivered, acked, depth) and keeps the last two samples of each;
//! a rate is the difference between them over the time between them, as RabbitMQ's
//! `*_details.rate` is over its `collect_statistics_interval`. Nothing is counted per message
//! for this: the counters exist anyway (the queue's under the lock its operation holds, the
//! vhost's and connections' as relaxed atomics). Memory: two samples per queue, rebuilt each
//! round from the queues that exist, so a deleted queue's samples go with it.

use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use ferry_core::frontend::Shutdown;
use ferry_core::queue::QueueStats;
use ferry_core::{Broker, ShortString};

use crate::Shared;

/// Counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Counts {
    pub published: u64,
    pub delivered: u64,
    pub acked: u64,
    /// Messages in the queue(s), ready and unacked.
    pub messages: u64,
    pub ready: u64,
    pub unacked: u64,
}

impl Counts {
    pub fn of(st: &QueueStats) -> Counts {
        Counts {
            published: st.published,
            delivered: st.delivered,
            acked: st.acked,
            messages: st.ready as u64 + st.unacked as u64,
            ready: st.ready as u64,
            unacked: st.unacked as u64,
        }
    }
}

/// Per second, between the last two samples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct PerSecond {
    pub published: f64,
    pub delivered: f64,
    pub acked: f64,
    pub messages: f64,
    pub ready: f64,
    pub unacked: f64,
}

#[derive(Debug, Clone, Copy)]
struct Pair {
    prev: Option<(Instant, Counts)>,
    last: (Instant, Counts),
}

impl Pair {
    fn next(old: Option<&Pair>, at: Instant, counts: Counts) -> Pair {
        Pair { prev: old.map(|p| p.last), last: (at, counts) }
    }

    fn rates(&self) -> PerSecond {
        let Some((t0, a)) = self.prev else { return PerSecond::default() };
        let (t1, b) = self.last;
        let secs = t1.saturating_duration_since(t0).as_secs_f64();
        if secs <= 0.0 {
            return PerSecond::default();
        }
        let up = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
        let change = |x: u64, y: u64| (y as f64 - x as f64) / secs;
        PerSecond {
            published: up(a.published, b.published),
            delivered: up(a.delivered, b.delivered),
            acked: up(a.acked, b.acked),
            messages: change(a.messages, b.messages),
            ready: change(a.ready, b.ready),
            unacked: change(a.unacked, b.unacked),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    overview: Option<Pair>,
    queues: HashMap<(String, ShortString), Pair>,
}

/// The last two samples of the totals and of every queue.
#[derive(Debug, Default)]
pub(crate) struct Rates {
    state: Mutex<State>,
}

impl Rates {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The broker-wide rates (publish, deliver_get, ack, queue depths).
    pub fn overview(&self) -> PerSecond {
        self.state().overview.map(|p| p.rates()).unwrap_or_default()
    }

    /// One queue's rates (zero until it has been sampled twice).
    pub fn queue(&self, vhost: &str, name: &ShortString) -> PerSecond {
        self.state().queues.get(&(vhost.to_string(), name.clone())).map(|p| p.rates()).unwrap_or_default()
    }

    /// The rates of many queues with one lock.
    pub fn queues<'a>(&self, keys: impl Iterator<Item = (&'a str, &'a ShortString)>) -> Vec<PerSecond> {
        let st = self.state();
        let mut key = (String::new(), ShortString::default());
        keys.map(|(v, n)| {
            key.0.clear();
            key.0.push_str(v);
            key.1 = n.clone();
            st.queues.get(&key).map(|p| p.rates()).unwrap_or_default()
        })
        .collect()
    }

    /// Takes one sample of everything.
    pub fn sample(&self, broker: &Broker, now: Instant) {
        let mut queues = Vec::new();
        let mut total = Counts::default();
        for vhost in broker.vhost_names() {
            let Some(v) = broker.vhost(&vhost) else { continue };
            let (live, retired) = v.queues_and_retired();
            total.published += v.stats().messages_in.load(std::sync::atomic::Ordering::Relaxed);
            total.acked += retired.acked;
            for q in live {
                let c = Counts::of(&q.stats());
                total.acked += c.acked;
                total.messages += c.messages;
                total.ready += c.ready;
                total.unacked += c.unacked;
                queues.push(((vhost.clone(), q.name().clone()), c));
            }
        }
        // Deliveries to every client (queues and MQTT direct sinks alike): what the
        // connections counted.
        total.delivered = broker.connections().totals().iter().map(|t| t.messages_out).sum();
        let mut st = self.state();
        let overview = Pair::next(st.overview.as_ref(), now, total);
        st.overview = Some(overview);
        let mut next = HashMap::with_capacity(queues.len());
        for (key, c) in queues {
            let pair = Pair::next(st.queues.get(&key), now, c);
            next.insert(key, pair);
        }
        st.queues = next;
    }
}

/// Samples every `interval` until shutdown (or until the management state is gone).
pub(crate) async fn run(shared: Weak<Shared>, interval: Duration, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        let Some(shared) = shared.upgrade() else { return };
        // Walks every queue: off the async workers.
        let sampled = tokio::task::spawn_blocking(move || shared.rates.sample(&shared.broker, Instant::now())).await;
        if sampled.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_the_difference_of_the_last_two_samples() {
        let t0 = Instant::now();
        let first = Pair::next(None, t0, Counts { published: 10, messages: 4, ..Counts::default() });
        assert_eq!(first.rates(), PerSecond::default(), "one sample: no rate yet");
        let second = Pair::next(
            Some(&first),
            t0 + Duration::from_secs(2),
            Counts { published: 30, messages: 0, ..Counts::default() },
        );
        let r = second.rates();
        assert_eq!(r.published, 10.0);
        assert_eq!(r.messages, -2.0);
    }
}

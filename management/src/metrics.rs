//! `GET /metrics`: the Prometheus text exposition format 0.0.4.
//!
//! One [`Snapshot`] of the counters the core keeps in place (the connection registry's
//! per-protocol totals, each vhost's counters, each queue's [`QueueStats`], the store's commit
//! histogram, the alarms, the bridges' status) is rendered under Ferry's names (`ferry_*`, with
//! a `protocol` label where it applies) or, with `?prefix=rabbitmq`, under the names of
//! RabbitMQ's Prometheus plugin for the families both have, so that dashboards made for
//! RabbitMQ work. Per-queue series are capped at `metrics_max_queues` (by vhost and name), and
//! `ferry_queues_omitted` says how many were left out; the per-vhost totals count every queue.

use std::fmt::{Display, Write};

use ferry_core::connections::{ProtocolTotals, PROTOCOLS};
use ferry_core::queue::QueueStats;
use ferry_core::store::{CommitSnapshot, COMMIT_LATENCY_BOUNDS};
use ferry_core::{Broker, Protocol};

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Per vhost.
#[derive(Debug, Default)]
struct VhostSnapshot {
    name: String,
    published: u64,
    unroutable: u64,
    dropped_at_sinks: u64,
    /// Over every queue, live and deleted (counters) or live (depths).
    queues: QueueStats,
    queue_count: u64,
    exchange_count: u64,
    retained: u64,
    persistent_sessions: u64,
}

/// Everything `/metrics` shows, read at one moment.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    protocols: [ProtocolTotals; 3],
    channels: u64,
    vhosts: Vec<VhostSnapshot>,
    /// (vhost, queue, stats), by vhost and name, at most the cap.
    queues: Vec<(String, String, QueueStats)>,
    omitted: u64,
    store: Option<CommitSnapshot>,
    memory_alarm: bool,
    memory_used: u64,
    memory_limit: u64,
    disk_alarm: bool,
    disk_free: u64,
    bridges: Vec<ferry_bridge::BridgeStatus>,
    uptime_seconds: f64,
    /// MQTT connections parked without a task (`ferry_mqtt::park`); `None` without the MQTT
    /// frontend.
    mqtt_parked: Option<u64>,
}

fn add(into: &mut QueueStats, st: &QueueStats) {
    into.ready = into.ready.saturating_add(st.ready);
    into.unacked = into.unacked.saturating_add(st.unacked);
    into.consumers = into.consumers.saturating_add(st.consumers);
    into.ready_bytes += st.ready_bytes;
    into.dropped_overflow += st.dropped_overflow;
    into.rejected_overflow += st.rejected_overflow;
    into.published += st.published;
    into.delivered += st.delivered;
    into.acked += st.acked;
}

impl Snapshot {
    pub fn take(
        broker: &Broker,
        mqtt: Option<&ferry_mqtt::Shared>,
        bridges: &ferry_bridge::StatusReader,
        max_queues: usize,
        uptime_seconds: f64,
    ) -> Snapshot {
        use std::sync::atomic::Ordering::Relaxed;
        let mut snap = Snapshot {
            protocols: broker.connections().totals(),
            channels: broker.connections().entries_by_id().iter().map(|e| e.channels() as u64).sum(),
            uptime_seconds,
            mqtt_parked: mqtt.map(|m| m.parked_connections().map_or(0, |(parked, _)| parked as u64)),
            ..Snapshot::default()
        };
        let mut names = broker.vhost_names();
        names.sort();
        for name in names {
            let Some(v) = broker.vhost(&name) else { continue };
            let (live, retired) = v.queues_and_retired();
            let stats = v.stats();
            let mut vs = VhostSnapshot {
                name: name.clone(),
                published: stats.messages_in.load(Relaxed),
                unroutable: stats.unroutable.load(Relaxed),
                dropped_at_sinks: stats.dropped_at_sinks.load(Relaxed),
                queues: retired,
                queue_count: live.len() as u64,
                exchange_count: v.exchange_names().len() as u64,
                retained: v.retained().len() as u64,
                persistent_sessions: 0,
            };
            let mut listed: Vec<(String, QueueStats)> = Vec::with_capacity(live.len());
            for q in &live {
                let st = q.stats();
                add(&mut vs.queues, &st);
                let qname = q.name().to_string_lossy();
                if qname.starts_with(ferry_mqtt::acl::SESSION_QUEUE_PREFIX) {
                    vs.persistent_sessions += 1;
                }
                listed.push((qname, st));
            }
            listed.sort_by(|a, b| a.0.cmp(&b.0));
            for (qname, st) in listed {
                if snap.queues.len() < max_queues {
                    snap.queues.push((name.clone(), qname, st));
                } else {
                    snap.omitted += 1;
                }
            }
            snap.vhosts.push(vs);
        }
        snap.store = broker.store().commit_stats().map(|c| c.snapshot());
        snap.memory_alarm = broker.memory().is_raised();
        snap.memory_used = broker.memory().used();
        snap.memory_limit = broker.memory().limit();
        snap.disk_alarm = broker.disk().is_raised();
        snap.disk_free = broker.disk().free();
        snap.bridges = bridges.status();
        snap
    }

    fn connections(&self) -> u64 {
        self.protocols.iter().map(|p| p.open).sum()
    }

    fn total<F: Fn(&VhostSnapshot) -> u64>(&self, f: F) -> u64 {
        self.vhosts.iter().map(f).sum()
    }

    /// The text under Ferry's names.
    pub fn render_ferry(&self) -> String {
        let mut o = Out::default();
        o.family("ferry_build_info", "gauge", "Ferry's version (the value is always 1).");
        o.sample("ferry_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
        o.family("ferry_uptime_seconds", "gauge", "Seconds since the HTTP side started.");
        o.sample("ferry_uptime_seconds", &[], self.uptime_seconds);

        let protocols = || PROTOCOLS.iter().zip(&self.protocols);
        let per_protocol = |o: &mut Out, name: &str, kind: &str, help: &str, f: &dyn Fn(&ProtocolTotals) -> u64| {
            o.family(name, kind, help);
            for (p, t) in protocols() {
                o.sample(name, &[("protocol", &p.to_string())], f(t));
            }
        };
        per_protocol(&mut o, "ferry_connections", "gauge", "Open client connections.", &|t| t.open);
        per_protocol(&mut o, "ferry_connections_opened_total", "counter", "Connections opened.", &|t| t.opened);
        per_protocol(&mut o, "ferry_messages_received_total", "counter", "Messages published by clients.", &|t| {
            t.messages_in
        });
        per_protocol(&mut o, "ferry_messages_delivered_total", "counter", "Messages delivered to clients.", &|t| {
            t.messages_out
        });
        per_protocol(&mut o, "ferry_received_bytes_total", "counter", "Bytes read from clients.", &|t| t.bytes_in);
        per_protocol(&mut o, "ferry_sent_bytes_total", "counter", "Bytes written to clients.", &|t| t.bytes_out);
        o.family("ferry_channels", "gauge", "Open AMQP channels.");
        o.sample("ferry_channels", &[], self.channels);

        let per_vhost = |o: &mut Out, name: &str, kind: &str, help: &str, f: &dyn Fn(&VhostSnapshot) -> u64| {
            o.family(name, kind, help);
            for v in &self.vhosts {
                o.sample(name, &[("vhost", &v.name)], f(v));
            }
        };
        per_vhost(&mut o, "ferry_messages_published_total", "counter", "Messages that reached an exchange.", &|v| {
            v.published
        });
        per_vhost(
            &mut o,
            "ferry_messages_routed_total",
            "counter",
            "Messages routed to at least one queue or subscriber.",
            &|v| v.published.saturating_sub(v.unroutable),
        );
        per_vhost(
            &mut o,
            "ferry_messages_acknowledged_total",
            "counter",
            "Deliveries acknowledged by consumers.",
            &|v| v.queues.acked,
        );
        o.family("ferry_messages_dropped_total", "counter", "Messages dropped, by reason.");
        for v in &self.vhosts {
            for (reason, n) in [
                ("unroutable", v.unroutable),
                ("subscriber_overflow", v.dropped_at_sinks),
                ("queue_overflow_drop_head", v.queues.dropped_overflow),
                ("queue_overflow_reject_publish", v.queues.rejected_overflow),
            ] {
                o.sample("ferry_messages_dropped_total", &[("vhost", &v.name), ("reason", reason)], n);
            }
        }
        per_vhost(&mut o, "ferry_queues", "gauge", "Queues.", &|v| v.queue_count);
        per_vhost(&mut o, "ferry_exchanges", "gauge", "Exchanges.", &|v| v.exchange_count);
        per_vhost(&mut o, "ferry_consumers", "gauge", "Queue consumers.", &|v| v.queues.consumers as u64);
        per_vhost(&mut o, "ferry_messages_ready", "gauge", "Messages ready in all queues.", &|v| v.queues.ready as u64);
        per_vhost(&mut o, "ferry_messages_unacked", "gauge", "Messages delivered and not yet acknowledged.", &|v| {
            v.queues.unacked as u64
        });
        per_vhost(&mut o, "ferry_retained_messages", "gauge", "MQTT retained messages.", &|v| v.retained);
        if let Some(parked) = self.mqtt_parked {
            o.family(
                "ferry_mqtt_connections_parked",
                "gauge",
                "Idle MQTT connections parked without a task (their sockets in one epoll set).",
            );
            o.sample("ferry_mqtt_connections_parked", &[], parked);
        }
        per_vhost(
            &mut o,
            "ferry_mqtt_persistent_sessions",
            "gauge",
            "MQTT sessions kept across connections (connected or not).",
            &|v| v.persistent_sessions,
        );

        type QueueField = fn(&QueueStats) -> u64;
        let per_queue: [(&str, &str, QueueField); 6] = [
            ("ferry_queue_messages_ready", "Messages ready in the queue.", |s| s.ready as u64),
            ("ferry_queue_messages_unacked", "Messages delivered from the queue, not yet acknowledged.", |s| {
                s.unacked as u64
            }),
            ("ferry_queue_messages_ready_bytes", "Body bytes of the ready messages.", |s| s.ready_bytes),
            ("ferry_queue_messages_paged_out", "Of the ready messages, those on disk only (the queue's tail).", |s| {
                s.paged_out as u64
            }),
            ("ferry_queue_messages_paged_out_bytes", "Body bytes of the messages on disk only.", |s| s.paged_out_bytes),
            ("ferry_queue_consumers", "Consumers of the queue.", |s| s.consumers as u64),
        ];
        for (name, help, f) in per_queue {
            o.family(name, "gauge", help);
            for (vhost, queue, st) in &self.queues {
                o.sample(name, &[("vhost", vhost), ("queue", queue)], f(st));
            }
        }
        o.family("ferry_queues_omitted", "gauge", "Queues left out of the per-queue series (metrics_max_queues).");
        o.sample("ferry_queues_omitted", &[], self.omitted);

        if let Some(c) = &self.store {
            o.family("ferry_store_commits_total", "counter", "Store transactions committed (each one fsync).");
            o.sample("ferry_store_commits_total", &[], c.count);
            o.family("ferry_store_commit_seconds", "histogram", "Time to commit a store transaction (fsync).");
            for (bound, n) in COMMIT_LATENCY_BOUNDS.iter().zip(c.cumulative) {
                o.sample("ferry_store_commit_seconds_bucket", &[("le", &bound.to_string())], n);
            }
            o.sample("ferry_store_commit_seconds_bucket", &[("le", "+Inf")], c.count);
            o.sample("ferry_store_commit_seconds_sum", &[], c.sum_seconds);
            o.sample("ferry_store_commit_seconds_count", &[], c.count);
        }

        o.family("ferry_alarm", "gauge", "1 while a resource alarm blocks publishers.");
        o.sample("ferry_alarm", &[("resource", "memory")], self.memory_alarm as u8);
        o.sample("ferry_alarm", &[("resource", "disk")], self.disk_alarm as u8);
        o.family(
            "ferry_queued_message_bytes",
            "gauge",
            "What the messages held in queues cost in memory: bodies plus per-message bookkeeping (what the memory alarm measures).",
        );
        o.sample("ferry_queued_message_bytes", &[], self.memory_used);
        o.family("ferry_memory_limit_bytes", "gauge", "The memory alarm's watermark (0: off).");
        o.sample("ferry_memory_limit_bytes", &[], self.memory_limit);
        o.family("ferry_disk_free_bytes", "gauge", "Free space in the data directory's file system.");
        o.sample("ferry_disk_free_bytes", &[], self.disk_free);

        self.render_bridges(&mut o);
        o.s
    }

    fn render_bridges(&self, o: &mut Out) {
        if self.bridges.is_empty() {
            return;
        }
        o.family("ferry_bridge_up", "gauge", "1 while the bridge's link is up.");
        for b in &self.bridges {
            o.sample("ferry_bridge_up", &[("bridge", &b.name)], (b.state == ferry_bridge::LinkState::Up) as u8);
        }
        type BridgeField = fn(&ferry_bridge::BridgeStatus) -> u64;
        let gauges: [(&str, &str, BridgeField); 2] = [
            ("ferry_bridge_queued_messages", "Messages waiting in the bridge's local queue.", |b| b.queued),
            ("ferry_bridge_in_flight_messages", "Messages sent and not yet acknowledged by the remote.", |b| {
                b.in_flight
            }),
        ];
        for (name, help, f) in gauges {
            o.family(name, "gauge", help);
            for b in &self.bridges {
                o.sample(name, &[("bridge", &b.name)], f(b));
            }
        }
        o.family("ferry_bridge_forwarded_messages_total", "counter", "Messages forwarded, by direction.");
        for b in &self.bridges {
            o.sample(
                "ferry_bridge_forwarded_messages_total",
                &[("bridge", &b.name), ("direction", "out")],
                b.forwarded_out,
            );
            o.sample(
                "ferry_bridge_forwarded_messages_total",
                &[("bridge", &b.name), ("direction", "in")],
                b.forwarded_in,
            );
        }
        o.family("ferry_bridge_dropped_messages_total", "counter", "Messages a bridge did not forward, by reason.");
        for b in &self.bridges {
            for (reason, n) in [
                ("overflow", b.dropped_overflow),
                ("rejected_overflow", b.rejected_overflow),
                ("max_hops", b.dropped_max_hops),
                ("loop", b.dropped_loop),
                ("no_rule", b.dropped_no_rule),
                ("refused", b.dropped_refused),
            ] {
                o.sample("ferry_bridge_dropped_messages_total", &[("bridge", &b.name), ("reason", reason)], n);
            }
        }
        o.family(
            "ferry_bridge_refused_messages_total",
            "counter",
            "Messages a bridge's remote refused (MQTT 5.0 reason code 0x80 or above), by reason code.",
        );
        for b in &self.bridges {
            for (code, n) in &b.dropped_refused_by_reason {
                let code = format!("0x{code:02x}");
                o.sample("ferry_bridge_refused_messages_total", &[("bridge", &b.name), ("reason_code", &code)], *n);
            }
        }
        o.family("ferry_bridge_connects_total", "counter", "Connections the bridge established.");
        for b in &self.bridges {
            o.sample("ferry_bridge_connects_total", &[("bridge", &b.name)], b.connects);
        }
        o.family("ferry_bridge_connect_attempts_total", "counter", "Connection attempts, failed ones included.");
        for b in &self.bridges {
            o.sample("ferry_bridge_connect_attempts_total", &[("bridge", &b.name)], b.attempts);
        }
    }

    /// The text under the names of RabbitMQ's Prometheus plugin (`rabbitmq_*`).
    pub fn render_rabbitmq(&self) -> String {
        let mut o = Out::default();
        let rabbit_protocol = |p: Protocol| match p {
            Protocol::Amqp => Some("amqp091"),
            Protocol::Mqtt => Some("mqtt"),
            Protocol::Internal => None,
        };
        let single = |o: &mut Out, name: &str, kind: &str, help: &str, v: u64| {
            o.family(name, kind, help);
            o.sample(name, &[], v);
        };
        single(&mut o, "rabbitmq_connections", "gauge", "Connections currently open", self.connections());
        single(
            &mut o,
            "rabbitmq_connections_opened_total",
            "counter",
            "Total number of connections opened",
            self.protocols.iter().map(|p| p.opened).sum(),
        );
        single(&mut o, "rabbitmq_channels", "gauge", "Channels currently open", self.channels);
        single(
            &mut o,
            "rabbitmq_consumers",
            "gauge",
            "Consumers currently connected",
            self.total(|v| v.queues.consumers as u64),
        );
        single(&mut o, "rabbitmq_queues", "gauge", "Queues available", self.total(|v| v.queue_count));
        single(
            &mut o,
            "rabbitmq_connection_incoming_bytes_total",
            "counter",
            "Total number of bytes received on a connection",
            self.protocols.iter().map(|p| p.bytes_in).sum(),
        );
        single(
            &mut o,
            "rabbitmq_connection_outgoing_bytes_total",
            "counter",
            "Total number of bytes sent on a connection",
            self.protocols.iter().map(|p| p.bytes_out).sum(),
        );
        let per_protocol = |o: &mut Out, name: &str, help: &str, f: &dyn Fn(&ProtocolTotals) -> u64| {
            o.family(name, "counter", help);
            for (p, t) in PROTOCOLS.iter().zip(&self.protocols) {
                if let Some(label) = rabbit_protocol(*p) {
                    o.sample(name, &[("protocol", label)], f(t));
                }
            }
        };
        per_protocol(
            &mut o,
            "rabbitmq_global_messages_received_total",
            "Total number of messages received from publishers",
            &|t| t.messages_in,
        );
        per_protocol(
            &mut o,
            "rabbitmq_global_messages_delivered_total",
            "Total number of messages delivered to consumers",
            &|t| t.messages_out,
        );
        single(
            &mut o,
            "rabbitmq_global_messages_routed_total",
            "counter",
            "Total number of messages routed to queues or streams",
            self.total(|v| v.published.saturating_sub(v.unroutable)),
        );
        single(
            &mut o,
            "rabbitmq_global_messages_unroutable_dropped_total",
            "counter",
            "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
            self.total(|v| v.unroutable),
        );
        single(
            &mut o,
            "rabbitmq_global_messages_acknowledged_total",
            "counter",
            "Total number of messages acknowledged by consumers",
            self.total(|v| v.queues.acked),
        );
        type QueueField = fn(&QueueStats) -> u64;
        let per_queue: [(&str, &str, QueueField); 4] = [
            ("rabbitmq_queue_messages_ready", "Messages ready to be delivered to consumers", |s| s.ready as u64),
            ("rabbitmq_queue_messages_unacked", "Messages delivered to consumers but not yet acknowledged", |s| {
                s.unacked as u64
            }),
            ("rabbitmq_queue_messages", "Sum of ready and unacknowledged messages - total queue depth", |s| {
                s.ready as u64 + s.unacked as u64
            }),
            ("rabbitmq_queue_consumers", "Consumers on a queue", |s| s.consumers as u64),
        ];
        for (name, help, f) in per_queue {
            o.family(name, "gauge", help);
            for (vhost, queue, st) in &self.queues {
                o.sample(name, &[("vhost", vhost), ("queue", queue)], f(st));
            }
        }
        single(
            &mut o,
            "rabbitmq_alarms_memory_used_watermark",
            "gauge",
            "is 1 if VM memory watermark threshold is reached",
            self.memory_alarm as u64,
        );
        single(
            &mut o,
            "rabbitmq_alarms_free_disk_space_watermark",
            "gauge",
            "is 1 if free disk space is below the watermark",
            self.disk_alarm as u64,
        );
        o.s
    }
}

/// The text being written.
#[derive(Debug, Default)]
struct Out {
    s: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.s, "# HELP {name} {help}");
        let _ = writeln!(self.s, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.s.push_str(name);
        if !labels.is_empty() {
            self.s.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.s.push(',');
                }
                self.s.push_str(k);
                self.s.push_str("=\"");
                escape_into(&mut self.s, v);
                self.s.push('"');
            }
            self.s.push('}');
        }
        let _ = writeln!(self.s, " {value}");
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut o = Out::default();
        o.sample("m", &[("queue", "a\"b\\c\nd")], 1);
        assert_eq!(o.s, "m{queue=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}

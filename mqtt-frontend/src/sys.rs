//! `$SYS/broker/...` statistics, published as retained messages every [`SYS_INTERVAL`], with
//! the topic names Mosquitto uses so existing dashboards work.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use ferry_core::message::{now_millis, Message, Origin};
use ferry_core::vhost::VHost;

use crate::topic::swap_separators;
use crate::Shared;

/// Mosquitto's default `sys_interval`.
pub const SYS_INTERVAL: Duration = Duration::from_secs(10);

/// The values published, as (topic, payload).
pub fn snapshot(shared: &Shared) -> Vec<(&'static str, String)> {
    let s = &shared.stats;
    vec![
        ("$SYS/broker/version", format!("ferry {}", env!("CARGO_PKG_VERSION"))),
        ("$SYS/broker/uptime", format!("{} seconds", shared.started.elapsed().as_secs())),
        ("$SYS/broker/clients/connected", shared.registry.connected().to_string()),
        ("$SYS/broker/clients/total", s.connections_total.load(Ordering::Relaxed).to_string()),
        ("$SYS/broker/messages/received", s.messages_in.load(Ordering::Relaxed).to_string()),
        ("$SYS/broker/messages/sent", s.messages_out.load(Ordering::Relaxed).to_string()),
        ("$SYS/broker/bytes/received", s.bytes_in.load(Ordering::Relaxed).to_string()),
        ("$SYS/broker/bytes/sent", s.bytes_out.load(Ordering::Relaxed).to_string()),
    ]
}

/// Publishes one round of statistics into `vhost`.
pub fn publish_once(shared: &Shared, vhost: &VHost) {
    let exchange = shared.settings.exchange.clone();
    let now = now_millis();
    for (topic, value) in snapshot(shared) {
        let key = swap_separators(topic);
        let m =
            Message::new(exchange.clone(), key.as_str(), Bytes::from(value)).with_origin(Origin::internal()).at(now);
        vhost.set_retained(&key.as_str().into(), Arc::new(m.clone()));
        let _ = vhost.publish(&exchange, m, now);
    }
}

/// Runs until the frontend is dropped.
pub async fn run(shared: Weak<Shared>, vhost: Arc<VHost>) {
    loop {
        match shared.upgrade() {
            Some(s) => publish_once(&s, &vhost),
            None => return,
        }
        tokio::time::sleep(SYS_INTERVAL).await;
    }
}

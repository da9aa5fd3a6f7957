//! Reconnect back-off against a remote that flaps: it accepts TCP, answers the CONNECT with a
//! CONNACK (success) and closes. The bridge must back off ever longer, not reconnect in a
//! tight loop; the back-off starts again from its first delay only after a connection that
//! stayed up (`reconnect_max_ms / 2`, at most 30 s). On tokio's paused clock: the delays are
//! measured in virtual time, nothing waits for them for real.

use std::sync::Arc;
use std::time::Duration;

use ferry_bridge::{BridgeConfig, Bridges, Direction, LinkState, TopicRule};
use ferry_core::frontend::Shutdown;
use ferry_core::store::MemoryStore;
use ferry_core::Broker;
use ferry_mqtt::codec::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A fake 5.0 remote: answers each connection's CONNECT with CONNACK 0x00, holds it for the
/// next duration of `hold` (none left: zero), then closes. Reports when each connection came.
async fn flapping_remote(hold: Vec<Duration>) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Instant>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut hold = hold.into_iter();
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            if tx.send(Instant::now()).is_err() {
                return;
            }
            let held = hold.next().unwrap_or_default();
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                // The CONNECT (small enough to come in one read on loopback).
                if !matches!(s.read(&mut buf).await, Ok(n) if n > 0 && buf[0] == 0x10) {
                    return;
                }
                // CONNACK: no session present, success, no properties.
                let _ = s.write_all(&[0x20, 0x03, 0x00, 0x00, 0x00]).await;
                // The scenario itself: the connection stays up this long (virtual time).
                tokio::time::sleep(held).await;
            });
        }
    });
    (addr, rx)
}

fn config(addr: std::net::SocketAddr) -> BridgeConfig {
    let mut c = BridgeConfig::new("flap", &addr.to_string());
    c.topics.push(TopicRule {
        pattern: "#".into(),
        direction: Direction::Out,
        qos: QoS::AtLeastOnce,
        local_prefix: String::new(),
        remote_prefix: String::new(),
    });
    c.backoff_initial = Duration::from_secs(1);
    c.backoff_max = Duration::from_secs(60);
    c
}

fn start(config: BridgeConfig) -> (Bridges, tokio::sync::watch::Sender<bool>) {
    let broker = Broker::new(Arc::new(MemoryStore::new()));
    let (stop, shutdown) = Shutdown::channel();
    let bridges = Bridges::start(&broker, &[config], shutdown).expect("bridge starts");
    // One message for the remote, in flight at every connection.
    let vhost = broker.vhost("/").expect("default vhost");
    let mut m = ferry_core::message::Message::new("amq.topic", "a", bytes::Bytes::from_static(b"keep me"));
    // Persistent: QoS 1 towards the remote.
    m.properties.delivery_mode = Some(ferry_core::message::DeliveryMode::Persistent);
    vhost.publish(&"amq.topic".into(), m, ferry_core::message::now_millis()).expect("published");
    (bridges, stop)
}

/// The next connection's time, within a (virtual) hour.
async fn next(rx: &mut mpsc::UnboundedReceiver<Instant>) -> Instant {
    tokio::time::timeout(Duration::from_secs(3600), rx.recv()).await.expect("a reconnect within an hour").expect("open")
}

#[tokio::test(start_paused = true)]
async fn a_remote_that_closes_after_the_connack_is_retried_ever_more_slowly() {
    let (addr, mut conns) = flapping_remote(Vec::new()).await;
    let (bridges, _stop) = start(config(addr));
    let mut at = vec![next(&mut conns).await];
    for _ in 0..6 {
        at.push(next(&mut conns).await);
    }
    // Each connection came up (CONNACK) and yet counted as a failure: 1, 2, 4, 8, 16, 32 s
    // nominal, each drawn from the upper half of its range.
    for (k, pair) in at.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let nominal = Duration::from_secs(1 << k);
        assert!(gap >= nominal / 2 && gap <= nominal + Duration::from_millis(100), "gap {k}: {gap:?}");
    }
    let st = tokio::time::timeout(
        Duration::from_secs(10),
        bridges.wait_for("flap", |s| s.attempts >= 7 && s.state == LinkState::BackingOff),
    )
    .await
    .expect("status")
    .expect("bridge");
    assert!(st.connects >= 7, "every attempt got its CONNACK: {st:?}");
    // The remote closed with the message in flight each time, but never answered the probe's
    // PINGREQ: a flapping remote is no reason to drop it.
    assert_eq!((st.in_flight, st.dropped_too_large), (1, 0), "{st:?}");
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("closed the connection")), "the cause is kept: {st:?}");
}

#[tokio::test(start_paused = true)]
async fn the_back_off_starts_again_only_after_a_connection_that_stayed_up() {
    // Connections 1-3 close at once; 4 stays up 31 s (past the 30 s rule), then closes; 5
    // closes at once.
    let zero = Duration::ZERO;
    let (addr, mut conns) = flapping_remote(vec![zero, zero, zero, Duration::from_secs(31), zero]).await;
    let (_bridges, _stop) = start(config(addr));
    let mut at = Vec::new();
    for _ in 0..6 {
        at.push(next(&mut conns).await);
    }
    // 1 → 2 → 3 → 4: growing (nominal 1, 2, 4 s).
    assert!(at[3] - at[2] >= Duration::from_secs(2), "{:?}", at[3] - at[2]);
    // 4 stayed up 31 s: then the first delay again (at most 1 s after it closed).
    let after_stable = at[4] - at[3];
    assert!(after_stable >= Duration::from_secs(31) && after_stable <= Duration::from_secs(32), "{after_stable:?}");
    // 5 closed at once: the delay doubles again from the start (nominal 2 s), not from 8 s.
    let gap = at[5] - at[4];
    assert!(gap >= Duration::from_secs(1) && gap <= Duration::from_secs(2), "{gap:?}");
}

#[tokio::test(start_paused = true)]
async fn a_connection_up_for_less_than_the_rule_does_not_reset_the_back_off() {
    // 29 s up is less than the 30 s the default maximum (60 s) asks for.
    let zero = Duration::ZERO;
    let (addr, mut conns) = flapping_remote(vec![zero, zero, zero, Duration::from_secs(29), zero]).await;
    let (_bridges, _stop) = start(config(addr));
    let mut at = Vec::new();
    for _ in 0..5 {
        at.push(next(&mut conns).await);
    }
    // After the 29 s connection: nominal 8 s, so at least 4 s after it closed.
    let gap = at[4] - at[3] - Duration::from_secs(29);
    assert!(gap >= Duration::from_secs(4) && gap <= Duration::from_secs(8), "{gap:?}");
}

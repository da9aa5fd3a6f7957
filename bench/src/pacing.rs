//! Pacing a publisher at a fixed rate (`--rate`): message `k` is due at `k / rate` from the
//! start, shared by the MQTT, AMQP and cross-protocol scenarios.

use std::time::Duration;

/// Messages a publisher paced at `per_sec` may have sent `elapsed` after the start (message
/// `k` is due at `k / per_sec`), at most `messages`.
pub(crate) fn paced_allowed(elapsed: Duration, per_sec: f64, messages: u32) -> u32 {
    let n = (elapsed.as_secs_f64() * per_sec) as u64 + 1;
    n.min(u64::from(messages)) as u32
}

/// When message `seq` of a publisher paced at `per_sec` is due, from the start.
pub(crate) fn paced_due(seq: u32, per_sec: f64) -> Duration {
    Duration::from_secs_f64(f64::from(seq) / per_sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_releases_messages_on_schedule() {
        // 1,000 messages/s: message 0 at once, message k at k ms, never more than `messages`.
        assert_eq!(paced_allowed(Duration::ZERO, 1000.0, 10), 1);
        assert_eq!(paced_allowed(Duration::from_micros(2500), 1000.0, 10), 3);
        assert_eq!(paced_allowed(Duration::from_secs(60), 1000.0, 10), 10);
        assert_eq!(paced_due(0, 1000.0), Duration::ZERO);
        assert_eq!(paced_due(250, 1000.0), Duration::from_millis(250));
        // Each message is allowed from the moment it is due.
        for seq in [1u32, 7, 999, 123_456] {
            assert!(paced_allowed(paced_due(seq, 250.0), 250.0, u32::MAX) > seq);
        }
    }
}

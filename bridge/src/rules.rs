//! Topic rules at work: which rule a topic falls under, and its name on the other side.

use crate::config::TopicRule;

/// Whether MQTT topic `topic` matches filter `filter` (`+` one level, `#` the rest, including
/// none; a leading wildcard does not match a topic starting with `$`, MQTT §4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match f {
            "#" => return true,
            "+" => {
                if t.next().is_none() {
                    return false;
                }
            }
            literal => {
                if t.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    t.next().is_none()
}

/// The remote topic for local topic `topic` under the first `out` rule that matches it.
pub fn outbound<'r>(rules: &'r [TopicRule], topic: &str) -> Option<(&'r TopicRule, String)> {
    rules.iter().filter(|r| r.direction.is_out()).find_map(|r| {
        let rest = topic.strip_prefix(r.local_prefix.as_str())?;
        matches(&r.pattern, rest).then(|| (r, format!("{}{rest}", r.remote_prefix)))
    })
}

/// The local topic for remote topic `topic` under the first `in` rule that matches it.
pub fn inbound<'r>(rules: &'r [TopicRule], topic: &str) -> Option<(&'r TopicRule, String)> {
    rules.iter().filter(|r| r.direction.is_in()).find_map(|r| {
        let rest = topic.strip_prefix(r.remote_prefix.as_str())?;
        matches(&r.pattern, rest).then(|| (r, format!("{}{rest}", r.local_prefix)))
    })
}

#[cfg(test)]
mod tests {
    use ferry_mqtt::codec::QoS;

    use super::*;
    use crate::config::Direction;

    fn rule(pattern: &str, direction: Direction, local: &str, remote: &str) -> TopicRule {
        TopicRule {
            pattern: pattern.into(),
            direction,
            qos: QoS::AtLeastOnce,
            local_prefix: local.into(),
            remote_prefix: remote.into(),
        }
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/d"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(!matches("a/b", "a"));
        assert!(matches("+/+", "/x"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn outbound_swaps_the_local_prefix_for_the_remote_one() {
        let rules = [rule("in/#", Direction::In, "", ""), rule("s/#", Direction::Out, "edge/", "site7/")];
        let (r, topic) = outbound(&rules, "edge/s/temp").unwrap();
        assert_eq!((r.pattern.as_str(), topic.as_str()), ("s/#", "site7/s/temp"));
        assert!(outbound(&rules, "s/temp").is_none(), "the local prefix is required");
        assert!(outbound(&rules, "in/x").is_none(), "an in rule does not send");
    }

    #[test]
    fn inbound_swaps_the_remote_prefix_for_the_local_one() {
        let rules = [rule("cmd/+", Direction::Both, "here/", "there/")];
        assert_eq!(inbound(&rules, "there/cmd/7").unwrap().1, "here/cmd/7");
        assert!(inbound(&rules, "there/cmd/7/x").is_none());
        assert_eq!(outbound(&rules, "here/cmd/7").unwrap().1, "there/cmd/7");
    }
}

//! MQTT PUBLISH ↔ core [`Message`], both ways. The table is in `docs/mapping.md`.
//!
//! What MQTT carries that AMQP's basic properties have no field for travels in headers whose
//! names start with `x-mqtt-`; those are never shown to MQTT clients as user properties.

use bytes::Bytes;
use ferry_core::message::{DeliveryMode, FieldTable, FieldValue, Message, Millis, Origin, Properties, ShortString};

use crate::codec::{self, Publish, QoS, Str};
use crate::topic::swap_separators;

/// QoS 2 publishes carry their QoS (QoS 0 and 1 are told apart by the delivery mode alone, so
/// they need no header and no allocation).
pub const H_QOS: &str = "x-mqtt-qos";
/// Set (true) on messages published with RETAIN, for retain-as-published.
pub const H_RETAIN: &str = "x-mqtt-retain";
/// The payload format indicator (0 bytes, 1 UTF-8).
pub const H_PAYLOAD_FORMAT: &str = "x-mqtt-payload-format";
/// Correlation data that does not fit AMQP's `correlation_id`: longer than a short string
/// (255 bytes), or not UTF-8 (AMQP clients read `correlation_id` as text; lapin and pika fail
/// on other bytes).
pub const H_CORRELATION: &str = "x-correlation-data";
/// A content type longer than AMQP's `content_type` (a short string) can hold.
pub const H_CONTENT_TYPE: &str = "x-mqtt-content-type";
/// A response topic longer than AMQP's `reply_to` can hold, as the MQTT topic (not swapped).
pub const H_RESPONSE_TOPIC: &str = "x-mqtt-response-topic";

fn reserved(key: &[u8]) -> bool {
    key.starts_with(b"x-mqtt-") || key == H_CORRELATION.as_bytes()
}

/// Builds the core message for a PUBLISH on `topic` (already resolved from a topic alias).
pub fn to_message(p: &Publish, topic: &str, exchange: &ShortString, origin: Origin, now: Millis) -> Message {
    to_message_keyed(p, p.payload.clone(), ShortString::from(swap_separators(topic)), exchange, origin, now)
}

/// [`to_message`] with the routing key already worked out from the topic (a session swaps the
/// separators into its own buffer: `topic::swap_separators_in`).
pub fn to_message_keyed(
    p: &Publish,
    payload: Bytes,
    routing_key: ShortString,
    exchange: &ShortString,
    origin: Origin,
    now: Millis,
) -> Message {
    // The delivery mode is set both ways, so AMQP consumers see 1 or 2 as from an AMQP publisher.
    let mode = if p.qos > QoS::AtMostOnce { DeliveryMode::Persistent } else { DeliveryMode::Transient };
    let mut props = Properties { delivery_mode: Some(mode), ..Properties::default() };
    let mp = &p.properties;
    let mut headers: Option<FieldTable> = None;
    let mut header = |k: &'static str, v: FieldValue| headers.get_or_insert_with(FieldTable::new).insert(k, v);
    if p.qos == QoS::ExactlyOnce {
        header(H_QOS, FieldValue::U8(2));
    }
    if p.retain {
        header(H_RETAIN, FieldValue::Bool(true));
    }
    if let Some(pf) = mp.payload_format_indicator {
        header(H_PAYLOAD_FORMAT, FieldValue::U8(pf));
    }
    if let Some(cd) = &mp.correlation_data {
        if cd.len() <= ShortString::MAX_LEN && std::str::from_utf8(cd).is_ok() {
            props.more_mut().correlation_id = Some(ShortString::from_bytes(cd.clone()));
        } else {
            header(H_CORRELATION, FieldValue::Bytes(cd.clone()));
        }
    }
    if let Some(ct) = &mp.content_type {
        if ct.len() <= ShortString::MAX_LEN {
            props.content_type = Some(ShortString::from_bytes(ct.bytes().clone()));
        } else {
            header(H_CONTENT_TYPE, FieldValue::LongString(ct.bytes().clone()));
        }
    }
    if let Some(rt) = &mp.response_topic {
        if rt.len() <= ShortString::MAX_LEN {
            props.more_mut().reply_to = Some(ShortString::from(swap_separators(rt.as_str())));
        } else {
            header(H_RESPONSE_TOPIC, FieldValue::LongString(rt.bytes().clone()));
        }
    }
    // User properties named like Ferry's own headers are not carried: they would change how
    // the message is delivered (its QoS, retain flag...) and are never shown back to MQTT.
    for (k, v) in mp.user_properties.iter().filter(|(k, _)| !reserved(k.as_str().as_bytes())) {
        let table = headers.get_or_insert_with(FieldTable::new);
        let value = FieldValue::LongString(v.bytes().clone());
        // MQTT allows a key to repeat; the values collect into an array, in order.
        match table.remove(k.as_str()) {
            None => table.insert(k.as_str(), value),
            Some(FieldValue::Array(mut a)) => {
                a.push(value);
                table.insert(k.as_str(), FieldValue::Array(a));
            }
            Some(first) => table.insert(k.as_str(), FieldValue::Array(vec![first, value])),
        }
    }
    props.headers = headers;
    if let Some(s) = mp.message_expiry_interval {
        props.more_mut().expiration = Some(ShortString::from((s as u64 * 1000).to_string()));
    }
    // One literal rather than `Message::new(..).with_properties(..)...`: each step of the
    // builder moved the message (a memmove per step on the publish path, in the profile).
    Message { exchange: exchange.clone(), routing_key, properties: props, payload, origin, published_at: now }
}

/// The QoS a message was published with: the `x-mqtt-qos` header, else 1 for persistent and
/// 0 for transient messages (an AMQP persistent message counts as QoS 1).
pub fn message_qos(m: &Message) -> QoS {
    match m.properties.header(H_QOS).and_then(FieldValue::as_i64) {
        Some(2) => QoS::ExactlyOnce,
        _ if m.is_persistent() => QoS::AtLeastOnce,
        _ => QoS::AtMostOnce,
    }
}

/// Whether the message was published with RETAIN.
pub fn message_retain(m: &Message) -> bool {
    m.properties.header(H_RETAIN).and_then(FieldValue::as_bool).unwrap_or(false)
}

/// The seconds left of a message's expiry, `None` when it has none, `Some(0)` when expired.
pub fn remaining_expiry(m: &Message, now: Millis) -> Option<u32> {
    let ttl = m.properties.ttl_millis()?;
    let deadline = m.published_at.saturating_add(ttl);
    if now >= deadline {
        return Some(0);
    }
    // Round up so a message with 0.5 s left is not sent as "expires now" (0 would mean none).
    Some(((deadline - now).div_ceil(1000)).min(u32::MAX as u64) as u32)
}

fn header_text(v: &FieldValue) -> Option<Str> {
    Some(match v {
        FieldValue::LongString(b) | FieldValue::Bytes(b) => Str::from_utf8(b.clone())?,
        FieldValue::Bool(b) => Str::from(b.to_string()),
        FieldValue::Timestamp(t) => Str::from(t.to_string()),
        FieldValue::F32(f) => Str::from(f.to_string()),
        FieldValue::F64(f) => Str::from(f.to_string()),
        FieldValue::Decimal(d) => Str::from(format!("{}e-{}", d.value, d.scale)),
        other => Str::from(other.as_i64()?.to_string()),
    })
}

/// The PUBLISH for delivering `m` (without packet id, topic alias or subscription ids, which
/// the session sets). `v5` selects whether properties are filled in.
pub fn to_publish(m: &Message, qos: QoS, retain: bool, v5: bool, now: Millis) -> Publish {
    to_publish_on(m, Str::from(swap_separators(&m.routing_key.to_string_lossy())), qos, retain, v5, now)
}

/// [`to_publish`] on a topic the caller has already worked out (a bridge maps the topic by its
/// rules, and keeps the last one it mapped).
pub fn to_publish_on(m: &Message, topic: Str, qos: QoS, retain: bool, v5: bool, now: Millis) -> Publish {
    let mut properties = codec::Properties::default();
    if v5 {
        // Each property is written only when present: a write makes the properties' box
        // (`codec::Properties`), which a message without any should not cost.
        let mp = &m.properties;
        if let Some(c) = mp.content_type.as_ref().and_then(|c| c.as_str()) {
            properties.content_type = Some(Str::from(c));
        }
        if let Some(r) = mp.more().reply_to.as_ref().and_then(|r| r.as_str()) {
            properties.response_topic = Some(Str::from(swap_separators(r)));
        }
        if let Some(c) = &mp.more().correlation_id {
            properties.correlation_data = Some(c.bytes().clone());
        }
        if let Some(e) = remaining_expiry(m, now) {
            properties.message_expiry_interval = Some(e);
        }
        if let Some(h) = &mp.headers {
            for (k, v) in h.iter() {
                match k.as_bytes() {
                    b"x-mqtt-payload-format" => properties.payload_format_indicator = v.as_i64().map(|x| x as u8),
                    b"x-mqtt-content-type" => properties.content_type = v.as_str().map(Str::from),
                    b"x-mqtt-response-topic" => properties.response_topic = v.as_str().map(Str::from),
                    b"x-correlation-data" => {
                        if let FieldValue::Bytes(b) | FieldValue::LongString(b) = v {
                            properties.correlation_data = Some(b.clone());
                        }
                    }
                    key if reserved(key) => {}
                    _ => {
                        let Some(key) = k.as_str() else { continue };
                        let key = Str::from(key);
                        match v {
                            FieldValue::Array(items) => {
                                for item in items {
                                    if let Some(t) = header_text(item) {
                                        properties.user_properties.push((key.clone(), t));
                                    }
                                }
                            }
                            other => {
                                if let Some(t) = header_text(other) {
                                    properties.user_properties.push((key, t));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Publish { dup: false, qos, retain, topic, packet_id: None, properties, payload: m.payload.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ferry_core::message::{ConnectionId, Protocol};

    fn publish(qos: QoS, props: codec::Properties) -> Publish {
        Publish {
            dup: false,
            qos,
            retain: false,
            topic: Str::from("plant/7.1/temp"),
            packet_id: if qos == QoS::AtMostOnce { None } else { Some(1) },
            properties: props,
            payload: Bytes::from_static(b"21.5"),
        }
    }

    fn origin() -> Origin {
        Origin { protocol: Protocol::Mqtt, connection: ConnectionId(1) }
    }

    #[test]
    fn topic_becomes_the_swapped_routing_key_and_payload_is_shared() {
        let p = publish(QoS::AtMostOnce, Default::default());
        let m = to_message(&p, "plant/7.1/temp", &"amq.topic".into(), origin(), 5);
        assert_eq!(m.routing_key, "plant.7/1.temp");
        assert_eq!(m.payload.as_ptr(), p.payload.as_ptr(), "no copy");
        assert!(m.properties.headers.is_none(), "QoS 0 without properties needs no header table");
        assert_eq!(message_qos(&m), QoS::AtMostOnce);
    }

    #[test]
    fn qos_survives_the_round_trip() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let m = to_message(&publish(qos, Default::default()), "t", &"amq.topic".into(), origin(), 0);
            assert_eq!(message_qos(&m), qos);
            assert_eq!(m.is_persistent(), qos != QoS::AtMostOnce);
        }
    }

    #[test]
    fn v5_properties_round_trip() {
        let props: codec::Properties = codec::PropertyValues {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some(Str::from("application/json")),
            response_topic: Some(Str::from("reply/to.me")),
            correlation_data: Some(Bytes::from_static(&[0, 159, 255])),
            user_properties: vec![
                (Str::from("a"), Str::from("1")),
                (Str::from("b"), Str::from("2")),
                (Str::from("a"), Str::from("3")),
            ],
            ..Default::default()
        }
        .into();
        let m = to_message(&publish(QoS::AtLeastOnce, props.clone()), "t", &"amq.topic".into(), origin(), 1_000);
        assert_eq!(m.properties.more().reply_to.as_ref().unwrap(), "reply.to/me");
        assert_eq!(m.properties.more().expiration.as_ref().unwrap(), "60000");
        let back = to_publish(&m, QoS::AtLeastOnce, false, true, 11_000);
        assert_eq!(back.properties.message_expiry_interval, Some(50), "remaining interval");
        assert_eq!(back.properties.content_type, props.content_type);
        assert_eq!(back.properties.response_topic, props.response_topic);
        assert_eq!(back.properties.correlation_data, props.correlation_data);
        assert_eq!(back.properties.payload_format_indicator, Some(1));
        let mut got = back.properties.user_properties.clone();
        got.sort();
        let mut want = props.user_properties.clone();
        want.sort();
        assert_eq!(got, want);
        let v3 = to_publish(&m, QoS::AtLeastOnce, false, false, 11_000);
        assert_eq!(v3.properties, codec::Properties::default());
    }

    #[test]
    fn long_correlation_data_travels_in_a_header() {
        let cd = Bytes::from(vec![7u8; 300]);
        let props: codec::Properties =
            codec::PropertyValues { correlation_data: Some(cd.clone()), ..Default::default() }.into();
        let m = to_message(&publish(QoS::AtMostOnce, props), "t", &"amq.topic".into(), origin(), 0);
        assert!(m.properties.more().correlation_id.is_none());
        assert_eq!(to_publish(&m, QoS::AtMostOnce, false, true, 0).properties.correlation_data, Some(cd));
    }

    #[test]
    fn expired_messages_report_zero_seconds_left() {
        let props: codec::Properties =
            codec::PropertyValues { message_expiry_interval: Some(1), ..Default::default() }.into();
        let m = to_message(&publish(QoS::AtMostOnce, props), "t", &"amq.topic".into(), origin(), 0);
        assert_eq!(remaining_expiry(&m, 500), Some(1));
        assert_eq!(remaining_expiry(&m, 1_000), Some(0));
    }

    #[test]
    fn amqp_header_values_become_text_user_properties() {
        let mut h = FieldTable::new();
        h.insert("n", FieldValue::I32(5));
        h.insert("ok", FieldValue::Bool(true));
        h.insert(H_RETAIN, FieldValue::Bool(true));
        let m = Message::new("amq.topic", "a.b", Bytes::new())
            .with_properties(Properties { headers: Some(h), ..Default::default() });
        let p = to_publish(&m, QoS::AtMostOnce, false, true, 0);
        assert_eq!(p.topic.as_str(), "a/b");
        assert_eq!(
            p.properties.user_properties,
            vec![(Str::from("n"), Str::from("5")), (Str::from("ok"), Str::from("true"))]
        );
    }

    #[test]
    fn binary_correlation_data_travels_in_a_header() {
        let cd = Bytes::from_static(&[0, 159, 255]);
        let props: codec::Properties =
            codec::PropertyValues { correlation_data: Some(cd.clone()), ..Default::default() }.into();
        let m = to_message(&publish(QoS::AtMostOnce, props), "t", &"amq.topic".into(), origin(), 0);
        assert!(m.properties.more().correlation_id.is_none(), "not UTF-8: AMQP clients could not read it");
        assert_eq!(m.properties.header(H_CORRELATION), Some(&FieldValue::Bytes(cd.clone())));
        assert_eq!(to_publish(&m, QoS::AtMostOnce, false, true, 0).properties.correlation_data, Some(cd));
    }

    #[test]
    fn long_content_type_and_response_topic_travel_in_headers() {
        let long = "x/".repeat(200);
        let props: codec::Properties = codec::PropertyValues {
            content_type: Some(Str::from(long.as_str())),
            response_topic: Some(Str::from(long.as_str())),
            ..Default::default()
        }
        .into();
        let m = to_message(&publish(QoS::AtMostOnce, props), "t", &"amq.topic".into(), origin(), 0);
        assert!(m.properties.content_type.is_none() && m.properties.more().reply_to.is_none());
        let back = to_publish(&m, QoS::AtMostOnce, false, true, 0);
        assert_eq!(back.properties.content_type.as_ref().map(Str::as_str), Some(long.as_str()));
        assert_eq!(back.properties.response_topic.as_ref().map(Str::as_str), Some(long.as_str()));
        assert!(back.properties.user_properties.is_empty());
    }

    #[test]
    fn user_properties_named_like_ferry_headers_are_not_carried() {
        let props: codec::Properties = codec::PropertyValues {
            user_properties: vec![(Str::from(H_QOS), Str::from("0")), (Str::from("k"), Str::from("v"))],
            ..Default::default()
        }
        .into();
        let m = to_message(&publish(QoS::ExactlyOnce, props), "t", &"amq.topic".into(), origin(), 0);
        assert_eq!(message_qos(&m), QoS::ExactlyOnce);
        let back = to_publish(&m, QoS::ExactlyOnce, false, true, 0);
        assert_eq!(back.properties.user_properties, vec![(Str::from("k"), Str::from("v"))]);
    }
}

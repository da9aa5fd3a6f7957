//! JSON values as AMQP field values, the way RabbitMQ's management API and shovels take them:
//! queue arguments given as JSON (`src-queue-args`, `PUT /api/queues`' `arguments`) or as a
//! TOML table (`[[shovels]]`' `src_queue_args`, read through the same JSON model).

use ferry_core::message::{DeliveryMode, FieldTable, FieldValue, Properties, ShortString};
use serde_json::{Map, Value};

/// Integers as `l`, other numbers as `d`, strings as `S`, objects as tables, arrays as `A`.
pub fn json_field(v: &Value) -> FieldValue {
    match v {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => FieldValue::I64(i),
            None => FieldValue::F64(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => FieldValue::string(s),
        Value::Array(a) => FieldValue::Array(a.iter().map(json_field).collect()),
        Value::Object(o) => FieldValue::Table(json_table(o)),
    }
}

/// A JSON object as a field table, its keys in order.
pub fn json_table(o: &Map<String, Value>) -> FieldTable {
    o.iter().map(|(k, v)| (ShortString::from(k.as_str()), json_field(v))).collect()
}

/// RabbitMQ's `dest-publish-properties`: basic properties that replace the message's own on
/// the way out (`delivery_mode`, `priority`, `content_type`, … as AMQP names them; `headers`
/// are merged into the message's, key by key). Unknown names and values of the wrong type are
/// refused, each with its reason.
pub fn publish_properties(o: &Map<String, Value>) -> Result<Properties, Vec<String>> {
    let mut p = Properties::default();
    let mut problems = Vec::new();
    for (k, v) in o {
        let text = || v.as_str().map(ShortString::from);
        let ok = match k.as_str() {
            "delivery_mode" => {
                let mode = match v.as_u64() {
                    Some(1) => Some(DeliveryMode::Transient),
                    Some(2) => Some(DeliveryMode::Persistent),
                    _ => None,
                };
                mode.map(|m| p.delivery_mode = Some(m)).is_some()
            }
            "priority" => v.as_u64().and_then(|n| u8::try_from(n).ok()).map(|n| p.priority = Some(n)).is_some(),
            "timestamp" => v.as_u64().map(|n| p.timestamp = Some(n)).is_some(),
            "headers" => v.as_object().map(|h| p.headers = Some(json_table(h))).is_some(),
            "content_type" => text().map(|t| p.content_type = Some(t)).is_some(),
            "content_encoding" => text().map(|t| p.more_mut().content_encoding = Some(t)).is_some(),
            "correlation_id" => text().map(|t| p.more_mut().correlation_id = Some(t)).is_some(),
            "reply_to" => text().map(|t| p.more_mut().reply_to = Some(t)).is_some(),
            "expiration" => text().map(|t| p.more_mut().expiration = Some(t)).is_some(),
            "message_id" => text().map(|t| p.more_mut().message_id = Some(t)).is_some(),
            "type" => text().map(|t| p.more_mut().kind = Some(t)).is_some(),
            "user_id" => text().map(|t| p.more_mut().user_id = Some(t)).is_some(),
            "app_id" => text().map(|t| p.more_mut().app_id = Some(t)).is_some(),
            "cluster_id" => text().map(|t| p.more_mut().cluster_id = Some(t)).is_some(),
            _ => {
                problems.push(format!("{k:?} is not a basic property"));
                continue;
            }
        };
        if !ok {
            let expected = match k.as_str() {
                "delivery_mode" => "1 or 2",
                "priority" => "an integer from 0 to 255",
                "timestamp" => "seconds since the epoch",
                "headers" => "an object",
                _ => "a string",
            };
            problems.push(format!("{k}: {v} is not {expected}"));
        }
    }
    if problems.is_empty() {
        Ok(p)
    } else {
        Err(problems)
    }
}

/// Lays `over` (from [`publish_properties`]) over `p`: each property it sets replaces the
/// message's; its headers are added to the message's, replacing those of the same name.
pub fn overlay(p: &mut Properties, over: &Properties) {
    if over.content_type.is_some() {
        p.content_type = over.content_type.clone();
    }
    if over.delivery_mode.is_some() {
        p.delivery_mode = over.delivery_mode;
    }
    if over.priority.is_some() {
        p.priority = over.priority;
    }
    if over.timestamp.is_some() {
        p.timestamp = over.timestamp;
    }
    if let Some(h) = &over.headers {
        let headers = p.headers.get_or_insert_with(FieldTable::new);
        for (k, v) in h.iter() {
            headers.insert(k.clone(), v.clone());
        }
    }
    if let Some(m) = over.more.as_deref() {
        let more = p.more_mut();
        let fields = [
            (&mut more.content_encoding, &m.content_encoding),
            (&mut more.correlation_id, &m.correlation_id),
            (&mut more.reply_to, &m.reply_to),
            (&mut more.expiration, &m.expiration),
            (&mut more.message_id, &m.message_id),
            (&mut more.kind, &m.kind),
            (&mut more.user_id, &m.user_id),
            (&mut more.app_id, &m.app_id),
            (&mut more.cluster_id, &m.cluster_id),
        ];
        for (to, from) in fields {
            if from.is_some() {
                to.clone_from(from);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_properties_replace_the_messages_and_merge_headers() {
        let v = serde_json::json!({"delivery_mode": 2, "priority": 3, "content_type": "application/json",
                                   "app_id": "shovel", "headers": {"site": "edge-7"}});
        let over = publish_properties(v.as_object().unwrap()).unwrap();
        let mut p = Properties { priority: Some(9), ..Properties::default() };
        p.more_mut().app_id = Some(ShortString::from("sensor"));
        p.more_mut().message_id = Some(ShortString::from("m-1"));
        let mut headers = FieldTable::new();
        headers.insert("kept", FieldValue::I64(1));
        headers.insert("site", FieldValue::string("old"));
        p.headers = Some(headers);
        overlay(&mut p, &over);
        assert_eq!((p.delivery_mode, p.priority), (Some(DeliveryMode::Persistent), Some(3)));
        assert_eq!(p.content_type, Some(ShortString::from("application/json")));
        assert_eq!(p.more().app_id, Some(ShortString::from("shovel")));
        assert_eq!(p.more().message_id, Some(ShortString::from("m-1")), "not named: kept");
        let h = p.headers.as_ref().unwrap();
        assert_eq!((h.get("kept"), h.get("site")), (Some(&FieldValue::I64(1)), Some(&FieldValue::string("edge-7"))));
    }

    #[test]
    fn publish_properties_refuse_unknown_names_and_wrong_types() {
        let v = serde_json::json!({"delivery_mode": 3, "priority": 300, "colour": "red", "reply_to": 5});
        let mut problems = publish_properties(v.as_object().unwrap()).unwrap_err();
        problems.sort();
        assert_eq!(
            problems,
            [
                "\"colour\" is not a basic property",
                "delivery_mode: 3 is not 1 or 2",
                "priority: 300 is not an integer from 0 to 255",
                "reply_to: 5 is not a string"
            ]
        );
    }

    #[test]
    fn json_values_become_the_field_types_rabbitmq_gives_them() {
        let v: Value = serde_json::json!({"x-max-length": 5, "x-overflow": "reject-publish", "ratio": 0.5,
                                          "on": true, "none": null, "list": [1, "a"], "t": {"k": "v"}});
        let t = json_table(v.as_object().unwrap());
        assert_eq!(t.get("x-max-length"), Some(&FieldValue::I64(5)));
        assert_eq!(t.get("x-overflow"), Some(&FieldValue::string("reject-publish")));
        assert_eq!(t.get("ratio"), Some(&FieldValue::F64(0.5)));
        assert_eq!(t.get("on"), Some(&FieldValue::Bool(true)));
        assert_eq!(t.get("none"), Some(&FieldValue::Void));
        assert_eq!(t.get("list"), Some(&FieldValue::Array(vec![FieldValue::I64(1), FieldValue::string("a")])));
        let mut inner = FieldTable::new();
        inner.insert("k", FieldValue::string("v"));
        assert_eq!(t.get("t"), Some(&FieldValue::Table(inner)));
    }
}

//! JSON values as AMQP field values, the way RabbitMQ's management API and shovels take them:
//! queue arguments given as JSON (`src-queue-args`, `PUT /api/queues`' `arguments`) or as a
//! TOML table (`[[shovels]]`' `src_queue_args`, read through the same JSON model).

use ferry_core::message::{FieldTable, FieldValue, ShortString};
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

#[cfg(test)]
mod tests {
    use super::*;

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

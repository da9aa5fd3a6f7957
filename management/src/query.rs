//! What RabbitMQ's list endpoints take in their query string: `columns`, `sort`,
//! `sort_reverse`, `name` + `use_regex`, `page` + `page_size`.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::error::ApiError;

/// RabbitMQ's largest page.
pub const MAX_PAGE_SIZE: usize = 500;
/// RabbitMQ's default page size.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// The longest `name` filter accepted, and the most a compiled regex may take (bytes): a
/// filter is the caller's input, compiled per request.
const MAX_FILTER_LEN: usize = 1024;
const MAX_REGEX_SIZE: usize = 1 << 20;

/// The query parameters, parsed.
#[derive(Debug, Default)]
pub(crate) struct ListQuery {
    pub columns: Option<Vec<Vec<String>>>,
    sort: Option<Vec<String>>,
    sort_reverse: bool,
    name: Option<NameFilter>,
    page: Option<(usize, usize)>,
}

#[derive(Debug)]
enum NameFilter {
    /// Case-insensitive substring (RabbitMQ's filter without `use_regex`).
    Contains(String),
    Regex(regex::Regex),
}

fn path(s: &str) -> Vec<String> {
    s.split('.').map(str::to_string).collect()
}

fn truthy(s: Option<&String>) -> bool {
    matches!(s.map(String::as_str), Some("true") | Some("1"))
}

impl ListQuery {
    pub fn parse(params: &HashMap<String, String>) -> Result<ListQuery, ApiError> {
        let columns = params
            .get("columns")
            .filter(|c| !c.is_empty())
            .map(|c| c.split(',').filter(|s| !s.is_empty()).map(path).collect());
        let sort = params.get("sort").filter(|s| !s.is_empty()).map(|s| path(s));
        let sort_reverse = truthy(params.get("sort_reverse"));
        let name = match params.get("name").filter(|n| !n.is_empty()) {
            None => None,
            Some(n) if n.len() > MAX_FILTER_LEN => {
                return Err(ApiError::bad_request(format!("name filter longer than {MAX_FILTER_LEN} bytes")))
            }
            Some(n) if truthy(params.get("use_regex")) => Some(NameFilter::Regex(
                regex::RegexBuilder::new(n)
                    .size_limit(MAX_REGEX_SIZE)
                    .build()
                    .map_err(|e| ApiError::bad_request(format!("name: not a valid regex: {e}")))?,
            )),
            Some(n) => Some(NameFilter::Contains(n.to_lowercase())),
        };
        let number = |key: &str| -> Result<Option<usize>, ApiError> {
            params
                .get(key)
                .map(|v| v.parse::<usize>().map_err(|_| ApiError::bad_request(format!("{key}: {v:?} is not a number"))))
                .transpose()
        };
        let page = match (number("page")?, number("page_size")?) {
            (None, _) => None,
            (Some(0), _) => return Err(ApiError::bad_request("page: pages are numbered from 1")),
            (Some(_), Some(size)) if size == 0 || size > MAX_PAGE_SIZE => {
                return Err(ApiError::bad_request(format!("page_size: must be between 1 and {MAX_PAGE_SIZE}")))
            }
            (Some(p), size) => Some((p, size.unwrap_or(DEFAULT_PAGE_SIZE))),
        };
        Ok(ListQuery { columns, sort, sort_reverse, name, page })
    }

    /// Whether an item called `name` passes the `name` filter.
    pub fn matches(&self, name: &str) -> bool {
        match &self.name {
            None => true,
            Some(NameFilter::Contains(s)) => name.to_lowercase().contains(s),
            Some(NameFilter::Regex(r)) => r.is_match(name),
        }
    }

    /// Sorts, pages and picks the columns of `items` (already filtered by name; `total` is how
    /// many there were before filtering): a list, or RabbitMQ's page object with `page`.
    pub fn finish(&self, mut items: Vec<Value>, total: usize) -> Result<Value, ApiError> {
        if let Some(key) = &self.sort {
            items.sort_by(|a, b| compare(lookup(a, key), lookup(b, key)));
        }
        if self.sort_reverse {
            items.reverse();
        }
        let filtered = items.len();
        let Some((page, size)) = self.page else {
            return Ok(Value::Array(items.into_iter().map(|i| self.pick(i)).collect()));
        };
        let page_count = filtered.div_ceil(size).max(1);
        if page > page_count {
            return Err(ApiError::bad_request(format!("page: {page} is past the last page ({page_count})")));
        }
        let start = (page - 1) * size;
        let page_items: Vec<Value> = items.into_iter().skip(start).take(size).map(|i| self.pick(i)).collect();
        Ok(serde_json::json!({
            "filtered_count": filtered,
            "item_count": page_items.len(),
            "items": page_items,
            "page": page,
            "page_count": page_count,
            "page_size": size,
            "total_count": total,
        }))
    }

    /// Whether the answer picks columns or sorts by one ([`ListQuery::finish_projected`] for
    /// typed items, [`ListQuery::finish`] for JSON values); otherwise
    /// [`ListQuery::finish_typed`] serializes only what it sends.
    pub fn needs_values(&self) -> bool {
        self.columns.is_some() || self.sort.is_some()
    }

    /// The answer for `len` items (already filtered, in their order) without `columns` or
    /// `sort`: `make(range)` builds the items to send, which are serialized directly (a list,
    /// or the page object). Only the page's items are built.
    pub fn finish_typed<T: serde::Serialize>(
        &self,
        len: usize,
        total: usize,
        make: impl FnOnce(std::ops::Range<usize>) -> Vec<T>,
    ) -> Result<Vec<u8>, ApiError> {
        let encode = |v: &dyn erased::Encode| v.encode().map_err(|e| ApiError::internal(format!("JSON: {e}")));
        let Some((page, size)) = self.page else {
            let mut items = make(0..len);
            if self.sort_reverse {
                items.reverse();
            }
            return encode(&items);
        };
        let page_count = len.div_ceil(size).max(1);
        if page > page_count {
            return Err(ApiError::bad_request(format!("page: {page} is past the last page ({page_count})")));
        }
        let start = ((page - 1) * size).min(len);
        let end = (start + size).min(len);
        // Reversed order: the page counts from the end.
        let range = if self.sort_reverse { len - end..len - start } else { start..end };
        let mut items = make(range);
        if self.sort_reverse {
            items.reverse();
        }
        #[derive(serde::Serialize)]
        struct Page<T> {
            filtered_count: usize,
            item_count: usize,
            items: Vec<T>,
            page: usize,
            page_count: usize,
            page_size: usize,
            total_count: usize,
        }
        let item_count = items.len();
        encode(&Page { filtered_count: len, item_count, items, page, page_count, page_size: size, total_count: total })
    }

    /// The answer for typed items with `columns` and/or `sort`, giving the same JSON as
    /// [`ListQuery::finish`] over the items' JSON values, without building one: the sort keys
    /// and the columns come from the requested top-level fields only ([`fields::top`]), items
    /// sent whole are serialized straight from their structs. `make(range)` builds items (in
    /// their order, already filtered); with `sort` all `len` are built, else only the page's.
    pub fn finish_projected<T: serde::Serialize>(
        &self,
        len: usize,
        total: usize,
        make: impl FnOnce(std::ops::Range<usize>) -> Vec<T>,
    ) -> Result<Vec<u8>, ApiError> {
        let Some(key) = &self.sort else {
            return self.finish_typed(len, total, |range| {
                make(range).into_iter().map(|item| Projected::of(item, self.columns.as_deref())).collect::<Vec<_>>()
            });
        };
        let items = make(0..len);
        let keys: Vec<Option<Value>> = items.iter().map(|i| fields::lookup_in(i, key)).collect();
        let mut order: Vec<usize> = (0..items.len()).collect();
        // Stable, as `finish`'s sort of the values; then reversed whole, as there.
        order.sort_by(|&a, &b| compare(keys[a].as_ref(), keys[b].as_ref()));
        if self.sort_reverse {
            order.reverse();
        }
        let in_order = ListQuery { page: self.page, ..ListQuery::default() };
        in_order.finish_typed(order.len(), total, |range| {
            order[range].iter().map(|&i| Projected::of(&items[i], self.columns.as_deref())).collect::<Vec<_>>()
        })
    }

    /// Keeps only the requested columns (dotted paths into nested objects).
    pub fn pick(&self, item: Value) -> Value {
        let Some(columns) = &self.columns else { return item };
        let mut out = Map::new();
        for col in columns {
            if let Some(v) = lookup(&item, col) {
                insert_path(&mut out, col, v.clone());
            }
        }
        Value::Object(out)
    }
}

/// `serde_json::to_vec` behind a trait object (the closure above takes lists and pages).
mod erased {
    pub trait Encode {
        fn encode(&self) -> serde_json::Result<Vec<u8>>;
    }
    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> serde_json::Result<Vec<u8>> {
            serde_json::to_vec(self)
        }
    }
}

/// An item as sent: whole (serialized from its struct) or cut down to the `columns`.
enum Projected<T> {
    Whole(T),
    Picked(Map<String, Value>),
}

impl<T: serde::Serialize> Projected<T> {
    fn of(item: T, columns: Option<&[Vec<String>]>) -> Projected<T> {
        let Some(columns) = columns else { return Projected::Whole(item) };
        let mut names: Vec<&str> = Vec::new();
        for c in columns {
            if let Some(first) = c.first().filter(|f| !names.contains(&f.as_str())) {
                names.push(first);
            }
        }
        let values = fields::top(&item, &names);
        let mut out = Map::new();
        for col in columns {
            let Some((first, rest)) = col.split_first() else { continue };
            let at = names.iter().position(|n| n == first);
            if let Some(v) = at.and_then(|i| values[i].as_ref()).and_then(|v| lookup(v, rest)) {
                insert_path(&mut out, col, v.clone());
            }
        }
        Projected::Picked(out)
    }
}

impl<T: serde::Serialize> serde::Serialize for Projected<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Projected::Whole(item) => item.serialize(s),
            Projected::Picked(map) => map.serialize(s),
        }
    }
}

/// Top-level fields of a serialized struct, as JSON values, for the names asked: what `columns`
/// and `sort` need of an item, without a JSON value for all of it. A serializer that accepts
/// only a struct and converts the fields asked for; anything else (a map, a flattened struct)
/// falls back to the item's whole JSON value.
mod fields {
    use serde::ser::{self, Impossible, Serialize, Serializer};
    use serde_json::Value;

    /// The values of `names` (top-level fields) in `item`; `None` for a field it does not have.
    pub fn top<T: Serialize + ?Sized>(item: &T, names: &[&str]) -> Vec<Option<Value>> {
        let mut picker = Picker { names, values: vec![None; names.len()] };
        match item.serialize(&mut picker) {
            Ok(()) => picker.values,
            Err(_) => {
                let whole = serde_json::to_value(item).unwrap_or(Value::Null);
                names.iter().map(|n| whole.get(n).cloned()).collect()
            }
        }
    }

    /// The value at a dotted `path` in `item`, as `super::lookup` finds it in the item's JSON.
    pub fn lookup_in<T: Serialize + ?Sized>(item: &T, path: &[String]) -> Option<Value> {
        let (first, rest) = path.split_first()?;
        let top = top(item, &[first.as_str()]).pop().flatten()?;
        super::lookup(&top, rest).cloned()
    }

    struct Picker<'n> {
        names: &'n [&'n str],
        values: Vec<Option<Value>>,
    }

    fn not_a_struct() -> serde_json::Error {
        ser::Error::custom("not a struct")
    }

    macro_rules! refuse {
        ($($f:ident($($t:ty),*);)*) => {
            $(fn $f(self, $(_: $t),*) -> Result<(), serde_json::Error> { Err(not_a_struct()) })*
        };
    }

    impl<'a, 'n> Serializer for &'a mut Picker<'n> {
        type Ok = ();
        type Error = serde_json::Error;
        type SerializeSeq = Impossible<(), serde_json::Error>;
        type SerializeTuple = Impossible<(), serde_json::Error>;
        type SerializeTupleStruct = Impossible<(), serde_json::Error>;
        type SerializeTupleVariant = Impossible<(), serde_json::Error>;
        type SerializeMap = Impossible<(), serde_json::Error>;
        type SerializeStruct = Self;
        type SerializeStructVariant = Impossible<(), serde_json::Error>;

        refuse! {
            serialize_bool(bool); serialize_i8(i8); serialize_i16(i16); serialize_i32(i32);
            serialize_i64(i64); serialize_u8(u8); serialize_u16(u16); serialize_u32(u32);
            serialize_u64(u64); serialize_f32(f32); serialize_f64(f64); serialize_char(char);
            serialize_str(&str); serialize_bytes(&[u8]); serialize_none(); serialize_unit();
            serialize_unit_struct(&'static str); serialize_unit_variant(&'static str, u32, &'static str);
        }

        fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), Self::Error> {
            Err(not_a_struct())
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, v: &T) -> Result<(), Self::Error> {
            v.serialize(self)
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: &T,
        ) -> Result<(), Self::Error> {
            Err(not_a_struct())
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Self::Error> {
            Err(not_a_struct())
        }
        fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Self::Error> {
            Err(not_a_struct())
        }
        fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeTupleStruct, Self::Error> {
            Err(not_a_struct())
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeTupleVariant, Self::Error> {
            Err(not_a_struct())
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Self::Error> {
            Err(not_a_struct())
        }
        fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, Self::Error> {
            Ok(self)
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeStructVariant, Self::Error> {
            Err(not_a_struct())
        }
    }

    impl ser::SerializeStruct for &mut Picker<'_> {
        type Ok = ();
        type Error = serde_json::Error;
        fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, v: &T) -> Result<(), Self::Error> {
            if let Some(i) = self.names.iter().position(|n| *n == key) {
                self.values[i] = Some(serde_json::to_value(v)?);
            }
            Ok(())
        }
        fn end(self) -> Result<(), Self::Error> {
            Ok(())
        }
    }
}

fn lookup<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn insert_path(out: &mut Map<String, Value>, path: &[String], v: Value) {
    match path {
        [] => {}
        [last] => {
            out.insert(last.clone(), v);
        }
        [first, rest @ ..] => {
            let entry = out.entry(first.clone()).or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(m) = entry {
                insert_path(m, rest, v);
            }
        }
    }
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            x.as_f64().unwrap_or(0.0).partial_cmp(&y.as_f64().unwrap_or(0.0)).unwrap_or(Ordering::Equal)
        }
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        _ => Ordering::Equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn q(pairs: &[(&str, &str)]) -> Result<ListQuery, ApiError> {
        ListQuery::parse(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn columns_pick_nested_fields() {
        let item = json!({"name": "q", "messages": 3, "message_stats": {"publish_details": {"rate": 1.5}, "ack": 2}});
        let picked = q(&[("columns", "name,message_stats.publish_details.rate")]).unwrap().pick(item);
        assert_eq!(picked, json!({"name": "q", "message_stats": {"publish_details": {"rate": 1.5}}}));
    }

    #[test]
    fn pages_wrap_the_items_as_rabbitmq_does() {
        let items: Vec<Value> = (0..5).map(|i| json!({"name": format!("q{i}")})).collect();
        let page = q(&[("page", "2"), ("page_size", "2")]).unwrap().finish(items, 7).unwrap();
        assert_eq!(page["items"], json!([{"name": "q2"}, {"name": "q3"}]));
        assert_eq!((page["page_count"].as_u64(), page["filtered_count"].as_u64()), (Some(3), Some(5)));
        assert_eq!(page["total_count"].as_u64(), Some(7));
    }

    #[test]
    fn typed_pages_build_only_their_items_and_count_from_the_end_when_reversed() {
        let names = ["a", "b", "c", "d", "e"];
        let make = |r: std::ops::Range<usize>| names[r].iter().map(|n| json!({ "name": n })).collect::<Vec<_>>();
        let page = q(&[("page", "2"), ("page_size", "2")]).unwrap().finish_typed(5, 6, make).unwrap();
        let page: Value = serde_json::from_slice(&page).unwrap();
        assert_eq!(page["items"], json!([{"name": "c"}, {"name": "d"}]));
        assert_eq!((page["page_count"].as_u64(), page["total_count"].as_u64()), (Some(3), Some(6)));
        let rev = q(&[("page", "1"), ("page_size", "2"), ("sort_reverse", "true")]).unwrap().finish_typed(5, 5, make);
        let rev: Value = serde_json::from_slice(&rev.unwrap()).unwrap();
        assert_eq!(rev["items"], json!([{"name": "e"}, {"name": "d"}]));
        let all: Value = serde_json::from_slice(&q(&[]).unwrap().finish_typed(5, 5, make).unwrap()).unwrap();
        assert_eq!(all.as_array().unwrap().len(), 5);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(q(&[("page", "0")]).is_err());
        assert!(q(&[("page", "x")]).is_err());
        assert!(q(&[("page", "1"), ("page_size", "501")]).is_err());
        assert!(q(&[("name", "("), ("use_regex", "true")]).is_err());
        let past = q(&[("page", "3"), ("page_size", "10")]).unwrap().finish(vec![json!({})], 1);
        assert!(past.is_err());
    }

    #[test]
    fn the_name_filter_is_a_substring_or_a_regex() {
        let sub = q(&[("name", "ORD")]).unwrap();
        assert!(sub.matches("orders") && !sub.matches("invoices"));
        let re = q(&[("name", "^ord.*s$"), ("use_regex", "true")]).unwrap();
        assert!(re.matches("orders") && !re.matches("reorders"));
    }

    /// Typed items through `finish_projected` give what their JSON values give through
    /// `finish`: columns with dotted paths, sort by a top-level or nested field (ties keep
    /// their order), sort_reverse, pages.
    #[test]
    fn projected_typed_items_answer_as_their_json_values() {
        #[derive(serde::Serialize, Clone)]
        struct Stats {
            publish: u64,
            publish_details: Rate,
        }
        #[derive(serde::Serialize, Clone)]
        struct Rate {
            rate: f64,
        }
        #[derive(serde::Serialize, Clone)]
        struct Item {
            name: String,
            messages: u64,
            durable: bool,
            policy: Option<()>,
            arguments: Value,
            message_stats: Stats,
        }
        let items: Vec<Item> = (0..23u64)
            .map(|i| Item {
                name: format!("q{:02}", (i * 7) % 23),
                messages: i % 4,
                durable: i % 3 == 0,
                policy: None,
                arguments: if i % 5 == 0 { json!({"x-max-length": i}) } else { json!({}) },
                message_stats: Stats { publish: 100 - i, publish_details: Rate { rate: (i % 6) as f64 / 2.0 } },
            })
            .collect();
        let queries: &[&[(&str, &str)]] = &[
            &[("columns", "name,messages")],
            &[("columns", "name,message_stats.publish_details.rate,arguments.x-max-length,nope,name.x")],
            &[("columns", "message_stats,policy")],
            &[("sort", "messages")],
            &[("sort", "name"), ("sort_reverse", "true")],
            &[("sort", "message_stats.publish_details.rate"), ("columns", "name,message_stats.publish_details")],
            &[("sort", "message_stats.publish_details.rate"), ("sort_reverse", "true"), ("columns", "name")],
            &[("sort", "arguments.x-max-length"), ("columns", "name,arguments")],
            &[("sort", "missing"), ("columns", "name")],
            &[("sort", "durable"), ("page", "2"), ("page_size", "5"), ("columns", "name,durable")],
            &[("sort", "messages"), ("sort_reverse", "true"), ("page", "3"), ("page_size", "4")],
            &[("page", "5"), ("page_size", "5"), ("columns", "name"), ("sort_reverse", "true")],
            &[("page", "1"), ("page_size", "100"), ("sort", "messages")],
        ];
        for pairs in queries {
            let query = q(pairs).unwrap();
            let values: Vec<Value> = items.iter().map(|i| serde_json::to_value(i).unwrap()).collect();
            let expected = query.finish(values, 30).unwrap();
            let made = query.finish_projected(items.len(), 30, |r| items[r].to_vec()).unwrap();
            let got: Value = serde_json::from_slice(&made).unwrap();
            assert_eq!(got, expected, "{pairs:?}");
        }
        let past = q(&[("page", "9"), ("page_size", "5"), ("sort", "name")]).unwrap();
        assert!(past.finish_projected(items.len(), 30, |r| items[r].to_vec()).is_err());
        // Not a struct: the fields come from the item's JSON value.
        let maps = [json!({"name": "b", "n": 1}), json!({"name": "a", "n": 2})];
        let made = q(&[("sort", "name"), ("columns", "n")]).unwrap().finish_projected(2, 2, |r| maps[r].to_vec());
        assert_eq!(serde_json::from_slice::<Value>(&made.unwrap()).unwrap(), json!([{"n": 2}, {"n": 1}]));
    }

    #[test]
    fn sort_orders_by_a_column_and_reverses() {
        let items = vec![json!({"n": 2}), json!({"n": 10}), json!({"n": 1})];
        let sorted = q(&[("sort", "n"), ("sort_reverse", "true")]).unwrap().finish(items, 3).unwrap();
        assert_eq!(sorted, json!([{"n": 10}, {"n": 2}, {"n": 1}]));
    }
}

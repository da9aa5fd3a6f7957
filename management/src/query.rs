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

    /// Whether the answer needs every item as a JSON value first (to pick columns or sort by
    /// one); otherwise [`ListQuery::finish_typed`] serializes only what it sends.
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

    #[test]
    fn sort_orders_by_a_column_and_reverses() {
        let items = vec![json!({"n": 2}), json!({"n": 10}), json!({"n": 1})];
        let sorted = q(&[("sort", "n"), ("sort_reverse", "true")]).unwrap().finish(items, 3).unwrap();
        assert_eq!(sorted, json!([{"n": 10}, {"n": 2}, {"n": 1}]));
    }
}

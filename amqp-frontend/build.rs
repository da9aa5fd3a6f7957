//! Generates the AMQP 0-9-1 method codec from RabbitMQ's machine-readable spec
//! (`spec/amqp-rabbitmq-0.9.1.json`, a copy checked into this crate so it builds from its own
//! files).
//!
//! Writes into `$OUT_DIR`:
//! - `constants.rs`: frame constants and `reply_code` (included by `src/codec/constants.rs`);
//! - `methods.rs`: one struct per class-method with decode/encode of its arguments, and the
//!   `Method` enum with dispatch by (class id, method id) (included by `src/codec/method.rs`);
//! - `method_strategies.rs`: a proptest strategy per method, for the round-trip tests.
//!
//! Generating at build time (rather than committing generated source) means the code cannot
//! drift from the spec file.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

const SPEC: &str = "spec/amqp-rabbitmq-0.9.1.json";

fn main() {
    println!("cargo:rerun-if-changed={SPEC}");
    println!("cargo:rerun-if-changed=build.rs");
    let text = std::fs::read_to_string(SPEC).unwrap_or_else(|e| panic!("reading {SPEC}: {e}"));
    let spec: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {SPEC}: {e}"));
    let spec = Spec::parse(&spec);
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    write(&out.join("constants.rs"), &spec.constants_rs());
    write(&out.join("methods.rs"), &spec.methods_rs());
    write(&out.join("method_strategies.rs"), &spec.strategies_rs());
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// The wire types of AMQP 0-9-1 arguments.
#[derive(Clone, Copy, PartialEq)]
enum Ty {
    Bit,
    Octet,
    Short,
    Long,
    LongLong,
    Timestamp,
    ShortStr,
    LongStr,
    Table,
}

impl Ty {
    fn parse(s: &str) -> Ty {
        match s {
            "bit" => Ty::Bit,
            "octet" => Ty::Octet,
            "short" => Ty::Short,
            "long" => Ty::Long,
            "longlong" => Ty::LongLong,
            "timestamp" => Ty::Timestamp,
            "shortstr" => Ty::ShortStr,
            "longstr" => Ty::LongStr,
            "table" => Ty::Table,
            other => panic!("unknown AMQP type {other:?}"),
        }
    }
    fn rust(self) -> &'static str {
        match self {
            Ty::Bit => "bool",
            Ty::Octet => "u8",
            Ty::Short => "u16",
            Ty::Long => "u32",
            Ty::LongLong | Ty::Timestamp => "u64",
            Ty::ShortStr => "ShortString",
            Ty::LongStr => "Bytes",
            Ty::Table => "FieldTable",
        }
    }
    fn wire(self) -> &'static str {
        match self {
            Ty::Bit => "bit",
            Ty::Octet => "octet",
            Ty::Short => "short",
            Ty::Long => "long",
            Ty::LongLong => "longlong",
            Ty::Timestamp => "timestamp",
            Ty::ShortStr => "shortstr",
            Ty::LongStr => "longstr",
            Ty::Table => "table",
        }
    }
    fn strategy(self) -> &'static str {
        match self {
            Ty::Bit => "any::<bool>()",
            Ty::Octet => "any::<u8>()",
            Ty::Short => "any::<u16>()",
            Ty::Long => "any::<u32>()",
            Ty::LongLong | Ty::Timestamp => "any::<u64>()",
            Ty::ShortStr => "arb_short_string()",
            Ty::LongStr => "arb_long_string()",
            Ty::Table => "arb_field_table()",
        }
    }
}

struct Arg {
    /// The spec's name, e.g. `routing-key`.
    wire_name: String,
    /// The Rust field name, e.g. `routing_key` (`type` becomes `kind`, as in the core's
    /// `Properties`).
    field: String,
    ty: Ty,
    /// The default value as a Rust expression, if the spec gives one that is not the type's
    /// zero value.
    default: Option<String>,
}

struct MethodSpec {
    class_name: String,
    class_id: u16,
    name: String,
    id: u16,
    args: Vec<Arg>,
    synchronous: bool,
    content: bool,
}

impl MethodSpec {
    fn full_name(&self) -> String {
        format!("{}.{}", self.class_name, self.name)
    }
    fn type_name(&self) -> String {
        pascal(&format!("{}-{}", self.class_name, self.name))
    }
    fn snake(&self) -> String {
        format!("{}_{}", self.class_name, self.name).replace('-', "_")
    }
}

struct Spec {
    frame_constants: Vec<(String, u32)>,
    reply_codes: Vec<(String, u16)>,
    methods: Vec<MethodSpec>,
    basic_properties: Vec<(String, Ty)>,
}

fn pascal(s: &str) -> String {
    s.split(['-', '.'])
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect()
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn num_field(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

impl Spec {
    fn parse(v: &Value) -> Spec {
        let domains: HashMap<&str, Ty> = v["domains"]
            .as_array()
            .expect("domains")
            .iter()
            .map(|d| (d[0].as_str().expect("domain name"), Ty::parse(d[1].as_str().expect("domain type"))))
            .collect();
        let ty_of = |a: &Value| -> Ty {
            match (a["type"].as_str(), a["domain"].as_str()) {
                (Some(t), _) => Ty::parse(t),
                (None, Some(d)) => *domains.get(d).unwrap_or_else(|| panic!("unknown domain {d}")),
                _ => panic!("argument without type or domain: {a}"),
            }
        };

        let mut frame_constants = Vec::new();
        let mut reply_codes = Vec::new();
        for c in v["constants"].as_array().expect("constants") {
            let name = str_field(c, "name").replace('-', "_");
            let value = num_field(c, "value");
            // Reply codes carry a class (soft/hard error), except REPLY-SUCCESS.
            if c.get("class").is_some() || name == "REPLY_SUCCESS" {
                reply_codes.push((name, value as u16));
            } else {
                frame_constants.push((name, value as u32));
            }
        }
        reply_codes.sort_by_key(|(_, v)| *v);

        let mut methods = Vec::new();
        let mut basic_properties = Vec::new();
        for class in v["classes"].as_array().expect("classes") {
            let class_name = str_field(class, "name").to_string();
            let class_id = num_field(class, "id") as u16;
            if class_name == "basic" {
                for p in class["properties"].as_array().expect("basic properties") {
                    basic_properties.push((str_field(p, "name").to_string(), ty_of(p)));
                }
            }
            for m in class["methods"].as_array().expect("methods") {
                let args = m["arguments"]
                    .as_array()
                    .expect("arguments")
                    .iter()
                    .map(|a| {
                        let wire_name = str_field(a, "name").to_string();
                        let field = match wire_name.as_str() {
                            "type" => "kind".to_string(),
                            n => n.replace('-', "_"),
                        };
                        let ty = ty_of(a);
                        let default = default_expr(ty, a.get("default-value"));
                        Arg { wire_name, field, ty, default }
                    })
                    .collect();
                methods.push(MethodSpec {
                    class_name: class_name.clone(),
                    class_id,
                    name: str_field(m, "name").to_string(),
                    id: num_field(m, "id") as u16,
                    args,
                    synchronous: m["synchronous"].as_bool().unwrap_or(false),
                    content: m["content"].as_bool().unwrap_or(false),
                });
            }
        }
        Spec { frame_constants, reply_codes, methods, basic_properties }
    }

    fn constants_rs(&self) -> String {
        let mut s = String::from("// @generated by build.rs from spec/amqp-rabbitmq-0.9.1.json. Do not edit.\n\n");
        for (name, value) in &self.frame_constants {
            let ty = if name == "FRAME_MIN_SIZE" { "u32" } else { "u8" };
            writeln!(s, "pub const {name}: {ty} = {value};").unwrap();
        }
        s.push_str("\n/// Reply codes for `connection.close` and `channel.close` (and 200 for a normal close).\n");
        s.push_str("/// Soft errors (3xx, 4xx) close the channel, hard errors (5xx, 320, 402) the connection.\n");
        s.push_str("pub mod reply_code {\n");
        for (name, value) in &self.reply_codes {
            writeln!(s, "    pub const {name}: u16 = {value};").unwrap();
        }
        s.push_str("\n    /// The constant's name (`\"FRAME_ERROR\"`), for RabbitMQ-style reply texts.\n");
        s.push_str("    pub fn name(code: u16) -> Option<&'static str> {\n        Some(match code {\n");
        for (name, _) in &self.reply_codes {
            writeln!(s, "            {name} => \"{name}\",").unwrap();
        }
        s.push_str("            _ => return None,\n        })\n    }\n}\n");
        s
    }

    fn methods_rs(&self) -> String {
        let mut s = String::from("// @generated by build.rs from spec/amqp-rabbitmq-0.9.1.json. Do not edit.\n\n");
        for m in &self.methods {
            method_struct(&mut s, m);
        }
        self.method_enum(&mut s);
        s.push_str("\n/// The basic class's property names in flag order (bit 15 first), from the spec.\n");
        let names: Vec<String> = self.basic_properties.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        writeln!(s, "pub const BASIC_PROPERTY_NAMES: [&str; {}] = [{}];", names.len(), names.join(", ")).unwrap();
        let tys: Vec<String> = self.basic_properties.iter().map(|(_, t)| format!("\"{}\"", t.wire())).collect();
        writeln!(
            s,
            "#[cfg(test)]\npub(crate) const BASIC_PROPERTY_TYPES: [&str; {}] = [{}];",
            tys.len(),
            tys.join(", ")
        )
        .unwrap();
        s
    }

    fn method_enum(&self, s: &mut String) {
        s.push_str("/// Every AMQP 0-9-1 method, including RabbitMQ's extensions (exchange.bind/unbind,\n");
        s.push_str("/// basic.nack, confirm.select, connection.blocked/unblocked/update-secret).\n");
        s.push_str("#[derive(Debug, Clone, PartialEq)]\npub enum Method {\n");
        for m in &self.methods {
            writeln!(s, "    /// `{}`", m.full_name()).unwrap();
            writeln!(s, "    {0}({0}),", m.type_name()).unwrap();
        }
        s.push_str("}\n\n");
        for m in &self.methods {
            writeln!(
                s,
                "impl From<{0}> for Method {{\n    fn from(m: {0}) -> Method {{\n        Method::{0}(m)\n    }}\n}}\n",
                m.type_name()
            )
            .unwrap();
        }

        s.push_str("impl Method {\n");
        // decode: nested match, class first.
        s.push_str(
            "    /// Decodes a method's arguments (the method frame payload after class and method id).\n\
             ///\n\
             /// Unknown ids are 503 COMMAND_INVALID; arguments that are truncated, followed by extra\n\
             /// bytes or malformed (a bad field table) are 502 SYNTAX_ERROR. String arguments are\n\
             /// slices of `payload`: nothing is copied.\n",
        );
        s.push_str(
            "    pub fn decode(class_id: u16, method_id: u16, payload: Bytes) -> Result<Method, MethodError> {\n\
             \x20       let mut r = Reader::new(payload);\n\
             \x20       let (name, decoded): (&'static str, Result<Method, SyntaxError>) = match (class_id, method_id) {\n",
        );
        for m in &self.methods {
            writeln!(
                s,
                "            ({}, {}) => ({t}::NAME, {t}::decode_args(&mut r).map(Method::{t})),",
                m.class_id,
                m.id,
                t = m.type_name()
            )
            .unwrap();
        }
        s.push_str(
            "            _ => return Err(MethodError::Unknown { class_id, method_id }),\n\
             \x20       };\n\
             \x20       decoded\n\
             \x20           .and_then(|m| r.finish().map(|()| m))\n\
             \x20           .map_err(|error| MethodError::Syntax { method: name, error })\n\
             \x20   }\n\n",
        );

        s.push_str(
            "    /// Encodes the method frame payload: class id, method id, arguments. On error (a short\n\
             \x20   /// string over 255 bytes) `out` is left as it was.\n\
             \x20   pub fn encode(&self, out: &mut BytesMut) -> Result<(), EncodeError> {\n\
             \x20       let start = out.len();\n\
             \x20       out.put_u16(self.class_id());\n\
             \x20       out.put_u16(self.method_id());\n\
             \x20       let result = match self {\n",
        );
        for m in &self.methods {
            if m.args.is_empty() {
                writeln!(s, "            Method::{}(_) => Ok(()),", m.type_name()).unwrap();
            } else {
                writeln!(s, "            Method::{}(m) => m.encode_args(out),", m.type_name()).unwrap();
            }
        }
        s.push_str(
            "        };\n\
             \x20       if result.is_err() {\n\
             \x20           out.truncate(start);\n\
             \x20       }\n\
             \x20       result\n\
             \x20   }\n\n",
        );

        let accessor = |s: &mut String, doc: &str, sig: &str, f: &dyn Fn(&MethodSpec) -> String| {
            writeln!(s, "    /// {doc}\n    pub fn {sig} {{\n        match self {{").unwrap();
            for m in &self.methods {
                writeln!(s, "            Method::{}(_) => {},", m.type_name(), f(m)).unwrap();
            }
            s.push_str("        }\n    }\n\n");
        };
        accessor(s, "The class id (60 for basic).", "class_id(&self) -> u16", &|m| m.class_id.to_string());
        accessor(s, "The method id within its class.", "method_id(&self) -> u16", &|m| m.id.to_string());
        accessor(s, "The spec name, `\"basic.publish\"`.", "name(&self) -> &'static str", &|m| {
            format!("\"{}\"", m.full_name())
        });
        accessor(
            s,
            "Whether the spec marks the method synchronous (the peer answers with its `-ok`).",
            "is_synchronous(&self) -> bool",
            &|m| m.synchronous.to_string(),
        );
        accessor(
            s,
            "Whether a content header and body frames follow (basic.publish/return/deliver/get-ok).",
            "has_content(&self) -> bool",
            &|m| m.content.to_string(),
        );

        s.push_str(
            "    /// The spec name of a method by ids, for log lines and close texts about a method\n\
             \x20   /// that could not be decoded.\n\
             \x20   pub fn name_of(class_id: u16, method_id: u16) -> Option<&'static str> {\n\
             \x20       Some(match (class_id, method_id) {\n",
        );
        for m in &self.methods {
            writeln!(s, "            ({}, {}) => \"{}\",", m.class_id, m.id, m.full_name()).unwrap();
        }
        s.push_str("            _ => return None,\n        })\n    }\n}\n\n");

        s.push_str("/// (class id, method id, name) of every method, in spec order.\n");
        writeln!(s, "pub const ALL_METHODS: [(u16, u16, &str); {}] = [", self.methods.len()).unwrap();
        for m in &self.methods {
            writeln!(s, "    ({}, {}, \"{}\"),", m.class_id, m.id, m.full_name()).unwrap();
        }
        s.push_str("];\n");
    }

    fn strategies_rs(&self) -> String {
        let mut s = String::from("// @generated by build.rs from spec/amqp-rabbitmq-0.9.1.json. Do not edit.\n\n");
        for m in &self.methods {
            let t = m.type_name();
            writeln!(s, "pub(crate) fn arb_{}() -> impl Strategy<Value = Method> {{", m.snake()).unwrap();
            match m.args.len() {
                0 => writeln!(s, "    Just(Method::{t}({t} {{}}))").unwrap(),
                1 => writeln!(
                    s,
                    "    {}.prop_map(|{f}| Method::{t}({t} {{ {f} }}))",
                    m.args[0].ty.strategy(),
                    f = m.args[0].field
                )
                .unwrap(),
                _ => {
                    let strategies: Vec<&str> = m.args.iter().map(|a| a.ty.strategy()).collect();
                    let fields: Vec<&str> = m.args.iter().map(|a| a.field.as_str()).collect();
                    writeln!(
                        s,
                        "    ({}).prop_map(|({f})| Method::{t}({t} {{ {f} }}))",
                        strategies.join(", "),
                        f = fields.join(", ")
                    )
                    .unwrap();
                }
            }
            s.push_str("}\n\n");
        }
        s.push_str("/// Every method with the spec's default arguments, in spec order.\n");
        s.push_str("pub(crate) fn all_defaults() -> Vec<Method> {\n    vec![\n");
        for m in &self.methods {
            writeln!(s, "        Method::{0}({0}::default()),", m.type_name()).unwrap();
        }
        s.push_str("    ]\n}\n\n");
        s.push_str("/// Any method, each variant equally likely.\n");
        s.push_str("pub(crate) fn arb_method() -> BoxedStrategy<Method> {\n    Union::new(vec![\n");
        for m in &self.methods {
            writeln!(s, "        arb_{}().boxed(),", m.snake()).unwrap();
        }
        s.push_str("    ])\n    .boxed()\n}\n");
        s
    }
}

/// The default value as a Rust expression, or `None` when it is the type's zero value (so the
/// struct's `Default` can be derived when all are).
fn default_expr(ty: Ty, v: Option<&Value>) -> Option<String> {
    let v = v?;
    match ty {
        Ty::Bit => v.as_bool().filter(|b| *b).map(|_| "true".to_string()),
        Ty::Octet | Ty::Short | Ty::Long | Ty::LongLong | Ty::Timestamp => {
            v.as_u64().filter(|n| *n != 0).map(|n| n.to_string())
        }
        Ty::ShortStr => v.as_str().filter(|t| !t.is_empty()).map(|t| format!("ShortString::from_static({t:?})")),
        Ty::LongStr => v.as_str().filter(|t| !t.is_empty()).map(|t| format!("Bytes::from_static(b{t:?})")),
        Ty::Table => {
            assert!(v.as_object().is_some_and(|o| o.is_empty()), "non-empty default table {v}");
            None
        }
    }
}

fn zero_expr(ty: Ty) -> &'static str {
    match ty {
        Ty::Bit => "false",
        Ty::Octet | Ty::Short | Ty::Long | Ty::LongLong | Ty::Timestamp => "0",
        Ty::ShortStr => "ShortString::default()",
        Ty::LongStr => "Bytes::new()",
        Ty::Table => "FieldTable::new()",
    }
}

fn method_struct(s: &mut String, m: &MethodSpec) {
    let t = m.type_name();
    let derive_default = m.args.iter().all(|a| a.default.is_none());
    writeln!(s, "/// `{}` (class {}, method {}).", m.full_name(), m.class_id, m.id).unwrap();
    if m.synchronous {
        s.push_str("/// Synchronous: the peer answers with the matching `-ok`.\n");
    }
    if m.content {
        s.push_str("/// Carries content: a content header and body frames follow on the same channel.\n");
    }
    let derives = if derive_default { "Debug, Clone, PartialEq, Default" } else { "Debug, Clone, PartialEq" };
    writeln!(s, "#[derive({derives})]").unwrap();
    if m.args.is_empty() {
        writeln!(s, "pub struct {t} {{}}\n").unwrap();
    } else {
        writeln!(s, "pub struct {t} {{").unwrap();
        for a in &m.args {
            let default = a.default.as_deref().map(|d| format!(", default {d}")).unwrap_or_default();
            writeln!(s, "    /// `{}` ({}{default})", a.wire_name, a.ty.wire()).unwrap();
            writeln!(s, "    pub {}: {},", a.field, a.ty.rust()).unwrap();
        }
        s.push_str("}\n\n");
    }

    if !derive_default {
        writeln!(
            s,
            "impl Default for {t} {{\n    /// The spec's default values.\n    fn default() -> {t} {{\n        {t} {{"
        )
        .unwrap();
        for a in &m.args {
            writeln!(s, "            {}: {},", a.field, a.default.as_deref().unwrap_or(zero_expr(a.ty))).unwrap();
        }
        s.push_str("        }\n    }\n}\n\n");
    }

    writeln!(s, "impl {t} {{").unwrap();
    writeln!(s, "    pub const CLASS_ID: u16 = {};", m.class_id).unwrap();
    writeln!(s, "    pub const METHOD_ID: u16 = {};", m.id).unwrap();
    writeln!(s, "    pub const NAME: &'static str = \"{}\";\n", m.full_name()).unwrap();

    // decode_args: bits pack LSB first into octets; any other type ends a run of bits.
    let reader = if m.args.is_empty() { "_r" } else { "r" };
    writeln!(s, "    pub(crate) fn decode_args({reader}: &mut Reader) -> Result<{t}, SyntaxError> {{").unwrap();
    let mut bit = 8; // 8 = no octet open
    let mut octet = 0;
    for a in &m.args {
        let f = &a.field;
        let w = &a.wire_name;
        match a.ty {
            Ty::Bit => {
                if bit == 8 {
                    octet += 1;
                    bit = 0;
                    writeln!(s, "        let bits{octet} = r.u8(\"{w}\")?;").unwrap();
                }
                writeln!(s, "        let {f} = bits{octet} & (1 << {bit}) != 0;").unwrap();
                bit += 1;
                continue;
            }
            Ty::Octet => writeln!(s, "        let {f} = r.u8(\"{w}\")?;").unwrap(),
            Ty::Short => writeln!(s, "        let {f} = r.u16(\"{w}\")?;").unwrap(),
            Ty::Long => writeln!(s, "        let {f} = r.u32(\"{w}\")?;").unwrap(),
            Ty::LongLong | Ty::Timestamp => writeln!(s, "        let {f} = r.u64(\"{w}\")?;").unwrap(),
            Ty::ShortStr => writeln!(s, "        let {f} = r.short_str(\"{w}\")?;").unwrap(),
            Ty::LongStr => writeln!(s, "        let {f} = r.long_str(\"{w}\")?;").unwrap(),
            Ty::Table => writeln!(s, "        let {f} = read_table(r, \"{w}\")?;").unwrap(),
        }
        bit = 8;
    }
    let fields: Vec<&str> = m.args.iter().map(|a| a.field.as_str()).collect();
    writeln!(s, "        Ok({t} {{ {} }})\n    }}\n", fields.join(", ")).unwrap();

    if !m.args.is_empty() {
        writeln!(s, "    pub(crate) fn encode_args(&self, out: &mut BytesMut) -> Result<(), EncodeError> {{").unwrap();
        let mut pending_bits: Vec<String> = Vec::new();
        let flush = |s: &mut String, bits: &mut Vec<String>| {
            if bits.is_empty() {
                return;
            }
            let expr: Vec<String> = bits
                .iter()
                .enumerate()
                .map(|(i, f)| if i == 0 { format!("u8::from(self.{f})") } else { format!("u8::from(self.{f}) << {i}") })
                .collect();
            writeln!(s, "        out.put_u8({});", expr.join(" | ")).unwrap();
            bits.clear();
        };
        for a in &m.args {
            let f = &a.field;
            let w = &a.wire_name;
            if a.ty == Ty::Bit {
                if pending_bits.len() == 8 {
                    flush(s, &mut pending_bits);
                }
                pending_bits.push(f.clone());
                continue;
            }
            flush(s, &mut pending_bits);
            match a.ty {
                Ty::Bit => unreachable!(),
                Ty::Octet => writeln!(s, "        out.put_u8(self.{f});").unwrap(),
                Ty::Short => writeln!(s, "        out.put_u16(self.{f});").unwrap(),
                Ty::Long => writeln!(s, "        out.put_u32(self.{f});").unwrap(),
                Ty::LongLong | Ty::Timestamp => writeln!(s, "        out.put_u64(self.{f});").unwrap(),
                Ty::ShortStr => writeln!(s, "        put_short_str(out, self.{f}.as_bytes(), \"{w}\")?;").unwrap(),
                Ty::LongStr => writeln!(s, "        put_long_str(out, &self.{f}, \"{w}\")?;").unwrap(),
                Ty::Table => writeln!(s, "        write_table(out, &self.{f}, \"{w}\")?;").unwrap(),
            }
        }
        flush(s, &mut pending_bits);
        s.push_str("        Ok(())\n    }\n");
    }
    s.push_str("}\n\n");
}

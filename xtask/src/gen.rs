//! `cargo xtask gen-sql-schema`: the field table `phigate-agent/src/sql/schema.rs`, from
//! the `pg_query.proto` of the pg_query crate in Cargo.lock.
//!
//! phigate reads libpg_query's JSON parse output and re-encodes it as the protobuf the
//! `pg_query` crate's types decode (see `phigate-agent/src/sql/json.rs` for why). That
//! needs, per message, each field's JSON name, number and type — which only the .proto
//! says. The table is generated, committed, and checked by the tests in `sql`
//! (the JSON and protobuf paths give the same trees; the table's pg_query version is
//! Cargo.lock's); run this again after upgrading pg_query.

use std::{collections::BTreeMap, fmt::Write as _, process::Command};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::root;

#[derive(Debug)]
struct Field {
    json: String,
    number: u32,
    ty: String,
    repeated: bool,
}

#[derive(Debug, Default)]
struct Proto {
    messages: BTreeMap<String, Vec<Field>>,
    /// Top-level messages with nested declarations or fields the generator does not
    /// read (fine while ParseResult does not reach them).
    unsupported: Vec<String>,
    enums: BTreeMap<String, Vec<(String, i32)>>,
}

pub fn run() -> Result<()> {
    let (version, proto_path) = locate()?;
    let text = std::fs::read_to_string(&proto_path).with_context(|| format!("reading {proto_path}"))?;
    let proto = parse(&text)?;
    let out = generate(&proto, &version)?;
    let dest = root().join("phigate-agent/src/sql/schema.rs");
    std::fs::write(&dest, out)?;
    println!("xtask: wrote {} from pg_query {version} ({proto_path})", dest.display());
    Ok(())
}

/// The pg_query package's version and .proto path, from `cargo metadata`.
fn locate() -> Result<(String, String)> {
    let out = Command::new("cargo").current_dir(root()).args(["metadata", "--format-version", "1"]).output().context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: Value = serde_json::from_slice(&out.stdout)?;
    let pkg = meta["packages"].as_array().and_then(|p| p.iter().find(|p| p["name"] == "pg_query")).context("pg_query is not a dependency of this workspace")?;
    let manifest = pkg["manifest_path"].as_str().context("pg_query has no manifest path")?;
    let dir = std::path::Path::new(manifest).parent().context("manifest path")?;
    let version = pkg["version"].as_str().unwrap_or("?").to_string();
    Ok((version, dir.join("libpg_query/protobuf/pg_query.proto").display().to_string()))
}

fn strip_comments(line: &str) -> String {
    let mut s = line.to_string();
    while let Some(a) = s.find("/*") {
        match s[a..].find("*/") {
            Some(b) => s.replace_range(a..a + b + 2, ""),
            None => s.truncate(a),
        }
    }
    if let Some(a) = s.find("//") {
        s.truncate(a);
    }
    s
}

/// protobuf's default JSON name: lowerCamelCase of the field name.
fn default_json_name(name: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn parse(text: &str) -> Result<Proto> {
    enum In {
        Top,
        Message(String),
        Enum(String),
    }
    let mut proto = Proto::default();
    let mut state = In::Top;
    // Depth of braces inside the current top-level declaration, and of a nested
    // declaration being skipped.
    let mut depth = 0usize;
    let mut skip_from: Option<usize> = None;
    for (no, raw) in text.lines().enumerate() {
        let line = strip_comments(raw);
        let t = line.trim();
        if t.is_empty() || t.starts_with("syntax") || t.starts_with("package") || t.starts_with("option") {
            continue;
        }
        let opens = t.matches('{').count();
        let closes = t.matches('}').count();
        let words: Vec<&str> = t.split_whitespace().collect();
        match &state {
            In::Top => {
                if words.len() >= 2 && (words[0] == "message" || words[0] == "enum") {
                    let name = words[1].trim_end_matches('{').to_string();
                    if words[0] == "message" {
                        proto.messages.insert(name.clone(), Vec::new());
                        state = In::Message(name);
                    } else {
                        proto.enums.insert(name.clone(), Vec::new());
                        state = In::Enum(name);
                    }
                    depth = opens - closes;
                    continue;
                }
                if t == "{" || t == "}" {
                    continue;
                }
                bail!("pg_query.proto line {}: unexpected {t:?}", no + 1);
            }
            In::Message(name) => {
                let name = name.clone();
                if skip_from.is_none() && (words.first() == Some(&"message") || words.first() == Some(&"enum")) && depth >= 1 {
                    proto.unsupported.push(name.clone());
                    skip_from = Some(depth);
                }
                depth = depth + opens - closes;
                if let Some(d) = skip_from {
                    // Inside a nested declaration until its closing brace.
                    if depth <= d {
                        skip_from = None;
                    }
                    if depth == 0 {
                        state = In::Top;
                    }
                    continue;
                }
                if depth == 0 {
                    state = In::Top;
                    continue;
                }
                if t == "{" || t == "}" || words.first() == Some(&"oneof") || words.first() == Some(&"reserved") {
                    continue;
                }
                match field(t) {
                    Ok(f) => proto.messages.get_mut(&name).expect("invariant: inserted").push(f),
                    // A map or other construct the generator does not read: fine
                    // unless ParseResult reaches this message (checked in generate).
                    Err(_) => proto.unsupported.push(name.clone()),
                }
            }
            In::Enum(name) => {
                let name = name.clone();
                depth = depth + opens - closes;
                if depth == 0 {
                    state = In::Top;
                    continue;
                }
                if t == "{" {
                    continue;
                }
                let (value, number) = t.trim_end_matches(';').split_once('=').with_context(|| format!("pg_query.proto line {}: {t:?}", no + 1))?;
                let number: i32 = number.trim().parse().with_context(|| format!("pg_query.proto line {}: enum number", no + 1))?;
                proto.enums.get_mut(&name).expect("invariant: inserted").push((value.trim().to_string(), number));
            }
        }
    }
    Ok(proto)
}

/// `[repeated] Type name = N [json_name="x"];`
fn field(t: &str) -> Result<Field> {
    let (decl, opts) = match t.split_once('[') {
        Some((d, o)) => (d, Some(o)),
        None => (t.trim_end_matches(';'), None),
    };
    let (lhs, number) = decl.split_once('=').context("no field number")?;
    let number: u32 = number.trim().trim_end_matches(';').trim().parse().context("field number")?;
    let mut words: Vec<&str> = lhs.split_whitespace().collect();
    let repeated = words.first() == Some(&"repeated");
    if repeated {
        words.remove(0);
    }
    let [ty, name] = words[..] else { bail!("expected `type name`") };
    let json = match opts.and_then(|o| o.split_once("json_name=\"")).and_then(|(_, rest)| rest.split_once('"')) {
        Some((j, _)) => j.to_string(),
        None => default_json_name(name),
    };
    Ok(Field { json, number, ty: ty.to_string(), repeated })
}

fn generate(proto: &Proto, version: &str) -> Result<String> {
    // Only what ParseResult reaches.
    let mut order: Vec<String> = Vec::new();
    let mut enums: Vec<String> = Vec::new();
    let mut stack = vec!["ParseResult".to_string()];
    while let Some(m) = stack.pop() {
        if order.contains(&m) {
            continue;
        }
        if proto.unsupported.contains(&m) {
            bail!("message {m} has nested declarations or fields the generator does not read");
        }
        let fields = proto.messages.get(&m).with_context(|| format!("message {m} is not in pg_query.proto"))?;
        order.push(m.clone());
        for f in fields {
            if proto.messages.contains_key(&f.ty) {
                stack.push(f.ty.clone());
            } else if proto.enums.contains_key(&f.ty) && !enums.contains(&f.ty) {
                enums.push(f.ty.clone());
            }
        }
    }
    order.sort();
    enums.sort();
    let msg_index = |n: &str| order.iter().position(|m| m == n);
    let enum_index = |n: &str| enums.iter().position(|m| m == n);
    let mut out = String::new();
    writeln!(out, "// @generated by `cargo xtask gen-sql-schema` from pg_query {version}'s pg_query.proto: do not edit.")?;
    writeln!(out, "// Per message: fields sorted by JSON name (number, type, repeated); per enum: values sorted by name.")?;
    writeln!(out, "#![cfg_attr(rustfmt, rustfmt_skip)]")?;
    writeln!(out, "use super::json::{{Enum, Field, Kind::*, Message}};\n")?;
    writeln!(out, "#[cfg(test)]\npub const PG_QUERY_VERSION: &str = {version:?};")?;
    writeln!(out, "pub const PARSE_RESULT: usize = {};\n", msg_index("ParseResult").expect("invariant: root"))?;
    writeln!(out, "pub static MESSAGES: [Message; {}] = [", order.len())?;
    for m in &order {
        let mut fields: Vec<&Field> = proto.messages[m].iter().collect();
        fields.sort_by(|a, b| a.json.cmp(&b.json));
        writeln!(out, "    Message {{ name: {m:?}, fields: &[")?;
        for f in fields {
            let kind = match f.ty.as_str() {
                "int32" => "Int32".to_string(),
                "uint32" => "UInt32".to_string(),
                "int64" => "Int64".to_string(),
                "uint64" => "UInt64".to_string(),
                "bool" => "Bool".to_string(),
                "string" => "Str".to_string(),
                "double" => "Double".to_string(),
                other => match (msg_index(other), enum_index(other)) {
                    (Some(i), _) => format!("Msg({i})"),
                    (None, Some(i)) => format!("Enum({i})"),
                    _ => bail!("field {m}.{} has type {other}, which the generator does not know", f.json),
                },
            };
            writeln!(out, "        Field {{ json: {:?}, number: {}, kind: {kind}, repeated: {} }},", f.json, f.number, f.repeated)?;
        }
        writeln!(out, "    ] }},")?;
    }
    writeln!(out, "];\n")?;
    writeln!(out, "pub static ENUMS: [Enum; {}] = [", enums.len())?;
    for e in &enums {
        let mut values = proto.enums[e].clone();
        values.sort();
        let list: Vec<String> = values.iter().map(|(n, v)| format!("({n:?}, {v})")).collect();
        writeln!(out, "    Enum {{ name: {e:?}, values: &[{}] }},", list.join(", "))?;
    }
    writeln!(out, "];")?;
    Ok(out)
}

//! One audit record: what it says (`kind`, `data`), where it sits in the chain (`seq`,
//! `prev`) and its own hash — SHA-256 over the canonical encoding of everything but
//! the hash: JSON with object keys sorted, no insignificant whitespace, as
//! `serde_json` prints numbers and strings. Each record is one line of a segment.
//! Records hold no floating-point numbers (their text does not round-trip exactly):
//! durations are integer microseconds.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The `prev` of the first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Record kinds (stable: they appear in files and exports).
pub mod kind {
    pub const LIFECYCLE: &str = "lifecycle";
    pub const SESSION_START: &str = "session_start";
    pub const SESSION_END: &str = "session_end";
    pub const CONNECTION_REFUSED: &str = "connection_refused";
    pub const STATEMENT: &str = "statement";
    pub const STATEMENT_END: &str = "statement_end";
    pub const APPROVAL: &str = "approval";
    pub const BYPASS: &str = "bypass";
    pub const CHECKPOINT: &str = "checkpoint";
    pub const SEAL: &str = "seal";
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: u64,
    /// RFC 3339, UTC, microseconds.
    pub ts: String,
    pub prev: String,
    pub kind: String,
    pub data: Value,
    pub hash: String,
    /// The agent's keyed MAC of `hash` ([`super::crypto::RecordMac`]); not part of
    /// what the hash covers.
    pub mac: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("field {0} is missing or has the wrong type")]
    Field(&'static str),
    #[error("its hash does not match its content")]
    Hash,
    #[error("its bytes are not the canonical encoding of its content (altered: whitespace, escapes or repeated keys)")]
    NotCanonical,
}

/// JSON with sorted keys and no whitespace: the same bytes for the same values,
/// whatever order a map was built in.
pub fn canonical(v: &Value) -> String {
    let mut out = Vec::with_capacity(256);
    write_canonical(v, &mut out);
    String::from_utf8(out).expect("invariant: serde_json writes UTF-8")
}

/// Straight into one buffer: every record passes through here on its session's
/// thread, so no string per key or value.
fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            // Already sorted unless serde_json keeps insertion order; sorting a
            // sorted run is one pass.
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                scalar(k, out);
                out.push(b':');
                write_canonical(x, out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(x, out);
            }
            out.push(b']');
        }
        other => scalar(other, out),
    }
}

/// A JSON scalar (or key) written the way serde_json writes it.
fn scalar<T: serde::Serialize + ?Sized>(x: &T, out: &mut Vec<u8>) {
    serde_json::to_writer(out, x).expect("invariant: writing JSON to memory cannot fail");
}

/// One JSON object written straight in canonical form, for the records every
/// statement produces: no map, no string per key or value on the way. Keys must come
/// in sorted (byte) order — debug builds check it, and the tests compare each record
/// built this way with [`canonical`] of the same record built as a `Value`.
pub struct Obj<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
    #[cfg(debug_assertions)]
    last: &'static str,
}

impl<'a> Obj<'a> {
    /// Start an object at the end of `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self {
            out,
            empty: true,
            #[cfg(debug_assertions)]
            last: "",
        }
    }

    fn key(&mut self, k: &'static str) -> &mut Vec<u8> {
        #[cfg(debug_assertions)]
        {
            debug_assert!(self.empty || self.last < k, "keys out of canonical order: {:?} after {:?}", k, self.last);
            self.last = k;
        }
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        scalar(k, self.out);
        self.out.push(b':');
        self.out
    }

    pub fn str(&mut self, k: &'static str, v: &str) -> &mut Self {
        let out = self.key(k);
        scalar(v, out);
        self
    }

    /// A string, or `null`.
    pub fn opt_str(&mut self, k: &'static str, v: Option<&str>) -> &mut Self {
        let out = self.key(k);
        match v {
            Some(v) => scalar(v, out),
            None => out.extend_from_slice(b"null"),
        }
        self
    }

    pub fn u64(&mut self, k: &'static str, v: u64) -> &mut Self {
        self.integer(k, v)
    }

    pub fn i64(&mut self, k: &'static str, v: i64) -> &mut Self {
        self.integer(k, v)
    }

    /// An integer as serde_json writes it (plain decimal digits).
    fn integer(&mut self, k: &'static str, v: impl std::fmt::Display) -> &mut Self {
        use std::io::Write as _;
        let out = self.key(k);
        let _ = write!(out, "{v}");
        self
    }

    pub fn bool(&mut self, k: &'static str, v: bool) -> &mut Self {
        let out = self.key(k);
        out.extend_from_slice(if v { b"true" } else { b"false" });
        self
    }

    /// Any value (in canonical form), or `null`.
    pub fn value(&mut self, k: &'static str, v: Option<&Value>) -> &mut Self {
        let out = self.key(k);
        match v {
            Some(v) => write_canonical(v, out),
            None => out.extend_from_slice(b"null"),
        }
        self
    }

    /// JSON already in canonical form, or `null`.
    pub fn raw(&mut self, k: &'static str, canonical_json: Option<&str>) -> &mut Self {
        let out = self.key(k);
        out.extend_from_slice(canonical_json.unwrap_or("null").as_bytes());
        self
    }

    /// Bytes as a base64 string (written straight into the object: base64 needs no
    /// escaping).
    pub fn b64(&mut self, k: &'static str, v: &[u8]) -> &mut Self {
        json_b64(self.key(k), v);
        self
    }

    /// An array whose elements (comma-separated, in canonical form) are already
    /// written.
    pub fn array(&mut self, k: &'static str, elements: &[u8]) -> &mut Self {
        let out = self.key(k);
        out.push(b'[');
        out.extend_from_slice(elements);
        out.push(b']');
        self
    }

    /// A nested object under `k`: fill it, then [`Obj::end`] it.
    pub fn obj(&mut self, k: &'static str) -> Obj<'_> {
        Obj::new(self.key(k))
    }

    pub fn end(self) {
        self.out.push(b'}');
    }
}

/// Append `v` as a JSON string of its base64 (standard alphabet, padded): encoded
/// straight into `out`, as base64 needs no escaping.
pub fn json_b64(out: &mut Vec<u8>, v: &[u8]) {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    out.push(b'"');
    let at = out.len();
    out.resize(at + v.len().div_ceil(3) * 4, 0);
    let n = STANDARD.encode_slice(v, &mut out[at..]).expect("invariant: sized for the encoding");
    out.truncate(at + n);
    out.push(b'"');
}

/// Build one canonical object into a new string.
pub fn object(build: impl FnOnce(&mut Obj<'_>)) -> String {
    object_sized(256, build)
}

/// [`object`] into a buffer of `capacity` bytes: a record that carries a result is
/// sized once, not grown by doubling (which would hold twice its size at the peak).
pub fn object_sized(capacity: usize, build: impl FnOnce(&mut Obj<'_>)) -> String {
    let mut out = Vec::with_capacity(capacity);
    let mut o = Obj::new(&mut out);
    build(&mut o);
    o.end();
    String::from_utf8(out).expect("invariant: built from UTF-8 strings")
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = Vec::with_capacity(bytes.len() * 2);
    hex_into(bytes, &mut s);
    String::from_utf8(s).expect("invariant: hex digits are ASCII")
}

/// [`hex`] appended to a buffer (a record line being built).
pub fn hex_into(bytes: &[u8], out: &mut Vec<u8>) {
    const D: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(D[(b >> 4) as usize]);
        out.push(D[(b & 15) as usize]);
    }
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl Record {
    fn unhashed(&self) -> Value {
        let mut m = Map::new();
        m.insert("seq".into(), Value::from(self.seq));
        m.insert("ts".into(), Value::from(self.ts.clone()));
        m.insert("prev".into(), Value::from(self.prev.clone()));
        m.insert("kind".into(), Value::from(self.kind.clone()));
        m.insert("data".into(), self.data.clone());
        Value::Object(m)
    }

    /// The hash this record must carry.
    pub fn compute_hash(&self) -> String {
        hex(&Sha256::digest(canonical(&self.unhashed()).as_bytes()))
    }

    /// A new record, hashed.
    pub fn new(seq: u64, ts: String, prev: String, kind: &str, data: Value) -> Self {
        let (hash, _) = encode(seq, &ts, &prev, kind, &data);
        Self { seq, ts, prev, kind: kind.to_string(), data, hash, mac: None }
    }

    /// The line written to the segment (with its newline).
    pub fn to_line(&self) -> String {
        let mut v = self.unhashed();
        let o = v.as_object_mut().expect("invariant: an object");
        o.insert("hash".into(), Value::from(self.hash.clone()));
        if let Some(mac) = &self.mac {
            o.insert("mac".into(), Value::from(mac.clone()));
        }
        let mut s = canonical(&v);
        s.push('\n');
        s
    }

    /// Parse a line (without checking its place in the chain).
    pub fn parse(line: &str) -> Result<Self, RecordError> {
        let v: Value = serde_json::from_str(line).map_err(|e| RecordError::NotJson(e.to_string()))?;
        let o = v.as_object().ok_or_else(|| RecordError::NotJson("not an object".into()))?;
        let s = |k: &'static str| o.get(k).and_then(Value::as_str).map(String::from).ok_or(RecordError::Field(k));
        Ok(Self {
            seq: o.get("seq").and_then(Value::as_u64).ok_or(RecordError::Field("seq"))?,
            ts: s("ts")?,
            prev: s("prev")?,
            kind: s("kind")?,
            data: o.get("data").cloned().ok_or(RecordError::Field("data"))?,
            hash: s("hash")?,
            mac: match o.get("mac") {
                None => None,
                Some(m) => Some(m.as_str().map(String::from).ok_or(RecordError::Field("mac"))?),
            },
        })
    }

    /// Parse and check the record's own hash and that the line is exactly the bytes
    /// the agent writes for it.
    pub fn parse_checked(line: &str) -> Result<Self, RecordError> {
        let r = Self::parse(line)?;
        if r.compute_hash() != r.hash {
            return Err(RecordError::Hash);
        }
        if !r.is_line(line) {
            return Err(RecordError::NotCanonical);
        }
        Ok(r)
    }

    /// Whether `line` (without its newline) is this record's canonical encoding, as
    /// every line is written. The hash covers the parsed value, so an edit that keeps
    /// the value (whitespace, an escape spelled differently, a repeated key) leaves it
    /// matching: only comparing the bytes shows such an edit.
    pub fn is_line(&self, line: &str) -> bool {
        self.to_line().strip_suffix('\n') == Some(line)
    }
}

/// The hash and the line (with its newline) of a record, built straight from its
/// parts: the same bytes as [`Record::to_line`], without copying `data` into a map.
/// Keys in canonical (sorted) order: data, hash, kind, prev, seq, ts.
pub fn encode(seq: u64, ts: &str, prev: &str, kind: &str, data: &Value) -> (String, String) {
    encode_canonical(seq, ts, prev, kind, &canonical(data))
}

/// [`encode`] for `data` already in canonical form (see [`canonical`]); the writer
/// thread gets records this way so that the encoding work stays with their senders.
pub fn encode_canonical(seq: u64, ts: &str, prev: &str, kind: &str, data: &str) -> (String, String) {
    let mut line = Vec::new();
    let hash = append_canonical(&mut line, seq, ts, prev, kind, data, None);
    (hash, String::from_utf8(line).expect("invariant: built from UTF-8 strings"))
}

/// [`encode_canonical`] appending the line to `out` (the writer's batch buffer:
/// one copy of `data`, no intermediate strings), with the record's MAC when `mac`
/// is given; returns the record's hash.
pub fn append_canonical(out: &mut Vec<u8>, seq: u64, ts: &str, prev: &str, kind: &str, data: &str, mac: Option<&super::crypto::RecordMac>) -> String {
    use std::io::Write as _;
    // Everything after `data`, the same in the hashed text and in the line but for the
    // MAC between `kind` and `prev` (keys in sorted order).
    let mut kind_field = Vec::with_capacity(32);
    kind_field.extend_from_slice(b"\"kind\":");
    scalar(kind, &mut kind_field);
    let mut rest = Vec::with_capacity(160);
    rest.extend_from_slice(b",\"prev\":");
    scalar(prev, &mut rest);
    let _ = write!(rest, ",\"seq\":{seq},\"ts\":");
    scalar(ts, &mut rest);
    rest.push(b'}');
    let mut h = Sha256::new();
    h.update(b"{\"data\":");
    h.update(data.as_bytes());
    h.update(b",");
    h.update(&kind_field);
    h.update(&rest);
    let hash = hex(&h.finalize());
    out.reserve(data.len() + kind_field.len() + rest.len() + 180);
    out.extend_from_slice(b"{\"data\":");
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b",\"hash\":\"");
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(b"\",");
    out.extend_from_slice(&kind_field);
    if let Some(mac) = mac {
        out.extend_from_slice(b",\"mac\":\"");
        mac.append(&hash, out);
        out.push(b'"');
    }
    out.extend_from_slice(&rest);
    out.push(b'\n');
    hash
}

/// Now, as records write it.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    format_ts(now)
}

/// `2026-12-02T07:30:00.123456Z` (every record has one: written by hand, not through
/// a format description).
pub fn format_ts(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second(), t.microsecond())
}

/// A timestamp or date from a command line (`2026-12-02`, `2026-12-02T10:00:00Z`).
pub fn parse_ts(s: &str) -> Option<time::OffsetDateTime> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Some(t);
    }
    let d = time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]")).ok()?;
    Some(d.midnight().assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_form_ignores_key_order_and_hashes_detect_changes() {
        let a = json!({"b": 1, "a": {"y": [1, "x"], "x": null}});
        let b: Value = serde_json::from_str(r#"{"a":{"x":null,"y":[1,"x"]},"b":1}"#).unwrap();
        assert_eq!(canonical(&a), canonical(&b));
        assert_eq!(canonical(&a), r#"{"a":{"x":null,"y":[1,"x"]},"b":1}"#);
        let r = Record::new(1, "2026-12-02T00:00:00.000000Z".into(), GENESIS.into(), kind::LIFECYCLE, json!({"event": "start"}));
        let line = r.to_line();
        assert_eq!(Record::parse_checked(line.trim_end()).unwrap(), r);
        assert_eq!(encode(r.seq, &r.ts, &r.prev, &r.kind, &r.data).1, line, "the fast encoding is the canonical one");
        let odd_kind = Record::new(2, r.ts.clone(), r.hash.clone(), "k\"ind\u{1}", json!({"x": 1}));
        assert_eq!(encode(2, &odd_kind.ts, &odd_kind.prev, &odd_kind.kind, &odd_kind.data).1, odd_kind.to_line(), "escaped like serde_json");
        let tampered = line.replace("start", "stort");
        assert_eq!(Record::parse_checked(tampered.trim_end()), Err(RecordError::Hash));
        assert!(Record::parse("{").is_err());
        // The same value in other bytes: the hash still matches, the line does not.
        for edited in [line.trim_end().replacen(",", ", ", 1), line.trim_end().replacen("{", "{\"seq\":9,", 1)] {
            let r = Record::parse(&edited).unwrap();
            assert_eq!(r.compute_hash(), r.hash, "{edited}");
            assert_eq!(Record::parse_checked(&edited), Err(RecordError::NotCanonical), "{edited}");
        }
        let escaped = Record::new(3, r.ts.clone(), r.hash.clone(), kind::LIFECYCLE, json!({"x": "\u{1f}"})).to_line();
        assert!(escaped.contains("\\u001f"), "{escaped}");
        assert_eq!(Record::parse_checked(escaped.trim_end().replace("\\u001f", "\\u001F").as_str()), Err(RecordError::NotCanonical));
        // Strings, keys and numbers exactly as serde_json writes them.
        let odd = json!({"q\"k\n": "tab\t\u{1}é", "n": -1.5, "big": u64::MAX, "t": true});
        assert_eq!(canonical(&odd), r#"{"big":18446744073709551615,"n":-1.5,"q\"k\n":"tab\t\u0001é","t":true}"#);
    }

    #[test]
    fn timestamps_parse_and_print() {
        assert!(parse_ts("2026-12-02").is_some());
        assert!(parse_ts("2026-12-02T10:00:00Z").is_some());
        assert!(parse_ts("yesterday").is_none());
        assert!(now_rfc3339().ends_with('Z'));
        let t = parse_ts("2026-03-04T05:06:07.000089Z").unwrap();
        assert_eq!(format_ts(t), "2026-03-04T05:06:07.000089Z");
        assert_eq!(parse_ts(&now_rfc3339()).map(|t| t.year()), Some(time::OffsetDateTime::now_utc().year()));
        assert_eq!(unhex(&hex(&[0, 255, 16])).unwrap(), vec![0, 255, 16]);
    }
}

//! libpg_query's JSON parse output → the protobuf encoding of the same tree, so that
//! the `pg_query` crate's types decode it.
//!
//! Why: libpg_query builds its protobuf output through upb, whose encoder visits every
//! field of a message to find the set ones; the `Node` message has ~270 fields (one per
//! node type) of which one is set, so most of a parse went to that scan (34 µs of a
//! 36 µs parse of the policy benchmark's join, 24 µs of it in upb). libpg_query's JSON
//! output of the same tree comes from hand-written output functions (≈ 9 µs), and its
//! keys are exactly the .proto's JSON names (libpg_query generates both from one
//! source). Re-encoding that JSON, driven by the generated field table
//! ([`super::schema`]), gives the tree the protobuf path gives (not the same bytes:
//! lengths are padded varints) — the differential test in `sql` holds the two trees
//! equal on every statement of the policy and masking test suites.
//!
//! Owns: the transcoding only. Anything unexpected (a key the table does not know, a
//! value of the wrong JSON type) is an error, and `sql::parse` then takes the protobuf
//! path: a mismatch costs speed, never a wrong tree.

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::schema::{ENUMS, MESSAGES, PARSE_RESULT};

/// One message of the table.
pub struct Message {
    pub name: &'static str,
    pub fields: &'static [Field],
}

/// One field: its JSON key, protobuf number and type.
pub struct Field {
    pub json: &'static str,
    pub number: u32,
    pub kind: Kind,
    pub repeated: bool,
}

#[derive(Clone, Copy)]
pub enum Kind {
    Int32,
    UInt32,
    Int64,
    UInt64,
    Bool,
    Str,
    Double,
    /// Index into `MESSAGES`.
    Msg(usize),
    /// Index into `ENUMS`.
    Enum(usize),
}

/// One enum of the table: value names and numbers.
pub struct Enum {
    pub name: &'static str,
    pub values: &'static [(&'static str, i32)],
}

/// Re-encode the JSON of a `ParseResult` as protobuf, into `out`.
pub fn transcode(json: &[u8], out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(json);
    MessageBody { msg: PARSE_RESULT, out }.deserialize(&mut de)?;
    de.end()
}

/// Bytes reserved for a nested message's length: a varint padded to 5 bytes (valid
/// protobuf; every decoder reads non-minimal varints), patched once the length is known.
const LEN_SLOT: usize = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_tag(out: &mut Vec<u8>, number: u32, wire: u8) {
    put_varint(out, (u64::from(number) << 3) | u64::from(wire));
}

fn open_len(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x00]);
    at
}

fn close_len<E: de::Error>(out: &mut [u8], at: usize) -> Result<(), E> {
    let len = out.len() - at - LEN_SLOT;
    if len >= 1 << 28 {
        return Err(E::custom("message too large"));
    }
    for (i, b) in out[at..at + LEN_SLOT].iter_mut().enumerate() {
        let bits = ((len >> (7 * i)) & 0x7f) as u8;
        *b = if i < LEN_SLOT - 1 { bits | 0x80 } else { bits };
    }
    Ok(())
}

/// Per message and per enum, its keys → position: built once, on the first parse.
/// Key lookups (mostly into `Node`'s ~270 keys, one per node) were about a quarter of
/// a parse as a binary search over the sorted table; hashing took a typical join's
/// parse from 26.3 to 24.5 µs.
struct Index {
    fields: Vec<KeyIndex>,
    enum_values: Vec<KeyIndex>,
}

type KeyIndex = HashMap<&'static str, u16, foldhash::fast::FixedState>;

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    fn positions<'a>(keys: impl Iterator<Item = &'a &'static str>) -> KeyIndex {
        keys.enumerate().map(|(at, key)| (*key, at as u16)).collect()
    }
    INDEX.get_or_init(|| Index {
        fields: MESSAGES.iter().map(|m| positions(m.fields.iter().map(|f| &f.json))).collect(),
        enum_values: ENUMS.iter().map(|e| positions(e.values.iter().map(|(name, _)| name))).collect(),
    })
}

fn field(msg: usize, key: &str) -> Option<&'static Field> {
    index().fields[msg].get(key).map(|&at| &MESSAGES[msg].fields[usize::from(at)])
}

fn enum_value(e: usize, name: &str) -> Option<i32> {
    index().enum_values[e].get(name).map(|&at| ENUMS[e].values[usize::from(at)].1)
}

/// The fields of one message (a JSON object), written without tag or length.
struct MessageBody<'a> {
    /// Index into `MESSAGES`.
    msg: usize,
    out: &'a mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for MessageBody<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MessageBody<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a {} object", MESSAGES[self.msg].name)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<&'de str>()? {
            let Some(field) = field(self.msg, key) else {
                return Err(de::Error::custom(format_args!("{}.{key} is not in the field table", MESSAGES[self.msg].name)));
            };
            if field.repeated {
                map.next_value_seed(Repeated { field, out: self.out })?;
            } else {
                map.next_value_seed(Value { field, out: self.out })?;
            }
        }
        Ok(())
    }
}

/// A JSON array of a repeated field: each element as its own tagged value.
struct Repeated<'a> {
    field: &'static Field,
    out: &'a mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for Repeated<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Repeated<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array for {}", self.field.json)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Value { field: self.field, out: &mut *self.out })?.is_some() {}
        Ok(())
    }
}

/// One value of `field`, written with its tag.
struct Value<'a> {
    field: &'static Field,
    out: &'a mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for Value<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.field.kind {
            Kind::Msg(i) => {
                put_tag(self.out, self.field.number, 2);
                let at = open_len(self.out);
                MessageBody { msg: i, out: &mut *self.out }.deserialize(d)?;
                close_len(self.out, at)
            }
            _ => d.deserialize_any(self),
        }
    }
}

impl<'de> Visitor<'de> for Value<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a value for {}", self.field.json)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        match self.field.kind {
            Kind::Bool => {
                put_tag(self.out, self.field.number, 0);
                self.out.push(u8::from(v));
                Ok(())
            }
            _ => Err(E::custom(format_args!("{}: unexpected boolean", self.field.json))),
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        match self.field.kind {
            // int32 and int64 are varints of the two's-complement 64-bit value.
            Kind::Int32 if i32::try_from(v).is_ok() => varint(self, v as u64),
            Kind::Int64 => varint(self, v as u64),
            Kind::Double => self.visit_f64(v as f64),
            _ => Err(E::custom(format_args!("{}: unexpected integer {v}", self.field.json))),
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        match self.field.kind {
            Kind::Int32 if i32::try_from(v).is_ok() => varint(self, v),
            Kind::UInt32 if u32::try_from(v).is_ok() => varint(self, v),
            Kind::Int64 if i64::try_from(v).is_ok() => varint(self, v),
            Kind::UInt64 => varint(self, v),
            Kind::Double => self.visit_f64(v as f64),
            _ => Err(E::custom(format_args!("{}: unexpected integer {v}", self.field.json))),
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        match self.field.kind {
            Kind::Double => {
                put_tag(self.out, self.field.number, 1);
                self.out.extend_from_slice(&v.to_le_bytes());
                Ok(())
            }
            _ => Err(E::custom(format_args!("{}: unexpected number", self.field.json))),
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        match self.field.kind {
            Kind::Str => {
                put_tag(self.out, self.field.number, 2);
                put_varint(self.out, v.len() as u64);
                self.out.extend_from_slice(v.as_bytes());
                Ok(())
            }
            Kind::Enum(i) => match enum_value(i, v) {
                Some(number) => varint(self, number as i64 as u64),
                None => Err(E::custom(format_args!("{}: {v:?} is not a {} value", self.field.json, ENUMS[i].name))),
            },
            _ => Err(E::custom(format_args!("{}: unexpected string", self.field.json))),
        }
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        // null: the field's default, which protobuf does not write.
        Ok(())
    }
}

fn varint<E: de::Error>(v: Value<'_>, value: u64) -> Result<(), E> {
    put_tag(v.out, v.field.number, 0);
    put_varint(v.out, value);
    Ok(())
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Message({})", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_the_table_is_found_at_its_own_place() {
        for (m, message) in MESSAGES.iter().enumerate() {
            for f in message.fields {
                assert!(field(m, f.json).is_some_and(|found| std::ptr::eq(found, f)), "{}.{}", message.name, f.json);
            }
            assert!(field(m, "noSuchKey").is_none());
        }
        for (e, values) in ENUMS.iter().enumerate() {
            for (name, number) in values.values {
                assert_eq!(enum_value(e, name), Some(*number), "{}.{name}", values.name);
            }
        }
    }
}

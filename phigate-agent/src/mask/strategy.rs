//! Masking strategies applied to one cell, producing a valid value of the column's
//! type in the cell's format (text or binary), or NULL where no valid masked value of
//! that type exists.
//!
//! | strategy | text-like columns | other types |
//! |---|---|---|
//! | `redact` | a fixed token (or NULL) | NULL |
//! | `partial` | last N letters/digits kept, the others `*`, punctuation kept | NULL |
//! | `hash` | keyed HMAC-SHA256 pseudonym, hex | int2/4/8 and uuid: a pseudonym of that type; others NULL |
//! | `year` | dates → `YYYY`; numbers over 89 → `90+` | date/timestamp → 1 January of the year; integer ages over 89 → 90 |
//! | `zip3` | first three digits, `000` for Safe Harbor's low-population prefixes | NULL |
//! | `detect` | free-text detectors | unchanged |
//! | `keep` | unchanged | unchanged |
//!
//! Years that imply an age over 89 are clamped to the year that makes the person 90,
//! as Safe Harbor asks. Pure: the HMAC key and the current year come from the caller.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::detect::{Counts, DetectCache, Detectors};

/// How a masked value is produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    Redact {
        token: String,
        null: bool,
    },
    Partial {
        keep_last: usize,
    },
    Hash {
        hex_len: usize,
        prefix: String,
    },
    /// Dates to their year. `ages`: a number is an age (over 89 becomes 90); false for
    /// a value computed from a date column, where a number may be its month, day or
    /// day count, so numbers are NULL.
    Year {
        ages: bool,
    },
    Zip3,
    /// Run the free-text detectors over the value.
    Detect,
    Keep,
}

impl Strategy {
    /// How much a strategy hides; when several rules could apply to a value derived
    /// from several columns, the strongest wins.
    pub fn strength(&self) -> u8 {
        match self {
            Strategy::Redact { .. } => 6,
            Strategy::Hash { .. } => 5,
            Strategy::Partial { .. } => 4,
            Strategy::Zip3 => 3,
            Strategy::Year { .. } => 2,
            Strategy::Detect => 1,
            Strategy::Keep => 0,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Redact { .. } => "redact",
            Strategy::Partial { .. } => "partial",
            Strategy::Hash { .. } => "hash",
            Strategy::Year { .. } => "year",
            Strategy::Zip3 => "zip3",
            Strategy::Detect => "detect",
            Strategy::Keep => "keep",
        }
    }
}

/// The column types the strategies know how to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeClass {
    /// text, varchar, bpchar, name, and types with assigned OIDs in text format.
    Text,
    /// json and xml: text with a grammar of its own. The detectors read it (their
    /// tokens stay inside its strings), but a token or a hash would not be a valid
    /// value: other rules make it NULL.
    Structured,
    /// jsonb: like [`TypeClass::Structured`]; in binary a version byte, then the text.
    Jsonb,
    Int2,
    Int4,
    Int8,
    Numeric,
    Date,
    Timestamp,
    /// timestamptz: like [`TypeClass::Timestamp`], but clients show it in their zone.
    TimestampTz,
    Uuid,
    /// Arrays of text, varchar, bpchar, name, char, json or xml (`jsonb`: of jsonb,
    /// whose elements start with a version byte). In binary format their elements
    /// are read one by one, each one's text through the detectors.
    TextArray {
        jsonb: bool,
    },
    /// Anything else (bool, bytea, floats, intervals, other arrays, …).
    Other,
}

impl TypeClass {
    pub fn of(type_oid: u32) -> Self {
        match type_oid {
            25 | 1043 | 1042 | 19 | 705 => TypeClass::Text,
            114 | 142 => TypeClass::Structured,
            3802 => TypeClass::Jsonb,
            21 => TypeClass::Int2,
            23 => TypeClass::Int4,
            20 => TypeClass::Int8,
            1700 => TypeClass::Numeric,
            1082 => TypeClass::Date,
            1114 => TypeClass::Timestamp,
            1184 => TypeClass::TimestampTz,
            2950 => TypeClass::Uuid,
            1009 | 1015 | 1014 | 1003 | 1002 | 199 | 143 => TypeClass::TextArray { jsonb: false },
            3807 => TypeClass::TextArray { jsonb: true },
            // Types with assigned OIDs (citext, enums, composites, system views' row
            // types …) are above the built-in range; their text form is text. Their binary form may
            // not be: the masker asks the catalog and treats opaque ones as `Other`.
            oid if oid >= super::catalog::FIRST_ASSIGNED_OID => TypeClass::Text,
            _ => TypeClass::Other,
        }
    }
}

/// A cell's type and wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellType {
    pub class: TypeClass,
    pub binary: bool,
}

impl CellType {
    /// Whether any string is a valid value (so text strategies may replace it).
    /// Whether any text written is a valid value (a token, a hash, a partial form).
    pub fn is_text(&self) -> bool {
        self.class == TypeClass::Text
    }

    /// Whether detectors should read it: text, the elements of text arrays, and the
    /// text form of types that can hold text (arrays, composites, ranges …), not
    /// numbers or dates.
    pub fn scannable(&self) -> bool {
        self.is_text()
            || matches!(self.class, TypeClass::Structured | TypeClass::TextArray { .. })
            || (!self.binary && matches!(self.class, TypeClass::Other | TypeClass::Jsonb))
    }
}

/// Whether binary values of a type (of class [`TypeClass::Other`]) can hold free text
/// the detectors cannot read in that form: records, tsvector/tsquery (words of the text
/// they index), anyarray and pg_mcv_list (pg_stats' sample values), and types whose
/// binary form is text of their own (jsonpath, pg_node_tree, refcursor, cstring). Arrays of text-like types are [`TypeClass::TextArray`], read element by
/// element. Arrays of numbers, times or identifiers cannot, nor can bytea (its text
/// form is hex, which the detectors cannot read either: it is left alone in both).
pub fn may_hold_text(type_oid: u32) -> bool {
    matches!(
        type_oid,
        2249 | 2287 // record, record[]
            | 3614 | 3615 | 3643 | 3645 // tsvector, tsquery and their arrays
            | 2277 // anyarray
            | 4072 | 4073 // jsonpath (its literals) and its array
            | 2275 | 1263 // cstring and its array
            | 1790 | 2201 // refcursor (a cursor's name) and its array
            | 194 | 5017 // pg_node_tree (constants of stored expressions), pg_mcv_list (sampled values)
    )
}

/// A short value built apart (a ZIP3, an integer): inline, no allocation.
type CellBytes = smallvec::SmallVec<[u8; 64]>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrategyError {
    #[error("a {what} value is malformed ({len} bytes)")]
    Malformed { what: &'static str, len: usize },
}

/// The keyed HMAC state, ready to clone per value (keying it costs two of the four
/// SHA-256 blocks a short value needs).
pub type Keyed = Hmac<Sha256>;

pub fn keyed(key: &[u8]) -> Keyed {
    <Keyed as Mac>::new_from_slice(key).expect("invariant: HMAC takes keys of any length")
}

/// What the strategies need besides the value.
pub struct Context<'a> {
    pub mac: &'a Keyed,
    pub detectors: &'a Detectors,
    pub current_year: i32,
}

impl Context<'_> {
    fn mac(&self, value: &[u8]) -> [u8; 32] {
        let mut m = self.mac.clone();
        m.update(value);
        m.finalize().into_bytes().into()
    }

    /// The oldest birth year that does not reveal an age over 89.
    fn oldest_year(&self) -> i32 {
        self.current_year - 90
    }
}

/// What [`apply_into`] did with a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Forward the value as it is (nothing was appended).
    Same,
    /// Send NULL instead (nothing was appended).
    Null,
    /// The masked value was appended to the output.
    Written,
}

fn written(out: &mut Vec<u8>, bytes: &[u8]) -> Outcome {
    out.extend_from_slice(bytes);
    Outcome::Written
}

/// Apply `strategy` to a non-NULL `value`, appending the masked value (if any) to
/// `out` — the row being rebuilt, so a masked cell is written once, where it goes,
/// rather than built apart and copied in. `counts` gets one entry per identifier the
/// detectors replaced. On an error nothing is appended.
pub fn apply_into(
    strategy: &Strategy,
    ctx: &Context<'_>,
    cache: &mut DetectCache,
    ty: CellType,
    value: &[u8],
    counts: &mut Counts,
    out: &mut Vec<u8>,
) -> Result<Outcome, StrategyError> {
    use TypeClass as T;
    Ok(match strategy {
        Strategy::Keep => Outcome::Same,
        Strategy::Detect => match ty.class {
            TypeClass::TextArray { jsonb } if ty.binary => detect_in_array(ctx, cache, jsonb, value, counts, out)?,
            _ => detect(ctx, cache, ty, value, counts, out),
        },
        Strategy::Redact { token, null } => {
            if *null || !ty.is_text() {
                Outcome::Null
            } else {
                written(out, token.as_bytes())
            }
        }
        Strategy::Partial { keep_last } => {
            if !ty.is_text() {
                Outcome::Null
            } else {
                partial_into(value, *keep_last, out);
                Outcome::Written
            }
        }
        Strategy::Zip3 => {
            if !ty.is_text() {
                Outcome::Null
            } else {
                written(out, &zip3(value))
            }
        }
        Strategy::Hash { hex_len, prefix } => match ty.class {
            _ if ty.is_text() => {
                let mac = ctx.mac(value);
                let len = (*hex_len).clamp(8, 64);
                out.extend_from_slice(prefix.as_bytes());
                const DIGITS: &[u8; 16] = b"0123456789abcdef";
                // Two digits per byte, the last byte's second digit cut for odd lengths.
                for (i, b) in mac.iter().take(len.div_ceil(2)).enumerate() {
                    out.push(DIGITS[(b >> 4) as usize]);
                    if 2 * i + 1 < len {
                        out.push(DIGITS[(b & 15) as usize]);
                    }
                }
                Outcome::Written
            }
            T::Int2 | T::Int4 | T::Int8 => {
                let canonical = integer_text(ty, value)?;
                let mac = ctx.mac(canonical.as_bytes());
                let raw = u64::from_be_bytes(mac[..8].try_into().expect("invariant: 8 of 32 bytes"));
                let v: i64 = match ty.class {
                    T::Int2 => 1 + (raw % i16::MAX as u64) as i64,
                    T::Int4 => 1 + (raw % i32::MAX as u64) as i64,
                    _ => 1 + (raw % i64::MAX as u64) as i64,
                };
                written(out, &integer_out(ty, v))
            }
            T::Uuid => {
                let canonical = uuid_text(ty, value)?;
                let mac = ctx.mac(canonical.as_bytes());
                let mut b: [u8; 16] = mac[..16].try_into().expect("invariant: 16 of 32 bytes");
                // Version 8 (custom), RFC 4122 variant: a valid UUID that says it is made up.
                b[6] = (b[6] & 0x0f) | 0x80;
                b[8] = (b[8] & 0x3f) | 0x80;
                if ty.binary {
                    written(out, &b)
                } else {
                    written(out, format_uuid(&b).as_bytes())
                }
            }
            _ => Outcome::Null,
        },
        Strategy::Year { ages } => year(ctx, ty, *ages, value, out)?,
    })
}

/// The detectors over each element of a binary array of text-like elements
/// (`array_send`: the number of dimensions, a has-NULLs flag, the element type, each
/// dimension's size and lower bound, then each element's length — -1 for NULL — and
/// bytes). The header is kept; changed elements get their new lengths. A value that
/// does not read to its end exactly is malformed (the result is refused).
fn detect_in_array(
    ctx: &Context<'_>,
    cache: &mut DetectCache,
    jsonb: bool,
    value: &[u8],
    counts: &mut Counts,
    out: &mut Vec<u8>,
) -> Result<Outcome, StrategyError> {
    let start = out.len();
    let scanned = (|| {
        let malformed = || StrategyError::Malformed { what: "array", len: value.len() };
        let int = |at: usize| value.get(at..at + 4).map(|b| i32::from_be_bytes(b.try_into().expect("invariant: 4 bytes")));
        let dims = usize::try_from(int(0).ok_or_else(malformed)?).map_err(|_| malformed())?;
        // PostgreSQL allows at most 6 dimensions (MAXDIM).
        if dims > 6 {
            return Err(malformed());
        }
        let header = 12 + 8 * dims;
        let mut elements: usize = usize::from(dims > 0);
        for d in 0..dims {
            let size = usize::try_from(int(12 + 8 * d).ok_or_else(malformed)?).map_err(|_| malformed())?;
            elements = elements.checked_mul(size).ok_or_else(malformed)?;
        }
        out.extend_from_slice(value.get(..header).ok_or_else(malformed)?);
        let mut at = header;
        let mut changed = false;
        // Each element takes at least its 4-byte length: a declared count larger
        // than the value ends at the first missing length.
        for _ in 0..elements {
            let len = int(at).ok_or_else(malformed)?;
            at += 4;
            // -1 is a NULL element; PostgreSQL's array_recv refuses anything below.
            if len < -1 {
                return Err(malformed());
            }
            let Ok(len) = usize::try_from(len) else {
                out.extend_from_slice(&(-1i32).to_be_bytes());
                continue;
            };
            let element = value.get(at..at + len).ok_or_else(malformed)?;
            at += len;
            let (version, text) = match jsonb {
                true => element.split_first().map(|(v, t)| (Some(*v), t)).ok_or_else(malformed)?,
                false => (None, element),
            };
            match ctx.detectors.scan_with(cache, text, counts) {
                Some(new) => {
                    changed = true;
                    let new_len = i32::try_from(new.len() + usize::from(version.is_some())).map_err(|_| malformed())?;
                    out.extend_from_slice(&new_len.to_be_bytes());
                    out.extend(version);
                    out.extend_from_slice(&new);
                }
                None => {
                    out.extend_from_slice(&value[at - len - 4..at]);
                }
            }
        }
        if at != value.len() {
            return Err(malformed());
        }
        Ok(changed)
    })();
    match scanned {
        Ok(true) => Ok(Outcome::Written),
        other => {
            out.truncate(start);
            other.map(|_| Outcome::Same)
        }
    }
}

fn detect(ctx: &Context<'_>, cache: &mut DetectCache, ty: CellType, value: &[u8], counts: &mut Counts, out: &mut Vec<u8>) -> Outcome {
    match ty.class {
        TypeClass::Jsonb if ty.binary => {
            // Binary jsonb is a version byte followed by the JSON text.
            let Some((&version, text)) = value.split_first() else { return Outcome::Same };
            match ctx.detectors.scan_with(cache, text, counts) {
                Some(new) => {
                    out.push(version);
                    written(out, &new)
                }
                None => Outcome::Same,
            }
        }
        _ if ty.scannable() => match ctx.detectors.scan_with(cache, value, counts) {
            Some(new) => written(out, &new),
            None => Outcome::Same,
        },
        _ => Outcome::Same,
    }
}

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

fn format_uuid(b: &[u8; 16]) -> String {
    let h = hex(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Keep the last `keep` letters and digits; hide the others; keep punctuation so the
/// shape (`***-**-6789`) still reads.
fn partial_into(value: &[u8], keep: usize, out: &mut Vec<u8>) {
    // A value with no more than twice `keep` letters and digits is hidden whole: it
    // is a piece (`substr(ssn, 1, 3)`, `substr(ssn, 8, 4)`), and pieces kept whole
    // would put the value together again.
    let hidden = |total: usize| if total > 2 * keep { total - keep } else { total };
    if value.is_ascii() {
        let total = value.iter().filter(|b| b.is_ascii_alphanumeric()).count();
        let mut hide = hidden(total);
        out.extend(value.iter().map(|&b| {
            if hide > 0 && b.is_ascii_alphanumeric() {
                hide -= 1;
                return b'*';
            }
            b
        }));
        return;
    }
    let text = String::from_utf8_lossy(value);
    let total = text.chars().filter(|c| c.is_alphanumeric()).count();
    let hide = hidden(total);
    let mut seen = 0;
    let mut buf = [0u8; 4];
    for c in text.chars() {
        let c = if c.is_alphanumeric() {
            seen += 1;
            if seen <= hide {
                '*'
            } else {
                c
            }
        } else {
            c
        };
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
}

/// ZIP3 prefixes of areas with 20,000 or fewer people (2000 census), which Safe Harbor
/// requires to become 000.
pub const RESTRICTED_ZIP3: [&str; 17] = ["036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878", "879", "884", "890", "893"];

fn zip3(value: &[u8]) -> CellBytes {
    let digits: CellBytes = value.iter().copied().filter(u8::is_ascii_digit).take(3).collect();
    if digits.len() < 3 || RESTRICTED_ZIP3.iter().any(|z| z.as_bytes() == &digits[..]) {
        return b"000"[..].into();
    }
    digits
}

fn integer_text(ty: CellType, value: &[u8]) -> Result<String, StrategyError> {
    if !ty.binary {
        return Ok(String::from_utf8_lossy(value).trim().to_string());
    }
    let what = "integer";
    Ok(match (ty.class, value.len()) {
        (TypeClass::Int2, 2) => i16::from_be_bytes([value[0], value[1]]).to_string(),
        (TypeClass::Int4, 4) => i32::from_be_bytes(value.try_into().expect("invariant: length checked")).to_string(),
        (TypeClass::Int8, 8) => i64::from_be_bytes(value.try_into().expect("invariant: length checked")).to_string(),
        _ => return Err(StrategyError::Malformed { what, len: value.len() }),
    })
}

fn integer_out(ty: CellType, v: i64) -> CellBytes {
    if !ty.binary {
        return v.to_string().into_bytes().into();
    }
    match ty.class {
        TypeClass::Int2 => (v as i16).to_be_bytes()[..].into(),
        TypeClass::Int4 => (v as i32).to_be_bytes()[..].into(),
        _ => v.to_be_bytes()[..].into(),
    }
}

fn uuid_text(ty: CellType, value: &[u8]) -> Result<String, StrategyError> {
    if !ty.binary {
        return Ok(String::from_utf8_lossy(value).to_ascii_lowercase());
    }
    let b: [u8; 16] = value.try_into().map_err(|_| StrategyError::Malformed { what: "uuid", len: value.len() })?;
    Ok(format_uuid(&b))
}

/// The calendar year now (UTC).
pub fn current_year() -> i32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    year_of_days(secs.div_euclid(86_400) - 10_957)
}

/// Days from 2000-01-01 (PostgreSQL's epoch) to 1 January of `year`.
fn days_to_new_year(year: i32) -> i32 {
    // Days from 0000-03-01 style computation (proleptic Gregorian), via a civil-days
    // formula: days since 1970-01-01 of y-01-01, minus 10957 (2000-01-01).
    let y = i64::from(year) - 1; // for January, the formula counts from the previous March
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = 306; // 1 January is day 306 of the March-based year
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days_1970 = era * 146_097 + doe - 719_468;
    (days_1970 - 10_957) as i32
}

/// The calendar year of a day count from 2000-01-01.
fn year_of_days(days: i64) -> i32 {
    let z = days + 10_957 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2)) as i32
}

fn year(ctx: &Context<'_>, ty: CellType, ages: bool, value: &[u8], out: &mut Vec<u8>) -> Result<Outcome, StrategyError> {
    use TypeClass as T;
    let clamp = |y: i32| y.max(ctx.oldest_year());
    Ok(match (ty.class, ty.binary) {
        (T::Date, true) => {
            let d: [u8; 4] = value.try_into().map_err(|_| StrategyError::Malformed { what: "date", len: value.len() })?;
            let days = i32::from_be_bytes(d);
            if days == i32::MAX || days == i32::MIN {
                return Ok(Outcome::Same); // infinity
            }
            written(out, &days_to_new_year(clamp(year_of_days(i64::from(days)))).to_be_bytes())
        }
        (T::Timestamp | T::TimestampTz, true) => {
            let t: [u8; 8] = value.try_into().map_err(|_| StrategyError::Malformed { what: "timestamp", len: value.len() })?;
            let micros = i64::from_be_bytes(t);
            if micros == i64::MAX || micros == i64::MIN {
                return Ok(Outcome::Same);
            }
            let y = clamp(year_of_days(micros.div_euclid(86_400_000_000)));
            // A timestamptz is shown in the client's zone (UTC−12 … UTC+14): noon UTC
            // of 1 January is in the same year in every one; midnight would be the
            // previous year west of UTC.
            let noon = if ty.class == T::TimestampTz { 12 * 3_600_000_000 } else { 0 };
            written(out, &(i64::from(days_to_new_year(y)) * 86_400_000_000 + noon).to_be_bytes())
        }
        (T::Date | T::Timestamp | T::TimestampTz, false) => match generalise_date_text(value, clamp) {
            Some(v) => written(out, v.as_ref()),
            None if matches!(value, b"infinity" | b"-infinity") => Outcome::Same,
            // A form it cannot generalise (fail closed).
            None => Outcome::Null,
        },
        // Not an age: a number computed from a date (its month, its day) is NULL.
        (T::Int2 | T::Int4 | T::Int8 | T::Numeric, _) if !ages => Outcome::Null,
        (T::Int2 | T::Int4 | T::Int8, _) => {
            let v: i64 = integer_text(ty, value)?.parse().map_err(|_| StrategyError::Malformed { what: "integer", len: value.len() })?;
            if v > 89 {
                written(out, &integer_out(ty, 90))
            } else {
                Outcome::Same
            }
        }
        (T::Numeric, false) => {
            let text = String::from_utf8_lossy(value);
            match text.trim().parse::<f64>() {
                Ok(v) if v > 89.0 => written(out, b"90"),
                Ok(_) => Outcome::Same,
                Err(_) => Outcome::Null,
            }
        }
        _ if ty.is_text() => {
            let text = String::from_utf8_lossy(value);
            let t = text.trim();
            if let Ok(age) = t.parse::<f64>() {
                if !ages {
                    Outcome::Null
                } else if age > 89.0 {
                    written(out, b"90+")
                } else {
                    Outcome::Same
                }
            } else {
                match find_year(t) {
                    Some(y) => written(out, clamp(y).to_string().as_bytes()),
                    None => Outcome::Null,
                }
            }
        }
        _ => Outcome::Null,
    })
}

/// A four-digit year in a date written in any common style.
fn find_year(s: &str) -> Option<i32> {
    s.split(|c: char| !c.is_ascii_digit()).find(|g| g.len() == 4).and_then(|g| g.parse().ok())
}

/// `1961-04-17`, `04/17/1961`, `17.04.1961 13:45:00+02` → the same text with month and
/// day set to 01 and the time to zero, the year clamped.
fn generalise_date_text(value: &[u8], clamp: impl Fn(i32) -> i32) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(value).ok()?;
    // Words other than an era (BC/AD) or a time zone abbreviation (upper case) are
    // month or day names (`SET datestyle = 'Postgres'`: `Mon Apr 17 … 1961`): not a
    // form whose digits alone carry the date.
    if text.split(|c: char| !c.is_ascii_alphabetic()).any(|w| !w.is_empty() && !w.bytes().all(|b| b.is_ascii_uppercase())) {
        return None;
    }
    let year = find_year(text)?;
    let mut out = String::with_capacity(text.len());
    let mut group = 0;
    let mut chars = text.char_indices().peekable();
    let mut prev: Option<char> = None;
    while let Some((i, c)) = chars.next() {
        if !c.is_ascii_digit() {
            out.push(c);
            prev = Some(c);
            continue;
        }
        let start = i;
        let mut end = i + c.len_utf8();
        while let Some(&(j, d)) = chars.peek() {
            if !d.is_ascii_digit() {
                break;
            }
            end = j + d.len_utf8();
            chars.next();
        }
        let digits = &text[start..end];
        group += 1;
        let is_offset = group > 3 && matches!(prev, Some('+') | Some('-'));
        if digits.len() == 4 && digits.parse::<i32>().ok() == Some(year) {
            out.push_str(&format!("{:04}", clamp(year)));
        } else if is_offset {
            out.push_str(digits);
        } else if group <= 3 {
            out.push_str(&format!("{:0width$}", 1, width = digits.len()));
        } else {
            out.push_str(&"0".repeat(digits.len()));
        }
        prev = digits.chars().last();
    }
    Some(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::detect::Kind;

    /// What a strategy made of one value.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) enum Masked {
        Same,
        Null,
        Value(Vec<u8>),
    }

    /// Apply a strategy (test key, every detector, 2026) to one value appended to a
    /// row under way: only appended to, and nothing unless written.
    pub(super) fn try_run(s: &Strategy, class: TypeClass, binary: bool, v: &[u8]) -> Result<Masked, StrategyError> {
        let d = Detectors::new(&Kind::ALL, &[]).unwrap();
        let mac = keyed(b"test key with enough bytes......");
        let ctx = Context { mac: &mac, detectors: &d, current_year: 2026 };
        let mut out = b"row so far".to_vec();
        let outcome = apply_into(s, &ctx, &mut d.cache(), CellType { class, binary }, v, &mut Counts::new(), &mut out)?;
        let value = out.split_off(10);
        assert_eq!(out, b"row so far", "only appended to");
        assert!(outcome == Outcome::Written || value.is_empty(), "nothing appended for {outcome:?}");
        Ok(match outcome {
            Outcome::Same => Masked::Same,
            Outcome::Null => Masked::Null,
            Outcome::Written => Masked::Value(value),
        })
    }

    fn run(s: &Strategy, class: TypeClass, binary: bool, v: &[u8]) -> Masked {
        try_run(s, class, binary, v).unwrap()
    }

    fn text(m: Masked) -> String {
        match m {
            Masked::Value(v) => String::from_utf8(v).unwrap(),
            other => format!("{other:?}"),
        }
    }

    /// A one-dimensional binary array (`array_send`) of `elements` of type `elem`.
    fn binary_array(elem: u32, elements: &[Option<&[u8]>]) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [1, i32::from(elements.iter().any(Option::is_none)), elem as i32, elements.len() as i32, 1] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        for e in elements {
            match e {
                Some(b) => {
                    v.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    v.extend_from_slice(b);
                }
                None => v.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        v
    }

    #[test]
    fn binary_text_arrays_have_each_element_scanned_and_stay_valid() {
        let text = TypeClass::of(1009);
        assert_eq!(text, TypeClass::TextArray { jsonb: false });
        assert!(CellType { class: text, binary: true }.scannable());
        let phone = b"call 617-555-0134 after six";
        let v = binary_array(25, &[Some(b"stable"), None, Some(phone), Some(b"")]);
        let Masked::Value(out) = run(&Strategy::Detect, text, true, &v) else { panic!("the phone number is masked") };
        let masked = String::from_utf8_lossy(b"call [PHONE] after six").into_owned();
        assert_eq!(out, binary_array(25, &[Some(b"stable"), None, Some(masked.as_bytes()), Some(b"")]), "header kept, lengths rewritten");
        // Nothing to mask: forwarded as it is. An empty array has no dimensions.
        assert_eq!(run(&Strategy::Detect, text, true, &binary_array(25, &[Some(b"stable")])), Masked::Same);
        assert_eq!(run(&Strategy::Detect, text, true, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 25]), Masked::Same);
        // jsonb[]: each element is a version byte, then the JSON text.
        let json = [&[1u8][..], br#"{"phone": "617-555-0134"}"#].concat();
        let Masked::Value(out) = run(&Strategy::Detect, TypeClass::of(3807), true, &binary_array(3802, &[Some(&json)])) else { panic!() };
        assert_eq!(out, binary_array(3802, &[Some(&[&[1u8][..], br#"{"phone": "[PHONE]"}"#].concat())]));
        // A rule with no array form: NULL, as before.
        assert_eq!(run(&Strategy::Partial { keep_last: 4 }, text, true, &v), Masked::Null);
    }

    #[test]
    fn malformed_binary_arrays_are_refused() {
        let d = Detectors::new(&Kind::ALL, &[]).unwrap();
        let mac = keyed(b"test key with enough bytes......");
        let ctx = Context { mac: &mac, detectors: &d, current_year: 2026 };
        let good = binary_array(25, &[Some(b"617-555-0134")]);
        let mut huge = good.clone();
        huge[12..16].copy_from_slice(&i32::MAX.to_be_bytes()); // more elements than bytes
        let mut negative = good.clone();
        negative[0..4].copy_from_slice(&(-1i32).to_be_bytes());
        let mut deep = good.clone();
        deep[0..4].copy_from_slice(&7i32.to_be_bytes());
        let mut long = good.clone();
        long[20..24].copy_from_slice(&1000i32.to_be_bytes()); // an element past the end
        for (what, v) in [
            ("truncated", &good[..good.len() - 1]),
            ("trailing bytes", &[&good[..], b"x"].concat()[..]),
            ("more elements than bytes", &huge[..]),
            ("negative dimensions", &negative[..]),
            ("more than 6 dimensions", &deep[..]),
            ("an element past the end", &long[..]),
            ("no header", &[0, 0, 0, 1][..]),
        ] {
            let mut out = b"row".to_vec();
            let r = apply_into(&Strategy::Detect, &ctx, &mut d.cache(), CellType { class: TypeClass::of(1009), binary: true }, v, &mut Counts::new(), &mut out);
            assert!(r.is_err(), "{what}: {r:?}");
            assert_eq!(out, b"row", "{what}: nothing appended");
        }
    }

    #[test]
    fn redact_and_partial() {
        let r = Strategy::Redact { token: "[REDACTED]".into(), null: false };
        assert_eq!(text(run(&r, TypeClass::Text, false, b"123-45-6789")), "[REDACTED]");
        assert_eq!(run(&r, TypeClass::Int4, true, &7i32.to_be_bytes()), Masked::Null, "no token is a valid int4");
        assert_eq!(run(&Strategy::Redact { token: "x".into(), null: true }, TypeClass::Text, false, b"a"), Masked::Null);
        let p = Strategy::Partial { keep_last: 4 };
        assert_eq!(text(run(&p, TypeClass::Text, false, b"123-45-6789")), "***-**-6789");
        assert_eq!(text(run(&p, TypeClass::Text, true, b"4111 1111 1111 1111")), "**** **** **** 1111");
        // Pieces (no more than twice keep_last letters and digits) are hidden whole.
        assert_eq!(text(run(&p, TypeClass::Text, false, b"ab")), "**");
        assert_eq!(text(run(&p, TypeClass::Text, false, b"123-45-67")), "***-**-**");
        assert_eq!(text(run(&p, TypeClass::Text, false, b"6789")), "****");
        assert_eq!(
            text(run(&Strategy::Partial { keep_last: 2 }, TypeClass::Text, false, "Zoë-125".as_bytes())),
            "***-*25",
            "letters beyond ASCII count as letters"
        );
        assert_eq!(text(run(&Strategy::Partial { keep_last: 2 }, TypeClass::Text, false, "Zoë-1".as_bytes())), "***-*");
    }

    #[test]
    fn hashes_are_stable_keyed_and_typed() {
        let h = Strategy::Hash { hex_len: 16, prefix: "pt_".into() };
        let a = text(run(&h, TypeClass::Text, false, b"Maria Garcia"));
        assert_eq!(a, text(run(&h, TypeClass::Text, true, b"Maria Garcia")), "text and binary agree");
        assert!(a.starts_with("pt_") && a.len() == 19, "{a}");
        assert_ne!(a, text(run(&h, TypeClass::Text, false, b"Maria Garcio")));
        let d = Detectors::new(&[], &[]).unwrap();
        let mac = keyed(b"another key");
        let other_key = Context { mac: &mac, detectors: &d, current_year: 2026 };
        let mut b = Vec::new();
        apply_into(&h, &other_key, &mut d.cache(), CellType { class: TypeClass::Text, binary: false }, b"Maria Garcia", &mut Counts::new(), &mut b).unwrap();
        assert_ne!(a.as_bytes(), b, "the key matters");
        let odd = text(run(&Strategy::Hash { hex_len: 9, prefix: String::new() }, TypeClass::Text, false, b"Maria Garcia"));
        assert_eq!(odd, a[3..12], "an odd length cuts the last digit");
        // Integers: the same pseudonym in text and binary, and a valid int4.
        let t = text(run(&h, TypeClass::Int4, false, b"42"));
        let Masked::Value(bin) = run(&h, TypeClass::Int4, true, &42i32.to_be_bytes()) else { panic!() };
        assert_eq!(i32::from_be_bytes(bin[..].try_into().unwrap()).to_string(), t);
        assert!(t.parse::<i32>().unwrap() > 0);
        let Masked::Value(u) = run(&h, TypeClass::Uuid, true, &[7u8; 16]) else { panic!() };
        assert_eq!(u.len(), 16);
        assert_eq!(run(&h, TypeClass::Date, true, &0i32.to_be_bytes()), Masked::Null);
    }

    #[test]
    fn year_generalises_dates_and_ages() {
        let y = Strategy::Year { ages: true };
        assert_eq!(text(run(&y, TypeClass::Date, false, b"1961-04-17")), "1961-01-01");
        assert_eq!(text(run(&y, TypeClass::Date, false, b"04/17/1961")), "01/01/1961");
        assert_eq!(text(run(&y, TypeClass::Timestamp, false, b"1961-04-17 13:45:12.5+02")), "1961-01-01 00:00:00.0+02");
        assert_eq!(text(run(&y, TypeClass::Date, false, b"1920-06-30")), "1936-01-01", "over 89: clamped to the year of 90");
        // Binary date: days since 2000-01-01.
        let days_1961_04_17: i32 = -14138;
        let Masked::Value(b) = run(&y, TypeClass::Date, true, &days_1961_04_17.to_be_bytes()) else { panic!() };
        assert_eq!(i32::from_be_bytes(b[..].try_into().unwrap()), days_to_new_year(1961));
        assert_eq!(days_to_new_year(2000), 0);
        assert_eq!(days_to_new_year(2001), 366);
        assert_eq!(days_to_new_year(1999), -365);
        assert_eq!(year_of_days(-14138), 1961);
        assert_eq!(year_of_days(365), 2000);
        assert_eq!(year_of_days(366), 2001);
        let micros = i64::from(days_1961_04_17) * 86_400_000_000 + 3_600_000_000;
        let Masked::Value(b) = run(&y, TypeClass::Timestamp, true, &micros.to_be_bytes()) else { panic!() };
        assert_eq!(i64::from_be_bytes(b[..].try_into().unwrap()), i64::from(days_to_new_year(1961)) * 86_400_000_000);
        // timestamptz: noon UTC, 1961 in every zone a client may show it in.
        let Masked::Value(b) = run(&y, TypeClass::of(1184), true, &micros.to_be_bytes()) else { panic!() };
        let noon = i64::from_be_bytes(b[..].try_into().unwrap());
        assert_eq!(noon, i64::from(days_to_new_year(1961)) * 86_400_000_000 + 12 * 3_600_000_000);
        for zone_hours in [-12i64, 14] {
            assert_eq!(year_of_days((noon + zone_hours * 3_600_000_000).div_euclid(86_400_000_000)), 1961, "UTC{zone_hours:+}");
        }
        assert_eq!(text(run(&y, TypeClass::Int4, false, b"93")), "90");
        assert_eq!(run(&y, TypeClass::Int4, false, b"45"), Masked::Same);
        assert_eq!(text(run(&y, TypeClass::Text, false, b"93")), "90+");
        assert_eq!(text(run(&y, TypeClass::Text, false, b"born 4/17/1961")), "1961");
    }

    #[test]
    fn zip3_follows_safe_harbor() {
        assert_eq!(text(run(&Strategy::Zip3, TypeClass::Text, false, b"02139")), "021");
        assert_eq!(text(run(&Strategy::Zip3, TypeClass::Text, false, b"03601-1234")), "000", "restricted prefix");
        assert_eq!(text(run(&Strategy::Zip3, TypeClass::Text, false, b"9")), "000");
    }

    #[test]
    fn detect_scans_text_and_binary_jsonb_only() {
        assert_eq!(text(run(&Strategy::Detect, TypeClass::Text, false, b"call 617-555-0123")), "call [PHONE]");
        let mut jsonb = vec![1u8];
        jsonb.extend_from_slice(br#"{"note": "SSN 123-45-6789"}"#);
        let Masked::Value(v) = run(&Strategy::Detect, TypeClass::Jsonb, true, &jsonb) else { panic!() };
        assert_eq!(v.to_vec(), [&[1u8][..], br#"{"note": "SSN [SSN]"}"#].concat());
        assert_eq!(run(&Strategy::Detect, TypeClass::Int4, true, &1234i32.to_be_bytes()), Masked::Same);
        assert_eq!(run(&Strategy::Detect, TypeClass::Text, false, b"HbA1c 5.5 %"), Masked::Same);
    }
}

#[cfg(test)]
mod reviewed_inputs {
    use super::tests::{try_run, Masked};
    use super::*;

    /// None: unchanged; Some(None): NULL; Some(Some(v)): v.
    fn run(s: &Strategy, class: TypeClass, binary: bool, v: &[u8]) -> Result<Option<Option<Vec<u8>>>, StrategyError> {
        Ok(match try_run(s, class, binary, v)? {
            Masked::Same => None,
            Masked::Null => Some(None),
            Masked::Value(v) => Some(Some(v)),
        })
    }

    #[test]
    fn year_hides_month_and_weekday_in_postgres_datestyle() {
        // `SET datestyle = 'Postgres'` (any client may) makes timestamp/timestamptz
        // text `Mon Apr 17 13:45:12.5 1961` (checked with psql). generalise_date_text
        // zeroes digits only: the month name and weekday pass.
        for v in [&b"Mon Apr 17 13:45:12.5 1961"[..], b"Mon Apr 17 11:45:12.5 1961 UTC"] {
            let out = run(&Strategy::Year { ages: true }, TypeClass::Timestamp, false, v).unwrap();
            let out = String::from_utf8_lossy(out.flatten().as_deref().unwrap_or(b"")).into_owned();
            assert!(!out.contains("Apr") && !out.contains("Mon"), "{out}");
        }
    }

    #[test]
    fn text_like_types_with_a_grammar_get_valid_values_or_null() {
        // json (114) and xml (142) are TypeClass::Text, and jsonb in text format is
        // is_text(): the token, hash, zip3 and partial are written as their value,
        // which is not valid JSON/XML (psycopg json.loads's every json/jsonb cell).
        // "char" (18) is one byte in binary (charsend): a 10-byte token is invalid.
        // In binary jsonb gets NULL for the same rules: the formats disagree.
        let redact = Strategy::Redact { token: "[REDACTED]".into(), null: false };
        let hash = Strategy::Hash { hex_len: 16, prefix: "pt_".into() };
        let mut bad = Vec::new();
        for (what, s, oid, binary, v) in [
            ("json redact", &redact, 114u32, false, &br#"{"ssn":"123-45-6789"}"#[..]),
            ("jsonb text redact", &redact, 3802, false, br#"{"ssn": "123-45-6789"}"#),
            ("json hash", &hash, 114, true, br#""Maria Garcia""#),
            ("json zip3", &Strategy::Zip3, 114, false, b"\"02139\""),
            ("json partial", &Strategy::Partial { keep_last: 4 }, 114, false, br#"{"n": true, "z": 12345}"#),
        ] {
            if let Ok(Some(Some(out))) = run(s, TypeClass::of(oid), binary, v) {
                if serde_json::from_slice::<serde_json::Value>(&out).is_err() {
                    bad.push(format!("{what}: {}", String::from_utf8_lossy(&out)));
                }
            }
        }
        if let Ok(Some(Some(out))) = run(&Strategy::Partial { keep_last: 4 }, TypeClass::of(142), false, b"<name>Maria</name>") {
            if out != b"<name>Maria</name>" && !out.starts_with(b"<name>") {
                bad.push(format!("xml partial: {}", String::from_utf8_lossy(&out)));
            }
        }
        for (what, s) in [("\"char\" redact", &redact), ("\"char\" hash", &hash)] {
            if let Ok(Some(Some(out))) = run(s, TypeClass::of(18), true, b"F") {
                if out.len() != 1 {
                    bad.push(format!("{what}: {} bytes in binary", out.len()));
                }
            }
        }
        assert!(bad.is_empty(), "invalid values of the column's type: {bad:#?}");
    }

    #[test]
    fn binary_array_element_lengths_below_minus_one_are_refused() {
        // array_recv refuses an element length < -1; detect_in_array turns it into
        // a NULL element (-1) and accepts the value.
        let mut v = Vec::new();
        for x in [1i32, 0, 25, 1, 1, -2] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        let r = run(&Strategy::Detect, TypeClass::of(1009), true, &v);
        assert!(r.is_err(), "{r:?}");
    }
}

//! Detectors for HIPAA Safe Harbor identifiers inside free text.
//!
//! One pass over the value with a single combined regular expression (a lazy DFA over
//! bytes, ASCII mode) finds every place an identifier could start; there, each
//! enabled detector's own pattern (anchored) and a validator decide, in priority
//! order, which identifier it is — SSN area/group/serial rules, Luhn for card numbers,
//! Luhn with the `80840` prefix for NPIs, the VIN check digit, calendar dates, NANP
//! telephone numbers, IPv4 octet ranges, IPv6 syntax, digits in configurable ids.
//! Lab values (`5.5 mg/dL`, `120/80`) and ICD-10 codes (`E11.9`) are near misses that
//! must not match. Names are found only where context says so (a title, "patient",
//! ", DOB") and only the name itself is replaced.
//!
//! Pure: no I/O, no configuration files. Each detector can be switched off per profile;
//! the patterns of the configurable identifiers (MRN, health plan, account, licence,
//! device serial) come from the configuration.

use std::{fmt, net::Ipv6Addr, str::FromStr};

use regex_automata::{
    meta::{Cache, Regex},
    Anchored, Input, MatchKind, PatternID, PatternSet,
};

/// The identifier types phigate detects in free text. The names are stable: they
/// appear in configuration, masking summaries and audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Email,
    Url,
    Ssn,
    Card,
    Npi,
    Phone,
    Date,
    Ip,
    Vin,
    Mrn,
    HealthPlan,
    Account,
    License,
    Device,
    Name,
}

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::Email,
        Kind::Url,
        Kind::Ssn,
        Kind::Card,
        Kind::Npi,
        Kind::Phone,
        Kind::Date,
        Kind::Ip,
        Kind::Vin,
        Kind::Mrn,
        Kind::HealthPlan,
        Kind::Account,
        Kind::License,
        Kind::Device,
        Kind::Name,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Url => "url",
            Kind::Ssn => "ssn",
            Kind::Card => "card",
            Kind::Npi => "npi",
            Kind::Phone => "phone",
            Kind::Date => "date",
            Kind::Ip => "ip",
            Kind::Vin => "vin",
            Kind::Mrn => "mrn",
            Kind::HealthPlan => "health_plan",
            Kind::Account => "account",
            Kind::License => "license",
            Kind::Device => "device",
            Kind::Name => "name",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// What replaces a detected identifier.
    pub fn token(self) -> &'static [u8] {
        match self {
            Kind::Email => b"[EMAIL]",
            Kind::Url => b"[URL]",
            Kind::Ssn => b"[SSN]",
            Kind::Card => b"[CARD]",
            Kind::Npi => b"[NPI]",
            Kind::Phone => b"[PHONE]",
            Kind::Date => b"[DATE]",
            Kind::Ip => b"[IP]",
            Kind::Vin => b"[VIN]",
            Kind::Mrn => b"[MRN]",
            Kind::HealthPlan => b"[HEALTH_PLAN]",
            Kind::Account => b"[ACCOUNT]",
            Kind::License => b"[LICENSE]",
            Kind::Device => b"[DEVICE]",
            Kind::Name => b"[NAME]",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

const MONTHS: &str = "(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\\.?";

/// The built-in pattern of each detector (the configurable ones are defaults).
pub fn default_pattern(k: Kind) -> String {
    match k {
        Kind::Email => r"[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}".into(),
        Kind::Url => r#"\b(?:https?|ftp)://[^\s<>"']+|\bwww\.[a-z0-9-]+(?:\.[a-z0-9-]+)+[^\s<>"']*"#.into(),
        Kind::Ssn => r"\b\d{3}[- ]\d{2}[- ]\d{4}\b|\bssn[:# ]*\d{9}\b".into(),
        Kind::Card => r"\b\d(?:[ -]?\d){12,18}\b".into(),
        Kind::Npi => r"\b\d{10}\b".into(),
        Kind::Phone => r"(?:\+?1[-. ]?)?(?:\(\d{3}\)\s?|\b\d{3}[-. ])\d{3}[-. ]\d{4}\b".into(),
        Kind::Date => format!(r"\b\d{{4}}-\d{{2}}-\d{{2}}\b|\b\d{{1,2}}/\d{{1,2}}/\d{{2,4}}\b|\b\d{{1,2}}-\d{{1,2}}-\d{{4}}\b|\b{MONTHS} \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}\b|\b\d{{1,2}} {MONTHS},? \d{{4}}\b"),
        Kind::Ip => r"\b(?:\d{1,3}\.){3}\d{1,3}\b|\b[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}\b".into(),
        Kind::Vin => r"\b[a-hj-npr-z0-9]{17}\b".into(),
        Kind::Mrn => r"\bmrn[-:# ]*[a-z]?\d{5,10}\b".into(),
        Kind::HealthPlan => r"\b(?:member|plan|policy|subscriber|insurance)\s*(?:id|#|no\.?|number)[:# ]*[a-z0-9-]{6,20}\b".into(),
        Kind::Account => r"\b(?:acct|account)\s*(?:#|no\.?|number)?[:# ]*\d{6,17}\b".into(),
        Kind::License => r"\b(?:dl|license|licence)\s*(?:#|no\.?|number)[:# ]*[a-z0-9]{5,15}\b".into(),
        Kind::Device => r"\b(?:s/n|sn|serial)\s*(?:#|no\.?|number)?[:# ]*[a-z0-9][a-z0-9-]{5,20}\b".into(),
        // A capitalised name after a title or "patient", or before ", DOB"; only the
        // name itself is replaced (see `name_span`).
        Kind::Name => r"(?i:\b(?:mr|mrs|ms|miss|dr|prof)\.?)\s+(?:[A-Z][a-zA-Z'-]*[a-z][a-zA-Z'-]*(?:\s+[A-Z][a-zA-Z'-]*[a-z][a-zA-Z'-]*)?)|(?i:\b(?:patient|pt\.?))\s+(?:[A-Z][a-zA-Z'-]*[a-z][a-zA-Z'-]*(?:\s+[A-Z][a-zA-Z'-]*[a-z][a-zA-Z'-]*)?)|\b(?:[A-Z][a-zA-Z'-]*[a-z][a-zA-Z'-]*\s+[A-Z][a-zA-Z'-]*[a-z][a-zA-Z'-]*),\s*(?i:dob|d\.o\.b\.)".into(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("detector {kind}: invalid pattern: {err}")]
pub struct PatternError {
    pub kind: Kind,
    pub err: String,
}

/// A compiled set of detectors.
#[derive(Clone)]
pub struct Detectors {
    /// Every enabled pattern in one multi-pattern automaton (leftmost-first): one pass
    /// finds each candidate and which detector's pattern it is.
    combined: Option<Regex>,
    /// The same patterns matching all at once: which of them match at a position,
    /// when the first one's validator says no.
    all: Option<Regex>,
    /// Each enabled kind, in priority order (the automata's pattern ids index it).
    each: Vec<(Kind, Regex)>,
}

/// Scratch space for searches, one per session: the automata are shared, their
/// caches are not (a shared cache would be a lock on every value).
pub struct DetectCache {
    combined: Option<Cache>,
    all: Option<Cache>,
    each: Vec<Cache>,
    set: PatternSet,
}

impl fmt::Debug for Detectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Detectors({:?})", self.each.iter().map(|(k, _)| *k).collect::<Vec<_>>())
    }
}

fn build_many(patterns: &[String], kind: MatchKind) -> Result<Regex, String> {
    Regex::builder()
        .syntax(regex_automata::util::syntax::Config::new().unicode(false).utf8(false))
        .configure(Regex::config().match_kind(kind).nfa_size_limit(Some(64 << 20)).hybrid_cache_capacity(8 << 20))
        .build_many(patterns)
        .map_err(|e| e.to_string())
}

/// Counts of detected identifiers, by kind.
pub type Counts = std::collections::BTreeMap<Kind, u64>;

impl Detectors {
    /// Compile `enabled` detectors; `patterns` overrides the default pattern of a kind.
    pub fn new(enabled: &[Kind], patterns: &[(Kind, String)]) -> Result<Self, PatternError> {
        let mut each = Vec::new();
        let mut all = Vec::new();
        for k in Kind::ALL.into_iter().filter(|k| enabled.contains(k)) {
            let pattern = patterns.iter().find(|(pk, _)| *pk == k).map(|(_, p)| p.clone()).unwrap_or_else(|| default_pattern(k));
            // Names depend on capitalisation (their pattern says where case is
            // ignored); everything else ignores case.
            let flags = if k == Kind::Name { "(?:" } else { "(?i:" };
            let full = format!("{flags}{pattern})");
            let one = build_many(std::slice::from_ref(&full), MatchKind::LeftmostFirst).map_err(|err| PatternError { kind: k, err })?;
            all.push(full);
            each.push((k, one));
        }
        let (combined, every) = if all.is_empty() {
            (None, None)
        } else {
            let first = each.first().map(|(k, _)| *k).unwrap_or(Kind::Email);
            let c = build_many(&all, MatchKind::LeftmostFirst).map_err(|err| PatternError { kind: first, err })?;
            let a = build_many(&all, MatchKind::All).map_err(|err| PatternError { kind: first, err })?;
            (Some(c), Some(a))
        };
        Ok(Self { combined, all: every, each })
    }

    pub fn is_empty(&self) -> bool {
        self.combined.is_none()
    }

    /// Scratch space for [`Detectors::scan_with`].
    pub fn cache(&self) -> DetectCache {
        DetectCache {
            combined: self.combined.as_ref().map(Regex::create_cache),
            all: self.all.as_ref().map(Regex::create_cache),
            each: self.each.iter().map(|(_, r)| r.create_cache()).collect(),
            set: PatternSet::new(self.each.len()),
        }
    }

    /// [`Detectors::scan_with`] with a fresh cache (tests, rare paths).
    pub fn scan(&self, text: &[u8], counts: &mut Counts) -> Option<Vec<u8>> {
        self.scan_with(&mut self.cache(), text, counts)
    }

    /// Replace every identifier in `text`; `None` when nothing was found (the value
    /// passes through untouched, without a copy).
    pub fn scan_with(&self, cache: &mut DetectCache, text: &[u8], counts: &mut Counts) -> Option<Vec<u8>> {
        let re = self.combined.as_ref()?;
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        let mut at = 0;
        while at < text.len() {
            let Some(m) = re.search_with(cache.combined.as_mut().expect("invariant: a cache per automaton"), &Input::new(text).range(at..)) else { break };
            let s = m.start();
            let Some((kind, start, end, past)) = self.identify(cache, text, s, m.pattern().as_usize(), m.end()) else {
                // No identifier a validator accepts starts here (a 16-digit number that
                // fails Luhn, …): look again one byte on.
                at = s + 1;
                continue;
            };
            let buf = out.get_or_insert_with(|| Vec::with_capacity(text.len()));
            buf.extend_from_slice(&text[copied..start]);
            buf.extend_from_slice(kind.token());
            copied = end;
            *counts.entry(kind).or_insert(0) += 1;
            at = past.max(s + 1);
        }
        let mut buf = out?;
        buf.extend_from_slice(&text[copied..]);
        Some(buf)
    }

    /// Which identifier starts at `s`: first the detector whose pattern the automaton
    /// matched (`first`, ending at `end`), then the other detectors whose patterns
    /// match there, in priority order. Returns (kind, replaced span, end of the match).
    fn identify(&self, cache: &mut DetectCache, text: &[u8], s: usize, first: usize, end: usize) -> Option<(Kind, usize, usize, usize)> {
        let accept = |kind: Kind, e: usize| -> Option<(Kind, usize, usize, usize)> {
            let m = &text[s..e];
            if e == s {
                return None;
            }
            if kind == Kind::Name {
                let (a, b) = name_span(m);
                return Some((Kind::Name, s + a, s + b, e));
            }
            valid(kind, m).then_some((kind, s, e, e))
        };
        if let Some(hit) = accept(self.each[first].0, end) {
            return Some(hit);
        }
        // Anchored at `s`, `\b` still sees the byte before it.
        let here = Input::new(text).range(s..).anchored(Anchored::Yes);
        cache.set.clear();
        self.all.as_ref()?.which_overlapping_matches_with(cache.all.as_mut().expect("invariant: a cache per automaton"), &here, &mut cache.set);
        for i in (0..self.each.len()).filter(|i| *i != first && cache.set.contains(PatternID::must(*i))) {
            let (kind, re) = &self.each[i];
            if let Some(m) = re.search_with(&mut cache.each[i], &here) {
                if let Some(hit) = accept(*kind, m.end()) {
                    return Some(hit);
                }
            }
        }
        None
    }
}

/// The name inside a name match: before ", DOB", or after the title / "patient"
/// (found by hand: capture groups would cost a second, slower search).
fn name_span(m: &[u8]) -> (usize, usize) {
    let ends_with = |suffix: &[u8]| m.len() >= suffix.len() && m[m.len() - suffix.len()..].eq_ignore_ascii_case(suffix);
    if ends_with(b"dob") || ends_with(b"d.o.b.") {
        let comma = m.iter().rposition(|b| *b == b',').unwrap_or(m.len());
        return (0, comma);
    }
    match m.iter().position(u8::is_ascii_whitespace) {
        Some(ws) => {
            let start = ws + m[ws..].iter().take_while(|b| b.is_ascii_whitespace()).count();
            (start, m.len())
        }
        None => (0, m.len()),
    }
}

/// The decimal digits of a candidate, as values (inline: validators run on every
/// candidate the automaton finds, so no allocation).
fn digits(s: &[u8]) -> smallvec::SmallVec<[u8; 24]> {
    s.iter().filter(|b| b.is_ascii_digit()).map(|b| b - b'0').collect()
}

/// The Luhn checksum over decimal digits.
pub fn luhn(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &x) in d.iter().rev().enumerate() {
        let mut v = u32::from(x);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    !d.is_empty() && sum.is_multiple_of(10)
}

/// SSA rules: area not 000, 666 or 900-999; group not 00; serial not 0000.
pub fn valid_ssn(d: &[u8]) -> bool {
    if d.len() != 9 {
        return false;
    }
    let n = |r: std::ops::Range<usize>| d[r].iter().fold(0u32, |a, &x| a * 10 + u32::from(x));
    let (area, group, serial) = (n(0..3), n(3..5), n(5..9));
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// NPIs are Luhn-valid after prefixing the card issuer code 80840.
pub fn valid_npi(d: &[u8]) -> bool {
    if d.len() != 10 || !(d[0] == 1 || d[0] == 2) {
        return false;
    }
    let mut full = [8, 0, 8, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    full[5..].copy_from_slice(d);
    luhn(&full)
}

/// The ISO 3779 check digit (position 9).
pub fn valid_vin(s: &[u8]) -> bool {
    if s.len() != 17 {
        return false;
    }
    let value = |c: u8| -> Option<u32> {
        let c = c.to_ascii_uppercase();
        Some(match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A' | b'J' => 1,
            b'B' | b'K' | b'S' => 2,
            b'C' | b'L' | b'T' => 3,
            b'D' | b'M' | b'U' => 4,
            b'E' | b'N' | b'V' => 5,
            b'F' | b'W' => 6,
            b'G' | b'P' | b'X' => 7,
            b'H' | b'Y' => 8,
            b'R' | b'Z' => 9,
            _ => return None,
        })
    };
    const WEIGHTS: [u32; 17] = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2];
    // A run of 17 digits is far more likely an account number than a VIN.
    if s.iter().all(u8::is_ascii_digit) || !s.iter().any(u8::is_ascii_digit) {
        return false;
    }
    let mut sum = 0;
    for (i, &c) in s.iter().enumerate() {
        let Some(v) = value(c) else { return false };
        sum += v * WEIGHTS[i];
    }
    let check = match sum % 11 {
        10 => b'X',
        r => b'0' + r as u8,
    };
    s[8].to_ascii_uppercase() == check
}

fn valid_date(s: &[u8]) -> bool {
    // The numbers in the candidate (at most three matter), without allocating.
    let mut nums = [0u32; 3];
    let mut count = 0;
    let mut current: Option<u32> = None;
    for &b in s.iter().chain(std::iter::once(&b' ')) {
        if b.is_ascii_digit() {
            current = Some(current.unwrap_or(0).saturating_mul(10).saturating_add(u32::from(b - b'0')));
        } else if let Some(n) = current.take() {
            if count == nums.len() {
                return false;
            }
            nums[count] = n;
            count += 1;
        }
    }
    let year_ok = |y: u32| (1900..=2100).contains(&y) || y < 100;
    let second_word_alpha = s.split(u8::is_ascii_whitespace).filter(|w| !w.is_empty()).nth(1).is_some_and(|w| w[0].is_ascii_alphabetic());
    let has_month_name = s.first().is_some_and(u8::is_ascii_alphabetic) || second_word_alpha;
    match &nums[..count] {
        [a, b, c] if s.len() >= 5 && s[4] == b'-' => year_ok(*a) && (1..=12).contains(b) && (1..=31).contains(c),
        [a, b, c] => (1..=12).contains(a) && (1..=31).contains(b) && year_ok(*c),
        [a, b] if has_month_name => ((1..=31).contains(a) && year_ok(*b)) || ((1..=31).contains(b) && year_ok(*a)),
        _ => false,
    }
}

fn valid_phone(s: &[u8]) -> bool {
    let d = digits(s);
    let d = if d.len() == 11 && d[0] == 1 { &d[1..] } else { &d[..] };
    // NANP: area code and exchange start with 2-9.
    d.len() == 10 && d[0] >= 2 && d[3] >= 2
}

fn valid_ip(s: &[u8]) -> bool {
    let text = std::str::from_utf8(s).unwrap_or("");
    if text.contains('.') {
        let parts: Vec<&str> = text.split('.').collect();
        return parts.len() == 4 && parts.iter().all(|p| p.parse::<u16>().is_ok_and(|v| v <= 255));
    }
    text.matches(':').count() >= 2 && Ipv6Addr::from_str(text).is_ok()
}

fn valid(k: Kind, s: &[u8]) -> bool {
    match k {
        Kind::Ssn => valid_ssn(&digits(s)),
        Kind::Card => {
            let d = digits(s);
            (13..=19).contains(&d.len()) && luhn(&d)
        }
        Kind::Npi => valid_npi(&digits(s)),
        Kind::Vin => valid_vin(s),
        Kind::Date => valid_date(s),
        Kind::Phone => valid_phone(s),
        Kind::Ip => valid_ip(s),
        // "serial number unknown", "member of the team": an identifier has digits.
        Kind::HealthPlan | Kind::Account | Kind::License | Kind::Device | Kind::Mrn => s.iter().filter(|b| b.is_ascii_digit()).count() >= 2,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Detectors {
        Detectors::new(&Kind::ALL, &[]).unwrap()
    }

    fn found(text: &str) -> Vec<Kind> {
        let mut c = Counts::new();
        all().scan(text.as_bytes(), &mut c);
        c.into_iter().flat_map(|(k, n)| std::iter::repeat_n(k, n as usize)).collect()
    }

    fn masked(text: &str) -> String {
        let mut c = Counts::new();
        all().scan(text.as_bytes(), &mut c).map(|v| String::from_utf8(v).unwrap()).unwrap_or_else(|| text.to_string())
    }

    #[test]
    fn positives() {
        let cases: &[(&str, Kind)] = &[
            ("write to jane.doe@example.org today", Kind::Email),
            ("see https://portal.example.com/p/123 please", Kind::Url),
            ("or www.example.com/records", Kind::Url),
            ("SSN 123-45-6789 on file", Kind::Ssn),
            ("ssn: 123456789", Kind::Ssn),
            ("card 4111 1111 1111 1111 expired", Kind::Card),
            ("paid with 5500-0000-0000-0004", Kind::Card),
            ("referring NPI 1234567893", Kind::Npi),
            ("call (617) 555-0123 after 5", Kind::Phone),
            ("fax 617-555-0199", Kind::Phone),
            ("cell +1 212.555.0147", Kind::Phone),
            ("seen on 2023-04-17 for follow-up", Kind::Date),
            ("born 4/17/1961", Kind::Date),
            ("admitted March 3, 2021", Kind::Date),
            ("discharged 3 Mar 2021", Kind::Date),
            ("login from 203.0.113.34", Kind::Ip),
            ("client 2001:db8::ff00:42:8329", Kind::Ip),
            ("vehicle VIN 1M8GDM9AXKP042788 towed", Kind::Vin),
            ("MRN 00123456 transferred", Kind::Mrn),
            ("member id: XYZ12345678", Kind::HealthPlan),
            ("account # 1234567890", Kind::Account),
            ("license no. D1234567", Kind::License),
            ("pump serial: PX-4471-Z9", Kind::Device),
            ("Mr. John Smith reports pain", Kind::Name),
            ("patient Maria Garcia was seen", Kind::Name),
            ("Ada Quill, DOB on file", Kind::Name),
        ];
        for (text, kind) in cases {
            assert!(found(text).contains(kind), "{kind} not found in {text:?}: {:?}", found(text));
        }
    }

    #[test]
    fn near_misses_are_left_alone() {
        for text in [
            "HbA1c 5.5 %, glucose 5.5 mg/dL",
            "BP 120/80, HR 72",
            "dx E11.9 and I10, ICD-10 Z79.4",
            "A1C 7.2 on metformin 500 mg BID",
            "invalid SSN 000-12-3456 and 666-12-3456 and 123-00-4567",
            "number 4111 1111 1111 1112 fails Luhn",
            "NPI 1234567890 fails its check digit",
            "ratio 3/4 of dose",
            "score 13-14-2000 is not a date: 13 is no month",
            "version 1.2.300.4",
            "time 10:30:00 on the ward",
            "the patient was stable",
            "ABCDEFGHJKLMNPRST is no VIN",
            "12345678901234567 is all digits",
            // one near miss (or more) per detector
            "write to user at example dot com, or @handle, or a@b",
            "http:/broken and www. example",
            "SSN 123-45-678 is short; 900-12-3456 is not issued",
            "card 4111 1111 is too short",
            "NPI 3234567893 starts with 3",
            "call 123-555-0123 or 617-155-0123 or 555-0123",
            "dates 13/45/2020 and 2020-13-01 and 99/99/99",
            "addresses 999.1.1.1 and 1.2.3",
            "VIN 1M8GDM9A1KP042788 fails its check digit; 1M8GDM9AXKP04278 is short",
            "MRN pending, mrn 123",
            "member of the care team; plan id: abc",
            "account manager; acct 123",
            "licensed nurse; license no. A1",
            "serial number unknown",
            "mr smith and Patient SSN pending",
        ] {
            assert_eq!(masked(text), text, "{text}");
        }
    }

    #[test]
    fn replacement_keeps_the_surrounding_text() {
        assert_eq!(masked("Mr. John Smith, SSN 123-45-6789, call 617-555-0123"), "Mr. [NAME], SSN [SSN], call [PHONE]");
        assert_eq!(masked("patient Maria Garcia"), "patient [NAME]");
        assert_eq!(masked("no identifiers here"), "no identifiers here");
    }

    #[test]
    fn validators() {
        assert!(luhn(&digits(b"4111111111111111")));
        assert!(!luhn(&digits(b"4111111111111112")));
        assert!(valid_npi(&digits(b"1234567893")));
        assert!(!valid_npi(&digits(b"1234567890")));
        assert!(valid_vin(b"1M8GDM9AXKP042788"));
        assert!(!valid_vin(b"1M8GDM9A1KP042788"));
        assert!(valid_ssn(&digits(b"123-45-6789")));
        assert!(!valid_ssn(&digits(b"900-45-6789")));
    }

    #[test]
    fn detectors_can_be_switched_off_and_patterns_replaced() {
        let only_email = Detectors::new(&[Kind::Email], &[]).unwrap();
        let mut c = Counts::new();
        assert_eq!(only_email.scan(b"SSN 123-45-6789", &mut c), None);
        let custom = Detectors::new(&[Kind::Mrn], &[(Kind::Mrn, r"\bchart-\d{4}\b".into())]).unwrap();
        assert_eq!(custom.scan(b"chart-1234 done", &mut c).as_deref(), Some(&b"[MRN] done"[..]));
        assert!(Detectors::new(&[Kind::Mrn], &[(Kind::Mrn, "(".into())]).is_err());
    }
}

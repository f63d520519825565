//! PostgreSQL errors: the ErrorResponse phigate sends when it refuses something, and
//! the fields of one it receives.

use std::fmt;

use super::frame::Frame;

/// A SQLSTATE code.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState(pub [u8; 5]);

impl SqlState {
    pub const fn new(code: &[u8; 5]) -> Self {
        Self(*code)
    }
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("XX000")
    }

    pub const CONNECTION_FAILURE: Self = Self::new(b"08006");
    pub const PROTOCOL_VIOLATION: Self = Self::new(b"08P01");
    pub const INVALID_AUTHORIZATION: Self = Self::new(b"28000");
    pub const INVALID_PASSWORD: Self = Self::new(b"28P01");
    pub const INSUFFICIENT_PRIVILEGE: Self = Self::new(b"42501");
    pub const PROGRAM_LIMIT_EXCEEDED: Self = Self::new(b"54000");
    pub const FEATURE_NOT_SUPPORTED: Self = Self::new(b"0A000");
    pub const QUERY_CANCELED: Self = Self::new(b"57014");
    pub const ADMIN_SHUTDOWN: Self = Self::new(b"57P01");
    pub const CANNOT_CONNECT_NOW: Self = Self::new(b"57P03");
    pub const INTERNAL_ERROR: Self = Self::new(b"XX000");
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Notice,
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Self::Notice => "NOTICE",
            Self::Error => "ERROR",
            Self::Fatal => "FATAL",
        }
    }
}

/// An error phigate reports to a client (its own text, never row data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    pub code: SqlState,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    /// A FATAL error: the session ends after it.
    pub fn fatal(code: SqlState, message: impl Into<String>) -> Self {
        Self { severity: Severity::Fatal, code, message: message.into(), detail: None, hint: None }
    }

    /// An ERROR: the statement fails, the session continues.
    pub fn error(code: SqlState, message: impl Into<String>) -> Self {
        Self { severity: Severity::Error, code, message: message.into(), detail: None, hint: None }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// A NOTICE: informational, sent at any time.
    pub fn notice(message: impl Into<String>) -> Self {
        Self { severity: Severity::Notice, code: SqlState::new(b"00000"), message: message.into(), detail: None, hint: None }
    }

    /// The ErrorResponse ('E') frame, or NoticeResponse ('N') for a notice.
    pub fn to_frame(&self) -> Frame {
        let mut body = Vec::with_capacity(64 + self.message.len());
        let mut field = |t: u8, v: &str| {
            body.push(t);
            // NUL would end the field early; phigate's own texts never contain one.
            body.extend(v.bytes().filter(|&b| b != 0));
            body.push(0);
        };
        field(b'S', self.severity.as_str());
        field(b'V', self.severity.as_str());
        field(b'C', self.code.as_str());
        field(b'M', &self.message);
        if let Some(d) = &self.detail {
            field(b'D', d);
        }
        if let Some(h) = &self.hint {
            field(b'H', h);
        }
        body.push(0);
        Frame::build(if self.severity == Severity::Notice { b'N' } else { b'E' }, &body)
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity.as_str(), self.code, self.message)
    }
}

/// The fields of an ErrorResponse or NoticeResponse a server sent.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ReceivedError {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl fmt::Debug for ReceivedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The message may quote data (e.g. a duplicate key); show only the code.
        write!(f, "ReceivedError({} {})", self.severity, self.code)
    }
}

/// Parse the severity, SQLSTATE and message of an ErrorResponse/NoticeResponse body.
pub fn parse_error_fields(body: &[u8]) -> ReceivedError {
    let mut out = ReceivedError::default();
    let mut rest = body;
    while let Some((&t, tail)) = rest.split_first() {
        if t == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match t {
            b'V' => out.severity = value,
            b'S' if out.severity.is_empty() => out.severity = value,
            b'C' => out.code = value,
            b'M' => out.message = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    out
}

/// Text that may quote what a statement or a row held (a server's error, a refusal
/// built from one), made fit for the agent's log: double-quoted parts become `"…"`
/// and runs of three or more digits `#`s. PHI never reaches the log.
pub fn log_safe(text: &str) -> String {
    let mut unquoted = String::with_capacity(text.len());
    for (i, part) in text.split('"').enumerate() {
        match i {
            0 => unquoted.push_str(part),
            // Odd parts are inside quotes.
            _ if i % 2 == 1 => unquoted.push_str("\"…\""),
            _ => unquoted.push_str(part),
        }
    }
    hide_long_numbers(&unquoted)
}

/// Runs of three or more ASCII digits as `#`s (an SSN, an MRN, a date's year): what an
/// error echoes of a value, where shorter numbers (positions, ranges) help the reader.
pub fn hide_long_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut digits = 0;
    for (i, c) in text.char_indices() {
        if c.is_ascii_digit() {
            digits += 1;
            continue;
        }
        push_digits(&mut out, &text[i - digits..i]);
        digits = 0;
        out.push(c);
    }
    push_digits(&mut out, &text[text.len() - digits..]);
    out
}

fn push_digits(out: &mut String, run: &str) {
    if run.len() >= 3 {
        out.extend(std::iter::repeat_n('#', run.len()));
    } else {
        out.push_str(run);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_safe_text_keeps_no_quoted_value_and_no_long_number() {
        let t = log_safe(r#"cannot describe the COPY's columns: date/time field value out of range: "31/12/1980"; index 710571746 out of range 0..7"#);
        assert_eq!(t, r#"cannot describe the COPY's columns: date/time field value out of range: "…"; index ######### out of range 0..7"#);
        assert_eq!(log_safe(r#"unterminated "Maria"#), r#"unterminated "…""#);
    }

    use super::*;

    #[test]
    fn error_response_round_trips() {
        let e = PgError::fatal(SqlState::INVALID_AUTHORIZATION, "phigate refused the connection").with_hint("do X");
        let f = e.to_frame();
        assert_eq!(f.tag(), b'E');
        let r = parse_error_fields(f.body());
        assert_eq!(r.severity, "FATAL");
        assert_eq!(r.code, "28000");
        assert_eq!(r.message, "phigate refused the connection");
    }

    #[test]
    fn parsing_tolerates_garbage() {
        let r = parse_error_fields(b"Cxx");
        assert_eq!(r.code, "xx");
        let r = parse_error_fields(b"");
        assert_eq!(r, ReceivedError::default());
    }
}

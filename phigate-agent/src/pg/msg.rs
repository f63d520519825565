//! The messages phigate itself builds (authentication exchange, session start) and
//! the ones it must read (authentication requests, BackendKeyData, ReadyForQuery).
//! Everything else passes through as raw frames.

use super::frame::{take_cstr, take_i16, take_i32, Frame, FrameError};

/// Message type bytes phigate refers to by name.
pub mod tag {
    // frontend
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const EXECUTE: u8 = b'E';
    pub const DESCRIBE: u8 = b'D';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const PASSWORD: u8 = b'p';
    pub const TERMINATE: u8 = b'X';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    // backend
    pub const AUTHENTICATION: u8 = b'R';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION: u8 = b'A';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const DATA_ROW: u8 = b'D';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
}

// ---- backend messages phigate sends to clients ------------------------------------

pub fn auth_ok() -> Frame {
    Frame::build(tag::AUTHENTICATION, &0i32.to_be_bytes())
}

pub fn auth_cleartext_password() -> Frame {
    Frame::build(tag::AUTHENTICATION, &3i32.to_be_bytes())
}

pub fn auth_sasl(mechanisms: &[&str]) -> Frame {
    let mut body = 10i32.to_be_bytes().to_vec();
    for m in mechanisms {
        body.extend_from_slice(m.as_bytes());
        body.push(0);
    }
    body.push(0);
    Frame::build(tag::AUTHENTICATION, &body)
}

pub fn auth_sasl_continue(data: &[u8]) -> Frame {
    let mut body = 11i32.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    Frame::build(tag::AUTHENTICATION, &body)
}

pub fn auth_sasl_final(data: &[u8]) -> Frame {
    let mut body = 12i32.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    Frame::build(tag::AUTHENTICATION, &body)
}

pub fn backend_key_data(pid: u32, key: u32) -> Frame {
    let mut body = pid.to_be_bytes().to_vec();
    body.extend_from_slice(&key.to_be_bytes());
    Frame::build(tag::BACKEND_KEY_DATA, &body)
}

pub fn parameter_status(name: &str, value: &str) -> Frame {
    let mut body = Vec::with_capacity(name.len() + value.len() + 2);
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(value.as_bytes());
    body.push(0);
    Frame::build(tag::PARAMETER_STATUS, &body)
}

pub fn ready_for_query(status: u8) -> Frame {
    Frame::build(tag::READY_FOR_QUERY, &[status])
}

/// NegotiateProtocolVersion: the newest minor version phigate speaks (0) and the
/// protocol options (`_pq_.*`) it did not recognise.
pub fn negotiate_protocol_version(newest_minor: u32, unrecognized: &[&str]) -> Frame {
    let mut body = newest_minor.to_be_bytes().to_vec();
    body.extend_from_slice(&(unrecognized.len() as u32).to_be_bytes());
    for o in unrecognized {
        body.extend_from_slice(o.as_bytes());
        body.push(0);
    }
    Frame::build(tag::NEGOTIATE_PROTOCOL_VERSION, &body)
}

// ---- frontend messages phigate sends to servers -----------------------------------

pub fn password_message(password: &[u8]) -> Frame {
    let mut body = password.to_vec();
    body.push(0);
    Frame::build(tag::PASSWORD, &body)
}

pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Frame {
    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&(data.len() as i32).to_be_bytes());
    body.extend_from_slice(data);
    Frame::build(tag::PASSWORD, &body)
}

pub fn sasl_response(data: &[u8]) -> Frame {
    Frame::build(tag::PASSWORD, data)
}

pub fn terminate() -> Frame {
    Frame::build(tag::TERMINATE, &[])
}

// ---- parsing ------------------------------------------------------------------------

/// An authentication request from a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue(Vec<u8>),
    SaslFinal(Vec<u8>),
    /// Kerberos, GSS, SSPI …: methods phigate does not use upstream.
    Unsupported(i32),
}

pub fn parse_auth_request(body: &[u8]) -> Result<AuthRequest, FrameError> {
    let mut rest = body;
    let code = take_i32(&mut rest, "Authentication")?;
    Ok(match code {
        0 => AuthRequest::Ok,
        3 => AuthRequest::CleartextPassword,
        5 => {
            let salt: [u8; 4] =
                rest.get(..4).and_then(|s| s.try_into().ok()).ok_or(FrameError::Malformed { what: "AuthenticationMD5Password", why: "no salt".into() })?;
            AuthRequest::Md5Password { salt }
        }
        10 => {
            let mut mechanisms = Vec::new();
            while rest.first().is_some_and(|&b| b != 0) {
                mechanisms.push(take_cstr(&mut rest, "AuthenticationSASL")?.to_string());
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(rest.to_vec()),
        12 => AuthRequest::SaslFinal(rest.to_vec()),
        other => AuthRequest::Unsupported(other),
    })
}

/// The pid and secret key of a BackendKeyData body (3.0: 4-byte key).
pub fn parse_backend_key_data(body: &[u8]) -> Result<(u32, Vec<u8>), FrameError> {
    if body.len() < 8 {
        return Err(FrameError::Malformed { what: "BackendKeyData", why: "truncated".into() });
    }
    Ok((u32::from_be_bytes([body[0], body[1], body[2], body[3]]), body[4..].to_vec()))
}

/// A ParameterStatus body.
pub fn parse_parameter_status(body: &[u8]) -> Result<(String, String), FrameError> {
    let mut rest = body;
    let k = take_cstr(&mut rest, "ParameterStatus")?.to_string();
    let v = take_cstr(&mut rest, "ParameterStatus")?.to_string();
    Ok((k, v))
}

/// A client's PasswordMessage holding a cleartext password (or token).
pub fn parse_password(body: &[u8]) -> Result<&str, FrameError> {
    let mut rest = body;
    take_cstr(&mut rest, "PasswordMessage")
}

/// A client's SASLInitialResponse: mechanism and initial data.
pub fn parse_sasl_initial_response(body: &[u8]) -> Result<(&str, &[u8]), FrameError> {
    let mut rest = body;
    let mechanism = take_cstr(&mut rest, "SASLInitialResponse")?;
    let len = take_i32(&mut rest, "SASLInitialResponse")?;
    if len < 0 {
        return Ok((mechanism, &[]));
    }
    let data = rest.get(..len as usize).ok_or(FrameError::Malformed { what: "SASLInitialResponse", why: "data shorter than its length".into() })?;
    Ok((mechanism, data))
}

// ---- query-flow messages (masking and audit read these) ---------------------------

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// The table's OID when the column is a plain column of a table or view, else 0.
    pub table_oid: u32,
    /// Its attribute number in that table, else 0.
    pub column: i16,
    pub type_oid: u32,
    pub type_len: i16,
    pub type_mod: i32,
    /// 0 text, 1 binary.
    pub format: i16,
}

pub fn parse_row_description(body: &[u8]) -> Result<Vec<Field>, FrameError> {
    let mut rest = body;
    let n = take_i16(&mut rest, "RowDescription")?;
    let mut fields = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n.max(0) {
        let name = take_cstr(&mut rest, "RowDescription")?.to_string();
        let table_oid = take_i32(&mut rest, "RowDescription")? as u32;
        let column = take_i16(&mut rest, "RowDescription")?;
        let type_oid = take_i32(&mut rest, "RowDescription")? as u32;
        let type_len = take_i16(&mut rest, "RowDescription")?;
        let type_mod = take_i32(&mut rest, "RowDescription")?;
        let format = take_i16(&mut rest, "RowDescription")?;
        fields.push(Field { name, table_oid, column, type_oid, type_len, type_mod, format });
    }
    Ok(fields)
}

/// The cells of a DataRow: `None` is SQL NULL. Borrowed from the frame; no copy.
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, FrameError> {
    let mut rest = body;
    let n = take_i16(&mut rest, "DataRow")?;
    let mut cells = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n.max(0) {
        let len = take_i32(&mut rest, "DataRow")?;
        if len < 0 {
            cells.push(None);
            continue;
        }
        let len = len as usize;
        if rest.len() < len {
            return Err(FrameError::Malformed { what: "DataRow", why: "a value is longer than the message".into() });
        }
        cells.push(Some(&rest[..len]));
        rest = &rest[len..];
    }
    if !rest.is_empty() {
        return Err(FrameError::Malformed { what: "DataRow", why: "bytes after the last value".into() });
    }
    Ok(cells)
}

/// The cells of a DataRow one by one, without collecting them: the count from the
/// header, then each value (`None` is NULL). Errors if a length lies.
pub struct Cells<'a> {
    rest: &'a [u8],
    left: usize,
}

impl<'a> Cells<'a> {
    pub fn new(body: &'a [u8]) -> Result<Self, FrameError> {
        let mut rest = body;
        let n = take_i16(&mut rest, "DataRow")?;
        Ok(Self { rest, left: n.max(0) as usize })
    }

    pub fn count(&self) -> usize {
        self.left
    }

    pub fn next_cell(&mut self) -> Result<Option<Option<&'a [u8]>>, FrameError> {
        if self.left == 0 {
            if !self.rest.is_empty() {
                return Err(FrameError::Malformed { what: "DataRow", why: "bytes after the last value".into() });
            }
            return Ok(None);
        }
        self.left -= 1;
        let len = take_i32(&mut self.rest, "DataRow")?;
        if len < 0 {
            return Ok(Some(None));
        }
        let len = len as usize;
        if self.rest.len() < len {
            return Err(FrameError::Malformed { what: "DataRow", why: "a value is longer than the message".into() });
        }
        let (v, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(Some(Some(v)))
    }
}

/// Build a DataRow message from cells into `out` (cleared first).
pub fn encode_data_row<'a>(cells: impl ExactSizeIterator<Item = Option<&'a [u8]>>, out: &mut Vec<u8>) {
    begin_data_row(out, cells.len());
    for c in cells {
        match c {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    finish_data_row(out);
}

/// Start a DataRow message of `cells` cells in `out` (cleared first). The cells follow
/// (each a length, -1 for NULL, and its bytes), then [`finish_data_row`].
pub fn begin_data_row(out: &mut Vec<u8>, cells: usize) {
    out.clear();
    out.push(tag::DATA_ROW);
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&(cells as i16).to_be_bytes());
}

/// Write the length of the DataRow [`begin_data_row`] started in `out`.
pub fn finish_data_row(out: &mut [u8]) {
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
}

/// A RowDescription message with these fields (what [`parse_row_description`] reads).
pub fn row_description(fields: &[Field]) -> Frame {
    let mut b = (fields.len() as i16).to_be_bytes().to_vec();
    for f in fields {
        b.extend_from_slice(f.name.as_bytes());
        b.push(0);
        b.extend_from_slice(&f.table_oid.to_be_bytes());
        b.extend_from_slice(&f.column.to_be_bytes());
        b.extend_from_slice(&f.type_oid.to_be_bytes());
        b.extend_from_slice(&f.type_len.to_be_bytes());
        b.extend_from_slice(&f.type_mod.to_be_bytes());
        b.extend_from_slice(&f.format.to_be_bytes());
    }
    Frame::build(tag::ROW_DESCRIPTION, &b)
}

/// Parse: statement name and query text.
pub fn parse_parse(body: &[u8]) -> Result<(&str, &str), FrameError> {
    let mut rest = body;
    let name = take_cstr(&mut rest, "Parse")?;
    let sql = take_cstr(&mut rest, "Parse")?;
    Ok((name, sql))
}

/// Bind: portal, statement and the result-column format codes (empty: all text; one:
/// all that one; else one per column).
pub fn parse_bind(body: &[u8]) -> Result<(&str, &str, Vec<i16>), FrameError> {
    let mut rest = body;
    let portal = take_cstr(&mut rest, "Bind")?;
    let statement = take_cstr(&mut rest, "Bind")?;
    let nfmt = take_i16(&mut rest, "Bind")?;
    for _ in 0..nfmt.max(0) {
        take_i16(&mut rest, "Bind")?;
    }
    let nparams = take_i16(&mut rest, "Bind")?;
    for _ in 0..nparams.max(0) {
        let len = take_i32(&mut rest, "Bind")?;
        if len > 0 {
            let len = len as usize;
            if rest.len() < len {
                return Err(FrameError::Malformed { what: "Bind", why: "a parameter is longer than the message".into() });
            }
            rest = &rest[len..];
        }
    }
    let nres = take_i16(&mut rest, "Bind")?;
    let mut formats = Vec::with_capacity(nres.max(0) as usize);
    for _ in 0..nres.max(0) {
        formats.push(take_i16(&mut rest, "Bind")?);
    }
    Ok((portal, statement, formats))
}

/// The format codes and the values (`None` is NULL) of a Bind's parameters.
pub type BoundParameters<'a> = (Vec<i16>, Vec<Option<&'a [u8]>>);

/// The bound parameter values of a Bind (`None` is NULL), with their format codes.
pub fn bind_parameters(body: &[u8]) -> Result<BoundParameters<'_>, FrameError> {
    let mut rest = body;
    take_cstr(&mut rest, "Bind")?;
    take_cstr(&mut rest, "Bind")?;
    let nfmt = take_i16(&mut rest, "Bind")?;
    let mut formats = Vec::with_capacity(nfmt.max(0) as usize);
    for _ in 0..nfmt.max(0) {
        formats.push(take_i16(&mut rest, "Bind")?);
    }
    let nparams = take_i16(&mut rest, "Bind")?;
    let mut values = Vec::with_capacity(nparams.max(0) as usize);
    for _ in 0..nparams.max(0) {
        let len = take_i32(&mut rest, "Bind")?;
        if len < 0 {
            values.push(None);
            continue;
        }
        let len = len as usize;
        if rest.len() < len {
            return Err(FrameError::Malformed { what: "Bind", why: "a parameter is longer than the message".into() });
        }
        values.push(Some(&rest[..len]));
        rest = &rest[len..];
    }
    Ok((formats, values))
}

/// Describe or Close: `S` (statement) or `P` (portal), and the name.
pub fn parse_target<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a str), FrameError> {
    let (&kind, mut rest) = body.split_first().ok_or(FrameError::Malformed { what, why: "empty".into() })?;
    let name = take_cstr(&mut rest, what)?;
    Ok((kind, name))
}

/// Execute: portal name.
pub fn parse_execute(body: &[u8]) -> Result<&str, FrameError> {
    let mut rest = body;
    take_cstr(&mut rest, "Execute")
}

/// CopyOutResponse / CopyInResponse: overall format (0 text, 1 binary) and the
/// per-column formats.
pub fn parse_copy_response(body: &[u8]) -> Result<(u8, Vec<i16>), FrameError> {
    let (&overall, mut rest) = body.split_first().ok_or(FrameError::Malformed { what: "CopyOutResponse", why: "empty".into() })?;
    let n = take_i16(&mut rest, "CopyOutResponse")?;
    let mut formats = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n.max(0) {
        formats.push(take_i16(&mut rest, "CopyOutResponse")?);
    }
    Ok((overall, formats))
}

/// The request a frontend frame makes, for [`super::flow::Flow`].
pub fn request_of(frame: &Frame) -> Result<super::flow::Request<'_>, FrameError> {
    use super::flow::Request;
    let body = frame.body();
    Ok(match frame.tag() {
        tag::QUERY => {
            let mut rest = body;
            Request::Query(take_cstr(&mut rest, "Query")?)
        }
        tag::PARSE => Request::Parse,
        tag::BIND => Request::Bind,
        tag::DESCRIBE => {
            let (kind, name) = parse_target(body, "Describe")?;
            Request::Describe { portal: kind == b'P', name }
        }
        tag::EXECUTE => Request::Execute { portal: parse_execute(body)? },
        tag::CLOSE => Request::Close,
        tag::SYNC => Request::Sync,
        t => Request::of_tag(t),
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn row_descriptions_and_data_rows_round_trip() {
        let fields = vec![
            Field { name: "id".into(), table_oid: 16400, column: 1, type_oid: 23, type_len: 4, type_mod: -1, format: 1 },
            Field { name: "note".into(), table_oid: 0, column: 0, type_oid: 25, type_len: -1, type_mod: -1, format: 0 },
        ];
        let rd = row_description(&fields);
        assert_eq!(rd.tag(), tag::ROW_DESCRIPTION);
        assert_eq!(parse_row_description(rd.body()).unwrap(), fields);
        let mut out = b"left over".to_vec();
        encode_data_row([Some(&b"7"[..]), None, Some(&b""[..])].into_iter(), &mut out);
        let row = Frame::from_bytes(Bytes::from(out));
        assert_eq!(u32::from_be_bytes(row.as_bytes()[1..5].try_into().unwrap()) as usize + 1, row.len());
        assert_eq!(parse_data_row(row.body()).unwrap(), vec![Some(&b"7"[..]), None, Some(&b""[..])]);
    }

    #[test]
    fn auth_requests_round_trip() {
        assert_eq!(parse_auth_request(auth_ok().body()).unwrap(), AuthRequest::Ok);
        assert_eq!(parse_auth_request(auth_cleartext_password().body()).unwrap(), AuthRequest::CleartextPassword);
        assert_eq!(
            parse_auth_request(auth_sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]).body()).unwrap(),
            AuthRequest::Sasl { mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()] }
        );
        assert_eq!(parse_auth_request(auth_sasl_continue(b"r=abc").body()).unwrap(), AuthRequest::SaslContinue(b"r=abc".to_vec()));
        let mut md5 = 5i32.to_be_bytes().to_vec();
        md5.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(parse_auth_request(&md5).unwrap(), AuthRequest::Md5Password { salt: [1, 2, 3, 4] });
        assert!(parse_auth_request(&5i32.to_be_bytes()).is_err(), "md5 without salt");
        assert!(parse_auth_request(&[0, 0]).is_err());
    }

    #[test]
    fn client_messages_parse() {
        let f = sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc");
        assert_eq!(parse_sasl_initial_response(f.body()).unwrap(), ("SCRAM-SHA-256", &b"n,,n=,r=abc"[..]));
        let mut bad = b"SCRAM-SHA-256\0".to_vec();
        bad.extend_from_slice(&100i32.to_be_bytes());
        assert!(parse_sasl_initial_response(&bad).is_err());
        assert_eq!(parse_password(password_message(b"tok").body()).unwrap(), "tok");
        let (pid, key) = parse_backend_key_data(backend_key_data(7, 9).body()).unwrap();
        assert_eq!((pid, key), (7, 9u32.to_be_bytes().to_vec()));
        assert_eq!(parse_parameter_status(parameter_status("a", "b").body()).unwrap(), ("a".into(), "b".into()));
    }

    #[test]
    fn data_rows_round_trip_and_reject_lies() {
        let mut out = Vec::new();
        encode_data_row([Some(&b"abc"[..]), None, Some(&b""[..])].into_iter(), &mut out);
        let f = Frame::from_bytes(bytes::Bytes::from(out));
        assert_eq!(parse_data_row(f.body()).unwrap(), vec![Some(&b"abc"[..]), None, Some(&b""[..])]);
        assert!(parse_data_row(&[0, 1, 0, 0, 0, 9, b'x']).is_err(), "value longer than the message");
        assert!(parse_data_row(&[0, 0, 1]).is_err(), "trailing bytes");
    }

    #[test]
    fn bind_formats_are_found_after_the_parameters() {
        let mut b = b"portal\0stmt\0".to_vec();
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&3i32.to_be_bytes());
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        assert_eq!(parse_bind(&b).unwrap(), ("portal", "stmt", vec![1, 0]));
        assert_eq!(bind_parameters(&b).unwrap(), (vec![1], vec![Some(&b"abc"[..]), None]));
        assert!(parse_bind(&b[..b.len() - 3]).is_err());
    }
}

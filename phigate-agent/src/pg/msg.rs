//! The messages phigate itself builds (authentication exchange, session start) and
//! the ones it must read (authentication requests, BackendKeyData, ReadyForQuery).
//! Everything else passes through as raw frames.

use super::frame::{take_cstr, take_i32, Frame, FrameError};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}

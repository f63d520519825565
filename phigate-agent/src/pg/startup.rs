//! The untyped packets a client may open a connection with: `length (4) | code (4) |
//! payload`. Bounded like PostgreSQL's own (10,000 bytes).

use std::fmt;

use super::frame::{take_cstr, FrameError};

/// PostgreSQL's limit on a startup packet.
pub const MAX_STARTUP_PACKET: usize = 10_000;

pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// Protocol 3.0.
pub const PROTOCOL_3_0: u32 = 196_608;

/// The first byte of a TLS handshake record: a PostgreSQL 17 client using direct SSL
/// (`sslnegotiation=direct`) starts with a ClientHello instead of SSLRequest.
pub const TLS_HANDSHAKE: u8 = 0x16;

#[derive(Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: u32,
        key: Vec<u8>,
    },
    Startup(StartupMessage),
    /// A protocol version or request code phigate does not speak.
    Unsupported {
        code: u32,
    },
}

impl fmt::Debug for StartupPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SslRequest => f.write_str("SslRequest"),
            Self::GssEncRequest => f.write_str("GssEncRequest"),
            Self::Cancel { pid, .. } => write!(f, "Cancel {{ pid: {pid}, key: <redacted> }}"),
            Self::Startup(m) => write!(f, "Startup({m:?})"),
            Self::Unsupported { code } => write!(f, "Unsupported({code})"),
        }
    }
}

/// A StartupMessage: protocol version and parameters in the order sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The database requested (PostgreSQL's default is the user name).
    pub fn database(&self) -> Option<&str> {
        self.get("database").or_else(|| self.get("user"))
    }
}

/// The length of the packet at the front of `buf`, once 4 bytes are there.
pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(FrameError::BadLength { tag: '\0', len: len as i64 });
    }
    Ok(Some(len))
}

/// Parse a complete startup packet (length included).
pub fn parse(packet: &[u8]) -> Result<StartupPacket, FrameError> {
    if packet.len() < 8 {
        return Err(FrameError::Malformed { what: "startup packet", why: "shorter than 8 bytes".into() });
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let payload = &packet[8..];
    match code {
        SSL_REQUEST => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST => {
            // 3.0 keys are 4 bytes; protocol 3.2 allows up to 256.
            if payload.len() < 8 || payload.len() > 4 + 256 {
                return Err(FrameError::Malformed { what: "CancelRequest", why: format!("{} payload bytes", payload.len()) });
            }
            let pid = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            Ok(StartupPacket::Cancel { pid, key: payload[4..].to_vec() })
        }
        c if c >> 16 == 3 => {
            let mut rest = payload;
            let mut params = Vec::new();
            loop {
                if rest.is_empty() {
                    return Err(FrameError::Malformed { what: "StartupMessage", why: "missing final NUL".into() });
                }
                if rest[0] == 0 {
                    break;
                }
                let k = take_cstr(&mut rest, "StartupMessage parameter name")?.to_string();
                let v = take_cstr(&mut rest, "StartupMessage parameter value")?.to_string();
                if params.iter().any(|(p, _): &(String, String)| *p == k) {
                    return Err(FrameError::Malformed { what: "StartupMessage", why: format!("parameter {k:?} given twice") });
                }
                params.push((k, v));
            }
            if params.iter().all(|(k, _)| k != "user") {
                return Err(FrameError::Malformed { what: "StartupMessage", why: "no user name".into() });
            }
            Ok(StartupPacket::Startup(StartupMessage { major: 3, minor: (c & 0xffff) as u16, params }))
        }
        code => Ok(StartupPacket::Unsupported { code }),
    }
}

/// Encode a StartupMessage (protocol 3.0).
pub fn encode_startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// Encode a CancelRequest.
pub fn encode_cancel(pid: u32, key: &[u8]) -> Vec<u8> {
    let mut out = ((8 + 4 + key.len()) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// Encode an SSLRequest.
pub fn encode_ssl_request() -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&8u32.to_be_bytes());
    out[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_startup_message() {
        let wire = encode_startup(&[("user", "alice"), ("database", "clinical"), ("application_name", "psql")]);
        let StartupPacket::Startup(m) = parse(&wire).unwrap() else { panic!() };
        assert_eq!((m.major, m.minor), (3, 0));
        assert_eq!(m.get("user"), Some("alice"));
        assert_eq!(m.database(), Some("clinical"));
        assert_eq!(m.get("application_name"), Some("psql"));
    }

    #[test]
    fn database_defaults_to_user() {
        let wire = encode_startup(&[("user", "alice")]);
        let StartupPacket::Startup(m) = parse(&wire).unwrap() else { panic!() };
        assert_eq!(m.database(), Some("alice"));
    }

    #[test]
    fn recognises_requests() {
        assert_eq!(parse(&encode_ssl_request()).unwrap(), StartupPacket::SslRequest);
        assert_eq!(parse(&encode_cancel(42, &7u32.to_be_bytes())).unwrap(), StartupPacket::Cancel { pid: 42, key: 7u32.to_be_bytes().to_vec() });
        let mut gss = 8u32.to_be_bytes().to_vec();
        gss.extend_from_slice(&GSSENC_REQUEST.to_be_bytes());
        assert_eq!(parse(&gss).unwrap(), StartupPacket::GssEncRequest);
        let mut v2 = 8u32.to_be_bytes().to_vec();
        v2.extend_from_slice(&0x0002_0000u32.to_be_bytes());
        assert_eq!(parse(&v2).unwrap(), StartupPacket::Unsupported { code: 0x0002_0000 });
    }

    #[test]
    fn rejects_malformed_packets() {
        let mut wire = encode_startup(&[("user", "alice")]);
        wire.pop(); // final NUL
        assert!(parse(&wire).is_err());
        assert!(parse(&encode_startup(&[("database", "x")])).is_err(), "user is required");
        assert!(parse(&encode_startup(&[("user", "a"), ("user", "b")])).is_err());
        assert!(packet_len(&[0, 0, 0, 4]).is_err());
        assert!(packet_len(&[0, 1, 0, 0]).is_err());
    }
}

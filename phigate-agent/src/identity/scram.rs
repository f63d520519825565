//! The server side of SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it, so a
//! workload can prove a password to phigate without phigate storing that password:
//! it holds only a PostgreSQL-format verifier
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`).
//!
//! Channel binding (`-PLUS`) is not offered: the redirected connection is local to the
//! node. No I/O here; the session drives the exchange.

use std::fmt;

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub const MECHANISM: &str = "SCRAM-SHA-256";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("invalid SCRAM verifier: {0}")]
    BadVerifier(&'static str),
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("the client asked for channel binding, which phigate does not offer")]
    ChannelBinding,
    #[error("the client's nonce does not match")]
    NonceMismatch,
    #[error("wrong password")]
    WrongPassword,
}

/// A stored SCRAM-SHA-256 verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Verifier(SCRAM-SHA-256, {} iterations, <redacted>)", self.iterations)
    }
}

impl Verifier {
    pub fn parse(s: &str) -> Result<Self, ScramError> {
        let rest = s.strip_prefix("SCRAM-SHA-256$").ok_or(ScramError::BadVerifier("must start with SCRAM-SHA-256$"))?;
        let (params, keys) = rest.split_once('$').ok_or(ScramError::BadVerifier("missing '$' before the keys"))?;
        let (iter, salt) = params.split_once(':').ok_or(ScramError::BadVerifier("missing ':' between iterations and salt"))?;
        let (stored, server) = keys.split_once(':').ok_or(ScramError::BadVerifier("missing ':' between StoredKey and ServerKey"))?;
        let iterations: u32 = iter.parse().map_err(|_| ScramError::BadVerifier("iterations is not a number"))?;
        if iterations == 0 {
            return Err(ScramError::BadVerifier("iterations must be positive"));
        }
        let salt = B64.decode(salt).map_err(|_| ScramError::BadVerifier("salt is not base64"))?;
        let key = |s: &str| -> Result<[u8; 32], ScramError> {
            B64.decode(s).ok().and_then(|v| v.try_into().ok()).ok_or(ScramError::BadVerifier("keys must be 32 bytes of base64"))
        };
        Ok(Self { iterations, salt, stored_key: key(stored)?, server_key: key(server)? })
    }
}

/// Make a verifier for `password` in PostgreSQL's format (as `phigate hash-password`
/// does); the password is normalised with SASLprep like PostgreSQL does.
pub fn make_verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

/// One server-side exchange.
pub struct Exchange<'a> {
    verifier: &'a Verifier,
    state: State,
}

enum State {
    Initial,
    SentFirst { client_first_bare: String, server_first: String, nonce: String },
    Done,
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("invariant: HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

impl<'a> Exchange<'a> {
    pub fn new(verifier: &'a Verifier) -> Self {
        Self { verifier, state: State::Initial }
    }

    /// Handle client-first-message; returns server-first-message.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: "n,," (no channel binding) or "y,," (client could but thinks we
        // cannot); "p=…" demands binding we do not offer.
        let bare = if let Some(b) = msg.strip_prefix("n,,").or_else(|| msg.strip_prefix("y,,")) {
            b
        } else if msg.starts_with("p=") {
            return Err(ScramError::ChannelBinding);
        } else {
            return Err(ScramError::Malformed("bad gs2 header"));
        };
        let client_nonce = bare.split(',').find_map(|a| a.strip_prefix("r=")).ok_or(ScramError::Malformed("no client nonce"))?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
            return Err(ScramError::Malformed("invalid client nonce"));
        }
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&self.verifier.salt), self.verifier.iterations);
        self.state = State::SentFirst { client_first_bare: bare.to_string(), server_first: server_first.clone(), nonce };
        Ok(server_first.into_bytes())
    }

    /// Handle client-final-message; returns server-final-message when the proof is
    /// right.
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::SentFirst { client_first_bare, server_first, nonce } = std::mem::replace(&mut self.state, State::Done) else {
            return Err(ScramError::Malformed("client-final before client-first"));
        };
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(ScramError::Malformed("no proof"))?;
        let mut binding = None;
        let mut got_nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                binding = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                got_nonce = Some(r);
            }
        }
        // "biws" is base64("n,,"); "eSws" is base64("y,,").
        if !matches!(binding, Some("biws") | Some("eSws")) {
            return Err(ScramError::ChannelBinding);
        }
        if got_nonce != Some(nonce.as_str()) {
            return Err(ScramError::NonceMismatch);
        }
        let proof: [u8; 32] = B64.decode(proof).ok().and_then(|p| p.try_into().ok()).ok_or(ScramError::Malformed("proof is not 32 bytes of base64"))?;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        // Constant-time comparison: the verifier is secret material.
        let diff = computed.iter().zip(self.verifier.stored_key.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(password_stored: &str, password_client: &str) -> Result<(), ScramError> {
        let verifier = Verifier::parse(&make_verifier(password_stored)).unwrap();
        let mut server = Exchange::new(&verifier);
        // The real client implementation PostgreSQL drivers use.
        let mut client = ScramSha256::new(password_client.as_bytes(), ChannelBinding::unsupported());
        let first = server.client_first(client.message())?;
        client.update(&first).unwrap();
        let last = server.client_final(client.message())?;
        client.finish(&last).map_err(|_| ScramError::Malformed("client rejected the server signature"))
    }

    #[test]
    fn accepts_the_right_password_with_a_real_client() {
        run("correct horse", "correct horse").unwrap();
    }

    #[test]
    fn rejects_a_wrong_password() {
        assert_eq!(run("correct horse", "battery staple"), Err(ScramError::WrongPassword));
    }

    #[test]
    fn rejects_channel_binding_demands_and_garbage() {
        let v = Verifier::parse(&make_verifier("x")).unwrap();
        assert_eq!(Exchange::new(&v).client_first(b"p=tls-server-end-point,,n=,r=abc"), Err(ScramError::ChannelBinding));
        assert!(Exchange::new(&v).client_first(b"garbage").is_err());
        assert!(Exchange::new(&v).client_first(b"n,,n=,r=").is_err());
        assert!(Exchange::new(&v).client_final(b"c=biws,r=x,p=AAAA").is_err());
    }

    #[test]
    fn parses_postgres_verifiers_and_rejects_bad_ones() {
        let v = make_verifier("pw");
        assert!(v.starts_with("SCRAM-SHA-256$4096:"));
        assert!(Verifier::parse(&v).is_ok());
        assert!(Verifier::parse("md5abc").is_err());
        assert!(Verifier::parse("SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA").is_err());
        assert!(!format!("{:?}", Verifier::parse(&v).unwrap()).contains('='), "Debug hides key material");
    }
}

//! Key material for tests: a throwaway certificate authority with a server certificate
//! for the test database, and a token issuer that signs JWTs and publishes its JWKS.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use serde_json::{json, Value};

/// A CA and a server certificate signed by it, written as PEM files in `dir`.
pub struct TestCa {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestCa {
    /// `names`: DNS names and IP addresses the server certificate is valid for.
    pub fn new(dir: &Path, label: &str, names: &[&str]) -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, format!("phigate test CA {label}"));
        let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("server params");
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("db.test"));
        for n in names {
            params.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().expect("DNS name")),
            });
        }
        let cert = params.signed_by(&key, &ca_cert, &ca_key).expect("server cert");
        let out = Self {
            ca_file: dir.join(format!("{label}-ca.pem")),
            cert_file: dir.join(format!("{label}-server.pem")),
            key_file: dir.join(format!("{label}-server.key")),
        };
        std::fs::write(&out.ca_file, ca_cert.pem()).unwrap();
        std::fs::write(&out.cert_file, cert.pem()).unwrap();
        std::fs::write(&out.key_file, key.serialize_pem()).unwrap();
        out
    }
}

/// A JWT issuer with an EC P-256 signing key.
pub struct TokenIssuer {
    pub issuer: String,
    pub kid: String,
    key: EncodingKey,
    jwks: Value,
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

impl TokenIssuer {
    pub fn new(issuer: &str, kid: &str) -> Self {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("EC key");
        let key = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).expect("EC PEM");
        let raw = kp.public_key_raw();
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig", "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65])});
        Self { issuer: issuer.into(), kid: kid.into(), key, jwks: json!({"keys": [jwk]}) }
    }

    pub fn jwks(&self) -> String {
        self.jwks.to_string()
    }

    /// Claims valid for five minutes, for `subject`, with `groups`, audience `aud`.
    pub fn claims(&self, subject: &str, aud: &str, groups: &[&str]) -> Value {
        json!({"iss": self.issuer, "aud": aud, "sub": subject, "iat": now(), "nbf": now() - 5, "exp": now() + 300, "groups": groups})
    }

    pub fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.key).expect("sign")
    }
}

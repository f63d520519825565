//! OIDC/JWT access tokens presented as the PostgreSQL password: signature checked
//! against the issuer's JWKS (a file, or a URL fetched and cached), then issuer,
//! audience, expiry and not-before. The token's subject and groups become part of the
//! workload's identity.
//!
//! Owns key material caching and token validation; it does not speak PostgreSQL.
//! Tokens are secrets: they are never logged, and errors never quote them.

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use jsonwebtoken::{
    decode, decode_header,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyOperations, PublicKeyUse},
    Algorithm, DecodingKey, Validation,
};
use serde_json::Value;

/// Where an issuer's signing keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    /// Fetched over HTTPS (plain HTTP only for loopback addresses) and cached.
    Url {
        url: String,
        refresh: Duration,
    },
}

/// A trusted token issuer, as configured.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub leeway_secs: u64,
    pub groups_claim: String,
    pub jwks: JwksSource,
}

/// What a valid token says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    pub issuer: String,
    pub subject: String,
    pub groups: Vec<String>,
    /// `exp`, seconds since the epoch.
    pub expires_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the password is not a JWT")]
    Malformed,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token was issued by someone else than {expected}")]
    WrongIssuer { expected: String },
    #[error("the token is not meant for this audience")]
    WrongAudience,
    #[error("the token is signed with {0:?}, which this issuer is not allowed to use")]
    AlgorithmNotAllowed(Algorithm),
    #[error("no signing key {0:?} in the issuer's key set")]
    UnknownKey(String),
    #[error("the token lacks the required claim {0:?}")]
    MissingClaim(String),
    #[error("the issuer's signing keys are unavailable: {0}")]
    KeysUnavailable(String),
}

struct Cached {
    keys: JwkSet,
    fetched: Instant,
    /// After a failed refresh of a URL source: no new attempt before this, so logins
    /// meanwhile are answered from the cache instead of each waiting for the issuer.
    retry_at: Option<Instant>,
    /// For a file source: the file as it was when read.
    stamp: Option<FileStamp>,
}

/// How long after a failed refresh of a URL source the next attempt waits.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// Keys fetched from a URL longer ago than this are not used: an issuer unreachable
/// for a day may have revoked them. Tokens are refused until it answers again.
const MAX_STALE: Duration = Duration::from_secs(24 * 3600);

/// The cached keys, unless they are too old to trust.
fn usable(c: &Cached) -> Result<JwkSet, TokenError> {
    if c.fetched.elapsed() > MAX_STALE {
        return Err(TokenError::KeysUnavailable(format!(
            "the issuer's keys were last fetched {} h ago and cannot be refreshed",
            c.fetched.elapsed().as_secs() / 3600
        )));
    }
    Ok(c.keys.clone())
}

/// Identifies a version of a JWKS file: a rewrite, or a Kubernetes volume's swap of
/// the file behind a symlink, changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

async fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = tokio::fs::metadata(path).await.ok()?;
    Some(FileStamp { modified: m.modified().ok(), len: m.len(), inode: m.ino() })
}

/// Verifies tokens of one issuer.
pub struct TokenVerifier {
    config: IssuerConfig,
    cache: Mutex<Option<Cached>>,
    /// Rate limit for re-fetching on an unknown key id.
    last_refresh: Mutex<Option<Instant>>,
}

const MIN_REFRESH_GAP: Duration = Duration::from_secs(10);

impl TokenVerifier {
    pub fn new(config: IssuerConfig) -> Self {
        Self { config, cache: Mutex::new(None), last_refresh: Mutex::new(None) }
    }

    pub fn config(&self) -> &IssuerConfig {
        &self.config
    }

    /// Load the keys now (at agent start), so a bad JWKS is reported early.
    pub async fn preload(&self) -> Result<usize, TokenError> {
        let stamp = self.stamp().await;
        let keys = self.fetch().await?;
        let n = keys.keys.len();
        *self.cache.lock().expect("invariant: lock not poisoned") = Some(Cached { keys, fetched: Instant::now(), retry_at: None, stamp });
        Ok(n)
    }

    /// The JWKS file's current stamp (None for a URL source, or a file that is gone).
    async fn stamp(&self) -> Option<FileStamp> {
        match &self.config.jwks {
            JwksSource::File(path) => file_stamp(path).await,
            JwksSource::Url { .. } => None,
        }
    }

    async fn fetch(&self) -> Result<JwkSet, TokenError> {
        let text = match &self.config.jwks {
            JwksSource::File(path) => tokio::fs::read_to_string(path).await.map_err(|e| TokenError::KeysUnavailable(format!("{}: {e}", path.display())))?,
            JwksSource::Url { url, .. } => {
                check_url(url).map_err(TokenError::KeysUnavailable)?;
                let url = url.clone();
                tokio::task::spawn_blocking(move || fetch_url(&url))
                    .await
                    .map_err(|e| TokenError::KeysUnavailable(e.to_string()))?
                    .map_err(TokenError::KeysUnavailable)?
            }
        };
        parse_jwks(&text)
    }

    /// The current key set, fetching when absent or stale (a URL source after its
    /// refresh interval, a file as soon as it changed: a key the operator removed must
    /// stop verifying), or when `force` (an unknown key id: the issuer may have
    /// rotated keys).
    async fn keys(&self, force: bool) -> Result<JwkSet, TokenError> {
        let stamp = self.stamp().await;
        let stale = |c: &Cached| match &self.config.jwks {
            JwksSource::Url { refresh, .. } => c.fetched.elapsed() > *refresh && c.retry_at.is_none_or(|t| Instant::now() >= t),
            JwksSource::File(_) => c.stamp != stamp,
        };
        {
            let cache = self.cache.lock().expect("invariant: lock not poisoned");
            if let Some(c) = cache.as_ref() {
                if !force && !stale(c) {
                    return usable(c);
                }
            }
        }
        if force {
            let mut last = self.last_refresh.lock().expect("invariant: lock not poisoned");
            if last.is_some_and(|t| t.elapsed() < MIN_REFRESH_GAP) {
                // Refreshed very recently: answer from the cache rather than letting
                // a stream of bogus key ids hammer the issuer.
                let cache = self.cache.lock().expect("invariant: lock not poisoned");
                return cache.as_ref().ok_or_else(|| TokenError::KeysUnavailable("no keys loaded".into())).and_then(usable);
            }
            *last = Some(Instant::now());
        }
        match self.fetch().await {
            Ok(keys) => {
                *self.cache.lock().expect("invariant: lock not poisoned") = Some(Cached { keys: keys.clone(), fetched: Instant::now(), retry_at: None, stamp });
                Ok(keys)
            }
            Err(e) => {
                let mut cache = self.cache.lock().expect("invariant: lock not poisoned");
                match (cache.as_mut(), &self.config.jwks) {
                    // An issuer that cannot be reached keeps its last good keys for a
                    // while (up to MAX_STALE), retried every RETRY_AFTER_FAILURE.
                    (Some(c), JwksSource::Url { .. }) => {
                        c.retry_at = Some(Instant::now() + RETRY_AFTER_FAILURE);
                        tracing::warn!(issuer = %self.config.name, error = %e, "the issuer's keys could not be refreshed; using the last ones fetched");
                        usable(c)
                    }
                    // A JWKS file that cannot be read (deleted to revoke every key, or
                    // broken) verifies nothing: fail closed, as with no keys at all.
                    _ => {
                        *cache = None;
                        Err(e)
                    }
                }
            }
        }
    }

    pub async fn verify(&self, token: &str) -> Result<TokenClaims, TokenError> {
        let header = decode_header(token).map_err(|_| TokenError::Malformed)?;
        // RFC 7515 4.1.11: extensions the header marks critical must be understood,
        // and phigate understands none.
        if critical_extensions(token) {
            return Err(TokenError::Malformed);
        }
        if !self.config.algorithms.contains(&header.alg) {
            return Err(TokenError::AlgorithmNotAllowed(header.alg));
        }
        let mut keys = self.keys(false).await?;
        let jwk = loop {
            let found = match &header.kid {
                Some(kid) => signing_key(&keys, Some(kid), header.alg),
                None if keys.keys.len() == 1 => signing_key(&keys, None, header.alg),
                None => return Err(TokenError::UnknownKey("<no kid in token>".into())),
            };
            match found {
                Some(j) => break j,
                None => {
                    let refreshed = self.keys(true).await?;
                    let kid = header.kid.clone().unwrap_or_default();
                    if signing_key(&refreshed, header.kid.as_deref(), header.alg).is_none() {
                        return Err(TokenError::UnknownKey(kid));
                    }
                    keys = refreshed;
                }
            }
        };
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| TokenError::KeysUnavailable(format!("unusable key: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&self.config.audiences);
        validation.leeway = self.config.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::from(["exp".to_string(), "iss".to_string(), "aud".to_string(), "sub".to_string()]);
        let data = decode::<Value>(token, &key, &validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => TokenError::BadSignature,
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidIssuer => TokenError::WrongIssuer { expected: self.config.issuer.clone() },
            ErrorKind::InvalidAudience => TokenError::WrongAudience,
            ErrorKind::InvalidAlgorithm => TokenError::AlgorithmNotAllowed(header.alg),
            ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
            _ => TokenError::Malformed,
        })?;
        let claims = data.claims;
        // jsonwebtoken reads a claim it cannot parse as absent, and accepts an
        // issuer among several: `nbf` must be a number when present, `iss` one string.
        if claims.get("nbf").is_some_and(|n| !n.is_number()) {
            return Err(TokenError::Malformed);
        }
        if claims["iss"].as_str() != Some(self.config.issuer.as_str()) {
            return Err(TokenError::WrongIssuer { expected: self.config.issuer.clone() });
        }
        let subject = claims["sub"].as_str().filter(|s| !s.is_empty()).ok_or_else(|| TokenError::MissingClaim("sub".into()))?.to_string();
        let groups = match &claims[self.config.groups_claim.as_str()] {
            Value::Array(a) => a.iter().filter_map(|g| g.as_str().map(String::from)).collect(),
            Value::String(s) => s.split_whitespace().map(String::from).collect(),
            _ => Vec::new(),
        };
        Ok(TokenClaims { issuer: self.config.issuer.clone(), subject, groups, expires_at: claims["exp"].as_u64().unwrap_or(0) })
    }
}

/// Read a JWKS document key by key: issuers publish keys of types and algorithms
/// jsonwebtoken does not know (ES512, ECDH-ES, X25519, …) beside their signing keys,
/// and one of those must not make the whole set unusable. Such keys are skipped (they
/// could not verify anything here anyway).
fn parse_jwks(text: &str) -> Result<JwkSet, TokenError> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<Value>,
    }
    let doc: Document = serde_json::from_str(text).map_err(|e| TokenError::KeysUnavailable(format!("not a JWKS document: {e}")))?;
    let mut keys = Vec::with_capacity(doc.keys.len());
    for k in doc.keys {
        let kid = k.get("kid").and_then(Value::as_str).unwrap_or("").to_string();
        match serde_json::from_value::<Jwk>(k) {
            Ok(jwk) => keys.push(jwk),
            Err(e) => tracing::debug!(kid = %kid.escape_debug(), error = %e, "skipping a JWKS key phigate cannot use"),
        }
    }
    Ok(JwkSet { keys })
}

/// Redirects a JWKS URL may take.
const MAX_REDIRECTS: usize = 5;

/// GET a JWKS document. Redirects are followed here rather than by the HTTP client,
/// so each target passes [`check_url`] too: an HTTPS endpoint answering with a
/// redirect to plain HTTP elsewhere would otherwise hand the keys to the path.
fn fetch_url(url: &str) -> Result<String, String> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).redirects(0).build();
    let mut url = url.to_string();
    for _ in 0..=MAX_REDIRECTS {
        let response = agent.get(&url).call().map_err(|e| e.to_string())?;
        if !(300..400).contains(&response.status()) {
            return response.into_string().map_err(|e| e.to_string());
        }
        let location = response.header("location").ok_or_else(|| format!("{url}: a redirect without a location"))?;
        let next = url::Url::parse(&url).and_then(|base| base.join(location)).map_err(|e| format!("{url}: redirect to {location:?}: {e}"))?.to_string();
        check_url(&next).map_err(|e| format!("{url} redirects to {next}, refused: {e}"))?;
        url = next;
    }
    Err(format!("{url}: more than {MAX_REDIRECTS} redirects"))
}

/// The key that may verify a token signed with `alg`: the one with that `kid` (or the
/// only key, for a token without one) that is published for signatures (`use`,
/// `key_ops`) and, if it names an algorithm, for this one. An encryption key or a key
/// meant for another algorithm never verifies a signature, even under the right kid;
/// among keys sharing a kid, one of another type (an RSA key beside the EC key that
/// signed an ES256 token) is passed over rather than tried and failed.
fn signing_key(keys: &JwkSet, kid: Option<&str>, alg: Algorithm) -> Option<Jwk> {
    keys.keys
        .iter()
        .filter(|k| kid.is_none_or(|kid| k.common.key_id.as_deref() == Some(kid)))
        .find(|k| {
            let c = &k.common;
            let for_signatures = matches!(c.public_key_use, None | Some(PublicKeyUse::Signature));
            let verifies = c.key_operations.as_ref().is_none_or(|ops| ops.contains(&KeyOperations::Verify));
            let this_alg = c.key_algorithm.is_none_or(|a| a.to_string().parse::<Algorithm>().is_ok_and(|a| a == alg));
            for_signatures && verifies && this_alg && key_type_fits(alg, &k.algorithm)
        })
        .cloned()
}

/// Whether a key of this type (and curve) can verify `alg` at all.
fn key_type_fits(alg: Algorithm, key: &AlgorithmParameters) -> bool {
    use Algorithm as A;
    match key {
        AlgorithmParameters::RSA(_) => matches!(alg, A::RS256 | A::RS384 | A::RS512 | A::PS256 | A::PS384 | A::PS512),
        AlgorithmParameters::EllipticCurve(p) => matches!((alg, &p.curve), (A::ES256, EllipticCurve::P256) | (A::ES384, EllipticCurve::P384)),
        AlgorithmParameters::OctetKeyPair(p) => alg == A::EdDSA && p.curve == EllipticCurve::Ed25519,
        // Shared secrets (HS*) are refused by configuration; a published one verifies nothing.
        AlgorithmParameters::OctetKey(_) => false,
    }
}

/// JWKS over plain HTTP could be swapped by anyone on the path: only HTTPS, except
/// to a loopback address (a local sidecar, tests). The URL is parsed as the HTTP client
/// parses it, so the host checked is the host connected to (in
/// `http://localhost:80@idp.example/` that is idp.example).
pub fn check_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => return Ok(()),
        "http" => {}
        _ => return Err(format!("{url:?} is not an http(s) URL")),
    }
    let loopback = match parsed.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if loopback {
        return Ok(());
    }
    Err(format!("{url:?} uses plain HTTP to a non-loopback host; use https://"))
}

/// Whether the token's header lists critical extensions (`crit`).
fn critical_extensions(token: &str) -> bool {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    let Some(head) = token.split('.').next() else { return true };
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(head.trim_end_matches('=')) else { return true };
    serde_json::from_slice::<Value>(&bytes).map_or(true, |h| h.get("crit").is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    /// An EC P-256 key pair and its JWKS document.
    fn keypair(kid: &str) -> (EncodingKey, Value) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        let raw = kp.public_key_raw();
        use base64::{engine::general_purpose::URL_SAFE_NO_PAD as U, Engine};
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig", "x": U.encode(&raw[1..33]), "y": U.encode(&raw[33..65])});
        (enc, json!({"keys": [jwk]}))
    }

    fn verifier(jwks: &Value, dir: &std::path::Path) -> TokenVerifier {
        let path = dir.join("jwks.json");
        std::fs::write(&path, jwks.to_string()).unwrap();
        verifier_from(JwksSource::File(path))
    }

    /// The test issuer, its keys from `jwks`.
    fn verifier_from(jwks: JwksSource) -> TokenVerifier {
        TokenVerifier::new(IssuerConfig {
            name: "test".into(),
            issuer: "https://idp.test/".into(),
            audiences: vec!["phigate".into()],
            algorithms: vec![Algorithm::ES256, Algorithm::RS256],
            leeway_secs: 0,
            groups_claim: "groups".into(),
            jwks,
        })
    }

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    fn token(key: &EncodingKey, kid: &str, claims: Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        encode(&h, &claims, key).unwrap()
    }

    fn good_claims() -> Value {
        json!({"iss": "https://idp.test/", "aud": "phigate", "sub": "svc-billing", "exp": now() + 300, "nbf": now() - 10, "groups": ["billing", "phi-readers"]})
    }

    #[tokio::test]
    async fn valid_token_yields_subject_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        let (key, jwks) = keypair("k1");
        let v = verifier(&jwks, dir.path());
        let c = v.verify(&token(&key, "k1", good_claims())).await.unwrap();
        assert_eq!(c.subject, "svc-billing");
        assert_eq!(c.groups, vec!["billing", "phi-readers"]);
    }

    #[tokio::test]
    async fn each_defect_has_its_own_error() {
        let dir = tempfile::tempdir().unwrap();
        let (key, jwks) = keypair("k1");
        let (other_key, _) = keypair("k1");
        let v = verifier(&jwks, dir.path());
        let with = |f: &dyn Fn(&mut Value)| {
            let mut c = good_claims();
            f(&mut c);
            c
        };
        assert_eq!(v.verify(&token(&other_key, "k1", good_claims())).await, Err(TokenError::BadSignature));
        assert_eq!(v.verify(&token(&key, "k1", with(&|c| c["exp"] = json!(now() - 60)))).await, Err(TokenError::Expired));
        assert_eq!(v.verify(&token(&key, "k1", with(&|c| c["nbf"] = json!(now() + 600)))).await, Err(TokenError::NotYetValid));
        assert_eq!(v.verify(&token(&key, "k1", with(&|c| c["aud"] = json!("someone-else")))).await, Err(TokenError::WrongAudience));
        assert!(matches!(v.verify(&token(&key, "k1", with(&|c| c["iss"] = json!("https://evil/")))).await, Err(TokenError::WrongIssuer { .. })));
        assert_eq!(
            v.verify(&token(
                &key,
                "k1",
                with(&|c| {
                    c.as_object_mut().unwrap().remove("sub");
                })
            ))
            .await,
            Err(TokenError::MissingClaim("sub".into()))
        );
        assert_eq!(v.verify(&token(&key, "k2", good_claims())).await, Err(TokenError::UnknownKey("k2".into())));
        assert_eq!(v.verify("not-a-jwt").await, Err(TokenError::Malformed));
        let hs = encode(&Header::new(Algorithm::HS256), &good_claims(), &EncodingKey::from_secret(b"k")).unwrap();
        assert_eq!(v.verify(&hs).await, Err(TokenError::AlgorithmNotAllowed(Algorithm::HS256)));
    }

    #[tokio::test]
    async fn keys_not_meant_for_verifying_this_algorithm_are_not_used() {
        let (key, jwks) = keypair("k1");
        let edit = |f: &dyn Fn(&mut Value)| {
            let mut j = jwks.clone();
            f(&mut j["keys"][0]);
            j
        };
        // An encryption key, a key whose key_ops do not include verify, a key
        // published for another algorithm: none verifies a signature.
        for (what, set) in [
            ("use: enc", edit(&|k| k["use"] = json!("enc"))),
            ("key_ops without verify", edit(&|k| k["key_ops"] = json!(["encrypt"]))),
            ("alg: ES384", edit(&|k| k["alg"] = json!("ES384"))),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let v = verifier(&set, dir.path());
            assert!(v.verify(&token(&key, "k1", good_claims())).await.is_err(), "a key with {what} verified a token");
        }
        // Two keys under one kid (an encryption key first): the signing key is used.
        let dir = tempfile::tempdir().unwrap();
        let enc = edit(&|k| k["use"] = json!("enc"))["keys"][0].clone();
        let v = verifier(&json!({"keys": [enc, jwks["keys"][0].clone()]}), dir.path());
        assert_eq!(v.verify(&token(&key, "k1", good_claims())).await.map(|c| c.subject), Ok("svc-billing".into()));
        // Two signing keys under one kid, neither naming its algorithm (an RSA key
        // first, or an EC key on another curve): the one that fits ES256 is used.
        let mut bare = jwks["keys"][0].clone();
        bare.as_object_mut().unwrap().remove("alg");
        for other in [
            json!({"kty": "RSA", "kid": "k1", "use": "sig", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"}),
            json!({"kty": "EC", "crv": "P-384", "kid": "k1", "use": "sig", "x": "iA7lWQLzVrKGEFjfGMfMHfTEZ2KnLiKU7JuNT3E7ygsfE7ygsfE7ygsfE7ygsfE7", "y": "iA7lWQLzVrKGEFjfGMfMHfTEZ2KnLiKU7JuNT3E7ygsfE7ygsfE7ygsfE7ygsfE7"}),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let v = verifier(&json!({"keys": [other.clone(), bare.clone()]}), dir.path());
            let got = v.verify(&token(&key, "k1", good_claims())).await;
            assert_eq!(got.map(|c| c.subject), Ok("svc-billing".into()), "with {} first", other["kty"]);
        }
    }

    #[tokio::test]
    async fn a_key_phigate_cannot_read_does_not_hide_the_others() {
        // Found by a review: the JWKS was read as a whole, so one key of a type or
        // algorithm jsonwebtoken does not know (an ES512 or ECDH-ES key next to the
        // signing keys, as issuers publish) made every token fail with "keys unavailable".
        let (key, jwks) = keypair("k1");
        for (what, other) in [
            ("ES512 key", json!({"kty": "EC", "crv": "P-521", "kid": "k9", "alg": "ES512", "use": "sig", "x": "AAAA", "y": "AAAA"})),
            ("ECDH-ES encryption key", json!({"kty": "EC", "crv": "P-256", "kid": "k8", "alg": "ECDH-ES", "use": "enc", "x": "AAAA", "y": "AAAA"})),
            ("X25519 key", json!({"kty": "OKP", "crv": "X25519", "kid": "k7", "use": "enc", "x": "AAAA"})),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let v = verifier(&json!({"keys": [other, jwks["keys"][0].clone()]}), dir.path());
            let got = v.verify(&token(&key, "k1", good_claims())).await;
            assert!(got.is_ok(), "a JWKS with an {what} beside the signing key: {got:?}");
        }
        // A document that is not a key set at all still verifies nothing.
        let dir = tempfile::tempdir().unwrap();
        let v = verifier(&json!({"not-keys": []}), dir.path());
        assert!(matches!(v.verify(&token(&key, "k1", good_claims())).await, Err(TokenError::KeysUnavailable(_))));
    }

    #[tokio::test]
    async fn a_key_removed_from_the_jwks_file_no_longer_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, jwks1) = keypair("k1");
        let (_, jwks2) = keypair("k2");
        let v = verifier(&jwks1, dir.path());
        v.preload().await.unwrap();
        assert!(v.verify(&token(&k1, "k1", good_claims())).await.is_ok());
        // The operator rotates k1 out (it leaked): the file now holds only k2.
        std::fs::write(dir.path().join("jwks.json"), jwks2.to_string()).unwrap();
        assert_eq!(v.verify(&token(&k1, "k1", good_claims())).await, Err(TokenError::UnknownKey("k1".into())));
    }

    /// Serve HTTP on loopback: each connection gets `answer` (as long as the test runs).
    fn http_server(answer: String) -> std::net::SocketAddr {
        http_server_counting(move |_| answer.clone()).0
    }

    /// Serve HTTP on loopback (up to 10 connections): the n-th connection (from 0)
    /// gets `answer(n)`; the counter says how many came.
    fn http_server_counting(answer: impl Fn(usize) -> String + Send + 'static) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for mut c in listener.incoming().flatten().take(10) {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = c.write_all(answer(n).as_bytes());
            }
        });
        (addr, requests)
    }

    #[tokio::test]
    async fn a_jwks_url_cannot_redirect_to_plain_http_elsewhere() {
        let (key, jwks) = keypair("k1");
        let body = jwks.to_string();
        let keys =
            http_server(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()));
        // check_url refuses this one (an IPv4-mapped address is not a loopback address
        // to it); it stands for a plain-HTTP host elsewhere that the test can reach.
        let elsewhere = format!("http://[::ffff:127.0.0.1]:{}/jwks", keys.port());
        assert!(check_url(&elsewhere).is_err());
        let redirecting_to = |target: &str| {
            let redirect = http_server(format!("HTTP/1.1 302 Found\r\nlocation: {target}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"));
            verifier_from(JwksSource::Url { url: format!("http://127.0.0.1:{}/jwks", redirect.port()), refresh: Duration::from_secs(300) })
        };
        let got = redirecting_to(&elsewhere).verify(&token(&key, "k1", good_claims())).await;
        assert!(matches!(got, Err(TokenError::KeysUnavailable(_))), "keys were taken from {elsewhere}: {got:?}");
        // A redirect to a URL check_url allows is followed.
        let allowed = format!("http://127.0.0.1:{}/jwks", keys.port());
        assert!(redirecting_to(&allowed).verify(&token(&key, "k1", good_claims())).await.is_ok());
    }

    #[tokio::test]
    async fn a_deleted_jwks_file_verifies_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, jwks1) = keypair("k1");
        let v = verifier(&jwks1, dir.path());
        assert!(v.verify(&token(&k1, "k1", good_claims())).await.is_ok());
        // The operator deletes the file to revoke every key.
        std::fs::remove_file(dir.path().join("jwks.json")).unwrap();
        assert!(matches!(v.verify(&token(&k1, "k1", good_claims())).await, Err(TokenError::KeysUnavailable(_))));
    }

    #[tokio::test]
    async fn an_unreachable_issuer_is_retried_at_intervals_and_its_keys_expire() {
        let (key, jwks) = keypair("k1");
        let body = jwks.to_string();
        // The keys once, then errors: the issuer is down.
        let (addr, requests) = http_server_counting(move |n| match n {
            0 => format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()),
            _ => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string(),
        });
        let port = addr.port();
        // Stale at once: every login would refresh.
        let v = verifier_from(JwksSource::Url { url: format!("http://127.0.0.1:{port}/jwks"), refresh: Duration::ZERO });
        for _ in 0..4 {
            assert!(v.verify(&token(&key, "k1", good_claims())).await.is_ok(), "the last good keys verify while the issuer is down");
        }
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 2, "one fetch, one failed refresh, then no attempt before the retry interval");
        // Keys a day old are not trusted any more.
        let old = Cached {
            keys: JwkSet { keys: Vec::new() },
            fetched: Instant::now().checked_sub(MAX_STALE + Duration::from_secs(60)).unwrap(),
            retry_at: None,
            stamp: None,
        };
        assert!(matches!(usable(&old), Err(TokenError::KeysUnavailable(_))));
    }

    /// Sign `header` and `claims` (as given, fields jsonwebtoken's Header lacks too).
    fn raw_token(key: &EncodingKey, header: Value, claims: Value) -> String {
        use base64::{engine::general_purpose::URL_SAFE_NO_PAD as U, Engine};
        let message = format!("{}.{}", U.encode(header.to_string()), U.encode(claims.to_string()));
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, Algorithm::ES256).unwrap();
        format!("{message}.{sig}")
    }

    /// What a verifier of key k1 says of a token signed by k1 with this header (None:
    /// the usual one) and these claims.
    async fn verify_signed(header: Option<Value>, claims: Value) -> Result<TokenClaims, TokenError> {
        let dir = tempfile::tempdir().unwrap();
        let (key, jwks) = keypair("k1");
        let v = verifier(&jwks, dir.path());
        let t = match header {
            Some(h) => raw_token(&key, h, claims),
            None => token(&key, "k1", claims),
        };
        v.verify(&t).await
    }

    #[tokio::test]
    async fn a_token_whose_nbf_is_not_a_number_is_not_accepted() {
        // Found by a review: jsonwebtoken treats a claim it cannot parse as absent, and nbf
        // is not a required claim: a token not valid for another year, its nbf written
        // as a string, was accepted.
        let mut c = good_claims();
        c["nbf"] = json!((now() + 365 * 86400).to_string());
        let got = verify_signed(None, c).await;
        assert!(got.is_err(), "a token with nbf a year ahead (as a string) was accepted: {got:?}");
    }

    #[tokio::test]
    async fn a_token_with_an_unknown_critical_header_is_refused() {
        // Found by a review: RFC 7515 4.1.11 — a JWS whose "crit" lists an extension the
        // recipient does not understand MUST be rejected; the header was ignored.
        let header = json!({"alg": "ES256", "kid": "k1", "typ": "JWT", "crit": ["exp-bound-to-mtls"], "exp-bound-to-mtls": true});
        let got = verify_signed(Some(header), good_claims()).await;
        assert!(got.is_err(), "a token with an unknown critical header parameter was accepted: {got:?}");
    }

    #[tokio::test]
    async fn a_token_with_several_issuers_is_refused() {
        // Found by a review: "iss" is one StringOrURI; an array naming the configured issuer
        // among others passed the issuer check.
        let mut c = good_claims();
        c["iss"] = json!(["https://elsewhere.example/", "https://idp.test/"]);
        let got = verify_signed(None, c).await;
        assert!(got.is_err(), "a token with an array of issuers was accepted: {got:?}");
    }

    #[test]
    fn jwks_urls_must_be_https_unless_loopback() {
        assert!(check_url("https://idp.example/jwks").is_ok());
        assert!(check_url("http://127.0.0.1:8080/jwks").is_ok());
        assert!(check_url("http://[::1]:8080/jwks").is_ok());
        assert!(check_url("http://localhost/jwks").is_ok());
        assert!(check_url("http://idp.example/jwks").is_err());
        assert!(check_url("ftp://x").is_err());
        // The host is what follows the userinfo: these go to idp.example in plain HTTP.
        assert!(check_url("http://localhost:80@idp.example/jwks").is_err());
        assert!(check_url("http://127.0.0.1:8080@idp.example/jwks").is_err());
        assert!(check_url("http://[::1]:1@idp.example/jwks").is_err());
        assert!(check_url("http://localhost@idp.example:80/jwks").is_err());
    }
}

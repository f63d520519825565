//! The audit log's keys: the Ed25519 key that signs segment seals and checkpoints
//! (the agent holds the private half; auditors verify with the public half), and the
//! period keys that encrypt raw results and bound parameters (XChaCha20-Poly1305, one
//! random key per UTC day, in a key directory the agent and auditors share).
//! Destroying a period's key makes that period's raw data unreadable while the chain
//! still verifies: its hashes cover the ciphertext.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    XChaCha20Poly1305, XNonce,
};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand::RngCore;
use serde_json::{json, Value};

use super::record::{hex, unhex};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("cannot write the key {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
    #[error("{path} is not a key phigate wrote ({why})")]
    Invalid { path: PathBuf, why: String },
    #[error("the key of period {0} is gone (crypto-shredded or never copied here); its raw data cannot be read")]
    PeriodKeyMissing(String),
    #[error("the sealed data does not decrypt with the key of period {0} (wrong key, or altered)")]
    Decrypt(String),
}

/// Write `bytes` to a new file readable by its owner alone (fails with
/// `AlreadyExists` if there is one).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    write_private_with(path, |f| f.write_all(bytes))
}

/// [`write_private`] with what `fill` writes. The key is written whole into a
/// temporary file beside `path` and synced, then linked into place: a write that
/// fails (a full disk) leaves no partial key that would block creating it again
/// (the temporary file is removed). `link` rather than `rename`: it never replaces a
/// key another writer made first, whose data may already be sealed with it.
fn write_private_with(path: &Path, fill: impl FnOnce(&mut fs::File) -> std::io::Result<()>) -> Result<(), KeyError> {
    let err = |err| KeyError::Write { path: path.to_path_buf(), err };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Unique per process and call: threads and agents creating the same key at once
    // each write their own, and a temporary file a crash left behind is in nobody's way.
    let tmp = dir.join(format!(".{name}.tmp-{}-{:016x}", std::process::id(), rand::random::<u64>()));
    let written = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        fs::hard_link(&tmp, path)
    })();
    let _ = fs::remove_file(&tmp);
    written.map_err(err)?;
    // The new name is durable once the directory is.
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// The signing key: 32 bytes (the Ed25519 seed) in hex.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = fs::read_to_string(path).map_err(|err| KeyError::Read { path: path.to_path_buf(), err })?;
    let bytes = unhex(text.trim()).ok_or_else(|| KeyError::Invalid { path: path.to_path_buf(), why: "not hex".into() })?;
    let seed: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Invalid { path: path.to_path_buf(), why: "not 32 bytes".into() })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Create a new signing key file (fails if one exists).
pub fn create_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    write_private(path, format!("{}\n", hex(&seed)).as_bytes())?;
    Ok(SigningKey::from_bytes(&seed))
}

pub fn public_hex(k: &VerifyingKey) -> String {
    hex(k.as_bytes())
}

/// A public key as `phigate audit verify --public-key` takes it: a file holding the
/// hex key, or the hex itself.
pub fn load_public_key(arg: &str) -> Result<VerifyingKey, KeyError> {
    let text = fs::read_to_string(arg).unwrap_or_else(|_| arg.to_string());
    let p = PathBuf::from(arg);
    let bytes = unhex(text.trim()).ok_or_else(|| KeyError::Invalid { path: p.clone(), why: "not a hex Ed25519 public key".into() })?;
    let b: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Invalid { path: p.clone(), why: "not 32 bytes".into() })?;
    VerifyingKey::from_bytes(&b).map_err(|e| KeyError::Invalid { path: p, why: e.to_string() })
}

/// What a seal or checkpoint signs: a domain tag, the segment, the sequence number and
/// the hash of the record before it.
pub fn signed_message(what: &str, segment: &str, seq: u64, prev_hash: &str) -> Vec<u8> {
    format!("phigate-audit-v1\0{what}\0{segment}\0{seq}\0{prev_hash}").into_bytes()
}

pub fn sign(key: &SigningKey, msg: &[u8]) -> String {
    hex(&key.sign(msg).to_bytes())
}

/// The keyed MAC every record carries beside its hash. The hash chain has no key, so
/// records after the last signed head could be rewritten with fresh hashes by anyone
/// who can write the directory; a rewrite cannot carry this MAC. An agent restarting
/// after a crash checks it before it seals what it finds. The key is derived from the
/// signing key (it is never stored), so `verify`, which holds only the public key,
/// cannot check it; the signatures are what it checks.
#[derive(Clone)]
pub struct RecordMac(hmac::Hmac<sha2::Sha256>);

impl RecordMac {
    pub fn new(signing: &SigningKey) -> Self {
        use hmac::Mac;
        use sha2::Digest;
        let mut derive = sha2::Sha256::new();
        derive.update(b"phigate audit record MAC v1\0");
        derive.update(signing.to_bytes());
        Self(<hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&derive.finalize()).expect("invariant: HMAC takes any key length"))
    }

    /// The MAC (hex) of the record whose hash (hex) is `hash`.
    pub fn of(&self, hash: &str) -> String {
        super::record::hex(&self.digest(hash))
    }

    /// [`RecordMac::of`] appended to the line being built (the writer's hot path).
    pub fn append(&self, hash: &str, out: &mut Vec<u8>) {
        super::record::hex_into(&self.digest(hash), out);
    }

    fn digest(&self, hash: &str) -> [u8; 32] {
        use hmac::Mac;
        let mut m = self.0.clone();
        m.update(hash.as_bytes());
        m.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for RecordMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordMac(<key>)")
    }
}

pub fn verify(key: &VerifyingKey, msg: &[u8], sig_hex: &str) -> bool {
    let Some(b) = unhex(sig_hex) else { return false };
    let Ok(b) = <[u8; 64]>::try_from(b.as_slice()) else { return false };
    key.verify(msg, &Signature::from_bytes(&b)).is_ok()
}

/// The period keys in one directory: `YYYY-MM-DD.key`, 32 random bytes each.
#[derive(Debug, Clone)]
pub struct PeriodKeys {
    pub dir: PathBuf,
}

impl PeriodKeys {
    fn path(&self, period: &str) -> PathBuf {
        self.dir.join(format!("{period}.key"))
    }

    fn load(&self, period: &str) -> Result<[u8; 32], KeyError> {
        let path = self.path(period);
        match fs::read(&path) {
            Ok(b) => b.try_into().map_err(|_| KeyError::Invalid { path, why: "not 32 bytes".into() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(KeyError::PeriodKeyMissing(period.to_string())),
            Err(err) => Err(KeyError::Read { path, err }),
        }
    }

    /// The key of `period`, created when the period starts.
    pub fn get_or_create(&self, period: &str) -> Result<[u8; 32], KeyError> {
        match self.load(period) {
            // An empty key file is what a failed write of an earlier version left (no
            // key in it, so nothing was sealed with it): made again.
            Err(KeyError::Invalid { path, .. }) if fs::metadata(&path).is_ok_and(|m| m.len() == 0) => {
                fs::remove_file(&path).map_err(|err| KeyError::Write { path: path.clone(), err })?;
                self.get_or_create(period)
            }
            Err(KeyError::PeriodKeyMissing(_)) => {
                let mut k = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut k);
                match write_private(&self.path(period), &k) {
                    Ok(()) => Ok(k),
                    // Another writer made it first: use theirs.
                    Err(KeyError::Write { err, .. }) if err.kind() == std::io::ErrorKind::AlreadyExists => self.load(period),
                    Err(e) => Err(e),
                }
            }
            other => other,
        }
    }

    /// Encrypt `plain`, bound to `context` (which record it belongs to).
    pub fn seal(&self, period: &str, context: &str, plain: &[u8]) -> Result<Value, KeyError> {
        seal_with(&self.get_or_create(period)?, period, context, plain)
    }

    pub fn open(&self, sealed: &Value, context: &str) -> Result<Vec<u8>, KeyError> {
        let period = sealed["period"].as_str().unwrap_or_default().to_string();
        let key = self.load(&period)?;
        let nonce = sealed["nonce"].as_str().and_then(|n| B64.decode(n).ok()).filter(|n| n.len() == 24).ok_or_else(|| KeyError::Decrypt(period.clone()))?;
        let ct = sealed["ct"].as_str().and_then(|c| B64.decode(c).ok()).ok_or_else(|| KeyError::Decrypt(period.clone()))?;
        let cipher = XChaCha20Poly1305::new((&key).into());
        cipher.decrypt(XNonce::from_slice(&nonce), Payload { msg: &ct, aad: context.as_bytes() }).map_err(|_| KeyError::Decrypt(period))
    }

    /// Delete the keys of every period before `day` (YYYY-MM-DD): crypto-shredding.
    pub fn shred_before(&self, day: &str) -> Result<Vec<String>, KeyError> {
        let mut gone = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(|err| KeyError::Read { path: self.dir.clone(), err })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(period) = name.strip_suffix(".key") {
                if period < day {
                    fs::remove_file(e.path()).map_err(|err| KeyError::Write { path: e.path(), err })?;
                    gone.push(period.to_string());
                }
            }
        }
        gone.sort();
        Ok(gone)
    }
}

const ALG: &str = "xchacha20poly1305";

fn seal_with(key: &[u8; 32], period: &str, context: &str, plain: &[u8]) -> Result<Value, KeyError> {
    let (nonce, ct) = encrypt(key, period, context, plain)?;
    Ok(json!({"alg": ALG, "period": period, "nonce": B64.encode(nonce), "ct": B64.encode(ct)}))
}

/// Encrypt `plain` bound to `context`: (nonce, ciphertext).
fn encrypt(key: &[u8; 32], period: &str, context: &str, plain: &[u8]) -> Result<([u8; 24], Vec<u8>), KeyError> {
    let cipher = XChaCha20Poly1305::new(key.into());
    // 192-bit random nonces from the thread's CSPRNG (ChaCha, seeded and reseeded
    // from the OS): no system call per sealed record, and no realistic collision.
    let mut nonce = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut nonce);
    let ct = cipher.encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad: context.as_bytes() }).map_err(|_| KeyError::Decrypt(period.to_string()))?;
    Ok((nonce, ct))
}

/// Period keys for sealing, with the current period's key held in memory so that
/// sealing a result reads no file; a new period loads (or creates) its key once.
/// `phigate audit shred` only destroys past periods, so the held key stays valid.
pub struct SealingKeys {
    keys: PeriodKeys,
    current: std::sync::Mutex<Option<(String, [u8; 32])>>,
}

impl std::fmt::Debug for SealingKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealingKeys({})", self.keys.dir.display())
    }
}

impl SealingKeys {
    pub fn new(keys: PeriodKeys) -> Self {
        Self { keys, current: std::sync::Mutex::new(None) }
    }

    /// [`PeriodKeys::seal`] with the current period's key (cached), as canonical JSON
    /// text (the same bytes as the sealed object's canonical form).
    pub fn seal_canonical(&self, context: &str, plain: &[u8]) -> Result<String, KeyError> {
        let period = current_period();
        let (nonce, ct) = encrypt(&self.key(&period)?, &period, context, plain)?;
        Ok(super::record::object_sized(ct.len().div_ceil(3) * 4 + 128, |o| {
            o.str("alg", ALG).b64("ct", &ct).b64("nonce", &nonce).str("period", &period);
        }))
    }

    fn key(&self, period: &str) -> Result<[u8; 32], KeyError> {
        Ok({
            let mut current = self.current.lock().expect("invariant: lock not poisoned");
            match &*current {
                Some((p, k)) if p == period => *k,
                _ => {
                    let k = self.keys.get_or_create(period)?;
                    *current = Some((period.to_string(), k));
                    k
                }
            }
        })
    }
}

/// The period (UTC day) of a record timestamp.
pub fn period_of(ts: &str) -> String {
    ts.get(..10).unwrap_or("0000-00-00").to_string()
}

/// The current period (UTC day), without formatting a whole timestamp.
pub fn current_period() -> String {
    let d = time::OffsetDateTime::now_utc().date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_open_with_their_period_key_only() {
        let dir = std::env::temp_dir().join(format!("phigate-keys-{}", std::process::id()));
        let keys = PeriodKeys { dir: dir.clone() };
        let sealed = keys.seal("2026-12-01", "stmt 1", b"raw rows").unwrap();
        assert_eq!(keys.open(&sealed, "stmt 1").unwrap(), b"raw rows");
        assert!(matches!(keys.open(&sealed, "stmt 2"), Err(KeyError::Decrypt(_))), "bound to its record");
        assert_eq!(keys.shred_before("2026-12-02").unwrap(), vec!["2026-12-01".to_string()]);
        assert!(matches!(keys.open(&sealed, "stmt 1"), Err(KeyError::PeriodKeyMissing(_))), "crypto-shredded");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_write_that_fails_leaves_nothing_in_the_way() {
        let dir = std::env::temp_dir().join(format!("phigate-keys-enospc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let keys = PeriodKeys { dir: dir.clone() };
        // The disk fills while the key is written.
        let full = write_private_with(&keys.path("2026-12-03"), |f| {
            f.write_all(&[1; 7])?;
            Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"))
        });
        assert!(matches!(full, Err(KeyError::Write { .. })), "{full:?}");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "no key file and no temporary file left");
        let k = keys.get_or_create("2026-12-03").unwrap();
        assert_eq!(keys.get_or_create("2026-12-03").unwrap(), k, "created once, then loaded");
        assert_eq!(fs::metadata(keys.path("2026-12-03")).unwrap().permissions().mode() & 0o777, 0o600);
        // An empty key file an earlier version left after such a failure: made again.
        fs::write(keys.path("2026-12-04"), b"").unwrap();
        let sealed = keys.seal("2026-12-04", "stmt 1", b"raw rows").unwrap();
        assert_eq!(keys.open(&sealed, "stmt 1").unwrap(), b"raw rows");
        // A key another writer made is never replaced.
        assert!(
            matches!(write_private(&keys.path("2026-12-03"), &[2; 32]), Err(KeyError::Write { err, .. }) if err.kind() == std::io::ErrorKind::AlreadyExists)
        );
        assert_eq!(keys.get_or_create("2026-12-03").unwrap(), k);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_current_period_is_todays_utc_date() {
        assert_eq!(current_period(), period_of(&super::super::record::now_rfc3339()));
    }

    #[test]
    fn signatures_verify_with_the_right_key_only() {
        let dir = std::env::temp_dir().join(format!("phigate-sign-{}", std::process::id()));
        let k = create_signing_key(&dir.join("signing.key")).unwrap();
        assert_eq!(load_signing_key(&dir.join("signing.key")).unwrap().to_bytes(), k.to_bytes());
        assert!(create_signing_key(&dir.join("signing.key")).is_err(), "never overwritten");
        let msg = signed_message("seal", "seg-1", 9, "ab");
        let sig = sign(&k, &msg);
        assert!(verify(&k.verifying_key(), &msg, &sig));
        let other = SigningKey::from_bytes(&[3u8; 32]);
        assert!(!verify(&other.verifying_key(), &msg, &sig));
        assert!(load_public_key(&public_hex(&k.verifying_key())).is_ok());
        let _ = fs::remove_dir_all(&dir);
    }
}

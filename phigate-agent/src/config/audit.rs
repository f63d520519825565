//! `[audit]`: where the tamper-evident log lives and the keys that protect it.
//!
//! ```toml
//! [audit]
//! dir = "/var/lib/phigate/audit"                  # segments, head.json, audit.pub
//! signing_key_file = "/var/lib/phigate/audit.keys/signing.key"   # Ed25519 (created on first start)
//! key_dir = "/var/lib/phigate/audit.keys/periods"  # one XChaCha20 key per UTC day (share with auditors)
//! segment_bytes = 67108864                         # seal and start a new segment after this
//! head_interval_secs = 10                          # signed checkpoints of the head
//! max_result_bytes = 1048576                       # per statement, results kept for replay
//! ```

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{ConfigError, Validator};

#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Only to measure overhead: off, nothing is recorded (the agent warns loudly).
    pub enabled: bool,
    pub dir: PathBuf,
    pub signing_key_file: PathBuf,
    pub key_dir: PathBuf,
    pub segment_bytes: u64,
    pub head_interval: Duration,
    pub max_result_bytes: usize,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    enabled: Option<bool>,
    dir: Option<PathBuf>,
    signing_key_file: Option<PathBuf>,
    key_dir: Option<PathBuf>,
    segment_bytes: Option<u64>,
    head_interval_secs: Option<u64>,
    max_result_bytes: Option<usize>,
}

/// `<dir>.keys`: the keys beside the log, not in it (a verifier is given the public
/// key; whoever can write the log cannot also replace what it is checked against).
pub fn default_key_home(dir: &std::path::Path) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(".keys");
    PathBuf::from(s)
}

impl Validator<'_> {
    pub(super) fn audit(&self, raw: RawAudit) -> Result<AuditConfig, ConfigError> {
        let dir = self.path(raw.dir.unwrap_or_else(|| PathBuf::from("/var/lib/phigate/audit")));
        let home = default_key_home(&dir);
        let segment_bytes = raw.segment_bytes.unwrap_or(64 << 20);
        if !(4096..=(16u64 << 30)).contains(&segment_bytes) {
            return Err(self.err("audit.segment_bytes", format!("{segment_bytes} is outside 4096..=17179869184"), "Use e.g. 67108864 (64 MiB)."));
        }
        let interval = raw.head_interval_secs.unwrap_or(10);
        if !(1..=3600).contains(&interval) {
            return Err(self.err("audit.head_interval_secs", format!("{interval} is outside 1..=3600"), "Use e.g. 10."));
        }
        let max_result = raw.max_result_bytes.unwrap_or(1 << 20);
        if max_result > 256 << 20 {
            return Err(self.err(
                "audit.max_result_bytes",
                format!("{max_result} is more than 256 MiB"),
                "Results are streamed; keep the replay snapshot small, e.g. 1048576.",
            ));
        }
        Ok(AuditConfig {
            enabled: raw.enabled.unwrap_or(true),
            signing_key_file: raw.signing_key_file.map(|p| self.path(p)).unwrap_or_else(|| home.join("signing.key")),
            key_dir: raw.key_dir.map(|p| self.path(p)).unwrap_or_else(|| home.join("periods")),
            dir,
            segment_bytes,
            head_interval: std::time::Duration::from_secs(interval),
            max_result_bytes: max_result,
        })
    }
}

//! Retention: `phigate audit prune --before DATE` removes whole sealed segments whose
//! last record is older than DATE, oldest first, and leaves a signed tombstone naming
//! the last removed record, so the remaining chain still verifies from there.
//! Only sealed segments that are not the log's last are ever removed, and only from
//! a log that verifies: the tombstone vouches for what it removed, and a tampered
//! segment deleted with it would take the evidence of tampering along.

use std::{fs, path::Path};

use ed25519_dalek::SigningKey;
use serde_json::json;

use super::{
    crypto,
    log::{replace_file, segment_name, segments, LogError, TOMBSTONE_FILE},
    record::{kind, now_rfc3339, Record},
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    pub segments: Vec<String>,
    pub through_seq: u64,
}

/// The last record of a segment (`None` when it is empty or unreadable).
fn last_record(path: &Path) -> Option<Record> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().rev().find_map(|l| Record::parse_checked(l).ok())
}

pub fn prune(dir: &Path, before: &str, key: &SigningKey) -> Result<Pruned, LogError> {
    super::verify::verify(dir, &key.verifying_key(), |_, _| {}).map_err(|f| LogError::Unverified { path: dir.to_path_buf(), failure: f.to_string() })?;
    let segs = segments(dir)?;
    let mut removed = Vec::new();
    let mut through: Option<(u64, Record)> = None;
    // Never the last segment (the live one), and only a contiguous oldest prefix.
    for (index, path) in segs.iter().take(segs.len().saturating_sub(1)) {
        let Some(last) = last_record(path) else { break };
        if last.kind != kind::SEAL || last.ts.as_str() >= before {
            break;
        }
        removed.push((*index, path.clone()));
        through = Some((*index, last));
    }
    let Some((through_index, last)) = through else { return Ok(Pruned { segments: Vec::new(), through_seq: 0 }) };
    let msg = crypto::signed_message("tombstone", &segment_name(through_index), last.seq, &last.hash);
    let tomb = json!({
        "through_segment": through_index,
        "last_seq": last.seq,
        "last_hash": last.hash,
        "removed": removed.iter().map(|(i, _)| segment_name(*i)).collect::<Vec<_>>(),
        "before": before,
        "ts": now_rfc3339(),
        "public_key": crypto::public_hex(&key.verifying_key()),
        "signature": crypto::sign(key, &msg),
    });
    // The tombstone first (atomically), then the segments it accounts for: a crash in
    // between leaves segments the tombstone already covers, which verify skips.
    // Durably, too: segments are removed only once the tombstone survives a power loss.
    replace_file(dir, TOMBSTONE_FILE, &format!("{tomb}\n"))?;
    for (_, p) in &removed {
        fs::remove_file(p).map_err(|err| LogError::Io { path: p.clone(), err })?;
    }
    Ok(Pruned { segments: removed.iter().map(|(i, _)| segment_name(*i)).collect(), through_seq: last.seq })
}

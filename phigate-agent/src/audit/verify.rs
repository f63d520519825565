//! `phigate audit verify`: prove the log was not altered. Every record's own hash and
//! bytes (each line exactly the canonical encoding the agent writes),
//! every link to the record before (across segments and across a prune's tombstone),
//! gapless sequence numbers and segment numbers, every seal and checkpoint signature
//! against a trusted public key, every segment but the last sealed, and the signed
//! head in `head.json` present in the log. The first problem found is reported with
//! its segment, line and sequence number. A torn last line of the last segment (a
//! crash while writing it: no client was told it was durable) is reported as a
//! warning, not accepted silently.
//!
//! The tail: records can be cut off the end of a chain without breaking it, so only
//! the signed head shows such a cut. The agent rewrites `head.json` after every seal
//! and checkpoint, so once the log has one (or a prune's tombstone) a missing or
//! unreadable `head.json` fails verification — else whole sealed segments could be
//! deleted from the end unnoticed. A log too young for either passes with a warning.
//! A head older than the last seal or checkpoint in the log is a warning, not a
//! failure: a crash or a failed write between committing a checkpoint and replacing
//! `head.json` leaves exactly that, and nothing is lost by it — the newer signed
//! records are in the chain and verified. An old head put back *and* the records
//! after it removed cannot be told from an older log from the directory alone: that is
//! what anchors are for — copies of `head.json` taken off the node (`--anchor FILE`,
//! any number). Each must verify with the trusted key and name a record of the chain
//! with its hash; a log that ends before an anchor's record fails.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::Path,
};

use ed25519_dalek::VerifyingKey;

use super::{
    crypto,
    log::{read_tombstone, segment_name, segments, HEAD_FILE},
    record::{kind, Record, GENESIS},
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub segments: usize,
    pub records: u64,
    pub last_seq: u64,
    pub warnings: Vec<String>,
}

/// Where verification failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{segment}, line {line}{}: {why}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
pub struct Failure {
    pub segment: String,
    pub line: usize,
    pub seq: Option<u64>,
    pub why: String,
}

fn fail(segment: &str, line: usize, seq: Option<u64>, why: impl Into<String>) -> Failure {
    Failure { segment: segment.to_string(), line, seq, why: why.into() }
}

/// A signed head kept elsewhere (a copy of `head.json`), and where it came from.
#[derive(Debug, Clone)]
pub struct Anchor {
    pub source: String,
    pub head: serde_json::Value,
}

/// Verify the log in `dir` against `key`. `progress(done, total)` hears about bytes.
pub fn verify(dir: &Path, key: &VerifyingKey, progress: impl FnMut(u64, u64)) -> Result<Report, Failure> {
    verify_anchored(dir, key, &[], progress)
}

/// [`verify`], and each anchor's record must be in the chain (see the module doc).
pub fn verify_anchored(dir: &Path, key: &VerifyingKey, anchors: &[Anchor], mut progress: impl FnMut(u64, u64)) -> Result<Report, Failure> {
    let dirname = dir.display().to_string();
    let segs = segments(dir).map_err(|e| fail(&dirname, 0, None, e.to_string()))?;
    let trusted = crypto::public_hex(key);
    let (mut seq, mut hash, mut expect_index) = match read_tombstone(dir).map_err(|e| fail("tombstone.json", 0, None, e.to_string()))? {
        Some(t) => {
            let last_seq = t["last_seq"].as_u64().ok_or_else(|| fail("tombstone.json", 1, None, "no last_seq"))?;
            let last_hash = t["last_hash"].as_str().ok_or_else(|| fail("tombstone.json", 1, None, "no last_hash"))?.to_string();
            let through = t["through_segment"].as_u64().ok_or_else(|| fail("tombstone.json", 1, None, "no through_segment"))?;
            let msg = crypto::signed_message("tombstone", &segment_name(through), last_seq, &last_hash);
            if !crypto::verify(key, &msg, t["signature"].as_str().unwrap_or("")) {
                return Err(fail("tombstone.json", 1, None, "the tombstone's signature does not verify with the trusted key"));
            }
            (last_seq, last_hash, through + 1)
        }
        None => (0, GENESIS.to_string(), 1),
    };
    let tombstoned = expect_index > 1;
    let head_path = dir.join(HEAD_FILE);
    let head = match std::fs::read_to_string(&head_path) {
        Ok(t) => Some(serde_json::from_str::<serde_json::Value>(&t).map_err(|e| {
            let why = format!("the signed head is unreadable ({e}): the agent replaces it whole, so it was altered or damaged; keep the directory as evidence");
            fail(HEAD_FILE, 1, None, why)
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            let why = format!("the signed head cannot be read ({e}): fix its permissions (run verify as the agent's user) and verify again");
            return Err(fail(HEAD_FILE, 0, None, why));
        }
    };
    if segs.is_empty() {
        if head.is_some() || tombstoned {
            let why = "head.json or tombstone.json names records, but the log has no segments: they were deleted; keep the directory as evidence";
            return Err(fail(&dirname, 0, None, why));
        }
        return Ok(Report { segments: 0, records: 0, last_seq: seq, warnings: vec!["the log has no segments".into()] });
    }
    let mut warnings = Vec::new();
    let total: u64 = segs.iter().filter_map(|(_, p)| p.metadata().ok()).map(|m| m.len()).sum();
    let mut done = 0u64;
    let mut records = 0u64;
    // The hashes of the records the signed head and the anchors name, as found.
    let mut named: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    let wanted: Vec<u64> = head.iter().chain(anchors.iter().map(|a| &a.head)).filter_map(|h| h["seq"].as_u64()).collect();
    let pruned_through = seq;
    let pruned_hash = hash.clone();
    // The last seal or checkpoint: (seq, kind). The agent writes head.json after each.
    let mut last_signed: Option<(u64, String)> = None;
    let first_kept = expect_index;
    let segs: Vec<_> = segs
        .into_iter()
        .filter(|(i, _)| {
            if *i < first_kept {
                warnings.push(format!("{} is covered by the tombstone but still present (a prune was interrupted)", segment_name(*i)));
            }
            *i >= first_kept
        })
        .collect();
    for (n, (index, path)) in segs.iter().enumerate() {
        let name = segment_name(*index);
        if *index != expect_index {
            return Err(fail(&name, 0, None, format!("expected {} next: a segment is missing or out of place", segment_name(expect_index))));
        }
        expect_index += 1;
        let is_last = n + 1 == segs.len();
        let f = File::open(path).map_err(|e| fail(&name, 0, None, e.to_string()))?;
        let mut reader = BufReader::new(f);
        let mut line_no = 0usize;
        let mut sealed = false;
        let mut buf = String::new();
        loop {
            buf.clear();
            let n = reader.read_line(&mut buf).map_err(|e| fail(&name, line_no + 1, None, format!("unreadable: {e}")))?;
            if n == 0 {
                break;
            }
            if is_last && !buf.ends_with('\n') && buf.bytes().all(|b| b == 0) {
                // The live segment's preallocated space: nothing written there yet.
                done += n as u64;
                break;
            }
            line_no += 1;
            done += n as u64;
            if done % (8 << 20) < n as u64 {
                progress(done, total);
            }
            let complete = buf.ends_with('\n');
            let parsed = Record::parse(buf.trim_end_matches('\n'));
            let r = match parsed {
                Ok(r) => r,
                Err(e) => {
                    let at_end = is_last && (!complete || reader.fill_buf().map(|b| b.is_empty()).unwrap_or(false));
                    if at_end && !complete {
                        warnings.push(format!(
                            "{name}, line {line_no}: a torn last record ({} bytes): the agent stopped while writing it; it was never acknowledged as durable",
                            buf.trim_end_matches('\0').len()
                        ));
                        break;
                    }
                    return Err(fail(&name, line_no, None, format!("not a record: {e}")));
                }
            };
            if !complete && is_last {
                warnings.push(format!("{name}, line {line_no}: the last record has no newline (torn while writing)"));
            }
            if sealed {
                return Err(fail(&name, line_no, Some(r.seq), "a record after the segment's seal"));
            }
            if r.compute_hash() != r.hash {
                return Err(fail(&name, line_no, Some(r.seq), "its hash does not match its content (altered)"));
            }
            if !r.is_line(buf.trim_end_matches('\n')) {
                return Err(fail(
                    &name,
                    line_no,
                    Some(r.seq),
                    "its bytes are not the canonical encoding of its content (altered: whitespace, escapes or repeated keys)",
                ));
            }
            if r.seq != seq + 1 {
                return Err(fail(&name, line_no, Some(r.seq), format!("expected seq {} here: records were deleted, added or reordered", seq + 1)));
            }
            if r.prev != hash {
                return Err(fail(&name, line_no, Some(r.seq), "its link to the previous record is broken (records deleted, added or reordered)"));
            }
            if r.kind == kind::SEAL || r.kind == kind::CHECKPOINT {
                if r.data["public_key"].as_str() != Some(trusted.as_str()) {
                    return Err(fail(&name, line_no, Some(r.seq), "signed with another key than the trusted one"));
                }
                if r.data["segment"].as_str() != Some(name.as_str()) {
                    return Err(fail(&name, line_no, Some(r.seq), "a signature made for another segment"));
                }
                let msg = crypto::signed_message(&r.kind, &name, r.seq, &r.prev);
                if !crypto::verify(key, &msg, r.data["signature"].as_str().unwrap_or("")) {
                    return Err(fail(&name, line_no, Some(r.seq), format!("the {} signature does not verify", r.kind)));
                }
                sealed = r.kind == kind::SEAL;
                last_signed = Some((r.seq, r.kind.clone()));
            }
            if wanted.contains(&r.seq) {
                named.insert(r.seq, r.hash.clone());
            }
            seq = r.seq;
            hash = r.hash;
            records += 1;
        }
        if !sealed && !is_last {
            return Err(fail(&name, line_no, Some(seq), "the segment ends without its seal (truncated, or records removed)"));
        }
    }
    progress(total, total);
    // The tombstone's record counts as seen (a head signed before a prune names it).
    if pruned_through > 0 {
        named.entry(pruned_through).or_insert(pruned_hash);
    }
    // Whether the log holds the record a signed head names, with its hash.
    let check_head = |h: &serde_json::Value, what: &str, file: &str, warnings: &mut Vec<String>| -> Result<u64, Failure> {
        let (hseq, hhash, hseg) = (h["seq"].as_u64().unwrap_or(0), h["hash"].as_str().unwrap_or(""), h["segment"].as_str().unwrap_or(""));
        let msg = crypto::signed_message("head", hseg, hseq, hhash);
        if !crypto::verify(key, &msg, h["signature"].as_str().unwrap_or("")) {
            return Err(fail(file, 1, Some(hseq), format!("{what} does not verify with the trusted key")));
        }
        match named.get(&hseq) {
            None if hseq < pruned_through => warnings.push(format!("{what} predates the latest prune")),
            Some(found) if found == hhash => {}
            Some(_) => return Err(fail(hseg, 0, Some(hseq), format!("the record {what} names was altered"))),
            None if hseq <= seq => return Err(fail(hseg, 0, Some(hseq), format!("the record {what} names is not in the log"))),
            None => return Err(fail(hseg, 0, Some(hseq), format!("the log ends at seq {seq}, but {what} says seq {hseq} was written: records were removed"))),
        }
        Ok(hseq)
    };
    for a in anchors {
        check_head(&a.head, &format!("the anchored head {}", a.source), &a.source, &mut warnings)?;
    }
    if let Some(h) = head {
        let hseq = check_head(&h, "the signed head", HEAD_FILE, &mut warnings)?;
        if let Some((lseq, lkind)) = last_signed.filter(|(l, _)| *l > hseq) {
            warnings.push(format!(
                "the signed head (seq {hseq}) is older than the last {lkind} in the log (seq {lseq}): head.json was put back from before, or the agent could not replace it (its log says why); \
                 the records after seq {lseq} are protected by the hash chain only"
            ));
        }
    } else if let Some((lseq, lkind)) = &last_signed {
        return Err(fail(
            HEAD_FILE,
            0,
            None,
            format!(
                "the signed head is missing, but the log has a {lkind} (seq {lseq}) and the agent writes head.json after each: without it, records or whole segments at the end could have been removed unnoticed. \
                 Restore head.json from a copy kept elsewhere and verify again; if the agent's log says it could not write head.json, keep the directory as evidence"
            ),
        ));
    } else if tombstoned {
        return Err(fail(
            HEAD_FILE,
            0,
            None,
            "the signed head is missing, but the log was pruned, so the agent had written one: records at the end could have been removed unnoticed. Restore head.json from a copy kept elsewhere and verify again",
        ));
    } else {
        warnings.push("no signed head (head.json) yet: the log has no seal or checkpoint so far, so its records are protected by the hash chain only".into());
    }
    Ok(Report { segments: segs.len(), records, last_seq: seq, warnings })
}

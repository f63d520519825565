//! The audit log on disk: append-only segment files `seg-NNNNNNNN.jsonl`, one record
//! per line, chained by hash across segments. A segment ends with a signed `seal`
//! record; signed `checkpoint` records mark the head at intervals, and `head.json`
//! (replaced atomically and durably) names the latest signed head so truncation behind
//! it shows; it is rewritten after every seal and checkpoint, which verify relies on.
//!
//! Writes are batched: records are appended to memory and [`Log::commit`] writes the
//! batch with one `write` and one `fdatasync` (group commit). [`Log::write_batch`]
//! with `sync = false` writes without the fdatasync, for records nobody waits for:
//! they are in the kernel's page cache at once (an agent crash loses none of them) and
//! made durable by the next sync. A batch that cannot be written is cut off the file
//! again and forgotten — the log on disk only ever holds whole records — and the error
//! is returned.
//!
//! A failed fdatasync is worse: Linux may have dropped the dirty pages of everything
//! written since the last successful one (and a later fdatasync can then succeed
//! without them — "fsyncgate"), so whether those records are on disk is unknown. The
//! file is cut back to its size at the last successful sync and the chain goes on
//! from there: every record written since then is treated as lost, never as durable.
//!
//! The live segment is preallocated ahead of its records, [`PREALLOCATE`] bytes of
//! zeros at a time, and records overwrite those zeros: an fdatasync then flushes data
//! only, with no file-size change for the filesystem's journal to commit. On the build
//! machine that took a flush from 204 to 140 µs idle, and from 345 to 141 µs with
//! every core busy (when the journal thread must wait for a CPU). A sealed segment is
//! cut back to its records; readers treat a run of zeros after the last record of the
//! live segment as space not yet written.
//!
//! Opening a log whose last segment was left unsealed by a crash: a torn last line
//! (or one whose hash does not match) is moved aside into `seg-….torn` (kept as
//! evidence), a `lifecycle` record says so, and the segment is sealed (and `head.json`
//! rewritten to name the seal). Nothing torn is
//! ever silently accepted. A bad line with whole records after it is not a crash's
//! doing: the log is refused, not cut back. A last segment with no whole record (a
//! crash right after a rotation) continues the chain from the previous segment's seal.
//!
//! Rotation seals the full segment before anything else; once the seal is durable
//! records only ever go to the next segment, even when writing `head.json` or opening
//! the next file fails (the next write opens it then).
//!
//! Synchronous std I/O, used by the writer thread; no tokio.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom},
    os::unix::fs::{FileExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ed25519_dalek::SigningKey;
use serde_json::{json, Value};

use super::{
    crypto::{self, PeriodKeys, RecordMac},
    record::{kind, now_rfc3339, Record, GENESIS},
};

pub const HEAD_FILE: &str = "head.json";
pub const TOMBSTONE_FILE: &str = "tombstone.json";
pub const PUBLIC_KEY_FILE: &str = "audit.pub";

/// How far ahead of its records the live segment is filled with zeros.
pub const PREALLOCATE: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("audit log {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("audit log {path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "audit log {path}: fdatasync failed ({err}); records seq {first} to {last}, written since the last successful sync, may not be on disk, \
         so they were cut off the file and the chain goes on from seq {}. Check the disk and the kernel log (dmesg); the agent retries every second",
        .first - 1
    )]
    SyncFailed { path: PathBuf, err: std::io::Error, first: u64, last: u64 },
    #[error(transparent)]
    Key(#[from] crypto::KeyError),
    #[error(
        "audit log {path}: not pruned, since it does not verify ({failure}); removing segments would remove the evidence. \
         Run phigate audit verify, find out what changed the log, and keep a copy before pruning"
    )]
    Unverified { path: PathBuf, failure: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |err| LogError::Io { path: path.to_path_buf(), err }
}

pub fn segment_name(index: u64) -> String {
    format!("seg-{index:08}.jsonl")
}

pub fn segment_index(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?.strip_suffix(".jsonl")?.parse().ok()
}

/// The segments in a directory, in order.
pub fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut v: Vec<(u64, PathBuf)> =
        fs::read_dir(dir).map_err(io(dir))?.flatten().filter_map(|e| segment_index(&e.file_name().to_string_lossy()).map(|i| (i, e.path()))).collect();
    v.sort();
    Ok(v)
}

/// The signed tombstone prune leaves: where the remaining chain starts.
pub fn read_tombstone(dir: &Path) -> Result<Option<Value>, LogError> {
    let p = dir.join(TOMBSTONE_FILE);
    match fs::read_to_string(&p) {
        Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| LogError::Corrupt { path: p, why: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LogError::Io { path: p, err: e }),
    }
}

/// What opening the log found and did.
#[derive(Debug, Default)]
pub struct Opened {
    /// A torn tail that was moved aside: (segment, bytes, where they went).
    pub torn: Option<(String, u64, PathBuf)>,
    /// The previous run's last segment had to be sealed now (a crash).
    pub sealed_after_crash: Option<String>,
}

pub struct Log {
    dir: PathBuf,
    key: SigningKey,
    /// Every record's MAC, derived from `key`.
    mac: RecordMac,
    pub keys: PeriodKeys,
    segment_bytes: u64,
    index: u64,
    file: File,
    /// `file` is the segment before `index` (sealed), because opening segment `index`
    /// failed after a rotation: the next write opens it first.
    file_stale: bool,
    /// Bytes of the segment on disk (committed).
    size: u64,
    /// Bytes of the segment file that exist (records, then zeros).
    allocated: u64,
    /// After a failed preallocation (a nearly full disk), the segment size at which to
    /// try again: not on every batch.
    preallocate_after: u64,
    /// Committed chain state.
    seq: u64,
    hash: String,
    /// Appended, not yet committed.
    batch: Vec<u8>,
    batch_seq: u64,
    batch_hash: String,
    /// Since when records have been written but not yet fdatasync'ed.
    unsynced_since: Option<std::time::Instant>,
    /// The segment's size and the chain state at the last successful sync: what a
    /// failed sync falls back to (see the module doc).
    synced_size: u64,
    synced_seq: u64,
    synced_hash: String,
    /// Syncs still to fail, to test what a failed fdatasync does.
    #[cfg(test)]
    fail_syncs: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Log {
    /// Open (or create) the log in `dir`.
    pub fn open(dir: &Path, key: SigningKey, keys: PeriodKeys, segment_bytes: u64) -> Result<(Self, Opened), LogError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        let pubfile = dir.join(PUBLIC_KEY_FILE);
        if !pubfile.exists() {
            fs::write(&pubfile, format!("{}\n", crypto::public_hex(&key.verifying_key()))).map_err(io(&pubfile))?;
        }
        let mut opened = Opened::default();
        let segs = segments(dir)?;
        let (mut seq, mut hash) = match read_tombstone(dir)? {
            Some(t) => (t["last_seq"].as_u64().unwrap_or(0), t["last_hash"].as_str().unwrap_or(GENESIS).to_string()),
            None => (0, GENESIS.to_string()),
        };
        let mut next_index = 1;
        if let Some((idx, path)) = segs.last() {
            next_index = idx + 1;
            let mac = RecordMac::new(&key);
            let Scan { last, good: good_len, data: data_len, total: total_len, unauthentic } = scan_segment(path, Some(&mac))?;
            if let Some(r) = &last {
                seq = r.seq;
                hash = r.hash.clone();
            } else if let Some((_, prev)) = segs.len().checked_sub(2).map(|i| &segs[i]) {
                // No whole record here: a crash right after a rotation, before (or while)
                // the first record reached this segment. The chain goes on from the seal
                // that ended the segment before, not from the start of the log.
                (seq, hash) = previous_seal(prev)?;
            }
            let sealed = last.as_ref().is_some_and(|r| r.kind == kind::SEAL);
            // Records after the last signed head are protected by their MACs alone:
            // before sealing what a crash left, make sure this agent's key wrote it.
            if let Some((seq, line)) = unauthentic.filter(|_| !sealed) {
                return Err(LogError::Corrupt {
                    path: path.clone(),
                    why: format!(
                        "record seq {seq} (line {line}) does not carry this agent's MAC: records of the segment the previous run left unsealed were written or rewritten by someone without the signing key. \
                         The agent changed nothing and does not start on it: run `phigate audit verify` on this directory, and keep the directory as it is (copy it aside as evidence) before starting a new log in another audit.dir."
                    ),
                });
            }
            if good_len < data_len {
                // A torn tail: keep it as evidence (without the preallocated zeros).
                let torn_path = path.with_extension(format!("jsonl.torn-{}", std::process::id()));
                let mut f = File::open(path).map_err(io(path))?;
                f.seek(SeekFrom::Start(good_len)).map_err(io(path))?;
                let mut tail = Vec::new();
                (&mut f).take(data_len - good_len).read_to_end(&mut tail).map_err(io(path))?;
                fs::write(&torn_path, &tail).map_err(io(&torn_path))?;
                opened.torn = Some((segment_name(*idx), data_len - good_len, torn_path));
            }
            if good_len < total_len {
                // Cut the segment back to its whole records.
                let f = OpenOptions::new().write(true).open(path).map_err(io(path))?;
                f.set_len(good_len).map_err(io(path))?;
                f.sync_all().map_err(io(path))?;
            }
            if !sealed {
                // The previous run ended without sealing (a crash): say what happened
                // in the chain, then seal that segment.
                let mut prev = Self::at_segment(dir, key.clone(), keys.clone(), segment_bytes, *idx, seq, hash.clone())?;
                let torn = opened.torn.as_ref().map(|(s, n, p)| json!({"segment": s, "bytes": n, "kept_in": p.display().to_string()}));
                prev.append(
                    kind::LIFECYCLE,
                    json!({"event": "recovery", "detail": "the previous agent run ended without sealing this segment", "torn_tail": torn}),
                );
                prev.seal_segment()?;
                // A sealed segment has a signed head naming it (verify insists), as
                // after a rotation or a clean stop.
                prev.write_head()?;
                seq = prev.seq;
                hash = prev.hash.clone();
                opened.sealed_after_crash = Some(segment_name(*idx));
            }
        }
        let log = Self::at_segment(dir, key, keys, segment_bytes, next_index, seq, hash)?;
        Ok((log, opened))
    }

    /// A log writing segment `index` (created if missing), after the record `seq`/`hash`.
    fn at_segment(dir: &Path, key: SigningKey, keys: PeriodKeys, segment_bytes: u64, index: u64, seq: u64, hash: String) -> Result<Self, LogError> {
        let (file, size) = open_segment(&dir.join(segment_name(index)))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            mac: RecordMac::new(&key),
            key,
            keys,
            segment_bytes,
            index,
            file,
            file_stale: false,
            size,
            allocated: size,
            preallocate_after: 0,
            seq,
            hash: hash.clone(),
            batch: Vec::new(),
            batch_seq: seq,
            batch_hash: hash.clone(),
            unsynced_since: None,
            synced_size: size,
            synced_seq: seq,
            synced_hash: hash,
            #[cfg(test)]
            fail_syncs: Default::default(),
        })
    }

    fn segment(&self) -> String {
        segment_name(self.index)
    }

    /// Append a record to the batch; returns its sequence number.
    pub fn append(&mut self, kind: &str, data: Value) -> u64 {
        self.append_canonical(kind, &super::record::canonical(&data))
    }

    /// [`Log::append`] for data already in canonical form.
    pub fn append_canonical(&mut self, kind: &str, data: &str) -> u64 {
        let seq = self.batch_seq + 1;
        let hash = super::record::append_canonical(&mut self.batch, seq, &now_rfc3339(), &self.batch_hash, kind, data, Some(&self.mac));
        self.batch_seq = seq;
        self.batch_hash = hash;
        seq
    }

    fn append_signed(&mut self, what: &str) -> u64 {
        let next = self.batch_seq + 1;
        let sig = crypto::sign(&self.key, &crypto::signed_message(what, &self.segment(), next, &self.batch_hash));
        let data = json!({"segment": self.segment(), "signature": sig, "public_key": crypto::public_hex(&self.key.verifying_key())});
        self.append(what, data)
    }

    fn append_seal(&mut self) -> u64 {
        self.append_signed(kind::SEAL)
    }

    /// A signed checkpoint of the head, and `head.json` naming it (after commit).
    pub fn checkpoint(&mut self) -> Result<(), LogError> {
        self.append_signed(kind::CHECKPOINT);
        self.commit()?;
        self.write_head()
    }

    fn write_head(&self) -> Result<(), LogError> {
        let sig = crypto::sign(&self.key, &crypto::signed_message("head", &self.segment(), self.seq, &self.hash));
        let head = json!({"segment": self.segment(), "seq": self.seq, "hash": self.hash, "ts": now_rfc3339(), "signature": sig});
        replace_file(&self.dir, HEAD_FILE, &format!("{head}\n"))
    }

    /// Records appended but not committed.
    pub fn pending(&self) -> usize {
        self.batch.len()
    }

    /// Write the batch durably (one write, one fdatasync). On failure the file is cut
    /// back to what was committed before and the batch is dropped.
    pub fn commit(&mut self) -> Result<(), LogError> {
        self.write_batch(true)
    }

    /// Since when written records wait for their fdatasync (None: all durable).
    pub fn unsynced_since(&self) -> Option<std::time::Instant> {
        self.unsynced_since
    }

    /// Write the batch (one write); with `sync`, make it and everything written before
    /// durable (one fdatasync). On failure the file is cut back to what was written
    /// before and the batch is dropped.
    pub fn write_batch(&mut self, sync: bool) -> Result<(), LogError> {
        if self.batch.is_empty() && !(sync && self.unsynced_since.is_some()) {
            return Ok(());
        }
        let path = self.dir.join(self.segment());
        if self.file_stale {
            match open_segment(&path) {
                Ok((file, size)) => {
                    (self.file, self.size, self.allocated, self.synced_size, self.file_stale) = (file, size, size, size, false);
                }
                // Never into the sealed segment still open: the batch is dropped, as
                // for any write that fails.
                Err(e) => {
                    self.drop_batch();
                    return Err(e);
                }
            }
        }
        let end = self.size + self.batch.len() as u64;
        if end > self.allocated && self.size >= self.preallocate_after {
            self.preallocate(end);
        }
        if let Err(err) = self.file.write_all_at(&self.batch, self.size) {
            let _ = self.file.set_len(self.size);
            self.allocated = self.size;
            // This sync makes the cut durable; if it fails, what was written before
            // the batch is in doubt too.
            if let Err(err) = self.sync(false) {
                return Err(self.lose_unsynced(path, err));
            }
            self.drop_batch();
            return Err(LogError::Io { path, err });
        }
        if sync {
            if let Err(err) = self.sync(false) {
                return Err(self.lose_unsynced(path, err));
            }
        }
        self.size = end;
        self.allocated = self.allocated.max(end);
        self.seq = self.batch_seq;
        self.hash = self.batch_hash.clone();
        if sync {
            self.unsynced_since = None;
            self.mark_synced();
        } else if !self.batch.is_empty() {
            self.unsynced_since.get_or_insert_with(std::time::Instant::now);
        }
        self.batch.clear();
        Ok(())
    }

    /// fdatasync (`all`: fsync, for a size change) the segment.
    fn sync(&self, all: bool) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fail_syncs.fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(std::io::Error::other("Input/output error (injected by a test)"));
        }
        if all {
            self.file.sync_all()
        } else {
            self.file.sync_data()
        }
    }

    /// Everything written is durable: a later failed sync falls back to here.
    fn mark_synced(&mut self) {
        self.synced_size = self.size;
        self.synced_seq = self.seq;
        self.synced_hash = self.hash.clone();
    }

    /// After a failed sync: whatever was written since the last successful one may be
    /// gone from the disk while the page cache (and a later, successful sync) no
    /// longer knows it. Cut the file back to what that sync made durable and go on
    /// from its record; the batch is dropped. Returns the error naming what was lost.
    fn lose_unsynced(&mut self, path: PathBuf, err: std::io::Error) -> LogError {
        let (first, last) = (self.synced_seq + 1, self.batch_seq);
        // Best effort: should these fail too, the next records overwrite the same
        // place (positioned writes), and a restart treats what follows as a torn tail.
        let _ = self.file.set_len(self.synced_size);
        let _ = self.sync(true);
        self.size = self.synced_size;
        self.allocated = self.synced_size;
        self.seq = self.synced_seq;
        self.hash = self.synced_hash.clone();
        self.unsynced_since = None;
        self.drop_batch();
        LogError::SyncFailed { path, err, first, last }
    }

    /// Forget the batch: the chain goes on from the last record written.
    fn drop_batch(&mut self) {
        self.batch.clear();
        self.batch_seq = self.seq;
        self.batch_hash = self.hash.clone();
    }

    /// Fill the file with zeros past `end`, up to the next step. Best effort: when the
    /// disk cannot take that much, the records are written without it (and the file
    /// grows with them), so a nearly full disk still takes what fits.
    fn preallocate(&mut self, end: u64) {
        let step = PREALLOCATE.min(self.segment_bytes.next_power_of_two()).max(4096);
        let target = end.div_ceil(step) * step;
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut at = self.allocated.max(self.size);
        while at < target {
            let n = (target - at).min(ZEROS.len() as u64) as usize;
            if self.file.write_all_at(&ZEROS[..n], at).is_err() {
                let _ = self.file.set_len(self.size);
                self.allocated = self.size;
                self.preallocate_after = self.size + step;
                return;
            }
            at += n as u64;
        }
        self.allocated = target;
    }

    /// Cut the zeros off a sealed segment: it holds its records and nothing else.
    fn trim(&mut self) -> Result<(), LogError> {
        if self.allocated > self.size {
            let path = self.dir.join(self.segment());
            self.file.set_len(self.size).map_err(io(&path))?;
            self.allocated = self.size;
            if let Err(err) = self.sync(true) {
                return Err(self.lose_unsynced(path, err));
            }
            self.unsynced_since = None;
            self.mark_synced();
        }
        Ok(())
    }

    /// Append the seal (after whatever is batched) and commit. The zeros are cut off
    /// first and the seal is written without new ones, so a durable seal is the last
    /// byte of its file: nothing failing afterwards can leave zeros after a seal. On
    /// failure the segment is not sealed and takes records as before.
    fn seal_segment(&mut self) -> Result<(), LogError> {
        self.trim()?;
        let preallocate_after = std::mem::replace(&mut self.preallocate_after, u64::MAX);
        self.append_seal();
        let committed = self.commit();
        self.preallocate_after = preallocate_after;
        committed
    }

    /// Seal the segment and start the next when it is full. Once the seal is durable
    /// the log has moved on, whatever fails after it: records go to the next segment
    /// (opened by the next write if it cannot be opened now), never after the seal. An
    /// error after that point (`head.json`, the next file) is still returned, for the
    /// writer to report, but needs no undoing.
    pub fn rotate_if_full(&mut self) -> Result<(), LogError> {
        if self.size < self.segment_bytes {
            return Ok(());
        }
        self.seal_segment()?;
        // The head names the seal; a failed head write leaves the previous (older)
        // head, which still verifies, and the next checkpoint writes a new one.
        let head = self.write_head();
        self.index += 1;
        (self.size, self.allocated, self.synced_size, self.preallocate_after, self.file_stale) = (0, 0, 0, 0, true);
        let path = self.dir.join(self.segment());
        let next = open_segment(&path).map(|(file, size)| {
            (self.file, self.size, self.allocated, self.synced_size, self.file_stale) = (file, size, size, size, false);
        });
        head.and(next)
    }

    /// Seal the segment (clean stop).
    pub fn seal(&mut self) -> Result<(), LogError> {
        self.seal_segment()?;
        self.write_head()
    }

    pub fn head(&self) -> (u64, &str) {
        (self.seq, &self.hash)
    }

    /// The segment file, to make writes fail in tests.
    #[cfg(test)]
    pub fn file_for_tests(&mut self) -> &mut File {
        &mut self.file
    }

    /// How many of the next syncs fail (with EIO's message), to test a failed
    /// fdatasync; shared, so it can be set after the log moved into the writer.
    #[cfg(test)]
    pub fn sync_failures_for_tests(&self) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        self.fail_syncs.clone()
    }
}

/// Replace `dir/name` with `text` atomically and durably: written to `name.tmp` and
/// synced, renamed over `name`, then the directory synced — without the syncs a power
/// loss can leave an empty file, or the old one, after the rename was reported done.
pub fn replace_file(dir: &Path, name: &str, text: &str) -> Result<(), LogError> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
    let target = dir.join(name);
    fs::rename(&tmp, &target).map_err(io(&target))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Open a segment for positioned writes (not O_APPEND: records overwrite the
/// preallocated zeros), creating it if missing; with its length.
fn open_segment(path: &Path) -> Result<(File, u64), LogError> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io(path))?;
    let size = file.metadata().map_err(io(path))?.len();
    Ok((file, size))
}

/// What a segment holds.
struct Scan {
    /// The last whole, self-consistent record.
    last: Option<Record>,
    /// The length of the prefix that holds only such records.
    good: u64,
    /// The length without trailing zeros (preallocated space).
    data: u64,
    /// The file's length.
    total: u64,
    /// The first whole record that does not carry a valid MAC (seq, line), when
    /// the scan was given the key.
    unauthentic: Option<(u64, usize)>,
}

/// Read a segment's records. A crash can only damage what was being written when it
/// happened — the end: the first line that is not a whole record (torn, partly
/// zeros, or not matching its hash) starts a torn tail when no whole record follows
/// it. When one does, that line was altered or damaged after it was written: the
/// segment is refused (an error naming the line), not cut back, because cutting it
/// would drop durable records from the chain without a trace.
fn scan_segment(path: &Path, mac: Option<&RecordMac>) -> Result<Scan, LogError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let data = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    let (mut good, mut last, mut bad_line, mut unauthentic) = (0usize, None, None, None);
    for (n, line) in bytes[..data].split_inclusive(|b| *b == b'\n').enumerate() {
        let record = line.strip_suffix(b"\n").and_then(|l| std::str::from_utf8(l).ok()).and_then(|l| Record::parse_checked(l).ok());
        match (record, bad_line) {
            (Some(r), None) => {
                good += line.len();
                if unauthentic.is_none() && mac.is_some_and(|m| r.mac.as_deref() != Some(m.of(&r.hash).as_str())) {
                    unauthentic = Some((r.seq, n + 1));
                }
                last = Some(r);
            }
            (None, None) => bad_line = Some(n + 1),
            (None, Some(_)) => {}
            (Some(r), Some(bad)) => {
                return Err(LogError::Corrupt {
                    path: path.to_path_buf(),
                    why: format!(
                        "line {bad} is not a whole record, yet whole records follow it (seq {} on line {}): it was altered or damaged after it was written, which a crash does not do. \
                         The agent changed nothing and does not start on it: run `phigate audit verify` on this directory, and keep the directory as it is (copy it aside as evidence) before starting a new log in another audit.dir.",
                        r.seq,
                        n + 1
                    ),
                })
            }
        }
    }
    Ok(Scan { last, good: good as u64, data: data as u64, total: bytes.len() as u64, unauthentic })
}

/// The chain state (seq, hash) after the seal that ends the segment at `path` — not
/// the last one, so it must be sealed and whole.
fn previous_seal(path: &Path) -> Result<(u64, String), LogError> {
    let scan = scan_segment(path, None)?;
    match scan.last {
        Some(r) if r.kind == kind::SEAL && scan.good == scan.data => Ok((r.seq, r.hash)),
        _ => Err(LogError::Corrupt {
            path: path.to_path_buf(),
            why: "a later segment exists but this one does not end with its seal, so the chain cannot go on. \
                  The agent changed nothing: run `phigate audit verify` on this directory, and keep the directory as it is (copy it aside as evidence) before starting a new log in another audit.dir."
                .into(),
        }),
    }
}

//! The log against tampering, crashes and full disks: real files, the real writer
//! code, `verify` pointing at the first bad place.

use std::{fs, path::PathBuf};

use ed25519_dalek::SigningKey;
use serde_json::json;

use super::{
    crypto::PeriodKeys,
    log::{segment_name, segments, Log, LogError},
    prune,
    record::{kind, Record},
    verify::{verify, verify_anchored, Anchor, Failure},
};

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
        let _ = fs::remove_dir_all(self.0.with_extension("keys"));
    }
}

fn dir(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("phigate-audit-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    Dir(d)
}

/// Small segments, so a short log has several (a record with its MAC is about 340 bytes).
const SEGMENT_BYTES: u64 = 1900;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// A log of three sealed segments and a live one, with a checkpoint (~30 records).
fn write_log(d: &Dir) {
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (mut log, _) = Log::open(&d.0, key(), keys, SEGMENT_BYTES).unwrap();
    for i in 0..24 {
        log.append(kind::STATEMENT, json!({"session": "s-1", "stmt": i, "text": format!("select {i}")}));
        log.commit().unwrap();
        if i == 20 {
            log.checkpoint().unwrap();
        }
        log.rotate_if_full().unwrap();
    }
    // The writer signs the head at intervals; end on one, as a running agent would.
    log.checkpoint().unwrap();
}

/// The segment being written (the last one).
fn live_segment(d: &Dir) -> PathBuf {
    segments(&d.0).unwrap().last().unwrap().1.clone()
}

fn seg(d: &Dir, n: u64) -> PathBuf {
    d.0.join(segment_name(n))
}

/// The record lines of a segment (the live one's preallocated zeros are not a line).
fn lines(p: &PathBuf) -> Vec<String> {
    fs::read_to_string(p).unwrap().lines().filter(|l| !l.bytes().all(|b| b == 0)).map(String::from).collect()
}

fn write_lines(p: &PathBuf, l: &[String]) {
    fs::write(p, l.iter().map(|x| format!("{x}\n")).collect::<String>()).unwrap();
}

fn check(d: &Dir) -> Result<super::verify::Report, Failure> {
    verify(&d.0, &key().verifying_key(), |_, _| {})
}

#[test]
fn an_untouched_log_verifies() {
    let d = dir("ok");
    write_log(&d);
    assert!(segments(&d.0).unwrap().len() >= 3, "several segments");
    let r = check(&d).unwrap();
    assert_eq!(r.records as usize, lines(&seg(&d, 1)).len() + segments(&d.0).unwrap().iter().skip(1).map(|(_, p)| lines(p).len()).sum::<usize>());
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

/// Write a log, edit the lines of its second segment, and return where verify fails.
fn verify_after_editing_segment_2(name: &str, edit: impl FnOnce(&mut Vec<String>)) -> Failure {
    let d = dir(name);
    write_log(&d);
    let p = seg(&d, 2);
    let mut l = lines(&p);
    edit(&mut l);
    write_lines(&p, &l);
    check(&d).unwrap_err()
}

#[test]
fn a_flipped_byte_is_found_where_it_is() {
    let f = verify_after_editing_segment_2("flip", |l| {
        l[1] = l[1].replacen("select", "selekt", 1);
    });
    assert_eq!((f.segment.as_str(), f.line), (segment_name(2).as_str(), 2), "{f}");
    assert!(f.why.contains("hash does not match"), "{f}");
}

#[test]
fn a_deleted_record_breaks_the_chain_there() {
    let f = verify_after_editing_segment_2("delete", |l| {
        l.remove(1);
    });
    assert_eq!((f.segment.as_str(), f.line), (segment_name(2).as_str(), 2), "{f}");
    assert!(f.why.contains("expected seq"), "{f}");
}

#[test]
fn reordered_records_are_caught() {
    let d = dir("reorder");
    write_log(&d);
    let p = seg(&d, 1);
    let mut l = lines(&p);
    l.swap(1, 2);
    write_lines(&p, &l);
    let f = check(&d).unwrap_err();
    assert_eq!((f.segment.as_str(), f.line), (segment_name(1).as_str(), 2), "{f}");
}

#[test]
fn a_truncated_segment_is_caught() {
    let d = dir("truncate");
    write_log(&d);
    let p = seg(&d, 1);
    let l = lines(&p);
    write_lines(&p, &l[..l.len() - 2]);
    let f = check(&d).unwrap_err();
    // The seal is gone: the next segment no longer links, or this one ends unsealed.
    assert!(f.segment == segment_name(1) || f.segment == segment_name(2), "{f}");
    assert!(f.why.contains("seal") || f.why.contains("expected seq"), "{f}");
    // Cutting records off the live segment behind the signed head shows too.
    let d = dir("truncate-head");
    write_log(&d);
    let last = live_segment(&d);
    let l = lines(&last);
    write_lines(&last, &l[..1]);
    let f = check(&d).unwrap_err();
    assert!(f.why.contains("signed head"), "{f}");
}

#[test]
fn a_segment_signed_with_another_key_is_rejected() {
    let d = dir("otherkey");
    write_log(&d);
    // Forge segment 2 with another key: same contents, its own chain and seal.
    let forged = dir("forger");
    let keys = PeriodKeys { dir: forged.0.with_extension("keys") };
    let (mut log, _) = Log::open(&forged.0, SigningKey::from_bytes(&[9u8; 32]), keys, 1 << 20).unwrap();
    for r in lines(&seg(&d, 1)) {
        let r = Record::parse(&r).unwrap();
        if r.kind != kind::SEAL {
            log.append(&r.kind, r.data);
        }
    }
    log.seal().unwrap();
    fs::copy(seg(&forged, 1), seg(&d, 1)).unwrap();
    let f = check(&d).unwrap_err();
    assert_eq!(f.segment, segment_name(1), "{f}");
    assert!(f.why.contains("another key") || f.why.contains("does not verify"), "{f}");
}

#[test]
fn a_torn_tail_is_reported_then_recovered_into_the_chain() {
    let d = dir("torn");
    write_log(&d);
    let last = live_segment(&d);
    let mut text = fs::read_to_string(&last).unwrap();
    text.push_str("{\"data\":{\"session\":\"s-1\",\"te");
    fs::write(&last, &text).unwrap();
    let r = check(&d).unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("torn")), "{:?}", r.warnings);
    // The next writer moves the torn bytes aside and says so in the chain.
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (mut log, opened) = Log::open(&d.0, key(), keys, SEGMENT_BYTES).unwrap();
    assert!(opened.torn.is_some() && opened.sealed_after_crash.is_some());
    log.append(kind::LIFECYCLE, json!({"event": "start"}));
    log.commit().unwrap();
    log.checkpoint().unwrap();
    let r = check(&d).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let recovery = lines(&last).iter().filter_map(|l| Record::parse(l).ok()).find(|r| r.data["event"] == "recovery").expect("a recovery record");
    assert!(recovery.data["torn_tail"]["bytes"].as_u64().unwrap() > 0);
}

#[test]
fn a_failed_commit_leaves_the_file_as_it_was() {
    let d = dir("enospc");
    write_log(&d);
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (mut log, _) = Log::open(&d.0, key(), keys, 1 << 20).unwrap();
    log.append(kind::LIFECYCLE, json!({"event": "start"}));
    log.commit().unwrap();
    // Make the segment unwritable underneath the log: the commit fails, nothing half
    // written stays, the chain state rolls back, and the next commit works again.
    let live = live_segment(&d);
    let before = fs::read(&live).unwrap();
    let (seq, hash) = (log.head().0, log.head().1.to_string());
    // A read-only file descriptor in place of the writer's: emulate EBADF on write.
    let ro = fs::File::open(&live).unwrap();
    let saved = std::mem::replace(log.file_for_tests(), ro);
    log.append(kind::STATEMENT, json!({"text": "lost"}));
    assert!(log.commit().is_err());
    assert_eq!(fs::read(&live).unwrap(), before, "nothing of the failed batch on disk");
    assert_eq!(log.head(), (seq, hash.as_str()));
    *log.file_for_tests() = saved;
    log.append(kind::STATEMENT, json!({"text": "kept"}));
    log.commit().unwrap();
    log.checkpoint().unwrap();
    check(&d).unwrap();
}

#[test]
fn prune_leaves_a_tombstone_the_rest_verifies_from() {
    let d = dir("prune");
    write_log(&d);
    let before = segments(&d.0).unwrap().len();
    let p = prune::prune(&d.0, "9999-01-01", &key()).unwrap();
    assert_eq!(p.segments.len(), before - 1, "every sealed segment but the live one");
    check(&d).unwrap();
    // The tombstone is signed: one made with another key does not verify.
    let t = d.0.join(super::log::TOMBSTONE_FILE);
    let text = fs::read_to_string(&t).unwrap().replace(&p.through_seq.to_string(), &(p.through_seq + 1).to_string());
    fs::write(&t, text).unwrap();
    assert!(check(&d).is_err());
}

#[test]
fn a_log_that_does_not_verify_is_not_pruned() {
    // A record in an old segment rewritten (its hash recomputed would not help: the
    // seal signs the chain): pruning would delete the evidence along with it.
    let d = dir("prune-tampered");
    write_log(&d);
    let (_, first) = segments(&d.0).unwrap()[0].clone();
    let text = fs::read_to_string(&first).unwrap();
    let line = text.lines().nth(1).expect("a second record");
    let altered = line.replacen("\"seq\":", "\"seq\": ", 1);
    assert_ne!(altered, line, "the record was changed");
    fs::write(&first, text.replacen(line, &altered, 1)).unwrap();
    let failure = check(&d).unwrap_err().to_string();
    let before = segments(&d.0).unwrap();
    let e = prune::prune(&d.0, "9999-01-01", &key()).unwrap_err().to_string();
    assert!(e.contains("not pruned") && e.contains(&failure) && e.contains("phigate audit verify"), "{e}");
    assert_eq!(segments(&d.0).unwrap(), before, "nothing removed");
    assert!(!d.0.join(super::log::TOMBSTONE_FILE).exists(), "no tombstone");
}

/// Through the writer thread: a sealed record is durable and opens with the period key;
/// when the key cannot be made, the waiter hears why and nothing half-written lands.
#[test]
fn the_writer_seals_raw_data_and_refuses_what_it_cannot_seal() {
    use super::{
        record::object,
        writer::{Commit, Handle},
    };
    use std::sync::mpsc;
    // As a session's statement end: the raw data sealed into the record, or the
    // reason it could not be, handed to the writer with the record's waiter.
    let wait = |h: &Handle, raw: Option<&[u8]>| {
        let (tx, rx) = mpsc::channel();
        let data = match raw {
            Some(plain) => h.seal_canonical("s-1/1", plain).map(|sealed| {
                object(|o| {
                    o.raw("raw", Some(&sealed)).str("session", "s-1").u64("stmt", 1);
                })
            }),
            None => Ok(object(|o| {
                o.str("session", "s-1").u64("stmt", 1);
            })),
        };
        h.submit_canonical(kind::STATEMENT_END, data, Some(Box::new(move |r| tx.send(r).unwrap())), Commit::Writer);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap()
    };
    let secret = || Some(&b"107-45-0007"[..]);

    let d = dir("writer-seal");
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (log, _) = Log::open(&d.0, key(), keys.clone(), 1 << 20).unwrap();
    let h = Handle::start(log, std::time::Duration::from_secs(60));
    let seq = wait(&h, secret()).expect("durable");
    h.stop(std::time::Duration::from_secs(10));
    let records: Vec<Record> = segments(&d.0).unwrap().iter().flat_map(|(_, p)| lines(p)).map(|l| Record::parse_checked(&l).unwrap()).collect();
    let r = records.iter().find(|r| r.seq == seq).unwrap();
    assert!(!r.to_line().contains("107-45-0007"), "the raw data is not in clear");
    assert_eq!(keys.open(&r.data["raw"], "s-1/1").unwrap(), b"107-45-0007");
    assert!(keys.open(&r.data["raw"], "s-1/2").is_err(), "bound to its record");

    let d = dir("writer-nokey");
    // The key directory's place is taken by a file: no period key can be created.
    fs::create_dir_all(&d.0).unwrap();
    fs::write(d.0.with_extension("keys"), b"not a directory").unwrap();
    let keys = PeriodKeys { dir: d.0.with_extension("keys").join("periods") };
    let (log, _) = Log::open(&d.0, key(), keys, 1 << 20).unwrap();
    let h = Handle::start(log, std::time::Duration::from_secs(60));
    let err = wait(&h, secret()).unwrap_err();
    assert!(err.contains("cannot encrypt"), "{err}");
    wait(&h, None).expect("records without raw data are still written");
    h.stop(std::time::Duration::from_secs(10));
    assert!(check(&d).is_ok());
    let _ = fs::remove_file(d.0.with_extension("keys"));
}

#[test]
fn records_nobody_waits_for_reach_the_file_at_once_and_are_synced_later() {
    let d = dir("lazy-sync");
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (mut log, _) = Log::open(&d.0, key(), keys, 1 << 20).unwrap();
    let before = lines(&segments(&d.0).unwrap().last().unwrap().1).len();
    log.append(kind::STATEMENT_END, json!({"session": "s-1", "stmt": 1}));
    log.write_batch(false).unwrap();
    // In the file (an agent crash keeps it), but still owed its fdatasync.
    let seg = segments(&d.0).unwrap().last().unwrap().1.clone();
    assert_eq!(lines(&seg).len(), before + 1);
    assert!(log.unsynced_since().is_some());
    // A sync with nothing new to write still flushes what was written.
    log.write_batch(true).unwrap();
    assert!(log.unsynced_since().is_none());
    log.seal().unwrap();
    assert!(check(&d).is_ok());
}

#[test]
fn the_live_segment_is_preallocated_and_a_sealed_one_holds_only_records() {
    let d = dir("prealloc");
    write_log(&d);
    let live = live_segment(&d);
    let bytes = fs::read(&live).unwrap();
    let records = bytes.iter().rposition(|b| *b == b'\n').unwrap() + 1;
    assert!(bytes.len() > records && bytes[records..].iter().all(|b| *b == 0), "zeros after the live segment's records");
    // A live log verifies with no warning about its unwritten space.
    let r = check(&d).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    for (_, p) in segments(&d.0).unwrap().iter().rev().skip(1) {
        assert!(fs::read(p).unwrap().ends_with(b"\n"), "{} is cut back to its records", p.display());
    }
    // The agent stopped without sealing (a crash): the next one seals the segment,
    // cut back to its records, and reports nothing torn.
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (mut log, opened) = Log::open(&d.0, key(), keys, SEGMENT_BYTES).unwrap();
    assert!(opened.torn.is_none(), "zeros are not a torn tail: {:?}", opened.torn);
    assert!(opened.sealed_after_crash.is_some());
    assert!(fs::read(&live).unwrap().ends_with(b"\n"));
    log.seal().unwrap();
    let r = check(&d).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn a_torn_record_inside_the_preallocated_space_is_kept_without_the_zeros() {
    let d = dir("torn-prealloc");
    write_log(&d);
    let live = live_segment(&d);
    let mut bytes = fs::read(&live).unwrap();
    let records = bytes.iter().rposition(|b| *b == b'\n').unwrap() + 1;
    let torn = b"{\"data\":{\"session\":\"s-1\",\"te";
    bytes[records..records + torn.len()].copy_from_slice(torn);
    fs::write(&live, &bytes).unwrap();
    let r = check(&d).unwrap();
    assert!(r.warnings.iter().any(|w| w.contains(&format!("torn last record ({} bytes)", torn.len()))), "{:?}", r.warnings);
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (_log, opened) = Log::open(&d.0, key(), keys, SEGMENT_BYTES).unwrap();
    let (_, n, kept) = opened.torn.expect("the torn record is reported");
    assert_eq!(n, torn.len() as u64);
    assert_eq!(fs::read(kept).unwrap(), torn);
}

/// A caller that commits its own records makes them durable on its thread, before
/// `commit_here` returns; records nobody waits for reach the file on their own within
/// the lazy bound; stopping seals everything.
#[test]
fn callers_commit_their_own_records_and_lazy_records_still_reach_the_file() {
    use super::writer::{Commit, Handle, LAZY_WITHIN};
    use std::sync::{Arc, Mutex};
    let d = dir("commit-here");
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (log, _) = Log::open(&d.0, key(), keys, 1 << 20).unwrap();
    let h = Handle::start(log, std::time::Duration::from_secs(60));
    type Answers = Arc<Mutex<Vec<(std::thread::ThreadId, Result<u64, String>)>>>;
    let got: Answers = Arc::default();
    for i in 0..3 {
        let g = got.clone();
        h.submit(
            kind::STATEMENT,
            json!({"session": "s-1", "stmt": i}),
            Some(Box::new(move |r| g.lock().unwrap().push((std::thread::current().id(), r)))),
            Commit::Caller,
        );
    }
    h.commit_here();
    let done = got.lock().unwrap().clone();
    assert_eq!(done.len(), 3, "durable before commit_here returned");
    assert!(done.iter().all(|(t, r)| *t == std::thread::current().id() && r.is_ok()), "on the caller's thread: {done:?}");
    let count = |text: &str| lines(&live_segment(&d)).iter().filter(|l| l.contains(text)).count();
    assert_eq!(count("\"kind\":\"statement\""), 3);
    // Nobody waits for this one and nothing else comes: it is written anyway.
    h.record(kind::SESSION_END, json!({"session": "s-1", "ended": "client closed"}));
    let written = (0..200).any(|_| {
        std::thread::sleep(LAZY_WITHIN.max(std::time::Duration::from_millis(5)));
        count("session_end") == 1
    });
    assert!(written, "a record nobody waits for reaches the file");
    h.stop(std::time::Duration::from_secs(10));
    assert!(check(&d).is_ok());
    // After the stop, records are refused at once (no waiter hangs).
    let (tx, rx) = std::sync::mpsc::channel();
    h.submit(kind::STATEMENT, json!({"stmt": 9}), Some(Box::new(move |r| tx.send(r).unwrap())), Commit::Caller);
    h.commit_here();
    assert!(rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap().is_err());
}

/// A log whose segment just rotated, then the agent was killed before a whole record
/// reached the new segment: returns the new (last) segment.
fn rotate_then_crash(d: &Dir) -> PathBuf {
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (mut log, _) = Log::open(&d.0, key(), keys, SEGMENT_BYTES).unwrap();
    let mut i = 0;
    while segments(&d.0).unwrap().len() < 2 {
        assert!(i < 100, "the segment rotates");
        log.append(kind::STATEMENT, json!({"session": "s-1", "stmt": i, "text": format!("select {i}")}));
        log.commit().unwrap();
        log.rotate_if_full().unwrap();
        i += 1;
    }
    drop(log);
    live_segment(d)
}

#[test]
fn a_crash_right_after_a_rotation_continues_the_chain_from_the_seal() {
    let torn: &[u8] = b"{\"data\":{\"session\":\"s-1\",\"te";
    // The new segment: empty, only preallocated zeros, a torn first record (in zeros).
    for (name, content) in [("empty", None), ("zeros", Some(vec![0u8; 4096])), ("torn", Some([torn, &[0u8; 4096][..]].concat()))] {
        let d = dir(&format!("rotate-crash-{name}"));
        let last = rotate_then_crash(&d);
        if let Some(c) = &content {
            fs::write(&last, c).unwrap();
        }
        let r = check(&d).unwrap();
        assert_eq!(r.warnings.iter().any(|w| w.contains("torn")), name == "torn", "{name}: {:?}", r.warnings);
        let keys = PeriodKeys { dir: d.0.with_extension("keys") };
        let (mut log, opened) = Log::open(&d.0, key(), keys, SEGMENT_BYTES).unwrap();
        assert_eq!(opened.torn.as_ref().map(|t| t.1), (name == "torn").then_some(torn.len() as u64), "{name}");
        assert!(opened.sealed_after_crash.is_some(), "{name}");
        log.append(kind::LIFECYCLE, json!({"event": "start"}));
        log.commit().unwrap();
        log.checkpoint().unwrap();
        let r = check(&d).unwrap_or_else(|f| panic!("{name}: {f}"));
        assert!(r.warnings.is_empty(), "{name}: {:?}", r.warnings);
        let recovery = lines(&last).iter().map(|l| Record::parse(l).unwrap()).find(|r| r.data["event"] == "recovery").expect("a recovery record");
        assert!(recovery.seq > 1, "{name}: continues the chain, not a new one");
    }
}

#[test]
fn a_failed_head_write_during_rotation_still_moves_to_the_next_segment() {
    let d = dir("rotate-head");
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (mut log, _) = Log::open(&d.0, key(), keys, SEGMENT_BYTES).unwrap();
    // A directory in the way of head.json.tmp: head.json cannot be written.
    let blocker = d.0.join(format!("{}.tmp", super::log::HEAD_FILE));
    fs::create_dir(&blocker).unwrap();
    let mut failed = 0;
    for i in 0..24 {
        log.append(kind::STATEMENT, json!({"session": "s-1", "stmt": i, "text": format!("select {i}")}));
        log.commit().unwrap();
        failed += usize::from(log.rotate_if_full().is_err());
    }
    assert!(failed >= 2, "rotations ran and reported the head they could not write");
    assert!(segments(&d.0).unwrap().len() > failed, "each rotation moved on");
    fs::remove_dir(&blocker).unwrap();
    log.checkpoint().unwrap();
    let r = check(&d).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn a_next_segment_that_cannot_be_opened_is_opened_by_the_next_write() {
    let d = dir("rotate-open");
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (mut log, _) = Log::open(&d.0, key(), keys, SEGMENT_BYTES).unwrap();
    // A directory in the way of segment 2: it cannot be opened as a file.
    fs::create_dir(seg(&d, 2)).unwrap();
    let mut i = 0;
    let err = loop {
        log.append(kind::STATEMENT, json!({"session": "s-1", "stmt": i, "text": format!("select {i}")}));
        log.commit().unwrap();
        i += 1;
        if let Err(e) = log.rotate_if_full() {
            break e;
        }
    };
    assert!(err.to_string().contains(&segment_name(2)), "{err}");
    let sealed = fs::read(seg(&d, 1)).unwrap();
    // Nothing goes after segment 1's seal: the write fails (its batch dropped) ...
    log.append(kind::STATEMENT, json!({"text": "refused"}));
    assert!(log.commit().is_err());
    assert_eq!(fs::read(seg(&d, 1)).unwrap(), sealed, "the sealed segment is untouched");
    // ... until segment 2 can be opened.
    fs::remove_dir(seg(&d, 2)).unwrap();
    log.append(kind::STATEMENT, json!({"text": "kept"}));
    log.commit().unwrap();
    log.checkpoint().unwrap();
    assert_eq!(fs::read(seg(&d, 1)).unwrap(), sealed);
    assert!(lines(&seg(&d, 2)).iter().any(|l| l.contains("kept")));
    let r = check(&d).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn a_bad_record_before_good_ones_stops_the_agent_instead_of_cutting_the_log() {
    let d = dir("bad-mid");
    write_log(&d);
    let last = live_segment(&d);
    let mut l = lines(&last);
    assert!(l.len() >= 3);
    l[1] = l[1].replacen("select", "selekt", 1);
    write_lines(&last, &l);
    let before = fs::read(&last).unwrap();
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let err = Log::open(&d.0, key(), keys, SEGMENT_BYTES).err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains(&segment_name(segments(&d.0).unwrap().last().unwrap().0)) && msg.contains("line 2"), "{msg}");
    assert!(msg.contains("phigate audit verify"), "{msg}");
    assert_eq!(fs::read(&last).unwrap(), before, "nothing cut or moved");
    assert!(check(&d).is_err(), "verify still sees it");
    // A bad last line with nothing after it (but zeros) is a torn tail: recovered.
    let d = dir("bad-last");
    write_log(&d);
    let last = live_segment(&d);
    let mut bytes = fs::read(&last).unwrap();
    let end = bytes.iter().rposition(|b| *b == b'\n').unwrap();
    let start = bytes[..end].iter().rposition(|b| *b == b'\n').unwrap() + 1;
    bytes[start + 10] ^= 1;
    let torn = end + 1 - start;
    fs::write(&last, &bytes).unwrap();
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (_log, opened) = Log::open(&d.0, key(), keys, SEGMENT_BYTES).unwrap();
    assert_eq!(opened.torn.map(|t| t.1), Some(torn as u64));
}

/// Records after the last signed head have no signature yet; after a crash the next
/// agent seals what it finds. Their MACs (keyed by the signing key) show whether the
/// agent wrote them: a rewrite with fresh hashes, or a record added, stops the agent
/// instead of being sealed into the signed log.
#[test]
fn records_rewritten_after_a_crash_without_the_key_stop_the_agent_instead_of_being_sealed() {
    let crashed = |name: &str| {
        let d = dir(name);
        write_log(&d);
        let keys = PeriodKeys { dir: d.0.with_extension("keys") };
        let (mut log, _) = Log::open(&d.0, key(), keys, 1 << 20).unwrap();
        for i in 0..3 {
            log.append(kind::STATEMENT, json!({"session": "s-2", "stmt": i, "text": format!("delete from labs where id = {i}")}));
            log.commit().unwrap();
        }
        // Dropped without a seal: a crash.
        d
    };
    let rewrite = |d: &Dir, edit: &dyn Fn(&mut Vec<String>)| {
        let last = live_segment(d);
        let mut l = lines(&last);
        assert!(l.iter().all(|x| x.contains("\"mac\":\"")), "every record carries a MAC: {l:?}");
        edit(&mut l);
        write_lines(&last, &l);
        let before = fs::read(&last).unwrap();
        let keys = PeriodKeys { dir: d.0.with_extension("keys") };
        let err = Log::open(&d.0, key(), keys, 1 << 20).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(fs::read(&last).unwrap(), before, "nothing cut, moved or sealed");
        err
    };
    // The last statement's text rewritten, its hash recomputed (no key needed for that).
    let d = crashed("rewritten-tail");
    let err = rewrite(&d, &|l| {
        let r = Record::parse(l.last().unwrap()).unwrap();
        let mut data = r.data.clone();
        data["text"] = json!("select 1");
        *l.last_mut().unwrap() = Record::new(r.seq, r.ts.clone(), r.prev.clone(), &r.kind, data).to_line().trim_end().to_string();
    });
    assert!(err.contains("does not carry this agent's MAC") && err.contains("phigate audit verify"), "{err}");
    // A record added to the chain.
    let d = crashed("added-to-tail");
    let err = rewrite(&d, &|l| {
        let r = Record::parse(l.last().unwrap()).unwrap();
        l.push(Record::new(r.seq + 1, r.ts.clone(), r.hash.clone(), kind::LIFECYCLE, json!({"event": "stop"})).to_line().trim_end().to_string());
    });
    assert!(err.contains("does not carry this agent's MAC") && err.contains(&format!("line {}", lines(&live_segment(&d)).len())), "{err}");
    // Left as the crash left it, the tail is sealed into the chain and verifies.
    let d = crashed("untouched-tail");
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (_log, opened) = Log::open(&d.0, key(), keys, 1 << 20).unwrap();
    assert!(opened.sealed_after_crash.is_some());
    assert!(check(&d).is_ok());
}

#[test]
fn a_record_with_the_same_value_in_other_bytes_is_caught() {
    let f = verify_after_editing_segment_2("noncanonical", |l| {
        l[1] = l[1].replacen(",", ", ", 1);
    });
    assert_eq!((f.segment.as_str(), f.line), (segment_name(2).as_str(), 2), "{f}");
    assert!(f.why.contains("canonical"), "{f}");
}

#[test]
fn a_failed_fdatasync_cuts_back_to_the_last_successful_one() {
    use std::sync::atomic::Ordering::SeqCst;
    let d = dir("fsyncgate");
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (mut log, _) = Log::open(&d.0, key(), keys, 1 << 20).unwrap();
    log.append(kind::LIFECYCLE, json!({"event": "start"}));
    log.commit().unwrap();
    let live = live_segment(&d);
    let durable = lines(&live);
    let (seq, hash) = (log.head().0, log.head().1.to_string());
    let fail = log.sync_failures_for_tests();
    // Records nobody waits for, written but not yet synced, then a sync that fails:
    // their pages may be gone, so they are no longer counted as written.
    log.append(kind::STATEMENT_END, json!({"session": "s-1", "stmt": 1}));
    log.write_batch(false).unwrap();
    log.append(kind::SESSION_END, json!({"session": "s-1"}));
    log.write_batch(false).unwrap();
    assert_eq!(lines(&live).len(), durable.len() + 2);
    fail.store(1, SeqCst);
    log.append(kind::STATEMENT, json!({"session": "s-2", "stmt": 1}));
    let err = log.commit().unwrap_err();
    assert!(matches!(err, LogError::SyncFailed { first, last, .. } if (first, last) == (seq + 1, seq + 3)), "{err}");
    assert!(err.to_string().contains("dmesg"), "says what to do: {err}");
    assert_eq!(lines(&live), durable, "cut back to the last successful sync");
    assert_eq!(log.head(), (seq, hash.as_str()), "the chain goes on from there");
    assert!(log.unsynced_since().is_none());
    // A sync with nothing new to write fails the same way.
    log.append(kind::STATEMENT_END, json!({"session": "s-1", "stmt": 2}));
    log.write_batch(false).unwrap();
    fail.store(1, SeqCst);
    assert!(matches!(log.write_batch(true), Err(LogError::SyncFailed { .. })));
    assert_eq!(lines(&live), durable);
    // The next records continue the chain and the log verifies.
    log.append(kind::LIFECYCLE, json!({"event": "audit_resumed"}));
    log.commit().unwrap();
    log.checkpoint().unwrap();
    let r = check(&d).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(r.last_seq, seq + 2, "the resumed record and the checkpoint follow the last durable one");
}

/// Through the writer: a failed fdatasync fails the waiting record, takes the lazy
/// records written before it off the file, and marks the log unhealthy.
#[test]
fn the_writer_treats_a_failed_fdatasync_as_losing_the_unsynced_records() {
    use super::writer::{Commit, Handle};
    use std::sync::atomic::Ordering::SeqCst;
    let d = dir("fsyncgate-writer");
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (log, _) = Log::open(&d.0, key(), keys, 1 << 20).unwrap();
    let fail = log.sync_failures_for_tests();
    let h = Handle::start(log, std::time::Duration::from_secs(60));
    // Let the writer thread settle into its sleep: the commits below then run on this
    // thread, in this order (the writer would sync the lazy record within 10 ms).
    std::thread::sleep(std::time::Duration::from_millis(50));
    h.submit(kind::STATEMENT_END, json!({"session": "s-1", "stmt": 1}), None, Commit::Caller);
    h.commit_here();
    // Written, not yet synced (nobody waits for it). Armed at once: the writer thread
    // would sync it within 10 ms, and reading the file here could take that long.
    fail.store(1, SeqCst);
    let count = |text: &str| lines(&live_segment(&d)).iter().filter(|l| l.contains(text)).count();
    let (tx, rx) = std::sync::mpsc::channel();
    h.submit(kind::STATEMENT, json!({"session": "s-1", "stmt": 2}), Some(Box::new(move |r| tx.send(r).unwrap())), Commit::Caller);
    h.commit_here();
    let err = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap().unwrap_err();
    assert!(err.contains("fdatasync failed"), "{err}");
    assert!(h.healthy().is_err(), "new statements are refused");
    assert_eq!(count("statement_end"), 0, "the unsynced record is not counted as written");
    assert_eq!(count("\"kind\":\"statement\""), 0);
    // The writer thread retries at once (its head interval here is a minute).
    let resumed = (0..500).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(10));
        h.healthy().is_ok()
    });
    assert!(resumed, "statements are accepted again once the log can be written");
    h.stop(std::time::Duration::from_secs(10));
    assert!(check(&d).is_ok());
}

#[test]
fn a_missing_or_unreadable_head_fails_once_the_log_has_a_seal_or_checkpoint() {
    let head = |d: &Dir| d.0.join(super::log::HEAD_FILE);
    // Without head.json, deleting the live segment leaves a log of sealed segments
    // whose chain is whole: only the missing head shows the cut.
    let d = dir("nohead");
    write_log(&d);
    fs::remove_file(head(&d)).unwrap();
    fs::remove_file(live_segment(&d)).unwrap();
    let f = check(&d).unwrap_err();
    assert_eq!(f.segment, super::log::HEAD_FILE, "{f}");
    assert!(f.why.contains("missing") && f.why.contains("Restore head.json"), "{f}");
    // An unreadable head fails too.
    let d = dir("badhead");
    write_log(&d);
    fs::write(head(&d), b"{\"seq\": 3, \"hash\"").unwrap();
    let f = check(&d).unwrap_err();
    assert!(f.segment == super::log::HEAD_FILE && f.why.contains("unreadable"), "{f}");
    // A pruned log had a head: without it, it fails.
    let d = dir("nohead-pruned");
    write_log(&d);
    prune::prune(&d.0, "9999-01-01", &key()).unwrap();
    check(&d).unwrap();
    fs::remove_file(head(&d)).unwrap();
    let f = check(&d).unwrap_err();
    assert!(f.segment == super::log::HEAD_FILE && f.why.contains("missing"), "{f}");
    // A log too young for a seal or checkpoint passes, with a warning.
    let d = dir("young");
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (mut log, _) = Log::open(&d.0, key(), keys, 1 << 20).unwrap();
    log.append(kind::LIFECYCLE, json!({"event": "start"}));
    log.commit().unwrap();
    let r = check(&d).unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("no signed head")), "{:?}", r.warnings);
    // After a crash, the restart seals that segment and writes the head naming it.
    drop(log);
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (_log, opened) = Log::open(&d.0, key(), keys, 1 << 20).unwrap();
    assert!(opened.sealed_after_crash.is_some());
    let r = check(&d).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn a_head_older_than_the_last_checkpoint_is_reported() {
    let d = dir("oldhead");
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (mut log, _) = Log::open(&d.0, key(), keys, 1 << 20).unwrap();
    let head = d.0.join(super::log::HEAD_FILE);
    log.append(kind::STATEMENT, json!({"stmt": 1}));
    log.checkpoint().unwrap();
    let old = fs::read(&head).unwrap();
    log.append(kind::STATEMENT, json!({"stmt": 2}));
    log.checkpoint().unwrap();
    let last = log.head().0;
    assert!(check(&d).unwrap().warnings.is_empty());
    // The older (validly signed) head put back: the log still verifies, but says so.
    fs::write(&head, &old).unwrap();
    let r = check(&d).unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("older than the last checkpoint") && w.contains(&format!("seq {last}"))), "{:?}", r.warnings);
    // A head naming records the log no longer has fails (truncation).
    let newer = dir("oldhead-newer");
    let keys = PeriodKeys { dir: newer.0.with_extension("keys") };
    let (mut log, _) = Log::open(&newer.0, key(), keys, 1 << 20).unwrap();
    for i in 0..4 {
        log.append(kind::STATEMENT, json!({"stmt": i}));
    }
    log.checkpoint().unwrap();
    fs::copy(newer.0.join(super::log::HEAD_FILE), &head).unwrap();
    let f = check(&d).unwrap_err();
    assert!(f.why.contains("signed head") && f.why.contains("records were removed"), "{f}");
}

#[test]
fn an_anchor_kept_elsewhere_shows_a_head_put_back_with_the_records_after_it_removed() {
    let d = dir("anchor");
    let keys = PeriodKeys { dir: d.0.with_extension("keys") };
    let (mut log, _) = Log::open(&d.0, key(), keys, 1 << 20).unwrap();
    let head = d.0.join(super::log::HEAD_FILE);
    let read_head = || serde_json::from_slice::<serde_json::Value>(&fs::read(&head).unwrap()).unwrap();
    for i in 0..3 {
        log.append(kind::STATEMENT, json!({"stmt": i}));
    }
    log.checkpoint().unwrap();
    let (old_head, old_segment) = (fs::read(&head).unwrap(), fs::read(live_segment(&d)).unwrap());
    for i in 3..6 {
        log.append(kind::STATEMENT, json!({"stmt": i}));
    }
    log.checkpoint().unwrap();
    // A copy of head.json taken off the node, e.g. by a job that collects it hourly.
    let anchor = Anchor { source: "anchors/head-1.json".into(), head: read_head() };
    let anchored = |d: &Dir, anchors: &[Anchor]| verify_anchored(&d.0, &key().verifying_key(), anchors, |_, _| {});
    let r = anchored(&d, std::slice::from_ref(&anchor)).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    drop(log);
    // Someone with the disk puts the older head back and cuts the log to match it:
    // the directory alone verifies, as an older log would.
    fs::write(&head, &old_head).unwrap();
    fs::write(live_segment(&d), &old_segment).unwrap();
    let alone = check(&d).unwrap();
    assert!(alone.warnings.is_empty(), "{:?}", alone.warnings);
    // The anchor shows the cut.
    let f = anchored(&d, std::slice::from_ref(&anchor)).unwrap_err();
    assert!(f.why.contains("anchors/head-1.json") && f.why.contains("records were removed"), "{f}");
    // An anchor not signed by the trusted key proves nothing and fails.
    let mut forged = anchor.clone();
    forged.head["seq"] = json!(2);
    let f = anchored(&d, &[forged]).unwrap_err();
    assert!(f.segment == "anchors/head-1.json" && f.why.contains("does not verify with the trusted key"), "{f}");
    // An older anchor the log still holds passes.
    let older = Anchor { source: "anchors/head-0.json".into(), head: serde_json::from_slice(&old_head).unwrap() };
    assert!(anchored(&d, &[older]).is_ok());
}

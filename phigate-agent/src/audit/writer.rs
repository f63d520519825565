//! The audit writer: one thread owns the [`Log`]; sessions and the agent hand it
//! records through a queue. It takes whatever has queued up (giving the senders the
//! last flush released up to [`GATHER_WITHIN`] to come back), appends it, and makes
//! it durable with one fdatasync (group commit), then tells each waiting sender.
//!
//! Only what someone waits for wakes the writer: a statement record (its result is
//! held until it is durable), a flush, a stop. Records nobody waits for (statement
//! outcomes, session ends, bypass and lifecycle events) queue without waking it (but
//! for the first of a run, which shortens the writer's sleep to [`LAZY_WITHIN`]) and go
//! to the file with the next batch, or within [`LAZY_WITHIN`] when none comes: waking
//! a sleeping thread costs two context switches, which on the 2-core build machine was
//! a larger share of a statement's audit cost than the disk flush. They are synced
//! with the next batch someone waits for, or within [`SYNC_WITHIN`]: one fdatasync per
//! statement, not two. An agent crash loses at most the last [`LAZY_WITHIN`] of those
//! records, a power loss the last [`SYNC_WITHIN`] — never a statement record whose
//! result was released.
//! Signed checkpoints go in at an interval; full segments are sealed and rotated.
//!
//! When a write fails (disk full, permissions) the writer marks the log unhealthy:
//! callers refuse new statements while [`Handle::healthy`] says so. It keeps trying,
//! once a second, to write a `lifecycle` record saying it failed; when that succeeds
//! the log is healthy again. A failed fdatasync is such a failure too, and a wider
//! one: the [`Log`] cuts off everything written since the last successful sync (the
//! records nobody waits for among them), because a later sync may succeed without
//! them. Their waiters all wait in the failed batch — a waiter hears of its record
//! only after a successful sync — and are told it failed.
//!
//! Senders do the per-record work themselves — sealing raw data with the period key
//! and the canonical encoding of the record's data — so that the one writer thread
//! only chains, hashes and writes: its time per record bounds the log's throughput.
//!
//! std threads, a mutex and a condition variable; no tokio.

use std::{
    sync::{mpsc, Arc, Condvar, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::{crypto::SealingKeys, log::Log, record::canonical};

/// Told once the record is durable (its sequence number) or could not be written.
pub type Durable = Box<dyn FnOnce(Result<u64, String>) + Send>;

enum Entry {
    /// `data` in canonical form.
    Record {
        kind: &'static str,
        data: String,
        done: Option<Durable>,
    },
    Flush(Durable),
    Stop(mpsc::Sender<()>),
}

impl Entry {
    /// Whether someone waits for this entry (it wakes the writer).
    fn awaited(&self) -> bool {
        !matches!(self, Entry::Record { done: None, .. })
    }

    /// Tell whoever waits that the writer is gone.
    fn refuse(self) {
        let why = || "the audit writer has stopped".to_string();
        match self {
            Entry::Record { done: Some(d), .. } | Entry::Flush(d) => d(Err(why())),
            _ => {}
        }
    }
}

/// Whether the log can be written, and why not.
#[derive(Default)]
struct Health {
    failure: Mutex<Option<String>>,
}

#[derive(Default)]
struct QueueState {
    entries: Vec<Entry>,
    /// Entries in `entries` someone waits for.
    awaited: usize,
    /// When the oldest entry nobody waits for was queued.
    lazy_since: Option<Instant>,
    /// The writer sleeps on the condition variable: an awaited entry must wake it.
    writer_asleep: bool,
    /// How many awaited entries must be queued before a sender wakes the writer: 1,
    /// or while it gathers a batch, as many as it waits for — not one wake-up (two
    /// thread switches) per arriving record. Measured at pgbench -c 8: the writer's
    /// context switches 10.3k → 5.7k/s, its CPU 28% → 21% of a core.
    wake_at: usize,
    /// Every handle is gone: the writer seals and stops.
    senders_gone: bool,
    /// The writer has stopped: entries are refused at once.
    closed: bool,
}

/// The queue between senders and the writer thread.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().expect("invariant: lock not poisoned")
    }

    /// Queue an entry. `wake`: the writer thread must see it soon (nobody else will
    /// commit it); otherwise the caller commits it with [`Handle::commit_here`].
    fn push(&self, e: Entry, wake: bool) {
        let mut q = self.lock();
        if q.closed {
            drop(q);
            e.refuse();
            return;
        }
        // The first record nobody waits for wakes the writer too, so that its sleep
        // ends in time to write it within LAZY_WITHIN.
        let first_lazy = !e.awaited() && q.lazy_since.is_none();
        if e.awaited() {
            q.awaited += 1;
        } else if first_lazy {
            q.lazy_since = Some(Instant::now());
        }
        q.entries.push(e);
        if wake && (first_lazy || q.awaited >= q.wake_at) {
            Self::wake(&self.wake, &mut q);
        }
    }

    /// Take every queued entry, appending them to `into`.
    fn drain(q: &mut QueueState, into: &mut Vec<Entry>) {
        into.append(&mut q.entries);
        q.awaited = 0;
        q.lazy_since = None;
    }

    /// Wake the writer thread if it sleeps and enough is queued for it.
    fn wake_writer(&self, q: &mut QueueState) {
        if q.awaited >= q.wake_at {
            Self::wake(&self.wake, q);
        }
    }

    fn wake(cv: &Condvar, q: &mut QueueState) {
        if q.writer_asleep {
            q.writer_asleep = false;
            cv.notify_one();
        }
    }
}

/// The log and what is written with it; whoever writes holds the lock (the writer
/// thread, or a caller committing its own records: [`Handle::commit_here`]).
struct Writing {
    log: Log,
    /// Records were written since the last signed checkpoint.
    dirty: bool,
}

/// What the writer thread and the handles share.
struct Shared {
    queue: Queue,
    writing: Mutex<Writing>,
    health: Health,
    /// Waiters the latest flush released: how contended commits are.
    last_waiters: std::sync::atomic::AtomicUsize,
}

/// Held by every [`Handle`]; when the last one goes, the writer is told to stop.
struct Senders(Arc<Shared>);

impl Drop for Senders {
    fn drop(&mut self) {
        let mut q = self.0.queue.lock();
        q.senders_gone = true;
        self.0.queue.wake.notify_one();
    }
}

/// A handle on the writer; cheap to clone.
#[derive(Clone)]
pub struct Handle {
    senders: Arc<Senders>,
    keys: Arc<SealingKeys>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("audit::Handle")
    }
}

/// Who makes a queued record's batch durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The writer thread (woken if it sleeps).
    Writer,
    /// The caller, soon, with [`Handle::commit_here`].
    Caller,
}

/// Most records one commit takes (bounds the batch's memory and latency).
const MAX_BATCH: usize = 4096;

/// Longest a written record nobody waits for stays without its fdatasync.
pub const SYNC_WITHIN: Duration = Duration::from_millis(10);

/// Above this many waiters per flush, callers leave commits to the writer thread
/// ([`Handle::commit_here`]).
const CONTENDED: usize = 2;

/// Longest a record nobody waits for stays queued before it is written.
pub const LAZY_WITHIN: Duration = Duration::from_millis(1);

/// How long a batch may wait for the senders the last flush released to come back
/// (PostgreSQL's `commit_delay`, bounded by how many there were): less than one
/// flush (235 µs on the build machine's disk), so their records share the next flush
/// instead of waiting for the one after. Measured: 8 writers 10.5k → 17.5k records/s.
const GATHER_WITHIN: Duration = Duration::from_micros(200);

impl Handle {
    /// Start the writer thread on an opened log.
    pub fn start(log: Log, head_interval: Duration) -> Self {
        let keys = Arc::new(SealingKeys::new(log.keys.clone()));
        let shared = Arc::new(Shared {
            queue: Queue::default(),
            writing: Mutex::new(Writing { log, dirty: false }),
            health: Health::default(),
            last_waiters: Default::default(),
        });
        let (sh, probe) = (shared.clone(), keys.clone());
        thread::Builder::new().name("phigate-audit".into()).spawn(move || run(&sh, &probe, head_interval)).expect("invariant: the audit thread starts");
        Self { senders: Arc::new(Senders(shared)), keys }
    }

    /// Ok if records can be written; else why not.
    pub fn healthy(&self) -> Result<(), String> {
        match &*self.senders.0.health.failure.lock().expect("invariant: lock not poisoned") {
            None => Ok(()),
            Some(e) => Err(e.clone()),
        }
    }

    /// Queue a record; nobody waits for it.
    pub fn record(&self, kind: &'static str, data: Value) {
        self.submit(kind, data, None, Commit::Writer);
    }

    /// Queue a record, with a waiter (`done`) if it has one. With [`Commit::Caller`]
    /// the writer thread is not woken: a worker that commits its sessions' records
    /// once per turn saves the two thread switches per statement a hand-off costs.
    pub fn submit(&self, kind: &'static str, data: Value, done: Option<Durable>, commit: Commit) {
        self.submit_canonical(kind, Ok(canonical(&data)), done, commit);
    }

    /// [`Handle::submit`] for data already in canonical form (built with
    /// [`super::record::Obj`]), or the reason it could not be built (its waiter hears
    /// it; nothing is written).
    pub fn submit_canonical(&self, kind: &'static str, data: Result<String, String>, done: Option<Durable>, commit: Commit) {
        match data {
            Ok(data) => self.senders.0.queue.push(Entry::Record { kind, data, done }, commit == Commit::Writer),
            Err(why) => {
                if let Some(d) = done {
                    d(Err(why));
                }
            }
        }
    }

    /// Seal raw data with the current period's key, as canonical JSON for a record's
    /// field. Fail closed: the error is the reason to give the statement's waiter (a
    /// record whose raw data cannot be sealed is not written half).
    pub fn seal_canonical(&self, context: &str, plain: &[u8]) -> Result<String, String> {
        self.keys.seal_canonical(context, plain).map_err(|err| {
            let why = format!("cannot encrypt the record's raw data: {err}");
            tracing::error!(error = %err, "audit: raw data could not be encrypted; new statements are refused until it can");
            // Fail closed: a result already released keeps its record (without the
            // raw data, saying why), but no new statement runs until the writer finds
            // the keys usable again.
            *self.senders.0.health.failure.lock().expect("invariant: lock not poisoned") = Some(why.clone());
            why
        })
    }

    /// Write, on the calling thread, everything queued, and make it durable if someone
    /// waits for it (group commit: other callers' records go in the same fdatasync).
    /// If another thread is writing, or many callers commit at once, the writer
    /// thread takes them instead and this returns at once.
    pub fn commit_here(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let sh = &self.senders.0;
        {
            let mut q = sh.queue.lock();
            if q.entries.is_empty() {
                return;
            }
            if sh.last_waiters.load(Relaxed) > CONTENDED {
                // Many sessions commit at once: the writer thread gathers them into
                // one flush while the workers keep serving (a worker blocked in a
                // flush cannot queue its own sessions' next records).
                sh.queue.wake_writer(&mut q);
                return;
            }
        }
        if let Ok(mut w) = sh.writing.try_lock() {
            let mut entries = Vec::new();
            Queue::drain(&mut sh.queue.lock(), &mut entries);
            let waiters = waiters(&entries);
            if waiters > 0 {
                sh.last_waiters.store(waiters, Relaxed);
            }
            let stop = write_out(&mut w, &sh.health, entries, false);
            if finish(&mut w, sh, stop) {
                return;
            }
            if sh.health.failure.lock().expect("invariant: lock not poisoned").is_some() {
                // The writer thread retries, but sleeps until something awaited is
                // queued, and statements are refused meanwhile: give it that now.
                drop(w);
                self.flush(Box::new(|_| {}));
                return;
            }
        }
        // Whatever is queued now — records of callers that found the lock taken, or
        // of this one if it did — is the writer thread's: it gathers them (and
        // whoever comes next) into one flush, while this thread goes back to work.
        let mut q = sh.queue.lock();
        if !q.entries.is_empty() {
            sh.queue.wake_writer(&mut q);
        }
    }

    /// Be told when everything queued so far is durable.
    pub fn flush(&self, done: Durable) {
        self.senders.0.queue.push(Entry::Flush(done), true);
    }

    /// Seal the current segment and stop (bounded wait).
    pub fn stop(&self, within: Duration) {
        let (tx, rx) = mpsc::channel();
        self.senders.0.queue.push(Entry::Stop(tx), true);
        let _ = rx.recv_timeout(within);
    }
}

/// Wait until there is work — an awaited entry, entries nobody waits for that are
/// old enough (or many), or `wait` passing — and move the queued entries to `spare`.
/// Returns whether every sender is gone (or the writer was stopped).
fn take(queue: &Queue, wait: Duration, spare: &mut Vec<Entry>) -> bool {
    let deadline = Instant::now() + wait;
    let mut q = queue.lock();
    loop {
        let now = Instant::now();
        let lazy_due = q.lazy_since.map(|t| t + LAZY_WITHIN);
        if q.senders_gone || q.closed || q.awaited > 0 || q.entries.len() >= MAX_BATCH || lazy_due.is_some_and(|t| t <= now) || now >= deadline {
            break;
        }
        let until = lazy_due.map_or(deadline, |t| t.min(deadline));
        q.writer_asleep = true;
        q.wake_at = 1;
        q = queue.wake.wait_timeout(q, until - now).expect("invariant: lock not poisoned").0;
        q.writer_asleep = false;
    }
    Queue::drain(&mut q, spare);
    q.senders_gone || q.closed
}

/// After a flush released `want` senders, give them up to [`GATHER_WITHIN`] to queue
/// their next awaited entries, so they share the next flush.
fn gather(queue: &Queue, want: usize, have: usize, entries: &mut Vec<Entry>) {
    let until = Instant::now() + GATHER_WITHIN;
    let mut q = queue.lock();
    while have + q.awaited < want && entries.len() + q.entries.len() < MAX_BATCH {
        let Some(left) = until.checked_duration_since(Instant::now()) else { break };
        q.writer_asleep = true;
        q.wake_at = want - have;
        let (g, timeout) = queue.wake.wait_timeout(q, left).expect("invariant: lock not poisoned");
        q = g;
        q.writer_asleep = false;
        if timeout.timed_out() {
            break;
        }
    }
    q.wake_at = 1;
    Queue::drain(&mut q, entries);
}

/// Records in `entries` whose senders wait for them.
fn waiters(entries: &[Entry]) -> usize {
    entries.iter().filter(|e| matches!(e, Entry::Record { done: Some(_), .. })).count()
}

fn run(sh: &Shared, keys: &SealingKeys, head_interval: Duration) {
    let queue = &sh.queue;
    let health = &sh.health;
    let mut last_checkpoint = Instant::now();
    // Senders the last flush released: as many are likely to be back soon.
    let mut last_waiters = 0usize;
    let mut entries: Vec<Entry> = Vec::new();
    loop {
        let failing = health.failure.lock().expect("invariant: lock not poisoned").is_some();
        let (dirty, unsynced) = {
            let w = sh.writing.lock().expect("invariant: lock not poisoned");
            (w.dirty, w.log.unsynced_since())
        };
        // Wake for the next signed head only when there is something new to sign: an
        // idle log sleeps.
        let mut wait = match (failing, dirty) {
            (true, _) => Duration::from_secs(1),
            (false, true) => head_interval.saturating_sub(last_checkpoint.elapsed()),
            (false, false) => head_interval,
        };
        if let Some(since) = unsynced {
            wait = wait.min(SYNC_WITHIN.saturating_sub(since.elapsed()));
        }
        let wait = wait.max(Duration::from_micros(100));
        entries.clear();
        let gone = take(queue, wait, &mut entries);
        // Group commit: when several senders were released together, give the rest
        // of them a moment to join this batch (a lone sender never waits).
        let mut waiting = waiters(&entries);
        if !gone && waiting > 0 && last_waiters > 1 && waiting < last_waiters {
            gather(queue, last_waiters, waiting, &mut entries);
            waiting = waiters(&entries);
        }
        if waiting > 0 {
            last_waiters = waiting;
            sh.last_waiters.store(waiting, std::sync::atomic::Ordering::Relaxed);
        }
        let mut w = sh.writing.lock().expect("invariant: lock not poisoned");
        if queue.lock().closed {
            // A caller committing its own records took the stop request and sealed.
            return;
        }
        if gone {
            // Every handle is gone: write what is left and seal.
            write_out(&mut w, health, std::mem::take(&mut entries), true);
            let _ = w.log.seal();
            close(queue);
            return;
        }
        // Try to come back (once the period key can seal again, if that was the
        // failure): a record saying what went wrong.
        if failing && keys.seal_canonical("probe", b"").is_ok() {
            let why = health.failure.lock().expect("invariant: lock not poisoned").clone().unwrap_or_default();
            w.log.append("lifecycle", json!({"event": "audit_resumed", "after": why}));
            if w.log.commit().is_ok() {
                *health.failure.lock().expect("invariant: lock not poisoned") = None;
                tracing::warn!("the audit log can be written again; statements are accepted again");
            }
        }
        let stop = write_out(&mut w, health, std::mem::take(&mut entries), false);
        if w.dirty && last_checkpoint.elapsed() >= head_interval && health.failure.lock().expect("invariant: lock not poisoned").is_none() {
            if let Err(e) = w.log.checkpoint() {
                tracing::error!(error = %e, "audit checkpoint failed");
            }
            last_checkpoint = Instant::now();
            w.dirty = false;
        }
        if finish(&mut w, sh, stop) {
            return;
        }
    }
}

/// After a write: rotate a full segment; on a stop request seal, close the queue and
/// answer it. Returns whether the writer has stopped.
fn finish(w: &mut Writing, sh: &Shared, stop: Option<mpsc::Sender<()>>) -> bool {
    if let Err(e) = w.log.rotate_if_full() {
        tracing::error!(error = %e, "audit segment rotation failed");
        *sh.health.failure.lock().expect("invariant: lock not poisoned") = Some(e.to_string());
    }
    match stop {
        Some(tx) => {
            let _ = w.log.seal();
            close(&sh.queue);
            let _ = tx.send(());
            true
        }
        None => false,
    }
}

/// Refuse what is still queued and whatever comes later: the writer is stopping.
fn close(queue: &Queue) {
    let left = {
        let mut q = queue.lock();
        q.closed = true;
        q.awaited = 0;
        queue.wake.notify_one();
        std::mem::take(&mut q.entries)
    };
    for e in left {
        e.refuse();
    }
}

/// Append `entries`, write them (with an fdatasync when someone waits, or when
/// `force_sync`), and tell the waiters. Returns the stop request among them, if any.
fn write_out(w: &mut Writing, health: &Health, entries: Vec<Entry>, force_sync: bool) -> Option<mpsc::Sender<()>> {
    let log = &mut w.log;
    let mut waiting: Vec<(Durable, u64)> = Vec::new();
    let mut flushes: Vec<Durable> = Vec::new();
    let mut stop: Option<mpsc::Sender<()>> = None;
    for e in entries {
        match e {
            Entry::Record { kind, data, done } => {
                let seq = log.append_canonical(kind, &data);
                if let Some(d) = done {
                    waiting.push((d, seq));
                }
            }
            Entry::Flush(d) => flushes.push(d),
            Entry::Stop(tx) => stop = Some(tx),
        }
    }
    let had = log.pending() > 0;
    let sync = force_sync || !waiting.is_empty() || !flushes.is_empty() || stop.is_some() || log.unsynced_since().is_some_and(|t| t.elapsed() >= SYNC_WITHIN);
    match log.write_batch(sync) {
        Ok(()) => {
            for (d, seq) in waiting {
                d(Ok(seq));
            }
            let (seq, _) = log.head();
            for d in flushes {
                d(Ok(seq));
            }
        }
        Err(e) => {
            let why = e.to_string();
            tracing::error!(error = %why, "the audit log cannot be written; new statements are refused until it can");
            *health.failure.lock().expect("invariant: lock not poisoned") = Some(why.clone());
            for (d, _) in waiting {
                d(Err(why.clone()));
            }
            for d in flushes {
                d(Err(why.clone()));
            }
        }
    }
    w.dirty |= had;
    stop
}

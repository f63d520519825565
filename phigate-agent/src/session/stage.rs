//! The per-message pipeline. Every frontend message (client → database) and backend
//! message (database → client) of an established session passes through the stages
//! in order; each may observe it, and a stage may refuse it. Policy, approval,
//! masking and audit are stages; the relay does not know what they do.
//!
//! Order is fixed and meaningful: frontend messages go through the stages first to
//! last, backend messages last to first, so that a stage placed late (e.g. audit)
//! sees a backend message before one placed early (e.g. masking) rewrites it.

use std::sync::{
    atomic::{AtomicU64, AtomicU8, Ordering::Relaxed},
    Arc,
};

use super::Session;
use crate::pg::{msg::tag, Frame, PgError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → database.
    Frontend,
    /// Database → client.
    Backend,
}

/// A stage's decision about one message.
pub enum Action {
    /// Pass it on (to the next stage, then the other side).
    Forward,
    /// Refuse it. For a client message the relay answers in protocol terms and the
    /// session goes on; for a database message the session fails closed.
    Refuse(PgError),
    /// Hold a message until the future completes, telling the client why with an
    /// optional notice. A client message (approvals) goes on to the stages after
    /// this one once the future says yes. A database message (a catalog lookup
    /// masking needs) is offered to the same stage again once the future completes;
    /// nothing more from the database is read meanwhile.
    Hold(super::relay::HoldFuture, Option<PgError>),
    /// Send these complete messages instead (a rewritten row; none: drop it). The
    /// stages before this one see the replacements.
    Replace(crate::pg::frame::Messages),
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Forward => f.write_str("Forward"),
            Self::Refuse(e) => write!(f, "Refuse({e})"),
            Self::Hold(..) => f.write_str("Hold"),
            Self::Replace(parts) => write!(f, "Replace({} messages)", parts.len()),
        }
    }
}

/// What the stages made of database messages: the messages to send to the client
/// now, in order, and what stopped the run, if anything did.
pub struct Backend {
    pub out: crate::pg::frame::Messages,
    pub stop: Option<BackendStop>,
}

pub enum BackendStop {
    /// A stage refused a database message: the session fails closed.
    Refuse(PgError),
    /// A stage holds a database message until its future completes.
    Hold(HeldBackend),
}

/// A database message a stage holds, and the messages queued behind it.
pub struct HeldBackend {
    /// The message as the holding stage saw it (already rewritten by later stages).
    pub frame: Frame,
    /// The holding stage: it sees `frame` again on release.
    pub stage: usize,
    pub decision: super::relay::HoldFuture,
    pub notice: Option<PgError>,
    /// Messages not yet through the pipeline, as a [`Pipeline::backend_resume`] stack.
    pub rest: Vec<(Frame, usize)>,
}

impl HeldBackend {
    /// The work to resume with once the decision is in.
    pub fn resume(self) -> Vec<(Frame, usize)> {
        let mut work = self.rest;
        work.push((self.frame, self.stage + 1));
        work
    }
}

pub trait Stage: Send {
    fn name(&self) -> &'static str;

    /// Whether frames of this type must arrive whole (not streamed in chunks).
    fn needs_whole(&self, _direction: Direction, _tag: u8) -> bool {
        false
    }

    fn frontend(&mut self, _session: &Session, _frame: &Frame) -> Action {
        Action::Forward
    }

    fn backend(&mut self, _session: &Session, _frame: &Frame) -> Action {
        Action::Forward
    }

    /// A frame too large to hold is being streamed through (`needs_whole` said no).
    fn streamed(&mut self, _session: &Session, _direction: Direction, _tag: u8, _len: usize) {}

    /// The session is over: how it ended, and what it did.
    fn closed(&mut self, _session: &Session, _how: &str, _stats: &Stats) {}
}

/// The stages of one session.
#[derive(Default)]
pub struct Pipeline {
    stages: Vec<Box<dyn Stage>>,
    /// The empty work stack of [`Pipeline::backend_resume`], kept between messages.
    work: Vec<(Frame, usize)>,
}

impl Pipeline {
    pub fn new(stages: Vec<Box<dyn Stage>>) -> Self {
        Self { stages, work: Vec::new() }
    }

    pub fn needs_whole(&self, direction: Direction, tag: u8) -> bool {
        self.stages.iter().any(|s| s.needs_whole(direction, tag))
    }

    /// Run a client message through the stages; returns the decision and the index of
    /// the stage that made it.
    pub fn frontend(&mut self, session: &Session, frame: &Frame) -> (Action, usize) {
        self.frontend_from(0, session, frame)
    }

    /// Continue with the stages from `start` (after a held message is released).
    pub fn frontend_from(&mut self, start: usize, session: &Session, frame: &Frame) -> (Action, usize) {
        for (i, s) in self.stages.iter_mut().enumerate().skip(start) {
            match s.frontend(session, frame) {
                Action::Forward => {}
                other => return (other, i),
            }
        }
        (Action::Forward, self.stages.len())
    }

    /// Run a database message through the stages, last to first.
    pub fn backend(&mut self, session: &Session, frame: Frame) -> Backend {
        let end = self.stages.len();
        let mut work = std::mem::take(&mut self.work);
        work.push((frame, end));
        self.backend_resume(session, work)
    }

    /// Run database messages through the stages. `work` is a stack (the last entry
    /// goes first) of messages, each with the number of stages still to pass, counted
    /// from stage 0: `end` means stages `end - 1` down to 0.
    ///
    /// A stage's replacements pass through the stages before it only, in order. When
    /// a stage holds a message, the hold names *that* message — a replacement if an
    /// earlier-running stage rewrote it — and everything not yet processed waits in
    /// `rest`: a released hold must never resume with the original of a rewritten
    /// message (that would send unmasked data once the audit lets it go).
    pub fn backend_resume(&mut self, session: &Session, mut work: Vec<(Frame, usize)>) -> Backend {
        let mut out = crate::pg::frame::Messages::new();
        'messages: while let Some((frame, end)) = work.pop() {
            for i in (0..end.min(self.stages.len())).rev() {
                match self.stages[i].backend(session, &frame) {
                    Action::Forward => {}
                    Action::Replace(parts) => {
                        // The earlier stages see what is actually sent.
                        work.extend(parts.into_iter().rev().map(|p| (Frame::from_bytes(p), i)));
                        continue 'messages;
                    }
                    Action::Refuse(err) => return Backend { out, stop: Some(BackendStop::Refuse(err)) },
                    Action::Hold(decision, notice) => {
                        let stop = BackendStop::Hold(HeldBackend { frame, stage: i, decision, notice, rest: work });
                        return Backend { out, stop: Some(stop) };
                    }
                }
            }
            out.push(frame.into_bytes());
        }
        // Kept for the next message: no allocation per row.
        self.work = work;
        Backend { out, stop: None }
    }

    pub fn closed(&mut self, session: &Session, how: &str, stats: &Stats) {
        for s in self.stages.iter_mut() {
            s.closed(session, how, stats);
        }
    }

    pub fn streamed(&mut self, session: &Session, direction: Direction, tag: u8, len: usize) {
        for s in self.stages.iter_mut() {
            s.streamed(session, direction, tag, len);
        }
    }
}

/// Counts what a session did, for the session-end record: statements, rows, bytes,
/// errors, and the transaction state from the last ReadyForQuery.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub queries: u64,
    pub executes: u64,
    pub rows: u64,
    pub errors: u64,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
    pub tx_status: u8,
}

/// The counters behind [`Stats`]; relaxed atomics because only the session's own task
/// writes them and it reads them after the relay ends.
#[derive(Debug, Default)]
pub struct StatsCell {
    queries: AtomicU64,
    executes: AtomicU64,
    rows: AtomicU64,
    errors: AtomicU64,
    bytes_to_server: AtomicU64,
    bytes_to_client: AtomicU64,
    tx_status: AtomicU8,
}

impl StatsCell {
    pub fn snapshot(&self) -> Stats {
        Stats {
            queries: self.queries.load(Relaxed),
            executes: self.executes.load(Relaxed),
            rows: self.rows.load(Relaxed),
            errors: self.errors.load(Relaxed),
            bytes_to_server: self.bytes_to_server.load(Relaxed),
            bytes_to_client: self.bytes_to_client.load(Relaxed),
            tx_status: self.tx_status.load(Relaxed),
        }
    }
}

/// Add to a counter only the session's own task writes: a plain load and store, not
/// a locked read-modify-write (two of those per row were measurable on large results).
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
}

/// The built-in accounting stage.
pub struct Accounting {
    stats: Arc<StatsCell>,
}

impl Accounting {
    pub fn new(stats: Arc<StatsCell>) -> Self {
        Self { stats }
    }
}

impl Stage for Accounting {
    fn name(&self) -> &'static str {
        "accounting"
    }

    fn frontend(&mut self, _: &Session, frame: &Frame) -> Action {
        let s = &self.stats;
        bump(&s.bytes_to_server, frame.len() as u64);
        match frame.tag() {
            tag::QUERY => bump(&s.queries, 1),
            tag::EXECUTE => bump(&s.executes, 1),
            _ => {}
        }
        Action::Forward
    }

    fn backend(&mut self, _: &Session, frame: &Frame) -> Action {
        let s = &self.stats;
        bump(&s.bytes_to_client, frame.len() as u64);
        match frame.tag() {
            tag::DATA_ROW => {
                bump(&s.rows, 1);
            }
            tag::ERROR_RESPONSE => {
                bump(&s.errors, 1);
            }
            tag::READY_FOR_QUERY => s.tx_status.store(frame.body().first().copied().unwrap_or(b'I'), Relaxed),
            _ => {}
        }
        Action::Forward
    }

    fn streamed(&mut self, _: &Session, direction: Direction, tag: u8, len: usize) {
        let s = &self.stats;
        match direction {
            Direction::Frontend => {
                bump(&s.bytes_to_server, len as u64);
            }
            Direction::Backend => {
                bump(&s.bytes_to_client, len as u64);
                if tag == crate::pg::msg::tag::DATA_ROW {
                    bump(&s.rows, 1);
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        net::SocketAddr,
        sync::{Arc, Mutex},
        time::SystemTime,
    };

    use super::*;
    use crate::{
        identity::Workload,
        net::{ClientAddr, OrigDstAddr},
        session::auth::AuthMethod,
    };

    /// A session as stage tests need one.
    pub(crate) fn session() -> Session {
        let addr: SocketAddr = "127.0.0.1:5432".parse().expect("invariant: literal address");
        Session {
            id: 1,
            audit_id: "s-0000000000000000".into(),
            workload: Workload { name: "w".into(), cgroup: "c".into(), protected_cgroup_id: 1, cgroup_id: 1, pid: 1, uid: 0, gid: 0, comm: "t".into() },
            client: ClientAddr(addr),
            orig_dst: OrigDstAddr(addr),
            database: "db".into(),
            dbname: "db".into(),
            client_user: "u".into(),
            application_name: None,
            options: None,
            upstream_role: "r".into(),
            auth_method: AuthMethod::Workload,
            token: None,
            client_tls: false,
            upstream_tls: false,
            accepted_at: SystemTime::now(),
            started_at: SystemTime::now(),
            cancel: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// Rewrites every DataRow body to "masked" (runs first on database messages).
    struct Rewriter;
    impl Stage for Rewriter {
        fn name(&self) -> &'static str {
            "rewriter"
        }
        fn backend(&mut self, _: &Session, f: &Frame) -> Action {
            if f.tag() == tag::DATA_ROW && f.body() != b"masked" {
                Action::Replace(smallvec::smallvec![Frame::build(tag::DATA_ROW, b"masked").into_bytes(), Frame::build(b'N', b"note").into_bytes()])
            } else {
                Action::Forward
            }
        }
    }

    /// Holds the first message it sees once; records every body it sees.
    struct Gate {
        held: bool,
        seen: Arc<Mutex<Vec<Vec<u8>>>>,
    }
    impl Stage for Gate {
        fn name(&self) -> &'static str {
            "gate"
        }
        fn backend(&mut self, _: &Session, f: &Frame) -> Action {
            if !self.held {
                self.held = true;
                return Action::Hold(Box::pin(async { Ok(()) }), None);
            }
            self.seen.lock().expect("invariant: lock not poisoned").push(f.body().to_vec());
            Action::Forward
        }
    }

    #[test]
    fn a_held_replacement_is_released_as_the_replacement_not_the_original() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        // Order: [gate, rewriter]; database messages meet the rewriter first.
        let mut p = Pipeline::new(vec![Box::new(Gate { held: false, seen: seen.clone() }), Box::new(Rewriter)]);
        let s = session();
        let first = p.backend(&s, Frame::build(tag::DATA_ROW, b"raw secret"));
        assert!(first.out.is_empty(), "nothing is sent while the gate holds");
        let Some(BackendStop::Hold(h)) = first.stop else { panic!("the gate holds") };
        assert_eq!(h.frame.body(), b"masked", "the held message is the rewritten one");
        assert_eq!(h.rest.len(), 1, "the second replacement waits behind it");
        let released = p.backend_resume(&s, h.resume());
        assert!(released.stop.is_none());
        let bodies: Vec<&[u8]> = released.out.iter().map(|b| &b[crate::pg::frame::HEADER_LEN..]).collect();
        assert_eq!(bodies, vec![&b"masked"[..], &b"note"[..]], "released in order, never the original");
        assert_eq!(*seen.lock().expect("invariant: lock not poisoned"), vec![b"masked".to_vec(), b"note".to_vec()]);
    }

    #[test]
    fn replacements_pass_only_the_stages_before_the_replacing_one() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut p = Pipeline::new(vec![Box::new(Gate { held: true, seen: seen.clone() }), Box::new(Rewriter)]);
        let r = p.backend(&session(), Frame::build(tag::DATA_ROW, b"raw"));
        assert!(r.stop.is_none());
        assert_eq!(r.out.len(), 2);
        assert_eq!(seen.lock().expect("invariant: lock not poisoned").len(), 2);
        let r = p.backend(&session(), Frame::build(b'C', b"SELECT 1\0"));
        assert_eq!(r.out.len(), 1, "an untouched message is forwarded as is");
    }
}

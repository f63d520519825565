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
}

impl Pipeline {
    pub fn new(stages: Vec<Box<dyn Stage>>) -> Self {
        Self { stages }
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

    pub fn backend(&mut self, session: &Session, frame: &Frame) -> (Action, usize) {
        self.backend_through(self.stages.len(), session, frame)
    }

    /// Run a database message through stages `end - 1` down to 0 (after a held
    /// message is released, `end` is the holding stage plus one: it sees it again).
    pub fn backend_through(&mut self, end: usize, session: &Session, frame: &Frame) -> (Action, usize) {
        for i in (0..end.min(self.stages.len())).rev() {
            match self.stages[i].backend(session, frame) {
                Action::Forward => {}
                Action::Replace(parts) => {
                    // The earlier stages see what is actually sent.
                    let mut out = crate::pg::frame::Messages::new();
                    for p in parts {
                        let f = Frame::from_bytes(p);
                        match self.backend_through(i, session, &f) {
                            (Action::Forward, _) => out.push(f.into_bytes()),
                            (Action::Replace(more), _) => out.extend(more),
                            other => return other,
                        }
                    }
                    return (Action::Replace(out), i);
                }
                other => return (other, i),
            }
        }
        (Action::Forward, 0)
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
        s.bytes_to_server.fetch_add(frame.len() as u64, Relaxed);
        match frame.tag() {
            tag::QUERY => s.queries.fetch_add(1, Relaxed),
            tag::EXECUTE => s.executes.fetch_add(1, Relaxed),
            _ => 0,
        };
        Action::Forward
    }

    fn backend(&mut self, _: &Session, frame: &Frame) -> Action {
        let s = &self.stats;
        s.bytes_to_client.fetch_add(frame.len() as u64, Relaxed);
        match frame.tag() {
            tag::DATA_ROW => {
                s.rows.fetch_add(1, Relaxed);
            }
            tag::ERROR_RESPONSE => {
                s.errors.fetch_add(1, Relaxed);
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
                s.bytes_to_server.fetch_add(len as u64, Relaxed);
            }
            Direction::Backend => {
                s.bytes_to_client.fetch_add(len as u64, Relaxed);
                if tag == crate::pg::msg::tag::DATA_ROW {
                    s.rows.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

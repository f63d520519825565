//! Which client request each server message answers.
//!
//! The server answers requests strictly in order, but the extended protocol pipelines
//! them (Parse, Bind, Describe, Execute, … Sync) and errors make it skip ahead to the
//! next Sync. [`Flow`] keeps the forwarded requests in a queue and, for each backend
//! message, says what it belongs to: the description of a prepared statement, the
//! rows of a simple query or of an Execute, and so on. Stages that need to know
//! "whose rows are these" (masking, audit) each keep one.
//!
//! Pure: frames in, answers out; no I/O. Misalignments (a message that answers
//! nothing phigate saw) are reported as [`Answer::Unexpected`] so callers can fail
//! closed rather than guess.

use std::{collections::VecDeque, sync::Arc};

use super::msg::tag;

/// A forwarded client request still waiting for (the rest of) its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    /// A simple Query; answered by everything up to its ReadyForQuery.
    Query(Arc<str>),
    Parse,
    Bind,
    DescribeStatement(Arc<str>),
    DescribePortal(Arc<str>),
    Execute(Arc<str>),
    Close,
    Sync,
    /// A fast-path call (answered by FunctionCallResponse and ReadyForQuery).
    FunctionCall,
}

/// What one backend message answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Part of the answer to a simple Query: its RowDescriptions, rows, COPY data,
    /// CommandCompletes and errors.
    Simple(Arc<str>),
    /// The RowDescription (or NoData) of a prepared statement, answering Describe.
    StatementDescription(Arc<str>),
    /// The RowDescription (or NoData) of a portal, answering Describe.
    PortalDescription(Arc<str>),
    /// Rows or COPY data of an Execute of this portal (the name is shared, not copied:
    /// this is asked for every row).
    Execute(Arc<str>),
    /// The end of an Execute: CommandComplete, EmptyQueryResponse, PortalSuspended.
    ExecuteDone(Arc<str>),
    /// An ErrorResponse to an extended-protocol request; the server now skips to Sync.
    ExtendedError,
    /// ReadyForQuery: everything before it is answered.
    Ready,
    /// ParseComplete, BindComplete, CloseComplete, ParameterDescription, …: nothing
    /// that carries data.
    Bookkeeping,
    /// NoticeResponse, NotificationResponse, ParameterStatus: may come at any time.
    Asynchronous,
    /// Nothing phigate forwarded asks for this message.
    Unexpected,
}

/// The queue of forwarded requests of one session.
#[derive(Debug, Default)]
pub struct Flow {
    queue: VecDeque<Pending>,
}

/// A request as [`Flow::frontend`] needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Query(&'a str),
    Parse,
    Bind,
    Describe {
        portal: bool,
        name: &'a str,
    },
    Execute {
        portal: &'a str,
    },
    Close,
    Sync,
    FunctionCall,
    /// Flush, CopyData, CopyDone, CopyFail, Terminate: no answer of their own.
    Other,
}

impl Flow {
    /// A client request was forwarded to the server.
    pub fn frontend(&mut self, request: Request<'_>) {
        let p = match request {
            Request::Query(sql) => Pending::Query(Arc::from(sql)),
            Request::Parse => Pending::Parse,
            Request::Bind => Pending::Bind,
            Request::Describe { portal: false, name } => Pending::DescribeStatement(Arc::from(name)),
            Request::Describe { portal: true, name } => Pending::DescribePortal(Arc::from(name)),
            Request::Execute { portal } => Pending::Execute(Arc::from(portal)),
            Request::Close => Pending::Close,
            Request::Sync => Pending::Sync,
            Request::FunctionCall => Pending::FunctionCall,
            Request::Other => return,
        };
        self.queue.push_back(p);
    }

    /// What the backend message with this tag answers; advances the queue.
    pub fn backend(&mut self, t: u8) -> Answer {
        if matches!(t, tag::NOTICE_RESPONSE | tag::NOTIFICATION | tag::PARAMETER_STATUS) {
            return Answer::Asynchronous;
        }
        if t == tag::READY_FOR_QUERY {
            // Everything up to the Sync (or Query, or fast-path call) it ends is done.
            while let Some(p) = self.queue.pop_front() {
                if matches!(p, Pending::Sync | Pending::Query(_) | Pending::FunctionCall) {
                    break;
                }
            }
            return Answer::Ready;
        }
        let Some(front) = self.queue.front() else { return Answer::Unexpected };
        match front {
            Pending::Query(sql) => Answer::Simple(sql.clone()),
            Pending::FunctionCall => Answer::Bookkeeping,
            _ if t == tag::ERROR_RESPONSE => {
                // The server discards the rest of the batch until Sync.
                while self.queue.front().is_some_and(|p| *p != Pending::Sync) {
                    self.queue.pop_front();
                }
                Answer::ExtendedError
            }
            Pending::Parse if t == b'1' => self.pop(Answer::Bookkeeping),
            Pending::Bind if t == b'2' => self.pop(Answer::Bookkeeping),
            Pending::Close if t == b'3' => self.pop(Answer::Bookkeeping),
            Pending::DescribeStatement(_) if t == b't' => Answer::Bookkeeping,
            Pending::DescribeStatement(name) if t == tag::ROW_DESCRIPTION || t == b'n' => {
                let a = Answer::StatementDescription(name.clone());
                self.pop(a)
            }
            Pending::DescribePortal(name) if t == tag::ROW_DESCRIPTION || t == b'n' => {
                let a = Answer::PortalDescription(name.clone());
                self.pop(a)
            }
            Pending::Execute(portal) if matches!(t, tag::DATA_ROW | tag::COPY_OUT_RESPONSE | tag::COPY_DATA | tag::COPY_DONE | tag::COPY_IN_RESPONSE) => {
                Answer::Execute(portal.clone())
            }
            Pending::Execute(portal) if matches!(t, tag::COMMAND_COMPLETE | b'I' | b's') => {
                let a = Answer::ExecuteDone(portal.clone());
                self.pop(a)
            }
            _ => Answer::Unexpected,
        }
    }

    fn pop(&mut self, a: Answer) -> Answer {
        self.queue.pop_front();
        a
    }

    /// Requests still waiting for an answer.
    pub fn outstanding(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_batch_is_matched_in_order() {
        let mut f = Flow::default();
        for r in [Request::Parse, Request::Describe { portal: false, name: "s1" }, Request::Sync, Request::Bind, Request::Execute { portal: "" }, Request::Sync]
        {
            f.frontend(r);
        }
        assert_eq!(f.backend(b'1'), Answer::Bookkeeping);
        assert_eq!(f.backend(b't'), Answer::Bookkeeping);
        assert_eq!(f.backend(b'T'), Answer::StatementDescription("s1".into()));
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        assert_eq!(f.backend(b'2'), Answer::Bookkeeping);
        assert_eq!(f.backend(b'N'), Answer::Asynchronous);
        assert_eq!(f.backend(b'D'), Answer::Execute("".into()));
        assert_eq!(f.backend(b'D'), Answer::Execute("".into()));
        assert_eq!(f.backend(b'C'), Answer::ExecuteDone("".into()));
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        assert_eq!(f.outstanding(), 0);
        assert_eq!(f.backend(b'D'), Answer::Unexpected, "rows nobody asked for");
    }

    #[test]
    fn an_error_skips_to_sync() {
        let mut f = Flow::default();
        for r in [Request::Parse, Request::Bind, Request::Execute { portal: "p" }, Request::Sync, Request::Query("select 1")] {
            f.frontend(r);
        }
        assert_eq!(f.backend(b'E'), Answer::ExtendedError);
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        assert_eq!(f.backend(b'T'), Answer::Simple("select 1".into()));
        assert_eq!(f.backend(b'D'), Answer::Simple("select 1".into()));
        assert_eq!(f.backend(b'E'), Answer::Simple("select 1".into()), "errors inside a simple query belong to it");
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        assert_eq!(f.outstanding(), 0);
    }

    #[test]
    fn ready_for_query_realigns_after_an_unseen_sync() {
        // The relay may forward a Sync the stage never saw (after a refusal): the
        // ReadyForQuery still ends what came before it.
        let mut f = Flow::default();
        f.frontend(Request::Parse);
        f.frontend(Request::Bind);
        assert_eq!(f.backend(b'1'), Answer::Bookkeeping);
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        assert_eq!(f.outstanding(), 0);
    }

    #[test]
    fn portal_description_and_copy_out() {
        let mut f = Flow::default();
        for r in [Request::Bind, Request::Describe { portal: true, name: "c" }, Request::Execute { portal: "c" }, Request::Sync] {
            f.frontend(r);
        }
        assert_eq!(f.backend(b'2'), Answer::Bookkeeping);
        assert_eq!(f.backend(b'T'), Answer::PortalDescription("c".into()));
        assert_eq!(f.backend(b'H'), Answer::Execute("c".into()));
        assert_eq!(f.backend(b'd'), Answer::Execute("c".into()));
        assert_eq!(f.backend(b'c'), Answer::Execute("c".into()));
        assert_eq!(f.backend(b'C'), Answer::ExecuteDone("c".into()));
        assert_eq!(f.backend(b'Z'), Answer::Ready);
    }
}

//! Which client request each server message answers.
//!
//! The server answers requests strictly in order, but the extended protocol pipelines
//! them (Parse, Bind, Describe, Execute, … Sync) and errors make it skip ahead to the
//! next Sync. [`Flow`] keeps the forwarded requests in a queue and, for each backend
//! message, says what it belongs to: the description of a prepared statement, the
//! rows of a simple query or of an Execute, and so on. Stages that need to know
//! "whose rows are these" (masking, audit) each keep one.
//!
//! COPY FROM STDIN changes how the server reads the client: from its CopyInResponse
//! until CopyDone or CopyFail it takes CopyData, ignores Sync and Flush (libpq sends a
//! Sync behind an Execute before it knows the statement was a COPY), and ends the COPY
//! with an error on anything else, consuming that message. [`Flow`] follows the same
//! rules ([`Flow::copy_in`]). What was queued behind the COPY before its
//! CopyInResponse is settled when that response arrives: a Sync before any data is
//! dropped (the server ignored it), CopyData is COPY input (pgx sends it without
//! waiting) and CopyDone or CopyFail ends the COPY; anything else — a request, or a
//! Sync after data — makes the CopyInResponse [`Answer::Unexpected`], since whether
//! the server consumed it or answered it depends on whether the data failed the COPY.
//! Without this, one ignored Sync shifted every later answer onto the previous
//! statement.
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
    /// CopyData sent while no COPY FROM STDIN was known to run: ignored by the server
    /// unless a request before it starts one (see the module doc).
    CopyData,
    /// CopyDone or CopyFail, likewise.
    CopyEnd,
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
    /// The server reads what is forwarded next as part of a COPY FROM STDIN.
    copy_in: bool,
    /// Syncs dropped from the queue because the server ignored them inside a COPY.
    ignored_syncs: u64,
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
    Flush,
    CopyData,
    /// CopyDone or CopyFail.
    CopyEnd,
    /// Terminate and anything else: no answer of its own.
    Other,
}

impl Request<'static> {
    /// The request a message of this type is, without its names (for callers that
    /// only follow the protocol's shape, and for frames streamed past unparsed).
    pub fn of_tag(t: u8) -> Self {
        match t {
            tag::QUERY => Request::Query(""),
            tag::PARSE => Request::Parse,
            tag::BIND => Request::Bind,
            tag::DESCRIBE => Request::Describe { portal: false, name: "" },
            tag::EXECUTE => Request::Execute { portal: "" },
            tag::CLOSE => Request::Close,
            tag::SYNC => Request::Sync,
            tag::FUNCTION_CALL => Request::FunctionCall,
            tag::FLUSH => Request::Flush,
            tag::COPY_DATA => Request::CopyData,
            tag::COPY_DONE | tag::COPY_FAIL => Request::CopyEnd,
            _ => Request::Other,
        }
    }
}

/// A name as the queue keeps it; the unnamed statement and portal, which most
/// drivers use for every statement, share one allocation.
fn shared(name: &str) -> Arc<str> {
    static UNNAMED: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
    if name.is_empty() {
        UNNAMED.clone()
    } else {
        Arc::from(name)
    }
}

impl Flow {
    /// A client request was forwarded to the server.
    pub fn frontend(&mut self, request: Request<'_>) {
        if self.copy_in {
            match request {
                // Part of the COPY; the server ignores Sync and Flush inside it.
                Request::CopyData | Request::Sync | Request::Flush => {}
                Request::CopyEnd => self.copy_in = false,
                // The server ends the COPY with an error and consumes the message.
                _ => self.copy_in = false,
            }
            return;
        }
        let p = match request {
            Request::Query(sql) => Pending::Query(shared(sql)),
            Request::Parse => Pending::Parse,
            Request::Bind => Pending::Bind,
            Request::Describe { portal: false, name } => Pending::DescribeStatement(shared(name)),
            Request::Describe { portal: true, name } => Pending::DescribePortal(shared(name)),
            Request::Execute { portal } => Pending::Execute(shared(portal)),
            Request::Close => Pending::Close,
            Request::Sync => Pending::Sync,
            Request::FunctionCall => Pending::FunctionCall,
            Request::CopyData => Pending::CopyData,
            Request::CopyEnd => Pending::CopyEnd,
            Request::Flush | Request::Other => return,
        };
        self.queue.push_back(p);
    }

    /// What the backend message with this tag answers; advances the queue.
    pub fn backend(&mut self, t: u8) -> Answer {
        if matches!(t, tag::NOTICE_RESPONSE | tag::NOTIFICATION | tag::PARAMETER_STATUS) {
            return Answer::Asynchronous;
        }
        // COPY messages nothing turned out to read were ignored by the server.
        while matches!(self.queue.front(), Some(Pending::CopyData | Pending::CopyEnd)) {
            self.queue.pop_front();
        }
        if t == tag::READY_FOR_QUERY {
            self.copy_in = false;
            // Everything up to the Sync (or Query, or fast-path call) it ends is done.
            while let Some(p) = self.queue.pop_front() {
                if matches!(p, Pending::Sync | Pending::Query(_) | Pending::FunctionCall) {
                    break;
                }
            }
            return Answer::Ready;
        }
        if t == tag::ERROR_RESPONSE {
            // An error inside a COPY FROM STDIN ends it.
            self.copy_in = false;
        }
        let answer = self.answer(t);
        if t == tag::COPY_IN_RESPONSE && matches!(answer, Answer::Simple(_) | Answer::Execute(_)) {
            return self.start_copy_in(answer);
        }
        answer
    }

    /// [`Flow::backend`] for a caller that only follows the protocol's shape: false
    /// when a CopyInResponse cannot be matched (see the module doc). Rows, the bulk of
    /// the traffic, cost a look at the queue's front and nothing else.
    pub fn observe(&mut self, t: u8) -> bool {
        if matches!(t, tag::DATA_ROW | tag::COPY_DATA) && matches!(self.queue.front(), Some(Pending::Query(_) | Pending::Execute(_))) {
            return true;
        }
        !(self.backend(t) == Answer::Unexpected && t == tag::COPY_IN_RESPONSE)
    }

    /// The server started a COPY FROM STDIN for the request in front: it read what
    /// was queued behind that request as part of the COPY.
    fn start_copy_in(&mut self, answer: Answer) -> Answer {
        let mut data_sent = false;
        while self.queue.len() > 1 {
            match self.queue[1] {
                // Ignored inside the COPY — unless data before it already failed the
                // COPY, after which the server answers it: that depends on the data.
                Pending::Sync if !data_sent => self.ignored_syncs += 1,
                // COPY input, sent before the server asked for it (pgx does).
                Pending::CopyData => data_sent = true,
                Pending::CopyEnd => {
                    self.queue.remove(1);
                    return answer;
                }
                // Consumed as a COPY error, or run after the data failed the COPY:
                // that depends on the data too.
                _ => return Answer::Unexpected,
            }
            self.queue.remove(1);
        }
        self.copy_in = true;
        answer
    }

    /// Whether the server reads what is forwarded next as part of a COPY FROM STDIN
    /// (in which it ignores Sync and Flush, and anything but CopyData, CopyDone and
    /// CopyFail ends it with an error).
    pub fn copy_in(&self) -> bool {
        self.copy_in
    }

    /// How many forwarded Syncs the server ignored inside a COPY (they get no
    /// ReadyForQuery); counted since the last call.
    pub fn take_ignored_syncs(&mut self) -> u64 {
        std::mem::take(&mut self.ignored_syncs)
    }

    fn answer(&mut self, t: u8) -> Answer {
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

/// Parse and Bind definitions the server has not confirmed yet, for a stage that
/// keeps its own map of statement and portal names. A definition counts once the
/// server answers ParseComplete / BindComplete; one the server refused (a name in
/// use: 42P05, 42P03) or skipped after an error in its batch — including those sent
/// after the error arrived, up to the batch's Sync — is handed back to be undone.
/// `T` is what the stage needs to undo one (the name and what it meant before).
#[derive(Debug)]
pub struct Definitions<T> {
    /// In the order sent; `None` ends a batch (Sync, Query, fast-path call).
    queue: VecDeque<Option<T>>,
    /// The batch being answered failed.
    batch_failed: bool,
}

impl<T> Default for Definitions<T> {
    fn default() -> Self {
        Self { queue: VecDeque::new(), batch_failed: false }
    }
}

impl<T> Definitions<T> {
    /// A Parse or Bind went to the server.
    pub fn sent(&mut self, undo: T) {
        self.queue.push_back(Some(undo));
    }

    /// A Sync, Query or fast-path call went: the end of a batch.
    pub fn batch_end(&mut self) {
        self.queue.push_back(None);
    }

    /// A backend message of type `t`, with what [`Flow`] said it answers and the
    /// Syncs it reported ignored ([`Flow::take_ignored_syncs`]; they end no batch).
    /// Returns the definitions that did not happen, newest first (the order to undo
    /// them in); empty, without allocating, for everything else.
    pub fn answered(&mut self, t: u8, answer: &Answer, ignored_syncs: u64) -> Vec<T> {
        for _ in 0..ignored_syncs {
            if let Some(i) = self.queue.iter().position(Option::is_none) {
                self.queue.remove(i);
            }
        }
        match (t, answer) {
            (b'1' | b'2', _) => {
                if matches!(self.queue.front(), Some(Some(_))) {
                    self.queue.pop_front();
                }
                Vec::new()
            }
            (_, Answer::ExtendedError) => {
                self.batch_failed = true;
                self.take_failed()
            }
            (_, Answer::Ready) => {
                let undone = if std::mem::take(&mut self.batch_failed) { self.take_failed() } else { Vec::new() };
                while let Some(entry) = self.queue.pop_front() {
                    if entry.is_none() {
                        break;
                    }
                }
                undone
            }
            _ => Vec::new(),
        }
    }

    /// The unconfirmed definitions of the batch being answered, newest first.
    fn take_failed(&mut self) -> Vec<T> {
        let end = self.queue.iter().position(Option::is_none).unwrap_or(self.queue.len());
        let mut undone: Vec<T> = self.queue.drain(..end).flatten().collect();
        undone.reverse();
        undone
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
    fn syncs_inside_copy_from_stdin_get_no_ready_for_query() {
        // psql: the COPY, then a stray Sync and CopyDone inside it (PostgreSQL ignores
        // the Sync), then the next query, whose answer must not be taken for the
        // COPY's.
        let mut f = Flow::default();
        f.frontend(Request::Query("copy t from stdin"));
        assert_eq!(f.backend(b'G'), Answer::Simple("copy t from stdin".into()));
        assert!(f.copy_in());
        for r in [Request::CopyData, Request::Sync, Request::Flush, Request::CopyData, Request::CopyEnd] {
            f.frontend(r);
        }
        assert!(!f.copy_in());
        f.frontend(Request::Query("select ssn from patients"));
        assert_eq!(f.backend(b'C'), Answer::Simple("copy t from stdin".into()));
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        assert_eq!(f.backend(b'T'), Answer::Simple("select ssn from patients".into()));
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        assert_eq!(f.outstanding(), 0);
        assert_eq!(f.take_ignored_syncs(), 0, "the Sync inside the COPY was never queued");
    }

    #[test]
    fn libpq_extended_copy_drops_the_sync_sent_before_the_copy_began() {
        // PQexecParams("COPY … FROM STDIN"): Parse/Bind/Describe/Execute/Sync at once;
        // the server ignores that Sync inside the COPY, and PQputCopyEnd sends another.
        let mut f = Flow::default();
        for r in [Request::Parse, Request::Bind, Request::Describe { portal: true, name: "" }, Request::Execute { portal: "" }, Request::Sync] {
            f.frontend(r);
        }
        assert_eq!(f.backend(b'1'), Answer::Bookkeeping);
        assert_eq!(f.backend(b'2'), Answer::Bookkeeping);
        assert_eq!(f.backend(b'n'), Answer::PortalDescription("".into()));
        assert_eq!(f.backend(b'G'), Answer::Execute("".into()));
        assert_eq!(f.take_ignored_syncs(), 1);
        f.frontend(Request::CopyData);
        f.frontend(Request::CopyEnd);
        f.frontend(Request::Sync);
        f.frontend(Request::Query("select 1"));
        assert_eq!(f.backend(b'C'), Answer::ExecuteDone("".into()));
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        assert_eq!(f.backend(b'T'), Answer::Simple("select 1".into()), "the next query is not shifted");
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        assert_eq!(f.outstanding(), 0);
    }

    #[test]
    fn a_message_inside_copy_ends_it_and_is_consumed() {
        let mut f = Flow::default();
        f.frontend(Request::Query("copy t from stdin"));
        assert_eq!(f.backend(b'G'), Answer::Simple("copy t from stdin".into()));
        // PostgreSQL: "unexpected message type 0x51 during COPY from stdin".
        f.frontend(Request::Query("select 'decoy'"));
        assert!(!f.copy_in());
        f.frontend(Request::Query("select ssn from patients"));
        assert_eq!(f.backend(b'E'), Answer::Simple("copy t from stdin".into()));
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        assert_eq!(f.backend(b'T'), Answer::Simple("select ssn from patients".into()));
    }

    #[test]
    fn a_server_error_inside_copy_ends_it() {
        let mut f = Flow::default();
        f.frontend(Request::Query("copy t from stdin"));
        f.backend(b'G');
        f.frontend(Request::CopyData);
        assert_eq!(f.backend(b'E'), Answer::Simple("copy t from stdin".into()));
        assert!(!f.copy_in(), "the server left the COPY");
        f.frontend(Request::CopyEnd);
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        f.frontend(Request::Query("select 1"));
        assert_eq!(f.backend(b'T'), Answer::Simple("select 1".into()), "the stale CopyDone answers nothing");
    }

    #[test]
    fn requests_pipelined_behind_a_copy_are_unexpected() {
        // Whether the server read them inside the COPY or after an error in it is
        // timing phigate cannot see: callers fail closed.
        let mut f = Flow::default();
        f.frontend(Request::Query("copy t from stdin"));
        f.frontend(Request::Query("select 1"));
        assert_eq!(f.backend(b'G'), Answer::Unexpected);
        let mut f = Flow::default();
        f.frontend(Request::Query("copy t from stdin"));
        f.frontend(Request::CopyData);
        f.frontend(Request::Sync);
        assert_eq!(f.backend(b'G'), Answer::Unexpected, "answered only if the data failed the COPY");
    }

    #[test]
    fn copy_data_sent_before_the_server_asked_for_it_is_copy_input() {
        // pgx's CopyFrom: the COPY, its data and CopyDone without waiting for
        // CopyInResponse.
        let mut f = Flow::default();
        for r in [Request::Query("copy t from stdin"), Request::CopyData, Request::CopyData, Request::CopyEnd, Request::Query("select 1")] {
            f.frontend(r);
        }
        assert_eq!(f.backend(b'G'), Answer::Simple("copy t from stdin".into()));
        assert!(!f.copy_in(), "the queued CopyDone ended it");
        assert_eq!(f.backend(b'C'), Answer::Simple("copy t from stdin".into()));
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        assert_eq!(f.backend(b'T'), Answer::Simple("select 1".into()));
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        assert_eq!(f.outstanding(), 0);
        // Data queued, the end still to come.
        let mut f = Flow::default();
        f.frontend(Request::Query("copy t from stdin"));
        f.frontend(Request::CopyData);
        assert_eq!(f.backend(b'G'), Answer::Simple("copy t from stdin".into()));
        assert!(f.copy_in());
    }

    #[test]
    fn copy_messages_outside_copy_are_ignored() {
        let mut f = Flow::default();
        f.frontend(Request::CopyEnd);
        f.frontend(Request::Query("select 1"));
        assert_eq!(f.backend(b'T'), Answer::Simple("select 1".into()));
        assert_eq!(f.backend(b'Z'), Answer::Ready);
        assert_eq!(f.outstanding(), 0);
    }

    #[test]
    fn definitions_are_undone_when_their_batch_fails() {
        let mut d = Definitions::default();
        d.sent("s1");
        d.batch_end();
        assert!(d.answered(b'1', &Answer::Bookkeeping, 0).is_empty(), "confirmed");
        assert!(d.answered(b'Z', &Answer::Ready, 0).is_empty());
        // A failed batch: what was sent before the error and after it, up to Sync.
        d.sent("a");
        d.sent("b");
        assert_eq!(d.answered(b'E', &Answer::ExtendedError, 0), ["b", "a"]);
        d.sent("late");
        d.batch_end();
        d.sent("next batch");
        d.batch_end();
        assert_eq!(d.answered(b'Z', &Answer::Ready, 0), ["late"]);
        assert!(d.answered(b'1', &Answer::Bookkeeping, 0).is_empty());
        assert!(d.answered(b'Z', &Answer::Ready, 0).is_empty(), "the next batch is not touched");
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

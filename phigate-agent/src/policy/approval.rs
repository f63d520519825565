//! Just-in-time approval: statements held for a human, their decisions, and the
//! time-boxed grants an approval may leave behind.
//!
//! The broker only keeps state and enforces the rules (an approver is never the
//! requester; a decision names its approver, reason and time). Waiting, deadlines and
//! the wire are the session's business; the admin API and webhook are the caller's.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tokio::sync::oneshot;

/// Told about each request and decision (webhook, audit).
type Listener = Box<dyn Fn(&Event) + Send>;

/// Who asked.
#[derive(Debug, Clone, Serialize)]
pub struct Requester {
    /// The workload identity.
    pub identity: String,
    /// The token subject, when the workload authenticated with a token.
    pub token_subject: Option<String>,
    pub session_id: u32,
    /// The session in the audit log.
    pub audit_session: String,
    pub pid: u32,
    pub cgroup: String,
}

/// Who decided: a person or program talking to the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approver {
    /// e.g. `unix:alice`.
    pub name: String,
    /// The workload identity of the approving process, if it runs in a protected
    /// cgroup (such a process may not approve its own identity's requests).
    pub workload: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Approved {
        by: String,
        reason: String,
        window_secs: Option<u64>,
        decided_at: u64,
    },
    Denied {
        by: String,
        reason: String,
        decided_at: u64,
    },
    TimedOut {
        decided_at: u64,
    },
    /// The requester cancelled the statement (a CancelRequest) before anyone decided.
    Cancelled {
        decided_at: u64,
    },
    /// The requester's session ended (its client went away) before anyone decided.
    Abandoned {
        decided_at: u64,
    },
}

/// A request as the admin API and webhook show it. The statement text is shown to
/// approvers (they need it to decide); it never goes to the logs.
#[derive(Debug, Clone, Serialize)]
pub struct RequestView {
    pub id: u64,
    pub requester: Requester,
    pub database: String,
    pub dbname: String,
    pub statement: String,
    pub rule: String,
    pub reason: String,
    pub requested_at: u64,
    pub waiting_secs: u64,
    pub deadline_secs: u64,
}

struct Pending {
    view: RequestView,
    /// The statement with its constants replaced by placeholders: what a window
    /// names. None: it could not be normalized, so no window can name it.
    normalized: Option<String>,
    since: Instant,
    reply: oneshot::Sender<Outcome>,
}

/// A request with its decision, once decided: what `approvals show` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    #[serde(flatten)]
    pub request: RequestView,
    /// `"pending": true`, or the outcome with approver, reason and time.
    #[serde(flatten)]
    pub status: Status,
    pub approver: Option<Approver>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Status {
    Pending { pending: bool },
    Decided(Outcome),
}

/// Decisions kept in memory for `approvals show` (the audit log keeps all of them).
const DECIDED_KEPT: usize = 1000;

/// Something the webhook (and audit) should hear about.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    ApprovalRequested { approval: RequestView },
    ApprovalDecided { approval: RequestView, decision: Outcome, approver: Option<Approver> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    #[error("no pending approval with id {0} (already decided, timed out, or never existed)")]
    NotFound(u64),
    #[error("self-approval refused: the approving process runs as workload identity \"{0}\", which made this request")]
    SelfApproval(String),
    #[error("a reason is required")]
    NoReason,
    #[error("the grant window of {asked} s exceeds the configured maximum of {max} s")]
    WindowTooLong { asked: u64, max: u64 },
}

pub fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What an approval window covers: the statement (its text, constants aside) from one identity,
/// against the database service and PostgreSQL database the approver was shown.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GrantKey {
    pub identity: String,
    pub database: String,
    pub dbname: String,
    /// The statement's text with its constants replaced by placeholders ($1, $2 …).
    pub normalized: String,
}

/// The approval whose window lets a statement run: what its record names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The request that was approved.
    pub id: u64,
    pub by: String,
    pub reason: String,
}

/// The approval state of one agent.
pub struct Broker {
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Pending>>,
    /// The latest decisions, oldest first (bounded).
    decided: Mutex<std::collections::VecDeque<Record>>,
    /// What a window covers → expiry and approver.
    grants: Mutex<HashMap<GrantKey, (Instant, Grant)>>,
    pub timeout: Duration,
    pub max_window: Duration,
    events: Mutex<Vec<Listener>>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Broker({} pending)", self.pending.lock().map(|p| p.len()).unwrap_or(0))
    }
}

/// A waiting request, from the session's side.
pub struct Ticket {
    pub id: u64,
    pub reply: oneshot::Receiver<Outcome>,
}

impl Broker {
    pub fn new(timeout: Duration, max_window: Duration) -> Self {
        // Ids count on from the agent's start in microseconds since the epoch, not
        // from 1: an approver (or a bot acting on the webhook) decides by id, and an id
        // shown before a restart must not name another statement after it. A run
        // would need more than a request per microsecond to reach the next run's ids.
        // (Below 2^53, so JSON readers keep them exact.)
        let first = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0).max(1);
        Self {
            next_id: AtomicU64::new(first),
            pending: Mutex::new(HashMap::new()),
            decided: Mutex::new(std::collections::VecDeque::new()),
            grants: Mutex::new(HashMap::new()),
            timeout,
            max_window,
            events: Mutex::new(Vec::new()),
        }
    }

    /// Subscribe to events (the webhook notifier, the audit log).
    pub fn subscribe(&self, f: impl Fn(&Event) + Send + 'static) {
        self.events.lock().expect("invariant: lock not poisoned").push(Box::new(f));
    }

    fn emit(&self, e: &Event) {
        for f in self.events.lock().expect("invariant: lock not poisoned").iter() {
            f(e);
        }
    }

    /// A live grant covering `key`: the approval that left it.
    pub fn granted(&self, key: &GrantKey) -> Option<Grant> {
        let mut g = self.grants.lock().expect("invariant: lock not poisoned");
        match g.get(key) {
            Some((until, by)) if *until > Instant::now() => Some(by.clone()),
            Some(_) => {
                g.remove(key);
                None
            }
            None => None,
        }
    }

    #[allow(clippy::too_many_arguments, reason = "a request is these facts; a struct would only rename them")]
    pub fn request(&self, requester: Requester, database: &str, dbname: &str, statement: &str, rule: &str, reason: &str, normalized: Option<String>) -> Ticket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let view = RequestView {
            id,
            requester,
            database: database.into(),
            dbname: dbname.into(),
            statement: statement.into(),
            rule: rule.into(),
            reason: reason.into(),
            requested_at: epoch_secs(SystemTime::now()),
            waiting_secs: 0,
            deadline_secs: self.timeout.as_secs(),
        };
        self.pending.lock().expect("invariant: lock not poisoned").insert(id, Pending { view: view.clone(), normalized, since: Instant::now(), reply: tx });
        self.emit(&Event::ApprovalRequested { approval: view });
        Ticket { id, reply: rx }
    }

    pub fn list(&self) -> Vec<RequestView> {
        let p = self.pending.lock().expect("invariant: lock not poisoned");
        let mut v: Vec<RequestView> = p.values().map(|x| RequestView { waiting_secs: x.since.elapsed().as_secs(), ..x.view.clone() }).collect();
        v.sort_by_key(|x| x.id);
        v
    }

    /// A pending or recently decided request.
    pub fn show(&self, id: u64) -> Option<Record> {
        if let Some(v) = self.list().into_iter().find(|v| v.id == id) {
            return Some(Record { request: v, status: Status::Pending { pending: true }, approver: None });
        }
        self.decided.lock().expect("invariant: lock not poisoned").iter().rev().find(|r| r.request.id == id).cloned()
    }

    fn remember(&self, request: &RequestView, outcome: &Outcome, approver: Option<&Approver>) {
        let mut d = self.decided.lock().expect("invariant: lock not poisoned");
        if d.len() >= DECIDED_KEPT {
            d.pop_front();
        }
        d.push_back(Record { request: request.clone(), status: Status::Decided(outcome.clone()), approver: approver.cloned() });
    }

    /// Approve or deny a pending request.
    pub fn decide(&self, id: u64, approver: &Approver, approve: bool, reason: &str, window: Option<Duration>) -> Result<Outcome, ApprovalError> {
        if reason.trim().is_empty() {
            return Err(ApprovalError::NoReason);
        }
        if let Some(w) = window {
            if w > self.max_window {
                return Err(ApprovalError::WindowTooLong { asked: w.as_secs(), max: self.max_window.as_secs() });
            }
        }
        let mut pending = self.pending.lock().expect("invariant: lock not poisoned");
        let Some(p) = pending.get(&id) else {
            return Err(ApprovalError::NotFound(id));
        };
        if approver.workload.as_deref() == Some(p.view.requester.identity.as_str()) {
            return Err(ApprovalError::SelfApproval(p.view.requester.identity.clone()));
        }
        let p = pending.remove(&id).expect("invariant: present above");
        drop(pending);
        let now = epoch_secs(SystemTime::now());
        let outcome = if approve {
            // A statement that could not be normalized gets no window: it is approved once.
            let window = window.filter(|_| p.normalized.is_some());
            if let Some((w, normalized)) = window.filter(|w| !w.is_zero()).zip(p.normalized) {
                let key =
                    GrantKey { identity: p.view.requester.identity.clone(), database: p.view.database.clone(), dbname: p.view.dbname.clone(), normalized };
                self.grants
                    .lock()
                    .expect("invariant: lock not poisoned")
                    .insert(key, (Instant::now() + w, Grant { id, by: approver.name.clone(), reason: reason.into() }));
            }
            Outcome::Approved { by: approver.name.clone(), reason: reason.into(), window_secs: window.map(|w| w.as_secs()), decided_at: now }
        } else {
            Outcome::Denied { by: approver.name.clone(), reason: reason.into(), decided_at: now }
        };
        let view = RequestView { waiting_secs: p.since.elapsed().as_secs(), ..p.view };
        // The session may have given up already (client gone): the decision stands.
        let _ = p.reply.send(outcome.clone());
        self.remember(&view, &outcome, Some(approver));
        self.emit(&Event::ApprovalDecided { approval: view, decision: outcome.clone(), approver: Some(approver.clone()) });
        Ok(outcome)
    }

    /// The session's deadline passed: forget the request.
    pub fn expire(&self, id: u64) -> Option<Outcome> {
        self.withdraw(id, Outcome::TimedOut { decided_at: epoch_secs(SystemTime::now()) })
    }

    /// The requester cancelled the statement: forget the request, so no approval can
    /// come after it.
    pub fn cancel(&self, id: u64) -> Option<Outcome> {
        self.withdraw(id, Outcome::Cancelled { decided_at: epoch_secs(SystemTime::now()) })
    }

    /// The requester's session ended while it waited: forget the request, and say
    /// so rather than that nobody decided in time.
    pub fn abandon(&self, id: u64) -> Option<Outcome> {
        self.withdraw(id, Outcome::Abandoned { decided_at: epoch_secs(SystemTime::now()) })
    }

    fn withdraw(&self, id: u64, outcome: Outcome) -> Option<Outcome> {
        let p = self.pending.lock().expect("invariant: lock not poisoned").remove(&id)?;
        let view = RequestView { waiting_secs: p.since.elapsed().as_secs(), ..p.view };
        self.remember(&view, &outcome, None);
        self.emit(&Event::ApprovalDecided { approval: view, decision: outcome.clone(), approver: None });
        Some(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requester(identity: &str) -> Requester {
        Requester { identity: identity.into(), token_subject: None, session_id: 1, audit_session: "s-1".into(), pid: 2, cgroup: "c".into() }
    }

    fn human() -> Approver {
        Approver { name: "unix:alice".into(), workload: None }
    }

    #[test]
    fn approve_deny_and_self_approval() {
        let b = Broker::new(Duration::from_secs(60), Duration::from_secs(3600));
        let mut t = b.request(requester("billing"), "clinical", "clinical", "select * from patients", "baseline.unbounded-phi-read", "r", Some("s7".into()));
        assert_eq!(b.list().len(), 1);
        let me = Approver { name: "unix:root".into(), workload: Some("billing".into()) };
        assert_eq!(b.decide(t.id, &me, true, "ok", None), Err(ApprovalError::SelfApproval("billing".into())));
        assert_eq!(b.decide(t.id, &human(), true, " ", None), Err(ApprovalError::NoReason));
        let o = b.decide(t.id, &human(), true, "ticket 42", None).unwrap();
        assert!(matches!(o, Outcome::Approved { ref by, .. } if by == "unix:alice"));
        assert_eq!(t.reply.try_recv().unwrap(), o);
        assert_eq!(b.decide(t.id, &human(), true, "again", None), Err(ApprovalError::NotFound(t.id)));
        // The decision is kept with approver, reason and time.
        let shown = serde_json::to_value(b.show(t.id).unwrap()).unwrap();
        assert_eq!(shown["outcome"], "approved");
        assert_eq!(shown["by"], "unix:alice");
        assert_eq!(shown["reason"], "ticket 42");
        assert!(shown["decided_at"].as_u64().unwrap() >= shown["requested_at"].as_u64().unwrap());
        assert_eq!(shown["statement"], "select * from patients");
        let t2 = b.request(requester("billing"), "clinical", "clinical", "x", "r", "r", Some("x".into()));
        assert!(matches!(b.decide(t2.id, &human(), false, "no", None).unwrap(), Outcome::Denied { .. }));
    }

    #[test]
    fn windows_grant_the_same_statement_and_expire() {
        let b = Broker::new(Duration::from_secs(60), Duration::from_secs(3600));
        let t = b.request(requester("billing"), "d", "d", "s", "r", "r", Some("s99".into()));
        assert!(b.decide(t.id, &human(), true, "ok", Some(Duration::from_secs(7200))).is_err(), "over the maximum");
        b.decide(t.id, &human(), true, "ok", Some(Duration::from_millis(200))).unwrap();
        let key =
            |identity: &str, normalized: &str| GrantKey { identity: identity.into(), database: "d".into(), dbname: "d".into(), normalized: normalized.into() };
        assert_eq!(b.granted(&key("billing", "s99")), Some(Grant { id: t.id, by: "unix:alice".into(), reason: "ok".into() }));
        assert_eq!(b.granted(&key("billing", "s98")), None, "another statement");
        assert_eq!(b.granted(&key("other", "s99")), None, "another identity");
        assert_eq!(b.granted(&GrantKey { dbname: "e".into(), ..key("billing", "s99") }), None, "another database");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(b.granted(&key("billing", "s99")), None, "expired");
    }

    #[test]
    fn a_statement_that_cannot_be_normalized_is_approved_once_without_a_window() {
        let b = Broker::new(Duration::from_secs(60), Duration::from_secs(3600));
        let t = b.request(requester("billing"), "d", "d", "s", "r", "r", None);
        let o = b.decide(t.id, &human(), true, "ok", Some(Duration::from_secs(600))).unwrap();
        assert!(matches!(o, Outcome::Approved { window_secs: None, .. }), "{o:?}");
        assert!(b.grants.lock().unwrap().is_empty(), "no window names it (nor every other statement without one)");
    }

    #[test]
    fn events_are_emitted() {
        let b = Broker::new(Duration::from_secs(60), Duration::from_secs(3600));
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        b.subscribe(move |e| s.lock().unwrap().push(serde_json::to_value(e).unwrap()["event"].as_str().unwrap().to_string()));
        let t = b.request(requester("a"), "d", "d", "s", "r", "r", Some("s".into()));
        b.expire(t.id);
        assert_eq!(*seen.lock().unwrap(), vec!["approval_requested", "approval_decided"]);
    }

    #[test]
    fn request_ids_are_not_reused_after_a_restart() {
        // An approver (or a bot acting on the webhook) decides by id. A request still
        // pending when the agent restarts is gone; the id it was shown must not name
        // another workload's statement in the new run.
        let before = Broker::new(Duration::from_secs(60), Duration::from_secs(3600)).request(requester("a"), "d", "d", "select 1", "r", "r", None).id;
        std::thread::sleep(Duration::from_millis(2));
        let after =
            Broker::new(Duration::from_secs(60), Duration::from_secs(3600)).request(requester("b"), "d", "d", "delete from patients", "r", "r", None).id;
        assert_ne!(before, after, "the restarted agent gave its first request the id of the previous run's first request");
    }
}

//! The policy stage: every statement a workload sends — each simple Query, each
//! extended-protocol Parse — is judged before it reaches the database. Blocked
//! statements get `42501 phigate: blocked by rule <id>: <reason>`; statements that need
//! approval are held until a human decides or the deadline passes. Fast-path function
//! calls (which name functions by OID and bypass SQL) are refused outright.
//!
//! Bind/Execute only refer to statements by name, and a name only exists on the server
//! if its Parse was allowed, so judging Parse covers them. Statement texts are never
//! logged; decisions are logged by rule id.

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use super::{
    audit::SharedTap,
    stage::{Action, Direction, Stage},
    Session,
};
use crate::{
    pg::{frame::take_cstr, msg::tag, Frame, PgError, SqlState},
    policy::{
        approval::{Broker, GrantKey, Outcome, Requester},
        cache, unparseable, Decision, Policy, Subject, Verdict,
    },
};

pub struct Guard {
    policy: Arc<Policy>,
    broker: Arc<Broker>,
    groups: Vec<String>,
    /// Where decisions and approval outcomes are recorded.
    audit: Option<SharedTap>,
}

impl Guard {
    pub fn new(policy: Arc<Policy>, broker: Arc<Broker>, session: &Session, audit: Option<SharedTap>) -> Self {
        let groups = session.token.as_ref().map(|t| t.groups.clone()).unwrap_or_default();
        Self { policy, broker, groups, audit }
    }

    fn decide(&self, session: &Session, sql: &str) -> Decision {
        match cache::analyze(sql).0 {
            Ok(a) => self.policy.decide(&Subject { identity: &session.workload.name, groups: &self.groups }, &a),
            Err(e) => unparseable(&e),
        }
    }

    /// `name`: the prepared statement's name for a Parse, None for a simple Query.
    fn judge(&self, session: &Session, name: Option<&str>, sql: &str) -> Action {
        let d = self.decide(session, sql);
        let protocol = if name.is_some() { "extended" } else { "simple" };
        if let Some(tap) = &self.audit {
            tap.lock().expect("invariant: lock not poisoned").decided(protocol, name, sql, &d);
        }
        match d.verdict {
            Verdict::Allow => Action::Forward,
            Verdict::Block => {
                info!(session_id = session.id, rule = %d.rule, "statement blocked");
                Action::Refuse(blocked(&d))
            }
            Verdict::Approve => self.hold(session, name, sql, d),
        }
    }

    fn hold(&self, session: &Session, name: Option<&str>, sql: &str, d: Decision) -> Action {
        // What a window names: the statement's text with its constants replaced by
        // placeholders (pg_query's normalize), so a repeat with other constants
        // matches and anything else does not: another table, schema or alias, another
        // join, another OR branch. pg_query's fingerprint is too coarse for a grant: it
        // ignores the order of FROM items, select lists and arguments and drops
        // duplicates among them, so `FROM patients p, patients q WHERE p.id = 1`
        // (every patient's row) fingerprints like `FROM patients p WHERE p.id = 1`.
        // Text pg_query cannot normalize is held every time: no window can name it.
        // Nor can a window name a statement with a table name whose schema it leaves
        // to the session's search_path (SET search_path, a startup option): the same
        // text would read `archive.encounters` where the approver saw `encounters`
        // read in the default one. Such a statement is approved once.
        let normalized = pg_query::normalize(sql).ok().filter(|_| names_its_schemas(sql));
        let grant = normalized.clone().map(|normalized| GrantKey {
            identity: session.workload.name.clone(),
            database: session.database.clone(),
            dbname: session.dbname.clone(),
            normalized,
        });
        if let Some(g) = grant.as_ref().and_then(|g| self.broker.granted(g)) {
            info!(session_id = session.id, rule = %d.rule, approval_id = g.id, granted_by = %g.by, "statement allowed by an approval window");
            if let Some(tap) = &self.audit {
                tap.lock().expect("invariant: lock not poisoned").granted(name, &g);
            }
            return Action::Forward;
        }
        let requester = Requester {
            identity: session.workload.name.clone(),
            token_subject: session.token.as_ref().map(|t| t.subject.clone()),
            session_id: session.id,
            audit_session: session.audit_id.clone(),
            pid: session.workload.pid,
            cgroup: session.workload.cgroup.clone(),
        };
        let ticket = self.broker.request(requester, &session.database, &session.dbname, sql, &d.rule, &d.reason, normalized);
        info!(session_id = session.id, approval_id = ticket.id, rule = %d.rule, "statement held for approval");
        if let Some(tap) = &self.audit {
            tap.lock().expect("invariant: lock not poisoned").held(ticket.id);
        }
        let audit = self.audit.clone().map(|t| (t, name.map(String::from), sql.to_string(), d.clone()));
        let timeout = self.broker.timeout;
        let notice = PgError::notice(format!(
            "phigate: statement held for approval (request {}, rule {}: {}); waiting up to {} s",
            ticket.id,
            d.rule,
            d.reason,
            timeout.as_secs()
        ))
        .with_hint(format!("An approver runs: phigate approvals approve {} --reason \"...\"", ticket.id));
        let broker = self.broker.clone();
        // Subscribed now, as the statement is held: a cancel from here on counts, one
        // that came before does not.
        let mut cancelled = session.cancel.subscribe();
        // Made before the future, so that a session dropping it unpolled withdraws
        // the request too.
        let pending = AbandonOnDrop { broker: broker.clone(), id: ticket.id, done: false };
        let decision = async move {
            // The whole guard, not a copy of its flag: it must live as long as this does.
            let mut pending = pending;
            let mut reply = ticket.reply;
            let waited = tokio::select! {
                // A decision already given wins (the statement runs, as a cancel does
                // not undo what the database already did).
                biased;
                o = tokio::time::timeout(timeout, &mut reply) => match o {
                    Ok(Ok(o)) => Waited::Decided(o),
                    _ => Waited::Deadline,
                },
                // The client cancelled: the request is withdrawn, so an approval given
                // afterwards finds nothing to decide. (If one slipped in between, the
                // statement is still not run.)
                Ok(()) = cancelled.changed() => Waited::Decided(broker.cancel(ticket.id).unwrap_or(Outcome::Cancelled { decided_at: crate::policy::approval::epoch_secs(std::time::SystemTime::now()) })),
            };
            pending.done = true;
            let outcome = settle(&broker, ticket.id, waited, &mut reply);
            if let Some((tap, name, sql, d)) = &audit {
                let protocol = if name.is_some() { "extended" } else { "simple" };
                tap.lock().expect("invariant: lock not poisoned").approval(protocol, name.as_deref(), sql, d, &outcome);
            }
            match outcome {
                Outcome::Approved { by, .. } => {
                    info!(approval_id = ticket.id, approver = %by, "statement approved");
                    Ok(())
                }
                Outcome::Denied { by, reason, .. } => {
                    warn!(approval_id = ticket.id, approver = %by, "statement denied");
                    Err(PgError::error(SqlState::INSUFFICIENT_PRIVILEGE, format!("phigate: denied by {by} (rule {}): {reason}", d.rule)))
                }
                Outcome::Cancelled { .. } => {
                    info!(approval_id = ticket.id, "held statement cancelled by the client");
                    // PostgreSQL's own words for a cancelled statement, which clients know.
                    Err(PgError::error(SqlState::QUERY_CANCELED, "canceling statement due to user request")
                        .with_hint(format!("phigate withdrew approval request {}; the statement was not run", ticket.id)))
                }
                _ => {
                    warn!(approval_id = ticket.id, "approval deadline passed");
                    Err(PgError::error(
                        SqlState::INSUFFICIENT_PRIVILEGE,
                        format!("phigate: not approved within {} s (rule {}: {}); the statement was not run", timeout.as_secs(), d.rule, d.reason),
                    )
                    .with_hint("Ask an approver to approve it, then run it again."))
                }
            }
        };
        Action::Hold(Box::pin(decision), Some(notice))
    }
}

/// How a held statement's wait ended.
enum Waited {
    Decided(Outcome),
    /// The deadline passed (or the request went without a word).
    Deadline,
}

/// The outcome of a hold whose wait ended. At the deadline the request is withdrawn,
/// unless an approver decided in the instant between the timer firing and the
/// withdrawal: that decision then stands, so the client is told what the approver,
/// the webhook and the audit log were told (before, the client heard "not approved in
/// time" of a statement recorded as approved, with its window open).
fn settle(broker: &Broker, id: u64, waited: Waited, reply: &mut tokio::sync::oneshot::Receiver<Outcome>) -> Outcome {
    match waited {
        Waited::Decided(o) => o,
        Waited::Deadline => match broker.expire(id) {
            Some(timed_out) => timed_out,
            None => reply.try_recv().unwrap_or_else(|_| Outcome::TimedOut { decided_at: crate::policy::approval::epoch_secs(std::time::SystemTime::now()) }),
        },
    }
}

/// Whether every table the statement names has its schema written out (a CTE's name
/// aside), so that no session's search_path can make it another table.
fn names_its_schemas(sql: &str) -> bool {
    match cache::analyze(sql).0 {
        Ok(a) => a.statements.iter().all(|f| f.tables.iter().all(|t| t.schema.is_some() || f.ctes.contains_key(&t.name))),
        Err(_) => false,
    }
}

/// Withdraws the request of a session that stopped waiting before any outcome
/// (its client went away, so the session dropped the future waiting for it).
struct AbandonOnDrop {
    broker: Arc<Broker>,
    id: u64,
    done: bool,
}

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if !self.done {
            self.broker.abandon(self.id);
        }
    }
}

fn blocked(d: &Decision) -> PgError {
    PgError::error(SqlState::INSUFFICIENT_PRIVILEGE, format!("phigate: blocked by rule {}: {}", d.rule, d.reason))
}

impl Stage for Guard {
    fn name(&self) -> &'static str {
        "policy"
    }

    fn needs_whole(&self, direction: Direction, t: u8) -> bool {
        direction == Direction::Frontend && matches!(t, tag::QUERY | tag::PARSE | tag::FUNCTION_CALL)
    }

    fn frontend(&mut self, session: &Session, frame: &Frame) -> Action {
        match frame.tag() {
            tag::QUERY => {
                let mut body = frame.body();
                match take_cstr(&mut body, "Query") {
                    Ok(sql) => self.judge(session, None, sql),
                    Err(e) => Action::Refuse(PgError::error(SqlState::PROTOCOL_VIOLATION, format!("phigate: blocked a malformed Query: {e}"))),
                }
            }
            tag::PARSE => {
                let mut body = frame.body();
                let parsed = take_cstr(&mut body, "Parse").and_then(|name| Ok((name, take_cstr(&mut body, "Parse")?)));
                match parsed {
                    Ok((name, sql)) => self.judge(session, Some(name), sql),
                    Err(e) => Action::Refuse(PgError::error(SqlState::PROTOCOL_VIOLATION, format!("phigate: blocked a malformed Parse: {e}"))),
                }
            }
            tag::FUNCTION_CALL => Action::Refuse(blocked(&Decision {
                verdict: Verdict::Block,
                rule: "fastpath".into(),
                reason: "fast-path function calls bypass SQL and cannot be judged".into(),
            })),
            _ => Action::Forward,
        }
    }
}

/// How long `phigate approvals` may wait for the agent's answer.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::policy::{approval::Approver, BaselineSettings};

    /// A guard for identity "w" whose every statement needs approval.
    fn guard() -> (Guard, Arc<Broker>) {
        let policy = Policy {
            baseline: BaselineSettings { enabled: false, phi_tables: Vec::new(), unbounded_read_limit: 1000 },
            rules: Vec::new(),
            defaults: HashMap::from([("w".to_string(), Verdict::Approve)]),
        };
        let broker = Arc::new(Broker::new(Duration::from_secs(60), Duration::from_secs(3600)));
        (Guard::new(Arc::new(policy), broker.clone(), &crate::session::stage::tests::session(), None), broker)
    }

    fn query(sql: &str) -> Frame {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        Frame::build(tag::QUERY, &body)
    }

    /// `sql` is held, and a person approves it with a ten-minute grant window.
    async fn approve_for_ten_minutes(guard: &mut Guard, broker: &Broker, session: &Session, sql: &str) {
        let Action::Hold(decision, _) = guard.frontend(session, &query(sql)) else { panic!("held") };
        let id = broker.list()[0].id;
        let person = Approver { name: "unix:alice".into(), workload: None };
        broker.decide(id, &person, true, "ticket 1", Some(Duration::from_secs(600))).expect("approve");
        assert!(decision.await.is_ok());
    }

    #[tokio::test]
    async fn a_grant_window_covers_the_same_statement_only() {
        let (mut guard, broker) = guard();
        let session = crate::session::stage::tests::session();
        approve_for_ten_minutes(&mut guard, &broker, &session, "SELECT * FROM public.patients p WHERE p.id = 1").await;
        // Constants aside, the same statement runs without asking.
        assert!(matches!(guard.frontend(&session, &query("SELECT * FROM public.patients p WHERE p.id = 2")), Action::Forward));
        // Another table (under the same alias, or in another schema) is another
        // statement.
        for other in ["SELECT * FROM public.encounters p WHERE p.id = 1", "SELECT * FROM archive.patients p WHERE p.id = 1"] {
            assert!(matches!(guard.frontend(&session, &query(other)), Action::Hold(..)), "{other} ran under the grant for patients");
        }
    }

    #[tokio::test]
    async fn a_grant_window_covers_the_database_it_was_approved_for_only() {
        let (mut guard, broker) = guard();
        let session = crate::session::stage::tests::session();
        approve_for_ten_minutes(&mut guard, &broker, &session, "SELECT * FROM public.patients").await;
        assert!(matches!(guard.frontend(&session, &query("SELECT * FROM public.patients")), Action::Forward));
        // The same identity and statement against another PostgreSQL database, or
        // another protected database service: the approver did not see that one.
        let other_dbname = Session { dbname: "db_prod".into(), ..session.clone() };
        assert!(matches!(guard.frontend(&other_dbname, &query("SELECT * FROM public.patients")), Action::Hold(..)), "ran in another database");
        let other_service = Session { database: "research".into(), ..session };
        assert!(matches!(guard.frontend(&other_service, &query("SELECT * FROM public.patients")), Action::Hold(..)), "ran on another database service");
    }

    #[tokio::test]
    async fn a_grant_window_does_not_cover_the_same_table_joined_again() {
        let (mut guard, broker) = guard();
        let session = crate::session::stage::tests::session();
        // Approved: one patient's row, by id.
        approve_for_ten_minutes(&mut guard, &broker, &session, "SELECT * FROM public.patients p WHERE p.id = 1").await;
        // The same table joined once more: every patient's row (q is not bounded).
        // pg_query's fingerprint drops duplicate FROM items (aliases aside): the two
        // fingerprint alike, and windows once named statements by fingerprint.
        let wider = "SELECT * FROM public.patients p, public.patients q WHERE p.id = 1";
        assert!(matches!(guard.frontend(&session, &query(wider)), Action::Hold(..)), "{wider} ran under the grant for one patient's row");
    }

    #[tokio::test]
    async fn a_window_names_only_statements_whose_tables_have_their_schemas() {
        let (mut guard, broker) = guard();
        let session = crate::session::stage::tests::session();
        // Unqualified: the session's search_path decides which table it is.
        approve_for_ten_minutes(&mut guard, &broker, &session, "SELECT * FROM encounters").await;
        assert!(matches!(guard.frontend(&session, &query("SELECT * FROM encounters")), Action::Hold(..)), "approved once, without a window");
        assert!(broker.list().is_empty(), "the hold, dropped, withdrew its request");
        // A CTE's name is no table.
        let cte = "WITH e AS (SELECT * FROM public.encounters) SELECT * FROM e";
        approve_for_ten_minutes(&mut guard, &broker, &session, cte).await;
        assert!(matches!(guard.frontend(&session, &query(cte)), Action::Forward));
    }

    #[tokio::test]
    async fn a_request_whose_session_ended_is_abandoned_not_timed_out() {
        let (mut guard, broker) = guard();
        let session = crate::session::stage::tests::session();
        let outcome_of = |id: u64| serde_json::to_value(broker.show(id).expect("remembered")).expect("json")["outcome"].clone();
        // The client went away while the statement waited: the session drops the
        // future it waited on, polled or not.
        let Action::Hold(mut decision, _) = guard.frontend(&session, &query("SELECT 1")) else { panic!("held") };
        let id = broker.list()[0].id;
        assert!(tokio::time::timeout(Duration::from_millis(20), &mut decision).await.is_err(), "still held");
        drop(decision);
        assert!(broker.list().is_empty(), "withdrawn");
        assert_eq!(outcome_of(id), "abandoned");
        let Action::Hold(decision, _) = guard.frontend(&session, &query("SELECT 2")) else { panic!("held") };
        let id = broker.list()[0].id;
        drop(decision);
        assert!(broker.list().is_empty(), "withdrawn unpolled too");
        assert_eq!(outcome_of(id), "abandoned");
        // A deadline that passes is still a timeout.
        let short = Arc::new(Broker::new(Duration::from_millis(30), Duration::from_secs(3600)));
        let mut guard = Guard::new(guard.policy.clone(), short.clone(), &session, None);
        let Action::Hold(decision, _) = guard.frontend(&session, &query("SELECT 3")) else { panic!("held") };
        let id = short.list()[0].id;
        let err = decision.await.expect_err("not approved in time");
        assert!(err.message.contains("not approved within"), "{err}");
        assert_eq!(serde_json::to_value(short.show(id).expect("remembered")).expect("json")["outcome"], "timed_out");
    }

    #[test]
    fn a_decision_that_lands_as_the_deadline_passes_is_the_outcome() {
        // The approver decides after the timer fired and before the request was
        // withdrawn: what the client hears must be what was recorded.
        let broker = Broker::new(Duration::from_secs(60), Duration::from_secs(3600));
        let requester = Requester { identity: "w".into(), token_subject: None, session_id: 1, audit_session: "s".into(), pid: 1, cgroup: "c".into() };
        let mut ticket = broker.request(requester.clone(), "db", "db", "SELECT 1", "r", "why", None);
        let human = crate::policy::approval::Approver { name: "unix:alice".into(), workload: None };
        broker.decide(ticket.id, &human, true, "ok", None).expect("decided");
        assert!(matches!(settle(&broker, ticket.id, Waited::Deadline, &mut ticket.reply), Outcome::Approved { .. }));
        // Nobody decided: the deadline withdraws it.
        let mut ticket = broker.request(requester, "db", "db", "SELECT 2", "r", "why", None);
        assert!(matches!(settle(&broker, ticket.id, Waited::Deadline, &mut ticket.reply), Outcome::TimedOut { .. }));
        assert!(broker.list().is_empty());
        assert!(broker.decide(ticket.id, &human, true, "late", None).is_err(), "too late to approve");
    }

    #[tokio::test]
    async fn a_cancel_withdraws_the_statement_held_when_it_comes() {
        let (mut guard, broker) = guard();
        let session = crate::session::stage::tests::session();
        // A cancel while nothing is held cancels nothing later.
        session.cancel.send_modify(|n| *n += 1);
        let Action::Hold(mut decision, _) = guard.frontend(&session, &query("SELECT 1")) else { panic!("held") };
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut decision).await.is_err(), "still held");
        session.cancel.send_modify(|n| *n += 1);
        let err = decision.await.expect_err("cancelled");
        assert_eq!(err.code, SqlState::QUERY_CANCELED, "{err}");
        assert!(broker.list().is_empty(), "the request was withdrawn");
    }
}

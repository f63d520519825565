//! The audit stage and the session's audit tap: every session, statement, decision,
//! approval, masking summary and result goes to the audit log.
//!
//! The [`Tap`] is shared by the stages that know things the audit needs: the policy
//! stage posts each decision (blocked statements never reach the database, so their
//! record is written right away) and approval outcomes; the masking stage posts each
//! raw row before it rewrites it, and its masking summaries. The [`AuditStage`] sits
//! between them in the pipeline: it sees the client's messages the policy let through
//! and the database's messages as masking left them — what the client receives.
//!
//! Durability: the record of a statement is written when the statement goes to the
//! database, and nothing the database answers to it is released to the client until
//! that record is durable (the writer's group commit usually finishes while the
//! database works). The statement's end — outcome, masking summary, the result as
//! delivered and, encrypted, as the database sent it — follows without holding the
//! client. When the log cannot be written, new statements are refused.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{
    stage::{Action, Direction, Stage},
    Session,
};
use crate::{
    audit::{
        record::{canonical, hex, json_b64, kind, object, object_sized},
        writer::{Commit, Durable, Handle},
    },
    mask::Summary,
    pg::{
        error::parse_error_fields,
        flow::{Answer, Definitions, Flow, Request},
        msg::{self, tag},
        Frame, PgError, SqlState,
    },
    policy::{approval::Outcome, Decision, Verdict},
};

/// The session's start record (also used by `connection_refused`).
pub fn session_data(s: &Session, audit_id: &str) -> Value {
    let w = &s.workload;
    json!({
        "session": audit_id,
        "session_pid": s.id,
        "identity": {"name": w.name, "cgroup": format!("/{}", w.cgroup), "protected_cgroup_id": w.protected_cgroup_id, "cgroup_id": w.cgroup_id, "pid": w.pid, "uid": w.uid, "gid": w.gid, "comm": w.comm},
        "token": s.token.as_ref().map(|t| json!({"subject": t.subject, "groups": t.groups})),
        "auth": s.auth_method.as_str(),
        "client": s.client.0.to_string(),
        "orig_dst": s.orig_dst.0.to_string(),
        "database": s.database,
        "dbname": s.dbname,
        "client_user": s.client_user,
        "application_name": s.application_name,
        "options": s.options,
        "upstream_role": s.upstream_role,
        "client_tls": s.client_tls,
        "upstream_tls": s.upstream_tls,
        "accepted_at": crate::audit::record::format_ts(s.accepted_at.into()),
        "started_at": crate::audit::record::format_ts(s.started_at.into()),
    })
}

fn outcome_json(o: &Outcome, id: u64) -> Value {
    let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.insert("id".into(), Value::from(id));
    }
    v
}

/// A statement record's data in canonical form. `params`: how many parameters were
/// bound and, sealed, their values (when there were any).
fn statement_record(audit_id: &str, f: &StatementFacts<'_>, outcome: &str, params: Option<(usize, Option<&str>)>) -> String {
    object(|o| {
        o.value("approval", f.approval);
        {
            let mut d = o.obj("decision");
            match f.decision {
                Some(x) => d.str("reason", &x.reason).str("rule", &x.rule).str("verdict", verdict_name(x.verdict)),
                None => d.str("reason", "the SQL policy is disabled").str("rule", "policy-disabled").str("verdict", "unchecked"),
            };
            d.end();
        }
        o.str("outcome", outcome);
        if let Some((count, sealed)) = params {
            o.u64("param_count", count as u64);
            if let Some(sealed) = sealed {
                o.raw("params", Some(sealed));
            }
        }
        o.opt_str("portal", f.portal)
            .str("protocol", f.protocol)
            .str("session", audit_id)
            .opt_str("statement_name", f.name)
            .u64("stmt", f.stmt)
            .str("text", f.sql);
    })
}

/// A statement's end record in canonical form: outcome, masking summary, the result
/// as delivered, and the raw result sealed (`sealed`) or, when masking left it
/// alone, its hash.
fn statement_end_record(
    audit_id: &str,
    r: &Running,
    duration_us: u64,
    masking: Option<&Value>,
    sealed: Option<&str>,
    delivered_sha: &str,
    raw_sha: &str,
) -> String {
    let size = 512 + audit_id.len() + r.columns.as_ref().map_or(0, String::len) + sealed.map_or(0, str::len) + r.delivered.kept.len();
    object_sized(size, |o| {
        // Integers only in records: JSON floats do not round-trip exactly, and the
        // hash is over the canonical text.
        o.u64("bytes", r.bytes)
            .opt_str("command", r.command.as_deref())
            .u64("duration_us", duration_us)
            .value("error", r.error.as_ref())
            .value("masking", masking);
        if sealed.is_some() {
            o.raw("raw", sealed);
        }
        o.bool("raw_differs", r.raw_differs);
        if sealed.is_none() {
            o.str("raw_sha256", raw_sha);
        }
        {
            let mut res = o.obj("result");
            res.raw("columns", r.columns.as_deref()).array("rows", &r.delivered.kept).str("sha256", delivered_sha).bool("truncated", r.truncated);
            res.end();
        }
        o.u64("rows", r.rows).str("session", audit_id).u64("stmt", r.stmt);
    })
}

/// One statement on its way through the database.
struct Running {
    stmt: u64,
    /// Which batch it belongs to (see `Tap::batches_sent`).
    batch: u64,
    /// The prepared statement it executes (extended protocol).
    name: Option<String>,
    /// Recorded with the text of a Parse the server then refused: what ran is not
    /// what the record says, so its result is withheld.
    unattributable: bool,
    started: Instant,
    rows: u64,
    bytes: u64,
    /// The RowDescription as canonical JSON: `[{"format":…,"name":…,"type":…}]`.
    columns: Option<String>,
    command: Option<String>,
    error: Option<Value>,
    /// The result as the client receives it.
    delivered: ResultCopy,
    /// The result as the database sent it (masking's input), once a row differs;
    /// until then `delivered` is the raw result too, and each row is hashed once.
    raw: ResultCopy,
    raw_differs: bool,
    truncated: bool,
    masking: Option<Summary>,
}

impl Running {
    fn new(stmt: u64) -> Self {
        Self {
            stmt,
            batch: 0,
            name: None,
            unattributable: false,
            started: Instant::now(),
            rows: 0,
            bytes: 0,
            columns: None,
            command: None,
            error: None,
            delivered: ResultCopy::default(),
            raw: ResultCopy::default(),
            raw_differs: false,
            truncated: false,
            masking: None,
        }
    }

    /// The raw form of a row masking rewrote (before its delivered form arrives).
    fn raw_row(&mut self, body: &[u8], limit: usize) {
        if !self.raw_differs {
            // Every row before this one reached the client as the database sent it.
            self.raw = self.delivered.clone();
            self.raw_differs = true;
        }
        self.raw.add(body, limit);
    }

    /// A row as the client receives it; `rewritten`: its raw form came through
    /// [`Running::raw_row`].
    fn delivered_row(&mut self, body: &[u8], limit: usize, rewritten: bool) {
        if !self.delivered.add(body, limit) {
            self.truncated = true;
        }
        // A row masking left alone is its own raw form, kept apart only once the two
        // results differ.
        if !rewritten && self.raw_differs {
            self.raw.add(body, limit);
        }
    }

    /// The hashes of the delivered and the raw result, hex.
    fn result_hashes(&mut self) -> (String, String) {
        let delivered = self.delivered.sha256();
        let raw = if self.raw_differs { self.raw.sha256() } else { delivered.clone() };
        (delivered, raw)
    }
}

/// One form of a statement's result: the hash of every row, and the rows kept for
/// replay (up to the limit, counted in row bytes) as the elements of a JSON array of
/// base64 strings, encoded once into one buffer — no string per row.
#[derive(Default, Clone)]
struct ResultCopy {
    hash: Sha256,
    kept: Vec<u8>,
    kept_bytes: usize,
}

impl ResultCopy {
    /// Hash a row and keep it if it fits; false when it did not.
    fn add(&mut self, body: &[u8], limit: usize) -> bool {
        self.hash.update(body);
        if self.kept_bytes + body.len() > limit {
            return false;
        }
        self.kept_bytes += body.len();
        if !self.kept.is_empty() {
            self.kept.push(b',');
        }
        json_b64(&mut self.kept, body);
        true
    }

    /// The hash of every row, hex.
    fn sha256(&mut self) -> String {
        hex(&std::mem::take(&mut self.hash).finalize())
    }
}

/// A prepared statement as the audit sees it: text, decision, approval.
type PreparedStatement = Arc<(Arc<str>, Option<Decision>, Option<Value>)>;

/// What a name meant before a Parse or Bind replaced it (see `Tap::definitions`).
enum Prior {
    Prepared(Option<PreparedStatement>),
    Portal(Option<Arc<(String, Vec<u8>, usize)>>),
}

/// What a statement record says besides its outcome and parameters.
struct StatementFacts<'a> {
    stmt: u64,
    protocol: &'a str,
    sql: &'a str,
    name: Option<&'a str>,
    portal: Option<&'a str>,
    decision: Option<&'a Decision>,
    approval: Option<&'a Value>,
}

/// The verdict as records spell it (`Verdict`'s `Display`, without formatting).
fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Approve => "approve",
        Verdict::Block => "block",
    }
}

/// What the stages tell the audit about one session.
pub struct Tap {
    writer: Handle,
    /// The worker thread's hub: records are committed there, at the end of the
    /// worker's turn, instead of waking the writer thread for each.
    hub: Option<Arc<super::durable::WakeHub>>,
    pub audit_id: String,
    max_result_bytes: usize,
    masking_on: bool,
    next_stmt: u64,
    /// The policy's decision about the Query the audit stage is about to see.
    pending_simple: Option<(Decision, Option<Value>)>,
    /// Prepared statements: name → (text, decision).
    prepared: HashMap<String, PreparedStatement>,
    /// Portals: name → (statement name, bound parameters).
    portals: HashMap<String, Arc<(String, Vec<u8>, usize)>>,
    /// Parse and Bind definitions the server has not confirmed yet, with what each
    /// name meant before: one the server refused or skipped goes back, so executions
    /// are recorded with the text that ran.
    definitions: Definitions<(String, Prior)>,
    /// What a Parse's name meant before the policy's decision replaced it.
    parse_prior: Option<(String, Option<PreparedStatement>)>,
    /// An approval the policy is waiting for: (id, requested_at).
    held: Option<u64>,
    /// The durability of the latest statement record; results wait for it.
    /// The durability of every statement record sent and not yet seen durable, in
    /// order: with pipelined statements, each one's answer waits for its own record
    /// (and, conservatively, for those sent after it), not only the latest.
    durable: std::collections::VecDeque<super::durable::Slot>,
    durable_failed: Option<String>,
    /// Rows masking rewrote whose raw form is already accounted for (hashed and
    /// kept); the audit stage pairs each with the rewritten row it sees next, so it
    /// must not count them as raw again. Counting, not copying: no allocation per row.
    raw_pending: usize,
    running: std::collections::VecDeque<Running>,
    /// Requests sent that end in a ReadyForQuery (Sync, Query, fast-path call), and
    /// ReadyForQuery messages seen (plus Syncs the server ignored inside a COPY): a
    /// statement of batch n is over once more than n have ended, even if an error
    /// made the server skip it (a batch of three Executes whose first fails).
    batches_sent: u64,
    batches_done: u64,
    statements: u64,
    rows: u64,
}

pub type SharedTap = Arc<Mutex<Tap>>;

impl Tap {
    pub fn new(writer: Handle, session: &Session, max_result_bytes: usize, masking_on: bool) -> SharedTap {
        let audit_id = session.audit_id.clone();
        let hub = super::durable::WakeHub::current();
        let tap = Self {
            writer,
            hub,
            audit_id,
            max_result_bytes,
            masking_on,
            next_stmt: 1,
            pending_simple: None,
            prepared: HashMap::new(),
            portals: HashMap::new(),
            definitions: Definitions::default(),
            parse_prior: None,
            held: None,
            durable: std::collections::VecDeque::new(),
            durable_failed: None,
            raw_pending: 0,
            running: Default::default(),
            batches_sent: 0,
            batches_done: 0,
            statements: 0,
            rows: 0,
        };
        tap.send(kind::SESSION_START, session_data(session, &tap.audit_id), None);
        Arc::new(Mutex::new(tap))
    }

    /// Queue a record (with a waiter, if given): committed by this worker's hub at
    /// the end of its turn when there is one, else by the writer thread.
    fn send(&self, kind: &'static str, data: Value, done: Option<Durable>) {
        self.send_canonical(kind, Ok(canonical(&data)), done);
    }

    /// [`Tap::send`] for a record built in canonical form (or why it could not be).
    fn send_canonical(&self, kind: &'static str, data: Result<String, String>, done: Option<Durable>) {
        match &self.hub {
            Some(hub) => {
                self.writer.submit_canonical(kind, data, done, Commit::Caller);
                hub.request_commit();
            }
            None => self.writer.submit_canonical(kind, data, done, Commit::Writer),
        }
    }

    /// Undo the Parse and Bind messages the server did not carry out (newest first).
    /// Statements of later batches sent before phigate knew, and recorded with a
    /// refused Parse's text, cannot be attributed: their results are withheld.
    fn undo(&mut self, undone: Vec<(String, Prior)>) {
        for (name, prior) in undone {
            match prior {
                Prior::Prepared(prior) => {
                    let batch = self.batches_done;
                    for r in self.running.iter_mut().filter(|r| r.batch > batch && r.name.as_deref() == Some(name.as_str())) {
                        r.unattributable = true;
                    }
                    match prior {
                        Some(p) => drop(self.prepared.insert(name, p)),
                        None => drop(self.prepared.remove(&name)),
                    }
                }
                Prior::Portal(Some(p)) => drop(self.portals.insert(name, p)),
                Prior::Portal(None) => drop(self.portals.remove(&name)),
            }
        }
    }

    fn take_stmt(&mut self) -> u64 {
        let n = self.next_stmt;
        self.next_stmt += 1;
        n
    }

    /// The policy decided about a simple Query or a Parse (`name` for Parse).
    pub fn decided(&mut self, protocol: &str, name: Option<&str>, sql: &str, d: &Decision) {
        match d.verdict {
            Verdict::Block => {
                let stmt = self.take_stmt();
                let data = statement_record(
                    &self.audit_id,
                    &StatementFacts { stmt, protocol, sql, name, portal: None, decision: Some(d), approval: None },
                    "blocked",
                    None,
                );
                self.send_canonical(kind::STATEMENT, Ok(data), None);
            }
            _ => match name {
                Some(n) => {
                    let prior = self.prepared.insert(n.to_string(), Arc::new((Arc::from(sql), Some(d.clone()), None)));
                    self.parse_prior = Some((n.to_string(), prior));
                }
                None => self.pending_simple = Some((d.clone(), None)),
            },
        }
    }

    /// The policy holds the statement for approval `id`.
    pub fn held(&mut self, id: u64) {
        self.held = Some(id);
    }

    /// The approval's outcome. Approved statements go on (the stage records them
    /// when it sees them); denied or timed out ones are recorded now.
    pub fn approval(&mut self, protocol: &str, name: Option<&str>, sql: &str, d: &Decision, o: &Outcome) {
        let id = self.held.take().unwrap_or(0);
        let approval = outcome_json(o, id);
        match o {
            Outcome::Approved { .. } => self.attach_approval(name, approval),
            _ => {
                let stmt = self.take_stmt();
                let outcome = match o {
                    Outcome::Denied { .. } => "denied",
                    Outcome::Cancelled { .. } => "cancelled",
                    _ => "not_approved_in_time",
                };
                let data = statement_record(
                    &self.audit_id,
                    &StatementFacts { stmt, protocol, sql, name, portal: None, decision: Some(d), approval: Some(&approval) },
                    outcome,
                    None,
                );
                self.send_canonical(kind::STATEMENT, Ok(data), None);
                if let Some(n) = name {
                    // Not sent: the name means what it meant before.
                    match self.parse_prior.take().filter(|(p, _)| p == n) {
                        Some((_, Some(prior))) => drop(self.prepared.insert(n.to_string(), prior)),
                        _ => drop(self.prepared.remove(n)),
                    }
                } else {
                    self.pending_simple = None;
                }
            }
        }
    }

    /// The statement runs without asking under the window approval `g` left: its
    /// record names that approval (several windows may be open, from one approver).
    pub fn granted(&mut self, name: Option<&str>, g: &crate::policy::approval::Grant) {
        self.attach_approval(name, json!({"outcome": "approved_by_window", "by": g.by, "id": g.id, "reason": g.reason}));
    }

    /// The approval goes with the statement's record when the stage sees it run.
    fn attach_approval(&mut self, name: Option<&str>, approval: Value) {
        match name {
            Some(n) => {
                if let Some(p) = self.prepared.get_mut(n) {
                    Arc::make_mut(p).2 = Some(approval);
                }
            }
            None => {
                if let Some(p) = self.pending_simple.as_mut() {
                    p.1 = Some(approval);
                }
            }
        }
    }

    /// Masking is about to rewrite this row: account for its raw form now (hash and
    /// snapshot), so the row need not be copied until the rewritten one arrives.
    pub fn raw_row(&mut self, body: &[u8]) {
        let limit = self.max_result_bytes;
        let Some(r) = self.running.front_mut() else { return };
        r.raw_row(body, limit);
        self.raw_pending += 1;
    }

    pub fn masked(&mut self, summary: Summary) {
        if let Some(r) = self.running.front_mut() {
            match &mut r.masking {
                Some(m) => {
                    m.cells_masked += summary.cells_masked;
                    m.rows += summary.rows;
                    m.by_rule.extend(summary.by_rule);
                    for (k, n) in summary.by_kind {
                        *m.by_kind.entry(k).or_insert(0) += n;
                    }
                }
                None => r.masking = Some(summary),
            }
        }
    }

    /// A statement goes to the database: record it; its answer waits for the record.
    #[allow(clippy::too_many_arguments, reason = "the facts of one statement record; a struct would only rename them")]
    fn start(
        &mut self,
        protocol: &str,
        sql: &str,
        name: Option<&str>,
        portal: Option<&str>,
        decision: Option<&Decision>,
        approval: Option<&Value>,
        params: Option<(&[u8], usize)>,
    ) -> Result<(), String> {
        let stmt = self.next_stmt;
        let facts = StatementFacts { stmt, protocol, sql, name, portal, decision, approval };
        let data = match params {
            Some((p, count)) if count > 0 => self
                .writer
                .seal_canonical(&format!("{}:{stmt}:params", self.audit_id), p)
                .map(|sealed| statement_record(&self.audit_id, &facts, "sent", Some((count, Some(&sealed))))),
            Some((_, count)) => Ok(statement_record(&self.audit_id, &facts, "sent", Some((count, None)))),
            None => Ok(statement_record(&self.audit_id, &facts, "sent", None)),
        };
        // A statement whose record cannot be made is refused before it runs (not run
        // and then withheld).
        let data = data?;
        self.take_stmt();
        let slot = super::durable::Slot::new();
        self.send_canonical(kind::STATEMENT, Ok(data), Some(slot.durable()));
        self.durable.push_back(slot);
        self.statements += 1;
        self.running.push_back(Running { batch: self.batches_sent, name: name.map(str::to_string), ..Running::new(stmt) });
        Ok(())
    }

    fn end_front(&mut self) {
        let Some(mut r) = self.running.pop_front() else { return };
        self.raw_pending = 0;
        self.rows += r.rows;
        let masking = r.masking.as_ref().map(|m| {
            let by_rule: Map<String, Value> = m.by_rule.iter().map(|(k, n)| (k.to_string(), Value::from(*n))).collect();
            let by_kind: Map<String, Value> = crate::mask::kind_counts(&m.by_kind).into_iter().map(|(k, n)| (k.to_string(), Value::from(n))).collect();
            json!({"cells": m.cells_masked, "by_rule": by_rule, "by_kind": by_kind})
        });
        let (delivered_sha, raw_sha) = r.result_hashes();
        // The raw result, sealed, when masking changed it (else its hash says it is the
        // delivered one).
        // Each copy of a kept result is dropped as soon as the next one exists: the
        // peak memory of a statement's end is bounded by a few times the limit.
        let raw_rows = std::mem::take(&mut r.raw.kept);
        let raw = r.raw_differs.then(|| {
            let plain = object_sized(128 + raw_rows.len(), |o| {
                o.array("rows", &raw_rows).str("sha256", &raw_sha);
            });
            drop(raw_rows);
            self.writer.seal_canonical(&format!("{}:{}:raw", self.audit_id, r.stmt), plain.as_bytes())
        });
        // The result is out already: its record is written all the same, saying why
        // the raw data is missing (the writer now refuses new statements).
        let sealed = match raw {
            Some(Err(why)) => Some(object(|o| {
                o.str("error", &why);
            })),
            Some(Ok(s)) => Some(s),
            None => None,
        };
        let duration_us = r.started.elapsed().as_micros() as u64;
        let data = statement_end_record(&self.audit_id, &r, duration_us, masking.as_ref(), sealed.as_deref(), &delivered_sha, &raw_sha);
        self.send_canonical(kind::STATEMENT_END, Ok(data), None);
    }

    fn end(&mut self, how: &str, stats: Value) {
        while !self.running.is_empty() {
            self.end_front();
        }
        self.writer
            .record(kind::SESSION_END, json!({"session": self.audit_id, "ended": how, "statements": self.statements, "rows": self.rows, "stats": stats}));
    }
}

/// The audit stage (see the module doc).
pub struct AuditStage {
    tap: SharedTap,
    flow: Flow,
    policy_on: bool,
}

impl AuditStage {
    pub fn new(tap: SharedTap, policy_on: bool) -> Self {
        Self { tap, flow: Flow::default(), policy_on }
    }
}

fn refused_by_audit(why: &str) -> PgError {
    let code = if why.contains("No space left") { SqlState::new(b"53100") } else { SqlState::new(b"58030") };
    PgError::error(code, format!("phigate refused the statement: the audit log cannot be written ({why}); the statement was not run"))
        .with_hint("Free space or fix the audit directory; phigate accepts statements again as soon as it can record them.")
}

/// Bound parameter values as a JSON array of base64 strings (null for NULL): what
/// the record seals as `params`.
fn params_json(values: &[Option<&[u8]>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + values.iter().map(|v| v.map_or(4, |b| b.len().div_ceil(3) * 4 + 3)).sum::<usize>());
    out.push(b'[');
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match v {
            Some(b) => json_b64(&mut out, b),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.push(b']');
    out
}

impl Stage for AuditStage {
    fn name(&self) -> &'static str {
        "audit"
    }

    fn needs_whole(&self, direction: Direction, t: u8) -> bool {
        match direction {
            Direction::Frontend => matches!(t, tag::QUERY | tag::PARSE | tag::BIND | tag::EXECUTE | tag::DESCRIBE | tag::CLOSE | tag::FUNCTION_CALL),
            // Rows are kept (up to a limit) for replay; larger ones stream and are
            // recorded by size.
            // While a statement record is not yet known durable, a large message
            // (asked about only when it does not fit what was read) must not stream
            // past the check in `backend`.
            Direction::Backend => {
                matches!(t, tag::ROW_DESCRIPTION | tag::COMMAND_COMPLETE | tag::ERROR_RESPONSE)
                    || !self.tap.lock().expect("invariant: lock not poisoned").durable.is_empty()
            }
        }
    }

    fn frontend(&mut self, _: &Session, frame: &Frame) -> Action {
        let Ok(req) = msg::request_of(frame) else { return Action::Forward };
        if req == Request::FunctionCall {
            // A fast-path call names a function by OID and carries no SQL: nothing an
            // auditor could read as a statement (the policy stage refuses it too, when on).
            return Action::Refuse(
                PgError::error(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "phigate refused a fast-path function call: the audit log records SQL statements, and a fast-path call has none",
                )
                .with_hint("Call the function with SQL instead (SELECT f(...))."),
            );
        }
        let mut tap = self.tap.lock().expect("invariant: lock not poisoned");
        let starts = matches!(req, Request::Query(_) | Request::Execute { .. });
        if starts {
            if let Err(why) = tap.writer.healthy() {
                return Action::Refuse(refused_by_audit(&why));
            }
        }
        match frame.tag() {
            tag::QUERY => {
                if let Request::Query(sql) = &req {
                    let pending = tap.pending_simple.take();
                    let (d, approval) = pending.as_ref().map_or((None, None), |(d, a)| (Some(d), a.as_ref()));
                    if let Err(why) = tap.start("simple", sql, None, None, d, approval, None) {
                        return Action::Refuse(refused_by_audit(&why));
                    }
                }
                tap.definitions.batch_end();
                tap.batches_sent += 1;
            }
            tag::PARSE => {
                if let Ok((name, sql)) = msg::parse_parse(frame.body()) {
                    let prior = if self.policy_on {
                        tap.parse_prior.take().filter(|(n, _)| n == name).and_then(|(_, p)| p)
                    } else {
                        tap.prepared.insert(name.to_string(), Arc::new((Arc::from(sql), None, None)))
                    };
                    tap.definitions.sent((name.to_string(), Prior::Prepared(prior)));
                }
            }
            tag::BIND => {
                if let (Ok((portal, stmt, _)), Ok((_, values))) = (msg::parse_bind(frame.body()), msg::bind_parameters(frame.body())) {
                    let count = values.len();
                    let prior = tap.portals.insert(portal.to_string(), Arc::new((stmt.to_string(), params_json(&values), count)));
                    tap.definitions.sent((portal.to_string(), Prior::Portal(prior)));
                }
            }
            tag::SYNC | tag::FUNCTION_CALL => {
                tap.definitions.batch_end();
                tap.batches_sent += 1;
            }
            tag::EXECUTE => {
                if let Request::Execute { portal } = &req {
                    let bound = tap.portals.get(*portal).cloned().unwrap_or_default();
                    let (stmt, params, count) = &*bound;
                    let prepared = tap.prepared.get(stmt).cloned();
                    let (sql, d, approval) = prepared.as_deref().map_or(("", None, None), |(sql, d, a)| (&**sql, d.as_ref(), a.as_ref()));
                    if let Err(why) = tap.start("extended", sql, Some(stmt), Some(portal), d, approval, Some((params, *count))) {
                        return Action::Refuse(refused_by_audit(&why));
                    }
                }
            }
            tag::CLOSE => {
                if let Ok((k, name)) = msg::parse_target(frame.body(), "Close") {
                    if k == b'S' {
                        tap.prepared.remove(name);
                    } else {
                        tap.portals.remove(name);
                    }
                }
            }
            _ => {}
        }
        drop(tap);
        self.flow.frontend(req);
        Action::Forward
    }

    fn backend(&mut self, _: &Session, frame: &Frame) -> Action {
        let t = frame.tag();
        let mut tap = self.tap.lock().expect("invariant: lock not poisoned");
        // Nothing the database says about a statement reaches the client before the
        // statement's record is durable.
        if let Some(why) = tap.durable_failed.take() {
            return Action::Refuse(PgError::fatal(
                SqlState::new(b"58030"),
                format!("phigate withheld the result: the statement's audit record could not be written ({why})"),
            ));
        }
        while let Some(slot) = tap.durable.pop_front() {
            match slot.try_take() {
                Some(Ok(_)) => {}
                Some(Err(why)) => {
                    return Action::Refuse(PgError::fatal(
                        SqlState::new(b"58030"),
                        format!("phigate withheld the result: the statement's audit record could not be written ({why})"),
                    ))
                }
                None => {
                    let tap2 = self.tap.clone();
                    return Action::Hold(
                        Box::pin(async move {
                            if let Err(why) = slot.wait().await {
                                tap2.lock().expect("invariant: lock not poisoned").durable_failed = Some(why);
                            }
                            Ok(())
                        }),
                        None,
                    );
                }
            }
        }
        let answer = self.flow.backend(t);
        let ignored_syncs = self.flow.take_ignored_syncs();
        // Undone before the batch counts as done: `undo` tells the failed batch's
        // statements from those of later batches by it.
        let undone = tap.definitions.answered(t, &answer, ignored_syncs);
        tap.undo(undone);
        tap.batches_done += ignored_syncs + u64::from(answer == Answer::Ready);
        let limit = tap.max_result_bytes;
        let masking_on = tap.masking_on;
        // A row masking rewrote had its raw form accounted for already.
        let raw_done = matches!(t, tag::DATA_ROW | tag::COPY_DATA) && masking_on && tap.raw_pending > 0;
        if raw_done {
            tap.raw_pending -= 1;
        }
        let batch = tap.batches_done;
        let Some(r) = tap.running.front_mut() else { return Action::Forward };
        if r.unattributable && r.batch == batch && answer != Answer::Ready {
            return Action::Refuse(PgError::fatal(
                SqlState::new(b"58030"),
                "phigate withheld the result: the statement's audit record names a statement the server refused to prepare (the name was in use), so what ran cannot be attributed; do not re-prepare a name in use",
            ));
        }
        r.bytes += frame.len() as u64;
        match t {
            tag::ROW_DESCRIPTION => {
                if let Ok(fields) = msg::parse_row_description(frame.body()) {
                    let mut out = Vec::with_capacity(2 + fields.len() * 40);
                    out.push(b'[');
                    for (i, f) in fields.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        let mut o = crate::audit::record::Obj::new(&mut out);
                        o.i64("format", i64::from(f.format)).str("name", &f.name).u64("type", u64::from(f.type_oid));
                        o.end();
                    }
                    out.push(b']');
                    r.columns = String::from_utf8(out).ok();
                }
            }
            tag::DATA_ROW | tag::COPY_DATA => {
                if t == tag::DATA_ROW {
                    r.rows += 1;
                }
                r.delivered_row(frame.body(), limit, raw_done);
            }
            tag::COMMAND_COMPLETE => {
                let mut rest = frame.body();
                r.command = crate::pg::frame::take_cstr(&mut rest, "CommandComplete").ok().map(String::from);
            }
            tag::ERROR_RESPONSE => {
                let e = parse_error_fields(frame.body());
                r.error = Some(json!({"code": e.code, "message": e.message}));
            }
            _ => {}
        }
        match &answer {
            // Only a statement of the batch being answered: an error in a batch that
            // ran none (a Parse that failed) must not end the next batch's.
            Answer::ExecuteDone(_) | Answer::ExtendedError if tap.running.front().is_some_and(|r| r.batch == tap.batches_done) => tap.end_front(),
            Answer::Ready => {
                while tap.running.front().is_some_and(|r| r.batch < tap.batches_done) {
                    tap.end_front();
                }
            }
            _ => {}
        }
        Action::Forward
    }

    fn streamed(&mut self, _: &Session, direction: Direction, t: u8, len: usize) {
        if direction == Direction::Backend {
            let mut tap = self.tap.lock().expect("invariant: lock not poisoned");
            if let Some(r) = tap.running.front_mut() {
                r.bytes += len as u64;
                if t == tag::DATA_ROW {
                    r.rows += 1;
                    r.truncated = true;
                }
            }
        }
    }

    fn closed(&mut self, _: &Session, how: &str, stats: &super::stage::Stats) {
        let stats = json!({"queries": stats.queries, "executes": stats.executes, "rows": stats.rows, "errors": stats.errors, "bytes_to_server": stats.bytes_to_server, "bytes_to_client": stats.bytes_to_client});
        self.tap.lock().expect("invariant: lock not poisoned").end(how, stats);
    }
}

#[cfg(test)]
mod tests {
    //! The records every statement writes are built straight in canonical form; each
    //! must be byte-for-byte what `canonical` makes of the same record built as a
    //! `Value` (the form `verify` recomputes hashes from).
    use super::*;
    use base64::{engine::general_purpose::STANDARD as B64, Engine};

    fn b64(b: &[u8]) -> String {
        B64.encode(b)
    }

    fn decision(verdict: Verdict) -> Decision {
        Decision { verdict, rule: "hipaa.\"no-ddl\"".into(), reason: "DDL changes the schema — é\n\u{1}".into() }
    }

    /// A statement's facts, its outcome, and its parameter count and sealed values.
    type Case<'a> = (StatementFacts<'a>, &'a str, Option<(usize, Option<Value>)>);

    fn statement_as_value(audit_id: &str, f: &StatementFacts<'_>, outcome: &str, params: Option<(usize, Option<Value>)>) -> Value {
        let decision = match f.decision {
            Some(d) => json!({"verdict": d.verdict.to_string(), "rule": d.rule, "reason": d.reason}),
            None => json!({"verdict": "unchecked", "rule": "policy-disabled", "reason": "the SQL policy is disabled"}),
        };
        let mut v = json!({
            "session": audit_id, "stmt": f.stmt, "protocol": f.protocol, "text": f.sql, "statement_name": f.name,
            "portal": f.portal, "decision": decision, "approval": f.approval, "outcome": outcome,
        });
        if let Some((count, sealed)) = params {
            v["param_count"] = Value::from(count);
            if let Some(s) = sealed {
                v["params"] = s;
            }
        }
        v
    }

    /// The log under an [`audit_stage`]: the writer is stopped and the directory
    /// removed when the test ends, passed or not.
    struct TestLog {
        writer: Handle,
        dir: std::path::PathBuf,
    }

    impl Drop for TestLog {
        fn drop(&mut self) {
            self.writer.stop(std::time::Duration::from_secs(5));
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// An audit stage (policy off) on a fresh log in a temporary directory.
    fn audit_stage(name: &str) -> (AuditStage, SharedTap, Session, TestLog) {
        let dir = std::env::temp_dir().join(format!("phigate-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let keys = crate::audit::crypto::PeriodKeys { dir: dir.join("keys") };
        let (log, _) = crate::audit::log::Log::open(&dir.join("log"), ed25519_dalek::SigningKey::from_bytes(&[6u8; 32]), keys, 1 << 20).expect("log opens");
        let writer = Handle::start(log, std::time::Duration::from_secs(10));
        let s = crate::session::stage::tests::session();
        let tap = Tap::new(writer.clone(), &s, 1 << 20, false);
        (AuditStage::new(tap.clone(), false), tap, s, TestLog { writer, dir })
    }

    #[test]
    fn each_pipelined_statements_answer_waits_for_its_own_record() {
        let (mut stage, tap, s, _log) = audit_stage("pipelined");
        let query = |sql: &str| Frame::build(tag::QUERY, format!("{sql}\0").as_bytes());
        assert!(matches!(stage.frontend(&s, &query("select 1")), Action::Forward));
        assert!(matches!(stage.frontend(&s, &query("select 2")), Action::Forward));
        assert!(stage.needs_whole(Direction::Backend, tag::DATA_ROW), "a large row must not stream past the durability check");
        {
            // The second statement's record became durable, the first one's failed
            // (e.g. its batch hit a full disk): the first one's rows must not go out.
            let mut t = tap.lock().expect("invariant: lock not poisoned");
            assert_eq!(t.durable.len(), 2, "one slot per statement");
            t.durable.clear();
            let (first, second) = (crate::session::durable::Slot::new(), crate::session::durable::Slot::new());
            first.completer().complete(Err("no space".into()));
            second.completer().complete(Ok(2));
            t.durable.extend([first, second]);
        }
        let answer = stage.backend(&s, &msg::row_description(&[]));
        assert!(matches!(answer, Action::Refuse(e) if e.message.contains("could not be written (no space)")));
        let call = Frame::build(tag::FUNCTION_CALL, &[0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(
            matches!(stage.frontend(&s, &call), Action::Refuse(e) if e.code == SqlState::FEATURE_NOT_SUPPORTED),
            "a fast-path call has no statement to record"
        );
    }

    #[test]
    fn a_parse_the_server_refused_leaves_the_recorded_text_as_it_was() {
        let (mut stage, tap, s, _log) = audit_stage("reparse");
        let parse = |name: &str, sql: &str| Frame::build(tag::PARSE, format!("{name}\0{sql}\0\0\0").as_bytes());
        let sync = Frame::build(tag::SYNC, b"");
        for f in [parse("s1", "select 1"), sync.clone()] {
            stage.frontend(&s, &f);
        }
        stage.backend(&s, &Frame::build(b'1', b""));
        stage.backend(&s, &msg::ready_for_query(b'I'));
        // The same name again: PostgreSQL refuses it (42P05) and keeps "select 1".
        for f in [parse("s1", "select 'decoy'"), sync] {
            stage.frontend(&s, &f);
        }
        stage.backend(&s, &Frame::build(tag::ERROR_RESPONSE, b"SERROR\0C42P05\0Mprepared statement \"s1\" already exists\0\0"));
        stage.backend(&s, &msg::ready_for_query(b'I'));
        let text = tap.lock().expect("invariant: lock not poisoned").prepared.get("s1").map(|p| p.0.to_string());
        assert_eq!(text.as_deref(), Some("select 1"), "executions of s1 are recorded with the text that runs");
    }

    #[test]
    fn statements_an_error_made_the_server_skip_end_with_their_batch() {
        let (mut stage, tap, s, _log) = audit_stage("skipped");
        let parse = Frame::build(tag::PARSE, b"\0select 1\0\0\0");
        let bind = Frame::build(tag::BIND, b"\0\0\0\0\0\0\0\0");
        let execute = Frame::build(tag::EXECUTE, b"\0\0\0\0\0");
        // Three statements in one batch; the first fails, the server skips the rest.
        for _ in 0..3 {
            for f in [&parse, &bind, &execute] {
                stage.frontend(&s, f);
            }
        }
        stage.frontend(&s, &Frame::build(tag::SYNC, b""));
        stage.frontend(&s, &Frame::build(tag::QUERY, b"select 2\0"));
        assert_eq!(tap.lock().expect("invariant: lock not poisoned").running.len(), 4);
        // Not about durability here: the answers pass.
        tap.lock().expect("invariant: lock not poisoned").durable.clear();
        stage.backend(&s, &Frame::build(tag::ERROR_RESPONSE, b"SERROR\0C22012\0Mdivision by zero\0\0"));
        stage.backend(&s, &msg::ready_for_query(b'I'));
        {
            let t = tap.lock().expect("invariant: lock not poisoned");
            assert_eq!(t.running.iter().map(|r| r.stmt).collect::<Vec<_>>(), vec![4], "the skipped two ended with their batch; the Query is next");
        }
    }

    #[test]
    fn an_error_in_a_batch_without_statements_ends_none_of_the_next() {
        let (mut stage, tap, s, _log) = audit_stage("errbatch");
        for f in [Frame::build(tag::PARSE, b"bad\0select nonsense\0\0\0"), Frame::build(tag::SYNC, b""), Frame::build(tag::QUERY, b"select 1\0")] {
            stage.frontend(&s, &f);
        }
        tap.lock().expect("invariant: lock not poisoned").durable.clear();
        stage.backend(&s, &Frame::build(tag::ERROR_RESPONSE, b"SERROR\0C42601\0Msyntax error\0\0"));
        stage.backend(&s, &msg::ready_for_query(b'I'));
        assert_eq!(tap.lock().expect("invariant: lock not poisoned").running.len(), 1, "the Query is still running");
        stage.backend(&s, &msg::row_description(&[]));
        stage.backend(&s, &msg::ready_for_query(b'I'));
        assert!(tap.lock().expect("invariant: lock not poisoned").running.is_empty());
    }

    #[test]
    fn an_execute_recorded_with_a_refused_parses_text_is_withheld() {
        let (mut stage, tap, s, _log) = audit_stage("refusedtext");
        let parse = |sql: &str| Frame::build(tag::PARSE, format!("s1\0{sql}\0\0\0").as_bytes());
        let sync = Frame::build(tag::SYNC, b"");
        for f in [parse("select 1"), sync.clone()] {
            stage.frontend(&s, &f);
        }
        stage.backend(&s, &Frame::build(b'1', b""));
        stage.backend(&s, &msg::ready_for_query(b'I'));
        // The client re-prepares s1 and executes it before the refusal arrives.
        for f in [parse("select 'decoy'"), sync.clone(), Frame::build(tag::BIND, b"p\0s1\0\0\0\0\0\0\0"), Frame::build(tag::EXECUTE, b"p\0\0\0\0\0"), sync] {
            stage.frontend(&s, &f);
        }
        tap.lock().expect("invariant: lock not poisoned").durable.clear();
        stage.backend(&s, &Frame::build(tag::ERROR_RESPONSE, b"SERROR\0C42P05\0Mprepared statement \"s1\" already exists\0\0"));
        stage.backend(&s, &msg::ready_for_query(b'I'));
        let answer = stage.backend(&s, &Frame::build(b'2', b""));
        assert!(matches!(answer, Action::Refuse(e) if e.message.contains("cannot be attributed")), "the record says 'decoy', the server ran 'select 1'");
    }

    #[test]
    fn an_execute_behind_a_late_refused_parse_is_withheld() {
        // Pipeline mode: the batch's error arrives before its re-Parse of s1 is sent
        // (the server skips it), and the next batch executes s1 before the
        // ReadyForQuery that undoes the re-Parse.
        let (mut stage, tap, s, _log) = audit_stage("lateparse");
        let parse = |name: &str, sql: &str| Frame::build(tag::PARSE, format!("{name}\0{sql}\0\0\0").as_bytes());
        stage.frontend(&s, &parse("bad", "select nonsense"));
        tap.lock().expect("invariant: lock not poisoned").durable.clear();
        stage.backend(&s, &Frame::build(tag::ERROR_RESPONSE, b"SERROR\0C42601\0Msyntax error\0\0"));
        for f in [
            parse("s1", "select 'decoy'"),
            Frame::build(tag::SYNC, b""),
            Frame::build(tag::BIND, b"p\0s1\0\0\0\0\0\0\0"),
            Frame::build(tag::EXECUTE, b"p\0\0\0\0\0"),
            Frame::build(tag::SYNC, b""),
        ] {
            stage.frontend(&s, &f);
        }
        tap.lock().expect("invariant: lock not poisoned").durable.clear();
        stage.backend(&s, &msg::ready_for_query(b'I'));
        let answer = stage.backend(&s, &Frame::build(b'2', b""));
        assert!(matches!(answer, Action::Refuse(e) if e.message.contains("cannot be attributed")));
    }

    #[test]
    fn statement_records_are_canonical() {
        let allow = decision(Verdict::Allow);
        let block = decision(Verdict::Block);
        let approval = json!({"outcome": "approved", "by": "dr \"who\"", "reason": "ok", "window_secs": null, "decided_at": 1, "id": 7});
        let sealed = json!({"alg": "xchacha20poly1305", "ct": "AAAA", "nonce": "BBBB", "period": "2026-12-07"});
        let sealed_text = canonical(&sealed);
        let sql = "select \"ssn\" from patients where note = 'tab\there\u{7f}' -- é";
        let cases: Vec<Case<'_>> = vec![
            (StatementFacts { stmt: 1, protocol: "simple", sql, name: None, portal: None, decision: None, approval: None }, "sent", None),
            (StatementFacts { stmt: 2, protocol: "simple", sql, name: None, portal: None, decision: Some(&block), approval: None }, "blocked", None),
            (
                StatementFacts { stmt: 3, protocol: "extended", sql, name: Some("s1"), portal: None, decision: Some(&allow), approval: Some(&approval) },
                "denied",
                None,
            ),
            (
                StatementFacts { stmt: u64::MAX, protocol: "extended", sql: "", name: Some(""), portal: Some("p\"1"), decision: Some(&allow), approval: None },
                "sent",
                Some((0, None)),
            ),
            (
                StatementFacts { stmt: 5, protocol: "extended", sql, name: Some("P0_1"), portal: Some(""), decision: None, approval: Some(&approval) },
                "sent",
                Some((3, Some(sealed.clone()))),
            ),
        ];
        for (facts, outcome, params) in cases {
            let direct = statement_record("s-1", &facts, outcome, params.as_ref().map(|(c, s)| (*c, s.as_ref().map(|_| sealed_text.as_str()))));
            assert_eq!(direct, canonical(&statement_as_value("s-1", &facts, outcome, params)), "statement {}", facts.stmt);
        }
    }

    #[test]
    fn statement_end_records_are_canonical() {
        let mut r = Running::new(9);
        r.rows = 2;
        r.bytes = 123;
        r.command = Some("SELECT 2".into());
        r.columns = Some(r#"[{"format":0,"name":"ssn \"x\"","type":25},{"format":1,"name":"n","type":23}]"#.into());
        for row in [&[0u8, 1, 2][..], &[3]] {
            assert!(r.delivered.add(row, 1 << 20));
        }
        let delivered_rows = vec!["AAEC", "Aw=="];
        r.truncated = true;
        let masking = json!({"cells": 2, "by_rule": {"ssn": 2}, "by_kind": {}});
        let error = json!({"code": "23505", "message": "duplicate key \"x\""});
        for (sealed, masking, error, raw_differs) in
            [(None, None, None, false), (Some(json!({"alg": "a", "ct": "c", "nonce": "n", "period": "p"})), Some(&masking), Some(&error), true)]
        {
            r.raw_differs = raw_differs;
            r.error = error.cloned();
            let sealed_text = sealed.as_ref().map(canonical);
            let direct = statement_end_record("s-2", &r, 42, masking, sealed_text.as_deref(), "dd", "rr");
            let columns: Value = serde_json::from_str(r.columns.as_deref().unwrap()).unwrap();
            let mut v = json!({
                "session": "s-2", "stmt": 9, "rows": 2, "bytes": 123, "duration_us": 42, "command": r.command, "error": r.error,
                "masking": masking, "result": {"columns": columns, "rows": delivered_rows, "truncated": true, "sha256": "dd"}, "raw_differs": raw_differs,
            });
            match sealed {
                Some(s) => v["raw"] = s,
                None => v["raw_sha256"] = Value::from("rr"),
            }
            assert_eq!(direct, canonical(&v));
        }
    }

    #[test]
    fn the_raw_result_is_every_row_as_the_database_sent_it() {
        let sha = |rows: &[&[u8]]| {
            let mut h = Sha256::new();
            rows.iter().for_each(|r| h.update(r));
            hex(&h.finalize())
        };
        let kept = |rows: &[&[u8]]| rows.iter().map(|r| format!("\"{}\"", b64(r))).collect::<Vec<_>>().join(",").into_bytes();
        // Nothing rewritten: one copy serves as both.
        let mut r = Running::new(1);
        r.delivered_row(b"a", 1 << 20, false);
        r.delivered_row(b"c", 1 << 20, false);
        assert!(!r.raw_differs);
        assert_eq!(r.result_hashes(), (sha(&[b"a", b"c"]), sha(&[b"a", b"c"])));
        // The second row rewritten: the raw result still has the first and third rows.
        let mut r = Running::new(2);
        r.delivered_row(b"a", 1 << 20, false);
        r.raw_row(b"SECRET", 1 << 20);
        r.delivered_row(b"******", 1 << 20, true);
        r.delivered_row(b"c", 1 << 20, false);
        assert!(r.raw_differs);
        assert_eq!(r.raw.kept, kept(&[b"a", b"SECRET", b"c"]));
        assert_eq!(r.delivered.kept, kept(&[b"a", b"******", b"c"]));
        assert_eq!(r.result_hashes(), (sha(&[b"a", b"******", b"c"]), sha(&[b"a", b"SECRET", b"c"])));
        // Over the limit: hashed, not kept, and the delivered result says truncated.
        let mut r = Running::new(3);
        r.delivered_row(b"aaaa", 6, false);
        r.raw_row(b"SECRET", 6);
        r.delivered_row(b"***", 6, true);
        assert!(r.truncated);
        assert_eq!(r.raw.kept, kept(&[b"aaaa"]));
        assert_eq!(r.result_hashes(), (sha(&[b"aaaa", b"***"]), sha(&[b"aaaa", b"SECRET"])));
    }

    #[test]
    fn bound_parameters_are_the_json_serde_would_write() {
        let values: [Option<&[u8]>; 5] = [Some(b"abc"), None, Some(b""), Some(&[0xff; 7]), Some(b"a")];
        let expected = json!(values.iter().map(|v| v.map(b64)).collect::<Vec<_>>()).to_string();
        assert_eq!(String::from_utf8(params_json(&values)).unwrap(), expected);
        assert_eq!(params_json(&[]), b"[]");
    }
}

//! PHI masking of what the database returns, as it streams: DataRows (text and
//! binary), COPY … TO STDOUT (text, CSV, binary), and the free text of notices,
//! errors and notifications.
//!
//! [`Masker`] is the per-session state machine: it watches the client's requests to
//! know which statement each result belongs to (simple and extended protocol,
//! statements described once and executed many times), builds a [`Plan`] per result
//! (one strategy per column) from the profile's rules, and rewrites each row with
//! correct lengths. Rules name columns as `schema.table.column` — resolved from the
//! RowDescription's table OID and attribute number through the [`catalog`], so an
//! alias or a view cannot dodge them — or by column-name pattern; columns computed
//! from masked columns inherit their rule through [`lineage`]. Text without a rule
//! goes through the Safe Harbor [`detect`]ors. A computed column whose lineage is
//! unknown (an opaque source, FETCH of a cursor or EXECUTE of a prepared statement
//! phigate did not see defined, text it cannot read) is not left to the detectors: it
//! gets the strongest rule of the relations the statement reads, else it is redacted.
//!
//! Fail closed: a row that cannot be read or masked is never forwarded; the result
//! ends with an ErrorResponse and the rest of it is dropped up to ReadyForQuery, so
//! the connection stays usable.
//!
//! Pure: frames in, frames out. Catalog lookups are requested ([`Step::Lookup`]) and
//! performed by the session; nothing here does I/O.
//!
//! # Layout
//! - [`detect`]: free-text identifier detectors
//! - [`strategy`]: redact / partial / hash / year / zip3 per column type and format
//! - [`lineage`]: which table columns an output is computed from
//! - [`catalog`]: OID → relation cache and its queries
//! - [`copy`]: COPY row formats

pub mod catalog;
pub mod copy;
pub mod detect;
pub mod lineage;
pub mod strategy;

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    fmt,
    sync::{Arc, Mutex, MutexGuard},
};

use bytes::{Bytes, BytesMut};

use crate::pg::{
    flow::{Answer, Definitions, Flow, Request},
    frame::Messages,
    msg::{self, tag, Field},
    Frame, PgError, SqlState,
};
use catalog::{Catalog, Lookup};
use copy::{CopyFormat, CopyKind};
use detect::{Counts, DetectCache, Detectors, Kind};
use lineage::{Effect, Named, Output, RelName, Sources, Statement};
use strategy::{CellType, Context, Outcome, Strategy, TypeClass};

/// What a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `schema.table.column` (schema optional: any schema).
    Column { schema: Option<String>, table: String, column: String },
    /// A result column whose name matches the pattern (`*` and `?`, any case).
    Name(String),
}

impl Target {
    fn matches_column(&self, rel: &RelName, column: &str) -> bool {
        match self {
            Target::Column { schema, table, column: c } => {
                c == column && table == &rel.name && (schema.is_none() || rel.schema.is_none() || schema == &rel.schema)
            }
            Target::Name(_) => false,
        }
    }

    fn matches_table(&self, rel: &RelName) -> bool {
        match self {
            Target::Column { schema, table, .. } => table == &rel.name && (schema.is_none() || rel.schema.is_none() || schema == &rel.schema),
            Target::Name(_) => false,
        }
    }
}

/// Case-insensitive glob with `*` and `?`.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.to_lowercase().chars().collect(), name.to_lowercase().chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[derive(Debug, Clone)]
pub struct Rule {
    /// Stable id in summaries and audit records.
    pub id: Arc<str>,
    pub target: Target,
    pub strategy: Strategy,
}

/// A masking profile: rules, detectors, and who it applies to.
pub struct Profile {
    pub name: String,
    pub identities: Vec<String>,
    pub groups: Vec<String>,
    pub rules: Vec<Rule>,
    pub detectors: Detectors,
    /// Run the detectors over text columns no rule covers.
    pub free_text: bool,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Profile({}, {} rules, {:?})", self.name, self.rules.len(), self.detectors)
    }
}

impl Profile {
    fn has_column_rules(&self) -> bool {
        self.rules.iter().any(|r| matches!(r.target, Target::Column { .. }))
    }
}

/// Masking as configured for the whole agent.
pub struct Settings {
    pub profiles: Vec<Arc<Profile>>,
    /// For identities no profile names.
    pub default_profile: Arc<Profile>,
    /// The HMAC key of `hash` pseudonyms (only the agent holds it).
    pub hmac_key: Arc<[u8]>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Settings({:?}, default {}, <key redacted>)", self.profiles, self.default_profile.name)
    }
}

impl Settings {
    /// The first profile naming the identity or one of its groups, else the default.
    pub fn profile_for(&self, identity: &str, groups: &[String]) -> Arc<Profile> {
        self.profiles
            .iter()
            .find(|p| p.identities.iter().any(|i| i == identity) || p.groups.iter().any(|g| groups.contains(g)))
            .cloned()
            .unwrap_or_else(|| self.default_profile.clone())
    }
}

/// One column of a result: how to mask it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnPlan {
    pub strategy: Strategy,
    /// The rule that chose the strategy; None for free-text detection or nothing.
    pub rule: Option<usize>,
    /// Why a column no rule chose is masked anyway (its cells are counted under
    /// [`Fallback::id`]).
    pub fallback: Option<Fallback>,
    pub ty: CellType,
}

/// Masking that no rule of the profile asked for, but that failing closed needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// A computed column whose sources phigate cannot trace got the profile's
    /// redaction.
    Untraceable,
    /// A binary value the detectors cannot read (a record, a tsvector, a type of the
    /// database's own layout) was sent as NULL.
    Unreadable,
}

impl Fallback {
    const ALL: [Fallback; 2] = [Fallback::Untraceable, Fallback::Unreadable];

    /// The id its cells are counted under, beside the profile's rule ids.
    pub fn id(self) -> &'static str {
        match self {
            Fallback::Untraceable => "phigate.untraceable-column",
            Fallback::Unreadable => "phigate.unreadable-binary",
        }
    }
}

/// How to mask the rows of one result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub columns: Vec<ColumnPlan>,
}

impl Plan {
    pub fn inspects(&self) -> bool {
        self.columns.iter().any(|c| c.strategy != Strategy::Keep)
    }
}

/// Masking counts of one statement, for logs and audit (never values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub rows: u64,
    pub cells_masked: u64,
    /// (rule id, cells) for rules that masked something.
    pub by_rule: Vec<(Arc<str>, u64)>,
    /// Identifiers the detectors replaced, by kind.
    pub by_kind: Counts,
}

/// What to do with a backend message.
#[derive(Debug)]
pub enum Step {
    Forward,
    /// Send these bytes instead (a rewritten message; empty: drop it).
    Replace(Messages),
    /// The catalog must answer this first; call `backend` again with the same frame.
    Lookup(Lookup),
    /// Describe this query (the columns of a COPY) on the catalog connection, then
    /// call `described` and `backend` again.
    Describe(String),
}

/// A prepared statement as the client's Parse defined it. Shared with the portals
/// bound to it and the Describes sent for it: its description reaches them even when
/// the client closes or reuses the name before the server answers.
#[derive(Debug)]
struct Stmt {
    name: String,
    sql: Arc<str>,
    fields: Mutex<Option<Vec<Field>>>,
    /// The server refused or skipped this statement's Parse: a portal bound to it
    /// (sent before phigate knew) runs whatever the name meant on the server.
    refused: std::sync::atomic::AtomicBool,
}

/// A portal as the client's Bind created it (shared with the Describes and Executes
/// sent for it, for the same reason).
#[derive(Debug)]
struct Portal {
    /// None: bound to a statement phigate never saw prepared.
    stmt: Option<Arc<Stmt>>,
    formats: Vec<i16>,
    /// Its own description (Describe P), with the result formats it really has.
    fields: Mutex<Option<Vec<Field>>>,
    plan: Mutex<Option<Arc<Plan>>>,
}

/// What a name meant before a Parse or Bind replaced it (see `Masker::definitions`).
enum Prior {
    Stmt(Option<Arc<Stmt>>),
    Portal(Option<Arc<Portal>>),
}

/// What a client request the server has yet to answer will need then, captured when
/// the client sent it, in the order sent: the server answers in that order, while
/// names may be rebound (`Bind ""` again, Close then Parse) before it does.
#[derive(Debug, Clone)]
enum Pending {
    /// Describe S (None: a statement phigate never saw prepared).
    Statement(Option<Arc<Stmt>>),
    /// Describe P (None: a portal phigate never saw bound).
    Portal(Option<Arc<Portal>>),
    /// Execute (None: a portal phigate never saw bound).
    Execute(Option<Arc<Portal>>),
    /// Sync, Query or a fast-path call: a ReadyForQuery ends everything up to here.
    Boundary,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("invariant: lock not poisoned")
}

struct CopyState {
    format: CopyFormat,
    plan: Arc<Plan>,
    first: bool,
}

/// Parsed lineage of recent statements (text → outputs of each statement).
const LINEAGE_CACHE: usize = 256;

/// Catalog lookups one plan may ask for: OIDs, then names (views found by name can
/// name more relations). A plan that still misses something after this many fails
/// closed rather than opening side connections forever.
const MAX_LOOKUPS: u32 = 8;

/// The cells of one row, `None` for NULL.
type Fields = Vec<Option<Vec<u8>>>;

/// The per-session masking state machine.
pub struct Masker {
    profile: Arc<Profile>,
    mac: strategy::Keyed,
    cache: DetectCache,
    current_year: i32,
    catalog: Arc<Mutex<Catalog>>,
    flow: Flow,
    /// Statements and portals by name, as the client last defined them.
    stmts: HashMap<String, Arc<Stmt>>,
    portals: HashMap<String, Arc<Portal>>,
    /// Parse and Bind definitions the server has not confirmed yet, with what each
    /// name meant before: one the server refused or skipped goes back.
    definitions: Definitions<(String, Prior)>,
    /// Describes and Executes (and the Syncs between them) still to be answered.
    pending: VecDeque<Pending>,
    /// The result of the simple query being streamed.
    current: Option<Arc<Plan>>,
    /// The plan of the Execute whose rows are streaming (the front of `pending`).
    executing: Option<Arc<Plan>>,
    copy: Option<CopyState>,
    /// COPY statements of the current simple Query already answered.
    copies_seen: usize,
    /// The answer (and what its request captured) computed for a frame that is
    /// waiting for a lookup.
    resume: Option<(Answer, Option<Pending>)>,
    /// Columns of a COPY query, described on the catalog connection.
    described: Option<Result<Vec<Field>, String>>,
    /// The catalog lookup for the waiting message failed.
    lookup_error: Option<String>,
    /// The plan being made: OIDs its lookups already asked for (the catalog
    /// connection may not see them, e.g. relations created in the session's open
    /// transaction), and how many lookups it made.
    asked_oids: Vec<u32>,
    lookups: u32,
    /// A masking failure: drop the rest of the result up to ReadyForQuery.
    failing: bool,
    /// DDL ran: drop the catalog at the next ReadyForQuery.
    ddl_seen: bool,
    /// The session's latest `SET search_path` (replayed before describing COPY).
    pub search_path: Option<String>,
    lineage: HashMap<Arc<str>, Arc<Vec<Statement>>>,
    /// Which statement of the simple query being answered comes next (one
    /// CommandComplete ends each), to match a RowDescription to its statement.
    statement_no: usize,
    /// The session's cursors and SQL-level prepared statements, as the DECLARE or
    /// PREPARE that the server accepted defined them (`bool`: survives the end of its
    /// transaction), so a FETCH or EXECUTE can be traced through their query.
    named: HashMap<Named, (bool, Arc<Statement>)>,
    /// Whether the text last looked at names DECLARE, PREPARE, CLOSE, … at all.
    keyword_scan: Option<(Arc<str>, bool)>,
    summary: Summary,
    rule_counts: Vec<u64>,
    finished: Vec<Summary>,
    out: BytesMut,
    scratch: Vec<u8>,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Masker({})", self.profile.name)
    }
}

fn fail(message: impl Into<String>) -> PgError {
    PgError::error(SqlState::INTERNAL_ERROR, format!("phigate: refused to return this result: {}", message.into()))
        .with_hint("Masking could not be applied, so nothing unmasked was sent. The session can go on; see the agent log.")
}

impl Masker {
    pub fn new(profile: Arc<Profile>, key: Arc<[u8]>, catalog: Arc<Mutex<Catalog>>, current_year: i32) -> Self {
        let n = profile.rules.len();
        Self {
            mac: strategy::keyed(&key),
            cache: profile.detectors.cache(),
            profile,
            current_year,
            catalog,
            flow: Flow::default(),
            stmts: HashMap::new(),
            portals: HashMap::new(),
            definitions: Definitions::default(),
            pending: VecDeque::new(),
            current: None,
            executing: None,
            copy: None,
            copies_seen: 0,
            resume: None,
            described: None,
            lookup_error: None,
            asked_oids: Vec::new(),
            lookups: 0,
            failing: false,
            ddl_seen: false,
            search_path: None,
            lineage: HashMap::new(),
            statement_no: 0,
            named: HashMap::new(),
            keyword_scan: None,
            summary: Summary::default(),
            rule_counts: vec![0; n + Fallback::ALL.len()],
            finished: Vec::new(),
            out: BytesMut::new(),
            scratch: Vec::new(),
        }
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Whether messages of this type must arrive whole.
    pub fn needs_whole(&self, t: u8) -> bool {
        matches!(t, tag::ROW_DESCRIPTION | tag::ERROR_RESPONSE | tag::NOTICE_RESPONSE | tag::NOTIFICATION | tag::COPY_OUT_RESPONSE | tag::PARAMETER_STATUS)
            || (t == tag::DATA_ROW && !self.profile_is_empty())
            || (t == tag::COPY_DATA && !self.profile_is_empty())
    }

    fn profile_is_empty(&self) -> bool {
        self.profile.rules.is_empty() && (self.profile.detectors.is_empty() || !self.profile.free_text)
    }

    /// Why masking cannot let this client message through, if it cannot. A fast-path
    /// function call (FunctionCall) is answered with a bare value and no description
    /// to place it by, so it cannot be masked: it is refused whenever masking has
    /// anything to do (the policy stage refuses it too, but may be switched off). The
    /// session goes on, as after the policy stage's refusal.
    pub fn refusal(&self, frame: &Frame) -> Option<PgError> {
        (frame.tag() == tag::FUNCTION_CALL && !self.profile_is_empty()).then(|| {
            PgError::error(
                SqlState::FEATURE_NOT_SUPPORTED,
                "phigate: refused a fast-path function call: masking applies to this session, and a fast-path result cannot be masked",
            )
            .with_hint("Call the function with SQL instead (SELECT f(...)).")
        })
    }

    /// Summaries of statements that finished since the last call.
    pub fn take_finished(&mut self) -> Vec<Summary> {
        std::mem::take(&mut self.finished)
    }

    /// A client message that was forwarded to the database.
    pub fn frontend(&mut self, frame: &Frame) {
        let Ok(req) = msg::request_of(frame) else { return };
        let in_copy = self.flow.copy_in();
        self.flow.frontend(req.clone());
        if in_copy {
            // COPY FROM STDIN input: the server answers none of it on its own.
            return;
        }
        match req {
            Request::Query(sql) => {
                self.note_statement(sql);
                if may_name_cursors_or_statements(sql) {
                    self.forget_protocol_names(sql);
                }
                self.copies_seen = 0;
                self.pending.push_back(Pending::Boundary);
                self.definitions.batch_end();
            }
            Request::Sync | Request::FunctionCall => {
                self.pending.push_back(Pending::Boundary);
                self.definitions.batch_end();
            }
            Request::Describe { portal: false, name } => self.pending.push_back(Pending::Statement(self.stmts.get(name).cloned())),
            Request::Describe { portal: true, name } => self.pending.push_back(Pending::Portal(self.portals.get(name).cloned())),
            Request::Execute { portal } => {
                let p = self.portals.get(portal).cloned();
                if let Some(sql) = p.as_ref().and_then(|p| p.stmt.as_ref()).map(|s| s.sql.clone()) {
                    if self.may_define(&sql) {
                        self.forget_protocol_names(&sql);
                    }
                }
                self.pending.push_back(Pending::Execute(p));
            }
            _ => {}
        }
        match frame.tag() {
            tag::PARSE => {
                if let Ok((name, sql)) = msg::parse_parse(frame.body()) {
                    self.note_statement(sql);
                    // SQL PREPARE and the protocol's Parse share one namespace (as
                    // DECLARE and Bind do for portals): whatever the name meant to an
                    // EXECUTE or FETCH before is gone.
                    self.named.remove(&Named::Prepared(name.to_string()));
                    let prior = self.stmts.get(name).cloned();
                    self.definitions.sent((name.to_string(), Prior::Stmt(prior)));
                    self.stmts.insert(
                        name.to_string(),
                        Arc::new(Stmt { name: name.to_string(), sql: Arc::from(sql), fields: Mutex::new(None), refused: Default::default() }),
                    );
                }
            }
            tag::BIND => {
                if let Ok((portal, stmt, formats)) = msg::parse_bind(frame.body()) {
                    self.named.remove(&Named::Cursor(portal.to_string()));
                    let prior = self.portals.get(portal).cloned();
                    self.definitions.sent((portal.to_string(), Prior::Portal(prior)));
                    let stmt = self.stmts.get(stmt).cloned();
                    self.portals.insert(portal.to_string(), Arc::new(Portal { stmt, formats, fields: Mutex::new(None), plan: Mutex::new(None) }));
                }
            }
            tag::CLOSE => {
                if let Ok((kind, name)) = msg::parse_target(frame.body(), "Close") {
                    if kind == b'S' {
                        self.stmts.remove(name);
                        self.named.remove(&Named::Prepared(name.to_string()));
                    } else {
                        self.portals.remove(name);
                        self.named.remove(&Named::Cursor(name.to_string()));
                    }
                }
            }
            _ => {}
        }
    }

    /// DDL invalidates the catalog; SET search_path is remembered for COPY describes.
    fn note_statement(&mut self, sql: &str) {
        let lower = sql.to_ascii_lowercase();
        if lower.contains("search_path") {
            if let Ok(parsed) = crate::sql::parse(sql) {
                for raw in &parsed.stmts {
                    if let Some(pg_query::NodeEnum::VariableSetStmt(v)) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) {
                        if v.name.eq_ignore_ascii_case("search_path") && !v.is_local {
                            let text = raw.stmt.as_ref().and_then(|s| s.node.as_ref()).and_then(|n| n.deparse(pg_query::DeparseOptions::default()).ok());
                            self.search_path = text;
                        }
                    }
                }
            }
        }
        if let Ok(a) = crate::policy::cache::analyze(sql).0 {
            use crate::policy::analyze::Kind as K;
            if a.statements.iter().any(|f| f.kinds.iter().any(|k| matches!(k, K::Create | K::Alter | K::Drop))) {
                self.ddl_seen = true;
            }
        }
    }

    /// SQL's PREPARE / DEALLOCATE and DECLARE / CLOSE / DISCARD act on the names the
    /// protocol's Parse and Bind define (one namespace each): a statement or portal
    /// of that name is no longer the one phigate saw described. Forgotten when the
    /// SQL is sent, ahead of any Bind or Execute pipelined behind it; should the SQL
    /// fail, the name's rows are refused, never masked with a stale plan. Callers
    /// check [`may_name_cursors_or_statements`] first.
    fn forget_protocol_names(&mut self, sql: &str) {
        for st in self.statements(sql).iter() {
            match &st.effect {
                Some(Effect::Define { name, .. } | Effect::Forget(name)) => match name {
                    Named::Prepared(n) => drop(self.stmts.remove(n)),
                    Named::Cursor(n) => drop(self.portals.remove(n)),
                },
                Some(Effect::ForgetAll { cursors, prepared }) => {
                    if *cursors {
                        self.portals.clear();
                    }
                    if *prepared {
                        self.stmts.clear();
                    }
                }
                None => {}
            }
        }
    }

    /// The columns of a COPY query, from the catalog connection.
    pub fn described(&mut self, result: Result<Vec<Field>, String>) {
        self.described = Some(result);
    }

    /// The catalog lookup the waiting message needed failed: its result fails closed.
    pub fn lookup_failed(&mut self, why: String) {
        self.lookup_error = Some(why);
    }

    /// A message from the database.
    pub fn backend(&mut self, frame: &Frame) -> Step {
        let t = frame.tag();
        if t == tag::READY_FOR_QUERY {
            self.flow.backend(t);
            let undone = self.definitions.answered(t, &Answer::Ready, 0);
            self.undo(undone);
            self.settle(&Answer::Ready);
            self.statement_no = 0;
            // Idle: any transaction is over, and its cursors without HOLD with it.
            if frame.body().first() == Some(&b'I') {
                self.named.retain(|n, (hold, _)| *hold || !matches!(n, Named::Cursor(_)));
            }
            self.failing = false;
            self.current = None;
            self.copy = None;
            self.resume = None;
            self.end_lookups();
            if std::mem::take(&mut self.ddl_seen) {
                self.catalog.lock().expect("invariant: lock not poisoned").clear();
            }
            return Step::Forward;
        }
        let (answer, owner) = match self.resume.take() {
            Some(a) => a,
            None => {
                let a = self.flow.backend(t);
                let ignored_syncs = self.flow.take_ignored_syncs();
                self.drop_ignored_syncs(ignored_syncs);
                let undone = self.definitions.answered(t, &a, ignored_syncs);
                self.undo(undone);
                let owner = self.settle(&a);
                (a, owner)
            }
        };
        if t == tag::COMMAND_COMPLETE {
            // Even in a result being dropped: the server did run the statement, and a
            // CLOSE or DEALLOCATE missed would leave a stale definition behind.
            self.statement_done(&answer, owner.as_ref());
        }
        if self.failing && !matches!(t, tag::NOTICE_RESPONSE | tag::PARAMETER_STATUS) {
            return Step::Replace(Messages::new());
        }
        let stepped = match self.lookup_error.take() {
            Some(why) => Err(fail(format!("phigate could not read the database catalog to find the masking rules: {why}"))),
            None => self.step(frame, &answer, owner.as_ref()),
        };
        match stepped {
            Ok(s) => {
                if matches!(s, Step::Lookup(_) | Step::Describe(_)) {
                    self.resume = Some((answer, owner));
                }
                s
            }
            Err(e) => {
                tracing::warn!(error = %crate::pg::error::log_safe(&e.message), "masking failed; the result is withheld");
                self.failing = true;
                self.finish_statement();
                Step::Replace(smallvec::smallvec![e.to_frame().into_bytes()])
            }
        }
    }

    /// Syncs the server ignored inside a COPY FROM STDIN (sent behind the COPY before
    /// it began, as libpq does) close no batch: drop their boundaries, which follow
    /// the COPY's own entry at the front.
    fn drop_ignored_syncs(&mut self, ignored: u64) {
        for _ in 0..ignored {
            if let Some(i) = self.pending.iter().skip(1).position(|p| matches!(p, Pending::Boundary)) {
                self.pending.remove(i + 1);
            }
        }
    }

    /// Undo the Parse and Bind messages the server did not carry out (newest first):
    /// their names mean what they meant before, and what was bound to a refused
    /// statement meanwhile is marked so that its rows fail closed.
    fn undo(&mut self, undone: Vec<(String, Prior)>) {
        for (name, prior) in undone {
            match prior {
                Prior::Stmt(prior) => {
                    if let Some(refused) = self.stmts.get(&name) {
                        refused.refused.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    match prior {
                        Some(s) => drop(self.stmts.insert(name, s)),
                        None => drop(self.stmts.remove(&name)),
                    }
                }
                Prior::Portal(Some(p)) => drop(self.portals.insert(name, p)),
                Prior::Portal(None) => drop(self.portals.remove(&name)),
            }
        }
    }

    /// Match a backend message's answer to the front of `pending`: the request it
    /// answers, as captured when it was sent (for descriptions and rows), and drop
    /// what the answer completes.
    fn settle(&mut self, answer: &Answer) -> Option<Pending> {
        match answer {
            Answer::StatementDescription(_) | Answer::PortalDescription(_) => match self.pending.front() {
                Some(Pending::Statement(_) | Pending::Portal(_)) => self.pending.pop_front(),
                _ => None,
            },
            // Rows after the first use the plan the first one made.
            Answer::Execute(_) if self.executing.is_some() => None,
            Answer::Execute(_) => match self.pending.front() {
                Some(p @ Pending::Execute(_)) => Some(p.clone()),
                _ => None,
            },
            Answer::ExecuteDone(_) => {
                self.executing = None;
                if matches!(self.pending.front(), Some(Pending::Execute(_))) {
                    // Its portal's statement says what the completed statement defined.
                    return self.pending.pop_front();
                }
                None
            }
            Answer::ExtendedError => {
                // The server skips the rest of the batch up to its Sync.
                self.executing = None;
                while self.pending.front().is_some_and(|p| !matches!(p, Pending::Boundary)) {
                    self.pending.pop_front();
                }
                None
            }
            Answer::Ready => {
                self.executing = None;
                while let Some(p) = self.pending.pop_front() {
                    if matches!(p, Pending::Boundary) {
                        break;
                    }
                }
                None
            }
            _ => None,
        }
    }

    /// `owner`: what the request this message answers captured when it was sent.
    fn step(&mut self, frame: &Frame, answer: &Answer, owner: Option<&Pending>) -> Result<Step, PgError> {
        let t = frame.tag();
        match t {
            tag::ROW_DESCRIPTION => {
                let fields = msg::parse_row_description(frame.body()).map_err(|e| fail(format!("the database sent an unreadable row description: {e}")))?;
                match answer {
                    Answer::Simple(sql) => {
                        let sql = sql.clone();
                        match self.plan_for(&fields, None, Some(&sql), self.statement_no)? {
                            Ok(plan) => self.current = Some(Arc::new(plan)),
                            Err(lookup) => return Ok(Step::Lookup(lookup)),
                        }
                    }
                    // Unknown statements and portals stay undescribed: their rows fail closed.
                    Answer::StatementDescription(_) => match owner {
                        Some(Pending::Statement(Some(s))) => *lock(&s.fields) = Some(fields),
                        Some(Pending::Statement(None)) => {}
                        _ => return Err(fail("a statement description phigate cannot match to a Describe")),
                    },
                    Answer::PortalDescription(_) => match owner {
                        Some(Pending::Portal(Some(p))) => {
                            *lock(&p.fields) = Some(fields);
                            *lock(&p.plan) = None;
                        }
                        Some(Pending::Portal(None)) => {}
                        _ => return Err(fail("a portal description phigate cannot match to a Describe")),
                    },
                    _ => return Err(fail("a row description nobody asked for")),
                }
                Ok(Step::Forward)
            }
            tag::DATA_ROW => {
                let plan = match answer {
                    Answer::Simple(_) => self.current.clone(),
                    // The rows of one Execute share its plan: made once, at the first row.
                    Answer::Execute(_) => match &self.executing {
                        Some(plan) => Some(plan.clone()),
                        None => match self.portal_plan(owner)? {
                            Ok(plan) => {
                                self.executing = Some(plan.clone());
                                Some(plan)
                            }
                            Err(lookup) => return Ok(Step::Lookup(lookup)),
                        },
                    },
                    _ => None,
                };
                let plan = plan.ok_or_else(|| fail("rows arrived without a description phigate could match them to"))?;
                self.summary.rows += 1;
                self.mask_row(frame, &plan)
            }
            tag::COMMAND_COMPLETE | b'I' | b's' => {
                if matches!(answer, Answer::Simple(_)) {
                    self.current = None;
                }
                self.executing = None;
                self.copy = None;
                self.finish_statement();
                Ok(Step::Forward)
            }
            tag::COPY_OUT_RESPONSE => self.start_copy(frame, answer, owner),
            tag::COPY_DATA => match &self.copy {
                Some(_) => self.mask_copy(frame),
                None => Ok(Step::Forward), // COPY FROM STDIN echo does not exist; nothing to do
            },
            tag::COPY_DONE => {
                self.copy = None;
                Ok(Step::Forward)
            }
            tag::ERROR_RESPONSE | tag::NOTICE_RESPONSE => {
                if t == tag::ERROR_RESPONSE {
                    self.finish_statement();
                }
                Ok(self.mask_fields(frame))
            }
            tag::NOTIFICATION => Ok(self.mask_notification(frame)),
            tag::PARAMETER_STATUS => Ok(self.mask_parameter_status(frame)),
            // The answer to a fast-path call that got past `refusal` (a stage that
            // did not ask): a bare value, nothing to place it by.
            tag::FUNCTION_CALL_RESPONSE if !self.profile_is_empty() => Err(fail(
                "phigate refuses fast-path function calls while masking applies, since their results cannot be masked; call the function with SQL instead",
            )),
            _ => Ok(Step::Forward),
        }
    }

    fn finish_statement(&mut self) {
        let mut s = std::mem::take(&mut self.summary);
        if s.rows == 0 && s.cells_masked == 0 && s.by_kind.is_empty() {
            return;
        }
        let rules = self.profile.rules.len();
        for (i, n) in self.rule_counts.iter_mut().enumerate() {
            if *n > 0 {
                let id = match i.checked_sub(rules) {
                    None => self.profile.rules[i].id.clone(),
                    Some(f) => Arc::from(Fallback::ALL[f].id()),
                };
                s.by_rule.push((id, *n));
                *n = 0;
            }
        }
        self.finished.push(s);
    }

    /// The plan of the portal an Execute ran, as bound when the Execute was sent.
    fn portal_plan(&mut self, owner: Option<&Pending>) -> Result<Result<Arc<Plan>, Lookup>, PgError> {
        let p = match owner {
            Some(Pending::Execute(Some(p))) => p.clone(),
            Some(Pending::Execute(None)) => return Err(fail("rows of a portal phigate did not see bound")),
            _ => return Err(fail("rows phigate cannot match to an Execute")),
        };
        if let Some(plan) = lock(&p.plan).clone() {
            return Ok(Ok(plan));
        }
        // The portal's own description (Describe P) has its real formats; else the
        // statement's description with the formats the Bind asked for.
        if p.stmt.as_ref().is_some_and(|s| s.refused.load(std::sync::atomic::Ordering::Relaxed)) {
            return Err(fail(
                "rows of a portal bound to a statement the server refused to prepare (its name kept an earlier statement phigate cannot be sure of)",
            ));
        }
        let described = lock(&p.fields).clone();
        let (fields, formats) = match described {
            Some(f) => (f, None),
            None => {
                let stmt = p.stmt.as_ref().ok_or_else(|| fail("rows of a portal bound to a statement phigate did not see prepared"))?;
                let fields = lock(&stmt.fields).clone();
                let fields = fields.ok_or_else(|| fail(format!("rows of statement \"{}\", whose columns phigate never saw described", stmt.name)))?;
                (fields, Some(p.formats.clone()))
            }
        };
        let sql = p.stmt.as_ref().map(|s| s.sql.clone());
        // A Parse holds one statement.
        match self.plan_for(&fields, formats.as_deref(), sql.as_deref(), 0)? {
            Ok(plan) => {
                let plan = Arc::new(plan);
                *lock(&p.plan) = Some(plan.clone());
                Ok(Ok(plan))
            }
            Err(l) => Ok(Err(l)),
        }
    }

    /// A statement the server completed: remember or forget the cursors and prepared
    /// statements it defined or dropped.
    fn statement_done(&mut self, answer: &Answer, owner: Option<&Pending>) {
        let (sql, index) = match (answer, owner) {
            (Answer::Simple(sql), _) => {
                let i = self.statement_no;
                self.statement_no += 1;
                (sql.clone(), i)
            }
            (Answer::ExecuteDone(_), Some(Pending::Execute(Some(p)))) => match &p.stmt {
                Some(s) => (s.sql.clone(), 0),
                None => return,
            },
            _ => return,
        };
        if !self.may_define(&sql) {
            return;
        }
        let all = self.statements(&sql);
        match all.get(index).and_then(|s| s.effect.as_ref()) {
            Some(Effect::Define { name, hold, query }) => {
                self.named.insert(name.clone(), (*hold, Arc::new((**query).clone())));
            }
            Some(Effect::Forget(name)) => {
                self.named.remove(name);
            }
            Some(Effect::ForgetAll { cursors, prepared }) => {
                self.named.retain(|n, _| match n {
                    Named::Cursor(_) => !cursors,
                    Named::Prepared(_) => !prepared,
                });
            }
            None => {}
        }
    }

    /// [`may_name_cursors_or_statements`], kept for the text last looked at: every
    /// statement of one Query string, and every Execute of one prepared statement
    /// (when it is sent and when it completes), share that text, so it is scanned
    /// once, not at each.
    fn may_define(&mut self, sql: &Arc<str>) -> bool {
        match &self.keyword_scan {
            Some((text, found)) if Arc::ptr_eq(text, sql) => *found,
            _ => {
                let found = may_name_cursors_or_statements(sql);
                self.keyword_scan = Some((sql.clone(), found));
                found
            }
        }
    }

    fn statements(&mut self, sql: &str) -> Arc<Vec<Statement>> {
        if let Some(o) = self.lineage.get(sql) {
            return o.clone();
        }
        // Unreadable text: no statements, so its computed columns count as untraced.
        let parsed = Arc::new(lineage::statements(sql).unwrap_or_default());
        if self.lineage.len() >= LINEAGE_CACHE {
            self.lineage.clear();
        }
        self.lineage.insert(Arc::from(sql), parsed.clone());
        parsed
    }

    /// A plan for these columns; `formats` overrides the fields' own format codes
    /// (Bind's codes: none = text, one = all, else per column). `Err(lookup)` when the
    /// catalog must be asked first.
    /// `index`: which statement of `sql` the result belongs to.
    fn plan_for(&mut self, fields: &[Field], formats: Option<&[i16]>, sql: Option<&str>, index: usize) -> Result<Result<Plan, Lookup>, PgError> {
        let planned = self.plan_columns(fields, formats, sql, index);
        if !matches!(planned, Ok(Err(_))) {
            // Settled (a plan or a refusal): the next plan starts its own lookups.
            self.end_lookups();
        }
        planned
    }

    fn end_lookups(&mut self) {
        self.asked_oids.clear();
        self.lookups = 0;
    }

    /// Ask the catalog, unless this plan has asked too often already.
    fn ask(&mut self, lookup: Lookup) -> Result<Result<Plan, Lookup>, PgError> {
        if self.lookups >= MAX_LOOKUPS {
            return Err(fail(format!("the masking rules were still not found after {MAX_LOOKUPS} catalog lookups")));
        }
        self.lookups += 1;
        if let Lookup::Oids(oids) = &lookup {
            self.asked_oids.extend_from_slice(oids);
        }
        Ok(Err(lookup))
    }

    /// What the statement of a result says about its columns: its own lineage, or for
    /// FETCH and EXECUTE the lineage of the cursor's or prepared statement's query
    /// (`true`: through a name, whose definition the server may have replaced in ways
    /// phigate did not see, e.g. a cursor opened by a function). None: untraceable.
    fn statement_for(&mut self, sql: Option<&str>, index: usize) -> Option<(Statement, bool)> {
        let all = self.statements(sql?);
        let st = all.get(index)?;
        match &st.uses {
            None => Some((st.clone(), false)),
            Some(n) => self.named.get(n).map(|(_, q)| ((**q).clone(), true)),
        }
    }

    fn plan_columns(&mut self, fields: &[Field], formats: Option<&[i16]>, sql: Option<&str>, index: usize) -> Result<Result<Plan, Lookup>, PgError> {
        let format_of = |i: usize, f: &Field| -> Result<i16, PgError> {
            match formats {
                None => Ok(f.format),
                Some([]) => Ok(0),
                Some([one]) => Ok(*one),
                Some(list) => list.get(i).copied().ok_or_else(|| fail("the Bind gave fewer result formats than there are columns")),
            }
        };
        let column_rules = self.profile.has_column_rules();
        // A clone of the handle, so the statement's lineage (`&mut self`) can be read
        // while the catalog is locked.
        let shared = self.catalog.clone();
        let mut catalog = shared.lock().expect("invariant: lock not poisoned");
        let mut statement: Option<(Statement, bool)> = None;
        if column_rules {
            // Each OID is asked for at most twice per plan (the catalog is shared, and
            // another session's DDL may clear it between a lookup and its use): one
            // the catalog connection cannot see stays unknown, and its columns are
            // refused below.
            let mut missing = catalog.missing_oids(fields.iter().map(|f| f.table_oid));
            missing.retain(|o| self.asked_oids.iter().filter(|a| *a == o).count() < 2);
            if !missing.is_empty() {
                return self.ask(Lookup::Oids(missing));
            }
            // Which casts run a function of the database's own (in the statement or a
            // view's definition): one lookup for every session, until DDL or the TTL.
            if catalog.casts_missing() {
                return self.ask(Lookup::Casts);
            }
            // A relation the catalog connection cannot see even after a lookup
            // (created in the session's open transaction). Tables without rules get
            // name patterns and detectors, but only because the catalog shows that
            // they are tables without rules; this one could as well be a view over
            // masked columns or a table a rule names, so nothing can be decided.
            if let Some(f) = fields.iter().find(|f| f.table_oid != 0 && catalog.relation(f.table_oid).is_none()) {
                return Err(fail(format!(
                    "column \"{}\" comes from a relation (OID {}) phigate cannot see in the database catalog, such as one created in this session's open transaction, so its masking rules are unknown; commit the DDL first",
                    f.name, f.table_oid
                )));
            }
            // Columns the catalog cannot place (computed, or a whole-row reference with
            // attribute number 0) are traced through the statement's text.
            let unplaced = fields.iter().any(|f| f.column >= 0 && catalog.relation(f.table_oid).is_none_or(|r| r.column(f.column).is_none()));
            if unplaced {
                statement = self.statement_for(sql, index);
            }
            // Names that may be views (their columns trace to base tables).
            let mut names: Vec<String> = Vec::new();
            for f in fields {
                if let Some(rel) = catalog.relation(f.table_oid) {
                    if let Some(view) = &rel.view {
                        for o in view {
                            source_names(&o.sources, &mut names);
                        }
                    }
                }
            }
            if let Some((st, _)) = &statement {
                for o in st.outputs.iter().flatten() {
                    source_names(&o.sources, &mut names);
                }
                names.extend(st.reads.iter().map(|r| r.name.clone()));
            }
            let missing = catalog.missing_names(names.iter().map(String::as_str));
            if !missing.is_empty() {
                return self.ask(Lookup::Names(missing));
            }
        }
        // A type created in the database (an enum, citext, a composite, an array of
        // one …) sent in binary: only the catalog tells whether that is its text or
        // a layout of its own, which a strategy must not write text into.
        let binary: Vec<bool> = fields.iter().enumerate().map(|(i, f)| format_of(i, f).map(|fmt| fmt == 1)).collect::<Result<_, _>>()?;
        // In text format too: a token or a hash is a valid value of citext, but not of
        // an enum, a record or a range.
        let missing = catalog.missing_types(fields.iter().map(|f| f.type_oid));
        if !missing.is_empty() {
            return self.ask(Lookup::Types(missing));
        }
        let mut columns = Vec::with_capacity(fields.len());
        for (i, f) in fields.iter().enumerate() {
            let binary = binary[i];
            // A type with an assigned OID is what the catalog says: text (citext), an
            // enum's label (read by the detectors, NULL under other rules), or else
            // a form of its own — opaque in binary (a row, an array, a range …: NULL
            // is its only safe mask), and in text readable by the detectors only.
            let form = (f.type_oid >= catalog::FIRST_ASSIGNED_OID).then(|| catalog.binary_form(f.type_oid));
            let (class, opaque) = match form {
                None => (TypeClass::of(f.type_oid), false),
                Some(Some(catalog::BinaryForm::Text)) => (TypeClass::Text, false),
                Some(Some(catalog::BinaryForm::Label)) => (TypeClass::Structured, false),
                Some(_) => (TypeClass::Other, binary),
            };
            let ty = CellType { class, binary };
            let mut best: Option<usize> = None;
            let mut untraced = false;
            // The table column itself (not a value computed from it, nor a view's).
            let mut direct: Option<(RelName, String)> = None;
            let mut computed = false;
            let consider = |idx: usize, best: &mut Option<usize>| {
                if best.is_none_or(|b| self.profile.rules[idx].strategy.strength() > self.profile.rules[b].strategy.strength()) {
                    *best = Some(idx);
                }
            };
            if column_rules {
                let rel = catalog.relation(f.table_oid);
                let mut trace = Trace::default();
                match (&rel, rel.as_ref().and_then(|r| r.column(f.column))) {
                    (Some(rel), Some(col)) => {
                        direct = Some((rel.name.clone(), col.name.clone()));
                        // A sequence holds what setval() was given (a computed SSN).
                        if rel.kind == catalog::RelKind::Sequence {
                            trace.opaque = true;
                        }
                        self.rules_for_column(&catalog, &rel.name, &col.name, 0, &mut trace);
                        // A view's attribute n is its n-th output (attnum ≥ 1 here).
                        let pos = usize::try_from(f.column).ok().and_then(|c| c.checked_sub(1));
                        if let Some(o) = rel.view.as_ref().zip(pos).and_then(|(v, p)| v.get(p)) {
                            self.rules_for_sources(&catalog, &o.sources, 0, &mut trace);
                        }
                    }
                    // System columns (ctid, xmin, tableoid: negative attribute numbers)
                    // hold no table data; no table rule applies to them.
                    (Some(_), None) if f.column < 0 => {}
                    (Some(rel), None) => {
                        // A column of a known relation the catalog does not list: a
                        // whole-row reference (`SELECT p FROM patients p`, `RETURNING
                        // patients`; PostgreSQL reports attribute number 0) or a column
                        // newer than the cache. The value may hold any column of the
                        // relation, so every rule of the relation (and of what a view
                        // reads) applies, the strongest winning.
                        let whole = Sources { whole_rows: [rel.name.clone()].into(), ..Sources::default() };
                        self.rules_for_sources(&catalog, &whole, 0, &mut trace);
                        for o in rel.view.iter().flatten() {
                            self.rules_for_sources(&catalog, &o.sources, 0, &mut trace);
                        }
                    }
                    (None, _) => {}
                }
                let mut reads = std::mem::take(&mut trace.reads);
                if rel.as_ref().is_none_or(|r| r.column(f.column).is_none()) {
                    let sources = statement
                        .as_ref()
                        .and_then(|(st, via_name)| column_sources(st.outputs.as_deref()?, fields, i, *via_name))
                        .map(|s| column_notation(&catalog, s));
                    if let Some(src) = &sources {
                        self.rules_for_sources(&catalog, src, 0, &mut trace);
                    }
                    // A computed column phigate cannot trace (an opaque source, or no
                    // lineage at all: FETCH of a cursor it did not see declared, CALL,
                    // text it cannot read) is not left to the detectors.
                    trace.opaque |= f.table_oid == 0 && sources.is_none();
                    if let Some((st, _)) = statement.as_ref().filter(|(st, _)| st.outputs.is_some()) {
                        reads.extend(st.reads.iter().cloned());
                    }
                }
                computed = trace.computed;
                for idx in trace.rules {
                    consider(idx, &mut best);
                }
                // Untraceable (a function of the database's own, here or in a view's
                // definition, …): the column gets the strongest rule of the relations
                // the statement (or the view) reads, or, when those have none or
                // cannot be known, the profile's redaction.
                untraced = trace.opaque;
                // What cannot be traced is redacted even where the strongest rule
                // around it is hash or partial (`lateral substr(v.who, g, 1)` would
                // hand out the pseudonym of each letter).
                computed |= untraced;
                if untraced {
                    let read = Sources { whole_rows: reads, ..Sources::default() };
                    let mut around = Trace::default();
                    self.rules_for_sources(&catalog, &read, 0, &mut around);
                    for idx in around.rules {
                        if self.profile.rules[idx].strategy.strength() > Strategy::Detect.strength() {
                            consider(idx, &mut best);
                        }
                    }
                }
            }
            // Name patterns are for what column rules cannot place (computed columns,
            // tables without rules): a column rule that applies always wins.
            if best.is_none() {
                for (idx, r) in self.profile.rules.iter().enumerate() {
                    if let Target::Name(p) = &r.target {
                        if glob_matches(p, &f.name) {
                            consider(idx, &mut best);
                        }
                    }
                }
            }
            let detecting = self.profile.free_text && !self.profile.detectors.is_empty();
            let mut fallback = None;
            let (strategy, rule) = match best {
                Some(idx) if !untraced || self.profile.rules[idx].strategy.strength() > Strategy::Detect.strength() => {
                    (self.profile.rules[idx].strategy.clone(), Some(idx))
                }
                _ if untraced => {
                    fallback = Some(Fallback::Untraceable);
                    (self.redaction(), None)
                }
                None if detecting && ty.scannable() => (Strategy::Detect, None),
                // A binary value of a type that can hold text (an array, a record,
                // bytea): the detectors cannot read it, so it is not sent as it is.
                // NULL is a valid value of every type.
                None if detecting && ty.binary && ty.class == TypeClass::Other && (opaque || strategy::may_hold_text(f.type_oid)) => {
                    fallback = Some(Fallback::Unreadable);
                    (Strategy::Redact { token: String::new(), null: true }, None)
                }
                _ => (Strategy::Keep, None),
            };
            // A value computed from a column gets no partial, year, zip3 or hash: each
            // can be made to show what it hides (pieces of an SSN padded to length,
            // digits turned into punctuation, 2000 + MMDD as a "year", the pseudonym
            // of each letter). It is redacted instead. And `year` reads a number as an
            // age only on the column its rule names (not through a view's column).
            let strategy = match strategy {
                Strategy::Partial { .. } | Strategy::Zip3 | Strategy::Year { .. } | Strategy::Hash { .. } if computed => self.redaction(),
                Strategy::Year { ages: true }
                    if !rule.is_some_and(|r| direct.as_ref().is_some_and(|(rel, col)| self.profile.rules[r].target.matches_column(rel, col))) =>
                {
                    Strategy::Year { ages: false }
                }
                other => other,
            };
            columns.push(ColumnPlan { strategy, rule, fallback, ty });
        }
        Ok(Ok(Plan { columns }))
    }

    /// How an untraceable column is redacted: as the profile's first `redact` rule
    /// does, else with the default token (NULL where a token is no valid value).
    fn redaction(&self) -> Strategy {
        self.profile
            .rules
            .iter()
            .find(|r| matches!(r.strategy, Strategy::Redact { .. }))
            .map(|r| r.strategy.clone())
            .unwrap_or_else(|| Strategy::Redact { token: "[REDACTED]".into(), null: false })
    }

    /// Rules for a table column, and (if the relation is a view) for what it is built from.
    fn rules_for_column(&self, catalog: &Catalog, rel: &RelName, column: &str, depth: u32, trace: &mut Trace) {
        trace.rules.extend(self.profile.rules.iter().enumerate().filter(|(_, r)| r.target.matches_column(rel, column)).map(|(i, _)| i));
        // An anyarray column holds values of whichever table column its row names
        // (pg_statistic's samples behind pg_stats' most_common_vals and
        // histogram_bounds), and so do a pg_mcv_list (extended statistics' most
        // common values) and pg_statistic_ext_data's `stxdexpr` (pg_statistic rows
        // of expressions): no rule of their own can place them. Nor the name of a
        // replication origin, which is whatever its creator chose.
        let catalog_text = matches!((rel.name.as_str(), column), ("pg_statistic_ext_data", "stxdexpr") | ("pg_replication_origin", "roname"))
            && rel.schema.as_deref().is_none_or(|s| s == "pg_catalog");
        if catalog_text || catalog.has_column_of_type(rel, column, &[ANYARRAY, PG_MCV_LIST]) {
            trace.opaque = true;
            trace.reads.insert(rel.clone());
        }
        for v in catalog.views_named(rel) {
            if let Some(view) = &v.view {
                for o in view.iter().filter(|o| o.name == column) {
                    self.rules_for_view_output(catalog, &o.sources, depth, trace);
                }
            }
        }
    }

    /// Rules for a value computed from `s`; what cannot be traced (an opaque source, a
    /// cast running a function of the database's own, views nested too deep) marks
    /// the trace opaque, with the relations read beside it.
    fn rules_for_sources(&self, catalog: &Catalog, s: &Sources, depth: u32, trace: &mut Trace) {
        trace.computed |= s.computed;
        if s.opaque || own_cast_applies(catalog, s) {
            trace.opaque = true;
            trace.reads.extend(s.columns.iter().map(|(r, _)| r.clone()));
            trace.reads.extend(s.whole_rows.iter().cloned());
        }
        // The columns of one reference that lineage could not tell apart (a name
        // several relations may have): when some that exist carry rules and others
        // none, the values may be the ruleless one's — text the workload chose — and
        // must get no pseudonym (or other output) of the rule.
        let (mut ruled, mut ruleless) = (false, false);
        for (rel, col) in &s.columns {
            let before = trace.rules.len();
            self.rules_for_column(catalog, rel, col, depth, trace);
            if trace.rules.len() > before {
                ruled = true;
            } else if catalog.named(rel).iter().any(|r| r.columns.iter().any(|c| c.name == *col)) {
                ruleless = true;
            }
        }
        trace.computed |= ruled && ruleless;
        for rel in &s.whole_rows {
            trace.rules.extend(self.profile.rules.iter().enumerate().filter(|(_, r)| r.target.matches_table(rel)).map(|(i, _)| i));
            for v in catalog.views_named(rel) {
                for o in v.view.iter().flatten() {
                    self.rules_for_view_output(catalog, &o.sources, depth, trace);
                }
            }
        }
    }

    /// One level down into a view's definition; views nested deeper than phigate
    /// follows are untraceable.
    fn rules_for_view_output(&self, catalog: &Catalog, s: &Sources, depth: u32, trace: &mut Trace) {
        if depth < MAX_VIEW_DEPTH {
            self.rules_for_sources(catalog, s, depth + 1, trace);
        } else {
            trace.opaque = true;
        }
    }

    /// Mask one non-NULL value, appending the masked form (if any) to `out`.
    fn mask_value(&mut self, col: &ColumnPlan, value: &[u8], out: &mut Vec<u8>) -> Result<Outcome, PgError> {
        let ctx = Context { mac: &self.mac, detectors: &self.profile.detectors, current_year: self.current_year };
        let m = strategy::apply_into(&col.strategy, &ctx, &mut self.cache, col.ty, value, &mut self.summary.by_kind, out).map_err(|e| fail(e.to_string()))?;
        if m != Outcome::Same {
            self.summary.cells_masked += 1;
            if let Some(r) = col.rule {
                self.rule_counts[r] += 1;
            } else if let Some(f) = col.fallback {
                self.rule_counts[self.profile.rules.len() + f as usize] += 1;
            }
        }
        Ok(m)
    }

    fn mask_row(&mut self, frame: &Frame, plan: &Plan) -> Result<Step, PgError> {
        if !plan.inspects() {
            return Ok(Step::Forward);
        }
        let body = frame.body();
        let bad = |e: crate::pg::FrameError| fail(format!("the database sent an unreadable row: {e}"));
        let mut cells = msg::Cells::new(body).map_err(bad)?;
        if cells.count() != plan.columns.len() {
            return Err(fail(format!("a row has {} values for {} described columns", cells.count(), plan.columns.len())));
        }
        // The row is rebuilt in the scratch buffer: each cell's length, then its value
        // as it came or as the strategy appended it.
        let mut out = std::mem::take(&mut self.scratch);
        msg::begin_data_row(&mut out, cells.count());
        let mut changed = false;
        let result = (|| {
            for col in &plan.columns {
                let cell = cells.next_cell().map_err(bad)?.ok_or_else(|| fail("a row ended early"))?;
                let Some(v) = cell else {
                    out.extend_from_slice(&(-1i32).to_be_bytes());
                    continue;
                };
                let at = out.len();
                out.extend_from_slice(&[0, 0, 0, 0]);
                let outcome = if col.strategy == Strategy::Keep { Outcome::Same } else { self.mask_value(col, v, &mut out)? };
                match outcome {
                    Outcome::Same => {
                        out[at..at + 4].copy_from_slice(&(v.len() as i32).to_be_bytes());
                        out.extend_from_slice(v);
                    }
                    Outcome::Null => {
                        changed = true;
                        out[at..at + 4].copy_from_slice(&(-1i32).to_be_bytes());
                    }
                    Outcome::Written => {
                        changed = true;
                        let len = out.len() - at - 4;
                        out[at..at + 4].copy_from_slice(&(len as i32).to_be_bytes());
                    }
                }
            }
            cells.next_cell().map_err(bad)?;
            Ok(())
        })();
        let step = match result {
            Ok(()) if changed => {
                msg::finish_data_row(&mut out);
                Ok(Step::Replace(smallvec::smallvec![self.freeze(&out)]))
            }
            Ok(()) => Ok(Step::Forward),
            Err(e) => Err(e),
        };
        self.scratch = out;
        step
    }

    /// Copy into the session's output arena: one allocation per many rows.
    fn freeze(&mut self, bytes: &[u8]) -> Bytes {
        if self.out.capacity() - self.out.len() < bytes.len() {
            self.out.reserve(bytes.len().max(64 * 1024));
        }
        self.out.extend_from_slice(bytes);
        self.out.split().freeze()
    }

    fn start_copy(&mut self, frame: &Frame, answer: &Answer, owner: Option<&Pending>) -> Result<Step, PgError> {
        let sql = match (answer, owner) {
            (Answer::Simple(sql), _) => sql.clone(),
            (Answer::Execute(_), Some(Pending::Execute(p))) => {
                p.as_ref().and_then(|p| p.stmt.as_ref()).map(|s| s.sql.clone()).ok_or_else(|| fail("COPY of a portal phigate did not see bound"))?
            }
            _ => return Err(fail("a COPY nobody asked for")),
        };
        let (overall, formats) = msg::parse_copy_response(frame.body()).map_err(|e| fail(format!("unreadable CopyOutResponse: {e}")))?;
        let parsed = crate::sql::parse(&sql).map_err(|e| fail(format!("cannot read the COPY statement: {e}")))?;
        let copies: Vec<&pg_query::protobuf::CopyStmt> = parsed
            .stmts
            .iter()
            .filter_map(|r| match r.stmt.as_ref().and_then(|s| s.node.as_ref()) {
                // Only COPY … TO STDOUT answers with CopyOutResponse; a COPY to a
                // server file or program sends none, and counting it would match
                // this response to the wrong statement.
                Some(pg_query::NodeEnum::CopyStmt(c)) if !c.is_from && !c.is_program && c.filename.is_empty() => Some(c.as_ref()),
                _ => None,
            })
            .collect();
        let stmt = *copies.get(self.copies_seen).ok_or_else(|| fail("a COPY result phigate cannot match to a COPY statement"))?;
        let format = CopyFormat::of(stmt);
        let select = copy_query(stmt).ok_or_else(|| fail("cannot tell which columns the COPY returns"))?;
        if self.profile_is_empty() {
            self.copies_seen += 1;
            self.copy = None;
            return Ok(Step::Forward);
        }
        let fields = match self.described.take() {
            None => return Ok(Step::Describe(select)),
            Some(Err(e)) => return Err(fail(format!("cannot describe the COPY's columns: {e}"))),
            Some(Ok(f)) => f,
        };
        if fields.len() != formats.len() {
            return Err(fail(format!("the COPY returns {} columns, its description {}", formats.len(), fields.len())));
        }
        let binary = overall == 1;
        let formats: Vec<i16> = vec![i16::from(binary); fields.len()];
        match self.plan_for(&fields, Some(&formats), Some(&select), 0)? {
            Ok(plan) => {
                self.copies_seen += 1;
                let format = if binary { CopyFormat { kind: CopyKind::Binary, ..format } } else { format };
                self.copy = Some(CopyState { format, plan: Arc::new(plan), first: true });
                Ok(Step::Forward)
            }
            Err(lookup) => {
                // Keep the description for the retry after the lookup.
                self.described = Some(Ok(fields));
                Ok(Step::Lookup(lookup))
            }
        }
    }

    fn mask_fields_of(&mut self, plan: &Plan, fields: Fields) -> Result<(Fields, bool), PgError> {
        if fields.len() != plan.columns.len() {
            return Err(fail(format!("a COPY row has {} fields for {} columns", fields.len(), plan.columns.len())));
        }
        let mut changed = false;
        let mut out = Vec::with_capacity(fields.len());
        for (f, col) in fields.into_iter().zip(&plan.columns) {
            match f {
                None => out.push(None),
                Some(v) if col.strategy == Strategy::Keep => out.push(Some(v)),
                Some(v) => {
                    let mut masked = Vec::new();
                    match self.mask_value(col, &v, &mut masked)? {
                        Outcome::Same => out.push(Some(v)),
                        Outcome::Null => {
                            changed = true;
                            out.push(None)
                        }
                        Outcome::Written => {
                            changed = true;
                            out.push(Some(masked))
                        }
                    }
                }
            }
        }
        Ok((out, changed))
    }

    fn mask_copy(&mut self, frame: &Frame) -> Result<Step, PgError> {
        let state = self.copy.take().expect("invariant: called with a COPY in progress");
        let result = self.mask_copy_with(&state, frame);
        self.copy = Some(CopyState { first: false, ..state });
        result
    }

    fn mask_copy_with(&mut self, state: &CopyState, frame: &Frame) -> Result<Step, PgError> {
        let data = frame.body();
        let plan = state.plan.clone();
        if !plan.inspects() {
            return Ok(Step::Forward);
        }
        let bad = |e: copy::CopyError| fail(e.to_string());
        let mut body = Vec::with_capacity(data.len() + 16);
        let changed = match state.format.kind {
            CopyKind::Text | CopyKind::Csv if state.first && state.format.header => false,
            CopyKind::Text => {
                let fields = copy::split_text(data, &state.format).map_err(bad)?;
                self.summary.rows += 1;
                let (fields, changed) = self.mask_fields_of(&plan, fields)?;
                copy::join_text(&fields, &state.format, &mut body);
                changed
            }
            CopyKind::Csv => {
                let fields = copy::split_csv(data, &state.format).map_err(bad)?;
                self.summary.rows += 1;
                let (fields, changed) = self.mask_fields_of(&plan, fields)?;
                copy::join_csv(&fields, &state.format, &mut body);
                changed
            }
            CopyKind::Binary => {
                let (header, tuples, trailer) = copy::split_binary(data, state.first).map_err(bad)?;
                body.extend_from_slice(header);
                let mut changed = false;
                for t in tuples {
                    self.summary.rows += 1;
                    let owned: Vec<Option<Vec<u8>>> = t.into_iter().map(|c| c.map(<[u8]>::to_vec)).collect();
                    let (fields, c) = self.mask_fields_of(&plan, owned)?;
                    changed |= c;
                    copy::join_binary_tuple(&fields, &mut body);
                }
                if trailer {
                    body.extend_from_slice(&(-1i16).to_be_bytes());
                }
                changed
            }
        };
        if !changed {
            return Ok(Step::Forward);
        }
        let f = Frame::build(tag::COPY_DATA, &body);
        Ok(Step::Replace(smallvec::smallvec![f.into_bytes()]))
    }

    /// Notices and errors: detectors over the free-text fields, and the values a
    /// constraint violation quotes (`Key (ssn)=(…)`) hidden when their table has
    /// masked columns. With column rules, also the values any table's rows show in
    /// `Failing row contains (…)` and that data exceptions (SQLSTATE class 22: `invalid
    /// input syntax for type integer: "Jane Doe"`) quote: those can come from masked
    /// columns of any table (`SELECT name::int FROM patients`), and only detectors
    /// would see them otherwise.
    fn mask_fields(&mut self, frame: &Frame) -> Step {
        let body = frame.body();
        let mut fields: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut rest = body;
        while let Some((&code, tail)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
            fields.push((code, tail[..end].to_vec()));
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
        let column_rules = self.profile.has_column_rules();
        let sqlstate = fields.iter().find(|(c, _)| *c == b'C').map(|(_, v)| v.clone()).unwrap_or_default();
        // libxml's complaint quotes the offending line of the input, unquoted.
        let xml_error = sqlstate.len() == 5 && sqlstate.starts_with(b"2200") && matches!(sqlstate[4], b'L' | b'M' | b'N' | b'S' | b'T');
        // Data exceptions, program limits (`chr()` of a number too large), and
        // undefined objects named by a value (`::regoper`, `::regtype` of a name)
        // echo the value they were given.
        let echoes_input = sqlstate.starts_with(b"22") || sqlstate.starts_with(b"54") || sqlstate == b"42883" || sqlstate == b"42704";
        // RAISE in a function: its message, detail and hint are the function's own
        // text, built from whatever it read.
        let raised = fields.iter().any(|(c, v)| *c == b'W' && v.windows(8).any(|w| w == b"at RAISE"));
        // Quoted names that are not values: the objects the error itself names, and
        // relations and columns the catalog knows.
        let named: Vec<Vec<u8>> = fields.iter().filter(|(c, _)| matches!(c, b's' | b't' | b'c' | b'd' | b'n')).map(|(_, v)| v.clone()).collect();
        let mut changed = false;
        let mut counts = Counts::new();
        for (code, value) in fields.iter_mut() {
            if !matches!(*code, b'M' | b'D' | b'H' | b'W' | b'q' | b'd') {
                continue;
            }
            // With column rules, values the server echoes are hidden whatever the
            // table or column (an index on an expression, a partition, the other
            // table of a foreign key, a copy in a table without rules), and so is any
            // quoted text that is not a name the error or the catalog knows: many
            // errors quote a value they were given (`relation "garcia"`, a tsquery,
            // a setting name), not only data exceptions.
            if column_rules {
                // Each step rewrites what the previous ones left.
                let mut hidden = false;
                let mut apply = |value: &mut Vec<u8>, new: Option<Vec<u8>>| {
                    if let Some(new) = new {
                        *value = new;
                        hidden = true;
                    }
                };
                if raised && matches!(*code, b'M' | b'D' | b'H') {
                    apply(value, Some(b"masked by phigate (text of a function, which may hold what it read)".to_vec()));
                } else {
                    for hide in [hide_key_values, hide_failing_row, hide_json_context] {
                        let new = hide(value);
                        apply(value, new);
                    }
                    if echoes_input && matches!(*code, b'M' | b'D') {
                        let new = hide_echoed_input(value);
                        apply(value, new);
                    }
                    if xml_error && *code == b'D' {
                        let first = value.split(|b| *b == b'\n').next().unwrap_or_default();
                        let new = [first, b"\n(the input is masked by phigate)"].concat();
                        apply(value, Some(new));
                    }
                    if matches!(*code, b'M' | b'D' | b'W' | b'q') {
                        let catalog = self.catalog.lock().expect("invariant: lock not poisoned");
                        let known = |q: &[u8]| named.iter().any(|n| n == q) || std::str::from_utf8(q).is_ok_and(|q| catalog.knows_identifier(q));
                        let new = hide_quoted(value, known);
                        apply(value, new);
                    }
                }
                if hidden {
                    changed = true;
                    self.summary.cells_masked += 1;
                }
            }
            if let Some(v) = self.profile.detectors.scan_with(&mut self.cache, value, &mut counts) {
                *value = v;
                changed = true;
            }
        }
        for (k, n) in counts {
            *self.summary.by_kind.entry(k).or_insert(0) += n;
        }
        if !changed {
            return Step::Forward;
        }
        let mut out = Vec::with_capacity(body.len());
        for (code, value) in fields {
            out.push(code);
            out.extend(value.into_iter().filter(|b| *b != 0));
            out.push(0);
        }
        out.push(0);
        Step::Replace(smallvec::smallvec![Frame::build(frame.tag(), &out).into_bytes()])
    }

    fn mask_notification(&mut self, frame: &Frame) -> Step {
        let body = frame.body();
        if body.len() < 4 {
            return Step::Forward;
        }
        let mut rest = &body[4..];
        let Ok(channel) = crate::pg::frame::take_cstr(&mut rest, "NotificationResponse") else { return Step::Forward };
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        let payload = &rest[..end];
        let mut counts = Counts::new();
        // With column rules, a payload is hidden: a trigger or function may send what
        // it read, and the detectors do not see a bare name.
        let new = if self.profile.has_column_rules() && !payload.is_empty() {
            self.summary.cells_masked += 1;
            b"masked by phigate".to_vec()
        } else {
            let Some(new) = self.profile.detectors.scan_with(&mut self.cache, payload, &mut counts) else { return Step::Forward };
            new
        };
        for (k, n) in counts {
            *self.summary.by_kind.entry(k).or_insert(0) += n;
        }
        let mut out = body[..4].to_vec();
        out.extend_from_slice(channel.as_bytes());
        out.push(0);
        out.extend_from_slice(&new);
        out.push(0);
        Step::Replace(smallvec::smallvec![Frame::build(tag::NOTIFICATION, &out).into_bytes()])
    }

    /// application_name is the one free-text setting the server reports by default:
    /// `set_config('application_name', name, false)` would report a value it read.
    /// With column rules a change of it is reported hidden.
    fn mask_parameter_status(&mut self, frame: &Frame) -> Step {
        let mut rest = frame.body();
        if !self.profile.has_column_rules() || !matches!(crate::pg::frame::take_cstr(&mut rest, "ParameterStatus"), Ok("application_name")) {
            return Step::Forward;
        }
        Step::Replace(smallvec::smallvec![msg::parameter_status("application_name", "masked by phigate").into_bytes()])
    }
}

/// `Key (a, b)=(x, y) …` (unique, foreign key, exclusion) and `Partition key of the
/// failing row contains (a) = (x)` with the values hidden.
fn hide_key_values(text: &[u8]) -> Option<Vec<u8>> {
    let s = String::from_utf8_lossy(text);
    let (k, sep) = [("Key (", ")=("), ("contains (", ") = (")].into_iter().find_map(|(open, sep)| s.find(open).map(|k| (k + open.len(), sep)))?;
    let start = k + s[k..].find(sep)? + sep.len();
    let end = s.rfind(')').filter(|e| *e >= start)?;
    Some(format!("{}masked by phigate{}", &s[..start], &s[end..]).into_bytes())
}

/// A JSON error's context quotes the input up to the bad token: `JSON data, line 1: …`.
fn hide_json_context(text: &[u8]) -> Option<Vec<u8>> {
    let s = String::from_utf8_lossy(text);
    let k = s.find("JSON data, line ")?;
    let colon = k + s[k..].find(": ")? + 2;
    Some(format!("{}masked by phigate", &s[..colon]).into_bytes())
}

/// Errors about a value echo it unquoted, too: `date out of range: 10001936-06-09`,
/// `requested character too large for encoding: 710571746`, `index 710571746 out of
/// valid range, 0..7`, `operator does not exist: Garcia` (a value cast to regoper).
/// In such errors (data exceptions, and an undefined object or function named by a
/// value) what follows the first `: ` is hidden unless it is quoted (quoted values
/// are [`hide_quoted`]'s), and so is every run of three or more digits.
fn hide_echoed_input(text: &[u8]) -> Option<Vec<u8>> {
    let s = String::from_utf8_lossy(text);
    let kept = match s.find(": ") {
        Some(k) if !s[k + 2..].starts_with('"') => format!("{}masked by phigate", &s[..k + 2]),
        _ => s.into_owned(),
    };
    let out = crate::pg::error::hide_long_numbers(&kept);
    (out.as_bytes() != text).then(|| out.into_bytes())
}

/// `Failing row contains (…)` with the row's values hidden.
fn hide_failing_row(text: &[u8]) -> Option<Vec<u8>> {
    let s = String::from_utf8_lossy(text);
    let k = s.find("Failing row contains (")?;
    let start = k + "Failing row contains (".len();
    let end = s.rfind(')').filter(|e| *e >= start)?;
    Some(format!("{}masked by phigate{}", &s[..start], &s[end..]).into_bytes())
}

/// The text with each double-quoted value hidden (`"masked by phigate"`); quoted
/// names `known` says are identifiers stay. PostgreSQL does not escape quotes inside
/// a quoted value, so an unknown one is hidden up to the last quote of the text.
fn hide_quoted(text: &[u8], known: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    const HIDDEN: &[u8] = b"masked by phigate";
    let last = text.iter().rposition(|b| *b == b'"')?;
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0;
    let mut changed = false;
    while let Some(open) = text[at..].iter().position(|b| *b == b'"').map(|p| at + p) {
        let Some(close) = text[open + 1..].iter().position(|b| *b == b'"').map(|p| open + 1 + p) else { break };
        let quoted = &text[open + 1..close];
        out.extend_from_slice(&text[at..=open]);
        if known(quoted) || quoted == HIDDEN {
            out.extend_from_slice(&text[open + 1..=close]);
            at = close + 1;
        } else {
            out.extend_from_slice(HIDDEN);
            out.push(b'"');
            at = last + 1;
            changed = true;
        }
    }
    out.extend_from_slice(&text[at..]);
    changed.then_some(out)
}

/// The sources of result column `i` among a statement's outputs. By position when
/// the outputs line up with the fields one to one (no `*`): a name can be shared by a
/// decoy (`SELECT p.name COLLATE "C", 0 AS name`). Else by name, else all outputs
/// together. Through a cursor's or prepared statement's name, only by position and
/// only when the names agree too; None otherwise (untraceable).
fn column_sources(outs: &[Output], fields: &[Field], i: usize, via_name: bool) -> Option<Sources> {
    let lined_up = outs.len() == fields.len() && outs.iter().all(|o| !o.star);
    if via_name {
        let agree = lined_up && outs.iter().zip(fields).all(|(o, f)| o.name == f.name || o.name == "?column?");
        return agree.then(|| outs[i].sources.clone());
    }
    if lined_up {
        return Some(outs[i].sources.clone());
    }
    // Outputs before the first `*` and after the last one line up by position.
    let first_star = outs.iter().position(|o| o.star).unwrap_or(outs.len());
    let after_last = outs.len() - outs.iter().rposition(|o| o.star).map_or(outs.len(), |p| p + 1);
    if i < first_star && i < fields.len() {
        return Some(outs[i].sources.clone());
    }
    if fields.len() - i <= after_last {
        return Some(outs[outs.len() - (fields.len() - i)].sources.clone());
    }
    let f = &fields[i];
    // A `*` may stand for a column of the same name: its sources count too.
    let named: Vec<&Output> = outs.iter().filter(|o| !o.star && o.name == f.name).collect();
    let from: Vec<&Output> = if named.is_empty() { outs.iter().collect() } else { named.into_iter().chain(outs.iter().filter(|o| o.star)).collect() };
    let mut s = Sources::default();
    for o in from {
        s.extend(&o.sources);
    }
    Some(s)
}

/// Whether a value computed from `s` may have gone through a cast the database's
/// owners made with a function of their own ([`catalog::UserCast`]; all casts are
/// suspect until the catalog has been asked).
///
/// A written cast (`x::t`, `t(x)`) to a cast's target is one when its source is a
/// built-in type (any value may be one) or the value shows signs of the source type.
/// An unwritten (implicit or assignment) one applies only where a value of its
/// source type meets something expecting its target type, so signs of either
/// (created in the database) make it one; between two built-in types it may apply
/// anywhere. Signs of a type created in the database: a column of it or of its
/// array, a cast to it, a whole row (a table's row type), an opaque part.
fn own_cast_applies(catalog: &Catalog, s: &Sources) -> bool {
    let Some(casts) = catalog.own_casts() else { return true };
    if casts.is_empty() {
        return false;
    }
    let column_types: Vec<u32> = s
        .columns
        .iter()
        .flat_map(|(rel, col)| catalog.named(rel).into_iter().flat_map(|r| r.columns.iter().filter(|c| c.name == *col).map(|c| c.type_oid).collect::<Vec<_>>()))
        .collect();
    let written = |t: &RelName| s.casts.iter().any(|w| w.name == t.name && w.schema.as_ref().is_none_or(|ws| t.schema.as_ref() == Some(ws)));
    let built_in = |t: &catalog::TypeRef| t.oid < catalog::FIRST_ASSIGNED_OID;
    let signs_of = |t: &catalog::TypeRef| {
        !built_in(t) && (s.opaque || !s.whole_rows.is_empty() || column_types.iter().any(|c| *c == t.oid || *c == t.array) || written(&t.name))
    };
    casts.iter().any(|c| {
        (written(&c.target.name) && (built_in(&c.source) || signs_of(&c.source)))
            || (c.implicit && (signs_of(&c.source) || signs_of(&c.target) || (built_in(&c.source) && built_in(&c.target))))
    })
}

/// PostgreSQL's `anyarray` pseudo-type, which only the statistics catalogs store.
const ANYARRAY: u32 = 2277;
/// `pg_mcv_list`: extended statistics' most common values.
const PG_MCV_LIST: u32 = 5017;

/// Whether SQL text may define or drop cursors or prepared statements (DECLARE,
/// PREPARE, CLOSE, DEALLOCATE, DISCARD): most statements do not, and need no parse for
/// it (a keyword in a string literal only costs one).
fn may_name_cursors_or_statements(sql: &str) -> bool {
    const KEYWORDS: [&[u8]; 5] = [b"declare", b"prepare", b"close", b"deallocate", b"discard"];
    KEYWORDS.iter().any(|k| sql.as_bytes().windows(k.len()).any(|w| w.eq_ignore_ascii_case(k)))
}

/// How deep views over views are followed.
const MAX_VIEW_DEPTH: u32 = 8;

/// What the rules for a value's sources found.
#[derive(Default)]
struct Trace {
    rules: Vec<usize>,
    /// Part of the value is computed by something phigate cannot see through.
    opaque: bool,
    /// The relations read beside what is opaque.
    reads: BTreeSet<RelName>,
    /// Part of the value is computed from a column with rules (see
    /// [`Sources::computed`]).
    computed: bool,
}

/// `p.f` where `p`'s table has no column `f` is PostgreSQL's column notation for the
/// call `f(p)`: a function of the whole row that may return anything, so opaque.
/// A table the catalog does not know is judged the same way.
fn column_notation(catalog: &Catalog, mut s: Sources) -> Sources {
    for (rel, col) in std::mem::take(&mut s.qualified) {
        let candidates = catalog.named(&rel);
        if candidates.is_empty() || candidates.iter().any(|r| !r.columns.iter().any(|c| c.name == col)) {
            s.whole_rows.insert(rel);
            s.opaque = true;
        }
    }
    s
}

fn source_names(s: &Sources, out: &mut Vec<String>) {
    out.extend(s.columns.iter().map(|(r, _)| r.name.clone()));
    out.extend(s.whole_rows.iter().map(|r| r.name.clone()));
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The query whose columns a `COPY … TO` returns.
fn copy_query(stmt: &pg_query::protobuf::CopyStmt) -> Option<String> {
    if let Some(q) = stmt.query.as_deref().and_then(|q| q.node.as_ref()) {
        return q.deparse(pg_query::DeparseOptions::default()).ok();
    }
    let rel = stmt.relation.as_ref()?;
    let table = if rel.schemaname.is_empty() { quote_ident(&rel.relname) } else { format!("{}.{}", quote_ident(&rel.schemaname), quote_ident(&rel.relname)) };
    let cols: Vec<String> = stmt
        .attlist
        .iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(pg_query::NodeEnum::String(s)) => Some(quote_ident(&s.sval)),
            _ => None,
        })
        .collect();
    let cols = if cols.is_empty() { "*".to_string() } else { cols.join(", ") };
    Some(format!("SELECT {cols} FROM {table}"))
}

/// The detector kind names for logs and audit.
pub fn kind_counts(c: &Counts) -> Vec<(&'static str, u64)> {
    c.iter().map(|(k, n)| (Kind::name(*k), *n)).collect()
}

#[cfg(test)]
mod tests;

//! The masking stage: puts [`crate::mask::Masker`] in the session's pipeline and does
//! the I/O it asks for — catalog lookups and COPY describes on a short-lived side
//! connection the agent opens to the same database, as the session's role, with the
//! agent's credentials. While a lookup runs, the database message waiting for it is
//! held (nothing after it is read); a lookup that fails makes the result fail closed.
//!
//! Masking counts (never values) are logged per statement.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tracing::info;

use super::{
    audit::SharedTap,
    read_frame,
    stage::{Action, Direction, Stage},
    upstream, Session,
};
use crate::config::Credential;
use crate::{
    mask::{
        catalog::{self, Catalog, Lookup},
        Masker, Step,
    },
    net::tls::UpstreamTls,
    pg::{
        error::parse_error_fields,
        msg::{self, tag, Field},
        Frame,
    },
};

/// A lookup or describe that takes longer than this fails the result closed.
const SIDE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the database for catalog questions.
#[derive(Clone)]
pub struct CatalogAccess {
    pub upstream: SocketAddr,
    pub tls: UpstreamTls,
    pub credential: Credential,
    pub dbname: String,
    /// The session's startup `options` (a `-c search_path=…` must apply here too).
    pub options: Option<String>,
}

/// What a finished side request left for the stage.
#[derive(Default)]
struct Slot {
    described: Option<Result<Vec<Field>, String>>,
    failed: Option<String>,
}

/// The slot, and whether anything is in it: the stage looks at the flag on every
/// message and takes the lock only when a side request has left something.
#[derive(Default)]
struct Side {
    filled: AtomicBool,
    slot: Mutex<Slot>,
}

impl Side {
    fn put(&self, f: impl FnOnce(&mut Slot)) {
        f(&mut self.slot.lock().expect("invariant: lock not poisoned"));
        self.filled.store(true, Ordering::Release);
    }

    fn take(&self) -> (Option<Result<Vec<Field>, String>>, Option<String>) {
        if !self.filled.swap(false, Ordering::Acquire) {
            return (None, None);
        }
        let mut s = self.slot.lock().expect("invariant: lock not poisoned");
        (s.described.take(), s.failed.take())
    }
}

pub struct MaskStage {
    masker: Masker,
    access: CatalogAccess,
    catalog: Arc<Mutex<Catalog>>,
    slot: Arc<Side>,
    session_id: u32,
    /// The audit hears each raw row before it is rewritten, and the summaries.
    audit: Option<SharedTap>,
}

impl MaskStage {
    pub fn new(masker: Masker, access: CatalogAccess, catalog: Arc<Mutex<Catalog>>, session_id: u32, audit: Option<SharedTap>) -> Self {
        Self { masker, access, catalog, slot: Arc::new(Side::default()), session_id, audit }
    }

    fn log_finished(&mut self) {
        for s in self.masker.take_finished() {
            if s.cells_masked == 0 && s.by_kind.is_empty() {
                continue;
            }
            if let Some(tap) = &self.audit {
                tap.lock().expect("invariant: lock not poisoned").masked(s.clone());
            }
            let by_rule: Vec<String> = s.by_rule.iter().map(|(id, n)| format!("{id}={n}")).collect();
            let by_kind: Vec<String> = crate::mask::kind_counts(&s.by_kind).iter().map(|(k, n)| format!("{k}={n}")).collect();
            info!(session_id = self.session_id, rows = s.rows, cells_masked = s.cells_masked, by_rule = %by_rule.join(","), by_kind = %by_kind.join(","), "result masked");
        }
    }
}

impl Stage for MaskStage {
    fn name(&self) -> &'static str {
        "masking"
    }

    fn needs_whole(&self, direction: Direction, t: u8) -> bool {
        match direction {
            // The masker reads statement texts, names and result formats.
            // FunctionCall: to refuse it, and keep its place in the request order.
            Direction::Frontend => matches!(t, tag::QUERY | tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE | tag::FUNCTION_CALL),
            Direction::Backend => self.masker.needs_whole(t),
        }
    }

    fn frontend(&mut self, _: &Session, frame: &Frame) -> Action {
        if let Some(e) = self.masker.refusal(frame) {
            return Action::Refuse(e);
        }
        self.masker.frontend(frame);
        Action::Forward
    }

    fn streamed(&mut self, _: &Session, direction: Direction, t: u8, _len: usize) {
        // A streamed client message still counts as a request (a huge Query without
        // the policy stage): the masker cannot read it, but must not lose its place.
        if direction == Direction::Frontend && t == tag::QUERY {
            let f = Frame::build(tag::QUERY, b"\0");
            self.masker.frontend(&f);
        }
    }

    fn backend(&mut self, _: &Session, frame: &Frame) -> Action {
        let (described, failed) = self.slot.take();
        if let Some(d) = described {
            self.masker.described(d);
        }
        if let Some(why) = failed {
            self.masker.lookup_failed(why);
        }
        let action = match self.masker.backend(frame) {
            Step::Forward => Action::Forward,
            Step::Replace(parts) => Action::Replace(parts),
            Step::Lookup(lookup) => {
                let (access, catalog, slot) = (self.access.clone(), self.catalog.clone(), self.slot.clone());
                Action::Hold(
                    Box::pin(async move {
                        match tokio::time::timeout(SIDE_TIMEOUT, look_up(&access, &lookup)).await {
                            Ok(Ok(found)) => catalog.lock().expect("invariant: lock not poisoned").store(&lookup, found),
                            Ok(Err(e)) => slot.put(|s| s.failed = Some(e)),
                            Err(_) => slot.put(|s| s.failed = Some("the catalog lookup timed out".into())),
                        }
                        Ok(())
                    }),
                    None,
                )
            }
            Step::Describe(sql) => {
                let (access, slot, search_path) = (self.access.clone(), self.slot.clone(), self.masker.search_path.clone());
                Action::Hold(
                    Box::pin(async move {
                        let r = match tokio::time::timeout(SIDE_TIMEOUT, describe(&access, &sql, search_path.as_deref())).await {
                            Ok(r) => r,
                            Err(_) => Err("describing the COPY's columns timed out".into()),
                        };
                        slot.put(|s| s.described = Some(r));
                        Ok(())
                    }),
                    None,
                )
            }
        };
        // The raw form of a row about to be rewritten (a held row comes back here
        // after its lookup, and is told once, when it is rewritten).
        if let (Some(tap), tag::DATA_ROW | tag::COPY_DATA, true) = (&self.audit, frame.tag(), matches!(action, Action::Replace(..))) {
            tap.lock().expect("invariant: lock not poisoned").raw_row(frame.body());
        }
        self.log_finished();
        action
    }
}

/// A side connection, logged in like the session's.
async fn side_connection(a: &CatalogAccess) -> Result<(crate::net::conn::Conn, BytesMut), String> {
    let conn = upstream::open(a.upstream, &a.tls).await.map_err(|e| e.to_string())?;
    let mut params = vec![("application_name".to_string(), "phigate-catalog".to_string())];
    if let Some(o) = &a.options {
        params.push(("options".into(), o.clone()));
    }
    let up = upstream::login(conn, &a.tls, &a.credential, &params, &a.dbname).await.map_err(|e| e.to_string())?;
    Ok((up.conn, up.leftover))
}

/// Send a message and read the answer up to ReadyForQuery: DataRows (text) and
/// RowDescription fields; an ErrorResponse becomes the error.
async fn exchange(conn: &mut crate::net::conn::Conn, buf: &mut BytesMut, out: &[u8]) -> Result<(Vec<Vec<Option<String>>>, Option<Vec<Field>>), String> {
    super::send(conn, out).await.map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    let mut fields = None;
    let mut error = None;
    loop {
        let f = read_frame(conn, buf, 64 << 20).await.map_err(|e| e.to_string())?;
        match f.tag() {
            tag::DATA_ROW => {
                let cells = msg::parse_data_row(f.body()).map_err(|e| e.to_string())?;
                rows.push(cells.into_iter().map(|c| c.map(|v| String::from_utf8_lossy(v).into_owned())).collect());
            }
            tag::ROW_DESCRIPTION => fields = Some(msg::parse_row_description(f.body()).map_err(|e| e.to_string())?),
            b'n' => fields = Some(Vec::new()),
            tag::ERROR_RESPONSE => error = Some(parse_error_fields(f.body()).message),
            tag::READY_FOR_QUERY => break,
            _ => {}
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok((rows, fields)),
    }
}

async fn look_up(a: &CatalogAccess, lookup: &Lookup) -> Result<catalog::Found, String> {
    let (mut conn, mut buf) = side_connection(a).await?;
    // An empty search_path makes pg_get_viewdef qualify every relation.
    let sql = format!("SET search_path = ''; {}", catalog::query(lookup));
    let mut q = sql.into_bytes();
    q.push(0);
    let (rows, _) = exchange(&mut conn, &mut buf, Frame::build(tag::QUERY, &q).as_bytes()).await?;
    let _ = conn.write_all(msg::terminate().as_bytes()).await;
    catalog::parse(lookup, &rows).map_err(|e| e.to_string())
}

/// Relation names a COPY's query uses without a schema. The side connection resolves
/// them with the search_path phigate saw the session set, but a session can change
/// its search_path in ways phigate cannot follow (`set_config`, a function's `SET`
/// clause, a rolled-back `SET`): if such a name exists in more than one schema
/// (temporary ones included), the side connection might describe another relation
/// than the one the session reads, and mask its rows by the wrong rules.
fn unqualified_relations(sql: &str) -> Vec<String> {
    let Ok(parsed) = crate::sql::parse(sql) else { return Vec::new() };
    let mut names: Vec<String> = parsed
        .stmts
        .iter()
        .filter_map(|r| r.stmt.as_ref().and_then(|s| s.node.as_ref()))
        .flat_map(|n| n.nodes())
        .filter_map(|(node, ..)| match node {
            pg_query::NodeRef::RangeVar(rv) if rv.schemaname.is_empty() => Some(rv.relname.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The query that lists which of `names` exist in more than one schema.
fn ambiguous_relations_query(names: &[String]) -> String {
    let list: Vec<String> = names.iter().map(|n| format!("'{}'", n.replace('\'', "''"))).collect();
    format!(
        "SELECT relname FROM pg_catalog.pg_class WHERE relkind IN ('r','v','m','p','f') AND relname IN ({}) GROUP BY relname HAVING count(*) > 1",
        list.join(", ")
    )
}

async fn describe(a: &CatalogAccess, sql: &str, search_path: Option<&str>) -> Result<Vec<Field>, String> {
    let (mut conn, mut buf) = side_connection(a).await?;
    let names = unqualified_relations(sql);
    if !names.is_empty() {
        let mut q = ambiguous_relations_query(&names).into_bytes();
        q.push(0);
        let (rows, _) = exchange(&mut conn, &mut buf, Frame::build(tag::QUERY, &q).as_bytes()).await?;
        let ambiguous: Vec<String> = rows.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect();
        if !ambiguous.is_empty() {
            let _ = conn.write_all(msg::terminate().as_bytes()).await;
            return Err(format!(
                "the COPY names {} without a schema, and a relation of that name exists in more than one schema; name it with its schema (schema.table)",
                ambiguous.join(", ")
            ));
        }
    }
    if let Some(set) = search_path {
        let mut q = set.as_bytes().to_vec();
        q.push(0);
        exchange(&mut conn, &mut buf, Frame::build(tag::QUERY, &q).as_bytes()).await?;
    }
    let mut parse = b"\0".to_vec();
    parse.extend_from_slice(sql.as_bytes());
    parse.push(0);
    parse.extend_from_slice(&0i16.to_be_bytes());
    let mut out = Frame::build(tag::PARSE, &parse).as_bytes().to_vec();
    out.extend_from_slice(Frame::build(tag::DESCRIBE, b"S\0").as_bytes());
    out.extend_from_slice(Frame::build(tag::SYNC, &[]).as_bytes());
    let (_, fields) = exchange(&mut conn, &mut buf, &out).await?;
    let _ = conn.write_all(msg::terminate().as_bytes()).await;
    fields.ok_or_else(|| "the database did not describe the query".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn unqualified_relations_of_a_copy_query() {
        let names = super::unqualified_relations("SELECT p.ssn FROM patients p JOIN public.encounters e ON e.patient_id = p.id, (SELECT 1 FROM labs) l");
        assert_eq!(names, vec!["labs".to_string(), "patients".to_string()]);
        let q = super::ambiguous_relations_query(&["o'brien".to_string()]);
        assert!(q.contains("IN ('o''brien')"), "{q}");
    }
}

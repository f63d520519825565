//! From SQL text to facts a policy can judge, using PostgreSQL's own parser
//! (libpg_query). Never pattern-matches text: comments, quoting, casing, dollar quotes
//! and unicode escapes are resolved by the parser, and every node of the tree —
//! CTEs, subqueries, EXPLAIN, PREPARE bodies, set operations — is visited.
//!
//! Pure and synchronous; knows nothing about identities or rules.

use std::{
    collections::{BTreeSet, HashSet},
    fmt,
};

use pg_query::{
    protobuf::{self, a_const::Val, ObjectType, VariableSetKind},
    NodeEnum,
};

use super::walk::{Walker, N};

/// A relation as written in the statement, normalised like PostgreSQL does (unquoted
/// names are already lower-cased by the parser; quoted ones keep their case).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableRef {
    pub schema: Option<String>,
    pub name: String,
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// The statement kinds rules name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Copy,
    Truncate,
    Drop,
    Alter,
    Create,
    Grant,
    Revoke,
    Set,
    Show,
    Transaction,
    Prepare,
    Execute,
    Deallocate,
    Explain,
    Call,
    Do,
    Listen,
    Notify,
    Vacuum,
    Lock,
    Discard,
    Other,
}

impl Kind {
    pub const ALL: [(&'static str, Kind); 27] = [
        ("select", Kind::Select),
        ("insert", Kind::Insert),
        ("update", Kind::Update),
        ("delete", Kind::Delete),
        ("merge", Kind::Merge),
        ("copy", Kind::Copy),
        ("truncate", Kind::Truncate),
        ("drop", Kind::Drop),
        ("alter", Kind::Alter),
        ("create", Kind::Create),
        ("grant", Kind::Grant),
        ("revoke", Kind::Revoke),
        ("set", Kind::Set),
        ("show", Kind::Show),
        ("transaction", Kind::Transaction),
        ("prepare", Kind::Prepare),
        ("execute", Kind::Execute),
        ("deallocate", Kind::Deallocate),
        ("explain", Kind::Explain),
        ("call", Kind::Call),
        ("do", Kind::Do),
        ("listen", Kind::Listen),
        ("notify", Kind::Notify),
        ("vacuum", Kind::Vacuum),
        ("lock", Kind::Lock),
        ("discard", Kind::Discard),
        ("other", Kind::Other),
    ];

    pub fn parse(s: &str) -> Option<Kind> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, k)| *k)
    }
}

/// Where a COPY reads or writes on the server side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyTarget {
    /// STDIN / STDOUT: the data flows through the session (and phigate).
    Client,
    /// A file on the database server.
    File,
    /// A program run by the database server.
    Program,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFacts {
    pub to: bool,
    pub target: CopyTarget,
}

/// DDL verbs that act on existing relations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DdlVerb {
    Drop,
    Truncate,
    Alter,
}

/// What an ALTER does to a schema or database, whose tables it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    Rename,
    Owner,
}

/// What one statement does, everywhere in its tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub kind: Option<Kind>,
    /// The top-level kind and the kind of every statement nested in it that acts on
    /// its own (a DELETE in a CTE, the body of PREPARE or EXPLAIN, the query of
    /// CREATE TABLE AS). Nested SELECTs are not listed: every kind may read.
    pub kinds: BTreeSet<Kind>,
    /// Relations referenced anywhere (read or written).
    pub tables: BTreeSet<TableRef>,
    /// Relations written (INSERT/UPDATE/DELETE/MERGE targets, COPY FROM, TRUNCATE).
    pub writes: BTreeSet<TableRef>,
    /// DROP / TRUNCATE / ALTER targets.
    pub ddl: Vec<(DdlVerb, TableRef)>,
    /// Schemas dropped (DROP SCHEMA).
    pub dropped_schemas: Vec<String>,
    /// Schemas renamed (their tables change names) or given to another owner (who
    /// may then drop or rename any table in them, through any connection).
    pub altered_schemas: Vec<(String, Handover)>,
    /// The database renamed or given to another owner (who may then drop it).
    pub altered_database: Option<Handover>,
    /// ALTER TABLE ALL IN TABLESPACE: moves every table of a tablespace (or of a
    /// role there), whichever they are.
    pub moves_all_tables: bool,
    /// Functions called, lower-cased, without schema; also names selected from a
    /// value in column notation (`(x).f`), which may call f(x).
    pub functions: BTreeSet<String>,
    /// DELETE/UPDATE targets with no WHERE or a WHERE that is always true.
    pub unfiltered_writes: Vec<TableRef>,
    /// SELECT levels that read these relations with neither WHERE nor a LIMIT at or
    /// below `limit` (None: no LIMIT, one that is not a constant, `WITH TIES`, or one
    /// of a level run once per outer row);
    /// also COPY … TO of a table and the source table of a MERGE that takes all of it.
    pub unbounded_reads: Vec<(TableRef, Option<i64>)>,
    /// COPY, or a foreign table reading a server file or program (file_fdw).
    pub copy: Option<CopyFacts>,
    /// Relations a new table or view copies from (SELECT INTO, CREATE TABLE AS,
    /// CREATE [MATERIALIZED] VIEW): every relation its query reads, at any depth.
    pub copied_into_new_relation: BTreeSet<TableRef>,
    /// Tables written with values computed from other relations, and those relations:
    /// INSERT … SELECT (and ON CONFLICT DO UPDATE), UPDATE … SET/FROM, MERGE … USING.
    /// A WHERE or join condition only picks rows, so it does not count.
    pub copied_into_table: Vec<(TableRef, BTreeSet<TableRef>)>,
    /// Every CTE of the statement, at any level, by name: the relations it reads
    /// (CTE names among them are expanded where the facts are judged, since a CTE
    /// may read one of an enclosing statement, or a later one in WITH RECURSIVE).
    pub ctes: std::collections::BTreeMap<String, BTreeSet<TableRef>>,
    /// set_config() or pg_notify() given a value that is not a constant: it keeps
    /// that value outside any result (a setting read back later, a notification).
    pub stores_computed_value: bool,
    /// A new relation is filled from a query.
    pub creates_relation: bool,
    /// DROP DATABASE: every table in it goes, PHI included.
    pub drops_database: bool,
    /// TRUNCATE … CASCADE: every table with a foreign key to the named ones is
    /// emptied too, and phigate cannot see which.
    pub truncate_cascades: bool,
    /// DROP … CASCADE: dependent objects on any table go too (columns of a dropped
    /// type, policies using a dropped table or function, …).
    pub drop_cascades: bool,
    /// … from a prepared statement (`CREATE TABLE x AS EXECUTE p`): its source
    /// cannot be seen.
    pub creates_relation_from_execute: bool,
    /// DO blocks, CREATE FUNCTION/PROCEDURE/TRIGGER/RULE, LOAD, CREATE/ALTER EXTENSION.
    pub opaque_code: bool,
    /// Foreign data wrappers, foreign servers, user mappings, foreign tables, IMPORT
    /// FOREIGN SCHEMA: connections from the database to elsewhere.
    pub foreign_data: bool,
    /// SET ROLE / SET SESSION AUTHORIZATION, or set_config() of those.
    pub changes_role: bool,
    /// SET or set_config() of a setting that switches off the database's own
    /// safeguards for the session ([`setting_weakens_safeguards`]).
    pub weakens_safeguards: bool,
    /// Settings that change how statements parse (standard_conforming_strings,
    /// backslash_quote, an unsafe client_encoding, or any UPDATE of pg_settings): the
    /// policy's parser and the server's would disagree.
    pub changes_parser: bool,
    pub alter_system: bool,
    /// CREATE/ALTER/DROP ROLE, role membership, ALTER … SET for roles/databases.
    pub role_ddl: bool,
    /// GRANT / REVOKE of privileges.
    pub grants: bool,
    /// The decision depends on a literal's value (LIMIT n, `1 = 1`, set_config
    /// arguments): such statements are cached by exact text only.
    pub literal_sensitive: bool,
    /// Nested deeper than the walker follows: cannot be judged.
    pub too_deep: bool,
}

/// The whole message: one entry per statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub statements: Vec<Facts>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("PostgreSQL's parser rejected the statement: {0}")]
pub struct ParseError(pub String);

/// Whether setting `name` to `value` (a startup parameter or `-c` option, where no SQL
/// is involved) would make the server split statements differently from the policy's
/// parser: standard_conforming_strings off, any backslash_quote, or a client encoding
/// whose multibyte characters can hide a backslash.
pub fn setting_changes_parsing(name: &str, value: &str) -> bool {
    let value = value.trim().trim_matches('\'').to_ascii_lowercase();
    match setting_name(name).as_str() {
        "standard_conforming_strings" => !matches!(value.as_str(), "on" | "true" | "yes" | "1"),
        "backslash_quote" => true,
        "client_encoding" => unsafe_client_encoding(&value),
        _ => false,
    }
}

/// Whether setting `name` to `value` switches off one of the database's own
/// safeguards for the session. Only a role allowed to change such a setting can (a
/// superuser; pgaudit's settings also roles granted them), but an identity may be
/// mapped to one, and these would let it act unseen by the database itself:
/// `session_replication_role` other than `origin` keeps ordinary triggers and rules —
/// audit triggers, foreign-key checks — from firing; the `log_*` settings and
/// pgaudit's decide what the database's own logs record; `track_activities` hides
/// statements from pg_stat_activity; `lo_compat_privileges` turns off large-object
/// permission checks; `allow_system_table_mods`, `ignore_system_indexes` and
/// `zero_damaged_pages` tamper with the catalog and the data. `value` None: back to
/// the default (RESET, `SET … TO DEFAULT`), which the database's owners chose.
pub fn setting_weakens_safeguards(name: &str, value: Option<&str>) -> bool {
    let name = setting_name(name);
    let Some(value) = value else { return false };
    match name.as_str() {
        "session_replication_role" => !value.trim().trim_matches('\'').eq_ignore_ascii_case("origin"),
        "track_activities" | "lo_compat_privileges" | "allow_system_table_mods" | "ignore_system_indexes" | "zero_damaged_pages" => true,
        n => n.starts_with("log_") || n.starts_with("pgaudit."),
    }
}

/// A string constant, in lower case (setting names and encodings are read so).
fn lowercase_string(n: Option<&protobuf::Node>) -> Option<String> {
    match n.and_then(const_value)? {
        Val::Sval(s) => Some(s.sval.to_ascii_lowercase()),
        _ => None,
    }
}

/// A setting's name as PostgreSQL matches it: case-insensitive, `-` for `_` (in
/// `--name=value` switches).
fn setting_name(name: &str) -> String {
    name.to_ascii_lowercase().replace('-', "_")
}

/// A constant's text as a setting would read it; `?` for anything computed.
fn setting_text(n: Option<&protobuf::Node>) -> String {
    match n.and_then(const_value) {
        Some(Val::Sval(s)) => s.sval.clone(),
        Some(Val::Ival(i)) => i.ival.to_string(),
        Some(Val::Fval(f)) => f.fval.clone(),
        Some(Val::Boolval(b)) => if b.boolval { "on" } else { "off" }.to_string(),
        _ => "?".to_string(),
    }
}

/// Functions whose values are one row whatever the input size.
const AGGREGATES: &[&str] = &["count", "sum", "avg", "min", "max", "bool_and", "bool_or", "every", "bit_and", "bit_or", "stddev", "variance"];

/// Client encoding names (as PostgreSQL compares them: letters and digits only,
/// lower case) of the encodings whose multibyte characters never contain an ASCII
/// byte, so the server splits strings as the policy's parser does. Every name of
/// PostgreSQL 15's table except those of SJIS, SHIFT_JIS_2004, BIG5, GBK, UHC,
/// GB18030 and JOHAB (client-only encodings whose second byte may be a backslash).
/// A list of what is safe, not of what is not: a name missing here is refused.
const SAFE_ENCODINGS: &[&str] = &[
    "abc",
    "alt",
    "euccn",
    "eucjis2004",
    "eucjp",
    "euckr",
    "euctw",
    "iso88591",
    "iso885910",
    "iso885913",
    "iso885914",
    "iso885915",
    "iso885916",
    "iso88592",
    "iso88593",
    "iso88594",
    "iso88595",
    "iso88596",
    "iso88597",
    "iso88598",
    "iso88599",
    "koi8",
    "koi8r",
    "koi8u",
    "latin1",
    "latin10",
    "latin2",
    "latin3",
    "latin4",
    "latin5",
    "latin6",
    "latin7",
    "latin8",
    "latin9",
    "muleinternal",
    "sqlascii",
    "tcvn",
    "tcvn5712",
    "unicode",
    "utf8",
    "vscii",
    "win",
    "win1250",
    "win1251",
    "win1252",
    "win1253",
    "win1254",
    "win1255",
    "win1256",
    "win1257",
    "win1258",
    "win866",
    "win874",
    "windows1250",
    "windows1251",
    "windows1252",
    "windows1253",
    "windows1254",
    "windows1255",
    "windows1256",
    "windows1257",
    "windows1258",
    "windows866",
    "windows874",
];

/// Whether a client encoding name (any spelling PostgreSQL accepts: `Big-5`, `B.I.G.5`)
/// may name an encoding that hides a backslash in a multibyte character.
fn unsafe_client_encoding(name: &str) -> bool {
    let clean: String = name.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect();
    !SAFE_ENCODINGS.contains(&clean.as_str())
}

pub fn analyze(sql: &str) -> Result<Analysis, ParseError> {
    let parsed = crate::sql::parse(sql).map_err(|e| ParseError(e.0))?;
    let mut statements = Vec::with_capacity(parsed.stmts.len());
    for raw in &parsed.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else { continue };
        let kind = kind_of(node);
        let mut facts = Facts { kind: Some(kind), kinds: BTreeSet::from([kind]), ..Facts::default() };
        let mut found = Facts::default();
        let too_deep = {
            let mut per_row = HashSet::new();
            let mut visit = |n: N<'_>| visit(n, &mut found, &mut per_row);
            let mut w = Walker { visit: &mut visit, depth: 0, too_deep: false };
            w.raw_stmt(raw);
            w.too_deep
        };
        facts.merge(found);
        facts.too_deep = too_deep;
        statements.push(facts);
    }
    Ok(Analysis { statements })
}

impl Facts {
    fn merge(&mut self, o: Facts) {
        self.kinds.extend(o.kinds);
        self.tables.extend(o.tables);
        self.writes.extend(o.writes);
        self.ddl.extend(o.ddl);
        self.dropped_schemas.extend(o.dropped_schemas);
        self.altered_schemas.extend(o.altered_schemas);
        self.altered_database = self.altered_database.or(o.altered_database);
        self.moves_all_tables |= o.moves_all_tables;
        self.functions.extend(o.functions);
        self.unfiltered_writes.extend(o.unfiltered_writes);
        self.unbounded_reads.extend(o.unbounded_reads);
        self.copy = self.copy.take().or(o.copy);
        self.copied_into_new_relation.extend(o.copied_into_new_relation);
        self.copied_into_table.extend(o.copied_into_table);
        for (name, read) in o.ctes {
            self.ctes.entry(name).or_default().extend(read);
        }
        self.stores_computed_value |= o.stores_computed_value;
        self.creates_relation |= o.creates_relation;
        self.drops_database |= o.drops_database;
        self.truncate_cascades |= o.truncate_cascades;
        self.drop_cascades |= o.drop_cascades;
        self.creates_relation_from_execute |= o.creates_relation_from_execute;
        self.opaque_code |= o.opaque_code;
        self.foreign_data |= o.foreign_data;
        self.changes_role |= o.changes_role;
        self.weakens_safeguards |= o.weakens_safeguards;
        self.changes_parser |= o.changes_parser;
        self.alter_system |= o.alter_system;
        self.role_ddl |= o.role_ddl;
        self.grants |= o.grants;
        self.literal_sensitive |= o.literal_sensitive;
    }
}

fn table(rv: &protobuf::RangeVar) -> TableRef {
    TableRef { schema: (!rv.schemaname.is_empty()).then(|| rv.schemaname.clone()), name: rv.relname.clone() }
}

/// A qualified name given as a list of String nodes (DROP, function names).
fn name_list(items: &[protobuf::Node]) -> Vec<String> {
    items
        .iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect()
}

fn qualified(parts: Vec<String>) -> Option<TableRef> {
    match parts.len() {
        1 => Some(TableRef { schema: None, name: parts[0].clone() }),
        2 => Some(TableRef { schema: Some(parts[0].clone()), name: parts[1].clone() }),
        3 => Some(TableRef { schema: Some(parts[1].clone()), name: parts[2].clone() }),
        _ => None,
    }
}

fn kind_of(node: &NodeEnum) -> Kind {
    use NodeEnum as N;
    match node {
        N::SelectStmt(s) if s.into_clause.is_some() => Kind::Create,
        N::SelectStmt(_) => Kind::Select,
        N::InsertStmt(_) => Kind::Insert,
        N::UpdateStmt(_) => Kind::Update,
        N::DeleteStmt(_) => Kind::Delete,
        N::MergeStmt(_) => Kind::Merge,
        N::CopyStmt(_) => Kind::Copy,
        N::TruncateStmt(_) => Kind::Truncate,
        N::DropStmt(_) | N::DropRoleStmt(_) | N::DropdbStmt(_) | N::DropOwnedStmt(_) | N::DropTableSpaceStmt(_) => Kind::Drop,
        N::AlterTableStmt(_)
        | N::RenameStmt(_)
        | N::AlterObjectSchemaStmt(_)
        | N::AlterOwnerStmt(_)
        | N::AlterRoleStmt(_)
        | N::AlterRoleSetStmt(_)
        | N::AlterDatabaseStmt(_)
        | N::AlterDatabaseSetStmt(_)
        | N::AlterSystemStmt(_)
        | N::AlterFunctionStmt(_)
        | N::AlterSeqStmt(_)
        | N::AlterDefaultPrivilegesStmt(_) => Kind::Alter,
        N::CreateStmt(_)
        | N::CreateTableAsStmt(_)
        | N::ViewStmt(_)
        | N::IndexStmt(_)
        | N::CreateSchemaStmt(_)
        | N::CreateFunctionStmt(_)
        | N::CreateRoleStmt(_)
        | N::CreateSeqStmt(_)
        | N::CreateExtensionStmt(_)
        | N::CreateTrigStmt(_)
        | N::RuleStmt(_)
        | N::CompositeTypeStmt(_)
        | N::CreateEnumStmt(_)
        | N::CreatedbStmt(_)
        | N::CreateDomainStmt(_) => Kind::Create,
        N::GrantStmt(g) if g.is_grant => Kind::Grant,
        N::GrantStmt(_) => Kind::Revoke,
        N::GrantRoleStmt(g) if g.is_grant => Kind::Grant,
        N::GrantRoleStmt(_) => Kind::Revoke,
        N::VariableSetStmt(_) => Kind::Set,
        N::VariableShowStmt(_) => Kind::Show,
        N::TransactionStmt(_) => Kind::Transaction,
        N::PrepareStmt(_) => Kind::Prepare,
        N::ExecuteStmt(_) => Kind::Execute,
        N::DeallocateStmt(_) => Kind::Deallocate,
        N::ExplainStmt(_) => Kind::Explain,
        N::CallStmt(_) => Kind::Call,
        N::DoStmt(_) => Kind::Do,
        N::ListenStmt(_) | N::UnlistenStmt(_) => Kind::Listen,
        N::NotifyStmt(_) => Kind::Notify,
        N::VacuumStmt(_) => Kind::Vacuum,
        N::LockStmt(_) => Kind::Lock,
        N::DiscardStmt(_) => Kind::Discard,
        _ => Kind::Other,
    }
}

fn const_value(n: &protobuf::Node) -> Option<&Val> {
    match n.node.as_ref()? {
        NodeEnum::AConst(c) => c.val.as_ref(),
        NodeEnum::TypeCast(t) => t.arg.as_deref().and_then(const_value),
        _ => None,
    }
}

fn const_bool(n: &protobuf::Node) -> Option<bool> {
    match const_value(n)? {
        Val::Boolval(b) => Some(b.boolval),
        Val::Sval(s) => match s.sval.to_ascii_lowercase().as_str() {
            "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
            "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Whether two expressions compute the same value from the same row: the same
/// column, or the same operator, function, cast, COALESCE or row of such operands
/// (`id::text` and `id::text`, `coalesce(id, 0)` twice). A column is the same when one
/// name is a suffix of the other (`id`, `l.id`, `labs.id`, `public.labs.id`): any
/// other reading of the pair PostgreSQL rejects as ambiguous or unknown. Sets
/// `consts` when constants were compared: then the answer depends on their values.
fn same_expr(a: &protobuf::Node, b: &protobuf::Node, consts: &mut bool) -> bool {
    // A COLLATE (`test = test COLLATE "C"`: equality stays reflexive) and a scalar
    // subquery of one row without FROM (`(SELECT id)`) are the value inside.
    let (a, b) = (inner_value(a), inner_value(b));
    same_expr_of(a, b, consts)
}

/// See [`same_expr`].
fn inner_value(n: &protobuf::Node) -> &protobuf::Node {
    match n.node.as_ref() {
        Some(NodeEnum::CollateClause(c)) => c.arg.as_deref().map_or(n, inner_value),
        Some(NodeEnum::SubLink(l)) if protobuf::SubLinkType::try_from(l.sub_link_type) == Ok(protobuf::SubLinkType::ExprSublink) => {
            one_row_value(l.subselect.as_deref()).map_or(n, inner_value)
        }
        _ => n,
    }
}

/// The one value of `SELECT x` or `VALUES (x)` without FROM, WHERE, HAVING or LIMIT.
fn one_row_value(q: Option<&protobuf::Node>) -> Option<&protobuf::Node> {
    let Some(NodeEnum::SelectStmt(q)) = q.and_then(|q| q.node.as_ref()) else { return None };
    let plain = q.from_clause.is_empty() && q.where_clause.is_none() && q.having_clause.is_none() && q.limit_count.is_none() && q.larg.is_none();
    if !plain {
        return None;
    }
    match (q.target_list.as_slice(), q.values_lists.as_slice()) {
        ([t], []) => match t.node.as_ref() {
            Some(NodeEnum::ResTarget(rt)) => rt.val.as_deref(),
            _ => None,
        },
        ([], [row]) => match row.node.as_ref() {
            Some(NodeEnum::List(l)) if l.items.len() == 1 => l.items.first(),
            _ => None,
        },
        _ => None,
    }
}

fn same_expr_of(a: &protobuf::Node, b: &protobuf::Node, consts: &mut bool) -> bool {
    fn all(x: &[protobuf::Node], y: &[protobuf::Node], consts: &mut bool) -> bool {
        x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_expr(a, b, consts))
    }
    fn side(p: Option<&protobuf::Node>, q: Option<&protobuf::Node>, consts: &mut bool) -> bool {
        match (p, q) {
            (None, None) => true,
            (Some(p), Some(q)) => same_expr(p, q, consts),
            _ => false,
        }
    }
    match (a.node.as_ref(), b.node.as_ref()) {
        (Some(NodeEnum::ColumnRef(x)), Some(NodeEnum::ColumnRef(y))) => {
            let (short, long) = if x.fields.len() <= y.fields.len() { (&x.fields, &y.fields) } else { (&y.fields, &x.fields) };
            !short.is_empty() && long.ends_with(short)
        }
        (Some(NodeEnum::AConst(_)), Some(NodeEnum::AConst(_))) => {
            *consts = true;
            scalar(a).is_some_and(|x| Some(x) == scalar(b))
        }
        (Some(NodeEnum::TypeCast(x)), Some(NodeEnum::TypeCast(y))) => {
            // `integer` is `pg_catalog.int4` to the parser, `int4` just `int4`.
            let type_name = |t: &protobuf::TypeName| {
                let mut n = name_list(&t.names);
                if n.len() == 2 && n[0] == "pg_catalog" {
                    n.remove(0);
                }
                n
            };
            let same_type = match (&x.type_name, &y.type_name) {
                (Some(s), Some(t)) => {
                    type_name(s) == type_name(t)
                        && s.array_bounds == t.array_bounds
                        && s.setof == t.setof
                        && s.pct_type == t.pct_type
                        && all(&s.typmods, &t.typmods, consts)
                }
                _ => false,
            };
            same_type && x.arg.is_some() && side(x.arg.as_deref(), y.arg.as_deref(), consts)
        }
        (Some(NodeEnum::AExpr(x)), Some(NodeEnum::AExpr(y))) => {
            x.kind == y.kind && x.name == y.name && side(x.lexpr.as_deref(), y.lexpr.as_deref(), consts) && side(x.rexpr.as_deref(), y.rexpr.as_deref(), consts)
        }
        (Some(NodeEnum::FuncCall(x)), Some(NodeEnum::FuncCall(y))) => {
            let plain = |f: &protobuf::FuncCall| {
                f.agg_order.is_empty() && f.agg_filter.is_none() && f.over.is_none() && !f.agg_star && !f.agg_distinct && !f.func_variadic
            };
            plain(x) && plain(y) && x.funcname == y.funcname && all(&x.args, &y.args, consts)
        }
        (Some(NodeEnum::CoalesceExpr(x)), Some(NodeEnum::CoalesceExpr(y))) => all(&x.args, &y.args, consts),
        // GREATEST / LEAST.
        (Some(NodeEnum::MinMaxExpr(x)), Some(NodeEnum::MinMaxExpr(y))) => x.op == y.op && all(&x.args, &y.args, consts),
        (Some(NodeEnum::AArrayExpr(x)), Some(NodeEnum::AArrayExpr(y))) => all(&x.elements, &y.elements, consts),
        (Some(NodeEnum::CollateClause(x)), Some(NodeEnum::CollateClause(y))) => x.collname == y.collname && side(x.arg.as_deref(), y.arg.as_deref(), consts),
        // `(labs).id`: a field of the same value.
        (Some(NodeEnum::AIndirection(x)), Some(NodeEnum::AIndirection(y))) => {
            x.indirection.iter().all(|i| matches!(i.node, Some(NodeEnum::String(_))))
                && x.indirection == y.indirection
                && side(x.arg.as_deref(), y.arg.as_deref(), consts)
        }
        // `(id, x)`, `ROW(id)`.
        (Some(NodeEnum::RowExpr(x)), Some(NodeEnum::RowExpr(y))) => all(&x.args, &y.args, consts),
        _ => false,
    }
}

/// Whether one side is a COALESCE that is the other itself whenever its arguments
/// before it are NULL, and those may be NULL without regard to the row:
/// `coalesce($1, id) = id`, the optional filter that keeps every row when the
/// parameter is bound to NULL.
fn falls_back_to(a: &protobuf::Node, b: &protobuf::Node, facts: &mut Facts) -> bool {
    coalesce_falls_back_to(a, b, facts) || coalesce_falls_back_to(b, a, facts)
}

/// [`falls_back_to`] with the COALESCE on the left.
fn coalesce_falls_back_to(c: &protobuf::Node, e: &protobuf::Node, facts: &mut Facts) -> bool {
    let Some(NodeEnum::CoalesceExpr(c)) = inner_value(c).node.as_ref() else { return false };
    for a in &c.args {
        if same_expr(a, e, &mut facts.literal_sensitive) {
            return true;
        }
        // A constant that is not NULL ends the fallback; a column may hold anything.
        if !row_independent(a) || const_value(a).is_some() {
            return false;
        }
    }
    false
}

/// A constant's value for comparisons: a number or a string.
#[derive(Debug, PartialEq, PartialOrd)]
enum Scalar {
    Num(f64),
    Str(String),
    Bool(bool),
}

fn scalar(n: &protobuf::Node) -> Option<Scalar> {
    Some(match const_value(n)? {
        Val::Ival(i) => Scalar::Num(f64::from(i.ival)),
        Val::Fval(f) => Scalar::Num(f.fval.parse().ok()?),
        Val::Sval(s) => Scalar::Str(s.sval.clone()),
        Val::Boolval(b) => Scalar::Bool(b.boolval),
        _ => return None,
    })
}

/// Whether a condition refers to no column, so that it cannot pick rows by their
/// contents: it holds for every row or for none (`true`, `(SELECT true)`, `$1`,
/// `coalesce(NULL, true)`, an uncorrelated EXISTS), or for rows picked blindly
/// (`random() < 0.5`). Parameters, function calls and subqueries without columns are
/// all such conditions. A bare `*` (`EXISTS (SELECT * FROM t)`) names no column of
/// the row; `WHERE CURRENT OF c` picks one row.
fn row_independent(n: &protobuf::Node) -> bool {
    let mut refers = false;
    let mut visit = |x: N<'_>| match x {
        N::ColumnRef(c) => refers |= !matches!(c.fields.as_slice(), [f] if matches!(f.node, Some(NodeEnum::AStar(_)))),
        N::CurrentOfExpr(_) => refers = true,
        _ => {}
    };
    let mut w = Walker { visit: &mut visit, depth: 0, too_deep: false };
    w.node(n);
    !refers
}

/// The value of a row-independent condition, where phigate can work it out.
fn eval_const(n: &protobuf::Node) -> Option<bool> {
    match n.node.as_ref()? {
        NodeEnum::AConst(_) | NodeEnum::TypeCast(_) => const_bool(n),
        NodeEnum::AExpr(e) => {
            let op = name_list(&e.name);
            let op = op.last().map(String::as_str)?;
            let kind = protobuf::AExprKind::try_from(e.kind).ok()?;
            let l = scalar(e.lexpr.as_deref()?)?;
            match kind {
                protobuf::AExprKind::AexprOp => {
                    let r = scalar(e.rexpr.as_deref()?)?;
                    if std::mem::discriminant(&l) != std::mem::discriminant(&r) {
                        return None;
                    }
                    let ord = l.partial_cmp(&r)?;
                    Some(match op {
                        "=" => ord.is_eq(),
                        "<>" | "!=" => !ord.is_eq(),
                        "<" => ord.is_lt(),
                        "<=" => ord.is_le(),
                        ">" => ord.is_gt(),
                        ">=" => ord.is_ge(),
                        _ => return None,
                    })
                }
                protobuf::AExprKind::AexprIn => {
                    let NodeEnum::List(list) = e.rexpr.as_deref()?.node.as_ref()? else { return None };
                    let items: Option<Vec<Scalar>> = list.items.iter().map(scalar).collect();
                    let found = items?.contains(&l);
                    Some(if op == "=" { found } else { !found })
                }
                _ => None,
            }
        }
        NodeEnum::BoolExpr(b) => {
            let vals: Vec<Option<bool>> = b.args.iter().map(eval_const).collect();
            match protobuf::BoolExprType::try_from(b.boolop).ok()? {
                protobuf::BoolExprType::OrExpr if vals.contains(&Some(true)) => Some(true),
                protobuf::BoolExprType::AndExpr if vals.contains(&Some(false)) => Some(false),
                protobuf::BoolExprType::OrExpr | protobuf::BoolExprType::AndExpr => {
                    let all: Option<Vec<bool>> = vals.into_iter().collect();
                    let all = all?;
                    Some(if b.boolop == protobuf::BoolExprType::OrExpr as i32 { all.contains(&true) } else { !all.contains(&false) })
                }
                protobuf::BoolExprType::NotExpr => vals.first().copied().flatten().map(|v| !v),
                _ => None,
            }
        }
        NodeEnum::BooleanTest(t) => {
            let v = eval_const(t.arg.as_deref()?)?;
            Some(match protobuf::BoolTestType::try_from(t.booltesttype).ok()? {
                protobuf::BoolTestType::IsTrue | protobuf::BoolTestType::IsNotFalse => v,
                protobuf::BoolTestType::IsFalse | protobuf::BoolTestType::IsNotTrue => !v,
                _ => return None,
            })
        }
        NodeEnum::NullTest(t) => {
            // A constant that is not NULL.
            let arg = t.arg.as_deref()?;
            let is_null = match arg.node.as_ref()? {
                NodeEnum::AConst(c) => c.isnull,
                // A cast or an expression of constants: known only when it is a value.
                _ => {
                    const_value(arg)?;
                    false
                }
            };
            Some(match protobuf::NullTestType::try_from(t.nulltesttype).ok()? {
                protobuf::NullTestType::IsNull => is_null,
                protobuf::NullTestType::IsNotNull => !is_null,
                _ => return None,
            })
        }
        _ => None,
    }
}

/// Whether a condition holds for every row. A row-independent condition is true for
/// all rows or for none: where phigate can evaluate it, it does (`1 = 2` limits the
/// rows to none); where it cannot, it assumes the worst. With columns: a column
/// compared with itself (`id = id`), `x IS NULL OR x IS NOT NULL`, and OR/AND/NOT of
/// these. Marks the facts literal-sensitive when constants decide it.
fn always_true(n: &protobuf::Node, facts: &mut Facts) -> bool {
    let Some(node) = n.node.as_ref() else { return false };
    if row_independent(n) {
        facts.literal_sensitive = true;
        return eval_const(n) != Some(false);
    }
    match node {
        NodeEnum::AExpr(e) => {
            use protobuf::AExprKind as K;
            let op = name_list(&e.name);
            let op = op.last().map(String::as_str);
            let (Some(l), Some(r)) = (e.lexpr.as_deref(), e.rexpr.as_deref()) else { return false };
            match K::try_from(e.kind) {
                Ok(K::AexprOp) if matches!(op, Some("=" | "<=" | ">=")) => {
                    same_expr(l, r, &mut facts.literal_sensitive)
                        || falls_back_to(l, r, facts)
                        || (op == Some("=") && compared_with_bool(l, r, true, true, facts))
                }
                // `(cond) <> false`: the condition itself; `(cond) <> true`: its negation.
                Ok(K::AexprOp) if matches!(op, Some("<>" | "!=")) => compared_with_bool(l, r, false, true, facts),
                Ok(K::AexprNotDistinct) => {
                    same_expr(l, r, &mut facts.literal_sensitive) || falls_back_to(l, r, facts) || compared_with_bool(l, r, true, true, facts)
                }
                Ok(K::AexprDistinct) => compared_with_bool(l, r, false, true, facts),
                // `id IN (…, id, …)`, `id = ANY(ARRAY[…, id, …])`, `(cond) IN (true)`.
                Ok(K::AexprIn | K::AexprOpAny) if op == Some("=") => {
                    items(r).iter().any(|i| same_expr(l, i, &mut facts.literal_sensitive) || compared_with_bool(l, i, true, true, facts))
                }
                // `id = ALL(ARRAY[id])`, `id <= ALL(ARRAY[id, id])`.
                Ok(K::AexprOpAll) if matches!(op, Some("=" | "<=" | ">=")) => {
                    let all = items(r);
                    !all.is_empty() && all.iter().all(|i| same_expr(l, i, &mut facts.literal_sensitive))
                }
                // `id BETWEEN id AND id`.
                Ok(K::AexprBetween | K::AexprBetweenSym) => {
                    let bounds = items(r);
                    !bounds.is_empty() && bounds.iter().all(|b| same_expr(l, b, &mut facts.literal_sensitive))
                }
                _ => false,
            }
        }
        NodeEnum::BoolExpr(b) => match protobuf::BoolExprType::try_from(b.boolop) {
            Ok(protobuf::BoolExprType::OrExpr) => b.args.iter().any(|a| always_true(a, facts)) || null_or_not_null(&b.args, facts),
            Ok(protobuf::BoolExprType::AndExpr) => !b.args.is_empty() && b.args.iter().all(|a| always_true(a, facts)),
            Ok(protobuf::BoolExprType::NotExpr) => b.args.first().is_some_and(|a| always_false(a, facts)),
            _ => false,
        },
        NodeEnum::BooleanTest(t) => match (protobuf::BoolTestType::try_from(t.booltesttype), t.arg.as_deref()) {
            (Ok(protobuf::BoolTestType::IsTrue | protobuf::BoolTestType::IsNotFalse), Some(a)) => always_true(a, facts),
            // `(id <> id) IS FALSE`, `… IS NOT TRUE`.
            (Ok(protobuf::BoolTestType::IsFalse | protobuf::BoolTestType::IsNotTrue), Some(a)) => always_false(a, facts),
            _ => false,
        },
        // `CASE WHEN id = id THEN true END`: true when every result is, or when its
        // first branch is always taken and true.
        NodeEnum::CaseExpr(c) => case_always(c, true, facts),
        // `coalesce(id = id, true)`: NULLs aside, the first argument.
        NodeEnum::CoalesceExpr(c) => {
            c.args.first().is_some_and(|a| always_true(a, facts)) || (!c.args.is_empty() && c.args.iter().all(|a| always_true(a, facts)))
        }
        NodeEnum::SubLink(l) => {
            // `EXISTS (SELECT id)`: a SELECT without FROM, WHERE or HAVING returns one
            // row; `id IN (SELECT id)` compares the row's value with itself.
            let Some(NodeEnum::SelectStmt(q)) = l.subselect.as_deref().and_then(|q| q.node.as_ref()) else { return false };
            let one_row = q.from_clause.is_empty()
                && q.where_clause.is_none()
                && q.having_clause.is_none()
                && q.limit_count.is_none()
                && q.limit_offset.is_none()
                && q.larg.is_none()
                && q.values_lists.is_empty();
            match protobuf::SubLinkType::try_from(l.sub_link_type) {
                Ok(protobuf::SubLinkType::ExistsSublink) => one_row,
                // `id IN (SELECT id)`, `id = ANY (VALUES (id))`.
                Ok(protobuf::SubLinkType::AnySublink) => {
                    let op = name_list(&l.oper_name);
                    let equal = op.is_empty() || op.last().is_some_and(|o| matches!(o.as_str(), "=" | "<=" | ">="));
                    let value = one_row_value(l.subselect.as_deref());
                    equal && l.testexpr.as_deref().zip(value).is_some_and(|(a, b)| same_expr(a, b, &mut facts.literal_sensitive))
                }
                _ => false,
            }
        }
        _ => false,
    }
}

/// Whether a CASE is always `want` (true: always true; false: never true): its first
/// branch is always taken (`CASE WHEN id = id`, `CASE id WHEN id`) and gives that, or
/// every branch and the ELSE give it.
fn case_always(c: &protobuf::CaseExpr, want: bool, facts: &mut Facts) -> bool {
    let whens: Vec<&protobuf::CaseWhen> =
        c.args.iter().filter_map(|w| if let Some(NodeEnum::CaseWhen(w)) = w.node.as_ref() { Some(&**w) } else { None }).collect();
    let gives = |n: Option<&protobuf::Node>, facts: &mut Facts| n.is_some_and(|r| if want { always_true(r, facts) } else { always_false(r, facts) });
    let taken = |w: &protobuf::CaseWhen, facts: &mut Facts| match (c.arg.as_deref(), w.expr.as_deref()) {
        (None, Some(e)) => always_true(e, facts),
        (Some(a), Some(e)) => same_expr(a, e, &mut facts.literal_sensitive),
        _ => false,
    };
    let first = whens.first().is_some_and(|w| taken(w, facts) && gives(w.result.as_deref(), facts));
    first || (!whens.is_empty() && whens.iter().all(|w| gives(w.result.as_deref(), facts)) && gives(c.defresult.as_deref(), facts))
}

/// The items of an IN list or an ARRAY[…] (cast or not: `ARRAY[id]::int[]`).
fn items(n: &protobuf::Node) -> &[protobuf::Node] {
    match n.node.as_ref() {
        Some(NodeEnum::List(l)) => &l.items,
        Some(NodeEnum::AArrayExpr(a)) => &a.elements,
        Some(NodeEnum::TypeCast(c)) => c.arg.as_deref().map(items).unwrap_or_default(),
        _ => &[],
    }
}

/// `cond = b`, `b = cond`, `cond <> b`, `cond IS [NOT] DISTINCT FROM b` with b a
/// boolean constant: the condition itself or its negation. `equal`: the comparison
/// holds when both sides are equal. Whether that is always (`want` true) or never
/// (`want` false) true.
fn compared_with_bool(l: &protobuf::Node, r: &protobuf::Node, equal: bool, want: bool, facts: &mut Facts) -> bool {
    let (cond, other) = if const_bool(r).is_some() { (l, r) } else { (r, l) };
    match const_bool(other) {
        Some(v) => {
            facts.literal_sensitive = true;
            // Equal to true, or unequal to false: the condition; else its negation.
            if (v == equal) == want {
                always_true(cond, facts)
            } else {
                always_false(cond, facts)
            }
        }
        None => false,
    }
}

/// The mirror of [`always_true`]: whether a condition is never true. Row-independent
/// ones count unless they are provably true (the worst case for a NOT around them);
/// with columns: a column compared with itself by `<>`, `<`, `>` or IS DISTINCT FROM
/// (NULLs aside, never true), `x IS NULL AND x IS NOT NULL`, and NOT/AND/OR and
/// boolean tests of these.
fn always_false(n: &protobuf::Node, facts: &mut Facts) -> bool {
    if row_independent(n) {
        facts.literal_sensitive = true;
        return eval_const(n) != Some(true);
    }
    match n.node.as_ref() {
        Some(NodeEnum::AExpr(e)) => {
            use protobuf::AExprKind as K;
            let op = name_list(&e.name);
            let op = op.last().map(String::as_str);
            let (Some(l), Some(r)) = (e.lexpr.as_deref(), e.rexpr.as_deref()) else { return false };
            match K::try_from(e.kind) {
                Ok(K::AexprOp) if matches!(op, Some("<>" | "!=" | "<" | ">")) => {
                    same_expr(l, r, &mut facts.literal_sensitive) || (matches!(op, Some("<>" | "!=")) && compared_with_bool(l, r, false, false, facts))
                }
                Ok(K::AexprOp) if op == Some("=") => compared_with_bool(l, r, true, false, facts),
                Ok(K::AexprDistinct) => same_expr(l, r, &mut facts.literal_sensitive) || compared_with_bool(l, r, false, false, facts),
                Ok(K::AexprNotDistinct) => compared_with_bool(l, r, true, false, facts),
                // `id NOT IN (…, id, …)`, `id <> ALL(ARRAY[id])`.
                Ok(K::AexprIn | K::AexprOpAll) if matches!(op, Some("<>" | "!=")) => items(r).iter().any(|i| same_expr(l, i, &mut facts.literal_sensitive)),
                // `id NOT BETWEEN id AND id`.
                Ok(K::AexprNotBetween | K::AexprNotBetweenSym) => {
                    let bounds = items(r);
                    !bounds.is_empty() && bounds.iter().all(|b| same_expr(l, b, &mut facts.literal_sensitive))
                }
                _ => false,
            }
        }
        Some(NodeEnum::BoolExpr(b)) => match protobuf::BoolExprType::try_from(b.boolop) {
            Ok(protobuf::BoolExprType::AndExpr) => b.args.iter().any(|a| always_false(a, facts)) || null_or_not_null(&b.args, facts),
            Ok(protobuf::BoolExprType::OrExpr) => !b.args.is_empty() && b.args.iter().all(|a| always_false(a, facts)),
            Ok(protobuf::BoolExprType::NotExpr) => b.args.first().is_some_and(|a| always_true(a, facts)),
            _ => false,
        },
        Some(NodeEnum::BooleanTest(t)) => match (protobuf::BoolTestType::try_from(t.booltesttype), t.arg.as_deref()) {
            (Ok(protobuf::BoolTestType::IsTrue | protobuf::BoolTestType::IsNotFalse), Some(a)) => always_false(a, facts),
            (Ok(protobuf::BoolTestType::IsFalse | protobuf::BoolTestType::IsNotTrue), Some(a)) => always_true(a, facts),
            _ => false,
        },
        Some(NodeEnum::CaseExpr(c)) => case_always(c, false, facts),
        _ => false,
    }
}

/// `x IS NULL OR x IS NOT NULL` (in either order) among OR arguments (the same pair
/// among AND arguments is never true).
fn null_or_not_null(args: &[protobuf::Node], facts: &mut Facts) -> bool {
    // `NOT x IS NULL` is `x IS NOT NULL` (and the other way round).
    fn null_test(n: &protobuf::Node, negated: bool) -> Option<(&protobuf::Node, bool)> {
        match n.node.as_ref()? {
            NodeEnum::NullTest(t) => {
                let is_null = protobuf::NullTestType::try_from(t.nulltesttype) == Ok(protobuf::NullTestType::IsNull);
                t.arg.as_deref().map(|x| (x, is_null ^ negated))
            }
            NodeEnum::BoolExpr(b) if protobuf::BoolExprType::try_from(b.boolop) == Ok(protobuf::BoolExprType::NotExpr) => null_test(b.args.first()?, !negated),
            _ => None,
        }
    }
    let tests: Vec<(&protobuf::Node, bool)> = args.iter().filter_map(|a| null_test(a, false)).collect();
    tests.iter().any(|(x, t)| tests.iter().any(|(y, u)| t != u && same_expr(x, y, &mut facts.literal_sensitive)))
}

/// Every relation a new table's or view's query reads, through subqueries, CTEs and
/// set operations alike: all of it can end up in the new relation. Written tables
/// count too — the rows a data-modifying CTE returns are theirs — and so does a read
/// of the new relation's own name (search_path can make the read `public.patients`
/// and the new table another schema's `patients`).
fn relations_read(query: &protobuf::Node) -> Vec<TableRef> {
    let mut out = Vec::new();
    let mut visit = |n: N<'_>| {
        if let N::RangeVar(rv) = n {
            out.push(table(rv));
        }
    };
    let mut w = Walker { visit: &mut visit, depth: 0, too_deep: false };
    w.node(query);
    out
}

impl Facts {
    /// `read` with each name of a CTE of the statement replaced by the relations that
    /// CTE reads, transitively (the name itself stays too: a table may share it).
    pub fn through_ctes<'a>(&self, read: impl IntoIterator<Item = &'a TableRef>) -> BTreeSet<TableRef> {
        let mut out: BTreeSet<TableRef> = BTreeSet::new();
        let mut todo: Vec<TableRef> = read.into_iter().cloned().collect();
        while let Some(t) = todo.pop() {
            if !out.insert(t.clone()) {
                continue;
            }
            if t.schema.is_none() {
                if let Some(more) = self.ctes.get(&t.name) {
                    todo.extend(more.iter().cloned());
                }
            }
        }
        out
    }
}

/// Record in `facts` the relations the values written into `target` may come from.
/// `values`: the expressions written (SET, MERGE's WHEN clauses, an INSERT's query);
/// `from`: the FROM / USING items they may name. A table of `from` counts when a value
/// names it (by alias or name) or names a column without a qualifier; a relation a
/// value reads itself (a subquery) always counts; a CTE is named as a relation here
/// and counts as everything it reads ([`Facts::through_ctes`]). Only conditions that
/// pick rows (WHERE, ON) are left out: they copy no value.
fn note_copy(facts: &mut Facts, target: &protobuf::RangeVar, values: &[&protobuf::Node], from: &[protobuf::Node]) {
    let target = table(target);
    // FROM items by the name a value would qualify a column with. A subquery or a
    // function in FROM may be LATERAL over the other items (`lateral (select p.name)`,
    // `jsonb_each_text(to_jsonb(p))`): what it returns may come from any of them.
    let everything: Vec<TableRef> = from.iter().flat_map(relations_read).collect();
    let mut scope: Vec<(String, Vec<TableRef>)> = Vec::new();
    fn add(n: &protobuf::Node, scope: &mut Vec<(String, Vec<TableRef>)>, everything: &[TableRef]) {
        match n.node.as_ref() {
            Some(NodeEnum::RangeVar(rv)) => {
                let name = rv.alias.as_ref().map_or_else(|| rv.relname.clone(), |a| a.aliasname.clone());
                scope.push((name, vec![table(rv)]));
            }
            Some(NodeEnum::JoinExpr(j)) => {
                for side in [j.larg.as_deref(), j.rarg.as_deref()].into_iter().flatten() {
                    add(side, scope, everything);
                }
                // `(a join b) j`: j names the columns of both sides.
                if let Some(alias) = &j.alias {
                    let mut both = Vec::new();
                    for side in [j.larg.as_deref(), j.rarg.as_deref()].into_iter().flatten() {
                        both.extend(relations_read(side));
                    }
                    scope.push((alias.aliasname.clone(), both));
                }
            }
            // A subquery or a function (under its alias), anything else (under any
            // name): everything.
            other => {
                let alias = match other {
                    Some(NodeEnum::RangeSubselect(r)) => r.alias.as_ref(),
                    Some(NodeEnum::RangeFunction(f)) => f.alias.as_ref(),
                    _ => None,
                };
                scope.push((alias.map(|a| a.aliasname.clone()).unwrap_or_default(), everything.to_vec()));
            }
        }
    }
    for f in from {
        add(f, &mut scope, &everything);
    }
    let mut out: BTreeSet<TableRef> = BTreeSet::new();
    for v in values {
        let mut visit = |n: N<'_>| match n {
            N::RangeVar(rv) => {
                out.insert(table(rv));
            }
            N::ColumnRef(c) => {
                let qualifier = c.fields.len().checked_sub(2).and_then(|i| match c.fields[i].node.as_ref() {
                    Some(NodeEnum::String(q)) => Some(q.sval.as_str()),
                    _ => None,
                });
                for (name, read) in &scope {
                    if qualifier.is_none_or(|q| q == name) || name.is_empty() {
                        out.extend(read.iter().cloned());
                    }
                }
            }
            _ => {}
        };
        let mut w = Walker { visit: &mut visit, depth: 0, too_deep: false };
        w.node(v);
    }
    out.remove(&target);
    if !out.is_empty() {
        facts.copied_into_table.push((target, out));
    }
}

/// PostgreSQL's system columns: every table has them, no user column has their names.
const SYSTEM_COLUMNS: &[&str] = &["ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"];

/// The column references of some conditions, for telling which relations they can
/// refer to: a column counts as a relation's unless it is qualified by the name of
/// another relation (of the FROM/USING list or of a subquery in the conditions).
struct Mentions {
    /// Relation names and aliases in scope somewhere in the conditions.
    names: BTreeSet<String>,
    /// The qualifiers the column references use (`p` of `p.id`).
    qualifiers: BTreeSet<String>,
    /// Some column reference is unqualified (or CURRENT OF): it could be anyone's.
    unqualified: bool,
}

impl Mentions {
    fn of(conds: &[&protobuf::Node], from: &[protobuf::Node]) -> Self {
        let mut m = Mentions { names: BTreeSet::new(), qualifiers: BTreeSet::new(), unqualified: false };
        let mut visit = |n: N<'_>| match n {
            N::Alias(a) => {
                m.names.insert(a.aliasname.clone());
            }
            N::RangeVar(rv) if rv.alias.is_none() => {
                m.names.insert(rv.relname.clone());
            }
            // WHERE CURRENT OF c: the cursor's row.
            N::CurrentOfExpr(_) => m.unqualified = true,
            // A system column (`ctid IS NOT NULL`, `tableoid > 0`) holds for every row
            // alike as far as a workload's intent goes: it picks no rows by their data.
            N::ColumnRef(c)
                if c.fields.last().is_some_and(|f| matches!(f.node.as_ref(), Some(NodeEnum::String(s)) if SYSTEM_COLUMNS.contains(&s.sval.as_str()))) => {}
            N::ColumnRef(c) => match c.fields.len().checked_sub(2).map(|i| c.fields[i].node.as_ref()) {
                Some(Some(NodeEnum::String(q))) => {
                    m.qualifiers.insert(q.sval.clone());
                }
                // A bare `*` (`EXISTS (SELECT * FROM t)`) names no column.
                None if matches!(c.fields.as_slice(), [f] if matches!(f.node, Some(NodeEnum::AStar(_)))) => {}
                _ => m.unqualified = true,
            },
            _ => {}
        };
        let mut w = Walker { visit: &mut visit, depth: 0, too_deep: false };
        from.iter().for_each(|o| w.node(o));
        conds.iter().for_each(|c| w.node(c));
        m
    }

    /// Whether a column of the relation called `own` (its alias, or its name) may be
    /// referred to: unqualified, qualified by `own`, or by a name that is no
    /// relation's (`addr.city`: a field of a composite column).
    fn may_refer_to(&self, own: &str) -> bool {
        self.unqualified || self.qualifiers.contains(own) || self.qualifiers.iter().any(|q| !self.names.contains(q))
    }
}

/// The name a relation's columns are qualified with: its alias, or its name.
fn own_name(rv: &protobuf::RangeVar) -> &str {
    rv.alias.as_ref().map_or(rv.relname.as_str(), |a| a.aliasname.as_str())
}

/// Whether a DELETE/UPDATE/MERGE condition picks target rows: false when it is
/// always true, and false too when it refers to columns of other relations only
/// (`DELETE FROM labs USING other o WHERE o.id = 1`, an uncorrelated `EXISTS (SELECT
/// 1 FROM other o WHERE o.flag)`): such a condition is the same for every target row
/// and keeps all of them or none (see [`Mentions`]).
fn filters_target(cond: &protobuf::Node, target: &protobuf::RangeVar, others: &[protobuf::Node], facts: &mut Facts) -> bool {
    limits(cond, own_name(target), others, facts)
}

/// Whether a condition may pick rows of the relation known as `own`: not when it is
/// always true, nor when it refers to no column of that relation. An OR picks only if
/// each of its branches does (`id = 5 OR o.flag` keeps every row when o.flag holds),
/// an AND if any does; NOT and the boolean tests turn one into the other (`NOT (id <>
/// 5 AND o.x)` is `id = 5 OR NOT o.x`).
fn limits(cond: &protobuf::Node, own: &str, from: &[protobuf::Node], facts: &mut Facts) -> bool {
    limits_as(cond, false, own, from, facts)
}

/// [`limits`] of `cond`, or of `NOT cond` when `negated`.
fn limits_as(cond: &protobuf::Node, negated: bool, own: &str, from: &[protobuf::Node], facts: &mut Facts) -> bool {
    if if negated { always_false(cond, facts) } else { always_true(cond, facts) } {
        return false;
    }
    if row_independent(cond) {
        // Not always true, so provably false (`1 = 2`): it keeps no row.
        return true;
    }
    match cond.node.as_ref() {
        Some(NodeEnum::BoolExpr(b)) => match protobuf::BoolExprType::try_from(b.boolop) {
            // NOT (a OR b) is NOT a AND NOT b.
            Ok(protobuf::BoolExprType::OrExpr) if !negated => return b.args.iter().all(|a| limits_as(a, false, own, from, facts)),
            Ok(protobuf::BoolExprType::OrExpr) => return b.args.iter().any(|a| limits_as(a, true, own, from, facts)),
            Ok(protobuf::BoolExprType::AndExpr) if !negated => return b.args.iter().any(|a| limits_as(a, false, own, from, facts)),
            Ok(protobuf::BoolExprType::AndExpr) => return b.args.iter().all(|a| limits_as(a, true, own, from, facts)),
            Ok(protobuf::BoolExprType::NotExpr) => {
                if let Some(a) = b.args.first() {
                    return limits_as(a, !negated, own, from, facts);
                }
            }
            _ => {}
        },
        Some(NodeEnum::BooleanTest(t)) => {
            let flip = matches!(protobuf::BoolTestType::try_from(t.booltesttype), Ok(protobuf::BoolTestType::IsFalse | protobuf::BoolTestType::IsNotTrue));
            if let Some(a) = t.arg.as_deref() {
                return limits_as(a, negated ^ flip, own, from, facts);
            }
        }
        _ => {}
    }
    Mentions::of(&[cond], from).may_refer_to(own)
}

/// The ON conditions of the joins in a FROM list. Returns whether a join is USING
/// (cols) or NATURAL: those compare columns by bare name, which may be anyone's.
fn join_quals<'a>(items: &'a [protobuf::Node], out: &mut Vec<&'a protobuf::Node>) -> bool {
    let mut by_name = false;
    for item in items {
        if let Some(NodeEnum::JoinExpr(j)) = item.node.as_ref() {
            out.extend(j.quals.as_deref());
            by_name |= j.is_natural || !j.using_clause.is_empty();
            for side in [j.larg.as_deref(), j.rarg.as_deref()].into_iter().flatten() {
                by_name |= join_quals(std::slice::from_ref(side), out);
            }
        }
    }
    by_name
}

/// file_fdw's `filename` and `program` options make a foreign table a COPY FROM a
/// file or a program on the database server (`OPTIONS (program 'id')`), read each
/// time the table is.
fn foreign_table_options(options: &[protobuf::Node], facts: &mut Facts) {
    for o in options {
        if let Some(NodeEnum::DefElem(d)) = o.node.as_ref() {
            let target = match d.defname.as_str() {
                "program" => CopyTarget::Program,
                "filename" => CopyTarget::File,
                _ => continue,
            };
            facts.copy = Some(CopyFacts { to: false, target });
        }
    }
}

/// The name of a schema or database as a DROP, ALTER … OWNER or COMMENT names it.
fn object_name(o: &protobuf::Node) -> Option<String> {
    match o.node.as_ref() {
        Some(NodeEnum::String(s)) => Some(s.sval.clone()),
        _ => None,
    }
}

/// The relation an object named in a DROP, COMMENT or SECURITY LABEL is, or belongs
/// to: a table, view, sequence or index by its own name; a column, constraint,
/// policy, trigger or rule (`DROP POLICY p ON patients`) by the name without its last
/// part.
fn relation_of_object(ty: ObjectType, o: &protobuf::Node) -> Option<TableRef> {
    let mut parts = match o.node.as_ref() {
        Some(NodeEnum::List(l)) => name_list(&l.items),
        Some(NodeEnum::String(s)) => vec![s.sval.clone()],
        _ => return None,
    };
    match ty {
        ObjectType::ObjectTable
        | ObjectType::ObjectView
        | ObjectType::ObjectMatview
        | ObjectType::ObjectForeignTable
        | ObjectType::ObjectSequence
        | ObjectType::ObjectIndex => {}
        ObjectType::ObjectColumn | ObjectType::ObjectTabconstraint | ObjectType::ObjectPolicy | ObjectType::ObjectTrigger | ObjectType::ObjectRule => {
            parts.pop();
        }
        _ => return None,
    }
    qualified(parts)
}

/// The relation of a COMMENT's or SECURITY LABEL's object is altered.
fn altered_object(facts: &mut Facts, objtype: i32, object: Option<&protobuf::Node>) {
    let ty = ObjectType::try_from(objtype).unwrap_or(ObjectType::Undefined);
    if let Some(t) = object.and_then(|o| relation_of_object(ty, o)) {
        facts.tables.insert(t.clone());
        facts.ddl.push((DdlVerb::Alter, t));
    }
}

/// These relations are altered (`baseline.alter-phi` when one is a PHI table).
fn altered<'a>(facts: &mut Facts, relations: impl IntoIterator<Item = &'a protobuf::RangeVar>) {
    facts.ddl.extend(relations.into_iter().map(|rv| (DdlVerb::Alter, table(rv))));
}

/// The relations of a list of RangeVar nodes.
fn range_vars(items: &[protobuf::Node]) -> impl Iterator<Item = &protobuf::RangeVar> {
    items.iter().filter_map(|n| match n.node.as_ref() {
        Some(NodeEnum::RangeVar(rv)) => Some(rv),
        _ => None,
    })
}

/// PostgreSQL's ShareLock: this mode and the stronger ones block writes.
const LOCK_MODE_SHARE: i32 = 5;

/// The INTO of a SELECT, or of a set operation (its leftmost arm's).
fn leftmost_into(s: &protobuf::SelectStmt) -> Option<&protobuf::IntoClause> {
    let mut at = s;
    loop {
        if let Some(into) = at.into_clause.as_deref() {
            return Some(into);
        }
        at = at.larg.as_deref()?;
    }
}

/// The statement without the INTO [`leftmost_into`] found.
fn without_into(s: &protobuf::SelectStmt) -> protobuf::SelectStmt {
    let mut query = s.clone();
    let mut at = &mut query;
    loop {
        if at.into_clause.take().is_some() {
            break;
        }
        match at.larg.as_deref_mut() {
            Some(l) => at = l,
            None => break,
        }
    }
    query
}

/// An optional node as a list of none or one.
fn optional(n: Option<&protobuf::Node>) -> &[protobuf::Node] {
    n.map(std::slice::from_ref).unwrap_or_default()
}

/// Relations directly in a FROM list (through joins, not subqueries).
fn from_relations<'a>(items: &'a [protobuf::Node], out: &mut Vec<&'a protobuf::RangeVar>) {
    for item in items {
        match item.node.as_ref() {
            Some(NodeEnum::RangeVar(rv)) => out.push(rv),
            // `patients TABLESAMPLE SYSTEM (100)` reads the table like a plain reference.
            Some(NodeEnum::RangeTableSample(t)) => from_relations(optional(t.relation.as_deref()), out),
            Some(NodeEnum::JoinExpr(j)) => {
                for side in [j.larg.as_deref(), j.rarg.as_deref()].into_iter().flatten() {
                    from_relations(std::slice::from_ref(side), out);
                }
            }
            _ => {}
        }
    }
}

fn only_aggregates(s: &protobuf::SelectStmt) -> bool {
    !s.target_list.is_empty()
        && s.group_clause.is_empty()
        && s.target_list.iter().all(|t| match t.node.as_ref() {
            Some(NodeEnum::ResTarget(r)) => match r.val.as_deref().and_then(|v| v.node.as_ref()) {
                Some(NodeEnum::FuncCall(f)) => name_list(&f.funcname).last().is_some_and(|n| AGGREGATES.contains(&n.as_str())) && f.over.is_none(),
                _ => false,
            },
            _ => false,
        })
}

/// `per_row`: the SELECT levels (by address) that run once per row of an outer level
/// and return its values — LATERAL subqueries, scalar and ARRAY subqueries — noted
/// when their parent is visited (the walk is pre-order).
fn visit(n: N<'_>, facts: &mut Facts, per_row: &mut HashSet<*const protobuf::SelectStmt>) {
    let mut note = |q: Option<&protobuf::Node>| {
        if let Some(NodeEnum::SelectStmt(s)) = q.and_then(|q| q.node.as_ref()) {
            per_row.insert(std::ptr::from_ref(&**s));
        }
    };
    match n {
        N::RangeSubselect(r) if r.lateral => note(r.subquery.as_deref()),
        N::SubLink(l)
            if matches!(
                protobuf::SubLinkType::try_from(l.sub_link_type),
                Ok(protobuf::SubLinkType::ExprSublink | protobuf::SubLinkType::ArraySublink | protobuf::SubLinkType::MultiexprSublink)
            ) =>
        {
            note(l.subselect.as_deref())
        }
        _ => {}
    }
    match n {
        N::RangeVar(rv) => {
            facts.tables.insert(table(rv));
        }
        N::SelectStmt(s) => {
            // Every level inside one that runs once per outer row (a FROM subquery, a
            // CTE, an arm of a set operation) runs once per outer row too, and may use
            // the outer values: its LIMIT bounds nothing either.
            if per_row.contains(&std::ptr::from_ref(s)) {
                let mut inner = |n: N<'_>| {
                    if let N::SelectStmt(x) = n {
                        per_row.insert(std::ptr::from_ref(x));
                    }
                };
                let mut w = Walker { visit: &mut inner, depth: 0, too_deep: false };
                w.select_stmt_children(s);
            }
            let mut rels = Vec::new();
            from_relations(&s.from_clause, &mut rels);
            // `WHERE true` or `WHERE id = id` bounds nothing, and neither does a WHERE
            // that refers to no column of a relation (`FROM patients p, labs l WHERE
            // l.id = 1`, an uncorrelated EXISTS): it keeps all of that relation's rows
            // or none. The joins' ON conditions count with the WHERE.
            let rels: Vec<&protobuf::RangeVar> = match s.where_clause.as_deref() {
                None => rels,
                Some(w) if always_true(w, facts) => rels,
                // Not always true, so provably false (`1 = 2`): no row.
                Some(w) if row_independent(w) => Vec::new(),
                Some(w) => {
                    let mut conds = vec![w];
                    let by_name = join_quals(&s.from_clause, &mut conds);
                    rels.into_iter().filter(|rv| !by_name && !conds.iter().any(|c| limits(c, own_name(rv), &s.from_clause, facts))).collect()
                }
            };
            if !rels.is_empty() && !only_aggregates(s) {
                // `FETCH FIRST n ROWS WITH TIES` also returns every row that ties with
                // the n-th: ordered by a constant, that is all of them. It bounds nothing.
                let with_ties = protobuf::LimitOption::try_from(s.limit_option) == Ok(protobuf::LimitOption::WithTies);
                // Nor does the LIMIT of a level run once per row of an outer level whose
                // values it returns (LATERAL, a scalar or ARRAY subquery): `OFFSET g
                // LIMIT 1` or `ORDER BY abs(id - g) LIMIT 1` takes another row for each
                // g, all of them in the end.
                let runs_per_row = per_row.contains(&std::ptr::from_ref(s));
                let limit = match s.limit_count.as_deref() {
                    None => None,
                    Some(_) if with_ties || runs_per_row => None,
                    Some(l) => {
                        facts.literal_sensitive = true;
                        match const_value(l) {
                            Some(Val::Ival(i)) => Some(i64::from(i.ival)),
                            Some(Val::Fval(f)) => f.fval.parse::<i64>().ok(),
                            // LIMIT ALL, NULL, a parameter or an expression: unbounded.
                            _ => None,
                        }
                    }
                };
                for r in rels {
                    facts.unbounded_reads.push((table(r), limit));
                }
            }
            // PostgreSQL takes the leftmost arm's INTO for a whole UNION / INTERSECT /
            // EXCEPT: the new table gets every arm's rows.
            if let Some(into) = leftmost_into(s) {
                if let Some(rel) = into.rel.as_ref() {
                    facts.writes.insert(table(rel));
                }
                facts.kinds.insert(Kind::Create);
                facts.creates_relation = true;
                // The query is the statement without its INTO target.
                let query = without_into(s);
                facts.copied_into_new_relation.extend(relations_read(&protobuf::Node { node: Some(NodeEnum::SelectStmt(Box::new(query))) }));
            }
        }
        N::InsertStmt(i) => {
            facts.kinds.insert(Kind::Insert);
            if let Some(r) = i.relation.as_ref() {
                facts.writes.insert(table(r));
                // The query's rows are the values (its WHERE may as well pick them:
                // counted too); ON CONFLICT's SET may read through subqueries.
                let mut values: Vec<&protobuf::Node> = i.select_stmt.as_deref().into_iter().collect();
                values.extend(i.on_conflict_clause.as_deref().into_iter().flat_map(|c| &c.target_list));
                note_copy(facts, r, &values, &[]);
            }
        }
        N::UpdateStmt(u) => {
            facts.kinds.insert(Kind::Update);
            if let Some(r) = u.relation.as_ref() {
                facts.writes.insert(table(r));
                // pg_settings has a rule turning an UPDATE into set_config(name,
                // setting): like set_config() of a setting phigate cannot pin down
                // (role and session_authorization are not in the view).
                if r.relname == "pg_settings" && matches!(r.schemaname.as_str(), "" | "pg_catalog") {
                    facts.changes_parser = true;
                }
                if u.where_clause.as_deref().is_none_or(|w| !filters_target(w, r, &u.from_clause, facts)) {
                    facts.unfiltered_writes.push(table(r));
                }
                let values: Vec<&protobuf::Node> = u.target_list.iter().collect();
                note_copy(facts, r, &values, &u.from_clause);
            }
        }
        N::DeleteStmt(d) => {
            facts.kinds.insert(Kind::Delete);
            if let Some(r) = d.relation.as_ref() {
                facts.writes.insert(table(r));
                if d.where_clause.as_deref().is_none_or(|w| !filters_target(w, r, &d.using_clause, facts)) {
                    facts.unfiltered_writes.push(table(r));
                }
            }
        }
        N::MergeStmt(m) => {
            facts.kinds.insert(Kind::Merge);
            if let Some(r) = m.relation.as_ref() {
                // What each WHEN clause writes (SET targets, INSERT values); its
                // AND condition only picks rows.
                let values: Vec<&protobuf::Node> = m
                    .merge_when_clauses
                    .iter()
                    .flat_map(|c| match c.node.as_ref() {
                        Some(NodeEnum::MergeWhenClause(w)) => w.target_list.iter().chain(&w.values).collect(),
                        _ => vec![c],
                    })
                    .collect();
                note_copy(facts, r, &values, m.source_relation.as_deref().map(std::slice::from_ref).unwrap_or_default());
            }
            // Each WHEN clause's action is a statement of its own kind: a MERGE that
            // deletes is a DELETE for rules naming kinds, like a DELETE in a CTE.
            for c in &m.merge_when_clauses {
                if let Some(NodeEnum::MergeWhenClause(w)) = c.node.as_ref() {
                    let kind = match protobuf::CmdType::try_from(w.command_type) {
                        Ok(protobuf::CmdType::CmdInsert) => Some(Kind::Insert),
                        Ok(protobuf::CmdType::CmdUpdate) => Some(Kind::Update),
                        Ok(protobuf::CmdType::CmdDelete) => Some(Kind::Delete),
                        _ => None,
                    };
                    facts.kinds.extend(kind);
                }
            }
            if let Some(r) = m.relation.as_ref() {
                facts.writes.insert(table(r));
                // `MERGE … ON true WHEN MATCHED THEN DELETE/UPDATE` touches every row:
                // a WHEN MATCHED clause that deletes or updates touches the rows its
                // ON and its own condition pick, so every row when neither limits
                // the target (`ON o.id = 1 WHEN MATCHED AND o.flag`).
                let source = optional(m.source_relation.as_deref());
                let on_limits = m.join_condition.as_deref().is_some_and(|j| filters_target(j, r, source, facts));
                let unfiltered = !on_limits
                    && m.merge_when_clauses.iter().any(|c| match c.node.as_ref() {
                        Some(NodeEnum::MergeWhenClause(w)) => {
                            protobuf::MergeMatchKind::try_from(w.match_kind) == Ok(protobuf::MergeMatchKind::MergeWhenMatched)
                                && matches!(protobuf::CmdType::try_from(w.command_type), Ok(protobuf::CmdType::CmdDelete | protobuf::CmdType::CmdUpdate))
                                && w.condition.as_deref().is_none_or(|c| !filters_target(c, r, source, facts))
                        }
                        _ => false,
                    });
                if unfiltered {
                    facts.unfiltered_writes.push(table(r));
                }
            }
            // The source is read like a SELECT level whose WHERE is the join condition,
            // except that WHEN NOT MATCHED [BY TARGET] takes every source row the join
            // does not match: with such a clause (and no condition of its own limiting
            // it) the whole source is read, and can be inserted or returned.
            let mut sources = Vec::new();
            from_relations(optional(m.source_relation.as_deref()), &mut sources);
            if !sources.is_empty() {
                let join_all = m.join_condition.as_deref().is_none_or(|j| always_true(j, facts));
                let mut reads_all = false;
                for c in &m.merge_when_clauses {
                    let Some(NodeEnum::MergeWhenClause(w)) = c.node.as_ref() else { continue };
                    let unconditional = w.condition.as_deref().is_none_or(|c| always_true(c, facts));
                    reads_all |= unconditional
                        && match protobuf::MergeMatchKind::try_from(w.match_kind) {
                            Ok(protobuf::MergeMatchKind::MergeWhenNotMatchedByTarget) => true,
                            Ok(protobuf::MergeMatchKind::MergeWhenMatched) => join_all,
                            _ => false,
                        };
                }
                if reads_all {
                    facts.unbounded_reads.extend(sources.into_iter().map(|t| (table(t), None)));
                }
            }
        }
        N::CopyStmt(c) => {
            let target = if c.is_program {
                CopyTarget::Program
            } else if c.filename.is_empty() {
                CopyTarget::Client
            } else {
                CopyTarget::File
            };
            facts.copy = Some(CopyFacts { to: !c.is_from, target });
            if let Some(r) = c.relation.as_ref() {
                if c.is_from {
                    facts.writes.insert(table(r));
                    // COPY … FROM inserts rows: a rule naming INSERT (a read-only
                    // rule) covers it, as it covers an INSERT in a CTE.
                    facts.kinds.insert(Kind::Insert);
                }
                if !c.is_from {
                    // COPY table TO: the whole table is read.
                    facts.unbounded_reads.push((table(r), None));
                }
            }
        }
        N::TruncateStmt(t) => {
            facts.truncate_cascades |= t.behavior == protobuf::DropBehavior::DropCascade as i32;
            for rv in range_vars(&t.relations) {
                facts.writes.insert(table(rv));
                facts.ddl.push((DdlVerb::Truncate, table(rv)));
            }
        }
        N::DropStmt(d) => {
            facts.drop_cascades |= d.behavior == protobuf::DropBehavior::DropCascade as i32;
            let ty = ObjectType::try_from(d.remove_type).unwrap_or(ObjectType::Undefined);
            for o in &d.objects {
                if ty == ObjectType::ObjectSchema {
                    facts.dropped_schemas.extend(object_name(o));
                } else if let Some(t) = relation_of_object(ty, o) {
                    facts.tables.insert(t.clone());
                    facts.ddl.push((DdlVerb::Drop, t));
                }
            }
        }
        N::AlterTableStmt(a) => {
            altered(facts, a.relation.as_ref());
            // Whatever the statement calls the relation: ALTER TABLE changes a foreign
            // table's OPTIONS as ALTER FOREIGN TABLE does.
            for c in &a.cmds {
                if let Some(NodeEnum::AlterTableCmd(cmd)) = c.node.as_ref() {
                    if let Some(NodeEnum::List(l)) = cmd.def.as_deref().and_then(|d| d.node.as_ref()) {
                        foreign_table_options(&l.items, facts);
                    }
                }
            }
        }
        N::CreateForeignTableStmt(f) => {
            facts.foreign_data = true;
            foreign_table_options(&f.options, facts)
        }
        // Row-level security on a PHI table: a new permissive policy is ORed with the
        // others (`USING (true)` opens every row) and an altered one can say anything,
        // so either is like dropping a policy on the table.
        N::CreatePolicyStmt(p) => altered(facts, p.table.as_ref()),
        N::AlterPolicyStmt(p) => altered(facts, p.table.as_ref()),
        // ATTACH/DETACH PARTITION moves a table under another parent or out of one:
        // its rows are then read by a name that is not the PHI table's.
        N::PartitionCmd(c) => altered(facts, c.name.as_ref()),
        // `CREATE TABLE p2 PARTITION OF patients`: PHI rows are then stored, and read,
        // under the new partition's name.
        N::CreateStmt(c) if c.partbound.is_some() => altered(facts, range_vars(&c.inh_relations)),
        N::RenameStmt(r) => {
            altered(facts, r.relation.as_ref());
            match ObjectType::try_from(r.rename_type) {
                Ok(ObjectType::ObjectRole) => facts.role_ddl = true,
                Ok(ObjectType::ObjectSchema) => facts.altered_schemas.push((r.subname.clone(), Handover::Rename)),
                Ok(ObjectType::ObjectDatabase) => facts.altered_database = Some(Handover::Rename),
                _ => {}
            }
        }
        // A schema's owner may drop or rename every table in it, a database's owner may
        // drop the database: handing either to another role hands it the PHI tables,
        // for use through any connection phigate does not see.
        N::AlterOwnerStmt(a) => match ObjectType::try_from(a.object_type) {
            Ok(ObjectType::ObjectSchema) => facts.altered_schemas.extend(a.object.as_deref().into_iter().flat_map(object_name).map(|s| (s, Handover::Owner))),
            Ok(ObjectType::ObjectDatabase) => facts.altered_database = Some(Handover::Owner),
            _ => {}
        },
        // Indexes and extended statistics change how a PHI table is stored and what the
        // catalog keeps of its values (a unique index answers whether a value exists; a
        // statistics object's MCV list holds its commonest values); CREATE INDEX
        // without CONCURRENTLY also holds it locked against writers while it builds.
        N::IndexStmt(i) => altered(facts, i.relation.as_ref()),
        N::CreateStatsStmt(c) => altered(facts, range_vars(&c.relations)),
        // A comment is stored text about the table anyone may read (obj_description);
        // a security label is access control (sepgsql).
        N::CommentStmt(c) => altered_object(facts, c.objtype, c.object.as_deref()),
        N::SecLabelStmt(l) => altered_object(facts, l.objtype, l.object.as_deref()),
        // Statements that hold a PHI table locked against its clinical writers (or
        // readers) while they run: LOCK in SHARE mode or stronger (ACCESS EXCLUSIVE
        // by default), and the rewrites CLUSTER, VACUUM FULL, REINDEX TABLE.
        N::LockStmt(l) if l.mode >= LOCK_MODE_SHARE => altered(facts, range_vars(&l.relations)),
        N::ClusterStmt(c) => altered(facts, c.relation.as_ref()),
        N::VacuumStmt(v) => {
            let full = v.options.iter().any(|o| matches!(o.node.as_ref(), Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case("full") && d.arg.as_deref().and_then(const_bool) != Some(false)));
            if full {
                altered(
                    facts,
                    v.rels.iter().filter_map(|r| match r.node.as_ref() {
                        Some(NodeEnum::VacuumRelation(vr)) => vr.relation.as_ref(),
                        _ => None,
                    }),
                );
            }
        }
        N::ReindexStmt(r) if protobuf::ReindexObjectType::try_from(r.kind) == Ok(protobuf::ReindexObjectType::ReindexObjectTable) => {
            altered(facts, r.relation.as_ref())
        }
        N::AlterTableMoveAllStmt(m) => {
            facts.moves_all_tables |= matches!(ObjectType::try_from(m.objtype), Ok(ObjectType::ObjectTable | ObjectType::ObjectMatview));
        }
        N::AlterObjectSchemaStmt(a) => altered(facts, a.relation.as_ref()),
        N::CreateTableAsStmt(c) => {
            facts.kinds.insert(Kind::Create);
            facts.creates_relation = true;
            if matches!(c.query.as_deref().and_then(|q| q.node.as_ref()), Some(NodeEnum::ExecuteStmt(_))) {
                facts.creates_relation_from_execute = true;
            }
            if let Some(rel) = c.into.as_ref().and_then(|i| i.rel.as_ref()) {
                facts.writes.insert(table(rel));
            }
            if let Some(q) = c.query.as_deref() {
                facts.copied_into_new_relation.extend(relations_read(q));
            }
        }
        N::ViewStmt(v) => {
            facts.kinds.insert(Kind::Create);
            facts.creates_relation = true;
            if let Some(rel) = v.view.as_ref() {
                facts.writes.insert(table(rel));
            }
            if let Some(q) = v.query.as_deref() {
                let read = relations_read(q);
                // A view over pg_settings is updatable into it, and its rule calls
                // set_config(): an UPDATE of the view changes any setting.
                if read.iter().any(|t| t.name == "pg_settings" && t.schema.as_deref().is_none_or(|s| s == "pg_catalog")) {
                    facts.changes_parser = true;
                }
                facts.copied_into_new_relation.extend(read);
            }
        }
        N::DropdbStmt(_) => facts.drops_database = true,
        N::CommonTableExpr(cte) => {
            let read = cte.ctequery.as_deref().map(relations_read).unwrap_or_default();
            facts.ctes.entry(cte.ctename.clone()).or_default().extend(read);
        }
        N::FuncCall(f) => {
            let names = name_list(&f.funcname);
            if let Some(name) = names.last() {
                let name = name.to_ascii_lowercase();
                // The arguments a function stores where any session reads them back:
                // a setting's or notification's value (not its name), a large object's
                // OID, offset and data, a sequence's value and is_called flag, an
                // advisory lock's keys (pg_locks shows them).
                let stored_from = match name.as_str() {
                    "set_config" | "pg_notify" | "setval" | "lowrite" => Some(1),
                    "lo_from_bytea" | "lo_put" | "lo_create" | "pg_advisory_lock" | "pg_advisory_lock_shared" | "pg_try_advisory_lock" | "pg_try_advisory_lock_shared" | "pg_advisory_xact_lock"
                    | "pg_advisory_xact_lock_shared" | "pg_try_advisory_xact_lock" | "pg_try_advisory_xact_lock_shared" => Some(0),
                    _ => None,
                };
                if stored_from.is_some_and(|from| f.args.iter().skip(from).any(|v| const_value(v).is_none())) {
                    facts.stores_computed_value = true;
                }
                if name == "set_config" {
                    facts.literal_sensitive = true;
                    let setting = lowercase_string(f.args.first());
                    if setting.as_deref().is_some_and(|name| setting_weakens_safeguards(name, Some(&setting_text(f.args.get(1))))) {
                        facts.weakens_safeguards = true;
                    }
                    match setting.as_deref() {
                        Some("role" | "session_authorization") => facts.changes_role = true,
                        Some("standard_conforming_strings" | "backslash_quote") => facts.changes_parser = true,
                        Some("client_encoding") => {
                            let value = lowercase_string(f.args.get(1));
                            if value.as_deref().is_none_or(unsafe_client_encoding) {
                                facts.changes_parser = true;
                            }
                        }
                        Some(_) => {}
                        // A computed setting name could be anything: treat as the worst.
                        None => facts.changes_role = true,
                    }
                }
                facts.functions.insert(name);
            }
        }
        // `(x).f` is PostgreSQL's column notation: when x has no field f it calls f(x)
        // (`('/etc/passwd'::text).pg_read_file`). Each name selected may be a call.
        N::AIndirection(a) => {
            for i in &a.indirection {
                if let Some(NodeEnum::String(s)) = i.node.as_ref() {
                    facts.functions.insert(s.sval.to_ascii_lowercase());
                }
            }
        }
        N::VariableSetStmt(v) => {
            let name = v.name.to_ascii_lowercase();
            let setting = VariableSetKind::try_from(v.kind).unwrap_or(VariableSetKind::Undefined);
            let sets = matches!(setting, VariableSetKind::VarSetValue | VariableSetKind::VarSetDefault | VariableSetKind::VarSetCurrent);
            let value = match setting {
                VariableSetKind::VarSetValue => Some(setting_text(v.args.first())),
                // FROM CURRENT: whatever the session has, which may be anything.
                VariableSetKind::VarSetCurrent => Some("?".to_string()),
                _ => None,
            };
            if setting_weakens_safeguards(&name, value.as_deref()) {
                facts.weakens_safeguards = true;
            }
            match name.as_str() {
                "role" | "session_authorization" if sets => facts.changes_role = true,
                "standard_conforming_strings" | "backslash_quote" => facts.changes_parser = true,
                "client_encoding" | "names" => {
                    facts.literal_sensitive = true;
                    let value = lowercase_string(v.args.first());
                    if sets && value.as_deref().is_none_or(unsafe_client_encoding) {
                        facts.changes_parser = true;
                    }
                }
                _ => {}
            }
        }
        N::AlterSystemStmt(_) => facts.alter_system = true,
        N::CreateRoleStmt(_)
        | N::AlterRoleStmt(_)
        | N::AlterRoleSetStmt(_)
        | N::DropRoleStmt(_)
        | N::GrantRoleStmt(_)
        | N::AlterDatabaseSetStmt(_)
        | N::DropOwnedStmt(_)
        | N::ReassignOwnedStmt(_) => facts.role_ddl = true,
        N::GrantStmt(_) | N::AlterDefaultPrivilegesStmt(_) => facts.grants = true,
        N::DoStmt(_)
        | N::CreateFunctionStmt(_)
        | N::CreateTrigStmt(_)
        | N::RuleStmt(_)
        | N::LoadStmt(_)
        | N::CreateExtensionStmt(_)
        // ALTER EXTENSION … UPDATE runs the extension's update scripts.
        | N::AlterExtensionStmt(_)
        | N::AlterExtensionContentsStmt(_)
        | N::CreateEventTrigStmt(_)
        // These name existing functions without calling them, to be called later under
        // another name or implicitly: an aggregate's state function (`sfunc =
        // set_config`), an operator's (`function = pg_read_file`), a cast's, an
        // operator class's support functions, a conversion, a language's handler, an
        // access method's, a transform's, a type's input/output functions. Calls
        // through them never show the function's own name.
        | N::CreateCastStmt(_)
        | N::CreateConversionStmt(_)
        | N::CreateOpClassStmt(_)
        | N::AlterOpFamilyStmt(_)
        | N::AlterOperatorStmt(_)
        | N::CreatePlangStmt(_)
        | N::CreateAmStmt(_)
        | N::CreateTransformStmt(_)
        | N::AlterTypeStmt(_) => facts.opaque_code = true,
        N::DefineStmt(d) => {
            let kind = ObjectType::try_from(d.kind).unwrap_or(ObjectType::Undefined);
            // Collations and text search dictionaries and configurations name no
            // function; a shell type (`CREATE TYPE t`) has no definition.
            let names_functions = match kind {
                ObjectType::ObjectCollation | ObjectType::ObjectTsdictionary | ObjectType::ObjectTsconfiguration => false,
                ObjectType::ObjectType => !d.definition.is_empty(),
                _ => true,
            };
            facts.opaque_code |= names_functions;
        }
        // A foreign server (postgres_fdw and the like) is a way out of the database,
        // as dblink is: `INSERT INTO remote_table SELECT … FROM patients`.
        N::CreateFdwStmt(_)
        | N::AlterFdwStmt(_)
        | N::CreateForeignServerStmt(_)
        | N::AlterForeignServerStmt(_)
        | N::CreateUserMappingStmt(_)
        | N::AlterUserMappingStmt(_)
        | N::ImportForeignSchemaStmt(_)
        // Logical replication: a publication lets a subscriber elsewhere copy tables,
        // a subscription connects out.
        | N::CreatePublicationStmt(_)
        | N::AlterPublicationStmt(_)
        | N::CreateSubscriptionStmt(_)
        | N::AlterSubscriptionStmt(_) => facts.foreign_data = true,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Facts {
        let a = analyze(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(a.statements.len(), 1, "{sql}");
        a.statements.into_iter().next().unwrap()
    }

    fn t(s: &str) -> TableRef {
        match s.split_once('.') {
            Some((a, b)) => TableRef { schema: Some(a.into()), name: b.into() },
            None => TableRef { schema: None, name: s.into() },
        }
    }

    #[test]
    fn finds_tables_through_ctes_subqueries_and_joins() {
        let f = one("with x as (select * from public.patients p join encounters e on e.pid = p.id where p.id = 1) select * from x where exists (select 1 from \"Labs\" l)");
        assert!(f.tables.contains(&t("public.patients")));
        assert!(f.tables.contains(&t("encounters")));
        assert!(f.tables.contains(&t("Labs")), "quoted identifiers keep their case");
    }

    #[test]
    fn unfiltered_writes_are_found_anywhere() {
        assert_eq!(one("delete from patients").unfiltered_writes, vec![t("patients")]);
        assert_eq!(one("DELETE FROM patients WHERE 1=1").unfiltered_writes, vec![t("patients")]);
        assert_eq!(one("update patients set x = 1 where true").unfiltered_writes, vec![t("patients")]);
        assert_eq!(one("update patients set x = 1 where id = id").unfiltered_writes, vec![t("patients")]);
        assert_eq!(one("delete from patients where id = 5 or 'a' = 'a'").unfiltered_writes, vec![t("patients")]);
        assert!(one("delete from patients where id = 5").unfiltered_writes.is_empty());
        assert!(one("delete from patients where 1 = 2").unfiltered_writes.is_empty());
        assert_eq!(one("with gone as (delete from patients returning *) select count(*) from gone").unfiltered_writes, vec![t("patients")]);
    }

    #[test]
    fn unbounded_reads_need_where_or_limit() {
        assert_eq!(one("select * from patients").unbounded_reads, vec![(t("patients"), None)]);
        assert_eq!(one("select * from patients limit 50").unbounded_reads, vec![(t("patients"), Some(50))]);
        assert!(one("select * from patients where id = 1").unbounded_reads.is_empty());
        assert!(one("select count(*) from patients").unbounded_reads.is_empty(), "a single aggregate row");
        assert_eq!(one("select * from (select * from patients) p where p.id = 1").unbounded_reads, vec![(t("patients"), None)], "the inner level is unbounded");
    }

    #[test]
    fn dangerous_settings_and_code() {
        assert!(one("SET ROLE admin").changes_role);
        assert!(one("set session authorization admin").changes_role);
        assert!(!one("reset role").changes_role);
        assert!(one("select set_config('role', 'admin', false)").changes_role);
        assert!(one("select set_config($1, 'x', false)").changes_role, "unknown setting name");
        assert!(!one("select set_config('application_name', 'x', false)").changes_role);
        assert!(one("set standard_conforming_strings = off").changes_parser);
        assert!(one("set client_encoding = 'SJIS'").changes_parser);
        assert!(!one("set client_encoding = 'UTF8'").changes_parser);
        assert!(one("do $$ begin perform 1; end $$").opaque_code);
        assert!(one("create or replace function f() returns int language sql as 'select 1'").opaque_code);
        assert!(one("alter system set work_mem = '1GB'").alter_system);
        assert!(one("create role x").role_ddl);
        assert!(one("grant admin to x").role_ddl);
        assert!(one("grant select on patients to x").grants);
    }

    #[test]
    fn copy_targets() {
        assert_eq!(one("copy patients to stdout").copy, Some(CopyFacts { to: true, target: CopyTarget::Client }));
        assert_eq!(one("copy patients to '/tmp/x'").copy, Some(CopyFacts { to: true, target: CopyTarget::File }));
        assert_eq!(one("copy patients from program 'cat /etc/passwd'").copy, Some(CopyFacts { to: false, target: CopyTarget::Program }));
        assert!(one("copy (select * from patients) to stdout").copy.unwrap().to);
    }

    #[test]
    fn parser_resolves_evasions() {
        assert_eq!(one("/* a /* nested */ comment */ DeLeTe FrOm \"patients\" -- trailing").unfiltered_writes, vec![t("patients")]);
        assert_eq!(one("delete from U&\"p\\0061tients\"").unfiltered_writes, vec![t("patients")]);
        assert!(one("select 'delete from patients' as harmless").unfiltered_writes.is_empty());
        assert!(one("select $q$drop table patients$q$").ddl.is_empty());
    }

    #[test]
    fn every_statement_of_a_multi_statement_string() {
        let a = analyze("select 1; drop table patients; select 2").unwrap();
        assert_eq!(a.statements.len(), 3);
        assert_eq!(a.statements[1].ddl, vec![(DdlVerb::Drop, t("patients"))]);
        assert!(analyze("select from where").is_err());
    }
}

//! Where each output column of a statement comes from, read from its parse tree
//! (pg_query). PostgreSQL's RowDescription names the table and column of plain column
//! references; for computed columns (`upper(ssn)`, `ssn || ''`, `row_to_json(p)`) and
//! for the columns of views it says nothing useful, so masking asks this module which
//! table columns an output is built from.
//!
//! The answer over-approximates on purpose: a column that *might* come from a masked
//! column is treated as if it does (an unqualified name matches that name in every
//! table in scope; a whole-row reference carries every column of its table). Only
//! `count(…)` is exempt, since a count reveals no value. A function call carries its
//! arguments; one that is not a PostgreSQL built-in, and an operator that is not one,
//! is also `opaque` (a function the database's owners wrote may read any table:
//! `get_patient_name(7)`). A function in FROM carries its arguments to every column it
//! returns, and is opaque unless it is one of a few built-ins that only unfold their
//! arguments; other sources phigate cannot see through are opaque too. `p.f` and
//! `(p).f` may be the call `f(p)` (PostgreSQL's column notation) when `p`'s table has
//! no column `f`: such references are kept in [`Sources::qualified`] for masking to
//! check against the catalog. A subquery inside an expression is traced with its own
//! FROM. Masking does not leave opaque columns to the detectors (see `plan_columns`).
//!
//! [`statements`] also says what it cannot trace at all (FETCH, EXECUTE, CALL …: the
//! text does not say what the rows hold), which relations a statement names, and the
//! cursors and prepared statements it defines or drops, so that masking can trace a
//! FETCH or EXECUTE through the query it remembered by name.
//!
//! Pure: SQL text in, sources out. Knows nothing about rules or catalogs.

use std::collections::{BTreeSet, HashMap};

use pg_query::{
    protobuf::{self, Node},
    NodeEnum,
};

/// A relation as written: schema when qualified.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelName {
    pub schema: Option<String>,
    pub name: String,
}

impl std::fmt::Display for RelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// What an output column's value may contain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// Table columns it is computed from.
    pub columns: BTreeSet<(RelName, String)>,
    /// Whole rows (`row_to_json(p)`, `p.*`) of these relations.
    pub whole_rows: BTreeSet<RelName>,
    /// It reads something phigate cannot see through (a function in FROM, …).
    pub opaque: bool,
    /// The entries of `columns` written `alias.column`: if the table has no such
    /// column, PostgreSQL reads it as the function call `column(alias)` (opaque, over
    /// the whole row). Only the catalog can tell which.
    pub qualified: BTreeSet<(RelName, String)>,
    /// Types it is cast to (`x::t`, `CAST(x AS t)`, `t(x)`): a cast the database's
    /// owners made `WITH FUNCTION` runs that function, which may read any table. Only
    /// the catalog can tell which.
    pub casts: BTreeSet<RelName>,
    /// Computed from its sources (a function, an operator, a cast …), not one of
    /// them as it is: a rule's partial, year, zip3 or hash output of a computed value
    /// can be made to show what it hides (pieces, padding, chosen text to hash), so
    /// such values are redacted.
    pub computed: bool,
}

impl Sources {
    pub fn extend(&mut self, o: &Sources) {
        self.columns.extend(o.columns.iter().cloned());
        self.whole_rows.extend(o.whole_rows.iter().cloned());
        self.opaque |= o.opaque;
        self.qualified.extend(o.qualified.iter().cloned());
        self.casts.extend(o.casts.iter().cloned());
        self.computed |= o.computed;
    }

    /// Add the sources of values that may stand in the same place instead of these
    /// (another arm of a set operation, another row of a VALUES list). When the two
    /// differ, the place holds values none of its sources' rules alone describes —
    /// chosen text beside a hashed column would get the pseudonym of that text — so
    /// it counts as computed.
    pub fn extend_alternative(&mut self, o: &Sources) {
        if self.columns != o.columns || self.whole_rows != o.whole_rows {
            self.computed = true;
        }
        self.extend(o);
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty() && self.whole_rows.is_empty() && !self.opaque && self.casts.is_empty()
    }
}

/// One entry of a statement's result: its name as PostgreSQL will report it (for
/// matching RowDescription fields) and its sources. `star` entries (`*`, `p.*`) stand
/// for several result columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub name: String,
    pub star: bool,
    pub sources: Sources,
}

/// The outputs of every statement in `sql` (empty for statements without a result).
pub fn statement_outputs(sql: &str) -> Result<Vec<Vec<Output>>, String> {
    let parsed = crate::sql::parse(sql).map_err(|e| e.to_string())?;
    Ok(parsed.stmts.iter().map(|raw| raw.stmt.as_deref().map(|n| node_outputs(n, &Scope::root())).unwrap_or_default()).collect())
}

/// What phigate can tell about one statement of a query string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Statement {
    /// Its result columns; None when its text does not say what they hold (FETCH,
    /// EXECUTE, CALL, MERGE, any statement this module does not know).
    pub outputs: Option<Vec<Output>>,
    /// Every relation the text names anywhere (tables and views; a CTE's name too,
    /// which only costs a catalog lookup that finds nothing).
    pub reads: BTreeSet<RelName>,
    /// FETCH / EXECUTE: the cursor or prepared statement whose rows it returns.
    pub uses: Option<Named>,
    /// What it does to the session's cursors and prepared statements, if it succeeds.
    pub effect: Option<Effect>,
}

/// A cursor or an SQL-level prepared statement, by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Named {
    Cursor(String),
    Prepared(String),
}

/// A change to the session's named cursors and prepared statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// DECLARE / PREPARE: `hold` for cursors that outlive their transaction (WITH HOLD;
    /// prepared statements always do).
    Define { name: Named, hold: bool, query: Box<Statement> },
    /// CLOSE / DEALLOCATE of one name.
    Forget(Named),
    /// CLOSE ALL, DEALLOCATE ALL, DISCARD.
    ForgetAll { cursors: bool, prepared: bool },
}

/// `CURSOR_OPT_HOLD` of PostgreSQL's parsenodes.h.
const CURSOR_OPT_HOLD: i32 = 0x0020;

/// What phigate can tell about each statement of `sql`.
pub fn statements(sql: &str) -> Result<Vec<Statement>, String> {
    let parsed = crate::sql::parse(sql).map_err(|e| e.to_string())?;
    Ok(parsed.stmts.iter().map(|raw| raw.stmt.as_deref().map(statement).unwrap_or_default()).collect())
}

fn statement(n: &Node) -> Statement {
    let mut st = Statement { reads: relations_named(n), ..Statement::default() };
    st.outputs = match n.node.as_ref() {
        Some(NodeEnum::SelectStmt(_) | NodeEnum::InsertStmt(_) | NodeEnum::UpdateStmt(_) | NodeEnum::DeleteStmt(_)) => Some(node_outputs(n, &Scope::root())),
        // A plan or a setting: text about the query or the server, not table values.
        Some(NodeEnum::ExplainStmt(_)) => Some(Vec::new()),
        // SHOW of a setting that can hold any text (application_name, search_path, a
        // custom one, as set_config() stored it) is as untraceable as its
        // current_setting(); SHOW ALL lists such values too.
        Some(NodeEnum::VariableShowStmt(v)) => {
            let opaque = |o: bool| Sources { opaque: o, ..Sources::default() };
            let out = |name: &str, o: bool| Output { name: name.to_string(), star: false, sources: opaque(o) };
            Some(if v.name.eq_ignore_ascii_case("all") {
                vec![out("name", false), out("setting", true), out("description", false)]
            } else {
                vec![out(&v.name, !fixed_value_setting(&v.name))]
            })
        }
        Some(NodeEnum::FetchStmt(f)) => {
            st.uses = Some(Named::Cursor(f.portalname.clone()));
            None
        }
        Some(NodeEnum::ExecuteStmt(e)) => {
            st.uses = Some(Named::Prepared(e.name.clone()));
            None
        }
        Some(NodeEnum::DeclareCursorStmt(d)) => {
            let query = d.query.as_deref().map(statement).unwrap_or_default();
            st.effect = Some(Effect::Define { name: Named::Cursor(d.portalname.clone()), hold: d.options & CURSOR_OPT_HOLD != 0, query: Box::new(query) });
            Some(Vec::new())
        }
        Some(NodeEnum::PrepareStmt(p)) => {
            let query = p.query.as_deref().map(statement).unwrap_or_default();
            st.effect = Some(Effect::Define { name: Named::Prepared(p.name.clone()), hold: true, query: Box::new(query) });
            Some(Vec::new())
        }
        Some(NodeEnum::ClosePortalStmt(c)) => {
            // An empty name is CLOSE ALL.
            st.effect = Some(if c.portalname.is_empty() {
                Effect::ForgetAll { cursors: true, prepared: false }
            } else {
                Effect::Forget(Named::Cursor(c.portalname.clone()))
            });
            Some(Vec::new())
        }
        Some(NodeEnum::DeallocateStmt(d)) => {
            st.effect = Some(if d.isall || d.name.is_empty() {
                Effect::ForgetAll { cursors: false, prepared: true }
            } else {
                Effect::Forget(Named::Prepared(d.name.clone()))
            });
            Some(Vec::new())
        }
        // DISCARD PLANS / SEQUENCES / TEMP keep cursors and statements; forgetting them
        // anyway only makes a later FETCH or EXECUTE untraceable (masked harder).
        Some(NodeEnum::DiscardStmt(_)) => {
            st.effect = Some(Effect::ForgetAll { cursors: true, prepared: true });
            Some(Vec::new())
        }
        _ => None,
    };
    st
}

/// Every relation named anywhere in a statement.
fn relations_named(n: &Node) -> BTreeSet<RelName> {
    let mut out = BTreeSet::new();
    let mut visit = |x: crate::policy::walk::N<'_>| {
        if let crate::policy::walk::N::RangeVar(rv) = x {
            out.insert(rel_name(rv));
        }
    };
    let mut w = crate::policy::walk::Walker { visit: &mut visit, depth: 0, too_deep: false };
    w.node(n);
    out
}

/// The outputs of a query node (SELECT, or DML with RETURNING, EXPLAIN-less).
pub fn node_outputs(node: &Node, scope: &Scope<'_>) -> Vec<Output> {
    match node.node.as_ref() {
        Some(NodeEnum::SelectStmt(s)) => select_outputs(s, scope),
        Some(NodeEnum::InsertStmt(i)) => dml_returning(i.with_clause.as_ref(), i.relation.as_ref(), &[], i.returning_clause.as_ref(), scope),
        Some(NodeEnum::UpdateStmt(u)) => dml_returning(u.with_clause.as_ref(), u.relation.as_ref(), &u.from_clause, u.returning_clause.as_ref(), scope),
        Some(NodeEnum::DeleteStmt(d)) => dml_returning(d.with_clause.as_ref(), d.relation.as_ref(), &d.using_clause, d.returning_clause.as_ref(), scope),
        Some(NodeEnum::ExplainStmt(_)) => Vec::new(),
        _ => Vec::new(),
    }
}

/// Something names in a FROM list can refer to.
#[derive(Debug, Clone)]
enum Item {
    Table(RelName),
    /// A subquery or CTE, with its outputs.
    Derived(Vec<Output>),
    /// A function in FROM: each of its columns may hold any of these sources; and the
    /// names its columns may have (any other `alias.name` is the call `name(alias)`).
    Function(Sources, Vec<String>),
    /// A function or anything else whose columns phigate cannot trace.
    Opaque,
}

/// A JOIN … USING (or NATURAL JOIN) at one query level: an unqualified reference to
/// a column it joins on is one merged column, whose value comes from either side
/// (the left's, the right's, or in a FULL join whichever is not NULL).
#[derive(Debug, Clone)]
struct Merged {
    /// The column joined on; None for NATURAL (whatever the sides have in common).
    column: Option<String>,
    /// The two sides' FROM items, as positions in [`Scope::items`].
    left: std::ops::Range<usize>,
    right: std::ops::Range<usize>,
}

/// The names visible at one query level, and the levels around it.
#[derive(Debug, Default)]
pub struct Scope<'p> {
    items: Vec<(String, Item)>,
    merged: Vec<Merged>,
    ctes: HashMap<String, Vec<Output>>,
    parent: Option<&'p Scope<'p>>,
}

impl<'p> Scope<'p> {
    pub fn root() -> Self {
        Self::default()
    }

    fn child(parent: &'p Scope<'p>) -> Self {
        Self { items: Vec::new(), merged: Vec::new(), ctes: HashMap::new(), parent: Some(parent) }
    }

    fn cte(&self, name: &str) -> Option<&Vec<Output>> {
        self.ctes.get(name).or_else(|| self.parent.and_then(|p| p.cte(name)))
    }

    /// The items named `alias` at the nearest level that has one.
    fn find(&self, alias: &str) -> Option<&Item> {
        self.items.iter().find(|(a, _)| a == alias).map(|(_, i)| i).or_else(|| self.parent.and_then(|p| p.find(alias)))
    }

    /// The sources of an unqualified column reference: whichever items at this level
    /// and the levels around it have such a column. A column two sides are joined
    /// USING is either side's value: the sides are alternatives.
    fn unqualified_column(&self, col: &str, out: &mut Sources) {
        let mut merged_items: Vec<usize> = Vec::new();
        for m in self.merged.iter().filter(|m| m.column.as_deref().is_none_or(|c| c == col)) {
            let side = |items: &std::ops::Range<usize>| {
                let mut s = Sources::default();
                for (_, i) in &self.items[items.clone()] {
                    item_column(i, col, &mut s);
                }
                s
            };
            let mut either = side(&m.left);
            either.extend_alternative(&side(&m.right));
            out.extend(&either);
            merged_items.extend(m.left.clone().chain(m.right.clone()));
        }
        // An item known to have the column (a subquery's or function's output of that
        // name) is where PostgreSQL finds it: the levels around are not asked (their
        // column of that name would be another value, a patient's beside a constant).
        let mut found_here = !merged_items.is_empty();
        for (n, (_, i)) in self.items.iter().enumerate() {
            found_here |= has_column(i, col);
            if !merged_items.contains(&n) {
                item_column(i, col, out);
            }
        }
        if found_here {
            return;
        }
        if let Some(p) = self.parent {
            p.unqualified_column(col, out);
        }
    }

    fn all_items(&self) -> Vec<&Item> {
        let mut v: Vec<&Item> = self.items.iter().map(|(_, i)| i).collect();
        if let Some(p) = self.parent {
            v.extend(p.all_items());
        }
        v
    }
}

fn string_nodes(items: &[Node]) -> Vec<String> {
    items
        .iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect()
}

fn rel_name(rv: &protobuf::RangeVar) -> RelName {
    RelName { schema: (!rv.schemaname.is_empty()).then(|| rv.schemaname.clone()), name: rv.relname.clone() }
}

fn add_ctes(with: Option<&protobuf::WithClause>, scope: &mut Scope<'_>) {
    let Some(w) = with else { return };
    let ctes = || {
        w.ctes.iter().filter_map(|c| match c.node.as_ref() {
            Some(NodeEnum::CommonTableExpr(cte)) => Some(cte),
            _ => None,
        })
    };
    if w.recursive {
        // WITH RECURSIVE: a CTE may read itself or one defined after it. Until its
        // turn comes, each stands for everything any of them reads directly.
        let mut all = Sources::default();
        for cte in ctes() {
            for o in cte.ctequery.as_deref().map(|q| node_outputs(q, scope)).unwrap_or_default() {
                all.extend(&o.sources);
            }
        }
        // A stand-in mixes what different columns hold: none of it is any one column
        // as it is (a later CTE's constant would otherwise pass as a patient's name
        // beside it and get its pseudonym).
        all.computed = true;
        for cte in ctes() {
            scope.ctes.insert(cte.ctename.clone(), vec![Output { name: String::new(), star: true, sources: all.clone() }]);
        }
    }
    for c in &w.ctes {
        if let Some(NodeEnum::CommonTableExpr(cte)) = c.node.as_ref() {
            let mut outs = cte.ctequery.as_deref().map(|q| node_outputs(q, scope)).unwrap_or_default();
            // WITH x (a, b) AS (…) renames the columns.
            for (o, name) in outs.iter_mut().zip(string_nodes(&cte.aliascolnames)) {
                o.name = name;
            }
            scope.ctes.insert(cte.ctename.clone(), outs);
        }
    }
}

fn add_from(items: &[Node], scope: &mut Scope<'_>) {
    for n in items {
        add_from_item(n, scope);
    }
}

fn add_from_item(n: &Node, scope: &mut Scope<'_>) {
    match n.node.as_ref() {
        Some(NodeEnum::RangeVar(rv)) => {
            let alias = rv.alias.as_ref().map(|a| a.aliasname.clone()).unwrap_or_else(|| rv.relname.clone());
            let renamed = rv.alias.as_ref().map(|a| string_nodes(&a.colnames)).unwrap_or_default();
            let item = match (rv.schemaname.is_empty(), scope.cte(&rv.relname)) {
                (true, Some(outs)) => {
                    // `FROM c AS c2(k, n)`: the CTE's columns by position, renamed.
                    let mut outs = outs.clone();
                    for (o, name) in outs.iter_mut().zip(renamed) {
                        o.name = name;
                    }
                    Item::Derived(outs)
                }
                // `FROM patients AS p(x, y, z)` renames the table's first columns in
                // their catalog order, which phigate does not know here: any column
                // of it may be any of the table's.
                _ if !renamed.is_empty() => Item::Derived(vec![Output {
                    name: String::new(),
                    star: true,
                    sources: Sources { whole_rows: [rel_name(rv)].into(), ..Sources::default() },
                }]),
                _ => Item::Table(rel_name(rv)),
            };
            scope.items.push((alias, item));
        }
        Some(NodeEnum::RangeSubselect(s)) => {
            let outs = {
                // A LATERAL subquery may refer to earlier FROM items; others see the
                // enclosing levels only (and this level's WITH). Seeing more is not
                // more conservative: a name there may be another item's of the same
                // name (`(SELECT p.name) s` reads the outer p, not a sibling p).
                let (items, merged) = if s.lateral { (scope.items.clone(), scope.merged.clone()) } else { (Vec::new(), Vec::new()) };
                let view = Scope { items, merged, ctes: scope.ctes.clone(), parent: scope.parent };
                s.subquery.as_deref().map(|q| node_outputs(q, &view)).unwrap_or_default()
            };
            let alias = s.alias.as_ref().map(|a| a.aliasname.clone()).unwrap_or_default();
            let mut outs = outs;
            if let Some(a) = &s.alias {
                for (o, name) in outs.iter_mut().zip(string_nodes(&a.colnames)) {
                    o.name = name;
                }
            }
            scope.items.push((alias, Item::Derived(outs)));
        }
        Some(NodeEnum::JoinExpr(j)) => {
            let before = scope.items.len();
            if let Some(l) = j.larg.as_deref() {
                add_from_item(l, scope);
            }
            let middle = scope.items.len();
            if let Some(r) = j.rarg.as_deref() {
                add_from_item(r, scope);
            }
            let (left, right) = (before..middle, middle..scope.items.len());
            if j.is_natural {
                scope.merged.push(Merged { column: None, left, right });
            } else {
                for column in string_nodes(&j.using_clause) {
                    scope.merged.push(Merged { column: Some(column), left: left.clone(), right: right.clone() });
                }
            }
            // `(a JOIN b) AS j [(x, y, …)]`: j is a FROM item of its own, whose row
            // and columns (renamed or not) may be any of a's and b's; the names a and
            // b are hidden outside it (`p.name` there is another p's).
            if let Some(alias) = &j.alias {
                let mut whole = Sources::default();
                for (_, item) in &scope.items[before..] {
                    item_whole(item, &mut whole);
                }
                scope.items.truncate(before);
                scope.merged.retain(|m| m.left.start < before);
                scope.items.push((alias.aliasname.clone(), Item::Derived(vec![Output { name: String::new(), star: true, sources: whole }])));
            }
        }
        Some(NodeEnum::RangeFunction(f)) => {
            // Functions in FROM are implicitly LATERAL: their arguments may name the
            // FROM items before them (seeing more is only more conservative).
            let sources = {
                let view = Scope { items: scope.items.clone(), merged: scope.merged.clone(), ctes: HashMap::new(), parent: Some(scope) };
                range_function_sources(f, &view)
            };
            let alias = f.alias.as_ref().map(|a| a.aliasname.clone()).unwrap_or_default();
            // The names its columns can have: the alias (a scalar function's column),
            // the alias's or a definition list's names, the functions' own names, and
            // the fixed ones of the unfolding built-ins.
            let mut names: Vec<String> = ["key", "value", "ordinality"].map(String::from).to_vec();
            names.push(alias.clone());
            if let Some(a) = &f.alias {
                names.extend(string_nodes(&a.colnames));
            }
            let mut defs: Vec<&Node> = f.coldeflist.iter().collect();
            for item in &f.functions {
                let parts: &[Node] = match item.node.as_ref() {
                    Some(NodeEnum::List(l)) => &l.items,
                    _ => std::slice::from_ref(item),
                };
                if let Some(Some(NodeEnum::FuncCall(fc))) = parts.first().map(|c| c.node.as_ref()) {
                    names.extend(string_nodes(&fc.funcname).last().cloned());
                }
                if let Some(Some(NodeEnum::List(l))) = parts.get(1).map(|c| c.node.as_ref()) {
                    defs.extend(&l.items);
                }
            }
            names.extend(defs.iter().filter_map(|d| match d.node.as_ref() {
                Some(NodeEnum::ColumnDef(c)) => Some(c.colname.clone()),
                _ => None,
            }));
            scope.items.push((alias, Item::Function(sources, names)));
        }
        _ => scope.items.push((String::new(), Item::Opaque)),
    }
}

/// Built-in set-returning functions whose rows are made of their arguments only
/// (they read no table): their columns carry the arguments' sources and nothing else.
/// Any other function in FROM may read tables of its own, which phigate cannot see.
const UNFOLDING_FUNCTIONS: &[&str] = &[
    "generate_series",
    "generate_subscripts",
    "unnest",
    "json_each",
    "json_each_text",
    "jsonb_each",
    "jsonb_each_text",
    "json_array_elements",
    "json_array_elements_text",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "json_object_keys",
    "jsonb_object_keys",
    "json_populate_record",
    "json_populate_recordset",
    "jsonb_populate_record",
    "jsonb_populate_recordset",
    "json_to_record",
    "json_to_recordset",
    "jsonb_to_record",
    "jsonb_to_recordset",
    "jsonb_path_query",
    "regexp_matches",
    "regexp_split_to_table",
    "string_to_table",
];

/// Names of PostgreSQL 15's pg_catalog, from one of the lists beside this file.
fn catalog_names(list: &'static str) -> std::collections::HashSet<&'static str> {
    list.lines().filter(|l| !l.starts_with("// ")).collect()
}

/// Functions whose result is computed from their arguments alone.
static FUNCTIONS: std::sync::LazyLock<std::collections::HashSet<&'static str>> =
    std::sync::LazyLock::new(|| catalog_names(include_str!("builtin_functions.txt")));
static OPERATORS: std::sync::LazyLock<std::collections::HashSet<&'static str>> =
    std::sync::LazyLock::new(|| catalog_names(include_str!("builtin_operators.txt")));

/// See their use in [`collect`].
const STORED_TEXT_FUNCTIONS: &[&str] = &[
    "lo_get",
    "loread",
    "currval",
    "lastval",
    "pg_sequence_last_value",
    "pg_lock_status",
    "pg_get_replication_slots",
    "pg_show_replication_origin_status",
    "pg_replication_origin_progress",
    "pg_stat_get_activity",
    "pg_stat_get_backend_activity",
    "pg_prepared_statement",
    "pg_cursor",
    "pg_show_all_settings",
    "pg_show_all_file_settings",
    "pg_mcv_list_items",
];

/// Settings whose values cannot carry free text (see the list's header).
static SETTINGS: std::sync::LazyLock<std::collections::HashSet<&'static str>> =
    std::sync::LazyLock::new(|| catalog_names(include_str!("builtin_settings.txt")));

/// Whether a setting's value is one PostgreSQL checks against a fixed set (a number,
/// a boolean, an enum, an encoding …), not text set_config() could fill with data:
/// application_name, search_path and custom (dotted) settings are not.
fn fixed_value_setting(name: &str) -> bool {
    SETTINGS.contains(name.to_ascii_lowercase().as_str())
}

/// The built-in a name (as the parser wrote it) stands for: unqualified or
/// `pg_catalog.`, and in `builtins`. Anything else — the database's own, or a built-in
/// of a later version — is opaque. Workloads cannot create functions or operators
/// (`baseline.opaque-code`), so an unqualified built-in name is PostgreSQL's, unless
/// the database's owners gave one of theirs the same name (the README says not to).
fn builtin(names: &[Node], builtins: &std::collections::HashSet<&str>) -> Option<String> {
    let mut names = string_nodes(names);
    let plain = match names.as_slice() {
        [_] => true,
        [schema, _] => schema == "pg_catalog",
        _ => false,
    };
    names.pop().filter(|n| plain && builtins.contains(n.as_str()))
}

fn is_builtin(funcname: &[Node]) -> bool {
    builtin(funcname, &FUNCTIONS).is_some()
}

/// An operator that is not one of PostgreSQL's runs a function of its own.
fn foreign_operator(e: &protobuf::AExpr) -> bool {
    let by_name =
        matches!(protobuf::AExprKind::try_from(e.kind), Ok(protobuf::AExprKind::AexprOp | protobuf::AExprKind::AexprOpAny | protobuf::AExprKind::AexprOpAll));
    by_name && builtin(&e.name, &OPERATORS).is_none()
}

/// The sources of every column a function in FROM (or `ROWS FROM (…)`) returns: all
/// of its arguments (a whole-row argument carries its whole row), opaque unless every
/// function only unfolds its arguments.
fn range_function_sources(f: &protobuf::RangeFunction, scope: &Scope<'_>) -> Sources {
    let mut out = range_function_arguments(f, scope);
    // What a function in FROM returns is computed from its arguments, bare or not
    // (`string_to_table(p.name, null)` returns the name's letters).
    out.computed |= !out.columns.is_empty() || !out.whole_rows.is_empty();
    out
}

fn range_function_arguments(f: &protobuf::RangeFunction, scope: &Scope<'_>) -> Sources {
    let mut out = Sources::default();
    for item in &f.functions {
        // Each entry is a list: the call, then its column definitions.
        let call = match item.node.as_ref() {
            Some(NodeEnum::List(l)) => l.items.first(),
            _ => Some(item),
        };
        match call.and_then(|c| c.node.as_ref()) {
            Some(NodeEnum::FuncCall(fc)) => {
                let names = string_nodes(&fc.funcname);
                let builtin = match names.as_slice() {
                    [name] | [_, name] if names.len() == 1 || names[0] == "pg_catalog" => UNFOLDING_FUNCTIONS.contains(&name.to_ascii_lowercase().as_str()),
                    _ => false,
                };
                out.opaque |= !builtin;
                for a in &fc.args {
                    collect(a, scope, &mut out, 0);
                }
            }
            // Anything else (a SQL-value function, a cast …): its column references,
            // and opaque since phigate does not know what it returns.
            Some(_) => {
                out.opaque = true;
                if let Some(c) = call {
                    collect(c, scope, &mut out, 0);
                }
            }
            None => out.opaque = true,
        }
    }
    out
}

fn select_outputs(s: &protobuf::SelectStmt, outer: &Scope<'_>) -> Vec<Output> {
    let op = protobuf::SetOperation::try_from(s.op).unwrap_or(protobuf::SetOperation::SetopNone);
    if !matches!(op, protobuf::SetOperation::SetopNone | protobuf::SetOperation::Undefined) {
        // UNION / INTERSECT / EXCEPT: column i comes from column i of either side.
        let mut scope = Scope::child(outer);
        add_ctes(s.with_clause.as_ref(), &mut scope);
        let mut left = s.larg.as_deref().map(|l| select_outputs(l, &scope)).unwrap_or_default();
        let right = s.rarg.as_deref().map(|r| select_outputs(r, &scope)).unwrap_or_default();
        // A `*` on either side stands for any number of columns, so which of the
        // other side's columns it lines up with is unknown: its sources go to every
        // column (`SELECT 1, 'a' UNION ALL SELECT * FROM patients`).
        let mut star = Sources::default();
        for o in left.iter().chain(&right).filter(|o| o.star) {
            star.extend(&o.sources);
        }
        for (i, r) in right.iter().enumerate() {
            match left.get_mut(i) {
                Some(l) => {
                    l.sources.extend_alternative(&r.sources);
                    l.star |= r.star;
                }
                None => left.push(r.clone()),
            }
        }
        if !star.is_empty() {
            for l in &mut left {
                l.sources.extend_alternative(&star);
            }
        }
        return left;
    }
    let mut scope = Scope::child(outer);
    add_ctes(s.with_clause.as_ref(), &mut scope);
    add_from(&s.from_clause, &mut scope);
    if !s.values_lists.is_empty() {
        let mut outs: Vec<Output> = Vec::new();
        for row in &s.values_lists {
            if let Some(NodeEnum::List(l)) = row.node.as_ref() {
                for (i, v) in l.items.iter().enumerate() {
                    let src = expr_sources(v, &scope);
                    match outs.get_mut(i) {
                        Some(o) => o.sources.extend_alternative(&src),
                        None => outs.push(Output { name: format!("column{}", i + 1), star: false, sources: src }),
                    }
                }
            }
        }
        return outs;
    }
    targets(&s.target_list, &scope)
}

fn dml_returning(
    with: Option<&protobuf::WithClause>,
    relation: Option<&protobuf::RangeVar>,
    from: &[Node],
    returning: Option<&protobuf::ReturningClause>,
    outer: &Scope<'_>,
) -> Vec<Output> {
    let Some(ret) = returning else { return Vec::new() };
    let mut scope = Scope::child(outer);
    add_ctes(with, &mut scope);
    if let Some(rv) = relation {
        let alias = rv.alias.as_ref().map(|a| a.aliasname.clone()).unwrap_or_else(|| rv.relname.clone());
        scope.items.push((alias, Item::Table(rel_name(rv))));
    }
    add_from(from, &mut scope);
    targets(&ret.exprs, &scope)
}

fn targets(list: &[Node], scope: &Scope<'_>) -> Vec<Output> {
    let mut outs = Vec::with_capacity(list.len());
    for t in list {
        let Some(NodeEnum::ResTarget(rt)) = t.node.as_ref() else { continue };
        let Some(val) = rt.val.as_deref() else { continue };
        // `t.*` and `(expr).*` both expand to any number of columns.
        let star = match val.node.as_ref() {
            Some(NodeEnum::ColumnRef(c)) => c.fields.last().is_some_and(|f| matches!(f.node, Some(NodeEnum::AStar(_)))),
            Some(NodeEnum::AIndirection(i)) => i.indirection.last().is_some_and(|f| matches!(f.node, Some(NodeEnum::AStar(_)))),
            _ => false,
        };
        let name = if rt.name.is_empty() { column_name(val) } else { rt.name.clone() };
        outs.push(Output { name, star, sources: expr_sources(val, scope) });
    }
    outs
}

/// The name PostgreSQL gives an unnamed result column (FigureColname, simplified).
fn column_name(n: &Node) -> String {
    figure_colname(n).map(|(name, _)| name).unwrap_or_else(|| "?column?".to_string())
}

/// PostgreSQL's FigureColname: the name a result column gets, and how strong it is
/// (2: a real name; 1: a fallback such as a cast's type name, which a CASE's ELSE
/// does not pass on). None: "?column?".
fn figure_colname(n: &Node) -> Option<(String, u8)> {
    let strong = |s: &str| Some((s.to_string(), 2));
    match n.node.as_ref()? {
        NodeEnum::ColumnRef(c) => match c.fields.last().and_then(|f| f.node.as_ref()) {
            Some(NodeEnum::String(s)) => strong(&s.sval),
            _ => None,
        },
        NodeEnum::FuncCall(f) => string_nodes(&f.funcname).last().map(|s| (s.clone(), 2)),
        NodeEnum::AExpr(e) if e.kind == protobuf::AExprKind::AexprNullif as i32 => strong("nullif"),
        NodeEnum::TypeCast(t) => match t.arg.as_deref().and_then(figure_colname) {
            Some(named) if named.1 > 1 => Some(named),
            _ => t.type_name.as_ref().and_then(|tn| string_nodes(&tn.names).last().cloned()).map(|n| (n, 1)),
        },
        NodeEnum::AIndirection(i) => match i.indirection.last().and_then(|f| f.node.as_ref()) {
            Some(NodeEnum::String(s)) => strong(&s.sval),
            _ => i.arg.as_deref().and_then(figure_colname),
        },
        // PostgreSQL names `x COLLATE "C"` after x.
        NodeEnum::CollateClause(c) => c.arg.as_deref().and_then(figure_colname),
        // A CASE is named after its ELSE result when that has a real name.
        NodeEnum::CaseExpr(c) => match c.defresult.as_deref().and_then(figure_colname) {
            Some(named) if named.1 > 1 => Some(named),
            _ => Some(("case".into(), 1)),
        },
        NodeEnum::CoalesceExpr(_) => strong("coalesce"),
        NodeEnum::AArrayExpr(_) => strong("array"),
        NodeEnum::RowExpr(_) => strong("row"),
        NodeEnum::GroupingFunc(_) => strong("grouping"),
        NodeEnum::MinMaxExpr(m) => strong(if m.op == protobuf::MinMaxOp::IsGreatest as i32 { "greatest" } else { "least" }),
        NodeEnum::SqlvalueFunction(f) => {
            use protobuf::SqlValueFunctionOp as Op;
            let name = match Op::try_from(f.op).ok()? {
                Op::SvfopCurrentDate => "current_date",
                Op::SvfopCurrentTime | Op::SvfopCurrentTimeN => "current_time",
                Op::SvfopCurrentTimestamp | Op::SvfopCurrentTimestampN => "current_timestamp",
                Op::SvfopLocaltime | Op::SvfopLocaltimeN => "localtime",
                Op::SvfopLocaltimestamp | Op::SvfopLocaltimestampN => "localtimestamp",
                Op::SvfopCurrentRole => "current_role",
                Op::SvfopCurrentUser => "current_user",
                Op::SvfopUser => "user",
                Op::SvfopSessionUser => "session_user",
                Op::SvfopCurrentCatalog => "current_catalog",
                Op::SvfopCurrentSchema => "current_schema",
                Op::SqlvalueFunctionOpUndefined => return None,
            };
            strong(name)
        }
        NodeEnum::XmlExpr(x) => {
            use protobuf::XmlExprOp as Op;
            let name = match Op::try_from(x.op).ok()? {
                Op::IsXmlconcat => "xmlconcat",
                Op::IsXmlelement => "xmlelement",
                Op::IsXmlforest => "xmlforest",
                Op::IsXmlparse => "xmlparse",
                Op::IsXmlpi => "xmlpi",
                Op::IsXmlroot => "xmlroot",
                Op::IsXmlserialize => "xmlserialize",
                _ => return None,
            };
            strong(name)
        }
        NodeEnum::XmlSerialize(_) => strong("xmlserialize"),
        NodeEnum::SubLink(s) => match protobuf::SubLinkType::try_from(s.sub_link_type) {
            Ok(protobuf::SubLinkType::ExistsSublink) => strong("exists"),
            Ok(protobuf::SubLinkType::ArraySublink) => strong("array"),
            // Named after the subquery's column; a set operation's columns are its
            // leftmost arm's.
            Ok(protobuf::SubLinkType::ExprSublink | protobuf::SubLinkType::MultiexprSublink) => match s.subselect.as_deref().and_then(|n| n.node.as_ref()) {
                Some(NodeEnum::SelectStmt(sel)) => leftmost_arm(sel).target_list.first().and_then(|t| match t.node.as_ref() {
                    Some(NodeEnum::ResTarget(rt)) if !rt.name.is_empty() => strong(&rt.name),
                    Some(NodeEnum::ResTarget(rt)) => rt.val.as_deref().and_then(figure_colname),
                    _ => None,
                }),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}

/// The first SELECT of a set operation (the statement itself when it is none).
fn leftmost_arm(mut sel: &protobuf::SelectStmt) -> &protobuf::SelectStmt {
    while let Some(l) = sel.larg.as_deref() {
        sel = l;
    }
    sel
}

/// The sources of an expression evaluated in `scope`.
pub fn expr_sources(n: &Node, scope: &Scope<'_>) -> Sources {
    let mut out = Sources::default();
    collect(n, scope, &mut out, 0);
    out
}

/// Expressions nest; stop somewhere (deeper trees are judged opaque).
const MAX_EXPR_DEPTH: u32 = 200;

fn collect(n: &Node, scope: &Scope<'_>, out: &mut Sources, depth: u32) {
    let read_before = out.columns.len() + out.whole_rows.len();
    collect_node(n, scope, out, depth);
    // Anything but a column as it is (or a subquery returning one) computes a value,
    // from the columns it read.
    let bare = matches!(n.node.as_ref(), Some(NodeEnum::ColumnRef(_) | NodeEnum::SubLink(_) | NodeEnum::ResTarget(_) | NodeEnum::NamedArgExpr(_)));
    if !bare && out.columns.len() + out.whole_rows.len() > read_before {
        out.computed = true;
    }
}

fn collect_node(n: &Node, scope: &Scope<'_>, out: &mut Sources, depth: u32) {
    if depth > MAX_EXPR_DEPTH {
        out.opaque = true;
        return;
    }
    let d = depth + 1;
    let each = |items: &[Node], out: &mut Sources| {
        for i in items {
            collect(i, scope, out, d);
        }
    };
    let Some(node) = n.node.as_ref() else { return };
    match node {
        NodeEnum::ColumnRef(c) => resolve_column(c, scope, out),
        NodeEnum::AConst(_) | NodeEnum::ParamRef(_) | NodeEnum::SqlvalueFunction(_) | NodeEnum::SetToDefault(_) => {}
        NodeEnum::FuncCall(f) => {
            let name = builtin(&f.funcname, &FUNCTIONS);
            // A count says how many, never what: it carries no value of its arguments.
            if name.as_deref() == Some("count") {
                return;
            }
            // Not a built-in: it may read tables of its own, whatever its arguments.
            out.opaque |= name.is_none();
            // `int4(x)` is a function or, where PostgreSQL has none taking x's type,
            // the cast `x::int4`.
            if let (Some(n), [_]) = (&name, f.args.as_slice()) {
                out.casts.insert(RelName { schema: None, name: n.clone() });
            }
            // Built-ins returning what is stored outside any table column: a large
            // object (whatever lo_from_bytea wrote), other sessions' statements, the
            // session's prepared statements and cursors, the settings, the
            // planner's sampled values.
            if name.as_deref().is_some_and(|n| STORED_TEXT_FUNCTIONS.contains(&n)) {
                out.opaque = true;
            }
            // current_setting() of a custom setting returns what set_config() stored,
            // which may be anything.
            if name.as_deref() == Some("current_setting") {
                let known = match f.args.first().and_then(|a| a.node.as_ref()) {
                    Some(NodeEnum::AConst(c)) => matches!(&c.val, Some(protobuf::a_const::Val::Sval(s)) if fixed_value_setting(&s.sval)),
                    _ => false,
                };
                out.opaque |= !known;
            }
            each(&f.args, out);
            // WITHIN GROUP (ORDER BY x) is what an ordered-set aggregate returns.
            each(&f.agg_order, out);
            if let Some(filter) = f.agg_filter.as_deref() {
                collect(filter, scope, out, d);
            }
        }
        NodeEnum::AExpr(e) => {
            out.opaque |= foreign_operator(e);
            for x in [e.lexpr.as_deref(), e.rexpr.as_deref()].into_iter().flatten() {
                collect(x, scope, out, d);
            }
        }
        NodeEnum::BoolExpr(b) => each(&b.args, out),
        NodeEnum::TypeCast(t) => {
            if let Some(tn) = &t.type_name {
                let mut names = string_nodes(&tn.names);
                if let Some(name) = names.pop() {
                    out.casts.insert(RelName { schema: names.pop(), name });
                }
            }
            if let Some(a) = t.arg.as_deref() {
                collect(a, scope, out, d);
            }
        }
        NodeEnum::CollateClause(c) => {
            if let Some(a) = c.arg.as_deref() {
                collect(a, scope, out, d);
            }
        }
        NodeEnum::NamedArgExpr(a) => {
            if let Some(a) = a.arg.as_deref() {
                collect(a, scope, out, d);
            }
        }
        NodeEnum::NullTest(t) => {
            if let Some(a) = t.arg.as_deref() {
                collect(a, scope, out, d);
            }
        }
        NodeEnum::BooleanTest(t) => {
            if let Some(a) = t.arg.as_deref() {
                collect(a, scope, out, d);
            }
        }
        NodeEnum::CaseExpr(c) => {
            if let Some(a) = c.arg.as_deref() {
                collect(a, scope, out, d);
            }
            each(&c.args, out);
            if let Some(x) = c.defresult.as_deref() {
                collect(x, scope, out, d);
            }
        }
        NodeEnum::CaseWhen(w) => {
            for x in [w.expr.as_deref(), w.result.as_deref()].into_iter().flatten() {
                collect(x, scope, out, d);
            }
        }
        NodeEnum::CoalesceExpr(c) => each(&c.args, out),
        NodeEnum::MinMaxExpr(m) => each(&m.args, out),
        NodeEnum::RowExpr(r) => each(&r.args, out),
        NodeEnum::AArrayExpr(a) => each(&a.elements, out),
        NodeEnum::List(l) => each(&l.items, out),
        NodeEnum::AIndirection(i) => {
            if let Some(a) = i.arg.as_deref() {
                collect(a, scope, out, d);
            }
            // `(x).f` is field f of x, or the call f(x) (column notation). For a
            // table's row (`(p).f`, `(p.*).f`) the catalog tells which; otherwise it
            // is opaque.
            let fields: Vec<&str> = i
                .indirection
                .iter()
                .filter_map(|x| match x.node.as_ref() {
                    Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
                    _ => None,
                })
                .collect();
            if let Some(first) = fields.first() {
                let row_of = match i.arg.as_deref().and_then(|a| a.node.as_ref()) {
                    Some(NodeEnum::ColumnRef(c)) => {
                        match (string_nodes(&c.fields).as_slice(), c.fields.last().map(|f| matches!(f.node, Some(NodeEnum::AStar(_))))) {
                            ([alias], Some(_)) => scope.find(alias),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                match row_of {
                    Some(Item::Table(t)) if fields.len() == 1 => {
                        out.qualified.insert((t.clone(), first.to_string()));
                    }
                    _ => out.opaque = true,
                }
            }
        }
        NodeEnum::SubLink(s) => {
            if let Some(t) = s.testexpr.as_deref() {
                collect(t, scope, out, d);
            }
            if protobuf::SubLinkType::try_from(s.sub_link_type) == Ok(protobuf::SubLinkType::ExistsSublink) {
                return;
            }
            if let Some(q) = s.subselect.as_deref() {
                for o in node_outputs(q, scope) {
                    out.extend(&o.sources);
                }
            }
        }
        NodeEnum::ResTarget(rt) => {
            if let Some(v) = rt.val.as_deref() {
                collect(v, scope, out, d);
            }
        }
        // Anything else (XMLELEMENT, JSON constructors, …): follow every child
        // generically. A query nested there (`xmlelement(name x, (select …))`,
        // `JSON_ARRAY(select …)`) is traced with its own FROM; its column references
        // belong to it, not to this scope.
        _ => generic_sources(n, scope, out),
    }
}

fn generic_sources(n: &Node, scope: &Scope<'_>, out: &mut Sources) {
    use crate::policy::walk::{Walker, N};
    type Seen<'a> = (Vec<&'a protobuf::ColumnRef>, Vec<&'a Node>, Vec<*const protobuf::SelectStmt>, bool);
    // Column references, the query nodes of subqueries, and every SELECT below `root`.
    fn walk<'a>(root: &'a Node) -> Seen<'a> {
        let (mut refs, mut queries, mut selects) = (Vec::new(), Vec::new(), Vec::new());
        let mut foreign_call = false;
        let deep = {
            let mut visit = |x: N<'a>| match x {
                N::ColumnRef(c) => refs.push(c),
                N::FuncCall(f) => foreign_call |= !is_builtin(&f.funcname),
                N::AExpr(e) => foreign_call |= foreign_operator(e),
                // `(x).f` may be the call f(x).
                N::AIndirection(a) => foreign_call |= a.indirection.iter().any(|i| matches!(i.node, Some(NodeEnum::String(_)))),
                N::SubLink(s) => queries.extend(s.subselect.as_deref()),
                N::JsonArrayQueryConstructor(j) => queries.extend(j.query.as_deref()),
                N::SelectStmt(s) => selects.push(s as *const _),
                _ => {}
            };
            let mut w = Walker { visit: &mut visit, depth: 0, too_deep: false };
            w.node(root);
            w.too_deep
        };
        (refs, queries, selects, deep || foreign_call)
    }
    let (refs, queries, selects, deep) = walk(n);
    out.opaque |= deep;
    // What lies inside some subquery (the subqueries' own nodes excluded).
    let mut inner_refs: Vec<*const protobuf::ColumnRef> = Vec::new();
    let mut inner_queries: Vec<*const Node> = Vec::new();
    let mut covered: Vec<*const protobuf::SelectStmt> = Vec::new();
    for q in &queries {
        let (r, qs, ss, _) = walk(q);
        inner_refs.extend(r.into_iter().map(|c| c as *const _));
        inner_queries.extend(qs.into_iter().map(|x| x as *const _));
        covered.extend(ss);
    }
    for c in refs.into_iter().filter(|c| !inner_refs.contains(&(*c as *const _))) {
        resolve_column(c, scope, out);
    }
    for q in queries.iter().filter(|q| !inner_queries.contains(&(**q as *const _))) {
        for o in node_outputs(q, scope) {
            out.extend(&o.sources);
        }
    }
    // A query phigate found no way into (not under a subquery node it knows).
    if selects.iter().any(|s| !covered.contains(s)) {
        out.opaque = true;
    }
}

/// Whether the item certainly has a column of this name (a table's columns only the
/// catalog knows).
fn has_column(item: &Item, column: &str) -> bool {
    match item {
        Item::Derived(outs) => outs.iter().any(|o| !o.star && o.name == column),
        Item::Function(_, names) => names.iter().any(|n| n == column),
        Item::Table(_) | Item::Opaque => false,
    }
}

fn item_column(item: &Item, column: &str, out: &mut Sources) {
    match item {
        Item::Table(t) => {
            out.columns.insert((t.clone(), column.to_string()));
        }
        Item::Derived(outs) => {
            // An output of that name is the column (were a `*` to hold one too, the
            // name would be ambiguous, which PostgreSQL refuses); several of that name
            // (ambiguous too, unless phigate named one unlike PostgreSQL) are
            // alternatives. Else any `*` may be it.
            let named: Vec<&Output> = outs.iter().filter(|o| !o.star && o.name == column).collect();
            if let Some((first, rest)) = named.split_first() {
                let mut either = first.sources.clone();
                for o in rest {
                    either.extend_alternative(&o.sources);
                }
                out.extend(&either);
                return;
            }
            let mut found = false;
            for o in outs.iter().filter(|o| o.star) {
                out.extend(&o.sources);
                // Whether a `*` has this column only the catalog can tell: if its
                // tables have none, `alias.f` is the call `f(alias)`.
                out.qualified.extend(o.sources.whole_rows.iter().map(|t| (t.clone(), column.to_string())));
                out.opaque |= o.sources.whole_rows.is_empty();
                found = true;
            }
            if !found {
                // No such column: `alias.f` is the call `f(alias)` over the whole row.
                item_whole(item, out);
                out.opaque = true;
            }
        }
        Item::Function(s, names) => {
            out.extend(s);
            // Not one of its columns: the call `column(alias)`.
            out.opaque |= !names.iter().any(|n| n == column);
        }
        Item::Opaque => out.opaque = true,
    }
}

fn item_whole(item: &Item, out: &mut Sources) {
    match item {
        Item::Table(t) => {
            out.whole_rows.insert(t.clone());
        }
        Item::Derived(outs) => {
            for o in outs {
                out.extend(&o.sources);
            }
        }
        Item::Function(s, _) => out.extend(s),
        Item::Opaque => out.opaque = true,
    }
}

fn resolve_column(c: &protobuf::ColumnRef, scope: &Scope<'_>, out: &mut Sources) {
    let star = c.fields.last().is_some_and(|f| matches!(f.node, Some(NodeEnum::AStar(_))));
    let names = string_nodes(&c.fields);
    match (names.as_slice(), star) {
        ([], true) => {
            for i in scope.all_items() {
                item_whole(i, out);
            }
        }
        ([alias], true) => match scope.find(alias) {
            Some(i) => item_whole(i, out),
            None => out.opaque = true,
        },
        ([col], false) => {
            // Unqualified: any item in scope may have this column, and a FROM alias of
            // this name is a whole-row reference.
            scope.unqualified_column(col, out);
            if let Some(i) = scope.find(col) {
                item_whole(i, out);
            }
        }
        ([alias, col], false) => match scope.find(alias) {
            Some(i) => {
                if let Item::Table(t) = i {
                    out.qualified.insert((t.clone(), col.clone()));
                }
                item_column(i, col, out)
            }
            None => out.opaque = true,
        },
        ([.., schema, table, col], false) => {
            let rel = RelName { schema: Some(schema.clone()), name: table.clone() };
            out.qualified.insert((rel.clone(), col.clone()));
            out.columns.insert((rel, col.clone()));
        }
        (_, true) => {
            let mut parts = names.clone();
            let table = parts.pop().unwrap_or_default();
            let rel = RelName { schema: parts.pop(), name: table };
            out.whole_rows.insert(rel);
        }
        _ => out.opaque = true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Vec<Output> {
        statement_outputs(sql).unwrap().into_iter().next().unwrap()
    }

    fn rel(s: &str) -> RelName {
        match s.split_once('.') {
            Some((a, b)) => RelName { schema: Some(a.into()), name: b.into() },
            None => RelName { schema: None, name: s.into() },
        }
    }

    fn cols(o: &Output) -> Vec<String> {
        o.sources.columns.iter().map(|(r, c)| format!("{r}.{c}")).collect()
    }

    #[test]
    fn computed_columns_carry_their_sources() {
        let o = one("select upper(p.ssn) as x, p.id + 1, count(p.ssn), 'lit' from public.patients p");
        assert_eq!(o[0].name, "x");
        assert_eq!(cols(&o[0]), ["public.patients.ssn"]);
        assert_eq!(o[1].name, "?column?");
        assert_eq!(cols(&o[1]), ["public.patients.id"]);
        assert!(o[2].sources.is_empty(), "a count reveals no values");
        assert!(o[3].sources.is_empty());
    }

    #[test]
    fn names_follow_figure_colname() {
        let o = one("select lower(name), name::text, (select max(x) from t), coalesce(a, b), case when a then 1 end, t.col from t");
        let names: Vec<&str> = o.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["lower", "name", "max", "coalesce", "case", "col"]);
    }

    #[test]
    fn aliases_subqueries_ctes_and_unions_are_traced() {
        let o = one("with c as (select ssn as hidden from patients) select hidden || '' as y from c");
        assert_eq!(cols(&o[0]), ["patients.ssn"]);
        let o = one("select s.x || '' from (select ssn as x, id from patients) s");
        assert_eq!(cols(&o[0]), ["patients.ssn"]);
        let o = one("select id::text from labs union all select ssn from patients");
        assert_eq!(cols(&o[0]), ["labs.id", "patients.ssn"]);
        let o = one("select (select p.ssn from patients p where p.id = l.patient_id) from labs l");
        assert_eq!(cols(&o[0]), ["patients.ssn"]);
        let o = one("select x.a from (values (1), (2)) as x(a)");
        assert!(o[0].sources.columns.is_empty());
    }

    #[test]
    fn whole_rows_and_unqualified_names() {
        let o = one("select row_to_json(p), to_jsonb(e.*) from patients p join encounters e on e.pid = p.id");
        assert!(o[0].sources.whole_rows.contains(&rel("patients")), "{o:?}");
        assert!(o[1].sources.whole_rows.contains(&rel("encounters")));
        let o = one("select concat(ssn, note) from patients p, encounters e");
        assert!(
            cols(&o[0]).contains(&"patients.ssn".to_string()) && cols(&o[0]).contains(&"encounters.note".to_string()),
            "unqualified names could be either table's"
        );
        let o = one("select * from patients");
        assert!(o[0].star && o[0].sources.whole_rows.contains(&rel("patients")));
    }

    #[test]
    fn only_built_in_functions_are_traced_through_their_arguments() {
        let o = one("select lower(name), pg_catalog.upper(ssn), count(ssn), get_name(7), public.lower(name), app.count(ssn) from patients");
        let opaque: Vec<bool> = o.iter().map(|x| x.sources.opaque).collect();
        assert_eq!(opaque, [false, false, false, true, true, true], "{o:?}");
        assert_eq!(cols(&o[0]), ["patients.name"]);
        assert!(o[2].sources.is_empty(), "a built-in count reveals no value");
        assert_eq!(cols(&o[5]), ["patients.ssn"], "a count of another schema is any function");
        // Calls under expressions followed generically, and in subqueries.
        let o = one("select xmlelement(name x, get_name(id)), (select get_name(1)) from labs");
        assert!(o[0].sources.opaque && o[1].sources.opaque, "{o:?}");
        let o = one("select x.a from (values (1), (2)) as x(a)");
        assert!(!o[0].sources.opaque, "{o:?}");
    }

    #[test]
    fn column_notation_may_be_a_call_of_the_whole_row() {
        // `p.label` is the column label, or the call label(p): masking asks the catalog.
        let o = one("select p.label, name from patients p");
        assert!(o[0].sources.qualified.contains(&(rel("patients"), "label".into())), "{o:?}");
        assert!(o[1].sources.qualified.is_empty(), "unqualified names are never calls");
        // A derived table has no such output: it is the call, over the whole row.
        let o = one("select s.label from (select id, name from patients) s");
        assert!(o[0].sources.opaque && cols(&o[0]) == ["patients.id", "patients.name"], "{o:?}");
    }

    #[test]
    fn functions_in_from_are_opaque_and_returning_is_traced() {
        let o = one("select f.x from get_patients() f");
        assert!(o[0].sources.opaque);
        let o = one("delete from patients where id = 1 returning ssn, md5(name)");
        assert_eq!(cols(&o[0]), ["patients.ssn"]);
        assert_eq!(cols(&o[1]), ["patients.name"]);
        assert_eq!(o[1].name, "md5");
    }

    #[test]
    fn functions_in_from_carry_their_arguments() {
        let o = one("select kv.v from patients p, jsonb_each_text(to_jsonb(p)) kv(k, v)");
        assert!(o[0].sources.whole_rows.contains(&rel("patients")), "{o:?}");
        assert!(!o[0].sources.opaque, "jsonb_each_text only unfolds its argument");
        let o = one("select f.u from patients p, unnest(array[p.ssn, p.name]) f(u)");
        assert_eq!(cols(&o[0]), ["patients.name", "patients.ssn"]);
        let o = one("select g from generate_series(1, 3) g");
        assert!(o[0].sources.is_empty(), "constants in, constants out: {o:?}");
        let o = one("select * from patients p, my_lookup(p.id) f");
        assert!(o[0].sources.opaque && o[0].sources.whole_rows.contains(&rel("patients")), "{o:?}");
    }

    #[test]
    fn expanded_composites_are_stars() {
        // `(expr).*` expands to any number of columns, like `t.*`: positions after it
        // cannot be trusted to line up.
        let o = one("select (null::pair).*, upper(p.name) as x from patients p");
        assert!(o[0].star, "{o:?}");
        assert!(!o[1].star);
        // A star on either side of a UNION reaches every column.
        let o = one("select 1, 'a' union all select * from patients");
        assert!(o.iter().all(|c| c.sources.whole_rows.contains(&rel("patients"))), "{o:?}");
    }

    #[test]
    fn subqueries_inside_expressions_resolve_their_own_from() {
        let o = one("select xmlelement(name x, (select string_agg(name, ',') from patients))");
        assert_eq!(cols(&o[0]), ["patients.name"]);
        assert!(!o[0].sources.opaque);
        let o = one("select (select name from patients limit 1) as n");
        assert_eq!(cols(&o[0]), ["patients.name"]);
        let o = one("select json_array(select name from patients)");
        assert_eq!(cols(&o[0]), ["patients.name"]);
        let o = one("select xmlelement(name x, l.test, (select p.ssn from patients p where p.id = l.id)) from labs l");
        assert_eq!(cols(&o[0]), ["labs.test", "patients.ssn"], "outer references stay outer, inner ones inner");
    }

    #[test]
    fn collate_is_named_after_its_argument() {
        let o = one("select p.name collate \"C\", 0 as name from patients p");
        assert_eq!(o[0].name, "name");
        assert_eq!(cols(&o[0]), ["patients.name"]);
    }

    #[test]
    fn statements_say_what_they_cannot_trace_and_what_they_define() {
        let s = statements("declare c cursor with hold for select upper(name) as n from patients; fetch all from c; execute q(1); call p(); show search_path")
            .unwrap();
        match &s[0].effect {
            Some(Effect::Define { name: Named::Cursor(c), hold: true, query }) => {
                assert_eq!(c, "c");
                assert_eq!(cols(&query.outputs.as_ref().unwrap()[0]), ["patients.name"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((s[1].outputs.as_ref(), s[1].uses.as_ref()), (None, Some(&Named::Cursor("c".into()))));
        assert_eq!((s[2].outputs.as_ref(), s[2].uses.as_ref()), (None, Some(&Named::Prepared("q".into()))));
        assert_eq!(s[3].outputs, None, "a procedure's output is not traceable");
        let shown = s[4].outputs.as_ref().expect("SHOW has one column");
        assert!(shown.len() == 1 && shown[0].name == "search_path" && shown[0].sources.opaque, "search_path holds what set_config() stored");
        let s = statements("show work_mem; show all; select current_setting('work_mem'), current_setting('application_name')").unwrap();
        assert!(!s[0].outputs.as_ref().unwrap()[0].sources.opaque, "a number is no table data");
        let all: Vec<bool> = s[1].outputs.as_ref().unwrap().iter().map(|o| o.sources.opaque).collect();
        assert_eq!(all, [false, true, false], "SHOW ALL's setting column");
        let set: Vec<bool> = s[2].outputs.as_ref().unwrap().iter().map(|o| o.sources.opaque).collect();
        assert_eq!(set, [false, true]);
        let s = statements("prepare q as select ssn from patients p join labs l on l.id = p.id; close all").unwrap();
        match &s[0].effect {
            Some(Effect::Define { name: Named::Prepared(q), query, .. }) => {
                assert_eq!(q, "q");
                assert_eq!(query.reads, [rel("labs"), rel("patients")].into());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s[1].effect, Some(Effect::ForgetAll { cursors: true, prepared: false }));
    }

    #[test]
    fn view_definitions_as_pg_get_viewdef_prints_them() {
        let o = one(" SELECT p.id,\n    p.ssn AS social,\n    lower(p.name) AS name\n   FROM public.patients p;");
        assert_eq!(o[1].name, "social");
        assert_eq!(cols(&o[1]), ["public.patients.ssn"]);
        assert_eq!(cols(&o[2]), ["public.patients.name"]);
    }

    // Inputs found by a review whose value may come from a function that is not a
    // built-in (or from PHI) but whose lineage was neither opaque nor traced. Each SQL
    // was run on PostgreSQL 15 with `lookup_name(labs)`, `get_name(int)`,
    // `peek(anyelement)` SQL functions that read patients: it returned PHI.

    /// The SQL whose first output column is neither opaque nor left for the catalog to
    /// judge as a possible call (`qualified`): each should be one of the two.
    fn not_opaque(sqls: &[&str]) -> Vec<String> {
        sqls.iter()
            .filter(|s| {
                let o = &one(s)[0].sources;
                !o.opaque && o.qualified.is_empty()
            })
            .map(|s| format!("{s} => {:?}", one(s)[0].sources))
            .collect()
    }

    #[test]
    fn column_notation_in_parentheses_is_a_call() {
        // `(x).f` is f(x) when x has no field f (`('/etc/passwd'::text).pg_read_file`,
        // see policy::analyze). The AIndirection arm follows only the argument and
        // records no `qualified` entry, so masking never asks the catalog.
        let bad = not_opaque(&[
            "select (l).lookup_name from labs l",
            "select (l.*).lookup_name from labs l",
            "select (7).get_name",
            "select (l.pid).get_name from labs l",
            "select xmlelement(name x, (l).lookup_name) from labs l",
        ]);
        assert!(bad.is_empty(), "{bad:#?}");
    }

    #[test]
    fn column_notation_on_function_and_star_items_is_a_call() {
        // item_column: a Function item returns its argument sources for any name, and
        // a Derived item with a `*` output "has" every name, so `g.f` / `s.f` are never
        // taken for the call f(g) / f(s).
        let bad = not_opaque(&["select g.get_name from generate_series(1, 1) g", "select s.peek from (select * from labs) s"]);
        assert!(bad.is_empty(), "{bad:#?}");
    }

    #[test]
    fn schema_qualified_column_notation_is_checked_against_the_catalog() {
        // `public.labs.lookup_name` is lookup_name(labs) when labs has no such column,
        // but the 3-field arm records a plain column and no `qualified` entry.
        let o = one("select public.labs.lookup_name from public.labs");
        assert!(o[0].sources.opaque || o[0].sources.qualified.contains(&(rel("public.labs"), "lookup_name".into())), "{o:?}");
    }

    #[test]
    fn within_group_aggregates_carry_their_ordering_column() {
        // Ordered-set aggregates return a value of their WITHIN GROUP (ORDER BY …)
        // expression; the FuncCall arm follows args and FILTER but not agg_order.
        let o = one("select percentile_disc(0.5) within group (order by p.ssn) from patients p");
        assert_eq!(cols(&o[0]), ["patients.ssn"], "{o:?}");
        let bad = not_opaque(&["select mode() within group (order by get_name(l.pid)) from labs l"]);
        assert!(bad.is_empty(), "{bad:#?}");
    }

    #[test]
    fn user_defined_operators_call_functions() {
        // An operator that is not PostgreSQL's runs a function of its own: no
        // different from app.f(x). (Casts made with CREATE CAST … WITH FUNCTION are
        // not looked into: the README says so.)
        let bad = not_opaque(&[
            "select l.pid operator(app.###) 1 from labs l",
            "select l.pid ### 1 from labs l",
            "select xmlelement(name x, l.pid ### 1) from labs l",
        ]);
        assert!(bad.is_empty(), "{bad:#?}");
        assert!(!one("select l.pid + 1, l.pid operator(pg_catalog.+) 1 from labs l")[0].sources.opaque);
    }

    #[test]
    fn recursive_with_may_refer_to_a_later_cte() {
        // In WITH RECURSIVE a CTE may read one defined after it; add_ctes resolves
        // names in order, so `b` is taken for a table called b.
        let o = one("with recursive a as (select * from b), b as (select ssn from patients where id = 1) select ssn || '' from a");
        assert!(o[0].sources.opaque || cols(&o[0]).contains(&"patients.ssn".to_string()), "{o:?}");
    }

    #[test]
    fn derived_column_names_follow_postgres() {
        // PostgreSQL names a CASE after its ELSE column (`name`) and `current_user::name`
        // `current_user`; column_name says `case` and `name`, so `s.name` is traced to
        // the constant column instead of the PHI one.
        let o = one("select s.name || '' from (select case when p.id > 0 then p.ssn else p.name end, current_user::name from patients p) s");
        assert!(o[0].sources.opaque || !o[0].sources.columns.is_empty(), "{o:?}");
    }

    #[test]
    fn custom_settings_are_session_state() {
        // `select set_config('x.v', (select ssn from patients where id = 1), false)` is
        // allowed by policy; reading it back later is a built-in with no sources.
        let bad = not_opaque(&["select current_setting('x.v')"]);
        assert!(bad.is_empty(), "{bad:#?}");
    }
}

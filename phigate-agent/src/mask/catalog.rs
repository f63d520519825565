//! What masking knows about the database's relations: OID → schema, name, kind,
//! columns, and for views their definition traced to base columns (see
//! [`super::lineage`]); and about types created in the database, how their values
//! travel in binary format ([`BinaryForm`]). Also the catalog queries that fill it
//! and the parsing of their rows.
//!
//! One cache per protected database and database name, shared by its sessions
//! (OIDs are per database). Entries expire (`TTL`) and the whole cache is dropped
//! when a session runs DDL, so a rename cannot keep a stale name for long. Pure: the
//! session layer runs the queries.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use super::lineage::{self, Output, RelName};

/// How long catalog facts are trusted.
pub const TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelKind {
    Table,
    View,
    MaterializedView,
    /// A sequence: its values are whatever setval() was given.
    Sequence,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub attnum: i16,
    pub name: String,
    pub type_oid: u32,
}

#[derive(Debug, Clone)]
pub struct Relation {
    pub oid: u32,
    /// Always schema-qualified.
    pub name: RelName,
    pub kind: RelKind,
    pub columns: Vec<Column>,
    /// For views: each output column's sources, from the view's definition.
    pub view: Option<Vec<Output>>,
}

impl Relation {
    pub fn column(&self, attnum: i16) -> Option<&Column> {
        self.columns.iter().find(|c| c.attnum == attnum)
    }

    pub fn is_view(&self) -> bool {
        matches!(self.kind, RelKind::View | RelKind::MaterializedView)
    }
}

/// Below this OID are PostgreSQL's hand-numbered built-in types, which
/// [`super::TypeClass`] knows. From it up are types given OIDs as they are created:
/// at initdb (10000–16383: the row types of system views such as pg_stats and
/// pg_stat_activity, information_schema's) and later in the database (extensions,
/// enums, composites, every table's row type). Those are looked up.
pub const FIRST_ASSIGNED_OID: u32 = 10_000;

/// How values of a type created in the database travel in binary format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryForm {
    /// Its text, as is, and any text is a value: base types whose send function is a
    /// text one (citext).
    Text,
    /// An enum: its label, as text in either format, but only its labels are values.
    Label,
    /// Anything else — a composite (a row), an array, a range, a base type with its
    /// own layout (hstore, geometry) — or a type the catalog does not show. Its
    /// layout is unknown to phigate, so it can be neither read nor rewritten.
    Opaque,
}

/// A type as the cast lookup names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeRef {
    pub oid: u32,
    /// The OID of its array type (0: none).
    pub array: u32,
    /// Schema and name.
    pub name: RelName,
}

/// A cast the database's owners made `WITH FUNCTION` a function that is not one of
/// PostgreSQL's (OID from 16384 up): casting runs that function, which may read any
/// table, so a value cast this way is as opaque as a call of it. Casting from or to a
/// domain runs the cast of its base type: the lookup lists each domain (at any
/// depth) as a cast of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCast {
    pub target: TypeRef,
    pub source: TypeRef,
    /// PostgreSQL applies it where nobody wrote a cast (castcontext `i` or `a`).
    pub implicit: bool,
}

/// Send functions whose binary form is the value's text.
const TEXT_SEND_FUNCTIONS: &[&str] = &["textsend", "varcharsend", "bpcharsend", "namesend", "enum_send", "citextsend"];

/// The cache.
#[derive(Debug)]
pub struct Catalog {
    by_oid: HashMap<u32, Arc<Relation>>,
    /// relname → every relation of that name (any schema); empty when none exists.
    by_name: HashMap<String, Vec<Arc<Relation>>>,
    /// Types with assigned OIDs (≥ [`FIRST_ASSIGNED_OID`]) looked up so far.
    types: HashMap<u32, BinaryForm>,
    /// The database's casts that run a function of its own (None: not looked up).
    casts: Option<Vec<UserCast>>,
    since: Instant,
}

impl Default for Catalog {
    fn default() -> Self {
        Self { by_oid: HashMap::new(), by_name: HashMap::new(), types: HashMap::new(), casts: None, since: Instant::now() }
    }
}

impl Catalog {
    fn expire(&mut self) {
        if self.since.elapsed() > TTL {
            self.clear();
        }
    }

    /// Forget everything (DDL ran somewhere).
    pub fn clear(&mut self) {
        self.by_oid.clear();
        self.by_name.clear();
        self.types.clear();
        self.casts = None;
        self.since = Instant::now();
    }

    /// Whether the database's own casts are still to be looked up.
    pub fn casts_missing(&mut self) -> bool {
        self.expire();
        self.casts.is_none()
    }

    /// The database's casts that run a function of its own (None: not looked up).
    pub fn own_casts(&self) -> Option<&[UserCast]> {
        self.casts.as_deref()
    }

    /// How a type travels in binary format: built-in types are not looked up (None
    /// for them, as for a type not looked up yet).
    pub fn binary_form(&self, type_oid: u32) -> Option<BinaryForm> {
        self.types.get(&type_oid).copied()
    }

    /// The types created in the database among `oids` the cache does not know.
    pub fn missing_types(&mut self, oids: impl IntoIterator<Item = u32>) -> Vec<u32> {
        self.expire();
        let mut v: Vec<u32> = oids.into_iter().filter(|o| *o >= FIRST_ASSIGNED_OID && !self.types.contains_key(o)).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Store what a lookup found; types it asked for that the catalog does not show
    /// are remembered as [`BinaryForm::Opaque`] (nothing is known of them).
    pub fn store(&mut self, lookup: &Lookup, found: Found) {
        match (lookup, found) {
            (Lookup::Types(asked), Found::Types(types)) => {
                self.types.extend(asked.iter().map(|oid| (*oid, BinaryForm::Opaque)));
                self.types.extend(types);
            }
            (Lookup::Names(names), Found::Relations(rels)) => self.insert(rels, names),
            (Lookup::Oids(_), Found::Relations(rels)) => self.insert(rels, &[]),
            (Lookup::Casts, Found::Casts(casts)) => self.casts = Some(casts),
            // parse() answers each lookup with its own kind of rows.
            _ => {}
        }
    }

    pub fn relation(&self, oid: u32) -> Option<Arc<Relation>> {
        self.by_oid.get(&oid).cloned()
    }

    /// The OIDs among `oids` the cache does not know.
    pub fn missing_oids(&mut self, oids: impl IntoIterator<Item = u32>) -> Vec<u32> {
        self.expire();
        let mut v: Vec<u32> = oids.into_iter().filter(|o| *o != 0 && !self.by_oid.contains_key(o)).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The relation names among `names` the cache has never looked up.
    pub fn missing_names<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        self.expire();
        let mut v: Vec<String> = names.into_iter().filter(|n| !self.by_name.contains_key(*n)).map(String::from).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Views a reference could name (any schema when it is unqualified).
    pub fn views_named(&self, r: &RelName) -> Vec<Arc<Relation>> {
        self.by_name
            .get(&r.name)
            .map(|v| v.iter().filter(|x| x.is_view() && r.schema.as_ref().is_none_or(|s| x.name.schema.as_ref() == Some(s))).cloned().collect())
            .unwrap_or_default()
    }

    /// Whether a relation or a column of a cached relation has this name.
    pub fn knows_identifier(&self, name: &str) -> bool {
        self.by_name.get(name).is_some_and(|v| !v.is_empty()) || self.by_oid.values().any(|r| r.columns.iter().any(|c| c.name == name))
    }

    /// Whether a relation a reference could name has this column, of one of these types.
    pub fn has_column_of_type(&self, r: &RelName, column: &str, types: &[u32]) -> bool {
        self.by_name.get(&r.name).is_some_and(|v| {
            v.iter().any(|x| {
                r.schema.as_ref().is_none_or(|s| x.name.schema.as_ref() == Some(s)) && x.columns.iter().any(|c| c.name == column && types.contains(&c.type_oid))
            })
        })
    }

    /// Relations a reference could name.
    pub fn named(&self, r: &RelName) -> Vec<Arc<Relation>> {
        self.by_name
            .get(&r.name)
            .map(|v| v.iter().filter(|x| r.schema.as_ref().is_none_or(|s| x.name.schema.as_ref() == Some(s))).cloned().collect())
            .unwrap_or_default()
    }

    /// Store the relations a query returned; `looked_up` names are remembered as
    /// looked up even when nothing has them.
    pub fn insert(&mut self, relations: Vec<Relation>, looked_up: &[String]) {
        for n in looked_up {
            self.by_name.entry(n.clone()).or_default();
        }
        for r in relations {
            let r = Arc::new(r);
            let list = self.by_name.entry(r.name.name.clone()).or_default();
            list.retain(|x| x.oid != r.oid);
            list.push(r.clone());
            self.by_oid.insert(r.oid, r);
        }
    }
}

/// One catalog lookup to make on the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Relations by OID.
    Oids(Vec<u32>),
    /// Relations by name (any schema).
    Names(Vec<String>),
    /// Types created in the database, by OID.
    Types(Vec<u32>),
    /// The casts that run a function of the database's own.
    Casts,
}

/// What a lookup's rows say.
#[derive(Debug, Clone)]
pub enum Found {
    Relations(Vec<Relation>),
    Types(Vec<(u32, BinaryForm)>),
    Casts(Vec<UserCast>),
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The query for a lookup. Run with an empty search_path, so view definitions come
/// back with every relation schema-qualified.
pub fn query(lookup: &Lookup) -> String {
    let oid_list = |oids: &[u32]| oids.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(", ");
    let filter = match lookup {
        Lookup::Oids(oids) => format!("c.oid IN ({})", oid_list(oids)),
        Lookup::Names(names) => format!("c.relname IN ({})", names.iter().map(|n| quote_literal(n)).collect::<Vec<_>>().join(", ")),
        // The send function's name, not `typsend::regproc` (whose text depends on the
        // search_path).
        Lookup::Types(oids) => {
            return format!(
                "SELECT t.oid::pg_catalog.int8, t.typtype::pg_catalog.text, p.proname::pg_catalog.text \
                 FROM pg_catalog.pg_type t LEFT JOIN pg_catalog.pg_proc p ON p.oid = t.typsend WHERE t.oid IN ({}) ORDER BY t.oid",
                oid_list(oids)
            )
        }
        // Domains over a cast's target or source (at any depth) are casts too.
        Lookup::Casts => {
            return "WITH RECURSIVE target(oid, source, context) AS ( \
                 SELECT c.casttarget, c.castsource, c.castcontext FROM pg_catalog.pg_cast c \
                 WHERE c.castmethod = 'f' AND c.castfunc >= 16384::pg_catalog.oid \
                 UNION SELECT d.oid, t.source, t.context FROM pg_catalog.pg_type d JOIN target t ON d.typbasetype = t.oid WHERE d.typtype = 'd'), \
                 source(base, oid) AS (SELECT t.source, t.source FROM target t \
                 UNION SELECT s.base, d.oid FROM pg_catalog.pg_type d JOIN source s ON d.typbasetype = s.oid WHERE d.typtype = 'd') \
                 SELECT tn.nspname, tt.typname::pg_catalog.text, tt.oid::pg_catalog.int8, tt.typarray::pg_catalog.int8, \
                 sn.nspname, st.typname::pg_catalog.text, st.oid::pg_catalog.int8, st.typarray::pg_catalog.int8, t.context::pg_catalog.text \
                 FROM target t JOIN source s ON s.base = t.source \
                 JOIN pg_catalog.pg_type tt ON tt.oid = t.oid JOIN pg_catalog.pg_namespace tn ON tn.oid = tt.typnamespace \
                 JOIN pg_catalog.pg_type st ON st.oid = s.oid JOIN pg_catalog.pg_namespace sn ON sn.oid = st.typnamespace \
                 ORDER BY 3, 7"
                .to_string()
        }
    };
    format!(
        "SELECT c.oid::pg_catalog.int8, n.nspname, c.relname, c.relkind::pg_catalog.text, a.attnum, a.attname, a.atttypid::pg_catalog.int8, \
         CASE WHEN a.attnum = 1 AND c.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(c.oid) END \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE {filter} ORDER BY c.oid, a.attnum"
    )
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected catalog row: {0}")]
pub struct RowError(pub String);

/// What the rows of [`query`] for `lookup` say (text format; `None` is NULL).
pub fn parse(lookup: &Lookup, rows: &[Vec<Option<String>>]) -> Result<Found, RowError> {
    match lookup {
        Lookup::Types(_) => parse_type_rows(rows).map(Found::Types),
        Lookup::Casts => parse_cast_rows(rows).map(Found::Casts),
        _ => parse_rows(rows).map(Found::Relations),
    }
}

/// Types from the rows of a [`Lookup::Types`] query. Binary text only for an enum or
/// a base type with a text send function; everything else is opaque.
fn parse_type_rows(rows: &[Vec<Option<String>>]) -> Result<Vec<(u32, BinaryForm)>, RowError> {
    rows.iter()
        .map(|row| {
            let get = |i: usize| row.get(i).cloned().flatten();
            let oid = get(0).and_then(|v| v.parse::<u32>().ok()).ok_or_else(|| RowError("a type row without an OID".into()))?;
            let send = get(2).unwrap_or_default();
            let form = match get(1).as_deref() {
                Some("e") if send == "enum_send" => BinaryForm::Label,
                Some("b") if TEXT_SEND_FUNCTIONS.contains(&send.as_str()) => BinaryForm::Text,
                _ => BinaryForm::Opaque,
            };
            Ok((oid, form))
        })
        .collect()
}

/// Casts from the rows of a [`Lookup::Casts`] query.
fn parse_cast_rows(rows: &[Vec<Option<String>>]) -> Result<Vec<UserCast>, RowError> {
    rows.iter()
        .map(|row| {
            let get = |i: usize| row.get(i).cloned().flatten();
            let ty = |at: usize| -> Result<TypeRef, RowError> {
                let num = |i: usize| get(i).and_then(|v| v.parse::<u32>().ok()).ok_or_else(|| RowError(format!("cast column {i} is not an OID")));
                Ok(TypeRef {
                    oid: num(at + 2)?,
                    array: num(at + 3)?,
                    name: RelName { schema: get(at), name: get(at + 1).ok_or_else(|| RowError("a cast row without a type name".into()))? },
                })
            };
            Ok(UserCast { target: ty(0)?, source: ty(4)?, implicit: matches!(get(8).as_deref(), Some("i" | "a")) })
        })
        .collect()
}

/// Relations from the rows of [`query`] (text format; `None` is NULL).
pub fn parse_rows(rows: &[Vec<Option<String>>]) -> Result<Vec<Relation>, RowError> {
    let mut out: Vec<Relation> = Vec::new();
    for row in rows {
        let get = |i: usize| row.get(i).cloned().flatten();
        let num = |i: usize| get(i).and_then(|v| v.parse::<i64>().ok()).ok_or_else(|| RowError(format!("column {i} is not a number")));
        let oid = num(0)? as u32;
        let attnum = num(4)? as i16;
        let column = Column { attnum, name: get(5).ok_or_else(|| RowError("no column name".into()))?, type_oid: num(6)? as u32 };
        if out.last().is_none_or(|r| r.oid != oid) {
            let kind = match get(3).as_deref() {
                Some("r" | "p" | "f") => RelKind::Table,
                Some("S") => RelKind::Sequence,
                Some("v") => RelKind::View,
                Some("m") => RelKind::MaterializedView,
                _ => RelKind::Other,
            };
            let view = get(7).map(|def| lineage::statement_outputs(&def).ok().and_then(|s| s.into_iter().next()).unwrap_or_default());
            out.push(Relation {
                oid,
                name: RelName { schema: get(1), name: get(2).ok_or_else(|| RowError("no relation name".into()))? },
                kind,
                columns: Vec::new(),
                view,
            });
        }
        out.last_mut().expect("invariant: pushed above").columns.push(column);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &[Option<&str>]) -> Vec<Option<String>> {
        v.iter().map(|x| x.map(String::from)).collect()
    }

    #[test]
    fn rows_become_relations_with_traced_views() {
        let rows = vec![
            row(&[Some("16400"), Some("public"), Some("patients"), Some("r"), Some("1"), Some("id"), Some("23"), None]),
            row(&[Some("16400"), Some("public"), Some("patients"), Some("r"), Some("2"), Some("ssn"), Some("25"), None]),
            row(&[
                Some("16500"),
                Some("public"),
                Some("pv"),
                Some("v"),
                Some("1"),
                Some("social"),
                Some("25"),
                Some(" SELECT p.ssn AS social\n   FROM public.patients p;"),
            ]),
        ];
        let rels = parse_rows(&rows).unwrap();
        assert_eq!(rels.len(), 2);
        assert_eq!(rels[0].columns.len(), 2);
        assert_eq!(rels[0].column(2).unwrap().name, "ssn");
        let v = rels[1].view.as_ref().unwrap();
        assert_eq!(v[0].name, "social");
        assert!(v[0].sources.columns.contains(&(RelName { schema: Some("public".into()), name: "patients".into() }, "ssn".into())));
        let mut c = Catalog::default();
        c.insert(rels, &["patients".into(), "nothing".into()]);
        assert!(c.relation(16500).unwrap().is_view());
        assert_eq!(c.missing_oids([16400, 16500, 7, 0]), vec![7]);
        assert_eq!(c.missing_names(["patients", "nothing", "labs"]), vec!["labs".to_string()]);
        assert_eq!(c.views_named(&RelName { schema: None, name: "pv".into() }).len(), 1);
        assert!(c.views_named(&RelName { schema: Some("other".into()), name: "pv".into() }).is_empty());
        assert!(c.knows_identifier("patients") && c.knows_identifier("ssn") && !c.knows_identifier("nothing") && !c.knows_identifier("Jane Doe"));
        assert!(parse_rows(&[row(&[Some("x")])]).is_err());
    }

    #[test]
    fn types_are_text_labels_or_opaque_by_their_send_function() {
        let rows = vec![
            row(&[Some("16500"), Some("e"), Some("enum_send")]),
            row(&[Some("16501"), Some("b"), Some("citextsend")]),
            row(&[Some("16502"), Some("c"), Some("record_send")]),
            row(&[Some("16503"), Some("b"), Some("array_send")]),
            row(&[Some("16504"), Some("b"), Some("hstore_send")]),
            row(&[Some("16505"), Some("r"), Some("range_send")]),
        ];
        let lookup = Lookup::Types(vec![16500, 16501, 16502, 16503, 16504, 16505, 16506]);
        let found = parse(&lookup, &rows).unwrap();
        let mut c = Catalog::default();
        assert_eq!(c.missing_types([16500, 16506, 25, 0]), vec![16500, 16506], "built-in types are never looked up");
        c.store(&lookup, found);
        let forms: Vec<_> = (16500..=16506).map(|o| c.binary_form(o)).collect();
        use BinaryForm::*;
        assert_eq!(forms, [Label, Text, Opaque, Opaque, Opaque, Opaque, Opaque].map(Some), "one the catalog does not show is opaque");
        assert!(c.missing_types([16500, 16506]).is_empty());
        assert!(query(&lookup).contains("t.oid IN (16500, 16501"));
        assert!(parse(&lookup, &[row(&[Some("x"), None, None])]).is_err());
        c.clear();
        assert_eq!(c.binary_form(16500), None, "DDL forgets types too");
    }

    #[test]
    fn cast_rows_name_both_types() {
        let rows =
            vec![row(&[Some("public"), Some("pname"), Some("16800"), Some("16799"), Some("pg_catalog"), Some("int4"), Some("23"), Some("1007"), Some("e")])];
        let mut c = Catalog::default();
        assert!(c.casts_missing() && c.own_casts().is_none());
        c.store(&Lookup::Casts, parse(&Lookup::Casts, &rows).unwrap());
        assert!(!c.casts_missing());
        let cast = &c.own_casts().unwrap()[0];
        assert_eq!((cast.target.oid, cast.target.array, cast.target.name.name.as_str()), (16800, 16799, "pname"));
        assert_eq!((cast.source.oid, cast.source.name.schema.as_deref(), cast.implicit), (23, Some("pg_catalog"), false));
        assert!(query(&Lookup::Casts).contains("castfunc >= 16384"));
        assert!(parse(&Lookup::Casts, &[row(&[Some("public"), Some("t"), Some("x")])]).is_err());
        c.clear();
        assert!(c.casts_missing(), "DDL forgets casts too");
    }

    #[test]
    fn lookups_quote_names() {
        assert!(query(&Lookup::Names(vec!["o'brien".into()])).contains("c.relname IN ('o''brien')"));
        assert!(query(&Lookup::Oids(vec![1, 2])).contains("c.oid IN (1, 2)"));
    }
}

//! SQL policy: judge every statement on its parse tree — allow, block, or hold for a
//! human's approval — and the approval bookkeeping around it.
//!
//! `decide` is pure: facts from [`analyze`] plus who is asking, against compiled
//! rules. It does no I/O and holds no globals, so it is table-testable. The session
//! stage that applies decisions to the wire lives in `session::guard`.
//!
//! # Evaluation
//! For each statement: the built-in `hipaa-baseline` findings (when enabled) and every
//! configured rule that matches are collected. An `allow` rule may name baseline
//! *approval* rules in `overrides` to waive them (never baseline blocks). The most
//! severe remaining action wins — block over approve over allow — and the first rule
//! with that action is reported. If nothing matched, the identity's `default_action`
//! applies; an identity without one is denied. A message with several statements
//! gets the most severe decision of its statements. Anything PostgreSQL's parser
//! rejects is blocked.
//!
//! # Layout
//! - [`analyze`]: SQL → facts (pg_query)
//! - [`normalize`]: literal-insensitive cache keys
//! - [`cache`]: per-thread analysis cache
//! - [`baseline`]: the hipaa-baseline pack
//! - [`approval`]: pending approvals, decisions, grant windows
//! - `walk`: a complete parse-tree walker generated from pg_query's protobuf
//!   definitions by `gen_walk.py` (pg_query's own iterator skips subtrees)

pub mod analyze;
pub mod approval;
pub mod baseline;
pub mod cache;
pub mod normalize;
#[rustfmt::skip]
pub(crate) mod walk;

use std::{collections::HashMap, fmt};

use analyze::{Analysis, Facts, Kind, TableRef};

/// What happens to a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Approve,
    Block,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Approve => "approve",
            Self::Block => "block",
        })
    }
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The rule that decided (`default` when the identity's default applied).
    pub rule: String,
    pub reason: String,
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub identity: &'a str,
    pub groups: &'a [String],
}

/// A table name pattern: `schema.table`, `schema.*`, or a bare `table` (any schema).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePattern {
    schema: Option<String>,
    name: Option<String>,
}

impl TablePattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (schema, name) = match s.split_once('.') {
            Some((a, b)) => (Some(a.to_string()), b.to_string()),
            None => (None, s.to_string()),
        };
        if name.is_empty() || schema.as_deref() == Some("") || name.contains('.') {
            return Err(format!("{s:?} is not schema.table, schema.* or table"));
        }
        Ok(Self { schema, name: (name != "*").then_some(name) })
    }

    /// Unqualified references could resolve to any schema through search_path, so a
    /// bare name matches a pattern of any schema (conservative for PHI).
    pub fn matches(&self, t: &TableRef) -> bool {
        let name_ok = self.name.as_deref().is_none_or(|n| n == t.name);
        let schema_ok = match (&self.schema, &t.schema) {
            (Some(p), Some(s)) => p == s,
            _ => true,
        };
        name_ok && schema_ok
    }

    /// For rules that *allow*: an unqualified reference matches only a bare-name
    /// pattern, since search_path could make it any schema's table.
    pub fn matches_strict(&self, t: &TableRef) -> bool {
        let name_ok = self.name.as_deref().is_none_or(|n| n == t.name);
        let schema_ok = match (&self.schema, &t.schema) {
            (Some(p), Some(s)) => p == s,
            (None, _) => true,
            (Some(_), None) => false,
        };
        name_ok && schema_ok
    }

    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }
}

/// A function name pattern: exact, or a prefix ending in `*` (`dblink*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FnPattern(String);

impl FnPattern {
    pub fn new(s: &str) -> Self {
        Self(s.to_ascii_lowercase())
    }
    pub fn matches(&self, f: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => f.starts_with(prefix),
            None => self.0 == f,
        }
    }
}

/// A configured rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub reason: String,
    pub verdict: Verdict,
    /// Empty: every identity. `*` also means every identity.
    pub identities: Vec<String>,
    /// Token groups; empty: any.
    pub groups: Vec<String>,
    pub statements: Vec<Kind>,
    pub tables: Vec<TablePattern>,
    pub functions: Vec<FnPattern>,
    /// Baseline approval rules this allow rule waives.
    pub overrides: Vec<String>,
}

impl Rule {
    fn applies_to(&self, who: &Subject<'_>) -> bool {
        (self.identities.is_empty() || self.identities.iter().any(|i| i == "*" || i == who.identity))
            && (self.groups.is_empty() || self.groups.iter().any(|g| who.groups.contains(g)))
    }

    /// Restrictive rules match an unqualified table in any schema; allow rules only
    /// where the schema is certain (see [`TablePattern::matches_strict`]). An allow
    /// rule with tables must cover every table the statement touches, and one with
    /// statement kinds every kind in its tree.
    fn matches(&self, f: &Facts) -> bool {
        let tables_ok = if self.tables.is_empty() {
            true
        } else if self.verdict == Verdict::Allow {
            let mut all = f.tables.iter().chain(&f.writes).peekable();
            all.peek().is_some() && all.all(|t| self.tables.iter().any(|p| p.matches_strict(t)))
        } else {
            f.tables.iter().chain(&f.writes).any(|t| self.tables.iter().any(|p| p.matches(t)))
        };
        // Kinds are those of the whole tree (a DELETE inside a CTE, PREPARE or
        // EXPLAIN counts): a restrictive rule matches if any of them is named, an
        // allow rule only if it names all of them.
        let kinds_ok = if self.statements.is_empty() {
            true
        } else if self.verdict == Verdict::Allow {
            !f.kinds.is_empty() && f.kinds.iter().all(|k| self.statements.contains(k))
        } else {
            f.kinds.iter().any(|k| self.statements.contains(k))
        };
        kinds_ok && tables_ok && (self.functions.is_empty() || f.functions.iter().any(|n| self.functions.iter().any(|p| p.matches(n))))
    }
}

/// Settings of the built-in pack.
#[derive(Debug, Clone)]
pub struct BaselineSettings {
    pub enabled: bool,
    pub phi_tables: Vec<TablePattern>,
    /// A PHI read with a LIMIT above this needs approval.
    pub unbounded_read_limit: i64,
}

/// Everything `decide` needs.
#[derive(Debug, Clone)]
pub struct Policy {
    pub baseline: BaselineSettings,
    pub rules: Vec<Rule>,
    /// identity → default verdict (absent: denied).
    pub defaults: HashMap<String, Verdict>,
}

/// One reason a statement is not simply allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub verdict: Verdict,
    pub rule: String,
    pub reason: String,
}

impl Policy {
    pub fn is_phi(&self, t: &TableRef) -> bool {
        self.baseline.phi_tables.iter().any(|p| p.matches(t))
    }

    /// Decide one statement.
    pub fn decide_statement(&self, who: &Subject<'_>, f: &Facts) -> Decision {
        if f.too_deep {
            return Decision {
                verdict: Verdict::Block,
                rule: "too-complex".into(),
                reason: format!("the statement is nested deeper than {} levels, which phigate does not judge", walk::MAX_DEPTH),
            };
        }
        let mut findings = if self.baseline.enabled { baseline::findings(self, f) } else { Vec::new() };
        let matching: Vec<&Rule> = self.rules.iter().filter(|r| r.applies_to(who) && r.matches(f)).collect();
        for r in &matching {
            if r.verdict == Verdict::Allow && !r.overrides.is_empty() {
                findings.retain(|b| !(b.verdict == Verdict::Approve && r.overrides.contains(&b.rule)));
            }
        }
        findings.extend(matching.iter().map(|r| Finding { verdict: r.verdict, rule: r.id.clone(), reason: r.reason.clone() }));
        if let Some(worst) = findings.iter().map(|x| x.verdict).max() {
            let f = findings.into_iter().find(|x| x.verdict == worst).expect("invariant: the maximum is one of them");
            return Decision { verdict: f.verdict, rule: f.rule, reason: f.reason };
        }
        match self.defaults.get(who.identity) {
            Some(v) => Decision { verdict: *v, rule: "default".into(), reason: format!("default for identity {}", who.identity) },
            None => Decision {
                verdict: Verdict::Block,
                rule: "no-policy".into(),
                reason: format!("identity \"{}\" has no policy (set default_action or add rules)", who.identity),
            },
        }
    }

    /// Decide a whole message: the most severe decision of its statements.
    pub fn decide(&self, who: &Subject<'_>, analysis: &Analysis) -> Decision {
        let mut best: Option<Decision> = None;
        for f in &analysis.statements {
            let d = self.decide_statement(who, f);
            if best.as_ref().is_none_or(|b| d.verdict > b.verdict) {
                best = Some(d);
            }
        }
        // An empty query string does nothing.
        best.unwrap_or(Decision { verdict: Verdict::Allow, rule: "empty".into(), reason: "empty statement".into() })
    }
}

/// The decision for text PostgreSQL's parser rejects: blocked, because phigate cannot
/// know what the server would make of it.
pub fn unparseable(err: &analyze::ParseError) -> Decision {
    Decision { verdict: Verdict::Block, rule: "parse-error".into(), reason: format!("{err}; phigate blocks what it cannot parse") }
}

#[cfg(test)]
mod tests;

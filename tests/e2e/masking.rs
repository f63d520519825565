//! PHI masking on the wire: what a protected workload receives is masked by its
//! identity's profile as rows stream past — in text and binary results, for
//! statements prepared once and executed many times, through COPY TO STDOUT, aliases,
//! views and computed columns, and in error details and notifications — while
//! non-PHI data arrives byte-for-byte unchanged. A synthetic clinical dataset with
//! checksum-valid identifiers, real PostgreSQL, real eBPF redirect, psql and
//! tokio-postgres. The same queries run directly (outside the protected cgroup) give
//! the unmasked truth to compare with.

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::Duration,
};

use phigate_tests::{
    agent::{DbSpec, IdentitySpec},
    cgroup::run_in,
    clinical::Dataset,
    env::skip,
    pg::{pg_bin, PgOptions},
    target_dir, unique, wait_for, Agent, AgentConfig, PgServer, TestCgroup,
};
use serde_json::Value;

const PROFILE: &str = r#"
[[masking.profile]]
name = "care"
identities = ["care-agent"]
[[masking.profile.rule]]
column = "public.patients.ssn"
strategy = "partial"
[[masking.profile.rule]]
column = "public.patients.name"
strategy = "hash"
prefix = "pt_"
[[masking.profile.rule]]
column = "public.patients.dob"
strategy = "year"
[[masking.profile.rule]]
column = "public.patients.zip"
strategy = "zip3"
[[masking.profile.rule]]
column = "public.patients.mrn"
strategy = "redact"
[[masking.profile.rule]]
column = "public.patients.email"
strategy = "redact"
null = true
[[masking.profile.rule]]
column = "public.patients.phone"
strategy = "partial"
keep_last = 2
[[masking.profile.rule]]
id = "patient-id"
column = "public.patients.id"
strategy = "hash"
[[masking.profile.rule]]
id = "patient-id"
column = "public.encounters.patient_id"
strategy = "hash"
[[masking.profile.rule]]
name = "*ssn*"
strategy = "redact"
"#;

struct Env {
    agent: Agent,
    cg: TestCgroup,
    pg: PgServer,
    data: Dataset,
    dir: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn env() -> Env {
    env_with("")
}

/// The same, with `policy` (TOML: a `[policy]` section) before the masking profile.
fn env_with(policy: &str) -> Env {
    let dir = std::env::temp_dir().join(unique("phigate-mask"));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("masking.key");
    std::fs::write(&key, b"0123456789abcdef0123456789abcdef-test-key").unwrap();
    let pg = PgServer::start(PgOptions::default()).expect("PostgreSQL starts");
    let data = Dataset::generate(0x5eed_c1a1, 200);
    pg.psql_admin_script("postgres", &data.sql()).expect("dataset loads");
    pg.psql_admin("postgres", "create view patient_view as select name as who, ssn as social, dob from patients").expect("view");
    let cg = TestCgroup::new();
    cg.child("care");
    cg.child("plain");
    let mut cfg = AgentConfig::new(&cg)
        .database(DbSpec::new("clinical", &["127.0.0.2/32"], pg.port(), pg.socket_addr()))
        .protect(&format!("{}/care", cg.rel()), "care-agent")
        .protect(&format!("{}/plain", cg.rel()), "other-agent")
        .identity(IdentitySpec::workload("care-agent", "clinical", "postgres"))
        .identity(IdentitySpec::workload("other-agent", "clinical", "postgres"));
    cfg.extra = format!("{policy}\n[masking]\nhash_key_file = {:?}\n{PROFILE}", key.display().to_string());
    let agent = Agent::start(&cfg).expect("agent starts");
    Env { agent, cg, pg, data, dir }
}

/// psql as the care agent (through phigate), or directly as the database owner.
fn psql(e: &Env, via: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(pg_bin("psql"));
    cmd.args(["-h", "127.0.0.2", "-p", &e.pg.port().to_string(), "-U", "postgres", "-d", "postgres", "-XAtq"])
        .args(args)
        .env("PGSSLMODE", "disable")
        .stdin(Stdio::null());
    if let Some(c) = via {
        run_in(&mut cmd, &e.cg.child_dir(c));
    }
    cmd.output().expect("psql runs")
}

fn out(o: &Output) -> String {
    assert!(o.status.success(), "psql failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn pgclient(e: &Env, via: Option<&str>, args: &[&str]) -> Value {
    let bin = std::env::var_os("PHIGATE_PGCLIENT_BIN").map(PathBuf::from).unwrap_or_else(|| target_dir().join("debug/phigate-pgclient"));
    let conn = format!("host=127.0.0.2 port={} user=postgres dbname=postgres connect_timeout=10", e.pg.port());
    let mut cmd = Command::new(bin);
    cmd.arg(args[0]).arg(&conn).args(&args[1..]).stdin(Stdio::null());
    if let Some(c) = via {
        run_in(&mut cmd, &e.cg.child_dir(c));
    }
    let o = cmd.output().expect("phigate-pgclient runs");
    let v: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|err| panic!("{err}: {} {}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)));
    assert_eq!(v["ok"], true, "{v}");
    v
}

fn assert_no_phi(e: &Env, what: &str, text: &str) {
    let phi = e.data.phi_strings();
    let leaked: Vec<&String> = phi.iter().filter(|s| text.contains(s.as_str())).take(5).collect();
    assert!(leaked.is_empty(), "{what}: PHI reached the client verbatim: {leaked:?}");
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn cell_text(v: &Value) -> Option<String> {
    v.as_str().map(|h| String::from_utf8(unhex(h)).unwrap())
}

#[test]
fn psql_text_results_are_masked_by_rule_and_detector_and_non_phi_is_unchanged() {
    if skip("psql_text_results_are_masked_by_rule_and_detector_and_non_phi_is_unchanged") {
        return;
    }
    let e = env();
    let sql = "select id, mrn, name, ssn, dob, phone, email, zip from patients order by id";
    let masked = out(&psql(&e, Some("care"), &["-F", "|", "-c", sql]));
    assert_no_phi(&e, "patients", &masked);
    let rows: Vec<Vec<&str>> = masked.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows.len(), e.data.patients.len(), "every row arrives");
    let mut names = std::collections::HashSet::new();
    for (r, p) in rows.iter().zip(&e.data.patients) {
        assert_eq!(r.len(), 8);
        assert_ne!(r[0], p.id.to_string(), "the id is a pseudonym");
        assert!(r[0].parse::<i32>().unwrap() > 0, "a valid int4: {}", r[0]);
        assert_eq!(r[1], "[REDACTED]");
        assert!(r[2].starts_with("pt_") && r[2].len() == 19, "{}", r[2]);
        names.insert(r[2].to_string());
        assert_eq!(r[3], format!("***-**-{}", &p.ssn[7..]), "partial keeps the last four");
        let year: i32 = p.dob[..4].parse().unwrap();
        assert_eq!(r[4], format!("{}-01-01", year.max(2026 - 90)), "dates become the year; ages over 89 are clamped");
        assert!(r[5].ends_with(&p.phone[p.phone.len() - 2..]) && r[5].contains('*'), "{}", r[5]);
        assert_eq!(r[6], "", "email is NULL");
        let zip3 =
            if ["036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878", "879", "884", "890", "893"].contains(&&p.zip[..3]) {
                "000"
            } else {
                &p.zip[..3]
            };
        assert_eq!(r[7], zip3);
    }
    assert!(names.len() > 190, "pseudonyms keep people apart");
    // Free-text notes: every embedded identifier replaced, the clinical text kept.
    let notes = out(&psql(&e, Some("care"), &["-c", "select note from encounters order by id"]));
    assert_no_phi(&e, "notes", &notes);
    for token in ["[NAME]", "[SSN]", "[PHONE]", "[EMAIL]", "[MRN]", "[DATE]", "[CARD]", "[NPI]", "[HEALTH_PLAN]", "[URL]", "[IP]", "[VIN]", "[DEVICE]"] {
        assert!(notes.contains(token), "{token} missing from the masked notes");
    }
    assert!(notes.contains("recheck HbA1c 7.2 % in 3 months; ICD-10 E11.9."), "non-PHI text in a note survives");
    // Lab results hold no PHI: byte-for-byte what the database sends.
    let sql = "select * from labs order by id";
    assert_eq!(out(&psql(&e, Some("care"), &["-c", sql])), out(&psql(&e, None, &["-c", sql])));
    // Another identity gets the default profile (detectors on free text, no rules).
    let other = out(&psql(&e, Some("plain"), &["-c", "select note from encounters order by id limit 20"]));
    assert!(other.contains("[SSN]") && !other.contains(&e.data.patients[0].ssn));
    let masked_events = e.agent.events_named("result masked");
    assert!(masked_events.iter().any(|x| x["by_rule"].as_str().unwrap_or("").contains("public.patients.ssn=200")), "{masked_events:?}");
    assert!(masked_events.iter().any(|x| x["by_kind"].as_str().unwrap_or("").contains("ssn=200")), "{masked_events:?}");
}

#[test]
fn binary_results_are_valid_values_of_their_types_and_pseudonyms_join() {
    if skip("binary_results_are_valid_values_of_their_types_and_pseudonyms_join") {
        return;
    }
    let e = env();
    let sql = "select p.id, p.name, p.ssn, p.dob, e.note from patients p join encounters e on e.patient_id = p.id order by p.id";
    let masked = pgclient(&e, Some("care"), &["rows", sql]);
    let direct = pgclient(&e, None, &["rows", sql]);
    assert_eq!(masked["columns"], direct["columns"], "the same columns and types");
    let (m, d) = (masked["rows"].as_array().unwrap(), direct["rows"].as_array().unwrap());
    assert_eq!(m.len(), d.len(), "the same number of rows");
    let texts: Vec<String> = m.iter().flat_map(|r| [1, 2, 4].map(|i| cell_text(&r[i]).unwrap_or_default())).collect();
    assert_no_phi(&e, "binary rows", &texts.join("\n"));
    for (mr, dr) in m.iter().zip(d) {
        let id = unhex(mr[0].as_str().unwrap());
        assert_eq!(id.len(), 4, "a valid binary int4");
        assert_ne!(mr[0], dr[0]);
        let dob = unhex(mr[3].as_str().unwrap());
        assert_eq!(dob.len(), 4, "a valid binary date");
        let days = i32::from_be_bytes(dob.try_into().unwrap());
        let (y, m, dd) = civil(days);
        assert_eq!((m, dd), (1, 1), "1 January of the year: {y}-{m}-{dd}");
        assert!(cell_text(&mr[2]).unwrap().starts_with("***-**-"));
    }
    // Pseudonyms are stable across sessions and join: encounters.patient_id and
    // patients.id hash alike.
    let ids = pgclient(&e, Some("care"), &["rows", "select id from patients"]);
    let again = pgclient(&e, Some("care"), &["rows", "select id from patients"]);
    assert_eq!(ids["rows"], again["rows"], "the same pseudonyms in another session");
    let refs = pgclient(&e, Some("care"), &["rows", "select patient_id from encounters"]);
    let set: std::collections::HashSet<String> = ids["rows"].as_array().unwrap().iter().map(|r| r[0].to_string()).collect();
    let joined = refs["rows"].as_array().unwrap().iter().filter(|r| set.contains(&r[0].to_string())).count();
    assert_eq!(joined, e.data.patients.len(), "every encounter joins its patient through the pseudonym");
}

/// (year, month, day) of a PostgreSQL date (days since 2000-01-01).
fn civil(days: i32) -> (i64, i64, i64) {
    let z = i64::from(days) + 10_957 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[test]
fn prepared_statement_described_once_is_masked_on_every_execution() {
    if skip("prepared_statement_described_once_is_masked_on_every_execution") {
        return;
    }
    let e = env();
    let v = pgclient(&e, Some("care"), &["prepared", "select ssn, name, note from patients p join encounters e on e.patient_id = p.id where p.id = $1", "10"]);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 10);
    for (i, r) in rows.iter().enumerate() {
        let p = &e.data.patients[i];
        assert_eq!(cell_text(&r[0]).unwrap(), format!("***-**-{}", &p.ssn[7..]), "execution {}", i + 1);
        assert!(cell_text(&r[1]).unwrap().starts_with("pt_"));
        let note = cell_text(&r[2]).unwrap();
        assert!(!note.contains(&p.ssn) && !note.contains(&p.email) && note.contains("[SSN]"), "execution {}: {note}", i + 1);
    }
}

#[test]
fn copy_to_stdout_is_masked_in_text_csv_and_binary() {
    if skip("copy_to_stdout_is_masked_in_text_csv_and_binary") {
        return;
    }
    let e = env();
    let text = out(&psql(&e, Some("care"), &["-c", "copy patients to stdout"]));
    assert_eq!(text.lines().count(), e.data.patients.len());
    assert_no_phi(&e, "COPY text", &text);
    assert!(text.lines().next().unwrap().contains("[REDACTED]"));
    let csv = out(&psql(
        &e,
        Some("care"),
        &["-c", "copy (select p.ssn, p.name, e.note from patients p join encounters e on e.patient_id = p.id) to stdout with (format csv, header)"],
    ));
    assert_no_phi(&e, "COPY csv", &csv);
    assert!(csv.starts_with("ssn,name,note\n"), "the header passes: {}", &csv[..40.min(csv.len())]);
    assert_eq!(csv.lines().count(), e.data.patients.len() + 1);
    let o = psql(&e, Some("care"), &["-c", "copy encounters to stdout with (format binary)"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bin = String::from_utf8_lossy(&o.stdout);
    assert!(o.stdout.starts_with(b"PGCOPY\n\xff\r\n\0"), "a valid binary COPY stream");
    assert_no_phi(&e, "COPY binary", &bin);
    // \copy uses COPY TO STDOUT too.
    let script = e.dir.join("copy.sql");
    std::fs::write(&script, "\\copy (select ssn, email from patients) to stdout\n").unwrap();
    let o = out(&psql(&e, Some("care"), &["-f", script.to_str().unwrap()]));
    assert_no_phi(&e, "\\copy", &o);
    assert!(o.lines().all(|l| l.ends_with("\t\\N")), "email is NULL");
}

#[test]
fn aliases_views_and_computed_columns_do_not_dodge_the_rules() {
    if skip("aliases_views_and_computed_columns_do_not_dodge_the_rules") {
        return;
    }
    let e = env();
    for sql in [
        "select ssn as x from patients",
        "select upper(ssn) as y, ssn || '' as z, translate(ssn, '0123456789', 'abcdefghij') as w from patients",
        "select s.x from (select ssn as x from patients) s",
        "with c as (select ssn as hidden, name from patients) select hidden, lower(name) from c",
        "select row_to_json(p) from patients p",
        "select * from patient_view",
        "select upper(social), who from patient_view",
        "select mrn || ':' || name from patients",
    ] {
        let o = out(&psql(&e, Some("care"), &["-c", sql]));
        assert_eq!(o.lines().count(), e.data.patients.len(), "{sql}");
        assert_no_phi(&e, sql, &o);
        let direct = out(&psql(&e, None, &["-c", sql]));
        assert_ne!(o, direct, "{sql}: something was masked");
    }
    // The obfuscated SSNs are not readable either (the rule follows the data).
    let o = out(&psql(&e, Some("care"), &["-c", "select translate(ssn, '0123456789', 'abcdefghij') from patients"]));
    for p in &e.data.patients {
        let obfuscated: String = p.ssn.chars().map(|c| if c.is_ascii_digit() { (b'a' + c as u8 - b'0') as char } else { c }).collect();
        assert!(!o.contains(&obfuscated), "{obfuscated} in {o}");
    }
}

#[test]
fn error_details_and_notifications_do_not_leak() {
    if skip("error_details_and_notifications_do_not_leak") {
        return;
    }
    let e = env();
    let p = &e.data.patients[0];
    let o = psql(&e, Some("care"), &["-c", &format!("insert into patients (id, ssn) values (99999, '{}')", p.ssn)]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("duplicate key value violates unique constraint"), "{err}");
    assert!(err.contains("Key (ssn)=(masked by phigate) already exists."), "{err}");
    assert!(!err.contains(&p.ssn), "{err}");
    // The same error straight from the database does carry it.
    let d = psql(&e, None, &["-c", &format!("insert into patients (id, ssn) values (99999, '{}')", p.ssn)]);
    assert!(String::from_utf8_lossy(&d.stderr).contains(&p.ssn));
    let payload = format!("patient {} {} called from {}", p.first, p.last, p.phone);
    let v = pgclient(&e, Some("care"), &["notify-payload", &payload]);
    let got = v["notifications"][0].as_str().unwrap_or("").to_string();
    // The care profile has column rules: a payload is hidden whole (a trigger may
    // send a bare name, which no detector sees).
    assert_eq!(got, "phigate_test:masked by phigate", "{v}");
    assert!(wait_for(Duration::from_secs(5), || e.agent.events_named("result masked").into_iter().next()).is_some(), "the masking is logged (counts only)");
    assert!(!e.agent.raw_log().contains(&p.ssn), "no PHI in the agent's log");
}

/// PostgreSQL ignores a Sync inside COPY FROM STDIN. phigate used to count it as a
/// request still owed a ReadyForQuery, which shifted every later answer onto the
/// statement before it — masking the next query's rows with the previous query's
/// (empty) lineage.
#[test]
fn a_sync_inside_copy_from_stdin_does_not_shift_masking() {
    if skip("a_sync_inside_copy_from_stdin_does_not_shift_masking") {
        return;
    }
    let e = env();
    let sql = "select name || '' as v from patients order by id limit 5";
    let v = pgclient(&e, Some("care"), &["raw-copy", "sync", sql]);
    assert_eq!(v["open"], true, "{v}");
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    let queries = v["queries"].as_array().unwrap();
    assert_eq!(queries[0]["rows"], serde_json::json!([["x"]]), "{v}");
    let names: Vec<&str> = queries[1]["rows"].as_array().unwrap().iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(names.len(), 5, "{v}");
    for n in &names {
        assert_eq!(*n, "[REDACTED]", "a value computed from patients.name arrives redacted: {v}");
        assert!(!e.data.patients.iter().any(|p| n.contains(&p.last)), "no real name: {v}");
    }
}

/// Anything but COPY messages inside COPY FROM STDIN ends the session: whether the
/// server consumed it as a COPY error or ran it is timing phigate cannot see.
#[test]
fn a_query_inside_copy_from_stdin_ends_the_session() {
    if skip("a_query_inside_copy_from_stdin_ends_the_session") {
        return;
    }
    let e = env();
    let v = pgclient(&e, Some("care"), &["raw-copy", "query", "select 1"]);
    assert_eq!(v["open"], false, "{v}");
    let errors = v["errors"].to_string();
    assert!(errors.contains("FATAL") && errors.contains("08P01") && errors.contains("inside COPY FROM STDIN"), "{v}");
}

/// A request phigate cannot read is refused in place and never forwarded: the
/// server would have answered it, and the stages' view of whose answer is whose
/// would have slipped by one.
#[test]
fn a_malformed_query_is_refused_and_the_session_goes_on() {
    if skip("a_malformed_query_is_refused_and_the_session_goes_on") {
        return;
    }
    let e = env();
    let v = pgclient(&e, Some("care"), &["raw-malformed"]);
    assert_eq!(v["open"], true, "{v}");
    assert_eq!(v["rows"], serde_json::json!([["x"]]), "{v}");
    let errors = v["errors"].to_string();
    assert!(errors.contains("08P01") && errors.contains("phigate refused a malformed message"), "{v}");
}

/// A COPY's columns are described on phigate's side connection, which follows the
/// session's `SET search_path` but cannot see `set_config` (or a function's SET
/// clause): a relation name that exists in more than one schema could be described
/// as another relation than the one the session copies. Such a COPY is refused; named
/// with its schema it is masked as usual.
#[test]
fn a_copy_of_a_name_in_several_schemas_is_refused_unless_qualified() {
    if skip("a_copy_of_a_name_in_several_schemas_is_refused_unless_qualified") {
        return;
    }
    let e = env();
    e.pg.psql_admin(
        "postgres",
        "create schema decoy; create table decoy.patients as select id, mrn, name, ssn, dob, phone, email, zip from public.patients where false",
    )
    .expect("decoy schema");
    // phigate follows the SET (decoy first) but not set_config (back to public): the
    // session copies public.patients while the side connection would describe
    // decoy.patients, which no rule covers.
    let o = psql(
        &e,
        Some("care"),
        &["-c", "set search_path = decoy, public", "-c", "select set_config('search_path', 'public', false)", "-c", "copy patients to stdout"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("exists in more than one schema") && err.contains("patients"), "{err}");
    assert_no_phi(&e, "refused COPY", &String::from_utf8_lossy(&o.stdout));
    let text = out(&psql(&e, Some("care"), &["-c", "copy public.patients to stdout"]));
    assert_eq!(text.lines().count(), e.data.patients.len());
    assert_no_phi(&e, "qualified COPY", &text);
}

/// A binary record (`record_send`: field count, then per field its type OID, length
/// and bytes) that reads to its end; its fields' lengths are right.
fn valid_binary_record(b: &[u8]) -> bool {
    let int = |at: usize| b.get(at..at + 4).map(|x| i32::from_be_bytes(x.try_into().unwrap()));
    let Some(n) = int(0) else { return false };
    let mut at = 4;
    for _ in 0..n {
        let Some(len) = int(at + 4) else { return false };
        at += 8 + usize::try_from(len).unwrap_or(0);
    }
    at == b.len()
}

#[test]
fn functions_the_database_owners_wrote_do_not_dodge_the_rules() {
    if skip("functions_the_database_owners_wrote_do_not_dodge_the_rules") {
        return;
    }
    let e = env();
    // Functions that read PHI themselves: from a constant, a column without a rule, or
    // the whole row through PostgreSQL's column notation (`p.label` is `label(p)`).
    e.pg.psql_admin(
        "postgres",
        "create function patient_name(pid int) returns text language sql stable as $$ select name from patients where id = pid $$; \
         create function label(p patients) returns text language sql as $$ select p.name || ' ' || p.ssn $$; \
         create function name_of(pid int, unused int) returns text language sql stable as $$ select name from patients where id = pid $$; \
         create operator ### (leftarg = int, rightarg = int, function = name_of); \
         create view labs_named as select l.id, patient_name(l.patient_id) as who from labs l; \
         create type pid_t as (id int); \
         create function pid_name(p pid_t) returns text language sql stable as $$ select name from patients where id = p.id $$; \
         create cast (pid_t as text) with function pid_name(pid_t); \
         create type pname as (v text); \
         create function to_pname(pid int) returns pname language sql stable as $$ select row(name)::pname from patients where id = pid $$; \
         create cast (int as pname) with function to_pname(int)",
    )
    .expect("functions");
    let first = e.data.patients[0].id;
    let one = format!("select patient_name({first})");
    for (sql, rows) in [
        (one.as_str(), 1),
        ("select patient_name(patient_id) from labs", e.data.labs.len()),
        ("select p.label from patients p", e.data.patients.len()),
        ("select s.label from (select * from patients) s", e.data.patients.len()),
        ("select (p).label from patients p", e.data.patients.len()),
        ("select patient_id ### 0 from labs", e.data.labs.len()),
        ("select percentile_disc(0.5) within group (order by name) from patients", 1),
        ("select xmlelement(name x, patient_name(l.patient_id)) from labs l", e.data.labs.len()),
        // A view over such a function, and casts made with one.
        ("select who from labs_named", e.data.labs.len()),
        ("select row(patient_id)::pid_t::text from labs", e.data.labs.len()),
        ("select patient_id::pname from labs", e.data.labs.len()),
    ] {
        let direct = out(&psql(&e, None, &["-c", sql]));
        assert!(e.data.patients.iter().any(|p| direct.contains(&p.last)), "{sql}: the function returns names: {direct}");
        let o = out(&psql(&e, Some("care"), &["-c", sql]));
        assert_eq!(o.lines().count(), rows, "{sql}");
        assert_no_phi(&e, sql, &o);
    }
    // Built-ins are still traced through their arguments: a column without a rule
    // passes unchanged.
    let sql = "select upper(test), value + 1 from labs";
    assert_eq!(out(&psql(&e, Some("care"), &["-c", sql])), out(&psql(&e, None, &["-c", sql])), "{sql}");
}

#[test]
fn rows_of_system_views_and_copy_options_do_not_carry_phi_past_the_rules() {
    if skip("rows_of_system_views_and_copy_options_do_not_carry_phi_past_the_rules") {
        return;
    }
    let e = env();
    // pg_stats samples the table's values; its row type was numbered at initdb (below
    // the OIDs of types created later), and in binary a record the detectors cannot
    // read must not go out as it is.
    e.pg.psql_admin("postgres", "analyze patients").expect("analyze");
    let sql = "select s from pg_stats s where tablename = 'patients' and attname = 'name'";
    let direct = pgclient(&e, None, &["rows", sql]);
    let raw = String::from_utf8_lossy(&unhex(direct["rows"][0][0].as_str().expect("a row"))).into_owned();
    assert!(e.data.patients.iter().any(|p| raw.contains(&p.last)), "pg_stats holds sampled names: {raw}");
    let masked = pgclient(&e, Some("care"), &["rows", sql]);
    assert_eq!(masked["rows"][0][0], Value::Null, "{masked}");
    // In text too: its sampled values (anyarray columns, of whatever table a row
    // describes), and the extended statistics' lists of them.
    e.pg.psql_admin("postgres", "create statistics patients_mcv (mcv) on name, zip from patients; analyze patients").expect("statistics");
    for sql in [
        "select most_common_vals, histogram_bounds from pg_stats where tablename = 'patients' and attname = 'name'",
        "select most_common_vals from pg_stats_ext where tablename = 'patients'",
        "select v from pg_stats, unnest(histogram_bounds::text::text[]) v where tablename = 'patients' and attname = 'name'",
    ] {
        let direct = out(&psql(&e, None, &["-c", sql]));
        assert!(e.data.patients.iter().any(|p| direct.contains(&p.last)), "{sql}: the statistics hold names: {direct}");
        assert_no_phi(&e, sql, &out(&psql(&e, Some("care"), &["-c", sql])));
    }
    // PostgreSQL's own views built on a function in FROM are untraceable alike (a
    // custom setting holds what set_config stored); SHOW still answers.
    let sql = "select name, setting, count(*) over () > 0 from pg_settings where name = 'work_mem'";
    assert_eq!(out(&psql(&e, Some("care"), &["-c", sql])).trim(), "[REDACTED]|[REDACTED]|t");
    assert_eq!(out(&psql(&e, Some("care"), &["-c", "show work_mem"])).trim(), "4MB");
    // COPY CSV with an escape of its own: each value stays in its column, masked by
    // its rule; an ENCODING phigate cannot split is refused.
    // What psql printed and what it complained of.
    let everything = |sql: &str| {
        let o = psql(&e, Some("care"), &["-c", sql]);
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    };
    let text = everything("copy (select ',a\\' as note, name, ',b,c\"' as extra from patients) to stdout (format csv, escape '\\')");
    assert_no_phi(&e, "COPY CSV with ESCAPE", &text);
    let text = everything("copy (select name from patients) to stdout (format csv, encoding 'SJIS')");
    assert_no_phi(&e, "COPY with ENCODING", &text);
    assert!(text.contains("ENCODING"), "the refusal says why: {text}");
}

#[test]
fn binary_values_of_database_made_types_stay_valid() {
    if skip("binary_values_of_database_made_types_stay_valid") {
        return;
    }
    let e = env();
    e.pg.psql_admin("postgres", "create type contact as (label text, phone text); create type mood as enum ('ok', 'sad')").expect("types");
    let p = &e.data.patients[0];
    // tokio-postgres asks for binary results; a record's binary form is a layout of
    // its own, an enum's is its label.
    let sql = format!("select p, row('home', '{}')::contact, 'sad'::mood, p.id from patients p where p.id = {}", p.phone, p.id);
    let masked = pgclient(&e, Some("care"), &["rows", &sql]);
    let direct = pgclient(&e, None, &["rows", &sql]);
    assert_eq!(masked["columns"], direct["columns"], "the same columns and types");
    let (m, d) = (&masked["rows"][0], &direct["rows"][0]);
    assert!(valid_binary_record(&unhex(d[0].as_str().unwrap())) && valid_binary_record(&unhex(d[1].as_str().unwrap())), "direct: {d}");
    for (i, what) in [(0, "the whole patient row"), (1, "a computed record with a phone number")] {
        // NULL, or a record that still reads: never text written into its layout.
        if let Some(h) = m[i].as_str() {
            let bytes = unhex(h);
            assert!(valid_binary_record(&bytes), "{what}: not a valid binary record: {h}");
            assert_no_phi(&e, what, &String::from_utf8_lossy(&bytes));
        }
    }
    assert_eq!(cell_text(&m[0]), None, "the patient row: its strongest rule (a hash) has no record value, so NULL");
    assert!(!String::from_utf8_lossy(&unhex(m[1].as_str().unwrap_or(""))).contains(&p.phone), "the phone number does not pass");
    assert_eq!(cell_text(&m[2]).as_deref(), Some("sad"), "an enum passes as it is");
}

#[test]
fn binary_text_arrays_are_masked_element_by_element() {
    if skip("binary_text_arrays_are_masked_element_by_element") {
        return;
    }
    let e = env();
    let p = &e.data.patients[0];
    // tokio-postgres reads text[] in binary: each element through the detectors, the
    // array still a valid one (its direct form decodes element by element).
    let sql = format!("select array['stable', null, 'call {} after six', '']::text[] as notes", p.phone);
    let masked = pgclient(&e, Some("care"), &["rows", &sql]);
    let direct = pgclient(&e, None, &["rows", &sql]);
    let elements = |hex: &str| -> Vec<Option<String>> {
        let b = unhex(hex);
        let int = |at: usize| i32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        assert_eq!((int(0), int(8), int(12)), (1, 25, 4), "one dimension of 4 text elements");
        let mut at = 20;
        let out = (0..4)
            .map(|_| {
                let len = int(at);
                at += 4;
                (len >= 0).then(|| {
                    at += len as usize;
                    String::from_utf8(b[at - len as usize..at].to_vec()).unwrap()
                })
            })
            .collect();
        assert_eq!(at, b.len(), "the array reads to its end");
        out
    };
    let d = elements(direct["rows"][0][0].as_str().unwrap());
    let m = elements(masked["rows"][0][0].as_str().unwrap());
    assert_eq!(d[2].as_deref(), Some(format!("call {} after six", p.phone).as_str()));
    assert_eq!(m, [Some("stable".to_string()), None, Some("call [PHONE] after six".into()), Some(String::new())]);
}

#[test]
fn a_password_message_after_login_ends_the_session_and_never_reaches_the_database() {
    if skip("a_password_message_after_login_ends_the_session_and_never_reaches_the_database") {
        return;
    }
    let e = env();
    let v = pgclient(&e, Some("care"), &["raw-password"]);
    assert_eq!(v["open"], false, "{v}");
    let errors = v["errors"].to_string();
    assert!(errors.contains("FATAL") && errors.contains("08P01") && errors.contains("password message after login"), "{v}");
    // PostgreSQL never saw it (it would log an invalid frontend message type 112).
    assert!(!e.pg.log().contains("message type 112"), "{}", e.pg.log());
}

// Paths found by a review (each failed before its fix, on PostgreSQL 15). The policy
// is the README's: patients and encounters are PHI tables, so what runs below is what
// the SQL policy allows. Each test runs all of its cases and prints what came back
// through phigate before it fails.

const PHI_POLICY: &str = "[policy]\nphi_tables = [\"public.patients\", \"public.encounters\"]\nunbounded_read_limit = 1000\n";

/// What psql printed and what it complained of (errors included).
fn everything(e: &Env, via: Option<&str>, args: &[&str]) -> String {
    let o = psql(e, via, args);
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// phigate-pgclient's `raw-rename` scenario: every DataRow and error it got, as JSON.
fn raw_rename(e: &Env, via: Option<&str>, scenario: &str) -> String {
    pgclient(e, via, &["raw-rename", scenario]).to_string()
}

/// Each case: (what, direct output, output through phigate, the secrets to look for).
/// Fails listing every case whose secret came through, after printing all of them.
fn assert_no_case_leaks(cases: &[(String, String, String, Vec<String>)]) {
    let mut leaked = Vec::new();
    for (what, direct, masked, secrets) in cases {
        let through: Vec<&String> = secrets.iter().filter(|s| masked.contains(s.as_str())).collect();
        println!("== {what}\n   direct:  {}\n   phigate: {}\n   verbatim through phigate: {through:?}", direct.trim(), masked.trim());
        assert!(secrets.iter().any(|s| direct.contains(s.as_str())), "{what}: the direct run must show the secret: {direct}");
        if !through.is_empty() {
            leaked.push(what.clone());
        }
    }
    assert!(leaked.is_empty(), "PHI reached the client verbatim through phigate in: {leaked:#?}");
}

fn names(e: &Env) -> Vec<String> {
    e.data.patients.iter().map(|p| format!("{} {}", p.first, p.last)).collect()
}

#[test]
fn a_statement_or_portal_name_redefined_by_sql_is_not_masked_by_its_old_plan() {
    if skip("a_statement_or_portal_name_redefined_by_sql_is_not_masked_by_its_old_plan") {
        return;
    }
    let e = env_with(PHI_POLICY);
    // statement: Parse + Describe S "q" (select test from labs), Sync; then Query
    // `deallocate q; prepare q as select name from patients where id = 1`; then Bind ""
    // to "q" + Execute + Sync, with no Describe.
    // portal: begin; Parse "s" (labs) + Bind "c" + Describe P "c" + Execute "c"; then
    // Query `close c; declare c cursor for select name from patients where id = 1`;
    // then Execute "c".
    let cases: Vec<_> =
        ["statement", "portal"].into_iter().map(|sc| (sc.to_string(), raw_rename(&e, None, sc), raw_rename(&e, Some("care"), sc), names(&e))).collect();
    assert_no_case_leaks(&cases);
}

#[test]
fn values_kept_in_settings_or_large_objects_come_back_masked() {
    if skip("values_kept_in_settings_or_large_objects_come_back_masked") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let first = e.data.patients[0].id;
    let mut cases = Vec::new();
    // A large object: the policy does not stop writing one from PHI, and reading it
    // back is a built-in of a constant (first as the database owner, then — after
    // unlinking — as the care agent).
    let write = format!("select lo_from_bytea(4242, convert_to(name, 'UTF8')) from patients where id = {first}");
    let read = "select convert_from(lo_get(4242), 'UTF8')";
    let direct = everything(&e, None, &["-c", &write, "-c", read, "-c", "select lo_unlink(4242)"]);
    let masked = everything(&e, Some("care"), &["-c", &write, "-c", read]);
    cases.push((format!("{write}; {read}"), direct, masked, names(&e)));
    // Settings: with phi_tables, set_config() of a name straight from patients is
    // blocked, but not from a view over it (patient_view, created by env). SHOW of a
    // custom setting and current_setting()/SHOW of a built-in string setting answer
    // what was stored.
    for (set, get) in [
        ("select set_config('x.v', who, false) from patient_view limit 1", "show x.v"),
        ("select set_config('application_name', who, false) from patient_view limit 1", "select current_setting('application_name')"),
        ("select set_config('application_name', who, false) from patient_view limit 1", "show application_name"),
        ("select set_config('search_path', quote_ident(who), false) from patient_view limit 1", "show search_path"),
    ] {
        cases.push(args_case(&e, format!("{set}; {get}"), &["-c", set, "-c", get], names(&e)));
    }
    assert_no_case_leaks(&cases);
}

#[test]
fn other_sessions_statements_read_through_builtin_functions_are_masked() {
    if skip("other_sessions_statements_read_through_builtin_functions_are_masked") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let who = names(&e)[0].clone();
    // Another session (an application, the DBA) running a query with a patient's name
    // in its text; pg_stat_activity is redacted under column rules, the functions
    // under it are not.
    let mut bg = Command::new(pg_bin("psql"));
    bg.args(["-h", "127.0.0.2", "-p", &e.pg.port().to_string(), "-U", "postgres", "-d", "postgres", "-XAtq", "-c"])
        .arg(format!("select pg_sleep(6) from patients where name = '{}'", who.replace('\'', "''")))
        .env("PGSSLMODE", "disable")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = bg.spawn().expect("background psql");
    std::thread::sleep(Duration::from_secs(2));
    let mut cases = Vec::new();
    for sql in [
        "select pg_stat_get_backend_activity(i) from generate_series(1, 200) i where pg_stat_get_backend_activity(i) like '%pg_sleep(6)%'",
        "select pg_stat_get_activity(null) from generate_series(1, 1) where true",
    ] {
        cases.push(args_case(&e, sql.to_string(), &["-c", sql], vec![who.clone()]));
    }
    let _ = child.wait();
    assert_no_case_leaks(&cases);
}

#[test]
fn extended_statistics_read_from_their_catalog_table_are_masked() {
    if skip("extended_statistics_read_from_their_catalog_table_are_masked") {
        return;
    }
    let e = env_with(PHI_POLICY);
    e.pg.psql_admin("postgres", "create statistics patients_mcv (mcv) on name, zip from patients; analyze patients").expect("statistics");
    // pg_stats_ext is untraceable (a function in FROM); the catalog table under it,
    // with pg_mcv_list_items() in the target list, was traced to a column without rules.
    let head = |t: String| t.lines().take(3).collect::<Vec<_>>().join(" / ");
    let sql = "select pg_mcv_list_items(stxdmcv) from pg_statistic_ext_data";
    let cases = [(sql.to_string(), head(everything(&e, None, &["-c", sql])), head(everything(&e, Some("care"), &["-c", sql])), names(&e))];
    assert_no_case_leaks(&cases);
}

#[test]
fn values_errors_echo_without_quotes_are_hidden() {
    if skip("values_errors_echo_without_quotes_are_hidden") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let digits = p.ssn.replace('-', "");
    let name_ = format!("{}_{}", p.first, p.last);
    let mut cases = Vec::new();
    for (sql, secret) in [
        // date out of range: 1000YYYY-MM-DD (the date of birth, under a `year` rule)
        (format!("select make_date(extract(year from dob)::int + 10000000, extract(month from dob)::int, extract(day from dob)::int) from patients where id = {}", p.id), p.dob.clone()),
        // requested character too large for encoding: <ssn digits>
        (format!("select chr(replace(ssn, '-', '')::int) from patients where id = {}", p.id), digits.clone()),
        // index <ssn digits> out of valid range, 0..7
        (format!("select set_bit('\\x00'::bytea, replace(ssn, '-', '')::int8, 1) from patients where id = {}", p.id), digits.clone()),
        // operator does not exist: First_Last
        (format!("select translate(name, ' ', '_')::regoper from patients where id = {}", p.id), name_.clone()),
    ] {
        cases.push(args_case(&e, sql.clone(), &["-c", &sql], vec![secret]));
    }
    assert_no_case_leaks(&cases);
}

#[test]
fn column_alias_lists_and_pieces_of_values_do_not_dodge_the_rules() {
    if skip("column_alias_lists_and_pieces_of_values_do_not_dodge_the_rules") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let mut cases = Vec::new();
    // A FROM item's column alias list renames columns; lineage ignores it.
    for sql in [
        format!("select z || '' from patients as p(x, y, z) where x = {}", p.id),
        "select w || '' from patient_view as pv(w) limit 1".to_string(),
        format!("with c as (select name, 'x' as k from patients where id = {}) select k || '' from c as c2(k, n)", p.id),
    ] {
        cases.push(args_case(&e, sql.clone(), &["-c", &sql], names(&e)));
    }
    // Pieces of a `partial` column (ssn keeps 4) and numbers of a `year` column pass
    // whole: the SSN and the date of birth reassemble.
    let sql = format!("select substr(ssn, 1, 3) || '-' || substr(ssn, 5, 2) || '-' || substr(ssn, 8, 4) as ssn_again from patients where id = {}", p.id);
    let pieces = format!("select substr(ssn, 1, 3), substr(ssn, 5, 2), substr(ssn, 8, 4) from patients where id = {}", p.id);
    let direct = everything(&e, None, &["-c", &sql]);
    let masked = everything(&e, Some("care"), &["-F", "-", "-c", &pieces]);
    cases.push((pieces, direct, masked, vec![p.ssn.clone()]));
    // Someone under 90, whose year the `year` rule shows as it is.
    let young = e.data.patients.iter().find(|q| q.dob[..4].parse::<i32>().unwrap() > 1950).expect("a patient born after 1950");
    let dob = format!("select lpad(extract(month from dob)::text, 2, '0'), lpad(extract(day from dob)::text, 2, '0') from patients where id = {}", young.id);
    let direct = everything(&e, None, &["-F", "-", "-c", &dob]);
    // Through phigate: the year from `select dob` (the rule's own output, YYYY-01-01),
    // then month and day, numbers up to 31, which the `year` rule keeps.
    let year = everything(&e, Some("care"), &["-c", &format!("select dob from patients where id = {}", young.id)]);
    let masked = everything(&e, Some("care"), &["-F", "-", "-c", &dob]);
    let rebuilt = format!("{}-{}", year.trim().get(..4).unwrap_or(""), masked.trim());
    cases.push((format!("select dob …; {dob}"), format!("{}-{}", &young.dob[..4], direct.trim()), rebuilt, vec![young.dob.clone()]));
    // Not covered (README): PHI copied into a PHI table's column with weaker rules
    // (`update encounters set note = p.name from patients p …`) comes back by that
    // column's rules; masking follows columns, not values.
    assert_no_case_leaks(&cases);
}

// Leaks found by a second review on PostgreSQL 15 through the agent (each failed before its fix).

/// A parenthesized JOIN with an alias (`(patients p cross join labs l) as j`) is no
/// FROM item lineage registers: `j` as a whole row and the names of its column alias
/// list (`j(a, b, c)`) are taken for columns `j` / `c` of each joined table, which no
/// rule names, so the value goes to the detectors (a bare name passes them).
#[test]
fn join_aliases_do_not_dodge_the_rules() {
    if skip("join_aliases_do_not_dodge_the_rules") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let mut cases = Vec::new();
    for sql in [
        "select j::text from (patients p cross join labs l) as j limit 3",
        "select row_to_json(j) from (patients p cross join labs l) as j limit 3",
        "select c || '' from (patients p cross join labs l) as j(a, b, c) limit 3",
    ] {
        cases.push(args_case(&e, sql.to_string(), &["-c", sql], names(&e)));
    }
    assert_no_case_leaks(&cases);
}

/// Built-ins that store a computed value in server state the policy does not treat as
/// a copy (sequences, advisory locks, replication origins and slots, the time zone),
/// read back by a built-in or a catalog column phigate takes for a value without
/// sources.
#[test]
fn values_kept_in_sequences_locks_replication_state_or_the_time_zone_come_back_masked() {
    if skip("values_kept_in_sequences_locks_replication_state_or_the_time_zone_come_back_masked") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let digits = p.ssn.replace('-', "");
    let name = format!("{} {}", p.first, p.last);
    let mut cases = Vec::new();
    let scenarios: Vec<(Vec<String>, Vec<String>, Vec<String>)> = vec![
        // (statements, cleanup run directly afterwards, secrets)
        (
            vec![
                "create temp sequence s".into(),
                format!("select setval('s', replace(ssn, '-', '')::bigint) from patients where id = {}", p.id),
                "select currval('s')".into(),
                "select last_value from s".into(),
            ],
            vec![],
            vec![digits.clone()],
        ),
        (
            vec![format!("select pg_advisory_lock(replace(ssn, '-', '')::bigint) from patients where id = {}", p.id), "select pg_lock_status()::text".into()],
            vec![],
            vec![digits.clone()],
        ),
        (
            vec![format!("select pg_replication_origin_create(name) from patients where id = {}", p.id), "select roname from pg_replication_origin".into()],
            vec!["select pg_replication_origin_drop(roname) from pg_replication_origin".into()],
            vec![name.clone()],
        ),
        (
            vec![
                format!("select pg_create_physical_replication_slot(lower(replace(name, ' ', '_'))) from patients where id = {}", p.id),
                "select pg_get_replication_slots()::text".into(),
            ],
            vec!["select pg_drop_replication_slot(slot_name) from pg_replication_slots".into()],
            vec![format!("{}_{}", p.first, p.last).to_lowercase()],
        ),
        (
            // set_config from patient_view (the policy blocks it from patients only, as
            // in values_kept_in_settings_or_large_objects_come_back_masked); TimeZone is
            // on the fixed-value list, but a POSIX zone's <abbreviation> is free text.
            vec![
                "select set_config('timezone', '<' || who || '>+5', false) from patient_view where who = (select who from patient_view limit 1) limit 1"
                    .to_string(),
                "show timezone".into(),
                "select current_setting('TimeZone')".into(),
            ],
            vec![],
            names(&e).iter().map(|n| n.to_uppercase()).collect(),
        ),
    ];
    for (stmts, cleanup, secrets) in scenarios {
        let mut args: Vec<&str> = Vec::new();
        for s in &stmts {
            args.extend(["-c", s.as_str()]);
        }
        let mut direct_args = args.clone();
        for s in &cleanup {
            direct_args.extend(["-c", s.as_str()]);
        }
        let direct = everything(&e, None, &direct_args);
        let masked = everything(&e, Some("care"), &args);
        for s in &cleanup {
            let _ = everything(&e, None, &["-c", s]);
        }
        cases.push((stmts.join("; "), direct, masked, secrets));
    }
    assert_no_case_leaks(&cases);
}

/// `partial`, `zip3` and `year` on a computed value show part of it by design; the
/// computation chooses which part: a piece padded to more than 2×keep_last letters
/// shows its last 4 digits, punctuation is kept as it is (translate digits to
/// punctuation), zip3 keeps the first three digits of whatever text it is given, and
/// `year` keeps any four-digit group of a non-number text (month and day + 2000).
#[test]
fn padded_or_translated_pieces_of_partial_zip3_and_year_columns_reassemble() {
    if skip("padded_or_translated_pieces_of_partial_zip3_and_year_columns_reassemble") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let last4 = |s: &str| s.chars().rev().filter(|c| c.is_ascii_alphanumeric()).take(4).collect::<Vec<_>>().into_iter().rev().collect::<String>();
    let untranslate = |s: &str| {
        s.chars()
            .map(|c| match "!@#$%^&*=~".find(c) {
                Some(i) => char::from(b'0' + i as u8),
                None => c,
            })
            .collect::<String>()
    };
    let mut cases = Vec::new();
    // SSN: three padded pieces.
    let sql = format!(
        "select 'aaaaa' || substr(ssn, 1, 3) || substr(ssn, 5, 1), 'aaaaa' || substr(ssn, 6, 1) || substr(ssn, 8, 3), 'aaaaa' || substr(ssn, 8, 4) from patients where id = {}",
        p.id
    );
    let rebuild = |out: &str| {
        let cols: Vec<&str> = out.trim().split('|').collect();
        if cols.len() != 3 {
            return out.to_string();
        }
        let (a, b, c) = (last4(cols[0]), last4(cols[1]), last4(cols[2]));
        format!("{}-{}{}-{}", a.get(..3).unwrap_or(""), a.get(3..).unwrap_or(""), b.get(..1).unwrap_or(""), c)
    };
    let direct = rebuild(&everything(&e, None, &["-F", "|", "-c", &sql]));
    let raw = everything(&e, Some("care"), &["-F", "|", "-c", &sql]);
    let masked = format!("{} (raw: {})", rebuild(&raw), raw.trim());
    cases.push((sql, direct, masked, vec![p.ssn.clone()]));
    // SSN and phone: digits translated to punctuation, which partial keeps.
    for col in ["ssn", "phone"] {
        let sql = format!("select translate({col}, '0123456789', '!@#$%^&*=~') from patients where id = {}", p.id);
        let direct = untranslate(&everything(&e, None, &["-c", &sql]));
        let raw = everything(&e, Some("care"), &["-c", &sql]);
        let masked = format!("{} (raw: {})", untranslate(&raw), raw.trim());
        cases.push((sql, direct, masked, vec![p.ssn.clone(), p.phone.clone()]));
    }
    // ZIP: zip3 of the zip, then of its last three digits.
    let q = e
        .data
        .patients
        .iter()
        .find(|q| !strategy_restricted(&q.zip[..3]) && !strategy_restricted(&q.zip[2..]))
        .expect("a patient whose zip pieces are not restricted prefixes");
    let sql = format!("select zip, substr(zip, 3) from patients where id = {}", q.id);
    let rebuild = |out: &str| {
        let cols: Vec<&str> = out.trim().split('|').collect();
        match cols.as_slice() {
            [a, b] if a.len() >= 3 && b.len() >= 3 => format!("{}{}", &a[..3], &b[1..]),
            _ => out.to_string(),
        }
    };
    let direct = rebuild(&everything(&e, None, &["-F", "|", "-c", &sql]));
    let raw = everything(&e, Some("care"), &["-F", "|", "-c", &sql]);
    let masked = format!("{} (raw: {})", rebuild(&raw), raw.trim());
    cases.push((sql, direct, masked, vec![q.zip.clone()]));
    // Date of birth: the year, and month and day as a "year" (2000 + MMDD).
    let sql = format!("select dob, 'd' || (2000 + to_char(dob, 'MMDD')::int) from patients where id = {}", p.id);
    let rebuild = |out: &str| {
        let cols: Vec<&str> = out.trim().split('|').collect();
        match cols.as_slice() {
            [y, md] if y.len() >= 4 => {
                let n: i32 = md.trim_start_matches('d').parse().unwrap_or(0) - 2000;
                format!("{}-{:02}-{:02}", &y[..4], n / 100, n % 100)
            }
            _ => out.to_string(),
        }
    };
    let direct = rebuild(&everything(&e, None, &["-F", "|", "-c", &sql]));
    let raw = everything(&e, Some("care"), &["-F", "|", "-c", &sql]);
    let masked = format!("{} (raw: {})", rebuild(&raw), raw.trim());
    cases.push((sql, direct, masked, vec![p.dob.clone()]));
    assert_no_case_leaks(&cases);
}

fn strategy_restricted(zip3: &str) -> bool {
    ["036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878", "879", "884", "890", "893"].contains(&zip3)
}

/// `hash` on a computed value is a keyed pseudonym of whatever the computation gave:
/// `chr(c) || substr(name, 1, 0)` hashes a chosen letter (a dictionary of
/// pseudonyms) and `substr(name, i, 1)` each letter of the name, so the name reads
/// back letter by letter.
#[test]
fn hash_pseudonyms_of_chosen_text_and_of_single_letters_spell_the_name() {
    if skip("hash_pseudonyms_of_chosen_text_and_of_single_letters_spell_the_name") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let name = format!("{} {}", p.first, p.last);
    let dict_sql = format!("select chr(g.c) || substr(p.name, 1, 0), g.c from patients p, generate_series(32, 126) g(c) where p.id = {}", p.id);
    let letters_sql =
        format!("select substr(p.name, g.i, 1), g.i from patients p, generate_series(1, 60) g(i) where p.id = {} and g.i <= length(p.name) order by g.i", p.id);
    let spell = |via: Option<&str>| {
        let dict = everything(&e, via, &["-F", "|", "-c", &dict_sql]);
        let map: std::collections::HashMap<String, char> =
            dict.lines().filter_map(|l| l.rsplit_once('|')).filter_map(|(h, c)| c.trim().parse::<u8>().ok().map(|c| (h.to_string(), char::from(c)))).collect();
        let letters = everything(&e, via, &["-F", "|", "-c", &letters_sql]);
        let spelt: String = letters.lines().filter_map(|l| l.rsplit_once('|')).map(|(h, _)| map.get(h).copied().unwrap_or('?')).collect();
        format!("{spelt}\n(raw: {})", letters.lines().take(3).collect::<Vec<_>>().join(" "))
    };
    let cases = [(format!("{dict_sql}; {letters_sql}"), spell(None), spell(Some("care")), vec![name])];
    assert_no_case_leaks(&cases);
}

/// A column that may hold chosen text beside a hashed column's values — another arm
/// of a UNION, another row of VALUES, the merged column of a JOIN … USING — would
/// give that text the pseudonym a patient with that name has: a dictionary of names
/// to compare the patients' pseudonyms with.
#[test]
fn chosen_text_beside_a_hashed_column_gets_no_pseudonym() {
    if skip("chosen_text_beside_a_hashed_column_gets_no_pseudonym") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let name = format!("{} {}", p.first, p.last);
    let pseudonym = first_patients_pseudonym(&e);
    let pseudonym = pseudonym.as_str();
    for sql in [
        format!("select name from patients where false union all select '{name}'"),
        format!("select name from (values ('{name}')) v(name) full join (select name from patients where false) p using (name)"),
        format!("select name from (values ((select name from patients where id = {})), ('{name}')) v(name) offset 1", p.id),
    ] {
        let got = everything(&e, Some("care"), &["-At", "-c", &sql]);
        assert!(!got.contains(pseudonym) && !got.contains(&name), "{sql}: {got}");
        assert!(got.trim().lines().count() == 1 && !got.contains("ERROR"), "one row, masked: {sql}: {got}");
    }
}

// Leaks found by a third review on PostgreSQL 15 through the agent.

/// A function in FROM computes its columns from its arguments, but a bare column as
/// the argument leaves the value "as it is" for lineage: `string_to_table(p.name,
/// null)` hands out the pseudonym of each letter of the name and `string_to_table('
/// …', null, p.name)` that of each chosen letter; `string_to_table(p.ssn, null, 'd')`
/// makes the SSN's digit d NULL (partial shows each other digit as '*'). And an
/// untraceable function in FROM (`lateral substr(v.who, g, 1)`, `lateral chr(g)`)
/// gets the strongest rule of what the statement reads — patient_view's is `hash`.
#[test]
fn functions_in_from_do_not_hand_out_pseudonyms_of_pieces() {
    if skip("functions_in_from_do_not_hand_out_pseudonyms_of_pieces") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let name = format!("{} {}", p.first, p.last);
    let alphabet: String = (32u8..127).map(char::from).collect();
    let mut cases = Vec::new();
    // Each line of `dict` is the (pseudonym of the) alphabet's next letter.
    let spell = |dict: &str, letters: &str| {
        let map: std::collections::HashMap<&str, char> = dict.lines().zip(alphabet.chars()).collect();
        let spelt: String = letters.lines().map(|h| map.get(h).copied().unwrap_or('?')).collect();
        format!("{spelt}\n(raw: {})", letters.lines().take(3).collect::<Vec<_>>().join(" "))
    };
    let dict_sql = format!("select c from patients p, string_to_table('{}', null, p.name) c where p.id = {}", alphabet.replace('\'', "''"), p.id);
    let letters_sql = format!("select c from patients p, string_to_table(p.name, null) c where p.id = {}", p.id);
    let run = |via: Option<&str>| spell(&everything(&e, via, &["-c", &dict_sql]), &everything(&e, via, &["-c", &letters_sql]));
    cases.push((format!("{dict_sql}; {letters_sql}"), run(None), run(Some("care")), vec![name.clone()]));
    // The same through an untraceable function in FROM, over patient_view.
    let dict_sql = "select x from (select who from patient_view order by who limit 1) v, generate_series(32, 126) g, lateral chr(g) x order by g".to_string();
    let letters_sql =
        "select x from (select who from patient_view order by who limit 1) v, generate_series(1, 60) g, lateral substr(v.who, g, 1) x where g <= length(v.who) order by g"
            .to_string();
    let run = |via: Option<&str>| spell(&everything(&e, via, &["-c", &dict_sql]), &everything(&e, via, &["-c", &letters_sql]));
    cases.push((format!("{dict_sql}; {letters_sql}"), run(None), run(Some("care")), names(&e)));
    // SSN: the positions of each digit, one statement per digit.
    let ssn_of = |via: Option<&str>| {
        let mut rebuilt: Vec<char> = Vec::new();
        for d in 0..=9 {
            let sql = format!("select c from patients p, string_to_table(p.ssn, null, '{d}') c where p.id = {}", p.id);
            let out = everything(&e, via, &["-P", "null=NULL", "-c", &sql]);
            for (i, line) in out.lines().enumerate() {
                if rebuilt.len() <= i {
                    rebuilt.push('?');
                }
                match line {
                    "NULL" => rebuilt[i] = char::from(b'0' + d),
                    "-" => rebuilt[i] = '-',
                    _ => {}
                }
            }
        }
        rebuilt.into_iter().collect::<String>()
    };
    cases.push((
        format!("select c from patients p, string_to_table(p.ssn, null, '<d>') c where p.id = {}", p.id),
        ssn_of(None),
        ssn_of(Some("care")),
        vec![p.ssn.clone()],
    ));
    assert_no_case_leaks(&cases);
}

/// The policy checks the value argument of large object writes, not the OID: a large
/// object created with the SSN's nine digits as its OID (`lo_create`,
/// `lo_from_bytea(oid, '')`) is listed by pg_largeobject_metadata, a catalog table no
/// rule names.
#[test]
fn a_large_object_oid_made_from_a_value_does_not_show_it() {
    if skip("a_large_object_oid_made_from_a_value_does_not_show_it") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let digits = p.ssn.replace('-', "").trim_start_matches('0').to_string();
    let mut cases = Vec::new();
    for write in [
        format!("select lo_create(replace(ssn, '-', '')::bigint::oid) from patients where id = {}", p.id),
        format!("select lo_from_bytea(replace(ssn, '-', '')::bigint::oid, '') from patients where id = {}", p.id),
    ] {
        let read = "select oid from pg_largeobject_metadata";
        let cleanup = "select lo_unlink(oid) from pg_largeobject_metadata";
        let direct = everything(&e, None, &["-c", &write, "-c", read, "-c", cleanup]);
        let masked = everything(&e, Some("care"), &["-c", &write, "-c", read]);
        let _ = everything(&e, None, &["-c", cleanup]);
        cases.push((format!("{write}; {read}"), direct, masked, vec![digits.clone()]));
    }
    assert_no_case_leaks(&cases);
}

// Leaks found by a fourth review (each test failed before the fix; the comments say
// what happened then) (pseudonym oracles): lineage over-approximates a
// column's sources by adding every candidate it cannot rule out (every scope level's
// item with a column of that name, every `*`, a later CTE of WITH RECURSIVE), but
// adds them with `extend`, not as alternatives: the column stays "the hashed column
// as it is" although PostgreSQL reads it from chosen text. The value then gets the
// `hash` strategy — the pseudonym a patient with that name has, so a workload can
// compare a dictionary of names with the patients' pseudonyms.

/// The pseudonym the "care" identity gets for the first patient's name.
fn first_patients_pseudonym(e: &Env) -> String {
    let own = everything(e, Some("care"), &["-At", "-c", &format!("select name from patients where id = {}", e.data.patients[0].id)]);
    assert!(own.trim().starts_with("pt_"), "the name's own column is hashed: {own}");
    own.trim().to_string()
}

/// A case of [`assert_no_case_leaks`]: `sql` run directly and as "care" (`-At`).
fn at_case(e: &Env, sql: String, secrets: Vec<String>) -> (String, String, String, Vec<String>) {
    let args = ["-At", "-c", &sql];
    args_case(e, sql.clone(), &args, secrets)
}

/// A case of [`assert_no_case_leaks`]: psql with `args`, directly and through phigate.
fn args_case(e: &Env, what: String, args: &[&str], secrets: Vec<String>) -> (String, String, String, Vec<String>) {
    (what, everything(e, None, args), everything(e, Some("care"), args), secrets)
}

/// Each SQL returns the chosen text (the first patient's name) in one column whose
/// RowDescription has table OID 0. Through phigate none may show the pseudonym the
/// patient's own name column gets. Fails listing every SQL that did.
fn assert_no_pseudonym_of_chosen_text(e: &Env, sqls: &[String]) {
    let leaked = pseudonyms_of_chosen_text(e, sqls);
    assert!(leaked.is_empty(), "chosen text got the hashed column's pseudonym through phigate: {leaked:#?}");
}

/// The SQL of `sqls` (each returning the chosen text alone) whose result through
/// phigate shows the patient's pseudonym, with what came back.
fn pseudonyms_of_chosen_text(e: &Env, sqls: &[String]) -> Vec<String> {
    let p = &e.data.patients[0];
    let name = format!("{} {}", p.first, p.last);
    let pseudonym = first_patients_pseudonym(e);
    let mut leaked = Vec::new();
    for sql in sqls {
        let direct = everything(e, None, &["-At", "-c", sql]);
        let got = everything(e, Some("care"), &["-At", "-c", sql]);
        println!("== {sql}\n   direct:  {}\n   phigate: {}\n   patient's own pseudonym: {pseudonym}", direct.trim(), got.trim());
        assert_eq!(direct.trim(), name, "{sql}: the direct run returns the chosen text, not a patient's value");
        // The hex without the prefix: every hash rule uses the same key and no domain
        // separation, so another hash rule's output of the text is the same pseudonym.
        // (The chosen text itself may come back: the workload wrote it.)
        if got.contains(pseudonym.trim_start_matches("pt_")) {
            leaked.push(format!("{sql} => {}", got.trim()));
        }
    }
    leaked
}

/// An unqualified name is looked up at every scope level and the sources of every
/// level are merged (Scope::unqualified_column walks the parents even after a match),
/// and a FROM subquery sees its siblings (the `view` scope): an inner item's column
/// named `name` (a VALUES list) shadows patients.name for PostgreSQL, but lineage
/// adds patients.name "as it is" to the constant's empty sources.
///   select (select name from (values ('<name>')) v(name)) as x from patients where id = <id>
///   select s.n from patients p, (select name as n from (values ('<name>')) v(name)) s where p.id = <id>
/// Through phigate each returned `pt_<pseudonym of the patient's name>`, exactly what
/// `select name from patients where id = <id>` returns (directly: the name).
#[test]
fn an_inner_column_shadowing_a_hashed_name_gets_no_pseudonym() {
    if skip("an_inner_column_shadowing_a_hashed_name_gets_no_pseudonym") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let name = format!("{} {}", p.first, p.last);
    assert_no_pseudonym_of_chosen_text(
        &e,
        &[
            format!("select (select name from (values ('{name}')) v(name)) as x from patients where id = {}", p.id),
            format!("select s.n from patients p, (select name as n from (values ('{name}')) v(name)) s where p.id = {}", p.id),
        ],
    );
}

/// A subquery in FROM that is not LATERAL cannot see the FROM items beside it:
/// PostgreSQL resolves `p.name` there at the enclosing query level (here a VALUES
/// list aliased p), but lineage's `view` scope finds the sibling `patients p` first.
///   select (select s.n from patients p, (select p.name as n) s where p.id = <id>) as x
///     from (values ('<name>')) p(name)
/// Through phigate: the patient's pseudonym (directly: the chosen text).
#[test]
fn a_non_lateral_subquery_reads_the_outer_alias_not_a_sibling() {
    if skip("a_non_lateral_subquery_reads_the_outer_alias_not_a_sibling") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let name = format!("{} {}", p.first, p.last);
    assert_no_pseudonym_of_chosen_text(
        &e,
        &[format!("select (select s.n from patients p, (select p.name as n) s where p.id = {}) as x from (values ('{name}')) p(name)", p.id)],
    );
}

/// A `*` in a result may stand for a column of any name, so column_sources (top
/// level) and item_column (a subquery's) add the star's sources to a constant of the
/// same name — but as the hashed column itself, not as an alternative. PostgreSQL
/// reads the constant.
///   select '<name>'::text as nm, x.* from (select name as nm2 from patients where id = <id>) x
///   select s.nm from (select '<name>'::text as nm, x.* from (select name as who from patients where id = <id>) x) s
///   select '<name>'::text as who, v.* from patient_view v where v.who is not null limit 1
///     (a view over patients whose strongest rule is hash: a star over it gets hash)
/// Through phigate the constant came back as the patient's pseudonym (the first
/// column of each; `-At` prints the row joined by `|`, so the test checks the first).
/// With a star over patients.id (`select c.nm from (select '<name>'::text as nm,
/// x.* from (select id as pid from patients where id = <id>) x) c`) the constant gets
/// the `patient-id` hash rule: the same hex as the name's pseudonym, without `pt_`
/// (one key, no separation between rules).
#[test]
fn a_constant_beside_a_star_gets_no_pseudonym() {
    if skip("a_constant_beside_a_star_gets_no_pseudonym") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let name = format!("{} {}", p.first, p.last);
    // Only the constant is printed: wrap each so the chosen text is the one column.
    let mut leaked = pseudonyms_of_chosen_text(
        &e,
        &[
            format!("select s.nm from (select '{name}'::text as nm, x.* from (select name as who from patients where id = {}) x) s", p.id),
            format!("select c.nm from (select '{name}'::text as nm, x.* from (select id as pid from patients where id = {}) x) c", p.id),
        ],
    );
    // At the top level the star's own column comes too; compare the first column.
    let pseudonym = first_patients_pseudonym(&e);
    for sql in [
        format!("select '{name}'::text as nm, x.* from (select name as who from patients where id = {}) x", p.id),
        format!("select '{name}'::text as who, v.* from patient_view v where v.social is not null limit 1"),
    ] {
        let direct = everything(&e, None, &["-At", "-F", "|", "-c", &sql]);
        let got = everything(&e, Some("care"), &["-At", "-F", "|", "-c", &sql]);
        println!("== {sql}\n   direct:  {}\n   phigate: {}\n   patient's own pseudonym: {pseudonym}", direct.trim(), got.trim());
        assert!(direct.starts_with(&format!("{name}|")), "{sql}: {direct}");
        let first = got.split('|').next().unwrap_or_default().trim().to_string();
        if first.contains(pseudonym.trim_start_matches("pt_")) {
            leaked.push(format!("{sql} => {}", got.trim()));
        }
    }
    assert!(leaked.is_empty(), "chosen text got a pseudonym through phigate: {leaked:#?}");
}

/// WITH RECURSIVE: until its turn comes, each CTE stands for everything any of them
/// reads (add_ctes' placeholder, a `*`) — merged as the columns themselves. A CTE that
/// reads a later one holding chosen text is traced to what an unused CTE of the same
/// WITH reads. A bare column there makes the placeholder's `*` opaque (redacted: that
/// case holds), but a whole row of patient_view, whose strongest rule is the name's
/// `hash`, makes `who` a column phigate asks the catalog about — and the view has one:
///   with recursive a(who) as (select who from b), b(who) as (values ('<name>')),
///     d as (select v from patient_view v where false) select who from a
/// Through phigate: the patient's pseudonym (directly: the chosen text).
#[test]
fn a_later_cte_of_with_recursive_gives_no_pseudonym() {
    if skip("a_later_cte_of_with_recursive_gives_no_pseudonym") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let name = format!("{} {}", p.first, p.last);
    assert_no_pseudonym_of_chosen_text(
        &e,
        &[
            format!("with recursive a(name) as (select name from b), b(name) as (values ('{name}')), d as (select name from patients where false) select name from a"),
            format!("with recursive a(who) as (select who from b), b(who) as (values ('{name}')), d as (select v from patient_view v where false) select who from a"),
        ],
    );
}

/// The SSN with each digit d written as the d-th letter (`translate(ssn,
/// '0123456789', 'abcdefghij')`): no detector reads it, and it is the whole SSN.
fn translated_ssn(ssn: &str) -> String {
    ssn.chars().map(|c| c.to_digit(10).map(|d| char::from(b'a' + d as u8)).unwrap_or(c)).collect()
}

/// The other direction of the same scope error: a subquery in FROM that is not
/// LATERAL skips the FROM items beside it, so PostgreSQL reads `p.dob` there from the
/// enclosing query's `patients p`, while lineage takes the sibling VALUES list aliased
/// p — a constant — and the column has no rule at all: a date goes out unchanged
/// (detectors read text only), text to the detectors alone.
///   select (select s.n from (values (date '2000-01-01')) p(dob), (select p.dob as n) s)
///     as x from patients p where p.id = <id>
/// Through phigate: the patient's full date of birth (the profile's rule is `year`),
/// the full name (`hash`), and with `translate(p.ssn, '0123456789', 'abcdefghij')`
/// the whole SSN spelt in letters (`partial`; the detectors caught only the bare SSN).
#[test]
fn a_non_lateral_subquery_reading_the_outer_patient_is_masked() {
    if skip("a_non_lateral_subquery_reading_the_outer_patient_is_masked") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let mut cases = Vec::new();
    for (col, constant, secret) in
        [("dob", "date '2000-01-01'", p.dob.to_string()), ("ssn", "'x'", p.ssn.clone()), ("name", "'x'", format!("{} {}", p.first, p.last))]
    {
        let sql = format!("select (select s.n from (values ({constant})) p({col}), (select p.{col} as n) s) as x from patients p where p.id = {}", p.id);
        cases.push(at_case(&e, sql, vec![secret]));
    }
    // The SSN went to the detectors only, which a translation of its digits dodges:
    // every digit, one letter each (the profile's rule is `partial`, a computed value
    // is redacted).
    let sql = format!(
        "select (select s.n from (values ('x')) p(ssn), (select translate(p.ssn, '0123456789', 'abcdefghij') as n) s) as x from patients p where p.id = {}",
        p.id
    );
    cases.push(at_case(&e, sql, vec![translated_ssn(&p.ssn)]));
    // The same through a cursor (COPY (query) TO STDOUT is held for approval by
    // baseline.bulk-export first).
    let inner = format!("select (select s.n from (values (date '2000-01-01')) p(dob), (select p.dob as n) s) as x from patients p where p.id = {}", p.id);
    let cursor = ["-c", "begin", "-c", &format!("declare c cursor for {inner}"), "-c", "fetch all from c", "-c", "commit"];
    cases.push(args_case(&e, format!("declare c cursor for {inner}; fetch all from c"), &cursor, vec![p.dob.clone()]));
    assert_no_case_leaks(&cases);
}

/// An aliased join (`(a JOIN b) AS j`) hides the names of its sides: PostgreSQL
/// resolves `p.x` inside it at the enclosing level, but add_from_item keeps the
/// sides' items in scope, so lineage finds the hidden `p` first.
///   select (select p.name from ((select name from patients where id = <id>) p join (values (1)) x(k) on true) as j) as x
///     from (values ('<name>')) p(name)
///     → the chosen text, through phigate the patient's pseudonym (an oracle);
///   select (select p.dob from ((values (date '2000-01-01')) p(dob) join (values (1)) x(k) on true) as j) as x
///     from patients p where p.id = <id>
///     → the patient's dob, through phigate unchanged (traced to the hidden constant:
///       no rule; the profile's is `year`); the same with `name` (detectors only), and
///       `translate(p.ssn, '0123456789', 'abcdefghij')` gives the whole SSN in letters.
#[test]
fn names_an_aliased_join_hides_are_not_resolved_inside_it() {
    if skip("names_an_aliased_join_hides_are_not_resolved_inside_it") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let name = format!("{} {}", p.first, p.last);
    // The oracle: the direct run shows the chosen text (the workload wrote it, so it
    // may come back); phigate must not show the patient's pseudonym.
    assert_no_pseudonym_of_chosen_text(
        &e,
        &[format!(
            "select (select p.name from ((select name from patients where id = {}) p join (values (1)) x(k) on true) as j) as x from (values ('{name}')) p(name)",
            p.id
        )],
    );
    let mut cases = Vec::new();
    for (col, constant, secret) in [("dob", "date '2000-01-01'", p.dob.clone()), ("name", "'x'", name.clone())] {
        let sql = format!(
            "select (select p.{col} from ((values ({constant})) p({col}) join (values (1)) x(k) on true) as j) as x from patients p where p.id = {}",
            p.id
        );
        cases.push(at_case(&e, sql, vec![secret]));
    }
    let sql = format!(
        "select (select translate(p.ssn, '0123456789', 'abcdefghij') from ((values ('x')) p(ssn) join (values (1)) x(k) on true) as j) as x from patients p where p.id = {}",
        p.id
    );
    cases.push(at_case(&e, sql, vec![translated_ssn(&p.ssn)]));
    assert_no_case_leaks(&cases);
}

/// A subquery's output names must be PostgreSQL's for `s.col` to find the right one.
/// PostgreSQL names a scalar subquery that is a UNION after its first arm's column
/// (`name`); figure_colname reads the set operation's empty target list and says
/// `?column?` — so `s."?column?"` matches the UNION as well as the constant
/// PostgreSQL means, and the constant gets the UNION's sources (patients.name as it
/// is: both arms are the same column).
///   select s."?column?" from (select (select name from patients where id = <id>
///     union all select name from patients where false), '<name>' || '') s
/// Through phigate: the patient's pseudonym (directly: the chosen text).
#[test]
fn a_scalar_union_subquery_is_named_as_postgresql_names_it() {
    if skip("a_scalar_union_subquery_is_named_as_postgresql_names_it") {
        return;
    }
    let e = env_with(PHI_POLICY);
    let p = &e.data.patients[0];
    let name = format!("{} {}", p.first, p.last);
    assert_no_pseudonym_of_chosen_text(
        &e,
        &[format!(
            "select s.\"?column?\" from (select (select name from patients where id = {} union all select name from patients where false), '{name}' || '') s",
            p.id
        )],
    );
}

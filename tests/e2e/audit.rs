//! The audit log answers an auditor's questions from phigate's own records, proves
//! it was not altered, and loses nothing a client received: real agent, real
//! PostgreSQL, real clients, the real `phigate audit` commands on the files it wrote.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use phigate_tests::{
    agent::{phigate_bin, DbSpec, IdentitySpec},
    cgroup::run_in,
    env::skip,
    pg::{pg_bin, PgOptions},
    probe::probe,
    unique, wait_for, Agent, AgentConfig, PgServer, TestCgroup,
};
use serde_json::Value;

const SETUP: &str = "create table patients (id int primary key, name text, ssn text unique, note text);
insert into patients select g, 'Name ' || g, lpad((100 + g)::text, 3, '0') || '-45-' || lpad(g::text, 4, '0'), 'Patient Maria Garcia called from (617) 555-0' || lpad(g::text, 3, '0') from generate_series(1, 40) g;
create table labs (id int, test text);
insert into labs select g, 'A1C' from generate_series(1, 5) g;";

const MASKING: &str = "[masking]\nhash_key_file = KEYFILE\n[[masking.profile]]\nname = \"care\"\nidentities = [\"care-agent\"]\n[[masking.profile.rule]]\ncolumn = \"public.patients.ssn\"\nstrategy = \"partial\"\n";

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

fn env_with(audit_section: Option<String>) -> Env {
    let dir = std::env::temp_dir().join(unique("phigate-audit-e2e"));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("mask.key");
    std::fs::write(&key, [5u8; 32]).unwrap();
    let pg = PgServer::start(PgOptions::default()).unwrap();
    pg.psql_admin("postgres", SETUP).unwrap();
    let cg = TestCgroup::new();
    cg.child("care");
    let mut cfg = AgentConfig::new(&cg)
        .database(DbSpec::new("clinical", &["127.0.0.2/32"], pg.port(), pg.socket_addr()))
        .protect(&format!("{}/care", cg.rel()), "care-agent")
        .identity(IdentitySpec::workload("care-agent", "clinical", "postgres"));
    cfg.extra = format!(
        "[policy]\nphi_tables = [\"public.patients\"]\napproval_timeout_secs = 30\n{}\n{}",
        MASKING.replace("KEYFILE", &format!("{:?}", key.display().to_string())),
        audit_section.unwrap_or_default()
    );
    let agent = Agent::start(&cfg).unwrap();
    Env { agent, cg, pg, dir }
}

fn env() -> Env {
    env_with(None)
}

fn psql(e: &Env, sql: &str) -> Output {
    psql_with_env(e, sql, &[])
}

/// psql in the protected cgroup, with these environment variables set too.
fn psql_with_env(e: &Env, sql: &str, envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(pg_bin("psql"));
    cmd.args(["-h", "127.0.0.2", "-p", &e.pg.port().to_string(), "-U", "agent", "-d", "postgres", "-XAtq", "-c", sql])
        .env("PGSSLMODE", "disable")
        .stdin(Stdio::null())
        .envs(envs.iter().copied());
    run_in(&mut cmd, &e.cg.child_dir("care"));
    cmd.output().unwrap()
}

fn audit(e: &Env, args: &[&str]) -> Output {
    Command::new(phigate_bin()).arg("--config").arg(e.agent.config_path()).arg("audit").args(args).stdin(Stdio::null()).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn json_lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Everything written so far is durable and checkpointed (the writer signs the head
/// every second in tests).
fn settle() {
    std::thread::sleep(Duration::from_millis(1300));
}

#[test]
fn an_auditor_can_answer_who_what_when_masked_approved_and_replay() {
    if skip("an_auditor_can_answer_who_what_when_masked_approved_and_replay") {
        return;
    }
    let e = env();
    let seen = String::from_utf8_lossy(&psql(&e, "select id, ssn, note from patients where id <= 3 order by id").stdout).to_string();
    assert!(seen.contains("***-**-0001"), "{seen}");
    let blocked = psql(&e, "drop table patients");
    assert!(String::from_utf8_lossy(&blocked.stderr).contains("blocked by rule baseline.drop-phi"));
    // Held for approval, approved by a human through the CLI.
    let held = {
        let mut cmd = Command::new(pg_bin("psql"));
        cmd.args([
            "-h",
            "127.0.0.2",
            "-p",
            &e.pg.port().to_string(),
            "-U",
            "agent",
            "-d",
            "postgres",
            "-XAtq",
            "-c",
            "select count(*) from (select * from patients) p",
        ])
        .env("PGSSLMODE", "disable")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        run_in(&mut cmd, &e.cg.child_dir("care"));
        cmd.spawn().unwrap()
    };
    let id = wait_for(Duration::from_secs(10), || {
        let o = Command::new(phigate_bin()).arg("--config").arg(e.agent.config_path()).args(["approvals", "list", "--json"]).output().ok()?;
        let v: Value = serde_json::from_slice(&o.stdout).ok()?;
        v["approvals"][0]["id"].as_u64()
    })
    .expect("held");
    let o = Command::new(phigate_bin())
        .arg("--config")
        .arg(e.agent.config_path())
        .args(["approvals", "approve", &id.to_string(), "--reason", "census, ticket 9"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let out = held.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "40");
    // A bypass attempt the kernel stops.
    let v = probe(Some(&e.cg.child_dir("care")), &["raw-syn", &e.pg.addr().to_string(), "40111"]);
    assert_eq!(v["socket"], "error", "{v}");
    settle();

    // Verified, untouched.
    let o = audit(&e, &["verify"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("OK:"), "{}", text(&o));
    // With a copy of the signed head kept elsewhere as an anchor; an anchor that is
    // not a copy of head.json is a clear error.
    let anchor = e.agent.audit_dir().with_extension("anchor.json");
    std::fs::copy(e.agent.audit_dir().join("head.json"), &anchor).unwrap();
    let o = audit(&e, &["verify", "--anchor", anchor.to_str().unwrap()]);
    let _ = std::fs::remove_file(&anchor);
    assert!(o.status.success() && text(&o).contains("anchored head"), "{}", text(&o));
    let o = audit(&e, &["verify", "--anchor", e.agent.config_path().to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("not a copy of head.json"), "{}", text(&o));

    // A filter that cannot match is an error, not an empty answer.
    for (bad, flag) in
        [(["query", "--since", "yesterday"], "--since"), (["query", "--decision", "blockd"], "--decision"), (["query", "--kind", "statements"], "--kind")]
    {
        let o = audit(&e, &bad);
        assert!(!o.status.success() && text(&o).contains(flag), "{bad:?}: {}", text(&o));
    }

    // Who, when, from where: the session start names the kernel-attested workload.
    let starts = json_lines(&audit(&e, &["query", "--kind", "session_start", "--format", "json"]));
    assert!(!starts.is_empty());
    let s = &starts[0]["data"];
    assert_eq!(s["identity"]["name"], "care-agent");
    assert_eq!(s["identity"]["comm"], "psql");
    assert_eq!(s["orig_dst"], e.pg.addr().to_string());
    assert_eq!(s["upstream_role"], "postgres");
    assert!(s["identity"]["pid"].as_u64().unwrap() > 0);
    // What was blocked, by which rule.
    let blocked = json_lines(&audit(&e, &["query", "--decision", "blocked", "--format", "json"]));
    assert_eq!(blocked.len(), 1, "{blocked:?}");
    assert_eq!(blocked[0]["data"]["text"], "drop table patients");
    assert_eq!(blocked[0]["data"]["decision"]["rule"], "baseline.drop-phi");
    assert_eq!(blocked[0]["identity"], "care-agent");
    // Who approved what, and why.
    let approved = json_lines(&audit(&e, &["query", "--decision", "approved", "--format", "json"]));
    assert_eq!(approved.len(), 1, "{approved:?}");
    assert_eq!(approved[0]["data"]["approval"]["by"], "unix:root");
    assert_eq!(approved[0]["data"]["approval"]["reason"], "census, ticket 9");
    assert_eq!(approved[0]["data"]["approval"]["outcome"], "approved");
    // The request and the decision, found by the requester's identity, in its session.
    let approval_session = approved[0]["data"]["session"].as_str().unwrap();
    let approvals = json_lines(&audit(&e, &["query", "--kind", "approval", "--identity", "care-agent", "--format", "json"]));
    assert_eq!(approvals.len(), 2, "{approvals:?}");
    assert!(approvals.iter().all(|a| a["data"]["approval"]["requester"]["audit_session"] == approval_session), "{approvals:?}");
    let replay = text(&audit(&e, &["replay", approval_session]));
    assert!(replay.contains("approval_requested #") && replay.contains("approved by unix:root: census, ticket 9"), "{replay}");
    // What came back, what was masked.
    let ends = json_lines(&audit(&e, &["query", "--kind", "statement_end", "--format", "json"]));
    let first = ends.iter().find(|x| x["data"]["rows"] == 3).expect("the 3-row result");
    assert_eq!(first["data"]["masking"]["by_rule"]["public.patients.ssn"], 3, "{first}");
    assert!(first["data"]["masking"]["by_kind"]["phone"].as_u64().unwrap() >= 3);
    assert_eq!(first["data"]["raw"], "<sealed>", "the raw result is stored, encrypted");
    // The bypass attempt.
    let bypass = json_lines(&audit(&e, &["query", "--kind", "bypass", "--format", "json"]));
    assert!(bypass.iter().any(|b| b["data"]["kind"] == "raw_socket_denied" && b["data"]["identity"] == "care-agent"), "{bypass:?}");
    // Agent lifecycle.
    let life = json_lines(&audit(&e, &["query", "--kind", "lifecycle", "--format", "json"]));
    assert!(life.iter().any(|l| l["data"]["event"] == "start") && life.iter().any(|l| l["data"]["event"] == "attach"), "{life:?}");

    // Replay shows the session as the client saw it; with the keys, as sent.
    let session = first["data"]["session"].as_str().unwrap().to_string();
    let replay = text(&audit(&e, &["replay", &session]));
    assert!(replay.contains("select id, ssn, note from patients where id <= 3 order by id"), "{replay}");
    for line in seen.lines() {
        assert!(replay.contains(&line.replace('|', " | ")), "replay shows what the client got: {line}\n{replay}");
    }
    assert!(!replay.contains("101-45-0001"), "the unmasked value only with --raw");
    let raw = text(&audit(&e, &["replay", &session, "--raw"]));
    assert!(raw.contains("101-45-0001"), "{raw}");

    // Export: JSON lines round-trip to the records; FHIR AuditEvents have the shape R4 asks.
    let jsonl = audit(&e, &["export", "--format", "jsonl"]);
    let mut seg_lines: Vec<String> = Vec::new();
    let mut segs: Vec<PathBuf> =
        std::fs::read_dir(e.agent.audit_dir()).unwrap().flatten().map(|d| d.path()).filter(|p| p.extension().is_some_and(|x| x == "jsonl")).collect();
    segs.sort();
    for p in &segs {
        seg_lines.extend(std::fs::read_to_string(p).unwrap().lines().map(String::from));
    }
    let exported: Vec<String> = String::from_utf8_lossy(&jsonl.stdout).lines().map(String::from).collect();
    assert!(!exported.is_empty());
    for l in &exported {
        assert!(seg_lines.contains(l), "every exported line is a record as stored");
        let v: Value = serde_json::from_str(l).unwrap();
        assert!(v["hash"].as_str().unwrap().len() == 64);
    }
    let fhir = json_lines(&audit(&e, &["export", "--format", "fhir"]));
    assert!(fhir.len() >= 5);
    for ev in &fhir {
        check_audit_event(ev);
    }
    assert!(fhir.iter().any(|x| x["type"]["code"] == "110113"), "security alerts for bypass attempts");
    assert!(fhir.iter().any(|x| x["type"]["code"] == "110112" && x["outcome"] == "8"), "the blocked query is a failure");
    let bundle: Value = serde_json::from_slice(&audit(&e, &["export", "--format", "fhir", "--bundle"]).stdout).unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["entry"].as_array().unwrap().len(), fhir.len());

    // Tampering: one byte in a stored record is found, with where.
    let seg = segs.first().unwrap();
    let content = std::fs::read_to_string(seg).unwrap();
    let tampered = content.replacen("care-agent", "care-agenT", 1);
    std::fs::write(seg, tampered).unwrap();
    let o = audit(&e, &["verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("FAILED at seg-00000001.jsonl, line"), "{}", text(&o));
}

/// The parts of a FHIR R4 AuditEvent the specification requires, with their types.
fn check_audit_event(ev: &Value) {
    assert_eq!(ev["resourceType"], "AuditEvent");
    assert!(ev["id"].is_string());
    assert!(ev["type"]["system"].is_string() && ev["type"]["code"].is_string(), "type is a Coding: {ev}");
    assert!(ev["recorded"].as_str().is_some_and(|r| r.ends_with('Z') && r.len() >= 20), "recorded is an instant: {ev}");
    assert!(["C", "R", "U", "D", "E"].contains(&ev["action"].as_str().unwrap_or("")), "{ev}");
    assert!(["0", "4", "8", "12"].contains(&ev["outcome"].as_str().unwrap_or("")), "{ev}");
    let agents = ev["agent"].as_array().expect("agent 1..*");
    assert!(!agents.is_empty());
    for a in agents {
        assert!(a["requestor"].is_boolean(), "agent.requestor is required: {ev}");
        assert!(a["who"].is_object());
    }
    assert!(ev["source"]["observer"].is_object(), "source.observer is required: {ev}");
    for en in ev["entity"].as_array().into_iter().flatten() {
        if let Some(q) = en["query"].as_str() {
            use base64::Engine;
            assert!(base64::engine::general_purpose::STANDARD.decode(q).is_ok(), "entity.query is base64Binary");
        }
    }
}

#[test]
fn sigkill_while_clients_stream_loses_no_statement_a_client_saw() {
    if skip("sigkill_while_clients_stream_loses_no_statement_a_client_saw") {
        return;
    }
    let mut e = env();
    // Clients run numbered statements in a loop and print what came back.
    let script = |n: usize| format!("for i in $(seq 1 400); do echo \"select 'client{n}-stmt'||$i, count(*) from labs;\"; done");
    let mut clients = Vec::new();
    for n in 0..3 {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("({}) | {} -h 127.0.0.2 -p {} -U agent -d postgres -XAtq", script(n), pg_bin("psql").display(), e.pg.port()))
            .env("PGSSLMODE", "disable")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        run_in(&mut cmd, &e.cg.child_dir("care"));
        clients.push(cmd.spawn().unwrap());
    }
    std::thread::sleep(Duration::from_millis(700));
    e.agent.kill9();
    let mut received = Vec::new();
    for c in clients {
        let out = c.wait_with_output().unwrap();
        received.extend(String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split('|').next().map(String::from)).filter(|s| s.starts_with("client")));
    }
    assert!(received.len() > 10, "the clients got results before the crash ({})", received.len());
    // Before any restart: the log verifies, or reports only a torn tail.
    let pubkey = e.agent.audit_dir().join("audit.pub");
    let o = Command::new(phigate_bin()).args(["audit", "verify", "--dir"]).arg(e.agent.audit_dir()).arg("--public-key").arg(&pubkey).output().unwrap();
    let t = text(&o);
    if !o.status.success() {
        let seg = std::fs::read_to_string(e.agent.audit_dir().join("seg-00000001.jsonl")).unwrap_or_default();
        let n: usize = t.split("line ").nth(1).and_then(|x| x.split(|c: char| !c.is_ascii_digit()).next()).and_then(|x| x.parse().ok()).unwrap_or(1);
        panic!("{t}\nline {n}: {}", seg.lines().nth(n - 1).unwrap_or(""));
    }
    // Every statement a client received rows for is in the log.
    let o = Command::new(phigate_bin()).args(["audit", "query", "--kind", "statement", "--format", "json", "--dir"]).arg(e.agent.audit_dir()).output().unwrap();
    let logged: Vec<String> = json_lines(&o).iter().filter_map(|r| r["data"]["text"].as_str().map(|t| t.trim_end_matches(';').to_string())).collect();
    let missing: Vec<&String> = received
        .iter()
        .filter(|marker| {
            let (client, n) = marker.split_once("-stmt").unwrap();
            let sql = format!("select '{client}-stmt'||{n}, count(*) from labs");
            !logged.iter().any(|l| l == &sql)
        })
        .collect();
    assert!(missing.is_empty(), "{} statements the clients received are not in the log: {:?}", missing.len(), &missing[..missing.len().min(5)]);
    // A restarted agent seals the crashed run's segment and records that it did.
    e.agent.spawn_and_wait().unwrap();
    settle();
    let o = audit(&e, &["verify"]);
    assert!(o.status.success(), "{}", text(&o));
    let life = json_lines(&audit(&e, &["query", "--kind", "lifecycle", "--format", "json"]));
    assert!(life.iter().any(|l| l["data"]["event"] == "recovery"), "{life:?}");
    assert!(life.iter().any(|l| l["data"]["event"] == "start" && !l["data"]["recovered_after_crash"].is_null()));
}

fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"]).arg(dir).status().map(|s| s.success()).unwrap_or(false)
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        // The mount point itself, now an empty directory again.
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_refuses_statements_keeps_the_log_and_recovers() {
    if skip("a_full_disk_refuses_statements_keeps_the_log_and_recovers") {
        return;
    }
    let mnt = std::env::temp_dir().join(unique("phigate-audit-tmpfs"));
    assert!(mount_tmpfs(&mnt, "1m"), "mounting a small tmpfs for the audit log");
    let _guard = Unmount(mnt.clone());
    let audit_dir = mnt.join("log");
    let e = env_with(Some(format!("[audit]\ndir = {:?}\nhead_interval_secs = 1\n", audit_dir.display().to_string())));
    assert_eq!(String::from_utf8_lossy(&psql(&e, "select count(*) from labs").stdout).trim(), "5");
    settle();
    // Fill the disk.
    let filler = mnt.join("filler");
    let _ = Command::new("dd").args(["if=/dev/zero", &format!("of={}", filler.display()), "bs=4k", "count=1000"]).stderr(Stdio::null()).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut refused = String::new();
    while Instant::now() < deadline {
        let o = psql(&e, "select 'while full', count(*) from labs");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        if err.contains("the audit log cannot be written") {
            refused = err;
            break;
        }
    }
    assert!(refused.contains("phigate refused the statement: the audit log cannot be written"), "{refused}");
    assert!(!refused.contains("while full\n"));
    // Nothing earlier is corrupted.
    let o = audit(&e, &["verify", "--dir", audit_dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    // Space comes back: statements are accepted again (bounded wait).
    std::fs::remove_file(&filler).unwrap();
    let back = wait_for(Duration::from_secs(15), || {
        let o = psql(&e, "select 'after', count(*) from labs");
        o.status.success().then(|| String::from_utf8_lossy(&o.stdout).to_string())
    });
    assert_eq!(back.as_deref().map(str::trim), Some("after|5"));
    settle();
    let o = audit(&e, &["verify", "--dir", audit_dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let life = json_lines(&audit(&e, &["query", "--dir", audit_dir.to_str().unwrap(), "--kind", "lifecycle", "--format", "json"]));
    assert!(life.iter().any(|l| l["data"]["event"] == "audit_resumed"), "the gap is recorded: {life:?}");
    drop(e);
}

#[test]
fn shredding_a_period_key_makes_raw_results_unreadable_but_the_log_verifies() {
    if skip("shredding_a_period_key_makes_raw_results_unreadable_but_the_log_verifies") {
        return;
    }
    let e = env();
    psql(&e, "select ssn from patients where id = 7");
    settle();
    let ends = json_lines(&audit(&e, &["query", "--kind", "statement_end", "--format", "json"]));
    let session = ends.iter().find(|x| x["data"]["rows"] == 1).unwrap()["data"]["session"].as_str().unwrap().to_string();
    assert!(text(&audit(&e, &["replay", &session, "--raw"])).contains("107-45-0007"));
    let o = audit(&e, &["shred", "--before", "9999-01-01"]);
    assert!(!o.status.success() && text(&o).contains("--include-today"), "today's key is not shredded by accident: {}", text(&o));
    assert!(text(&audit(&e, &["replay", &session, "--raw"])).contains("107-45-0007"), "a refused shred destroys nothing");
    let o = audit(&e, &["shred", "--before", "9999-01-01", "--include-today"]);
    assert!(o.status.success(), "{}", text(&o));
    let raw = text(&audit(&e, &["replay", &session, "--raw"]));
    assert!(raw.contains("unreadable") && raw.contains("crypto-shredded") && !raw.contains("107-45-0007"), "{raw}");
    let o = audit(&e, &["verify"]);
    assert!(o.status.success(), "{}", text(&o));
}

// Defects found by a review (each failed before its fix).

/// The workload's application_name and startup options are free text it chose (like
/// its statement text, which the agent never logs): the "session started" line
/// copies both verbatim into the agent's log.
#[test]
fn startup_text_a_workload_sent_is_not_in_the_agent_log() {
    if skip("startup_text_a_workload_sent_is_not_in_the_agent_log") {
        return;
    }
    let e = env();
    let o = psql_with_env(
        &e,
        "select count(*) from labs",
        &[("PGAPPNAME", "chart of Maria Garcia 321-54-9876"), ("PGOPTIONS", "-c application_name=dob-1980-12-31-x")],
    );
    assert!(o.status.success(), "{}", text(&o));
    settle();
    let log = e.agent.raw_log();
    assert!(!log.contains("321-54-9876"), "application_name is in the agent's log: {}", log.lines().find(|l| l.contains("321-54-9876")).unwrap_or(""));
    assert!(
        !log.contains("dob-1980-12-31-x"),
        "startup options are in the agent's log: {}",
        log.lines().find(|l| l.contains("dob-1980-12-31-x")).unwrap_or("")
    );
}

/// A COPY whose query the side connection cannot describe the same way (the session
/// changed DateStyle) fails masking closed — but the warning logs the database's
/// error verbatim, and it quotes the statement's literal (a date of birth).
#[test]
fn a_masking_failure_does_not_log_the_statements_values() {
    if skip("a_masking_failure_does_not_log_the_statements_values") {
        return;
    }
    let e = env();
    let o = psql(&e, "set datestyle = 'ISO, DMY'; copy (select test from labs where current_date <> '31/12/1980' and id = 1) to stdout");
    let out = text(&o);
    assert!(!out.contains("101-45-0001"), "the unmasked SSN reached the client: {out}");
    settle();
    let log = e.agent.raw_log();
    assert!(!log.contains("31/12/1980"), "the statement's literal is in the agent's log: {}", log.lines().find(|l| l.contains("31/12/1980")).unwrap_or(""));
}

/// The period key cannot be made (key_dir not writable): a masked simple query runs
/// and its result reaches the client. Its statement_end used to be dropped silently
/// while the log stayed "healthy"; now it is written saying why the raw result is
/// missing, and later statements are refused.
#[test]
fn a_raw_result_that_cannot_be_sealed_fails_closed() {
    if skip("a_raw_result_that_cannot_be_sealed_fails_closed") {
        return;
    }
    let base = std::env::temp_dir().join(unique("phigate-audit-keyless"));
    std::fs::create_dir_all(&base).unwrap();
    // A regular file where the key directory's parent should be: no key can be made
    // (even as root).
    std::fs::write(base.join("not-a-dir"), b"x").unwrap();
    let audit_dir = base.join("log");
    let e = env_with(Some(format!(
        "[audit]\ndir = {:?}\nkey_dir = {:?}\nhead_interval_secs = 1\n",
        audit_dir.display().to_string(),
        base.join("not-a-dir/periods").display().to_string()
    )));
    let o = psql(&e, "select ssn from patients where id = 3");
    let delivered = text(&o);
    settle();
    let dir = audit_dir.to_str().unwrap();
    let stmts = json_lines(&audit(&e, &["query", "--dir", dir, "--kind", "statement", "--format", "json"]));
    let ends = json_lines(&audit(&e, &["query", "--dir", dir, "--kind", "statement_end", "--format", "json"]));
    let recorded = stmts.iter().any(|s| s["data"]["text"].as_str().is_some_and(|t| t.contains("where id = 3")));
    // The next statement is refused: the audit cannot record what it would return.
    let next = psql(&e, "select ssn from patients where id = 4");
    let _ = std::fs::remove_dir_all(&base);
    if o.status.success() {
        // The result was released: its end is in the log, saying why its raw result
        // is missing, and the audit failed closed for the statements after it.
        assert!(recorded, "statement record");
        assert!(
            ends.iter().any(|r| r["data"]["raw"]["error"].as_str().is_some_and(|w| w.contains("encrypt"))),
            "the client received {delivered:?}, the statement record is durable, but no statement_end says why its raw result is missing: {ends:?}"
        );
    }
    assert!(!next.status.success() && text(&next).contains("audit log cannot be written"), "{}", text(&next));
}

//! `cargo xtask demo`: the guided tour. A throwaway PostgreSQL on 127.0.0.2:5432 with
//! synthetic patients, the agent running `config/local.toml` as is, a psql inside the
//! protected cgroup (carried through phigate by the kernel) and one outside it (not).
//! Everything it starts is stopped and removed at the end, also on failure.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use phigate_tests::{cgroup::run_in, pg::PgOptions, wait_for, PgServer};

use crate::root;

const DEMO_CGROUP: &str = "phigate-demo";
/// `[audit] dir` of config/local.toml; its keys live in `<dir>.keys`.
const DEMO_AUDIT: &str = "/tmp/phigate-demo-audit";

fn remove_demo_audit() {
    let _ = fs::remove_dir_all(DEMO_AUDIT);
    let _ = fs::remove_dir_all(format!("{DEMO_AUDIT}.keys"));
}

struct Demo {
    agent: Option<Child>,
    log: PathBuf,
    config: PathBuf,
    cgroup: PathBuf,
    _pg: PgServer,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(a.id() as i32), nix::sys::signal::Signal::SIGTERM);
            if wait_for(Duration::from_secs(10), || a.try_wait().ok().flatten()).is_none() {
                let _ = a.kill();
                let _ = a.wait();
            }
        }
        let _ = Command::new(phigate()).arg("--config").arg(&self.config).arg("detach").stdout(Stdio::null()).status();
        let _ = fs::remove_dir(&self.cgroup);
        let _ = fs::remove_file(&self.log);
        remove_demo_audit();
        println!("\ndemo: cleaned up (agent stopped, programs detached, PostgreSQL stopped, cgroup and audit log removed)");
    }
}

fn phigate() -> PathBuf {
    root().join("target/debug/phigate")
}

fn step(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

pub fn run() -> Result<()> {
    crate::setup::run()?;
    crate::build_ebpf()?;
    crate::build_workspace(false)?;
    if let Some(reason) = phigate_tests::env::missing_capability() {
        bail!("the demo needs the real kernel: {reason}");
    }
    for addr in ["127.0.0.2:5432", "127.0.0.1:15432"] {
        if TcpStream::connect_timeout(&addr.parse()?, Duration::from_millis(300)).is_ok() {
            bail!("something already listens on {addr}; the demo needs that address (stop it, or a previous demo, first)");
        }
    }
    let config = root().join("config/local.toml");
    remove_demo_audit();
    let cgroup = phigate_tests::env::cgroup2_mount().context("no cgroup v2 mount")?.join(DEMO_CGROUP);

    step("1. A throwaway PostgreSQL on 127.0.0.2:5432 with synthetic patients");
    let hba =
        "local all all trust\nhost all postgres 127.0.0.0/8 trust\nhost all phigate_clinical 127.0.0.0/8 scram-sha-256\nhost all all 127.0.0.0/8 reject\n";
    let pg = PgServer::start(PgOptions { addr: Ipv4Addr::new(127, 0, 0, 2), port: 5432, hba: Some(hba.into()), ..Default::default() })?;
    let secret = std::fs::read_to_string(root().join("config/demo-secrets/phigate_clinical.password"))?;
    pg.psql_admin("postgres", &format!("create role phigate_clinical login password '{}'", secret.trim()))?;
    pg.psql_admin("postgres", "create database clinical")?;
    pg.psql_admin("clinical", &patients_sql())?;
    pg.psql_admin("clinical", "grant select on patients to phigate_clinical")?;
    println!("{}", pg.psql_admin("clinical", "select count(*) || ' patients loaded into database clinical' from patients")?);
    println!("   role phigate_clinical: password only in config/demo-secrets (the agent's secret); workloads never see it");

    step("2. The phigate agent with config/local.toml");
    let log = std::env::temp_dir().join("phigate-demo-agent.log");
    let log_file = fs::File::create(&log)?;
    let agent = Command::new(phigate())
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("starting phigate")?;
    let mut demo = Demo { agent: Some(agent), log: log.clone(), config: config.clone(), cgroup: cgroup.clone(), _pg: pg };
    let ready = wait_for(Duration::from_secs(20), || {
        if let Some(status) = demo.agent.as_mut().and_then(|a| a.try_wait().ok().flatten()) {
            return Some(Err(status));
        }
        fs::read_to_string(&log).ok().filter(|t| t.contains("phigate agent ready")).map(Ok)
    });
    match ready {
        Some(Ok(text)) => print_lines(&text, &["protected cgroup", "interceptor listening", "agent ready"]),
        Some(Err(status)) => bail!("the agent exited ({status}):\n{}", fs::read_to_string(&log).unwrap_or_default()),
        None => bail!("the agent was not ready in 20 s:\n{}", fs::read_to_string(&log).unwrap_or_default()),
    }

    step(&format!("3. A workload in the protected cgroup /{DEMO_CGROUP} runs `psql -h 127.0.0.2 -U analyst clinical`, no password"));
    println!("   (its connection string is unchanged; the kernel carries it to phigate, which logs in upstream as phigate_clinical)");
    let out = psql("analyst", "clinical", "select current_user as upstream_role, session_user, current_database()", Some(&cgroup))?;
    println!("{out}");
    let out = psql("analyst", "clinical", "select id, mrn, name, dob from patients order by id limit 3", Some(&cgroup))?;
    println!("{out}");
    let text = fs::read_to_string(&log).unwrap_or_default();
    println!("   phigate's record of those connections (kernel-attested identity, original destination, upstream role):");
    print_lines(&text, &["connection accepted", "session started"]);

    step("4. SQL policy: what the workload may not do");
    for sql in ["drop table patients", "delete from patients"] {
        println!("   psql> {sql}");
        let out = psql_raw("analyst", "clinical", sql, Some(&cgroup))?;
        println!("   {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    println!("   psql> select id, name, ssn from patients      -- every patient: held until a human approves");
    let mut held = spawn_psql("analyst", "clinical", "select id, name, ssn from patients order by id", &cgroup)?;
    let approvals = |args: &[&str]| Command::new(phigate()).arg("--config").arg(&config).arg("approvals").args(args).output();
    let id = wait_for(Duration::from_secs(10), || {
        let out = approvals(&["list", "--json"]).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["approvals"].as_array()?.first().map(|a| a["id"].to_string())
    })
    .context("the held statement did not show up in `phigate approvals list`")?;
    let listed = String::from_utf8_lossy(&approvals(&["list"])?.stdout).to_string();
    println!("\n   (second terminal) $ phigate approvals list");
    for l in listed.lines() {
        println!("   {l}");
    }
    println!("   (second terminal) $ phigate approvals approve {id} --reason \"quarterly outreach list, ticket 4711\"");
    let out = Command::new(phigate())
        .arg("--config")
        .arg(&config)
        .args(["approvals", "approve", &id, "--reason", "quarterly outreach list, ticket 4711"])
        .output()?;
    println!("   {}", String::from_utf8_lossy(&out.stdout).trim());
    let out = wait_child(&mut held, Duration::from_secs(20))?;
    let rows = String::from_utf8_lossy(&out.stdout);
    println!("\n   the workload's psql (notice, then the rows, shown here: first 3 of {}):", rows.lines().count());
    for l in String::from_utf8_lossy(&out.stderr).lines() {
        println!("   {l}");
    }
    for l in rows.lines().take(3) {
        println!("   {l}");
    }

    step("5. PHI masking: patient 2 as the database owner sees it, and as the workload receives it");
    let sql = "select name, mrn, ssn, dob, phone, diagnosis, note from patients where id = 2";
    let direct = psql_row("postgres", "clinical", sql, None)?;
    let masked = psql_row("analyst", "clinical", sql, Some(&cgroup))?;
    println!("   {:<10} {:<44} through phigate (demo-agent)", "column", "direct (database owner)");
    for (i, col) in ["name", "mrn", "ssn", "dob", "phone", "diagnosis", "note"].iter().enumerate() {
        let (d, m) = (direct.get(i).map(String::as_str).unwrap_or(""), masked.get(i).map(String::as_str).unwrap_or(""));
        if col == &"note" {
            println!("   {col:<10} {d}");
            println!("   {:<10} → {m}", "");
        } else {
            println!("   {col:<10} {d:<44} {m}");
        }
    }
    println!("   (name: keyed pseudonym, the same in every session; ssn and phone: partial; dob: the year; mrn: redacted;");
    println!("    diagnosis: no PHI, unchanged; note: free text, Safe Harbor identifiers replaced)");
    let text = fs::read_to_string(&log).unwrap_or_default();
    print_lines(&text, &["result masked"]);

    step("6. The same psql from an unprotected process");
    let before = count(&fs::read_to_string(&log).unwrap_or_default(), "connection accepted");
    let out = psql("postgres", "clinical", "select 'direct to the database' as path, current_user, count(*) from patients", None)?;
    println!("{out}");
    std::thread::sleep(Duration::from_millis(200));
    let after = count(&fs::read_to_string(&log).unwrap_or_default(), "connection accepted");
    println!("   connections seen by phigate: before {before}, after {after} — the unprotected process was not redirected");

    step("7. phigate status");
    let out = Command::new(phigate()).arg("--config").arg(&config).arg("status").output()?;
    println!("{}", String::from_utf8_lossy(&out.stdout));

    step(&format!("8. The audit log in {DEMO_AUDIT}: what an auditor can answer"));
    let audit = |args: &[&str]| -> Result<std::process::Output> { Ok(Command::new(phigate()).arg("--config").arg(&config).arg("audit").args(args).output()?) };
    let show = |args: &[&str]| -> Result<bool> {
        println!("\n   $ phigate audit {}", args.join(" "));
        let out = audit(args)?;
        for l in String::from_utf8_lossy(&out.stdout).lines().chain(String::from_utf8_lossy(&out.stderr).lines()) {
            println!("   {l}");
        }
        Ok(out.status.success())
    };
    // The session of step 5's masked read, once its end record (after the rows) is in.
    let records = |kind: &str| -> Vec<serde_json::Value> {
        let out = audit(&["query", "--kind", kind, "--format", "json"]).map(|o| o.stdout).unwrap_or_default();
        String::from_utf8_lossy(&out).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    };
    let session = wait_for(Duration::from_secs(10), || {
        let stmt = records("statement").into_iter().find(|r| r["data"]["text"].as_str().is_some_and(|t| t.contains("where id = 2") && t.contains("note")))?;
        let session = stmt["data"]["session"].as_str()?.to_string();
        records("statement_end").iter().any(|r| r["data"]["session"] == session.as_str()).then_some(session)
    })
    .context("the masked read of step 5 is not in the audit log")?;
    show(&["query", "--decision", "blocked"])?;
    show(&["query", "--kind", "approval"])?;
    if !show(&["verify"])? {
        bail!("phigate audit verify failed on the demo's own log");
    }
    show(&["replay", &session])?;
    println!("\n   (with the period keys an auditor holds, the raw result: the paired proof that masking happened)");
    show(&["replay", &session, "--raw"])?;
    drop(demo);
    Ok(())
}

fn psql(user: &str, db: &str, sql: &str, cgroup: Option<&Path>) -> Result<String> {
    let mut cmd = Command::new(phigate_tests::pg::pg_bin("psql"));
    cmd.args(["-h", "127.0.0.2", "-p", "5432", "-U", user, "-d", db, "-X", "-c", sql]).env("PGSSLMODE", "disable").stdin(Stdio::null());
    if let Some(dir) = cgroup {
        run_in(&mut cmd, dir);
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// One row, unaligned, split into its columns.
fn psql_row(user: &str, db: &str, sql: &str, cgroup: Option<&Path>) -> Result<Vec<String>> {
    let mut cmd = Command::new(phigate_tests::pg::pg_bin("psql"));
    cmd.args(["-h", "127.0.0.2", "-p", "5432", "-U", user, "-d", db, "-XAt", "-F", "\x1f", "-c", sql]).env("PGSSLMODE", "disable").stdin(Stdio::null());
    if let Some(dir) = cgroup {
        run_in(&mut cmd, dir);
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().split('\x1f').map(String::from).collect())
}

fn psql_raw(user: &str, db: &str, sql: &str, cgroup: Option<&Path>) -> Result<std::process::Output> {
    let mut cmd = Command::new(phigate_tests::pg::pg_bin("psql"));
    cmd.args(["-h", "127.0.0.2", "-p", "5432", "-U", user, "-d", db, "-X", "-c", sql]).env("PGSSLMODE", "disable").stdin(Stdio::null());
    if let Some(dir) = cgroup {
        run_in(&mut cmd, dir);
    }
    Ok(cmd.output()?)
}

fn spawn_psql(user: &str, db: &str, sql: &str, cgroup: &Path) -> Result<Child> {
    let mut cmd = Command::new(phigate_tests::pg::pg_bin("psql"));
    cmd.args(["-h", "127.0.0.2", "-p", "5432", "-U", user, "-d", db, "-XAt", "-c", sql])
        .env("PGSSLMODE", "disable")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_in(&mut cmd, cgroup);
    Ok(cmd.spawn()?)
}

/// Wait (bounded) for a child and collect its output.
fn wait_child(child: &mut Child, within: Duration) -> Result<std::process::Output> {
    let done = wait_for(within, || child.try_wait().ok().flatten());
    if done.is_none() {
        let _ = child.kill();
        bail!("psql did not finish within {within:?}");
    }
    let mut out = std::process::Output { status: done.expect("checked"), stdout: Vec::new(), stderr: Vec::new() };
    use std::io::Read;
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_end(&mut out.stdout);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_end(&mut out.stderr);
    }
    Ok(out)
}

fn print_lines(text: &str, needles: &[&str]) {
    let reader = BufReader::new(text.as_bytes());
    for line in reader.lines().map_while(Result::ok) {
        if needles.iter().any(|n| line.contains(n)) {
            println!("   {}", line.trim());
        }
    }
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// Synthetic, obviously fake patients (deterministic, no real PHI).
fn patients_sql() -> String {
    const FIRST: [&str; 8] = ["Ada", "Brook", "Cyrus", "Dana", "Elio", "Fern", "Gus", "Hale"];
    const LAST: [&str; 8] = ["Quill", "Marsh", "Okafor", "Lindqvist", "Tanaka", "Reyes", "Novak", "Ibsen"];
    const DX: [&str; 4] = ["E11.9 type 2 diabetes", "I10 hypertension", "J45.909 asthma", "M54.5 low back pain"];
    let mut sql = String::from(
        "drop table if exists patients; create table patients (id int primary key, mrn text, name text, dob date, ssn text, phone text, diagnosis text, note text); insert into patients values ",
    );
    let rows: Vec<String> = (0..24)
        .map(|i: usize| {
            let (f, l) = (FIRST[i % 8], LAST[(i * 3) % 8]);
            let phone = format!("(617) 555-01{:02}", i % 100);
            format!(
                "({id}, 'MRN-{mrn:06}', '{f} {l}', date '1950-01-01' + {days}, '{ssn}', '{phone}', '{dx}', \
                 'Patient {f} {l} called from {phone} on 03/{day:02}/2024 about a refill; reach them at {fl}.{ll}@example.org. SSN {ssn} confirmed. A1C 7.2 %.')",
                id = i + 1,
                mrn = 100_000 + i * 7919 % 900_000,
                days = (i * 1237) % 20_000,
                ssn = format!("{:03}-{:02}-{:04}", 101 + (i * 37) % 600, 10 + i % 89, 1000 + (i * 7907) % 9000),
                dx = DX[i % 4],
                day = i % 28 + 1,
                fl = f.to_lowercase(),
                ll = l.to_lowercase(),
            )
        })
        .collect();
    sql.push_str(&rows.join(", "));
    sql.push(';');
    sql
}

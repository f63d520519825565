//! The real `phigate` binary, started with a configuration generated for one test:
//! programs attached to the test's cgroup, maps pinned under a test-only bpffs
//! directory, JSON logs to a file the test reads. `Drop` kills the agent and runs
//! `phigate detach`, so no program outlives the test.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{target_dir, unique, wait_for, TestCgroup};

/// Path of the `phigate` binary under test (`PHIGATE_BIN`, else target/debug/phigate).
pub fn phigate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PHIGATE_BIN") {
        return PathBuf::from(p);
    }
    let p = target_dir().join("debug/phigate");
    assert!(p.exists(), "{} is missing: run the tests with `cargo xtask test`, which builds it", p.display());
    p
}

/// One protected database in a test configuration.
#[derive(Clone, Debug)]
pub struct DbSpec {
    pub name: String,
    /// Addresses/prefixes workloads use.
    pub addresses: Vec<String>,
    pub port: u16,
    pub upstream: SocketAddr,
    /// Also listen on [::1] for IPv6 prefixes.
    pub listen6: bool,
    /// Upstream roles and password files (default: `postgres` without a password,
    /// for the trust-authenticated test server).
    pub credentials: Vec<(String, Option<PathBuf>)>,
    /// The authentication methods of roles that do not use the default (SCRAM with
    /// a password file, none without), as `methods` lists them.
    pub methods: Vec<(String, Vec<&'static str>)>,
    /// Extra TOML inside this [[database]] (e.g. `[database.upstream_tls]`).
    pub extra: String,
}

impl DbSpec {
    pub fn new(name: &str, addresses: &[&str], port: u16, upstream: SocketAddr) -> Self {
        Self {
            name: name.into(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            port,
            upstream,
            listen6: false,
            credentials: vec![("postgres".into(), None)],
            methods: Vec::new(),
            extra: String::new(),
        }
    }
}

/// A workload identity in a test configuration.
#[derive(Clone, Debug)]
pub struct IdentitySpec {
    pub name: String,
    /// TOML lines for authentication, e.g. `auth = "workload"`.
    pub auth: String,
    /// (database, upstream role, dbnames)
    pub access: Vec<(String, String, Vec<String>)>,
}

impl IdentitySpec {
    /// Workload authentication, access to `db` as `role`, any database name.
    pub fn workload(name: &str, db: &str, role: &str) -> Self {
        Self { name: name.into(), auth: "auth = \"workload\"".into(), access: vec![(db.into(), role.into(), vec!["*".into()])] }
    }
}

/// What a test wants the agent to do.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Attach cgroup, relative to the cgroup2 mount (the test's cgroup).
    pub attach_cgroup: String,
    pub databases: Vec<DbSpec>,
    /// (cgroup relative path, identity)
    pub protect: Vec<(String, String)>,
    pub deny_raw_sockets: bool,
    /// Appended verbatim (for sections later issues add).
    pub extra: String,
    /// Extra keys inside `[agent]` (e.g. `workers = 1\n`).
    pub agent_extra: String,
    /// Run the agent process itself inside this cgroup (relative path).
    pub agent_cgroup: Option<String>,
    /// Identities; when empty, every protected identity gets workload authentication
    /// and access to every database as its first credential's role.
    pub identities: Vec<IdentitySpec>,
}

impl AgentConfig {
    pub fn new(cgroup: &TestCgroup) -> Self {
        Self {
            attach_cgroup: cgroup.rel().to_string(),
            databases: Vec::new(),
            protect: Vec::new(),
            deny_raw_sockets: true,
            extra: String::new(),
            agent_extra: String::new(),
            agent_cgroup: None,
            identities: Vec::new(),
        }
    }

    pub fn database(mut self, db: DbSpec) -> Self {
        self.databases.push(db);
        self
    }

    pub fn identity(mut self, id: IdentitySpec) -> Self {
        self.identities.push(id);
        self
    }

    pub fn protect(mut self, cgroup_rel: &str, identity: &str) -> Self {
        self.protect.push((cgroup_rel.to_string(), identity.to_string()));
        self
    }

    /// The configuration file for an agent whose pins live in `pin_dir` and whose audit
    /// log (unless `extra` configures `[audit]` itself) in `audit_dir`.
    pub fn render_with_audit(&self, pin_dir: &Path, audit_dir: &Path) -> String {
        let mut t = self.render(pin_dir);
        if !self.extra.contains("[audit]") {
            let _ = writeln!(t, "\n[audit]\ndir = {:?}\nhead_interval_secs = 1", audit_dir.display().to_string());
        }
        t
    }

    pub fn render(&self, pin_dir: &Path) -> String {
        let mut t = String::new();
        let admin = pin_dir.file_name().map(|n| std::env::temp_dir().join(format!("{}.admin.sock", n.to_string_lossy()))).unwrap_or_default();
        let _ = writeln!(
            t,
            "[agent]\npin_dir = {:?}\nattach_cgroup = {:?}\nlog_format = \"json\"\ndeny_raw_sockets = {}\ndrain_timeout_secs = 2\nadmin_socket = {:?}\n{}",
            pin_dir.display().to_string(),
            self.attach_cgroup,
            self.deny_raw_sockets,
            admin.display().to_string(),
            self.agent_extra
        );
        for db in &self.databases {
            let addrs: Vec<String> = db.addresses.iter().map(|a| format!("{a:?}")).collect();
            let _ = writeln!(t, "[[database]]\nname = {:?}\naddresses = [{}]\nport = {}\nlisten = \"127.0.0.1:0\"", db.name, addrs.join(", "), db.port);
            if db.listen6 {
                let _ = writeln!(t, "listen6 = \"[::1]:0\"");
            }
            let _ = writeln!(t, "upstream = \"{}\"\n", db.upstream);
            t.push_str(&db.extra);
            t.push('\n');
            for (role, file) in &db.credentials {
                let _ = writeln!(t, "[[database.credential]]\nrole = {role:?}");
                if let Some(f) = file {
                    let _ = writeln!(t, "password_file = {:?}", f.display().to_string());
                }
                if let Some((_, methods)) = db.methods.iter().find(|(r, _)| r == role) {
                    let _ = writeln!(t, "methods = {methods:?}");
                }
                t.push('\n');
            }
        }
        for (cg, id) in &self.protect {
            let _ = writeln!(t, "[[protect]]\ncgroup = {cg:?}\nidentity = {id:?}\n");
        }
        let identities = if self.identities.is_empty() {
            let mut names: Vec<&String> = self.protect.iter().map(|(_, id)| id).collect();
            names.sort();
            names.dedup();
            names
                .into_iter()
                .map(|n| IdentitySpec {
                    name: n.clone(),
                    auth: "auth = \"workload\"\ndefault_action = \"allow\"".into(),
                    access: self.databases.iter().map(|d| (d.name.clone(), d.credentials[0].0.clone(), vec!["*".to_string()])).collect(),
                })
                .collect()
        } else {
            self.identities.clone()
        };
        for id in &identities {
            let _ = writeln!(t, "[[identity]]\nname = {:?}\n{}", id.name, id.auth);
            if !id.auth.contains("default_action") {
                let _ = writeln!(t, "default_action = \"allow\"");
            }
            for (db, role, dbnames) in &id.access {
                let names: Vec<String> = dbnames.iter().map(|d| format!("{d:?}")).collect();
                let _ = writeln!(t, "[[identity.access]]\ndatabase = {db:?}\nrole = {role:?}\ndbnames = [{}]", names.join(", "));
            }
            t.push('\n');
        }
        t.push_str(&self.extra);
        t
    }
}

pub struct Agent {
    child: Option<Child>,
    agent_cgroup: Option<PathBuf>,
    dir: PathBuf,
    config_path: PathBuf,
    pin_dir: PathBuf,
    log_path: PathBuf,
    starts: usize,
}

impl Agent {
    pub fn start(cfg: &AgentConfig) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("phigate-agent"));
        fs::create_dir_all(&dir)?;
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique("phigate-test"));
        let config_path = dir.join("phigate.toml");
        fs::write(&config_path, cfg.render_with_audit(&pin_dir, &dir.join("audit")))?;
        let agent_cgroup = cfg.agent_cgroup.as_ref().map(|rel| crate::env::cgroup2_mount().expect("cgroup2").join(rel));
        let mut agent = Self { child: None, agent_cgroup, log_path: dir.join("agent-0.log"), dir, config_path, pin_dir, starts: 0 };
        agent.spawn_and_wait()?;
        Ok(agent)
    }

    /// Start (again) with the same configuration; waits until it is ready.
    pub fn spawn_and_wait(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "agent already running");
        self.log_path = self.dir.join(format!("agent-{}.log", self.starts));
        self.starts += 1;
        let log = fs::File::create(&self.log_path)?;
        let mut cmd = Command::new(phigate_bin());
        if let Some(dir) = &self.agent_cgroup {
            crate::cgroup::run_in(&mut cmd, dir);
        }
        let child = cmd
            .arg("--config")
            .arg(&self.config_path)
            .arg("run")
            .env("PHIGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting phigate")?;
        self.child = Some(child);
        let ready = wait_for(Duration::from_secs(20), || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Some(Err(status));
            }
            self.events().iter().any(|e| e["message"] == "phigate agent ready").then_some(Ok(()))
        });
        match ready {
            Some(Ok(())) => Ok(()),
            Some(Err(status)) => {
                self.child = None;
                bail!("phigate exited ({status}) before it was ready:\n{}", self.raw_log())
            }
            None => bail!("phigate was not ready within 20 s:\n{}", self.raw_log()),
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The agent's audit log directory (when the test did not configure its own).
    pub fn audit_dir(&self) -> PathBuf {
        self.dir.join("audit")
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded) for a clean exit.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let status = wait_for(Duration::from_secs(15), || c.try_wait().ok().flatten());
        if status.is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        status
    }

    pub fn raw_log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The JSON log events of the current run.
    pub fn events(&self) -> Vec<Value> {
        let Ok(f) = fs::File::open(&self.log_path) else {
            return Vec::new();
        };
        BufReader::new(f).lines().map_while(Result::ok).filter_map(|l| serde_json::from_str(&l).ok()).collect()
    }

    /// Events with this message.
    pub fn events_named(&self, message: &str) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["message"] == message).collect()
    }

    /// The "connection accepted" record for a client pid, waiting for it (bounded).
    pub fn accepted_for_pid(&self, pid: u32) -> Option<Value> {
        wait_for(Duration::from_secs(5), || self.events_named("connection accepted").into_iter().find(|e| e["pid"] == pid))
    }

    /// The interceptor listener address of the first database.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.events_named("interceptor listening").first().and_then(|e| e["listen"].as_str()?.parse().ok())
    }

    /// The admin API socket of this agent.
    pub fn admin_socket(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}.admin.sock", self.pin_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()))
    }

    /// Run a `phigate` CLI command against this agent's configuration.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(phigate_bin()).arg("--config").arg(&self.config_path).args(args).stdin(Stdio::null()).output().expect("phigate runs")
    }

    /// `phigate status --json`.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "phigate status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status prints JSON")
    }

    /// Audit records of one kind (`phigate audit query --kind K --format json`).
    pub fn audit_records(&self, kind: &str) -> Vec<Value> {
        let out = self.cli(&["audit", "query", "--kind", kind, "--format", "json"]);
        assert!(out.status.success(), "phigate audit query failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Wait (bounded, 10 s) for an audit record of `kind` whose data satisfies `pred`.
    pub fn wait_audit(&self, kind: &str, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        wait_for(Duration::from_secs(10), || self.audit_records(kind).into_iter().find(|r| pred(&r["data"])))
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.status()["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name}"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        let out = self.cli(&["detach", "--force"]);
        if !out.status.success() {
            eprintln!("warning: phigate detach failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        if self.pin_dir.exists() {
            let _ = fs::remove_dir_all(&self.pin_dir);
        }
        // A killed agent leaves its admin socket file behind.
        let _ = fs::remove_file(self.admin_socket());
        if std::thread::panicking() {
            eprintln!("--- phigate log ({}) ---\n{}", self.log_path.display(), self.raw_log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

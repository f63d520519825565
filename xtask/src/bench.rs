//! `cargo xtask bench NAME`: system benchmarks that need the real kernel, real
//! sockets and (later) real PostgreSQL, each comparing phigate with the direct path in
//! one run and printing ratios. Numbers, not pass/fail: targets are printed next to
//! them.

use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context, Result};
use phigate_tests::{agent::DbSpec, cgroup::run_in, pg::free_port, Agent, AgentConfig, TestCgroup};
use serde_json::Value;

use crate::root;

pub fn run(name: &str) -> Result<()> {
    crate::setup::run()?;
    crate::build_ebpf()?;
    if name == "policy" {
        return policy();
    }
    if name == "detect" {
        return detect();
    }
    crate::build_workspace(true)?;
    // The harness starts the release binaries (or the agent binary named by
    // PHIGATE_BIN, to compare two builds).
    if std::env::var_os("PHIGATE_BIN").is_none() {
        std::env::set_var("PHIGATE_BIN", root().join("target/release/phigate"));
    }
    match name {
        "redirect" => redirect(),
        "pg" => pg(),
        "mask" => mask(),
        "audit" => audit(),
        other => bail!("unknown benchmark {other:?}; available: redirect, pg, policy, mask, detect, audit"),
    }
}

fn bench_bin() -> std::path::PathBuf {
    root().join("target/release/phigate-bench")
}

struct Server(Child);

impl Server {
    /// Start `phigate-bench ARGS` and wait until it says it is listening.
    fn listening(args: &[&str]) -> Result<Self> {
        let mut child = Command::new(bench_bin()).args(args).stdout(Stdio::piped()).spawn().with_context(|| format!("starting phigate-bench {}", args[0]))?;
        let stdout = child.stdout.take().expect("invariant: piped");
        let server = Self(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn client(cgroup: &Path, args: &[&str]) -> Result<Value> {
    client_env(cgroup, args, &[])
}

fn client_env(cgroup: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Value> {
    let mut cmd = Command::new(bench_bin());
    cmd.args(args).envs(env.iter().copied()).stdin(Stdio::null());
    run_in(&mut cmd, cgroup);
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("phigate-bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// One round's measurements on one path.
struct RedirectRun {
    /// Logins to the minimal bench server.
    setup: Value,
    /// Logins to a real PostgreSQL.
    pg_setup: Value,
    stream: Value,
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Connection set-up time and relay throughput, direct vs through phigate.
fn redirect() -> Result<()> {
    if let Some(reason) = phigate_tests::env::missing_capability() {
        bail!("the redirect benchmark needs the real kernel: {reason}");
    }
    let addr = Ipv4Addr::new(127, 0, 0, 3);
    let port = free_port(addr);
    let target = format!("{addr}:{port}");
    let _server = Server::listening(&["server", &target])?;
    // A plain byte relay in front of the same server: what any userspace hop costs on
    // this machine, the reference for the COPY throughput ratio.
    let relay_addr = format!("{addr}:{}", free_port(addr));
    let _relay = Server::listening(&["relay", &relay_addr, &target])?;
    // A real PostgreSQL too: its login (a forked backend) is what workloads wait for.
    let pg = phigate_tests::PgServer::start(Default::default())?;
    let pg_target = pg.socket_addr().to_string();
    let pg_env = [("PHIGATE_BENCH_USER", "postgres"), ("PHIGATE_BENCH_DB", "postgres")];

    let cg = TestCgroup::new();
    cg.child("direct");
    let prot = cg.child("protected");
    // The direct client does not ask for TLS, so neither does the agent: the same
    // login on both paths.
    let plain = if std::env::var_os("PHIGATE_BENCH_PREFER").is_none() { "[database.upstream_tls]\nmode = \"disable\"\n" } else { "" };
    let mut db = DbSpec::new("bench", &[&format!("{addr}/32")], port, target.parse()?);
    db.extra = plain.into();
    let mut pg_db = DbSpec::new("pg", &["127.0.0.2/32"], pg.port(), pg.socket_addr());
    pg_db.extra = plain.into();
    let cfg = AgentConfig::new(&cg).database(db).database(pg_db).protect(&prot, "bench-client");
    let agent = Agent::start(&cfg)?;
    let (direct_dir, prot_dir) = (cg.child_dir("direct"), cg.child_dir("protected"));

    let rounds: usize = std::env::var("PHIGATE_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let connects = std::env::var("PHIGATE_BENCH_CONNECTS").unwrap_or_else(|_| "1000".into());
    let connects = connects.as_str();
    const PG_CONNECTS: &str = "200";
    const BYTES: &str = "1073741824"; // 1 GiB
    const WRITE: &str = "65536";
    eprintln!("bench: warming up");
    for dir in [&direct_dir, &prot_dir] {
        client(dir, &["setup", &target, "200"])?;
        client_env(dir, &["setup", &pg_target, "20"], &pg_env)?;
    }
    // Alternate direct and phigate runs so drift on the shared cores hits both alike;
    // report the median of the rounds.
    let mut d_runs = Vec::new();
    let mut p_runs = Vec::new();
    let mut relay_runs = Vec::new();
    for round in 0..rounds {
        eprintln!("bench: round {}/{rounds}: {connects} logins to the bench server, {PG_CONNECTS} to PostgreSQL and a 1 GiB stream, each way", round + 1);
        let order: [(&Path, bool); 2] = if round % 2 == 0 { [(&direct_dir, false), (&prot_dir, true)] } else { [(&prot_dir, true), (&direct_dir, false)] };
        for (dir, via) in order {
            let run = RedirectRun {
                setup: client(dir, &["setup", &target, connects])?,
                pg_setup: client_env(dir, &["setup", &pg_target, PG_CONNECTS], &pg_env)?,
                stream: client(dir, &["stream", &target, BYTES, WRITE])?,
            };
            if via {
                p_runs.push(run)
            } else {
                d_runs.push(run)
            }
        }
        relay_runs.push(client(&direct_dir, &["stream", &relay_addr, BYTES, WRITE])?["gbytes_per_sec"].as_f64().unwrap_or(f64::NAN));
    }
    let redirected = agent.counter("redirected");
    drop(agent);

    let median =
        |runs: &[RedirectRun], pick: fn(&RedirectRun) -> &Value, k: &str| median_of(runs.iter().map(|r| pick(r)[k].as_f64().unwrap_or(f64::NAN)).collect());
    println!(
        "\nphigate redirect benchmark — loopback, median of {rounds} alternating rounds; each round {connects} sequential logins to a minimal server, {PG_CONNECTS} to PostgreSQL {}, and 1 GiB of COPY data in 64 KiB CopyData messages",
        phigate_tests::pg::pg_bin_dir().display()
    );
    println!("{:<34} {:>12} {:>14} {:>8}   target", "", "direct", "via phigate", "ratio");
    let row = |name: &str, pick: fn(&RedirectRun) -> &Value, k: &str, unit: &str, target: &str| {
        let (d, p) = (median(&d_runs, pick, k), median(&p_runs, pick, k));
        println!("{name:<34} {:>9.1} {unit} {:>11.1} {unit} {:>7.2}×   {target}", d, p, p / d);
    };
    let setup: fn(&RedirectRun) -> &Value = |r| &r.setup;
    let pg_setup: fn(&RedirectRun) -> &Value = |r| &r.pg_setup;
    let stream: fn(&RedirectRun) -> &Value = |r| &r.stream;
    row("connect() p50", setup, "connect_p50_us", "µs", "≤ 1.3× (TCP set-up)");
    row("connect() p99", setup, "connect_p99_us", "µs", "");
    row("login, minimal server p50", setup, "ready_p50_us", "µs", "(phigate: client login + its own upstream login)");
    row("login, minimal server p99", setup, "ready_p99_us", "µs", "");
    row("login, PostgreSQL p50", pg_setup, "ready_p50_us", "µs", "(a forked backend, as workloads see it)");
    row("login, PostgreSQL p99", pg_setup, "ready_p99_us", "µs", "");
    row("COPY FROM STDIN throughput", stream, "gbytes_per_sec", "GB/s", "≥ 0.8×");
    let (direct_stream, relay_stream) = (median(&d_runs, stream, "gbytes_per_sec"), median_of(relay_runs));
    println!(
        "{:<34} {:>9.1} GB/s {:>11.1} GB/s {:>7.2}×   (reference: a plain byte relay, no protocol, no phigate)",
        "COPY through a plain relay",
        direct_stream,
        relay_stream,
        relay_stream / direct_stream
    );
    let failures: u64 = d_runs.iter().chain(&p_runs).map(|r| r.setup["failures"].as_u64().unwrap_or(0) + r.pg_setup["failures"].as_u64().unwrap_or(0)).sum();
    println!("(connections through the agent: {redirected}; failed connections: {failures})");
    Ok(())
}

/// Criterion benches of the policy decision; prints the medians against the targets.
fn policy() -> Result<()> {
    crate::run(Command::new("cargo").current_dir(root()).args(["bench", "-p", "phigate-agent", "--bench", "policy"]))?;
    println!("\nphigate policy decision — median per statement (Criterion)");
    let dir = root().join("target/criterion");
    for (name, target) in [
        ("decide_uncached join (parse + decide)", "≤ 40 µs"),
        ("parse_pg_query__parse join (for comparison)", "(pg_query's parse: the tree and summaries phigate does not read)"),
        ("parse_sql__parse join (the tree only)", "(the parse phigate uses: the floor of an uncached decision)"),
        ("decide_cached join (same text)", "≤ 2 µs"),
        ("decide_cached pgbench select (other constants)", "≤ 2 µs"),
    ] {
        let ns = criterion_result(&dir.join(name))?.median_ns;
        println!("  {:<50} {:>9.2} µs   target {target}", name.replacen('_', "/", 1), ns / 1000.0);
    }
    Ok(())
}

/// One pgbench result, with the CPU time the proxy in the path used.
#[derive(Clone, Copy, Default)]
struct PgbenchResult {
    tps: f64,
    latency_ms: f64,
    /// Proxy CPU (user + system) per transaction, µs; 0 for direct.
    proxy_cpu_us: f64,
}

/// The run with the median TPS.
fn median(mut runs: Vec<PgbenchResult>) -> PgbenchResult {
    runs.sort_by(|a, b| a.tps.total_cmp(&b.tps));
    runs[runs.len() / 2]
}

/// (idle, total) ticks of all CPUs since boot, from /proc/stat.
fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal …: idle and iowait are idle.
    (f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0), f.iter().take(8).sum())
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

fn measured(proxy: Option<u32>, run: impl FnOnce() -> Result<PgbenchResult>, seconds: u32) -> Result<PgbenchResult> {
    let before = proxy.map(cpu_seconds).unwrap_or(0.0);
    let mut r = run()?;
    if let Some(pid) = proxy {
        let used = cpu_seconds(pid) - before;
        r.proxy_cpu_us = used * 1e6 / (r.tps * f64::from(seconds)).max(1.0);
    }
    Ok(r)
}

#[allow(clippy::too_many_arguments, reason = "pgbench's own options, one by one")]
fn pgbench(cgroup: &Path, host: &str, port: u16, user: &str, db: &str, mode: &str, clients: u32, seconds: u32) -> Result<PgbenchResult> {
    let mut cmd = Command::new(phigate_tests::pg::pg_bin("pgbench"));
    cmd.args([
        "-n",
        "-S",
        "-M",
        mode,
        "-c",
        &clients.to_string(),
        "-j",
        &clients.min(2).to_string(),
        "-T",
        &seconds.to_string(),
        "-h",
        host,
        "-p",
        &port.to_string(),
        "-U",
        user,
        db,
    ])
    .env("PGSSLMODE", "disable")
    .stdin(Stdio::null());
    run_in(&mut cmd, cgroup);
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("pgbench -M {mode} -c {clients} against {host}:{port} failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
    }
    let grab = |prefix: &str| {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix)).and_then(|rest| rest.split_whitespace().next()).and_then(|v| v.parse::<f64>().ok())
    };
    Ok(PgbenchResult {
        tps: grab("tps = ").context("no tps in pgbench output")?,
        latency_ms: grab("latency average = ").context("no latency in pgbench output")?,
        proxy_cpu_us: 0.0,
    })
}

struct Bouncer(Child);
impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// PgBouncer in session mode in front of the same server, run as the postgres user.
fn start_pgbouncer(dir: &Path, upstream_port: u16) -> Result<(Bouncer, u16)> {
    let addr = Ipv4Addr::new(127, 0, 0, 4);
    let port = free_port(addr);
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\nbench = host=127.0.0.2 port={upstream_port} dbname=postgres user=postgres\n[pgbouncer]\nlisten_addr = {addr}\nlisten_port = {port}\nunix_socket_dir =\nauth_type = any\npool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 64\nlogfile = {}\npidfile = {}\n",
            dir.join("pgbouncer.log").display(),
            dir.join("pgbouncer.pid").display()
        ),
    )?;
    let st = Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir).status()?;
    if !st.success() {
        bail!("chown of the PgBouncer directory failed");
    }
    let user = nix::unistd::User::from_name("postgres")?.context("no postgres user")?;
    let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("pgbouncer is not installed (cargo xtask setup installs it)")?;
    use std::os::unix::process::CommandExt;
    let child =
        Command::new(bin).arg(&ini).uid(user.uid.as_raw()).gid(user.gid.as_raw()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let bouncer = Bouncer(child);
    let up = phigate_tests::wait_for(std::time::Duration::from_secs(10), || std::net::TcpStream::connect((addr, port)).ok());
    if up.is_none() {
        bail!("PgBouncer did not start: {}", std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default());
    }
    Ok((bouncer, port))
}

/// An agent protecting its own cgroup's `protected` child, for `bench pg`.
struct BenchAgent {
    // Declared before `cg`: the agent stops (and detaches) before its cgroup goes.
    agent: Agent,
    cg: TestCgroup,
    dir: std::path::PathBuf,
}

impl BenchAgent {
    /// `agent_extra`: `[agent]` settings; `extra`: further config sections.
    fn start(db: &DbSpec, agent_extra: &str, extra: &str) -> Result<Self> {
        let cg = TestCgroup::new();
        let protected = cg.child("protected");
        let mut cfg = AgentConfig::new(&cg).database(db.clone()).protect(&protected, "bench-client");
        cfg.agent_extra = agent_extra.to_string();
        cfg.extra = extra.to_string();
        let agent = Agent::start(&cfg)?;
        let dir = cg.child_dir("protected");
        Ok(Self { agent, cg, dir })
    }
}

/// pgbench select-only through direct PostgreSQL, PgBouncer (session mode) and phigate.
fn pg() -> Result<()> {
    if let Some(reason) = phigate_tests::env::missing_capability() {
        bail!("the pg benchmark needs the real kernel: {reason}");
    }
    let seconds: u32 = std::env::var("PHIGATE_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let reps: usize = std::env::var("PHIGATE_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let server = phigate_tests::PgServer::start(phigate_tests::pg::PgOptions { conf: vec!["max_connections = 300".into()], ..Default::default() })?;
    eprintln!("bench: pgbench -i -s 10");
    let init = Command::new(phigate_tests::pg::pg_bin("pgbench"))
        .args(["-i", "-q", "-s", "10", "-h", "127.0.0.2", "-p", &server.port().to_string(), "-U", "postgres", "postgres"])
        .output()?;
    if !init.status.success() {
        bail!("pgbench -i failed: {}", String::from_utf8_lossy(&init.stderr));
    }
    let workers = std::env::var("PHIGATE_BENCH_WORKERS").map(|w| format!("workers = {w}\n")).unwrap_or_default();
    let db = DbSpec::new("bench", &["127.0.0.2/32"], server.port(), server.socket_addr());
    // phigate with its defaults; without the audit log, to price the audit alone; and
    // without the audit log and the SQL policy stage, to price the policy alone
    // against the one before: with the audit on in both, each statement waits for a
    // disk flush and the group-commit cycle's run-to-run spread (±15% here) is larger
    // than the policy's cost (under 1 µs per cached statement).
    let phigate = BenchAgent::start(&db, &workers, "")?;
    let no_audit = BenchAgent::start(&db, &workers, "[audit]\nenabled = false\n")?;
    let no_audit_policy = BenchAgent::start(&db, &workers, "[policy]\nenabled = false\n[audit]\nenabled = false\n")?;
    phigate.cg.child("direct");
    let direct_dir = phigate.cg.child_dir("direct");
    let tmp = std::env::temp_dir().join(phigate_tests::unique("phigate-bench-pgbouncer"));
    std::fs::create_dir_all(&tmp)?;
    let (bouncer, bouncer_port) = start_pgbouncer(&tmp, server.port())?;
    // The floor of any proxy on this machine: a plain byte relay (a thread per
    // direction, no protocol, nothing checked or recorded) in front of the same server.
    let relay_ip = Ipv4Addr::new(127, 0, 0, 5);
    let relay_port = free_port(relay_ip);
    let relay = Server::listening(&["relay", &format!("{relay_ip}:{relay_port}"), &server.socket_addr().to_string()])?;
    // In the order of the table's columns: (cgroup, address, port, database, process
    // whose CPU time is measured).
    let targets: [(&Path, &str, u16, &str, Option<u32>); 6] = [
        (&direct_dir, "127.0.0.2", server.port(), "postgres", None),
        (&direct_dir, "127.0.0.4", bouncer_port, "bench", Some(bouncer.0.id())),
        (&direct_dir, "127.0.0.5", relay_port, "postgres", Some(relay.0.id())),
        (&phigate.dir, "127.0.0.2", server.port(), "postgres", phigate.agent.pid()),
        (&no_audit.dir, "127.0.0.2", server.port(), "postgres", no_audit.agent.pid()),
        (&no_audit_policy.dir, "127.0.0.2", server.port(), "postgres", no_audit_policy.agent.pid()),
    ];

    // PHIGATE_BENCH_MODES=prepared PHIGATE_BENCH_CLIENTS=1,8 narrow the run.
    let modes: Vec<String> =
        std::env::var("PHIGATE_BENCH_MODES").map(|v| v.split(',').map(String::from).collect()).unwrap_or_else(|_| vec!["simple".into(), "prepared".into()]);
    let client_counts: Vec<u32> =
        std::env::var("PHIGATE_BENCH_CLIENTS").ok().map(|v| v.split(',').filter_map(|c| c.parse().ok()).collect()).unwrap_or_else(|| vec![1, 8, 32]);
    let mut rows = Vec::new();
    for mode in modes.iter().map(String::as_str) {
        for clients in client_counts.iter().copied() {
            eprintln!(
                "bench: -M {mode} -c {clients} ({reps} × {seconds} s each: direct, PgBouncer, a plain relay, phigate, phigate without audit, without audit and policy, in rotating order)"
            );
            let mut runs: [Vec<PgbenchResult>; 6] = Default::default();
            for rep in 0..reps {
                // Each round starts one later in the list, so no configuration always
                // runs right after the audit-on one (whose disk writes may still be
                // settling) or first after a quiet spell.
                for which in (0..targets.len()).map(|i| (i + rep) % targets.len()) {
                    let (dir, host, port, db, pid) = targets[which];
                    runs[which].push(measured(pid, || pgbench(dir, host, port, "postgres", db, mode, clients, seconds), seconds)?);
                }
            }
            let [d, b, r, p, n, o] = runs.map(median);
            rows.push((mode, clients, d, b, r, p, n, o));
        }
    }
    let sessions = phigate.agent.events_named("session started").len();
    drop((bouncer, relay));
    drop((phigate, no_audit, no_audit_policy));
    let _ = std::fs::remove_dir_all(&tmp);

    println!(
        "\nphigate pg benchmark — pgbench -S (select-only), median of {reps} rounds of {seconds} s runs in rotating order, loopback, {} CPUs shared by everything",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!(
        "{:<9} {:>3} | {:>9} {:>8} | {:>9} {:>8} {:>7} | {:>9} {:>7} | {:>9} {:>8} {:>7} | {:>9} {:>7} {:>10} {:>7} | {:>8} {:>8} {:>10} {:>10} {:>8} {:>8}",
        "mode",
        "-c",
        "direct",
        "lat ms",
        "pgbouncer",
        "lat ms",
        "cpu µs",
        "relay",
        "cpu µs",
        "phigate",
        "lat ms",
        "cpu µs",
        "no audit",
        "cpu µs",
        "no au+pol",
        "cpu µs",
        "÷direct",
        "÷bouncer",
        "noau÷bncr",
        "relay÷bncr",
        "policy",
        "audit"
    );
    for (mode, c, d, b, r, p, n, o) in &rows {
        println!(
            "{mode:<9} {c:>3} | {:>9.0} {:>8.3} | {:>9.0} {:>8.3} {:>7.1} | {:>9.0} {:>7.1} | {:>9.0} {:>8.3} {:>7.1} | {:>9.0} {:>7.1} {:>10.0} {:>7.1} | {:>7.2}× {:>7.2}× {:>9.2}× {:>9.2}× {:>7.2}× {:>7.2}×",
            d.tps,
            d.latency_ms,
            b.tps,
            b.latency_ms,
            b.proxy_cpu_us,
            r.tps,
            r.proxy_cpu_us,
            p.tps,
            p.latency_ms,
            p.proxy_cpu_us,
            n.tps,
            n.proxy_cpu_us,
            o.tps,
            o.proxy_cpu_us,
            p.tps / d.tps,
            p.tps / b.tps,
            n.tps / b.tps,
            r.tps / b.tps,
            n.tps / o.tps,
            p.tps / n.tps
        );
    }
    println!("(cpu µs: the proxy's own CPU time per transaction; phigate runs with its defaults: policy, safe-harbor masking, audit;");
    println!(" relay: a plain byte relay (a thread per direction; no protocol, nothing checked or recorded), the floor of any proxy here;");
    println!(" no audit: the audit log off; no au+pol: the audit log and the SQL policy off; noau÷bncr: no audit ÷ PgBouncer;");
    println!(" policy: no audit ÷ no au+pol, the policy's price; audit: phigate ÷ no audit, the audit's price)");
    println!("targets: phigate ≥ 0.95× PgBouncer at -c 1, ≥ 1.3× PgBouncer at -c 8; policy ≥ 0.9×; audit ≥ 0.85× (TPS). Sessions through phigate: {sessions}");
    Ok(())
}

/// Criterion: detector throughput on free-text clinical notes, and the masker's CPU per
/// row on bench mask's rows.
fn detect() -> Result<()> {
    crate::run(Command::new("cargo").current_dir(root()).args(["bench", "-p", "phigate-agent", "--bench", "mask"]))?;
    println!("\nphigate detectors — free-text clinical notes, one core (Criterion, median)");
    let dir = root().join("target/criterion");
    // Criterion keeps a benchmark group's results under the group's directory.
    for name in ["notes with identifiers", "notes without identifiers"] {
        let r = criterion_result(&dir.join("detect").join(name))?;
        println!("  detect/{name:<33} {:>8.0} MB/s   target ≥ 200 MB/s", r.per("Bytes") * 1e-6);
    }
    // The masking state machine alone on bench mask's rows (no relay, no audit).
    let r = criterion_result(&dir.join("mask").join("rows of bench mask"))?;
    println!(
        "  mask/rows of bench mask                  {:>8.0} ns/row (the masker alone: 3 column rules and the detectors on one text column)",
        1e9 / r.per("Elements")
    );
    Ok(())
}

/// One Criterion benchmark's latest result.
struct CriterionResult {
    median_ns: f64,
    /// What one iteration processes: `{"Bytes": n}` or `{"Elements": n}`, if set.
    throughput: Value,
}

impl CriterionResult {
    /// Units of `kind` ("Bytes", "Elements") per second, at the median.
    fn per(&self, kind: &str) -> f64 {
        self.throughput[kind].as_f64().unwrap_or(f64::NAN) / self.median_ns * 1e9
    }
}

/// The result Criterion left in `dir` (a benchmark's directory under target/criterion).
fn criterion_result(dir: &Path) -> Result<CriterionResult> {
    let read = |f: &str| -> Result<Value> {
        let p = dir.join("new").join(f);
        Ok(serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?)?)
    };
    let (est, bench) = (read("estimates.json")?, read("benchmark.json")?);
    Ok(CriterionResult { median_ns: est["median"]["point_estimate"].as_f64().unwrap_or(f64::NAN), throughput: bench["throughput"].clone() })
}

/// Peak resident memory of a process since the last reset, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn reset_peak_rss(pid: u32) {
    // Writing 5 to clear_refs resets the peak RSS counter (VmHWM).
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

fn pgclient_stream(cgroup: Option<&Path>, port: u16, sql: &str) -> Result<Value> {
    let mut cmd = Command::new(root().join("target/release/phigate-pgclient"));
    cmd.args(["stream", &format!("host=127.0.0.2 port={port} user=postgres dbname=postgres"), sql]).stdin(Stdio::null());
    if let Some(c) = cgroup {
        run_in(&mut cmd, c);
    }
    let out = cmd.output()?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("pgclient: {}", String::from_utf8_lossy(&out.stderr)))?;
    if v["ok"] != true {
        bail!("pgclient stream failed: {v}");
    }
    Ok(v)
}

/// A 1,000,000-row, 6-column result (3 PHI columns) through phigate with masking vs
/// direct; peak agent RSS for 1,000,000 rows vs 10,000.
fn mask() -> Result<()> {
    if let Some(reason) = phigate_tests::env::missing_capability() {
        bail!("the mask benchmark needs the real kernel: {reason}");
    }
    let reps: usize = std::env::var("PHIGATE_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let server = phigate_tests::PgServer::start(Default::default())?;
    eprintln!("bench: loading 1,000,000 rows");
    server.psql_admin(
        "postgres",
        "create table bench_rows as select g as id, lpad((g % 899 + 1)::text, 3, '0') || '-' || lpad((g % 99 + 1)::text, 2, '0') || '-' || lpad((g % 9999 + 1)::text, 4, '0') as ssn, \
         'Patient ' || g as name, date '1950-01-01' + (g % 20000) as dob, 'HbA1c ' || round(g % 90 / 10.0 + 4, 1) || ' %, ICD-10 E11.9' as lab, (g % 1000) / 10.0 as value \
         from generate_series(1, 1000000) g",
    )?;
    let dir = std::env::temp_dir().join(phigate_tests::unique("phigate-bench-mask"));
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("key");
    std::fs::write(&key, [7u8; 32])?;
    let db = DbSpec::new("bench", &["127.0.0.2/32"], server.port(), server.socket_addr());
    let masking = format!(
        "[masking]\nhash_key_file = {:?}\n[[masking.profile]]\nname = \"bench\"\nidentities = [\"bench-client\"]\n\
         [[masking.profile.rule]]\ncolumn = \"public.bench_rows.ssn\"\nstrategy = \"partial\"\n\
         [[masking.profile.rule]]\ncolumn = \"public.bench_rows.name\"\nstrategy = \"hash\"\n\
         [[masking.profile.rule]]\ncolumn = \"public.bench_rows.dob\"\nstrategy = \"year\"\n",
        key.display().to_string()
    );
    let masked = BenchAgent::start(&db, "", &masking)?;
    // The same relay without masking, to price the masking alone.
    let unmasked = BenchAgent::start(&db, "", "[masking]\nenabled = false\n")?;
    // Masking with the audit log off: the masking's own price, apart from the audit's
    // (which hashes every raw and delivered row and keeps and seals the first MiB).
    let masked_noaudit = BenchAgent::start(&db, "", &format!("[audit]\nenabled = false\n{masking}"))?;
    // The floor of any proxy: a plain byte relay in front of the same server.
    let relay_port = free_port(Ipv4Addr::new(127, 0, 0, 2));
    let relay = Server::listening(&["relay", &format!("127.0.0.2:{relay_port}"), &server.socket_addr().to_string()])?;
    let big = "select id, ssn, name, dob, lab, value from bench_rows";
    let small = "select id, ssn, name, dob, lab, value from bench_rows where id <= 10000";
    eprintln!("bench: warming up");
    pgclient_stream(Some(&masked.dir), server.port(), small)?;
    // In the order of the printed rows: (name, cgroup the client runs in, port, the
    // proxy's pid).
    let targets: [(&str, Option<&Path>, u16, Option<u32>); 5] = [
        ("direct", None, server.port(), None),
        ("through phigate", Some(&masked.dir), server.port(), masked.agent.pid()),
        ("without masking", Some(&unmasked.dir), server.port(), unmasked.agent.pid()),
        ("without the audit log", Some(&masked_noaudit.dir), server.port(), masked_noaudit.agent.pid()),
        ("through a plain relay", None, relay_port, Some(relay.0.id())),
    ];
    // Per configuration and round: wall seconds, the proxy's CPU seconds, and the
    // share of all CPUs left idle (is the proxy's one session thread the bottleneck,
    // or are the cores full?), over the client's whole run (connecting included).
    let mut runs: [Vec<(f64, f64, f64)>; 5] = Default::default();
    for round in 0..reps {
        eprintln!("bench: round {}/{reps}: 1,000,000 rows direct, through phigate, without masking, without the audit log, through a plain relay", round + 1);
        for (i, (name, dir, port, pid)) in targets.iter().enumerate() {
            let (cpu_before, idle_before) = (pid.map(cpu_seconds).unwrap_or(0.0), machine_ticks());
            let run = pgclient_stream(*dir, *port, big)?;
            let (cpu, idle_after) = (pid.map(cpu_seconds).unwrap_or(0.0) - cpu_before, machine_ticks());
            if run["rows"] != 1_000_000 {
                bail!("row counts differ: {name} returned {} rows, not 1,000,000", run["rows"]);
            }
            let idle = (idle_after.0 - idle_before.0) / (idle_after.1 - idle_before.1).max(1.0);
            runs[i].push((run["seconds"].as_f64().unwrap_or(f64::NAN), cpu, idle));
        }
    }
    let masked_events = masked.agent.events_named("result masked").len();
    drop(masked);
    // Peak RSS of each result size on a fresh agent: memory the allocator kept from
    // the timed runs would otherwise hide the smaller result's own peak. One row
    // first, so start-up's transient memory is not counted as the query's.
    let peak_of = |sql: &str| -> Result<u64> {
        let fresh = BenchAgent::start(&db, "", &masking)?;
        let pid = fresh.agent.pid().context("agent pid")?;
        pgclient_stream(Some(&fresh.dir), server.port(), "select id, ssn, name, dob, lab, value from bench_rows where id = 1")?;
        reset_peak_rss(pid);
        pgclient_stream(Some(&fresh.dir), server.port(), sql)?;
        Ok(peak_rss_kib(pid))
    };
    let rss_small = peak_of(small)?;
    let rss_big = peak_of(big)?;
    drop((unmasked, masked_noaudit, relay));
    let _ = std::fs::remove_dir_all(&dir);
    // The round with the median wall time.
    let med = |mut v: Vec<(f64, f64, f64)>| {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v[v.len() / 2]
    };
    let [d, m, u, n, r] = runs.map(med);
    let cpu = |(_, c, idle): (f64, f64, f64)| format!("proxy CPU {:>4.0} ns/row, cores idle {:>3.0} %", c * 1e9 / 1e6, idle * 100.0);
    println!("\nphigate mask benchmark — 1,000,000 rows × 6 columns (ssn partial, name hash, dob year; lab text through the detectors), tokio-postgres streaming binary results, median of {reps}");
    println!("  direct                 {:>8.2} s                                        cores idle {:>3.0} %", d.0, d.2 * 100.0);
    println!("  through phigate        {:>8.2} s   ratio {:.2}×   {}   target ≤ 1.3×", m.0, m.0 / d.0, cpu(m));
    println!("  … without masking      {:>8.2} s   ratio {:.2}×   {}   (the relay and the audit, no masking)", u.0, u.0 / d.0, cpu(u));
    println!("  … without the audit    {:>8.2} s   ratio {:.2}×   {}   (the relay and the masking, no audit log)", n.0, n.0 / d.0, cpu(n));
    println!(
        "  a plain byte relay     {:>8.2} s   ratio {:.2}×   {}   (reference: no protocol, no phigate — the floor of any proxy here)",
        r.0,
        r.0 / d.0,
        cpu(r)
    );
    println!("  agent peak RSS, 10,000 rows      {:>8} KiB", rss_small);
    println!("  agent peak RSS, 1,000,000 rows   {:>8} KiB   ratio {:.2}×   target ≤ 1.10×", rss_big, rss_big as f64 / rss_small.max(1) as f64);
    println!("  (results masked, as logged: {masked_events})");
    Ok(())
}

/// Durable audit records per second with group commit, on the disk under target/.
fn audit() -> Result<()> {
    let mut rows = Vec::new();
    for writers in [1u64, 8, 64, 256] {
        let dir = root().join("target").join(phigate_tests::unique("bench-audit"));
        let records = if writers == 1 { 5_000 } else { 200_000 };
        eprintln!("bench: {records} durable records from {writers} concurrent writers into {}", dir.display());
        let out = Command::new(root().join("target/release/phigate"))
            .args(["audit", "bench", "--dir"])
            .arg(&dir)
            .args(["--records", &records.to_string(), "--writers", &writers.to_string()])
            .output()?;
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(phigate_tests::unique_sibling(&dir, ".keys"));
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("phigate audit bench: {}", String::from_utf8_lossy(&out.stderr)))?;
        if v["ok"] != true {
            bail!("the audit bench failed: {v}");
        }
        rows.push((writers, v["records_per_sec"].as_f64().unwrap_or(f64::NAN), v["seconds"].as_f64().unwrap_or(f64::NAN), v["records"].as_u64().unwrap_or(0)));
    }
    println!("\nphigate audit benchmark — durable records (writers are tasks on a multi-threaded runtime, as sessions are; each waits for fdatasync before its next record), group commit, {} disk", root().display());
    for (w, rps, secs, n) in rows {
        println!("  {w:>3} writers   {rps:>10.0} records/s   ({n} records in {secs:.2} s){}", if w == 64 { "   target ≥ 50,000/s" } else { "" });
    }
    Ok(())
}

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
    crate::build_workspace(true)?;
    // The harness starts the release binaries.
    std::env::set_var("PHIGATE_BIN", root().join("target/release/phigate"));
    match name {
        "redirect" => redirect(),
        other => bail!("unknown benchmark {other:?}; available: redirect"),
    }
}

fn bench_bin() -> std::path::PathBuf {
    root().join("target/release/phigate-bench")
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn client(cgroup: &Path, args: &[&str]) -> Result<Value> {
    let mut cmd = Command::new(bench_bin());
    cmd.args(args).stdin(Stdio::null());
    run_in(&mut cmd, cgroup);
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("phigate-bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Connection set-up time and relay throughput, direct vs through phigate.
fn redirect() -> Result<()> {
    if let Some(reason) = phigate_tests::env::missing_capability() {
        bail!("the redirect benchmark needs the real kernel: {reason}");
    }
    let addr = Ipv4Addr::new(127, 0, 0, 3);
    let port = free_port(addr);
    let target = format!("{addr}:{port}");
    let mut child = Command::new(bench_bin()).args(["server", &target]).stdout(Stdio::piped()).spawn().context("starting the bench server")?;
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line)?;
    let _server = Server(child);

    let cg = TestCgroup::new();
    let direct_cg = cg.child("direct");
    let prot = cg.child("protected");
    let cfg = AgentConfig::new(&cg).database(DbSpec::new("bench", &[&format!("{addr}/32")], port, target.parse()?)).protect(&prot, "bench-client");
    let agent = Agent::start(&cfg)?;
    let (direct_dir, prot_dir) = (cg.child_dir("direct"), cg.child_dir("protected"));
    let _ = direct_cg;

    const ROUNDS: usize = 5;
    const CONNECTS: &str = "1000";
    const BYTES: &str = "1073741824"; // 1 GiB
    const WRITE: &str = "65536";
    eprintln!("bench: warming up");
    client(&direct_dir, &["setup", &target, "200"])?;
    client(&prot_dir, &["setup", &target, "200"])?;
    // Alternate direct and phigate runs so drift on the shared cores hits both alike;
    // report the median of the rounds.
    let mut d_runs = Vec::new();
    let mut p_runs = Vec::new();
    for round in 0..ROUNDS {
        eprintln!("bench: round {}/{ROUNDS}: {CONNECTS} connections and a 1 GiB stream each way", round + 1);
        let order: [(&Path, bool); 2] = if round % 2 == 0 { [(&direct_dir, false), (&prot_dir, true)] } else { [(&prot_dir, true), (&direct_dir, false)] };
        for (dir, via) in order {
            let setup = client(dir, &["setup", &target, CONNECTS])?;
            let stream = client(dir, &["stream", &target, BYTES, WRITE])?;
            if via {
                p_runs.push((setup, stream))
            } else {
                d_runs.push((setup, stream))
            }
        }
    }
    let redirected = agent.counter("redirected");
    drop(agent);

    let median = |runs: &[(Value, Value)], which: usize, k: &str| {
        let mut v: Vec<f64> = runs.iter().map(|r| if which == 0 { &r.0 } else { &r.1 }).map(|x| x[k].as_f64().unwrap_or(f64::NAN)).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("\nphigate redirect benchmark — loopback, median of {ROUNDS} alternating rounds; each round {CONNECTS} sequential connections and a 1 GiB stream in 64 KiB writes");
    println!("{:<28} {:>12} {:>14} {:>8}   target", "", "direct", "via phigate", "ratio");
    let row = |name: &str, which: usize, k: &str, unit: &str, target: &str| {
        let (d, p) = (median(&d_runs, which, k), median(&p_runs, which, k));
        println!("{name:<28} {:>9.1} {unit} {:>11.1} {unit} {:>7.2}×   {target}", d, p, p / d);
    };
    row("connect() p50", 0, "connect_p50_us", "µs", "≤ 1.3× (set-up)");
    row("connect() p99", 0, "connect_p99_us", "µs", "");
    row("connect + first reply p50", 0, "first_reply_p50_us", "µs", "(includes the agent's upstream connect)");
    row("connect + first reply p99", 0, "first_reply_p99_us", "µs", "");
    row("throughput", 1, "gbytes_per_sec", "GB/s", "≥ 0.8×");
    let failures: u64 = d_runs.iter().chain(&p_runs).map(|r| r.0["failures"].as_u64().unwrap_or(0)).sum();
    println!("(connections through the agent: {redirected}; failed connections: {failures})");
    Ok(())
}

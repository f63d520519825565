//! `cargo xtask`: the project's developer commands.
//!
//! ```text
//! cargo xtask setup        install what a fresh Debian/Ubuntu machine needs (idempotent)
//! cargo xtask build-ebpf   build the kernel object the agent embeds
//! cargo xtask test         set up, build, run every test (real kernel, real PostgreSQL)
//! cargo xtask demo         the guided demo: agent + PostgreSQL + a protected workload
//! cargo xtask bench NAME   benchmarks (redirect, …)
//! ```

mod bench;
mod demo;
mod gen;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "phigate developer commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install apt packages, nightly rust-src, bpf-linker and PostgreSQL (idempotent).
    Setup,
    /// Build the eBPF object into target/bpf/phigate.bpf.o.
    BuildEbpf,
    /// Set up, build, and run all tests, including the real-kernel end-to-end tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the demo: local PostgreSQL with synthetic patients, the agent, a protected psql.
    Demo,
    /// Regenerate `phigate-agent/src/sql/schema.rs` from pg_query's .proto (after
    /// upgrading pg_query).
    GenSqlSchema,
    /// Run a benchmark: `redirect`.
    Bench {
        /// Which benchmark.
        name: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::run().map(drop),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => demo::run(),
        Cmd::Bench { name } => bench::run(&name),
        Cmd::GenSqlSchema => gen::run(),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub fn object_path() -> PathBuf {
    root().join("target/bpf/phigate.bpf.o")
}

/// Run a command, failing with its name if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot start {desc}"))?;
    if !status.success() {
        bail!("{desc} failed ({status})");
    }
    Ok(())
}

/// Build the kernel programs with nightly + bpf-linker and put the object where the
/// agent's build script looks for it.
pub fn build_ebpf() -> Result<()> {
    setup::require_ebpf_toolchain()?;
    let dir = root().join("phigate-ebpf");
    eprintln!("xtask: building the eBPF object (nightly, bpfel-unknown-none)");
    run(Command::new("cargo")
        .current_dir(&dir)
        .args(["+nightly", "build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        // BTF is required for the socket-storage map; debuginfo feeds it.
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR"))
    .context("building phigate-ebpf failed; `cargo xtask setup` installs the toolchain it needs")?;
    let built = dir.join("target/bpfel-unknown-none/release/phigate-ebpf");
    let out = object_path();
    std::fs::create_dir_all(out.parent().expect("has parent"))?;
    // Replace only when changed, so the agent is not rebuilt needlessly.
    let new = std::fs::read(&built)?;
    if std::fs::read(&out).ok().as_deref() != Some(new.as_slice()) {
        std::fs::write(&out, new)?;
    }
    eprintln!("xtask: kernel object at {}", out.display());
    Ok(())
}

/// Build the agent and test helpers (debug) after the kernel object.
pub fn build_workspace(release: bool) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).args(["build", "-p", "phigate-agent", "-p", "phigate-tests"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn test(args: &[String]) -> Result<()> {
    setup::run()?;
    build_ebpf()?;
    build_workspace(false)?;
    eprintln!("xtask: running all tests (real eBPF, real PostgreSQL; skipping is an error here)");
    let tests = run(Command::new("cargo")
        .current_dir(root())
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(args)
        .env("PHIGATE_E2E_REQUIRED", "1")
        .env("PHIGATE_BIN", root().join("target/debug/phigate"))
        .env("PHIGATE_PROBE_BIN", root().join("target/debug/phigate-probe")));
    if !args.is_empty() {
        return tests;
    }
    // Every Criterion benchmark once, as a test: a benchmark whose set-up no longer
    // matches the code fails here, not first in `cargo xtask bench`.
    eprintln!("xtask: running each benchmark once");
    let benches = run(Command::new("cargo").current_dir(root()).args(["test", "-p", "phigate-agent", "--bench", "mask", "--bench", "policy"]));
    tests.and(benches)
}

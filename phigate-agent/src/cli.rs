//! Command-line definitions (clap). Parsing only: no behaviour lives here.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_PATH;

/// phigate: a node agent that carries protected workloads' PostgreSQL connections
/// through an interceptor they cannot route around.
#[derive(Debug, Parser)]
#[command(name = "phigate", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short = 'c', global = true, env = "PHIGATE_CONFIG", default_value = DEFAULT_PATH)]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attach (or adopt) the kernel programs and serve the interceptor.
    Run,
    /// Show attached programs, protected cgroups, protected databases and counters.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Protect a cgroup on the running node, effective for its next connection.
    Protect {
        /// Cgroup path relative to the cgroup v2 mount (e.g. `team-a/agent-1`).
        #[arg(long)]
        cgroup: String,
        /// Identity name the workloads in it are known by.
        #[arg(long)]
        identity: String,
        /// Create the cgroup if it does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Stop protecting a cgroup protected with `phigate protect` (or the configuration).
    Unprotect {
        /// Cgroup path relative to the cgroup v2 mount.
        #[arg(long)]
        cgroup: String,
    },
    /// Detach every kernel program and remove the pinned state.
    Detach {
        /// Detach even though an agent is running.
        #[arg(long)]
        force: bool,
    },
    /// Statements held for approval: list, show, approve, deny (talks to the running agent).
    Approvals {
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
    /// Print a SCRAM-SHA-256 verifier for `scram_verifier` (reads the password from
    /// stdin unless --password is given). Needs no configuration.
    HashPassword {
        /// The password (visible in the process list: prefer stdin).
        #[arg(long)]
        password: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Pending requests: requester identity, database, statement, rule, waiting time.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One request in full.
    Show { id: u64 },
    /// Let a held statement run.
    Approve {
        id: u64,
        /// Why (kept with the decision).
        #[arg(long)]
        reason: String,
        /// Also let the same statement (same fingerprint) from the same identity run
        /// without asking for this long: e.g. 30m, 2h, 90s.
        #[arg(long)]
        window: Option<String>,
    },
    /// Refuse a held statement.
    Deny {
        id: u64,
        /// Why (the workload sees it).
        #[arg(long)]
        reason: String,
    },
}

/// Parse `90s`, `30m`, `2h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        _ => (s, 1),
    };
    num.parse::<u64>().map(|n| std::time::Duration::from_secs(n * mult)).map_err(|_| format!("{s:?} is not a duration like 90s, 30m or 2h"))
}

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
    /// Print a SCRAM-SHA-256 verifier for `scram_verifier` (reads the password from
    /// stdin unless --password is given). Needs no configuration.
    HashPassword {
        /// The password (visible in the process list: prefer stdin).
        #[arg(long)]
        password: Option<String>,
    },
}

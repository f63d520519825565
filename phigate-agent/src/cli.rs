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
    /// The audit log: verify, query, export, replay, prune, shred. Works without a
    /// configuration (give --dir, --public-key, --keys); with one, its [audit]
    /// settings are the defaults.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
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
        /// Also let the same statement (constants aside) from the same identity run
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

/// Which records `query` and `export` select.
#[derive(Debug, clap::Args, Clone, Default)]
pub struct AuditFilter {
    /// Records at or after this time (2026-12-02 or 2026-12-02T10:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Records at or before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// Records of sessions of this workload identity.
    #[arg(long)]
    pub identity: Option<String>,
    /// Records of this session (`s-…`, as `query` shows it).
    #[arg(long)]
    pub session: Option<String>,
    /// Statements decided so: blocked, allowed, approved, denied, timed_out, unchecked.
    #[arg(long)]
    pub decision: Option<String>,
    /// Records of these kinds (statement, statement_end, session_start, bypass, …).
    #[arg(long = "kind")]
    pub kinds: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check hashes, chain links and signatures; exit 1 naming the first bad place.
    Verify {
        /// The log directory (default: audit.dir of the configuration).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The trusted public key: a file holding it in hex, or the hex (default: the
        /// configuration's signing key, else the log's own audit.pub, with a warning).
        #[arg(long)]
        public_key: Option<String>,
        /// A copy of head.json kept off the node (repeatable): its record must be in
        /// the log, so a head put back from before with the records after it
        /// removed is found.
        #[arg(long, value_name = "FILE")]
        anchor: Vec<PathBuf>,
    },
    /// Find records.
    Query {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        filter: AuditFilter,
        /// table or json (JSON lines).
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Export records: JSON lines, or FHIR R4 AuditEvent resources.
    Export {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        filter: AuditFilter,
        /// jsonl or fhir.
        #[arg(long)]
        format: String,
        /// FHIR only: one Bundle instead of one resource per line.
        #[arg(long)]
        bundle: bool,
    },
    /// One session in order: statements, decisions, approvals, results as delivered.
    Replay {
        /// The session (`s-…`).
        session: String,
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Also show the raw results and parameters (needs the period keys).
        #[arg(long)]
        raw: bool,
        /// The period key directory (default: audit.key_dir of the configuration).
        #[arg(long)]
        keys: Option<PathBuf>,
    },
    /// Remove sealed segments older than DATE, leaving a signed tombstone.
    Prune {
        /// YYYY-MM-DD (UTC): segments whose last record is older go.
        #[arg(long)]
        before: String,
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The signing key (default: audit.signing_key_file of the configuration).
        #[arg(long)]
        signing_key: Option<PathBuf>,
    },
    /// Measure durable records per second on this disk (`cargo xtask bench audit`).
    #[command(hide = true)]
    Bench {
        /// An empty directory to write a throwaway log into.
        #[arg(long)]
        dir: PathBuf,
        /// Records to write.
        #[arg(long, default_value_t = 200_000)]
        records: u64,
        /// Concurrent writers, each waiting for its record to be durable.
        #[arg(long, default_value_t = 64)]
        writers: u64,
    },
    /// Destroy the period keys before DATE: their raw data becomes unreadable for good.
    Shred {
        /// Periods (UTC days) before this date lose their keys.
        #[arg(long)]
        before: String,
        /// The period key directory (default: the config's `[audit] keys`/periods).
        #[arg(long)]
        keys: Option<PathBuf>,
        /// Also destroy today's key. A running agent keeps today's key in memory, so
        /// stop it first, or what it seals later today becomes unreadable too.
        #[arg(long)]
        include_today: bool,
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
    // Checked: a wrapped product would turn an absurd window into a plausible one.
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is not a duration like 90s, 30m or 2h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_overflow_is_an_error() {
        assert_eq!(parse_duration("90s"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(std::time::Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(std::time::Duration::from_secs(7200)));
        assert!(parse_duration("x").is_err());
        // 5124095576030432 h is 2^64 s + 3584 s: it must not wrap to an hour's window.
        assert!(parse_duration("5124095576030432h").is_err());
    }
}

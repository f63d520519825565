//! Test harness for phigate's end-to-end tests, demo and benchmarks: a real PostgreSQL
//! server, cgroups the test owns, the real `phigate` binary, and a way to run real
//! clients inside a cgroup.
//!
//! Every resource is a guard that cleans up in `Drop` — servers stopped, programs
//! detached and unpinned, cgroups emptied and removed — so a failing test leaves the
//! kernel as it found it.
//!
//! # Layout
//! - [`env`]: skip-with-a-message when the machine cannot run eBPF tests
//! - [`pg`]: [`PgServer`], a throwaway PostgreSQL on a loopback address
//! - [`cgroup`]: [`TestCgroup`], a cgroup v2 subtree owned by one test
//! - [`agent`]: [`Agent`], the `phigate` binary with a generated configuration
//! - [`pki`]: a test CA and a JWT issuer
//! - [`probe`]: runs `phigate-probe` (connect tricks) inside a cgroup
//! - [`clinical`]: a seeded synthetic clinical dataset with checksum-valid identifiers

pub mod agent;
pub mod cgroup;
pub mod clinical;
pub mod env;
pub mod pg;
pub mod pki;
pub mod probe;

pub use agent::{Agent, AgentConfig};
pub use cgroup::TestCgroup;
pub use pg::PgServer;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// A name unique to this process and call, for cgroups, pin directories, temp files.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// `path` with `suffix` appended to its last component (`log` → `log.keys`).
pub fn unique_sibling(path: &std::path::Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// Poll `f` until it returns `Some`, at most `timeout`; bounded in time and count.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    for _ in 0..100_000 {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

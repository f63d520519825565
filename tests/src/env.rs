//! Whether this machine can run the real-kernel tests. On a machine without root,
//! cgroup v2 or bpffs the tests skip with a message; with `PHIGATE_E2E_REQUIRED=1`
//! (set by `cargo xtask test`, hence by CI) a missing capability fails instead, so CI
//! can never pass by skipping.

use std::path::PathBuf;

/// Returns `Some(reason)` when the real-kernel tests cannot run here.
pub fn missing_capability() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (loading eBPF programs and creating cgroups need it)".into());
    }
    if cgroup2_mount().is_none() {
        return Some("no cgroup v2 hierarchy is mounted".into());
    }
    if !std::path::Path::new("/sys/fs/bpf").exists() {
        return Some("/sys/fs/bpf does not exist (no bpffs support)".into());
    }
    None
}

/// Call at the top of every real-kernel test: `if skip("name") { return; }`.
pub fn skip(test: &str) -> bool {
    let Some(reason) = missing_capability() else {
        return false;
    };
    if std::env::var_os("PHIGATE_E2E_REQUIRED").is_some_and(|v| v == "1") {
        panic!("{test}: cannot run: {reason}; PHIGATE_E2E_REQUIRED=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: {reason}. Run as root on Linux >= 5.15 with cgroup v2 (cargo xtask test).");
    true
}

/// The cgroup2 mount point from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap_or("")))
    })
}

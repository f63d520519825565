//! `cargo xtask setup`: make a fresh Debian/Ubuntu machine able to build and test
//! phigate. Idempotent: every step checks first and says whether it acted.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Debian packages and why each is needed.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("clang", "pg_query's bindgen"),
    ("libclang-dev", "pg_query's bindgen"),
    ("bpftool", "tests inspect attached programs"),
    ("postgresql", "the real server for tests, demo and benchmarks"),
    ("postgresql-client", "psql, pgbench"),
    ("pgbouncer", "benchmark peer"),
    ("iproute2", "network namespaces in tests"),
    ("ca-certificates", "fetching crates"),
];

/// The bpf-linker release known to work with this toolchain (see shared/TOOLCHAIN.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

struct Report {
    lines: Vec<(String, &'static str)>,
}

impl Report {
    fn add(&mut self, what: impl Into<String>, state: &'static str) {
        let what = what.into();
        eprintln!("setup: {what:<40} {state}");
        self.lines.push((what, state));
    }
}

pub fn run() -> Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("phigate needs Linux (eBPF, cgroup v2)");
    }
    let mut report = Report { lines: Vec::new() };
    apt(&mut report)?;
    nightly(&mut report)?;
    bpf_linker(&mut report)?;
    postgres(&mut report)?;
    kernel(&mut report)?;
    let acted = report.lines.iter().filter(|(_, s)| *s == "installed").count();
    eprintln!("setup: done ({acted} installed, {} already present)", report.lines.len() - acted);
    Ok(())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt(report: &mut Report) -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().map(|(p, _)| *p).filter(|p| !dpkg_installed(p)).collect();
    for (p, why) in APT_PACKAGES {
        if !missing.contains(p) {
            report.add(format!("apt {p} ({why})"), "already present");
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if Command::new("apt-get").arg("--version").stdout(Stdio::null()).status().is_err() {
        bail!("missing packages {missing:?} and no apt-get here: install them with your package manager");
    }
    if !is_root() {
        bail!("missing packages {missing:?}: run `cargo xtask setup` as root (or `sudo apt-get install {}`)", missing.join(" "));
    }
    eprintln!("setup: apt-get install {}", missing.join(" "));
    crate::run(Command::new("apt-get").args(["update", "-qq"]).env("DEBIAN_FRONTEND", "noninteractive")).context("apt-get update failed")?;
    crate::run(Command::new("apt-get").args(["install", "-y", "-qq", "--no-install-recommends"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("apt-get install {} failed", missing.join(" ")))?;
    for p in &missing {
        if !dpkg_installed(p) {
            bail!("package {p} is still not installed after apt-get install");
        }
        report.add(format!("apt {p}"), "installed");
    }
    Ok(())
}

fn nightly(report: &mut Report) -> Result<()> {
    let toolchains = Command::new("rustup").args(["toolchain", "list"]).output().context("rustup is needed to build the eBPF programs (https://rustup.rs)")?;
    if !String::from_utf8_lossy(&toolchains.stdout).lines().any(|l| l.starts_with("nightly")) {
        crate::run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
            .context("installing the nightly toolchain failed")?;
        report.add("rust nightly toolchain", "installed");
    } else {
        report.add("rust nightly toolchain", "already present");
    }
    let comps = Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]).output()?;
    if String::from_utf8_lossy(&comps.stdout).lines().any(|l| l.starts_with("rust-src")) {
        report.add("nightly rust-src", "already present");
    } else {
        crate::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"])).context("rustup component add rust-src failed")?;
        report.add("nightly rust-src", "installed");
    }
    Ok(())
}

/// bpf-linker is linked against the LLVM library inside the nightly toolchain, which
/// is found through the library path rustup sets for that toolchain — so it is checked
/// the way cargo +nightly will run it.
fn bpf_linker_works() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "bpf-linker", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The LLVM major version of the nightly rustc (bpf-linker's must be >= it).
fn nightly_llvm_major() -> Result<String> {
    let out = Command::new("rustc").args(["+nightly", "-vV"]).output().context("rustc +nightly -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.lines().find_map(|l| l.strip_prefix("LLVM version: ")).context("rustc +nightly -vV printed no LLVM version")?;
    Ok(v.split('.').next().unwrap_or(v).to_string())
}

fn bpf_linker(report: &mut Report) -> Result<()> {
    if bpf_linker_works() {
        report.add("bpf-linker", "already present");
        return Ok(());
    }
    // Build bpf-linker against the LLVM shared library that ships inside the nightly
    // toolchain, so no system LLVM of the right version is needed.
    let sysroot = Command::new("rustc").args(["+nightly", "--print", "sysroot"]).output()?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    let libdir = std::path::Path::new(&sysroot).join("lib");
    let lib = std::fs::read_dir(&libdir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so")))
        .with_context(|| format!("no libLLVM.so in {}; the nightly toolchain lacks its LLVM library", libdir.display()))?;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let prefix = std::path::PathBuf::from(home).join(".local/rustc-llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)?;
    let major = nightly_llvm_major()?;
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} (about a minute)");
    crate::run(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features", "--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix),
    )
    .context("building bpf-linker failed")?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but `rustup run nightly bpf-linker --version` fails; is ~/.cargo/bin on PATH?");
    }
    report.add("bpf-linker", "installed");
    Ok(())
}

fn postgres(report: &mut Report) -> Result<()> {
    let bin = phigate_tests::pg::pg_bin("initdb");
    if !bin.exists() {
        bail!("PostgreSQL server binaries are missing ({}); install the `postgresql` package", bin.display());
    }
    report.add(format!("postgresql server ({})", phigate_tests::pg::pg_bin_dir().display()), "already present");
    Ok(())
}

fn kernel(report: &mut Report) -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (5, 15) {
        bail!("kernel {} is too old: phigate needs Linux >= 5.15", release.trim());
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("the kernel has no BTF (/sys/kernel/btf/vmlinux); phigate needs CONFIG_DEBUG_INFO_BTF=y");
    }
    if phigate_tests::env::cgroup2_mount().is_none() {
        bail!("no cgroup v2 hierarchy is mounted; mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`)");
    }
    report.add(format!("kernel {} with BTF and cgroup v2", release.trim()), "already present");
    Ok(())
}

/// What build-ebpf needs, with the command that fixes it.
pub fn require_ebpf_toolchain() -> Result<()> {
    let comps = Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]).output();
    let has_src = comps.map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("rust-src"))).unwrap_or(false);
    if !has_src {
        bail!("the nightly toolchain with rust-src is missing: run `cargo xtask setup`");
    }
    if !bpf_linker_works() {
        bail!("bpf-linker is missing: run `cargo xtask setup`");
    }
    Ok(())
}

//! Runs `phigate-probe` (a connect-trick client) inside a cgroup and parses its JSON
//! report; plus a raw-socket observer that sees which TCP packets actually reach the
//! loopback interface.

use std::{
    io::{BufRead, BufReader, Write},
    mem,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{cgroup::run_in, target_dir};

pub fn probe_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PHIGATE_PROBE_BIN") {
        return PathBuf::from(p);
    }
    // Integration tests of this package get the path from cargo.
    if let Some(p) = option_env!("CARGO_BIN_EXE_phigate-probe") {
        return PathBuf::from(p);
    }
    target_dir().join("debug/phigate-probe")
}

/// Run a probe mode to completion inside `cgroup` (None: the test's own cgroup).
pub fn probe(cgroup: Option<&Path>, args: &[&str]) -> Value {
    let mut cmd = Command::new(probe_bin());
    cmd.args(args).stdin(Stdio::null());
    if let Some(dir) = cgroup {
        run_in(&mut cmd, dir);
    }
    let out = cmd.output().expect("phigate-probe runs");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("probe printed no JSON ({e}): {text} {}", String::from_utf8_lossy(&out.stderr)))
}

/// Run a probe through `sh -c`, so the probe is a child process of the cgroup member.
pub fn probe_as_child(cgroup: &Path, args: &[&str]) -> Value {
    let line = std::iter::once(probe_bin().display().to_string()).chain(args.iter().map(|a| a.to_string())).collect::<Vec<_>>().join(" ");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("{line}; true")).stdin(Stdio::null());
    run_in(&mut cmd, cgroup);
    let out = cmd.output().expect("sh runs");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("probe printed no JSON ({e}): {text}"))
}

/// A probe in `hold` mode: connected, waiting for `release()`.
pub struct HeldProbe {
    child: Child,
    pub connected: Value,
}

impl HeldProbe {
    pub fn start(cgroup: &Path, addr: &str) -> Self {
        let mut cmd = Command::new(probe_bin());
        cmd.args(["hold", addr]).stdin(Stdio::piped()).stdout(Stdio::piped());
        run_in(&mut cmd, cgroup);
        let mut child = cmd.spawn().expect("phigate-probe runs");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line).expect("probe reports its connect");
        let connected = serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad probe line {line:?}: {e}"));
        Self { child, connected }
    }

    /// Let it send its StartupMessage; returns its final report.
    pub fn release(mut self) -> Value {
        self.child.stdin.as_mut().expect("piped").write_all(b"go\n").expect("probe stdin");
        let out = self.child.wait_with_output().expect("probe finishes");
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("probe printed no JSON ({e}): {text}"))
    }
}

/// Sees TCP packets delivered on this host (a raw IPPROTO_TCP socket gets a copy of
/// each), to prove whether a packet reached the loopback interface at all.
pub struct TcpObserver {
    fd: OwnedFd,
}

impl TcpObserver {
    pub fn new() -> Self {
        // SAFETY: plain socket syscall; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: valid fd and option buffer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                mem::size_of::<libc::timeval>() as u32,
            )
        };
        Self { fd }
    }

    /// Whether a SYN from source port `sport` to `dst` is seen within `wait`.
    pub fn saw_syn(&self, sport: u16, dst: SocketAddrV4, wait: Duration) -> bool {
        let start = Instant::now();
        let mut buf = [0u8; 2048];
        while start.elapsed() < wait {
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 40 {
                continue;
            }
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            if n as usize <= ihl + 14 {
                continue;
            }
            let daddr = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
            let tcp = &buf[ihl..];
            let s = u16::from_be_bytes([tcp[0], tcp[1]]);
            let d = u16::from_be_bytes([tcp[2], tcp[3]]);
            if s == sport && d == dst.port() && daddr == *dst.ip() && tcp[13] & 0x02 != 0 {
                return true;
            }
        }
        false
    }
}

impl Default for TcpObserver {
    fn default() -> Self {
        Self::new()
    }
}

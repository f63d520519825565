//! Types shared by the kernel programs (`phigate-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]`, fixed-size and free of pointers, because the same
//! bytes are written by eBPF code and read through map syscalls by the agent. Padding is
//! spelled out as explicit `_pad` fields so that both sides agree byte for byte and no
//! uninitialised padding ever reaches a map (the verifier rejects reads of it).
//!
//! This crate must not depend on `std` or on anything the kernel side cannot use. The
//! `user` feature only adds `aya::Pod` impls for the agent.
//!
//! # Layout
//! - map names and sizes (`maps`), pinned under the agent's bpffs directory
//! - [`ProtectedCgroup`]: value of the protected-cgroup map, keyed by cgroup id
//! - [`Db4Key`] / [`Db6Key`] / [`DbTarget`]: protected database prefixes and where a
//!   connection to them is redirected
//! - [`ConnectRecord`] / [`OrigDstKey`]: what the kernel remembers about a redirected
//!   connection, and the key the interceptor uses to find it at accept
//! - [`Event`]: kernel → agent reports (bypass attempts, refused connects)
//! - [`counter`]: stable indices of the per-CPU counters
#![no_std]

/// Version of the map layout. Pinned maps from another layout are never reused: the
/// agent refuses to start and says to run `phigate detach` first.
pub const ABI_VERSION: u32 = 2;

/// Deepest cgroup level the kernel programs inspect when they walk a socket's cgroup
/// ancestry. A bounded loop is what the verifier accepts; Kubernetes pods sit at level
/// 4–6, so 16 leaves room. The agent refuses to protect a cgroup deeper than this.
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// `AF_INET` / `AF_INET6` as the kernel reports them.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// Names of the maps in the kernel object. Short because the kernel truncates object
/// names to 15 bytes; the agent pins each under `<pin_dir>/maps/<name>`.
pub mod maps {
    pub const PROTECTED_CGROUPS: &str = "PG_CGROUPS";
    pub const DB4: &str = "PG_DB4";
    pub const DB6: &str = "PG_DB6";
    pub const ORIG_DST: &str = "PG_ORIGDST";
    pub const SOCK_RECORD: &str = "PG_SKREC";
    pub const SETTINGS: &str = "PG_SETTINGS";
    pub const COUNTERS: &str = "PG_COUNTERS";
    pub const EVENTS: &str = "PG_EVENTS";
    pub const LISTENERS: &str = "PG_LISTENERS";

    pub const ALL: [&str; 9] = [PROTECTED_CGROUPS, DB4, DB6, ORIG_DST, SOCK_RECORD, SETTINGS, COUNTERS, EVENTS, LISTENERS];

    pub const PROTECTED_CGROUPS_MAX: u32 = 4096;
    pub const DB_PREFIXES_MAX: u32 = 1024;
    /// Records of redirected connections not yet picked up by the interceptor. LRU so
    /// that connections the agent never accepts (client reset first, agent down) age out.
    pub const ORIG_DST_MAX: u32 = 65536;
    pub const EVENTS_BYTES: u32 = 256 * 1024;
    /// The agent's listening sockets: one per database and address family, at
    /// [`super::listener_slot`].
    pub const LISTENERS_MAX: u32 = 2 * DB_PREFIXES_MAX;
}

/// Where a database's listener of one family sits in the `PG_LISTENERS` socket map.
pub const fn listener_slot(db_index: u32, ipv6: bool) -> u32 {
    db_index * 2 + ipv6 as u32
}

/// Names of the kernel programs (their function names in `phigate-ebpf`).
pub mod programs {
    pub const CONNECT4: &str = "phigate_connect4";
    pub const CONNECT6: &str = "phigate_connect6";
    pub const GETPEERNAME4: &str = "phigate_getpeername4";
    pub const GETPEERNAME6: &str = "phigate_getpeername6";
    pub const SOCK_OPS: &str = "phigate_sock_ops";
    pub const EGRESS: &str = "phigate_egress";
    pub const SOCK_CREATE: &str = "phigate_sock_create";

    pub const ALL: [&str; 7] = [CONNECT4, CONNECT6, GETPEERNAME4, GETPEERNAME6, SOCK_OPS, EGRESS, SOCK_CREATE];
}

/// Length of the identity name stored with a protected cgroup.
pub const IDENTITY_LEN: usize = 64;
/// Length of the cgroup path (relative to the cgroup2 mount) stored for display.
pub const CGROUP_PATH_LEN: usize = 192;
/// Length of a database name stored with its target.
pub const DB_NAME_LEN: usize = 32;
/// `TASK_COMM_LEN` in the kernel.
pub const COMM_LEN: usize = 16;

/// How a protected cgroup entered the map.
pub mod source {
    /// Written from the configuration file at agent start; removed when the
    /// configuration no longer names it.
    pub const CONFIG: u32 = 1;
    /// Written by `phigate protect`; survives restarts until `phigate unprotect`.
    pub const RUNTIME: u32 = 2;
}

/// Value of `PG_CGROUPS`, keyed by cgroup id (the cgroup2 directory's inode number).
/// The kernel only tests presence; the rest is for the agent and `phigate status`, so
/// that runtime protection lives in one place that survives agent restarts.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProtectedCgroup {
    /// NUL-padded UTF-8 identity name.
    pub identity: [u8; IDENTITY_LEN],
    /// NUL-padded path relative to the cgroup2 mount.
    pub path: [u8; CGROUP_PATH_LEN],
    /// One of [`source`].
    pub source: u32,
    pub _pad: u32,
}

/// LPM key data for IPv4 databases: the port first, then the address, both in network
/// byte order, so that one longest-prefix lookup matches "this port and this prefix".
/// The trie key's prefix length is `16 + address prefix length`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Db4Key {
    pub port: [u8; 2],
    pub addr: [u8; 4],
}

/// LPM key data for IPv6 databases; see [`Db4Key`].
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Db6Key {
    pub port: [u8; 2],
    pub addr: [u8; 16],
}

/// Flags of [`DbTarget`].
pub mod target {
    /// `listen4_*` holds an IPv4 interceptor listener.
    pub const HAS_V4: u32 = 1;
    /// `listen6_*` holds an IPv6 interceptor listener.
    pub const HAS_V6: u32 = 2;
}

/// Where connections to a protected database prefix are carried: the interceptor's
/// listener for that database.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DbTarget {
    /// Index of the database in the agent's configuration.
    pub db_index: u32,
    /// [`target`] flags.
    pub flags: u32,
    /// IPv4 listener address, network byte order (as in `sockaddr_in`).
    pub listen4_addr: [u8; 4],
    /// IPv6 listener address.
    pub listen6_addr: [u8; 16],
    /// Listener ports, host byte order.
    pub listen4_port: u16,
    pub listen6_port: u16,
    /// NUL-padded database name, for `phigate status`.
    pub name: [u8; DB_NAME_LEN],
}

/// Key of `PG_ORIGDST`: the client end of a redirected connection as the interceptor
/// sees it at accept. The netns cookie keeps equal tuples in different network
/// namespaces apart.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct OrigDstKey {
    pub netns_cookie: u64,
    /// Client address; IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
    pub addr: [u8; 16],
    /// Client port, host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// What connect4/6 learned about a redirected connection: the destination the workload
/// asked for and who asked. Stored in socket-local storage at connect (so getpeername
/// can answer with it) and copied into `PG_ORIGDST` once the client port is known.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnectRecord {
    /// Original destination; IPv4 as IPv4-mapped IPv6.
    pub orig_addr: [u8; 16],
    /// Original destination port, host byte order.
    pub orig_port: u16,
    /// `AF_INET` / `AF_INET6` of the workload's socket (a dual-stack IPv6 socket that
    /// connected to an IPv4-mapped address reports `AF_INET6`).
    pub family: u16,
    /// Thread-group id (the process id userspace sees).
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The calling task's own cgroup.
    pub cgroup_id: u64,
    /// The protected cgroup that matched: the caller's cgroup or one of its ancestors.
    pub protected_cgroup_id: u64,
    pub netns_cookie: u64,
    pub socket_cookie: u64,
    /// `bpf_ktime_get_ns()` at connect.
    pub connect_ns: u64,
    pub db_index: u32,
    pub _pad: u32,
    pub comm: [u8; COMM_LEN],
}

/// Value of the single-entry `PG_SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Settings {
    /// Process id of the agent that last started (0 after a clean stop). Read by
    /// `phigate status`; the kernel programs do not use it.
    pub agent_tgid: u32,
    /// [`setting`] flags.
    pub flags: u32,
    /// [`ABI_VERSION`] of whoever wrote the maps.
    pub abi_version: u32,
    pub _pad: u32,
    /// The network namespace (cookie) the agent listens in. Redirects go to a loopback
    /// address, which reaches the agent only from its own namespace: a protected
    /// connect from any other is refused rather than carried to whoever listens on
    /// that address there. 0 until an agent has started: every protected connect is
    /// refused.
    pub agent_netns_cookie: u64,
}

/// Flags of [`Settings`].
pub mod setting {
    /// Refuse `socket(AF_INET{,6}, SOCK_RAW, …)` in protected cgroups.
    pub const DENY_RAW_SOCKETS: u32 = 1;
}

/// Stable indices into `PG_COUNTERS` (per-CPU u64). Never renumber: dashboards and
/// older agents read them by index.
pub mod counter {
    /// connect4/6 rewrote a destination to an interceptor listener.
    pub const REDIRECTED: u32 = 0;
    /// connect4/6 refused a protected connection it could not redirect (EPERM).
    pub const REFUSED: u32 = 1;
    /// The egress guard dropped a packet to a protected database.
    pub const BYPASS_DROPPED: u32 = 2;
    /// sock_create refused a raw socket in a protected cgroup.
    pub const RAW_SOCKET_DENIED: u32 = 3;
    /// sock_ops published a connection record for the interceptor.
    pub const RECORD_PUBLISHED: u32 = 4;
    /// sock_ops found no socket storage for a redirected connection (should be 0).
    pub const RECORD_LOST: u32 = 5;
    pub const COUNT: u32 = 8;
}

/// Kinds of [`Event`]. Stable codes.
pub mod event {
    /// A packet to a protected database left a protected cgroup without the redirect.
    pub const BYPASS_DROPPED: u32 = 1;
    /// A protected connect could not be redirected and was refused.
    pub const CONNECT_REFUSED: u32 = 2;
    /// A raw socket was refused in a protected cgroup.
    pub const RAW_SOCKET_DENIED: u32 = 3;
}

/// Why a connect was refused ([`Event::reason`]). Stable codes.
pub mod reason {
    pub const NONE: u32 = 0;
    /// Not a TCP stream socket (UDP, SCTP, MPTCP …) aimed at a protected database.
    pub const NOT_TCP: u32 = 1;
    /// No interceptor listener of the needed address family is configured.
    pub const NO_LISTENER_FAMILY: u32 = 2;
    /// Socket storage for the connection record could not be allocated.
    pub const NO_STORAGE: u32 = 3;
    /// The packet did not carry the redirect (raw socket, socket connected before
    /// protection, or any other path around connect4/6).
    pub const NOT_REDIRECTED: u32 = 4;
    /// The connect was made in another network namespace than the agent's, where the
    /// interceptor's loopback address does not reach it.
    pub const OTHER_NETNS: u32 = 5;
    /// No agent listens for the database (stopped, crashed, not started yet): the
    /// redirect target is a free address any process could listen on.
    pub const NO_AGENT: u32 = 6;
}

/// A report from the kernel programs through the `PG_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Event {
    /// One of [`event`].
    pub kind: u32,
    /// One of [`reason`].
    pub reason: u32,
    /// The offending socket's cgroup (for egress: the cgroup it was created in).
    pub cgroup_id: u64,
    /// The protected cgroup that matched.
    pub protected_cgroup_id: u64,
    /// Current task when known (0 in the egress guard, which can run from timers).
    pub pid: u32,
    pub uid: u32,
    /// Destination; IPv4 as IPv4-mapped IPv6.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// IP protocol number (6 = TCP).
    pub protocol: u8,
    pub _pad: [u8; 5],
    pub ktime_ns: u64,
    pub comm: [u8; COMM_LEN],
}

#[cfg(feature = "user")]
mod pod {
    //! The agent reads and writes these types through map syscalls.
    use super::*;
    // SAFETY: all types are `repr(C)`, `Copy`, contain only integers and byte arrays,
    // and have explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for ProtectedCgroup {}
    unsafe impl aya::Pod for Db4Key {}
    unsafe impl aya::Pod for Db6Key {}
    unsafe impl aya::Pod for DbTarget {}
    unsafe impl aya::Pod for OrigDstKey {}
    unsafe impl aya::Pod for ConnectRecord {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Event {}
}

/// Compile-time layout checks: a size change here is an ABI change.
const _: () = {
    assert!(core::mem::size_of::<ProtectedCgroup>() == 264);
    assert!(core::mem::size_of::<Db4Key>() == 6);
    assert!(core::mem::size_of::<Db6Key>() == 18);
    assert!(core::mem::size_of::<DbTarget>() == 64);
    assert!(core::mem::size_of::<OrigDstKey>() == 32);
    assert!(core::mem::size_of::<ConnectRecord>() == 96);
    assert!(core::mem::size_of::<Settings>() == 24);
    assert!(core::mem::size_of::<Event>() == 80);
};

//! phigate kernel programs: carry protected workloads' database connections to the
//! interceptor, and drop whatever tries to go around it.
//!
//! All programs are attached once, to the agent's attach cgroup (the cgroup2 root in
//! production, a test-owned cgroup in tests), and decide per socket from maps the agent
//! fills. Protecting a cgroup is therefore a map update, effective for the next socket
//! operation, with no attach/detach churn.
//!
//! | program | hook | job |
//! |---|---|---|
//! | `phigate_connect4/6` | `cgroup/connect4/6` | rewrite a protected connect to the interceptor, remember the original destination and the caller |
//! | `phigate_sock_ops` | `sockops`, `TCP_CONNECT_CB` | publish that record under the client's (netns, ip, port), which the interceptor sees at accept |
//! | `phigate_getpeername4/6` | `cgroup/getpeername4/6` | show the workload the address it asked for |
//! | `phigate_egress` | `cgroup_skb/egress` | drop packets to a protected database that did not take the redirect |
//! | `phigate_sock_create` | `cgroup/sock_create` | refuse raw sockets in protected cgroups |
//!
//! The agent's own upstream connections are not redirected because the agent never
//! runs inside a protected cgroup (it refuses to start there, and `phigate protect`
//! refuses to cover it). An exemption by process id was rejected: after an agent crash
//! a workload could be given the same pid.
//!
//! Nothing here may block, allocate beyond map entries, or trust a value from userspace
//! memory: every input is the kernel's own view of the socket or the calling task.
//!
//! # Minimum kernel version
//! 5.15 (getpeername hooks 5.8, socket storage from sock_addr 5.10, netns cookie from
//! sock_addr 5.7, bounded loops 5.3); verified on 6.18.
#![no_std]
#![no_main]

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr, BPF_SOCK_OPS_TCP_CONNECT_CB},
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_get_socket_uid, bpf_ktime_get_ns,
        bpf_map_lookup_elem, bpf_sk_release, bpf_sk_storage_get, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid},
    macros::{btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockMap},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use phigate_common::{
    counter, event, listener_slot, maps as m, reason, setting, target, ConnectRecord, Db4Key, Db6Key, DbTarget, Event, OrigDstKey, ProtectedCgroup, Settings,
    AF_INET, AF_INET6, COMM_LEN, MAX_CGROUP_DEPTH,
};

// cgroup_sock_addr / cgroup_skb / sock_create return codes: 1 lets the operation
// proceed, 0 refuses it (connect() then fails with EPERM, a packet is dropped).
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

const SOCK_STREAM: u32 = 1;
const SOCK_RAW: u32 = 3;
const IPPROTO_TCP: u32 = 6;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

// ---- maps -----------------------------------------------------------------------
// Every map except the socket storage is pinned by the agent under its bpffs
// directory, so a restarted agent and `phigate protect` operate on the live state.

/// Protected cgroups by cgroup id. Presence is protection; the value is metadata.
#[map(name = "PG_CGROUPS")]
static PG_CGROUPS: HashMap<u64, ProtectedCgroup> = HashMap::with_max_entries(m::PROTECTED_CGROUPS_MAX, 0);

/// Protected IPv4 databases: longest-prefix match on (port, address).
#[map(name = "PG_DB4")]
static PG_DB4: LpmTrie<Db4Key, DbTarget> = LpmTrie::with_max_entries(m::DB_PREFIXES_MAX, 0);

/// Protected IPv6 databases.
#[map(name = "PG_DB6")]
static PG_DB6: LpmTrie<Db6Key, DbTarget> = LpmTrie::with_max_entries(m::DB_PREFIXES_MAX, 0);

/// Connection records waiting for the interceptor, keyed by the client's tuple. LRU:
/// a client that resets before accept leaves its record to age out instead of filling
/// the map (the interceptor deletes what it reads).
#[map(name = "PG_ORIGDST")]
static PG_ORIGDST: LruHashMap<OrigDstKey, ConnectRecord> = LruHashMap::with_max_entries(m::ORIG_DST_MAX, 0);

/// Agent settings (one entry).
#[map(name = "PG_SETTINGS")]
static PG_SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Per-CPU counters: plain shared counters lose increments under parallel load.
#[map(name = "PG_COUNTERS")]
static PG_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Reports to the agent (bypass attempts, refused connects).
#[map(name = "PG_EVENTS")]
static PG_EVENTS: RingBuf = RingBuf::with_byte_size(m::EVENTS_BYTES, 0);

/// The agent's listening socket per database and family ([`listener_slot`]). The
/// kernel takes a socket out of the map when it closes — when the agent stops or
/// dies — so connect4/6 know whether an agent listens: with none, a protected connect
/// is refused at once (EPERM) instead of going to the now free address, where any
/// process could listen and be handed the workload's connection and password.
#[map(name = "PG_LISTENERS")]
static PG_LISTENERS: SockMap = SockMap::with_max_entries(m::LISTENERS_MAX, 0);

/// The connection record lives with the socket: it is freed with the socket (no leak
/// for connects that never complete), getpeername finds it without any key, and a
/// socket that was never redirected has none — which is how getpeername and sock_ops
/// tell redirected sockets apart.
#[btf_map(name = "PG_SKREC")]
static PG_SKREC: SkStorage<ConnectRecord> = SkStorage::new();

// ---- small helpers ----------------------------------------------------------------

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = PG_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn settings() -> Settings {
    match PG_SETTINGS.get(0) {
        Some(s) => *s,
        None => Settings::default(),
    }
}

#[inline(always)]
fn is_protected(id: u64) -> bool {
    // SAFETY: presence test only; the value is not read.
    id != 0 && unsafe { PG_CGROUPS.get(id) }.is_some()
}

/// The protected cgroup governing the calling task: its own cgroup or the nearest
/// protected ancestor (a pod protected under a protected slice is the pod's identity,
/// and its containers' processes sit in child cgroups of the pod). Used where a task
/// context exists (connect, socket creation). Ancestors are numbered from the root
/// (level 0) down, so the walk goes on past a match and keeps the deepest. The loop
/// is bounded by MAX_CGROUP_DEPTH because the verifier must see it end; the agent
/// refuses to protect anything deeper.
#[inline(always)]
fn task_protected_cgroup() -> Option<u64> {
    // SAFETY: helpers without pointer arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    if is_protected(own) {
        return Some(own);
    }
    // An id, not an Option: LLVM turned "matched in some iteration" into an OR of
    // the map lookups' pointers, which the verifier rejects (bitwise operation on a
    // pointer); keeping the matched id itself leaves it a plain choice between ids.
    let mut nearest: u64 = 0;
    let mut level = 0;
    while level <= MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            // Past the task's own level: no more ancestors.
            break;
        }
        if is_protected(id) {
            nearest = id;
        }
        level += 1;
    }
    if nearest == 0 {
        None
    } else {
        Some(nearest)
    }
}

/// Like [`task_protected_cgroup`] but for the cgroup a packet's socket was created in.
/// The egress guard cannot use the current task: retransmits run from timers in
/// whatever task happens to be on the CPU.
#[inline(always)]
fn skb_protected_cgroup(skb: *mut aya_ebpf::bindings::__sk_buff) -> Option<(u64, u64)> {
    // SAFETY: skb is the program's context pointer.
    let own = unsafe { bpf_skb_cgroup_id(skb) };
    if is_protected(own) {
        return Some((own, own));
    }
    // As in task_protected_cgroup: the deepest protected ancestor, kept as an id.
    let mut nearest: u64 = 0;
    let mut level = 0;
    while level <= MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_skb_ancestor_cgroup_id(skb, level as i32) };
        if id == 0 {
            break;
        }
        if is_protected(id) {
            nearest = id;
        }
        level += 1;
    }
    if nearest == 0 {
        None
    } else {
        Some((own, nearest))
    }
}

#[inline(always)]
fn mapped_v4(addr_be: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr_be[0], addr_be[1], addr_be[2], addr_be[3]]
}

#[inline(always)]
fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[inline(always)]
fn is_v4_mapped(words: &[u32; 4]) -> bool {
    // ::ffff:a.b.c.d — word 2 is 0x0000ffff in network byte order.
    words[0] == 0 && words[1] == 0 && words[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

fn report(kind: u32, why: u32, cgroup_id: u64, protected: u64, addr: [u8; 16], port: u16) {
    if let Some(mut entry) = PG_EVENTS.reserve::<Event>(0) {
        let uid_gid = bpf_get_current_uid_gid();
        let ev = Event {
            kind,
            reason: why,
            cgroup_id,
            protected_cgroup_id: protected,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            uid: uid_gid as u32,
            addr,
            port,
            protocol: IPPROTO_TCP as u8,
            _pad: [0; 5],
            // SAFETY: helper without arguments.
            ktime_ns: unsafe { bpf_ktime_get_ns() },
            comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        };
        entry.write(ev);
        entry.submit(0);
    }
    // A full ring buffer loses the report, never the decision; the counters still move.
}

/// Refuse a protected connect that cannot be redirected. connect() returns EPERM
/// immediately; dropping in the egress guard instead would leave it hanging until
/// the TCP timeout.
fn refuse_connect(why: u32, protected: u64, addr: [u8; 16], port: u16) -> i32 {
    count(counter::REFUSED);
    // SAFETY: helper without arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    report(event::CONNECT_REFUSED, why, own, protected, addr, port);
    REFUSE
}

/// Whether an agent listens for the database on the family the redirect goes to.
#[inline(always)]
fn agent_listening(db_index: u32, ipv6: bool) -> bool {
    let slot = listener_slot(db_index, ipv6);
    // SAFETY: a lookup in a socket map returns a referenced socket or null; the
    // reference is released at once (the verifier insists), only its presence counts.
    unsafe {
        let sk = bpf_map_lookup_elem(ptr::addr_of!(PG_LISTENERS) as *mut c_void, ptr::addr_of!(slot) as *const c_void);
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk as *mut _);
    }
    true
}

/// Whether the connect is made in the agent's network namespace. The redirect target
/// is a loopback address: from another namespace (a pod's) it reaches whatever listens
/// there, never the agent, so such a connect is refused instead.
#[inline(always)]
fn in_agent_netns(ctx: &SockAddrContext) -> bool {
    // SAFETY: the helper takes the program's context pointer.
    let own = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) };
    let agent = settings().agent_netns_cookie;
    agent != 0 && own == agent
}

/// What must hold before a protected connect is redirected to the agent's listener
/// (of the IPv6 family when `ipv6_listener`), and its record filled; else the reason
/// to refuse it.
#[inline(always)]
fn hand_over(ctx: &SockAddrContext, orig_addr: [u8; 16], orig_port: u16, family: u32, protected: u64, db_index: u32, ipv6_listener: bool) -> Result<(), u32> {
    if !agent_listening(db_index, ipv6_listener) {
        return Err(reason::NO_AGENT);
    }
    if !in_agent_netns(ctx) {
        return Err(reason::OTHER_NETNS);
    }
    if !remember(ctx, orig_addr, orig_port, family, protected, db_index) {
        return Err(reason::NO_STORAGE);
    }
    Ok(())
}

/// Fill the socket's connection record. Returns false if storage could not be had.
fn remember(ctx: &SockAddrContext, orig_addr: [u8; 16], orig_port: u16, family: u32, protected: u64, db_index: u32) -> bool {
    // SAFETY: get_or_insert dereferences the context's socket, which the kernel
    // guarantees for connect hooks; a null result is handled.
    let rec = unsafe { PG_SKREC.get_or_insert_ptr_mut(ctx, None) };
    if rec.is_null() {
        return false;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let record = ConnectRecord {
        orig_addr,
        orig_port,
        family: family as u16,
        pid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: helpers; the context pointer is valid for this program type.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        protected_cgroup_id: protected,
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) },
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) },
        connect_ns: unsafe { bpf_ktime_get_ns() },
        db_index,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    // SAFETY: non-null pointer into this socket's storage.
    unsafe { ptr::write(rec, record) };
    true
}

// ---- connect --------------------------------------------------------------------

/// IPv4 connect(), including TCP Fast Open's sendmsg(MSG_FASTOPEN) and io_uring's
/// connect, which enter the same kernel path.
#[cgroup_sock_addr(connect4)]
pub fn phigate_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx)
}

fn try_connect4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context is valid for the program's run.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    // user_ip4 / user_port hold network byte order; reading them as native integers
    // and taking the native bytes yields the wire bytes. 32-bit reads are what the
    // verifier allows for these fields.
    let ip = sa.user_ip4.to_ne_bytes();
    let port_be = (sa.user_port as u16).to_ne_bytes();
    // Cheapest test first: most connects are not to a protected database.
    let key = Key::new(16 + 32, Db4Key { port: port_be, addr: ip });
    let Some(db) = PG_DB4.get(&key) else {
        return ALLOW;
    };
    let Some(protected) = task_protected_cgroup() else {
        return ALLOW;
    };
    let port = u16::from_be_bytes(port_be);
    let orig = mapped_v4(ip);
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return refuse_connect(reason::NOT_TCP, protected, orig, port);
    }
    if db.flags & target::HAS_V4 == 0 {
        return refuse_connect(reason::NO_LISTENER_FAMILY, protected, orig, port);
    }
    if let Err(why) = hand_over(ctx, orig, port, AF_INET, protected, db.db_index, false) {
        return refuse_connect(why, protected, orig, port);
    }
    sa.user_ip4 = u32::from_ne_bytes(db.listen4_addr);
    sa.user_port = u32::from(db.listen4_port.to_be());
    count(counter::REDIRECTED);
    ALLOW
}

/// IPv6 connect(). A dual-stack socket connecting to `::ffff:a.b.c.d` is an IPv4
/// connection in disguise and is judged against the IPv4 databases.
#[cgroup_sock_addr(connect6)]
pub fn phigate_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx)
}

fn try_connect6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context is valid for the program's run.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    // Word-sized reads: the verifier rejects 64-bit loads at offset 12 of user_ip6.
    let words = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let port_be = (sa.user_port as u16).to_ne_bytes();
    let port = u16::from_be_bytes(port_be);

    if is_v4_mapped(&words) {
        let ip = sa.user_ip6[3].to_ne_bytes();
        let key = Key::new(16 + 32, Db4Key { port: port_be, addr: ip });
        let Some(db) = PG_DB4.get(&key) else {
            return ALLOW;
        };
        let Some(protected) = task_protected_cgroup() else {
            return ALLOW;
        };
        let orig = mapped_v4(ip);
        if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
            return refuse_connect(reason::NOT_TCP, protected, orig, port);
        }
        if db.flags & target::HAS_V4 == 0 {
            return refuse_connect(reason::NO_LISTENER_FAMILY, protected, orig, port);
        }
        if let Err(why) = hand_over(ctx, orig, port, AF_INET6, protected, db.db_index, false) {
            return refuse_connect(why, protected, orig, port);
        }
        // Keep the ::ffff: prefix and replace only the embedded IPv4 word: the socket
        // stays a dual-stack socket talking IPv4 to the interceptor's IPv4 listener.
        sa.user_ip6[3] = u32::from_ne_bytes(db.listen4_addr);
        sa.user_port = u32::from(db.listen4_port.to_be());
        count(counter::REDIRECTED);
        return ALLOW;
    }

    let addr = words_to_bytes(words);
    let key = Key::new(16 + 128, Db6Key { port: port_be, addr });
    let Some(db) = PG_DB6.get(&key) else {
        return ALLOW;
    };
    let Some(protected) = task_protected_cgroup() else {
        return ALLOW;
    };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return refuse_connect(reason::NOT_TCP, protected, addr, port);
    }
    if db.flags & target::HAS_V6 == 0 {
        return refuse_connect(reason::NO_LISTENER_FAMILY, protected, addr, port);
    }
    if let Err(why) = hand_over(ctx, addr, port, AF_INET6, protected, db.db_index, true) {
        return refuse_connect(why, protected, addr, port);
    }
    let l = db.listen6_addr;
    sa.user_ip6[0] = u32::from_ne_bytes([l[0], l[1], l[2], l[3]]);
    sa.user_ip6[1] = u32::from_ne_bytes([l[4], l[5], l[6], l[7]]);
    sa.user_ip6[2] = u32::from_ne_bytes([l[8], l[9], l[10], l[11]]);
    sa.user_ip6[3] = u32::from_ne_bytes([l[12], l[13], l[14], l[15]]);
    sa.user_port = u32::from(db.listen6_port.to_be());
    count(counter::REDIRECTED);
    ALLOW
}

// ---- record hand-off ------------------------------------------------------------

/// At TCP_CONNECT_CB the kernel has picked the client's source port but not yet sent
/// the SYN, so the record is published before the interceptor can possibly accept.
/// connect4/6 could not do this: the source port is unknown at that point.
#[sock_ops]
pub fn phigate_sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx);
    // sock_ops return value is only meaningful for ops that ask for a reply.
    1
}

fn try_sock_ops(ctx: &SockOpsContext) {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return;
    }
    // SAFETY: reading the context; `sk` may be null and is checked. aya's SkStorage
    // wrapper only accepts a sock_addr context, so the helper is called directly.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    let rec = unsafe { bpf_sk_storage_get(ptr::addr_of!(PG_SKREC) as *mut c_void, sk as *mut c_void, ptr::null_mut(), 0) } as *const ConnectRecord;
    if rec.is_null() {
        // Not a redirected socket.
        return;
    }
    // SAFETY: non-null socket storage of our type.
    let record = unsafe { *rec };
    // Context fields are read with volatile loads, each at its constant offset, before
    // any branch: otherwise the compiler merges the two branches' loads into one load
    // through a computed context pointer, which the verifier rejects ("dereference of
    // modified ctx ptr").
    let ops = ctx.ops;
    let (family, ip4, ip6, local_port) = unsafe {
        (
            ptr::read_volatile(ptr::addr_of!((*ops).family)),
            ptr::read_volatile(ptr::addr_of!((*ops).local_ip4)),
            [
                ptr::read_volatile(ptr::addr_of!((*ops).local_ip6[0])),
                ptr::read_volatile(ptr::addr_of!((*ops).local_ip6[1])),
                ptr::read_volatile(ptr::addr_of!((*ops).local_ip6[2])),
                ptr::read_volatile(ptr::addr_of!((*ops).local_ip6[3])),
            ],
            ptr::read_volatile(ptr::addr_of!((*ops).local_port)),
        )
    };
    let addr = if family == AF_INET {
        mapped_v4(ip4.to_ne_bytes())
    } else {
        // A dual-stack socket on IPv4 reports ::ffff:a.b.c.d here, which is the same
        // normal form the interceptor uses for IPv4 peers.
        words_to_bytes(ip6)
    };
    let key = OrigDstKey {
        netns_cookie: record.netns_cookie,
        addr,
        // local_port is host byte order (remote_port is not).
        port: local_port as u16,
        _pad: [0; 6],
    };
    if PG_ORIGDST.insert(key, record, 0).is_ok() {
        count(counter::RECORD_PUBLISHED);
    } else {
        count(counter::RECORD_LOST);
    }
}

// ---- getpeername ----------------------------------------------------------------

/// Redirected sockets report the database address they asked for, so drivers that
/// check the peer (or log it) see nothing unusual. These hooks must return 1: the
/// kernel rejects a getpeername program that can return 0.
#[cgroup_sock_addr(getpeername4)]
pub fn phigate_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: lookup without create; null means "not redirected".
    let rec = unsafe { PG_SKREC.get_ptr_mut(&ctx) };
    if rec.is_null() {
        return ALLOW;
    }
    // SAFETY: non-null storage; context valid.
    unsafe {
        let r = &*rec;
        let sa = &mut *ctx.sock_addr;
        sa.user_ip4 = u32::from_ne_bytes([r.orig_addr[12], r.orig_addr[13], r.orig_addr[14], r.orig_addr[15]]);
        sa.user_port = u32::from(r.orig_port.to_be());
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn phigate_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in getpeername4.
    let rec = unsafe { PG_SKREC.get_ptr_mut(&ctx) };
    if rec.is_null() {
        return ALLOW;
    }
    unsafe {
        let r = &*rec;
        let a = r.orig_addr;
        let sa = &mut *ctx.sock_addr;
        sa.user_ip6[0] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        sa.user_ip6[1] = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
        sa.user_ip6[2] = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
        sa.user_ip6[3] = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        sa.user_port = u32::from(r.orig_port.to_be());
    }
    ALLOW
}

// ---- egress guard ---------------------------------------------------------------

/// The backstop for everything connect4/6 cannot see: raw sockets, sockets that were
/// connected before their cgroup was protected, and any future path around the
/// connect hooks. A packet from a protected cgroup whose destination is a protected
/// database was, by definition, not redirected (redirected packets go to the
/// interceptor's address), so it is dropped and reported.
#[cgroup_skb(egress)]
pub fn phigate_egress(ctx: SkBuffContext) -> i32 {
    try_egress(&ctx)
}

fn try_egress(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: context field read.
    let proto = u16::from_be(unsafe { (*skb).protocol } as u16);
    let (addr, port_be) = if proto == ETH_P_IP {
        match ipv4_tcp_dst(ctx) {
            Some(d) => d,
            None => return ALLOW,
        }
    } else if proto == ETH_P_IPV6 {
        match ipv6_tcp_dst(ctx) {
            Some(d) => d,
            None => return ALLOW,
        }
    } else {
        return ALLOW;
    };
    // IPv4 packets carry their destination in mapped form here; an IPv6 packet to a
    // mapped address is judged against the IPv4 databases too.
    let is_db = if proto == ETH_P_IP || is_v4_mapped_bytes(&addr) {
        let key = Key::new(16 + 32, Db4Key { port: port_be, addr: [addr[12], addr[13], addr[14], addr[15]] });
        PG_DB4.get(&key).is_some()
    } else {
        let key = Key::new(16 + 128, Db6Key { port: port_be, addr });
        PG_DB6.get(&key).is_some()
    };
    if !is_db {
        return ALLOW;
    }
    let Some((own, protected)) = skb_protected_cgroup(skb) else {
        return ALLOW;
    };
    count(counter::BYPASS_DROPPED);
    if let Some(mut entry) = PG_EVENTS.reserve::<Event>(0) {
        let ev = Event {
            kind: event::BYPASS_DROPPED,
            reason: reason::NOT_REDIRECTED,
            cgroup_id: own,
            protected_cgroup_id: protected,
            // The task on the CPU is not necessarily the sender (timers retransmit),
            // so no pid or comm is claimed; the socket owner's uid is reliable.
            pid: 0,
            // SAFETY: context pointer.
            uid: unsafe { bpf_get_socket_uid(skb) },
            addr,
            port: u16::from_be_bytes(port_be),
            protocol: IPPROTO_TCP as u8,
            _pad: [0; 5],
            ktime_ns: unsafe { bpf_ktime_get_ns() },
            comm: [0; COMM_LEN],
        };
        entry.write(ev);
        entry.submit(0);
    }
    REFUSE
}

#[inline(always)]
fn is_v4_mapped_bytes(a: &[u8; 16]) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// Destination of an IPv4 TCP packet. cgroup_skb sees the packet from the network
/// header on. Non-first fragments carry no ports and pass: without the first fragment
/// (which is checked) they cannot be reassembled into anything.
#[inline(always)]
fn ipv4_tcp_dst(ctx: &SkBuffContext) -> Option<([u8; 16], [u8; 2])> {
    let ver_ihl: u8 = ctx.load(0).ok()?;
    let frag: u16 = u16::from_be(ctx.load::<u16>(6).ok()?);
    let protocol: u8 = ctx.load(9).ok()?;
    if protocol as u32 != IPPROTO_TCP || frag & 0x1fff != 0 {
        return None;
    }
    let daddr: [u8; 4] = ctx.load(16).ok()?;
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    // TCP destination port: bytes 2..4 of the TCP header.
    let dport: [u8; 2] = ctx.load(ihl + 2).ok()?;
    Some((mapped_v4(daddr), dport))
}

/// Destination of an IPv6 TCP packet, following up to four extension headers so that
/// a hop-by-hop or destination-options header cannot hide the TCP port.
#[inline(always)]
fn ipv6_tcp_dst(ctx: &SkBuffContext) -> Option<([u8; 16], [u8; 2])> {
    let mut next: u8 = ctx.load(6).ok()?;
    let daddr: [u8; 16] = ctx.load(24).ok()?;
    let mut off: usize = 40;
    let mut hops = 0;
    while hops < 4 {
        match next {
            6 => {
                let dport: [u8; 2] = ctx.load(off + 2).ok()?;
                return Some((daddr, dport));
            }
            // hop-by-hop, routing, destination options: length in 8-octet units
            // not counting the first 8.
            0 | 43 | 60 => {
                let nh: u8 = ctx.load(off).ok()?;
                let len: u8 = ctx.load(off + 1).ok()?;
                next = nh;
                off += (len as usize + 1) * 8;
            }
            // Fragment header: only the first fragment carries the TCP header.
            44 => {
                let nh: u8 = ctx.load(off).ok()?;
                let frag: u16 = u16::from_be(ctx.load::<u16>(off + 2).ok()?);
                if frag & 0xfff8 != 0 {
                    return None;
                }
                next = nh;
                off += 8;
            }
            _ => return None,
        }
        hops += 1;
    }
    None
}

// ---- raw sockets ----------------------------------------------------------------

/// Refuse raw IP sockets in protected cgroups at creation, when the operator enabled
/// it: a raw socket has no use in a database client and is the easiest way to craft
/// packets that never meet connect4/6. The egress guard still catches what gets out.
/// (AF_PACKET sockets do not pass this hook; the database's pg_hba and network policy
/// are the defence there, as the deployment guide says.)
#[cgroup_sock(sock_create)]
pub fn phigate_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the context is valid for the program's run.
    let sk: &bpf_sock = unsafe { &*ctx.sock };
    if sk.type_ != SOCK_RAW || (sk.family != AF_INET && sk.family != AF_INET6) {
        return ALLOW;
    }
    if settings().flags & setting::DENY_RAW_SOCKETS == 0 {
        return ALLOW;
    }
    let Some(protected) = task_protected_cgroup() else {
        return ALLOW;
    };
    count(counter::RAW_SOCKET_DENIED);
    // SAFETY: helper without arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    report(event::RAW_SOCKET_DENIED, reason::NONE, own, protected, [0; 16], 0);
    REFUSE
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // eBPF programs cannot panic; the verifier would reject any reachable panic path.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

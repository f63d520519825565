//! Interceptor listeners and the one place where a redirected connection's original
//! destination is recovered.
//!
//! Owns: binding listeners, the address newtypes that keep client, original
//! destination and listener addresses apart, and turning an accepted socket into an
//! [`Accepted`] by looking up the record the kernel published for it. It reaches the
//! kernel only through [`RecordSource`]; it knows nothing of identities, PostgreSQL or
//! policy.

use std::{
    fmt, io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    time::SystemTime,
};

pub mod conn;
pub mod peer;
pub mod tls;

use phigate_common::{ConnectRecord, OrigDstKey};
use tokio::net::{TcpListener, TcpStream};

/// The workload's end of a redirected connection, as the interceptor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// The database address the workload asked for, before the kernel redirected it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDstAddr(pub SocketAddr);

/// An interceptor listener's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
impl fmt::Display for OrigDstAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where connection records come from (the kernel's `PG_ORIGDST` map in the agent).
pub trait RecordSource: Send + Sync {
    /// Read and forget the record for this client tuple.
    fn take(&self, key: &OrigDstKey) -> Option<ConnectRecord>;
}

/// What the kernel attested about the process that connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRecord {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    /// The connecting task's own cgroup.
    pub cgroup_id: u64,
    /// The protected cgroup that matched (the task's or an ancestor).
    pub protected_cgroup_id: u64,
    pub netns_cookie: u64,
    pub socket_cookie: u64,
    pub db_index: u32,
}

/// A connection accepted on an interceptor listener whose kernel record was found.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    pub client: ClientAddr,
    pub orig_dst: OrigDstAddr,
    pub listener: ListenAddr,
    pub record: KernelRecord,
    pub accepted_at: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// No record: not a redirected connection (someone connected to the listener
    /// directly) or the record aged out. Such connections are closed, never proxied.
    #[error("no kernel redirect record for client {client} (netns cookie {netns_cookie}); closing without proxying")]
    NoRecord { client: ClientAddr, netns_cookie: u64 },
    #[error("redirect record for client {client} names database #{recorded} but it arrived at the listener of database #{listener}; closing")]
    WrongListener { client: ClientAddr, recorded: u32, listener: u32 },
    #[error("cannot read the network namespace of an accepted socket: {0}")]
    Netns(io::Error),
    /// The record is older than [`MAX_RECORD_AGE`]: its connect never reached this
    /// listener, and this connection is not the one it describes.
    #[error("the kernel redirect record for client {client} is {age_secs} s old, from a connect that never reached this listener; closing without proxying")]
    StaleRecord { client: ClientAddr, age_secs: u64 },
    /// The socket at the client's end is not the one that made the recorded connect:
    /// that connect never reached this listener, and another socket took over its
    /// address and port.
    #[error("the socket connecting from {client} is not the one the kernel's redirect record was made for (that connect never reached this listener, and another socket now uses its address and port); closing without proxying")]
    OtherSocket { client: ClientAddr },
    /// The accepted connection was reset or closed by its client before it was
    /// accepted; another socket may have its address and port by now.
    #[error("the connection from {client} was closed by its client before it was accepted (TCP state {state}); closing without proxying")]
    NotEstablished { client: ClientAddr, state: u8 },
    /// No socket holds the client's end any more: it went away before it was accepted.
    #[error("the client socket behind {client} is gone from this host; closing without proxying")]
    ClientGone { client: ClientAddr },
    #[error("cannot ask the kernel which socket connected from {client} (sock_diag: {err}); closing without proxying. The kernel needs INET_DIAG with TCP support (modules inet_diag and tcp_diag)")]
    SocketDiag { client: ClientAddr, err: io::Error },
}

/// A bound, listening socket not yet tied to a runtime. Each worker thread turns its
/// own into a [`Listener`] on its own runtime.
pub struct BoundListener {
    std: std::net::TcpListener,
    addr: ListenAddr,
    db_index: u32,
}

impl BoundListener {
    pub fn addr(&self) -> ListenAddr {
        self.addr
    }

    /// Index of the database this listener serves.
    pub fn addr_db_index(&self) -> usize {
        self.db_index as usize
    }

    /// The listening socket (for the kernel's map of live listeners).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.std.as_raw_fd()
    }
}

/// Bind `count` listening sockets on `addr` with SO_REUSEPORT, so the kernel spreads
/// connections over worker threads. With port 0 the first bind picks the port and the
/// others join it. SO_REUSEADDR lets a restarted agent take its port back at once
/// (redirects already point at it). Only sockets of the same user can join a
/// reuseport group.
pub fn bind_group(addr: SocketAddr, db_index: u32, count: usize) -> io::Result<Vec<BoundListener>> {
    if addr.port() != 0 {
        return bind_group_at(addr, db_index, count);
    }
    // Port 0: the kernel may auto-bind a reuseport socket into another group of the
    // same user, which would hand this agent's connections to someone else. Let a
    // plain socket pick a free port, then form the group on it (retrying a lost race).
    let mut last = None;
    for _ in 0..20 {
        let port = std::net::TcpListener::bind(addr)?.local_addr()?.port();
        match bind_group_at(SocketAddr::new(addr.ip(), port), db_index, count) {
            Ok(g) => return Ok(g),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free port")))
}

fn bind_group_at(addr: SocketAddr, db_index: u32, count: usize) -> io::Result<Vec<BoundListener>> {
    use nix::sys::socket::{bind, listen, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let mut out: Vec<BoundListener> = Vec::with_capacity(count);
    let mut target = addr;
    for _ in 0..count.max(1) {
        let family = if target.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None).map_err(io::Error::from)?;
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(io::Error::from)?;
        setsockopt(&fd, sockopt::ReusePort, &true).map_err(io::Error::from)?;
        if target.is_ipv6() {
            // IPv4(-mapped) connections go to the IPv4 listener.
            setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(io::Error::from)?;
        }
        bind(fd.as_raw_fd(), &SockaddrStorage::from(target)).map_err(io::Error::from)?;
        listen(&fd, nix::sys::socket::Backlog::new(1024).map_err(io::Error::from)?).map_err(io::Error::from)?;
        let std = std::net::TcpListener::from(fd);
        let local = std.local_addr()?;
        target = local;
        out.push(BoundListener { std, addr: ListenAddr(local), db_index });
    }
    if out.len() > 1 {
        // Best effort: without it the kernel spreads connections by hash.
        let _ = steer_by_cpu(&out[0].std);
    }
    Ok(out)
}

/// Pick the group member by the CPU that handles the incoming connection (classic BPF
/// `ld #cpu; ret a`), so that with worker `i` pinned to CPU `i` a connection is served
/// on the CPU where its client's packets arrive: no cross-CPU wakeups per message,
/// which are expensive (inter-processor interrupts), especially in virtual machines.
fn steer_by_cpu(listener: &std::net::TcpListener) -> io::Result<()> {
    const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
    const SKF_AD_OFF: u32 = (-0x1000i32) as u32;
    const SKF_AD_CPU: u32 = 36;
    let code = [
        libc::sock_filter { code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, jt: 0, jf: 0, k: SKF_AD_OFF.wrapping_add(SKF_AD_CPU) },
        libc::sock_filter { code: (libc::BPF_RET | libc::BPF_A) as u16, jt: 0, jf: 0, k: 0 },
    ];
    let prog = libc::sock_fprog { len: code.len() as u16, filter: code.as_ptr() as *mut libc::sock_filter };
    // SAFETY: valid fd; the program is copied by the kernel during the call.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pin the calling thread to one CPU (worker `i` → the `i`-th CPU this process may use).
pub fn pin_to_cpu(index: usize) -> io::Result<()> {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let allowed = sched_getaffinity(Pid::from_raw(0)).map_err(io::Error::from)?;
    let cpu = (0..CpuSet::count()).filter(|c| allowed.is_set(*c).unwrap_or(false)).nth(index).ok_or_else(|| io::Error::other("fewer CPUs than workers"))?;
    let mut set = CpuSet::new();
    set.set(cpu).map_err(io::Error::from)?;
    sched_setaffinity(Pid::from_raw(0), &set).map_err(io::Error::from)
}

/// One interceptor listener for one database, on one worker's runtime.
pub struct Listener {
    inner: TcpListener,
    addr: ListenAddr,
    db_index: u32,
}

impl Listener {
    /// Register a bound socket with the current (worker) runtime.
    pub fn from_bound(bound: BoundListener) -> io::Result<Self> {
        Ok(Self { inner: TcpListener::from_std(bound.std)?, addr: bound.addr, db_index: bound.db_index })
    }

    pub fn addr(&self) -> ListenAddr {
        self.addr
    }

    pub fn db_index(&self) -> u32 {
        self.db_index
    }

    pub async fn accept(&self) -> io::Result<(TcpStream, ClientAddr)> {
        let (stream, peer) = self.inner.accept().await?;
        Ok((stream, ClientAddr(peer)))
    }

    /// Attach the kernel's record to an accepted connection.
    pub fn recover(&self, stream: TcpStream, client: ClientAddr, records: &dyn RecordSource) -> Result<Accepted, AcceptError> {
        // The accepted connection must not be reset: one reset by its client while
        // queued for accept is an earlier socket's that had the same address and port
        // (a reset frees them at once), and the record there, if any, is for whichever
        // socket has them now, which gets its turn next (so the record is left for
        // it). A connection the client only shut down for writing (FIN: tokio-postgres
        // sends a CancelRequest and shuts down at once) keeps its client socket, and
        // with it the address and port, until the agent closes its end.
        match peer::tcp_state(std::os::fd::AsFd::as_fd(&stream)) {
            Ok(peer::TCP_ESTABLISHED | peer::TCP_CLOSE_WAIT) => {}
            Ok(state) => return Err(AcceptError::NotEstablished { client, state }),
            Err(err) => return Err(AcceptError::SocketDiag { client, err }),
        }
        let netns_cookie = netns_cookie(&stream).map_err(AcceptError::Netns)?;
        let key = OrigDstKey { netns_cookie, addr: normal_form(client.0.ip()), port: client.0.port(), _pad: [0; 6] };
        let rec = records.take(&key).ok_or(AcceptError::NoRecord { client, netns_cookie })?;
        // A record is published at the workload's connect, and taken here a moment
        // later. An old one belongs to a connect that never reached this listener
        // (refused, or dropped): whoever connects now from the same address and port
        // is someone else.
        let age_ns = monotonic_ns().saturating_sub(rec.connect_ns);
        if age_ns > MAX_RECORD_AGE.as_nanos() as u64 {
            return Err(AcceptError::StaleRecord { client, age_secs: age_ns / 1_000_000_000 });
        }
        if rec.db_index != self.db_index {
            return Err(AcceptError::WrongListener { client, recorded: rec.db_index, listener: self.db_index });
        }
        // The record names a socket, not just an address and port: the socket at the
        // client's end must be the one that made the connect.
        let server = stream.local_addr().map_err(|err| AcceptError::SocketDiag { client, err })?;
        match peer::client_socket_cookie(client.0, server) {
            Ok(Some(cookie)) if cookie == rec.socket_cookie => {}
            Ok(Some(_)) => return Err(AcceptError::OtherSocket { client }),
            Ok(None) => return Err(AcceptError::ClientGone { client }),
            Err(err) => return Err(AcceptError::SocketDiag { client, err }),
        }
        Ok(Accepted {
            stream,
            client,
            orig_dst: OrigDstAddr(orig_dst(&rec)),
            listener: self.addr,
            record: KernelRecord {
                pid: rec.pid,
                uid: rec.uid,
                gid: rec.gid,
                comm: nul_terminated(&rec.comm),
                cgroup_id: rec.cgroup_id,
                protected_cgroup_id: rec.protected_cgroup_id,
                netns_cookie: rec.netns_cookie,
                socket_cookie: rec.socket_cookie,
                db_index: rec.db_index,
            },
            accepted_at: SystemTime::now(),
        })
    }
}

/// How long after its connect a workload's connection may be accepted. Accepts
/// follow within milliseconds; a handshake retried after lost SYNs takes seconds.
pub const MAX_RECORD_AGE: std::time::Duration = std::time::Duration::from_secs(15);

/// CLOCK_MONOTONIC in nanoseconds: the clock of the kernel's `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
}

/// The kernel keys records by the client address in IPv6 form, IPv4 as `::ffff:a.b.c.d`.
pub fn normal_form(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn orig_dst(rec: &ConnectRecord) -> SocketAddr {
    let v6 = Ipv6Addr::from(rec.orig_addr);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, rec.orig_port)
}

fn nul_terminated(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The cookie of the agent's own network namespace (that of a socket it makes).
pub fn own_netns_cookie() -> io::Result<u64> {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
    netns_cookie(&probe)
}

/// `SO_NETNS_COOKIE` (Linux 5.14): identifies the socket's network namespace, so that
/// equal client tuples in different namespaces (pods) are told apart.
fn netns_cookie(socket: &impl std::os::fd::AsFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    peer::sockopt(socket.as_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, 0u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn ipv4_clients_use_the_mapped_form() {
        let a = normal_form(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(&a[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&a[12..], &[127, 0, 0, 1]);
    }

    struct OneRecord(std::sync::Mutex<Option<ConnectRecord>>);

    impl RecordSource for OneRecord {
        fn take(&self, _: &OrigDstKey) -> Option<ConnectRecord> {
            self.0.lock().unwrap().take()
        }
    }

    /// A record for `socket`, made `age` ago.
    fn record_of(socket: &std::net::TcpStream, age: std::time::Duration) -> OneRecord {
        let mut rec = test_record();
        rec.connect_ns = monotonic_ns() - age.as_nanos() as u64;
        rec.socket_cookie = peer::own_socket_cookie(std::os::fd::AsFd::as_fd(socket)).unwrap();
        OneRecord(std::sync::Mutex::new(Some(rec)))
    }

    async fn listener() -> Listener {
        let bound = bind_group_at("127.0.0.1:0".parse().unwrap(), 0, 1).unwrap().pop().unwrap();
        Listener::from_bound(bound).unwrap()
    }

    /// A record older than MAX_RECORD_AGE belongs to a connect that never reached the
    /// listener (found by a review: left by a refused connect, it named its workload
    /// to another process connecting later from the same port).
    #[tokio::test]
    async fn an_old_record_does_not_identify_the_connection() {
        let listener = listener().await;
        for (age, accepted) in [(std::time::Duration::from_millis(5), true), (MAX_RECORD_AGE + std::time::Duration::from_secs(1), false)] {
            let client_end = std::net::TcpStream::connect(listener.addr.0).unwrap();
            let (stream, client) = listener.accept().await.unwrap();
            let got = listener.recover(stream, client, &record_of(&client_end, age));
            assert_eq!(got.is_ok(), accepted, "{age:?}: {:?}", got.err());
            if !accepted {
                assert!(matches!(got, Err(AcceptError::StaleRecord { .. })));
            }
        }
    }

    /// The record is of a socket, not of an address and port: a young record made for
    /// another socket (a connect that never reached the listener, whose port another
    /// process took over) identifies nobody.
    #[tokio::test]
    async fn a_record_made_for_another_socket_does_not_identify_the_connection() {
        let listener = listener().await;
        let recorded = std::net::TcpStream::connect(listener.addr.0).unwrap();
        let _ = listener.accept().await.unwrap();
        let client_end = std::net::TcpStream::connect(listener.addr.0).unwrap();
        let (stream, client) = listener.accept().await.unwrap();
        let got = listener.recover(stream, client, &record_of(&recorded, std::time::Duration::from_millis(5)));
        assert!(matches!(got, Err(AcceptError::OtherSocket { .. })), "{:?}", got.err());
        drop(client_end);
    }

    fn test_record() -> ConnectRecord {
        ConnectRecord {
            orig_addr: Ipv4Addr::new(127, 0, 0, 2).to_ipv6_mapped().octets(),
            orig_port: 5432,
            family: 2,
            pid: 1,
            uid: 0,
            gid: 0,
            cgroup_id: 0,
            protected_cgroup_id: 0,
            netns_cookie: 0,
            socket_cookie: 0,
            connect_ns: 0,
            db_index: 0,
            _pad: 0,
            comm: *b"psql\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    #[test]
    fn original_destination_unmaps_ipv4() {
        let rec = test_record();
        assert_eq!(orig_dst(&rec), "127.0.0.2:5432".parse().unwrap());
        assert_eq!(nul_terminated(&rec.comm), "psql");
    }
}

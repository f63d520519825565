//! The client end of an accepted connection, as the kernel's socket diagnostics
//! (sock_diag, over netlink) report it: its socket cookie.
//!
//! The kernel's redirect record is keyed by the client's network namespace, address
//! and port, and carries the cookie of the socket that made the connect. An address
//! and port outlive a socket: when a redirected connect never reaches the listener
//! (its SYN dropped by a full accept queue, say) and gives up, another process can
//! connect from the same port and find the record. The cookie cannot be taken over:
//! the kernel numbers sockets once per boot. So [`super::Listener::recover`] asks the
//! kernel which socket holds the accepted connection's client end and compares.
//!
//! This module owns only the query. What a mismatch means is decided by the caller.
//! The client end is on this host (redirects go to a loopback listener in the
//! client's own network namespace, the agent's), so the agent's own netlink socket
//! sees it.

use std::{cell::RefCell, io, net::SocketAddr, os::fd::BorrowedFd, time::Duration};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

/// Longest the kernel's answer is awaited. It is made while the request is sent, so
/// this only bounds a kernel that does not answer at all.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

thread_local! {
    /// One netlink socket per worker thread, opened on first use: a query is then two
    /// system calls, not five.
    static DIAG: RefCell<Option<Socket>> = const { RefCell::new(None) };
}

/// The cookie of the TCP socket whose local end is `client` and whose peer is
/// `server`, or None if no such socket exists (any more).
pub fn client_socket_cookie(client: SocketAddr, server: SocketAddr) -> io::Result<Option<u64>> {
    DIAG.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_none() {
            *slot = Some(open()?);
        }
        let socket = slot.as_ref().expect("invariant: just opened");
        let answer = query(socket, client, server);
        if answer.is_err() {
            // A socket left with an unread answer would answer the next query with it.
            *slot = None;
        }
        answer
    })
}

fn open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let timeout = libc::timeval { tv_sec: ANSWER_WITHIN.as_secs() as libc::time_t, tv_usec: 0 };
    // SAFETY: a valid descriptor and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

fn query(socket: &Socket, client: SocketAddr, server: SocketAddr) -> io::Result<Option<u64>> {
    // An exact lookup (no NLM_F_DUMP): the kernel finds the one socket whose local
    // address is `source` and whose peer is `destination`. An IPv4 tuple also finds a
    // dual-stack IPv6 socket connected to an IPv4 address: both live in the same table.
    let family = if client.is_ipv4() { AF_INET } else { AF_INET6 };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: client.port(),
                destination_port: server.port(),
                source_address: client.ip(),
                destination_address: server.ip(),
                interface_id: 0,
                // All 0xff: "any socket with this tuple"; the caller compares.
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    request.finalize();
    let mut out = vec![0u8; request.buffer_len()];
    request.serialize(&mut out);
    socket.send(&out, 0)?;

    let mut answer = vec![0u8; 8192];
    let n = socket.recv(&mut &mut answer[..], 0)?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&answer[..n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => Ok(Some(u64::from_ne_bytes(r.header.socket_id.cookie))),
        NetlinkPayload::Error(e) => match e.code.map(|c| -c.get()) {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e.to_io()),
        },
        other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected sock_diag answer: {other:?}"))),
    }
}

/// `TCP_ESTABLISHED` as [`tcp_state`] reports it.
pub const TCP_ESTABLISHED: u8 = 1;
/// `TCP_CLOSE_WAIT`: the peer shut down its sending side (FIN) but its socket lives.
pub const TCP_CLOSE_WAIT: u8 = 8;

/// The TCP state (`tcpi_state` of `TCP_INFO`) of a socket this process holds.
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<u8> {
    // SAFETY: tcp_info is plain data; all zeros is a valid value.
    sockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, unsafe { std::mem::zeroed::<libc::tcp_info>() }).map(|info| info.tcpi_state)
}

/// `SO_COOKIE`: the cookie of a socket this process holds (tests, and the same number
/// sock_diag reports for it).
pub fn own_socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    sockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, 0u64)
}

/// A socket option whose value is plain data `T` (starting from `init`).
pub(super) fn sockopt<T: Copy>(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, init: T) -> io::Result<T> {
    let mut value = init;
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: a valid descriptor and an out-buffer of the size given.
    let rc = unsafe { libc::getsockopt(std::os::fd::AsRawFd::as_raw_fd(&fd), level, name, &mut value as *mut T as *mut libc::c_void, &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn finds_the_client_end_of_a_loopback_connection_by_its_cookie() {
        for listen in ["127.0.0.1:0", "[::1]:0"] {
            let listener = std::net::TcpListener::bind(listen).unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server_end, peer) = listener.accept().unwrap();
            let want = own_socket_cookie(client.as_fd()).unwrap();
            assert_eq!(client_socket_cookie(peer, server_end.local_addr().unwrap()).unwrap(), Some(want), "{listen}");
            // The server's end is not the client's: a different socket, a different cookie.
            assert_ne!(own_socket_cookie(server_end.as_fd()).unwrap(), want);
        }
    }

    #[test]
    fn a_dual_stack_client_is_found_by_its_ipv4_tuple() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(format!("[::ffff:127.0.0.1]:{port}")).unwrap();
        let (server_end, peer) = listener.accept().unwrap();
        assert!(peer.is_ipv4(), "{peer}");
        assert_eq!(client_socket_cookie(peer, server_end.local_addr().unwrap()).unwrap(), Some(own_socket_cookie(client.as_fd()).unwrap()));
    }

    #[test]
    fn a_connection_its_client_reset_is_no_longer_established() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let live = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        reset(client);
        let (reset_end, _) = listener.accept().unwrap();
        let (live_end, _) = listener.accept().unwrap();
        assert_ne!(tcp_state(reset_end.as_fd()).unwrap(), TCP_ESTABLISHED);
        assert_eq!(tcp_state(live_end.as_fd()).unwrap(), TCP_ESTABLISHED);
        // Shut down for writing (a CancelRequest's sender may): close-wait, not reset.
        live.shutdown(std::net::Shutdown::Write).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while tcp_state(live_end.as_fd()).unwrap() != TCP_CLOSE_WAIT && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(tcp_state(live_end.as_fd()).unwrap(), TCP_CLOSE_WAIT);
        drop(live);
    }

    /// Close with a reset (SO_LINGER 0): the socket is gone at once.
    fn reset(client: std::net::TcpStream) {
        let reset = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: a valid descriptor and a correctly sized option value.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&client),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &reset as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
    }

    #[test]
    fn a_closed_client_is_not_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_end, peer) = listener.accept().unwrap();
        reset(client);
        assert_eq!(client_socket_cookie(peer, server_end.local_addr().unwrap()).unwrap(), None);
    }
}

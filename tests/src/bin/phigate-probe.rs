//! `phigate-probe`: a small client the end-to-end tests run inside cgroups. Each mode
//! tries one way of reaching a database and prints one JSON line describing what
//! happened, so tests assert on real socket behaviour.
//!
//! ```text
//! phigate-probe connect  ADDR:PORT          plain connect (IPv4 or [IPv6])
//! phigate-probe mapped   A.B.C.D:PORT       AF_INET6 socket to ::ffff:A.B.C.D
//! phigate-probe tfo      ADDR:PORT          TCP Fast Open: sendto(MSG_FASTOPEN)
//! phigate-probe raw-syn  A.B.C.D:PORT SPORT hand-made SYN through a raw socket
//! phigate-probe hold     ADDR:PORT          connect, wait for a stdin line, then talk
//! phigate-probe udp      ADDR:PORT          connect a UDP socket (cannot be redirected)
//! phigate-probe negotiate ADDR:PORT ssl|gss send SSLRequest or GSSENCRequest, report the answer
//! phigate-probe direct-tls ADDR:PORT        open with a TLS ClientHello (PG17 direct SSL)
//! phigate-probe garbage  ADDR:PORT SEED     send seeded random bytes / broken frames
//! phigate-probe cancel   ADDR:PORT PID KEY  send a CancelRequest
//! phigate-probe connect-from ADDR:PORT A.B.C.D:SPORT  plain connect from a chosen
//!                                           source address and port (SO_REUSEADDR)
//! phigate-probe syn-from ADDR:PORT A.B.C.D:SPORT  the same connect, given up after
//!                                           half a second if not answered: "pending"
//! phigate-probe plant  ADDR:PORT A.B.C.D:SPORT  connect from SPORT, send a StartupMessage
//!                                           with application_name=planted-by-<pid>, then
//!                                           close with a reset (SO_LINGER 0)
//! phigate-probe squat    ADDR:PORT SECS     listen on ADDR:PORT (another process's port),
//!                                           print {"listening"}, accept one connection
//!                                           within SECS, answer its StartupMessage with a
//!                                           cleartext password request, report what came
//! phigate-probe smuggle  ADDR:PORT          extended protocol by hand: a refused Parse
//!                                           answered at Flush, then Bind/Execute of the
//!                                           refused statement's name
//! ```
//! After connecting, "talk" means: send a PostgreSQL StartupMessage and report the
//! first byte of the server's answer (`R` = authentication request: a real server).

use std::{
    io::{BufRead, Read, Write},
    mem,
    net::{Ipv4Addr, SocketAddr, SocketAddrV6, TcpStream},
    os::fd::{AsRawFd, FromRawFd},
    time::Duration,
};

use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(4);

fn startup_message() -> Vec<u8> {
    startup_message_named("phigate-probe")
}

/// A StartupMessage as user and database postgres, with this application_name.
fn startup_message_named(application_name: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608u32.to_be_bytes());
    for s in ["user", "postgres", "database", "postgres", "application_name", application_name] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend(body);
    msg
}

fn talk(stream: &mut TcpStream, send: bool) -> Value {
    stream.set_read_timeout(Some(TIMEOUT)).ok();
    if send {
        if let Err(e) = stream.write_all(&startup_message()) {
            return json!({"error": e.to_string()});
        }
    }
    let mut first = [0u8; 1];
    match stream.read(&mut first) {
        Ok(1) => json!((first[0] as char).to_string()),
        Ok(_) => json!("eof"),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            json!("timeout")
        }
        Err(e) => json!({"error": e.to_string()}),
    }
}

fn report_stream(mut out: serde_json::Map<String, Value>, mut stream: TcpStream, send: bool) -> Value {
    out.insert("connect".into(), json!("ok"));
    out.insert("peer".into(), json!(stream.peer_addr().map(|a| a.to_string()).unwrap_or_default()));
    out.insert("local".into(), json!(stream.local_addr().map(|a| a.to_string()).unwrap_or_default()));
    // The client's own view of who it is, for comparison with the kernel's record.
    out.insert("netns_cookie".into(), json!(netns_cookie(&stream)));
    // SAFETY: getuid has no preconditions.
    out.insert("uid".into(), json!(unsafe { libc::getuid() }));
    out.insert("pg".into(), talk(&mut stream, send));
    Value::Object(out)
}

/// SO_NETNS_COOKIE of the socket's network namespace (0 if unavailable).
fn netns_cookie(stream: &TcpStream) -> u64 {
    use std::os::fd::AsRawFd;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd and a correctly sized out-buffer.
    let rc = unsafe { libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, 71, &mut cookie as *mut u64 as *mut libc::c_void, &mut len) };
    if rc == 0 {
        cookie
    } else {
        0
    }
}

fn error_json(mut out: serde_json::Map<String, Value>, stage: &str, e: &std::io::Error) -> Value {
    out.insert(stage.into(), json!("error"));
    out.insert("errno".into(), json!(e.raw_os_error().unwrap_or(0)));
    out.insert("error".into(), json!(e.to_string()));
    Value::Object(out)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut out = serde_json::Map::new();
    out.insert("pid".into(), json!(std::process::id()));
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let addr = args.get(2).cloned().unwrap_or_default();
    let result = match mode {
        "connect" => {
            let a: SocketAddr = addr.parse().expect("ADDR:PORT");
            match TcpStream::connect_timeout(&a, TIMEOUT) {
                Ok(s) => report_stream(out, s, true),
                Err(e) => error_json(out, "connect", &e),
            }
        }
        "mapped" => {
            let a: std::net::SocketAddrV4 = addr.parse().expect("A.B.C.D:PORT");
            let v6 = SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0));
            match TcpStream::connect_timeout(&v6, TIMEOUT) {
                Ok(s) => report_stream(out, s, true),
                Err(e) => error_json(out, "connect", &e),
            }
        }
        "tfo" => tfo(out, addr.parse().expect("ADDR:PORT")),
        "raw-syn" => {
            let a: std::net::SocketAddrV4 = addr.parse().expect("A.B.C.D:PORT");
            let sport: u16 = args.get(3).and_then(|s| s.parse().ok()).expect("SPORT");
            raw_syn(out, a, sport)
        }
        "hold" => {
            let a: SocketAddr = addr.parse().expect("ADDR:PORT");
            match TcpStream::connect_timeout(&a, TIMEOUT) {
                Ok(s) => {
                    println!("{}", json!({"pid": std::process::id(), "held": "ok", "peer": s.peer_addr().map(|a| a.to_string()).unwrap_or_default()}));
                    std::io::stdout().flush().ok();
                    let mut line = String::new();
                    std::io::stdin().lock().read_line(&mut line).ok();
                    report_stream(out, s, true)
                }
                Err(e) => error_json(out, "connect", &e),
            }
        }
        "udp" => {
            let a: SocketAddr = addr.parse().expect("ADDR:PORT");
            let bind: SocketAddr = if a.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
            match std::net::UdpSocket::bind(bind).and_then(|s| s.connect(a)) {
                Ok(()) => {
                    out.insert("connect".into(), json!("ok"));
                    Value::Object(out)
                }
                Err(e) => error_json(out, "connect", &e),
            }
        }
        "negotiate" => {
            let a: SocketAddr = addr.parse().expect("ADDR:PORT");
            let code: u32 = if args.get(3).map(String::as_str) == Some("gss") { 80_877_104 } else { 80_877_103 };
            match TcpStream::connect_timeout(&a, TIMEOUT) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(TIMEOUT)).ok();
                    let mut req = 8u32.to_be_bytes().to_vec();
                    req.extend_from_slice(&code.to_be_bytes());
                    s.write_all(&req).ok();
                    let mut b = [0u8; 1];
                    let answer = match s.read(&mut b) {
                        Ok(1) => (b[0] as char).to_string(),
                        Ok(_) => "eof".into(),
                        Err(e) => e.to_string(),
                    };
                    out.insert("answer".into(), json!(answer));
                    Value::Object(out)
                }
                Err(e) => error_json(out, "connect", &e),
            }
        }
        "direct-tls" => {
            let a: SocketAddr = addr.parse().expect("ADDR:PORT");
            match TcpStream::connect_timeout(&a, TIMEOUT) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(TIMEOUT)).ok();
                    // The start of a TLS 1.2/1.3 ClientHello record.
                    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3c, 0x03, 0x03]).ok();
                    s.write_all(&[0u8; 61]).ok();
                    let mut b = [0u8; 64];
                    let answer = match s.read(&mut b) {
                        Ok(0) => "closed".to_string(),
                        Ok(n) => format!("{n} bytes"),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "closed".to_string(),
                        Err(e) => e.to_string(),
                    };
                    out.insert("answer".into(), json!(answer));
                    Value::Object(out)
                }
                Err(e) => error_json(out, "connect", &e),
            }
        }
        "cancel" => {
            let a: SocketAddr = addr.parse().expect("ADDR:PORT");
            let pid: u32 = args.get(3).and_then(|s| s.parse().ok()).expect("PID");
            let key: u32 = args.get(4).and_then(|s| s.parse().ok()).expect("KEY");
            match TcpStream::connect_timeout(&a, TIMEOUT) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(TIMEOUT)).ok();
                    let mut req = 16u32.to_be_bytes().to_vec();
                    req.extend_from_slice(&80_877_102u32.to_be_bytes());
                    req.extend_from_slice(&pid.to_be_bytes());
                    req.extend_from_slice(&key.to_be_bytes());
                    s.write_all(&req).ok();
                    let mut b = [0u8; 16];
                    let answer = match s.read(&mut b) {
                        Ok(0) => "closed".to_string(),
                        Ok(n) => format!("{n} bytes"),
                        Err(e) => e.to_string(),
                    };
                    out.insert("answer".into(), json!(answer));
                    Value::Object(out)
                }
                Err(e) => error_json(out, "connect", &e),
            }
        }
        "connect-from" => {
            let a: std::net::SocketAddrV4 = addr.parse().expect("A.B.C.D:PORT");
            let from: std::net::SocketAddrV4 = args.get(3).and_then(|s| s.parse().ok()).expect("A.B.C.D:SPORT");
            match connect_from(a, from, None) {
                Ok((s, _)) => report_stream(out, s, true),
                Err(e) => error_json(out, "connect", &e),
            }
        }
        "syn-from" => {
            let a: std::net::SocketAddrV4 = addr.parse().expect("A.B.C.D:PORT");
            let from: std::net::SocketAddrV4 = args.get(3).and_then(|s| s.parse().ok()).expect("A.B.C.D:SPORT");
            match connect_from(a, from, Some(Duration::from_millis(500))) {
                Ok((_, connected)) => {
                    out.insert("connect".into(), json!(if connected { "ok" } else { "pending" }));
                    Value::Object(out)
                }
                Err(e) => error_json(out, "connect", &e),
            }
        }
        "smuggle" => smuggle(out, addr.parse().expect("ADDR:PORT")),
        "plant" => {
            let a: std::net::SocketAddrV4 = addr.parse().expect("A.B.C.D:PORT");
            let from: std::net::SocketAddrV4 = args.get(3).and_then(|s| s.parse().ok()).expect("A.B.C.D:SPORT");
            match connect_from(a, from, None) {
                Err(e) => error_json(out, "connect", &e),
                Ok((mut s, _)) => {
                    out.insert("connect".into(), json!("ok"));
                    out.insert("local".into(), json!(s.local_addr().map(|a| a.to_string()).unwrap_or_default()));
                    let name = format!("planted-by-{}", std::process::id());
                    out.insert("sent".into(), json!(s.write_all(&startup_message_named(&name)).is_ok()));
                    out.insert("application_name".into(), json!(name));
                    // Closed with a reset (linger 0), not a FIN.
                    let reset = libc::linger { l_onoff: 1, l_linger: 0 };
                    let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &reset);
                    drop(s);
                    Value::Object(out)
                }
            }
        }
        "squat" => {
            let a: SocketAddr = addr.parse().expect("ADDR:PORT");
            let secs: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
            squat(out, a, Duration::from_secs(secs))
        }
        "garbage" => {
            let a: SocketAddr = addr.parse().expect("ADDR:PORT");
            let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
            garbage(out, a, seed)
        }
        _ => {
            eprintln!("usage: phigate-probe connect|mapped|tfo|raw-syn|hold|udp|negotiate|direct-tls|garbage ADDR:PORT [...]");
            std::process::exit(2);
        }
    };
    println!("{result}");
}

/// An IPv4 connect from `from` (bound first, with SO_REUSEADDR): blocking, or with
/// `within`, non-blocking and given up (the socket closed) if not answered in time.
/// Returns the stream and whether the connect completed.
fn connect_from(to: std::net::SocketAddrV4, from: std::net::SocketAddrV4, within: Option<Duration>) -> std::io::Result<(TcpStream, bool)> {
    let sin = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    };
    let flags = if within.is_some() { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket calls on a fresh fd; the addresses are valid sockaddr_in.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | flags, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one as *const _ as *const libc::c_void, mem::size_of::<libc::c_int>() as u32);
        let local = sin(from);
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, mem::size_of::<libc::sockaddr_in>() as u32) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sin(to);
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, mem::size_of::<libc::sockaddr_in>() as u32) != 0 {
            let e = std::io::Error::last_os_error();
            if within.is_none() || e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        let Some(within) = within else { return Ok((stream, true)) };
        let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        let answered = libc::poll(&mut pfd, 1, within.as_millis() as libc::c_int) == 1
            && pfd.revents & libc::POLLOUT != 0
            && pfd.revents & (libc::POLLERR | libc::POLLHUP) == 0;
        Ok((stream, answered))
    }
}

/// Listen where another process listened, take one connection and play the database:
/// read the StartupMessage, ask for a cleartext password, report what the client said.
fn squat(mut out: serde_json::Map<String, Value>, a: SocketAddr, within: Duration) -> Value {
    let listener = match std::net::TcpListener::bind(a) {
        Ok(l) => l,
        Err(e) => return error_json(out, "listen", &e),
    };
    println!("{}", json!({"pid": std::process::id(), "listening": "ok", "uid": unsafe { libc::getuid() }}));
    std::io::stdout().flush().ok();
    listener.set_nonblocking(true).ok();
    let deadline = std::time::Instant::now() + within;
    let (mut s, peer) = loop {
        match listener.accept() {
            Ok(x) => break x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return error_json(out, "accept", &e),
        }
    };
    s.set_nonblocking(false).ok();
    s.set_read_timeout(Some(TIMEOUT)).ok();
    out.insert("accepted".into(), json!(peer.to_string()));
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).is_err() {
        return Value::Object(out);
    }
    let mut body = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4).min(65536)];
    if s.read_exact(&mut body).is_err() {
        return Value::Object(out);
    }
    let params: Vec<String> =
        body.get(4..).unwrap_or_default().split(|b| *b == 0).filter(|p| !p.is_empty()).map(|p| String::from_utf8_lossy(p).into_owned()).collect();
    out.insert("startup".into(), json!(params));
    // AuthenticationCleartextPassword.
    let _ = s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
    let mut h = [0u8; 5];
    if s.read_exact(&mut h).is_ok() && h[0] == b'p' {
        let mut pw = vec![0u8; (u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize).saturating_sub(4).min(65536)];
        if s.read_exact(&mut pw).is_ok() {
            out.insert("password".into(), json!(String::from_utf8_lossy(&pw).trim_end_matches('\0').to_string()));
        }
    }
    Value::Object(out)
}

/// TCP Fast Open: the connect happens inside sendto(), a path that skips connect(2).
fn tfo(out: serde_json::Map<String, Value>, a: SocketAddr) -> Value {
    let SocketAddr::V4(v4) = a else { panic!("tfo takes an IPv4 address") };
    // SAFETY: plain socket syscalls on a descriptor we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return error_json(out, "socket", &std::io::Error::last_os_error());
        }
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
            sin_zero: [0; 8],
        };
        let msg = startup_message();
        let rc = libc::sendto(
            fd,
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            libc::MSG_FASTOPEN,
            &sin as *const _ as *const libc::sockaddr,
            mem::size_of::<libc::sockaddr_in>() as u32,
        );
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return error_json(out, "connect", &e);
        }
        let stream = TcpStream::from_raw_fd(fd);
        report_stream(out, stream, false)
    }
}

/// A tiny deterministic generator (xorshift64*), so failures replay from the seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Misbehave in one of several seeded ways and report the first byte of any answer:
/// random bytes instead of a startup packet, a startup packet with a lying length,
/// or a valid startup followed by random and truncated frames.
fn garbage(mut out: serde_json::Map<String, Value>, a: SocketAddr, seed: u64) -> Value {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut s = match TcpStream::connect_timeout(&a, TIMEOUT) {
        Ok(s) => s,
        Err(e) => return error_json(out, "connect", &e),
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let kind = rng.below(4);
    let mut wire = Vec::new();
    match kind {
        0 => {
            let n = 1 + rng.below(300) as usize;
            wire.extend(rng.bytes(n));
        }
        1 => {
            let mut m = startup_message();
            let lie = (rng.below(20_000) as u32).to_be_bytes();
            m[..4].copy_from_slice(&lie);
            wire.extend(m);
        }
        _ => {
            wire.extend(startup_message());
            for _ in 0..1 + rng.below(5) {
                let tag = if rng.below(2) == 0 { b"QPBEDSXdcf"[rng.below(10) as usize] } else { rng.next() as u8 };
                let len = if rng.below(3) == 0 { rng.next() as u32 } else { 4 + rng.below(64) as u32 };
                wire.push(tag);
                wire.extend_from_slice(&len.to_be_bytes());
                let body = (len as usize).saturating_sub(4).min(64);
                let body = if kind == 3 { body / 2 } else { body }; // truncated frames
                wire.extend(rng.bytes(body));
            }
        }
    }
    let _ = s.write_all(&wire);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.len() > 65536 {
            break;
        }
    }
    out.insert("kind".into(), json!(kind));
    out.insert("sent".into(), json!(wire.len()));
    out.insert("answer_tags".into(), json!(answer_tags(&answer)));
    Value::Object(out)
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![tag];
    f.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn cstrs(parts: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    for p in parts {
        b.extend_from_slice(p.as_bytes());
        b.push(0);
    }
    b
}

/// Read backend messages until one with a tag in `until` (or a timeout); returns the
/// tags seen and the text of the first ErrorResponse's message field.
fn read_until(s: &mut TcpStream, until: &[u8]) -> (String, String) {
    let mut tags = String::new();
    let mut error = String::new();
    loop {
        let mut h = [0u8; 5];
        if s.read_exact(&mut h).is_err() {
            tags.push('!');
            return (tags, error);
        }
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        if s.read_exact(&mut body).is_err() {
            tags.push('!');
            return (tags, error);
        }
        tags.push(h[0] as char);
        if h[0] == b'E' && error.is_empty() {
            let mut fields = body.split(|b| *b == 0);
            error = fields.find(|f| f.first() == Some(&b'M')).map(|f| String::from_utf8_lossy(&f[1..]).into_owned()).unwrap_or_default();
        }
        if until.contains(&h[0]) {
            return (tags, error);
        }
    }
}

/// The extended protocol by hand, as a driver in pipeline mode would speak it:
/// 1. Parse of a statement phigate refuses, then Flush (no Sync): the error must
///    arrive without waiting for a Sync;
/// 2. Sync: ReadyForQuery;
/// 3. Bind + Execute of the refused statement's name: it does not exist on the server.
fn smuggle(mut out: serde_json::Map<String, Value>, a: SocketAddr) -> Value {
    let mut s = match TcpStream::connect_timeout(&a, TIMEOUT) {
        Ok(s) => s,
        Err(e) => return error_json(out, "connect", &e),
    };
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    let _ = s.write_all(&startup_message());
    let (login, _) = read_until(&mut s, b"ZE");
    out.insert("login".into(), json!(login));
    let mut parse = cstrs(&["s1", "drop table patients"]);
    parse.extend_from_slice(&0u16.to_be_bytes());
    let mut wire = frame(b'P', &parse);
    wire.extend(frame(b'H', &[]));
    let _ = s.write_all(&wire);
    let (after_flush, error) = read_until(&mut s, b"EZ");
    out.insert("after_flush".into(), json!(after_flush));
    out.insert("parse_error".into(), json!(error));
    let _ = s.write_all(&frame(b'S', &[]));
    let (after_sync, _) = read_until(&mut s, b"Z");
    out.insert("after_sync".into(), json!(after_sync));
    let mut bind = cstrs(&["", "s1"]);
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut wire = frame(b'B', &bind);
    let mut exec = cstrs(&[""]);
    exec.extend_from_slice(&0u32.to_be_bytes());
    wire.extend(frame(b'E', &exec));
    wire.extend(frame(b'S', &[]));
    let _ = s.write_all(&wire);
    let (after_bind, error) = read_until(&mut s, b"Z");
    out.insert("after_bind".into(), json!(after_bind));
    out.insert("bind_error".into(), json!(error));
    Value::Object(out)
}

/// The message type bytes in a backend byte stream (best effort).
fn answer_tags(mut b: &[u8]) -> String {
    let mut tags = String::new();
    while b.len() >= 5 {
        tags.push(b[0] as char);
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if len + 1 > b.len() {
            break;
        }
        b = &b[len + 1..];
    }
    tags
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { u16::from_be_bytes([chunk[0], 0]) };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A hand-made SYN: never passes through connect(2), so only the egress guard (or the
/// raw-socket refusal) can stop it.
fn raw_syn(mut out: serde_json::Map<String, Value>, dst: std::net::SocketAddrV4, sport: u16) -> Value {
    let src = Ipv4Addr::new(127, 0, 0, 1);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4; // data offset
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let c = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut packet = ip.to_vec();
    packet.extend_from_slice(&tcp);
    // SAFETY: plain socket syscalls on a descriptor we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        if fd < 0 {
            return error_json(out, "socket", &std::io::Error::last_os_error());
        }
        out.insert("socket".into(), json!("ok"));
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst.ip().octets()) },
            sin_zero: [0; 8],
        };
        let rc = libc::sendto(
            fd,
            packet.as_ptr() as *const libc::c_void,
            packet.len(),
            0,
            &sin as *const _ as *const libc::sockaddr,
            mem::size_of::<libc::sockaddr_in>() as u32,
        );
        let result = if rc < 0 {
            error_json(out, "send", &std::io::Error::last_os_error())
        } else {
            out.insert("send".into(), json!("ok"));
            Value::Object(out)
        };
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let _ = owned.as_raw_fd();
        result
    }
}

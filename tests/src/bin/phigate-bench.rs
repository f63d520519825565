//! `phigate-bench`: the two ends of the redirect benchmark, speaking just enough
//! PostgreSQL that phigate (which understands the protocol) can sit in between.
//!
//! ```text
//! phigate-bench server ADDR:PORT                 minimal server: trust login, COPY sink
//! phigate-bench setup  ADDR:PORT COUNT           COUNT connections: connect() latency and
//!                                                time to ReadyForQuery (µs)
//! phigate-bench stream ADDR:PORT BYTES WRITE     COPY FROM STDIN of BYTES in WRITE-sized
//!                                                CopyData messages; prints throughput
//! phigate-bench relay  ADDR:PORT TARGET          a plain byte relay (two threads per
//!                                                connection, 256 KiB reads): the cost of
//!                                                any userspace hop, for reference
//! ```

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Instant,
};

use serde_json::json;

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![tag];
    f.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// The StartupMessage; user and database are `bench` unless PHIGATE_BENCH_USER /
/// PHIGATE_BENCH_DB say otherwise (a real PostgreSQL needs real names).
fn startup() -> Vec<u8> {
    let user = std::env::var("PHIGATE_BENCH_USER").unwrap_or_else(|_| "bench".into());
    let db = std::env::var("PHIGATE_BENCH_DB").unwrap_or_else(|_| "bench".into());
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(format!("user\0{user}\0database\0{db}\0\0").as_bytes());
    let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    m.extend(body);
    m
}

/// Read one typed message; returns (tag, body).
fn read_msg(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 5];
    s.read_exact(&mut h)?;
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut body)?;
    Ok((h[0], body))
}

fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true).ok();
    // SSLRequest (declined) or the StartupMessage.
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let n = u32::from_be_bytes(len) as usize;
        let mut rest = vec![0u8; n.saturating_sub(4)];
        s.read_exact(&mut rest)?;
        if rest.len() >= 4 && u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) == 80_877_103 {
            s.write_all(b"N")?;
            continue;
        }
        break;
    }
    let mut hello = frame(b'R', &0i32.to_be_bytes());
    hello.extend(frame(b'S', b"server_version\x0015.0\x00"));
    hello.extend(frame(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]));
    hello.extend(frame(b'Z', b"I"));
    s.write_all(&hello)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let (tag, _) = read_msg(&mut s)?;
        match tag {
            b'X' => return Ok(()),
            b'Q' => {
                // COPY … FROM STDIN: sink CopyData until CopyDone, count the bytes.
                s.write_all(&frame(b'G', &[0, 0, 0]))?;
                let mut total: u64 = 0;
                loop {
                    let mut h = [0u8; 5];
                    s.read_exact(&mut h)?;
                    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize - 4;
                    let mut left = len;
                    while left > 0 {
                        let n = s.read(&mut buf[..left.min(256 * 1024)])?;
                        if n == 0 {
                            return Ok(());
                        }
                        left -= n;
                    }
                    match h[0] {
                        b'd' => total += len as u64,
                        _ => break,
                    }
                }
                let mut done = frame(b'C', format!("COPY {total}\0").as_bytes());
                done.extend(frame(b'Z', b"I"));
                s.write_all(&done)?;
            }
            _ => {}
        }
    }
}

fn server(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).expect("bind");
    println!("{}", json!({"listening": listener.local_addr().unwrap().to_string()}));
    std::io::stdout().flush().ok();
    for conn in listener.incoming() {
        let Ok(s) = conn else { continue };
        std::thread::spawn(move || {
            let _ = serve(s);
        });
    }
}

/// Copy one direction until EOF, then pass the close on.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn relay(addr: SocketAddr, target: SocketAddr) {
    let listener = TcpListener::bind(addr).expect("bind");
    println!("{}", json!({"listening": listener.local_addr().unwrap().to_string()}));
    std::io::stdout().flush().ok();
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let Ok(server) = TcpStream::connect(target) else { continue };
        for s in [&client, &server] {
            s.set_nodelay(true).ok();
        }
        let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
        std::thread::spawn(move || pump(client, server));
        std::thread::spawn(move || pump(s2, c2));
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn login(addr: SocketAddr) -> std::io::Result<(TcpStream, f64, f64)> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    let t1 = Instant::now();
    s.set_nodelay(true).ok();
    s.write_all(&startup())?;
    loop {
        let (tag, _) = read_msg(&mut s)?;
        match tag {
            b'Z' => break,
            b'E' => return Err(std::io::Error::other("login refused")),
            _ => {}
        }
    }
    let t2 = Instant::now();
    Ok((s, (t1 - t0).as_secs_f64() * 1e6, (t2 - t0).as_secs_f64() * 1e6))
}

fn setup(addr: SocketAddr, count: usize) {
    let (mut connect, mut ready) = (Vec::with_capacity(count), Vec::with_capacity(count));
    let mut failures = 0usize;
    for _ in 0..count {
        match login(addr) {
            Ok((mut s, c, r)) => {
                connect.push(c);
                ready.push(r);
                let _ = s.write_all(&frame(b'X', &[]));
            }
            Err(_) => failures += 1,
        }
    }
    connect.sort_by(f64::total_cmp);
    ready.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "count": connect.len(), "failures": failures,
            "connect_p50_us": percentile(&connect, 0.5), "connect_p99_us": percentile(&connect, 0.99),
            "ready_p50_us": percentile(&ready, 0.5), "ready_p99_us": percentile(&ready, 0.99),
        })
    );
}

fn stream(addr: SocketAddr, bytes: u64, write: usize) {
    let (mut s, _, _) = login(addr).expect("login");
    s.write_all(&frame(b'Q', b"COPY sink FROM STDIN\0")).expect("query");
    let (tag, _) = read_msg(&mut s).expect("CopyInResponse");
    assert_eq!(tag, b'G', "expected CopyInResponse");
    // One CopyData message per write, as a client streaming a file would send.
    let payload = vec![0x5au8; write.saturating_sub(5)];
    let msg = frame(b'd', &payload);
    let t0 = Instant::now();
    let mut sent: u64 = 0;
    while sent < bytes {
        s.write_all(&msg).expect("write");
        sent += payload.len() as u64;
    }
    s.write_all(&frame(b'c', &[])).expect("CopyDone");
    let (tag, body) = read_msg(&mut s).expect("CommandComplete");
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(tag, b'C');
    let text = String::from_utf8_lossy(&body);
    let counted: u64 = text.trim_end_matches('\0').trim_start_matches("COPY ").parse().unwrap_or(0);
    assert_eq!(counted, sent, "server counted {counted} of {sent} bytes");
    println!("{}", json!({"bytes": sent, "seconds": secs, "gbytes_per_sec": sent as f64 / secs / 1e9}));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = args.get(2).and_then(|a| a.parse().ok()).expect("ADDR:PORT");
    match args.get(1).map(String::as_str) {
        Some("server") => server(addr),
        Some("relay") => relay(addr, args.get(3).and_then(|a| a.parse().ok()).expect("TARGET ADDR:PORT")),
        Some("setup") => setup(addr, args.get(3).and_then(|c| c.parse().ok()).unwrap_or(1000)),
        Some("stream") => stream(addr, args.get(3).and_then(|c| c.parse().ok()).unwrap_or(1 << 30), args.get(4).and_then(|c| c.parse().ok()).unwrap_or(65536)),
        _ => {
            eprintln!("usage: phigate-bench server|setup|stream|relay ADDR:PORT [...]");
            std::process::exit(2);
        }
    }
}

//! `phigate-bench`: the two ends of the redirect benchmark.
//!
//! ```text
//! phigate-bench server ADDR:PORT                 echo/sink server (runs until killed)
//! phigate-bench setup ADDR:PORT COUNT            COUNT connects; prints connect() and
//!                                                connect+first-reply latencies (µs)
//! phigate-bench stream ADDR:PORT BYTES WRITE     one connection, BYTES in WRITE-sized
//!                                                writes; prints throughput
//! ```
//! Protocol: the client's first byte picks the mode. `E`: the server echoes one byte
//! back. `S`: the server reads to EOF and answers with the byte count (8 bytes, BE).

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Instant,
};

use serde_json::json;

fn server(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).expect("bind");
    println!("{}", json!({"listening": listener.local_addr().unwrap().to_string()}));
    std::io::stdout().flush().ok();
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        std::thread::spawn(move || {
            s.set_nodelay(true).ok();
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).is_err() {
                return;
            }
            match mode[0] {
                b'E' => {
                    let _ = s.write_all(b"e");
                }
                b'S' => {
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut total: u64 = 0;
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => total += n as u64,
                        }
                    }
                    let _ = s.write_all(&total.to_be_bytes());
                }
                _ => {}
            }
        });
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn setup(addr: SocketAddr, count: usize) {
    let mut connect = Vec::with_capacity(count);
    let mut first = Vec::with_capacity(count);
    let mut failures = 0usize;
    for _ in 0..count {
        let t0 = Instant::now();
        let Ok(mut s) = TcpStream::connect(addr) else {
            failures += 1;
            continue;
        };
        let t1 = Instant::now();
        s.set_nodelay(true).ok();
        let mut b = [0u8; 1];
        if s.write_all(b"E").is_err() || s.read_exact(&mut b).is_err() {
            failures += 1;
            continue;
        }
        let t2 = Instant::now();
        connect.push((t1 - t0).as_secs_f64() * 1e6);
        first.push((t2 - t0).as_secs_f64() * 1e6);
    }
    connect.sort_by(f64::total_cmp);
    first.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "count": connect.len(), "failures": failures,
            "connect_p50_us": percentile(&connect, 0.5), "connect_p99_us": percentile(&connect, 0.99),
            "first_reply_p50_us": percentile(&first, 0.5), "first_reply_p99_us": percentile(&first, 0.99),
        })
    );
}

fn stream(addr: SocketAddr, bytes: u64, write: usize) {
    let mut s = TcpStream::connect(addr).expect("connect");
    let buf = vec![0x5au8; write];
    s.write_all(b"S").expect("mode");
    let t0 = Instant::now();
    let mut sent: u64 = 0;
    while sent < bytes {
        let n = write.min((bytes - sent) as usize);
        s.write_all(&buf[..n]).expect("write");
        sent += n as u64;
    }
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut total = [0u8; 8];
    s.read_exact(&mut total).expect("server count");
    let secs = t0.elapsed().as_secs_f64();
    let received = u64::from_be_bytes(total);
    assert_eq!(received, bytes, "server received {received} of {bytes} bytes");
    println!("{}", json!({"bytes": bytes, "seconds": secs, "gbytes_per_sec": bytes as f64 / secs / 1e9}));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = args.get(2).and_then(|a| a.parse().ok()).expect("ADDR:PORT");
    match args.get(1).map(String::as_str) {
        Some("server") => server(addr),
        Some("setup") => setup(addr, args.get(3).and_then(|c| c.parse().ok()).unwrap_or(1000)),
        Some("stream") => stream(addr, args.get(3).and_then(|c| c.parse().ok()).unwrap_or(1 << 30), args.get(4).and_then(|c| c.parse().ok()).unwrap_or(65536)),
        _ => {
            eprintln!("usage: phigate-bench server|setup|stream ADDR:PORT [...]");
            std::process::exit(2);
        }
    }
}

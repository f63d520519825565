//! Zero-copy forwarding of a byte range between two plain TCP sockets with splice(2)
//! through a pipe: the bytes move kernel to kernel, never into the agent's memory.
//!
//! Used for the bodies of large messages no stage needs to see (COPY data on its way
//! to the database, big rows when no masking applies). Each call moves exactly the
//! requested number of bytes or fails; readiness comes from tokio, so it never blocks
//! a worker thread.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
};

use nix::{
    fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

/// A pipe used as the in-kernel buffer between two sockets.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Self> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        // A larger pipe means fewer splice calls per megabyte; fall back to the
        // default if the system limit is lower.
        let capacity = fcntl(std::os::fd::AsRawFd::as_raw_fd(&write), FcntlArg::F_SETPIPE_SZ(1 << 20)).map(|c| c as usize).unwrap_or(64 * 1024);
        Ok(Self { read, write, capacity })
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Move exactly `len` bytes from `from` to `to`.
pub async fn forward(from: &TcpStream, to: &TcpStream, pipe: &Pipe, mut len: usize) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    while len > 0 {
        let want = len.min(pipe.capacity);
        let moved = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_fd(), None, pipe.write.as_fd(), None, want, flags | SpliceFFlags::SPLICE_F_MORE).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => break n,
                Err(e) if would_block(&e) => continue,
                Err(e) => return Err(e),
            }
        };
        let mut left = moved;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || splice(pipe.read.as_fd(), None, to.as_fd(), None, left, flags).map_err(io::Error::from)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => left -= n,
                Err(e) if would_block(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        len -= moved;
    }
    Ok(())
}

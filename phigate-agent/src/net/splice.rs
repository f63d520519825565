//! Zero-copy forwarding of a byte range between two plain TCP sockets with splice(2)
//! through a pipe: the bytes move kernel to kernel, never into the agent's memory.
//!
//! Used for the bodies of large messages no stage needs to see (COPY data on its way
//! to the database, big rows when no masking applies). The relay knows where frames
//! begin and end; this module only moves exact byte counts through a pipe that can
//! hold several frames, so a run of large frames leaves in large writes. Readiness
//! comes from tokio, so it never blocks a worker thread.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
};

use std::os::fd::AsRawFd;

use nix::{
    fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags},
    sys::socket::{sendmsg, MsgFlags},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

/// A pipe used as the in-kernel buffer between two sockets. It may hold several
/// frames at once, so the destination gets one large write instead of one per frame.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    /// Bytes in the pipe not yet moved to the destination.
    held: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Self> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        // A larger pipe means fewer splice calls per megabyte; fall back to the
        // default if the system limit is lower.
        let capacity = fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(1 << 20)).map(|c| c as usize).unwrap_or(64 * 1024);
        Ok(Self { read, write, capacity, held: 0 })
    }

    /// Move exactly `len` bytes from `from` into the pipe, emptying it into `to`
    /// whenever it is full.
    pub async fn fill(&mut self, from: &TcpStream, to: &TcpStream, mut len: usize) -> io::Result<()> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MORE;
        while len > 0 {
            if self.held >= self.capacity {
                self.drain(to).await?;
            }
            let want = len.min(self.capacity - self.held);
            let held = self.held;
            let moved = loop {
                from.readable().await?;
                let r = from.try_io(Interest::READABLE, || match splice(from.as_fd(), None, self.write.as_fd(), None, want, flags) {
                    // EAGAIN means "socket empty" only when the pipe is empty too;
                    // otherwise the pipe may be full (it counts pages, not bytes), and
                    // reporting WouldBlock would clear the socket's readiness while
                    // its data waits: the relay would hang.
                    Err(nix::errno::Errno::EAGAIN) if held > 0 => Err(io::Error::other(PipeFull)),
                    r => r.map_err(io::Error::from),
                });
                match r {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => break n,
                    Err(e) if would_block(&e) => continue,
                    Err(e) if e.get_ref().is_some_and(|i| i.is::<PipeFull>()) => {
                        self.drain(to).await?;
                        break 0;
                    }
                    Err(e) => return Err(e),
                }
            };
            self.held += moved;
            len -= moved;
        }
        Ok(())
    }

    /// Put a few bytes (a frame header) into the pipe, behind what it holds.
    pub async fn push(&mut self, to: &TcpStream, bytes: &[u8]) -> io::Result<()> {
        if self.held + bytes.len() > self.capacity {
            self.drain(to).await?;
        }
        let n = match nix::unistd::write(&self.write, bytes) {
            // Full (in pages): empty it; then the write cannot fail for lack of room.
            Err(nix::errno::Errno::EAGAIN) => {
                self.drain(to).await?;
                nix::unistd::write(&self.write, bytes).map_err(io::Error::from)?
            }
            r => r.map_err(io::Error::from)?,
        };
        // Writes up to PIPE_BUF are atomic: all or nothing.
        if n != bytes.len() {
            return Err(io::Error::other("short write into the splice pipe"));
        }
        self.held += n;
        Ok(())
    }

    /// Move everything the pipe holds to `to`.
    pub async fn drain(&mut self, to: &TcpStream) -> io::Result<()> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        while self.held > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || splice(self.read.as_fd(), None, to.as_fd(), None, self.held, flags).map_err(io::Error::from)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.held -= n,
                Err(e) if would_block(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The pipe, not the socket, had no room.
#[derive(Debug)]
struct PipeFull;

impl std::fmt::Display for PipeFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("splice pipe full")
    }
}

impl std::error::Error for PipeFull {}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Read up to `buf.len()` bytes that have already arrived, without waiting: 0 when
/// nothing is there (or the peer closed; the relay's next read tells which).
pub fn try_read_now(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    match from.try_read(buf) {
        Ok(n) => Ok(n),
        Err(e) if would_block(&e) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Send `parts` with MSG_MORE: the kernel holds a short write back to join it with
/// what follows (the spliced body of the same frame) instead of sending a tiny segment.
pub async fn send_more(to: &TcpStream, parts: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // nix 0.29 has no MSG_MORE constant; the bit comes from libc.
    let flags = MsgFlags::from_bits_retain(libc::MSG_MORE) | MsgFlags::MSG_NOSIGNAL;
    loop {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || sendmsg::<()>(to.as_raw_fd(), parts, &[], flags, None).map_err(io::Error::from)) {
            Ok(n) => return Ok(n),
            Err(e) if would_block(&e) => continue,
            Err(e) => return Err(e),
        }
    }
}

//! The established session's loop: read whatever either side sent, split it into
//! frames, run each through the pipeline, and write the survivors to the other side.
//!
//! One task owns both connections; reads are cancel-safe and writes happen between
//! reads, so a slow side applies back-pressure instead of growing buffers. Memory per
//! session is two read buffers, two write buffers and at most one whole message per
//! direction (bounded by `max_message_bytes`); results stream through frame by frame.

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    stage::{Action, Direction, Pipeline},
    Session,
};
use crate::{
    net::{
        conn::Conn,
        splice::{self, Pipe},
    },
    pg::{msg::tag, Decoder, FrameError, Item, PgError, SqlState},
};

/// Read buffer growth step.
const READ_CHUNK: usize = 256 * 1024;
/// Frames above this size are streamed when no stage needs them whole (and, between
/// plain TCP sockets, spliced without passing through the agent's memory).
const STREAM_THRESHOLD: usize = 32 * 1024;

/// The rest of a streamed frame to move zero-copy before decoding resumes.
type PendingSplice = Option<(Direction, usize)>;

/// Why the relay ended.
#[derive(Debug)]
pub enum End {
    /// The client sent Terminate or closed.
    ClientClosed,
    /// The database closed the connection.
    ServerClosed,
    /// A stage refused something; the client was told.
    Refused(PgError),
    /// A side sent something that is not PostgreSQL protocol.
    ClientProtocol(FrameError),
    ServerProtocol(FrameError),
    Io(std::io::Error),
    /// The agent is stopping.
    Shutdown,
}

pub struct Relay<'a> {
    pub session: &'a Session,
    pub pipeline: &'a mut Pipeline,
    pub max_message_bytes: usize,
}

impl Relay<'_> {
    /// Run until either side ends the session. `client_buf` / `server_buf` may hold
    /// bytes read during startup.
    pub async fn run(
        &mut self,
        client: &mut Conn,
        server: &mut Conn,
        mut client_buf: BytesMut,
        mut server_buf: BytesMut,
        mut shutdown: tokio::sync::watch::Receiver<super::Phase>,
    ) -> End {
        // Registered once, not per loop iteration: it only fires at the drain deadline.
        let terminate = async move {
            loop {
                if shutdown.changed().await.is_err() {
                    // The agent dropped the sender: no deadline will ever come.
                    std::future::pending::<()>().await;
                }
                if *shutdown.borrow_and_update() == super::Phase::Terminate {
                    return;
                }
            }
        };
        tokio::pin!(terminate);
        let mut cdec = Decoder::new(STREAM_THRESHOLD, self.max_message_bytes);
        let mut sdec = Decoder::new(STREAM_THRESHOLD, self.max_message_bytes);
        let mut to_server = Outbox::default();
        let mut to_client = Outbox::default();
        let mut terminated = false;
        let splice_ok = !client.is_tls() && !server.is_tls();
        let mut pending: PendingSplice = None;
        let mut pipe: Option<Pipe> = None;
        loop {
            // Process what is buffered before reading more (startup may have left bytes).
            let more_frontend =
                match self.frontend(&mut cdec, &mut client_buf, &mut to_server, &mut to_client, &mut terminated, splice_ok.then_some(&mut pending)) {
                    Ok(more) => more,
                    Err(end) => {
                        let _ = flush(client, &mut to_client).await;
                        let _ = server.write_all(crate::pg::msg::terminate().as_bytes()).await;
                        return end;
                    }
                };
            let more_backend =
                match self.backend(&mut sdec, &mut server_buf, &mut to_client, if splice_ok && pending.is_none() { Some(&mut pending) } else { None }) {
                    Ok(more) => more,
                    Err(end) => {
                        let _ = flush(client, &mut to_client).await;
                        return end;
                    }
                };
            if let Err(e) = flush(server, &mut to_server).await {
                return End::Io(e);
            }
            if let Err(e) = flush(client, &mut to_client).await {
                return End::Io(e);
            }
            if terminated {
                return End::ClientClosed;
            }
            if let Some((direction, len)) = pending.take() {
                if pipe.is_none() {
                    match Pipe::new() {
                        Ok(p) => pipe = Some(p),
                        Err(e) => return End::Io(e),
                    }
                }
                let pipe = pipe.as_ref().expect("invariant: created above");
                let moved = match direction {
                    Direction::Frontend => splice::forward(client.tcp(), server.tcp(), pipe, len).await,
                    Direction::Backend => splice::forward(server.tcp(), client.tcp(), pipe, len).await,
                };
                if let Err(e) = moved {
                    return End::Io(e);
                }
                continue;
            }
            if more_frontend || more_backend {
                // Stopped early to bound the write buffers; decode the rest first.
                continue;
            }
            reserve(&mut client_buf);
            reserve(&mut server_buf);
            tokio::select! {
                r = client.read_buf(&mut client_buf) => match r {
                    Ok(0) => {
                        // Closed without Terminate: tell the database the session is over.
                        let _ = server.write_all(crate::pg::msg::terminate().as_bytes()).await;
                        return End::ClientClosed;
                    }
                    Ok(_) => {}
                    Err(e) => return End::Io(e),
                },
                r = server.read_buf(&mut server_buf) => match r {
                    Ok(0) => return End::ServerClosed,
                    Ok(_) => {}
                    Err(e) => return End::Io(e),
                },
                _ = &mut terminate => {
                    let err = PgError::fatal(SqlState::ADMIN_SHUTDOWN, "phigate is shutting down; reconnect to continue");
                    let _ = client.write_all(err.to_frame().as_bytes()).await;
                    let _ = server.write_all(crate::pg::msg::terminate().as_bytes()).await;
                    return End::Shutdown;
                }
            }
        }
    }

    /// Decode and judge client frames. `Ok(true)`: stopped early to bound `out`.
    fn frontend(
        &mut self,
        dec: &mut Decoder,
        buf: &mut BytesMut,
        out: &mut Outbox,
        to_client: &mut Outbox,
        terminated: &mut bool,
        mut splice: Option<&mut PendingSplice>,
    ) -> Result<bool, End> {
        loop {
            let pipeline = &*self.pipeline;
            let item = match dec.decode(buf, |t| pipeline.needs_whole(Direction::Frontend, t)) {
                Ok(Some(i)) => i,
                Ok(None) => return Ok(false),
                Err(e) => {
                    let err = PgError::fatal(SqlState::PROTOCOL_VIOLATION, format!("phigate closed the session: the client sent an invalid message: {e}"));
                    to_client.push(err.to_frame().into_bytes());
                    return Err(End::ClientProtocol(e));
                }
            };
            match item {
                Item::Whole(frame) => match self.pipeline.frontend(self.session, &frame) {
                    Action::Forward => {
                        let tag = frame.tag();
                        out.push(frame.into_bytes());
                        if tag == tag::TERMINATE {
                            *terminated = true;
                            return Ok(false);
                        }
                    }
                    Action::Refuse(err) => {
                        to_client.push(err.to_frame().into_bytes());
                        return Err(End::Refused(err));
                    }
                },
                Item::StreamStart { tag, total, chunk } => {
                    self.pipeline.streamed(self.session, Direction::Frontend, tag, total);
                    out.push(chunk);
                    if let Some(pending) = splice.as_deref_mut() {
                        if dec.is_streaming() {
                            // The buffer is exhausted: the rest of this frame is still in
                            // the socket and goes straight to the database.
                            *pending = Some((Direction::Frontend, dec.take_stream()));
                            return Ok(false);
                        }
                    }
                }
                Item::StreamChunk { chunk, .. } => out.push(chunk),
            }
            // Bound the write buffer: let the caller flush before decoding more.
            if out.len() >= READ_CHUNK * 4 {
                return Ok(true);
            }
        }
    }

    /// Decode and judge database frames. `Ok(true)`: stopped early to bound `out`.
    fn backend(&mut self, dec: &mut Decoder, buf: &mut BytesMut, out: &mut Outbox, mut splice: Option<&mut PendingSplice>) -> Result<bool, End> {
        loop {
            let pipeline = &*self.pipeline;
            let item = match dec.decode(buf, |t| pipeline.needs_whole(Direction::Backend, t)) {
                Ok(Some(i)) => i,
                Ok(None) => return Ok(false),
                Err(e) => {
                    let err = PgError::fatal(SqlState::PROTOCOL_VIOLATION, format!("phigate closed the session: the database sent an invalid message: {e}"));
                    out.push(err.to_frame().into_bytes());
                    return Err(End::ServerProtocol(e));
                }
            };
            match item {
                Item::Whole(frame) => match self.pipeline.backend(self.session, &frame) {
                    Action::Forward => out.push(frame.into_bytes()),
                    Action::Refuse(err) => {
                        // Fail closed: whatever this message carried is not released.
                        out.push(err.to_frame().into_bytes());
                        return Err(End::Refused(err));
                    }
                },
                Item::StreamStart { tag, total, chunk } => {
                    self.pipeline.streamed(self.session, Direction::Backend, tag, total);
                    out.push(chunk);
                    if let Some(pending) = splice.as_deref_mut() {
                        if dec.is_streaming() {
                            *pending = Some((Direction::Backend, dec.take_stream()));
                            return Ok(false);
                        }
                    }
                }
                Item::StreamChunk { chunk, .. } => out.push(chunk),
            }
            if out.len() >= READ_CHUNK * 4 {
                return Ok(true);
            }
        }
    }
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// Frames waiting to be written, kept as the `Bytes` slices they arrived in (or were
/// rewritten to) and written with one vectored write: no copy into a staging buffer.
#[derive(Default)]
pub struct Outbox {
    parts: std::collections::VecDeque<Bytes>,
    len: usize,
}

impl Outbox {
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.parts.push_back(b);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Buffers per vectored write (on the stack; more parts take more calls).
const MAX_IOV: usize = 64;

async fn flush(conn: &mut Conn, out: &mut Outbox) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    while !out.parts.is_empty() {
        let n = {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut count = 0;
            for (slot, part) in slices.iter_mut().zip(out.parts.iter()) {
                *slot = IoSlice::new(part);
                count += 1;
            }
            conn.write_vectored(&slices[..count]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        out.len -= n;
        let mut left = n;
        while left > 0 {
            let front = out.parts.front_mut().expect("invariant: written bytes come from queued parts");
            if front.len() <= left {
                left -= front.len();
                out.parts.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }
    // TLS streams hold written data in the session until flushed.
    conn.flush().await
}

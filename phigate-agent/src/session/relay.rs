//! The established session's loop: read whatever either side sent, split it into
//! frames, run each through the pipeline, and write the survivors to the other side.
//!
//! One task owns both connections; reads are cancel-safe and writes happen between
//! reads, so a slow side applies back-pressure instead of growing buffers. Memory per
//! session is two read buffers, the frames of one read in flight, and at most one whole
//! message per direction (bounded by `max_message_bytes`); results stream through frame
//! by frame, and the body of a large message no stage needs whole is forwarded in
//! pieces as it arrives, never assembled.
//!
//! Data is copied through the agent's buffers rather than spliced kernel to kernel:
//! on the 2-core build machine splice(2) through a pipe (header read, header write
//! and 2–3 splices per 64 KiB message) moved COPY data at 0.9–1.0 GB/s where plain
//! reads of up to 256 KiB and vectored writes moved 1.3 GB/s (`cargo xtask bench
//! redirect`).
//!
//! When a stage refuses a client message, the relay answers in the protocol's own
//! terms so the connection stays usable: a simple Query or FunctionCall gets
//! ErrorResponse + ReadyForQuery; an extended-protocol message puts the session into
//! "skip until Sync" exactly as PostgreSQL does after an error. Answers phigate makes
//! up are ordered after whatever the server still owes the client ([`Sequencer`]).
//! When a stage holds a message (approval), client input pauses; server output keeps
//! flowing.

use std::{collections::VecDeque, future::Future, io::IoSlice, pin::Pin};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    stage::{Action, Backend, BackendStop, Direction, HeldBackend, Pipeline},
    Session,
};
use crate::{
    net::conn::Conn,
    pg::{
        flow::{Flow, Request},
        msg,
        msg::tag,
        Decoder, Frame, FrameError, Item, PgError, SqlState,
    },
};

/// Read buffer growth step.
const READ_CHUNK: usize = 256 * 1024;
/// Frames above this size are streamed when no stage needs them whole.
const STREAM_THRESHOLD: usize = 32 * 1024;

/// A stage's pending decision about a held client message.
pub type HoldFuture = Pin<Box<dyn Future<Output = Result<(), PgError>> + Send>>;

/// Why the relay ended.
#[derive(Debug)]
pub enum End {
    /// The client sent Terminate or closed.
    ClientClosed,
    /// The database closed the connection.
    ServerClosed,
    /// A stage refused something that cannot be refused in place; the client was told.
    Refused(PgError),
    /// A side sent something that is not PostgreSQL protocol.
    ClientProtocol(FrameError),
    ServerProtocol(FrameError),
    Io(std::io::Error),
    /// The agent's drain deadline passed.
    Shutdown,
}

/// Keeps phigate's own answers in protocol order. Every Query, FunctionCall and Sync
/// forwarded makes the server owe one ReadyForQuery; an answer phigate makes up is
/// released once the server has paid what it owed before it.
#[derive(Default)]
pub struct Sequencer {
    /// ReadyForQuery messages the server owes for what was forwarded.
    expected: u64,
    /// ReadyForQuery messages the server has sent.
    seen: u64,
    /// The transaction status of the latest ReadyForQuery.
    status: u8,
    /// (ReadyForQuery index, before it?, frames)
    injections: VecDeque<(u64, bool, Vec<Bytes>)>,
    /// An extended-protocol message was refused: drop client messages until Sync.
    /// Holds the error while it still has to be sent (it is sent at once when
    /// nothing of the batch reached the server, so a client that Flushes and waits
    /// sees it, as with PostgreSQL).
    skip: Option<Option<PgError>>,
    /// Something of the current extended-protocol batch reached the server.
    batch_forwarded: bool,
    /// The rest of a large client message discarded while skipping to Sync.
    dropping_stream: bool,
    /// A server message larger than one read is being streamed to the client: what
    /// phigate says meanwhile (a held statement's notice, a refusal) waits here until
    /// its last byte is out, or it would land inside that message.
    mid_stream: Option<Vec<Bytes>>,
    /// The protocol's shape as the server sees it, for COPY FROM STDIN: inside one
    /// the server ignores Sync (no ReadyForQuery is owed) and must get nothing but
    /// COPY messages ([`Relay::copy_gate`]).
    flow: Flow,
}

impl Sequencer {
    fn forwarded(&mut self, t: u8) {
        let copy_in = self.flow.copy_in();
        self.flow.frontend(Request::of_tag(t));
        if copy_in {
            // Read by the server as part of the COPY.
            return;
        }
        match t {
            tag::QUERY | tag::FUNCTION_CALL => self.expected += 1,
            tag::SYNC => {
                self.expected += 1;
                self.batch_forwarded = false;
            }
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE => self.batch_forwarded = true,
            _ => {}
        }
    }

    /// Send phigate's own messages now: between two server messages, never inside one.
    fn say(&mut self, frames: Vec<Bytes>, to_client: &mut Outbox) {
        match &mut self.mid_stream {
            Some(waiting) => waiting.extend(frames),
            None => {
                for f in frames {
                    to_client.push(f);
                }
            }
        }
    }

    /// A server message is streamed: `done` once its last byte is queued for the client.
    fn streaming(&mut self, done: bool, to_client: &mut Outbox) {
        if !done {
            self.mid_stream.get_or_insert_with(Vec::new);
        } else if let Some(waiting) = self.mid_stream.take() {
            for f in waiting {
                to_client.push(f);
            }
        }
    }

    /// Answer with `frames` as soon as the server has caught up.
    fn respond(&mut self, frames: Vec<Bytes>, to_client: &mut Outbox) {
        if self.expected == self.seen {
            self.say(frames, to_client);
        } else {
            self.injections.push_back((self.expected, false, frames));
        }
    }

    /// The error answer to a refused Query/FunctionCall/batch: ErrorResponse, then
    /// ReadyForQuery with the server's current transaction status.
    fn refusal(&self, err: &PgError) -> Vec<Bytes> {
        vec![err.to_frame().into_bytes(), self.ready()]
    }

    /// A ReadyForQuery of phigate's own, with the server's current transaction status.
    fn ready(&self) -> Bytes {
        msg::ready_for_query(if self.status == 0 { b'I' } else { self.status }).into_bytes()
    }

    /// A server ReadyForQuery is about to be forwarded.
    fn on_ready(&mut self, rfq: Frame, out: &mut Outbox) {
        self.seen += 1;
        self.status = rfq.body().first().copied().unwrap_or(b'I');
        while let Some(pos) = self.injections.iter().position(|(i, before, _)| *i == self.seen && *before) {
            let (_, _, frames) = self.injections.remove(pos).expect("invariant: position is valid");
            for f in frames {
                out.push(f);
            }
        }
        out.push(rfq.into_bytes());
        while let Some(pos) = self.injections.iter().position(|(i, before, _)| *i == self.seen && !*before) {
            let (_, _, frames) = self.injections.remove(pos).expect("invariant: position is valid");
            for f in frames {
                out.push(f);
            }
        }
    }
}

/// Frames waiting to be written, kept as the `Bytes` slices they arrived in (or were
/// rewritten to) and written with one vectored write: no copy into a staging buffer.
#[derive(Default)]
pub struct Outbox {
    parts: VecDeque<Bytes>,
    /// Small messages copied end to end, sealed into `parts` before a write or a large
    /// part: a result of short rows then goes out in writes of tens of kilobytes, not
    /// one iovec (and at most [`MAX_IOV`] rows per system call) per row.
    tail: BytesMut,
    len: usize,
}

/// Messages shorter than this are copied into the outbox's tail; longer ones are
/// queued as they are (copying them would cost more than the iovec they take).
const COALESCE_BELOW: usize = 2048;
/// How much the tail allocates at a time.
const TAIL_CHUNK: usize = 64 * 1024;

impl Outbox {
    pub fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.len += b.len();
        if b.len() < COALESCE_BELOW {
            if self.tail.capacity() - self.tail.len() < b.len() {
                self.seal_tail();
                self.tail.reserve(TAIL_CHUNK);
            }
            self.tail.extend_from_slice(&b);
        } else {
            self.seal_tail();
            self.parts.push_back(b);
        }
    }

    /// Queue what the tail holds as one part.
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.parts.push_back(self.tail.split().freeze());
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A client message waiting for a stage's decision.
struct Held {
    frame: Frame,
    stage: usize,
    decision: HoldFuture,
}

pub struct Relay<'a> {
    pub session: &'a Session,
    pub pipeline: &'a mut Pipeline,
    pub max_message_bytes: usize,
}

/// What decoding one side produced besides frames.
enum Step {
    /// Input exhausted (or paused for a hold).
    Idle,
    /// Stopped early to bound the write buffer.
    More,
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
        let mut seq = Sequencer::default();
        let mut held: Option<Held> = None;
        // A database message a stage holds (masking waits for the catalog, the audit
        // for its record to be durable).
        let mut held_backend: Option<HeldBackend> = None;
        let mut terminated = false;
        loop {
            let mut more = false;
            if held.is_none() {
                match self.frontend(&mut cdec, &mut client_buf, &mut to_server, &mut to_client, &mut seq, &mut held, &mut terminated) {
                    Ok(Step::More) => more = true,
                    Ok(Step::Idle) => {}
                    Err(end) => {
                        let _ = flush(client, &mut to_client).await;
                        let _ = server.write_all(msg::terminate().as_bytes()).await;
                        return end;
                    }
                }
            }
            match self.backend(&mut sdec, &mut server_buf, &mut to_client, &mut seq, &mut held_backend) {
                Ok(Step::More) => more = true,
                Ok(Step::Idle) => {}
                Err(end) => {
                    let _ = flush(client, &mut to_client).await;
                    return end;
                }
            }
            if let Err(e) = flush(server, &mut to_server).await {
                return End::Io(e);
            }
            if let Err(e) = flush(client, &mut to_client).await {
                return End::Io(e);
            }
            if terminated {
                return End::ClientClosed;
            }
            if more {
                continue;
            }
            reserve(&mut client_buf);
            reserve(&mut server_buf);
            // While a message is held, keep reading the client only up to a bound: it
            // is waiting for an answer and has no reason to send much more.
            let read_client = held.is_none() || client_buf.len() < self.max_message_bytes;
            let read_server = held_backend.is_none() || server_buf.len() < self.max_message_bytes;
            tokio::select! {
                r = client.read_buf(&mut client_buf), if read_client => match r {
                    Ok(0) => {
                        // Closed without Terminate: tell the database the session is over.
                        let _ = server.write_all(msg::terminate().as_bytes()).await;
                        return End::ClientClosed;
                    }
                    Ok(_) => {}
                    Err(e) => return End::Io(e),
                },
                r = server.read_buf(&mut server_buf), if read_server => match r {
                    Ok(0) => return End::ServerClosed,
                    Ok(_) => {}
                    Err(e) => return End::Io(e),
                },
                decided = async { (&mut held.as_mut().expect("guarded by the condition").decision).await }, if held.is_some() => {
                    let h = held.take().expect("invariant: polled only when present");
                    let action = match decided {
                        Ok(()) => self.pipeline.frontend_from(h.stage + 1, self.session, &h.frame),
                        Err(e) => (Action::Refuse(e), h.stage),
                    };
                    if let Err(end) = self.apply_frontend(action, h.frame, &mut to_server, &mut to_client, &mut seq, &mut held, &mut terminated) {
                        let _ = flush(client, &mut to_client).await;
                        let _ = server.write_all(msg::terminate().as_bytes()).await;
                        return end;
                    }
                }
                _ = async { (&mut held_backend.as_mut().expect("guarded by the condition").decision).await }, if held_backend.is_some() => {
                    let h = held_backend.take().expect("invariant: polled only when present");
                    // The holding stage sees the message again, now that what it
                    // waited for is there; the messages queued behind it follow.
                    let result = self.pipeline.backend_resume(self.session, h.resume());
                    if let Err(end) = apply_backend(result, &mut to_client, &mut seq, &mut held_backend) {
                        let _ = flush(client, &mut to_client).await;
                        return end;
                    }
                }
                _ = &mut terminate => {
                    let err = PgError::fatal(SqlState::ADMIN_SHUTDOWN, "phigate is shutting down; reconnect to continue");
                    let _ = client.write_all(err.to_frame().as_bytes()).await;
                    let _ = server.write_all(msg::terminate().as_bytes()).await;
                    return End::Shutdown;
                }
            }
        }
    }

    /// Act on a stage decision about a whole client frame.
    #[allow(clippy::too_many_arguments, reason = "the relay's state, passed explicitly rather than hidden in a struct")]
    fn apply_frontend(
        &mut self,
        (action, stage): (Action, usize),
        frame: Frame,
        out: &mut Outbox,
        to_client: &mut Outbox,
        seq: &mut Sequencer,
        held: &mut Option<Held>,
        terminated: &mut bool,
    ) -> Result<(), End> {
        let t = frame.tag();
        match action {
            Action::Forward => {
                seq.forwarded(t);
                out.push(frame.into_bytes());
                if t == tag::TERMINATE {
                    *terminated = true;
                }
            }
            Action::Refuse(err) => match t {
                tag::QUERY | tag::FUNCTION_CALL => {
                    let frames = seq.refusal(&err);
                    seq.respond(frames, to_client);
                }
                tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE | tag::FLUSH => {
                    if seq.batch_forwarded {
                        // The server still owes answers to earlier parts of the batch
                        // (it sends them at Sync or Flush): the error goes after them,
                        // just before its ReadyForQuery.
                        seq.skip = Some(Some(err));
                    } else {
                        seq.respond(vec![err.to_frame().into_bytes()], to_client);
                        seq.skip = Some(None);
                    }
                }
                _ => {
                    // Nothing protocol-correct to answer (e.g. mid-COPY): fail closed.
                    to_client.push(PgError { severity: crate::pg::error::Severity::Fatal, ..err.clone() }.to_frame().into_bytes());
                    return Err(End::Refused(err));
                }
            },
            Action::Hold(decision, notice) => {
                if let Some(n) = notice {
                    seq.say(vec![n.to_frame().into_bytes()], to_client);
                }
                *held = Some(Held { frame, stage, decision });
            }
            Action::Replace(parts) => {
                for p in parts {
                    if let Some(&pt) = p.first() {
                        seq.forwarded(pt);
                        *terminated |= pt == tag::TERMINATE;
                    }
                    out.push(p);
                }
            }
        }
        Ok(())
    }

    /// Decode and judge client frames.
    #[allow(clippy::too_many_arguments, reason = "the relay's state, passed explicitly rather than hidden in a struct")]
    fn frontend(
        &mut self,
        dec: &mut Decoder,
        buf: &mut BytesMut,
        out: &mut Outbox,
        to_client: &mut Outbox,
        seq: &mut Sequencer,
        held: &mut Option<Held>,
        terminated: &mut bool,
    ) -> Result<Step, End> {
        loop {
            if held.is_some() || *terminated {
                return Ok(Step::Idle);
            }
            let pipeline = &*self.pipeline;
            let item = match dec.decode(buf, |t| pipeline.needs_whole(Direction::Frontend, t)) {
                Ok(Some(i)) => i,
                Ok(None) => return Ok(Step::Idle),
                Err(e) => {
                    let err = PgError::fatal(SqlState::PROTOCOL_VIOLATION, format!("phigate closed the session: the client sent an invalid message: {e}"));
                    to_client.push(err.to_frame().into_bytes());
                    return Err(End::ClientProtocol(e));
                }
            };
            let t = match &item {
                Item::Whole(frame) => Some(frame.tag()),
                Item::StreamStart { tag, .. } => Some(*tag),
                Item::StreamChunk { .. } => None,
            };
            if t == Some(tag::PASSWORD) {
                // Authentication ended at startup (phigate did it); a password message
                // now is one PostgreSQL would end the session for, and the client's
                // password or token never goes to the database.
                let err = PgError::fatal(
                    SqlState::PROTOCOL_VIOLATION,
                    "phigate closed the session: the client sent a password message after login (authentication is over; its content is never passed to the database)",
                );
                to_client.push(err.to_frame().into_bytes());
                return Err(End::Refused(err));
            }
            if let Some(t) = t {
                match copy_gate(seq, t) {
                    Gate::Pass => {}
                    Gate::Drop => continue,
                    Gate::Refuse(err) => {
                        to_client.push(err.to_frame().into_bytes());
                        return Err(End::Refused(err));
                    }
                }
            }
            match item {
                Item::Whole(frame) => {
                    if let Some(pending) = seq.skip.take() {
                        // After a refused extended-protocol message everything up to
                        // Sync is discarded, as PostgreSQL does after an error.
                        if frame.tag() != tag::SYNC {
                            seq.skip = Some(pending);
                            continue;
                        }
                        if seq.batch_forwarded {
                            // Earlier parts of the batch reached the server: let it
                            // answer them, and put the error before its ReadyForQuery.
                            // The stages see this Sync go (they follow which batch
                            // each answer ends); none of them acts on a Sync.
                            let _ = self.pipeline.frontend(self.session, &frame);
                            seq.forwarded(tag::SYNC);
                            let err = pending.map(|e| vec![e.to_frame().into_bytes()]).unwrap_or_default();
                            seq.injections.push_back((seq.expected, true, err));
                            out.push(frame.into_bytes());
                        } else {
                            let frames = pending.map(|e| seq.refusal(&e)).unwrap_or_else(|| vec![seq.ready()]);
                            seq.respond(frames, to_client);
                        }
                        continue;
                    }
                    let action = match msg::request_of(&frame) {
                        // Refused, never forwarded: the server would answer it with an
                        // error, but the stages could not tell what it was, and their
                        // view of whose answer is whose would slip by one.
                        Err(e) => (Action::Refuse(PgError::error(SqlState::PROTOCOL_VIOLATION, format!("phigate refused a malformed message: {e}"))), 0),
                        Ok(_) => self.pipeline.frontend(self.session, &frame),
                    };
                    self.apply_frontend(action, frame, out, to_client, seq, held, terminated)?;
                }
                Item::StreamStart { tag, total, chunk } => {
                    if seq.skip.is_some() {
                        // Discarded up to Sync like a whole message (Sync is never
                        // this large, so the skip goes on), with the chunks still to
                        // come, if any.
                        seq.dropping_stream = chunk.len() < total;
                        continue;
                    }
                    self.pipeline.streamed(self.session, Direction::Frontend, tag, total);
                    seq.forwarded(tag);
                    out.push(chunk);
                }
                Item::StreamChunk { chunk, last } => {
                    if seq.dropping_stream {
                        seq.dropping_stream = !last;
                    } else {
                        out.push(chunk);
                    }
                }
            }
            // Bound the write buffer: let the caller flush before decoding more.
            if out.len() >= READ_CHUNK * 4 {
                return Ok(Step::More);
            }
        }
    }

    /// Decode and judge database frames.
    fn backend(&mut self, dec: &mut Decoder, buf: &mut BytesMut, out: &mut Outbox, seq: &mut Sequencer, held: &mut Option<HeldBackend>) -> Result<Step, End> {
        loop {
            if held.is_some() {
                return Ok(Step::Idle);
            }
            let pipeline = &*self.pipeline;
            let item = match dec.decode(buf, |t| pipeline.needs_whole(Direction::Backend, t)) {
                Ok(Some(i)) => i,
                Ok(None) => return Ok(Step::Idle),
                Err(e) => {
                    let err = PgError::fatal(SqlState::PROTOCOL_VIOLATION, format!("phigate closed the session: the database sent an invalid message: {e}"));
                    out.push(err.to_frame().into_bytes());
                    return Err(End::ServerProtocol(e));
                }
            };
            let t = match &item {
                Item::Whole(frame) => Some(frame.tag()),
                Item::StreamStart { tag, .. } => Some(*tag),
                Item::StreamChunk { .. } => None,
            };
            if let Some(t) = t {
                if !seq.flow.observe(t) {
                    let err = PgError::fatal(
                        SqlState::PROTOCOL_VIOLATION,
                        "phigate closed the session: messages were sent behind COPY FROM STDIN before the server started the COPY; send COPY data only after the server's CopyInResponse",
                    );
                    out.push(err.to_frame().into_bytes());
                    return Err(End::Refused(err));
                }
                // Syncs the server ignored inside the COPY owe no ReadyForQuery.
                seq.expected -= seq.flow.take_ignored_syncs();
            }
            match item {
                Item::Whole(frame) => {
                    let result = self.pipeline.backend(self.session, frame);
                    apply_backend(result, out, seq, held)?;
                }
                Item::StreamStart { tag, total, chunk } => {
                    self.pipeline.streamed(self.session, Direction::Backend, tag, total);
                    let done = chunk.len() == total;
                    out.push(chunk);
                    seq.streaming(done, out);
                }
                Item::StreamChunk { chunk, last } => {
                    out.push(chunk);
                    seq.streaming(last, out);
                }
            }
            if out.len() >= READ_CHUNK * 4 {
                return Ok(Step::More);
            }
        }
    }
}

/// What the relay does with a client message, given the COPY state.
enum Gate {
    Pass,
    /// Sync or Flush inside COPY FROM STDIN: the server would ignore it, and not
    /// forwarding it keeps a ReadyForQuery from appearing if the COPY already failed.
    Drop,
    Refuse(PgError),
}

/// Inside COPY FROM STDIN only COPY messages (and Terminate) go to the server. Any
/// other message would end the COPY with an error and be consumed — or, if the COPY
/// already failed, be executed — and which one depends on the data, which phigate cannot judge,
/// so the stages could no longer tell whose answer is whose.
fn copy_gate(seq: &Sequencer, t: u8) -> Gate {
    if !seq.flow.copy_in() {
        return Gate::Pass;
    }
    match t {
        tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL | tag::TERMINATE => Gate::Pass,
        tag::SYNC | tag::FLUSH => Gate::Drop,
        other => Gate::Refuse(PgError::fatal(
            SqlState::PROTOCOL_VIOLATION,
            format!(
                "phigate closed the session: the client sent a message of type '{}' inside COPY FROM STDIN; end the COPY with CopyDone or CopyFail first",
                (other as char).escape_default()
            ),
        )),
    }
}

/// Send what the stages let through and act on what stopped them.
fn apply_backend(result: Backend, out: &mut Outbox, seq: &mut Sequencer, held: &mut Option<HeldBackend>) -> Result<(), End> {
    for p in result.out {
        if p.first() == Some(&tag::READY_FOR_QUERY) {
            seq.on_ready(Frame::from_bytes(p), out);
        } else {
            out.push(p);
        }
    }
    match result.stop {
        None => {}
        Some(BackendStop::Refuse(err)) => {
            // Fail closed: whatever this message carried is not released.
            out.push(PgError { severity: crate::pg::error::Severity::Fatal, ..err.clone() }.to_frame().into_bytes());
            return Err(End::Refused(err));
        }
        Some(BackendStop::Hold(h)) => {
            if let Some(n) = &h.notice {
                out.push(n.to_frame().into_bytes());
            }
            *held = Some(h);
        }
    }
    Ok(())
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// Buffers per vectored write (on the stack; more parts take more calls).
const MAX_IOV: usize = 64;

/// Write everything queued.
async fn flush(conn: &mut Conn, out: &mut Outbox) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    out.seal_tail();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The type of each message queued, in order (small ones share a part).
    fn tags(out: &Outbox) -> String {
        let mut bytes: BytesMut = out.parts.iter().flat_map(|p| p.iter()).chain(out.tail.iter()).copied().collect();
        let mut decoder = Decoder::new(usize::MAX, usize::MAX);
        let mut tags = String::new();
        while let Some(item) = decoder.decode(&mut bytes, |_| true).expect("the outbox holds valid frames") {
            match item {
                Item::Whole(f) => tags.push(f.tag() as char),
                other => panic!("a whole frame was expected, got {other:?}"),
            }
        }
        assert!(bytes.is_empty(), "the outbox holds whole messages");
        tags
    }

    #[test]
    fn small_messages_share_a_part_and_large_ones_keep_their_place() {
        let mut out = Outbox::default();
        for _ in 0..100 {
            out.push(Frame::build(b'D', &[7; 100]).into_bytes());
        }
        out.push(Frame::build(b'd', &[1; COALESCE_BELOW]).into_bytes());
        out.push(Frame::build(b'C', b"SELECT 100\0").into_bytes());
        out.seal_tail();
        assert_eq!(out.parts.len(), 3, "100 rows in one part, the large message, the rest");
        assert_eq!(out.len(), out.parts.iter().map(Bytes::len).sum::<usize>());
        assert_eq!(tags(&out), format!("{}dC", "D".repeat(100)));
    }

    #[test]
    fn refusal_waits_for_what_the_server_owes() {
        let mut seq = Sequencer::default();
        let mut client = Outbox::default();
        // Query 1 forwarded; Query 2 refused before the server answered Query 1.
        seq.forwarded(tag::QUERY);
        let frames = seq.refusal(&PgError::error(SqlState::INSUFFICIENT_PRIVILEGE, "no"));
        seq.respond(frames, &mut client);
        assert!(client.is_empty(), "held back until the server answers query 1");
        client.push(Frame::build(b'T', b"").into_bytes());
        seq.on_ready(msg::ready_for_query(b'I'), &mut client);
        assert_eq!(tags(&client), "TZEZ", "server's answer, then phigate's");
        // Nothing owed: answered at once.
        let mut client = Outbox::default();
        let frames = seq.refusal(&PgError::error(SqlState::INSUFFICIENT_PRIVILEGE, "no"));
        seq.respond(frames, &mut client);
        assert_eq!(tags(&client), "EZ");
    }

    #[test]
    fn inside_copy_from_stdin_only_copy_messages_pass() {
        // libpq's PQexecParams("COPY … FROM STDIN"): the Sync behind the Execute is
        // ignored by the server, so no ReadyForQuery is owed for it.
        let mut seq = Sequencer::default();
        for t in [tag::PARSE, tag::BIND, tag::DESCRIBE, tag::EXECUTE, tag::SYNC] {
            seq.forwarded(t);
        }
        assert_eq!(seq.expected, 1);
        for t in [b'1', b'2', b'n', tag::COPY_IN_RESPONSE] {
            assert!(seq.flow.observe(t));
        }
        seq.expected -= seq.flow.take_ignored_syncs();
        assert_eq!(seq.expected, 0);
        assert!(matches!(copy_gate(&seq, tag::COPY_DATA), Gate::Pass));
        assert!(matches!(copy_gate(&seq, tag::SYNC), Gate::Drop));
        assert!(matches!(copy_gate(&seq, tag::FLUSH), Gate::Drop));
        assert!(matches!(copy_gate(&seq, tag::QUERY), Gate::Refuse(e) if e.message.contains("inside COPY FROM STDIN")));
        seq.forwarded(tag::COPY_DATA);
        seq.forwarded(tag::COPY_DONE);
        assert!(matches!(copy_gate(&seq, tag::QUERY), Gate::Pass), "the COPY is over");
        seq.forwarded(tag::SYNC);
        assert_eq!(seq.expected, 1, "the Sync after CopyDone is answered");
        // Something pipelined behind a COPY before it began: the session cannot go on.
        let mut seq = Sequencer::default();
        seq.forwarded(tag::QUERY);
        seq.forwarded(tag::QUERY);
        assert!(!seq.flow.observe(tag::COPY_IN_RESPONSE));
    }

    #[test]
    fn a_large_message_skipped_whole_leaves_later_ones_intact() {
        // Skipping to Sync after a refusal, a message larger than the whole-message
        // limit that arrived complete is dropped in one piece; the next large message
        // must still go out whole.
        let session = crate::session::stage::tests::session();
        let mut pipeline = Pipeline::new(Vec::new());
        let mut relay = Relay { session: &session, pipeline: &mut pipeline, max_message_bytes: STREAM_THRESHOLD };
        let mut dec = Decoder::new(STREAM_THRESHOLD, STREAM_THRESHOLD);
        let (mut out, mut to_client, mut seq) = (Outbox::default(), Outbox::default(), Sequencer::default());
        let (mut held, mut terminated) = (None, false);
        seq.skip = Some(None);
        let big = |t: u8| Frame::build(t, &vec![7u8; 40 * 1024]).into_bytes();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&big(tag::BIND));
        buf.extend_from_slice(Frame::build(tag::SYNC, b"").as_bytes());
        let copy = big(tag::COPY_DATA);
        buf.extend_from_slice(&copy[..1000]);
        relay.frontend(&mut dec, &mut buf, &mut out, &mut to_client, &mut seq, &mut held, &mut terminated).ok();
        buf.extend_from_slice(&copy[1000..]);
        relay.frontend(&mut dec, &mut buf, &mut out, &mut to_client, &mut seq, &mut held, &mut terminated).ok();
        assert!(seq.skip.is_none(), "the Sync ended the skip");
        assert_eq!(out.len(), copy.len(), "the CopyData went out whole, and nothing of the Bind");
    }

    #[test]
    fn batch_error_goes_before_the_servers_ready_for_query() {
        let mut seq = Sequencer::default();
        seq.forwarded(tag::PARSE);
        seq.forwarded(tag::BIND);
        assert!(seq.batch_forwarded);
        seq.forwarded(tag::SYNC);
        seq.injections.push_back((seq.expected, true, vec![PgError::error(SqlState::INSUFFICIENT_PRIVILEGE, "no").to_frame().into_bytes()]));
        let mut client = Outbox::default();
        client.push(Frame::build(b'1', b"").into_bytes());
        seq.on_ready(msg::ready_for_query(b'T'), &mut client);
        assert_eq!(tags(&client), "1EZ");
        assert_eq!(seq.status, b'T');
    }

    #[test]
    fn a_hold_notice_never_lands_inside_a_streamed_server_message() {
        // Holds every Query (as the policy does one that needs approval), with a notice.
        struct HoldQueries;
        impl crate::session::stage::Stage for HoldQueries {
            fn name(&self) -> &'static str {
                "hold"
            }
            fn frontend(&mut self, _: &Session, frame: &Frame) -> Action {
                if frame.tag() == tag::QUERY {
                    Action::Hold(Box::pin(std::future::pending()), Some(PgError::notice("held for approval")))
                } else {
                    Action::Forward
                }
            }
        }
        let session = crate::session::stage::tests::session();
        let mut pipeline = Pipeline::new(vec![Box::new(HoldQueries)]);
        let mut relay = Relay { session: &session, pipeline: &mut pipeline, max_message_bytes: 1 << 20 };
        let (mut cdec, mut sdec) = (Decoder::new(STREAM_THRESHOLD, 1 << 20), Decoder::new(STREAM_THRESHOLD, 1 << 20));
        let (mut to_server, mut to_client, mut seq) = (Outbox::default(), Outbox::default(), Sequencer::default());
        let (mut held, mut held_backend, mut terminated) = (None, None, false);
        // A first query went to the server; its answer holds a row larger than the
        // streaming threshold (no stage needs it whole), half of which has arrived.
        seq.forwarded(tag::QUERY);
        let row = Frame::build(tag::DATA_ROW, &vec![7u8; 100 * 1024]).into_bytes();
        let mut sbuf = BytesMut::from(&row[..50_000]);
        relay.backend(&mut sdec, &mut sbuf, &mut to_client, &mut seq, &mut held_backend).ok();
        // The client pipelines a second query, which is held.
        let mut cbuf = BytesMut::from(Frame::build(tag::QUERY, b"SELECT * FROM patients\0").as_bytes());
        relay.frontend(&mut cdec, &mut cbuf, &mut to_server, &mut to_client, &mut seq, &mut held, &mut terminated).ok();
        assert!(held.is_some());
        // The rest of the row.
        sbuf.extend_from_slice(&row[50_000..]);
        relay.backend(&mut sdec, &mut sbuf, &mut to_client, &mut seq, &mut held_backend).ok();
        to_client.seal_tail();
        let sent: Vec<u8> = to_client.parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert!(
            sent.starts_with(&row) || sent.ends_with(&row),
            "the client got the row with phigate's notice written into its middle ({} bytes of the row, then a '{}' message)",
            sent.iter().zip(row.iter()).take_while(|(a, b)| a == b).count(),
            sent[sent.iter().zip(row.iter()).take_while(|(a, b)| a == b).count()] as char
        );
    }
}

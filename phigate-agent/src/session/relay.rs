//! The established session's loop: read whatever either side sent, split it into
//! frames, run each through the pipeline, and write the survivors to the other side.
//!
//! One task owns both connections; reads are cancel-safe and writes happen between
//! reads, so a slow side applies back-pressure instead of growing buffers. Memory per
//! session is two read buffers, two write buffers and at most one whole message per
//! direction (bounded by `max_message_bytes`); results stream through frame by frame.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    stage::{Action, Direction, Pipeline},
    Session,
};
use crate::{
    net::conn::Conn,
    pg::{msg::tag, Decoder, FrameError, Item, PgError, SqlState},
};

/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;
/// Frames above this size are streamed when no stage needs them whole.
const STREAM_THRESHOLD: usize = 256 * 1024;

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
    pub async fn run(&mut self, client: &mut Conn, server: &mut Conn, mut client_buf: BytesMut, mut server_buf: BytesMut, mut shutdown: tokio::sync::watch::Receiver<super::Phase>) -> End {
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
        let mut to_server = BytesMut::with_capacity(READ_CHUNK);
        let mut to_client = BytesMut::with_capacity(READ_CHUNK);
        let mut terminated = false;
        loop {
            // Process what is buffered before reading more (startup may have left bytes).
            let more_frontend = match self.frontend(&mut cdec, &mut client_buf, &mut to_server, &mut to_client, &mut terminated) {
                Ok(more) => more,
                Err(end) => {
                    let _ = flush(client, &mut to_client).await;
                    let _ = server.write_all(crate::pg::msg::terminate().as_bytes()).await;
                    return end;
                }
            };
            let more_backend = match self.backend(&mut sdec, &mut server_buf, &mut to_client) {
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
    fn frontend(&mut self, dec: &mut Decoder, buf: &mut BytesMut, out: &mut BytesMut, to_client: &mut BytesMut, terminated: &mut bool) -> Result<bool, End> {
        loop {
            let pipeline = &*self.pipeline;
            let item = match dec.decode(buf, |t| pipeline.needs_whole(Direction::Frontend, t)) {
                Ok(Some(i)) => i,
                Ok(None) => return Ok(false),
                Err(e) => {
                    let err = PgError::fatal(SqlState::PROTOCOL_VIOLATION, format!("phigate closed the session: the client sent an invalid message: {e}"));
                    to_client.extend_from_slice(err.to_frame().as_bytes());
                    return Err(End::ClientProtocol(e));
                }
            };
            match item {
                Item::Whole(frame) => match self.pipeline.frontend(self.session, &frame) {
                    Action::Forward => {
                        out.extend_from_slice(frame.as_bytes());
                        if frame.tag() == tag::TERMINATE {
                            *terminated = true;
                            return Ok(false);
                        }
                    }
                    Action::Refuse(err) => {
                        to_client.extend_from_slice(err.to_frame().as_bytes());
                        return Err(End::Refused(err));
                    }
                },
                Item::StreamStart { tag, total, chunk } => {
                    self.pipeline.streamed(self.session, Direction::Frontend, tag, total);
                    out.extend_from_slice(&chunk);
                }
                Item::StreamChunk { chunk, .. } => out.extend_from_slice(&chunk),
            }
            // Bound the write buffer: let the caller flush before decoding more.
            if out.len() >= READ_CHUNK * 4 {
                return Ok(true);
            }
        }
    }

    /// Decode and judge database frames. `Ok(true)`: stopped early to bound `out`.
    fn backend(&mut self, dec: &mut Decoder, buf: &mut BytesMut, out: &mut BytesMut) -> Result<bool, End> {
        loop {
            let pipeline = &*self.pipeline;
            let item = match dec.decode(buf, |t| pipeline.needs_whole(Direction::Backend, t)) {
                Ok(Some(i)) => i,
                Ok(None) => return Ok(false),
                Err(e) => {
                    let err = PgError::fatal(SqlState::PROTOCOL_VIOLATION, format!("phigate closed the session: the database sent an invalid message: {e}"));
                    out.extend_from_slice(err.to_frame().as_bytes());
                    return Err(End::ServerProtocol(e));
                }
            };
            match item {
                Item::Whole(frame) => match self.pipeline.backend(self.session, &frame) {
                    Action::Forward => out.extend_from_slice(frame.as_bytes()),
                    Action::Refuse(err) => {
                        // Fail closed: whatever this message carried is not released.
                        out.extend_from_slice(err.to_frame().as_bytes());
                        return Err(End::Refused(err));
                    }
                },
                Item::StreamStart { tag, total, chunk } => {
                    self.pipeline.streamed(self.session, Direction::Backend, tag, total);
                    out.extend_from_slice(&chunk);
                }
                Item::StreamChunk { chunk, .. } => out.extend_from_slice(&chunk),
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

async fn flush(conn: &mut Conn, out: &mut BytesMut) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    conn.write_all(out).await?;
    // TLS streams hold written data in the session until flushed.
    conn.flush().await?;
    out.clear();
    Ok(())
}

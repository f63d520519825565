//! One task per intercepted connection: open the upstream connection and carry the
//! traffic.
//!
//! At this stage the session relays bytes unchanged; the PostgreSQL-aware session
//! (startup, authentication, per-message stages) replaces the relay here. It must not
//! reach back into listeners or the kernel: everything it needs arrives in the
//! [`Identified`] connection and the upstream address.

use std::{io, net::SocketAddr, time::Instant};

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::identity::Identified;

/// Relay buffer per direction. 64 KiB matches a typical large write and keeps a
/// bulk transfer to few syscalls per direction.
const RELAY_BUFFER: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, Default)]
pub struct RelayStats {
    pub to_upstream: u64,
    pub to_client: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot reach the database at {upstream}: {err}")]
    Upstream {
        upstream: SocketAddr,
        err: io::Error,
    },
    #[error("relay failed: {0}")]
    Relay(io::Error),
}

/// Relay one connection to `upstream` until either side closes.
pub async fn relay(conn: Identified, upstream: SocketAddr) -> Result<RelayStats, SessionError> {
    let started = Instant::now();
    let mut client = conn.accepted.stream;
    client.set_nodelay(true).ok();
    // The agent's own connect: never redirected, because the agent is never inside a
    // protected cgroup (checked at start).
    let mut server = TcpStream::connect(upstream)
        .await
        .map_err(|err| SessionError::Upstream { upstream, err })?;
    server.set_nodelay(true).ok();
    debug!(upstream_local = %server.local_addr().map(|a| a.to_string()).unwrap_or_default(), "upstream connected");
    match tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut server,
        RELAY_BUFFER,
        RELAY_BUFFER,
    )
    .await
    {
        Ok((up, down)) => {
            info!(
                bytes_to_upstream = up,
                bytes_to_client = down,
                duration_ms = started.elapsed().as_millis() as u64,
                "connection closed"
            );
            Ok(RelayStats {
                to_upstream: up,
                to_client: down,
            })
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) =>
        {
            warn!(error = %e, "connection reset");
            Ok(RelayStats::default())
        }
        Err(e) => Err(SessionError::Relay(e)),
    }
}

//! One task per intercepted connection, speaking PostgreSQL v3 on both sides:
//!
//! ```text
//! negotiate (SSL/GSS/cancel/startup) → identity config → client auth → access check
//!   → upstream login (agent-held credentials, TLS) → session start → relay (stages)
//! ```
//!
//! Owns the session's lifecycle and the [`Session`] context every stage sees. It uses
//! `pg` for the wire format, `identity` for token/SCRAM checks and `net` for streams;
//! it does not reach back into listeners or the kernel. Refusals are PostgreSQL
//! ErrorResponses with a SQLSTATE and a message that says phigate refused and why.

pub mod audit;
pub mod auth;
pub mod cancel;
pub mod durable;
pub mod guard;
pub mod masking;
pub mod relay;
pub mod stage;
pub mod startup;
pub mod upstream;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::Credential;
use crate::{
    config::Access,
    identity::{token::TokenClaims, Identified, Workload},
    net::{conn::Conn, tls::UpstreamTls, ClientAddr, OrigDstAddr},
    pg::{msg, Decoder, Frame, FrameError, Item, PgError, SqlState},
};
use auth::{AuthFailure, AuthMethod, AuthRuntime};
use cancel::{CancelRegistry, CancelTarget};
use relay::{End, Relay};
use stage::{Accounting, Pipeline, Stage, StatsCell};
use startup::{Hello, StartupError};
use upstream::UpstreamError;

/// A protected database as sessions need it.
pub struct DbRuntime {
    pub index: u32,
    pub name: String,
    pub upstream: SocketAddr,
    pub upstream_tls: UpstreamTls,
    pub client_tls: Option<TlsAcceptor>,
    /// Upstream role → password file (None: the server is not expected to ask).
    pub credentials: HashMap<String, Credential>,
}

/// A configured identity, ready to authenticate.
pub struct IdentityRuntime {
    pub name: String,
    pub auth: AuthRuntime,
    pub access: Vec<Access>,
}

/// Limits every session observes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub startup_timeout: Duration,
}

/// The agent's lifecycle as sessions see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// No new connections; established sessions continue.
    Draining,
    /// The drain deadline passed: sessions end now (57P01).
    Terminate,
}

/// Builds the stages of a new session (policy, masking, audit plug in here).
pub type StageFactory = Box<dyn Fn(&Session) -> Vec<Box<dyn Stage>> + Send + Sync>;

/// What all sessions share.
pub struct Services {
    /// Indexed by the kernel record's database index.
    pub databases: Vec<Arc<DbRuntime>>,
    pub identities: HashMap<String, Arc<IdentityRuntime>>,
    pub cancel: Arc<CancelRegistry>,
    pub limits: Limits,
    pub stages: StageFactory,
    pub shutdown: tokio::sync::watch::Receiver<Phase>,
    /// Where refused connections are recorded (sessions record through their stages).
    pub audit: Option<crate::audit::writer::Handle>,
}

/// Everything known about an established session: who, from where, to what, as whom.
#[derive(Debug, Clone)]
pub struct Session {
    /// Unique per agent run; also the client-facing backend pid.
    pub id: u32,
    /// The session's name in the audit log (`s-` and 16 hex digits, random: unique
    /// across agent runs and nodes); logs carry it as `audit_session`.
    pub audit_id: String,
    pub workload: Workload,
    pub client: ClientAddr,
    pub orig_dst: OrigDstAddr,
    /// The protected database (`[[database]]` name).
    pub database: String,
    /// The PostgreSQL database opened.
    pub dbname: String,
    /// The user name the client sent (informational: phigate decides the role).
    pub client_user: String,
    pub application_name: Option<String>,
    /// The startup `options` the client sent (backend switches such as `-c
    /// search_path=…`; the forbidden ones were refused before this point).
    pub options: Option<String>,
    /// The role the agent logged in as.
    pub upstream_role: String,
    pub auth_method: AuthMethod,
    pub token: Option<TokenClaims>,
    pub client_tls: bool,
    pub upstream_tls: bool,
    /// When the agent accepted the TCP connection.
    pub accepted_at: SystemTime,
    /// When the session was established (both logins done).
    pub started_at: SystemTime,
    /// Counts the client's CancelRequests: a statement held for approval when one
    /// comes is cancelled, as PostgreSQL cancels one that waits (on a lock, say).
    pub cancel: Arc<tokio::sync::watch::Sender<u64>>,
}

/// Why a session ended before or during relay.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("startup: {0}")]
    Startup(#[from] StartupError),
    #[error("startup did not finish within {0:?}")]
    StartupTimeout(Duration),
    #[error("refused: {0}")]
    Refused(PgError),
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("client: {0}")]
    Client(#[from] ReadError),
    #[error("write to client failed: {0}")]
    Write(#[from] std::io::Error),
}

/// Reading one whole frame during startup/authentication.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("read failed: {0}")]
    Io(std::io::Error),
    #[error("invalid message: {0}")]
    Frame(#[from] FrameError),
}

/// Read the next whole frame (at most `limit` bytes) from `conn`, using `buf`.
pub(crate) async fn read_frame(conn: &mut Conn, buf: &mut BytesMut, limit: usize) -> Result<Frame, ReadError> {
    let mut dec = Decoder::new(limit, limit);
    loop {
        if let Some(item) = dec.decode(buf, |_| true)? {
            match item {
                Item::Whole(f) => return Ok(f),
                // needs_whole is always true here, so nothing streams.
                _ => return Err(ReadError::Frame(FrameError::Malformed { what: "message", why: "unexpected streaming".into() })),
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8192);
        }
        match conn.read_buf(buf).await {
            Ok(0) => return Err(ReadError::Closed),
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Write and flush (TLS streams hold data until flushed).
pub(crate) async fn send(conn: &mut Conn, bytes: &[u8]) -> std::io::Result<()> {
    conn.write_all(bytes).await?;
    conn.flush().await
}

async fn refuse(conn: &mut Conn, err: PgError) -> SessionError {
    let _ = send(conn, err.to_frame().as_bytes()).await;
    SessionError::Refused(err)
}

/// Serve one identified connection to the end, logging how it went.
pub async fn serve(conn: Identified, services: Arc<Services>) {
    let db_index = conn.accepted.record.db_index as usize;
    let Some(db) = services.databases.get(db_index).cloned() else {
        warn!(db_index, "no database runtime for this listener; closing");
        return;
    };
    let (identity, client, orig_dst) = (conn.workload.name.clone(), conn.accepted.client.0.to_string(), conn.accepted.orig_dst.0.to_string());
    let workload = conn.workload.clone();
    let refused = |code: &str, message: &str| {
        if let Some(a) = &services.audit {
            a.record(
                crate::audit::record::kind::CONNECTION_REFUSED,
                serde_json::json!({"identity": identity, "cgroup": format!("/{}", workload.cgroup), "pid": workload.pid, "uid": workload.uid, "comm": workload.comm, "client": client, "orig_dst": orig_dst, "database": db.name, "code": code, "message": message}),
            );
        }
    };
    match run(conn, db.clone(), &services).await {
        Ok(()) => {}
        Err(SessionError::Refused(e)) => {
            refused(e.code.as_str(), &e.message);
            warn!(code = %e.code, reason = %e.message, "session refused");
        }
        Err(SessionError::Upstream(e)) => {
            refused("08006", &e.to_string());
            warn!(error = %e, "session failed");
        }
        Err(e) => warn!(error = %e, "session failed"),
    }
}

async fn run(conn: Identified, db: Arc<DbRuntime>, services: &Services) -> Result<(), SessionError> {
    let Identified { accepted, workload } = conn;
    accepted.stream.set_nodelay(true).ok();
    let (client, orig_dst, accepted_at) = (accepted.client, accepted.orig_dst, accepted.accepted_at);
    let startup_deadline = services.limits.startup_timeout;
    let started = Instant::now();
    // The database connection does not depend on what the client will say, only on
    // who it is: open it (TCP, TLS negotiation) while the client sends its startup
    // packet and authenticates, so a login costs the slower of the two, not the sum.
    // Only for identities configured for this database, so an unknown workload cannot
    // make the agent hold database connection slots.
    // Not before the client's first packet says this is a session (a CancelRequest
    // must not touch the database).
    let may_connect = services.identities.get(&workload.name).is_some_and(|i| i.access.iter().any(|a| a.database == db.name));
    let mut early = None;
    let opening = || {
        if may_connect {
            early = Some(EarlyUpstream::start(db.upstream, db.upstream_tls.clone()));
        }
    };
    let negotiated = tokio::time::timeout(startup_deadline, startup::negotiate(Conn::Plain(accepted.stream), db.client_tls.as_ref(), opening)).await;
    let (mut client_conn, hello) = match negotiated {
        Err(_) => return Err(SessionError::StartupTimeout(startup_deadline)),
        Ok(Err((e, Some(mut conn)))) if e.can_report() => {
            let _ = send(&mut conn, PgError::fatal(SqlState::PROTOCOL_VIOLATION, format!("phigate closed the connection: {e}")).to_frame().as_bytes()).await;
            return Err(e.into());
        }
        Ok(Err((e, _))) => return Err(e.into()),
        Ok(Ok(x)) => x,
    };
    let msg = match hello {
        Hello::Cancel { pid, key } => {
            handle_cancel(pid, &key, &workload, services).await;
            return Ok(());
        }
        Hello::Startup(m) => m,
    };

    // From here on the client speaks the protocol: refusals are ErrorResponses.
    let Some(identity) = services.identities.get(&workload.name).cloned() else {
        return Err(refuse(
            &mut client_conn,
            PgError::fatal(
                SqlState::INVALID_AUTHORIZATION,
                format!("phigate refused the connection: workload identity \"{}\" is not configured", workload.name),
            )
            .with_hint("Add an [[identity]] entry for it to the agent configuration."),
        )
        .await);
    };
    let dbname = msg.database().unwrap_or_default().to_string();
    let Some(access) = identity.access.iter().find(|a| a.database == db.name) else {
        return Err(refuse(
            &mut client_conn,
            PgError::fatal(
                SqlState::INVALID_AUTHORIZATION,
                format!("phigate refused the connection: identity \"{}\" has no access to database service \"{}\"", identity.name, db.name),
            ),
        )
        .await);
    };
    if !access.allows_dbname(&dbname) {
        return Err(refuse(
            &mut client_conn,
            PgError::fatal(
                SqlState::INVALID_AUTHORIZATION,
                format!("phigate refused the connection: identity \"{}\" may not open database \"{dbname}\"", identity.name),
            ),
        )
        .await);
    }
    let params = match startup::upstream_params(&msg) {
        Ok(p) => p,
        Err(name) => {
            return Err(refuse(
                &mut client_conn,
                PgError::fatal(
                    SqlState::INSUFFICIENT_PRIVILEGE,
                    format!("phigate refused the connection: the startup parameter {name} may not be set by workloads"),
                )
                .with_hint(
                    "phigate chooses the database role and keeps the database's own safeguards and its parser settings as they are; remove that parameter.",
                ),
            )
            .await);
        }
    };
    let pq_options = startup::protocol_options(&msg);
    if msg.minor > 0 || !pq_options.is_empty() {
        // phigate speaks 3.0 and no protocol extensions.
        send(&mut client_conn, msg::negotiate_protocol_version(0, &pq_options).as_bytes()).await?;
    }

    let mut client_buf = BytesMut::with_capacity(8192);
    let remaining = startup_deadline.saturating_sub(started.elapsed());
    let outcome = match tokio::time::timeout(remaining, auth::authenticate(&mut client_conn, &mut client_buf, &identity.name, &identity.auth)).await {
        Err(_) => return Err(SessionError::StartupTimeout(startup_deadline)),
        Ok(Err(AuthFailure::Refused(e))) => return Err(refuse(&mut client_conn, e).await),
        Ok(Err(AuthFailure::Read(e))) => return Err(e.into()),
        Ok(Err(AuthFailure::Write(e))) => return Err(e.into()),
        Ok(Ok(o)) => o,
    };

    let role = access.role.clone();
    let credential = db.credentials.get(&role).cloned().unwrap_or_else(|| Credential::without_password(&role));
    let opened = match early.take() {
        Some(e) => e.finish().await,
        None => upstream::open(db.upstream, &db.upstream_tls).await,
    };
    let logged_in = match opened {
        Ok(conn) => upstream::login(conn, &db.upstream_tls, &credential, &params, &dbname).await,
        Err(e) => Err(e),
    };
    let mut upstream = match logged_in {
        Ok(u) => u,
        Err(e) => {
            let err = match &e {
                UpstreamError::Refused(received, _) => {
                    // Not an authentication problem (e.g. the database does not exist):
                    // the database's own words are useful to the client.
                    PgError::fatal(SqlState(received.code.as_bytes().try_into().unwrap_or(*b"08006")), received.message.clone())
                }
                UpstreamError::AuthRejected { .. }
                | UpstreamError::NoPassword(_)
                | UpstreamError::Secret { .. }
                | UpstreamError::ServerNotAuthenticated
                | UpstreamError::PasswordToUnverifiedServer { .. }
                | UpstreamError::MethodNotAllowed { .. }
                | UpstreamError::UnsupportedAuth(_) => {
                    PgError::fatal(SqlState::INVALID_AUTHORIZATION, format!("phigate could not log in to the database as role \"{role}\""))
                        .with_hint("The agent's credentials for this role were rejected or are missing; see the agent log.")
                }
                _ => PgError::fatal(SqlState::CONNECTION_FAILURE, format!("phigate could not reach the database \"{}\": {e}", db.name)),
            };
            warn!(error = %e, role = %role, "upstream login failed");
            let _ = send(&mut client_conn, err.to_frame().as_bytes()).await;
            return Err(e.into());
        }
    };

    let cancelled = Arc::new(tokio::sync::watch::Sender::new(0));
    let cancel_key = services.cancel.register(CancelTarget {
        upstream: db.upstream,
        tls: db.upstream_tls.clone(),
        server_pid: upstream.server_pid,
        server_key: upstream.server_key.clone(),
        identity: workload.name.clone(),
        held: cancelled.clone(),
    });
    let session = Session {
        id: cancel_key.pid,
        audit_id: format!("s-{:016x}", rand::random::<u64>()),
        workload,
        client,
        orig_dst,
        database: db.name.clone(),
        dbname,
        client_user: msg.get("user").unwrap_or_default().to_string(),
        application_name: msg.get("application_name").map(String::from),
        options: msg.get("options").map(String::from),
        upstream_role: role,
        auth_method: outcome.method,
        token: outcome.token,
        client_tls: client_conn.is_tls(),
        upstream_tls: upstream.conn.is_tls(),
        accepted_at,
        started_at: SystemTime::now(),
        cancel: cancelled,
    };

    // The client learns the login worked only now that the database accepted it.
    let mut hello_out = BytesMut::new();
    hello_out.extend_from_slice(msg::auth_ok().as_bytes());
    for f in &upstream.startup_frames {
        hello_out.extend_from_slice(f.as_bytes());
    }
    hello_out.extend_from_slice(msg::backend_key_data(cancel_key.pid, cancel_key.key).as_bytes());
    hello_out.extend_from_slice(upstream.ready.as_bytes());
    send(&mut client_conn, &hello_out).await?;

    info!(
        session_id = session.id, audit_session = %session.audit_id, user = %session.client_user, dbname = %session.dbname, upstream_role = %session.upstream_role,
        auth = session.auth_method.as_str(), token_subject = session.token.as_ref().map(|t| t.subject.as_str()).unwrap_or(""),
        token_groups = ?session.token.as_ref().map(|t| t.groups.clone()).unwrap_or_default(),
        // Text the workload chose, like its statements: sizes only (the audit log
        // records it).
        application_name = %redacted(session.application_name.as_deref()), options = %redacted(session.options.as_deref()),
        login_ms = session.started_at.duration_since(session.accepted_at).map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0), client_tls = session.client_tls, upstream_tls = session.upstream_tls,
        "session started"
    );

    let stats = Arc::new(StatsCell::default());
    let mut stages: Vec<Box<dyn Stage>> = (services.stages)(&session);
    stages.insert(0, Box::new(Accounting::new(stats.clone())));
    let mut pipeline = Pipeline::new(stages);
    let leftover = std::mem::take(&mut upstream.leftover);
    let end = Relay { session: &session, pipeline: &mut pipeline, max_message_bytes: services.limits.max_message_bytes }
        .run(&mut client_conn, &mut upstream.conn, client_buf, leftover, services.shutdown.clone())
        .await;
    drop(cancel_key);

    let s = stats.snapshot();
    let duration_ms = session.started_at.elapsed().map(|d| d.as_millis() as u64).unwrap_or(0);
    let how = match &end {
        End::ClientClosed => "client closed".to_string(),
        End::ServerClosed => "database closed".to_string(),
        End::Refused(e) => format!("refused: {e}"),
        End::ClientProtocol(e) => format!("client protocol error: {e}"),
        End::ServerProtocol(e) => format!("database protocol error: {e}"),
        End::Io(e) => format!("i/o error: {e}"),
        End::Shutdown => "agent shutdown".to_string(),
    };
    pipeline.closed(&session, &how, &s);
    info!(session_id = session.id, audit_session = %session.audit_id, ended = %crate::pg::error::log_safe(&how), duration_ms, queries = s.queries, executes = s.executes, rows = s.rows, errors = s.errors, bytes_to_server = s.bytes_to_server, bytes_to_client = s.bytes_to_client, "session ended");
    Ok(())
}

/// The database connection being opened in the background during client startup.
/// Dropping it (the client failed or went away) aborts the attempt and closes the
/// connection.
struct EarlyUpstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<Result<Conn, UpstreamError>>,
}

impl EarlyUpstream {
    fn start(addr: SocketAddr, tls: crate::net::tls::UpstreamTls) -> Self {
        Self { addr, task: tokio::spawn(async move { upstream::open(addr, &tls).await }) }
    }

    async fn finish(mut self) -> Result<Conn, UpstreamError> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(UpstreamError::Unreachable { addr: self.addr, err: std::io::Error::other(e) }),
        }
    }
}

impl Drop for EarlyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A CancelRequest arrived through the redirect: forward it if the key is known and
/// belongs to the same workload identity. PostgreSQL never answers a cancel request,
/// so neither does phigate.
async fn handle_cancel(pid: u32, key: &[u8], workload: &Workload, services: &Services) {
    let Some(target) = services.cancel.lookup(pid, key) else {
        warn!(pid, "cancel request with an unknown key; ignored");
        return;
    };
    if target.identity != workload.name {
        warn!(pid, requester = %workload.name, owner = %target.identity, "cancel request from another identity; ignored");
        return;
    }
    // A statement held for approval has not reached the database: phigate cancels it.
    // Whatever the database runs (statements sent before it) is cancelled there.
    target.held.send_modify(|n| *n += 1);
    match cancel::send(&target).await {
        Ok(()) => info!(session_id = pid, "query cancel forwarded to the database"),
        Err(e) => warn!(session_id = pid, error = %e, "could not forward query cancel"),
    }
}

/// `<redacted N bytes>` for text a workload chose, in logs.
fn redacted(text: Option<&str>) -> String {
    format!("<redacted {} bytes>", text.map_or(0, str::len))
}

//! The agent's own connection to the database: TCP, TLS per sslmode, and a login as
//! the identity's upstream role with a secret only the agent holds. The password is
//! read from its file at each login (so rotated Kubernetes Secrets take effect) and is
//! never logged or sent anywhere but the database.

use std::{net::SocketAddr, path::Path, time::Duration};

use bytes::BytesMut;
use postgres_protocol::authentication::{
    md5_hash,
    sasl::{ChannelBinding, ScramSha256},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{read_frame, ReadError};
use crate::{
    config::SslMode,
    net::{conn::Conn, tls::UpstreamTls},
    pg::{
        error::{parse_error_fields, ReceivedError},
        msg::{self, tag, AuthRequest},
        startup, Frame,
    },
};

/// How long opening the connection may take: TCP, the SSLRequest's answer and the
/// TLS handshake. A server that accepts and then stays silent must not hold the
/// session (and the workload waiting for an answer) forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the login may take, from the startup message to ReadyForQuery.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_STARTUP_MESSAGE: usize = 1 << 20;

/// A logged-in upstream connection.
pub struct Upstream {
    pub conn: Conn,
    /// ParameterStatus and NoticeResponse frames to pass to the client, in order.
    pub startup_frames: Vec<Frame>,
    /// The server's ReadyForQuery.
    pub ready: Frame,
    pub server_pid: u32,
    pub server_key: Vec<u8>,
    /// Bytes read past ReadyForQuery (none expected).
    pub leftover: BytesMut,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the database at {addr}: {err}")]
    Unreachable { addr: SocketAddr, err: std::io::Error },
    #[error("the database did not finish the login within {0:?}; check that it is running and not overloaded")]
    LoginTimedOut(Duration),
    #[error("the database at {0} refused TLS, and upstream_tls.mode requires it")]
    TlsRefused(SocketAddr),
    #[error("TLS with the database failed: {0}")]
    Tls(std::io::Error),
    #[error("no password is configured for role {0:?}, but the database asked for one")]
    NoPassword(String),
    #[error("cannot read the password for role {role:?} from {path}: {err}")]
    Secret { role: String, path: String, err: std::io::Error },
    #[error("the database rejected the login as role {role:?}: {code} {message}")]
    AuthRejected { role: String, code: String, message: String },
    #[error("the database refused the session: {0:?}")]
    Refused(ReceivedError, Frame),
    #[error("the database asked for an authentication method phigate does not support ({0})")]
    UnsupportedAuth(String),
    #[error("the database's SCRAM answer did not verify: it does not know the role's password")]
    ServerNotAuthenticated,
    #[error(
        "the database asked for the {method} password of role {role:?} over a connection whose server phigate has not verified; phigate does not send the credential \
         where a machine in between could ask for it. Use SCRAM-SHA-256 on the database (password_encryption = 'scram-sha-256' and a scram-sha-256 line in pg_hba.conf), \
         or set upstream_tls.mode to verify-full (or verify-ca) with the database's CA"
    )]
    PasswordToUnverifiedServer { method: &'static str, role: String },
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("write to the database failed: {0}")]
    Write(std::io::Error),
}

/// Read a password file: its content without a trailing newline.
pub fn read_secret(role: &str, path: &Path) -> Result<Vec<u8>, UpstreamError> {
    let mut bytes = std::fs::read(path).map_err(|err| UpstreamError::Secret { role: role.into(), path: path.display().to_string(), err })?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(bytes)
}

/// Open a TCP (and, per mode, TLS) connection to the database, within
/// [`CONNECT_TIMEOUT`].
pub async fn open(addr: SocketAddr, tls: &UpstreamTls) -> Result<Conn, UpstreamError> {
    tokio::time::timeout(CONNECT_TIMEOUT, open_unbounded(addr, tls)).await.unwrap_or_else(|_| {
        Err(UpstreamError::Unreachable {
            addr,
            err: std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no connection (TCP and TLS) within {CONNECT_TIMEOUT:?}")),
        })
    })
}

async fn open_unbounded(addr: SocketAddr, tls: &UpstreamTls) -> Result<Conn, UpstreamError> {
    let tcp = TcpStream::connect(addr).await.map_err(|err| UpstreamError::Unreachable { addr, err })?;
    tcp.set_nodelay(true).ok();
    let Some((connector, name)) = tls.connector() else {
        return Ok(Conn::Plain(tcp));
    };
    let mut tcp = tcp;
    tcp.write_all(&startup::encode_ssl_request()).await.map_err(UpstreamError::Write)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(|err| UpstreamError::Unreachable { addr, err })?;
    match answer[0] {
        b'S' => {
            let stream = connector.connect(name, tcp).await.map_err(UpstreamError::Tls)?;
            Ok(Conn::ClientTls(Box::new(stream)))
        }
        b'N' if tls.mode == SslMode::Prefer => Ok(Conn::Plain(tcp)),
        _ => Err(UpstreamError::TlsRefused(addr)),
    }
}

/// Whether the password itself (cleartext, or md5, which a listener can replay or
/// crack) may be sent on `conn`: only to a server TLS verified with the configured CA,
/// or over loopback (nothing in between). SCRAM needs neither: it never reveals the
/// password, and the server proves it knows the verifier.
fn may_send_password(conn: &Conn, tls: &UpstreamTls) -> bool {
    match conn {
        Conn::ClientTls(t) => password_path_trusted(Some(tls.mode), is_loopback(t.get_ref().0)),
        Conn::Plain(tcp) => password_path_trusted(None, is_loopback(tcp)),
        Conn::ServerTls(_) => false,
    }
}

fn is_loopback(tcp: &TcpStream) -> bool {
    tcp.peer_addr().is_ok_and(|a| a.ip().is_loopback())
}

/// [`may_send_password`] on what it knows: the sslmode a TLS connection was made
/// with (None: no TLS) and whether the peer is on loopback.
fn password_path_trusted(tls_mode: Option<SslMode>, peer_is_loopback: bool) -> bool {
    tls_mode.is_some_and(|mode| matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull)) || peer_is_loopback
}

/// Log in as `role` over a connection from [`open`] (made with `tls`), within
/// [`LOGIN_TIMEOUT`].
pub async fn login(
    conn: Conn,
    tls: &UpstreamTls,
    role: &str,
    password_file: Option<&Path>,
    params: &[(String, String)],
    dbname: &str,
) -> Result<Upstream, UpstreamError> {
    tokio::time::timeout(LOGIN_TIMEOUT, login_unbounded(conn, tls, role, password_file, params, dbname))
        .await
        .unwrap_or(Err(UpstreamError::LoginTimedOut(LOGIN_TIMEOUT)))
}

async fn login_unbounded(
    mut conn: Conn,
    tls: &UpstreamTls,
    role: &str,
    password_file: Option<&Path>,
    params: &[(String, String)],
    dbname: &str,
) -> Result<Upstream, UpstreamError> {
    let password_allowed = may_send_password(&conn, tls);
    let mut startup_params: Vec<(&str, &str)> = vec![("user", role), ("database", dbname)];
    startup_params.extend(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    conn.write_all(&startup::encode_startup(&startup_params)).await.map_err(UpstreamError::Write)?;

    let password = || -> Result<Vec<u8>, UpstreamError> {
        let path = password_file.ok_or_else(|| UpstreamError::NoPassword(role.into()))?;
        read_secret(role, path)
    };
    let mut buf = BytesMut::with_capacity(8192);
    let mut scram: Option<ScramSha256> = None;
    let mut startup_frames = Vec::new();
    let mut key = None;
    loop {
        let f = read_frame(&mut conn, &mut buf, MAX_STARTUP_MESSAGE).await?;
        match f.tag() {
            tag::AUTHENTICATION => match msg::parse_auth_request(f.body()).map_err(ReadError::Frame)? {
                // A server that skips SCRAM's final message never proved it knows
                // the verifier: an impostor could say "Ok" right after our proof.
                AuthRequest::Ok if scram.is_some() => return Err(UpstreamError::ServerNotAuthenticated),
                AuthRequest::Ok => {}
                AuthRequest::CleartextPassword if !password_allowed => {
                    return Err(UpstreamError::PasswordToUnverifiedServer { method: "cleartext", role: role.into() })
                }
                AuthRequest::Md5Password { .. } if !password_allowed => {
                    return Err(UpstreamError::PasswordToUnverifiedServer { method: "md5", role: role.into() })
                }
                AuthRequest::CleartextPassword => {
                    conn.write_all(msg::password_message(&password()?).as_bytes()).await.map_err(UpstreamError::Write)?;
                }
                AuthRequest::Md5Password { salt } => {
                    let hash = md5_hash(role.as_bytes(), &password()?, salt);
                    conn.write_all(msg::password_message(hash.as_bytes()).as_bytes()).await.map_err(UpstreamError::Write)?;
                }
                AuthRequest::Sasl { mechanisms } => {
                    if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                        return Err(UpstreamError::UnsupportedAuth(mechanisms.join(", ")));
                    }
                    let s = ScramSha256::new(&password()?, ChannelBinding::unsupported());
                    conn.write_all(msg::sasl_initial_response("SCRAM-SHA-256", s.message()).as_bytes()).await.map_err(UpstreamError::Write)?;
                    scram = Some(s);
                }
                AuthRequest::SaslContinue(data) => {
                    let s = scram.as_mut().ok_or_else(|| UpstreamError::UnsupportedAuth("SASL continue without SASL".into()))?;
                    s.update(&data).map_err(|_| UpstreamError::ServerNotAuthenticated)?;
                    conn.write_all(msg::sasl_response(s.message()).as_bytes()).await.map_err(UpstreamError::Write)?;
                }
                AuthRequest::SaslFinal(data) => {
                    // Verifying the server's signature proves it knows the password
                    // verifier: an impostor database cannot fake this.
                    let mut s = scram.take().ok_or_else(|| UpstreamError::UnsupportedAuth("SASL final without SASL".into()))?;
                    s.finish(&data).map_err(|_| UpstreamError::ServerNotAuthenticated)?;
                }
                AuthRequest::Unsupported(code) => return Err(UpstreamError::UnsupportedAuth(format!("authentication request {code}"))),
            },
            tag::PARAMETER_STATUS | tag::NOTICE_RESPONSE => startup_frames.push(f),
            tag::BACKEND_KEY_DATA => key = Some(msg::parse_backend_key_data(f.body()).map_err(ReadError::Frame)?),
            tag::NEGOTIATE_PROTOCOL_VERSION => {}
            tag::ERROR_RESPONSE => {
                let e = parse_error_fields(f.body());
                if e.code.starts_with("28") {
                    return Err(UpstreamError::AuthRejected { role: role.into(), code: e.code, message: e.message });
                }
                return Err(UpstreamError::Refused(e, f));
            }
            tag::READY_FOR_QUERY => {
                let (server_pid, server_key) = key.unwrap_or((0, Vec::new()));
                return Ok(Upstream { conn, startup_frames, ready: f, server_pid, server_key, leftover: buf });
            }
            other => return Err(UpstreamError::UnsupportedAuth(format!("unexpected message {:?} during login", other as char))),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One authentication message of a fake server.
    fn auth(code: i32, data: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(data);
        Frame::build(tag::AUTHENTICATION, &body).into_bytes().to_vec()
    }

    /// Read one message from the client (the startup packet has no type byte).
    async fn read_message(s: &mut TcpStream, typed: bool) -> Vec<u8> {
        if typed {
            s.read_u8().await.expect("type byte");
        }
        let len = s.read_i32().await.expect("length") as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await.expect("body");
        body
    }

    /// AuthenticationOk and ReadyForQuery: the end of a successful login.
    fn ok_and_ready() -> Vec<u8> {
        let mut ok = auth(0, b"");
        ok.extend_from_slice(&Frame::build(tag::READY_FOR_QUERY, b"I").into_bytes());
        ok
    }

    /// Log in as "agent" (password "pw") to a fake server on loopback that plays
    /// `script` on the accepted connection (after the startup message).
    async fn login_against<T, F>(script: impl FnOnce(TcpStream) -> F + Send + 'static) -> (Result<Upstream, UpstreamError>, tokio::task::JoinHandle<T>)
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            read_message(&mut s, false).await;
            script(s).await
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let secret = dir.path().join("password");
        std::fs::write(&secret, "pw\n").expect("secret");
        let conn = Conn::Plain(TcpStream::connect(addr).await.expect("connect"));
        let cfg = crate::config::UpstreamTlsConfig { mode: SslMode::Disable, ca_file: None, server_name: None };
        let tls = UpstreamTls::new(&cfg, std::net::Ipv4Addr::LOCALHOST.into()).expect("no TLS");
        (login(conn, &tls, "agent", Some(&secret), &[], "db").await, server)
    }

    /// [`login_against`], giving up after `limit` (None: still waiting then).
    async fn login_against_within<T, F>(
        limit: Duration,
        script: impl FnOnce(TcpStream) -> F + Send + 'static,
    ) -> (Option<Result<Upstream, UpstreamError>>, tokio::task::JoinHandle<T>)
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            read_message(&mut s, false).await;
            script(s).await
        });
        let conn = Conn::Plain(TcpStream::connect(addr).await.expect("connect"));
        let cfg = crate::config::UpstreamTlsConfig { mode: SslMode::Disable, ca_file: None, server_name: None };
        let tls = UpstreamTls::new(&cfg, std::net::Ipv4Addr::LOCALHOST.into()).expect("no TLS");
        (tokio::time::timeout(limit, login(conn, &tls, "agent", None, &[], "db")).await.ok(), server)
    }

    #[tokio::test]
    async fn a_server_that_skips_the_scram_final_message_is_not_trusted() {
        let (result, server) = login_against(|mut s| async move {
            s.write_all(&auth(10, b"SCRAM-SHA-256\0\0")).await.expect("write");
            let first = read_message(&mut s, true).await;
            // SASLInitialResponse: mechanism, length, "n,,n=,r=<client nonce>".
            let text = String::from_utf8_lossy(&first).into_owned();
            let nonce = text.rsplit("r=").next().expect("client nonce").to_string();
            let server_first = format!("r={nonce}srv,s=c2FsdHNhbHQ=,i=4096");
            s.write_all(&auth(11, server_first.as_bytes())).await.expect("write");
            read_message(&mut s, true).await;
            // AuthenticationOk instead of SASLFinal: the impostor never proves it
            // knows the verifier.
            s.write_all(&ok_and_ready()).await.expect("write");
            let _ = s.read_u8().await;
        })
        .await;
        assert!(matches!(result, Err(UpstreamError::ServerNotAuthenticated)), "{:?}", result.err());
        server.abort();
    }

    /// A database that accepts the TCP connection and then never says a word.
    async fn silent_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let (_s, _) = listener.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(600)).await;
        });
        (addr, server)
    }

    #[tokio::test]
    async fn review_a_database_that_never_answers_the_ssl_request_is_unreachable_in_bounded_time() {
        // Found by a review: only the TCP connect was bounded; a server that accepted
        // and then stayed silent (a hung postmaster, a black hole behind a proxy) held
        // the session forever, and the workload never got its 08006.
        let (addr, server) = silent_server().await;
        let cfg = crate::config::UpstreamTlsConfig { mode: SslMode::Require, ca_file: None, server_name: None };
        let tls = UpstreamTls::new(&cfg, std::net::Ipv4Addr::LOCALHOST.into()).expect("TLS");
        let got = tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(10), open(addr, &tls)).await;
        server.abort();
        assert!(matches!(got, Ok(Err(UpstreamError::Unreachable { .. }))), "open() did not give up on a silent server: {:?}", got.map(|r| r.err()));
    }

    #[tokio::test]
    async fn review_a_database_that_never_answers_the_login_is_unreachable_in_bounded_time() {
        // Found by a review: the login (startup message to ReadyForQuery) had no bound.
        let (result, server) = login_against_within(LOGIN_TIMEOUT + Duration::from_secs(10), |s| async move {
            // Holds the connection open, silent.
            let _held = s;
            tokio::time::sleep(Duration::from_secs(600)).await;
        })
        .await;
        server.abort();
        assert!(matches!(result, Some(Err(UpstreamError::LoginTimedOut(_)))), "login() did not give up on a silent server: {:?}", result.map(|r| r.err()));
    }

    #[test]
    fn the_password_itself_goes_only_to_a_verified_server_or_over_loopback() {
        // TLS whose server was not verified (prefer/require): a machine in between
        // can terminate it and ask for the password in clear.
        assert!(!password_path_trusted(Some(SslMode::Prefer), false));
        assert!(!password_path_trusted(Some(SslMode::Require), false));
        assert!(password_path_trusted(Some(SslMode::VerifyCa), false));
        assert!(password_path_trusted(Some(SslMode::VerifyFull), false));
        assert!(password_path_trusted(Some(SslMode::Require), true), "loopback, TLS or not");
        // No TLS: only loopback, where nothing sits in between.
        assert!(!password_path_trusted(None, false));
        assert!(password_path_trusted(None, true));
        let e = UpstreamError::PasswordToUnverifiedServer { method: "md5", role: "agent".into() }.to_string();
        assert!(e.contains("md5") && e.contains("SCRAM-SHA-256") && e.contains("verify-full"), "{e}");
    }

    #[tokio::test]
    async fn a_cleartext_password_goes_to_a_loopback_server() {
        let (result, server) = login_against(|mut s| async move {
            s.write_all(&auth(3, b"")).await.expect("write");
            let password = read_message(&mut s, true).await;
            s.write_all(&ok_and_ready()).await.expect("write");
            password
        })
        .await;
        assert!(result.is_ok(), "{:?}", result.err());
        assert_eq!(server.await.expect("server"), b"pw\0");
    }
}

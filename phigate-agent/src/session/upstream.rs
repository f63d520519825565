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
use crate::config::Credential;
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
    #[error(
        "the database asked role {role:?} to log in with {asked}, but its credential allows only {allowed}; phigate does not log in a way the database is not \
         configured for, since whatever listens at the database's address can ask. If the database really asks for {asked} (pg_hba.conf), add \"{asked}\" to methods \
         of this role's [[database.credential]]"
    )]
    MethodNotAllowed { asked: &'static str, role: String, allowed: String },
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

/// The `tls-server-end-point` channel binding data (RFC 5929) of the database's
/// certificate on a TLS connection: the certificate hashed with its signature's hash
/// function (SHA-256 for MD5 and SHA-1), as PostgreSQL computes it. None without TLS,
/// or for a certificate signed without one such hash (RSA-PSS, Ed25519), which
/// PostgreSQL cannot bind to either.
fn channel_binding_data(conn: &Conn) -> Option<Vec<u8>> {
    let Conn::ClientTls(t) = conn else { return None };
    let cert = t.get_ref().1.peer_certificates()?.first()?;
    end_point_hash(cert.as_ref())
}

fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
    use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm
    // AlgorithmIdentifier ::= SEQUENCE { algorithm OID, … }, signatureValue }
    let (0x30, certificate, _) = der_tlv(cert)? else { return None };
    let (_, _, after_tbs) = der_tlv(certificate)?;
    let (0x30, algorithm, _) = der_tlv(after_tbs)? else { return None };
    let (0x06, oid, _) = der_tlv(algorithm)? else { return None };
    // 1.2.840.113549.1.1.n (RSA PKCS#1) and 1.2.840.10045.4.3.n / 4.1 (ECDSA).
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    let bits = match (oid.strip_prefix(RSA), oid.strip_prefix(ECDSA_SHA2)) {
        // md5, sha1, sha256, sha224, sha384, sha512 WithRSAEncryption
        (Some([4 | 5 | 11]), _) => 256,
        (Some([14]), _) => 224,
        (Some([12]), _) => 384,
        (Some([13]), _) => 512,
        // ecdsa-with-SHA224, -SHA256, -SHA384, -SHA512
        (_, Some([1])) => 224,
        (_, Some([2])) => 256,
        (_, Some([3])) => 384,
        (_, Some([4])) => 512,
        _ if oid == ECDSA_SHA1 => 256,
        _ => return None,
    };
    Some(match bits {
        224 => Sha224::digest(cert).to_vec(),
        256 => Sha256::digest(cert).to_vec(),
        384 => Sha384::digest(cert).to_vec(),
        _ => Sha512::digest(cert).to_vec(),
    })
}

/// One DER element at the front of `bytes`: its tag, its contents and what follows.
fn der_tlv(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *bytes.first()?;
    let first = *bytes.get(1)?;
    let (len, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let len = bytes.get(2..2 + n)?.iter().fold(0usize, |l, b| (l << 8) | *b as usize);
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((tag, bytes.get(header..end)?, &bytes[end..]))
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
pub async fn login(conn: Conn, tls: &UpstreamTls, credential: &Credential, params: &[(String, String)], dbname: &str) -> Result<Upstream, UpstreamError> {
    tokio::time::timeout(LOGIN_TIMEOUT, login_unbounded(conn, tls, credential, params, dbname))
        .await
        .unwrap_or(Err(UpstreamError::LoginTimedOut(LOGIN_TIMEOUT)))
}

async fn login_unbounded(
    mut conn: Conn,
    tls: &UpstreamTls,
    credential: &Credential,
    params: &[(String, String)],
    dbname: &str,
) -> Result<Upstream, UpstreamError> {
    let (role, password_file, methods) = (credential.role.as_str(), credential.password_file.as_deref(), credential.methods);
    let not_allowed = |asked: &'static str| UpstreamError::MethodNotAllowed { asked, role: role.into(), allowed: methods.names() };
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
    // A method the role allows was completed (SCRAM verified, or a password sent).
    let mut proved = false;
    let mut startup_frames = Vec::new();
    let mut key = None;
    loop {
        let f = read_frame(&mut conn, &mut buf, MAX_STARTUP_MESSAGE).await?;
        match f.tag() {
            tag::AUTHENTICATION => match msg::parse_auth_request(f.body()).map_err(ReadError::Frame)? {
                // A server that skips SCRAM's final message never proved it knows
                // the verifier: an impostor could say "Ok" right after our proof.
                AuthRequest::Ok if scram.is_some() => return Err(UpstreamError::ServerNotAuthenticated),
                // Let in without proving anything: only where the role is meant to
                // be (trust, peer, cert), else whatever took the database's address
                // would be sent the workload's statements.
                AuthRequest::Ok if !proved && !methods.none => return Err(not_allowed("none")),
                AuthRequest::Ok => {}
                AuthRequest::CleartextPassword if !methods.password => return Err(not_allowed("password")),
                AuthRequest::Md5Password { .. } if !methods.md5 => return Err(not_allowed("md5")),
                AuthRequest::Sasl { .. } if !methods.scram_sha_256 => return Err(not_allowed("scram-sha-256")),
                AuthRequest::CleartextPassword if !password_allowed => {
                    return Err(UpstreamError::PasswordToUnverifiedServer { method: "cleartext", role: role.into() })
                }
                AuthRequest::Md5Password { .. } if !password_allowed => {
                    return Err(UpstreamError::PasswordToUnverifiedServer { method: "md5", role: role.into() })
                }
                AuthRequest::CleartextPassword => {
                    conn.write_all(msg::password_message(&password()?).as_bytes()).await.map_err(UpstreamError::Write)?;
                    proved = true;
                }
                AuthRequest::Md5Password { salt } => {
                    let hash = md5_hash(role.as_bytes(), &password()?, salt);
                    conn.write_all(msg::password_message(hash.as_bytes()).as_bytes()).await.map_err(UpstreamError::Write)?;
                    proved = true;
                }
                AuthRequest::Sasl { mechanisms } => {
                    let offered = |m: &str| mechanisms.iter().any(|o| o == m);
                    // Bound to the TLS channel whenever possible, as libpq does by
                    // default: a machine that terminates TLS phigate did not verify
                    // (prefer, require) cannot then relay the login to the database,
                    // which sees another certificate's hash and refuses it.
                    let (mechanism, binding) = match channel_binding_data(&conn) {
                        Some(data) if offered("SCRAM-SHA-256-PLUS") => ("SCRAM-SHA-256-PLUS", ChannelBinding::tls_server_end_point(data)),
                        // Phigate could bind but the server did not offer it: "y" tells a
                        // server that does support binding (its offer removed on the
                        // way) to refuse.
                        Some(_) if offered("SCRAM-SHA-256") => ("SCRAM-SHA-256", ChannelBinding::unrequested()),
                        None if offered("SCRAM-SHA-256") => ("SCRAM-SHA-256", ChannelBinding::unsupported()),
                        _ => return Err(UpstreamError::UnsupportedAuth(mechanisms.join(", "))),
                    };
                    let s = ScramSha256::new(&password()?, binding);
                    conn.write_all(msg::sasl_initial_response(mechanism, s.message()).as_bytes()).await.map_err(UpstreamError::Write)?;
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
                    proved = true;
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
    use crate::config::AuthMethods;

    /// One authentication message of a fake server.
    fn auth(code: i32, data: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(data);
        Frame::build(tag::AUTHENTICATION, &body).into_bytes().to_vec()
    }

    /// Read one message from the client, over TCP or TLS (the startup packet has no
    /// type byte).
    async fn read_message(s: &mut (impl tokio::io::AsyncRead + Unpin), typed: bool) -> Vec<u8> {
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

    /// Log in as "agent" (password "pw", allowed `methods`) to a fake server on
    /// loopback that plays `script` on the accepted connection (after the startup
    /// message).
    async fn login_against<T, F>(
        methods: AuthMethods,
        script: impl FnOnce(TcpStream) -> F + Send + 'static,
    ) -> (Result<Upstream, UpstreamError>, tokio::task::JoinHandle<T>)
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let (result, server) = login_against_within(Duration::from_secs(60), methods, script).await;
        (result.expect("the login ends within 60 s"), server)
    }

    /// [`login_against`], giving up after `limit` (None: still waiting then).
    async fn login_against_within<T, F>(
        limit: Duration,
        methods: AuthMethods,
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
        let dir = tempfile::tempdir().expect("temp dir");
        let secret = dir.path().join("password");
        std::fs::write(&secret, "pw\n").expect("secret");
        let conn = Conn::Plain(TcpStream::connect(addr).await.expect("connect"));
        let cfg = crate::config::UpstreamTlsConfig { mode: SslMode::Disable, ca_file: None, server_name: None };
        let tls = UpstreamTls::new(&cfg, std::net::Ipv4Addr::LOCALHOST.into()).expect("no TLS");
        let credential = Credential { role: "agent".into(), password_file: Some(secret), methods };
        (tokio::time::timeout(limit, login(conn, &tls, &credential, &[], "db")).await.ok(), server)
    }

    #[tokio::test]
    async fn a_server_that_skips_the_scram_final_message_is_not_trusted() {
        let (result, server) = login_against(AuthMethods::SCRAM, |mut s| async move {
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
    async fn a_database_that_never_answers_the_ssl_request_is_unreachable_in_bounded_time() {
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
    async fn a_database_that_never_answers_the_login_is_unreachable_in_bounded_time() {
        // Found by a review: the login (startup message to ReadyForQuery) had no bound.
        let (result, server) = login_against_within(LOGIN_TIMEOUT + Duration::from_secs(10), AuthMethods::SCRAM, |s| async move {
            // Holds the connection open, silent.
            let _held = s;
            tokio::time::sleep(Duration::from_secs(600)).await;
        })
        .await;
        server.abort();
        assert!(matches!(result, Some(Err(UpstreamError::LoginTimedOut(_)))), "login() did not give up on a silent server: {:?}", result.map(|r| r.err()));
    }

    /// A TLS database (self-signed certificate, signed with `alg`) that offers
    /// `mechanisms`, plays SCRAM up to the client's final message and hands back the
    /// mechanism chosen, the client-first and client-final messages, and its
    /// certificate.
    async fn scram_over_tls(alg: &'static rcgen::SignatureAlgorithm, mechanisms: &'static [u8]) -> (String, String, String, Vec<u8>) {
        use std::sync::Arc;
        let kp = rcgen::KeyPair::generate_for(alg).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["db.test".to_string()]).expect("params").self_signed(&kp).expect("certificate");
        let der = cert.der().to_vec();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(kp.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            read_message(&mut tcp, false).await;
            tcp.write_all(b"S").await.expect("write");
            let mut s = acceptor.accept(tcp).await.expect("TLS");
            read_message(&mut s, false).await;
            s.write_all(&auth(10, mechanisms)).await.expect("write");
            s.flush().await.expect("flush");
            let first = read_message(&mut s, true).await;
            let mut rest = first.as_slice();
            let mechanism = crate::pg::frame::take_cstr(&mut rest, "mechanism").expect("mechanism").to_string();
            let client_first = String::from_utf8_lossy(&rest[4..]).into_owned();
            let nonce = client_first.rsplit("r=").next().expect("client nonce").to_string();
            s.write_all(&auth(11, format!("r={nonce}srv,s=c2FsdHNhbHQ=,i=4096").as_bytes())).await.expect("write");
            s.flush().await.expect("flush");
            let client_final = String::from_utf8_lossy(&read_message(&mut s, true).await).into_owned();
            (mechanism, client_first, client_final)
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let secret = dir.path().join("password");
        std::fs::write(&secret, "pw\n").expect("secret");
        let cfg = crate::config::UpstreamTlsConfig { mode: SslMode::Require, ca_file: None, server_name: None };
        let tls = UpstreamTls::new(&cfg, std::net::Ipv4Addr::LOCALHOST.into()).expect("TLS");
        let conn = open(addr, &tls).await.expect("open");
        // The fake server stops after the client's final message: the login cannot finish.
        let credential = Credential { role: "agent".into(), password_file: Some(secret), methods: AuthMethods::SCRAM };
        let _ = tokio::time::timeout(Duration::from_secs(5), login(conn, &tls, &credential, &[], "db")).await;
        let (mechanism, first, last) = tokio::time::timeout(Duration::from_secs(5), server).await.expect("in time").expect("server");
        (mechanism, first, last, der)
    }

    /// The channel binding data a client-final message carries (after its gs2 header).
    fn binding_data(client_final: &str) -> Vec<u8> {
        use base64::{engine::general_purpose::STANDARD, Engine};
        let c = client_final.split(',').find_map(|a| a.strip_prefix("c=")).expect("c=");
        let raw = STANDARD.decode(c).expect("base64");
        raw.strip_prefix(b"p=tls-server-end-point,,").expect("gs2 header with binding").to_vec()
    }

    #[tokio::test]
    async fn scram_over_tls_is_bound_to_the_channel_when_the_server_offers_it() {
        // Found by a review: over TLS whose server was not verified (sslmode require),
        // phigate answered a server offering SCRAM-SHA-256-PLUS with plain SCRAM
        // ("n,,"), so a machine terminating that TLS could relay the login to the real
        // database and then read every result. libpq, by default (channel_binding =
        // prefer), binds SCRAM to the TLS channel there: the real server then sees
        // another certificate's hash and refuses the relayed login.
        use sha2::{Digest, Sha256, Sha384};
        let (mechanism, first, last, der) = scram_over_tls(&rcgen::PKCS_ECDSA_P256_SHA256, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0").await;
        assert_eq!(mechanism, "SCRAM-SHA-256-PLUS", "client-first {first:?}");
        assert!(first.starts_with("p=tls-server-end-point,,"), "{first:?}");
        assert_eq!(binding_data(&last), Sha256::digest(&der).to_vec(), "tls-server-end-point is SHA-256 of the certificate (RFC 5929)");
        // A certificate signed with SHA-384: its hash, as PostgreSQL computes it.
        let (_, _, last, der) = scram_over_tls(&rcgen::PKCS_ECDSA_P384_SHA384, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0").await;
        assert_eq!(binding_data(&last), Sha384::digest(&der).to_vec());
        // A server that does not offer binding over TLS (or a machine in between that
        // removed -PLUS from the list): "y", which a server that supports it refuses.
        let (mechanism, first, _, _) = scram_over_tls(&rcgen::PKCS_ECDSA_P256_SHA256, b"SCRAM-SHA-256\0\0").await;
        assert_eq!(mechanism, "SCRAM-SHA-256");
        assert!(first.starts_with("y,,"), "{first:?}");
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
        let methods = AuthMethods { password: true, ..AuthMethods::SCRAM };
        let (result, server) = login_against(methods, |mut s| async move {
            s.write_all(&auth(3, b"")).await.expect("write");
            let password = read_message(&mut s, true).await;
            s.write_all(&ok_and_ready()).await.expect("write");
            password
        })
        .await;
        assert!(result.is_ok(), "{:?}", result.err());
        assert_eq!(server.await.expect("server"), b"pw\0");
    }

    /// What a fake server at the database's address gets when it asks for `request`
    /// (an Authentication message's code and data) and then says Ok: the error, and
    /// every byte the agent sent after its startup message.
    async fn ask(methods: AuthMethods, request: Option<(i32, &'static [u8])>) -> (Result<Upstream, UpstreamError>, Vec<u8>) {
        let (result, server) = login_against(methods, move |mut s| async move {
            if let Some((code, data)) = request {
                s.write_all(&auth(code, data)).await.expect("write");
            }
            s.write_all(&ok_and_ready()).await.expect("write");
            let mut sent = Vec::new();
            let _ = tokio::time::timeout(Duration::from_millis(300), s.read_to_end(&mut sent)).await;
            sent
        })
        .await;
        (result, server.await.expect("server"))
    }

    #[tokio::test]
    async fn a_role_gets_in_only_by_the_methods_its_credential_allows() {
        // A process that took the database's loopback address (the database down or
        // restarting) asks for the password itself, or for nothing at all: by
        // default (SCRAM only) it gets neither the password nor a session.
        for (request, asked) in [(Some((3, &b""[..])), "password"), (Some((5, &b"salt"[..])), "md5"), (None, "none")] {
            let (result, sent) = ask(AuthMethods::SCRAM, request).await;
            match result {
                Err(UpstreamError::MethodNotAllowed { asked: a, allowed, .. }) => assert_eq!((a, allowed.as_str()), (asked, "scram-sha-256")),
                other => panic!("{asked}: logged in or failed otherwise: {:?}", other.err()),
            }
            assert!(!sent.windows(2).any(|w| w == b"pw"), "{asked}: the password was sent: {sent:?}");
        }
        // Listed, each is used (md5 and cleartext only over loopback or verified TLS).
        let (result, sent) = ask(AuthMethods { password: true, ..AuthMethods::default() }, Some((3, b""))).await;
        assert!(result.is_ok() && sent.starts_with(b"p"), "{:?} {sent:?}", result.err());
        let (result, _) = ask(AuthMethods { md5: true, ..AuthMethods::default() }, Some((5, b"salt"))).await;
        assert!(result.is_ok(), "{:?}", result.err());
        let (result, _) = ask(AuthMethods::NONE, None).await;
        assert!(result.is_ok(), "{:?}", result.err());
        // A role that only expects no authentication does not answer SCRAM either.
        let (result, _) = ask(AuthMethods::NONE, Some((10, b"SCRAM-SHA-256\0\0"))).await;
        assert!(matches!(result, Err(UpstreamError::MethodNotAllowed { asked: "scram-sha-256", .. })), "{:?}", result.err());
        let e = ask(AuthMethods::SCRAM, None).await.0.err().expect("refused").to_string();
        assert!(e.contains("\"none\"") && e.contains("methods") && e.contains("[[database.credential]]"), "{e}");
    }
}

//! The client's opening moves: SSLRequest / GSSENCRequest (answered), a
//! CancelRequest (handed back to the caller), or the StartupMessage. Also the filter
//! that decides which startup parameters may reach the database.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use crate::{
    net::conn::Conn,
    pg::{
        startup::{self, StartupMessage, StartupPacket, TLS_HANDSHAKE},
        FrameError,
    },
    policy::analyze::{setting_changes_parsing, setting_weakens_safeguards},
};

/// What the client opened with, once TLS (if any) is in place.
#[derive(Debug)]
pub enum Hello {
    Startup(StartupMessage),
    Cancel { pid: u32, key: Vec<u8> },
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("connection closed during startup: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed startup packet: {0}")]
    Malformed(#[from] FrameError),
    #[error("the client opened with a TLS handshake (PostgreSQL 17 sslnegotiation=direct), which phigate does not accept; use sslnegotiation=postgres")]
    DirectTls,
    #[error("unsupported protocol or request code {0:#x}")]
    Unsupported(u32),
    #[error("TLS handshake with the client failed: {0}")]
    Tls(std::io::Error),
    #[error("too many SSL/GSS negotiation requests")]
    TooManyRequests,
}

impl StartupError {
    /// Whether the client can still read a PostgreSQL ErrorResponse.
    pub fn can_report(&self) -> bool {
        matches!(self, Self::Malformed(_) | Self::Unsupported(_) | Self::TooManyRequests)
    }
}

async fn read_packet(conn: &mut Conn) -> Result<BytesMut, StartupError> {
    let mut len = [0u8; 4];
    conn.read_exact(&mut len[..1]).await?;
    if len[0] == TLS_HANDSHAKE {
        return Err(StartupError::DirectTls);
    }
    conn.read_exact(&mut len[1..]).await?;
    let total = startup::packet_len(&len)?.expect("invariant: four bytes were read");
    let mut packet = BytesMut::zeroed(total);
    packet[..4].copy_from_slice(&len);
    conn.read_exact(&mut packet[4..]).await?;
    Ok(packet)
}

/// Answer negotiation requests until the client sends its StartupMessage or a
/// CancelRequest. Reads exactly one packet at a time, so no plaintext sent before a
/// TLS handshake can leak into the encrypted session.
/// On error the connection comes back when it can still carry an ErrorResponse.
/// `on_opening` hears once, as soon as the client's first packet is read, whether it
/// is the start of a session (not a CancelRequest), so work for it can begin early.
pub async fn negotiate(conn: Conn, tls: Option<&TlsAcceptor>, on_opening: impl FnOnce()) -> Result<(Conn, Hello), (StartupError, Option<Conn>)> {
    let mut slot = Some(conn);
    match negotiate_inner(&mut slot, tls, on_opening).await {
        Ok(hello) => Ok((slot.expect("invariant: the connection is returned with the hello"), hello)),
        Err(e) => Err((e, slot)),
    }
}

async fn negotiate_inner(slot: &mut Option<Conn>, tls: Option<&TlsAcceptor>, on_opening: impl FnOnce()) -> Result<Hello, StartupError> {
    let mut conn = slot.take().expect("invariant: negotiate starts with a connection");
    let mut on_opening = Some(on_opening);
    // SSLRequest, then GSSENCRequest (or the reverse), then the real packet.
    for _ in 0..3 {
        let packet = match read_packet(&mut conn).await {
            Ok(p) => p,
            Err(e) => {
                *slot = Some(conn);
                return Err(e);
            }
        };
        let parsed = match startup::parse(&packet) {
            Ok(p) => p,
            Err(e) => {
                *slot = Some(conn);
                return Err(e.into());
            }
        };
        if !matches!(parsed, StartupPacket::Cancel { .. }) {
            if let Some(f) = on_opening.take() {
                f();
            }
        }
        match parsed {
            StartupPacket::SslRequest => match (tls, conn) {
                (Some(acceptor), Conn::Plain(tcp)) => {
                    let mut tcp = tcp;
                    tcp.write_all(b"S").await?;
                    let stream = acceptor.accept(tcp).await.map_err(StartupError::Tls)?;
                    conn = Conn::ServerTls(Box::new(stream));
                }
                (_, mut other) => {
                    super::send(&mut other, b"N").await?;
                    conn = other;
                }
            },
            StartupPacket::GssEncRequest => super::send(&mut conn, b"N").await?,
            StartupPacket::Cancel { pid, key } => {
                *slot = Some(conn);
                return Ok(Hello::Cancel { pid, key });
            }
            StartupPacket::Startup(m) => {
                *slot = Some(conn);
                return Ok(Hello::Startup(m));
            }
            StartupPacket::Unsupported { code } => {
                *slot = Some(conn);
                return Err(StartupError::Unsupported(code));
            }
        }
    }
    *slot = Some(conn);
    Err(StartupError::TooManyRequests)
}

/// Startup parameters PostgreSQL treats as settings and that would let a workload
/// change who it is or what code runs in its backend. Any other name is passed on
/// (PostgreSQL applies unknown names as settings and rejects invalid ones itself).
const FORBIDDEN_SETTINGS: &[&str] = &["role", "session_authorization", "local_preload_libraries", "session_preload_libraries", "replication"];

/// The parameters to send upstream: the client's, minus the ones phigate decides
/// (`user`, `database`) and protocol extensions it does not forward. Returns the
/// offending name if the client tried to set a forbidden setting.
pub fn upstream_params(msg: &StartupMessage) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (k, v) in &msg.params {
        let name = k.to_ascii_lowercase();
        match name.as_str() {
            "user" | "database" => continue,
            _ if name.starts_with("_pq_.") => continue,
            "replication" if matches!(v.to_ascii_lowercase().as_str(), "false" | "off" | "no" | "0") => continue,
            _ if FORBIDDEN_SETTINGS.contains(&name.as_str()) => return Err(k.clone()),
            // The policy judges statements with PostgreSQL's parser in its default
            // settings; a session that parses differently could hide code in what
            // the policy reads as a string literal. And the settings that switch off
            // the database's own safeguards, as baseline.safeguard-settings in SET.
            _ if setting_changes_parsing(&name, v) || setting_weakens_safeguards(&name, Some(v)) => return Err(format!("{k} ({v})")),
            "options" => check_options(v)?,
            _ => {}
        }
        out.push((k.clone(), v.clone()));
    }
    Ok(out)
}

/// `options` carries backend command-line switches (`-c name=value`, `--name=value`);
/// the same settings are forbidden there, and so is anything that is not a setting.
/// The switches are read as the server reads them (see [`split_options`]), so an
/// escape cannot make the server see a name this check did not.
fn check_options(options: &str) -> Result<(), String> {
    // The server splits at whatever its locale's isspace() says, and in a Latin-1
    // locale that includes byte 0xA0 (inside `\u{a0}` and many other characters in
    // UTF-8): `-capplication_name=x\u{a0}-crole=admin` would be one setting here and
    // two there. Only ASCII splits the same everywhere.
    if !options.is_ascii() {
        return Err("options (characters other than ASCII)".to_string());
    }
    let words = split_options(options);
    let mut words = words.iter();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next().ok_or_else(|| "options".to_string())?
        } else if let Some(s) = w.strip_prefix("-c") {
            s
        } else if let Some(s) = w.strip_prefix("--") {
            s
        } else {
            return Err(format!("options ({w})"));
        };
        let (name, value) = setting.split_once('=').unwrap_or((setting, ""));
        let name = name.replace('-', "_").to_ascii_lowercase();
        // Setting names are identifiers (a dot for extension settings); anything
        // else is not a name this check can vouch for.
        let plain = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
        if !plain || FORBIDDEN_SETTINGS.contains(&name.as_str()) || setting_changes_parsing(&name, value) || setting_weakens_safeguards(&name, Some(value)) {
            return Err(format!("options ({name})"));
        }
    }
    Ok(())
}

/// Split `options` into words as PostgreSQL does (`pg_split_opts`): at ASCII
/// whitespace, where a backslash makes the next character literal (an escaped space
/// joins two words; `rol\e` is `role`) and is itself dropped.
fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = options.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_ascii_whitespace() || *c == '\u{0b}').is_some() {}
        if chars.peek().is_none() {
            return words;
        }
        let mut word = String::new();
        while let Some(c) = chars.next_if(|c| !(c.is_ascii_whitespace() || *c == '\u{0b}')) {
            if c == '\\' {
                // The escaped character, whatever it is (a trailing backslash is dropped).
                if let Some(escaped) = chars.next() {
                    word.push(escaped);
                }
            } else {
                word.push(c);
            }
        }
        words.push(word);
    }
}

/// `_pq_.*` protocol options the client asked for (none are supported).
pub fn protocol_options(msg: &StartupMessage) -> Vec<&str> {
    msg.params.iter().filter(|(k, _)| k.starts_with("_pq_.")).map(|(k, _)| k.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(params: &[(&str, &str)]) -> StartupMessage {
        StartupMessage { major: 3, minor: 0, params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    #[test]
    fn passes_ordinary_parameters_and_drops_identity_ones() {
        let p = upstream_params(&msg(&[
            ("user", "x"),
            ("database", "d"),
            ("application_name", "psql"),
            ("client_encoding", "UTF8"),
            ("options", "-c search_path=app --statement-timeout=5s"),
        ]))
        .unwrap();
        let names: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, vec!["application_name", "client_encoding", "options"]);
    }

    #[test]
    fn refuses_settings_that_change_identity() {
        assert_eq!(upstream_params(&msg(&[("user", "x"), ("role", "admin")])), Err("role".into()));
        assert_eq!(upstream_params(&msg(&[("user", "x"), ("Session_Authorization", "admin")])), Err("Session_Authorization".into()));
        assert!(upstream_params(&msg(&[("user", "x"), ("options", "-c role=admin")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", "-crole=admin")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", "--session-authorization=admin")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", "-D /tmp")])).is_err(), "non-setting switches");
        assert!(upstream_params(&msg(&[("user", "x"), ("replication", "database")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("replication", "false")])).is_ok());
    }

    #[test]
    fn options_that_a_latin1_server_would_split_elsewhere_are_refused() {
        // In UTF-8 U+00A0 is C2 A0; a server whose locale is Latin-1 splits at A0.
        let hidden = "-capplication_name=x\u{a0}-crole=admin";
        assert_eq!(upstream_params(&msg(&[("user", "x"), ("options", hidden)])), Err("options (characters other than ASCII)".into()));
        assert!(upstream_params(&msg(&[("user", "x"), ("options", "-c search_path=caf\u{e9}")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("application_name", "caf\u{e9}"), ("options", "-c search_path=app")])).is_ok());
    }

    #[test]
    fn backslash_escapes_in_options_cannot_hide_a_forbidden_setting() {
        // PostgreSQL splits `options` on whitespace and drops a backslash before any
        // character (pg_split_opts): `rol\e` reaches the server as `role`.
        assert!(upstream_params(&msg(&[("user", "x"), ("options", r"-c rol\e=admin")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", r"-crol\e=admin")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", r"--session\_authorization=admin")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", r"-c standard_conforming_string\s=off")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", r"-c client_encoding=SJ\IS")])).is_err());
        // An escaped space joins two words into one switch, as the server sees it.
        assert!(upstream_params(&msg(&[("user", "x"), ("options", r"-c\ role=admin")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", r"\-c role=admin")])).is_err());
        // Escapes that hide nothing still pass.
        assert!(upstream_params(&msg(&[("user", "x"), ("options", r"-c search_path=my\ schema,public")])).is_ok());
    }

    #[test]
    fn refuses_settings_that_switch_off_the_databases_safeguards() {
        assert!(upstream_params(&msg(&[("user", "x"), ("session_replication_role", "replica")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", "-c session_replication_role=replica")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", "--session-replication-role=local")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", "-c log_statement=none")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", r"-c pgaudit.lo\g=none")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("track_activities", "off")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", "-c session_replication_role=origin")])).is_ok());
    }

    #[test]
    fn refuses_settings_that_change_how_statements_parse() {
        assert!(upstream_params(&msg(&[("user", "x"), ("client_encoding", "SJIS")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("client_encoding", "big5")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", "-c standard_conforming_strings=off")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("options", "--backslash-quote=on")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("standard_conforming_strings", "off")])).is_err());
        assert!(upstream_params(&msg(&[("user", "x"), ("client_encoding", "UTF8"), ("options", "-c standard_conforming_strings=on")])).is_ok());
    }
}

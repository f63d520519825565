//! Client authentication: phigate terminates it. Depending on the identity's mode the
//! kernel-attested workload is enough, or the password must be a valid token, or a
//! SCRAM-SHA-256 proof. Whatever the client sends is never forwarded upstream.

use std::sync::Arc;

use bytes::BytesMut;
use tracing::warn;

use super::{read_frame, ReadError};
use crate::{
    identity::{
        scram::{self, Exchange, ScramError, Verifier},
        token::{TokenClaims, TokenError, TokenVerifier},
    },
    net::conn::Conn,
    pg::{msg, PgError, SqlState},
};

/// How an identity authenticates, ready to use.
pub enum AuthRuntime {
    Workload,
    Token { verifier: Arc<TokenVerifier>, allowed_subjects: Vec<String>, required_groups: Vec<String> },
    Scram(Verifier),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    Workload,
    Token,
    Scram,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Workload => "workload",
            Self::Token => "token",
            Self::Scram => "scram",
        }
    }
}

/// What authentication established.
#[derive(Debug, Clone)]
pub struct AuthOutcome {
    pub method: AuthMethod,
    pub token: Option<TokenClaims>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthFailure {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("write to client failed: {0}")]
    Write(#[from] std::io::Error),
    /// Refused: the client gets this error.
    #[error("{0}")]
    Refused(PgError),
}

/// Largest authentication message accepted (a token of a few KB fits easily).
const MAX_AUTH_MESSAGE: usize = 64 * 1024;

async fn expect_password_message(conn: &mut Conn, buf: &mut BytesMut) -> Result<crate::pg::Frame, AuthFailure> {
    let f = read_frame(conn, buf, MAX_AUTH_MESSAGE).await?;
    if f.tag() != msg::tag::PASSWORD {
        return Err(AuthFailure::Refused(PgError::fatal(
            SqlState::PROTOCOL_VIOLATION,
            format!("phigate expected a password message, got message type {:?}", f.tag() as char),
        )));
    }
    Ok(f)
}

fn malformed(e: impl std::fmt::Display) -> AuthFailure {
    AuthFailure::Refused(PgError::fatal(SqlState::PROTOCOL_VIOLATION, format!("phigate refused the connection: malformed authentication message: {e}")))
}

/// Run the exchange for `identity`. On success nothing has been sent that commits to
/// the session: the caller sends AuthenticationOk once the upstream login worked.
pub async fn authenticate(conn: &mut Conn, buf: &mut BytesMut, identity: &str, auth: &AuthRuntime) -> Result<AuthOutcome, AuthFailure> {
    match auth {
        AuthRuntime::Workload => Ok(AuthOutcome { method: AuthMethod::Workload, token: None }),
        AuthRuntime::Token { verifier, allowed_subjects, required_groups } => {
            super::send(conn, msg::auth_cleartext_password().as_bytes()).await?;
            let f = expect_password_message(conn, buf).await?;
            let token = msg::parse_password(f.body()).map_err(malformed)?;
            let claims = verifier.verify(token).await.map_err(|e| {
                if let TokenError::KeysUnavailable(why) = &e {
                    // Not the token's fault, and the reason names the agent's files,
                    // URLs and network: for the operator's log, not the workload.
                    warn!(identity, issuer = %verifier.config().name, error = %why, "token issuer keys unavailable; refusing the token");
                    return AuthFailure::Refused(PgError::fatal(
                        SqlState::INVALID_PASSWORD,
                        format!("phigate refused the connection: cannot check the token for identity \"{identity}\": the issuer's signing keys are unavailable (see the agent log)"),
                    ));
                }
                AuthFailure::Refused(
                    PgError::fatal(SqlState::INVALID_PASSWORD, format!("phigate refused the connection: invalid token for identity \"{identity}\": {e}"))
                        .with_hint("Present a current access token from the configured issuer as the password."),
                )
            })?;
            if !allowed_subjects.is_empty() && !allowed_subjects.contains(&claims.subject) {
                return Err(AuthFailure::Refused(PgError::fatal(
                    SqlState::INVALID_AUTHORIZATION,
                    format!("phigate refused the connection: token subject \"{}\" may not act as identity \"{identity}\"", claims.subject),
                )));
            }
            if let Some(missing) = required_groups.iter().find(|g| !claims.groups.contains(g)) {
                return Err(AuthFailure::Refused(PgError::fatal(
                    SqlState::INVALID_AUTHORIZATION,
                    format!("phigate refused the connection: token lacks group \"{missing}\" required for identity \"{identity}\""),
                )));
            }
            Ok(AuthOutcome { method: AuthMethod::Token, token: Some(claims) })
        }
        AuthRuntime::Scram(verifier) => {
            super::send(conn, msg::auth_sasl(&[scram::MECHANISM]).as_bytes()).await?;
            let f = expect_password_message(conn, buf).await?;
            let (mechanism, data) = msg::parse_sasl_initial_response(f.body()).map_err(malformed)?;
            if mechanism != scram::MECHANISM {
                return Err(AuthFailure::Refused(PgError::fatal(
                    SqlState::PROTOCOL_VIOLATION,
                    format!("phigate refused the connection: SASL mechanism {mechanism:?} was not offered"),
                )));
            }
            let refused = |e: ScramError| {
                let code = if e == ScramError::WrongPassword { SqlState::INVALID_PASSWORD } else { SqlState::PROTOCOL_VIOLATION };
                AuthFailure::Refused(
                    PgError::fatal(code, format!("phigate refused the connection: password authentication failed for identity \"{identity}\""))
                        .with_detail(e.to_string()),
                )
            };
            let mut exchange = Exchange::new(verifier);
            let server_first = exchange.client_first(data).map_err(refused)?;
            super::send(conn, msg::auth_sasl_continue(&server_first).as_bytes()).await?;
            let f = expect_password_message(conn, buf).await?;
            let server_final = exchange.client_final(f.body()).map_err(refused)?;
            super::send(conn, msg::auth_sasl_final(&server_final).as_bytes()).await?;
            Ok(AuthOutcome { method: AuthMethod::Scram, token: None })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{io::AsyncWriteExt, net::TcpStream};

    use super::*;
    use crate::identity::token::{IssuerConfig, JwksSource};

    /// Run a token exchange in which the client answers with `password`.
    async fn token_exchange(verifier: TokenVerifier, password: &str) -> Result<AuthOutcome, AuthFailure> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("address")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        client.write_all(msg::password_message(password.as_bytes()).as_bytes()).await.expect("write");
        let auth = AuthRuntime::Token { verifier: Arc::new(verifier), allowed_subjects: Vec::new(), required_groups: Vec::new() };
        authenticate(&mut Conn::Plain(server), &mut BytesMut::new(), "billing", &auth).await
    }

    #[tokio::test]
    async fn the_client_does_not_learn_where_the_issuer_keys_live() {
        let dir = tempfile::tempdir().expect("tempdir");
        let jwks = dir.path().join("internal-idp-keys.json");
        let verifier = TokenVerifier::new(IssuerConfig {
            name: "corp".into(),
            issuer: "https://idp.test/".into(),
            audiences: vec!["phigate".into()],
            algorithms: vec![jsonwebtoken::Algorithm::ES256],
            leeway_secs: 0,
            groups_claim: "groups".into(),
            jwks: JwksSource::File(jwks.clone()),
        });
        // A syntactically fine token (header {"alg":"ES256","kid":"k1"}); the keys
        // cannot be loaded.
        let token = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJ4In0.c2ln";
        let Err(AuthFailure::Refused(e)) = tokio::time::timeout(Duration::from_secs(10), token_exchange(verifier, token)).await.expect("in time") else {
            panic!("refused")
        };
        let said = format!("{} {:?} {:?}", e.message, e.detail, e.hint);
        assert!(said.contains("signing keys are unavailable"), "{said}");
        assert!(!said.contains("internal-idp-keys"), "the client was told where the keys live: {said}");
    }
}

//! TLS for both ends of a session (rustls, ring provider): the certificate phigate
//! offers workloads that send SSLRequest, and the connector for the agent's own
//! connection to the database with libpq's sslmode semantics.
//!
//! | mode | encrypts | verifies chain | verifies name |
//! |---|---|---|---|
//! | disable | no | – | – |
//! | prefer | if the server agrees | no | no |
//! | require | yes | no | no |
//! | verify-ca | yes | yes (ca_file) | no |
//! | verify-full | yes | yes (ca_file) | yes (server_name, or the upstream IP) |
//!
//! `prefer`/`require` encrypt without authenticating the server, exactly like libpq;
//! production deployments should use `verify-full`.

use std::{fs, io, net::IpAddr, path::Path, sync::Arc};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ClientTlsConfig, SslMode, UpstreamTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {err}")]
    Read { path: String, err: io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key")]
    NoKey { path: String },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|err| TlsError::Read { path: path.display().to_string(), err })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice()).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.display().to_string() });
    }
    Ok(certs)
}

/// The acceptor for workloads' SSLRequest.
pub fn client_acceptor(cfg: &ClientTlsConfig) -> Result<TlsAcceptor, TlsError> {
    let chain = certs(&cfg.cert_file)?;
    let pem = read(&cfg.key_file)?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut pem.as_slice()).ok().flatten().ok_or_else(|| TlsError::NoKey { path: cfg.key_file.display().to_string() })?;
    let mut config =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?.with_no_client_auth().with_single_cert(chain, key)?;
    // PostgreSQL 17 direct SSL requires ALPN "postgresql"; classic SSLRequest clients
    // may send it too.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// How the agent connects to one database.
#[derive(Clone)]
pub struct UpstreamTls {
    pub mode: SslMode,
    connector: Option<TlsConnector>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UpstreamTls({:?}, {:?})", self.mode, self.server_name)
    }
}

impl UpstreamTls {
    pub fn new(cfg: &UpstreamTlsConfig, upstream_ip: IpAddr) -> Result<Self, TlsError> {
        let server_name = match &cfg.server_name {
            Some(n) => ServerName::try_from(n.clone()).map_err(|_| TlsError::ServerName(n.clone()))?,
            None => ServerName::IpAddress(upstream_ip.into()),
        };
        let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
        let config = match cfg.mode {
            SslMode::Disable => return Ok(Self { mode: cfg.mode, connector: None, server_name }),
            SslMode::Prefer | SslMode::Require => builder.dangerous().with_custom_certificate_verifier(Arc::new(EncryptOnly(provider()))).with_no_client_auth(),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let path = cfg.ca_file.as_deref().expect("invariant: config validation requires ca_file for verify modes");
                let mut roots = RootCertStore::empty();
                for c in certs(path)? {
                    roots.add(c)?;
                }
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build().map_err(|e| rustls::Error::General(e.to_string()))?;
                if cfg.mode == SslMode::VerifyFull {
                    builder.with_webpki_verifier(webpki).with_no_client_auth()
                } else {
                    builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(webpki))).with_no_client_auth()
                }
            }
        };
        Ok(Self { mode: cfg.mode, connector: Some(TlsConnector::from(Arc::new(config))), server_name })
    }

    pub fn connector(&self) -> Option<(&TlsConnector, ServerName<'static>)> {
        self.connector.as_ref().map(|c| (c, self.server_name.clone()))
    }
}

/// sslmode=prefer/require: encrypt, accept any certificate (libpq semantics), but
/// still check the handshake signatures so the session keys are the server's.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// sslmode=verify-ca: the chain must lead to the configured CA; the name is not
/// checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

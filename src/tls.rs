//! What every TLS client and server of the platform shares: PEM files read
//! into rustls types, the one crypto provider (ring, pure Rust but for its
//! assembly), and the verifiers for connections that check less than a
//! full chain and name (a server's own health check; PostgreSQL's
//! `sslmode=require` and `verify-ca`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, RootCertStore};

/// Why TLS could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    Missing { path: PathBuf, what: &'static str },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("the certificate and key do not form a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("the client CA cannot verify clients: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
    #[error("the CA cannot verify servers: {0}")]
    Verifier(String),
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file, in order.
pub(crate) fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::Missing {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certificates)
}

pub(crate) fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Missing {
            path: path.to_owned(),
            what: "private key",
        },
        e => TlsError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        },
    })
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What identifies a file's contents without reading them (when it was
/// last written, and its length), so that a file is re-read only when it
/// changed; `None` while it is missing. One small metadata call, cheap
/// enough for a task that looks every few seconds.
pub(crate) fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// How much of a server's certificate a client checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCheck {
    /// Nothing: the connection is encrypted, its peer unproven (libpq's
    /// `require` without a CA).
    Nothing,
    /// The chain to a trusted CA, not the name (libpq's `verify-ca`).
    Chain,
    /// The chain and the name (libpq's `verify-full`, and the web's).
    ChainAndName,
}

/// A client configuration that checks a server's certificate as `check`
/// says, trusting the CAs in `ca` (the system's when `None`).
pub fn client_config(
    check: ServerCheck,
    ca: Option<&Path>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?;
    Ok(match check {
        ServerCheck::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PartialCheck::nothing()))
            .with_no_client_auth(),
        ServerCheck::Chain => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PartialCheck::chain(roots(ca)?)?))
            .with_no_client_auth(),
        ServerCheck::ChainAndName => builder
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth(),
    })
}

/// Roots of trust: the CAs in `ca`, or the system's.
fn roots(ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for certificate in certificates(path)? {
                roots.add(certificate).map_err(|e| TlsError::Invalid {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    Ok(roots)
}

/// Checks less of a server's certificate than the web does: its chain to
/// the roots but not its name (libpq's `verify-ca`), or nothing at all (a
/// server's own health check on loopback, libpq's `require`). Either way
/// the handshake's signature proves the peer holds the certificate's key.
#[derive(Debug)]
pub(crate) struct PartialCheck {
    /// `None`: any certificate.
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PartialCheck {
    pub(crate) fn nothing() -> Self {
        Self {
            chain: None,
            provider: provider(),
        }
    }

    fn chain(roots: RootCertStore) -> Result<Self, TlsError> {
        let provider = provider();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        Ok(Self {
            chain: Some(verifier),
            provider,
        })
    }
}

impl rustls::client::danger::ServerCertVerifier for PartialCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        let Some(chain) = &self.chain else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            verdict => verdict,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

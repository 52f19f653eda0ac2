//! TLS for every gRPC server (rustls, pure Rust): certificates read from PEM
//! files and re-read when they change, so a renewed certificate needs no
//! restart; with a client CA, clients must present a certificate it issued
//! (mutual TLS). And TLS for this platform's own clients.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::idle::{Quiet, Watched};
use crate::config::TlsArgs;
pub use crate::tls::TlsError;
use crate::tls::{PartialCheck, certificates, file_stamp, private_key, provider, read};

/// How often the certificate files are checked for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(2);
/// Handshakes in progress before the accept loop waits for one to finish.
const PENDING_HANDSHAKES: usize = 256;

/// The files a TLS server reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files to serve TLS with; `None` serves plaintext.
    pub fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }
}

impl TlsFiles {
    /// The server configuration these files make now.
    fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let chain = certificates(&self.cert)?;
        let key = private_key(&self.key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for certificate in certificates(path)? {
                    roots.add(certificate).map_err(|e| TlsError::Invalid {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key)?;
        // gRPC needs HTTP/2; HTTP/1.1 serves plain GETs such as /metrics.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// What identifies the files' current contents without reading them.
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|path| file_stamp(path))
            .collect()
    }
}

/// A server's TLS configuration, swapped whole when its files change.
#[derive(Debug, Clone)]
pub struct ServerTls {
    files: TlsFiles,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ServerTls {
    /// Loads `files`; a server does not start on files that do not load.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = files.load()?;
        Ok(Self {
            files,
            current: Arc::new(RwLock::new(config)),
        })
    }

    fn acceptor(&self) -> TlsAcceptor {
        let config = self.current.read().unwrap_or_else(|p| p.into_inner());
        TlsAcceptor::from(Arc::clone(&config))
    }

    /// Re-reads the files whenever they change, until `stopping`: new
    /// connections get the new certificate, open ones keep theirs. Files
    /// that do not load (half-written, or a key that does not match) are
    /// logged and the last good configuration stays.
    pub async fn reload_on_change(self, stopping: CancellationToken) {
        let mut seen = self.files.stamp();
        loop {
            tokio::select! {
                () = stopping.cancelled() => return,
                () = tokio::time::sleep(RELOAD_CHECK) => {}
            }
            let stamp = self.files.stamp();
            if stamp == seen {
                continue;
            }
            seen = stamp;
            match self.files.load() {
                Ok(config) => {
                    *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Err(error) => tracing::warn!(
                    %error,
                    "TLS files changed but do not load: still serving the previous certificate"
                ),
            }
        }
    }

    /// Connections accepted on `listener`, each through its TLS handshake
    /// (bounded by `handshake_timeout`) in a task of its own, so that a
    /// client that never finishes one holds up nobody else. Ends when the
    /// server stops taking connections.
    pub fn incoming(
        self,
        listener: tokio::net::TcpListener,
        quiet: Quiet,
        handshake_timeout: Duration,
    ) -> impl Stream<Item = io::Result<tokio_rustls::server::TlsStream<Watched<TcpStream>>>> {
        use tokio_stream::StreamExt as _;
        let (ready, handshaken) = tokio::sync::mpsc::channel(PENDING_HANDSHAKES);
        tokio::spawn(async move {
            let mut accepted = TcpIncoming::from(listener).with_nodelay(Some(true));
            loop {
                let stream = tokio::select! {
                    // The server stopped: so does accepting (the listener closes).
                    () = ready.closed() => return,
                    next = accepted.next() => match next {
                        Some(Ok(stream)) => stream,
                        Some(Err(error)) => {
                            tracing::debug!(%error, "accepting a connection failed");
                            continue;
                        }
                        None => return,
                    },
                };
                let (acceptor, ready) = (self.acceptor(), ready.clone());
                tokio::spawn(async move {
                    let peer = stream.peer_addr().ok();
                    let handshake = acceptor.accept(Watched::new(stream, quiet));
                    match tokio::time::timeout(handshake_timeout, handshake).await {
                        Ok(Ok(tls)) => {
                            let _ = ready.send(Ok(tls)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(?peer, %error, "TLS handshake refused");
                        }
                        Err(_) => tracing::debug!(
                            ?peer,
                            ?handshake_timeout,
                            "TLS handshake not finished in time: closed"
                        ),
                    }
                });
            }
        });
        ReceiverStream::new(handshaken)
    }
}

/// How this platform's clients (a projector reading command-svc's log)
/// speak TLS to an `https://` server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA to trust; the system's roots when `None`.
    pub ca: Option<PathBuf>,
    /// The certificate and key to present, where the server requires one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    pub fn config(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(config)
    }
}

/// A server's own health check (`--check-health`), over TLS: it asks the
/// server on its own port on loopback, so it accepts the server's
/// certificate whoever issued it (the handshake's signature is still
/// checked) and, under mutual TLS, presents that same certificate.
pub(super) async fn health_channel(
    addr: std::net::SocketAddr,
    files: &TlsFiles,
) -> Result<tonic::transport::Channel, String> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PartialCheck::nothing()));
    let mut config = if files.client_ca.is_some() {
        let chain = certificates(&files.cert).map_err(|e| e.to_string())?;
        let key = private_key(&files.key).map_err(|e| e.to_string())?;
        config
            .with_client_auth_cert(chain, key)
            .map_err(|e| e.to_string())?
    } else {
        config.with_no_client_auth()
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = ServiceFn(move |_uri| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_with_connector(connect)
        .await
        .map_err(|e| format!("cannot connect to {addr} over TLS: {e}"))
}

/// A connector: an async function of the URI.
#[derive(Clone)]
struct ServiceFn<F>(F);

impl<F, Fut, T> tonic::codegen::Service<http::Uri> for ServiceFn<F>
where
    F: FnMut(http::Uri) -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    type Response = T;
    type Error = io::Error;
    type Future = Fut;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Fut {
        (self.0)(uri)
    }
}

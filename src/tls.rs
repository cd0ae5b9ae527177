//! Optional TLS on the public listeners (`--tls-cert`, `--tls-key`): rustls with the
//! ring provider; the HTTP listener offers HTTP/2 and HTTP/1.1 by ALPN
//! ([`HTTP_ALPN`]), the PostgreSQL one `postgresql` ([`PG_ALPN`]). The certificate
//! is re-read on SIGHUP ([`TlsConfig::reload`]) so a renewed one (e.g. by certbot)
//! takes effect without a restart; connections already open keep the one they
//! started with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is missing, unreadable or holds no PEM certificate.
    #[error("cannot read a PEM certificate chain from {path}: {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The key file is missing, unreadable or holds no PEM private key.
    #[error("cannot read a PEM private key from {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Certificate and key do not belong together, or rustls refuses them.
    #[error("certificate {cert} and key {key} cannot be used together: {reason}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        reason: String,
    },
}

/// ALPN protocols of the HTTP listener.
pub const HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// ALPN protocol of the PostgreSQL listener (libpq 17 sends it).
pub const PG_ALPN: &[&[u8]] = &[b"postgresql"];

/// A listener's TLS settings; cheap to clone, shared by every connection.
#[derive(Clone)]
pub struct TlsConfig {
    cert: PathBuf,
    key: PathBuf,
    alpn: &'static [&'static [u8]],
    current: Arc<RwLock<TlsAcceptor>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Loads the certificate chain and key (PEM files), offering `alpn`.
    pub fn load(cert: &Path, key: &Path, alpn: &'static [&'static [u8]]) -> Result<Self, TlsError> {
        let acceptor = acceptor(cert, key, alpn)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            alpn,
            current: Arc::new(RwLock::new(acceptor)),
        })
    }

    /// Re-reads both files. On error the previous certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = acceptor(&self.cert, &self.key, self.alpn)?;
        *self.current.write().expect("tls lock") = fresh;
        Ok(())
    }

    /// The certificate in use now, for a connection about to start TLS.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().expect("tls lock").clone()
    }

    /// The TLS handshake of one connection, bounded by `timeout`.
    pub(crate) async fn accept(
        &self,
        socket: TcpStream,
        timeout: Duration,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        match tokio::time::timeout(timeout, self.acceptor().accept(socket)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}

fn acceptor(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Certificate {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Certificate {
            path: cert.to_owned(),
            reason: "no CERTIFICATE block in the file".into(),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    let mismatch = |e: rustls::Error| TlsError::Mismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    };
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(mismatch)?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(mismatch)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

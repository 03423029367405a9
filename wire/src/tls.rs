//! TLS for `amqps://` URLs, the same on both sides: which certificate authorities to trust (the system's, plus
//! a private CA from a PEM file) and an optional client certificate (for `auth_mechanism=external` or a broker
//! that requires one). Verification of the server's certificate and host name is always on: there is no
//! setting that turns it off, and an `amqps` URL never falls back to plaintext. Files are read and checked
//! once, when loaded, so a wrong path or a file that holds no certificate is an error naming the file.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The PEM files an operator names (`--tls-ca`, `--tls-cert`, `--tls-key`, or the config file).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate(s) of a CA to trust besides the system's.
    pub ca: Option<PathBuf>,
    /// Client certificate (chain), PEM.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

/// TLS material loaded from [`TlsFiles`]. `Debug` never shows the key.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tls {
    ca_pem: Option<String>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("private_ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {err}")]
    Read {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("{0} holds no PEM certificate (-----BEGIN CERTIFICATE-----): pass a PEM file")]
    NoCertificate(PathBuf),
    #[error(
        "{0} holds no PEM private key: pass the key of the client certificate (PKCS#8, PKCS#1 or SEC1 PEM)"
    )]
    NoKey(PathBuf),
    #[error(
        "a client certificate needs its key and a key its certificate: pass both --tls-cert and --tls-key"
    )]
    HalfIdentity,
    #[error("the client certificate and key cannot be used: {0}")]
    Identity(String),
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|err| TlsError::Read {
        what,
        path: path.to_owned(),
        err,
    })
}

fn certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

impl Tls {
    /// Reads and checks the files.
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let ca_pem = match &files.ca {
            Some(path) => {
                let pem = read("the CA file", path)?;
                certificates(&pem, path)?;
                Some(String::from_utf8_lossy(&pem).into_owned())
            }
            None => None,
        };
        let identity = match (&files.cert, &files.key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let cert_pem = read("the client certificate", cert)?;
                certificates(&cert_pem, cert)?;
                let key_pem = read("the client key", key)?;
                PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|_| TlsError::NoKey(key.clone()))?;
                Some((cert_pem, key_pem))
            }
            _ => return Err(TlsError::HalfIdentity),
        };
        let tls = Tls { ca_pem, identity };
        // Building the client configuration once checks that the key matches the certificate.
        tls.client_config()?;
        Ok(tls)
    }

    /// The private CA's certificates (PEM), if one was given: for other clients of the same broker (its
    /// management API).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The configuration lapin connects with.
    pub fn lapin(&self) -> lapin::tcp::OwnedTLSConfig {
        lapin::tcp::OwnedTLSConfig {
            identity: self
                .identity
                .as_ref()
                .map(|(cert, key)| lapin::tcp::OwnedIdentity::PKCS8 {
                    pem: cert.clone(),
                    key: key.clone(),
                }),
            cert_chain: self.ca_pem.clone(),
        }
    }

    /// A rustls client configuration (the system's roots plus the private CA, and the client certificate), for
    /// clients that speak AMQP without lapin.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        // Unreadable system certificates are skipped: a private CA may be all there is.
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(pem) = &self.ca_pem {
            roots.add_parsable_certificates(
                CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok),
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Identity(e.to_string()))?
            .with_root_certificates(roots);
        let config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let certs = CertificateDer::pem_slice_iter(cert)
                    .filter_map(Result::ok)
                    .collect();
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| TlsError::Identity(e.to_string()))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| TlsError::Identity(e.to_string()))?
            }
        };
        Ok(Arc::new(config))
    }
}

/// Why a TLS handshake failed, for an operator: the certificate problem, or a server that does not speak TLS.
/// `None` if `e` is not a TLS error (a network problem: worth a retry).
pub fn explain(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cause {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(describe(tls));
        }
        cause = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

fn describe(e: &rustls::Error) -> String {
    use rustls::{CertificateError, Error};
    match e {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "the broker's certificate is not signed by a trusted CA ({e}): pass the CA that signed it with --tls-ca"
        ),
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!("the broker's certificate has expired ({e}): the broker needs a new one"),
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the broker's certificate does not name the host in the URL ({e}): connect by a name the certificate lists"
        ),
        Error::InvalidCertificate(_) => format!("the broker's certificate is not valid: {e}"),
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => format!(
            "the server did not answer in TLS ({e}): is this a plaintext port? RabbitMQ's TLS port is usually 5671"
        ),
        Error::AlertReceived(alert) => format!(
            "the broker refused the TLS handshake ({alert:?}): does it require a client certificate (--tls-cert, --tls-key) or one signed by another CA?"
        ),
        other => format!("TLS failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_checked_when_loaded() {
        let dir = std::env::temp_dir().join(format!("ea-wire-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let load = |ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>| {
            Tls::load(&TlsFiles {
                ca: ca.map(Path::to_owned),
                cert: cert.map(Path::to_owned),
                key: key.map(Path::to_owned),
            })
        };
        assert_eq!(load(None, None, None).unwrap(), Tls::default());
        assert!(matches!(
            load(Some(&junk), None, None),
            Err(TlsError::NoCertificate(_))
        ));
        assert!(matches!(
            load(Some(&dir.join("missing.pem")), None, None),
            Err(TlsError::Read { .. })
        ));
        assert!(matches!(
            load(None, Some(&junk), None),
            Err(TlsError::HalfIdentity)
        ));
        assert!(matches!(
            load(None, Some(&junk), Some(&junk)),
            Err(TlsError::NoCertificate(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn explains_tls_errors_and_leaves_others() {
        let unknown = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(explain(&unknown).unwrap().contains("--tls-ca"));
        let plain = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        );
        assert!(explain(&plain).unwrap().contains("plaintext port"));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(explain(&reset), None);
    }
}

//! TLS for the scenarios: a test PKI made inside the test (a CA, certificates for `localhost` that are good,
//! expired, for another name or from another CA, and client certificates), and a TLS-terminating proxy in front
//! of the broker. The proxy accepts TLS only (a plaintext client fails its handshake and is counted), can
//! require a client certificate, can switch the certificate it presents while it runs, and records the local
//! port of every connection it opens to the broker, so a test can tell that a connection the broker sees came
//! through TLS.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    date_time_ymd,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// PEM files of a test PKI, written to a directory.
pub struct TestPki {
    pub dir: PathBuf,
    /// The CA the agent is told to trust.
    pub ca: PathBuf,
    /// A CA nobody trusts.
    pub other_ca: PathBuf,
    /// A client certificate and key signed by `ca`, common name `client_cn`.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub client_cn: String,
    server: [(String, String); 4],
}

/// Which certificate the proxy presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presents {
    /// For `localhost` and 127.0.0.1, signed by the trusted CA.
    Good,
    /// The same names, signed by a CA the agent does not trust.
    OtherCa,
    /// Expired on 2021-01-01.
    Expired,
    /// For `elsewhere.invalid` only.
    WrongName,
}

struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("a CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("a self-signed CA");
    Ca {
        cert_pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A certificate for `names` (the first is the common name) signed by `by`: (cert PEM, key PEM).
fn leaf(by: &Ca, names: &[&str], expired: bool) -> (String, String) {
    let key = KeyPair::generate().expect("a key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    if expired {
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2021, 1, 1);
    }
    let cert = params
        .signed_by(&key, &by.issuer)
        .expect("a signed certificate");
    (cert.pem(), key.serialize_pem())
}

impl TestPki {
    /// Generates the PKI and writes its files under `dir` (created). `client_cn` names the client certificate.
    pub fn generate(dir: &Path, client_cn: &str) -> TestPki {
        std::fs::create_dir_all(dir).expect("pki dir");
        let trusted = ca("endpoint-agent test CA");
        let other = ca("a CA nobody trusts");
        let names = ["localhost", "127.0.0.1"];
        let server = [
            leaf(&trusted, &names, false),
            leaf(&other, &names, false),
            leaf(&trusted, &names, true),
            leaf(&trusted, &["elsewhere.invalid"], false),
        ];
        let (client_pem, client_key_pem) = leaf(&trusted, &[client_cn], false);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("pki file");
            path
        };
        TestPki {
            dir: dir.to_owned(),
            ca: write("ca.pem", &trusted.cert_pem),
            other_ca: write("other-ca.pem", &other.cert_pem),
            client_cert: write("client.pem", &client_pem),
            client_key: write("client.key", &client_key_pem),
            client_cn: client_cn.to_owned(),
            server,
        }
    }

    fn server_config(
        &self,
        presents: Presents,
        client_ca: Option<&Path>,
    ) -> Arc<rustls::ServerConfig> {
        let (cert, key) = &self.server[presents as usize];
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<_, _>>()
            .expect("server certificate PEM");
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("server key PEM");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions");
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                let pem = std::fs::read(ca).expect("client CA");
                for c in CertificateDer::pem_slice_iter(&pem) {
                    roots.add(c.expect("client CA PEM")).expect("client CA");
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()
                .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        Arc::new(builder.with_single_cert(certs, key).expect("server config"))
    }
}

/// A TLS-terminating proxy: TLS from clients, plaintext to `upstream`.
pub struct TlsProxy {
    /// `localhost:<port>`, for URLs (the certificates name `localhost`).
    pub addr: String,
    presents: watch::Sender<Presents>,
    handshakes: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    upstream_ports: Arc<Mutex<BTreeSet<u16>>>,
    accept: JoinHandle<()>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TlsProxy {
    /// Listens on 127.0.0.1 (a free port). With `require_client_cert`, a client must present a certificate
    /// signed by the PKI's CA.
    pub async fn start(upstream: String, pki: &TestPki, require_client_cert: bool) -> TlsProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the TLS proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let configs: Vec<Arc<rustls::ServerConfig>> = [
            Presents::Good,
            Presents::OtherCa,
            Presents::Expired,
            Presents::WrongName,
        ]
        .iter()
        .map(|p| pki.server_config(*p, require_client_cert.then_some(pki.ca.as_path())))
        .collect();
        let (presents, watch_presents) = watch::channel(Presents::Good);
        let handshakes = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let upstream_ports = Arc::new(Mutex::new(BTreeSet::new()));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (handshakes, refused, upstream_ports, conns) = (
                handshakes.clone(),
                refused.clone(),
                upstream_ports.clone(),
                conns.clone(),
            );
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let config = configs[*watch_presents.borrow() as usize].clone();
                    let upstream = upstream.clone();
                    let (handshakes, refused, upstream_ports) =
                        (handshakes.clone(), refused.clone(), upstream_ports.clone());
                    let task = tokio::spawn(async move {
                        let tls = match tokio_rustls::TlsAcceptor::from(config).accept(client).await
                        {
                            Ok(s) => s,
                            Err(_) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        };
                        handshakes.fetch_add(1, Ordering::Relaxed);
                        let Ok(server) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        if let Ok(local) = server.local_addr() {
                            upstream_ports.lock().expect("ports").insert(local.port());
                        }
                        let (mut tls, mut server) = (tls, server);
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                    });
                    conns.lock().expect("conns").push(task);
                }
            }
        });
        TlsProxy {
            addr: format!("localhost:{port}"),
            presents,
            handshakes,
            refused,
            upstream_ports,
            accept,
            conns,
        }
    }

    /// From now on, new connections are offered this certificate.
    pub fn present(&self, which: Presents) {
        self.presents.send_replace(which);
    }

    /// Drops every connection open through the proxy (the clients must reconnect).
    pub fn cut(&self) {
        for c in self.conns.lock().expect("conns").drain(..) {
            c.abort();
        }
    }

    /// TLS handshakes completed.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Connections whose TLS handshake failed (a plaintext client, an untrusted or missing certificate).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Local ports of the proxy's connections to the broker: the peer ports the broker sees for them.
    pub fn upstream_ports(&self) -> BTreeSet<u16> {
        self.upstream_ports.lock().expect("ports").clone()
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

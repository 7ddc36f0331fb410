//! TLS on the control plane's two listeners, the REST API and the proxies' gRPC, on by default.
//!
//! The serving certificate comes from the mesh CA, for the names and addresses the control
//! plane is reached by (`localhost`, `127.0.0.1`, `::1`, the bound addresses unless unspecified,
//! and every `--san`); its chain ends with the signing root, so a proxy can find the root its
//! join token pins. A key is made at start and kept for the process; the certificate is issued
//! at start, renewed at half its lifetime, and re-issued at once when the CA's signing root
//! changes. Client certificates are asked for on the gRPC listener, never required, and
//! verified against the current trust bundle: a proxy's workload certificate is how it proves
//! itself once its join token has expired ([`crate::admission`]).
//!
//! Each accepted connection is handshaken in its own task under a deadline, so a slow or silent
//! client never holds up the accept loop; finished connections are handed to axum (through
//! [`ApiListener`]) and to tonic (as a stream of [`ControlConn`], whose connect info is the
//! [`ControlPeer`]). `--insecure-plaintext` runs the same loop without TLS.

use crate::admission::{ControlPeer, PeerCert};
use crate::ca::{Ca, CaError};
use crate::metrics::{ControlMetrics, HandshakeLabel};
use parking_lot::RwLock;
use rcgen::{KeyPair, SanType};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use weft_core::Shutdown;
use weft_core::tls::RootsClientVerifier;

/// Lifetime of the serving certificate; renewed at half of it.
pub(crate) const SERVING_TTL: Duration = Duration::from_secs(7 * 86_400);
/// Time a client has to finish its TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once; the accept loop waits beyond it (the connections wait
/// in the listen backlog, their deadline not started). Handshakes share the CPU: thousands at
/// once (a cold start, a reconnect storm) only slowed each other past the deadline, and every
/// one that timed out was a handshake wasted and done again.
const MAX_HANDSHAKES: usize = 128;
/// How often the serving certificate's expiry is looked at (root changes wake it at once).
const RENEW_CHECK: Duration = Duration::from_secs(60);
/// The file in the data directory holding the roots to trust (PEM, mode 0644).
pub const CA_FILE: &str = "ca.pem";

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("--san {value:?}: {reason}")]
    San { value: String, reason: String },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("serving certificate: {0}")]
    Tls(String),
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// The serving certificate and the TLS configurations of both listeners.
pub(crate) struct Serving {
    key: KeyPair,
    sans: Vec<SanType>,
    resolver: Arc<Resolver>,
    issued: RwLock<Issued>,
    clients: Arc<RootsClientVerifier>,
    bundle_epoch: RwLock<u64>,
    pub(crate) api: Arc<ServerConfig>,
    pub(crate) grpc: Arc<ServerConfig>,
}

/// What the certificate served was issued from.
#[derive(Clone, Debug)]
struct Issued {
    /// Generation of the root that signed it.
    generation: u64,
    /// Its expiry, unix seconds.
    not_after: u64,
    /// The root that signed it.
    root_pem: String,
}

/// A serving certificate issued and not yet served ([`Serving::serve`]).
pub(crate) struct Renewal {
    certified: Arc<CertifiedKey>,
    issued: Issued,
}

/// Hands every handshake the current certificate.
#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn tls_err(e: impl std::fmt::Display) -> ServingError {
    ServingError::Tls(e.to_string())
}

/// The names and addresses the serving certificate carries: always `localhost`, `127.0.0.1`
/// and `::1`, the bound addresses unless unspecified, then `extra` (each a DNS name or an IP).
pub(crate) fn sans(bound: &[SocketAddr], extra: &[String]) -> Result<Vec<SanType>, ServingError> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(
        bound
            .iter()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .map(|ip| ip.to_string()),
    );
    names.extend(extra.iter().cloned());
    let mut out: Vec<SanType> = Vec::new();
    for name in names {
        let invalid = |why: String| ServingError::San {
            value: name.clone(),
            reason: format!("neither an IP address nor a DNS name ({why})"),
        };
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                // The name clients will check against, by the same rules.
                rustls_pki_types::DnsName::try_from(name.as_str()).map_err(|e| invalid(e.to_string()))?;
                SanType::DnsName(name.as_str().try_into().map_err(|e: rcgen::Error| invalid(e.to_string()))?)
            }
        };
        if !out.contains(&san) {
            out.push(san);
        }
    }
    Ok(out)
}

// === impl Serving ===

impl Serving {
    pub(crate) fn new(ca: &Ca, sans: Vec<SanType>) -> Result<Self, ServingError> {
        let key = KeyPair::generate().map_err(tls_err)?;
        let (certified, issued) = Self::issue(ca, &key, &sans)?;
        let resolver = Arc::new(Resolver(RwLock::new(certified)));
        let clients = Arc::new(RootsClientVerifier::new(&ca.bundle_pem()).map_err(tls_err)?);
        let provider = weft_core::tls::provider();
        let mut api = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        api.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut grpc = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .with_client_cert_verifier(clients.clone())
            .with_cert_resolver(resolver.clone());
        grpc.alpn_protocols = vec![b"h2".to_vec()];
        // No resumption: a resumed session carries the client certificate of the handshake it
        // resumes (none, for a proxy's first connection; an expired one, later), not the one
        // the proxy holds now.
        grpc.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        grpc.send_tls13_tickets = 0;
        Ok(Self {
            key,
            sans,
            resolver,
            issued: RwLock::new(issued),
            clients,
            bundle_epoch: RwLock::new(ca.bundle_epoch()),
            api: Arc::new(api),
            grpc: Arc::new(grpc),
        })
    }

    fn issue(ca: &Ca, key: &KeyPair, sans: &[SanType]) -> Result<(Arc<CertifiedKey>, Issued), ServingError> {
        let issued = ca.issue_serving(key, sans, SERVING_TTL)?;
        let chain = weft_core::tls::certs_from_pem(&issued.chain_pem, "serving certificate").map_err(tls_err)?;
        let certified = CertifiedKey::from_der(chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()), &weft_core::tls::provider())
            .map_err(tls_err)?;
        let issued_from = Issued {
            generation: issued.generation,
            not_after: issued.not_after,
            root_pem: issued.root_pem,
        };
        Ok((Arc::new(certified), issued_from))
    }

    /// A new certificate when the signing root changed or half its lifetime passed; it is
    /// served once [`Serving::serve`] is called, after its root is trusted.
    pub(crate) fn renewal(&self, ca: &Ca) -> Result<Option<Renewal>, ServingError> {
        let Issued { generation, not_after, .. } = *self.issued.read();
        let half_life = not_after.saturating_sub(SERVING_TTL.as_secs() / 2);
        if generation == ca.generation() && now() < half_life {
            return Ok(None);
        }
        let (certified, issued) = Self::issue(ca, &self.key, &self.sans)?;
        Ok(Some(Renewal { certified, issued }))
    }

    /// Serves `renewal` from the next handshake on.
    pub(crate) fn serve(&self, renewal: Renewal) {
        let Renewal { certified, issued } = renewal;
        tracing::info!(
            generation = issued.generation,
            not_after = issued.not_after,
            "serving certificate re-issued"
        );
        *self.resolver.0.write() = certified;
        *self.issued.write() = issued;
    }

    /// Trusts a changed bundle for client certificates.
    pub(crate) fn trust_clients(&self, ca: &Ca) -> Result<(), ServingError> {
        let (epoch, bundle) = ca.bundle();
        if *self.bundle_epoch.read() == epoch {
            return Ok(());
        }
        self.clients.set_roots(&bundle).map_err(tls_err)?;
        *self.bundle_epoch.write() = epoch;
        Ok(())
    }

    /// The root of the certificate served now.
    pub(crate) fn root_pem(&self) -> String {
        self.issued.read().root_pem.clone()
    }

    /// The serving certificate's expiry (unix seconds).
    pub(crate) fn not_after(&self) -> u64 {
        self.issued.read().not_after
    }
}

/// Writes the roots to trust to `DIR/ca.pem` (mode 0644), atomically.
pub(crate) fn write_ca_file(data_dir: &Path, bundle_pem: &str) -> Result<(), ServingError> {
    use std::os::unix::fs::PermissionsExt;
    let path = data_dir.join(CA_FILE);
    let temp = data_dir.join(format!(".{CA_FILE}.tmp"));
    let write_err = |source| ServingError::Write {
        path: path.display().to_string(),
        source,
    };
    std::fs::write(&temp, bundle_pem).map_err(write_err)?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o644)).map_err(write_err)?;
    std::fs::rename(&temp, &path).map_err(write_err)
}

/// Keeps the serving certificate and `ca.pem` current until shutdown.
pub(crate) async fn maintain(
    serving: Option<Arc<Serving>>,
    mesh: Arc<crate::mesh::Mesh>,
    data_dir: std::path::PathBuf,
    shutdown: Shutdown,
) {
    let mut changed = mesh.watch();
    let (mut epoch, mut written) = mesh.ca.bundle();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RENEW_CHECK) => {}
            r = changed.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
        // The CA file must name the root of whatever certificate is served at every moment:
        // first the old and the new bundle's roots, then the new certificate's root, then it is
        // served, then the new bundle alone with the served root. A replica following the
        // leader can swap in a new generation at any moment (its CA reloads from the store on
        // another thread), so nothing read before the certificate is issued says what signed
        // it: trust goes by the certificate's own root. (Trusting by the bundle read first let
        // a follower serve a new root's certificate the file did not name: UnknownIssuer.)
        let bundle = {
            let (now, pem) = mesh.ca.bundle();
            (now != epoch).then(|| {
                epoch = now;
                pem
            })
        };
        if let Some(bundle) = &bundle {
            let both = union_of_roots(&written, bundle);
            update_ca_file(&data_dir, &mut written, &both);
        }
        if let Some(serving) = &serving {
            renew(serving, &mesh.ca, &data_dir, &mut written);
        }
        if let Some(bundle) = &bundle {
            let served = serving.as_ref().map(|s| s.root_pem()).unwrap_or_default();
            update_ca_file(&data_dir, &mut written, &union_of_roots(bundle, &served));
        }
    }
}

/// Re-issues the serving certificate if it is due, adding its root to the CA file before it
/// is served, and trusts the CA's bundle for client certificates.
fn renew(serving: &Serving, ca: &Ca, data_dir: &Path, written: &mut String) {
    match serving.renewal(ca) {
        Ok(Some(renewal)) => {
            let trusted = union_of_roots(written, &renewal.issued.root_pem);
            update_ca_file(data_dir, written, &trusted);
            if *written == trusted {
                serving.serve(renewal);
            }
        }
        Ok(None) => {}
        Err(error) => tracing::error!(%error, not_after = serving.not_after(), "cannot renew the serving certificate; retrying"),
    }
    if let Err(error) = serving.trust_clients(ca) {
        tracing::error!(%error, "cannot trust the CA's bundle for client certificates; retrying");
    }
}

/// Writes `pem` to the CA file unless it already holds exactly that.
fn update_ca_file(data_dir: &Path, written: &mut String, pem: &str) {
    if written == pem {
        return;
    }
    match write_ca_file(data_dir, pem) {
        Ok(()) => *written = pem.to_string(),
        Err(error) => tracing::error!(%error, "cannot update the CA file"),
    }
}

/// The certificates of `a` followed by those of `b` that `a` lacks, as PEM.
fn union_of_roots(a: &str, b: &str) -> String {
    const END: &str = "-----END CERTIFICATE-----";
    let blocks = |pem: &str| -> Vec<String> {
        pem.split_inclusive(END)
            .map(str::trim)
            .filter(|c| c.ends_with(END))
            .map(str::to_string)
            .collect()
    };
    let mut all = blocks(a);
    for cert in blocks(b) {
        if !all.contains(&cert) {
            all.push(cert);
        }
    }
    all.join("\n") + "\n"
}

// === accepting ===

/// A connection's byte stream, plain or after the TLS handshake.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted, handshaken connection and what it proved.
pub(crate) struct ControlConn {
    io: Io,
    pub(crate) peer: ControlPeer,
}

/// Accepts on `listener` until shutdown; handshakes each connection (TLS with `tls`, none
/// without) in its own task, and sends the finished ones on. `name` labels the metrics.
pub(crate) fn accept(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    name: &'static str,
    metrics: ControlMetrics,
    shutdown: Shutdown,
) -> mpsc::Receiver<ControlConn> {
    let (tx, rx) = mpsc::channel(256);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("never closed"),
                _ = shutdown.cancelled() => return,
            };
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(error) => {
                        tracing::warn!(listener = name, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (tx, acceptor, metrics) = (tx.clone(), acceptor.clone(), metrics.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let local = tcp.local_addr().ok();
                let outcome = match acceptor {
                    None => Ok(ControlConn {
                        io: Io::Plain(tcp),
                        peer: ControlPeer {
                            remote: Some(remote),
                            local,
                            cert: None,
                        },
                    }),
                    Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let cert = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| PeerCert::from_der(c));
                            Ok(ControlConn {
                                io: Io::Tls(Box::new(stream)),
                                peer: ControlPeer {
                                    remote: Some(remote),
                                    local,
                                    cert,
                                },
                            })
                        }
                        Ok(Err(error)) => Err(("failed", error.to_string())),
                        Err(_) => Err(("timed-out", format!("no handshake within {HANDSHAKE_TIMEOUT:?}"))),
                    },
                };
                let label = |outcome| HandshakeLabel { listener: name, outcome };
                match outcome {
                    Ok(conn) => {
                        metrics.handshakes.get_or_create(&label("accepted")).inc();
                        let _ = tx.send(conn).await;
                    }
                    Err((outcome, error)) => {
                        metrics.handshakes.get_or_create(&label(outcome)).inc();
                        tracing::debug!(listener = name, %remote, %error, "TLS handshake refused");
                    }
                }
            });
        }
    });
    rx
}

impl AsyncRead for ControlConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ControlConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for ControlConn {
    type ConnectInfo = ControlPeer;

    fn connect_info(&self) -> ControlPeer {
        self.peer.clone()
    }
}

/// Makes `Request::remote_addr()` work for connections of [`accept`]: tonic reads it from
/// `TcpConnectInfo`, which only its own listeners set.
pub(crate) fn connect_info(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    if let Some(peer) = req.extensions().get::<ControlPeer>().cloned() {
        req.extensions_mut().insert(tonic::transport::server::TcpConnectInfo {
            local_addr: peer.local,
            remote_addr: peer.remote,
        });
    }
    Ok(req)
}

// === impl ApiListener ===

/// How long a REST API request head may take to arrive whole (as on every sidecar listener).
pub(crate) const API_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The REST API's connections, for `axum::serve`.
pub(crate) struct ApiListener {
    pub(crate) rx: mpsc::Receiver<ControlConn>,
    pub(crate) local: SocketAddr,
    /// `--api-idle-timeout`: a connection that moves no byte for this long is closed.
    pub(crate) idle: Duration,
}

impl axum::serve::Listener for ApiListener {
    type Io = weft_core::framing::Scanned<ControlConn>;
    type Addr = SocketAddr;

    /// Each connection's request heads are timed (axum's `serve` has no head timeout of its
    /// own): one not whole within [`API_HEAD_TIMEOUT`] of the handshake, or of its first byte,
    /// ends the connection, so a client that sends part of a head holds nothing for long; and
    /// a connection that moves no byte for `idle` is closed.
    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        match self.rx.recv().await {
            Some(conn) => {
                let remote = conn.peer.remote.unwrap_or(self.local);
                let limits = weft_core::framing::HeadLimits {
                    max_headers: 100,
                    max_bytes: 64 * 1024,
                };
                (
                    weft_core::framing::Scanned::watching(conn, limits)
                        .head_timeout(API_HEAD_TIMEOUT)
                        .idle_timeout(self.idle),
                    remote,
                )
            }
            // The accept loop ended (shutdown): wait for axum's graceful shutdown to stop us.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serving_names_are_the_loopback_ones_the_bound_addresses_and_the_asked() {
        let bound = ["0.0.0.0:7070".parse().unwrap(), "10.0.0.5:7071".parse().unwrap()];
        let names = sans(&bound, &["control.mesh.internal".into(), "10.0.0.5".into(), "fd00::1".into()]).unwrap();
        let shown: Vec<String> = names
            .iter()
            .map(|n| match n {
                SanType::DnsName(d) => d.as_str().to_string(),
                SanType::IpAddress(ip) => ip.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            shown,
            ["localhost", "127.0.0.1", "::1", "10.0.0.5", "control.mesh.internal", "fd00::1"],
            "unspecified addresses left out, duplicates once"
        );
        for bad in ["bad name!", "", "-x.example", "a..b"] {
            let err = sans(&[], &[bad.to_string()]).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--san {bad:?}")), "{err}");
        }
    }

    /// The CA moved to a new signer after the bundle was read (a follower's reload, on another
    /// thread): the certificate it now issues is served only once the CA file names its root.
    /// (Before, the certificate was re-signed and served with the file still naming the old
    /// root alone until the next wake-up.)
    #[test]
    fn a_new_roots_certificate_is_served_only_once_the_ca_file_names_its_root() {
        let dir = std::env::temp_dir().join(format!("weft-serving-{}", std::process::id()));
        let store = crate::store::Store::open(&dir.join("store")).unwrap();
        let ca = Ca::open(&store, "weft.local", Duration::from_secs(3600), None).unwrap();
        let serving = Serving::new(&ca, sans(&[], &[]).unwrap()).unwrap();
        let mut written = ca.bundle_pem();
        write_ca_file(&dir, &written).unwrap();
        let old_root = serving.root_pem();
        ca.rotate(&store).unwrap();
        ca.switch_signer(&store).unwrap();
        renew(&serving, &ca, &dir, &mut written);
        let new_root = serving.root_pem();
        assert_ne!(new_root, old_root, "re-issued from the new root");
        let file = std::fs::read_to_string(dir.join(CA_FILE)).unwrap();
        assert!(file.contains(new_root.trim()), "the served root is trusted: {file}");
        assert!(file.contains(old_root.trim()), "the old root too, until the bundle drops it");
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    const A: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----";
    const B: &str = "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----";

    /// A root joining: the file gains it. A root leaving: the file keeps it until the second
    /// write (the union of old and new is the old).
    #[test]
    fn the_union_keeps_every_root_of_both_bundles_once() {
        let old = format!("{A}\n");
        let both = format!("{A}\n{B}\n");
        assert_eq!(union_of_roots(&old, &both), both);
        assert_eq!(union_of_roots(&both, &format!("{B}\n")), both);
        assert_eq!(union_of_roots(&format!("{B}\n"), &format!("{B}\n")), format!("{B}\n"));
    }
}

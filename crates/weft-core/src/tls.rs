//! TLS on the control channel, one piece of code for everyone who speaks it: the proxy, the CLI,
//! the control plane and the fleet simulator.
//!
//! - [`PinnedVerifier`]: how a proxy trusts the control plane with nothing but its join token.
//!   The token carries the SHA-256 fingerprint of the CA root; the control plane serves that root
//!   in its chain, and the proxy accepts the serving certificate only if a certificate of the
//!   chain has exactly that fingerprint and the leaf verifies against it (webpki) for the name
//!   or address it dialled. No trust on first use. Once the proxy holds a trust bundle received
//!   over that verified channel, the bundle's roots are what it trusts (a root rotation retires
//!   the pinned root).
//! - [`RootsClientVerifier`]: optional client certificates verified against a set of roots that
//!   can be replaced while serving (the mesh's trust bundle changes during a rotation).
//! - [`Connector`]: TCP, then TLS when built with a client configuration, for tonic channels and
//!   hyper clients alike.

use parking_lot::{Mutex, RwLock};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

/// ALPN for gRPC (the control stream).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1 (the CLI's REST calls).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: not PEM certificates: {message}")]
    Pem { what: String, message: String },
    #[error("{what}: holds no certificate")]
    Empty { what: String },
    #[error("{what}: certificate sha256:{fingerprint} cannot be a trust anchor: {message}")]
    Anchor {
        what: String,
        fingerprint: String,
        message: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The process's crypto provider (aws-lc-rs), built once.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// SHA-256 of a certificate's DER, lowercase hex: how tokens and logs name a CA.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Every certificate in `pem`; `what` names the file or field for errors.
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what: what.to_string() });
    }
    Ok(certs)
}

/// Trust anchors for every certificate in `pem`.
pub fn anchors_from_pem(pem: &str, what: &str) -> Result<Vec<TrustAnchor<'static>>, TlsError> {
    certs_from_pem(pem, what)?.iter().map(|c| anchor(c, what)).collect()
}

fn anchor(cert: &CertificateDer<'_>, what: &str) -> Result<TrustAnchor<'static>, TlsError> {
    webpki::anchor_from_trusted_cert(cert)
        .map(|a| a.to_owned())
        .map_err(|e| TlsError::Anchor {
            what: what.to_string(),
            fingerprint: fingerprint(cert),
            message: e.to_string(),
        })
}

/// Where a certificate failed: its chain (or validity), or the name it was checked for.
enum Failed {
    Chain(rustls::Error),
    Name(rustls::Error),
}

/// Verifies `end_entity` up to one of `anchors` for `usage`, and for `name` when given.
fn verify_chain(
    provider: &CryptoProvider,
    anchors: &[TrustAnchor<'_>],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
    name: Option<&ServerName<'_>>,
) -> Result<(), Failed> {
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| Failed::Chain(certificate_error(e)))?;
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(|e| Failed::Chain(certificate_error(e)))?;
    if let Some(name) = name {
        cert.verify_is_valid_for_subject_name(name)
            .map_err(|e| Failed::Name(certificate_error(e)))?;
    }
    Ok(())
}

fn certificate_error(e: webpki::Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(match e {
        webpki::Error::CertExpired { .. } => rustls::CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => rustls::CertificateError::NotValidYet,
        webpki::Error::UnknownIssuer => rustls::CertificateError::UnknownIssuer,
        webpki::Error::BadDer | webpki::Error::BadDerTime => rustls::CertificateError::BadEncoding,
        webpki::Error::CertNotValidForName(_) => rustls::CertificateError::NotValidForName,
        other => rustls::CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

/// A client configuration for the control channel.
pub fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    client_cert: Option<Arc<dyn ResolvesClientCert>>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client_cert {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every connection proves itself afresh: a resumed session would carry the client
    // certificate of the handshake it resumes, not the one held now.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The standard web PKI check (chain, validity, name) against the roots in `pem`: how the CLI
/// trusts the control plane from a CA file.
pub fn roots_verifier(pem: &str, what: &str) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(anchors_from_pem(pem, what)?);
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map(|v| v as Arc<dyn ServerCertVerifier>)
        .map_err(|e| TlsError::Config(e.to_string()))
}

// === impl PinnedVerifier ===

/// Trusts the control plane by the CA fingerprint a join token pins, then by the trust bundle
/// received over the channel that fingerprint verified.
#[derive(Debug)]
pub struct PinnedVerifier {
    /// As the token gives it: one fingerprint, or several comma-separated during a rotation.
    pin: String,
    pins: Vec<String>,
    provider: Arc<CryptoProvider>,
    /// Roots of the trust bundle received over a verified channel; they replace the pin.
    bundle: RwLock<Option<Arc<Vec<TrustAnchor<'static>>>>>,
    /// Why the last refused server was refused (taken by whoever reports it).
    refusal: Mutex<Option<String>>,
}

impl PinnedVerifier {
    /// `pin`: hex SHA-256 of the CA root's DER; during a root rotation a token pins the old and
    /// the new root, comma-separated, and either one verifies the control plane.
    pub fn new(pin: &str) -> Self {
        let pin = pin.to_ascii_lowercase();
        Self {
            pins: pin.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect(),
            pin,
            provider: provider(),
            bundle: RwLock::new(None),
            refusal: Mutex::new(None),
        }
    }

    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// Trusts the roots of `bundle_pem` from now on, instead of the pin. Call it only with a
    /// bundle that arrived over a channel this verifier accepted.
    pub fn trust_bundle(&self, bundle_pem: &str) -> Result<(), TlsError> {
        let anchors = anchors_from_pem(bundle_pem, "trust bundle")?;
        *self.bundle.write() = Some(Arc::new(anchors));
        Ok(())
    }

    /// Whether a trust bundle has replaced the pin.
    pub fn has_bundle(&self) -> bool {
        self.bundle.read().is_some()
    }

    /// Why the last server was refused, once.
    pub fn take_refusal(&self) -> Option<String> {
        self.refusal.lock().take()
    }

    fn refuse(&self, why: String) -> rustls::Error {
        *self.refusal.lock() = Some(why.clone());
        rustls::Error::General(why)
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bundle = self.bundle.read().clone();
        let (anchors, trusted) = match bundle {
            Some(roots) => ((*roots).clone(), "the trust bundle".to_string()),
            None => {
                let pinned: Vec<&CertificateDer<'_>> = intermediates.iter().filter(|c| self.pins.contains(&fingerprint(c))).collect();
                if pinned.is_empty() {
                    let presented: Vec<String> = intermediates.iter().map(|c| format!("sha256:{}", fingerprint(c))).collect();
                    let presented = if presented.is_empty() {
                        "no CA certificate".to_string()
                    } else {
                        presented.join(", ")
                    };
                    return Err(self.refuse(format!(
                        "the join token pins CA sha256:{}, but the control plane presented {presented}",
                        self.pin
                    )));
                }
                let anchors = pinned
                    .into_iter()
                    .map(|c| anchor(c, "the control plane's chain"))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| self.refuse(e.to_string()))?;
                (anchors, format!("the pinned CA sha256:{}", self.pin))
            }
        };
        verify_chain(
            &self.provider,
            &anchors,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            Some(server_name),
        )
        .map_err(|failed| match failed {
            Failed::Chain(e) => self.refuse(format!("the control plane's certificate does not verify against {trusted}: {e}")),
            Failed::Name(e) => self.refuse(format!(
                "the control plane's certificate is not valid for {}: {e} (add the name with `weft control --san`)",
                server_name.to_str()
            )),
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

// === impl RootsClientVerifier ===

/// Asks for a client certificate without requiring one, and accepts one only if it verifies
/// (client-auth usage, validity) against the current roots, which can be replaced at any time.
#[derive(Debug)]
pub struct RootsClientVerifier {
    provider: Arc<CryptoProvider>,
    anchors: RwLock<Arc<Vec<TrustAnchor<'static>>>>,
}

impl RootsClientVerifier {
    pub fn new(roots_pem: &str) -> Result<Self, TlsError> {
        Ok(Self {
            provider: provider(),
            anchors: RwLock::new(Arc::new(anchors_from_pem(roots_pem, "trust bundle")?)),
        })
    }

    /// Trusts the roots of `roots_pem` instead, for every handshake from now on.
    pub fn set_roots(&self, roots_pem: &str) -> Result<(), TlsError> {
        *self.anchors.write() = Arc::new(anchors_from_pem(roots_pem, "trust bundle")?);
        Ok(())
    }
}

impl ClientCertVerifier for RootsClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    /// No hints: a proxy has exactly one certificate to offer.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let anchors = self.anchors.read().clone();
        verify_chain(
            &self.provider,
            &anchors,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
        )
        .map_err(|(Failed::Chain(e) | Failed::Name(e))| e)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

// === impl Connector ===

/// Dials the control plane: plain TCP, or TLS with the configuration it was built with. A
/// connector is one or the other; it refuses URLs of the other scheme rather than silently
/// speaking plaintext.
#[derive(Clone)]
pub struct Connector {
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Connector {
    pub fn plaintext() -> Self {
        Self { tls: None }
    }

    pub fn tls(config: Arc<ClientConfig>) -> Self {
        Self {
            tls: Some(tokio_rustls::TlsConnector::from(config)),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    async fn connect(self, uri: http::Uri) -> std::io::Result<Conn> {
        let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
        let scheme = uri.scheme_str().unwrap_or("");
        let host = uri
            .host()
            .ok_or_else(|| invalid(format!("{uri}: no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
        match (scheme, &self.tls) {
            ("https", Some(_)) | ("http", None) => {}
            ("http", Some(_)) => return Err(invalid(format!("{uri}: plaintext to a control plane that should speak TLS"))),
            ("https", None) => return Err(invalid(format!("{uri}: TLS needs the mesh CA to trust"))),
            _ => return Err(invalid(format!("{uri}: unknown scheme {scheme:?} (http or https)"))),
        }
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = self.tls else {
            return Ok(Conn::Plain(hyper_util::rt::TokioIo::new(tcp)));
        };
        let name = ServerName::try_from(host.clone()).map_err(|_| invalid(format!("{host:?} is neither a DNS name nor an IP address")))?;
        let stream = tls.connect(name, tcp).await?;
        Ok(Conn::Tls(Box::new(hyper_util::rt::TokioIo::new(stream))))
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = Conn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Conn>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// A connection to the control plane.
pub enum Conn {
    Plain(hyper_util::rt::TokioIo<tokio::net::TcpStream>),
    Tls(Box<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>),
}

impl hyper::rt::Read for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: hyper::rt::ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_flush(cx),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(io) => io.is_write_vectored(),
            Conn::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}

impl hyper_util::client::legacy::connect::Connection for Conn {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        let connected = hyper_util::client::legacy::connect::Connected::new();
        match self {
            Conn::Tls(io) if io.inner().get_ref().1.alpn_protocol() == Some(ALPN_H2) => connected.negotiated_h2(),
            _ => connected,
        }
    }
}

#[cfg(test)]
mod tests;

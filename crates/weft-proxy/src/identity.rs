//! The proxy's workload identity: a key generated here (it never leaves the proxy), a
//! certificate the control plane's CA issues for it (the first on the strength of the join
//! token, every renewal on the strength of the current certificate, presented as the client
//! certificate of the control channel), renewed at half its lifetime, and the TLS
//! configurations built on it. A certificate is installed only if it is the identity this
//! workload expects: its own namespace and service account, its own name as the common name,
//! verifying against the trust bundle that came with it. Outbound, the server must present
//! exactly the SPIFFE ID the control plane gave for that endpoint; inbound, the client's
//! identity is read from its certificate. Without a valid certificate nothing is sent over mTLS:
//! the proxy fails closed.

use crate::state::Proxy;
use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use weft_api::proto::{self, distribution_client::DistributionClient};
use weft_core::Shutdown;

/// Renewal is attempted at this fraction of the certificate's lifetime.
const RENEW_AT: f64 = 0.5;

/// The identity slot of a proxy: empty until the first certificate arrives.
#[derive(Default)]
pub struct Identity {
    current: ArcSwapOption<Tls>,
    /// Wakes the renewal loop early (the CA's signing root changed).
    renew: tokio::sync::Notify,
}

/// TLS material for one certificate.
pub struct Tls {
    pub identity: String,
    /// Serial number, hex.
    pub serial: String,
    pub not_after: u64,
    /// Generation of the root that signed the certificate.
    pub generation: u64,
    /// The roots trusted (PEM).
    pub bundle_pem: String,
    pub server: Arc<ServerConfig>,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The certificate as the control channel's client certificate.
    certified: Arc<CertifiedKey>,
    /// Client configurations by the identity the server must present.
    clients: Mutex<HashMap<String, Arc<ClientConfig>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot reach the CA: {0}")]
    Unreachable(String),
    #[error("the CA refused: {0}")]
    Refused(String),
    #[error("unusable certificate material: {0}")]
    Material(String),
    #[error("the control plane issued {got}, but this proxy is {expected}: not installed")]
    NotMine { got: String, expected: String },
}

fn material(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Material(e.to_string())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

// === impl Identity ===

impl Identity {
    pub fn tls(&self) -> Option<Arc<Tls>> {
        self.current.load_full()
    }

    pub fn install(&self, tls: Tls) {
        self.current.store(Some(Arc::new(tls)));
    }

    /// The SPIFFE ID of the certificate held now.
    pub fn current_id(&self) -> Option<String> {
        self.current.load().as_ref().map(|t| t.identity.clone())
    }

    /// Follows the CA in a pushed config: trusts a new bundle at once (keeping the current
    /// certificate) and renews early when the CA signs with a newer root.
    pub fn follow(&self, bundle_pem: &str, ca_generation: u64) {
        let Some(tls) = self.tls() else { return };
        if !bundle_pem.is_empty() && bundle_pem != tls.bundle_pem {
            match tls.with_bundle(bundle_pem) {
                Ok(updated) => {
                    tracing::info!(roots = bundle_pem.matches("BEGIN CERTIFICATE").count(), "trust bundle updated");
                    self.install(updated);
                }
                Err(error) => tracing::warn!(%error, "unusable trust bundle; keeping the current one"),
            }
        }
        if ca_generation > tls.generation {
            self.renew.notify_one();
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("spiffe_id", &self.current_id()).finish()
    }
}

/// The control channel presents the workload's current certificate, whatever it is at the
/// moment of the handshake.
impl ResolvesClientCert for Identity {
    fn resolve(&self, _root_hints: &[&[u8]], sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        let tls = self.current.load_full()?;
        tls.certified.key.choose_scheme(sigschemes).is_some().then(|| tls.certified.clone())
    }

    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}

// === impl Tls ===

impl Tls {
    /// Builds the TLS configurations from a certificate chain, its key, and the trust bundle.
    pub fn new(
        identity: String,
        not_after: u64,
        generation: u64,
        chain_pem: &str,
        key: PrivateKeyDer<'static>,
        bundle_pem: &str,
    ) -> Result<Self, IdentityError> {
        let provider = weft_core::tls::provider();
        let chain = pem_certs(chain_pem)?;
        // Refuses a chain whose leaf is not for this key.
        let certified = Arc::new(CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(material)?);
        let serial = x509_parser::parse_x509_certificate(chain[0].as_ref())
            .map(|(_, c)| c.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
            .map_err(material)?;
        let mut roots = RootCertStore::empty();
        for root in pem_certs(bundle_pem)? {
            roots.add(root).map_err(material)?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(material)?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(material)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(material)?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            identity,
            serial,
            not_after,
            generation,
            bundle_pem: bundle_pem.to_string(),
            server: Arc::new(server),
            provider,
            roots,
            chain,
            key,
            certified,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The same certificate, trusting `bundle_pem`.
    pub fn with_bundle(&self, bundle_pem: &str) -> Result<Self, IdentityError> {
        let chain_pem: String = self.chain.iter().map(|c| pem_of(c)).collect();
        Self::new(
            self.identity.clone(),
            self.not_after,
            self.generation,
            &chain_pem,
            self.key.clone_key(),
            bundle_pem,
        )
    }

    /// A client configuration that accepts only a server presenting `expected`.
    pub fn client_for(&self, expected: &str) -> Result<Arc<ClientConfig>, IdentityError> {
        if let Some(c) = self.clients.lock().get(expected) {
            return Ok(c.clone());
        }
        let verifier = SpiffeVerifier {
            expected: expected.to_string(),
            roots: self.roots.clone(),
            provider: self.provider.clone(),
        };
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(material)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(material)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let config = Arc::new(config);
        self.clients.lock().insert(expected.to_string(), config.clone());
        Ok(config)
    }
}

/// The server name sent in SNI; identities are checked by SPIFFE ID, not by name.
pub fn sni() -> ServerName<'static> {
    ServerName::try_from("weft.mesh").expect("valid name")
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    weft_core::tls::certs_from_pem(pem, "certificate chain").map_err(material)
}

/// The one SPIFFE ID (URI SAN) of a certificate.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    });
    let first = uris.next()?;
    (uris.next().is_none() && first.starts_with("spiffe://")).then_some(first)
}

/// Verifies the server's chain against the mesh's roots, then that it presents exactly the
/// expected SPIFFE ID. (The default verifier would look for a DNS name, which workload
/// certificates do not carry.)
#[derive(Debug)]
struct SpiffeVerifier {
    expected: String,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            rustls::Error::InvalidCertificate(match e {
                webpki::Error::CertExpired { .. } => rustls::CertificateError::Expired,
                webpki::Error::CertNotValidYet { .. } => rustls::CertificateError::NotValidYet,
                webpki::Error::UnknownIssuer => rustls::CertificateError::UnknownIssuer,
                _ => rustls::CertificateError::BadSignature,
            })
        })?;
        match spiffe_id(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!("server presented {id}, expected {}", self.expected))),
            None => Err(rustls::Error::General(format!(
                "server presented no SPIFFE ID, expected {}",
                self.expected
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used between weft proxies".into()))
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

/// Obtains a certificate for a fresh key: a CSR to the control plane's CA over the control
/// link, proven by the current certificate (presented in the handshake) or else the join token.
/// The result is checked to be this workload's before it is handed back.
pub async fn certify(proxy: &Proxy) -> Result<Tls, IdentityError> {
    let link = proxy.control.as_ref().expect("control mode");
    let key = rcgen::KeyPair::generate().map_err(material)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(material)?
        .serialize_request(&key)
        .map_err(material)?
        .pem()
        .map_err(material)?;
    let channel = link
        .connect(|e| e.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(5)))
        .await
        .map_err(|e| IdentityError::Unreachable(e.to_string()))?;
    let reply = DistributionClient::new(channel)
        .certify(proto::CertifyRequest {
            token: proxy.token.clone().unwrap_or_default(),
            csr_pem: csr,
            workload: proxy.workload.id(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => IdentityError::Refused(s.message().to_string()),
            _ => IdentityError::Unreachable(s.message().to_string()),
        })?
        .into_inner();
    let expected = expected_identity(proxy);
    if !expected.matches(&reply.identity) {
        return Err(IdentityError::NotMine {
            got: reply.identity,
            expected: expected.to_string(),
        });
    }
    let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let tls = Tls::new(
        reply.identity,
        reply.not_after_unix,
        reply.generation,
        &reply.cert_chain_pem,
        key,
        &reply.trust_bundle_pem,
    )?;
    tls.check_issued_to(&proxy.workload.id())?;
    link.trust(&reply.trust_bundle_pem);
    Ok(tls)
}

/// What the proxy expects its identity to be.
struct Expected {
    namespace: String,
    /// From the join token, when there is one.
    service_account: Option<String>,
    /// The identity held now: a renewal must keep it.
    current: Option<String>,
}

fn expected_identity(proxy: &Proxy) -> Expected {
    Expected {
        namespace: proxy.workload.namespace.clone(),
        service_account: proxy.token.as_deref().and_then(|t| weft_api::token::peek(t).ok()).map(|c| c.sa),
        current: proxy.identity.current_id(),
    }
}

impl Expected {
    fn matches(&self, spiffe_id: &str) -> bool {
        if let Some(current) = &self.current {
            return current == spiffe_id;
        }
        let Some((_, path)) = spiffe_id.strip_prefix("spiffe://").and_then(|r| r.split_once('/')) else {
            return false;
        };
        let Some(sa) = path.strip_prefix(&format!("ns/{}/sa/", self.namespace)) else {
            return false;
        };
        !sa.is_empty() && !sa.contains('/') && self.service_account.as_deref().is_none_or(|want| want == sa)
    }
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.current, &self.service_account) {
            (Some(current), _) => write!(f, "{current}"),
            (None, Some(sa)) => write!(f, "spiffe://*/ns/{}/sa/{sa}", self.namespace),
            (None, None) => write!(f, "spiffe://*/ns/{}/sa/*", self.namespace),
        }
    }
}

impl Tls {
    /// Checks the leaf carries exactly [`Tls::identity`], names `workload` as its common name,
    /// and verifies against the trust bundle it came with.
    fn check_issued_to(&self, workload: &str) -> Result<(), IdentityError> {
        let leaf = &self.chain[0];
        let not_mine = |got: String| IdentityError::NotMine {
            got,
            expected: format!("{} of workload {workload}", self.identity),
        };
        match spiffe_id(leaf) {
            Some(id) if id == self.identity => {}
            other => return Err(not_mine(other.unwrap_or_else(|| "a certificate without a SPIFFE ID".into()))),
        }
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(material)?;
        let cn = cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or("");
        if cn != workload {
            return Err(not_mine(format!("a certificate of workload {cn:?}")));
        }
        let verifier = weft_core::tls::RootsClientVerifier::new(&self.bundle_pem).map_err(material)?;
        verifier
            .verify_client_cert(leaf, &self.chain[1..], UnixTime::now())
            .map_err(|e| IdentityError::Material(format!("the certificate does not verify against its trust bundle: {e}")))?;
        Ok(())
    }
}

/// Keeps the proxy's certificate fresh: renews at half its lifetime, retries with capped
/// backoff, and keeps serving with the current certificate while the CA is unreachable.
pub async fn run(proxy: Arc<Proxy>, shutdown: Shutdown) {
    let gauge = proxy.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let left = gauge.identity.tls().map(|t| t.not_after as i64 - now() as i64).unwrap_or(0);
            gauge.telemetry.cert_expires_in.set(left);
        }
    });
    let mut failures = 0u32;
    loop {
        let wait = match certify(&proxy).await {
            Ok(tls) => {
                failures = 0;
                let lifetime = tls.not_after.saturating_sub(now());
                tracing::info!(identity = %tls.identity, serial = %tls.serial, expires_in_s = lifetime, "workload certificate installed");
                proxy.identity.install(tls);
                proxy.refresh_ready();
                Duration::from_secs_f64(lifetime as f64 * RENEW_AT).max(Duration::from_secs(1))
            }
            Err(error) => {
                failures += 1;
                let left = proxy.identity.tls().map(|t| t.not_after.saturating_sub(now()));
                tracing::warn!(%error, cert_expires_in_s = ?left, "cannot renew the workload certificate; retrying");
                crate::control::backoff(failures)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = proxy.identity.renew.notified() => tracing::info!("the CA signs with a new root; renewing now"),
            _ = shutdown.cancelled() => return,
        }
    }
}

/// PEM text of one DER certificate.
fn pem_of(cert: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_installed_only_for_the_identity_this_workload_expects() {
        let first = Expected {
            namespace: "default".into(),
            service_account: Some("checkout-api".into()),
            current: None,
        };
        assert!(first.matches("spiffe://weft.local/ns/default/sa/checkout-api"));
        for other in [
            "spiffe://weft.local/ns/default/sa/orders",
            "spiffe://weft.local/ns/prod/sa/checkout-api",
            "spiffe://weft.local/ns/default/sa/checkout-api/x",
            "spiffe://weft.local/ns/default/sa/",
            "https://weft.local/ns/default/sa/checkout-api",
        ] {
            assert!(!first.matches(other), "{other}");
        }
        // Without a token's service account, any in its own namespace.
        let tokenless = Expected {
            service_account: None,
            ..first
        };
        assert!(tokenless.matches("spiffe://weft.local/ns/default/sa/anything"));
        assert!(!tokenless.matches("spiffe://weft.local/ns/prod/sa/anything"));
        // A renewal keeps exactly the identity held.
        let renewal = Expected {
            namespace: "default".into(),
            service_account: Some("checkout-api".into()),
            current: Some("spiffe://weft.local/ns/default/sa/checkout-api".into()),
        };
        assert!(renewal.matches("spiffe://weft.local/ns/default/sa/checkout-api"));
        assert!(!renewal.matches("spiffe://other.td/ns/default/sa/checkout-api"));
        assert_eq!(renewal.to_string(), "spiffe://weft.local/ns/default/sa/checkout-api");
    }
}

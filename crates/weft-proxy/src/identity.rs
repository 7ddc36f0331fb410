//! The proxy's workload identity: a key generated here (it never leaves the proxy), a
//! certificate the control plane's CA issues for it (the first on the strength of the join
//! token, every renewal on the strength of the current certificate, presented as the client
//! certificate of the control channel), renewed at half its lifetime, and the TLS
//! configurations built on it. A certificate is installed only if it is the identity this
//! workload expects: its own namespace and service account, its own name as the common name,
//! verifying against the trust bundle that came with it. Outbound, the server must present
//! exactly the SPIFFE ID the control plane gave for that endpoint; inbound, the client's
//! identity is read from its certificate. Without a valid certificate nothing is sent over mTLS:
//! the proxy fails closed. Obtaining and renewing the certificate is [`crate::renewal`]'s.

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

/// The identity slot of a proxy: empty until the first certificate arrives.
#[derive(Default)]
pub(crate) struct Identity {
    current: ArcSwapOption<Tls>,
    /// Wakes the renewal loop early (the CA's signing root changed).
    pub(crate) renew: tokio::sync::Notify,
}

/// TLS material for one certificate.
pub(crate) struct Tls {
    pub(crate) identity: String,
    /// Serial number, hex.
    pub(crate) serial: String,
    pub(crate) not_after: u64,
    /// Generation of the root that signed the certificate.
    pub(crate) generation: u64,
    /// The roots trusted (PEM).
    pub(crate) bundle_pem: String,
    pub(crate) server: Arc<ServerConfig>,
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
pub(crate) enum IdentityError {
    #[error("cannot reach the CA: {0}")]
    Unreachable(String),
    #[error("the CA refused: {0}")]
    Refused(String),
    #[error("unusable certificate material: {0}")]
    Material(String),
    #[error("the control plane issued {got}, but this proxy is {expected}: not installed")]
    NotMine { got: String, expected: String },
}

pub(crate) fn material(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Material(e.to_string())
}

// === impl Identity ===

impl Identity {
    pub(crate) fn tls(&self) -> Option<Arc<Tls>> {
        self.current.load_full()
    }

    pub(crate) fn install(&self, tls: Tls) {
        self.current.store(Some(Arc::new(tls)));
    }

    /// The SPIFFE ID of the certificate held now.
    pub(crate) fn current_id(&self) -> Option<String> {
        self.current.load().as_ref().map(|t| t.identity.clone())
    }

    /// Follows the CA in a pushed config: trusts a new bundle at once (keeping the current
    /// certificate) and renews early when the CA signs with a newer root.
    pub(crate) fn follow(&self, bundle_pem: &str, ca_generation: u64) {
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

impl Identity {
    /// The client TLS config for endpoint `i` of `service`: mTLS to every endpoint that has an
    /// identity, unless the destination turned mTLS off (`None`: plaintext). Without a
    /// certificate of our own this fails closed, never falling back to plaintext; the error
    /// says why.
    pub(crate) fn endpoint_tls(&self, service: &weft_api::mesh::ServiceConfig, i: usize) -> Result<Option<Arc<ClientConfig>>, String> {
        let endpoint = &service.endpoints[i];
        if service.mtls == Some(weft_api::resource::MtlsMode::Off) || endpoint.identity.is_empty() {
            return Ok(None);
        }
        let Some(own) = self.tls() else {
            return Err("this proxy has no workload certificate yet; mTLS is required".into());
        };
        own.client_for(&endpoint.identity).map(Some).map_err(|e| e.to_string())
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
    pub(crate) fn new(
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
    pub(crate) fn with_bundle(&self, bundle_pem: &str) -> Result<Self, IdentityError> {
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
    pub(crate) fn client_for(&self, expected: &str) -> Result<Arc<ClientConfig>, IdentityError> {
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
pub(crate) fn sni() -> ServerName<'static> {
    ServerName::try_from("weft.mesh").expect("valid name")
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    weft_core::tls::certs_from_pem(pem, "certificate chain").map_err(material)
}

/// The one SPIFFE ID (URI SAN) of a certificate.
pub(crate) fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
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

impl Tls {
    /// The certificate chain (PEM) and its key (PKCS#8 DER), to keep on disk ([`crate::kept`]).
    pub(crate) fn to_keep(&self) -> (String, Vec<u8>) {
        (self.chain.iter().map(|c| pem_of(c)).collect(), self.key.secret_der().to_vec())
    }

    /// Checks the leaf carries exactly [`Tls::identity`], names `workload` as its common name,
    /// and verifies against the trust bundle it came with.
    pub(crate) fn check_issued_to(&self, workload: &str) -> Result<(), IdentityError> {
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

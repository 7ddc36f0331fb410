//! The channel to the control plane. Every call to it goes over one [`Link`]: TLS by default
//! (`https://`), trusting only the CA whose fingerprint the join token pins until a trust
//! bundle has arrived over that verified channel, and presenting the workload's current
//! certificate as the client certificate so the proxy can renew and reconnect long after its
//! token expired. Plaintext (`http://`) only with `--insecure-plaintext`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use weft_core::tls::{Connector, PinnedVerifier};

/// How the proxy reaches the control plane: one or several replicas' URLs (`--control A,B`).
pub(crate) struct Link {
    /// As given.
    pub(crate) url: String,
    urls: Vec<String>,
    /// The URL tried first: the last that answered (at start, a random one, so proxies spread
    /// over the replicas).
    current: AtomicUsize,
    connector: Connector,
    /// TLS only: the pin, then the trust bundle.
    verifier: Option<Arc<PinnedVerifier>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("--control {url}: TLS to the control plane needs the join token (--token / WEFT_TOKEN): it carries the CA fingerprint to pin")]
    NoToken { url: String },
    #[error("--token: {0}")]
    Token(weft_api::token::TokenError),
    #[error("--control {url}: the scheme must be https (or http with --insecure-plaintext)")]
    Scheme { url: String },
    #[error("control channel TLS: {0}")]
    Tls(#[from] weft_core::tls::TlsError),
}

// === impl Link ===

impl Link {
    /// `https://` pins the CA of `token`'s claims and presents `client_cert`; `http://` is
    /// plaintext (the caller checked it was asked for).
    pub(crate) fn new(url: &str, token: Option<&str>, client_cert: Arc<dyn rustls::client::ResolvesClientCert>) -> Result<Self, LinkError> {
        let urls: Vec<String> = url.split(',').map(|u| u.trim().to_string()).collect();
        let scheme_of = |u: &str| u.split_once("://").map(|(s, _)| s.to_string()).unwrap_or_default();
        let scheme = scheme_of(&urls[0]);
        if let Some(other) = urls.iter().find(|u| scheme_of(u) != scheme) {
            return Err(LinkError::Scheme { url: other.clone() });
        }
        let current = AtomicUsize::new(rand::random_range(0..urls.len()));
        match scheme.as_str() {
            "http" => Ok(Self {
                url: url.to_string(),
                urls,
                current,
                connector: Connector::plaintext(),
                verifier: None,
            }),
            "https" => {
                let token = token.ok_or_else(|| LinkError::NoToken { url: url.to_string() })?;
                let claims = weft_api::token::peek(token).map_err(LinkError::Token)?;
                let verifier = Arc::new(PinnedVerifier::new(&claims.ca));
                let config = weft_core::tls::client_config(verifier.clone(), Some(client_cert), &[weft_core::tls::ALPN_H2])?;
                Ok(Self {
                    url: url.to_string(),
                    urls,
                    current,
                    connector: Connector::tls(Arc::new(config)),
                    verifier: Some(verifier),
                })
            }
            _ => Err(LinkError::Scheme { url: url.to_string() }),
        }
    }

    pub(crate) fn tls(&self) -> bool {
        self.verifier.is_some()
    }

    /// The CA fingerprint the token pins (TLS only).
    pub(crate) fn pinned(&self) -> Option<&str> {
        self.verifier.as_deref().map(PinnedVerifier::pin)
    }

    /// Whether a trust bundle replaced the pin.
    pub(crate) fn trusts_bundle(&self) -> bool {
        self.verifier.as_ref().is_some_and(|v| v.has_bundle())
    }

    /// Trusts the roots of a bundle that arrived over this link (a certificate response, a
    /// pushed config) from now on.
    pub(crate) fn trust(&self, bundle_pem: &str) {
        let Some(verifier) = &self.verifier else { return };
        if bundle_pem.is_empty() {
            return;
        }
        if let Err(error) = verifier.trust_bundle(bundle_pem) {
            tracing::warn!(%error, "unusable trust bundle for the control channel; keeping the current trust");
        }
    }

    /// The URL tried first now: the last one connected.
    pub(crate) fn current_url(&self) -> &str {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    /// A channel to the control plane, connected: to the URL that answered last, else to each
    /// of the others in turn (a replica gone is left at once).
    pub(crate) async fn connect(
        &self,
        endpoint: impl Fn(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
    ) -> Result<tonic::transport::Channel, LinkDown> {
        let first = self.current.load(Ordering::Relaxed);
        let mut down = None;
        for i in 0..self.urls.len() {
            let at = (first + i) % self.urls.len();
            let base = tonic::transport::Endpoint::from_shared(self.urls[at].clone()).map_err(|e| LinkDown::Connect(e.to_string()))?;
            match endpoint(base).connect_with_connector(self.connector.clone()).await {
                Ok(channel) => {
                    self.current.store(at, Ordering::Relaxed);
                    return Ok(channel);
                }
                Err(error) => {
                    down = Some(match self.verifier.as_ref().and_then(|v| v.take_refusal()) {
                        Some(why) => LinkDown::Refused(why),
                        None => LinkDown::Connect(chain(&error)),
                    })
                }
            }
        }
        Err(down.expect("at least one URL"))
    }
}

/// How long a control plane that refused the stream because it was busy registering others
/// asked the proxy to wait, jittered up to a quarter more so the proxies it told the same
/// moment do not all come back in it (none: not such a refusal).
pub(crate) fn retry_after(status: &tonic::Status) -> Option<std::time::Duration> {
    let ms: u64 = status.metadata().get(weft_api::RETRY_AFTER_MS)?.to_str().ok()?.parse().ok()?;
    Some(std::time::Duration::from_millis(rand::random_range(ms..=ms + ms / 4)))
}

/// Why the link is down.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkDown {
    /// The control plane could not prove it is the one the token pins.
    #[error("refusing the control plane: {0}")]
    Refused(String),
    #[error("cannot connect: {0}")]
    Connect(String),
}

/// An error and its sources, one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

//! The control stream, proxy side: register, subscribe to services on demand, apply each pushed
//! config (ACK) or refuse it and keep the last good one (NACK), report telemetry every interval.
//! When the control plane is unreachable the proxy keeps serving on its last good config and
//! reconnects with capped, jittered exponential backoff.
//!
//! Every call to the control plane goes over one [`Link`]: TLS by default (`https://`), trusting
//! only the CA whose fingerprint the join token pins until a trust bundle has arrived over that
//! verified channel, and presenting the workload's current certificate as the client
//! certificate so the proxy can renew and reconnect long after its token expired. Plaintext
//! (`http://`) only with `--insecure-plaintext`.

use crate::state::Proxy;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::mesh::MeshConfig;
use weft_api::proto::{self, control_message, distribution_client::DistributionClient, proxy_message};
use weft_core::Shutdown;
use weft_core::tls::{Connector, PinnedVerifier};

/// Telemetry summary interval.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How the proxy reaches the control plane.
pub struct Link {
    pub url: String,
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
    pub fn new(url: &str, token: Option<&str>, client_cert: Arc<dyn rustls::client::ResolvesClientCert>) -> Result<Self, LinkError> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        match scheme {
            "http" => Ok(Self {
                url: url.to_string(),
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
                    connector: Connector::tls(Arc::new(config)),
                    verifier: Some(verifier),
                })
            }
            _ => Err(LinkError::Scheme { url: url.to_string() }),
        }
    }

    pub fn tls(&self) -> bool {
        self.verifier.is_some()
    }

    /// The CA fingerprint the token pins (TLS only).
    pub fn pinned(&self) -> Option<&str> {
        self.verifier.as_deref().map(PinnedVerifier::pin)
    }

    /// Whether a trust bundle replaced the pin.
    pub fn trusts_bundle(&self) -> bool {
        self.verifier.as_ref().is_some_and(|v| v.has_bundle())
    }

    /// Trusts the roots of a bundle that arrived over this link (a certificate response, a
    /// pushed config) from now on.
    pub fn trust(&self, bundle_pem: &str) {
        let Some(verifier) = &self.verifier else { return };
        if bundle_pem.is_empty() {
            return;
        }
        if let Err(error) = verifier.trust_bundle(bundle_pem) {
            tracing::warn!(%error, "unusable trust bundle for the control channel; keeping the current trust");
        }
    }

    /// A channel to the control plane, connected.
    pub async fn connect(
        &self,
        endpoint: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
    ) -> Result<tonic::transport::Channel, LinkDown> {
        let base = tonic::transport::Endpoint::from_shared(self.url.clone()).map_err(|e| LinkDown::Connect(e.to_string()))?;
        match endpoint(base).connect_with_connector(self.connector.clone()).await {
            Ok(channel) => Ok(channel),
            Err(error) => Err(match self.verifier.as_ref().and_then(|v| v.take_refusal()) {
                Some(why) => LinkDown::Refused(why),
                None => LinkDown::Connect(chain(&error)),
            }),
        }
    }
}

/// Why the link is down.
#[derive(Debug, thiserror::Error)]
pub enum LinkDown {
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

/// Runs the control stream until shutdown, reconnecting as needed.
pub async fn run(proxy: Arc<Proxy>, mut subscriptions: mpsc::UnboundedReceiver<String>, shutdown: Shutdown) {
    let url = proxy.control.as_ref().expect("control mode").url.clone();
    let mut taps = proxy.tap_rx.lock().take().expect("one control stream per proxy");
    let mut failures = 0u32;
    loop {
        let outcome = tokio::select! {
            r = session(&proxy, &url, &mut subscriptions, &mut taps) => r,
            _ = shutdown.cancelled() => return,
        };
        // Taps live on the stream: a lost stream closes them.
        proxy.taps.store(Arc::new(Vec::new()));
        match outcome {
            Ok(Session { configs }) if configs > 0 => failures = 0,
            Ok(_) => failures += 1,
            Err(SessionError::Link(LinkDown::Refused(why))) => {
                failures += 1;
                tracing::error!(control = %url, reason = %why, "refusing the control plane: it cannot prove it is the one the join token pins; serving last-known-good config");
            }
            Err(error) => {
                failures += 1;
                tracing::warn!(control = %url, %error, "control stream down; serving last-known-good config");
            }
        }
        let delay = backoff(failures);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Full-jitter exponential backoff: a uniform delay up to `min(MAX, MIN * 2^n)`.
pub fn backoff(failures: u32) -> Duration {
    let cap = BACKOFF_MIN.saturating_mul(1u32 << failures.min(16)).min(BACKOFF_MAX);
    let ms = cap.as_millis() as u64;
    Duration::from_millis(rand::random_range(ms / 2..=ms.max(1)))
}

struct Session {
    configs: u64,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Link(#[from] LinkDown),
    #[error("stream failed: {0}")]
    Stream(#[from] tonic::Status),
    #[error("the control plane closed the stream")]
    Closed,
}

async fn session(
    proxy: &Proxy,
    url: &str,
    subscriptions: &mut mpsc::UnboundedReceiver<String>,
    taps: &mut mpsc::Receiver<proto::TapEvent>,
) -> Result<Session, SessionError> {
    let link = proxy.control.as_ref().expect("control mode");
    let channel = link
        .connect(|e| {
            e.connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true)
        })
        .await?;
    let mut client = DistributionClient::new(channel);
    let (tx, rx) = mpsc::channel::<proto::ProxyMessage>(64);
    let send = |msg: proxy_message::Msg| {
        let tx = tx.clone();
        async move { tx.send(proto::ProxyMessage { msg: Some(msg) }).await.is_ok() }
    };
    let w = &proxy.workload;
    send(proxy_message::Msg::Register(proto::Register {
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        cluster: w.cluster.clone(),
        labels: w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        inbound_addr: proxy.advertise.to_string(),
        services: proxy.subscriptions(),
        applied_revision: proxy.config().revision,
        token: proxy.token.clone().unwrap_or_default(),
    }))
    .await;
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(control = %url, "control stream up");
    let mut ticker = tokio::time::interval(REPORT_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut configs = 0u64;
    // A new stream starts with the whole config: nothing is held from an earlier one.
    let mut held = Held::default();
    loop {
        tokio::select! {
            msg = inbound.next() => {
                let msg = match msg {
                    None => return if configs > 0 { Ok(Session { configs }) } else { Err(SessionError::Closed) },
                    Some(m) => m?,
                };
                let cfg = match msg.msg {
                    Some(control_message::Msg::Config(cfg)) => {
                        // A whole config replaces whatever was held, applied or not.
                        held.asked = false;
                        cfg
                    }
                    Some(control_message::Msg::Delta(delta)) => match held.merge(delta) {
                        Ok(cfg) => cfg,
                        Err(gap) => {
                            if !held.asked {
                                held.asked = true;
                                tracing::info!(reason = %gap, "config delta does not apply to the config held; asking for the whole config");
                                send(proxy_message::Msg::Resync(proto::Resync { reason: gap })).await;
                            }
                            continue;
                        }
                    },
                    Some(control_message::Msg::Taps(list)) => {
                        tracing::info!(taps = list.taps.len(), "taps changed");
                        proxy.taps.store(Arc::new(list.taps));
                        continue;
                    }
                    None => continue,
                };
                configs += 1;
                let (version, revision) = (cfg.version, cfg.revision);
                match MeshConfig::try_from(cfg.clone()) {
                    Ok(mesh) => {
                        let services = mesh.services.len();
                        proxy.apply(mesh);
                        held.config = Some(cfg);
                        tracing::info!(version, revision, services, "config applied");
                        send(proxy_message::Msg::Ack(proto::Ack { version, revision })).await;
                    }
                    Err(invalid) => {
                        let reason = invalid.to_string();
                        tracing::warn!(version, revision, %reason, "config refused; keeping last-known-good");
                        *proxy.last_nack.lock() = Some(reason.clone());
                        send(proxy_message::Msg::Nack(proto::Nack { version, revision, reason })).await;
                    }
                }
            }
            Some(first) = taps.recv() => {
                let mut events = vec![first];
                while events.len() < 100 && let Ok(e) = taps.try_recv() {
                    events.push(e);
                }
                send(proxy_message::Msg::Tap(proto::TapEvents { events })).await;
            }
            Some(service) = subscriptions.recv() => {
                send(proxy_message::Msg::Subscribe(proto::Subscribe { services: vec![service] })).await;
            }
            _ = ticker.tick() => {
                let stats = proxy.telemetry.take_interval();
                let tls = proxy.identity.tls();
                let report = proto::TelemetryReport {
                    interval_ms: REPORT_INTERVAL.as_millis() as u32,
                    stats,
                    cert_not_after_unix: tls.as_ref().map(|t| t.not_after).unwrap_or(0),
                    cert_generation: tls.as_ref().map(|t| t.generation).unwrap_or(0),
                };
                send(proxy_message::Msg::Telemetry(report)).await;
            }
        }
    }
}

/// The config this stream's last applied push built, in wire form: what the next delta
/// builds on.
#[derive(Default)]
struct Held {
    config: Option<proto::ProxyConfig>,
    /// A Resync was sent and no whole config has come since (one is enough).
    asked: bool,
}

impl Held {
    /// The config `delta` makes of the one held, or why it does not apply (a gap: a push was
    /// missed or refused, or none is held).
    fn merge(&self, delta: proto::ConfigDelta) -> Result<proto::ProxyConfig, String> {
        let held = self.config.as_ref().ok_or("a delta before any config")?;
        weft_api::delta::apply(held, delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        for n in 0..40 {
            let d = backoff(n);
            assert!(d <= BACKOFF_MAX, "{d:?}");
        }
        let samples: std::collections::BTreeSet<_> = (0..50).map(|_| backoff(10).as_millis()).collect();
        assert!(samples.len() > 5, "jitter spreads retries: {samples:?}");
        assert!(backoff(0) <= BACKOFF_MIN);
    }
}

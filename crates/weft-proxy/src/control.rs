//! The control stream, proxy side: register, subscribe to services on demand, apply each pushed
//! config (ACK) or refuse it and keep the last good one (NACK), report telemetry every interval.
//! When the control plane is unreachable the proxy keeps serving on its last good config and
//! reconnects with capped, jittered exponential backoff. It reaches the control plane over the
//! proxy's [`crate::link::Link`].

use crate::backoff;
use crate::link::LinkDown;
use crate::state::Proxy;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::mesh::MeshConfig;
use weft_api::proto::{self, control_message, distribution_client::DistributionClient, proxy_message};
use weft_core::Shutdown;

/// Telemetry summary interval.
pub(crate) const REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// Runs the control stream until shutdown, reconnecting as needed.
pub(crate) async fn run(proxy: Arc<Proxy>, mut subscriptions: mpsc::UnboundedReceiver<String>, shutdown: Shutdown) {
    let link = proxy.link.as_ref().expect("control mode");
    let mut taps = proxy.taps.take_events().expect("one control stream per proxy");
    let mut failures = 0u32;
    // The connection a busy control plane refused the last stream on: the next stream goes on
    // it (a new connection would cost a TLS handshake per refusal, thousands in a storm).
    let mut kept: Option<tonic::transport::Channel> = None;
    loop {
        let outcome = tokio::select! {
            r = session(&proxy, &mut kept, &mut subscriptions, &mut taps) => r,
            _ = shutdown.cancelled() => return,
        };
        let url = link.current_url().to_string();
        // Taps live on the stream: a lost stream closes them.
        proxy.taps.set(Vec::new());
        // A busy control plane says when to come back; that replaces the backoff.
        let asked = match &outcome {
            Err(SessionError::Stream(status)) => crate::link::retry_after(status),
            _ => None,
        };
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
        if let Some(wait) = asked {
            tracing::info!(control = %url, ?wait, "the control plane is busy registering others; coming back when it asked");
        }
        let delay = asked.unwrap_or_else(|| backoff::reconnect(failures));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Applies a pushed config: the identity follows its CA (a new bundle, a newer signing root),
/// the control link trusts its bundle, then discovery swaps it in.
fn apply(proxy: &Proxy, mesh: MeshConfig) {
    proxy.identity.follow(&mesh.trust_bundle, mesh.ca_generation);
    if let Some(link) = &proxy.link {
        link.trust(&mesh.trust_bundle);
    }
    proxy.discovery.apply(mesh);
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
    kept: &mut Option<tonic::transport::Channel>,
    subscriptions: &mut mpsc::UnboundedReceiver<String>,
    taps: &mut mpsc::Receiver<proto::TapEvent>,
) -> Result<Session, SessionError> {
    let link = proxy.link.as_ref().expect("control mode");
    let channel = match kept.take() {
        Some(channel) => channel,
        None => {
            link.connect(|e| {
                e.connect_timeout(Duration::from_secs(2))
                    .http2_keep_alive_interval(weft_api::CONTROL_KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(weft_api::CONTROL_KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true)
            })
            .await?
        }
    };
    let mut client = DistributionClient::new(channel.clone());
    let (tx, rx) = mpsc::channel::<proto::ProxyMessage>(64);
    let send = |msg: proxy_message::Msg| {
        let tx = tx.clone();
        async move { tx.send(proto::ProxyMessage { msg: Some(msg) }).await.is_ok() }
    };
    let w = &proxy.local.workload;
    send(proxy_message::Msg::Register(proto::Register {
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        cluster: w.cluster.clone(),
        labels: w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        inbound_addr: proxy.local.advertise.to_string(),
        services: proxy.discovery.subscriptions(),
        applied_revision: proxy.discovery.revision(),
        token: proxy.local.token.clone().unwrap_or_default(),
        version: weft_core::version::version(),
    }))
    .await;
    let mut inbound = match client.connect(ReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            if crate::link::retry_after(&status).is_some() {
                *kept = Some(channel);
            }
            return Err(status.into());
        }
    };
    tracing::info!(control = %link.current_url(), "control stream up");
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
                        proxy.taps.set(list.taps);
                        continue;
                    }
                    None => continue,
                };
                configs += 1;
                let (version, revision) = (cfg.version, cfg.revision);
                match MeshConfig::try_from(cfg.clone()) {
                    Ok(mesh) => {
                        let services = mesh.services.len();
                        apply(proxy, mesh);
                        held.config = Some(cfg);
                        tracing::info!(version, revision, services, "config applied");
                        send(proxy_message::Msg::Ack(proto::Ack { version, revision })).await;
                    }
                    Err(invalid) => {
                        let reason = invalid.to_string();
                        tracing::warn!(version, revision, %reason, "config refused; keeping last-known-good");
                        *proxy.discovery.last_nack.lock() = Some(reason.clone());
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
                    cost: Some(proxy.telemetry.self_time.take_report()),
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

//! The plain bundle of handles every task and listener of one proxy shares, built once at start
//! ([`Proxy::new`]) and holding no behaviour of its own: each part owns its data and is passed to
//! the phase that needs it.

use crate::clock::Clock;
use crate::config::{AppProtocol, Bound, ProxyConfig, Source, Workload};
use crate::discovery::Discovery;
use crate::identity::Identity;
use crate::link::{Link, LinkError};
use crate::pool::Pools;
use crate::taps::Taps;
use crate::telemetry::{Telemetry, Tracing};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;
use weft_api::mesh::MeshConfig;

/// Mirrored copies in flight at once per proxy; more are dropped, never queued.
const MIRROR_CONCURRENCY: usize = 64;

pub(crate) struct Proxy {
    /// This workload and where it listens.
    pub(crate) local: Local,
    /// How it reaches the control plane (control mode).
    pub(crate) link: Option<Link>,
    /// Shared with the control link, which presents it as the client certificate.
    pub(crate) identity: Arc<Identity>,
    pub(crate) discovery: Discovery,
    pub(crate) pools: Pools,
    pub(crate) telemetry: Telemetry,
    pub(crate) taps: Taps,
    /// Permits for mirrored copies in flight.
    pub(crate) mirrors: Arc<tokio::sync::Semaphore>,
    /// What certificate renewal reads the time from.
    pub(crate) clock: Clock,
}

/// This workload's own facts, fixed at start.
pub(crate) struct Local {
    pub(crate) workload: Workload,
    pub(crate) app: SocketAddr,
    pub(crate) app_protocol: AppProtocol,
    /// Header names the inbound proxy removes besides the identity headers it always removes:
    /// configured at start, lowercase, each once.
    pub(crate) strip_headers: Vec<http::HeaderName>,
    pub(crate) bound: Bound,
    pub(crate) advertise: SocketAddr,
    /// Join token (control mode); the proxy is ready only once it holds a certificate.
    pub(crate) token: Option<String>,
}

impl Proxy {
    /// Builds the proxy; in control mode also returns the receiver of new subscriptions, which
    /// the control stream drains.
    pub(crate) fn new(cfg: ProxyConfig, bound: Bound) -> Result<(Self, Option<mpsc::UnboundedReceiver<String>>), LinkError> {
        let identity = Arc::new(Identity::default());
        let (config, link, token, channel) = match cfg.source {
            Source::Static(mesh) => (mesh, None, None, None),
            Source::Control { url, token } => {
                let link = Link::new(&url, token.as_deref(), identity.clone())?;
                let (tx, rx) = mpsc::unbounded_channel();
                (MeshConfig::default(), Some(link), token, Some((tx, rx)))
            }
        };
        let (subscribe_tx, rx) = match channel {
            Some((tx, rx)) => (Some(tx), Some(rx)),
            None => (None, None),
        };
        let needs_cert = token.is_some();
        let workload = cfg.workload;
        let discovery = Discovery::new(
            config,
            subscribe_tx,
            needs_cert,
            workload.namespace.clone(),
            workload.cluster.clone(),
        );
        let mut strip_headers = cfg.strip_headers;
        strip_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        strip_headers.dedup();
        let telemetry = Telemetry::new(
            workload.service(),
            cfg.access_log,
            cfg.access_log_sample,
            Tracing {
                endpoint: cfg.otlp_endpoint.clone(),
                sample: cfg.trace_sample,
                resource: vec![
                    ("service.name", workload.service().to_string()),
                    ("weft.workload", format!("{}/{}", workload.namespace, workload.name)),
                    ("weft.cluster", workload.cluster.clone()),
                ],
            },
        );
        let proxy = Proxy {
            taps: Taps::new(format!("{}/{}", workload.namespace, workload.name)),
            local: Local {
                advertise: cfg.advertise.unwrap_or(bound.inbound),
                workload,
                app: cfg.app,
                app_protocol: cfg.app_protocol,
                strip_headers,
                bound,
                token,
            },
            link,
            identity,
            discovery,
            pools: Pools::new(cfg.app_connect_timeout),
            telemetry,
            mirrors: Arc::new(tokio::sync::Semaphore::new(MIRROR_CONCURRENCY)),
            clock: Clock::default(),
        };
        Ok((proxy, rx))
    }
}

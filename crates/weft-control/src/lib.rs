//! The weft control plane: the store of resources and revisions, the distribution server that
//! keeps every proxy on the config it needs, the telemetry it aggregates, and the REST API.
//!
//! It must not depend on weft-proxy: proxies are reached only through the control stream.

pub mod api;
pub mod auth;
pub mod ca;
pub mod distribution;
pub mod history;
pub mod intents;
pub mod mesh;
pub mod metrics;
pub mod rollout;
pub mod stats;
pub mod store;
pub mod taps;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use weft_core::Shutdown;

#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub data_dir: PathBuf,
    pub api: SocketAddr,
    pub grpc: SocketAddr,
    pub trust_domain: String,
    /// Lifetime of workload certificates.
    pub cert_ttl: Duration,
    /// The user's own root (certificate and key PEM files) instead of a generated one.
    pub root: Option<(PathBuf, PathBuf)>,
    /// Serve `/metrics` without a credential, for a Prometheus that cannot send a token.
    pub metrics_open: bool,
}

#[derive(Clone, Debug)]
pub struct Bound {
    pub api: SocketAddr,
    pub grpc: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error(transparent)]
    Auth(#[from] auth::TokenError),
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot bind the {listener} listener on {addr}: {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The file under the data directory holding the bootstrap admin API token (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Opens the store, binds both listeners and serves until `shutdown`.
pub async fn start(cfg: ControlConfig, shutdown: Shutdown) -> Result<(Bound, tokio::task::JoinHandle<()>), StartError> {
    let store = Arc::new(store::Store::open(&cfg.data_dir)?);
    let mut registry = prometheus_client::registry::Registry::with_prefix("weft_control");
    let metrics = metrics::ControlMetrics::register(&mut registry);
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|source| StartError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let root = match &cfg.root {
        Some((cert, key)) => Some((read(cert)?, read(key)?)),
        None => None,
    };
    let ca = ca::Ca::open(&store, &cfg.trust_domain, cfg.cert_ttl, root)?;
    let auth = auth::Auth::open(store.clone(), &cfg.data_dir.join(ADMIN_TOKEN_FILE), cfg.metrics_open, false)?;
    let mesh = Arc::new(mesh::Mesh::new(store, ca, metrics)?);
    let api_l = TcpListener::bind(cfg.api).await.map_err(|source| StartError::Bind {
        listener: "api",
        addr: cfg.api,
        source,
    })?;
    let grpc_l = TcpListener::bind(cfg.grpc).await.map_err(|source| StartError::Bind {
        listener: "grpc",
        addr: cfg.grpc,
        source,
    })?;
    let bound = Bound {
        api: api_l.local_addr().expect("bound"),
        grpc: grpc_l.local_addr().expect("bound"),
    };
    tracing::info!(api = %bound.api, grpc = %bound.grpc, data_dir = %cfg.data_dir.display(), revision = mesh.revision(), "control plane listening");

    let loop_task = tokio::spawn(intents::run(mesh.clone(), shutdown.clone()));
    let history = history::History::default();
    let history_task = tokio::spawn(history.clone().run(mesh.clone(), shutdown.clone()));
    let router = api::router(api::Api {
        mesh: mesh.clone(),
        registry: Arc::new(registry),
        history,
        auth: Arc::new(auth),
    });
    let api_shutdown = shutdown.clone();
    let api_task = tokio::spawn(async move {
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        let serve = axum::serve(api_l, service).with_graceful_shutdown(async move { api_shutdown.cancelled().await });
        if let Err(error) = serve.await {
            tracing::error!(%error, "api server failed");
        }
    });
    let grpc_shutdown = shutdown.clone();
    let distribution = weft_api::proto::distribution_server::DistributionServer::new(distribution::Distribution { mesh });
    let grpc_task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(1)))
            .http2_keepalive_timeout(Some(Duration::from_secs(3)))
            .tcp_nodelay(true)
            .add_service(distribution)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(grpc_l), async move {
                grpc_shutdown.cancelled().await
            })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "grpc server failed");
        }
    });
    let handle = tokio::spawn(async move {
        let _ = tokio::join!(api_task, grpc_task, loop_task, history_task);
    });
    Ok((bound, handle))
}

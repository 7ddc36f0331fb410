//! The weft control plane: the store of resources and revisions, the distribution server that
//! keeps every proxy on the config it needs, the telemetry it aggregates, and the REST API.
//!
//! It must not depend on weft-proxy: proxies are reached only through the control stream.

mod admission;
pub mod api;
pub mod auth;
mod ca;
mod clock;
mod cost;
mod distribution;
pub use distribution::MAX_REGISTERING;
mod etcd;
#[cfg(feature = "fuzz")]
pub mod fuzz;
mod graph;
mod history;
mod intents;
mod leader;
mod mesh;
mod metrics;
mod peers;
mod plan;
mod registry;
pub mod rollout;
pub mod serving;
mod signals;
mod staging;
pub mod stats;
mod store;
mod taps;
mod vip;

pub use etcd::StoreTls;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
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
    /// Extra names and addresses (DNS names or IPs) for the serving certificate.
    pub sans: Vec<String>,
    /// Serve the API and the gRPC without TLS (local experiments only).
    pub insecure_plaintext: bool,
    /// Move the store aside and start an empty mesh (`--reinit-store`).
    pub reinit_store: bool,
    /// `--store etcd://HOST:PORT[,...]`: the mesh lives in etcd, shared by every replica;
    /// `None`: the embedded store under `data_dir`.
    pub store: Option<String>,
    /// `--store-prefix`: where in etcd.
    pub store_prefix: String,
    /// `--store-ca` (and `--store-cert`, `--store-key`): etcd over TLS.
    pub store_tls: Option<StoreTls>,
    /// `--replica`: this replica's name among those on one store (default: its API address).
    pub replica: Option<String>,
    /// `--max-registering`: registrations in progress at once; beyond it a proxy is told when
    /// to come back.
    pub max_registering: u32,
    /// `--api-idle-timeout`: a REST API connection that moves no byte for this long is closed.
    pub api_idle_timeout: Duration,
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
    #[error(transparent)]
    Serving(#[from] serving::ServingError),
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot bind the {listener} listener on {addr}: {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// How long connections get to finish after shutdown is asked before they are cut (a dashboard's
/// event stream never finishes by itself); a replacement waits no longer than this for the store.
const DRAIN: Duration = Duration::from_millis(1500);

/// A proxy's stream with no frame for this long is sent a PING; one whose PING is not answered
/// within the timeout is taken for gone (its endpoint leaves everyone's config): a silent peer
/// is noticed within 30 s, a closed one at once. Not shorter: a proxy or control plane busy with
/// a storm of thousands answers late, and at 1 s / 3 s thousands of live streams were cut (4,057
/// before a restart in a 2,000-proxy run), each re-registering, whose joins and whole configs
/// fed the storm; and 10,000 idle streams cost 10,000 PINGs a second.
const GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Connections the kernel holds for the proxies' listener until they are accepted (capped by
/// `net.core.somaxconn`, 4,096 on current kernels). Accepting waits while the handshakes in
/// progress are at their bound, and a fleet connects at once: with tokio's default of 1,024,
/// the rest of the queue overflowed and those proxies' connections were reset (542 of 3,000 at
/// a cold start), each then retried after a backoff.
const GRPC_BACKLOG: u32 = 4096;

/// The proxies' listener on `addr`, with the backlog of [`GRPC_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted control plane binds its port again at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(GRPC_BACKLOG)
}

/// The file under the data directory holding the bootstrap admin API token (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The store in `--data-dir`: the one there, or with `--reinit-store` an empty one (the old
/// file kept aside).
fn open_store(cfg: &ControlConfig) -> Result<store::Store, store::StoreError> {
    if let Some(url) = &cfg.store {
        // The data directory still holds this replica's own files (admin.token, ca.pem).
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| store::StoreError::Open {
            path: cfg.data_dir.display().to_string(),
            message: e.to_string(),
        })?;
        return store::Store::etcd(url, &cfg.store_prefix, cfg.store_tls.as_ref());
    }
    if !cfg.reinit_store {
        return store::Store::open(&cfg.data_dir);
    }
    let (store, aside) = store::Store::reinit(&cfg.data_dir)?;
    match aside {
        Some(aside) => {
            tracing::warn!(old_store = %aside.display(), "--reinit-store: the old store was moved aside; starting an empty mesh")
        }
        None => tracing::warn!("--reinit-store: there was no store; starting an empty mesh"),
    }
    Ok(store)
}

/// Reads the API tokens again whenever another replica changed them (a token revoked there is
/// refused here at once).
async fn reload_tokens(mesh: Arc<mesh::Mesh>, auth: Arc<auth::Auth>, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = mesh.tokens_changed.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        let auth = auth.clone();
        if let Ok(Err(error)) = tokio::task::spawn_blocking(move || auth.reload()).await {
            tracing::warn!(%error, "cannot read the API tokens again; keeping the ones held");
        }
    }
}

/// Opens the store, binds both listeners and serves until `shutdown`.
pub async fn start(cfg: ControlConfig, shutdown: Shutdown) -> Result<(Bound, tokio::task::JoinHandle<()>), StartError> {
    let store = Arc::new(open_store(&cfg)?);
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
    let auth = auth::Auth::open(
        store.clone(),
        &cfg.data_dir.join(ADMIN_TOKEN_FILE),
        cfg.metrics_open,
        !cfg.insecure_plaintext,
    )?;
    // Tokens that expired a day ago can no longer matter to anyone.
    let stale = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .saturating_sub(86_400);
    match store.prune_tokens(stale) {
        Ok(0) => {}
        Ok(n) => tracing::info!(tokens = n, "forgot join tokens expired over a day ago"),
        Err(error) => tracing::warn!(%error, "cannot prune expired join tokens"),
    }
    let mut mesh = mesh::Mesh::new(store, ca, metrics.clone())?;
    let api_l = TcpListener::bind(cfg.api).await.map_err(|source| StartError::Bind {
        listener: "api",
        addr: cfg.api,
        source,
    })?;
    mesh.set_replica(
        cfg.replica
            .clone()
            .unwrap_or_else(|| api_l.local_addr().expect("bound").to_string()),
    );
    mesh.set_api_addr(api_l.local_addr().expect("bound"), !cfg.insecure_plaintext);
    let mesh = Arc::new(mesh);
    let grpc_l = listen(cfg.grpc).map_err(|source| StartError::Bind {
        listener: "grpc",
        addr: cfg.grpc,
        source,
    })?;
    let bound = Bound {
        api: api_l.local_addr().expect("bound"),
        grpc: grpc_l.local_addr().expect("bound"),
    };
    serving::write_ca_file(&cfg.data_dir, &mesh.ca.bundle_pem())?;
    let serving = if cfg.insecure_plaintext {
        tracing::warn!(
            "--insecure-plaintext: the API and the proxies' control streams are unencrypted and proxies cannot prove themselves with their certificates"
        );
        None
    } else {
        let sans = serving::sans(&[bound.api, bound.grpc], &cfg.sans)?;
        Some(Arc::new(serving::Serving::new(&mesh.ca, sans)?))
    };
    tracing::info!(api = %bound.api, grpc = %bound.grpc, tls = serving.is_some(), data_dir = %cfg.data_dir.display(), store = %mesh.store.describe(), revision = mesh.revision(), ca_fingerprint = %mesh.ca.root_fingerprint(), "control plane listening");

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(mesh::run_intents(mesh.clone(), shutdown.clone()));
    tasks.spawn(mesh::run_rotation(mesh.clone(), shutdown.clone()));
    tasks.spawn(mesh::run_folds(mesh.clone(), shutdown.clone()));
    tasks.spawn(leader::run(mesh.clone(), shutdown.clone()));
    tasks.spawn(leader::follow_store(mesh.clone(), shutdown.clone()));
    tasks.spawn(peers::publish(mesh.clone(), shutdown.clone()));
    let history = history::History::default();
    tasks.spawn(history.clone().run(mesh.clone(), shutdown.clone()));
    tasks.spawn(serving::maintain(
        serving.clone(),
        mesh.clone(),
        cfg.data_dir.clone(),
        shutdown.clone(),
    ));
    let auth = Arc::new(auth);
    tasks.spawn(reload_tokens(mesh.clone(), auth.clone(), shutdown.clone()));
    let router = api::router(api::Api {
        mesh: mesh.clone(),
        registry: Arc::new(registry),
        history,
        auth,
    });
    let api_listener = serving::ApiListener {
        rx: serving::accept(
            api_l,
            serving.as_ref().map(|s| s.api.clone()),
            "api",
            metrics.clone(),
            shutdown.clone(),
        ),
        local: bound.api,
        idle: cfg.api_idle_timeout,
    };
    let api_shutdown = shutdown.clone();
    tasks.spawn(async move {
        use axum::serve::ListenerExt;
        // Through `tap_io` the listener's peer address becomes each request's `ConnectInfo`
        // (the audit trail's source address).
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        let serve = axum::serve(api_listener.tap_io(|_| {}), service).with_graceful_shutdown(async move { api_shutdown.cancelled().await });
        if let Err(error) = serve.await {
            tracing::error!(%error, "api server failed");
        }
    });
    let grpc_shutdown = shutdown.clone();
    let distribution = weft_api::proto::distribution_server::DistributionServer::with_interceptor(
        distribution::Distribution {
            mesh,
            gate: Arc::new(distribution::Gate::new(cfg.max_registering)),
            shutdown: shutdown.clone(),
        },
        serving::connect_info,
    );
    let grpc_conns = serving::accept(grpc_l, serving.as_ref().map(|s| s.grpc.clone()), "grpc", metrics, shutdown.clone());
    tasks.spawn(async move {
        let incoming = tokio_stream::wrappers::ReceiverStream::new(grpc_conns).map(Ok::<_, std::io::Error>);
        let served = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(GRPC_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(GRPC_KEEPALIVE_TIMEOUT))
            .add_service(distribution)
            .serve_with_incoming_shutdown(incoming, async move { grpc_shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "grpc server failed");
        }
    });
    let handle = tokio::spawn(async move {
        shutdown.cancelled().await;
        let drained = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(DRAIN, drained).await.is_err() {
            tracing::warn!(tasks = tasks.len(), drain = ?DRAIN, "connections still open after the drain; cutting them");
            tasks.shutdown().await;
        }
    });
    Ok((bound, handle))
}

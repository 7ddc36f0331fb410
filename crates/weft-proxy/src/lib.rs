//! The weft data plane: one sidecar per workload.
//!
//! The outbound listener takes the app's requests (as an HTTP proxy, or with `Host` /
//! `:authority` naming a service in one of the forms of [`host`]), applies the caller-side
//! TrafficPolicy and forwards them over HTTP/2 to a healthy endpoint's inbound listener; the
//! inbound listener hands them to the app in the protocol the workload declares
//! ([`config::AppProtocol`]). The config arrives on the control stream ([`control`]) or
//! from a static file, and is swapped atomically. This crate must not depend on weft-control.

// Handlers return the reply that refuses a request as their error value; it is built only on
// those cold paths, so its size does not matter.
#![allow(clippy::result_large_err)]

// Public: the sidecar's command line (`cli`, for `weft proxy` and `weft-sidecar`), what the
// CLI configures (`config`) and what the fuzz targets (`weft-fuzz`) call
// (`authz::normalize`, `host::resolve`, `route`). Everything else is the crate's own.
mod access;
mod admin;
pub mod authz;
mod backoff;
mod balance;
mod call;
pub mod cli;
mod clock;
pub mod config;
mod control;
mod cost;
mod discovery;
mod dns;
mod downstream;
mod forward;
pub mod host;
mod identity;
mod idle;
mod inbound;
pub mod intercept;
mod kept;
mod link;
pub mod netfilter;
mod outbound;
mod pool;
mod reason;
mod renewal;
mod replay;
pub mod route;
mod sniff;
mod spans;
mod state;
mod taps;
mod tcp;
mod telemetry;
mod trust;
mod upgrade;

pub use config::{Bound, ProxyConfig, Source, StaticFile, Workload};
pub use link::LinkError;
use state::Proxy;

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use weft_core::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind the {listener} listener on {addr}: {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] link::LinkError),
    #[error("cannot bind the DNS listener on {addr}: {source}")]
    Dns { addr: SocketAddr, source: std::io::Error },
}

/// How long a leaving proxy's inbound listener keeps accepting after its control stream has
/// closed: the control plane drops its endpoint and tells the callers within milliseconds, so
/// by the time the listener closes no caller still dials it (closing at once refused the
/// callers that had not heard yet: 1 request in 6,000 failed under churn, retries spent).
const LEAVE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Binds every listener, then serves until `shutdown`; returns once drained.
pub async fn start(cfg: ProxyConfig, shutdown: Shutdown) -> Result<(Bound, tokio::task::JoinHandle<()>), StartError> {
    let started = start_staged(cfg, Shutdown::new(), shutdown, None).await?;
    Ok((started.bound, started.handle))
}

/// A proxy started by [`start_staged`].
pub struct Started {
    pub bound: Bound,
    /// True once the proxy holds its identity (when it has a join token) and a first config.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled once the inbound listener has stopped and its requests in flight have finished.
    pub inbound_drained: Shutdown,
    /// Ends once everything has drained.
    pub handle: tokio::task::JoinHandle<()>,
}

/// As [`start`], for `weft run`, which stops the two directions one after the other: cancelling
/// `inbound` stops the inbound listener alone (its requests in flight finish, then
/// `inbound_drained` fires) while the app keeps calling out; `shutdown` stops the rest.
/// `intercept` adds the listeners for intercepted traffic ([`intercept`]).
pub async fn start_staged(
    cfg: ProxyConfig,
    inbound: Shutdown,
    shutdown: Shutdown,
    intercept: Option<intercept::Settings>,
) -> Result<Started, StartError> {
    let bind = |listener: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { listener, addr, source })
    };
    let inbound_l = bind("inbound", cfg.inbound).await?;
    let outbound_l = bind("outbound", cfg.outbound).await?;
    let mut tcp_l = Vec::new();
    for (addr, service) in &cfg.tcp {
        tcp_l.push((bind("tcp", *addr).await?, service.clone()));
    }
    let intercept_l = match &intercept {
        Some(s) => Some((
            bind("intercept", s.outbound).await?,
            intercept::bind_dns(s.dns)
                .await
                .map_err(|source| StartError::Dns { addr: s.dns, source })?,
            s.clone(),
        )),
        None => None,
    };
    let admin_l = match cfg.admin {
        Some(a) => Some(bind("admin", a).await?),
        None => None,
    };
    let bound = Bound {
        inbound: inbound_l.local_addr().expect("bound"),
        outbound: outbound_l.local_addr().expect("bound"),
        admin: admin_l.as_ref().map(|l| l.local_addr().expect("bound")),
    };
    let limits = weft_core::serve::Limits {
        idle_timeout: cfg.idle_timeout,
        ..Default::default()
    };
    let (mut proxy, subscriptions) = Proxy::new(cfg, bound.clone())?;
    proxy.local.every_app_port = intercept.is_some();
    let proxy = Arc::new(proxy);
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(subscriptions) = subscriptions {
        tasks.spawn(control::run(proxy.clone(), subscriptions, shutdown.clone()));
    }
    if proxy.link.is_some() && proxy.local.token.is_some() {
        tasks.spawn(renewal::run(proxy.clone(), shutdown.clone()));
    }
    for (listener, service) in tcp_l {
        tracing::info!(addr = %listener.local_addr().expect("bound"), %service, "opaque TCP listener");
        tasks.spawn(tcp::serve_tcp(proxy.clone(), listener, service, shutdown.clone()));
    }
    if let Some((listener, dns, settings)) = intercept_l {
        tasks.spawn(intercept::serve(
            proxy.clone(),
            listener,
            settings,
            limits.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(dns::serve(proxy.clone(), dns, shutdown.clone()));
    }
    let reaper = proxy.clone();
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => reaper.pools.reap(),
                _ = stop.cancelled() => return,
            }
        }
    });
    let p = proxy.clone();
    tasks.spawn(weft_core::serve::serve(outbound_l, limits.clone(), shutdown.clone(), move |req| {
        outbound::handle(p.clone(), req)
    }));
    let p = proxy.clone();
    let acceptor = proxy.clone();
    let inbound_stop = match proxy.link {
        Some(_) => {
            let (stop, leaving) = (Shutdown::new(), shutdown.clone());
            let later = stop.clone();
            tasks.spawn(async move {
                leaving.cancelled().await;
                tokio::time::sleep(LEAVE_GRACE).await;
                later.cancel();
            });
            stop
        }
        // A child: stopping inbound early must not stop the rest.
        None => shutdown.child_token(),
    };
    let (early, stop) = (inbound.clone(), inbound_stop.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = early.cancelled() => stop.cancel(),
            _ = stop.cancelled() => {}
        }
    });
    let inbound_drained = Shutdown::new();
    let drained = inbound_drained.clone();
    let inbound_serve = weft_core::serve::serve_with(
        inbound_l,
        limits.clone(),
        inbound_stop,
        move |tcp, remote| inbound::accept(acceptor.clone(), tcp, remote),
        move |req| inbound::handle(p.clone(), req),
    );
    tasks.spawn(async move {
        inbound_serve.await;
        drained.cancel();
    });
    if let Some(l) = admin_l {
        let admin = Arc::new(admin::admin(&proxy));
        tasks.spawn(weft_core::serve::serve(l, limits, shutdown.clone(), move |req| {
            let admin = admin.clone();
            async move { admin.handle(&req) }
        }));
    }
    tracing::info!(inbound = %bound.inbound, outbound = %bound.outbound, admin = ?bound.admin, "proxy listening");
    let handle = tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
    Ok(Started {
        bound,
        ready: proxy.discovery.ready.ready.clone(),
        inbound_drained,
        handle,
    })
}

//! Opaque TCP listeners (`--tcp LISTEN=SERVICE`): every connection is joined to an endpoint of
//! the service through its sidecar, which is asked to upgrade to `weft-tcp` and connects to its
//! app. The endpoint is picked, tried and retried like any request's ([`crate::call`]).

use crate::discovery::Missing;
use crate::forward::APP_PORT_HEADER;
use crate::reason::Reason;
use crate::state::Proxy;
use crate::upgrade::{TCP_PROTOCOL, join};
use http::header::{CONNECTION, HOST, UPGRADE};
use http::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::net::TcpStream;

/// Accepts connections until `shutdown`, each joined to an endpoint of `service`.
pub(crate) async fn serve_tcp(proxy: Arc<Proxy>, listener: tokio::net::TcpListener, service: String, shutdown: weft_core::Shutdown) {
    let service: Arc<str> = Arc::from(service);
    loop {
        let (tcp, remote) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "TCP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let (proxy, service) = (proxy.clone(), service.clone());
        tokio::spawn(async move {
            let outcome = tcp_connection(&proxy, tcp, &service, None).await;
            proxy.telemetry.tcp(&service, outcome);
            if outcome != "closed" {
                tracing::info!(%remote, %service, outcome, "TCP connection refused");
            }
        });
    }
}

/// Joins `tcp` to an endpoint of `service` (to its app's `app_port` when given, else its declared
/// port); returns how it ended (`closed`, or the reason).
pub(crate) async fn tcp_connection(proxy: &Arc<Proxy>, tcp: TcpStream, service: &Arc<str>, app_port: Option<u16>) -> &'static str {
    let Ok(target) = proxy.discovery.resolve(service, &proxy.identity) else {
        return Reason::UnknownService.as_str();
    };
    let rt = match proxy.discovery.service(&target).await {
        Ok(rt) => rt,
        Err(Missing::Unknown) => return Reason::UnknownService.as_str(),
        Err(Missing::NoAnswer) => return Reason::DiscoveryTimeout.as_str(),
    };
    let (mut parts, _) = Request::builder()
        .method("GET")
        .uri("/")
        .header(HOST, &**service)
        .header(UPGRADE, TCP_PROTOCOL)
        .header(CONNECTION, "upgrade")
        .body(())
        .expect("valid upgrade request")
        .into_parts();
    if let Some(port) = app_port {
        parts.headers.insert(APP_PORT_HEADER, port.into());
    }
    let (outcome, upstream) = crate::call::upgrade(proxy, &rt, &rt.default_route, parts).await;
    let Some(upstream) = upstream else {
        return match Reason::of(&outcome.resp) {
            Some(reason) => reason.as_str(),
            // The endpoint's sidecar answered without upgrading, and without a reason.
            None if outcome.resp.status() == StatusCode::SWITCHING_PROTOCOLS => Reason::UpstreamReset.as_str(),
            None => "",
        };
    };
    match upstream.await {
        Ok(u) => {
            let (sent, received) = join(tcp, TokioIo::new(u)).await;
            proxy.telemetry.tcp_bytes(service, sent, received);
            "closed"
        }
        Err(_) => Reason::UpstreamReset.as_str(),
    }
}

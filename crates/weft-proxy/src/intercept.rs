//! Transparent interception (`weft run --intercept`): the listener that the namespace's
//! redirected outbound TCP arrives on.
//!
//! The firewall rules (installed by `weft run`, see [`crate::netfilter`]) rewrite the
//! destination of every outbound TCP connection of the app to this listener; the kernel keeps
//! the address the app dialled, which [`crate::netfilter::original_dst`] reads back
//! (`SO_ORIGINAL_DST`). That address decides where the connection goes; its port, unless 80 or
//! 443 (the service itself), is the port of the service's app it goes to ([`asked_port`]):
//!
//! - a service's virtual IP (whether or not the sidecar's DNS handed it out, see
//!   [`crate::dns`]: the control plane is asked for an address no known service has) or the
//!   address of one of a known service's endpoints: the mesh. On a declared-opaque port the
//!   bytes go to the service as opaque TCP over mTLS at once; otherwise the first bytes decide
//!   ([`crate::sniff`]): HTTP/1.1 and HTTP/2 take the same route as the explicit outbound
//!   listener (policy, balancing, retries, mTLS), anything else (TLS the app speaks itself,
//!   unknown protocols) goes as opaque TCP over mTLS.
//! - anything else: straight to where the app was going, untouched.

use crate::host::ServiceRef;
use crate::sniff::{self, Protocol};
use crate::state::Proxy;
use http::{HeaderValue, Request, Uri};
use hyper::body::Incoming;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use weft_core::Shutdown;
use weft_core::serve::Io;

/// Ports whose protocol the server speaks first, or that are never HTTP: never sniffed (the
/// client would wait for a greeting while the sidecar waits for the client's first bytes).
/// Linkerd's default list: SMTP, MySQL, PostgreSQL, Redis, Elasticsearch transport, memcached.
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// The intercepted-traffic listeners of one sidecar.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where the redirected outbound TCP arrives.
    pub outbound: SocketAddr,
    /// Where the redirected DNS queries arrive (UDP and TCP).
    pub dns: SocketAddr,
    /// Destination ports never sniffed: opaque TCP at once.
    pub opaque_ports: Vec<u16>,
}

/// The service an intercepted connection goes to (a request extension).
#[derive(Clone, Debug)]
pub(crate) struct Intercepted {
    pub service: ServiceRef,
    /// The port of the service's app the app dialled, unless it named the service itself.
    pub app_port: Option<u16>,
}

/// Binds the DNS listeners (UDP, and TCP for long answers and TCP-only resolvers).
pub(crate) async fn bind_dns(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    Ok((UdpSocket::bind(addr).await?, TcpListener::bind(addr).await?))
}

/// Serves the intercepted outbound listener until `shutdown`, then drains.
pub(crate) async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    settings: Settings,
    limits: weft_core::serve::Limits,
    shutdown: Shutdown,
) {
    let settings = Arc::new(settings);
    let accepting = proxy.clone();
    weft_core::serve::serve_with(
        listener,
        limits,
        shutdown,
        move |tcp, remote| accept(accepting.clone(), settings.clone(), tcp, remote),
        move |req| handle(proxy.clone(), req),
    )
    .await
}

/// Decides where one intercepted connection goes. HTTP comes back to be served as requests;
/// everything else is handled here (opaque or pass-through) and `None` returned.
async fn accept(proxy: Arc<Proxy>, settings: Arc<Settings>, tcp: TcpStream, remote: SocketAddr) -> Option<(Box<dyn Io>, Intercepted)> {
    let _ = tcp.set_nodelay(true);
    let dst = match crate::netfilter::original_dst(&tcp) {
        Ok(dst) => dst,
        Err(error) => {
            tracing::warn!(%remote, %error, "intercepted connection without an original destination; closed");
            return None;
        }
    };
    let Some(service) = mesh_service(&proxy, *dst.ip()).await else {
        tokio::spawn(pass_through(tcp, dst));
        return None;
    };
    let app_port = asked_port(dst.port());
    if settings.opaque_ports.contains(&dst.port()) {
        tracing::debug!(%dst, service = %service.name, "declared opaque port");
        tokio::spawn(opaque(proxy, tcp, service, app_port));
        return None;
    }
    let (protocol, took) = sniff::detect(&tcp).await;
    tracing::debug!(%dst, ?protocol, micros = took.as_micros() as u64, "protocol detected");
    match protocol {
        Protocol::Http1 | Protocol::H2 => Some((Box::new(tcp), Intercepted { service, app_port })),
        Protocol::Tls { .. } | Protocol::Opaque => {
            tokio::spawn(opaque(proxy, tcp, service, app_port));
            None
        }
    }
}

/// The port of the service's app a connection to `port` asks for: none for HTTP's and HTTPS's
/// default ports, which name the service itself (`http://orders-api/` reaches the port its
/// workloads declare, `--app`), else that port of the app (`http://orders-api:9090/`).
fn asked_port(port: u16) -> Option<u16> {
    (port != 80 && port != 443).then_some(port)
}

/// The mesh service behind `ip`: the one whose virtual IP it is (asking the control plane for
/// an address no service in force has), else the one with an endpoint there.
async fn mesh_service(proxy: &Proxy, ip: Ipv4Addr) -> Option<ServiceRef> {
    if weft_api::mesh::VIRTUAL_IPS.contains(ip) {
        return proxy.discovery.service_at(ip).await;
    }
    let config = proxy.discovery.config();
    config
        .services
        .values()
        .find(|s| s.endpoints.iter().any(|e| e.address.ip() == ip))
        .map(|s| ServiceRef {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
        })
}

/// Opaque TCP to `service` (its app's `app_port`, when given) over mTLS between the sidecars,
/// as a `--tcp` listener does.
async fn opaque(proxy: Arc<Proxy>, tcp: TcpStream, service: ServiceRef, app_port: Option<u16>) {
    let name: Arc<str> = Arc::from(format!("{}.{}", service.name, service.namespace));
    let outcome = crate::tcp::tcp_connection(&proxy, tcp, &name, app_port).await;
    proxy.telemetry.tcp(&name, outcome);
}

/// A destination outside the mesh: connect to it (this sidecar's own sockets are not
/// redirected) and join the streams.
async fn pass_through(mut tcp: TcpStream, dst: SocketAddrV4) {
    match TcpStream::connect(dst).await {
        Ok(mut upstream) => {
            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
        }
        Err(error) => tracing::debug!(%dst, %error, "pass-through connect failed"),
    }
}

/// One request of an intercepted HTTP connection: named after its service when the app named
/// something else (an address), then routed exactly as on the explicit outbound listener.
async fn handle(proxy: Arc<Proxy>, mut req: Request<Incoming>) -> http::Response<weft_core::Body> {
    if let Some(to) = req.extensions().get::<Intercepted>().cloned() {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok().map(str::to_string));
        let named = authority.is_some_and(|a| proxy.discovery.resolve(&a, &proxy.identity).is_ok_and(|s| s == to.service));
        if !named {
            name_target(&mut req, &to.service);
        }
        if let Some(port) = to.app_port {
            req.extensions_mut().insert(crate::forward::AppPort(port));
        }
    }
    crate::outbound::handle(proxy, req).await
}

/// Points `req` at `service` (`NAME.NAMESPACE`): the URI's authority when it has one (HTTP/2,
/// absolute form), else `Host`.
fn name_target<B>(req: &mut Request<B>, service: &ServiceRef) {
    let name = format!("{}.{}", service.name, service.namespace);
    if req.uri().authority().is_some() {
        let mut parts = req.uri().clone().into_parts();
        parts.authority = name.parse().ok();
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    if let Ok(host) = HeaderValue::from_str(&name) {
        req.headers_mut().insert(http::header::HOST, host);
    }
}

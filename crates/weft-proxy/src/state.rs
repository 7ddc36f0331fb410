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
    /// `app` as a URI authority, parsed once rather than formatted on every request to it.
    pub(crate) app_authority: http::uri::Authority,
    pub(crate) app_protocol: AppProtocol,
    /// Header names the inbound proxy removes besides the identity headers it always removes:
    /// configured at start, lowercase, each once.
    pub(crate) strip_headers: Vec<http::HeaderName>,
    pub(crate) bound: Bound,
    pub(crate) advertise: SocketAddr,
    /// Join token (control mode); the proxy is ready only once it holds a certificate.
    pub(crate) token: Option<String>,
    /// Where the workload certificate is kept across restarts ([`crate::kept`]).
    pub(crate) identity_dir: Option<std::path::PathBuf>,
    /// Whether the sidecar intercepts the workload's traffic, and so stands in front of every
    /// port of its app, not only the declared one (set at start).
    pub(crate) every_app_port: bool,
}

impl Proxy {
    /// Builds the proxy; in control mode also returns the receiver of new subscriptions, which
    /// the control stream drains.
    pub(crate) fn new(cfg: ProxyConfig, bound: Bound) -> Result<(Self, Option<mpsc::UnboundedReceiver<String>>), LinkError> {
        let identity = Arc::new(Identity::default());
        let advertise = cfg.advertise.unwrap_or_else(|| advertised(bound.inbound, &cfg.source));
        let (config, link, token, channel, identity_dir) = match cfg.source {
            Source::Static(mesh) => (mesh, None, None, None, None),
            Source::Control { url, token, identity_dir } => {
                let link = Link::new(&url, token.as_deref(), identity.clone())?;
                let (tx, rx) = mpsc::unbounded_channel();
                (MeshConfig::default(), Some(link), token, Some((tx, rx)), identity_dir)
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
                advertise,
                workload,
                app: cfg.app,
                app_authority: authority_of(cfg.app),
                app_protocol: cfg.app_protocol,
                strip_headers,
                bound,
                token,
                identity_dir,
                every_app_port: false,
            },
            link,
            identity,
            discovery,
            pools: Pools::new(cfg.app, cfg.app_connect_timeout),
            telemetry,
            mirrors: Arc::new(tokio::sync::Semaphore::new(MIRROR_CONCURRENCY)),
            clock: Clock::default(),
        };
        Ok((proxy, rx))
    }
}

/// The address other proxies dial for this workload when `--advertise` is not given: the bound
/// inbound address, unless that is a wildcard (0.0.0.0, ::), which no other host can dial; then
/// the local address of the route to the control plane (this host's address on the network the
/// mesh shares), with the bound port. Nothing is sent: connecting a UDP socket only asks the
/// kernel for the route.
fn advertised(bound: SocketAddr, source: &Source) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let Source::Control { url, .. } = source else {
        return bound;
    };
    match route_to(url) {
        Ok(local) => SocketAddr::new(local, bound.port()),
        Err(e) => {
            tracing::warn!(inbound = %bound, control = %url, error = %e, "cannot tell this host's address for the wildcard inbound listener; advertising it as bound (set --advertise)");
            bound
        }
    }
}

/// The local address the kernel would send from to the first control-plane URL's host.
fn route_to(urls: &str) -> std::io::Result<std::net::IpAddr> {
    use std::net::{ToSocketAddrs, UdpSocket};
    let first = urls.split(',').next().unwrap_or_default().trim();
    let uri: http::Uri = first
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{first:?}: {e}")))?;
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let remote = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host} has no address")))?;
    let any: SocketAddr = if remote.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("a literal");
    let socket = UdpSocket::bind(any)?;
    socket.connect(remote)?;
    Ok(socket.local_addr()?.ip())
}

/// A socket address as a URI authority (`1.2.3.4:80`, `[::1]:80`).
pub(crate) fn authority_of(addr: SocketAddr) -> http::uri::Authority {
    http::uri::Authority::try_from(addr.to_string()).expect("a socket address is a valid URI authority")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(url: &str) -> Source {
        Source::Control {
            url: url.into(),
            token: None,
            identity_dir: None,
        }
    }

    #[test]
    fn a_wildcard_inbound_is_advertised_as_the_address_toward_the_control_plane() {
        let wildcard: SocketAddr = "0.0.0.0:15006".parse().unwrap();
        let to_loopback = control("https://127.0.0.1:7071,https://10.9.9.9:7071");
        assert_eq!(advertised(wildcard, &to_loopback), "127.0.0.1:15006".parse().unwrap());
        let specific: SocketAddr = "127.0.0.2:15006".parse().unwrap();
        assert_eq!(advertised(specific, &to_loopback), specific, "a specific address is kept");
        let unusable = control("https://[not an address]:7071");
        assert_eq!(advertised(wildcard, &unusable), wildcard, "no route: kept, with a warning");
    }
}

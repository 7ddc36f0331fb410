//! The inbound listener: mesh -> app. Hands each request to the app in the HTTP version the
//! workload declares for it ([`AppProtocol`]), whatever its caller spoke (HTTP/1.1 through the
//! pooled client, HTTP/2 over one multiplexed connection). It is the trust boundary: before the
//! app sees a request, every header a caller could use to claim an identity is removed, and an
//! mTLS caller's verified identity is stated in `x-forwarded-client-cert` ([`identity_headers`]).

use crate::authz;
use crate::config::AppProtocol;
use crate::downstream::BodyState;
use crate::forward::{client_cert, finish, reply, retarget_parsed, strip_hop_by_hop};
use crate::identity::spiffe_id;
use crate::pool::AppError;
use crate::reason::Reason;
use crate::state::Proxy;
use crate::telemetry::{Finished, access_entry};
use crate::trust::{ConnInfo, identity_headers};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Version};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use weft_api::proto::Direction;
use weft_api::resource::{Action, AuthzMode, MtlsMode};
use weft_core::Body;
use weft_core::serve::Io;

/// Decides what an inbound connection is: a TLS ClientHello (first byte 0x16) is an mTLS
/// handshake, which must present a certificate from the mesh's CA; anything else is
/// plaintext, refused when this workload's policy is `strict`.
pub(crate) async fn accept(proxy: Arc<Proxy>, tcp: TcpStream, remote: SocketAddr) -> Option<(Box<dyn Io>, ConnInfo)> {
    let (redirected_from, local) = arrival(&tcp);
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await.ok()?;
    if n == 1 && first[0] == 0x16 {
        let Some(tls) = proxy.identity.tls() else {
            proxy.telemetry.connection("mtls", "refused-no-identity");
            tracing::warn!(%remote, "mTLS connection refused: this proxy has no workload certificate yet");
            return None;
        };
        match tokio_rustls::TlsAcceptor::from(tls.server.clone()).accept(tcp).await {
            Ok(stream) => {
                let peer = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(spiffe_id)
                    .map(Arc::<str>::from);
                let client_cert = peer.as_deref().and_then(|p| client_cert(&tls.identity, p));
                if client_cert.is_none() {
                    tracing::warn!(%remote, peer = ?peer, "mTLS caller without a usable SPIFFE ID: its requests carry no identity header");
                }
                proxy.telemetry.connection("mtls", "accepted");
                Some((
                    Box::new(stream),
                    ConnInfo {
                        mtls: true,
                        peer,
                        client_cert,
                        redirected_from,
                        local,
                    },
                ))
            }
            Err(error) => {
                proxy.telemetry.connection("mtls", "handshake-failed");
                tracing::info!(%remote, %error, "mTLS handshake failed");
                None
            }
        }
    } else {
        if strict(&proxy) {
            proxy.telemetry.connection("plaintext", "refused-strict");
            proxy.telemetry.refused_plaintext(proxy.discovery.revision());
            tracing::info!(%remote, "plaintext connection refused: mTLS is strict");
            return None;
        }
        proxy.telemetry.connection("plaintext", "accepted");
        let conn = ConnInfo {
            redirected_from,
            local,
            ..ConnInfo::plaintext()
        };
        Some((Box::new(tcp), conn))
    }
}

/// Where a connection arrived, and where it was going when interception redirected it here:
/// `SO_ORIGINAL_DST` names another port than this listener's only after a redirect rule.
fn arrival(tcp: &TcpStream) -> (Option<SocketAddr>, Option<IpAddr>) {
    let local = tcp.local_addr().ok();
    let original = crate::netfilter::original_dst(tcp)
        .ok()
        .map(SocketAddr::V4)
        .filter(|o| local.is_some_and(|l| l.port() != o.port()));
    (original, local.map(|l| l.ip()))
}

/// The app address a request goes to: the declared app (`--app`), unless the caller asked for
/// another port of the app, by dialling it (a connection interception redirected here) or, over
/// mTLS, in its sidecar's [`crate::forward::APP_PORT_HEADER`]. The header counts only where this sidecar
/// intercepts, and so already stands in front of every port: a sidecar that fronts one declared
/// port must not become a way for any peer to reach the host's other ports. Another port is served at the address the caller
/// reached, never on loopback: a port the app binds to loopback alone stays out of other hosts'
/// reach, as it is without the mesh. This listener's own port means the declared app too (an
/// app that dialled an endpoint's address).
fn app_target(proxy: &Proxy, conn: &ConnInfo, headers: &http::HeaderMap) -> SocketAddr {
    let asked = match conn.redirected_from {
        Some(dst) => Some(dst),
        None if conn.mtls && proxy.local.every_app_port => {
            // A value no sidecar sends (not a port) is ignored: the declared app is served.
            let port = headers
                .get(&crate::forward::APP_PORT_NAME)
                .and_then(|v| v.to_str().ok()?.parse::<u16>().ok());
            port.zip(conn.local).map(|(port, ip)| SocketAddr::new(ip, port))
        }
        None => None,
    };
    let declared = [0, proxy.local.app.port(), proxy.local.bound.inbound.port()];
    asked.filter(|a| !declared.contains(&a.port())).unwrap_or(proxy.local.app)
}

/// Whether this workload's policy makes mTLS strict.
fn strict(proxy: &Proxy) -> bool {
    proxy.discovery.config().security.as_ref().and_then(|s| s.mtls) == Some(MtlsMode::Strict)
}

/// A request on a plaintext connection accepted before mTLS became strict is refused too: strict
/// holds for the connections already open, not only for new ones.
fn plaintext_refused(proxy: &Proxy, conn: &ConnInfo) -> Option<Response<Body>> {
    if conn.mtls || !strict(proxy) {
        return None;
    }
    Some(reply(
        StatusCode::FORBIDDEN,
        Reason::MtlsRequired,
        format!("{} accepts only mTLS; this connection is plaintext", proxy.local.workload.service()),
    ))
}

pub(crate) async fn handle(proxy: Arc<Proxy>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let span = proxy
        .telemetry
        .tracer
        .start(req.headers_mut(), weft_api::otlp::span::SpanKind::Server)
        .map(|s| (s, req.method().clone()));
    let conn = req.extensions().get::<ConnInfo>().cloned().unwrap_or(ConnInfo::plaintext());
    let app = app_target(&proxy, &conn, req.headers());
    let version = req.version();
    let grpc = crate::forward::is_grpc(req.headers());
    let revision = proxy.discovery.revision();
    let captured = proxy.telemetry.access.capture(&req);
    let tapped = proxy.taps.tapping().then(|| {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        (req.method().to_string(), crate::access::logged_path(req.uri().path()).0, authority)
    });
    let request_bytes = captured.as_ref().map(|_| Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let req = crate::downstream::watched(req, request_bytes.as_ref());
    let connect = (req.method() == http::Method::CONNECT).then(crate::upgrade::connect_refused);
    let refused = connect.or_else(|| plaintext_refused(&proxy, &conn)).or_else(|| {
        proxy
            .discovery
            .inbound_limiter
            .load()
            .as_ref()
            .as_ref()
            .filter(|l| !l.allow())
            .map(|l| {
                reply(
                    StatusCode::TOO_MANY_REQUESTS,
                    Reason::RateLimited,
                    format!(
                        "{} accepts {} requests/s (burst {}) per instance",
                        proxy.local.workload.service(),
                        l.limit.requests_per_second,
                        l.limit.burst
                    ),
                )
            })
    });
    let mut waited = Duration::ZERO;
    let resp = match refused {
        Some(r) => r,
        None => match authorize(&proxy, &conn, &req) {
            Ok(canonical) => match crate::upgrade::requested(&req) {
                Some(protocol) => crate::upgrade::inbound(&proxy, &conn, req, canonical, protocol, app).await,
                None => to_app(&proxy, &conn, req, app, canonical, grpc, &mut waited).await,
            },
            Err(denied) => denied,
        },
    };
    let done = Finished {
        direction: Direction::Inbound,
        service: None,
        route: None,
        mtls: conn.mtls,
        peer: conn.peer.as_ref(),
        revision,
        status: resp.status().as_u16(),
        reason: Reason::label_of(&resp),
        elapsed: start.elapsed(),
        waited,
    };
    proxy.telemetry.record(&done);
    if let Some((method, path, authority)) = tapped {
        let own = proxy.identity.tls().map(|t| t.identity.clone()).unwrap_or_default();
        let event = weft_api::proto::TapEvent {
            direction: "inbound".into(),
            source: conn.peer.as_deref().unwrap_or("plaintext").to_string(),
            destination: own,
            method,
            authority,
            path,
            status: done.status.into(),
            reason: done.reason.into(),
            duration_ms: done.elapsed.as_secs_f64() * 1000.0,
            upstream: proxy.local.app.to_string(),
            ..Default::default()
        };
        proxy.taps.tap(proxy.local.workload.service(), event);
    }
    if let Some((span, method)) = span {
        use crate::spans::Attr;
        let attributes = vec![
            ("http.request.method", Attr::Str(method.to_string())),
            ("http.response.status_code", Attr::Int(done.status.into())),
            ("weft.direction", Attr::Str("inbound".into())),
            ("weft.service", Attr::Str(proxy.local.workload.service().to_string())),
            ("weft.reason", Attr::Str(done.reason.into())),
            ("weft.peer", Attr::Str(conn.peer.as_deref().unwrap_or("plaintext").to_string())),
            ("weft.mtls", Attr::Str(conn.mtls.to_string())),
        ];
        let name = format!("{method} {}", proxy.local.workload.service());
        proxy.telemetry.tracer.finish(span, name, attributes, done.status >= 500);
    }
    let resp = match (captured, request_bytes) {
        (Some(c), Some(count)) => {
            let own = proxy.identity.current_id().unwrap_or_default();
            let entry = access_entry(c, &done, own, proxy.local.workload.service(), proxy.local.app.to_string(), 0);
            resp.map(|b| crate::access::Logged::wrap(b, entry, count, start, proxy.telemetry.access.clone()))
        }
        _ => resp,
    };
    finish(resp, version, grpc)
}

/// Applies this workload's authorization, if it has one (and is not bypassed). Returns the
/// canonical path and query to forward, or the reply that refuses the request.
fn authorize<B>(proxy: &Proxy, conn: &ConnInfo, req: &Request<B>) -> Result<Option<String>, Response<Body>> {
    let config = proxy.discovery.config();
    let Some(authz) = config
        .security
        .as_ref()
        .and_then(|s| s.authorization.as_ref())
        .filter(|_| !config.bypass)
    else {
        return Ok(None);
    };
    let canonical = authz::normalize(req.uri().path()).map_err(|why| {
        proxy.telemetry.authz("refused-path");
        reply(StatusCode::BAD_REQUEST, Reason::BadPath, why)
    })?;
    let method = req.method().as_str();
    let verdict = authz::evaluate(authz, conn.peer.as_deref(), method, &canonical);
    let rule = verdict.rule.map(|i| format!("rules[{i}]")).unwrap_or_else(|| "default".into());
    if verdict.action == Action::Deny {
        let enforce = authz.mode == AuthzMode::Enforce;
        proxy.telemetry.authz(if enforce { "deny" } else { "audit-deny" });
        tracing::warn!(
            policy = %config.security_name,
            rule = %rule,
            source = conn.peer.as_deref().unwrap_or("plaintext"),
            method,
            path = %canonical,
            enforced = enforce,
            "authorization denied"
        );
        if enforce {
            return Err(reply(
                StatusCode::FORBIDDEN,
                Reason::AuthzDenied,
                format!(
                    "{method} {canonical} is not allowed for {} ({}, {rule})",
                    conn.peer.as_deref().unwrap_or("an unauthenticated caller"),
                    config.security_name
                ),
            ));
        }
    } else {
        proxy.telemetry.authz("allow");
    }
    let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    Ok(Some(format!("{canonical}{query}")))
}

/// Forwards to the app at `app` in its declared protocol; `canonical` (path and query) replaces the
/// request's when authorization normalized it. `waited` becomes the time spent waiting on the
/// app for the response head, connecting included ([`crate::cost`]).
async fn to_app(
    proxy: &Proxy,
    conn: &ConnInfo,
    req: Request<Body>,
    app: SocketAddr,
    canonical: Option<String>,
    grpc: bool,
    waited: &mut Duration,
) -> Response<Body> {
    let app_h2 = match proxy.local.app_protocol {
        AppProtocol::H2 => true,
        AppProtocol::Auto => grpc,
        AppProtocol::Http1 => false,
    };
    if grpc && !app_h2 {
        // gRPC over HTTP/1.1 would lose its trailers (grpc-status): refuse it plainly.
        return reply(
            StatusCode::NOT_IMPLEMENTED,
            Reason::AppProtocolMismatch,
            format!(
                "{} declares its app http1 (--app-protocol, appProtocol), and gRPC needs HTTP/2: declare h2 or auto",
                proxy.local.workload.id()
            ),
        );
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    identity_headers(&proxy.local.strip_headers, conn, &mut parts.headers);
    // The target's parts are taken as parsed (the request's, the app's address parsed at
    // start): rebuilding the URI from strings was a format and a parse per request (#15).
    let own_authority = parts.uri.authority().cloned();
    let Some(pq) = path_and_query(&parts.uri, canonical) else {
        return bad_target(&parts.uri);
    };
    let client = parts.extensions.get::<Arc<BodyState>>().cloned().unwrap_or_default();
    // Without an authority or Host from the caller, the app is named by its address.
    let fallback = match app == proxy.local.app {
        true => proxy.local.app_authority.clone(),
        false => crate::state::authority_of(app),
    };

    if app_h2 {
        parts.version = Version::HTTP_2;
        let host = || {
            let host = parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok());
            host.map(Authority::try_from)
        };
        let authority = match own_authority.map(Ok).or_else(host) {
            Some(Ok(a)) => a,
            Some(Err(_)) => return bad_target(&parts.uri),
            None => fallback,
        };
        if retarget_parsed(&mut parts, authority, pq).is_err() {
            return bad_target(&parts.uri);
        }
        let sent = Instant::now();
        let mut sender = match proxy.pools.h2(app, None, proxy.pools.app_opts()).await {
            Ok(s) => s,
            Err(e) => return reply(StatusCode::SERVICE_UNAVAILABLE, Reason::AppUnavailable, e),
        };
        let answer = sender.send_request(Request::from_parts(parts, body)).await;
        *waited = sent.elapsed();
        match answer {
            Ok(resp) => resp.map(weft_core::boxed),
            Err(e) => match client.fault() {
                Some(fault) => {
                    tracing::debug!(error = %e, "the app connection failed with the client's body");
                    fault.reply(fault.describe())
                }
                None => {
                    proxy.pools.evict(app);
                    reply(StatusCode::BAD_GATEWAY, Reason::AppReset, e)
                }
            },
        }
    } else {
        parts.version = Version::HTTP_11;
        // The app is named by Host: the request's authority if it had one, else its own Host,
        // else the app's address.
        let host = own_authority
            .as_ref()
            .map(Authority::as_str)
            .or_else(|| parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or(fallback.as_str());
        if let Ok(host) = HeaderValue::from_str(host) {
            parts.headers.insert(http::header::HOST, host);
        }
        // Origin form (`/path?query`), as HTTP/1.1 sends it to a server that is no proxy.
        parts.uri = http::Uri::from(pq);
        let sent = Instant::now();
        let answer = proxy.pools.app_h1(app, Request::from_parts(parts, body)).await;
        *waited = sent.elapsed();
        match answer {
            Ok(resp) => resp,
            Err(e @ AppError::Connect(_)) => reply(StatusCode::SERVICE_UNAVAILABLE, Reason::AppUnavailable, e),
            Err(e) => match client.fault() {
                Some(fault) => {
                    tracing::debug!(error = %e, "the app connection failed with the client's body");
                    fault.reply(fault.describe())
                }
                None => reply(StatusCode::BAD_GATEWAY, Reason::AppReset, e),
            },
        }
    }
}

/// The path and query to forward: `canonical` when authorization normalized it, else the
/// request's own (already parsed); `None` when `canonical` is no valid one.
fn path_and_query(uri: &http::Uri, canonical: Option<String>) -> Option<PathAndQuery> {
    match canonical {
        Some(c) => PathAndQuery::try_from(c).ok(),
        None => Some(uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"))),
    }
}

fn bad_target(uri: &http::Uri) -> Response<Body> {
    reply(
        StatusCode::BAD_REQUEST,
        Reason::BadRequestTarget,
        format!("cannot rebuild the request URI for {uri}"),
    )
}

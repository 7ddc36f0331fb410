//! HTTP/1.1 Upgrade (WebSocket and the like) and opaque TCP.
//!
//! An upgrade cannot ride the multiplexed HTTP/2 connection between sidecars, so it gets a
//! connection of its own (mTLS like any other) on which the Upgrade request is sent as
//! HTTP/1.1; once both sides answered 101 the two streams are joined byte for byte. Opaque TCP
//! uses the same path: the caller's sidecar accepts a plain TCP connection on a `--tcp`
//! listener and asks the destination's sidecar to upgrade to `weft-tcp`, which connects to the
//! app and joins the streams.

use crate::forward::reply;
use crate::reason::Reason;
use crate::state::Proxy;
use crate::trust::ConnInfo;
use http::header::{CONNECTION, HOST, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use weft_api::resource::MtlsMode;
use weft_core::Body;
use weft_core::serve::Io;

/// The protocol name of an opaque TCP stream between sidecars.
pub(crate) const TCP_PROTOCOL: &str = "weft-tcp";

/// The protocol an HTTP/1.1 request asks to upgrade to, if it does.
pub(crate) fn requested<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| req.headers().get(UPGRADE).cloned()).flatten()
}

/// The answer to `CONNECT`, on either listener: a tunnel would carry bytes past every policy
/// and past the inbound's identity headers, and an app's 2xx to it would make hyper hand the
/// client a tunnel that goes nowhere (an HTTPS client behind `HTTPS_PROXY` then failed its
/// TLS handshake with no reason given). The mesh encrypts between sidecars itself: an app
/// sends plain `http://` requests to its outbound.
pub(crate) fn connect_refused() -> Response<Body> {
    let mut resp = reply(
        StatusCode::METHOD_NOT_ALLOWED,
        Reason::UpgradeRefused,
        "CONNECT is not proxied: the mesh encrypts between sidecars itself, so send plain http:// requests (absolute-form, or Host naming the service) to the outbound listener",
    );
    resp.headers_mut().insert(
        http::header::ALLOW,
        HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"),
    );
    resp
}

/// Sends an Upgrade request on a fresh HTTP/1.1 connection. On 101 returns the answer and the
/// upstream's side of the upgraded stream (resolved once hyper hands it over); any other
/// answer comes back as is.
pub(crate) async fn send_upgrade(io: Box<dyn Io>, req: Request<Body>) -> Result<(Response<Body>, Option<OnUpgrade>), String> {
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
    tokio::spawn(async move {
        if let Err(error) = conn.with_upgrades().await {
            tracing::debug!(%error, "upgrade connection ended");
        }
    });
    let mut resp = send.send_request(req).await.map_err(|e| format!("upgrade request: {e}"))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok((resp.map(weft_core::boxed), None));
    }
    let upstream = hyper::upgrade::on(&mut resp);
    Ok((resp.map(|_| weft_core::empty()), Some(upstream)))
}

/// Joins two byte streams until either side closes; returns bytes each way.
pub(crate) async fn join<A, B>(mut a: A, mut b: B) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional(&mut a, &mut b).await.unwrap_or((0, 0))
}

/// Joins the client's upgraded stream with the upstream's once both are handed over.
pub(crate) fn splice(client: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let (sent, received) = join(TokioIo::new(c), TokioIo::new(u)).await;
                tracing::debug!(sent, received, "upgraded stream closed");
            }
            Err(error) => tracing::debug!(%error, "upgrade not completed"),
        }
    });
}

/// Readies the head of an Upgrade request for an endpoint: HTTP/1.1, asking for `protocol`,
/// `Host` naming the service as the app addressed it.
pub(crate) fn prepare(headers: &mut http::HeaderMap, protocol: HeaderValue, authority: &str) {
    headers.insert(UPGRADE, protocol);
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(host) = HeaderValue::from_str(authority) {
        headers.insert(HOST, host);
    }
}

/// Inbound: an Upgrade request for the app at `app`. `weft-tcp` connects to the app's port and joins
/// raw bytes (no header reaches the app); any other protocol is forwarded to the app as an
/// HTTP/1.1 Upgrade, through the same trust boundary as every other request.
/// `canonical` (path and query) replaces the request's when authorization normalized it, as
/// for any other request: the app must get the path that was authorized.
pub(crate) async fn inbound(
    proxy: &Proxy,
    conn: &ConnInfo,
    mut req: Request<Body>,
    canonical: Option<String>,
    protocol: HeaderValue,
    app: std::net::SocketAddr,
) -> Response<Body> {
    if let Some(why) = refused(proxy, conn, &protocol) {
        return reply(StatusCode::FORBIDDEN, Reason::UpgradeRefused, why);
    }
    // Opaque TCP is bytes, whatever the app speaks; an HTTP Upgrade is HTTP/1.1.
    let opaque = protocol.as_bytes() == TCP_PROTOCOL.as_bytes();
    if !opaque && proxy.local.app_protocol == crate::config::AppProtocol::H2 {
        return reply(
            StatusCode::NOT_IMPLEMENTED,
            Reason::AppProtocolMismatch,
            format!(
                "{} declares its app h2, and an HTTP/1.1 Upgrade ({}) needs http1 or auto",
                proxy.local.workload.id(),
                String::from_utf8_lossy(protocol.as_bytes())
            ),
        );
    }
    let client = hyper::upgrade::on(&mut req);
    let app = match TcpStream::connect(app).await {
        Ok(tcp) => tcp,
        Err(e) => {
            return reply(StatusCode::SERVICE_UNAVAILABLE, Reason::AppUnavailable, format!("{app}: {e}"));
        }
    };
    let _ = app.set_nodelay(true);
    if opaque {
        tokio::spawn(async move {
            match client.await {
                Ok(c) => {
                    let (sent, received) = join(TokioIo::new(c), app).await;
                    tracing::debug!(sent, received, "opaque TCP stream closed");
                }
                Err(error) => tracing::debug!(%error, "TCP upgrade not completed"),
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(UPGRADE, TCP_PROTOCOL)
            .header(CONNECTION, "upgrade")
            .body(weft_core::empty())
            .expect("valid 101");
    }
    let (mut parts, _) = req.into_parts();
    parts.headers.insert(UPGRADE, protocol);
    parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    crate::trust::identity_headers(&proxy.local.strip_headers, conn, &mut parts.headers);
    // Origin-form to the app, as an HTTP/1.1 server expects.
    let pq = canonical.unwrap_or_else(|| {
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into())
    });
    if let Some(a) = parts.uri.authority().map(|a| a.to_string())
        && let Ok(host) = HeaderValue::from_str(&a)
    {
        parts.headers.entry(HOST).or_insert(host);
    }
    parts.uri = pq.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
    match send_upgrade(Box::new(app), Request::from_parts(parts, weft_core::empty())).await {
        Ok((resp, Some(upstream))) => {
            splice(client, upstream);
            resp
        }
        Ok((resp, None)) => resp,
        Err(e) => reply(StatusCode::BAD_GATEWAY, Reason::AppReset, e),
    }
}

/// Why an upgrade must not reach the app, if it must not: those that would carry requests past
/// the inbound trust boundary unseen. `h2c` from anyone (the app would then read HTTP/2 requests
/// straight from the caller, forged identity headers and all). Opaque TCP from a plaintext
/// caller where this proxy vouches for identities (it holds a workload certificate and this
/// workload's mTLS is not `off`): the caller could write requests to the app's port itself. Over
/// mTLS a sidecar opens it, for a caller authenticated and authorized like any other.
fn refused(proxy: &Proxy, conn: &ConnInfo, protocol: &HeaderValue) -> Option<&'static str> {
    let h2c = protocol
        .to_str()
        .unwrap_or_default()
        .split(',')
        .any(|p| p.trim().split('/').next().is_some_and(|name| name.eq_ignore_ascii_case("h2c")));
    if h2c {
        return Some("an h2c upgrade would let the caller speak HTTP/2 to the app past this proxy");
    }
    if protocol.as_bytes() == TCP_PROTOCOL.as_bytes() && !conn.mtls && proxy.identity.tls().is_some() {
        let off = proxy.discovery.config().security.as_ref().and_then(|s| s.mtls) == Some(MtlsMode::Off);
        if !off {
            return Some("opaque TCP needs an mTLS caller (this workload's mTLS is not off)");
        }
    }
    None
}

//! Header hygiene and the replies the proxy makes itself.
//!
//! Hop-by-hop headers never cross a proxy; headers only the mesh may set are removed when they
//! come from an app; headers a caller could use to claim an identity are removed at the inbound
//! trust boundary, which then states the verified caller in one header of its own; every reply
//! the proxy writes itself carries a stable reason in `x-weft-error`, the same one used as the
//! metric label.

use crate::reason::{ERROR_HEADER, ERROR_NAME, Reason};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Response, StatusCode};
use weft_core::{Body, full};

/// Marks a request a proxy already retried (or mirrored): no later hop retries it again. An
/// app may forward it, like trace headers, so a call chain does not multiply retries; the
/// inbound proxy hands it to the app for that reason. Accepted from apps, since it can only
/// turn retries off.
pub(crate) const RETRIED: &str = "weft-retried";

/// Set by the inbound proxy for an mTLS caller, in Envoy's format: `By=<this workload's SPIFFE
/// ID>;URI=<the caller's, from its certificate>`. The one identity header an app may trust.
pub(crate) const CLIENT_CERT: &str = "x-forwarded-client-cert";
/// The header in which an intercepting caller's sidecar names the port of the callee's app its
/// app dialled, when not the port the service is reached on by default (see
/// [`crate::intercept`]). A mesh header: apps never set it (their outbound strips it) nor see
/// it (the trust boundary strips it); the callee reads it on mTLS connections only.
pub(crate) const APP_PORT_HEADER: &str = "x-weft-app-port";
/// [`APP_PORT_HEADER`] parsed once.
pub(crate) static APP_PORT_NAME: HeaderName = HeaderName::from_static(APP_PORT_HEADER);
/// `grpc-status`, parsed once: read on every answer a gRPC call gets.
pub(crate) static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The port of the destination's app an intercepted request asks for (a request extension,
/// sent on as [`APP_PORT_HEADER`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AppPort(pub u16);

/// Header names a caller could use to claim an identity, removed by the inbound proxy before
/// the app sees the request.
static IDENTITY_NAMES: [HeaderName; 2] = [HeaderName::from_static(CLIENT_CERT), HeaderName::from_static("x-spiffe-id")];
/// Name prefixes removed for the same reason: the mesh's own (`x-weft-`) and Linkerd's (`l5d-`,
/// which apps migrated from Linkerd may still read).
const IDENTITY_PREFIXES: [&str; 2] = ["x-weft-", "l5d-"];
/// What the inbound proxy always removes, as shown on `/config_dump` (`*`: any name so prefixed).
pub(crate) const IDENTITY_HEADERS: [&str; 4] = ["x-weft-*", CLIENT_CERT, "x-spiffe-id", "l5d-*"];

/// Parsed once: comparing two standard `HeaderName`s is an integer compare, where removing by
/// `&str` parses and hashes the name again on every call (issue #15's profile).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header lists. `te: trailers`
/// (needed by gRPC) is kept; any other `te` is removed. One pass over the names present, most
/// requests having none of them: nothing is removed, hashed or allocated then.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // `Connection` is itself hop-by-hop, so a map with none of these names has nothing to do.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k) || *k == header::TE) {
        return;
    }
    let mut hop: Vec<HeaderName> = headers
        .keys()
        .filter(|k| HOP_BY_HOP.contains(k) || (*k == header::TE && !is_te_trailers(headers)))
        .cloned()
        .collect();
    hop.extend(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok()),
    );
    for name in hop {
        headers.remove(name);
    }
}

/// Whether the request's only `te` is `trailers`, the one value that crosses a proxy.
fn is_te_trailers(headers: &HeaderMap) -> bool {
    headers.get(header::TE).is_some_and(|v| v.as_bytes() == b"trailers")
}

/// Removes headers only the mesh may set (`weft-*`, `x-weft-*`) from a request an app sent.
pub(crate) fn strip_mesh_headers(headers: &mut HeaderMap) {
    let mesh: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("weft-") || k.as_str().starts_with("x-weft-"))
        .cloned()
        .collect();
    for k in mesh {
        headers.remove(k);
    }
}

/// Removes every header a caller could use to claim an identity: [`IDENTITY_HEADERS`] and the
/// configured `extra` names, every copy of each, in any spelling an app could read as one of
/// them. Header names are case-insensitive and a [`HeaderMap`] holds them lowercase, so case
/// never matters; `_` counts as `-`, because CGI-style servers (WSGI, Rack, PHP) turn both into
/// `HTTP_X_SPIFFE_ID`. Trace headers and `weft-retried` are not identities and stay. Allocates
/// only when a prefixed or underscored identity name is present.
pub(crate) fn strip_identity_headers(headers: &mut HeaderMap, extra: &[HeaderName]) {
    for name in &IDENTITY_NAMES {
        headers.remove(name);
    }
    for name in extra {
        headers.remove(name);
    }
    let other: Vec<HeaderName> = headers.keys().filter(|k| claims_identity(k.as_str(), extra)).cloned().collect();
    for name in other {
        headers.remove(name);
    }
}

/// Whether a (lowercase) header name starts with an identity prefix, or is an identity or
/// `extra` name spelled with `_` for `-`.
fn claims_identity(name: &str, extra: &[HeaderName]) -> bool {
    let dashed = |b: u8| if b == b'_' { b'-' } else { b };
    let starts = |p: &str| name.len() >= p.len() && name.bytes().take(p.len()).map(dashed).eq(p.bytes());
    let same = |n: &str| name.len() == n.len() && name.bytes().map(dashed).eq(n.bytes().map(dashed));
    IDENTITY_PREFIXES.iter().any(|p| starts(p))
        || (name.contains('_') && (IDENTITY_NAMES.iter().any(|n| same(n.as_str())) || extra.iter().any(|n| same(n.as_str()))))
}

/// The [`CLIENT_CERT`] value for a caller proven by mTLS: `By=<own>;URI=<peer>`. A value holding
/// `,`, `;` or `=` is double-quoted, as Envoy does. `None` for an ID holding `"`, `\` or bytes
/// no header value may carry (no SPIFFE ID does): the app is then told nothing rather than
/// something a parser could read two ways.
pub(crate) fn client_cert(own: &str, peer: &str) -> Option<HeaderValue> {
    if [own, peer].iter().any(|id| id.contains(['"', '\\'])) {
        return None;
    }
    let mut value = String::with_capacity(12 + own.len() + peer.len());
    value.push_str("By=");
    push_xfcc_value(&mut value, own);
    value.push_str(";URI=");
    push_xfcc_value(&mut value, peer);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(value)).ok()
}

fn push_xfcc_value(out: &mut String, v: &str) {
    let quote = v.contains([',', ';', '=']);
    if quote {
        out.push('"');
    }
    out.push_str(v);
    if quote {
        out.push('"');
    }
}

/// Points `parts` at `http://{authority}{path_and_query}`; a target that cannot be rebuilt is
/// answered 400.
pub(crate) fn retarget(parts: &mut http::request::Parts, authority: &str, path_and_query: &str) -> Result<(), Response<Body>> {
    let bad = || {
        reply(
            StatusCode::BAD_REQUEST,
            Reason::BadRequestTarget,
            format!("cannot rebuild the request URI for {authority}"),
        )
    };
    let authority = Authority::try_from(authority).map_err(|_| bad())?;
    let path_and_query = PathAndQuery::try_from(path_and_query).map_err(|_| bad())?;
    retarget_parsed(parts, authority, path_and_query).map_err(|_| bad())
}

/// [`retarget`] from parts already parsed (the request's own, or the app's address parsed at
/// start): nothing is formatted or parsed again per request.
pub(crate) fn retarget_parsed(
    parts: &mut http::request::Parts,
    authority: Authority,
    path_and_query: PathAndQuery,
) -> Result<(), http::uri::InvalidUriParts> {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    uri.path_and_query = Some(path_and_query);
    parts.uri = http::Uri::from_parts(uri)?;
    Ok(())
}

/// A reply the proxy makes itself: status, reason header, and a one-line explanation. The
/// reason also rides along typed ([`Reason::of`] reads it), so nothing parses the header back.
pub(crate) fn reply(status: StatusCode, reason: Reason, detail: impl std::fmt::Display) -> Response<Body> {
    let mut resp = Response::builder()
        .status(status)
        .header(ERROR_HEADER, HeaderValue::from_static(reason.as_str()))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full(format!("{reason}: {detail}\n")))
        .expect("valid reply");
    resp.extensions_mut().insert(reason);
    resp
}

/// Whether a request is gRPC (by its content type).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status for a reply the proxy made itself with HTTP `status`.
pub(crate) fn grpc_code_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,       // INTERNAL: the request could not be handled as sent
        401 => 16,       // UNAUTHENTICATED
        403 => 7,        // PERMISSION_DENIED
        404 => 12,       // UNIMPLEMENTED
        429 => 8,        // RESOURCE_EXHAUSTED
        431 => 8,        // RESOURCE_EXHAUSTED
        501 => 12,       // UNIMPLEMENTED
        502..=503 => 14, // UNAVAILABLE
        504 => 4,        // DEADLINE_EXCEEDED
        _ => 2,          // UNKNOWN
    }
}

/// Turns a reply the proxy made itself into a trailers-only gRPC answer: HTTP 200 with
/// `grpc-status` and `grpc-message`, keeping the `x-weft-error` reason.
pub(crate) fn as_grpc_status(resp: Response<Body>) -> Response<Body> {
    let code = grpc_code_for(resp.status());
    let reason = resp.headers().get(ERROR_HEADER).cloned();
    let mut out = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("grpc-status", code.to_string());
    if let Some(r) = reason {
        // The reason is a plain token, so it needs no percent-encoding.
        out = out.header("grpc-message", r.clone()).header(ERROR_HEADER, r);
    }
    let mut out = out.body(weft_core::empty()).expect("valid gRPC status");
    *out.extensions_mut() = resp.into_parts().0.extensions;
    out
}

/// Strips hop-by-hop headers from the answer and speaks the client's HTTP version. A reply the
/// proxy made itself to a gRPC request becomes a gRPC status (trailers-only), so gRPC clients
/// see DEADLINE_EXCEEDED, UNAVAILABLE, ... rather than a bare HTTP error.
pub(crate) fn finish(mut resp: Response<Body>, version: http::Version, grpc: bool) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return resp; // its Upgrade and Connection headers are the point
    }
    strip_hop_by_hop(resp.headers_mut());
    if grpc && resp.headers().contains_key(&ERROR_NAME) && !resp.headers().contains_key(&GRPC_STATUS) {
        resp = as_grpc_status(resp);
    }
    *resp.version_mut() = version;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_listed_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("te") && h.contains_key("x-kept"));
        let mut h = HeaderMap::new();
        h.insert("te", "gzip".parse().unwrap());
        h.insert("weft-orig-proto", "HTTP/1.1".parse().unwrap());
        h.insert("x-weft-error", "forged".parse().unwrap());
        strip_hop_by_hop(&mut h);
        strip_mesh_headers(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    fn append(h: &mut HeaderMap, name: &str, value: &str) {
        h.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
    }

    #[test]
    fn identity_headers_go_in_any_case_and_every_copy_and_nothing_else_does() {
        let mut h = HeaderMap::new();
        let spoofed = [
            "X-Forwarded-Client-Cert",
            "x-forwarded-client-cert",
            "X-SPIFFE-ID",
            "x-spiffe-id",
            "X-Weft-Identity",
            "x-weft-error",
            "x-weft-",
            "L5D-Client-ID",
            "l5d-dst-override",
            "X-Internal-User",
            "X_Forwarded_Client_Cert",
            "x_spiffe-id",
            "x_weft_identity",
            "l5d_client_id",
            "x_internal_user",
        ];
        for (i, name) in spoofed.iter().enumerate() {
            append(
                &mut h,
                name,
                &format!("By=spiffe://evil/{i};URI=spiffe://weft.local/ns/default/sa/admin"),
            );
            append(&mut h, name, "second copy");
        }
        let kept = [
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("weft-retried", "1"),
            ("x-weft", "not the prefix"),
            ("x-weftly", "not the prefix"),
            ("l5d", "not the prefix"),
            ("xl5d-id", "not the prefix"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-spiffe-id-hint", "a longer name"),
            ("x_spiffe_idx", "a longer name"),
            ("x_user", "an underscore alone is no identity"),
        ];
        for (k, v) in kept {
            append(&mut h, k, v);
        }
        let extra = [HeaderName::from_static("x-internal-user")];
        strip_identity_headers(&mut h, &extra);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        let mut want = kept.map(|(k, _)| k);
        want.sort_unstable();
        assert_eq!(left, want, "only the non-identity headers stay");
        assert!(kept.iter().all(|(k, v)| h.get(*k).unwrap() == v), "untouched");
        assert_eq!(h.len(), kept.len(), "one value each");
        // Without the extra name, a configured header is not an identity header.
        let mut h = HeaderMap::new();
        append(&mut h, "x-internal-user", "alice");
        strip_identity_headers(&mut h, &[]);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn client_cert_is_envoys_format_and_refuses_what_could_read_two_ways() {
        let own = "spiffe://weft.local/ns/default/sa/orders";
        let peer = "spiffe://weft.local/ns/default/sa/web";
        let v = client_cert(own, peer).expect("plain SPIFFE IDs");
        assert_eq!(
            v.to_str().unwrap(),
            "By=spiffe://weft.local/ns/default/sa/orders;URI=spiffe://weft.local/ns/default/sa/web"
        );
        let v = client_cert(own, "spiffe://td/ns/a;b/sa/c=d,e").expect("quoted");
        assert_eq!(v.to_str().unwrap(), format!("By={own};URI=\"spiffe://td/ns/a;b/sa/c=d,e\""));
        assert_eq!(client_cert(own, "spiffe://td/\"x"), None);
        assert_eq!(client_cert(own, "spiffe://td/\\x"), None);
        assert_eq!(client_cert(own, "spiffe://td/\nx"), None, "no control bytes");
    }
}

//! Header hygiene and the replies the proxy makes itself.
//!
//! Hop-by-hop headers never cross a proxy; headers only the mesh may set are removed when they
//! come from an app; every reply the proxy writes itself carries a stable reason in
//! `x-weft-error`, the same one used as the metric label.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Response, StatusCode};
use weft_core::{Body, full};

/// Set by the outbound proxy: the HTTP version the app's client spoke, so the inbound proxy
/// speaks the same to the destination app.
pub const ORIG_PROTO: &str = "weft-orig-proto";
/// The reason for a reply the proxy made itself.
pub const ERROR_HEADER: &str = "x-weft-error";
/// Marks a request a proxy already retried (or mirrored): no later hop retries it again. An
/// app may forward it, like trace headers, so a call chain does not multiply retries; the
/// inbound proxy hands it to the app for that reason. Accepted from apps, since it can only
/// turn retries off.
pub const RETRIED: &str = "weft-retried";

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including those the `Connection` header lists. `te: trailers`
/// (needed by gRPC) is kept; any other `te` is removed.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if headers.get(header::TE).is_some_and(|v| v.as_bytes() != b"trailers") {
        headers.remove(header::TE);
    }
}

/// Removes headers only the mesh may set (`weft-*`, `x-weft-*`) from a request an app sent.
pub fn strip_mesh_headers(headers: &mut HeaderMap) {
    let mesh: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("weft-") || k.as_str().starts_with("x-weft-"))
        .cloned()
        .collect();
    for k in mesh {
        headers.remove(k);
    }
}

/// Points `parts` at `http://{authority}{path_and_query}`; a target that cannot be rebuilt is
/// answered 400.
pub fn retarget(parts: &mut http::request::Parts, authority: &str, path_and_query: &str) -> Result<(), Response<Body>> {
    parts.uri = http::Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| {
            reply(
                StatusCode::BAD_REQUEST,
                "bad-request-target",
                format!("cannot rebuild the request URI for {authority}"),
            )
        })?;
    Ok(())
}

/// A reply the proxy makes itself: status, reason header, and a one-line explanation.
pub fn reply(status: StatusCode, reason: &'static str, detail: impl std::fmt::Display) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(ERROR_HEADER, HeaderValue::from_static(reason))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full(format!("{reason}: {detail}\n")))
        .expect("valid reply")
}

/// Whether a request is gRPC (by its content type).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status for a reply the proxy made itself with HTTP `status`.
pub fn grpc_code_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,       // INTERNAL: the request could not be handled as sent
        401 => 16,       // UNAUTHENTICATED
        403 => 7,        // PERMISSION_DENIED
        404 => 12,       // UNIMPLEMENTED
        429 => 8,        // RESOURCE_EXHAUSTED
        431 => 8,        // RESOURCE_EXHAUSTED
        502..=503 => 14, // UNAVAILABLE
        504 => 4,        // DEADLINE_EXCEEDED
        _ => 2,          // UNKNOWN
    }
}

/// Turns a reply the proxy made itself into a trailers-only gRPC answer: HTTP 200 with
/// `grpc-status` and `grpc-message`, keeping the `x-weft-error` reason.
pub fn as_grpc_status(resp: Response<Body>) -> Response<Body> {
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

/// Every reason a weft proxy puts in `x-weft-error`.
pub const REASONS: [&str; 22] = [
    "ambiguous-framing",
    "app-reset",
    "app-unavailable",
    "authz-denied",
    "bad-path",
    "bad-request-target",
    "fault-abort",
    "no-client-identity",
    "no-destination",
    "no-healthy-endpoints",
    "per-try-timeout",
    "pool-full",
    "rate-limited",
    "refused-stream",
    "request-timeout",
    "retry-budget-exhausted",
    "stream-idle-timeout",
    "unknown-service",
    "upstream-connect-failed",
    "upstream-connect-timeout",
    "upstream-reset",
    "upstream-tls-failed",
];

/// The reason a response carries, as one of the stable names (for metric labels): empty when
/// the mesh did not make it, `other` for one this proxy does not know (a newer peer's, say).
pub fn reason_of(resp: &Response<Body>) -> &'static str {
    let Some(v) = resp.headers().get(ERROR_HEADER) else { return "" };
    let v = v.as_bytes();
    REASONS.into_iter().find(|r| r.as_bytes() == v).unwrap_or("other")
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
}

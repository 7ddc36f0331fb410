//! The inbound trust boundary: what an inbound connection proved about its caller, and the
//! identity headers the app sees.

use crate::forward::{CLIENT_CERT, strip_identity_headers};
use http::{HeaderMap, HeaderName, HeaderValue};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Facts about an inbound connection, attached to each of its requests.
#[derive(Clone, Debug)]
pub(crate) struct ConnInfo {
    pub(crate) mtls: bool,
    /// The caller's SPIFFE ID, read from its certificate.
    pub(crate) peer: Option<Arc<str>>,
    /// The `x-forwarded-client-cert` value for this connection's requests (`By=` this proxy's
    /// SPIFFE ID as presented in the handshake, `URI=` the caller's), built once per connection;
    /// `None` for plaintext.
    pub(crate) client_cert: Option<HeaderValue>,
    /// Where the connection was going when interception redirected it to this listener:
    /// another port of the app (`SO_ORIGINAL_DST`). `None` when it dialled the listener itself.
    pub(crate) redirected_from: Option<SocketAddr>,
    /// The address of this host the connection arrived at.
    pub(crate) local: Option<IpAddr>,
}

impl ConnInfo {
    pub(crate) const fn plaintext() -> Self {
        ConnInfo {
            mtls: false,
            peer: None,
            client_cert: None,
            redirected_from: None,
            local: None,
        }
    }
}

/// The trust boundary, the last change to a request's headers before the app sees them: removes
/// every header a caller could use to claim an identity (see
/// [`strip_identity_headers`], plus `strip`: the `--strip-header` names), then states the
/// identity mTLS proved, if any, in the one `x-forwarded-client-cert`. Every path to the app
/// calls it (HTTP/1.1, HTTP/2 and gRPC, Upgrade), whatever the policy: bypass and authorization
/// audit mode relax policy, never this. It runs after hop-by-hop stripping, so a `Connection`
/// header naming `x-forwarded-client-cert` cannot remove the header set here. No allocation
/// unless a prefixed identity header arrived.
pub(crate) fn identity_headers(strip: &[HeaderName], conn: &ConnInfo, headers: &mut HeaderMap) {
    strip_identity_headers(headers, strip);
    if let Some(v) = &conn.client_cert {
        headers.insert(CLIENT_CERT, v.clone());
    }
}

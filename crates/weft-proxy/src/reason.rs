//! Why the proxy answered a request itself, or why a try failed: one typed value from which the
//! `x-weft-error` header, the metric label, the access-log field and the span attribute are all
//! derived ([`Reason::as_str`]). The names are contract (DESIGN.md §8): never rename one.

use http::{HeaderName, Response};

/// The header that carries the reason of a reply the proxy made itself.
pub(crate) const ERROR_HEADER: &str = "x-weft-error";
/// [`ERROR_HEADER`] parsed once, for lookups on the request path (a `&str` name is parsed
/// again on every lookup).
pub(crate) static ERROR_NAME: HeaderName = HeaderName::from_static(ERROR_HEADER);

/// A stable reason. `Other` stands for a name a newer peer proxy sent that this one does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Reason {
    AmbiguousFraming,
    AppProtocolMismatch,
    AppReset,
    AppUnavailable,
    AuthzDenied,
    BadPath,
    BadRequestTarget,
    ClientBadHost,
    ClientBadRequest,
    ClientHeaderTooLarge,
    ClientReset,
    ClientTimeout,
    DiscoveryTimeout,
    FaultAbort,
    MtlsRequired,
    NoClientIdentity,
    NoDestination,
    NoHealthyEndpoints,
    PerTryTimeout,
    PoolFull,
    RateLimited,
    RefusedStream,
    RequestTimeout,
    RetryBudgetExhausted,
    StreamIdleTimeout,
    UnknownService,
    UpgradeRefused,
    UpstreamConnectFailed,
    UpstreamConnectTimeout,
    UpstreamReset,
    UpstreamTlsFailed,
    Other,
}

impl Reason {
    /// Every reason a weft proxy puts in `x-weft-error` (all but `Other`).
    pub(crate) const ALL: [Reason; 31] = [
        Reason::AmbiguousFraming,
        Reason::AppProtocolMismatch,
        Reason::AppReset,
        Reason::AppUnavailable,
        Reason::AuthzDenied,
        Reason::BadPath,
        Reason::BadRequestTarget,
        Reason::ClientBadHost,
        Reason::ClientBadRequest,
        Reason::ClientHeaderTooLarge,
        Reason::ClientReset,
        Reason::ClientTimeout,
        Reason::DiscoveryTimeout,
        Reason::FaultAbort,
        Reason::MtlsRequired,
        Reason::NoClientIdentity,
        Reason::NoDestination,
        Reason::NoHealthyEndpoints,
        Reason::PerTryTimeout,
        Reason::PoolFull,
        Reason::RateLimited,
        Reason::RefusedStream,
        Reason::RequestTimeout,
        Reason::RetryBudgetExhausted,
        Reason::StreamIdleTimeout,
        Reason::UnknownService,
        Reason::UpgradeRefused,
        Reason::UpstreamConnectFailed,
        Reason::UpstreamConnectTimeout,
        Reason::UpstreamReset,
        Reason::UpstreamTlsFailed,
    ];

    /// The name on the wire and in metrics, logs and spans.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Reason::AmbiguousFraming => "ambiguous-framing",
            Reason::AppProtocolMismatch => "app-protocol-mismatch",
            Reason::AppReset => "app-reset",
            Reason::AppUnavailable => "app-unavailable",
            Reason::AuthzDenied => "authz-denied",
            Reason::BadPath => "bad-path",
            Reason::BadRequestTarget => "bad-request-target",
            Reason::ClientBadHost => "client-bad-host",
            Reason::ClientBadRequest => "client-bad-request",
            Reason::ClientHeaderTooLarge => "client-header-too-large",
            Reason::ClientReset => "client-reset",
            Reason::ClientTimeout => "client-timeout",
            Reason::DiscoveryTimeout => "discovery-timeout",
            Reason::FaultAbort => "fault-abort",
            Reason::MtlsRequired => "mtls-required",
            Reason::NoClientIdentity => "no-client-identity",
            Reason::NoDestination => "no-destination",
            Reason::NoHealthyEndpoints => "no-healthy-endpoints",
            Reason::PerTryTimeout => "per-try-timeout",
            Reason::PoolFull => "pool-full",
            Reason::RateLimited => "rate-limited",
            Reason::RefusedStream => "refused-stream",
            Reason::RequestTimeout => "request-timeout",
            Reason::RetryBudgetExhausted => "retry-budget-exhausted",
            Reason::StreamIdleTimeout => "stream-idle-timeout",
            Reason::UnknownService => "unknown-service",
            Reason::UpgradeRefused => "upgrade-refused",
            Reason::UpstreamConnectFailed => "upstream-connect-failed",
            Reason::UpstreamConnectTimeout => "upstream-connect-timeout",
            Reason::UpstreamReset => "upstream-reset",
            Reason::UpstreamTlsFailed => "upstream-tls-failed",
            Reason::Other => "other",
        }
    }

    /// The reason a name on the wire stands for.
    fn from_bytes(name: &[u8]) -> Reason {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str().as_bytes() == name)
            .unwrap_or(Reason::Other)
    }

    /// Why a response was made by the mesh, if it was: the reason this proxy attached to its own
    /// reply ([`crate::forward::reply`]), else the `x-weft-error` a peer proxy (or the serving
    /// layer) sent, read once. `None` for an answer from an app.
    pub(crate) fn of<B>(resp: &Response<B>) -> Option<Reason> {
        if let Some(own) = resp.extensions().get::<Reason>() {
            return Some(*own);
        }
        let header = resp.headers().get(&ERROR_NAME)?;
        Some(Reason::from_bytes(header.as_bytes()))
    }

    /// The metric label of a response: its reason, empty when the mesh did not make it.
    pub(crate) fn label_of<B>(resp: &Response<B>) -> &'static str {
        Reason::of(resp).map(Reason::as_str).unwrap_or("")
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_reads_back_as_its_reason() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_bytes(r.as_str().as_bytes()), r);
        }
        assert_eq!(Reason::from_bytes(b"from-a-newer-proxy"), Reason::Other);
        let names: std::collections::BTreeSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len(), "names are distinct");
    }

    #[test]
    fn an_own_reply_carries_its_reason_and_an_app_answer_none() {
        let own = crate::forward::reply(http::StatusCode::SERVICE_UNAVAILABLE, Reason::PoolFull, "full");
        assert_eq!(Reason::of(&own), Some(Reason::PoolFull));
        assert_eq!(own.headers()[ERROR_HEADER], "pool-full");
        let peer = Response::builder().header(ERROR_HEADER, "app-reset").body(()).unwrap();
        assert_eq!(Reason::of(&peer), Some(Reason::AppReset));
        assert_eq!(Reason::label_of(&Response::new(())), "");
    }
}

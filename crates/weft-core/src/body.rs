//! The one response body type of every weft HTTP server: either a forwarded upstream body or
//! bytes the server wrote itself.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Any error a body may end with: the upstream's, or the proxy's own (an idle timeout).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body holding `bytes` whole.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// Any body (an upstream's, say) as a [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

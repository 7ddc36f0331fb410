//! Failures the downstream client causes. A request body that breaks (bad chunked framing, a
//! reset or closed connection, a body that stops arriving) fails the forwarded stream too, and
//! the upstream hop then looks reset. [`ClientBody`] watches the client's body as it is read, so
//! the forwarding code can tell the two apart: a failure the client caused is answered with its
//! own `client-*` reason and a 4xx, and never counts against the endpoint or the app (no
//! outlier detection, no error rate).

use crate::reason::Reason;
use bytes::Bytes;
use http::StatusCode;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use weft_core::Body;

/// What went wrong on the client's side of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientFault {
    /// The body's framing was invalid (a bad chunk size, an HTTP/2 length mismatch).
    BadRequest,
    /// The client reset the stream or closed the connection before its body ended.
    Reset,
    /// The body stopped arriving for the idle timeout.
    Timeout,
}

/// How a request's body has gone so far, shared between the body and whoever forwards it.
#[derive(Default)]
pub(crate) struct BodyState(AtomicU8);

/// Not ended; the last read got bytes (or none was made yet).
const STREAMING: u8 = 0;
const ENDED: u8 = 1;
const BAD: u8 = 2;
const RESET: u8 = 3;
const TIMEOUT: u8 = 4;
/// Not ended, and the last read found nothing: the proxy is waiting on the client.
const WAITING: u8 = 5;

/// The client's request body, recording into a [`BodyState`] how it ends.
pub(crate) struct ClientBody {
    inner: Body,
    state: Arc<BodyState>,
}

// === impl ClientFault ===

impl ClientFault {
    /// The stable reason (`x-weft-error`, metric label, access log).
    pub(crate) fn reason(self) -> Reason {
        match self {
            ClientFault::BadRequest => Reason::ClientBadRequest,
            ClientFault::Reset => Reason::ClientReset,
            ClientFault::Timeout => Reason::ClientTimeout,
        }
    }

    /// The status the answer carries. A client that reset gets no answer at all; 499 (as
    /// nginx logs it, "client closed request") is what its request is recorded with.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            ClientFault::BadRequest => StatusCode::BAD_REQUEST,
            ClientFault::Reset => StatusCode::from_u16(499).expect("valid status"),
            ClientFault::Timeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The answer to a request the client broke (hyper closes an HTTP/1.1 connection whose
    /// body failed after it).
    pub(crate) fn reply(self, detail: impl std::fmt::Display) -> Response<Body> {
        crate::forward::reply(self.status(), self.reason(), detail)
    }

    /// What the client did, for the answer's text. The error the forwarded stream failed
    /// with names only the hop this proxy cut ("http2 error: stream error sent by user"), never
    /// what was wrong with the client's request.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            ClientFault::BadRequest => {
                "the request body's framing is invalid (a bad chunk size or chunk end, or a body that does not match its length)"
            }
            ClientFault::Reset => "the client reset or closed its connection before its request body ended",
            ClientFault::Timeout => "the request body stopped arriving",
        }
    }

    /// Whether a reason names a failure the client caused.
    pub(crate) fn is_reason(reason: &str) -> bool {
        reason.starts_with("client-")
    }

    /// What a body error from the client's connection says about the client.
    fn of_error(error: &(dyn std::error::Error + 'static)) -> ClientFault {
        let mut cause = Some(error);
        while let Some(e) = cause {
            if e.is::<crate::idle::Idle>() {
                return ClientFault::Timeout;
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return match io.kind() {
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => ClientFault::BadRequest,
                    _ => ClientFault::Reset,
                };
            }
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                // The client's own RST_STREAM, or a lost connection, is a reset; a stream this
                // side refused (length mismatch, flow control) was sent broken.
                return if h2.is_remote() || h2.is_io() || h2.is_go_away() {
                    ClientFault::Reset
                } else {
                    ClientFault::BadRequest
                };
            }
            cause = e.source();
        }
        ClientFault::Reset
    }
}

// === impl BodyState ===

impl BodyState {
    /// The client's fault, if its body failed.
    pub(crate) fn fault(&self) -> Option<ClientFault> {
        match self.0.load(Relaxed) {
            BAD => Some(ClientFault::BadRequest),
            RESET => Some(ClientFault::Reset),
            TIMEOUT => Some(ClientFault::Timeout),
            _ => None,
        }
    }

    /// Records that the client's body stopped arriving, if the proxy was waiting on it (the
    /// last read found nothing; a body nobody has read yet, say behind an injected delay, is
    /// not waited on); returns whether it was.
    pub(crate) fn timed_out(&self) -> bool {
        self.0.compare_exchange(WAITING, TIMEOUT, Relaxed, Relaxed).is_ok()
    }

    fn end(&self) {
        self.settle(ENDED);
    }

    fn set(&self, fault: ClientFault) {
        self.settle(match fault {
            ClientFault::BadRequest => BAD,
            ClientFault::Reset => RESET,
            ClientFault::Timeout => TIMEOUT,
        });
    }

    /// Moves an unsettled body (streaming or waited on) to `to`; a settled one keeps its end.
    fn settle(&self, to: u8) {
        let _ = self
            .0
            .fetch_update(Relaxed, Relaxed, |v| (v == STREAMING || v == WAITING).then_some(to));
    }

    /// Notes whether the last read found bytes or nothing.
    fn read(&self, found: bool) {
        let (from, to) = if found { (WAITING, STREAMING) } else { (STREAMING, WAITING) };
        let _ = self.0.compare_exchange(from, to, Relaxed, Relaxed);
    }
}

// === impl ClientBody ===

impl ClientBody {
    /// Wraps the client's body; `state` learns how it ends.
    pub(crate) fn wrap(inner: Body, state: Arc<BodyState>) -> Body {
        if inner.is_end_stream() {
            state.end();
            return inner;
        }
        http_body_util::BodyExt::boxed_unsync(ClientBody { inner, state })
    }
}

impl HttpBody for ClientBody {
    type Data = Bytes;
    type Error = weft_core::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.state.end(),
            Poll::Ready(Some(Err(e))) => self.state.set(ClientFault::of_error(e.as_ref())),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.state.end(),
            Poll::Ready(Some(Ok(_))) => self.state.read(true),
            Poll::Pending => self.state.read(false),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A caller's request as the listeners forward it: its body watched (how it ended is in the
/// returned request's extensions as an `Arc<BodyState>`) and, when the access log records
/// sizes, counted into `request_bytes`.
pub(crate) fn watched(req: Request<Incoming>, request_bytes: Option<&Arc<AtomicU64>>) -> Request<Body> {
    let client = Arc::new(BodyState::default());
    let mut req = req.map(|b| {
        let b = ClientBody::wrap(weft_core::boxed(b), client.clone());
        match request_bytes {
            Some(count) => crate::access::Tally::wrap(b, count.clone()),
            None => b,
        }
    });
    req.extensions_mut().insert(client);
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_errors_name_the_clients_fault() {
        let io = |kind| std::io::Error::new(kind, "x");
        let bad = ClientFault::of_error(&io(std::io::ErrorKind::InvalidInput));
        assert_eq!(bad, ClientFault::BadRequest);
        assert_eq!(ClientFault::of_error(&io(std::io::ErrorKind::UnexpectedEof)), ClientFault::Reset);
        let idle = crate::idle::Idle(std::time::Duration::from_secs(1));
        assert_eq!(ClientFault::of_error(&idle), ClientFault::Timeout);
        let reset = h2::Error::from(h2::Reason::CANCEL);
        assert_eq!(ClientFault::of_error(&reset), ClientFault::BadRequest, "a reason made here");
        assert_eq!((bad.status().as_u16(), bad.reason().as_str()), (400, "client-bad-request"));
    }
}

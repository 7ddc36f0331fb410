//! Stream idle timeout: a body that yields no frame for the route's idle timeout is ended with
//! an error. On a response that resets the stream to the app (the response has started, so no
//! status can be sent any more); on a request it fails the upstream stream. The wait for
//! response headers is bounded by the same timeout, counted from the request's last frame.

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use weft_core::Body;

pub(crate) struct IdleTimeout {
    inner: Body,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    /// Stamped (ms, `clock::mono_ms`) on every frame, for whoever waits on the same stream.
    activity: Option<Arc<AtomicU64>>,
}

impl IdleTimeout {
    pub(crate) fn wrap(inner: Body, timeout: Duration) -> Body {
        Self::tracking(inner, timeout, None)
    }

    /// As [`IdleTimeout::wrap`], stamping `activity` on every frame.
    pub(crate) fn tracking(inner: Body, timeout: Duration, activity: Option<Arc<AtomicU64>>) -> Body {
        if inner.is_end_stream() {
            return inner;
        }
        let sleep = Box::pin(tokio::time::sleep(timeout));
        http_body_util::BodyExt::boxed_unsync(IdleTimeout {
            inner,
            timeout,
            sleep,
            activity,
        })
    }
}

/// The error a body ends with when it idled out.
#[derive(Debug, thiserror::Error)]
#[error("stream idle for {0:?} (idle timeout)")]
pub(crate) struct Idle(pub Duration);

impl HttpBody for IdleTimeout {
    type Data = Bytes;
    type Error = weft_core::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = Instant::now() + this.timeout;
                this.sleep.as_mut().reset(deadline);
                if let Some(a) = &this.activity {
                    a.store(crate::clock::mono_ms(), Relaxed);
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                if this.sleep.as_mut().poll(cx).is_ready() {
                    tracing::info!(timeout = ?this.timeout, "response stream idle; resetting it");
                    // An error, not an early end: the app must see a reset stream (HTTP/2) or
                    // a closed connection (HTTP/1.1), never a response that looks complete.
                    return Poll::Ready(Some(Err(Box::new(Idle(this.timeout)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

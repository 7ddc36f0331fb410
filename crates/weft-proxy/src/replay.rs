//! Request bodies that can be sent again: a retry or a mirror needs the bytes the first try
//! already streamed. The body is recorded as it is sent, up to [`MAX_REPLAY`]; a larger body
//! streams on unrecorded, and that request is not retried after it was sent, nor mirrored.

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use parking_lot::Mutex;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use weft_core::Body;

/// Largest request body kept for a retry or a mirror.
pub(crate) const MAX_REPLAY: usize = 64 * 1024;

/// What was recorded of a body.
#[derive(Default)]
struct Recorded {
    frames: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    size: usize,
    overflow: bool,
    complete: bool,
}

/// Records the body it streams.
pub(crate) struct Recording {
    inner: Body,
    record: Arc<Mutex<Recorded>>,
}

/// A handle on the recording, to replay it once the first send is over.
#[derive(Clone)]
pub(crate) struct Replay {
    record: Arc<Mutex<Recorded>>,
}

/// Wraps `body` to record it. An empty body is recorded as complete at once.
pub(crate) fn record(body: Body) -> (Body, Replay) {
    let record = Arc::new(Mutex::new(Recorded::default()));
    if body.is_end_stream() {
        record.lock().complete = true;
    } else if body.size_hint().lower() as usize > MAX_REPLAY {
        record.lock().overflow = true;
    }
    let replay = Replay { record: record.clone() };
    (http_body_util::BodyExt::boxed_unsync(Recording { inner: body, record }), replay)
}

impl HttpBody for Recording {
    type Data = Bytes;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let mut r = self.record.lock();
                if let Some(data) = frame.data_ref() {
                    r.size += data.len();
                    if r.size > MAX_REPLAY {
                        r.overflow = true;
                        r.frames = Vec::new();
                    } else if !r.overflow {
                        r.frames.push(data.clone());
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    r.trailers = Some(t.clone());
                }
            }
            Poll::Ready(None) => self.record.lock().complete = true,
            _ => {}
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

impl Replay {
    /// Whether the body was sent in full and fit, so [`Replay::body`] has it.
    pub(crate) fn available(&self) -> bool {
        let r = self.record.lock();
        r.complete && !r.overflow
    }

    /// The whole body again, if it was sent in full and fit.
    pub(crate) fn body(&self) -> Option<Body> {
        let r = self.record.lock();
        if !r.complete || r.overflow {
            return None;
        }
        let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            r.frames.iter().cloned().map(|b| Ok(Frame::data(b))).collect();
        if let Some(t) = &r.trailers {
            frames.push(Ok(Frame::trailers(t.clone())));
        }
        let stream = http_body_util::StreamBody::new(tokio_stream::iter(frames));
        Some(http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(
            stream,
            |never| match never {},
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn replays_what_was_sent_and_refuses_what_did_not_fit() {
        let (body, replay) = record(weft_core::full("hello"));
        assert!(replay.body().is_none(), "nothing sent yet");
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        let again = replay.body().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(again, "hello");
        let big = vec![b'x'; MAX_REPLAY + 1];
        let (body, replay) = record(weft_core::full(big));
        body.collect().await.unwrap();
        assert!(replay.body().is_none());
        let (_, replay) = record(weft_core::empty());
        assert_eq!(replay.body().unwrap().collect().await.unwrap().to_bytes().len(), 0);
    }
}

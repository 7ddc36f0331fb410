//! Access logs: one JSON line per request on standard output, when enabled, sampled by
//! percentage. Lines are handed to a writer task through a bounded queue, so a slow terminal
//! never slows a request; a full queue drops the line and counts it.

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use serde::Serialize;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use weft_core::Body;

/// How many lines may wait for the writer.
const QUEUE: usize = 4096;

pub(crate) struct AccessLog {
    tx: Option<mpsc::Sender<String>>,
    sample_percent: f64,
    dropped: prometheus_client::metrics::counter::Counter,
}

/// One request, as logged.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Entry {
    /// Unix time in milliseconds when the request finished (its response body ended).
    pub(crate) time_ms: u64,
    pub(crate) direction: &'static str,
    /// W3C trace id (or b3), empty when the request carried none.
    pub(crate) trace_id: String,
    pub(crate) source: String,
    pub(crate) destination: String,
    pub(crate) service: String,
    pub(crate) route: String,
    pub(crate) method: String,
    /// The path as routed, authorized and forwarded (its canonical form, see
    /// [`crate::authz::normalize`]); the caller's spelling when it has none.
    pub(crate) path: String,
    /// The caller's spelling of the path, only when it differs from `path` (`/api/../admin`
    /// logged as `/admin`, with this beside it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) raw_path: Option<String>,
    /// The endpoint (outbound) or app (inbound) that answered.
    pub(crate) upstream: String,
    pub(crate) status: u16,
    /// `x-weft-error` when the proxy answered itself.
    pub(crate) reason: &'static str,
    /// Time to the response headers.
    pub(crate) duration_ms: f64,
    /// Time to the end of the response body.
    pub(crate) total_ms: f64,
    /// Body bytes received from the client and sent back to it.
    pub(crate) request_bytes: u64,
    pub(crate) response_bytes: u64,
    pub(crate) retries: u32,
}

/// Counts the bytes of a body as they pass.
pub(crate) struct Tally {
    inner: Body,
    count: Arc<AtomicU64>,
}

impl Tally {
    pub(crate) fn wrap(inner: Body, count: Arc<AtomicU64>) -> Body {
        http_body_util::BodyExt::boxed_unsync(Tally { inner, count })
    }
}

impl HttpBody for Tally {
    type Data = Bytes;
    type Error = weft_core::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
        {
            self.count.fetch_add(d.len() as u64, Relaxed);
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

/// A response body that writes its request's access line once it ends (or is dropped, when
/// the client went away), with the bytes both ways and the total time.
pub(crate) struct Logged {
    inner: Body,
    bytes: u64,
    pending: Option<(Entry, Arc<AtomicU64>, std::time::Instant, Arc<AccessLog>)>,
}

impl Logged {
    pub(crate) fn wrap(inner: Body, entry: Entry, request_bytes: Arc<AtomicU64>, start: std::time::Instant, log: Arc<AccessLog>) -> Body {
        let mut logged = Logged {
            inner,
            bytes: 0,
            pending: Some((entry, request_bytes, start, log)),
        };
        if logged.inner.is_end_stream() {
            logged.finish();
        }
        http_body_util::BodyExt::boxed_unsync(logged)
    }

    fn finish(&mut self) {
        if let Some((mut entry, request_bytes, start, log)) = self.pending.take() {
            entry.response_bytes = self.bytes;
            entry.request_bytes = request_bytes.load(Relaxed);
            entry.total_ms = start.elapsed().as_secs_f64() * 1000.0;
            entry.time_ms = crate::clock::unix_ms();
            log.log(entry);
        }
    }
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = weft_core::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(_) => self.finish(),
            Poll::Pending => {}
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

impl Drop for Logged {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The path a log line or tap event names: the canonical form that routing, authorization and
/// the app all see, with the caller's spelling beside it when that differs, so `/api/../admin`
/// is never recorded as a call under `/api`. A path with no canonical form (refused as
/// `bad-path`) is recorded as sent.
pub(crate) fn logged_path(raw: &str) -> (String, Option<String>) {
    match crate::authz::normalize(raw) {
        Ok(canonical) if canonical == raw => (canonical, None),
        Ok(canonical) => (canonical, Some(raw.to_string())),
        Err(_) => (raw.to_string(), None),
    }
}

/// What an access line needs from a request before the request is consumed.
pub(crate) struct Captured {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) raw_path: Option<String>,
    pub(crate) trace: String,
}

impl AccessLog {
    /// Captures the request's line fields, only when access logs are on (nothing extra per
    /// request otherwise).
    pub(crate) fn capture<B>(&self, req: &http::Request<B>) -> Option<Captured> {
        self.enabled().then(|| {
            let (path, raw_path) = logged_path(req.uri().path());
            Captured {
                method: req.method().to_string(),
                path,
                raw_path,
                trace: trace_id(req.headers()),
            }
        })
    }

    /// Starts the writer when `enabled` (call inside the runtime).
    pub(crate) fn new(enabled: bool, sample_percent: f64, registry: &mut prometheus_client::registry::Registry) -> Self {
        let dropped = prometheus_client::metrics::counter::Counter::default();
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            dropped.clone(),
        );
        let tx = enabled.then(|| {
            let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
            tokio::spawn(async move {
                let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
                while let Some(line) = rx.recv().await {
                    let _ = out.write_all(line.as_bytes()).await;
                    if rx.is_empty() {
                        let _ = out.flush().await;
                    }
                }
            });
            tx
        });
        Self {
            tx,
            sample_percent: sample_percent.clamp(0.0, 100.0),
            dropped,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Logs `entry` if enabled and sampled in.
    pub(crate) fn log(&self, entry: Entry) {
        let Some(tx) = &self.tx else { return };
        if self.sample_percent < 100.0 && rand::random_range(0.0..100.0) >= self.sample_percent {
            return;
        }
        let mut line = serde_json::to_string(&entry).expect("entry serializes");
        line.push('\n');
        if tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

/// The trace id a request carries: W3C `traceparent` (`00-<trace>-<span>-<flags>`), else b3.
pub(crate) fn trace_id(headers: &http::HeaderMap) -> String {
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok())
        && let Some(id) = tp.split('-').nth(1)
    {
        return id.to_string();
    }
    if let Some(id) = headers.get("x-b3-traceid").and_then(|v| v.to_str().ok()) {
        return id.to_string();
    }
    headers
        .get("b3")
        .and_then(|v| v.to_str().ok())
        .and_then(|b| b.split('-').next())
        .unwrap_or("")
        .to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn trace_ids_from_w3c_and_b3() {
        let mut h = http::HeaderMap::new();
        assert_eq!(super::trace_id(&h), "");
        h.insert("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1".parse().unwrap());
        assert_eq!(super::trace_id(&h), "80f198ee56343ba864fe8b2a57d3eff7");
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap(),
        );
        assert_eq!(super::trace_id(&h), "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}

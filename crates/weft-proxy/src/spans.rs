//! Distributed tracing: each sidecar records a client span (outbound) or a server span
//! (inbound) for every sampled request and exports them over OTLP/gRPC when an endpoint is
//! configured.
//!
//! Context comes in as W3C `traceparent`/`tracestate`, or b3 (single `b3` header or the
//! `x-b3-*` set) when that is what arrives. The request goes on with the context rewritten so
//! the next hop is a child of this sidecar's span: `traceparent` always, and b3 too when b3
//! came in. Without an endpoint nothing is recorded and headers pass untouched.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use weft_api::otlp;

/// Spans waiting for the exporter; beyond this they are dropped (and counted).
const QUEUE: usize = 8192;
/// Most spans per export request. Spans are sent as soon as the previous export is done, so
/// batches grow with load and a quiet proxy sends each span at once.
const BATCH: usize = 512;

pub(crate) struct Tracer {
    tx: Option<mpsc::Sender<otlp::Span>>,
    sample_percent: f64,
    dropped: prometheus_client::metrics::counter::Counter,
}

/// A span in progress.
pub(crate) struct Active {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    trace_state: String,
    start_ns: u64,
    kind: otlp::span::SpanKind,
    sampled: bool,
}

/// The context a request arrived with.
#[derive(Debug, PartialEq)]
struct Incoming {
    trace_id: [u8; 16],
    parent: Option<[u8; 8]>,
    sampled: bool,
    b3: bool,
}

impl Tracer {
    /// `endpoint` is an OTLP/gRPC URL such as `http://127.0.0.1:4317`. Call inside the runtime.
    pub(crate) fn new(
        endpoint: Option<String>,
        sample_percent: f64,
        resource: Vec<(&'static str, String)>,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let dropped = prometheus_client::metrics::counter::Counter::default();
        let exported = prometheus_client::metrics::counter::Counter::default();
        registry.register("spans_dropped", "Spans dropped (queue full or export failed)", dropped.clone());
        registry.register("spans_exported", "Spans exported over OTLP", exported.clone());
        let tx = endpoint.map(|url| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(export(url, resource, rx, dropped.clone(), exported.clone()));
            tx
        });
        Tracer {
            tx,
            sample_percent: sample_percent.clamp(0.0, 100.0),
            dropped,
        }
    }

    /// Starts a span for a request and rewrites its context headers so the next hop is this
    /// span's child. `None` when tracing is off.
    pub(crate) fn start(&self, headers: &mut http::HeaderMap, kind: otlp::span::SpanKind) -> Option<Active> {
        self.tx.as_ref()?;
        let incoming = incoming(headers);
        let (trace_id, parent, sampled, b3) = match incoming {
            Some(i) => (i.trace_id, i.parent, i.sampled, i.b3),
            None => (rand::random(), None, rand::random_range(0.0..100.0) < self.sample_percent, false),
        };
        let span_id: [u8; 8] = rand::random();
        let flags = if sampled { "01" } else { "00" };
        let traceparent = format!("00-{}-{}-{flags}", hex(&trace_id), hex(&span_id));
        if let Ok(v) = http::HeaderValue::from_str(&traceparent) {
            headers.insert("traceparent", v);
        }
        if b3 {
            rewrite_b3(headers, &trace_id, &span_id, sampled);
        }
        let trace_state = headers.get("tracestate").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        Some(Active {
            trace_id,
            span_id,
            parent,
            trace_state,
            start_ns: unix_nanos(),
            kind,
            sampled,
        })
    }

    /// Ends `span` and queues it for export (when sampled).
    pub(crate) fn finish(&self, span: Active, name: String, attributes: Vec<(&'static str, Attr)>, error: bool) {
        let Some(tx) = &self.tx else { return };
        if !span.sampled {
            return;
        }
        let span = otlp::Span {
            trace_id: span.trace_id.to_vec(),
            span_id: span.span_id.to_vec(),
            trace_state: span.trace_state,
            parent_span_id: span.parent.map(|p| p.to_vec()).unwrap_or_default(),
            name,
            kind: span.kind as i32,
            start_time_unix_nano: span.start_ns,
            end_time_unix_nano: unix_nanos(),
            attributes: attributes.into_iter().map(|(k, v)| kv(k, v)).collect(),
            dropped_attributes_count: 0,
            status: Some(otlp::Status {
                message: String::new(),
                code: if error {
                    otlp::status::StatusCode::Error as i32
                } else {
                    otlp::status::StatusCode::Unset as i32
                },
            }),
            // Bits 8-9 (whether the parent is remote) left unset: unknown, which is always
            // true to say; the W3C trace flags are not carried.
            flags: 0,
        };
        if tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

/// A span attribute value.
pub(crate) enum Attr {
    Str(String),
    Int(i64),
}

fn kv(key: &str, v: Attr) -> otlp::KeyValue {
    let value = match v {
        Attr::Str(s) => otlp::any_value::Value::StringValue(s),
        Attr::Int(i) => otlp::any_value::Value::IntValue(i),
    };
    otlp::KeyValue {
        key: key.to_string(),
        value: Some(otlp::AnyValue { value: Some(value) }),
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Reads W3C `traceparent`, else b3 (single or multi header). An all-zero or malformed id is
/// ignored, as the W3C spec requires.
fn incoming(headers: &http::HeaderMap) -> Option<Incoming> {
    let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    if let Some(tp) = header("traceparent") {
        let parts: Vec<&str> = tp.trim().split('-').collect();
        if let [version, trace, parent, flags, ..] = parts[..]
            && version != "ff"
            && let (Some(trace_id), Some(parent), Ok(flags)) = (unhex::<16>(trace), unhex::<8>(parent), u8::from_str_radix(flags, 16))
            && trace_id != [0; 16]
            && parent != [0; 8]
        {
            return Some(Incoming {
                trace_id,
                parent: Some(parent),
                sampled: flags & 1 == 1,
                b3: false,
            });
        }
    }
    let (trace, span, sampled) = if let Some(b3) = header("b3") {
        let mut p = b3.split('-');
        (p.next(), p.next(), p.next())
    } else {
        (header("x-b3-traceid"), header("x-b3-spanid"), header("x-b3-sampled"))
    };
    let trace = trace?;
    // b3 allows 64-bit trace ids; they are left-padded to 128.
    let padded = format!("{trace:0>32}");
    let trace_id = unhex::<16>(&padded).filter(|t| *t != [0; 16])?;
    Some(Incoming {
        trace_id,
        parent: span.and_then(unhex::<8>),
        sampled: !matches!(sampled, Some("0") | Some("false")),
        b3: true,
    })
}

fn rewrite_b3(headers: &mut http::HeaderMap, trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) {
    let flag = if sampled { "1" } else { "0" };
    if headers.contains_key("b3") {
        if let Ok(v) = http::HeaderValue::from_str(&format!("{}-{}-{flag}", hex(trace_id), hex(span_id))) {
            headers.insert("b3", v);
        }
    } else {
        for (k, v) in [
            ("x-b3-traceid", hex(trace_id)),
            ("x-b3-spanid", hex(span_id)),
            ("x-b3-sampled", flag.to_string()),
        ] {
            if let Ok(v) = http::HeaderValue::from_str(&v) {
                headers.insert(k, v);
            }
        }
        headers.remove("x-b3-parentspanid");
    }
}

/// Sends batches of spans until the channel closes. A failed export drops its batch (counted)
/// rather than holding memory for a collector that is down.
async fn export(
    url: String,
    resource: Vec<(&'static str, String)>,
    mut rx: mpsc::Receiver<otlp::Span>,
    dropped: prometheus_client::metrics::counter::Counter,
    exported: prometheus_client::metrics::counter::Counter,
) {
    let channel = match tonic::transport::Endpoint::from_shared(url.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect_lazy(),
        Err(error) => {
            tracing::error!(%url, %error, "OTLP endpoint is not a valid URL; spans will be dropped");
            while rx.recv().await.is_some() {
                dropped.inc();
            }
            return;
        }
    };
    let mut client = otlp::trace_service_client::TraceServiceClient::new(channel);
    let resource = otlp::Resource {
        attributes: resource.into_iter().map(|(k, v)| kv(k, Attr::Str(v))).collect(),
        dropped_attributes_count: 0,
    };
    let mut batch: Vec<otlp::Span> = Vec::with_capacity(BATCH);
    let mut warned = false;
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH
            && let Ok(span) = rx.try_recv()
        {
            batch.push(span);
        }
        {
            let n = batch.len() as u64;
            let req = otlp::ExportTraceServiceRequest {
                resource_spans: vec![otlp::ResourceSpans {
                    resource: Some(resource.clone()),
                    scope_spans: vec![otlp::ScopeSpans {
                        scope: Some(otlp::InstrumentationScope {
                            name: "weft-proxy".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            attributes: vec![],
                            dropped_attributes_count: 0,
                        }),
                        spans: std::mem::take(&mut batch),
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }],
            };
            match client.export(req).await {
                Ok(_) => {
                    exported.inc_by(n);
                    warned = false;
                }
                Err(status) => {
                    dropped.inc_by(n);
                    if !warned {
                        tracing::warn!(%url, error = %status.message(), "OTLP export failed; dropping spans until it works");
                        warned = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_w3c_then_b3_single_and_multi() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap(),
        );
        let i = incoming(&h).unwrap();
        assert_eq!(
            (hex(&i.trace_id).as_str(), i.parent.map(|p| hex(&p)), i.sampled, i.b3),
            ("4bf92f3577b34da6a3ce929d0e0e4736", Some("00f067aa0ba902b7".into()), true, false)
        );
        h.insert(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".parse().unwrap(),
        );
        assert!(incoming(&h).is_none(), "an all-zero trace id is invalid");
        let mut h = http::HeaderMap::new();
        h.insert("b3", "a3ce929d0e0e4736-00f067aa0ba902b7-0".parse().unwrap());
        let i = incoming(&h).unwrap();
        assert_eq!(
            (hex(&i.trace_id).as_str(), i.sampled, i.b3),
            ("0000000000000000a3ce929d0e0e4736", false, true)
        );
        let mut h = http::HeaderMap::new();
        h.insert("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736".parse().unwrap());
        h.insert("x-b3-spanid", "00f067aa0ba902b7".parse().unwrap());
        h.insert("x-b3-sampled", "1".parse().unwrap());
        let i = incoming(&h).unwrap();
        assert!(i.sampled && i.b3 && i.parent.is_some());
    }

    #[tokio::test]
    async fn a_span_becomes_the_parent_of_the_next_hop() {
        let mut registry = prometheus_client::registry::Registry::default();
        let t = Tracer::new(Some("http://127.0.0.1:1".into()), 100.0, vec![], &mut registry);
        let mut h = http::HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap(),
        );
        h.insert("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736".parse().unwrap());
        let span = t.start(&mut h, otlp::span::SpanKind::Client).unwrap();
        let tp = h["traceparent"].to_str().unwrap().to_string();
        assert_eq!(tp, format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", hex(&span.span_id)));
        assert_eq!(span.parent.map(|p| hex(&p)).as_deref(), Some("00f067aa0ba902b7"));
        // W3C came in, so b3 headers are left as they were.
        assert!(!h.contains_key("x-b3-spanid"));
        let mut h = http::HeaderMap::new();
        let fresh = t.start(&mut h, otlp::span::SpanKind::Server).unwrap();
        assert!(fresh.parent.is_none() && fresh.sampled && h.contains_key("traceparent"));
    }
}

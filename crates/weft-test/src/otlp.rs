//! An OTLP/gRPC trace receiver for tests: the collector's `TraceService/Export`, keeping every
//! span with the `service.name` of its resource.

use std::net::SocketAddr;
use std::sync::Arc;
use weft_api::otlp::{self, trace_service_server};
use weft_core::Shutdown;

/// A received span, with the service that reported it.
#[derive(Clone, Debug)]
pub struct Received {
    pub service: String,
    pub span: otlp::Span,
}

impl Received {
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    pub fn kind(&self) -> &'static str {
        match self.span.kind {
            2 => "server",
            3 => "client",
            _ => "other",
        }
    }
    pub fn attr(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| match &kv.value.as_ref()?.value {
                Some(otlp::any_value::Value::StringValue(s)) => Some(s.clone()),
                Some(otlp::any_value::Value::IntValue(i)) => Some(i.to_string()),
                _ => None,
            })
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: Arc<parking_lot::Mutex<Vec<Received>>>,
    shutdown: Shutdown,
}

struct Service {
    spans: Arc<parking_lot::Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl trace_service_server::TraceService for Service {
    async fn export(
        &self,
        req: tonic::Request<otlp::ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<otlp::ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| match &kv.value.as_ref()?.value {
                    Some(otlp::any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(otlp::ExportTraceServiceResponse { partial_success: None }))
    }
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let shutdown = Shutdown::new();
        let svc = trace_service_server::TraceServiceServer::new(Service { spans: spans.clone() });
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), stop.cancelled_owned())
                .await
                .unwrap();
        });
        Self { addr, spans, shutdown }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().clone()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

//! Apps the tests put behind sidecars: an HTTP echo server (HTTP/1.1 and HTTP/2) and a gRPC
//! echo server (unary and bidirectional streaming). Both run in the test process on
//! `127.0.0.1:0` and count what they serve.

use crate::echo_proto::{self, EchoMsg, echo_server};
use http_body_util::BodyExt;
use hyper::{Request, Response, body::Incoming};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_stream::{Stream, StreamExt};
use weft_core::{Body, Shutdown, full};

/// HTTP echo. GET answers a JSON description of the request; any other method echoes the body
/// back. `x-echo-delay-ms` delays the answer, `x-echo-status` sets its status.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub name: String,
    pub served: Arc<AtomicU64>,
    /// Every path (with query) the app was asked for.
    pub paths: Arc<parking_lot::Mutex<Vec<String>>>,
    shutdown: Shutdown,
}

impl EchoServer {
    pub async fn start(name: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let shutdown = Shutdown::new();
        let paths = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (n, s, p) = (name.to_string(), served.clone(), paths.clone());
        tokio::spawn(weft_core::serve::serve(
            listener,
            Default::default(),
            shutdown.clone(),
            move |req| {
                p.lock()
                    .push(req.uri().path_and_query().map(|x| x.as_str().to_string()).unwrap_or_default());
                echo(n.clone(), s.clone(), req)
            },
        ));
        Self {
            addr,
            name: name.to_string(),
            served,
            paths,
            shutdown,
        }
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn echo(name: String, served: Arc<AtomicU64>, req: Request<Incoming>) -> Response<Body> {
    served.fetch_add(1, Ordering::Relaxed);
    let header = |k: &str| req.headers().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    if let Some(ms) = header("x-echo-delay-ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = header("x-echo-status").and_then(|v| v.parse().ok()).unwrap_or(200u16);
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let method = req.method().clone();
    let describe = json!({
        "server": name,
        "method": method.as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    });
    let body = if method == hyper::Method::GET {
        full(describe.to_string())
    } else {
        match req.into_body().collect().await {
            Ok(b) => full(b.to_bytes()),
            Err(e) => full(format!("body error: {e}")),
        }
    };
    Response::builder().status(status).header("x-echo-server", name).body(body).unwrap()
}

/// gRPC echo on tonic.
pub struct GrpcEcho {
    pub addr: SocketAddr,
    shutdown: Shutdown,
}

struct EchoService {
    name: String,
}

impl GrpcEcho {
    pub async fn start(name: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let token = shutdown.clone();
        let svc = echo_server::EchoServer::new(EchoService { name: name.to_string() });
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), token.cancelled_owned())
                .await
                .unwrap();
        });
        Self { addr, shutdown }
    }
}

impl Drop for GrpcEcho {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tonic::async_trait]
impl echo_server::Echo for EchoService {
    async fn unary(&self, req: tonic::Request<EchoMsg>) -> Result<tonic::Response<EchoMsg>, tonic::Status> {
        let mut m = req.into_inner();
        m.server = self.name.clone();
        Ok(tonic::Response::new(m))
    }

    type StreamStream = Pin<Box<dyn Stream<Item = Result<EchoMsg, tonic::Status>> + Send>>;

    async fn stream(&self, req: tonic::Request<tonic::Streaming<EchoMsg>>) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let name = self.name.clone();
        let out = req.into_inner().map(move |m| {
            m.map(|mut m| {
                m.server = name.clone();
                m
            })
        });
        Ok(tonic::Response::new(Box::pin(out)))
    }
}

/// A gRPC client that reaches `service` through a sidecar's outbound listener.
pub async fn grpc_client(outbound: SocketAddr, service: &str) -> echo_proto::echo_client::EchoClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .unwrap()
        .origin(format!("http://{service}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    echo_proto::echo_client::EchoClient::new(channel)
}

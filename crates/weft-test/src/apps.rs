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
/// back. `x-echo-delay-ms` delays the answer, `x-echo-status` sets its status; [`Mode`] makes
/// the whole server fail, slow down or hang, whatever the request says.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub name: String,
    pub served: Arc<AtomicU64>,
    /// Every path (with query) the app was asked for.
    pub paths: Arc<parking_lot::Mutex<Vec<String>>>,
    /// The headers of every request, in order.
    pub headers: Arc<parking_lot::Mutex<Vec<http::HeaderMap>>>,
    mode: Arc<parking_lot::Mutex<Mode>>,
    shutdown: Shutdown,
}

/// How an [`EchoServer`] answers every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Answers this status (after reading the request).
    Status(u16),
    /// Answers normally after this long.
    Delay(Duration),
    /// Never answers.
    Hang,
    /// Answers 200 with the first bytes of a body, then never sends the rest.
    StallBody,
}

impl EchoServer {
    pub async fn start(name: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let shutdown = Shutdown::new();
        let paths = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let headers = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mode = Arc::new(parking_lot::Mutex::new(Mode::Normal));
        let (n, s, p, h, m) = (name.to_string(), served.clone(), paths.clone(), headers.clone(), mode.clone());
        tokio::spawn(weft_core::serve::serve(
            listener,
            Default::default(),
            shutdown.clone(),
            move |req| {
                // The mode is read before the request counts as received, so a test that waits
                // for a request to arrive and then changes the mode never changes this one's.
                let mode = *m.lock();
                h.lock().push(req.headers().clone());
                p.lock()
                    .push(req.uri().path_and_query().map(|x| x.as_str().to_string()).unwrap_or_default());
                let (n, s) = (n.clone(), s.clone());
                async move {
                    match mode {
                        Mode::Normal => {}
                        Mode::Status(code) => {
                            s.fetch_add(1, Ordering::Relaxed);
                            let _ = req.into_body().collect().await;
                            return Response::builder()
                                .status(code)
                                .header("x-echo-server", n)
                                .body(full("failing on purpose"))
                                .unwrap();
                        }
                        Mode::Delay(d) => tokio::time::sleep(d).await,
                        Mode::Hang => {
                            s.fetch_add(1, Ordering::Relaxed);
                            std::future::pending::<()>().await;
                        }
                        Mode::StallBody => {
                            s.fetch_add(1, Ordering::Relaxed);
                            let first = tokio_stream::once(Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                                bytes::Bytes::from_static(b"partial"),
                            )));
                            let stalled = first.chain(tokio_stream::pending());
                            let body = http_body_util::StreamBody::new(stalled);
                            return Response::builder()
                                .status(200)
                                .header("x-echo-server", n)
                                .header("content-length", "1000")
                                .body(weft_core::boxed(body))
                                .unwrap();
                        }
                    }
                    echo(n, s, req).await
                }
            },
        ));
        Self {
            addr,
            name: name.to_string(),
            served,
            paths,
            headers,
            mode,
            shutdown,
        }
    }

    /// Changes how every later request is answered.
    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock() = mode;
    }

    /// Requests that reached the app (answered or not yet): what a test waits on before it
    /// acts on requests in flight.
    pub fn received(&self) -> usize {
        self.paths.lock().len()
    }

    /// Waits until at least `n` requests have reached the app, in total.
    pub async fn wait_received(&self, n: usize, within: Duration) {
        crate::eventually(within, &format!("{n} requests reached {}", self.name), || async {
            (self.received() >= n).then_some(())
        })
        .await;
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
    /// The metadata (headers) of every call, in order.
    pub headers: Arc<parking_lot::Mutex<Vec<http::HeaderMap>>>,
    shutdown: Shutdown,
}

struct EchoService {
    name: String,
    headers: Arc<parking_lot::Mutex<Vec<http::HeaderMap>>>,
}

impl GrpcEcho {
    pub async fn start(name: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let token = shutdown.clone();
        let headers = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let svc = echo_server::EchoServer::new(EchoService {
            name: name.to_string(),
            headers: headers.clone(),
        });
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), token.cancelled_owned())
                .await
                .unwrap();
        });
        Self { addr, headers, shutdown }
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
        self.headers.lock().push(req.metadata().clone().into_headers());
        let mut m = req.into_inner();
        // `fail:N` asks for gRPC status N, with a message and a detail header the caller must
        // get back intact.
        if let Some(code) = m
            .payload
            .strip_prefix(b"fail:")
            .and_then(|c| std::str::from_utf8(c).ok()?.parse::<i32>().ok())
        {
            let mut status = tonic::Status::new(tonic::Code::from(code), "failing on purpose");
            status.metadata_mut().insert("x-detail", "kept".parse().unwrap());
            return Err(status);
        }
        m.server = self.name.clone();
        Ok(tonic::Response::new(m))
    }

    type StreamStream = Pin<Box<dyn Stream<Item = Result<EchoMsg, tonic::Status>> + Send>>;

    async fn stream(&self, req: tonic::Request<tonic::Streaming<EchoMsg>>) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        self.headers.lock().push(req.metadata().clone().into_headers());
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

/// A WebSocket echo app: completes the handshake (RFC 6455 accept key), then answers each
/// short text frame from the client with the same text, prefixed `echo:`.
pub struct WsEcho {
    pub addr: SocketAddr,
    pub upgraded: Arc<AtomicU64>,
    shutdown: Shutdown,
}

/// The `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn ws_accept(key: &str) -> String {
    use base64::Engine;
    let mut input = key.as_bytes().to_vec();
    input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

impl WsEcho {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upgraded = Arc::new(AtomicU64::new(0));
        let shutdown = Shutdown::new();
        let count = upgraded.clone();
        tokio::spawn(weft_core::serve::serve(
            listener,
            Default::default(),
            shutdown.clone(),
            move |mut req| {
                let count = count.clone();
                async move {
                    let Some(key) = req.headers().get("sec-websocket-key").and_then(|v| v.to_str().ok()).map(ws_accept) else {
                        return Response::builder().status(400).body(full("not a WebSocket handshake")).unwrap();
                    };
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(up) = on.await else { return };
                        count.fetch_add(1, Ordering::Relaxed);
                        let mut io = hyper_util::rt::TokioIo::new(up);
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        loop {
                            let mut head = [0u8; 2];
                            if io.read_exact(&mut head).await.is_err() {
                                return;
                            }
                            let len = (head[1] & 0x7f) as usize;
                            let mut mask = [0u8; 4];
                            let mut payload = vec![0u8; len];
                            if io.read_exact(&mut mask).await.is_err() || io.read_exact(&mut payload).await.is_err() {
                                return;
                            }
                            for (i, b) in payload.iter_mut().enumerate() {
                                *b ^= mask[i % 4];
                            }
                            let mut out = b"echo:".to_vec();
                            out.extend_from_slice(&payload);
                            let mut frame = vec![0x81, out.len() as u8];
                            frame.extend_from_slice(&out);
                            if io.write_all(&frame).await.is_err() {
                                return;
                            }
                        }
                    });
                    Response::builder()
                        .status(101)
                        .header("upgrade", "websocket")
                        .header("connection", "upgrade")
                        .header("sec-websocket-accept", key)
                        .body(weft_core::empty())
                        .unwrap()
                }
            },
        ));
        Self { addr, upgraded, shutdown }
    }
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A TCP echo app: writes back every byte it reads.
pub struct TcpEcho {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
    shutdown: Shutdown,
}

impl TcpEcho {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let shutdown = Shutdown::new();
        let (count, stop) = (connections.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = stop.cancelled() => return,
                };
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Self {
            addr,
            connections,
            shutdown,
        }
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

//! HTTP clients for tests: HTTP/1.1 (origin-form with `Host`, or absolute-form through a proxy)
//! and HTTP/2 with prior knowledge.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::{Client as Legacy, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Clone)]
pub struct Client {
    inner: Legacy<HttpConnector, Full<Bytes>>,
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub version: http::Version,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    /// HTTP/1.1.
    pub fn new() -> Self {
        Self {
            inner: Legacy::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// HTTP/2 with prior knowledge (h2c).
    pub fn h2() -> Self {
        Self {
            inner: Legacy::builder(TokioExecutor::new()).http2_only(true).build_http(),
        }
    }

    pub async fn get(&self, url: &str) -> anyhow::Result<Reply> {
        self.send(Request::get(url).body(Full::new(Bytes::new()))?).await
    }

    pub async fn post(&self, url: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> anyhow::Result<Reply> {
        let mut b = Request::post(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Full::new(Bytes::from(body)))?).await
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
        let resp = tokio::time::timeout(Duration::from_secs(20), self.inner.request(req)).await??;
        collect(resp).await
    }
}

/// Sends one HTTP/1.1 request in absolute-form (`GET http://service/path`) to `proxy`, as an
/// app with `HTTP_PROXY` set does.
pub async fn via_http_proxy(proxy: SocketAddr, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
    let tcp = tokio::net::TcpStream::connect(proxy).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let resp = send.send_request(req).await?;
    collect(resp).await
}

async fn collect(resp: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<Reply> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        version: parts.version,
        body,
    })
}

/// Sends one HTTP/2 request (prior knowledge) to `addr`; the request URI's authority becomes
/// `:authority`, as a gRPC or h2c client addressing a service through its sidecar sends it.
pub async fn h2_via(addr: SocketAddr, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let resp = send.send_request(req).await?;
    collect(resp).await
}

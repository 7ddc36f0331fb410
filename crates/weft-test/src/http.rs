//! HTTP clients for tests: HTTP/1.1 (origin-form with `Host`, or absolute-form through a proxy),
//! HTTP/2 with prior knowledge, and HTTPS to the control plane trusting its CA file (the same
//! connector the CLI uses).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client as Legacy;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use weft_core::tls::Connector;

#[derive(Clone)]
pub struct Client {
    inner: Legacy<Connector, Full<Bytes>>,
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
    /// HTTP/1.1, plaintext (`http://` URLs only).
    pub fn new() -> Self {
        Self {
            inner: Legacy::builder(TokioExecutor::new()).build(Connector::plaintext()),
        }
    }

    /// HTTP/2 with prior knowledge (h2c).
    pub fn h2() -> Self {
        Self {
            inner: Legacy::builder(TokioExecutor::new()).http2_only(true).build(Connector::plaintext()),
        }
    }

    /// HTTP/1.1 over TLS (`https://` URLs only), trusting the roots in `ca_pem` and checking the
    /// server's name, as the CLI does.
    pub fn trusting(ca_pem: &str) -> Self {
        let verifier = weft_core::tls::roots_verifier(ca_pem, "the control plane's ca.pem").expect("a CA to trust");
        let config = weft_core::tls::client_config(verifier, None, &[weft_core::tls::ALPN_HTTP1]).expect("TLS client configuration");
        Self {
            inner: Legacy::builder(TokioExecutor::new()).build(Connector::tls(Arc::new(config))),
        }
    }

    /// Sends `req` and hands back the response with its body unread (event streams).
    pub async fn open(&self, req: Request<Full<Bytes>>) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        Ok(tokio::time::timeout(Duration::from_secs(20), self.inner.request(req)).await??)
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

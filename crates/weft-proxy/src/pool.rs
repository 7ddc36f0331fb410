//! Connections the proxy owns: one multiplexed HTTP/2 connection per endpoint (proxy to proxy,
//! and to an app that speaks HTTP/2), and a pooled HTTP/1.1 client for apps that speak it.

use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use weft_core::Body;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Pools {
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
    pub h1: Client<HttpConnector, Body>,
}

/// Why a connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("connect to {addr} failed: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: hyper::Error },
}

// === impl Pools ===

impl Pools {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .set_host(false)
            .build(connector);
        Self {
            h2: Mutex::new(HashMap::new()),
            h1,
        }
    }

    /// A ready HTTP/2 sender to `addr`, reusing the open connection when there is one.
    pub async fn h2(&self, addr: SocketAddr) -> Result<http2::SendRequest<Body>, ConnectError> {
        if let Some(send) = self.h2.lock().get(&addr)
            && !send.is_closed()
        {
            return Ok(send.clone());
        }
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Err(_) => return Err(ConnectError::Timeout { addr }),
            Ok(Err(source)) => return Err(ConnectError::Io { addr, source }),
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .handshake::<_, Body>(TokioIo::new(tcp))
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "HTTP/2 connection closed");
            }
        });
        self.h2.lock().insert(addr, send.clone());
        Ok(send)
    }

    /// Forgets the connection to `addr` (after it failed).
    pub fn evict(&self, addr: SocketAddr) {
        self.h2.lock().remove(&addr);
    }
}

impl Default for Pools {
    fn default() -> Self {
        Self::new()
    }
}

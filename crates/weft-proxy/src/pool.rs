//! Connections the proxy owns: one multiplexed HTTP/2 connection per endpoint (proxy to proxy,
//! and to an app that speaks HTTP/2), and a pooled HTTP/1.1 client for apps that speak it.

use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use weft_core::Body;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Pools {
    /// By endpoint and the identity it must present (empty for plaintext).
    h2: Mutex<HashMap<(SocketAddr, String), http2::SendRequest<Body>>>,
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
    #[error("mTLS handshake with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: std::io::Error },
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

    /// A ready HTTP/2 sender to `addr`, reusing the open connection when there is one. With
    /// `tls` (the configuration that accepts only the endpoint's identity), it speaks mTLS.
    pub async fn h2(
        &self,
        addr: SocketAddr,
        tls: Option<(&str, Arc<rustls::ClientConfig>)>,
    ) -> Result<http2::SendRequest<Body>, ConnectError> {
        let key = (addr, tls.as_ref().map(|(id, _)| id.to_string()).unwrap_or_default());
        if let Some(send) = self.h2.lock().get(&key)
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
        let io: Box<dyn weft_core::serve::Io> = match tls {
            None => Box::new(tcp),
            Some((_, config)) => {
                let connect = tokio_rustls::TlsConnector::from(config).connect(crate::identity::sni(), tcp);
                match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                    Err(_) => return Err(ConnectError::Timeout { addr }),
                    Ok(Err(source)) => return Err(ConnectError::Tls { addr, source }),
                    Ok(Ok(stream)) => Box::new(stream),
                }
            }
        };
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .handshake::<_, Body>(TokioIo::new(io))
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "HTTP/2 connection closed");
            }
        });
        self.h2.lock().insert(key, send.clone());
        Ok(send)
    }

    /// Forgets the connections to `addr` (after one failed).
    pub fn evict(&self, addr: SocketAddr) {
        self.h2.lock().retain(|(a, _), _| *a != addr);
    }
}

impl Default for Pools {
    fn default() -> Self {
        Self::new()
    }
}

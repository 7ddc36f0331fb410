//! Connections the proxy owns: one multiplexed HTTP/2 connection per endpoint (proxy to proxy,
//! and to an app that speaks HTTP/2), and kept-alive HTTP/1.1 connections for apps that speak
//! it ([`AppH1`]).

use crate::reason::Reason;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use weft_core::Body;

/// Connect timeout when the policy sets none.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// An HTTP/2 connection with no request for this long is closed, when the policy sets none.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) struct Pools {
    /// By endpoint, then by the identity it must present (empty for plaintext): looked up by
    /// `&str`, so finding a pooled connection allocates nothing.
    h2: Mutex<HashMap<SocketAddr, Vec<(String, Pooled)>>>,
    /// Kept-alive HTTP/1.1 to the declared app.
    h1: AppH1,
    /// The same to the app's other ports (interception sends callers there), by address.
    h1_other_ports: Mutex<HashMap<SocketAddr, Arc<AppH1>>>,
    /// How to connect to the app over HTTP/2.
    app: Opts<'static>,
}

struct Pooled {
    send: http2::SendRequest<Body>,
    last_used_ms: AtomicU64,
    idle: Duration,
    /// Released when the connection ends (the service's connection count).
    _slot: Option<ConnectionSlot>,
}

/// How to open a connection to a service's endpoint.
#[derive(Clone, Copy)]
pub(crate) struct Opts<'a> {
    pub(crate) connect_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    /// The service's open connections, and the most it may have.
    pub(crate) limit: Option<(&'a Arc<AtomicU32>, u32)>,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            connect_timeout: CONNECT_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            limit: None,
        }
    }
}

/// One connection counted against a service's `maxConnections`.
struct ConnectionSlot(Arc<AtomicU32>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Why a connection could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect to {addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("connect to {addr} failed: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: hyper::Error },
    #[error("HTTP/1.1 handshake with {addr} failed: {source}")]
    Http1Handshake { addr: SocketAddr, source: hyper::Error },
    #[error("mTLS handshake with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: std::io::Error },
    #[error("the service already has its {max} connections (connectionPool.maxConnections)")]
    PoolFull { max: u32 },
}

impl ConnectError {
    /// The stable reason for a reply made after this error.
    pub(crate) fn reason(&self) -> Reason {
        match self {
            ConnectError::Timeout { .. } => Reason::UpstreamConnectTimeout,
            ConnectError::Io { .. } | ConnectError::Handshake { .. } | ConnectError::Http1Handshake { .. } => Reason::UpstreamConnectFailed,
            ConnectError::Tls { .. } => Reason::UpstreamTlsFailed,
            ConnectError::PoolFull { .. } => Reason::PoolFull,
        }
    }
}

// === impl Pools ===

impl Pools {
    /// Pools whose connections to the app (at `app`) give up connecting after
    /// `app_connect_timeout`.
    pub(crate) fn new(app: SocketAddr, app_connect_timeout: Duration) -> Self {
        Self {
            h2: Mutex::new(HashMap::new()),
            h1: AppH1::new(app, app_connect_timeout),
            h1_other_ports: Mutex::new(HashMap::new()),
            app: Opts {
                connect_timeout: app_connect_timeout,
                ..Opts::default()
            },
        }
    }

    /// Sends `req` (origin form) to the app at `addr` over a kept-alive HTTP/1.1 connection:
    /// the declared app's pool, or the pool of another of its ports.
    pub(crate) async fn app_h1(&self, addr: SocketAddr, req: Request<Body>) -> Result<Response<Body>, AppError> {
        if addr == self.h1.addr {
            return self.h1.request(req).await;
        }
        let pool = self
            .h1_other_ports
            .lock()
            .entry(addr)
            .or_insert_with(|| Arc::new(AppH1::new(addr, self.app.connect_timeout)))
            .clone();
        pool.request(req).await
    }

    /// How to open an HTTP/2 connection to the app.
    pub(crate) fn app_opts(&self) -> Opts<'static> {
        self.app
    }

    /// A ready HTTP/2 sender to `addr`, reusing the open connection when there is one. With
    /// `tls` (the configuration that accepts only the endpoint's identity), it speaks mTLS.
    pub(crate) async fn h2(
        &self,
        addr: SocketAddr,
        tls: Option<(&str, Arc<rustls::ClientConfig>)>,
        opts: Opts<'_>,
    ) -> Result<http2::SendRequest<Body>, ConnectError> {
        let identity = tls.as_ref().map(|(id, _)| *id).unwrap_or("");
        if let Some(conns) = self.h2.lock().get(&addr)
            && let Some((_, p)) = conns.iter().find(|(id, p)| id == identity && !p.send.is_closed())
        {
            p.last_used_ms.store(crate::clock::mono_ms(), Relaxed);
            return Ok(p.send.clone());
        }
        let identity = identity.to_string();
        let slot = match opts.limit {
            None => None,
            Some((count, max)) => {
                if count.fetch_add(1, Relaxed) >= max {
                    count.fetch_sub(1, Relaxed);
                    return Err(ConnectError::PoolFull { max });
                }
                Some(ConnectionSlot(count.clone()))
            }
        };
        let io = connect(addr, tls.map(|(_, c)| c), opts.connect_timeout).await?;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .handshake::<_, Body>(TokioIo::new(weft_core::coalesce::Coalesced::http2(io)))
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "HTTP/2 connection closed");
            }
        });
        let pooled = Pooled {
            send: send.clone(),
            last_used_ms: AtomicU64::new(crate::clock::mono_ms()),
            idle: opts.idle_timeout,
            _slot: slot,
        };
        let mut pool = self.h2.lock();
        let conns = pool.entry(addr).or_default();
        conns.retain(|(id, _)| *id != identity); // a closed one it replaces
        conns.push((identity, pooled));
        Ok(send)
    }

    /// Closes connections idle longer than their idle timeout (in-flight requests keep
    /// theirs open until they finish); run every second.
    pub(crate) fn reap(&self) {
        self.h1.reap();
        // A port's pool with nothing idle is forgotten; one still lending a connection gets
        // it back and drops it with the pool (the next request opens another).
        self.h1_other_ports.lock().retain(|_, pool| {
            pool.reap();
            !pool.idle.lock().is_empty()
        });
        let now = crate::clock::mono_ms();
        self.h2.lock().retain(|_, conns| {
            conns.retain(|(_, p)| !p.send.is_closed() && now.saturating_sub(p.last_used_ms.load(Relaxed)) < p.idle.as_millis() as u64);
            !conns.is_empty()
        });
    }

    /// Forgets the connections to `addr` (after one failed).
    pub(crate) fn evict(&self, addr: SocketAddr) {
        self.h2.lock().remove(&addr);
    }
}

/// A new connection to `addr`, over mTLS when `tls` is given.
pub(crate) async fn connect(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<Box<dyn weft_core::serve::Io>, ConnectError> {
    let tcp = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => return Err(ConnectError::Timeout { addr }),
        Ok(Err(source)) => return Err(ConnectError::Io { addr, source }),
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Ok(Box::new(tcp)),
        Some(config) => {
            let connect = tokio_rustls::TlsConnector::from(config).connect(crate::identity::sni(), tcp);
            match tokio::time::timeout(timeout, connect).await {
                Err(_) => Err(ConnectError::Timeout { addr }),
                Ok(Err(source)) => Err(ConnectError::Tls { addr, source }),
                Ok(Ok(stream)) => Ok(Box::new(stream)),
            }
        }
    }
}

// === impl AppH1 ===
//
// Kept-alive HTTP/1.1 connections to the app. A connection is checked out for one request and
// back in when the response body ends, by the body itself: per request, one lock to check out
// and one to check in, no task and no boxed future. hyper-util's legacy client, used before,
// spawned a task, cloned the URI and locked a map keyed by it for every request (issue #15's
// profile: about 9,000 of the sidecar's 60,000 instructions per request).

/// An idle HTTP/1.1 connection to the app is closed after this long.
const APP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct AppH1 {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle: Arc<Mutex<Vec<Idle>>>,
}

struct Idle {
    send: http1::SendRequest<Body>,
    since: Instant,
}

/// Why the app gave no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppError {
    /// No connection could be had: nothing was sent.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The request was sent, or partly sent, and the exchange failed.
    #[error("{0}")]
    Exchange(hyper::Error),
}

impl AppH1 {
    pub(crate) fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        Self {
            addr,
            connect_timeout,
            idle: Arc::default(),
        }
    }

    /// Sends `req` (in origin form) on an idle connection, or on a new one when none is left.
    /// A pooled connection the app closed meanwhile fails before the request leaves; the
    /// request then goes on the next one, as the legacy client's did.
    pub(crate) async fn request(&self, mut req: Request<Body>) -> Result<Response<Body>, AppError> {
        while let Some(mut send) = self.checkout() {
            if send.ready().await.is_err() {
                continue;
            }
            match send.try_send_request(req).await {
                Ok(resp) => return Ok(self.returning(send, resp)),
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(AppError::Exchange(failed.into_error())),
                },
            }
        }
        let mut send = self.open().await?;
        let resp = send.send_request(req).await.map_err(AppError::Exchange)?;
        Ok(self.returning(send, resp))
    }

    /// Closes connections idle longer than [`APP_IDLE_TIMEOUT`]; run every second.
    pub(crate) fn reap(&self) {
        self.idle
            .lock()
            .retain(|i| !i.send.is_closed() && i.since.elapsed() < APP_IDLE_TIMEOUT);
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock();
        while let Some(i) = idle.pop() {
            if !i.send.is_closed() {
                return Some(i.send);
            }
        }
        None
    }

    async fn open(&self) -> Result<http1::SendRequest<Body>, ConnectError> {
        let addr = self.addr;
        let io = connect(addr, None, self.connect_timeout).await?;
        let (send, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(|source| ConnectError::Http1Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "HTTP/1.1 connection to the app closed");
            }
        });
        Ok(send)
    }

    /// The response, its body handing `send` back to the pool once read to the end.
    fn returning(&self, send: http1::SendRequest<Body>, resp: Response<Incoming>) -> Response<Body> {
        let idle = self.idle.clone();
        resp.map(|body| {
            weft_core::boxed(Returning {
                body,
                send: Some(send),
                idle,
                ended: false,
            })
        })
    }
}

/// A response body that returns its connection when it ends. Dropped before its end, the
/// connection is dropped too: its remaining bytes would be read as the next response.
struct Returning {
    body: Incoming,
    send: Option<http1::SendRequest<Body>>,
    idle: Arc<Mutex<Vec<Idle>>>,
    ended: bool,
}

impl http_body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Err(_))) => self.send = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if !(self.ended || self.body.is_end_stream()) {
            return;
        }
        if let Some(send) = self.send.take() {
            self.idle.lock().push(Idle {
                send,
                since: Instant::now(),
            });
        }
    }
}

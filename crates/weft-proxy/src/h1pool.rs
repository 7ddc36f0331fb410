//! Kept-alive HTTP/1.1 connections to the app.
//!
//! A connection is checked out for one request and back in when the response body ends, by
//! the body itself: per request, one lock to check out and one to check in, no task and no
//! boxed future. hyper-util's legacy client, used before, spawned a task, cloned the URI and
//! locked a map keyed by it for every request (issue #15's profile: about 9,000 of the
//! sidecar's 60,000 instructions per request).

use crate::pool::{ConnectError, connect};
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use weft_core::Body;

/// An idle connection to the app is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

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

    /// Closes connections idle longer than [`IDLE_TIMEOUT`]; run every second.
    pub(crate) fn reap(&self) {
        self.idle.lock().retain(|i| !i.send.is_closed() && i.since.elapsed() < IDLE_TIMEOUT);
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

//! The accept loop every weft listener runs: HTTP/1.1 and HTTP/2 on one port, with the mesh's
//! safety limits, and graceful drain when shutdown is asked.

use crate::framing::Refusal;
use crate::{Body, Shutdown};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

/// The number of headers hyper's HTTP/1 parser accepts when not told otherwise.
const HYPER_MAX_HEADERS: usize = 100;

/// Limits applied to every inbound connection (DESIGN: security is a default).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most headers in one HTTP/1.1 request.
    pub max_headers: usize,
    /// Largest request header block, bytes (HTTP/1.1 read buffer and HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Time allowed to read an HTTP/1.1 request head: the first from the connection's start
    /// (or its TLS handshake's end), a later one from its first byte or, once idle, from the
    /// end of the answer before it.
    pub header_read_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// How long in-flight requests may finish after shutdown is asked.
    pub drain: Duration,
    /// How long a connection may go with no request awaiting its response before it is closed
    /// gracefully (HTTP/2: GOAWAY; HTTP/1.1: closed, or after the answer in progress). A
    /// request counts until its response head is sent: a body still streaming is finished
    /// first, and the connection closed after it.
    pub idle_timeout: Duration,
}

/// A connection with no request in flight for this long is closed by default: Envoy's default
/// idle timeout for HTTP connections. Before it, an HTTP/2 client that answered PINGs held an
/// idle connection for ever (kept-alive HTTP/1.1 ones were already closed between requests by
/// the header read timeout).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Requests in flight on one connection, and when the last one began or ended.
struct Activity {
    base: tokio::time::Instant,
    in_flight: AtomicUsize,
    /// Nanoseconds from `base` to the last request's start or end.
    last: AtomicU64,
}

/// One request in flight; counted out when dropped (answered, or abandoned).
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            base: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        self.last.store(self.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    /// When the connection will have been idle for `timeout`, if nothing starts meanwhile;
    /// while requests are in flight, a look again `timeout` from now.
    fn idle_at(&self, timeout: Duration) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        // Acquire pairs with the Release of the last request's end: its `last` is then seen.
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return now + timeout;
        }
        self.base + Duration::from_nanos(self.last.load(Ordering::Relaxed)) + timeout
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// The remote address of the connection a request arrived on (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct RemoteAddr(pub SocketAddr);

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_headers: 100,
            max_header_bytes: 60 * 1024,
            header_read_timeout: Duration::from_secs(10),
            max_concurrent_streams: 100,
            drain: Duration::from_secs(10),
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// A connection's byte stream, plain or after a handshake.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A request refused before any handler sees it (status, `x-weft-error` reason, detail); the
/// connection is closed after it.
fn refuse(status: http::StatusCode, reason: &'static str, why: impl std::fmt::Display) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONNECTION, "close")
        .header("x-weft-error", reason)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(crate::full(format!("{reason}: {why}\n")))
        .expect("valid refusal")
}

/// The answer to a head the framing scan refused.
fn answer(refusal: Refusal) -> Response<Body> {
    use http::StatusCode;
    match refusal {
        Refusal::Ambiguous(why) => refuse(StatusCode::BAD_REQUEST, "ambiguous-framing", why),
        Refusal::BadHead(why) => refuse(StatusCode::BAD_REQUEST, "client-bad-request", why),
        Refusal::TooLarge(why) => refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "client-header-too-large", why),
    }
}

/// What is wrong with a request's `Host`, if anything: more than one (RFC 9112 §3.2 requires
/// a 400), or one that names another host than the absolute-form target or `:authority`. A
/// proxy may ignore such a `Host` (§3.2.2), but weft refuses it, so that no hop routes on one
/// name while the app reads the other.
fn host_problem<B>(req: &Request<B>) -> Option<String> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host = hosts.next()?;
    if hosts.next().is_some() {
        return Some("more than one Host header".into());
    }
    let target = req.uri().authority()?;
    let default_port: &[u8] = if req.uri().scheme() == Some(&http::uri::Scheme::HTTPS) {
        b":443"
    } else {
        b":80"
    };
    let (h, t) = (host.as_bytes(), target.as_str().as_bytes());
    let (h, t) = (h.strip_suffix(default_port).unwrap_or(h), t.strip_suffix(default_port).unwrap_or(t));
    (!h.eq_ignore_ascii_case(t)).then(|| {
        format!(
            "Host {:?} names another host than the request target {:?}",
            String::from_utf8_lossy(host.as_bytes()),
            target.as_str()
        )
    })
}

/// Serves `handler` on `listener` until `shutdown`, then drains for at most `limits.drain`.
pub async fn serve<H, F>(listener: TcpListener, limits: Limits, shutdown: Shutdown, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let plain = |tcp: tokio::net::TcpStream, _remote: SocketAddr| async move { Some((Box::new(tcp) as Box<dyn Io>, ())) };
    serve_with(listener, limits, shutdown, plain, handler).await
}

/// As [`serve`], with `accept` run on every new connection (off the accept loop): it may
/// refuse the connection (`None`), or hand back the stream to speak HTTP on (after a TLS
/// handshake, say) and facts about the connection, inserted into every request's extensions.
pub async fn serve_with<A, AF, E, H, F>(listener: TcpListener, limits: Limits, shutdown: Shutdown, accept: A, handler: H)
where
    A: Fn(tokio::net::TcpStream, SocketAddr) -> AF + Clone + Send + Sync + 'static,
    AF: Future<Output = Option<(Box<dyn Io>, E)>> + Send + 'static,
    E: Clone + Send + Sync + 'static,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    // hyper's own bound is 100 headers. Given any bound, it fills its two 100-slot parse
    // buffers element by element for every request (`smallvec!` instead of an inline array:
    // about 1,700 instructions a request, issue #15's profile). The configured count is
    // enforced before hyper parses (`crate::framing::Scanned`), so only a larger bound must
    // reach hyper.
    if limits.max_headers > HYPER_MAX_HEADERS {
        builder.http1().max_headers(limits.max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Duration::from_secs(20));
    // Every connection's task holds a sender; the receiver reads None once all have ended.
    let (open, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let (handler, accept, builder, open, stop) = (handler.clone(), accept.clone(), builder.clone(), open.clone(), shutdown.clone());
        let (handshake_timeout, idle_timeout) = (limits.header_read_timeout, limits.idle_timeout);
        let head_limits = crate::framing::HeadLimits {
            max_headers: limits.max_headers,
            max_bytes: limits.max_header_bytes.max(8192),
        };
        tokio::spawn(async move {
            let Ok(Some((io, facts))) = tokio::time::timeout(handshake_timeout, accept(stream, remote)).await else {
                return;
            };
            let (io, verdicts) = crate::framing::Scanned::new(io, head_limits);
            // hyper's header_read_timeout never sees a head the scan still holds, nor the
            // first one (hyper is still telling HTTP/1.1 from HTTP/2): the scan times those.
            let io = io.head_timeout(handshake_timeout);
            // An HTTP/2 connection's frames leave in one write per turn of its task.
            let io = crate::coalesce::Coalesced::sniffing(io);
            let index = std::sync::atomic::AtomicU64::new(0);
            let activity = Activity::new();
            let counted = activity.clone();
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let busy = counted.begin();
                let n = index.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let scanned = if req.version() == http::Version::HTTP_2 {
                    None
                } else {
                    verdicts.take(n)
                };
                // hyper refuses a bad length or coding itself, and resolves Content-Length
                // with Transfer-Encoding by dropping the length: only the scan of the bytes
                // still sees that one.
                let refused = match (scanned, host_problem(&req)) {
                    (Some(refusal), _) => {
                        tracing::info!(%remote, ?refusal, "request refused before parsing");
                        Some(answer(refusal))
                    }
                    (None, Some(why)) => {
                        tracing::info!(%remote, why, "request refused: bad Host");
                        Some(refuse(http::StatusCode::BAD_REQUEST, "client-bad-host", why))
                    }
                    (None, None) => None,
                };
                req.extensions_mut().insert(RemoteAddr(remote));
                req.extensions_mut().insert(facts.clone());
                // Boxed: a proxy's handler future runs to kilobytes, and an HTTP/2 stream task
                // would otherwise copy it whole each time it is spawned and moved.
                let fut = refused.is_none().then(|| Box::pin(handler(req)));
                async move {
                    let _busy = busy;
                    match (refused, fut) {
                        (Some(refused), _) => Ok::<_, Infallible>(refused),
                        (None, Some(fut)) => Ok(fut.await),
                        (None, None) => unreachable!("a request is either refused or handled"),
                    }
                }
            });
            // Ends once the connection does, or at an upgrade (the upgraded stream then
            // belongs to whoever took it, and no timer here reaches it).
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            tokio::pin!(conn);
            let mut closing = false;
            loop {
                let idle_at = activity.idle_at(idle_timeout);
                tokio::select! {
                    ended = conn.as_mut() => {
                        if let Err(error) = ended {
                            tracing::debug!(%remote, %error, "connection ended with an error");
                        }
                        break;
                    }
                    _ = stop.cancelled(), if !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ = tokio::time::sleep_until(idle_at), if !closing => {
                        if activity.idle_at(idle_timeout) <= tokio::time::Instant::now() {
                            tracing::debug!(%remote, ?idle_timeout, "idle connection closed");
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                }
            }
            drop(open);
        });
    }
    drop(listener);
    drop(open);
    tokio::select! {
        _ = all_closed.recv() => {}
        _ = tokio::time::sleep(limits.drain) => tracing::warn!(drain = ?limits.drain, "drain window over; closing open connections"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sends raw bytes and returns the status code of the answer, and its `x-weft-error`.
    async fn status_of(addr: SocketAddr, request: Vec<u8>) -> (u16, Option<String>) {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&request).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tcp.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {head:?}"));
        let reason = head.lines().find_map(|l| l.strip_prefix("x-weft-error: ")).map(str::to_string);
        (status, reason)
    }

    fn request(extra_headers: usize, value_len: usize) -> Vec<u8> {
        let mut r = String::from("GET / HTTP/1.1\r\nhost: x\r\n");
        for i in 0..extra_headers {
            r.push_str(&format!("x-h{i}: {}\r\n", "v".repeat(value_len)));
        }
        r.push_str("\r\n");
        r.into_bytes()
    }

    #[tokio::test]
    async fn header_count_and_size_limits_answer_431_with_the_reason() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        tokio::spawn(serve(listener, Limits::default(), shutdown.clone(), |_req| async {
            crate::admin::text(hyper::StatusCode::OK, "ok")
        }));
        let too_large = (431, Some("client-header-too-large".to_string()));
        assert_eq!(status_of(addr, request(90, 10)).await, (200, None), "91 headers are allowed");
        assert_eq!(status_of(addr, request(100, 10)).await, too_large, "101 headers are refused");
        assert_eq!(
            status_of(addr, request(1, 70 * 1024)).await,
            too_large,
            "a 70 KiB header block is refused"
        );
        shutdown.cancel();
    }
    /// Reads until the server closes the connection (or `limit` passes); returns what came and
    /// how long after the call the end came, if it did.
    async fn until_closed(tcp: &mut tokio::net::TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
        let started = std::time::Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout_at(tokio::time::Instant::from_std(started + limit), tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (got, Some(started.elapsed())),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => return (got, None),
            }
        }
    }

    #[tokio::test]
    async fn a_head_that_never_completes_is_cut_at_the_header_read_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let limits = Limits {
            header_read_timeout: Duration::from_millis(400),
            ..Limits::default()
        };
        tokio::spawn(serve(listener, limits, shutdown.clone(), |_req| async {
            crate::admin::text(hyper::StatusCode::OK, "ok")
        }));
        // Slowloris: nothing at all, a first head cut short (before and after the 24 bytes
        // that tell HTTP/1.1 from HTTP/2), and a second head cut short after a whole request.
        let partial: [&[u8]; 3] = [b"", b"GET", b"GET / HTTP/1.1\r\nhost: x\r\n"];
        let mut slow = Vec::new();
        for bytes in partial {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(bytes).await.unwrap();
            slow.push((String::from_utf8_lossy(bytes).into_owned(), tcp));
        }
        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 1024];
        let n = kept.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
        kept.write_all(b"GET / HTTP/1.1\r\nho").await.unwrap();
        slow.push(("a second head".into(), kept));
        for (what, mut tcp) in slow {
            let (got, closed) = until_closed(&mut tcp, Duration::from_secs(10)).await;
            let closed = closed.unwrap_or_else(|| panic!("{what:?}: still open after 10 s (timeout 400 ms)"));
            assert!(closed < Duration::from_secs(5), "{what:?}: closed only after {closed:?}");
            assert!(
                !got.starts_with(b"HTTP/1.1 200"),
                "{what:?}: answered {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        // A head that arrives in pieces, each well within the timeout and whole within it,
        // is served.
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        for piece in [&b"GET / HT"[..], b"TP/1.1\r\nhost: x\r\n", b"\r\n"] {
            tcp.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
        shutdown.cancel();
    }
}

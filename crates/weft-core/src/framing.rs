//! What a connection's client may send before hyper parses it: request-smuggling defence and
//! named refusals for HTTP/1.1, and a cap on HTTP/2 SETTINGS frames.
//!
//! hyper resolves `Content-Length` + `Transfer-Encoding` itself (it drops the length and closes
//! the connection afterwards), which RFC 9112 allows, but it leaves no trace of the dropped
//! header for the handler to refuse the request; and a head it cannot parse it answers with a
//! bare 400 or 431 of its own, with no reason a client could act on. So the bytes of each
//! plaintext or decrypted connection pass through a scan before hyper reads them: every request
//! head is held until whole and checked (framing, then syntax and size with hyper's own parser,
//! httparse, and limits), and a refused one reaches hyper as a stand-in request that the serving
//! loop answers with the reason; a body is skipped by its own framing so the next head is
//! found. After an upgrade the scan stops; on HTTP/2 it reads frame headers only, counting the
//! client's SETTINGS (h2 0.4 ACKs and applies every one, with no cap of its own). It keeps a
//! few integers of state, the current line and the bytes of the head being held.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Why a request head was refused before hyper parsed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its body framing could be read two ways (400 `ambiguous-framing`).
    Ambiguous(&'static str),
    /// It is not a valid HTTP/1.1 request head (400 `client-bad-request`).
    BadHead(&'static str),
    /// It has too many headers, or too many bytes (431 `client-header-too-large`).
    TooLarge(&'static str),
}

/// The refused head of a connection, if any: a refused head is its connection's last.
#[derive(Default)]
pub struct Verdicts(OnceLock<(u64, Refusal)>);

const WHY: [&str; 3] = [
    "both Content-Length and Transfer-Encoding",
    "more than one Content-Length",
    "Transfer-Encoding does not end with chunked",
];

/// Stands in for a refused head, so hyper hands the serving loop a request to answer (with the
/// refusal's reason) instead of writing a bare error of its own.
const STAND_IN: &[u8] = b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n";

/// HTTP/2 SETTINGS frames one client may send in [`SETTINGS_WINDOW`]. A client sends one at
/// the start and rarely any later; each costs the server an ACK and a pass over its streams,
/// so a flood is cut off by closing the connection.
pub const MAX_SETTINGS: u32 = 100;
const SETTINGS_WINDOW: Duration = Duration::from_secs(10);

impl Verdicts {
    /// Why request `index` (0-based on its connection) was refused, if it was.
    pub fn take(&self, index: u64) -> Option<Refusal> {
        self.0.get().filter(|(i, _)| *i == index).map(|(_, r)| *r)
    }
}

/// The largest request head accepted, as hyper is configured.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    pub max_headers: usize,
    pub max_bytes: usize,
}

/// A connection's byte stream, with its request heads checked as they arrive: each head is
/// held until it is whole, then checked (framing, syntax, size) and handed on, or replaced by
/// a stand-in that the serving loop answers with the refusal.
pub struct Scanned<T> {
    inner: T,
    scan: Scan,
    verdicts: Arc<Verdicts>,
    limits: HeadLimits,
    /// Bytes read from `inner` that hyper has not had yet.
    pending: Vec<u8>,
    /// How many of `pending`'s first bytes hyper may have.
    ready: usize,
    /// How many of `pending`'s bytes the scan has seen.
    seen: usize,
    /// Where the head being held starts in `pending`.
    head_start: Option<usize>,
    /// A head was refused: later bytes are read and dropped until the connection closes.
    refused: bool,
    /// Where reads from `inner` land while heads are checked (`READ_CHUNK` bytes once used).
    scratch: Vec<u8>,
    /// How long a request head may take to arrive whole, if limited (see [`Scanned::head_timeout`]).
    head_timeout: Option<Duration>,
    /// When the awaited head must be whole; made once per connection and reset for each head.
    head_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether `head_deadline` runs: while the connection's first request head, or a later
    /// head already begun, is awaited.
    head_deadline_armed: bool,
    /// Bytes pass at once and nothing is refused: the scan only tells where heads begin and
    /// end, for the head deadline (see [`Scanned::watching`]).
    watching: bool,
    /// How long the connection may move no byte either way, if limited, and when that runs
    /// out (see [`Scanned::idle_timeout`]).
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
}

struct Scan {
    state: State,
    /// The header line being read.
    line: Vec<u8>,
    heads: u64,
    content_lengths: u32,
    first_length: Option<u64>,
    lengths_differ: bool,
    /// A Content-Length that is not a plain decimal number.
    bad_length: bool,
    transfer_encoding: Option<Vec<u8>>,
    upgrade: bool,
    first_line: bool,
    /// Set when a head's last line was scanned, with what its framing says; the scan pauses
    /// there.
    head_ended: Option<Result<(), Refusal>>,
    h2: H2Watch,
}

/// Counts the client's HTTP/2 SETTINGS frames, after the connection preface.
struct H2Watch {
    /// Bytes to pass before the next frame header (rest of the preface, or a payload).
    skip: usize,
    header: [u8; 9],
    have: usize,
    settings: u32,
    window: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Head,
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers,
    /// After the HTTP/2 preface: frames are watched for a SETTINGS flood.
    H2,
    /// Settings flooded: the connection is ended.
    Flooded,
    Off,
}

/// Longest chunk-size or trailer line kept; a longer one is hyper's to refuse, and scanning
/// stops. (A head's lines are bounded by the head limit instead.)
const MAX_LINE: usize = 64 * 1024;

impl<T> Scanned<T> {
    pub fn new(inner: T, limits: HeadLimits) -> (Self, Arc<Verdicts>) {
        let verdicts = Arc::new(Verdicts::default());
        let scan = Scan {
            state: State::Head,
            line: Vec::new(),
            heads: 0,
            content_lengths: 0,
            first_length: None,
            lengths_differ: false,
            bad_length: false,
            transfer_encoding: None,
            upgrade: false,
            first_line: true,
            head_ended: None,
            h2: H2Watch {
                skip: 0,
                header: [0; 9],
                have: 0,
                settings: 0,
                window: Instant::now(),
            },
        };
        (
            Scanned {
                inner,
                scan,
                verdicts: verdicts.clone(),
                limits,
                pending: Vec::new(),
                scratch: Vec::new(),
                ready: 0,
                seen: 0,
                head_start: None,
                refused: false,
                head_timeout: None,
                head_deadline: None,
                head_deadline_armed: false,
                watching: false,
                idle: None,
            },
            verdicts,
        )
    }

    /// A scan that holds nothing back and refuses nothing, for a server that answers bad
    /// heads itself but has no head timeout of its own (axum's `serve`): with
    /// [`Scanned::head_timeout`] it ends a connection whose head does not arrive whole in time,
    /// and it still closes an HTTP/2 connection that floods SETTINGS.
    pub fn watching(inner: T, limits: HeadLimits) -> Self {
        let (mut scanned, _) = Self::new(inner, limits);
        scanned.watching = true;
        scanned
    }

    /// Ends the connection (a `TimedOut` read error) when a request head is not whole within
    /// `timeout`: the first one counted from now, a later one from its first byte. hyper's own
    /// `header_read_timeout` cannot cover what this scan holds back: a head held here reaches
    /// hyper only when whole, and before the first bytes reach it hyper is still telling
    /// HTTP/1.1 from HTTP/2, with no timer at all, so without this a client that sends part of
    /// a head (or nothing) would hold its connection open for ever (slowloris). The wait
    /// between two requests on a kept-alive connection is not timed here (an idle connection,
    /// or a server-sent-events stream, reads nothing while a response is written).
    pub fn head_timeout(mut self, timeout: Duration) -> Self {
        self.head_timeout = Some(timeout);
        self.head_deadline = Some(Box::pin(tokio::time::sleep(timeout)));
        self.head_deadline_armed = true;
        self
    }

    /// Ends the connection (a `TimedOut` read error) once no byte has moved either way for
    /// `timeout`: a kept-alive connection left idle, or one that never sent anything, holds its
    /// socket and task no longer than that. A request whose answer moves no byte for as long
    /// is cut too, so the timeout must outlast the slowest answer (a server-sent event
    /// stream's keep-alive comments count as bytes). HTTP/2's PING moves bytes, so an HTTP/2
    /// connection is never idle here while the server pings more often than `timeout`.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle = Some((timeout, Box::pin(tokio::time::sleep(timeout))));
        self
    }

    /// Something moved: the idle deadline starts again.
    fn moved(&mut self) {
        if let Some((timeout, deadline)) = self.idle.as_mut() {
            deadline.as_mut().reset(tokio::time::Instant::now() + *timeout);
        }
    }

    /// Whether the connection has been idle too long (polling registers the wake-up).
    fn idle_late(&mut self, cx: &mut Context<'_>) -> bool {
        self.idle
            .as_mut()
            .is_some_and(|(_, deadline)| deadline.as_mut().poll(cx).is_ready())
    }

    /// Arms the head deadline when a head has begun and none is armed, and disarms it once
    /// nothing is held (a head passed or was refused, or the connection is HTTP/2 or upgraded).
    fn track_head_deadline(&mut self) {
        let (Some(timeout), Some(deadline)) = (self.head_timeout, self.head_deadline.as_mut()) else {
            return;
        };
        let awaiting_first = self.scan.heads == 0 && self.scan.state == State::Head && self.ready == 0 && !self.refused;
        let awaiting = self.head_start.is_some() || awaiting_first;
        if awaiting && !self.head_deadline_armed {
            deadline.as_mut().reset(tokio::time::Instant::now() + timeout);
        }
        self.head_deadline_armed = awaiting;
    }

    /// Whether the awaited head is late (polling registers the wake-up for when it will be).
    fn head_late(&mut self, cx: &mut Context<'_>) -> bool {
        match self.head_deadline.as_mut() {
            Some(deadline) if self.head_deadline_armed => deadline.as_mut().poll(cx).is_ready(),
            _ => false,
        }
    }

    /// Scans what was read and not yet scanned, deciding how much of it hyper may have.
    fn advance(&mut self) {
        if self.watching {
            return self.advance_watching();
        }
        while self.seen < self.pending.len() && !self.refused && self.scan.state != State::Flooded {
            if self.scan.state == State::Head && self.head_start.is_none() {
                self.head_start = Some(self.seen);
            }
            let end = match self.head_start {
                // A head is scanned to at most one byte past the limit, where it is refused
                // whatever follows: how far the scan reads then depends on the bytes alone,
                // never on how they were cut into reads (a smuggler controls the cut).
                Some(start) if self.scan.state == State::Head => self.pending.len().min(start + self.limits.max_bytes + 1),
                _ => self.pending.len(),
            };
            self.seen += self.scan.feed(&self.pending[self.seen..end]);
            match (self.head_start, self.scan.head_ended.take()) {
                (Some(start), Some(framing)) => {
                    let index = self.scan.heads - 1;
                    let head = &self.pending[start..self.seen];
                    let checked = size_check(head.len(), self.limits)
                        .and(framing)
                        .and_then(|()| head_check(head, self.limits));
                    match checked {
                        Ok(()) => {
                            self.ready = self.seen;
                            self.head_start = None;
                        }
                        Err(refusal) => self.refuse(start, index, refusal),
                    }
                }
                (Some(start), None) if self.scan.state == State::Head => {
                    if let Err(why) = size_check(self.seen - start, self.limits) {
                        self.refuse(start, self.scan.heads, why);
                    } // else held until whole
                }
                _ => {
                    // A body, an HTTP/2 connection, or an upgraded one: nothing to hold.
                    self.ready = self.seen;
                    self.head_start = None;
                }
            }
        }
    }

    /// As [`Scanned::advance`] when watching: everything scanned may pass; a head only marks
    /// `head_start` while it lasts. A head the scan would refuse, or a line longer than the
    /// head limit, ends the watch (the server answers it).
    fn advance_watching(&mut self) {
        while self.seen < self.pending.len() && self.scan.state != State::Off && self.scan.state != State::Flooded {
            if self.scan.state == State::Head && self.head_start.is_none() {
                self.head_start = Some(self.seen);
            }
            self.seen += self.scan.feed(&self.pending[self.seen..]);
            match self.scan.head_ended.take() {
                Some(Err(_)) => self.scan.state = State::Off,
                Some(Ok(())) => self.head_start = None,
                None if self.scan.state == State::Head => {
                    if self.scan.line.len() > self.limits.max_bytes {
                        self.scan.state = State::Off;
                        self.scan.line = Vec::new();
                    }
                }
                None => self.head_start = None,
            }
        }
        if matches!(self.scan.state, State::Off) {
            self.head_start = None;
            self.seen = self.pending.len();
        }
        self.ready = self.seen;
    }

    /// Replaces the head from `start` on with the stand-in, and drops all that follows.
    fn refuse(&mut self, start: usize, index: u64, refusal: Refusal) {
        let _ = self.verdicts.0.set((index, refusal));
        self.pending.truncate(start);
        self.pending.extend_from_slice(STAND_IN);
        self.ready = self.pending.len();
        self.seen = self.ready;
        self.head_start = None;
        self.refused = true;
        self.scan.state = State::Off;
    }
}

/// A head longer than the limit is refused before anything else about it, so that the same
/// head gets the same refusal whether it was seen whole or only its first bytes were.
fn size_check(len: usize, limits: HeadLimits) -> Result<(), Refusal> {
    if len > limits.max_bytes {
        return Err(Refusal::TooLarge("the request head is larger than the limit"));
    }
    Ok(())
}

/// Checks a whole request head as hyper will parse it (the same parser, httparse, with the
/// same limits), so that a head hyper would refuse with a bare 400 or 431 is refused here with
/// the reason named.
fn head_check(head: &[u8], limits: HeadLimits) -> Result<(), Refusal> {
    let mut on_stack = [httparse::EMPTY_HEADER; 100];
    let mut on_heap = Vec::new();
    let headers: &mut [httparse::Header] = if limits.max_headers <= on_stack.len() {
        &mut on_stack[..limits.max_headers]
    } else {
        on_heap.resize(limits.max_headers, httparse::EMPTY_HEADER);
        &mut on_heap
    };
    let mut req = httparse::Request::new(headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(Refusal::BadHead("the request head is incomplete")),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge("too many header fields")),
        Err(e) => return Err(Refusal::BadHead(syntax_error(e))),
    }
    if http::Uri::try_from(req.path.unwrap_or_default()).is_err() {
        return Err(Refusal::BadHead("invalid request target"));
    }
    let chunked_1_0 = req.version == Some(0) && req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
    if chunked_1_0 {
        return Err(Refusal::BadHead("Transfer-Encoding in an HTTP/1.0 request"));
    }
    Ok(())
}

fn syntax_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Token => "invalid method",
        httparse::Error::Version => "invalid HTTP version",
        _ => "invalid request line",
    }
}

// === impl H2Watch ===

impl H2Watch {
    /// Reads frame headers; returns how many bytes were read before a SETTINGS frame past the
    /// cap, if one came.
    fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut at = 0;
        while at < bytes.len() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len() - at);
                self.skip -= n;
                at += n;
                continue;
            }
            let header_at = at;
            let n = (9 - self.have).min(bytes.len() - at);
            self.header[self.have..self.have + n].copy_from_slice(&bytes[at..at + n]);
            self.have += n;
            at += n;
            if self.have < 9 {
                continue;
            }
            self.have = 0;
            let h = self.header;
            self.skip = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
            let settings = h[3] == 0x4 && h[4] & 0x1 == 0;
            if settings {
                if self.window.elapsed() > SETTINGS_WINDOW {
                    self.window = Instant::now();
                    self.settings = 0;
                }
                self.settings += 1;
                if self.settings > MAX_SETTINGS {
                    return Some(header_at);
                }
            }
        }
        None
    }
}

impl Scan {
    /// Scans `bytes`; returns how many it took, which is fewer when a request head begins or
    /// ends (the caller holds and checks heads) or a SETTINGS flood begins.
    fn feed(&mut self, bytes: &[u8]) -> usize {
        let mut at = 0;
        let in_head = self.state == State::Head;
        while at < bytes.len() {
            if (self.state == State::Head) != in_head {
                return at;
            }
            let rest = &bytes[at..];
            match self.state {
                State::Off => return bytes.len(),
                State::Flooded => return at,
                State::H2 => match self.h2.feed(rest) {
                    Some(before) => {
                        self.state = State::Flooded;
                        return at + before;
                    }
                    None => return bytes.len(),
                },
                State::Fixed(n) => {
                    let take = (n as usize).min(rest.len());
                    at += take;
                    let left = n - take as u64;
                    self.state = if left == 0 { State::Head } else { State::Fixed(left) };
                }
                State::ChunkData(n) => {
                    let take = (n as usize).min(rest.len());
                    at += take;
                    let left = n - take as u64;
                    self.state = if left == 0 { State::ChunkEnd(2) } else { State::ChunkData(left) };
                }
                State::ChunkEnd(n) => {
                    let take = (n as usize).min(rest.len());
                    at += take;
                    let left = n - take as u8;
                    self.state = if left == 0 { State::ChunkSize } else { State::ChunkEnd(left) };
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let Some(end) = rest.iter().position(|b| *b == b'\n') else {
                        self.push_line(rest);
                        return bytes.len();
                    };
                    self.push_line(&rest[..end]);
                    at += end + 1;
                    if self.state == State::Off {
                        return bytes.len();
                    }
                    let mut line = std::mem::take(&mut self.line);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    self.line_done(&line);
                    line.clear();
                    self.line = line;
                    if self.head_ended.is_some() {
                        return at;
                    }
                }
            }
        }
        at
    }

    fn push_line(&mut self, bytes: &[u8]) {
        if self.state != State::Head && self.line.len() + bytes.len() > MAX_LINE {
            self.state = State::Off;
            self.line = Vec::new();
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn line_done(&mut self, line: &[u8]) {
        match self.state {
            State::ChunkSize => {
                let digits = line.split(|b| *b == b';').next().unwrap_or(b"");
                let size = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|s| u64::from_str_radix(s.trim(), 16).ok());
                self.state = match size {
                    Some(0) => State::Trailers,
                    Some(n) => State::ChunkData(n),
                    None => State::Off, // hyper refuses the bad chunk
                };
            }
            State::Trailers if line.is_empty() => self.state = State::Head,
            State::Head if self.first_line => {
                if line.is_empty() {
                    return; // tolerated blank line between requests
                }
                if line.starts_with(b"PRI * HTTP/2") {
                    // The rest of the connection preface ("\r\nSM\r\n\r\n"), then frames.
                    self.h2.skip = 8;
                    self.state = State::H2;
                    return;
                }
                if line.starts_with(b"CONNECT ") {
                    self.state = State::Off;
                    return;
                }
                self.first_line = false;
            }
            State::Head if line.is_empty() => self.head_done(),
            State::Head => {
                let Some(colon) = line.iter().position(|b| *b == b':') else {
                    return;
                };
                let name = &line[..colon];
                let value = trim(&line[colon + 1..]);
                if name.eq_ignore_ascii_case(b"content-length") {
                    self.content_lengths += 1;
                    let digits = !value.is_empty() && value.iter().all(u8::is_ascii_digit);
                    let n = std::str::from_utf8(value)
                        .ok()
                        .filter(|_| digits)
                        .and_then(|v| v.parse::<u64>().ok());
                    match (self.first_length, n) {
                        (_, None) => self.bad_length = true,
                        (None, Some(n)) => self.first_length = Some(n),
                        (Some(a), Some(b)) if a == b => {}
                        _ => self.lengths_differ = true,
                    }
                } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                    let te = self.transfer_encoding.get_or_insert_with(Vec::new);
                    if !te.is_empty() {
                        te.push(b',');
                    }
                    te.extend_from_slice(value);
                } else if name.eq_ignore_ascii_case(b"upgrade") {
                    self.upgrade = true;
                }
            }
            _ => {}
        }
    }

    fn head_done(&mut self) {
        let chunked = self.transfer_encoding.as_deref().map(|te| {
            let last = te.rsplit(|b| *b == b',').next().unwrap_or(b"");
            trim(last).eq_ignore_ascii_case(b"chunked")
        });
        let why = match (self.content_lengths, chunked) {
            _ if self.bad_length => Some(Refusal::BadHead("invalid Content-Length")),
            (1.., Some(_)) => Some(Refusal::Ambiguous(WHY[0])),
            (2.., None) => Some(Refusal::Ambiguous(WHY[1])),
            (_, Some(false)) => Some(Refusal::Ambiguous(WHY[2])),
            _ => None,
        };
        self.head_ended = Some(why.map_or(Ok(()), Err));
        self.heads += 1;
        self.state = if why.is_some() || self.upgrade {
            // The connection ends after this request (refused, or no longer HTTP).
            State::Off
        } else if chunked == Some(true) {
            State::ChunkSize
        } else if let Some(n) = self.first_length.filter(|n| *n > 0) {
            State::Fixed(n)
        } else {
            State::Head
        };
        self.content_lengths = 0;
        self.first_length = None;
        self.lengths_differ = false;
        self.bad_length = false;
        self.transfer_encoding = None;
        self.upgrade = false;
        self.first_line = true;
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !b.is_ascii_whitespace()).map(|i| i + 1).unwrap_or(start);
    &v[start..end.max(start)]
}

/// Bytes read from the connection at a time while heads are checked.
const READ_CHUNK: usize = 16 * 1024;

impl<T: AsyncRead + Unpin> AsyncRead for Scanned<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.idle_late(cx) {
            tracing::info!(timeout = ?this.idle.as_ref().map(|(t, _)| *t), "connection idle; closing it");
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle")));
        }
        loop {
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.drain(..n);
                this.ready -= n;
                this.seen -= n;
                if let Some(start) = &mut this.head_start {
                    // A held head starts at or after what was ready (when watching, a head
                    // passes as it comes and only its being under way counts).
                    *start = start.saturating_sub(n);
                }
                return Poll::Ready(Ok(()));
            }
            if this.scan.state == State::Flooded {
                tracing::info!(max = MAX_SETTINGS, window = ?SETTINGS_WINDOW, "HTTP/2 SETTINGS flood; closing the connection");
                return Poll::Ready(Err(io::Error::other("HTTP/2 SETTINGS flood")));
            }
            if this.scan.state == State::Off && this.pending.is_empty() && !this.refused {
                // Nothing left to check on this connection: read straight into hyper's buffer.
                let before = buf.filled().len();
                let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
                if buf.filled().len() > before {
                    this.moved();
                }
                return polled;
            }
            // Reads land in a scratch buffer zeroed once per connection (not per read, which
            // was half of the proxy's instructions per request) and the bytes that came are
            // copied into `pending` to be checked.
            if this.scratch.is_empty() {
                this.scratch = vec![0; READ_CHUNK];
            }
            if this.head_late(cx) {
                let timeout = this.head_timeout.unwrap_or_default();
                tracing::info!(
                    ?timeout,
                    held = this.pending.len(),
                    "no whole request head in time; closing the connection"
                );
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no whole request head in time")));
            }
            let mut chunk = ReadBuf::new(&mut this.scratch);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut chunk);
            let n = chunk.filled().len();
            match polled {
                Poll::Ready(Ok(())) if n == 0 => return Poll::Ready(Ok(())), // end of stream
                Poll::Ready(Ok(())) if this.refused => this.moved(),         // dropped
                Poll::Ready(Ok(())) => {
                    this.moved();
                    this.pending.extend_from_slice(&this.scratch[..n]);
                    this.advance();
                    this.track_head_deadline();
                }
                other => return other,
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Scanned<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(1..))) {
            self.moved();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(1..))) {
            self.moved();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_headers: 10,
        max_bytes: 1024,
    };

    /// Feeds `chunks` as reads; returns the bytes hyper would get after each, and the scan.
    fn scan(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Scanned<()>) {
        let (mut s, _) = Scanned::new((), LIMITS);
        let mut out = Vec::new();
        for c in chunks {
            s.pending.extend_from_slice(c);
            s.advance();
            out.push(s.pending.drain(..s.ready).collect());
            s.seen -= s.ready;
            if let Some(start) = &mut s.head_start {
                *start -= s.ready;
            }
            s.ready = 0;
        }
        (out, s)
    }

    fn refusal(s: &Scanned<()>) -> Option<(u64, Refusal)> {
        s.verdicts.0.get().copied()
    }

    #[test]
    fn heads_are_held_until_whole_and_bodies_pass_at_once() {
        let pipelined: &[&[u8]] = &[
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel",
            b"loGET /b HTTP/1.1\r\nHo",
            b"st: x\r\n\r\nPOST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
        ];
        let (out, s) = scan(pipelined);
        assert_eq!(refusal(&s), None);
        assert_eq!(out[0], b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel");
        assert_eq!(out[1], b"lo", "the next head is held");
        assert_eq!(out.concat(), pipelined.concat(), "everything passes, in order");
        assert_eq!(s.scan.heads, 3);
    }

    #[test]
    fn ambiguous_framing_is_refused_at_its_head() {
        let cases: [(&[u8], Refusal); 4] = [
            (
                b"POST /d HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                Refusal::Ambiguous(WHY[0]),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 4\r\n\r\nabc",
                Refusal::Ambiguous(WHY[1]),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                Refusal::Ambiguous(WHY[2]),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
                Refusal::BadHead("invalid Content-Length"),
            ),
        ];
        for (raw, why) in cases {
            let first = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
            let (out, s) = scan(&[first, raw, b"GET /after HTTP/1.1\r\n\r\n"]);
            assert_eq!(refusal(&s), Some((1, why)), "{:?}", String::from_utf8_lossy(raw));
            assert_eq!(
                out.concat(),
                [&first[..], STAND_IN].concat(),
                "the stand-in replaces the head; the rest is dropped"
            );
        }
    }

    #[test]
    fn heads_hyper_would_refuse_bare_are_refused_with_a_reason() {
        let cases: [(&[u8], Refusal); 5] = [
            (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", Refusal::BadHead("invalid header name")),
            (b"G(T / HTTP/1.1\r\n\r\n", Refusal::BadHead("invalid method")),
            (
                b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                Refusal::BadHead("Transfer-Encoding in an HTTP/1.0 request"),
            ),
            (b"GET http://[::1 HTTP/1.1\r\n\r\n", Refusal::BadHead("invalid request target")),
            (
                b"GET / HTTP/1.1\r\na: 1\r\nb: 1\r\nc: 1\r\nd: 1\r\ne: 1\r\nf: 1\r\ng: 1\r\nh: 1\r\ni: 1\r\nj: 1\r\nk: 1\r\n\r\n",
                Refusal::TooLarge("too many header fields"),
            ),
        ];
        for (raw, why) in cases {
            let (out, s) = scan(&[raw]);
            assert_eq!(refusal(&s), Some((0, why)), "{:?}", String::from_utf8_lossy(raw));
            assert_eq!(out.concat(), STAND_IN);
        }
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n", "v".repeat(600));
        let (out, s) = scan(&[big.as_bytes(), big.as_bytes()[16..].as_ref()]);
        assert!(matches!(refusal(&s), Some((0, Refusal::TooLarge(_)))), "{:?}", refusal(&s));
        assert_eq!(out.concat(), STAND_IN, "refused before the head even ends");
    }

    #[test]
    fn a_head_gets_one_verdict_whether_it_arrives_whole_or_byte_by_byte() {
        let long = format!(
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\nx: {}\r\n\r\n",
            "v".repeat(LIMITS.max_bytes)
        );
        let h2 = [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            &[0u8, 0x10, 0, 0, 0, 0, 0, 0, 1],
            &[0; 0x1000],
        ]
        .concat();
        for stream in [long.as_bytes(), &h2] {
            let whole = scan(&[stream]);
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            let cut = scan(&bytes);
            assert_eq!(
                (whole.0.concat(), refusal(&whole.1)),
                (cut.0.concat(), refusal(&cut.1)),
                "{:?}",
                String::from_utf8_lossy(&stream[..20])
            );
        }
        let (_, s) = scan(&[long.as_bytes()]);
        assert!(
            matches!(refusal(&s), Some((0, Refusal::TooLarge(_)))),
            "size first: {:?}",
            refusal(&s)
        );
        let (out, s) = scan(&[&h2]);
        assert_eq!((out.concat(), refusal(&s)), (h2.clone(), None), "an HTTP/2 read is not a head");
    }

    #[test]
    fn http2_passes_whole_and_a_settings_flood_is_cut_off() {
        let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let settings = [0u8, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
        let ack = [0u8, 0, 0, 0x4, 0x1, 0, 0, 0, 0];
        for _ in 0..MAX_SETTINGS {
            h2.extend_from_slice(&settings);
            h2.extend_from_slice(&ack); // ACKs are the client's answers, not counted
        }
        let (out, s) = scan(&[&h2]);
        assert_eq!((out.concat(), refusal(&s), s.scan.state), (h2.clone(), None, State::H2));
        let flood = [h2.clone(), settings.to_vec(), settings.to_vec()].concat();
        let (out, s) = scan(&[&flood[..30], &flood[30..]]);
        assert_eq!(s.scan.state, State::Flooded);
        assert_eq!(out.concat(), h2, "nothing past the cap reaches hyper");
    }
}

//! Request-smuggling defence for HTTP/1.1: a request whose body framing is ambiguous is refused
//! with 400 and its connection closed.
//!
//! hyper resolves `Content-Length` + `Transfer-Encoding` itself (it drops the length and closes
//! the connection afterwards), which RFC 9112 allows, but it leaves no trace of the dropped
//! header for the handler to refuse the request. So the bytes of each plaintext or decrypted
//! connection are scanned as hyper reads them: every request head is checked, and its body is
//! skipped by its own framing so the next head is found. The scan keeps a few integers of
//! state and the current head line; it stops for HTTP/2 and after an upgrade.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Verdicts on a connection's request heads, by their order on the connection.
#[derive(Default)]
pub struct Verdicts {
    /// Bit `i % 64` set: head `i` was ambiguous (cleared once read).
    ambiguous: AtomicU64,
    /// Why the last ambiguous head was.
    why: AtomicU64,
}

const WHY: [&str; 3] = [
    "both Content-Length and Transfer-Encoding",
    "more than one Content-Length",
    "Transfer-Encoding does not end with chunked",
];

impl Verdicts {
    /// Whether request `index` (0-based on its connection) was ambiguous, and why.
    pub fn take(&self, index: u64) -> Option<&'static str> {
        let bit = 1u64 << (index % 64);
        let was = self.ambiguous.fetch_and(!bit, Relaxed);
        (was & bit != 0).then(|| WHY[self.why.load(Relaxed) as usize % WHY.len()])
    }
}

/// A connection's byte stream, with its request heads checked as they arrive.
pub struct Scanned<T> {
    inner: T,
    scan: Scan,
    verdicts: Arc<Verdicts>,
}

struct Scan {
    state: State,
    /// The header line being read.
    line: Vec<u8>,
    heads: u64,
    content_lengths: u32,
    first_length: Option<u64>,
    lengths_differ: bool,
    transfer_encoding: Option<Vec<u8>>,
    upgrade: bool,
    first_line: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Head,
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers,
    Off,
}

/// Longest line kept; a longer one is hyper's to refuse (431), and scanning stops.
const MAX_LINE: usize = 64 * 1024;

impl<T> Scanned<T> {
    pub fn new(inner: T) -> (Self, Arc<Verdicts>) {
        let verdicts = Arc::new(Verdicts::default());
        let scan = Scan {
            state: State::Head,
            line: Vec::new(),
            heads: 0,
            content_lengths: 0,
            first_length: None,
            lengths_differ: false,
            transfer_encoding: None,
            upgrade: false,
            first_line: true,
        };
        (
            Scanned {
                inner,
                scan,
                verdicts: verdicts.clone(),
            },
            verdicts,
        )
    }
}

impl Scan {
    fn feed(&mut self, mut bytes: &[u8], verdicts: &Verdicts) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Fixed(n) => {
                    let take = (n as usize).min(bytes.len());
                    bytes = &bytes[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 { State::Head } else { State::Fixed(left) };
                }
                State::ChunkData(n) => {
                    let take = (n as usize).min(bytes.len());
                    bytes = &bytes[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 { State::ChunkEnd(2) } else { State::ChunkData(left) };
                }
                State::ChunkEnd(n) => {
                    let take = (n as usize).min(bytes.len());
                    bytes = &bytes[take..];
                    let left = n - take as u8;
                    self.state = if left == 0 { State::ChunkSize } else { State::ChunkEnd(left) };
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let Some(end) = bytes.iter().position(|b| *b == b'\n') else {
                        self.push_line(bytes);
                        return;
                    };
                    self.push_line(&bytes[..end]);
                    bytes = &bytes[end + 1..];
                    if self.state == State::Off {
                        return;
                    }
                    let mut line = std::mem::take(&mut self.line);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    self.line_done(&line, verdicts);
                    line.clear();
                    self.line = line;
                }
            }
        }
    }

    fn push_line(&mut self, bytes: &[u8]) {
        if self.line.len() + bytes.len() > MAX_LINE {
            self.state = State::Off;
            self.line = Vec::new();
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn line_done(&mut self, line: &[u8], verdicts: &Verdicts) {
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
                if line.starts_with(b"PRI * HTTP/2") || line.starts_with(b"CONNECT ") {
                    self.state = State::Off;
                    return;
                }
                self.first_line = false;
            }
            State::Head if line.is_empty() => self.head_done(verdicts),
            State::Head => {
                let Some(colon) = line.iter().position(|b| *b == b':') else {
                    return;
                };
                let name = &line[..colon];
                let value = trim(&line[colon + 1..]);
                if name.eq_ignore_ascii_case(b"content-length") {
                    self.content_lengths += 1;
                    let n = std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok());
                    match (self.first_length, n) {
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

    fn head_done(&mut self, verdicts: &Verdicts) {
        let chunked = self.transfer_encoding.as_deref().map(|te| {
            let last = te.rsplit(|b| *b == b',').next().unwrap_or(b"");
            trim(last).eq_ignore_ascii_case(b"chunked")
        });
        let why = match (self.content_lengths, chunked) {
            (1.., Some(_)) => Some(0),
            (2.., None) if self.lengths_differ || self.content_lengths > 1 => Some(1),
            (_, Some(false)) => Some(2),
            _ => None,
        };
        if let Some(why) = why {
            verdicts.why.store(why, Relaxed);
            verdicts.ambiguous.fetch_or(1u64 << (self.heads % 64), Relaxed);
        }
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

impl<T: AsyncRead + Unpin> AsyncRead for Scanned<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && self.scan.state != State::Off
        {
            let this = &mut *self;
            this.scan.feed(&buf.filled()[before..], &this.verdicts);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Scanned<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts_of(chunks: &[&[u8]]) -> Vec<Option<&'static str>> {
        let (mut s, v) = Scanned::new(());
        for c in chunks {
            s.scan.feed(c, &v);
        }
        (0..s.scan.heads).map(|i| v.take(i)).collect()
    }

    #[test]
    fn finds_every_head_across_bodies_and_reads() {
        let pipelined: &[&[u8]] = &[
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel",
            b"loGET /b HTTP/1.1\r\nHo",
            b"st: x\r\n\r\nPOST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
            b"POST /d HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        ];
        let v = verdicts_of(pipelined);
        assert_eq!(v, [None, None, None, Some(WHY[0])]);
        let v = verdicts_of(&[b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 4\r\n\r\nabc"]);
        assert_eq!(v, [Some(WHY[1])]);
        let v = verdicts_of(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"]);
        assert_eq!(v, [Some(WHY[2])]);
        assert!(
            verdicts_of(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"])
                .is_empty()
        );
    }
}

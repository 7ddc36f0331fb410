//! Writes of an HTTP/2 connection gathered into one system call per turn of its task.
//!
//! The h2 crate writes every DATA frame of more than 256 bytes as its own vectored write (it
//! chains the payload rather than copying it, then must flush before it can take the next
//! frame). A proxy answering sixteen streams on a connection therefore made one `writev` per
//! response where HAProxy made about a tenth of one (issue #15: 2.0 writes a request against
//! 1.13). [`Coalesced`] takes those writes into a buffer and treats a flush as "write soon":
//! it wakes its own task once and writes what was gathered the next time the connection reads
//! (which h2 does on every turn, before it encodes more frames) or shuts down. So every frame
//! the connection encodes in one turn, across all its streams, leaves in one write.
//!
//! Nothing waits on a timer: the delay is one pass of the runtime's queue, in which the tasks
//! already woken (other streams finishing their responses) add their frames to the same write.
//! Bytes are never held past the next turn of the task, and a buffer that reaches
//! [`MAX_GATHERED`] is written at once (the writer waits for the socket like any other).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a connection gathers at most before it writes regardless (a write larger than this
/// goes straight through once the buffer is empty).
pub const MAX_GATHERED: usize = 64 * 1024;

/// The buffer a connection starts gathering into, and keeps between turns: a burst's larger
/// buffer is given back once written, so an idle connection holds at most this much (h2
/// keeps a write buffer of the same size), and a busy one does not grow it again each turn.
const KEPT_CAPACITY: usize = 16 * 1024;

/// The HTTP/2 client preface: a server-side connection that starts with it gathers its writes.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A stream whose writes are gathered while it speaks HTTP/2 (see the module's docs).
pub struct Coalesced<T: AsyncWrite + Unpin> {
    inner: T,
    mode: Mode,
    /// Bytes accepted and not yet written; `out[sent..]` is what remains.
    out: Vec<u8>,
    sent: usize,
    /// The task was woken to write `out` on its next turn.
    woken: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// A server connection not yet known to be HTTP/2: this many bytes of the preface matched.
    Sniffing(usize),
    /// Writes are gathered.
    Gathering,
    /// Writes pass straight through (HTTP/1.1, or anything else).
    Passing,
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// A connection known to speak HTTP/2 (the client side: we chose the protocol).
    pub fn http2(inner: T) -> Self {
        Self::with_mode(inner, Mode::Gathering)
    }

    /// A server connection that gathers its writes once its first bytes are the HTTP/2
    /// preface, and passes them through otherwise (HTTP/1.1 already writes each response in
    /// one call, and an upgraded connection must not wait on a turn of its task).
    pub fn sniffing(inner: T) -> Self {
        Self::with_mode(inner, Mode::Sniffing(0))
    }

    fn with_mode(inner: T, mode: Mode) -> Self {
        Coalesced {
            inner,
            mode,
            out: Vec::new(),
            sent: 0,
            woken: false,
        }
    }

    fn held(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Follows the preface through the bytes just read.
    fn sniff(&mut self, read: &[u8]) {
        let Mode::Sniffing(matched) = self.mode else { return };
        let want = &PREFACE[matched..];
        let n = want.len().min(read.len());
        self.mode = if read[..n] != want[..n] {
            Mode::Passing
        } else if matched + n == PREFACE.len() {
            Mode::Gathering
        } else {
            Mode::Sniffing(matched + n)
        };
    }

    /// Writes everything gathered, then flushes the stream below.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if self.out.capacity() > KEPT_CAPACITY {
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        self.sent = 0;
        self.woken = false;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Takes `bufs` into the buffer, writing what it holds first if they would not fit; a
    /// write too large to gather at all goes straight through once the buffer is empty.
    fn poll_gather(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.held() + len > MAX_GATHERED {
            std::task::ready!(self.poll_drain(cx))?;
            if len > MAX_GATHERED {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            }
        }
        // What a partial write already took goes before more is added, so the buffer holds
        // no more than the bound however the socket takes it.
        if self.sent > 0 {
            self.out.drain(..self.sent);
            self.sent = 0;
        }
        if self.out.capacity() == 0 {
            self.out.reserve(KEPT_CAPACITY.max(len));
        }
        for buf in bufs {
            self.out.extend_from_slice(buf);
        }
        debug_assert!(self.out.len() <= MAX_GATHERED);
        Poll::Ready(Ok(len))
    }
}

impl<T: AsyncWrite + Unpin> Drop for Coalesced<T> {
    /// A connection ended without a shutdown (hyper returns from a few error paths without
    /// one) still gets what it gathered, if the socket takes it now: a last effort, no wait.
    fn drop(&mut self) {
        if self.held() > 0 {
            let _ = self.poll_drain(&mut Context::from_waker(std::task::Waker::noop()));
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A new turn of the connection's task: what the last one gathered leaves now. A
        // socket that takes nothing just now does not stop the read (its readiness wakes
        // the task again, and the peer may be waiting for us to read before it reads).
        if this.held() > 0
            && let Poll::Ready(Err(error)) = this.poll_drain(cx)
        {
            return Poll::Ready(Err(error));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(this.mode, Mode::Sniffing(_)) && buf.filled().len() > before {
            this.sniff(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.mode != Mode::Gathering {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.poll_gather(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.mode != Mode::Gathering {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        this.poll_gather(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // Gathering copies every slice once, so h2 is best told to chain its payloads rather
        // than copy them into its own buffer first. While sniffing, the stream below decides
        // (h2's codec asks once, when the connection starts, after the preface has been read).
        self.mode == Mode::Gathering || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.held() == 0 {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        // Written on the task's next turn; wake it once so that turn comes.
        if !this.woken {
            this.woken = true;
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.held() > 0 {
            std::task::ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::task::{Wake, Waker};

    /// A stream that records each write call and serves reads from a queue (empty: pending).
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        reads: VecDeque<Vec<u8>>,
        /// Writes return `Pending` while set.
        full: bool,
        /// If set, how many more bytes the socket takes before it returns `Pending`.
        budget: Option<usize>,
        /// Calls of `poll_flush` that reached this stream.
        flushes: usize,
        shut: bool,
    }

    impl AsyncRead for Recorder {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            match self.get_mut().reads.pop_front() {
                Some(bytes) => {
                    buf.put_slice(&bytes);
                    Poll::Ready(Ok(()))
                }
                None => Poll::Pending,
            }
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let n = match this.budget {
                Some(budget) => buf.len().min(budget),
                None => buf.len(),
            };
            if this.full || n == 0 {
                return Poll::Pending;
            }
            if let Some(budget) = &mut this.budget {
                *budget -= n;
            }
            this.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    struct Wakes(AtomicUsize);
    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    fn waker() -> (Arc<Wakes>, Waker) {
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        (wakes.clone(), Waker::from(wakes))
    }

    fn read(io: &mut Coalesced<Recorder>, cx: &mut Context<'_>) -> Poll<io::Result<Vec<u8>>> {
        let mut space = [0u8; 256];
        let mut buf = ReadBuf::new(&mut space);
        match Pin::new(io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.filled().to_vec())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Sixteen frames, each written and flushed as h2 does, leave in one write on the next
    /// turn (the next read), in order; the task was woken once for it.
    #[test]
    fn frames_flushed_one_by_one_leave_in_one_write_on_the_next_turn() {
        let (wakes, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::http2(Recorder::default());
        let mut expected = Vec::new();
        for i in 0..16u8 {
            let head = [i; 9];
            let payload = vec![i; 1024];
            let slices = [io::IoSlice::new(&head), io::IoSlice::new(&payload)];
            assert!(matches!(
                Pin::new(&mut io).poll_write_vectored(&mut cx, &slices),
                Poll::Ready(Ok(1033))
            ));
            assert!(matches!(Pin::new(&mut io).poll_flush(&mut cx), Poll::Ready(Ok(()))));
            expected.extend_from_slice(&head);
            expected.extend_from_slice(&payload);
        }
        assert_eq!(io.inner.writes.len(), 0, "nothing written within the turn");
        assert_eq!(wakes.0.load(Relaxed), 1, "woken once for the whole turn");
        assert!(read(&mut io, &mut cx).is_pending());
        assert_eq!(io.inner.writes.len(), 1);
        assert_eq!(io.inner.writes[0], expected);
        assert_eq!(io.out.capacity(), 0, "a burst's 16.5 KiB buffer is given back");
        // Nothing held: a flush now goes straight down and wakes no one.
        assert!(matches!(Pin::new(&mut io).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(wakes.0.load(Relaxed), 1);
        // The next turn gathers again and wakes again.
        assert!(matches!(Pin::new(&mut io).poll_write(&mut cx, b"abc"), Poll::Ready(Ok(3))));
        assert!(matches!(Pin::new(&mut io).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(wakes.0.load(Relaxed), 2);
    }

    /// A socket that takes nothing does not stop the read, and the bytes stay to be written.
    #[test]
    fn a_full_socket_does_not_stop_reads_and_loses_nothing() {
        let (_, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::http2(Recorder {
            full: true,
            reads: VecDeque::from([b"settings".to_vec()]),
            ..Recorder::default()
        });
        assert!(matches!(Pin::new(&mut io).poll_write(&mut cx, b"frame one"), Poll::Ready(Ok(9))));
        let _ = Pin::new(&mut io).poll_flush(&mut cx);
        assert_eq!(read(&mut io, &mut cx).map(|r| r.unwrap()), Poll::Ready(b"settings".to_vec()));
        assert_eq!(io.held(), 9);
        io.inner.full = false;
        assert!(read(&mut io, &mut cx).is_pending());
        assert_eq!(io.inner.writes, vec![b"frame one".to_vec()]);
        assert_eq!(io.held(), 0);
    }

    /// More than `MAX_GATHERED` is written before it is taken (the writer waits for a full
    /// socket); a write larger than the buffer passes straight through.
    #[test]
    fn the_buffer_is_bounded() {
        let (_, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::http2(Recorder::default());
        let frame = vec![7u8; 16 * 1024 + 9];
        for _ in 0..3 {
            assert!(Pin::new(&mut io).poll_write(&mut cx, &frame).is_ready());
        }
        assert_eq!(io.inner.writes.len(), 0);
        assert!(Pin::new(&mut io).poll_write(&mut cx, &frame).is_ready());
        assert_eq!(io.inner.writes.len(), 1, "the three gathered frames left first");
        assert_eq!(io.inner.writes[0].len(), 3 * frame.len());
        assert_eq!(io.held(), frame.len());
        io.inner.full = true;
        assert!(Pin::new(&mut io).poll_write(&mut cx, &frame).is_ready());
        assert!(Pin::new(&mut io).poll_write(&mut cx, &frame).is_ready());
        assert!(
            Pin::new(&mut io).poll_write(&mut cx, &frame).is_pending(),
            "a full buffer on a full socket waits"
        );
        assert!(io.held() <= MAX_GATHERED);
        io.inner.full = false;
        let huge = vec![1u8; MAX_GATHERED + 1];
        assert!(matches!(Pin::new(&mut io).poll_write(&mut cx, &huge), Poll::Ready(Ok(n)) if n == huge.len()));
        assert_eq!(io.inner.writes.len(), 3);
        assert_eq!(io.inner.writes[2].len(), huge.len());
        assert_eq!(io.held(), 0);
    }

    /// A slow reader's socket takes part of what is held on each turn while h2 keeps adding
    /// frames: the buffer stays within its bound, the writer waits once it is full, and every
    /// byte reaches the socket once, in order.
    #[test]
    fn partial_writes_keep_the_bound_and_the_order() {
        let (_, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::http2(Recorder::default());
        let mut accepted = Vec::new();
        let mut waited = 0;
        for turn in 0..200u32 {
            // The socket frees 5 KiB a turn; h2 offers 20 KiB of 1 KiB frames a turn.
            io.inner.budget = Some(5 * 1024);
            assert!(read(&mut io, &mut cx).is_pending());
            for frame in 0..20u32 {
                let bytes = vec![(turn * 20 + frame) as u8; 1024];
                match Pin::new(&mut io).poll_write(&mut cx, &bytes) {
                    Poll::Ready(Ok(n)) => accepted.extend_from_slice(&bytes[..n]),
                    Poll::Pending => {
                        waited += 1;
                        break;
                    }
                    Poll::Ready(Err(e)) => panic!("{e}"),
                }
                assert!(io.out.len() <= MAX_GATHERED, "turn {turn}: {} bytes buffered", io.out.len());
                let _ = Pin::new(&mut io).poll_flush(&mut cx);
            }
        }
        assert!(
            waited > 150,
            "a full buffer on a slow socket makes the writer wait ({waited} turns)"
        );
        io.inner.budget = None;
        assert!(read(&mut io, &mut cx).is_pending());
        assert_eq!(io.held(), 0);
        assert_eq!(io.inner.writes.concat(), accepted, "every byte once, in order");
        assert!(accepted.len() >= 200 * 5 * 1024);
    }

    /// A flush with nothing held, and the end of every drain, reach the stream below (TLS
    /// needs them); a flush with bytes held does not.
    #[test]
    fn flushes_reach_the_stream_below_when_nothing_is_held() {
        let (_, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::http2(Recorder::default());
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(io.inner.flushes, 1);
        assert!(Pin::new(&mut io).poll_write(&mut cx, b"frame").is_ready());
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(io.inner.flushes, 1, "held: not flushed yet");
        assert!(read(&mut io, &mut cx).is_pending());
        assert_eq!(io.inner.flushes, 2, "the drain ends with a flush below");
    }

    /// A connection dropped without a shutdown still hands what it held to the socket.
    #[test]
    fn a_dropped_connection_writes_what_it_held_if_it_can() {
        let (_, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        // The stream goes with the adapter, so this one writes into a buffer kept outside.
        let writes = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        struct Shared(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);
        impl AsyncWrite for Shared {
            fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                self.0.borrow_mut().extend_from_slice(buf);
                Poll::Ready(Ok(buf.len()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let mut shared = Coalesced::http2(Shared(writes.clone()));
        assert!(Pin::new(&mut shared).poll_write(&mut cx, b"goaway").is_ready());
        let _ = Pin::new(&mut shared).poll_flush(&mut cx);
        assert!(writes.borrow().is_empty());
        drop(shared);
        assert_eq!(*writes.borrow(), b"goaway");
    }

    /// Shutting down writes what is held first.
    #[test]
    fn shutdown_writes_what_is_held() {
        let (_, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::http2(Recorder::default());
        assert!(Pin::new(&mut io).poll_write(&mut cx, b"goaway").is_ready());
        let _ = Pin::new(&mut io).poll_flush(&mut cx);
        assert!(matches!(Pin::new(&mut io).poll_shutdown(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(io.inner.writes, vec![b"goaway".to_vec()]);
        assert!(io.inner.shut);
    }

    /// A server connection gathers once the whole preface has come, in however many reads;
    /// HTTP/1.1 (or a preface that goes wrong part way) passes writes straight through.
    #[test]
    fn a_server_connection_gathers_only_after_the_http2_preface() {
        let (_, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut h2 = Coalesced::sniffing(Recorder {
            reads: VecDeque::from([
                PREFACE[..5].to_vec(),
                PREFACE[5..20].to_vec(),
                [&PREFACE[20..], b"\0\0\0\x04"].concat(),
            ]),
            ..Recorder::default()
        });
        for _ in 0..2 {
            assert!(read(&mut h2, &mut cx).is_ready());
            assert!(!(h2.mode == Mode::Gathering));
        }
        assert!(read(&mut h2, &mut cx).is_ready());
        assert!((h2.mode == Mode::Gathering));
        assert!(h2.is_write_vectored());

        for first in [b"GET / HTTP/1.1\r\n".to_vec(), b"PRI * HTTP/1.1\r\n".to_vec()] {
            let mut h1 = Coalesced::sniffing(Recorder {
                reads: VecDeque::from([first]),
                ..Recorder::default()
            });
            assert!(read(&mut h1, &mut cx).is_ready());
            assert!(!(h1.mode == Mode::Gathering));
            assert!(Pin::new(&mut h1).poll_write(&mut cx, b"HTTP/1.1 200 OK\r\n").is_ready());
            assert_eq!(h1.inner.writes.len(), 1, "written at once");
        }
    }
}

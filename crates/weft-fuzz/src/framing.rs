//! The HTTP/1.1 framing scanner ([`weft_core::framing::Scanned`]): request heads and bodies as
//! they arrive, in reads of any size.
//!
//! Property: what the scanner decides (each head's verdict, and the exact bytes hyper gets) is a
//! function of the byte stream alone. A request smuggler controls TCP segmentation, so neither
//! how the connection delivers the bytes (the inner reads) nor how hyper asks for them (the
//! caller's reads) may change it. The input's first byte seeds both cuts; the rest is the
//! connection's byte stream. The oracle is the whole stream delivered and read in one read.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, ReadBuf};
use weft_core::framing::{HeadLimits, Refusal, Scanned};

/// Verdicts are kept per request index modulo 64; every one is compared.
const HEADS: u64 = 64;
/// Small head limits, so that inputs of a few hundred bytes reach the too-large refusals.
const LIMITS: HeadLimits = HeadLimits {
    max_headers: 16,
    max_bytes: 1024,
};

/// What the scanner made of a stream: the verdict on each head, and the bytes hyper got.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdicts: Vec<Option<Refusal>>,
    pub passed: Vec<u8>,
}

pub fn run(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else { return };
    let whole = outcome(stream, whole(stream), whole(stream));
    let cut = outcome(stream, read_sizes(seed), read_sizes(seed.rotate_left(4) ^ 0x5a));
    assert!(
        whole == cut,
        "the outcome changed when the same bytes arrived in other reads (seed {seed}): {}",
        difference(&whole, &cut)
    );
}

/// One read of the whole stream, for ever.
pub fn whole(stream: &[u8]) -> impl Iterator<Item = usize> + Clone {
    std::iter::repeat(stream.len().max(1))
}

/// What the scanner makes of `stream` when the connection delivers it in reads of `delivered`
/// and hyper reads it in reads of `read`.
pub fn outcome(stream: &[u8], read: impl Iterator<Item = usize>, delivered: impl Iterator<Item = usize> + Unpin) -> Outcome {
    let inner = Cut {
        rest: stream,
        sizes: delivered,
    };
    let (mut scanned, verdicts) = Scanned::new(inner, LIMITS);
    let mut cx = Context::from_waker(Waker::noop());
    let mut storage = vec![0u8; stream.len().max(1)];
    let mut passed = Vec::new();
    for size in read {
        let mut buf = ReadBuf::new(&mut storage[..size.clamp(1, stream.len().max(1))]);
        match Pin::new(&mut scanned).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
            Poll::Ready(Ok(())) => passed.extend_from_slice(buf.filled()),
            other => panic!("reading a byte slice gave {other:?}"),
        }
    }
    Outcome {
        verdicts: (0..HEADS).map(|i| verdicts.take(i)).collect(),
        passed,
    }
}

/// Where two outcomes first differ, for the failure message.
pub fn difference(a: &Outcome, b: &Outcome) -> String {
    if a.verdicts != b.verdicts {
        let i = a.verdicts.iter().zip(&b.verdicts).position(|(x, y)| x != y).unwrap_or(0);
        return format!("head {i}: {:?} vs {:?}", a.verdicts[i], b.verdicts[i]);
    }
    let at = a.passed.iter().zip(&b.passed).position(|(x, y)| x != y);
    format!(
        "passed {} vs {} bytes, first differing at {:?}",
        a.passed.len(),
        b.passed.len(),
        at.unwrap_or(a.passed.len().min(b.passed.len()))
    )
}

/// A connection that delivers its bytes in reads of the given sizes, as TCP segments may.
struct Cut<'a, S> {
    rest: &'a [u8],
    sizes: S,
}

impl<S: Iterator<Item = usize> + Unpin> AsyncRead for Cut<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let size = self.sizes.next().unwrap_or(usize::MAX).max(1);
        let n = size.min(buf.remaining()).min(self.rest.len());
        let (now, later) = self.rest.split_at(n);
        buf.put_slice(now);
        self.rest = later;
        Poll::Ready(Ok(()))
    }
}

/// Read sizes from 1 to 32 bytes, a small xorshift sequence from `seed`.
pub fn read_sizes(seed: u8) -> impl Iterator<Item = usize> + Clone {
    let mut x = u32::from(seed) | 0x100;
    std::iter::from_fn(move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        Some((x % 32) as usize + 1)
    })
}

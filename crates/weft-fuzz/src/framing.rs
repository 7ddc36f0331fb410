//! The HTTP/1.1 framing scanner ([`weft_core::framing::Scanned`]): request heads and bodies as
//! they arrive, in reads of any size.
//!
//! Property: the verdicts do not depend on how the bytes were cut into reads. The input's first
//! byte seeds the cut; the rest is the connection's byte stream.

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

pub fn run(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else { return };
    let whole = verdicts(stream, std::iter::repeat(stream.len().max(1)));
    let cut = verdicts(stream, read_sizes(seed));
    assert_eq!(
        whole, cut,
        "the verdicts changed when the same bytes arrived in other reads (seed {seed})"
    );
}

/// The verdict on each request head of `stream`, read through the scanner in reads of `sizes`.
pub fn verdicts(stream: &[u8], sizes: impl Iterator<Item = usize>) -> Vec<Option<Refusal>> {
    let (mut scanned, verdicts) = Scanned::new(stream, LIMITS);
    let mut cx = Context::from_waker(Waker::noop());
    let mut storage = vec![0u8; stream.len().max(1)];
    for size in sizes {
        let mut buf = ReadBuf::new(&mut storage[..size.clamp(1, stream.len().max(1))]);
        match Pin::new(&mut scanned).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
            Poll::Ready(Ok(())) => {}
            other => panic!("reading a byte slice gave {other:?}"),
        }
    }
    (0..HEADS).map(|i| verdicts.take(i)).collect()
}

/// Read sizes from 1 to 32 bytes, a small xorshift sequence from `seed`.
pub fn read_sizes(seed: u8) -> impl Iterator<Item = usize> {
    let mut x = u32::from(seed) | 0x100;
    std::iter::from_fn(move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        Some((x % 32) as usize + 1)
    })
}

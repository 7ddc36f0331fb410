//! The protobuf codec of weft's gRPC services: prost messages with small, exactly grown buffers.
//!
//! Every control stream keeps one encode and one decode buffer for its whole life, and a control
//! plane holds one stream per proxy. tonic's default codec starts both at 8 KiB and grows the
//! encode buffer by doubling as prost writes a message field by field, so one 8.8 KB config left
//! each stream holding 16 KiB to encode and 8 KiB to decode for ever (heaptrack of a control
//! plane with 2,000 proxies: 28 KB of its 93 KB per proxy). Here both start at 1 KiB and the
//! encoder reserves a message's whole length before writing it, so a buffer grows in one step
//! to fit a message instead of doubling field by field. (Once a message is handed off, the
//! `bytes` crate may still grow a reclaimed buffer to twice its capacity, so a stream's buffer
//! can reach about twice its largest message.)

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// The first size of a stream's encode and decode buffers.
const BUFFER: usize = 1024;
/// Each encoded message is handed to the transport on its own (tonic's default gathers up to
/// 32 KiB), so the encode buffer holds one message, not every message that was ready at once.
const YIELD_AT: usize = 1;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER, YIELD_AT)
}

/// Encodes `T` and decodes `U` (the generated services name it through `codec_path`).
pub struct Lean<T, U>(PhantomData<fn(T) -> U>);

impl<T, U> Default for Lean<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for Lean<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = LeanEncoder<T>;
    type Decoder = LeanDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        LeanEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        LeanDecoder(PhantomData)
    }
}

/// Writes one message after reserving its whole encoded length.
pub struct LeanEncoder<T>(PhantomData<fn(T)>);

impl<T: Message> Encoder for LeanEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // The room is made here, so prost's own length check (a second walk of the message)
        // is skipped.
        dst.reserve(item.encoded_len());
        item.encode_raw(dst);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}

/// Reads one message; a malformed one is the caller's error.
pub struct LeanDecoder<U>(PhantomData<fn() -> U>);

impl<U: Message + Default> Decoder for LeanDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}

//! Protobuf from proxies, as the control plane receives it: a `Connect` stream's messages
//! (length-delimited `ProxyMessage`s), decoded with prost and applied as the stream's task
//! applies them — admission of the Register's token, registration, then each later message —
//! and then read back through every view the API serves from them (status, routes, proxies) and
//! the config the proxy would be pushed; all of it inside the control plane, through
//! [`weft_control::fuzz::proxy_message`].
//!
//! The stream must open with a Register, as on the wire. Admission's verdict is computed but
//! the registration goes ahead whatever it says (as for a proxy admitted by its certificate), so
//! mutated tokens do not hide the rest of the stream from the fuzzer.

use prost::Message;
use weft_api::proto::ProxyMessage;

pub fn run(data: &[u8]) {
    weft_control::fuzz::proxy_message(data);
}

/// `messages` as one stream's bytes: what [`run`] reads (for the seeds).
pub fn encode(messages: &[ProxyMessage]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        m.encode_length_delimited(&mut out).expect("a Vec grows");
    }
    out
}

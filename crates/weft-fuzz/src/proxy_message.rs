//! Protobuf from proxies, as the control plane receives it: a `Connect` stream's messages
//! (length-delimited `ProxyMessage`s), decoded with prost and applied as the stream's task
//! applies them — admission of the Register's token, [`Mesh::register`], then
//! [`distribution::receive`] for each later message — and then read back through every view the
//! API serves from them (status, routes, proxies) and the config the proxy would be pushed.
//!
//! The stream must open with a Register, as on the wire. Admission's verdict is computed but
//! the registration goes ahead whatever it says (as for a proxy admitted by its certificate), so
//! mutated tokens do not hide the rest of the stream from the fuzzer.

use crate::fixture;
use prost::Message;
use weft_api::proto::{ProxyMessage, proxy_message::Msg};
use weft_control::distribution;

pub fn run(data: &[u8]) {
    let Some(messages) = decode(data) else { return };
    let mut messages = messages.into_iter();
    let Some(Msg::Register(register)) = messages.next().and_then(|m| m.msg) else {
        return;
    };
    let mesh = fixture::mesh();
    let identity = match mesh.admit(None, &register.namespace, &register.name, &register.token) {
        Ok(admitted) => admitted.identity,
        Err(_) => mesh.ca.identity(&register.namespace, &register.name),
    };
    let Ok((conn, _id)) = mesh.register(&register, identity) else {
        return;
    };
    for msg in messages.filter_map(|m| m.msg) {
        if distribution::receive(&mesh, conn, msg).is_err() {
            break;
        }
    }
    mesh.status();
    mesh.routes();
    mesh.proxies();
    mesh.config_for(conn);
    mesh.unregister(conn);
}

/// Every length-delimited message of `data`; `None` unless all of it decodes.
pub fn decode(mut data: &[u8]) -> Option<Vec<ProxyMessage>> {
    let mut messages = Vec::new();
    while !data.is_empty() {
        messages.push(ProxyMessage::decode_length_delimited(&mut data).ok()?);
    }
    Some(messages)
}

/// `messages` as one stream's bytes: what [`run`] reads.
pub fn encode(messages: &[ProxyMessage]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        m.encode_length_delimited(&mut out).expect("a Vec grows");
    }
    out
}

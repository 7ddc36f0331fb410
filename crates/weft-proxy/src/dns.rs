//! The sidecar's DNS (`weft run --intercept`): the namespace's queries to port 53 are redirected
//! here. A name in one of the mesh forms ([`crate::host`]) of a service the control plane knows
//! is answered with the service's virtual IP (A; an empty answer for AAAA and other types, so
//! resolvers do not wait); every other name goes to the upstream resolver of the namespace's
//! `/etc/resolv.conf`, read at start, and its answer comes back as is.
//!
//! Only what a stub resolver sends is understood: one question, no compression in it.

use crate::discovery::Missing;
use crate::state::Proxy;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use weft_core::Shutdown;

/// Seconds a resolver may cache a mesh answer: a virtual IP never changes for a name.
const TTL: u32 = 30;
/// How long an upstream resolver gets.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const RCODE_SERVFAIL: u8 = 2;

/// A parsed query: its id, the name asked, its type and class, and where the question ends.
struct Query<'a> {
    packet: &'a [u8],
    name: String,
    qtype: u16,
    qclass: u16,
    end: usize,
}

/// Serves DNS on `sockets` (UDP and TCP) until `shutdown`.
pub async fn serve(proxy: Arc<Proxy>, sockets: (UdpSocket, TcpListener), shutdown: Shutdown) {
    let upstream = upstream_resolver(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
    tracing::info!(udp = ?sockets.0.local_addr().ok(), ?upstream, "mesh DNS listening");
    let (udp, tcp) = (Arc::new(sockets.0), sockets.1);
    let mut buf = vec![0u8; 1500];
    loop {
        tokio::select! {
            got = udp.recv_from(&mut buf) => {
                let Ok((n, from)) = got else { continue };
                let (proxy, udp, packet) = (proxy.clone(), udp.clone(), buf[..n].to_vec());
                tokio::spawn(async move {
                    if let Some(answer) = answer(&proxy, &packet, upstream, false).await {
                        let _ = udp.send_to(&answer, from).await;
                    }
                });
            }
            accepted = tcp.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve_tcp(proxy.clone(), stream, upstream));
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// DNS over TCP: length-prefixed messages, one answer per query, until the client closes.
async fn serve_tcp(proxy: Arc<Proxy>, mut stream: TcpStream, upstream: Option<SocketAddr>) {
    loop {
        let Ok(len) = stream.read_u16().await else { return };
        let mut packet = vec![0u8; len as usize];
        if stream.read_exact(&mut packet).await.is_err() {
            return;
        }
        let Some(answer) = answer(&proxy, &packet, upstream, true).await else {
            return;
        };
        let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
        framed.extend(answer);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// The answer to one query packet; `None` for a packet that is not a query.
async fn answer(proxy: &Proxy, packet: &[u8], upstream: Option<SocketAddr>, tcp: bool) -> Option<Vec<u8>> {
    let query = parse(packet)?;
    if let Some(ip) = mesh_address(proxy, &query).await {
        return Some(reply(&query, ip));
    }
    match upstream {
        Some(server) => match forward(packet, server, tcp).await {
            Ok(answer) => Some(answer),
            Err(error) => {
                tracing::debug!(name = %query.name, %server, %error, "upstream resolver failed");
                Some(failure(&query, RCODE_SERVFAIL))
            }
        },
        None => Some(failure(&query, RCODE_SERVFAIL)),
    }
}

/// `Some(Some(ip))`: a mesh name with that virtual IP; `Some(None)`: a mesh name, but the query
/// asks for another type than A (answered empty); `None`: not a mesh name.
async fn mesh_address(proxy: &Proxy, query: &Query<'_>) -> Option<Option<Ipv4Addr>> {
    if query.qclass != CLASS_IN {
        return None;
    }
    let service = proxy.discovery.resolve(&query.name, &proxy.identity).ok()?;
    let ip = match proxy.discovery.service(&service).await {
        Ok(rt) => rt.config.virtual_ip?,
        Err(Missing::Unknown | Missing::NoAnswer) => return None,
    };
    Some((query.qtype == TYPE_A).then_some(ip))
}

/// Reads the header and the one question of a standard query.
fn parse(packet: &[u8]) -> Option<Query<'_>> {
    let header = packet.get(..12)?;
    let is_query = header[2] & 0x80 == 0 && (header[2] >> 3) & 0x0f == 0;
    let questions = u16::from_be_bytes([header[4], header[5]]);
    if !is_query || questions != 1 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *packet.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // a compression pointer or a reserved type: not in a question
        }
        labels.push(std::str::from_utf8(packet.get(at..at + len)?).ok()?.to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]);
    let qclass = u16::from_be_bytes([*packet.get(at + 2)?, *packet.get(at + 3)?]);
    Some(Query {
        packet,
        name: labels.join("."),
        qtype,
        qclass,
        end: at + 4,
    })
}

/// The header of an answer to `query`: its id, QR and AA set, RD copied, RA set, `rcode`.
fn header(query: &Query, rcode: u8, answers: u16) -> Vec<u8> {
    let p = query.packet;
    let mut out = vec![p[0], p[1], 0x84 | (p[2] & 0x01), 0x80 | rcode, 0, 1];
    out.extend(answers.to_be_bytes());
    out.extend([0, 0, 0, 0]);
    out.extend(&p[12..query.end]);
    out
}

/// A mesh answer: one A record (a pointer to the question's name), or none (NODATA).
fn reply(query: &Query, ip: Option<Ipv4Addr>) -> Vec<u8> {
    let mut out = header(query, 0, u16::from(ip.is_some()));
    if let Some(ip) = ip {
        out.extend([0xc0, 12]); // the name at offset 12, the question's
        out.extend(TYPE_A.to_be_bytes());
        out.extend(CLASS_IN.to_be_bytes());
        out.extend(TTL.to_be_bytes());
        out.extend(4u16.to_be_bytes());
        out.extend(ip.octets());
    }
    out
}

fn failure(query: &Query, rcode: u8) -> Vec<u8> {
    header(query, rcode, 0)
}

/// Sends `packet` to `server` and returns its answer.
async fn forward(packet: &[u8], server: SocketAddr, tcp: bool) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        if tcp {
            let mut stream = TcpStream::connect(server).await?;
            let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(packet);
            stream.write_all(&framed).await?;
            let len = stream.read_u16().await?;
            let mut answer = vec![0u8; len as usize];
            stream.read_exact(&mut answer).await?;
            return Ok(answer);
        }
        let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(server).await?;
        socket.send(packet).await?;
        let mut answer = vec![0u8; 4096];
        loop {
            let n = socket.recv(&mut answer).await?;
            if n >= 2 && answer[..2] == packet[..2] {
                answer.truncate(n);
                return Ok(answer);
            }
        }
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer")))
}

/// The first `nameserver` of a resolv.conf, on port 53.
fn upstream_resolver(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut p = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            p.push(label.len() as u8);
            p.extend(label.as_bytes());
        }
        p.push(0);
        p.extend(qtype.to_be_bytes());
        p.extend(CLASS_IN.to_be_bytes());
        p
    }

    #[test]
    fn a_mesh_answer_carries_the_virtual_ip() {
        let packet = query("Orders-API.default", TYPE_A);
        let q = parse(&packet).expect("a query");
        assert_eq!(q.name, "orders-api.default");
        let answer = reply(&q, Some(Ipv4Addr::new(240, 240, 1, 2)));
        assert_eq!(&answer[..2], &[0xab, 0xcd], "same id");
        assert_eq!(answer[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([answer[6], answer[7]]), 1, "one answer");
        assert_eq!(&answer[answer.len() - 4..], &[240, 240, 1, 2]);
        let empty = reply(&parse(&query("orders-api", 28)).unwrap(), None);
        assert_eq!(u16::from_be_bytes([empty[6], empty[7]]), 0, "AAAA: no data");
    }

    #[test]
    fn the_upstream_is_the_first_nameserver() {
        let conf = "# generated\nsearch example\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(upstream_resolver(conf), Some("10.0.0.2:53".parse().unwrap()));
        assert_eq!(upstream_resolver(""), None);
        assert!(parse(&[0u8; 5]).is_none());
    }
}

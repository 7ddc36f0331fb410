//! Protocol detection on an intercepted connection: which protocol the app speaks, from the
//! first bytes it sends, read with `peek` so nothing is consumed. A client that sends nothing
//! within [`BOUND`] (a server-speaks-first protocol on a port nobody declared opaque) is treated
//! as opaque TCP; declared-opaque ports never come here, so they never wait.

use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// How long detection waits for the app's first bytes. Client-first protocols send at once (a
/// few µs to a few ms after connecting, measured), so the bound only matters for a client that
/// waits for the server: such ports should be declared opaque. 1 s rather than Istio's former
/// 100 ms: on a loaded machine (load average 18 on 2 cores) curl sent its TLS hello 103 ms
/// after connecting and had it taken for opaque bytes; an HTTP client descheduled as long
/// would have lost its policy the same way. Linkerd waits 10 s.
pub const BOUND: Duration = Duration::from_secs(1);

/// What the first bytes say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (the connection preface).
    H2,
    /// A TLS ClientHello, with the server name it asks for, if any.
    Tls {
        sni: Option<String>,
    },
    /// Anything else, or nothing within the bound.
    Opaque,
}

/// HTTP/2's connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The methods an HTTP/1.1 request line may start with, each followed by a space.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Peeks at `tcp` until its first bytes decide the protocol, or [`BOUND`] has passed; returns the
/// protocol and how long that took.
pub async fn detect(tcp: &TcpStream) -> (Protocol, Duration) {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let mut seen = 0;
    loop {
        let left = BOUND.saturating_sub(start.elapsed());
        let Ok(Ok(n)) = tokio::time::timeout(left, tcp.peek(&mut buf)).await else {
            return (Protocol::Opaque, start.elapsed());
        };
        if n == 0 {
            return (Protocol::Opaque, start.elapsed());
        }
        if let Some(p) = classify(&buf[..n]) {
            return (p, start.elapsed());
        }
        if n == seen || n == buf.len() {
            // No new bytes since the last look (peek returns at once while data waits): give
            // the app a moment to send the rest of its first segment.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen = n;
        if start.elapsed() >= BOUND {
            return (Protocol::Opaque, start.elapsed());
        }
    }
}

/// The protocol `bytes` begin, or `None` while they are still a prefix of more than one answer.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    if bytes.len() >= H2_PREFACE.len() && bytes.starts_with(H2_PREFACE) {
        return Some(Protocol::H2);
    }
    if METHODS.iter().any(|m| bytes.starts_with(m)) && !bytes.starts_with(b"PRI ") {
        return Some(Protocol::Http1);
    }
    if bytes.len() >= 3 && bytes[0] == 0x16 && bytes[1] == 0x03 {
        return match client_hello_sni(bytes) {
            Hello::Complete(sni) => Some(Protocol::Tls { sni }),
            Hello::Partial => None,
        };
    }
    let prefix_of = |candidate: &[u8]| candidate.starts_with(&bytes[..bytes.len().min(candidate.len())]);
    let undecided = prefix_of(H2_PREFACE) || METHODS.iter().any(|m| prefix_of(m)) || (bytes.len() < 3 && bytes[0] == 0x16);
    (!undecided).then_some(Protocol::Opaque)
}

enum Hello {
    Complete(Option<String>),
    Partial,
}

/// The server name of a TLS ClientHello record (RFC 8446 §4.1.2, RFC 6066 §3). A hello that is
/// not all here yet is `Partial`; one that is malformed has no name.
fn client_hello_sni(record: &[u8]) -> Hello {
    let Some(body) = record.get(5..) else { return Hello::Partial };
    let len = u16::from_be_bytes([record[3], record[4]]) as usize;
    if body.len() < len {
        return Hello::Partial;
    }
    Hello::Complete(sni_of(&body[..len]))
}

fn sni_of(hs: &[u8]) -> Option<String> {
    let mut r = Reader(hs);
    (r.u8()? == 1).then_some(())?; // ClientHello
    r.skip(3 + 2 + 32)?; // length, version, random
    let session = r.u8()? as usize;
    r.skip(session)?;
    let suites = r.u16()? as usize;
    r.skip(suites)?;
    let compression = r.u8()? as usize;
    r.skip(compression)?;
    let len = r.u16()? as usize;
    let mut exts = Reader(r.take(len)?);
    while let (Some(kind), Some(len)) = (exts.u16(), exts.u16()) {
        let data = exts.take(len as usize)?;
        if kind == 0 {
            let mut names = Reader(data);
            names.u16()?;
            (names.u8()? == 0).then_some(())?; // host_name
            let len = names.u16()? as usize;
            let name = names.take(len)?;
            return String::from_utf8(name.to_vec()).ok();
        }
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_decide_the_protocol() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::H2));
        assert_eq!(classify(b"PRI * HTTP/2"), None, "a prefix of the preface waits");
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Protocol::Opaque), "redis");
        assert_eq!(classify(b"\x00\x00\x00"), Some(Protocol::Opaque));
    }

    #[test]
    fn a_client_hello_gives_its_server_name() {
        // A minimal ClientHello with one extension: server_name "db.example".
        let name = b"db.example";
        let mut sni = vec![0, 0]; // type 0 (server_name)
        let list_len = (3 + name.len()) as u16;
        sni.extend((list_len + 2).to_be_bytes());
        sni.extend(list_len.to_be_bytes());
        sni.push(0);
        sni.extend((name.len() as u16).to_be_bytes());
        sni.extend(name);
        let mut hello = vec![3, 3];
        hello.extend([7u8; 32]);
        hello.push(0); // session id
        hello.extend([0, 2, 0x13, 0x01]); // one suite
        hello.extend([1, 0]); // null compression
        hello.extend((sni.len() as u16).to_be_bytes());
        hello.extend(&sni);
        let mut hs = vec![1];
        hs.extend(&(hello.len() as u32).to_be_bytes()[1..]);
        hs.extend(&hello);
        let mut record = vec![0x16, 3, 1];
        record.extend((hs.len() as u16).to_be_bytes());
        record.extend(&hs);
        assert_eq!(
            classify(&record),
            Some(Protocol::Tls {
                sni: Some("db.example".into())
            })
        );
        assert_eq!(classify(&record[..20]), None, "half a hello waits for the rest");
    }
}

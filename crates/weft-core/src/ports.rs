//! Loopback ports for processes another process will start: `weft up`'s demo and the tests.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where the search starts: below it are the well-known and commonly configured ports.
const FIRST: u32 = 10_000;

/// A port on 127.0.0.1 that binds right now, for a child process to bind next.
///
/// A port the kernel picks for `127.0.0.1:0` comes from the ephemeral range, which it also
/// draws from for the local end of every outgoing connection: between this probe and the child
/// binding it, a connection could take it ("cannot bind the admin listener ... Address already
/// in use" failed a test run). So ports come from below the ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), which the kernel hands none out of, each at most
/// once per process (from a start that differs between processes), and only if it binds now.
/// Where that range starts too low to leave room, the kernel's own pick.
pub fn loopback() -> std::io::Result<SocketAddr> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = ephemeral_start().saturating_sub(FIRST);
    if span < 1_000 {
        return TcpListener::bind("127.0.0.1:0")?.local_addr();
    }
    let start = (mix(std::process::id() as u64) % span as u64) as u32;
    for _ in 0..span {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if let Ok(probe) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return probe.local_addr();
        }
    }
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Where the kernel's ephemeral range starts (read once per process; Linux's default if it
/// cannot be read).
fn ephemeral_start() -> u32 {
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *START.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768)
    })
}

/// SplitMix64's finaliser: pids that differ by little start far apart (a plain multiple put
/// pids 23 apart 7 ports apart).
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_below_the_ephemeral_range_each_once_and_bind() {
        let low = ephemeral_start();
        let ports: Vec<u16> = (0..300).map(|_| loopback().unwrap().port()).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), 300, "{ports:?}");
        assert!(ports.iter().all(|&p| (FIRST..low).contains(&(p as u32))), "{ports:?} against {low}");
        // Each was free when handed out: bound here it holds.
        let held: Vec<TcpListener> = ports[..20].iter().map(|&p| TcpListener::bind(("127.0.0.1", p)).unwrap()).collect();
        assert_eq!(held.len(), 20);
    }
}

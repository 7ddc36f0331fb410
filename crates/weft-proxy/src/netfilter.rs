//! The redirect rules of `weft run --intercept`, as one nftables table.
//!
//! nftables rather than iptables: a table is replaced in one atomic transaction (`nft -f`:
//! declare, delete, define), so installing twice leaves one copy and a half-installed rule set
//! never exists; and removal is one command (`nft delete table ip weft-intercept`) that cannot
//! miss a rule or touch anyone else's. The rules live in the workload's network namespace.
//!
//! IPv6 is not redirected (the listeners and `SO_ORIGINAL_DST` here are IPv4's); it is refused
//! instead, in a second table of the same name in the `ip6` family, so that no IPv6 address of
//! the namespace becomes a way around the sidecar: outbound TCP and DNS from the app are
//! rejected (a client trying IPv6 first falls back to IPv4 at once), and so is inbound TCP to
//! anything but the sidecar's own ports and `--skip-inbound-ports`.
//!
//! The sidecar's own sockets are told apart by group: `weft run` runs as group [`PROXY_GID`] and
//! starts the app with its original group, and the rules let that group's traffic through
//! untouched (what Istio does with its proxy's uid 1337, here with the gid so the app may keep
//! running as root).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};

/// The group the sidecar runs as under interception.
pub const PROXY_GID: u32 = 1337;
/// The table's name; also how `weft run` finds it to remove it.
pub const TABLE: &str = "weft-intercept";

/// What to redirect where.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// The intercepted-outbound listener's port (on loopback).
    pub outbound_port: u16,
    /// The DNS listener's port (on loopback).
    pub dns_port: u16,
    /// The inbound listener's port.
    pub inbound_port: u16,
    /// Ports of the sidecar's own that callers dial directly (the inbound listener's, the
    /// admin's): never redirected. Inbound TCP to every other port goes to the inbound
    /// listener, which reads the port the caller dialled (`SO_ORIGINAL_DST`) and serves the app
    /// there.
    pub sidecar_ports: Vec<u16>,
    pub skip_inbound_ports: Vec<u16>,
    pub skip_outbound_ports: Vec<u16>,
    /// Destinations (`ADDR/PREFIX`) reached directly, never through the sidecar.
    pub skip_cidrs: Vec<(Ipv4Addr, u8)>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run nft (install nftables): {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the {TABLE} table (interception needs root, or CAP_NET_ADMIN in the network namespace): {0}")]
    Refused(String),
}

impl Rules {
    /// The ruleset, as `nft -f` reads it: declaring the table first and deleting it makes the
    /// load replace any earlier copy in the same transaction.
    pub fn ruleset(&self) -> String {
        let mut output = vec![
            format!("meta skgid {PROXY_GID} return"),
            // Every DNS query, wherever it was sent, to the sidecar's DNS.
            format!("udp dport 53 redirect to :{}", self.dns_port),
            format!("tcp dport 53 redirect to :{}", self.dns_port),
            "ip daddr 127.0.0.0/8 return".into(),
        ];
        if !self.skip_cidrs.is_empty() {
            let cidrs: Vec<String> = self.skip_cidrs.iter().map(|(ip, len)| format!("{ip}/{len}")).collect();
            output.push(format!("ip daddr {{ {} }} return", cidrs.join(", ")));
        }
        if !self.skip_outbound_ports.is_empty() {
            output.push(format!("tcp dport {{ {} }} return", set(&self.skip_outbound_ports)));
        }
        // Counted, so `nft list table ip weft-intercept` shows how much went through the sidecar.
        output.push(format!("meta l4proto tcp counter redirect to :{}", self.outbound_port));
        let mut direct = self.sidecar_ports.clone();
        direct.extend(&self.skip_inbound_ports);
        let mut prerouting = Vec::new();
        if !direct.is_empty() {
            prerouting.push(format!("tcp dport {{ {} }} return", set(&direct)));
        }
        prerouting.push(format!("meta l4proto tcp counter redirect to :{}", self.inbound_port));
        let nat = |name: &str, hook: &str, rules: &[String]| chain(name, &format!("nat hook {hook} priority -100"), rules);
        let filter = |name: &str, hook: &str, rules: &[String]| chain(name, &format!("filter hook {hook} priority 0"), rules);
        format!(
            "table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n{}{}}}\n\
             table ip6 {TABLE}\ndelete table ip6 {TABLE}\ntable ip6 {TABLE} {{\n{}{}}}\n",
            nat("output", "output", &output),
            nat("prerouting", "prerouting", &prerouting),
            filter("output", "output", &self.ipv6_egress()),
            filter("input", "input", &self.ipv6_ingress(&direct)),
        )
    }

    /// IPv6 from the app, refused where IPv4 would have been redirected: TCP (but to skipped
    /// ports) and DNS. The sidecar's own traffic, loopback, replies and ICMPv6 (neighbour
    /// discovery) pass. A TCP reset, so a client trying IPv6 first falls back to IPv4 at once.
    fn ipv6_egress(&self) -> Vec<String> {
        let mut rules = vec![
            format!("meta skgid {PROXY_GID} accept"),
            "oifname \"lo\" accept".to_string(),
            "ct state established,related accept".into(),
            "meta l4proto ipv6-icmp accept".into(),
            "udp dport 53 counter reject".into(),
        ];
        if !self.skip_outbound_ports.is_empty() {
            rules.push(format!("tcp dport {{ {} }} accept", set(&self.skip_outbound_ports)));
        }
        rules.push("meta l4proto tcp counter reject with tcp reset".into());
        rules
    }

    /// IPv6 to the app, refused: new TCP connections to any port but `direct` (the sidecar's
    /// and the skipped ones), which an IPv4 caller could only reach through the sidecar.
    fn ipv6_ingress(&self, direct: &[u16]) -> Vec<String> {
        let mut rules = vec!["iifname \"lo\" accept".to_string(), "ct state established,related accept".into()];
        if !direct.is_empty() {
            rules.push(format!("tcp dport {{ {} }} accept", set(direct)));
        }
        rules.push("meta l4proto tcp counter reject with tcp reset".into());
        rules
    }

    /// Installs the rules in this process's network namespace, replacing an earlier copy.
    pub fn install(&self) -> Result<(), Error> {
        nft(&["-f", "-"], Some(&self.ruleset()))
    }
}

/// `80, 443`: ports as an nftables set's elements.
fn set(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
}

/// One base chain: `kind` is its type, hook and priority (`nat hook output priority -100`).
fn chain(name: &str, kind: &str, rules: &[String]) -> String {
    let body: String = rules.iter().map(|r| format!("    {r}\n")).collect();
    format!("  chain {name} {{\n    type {kind}; policy accept;\n{body}  }}\n")
}

/// The destination a redirected connection was dialled to, before a redirect rule rewrote it
/// (`SO_ORIGINAL_DST`); a connection no rule touched gives its own address, or an error.
pub(crate) fn original_dst(tcp: &tokio::net::TcpStream) -> std::io::Result<SocketAddrV4> {
    let raw = nix::sys::socket::getsockopt(tcp, nix::sys::socket::sockopt::OriginalDst)?;
    let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
    Ok(SocketAddrV4::new(ip, u16::from_be(raw.sin_port)))
}

/// Removes the rules, both families (nothing to do for a table that is not there).
pub fn remove() -> Result<(), Error> {
    for family in ["ip", "ip6"] {
        if nft(&["list", "table", family, TABLE], None).is_ok() {
            nft(&["delete", "table", family, TABLE], None)?;
        }
    }
    Ok(())
}

fn nft(args: &[&str], input: Option<&str>) -> Result<(), Error> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::Spawn)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(Error::Spawn)?;
    }
    let out = child.wait_with_output().map_err(Error::Spawn)?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Refused(String::from_utf8_lossy(&out.stderr).trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_excludes_the_sidecar_and_the_skips() {
        let rules = Rules {
            outbound_port: 15001,
            dns_port: 15053,
            inbound_port: 15006,
            sidecar_ports: vec![15006, 15020],
            skip_inbound_ports: vec![9090],
            skip_outbound_ports: vec![5432],
            skip_cidrs: vec![(Ipv4Addr::new(10, 0, 0, 0), 8)],
        };
        let text = rules.ruleset();
        assert!(
            text.starts_with("table ip weft-intercept\ndelete table ip weft-intercept\n"),
            "{text}"
        );
        let order = [
            "meta skgid 1337 return",
            "udp dport 53 redirect to :15053",
            "ip daddr 127.0.0.0/8 return",
            "ip daddr { 10.0.0.0/8 } return",
            "tcp dport { 5432 } return",
            "meta l4proto tcp counter redirect to :15001",
            "tcp dport { 15006, 15020, 9090 } return",
            "meta l4proto tcp counter redirect to :15006",
            "table ip6 weft-intercept\ndelete table ip6 weft-intercept\n",
            "meta skgid 1337 accept",
            "udp dport 53 counter reject",
            "tcp dport { 5432 } accept",
            "meta l4proto tcp counter reject with tcp reset",
            "tcp dport { 15006, 15020, 9090 } accept",
            "meta l4proto tcp counter reject with tcp reset",
        ];
        // Each rule after the one before it.
        let mut from = 0;
        for rule in order {
            let at = text[from..]
                .find(rule)
                .unwrap_or_else(|| panic!("{rule} after byte {from} in\n{text}"));
            from += at + rule.len();
        }
    }
}

//! The redirect rules of `weft run --intercept`, as one nftables table.
//!
//! nftables rather than iptables: a table is replaced in one atomic transaction (`nft -f`:
//! declare, delete, define), so installing twice leaves one copy and a half-installed rule set
//! never exists; and removal is one command (`nft delete table ip weft-intercept`) that cannot
//! miss a rule or touch anyone else's. The rules live in the workload's network namespace.
//!
//! The sidecar's own sockets are told apart by group: `weft run` runs as group [`PROXY_GID`] and
//! starts the app with its original group, and the rules let that group's traffic through
//! untouched (what Istio does with its proxy's uid 1337, here with the gid so the app may keep
//! running as root).

use std::io::Write;
use std::net::Ipv4Addr;
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
    /// The app's ports: inbound TCP to these goes to the inbound listener.
    pub app_ports: Vec<u16>,
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
        let set = |ports: &[u16]| ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
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
        let app_ports: Vec<u16> = self
            .app_ports
            .iter()
            .copied()
            .filter(|p| !self.skip_inbound_ports.contains(p))
            .collect();
        let mut prerouting = Vec::new();
        if !app_ports.is_empty() {
            prerouting.push(format!(
                "tcp dport {{ {} }} counter redirect to :{}",
                set(&app_ports),
                self.inbound_port
            ));
        }
        let chain = |name: &str, hook: &str, rules: &[String]| {
            let body: String = rules.iter().map(|r| format!("    {r}\n")).collect();
            format!("  chain {name} {{\n    type nat hook {hook} priority -100; policy accept;\n{body}  }}\n")
        };
        format!(
            "table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n{}{}}}\n",
            chain("output", "output", &output),
            chain("prerouting", "prerouting", &prerouting)
        )
    }

    /// Installs the rules in this process's network namespace, replacing an earlier copy.
    pub fn install(&self) -> Result<(), Error> {
        nft(&["-f", "-"], Some(&self.ruleset()))
    }
}

/// Removes the rules (nothing to do when they are not there).
pub fn remove() -> Result<(), Error> {
    if nft(&["list", "table", "ip", TABLE], None).is_err() {
        return Ok(());
    }
    nft(&["delete", "table", "ip", TABLE], None)
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
            app_ports: vec![8080, 9090],
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
            "tcp dport { 8080 } counter redirect to :15006",
        ];
        let at: Vec<usize> = order
            .iter()
            .map(|r| text.find(r).unwrap_or_else(|| panic!("{r} in\n{text}")))
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
    }
}

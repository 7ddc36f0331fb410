//! Hosts as Linux network namespaces, for tests that need several machines: a mesh across
//! hosts, partitions, transparent interception.
//!
//! A [`Network`] is a set of host namespaces, each with its loopback up and one interface
//! (`eth0`, also its default route) joined to a bridge that lives in a namespace of its own, so nothing is created in,
//! or routed from, the machine's own namespace. Addresses come from 198.18.0.0/15 (reserved
//! for benchmarking, RFC 2544) and never leave the network's namespaces; since each network
//! has its own bridge, two tests may use the same addresses at once. Everything is removed on
//! drop (also when the test panics), and the leftovers of a run that was killed (its process
//! gone) are removed by the next one, found by their name prefix.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), `ip` (iproute2) and `nft` (nftables).

use crate::Process;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Every namespace the harness creates starts with this, then `<pid>-<n>-`.
const PREFIX: &str = "weft-t-";

/// Why a network could not be built where the kernel is at fault (not a bug in the test).
#[derive(Debug)]
pub struct Refused(pub String);

/// The only reason a test may skip: see [`Network::skip_reason`].
pub const KERNEL_REFUSES: &str = "kernel refuses namespaces";

/// A set of hosts joined by a bridge.
pub struct Network {
    prefix: String,
    bridge: String,
    hosts: Vec<Host>,
}

/// One host: a network namespace with one address.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    /// The namespace's name (for `ip netns exec`).
    pub netns: String,
    pub addr: Ipv4Addr,
}

/// Traffic between a host and some peers dropped, both ways, until dropped (healed).
pub struct Partition {
    netns: String,
}

// === impl Network ===

impl Network {
    /// Builds hosts named `names` with addresses 198.18.0.10, .11, ... in order. Fails with
    /// [`Refused`] only when the kernel refuses to create a network namespace; any other failure
    /// is a bug and panics.
    pub fn new(names: &[&str]) -> Result<Network, Refused> {
        remove_leftovers();
        let prefix = format!("{PREFIX}{}-{}-", std::process::id(), next());
        let bridge = format!("{prefix}bridge");
        if let Err(e) = ip(&["netns", "add", &bridge]) {
            return Err(Refused(e));
        }
        let mut network = Network {
            prefix,
            bridge,
            hosts: Vec::new(),
        };
        network.exec_ok(&network.bridge.clone(), &["ip", "link", "add", "br0", "type", "bridge"]);
        network.exec_ok(&network.bridge.clone(), &["ip", "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let netns = format!("{}{name}", network.prefix);
            ip(&["netns", "add", &netns]).unwrap_or_else(|e| panic!("{e}"));
            let addr = Ipv4Addr::new(198, 18, 0, 10 + i as u8);
            network.hosts.push(Host {
                name: name.to_string(),
                netns: netns.clone(),
                addr,
            });
            let port = format!("h{i}");
            // Both ends are created straight in their namespaces: nothing in the root one.
            ip(&[
                "link",
                "add",
                "eth0",
                "netns",
                &netns,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &network.bridge,
            ])
            .unwrap_or_else(|e| panic!("{e}"));
            let bridge = network.bridge.clone();
            network.exec_ok(&bridge, &["ip", "link", "set", &port, "master", "br0", "up"]);
            network.exec_ok(&netns, &["ip", "link", "set", "lo", "up"]);
            network.exec_ok(&netns, &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            network.exec_ok(&netns, &["ip", "link", "set", "eth0", "up"]);
            // Like a real host, a default route (on the link: the bridge has no gateway, so
            // nothing leaves the network): virtual IPs and other off-subnet addresses are
            // routable, so a connection to one reaches the interception rules.
            network.exec_ok(&netns, &["ip", "route", "add", "default", "dev", "eth0"]);
            // A resolver that is no one, so nothing in a test asks the machine's own resolver.
            network.set_resolv_conf(name, "nameserver 198.18.0.254\n");
        }
        Ok(network)
    }

    /// The reason a test may skip, or a panic: a test calls this when [`Network::new`] refused,
    /// prints it loudly, and returns. Root without namespaces is not a reason.
    pub fn skip_reason(refused: &Refused) -> &'static str {
        let text = refused.0.to_lowercase();
        let kernel = ["operation not permitted", "permission denied", "not supported", "invalid argument"];
        assert!(
            kernel.iter().any(|k| text.contains(k)),
            "could not build a test network, and not because the kernel refuses namespaces: {}",
            refused.0
        );
        eprintln!("!!!!! SKIPPED: {KERNEL_REFUSES}: {} !!!!!", refused.0);
        KERNEL_REFUSES
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in this network"))
    }

    /// A command that runs `program` inside `host`'s namespace.
    pub fn command(&self, host: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.host(host).netns, program]);
        cmd
    }

    /// Starts `program` in `host`'s namespace as a [`Process`] (killed on drop, log kept).
    pub fn spawn(&self, host: &str, name: &str, program: &str, args: &[String], env: &[(&str, &str)]) -> Process {
        let mut all = vec!["netns".to_string(), "exec".into(), self.host(host).netns.clone(), program.into()];
        all.extend(args.iter().cloned());
        Process::spawn_env("ip", name, &all, env)
    }

    /// Runs `argv` in `host`'s namespace to completion; its status and output.
    pub fn run(&self, host: &str, argv: &[&str]) -> std::process::Output {
        self.command(host, argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .expect("ip netns exec runs")
    }

    /// The `/etc/resolv.conf` processes in `host` see (`ip netns exec` mounts
    /// `/etc/netns/NAME/resolv.conf` over it).
    pub fn set_resolv_conf(&self, host: &str, text: &str) {
        let dir = netns_etc(&self.host(host).netns);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/NAME");
        std::fs::write(dir.join("resolv.conf"), text).expect("write resolv.conf");
    }

    /// Drops traffic between `host` and each of `peers`, both ways, with nftables rules inside
    /// `host`'s namespace, until the returned [`Partition`] is dropped or healed.
    pub fn partition(&self, host: &str, peers: &[&str]) -> Partition {
        let netns = self.host(host).netns.clone();
        let addrs: Vec<String> = peers.iter().map(|p| self.host(p).addr.to_string()).collect();
        let set = addrs.join(", ");
        let rules = format!(
            "table inet weft-partition {{\n  chain input {{ type filter hook input priority -10; ip saddr {{ {set} }} drop; }}\n  chain output {{ type filter hook output priority -10; ip daddr {{ {set} }} drop; }}\n}}\n"
        );
        nft(&netns, &rules);
        Partition { netns }
    }

    fn exec_ok(&self, netns: &str, argv: &[&str]) {
        let mut all = vec!["netns", "exec", netns];
        all.extend_from_slice(argv);
        ip(&all).unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for host in &self.hosts {
            remove_netns(&host.netns);
        }
        remove_netns(&self.bridge);
    }
}

// === impl Partition ===

impl Partition {
    /// Lets traffic through again.
    pub fn heal(self) {}
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.netns, "nft", "delete", "table", "inet", "weft-partition"])
            .output();
    }
}

/// Loads an nftables ruleset into `netns`.
fn nft(netns: &str, rules: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft runs (install nftables)");
    child.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft -f in {netns}: {}\n{rules}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip ARGS`; the error names the command and what it printed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip (install iproute2): {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
}

fn netns_etc(netns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(netns)
}

fn remove_netns(netns: &str) {
    let _ = ip(&["netns", "delete", netns]);
    let _ = std::fs::remove_dir_all(netns_etc(netns));
}

/// Removes the namespaces of earlier runs whose process is gone (killed before its drops ran).
fn remove_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            remove_netns(name);
        }
    }
}

fn next() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

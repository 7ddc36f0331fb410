//! The network of `weft up --intercept`: each demo workload in a Linux network namespace of its
//! own, joined by a bridge that lives in a namespace of its own too, as the test harness's
//! hosts are (weft_test::netns). Nothing is created in, or routed from, the machine's own
//! namespace: addresses come from 198.18.0.0/15 (reserved for benchmarking, RFC 2544) and never
//! leave the bridge.
//!
//! The bridge's namespace holds 198.18.0.1, where `weft up` itself talks to the workloads: the
//! traffic generator, the readiness probes, and the relay to the control plane (see `up.rs`),
//! all run on a thread that entered that namespace (a socket belongs to the namespace its
//! thread was in when it was created, whatever thread uses it later).
//!
//! Everything is removed on drop; namespaces of a run that was killed (its process gone) are
//! removed, with any process still inside them, by the next `weft up --intercept`, found by
//! their name: `weft-up-<pid>-...`.

use anyhow::{Context, bail};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const PREFIX: &str = "weft-up-";
/// The bridge's own address: where the workloads reach `weft up` (and through it, the control
/// plane).
pub const BRIDGE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// The bridge and the workloads' namespaces.
pub struct Network {
    bridge: String,
    hosts: Vec<Host>,
    /// Runs futures inside the bridge's namespace (a thread of its own that entered it).
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// One workload's namespace and its address on the bridge.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
}

impl Network {
    /// A namespace for each of `names`, at 198.18.0.10, .11, ... in order. Removes the leftovers
    /// of killed runs first. On failure, what was built is removed again.
    pub fn new(names: &[&str]) -> anyhow::Result<Network> {
        remove_leftovers();
        let prefix = format!("{PREFIX}{}-", std::process::id());
        let bridge = format!("{prefix}bridge");
        ip(&["netns", "add", &bridge]).context("creating network namespaces (weft up --intercept needs root)")?;
        let (runtime, stop) = runtime_in(&bridge)?;
        let mut network = Network {
            bridge,
            hosts: Vec::new(),
            runtime,
            stop: Some(stop),
        };
        network.build(&prefix, names)?;
        Ok(network)
    }

    fn build(&mut self, prefix: &str, names: &[&str]) -> anyhow::Result<()> {
        let bridge = self.bridge.clone();
        exec(&bridge, &["ip", "link", "set", "lo", "up"])?;
        exec(&bridge, &["ip", "link", "add", "br0", "type", "bridge"])?;
        exec(&bridge, &["ip", "addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", "br0"])?;
        exec(&bridge, &["ip", "link", "set", "br0", "up"])?;
        for (i, name) in names.iter().enumerate() {
            let netns = format!("{prefix}{name}");
            ip(&["netns", "add", &netns])?;
            let addr = Ipv4Addr::new(198, 18, 0, 10 + i as u8);
            self.hosts.push(Host {
                name: name.to_string(),
                netns: netns.clone(),
                addr,
            });
            let port = format!("h{i}");
            // Both ends are created straight in their namespaces: nothing in the machine's.
            ip(&[
                "link", "add", "eth0", "netns", &netns, "type", "veth", "peer", "name", &port, "netns", &bridge,
            ])?;
            exec(&bridge, &["ip", "link", "set", &port, "master", "br0", "up"])?;
            exec(&netns, &["ip", "link", "set", "lo", "up"])?;
            exec(&netns, &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            exec(&netns, &["ip", "link", "set", "eth0", "up"])?;
            // A default route on the link, so a connection to a virtual IP is routable and
            // reaches the interception rules (which then send it to the sidecar).
            exec(&netns, &["ip", "route", "add", "default", "dev", "eth0"])?;
            // Only the sidecar answers names (its rules catch port 53 whatever the server):
            // no search domains of the machine's, no resolver outside the bridge.
            let etc = netns_etc(&netns);
            std::fs::create_dir_all(&etc).with_context(|| format!("cannot create {}", etc.display()))?;
            std::fs::write(etc.join("resolv.conf"), format!("nameserver {BRIDGE_ADDR}\n"))
                .with_context(|| format!("cannot write {}", etc.join("resolv.conf").display()))?;
        }
        Ok(())
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).expect("every workload has a host")
    }

    /// Ends every task on the bridge (the traffic generator and its kept-alive connections), so
    /// no sidecar's inbound side waits on them while it drains.
    pub fn stop_bridge_tasks(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Runs `future` on the bridge namespace's thread: the sockets it opens are on the bridge.
    pub fn spawn_on_bridge<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.spawn(future)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.stop_bridge_tasks();
        for host in &self.hosts {
            remove_netns(&host.netns);
        }
        remove_netns(&self.bridge);
    }
}

/// A thread that enters `netns` and runs a current-thread runtime there until told to stop.
fn runtime_in(netns: &str) -> anyhow::Result<(tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>)> {
    let path = PathBuf::from("/run/netns").join(netns);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new().name(format!("netns {netns}")).spawn(move || {
        let entered = std::fs::File::open(&path)
            .map_err(anyhow::Error::from)
            .and_then(|ns| Ok(nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?))
            .with_context(|| format!("entering the network namespace {}", path.display()));
        let runtime = entered.and_then(|()| Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?));
        match runtime {
            Ok(runtime) => {
                let _ = ready_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stop_rx.await;
                });
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    })?;
    let handle = ready_rx.recv().context("the namespace thread ended")??;
    Ok((handle, stop_tx))
}

/// Runs `ip ARGS`; the error names the command and what it printed.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn exec(netns: &str, argv: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["netns", "exec", netns];
    all.extend_from_slice(argv);
    ip(&all)
}

fn netns_etc(netns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(netns)
}

/// Kills what still runs in `netns` (a killed run's sidecars and apps), then deletes it.
fn remove_netns(netns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            // A thread of this process may be in it (the bridge's): never this process.
            if let Ok(pid) = pid.parse::<i32>()
                && pid as u32 != std::process::id()
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    let _ = ip(&["netns", "delete", netns]);
    let _ = std::fs::remove_dir_all(netns_etc(netns));
}

/// Removes the namespaces of earlier runs whose `weft up` is gone (a name with this process's
/// id is a dead run's too: its id was reused).
fn remove_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
        let alive = pid.is_some_and(|p| p as u32 != std::process::id() && std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            tracing::info!(netns = name, "removing a namespace left by a killed weft up");
            remove_netns(name);
        }
    }
}

//! Real etcd clusters for the tests of the highly available control plane: Debian's
//! `etcd-server` (`/usr/bin/etcd`, installed by `scripts/test`), each member a process on
//! loopback ports picked at run time, its data in a temporary directory removed on drop; or
//! each member on a host of its own ([`EtcdCluster::start_on`], a [`Network`]'s namespaces); or
//! serving clients over TLS only, with client certificates required ([`EtcdCluster::start_tls`]).

use crate::http::Client;
use crate::netns::Network;
use crate::pki::Pki;
use crate::process::{Process, free_addr};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The etcd binary (`WEFT_ETCD` overrides it).
fn etcd_bin() -> String {
    std::env::var("WEFT_ETCD").unwrap_or_else(|_| "/usr/bin/etcd".into())
}

pub struct EtcdMember {
    pub name: String,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    /// The network namespace it runs in (`None`: the machine's own).
    netns: Option<String>,
    process: Option<Process>,
}

/// A cluster of `n` members; each can be stopped and started again on its data.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    dir: PathBuf,
    token: String,
    tls: Option<EtcdTls>,
}

/// The PEM files of a TLS cluster: the CA that signed every certificate, and one certificate
/// (for 127.0.0.1, server and client use) with its key, which the members serve and which a
/// client may present.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster has a leader and answers.
    pub async fn start(n: usize) -> Self {
        let members = (0..n)
            .map(|i| EtcdMember {
                name: format!("etcd{i}"),
                client: free_addr(),
                peer: free_addr(),
                netns: None,
                process: None,
            })
            .collect();
        Self::start_members(members, None).await
    }

    /// Starts `n` members on loopback that serve clients over TLS only, with certificates
    /// signed by `pki`, and accept only clients presenting a certificate `pki` signed
    /// (`--client-cert-auth`); the files are in [`EtcdCluster::tls`].
    pub async fn start_tls(n: usize, pki: &Pki) -> Self {
        let members = (0..n)
            .map(|i| EtcdMember {
                name: format!("etcd{i}"),
                client: free_addr(),
                peer: free_addr(),
                netns: None,
                process: None,
            })
            .collect();
        Self::start_members(members, Some(pki)).await
    }

    /// The TLS files of a cluster made by [`EtcdCluster::start_tls`].
    pub fn tls(&self) -> &EtcdTls {
        self.tls.as_ref().expect("a cluster started with start_tls")
    }

    /// Starts one member on each of `hosts` of `net` (named after its host), listening on the
    /// host's address (ports 2379 and 2380, as on real machines), and waits until the cluster
    /// has a leader and answers. The members die with the cluster, before `net` is removed.
    pub async fn start_on(net: &Network, hosts: &[&str]) -> Self {
        let members = hosts
            .iter()
            .map(|name| {
                let host = net.host(name);
                EtcdMember {
                    name: name.to_string(),
                    client: SocketAddr::new(host.addr.into(), 2379),
                    peer: SocketAddr::new(host.addr.into(), 2380),
                    netns: Some(host.netns.clone()),
                    process: None,
                }
            })
            .collect();
        Self::start_members(members, None).await
    }

    async fn start_members(members: Vec<EtcdMember>, pki: Option<&Pki>) -> Self {
        assert!(
            std::path::Path::new(&etcd_bin()).exists(),
            "{} is missing: install Debian's etcd-server (scripts/test does)",
            etcd_bin()
        );
        let token = format!("weft-test-{}-{}", std::process::id(), crate::process::rand_suffix());
        let dir = std::env::temp_dir().join(&token);
        let _ = std::fs::remove_dir_all(&dir);
        let n = members.len();
        let tls = pki.map(|pki| write_tls(&dir, pki));
        let mut cluster = Self { members, dir, token, tls };
        for i in 0..n {
            cluster.spawn(i, "new");
        }
        cluster.wait_healthy(Duration::from_secs(30)).await;
        cluster
    }

    /// `etcd://HOST:PORT,...` for `weft control --store`.
    pub fn url(&self) -> String {
        let members: Vec<String> = self.members.iter().map(|m| m.client.to_string()).collect();
        format!("etcd://{}", members.join(","))
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial: Vec<String> = self.members.iter().map(|m| format!("{}=http://{}", m.name, m.peer)).collect();
        let m = &self.members[i];
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut args: Vec<String> = [
            "--name",
            &m.name,
            "--data-dir",
            &self.dir.join(&m.name).display().to_string(),
            "--listen-client-urls",
            &format!("{scheme}://{}", m.client),
            "--advertise-client-urls",
            &format!("{scheme}://{}", m.client),
            "--listen-peer-urls",
            &format!("http://{}", m.peer),
            "--initial-advertise-peer-urls",
            &format!("http://{}", m.peer),
            "--initial-cluster",
            &initial.join(","),
            "--initial-cluster-token",
            &self.token,
            "--initial-cluster-state",
            state,
            // Fast elections: a member lost is replaced within about a second.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ]
        .map(String::from)
        .to_vec();
        if let Some(tls) = &self.tls {
            for (flag, path) in [("--cert-file", &tls.cert), ("--key-file", &tls.key), ("--trusted-ca-file", &tls.ca)] {
                args.extend([flag.to_string(), path.display().to_string()]);
            }
            args.push("--client-cert-auth".into());
        }
        let process = match &m.netns {
            None => Process::spawn(&etcd_bin(), &m.name, &args),
            Some(netns) => {
                // `ip netns exec` execs etcd itself, so the process killed is the member.
                let mut all: Vec<String> = vec!["netns".into(), "exec".into(), netns.clone(), etcd_bin()];
                all.extend(args);
                Process::spawn("ip", &m.name, &all)
            }
        };
        self.members[i].process = Some(process);
    }

    /// Stops member `i` (SIGKILL); its data stays for [`EtcdCluster::resume`].
    pub fn stop(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].process.take() {
            p.kill();
        }
    }

    /// Starts stopped member `i` again on its data.
    pub fn resume(&mut self, i: usize) {
        self.spawn(i, "existing");
    }

    /// Waits until every running member reports itself healthy (a leader, quorum).
    pub async fn wait_healthy(&self, within: Duration) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let running: Vec<(Option<String>, String)> = self
            .members
            .iter()
            .filter(|m| m.process.is_some())
            .map(|m| (m.netns.clone(), format!("{scheme}://{}/health", m.client)))
            .collect();
        crate::eventually(within, "every etcd member healthy", || {
            let running = running.clone();
            async move {
                for (netns, url) in &running {
                    if !health(netns.as_deref(), self.tls.as_ref(), url).await?.contains("\"true\"") {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await
    }
}

/// The body of a member's `/health`, asked with curl from inside its namespace when it has one
/// (the test's own namespace has no route to it), or presenting the cluster's certificate.
async fn health(netns: Option<&str>, tls: Option<&EtcdTls>, url: &str) -> Option<String> {
    if netns.is_none() && tls.is_none() {
        let reply = Client::new().get(url).await.ok()?;
        return Some(String::from_utf8_lossy(&reply.body).into_owned());
    }
    let mut argv: Vec<String> = match netns {
        Some(netns) => ["ip", "netns", "exec", netns, "curl"].map(String::from).to_vec(),
        None => vec!["curl".into()],
    };
    argv.extend(["-s", "--max-time", "2"].map(String::from));
    if let Some(tls) = tls {
        for (flag, path) in [("--cacert", &tls.ca), ("--cert", &tls.cert), ("--key", &tls.key)] {
            argv.extend([flag.to_string(), path.display().to_string()]);
        }
    }
    argv.push(url.to_string());
    let out = tokio::process::Command::new(&argv[0]).args(&argv[1..]).output().await.ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes the CA and a certificate for 127.0.0.1 signed by `pki` into `dir`.
fn write_tls(dir: &std::path::Path, pki: &Pki) -> EtcdTls {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = pki.leaf_pem(&["127.0.0.1", "localhost"]);
    let tls = EtcdTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("etcd.pem"),
        key: dir.join("etcd-key.pem"),
    };
    std::fs::write(&tls.ca, &pki.cert_pem).unwrap();
    std::fs::write(&tls.cert, cert).unwrap();
    std::fs::write(&tls.key, key).unwrap();
    tls
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.process.take();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! A mesh across hosts (issue #16, part 6): every host a network namespace (weft_test::netns),
//! three etcd members and two control-plane replicas on hosts of their own, and the demo's
//! clusters as hosts: `orders` answers in cluster-a, cluster-b and cluster-c, and its caller
//! `web` runs on a second host of cluster-c. Proxies bind their inbound listener to the wildcard
//! address and advertise their host's address. Partitions are nftables rules inside a host's
//! namespace; the test process itself reaches the hosts only through `ip netns exec`.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use weft_test::etcd::EtcdCluster;
use weft_test::netns::{KERNEL_REFUSES, Network};
use weft_test::{Process, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_weft");
const API_PORT: u16 = 7070;
const GRPC_PORT: u16 = 7071;
const INBOUND: &str = "0.0.0.0:15006";
const OUTBOUND: &str = "127.0.0.1:15001";
const ADMIN: &str = "127.0.0.1:15020";
const APP: &str = "127.0.0.1:8080";
const ETCD_HOSTS: [&str; 3] = ["etcd-0", "etcd-1", "etcd-2"];
const CONTROL_HOSTS: [&str; 2] = ["control-0", "control-1"];
const ORDERS_HOSTS: [&str; 3] = ["cluster-a", "cluster-b", "cluster-c"];
const WEB_HOST: &str = "cluster-c-web";

/// Local cluster first, then cluster-b, then cluster-a. A per-try timeout well under the
/// route's retries a request stuck on a partitioned endpoint (the retry conditions are what let
/// a request that was sent be retried); three failures in a row eject an endpoint for 2 s
/// (doubling while it keeps failing).
const POLICY: &str = "apiVersion: weft/v1
kind: TrafficPolicy
metadata: {name: orders}
spec:
  service: orders
  failover: [cluster-b, cluster-a]
  routes: [{timeout: 3s, retry: {attempts: 2, perTryTimeout: 300ms, on: [connect-failure, reset, gateway-error]}}]
  connectionPool: {connectTimeout: 300ms}
  outlierDetection: {consecutiveFailures: 3, ejection: 2s, maxEjectedPercent: 50}
";

/// Calls `orders` through the sidecar's outbound listener on one kept-alive connection, every
/// 20 ms; prints one line per request: unix ms, status (0: no answer), the cluster that answered
/// (the demo app's version) or the proxy's `x-weft-error`, and how long it took in ms.
const CALLER: &str = r#"
import http.client, json, time
conn = None
while True:
    t = time.time()
    try:
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", 15001, timeout=5)
        conn.request("GET", "/", headers={"Host": "orders"})
        r = conn.getresponse()
        body = r.read()
        who = json.loads(body)["version"] if r.status == 200 else r.getheader("x-weft-error", "-")
        print("%d %d %s %d" % (t * 1000, r.status, who, (time.time() - t) * 1000), flush=True)
    except Exception as e:
        conn = None
        print("%d 0 %s %d" % (t * 1000, type(e).__name__, (time.time() - t) * 1000), flush=True)
    time.sleep(0.02)
"#;

/// Every process of the mesh; fields drop in order, so every process dies before the etcd
/// members, and they before the namespaces are removed.
struct Mesh {
    procs: Vec<Process>,
    _controls: Vec<Process>,
    etcd: EtcdCluster,
    data_dirs: Vec<PathBuf>,
    admin_token: String,
    net: Network,
}

/// One request the caller made.
#[derive(Debug)]
struct Call {
    at_ms: u64,
    status: u16,
    who: String,
    took_ms: u64,
}

fn all_hosts() -> Vec<&'static str> {
    let mut names: Vec<&str> = ETCD_HOSTS.to_vec();
    names.extend(CONTROL_HOSTS);
    names.extend(ORDERS_HOSTS);
    names.push(WEB_HOST);
    names
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// The network, etcd on its three hosts and a replica on each control host, ready; `None`
/// (loudly) where the kernel refuses namespaces.
async fn mesh() -> Option<Mesh> {
    let net = match Network::new(&all_hosts()) {
        Ok(net) => net,
        Err(refused) => {
            assert_eq!(Network::skip_reason(&refused), KERNEL_REFUSES);
            return None;
        }
    };
    let etcd = EtcdCluster::start_on(&net, &ETCD_HOSTS).await;
    let store = etcd.url();
    let mut controls = Vec::new();
    let mut data_dirs = Vec::new();
    let mut admin_token = String::new();
    for host in CONTROL_HOSTS {
        let data_dir = std::env::temp_dir().join(format!("weft-multihost-{}-{}", std::process::id(), net.host(host).netns));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir).unwrap();
        // The first replica makes the admin token; the others are given it, as in ha.rs.
        if !admin_token.is_empty() {
            std::fs::write(data_dir.join("admin.token"), &admin_token).unwrap();
        }
        let addr = net.host(host).addr;
        let args: Vec<String> = [
            "control",
            "--data-dir",
            &data_dir.display().to_string(),
            "--api",
            &format!("{addr}:{API_PORT}"),
            "--grpc",
            &format!("{addr}:{GRPC_PORT}"),
            "--store",
            &store,
            "--replica",
            host,
        ]
        .map(String::from)
        .to_vec();
        controls.push(net.spawn(host, host, BIN, &args, &[("RUST_LOG", "info")]));
        let ready_url = format!("https://{addr}:{API_PORT}/ready");
        let ca = data_dir.join("ca.pem").display().to_string();
        eventually(Duration::from_secs(30), &format!("replica on {host} ready"), || {
            let out = net.run(host, &["curl", "-sf", "--cacert", &ca, &ready_url]);
            async move { out.status.success().then_some(()) }
        })
        .await;
        if admin_token.is_empty() {
            admin_token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap().trim().to_string();
        }
        data_dirs.push(data_dir);
    }
    Some(Mesh {
        procs: Vec::new(),
        _controls: controls,
        etcd,
        data_dirs,
        admin_token,
        net,
    })
}

impl Mesh {
    /// Runs the CLI from control host `i` against its replica.
    fn cli(&self, i: usize, args: &[&str]) -> Output {
        let host = CONTROL_HOSTS[i];
        let server = format!("https://{}:{API_PORT}", self.net.host(host).addr);
        self.net
            .command(host, BIN)
            .args([
                "--server",
                &server,
                "--ca-file",
                &self.data_dirs[i].join("ca.pem").display().to_string(),
            ])
            .args(args)
            .env("WEFT_API_TOKEN", &self.admin_token)
            .env("WEFT_CONFIG", self.data_dirs[i].join("no-user-config.json"))
            .output()
            .unwrap()
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(0, args);
        assert!(out.status.success(), "weft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// `weft apply` of `yaml` through replica `i` (a follower forwards it to the leader).
    fn apply(&self, i: usize, yaml: &str) -> Output {
        let file = self.data_dirs[i].join("policy.yaml");
        std::fs::write(&file, yaml).unwrap();
        self.cli(i, &["apply", "-f", &file.display().to_string()])
    }

    /// Every replica's gRPC URL: proxies spread over them.
    fn control_urls(&self) -> String {
        let urls: Vec<String> = CONTROL_HOSTS
            .iter()
            .map(|h| format!("https://{}:{GRPC_PORT}", self.net.host(h).addr))
            .collect();
        urls.join(",")
    }

    /// A sidecar for `workload` on `host` in `cluster`, its inbound on the wildcard address;
    /// `extra` flags after the others.
    fn proxy(&mut self, host: &str, workload: &str, service: &str, cluster: &str, extra: &[String]) {
        let token = self.cli_ok(&["token", "create", "--workload", workload]).trim().to_string();
        let args: Vec<String> = [
            "proxy",
            "--control",
            &self.control_urls(),
            "--workload",
            workload,
            "--cluster",
            cluster,
            "--label",
            &format!("service={service}"),
            "--app",
            APP,
            "--inbound",
            INBOUND,
            "--outbound",
            OUTBOUND,
            "--admin",
            ADMIN,
        ]
        .map(String::from)
        .to_vec();
        let args = [args, extra.to_vec()].concat();
        let env = [("WEFT_TOKEN", token.as_str()), ("RUST_LOG", "info"), ("NO_COLOR", "1")];
        let proxy = self.net.spawn(host, &format!("proxy-{host}"), BIN, &args, &env);
        self.procs.push(proxy);
    }

    /// `orders` on `host`: the demo app, answering with its cluster as version, and its sidecar.
    fn orders(&mut self, host: &str, extra: &[String]) {
        let args: Vec<String> = ["demo-app", "--name", "orders", "--version", host, "--listen", APP]
            .map(String::from)
            .to_vec();
        let app = self.net.spawn(host, &format!("orders-{host}"), BIN, &args, &[]);
        self.procs.push(app);
        self.proxy(host, &format!("default/orders-{host}"), "orders", host, extra);
    }

    async fn ready(&self, host: &str) {
        eventually(Duration::from_secs(30), &format!("sidecar on {host} ready"), || {
            let out = self.net.run(host, &["curl", "-sf", &format!("http://{ADMIN}/ready")]);
            async move { out.status.success().then_some(()) }
        })
        .await;
    }

    /// The sum of `name`'s samples on `host`'s sidecar.
    fn metric(&self, host: &str, name: &str) -> f64 {
        let out = self.net.run(host, &["curl", "-sf", &format!("http://{ADMIN}/metrics")]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn config_dump(&self, host: &str) -> serde_json::Value {
        let out = self.net.run(host, &["curl", "-sf", &format!("http://{ADMIN}/config_dump")]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("config_dump on {host}: {e}"))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for dir in &self.data_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The calls the caller logged so far.
fn calls(caller: &Process) -> Vec<Call> {
    caller
        .log_text()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let at_ms = fields.next()?.parse().ok()?;
            let status = fields.next()?.parse().ok()?;
            let who = fields.next()?.to_string();
            let took_ms = fields.next()?.parse().ok()?;
            Some(Call {
                at_ms,
                status,
                who,
                took_ms,
            })
        })
        .collect()
}

/// Waits until the last `n` calls all succeeded in `cluster`; returns when the first of them
/// was answered (when traffic settled there).
async fn settled_in(caller: &Process, cluster: &str, n: usize, within: Duration) -> u64 {
    eventually(within, &format!("the last {n} calls answered in {cluster}"), || async {
        let calls = calls(caller);
        let tail = calls.get(calls.len().checked_sub(n)?..)?;
        tail.iter()
            .all(|c| c.status == 200 && c.who == cluster)
            .then(|| tail[0].at_ms + tail[0].took_ms)
    })
    .await
}

/// The calls made in `[from, to)` that did not succeed.
fn failed_between(caller: &Process, from: u64, to: u64) -> Vec<Call> {
    calls(caller)
        .into_iter()
        .filter(|c| c.at_ms >= from && c.at_ms < to && c.status != 200)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_cluster_fails_over_by_locality_and_traffic_returns_when_it_heals() {
    let Some(mut mesh) = mesh().await else { return };
    let out = mesh.apply(0, POLICY);
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    for host in ORDERS_HOSTS {
        // cluster-b names its address itself; the others leave it to the sidecar.
        let advertise = format!("{}:15006", mesh.net.host(host).addr);
        let extra = if host == "cluster-b" {
            vec!["--advertise".into(), advertise]
        } else {
            vec![]
        };
        mesh.orders(host, &extra);
    }
    mesh.proxy(WEB_HOST, "default/web", "web", "cluster-c", &[]);
    for host in ORDERS_HOSTS.iter().chain([&WEB_HOST]) {
        mesh.ready(host).await;
    }

    // Every sidecar bound the wildcard address and advertises its host's own address, and the
    // caller was handed those addresses (no loopback anywhere in discovery).
    for host in ORDERS_HOSTS.iter().chain([&WEB_HOST]) {
        let dump = mesh.config_dump(host);
        let listeners = &dump["listeners"];
        assert_eq!(listeners["inbound"], INBOUND, "{host}: {listeners}");
        assert_eq!(
            listeners["advertise"],
            format!("{}:15006", mesh.net.host(host).addr),
            "{host} advertises its host's address: {listeners}"
        );
    }
    let caller = mesh.net.spawn(
        WEB_HOST,
        "caller",
        "/usr/bin/python3",
        &["-u".into(), "-c".into(), CALLER.into()],
        &[],
    );
    settled_in(&caller, "cluster-c", 50, Duration::from_secs(30)).await;
    let config = mesh.config_dump(WEB_HOST)["config"].to_string();
    for host in ORDERS_HOSTS {
        let endpoint = format!("{}:15006", mesh.net.host(host).addr);
        assert!(config.contains(&endpoint), "the caller knows {endpoint}: {config}");
    }

    // Cut cluster-c's orders host off from every other host, under traffic.
    let others: Vec<&str> = all_hosts().into_iter().filter(|h| *h != "cluster-c").collect();
    let cut = now_ms();
    let partition = mesh.net.partition("cluster-c", &others);
    let over = settled_in(&caller, "cluster-b", 50, Duration::from_secs(30)).await;
    let failover_ms = over.saturating_sub(cut);
    let failed = failed_between(&caller, cut, over);
    let slowest = calls(&caller)
        .iter()
        .filter(|c| c.at_ms + c.took_ms >= cut && c.at_ms <= over)
        .map(|c| c.took_ms)
        .max()
        .unwrap_or_default();
    let served_by_a = calls(&caller).iter().filter(|c| c.at_ms >= cut && c.who == "cluster-a").count();
    eprintln!(
        "partition: traffic in cluster-b {failover_ms} ms after the cut, the slowest request meanwhile {slowest} ms; {} failed requests: {failed:?}; {served_by_a} answered in cluster-a",
        failed.len()
    );
    // Three failures eject the endpoint; each request stuck on it is moved after 300 ms by the
    // per-try timeout, so the caller sees at most those three fail, within a few ejection spans.
    assert!(failed.len() <= 3, "at most the outlier threshold fails: {failed:?}");
    assert!(failover_ms < 5_000, "failover took {failover_ms} ms");
    assert!(slowest < 3_000, "no request waited for the route's timeout: {slowest} ms");
    assert_eq!(served_by_a, 0, "cluster-b comes before cluster-a in the failover order");
    let ejections = mesh.metric(WEB_HOST, "weft_proxy_outlier_ejections_total");
    assert!(ejections >= 1.0, "outlier detection moved the traffic: {ejections} ejections");

    // One of three etcd members killed on its host: the store keeps quorum, a change still
    // goes through (asked of the second replica, across hosts to the leader when it follows),
    // and traffic does not notice.
    let killed = now_ms();
    mesh.etcd.stop(0);
    let changed = POLICY.replace("timeout: 3s", "timeout: 4s");
    let out = mesh.apply(1, &changed);
    assert!(
        out.status.success(),
        "a write with two of three etcd members: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let policy = String::from_utf8(mesh.cli(1, &["-o", "json", "get", "TrafficPolicy", "orders"]).stdout).unwrap();
    assert!(policy.contains("\"4s\""), "the change is in the mesh: {policy}");
    settled_in(&caller, "cluster-b", 20, Duration::from_secs(10)).await;
    let failed = failed_between(&caller, killed, now_ms());
    assert!(failed.is_empty(), "no request fails for a lost etcd member: {failed:?}");

    // Heal: traffic comes back to the local cluster once the ejection lapses and the endpoint
    // answers its probe again.
    let healed = now_ms();
    partition.heal();
    let back = settled_in(&caller, "cluster-c", 50, Duration::from_secs(60)).await;
    let failed = failed_between(&caller, healed, back);
    eprintln!(
        "heal: traffic back in cluster-c {} ms after; {} failed requests: {failed:?}",
        back.saturating_sub(healed),
        failed.len()
    );
    assert!(failed.len() <= 3, "at most the outlier threshold fails on the way back: {failed:?}");
    let started = Instant::now();
    drop(caller);
    drop(mesh);
    eprintln!("teardown took {:?}", started.elapsed());
}

#[test]
fn an_advertised_address_no_one_can_dial_is_refused_at_start() {
    for bad in ["0.0.0.0:15006", "198.18.0.5:0"] {
        let out = std::process::Command::new(BIN)
            .args(["proxy", "--control", "https://198.18.0.1:7071", "--workload", "default/web"])
            .args(["--cluster", "a", "--app", APP, "--inbound", INBOUND, "--outbound", OUTBOUND])
            .args(["--advertise", bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("--advertise") && stderr.contains(bad) && stderr.contains("cannot dial"),
            "{stderr}"
        );
    }
}

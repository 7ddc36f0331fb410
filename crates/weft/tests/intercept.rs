//! Unmodified apps in the mesh (issue #17): `weft run --intercept` in network namespaces the
//! test creates (weft_test::netns), a control plane on a host of its own, and clients that know
//! nothing of the mesh (curl, python requests, redis-cli) calling services by name.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;
use weft_test::netns::{KERNEL_REFUSES, Network};
use weft_test::{Process, descendants, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_weft");
/// Debian's python, where python3-requests is installed (scripts/test).
const PYTHON: &str = "/usr/bin/python3";
const API_PORT: u16 = 7070;
const GRPC_PORT: u16 = 7071;
const INBOUND_PORT: u16 = 15006;
const EXPLICIT: &str = "127.0.0.1:15000";
const ADMIN: &str = "127.0.0.1:15020";

/// A control plane on host `control` and the hosts of the workloads.
struct Mesh {
    net: Network,
    _control: Process,
    data_dir: PathBuf,
    admin_token: String,
}

/// A network of `hosts` (plus `control`) with a control plane running, or `None` (loudly) where
/// the kernel refuses namespaces.
async fn mesh(hosts: &[&str]) -> Option<Mesh> {
    let mut names = vec!["control"];
    names.extend_from_slice(hosts);
    let net = match Network::new(&names) {
        Ok(net) => net,
        Err(refused) => {
            assert_eq!(Network::skip_reason(&refused), KERNEL_REFUSES);
            return None;
        }
    };
    let addr = net.host("control").addr;
    let data_dir = std::env::temp_dir().join(format!("weft-intercept-{}-{}", std::process::id(), net.host("control").netns));
    let args: Vec<String> = [
        "control",
        "--data-dir",
        &data_dir.display().to_string(),
        "--api",
        &format!("{addr}:{API_PORT}"),
        "--grpc",
        &format!("{addr}:{GRPC_PORT}"),
    ]
    .map(String::from)
    .to_vec();
    let control = net.spawn("control", "control", BIN, &args, &[("RUST_LOG", "info")]);
    let ready_url = format!("https://{addr}:{API_PORT}/ready");
    let ca = data_dir.join("ca.pem");
    eventually(Duration::from_secs(30), "control plane ready", || {
        let out = net.run("control", &["curl", "-sf", "--cacert", &ca.display().to_string(), &ready_url]);
        async move { out.status.success().then_some(()) }
    })
    .await;
    let admin_token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap().trim().to_string();
    Some(Mesh {
        net,
        _control: control,
        data_dir,
        admin_token,
    })
}

impl Mesh {
    /// Runs the CLI against the control plane (from the control plane's own host).
    fn cli(&self, args: &[&str]) -> Output {
        let server = format!("https://{}:{API_PORT}", self.net.host("control").addr);
        let out = self
            .net
            .command("control", BIN)
            .args([
                "--server",
                &server,
                "--ca-file",
                &self.data_dir.join("ca.pem").display().to_string(),
            ])
            .args(args)
            .env("WEFT_API_TOKEN", &self.admin_token)
            .env("WEFT_CONFIG", self.data_dir.join("no-user-config.json"))
            .output()
            .unwrap();
        assert!(out.status.success(), "weft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    fn token(&self, workload: &str) -> String {
        String::from_utf8(self.cli(&["token", "create", "--workload", workload]).stdout)
            .unwrap()
            .trim()
            .to_string()
    }

    fn addr(&self, host: &str) -> Ipv4Addr {
        self.net.host(host).addr
    }

    /// `weft run --intercept` on `host` for `workload`, its app on 127.0.0.1:`app_port`.
    fn run(&self, host: &str, workload: &str, labels: &[&str], app_port: u16, extra: &[&str], command: &[&str]) -> Process {
        let mut flags = vec!["--intercept"];
        flags.extend_from_slice(extra);
        self.launch(host, workload, labels, app_port, &flags, command)
    }

    /// `weft run` on `host` with `flags` (interception only when they ask for it).
    fn launch(&self, host: &str, workload: &str, labels: &[&str], app_port: u16, flags: &[&str], command: &[&str]) -> Process {
        let control = format!("https://{}:{GRPC_PORT}", self.addr("control"));
        let inbound = format!("{}:{INBOUND_PORT}", self.addr(host));
        let app = format!("127.0.0.1:{app_port}");
        let mut args: Vec<String> = [
            "run",
            "--control",
            &control,
            "--workload",
            workload,
            "--cluster",
            "cluster-a",
            "--app",
            &app,
            "--inbound",
            &inbound,
            "--outbound",
            EXPLICIT,
            "--admin",
            ADMIN,
        ]
        .map(String::from)
        .to_vec();
        for label in labels {
            args.extend(["--label".to_string(), label.to_string()]);
        }
        args.extend(flags.iter().map(|s| s.to_string()));
        args.push("--".into());
        args.extend(command.iter().map(|s| s.to_string()));
        let token = self.token(workload);
        let env = [
            ("WEFT_TOKEN", token.as_str()),
            ("RUST_LOG", "info,weft_proxy::intercept=debug"),
            ("NO_COLOR", "1"),
        ];
        self.net.spawn(host, workload, BIN, &args, &env)
    }

    /// Waits until the sidecar on `host` is ready and, when `app_port` is given, its app
    /// accepts connections there (`weft run` starts the app only once the sidecar is ready).
    async fn ready(&self, host: &str, app_port: Option<u16>) {
        eventually(Duration::from_secs(30), &format!("sidecar on {host} ready"), || {
            let out = self.net.run(host, &["curl", "-sf", &format!("http://{ADMIN}/ready")]);
            async move { out.status.success().then_some(()) }
        })
        .await;
        if let Some(port) = app_port {
            let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port}");
            eventually(Duration::from_secs(30), &format!("app on {host} listening"), || {
                let out = self.net.run(host, &["bash", "-c", &probe]);
                async move { out.status.success().then_some(()) }
            })
            .await;
        }
    }

    fn metrics(&self, host: &str) -> String {
        String::from_utf8(self.net.run(host, &["curl", "-s", &format!("http://{ADMIN}/metrics")]).stdout).unwrap()
    }

    fn sh(&self, host: &str, script: &str) -> Output {
        self.net.run(host, &["sh", "-c", script])
    }

    /// Runs a python script in `host`; its standard output, which must be JSON.
    fn python(&self, host: &str, script: &str) -> serde_json::Value {
        let out = self.net.run(host, &[PYTHON, "-c", script]);
        assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Percentile `p` (0-100) of `samples` in milliseconds.
fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p / 100.0).round() as usize]
}

/// A python snippet timing `n` GETs of `url` (through `proxy` when given; each on a new
/// connection when `fresh`): JSON with the version each answer came from and the latencies in ms.
fn timed_gets(url: &str, n: usize, proxy: Option<&str>, fresh: bool) -> String {
    let proxies = proxy.map(|p| format!("{{'http': 'http://{p}'}}")).unwrap_or("None".into());
    let headers = if fresh { "{'Connection': 'close'}" } else { "None" };
    format!(
        r#"
import json, time, requests
s = requests.Session()
s.trust_env = False
versions, ms = {{}}, []
for _ in range({n}):
    t = time.perf_counter()
    r = s.get("{url}", proxies={proxies}, headers={headers}, timeout=5)
    ms.append((time.perf_counter() - t) * 1000)
    assert r.status_code == 200, (r.status_code, r.headers, r.text)
    v = r.json()["version"]
    versions[v] = versions.get(v, 0) + 1
print(json.dumps({{"versions": versions, "ms": ms}}))
"#
    )
}

/// DNS round trips to the namespace's resolver (which the rules send to the sidecar): the
/// answer's first A address and each query's time in ms.
fn timed_dns(name: &str, n: usize) -> String {
    format!(
        r#"
import json, socket, struct, time
ns = open("/etc/resolv.conf").read().split("nameserver")[1].split()[0]
q = b"".join(bytes([len(l)]) + l.encode() for l in "{name}".split(".")) + b"\0"
ms, addr = [], None
for i in range({n}):
    pkt = struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0) + q + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    t = time.perf_counter()
    s.sendto(pkt, (ns, 53))
    data = s.recv(512)
    ms.append((time.perf_counter() - t) * 1000)
    addr = socket.inet_ntoa(data[-4:]) if struct.unpack(">H", data[6:8])[0] else None
print(json.dumps({{"addr": addr, "ms": ms}}))
"#
    )
}

/// A DNS server answering every A query with 198.18.0.99 (stands for a namespace's resolver).
const UPSTREAM_DNS: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
while True:
    q, a = s.recvfrom(512)
    end = 12
    while q[end] != 0:
        end += 1 + q[end]
    end += 5
    r = q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + q[12:end]
    r += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x1e\x00\x04" + bytes([198, 18, 0, 99])
    s.sendto(r, a)
"#;

/// Sends a TLS ClientHello for server name `orders-api` to orders-api:443 right after
/// connecting, on 20 connections; the app behind is plain HTTP, so nothing answers it.
const TLS_HELLO: &str = r#"
import json, socket, ssl
ctx = ssl.create_default_context()
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(incoming, outgoing, server_hostname="orders-api")
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = outgoing.read()
for _ in range(20):
    s = socket.create_connection(("orders-api", 443), timeout=5)
    s.sendall(hello)
    s.close()
print(json.dumps({"sent": len(hello)}))
"#;

/// One A query for `orders-api` over TCP to the namespace's resolver.
const TCP_DNS_QUERY: &str = r#"
import json, socket, struct
ns = open("/etc/resolv.conf").read().split("nameserver")[1].split()[0]
q = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x0aorders-api\x00" + struct.pack(">HH", 1, 1)
s = socket.create_connection((ns, 53), timeout=5)
s.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", s.recv(2))[0]
data = b""
while len(data) < n:
    data += s.recv(n - len(data))
print(json.dumps({"addr": socket.inet_ntoa(data[-4:])}))
"#;

fn samples(v: &serde_json::Value) -> Vec<f64> {
    v["ms"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// The detection times the client sidecar logged, per protocol, in µs.
fn detection_micros(log: &str, protocol: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("protocol detected") && l.contains(&format!("protocol={protocol}")))
        .filter_map(|l| l.split("micros=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_clients_call_services_by_name_through_both_sidecars() {
    let Some(mesh) = mesh(&["client", "orders-v1", "orders-v2", "cache", "resolver"]).await else {
        return;
    };
    // The client namespace's own resolver: a DNS server on another host that answers every A
    // query with 198.18.0.99, so forwarding of names outside the mesh is visible.
    let resolver = mesh
        .net
        .spawn("resolver", "resolver", PYTHON, &["-c".into(), UPSTREAM_DNS.into()], &[]);
    mesh.net
        .set_resolv_conf("client", &format!("nameserver {}\n", mesh.addr("resolver")));
    let demo = |version| {
        [
            BIN,
            "demo-app",
            "--name",
            "orders-api",
            "--version",
            version,
            "--listen",
            "127.0.0.1:8080",
        ]
    };
    let labels = |version| ["service=orders-api".to_string(), format!("version={version}")];
    let (l1, l2) = (labels("v1"), labels("v2"));
    let _v1 = mesh.run("orders-v1", "default/orders-v1", &[&l1[0], &l1[1]], 8080, &[], &demo("v1"));
    let _v2 = mesh.run("orders-v2", "default/orders-v2", &[&l2[0], &l2[1]], 8080, &[], &demo("v2"));
    let _cache = mesh.run(
        "cache",
        "default/cache",
        &[],
        6379,
        &[],
        &[
            "redis-server",
            "--port",
            "6379",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    );
    let client = mesh.run("client", "default/client", &[], 9, &[], &["sleep", "3600"]);
    for host in ["orders-v1", "orders-v2", "cache", "client"] {
        mesh.ready(host, (host != "client").then(|| if host == "cache" { 6379 } else { 8080 }))
            .await;
    }

    // curl, by name: the sidecar's DNS answers with the service's virtual IP, the rules send the
    // connection to the sidecar, and it goes over mTLS to a callee's sidecar.
    let out = eventually(Duration::from_secs(20), "curl http://orders-api/ answers 200", || {
        let out = mesh.sh(
            "client",
            "curl -s -o /dev/null -w '%{http_code} %{remote_ip}' --max-time 5 http://orders-api/",
        );
        async move { String::from_utf8_lossy(&out.stdout).starts_with("200").then_some(out) }
    })
    .await;
    let remote_ip: Ipv4Addr = String::from_utf8_lossy(&out.stdout).split(' ').nth(1).unwrap().parse().unwrap();
    assert_eq!(
        remote_ip,
        weft_api::mesh::virtual_ip("default", "orders-api"),
        "curl dialled the virtual IP"
    );
    let callee_metrics = mesh.metrics("orders-v1") + &mesh.metrics("orders-v2");
    assert!(
        callee_metrics.lines().any(|l| l.starts_with("weft_proxy_requests_total{")
            && l.contains(r#"direction="inbound""#)
            && l.contains(r#"peer="spiffe://weft.local/ns/default/sa/client""#)),
        "a callee sidecar saw the client's identity over mTLS:\n{callee_metrics}"
    );

    // A TrafficPolicy split applies to intercepted traffic: 30/70 over 400 requests from python
    // requests, within 7 points (over 5 standard deviations of a binomial at n=400).
    let policy = "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: orders-split}\nspec:\n  service: orders-api\n  routes:\n    - name: split\n      backends: [{subset: v1, weight: 30}, {subset: v2, weight: 70}]\n";
    let file = mesh.data_dir.join("split.yaml");
    std::fs::write(&file, policy).unwrap();
    mesh.cli(&["apply", "-f", &file.display().to_string()]);
    eventually(Duration::from_secs(20), "the split is in force at the client", || {
        let got = mesh.python("client", &timed_gets("http://orders-api/", 20, None, false));
        async move { (got["versions"]["v1"].as_u64().is_some() && got["versions"]["v2"].as_u64().is_some()).then_some(()) }
    })
    .await;
    let intercepted = mesh.python("client", &timed_gets("http://orders-api/", 400, None, false));
    let v1_share = intercepted["versions"]["v1"].as_f64().unwrap_or(0.0) / 400.0 * 100.0;
    assert!(
        (v1_share - 30.0).abs() <= 7.0,
        "v1 got {v1_share:.1}% of 400, expected 30 ± 7: {}",
        intercepted["versions"]
    );

    // Added latency of interception: the same path through the explicit outbound listener (the
    // app using the sidecar as its HTTP proxy), same run.
    let explicit = mesh.python("client", &timed_gets("http://orders-api/", 400, Some(EXPLICIT), false));
    let fresh = mesh.python("client", &timed_gets("http://orders-api/", 200, None, true));
    let fresh_explicit = mesh.python("client", &timed_gets("http://orders-api/", 200, Some(EXPLICIT), true));
    for (what, i, e) in [
        ("one connection", &intercepted, &explicit),
        ("a new connection per request", &fresh, &fresh_explicit),
    ] {
        let (i, e) = (samples(i), samples(e));
        eprintln!(
            "MEASURE {what}: interception p50 {:.2} ms p99 {:.2} ms; explicit outbound p50 {:.2} ms p99 {:.2} ms ({} requests each, both sidecars, mTLS)",
            percentile(&i, 50.0),
            percentile(&i, 99.0),
            percentile(&e, 50.0),
            percentile(&e, 99.0),
            i.len()
        );
    }

    // DNS: mesh names answered by the sidecar, in every accepted form.
    for name in [
        "orders-api",
        "orders-api.default",
        "orders-api.default.svc",
        "orders-api.default.svc.weft.local",
    ] {
        let got = mesh.python("client", &timed_dns(name, 1));
        assert_eq!(
            got["addr"],
            weft_api::mesh::virtual_ip("default", "orders-api").to_string(),
            "{name}"
        );
    }
    // Other names go to the namespace's resolver; TCP queries are answered too.
    let outside = mesh.python("client", &timed_dns("www.example.org", 1));
    assert_eq!(
        outside["addr"],
        "198.18.0.99",
        "forwarded to the upstream resolver:\n{}",
        resolver.log_text()
    );
    let tcp = mesh.python("client", TCP_DNS_QUERY);
    assert_eq!(
        tcp["addr"],
        weft_api::mesh::virtual_ip("default", "orders-api").to_string(),
        "DNS over TCP"
    );
    let dns = mesh.python("client", &timed_dns("orders-api", 200));
    let d = samples(&dns);
    eprintln!(
        "MEASURE DNS answer for a mesh name: p50 {:.3} ms p99 {:.3} ms (200 queries)",
        percentile(&d, 50.0),
        percentile(&d, 99.0)
    );

    // redis through its declared opaque port: never sniffed, so the first reply needs no wait.
    let redis = mesh.sh("client", "redis-cli -h cache -p 6379 SET k v && redis-cli -h cache -p 6379 GET k");
    assert_eq!(
        String::from_utf8_lossy(&redis.stdout).trim(),
        "OK\nv",
        "{}",
        String::from_utf8_lossy(&redis.stderr)
    );
    let pings = mesh.python(
        "client",
        r#"
import json, socket, time
ms = []
for _ in range(50):
    t = time.perf_counter()
    s = socket.create_connection(("cache", 6379), timeout=5)
    s.sendall(b"PING\r\n")
    assert s.recv(64) == b"+PONG\r\n"
    ms.append((time.perf_counter() - t) * 1000)
    s.close()
print(json.dumps({"ms": ms}))
"#,
    );
    let p = samples(&pings);
    eprintln!(
        "MEASURE redis connect+PING through the declared opaque port: p50 {:.2} ms p99 {:.2} ms",
        percentile(&p, 50.0),
        percentile(&p, 99.0)
    );
    let log = client.log_text();
    assert!(
        log.lines().all(|l| !(l.contains("protocol detected") && l.contains(":6379"))),
        "the opaque port was never sniffed"
    );
    let http1 = detection_micros(&log, "Http1");
    assert!(!http1.is_empty(), "HTTP/1.1 was detected on intercepted connections");
    eprintln!(
        "MEASURE detection: HTTP/1.1 p50 {:.0} µs p99 {:.0} µs over {} connections",
        percentile(&http1, 50.0),
        percentile(&http1, 99.0),
        http1.len()
    );
    // HTTP/2 with prior knowledge, and TLS (passed through by SNI as opaque TCP), 20 connections
    // each.
    let h2 = mesh.sh(
        "client",
        "for i in $(seq 20); do curl -s -o /dev/null -w '%{http_code} ' --http2-prior-knowledge --max-time 5 http://orders-api/; done",
    );
    assert_eq!(String::from_utf8_lossy(&h2.stdout), "200 ".repeat(20));
    // A TLS ClientHello (made in memory, so it is sent at once after connecting).
    mesh.python("client", TLS_HELLO);
    let log = eventually(Duration::from_secs(5), "h2 and TLS detections logged", || {
        let log = client.log_text();
        let logged = detection_micros(&log, "H2").len() >= 20 && detection_micros(&log, "Tls").len() >= 20;
        async move { logged.then_some(log) }
    })
    .await;
    assert!(
        log.contains(r#"protocol=Tls { sni: Some("orders-api") }"#),
        "the TLS hello's server name was read"
    );
    // Detection time runs from accept to decision, so it includes the client's own delay before
    // its first bytes (curl prepares its TLS context after connecting).
    for protocol in ["H2", "Tls"] {
        let micros = detection_micros(&log, protocol);
        eprintln!(
            "MEASURE detection: {protocol} p50 {:.0} µs p99 {:.0} µs over {} connections",
            percentile(&micros, 50.0),
            percentile(&micros, 99.0),
            micros.len()
        );
    }
}

/// The packet counter of `host`'s outbound redirect rule, as a shell function `redirected`.
const REDIRECTED_SH: &str =
    "redirected() { nft list chain ip weft-intercept output | sed -n 's/.*packets \\([0-9]*\\).*redirect to :15001.*/\\1/p'; }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_job_exits_with_its_own_code_leaves_nothing_behind_and_skips_bypass() {
    let Some(mesh) = mesh(&["job", "orders", "ext", "ext2"]).await else {
        return;
    };
    let demo = [BIN, "demo-app", "--name", "orders", "--listen", "127.0.0.1:8080"];
    let _orders = mesh.run("orders", "default/orders", &[], 8080, &[], &demo);
    let server = |host: &str, port: &str| {
        mesh.net.spawn(
            host,
            &format!("http-{host}-{port}"),
            PYTHON,
            &["-m".into(), "http.server".into(), port.into()],
            &[],
        )
    };
    let _servers = [server("ext", "8000"), server("ext", "8001"), server("ext2", "8000")];
    mesh.ready("orders", Some(8080)).await;
    let (ext, ext2) = (mesh.addr("ext"), mesh.addr("ext2"));
    for (host, addr) in [("ext", ext), ("ext2", ext2)] {
        eventually(Duration::from_secs(10), &format!("http.server on {host}"), || {
            let out = mesh.sh(host, &format!("curl -sf -o /dev/null http://{addr}:8000/"));
            async move { out.status.success().then_some(()) }
        })
        .await;
    }

    // The job calls a mesh service by name, then checks from the rules' own counter that the
    // skipped port and CIDR went around the sidecar while another destination did not, and
    // exits with its own code (7); each failed step exits with a code of its own.
    let script = format!(
        "{REDIRECTED_SH}
         curl -sf -o /dev/null --max-time 5 http://orders/ || exit 10
         a=$(redirected); curl -sf -o /dev/null --max-time 5 http://{ext}:8001/ || exit 11
         b=$(redirected); [ \"$a\" = \"$b\" ] || exit 12
         curl -sf -o /dev/null --max-time 5 http://{ext2}:8000/ || exit 13
         c=$(redirected); [ \"$b\" = \"$c\" ] || exit 14
         curl -sf -o /dev/null --max-time 5 http://{ext}:8000/ || exit 15
         d=$(redirected); [ \"$d\" -gt \"$c\" ] || exit 16
         exit 7"
    );
    let mut job = mesh.run(
        "job",
        "default/job",
        &[],
        9,
        &["--skip-outbound-ports", "8001", "--skip-cidrs", &format!("{ext2}/32")],
        &["sh", "-c", &script],
    );
    let code = tokio::task::spawn_blocking(move || {
        let code = job.wait(Duration::from_secs(60));
        (code, job)
    })
    .await
    .unwrap();
    let (code, job) = code;
    assert_eq!(code, Some(7), "weft run ends with the job's own code:\n{}", job.log_text());
    let tables = mesh.net.run("job", &["nft", "list", "tables"]);
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("weft-intercept"),
        "the rules are removed: {}",
        String::from_utf8_lossy(&tables.stdout)
    );
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", &mesh.net.host("job").netns])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&pids.stdout).trim(),
        "",
        "no process is left in the job's namespace"
    );

    // Without interception the app calls through the explicit outbound listener, and its exit
    // code is still weft run's.
    let explicit = mesh.launch(
        "job",
        "default/job",
        &[],
        9,
        &[],
        &[
            "sh",
            "-c",
            &format!("curl -sf -o /dev/null --max-time 5 -x http://{EXPLICIT} http://orders/ || exit 20; exit 3"),
        ],
    );
    let (code, explicit) = tokio::task::spawn_blocking(move || {
        let mut p = explicit;
        (p.wait(Duration::from_secs(60)), p)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(3), "{}", explicit.log_text());

    // Rules that cannot be installed (no nft to run): the app is never started, and the
    // error says why.
    let marker = mesh.data_dir.join("started");
    let control = format!("https://{}:{GRPC_PORT}", mesh.addr("control"));
    let out = std::process::Command::new("/usr/sbin/ip")
        .args(["netns", "exec", &mesh.net.host("job").netns, BIN, "run", "--control", &control])
        .args(["--workload", "default/job", "--cluster", "cluster-a", "--app", "127.0.0.1:9"])
        .args(["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0", "--intercept", "--"])
        .args(["/usr/bin/touch", &marker.display().to_string()])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!marker.exists(), "the app was not started");
    assert!(
        stderr.contains("the app was not started") && stderr.contains("cannot run nft"),
        "the error says why: {stderr}"
    );
}

/// An app that serves slowly (each request logged to ARRIVALS, then answered after 1.5 s) and,
/// when CALL is set, calls it 20 times at once at start; on SIGTERM it waits for those calls
/// and exits 0 only if all 20 succeeded, writing their statuses to RESULT.
const SLOW_APP: &str = r#"
import json, os, signal, sys, threading, time, requests
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
arrivals = os.environ["ARRIVALS"]
lock = threading.Lock()
class Slow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        with lock:
            open(arrivals, "a").write("x\n")
        time.sleep(1.5)
        body = b"slow ok"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
# A listen backlog for 20 connections at once (the default, 5, drops SYNs under that burst).
ThreadingHTTPServer.request_queue_size = 128
server = ThreadingHTTPServer(("127.0.0.1", 8080), Slow)
threading.Thread(target=server.serve_forever, daemon=True).start()
statuses = []
def call(url):
    try:
        statuses.append(requests.get(url, timeout=20).status_code)
    except Exception as e:
        statuses.append(str(e))
calls = [threading.Thread(target=call, args=(os.environ["CALL"],)) for _ in range(20)] if os.environ.get("CALL") else []
for t in calls:
    t.start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
stop.wait()
for t in calls:
    t.join()
open(os.environ["RESULT"], "w").write(json.dumps(statuses))
sys.exit(0 if all(s == 200 for s in statuses) else 3)
"#;

fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_loses_no_request_in_flight_in_either_direction() {
    let Some(mesh) = mesh(&["caller", "middle", "backend"]).await else {
        return;
    };
    let dir = &mesh.data_dir;
    let app = dir.join("slow.py");
    std::fs::write(&app, SLOW_APP).unwrap();
    let (backend_arrivals, middle_arrivals, result) =
        (dir.join("backend.arrivals"), dir.join("middle.arrivals"), dir.join("middle.result"));
    let app = app.display().to_string();
    let env_of = |arrivals: &PathBuf, call: &str| format!("ARRIVALS={} RESULT={} CALL={call}", arrivals.display(), result.display());
    let backend_env = env_of(&backend_arrivals, "");
    let middle_env = env_of(&middle_arrivals, "http://backend/");
    let _backend = mesh.run(
        "backend",
        "default/backend",
        &[],
        8080,
        &[],
        &["sh", "-c", &format!("exec env {backend_env} {PYTHON} {app}")],
    );
    mesh.ready("backend", Some(8080)).await;
    let mut middle = mesh.run(
        "middle",
        "default/middle",
        &[],
        8080,
        &[],
        &["sh", "-c", &format!("exec env {middle_env} {PYTHON} {app}")],
    );
    let _caller = mesh.run("caller", "default/caller", &[], 9, &[], &["sleep", "3600"]);
    mesh.ready("middle", Some(8080)).await;
    mesh.ready("caller", None).await;

    // The first lookup of a name costs the caller's sidecar a control-plane round trip; done
    // here, so the burst below does not race glibc's resolver timeout on a loaded machine.
    let looked_up = mesh.sh("caller", "getent hosts middle");
    assert!(looked_up.status.success(), "middle resolves in the caller's namespace");
    // 20 requests into middle from an unmodified client; middle's app has 20 of its own out.
    let clients = mesh
        .net
        .command("caller", PYTHON)
        .args([
            "-c",
            r#"
import json, threading, requests
out = []
def get():
    try:
        out.append(requests.get("http://middle/", timeout=20).status_code)
    except Exception as e:
        out.append(str(e))
ts = [threading.Thread(target=get) for _ in range(20)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(out))
"#,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while lines(&middle_arrivals) < 20 || lines(&backend_arrivals) < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "20 requests in flight each way at middle: {} in, {} out after 20 s",
            lines(&middle_arrivals),
            lines(&backend_arrivals)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    middle.signal(nix::sys::signal::Signal::SIGTERM);
    let clients = tokio::task::spawn_blocking(move || clients.wait_with_output().unwrap())
        .await
        .unwrap();
    let inbound: Vec<serde_json::Value> =
        serde_json::from_slice(&clients.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&clients.stderr)));
    let (code, middle) = tokio::task::spawn_blocking(move || (middle.wait(Duration::from_secs(30)), middle))
        .await
        .unwrap();
    assert_eq!(inbound.len(), 20);
    assert!(
        inbound.iter().all(|s| s == 200),
        "every inbound request in flight finished: {inbound:?}"
    );
    let outbound = std::fs::read_to_string(&result).expect("the app wrote its outbound results");
    assert_eq!(
        code,
        Some(0),
        "the app's 20 outbound calls all succeeded ({outbound}):\n{}",
        middle.log_text()
    );
    assert_eq!(outbound.matches("200").count(), 20, "{outbound}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_an_intercepted_namespace_the_apps_port_is_reached_only_through_the_sidecar() {
    let Some(mesh) = mesh(&["app", "raw"]).await else { return };
    // The app listens on every address, as unmodified apps do.
    let demo = [BIN, "demo-app", "--name", "app", "--listen", "0.0.0.0:8080"];
    let _app = mesh.run("app", "default/app", &[], 8080, &[], &demo);
    mesh.ready("app", Some(8080)).await;
    let url = format!("http://{}:8080/", mesh.addr("app"));
    let raw_get = || {
        let out = mesh.sh("raw", &format!("curl -s -o /dev/null -w '%{{http_code}}' --max-time 3 {url}"));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let plaintext_inbound = |m: &str| weft_test::metric(m, "weft_proxy_inbound_connections_total", &[r#"transport="plaintext""#]);

    // Permissive (the default): a raw connection to the app's port from a namespace without a
    // sidecar is answered, but by way of the sidecar (which counts it), never by the app alone.
    let before = plaintext_inbound(&mesh.metrics("app"));
    assert_eq!(raw_get(), "200");
    let after = plaintext_inbound(&mesh.metrics("app"));
    assert!(after > before, "the raw connection went through the sidecar ({before} -> {after})");

    // Strict: the same connection is refused.
    let policy =
        "apiVersion: weft/v1\nkind: SecurityPolicy\nmetadata: {name: app-strict}\nspec:\n  selector: {service: app}\n  mtls: strict\n";
    let file = mesh.data_dir.join("strict.yaml");
    std::fs::write(&file, policy).unwrap();
    mesh.cli(&["apply", "-f", &file.display().to_string()]);
    eventually(Duration::from_secs(20), "a raw connection to the app's port is refused", || {
        let code = raw_get();
        async move { (code != "200").then_some(()) }
    })
    .await;
    for _ in 0..20 {
        assert_ne!(raw_get(), "200", "no raw connection reaches the app under strict");
    }
    let refused = weft_test::metric(
        &mesh.metrics("app"),
        "weft_proxy_inbound_connections_total",
        &[r#"outcome="refused-strict""#],
    );
    assert!(refused >= 20.0, "the sidecar refused them: {refused}");
}

/// A gRPC server (grpcio, generic handler: no generated code) echoing `/test.Echo/Say`.
const GRPC_SERVER: &str = r#"
import concurrent.futures, grpc
echo = grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"echo:" + req)
server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Say": echo}),))
server.add_insecure_port("127.0.0.1:50051")
server.start()
server.wait_for_termination()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmodified_grpc_client_calls_a_service_by_name() {
    let Some(mesh) = mesh(&["client", "greeter"]).await else { return };
    let _greeter = mesh.run("greeter", "default/greeter", &[], 50051, &[], &[PYTHON, "-c", GRPC_SERVER]);
    let _client = mesh.run("client", "default/client", &[], 9, &[], &["sleep", "3600"]);
    mesh.ready("greeter", Some(50051)).await;
    mesh.ready("client", None).await;
    let call = r#"
import grpc, json
say = grpc.insecure_channel("greeter:50051").unary_unary("/test.Echo/Say")
print(json.dumps({"reply": [say(b"hello %d" % i, timeout=10).decode() for i in range(20)]}))
"#;
    let got = mesh.python("client", call);
    let replies: Vec<String> = (0..20).map(|i| format!("echo:hello {i}")).collect();
    assert_eq!(got["reply"], serde_json::json!(replies));
    let metrics = mesh.metrics("greeter");
    assert!(
        metrics.lines().any(|l| l.starts_with("weft_proxy_requests_total{")
            && l.contains(r#"direction="inbound""#)
            && l.contains(r#"peer="spiffe://weft.local/ns/default/sa/client""#)),
        "the greeter's sidecar served the calls over mTLS from the client:\n{metrics}"
    );
}

/// A `weft up --intercept` of the test's: its process, API address, data directory and CLI
/// config file (so it logs no one's CLI in).
struct Up {
    process: Process,
    api: std::net::SocketAddr,
    data_dir: PathBuf,
    config: PathBuf,
}

impl Up {
    fn start(name: &str) -> Up {
        let api = weft_test::free_addr();
        let data_dir = std::env::temp_dir().join(format!("weft-up-intercept-{}-{name}", std::process::id()));
        let config = data_dir.with_extension("cli.json");
        let _ = std::fs::remove_dir_all(&data_dir);
        let args = [
            "up",
            "--intercept",
            "--api",
            &api.to_string(),
            "--data-dir",
            &data_dir.display().to_string(),
        ]
        .map(String::from);
        let process = Process::spawn_env(BIN, name, &args, &[("WEFT_CONFIG", config.to_str().unwrap()), ("NO_COLOR", "1")]);
        Up {
            process,
            api,
            data_dir,
            config,
        }
    }

    /// Once it says it is up (every workload started and ready).
    async fn up(&self) {
        eventually(Duration::from_secs(60), "weft up says the mesh is up", || {
            let text = self.process.log_text();
            async move { text.contains("weft demo mesh is up").then_some(()) }
        })
        .await;
    }

    /// The demo's services, once it is up and all six report traffic to the control plane
    /// (the readiness probes alone give a service traffic before the last workload starts).
    async fn serving(&self) -> Vec<serde_json::Value> {
        self.up().await;
        let ca_file = self.data_dir.join("control").join("ca.pem");
        let token_file = self.data_dir.join("control").join("admin.token");
        eventually(Duration::from_secs(60), "all six demo services show rps > 0", || async {
            let http = weft_test::http::Client::trusting(&std::fs::read_to_string(&ca_file).ok()?);
            let token = std::fs::read_to_string(&token_file).ok()?;
            let req = hyper::Request::get(format!("https://{}/api/v1/status", self.api))
                .header("authorization", format!("Bearer {}", token.trim()))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            let services = http.send(req).await.ok()?.json()["services"].as_array()?.clone();
            (services.len() == 6 && services.iter().all(|v| v["rps"].as_f64().unwrap_or(0.0) > 0.0)).then_some(services)
        })
        .await
    }

    /// `argv` run in workload `workload`'s namespace.
    fn run_in(&self, workload: &str, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &format!("weft-up-{}-{workload}", self.process.pid())])
            .args(argv)
            .output()
            .unwrap()
    }
}

impl Drop for Up {
    /// Stopped cleanly, so a failed test leaves no namespace behind either.
    fn drop(&mut self) {
        if self.process.is_running() {
            self.process.terminate(Duration::from_secs(20));
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Waits until none of `pids` exists: a child killed at the end of its grace period, or by the
/// removal of its namespace, takes a moment to be gone.
async fn no_process_left(pids: &[u32], what: &str) {
    eventually(Duration::from_secs(10), &format!("no process {what} left"), || {
        let alive = pids.iter().any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        async move { (!alive).then_some(()) }
    })
    .await;
}

/// What a `weft up` with process id `pid` may leave: its namespaces and their resolv.conf.
fn up_leftovers(pid: u32) -> Vec<String> {
    let prefix = format!("weft-up-{pid}-");
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let mut left: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(|n| format!("netns {n}"))
        .collect();
    if let Ok(dir) = std::fs::read_dir("/etc/netns") {
        left.extend(
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(&prefix))
                .map(|n| format!("/etc/netns/{n}")),
        );
    }
    left
}

/// `weft up --intercept`: the demo's apps, each in a namespace of its own, call each other by
/// plain names through both sidecars with mTLS; a run killed with SIGKILL leaves namespaces the
/// next start removes (with anything still in them); Ctrl-C removes everything. Without root,
/// it refuses and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_up_intercept_runs_the_demo_by_name_and_leaves_nothing_behind() {
    if let Err(refused) = Network::new(&["probe"]) {
        assert_eq!(Network::skip_reason(&refused), KERNEL_REFUSES);
        return;
    }
    let unprivileged = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN, "up", "--intercept"])
        .output()
        .unwrap();
    assert_eq!(unprivileged.status.code(), Some(64), "refused without root, as invalid use");
    let said = String::from_utf8_lossy(&unprivileged.stderr);
    assert!(said.contains("weft up --intercept: needs root"), "{said}");

    let started = std::time::Instant::now();
    let mut killed = Up::start("weft-up-killed");
    let services = killed.serving().await;
    eprintln!(
        "MEASURE weft up --intercept: all six services serving after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        services.iter().find(|v| v["name"] == "inventory-svc").unwrap()["proxies"]["total"],
        2
    );
    // The demo apps know nothing of the mesh: orders-api's sidecar sees checkout-api's identity
    // on the calls checkout-api's app makes to http://orders-api/ (waited for: the services'
    // traffic above may be the readiness probes' alone on a slow machine).
    eventually(
        Duration::from_secs(30),
        "orders-api's sidecar serves checkout-api over mTLS",
        || {
            let out = killed.run_in("orders-api", &["curl", "-s", "http://198.18.0.13:15020/metrics"]);
            let from_checkout = weft_test::metric(
                &String::from_utf8_lossy(&out.stdout),
                "weft_proxy_requests_total",
                &[
                    r#"direction="inbound""#,
                    r#"peer="spiffe://weft.local/ns/default/sa/checkout-api""#,
                    r#"status="200""#,
                ],
            );
            async move { (from_checkout > 0.0).then_some(()) }
        },
    )
    .await;
    // And a plain curl in checkout-api's namespace reaches orders-api, and through it payments.
    let by_name = killed.run_in("checkout-api-v1", &["curl", "-s", "-m", "10", "http://orders-api/by-name"]);
    let reply: serde_json::Value = serde_json::from_slice(&by_name.stdout).unwrap_or_default();
    assert_eq!(
        (
            reply["service"].as_str(),
            reply["calls"][0]["service"].as_str(),
            reply["calls"][0]["status"].as_u64()
        ),
        (Some("orders-api"), Some("payments-svc"), Some(200)),
        "{reply}"
    );

    // Killed: nothing of it runs its cleanup, so its namespaces stay until the next start.
    let first = killed.process.pid();
    let first_children = descendants(first);
    killed.process.kill();
    assert!(!up_leftovers(first).is_empty(), "a killed run leaves its namespaces");
    let mut up = Up::start("weft-up-clean");
    up.up().await;
    assert_eq!(
        up_leftovers(first),
        Vec::<String>::new(),
        "the next start removed the killed run's namespaces"
    );
    no_process_left(&first_children, "of the killed run").await;

    let second = up.process.pid();
    let children = descendants(second);
    assert_eq!(children.len(), 17, "control plane + 8 `weft run` + 8 apps: {children:?}");
    up.process.signal(nix::sys::signal::Signal::SIGINT);
    let stopping = std::time::Instant::now();
    assert_eq!(
        up.process.wait(Duration::from_secs(20)),
        Some(0),
        "weft up exits cleanly on SIGINT:\n{}",
        up.process.log_text()
    );
    eprintln!(
        "MEASURE weft up --intercept: stopped after {:.1} s",
        stopping.elapsed().as_secs_f64()
    );
    no_process_left(&children, "of the stopped run").await;
    assert_eq!(up_leftovers(second), Vec::<String>::new(), "no namespace is left");
    let tables = Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("weft-intercept"),
        "no rule in the machine's own namespace"
    );
    assert!(std::net::TcpListener::bind(up.api).is_ok(), "the API port is free again");
}

/// An app that dials a service's virtual IP its own sidecar never handed out (resolved on
/// another host here; hard-coded or cached from before a restart in life) still reaches the
/// service through both sidecars: the sidecar asks the control plane for the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_ip_dialled_without_resolving_it_reaches_its_service() {
    let Some(mesh) = mesh(&["client", "elsewhere", "orders"]).await else {
        return;
    };
    let demo = [BIN, "demo-app", "--name", "orders-api", "--listen", "127.0.0.1:8080"];
    let _orders = mesh.run("orders", "default/orders", &["service=orders-api"], 8080, &[], &demo);
    let _elsewhere = mesh.run("elsewhere", "default/elsewhere", &[], 9, &[], &["sleep", "3600"]);
    let _client = mesh.run("client", "default/client", &[], 9, &[], &["sleep", "3600"]);
    mesh.ready("orders", Some(8080)).await;
    mesh.ready("elsewhere", None).await;
    mesh.ready("client", None).await;
    let vip = eventually(Duration::from_secs(20), "orders-api resolves on another host", || {
        let out = mesh.sh("elsewhere", "getent hosts orders-api");
        let ip = String::from_utf8_lossy(&out.stdout).split_whitespace().next().map(str::to_string);
        async move { ip.and_then(|ip| ip.parse::<Ipv4Addr>().ok()) }
    })
    .await;
    assert!(weft_api::mesh::VIRTUAL_IPS.contains(vip), "{vip}");
    let config = String::from_utf8(
        mesh.net
            .run("client", &["curl", "-s", &format!("http://{ADMIN}/config_dump")])
            .stdout,
    )
    .unwrap();
    assert!(
        !config.contains("orders-api"),
        "the client's sidecar knows nothing of orders-api yet:\n{config}"
    );

    let out = mesh.sh(
        "client",
        &format!("curl -s -w ' %{{http_code}}' --max-time 5 http://{vip}/by-address"),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with(" 200") && text.contains(r#""service":"orders-api""#),
        "the virtual IP reached orders-api: {text:?}"
    );
    let callee = mesh.metrics("orders");
    assert!(
        callee.lines().any(|l| l.starts_with("weft_proxy_requests_total{")
            && l.contains(r#"direction="inbound""#)
            && l.contains(r#"peer="spiffe://weft.local/ns/default/sa/client""#)),
        "through both sidecars, with the client's identity:\n{callee}"
    );
}

/// An app serving HTTP on 8080 (its declared port), 9090 and 9091, each on one dual-stack socket
/// (every IPv4 and IPv6 address), each answering with its own port number; and on 7000 a
/// protocol of its own (not HTTP, not TLS): it answers each line with `echo:` and the line.
const PORTS_APP: &str = r#"
import socket, socketserver, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Port(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = str(self.server.server_address[1]).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class DualStack(ThreadingHTTPServer):
    address_family = socket.AF_INET6
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"echo:" + line)
class EchoServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
servers = [DualStack(("::", p), Port) for p in (8080, 9090, 9091)] + [EchoServer(("::", 7000), Echo)]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
"#;

const APP_V6: &str = "fd00::a";
const RAW_V6: &str = "fd00::b";

/// `curl URL` from `host`: the body and the status, as `BODY STATUS` (` 000` when no answer).
fn curl(mesh: &Mesh, host: &str, url: &str) -> String {
    let out = mesh.sh(host, &format!("curl -s --max-time 3 -w ' %{{http_code}}' '{url}'"));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Every port of an intercepted app is reached through the sidecar, not only the declared one:
/// under strict mTLS a plaintext client in another namespace reaches no port of the app (IPv4 or
/// IPv6), a sidecar caller reaches an undeclared port over mTLS, and a `--skip-inbound-ports`
/// port is reached directly. IPv6, which is not redirected, is refused both ways (fail closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_app_port_goes_through_the_sidecar_and_ipv6_fails_closed() {
    let Some(mesh) = mesh(&["app", "raw", "caller"]).await else {
        return;
    };
    for (host, v6) in [("app", APP_V6), ("raw", RAW_V6)] {
        let out = mesh
            .net
            .run(host, &["ip", "-6", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let script = mesh.data_dir.join("ports.py");
    std::fs::write(&script, PORTS_APP).unwrap();
    let script = script.display().to_string();
    let app_run = mesh.run(
        "app",
        "default/app",
        &[],
        8080,
        &["--skip-inbound-ports", "9091"],
        &[PYTHON, &script],
    );
    let _caller = mesh.run("caller", "default/caller", &[], 9, &[], &["sleep", "3600"]);
    let _outside = mesh.net.spawn(
        "raw",
        "http-raw",
        PYTHON,
        &["-m".into(), "http.server".into(), "--bind".into(), "::".into(), "8000".into()],
        &[],
    );
    mesh.ready("app", Some(8080)).await;
    mesh.ready("caller", None).await;
    let app = mesh.addr("app");
    let inbound = |labels: &[&str]| weft_test::metric(&mesh.metrics("app"), "weft_proxy_inbound_connections_total", labels);

    // Permissive: a raw connection to an undeclared port is answered, by way of the sidecar.
    let before = inbound(&[r#"transport="plaintext""#]);
    assert_eq!(curl(&mesh, "raw", &format!("http://{app}:9090/")), "9090 200");
    let after = inbound(&[r#"transport="plaintext""#]);
    assert_eq!(after - before, 1.0, "the connection to port 9090 went through the sidecar");

    let policy =
        "apiVersion: weft/v1\nkind: SecurityPolicy\nmetadata: {name: app-strict}\nspec:\n  selector: {service: app}\n  mtls: strict\n";
    let file = mesh.data_dir.join("strict.yaml");
    std::fs::write(&file, policy).unwrap();
    mesh.cli(&["apply", "-f", &file.display().to_string()]);
    eventually(Duration::from_secs(20), "strict in force at the app's sidecar", || {
        let got = curl(&mesh, "raw", &format!("http://{app}:8080/"));
        async move { got.ends_with(" 000").then_some(()) }
    })
    .await;

    // Strict: no plaintext connection reaches an undeclared port; the sidecar refuses each.
    let before = inbound(&[r#"outcome="refused-strict""#]);
    for _ in 0..10 {
        assert_eq!(curl(&mesh, "raw", &format!("http://{app}:9090/")), " 000", "port 9090 under strict");
    }
    let after = inbound(&[r#"outcome="refused-strict""#]);
    assert_eq!(after - before, 10.0, "the sidecar refused the 10 connections to port 9090");
    // A skipped port is reached directly (the sidecar would have refused it).
    assert_eq!(curl(&mesh, "raw", &format!("http://{app}:9091/")), "9091 200");

    // A caller with a sidecar reaches the undeclared port by name, over mTLS.
    let peer = r#"peer="spiffe://weft.local/ns/default/sa/caller""#;
    let served = || {
        weft_test::metric(
            &mesh.metrics("app"),
            "weft_proxy_requests_total",
            &[r#"direction="inbound""#, peer, r#"status="200""#],
        )
    };
    let before = served();
    let got = eventually(Duration::from_secs(20), "caller reaches app:9090", || {
        let got = curl(&mesh, "caller", "http://app:9090/");
        async move { got.ends_with(" 200").then_some(got) }
    })
    .await;
    assert_eq!(got, "9090 200", "the caller reached port 9090, not the declared 8080");
    assert_eq!(
        curl(&mesh, "caller", "http://app/"),
        "8080 200",
        "the service's default port is the declared one"
    );
    // Dialling the app's own address (an endpoint's, not the virtual IP) is the mesh too.
    assert_eq!(curl(&mesh, "caller", &format!("http://{app}:9090/")), "9090 200");
    // A protocol the sidecar does not know goes to its port as opaque TCP over mTLS.
    let echo = mesh.python(
        "caller",
        r#"
import json, socket
s = socket.create_connection(("app", 7000), timeout=5)
s.sendall(b"hello\n")
print(json.dumps({"reply": s.makefile("rb").readline().decode()}))
"#,
    );
    assert_eq!(
        echo["reply"], "echo:hello\n",
        "an unknown protocol reached port 7000 through both sidecars"
    );
    let after = served();
    assert!(
        after - before >= 2.0,
        "the app's sidecar served the caller's requests over mTLS ({before} -> {after})"
    );

    // IPv6 is not redirected, so it is refused: nothing reaches the app over it but its skipped
    // port, and the app reaches nothing over it (IPv4 to the same server goes through).
    for port in [8080, 9090] {
        assert_eq!(
            curl(&mesh, "raw", &format!("http://[{APP_V6}]:{port}/")),
            " 000",
            "IPv6 to port {port}"
        );
    }
    assert_eq!(
        curl(&mesh, "raw", &format!("http://[{APP_V6}]:9091/")),
        "9091 200",
        "IPv6 to the skipped port"
    );
    let raw = mesh.addr("raw");
    let egress = |url: String| {
        let out = mesh.sh("app", &format!("curl -s -o /dev/null --max-time 3 -w '%{{http_code}}' '{url}'"));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(
        egress(format!("http://[{RAW_V6}]:8000/")),
        "000",
        "the app's IPv6 egress is refused"
    );
    assert_eq!(egress(format!("http://{raw}:8000/")), "200", "its IPv4 egress goes through");

    // A `weft run` killed outright takes its app along: none is left serving with no sidecar.
    let apps = descendants(app_run.pid());
    assert!(!apps.is_empty(), "the app runs under weft run");
    app_run.signal(nix::sys::signal::Signal::SIGKILL);
    no_process_left(&apps, "of a weft run killed with SIGKILL").await;
    // Its rules stay (nothing was left to remove them); the next weft run replaces them, one copy
    // of each table, and removes both when it ends.
    let tables = || String::from_utf8_lossy(&mesh.net.run("app", &["nft", "list", "tables"]).stdout).to_string();
    assert_eq!(tables().matches("weft-intercept").count(), 2, "{}", tables());
    let mut again = mesh.run("app", "default/app", &[], 8080, &[], &["sleep", "3600"]);
    mesh.ready("app", None).await;
    assert_eq!(tables().matches("weft-intercept").count(), 2, "{}", tables());
    let rules = mesh.net.run("app", &["nft", "list", "table", "ip", "weft-intercept"]);
    assert_eq!(
        String::from_utf8_lossy(&rules.stdout).matches("redirect to").count(),
        4,
        "DNS (UDP, TCP), outbound and inbound, once each"
    );
    again.terminate(Duration::from_secs(30));
    assert_eq!(tables().matches("weft-intercept").count(), 0, "{}", tables());
}

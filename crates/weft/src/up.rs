//! `weft up`: the local demo mesh of DESIGN.md §7 as child processes: the control plane, and for
//! each workload a `weft demo-app` with its own `weft proxy`, plus a traffic generator that sends
//! the seed's tenant, user and order headers to mobile-gateway. SIGINT or SIGTERM stops every
//! child (SIGTERM, then SIGKILL after a grace period); children also exit on their own if this
//! process dies, because their standard input closes.
//!
//! With `--intercept` (root on Linux) each workload runs in a network namespace of its own
//! ([`netns`]) the `weft run --intercept` way, and the demo apps call each other by plain
//! service names (`http://orders-api/`) as unmodified apps do. The control plane stays in the
//! machine's namespace on loopback, so its API, the dashboard and the CLI are where they are
//! without `--intercept`; the namespaces reach its gRPC port through a relay on the bridge (see
//! [`relay_control`]).

mod netns;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use netns::{BRIDGE_ADDR, Network};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

pub struct Options {
    pub traffic: bool,
    /// Three etcd members and three control-plane replicas instead of one control plane.
    pub ha: bool,
    pub api: SocketAddr,
    pub data_dir: Option<PathBuf>,
    pub rps: u32,
    /// Each workload in a network namespace of its own, its traffic intercepted.
    pub intercept: bool,
}

/// The ports every intercepted workload uses inside its own namespace (no two share one).
const APP_PORT: u16 = 8080;
const INBOUND_PORT: u16 = 15006;
const ADMIN_PORT: u16 = 15020;
const EXPLICIT_OUTBOUND: &str = "127.0.0.1:15000";

/// One workload of the demo.
struct Spec {
    workload: &'static str,
    service: &'static str,
    version: &'static str,
    cluster: &'static str,
    calls: &'static [&'static str],
}

const WORKLOADS: [Spec; 8] = [
    Spec {
        workload: "mobile-gateway",
        service: "mobile-gateway",
        version: "v1",
        cluster: "cluster-a",
        calls: &["checkout-api"],
    },
    Spec {
        workload: "checkout-api-v1",
        service: "checkout-api",
        version: "v1",
        cluster: "cluster-a",
        calls: &["orders-api", "profile-svc"],
    },
    Spec {
        workload: "checkout-api-v2",
        service: "checkout-api",
        version: "v2",
        cluster: "cluster-a",
        calls: &["orders-api", "profile-svc"],
    },
    Spec {
        workload: "orders-api",
        service: "orders-api",
        version: "v1",
        cluster: "cluster-b",
        calls: &["payments-svc", "inventory-svc"],
    },
    Spec {
        workload: "payments-svc",
        service: "payments-svc",
        version: "v1",
        cluster: "cluster-a",
        calls: &[],
    },
    Spec {
        workload: "profile-svc",
        service: "profile-svc",
        version: "v1",
        cluster: "cluster-b",
        calls: &[],
    },
    Spec {
        workload: "inventory-svc-c",
        service: "inventory-svc",
        version: "v1",
        cluster: "cluster-c",
        calls: &[],
    },
    Spec {
        workload: "inventory-svc-b",
        service: "inventory-svc",
        version: "v1",
        cluster: "cluster-b",
        calls: &[],
    },
];

const TENANTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];

/// The seed's four intents, queued in manual mode when the demo starts.
const SEED_INTENTS: [(&str, &str); 4] = [
    (
        "examples/intents/MESH-201-canary.yaml",
        include_str!("../../../examples/intents/MESH-201-canary.yaml"),
    ),
    (
        "examples/intents/MESH-202-retry-budget.yaml",
        include_str!("../../../examples/intents/MESH-202-retry-budget.yaml"),
    ),
    (
        "examples/intents/MESH-203-timeout.yaml",
        include_str!("../../../examples/intents/MESH-203-timeout.yaml"),
    ),
    (
        "examples/intents/MESH-204-mtls-strict.yaml",
        include_str!("../../../examples/intents/MESH-204-mtls-strict.yaml"),
    ),
];

struct Running {
    name: String,
    child: Child,
}

pub async fn run(opts: Options) -> anyhow::Result<ExitCode> {
    if opts.intercept
        && let Err(reason) = intercept_supported(&opts)
    {
        eprintln!("error: weft up --intercept: {reason}");
        return Ok(ExitCode::from(crate::EXIT_INVALID));
    }
    let shutdown = weft_core::Shutdown::new();
    weft_core::shutdown::install(&shutdown);
    let (data_dir, temporary) = match &opts.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("weft-up-{}-{}", std::process::id(), rand::random::<u32>())),
            true,
        ),
    };
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let exe = std::env::current_exe().context("locating the weft binary")?;
    let mut children: Vec<Running> = Vec::new();
    let started = Instant::now();
    let mut network = if opts.intercept {
        let names: Vec<&str> = WORKLOADS.iter().map(|w| w.workload).collect();
        Network::new(&names).map(Some)
    } else {
        Ok(None)
    };
    let outcome = match &network {
        Ok(network) => start_all(&opts, &exe, &data_dir, &logs, network.as_ref(), &mut children, &shutdown, started).await,
        Err(e) => Err(anyhow::anyhow!("building the namespaces: {e:#}")),
    };
    if let Err(e) = &outcome {
        eprintln!("error: {e:#}");
        eprintln!("logs: {}", logs.display());
    }
    if let Ok(Some(network)) = &mut network {
        network.stop_bridge_tasks();
    }
    stop_all(children).await;
    // The namespaces go last, once nothing runs in them.
    drop(network);
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    eprintln!("weft up: stopped");
    Ok(if outcome.is_ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Why `--intercept` cannot run here, if it cannot.
fn intercept_supported(opts: &Options) -> Result<(), &'static str> {
    if !cfg!(target_os = "linux") {
        return Err("network namespaces and nftables need Linux; run `weft up` without --intercept");
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "needs root (network namespaces and nftables rules); run it as root, or `weft up` without --intercept for the explicit mode",
        );
    }
    if opts.ha {
        return Err("not supported with --ha yet; use one or the other");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn start_all(
    opts: &Options,
    exe: &Path,
    data_dir: &Path,
    logs: &Path,
    network: Option<&Network>,
    children: &mut Vec<Running>,
    shutdown: &weft_core::Shutdown,
    started: Instant,
) -> anyhow::Result<()> {
    let grpc = free_port()?;
    let mut control_url = format!("https://{grpc}");
    let mut api_url = format!("https://{}", opts.api);
    let ca_file = data_dir.join("control").join(weft_control::serving::CA_FILE);
    let store = if opts.ha {
        Some(start_etcd(logs, data_dir, children).await?)
    } else {
        None
    };
    let mut args = vec![
        "control".to_string(),
        "--data-dir".into(),
        data_dir.join("control").display().to_string(),
        "--api".into(),
        opts.api.to_string(),
        "--grpc".into(),
        grpc.to_string(),
    ];
    if let Some(store) = &store {
        args.extend(["--store".into(), store.clone(), "--replica".into(), "r0".into()]);
    }
    if network.is_some() {
        // The proxies dial it at the relay's address on the bridge.
        args.extend(["--san".into(), BRIDGE_ADDR.to_string()]);
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    children.push(spawn(exe, logs, "control", &arg_refs)?);
    let mut api = wait_api(&api_url, &ca_file, Duration::from_secs(15), children)
        .await
        .context("the control plane did not come up")?;
    let mut replicas = Vec::new();
    if let Some(store) = &store {
        (control_url, api_url, replicas) = start_replicas(exe, data_dir, logs, store, &api_url, &grpc.to_string(), children).await?;
        api = wait_api(&api_url, &ca_file, Duration::from_secs(15), children)
            .await
            .context("the leading replica did not answer")?;
    }
    // The CLI and the dashboard of this user get the bootstrap admin token and the CA, no extra
    // step.
    let token_file = data_dir.join("control").join(weft_control::ADMIN_TOKEN_FILE);
    let token = crate::login::read_token_file(&token_file)?;
    let config = crate::login::save(&crate::login::Saved {
        server: api_url.clone(),
        token: token.clone(),
        ca_pem: Some(std::fs::read_to_string(&ca_file).with_context(|| format!("cannot read {}", ca_file.display()))?),
    })?;
    let api = api.with_token(Some(token));
    if let Some(network) = network {
        control_url = relay_control(network, grpc).await?;
    }
    let (headers, table, gateway) = match network {
        Some(network) => start_intercepted_all(exe, logs, network, &control_url, &api, children).await?,
        None => start_explicit_all(exe, logs, &control_url, &api, children).await?,
    };
    queue_seed_intents(&api).await?;
    say!(
        "weft demo mesh is up{} after {:.1} s",
        if network.is_some() { " (intercepted)" } else { "" },
        started.elapsed().as_secs_f64()
    );
    say!("  API:        {api_url}/api/v1/status");
    say!(
        "  dashboard:  {api_url}/  (TLS from the mesh CA: trust {} in your browser)",
        ca_file.display()
    );
    if network.is_some() {
        say!("  control:    {control_url} (gRPC over TLS, relayed from the bridge to loopback)");
    } else {
        say!("  control:    {control_url} (gRPC over TLS)");
    }
    for line in &replicas {
        say!("  {line}");
    }
    say!("  CA:         {}", ca_file.display());
    say!("  logs:       {}", logs.display());
    say!("  admin token: {} (the dashboard asks for it once)", token_file.display());
    say!(
        "  CLI:        logged in as admin in {} (`weft login` replaces it)",
        config.display()
    );
    say!();
    crate::output::table(headers, &table);
    say!();
    if let Some(network) = network {
        say!(
            "each workload runs `weft run --intercept` in its namespace; its app listens on 127.0.0.1:{APP_PORT} and calls http://SERVICE/ by name; the sidecar's admin is on ADDRESS:{ADMIN_PORT}"
        );
        say!(
            "  e.g.  ip netns exec {} curl -s http://orders-api/",
            network.host("checkout-api-v1").netns
        );
    }
    say!("queued (manual mode): MESH-201..204, the seed's intents; `weft intent list`, `weft intent approve MESH-201`");
    say!("try:  weft status      (Ctrl-C stops everything)");
    if opts.traffic {
        let traffic = generate(gateway, opts.rps.max(1), shutdown.clone());
        match network {
            // From the bridge, where mobile-gateway's address is reachable.
            Some(network) => drop(network.spawn_on_bridge(traffic)),
            None => drop(tokio::spawn(traffic)),
        }
        say!(
            "traffic: {} rps into mobile-gateway with x-tenant, x-user and x-order headers",
            opts.rps
        );
    }
    watch(children, logs, shutdown).await
}

/// Rows of the summary table, under these headers, and where mobile-gateway's inbound listens.
type Started = (&'static [&'static str], Vec<Vec<String>>, SocketAddr);

/// Every workload as an app and a sidecar on loopback ports.
async fn start_explicit_all(
    exe: &Path,
    logs: &Path,
    control_url: &str,
    api: &crate::client::Api,
    children: &mut Vec<Running>,
) -> anyhow::Result<Started> {
    let mut gateway_inbound = None;
    let mut table = Vec::new();
    for spec in &WORKLOADS {
        let mut attempt = 1;
        let ports = loop {
            match start_workload(exe, logs, spec, control_url, api).await {
                Ok((mut started, ports)) => {
                    children.append(&mut started);
                    break ports;
                }
                // A port picked for it was taken before the child bound it: pick again.
                Err(e) if attempt < 3 => {
                    tracing::warn!(workload = spec.workload, error = %format!("{e:#}"), attempt, "workload did not start; retrying on new ports");
                    attempt += 1;
                }
                Err(e) => return Err(e.context(format!("{} did not start", spec.workload))),
            }
        };
        if spec.workload == "mobile-gateway" {
            gateway_inbound = Some(ports.inbound);
        }
        table.push(vec![
            spec.workload.to_string(),
            spec.cluster.to_string(),
            ports.app.to_string(),
            ports.inbound.to_string(),
            ports.outbound.to_string(),
            format!("http://{}", ports.admin),
        ]);
    }
    let headers: &[&str] = &["WORKLOAD", "CLUSTER", "APP", "INBOUND", "OUTBOUND", "ADMIN"];
    Ok((headers, table, gateway_inbound.expect("mobile-gateway is in the demo")))
}

/// `--intercept`: every workload in its namespace with `weft run --intercept`, one at a time,
/// each ready (sidecar, then the app through the sidecar) before the next.
async fn start_intercepted_all(
    exe: &Path,
    logs: &Path,
    network: &Network,
    control_url: &str,
    api: &crate::client::Api,
    children: &mut Vec<Running>,
) -> anyhow::Result<Started> {
    let mut table = Vec::new();
    for spec in &WORKLOADS {
        let host = network.host(spec.workload);
        children.push(start_intercepted(exe, logs, spec, host, control_url, api).await?);
        let probes = [
            format!("http://{}:{ADMIN_PORT}/ready", host.addr),
            // Through the sidecar's inbound side, as every caller reaches the app.
            format!("http://{}:{APP_PORT}/healthz", host.addr),
        ];
        for url in probes {
            wait_until(&url, Duration::from_secs(30), children, || {
                let answered = network.spawn_on_bridge(answers(url.clone()));
                async move { answered.await.unwrap_or(false) }
            })
            .await
            .with_context(|| format!("{} did not start", spec.workload))?;
        }
        table.push(vec![
            spec.workload.to_string(),
            spec.cluster.to_string(),
            host.netns.clone(),
            host.addr.to_string(),
        ]);
    }
    let gateway = SocketAddr::from((network.host("mobile-gateway").addr, INBOUND_PORT));
    let headers: &[&str] = &["WORKLOAD", "CLUSTER", "NETNS", "ADDRESS"];
    Ok((headers, table, gateway))
}

async fn queue_seed_intents(api: &crate::client::Api) -> anyhow::Result<()> {
    for (name, text) in SEED_INTENTS {
        match api.post("/api/v1/intents", text.to_string(), &[("x-weft-source", name)]).await {
            Ok(_) => {}
            // A kept --data-dir already holds them.
            Err(e) if e.to_string().contains("already exists") => {}
            Err(e) => return Err(e.context(format!("queueing the seed intent {name}"))),
        }
    }
    Ok(())
}

/// Until shutdown; an error as soon as any child exits by itself.
async fn watch(children: &mut [Running], logs: &Path, shutdown: &weft_core::Shutdown) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for c in children.iter_mut() {
                    if let Ok(Some(status)) = c.child.try_wait() {
                        bail!("{} exited unexpectedly ({status}); see its log in {}", c.name, logs.display());
                    }
                }
            }
        }
    }
}

/// One workload in its namespace: `weft run --intercept` with the demo app as its app, calling
/// the services it calls by name.
async fn start_intercepted(
    exe: &Path,
    logs: &Path,
    spec: &Spec,
    host: &netns::Host,
    control_url: &str,
    api: &crate::client::Api,
) -> anyhow::Result<Running> {
    let token = join_token(api, spec).await?;
    let exe = exe.display().to_string();
    let app = format!("127.0.0.1:{APP_PORT}");
    let mut args: Vec<String> = [
        "netns",
        "exec",
        &host.netns,
        &exe,
        "run",
        "--intercept",
        "--control",
        control_url,
        "--workload",
        &format!("default/{}", spec.workload),
        "--cluster",
        spec.cluster,
        "--label",
        &format!("service={}", spec.service),
        "--label",
        &format!("version={}", spec.version),
        "--app",
        &app,
        "--inbound",
        &format!("{}:{INBOUND_PORT}", host.addr),
        "--outbound",
        EXPLICIT_OUTBOUND,
        "--admin",
        &format!("{}:{ADMIN_PORT}", host.addr),
        "--",
        &exe,
        "demo-app",
        "--name",
        spec.service,
        "--version",
        spec.version,
        "--listen",
        &app,
    ]
    .map(String::from)
    .to_vec();
    for c in spec.calls {
        args.extend(["--call".to_string(), c.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_program(Path::new("ip"), logs, spec.workload, &args, &[("WEFT_TOKEN", &token)])
}

/// The control plane's gRPC port, relayed from the bridge (198.18.0.1, the same port number) to
/// its loopback listener. A namespace cannot reach the machine's loopback; rather than run the
/// control plane in a namespace of its own and forward its API and dashboard back to loopback
/// (two ports, and the CLI's saved server, the CA file and `--ha` to rework), one relayed port
/// leaves everything else as it is, and nothing is routed from the machine's namespace. TLS is
/// end to end: the control plane's certificate names the bridge address too (`--san`).
async fn relay_control(network: &Network, grpc: SocketAddr) -> anyhow::Result<String> {
    let on_bridge = SocketAddr::from((BRIDGE_ADDR, grpc.port()));
    let listener = network
        .spawn_on_bridge(async move { std::net::TcpListener::bind(on_bridge) })
        .await?
        .with_context(|| format!("binding the control-plane relay on {on_bridge}"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((mut from, _)) => {
                    tokio::spawn(async move {
                        if let Ok(mut to) = tokio::net::TcpStream::connect(grpc).await {
                            let _ = tokio::io::copy_bidirectional(&mut from, &mut to).await;
                        }
                    });
                }
                Err(error) => {
                    // Out of descriptors, most likely: give them time to close.
                    tracing::warn!(%error, "control-plane relay: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(format!("https://{on_bridge}"))
}

struct Ports {
    app: SocketAddr,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
}

/// Starts one workload's demo app and sidecar on fresh ports and waits until both serve. On
/// failure both are stopped and the error says which exited.
async fn start_workload(
    exe: &Path,
    logs: &std::path::Path,
    spec: &Spec,
    control_url: &str,
    api: &crate::client::Api,
) -> anyhow::Result<(Vec<Running>, Ports)> {
    let token = join_token(api, spec).await?;
    let ports = Ports {
        app: free_port()?,
        inbound: free_port()?,
        outbound: free_port()?,
        admin: free_port()?,
    };
    let mut app_args = vec![
        "demo-app".to_string(),
        "--name".into(),
        spec.service.into(),
        "--version".into(),
        spec.version.into(),
        "--listen".into(),
        ports.app.to_string(),
    ];
    if !spec.calls.is_empty() {
        app_args.extend(["--proxy".to_string(), ports.outbound.to_string()]);
        for c in spec.calls {
            app_args.extend(["--call".to_string(), c.to_string()]);
        }
    }
    let app_args: Vec<&str> = app_args.iter().map(String::as_str).collect();
    let mut started = vec![spawn(exe, logs, &format!("{}-app", spec.workload), &app_args)?];
    let workload = format!("default/{}", spec.workload);
    let (service_label, version_label) = (format!("service={}", spec.service), format!("version={}", spec.version));
    let (app, inbound, outbound, admin) = (
        ports.app.to_string(),
        ports.inbound.to_string(),
        ports.outbound.to_string(),
        ports.admin.to_string(),
    );
    let proxy_args = [
        "proxy",
        "--control",
        control_url,
        "--workload",
        &workload,
        "--cluster",
        spec.cluster,
        "--label",
        &service_label,
        "--label",
        &version_label,
        "--app",
        &app,
        "--inbound",
        &inbound,
        "--outbound",
        &outbound,
        "--admin",
        &admin,
    ];
    started.push(spawn_program(
        exe,
        logs,
        &format!("{}-proxy", spec.workload),
        &proxy_args,
        &[("WEFT_TOKEN", &token)],
    )?);
    let ready = async {
        wait_http(&format!("http://{}/healthz", ports.app), Duration::from_secs(15), &mut started).await?;
        wait_http(&format!("http://{}/ready", ports.admin), Duration::from_secs(15), &mut started).await
    };
    match ready.await {
        Ok(()) => Ok((started, ports)),
        Err(e) => {
            stop_all(started).await;
            Err(e)
        }
    }
}

/// A workload's join token: the service account is the service, so v1 and v2 share an
/// identity. One certificate is all it is for; the proxy renews with its certificate.
async fn join_token(api: &crate::client::Api, spec: &Spec) -> anyhow::Result<String> {
    let body = serde_json::json!({"workload": format!("default/{}", spec.workload), "serviceAccount": spec.service, "uses": 1});
    Ok(api
        .post("/api/v1/tokens", body.to_string(), &[("content-type", "application/json")])
        .await?["token"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Sends `rps` requests a second to mobile-gateway's inbound listener until shutdown.
async fn generate(target: SocketAddr, rps: u32, shutdown: weft_core::Shutdown) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        n += 1;
        let tenant = TENANTS[(n % TENANTS.len() as u64) as usize];
        let user = if n.is_multiple_of(10) { 42 } else { rand::random_range(1..1000) };
        let order = if n.is_multiple_of(25) {
            7712
        } else {
            rand::random_range(7000..8000)
        };
        let req = hyper::Request::get(format!("http://{target}/checkout"))
            .header("host", "mobile-gateway")
            .header("x-tenant", tenant)
            .header("x-user", user.to_string())
            .header("x-order", order.to_string())
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        let client = client.clone();
        tokio::spawn(async move {
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                let _ = resp.into_body().collect().await;
            }
        });
    }
}

/// `--ha`: three etcd members on loopback (Debian's etcd-server, `etcd` on the PATH or
/// /usr/bin/etcd), their data under `DATA_DIR/etcd`; returns the `--store` URL once they answer.
async fn start_etcd(logs: &std::path::Path, data_dir: &std::path::Path, children: &mut Vec<Running>) -> anyhow::Result<String> {
    let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("weft up --ha needs etcd (Debian: apt-get install etcd-server)")?;
    let members: Vec<(String, SocketAddr, SocketAddr)> = (0..3)
        .map(|i| Ok((format!("etcd{i}"), free_port()?, free_port()?)))
        .collect::<anyhow::Result<_>>()?;
    let cluster: Vec<String> = members.iter().map(|(n, _, peer)| format!("{n}=http://{peer}")).collect();
    let cluster = cluster.join(",");
    for (name, client, peer) in &members {
        let dir = data_dir.join("etcd").join(name).display().to_string();
        let (client, peer) = (format!("http://{client}"), format!("http://{peer}"));
        let args = [
            "--name",
            name,
            "--data-dir",
            &dir,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &cluster,
            "--initial-cluster-token",
            "weft-up",
            "--initial-cluster-state",
            "new",
        ];
        children.push(spawn(&bin, logs, name, &args)?);
    }
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, client, _) in &members {
        loop {
            let uri: hyper::Uri = format!("http://{client}/health").parse()?;
            let healthy = match http.get(uri).await {
                Ok(reply) => reply
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default()
                    .windows(6)
                    .any(|w| w == b"\"true\""),
                Err(_) => false,
            };
            if healthy {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd member {name} did not become healthy; see {}",
                    logs.join(format!("{name}.log")).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let clients: Vec<String> = members.iter().map(|(_, c, _)| c.to_string()).collect();
    Ok(format!("etcd://{}", clients.join(",")))
}

/// `--ha`: replicas r1 and r2 beside r0 (already up on `first_api`/`first_grpc`), sharing its
/// admin token. Returns the proxies' `--control` list, the leader's API URL, and a line per
/// replica to print.
async fn start_replicas(
    exe: &Path,
    data_dir: &std::path::Path,
    logs: &std::path::Path,
    store: &str,
    first_api: &str,
    first_grpc: &str,
    children: &mut Vec<Running>,
) -> anyhow::Result<(String, String, Vec<String>)> {
    let token = std::fs::read_to_string(data_dir.join("control").join(weft_control::ADMIN_TOKEN_FILE))?;
    let mut apis = vec![first_api.to_string()];
    let mut grpcs = vec![format!("https://{first_grpc}")];
    for i in 1..3 {
        let dir = data_dir.join(format!("control-{i}"));
        std::fs::create_dir_all(&dir)?;
        crate::login::write_private_file(&dir.join(weft_control::ADMIN_TOKEN_FILE), &token)?;
        let (api, grpc) = (free_port()?, free_port()?);
        let replica = format!("r{i}");
        let args = [
            "control",
            "--data-dir",
            &dir.display().to_string(),
            "--api",
            &api.to_string(),
            "--grpc",
            &grpc.to_string(),
            "--store",
            store,
            "--replica",
            &replica,
        ];
        children.push(spawn(exe, logs, &format!("control-{i}"), &args)?);
        apis.push(format!("https://{api}"));
        grpcs.push(format!("https://{grpc}"));
    }
    let ca_file = data_dir.join("control").join(weft_control::serving::CA_FILE);
    let first = wait_api(first_api, &ca_file, Duration::from_secs(15), children)
        .await?
        .with_token(Some(token.trim().to_string()));
    let deadline = Instant::now() + Duration::from_secs(15);
    let leader = loop {
        let status = first.get("/api/v1/status").await?;
        if let Some(leader) = status["controlPlane"]["leader"].as_str() {
            break leader.trim_start_matches('r').parse::<usize>().unwrap_or(0);
        }
        if Instant::now() > deadline {
            bail!("no replica was elected leader; see {}", logs.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let lines = (0..3)
        .map(|i| {
            format!(
                "replica r{i}:  API {}  gRPC {}{}",
                apis[i],
                grpcs[i],
                if i == leader { "  (leader)" } else { "" }
            )
        })
        .collect();
    Ok((grpcs.join(","), apis[leader].clone(), lines))
}

fn free_port() -> anyhow::Result<SocketAddr> {
    weft_core::ports::loopback().context("reserving a loopback port")
}

fn spawn(exe: &Path, logs: &Path, name: &str, args: &[&str]) -> anyhow::Result<Running> {
    spawn_program(exe, logs, name, args, &[])
}

/// Starts a child; `env` carries secrets (join tokens) so they never show in its arguments.
fn spawn_program(program: &Path, logs: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Running> {
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .env(weft_core::shutdown::EXIT_WITH_PARENT_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Running {
        name: name.to_string(),
        child,
    })
}

/// Waits until the control plane has written its CA file and its API answers over TLS with
/// it; returns a client for the API.
async fn wait_api(
    api_url: &str,
    ca_file: &std::path::Path,
    within: Duration,
    children: &mut [Running],
) -> anyhow::Result<crate::client::Api> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(ca) = std::fs::read_to_string(ca_file) {
            let api = crate::client::Api::new(api_url, Some(&ca), &ca_file.display().to_string())?;
            if api.get("/ready").await.is_ok() {
                return Ok(api);
            }
        }
        for c in children.iter_mut() {
            if let Ok(Some(status)) = c.child.try_wait() {
                bail!("{} exited ({status})", c.name);
            }
        }
        if Instant::now() > deadline {
            bail!("{api_url} not ready within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_http(url: &str, within: Duration, children: &mut [Running]) -> anyhow::Result<()> {
    wait_until(url, within, children, || answers(url.to_string())).await
}

/// Whether `url` answers a GET with a success.
async fn answers(url: String) -> bool {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let Ok(uri) = url.parse::<hyper::Uri>() else { return false };
    client.get(uri).await.is_ok_and(|resp| resp.status().is_success())
}

/// Polls `probe` until it says yes; an error naming `what` after `within`, or as soon as a
/// child exits.
async fn wait_until<F, Fut>(what: &str, within: Duration, children: &mut [Running], mut probe: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if probe().await {
            return Ok(());
        }
        for c in children.iter_mut() {
            if let Ok(Some(status)) = c.child.try_wait() {
                bail!("{} exited ({status})", c.name);
            }
        }
        if Instant::now() > deadline {
            bail!("{what} not ready within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM to every child, then SIGKILL to any still running after the grace period.
async fn stop_all(mut children: Vec<Running>) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    // Apps and proxies first, the control plane last.
    children.reverse();
    for c in &children {
        if let Some(pid) = c.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for c in &mut children {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, c.child.wait()).await.is_err() {
            tracing::warn!(child = %c.name, "did not stop within 5s; killing");
            let _ = c.child.kill().await;
        }
    }
}

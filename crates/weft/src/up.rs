//! `weft up`: the local demo mesh of DESIGN.md §7 as child processes: the control plane, and for
//! each workload a `weft demo-app` with its own `weft proxy`, plus a traffic generator that sends
//! the seed's tenant, user and order headers to mobile-gateway. SIGINT or SIGTERM stops every
//! child (SIGTERM, then SIGKILL after a grace period); children also exit on their own if this
//! process dies, because their standard input closes.

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
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
}

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
    let outcome = start_all(&opts, &exe, &data_dir, &logs, &mut children, &shutdown).await;
    if let Err(e) = &outcome {
        eprintln!("error: {e:#}");
        eprintln!("logs: {}", logs.display());
    }
    stop_all(children).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    eprintln!("weft up: stopped");
    Ok(if outcome.is_ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn start_all(
    opts: &Options,
    exe: &PathBuf,
    data_dir: &std::path::Path,
    logs: &std::path::Path,
    children: &mut Vec<Running>,
    shutdown: &weft_core::Shutdown,
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
    let mut gateway_inbound = None;
    let mut table = Vec::new();
    for spec in &WORKLOADS {
        let mut attempt = 1;
        let ports = loop {
            match start_workload(exe, logs, spec, &control_url, &api).await {
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
    for (name, text) in SEED_INTENTS {
        match api.post("/api/v1/intents", text.to_string(), &[("x-weft-source", name)]).await {
            Ok(_) => {}
            // A kept --data-dir already holds them.
            Err(e) if e.to_string().contains("already exists") => {}
            Err(e) => return Err(e.context(format!("queueing the seed intent {name}"))),
        }
    }
    say!("weft demo mesh is up");
    say!("  API:        {api_url}/api/v1/status");
    say!(
        "  dashboard:  {api_url}/  (TLS from the mesh CA: trust {} in your browser)",
        ca_file.display()
    );
    say!("  control:    {control_url} (gRPC over TLS)");
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
    crate::output::table(&["WORKLOAD", "CLUSTER", "APP", "INBOUND", "OUTBOUND", "ADMIN"], &table);
    say!();
    say!("queued (manual mode): MESH-201..204, the seed's intents; `weft intent list`, `weft intent approve MESH-201`");
    say!("try:  weft status      (Ctrl-C stops everything)");
    if opts.traffic {
        let target = gateway_inbound.expect("mobile-gateway is in the demo");
        tokio::spawn(generate(target, opts.rps.max(1), shutdown.clone()));
        say!(
            "traffic: {} rps into mobile-gateway with x-tenant, x-user and x-order headers",
            opts.rps
        );
    }
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

struct Ports {
    app: SocketAddr,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
}

/// Starts one workload's demo app and sidecar on fresh ports and waits until both serve. On
/// failure both are stopped and the error says which exited.
async fn start_workload(
    exe: &PathBuf,
    logs: &std::path::Path,
    spec: &Spec,
    control_url: &str,
    api: &crate::client::Api,
) -> anyhow::Result<(Vec<Running>, Ports)> {
    // Its join token: the service account is the service, so v1 and v2 share an identity. One
    // certificate is all it is for; the proxy renews with its certificate.
    let body = serde_json::json!({"workload": format!("default/{}", spec.workload), "serviceAccount": spec.service, "uses": 1});
    let token = api
        .post("/api/v1/tokens", body.to_string(), &[("content-type", "application/json")])
        .await?["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
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
    started.push(spawn_with(
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
    exe: &PathBuf,
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
    let l = TcpListener::bind("127.0.0.1:0").context("reserving a loopback port")?;
    Ok(l.local_addr()?)
}

fn spawn(exe: &PathBuf, logs: &std::path::Path, name: &str, args: &[&str]) -> anyhow::Result<Running> {
    spawn_with(exe, logs, name, args, &[])
}

/// Starts a child; `env` carries secrets (join tokens) so they never show in its arguments.
fn spawn_with(exe: &PathBuf, logs: &std::path::Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Running> {
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let child = Command::new(exe)
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
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(resp) = client.get(url.parse()?).await
            && resp.status().is_success()
        {
            return Ok(());
        }
        for c in children.iter_mut() {
            if let Ok(Some(status)) = c.child.try_wait() {
                bail!("{} exited ({status})", c.name);
            }
        }
        if Instant::now() > deadline {
            bail!("{url} not ready within {within:?}");
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

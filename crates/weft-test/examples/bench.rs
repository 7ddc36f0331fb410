//! The benchmark driver `bench/` scripts call:
//!
//! ```text
//! bench rate ADDR HOST RATE CONNECTIONS WARMUP_S SECONDS [h2]   constant rate, CO-corrected
//! bench saturate ADDR HOST CONNECTIONS STREAMS SECONDS [h2]     as fast as answers come back
//! bench fleet API GRPC PROXIES SERVICES CONTROL_PID [CA_FILE]   1,000 simulated proxies
//!                                                                (https:// API and gRPC with the
//!                                                                control plane's ca.pem; http://
//!                                                                for --insecure-plaintext)
//! bench fleet API GRPC,GRPC,... PROXIES SERVICES CONTROL_PID CA_FILE KILL
//!                                                                several replicas: the last
//!                                                                phase kills (-9) CONTROL_PID,
//!                                                                the KILL-th of the gRPC URLs,
//!                                                                and times its proxies' failover
//! bench upstream ADDR                                            the fixed 1 KiB upstream
//! ```
//!
//! Results go to stdout as one line of `key=value` pairs (fleet: JSON).

// A command-line tool: its results go to stdout.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};
use weft_test::fleet::{self, Fleet};
use weft_test::loadgen::{self, Target};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let num = |i: usize| -> anyhow::Result<f64> { Ok(arg(i).parse()?) };
    match arg(0).as_str() {
        "rate" => {
            let t = Target {
                addr: arg(1).parse()?,
                host: arg(2),
                path: "/bench".into(),
                h2: arg(7) == "h2",
            };
            let r = loadgen::constant_rate(
                &t,
                num(3)?,
                num(4)? as usize,
                Duration::from_secs_f64(num(5)?),
                Duration::from_secs_f64(num(6)?),
            )
            .await?;
            println!("{}", r.summary());
        }
        "saturate" => {
            let t = Target {
                addr: arg(1).parse()?,
                host: arg(2),
                path: "/bench".into(),
                h2: arg(6) == "h2",
            };
            let r = loadgen::saturate(&t, num(3)? as usize, num(4)? as usize, Duration::from_secs_f64(num(5)?)).await?;
            println!("requests={} rps={:.0} errors={}", r.sent, r.rps(), r.errors);
        }
        "fleet" => {
            let kill = (!arg(7).is_empty()).then(|| num(7)).transpose()?.map(|k| k as usize);
            fleet_run(&arg(1), &arg(2), num(3)? as usize, num(4)? as usize, num(5)? as u32, &arg(6), kill).await?
        }
        "upstream" => upstream(arg(1).parse()?).await?,
        _ => {
            eprintln!("usage: bench rate|saturate|fleet ... (see the source's header)");
            std::process::exit(2);
        }
    }
    Ok(())
}

async fn fleet_run(
    api: &str,
    grpc: &str,
    n: usize,
    services: usize,
    control_pid: u32,
    ca_file: &str,
    kill: Option<usize>,
) -> anyhow::Result<()> {
    let apis: Vec<&str> = api.split(',').collect();
    let api = apis[0];
    let client = if api.starts_with("https://") {
        let ca = std::fs::read_to_string(ca_file).map_err(|e| anyhow::anyhow!("CA_FILE {ca_file:?}: {e}"))?;
        weft_test::http::Client::trusting(&ca)
    } else {
        weft_test::http::Client::new()
    };
    let rss_before = fleet::rss_bytes(control_pid);
    let bearer = std::env::var("WEFT_API_TOKEN").map_err(|_| anyhow::anyhow!("WEFT_API_TOKEN: the control plane's admin token"))?;
    let control = Control {
        client: &client,
        api,
        apis: &apis,
        bearer: &bearer,
        pid: control_pid,
    };
    // One token more than the fleet: proxy `n` joins sim-svc-0 after the change.
    let mut tokens = fleet::tokens(&client, api, &bearer, n + 1).await?;
    let joiner = tokens.pop().expect("n + 1 tokens");
    // Cold start: every proxy connects at once; done when each has its first config with the
    // endpoints of the service it calls.
    let cold_cpu = control.cpu();
    let fleet = Fleet::connect(grpc, tokens, 0, services, "sim-svc-0").await?;
    let cold = fleet::until(Duration::from_secs(60), || async { fleet.count_at(0).await == n }).await;
    let cold_reached = fleet.count_at(0).await;
    let cold_cpu = control.cpu() - cold_cpu;
    tokio::time::sleep(Duration::from_secs(2)).await; // settle: the last endpoints reach everyone
    let rss_after = fleet::rss_bytes(control_pid);

    // One change: a TrafficPolicy on the service every proxy calls.
    let before = control.pushes().await?;
    let policy = "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: sim-policy}\nspec:\n  service: sim-svc-0\n  routes:\n    - timeout: 2s\n";
    let t0 = Instant::now();
    // An API that does not answer the apply is a change that did not complete, not a crash.
    let applied = match control.post("/api/v1/resources", policy).await {
        Ok(r) if r.status == 200 || r.status == 202 => Some(r.json()["revision"].as_u64().unwrap_or(1)),
        Ok(r) => anyhow::bail!("apply: {} {}", r.status, r.text()),
        Err(e) => {
            eprintln!("apply: {e}");
            None
        }
    };
    let revision = applied.unwrap_or(u64::MAX);
    let change = match applied {
        Some(revision) => fleet::until(Duration::from_secs(60), || async { fleet.count_at(revision).await == n }).await,
        None => None,
    };
    let spread = fleet.spread(revision, t0).await;
    // The pushes of the change: counted once every proxy has it (or the wait gave up).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let policy_change = control.pushes().await?.since(&before);

    // One endpoint joining sim-svc-0, which every proxy calls: each gets a delta.
    let before = control.pushes().await?;
    let joined = Fleet::connect(grpc, vec![joiner], n, services, "sim-svc-0").await?;
    let join = fleet::until(Duration::from_secs(60), || async {
        control
            .pushes()
            .await
            .map(|p| p.since(&before).messages >= n as f64 + 1.0)
            .unwrap_or(false)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let endpoint_join = control.pushes().await?.since(&before);
    let simulator_cpu = fleet::cpu_seconds(std::process::id());

    let largest = control.largest().await?;
    let sim_svc_0 = (0..=n).filter(|i| i % services.max(1) == 0).count();
    if let Some(killed) = kill {
        let failover = replica_failover(&fleet, &joined, grpc, killed, n, control_pid, revision, sim_svc_0).await?;
        let out = serde_json::json!({
            "proxies": n,
            "coldStartAllConfiguredMs": cold.map(|d| d.as_millis()),
            "coldStartReached": cold_reached,
            "changeCompleted": change.is_some(),
            "changeAllAckedMs": {"first": spread.first.as_secs_f64() * 1e3, "p50": spread.p50.as_secs_f64() * 1e3, "p99": spread.p99.as_secs_f64() * 1e3, "max": spread.max.as_secs_f64() * 1e3},
            "reached": spread.reached,
            "bytesPerChange": policy_change.bytes(),
            "endpointJoinCompleted": join.is_some(),
            "replicaFailover": failover,
        });
        println!("{out}");
        fleet.abort();
        joined.abort();
        return Ok(());
    }
    // A control-plane restart under the whole fleet: SIGTERM, then the same command started
    // again (same data directory and ports); done when every proxy has been sent a whole
    // config on a new stream and holds the policy's revision and every endpoint of sim-svc-0.
    let synced = || fleet.count_synced(2, revision, sim_svc_0) + joined.count_synced(2, revision, sim_svc_0);
    let failures_before_restart = (fleet.failures() + joined.failures(), fleet.last_failure());
    let t0 = Instant::now();
    let restart_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    let mut restarted = restart(control_pid).await?;
    let restart = fleet::until(Duration::from_secs(60), || async { synced() == n + 1 })
        .await
        .map(|_| t0.elapsed());
    let restart_reached = synced();
    // Apart, so a restart that did not complete tells which part was missing: the proxies not
    // configured again, or endpoints some of them do not hold yet.
    let restart_reconnected = fleet.count_configured_on(2) + joined.count_configured_on(2);
    let restart_held = fleet.endpoints_held();
    let restart_fewest = fleet.fewest_endpoints_after_reconnecting();
    let _ = std::process::Command::new("kill").arg(restarted.id().to_string()).status();
    let _ = restarted.wait();
    eprintln!("restart: {restart:?} after SIGTERM at {:?}", t0.elapsed());

    let out = serde_json::json!({
        "proxies": n,
        "services": services,
        "tls": grpc.starts_with("https://"),
        // null: not every proxy was configured within 60 s (see coldStartReached).
        "coldStartAllConfiguredMs": cold.map(|d| d.as_millis()),
        "coldStartReached": cold_reached,
        "coldStartControlCpuSeconds": cold_cpu,
        "changeCompleted": change.is_some(),
        "changeAllAckedMs": {"first": spread.first.as_secs_f64() * 1e3, "p50": spread.p50.as_secs_f64() * 1e3, "p99": spread.p99.as_secs_f64() * 1e3, "max": spread.max.as_secs_f64() * 1e3},
        "reached": spread.reached,
        "pushBytesPerProxy": fleet.push_bytes(revision).await,
        "bytesPerChange": policy_change.bytes(),
        "policyChange": policy_change.json(),
        "endpointJoinCompleted": join.is_some(),
        "endpointJoin": endpoint_join.json(),
        "largestMessageBytes": largest,
        // null: not every proxy was back in sync within 60 s (see restartReached, of
        // proxies + 1: the joiner too).
        "restartAllInSyncMs": restart.map(|d| d.as_millis()),
        // When the SIGTERM was sent (unix seconds): what real sidecars logged before it.
        "restartAtUnix": restart_at,
        "restartReached": restart_reached,
        "restartReconnected": restart_reconnected,
        "restartEndpointsHeld": [restart_held.0, restart_held.1],
        "restartEndpointsExpected": sim_svc_0,
        "restartFewestEndpointsHeld": restart_fewest,
        "simulatorCpuSeconds": simulator_cpu,
        // Streams that ended other than by a refusal with a hint (each reconnects), and the last:
        // before the restart (none expected) and in all (the restart ends every stream).
        "simulatorStreamFailuresBeforeRestart": failures_before_restart.0,
        "simulatorLastFailureBeforeRestart": failures_before_restart.1,
        "simulatorStreamFailures": fleet.failures() + joined.failures(),
        "simulatorToldToWait": fleet.told_to_wait() + joined.told_to_wait(),
        "controlRssBeforeBytes": rss_before,
        "controlRssAfterBytes": rss_after,
        "controlRssPerProxyBytes": (rss_after.saturating_sub(rss_before)) / n.max(1) as u64,
    });
    println!("{out}");
    fleet.abort();
    joined.abort();
    Ok(())
}

/// Replica failover: kill -9 `pid`, the `killed`-th replica of the comma-separated `grpc`
/// URLs. Per proxy that was on it (proxy i starts on replica i mod replicas): the time from the
/// kill to a whole config on a stream to another replica, counting those that hold `revision`
/// or later and no fewer than the `endpoints` of sim-svc-0 (the dead replica's proxies among
/// them, back on other replicas). Until the dead replica's listing expires (its presence
/// lease) the others still list its proxies' old connections beside the new ones, at the same
/// addresses: the time until every moved proxy holds exactly `endpoints` is reported apart.
#[allow(clippy::too_many_arguments)]
async fn replica_failover(
    fleet: &Fleet,
    joined: &Fleet,
    grpc: &str,
    killed: usize,
    n: usize,
    pid: u32,
    revision: u64,
    endpoints: usize,
) -> anyhow::Result<serde_json::Value> {
    let replicas = grpc.split(',').count();
    anyhow::ensure!(killed < replicas, "KILL {killed}: there are {replicas} gRPC URLs");
    let on_killed = move |i: usize| i % replicas == killed;
    // The fleet's proxies and the joiner, numbered 0..=n.
    let expected = (0..=n).filter(|i| on_killed(*i)).count();
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status()?;
    anyhow::ensure!(status.success(), "kill -9 {pid} failed");
    let t0 = Instant::now();
    let reached =
        || fleet.resynced(on_killed, revision, endpoints, t0).reached + joined.resynced(on_killed, revision, endpoints, t0).reached;
    let all = fleet::until(Duration::from_secs(60), || async { reached() == expected }).await;
    let exact = || fleet.count_exactly_synced(on_killed, revision, endpoints) + joined.count_exactly_synced(on_killed, revision, endpoints);
    let deduplicated = fleet::until(Duration::from_secs(60), || async { exact() == expected })
        .await
        .map(|_| t0.elapsed());
    // The joiner is one proxy among hundreds: it counts in `reached` and `max` only.
    let mut spread = fleet.resynced(on_killed, revision, endpoints, t0);
    let joiner = joined.resynced(on_killed, revision, endpoints, t0);
    spread.max = spread.max.max(joiner.max);
    spread.reached += joiner.reached;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(serde_json::json!({
        "proxiesOnKilledReplica": expected,
        "reached": spread.reached,
        "allInSyncMs": all.map(|d| d.as_millis()),
        "exactEndpointsMs": deduplicated.map(|d| d.as_millis()),
        "p50Ms": ms(spread.p50),
        "p99Ms": ms(spread.p99),
        "maxMs": ms(spread.max),
    }))
}

/// Stops process `pid` (SIGTERM) and, once it has exited, starts the same command again with
/// its environment and directory; returns the new process (its output discarded).
async fn restart(pid: u32) -> anyhow::Result<std::process::Child> {
    let read = |what: &str| std::fs::read(format!("/proc/{pid}/{what}")).map_err(|e| anyhow::anyhow!("/proc/{pid}/{what}: {e}"));
    let split = |bytes: Vec<u8>| -> Vec<String> {
        bytes
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    };
    let args = split(read("cmdline")?);
    let env = split(read("environ")?);
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))?;
    anyhow::ensure!(!args.is_empty(), "process {pid} has no command line");
    std::process::Command::new("kill").arg(pid.to_string()).status()?;
    // Exited: gone, or a zombie its parent (the bench script) has not reaped yet and whose
    // threads have all exited. The main thread turns zombie first, and the last thread to
    // exit closes the files: with thousands of sockets to close that took long enough for the
    // successor to find the store's lock still held ("in use by another process": the restart
    // step of two 5,000-proxy runs read 0 of 5,001).
    let exited = || {
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
            .unwrap_or(true);
        let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0);
        zombie && threads <= 1
    };
    fleet::until(Duration::from_secs(30), || async { exited() })
        .await
        .ok_or_else(|| anyhow::anyhow!("process {pid} did not exit within 30 s of SIGTERM"))?;
    let child = std::process::Command::new(&args[0])
        .args(&args[1..])
        .env_clear()
        .envs(env.iter().filter_map(|kv| kv.split_once('=')))
        .current_dir(cwd)
        .stdout(std::process::Stdio::null())
        .stderr(restarted_log()?)
        .spawn()?;
    Ok(child)
}

/// Where the restarted control plane's log goes: the file `WEFT_BENCH_RESTART_LOG` names, if
/// set (bench/control keeps it beside the first one's), else nowhere.
fn restarted_log() -> anyhow::Result<std::process::Stdio> {
    Ok(match std::env::var_os("WEFT_BENCH_RESTART_LOG") {
        Some(path) => std::fs::File::create(&path)
            .map_err(|e| anyhow::anyhow!("WEFT_BENCH_RESTART_LOG {path:?}: {e}"))?
            .into(),
        None => std::process::Stdio::null(),
    })
}

/// The control plane under test, as the fleet benchmark reads it: its API and its process.
struct Control<'a> {
    client: &'a weft_test::http::Client,
    api: &'a str,
    apis: &'a [&'a str],
    bearer: &'a str,
    pid: u32,
}

/// The control plane's push counters (`weft_control_config_push_*`) and CPU at one moment.
#[derive(Clone, Copy, Default)]
struct Pushes {
    full: f64,
    own: f64,
    policy: f64,
    endpoints: f64,
    messages: f64,
    /// Whole configs among the messages (a first config, or one a proxy asked for again).
    full_messages: f64,
    /// Pushes a full queue deferred (folded into the stream's next), and resyncs proxies asked for.
    deferred: f64,
    resyncs: f64,
    cpu: f64,
}

impl Control<'_> {
    /// Posts to the API; with several replicas (`API,API,...`), to whichever leads (a follower
    /// answers 503 naming the leader), trying each in turn for up to a second.
    async fn post(&self, path: &str, body: &str) -> anyhow::Result<weft_test::http::Reply> {
        let auth = format!("Bearer {}", self.bearer);
        let mut last = None;
        for api in self.apis.iter().cycle().take(self.apis.len() * 20) {
            let reply = self
                .client
                .post(&format!("{api}{path}"), body.as_bytes().to_vec(), &[("authorization", &auth)])
                .await?;
            if reply.status != 503 {
                return Ok(reply);
            }
            last = Some(reply);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        last.ok_or_else(|| anyhow::anyhow!("no API address"))
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        let req = hyper::Request::get(format!("{}/metrics", self.api))
            .header("authorization", format!("Bearer {}", self.bearer))
            .body(http_body_util::Full::new(bytes::Bytes::new()))?;
        Ok(self.client.send(req).await?.text())
    }

    async fn pushes(&self) -> anyhow::Result<Pushes> {
        let text = self.metrics().await?;
        let bytes = |kind: &str| weft_test::metric(&text, "weft_control_config_push_bytes_total", &[&format!("kind=\"{kind}\"")]);
        Ok(Pushes {
            full: bytes("full"),
            own: bytes("own"),
            policy: bytes("policy"),
            endpoints: bytes("endpoints"),
            messages: weft_test::metric(&text, "weft_control_config_push_messages_total", &[]),
            full_messages: weft_test::metric(&text, "weft_control_config_push_messages_total", &["kind=\"full\""]),
            deferred: weft_test::metric(&text, "weft_control_config_pushes_deferred_total", &[]),
            resyncs: weft_test::metric(&text, "weft_control_config_resyncs_total", &[]),
            cpu: self.cpu(),
        })
    }

    async fn largest(&self) -> anyhow::Result<f64> {
        Ok(weft_test::metric(
            &self.metrics().await?,
            "weft_control_config_push_largest_bytes",
            &[],
        ))
    }

    fn cpu(&self) -> f64 {
        fleet::cpu_seconds(self.pid)
    }
}

impl Pushes {
    fn since(&self, before: &Pushes) -> Pushes {
        Pushes {
            full: self.full - before.full,
            own: self.own - before.own,
            policy: self.policy - before.policy,
            endpoints: self.endpoints - before.endpoints,
            messages: self.messages - before.messages,
            full_messages: self.full_messages - before.full_messages,
            deferred: self.deferred - before.deferred,
            resyncs: self.resyncs - before.resyncs,
            cpu: self.cpu - before.cpu,
        }
    }

    fn bytes(&self) -> f64 {
        self.full + self.own + self.policy + self.endpoints
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "bytes": self.bytes(),
            "fullBytes": self.full,
            "ownBytes": self.own,
            "policyBytes": self.policy,
            "endpointBytes": self.endpoints,
            "messages": self.messages,
            "fullMessages": self.full_messages,
            "deferred": self.deferred,
            "resyncs": self.resyncs,
            "controlCpuSeconds": self.cpu,
        })
    }
}

/// The upstream every latency path ends at: 1 KiB, the same bytes for every request, over
/// HTTP/1.1 or HTTP/2 (h2c), on all cores.
async fn upstream(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let body = bytes::Bytes::from(vec![b'w'; 1024]);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let shutdown = weft_core::Shutdown::new();
    weft_core::shutdown::install(&shutdown);
    let limits = weft_core::serve::Limits {
        max_concurrent_streams: 1000,
        ..Default::default()
    };
    weft_core::serve::serve(listener, limits, shutdown, move |_req| {
        let body = body.clone();
        async move {
            hyper::Response::builder()
                .header("content-type", "application/octet-stream")
                .body(weft_core::full(body))
                .expect("valid response")
        }
    })
    .await;
    Ok(())
}

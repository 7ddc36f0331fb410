//! The benchmark driver `bench/` scripts call:
//!
//! ```text
//! bench rate ADDR HOST RATE CONNECTIONS WARMUP_S SECONDS [h2]   constant rate, CO-corrected
//! bench saturate ADDR HOST CONNECTIONS STREAMS SECONDS [h2]     as fast as answers come back
//! bench fleet API GRPC PROXIES SERVICES CONTROL_PID [CA_FILE]   1,000 simulated proxies
//!                                                                (https:// API and gRPC with the
//!                                                                control plane's ca.pem; http://
//!                                                                for --insecure-plaintext)
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
        "fleet" => fleet_run(&arg(1), &arg(2), num(3)? as usize, num(4)? as usize, num(5)? as u32, &arg(6)).await?,
        "upstream" => upstream(arg(1).parse()?).await?,
        _ => {
            eprintln!("usage: bench rate|saturate|fleet ... (see the source's header)");
            std::process::exit(2);
        }
    }
    Ok(())
}

async fn fleet_run(api: &str, grpc: &str, n: usize, services: usize, control_pid: u32, ca_file: &str) -> anyhow::Result<()> {
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
    let tokens = fleet::tokens(&client, api, &bearer, n).await?;
    // Cold start: every proxy connects at once; done when each has its first config with the
    // endpoints of the service it calls.
    let fleet = Fleet::connect(grpc, tokens, services, "sim-svc-0").await?;
    let cold = fleet::until(Duration::from_secs(60), || async { fleet.count_at(0).await == n }).await;
    let cold_ms = cold.map(|d| d.as_millis());
    tokio::time::sleep(Duration::from_secs(2)).await; // settle: the last endpoints reach everyone
    let rss_after = fleet::rss_bytes(control_pid);
    // One change: a TrafficPolicy on the service every proxy calls.
    let policy = "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: sim-policy}\nspec:\n  service: sim-svc-0\n  routes:\n    - timeout: 2s\n";
    let t0 = Instant::now();
    // Several replicas (`API,API,...`): the change goes to whichever leads (a follower says 503).
    let mut r = None;
    for api in apis.iter().cycle().take(apis.len() * 20) {
        let answer = client
            .post(
                &format!("{api}/api/v1/resources"),
                policy.as_bytes().to_vec(),
                &[("authorization", &format!("Bearer {bearer}"))],
            )
            .await?;
        if answer.status != 503 {
            r = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = r.ok_or_else(|| anyhow::anyhow!("apply: no replica took the change"))?;
    anyhow::ensure!(r.status == 200 || r.status == 202, "apply: {} {}", r.status, r.text());
    let revision = r.json()["revision"].as_u64().unwrap_or(1);
    fleet::until(Duration::from_secs(60), || async { fleet.count_at(revision).await == n }).await;
    let spread = fleet.spread(revision, t0).await;
    let push = fleet.push_bytes(revision).await;
    // A full snapshot would carry every service's endpoints to every proxy.
    let snapshot_per_proxy = push * services.max(1);
    let out = serde_json::json!({
        "proxies": n,
        "services": services,
        "tls": grpc.starts_with("https://"),
        "coldStartAllConfiguredMs": cold_ms,
        "changeAllAckedMs": {"first": spread.first.as_secs_f64() * 1e3, "p50": spread.p50.as_secs_f64() * 1e3, "p99": spread.p99.as_secs_f64() * 1e3, "max": spread.max.as_secs_f64() * 1e3},
        "reached": spread.reached,
        "pushBytesPerProxy": push,
        "bytesPerChange": push * n,
        "fullSnapshotBytesPerChangeEstimate": snapshot_per_proxy * n,
        "controlRssBeforeBytes": rss_before,
        "controlRssAfterBytes": rss_after,
        "controlRssPerProxyBytes": (rss_after.saturating_sub(rss_before)) / n.max(1) as u64,
    });
    println!("{out}");
    fleet.abort();
    Ok(())
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

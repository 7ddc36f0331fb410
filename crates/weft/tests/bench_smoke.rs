//! Smoke runs of every benchmark scenario in `bench/` (seconds each), so the bench code cannot
//! rot: the load generator at a constant rate and at saturation, over HTTP/1.1 and HTTP/2
//! through real sidecars; the simulated fleet against a real control plane; a proxy with a
//! thousand services in its config; full mTLS handshakes against a sidecar's inbound listener.
//! Numbers asserted are sanity bounds, not targets; the targets are measured by `bench/run`.

use std::time::Duration;
use weft_test::apps::EchoServer;
use weft_test::fleet::{self, Fleet};
use weft_test::loadgen::{self, Target};
use weft_test::{Control, ProxyHandle, free_addr};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_holds_its_rate_and_corrects_for_stalls() {
    let app = EchoServer::start("bench").await;
    let direct = Target {
        addr: app.addr,
        host: "bench".into(),
        path: "/bench".into(),
        h2: false,
    };
    let r = loadgen::constant_rate(&direct, 200.0, 4, Duration::from_millis(200), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(r.errors, 0);
    assert!((180..=220).contains(&r.sent), "{}", r.summary());
    assert!(r.quantile(0.5) > 0 && r.quantile(0.5) <= r.quantile(0.99));
    // A stall of 300 ms on a single connection: every request due during it waits, and the
    // corrected latencies show it (an uncorrected tool would record one slow request).
    app.set_mode(weft_test::apps::Mode::Delay(Duration::from_millis(300)));
    let first = app.received();
    let stalled = tokio::spawn({
        let t = direct.clone();
        async move { loadgen::constant_rate(&t, 100.0, 1, Duration::ZERO, Duration::from_millis(600)).await }
    });
    // The first request to arrive is held 300 ms; the ones after it are answered at once.
    app.wait_received(first + 1, Duration::from_secs(10)).await;
    app.set_mode(weft_test::apps::Mode::Normal);
    let r = stalled.await.unwrap().unwrap();
    let slow = r.micros.iter().filter(|m| **m > 100_000).count();
    assert!(
        slow >= 10,
        "requests due during the stall count it: {slow} of {} ({})",
        r.sent,
        r.summary()
    );
    // Saturation over both protocols.
    let sat = loadgen::saturate(&direct, 2, 1, Duration::from_millis(500)).await.unwrap();
    assert!(sat.sent > 100 && sat.errors == 0, "{:?}", (sat.sent, sat.errors));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_latency_path_runs_through_real_sidecars_over_both_protocols() {
    let control = Control::start(BIN).await;
    let app = EchoServer::start("orders").await;
    let orders = ProxyHandle::start(BIN, &control, "default/orders", "cluster-a", &[("version", "v1")], app.addr).await;
    let web = ProxyHandle::start(BIN, &control, "default/web", "cluster-a", &[], free_addr()).await;
    for (addr, h2) in [(orders.inbound, false), (web.outbound, false), (web.outbound, true)] {
        let t = Target {
            addr,
            host: "orders".into(),
            path: "/bench".into(),
            h2,
        };
        let r = loadgen::constant_rate(&t, 100.0, 4, Duration::from_millis(300), Duration::from_millis(700))
            .await
            .unwrap();
        assert_eq!(r.errors, 0, "{addr} h2={h2}: {}", r.summary());
        assert!(r.sent >= 60, "{addr} h2={h2}: {}", r.summary());
        let sat = loadgen::saturate(&t, 2, 4, Duration::from_millis(300)).await.unwrap();
        assert!(sat.sent > 20 && sat.errors == 0, "{addr} h2={h2}: {:?}", (sat.sent, sat.errors));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_gets_every_change_and_acks_it() {
    let control = Control::start(BIN).await;
    let api = control.url("");
    let api = api.trim_end_matches('/');
    let n = 30;
    let tokens = fleet::tokens(&control.client(), api, &control.admin_token, n).await.unwrap();
    let before = fleet::rss_bytes(control.process.pid());
    let fleet = Fleet::connect(&control.grpc_url(), tokens, 0, 3, "sim-svc-0").await.unwrap();
    let cold = fleet::until(Duration::from_secs(20), || async { fleet.count_at(0).await == n }).await;
    assert!(cold.is_some(), "all {n} simulated proxies configured");
    let policy = "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: sim-policy}\nspec:\n  service: sim-svc-0\n  routes:\n    - timeout: 2s\n";
    let t0 = std::time::Instant::now();
    let (status, applied) = control.post("/api/v1/resources", policy).await;
    assert!(status == 200 || status == 202, "{status} {applied}");
    let revision = applied["revision"].as_u64().unwrap();
    let all = fleet::until(Duration::from_secs(20), || async { fleet.count_at(revision).await == n }).await;
    assert!(all.is_some(), "every simulated proxy got revision {revision}");
    let spread = fleet.spread(revision, t0).await;
    assert_eq!(spread.reached, n);
    assert!(spread.max < Duration::from_secs(10), "{spread:?}");
    assert!(fleet.push_bytes(revision).await > 0);
    assert!(fleet::rss_bytes(control.process.pid()) >= before / 2, "RSS is readable");
    // The control plane counted an ACK from each.
    let m = control.metrics().await;
    let acks: f64 = m
        .lines()
        .find(|l| l.starts_with("weft_control_config_acks_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(acks >= 2.0 * n as f64, "{acks}");
    fleet.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_runs_with_a_thousand_services_in_its_static_config() {
    let dir = std::env::temp_dir().join(format!("weft-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("thousand.yaml");
    let (inbound, outbound, admin) = (free_addr(), free_addr(), free_addr());
    let app = EchoServer::start("svc-7").await;
    let mut yaml = format!(
        "workload: default/bench\ncluster: a\napp: '{}'\ninbound: '{inbound}'\noutbound: '{outbound}'\nadmin: '{admin}'\nservices:\n",
        free_addr()
    );
    for i in 0..1000 {
        let addr = if i == 7 {
            app.addr.to_string()
        } else {
            format!("127.0.0.1:{}", 20000 + i)
        };
        yaml.push_str(&format!(
            "  - name: svc-{i}\n    endpoints: [{{address: '{addr}', cluster: a, labels: {{version: v1}}}}]\n    mtls: 'off'\n"
        ));
    }
    std::fs::write(&file, yaml).unwrap();
    let mut p = weft_test::process::Process::spawn(BIN, "thousand", &["proxy".into(), "--config".into(), file.display().to_string()]);
    let ready = fleet::until(Duration::from_secs(10), || async {
        weft_test::http::Client::new()
            .get(&format!("http://{admin}/ready"))
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert!(ready.is_some(), "{}", p.log_text());
    // Static services are answered in plaintext, straight to the endpoint (the app here).
    let t = Target {
        addr: outbound,
        host: "svc-7".into(),
        path: "/bench".into(),
        h2: false,
    };
    let r = loadgen::constant_rate(&t, 50.0, 2, Duration::ZERO, Duration::from_millis(400))
        .await
        .unwrap();
    assert_eq!(r.errors, 0, "{}", r.summary());
    let rss = fleet::rss_bytes(p.pid());
    assert!(rss > 0 && rss < 200 << 20, "{rss}");
    p.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mtls_handshakes_are_counted_against_the_sidecars_cpu() {
    // The handshake scenario of `bench/mtls`, in-process: a root the test owns, a sidecar with
    // its certificate from that root, and a client with a leaf of the same root making a new
    // TLS 1.3 connection (a full handshake, no session to resume) for each request.
    let pki = weft_test::pki::Pki::new("bench root");
    let dir = std::env::temp_dir().join(format!("weft-bench-smoke-pki-{}", std::process::id()));
    let (cert, key) = pki.write(&dir);
    let args = [
        "--root-cert".to_string(),
        cert.display().to_string(),
        "--root-key".into(),
        key.display().to_string(),
    ];
    let control = Control::start_with(BIN, &args).await;
    let app = EchoServer::start("orders").await;
    let orders = ProxyHandle::start(BIN, &control, "default/orders", "cluster-a", &[], app.addr).await;
    let leaf = pki.leaf("spiffe://weft.local/ns/default/sa/bench", -60, 3600);
    let pid = orders.process.pid();
    let before = fleet::cpu_seconds(pid);
    let t = std::time::Instant::now();
    let mut handshakes = 0u32;
    while t.elapsed() < Duration::from_millis(1500) {
        let status = weft_test::pki::mtls_get(orders.inbound, Some(&leaf), "orders", "/bench").await;
        assert_eq!(status, Ok(200));
        handshakes += 1;
    }
    let cpu = fleet::cpu_seconds(pid) - before;
    eprintln!(
        "{handshakes} full handshakes, {cpu:.2} proxy CPU-s: {:.0} per CPU-second",
        f64::from(handshakes) / cpu.max(0.01)
    );
    assert!(handshakes >= 20, "{handshakes}");
    let metrics = orders.metrics().await;
    let accepted: u32 = metrics
        .lines()
        .find(|l| l.starts_with(r#"weft_proxy_inbound_connections_total{transport="mtls",outcome="accepted"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(
        accepted >= handshakes,
        "the sidecar counted {accepted} mTLS connections for {handshakes} handshakes"
    );
    let _ = std::fs::remove_dir_all(dir);
}

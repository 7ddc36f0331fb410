//! End-to-end tests of the walking skeleton: the real `weft` binary as control plane and
//! proxies on loopback ports picked at run time, real HTTP and gRPC apps behind them.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use serde_json::Value;
use std::time::{Duration, Instant};
use weft_test::apps::{EchoServer, GrpcEcho, grpc_client};
use weft_test::echo_proto::EchoMsg;
use weft_test::http::{Client, h2_via, via_http_proxy};
use weft_test::{Control, ProxyHandle, descendants, eventually, free_addr};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

/// GET `path` on `service` through `proxy`'s outbound listener, with `Host: service`.
async fn get_via(proxy: &ProxyHandle, service: &str, path: &str, headers: &[(&str, &str)]) -> weft_test::http::Reply {
    let mut b = Request::get(format!("http://{}{path}", proxy.outbound)).header("host", service);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    Client::new().send(b.body(empty()).unwrap()).await.expect("outbound answers")
}

fn policy(name: &str, service: &str, spec_routes: &str) -> String {
    format!("apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\nspec:\n  service: {service}\n  routes:\n{spec_routes}")
}

/// orders (one v1 echo behind a sidecar) and a caller "web" that has called it once, with the
/// TrafficPolicy `orders` (a 2 s timeout) applied as revision 1.
async fn orders_and_caller(control: &Control) -> (EchoServer, ProxyHandle, ProxyHandle) {
    let v1 = EchoServer::start("orders-v1").await;
    let p1 = ProxyHandle::start(
        BIN,
        control,
        "default/orders-v1",
        "cluster-a",
        &[("service", "orders"), ("version", "v1")],
        v1.addr,
    )
    .await;
    let caller = ProxyHandle::start(BIN, control, "default/web", "cluster-a", &[], free_addr()).await;
    assert_eq!(get_via(&caller, "orders", "/", &[]).await.status, 200);
    let (status, applied) = control
        .post("/api/v1/resources", &policy("orders", "orders", "    - timeout: 2s\n"))
        .await;
    assert_eq!((status, applied["revision"].as_u64()), (200, Some(1)), "{applied}");
    (v1, p1, caller)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_http2_and_grpc_cross_two_sidecars_intact() {
    let control = Control::start(BIN).await;
    let echo = EchoServer::start("echo").await;
    let grpc = GrpcEcho::start("grpc-echo").await;
    let echo_proxy = ProxyHandle::start(BIN, &control, "default/echo", "cluster-a", &[("version", "v1")], echo.addr).await;
    let _grpc_proxy = ProxyHandle::start(BIN, &control, "default/grpc-echo", "cluster-a", &[], grpc.addr).await;
    let client = ProxyHandle::start(BIN, &control, "default/client", "cluster-a", &[], free_addr()).await;

    // HTTP/1.1 with Host: headers and query intact, hop-by-hop and mesh-only headers gone.
    let r = get_via(
        &client,
        "echo",
        "/hello?x=1",
        &[
            ("x-tenant", "acme"),
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("x-weft-error", "forged"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["path"], "/hello?x=1");
    assert_eq!(seen["version"], "HTTP/1.1", "the app sees its declared protocol (auto: HTTP/1.1)");
    assert_eq!(seen["headers"]["host"], "echo");
    assert_eq!(seen["headers"]["x-tenant"], "acme");
    for gone in ["x-secret", "x-weft-error", "weft-orig-proto"] {
        assert!(seen["headers"].get(gone).is_none(), "{gone} must not reach the app: {seen}");
    }

    // A 256 KiB body crosses both sidecars byte for byte.
    let body: Vec<u8> = (0..256 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let r = Client::new()
        .post(
            &format!("http://{}/upload", client.outbound),
            body.clone(),
            &[("host", "echo"), ("content-type", "application/octet-stream")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body, "body changed in transit");

    // Absolute-form, as an app with HTTP_PROXY set sends it.
    let r = via_http_proxy(client.outbound, Request::get("http://echo/absolute").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/absolute");

    // HTTP/2 with :authority = service; the app is spoken to in its declared protocol (auto:
    // HTTP/1.1 unless gRPC).
    let r = h2_via(
        client.outbound,
        Request::get("http://echo/h2").header("x-user", "42").body(empty()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!((seen["path"].as_str(), seen["version"].as_str()), (Some("/h2"), Some("HTTP/1.1")));
    assert_eq!(seen["headers"]["x-user"], "42");

    // gRPC unary and bidirectional streaming.
    let mut grpc_client = grpc_client(client.outbound, "grpc-echo").await;
    let payload: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    let reply = grpc_client
        .unary(EchoMsg {
            payload: payload.clone(),
            seq: 7,
            server: String::new(),
        })
        .await
        .expect("unary call")
        .into_inner();
    assert_eq!((reply.seq, reply.server.as_str()), (7, "grpc-echo"));
    assert!(reply.payload == payload);
    let outgoing: Vec<EchoMsg> = (0..50)
        .map(|i| EchoMsg {
            payload: vec![i as u8; 1000 + i as usize],
            seq: i,
            server: String::new(),
        })
        .collect();
    let mut stream = grpc_client
        .stream(tokio_stream::iter(outgoing.clone()))
        .await
        .expect("stream call")
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await.expect("stream message") {
        got.push(m);
    }
    assert_eq!(got.len(), 50);
    for (sent, back) in outgoing.iter().zip(&got) {
        assert_eq!((back.seq, &back.payload), (sent.seq, &sent.payload));
    }

    // The proxy counted what it forwarded, by destination and status.
    let metrics = client.metrics().await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("weft_proxy_requests_total{")
                && l.contains("direction=\"outbound\"")
                && l.contains("service=\"echo\"")
                && l.contains("status=\"200\"")
        })
        .unwrap_or_else(|| panic!("no outbound echo 200 counter in:\n{metrics}"));
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(count, 4.0, "{line}");
    assert!(
        metrics.contains("weft_proxy_request_duration_seconds_bucket"),
        "latency histogram exported"
    );
    // Sidecar to sidecar was mTLS, never plaintext.
    let server = echo_proxy.metrics().await;
    assert!(
        server.contains(r#"weft_proxy_inbound_connections_total{transport="mtls",outcome="accepted"}"#),
        "{server}"
    );
    assert!(
        !server.contains(r#"transport="plaintext""#),
        "no plaintext connection reached the echo sidecar:\n{server}"
    );
    let dump = client.config_dump().await;
    assert_eq!(dump["identity"]["spiffeId"], "spiffe://weft.local/ns/default/sa/client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_policy_reaches_exactly_the_proxies_that_need_it() {
    let control = Control::start(BIN).await;
    let (v1, v2) = (EchoServer::start("orders-v1").await, EchoServer::start("orders-v2").await);
    let _p1 = ProxyHandle::start(
        BIN,
        &control,
        "default/orders-v1",
        "cluster-a",
        &[("service", "orders"), ("version", "v1")],
        v1.addr,
    )
    .await;
    let _p2 = ProxyHandle::start(
        BIN,
        &control,
        "default/orders-v2",
        "cluster-a",
        &[("service", "orders"), ("version", "v2")],
        v2.addr,
    )
    .await;
    let caller = ProxyHandle::start(BIN, &control, "default/web", "cluster-a", &[], free_addr()).await;
    let bystander = ProxyHandle::start(BIN, &control, "default/batch", "cluster-a", &[], free_addr()).await;
    assert_eq!(get_via(&caller, "orders", "/", &[]).await.status, 200);

    let start = Instant::now();
    let (status, applied) = control
        .post(
            "/api/v1/resources",
            &policy(
                "orders-split",
                "orders",
                "    - backends: [{subset: v1, weight: 80}, {subset: v2, weight: 20}]\n",
            ),
        )
        .await;
    assert_eq!(status, 200, "{applied}");
    let rev = applied["revision"].as_u64().unwrap();
    assert_eq!(rev, 1);
    eventually(Duration::from_secs(15), "every proxy reports the new revision", || async {
        let proxies = control.get("/api/v1/proxies").await;
        let all = proxies.as_array().unwrap();
        (all.len() == 4 && all.iter().all(|p| p["appliedRevision"] == rev)).then_some(())
    })
    .await;
    let elapsed = start.elapsed();
    eprintln!("apply -> all 4 proxies ACKed: {:.1} ms", elapsed.as_secs_f64() * 1000.0);

    let dump = caller.config_dump().await;
    assert_eq!(dump["config"]["revision"], rev);
    assert_eq!(
        dump["config"]["services"]["default/orders"]["policy"]["routes"][0]["backends"][1]["weight"],
        20
    );
    let bystander_dump = bystander.config_dump().await;
    assert!(
        bystander_dump["config"]["services"].as_object().unwrap().is_empty(),
        "a proxy that never called orders is not sent it: {bystander_dump}"
    );

    // The 80/20 split holds over 2,000 requests (3 sigma is +-2.7 points).
    let n = 2000;
    let mut to_v2 = 0;
    for _ in 0..n {
        let r = get_via(&caller, "orders", "/", &[]).await;
        assert_eq!(r.status, 200);
        if r.header("x-echo-server").as_deref() == Some("orders-v2") {
            to_v2 += 1;
        }
    }
    let share = 100.0 * to_v2 as f64 / n as f64;
    eprintln!("v2 share over {n} requests: {share:.2}% (target 20%)");
    assert!((share - 20.0).abs() <= 3.0, "v2 got {share:.2}% of requests, expected 20 +- 3");

    // A request in flight when the config changes finishes normally.
    let (before_v1, before_v2) = (v1.received(), v2.received());
    let slow = {
        let outbound = caller.outbound;
        tokio::spawn(async move {
            let req = Request::get(format!("http://{outbound}/slow"))
                .header("host", "orders")
                .header("x-echo-delay-ms", "700")
                .body(empty())
                .unwrap();
            Client::new().send(req).await.unwrap().status
        })
    };
    // The slow request is in flight (at one of the apps) before the config changes.
    eventually(Duration::from_secs(10), "the slow request reached an app", || async {
        (v1.received() + v2.received() > before_v1 + before_v2).then_some(())
    })
    .await;
    let (status, _) = control
        .post(
            "/api/v1/resources",
            &policy(
                "orders-split",
                "orders",
                "    - backends: [{subset: v1, weight: 50}, {subset: v2, weight: 50}]\n",
            ),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(slow.await.unwrap(), 200, "the in-flight request survived the config swap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_resource_changes_nothing_anywhere() {
    let control = Control::start(BIN).await;
    let (_v1, _p1, caller) = orders_and_caller(&control).await;
    eventually(Duration::from_secs(15), "caller on revision 1", || async {
        (caller.config_dump().await["config"]["revision"] == 1).then_some(())
    })
    .await;
    let before_config = caller.config_dump().await["config"].clone();
    let before_history = control.get("/api/v1/revisions").await;

    // A subset no workload has.
    let (status, err) = control
        .post(
            "/api/v1/resources",
            &policy("orders", "orders", "    - backends: [{subset: v9, weight: 100}]\n"),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(err["field"], "spec.routes[0].backends[0].subset");
    assert!(err["error"].as_str().unwrap().contains("v9"), "{err}");
    // An unknown field, a bad duration, weights that do not sum to 100.
    for (routes, field) in [
        ("    - timeout: 2s\n      retires: {attempts: 1}\n", "spec.routes[0]"),
        ("    - timeout: soon\n", "spec.routes[0].timeout"),
        ("    - backends: [{subset: v1, weight: 60}]\n", "spec.routes[0].backends"),
    ] {
        let (status, err) = control.post("/api/v1/resources", &policy("orders", "orders", routes)).await;
        assert_eq!(status, 400, "{err}");
        assert!(err["field"].as_str().unwrap().starts_with(field), "{err}");
    }

    // The CLI: exit 64, naming file, field and value.
    let file = std::env::temp_dir().join(format!("weft-bad-{}.yaml", std::process::id()));
    std::fs::write(&file, policy("orders", "orders", "    - timeout: 5x\n")).unwrap();
    let out = control.cli().args(["apply", "-f", file.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for needle in [file.to_str().unwrap(), "spec.routes[0].timeout", "5x"] {
        assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
    let subset_file = std::env::temp_dir().join(format!("weft-bad-subset-{}.yaml", std::process::id()));
    std::fs::write(
        &subset_file,
        policy("orders", "orders", "    - backends: [{subset: v9, weight: 100}]\n"),
    )
    .unwrap();
    let out = control.cli().args(["apply", "-f", subset_file.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains(subset_file.to_str().unwrap()) && stderr.contains("v9"), "{stderr}");
    // Every problem at once from the API: the weights (the resource's own check) and the
    // subsets no workload has (the live mesh's), each at its field.
    let both = policy(
        "orders",
        "orders",
        "    - backends: [{subset: v8, weight: 20}, {subset: v9, weight: 90}]\n",
    );
    let (status, err) = control.post("/api/v1/resources", &both).await;
    assert_eq!(status, 400, "{err}");
    let text = err.to_string();
    for needle in [
        "weights must sum to 100",
        "spec.routes[0].backends[0].subset",
        "spec.routes[0].backends[1].subset",
        "label version=v8",
        "label version=v9",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from: {err:#}");
    }
    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_file(subset_file);

    // A bypass for a name no service can have (it was stored, durably, and in the ledger).
    for (path, body, field, value) in [
        ("/api/v1/bypass/Bad%20Name!", r#"{"enabled": true}"#, "service", "Bad Name!"),
        (
            "/api/v1/bypass/orders",
            r#"{"enabled": true, "namespace": "Team_A"}"#,
            "namespace",
            "Team_A",
        ),
    ] {
        let (status, err) = control.post(path, body).await;
        assert_eq!((status, err["field"].as_str()), (400, Some(field)), "{path}: {err}");
        assert!(err["error"].as_str().unwrap().contains(value), "{err}");
    }
    // The refused calls are audited (kind "audit", status 400); nothing else mentions them.
    let ledger = control.get("/api/v1/ledger").await;
    let changes: Vec<String> = ledger
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] != "audit")
        .map(|e| e.to_string())
        .collect();
    assert!(
        changes.iter().all(|e| !e.contains("Bad Name") && !e.contains("Team_A")),
        "{changes:?}"
    );

    assert_eq!(control.get("/api/v1/status").await["revision"], 1, "revision unchanged");
    assert_eq!(control.get("/api/v1/revisions").await, before_history, "history unchanged");
    assert_eq!(caller.config_dump().await["config"], before_config, "proxy config unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restart_loses_no_request_and_no_history() {
    let mut control = Control::start(BIN).await;
    let (orders, _p1, caller) = orders_and_caller(&control).await;
    let history = control.get("/api/v1/revisions").await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (outbound, stop) = (caller.outbound, stop.clone());
        tokio::spawn(async move {
            let client = Client::new();
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let req = Request::get(format!("http://{outbound}/steady"))
                    .header("host", "orders")
                    .body(empty())
                    .unwrap();
                match client.send(req).await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failed.push(format!("{} {}", r.status, r.text())),
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        })
    };
    orders.wait_received(orders.received() + 20, Duration::from_secs(15)).await;
    control.process.kill();
    // The mesh keeps serving on last-known-good while the control plane is down: 50 more
    // requests answered with no control plane.
    orders.wait_received(orders.received() + 50, Duration::from_secs(15)).await;
    control.restart().await;
    let start = Instant::now();
    eventually(Duration::from_secs(10), "both proxies reconnected on revision 1", || async {
        let proxies = control.get("/api/v1/proxies").await;
        let all = proxies.as_array().unwrap().clone();
        (all.len() == 2 && all.iter().all(|p| p["appliedRevision"] == 1)).then_some(())
    })
    .await;
    eprintln!(
        "proxies resynced {:.0} ms after the control plane came back",
        start.elapsed().as_secs_f64() * 1000.0
    );
    // Traffic continues across the resync.
    orders.wait_received(orders.received() + 20, Duration::from_secs(15)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    // The three waits saw orders receive 90 of this loop's requests; the loop sends one at a
    // time, so at most the last of them was still on its way back when it stopped (a full
    // suite run once counted 98, which the old "more than 100" called a failure).
    assert!(ok >= 89, "steady traffic ran: {ok} requests");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    assert_eq!(control.get("/api/v1/revisions").await, history, "history intact after restart");

    // And the restarted control plane distributes new changes.
    let (status, applied) = control
        .post("/api/v1/resources", &policy("orders", "orders", "    - timeout: 3s\n"))
        .await;
    assert_eq!((status, applied["revision"].as_u64()), (200, Some(2)));
    eventually(Duration::from_secs(15), "caller on revision 2", || async {
        (caller.config_dump().await["config"]["revision"] == 2).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_proxy_leaves_balancing_within_five_seconds() {
    let control = Control::start(BIN).await;
    let (a, b) = (EchoServer::start("orders-a").await, EchoServer::start("orders-b").await);
    let _pa = ProxyHandle::start(BIN, &control, "default/orders-a", "cluster-a", &[("service", "orders")], a.addr).await;
    let mut pb = ProxyHandle::start(BIN, &control, "default/orders-b", "cluster-a", &[("service", "orders")], b.addr).await;
    let caller = ProxyHandle::start(BIN, &control, "default/web", "cluster-a", &[], free_addr()).await;
    assert_eq!(get_via(&caller, "orders", "/", &[]).await.status, 200);
    let endpoints = |dump: &Value| {
        dump["config"]["services"]["default/orders"]["endpoints"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0)
    };
    eventually(Duration::from_secs(15), "two endpoints", || async {
        (endpoints(&caller.config_dump().await) == 2).then_some(())
    })
    .await;

    pb.process.kill();
    let start = Instant::now();
    eventually(Duration::from_secs(5), "the killed endpoint leaves the caller's config", || async {
        (endpoints(&caller.config_dump().await) == 1).then_some(())
    })
    .await;
    eprintln!(
        "killed proxy left the caller's endpoints after {:.0} ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
    for _ in 0..50 {
        let r = get_via(&caller, "orders", "/", &[]).await;
        assert_eq!((r.status, r.header("x-echo-server").as_deref()), (200, Some("orders-a")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_config_proxy_needs_no_control_plane() {
    let echo = EchoServer::start("echo").await;
    let dir = std::env::temp_dir().join(format!("weft-static-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (s_in, s_out, s_admin) = (free_addr(), free_addr(), free_addr());
    let server_file = dir.join("server.yaml");
    std::fs::write(
        &server_file,
        format!(
            "workload: default/echo\ncluster: cluster-a\napp: '{}'\ninbound: '{s_in}'\noutbound: '{s_out}'\nadmin: '{s_admin}'\n",
            echo.addr
        ),
    )
    .unwrap();
    let (c_in, c_out, c_admin) = (free_addr(), free_addr(), free_addr());
    let client_file = dir.join("client.yaml");
    std::fs::write(
        &client_file,
        format!(
            "workload: default/web\ncluster: cluster-a\napp: '{}'\ninbound: '{c_in}'\noutbound: '{c_out}'\nadmin: '{c_admin}'\nservices:\n  - name: echo\n    endpoints: [{{address: '{s_in}', cluster: cluster-a, labels: {{version: v1}}}}]\n    policy: {{service: echo, routes: [{{timeout: 300ms}}]}}\n",
            free_addr()
        ),
    )
    .unwrap();
    let _server = weft_test::Process::spawn(
        BIN,
        "static-server",
        &["proxy".into(), "--config".into(), server_file.display().to_string()],
    );
    let _client = weft_test::Process::spawn(
        BIN,
        "static-client",
        &["proxy".into(), "--config".into(), client_file.display().to_string()],
    );
    let http = Client::new();
    eventually(Duration::from_secs(10), "static client ready", || async {
        http.get(&format!("http://{c_admin}/ready")).await.ok().filter(|r| r.status == 200)
    })
    .await;
    eventually(Duration::from_secs(10), "static server ready", || async {
        http.get(&format!("http://{s_admin}/ready")).await.ok().filter(|r| r.status == 200)
    })
    .await;

    let req = |delay: &str| {
        Request::get(format!("http://{c_out}/static"))
            .header("host", "echo")
            .header("x-echo-delay-ms", delay)
            .body(empty())
            .unwrap()
    };
    let r = http.send(req("0")).await.unwrap();
    assert_eq!(
        (r.status, r.header("x-echo-server").as_deref()),
        (200, Some("echo")),
        "{}",
        r.text()
    );
    // The static policy's 300ms route timeout is enforced.
    let start = Instant::now();
    let r = http.send(req("2000")).await.unwrap();
    let took = start.elapsed();
    assert_eq!((r.status, r.header("x-weft-error").as_deref()), (504, Some("request-timeout")));
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
        "timed out after {took:?}"
    );
    let r = http
        .send(
            Request::get(format!("http://{c_out}/"))
                .header("host", "nowhere")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.header("x-weft-error").as_deref()), (404, Some("unknown-service")));

    // A bad static file: exit 64, naming the file and the field; nothing is bound.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, format!("workload: default/x\napp: '{}'\ninbound: '{}'\noutbound: '{}'\nservices:\n  - name: echo\n    endpoints: [{{address: '127.0.0.1:1', weight: 3}}]\n", free_addr(), free_addr(), free_addr())).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["proxy", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(bad.to_str().unwrap()) && stderr.contains("services[0].endpoints[0]") && stderr.contains("weight"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_config_is_nacked_and_last_known_good_keeps_serving() {
    use weft_api::proto::{self, proxy_message::Msg};
    let echo = EchoServer::start("echo").await;
    let service = |address: String| proto::Service {
        name: "echo".into(),
        namespace: "default".into(),
        endpoints: vec![proto::Endpoint {
            address,
            cluster: "cluster-a".into(),
            labels: Default::default(),
            workload: "default/echo".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let good = proto::ProxyConfig {
        version: 1,
        revision: 5,
        proxy_id: "web".into(),
        services: vec![service(echo.addr.to_string())],
        ..Default::default()
    };
    let bad = proto::ProxyConfig {
        version: 2,
        revision: 6,
        proxy_id: "web".into(),
        services: vec![service("not-an-address".into())],
        ..Default::default()
    };
    let mut scripted = weft_test::scripted::ScriptedControl::start(vec![good, bad]).await;
    let proxy = ProxyHandle::start_url(BIN, &scripted.url, None, "default/web", "cluster-a", &[], free_addr()).await;
    let (admin, outbound) = (proxy.admin, proxy.outbound);

    assert!(matches!(scripted.next().await.1, Msg::Register(r) if r.name == "web" && r.applied_revision == 0));
    assert!(matches!(scripted.next().await.1, Msg::Ack(a) if a.version == 1 && a.revision == 5));
    let nack = loop {
        match scripted.next().await.1 {
            Msg::Nack(n) => break n,
            Msg::Telemetry(_) => continue,
            other => panic!("expected a NACK, got {other:?}"),
        }
    };
    assert_eq!((nack.version, nack.revision), (2, 6));
    assert!(
        nack.reason.contains("services[0].endpoints[0].address") && nack.reason.contains("not-an-address"),
        "{}",
        nack.reason
    );

    let dump: Value = Client::new().get(&format!("http://{admin}/config_dump")).await.unwrap().json();
    assert_eq!(
        (dump["config"]["version"].as_u64(), dump["config"]["revision"].as_u64()),
        (Some(1), Some(5)),
        "{dump}"
    );
    assert!(dump["lastNack"].as_str().unwrap().contains("not-an-address"));
    let r = Client::new()
        .send(
            Request::get(format!("http://{outbound}/still"))
                .header("host", "echo")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.header("x-echo-server").as_deref()),
        (200, Some("echo")),
        "last-known-good still routes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_up_serves_every_service_and_leaves_nothing_behind() {
    let api = free_addr();
    let start = Instant::now();
    // A data directory of the test's, to find the CA the control plane writes there; and `weft
    // up` logs this user's CLI in: here, into a file of the test's own.
    let data_dir = std::env::temp_dir().join(format!("weft-up-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let config = std::env::temp_dir().join(format!("weft-up-cli-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&config);
    let mut up = weft_test::Process::spawn_env(
        BIN,
        "weft-up",
        &[
            "up".into(),
            "--api".into(),
            api.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ],
        &[("WEFT_CONFIG", config.to_str().unwrap())],
    );
    let ca_file = data_dir.join("control").join("ca.pem");
    let services = eventually(Duration::from_secs(30), "all six demo services show rps > 0", || async {
        let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).ok()?).ok()?;
        assert_eq!(saved["server"], format!("https://{api}"), "weft up saved its server for the CLI");
        assert_eq!(
            saved["caPem"].as_str(),
            std::fs::read_to_string(&ca_file).ok().as_deref(),
            "and its CA"
        );
        let token = saved["token"].as_str()?;
        let http = Client::trusting(&std::fs::read_to_string(&ca_file).ok()?);
        let req = Request::get(format!("https://{api}/api/v1/status"))
            .header("authorization", format!("Bearer {token}"))
            .body(empty())
            .unwrap();
        let s = http.send(req).await.ok()?.json();
        let services = s["services"].as_array()?.clone();
        (services.len() == 6 && services.iter().all(|v| v["rps"].as_f64().unwrap_or(0.0) > 0.0)).then_some(services)
    })
    .await;
    eprintln!("weft up: all six services serving after {:.1} s", start.elapsed().as_secs_f64());
    let names: Vec<&str> = services.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "checkout-api",
            "inventory-svc",
            "mobile-gateway",
            "orders-api",
            "payments-svc",
            "profile-svc"
        ]
    );
    let inventory = services.iter().find(|v| v["name"] == "inventory-svc").unwrap();
    assert_eq!(inventory["cluster"], "cluster-b,cluster-c");
    assert_eq!(inventory["proxies"]["total"], 2);

    let children = descendants(up.pid());
    assert_eq!(children.len(), 17, "control plane + 8 apps + 8 proxies: {children:?}");
    up.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(
        up.wait(Duration::from_secs(10)),
        Some(0),
        "weft up exits cleanly on SIGINT:\n{}",
        up.log_text()
    );
    let alive: Vec<u32> = children
        .into_iter()
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    assert!(alive.is_empty(), "orphans left behind: {alive:?}");
    assert!(std::net::TcpListener::bind(api).is_ok(), "the API port is free again");
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_dir_all(&data_dir);
}

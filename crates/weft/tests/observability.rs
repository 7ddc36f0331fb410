//! End-to-end tests of what operators look at: a real Prometheus scraping the sidecars and the
//! control plane, and the dashboard in a real headless Chromium, driving the intent loop.

use std::path::PathBuf;
use std::time::Duration;
use weft_test::apps::EchoServer;
use weft_test::browser::Browser;
use weft_test::load::Load;
use weft_test::prometheus::{Job, Prometheus};
use weft_test::{Control, ProxyHandle, eventually, free_addr};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

fn artifacts() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifacts")
}

async fn instance(control: &Control, name: &str, service: &str, version: &str) -> (EchoServer, ProxyHandle) {
    let app = EchoServer::start(name).await;
    let proxy = ProxyHandle::start(
        BIN,
        control,
        &format!("default/{name}"),
        "cluster-a",
        &[("service", service), ("version", version)],
        app.addr,
    )
    .await;
    (app, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_proxy_and_the_control_plane_and_promql_gives_per_service_rates() {
    let control = Control::start(BIN).await;
    let (_orders, orders_proxy) = instance(&control, "orders-v1", "orders", "v1").await;
    let (_pay, pay_proxy) = instance(&control, "payments-v1", "payments", "v1").await;
    let web = ProxyHandle::start(BIN, &control, "default/web", "cluster-a", &[], free_addr()).await;
    // The control plane's /metrics needs a viewer credential: Prometheus sends one.
    let scraper = control.api_token("prometheus", "viewer").await;
    let prom = Prometheus::start(&[
        Job::plain("proxies", "/metrics", vec![orders_proxy.admin, pay_proxy.admin, web.admin]),
        Job {
            bearer: Some(scraper),
            ..Job::control("control", &control)
        },
    ])
    .await
    .expect("prometheus starts");
    // orders at ~50 requests/s, payments at ~10/s.
    let to_orders = Load::start(web.outbound, "orders", &[], Duration::from_millis(20));
    let to_payments = Load::start(web.outbound, "payments", &[], Duration::from_millis(100));
    let rates = eventually(Duration::from_secs(30), "PromQL rates for both services", || async {
        let rows = prom
            .query("sum by (service) (rate(weft_proxy_requests_total{direction=\"inbound\"}[5s]))")
            .await
            .ok()?;
        let rate = |svc: &str| {
            rows.iter()
                .find(|r| r["metric"]["service"] == svc)
                .and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok())
        };
        // Once both series cover a full window of steady load.
        match (rate("orders"), rate("payments")) {
            (Some(o), Some(p)) if o > 20.0 && p > 4.0 => Some((o, p)),
            _ => None,
        }
    })
    .await;
    let (orders_rps, payments_rps) = rates;
    assert!(orders_rps <= 60.0, "orders at {orders_rps:.1}/s by PromQL, offered at most 50/s");
    assert!((4.0..=15.0).contains(&payments_rps), "payments at {payments_rps:.1}/s by PromQL");
    assert!(orders_rps > 2.5 * payments_rps, "{orders_rps:.1} vs {payments_rps:.1}");
    // The caller's view by destination, and the control plane's own series.
    // Each waits for its own series: a scrape that covered the inbound window may not yet cover
    // the outbound one.
    let wait = Duration::from_secs(20);
    let value = |row: &serde_json::Value| row["value"][1].as_str().and_then(|v| v.parse::<f64>().ok());
    let outbound = prom
        .wait_for(
            wait,
            "sum by (service) (rate(weft_proxy_requests_total{direction=\"outbound\",status=\"200\"}[5s]))",
            |rows| (rows.len() == 2 && rows.iter().all(|r| value(r) > Some(0.0))).then(|| rows.to_vec()),
        )
        .await;
    assert_eq!(outbound.len(), 2, "{outbound:?}");
    let proxies = prom
        .wait_for(wait, "weft_control_proxies_connected", |rows| rows.first().and_then(value))
        .await;
    assert_eq!(proxies, 3.0, "proxies connected by PromQL");
    let acks = prom
        .wait_for(wait, "weft_control_config_acks_total", |rows| rows.first().and_then(value))
        .await;
    assert!(acks >= 3.0, "{acks} ACKs");
    let up = prom.wait_for(wait, "up == 1", |rows| (rows.len() == 4).then_some(rows.len())).await;
    assert_eq!(up, 4, "every target scraped");
    let ok_rate = prom
        .wait_for(
            wait,
            "sum(rate(weft_proxy_requests_total{direction=\"inbound\",class=\"2xx\"}[5s]))",
            |rows| rows.first().and_then(value).filter(|r| *r > 20.0),
        )
        .await;
    assert!(ok_rate > 20.0, "2xx by status class: {ok_rate}");
    let phases = prom
        .wait_for(wait, "count(weft_control_intents)", |rows| rows.first().and_then(value))
        .await;
    assert_eq!(phases, 8.0, "intents by each of the 8 phases");
    // `weft top`: the same traffic per destination route, from the control plane.
    let top = |format: &'static str| {
        let out = control.cli().args(["top", "--once", "-o", format]).output().expect("weft top runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&top("json")).unwrap();
    let orders = json["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "orders")
        .expect("orders in top")
        .clone();
    assert_eq!(orders["route"], "default", "{orders}");
    let rps = orders["rps"].as_f64().unwrap();
    assert!((15.0..=60.0).contains(&rps), "{orders}");
    assert_eq!(orders["successRate"], 100.0, "{orders}");
    assert!(orders["p50Ms"].as_f64().unwrap() <= orders["p99Ms"].as_f64().unwrap(), "{orders}");
    let table = top("table");
    assert!(table.lines().next().unwrap().starts_with("SERVICE"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("orders") && l.contains("default") && l.contains("100.00%")),
        "{table}"
    );
    // `weft tap orders`: request metadata from both the callers' and orders' own sidecars, only
    // for the admin role.
    let tap = |token: &str| {
        control
            .cli()
            .args(["tap", "orders", "--count", "6", "-o", "json"])
            .env("WEFT_API_TOKEN", token)
            .output()
            .expect("weft tap runs")
    };
    let refused = tap("not-a-token");
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("not valid") && why.contains("hint"), "{why}");
    let viewer = control.api_token("tap-viewer", "viewer").await;
    let refused = tap(&viewer);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("needs the admin role"), "{why}");
    let token = control.admin_token.clone();
    let out = tap(token.trim());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 6);
    for e in &events {
        assert_eq!(
            (e["service"].as_str(), e["status"].as_u64(), e["path"].as_str()),
            (Some("orders"), Some(200), Some("/load")),
            "{e}"
        );
        assert!(e.get("body").is_none());
    }
    let directions: std::collections::BTreeSet<&str> = events.iter().filter_map(|e| e["direction"].as_str()).collect();
    assert_eq!(directions.len(), 2, "both sides of the hop: {events:?}");
    let inbound = events.iter().find(|e| e["direction"] == "inbound").unwrap();
    assert_eq!(inbound["source"], "spiffe://weft.local/ns/default/sa/web", "{inbound}");
    eventually(Duration::from_secs(15), "the tap closes when the CLI exits", || async {
        control.process.log_text().contains("tap closed").then_some(())
    })
    .await;
    to_orders.stop().await;
    to_payments.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_queue_and_cards_steps_a_manual_intent_and_toggles_bypass() {
    let control = Control::start(BIN).await;
    let (_v1, _p1) = instance(&control, "checkout-v1", "checkout", "v1").await;
    let (_v2, _p2) = instance(&control, "checkout-v2", "checkout", "v2").await;
    let web = ProxyHandle::start(BIN, &control, "default/web", "cluster-a", &[], free_addr()).await;
    let load = Load::start(web.outbound, "checkout", &[("x-tenant", "acme")], Duration::from_millis(20));
    let intent = r#"apiVersion: weft/v1
kind: Intent
metadata: { name: MESH-701 }
spec:
  title: canary 50%
  target: checkout
  scope: tenant:acme
  change:
    apply:
      - apiVersion: weft/v1
        kind: TrafficPolicy
        metadata: { name: checkout-canary }
        spec:
          service: checkout
          routes:
            - name: canary
              backends: [ { subset: v2, weight: 50 }, { subset: v1, weight: 50 } ]
  rollout: { stages: [50, 100], bake: 1s, mode: manual }
  slo: { maxErrorRate: 5, maxP99Increase: 1000, minRequests: 5 }
"#;
    let (status, body) = control.post("/api/v1/intents", intent).await;
    assert!([200, 201, 202].contains(&status), "{status} {body}");

    // The control plane serves TLS from the mesh CA; the browser accepts its one serving key.
    let browser = Browser::start(1366, 900, &[control.serving_spki().await])
        .await
        .expect("headless chromium");
    browser.goto(&control.url("/")).await.unwrap();
    let shots = artifacts();
    // Without a session the dashboard asks for a token and shows no data.
    browser
        .wait_for(Duration::from_secs(15), "the sign-in form", || async {
            let hidden = browser
                .eval("return document.getElementById('login').hidden", serde_json::json!([]))
                .await?;
            Ok((hidden == false).then_some(()))
        })
        .await
        .unwrap();
    assert_eq!(browser.count(".card").await.unwrap(), 0, "no data before signing in");
    browser.screenshot(&shots.join("dashboard-sign-in.png")).await.unwrap();
    sign_in(&browser, "not-a-token").await;
    browser
        .wait_for(Duration::from_secs(10), "a refused token is explained", || async {
            let why = browser.text("#login-error").await?.unwrap_or_default();
            Ok(why.contains("not valid").then_some(why))
        })
        .await
        .unwrap();

    // A viewer sees the mesh, and cannot Step or bypass: the controls say why.
    let viewer = control.api_token("dash-viewer", "viewer").await;
    sign_in(&browser, &viewer).await;
    browser
        .wait_for(Duration::from_secs(15), "the viewer sees the queue and the cards", || async {
            let queued = browser.count("#queue .intent[data-id='MESH-701']").await?;
            let card = browser.text(".card[data-service='checkout'] .rps").await?;
            let who = browser.text("#who").await?.unwrap_or_default();
            Ok((queued == 1 && card.is_some() && who == "dash-viewer (viewer)").then_some(()))
        })
        .await
        .unwrap();
    let step = browser
        .eval(
            "const b = document.getElementById('step'); return [b.disabled, b.title]",
            serde_json::json!([]),
        )
        .await
        .unwrap();
    assert_eq!(step[0], true, "Step is disabled for a viewer: {step}");
    assert!(step[1].as_str().unwrap().contains("needs the operator role"), "{step}");
    let toggle = browser
        .eval(
            "const t = document.querySelector(\".card[data-service='checkout'] input[type=checkbox]\"); return [t.disabled, t.title]",
            serde_json::json!([]),
        )
        .await
        .unwrap();
    assert_eq!(toggle[0], true, "bypass is disabled for a viewer: {toggle}");
    browser.screenshot(&shots.join("dashboard-viewer.png")).await.unwrap();
    // Even a page that enables the button itself is refused by the server: 403, nothing moves.
    let forced = browser
        .eval(
            "return fetch('/api/v1/intents/MESH-701/approve', {method: 'POST'}).then(r => r.status)",
            serde_json::json!([]),
        )
        .await
        .unwrap();
    assert_eq!(forced, 403, "a viewer's approve is refused");
    assert_eq!(control.get("/api/v1/intents/MESH-701").await["phase"], "awaiting-approval");
    browser.click("#sign-out").await.unwrap();
    browser
        .wait_for(Duration::from_secs(10), "signed out", || async {
            let hidden = browser
                .eval("return document.getElementById('login').hidden", serde_json::json!([]))
                .await?;
            Ok((hidden == false).then_some(()))
        })
        .await
        .unwrap();

    // An operator can drive the loop.
    let operator = control.api_token("dash-operator", "operator").await;
    sign_in(&browser, &operator).await;
    // The queue and the cards render from the live API.
    browser
        .wait_for(Duration::from_secs(15), "the queue and the checkout card", || async {
            let queued = browser.count("#queue .intent[data-id='MESH-701']").await?;
            let card = browser.text(".card[data-service='checkout'] .rps").await?;
            Ok((queued == 1 && card.is_some()).then_some(()))
        })
        .await
        .unwrap();
    let queue_text = browser.text("#queue").await.unwrap().unwrap();
    assert!(queue_text.contains("canary 50% / tenant:acme"), "{queue_text}");
    assert!(queue_text.contains("checkout"), "{queue_text}");
    // Traffic shows on the card, and its chart has points.
    browser
        .wait_for(Duration::from_secs(15), "rps on the checkout card", || async {
            let rps = browser.text(".card[data-service='checkout'] .rps").await?.unwrap_or_default();
            Ok(rps.parse::<f64>().ok().filter(|r| *r > 0.0))
        })
        .await
        .unwrap();
    let status = browser.text("#loop-status").await.unwrap().unwrap();
    assert!(status.contains("MESH-701") && status.contains("awaiting approval"), "{status}");
    browser.screenshot(&shots.join("dashboard-awaiting.png")).await.unwrap();

    // Step: the intent leaves awaiting-approval and its stage runs; the highlighted phase
    // follows.
    browser.click("#step").await.unwrap();
    let phase = browser
        .wait_for(Duration::from_secs(10), "the loop moves past approval", || async {
            let v = browser
                .eval("return document.getElementById('loop-status').dataset.phase", serde_json::json!([]))
                .await?;
            let p = v.as_str().unwrap_or("").to_string();
            Ok(["distribution", "enforcement", "observation"].contains(&p.as_str()).then_some(p))
        })
        .await
        .unwrap();
    let active = browser.text(".step.active").await.unwrap().unwrap_or_default();
    assert_eq!(active, phase, "the highlighted step is the loop's phase");
    let shown = control.get("/api/v1/intents/MESH-701").await;
    assert_ne!(shown["phase"], "awaiting-approval", "{shown}");
    browser.screenshot(&shots.join("dashboard-stepped.png")).await.unwrap();

    // Bypass on the card: the control plane records it and the card changes.
    browser.click(".card[data-service='checkout'] input[type=checkbox]").await.unwrap();
    browser
        .wait_for(Duration::from_secs(10), "the card shows bypass on", || async {
            let b = browser.text(".card[data-service='checkout'] .bypass").await?;
            let bypassed = browser.count(".card.bypassed[data-service='checkout']").await?;
            Ok((b.as_deref() == Some("on") && bypassed == 1).then_some(()))
        })
        .await
        .unwrap();
    let status = control.get("/api/v1/status").await;
    let checkout = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "checkout")
        .unwrap()
        .clone();
    assert_eq!(checkout["bypass"], true, "{checkout}");
    browser.screenshot(&shots.join("dashboard-bypass.png")).await.unwrap();
    browser.click(".card[data-service='checkout'] input[type=checkbox]").await.unwrap();
    eventually(Duration::from_secs(10), "bypass off again", || async {
        let s = control.get("/api/v1/status").await;
        let c = s["services"].as_array()?.iter().find(|s| s["name"] == "checkout")?.clone();
        (c["bypass"] == false).then_some(())
    })
    .await;

    // Auto: the rest of the rollout runs by itself to promotion.
    browser.click("#auto").await.unwrap();
    eventually(Duration::from_secs(30), "MESH-701 promoted in auto mode", || async {
        let i = control.get("/api/v1/intents/MESH-701").await;
        (i["phase"] == "promoted").then_some(())
    })
    .await;
    browser
        .wait_for(
            Duration::from_secs(10),
            "the dashboard shows it promoted and the loop idle",
            || async {
                let state = browser.text("#queue .intent[data-id='MESH-701'] .state").await?;
                let status = browser.text("#loop-status").await?;
                Ok((state.as_deref() == Some("promoted") && status.as_deref() == Some("Waiting for next intent")).then_some(()))
            },
        )
        .await
        .unwrap();
    let decision = browser.text("#last-decision").await.unwrap().unwrap();
    assert!(decision.contains("MESH-701"), "{decision}");
    // The ledger view names who did it.
    browser
        .wait_for(Duration::from_secs(10), "the ledger names the operator", || async {
            Ok((browser.count("#ledger .entry[data-actor='dash-operator']").await? >= 3).then_some(()))
        })
        .await
        .unwrap();
    browser.screenshot(&shots.join("dashboard-promoted.png")).await.unwrap();
    let stats = load.stop().await;
    assert!(stats.ok > 0);
}

/// Signs the dashboard in with `token`, as a person pasting it would.
async fn sign_in(browser: &Browser, token: &str) {
    browser
        .eval(
            "document.getElementById('token-input').value = arguments[0]; document.getElementById('login-form').requestSubmit(); return true",
            serde_json::json!([token]),
        )
        .await
        .unwrap();
}

/// A sidecar that exports spans to `otlp`, in front of `app`.
async fn traced_proxy(control: &Control, name: &str, app: std::net::SocketAddr, otlp: &str) -> ProxyHandle {
    let token = control.token(&format!("default/{name}"), name).await;
    let p = ProxyHandle::spawn_url(
        BIN,
        &control.grpc_url(),
        Some(&token),
        &format!("default/{name}"),
        "cluster-a",
        &[("version", "v1")],
        app,
        &[("WEFT_OTLP_ENDPOINT", otlp)],
    );
    p.wait_ready().await;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_through_three_services_is_one_connected_trace_over_otlp() {
    use weft_test::otlp::OtlpReceiver;
    let control = Control::start(BIN).await;
    let receiver = OtlpReceiver::start().await;
    // orders <- checkout (a demo app that calls orders through its sidecar, passing
    // traceparent on) <- the caller's sidecar.
    let orders_app = free_addr();
    let orders = traced_proxy(&control, "orders", orders_app, &receiver.url()).await;
    let _orders_app = weft_test::process::Process::spawn(
        BIN,
        "demo-orders",
        &[
            "demo-app".into(),
            "--name".into(),
            "orders".into(),
            "--listen".into(),
            orders_app.to_string(),
        ],
    );
    let checkout_app = free_addr();
    let checkout = traced_proxy(&control, "checkout", checkout_app, &receiver.url()).await;
    let _checkout_app = weft_test::process::Process::spawn(
        BIN,
        "demo-checkout",
        &[
            "demo-app".into(),
            "--name".into(),
            "checkout".into(),
            "--listen".into(),
            checkout_app.to_string(),
            "--call".into(),
            "orders".into(),
            "--proxy".into(),
            checkout.outbound.to_string(),
        ],
    );
    let web = traced_proxy(&control, "web", free_addr(), &receiver.url()).await;
    // Until both demo apps listen and the first calls have subscribed, the chain may fail.
    let reply = eventually(Duration::from_secs(10), "the chain answers", || async {
        let r = weft_test::http::Client::new()
            .send(
                hyper::Request::get(format!("http://{}/cart", web.outbound))
                    .header("host", "checkout")
                    .header("x-trace-test", "1")
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
            .await
            .ok()?;
        (r.status == 200).then_some(r)
    })
    .await;
    assert!(reply.text().contains("orders"), "{}", reply.text());
    // The last request made exactly one trace of four spans: client and server at each hop.
    let spans = eventually(Duration::from_secs(10), "four spans of the last request's trace", || async {
        let all = receiver.spans();
        let root = all.iter().rev().find(|s| s.service == "web" && s.kind() == "client")?;
        let trace: Vec<_> = all.iter().filter(|s| s.trace_id() == root.trace_id()).cloned().collect();
        (trace.len() >= 4).then_some(trace)
    })
    .await;
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let find = |service: &str, kind: &str| {
        spans
            .iter()
            .find(|s| s.service == service && s.kind() == kind)
            .unwrap_or_else(|| panic!("no {kind} span from {service}: {spans:#?}"))
    };
    let (web_client, checkout_server) = (find("web", "client"), find("checkout", "server"));
    let (checkout_client, orders_server) = (find("checkout", "client"), find("orders", "server"));
    assert_eq!(web_client.parent_id(), "", "the caller's sidecar started the trace");
    assert_eq!(checkout_server.parent_id(), web_client.span_id());
    assert_eq!(
        checkout_client.parent_id(),
        checkout_server.span_id(),
        "the app passed traceparent on"
    );
    assert_eq!(orders_server.parent_id(), checkout_client.span_id());
    assert_eq!(web_client.attr("weft.service").as_deref(), Some("checkout"));
    assert_eq!(orders_server.attr("http.response.status_code").as_deref(), Some("200"));
    assert_eq!(
        checkout_server.attr("weft.peer").as_deref(),
        Some("spiffe://weft.local/ns/default/sa/web")
    );
    // Each child starts after and ends before its parent.
    for (parent, child) in [
        (web_client, checkout_server),
        (checkout_server, checkout_client),
        (checkout_client, orders_server),
    ] {
        assert!(child.span.start_time_unix_nano >= parent.span.start_time_unix_nano);
        assert!(
            child.span.end_time_unix_nano <= parent.span.end_time_unix_nano,
            "{parent:?} {child:?}"
        );
    }
    drop(orders);
}

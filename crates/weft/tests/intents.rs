//! End-to-end tests of the intent loop: real control plane and proxies, echo apps, steady load
//! through every caller, and the loop judging changes on the mesh's own telemetry.

use serde_json::Value;
use std::time::{Duration, Instant};
use weft_test::apps::EchoServer;
use weft_test::load::{Load, LoadStats};
use weft_test::{Control, ProxyHandle, eventually, free_addr};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

/// orders (v1, and v2 when asked) behind sidecars, `callers` caller proxies each with steady
/// load, and telemetry already flowing (so intents have a baseline).
struct Fixture {
    control: Control,
    _apps: Vec<EchoServer>,
    _servers: Vec<ProxyHandle>,
    callers: Vec<ProxyHandle>,
    loads: Vec<Load>,
}

impl Fixture {
    async fn start(callers: usize, with_v2: bool, headers: &[(&str, &str)], every: Duration) -> Self {
        Self::start_paced(&vec![every; callers], with_v2, headers).await
    }

    /// One caller per interval in `every`, each sending a request that often.
    async fn start_paced(every: &[Duration], with_v2: bool, headers: &[(&str, &str)]) -> Self {
        let control = Control::start(BIN).await;
        let mut apps = vec![EchoServer::start("orders-v1").await];
        if with_v2 {
            apps.push(EchoServer::start("orders-v2").await);
        }
        let mut servers = Vec::new();
        for (i, app) in apps.iter().enumerate() {
            let version = format!("v{}", i + 1);
            let workload = format!("default/orders-{version}");
            servers.push(
                ProxyHandle::start(
                    BIN,
                    &control,
                    &workload,
                    "cluster-a",
                    &[("service", "orders"), ("version", &version)],
                    app.addr,
                )
                .await,
            );
        }
        let mut proxies = Vec::new();
        let mut loads = Vec::new();
        for (i, every) in every.iter().enumerate() {
            let cluster = if i % 2 == 0 { "cluster-a" } else { "cluster-b" };
            let p = ProxyHandle::start(BIN, &control, &format!("default/web-{i}"), cluster, &[], free_addr()).await;
            loads.push(Load::start(p.outbound, "orders", headers, *every));
            proxies.push(p);
        }
        let f = Self {
            control,
            _apps: apps,
            _servers: servers,
            callers: proxies,
            loads,
        };
        eventually(Duration::from_secs(20), "orders traffic reported to the control plane", || async {
            let s = f.control.get("/api/v1/status").await;
            let orders = s["services"].as_array()?.iter().find(|v| v["name"] == "orders")?.clone();
            (orders["rps"].as_f64()? > 0.0).then_some(())
        })
        .await;
        f
    }

    async fn submit(&self, yaml: &str) -> String {
        let (status, body) = self.control.post("/api/v1/intents", yaml).await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    async fn intent(&self, id: &str) -> Value {
        self.control.get(&format!("/api/v1/intents/{id}")).await
    }

    async fn wait_phase(&self, id: &str, phase: &str, within: Duration) -> Value {
        eventually(within, &format!("{id} reaches {phase}"), || async {
            let i = self.intent(id).await;
            (i["phase"] == phase).then_some(i)
        })
        .await
    }

    /// Waits for the intent to end or be held for a person; returns it.
    async fn finished(&self, id: &str, within: Duration) -> Value {
        eventually(within, &format!("{id} finished"), || async {
            let i = self.intent(id).await;
            ["promoted", "rolled-back", "failed", "awaiting-approval"]
                .contains(&i["phase"].as_str()?)
                .then_some(i)
        })
        .await
    }

    fn stats(&self) -> Vec<LoadStats> {
        self.loads.iter().map(Load::stats).collect()
    }

    async fn stop(self) -> (Vec<LoadStats>, Vec<ProxyHandle>, Control) {
        let mut out = Vec::new();
        for l in self.loads {
            out.push(l.stop().await);
        }
        (out, self.callers, self.control)
    }
}

fn intent_yaml(id: &str, routes: &str, stages: &str, bake: &str, mode: &str, slo: &str) -> String {
    format!(
        "apiVersion: weft/v1\nkind: Intent\nmetadata: {{name: {id}}}\nspec:\n  title: test {id}\n  target: orders\n  change:\n    apply:\n      - apiVersion: weft/v1\n        kind: TrafficPolicy\n        metadata: {{name: orders}}\n        spec:\n          service: orders\n          routes:\n{routes}  rollout: {{stages: {stages}, bake: {bake}, mode: {mode}}}\n  slo: {slo}\n"
    )
}

/// The workloads a stage was distributed to, from the intent's ledger.
fn treated_at(intent: &Value, stage: usize) -> Vec<String> {
    intent["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "distribution")
        .filter_map(|e| e["detail"].as_str())
        .find(|d| d.starts_with(&format!("stage {stage} ")))
        .map(|d| d.rsplit(": ").next().unwrap().split(", ").map(str::to_string).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_canary_promotes_through_every_stage_in_auto_mode() {
    let f = Fixture::start(4, true, &[], Duration::from_millis(40)).await;
    let yaml = intent_yaml(
        "CANARY-1",
        "            - backends: [{subset: v2, weight: 10}, {subset: v1, weight: 90}]\n",
        "[25, 50, 100]",
        "2s",
        "auto",
        "{minRequests: 20, maxP99Increase: 500}",
    );
    let id = f.submit(&yaml).await;
    let done = f.wait_phase(&id, "promoted", Duration::from_secs(45)).await;
    let decisions: Vec<(&str, u64)> = done["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["outcome"].as_str().unwrap(), d["stage"].as_u64().unwrap()))
        .collect();
    assert_eq!(decisions, [("promoted", 1), ("promoted", 2), ("promoted", 3)], "{done}");
    assert_eq!(
        (treated_at(&done, 1).len(), treated_at(&done, 2).len(), treated_at(&done, 3).len()),
        (1, 2, 4),
        "{done}"
    );
    let stage1 = treated_at(&done, 1);
    assert!(
        treated_at(&done, 2).contains(&stage1[0]),
        "a later stage keeps the earlier stage's proxies"
    );
    let revision = done["revision"].as_u64().unwrap();
    eventually(
        Duration::from_secs(3),
        "every caller on the promoted revision with the split",
        || async {
            for c in &f.callers {
                let d = c.config_dump().await;
                if d["config"]["revision"] != revision
                    || d["config"]["services"]["default/orders"]["policy"]["routes"][0]["backends"][0]["weight"] != 10
                {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    assert_eq!(f.control.get("/api/v1/status").await["revision"], revision);
    let (stats, _, _) = f.stop().await;
    let failed: u64 = stats.iter().map(|s| s.failed).sum();
    assert_eq!(failed, 0, "a good change fails nothing: {stats:?}");
}

/// The traffic share a stage's ledger line states: `(90.1% of the requests to orders ...)`.
fn traffic_share_at(intent: &Value, stage: usize) -> f64 {
    let ledger = intent["ledger"].as_array().unwrap();
    let detail = ledger
        .iter()
        .filter(|e| e["event"] == "distribution")
        .filter_map(|e| e["detail"].as_str())
        .find(|d| d.starts_with(&format!("stage {stage} ")))
        .unwrap();
    let share = detail.split(" proxies (").nth(1).and_then(|d| d.split('%').next()).unwrap();
    share.parse().unwrap_or_else(|_| panic!("no traffic share in {detail}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_treats_its_share_of_the_traffic_not_of_the_proxies() {
    // web-0 (first in rollout order) sends one request in ten, web-1 nine: a 50% stage by count
    // would treat web-0 and judge a tenth of the traffic.
    let f = Fixture::start_paced(&[Duration::from_millis(180), Duration::from_millis(20)], false, &[]).await;
    eventually(Duration::from_secs(20), "both callers sent requests", || async {
        f.stats().iter().all(|s| s.total() >= 5).then_some(())
    })
    .await;
    // Three rounds of reports from the three proxies (every 2 s each) carry those requests.
    let reports = || async { f.control.get("/api/v1/status").await["telemetrySignals"].as_u64().unwrap() };
    let before = reports().await;
    eventually(Duration::from_secs(20), "both callers' traffic reported", || async {
        (reports().await >= before + 9).then_some(())
    })
    .await;
    let id = f
        .submit(&intent_yaml(
            "SHARE-1",
            "            - timeout: 20s\n",
            "[50, 100]",
            "60s",
            "auto",
            "{minRequests: 20}",
        ))
        .await;
    let running = f.wait_phase(&id, "observation", Duration::from_secs(15)).await;
    assert_eq!(treated_at(&running, 1), ["default/web-1"], "{running}");
    let share = traffic_share_at(&running, 1);
    assert!(!running["ledger"].to_string().contains("no traffic data"), "{running}");
    let sent: Vec<f64> = f.stats().iter().map(|s| s.total() as f64).collect();
    let busy = 100.0 * sent[1] / (sent[0] + sent[1]);
    assert!(share >= 50.0, "stage 1 states {share}% of the traffic: {running}");
    assert!(
        (share - busy).abs() < 10.0,
        "stage 1 states {share}%, the callers sent {busy:.1}% through web-1"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_timeout_is_rolled_back_at_stage_one_and_only_treated_callers_fail() {
    // Every request takes 15 ms at orders; the change cuts the timeout to 5 ms.
    let f = Fixture::start(10, false, &[("x-echo-delay-ms", "15")], Duration::from_millis(50)).await;
    let before = f.stats();
    // The default bake (30s): the loop rolls back as soon as the evidence is bad, not at its end.
    let yaml = intent_yaml(
        "BAD-1",
        "            - timeout: 5ms\n",
        "[10, 50, 100]",
        "30s",
        "auto",
        "{minRequests: 20}",
    );
    let submitted = Instant::now();
    let id = f.submit(&yaml).await;
    let done = f.wait_phase(&id, "rolled-back", Duration::from_secs(30)).await;
    let detection = submitted.elapsed();
    let reason = done["decisions"][0]["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("rolled back at stage 1 (10%)") && reason.contains("error rate"),
        "{reason}"
    );
    let treated = treated_at(&done, 1);
    assert_eq!(treated.len(), 1, "stage 1 is 10% of 10 callers: {done}");
    // The treated caller returns to last-known-good: no policy for orders.
    let treated_proxy = f.callers.iter().find(|c| c.workload == treated[0]).unwrap();
    eventually(Duration::from_secs(15), "the treated caller back on stable", || async {
        let d = treated_proxy.config_dump().await;
        (d["config"]["revision"] == 0 && d["config"]["services"]["default/orders"]["policy"].is_null()).then_some(())
    })
    .await;
    // A request that started under the bad config may still finish (and fail) on it; the
    // window "after the rollback" opens once the treated caller has sent two more requests.
    let treated_index = f.callers.iter().position(|c| c.workload == treated[0]).unwrap();
    let at_swap = f.stats()[treated_index].total();
    eventually(
        Duration::from_secs(3),
        "the treated caller sent requests on the stable config",
        || {
            let now = f.stats()[treated_index].total();
            async move { (now >= at_swap + 2).then_some(()) }
        },
    )
    .await;
    let after_rollback = f.stats();
    // "Nothing fails once rolled back" is judged over the treated caller's next 10 requests.
    let from = after_rollback[treated_index].total();
    eventually(Duration::from_secs(15), "10 requests after the rollback", || {
        let now = f.stats()[treated_index].total();
        async move { (now >= from + 10).then_some(()) }
    })
    .await;
    let (stats, callers, _control) = f.stop().await;
    let mut failed_elsewhere = Vec::new();
    let (mut total, mut failed) = (0, 0);
    for ((caller, s), b) in callers.iter().zip(&stats).zip(&before) {
        let window = s.since(b);
        total += window.total();
        failed += window.failed;
        if caller.workload == treated[0] {
            assert!(window.failed > 0, "the treated caller saw the bad change: {window:?}");
            assert!(window.reasons.keys().all(|r| r.starts_with("504 request-timeout")), "{window:?}");
        } else if window.failed > 0 {
            failed_elsewhere.push((caller.workload.clone(), window));
        }
    }
    assert!(
        failed_elsewhere.is_empty(),
        "only the treated caller may fail: {failed_elsewhere:?}"
    );
    let after: u64 = stats.iter().zip(&after_rollback).map(|(s, a)| s.since(a).failed).sum();
    assert_eq!(after, 0, "nothing fails once rolled back");
    eprintln!(
        "bad change: rolled back {:.1} s after submission; {failed} of {total} requests failed ({:.2}%) -- {reason}",
        detection.as_secs_f64(),
        100.0 * failed as f64 / total as f64
    );
}

/// A caller that speaks the control stream itself and refuses every config carrying a
/// TrafficPolicy (as a proxy of an older version might).
async fn refusing_caller(control: &Control) -> tokio::task::JoinHandle<()> {
    use weft_api::proto::{self, proxy_message};
    let token = control.token("default/legacy", "legacy").await;
    let register = proto::Register {
        namespace: "default".into(),
        name: "legacy".into(),
        cluster: "cluster-a".into(),
        inbound_addr: free_addr().to_string(),
        services: vec!["orders".into()],
        token,
        ..Default::default()
    };
    weft_test::scripted::proxy(control.channel().await, register, |cfg| {
        if cfg.services.iter().any(|s| !s.traffic_policy_json.is_empty()) {
            proxy_message::Msg::Nack(proto::Nack {
                version: cfg.version,
                revision: cfg.revision,
                reason: "unsupported policy field: routes".into(),
            })
        } else {
            weft_test::scripted::ack(cfg)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_change_never_leaves_last_known_good() {
    let f = Fixture::start(1, false, &[], Duration::from_millis(50)).await;
    let _legacy = refusing_caller(&f.control).await;
    eventually(Duration::from_secs(15), "the refusing caller registered", || async {
        (f.control.get("/api/v1/proxies").await.as_array()?.len() == 3).then_some(())
    })
    .await;
    let id = f
        .submit(&intent_yaml(
            "NACKED-1",
            "            - timeout: 2s\n",
            "[100]",
            "1s",
            "auto",
            "{minRequests: 1}",
        ))
        .await;
    let done = f.wait_phase(&id, "failed", Duration::from_secs(20)).await;
    let reason = done["decisions"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("default/legacy") && reason.contains("unsupported policy field"),
        "{reason}"
    );
    assert!(
        done["ledger"].as_array().unwrap().iter().any(|e| e["event"] == "nacked"),
        "the NACK is in the ledger: {done}"
    );
    eventually(
        Duration::from_secs(3),
        "every proxy back on revision 0 without the policy",
        || async {
            let proxies = f.control.get("/api/v1/proxies").await;
            let all_stable = proxies.as_array()?.iter().all(|p| p["appliedRevision"] == 0);
            let d = f.callers[0].config_dump().await;
            (all_stable && d["config"]["services"]["default/orders"]["policy"].is_null()).then_some(())
        },
    )
    .await;
    assert_eq!(f.control.get("/api/v1/status").await["revision"], 0, "nothing was promoted");
    assert_eq!(
        f.control.get("/api/v1/revisions").await,
        serde_json::json!([]),
        "no revision was committed"
    );
    let (stats, _, _) = f.stop().await;
    assert_eq!(stats[0].failed, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_mode_waits_for_approval_and_freeze_stops_a_rollout() {
    let f = Fixture::start(2, true, &[], Duration::from_millis(50)).await;
    let id = f
        .submit(&intent_yaml(
            "MANUAL-1",
            "            - backends: [{subset: v1, weight: 100}]\n",
            "[50, 100]",
            "1s",
            "manual",
            "{minRequests: 5, maxP99Increase: 500}",
        ))
        .await;
    // It starts (the loop picks it up within a tick), then nothing moves without approval.
    eventually(Duration::from_secs(15), "MANUAL-1 waits for approval", || async {
        (f.intent(&id).await["phase"] == "awaiting-approval").then_some(())
    })
    .await;
    for _ in 0..5 {
        let i = f.intent(&id).await;
        assert_eq!(
            (i["phase"].as_str(), i["stage"].as_u64()),
            (Some("awaiting-approval"), Some(0)),
            "{i}"
        );
        assert!(i["treated"].as_array().unwrap().is_empty());
        // The subject: time passing (five loop ticks of 300 ms) moves nothing without approval.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (status, _) = f.control.post(&format!("/api/v1/intents/{id}/approve"), "").await;
    assert_eq!(status, 200);
    let paused = eventually(Duration::from_secs(20), "stage 1 judged, waiting for stage 2", || async {
        let i = f.intent(&id).await;
        (i["phase"] == "awaiting-approval" && i["stage"] == 1).then_some(i)
    })
    .await;
    assert_eq!(paused["decisions"][0]["outcome"], "promoted", "{paused}");
    assert_eq!(
        paused["treated"].as_array().unwrap().len(),
        1,
        "stage 1's proxy keeps the candidate while waiting"
    );
    f.control.post(&format!("/api/v1/intents/{id}/approve"), "").await;
    f.wait_phase(&id, "promoted", Duration::from_secs(20)).await;

    // Freeze rolls back a rollout in progress and holds every new change.
    let long = f
        .submit(&intent_yaml(
            "LONG-1",
            "            - timeout: 3s\n",
            "[50, 100]",
            "60s",
            "auto",
            "{minRequests: 5}",
        ))
        .await;
    f.wait_phase(&long, "observation", Duration::from_secs(10)).await;
    let (status, _) = f.control.post("/api/v1/freeze", r#"{"enabled": true}"#).await;
    assert_eq!(status, 200);
    let frozen = f.wait_phase(&long, "rolled-back", Duration::from_secs(3)).await;
    assert!(
        frozen["decisions"][0]["reason"].as_str().unwrap().contains("mesh frozen"),
        "{frozen}"
    );
    let stable = f.control.get("/api/v1/status").await["revision"].clone();
    let held = f
        .submit(&intent_yaml(
            "HELD-1",
            "            - timeout: 4s\n",
            "[100]",
            "0s",
            "auto",
            "{minRequests: 1}",
        ))
        .await;
    // The subject: several loop ticks pass (800 ms) and nothing starts while frozen.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(f.intent(&held).await["phase"], "queued", "nothing starts while frozen");
    eventually(Duration::from_secs(15), "every proxy pinned to the stable revision", || async {
        let proxies = f.control.get("/api/v1/proxies").await;
        proxies.as_array()?.iter().all(|p| p["appliedRevision"] == stable).then_some(())
    })
    .await;
    f.control.post("/api/v1/freeze", r#"{"enabled": false}"#).await;
    f.wait_phase(&held, "promoted", Duration::from_secs(10)).await;
    let (stats, _, _) = f.stop().await;
    assert!(stats.iter().all(|s| s.failed == 0), "{stats:?}");
}

/// Reads server-sent events from `/api/v1/events` into a channel, one `data:` payload each.
async fn events(control: &Control) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    use http_body_util::BodyExt;
    let req = hyper::Request::get(control.url("/api/v1/events"))
        .header("authorization", format!("Bearer {}", control.admin_token))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let mut body = control.client().open(req).await.unwrap().into_body();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = String::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else { continue };
            buf.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                for line in event.lines().filter_map(|l| l.strip_prefix("data:")) {
                    if let Ok(v) = serde_json::from_str(line.trim()) {
                        let _ = tx.send(v);
                    }
                }
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intents_are_validated_at_submit_and_disjoint_ones_run_together() {
    let f = Fixture::start(1, true, &[], Duration::from_millis(50)).await;
    let bad = intent_yaml(
        "BAD-SUBSET",
        "            - backends: [{subset: v9, weight: 100}]\n",
        "[50, 100]",
        "1s",
        "auto",
        "{minRequests: 1}",
    );
    let (status, err) = f.control.post("/api/v1/intents", &bad).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["field"], "spec.change.apply[0].spec.routes[0].backends[0].subset");
    let (status, err) = f
        .control
        .post("/api/v1/intents", &bad.replace("stages: [50, 100]", "stages: [50, 10]"))
        .await;
    assert_eq!(status, 400);
    assert!(
        err["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["field"] == "spec.rollout.stages"),
        "{err}"
    );
    assert!(
        f.control.get("/api/v1/intents").await.as_array().unwrap().is_empty(),
        "nothing was queued"
    );

    // Two intents on different services run at the same time; a third on the same service waits.
    let mut events = events(&f.control).await;
    let a = f
        .submit(&intent_yaml(
            "ORDERS-1",
            "            - timeout: 3s\n",
            "[100]",
            "30s",
            "auto",
            "{minRequests: 5}",
        ))
        .await;
    let other = "apiVersion: weft/v1\nkind: Intent\nmetadata: {name: OTHER-1}\nspec:\n  title: other service\n  target: billing\n  change:\n    apply:\n      - apiVersion: weft/v1\n        kind: TrafficPolicy\n        metadata: {name: billing}\n        spec: {service: billing, routes: [{timeout: 1s}]}\n  rollout: {stages: [100], bake: 30s}\n";
    let b = f.submit(other).await;
    let c = f
        .submit(&intent_yaml(
            "ORDERS-2",
            "            - timeout: 4s\n",
            "[100]",
            "1s",
            "auto",
            "{minRequests: 5}",
        ))
        .await;
    f.wait_phase(&a, "observation", Duration::from_secs(10)).await;
    f.wait_phase(&b, "promoted", Duration::from_secs(10)).await;
    assert_eq!(
        f.intent(&c).await["phase"],
        "queued",
        "the second orders intent waits for the first"
    );
    let mut seen: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        while let Ok(e) = events.try_recv() {
            seen.push(e);
        }
        let ids: std::collections::BTreeSet<&str> = seen.iter().filter_map(|e| e["id"].as_str()).collect();
        if ids.contains(a.as_str()) && ids.contains(b.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "events for both intents; got {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen.iter().any(|e| e["type"] == "intent" && e["phase"] == "observation"),
        "{seen:?}"
    );
    f.control.post(&format!("/api/v1/intents/{a}/abort"), "").await;
    f.wait_phase(&c, "promoted", Duration::from_secs(15)).await;
    let (stats, _, _) = f.stop().await;
    assert_eq!(stats[0].failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypass_on_and_off_under_steady_load_fails_nothing() {
    let f = Fixture::start(2, false, &[], Duration::from_millis(20)).await;
    let (status, applied) = f
        .control
        .post(
            "/api/v1/resources",
            "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: orders}\nspec: {service: orders, routes: [{timeout: 2s}]}\n",
        )
        .await;
    assert_eq!(status, 200, "{applied}");
    let policy_of = |d: &Value| d["config"]["services"]["default/orders"]["policy"].clone();
    for c in &f.callers {
        eventually(Duration::from_secs(15), "policy applied", || async {
            (!policy_of(&c.config_dump().await).is_null()).then_some(())
        })
        .await;
    }
    for on in [true, false] {
        let start = Instant::now();
        let (status, _) = f.control.post("/api/v1/bypass/orders", &format!(r#"{{"enabled": {on}}}"#)).await;
        assert_eq!(status, 200);
        for c in &f.callers {
            eventually(Duration::from_secs(5), "bypass reached the caller", || async {
                (policy_of(&c.config_dump().await).is_null() == on).then_some(())
            })
            .await;
        }
        let svc = f.control.get("/api/v1/status").await["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "orders")
            .unwrap()
            .clone();
        assert_eq!(svc["bypass"], on);
        eprintln!(
            "bypass {} took effect on every caller in {:.0} ms",
            if on { "on" } else { "off" },
            start.elapsed().as_secs_f64() * 1000.0
        );
        // Steady load runs across each state: every caller sends 10 more requests.
        let marks = f.stats();
        eventually(Duration::from_secs(15), "10 more requests from every caller", || {
            let done = f.stats().iter().zip(&marks).all(|(n, m)| n.total() >= m.total() + 10);
            async move { done.then_some(()) }
        })
        .await;
    }
    let ledger = f.control.get("/api/v1/ledger").await;
    // Operator actions; each proxy's join-token redemption is in the ledger too.
    let actions: Vec<&str> = ledger
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .filter(|a| *a != "token redeemed")
        .collect();
    assert_eq!(actions, ["bypass on", "bypass off"]);
    let (stats, _, _) = f.stop().await;
    assert!(stats.iter().all(|s| s.failed == 0 && s.ok > 50), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restarted_mid_rollout_rolls_back_to_one_revision() {
    let f = Fixture::start(2, true, &[], Duration::from_millis(40)).await;
    let id = f
        .submit(&intent_yaml(
            "RESTART-1",
            "            - backends: [{subset: v2, weight: 100}]\n",
            "[50, 100]",
            "60s",
            "auto",
            "{minRequests: 5}",
        ))
        .await;
    let running = f.wait_phase(&id, "observation", Duration::from_secs(10)).await;
    let candidate = running["candidate"].as_u64().unwrap();
    let treated = treated_at(&running, 1);
    assert_eq!(treated.len(), 1);
    let treated_proxy = f.callers.iter().find(|c| c.workload == treated[0]).unwrap();
    assert_eq!(treated_proxy.config_dump().await["config"]["revision"], candidate);
    let Fixture {
        mut control,
        _apps,
        _servers,
        callers,
        loads,
    } = f;
    control.restart().await;
    let after = control.get(&format!("/api/v1/intents/{id}")).await;
    assert_eq!(after["phase"], "rolled-back");
    assert!(
        after["decisions"][0]["reason"].as_str().unwrap().contains("restarted mid-rollout"),
        "{after}"
    );
    eventually(
        Duration::from_secs(12),
        "every proxy reconnected on the stable revision",
        || async {
            let proxies = control.get("/api/v1/proxies").await;
            let all = proxies.as_array()?;
            (all.len() == 4 && all.iter().all(|p| p["appliedRevision"] == 0)).then_some(())
        },
    )
    .await;
    for c in &callers {
        let d = c.config_dump().await;
        assert_eq!(d["config"]["revision"], 0, "no proxy keeps the candidate");
        assert!(d["config"]["services"]["default/orders"]["policy"].is_null());
    }
    let mut failed = 0;
    for l in loads {
        failed += l.stop().await.failed;
    }
    assert_eq!(failed, 0, "the restart and the rollback failed no request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_change_is_judged_on_the_requests_in_its_scope() {
    // 50 rps without a tenant and 5 rps for tenant acme, every request taking 15 ms at orders.
    let f = Fixture::start(1, false, &[("x-echo-delay-ms", "15")], Duration::from_millis(20)).await;
    let acme = Load::start(
        f.callers[0].outbound,
        "orders",
        &[("x-echo-delay-ms", "15"), ("x-tenant", "acme")],
        Duration::from_millis(200),
    );
    // Bad for acme only. Over all of the caller's traffic that is ~9% errors, under the 30 pp
    // allowed here; over the scoped route alone it is 100%.
    let yaml = intent_yaml(
        "SCOPED-1",
        "            - timeout: 5ms\n",
        "[100]",
        "30s",
        "auto",
        "{minRequests: 5, maxErrorRateIncrease: 30, maxErrorRate: 50}",
    )
    .replace("  target: orders\n", "  target: orders\n  scope: tenant:acme\n");
    let id = f.submit(&yaml).await;
    let done = f.wait_phase(&id, "rolled-back", Duration::from_secs(20)).await;
    assert_eq!(done["routes"], serde_json::json!(["scoped-1-1"]), "{done}");
    let reason = done["decisions"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("error rate 100.0%"), "judged on the scoped route alone: {reason}");
    let acme_stats = acme.stop().await;
    let (stats, _, _) = f.stop().await;
    assert_eq!(stats[0].failed, 0, "requests outside the scope never saw the change: {stats:?}");
    assert!(acme_stats.failed > 0, "{acme_stats:?}");
}

/// A quiet service (one request every 400 ms against `minRequests: 1000`) cannot gather the
/// evidence in three bakes: the intent is held in awaiting-approval with an inconclusive
/// verdict and its numbers (`onInconclusive` defaults to hold), not rolled back; an approval
/// then promotes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_service_is_held_inconclusive_not_rolled_back() {
    let f = Fixture::start(2, false, &[], Duration::from_millis(400)).await;
    let id = f
        .submit(&intent_yaml(
            "QUIET-1",
            "            - timeout: 20s\n",
            "[50, 100]",
            "1s",
            "auto",
            "{minRequests: 1000}",
        ))
        .await;
    let held = f.wait_phase(&id, "awaiting-approval", Duration::from_secs(20)).await;
    let decision = &held["decisions"][0];
    assert_eq!(decision["outcome"], "inconclusive", "{held}");
    assert_eq!(decision["stage"], 1, "{held}");
    let reason = decision["reason"].as_str().unwrap();
    assert!(reason.starts_with("inconclusive after 12s: "), "{reason}");
    assert!(reason.contains(" of 1,000 requests observed (error rate 0.0%"), "{reason}");
    assert!(
        reason.ends_with("held at stage 1 (50%) for an operator to approve or abort"),
        "{reason}"
    );
    assert_eq!(held["held"], true, "{held}");
    let (status, body) = f.control.post(&format!("/api/v1/intents/{id}/approve"), "").await;
    assert_eq!(status, 200, "{body}");
    // Stage 1 is promoted by the approval; stage 2 is quiet too and is held again.
    let again = eventually(Duration::from_secs(20), "stage 2 held", || async {
        let i = f.intent(&id).await;
        (i["decisions"].as_array()?.len() == 3).then_some(i)
    })
    .await;
    let outcomes: Vec<(&str, u64)> = again["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["outcome"].as_str().unwrap(), d["stage"].as_u64().unwrap()))
        .collect();
    assert_eq!(outcomes, [("inconclusive", 1), ("promoted", 1), ("inconclusive", 2)], "{again}");
    assert_eq!(again["phase"], "awaiting-approval");
    f.control.post(&format!("/api/v1/intents/{id}/approve"), "").await;
    let done = f.wait_phase(&id, "promoted", Duration::from_secs(10)).await;
    assert!(done["revision"].as_u64().is_some(), "{done}");
}

/// The other two answers to a quiet stage: `onInconclusive: rollback` rolls the intent back
/// and says why, `promote` promotes every stage on no evidence, as asked (the last stage's
/// reason then adds the revision it became).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_service_follows_on_inconclusive_rollback_and_promote() {
    let f = Fixture::start(2, false, &[], Duration::from_millis(400)).await;
    let quiet = |id: &str, then: &str| {
        intent_yaml(
            id,
            "            - timeout: 20s\n",
            "[50, 100]",
            "1s",
            "auto",
            &format!("{{minRequests: 1000, onInconclusive: {then}}}"),
        )
    };
    let id = f.submit(&quiet("QUIET-ROLLBACK", "rollback")).await;
    let done = f.wait_phase(&id, "rolled-back", Duration::from_secs(20)).await;
    let reason = done["decisions"][0]["reason"].as_str().unwrap();
    assert!(reason.starts_with("inconclusive after 12s: "), "{reason}");
    assert!(reason.ends_with("rolled back at stage 1 (50%) as onInconclusive says"), "{reason}");
    let id = f.submit(&quiet("QUIET-PROMOTE", "promote")).await;
    let done = f.wait_phase(&id, "promoted", Duration::from_secs(45)).await;
    let decisions = done["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 2, "{done}");
    for d in decisions {
        let reason = d["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("inconclusive after ") && reason.contains(": promoted as onInconclusive says"),
            "{reason}"
        );
    }
}

/// Inbound connections the server sidecar has accepted (any transport).
async fn accepted_connections(server: &ProxyHandle) -> u64 {
    server
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("weft_proxy_inbound_connections_total{") && l.contains("outcome=\"accepted\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// No bias from the swap itself (#13 part 3): a change that leaves a destination's endpoints
/// alone reuses the caller's open connections, so treated requests pay no new handshakes. The
/// caller's pool lives beside the config, keyed by endpoint and identity, not inside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_swap_keeps_connections_to_unchanged_endpoints() {
    let f = Fixture::start(1, false, &[], Duration::from_millis(40)).await;
    let server = &f._servers[0];
    let before = eventually(Duration::from_secs(10), "the caller connected", || async {
        let n = accepted_connections(server).await;
        (n > 0).then_some(n)
    })
    .await;
    let id = f
        .submit(&intent_yaml(
            "SWAP-1",
            "            - timeout: 20s\n",
            "[100]",
            "1s",
            "auto",
            "{minRequests: 5}",
        ))
        .await;
    let done = f.wait_phase(&id, "promoted", Duration::from_secs(20)).await;
    let revision = done["revision"].as_u64().unwrap();
    eventually(Duration::from_secs(5), "the caller on the promoted revision", || async {
        (f.callers[0].config_dump().await["config"]["revision"] == revision).then_some(())
    })
    .await;
    let sent = f.stats()[0].total();
    eventually(Duration::from_secs(5), "20 requests on the new config", || {
        let now = f.stats()[0].total();
        async move { (now >= sent + 20).then_some(()) }
    })
    .await;
    assert_eq!(
        accepted_connections(server).await,
        before,
        "two config swaps (candidate, promoted) opened no new connection"
    );
    let (stats, _, _) = f.stop().await;
    assert_eq!(stats[0].failed, 0, "{stats:?}");
}

/// The decisions of an intent as (outcome, stage).
fn outcomes(intent: &Value) -> Vec<(String, u64)> {
    intent["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["outcome"].as_str().unwrap().to_string(), d["stage"].as_u64().unwrap()))
        .collect()
}

/// The issue's first test: harmless changes (timeouts raised) in a row are all promoted, with
/// no manual step, under the issue's SLO; the old thresholds rolled back two of three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_harmless_intents_in_a_row_are_all_promoted() {
    let f = Fixture::start(4, false, &[], Duration::from_millis(10)).await;
    for i in 0..10 {
        let id = f
            .submit(&intent_yaml(
                &format!("HARMLESS-{i}"),
                &format!("            - timeout: {}s\n", 10 + i),
                "[50, 100]",
                "1s",
                "auto",
                "{maxErrorRate: 5, maxErrorRateIncrease: 1, maxP99Increase: 20, minRequests: 20}",
            ))
            .await;
        let done = f.finished(&id, Duration::from_secs(30)).await;
        assert_eq!(done["phase"], "promoted", "harmless change {i}: {done}");
        assert_eq!(
            outcomes(&done),
            [("promoted".to_string(), 1), ("promoted".to_string(), 2)],
            "{done}"
        );
        let reason = done["decisions"][0]["reason"].as_str().unwrap();
        assert!(reason.starts_with("no harm shown at 99% confidence: error rate 0.0%"), "{reason}");
    }
    let (stats, _, _) = f.stop().await;
    assert_eq!(stats.iter().map(|s| s.failed).sum::<u64>(), 0, "{stats:?}");
}

/// At 100% no untreated caller runs beside the treated ones: the untreated callers of the
/// stage before, over its evidence window, are the latest traffic without the change, and the
/// last stage is judged against them too (a stage long enough for four of their reports after
/// its warm-up: 8 s, two callers reporting every 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_100_percent_the_stage_before_s_untreated_callers_are_a_reference() {
    let f = Fixture::start(4, false, &[], Duration::from_millis(10)).await;
    let id = f
        .submit(&intent_yaml(
            "RECENT-1",
            "            - timeout: 11s\n",
            "[50, 100]",
            "8s",
            "auto",
            "{maxErrorRate: 5, maxErrorRateIncrease: 1, maxP99Increase: 20, minRequests: 20}",
        ))
        .await;
    let done = f.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(done["phase"], "promoted", "{done}");
    let first = done["decisions"][0]["reason"].as_str().unwrap();
    assert!(!first.contains("stage before"), "{first}");
    let last = done["decisions"][1]["reason"].as_str().unwrap();
    assert!(last.contains("errors vs untreated in the stage before at most"), "{last}");
    let (stats, _, _) = f.stop().await;
    assert_eq!(stats.iter().map(|s| s.failed).sum::<u64>(), 0, "{stats:?}");
}

/// Submits `fault` on orders' callers (stages 50/100%, `slo`) and waits for it to be rolled
/// back at stage 1; returns the decision's reason.
async fn rolled_back_at_stage_one(f: &Fixture, id: &str, fault: &str, slo: &str, what: &str) -> String {
    let id = f
        .submit(&intent_yaml(
            id,
            &format!("            - fault: {fault}\n"),
            "[50, 100]",
            "30s",
            "auto",
            slo,
        ))
        .await;
    let submitted = Instant::now();
    let done = f.wait_phase(&id, "rolled-back", Duration::from_secs(50)).await;
    eprintln!(
        "{what}: rolled back {:.1} s after submission -- {}",
        submitted.elapsed().as_secs_f64(),
        done["decisions"][0]["reason"]
    );
    assert_eq!(outcomes(&done), [("rolled-back".to_string(), 1)], "{done}");
    let reason = done["decisions"][0]["reason"].as_str().unwrap().to_string();
    assert!(reason.ends_with("rolled back at stage 1 (50%)"), "{reason}");
    reason
}

/// A change that makes 3% of requests fail (a fault it injects) is rolled back at stage 1,
/// the decision stating the effect, both sides and the confidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_percent_more_errors_are_rolled_back_at_stage_one_with_the_confidence() {
    let f = Fixture::start(4, false, &[], Duration::from_millis(10)).await;
    // A ceiling above the fault's 3%, so that the comparison decides, not `maxErrorRate`
    // (whose test may fire before any untreated report is past the warm-up).
    let (fault, slo) = ("{abort: {percent: 3, status: 503}}", "{maxErrorRate: 20}");
    let reason = rolled_back_at_stage_one(&f, "ERRORS-3", fault, slo, "+3% errors").await;
    assert!(reason.starts_with("error rate "), "{reason}");
    // The untreated proxies first; the baseline after them when it had traffic.
    assert!(reason.contains("% untreated (+") || reason.contains("% untreated and "), "{reason}");
    assert!(reason.contains(" confident it is higher"), "{reason}");
    // The stated effect is near the injected 3 pp.
    let pp: f64 = reason.split("(+").nth(1).unwrap().split(" pp").next().unwrap().parse().unwrap();
    assert!((1.0..=6.0).contains(&pp), "{reason}");
    // The same change again at once: the first one's stage falls in the second one's minute
    // before, and its failed requests are not the service's baseline (the demo promoted a
    // second +3% change against a 1.3% baseline that was the first one's 100% stage).
    let again = rolled_back_at_stage_one(&f, "ERRORS-3-AGAIN", fault, slo, "+3% errors again").await;
    assert!(again.starts_with("error rate "), "{again}");
    assert!(
        again.contains(" 0.0% baseline"),
        "the first change's errors counted as baseline: {again}"
    );
}

/// A change that delays half of the requests by 40 ms is rolled back at stage 1 for its
/// latency (the old judge only rolled it back for "insufficient evidence").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_ms_on_half_the_requests_is_rolled_back_at_stage_one_with_the_confidence() {
    let f = Fixture::start(4, false, &[], Duration::from_millis(20)).await;
    let fault = "{delay: {percent: 50, duration: 40ms}}";
    let reason = rolled_back_at_stage_one(&f, "SLOW-40", fault, "{}", "half the requests +40 ms").await;
    assert!(reason.starts_with("latency p50 "), "{reason}");
    // The untreated proxies first; the baseline after them when it had traffic.
    assert!(
        reason.contains(" untreated (typically +") || (reason.contains(" untreated and ") && reason.contains(" baseline (typically +")),
        "{reason}"
    );
    assert!(reason.contains(" confident it is slower"), "{reason}");
}

/// A change that slows orders' callers starves its own stage 1 in the demo: checkout's caller
/// balances over checkout's two instances by latency (P2C over peak-EWMA) and routes around the
/// treated one, whose requests to orders then fall far short of what the judge needs. Here:
/// web -> checkout (v1 and v2, demo apps calling orders through their sidecars) -> orders; the
/// change delays every orders call by 50 ms. It is rolled back at stage 1 for the traffic that
/// moved away from the treated instance, with the shares before and since and the confidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_callers_balance_away_from_is_rolled_back_for_the_traffic_shift() {
    let control = Control::start(BIN).await;
    let orders_app = EchoServer::start("orders-v1").await;
    let _orders = ProxyHandle::start(
        BIN,
        &control,
        "default/orders-v1",
        "cluster-a",
        &[("service", "orders"), ("version", "v1")],
        orders_app.addr,
    )
    .await;
    let mut checkouts = Vec::new();
    for version in ["v1", "v2"] {
        let app = free_addr();
        let proxy = ProxyHandle::start(
            BIN,
            &control,
            &format!("default/checkout-{version}"),
            "cluster-a",
            &[("service", "checkout"), ("version", version)],
            app,
        )
        .await;
        let args = ["demo-app", "--name", "checkout", "--version", version, "--listen", &app.to_string()];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.extend(["--call".into(), "orders".into(), "--proxy".into(), proxy.outbound.to_string()]);
        let app = weft_test::process::Process::spawn(BIN, &format!("checkout-{version}-app"), &args);
        checkouts.push((proxy, app));
    }
    let web = ProxyHandle::start(BIN, &control, "default/web-0", "cluster-b", &[], free_addr()).await;
    let load = Load::start(web.outbound, "checkout", &[], Duration::from_millis(10));
    // Both instances' calls to orders reported, for a while: the share the stage is chosen by.
    let orders_callers = || async {
        let routes = control.get("/api/v1/status").await;
        let orders = routes["services"].as_array()?.iter().find(|v| v["name"] == "orders")?.clone();
        (orders["rps"].as_f64()? > 20.0).then_some(())
    };
    eventually(Duration::from_secs(30), "orders called through checkout", orders_callers).await;
    let reports = || async { control.get("/api/v1/status").await["telemetrySignals"].as_u64().unwrap() };
    // The judge takes the split's swings between report intervals from the window before the
    // intent: web's P2C over two checkouts flips nearly all of its traffic from one to the
    // other within seconds (six intervals here went 39%, 13%, 100%, 100%, 99%, 100% treated),
    // and a few intervals of that leave the share before too uncertain to call a fall (the
    // stage was held, 1 of 3,000 treated since). About half a minute of reports, as a mesh
    // that has run for a while has. The bake is 20 s so that the stage may last 62 s: after a
    // minute at 75% swinging whole intervals, none treated decided after 14 s (CI held the
    // 10 s bake's 32 s stage when none treated still counted for less than one).
    let before = reports().await;
    eventually(Duration::from_secs(60), "half a minute of reports", || async {
        (reports().await >= before + 70).then_some(())
    })
    .await;
    let yaml = intent_yaml(
        "SLOW-CALLS",
        "            - fault: {delay: {percent: 100, duration: 50ms}}\n",
        "[50, 100]",
        "20s",
        "auto",
        "{maxErrorRate: 5, maxErrorRateIncrease: 1, maxP99Increase: 20, minRequests: 20}",
    );
    let (status, body) = control.post("/api/v1/intents", &yaml).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let submitted = Instant::now();
    let done = eventually(Duration::from_secs(100), &format!("{id} decided"), || async {
        let i = control.get(&format!("/api/v1/intents/{id}")).await;
        ["promoted", "rolled-back", "failed", "awaiting-approval"]
            .contains(&i["phase"].as_str()?)
            .then_some(i)
    })
    .await;
    let reason = done["decisions"][0]["reason"].as_str().unwrap_or_default().to_string();
    eprintln!(
        "rolled back {:.1} s after submission -- {reason}",
        submitted.elapsed().as_secs_f64()
    );
    assert_eq!(done["phase"], "rolled-back", "{done}");
    assert_eq!(outcomes(&done), [("rolled-back".to_string(), 1)], "{done}");
    assert!(reason.ends_with("rolled back at stage 1 (50%)"), "{reason}");
    // When the caller keeps sending the treated instance enough to judge (1 run in 20 here: 20
    // requests in four reports, 18 times slower), its latency decides first; that is the
    // judge working too.
    if reason.starts_with("latency p50 ") {
        assert!(reason.contains(" confident it is slower"), "{reason}");
        let stats = load.stop().await;
        assert_eq!(stats.failed, 0, "{stats:?}");
        return;
    }
    assert!(reason.starts_with("traffic moved away from the treated proxies: "), "{reason}");
    // The shares it states: since the swap under half of before.
    let shares: Vec<f64> = reason
        .split("% ")
        .filter_map(|part| part.rsplit(' ').next()?.parse().ok())
        .take(2)
        .collect();
    assert_eq!(shares.len(), 2, "{reason}");
    let chosen = traffic_share_at(&done, 1);
    assert!(
        shares[1] >= 0.8 * chosen && shares[0] < shares[1] / 2.0,
        "stage chosen at {chosen}%: {reason}"
    );
    assert!(reason.contains(" confident it fell to under a tenth"), "{reason}");
    let stats = load.stop().await;
    assert_eq!(stats.failed, 0, "{stats:?}");
}

/// `weft apply` on a service a manual intent holds says the change is queued, behind which
/// intent, and what to do about it, and returns at once (it blocked 10 s and printed "created"
/// before); `--wait` waits until the change is applied, and gives up with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_behind_a_manual_intent_says_it_is_queued_and_returns_at_once() {
    let control = Control::start(BIN).await;
    let hold = intent_yaml("HOLD-1", "            - timeout: 2s\n", "[100]", "1s", "manual", "{minRequests: 1}");
    let (status, body) = control.post("/api/v1/intents", &hold).await;
    assert_eq!(status, 201, "{body}");
    let file = control.data_dir.join("orders-retries.yaml");
    std::fs::write(
        &file,
        "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: orders-retries}\nspec:\n  service: orders\n  routes:\n    - timeout: 3s\n",
    )
    .unwrap();
    // `weft [GLOBAL..] apply -f FILE [FLAGS..]`
    let apply = |global: &[&str], flags: &[&str]| {
        let mut cmd = control.cli();
        cmd.args(global).args(["apply", "-f", file.to_str().unwrap()]).args(flags);
        cmd
    };

    let started = Instant::now();
    let out = apply(&[], &[]).output().unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(took < Duration::from_secs(3), "returned after {took:?}");
    let queued = stdout
        .split("queued as intent ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("says it is queued:\n{stdout}"))
        .to_string();
    for said in [
        "TrafficPolicy/default/orders-retries: not created yet".to_string(),
        format!("queued as intent {queued} behind intent HOLD-1 (manual mode, awaiting-approval) on orders"),
        "weft intent approve HOLD-1".to_string(),
        "weft intent abort HOLD-1".to_string(),
        format!("weft intent abort {queued}` withdraws this change"),
    ] {
        assert!(stdout.contains(&said), "says {said:?}:\n{stdout}");
    }
    assert!(!stdout.contains("revision"), "claims no revision:\n{stdout}");
    eprintln!(
        "apply behind a manual intent returned in {:.0} ms:\n{stdout}",
        took.as_secs_f64() * 1000.0
    );

    // What the CLI says is what the API answered.
    let out = apply(&["-o", "json"], &[]).output().unwrap();
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&answer["phase"], &answer["revision"], &answer["blockedBy"]),
        (
            &Value::from("queued"),
            &Value::Null,
            &serde_json::json!({"by": "intent", "id": "HOLD-1", "phase": "awaiting-approval", "mode": "manual", "services": ["orders"]})
        ),
        "{answer}"
    );

    // --wait gives up with the reason, leaving the change queued.
    let started = Instant::now();
    let out = apply(&[], &["--wait=1s"]).output().unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("gave up waiting after 1s: intent")
            && stderr.contains("is still queued behind intent HOLD-1 (awaiting-approval); it stays queued"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");

    // --wait returns once the change is applied: here when the operator aborts HOLD-1.
    let before = control.get("/api/v1/intents").await.as_array().unwrap().len();
    let waiting = apply(&[], &["--wait"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    eventually(Duration::from_secs(10), "the waiting apply's intent is queued", || async {
        (control.get("/api/v1/intents").await.as_array()?.len() > before).then_some(())
    })
    .await;
    let (status, body) = control.post("/api/v1/intents/HOLD-1/abort", "").await;
    assert_eq!(status, 200, "{body}");
    let out = waiting.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("waiting up to 5m for it to be applied") && stdout.contains("TrafficPolicy/default/orders-retries created"),
        "{stdout}"
    );
    let revision = control.get("/api/v1/status").await["revision"].clone();
    assert!(stdout.trim_end().ends_with(&format!("revision {revision}")), "{stdout}");
}

//! The dashboard's pages beside the mesh view (#18 part 4), in a real headless Chromium against
//! a real control plane with proxies and load: the intent page, the service graph and the
//! revision diff render real data, the service cards show the sidecars' cost, and the links
//! between them work.

use serde_json::json;
use std::time::Duration;
use weft_test::apps::EchoServer;
use weft_test::browser::Browser;
use weft_test::load::Load;
use weft_test::{Control, ProxyHandle, eventually, free_addr};

const BIN: &str = env!("CARGO_BIN_EXE_weft");
const WAIT: Duration = Duration::from_secs(20);

const INTENT: &str = r#"apiVersion: weft/v1
kind: Intent
metadata: { name: MESH-801 }
spec:
  title: canary 50%
  target: checkout
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
  rollout: { stages: [{ namespaces: [default] }, 50, 100], bake: 2s, mode: auto }
  slo: { maxErrorRate: 5, maxP99Increase: 1000, minRequests: 5, onInconclusive: promote }
"#;

async fn instance(control: &Control, name: &str, version: &str) -> (EchoServer, ProxyHandle) {
    let app = EchoServer::start(name).await;
    let labels = [("service", "checkout"), ("version", version)];
    let proxy = ProxyHandle::start(BIN, control, &format!("default/{name}"), "cluster-a", &labels, app.addr).await;
    (app, proxy)
}

/// The text of the first element matching `css`, once it satisfies `ok`.
async fn text_when(browser: &Browser, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    browser
        .wait_for(WAIT, what, || async {
            let text = browser.text(css).await?.unwrap_or_default();
            Ok(ok(&text).then_some(text))
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intent_page_service_graph_and_revision_diff_render_live_data_and_link_together() {
    let control = Control::start(BIN).await;
    let (_v1, _p1) = instance(&control, "checkout-v1", "v1").await;
    let (_v2, _p2) = instance(&control, "checkout-v2", "v2").await;
    let web = ProxyHandle::start(BIN, &control, "default/web", "cluster-a", &[("service", "web")], free_addr()).await;
    let mut loads = vec![Load::start(web.outbound, "checkout", &[], Duration::from_millis(20))];
    // A baseline before the intent starts (the caller's cost reports with its requests), then
    // the intent runs to promotion.
    eventually(WAIT, "web's cost reports with outbound requests", || async {
        let proxies = control.get("/api/v1/proxies").await;
        let web = proxies.as_array()?.iter().find(|p| p["workload"] == "default/web")?.clone();
        web["cost"]["cpuUsPerRequest"].as_f64().map(|_| ())
    })
    .await;
    let (code, body) = control.post("/api/v1/intents", INTENT).await;
    assert!([200, 201, 202].contains(&code), "{code} {body}");
    let intent = eventually(Duration::from_secs(60), "MESH-801 promoted", || async {
        let i = control.get("/api/v1/intents/MESH-801").await;
        (i["phase"] == "promoted").then_some(i)
    })
    .await;
    let revision = intent["revision"].as_u64().expect("a promoted intent names its revision");
    // `weft intent show` prints each decision's sidecar-cost line under it.
    let out = control
        .cli()
        .args(["intent", "show", "MESH-801"])
        .output()
        .expect("weft intent show runs");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown
            .lines()
            .any(|l| l.trim_start().starts_with("sidecar cost on 1 treated proxy: CPU")),
        "{shown}"
    );

    let browser = Browser::start(1366, 900, &[control.serving_spki().await])
        .await
        .expect("headless chromium");
    browser.goto(&control.url("/")).await.unwrap();
    browser
        .eval(
            "document.getElementById('token-input').value = arguments[0]; document.getElementById('login-form').requestSubmit(); return true",
            json!([control.admin_token]),
        )
        .await
        .unwrap();

    // The service card shows what checkout's sidecars cost.
    let cpu = text_when(
        &browser,
        ".card[data-service='checkout'] .sidecar-cpu",
        "checkout's sidecar CPU",
        |t| t.contains("% ("),
    )
    .await;
    let mem = browser.text(".card[data-service='checkout'] .sidecar-mem").await.unwrap().unwrap();
    assert!(mem.contains("MiB") && mem.contains("private"), "{mem}");
    let added = browser.text(".card[data-service='checkout'] .sidecar-in").await.unwrap().unwrap();
    assert!(
        added.ends_with(" ms") && !added.starts_with('-'),
        "checkout's inbound self time: {added}"
    );
    eprintln!("checkout card: CPU {cpu}, memory {mem}, added inbound {added}");

    // The queue links to the intent page: stages, treated proxies, charts, decisions.
    browser.click("#queue a[href='#/intents/MESH-801']").await.unwrap();
    text_when(&browser, "#intent-title", "the intent page", |t| {
        t.contains("MESH-801") && t.contains("promoted")
    })
    .await;
    assert_eq!(browser.count("#intent-stages .step").await.unwrap(), 3);
    let stages = browser.text("#intent-stages").await.unwrap().unwrap();
    // The namespace stage names its namespace and how many proxies there the change concerns:
    // of default's three, only web calls checkout (the checkout instances do not enforce a
    // TrafficPolicy on themselves).
    assert!(
        stages.contains("stage 1: namespace default (1 proxy)") && stages.contains("stage 2: 50%") && stages.contains("stage 3: 100%"),
        "{stages}"
    );
    assert!(browser.text("#intent-treated").await.unwrap().is_some());
    let charts = browser.count(".charts[data-service='checkout'] .chart svg path").await.unwrap();
    assert_eq!(charts, 3, "rps, error rate and p99 of checkout, each a drawn series");
    assert!(
        browser.count(".chart line.start").await.unwrap() >= 1,
        "the start of the intent is marked"
    );
    let before_after = browser.text(".chart[data-key='rps'] .before-after").await.unwrap().unwrap();
    assert!(
        before_after.starts_with("before ") && !before_after.contains("before -"),
        "{before_after}"
    );
    let decisions = browser.count("#intent-decisions tr.decision").await.unwrap();
    assert_eq!(decisions, 3, "stages 1 and 2 promoted, then the intent promoted");
    let reasons = browser
        .eval(
            "return [...document.querySelectorAll('#intent-decisions tr.decision')].map((r) => [r.querySelector('.reason').textContent, r.querySelector('.cost').textContent, r.querySelector('.stage').textContent])",
            json!([]),
        )
        .await
        .unwrap();
    assert_eq!(reasons[0][2], "1 (namespace default)", "{reasons}");
    assert_eq!(reasons[1][2], "2 (50%)", "{reasons}");
    let last = &reasons[2];
    assert!(last[0].as_str().unwrap().contains(&format!("revision {revision}")), "{reasons}");
    assert!(
        last[1].as_str().unwrap().starts_with("sidecar cost on"),
        "the decision's cost line: {reasons}"
    );

    // The intent page links to its revision's diff, which shows the policy it added.
    browser.click("#intent-revision").await.unwrap();
    text_when(&browser, "#diff-title", "the revision diff", |t| {
        t.contains(&format!("Revision {revision}"))
    })
    .await;
    let added = browser
        .eval(
            "return [...document.querySelectorAll('.change .diff .add')].map((e) => e.textContent).join('')",
            json!([]),
        )
        .await
        .unwrap();
    assert!(added.as_str().unwrap().contains("checkout-canary"), "added lines: {added}");
    let key = browser.text(".change h3").await.unwrap().unwrap();
    // (headings are set in capitals by the page's style)
    assert!(key.eq_ignore_ascii_case("created TrafficPolicy/default/checkout-canary"), "{key}");

    // The revision list links to each revision's diff.
    browser.click("nav a[data-view='revisions']").await.unwrap();
    let link = format!("#revisions a[href='#/revisions/{revision}']");
    browser
        .wait_for(WAIT, "the revision list", || async {
            Ok((browser.count(&link).await? == 1).then_some(()))
        })
        .await
        .unwrap();
    browser.click(&link).await.unwrap();
    text_when(&browser, "#diff-title", "the diff from the list", |t| {
        t.contains(&format!("Revision {revision}"))
    })
    .await;

    // The service graph: web calls checkout, with its rate and error rate, live.
    browser.click("nav a[data-view='graph']").await.unwrap();
    let edge = "#edges tr.edge[data-from='web'] .rps";
    let rps = |t: &str| t.parse::<f64>().unwrap_or(0.0);
    let first = rps(&text_when(&browser, edge, "web -> checkout in the graph", |t| rps(t) > 10.0).await);
    let errors = browser.text("#edges tr.edge[data-from='web'] .error-rate").await.unwrap().unwrap();
    assert_eq!(errors, "0.0%");
    assert!(browser.count("#graph-svg circle").await.unwrap() >= 2, "checkout and web are drawn");
    loads.push(Load::start(web.outbound, "checkout", &[], Duration::from_millis(20)));
    let second = rps(&text_when(&browser, edge, "the edge's rate rising with the load", |t| rps(t) > first * 1.5).await);
    eprintln!("web -> checkout on the graph: {first} then {second} requests/s");

    // And back to the mesh view.
    browser.click("nav a[data-view='home']").await.unwrap();
    text_when(&browser, ".card[data-service='checkout'] .rps", "the mesh view again", |t| {
        !t.is_empty()
    })
    .await;
    for load in loads {
        assert!(load.stop().await.ok > 0);
    }
}

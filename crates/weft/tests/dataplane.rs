//! End-to-end tests of the data plane's TrafficPolicy: routing, split, timeouts, retries and
//! their budget, outlier ejection, locality failover, rate limits, faults, mirroring, pool
//! limits, framing and drain. Real `weft` processes as control plane and sidecars, test apps
//! whose failures the tests control, and numbers asserted.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_test::apps::{EchoServer, GrpcEcho, Mode, grpc_client};
use weft_test::echo_proto::EchoMsg;
use weft_test::http::{Client, Reply};
use weft_test::{Control, ProxyHandle, eventually, free_addr, metric};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

async fn send(proxy: &ProxyHandle, method: &str, service: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", proxy.outbound))
        .header("host", service);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    Client::new()
        .send(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .expect("outbound answers")
}

async fn get(proxy: &ProxyHandle, service: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(proxy, "GET", service, path, headers).await
}

/// Applies `yaml` and waits until `caller` runs the revision it made.
async fn apply(control: &Control, caller: &ProxyHandle, yaml: &str) -> u64 {
    control.apply_until_run_by(caller, yaml).await
}

/// The most requests a token bucket of `rate`/s and `burst` can admit over `elapsed`, with one
/// more for a refill landing at the edge: the bound follows the time a busy machine took.
fn admitted_at_most(rate: f64, burst: f64, elapsed: Duration) -> usize {
    (burst + rate * elapsed.as_secs_f64()).floor() as usize + 1
}

fn traffic_policy(service: &str, spec: &str) -> String {
    format!("apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {{name: {service}-policy}}\nspec:\n  service: {service}\n{spec}")
}

/// A service instance: an echo app behind its sidecar.
struct Instance {
    app: EchoServer,
    proxy: ProxyHandle,
}

async fn instance(control: &Control, name: &str, service: &str, version: &str, cluster: &str) -> Instance {
    let app = EchoServer::start(name).await;
    let proxy = ProxyHandle::start(
        BIN,
        control,
        &format!("default/{name}"),
        cluster,
        &[("service", service), ("version", version)],
        app.addr,
    )
    .await;
    Instance { app, proxy }
}

async fn caller(control: &Control, name: &str, cluster: &str) -> ProxyHandle {
    ProxyHandle::start(BIN, control, &format!("default/{name}"), cluster, &[], free_addr()).await
}

/// Sends `n` GETs with `concurrency` at a time; returns the replies.
async fn burst(proxy: &ProxyHandle, service: &str, path: &str, n: usize, concurrency: usize) -> Vec<Reply> {
    let client = Arc::new(Client::new());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, next, url, service) = (
            client.clone(),
            next.clone(),
            format!("http://{}{path}", proxy.outbound),
            service.to_string(),
        );
        tasks.spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let req = Request::get(&url).header("host", &service).body(Full::new(Bytes::new())).unwrap();
                out.push(client.send(req).await.expect("outbound answers"));
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.unwrap());
    }
    all
}

/// Method, path and headers of one request.
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

fn server_of(r: &Reply) -> String {
    r.header("x-echo-server").unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_every_way_and_weights_split_within_two_and_a_half_points() {
    let control = Control::start(BIN).await;
    let v1 = instance(&control, "shop-v1", "shop", "v1", "cluster-a").await;
    let v2 = instance(&control, "shop-v2", "shop", "v2", "cluster-a").await;
    let web = caller(&control, "web", "cluster-a").await;
    assert_eq!(get(&web, "shop", "/", &[]).await.status, 200);
    let spec = r#"  routes:
    - name: health
      match: {path: /health}
      backends: [{subset: v2, weight: 100}]
    - name: users
      match: {pathRegex: "/users/[0-9]+", methods: [GET]}
      backends: [{subset: v2, weight: 100}]
    - name: beta
      match: {headers: {x-user: {prefix: beta-}, x-order: {regex: "[A-Z]{2}-[0-9]+"}}}
      backends: [{subset: v2, weight: 100}]
    - name: gold
      match: {query: {tier: gold}}
      backends: [{subset: v2, weight: 100}]
    - name: debug
      match: {headers: {x-debug: {present: true}}}
      backends: [{subset: v2, weight: 100}]
    - name: split
      backends: [{subset: v2, weight: 20}, {subset: v1, weight: 80}]
"#;
    apply(&control, &web, &traffic_policy("shop", spec)).await;
    let to_v2: [Case; 5] = [
        ("GET", "/health", &[]),
        ("GET", "/users/42", &[]),
        ("GET", "/any", &[("x-user", "beta-1"), ("x-order", "EU-7")]),
        ("GET", "/any?tier=gold&x=1", &[]),
        ("GET", "/any", &[("x-debug", "")]),
    ];
    for (method, path, headers) in to_v2 {
        for _ in 0..5 {
            let r = send(&web, method, "shop", path, headers).await;
            assert_eq!(
                (r.status, server_of(&r)),
                (200, "shop-v2".to_string()),
                "{method} {path} {headers:?}"
            );
        }
    }
    // Near misses fall through to the split: regex must match the whole path, both headers
    // must hold, the query value must be exact.
    let misses: [Case; 4] = [
        ("GET", "/users/42/orders", &[]),
        ("POST", "/users/42", &[]),
        ("GET", "/any", &[("x-user", "beta-1"), ("x-order", "eu-7")]),
        ("GET", "/any?tier=golden", &[]),
    ];
    let mut miss_v1 = 0;
    for (method, path, headers) in misses {
        for _ in 0..10 {
            let r = send(&web, method, "shop", path, headers).await;
            assert_eq!(r.status, 200);
            miss_v1 += usize::from(server_of(&r) == "shop-v1");
        }
    }
    assert!(miss_v1 >= 20, "the misses took the 80/20 split: {miss_v1} of 40 on v1");

    // 5,000 requests over the split: v2 within 20% +- 2.5 points. Each pick is random, so the
    // share's standard deviation is sqrt(0.2 * 0.8 / 5000) = 0.57 points: 2.5 is 4.4 of them
    // (a false failure about once in 100,000 runs; +-1.5, 2.65 of them, failed about 1 in 125).
    let replies = burst(&web, "shop", "/split", 5000, 16).await;
    assert!(replies.iter().all(|r| r.status == 200));
    let share = replies.iter().filter(|r| server_of(r) == "shop-v2").count() as f64 / 50.0;
    assert!((17.5..=22.5).contains(&share), "v2 got {share}% of 5000, want 20 +- 2.5");

    // New weights under load: requests in flight on the old config all finish.
    v1.app.set_mode(Mode::Delay(Duration::from_millis(400)));
    let before = v1.app.received() + v2.app.received();
    let in_flight: Vec<_> = (0..20)
        .map(|_| {
            let url = format!("http://{}/slow", web.outbound);
            tokio::spawn(async move {
                let req = Request::get(url).header("host", "shop").body(Full::new(Bytes::new())).unwrap();
                Client::new().send(req).await.expect("answers")
            })
        })
        .collect();
    eventually(Duration::from_secs(15), "the 20 requests reached the apps", || async {
        (v1.app.received() + v2.app.received() >= before + 20).then_some(())
    })
    .await;
    let spec = "  routes:\n    - name: split\n      backends: [{subset: v2, weight: 50}, {subset: v1, weight: 50}]\n";
    apply(&control, &web, &traffic_policy("shop", spec)).await;
    for t in in_flight {
        assert_eq!(t.await.unwrap().status, 200, "an in-flight request survived the weight change");
    }
    v1.app.set_mode(Mode::Normal);
    let replies = burst(&web, "shop", "/split", 2000, 16).await;
    let share = replies.iter().filter(|r| server_of(r) == "shop-v2").count() as f64 / 20.0;
    assert!((46.0..=54.0).contains(&share), "after the change v2 got {share}%, want 50");
    drop((v1, v2));
}

/// Paths that climb out of `/api`, spelled every way the normalizer reads.
const ESCAPES: [&str; 8] = [
    "/api/../admin",
    "/api/%2e%2e/admin",
    "/api/%2E%2E/admin",
    "/api/.%2e/admin",
    "//api/./../admin",
    "/api/x/../../admin",
    "/api//..//admin",
    "/api/%2e/../admin",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_is_routed_authorized_and_forwarded_in_one_canonical_form() {
    let control = Control::start(BIN).await;
    let v1 = instance(&control, "shop-v1", "shop", "v1", "cluster-a").await;
    let v2 = instance(&control, "shop-v2", "shop", "v2", "cluster-a").await;
    let web = caller(&control, "web", "cluster-a").await;
    assert_eq!(get(&web, "shop", "/", &[]).await.status, 200);
    let spec = "  routes:\n    - name: api\n      match: {pathPrefix: /api}\n      backends: [{subset: v2, weight: 100}]\n    - name: rest\n      backends: [{subset: v1, weight: 100}]\n";
    apply(&control, &web, &traffic_policy("shop", spec)).await;
    v2.app.paths.lock().clear();

    // The route reads the path the app will get: out of /api is not /api.
    for path in ESCAPES {
        let r = get(&web, "shop", path, &[]).await;
        assert_eq!(
            (r.status, server_of(&r), r.json()["path"].as_str().map(str::to_string)),
            (200, "shop-v1".to_string(), Some("/admin".to_string())),
            "{path}"
        );
    }
    for path in ["/api/./orders", "//api//orders", "/api/%6Frders", "/x/../api/orders"] {
        let r = get(&web, "shop", path, &[]).await;
        assert_eq!(
            (r.status, server_of(&r), r.json()["path"].as_str().map(str::to_string)),
            (200, "shop-v2".to_string(), Some("/api/orders".to_string())),
            "{path}"
        );
    }
    // No canonical form: refused at the caller's sidecar, never routed.
    for path in [
        "/../admin",
        "/api/../../admin",
        "/api%2F..%2Fadmin",
        "/api/..%2fadmin",
        "/api/%2e%2e/%2e%2e/admin",
    ] {
        let r = get(&web, "shop", path, &[]).await;
        assert_eq!((r.status, r.header("x-weft-error").as_deref()), (400, Some("bad-path")), "{path}");
        assert!(r.text().contains("no canonical form"), "{path}: {}", r.text());
    }
    let seen = v2.app.paths.lock().clone();
    assert!(
        seen.len() == 4 && seen.iter().all(|p| p == "/api/orders"),
        "only canonical /api paths reached the /api route's backend: {seen:?}"
    );

    // A deny on /admin holds for every spelling, sent through the route that once took /api.
    let deny = "apiVersion: weft/v1\nkind: SecurityPolicy\nmetadata: {name: shop-authz}\nspec:\n  selector: {service: shop}\n  authorization:\n    mode: enforce\n    default: allow\n    rules:\n      - action: deny\n        to: {paths: [/admin]}\n";
    control.apply_until_run_by(&v1.proxy, deny).await;
    control.apply_until_run_by(&v2.proxy, deny).await;
    v1.app.paths.lock().clear();
    for path in ESCAPES.iter().chain(&["/admin", "/%61dmin", "//admin", "/./admin"]) {
        let r = get(&web, "shop", path, &[]).await;
        assert_eq!(
            (r.status, r.header("x-weft-error").as_deref()),
            (403, Some("authz-denied")),
            "{path}"
        );
    }
    assert_eq!(*v1.app.paths.lock(), Vec::<String>::new(), "no denied spelling reached the app");
    assert_eq!(get(&web, "shop", "/api/orders", &[]).await.status, 200, "the rest is still allowed");
}

/// The path an inbound Upgrade request was authorized on is the one its app gets, and every
/// listener refuses a request whose Host could be read two ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_carries_its_authorized_path_and_no_host_reads_two_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let control = Control::start(BIN).await;
    let orders = instance(&control, "orders-v1", "orders", "v1", "cluster-a").await;
    let web = caller(&control, "web", "cluster-a").await;
    let deny = "apiVersion: weft/v1\nkind: SecurityPolicy\nmetadata: {name: orders-authz}\nspec:\n  selector: {service: orders}\n  authorization:\n    mode: enforce\n    default: allow\n    rules:\n      - action: deny\n        to: {paths: [/admin]}\n";
    control.apply_until_run_by(&orders.proxy, deny).await;
    let exchange = |listener: std::net::SocketAddr, raw: &'static [u8]| async move {
        let mut tcp = tokio::net::TcpStream::connect(listener).await.unwrap();
        tcp.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "{listener} closes the connection");
        String::from_utf8_lossy(&out).into_owned()
    };
    // The app answers the Upgrade with a plain 200 that names the path it got.
    let upgrade = b"GET /x/../api/%6Frders HTTP/1.1\r\nHost: orders\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\n\r\n";
    let text = exchange(orders.proxy.inbound, upgrade).await;
    assert!(text.contains(r#""path":"/api/orders""#), "the app gets the canonical path: {text}");
    let denied = b"GET /api/../admin HTTP/1.1\r\nHost: orders\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\n\r\n";
    let text = exchange(orders.proxy.inbound, denied).await;
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");

    let received = orders.app.received();
    let two_ways: [&'static [u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: orders\r\nHost: admin\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: orders\r\nX-A: 1\r\nHOST: orders\r\n\r\n",
        b"GET http://orders/ HTTP/1.1\r\nHost: admin\r\n\r\n",
    ];
    for raw in two_ways {
        for listener in [web.outbound, orders.proxy.inbound] {
            let text = exchange(listener, raw).await;
            assert!(
                text.starts_with("HTTP/1.1 400") && text.contains("Host"),
                "{listener} {:?} -> {text:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }
    assert_eq!(orders.app.received(), received, "no such request reached the app");
}

/// HTTP/2 to the sidecar, HTTP/1.1 to the app: a body length stated two ways never reaches the
/// HTTP/1.1 side, where the app could frame the body by the other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_length_stated_two_ways_over_h2_never_reaches_an_http1_app() {
    let control = Control::start(BIN).await;
    let orders = instance(&control, "orders-v1", "orders", "v1", "cluster-a").await;
    let web = caller(&control, "web", "cluster-a").await;
    assert_eq!(get(&web, "orders", "/", &[]).await.status, 200);
    let received = orders.app.received();
    let post = |lengths: &[&str]| {
        let mut b = Request::post("http://orders/upload");
        for l in lengths {
            b = b.header("content-length", *l);
        }
        b.body(Full::new(Bytes::from_static(b"hello"))).unwrap()
    };
    for lengths in [&["5", "0"][..], &["0", "5"]] {
        let sent = weft_test::http::h2_via(web.outbound, post(lengths)).await;
        assert!(sent.is_err(), "{lengths:?} is refused as malformed: {sent:?}");
    }
    assert_eq!(orders.app.received(), received, "no request with two lengths reached the app");
    let r = weft_test::http::h2_via(web.outbound, post(&["5"]))
        .await
        .expect("one length is fine");
    assert_eq!((r.status, r.text()), (200, "hello".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_counted_at_the_upstream_marked_and_never_repeated_by_the_next_hop() {
    let control = Control::start(BIN).await;
    let orders = instance(&control, "orders-v1", "orders", "v1", "cluster-a").await;
    let web = caller(&control, "web", "cluster-a").await;
    assert_eq!(get(&web, "orders", "/", &[]).await.status, 200);
    let spec = "  routes:\n    - name: all\n      retry: {attempts: 2, on: [503, reset]}\n";
    apply(&control, &web, &traffic_policy("orders", spec)).await;

    // Always 503: one GET reaches the app three times (first try + 2 retries).
    orders.app.set_mode(Mode::Status(503));
    let before = orders.app.served();
    let r = get(&web, "orders", "/", &[]).await;
    assert_eq!(r.status, 503, "the upstream's own answer comes back after the last try");
    assert_eq!(orders.app.served() - before, 3);
    // The retried tries carry the marker to the app, which may pass it on.
    let headers = orders.app.headers.lock().clone();
    let marked: Vec<bool> = headers[headers.len() - 3..]
        .iter()
        .map(|h| h.contains_key("weft-retried"))
        .collect();
    assert_eq!(marked, [false, true, true]);

    // A POST is not retried (not idempotent, and the route did not opt in).
    let before = orders.app.served();
    assert_eq!(send(&web, "POST", "orders", "/", &[]).await.status, 503);
    assert_eq!(orders.app.served() - before, 1);

    // A request that already carries the marker (a retry from an earlier hop) is tried once.
    let before = orders.app.served();
    assert_eq!(get(&web, "orders", "/", &[("weft-retried", "1")]).await.status, 503);
    assert_eq!(orders.app.served() - before, 1, "the second hop does not retry again");

    // Fails once then recovers: the caller sees success, and the metrics tell effective from
    // actual success.
    orders.app.set_mode(Mode::Normal);
    let m = web.metrics().await;
    let retried = metric(&m, "weft_proxy_retries_total", &["service=\"orders\"", "outcome=\"retried\""]);
    assert_eq!(retried, 2.0, "{m}");
    let failed_tries = metric(
        &m,
        "weft_proxy_upstream_attempts_total",
        &["service=\"orders\"", "outcome=\"failure\""],
    );
    assert_eq!(failed_tries, 5.0, "every try the app failed is counted");
    let answered = metric(&m, "weft_proxy_requests_total", &["service=\"orders\"", "status=\"503\""]);
    assert_eq!(answered, 3.0, "the app got three answers for five failed tries");
    drop(orders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_total_failure_the_retry_budget_caps_upstream_load() {
    let control = Control::start(BIN).await;
    let orders = instance(&control, "orders-v1", "orders", "v1", "cluster-a").await;
    let web = caller(&control, "web", "cluster-a").await;
    assert_eq!(get(&web, "orders", "/", &[]).await.status, 200);
    // Outlier detection off in effect (never eject the only endpoint anyway: 50% of 1 is 0).
    let spec = "  routes:\n    - name: all\n      retry: {attempts: 3, on: [5xx]}\n";
    apply(&control, &web, &traffic_policy("orders", spec)).await;
    orders.app.set_mode(Mode::Status(500));
    let before = orders.app.served();
    let start = Instant::now();
    // Three clients, each sending the next request when the last one is answered (up to
    // 100/s each), until they have offered 600 requests together (about 6 s on an idle
    // machine; longer on a busy one, and the cap below follows the time it took).
    let loads: Vec<_> = (0..3)
        .map(|_| weft_test::load::Load::start(web.outbound, "orders", &[], Duration::from_millis(10)))
        .collect();
    eventually(Duration::from_secs(60), "600 requests offered", || async {
        (loads.iter().map(|l| l.stats().total()).sum::<u64>() >= 600).then_some(())
    })
    .await;
    let mut offered = 0.0;
    for load in loads {
        offered += load.stop().await.total() as f64;
    }
    let secs = start.elapsed().as_secs_f64();
    let upstream = (orders.app.served() - before) as f64;
    // Without a budget 3 retries would make it 4x.
    // The reserve is 10 per second that saw requests: the run's seconds, counted as whole
    // calendar seconds at both ends, plus the setup request's second if still in the window.
    let cap = 1.2 * offered + 10.0 * (secs.ceil() + 2.0);
    assert!(offered > 300.0, "load too low to judge: {offered}");
    assert!(
        upstream <= cap,
        "upstream saw {upstream} for {offered} offered in {secs:.1}s; cap 1.2x + 10/s = {cap}"
    );
    assert!(
        upstream > offered * 1.1,
        "retries still happen within the budget: {upstream} for {offered}"
    );
    let m = web.metrics().await;
    let exhausted = metric(&m, "weft_proxy_retries_total", &["outcome=\"budget-exhausted\""]);
    eprintln!("budget: {exhausted} requests found the budget spent");
    assert!(exhausted > offered * 0.5, "budget exhaustion is counted: {exhausted} of {offered}");
    eprintln!(
        "budget: offered {offered}, upstream {upstream} ({:.2}x) in {secs:.1}s",
        upstream / offered
    );
    drop(orders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_answer_504_and_grpc_gets_deadline_exceeded_and_its_own_statuses_intact() {
    let control = Control::start(BIN).await;
    let slow = instance(&control, "slow-v1", "slow", "v1", "cluster-a").await;
    let fast = instance(&control, "slow-v1b", "slow", "v1", "cluster-a").await;
    let grpc = GrpcEcho::start("grpc-echo").await;
    let _gp = ProxyHandle::start(BIN, &control, "default/grpc-echo", "cluster-a", &[("version", "v1")], grpc.addr).await;
    let web = caller(&control, "web", "cluster-a").await;
    assert_eq!(get(&web, "slow", "/", &[]).await.status, 200);
    slow.app.set_mode(Mode::Hang);
    fast.app.set_mode(Mode::Delay(Duration::from_millis(600)));
    let spec = "  routes:\n    - name: all\n      timeout: 300ms\n";
    apply(&control, &web, &traffic_policy("slow", spec)).await;
    let t = Instant::now();
    let r = get(&web, "slow", "/", &[]).await;
    let took = t.elapsed();
    assert_eq!(
        (r.status, r.header("x-weft-error").as_deref()),
        (504, Some("request-timeout")),
        "{}",
        r.text()
    );
    assert!(took >= Duration::from_millis(290) && took < Duration::from_millis(900), "{took:?}");

    // Per-try timeout: a hanging endpoint's try is cut, the retry lands on the other one.
    fast.app.set_mode(Mode::Normal);
    let spec = "  loadBalancer: round-robin\n  routes:\n    - name: all\n      timeout: 3s\n      retry: {attempts: 2, perTryTimeout: 200ms, on: [5xx]}\n";
    apply(&control, &web, &traffic_policy("slow", spec)).await;
    for _ in 0..6 {
        let t = Instant::now();
        let r = get(&web, "slow", "/", &[]).await;
        assert_eq!((r.status, server_of(&r)), (200, "slow-v1b".to_string()), "{}", r.text());
        assert!(t.elapsed() < Duration::from_millis(1200), "{:?}", t.elapsed());
    }

    // gRPC: the proxy's own timeout is DEADLINE_EXCEEDED, a fault abort 503 is UNAVAILABLE,
    // and the app's own status, message and metadata pass through.
    let mut client = grpc_client(web.outbound, "grpc-echo").await;
    let ok = client
        .unary(EchoMsg {
            payload: b"hi".to_vec(),
            seq: 1,
            server: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(ok.into_inner().server, "grpc-echo");
    let spec = "  routes:\n    - name: slow\n      match: {pathPrefix: /weft.test.Echo/Unary}\n      timeout: 100ms\n      fault: {delay: {percent: 100, duration: 400ms}}\n";
    apply(&control, &web, &traffic_policy("grpc-echo", spec)).await;
    let e = client
        .unary(EchoMsg {
            payload: b"hi".to_vec(),
            seq: 2,
            server: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    assert_eq!(e.metadata().get("x-weft-error").unwrap(), "request-timeout");
    let spec = "  routes:\n    - name: abort\n      fault: {abort: {percent: 100, status: 503}}\n";
    apply(&control, &web, &traffic_policy("grpc-echo", spec)).await;
    let e = client
        .unary(EchoMsg {
            payload: b"hi".to_vec(),
            seq: 3,
            server: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.metadata().get("x-weft-error").unwrap().to_str().unwrap()),
        (tonic::Code::Unavailable, "fault-abort")
    );
    let spec = "  routes:\n    - name: plain\n      timeout: 5s\n";
    apply(&control, &web, &traffic_policy("grpc-echo", spec)).await;
    let e = client
        .unary(EchoMsg {
            payload: b"fail:9".to_vec(),
            seq: 4,
            server: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.message()), (tonic::Code::FailedPrecondition, "failing on purpose"));
    assert_eq!(e.metadata().get("x-detail").unwrap(), "kept");
    assert!(e.metadata().get("x-weft-error").is_none(), "the app's status is not the mesh's");
    drop((slow, fast));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoints_are_ejected_traffic_fails_over_by_locality_and_returns() {
    let control = Control::start(BIN).await;
    let a = instance(&control, "inv-a", "inventory", "v1", "cluster-a").await;
    let b = instance(&control, "inv-b", "inventory", "v1", "cluster-b").await;
    let c = instance(&control, "inv-c", "inventory", "v1", "cluster-c").await;
    let web = caller(&control, "web", "cluster-a").await;
    assert_eq!(get(&web, "inventory", "/", &[]).await.status, 200);
    let spec = "  failover: [cluster-c, cluster-b]\n  outlierDetection: {consecutiveFailures: 3, ejection: 1s, maxEjectedPercent: 70}\n";
    apply(&control, &web, &traffic_policy("inventory", spec)).await;
    // Healthy: every request stays in the caller's cluster.
    for _ in 0..20 {
        assert_eq!(server_of(&get(&web, "inventory", "/", &[]).await), "inv-a");
    }
    // cluster-a fails: three 503s, then it is ejected and traffic follows the failover order
    // (cluster-c before cluster-b).
    a.app.set_mode(Mode::Status(503));
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(get(&web, "inventory", "/", &[]).await.status);
    }
    assert_eq!(statuses, [503, 503, 503]);
    for _ in 0..20 {
        let r = get(&web, "inventory", "/", &[]).await;
        assert_eq!((r.status, server_of(&r)), (200, "inv-c".to_string()));
    }
    let m = web.metrics().await;
    assert_eq!(
        metric(&m, "weft_proxy_outlier_ejections_total", &["service=\"inventory\""]),
        1.0,
        "{m}"
    );
    // cluster-c fails too: on to cluster-b.
    c.app.set_mode(Mode::Status(503));
    for _ in 0..3 {
        get(&web, "inventory", "/", &[]).await;
    }
    let r = get(&web, "inventory", "/", &[]).await;
    assert_eq!((r.status, server_of(&r)), (200, "inv-b".to_string()));
    // cluster-a recovers: once its ejection is over, the probe succeeds and traffic returns.
    a.app.set_mode(Mode::Normal);
    let t = Instant::now();
    eventually(Duration::from_secs(15), "traffic back in cluster-a", || async {
        (server_of(&get(&web, "inventory", "/", &[]).await) == "inv-a").then_some(())
    })
    .await;
    assert!(t.elapsed() < Duration::from_millis(2500), "returned after {:?}", t.elapsed());
    for _ in 0..10 {
        assert_eq!(server_of(&get(&web, "inventory", "/", &[]).await), "inv-a");
    }
    drop((b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_pool_limits_answer_fast_with_their_reasons() {
    let control = Control::start(BIN).await;
    let orders = instance(&control, "orders-v1", "orders", "v1", "cluster-a").await;
    let web = caller(&control, "web", "cluster-a").await;
    let other = caller(&control, "other", "cluster-a").await;
    assert_eq!(get(&web, "orders", "/", &[]).await.status, 200);
    assert_eq!(get(&other, "orders", "/", &[]).await.status, 200);
    // Outbound: each caller may send 5/s with a burst of 5.
    apply(
        &control,
        &web,
        &traffic_policy("orders", "  rateLimit: {requestsPerSecond: 5, burst: 5}\n"),
    )
    .await;
    let t = Instant::now();
    let replies = burst(&web, "orders", "/", 30, 1).await;
    let passable = admitted_at_most(5.0, 5.0, t.elapsed());
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let limited: Vec<_> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(
        (5..=passable).contains(&ok),
        "{ok} of 30 passed a 5/s, burst 5 limit (at most {passable})"
    );
    assert_eq!(ok + limited.len(), 30);
    assert!(limited.iter().all(|r| r.header("x-weft-error").as_deref() == Some("rate-limited")));
    // The other caller has its own bucket.
    eventually(Duration::from_secs(15), "other runs the policy", || async {
        (other.config_dump().await["config"]["services"]["default/orders"]["policy"]["rateLimit"].is_object()).then_some(())
    })
    .await;
    assert_eq!(get(&other, "orders", "/", &[]).await.status, 200);

    // Inbound: the service's own sidecar limits what it accepts, from every caller together.
    let spec = "  rateLimit: {requestsPerSecond: 4, burst: 4, at: inbound}\n";
    apply(&control, &web, &traffic_policy("orders", spec)).await;
    let rev = web.config_dump().await["config"]["revision"].clone();
    eventually(Duration::from_secs(15), "orders' sidecar has the inbound limit", || async {
        (orders.proxy.config_dump().await["config"]["inbound_rate_limit"].is_object()).then_some(())
    })
    .await;
    // The other caller leaves its own outbound limit behind too.
    eventually(Duration::from_secs(15), "other runs the new revision", || async {
        (other.config_dump().await["config"]["revision"] == rev).then_some(())
    })
    .await;
    let t = Instant::now();
    let mut ok = 0;
    for i in 0..20 {
        let p = if i % 2 == 0 { &web } else { &other };
        let r = get(p, "orders", "/", &[]).await;
        if r.status == 200 {
            ok += 1;
        } else {
            assert_eq!((r.status, r.header("x-weft-error").as_deref()), (429, Some("rate-limited")));
        }
    }
    let passable = admitted_at_most(4.0, 4.0, t.elapsed());
    assert!(
        (4..=passable).contains(&ok),
        "{ok} of 20 passed an inbound limit of 4/s, burst 4 (at most {passable})"
    );

    // Pool: two requests in flight at most; the rest are refused at once.
    orders.app.set_mode(Mode::Delay(Duration::from_millis(800)));
    apply(
        &control,
        &web,
        &traffic_policy("orders", "  connectionPool: {maxPendingRequests: 2}\n"),
    )
    .await;
    let t = Instant::now();
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let url = format!("http://{}/", web.outbound);
            tokio::spawn(async move {
                let req = Request::get(url).header("host", "orders").body(Full::new(Bytes::new())).unwrap();
                let t = Instant::now();
                (Client::new().send(req).await.expect("answers"), t.elapsed())
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let full: Vec<_> = results.iter().filter(|(r, _)| r.status == 503).collect();
    assert_eq!(results.iter().filter(|(r, _)| r.status == 200).count(), 2);
    assert_eq!(full.len(), 4);
    for (r, took) in &full {
        assert_eq!(r.header("x-weft-error").as_deref(), Some("pool-full"));
        assert!(*took < Duration::from_millis(300), "refused fast: {took:?}");
    }
    assert!(t.elapsed() >= Duration::from_millis(790));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_abort_and_delay_by_percent_and_mirrors_never_slow_or_fail_the_primary() {
    let control = Control::start(BIN).await;
    let v1 = instance(&control, "pay-v1", "pay", "v1", "cluster-a").await;
    let v2 = instance(&control, "pay-v2", "pay", "v2", "cluster-a").await;
    let web = caller(&control, "web", "cluster-a").await;
    assert_eq!(get(&web, "pay", "/", &[]).await.status, 200);
    let spec = "  routes:\n    - name: chaos\n      backends: [{subset: v1, weight: 100}]\n      fault: {abort: {percent: 30, status: 503}, delay: {percent: 50, duration: 150ms}}\n";
    apply(&control, &web, &traffic_policy("pay", spec)).await;
    let before = v1.app.served();
    let t = Instant::now();
    let replies = burst(&web, "pay", "/", 400, 8).await;
    let aborted = replies.iter().filter(|r| r.status == 503).count();
    assert!(
        replies
            .iter()
            .filter(|r| r.status == 503)
            .all(|r| r.header("x-weft-error").as_deref() == Some("fault-abort"))
    );
    assert!((90..=150).contains(&aborted), "{aborted} of 400 aborted at 30%");
    assert_eq!(
        v1.app.served() - before,
        (400 - aborted) as u64,
        "an aborted request never reaches the app"
    );
    // About half of the 280 that passed waited 150 ms, 8 at a time: ~2.6 s in all.
    let took = t.elapsed();
    assert!(took > Duration::from_millis(1800) && took < Duration::from_secs(8), "{took:?}");

    // Mirror every request to v2, which is slow and then failing; the primary never notices.
    v2.app.set_mode(Mode::Delay(Duration::from_secs(2)));
    let spec = "  routes:\n    - name: shadow\n      backends: [{subset: v1, weight: 100}]\n      mirror: {subset: v2, percent: 100}\n";
    apply(&control, &web, &traffic_policy("pay", spec)).await;
    let v2_before = v2.app.served();
    for i in 0..20 {
        let t = Instant::now();
        let r = get(&web, "pay", &format!("/order/{i}"), &[]).await;
        assert_eq!((r.status, server_of(&r)), (200, "pay-v1".to_string()));
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "primary slowed by the mirror: {:?}",
            t.elapsed()
        );
    }
    eventually(Duration::from_secs(8), "v2 received the 20 copies", || async {
        (v2.app.served() - v2_before >= 20).then_some(())
    })
    .await;
    let paths = v2.app.paths.lock().clone();
    assert!((0..20).all(|i| paths.contains(&format!("/order/{i}"))), "{paths:?}");
    v2.app.set_mode(Mode::Status(500));
    let replies = burst(&web, "pay", "/", 50, 4).await;
    assert!(replies.iter().all(|r| r.status == 200 && server_of(r) == "pay-v1"));
    let m = web.metrics().await;
    assert!(
        metric(&m, "weft_proxy_mirrored_requests_total", &["service=\"pay\""]) >= 20.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_and_the_connection_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let control = Control::start(BIN).await;
    let web = caller(&control, "web", "cluster-a").await;
    let cases: [&[u8]; 3] = [
        b"POST / HTTP/1.1\r\nHost: orders\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: orders\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST / HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    ];
    for raw in cases {
        let mut tcp = tokio::net::TcpStream::connect(web.outbound).await.unwrap();
        tcp.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the connection is closed after the refusal");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400"), "{:?} -> {text:?}", String::from_utf8_lossy(raw));
    }
    let _ = Value::Null;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_with_zero_failures() {
    let control = Control::start(BIN).await;
    let orders = instance(&control, "orders-v1", "orders", "v1", "cluster-a").await;
    let mut web = caller(&control, "web", "cluster-a").await;
    assert_eq!(get(&web, "orders", "/", &[]).await.status, 200);
    let hold = Duration::from_millis(1500);
    orders.app.set_mode(Mode::Delay(hold));
    // HTTP/1.1 and HTTP/2 clients with requests in flight.
    let before = orders.app.received();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let outbound = web.outbound;
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let req = Request::get(format!("http://{outbound}/drain/{i}"))
                    .header("host", "orders")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                Client::new().send(req).await.map(|r| (r.status, r.text()))
            } else {
                let req = Request::get(format!("http://orders/drain/{i}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                weft_test::http::h2_via(outbound, req).await.map(|r| (r.status, r.text()))
            }
        }));
    }
    orders.app.wait_received(before + 20, Duration::from_secs(15)).await;
    let t = Instant::now();
    web.process.signal(nix::sys::signal::Signal::SIGTERM);
    eventually(Duration::from_secs(15), "the outbound listener closed", || async {
        tokio::net::TcpStream::connect(web.outbound).await.is_err().then_some(())
    })
    .await;
    assert!(
        tasks.iter().any(|t| !t.is_finished()),
        "the listener closed while requests were still in flight ({:?} after SIGTERM)",
        t.elapsed()
    );
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok((200, _)) => ok += 1,
            other => panic!("an in-flight request failed during drain: {other:?}"),
        }
    }
    assert_eq!(ok, 20);
    let code = web.process.wait(Duration::from_secs(12));
    assert_eq!(code, Some(0), "the proxy exits cleanly after the drain");
    assert!(
        t.elapsed() < hold + Duration::from_secs(3),
        "exited {:?} after SIGTERM, once drained",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_and_opaque_tcp_cross_two_sidecars_over_mtls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weft_test::apps::{TcpEcho, WsEcho, ws_accept};
    let control = Control::start(BIN).await;
    let ws = WsEcho::start().await;
    let ws_proxy = ProxyHandle::start(BIN, &control, "default/chat", "cluster-a", &[("version", "v1")], ws.addr).await;
    let echo = TcpEcho::start().await;
    let tcp_proxy = ProxyHandle::start(BIN, &control, "default/cache", "cluster-a", &[("version", "v1")], echo.addr).await;
    let token = control.token("default/web", "web").await;
    let tcp_listen = free_addr();
    let web = ProxyHandle::spawn_url(
        BIN,
        &control.grpc_url(),
        Some(&token),
        "default/web",
        "cluster-a",
        &[],
        free_addr(),
        &[("WEFT_TCP", &format!("{tcp_listen}=cache"))],
    );
    web.wait_ready().await;

    // WebSocket: the handshake, then frames both ways, through both sidecars.
    let mut tcp = tokio::net::TcpStream::connect(web.outbound).await.unwrap();
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let handshake = format!(
        "GET /chat HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(handshake.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(tcp.read(&mut b).await.unwrap(), 1, "{}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains(&format!("sec-websocket-accept: {}", ws_accept(key).to_ascii_lowercase())),
        "{head}"
    );
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in ["hello", "second frame"] {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | msg.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(msg.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        tcp.write_all(&frame).await.unwrap();
        let mut hdr = [0u8; 2];
        tcp.read_exact(&mut hdr).await.unwrap();
        let mut payload = vec![0u8; hdr[1] as usize];
        tcp.read_exact(&mut payload).await.unwrap();
        assert_eq!((hdr[0], String::from_utf8(payload).unwrap()), (0x81, format!("echo:{msg}")));
    }
    assert_eq!(ws.upgraded.load(std::sync::atomic::Ordering::Relaxed), 1);
    // The hop between the sidecars was mTLS.
    let m = ws_proxy.metrics().await;
    assert_eq!(
        metric(&m, "weft_proxy_inbound_connections_total", &["transport=\"plaintext\""]),
        0.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "weft_proxy_inbound_connections_total",
            &["transport=\"mtls\"", "outcome=\"accepted\""]
        ) >= 1.0
    );

    // Opaque TCP: 1 MiB of bytes out and back, intact.
    let mut tcp = tokio::net::TcpStream::connect(tcp_listen).await.unwrap();
    let data: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut w) = tcp.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let recv = r.read_to_end(&mut back);
    let (_, n) = tokio::join!(send, recv);
    assert_eq!(n.unwrap(), data.len());
    assert!(back == data, "the bytes came back intact");
    assert_eq!(echo.connections.load(std::sync::atomic::Ordering::Relaxed), 1);
    let m = tcp_proxy.metrics().await;
    assert_eq!(
        metric(&m, "weft_proxy_inbound_connections_total", &["transport=\"plaintext\""]),
        0.0
    );
    let m = eventually(Duration::from_secs(15), "TCP bytes counted", || async {
        let m = web.metrics().await;
        (metric(&m, "weft_proxy_tcp_bytes_total", &["outcome=\"sent\""]) > 0.0).then_some(m)
    })
    .await;
    assert_eq!(
        metric(&m, "weft_proxy_tcp_bytes_total", &["service=\"cache\"", "outcome=\"sent\""]),
        data.len() as f64
    );
    assert_eq!(metric(&m, "weft_proxy_tcp_connections_total", &["outcome=\"closed\""]), 1.0);
    // Both went through the same endpoint tries as HTTP requests, counted per destination
    // (before issue #15 an upgrade had a loop of its own that counted no attempt: 0 and 0).
    for service in ["chat", "cache"] {
        let label = format!("service=\"{service}\"");
        let tries = metric(&m, "weft_proxy_upstream_attempts_total", &[&label, "outcome=\"success\""]);
        assert_eq!(tries, 1.0, "{service}: {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_are_cut_before_and_after_the_response_starts() {
    let control = Control::start(BIN).await;
    let orders = instance(&control, "orders-v1", "orders", "v1", "cluster-a").await;
    let web = caller(&control, "web", "cluster-a").await;
    assert_eq!(get(&web, "orders", "/", &[]).await.status, 200);
    let spec = "  routes:\n    - name: all\n      idleTimeout: 300ms\n";
    apply(&control, &web, &traffic_policy("orders", spec)).await;
    // No answer at all: 504 once nothing has moved for the idle timeout.
    orders.app.set_mode(Mode::Hang);
    let t = Instant::now();
    let r = get(&web, "orders", "/", &[]).await;
    let took = t.elapsed();
    assert_eq!(
        (r.status, r.header("x-weft-error").as_deref()),
        (504, Some("stream-idle-timeout")),
        "{}",
        r.text()
    );
    assert!(took >= Duration::from_millis(290) && took < Duration::from_millis(1500), "{took:?}");
    // The answer starts, then stalls: the stream is cut, and the client sees an incomplete
    // body, never a short one that looks whole.
    orders.app.set_mode(Mode::StallBody);
    let t = Instant::now();
    let req = Request::get(format!("http://{}/", web.outbound))
        .header("host", "orders")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let result = Client::new().send(req).await;
    let took = t.elapsed();
    assert!(
        result.is_err(),
        "a stalled body must end in an error: {:?}",
        result.map(|r| r.text())
    );
    assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(3), "{took:?}");
    // Back on the default idle timeout (5 min), a 600 ms answer is fine.
    orders.app.set_mode(Mode::Delay(Duration::from_millis(600)));
    apply(
        &control,
        &web,
        &traffic_policy("orders", "  routes:\n    - name: all\n      timeout: 5s\n"),
    )
    .await;
    assert_eq!(get(&web, "orders", "/", &[]).await.status, 200);
}

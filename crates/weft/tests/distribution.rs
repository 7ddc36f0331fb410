//! Incremental distribution (issue #20) with the real control plane and real proxies: a policy
//! change sends the policy and not the endpoints, an endpoint joining sends that endpoint and
//! not the list, a proxy that asks for its whole config gets it, and a proxy that stops reading
//! neither delays the others nor grows a queue: it catches up in one push. Bytes and messages are counted by the control
//! plane's own metrics (`weft_control_config_push_*`).

use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use weft_api::proto::{self, control_message, distribution_client::DistributionClient, proxy_message};
use weft_test::apps::EchoServer;
use weft_test::fleet::{self, Fleet};
use weft_test::http::Client;
use weft_test::{Control, ProxyHandle, eventually, free_addr, metric};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

/// The control plane's push counters at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Pushes {
    full_bytes: f64,
    policy_bytes: f64,
    endpoint_bytes: f64,
    full: f64,
    delta: f64,
    resync_asked: f64,
    deferred: f64,
}

impl Pushes {
    async fn read(control: &Control) -> Self {
        let text = control.metrics().await;
        let bytes = |kind: &str| metric(&text, "weft_control_config_push_bytes_total", &[&format!("kind=\"{kind}\"")]);
        let messages = |kind: &str| metric(&text, "weft_control_config_push_messages_total", &[&format!("kind=\"{kind}\"")]);
        let resyncs = |reason: &str| metric(&text, "weft_control_config_resyncs_total", &[&format!("reason=\"{reason}\"")]);
        Pushes {
            full_bytes: bytes("full"),
            policy_bytes: bytes("policy"),
            endpoint_bytes: bytes("endpoints"),
            full: messages("full"),
            delta: messages("delta"),
            resync_asked: resyncs("asked"),
            deferred: metric(&text, "weft_control_config_pushes_deferred_total", &[]),
        }
    }

    fn since(self, before: Pushes) -> Pushes {
        Pushes {
            full_bytes: self.full_bytes - before.full_bytes,
            policy_bytes: self.policy_bytes - before.policy_bytes,
            endpoint_bytes: self.endpoint_bytes - before.endpoint_bytes,
            full: self.full - before.full,
            delta: self.delta - before.delta,
            resync_asked: self.resync_asked - before.resync_asked,
            deferred: self.deferred - before.deferred,
        }
    }
}

fn policy(timeout: &str) -> String {
    format!(
        "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {{name: orders}}\nspec:\n  service: orders\n  routes:\n    - timeout: {timeout}\n"
    )
}

/// Instance `i` of `orders` in front of `app`.
async fn orders(control: &Control, i: usize, app: std::net::SocketAddr) -> ProxyHandle {
    let workload = format!("default/orders-{i}");
    ProxyHandle::start(
        BIN,
        control,
        &workload,
        "cluster-a",
        &[("service", "orders"), ("version", "v1")],
        app,
    )
    .await
}

/// A caller that has routed to `orders` once (so it subscribes to it).
async fn caller(control: &Control, name: &str) -> ProxyHandle {
    let p = ProxyHandle::start(BIN, control, &format!("default/{name}"), "cluster-a", &[], free_addr()).await;
    let r = Client::new()
        .send(
            hyper::Request::get(format!("http://{}/", p.outbound))
                .header("host", "orders")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .expect("outbound answers");
    assert_eq!(r.status, 200, "{}", r.text());
    p
}

/// How many endpoints of `orders` proxy `p` runs with.
async fn endpoints_of_orders(p: &ProxyHandle) -> usize {
    let dump = p.config_dump().await;
    dump["config"]["services"]["default/orders"]["endpoints"]
        .as_array()
        .map_or(0, Vec::len)
}

async fn until_endpoints(p: &ProxyHandle, n: usize) {
    eventually(
        Duration::from_secs(15),
        &format!("{} runs with {n} orders endpoints", p.workload),
        || async { (endpoints_of_orders(p).await == n).then_some(()) },
    )
    .await;
}

/// Applies `yaml` and waits until every one of `callers` runs the revision it made.
async fn apply_until_run_by_all(control: &Control, callers: &[&ProxyHandle], yaml: &str) -> u64 {
    let (status, applied) = control.post("/api/v1/resources", yaml).await;
    assert_eq!(status, 200, "{applied}");
    let rev = applied["revision"].as_u64().expect("a revision");
    for c in callers {
        eventually(Duration::from_secs(15), "the caller runs the new revision", || async {
            (c.config_dump().await["config"]["revision"].as_u64() >= Some(rev)).then_some(())
        })
        .await;
    }
    rev
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_sends_the_policy_and_not_the_endpoints() {
    let control = Control::start(BIN).await;
    let echo = EchoServer::start("orders").await;
    let mut instances = Vec::new();
    for i in 0..3 {
        instances.push(orders(&control, i, echo.addr).await);
    }
    let (web, api) = (caller(&control, "web").await, caller(&control, "api").await);
    until_endpoints(&web, 3).await;
    until_endpoints(&api, 3).await;

    let before = Pushes::read(&control).await;
    apply_until_run_by_all(&control, &[&web, &api], &policy("2s")).await;
    // Every proxy is pushed the new revision (the callers the policy too); wait for all five.
    let proxies = 5.0;
    eventually(Duration::from_secs(15), "every proxy is pushed the change", || async {
        (Pushes::read(&control).await.since(before).delta >= proxies).then_some(())
    })
    .await;
    let change = Pushes::read(&control).await.since(before);
    assert_eq!(change.endpoint_bytes, 0.0, "a policy change sent endpoints: {change:?}");
    assert_eq!(
        (change.full, change.full_bytes),
        (0.0, 0.0),
        "a policy change sent whole configs: {change:?}"
    );
    assert!(change.policy_bytes > 0.0, "{change:?}");
    assert!(
        change.policy_bytes / 2.0 < 400.0,
        "each caller is sent about the policy's size, not more: {change:?}"
    );
    for p in [&web, &api] {
        let dump = p.config_dump().await;
        let orders = &dump["config"]["services"]["default/orders"];
        assert_eq!(orders["policy"]["routes"][0]["timeout"], "2s", "{dump}");
        assert_eq!(
            orders["endpoints"].as_array().map(Vec::len),
            Some(3),
            "the endpoints held are kept: {dump}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_joining_sends_each_subscriber_that_endpoint_only() {
    let control = Control::start(BIN).await;
    let echo = EchoServer::start("orders").await;
    let mut instances = Vec::new();
    for i in 0..4 {
        instances.push(orders(&control, i, echo.addr).await);
    }
    let (web, api) = (caller(&control, "web").await, caller(&control, "api").await);
    until_endpoints(&web, 4).await;
    until_endpoints(&api, 4).await;
    let whole_list = serde_json::to_string(&web.config_dump().await["config"]["services"]["default/orders"]["endpoints"])
        .unwrap()
        .len();

    let before = Pushes::read(&control).await;
    instances.push(orders(&control, 4, echo.addr).await);
    until_endpoints(&web, 5).await;
    until_endpoints(&api, 5).await;
    let join = Pushes::read(&control).await.since(before);
    assert_eq!(join.full, 1.0, "only the new instance is sent a whole config: {join:?}");
    // Each caller (and each instance, which subscribes to nothing, gets no endpoints).
    let per_subscriber = join.endpoint_bytes / 2.0;
    assert!(per_subscriber > 0.0, "{join:?}");
    assert!(
        per_subscriber < 300.0 && per_subscriber * 3.0 < whole_list as f64,
        "{per_subscriber} endpoint bytes per subscriber for one endpoint; the list of four is {whole_list} (JSON): {join:?}"
    );
    assert_eq!(join.policy_bytes, 0.0, "{join:?}");
}

/// A control stream of the test's own: registered as `default/NAME` calling `calls`
/// (`NAMESPACE/NAME`), reading through an HTTP/2 window of `window` bytes. It ACKs only what the
/// test has it ACK.
struct RawProxy {
    tx: mpsc::Sender<proto::ProxyMessage>,
    inbound: tonic::Streaming<proto::ControlMessage>,
}

impl RawProxy {
    async fn connect(control: &Control, name: &str, calls: &str, window: u32) -> Self {
        let token = control.token(&format!("default/{name}"), name).await;
        let (tx, rx) = mpsc::channel(16);
        let register = proto::Register {
            namespace: "default".into(),
            name: name.into(),
            inbound_addr: free_addr().to_string(),
            services: vec![calls.into()],
            token,
            ..Default::default()
        };
        tx.send(proto::ProxyMessage {
            msg: Some(proxy_message::Msg::Register(register)),
        })
        .await
        .unwrap();
        let channel = control.channel_with(|e| e.initial_stream_window_size(window)).await;
        let inbound = DistributionClient::new(channel)
            .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("registered")
            .into_inner();
        RawProxy { tx, inbound }
    }

    async fn next(&mut self) -> control_message::Msg {
        tokio::time::timeout(Duration::from_secs(15), self.inbound.next())
            .await
            .expect("a message within 15 s")
            .expect("the stream is open")
            .expect("a message")
            .msg
            .expect("a message body")
    }

    async fn send(&self, msg: proxy_message::Msg) {
        self.tx.send(proto::ProxyMessage { msg: Some(msg) }).await.unwrap();
    }

    async fn ack(&self, version: u64, revision: u64) {
        self.send(proxy_message::Msg::Ack(proto::Ack { version, revision })).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_asks_for_its_whole_config_after_a_gap_is_sent_it() {
    let control = Control::start(BIN).await;
    let echo = EchoServer::start("orders").await;
    let _orders = orders(&control, 0, echo.addr).await;
    let mut raw = RawProxy::connect(&control, "raw", "default/orders", 65_535).await;
    let control_message::Msg::Config(first) = raw.next().await else {
        panic!("the first push on a stream is the whole config");
    };
    assert_eq!(first.services[0].endpoints.len(), 1, "{first:?}");
    raw.send(proxy_message::Msg::Ack(proto::Ack {
        version: first.version,
        revision: first.revision,
    }))
    .await;

    let before = Pushes::read(&control).await;
    // Queued as an intent until this proxy, which enforces it, ACKs (it will not).
    let (status, applied) = control.post("/api/v1/resources", &policy("2s")).await;
    assert_eq!(status, 202, "{applied}");
    let control_message::Msg::Delta(delta) = raw.next().await else {
        panic!("a change on a stream is a delta");
    };
    assert_eq!(delta.base_version, first.version);
    assert_eq!(delta.services.len(), 1, "the policy part of orders: {delta:?}");
    assert!(delta.endpoints.is_empty(), "no endpoint changed: {delta:?}");

    // As a proxy does when a delta does not build on what it holds.
    raw.send(proxy_message::Msg::Resync(proto::Resync {
        reason: "test: missed a version".into(),
    }))
    .await;
    let control_message::Msg::Config(whole) = raw.next().await else {
        panic!("a Resync is answered with the whole config");
    };
    assert!(whole.version > delta.version, "{} after {}", whole.version, delta.version);
    assert_eq!(whole.revision, delta.revision);
    let orders = &whole.services[0];
    assert_eq!(orders.endpoints.len(), 1, "{whole:?}");
    assert!(orders.traffic_policy_json.contains("2s"), "{whole:?}");
    assert_eq!(Pushes::read(&control).await.since(before).resync_asked, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_stops_reading_delays_no_one_and_catches_up_in_one_push() {
    let control = Control::start(BIN).await;
    let echo = EchoServer::start("orders").await;
    let _orders = orders(&control, 0, echo.addr).await;
    let web = caller(&control, "web").await;
    // A 256-byte window: the whole config already fills it, and nothing more is read. It calls
    // web, not orders, so it does not enforce the changes (a stuck proxy that enforced them
    // would hold their rollout until the enforcement timeout, by design): it is only sent
    // each new revision.
    let mut stuck = RawProxy::connect(&control, "stuck", "default/web", 256).await;
    let before = Pushes::read(&control).await;

    // More changes than a stream's queue holds; each reaches the proxy that reads.
    let changes = 50;
    let mut slowest = Duration::ZERO;
    let mut last = 0;
    for i in 1..=changes {
        let t = Instant::now();
        last = apply_until_run_by_all(&control, &[&web], &policy(&format!("{i}s"))).await;
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(3),
        "a change took {slowest:?} to reach a reading proxy"
    );
    let behind = Pushes::read(&control).await.since(before);
    assert!(behind.deferred >= 1.0, "the stuck stream's pushes were held: {behind:?}");

    // Reading and answering again, it gets the at most two pushes that were out, then one
    // push with every change it missed, each building on the one before: fewer pushes than
    // changes, and no whole config.
    let first = stuck.next().await;
    let control_message::Msg::Config(first) = first else {
        panic!("the first push is the whole config: {first:?}");
    };
    stuck.ack(first.version, first.revision).await;
    let (mut held, mut pushes) = (first.version, 1);
    loop {
        let control_message::Msg::Delta(d) = stuck.next().await else {
            panic!("a stream that was behind is sent deltas, not whole configs");
        };
        assert_eq!(d.base_version, held, "each push builds on the one before");
        (held, pushes) = (d.version, pushes + 1);
        stuck.ack(d.version, d.revision).await;
        if d.revision == last {
            break;
        }
    }
    assert!(
        pushes <= 3,
        "{pushes} pushes for {changes} changes: two out, then one with the rest"
    );
}

/// A control plane that answers nothing for 15 s (stopped: as one too busy with a storm to
/// answer a PING in time) keeps its proxies' streams: a proxy PINGs after 10 s without a frame
/// and waits 20 s for the answer. At the proxy's former 2 s / 3 s, its PING went unanswered 5 s after the last frame,
/// it dropped the stream and registered again (its endpoint leaving and joining everyone's
/// config: the churn a busy control plane then has to serve on top of its storm).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_answers_nothing_for_15_s_keeps_its_proxies_streams() {
    let control = Control::start(BIN).await;
    let echo = EchoServer::start("orders").await;
    let _orders = orders(&control, 0, echo.addr).await;
    let web = caller(&control, "web").await;
    until_endpoints(&web, 1).await;
    let ids = || async {
        let proxies = control.get("/api/v1/proxies").await;
        let mut ids: Vec<String> = proxies
            .as_array()
            .expect("a list")
            .iter()
            .map(|p| p["id"].as_str().unwrap_or_default().to_string())
            .collect();
        ids.sort();
        ids
    };
    let before = ids().await;
    assert_eq!(before.len(), 2, "{before:?}");
    let stall = Duration::from_secs(15);
    assert!(
        stall > weft_api::CONTROL_KEEPALIVE_INTERVAL + Duration::from_secs(2),
        "a PING is sent during the stall, and goes unanswered for a while"
    );
    control.process.signal(nix::sys::signal::Signal::SIGSTOP);
    let t = Instant::now();
    // Watched throughout: the proxy must not give the stream up while the control plane is stopped.
    while t.elapsed() < stall {
        let log = web.process.log_text();
        assert!(
            !log.contains("control stream down"),
            "the proxy dropped its stream {:?} into a 15 s stall",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    control.process.signal(nix::sys::signal::Signal::SIGCONT);
    assert_eq!(ids().await, before, "the same stream (the same connection number) after the stall");
    assert!(
        !web.process.log_text().contains("control stream down"),
        "{}",
        web.process.log_text()
    );
    assert_eq!(endpoints_of_orders(&web).await, 1);
}

/// A proxy the control plane refuses because it is busy registering others comes back on the
/// same connection: one TLS handshake for its stream however many times it was told to wait
/// (before, each refusal cost a new connection and handshake: thousands in a storm, for both
/// sides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_told_to_come_back_later_does_so_on_the_same_connection() {
    let control = Control::start_with(BIN, &["--max-registering".into(), "1".into()]).await;
    let echo = EchoServer::start("orders").await;
    let _orders = orders(&control, 0, echo.addr).await;
    // Holds the one place: registered, and not answering its first config yet. (It calls a
    // service with endpoints: one without would be held for the warm-up, giving its place up.)
    let mut holder = RawProxy::connect(&control, "holder", "default/orders", 65_535).await;
    let control_message::Msg::Config(first) = holder.next().await else {
        panic!("the first push is the whole config");
    };
    let counters = || async {
        let text = control.metrics().await;
        (
            metric(
                &text,
                "weft_control_tls_handshakes_total",
                &["listener=\"grpc\"", "outcome=\"accepted\""],
            ),
            metric(&text, "weft_control_registrations_deferred_total", &[]),
        )
    };
    let (handshakes, deferred) = counters().await;
    let token = control.token("default/web", "web").await;
    let web = ProxyHandle::spawn_url(
        BIN,
        &control.grpc_url(),
        Some(&token),
        "default/web",
        "cluster-a",
        &[],
        free_addr(),
        &[],
    );
    eventually(Duration::from_secs(30), "web told to come back 3 times", || async {
        (counters().await.1 - deferred >= 3.0).then_some(())
    })
    .await;
    holder.ack(first.version, first.revision).await;
    web.wait_ready().await;
    let (handshakes_after, deferred_after) = counters().await;
    let refused = deferred_after - deferred;
    let log = web.process.log_text();
    assert!(
        log.matches("coming back when it asked").count() >= 3,
        "the proxy was told to wait: {log}"
    );
    // Its certificate request and its control stream: two connections, whatever `refused` is.
    assert!(
        handshakes_after - handshakes <= 2.0,
        "{} TLS handshakes for {refused} refusals",
        handshakes_after - handshakes
    );
}

/// Join tokens for `n` simulated proxies of `control`.
async fn sim_tokens(control: &Control, n: usize) -> Vec<String> {
    let api = control.url("");
    fleet::tokens(&control.client(), api.trim_end_matches('/'), &control.admin_token, n)
        .await
        .expect("tokens minted")
}

/// A cold-start storm: 300 simulated proxies (each its own gRPC stream over TLS) connect at once
/// to a control plane that registers at most 20 at a time. Every one ends up configured with
/// every endpoint of the service it calls; some were told to come back later (the control
/// plane counted as many refusals as the simulator was told), and no stream failed otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_proxies_connecting_at_once_is_admitted_with_backoff_and_all_configured() {
    let control = Control::start_with(BIN, &["--max-registering".into(), "20".into()]).await;
    let (n, services) = (300, 3);
    let tokens = sim_tokens(&control, n).await;
    let fleet = Fleet::connect(&control.grpc_url(), tokens, 0, services, "sim-svc-0").await.unwrap();
    let all = fleet::until(Duration::from_secs(60), || async { fleet.count_synced(1, 0, n / services) == n }).await;
    assert!(
        all.is_some(),
        "{} of {n} configured with all {} endpoints of sim-svc-0 (held: {:?}); told to wait {}, failed {}",
        fleet.count_synced(1, 0, n / services),
        n / services,
        fleet.endpoints_held(),
        fleet.told_to_wait(),
        fleet.failures()
    );
    eprintln!(
        "storm: all {n} configured in {:?}, {} refusals with a hint, {} other failures",
        all.unwrap(),
        fleet.told_to_wait(),
        fleet.failures()
    );
    assert!(
        fleet.told_to_wait() > 0,
        "300 at once against a bound of 20: some were told to come back"
    );
    assert_eq!(
        fleet.failures(),
        0,
        "no stream failed for any other reason: {:?}",
        fleet.last_failure()
    );
    let text = control.metrics().await;
    let deferred = metric(&text, "weft_control_registrations_deferred_total", &[]);
    assert_eq!(deferred as usize, fleet.told_to_wait(), "every refusal the simulator saw, counted");
    assert_eq!(
        metric(&text, "weft_control_registrations_in_progress", &[]),
        0.0,
        "every registration completed"
    );
    assert_eq!(metric(&text, "weft_control_proxies_connected", &[]), n as f64);
    fleet.abort();
}

/// A control plane restarted under 300 connected proxies (150 instances of the service they
/// call: their endpoints take three pushes, so every proxy holds a part of the list for a
/// while, as a fleet's do at scale): every one reconnects and is back in
/// sync (a whole config on its new stream, the revision it held or later, every endpoint of the
/// service it calls), and none was ever sent a config leaving it without endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restarted_under_its_fleet_ends_with_all_of_it_back_in_sync() {
    let mut control = Control::start_with(BIN, &["--max-registering".into(), "40".into()]).await;
    let (n, services) = (300, 2);
    let tokens = sim_tokens(&control, n).await;
    let fleet = Fleet::connect(&control.grpc_url(), tokens, 0, services, "sim-svc-0").await.unwrap();
    let (status, applied) = control
        .post(
            "/api/v1/resources",
            "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: sim-policy}\nspec:\n  service: sim-svc-0\n  routes:\n    - timeout: 2s\n",
        )
        .await;
    assert!(status == 200 || status == 202, "{status} {applied}");
    let revision = applied["revision"].as_u64().unwrap();
    let before = fleet::until(Duration::from_secs(60), || async {
        fleet.count_synced(1, revision, n / services) == n
    })
    .await;
    assert!(
        before.is_some(),
        "{} of {n} in sync before the restart",
        fleet.count_synced(1, revision, n / services)
    );

    let t0 = Instant::now();
    control.restart_gracefully(Duration::from_secs(10)).await;
    let synced = fleet::until(Duration::from_secs(60), || async {
        fleet.count_synced(2, revision, n / services) == n
    })
    .await;
    assert!(
        synced.is_some(),
        "{} of {n} back in sync after the restart (endpoints held: {:?}, lowest revision {})",
        fleet.count_synced(2, revision, n / services),
        fleet.endpoints_held(),
        fleet.lowest_revision()
    );
    eprintln!("restart to all {n} in sync: {:?}", t0.elapsed());
    assert_eq!(fleet.lowest_revision(), revision, "no proxy went back to an older revision");
    let fewest = fleet.fewest_endpoints_after_reconnecting();
    assert!(
        fewest.is_some_and(|f| f > 0),
        "no proxy was left without endpoints: fewest {fewest:?}"
    );
    assert_eq!(metric(&control.metrics().await, "weft_control_proxies_connected", &[]), n as f64);
    fleet.abort();
}

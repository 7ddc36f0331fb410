//! The control plane on etcd (`--store etcd://...`) and the operator switches that outlive a
//! restart: real etcd members (Debian's etcd-server), real control-plane processes.

use serde_json::Value;
use std::time::{Duration, Instant};
use weft_test::apps::EchoServer;
use weft_test::etcd::EtcdCluster;
use weft_test::eventually;
use weft_test::http::Client;
use weft_test::{Control, ProxyHandle, free_addr};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

const POLICY: &str =
    "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: orders}\nspec: {service: orders, routes: [{timeout: 2s}]}\n";

fn service<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {status}"))
}

/// Applies the policy, freezes the mesh and bypasses `orders`; returns the revision made.
async fn change_everything(control: &Control) -> u64 {
    let (status, applied) = control.post("/api/v1/resources", POLICY).await;
    assert_eq!(status, 200, "{applied}");
    let (status, body) = control.post("/api/v1/bypass/orders", r#"{"enabled": true}"#).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = control.post("/api/v1/freeze", r#"{"enabled": true}"#).await;
    assert_eq!(status, 200, "{body}");
    applied["revision"].as_u64().expect("a revision")
}

/// What a restart must keep: the policy at its revision, the freeze and the bypass.
async fn assert_kept(control: &Control, revision: u64) {
    let status = control.get("/api/v1/status").await;
    assert_eq!(Control::revision_of(&status), revision, "{status}");
    assert_eq!(status["loop"]["frozen"], true, "the freeze outlives the restart: {status}");
    assert_eq!(
        service(&status, "orders")["bypass"],
        true,
        "the bypass outlives the restart: {status}"
    );
    let resources = control.get("/api/v1/resources").await;
    assert!(resources.to_string().contains("\"timeout\":\"2s\""), "{resources}");
}

#[tokio::test]
async fn freeze_and_bypass_survive_a_restart_of_the_embedded_store() {
    let mut control = Control::start(BIN).await;
    let revision = change_everything(&control).await;
    control.restart().await;
    assert_kept(&control, revision).await;
    // And they can be lifted again, durably.
    assert_eq!(control.post("/api/v1/freeze", r#"{"enabled": false}"#).await.0, 200);
    control.restart().await;
    assert_eq!(control.get("/api/v1/status").await["loop"]["frozen"], false);
}

#[tokio::test]
async fn a_control_plane_on_etcd_keeps_everything_across_a_restart_with_a_new_data_dir() {
    let etcd = EtcdCluster::start(1).await;
    let first = Control::start_on_store(BIN, &etcd.url(), None, &[]).await;
    leader_of(std::slice::from_ref(&first), &[0], Duration::from_secs(10)).await;
    let revision = change_everything(&first).await;
    let viewer = first.api_token("ci", "viewer").await;
    let join = first.token("default/orders", "orders").await;
    assert!(!join.is_empty());
    let intents = first.get("/api/v1/intents").await;
    let ca = first.ca_pem();
    let admin = first.admin_token.clone();
    drop(first);

    // A fresh data directory holds nothing of the mesh: all of it comes back from etcd.
    let second = Control::start_on_store(BIN, &etcd.url(), Some(&admin), &[]).await;
    assert_kept(&second, revision).await;
    // It leads once the killed replica's lease has lapsed.
    leader_of(std::slice::from_ref(&second), &[0], Duration::from_secs(10)).await;
    assert_eq!(second.ca_pem(), ca, "the same root CA");
    let (status, _) = second.call_as("GET", "/api/v1/status", "", &viewer).await;
    assert_eq!(status, 200, "the API token created before the restart still works");
    let tokens = second.get("/api/v1/tokens").await;
    assert!(
        tokens.to_string().contains("default/orders"),
        "the join token is on record: {tokens}"
    );
    let after = second.get("/api/v1/intents").await;
    assert_eq!(after, intents, "intents with their ledgers and decisions");
    let revisions = second.get("/api/v1/revisions").await.to_string();
    assert!(revisions.contains(&format!("\"revision\":{revision}")), "history: {revisions}");
    let ledger = second.get("/api/v1/ledger").await.to_string();
    assert!(
        ledger.contains("freeze on") && ledger.contains("bypass on"),
        "the audit ledger: {ledger}"
    );
}

const HOLD: &str = "apiVersion: weft/v1\nkind: Intent\nmetadata: {name: HOLD-1}\nspec:\n  title: held\n  target: orders\n  change:\n    apply:\n      - apiVersion: weft/v1\n        kind: TrafficPolicy\n        metadata: {name: orders}\n        spec: {service: orders, routes: [{timeout: 2s}]}\n  rollout: {stages: [100], bake: 1s, mode: manual}\n  slo: {minRequests: 1}\n";

/// Starts `n` replicas on `store`, the first registering the admin token the others reuse.
async fn replicas(store: &str, n: usize) -> Vec<Control> {
    let first = Control::start_on_store(BIN, store, None, &[]).await;
    let token = first.admin_token.clone();
    let mut all = vec![first];
    for _ in 1..n {
        all.push(Control::start_on_store(BIN, store, Some(&token), &[]).await);
    }
    all
}

/// The index of the one replica among `live` that leads, once every one of them agrees.
async fn leader_of(replicas: &[Control], live: &[usize], within: Duration) -> usize {
    eventually(within, "one leader every live replica agrees on", || async {
        let mut leaders = Vec::new();
        let mut names = Vec::new();
        for &i in live {
            let (status, body) = replicas[i].call_as("GET", "/api/v1/status", "", &replicas[i].admin_token).await;
            if status != 200 {
                return None;
            }
            let cp = &body["controlPlane"];
            names.push(cp["leader"].as_str()?.to_string());
            if cp["role"] == "leader" {
                leaders.push(i);
            }
        }
        names.dedup();
        (leaders.len() == 1 && names.len() == 1).then(|| leaders[0])
    })
    .await
}

async fn phase(control: &Control, id: &str) -> Option<String> {
    let (status, body) = control
        .call_as("GET", &format!("/api/v1/intents/{id}"), "", &control.admin_token)
        .await;
    (status == 200).then(|| body["phase"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_elect_one_leader_and_another_takes_over_within_the_lease_when_it_is_killed() {
    let etcd = EtcdCluster::start(3).await;
    let mut all = replicas(&etcd.url(), 3).await;
    let leader = leader_of(&all, &[0, 1, 2], Duration::from_secs(20)).await;
    let follower = (leader + 1) % 3;
    let status = all[leader].get("/api/v1/status").await;
    assert_eq!(
        status["controlPlane"]["store"].as_str().unwrap(),
        format!("{} (prefix /weft/)", etcd.url())
    );
    assert_eq!(status["controlPlane"]["version"], env!("CARGO_PKG_VERSION"));

    // Only the leader changes the mesh: a change asked of a follower is forwarded to it, and
    // the leader's answer is the answer; a caller the follower refuses is not forwarded.
    let viewer = all[follower].api_token("ci", "viewer").await;
    let (code, body) = all[follower].call_as("POST", "/api/v1/intents", HOLD, &viewer).await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = all[follower].post("/api/v1/intents", HOLD).await;
    assert_eq!(code, 201, "forwarded to the leader: {body}");
    assert!(
        phase(&all[leader], "HOLD-1").await.is_some(),
        "the leader holds the forwarded intent"
    );
    // Read your writes: the replica that forwarded the change shows it as soon as it answered
    // (as the token made through it worked there at once, above).
    assert!(
        phase(&all[follower], "HOLD-1").await.is_some(),
        "the follower that forwarded the intent shows it at once"
    );
    // Followers see the leader's intent through their watch.
    for replica in &all {
        eventually(Duration::from_secs(10), "every replica shows the held intent", || async {
            (phase(replica, "HOLD-1").await.as_deref() == Some("awaiting-approval")).then_some(())
        })
        .await;
    }

    // kill -9 the leader mid-rollout: another takes over within the lease's TTL.
    all[leader].process.kill();
    let killed = Instant::now();
    let live: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let next = leader_of(&all, &live, Duration::from_secs(15)).await;
    let failover = killed.elapsed();
    eprintln!("leader failover: {failover:?} (lease TTL 3s)");
    assert!(failover <= Duration::from_millis(3000 + 1500), "took {failover:?}");

    // The intent continues on the new leader: approved there, it is promoted, and the other
    // replica follows.
    eventually(Duration::from_secs(10), "the new leader holds the intent for approval", || async {
        (phase(&all[next], "HOLD-1").await.as_deref() == Some("awaiting-approval")).then_some(())
    })
    .await;
    let (code, body) = all[next].post("/api/v1/intents/HOLD-1/approve", "").await;
    assert_eq!(code, 200, "{body}");
    let other = live.into_iter().find(|&i| i != next).unwrap();
    eventually(Duration::from_secs(15), "promoted, on both live replicas", || async {
        let (a, b) = (phase(&all[next], "HOLD-1").await, phase(&all[other], "HOLD-1").await);
        (a.as_deref() == Some("promoted") && b.as_deref() == Some("promoted")).then_some(())
    })
    .await;
    let revision = Control::revision_of(&all[next].get("/api/v1/status").await);
    eventually(Duration::from_secs(10), "the follower's stable revision follows", || async {
        (Control::revision_of(&all[other].get("/api/v1/status").await) == revision).then_some(())
    })
    .await;
}

/// One call through `caller`'s outbound listener to `service`: its status.
async fn call_via(caller: &ProxyHandle, service: &str) -> u16 {
    let request = hyper::Request::get(format!("http://{}/", caller.outbound))
        .header("host", service)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    match Client::new().send(request).await {
        Ok(reply) => reply.status,
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_quorum_writes_get_503_with_the_reason_and_traffic_and_reads_go_on() {
    let mut etcd = EtcdCluster::start(3).await;
    let all = replicas(&etcd.url(), 2).await;
    let leader = leader_of(&all, &[0, 1], Duration::from_secs(20)).await;
    let follower = 1 - leader;
    let echo = EchoServer::start("orders").await;
    let _orders = ProxyHandle::start(BIN, &all[follower], "default/orders", "cluster-a", &[], echo.addr).await;
    let caller = ProxyHandle::start(BIN, &all[leader], "default/web", "cluster-a", &[], free_addr()).await;
    eventually(Duration::from_secs(15), "web reaches orders", || async {
        (call_via(&caller, "orders").await == 200).then_some(())
    })
    .await;

    // One member down: no effect.
    etcd.stop(2);
    let (code, body) = all[leader].post("/api/v1/freeze", r#"{"enabled": true}"#).await;
    assert_eq!(code, 200, "one of three members down changes nothing: {body}");
    // Every replica holds the freeze (the followers through their watch) before quorum goes,
    // so "reads from what the replica has" below has something to show.
    for replica in &all {
        eventually(Duration::from_secs(10), "each replica sees the freeze", || async {
            let (_, body) = replica.call_as("GET", "/api/v1/status", "", &replica.admin_token).await;
            (body["loop"]["frozen"] == true).then_some(())
        })
        .await;
    }

    // Two down: no quorum. Writes are refused with a reason; reads and traffic go on.
    etcd.stop(1);
    let refused = eventually(Duration::from_secs(20), "a write refused for want of quorum", || async {
        let (code, body) = all[leader].post("/api/v1/freeze", r#"{"enabled": false}"#).await;
        (code != 200).then_some((code, body))
    })
    .await;
    assert_eq!(refused.0, 503, "{}", refused.1);
    let reason = refused.1["error"].as_str().unwrap().to_string();
    assert!(reason.contains("quorum"), "the reason names the missing quorum: {reason}");
    let mut failed = 0;
    for replica in &all {
        let (code, body) = replica.call_as("GET", "/api/v1/status", "", &replica.admin_token).await;
        assert_eq!(code, 200, "reads go on: {body}");
        assert_eq!(body["loop"]["frozen"], true, "from what the replica has: {body}");
    }
    for _ in 0..50 {
        if call_via(&caller, "orders").await != 200 {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "traffic is unharmed without quorum");

    // Quorum back: writes resume without restarting anything.
    etcd.resume(1);
    etcd.resume(2);
    let resumed = Instant::now();
    eventually(Duration::from_secs(30), "writes accepted again", || async {
        let leader = leader_of(&all, &[0, 1], Duration::from_secs(30)).await;
        let (code, _) = all[leader].post("/api/v1/freeze", r#"{"enabled": false}"#).await;
        (code == 200).then_some(())
    })
    .await;
    eprintln!("writes resumed {:?} after quorum returned", resumed.elapsed());
    for replica in &all {
        eventually(Duration::from_secs(10), "every replica sees the freeze lifted", || async {
            (replica.get("/api/v1/status").await["loop"]["frozen"] == false).then_some(())
        })
        .await;
    }
    assert_eq!(call_via(&caller, "orders").await, 200);
}

/// The control URL `proxy` uses now.
async fn connected_to(proxy: &ProxyHandle) -> String {
    proxy.config_dump().await["control"]["current"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_whose_replica_dies_moves_to_another_and_misses_no_change() {
    let etcd = EtcdCluster::start(1).await;
    let all = replicas(&etcd.url(), 2).await;
    leader_of(&all, &[0, 1], Duration::from_secs(20)).await;
    let urls = format!("{},{}", all[0].grpc_url(), all[1].grpc_url());
    let echo = EchoServer::start("orders").await;
    let token = all[0].token("default/orders", "orders").await;
    let _orders = ProxyHandle::start_url(BIN, &urls, Some(&token), "default/orders", "cluster-a", &[], echo.addr).await;
    let token = all[1].token("default/web", "web").await;
    let web = ProxyHandle::start_url(BIN, &urls, Some(&token), "default/web", "cluster-a", &[], free_addr()).await;
    eventually(Duration::from_secs(15), "web reaches orders", || async {
        (call_via(&web, "orders").await == 200).then_some(())
    })
    .await;

    // The replica web's stream is on stops answering (SIGSTOP: its connections stay open, as
    // a host that vanished leaves them); a change is made meanwhile, through the other replica
    // (leading once the stopped one's lease lapsed, if it led); then it dies. Web moves to the
    // other replica and gets the change it missed; calls go on throughout.
    let before = connected_to(&web).await;
    assert!(
        before == all[0].grpc_url() || before == all[1].grpc_url(),
        "web reports the replica it uses: {before:?}"
    );
    let dead = if before == all[0].grpc_url() { 0 } else { 1 };
    let survivor = 1 - dead;
    let mut all = all;
    all[dead].process.signal(nix::sys::signal::Signal::SIGSTOP);
    leader_of(&all, &[survivor], Duration::from_secs(10)).await;
    let (code, applied) = all[survivor].post("/api/v1/resources", POLICY).await;
    assert_eq!(code, 200, "{applied}");
    let revision = applied["revision"].as_u64().unwrap();
    all[dead].process.kill();
    let killed = Instant::now();
    let mut failed = 0;
    let mut calls = 0;
    let moved = loop {
        calls += 1;
        if call_via(&web, "orders").await != 200 {
            failed += 1;
        }
        if connected_to(&web).await == all[survivor].grpc_url() {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "web never moved to the surviving replica"
        );
    };
    eprintln!("proxy moved to the surviving replica after {moved:?}; {failed} of {calls} calls failed meanwhile");
    assert_eq!(failed, 0, "last-known-good config serves every call");
    eventually(
        Duration::from_secs(10),
        "web runs the change made while its replica was down",
        || async { (web.config_dump().await["config"]["revision"].as_u64() >= Some(revision)).then_some(()) },
    )
    .await;
    assert_eq!(call_via(&web, "orders").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_up_ha_runs_three_etcd_members_and_three_replicas_that_all_see_every_proxy() {
    let api = free_addr();
    let data_dir = std::env::temp_dir().join(format!("weft-up-ha-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let config = std::env::temp_dir().join(format!("weft-up-ha-cli-{}.json", std::process::id()));
    let mut up = weft_test::Process::spawn_env(
        BIN,
        "weft-up-ha",
        &[
            "up",
            "--ha",
            "--no-traffic",
            "--api",
            &api.to_string(),
            "--data-dir",
            &data_dir.display().to_string(),
        ]
        .map(String::from),
        &[("WEFT_CONFIG", config.to_str().unwrap())],
    );
    let apis: Vec<String> = eventually(Duration::from_secs(60), "weft up --ha lists its three replicas", || async {
        let log = up.log_text();
        let apis: Vec<String> = log
            .lines()
            .filter(|l| l.trim_start().starts_with("replica r"))
            .filter_map(|l| l.split("API ").nth(1)?.split_whitespace().next().map(String::from))
            .collect();
        (log.contains("weft demo mesh is up") && apis.len() == 3).then_some(apis)
    })
    .await;
    let token = std::fs::read_to_string(data_dir.join("control/admin.token")).unwrap();
    let http = Client::trusting(&std::fs::read_to_string(data_dir.join("control/ca.pem")).unwrap());
    let mut roles = Vec::new();
    for api in &apis {
        let status = eventually(Duration::from_secs(15), "the replica sees all eight proxies", || async {
            let request = hyper::Request::get(format!("{api}/api/v1/status"))
                .header("authorization", format!("Bearer {}", token.trim()))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            let status = http.send(request).await.ok()?.json();
            let proxies: u64 = status["services"]
                .as_array()?
                .iter()
                .filter_map(|s| s["proxies"]["total"].as_u64())
                .sum();
            (proxies == 8).then_some(status)
        })
        .await;
        assert_eq!(status["controlPlane"]["leader"], "r0", "{status}");
        roles.push(status["controlPlane"]["role"].as_str().unwrap().to_string());
    }
    assert_eq!(roles, ["leader", "follower", "follower"]);
    up.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(up.wait(Duration::from_secs(15)), Some(0), "{}", up.log_text());
    let _ = std::fs::remove_dir_all(&data_dir);
    let _ = std::fs::remove_file(&config);
}

/// `orders` (an echo app behind a sidecar) and two callers, `web-a` and `web-b`, each sidecar
/// given every replica's URL; returns once both callers reach orders.
async fn orders_and_two_callers(all: &[Control]) -> (EchoServer, ProxyHandle, Vec<ProxyHandle>) {
    let urls: Vec<String> = all.iter().map(Control::grpc_url).collect();
    let urls = urls.join(",");
    let echo = EchoServer::start("orders").await;
    let token = all[0].token("default/orders", "orders").await;
    let orders = ProxyHandle::start_url(BIN, &urls, Some(&token), "default/orders", "cluster-a", &[], echo.addr).await;
    let mut callers = Vec::new();
    for name in ["web-a", "web-b"] {
        let token = all[0].token(&format!("default/{name}"), name).await;
        callers.push(ProxyHandle::start_url(BIN, &urls, Some(&token), &format!("default/{name}"), "cluster-a", &[], free_addr()).await);
    }
    for caller in &callers {
        eventually(Duration::from_secs(15), "the callers reach orders", || async {
            (call_via(caller, "orders").await == 200).then_some(())
        })
        .await;
    }
    (echo, orders, callers)
}

/// Calls to orders from every caller in turn, until stopped.
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(u32, u32)>,
}

impl Traffic {
    fn start(callers: std::sync::Arc<Vec<ProxyHandle>>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let (mut sent, mut failed) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for caller in callers.iter() {
                        sent += 1;
                        if call_via(caller, "orders").await != 200 {
                            failed += 1;
                        }
                    }
                }
                (sent, failed)
            }
        });
        Self { stop, task }
    }

    /// Stops the calls: (sent, failed).
    async fn stop(self) -> (u32, u32) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

const ROLLOUT: &str = "apiVersion: weft/v1\nkind: Intent\nmetadata: {name: ROLL-1}\nspec:\n  title: staged\n  target: orders\n  change:\n    apply:\n      - apiVersion: weft/v1\n        kind: TrafficPolicy\n        metadata: {name: orders}\n        spec: {service: orders, routes: [{timeout: 3s}]}\n  rollout: {stages: [50, 100], bake: 60s}\n  slo: {minRequests: 100000}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_rollout_rolls_it_back_on_the_next_leader_and_no_request_fails() {
    let etcd = EtcdCluster::start(3).await;
    let mut all = replicas(&etcd.url(), 3).await;
    let leader = leader_of(&all, &[0, 1, 2], Duration::from_secs(20)).await;
    let (_echo, _orders, callers) = orders_and_two_callers(&all).await;
    // The leader knows both callers call orders (those on a follower through the store).
    eventually(Duration::from_secs(30), "the leader sees both callers subscribed", || async {
        let proxies = all[leader].get("/api/v1/proxies").await;
        let subscribed = proxies
            .as_array()?
            .iter()
            .filter(|p| {
                p["subscriptions"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s == "default/orders"))
            })
            .count();
        (subscribed == 2).then_some(())
    })
    .await;
    let stable = Control::revision_of(&all[leader].get("/api/v1/status").await);

    // Traffic from both callers from now to the end.
    let callers = std::sync::Arc::new(callers);
    let traffic = Traffic::start(callers.clone());

    let (code, body) = all[leader].post("/api/v1/intents", ROLLOUT).await;
    assert_eq!(code, 201, "{body}");
    let treated = eventually(Duration::from_secs(30), "the first stage runs on a caller", || async {
        let (status, intent) = all[leader]
            .call_as("GET", "/api/v1/intents/ROLL-1", "", &all[leader].admin_token)
            .await;
        let treated = intent["treated"].as_array()?.clone();
        // Stages count from 0: the first one, on at least one caller.
        (status == 200 && intent["stage"] == 0 && !treated.is_empty()).then_some(treated)
    })
    .await;
    let treated = treated[0].as_str().unwrap().to_string();
    let candidate = callers.iter().find(|c| c.workload == treated).expect("a caller is treated");
    eventually(Duration::from_secs(30), "the treated caller runs the candidate", || async {
        (candidate.config_dump().await["config"]["revision"].as_u64() > Some(stable)).then_some(())
    })
    .await;

    all[leader].process.kill();
    let killed = Instant::now();
    let live: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let next = leader_of(&all, &live, Duration::from_secs(15)).await;
    eprintln!("new leader after {:?}", killed.elapsed());
    let intent = eventually(Duration::from_secs(30), "the new leader rolled the intent back", || async {
        let (_, intent) = all[next].call_as("GET", "/api/v1/intents/ROLL-1", "", &all[next].admin_token).await;
        (intent["phase"] == "rolled-back").then_some(intent)
    })
    .await;
    assert!(intent.to_string().contains("restarted mid-rollout"), "{intent}");
    eventually(Duration::from_secs(30), "every caller is back on the stable revision", || async {
        for caller in callers.iter() {
            if caller.config_dump().await["config"]["revision"].as_u64() != Some(stable) {
                return None;
            }
        }
        Some(())
    })
    .await;
    let (sent, failed) = traffic.stop().await;
    eprintln!("{sent} calls during the rollout, the kill and the rollback; {failed} failed");
    assert!(sent > 20, "{sent}");
    assert_eq!(failed, 0, "not one request fails");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_token_made_on_one_replica_works_on_the_others_and_its_revocation_too() {
    let etcd = EtcdCluster::start(1).await;
    let all = replicas(&etcd.url(), 2).await;
    let viewer = all[0].api_token("ci", "viewer").await;
    let status_with = |replica: &Control, token: String| {
        let replica = replica.url("/api/v1/status");
        let client = all[1].client();
        async move {
            let request = hyper::Request::get(replica)
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            client.send(request).await.unwrap().status
        }
    };
    eventually(Duration::from_secs(5), "the other replica accepts the new token", || async {
        (status_with(&all[1], viewer.clone()).await == 200).then_some(())
    })
    .await;
    let (code, body) = all[1].call_as("DELETE", "/api/v1/admin/tokens/ci", "", &all[1].admin_token).await;
    assert!(code < 300, "{code} {body}");
    eventually(Duration::from_secs(5), "the first replica refuses the revoked token", || async {
        (status_with(&all[0], viewer.clone()).await == 401).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_asked_of_a_follower_runs_on_the_leader_and_the_follower_follows_it() {
    let etcd = EtcdCluster::start(1).await;
    let all = replicas(&etcd.url(), 2).await;
    let leader = leader_of(&all, &[0, 1], Duration::from_secs(20)).await;
    let follower = 1 - leader;
    let before = all[follower].get("/api/v1/ca").await;
    // The follower forwards the rotation to the leader, the one replica that rotates.
    let (code, body) = all[follower].post("/api/v1/ca/rotate", "").await;
    assert_eq!(code, 200, "{body}");
    // With no proxy to wait for, the leader completes the rotation; the follower signs with the
    // new root and trusts what the leader trusts.
    let done = eventually(Duration::from_secs(15), "the leader finished the rotation", || async {
        let ca = all[leader].get("/api/v1/ca").await;
        (ca["rotation"] == "idle" && ca["generation"].as_u64() > before["generation"].as_u64()).then_some(ca)
    })
    .await;
    eventually(Duration::from_secs(10), "the follower holds the leader's roots", || async {
        let ca = all[follower].get("/api/v1/ca").await;
        (ca == done).then_some(())
    })
    .await;
    assert_ne!(done["bundle"], before["bundle"]);
}

/// A change asked of a follower is made by the leader and audited once: by the leader (where
/// it cannot be skipped), naming the follower that forwarded it. Before, the follower and the
/// leader each appended a record for the same change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_forwarded_by_a_follower_is_audited_exactly_once() {
    let etcd = EtcdCluster::start(1).await;
    let all = replicas(&etcd.url(), 2).await;
    let leader = leader_of(&all, &[0, 1], Duration::from_secs(20)).await;
    let follower = 1 - leader;
    let name = all[follower].get("/api/v1/status").await["controlPlane"]["replica"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, applied) = all[follower].post("/api/v1/resources", POLICY).await;
    assert_eq!(code, 200, "{applied}");
    let revision = applied["revision"].as_u64().unwrap();
    // A second change asked of the leader itself: audited once too, with no follower named.
    let (code, _) = all[leader].post("/api/v1/freeze", r#"{"enabled": true}"#).await;
    assert!(code < 300, "{code}");
    for replica in &all {
        let audit = eventually(Duration::from_secs(5), "both changes in the audit", || async {
            let audit = replica.get("/api/v1/audit").await.as_array()?.clone();
            audit.iter().any(|e| e["path"] == "/api/v1/freeze").then_some(audit)
        })
        .await;
        let applies: Vec<&Value> = audit
            .iter()
            .filter(|e| e["path"] == "/api/v1/resources" && e["method"] == "POST")
            .collect();
        assert_eq!(applies.len(), 1, "one record for the forwarded change: {applies:#?}");
        assert_eq!(applies[0]["outcome"]["revision"].as_u64(), Some(revision), "{applies:#?}");
        assert_eq!(applies[0]["status"], 200, "{applies:#?}");
        assert_eq!(applies[0]["forwardedBy"], name.as_str(), "the leader's record names the follower");
        assert!(
            applies[0]["forwardedFor"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{applies:#?}"
        );
        let freezes: Vec<&Value> = audit.iter().filter(|e| e["path"] == "/api/v1/freeze").collect();
        assert_eq!(freezes.len(), 1, "{freezes:#?}");
        assert!(freezes[0].get("forwardedBy").is_none(), "{freezes:#?}");
    }

    // Forwarding headers only a replica may set: a caller's own are stripped. Sent to the
    // leader, they put no made-up follower or address in the ledger; sent to the follower, they
    // do not make it handle the change itself (it forwards, and the record names it).
    for (to, path) in [(leader, "/api/v1/bypass/orders"), (follower, "/api/v1/freeze")] {
        let req = hyper::Request::builder()
            .method("POST")
            .uri(all[to].url(path))
            .header("authorization", format!("Bearer {}", all[to].admin_token))
            .header("x-weft-forwarded-by", "replica-made-up")
            .header("x-weft-forwarded-for", "203.0.113.9:4444")
            .header("x-weft-forwarded-sig", "1.00")
            .body(http_body_util::Full::new(bytes::Bytes::from(r#"{"enabled": false}"#)))
            .unwrap();
        let reply = all[to].client().send(req).await.unwrap();
        assert!(reply.status < 300, "{path}: {} {}", reply.status, reply.text());
    }
    let audit = eventually(Duration::from_secs(5), "the forged calls in the audit", || async {
        let audit = all[leader].get("/api/v1/audit").await.as_array()?.clone();
        let forged: Vec<Value> = audit
            .into_iter()
            .filter(|e| e["path"] == "/api/v1/bypass/orders" || (e["path"] == "/api/v1/freeze" && e.get("forwardedBy").is_some()))
            .collect();
        (forged.len() == 2).then_some(forged)
    })
    .await;
    let text = serde_json::to_string(&audit).unwrap();
    assert!(
        !text.contains("replica-made-up") && !text.contains("203.0.113.9"),
        "no forged forwarding in the ledger: {audit:#?}"
    );
    let freeze = audit.iter().find(|e| e["path"] == "/api/v1/freeze").unwrap();
    assert_eq!(freeze["forwardedBy"], name.as_str(), "the follower forwarded it: {freeze:#}");
}

/// Root rotations one after another, each done by the leader with no proxy to wait for.
const ROTATIONS: usize = 6;

/// Handshakes with every replica in turn until `stop`, each trusting that replica's `ca.pem`
/// as read just before (what the CLI does); returns the handshakes made and the failures.
async fn handshake_until(all: std::sync::Arc<Vec<Control>>, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> (u32, Vec<String>) {
    let (mut made, mut failures) = (0u32, Vec::new());
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for replica in all.iter() {
            made += 1;
            // A new client each time: a new connection, so a new handshake.
            let trusted = replica.ca_pem();
            if let Err(error) = Client::trusting(&trusted).get(&replica.url("/api/v1/status")).await {
                let roots = |pem: &str| pem.matches("BEGIN CERTIFICATE").count();
                let now = replica.ca_pem();
                failures.push(format!(
                    "{}: {error:#} (roots in the file read: {}, now: {}, same file: {})",
                    replica.url(""),
                    roots(&trusted),
                    roots(&now),
                    now == trusted
                ));
            }
        }
    }
    (made, failures)
}

/// Every replica serves a certificate whose root its `ca.pem` names, at every moment of root
/// rotations it follows from the leader: before the fix a follower could issue itself a
/// certificate from the new root between reading the bundle and re-signing, and a client that
/// read ca.pem then saw UnknownIssuer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_root_rotations_every_replica_serves_only_what_its_ca_file_trusts() {
    let etcd = EtcdCluster::start(1).await;
    let all = std::sync::Arc::new(replicas(&etcd.url(), 3).await);
    let leader = leader_of(&all, &[0, 1, 2], Duration::from_secs(20)).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handshakes = tokio::spawn(handshake_until(all.clone(), stop.clone()));
    for _ in 0..ROTATIONS {
        let before = all[leader].get("/api/v1/ca").await["generation"].as_u64().unwrap();
        let (code, body) = all[leader].post("/api/v1/ca/rotate", "").await;
        assert_eq!(code, 200, "{body}");
        for replica in all.iter() {
            eventually(Duration::from_secs(15), "every replica finished the rotation", || async {
                let ca = replica.get("/api/v1/ca").await;
                (ca["rotation"] == "idle" && ca["generation"].as_u64() > Some(before)).then_some(())
            })
            .await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (made, failures) = handshakes.await.unwrap();
    eprintln!(
        "{made} handshakes through {ROTATIONS} rotations on 3 replicas; {} failed",
        failures.len()
    );
    assert!(made as usize > 10 * ROTATIONS, "{made}");
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_sees_the_traffic_of_proxies_connected_to_a_follower() {
    let etcd = EtcdCluster::start(1).await;
    let all = replicas(&etcd.url(), 2).await;
    let leader = leader_of(&all, &[0, 1], Duration::from_secs(20)).await;
    let follower = 1 - leader;
    let echo = EchoServer::start("orders").await;
    let token = all[follower].token("default/orders", "orders").await;
    let url = all[follower].grpc_url();
    let _orders = ProxyHandle::start_url(BIN, &url, Some(&token), "default/orders", "cluster-a", &[], echo.addr).await;
    let token = all[follower].token("default/web", "web").await;
    let web = ProxyHandle::start_url(BIN, &url, Some(&token), "default/web", "cluster-a", &[], free_addr()).await;
    let rps = eventually(Duration::from_secs(20), "the leader counts orders' requests", || async {
        for _ in 0..20 {
            assert_eq!(call_via(&web, "orders").await, 200);
        }
        let status = all[leader].get("/api/v1/status").await;
        let orders = status["services"].as_array()?.iter().find(|s| s["name"] == "orders")?.clone();
        (orders["rps"].as_f64()? > 0.0).then_some(orders["rps"].as_f64()?)
    })
    .await;
    eprintln!("the leader sees orders at {rps} rps, all of it through the follower");
}

/// A proxy for workload `default/NAME` on `control` that reports `version` as its own.
async fn proxy_claiming(control: &Control, name: &str, version: &str) -> ProxyHandle {
    let workload = format!("default/{name}");
    let token = control.token(&workload, name).await;
    let env = [(weft_core::version::TEST_OVERRIDE_ENV, version)];
    ProxyHandle::start_url_env(
        BIN,
        &control.grpc_url(),
        Some(&token),
        &workload,
        "cluster-a",
        &[],
        free_addr(),
        &env,
    )
    .await
}

/// Until `control` lists `proxies` proxies, each with its workload certificate (so that
/// `weft check` has nothing to say but versions).
async fn until_listed(control: &Control, proxies: usize) {
    eventually(
        Duration::from_secs(10),
        "the replica lists every proxy with its certificate",
        || async {
            let listed = control.get("/api/v1/proxies").await;
            let listed = listed.as_array()?;
            (listed.len() == proxies && listed.iter().all(|p| p["certExpiry"].is_u64())).then_some(())
        },
    )
    .await
}

/// The versions `weft check` compares: 0.1.0 for this build, so 0.2.0 is one minor version
/// away (allowed) and 0.3.0 two (flagged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_check_names_a_proxy_more_than_one_minor_version_from_the_replica() {
    assert_eq!(env!("CARGO_PKG_VERSION"), "0.1.0", "the versions below are relative to 0.1.0");
    let etcd = EtcdCluster::start(1).await;
    let all = replicas(&etcd.url(), 2).await;
    leader_of(&all, &[0, 1], Duration::from_secs(20)).await;
    // Proxies that claim other versions (through the test-only override) are on the replica
    // `weft check` does not ask: it knows them through the store.
    let _current = ProxyHandle::start(BIN, &all[0], "default/web", "cluster-a", &[], free_addr()).await;
    let _next = proxy_claiming(&all[1], "next", "0.2.0").await;
    until_listed(&all[0], 2).await;
    // Replica 0 lists both replicas' versions, the other's through the store.
    let mut names: Vec<String> = Vec::new();
    for replica in &all {
        names.push(
            replica.get("/api/v1/status").await["controlPlane"]["replica"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    names.sort();
    let listed = eventually(Duration::from_secs(10), "replica 0 lists both replicas' versions", || async {
        let status = all[0].get("/api/v1/status").await;
        let replicas = status["controlPlane"]["replicas"].as_object()?.clone();
        (replicas.len() == 2).then_some(replicas)
    })
    .await;
    for name in &names {
        assert_eq!(listed[name.as_str()], "0.1.0", "{listed:?}");
    }
    let proxies = all[0].get("/api/v1/proxies").await.to_string();
    assert!(
        proxies.contains("\"version\":\"0.2.0\"") && proxies.contains("\"version\":\"0.1.0\""),
        "{proxies}"
    );
    let check = all[0].cli().arg("check").output().unwrap();
    let out = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(check.status.success(), "one minor version apart is fine: {out}");
    assert!(!out.contains("skew"), "{out}");

    let _skewed = proxy_claiming(&all[1], "future", "0.3.0").await;
    until_listed(&all[0], 3).await;
    let check = all[0].cli().arg("check").output().unwrap();
    let out = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(!check.status.success(), "{out}");
    let skew: Vec<&str> = out.lines().filter(|l| l.contains("version skew")).collect();
    assert_eq!(skew.len(), 2, "only the 0.3.0 proxy is flagged, against each replica: {out}");
    for (line, replica) in skew.iter().zip(&names) {
        assert!(
            line.contains("proxy default/future#") && line.contains(&format!("runs 0.3.0, replica {replica} runs 0.1.0")),
            "the warning names the proxy, the replica and both versions: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_replica_fails_no_request_and_proxies_end_on_the_latest_revision() {
    let etcd = EtcdCluster::start(3).await;
    let mut all = replicas(&etcd.url(), 3).await;
    leader_of(&all, &[0, 1, 2], Duration::from_secs(20)).await;
    let (_echo, orders, callers) = orders_and_two_callers(&all).await;

    // Traffic from both callers from now to the end.
    let callers = std::sync::Arc::new(callers);
    let traffic = Traffic::start(callers.clone());

    // Each replica in turn: SIGTERM, the same ports and flags again, serving before the next.
    // A caller whose stream was on the replica restarted is "hit". Each one is hit at least
    // once: it leaves a replica only when that one goes, and whichever it is on at first goes in
    // its turn. The count confirms the restarts broke streams under the traffic.
    let mut hits = [0; 2];
    for i in 0..3 {
        let url = all[i].grpc_url();
        let mut hit = Vec::new();
        for (c, caller) in callers.iter().enumerate() {
            if connected_to(caller).await == url {
                hit.push(c);
                hits[c] += 1;
            }
        }
        let restarted = Instant::now();
        let restarted_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        all[i].restart_gracefully(Duration::from_secs(15)).await;
        leader_of(&all, &[0, 1, 2], Duration::from_secs(20)).await;
        for &c in &hit {
            eventually(Duration::from_secs(10), "a hit caller has a new stream", || async {
                let now = connected_to(&callers[c]).await;
                let replica = all.iter().find(|r| r.grpc_url() == now)?;
                let listed = replica.get("/api/v1/proxies").await;
                let fresh = listed
                    .as_array()?
                    .iter()
                    .any(|p| p["workload"] == callers[c].workload.as_str() && p["connectedSince"].as_u64() >= Some(restarted_ms));
                fresh.then_some(())
            })
            .await;
        }
        eprintln!(
            "replica {i} restarted (callers hit: {hit:?}), leader agreed after {:?}",
            restarted.elapsed()
        );
    }
    assert!(
        hits.iter().all(|&h| h >= 1),
        "every caller's stream went down at least once: {hits:?}"
    );

    // A change made after the restarts reaches both callers.
    let leader = leader_of(&all, &[0, 1, 2], Duration::from_secs(20)).await;
    let (code, applied) = all[leader].post("/api/v1/resources", POLICY).await;
    assert_eq!(code, 200, "{applied}");
    let revision = applied["revision"].as_u64().unwrap();
    for proxy in callers.iter().chain([&orders]) {
        eventually(
            Duration::from_secs(15),
            "every proxy runs the change made after the restarts",
            || async { (proxy.config_dump().await["config"]["revision"].as_u64() == Some(revision)).then_some(()) },
        )
        .await;
    }
    let (sent, failed) = traffic.stop().await;
    eprintln!("{sent} calls during the rolling restart; {failed} failed");
    assert!(sent > 20, "{sent}");
    assert_eq!(failed, 0, "not one request fails");
}

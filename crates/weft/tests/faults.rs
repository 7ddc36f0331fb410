//! The standing fault suite, control-plane side: what a mesh people can trust promises when its
//! control plane is killed, stopped, or finds its store damaged, and when it pushes change after
//! change under load; each test states the promise and checks weft keeps it with numbers. The
//! data-plane faults live in `faults_dataplane.rs`.
//!
//! Covered elsewhere, not repeated here:
//! - control plane SIGKILLed and restarted under traffic, 0 failed requests and history intact:
//!   `mesh.rs`, `control_plane_restart_loses_no_request_and_no_history`;
//! - a change a proxy NACKs fails its intent and leaves every proxy on last-known-good with 0
//!   failed requests (the control plane's side of a NACK): `intents.rs`,
//!   `a_nacked_change_never_leaves_last_known_good`; the proxy's side, the NACK's reason and
//!   `/config_dump` after it: `mesh.rs`, `refused_config_is_nacked_and_last_known_good_keeps_serving`.
//! - the CA unreachable across a certificate renewal: traffic keeps flowing on the current
//!   certificate and renewal completes when the CA returns: `identity.rs`,
//!   `certificates_renew_at_half_life_and_outlive_a_ca_outage`.

use std::path::Path;
use std::time::{Duration, Instant};
use weft_test::apps::EchoServer;
use weft_test::load::Load;
use weft_test::scripted::ScriptedControl;
use weft_test::{Control, Process, ProxyHandle, eventually, free_addr};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

/// Requests through the caller's sidecar, one every this long.
const LOAD_EVERY: Duration = Duration::from_millis(5);

/// An `orders` echo app behind its sidecar and two callers of it: three real proxies.
struct Mesh {
    orders: EchoServer,
    proxies: Vec<ProxyHandle>,
}

impl Mesh {
    async fn start(control: &Control) -> Self {
        let orders = EchoServer::start("orders").await;
        let app = ProxyHandle::start(BIN, control, "default/orders", "cluster-a", &[("service", "orders")], orders.addr).await;
        let mut proxies = vec![app];
        for caller in ["default/web", "default/mobile"] {
            proxies.push(ProxyHandle::start(BIN, control, caller, "cluster-a", &[], free_addr()).await);
        }
        Self { orders, proxies }
    }

    /// Steady load from each caller to `orders`.
    fn load(&self) -> Vec<Load> {
        self.proxies[1..]
            .iter()
            .map(|p| Load::start(p.outbound, "orders", &[], LOAD_EVERY))
            .collect()
    }

    /// Waits until every proxy is connected to `control` and runs `revision`.
    async fn on_revision(&self, control: &Control, revision: u64, within: Duration) {
        let what = format!("all {} proxies connected on revision {revision}", self.proxies.len());
        eventually(within, &what, || async {
            let proxies = control.get("/api/v1/proxies").await;
            let all = proxies.as_array()?;
            (all.len() == self.proxies.len() && all.iter().all(|p| p["appliedRevision"] == revision)).then_some(())
        })
        .await;
    }
}

/// Stops the loads; asserts every request succeeded and returns how many there were.
async fn no_request_failed(loads: Vec<Load>) -> u64 {
    let mut total = 0;
    for load in loads {
        let stats = load.stop().await;
        assert_eq!(
            stats.failed,
            0,
            "{} of {} requests failed: {:?}",
            stats.failed,
            stats.total(),
            stats.reasons
        );
        total += stats.total();
    }
    total
}

fn policy(timeout_ms: u64) -> String {
    format!(
        "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {{name: orders}}\nspec:\n  service: orders\n  routes:\n    - timeout: {timeout_ms}ms\n"
    )
}

/// A trusted control plane asked to stop stops: it ends its proxies' streams (so they look for
/// it again instead of believing a dead process), releases its store and exits 0 within
/// seconds, and a replacement on the same data directory takes over the same proxies. The
/// proxies keep serving on last-known-good throughout: not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_proxies_connected_exits_promptly_and_the_replacement_takes_over() {
    let mut control = Control::start(BIN).await;
    let mesh = Mesh::start(&control).await;
    let (status, applied) = control.post("/api/v1/resources", &policy(2000)).await;
    assert_eq!((status, applied["revision"].as_u64()), (200, Some(1)), "{applied}");
    mesh.on_revision(&control, 1, Duration::from_secs(15)).await;
    let loads = mesh.load();
    mesh.orders
        .wait_received(mesh.orders.received() + 20, Duration::from_secs(15))
        .await;

    let asked = Instant::now();
    let code = control.process.terminate(Duration::from_secs(5));
    let stopped = asked.elapsed();
    assert_eq!(
        code,
        Some(0),
        "the control plane, with {} proxies connected, had not exited cleanly 5 s after SIGTERM",
        mesh.proxies.len()
    );
    let replacement = Control::start_at(BIN, &control.data_dir, control.api, control.grpc).await;
    let restarted = asked.elapsed();
    mesh.on_revision(&replacement, 1, Duration::from_secs(15)).await;
    let reconnected = asked.elapsed();
    // The replacement's own pushes reach and are ACKed by every proxy.
    let (status, applied) = replacement.post("/api/v1/resources", &policy(3000)).await;
    assert_eq!((status, applied["revision"].as_u64()), (200, Some(2)), "{applied}");
    mesh.on_revision(&replacement, 2, Duration::from_secs(15)).await;
    mesh.orders
        .wait_received(mesh.orders.received() + 20, Duration::from_secs(15))
        .await;
    let total = no_request_failed(loads).await;
    eprintln!(
        "SIGTERM with {} proxies: exited in {:.0} ms; replacement serving at {:.0} ms, every proxy back on it at {:.0} ms; 0 of {total} requests failed",
        mesh.proxies.len(),
        stopped.as_secs_f64() * 1000.0,
        restarted.as_secs_f64() * 1000.0,
        reconnected.as_secs_f64() * 1000.0
    );
}

/// A trusted mesh takes change after change without dropping traffic: 100 config pushes in a
/// row, each ACKed by every proxy that enforces it before the next, while the callers send
/// steady load; not one request fails and every proxy ends on the last revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_pushes_in_a_row_under_load_fail_no_request() {
    let control = Control::start(BIN).await;
    let mesh = Mesh::start(&control).await;
    let loads = mesh.load();
    mesh.orders
        .wait_received(mesh.orders.received() + 20, Duration::from_secs(15))
        .await;
    let started = Instant::now();
    for i in 1..=100u64 {
        let (status, applied) = control.post("/api/v1/resources", &policy(2000 + i)).await;
        assert_eq!((status, applied["revision"].as_u64()), (200, Some(i)), "push {i}: {applied}");
    }
    let pushed = started.elapsed();
    mesh.on_revision(&control, 100, Duration::from_secs(15)).await;
    for caller in &mesh.proxies[1..] {
        let dump = caller.config_dump().await;
        assert_eq!(dump["config"]["revision"], 100, "{}: {dump}", caller.workload);
    }
    let total = no_request_failed(loads).await;
    eprintln!(
        "100 pushes in {:.1} s ({:.0} ms each); 0 of {total} requests failed",
        pushed.as_secs_f64(),
        pushed.as_secs_f64() * 10.0
    );
}

/// A trusted mesh never runs a config its proxies cannot apply, and a refused push costs no
/// traffic: pushed a config no proxy can apply (here an endpoint address that is not one, which
/// the real control plane never sends), every proxy NACKs it naming the field and value, and all
/// keep serving on last-known-good under steady load; not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_push_nacked_by_every_proxy_keeps_last_known_good_serving() {
    use weft_api::proto::{self, proxy_message::Msg};
    let echo = EchoServer::start("echo").await;
    let config = |version: u64, address: String| proto::ProxyConfig {
        version,
        revision: version,
        services: vec![proto::Service {
            name: "echo".into(),
            namespace: "default".into(),
            endpoints: vec![proto::Endpoint {
                address,
                cluster: "cluster-a".into(),
                workload: "default/echo".into(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut scripted = ScriptedControl::start(vec![config(1, echo.addr.to_string())]).await;
    let mut callers = Vec::new();
    for i in 0..3 {
        let workload = format!("default/web-{i}");
        callers.push(ProxyHandle::start_url(BIN, &scripted.url, None, &workload, "cluster-a", &[], free_addr()).await);
    }
    // Every proxy ACKed the good config.
    let mut acked = std::collections::BTreeSet::new();
    while acked.len() < callers.len() {
        if let (stream, Msg::Ack(a)) = scripted.next().await {
            assert_eq!(a.version, 1);
            acked.insert(stream);
        }
    }
    let loads: Vec<Load> = callers.iter().map(|p| Load::start(p.outbound, "echo", &[], LOAD_EVERY)).collect();
    echo.wait_received(echo.received() + 20, Duration::from_secs(15)).await;

    scripted.push(config(2, "not-an-address".into()));
    let mut nacked = std::collections::BTreeSet::new();
    while nacked.len() < callers.len() {
        match scripted.next().await {
            (stream, Msg::Nack(n)) => {
                assert_eq!(n.version, 2);
                assert!(
                    n.reason.contains("services[0].endpoints[0].address") && n.reason.contains("not-an-address"),
                    "{}",
                    n.reason
                );
                nacked.insert(stream);
            }
            (_, Msg::Ack(a)) => panic!("a proxy applied the bad config: {a:?}"),
            _ => {}
        }
    }
    // Traffic goes on after every NACK, on the config each proxy kept.
    echo.wait_received(echo.received() + 50, Duration::from_secs(15)).await;
    for caller in &callers {
        let dump = caller.config_dump().await;
        assert_eq!(dump["config"]["version"], 1, "{}: {dump}", caller.workload);
        assert!(dump["lastNack"].as_str().is_some_and(|r| r.contains("not-an-address")), "{dump}");
    }
    let total = no_request_failed(loads).await;
    eprintln!("bad push NACKed by all {} proxies; 0 of {total} requests failed", callers.len());
}

/// A store file damaged the way disks and operators damage files.
#[derive(Clone, Copy, Debug)]
enum Damage {
    Empty,
    Truncated,
    RandomBytes,
    Missing,
}

impl Damage {
    fn apply(self, store: &Path) {
        match self {
            Damage::Empty => std::fs::write(store, b"").unwrap(),
            Damage::Truncated => {
                let bytes = std::fs::read(store).unwrap();
                std::fs::write(store, &bytes[..bytes.len() / 2]).unwrap();
            }
            Damage::RandomBytes => {
                let len = std::fs::metadata(store).unwrap().len() as usize;
                std::fs::write(store, (0..len).map(|_| rand::random::<u8>()).collect::<Vec<_>>()).unwrap();
            }
            Damage::Missing => std::fs::remove_file(store).unwrap(),
        }
    }

    /// What the refusal must say is wrong with the file.
    fn problem(self) -> &'static str {
        match self {
            Damage::Empty => "is unreadable: the file is empty (0 bytes)",
            Damage::Truncated => "is unreadable: DB corrupted: File truncated",
            Damage::RandomBytes => "is unreadable: I/O error: Not a redb database",
            Damage::Missing => "is missing but ca.pem beside it",
        }
    }
}

/// Every file in `dir` with its contents.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

/// Starts `weft control` on `dir` on ports of its own choosing.
fn control_on(dir: &Path, extra: &[&str]) -> Process {
    let mut args: Vec<String> = [
        "control",
        "--data-dir",
        &dir.display().to_string(),
        "--api",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    Process::spawn(BIN, "control", &args)
}

/// A trusted control plane never forgets its mesh silently: a store that is empty, truncated,
/// random bytes, or gone while the rest of its data directory remains makes `weft control` exit
/// 1 with an error naming the file, what is wrong and the flag that starts over, and leaves
/// every file as it was. `--reinit-store` starts an empty mesh and keeps the damaged file aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_lost_store_refuses_to_start_and_changes_nothing() {
    // A store with history: one applied policy.
    let mut control = Control::start(BIN).await;
    let (status, applied) = control.post("/api/v1/resources", &policy(2000)).await;
    assert_eq!((status, applied["revision"].as_u64()), (200, Some(1)), "{applied}");
    assert_eq!(control.process.terminate(Duration::from_secs(5)), Some(0));
    let healthy = control.data_dir.clone();

    for damage in [Damage::Empty, Damage::Truncated, Damage::RandomBytes, Damage::Missing] {
        let dir = std::env::temp_dir().join(format!("weft-faults-{}-{damage:?}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in snapshot(&healthy) {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let store = dir.join("weft.redb");
        damage.apply(&store);
        let before = snapshot(&dir);

        let mut process = control_on(&dir, &[]);
        let code = process.wait(Duration::from_secs(10));
        let log = process.log_text();
        assert_eq!(code, Some(1), "{damage:?}: weft control must refuse at once:\n{log}");
        let path = store.display().to_string();
        assert!(
            log.contains(&format!("the store {path} {}", damage.problem())) && log.contains("--reinit-store"),
            "{damage:?}: the error names the file, the problem and the flag:\n{log}"
        );
        assert_eq!(snapshot(&dir), before, "{damage:?}: the data directory is untouched");

        // Starting over is explicit, and keeps the old file.
        let mut process = control_on(&dir, &["--reinit-store"]);
        eventually(Duration::from_secs(10), "--reinit-store serving (or exited)", || {
            let (log, running) = (process.log_text(), process.is_running());
            async move { (log.contains("control plane listening") || !running).then_some(()) }
        })
        .await;
        assert!(process.is_running(), "{damage:?}: --reinit-store starts:\n{}", process.log_text());
        assert_eq!(process.terminate(Duration::from_secs(5)), Some(0));
        let kept: Vec<Vec<u8>> = snapshot(&dir)
            .into_iter()
            .filter(|(name, _)| name.starts_with("weft.redb.broken-"))
            .map(|(_, bytes)| bytes)
            .collect();
        let expected: Vec<Vec<u8>> = before.get("weft.redb").cloned().into_iter().collect();
        assert_eq!(kept, expected, "{damage:?}: the old store is kept aside byte for byte");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // A directory that never held a store still initialises (every other test starts so).
    let _ = std::fs::remove_dir_all(&healthy);
}

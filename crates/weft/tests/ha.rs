//! The control plane on etcd (`--store etcd://...`) and the operator switches that outlive a
//! restart: real etcd members (Debian's etcd-server), real control-plane processes.

use serde_json::Value;
use weft_test::Control;
use weft_test::etcd::EtcdCluster;

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

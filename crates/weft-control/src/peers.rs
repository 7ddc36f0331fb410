//! What replicas on one etcd store tell each other, through the store:
//!
//! - `P/proxies/REPLICA`: the proxies connected to that replica ([`PeerProxy`], JSON), under a
//!   lease of the replica's own, so the list vanishes within [`PRESENCE_TTL`] when the replica
//!   dies. Every replica merges the others' lists into its registry: endpoints are planned from
//!   every proxy whichever replica it is connected to, and the leader stages, counts ACKs and
//!   NACKs over all of them.
//! - `P/versions/REPLICA`: that replica's build version, written with its proxies under the
//!   same lease, so that any replica's status lists every live replica's version.
//! - `P/telemetry/REPLICA`: the telemetry reports a follower received since its last write,
//!   replaced every [`TICK`]. The leader files each one into its signals as if the proxy were
//!   its own, so it judges intents on every proxy's traffic.
//!
//! One write per replica per tick at most (none when nothing changed), whatever the number of
//! proxies.

use crate::etcd::{self, Change};
use crate::mesh::Mesh;
use crate::registry::{ForwardedReport, PeerProxy};
use crate::store::{Store, StoreError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_core::Shutdown;

/// How often a replica publishes its proxies (when they changed) and its telemetry.
const TICK: Duration = Duration::from_millis(250);
/// How long a dead replica's proxies stay listed.
const PRESENCE_TTL: Duration = Duration::from_secs(5);
/// A replica republishes an unchanged list this often (its lease is renewed every tick).
const REFRESH: Duration = Duration::from_secs(30);

/// Publishes this replica's proxies and forwards its telemetry until shutdown.
pub(crate) async fn publish(mesh: Arc<Mesh>, shutdown: Shutdown) {
    if !matches!(*mesh.store, Store::Etcd(_)) {
        return;
    }
    let mut state = Published::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.cancelled() => return,
        }
        let m = mesh.clone();
        state = tokio::task::spawn_blocking(move || round(&m, state)).await.unwrap_or_default();
    }
}

/// What was last published, and under which lease.
#[derive(Default)]
struct Published {
    lease: Option<i64>,
    proxies: Option<Vec<PeerProxy>>,
    at: Option<Instant>,
}

fn round(mesh: &Mesh, mut state: Published) -> Published {
    let Store::Etcd(store) = &*mesh.store else {
        return state;
    };
    let outcome = (|| -> Result<(), StoreError> {
        let lease = match state.lease {
            Some(lease) if store.etcd.keep_alive(lease, TICK * 2)? > 0 => lease,
            _ => {
                state.proxies = None;
                let lease = store.etcd.grant(PRESENCE_TTL)?;
                state.lease = Some(lease);
                lease
            }
        };
        let proxies = mesh.local_proxies();
        let stale = state.at.is_none_or(|at| at.elapsed() > REFRESH);
        if state.proxies.as_ref() != Some(&proxies) || stale {
            let json = serde_json::to_string(&proxies).expect("serializes");
            let key = store.key(&format!("proxies/{}", mesh.replica));
            let version = store.key(&format!("versions/{}", mesh.replica));
            let puts = vec![
                etcd::put_leased(&key, &json, lease),
                etcd::put_leased(&version, &weft_core::version::version(), lease),
            ];
            store.etcd.txn(Vec::new(), puts)?;
            state.proxies = Some(proxies);
            state.at = Some(Instant::now());
        }
        let reports = mesh.take_outbox();
        if !reports.is_empty() {
            let json = serde_json::to_string(&reports).expect("serializes");
            let key = store.key(&format!("telemetry/{}", mesh.replica));
            store.etcd.txn(Vec::new(), vec![etcd::put_leased(&key, &json, lease)])?;
        }
        Ok(())
    })();
    if let Err(error) = outcome {
        tracing::debug!(%error, "cannot publish this replica's proxies; retrying");
        state.lease = None;
    }
    state
}

/// Acts on a change another replica published; returns whether it was one of these keys.
pub(crate) fn receive(mesh: &Mesh, prefix: &str, change: &Change) -> bool {
    let Some(rest) = change.kv.key.strip_prefix(prefix) else {
        return false;
    };
    if let Some(replica) = rest.strip_prefix("proxies/") {
        if replica != mesh.replica {
            let proxies = if change.deleted {
                Vec::new()
            } else {
                serde_json::from_str(&change.kv.value).unwrap_or_default()
            };
            mesh.set_peer(replica, proxies);
        }
        return true;
    }
    if let Some(replica) = rest.strip_prefix("versions/") {
        if replica != mesh.replica {
            mesh.set_peer_version(replica, (!change.deleted).then(|| change.kv.value.clone()));
        }
        return true;
    }
    if let Some(replica) = rest.strip_prefix("telemetry/") {
        if replica != mesh.replica && !change.deleted && mesh.leading() {
            let reports: Vec<ForwardedReport> = serde_json::from_str(&change.kv.value).unwrap_or_default();
            mesh.peer_telemetry(reports);
        }
        return true;
    }
    false
}

/// Every other replica's proxies and version as stored now (at start; the watch keeps them
/// current).
pub(crate) fn load(mesh: &Mesh) -> Result<(), StoreError> {
    let Store::Etcd(store) = &*mesh.store else {
        return Ok(());
    };
    let prefix = store.key("proxies/");
    for kv in store.etcd.list(&prefix, None)? {
        let replica = kv.key.trim_start_matches(&prefix);
        if replica != mesh.replica {
            mesh.set_peer(replica, serde_json::from_str(&kv.value).unwrap_or_default());
        }
    }
    let prefix = store.key("versions/");
    for kv in store.etcd.list(&prefix, None)? {
        let replica = kv.key.trim_start_matches(&prefix);
        if replica != mesh.replica {
            mesh.set_peer_version(replica, Some(kv.value));
        }
    }
    Ok(())
}

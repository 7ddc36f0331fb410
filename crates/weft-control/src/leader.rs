//! One leader among the replicas on an etcd store. Every replica serves the API and its
//! proxies' streams; the leader alone runs the intent loop and root rotation and changes the
//! mesh (a follower refuses changes with 503 naming the leader).
//!
//! Election: the replica that creates `P/leader` under a lease of its own leads until the lease
//! lapses; it renews the lease every [`LEASE_TTL`]/5 and steps down as soon as a renewal fails
//! or the last one is older than [`STEP_DOWN`], before etcd can let the lease lapse and elect
//! another. Every write it makes as leader compares the key's creation revision (the fence in
//! [`crate::store`]), so a leader deposed without noticing writes nothing. Followers poll the key
//! and try to create it once it is gone, so a new leader acts within the lease's TTL of the old
//! one's last renewal.
//!
//! The record names the leader's API too, where followers forward the changes asked of them
//! ([`crate::api`]).
//!
//! Followers watch the store and reload the machine from it after every change, so their proxies
//! are planned from the leader's intents and stages.

use crate::mesh::Mesh;
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_core::Shutdown;

/// The leader's lease: how long after its last renewal another replica may take over.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often the leader renews its lease, and followers look at the election key.
const TICK: Duration = Duration::from_millis(300);
/// A leader whose last renewal is this old stops acting (checked on every action, not only by
/// the election loop, which may itself be starved): its lease may lapse any moment.
const STEP_DOWN: Duration = Duration::from_millis(2200);
/// How long one renewal may take (a leader without quorum must notice well within the TTL).
const RENEW_TIMEOUT: Duration = Duration::from_millis(1000);

/// What the election key holds.
#[derive(Debug, Serialize, Deserialize)]
struct LeaderRecord {
    replica: String,
    /// The leader's API URL (absent when it is bound to a wildcard address, or from a replica
    /// of a version before forwarding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api: Option<String>,
}

/// This replica's standing in the election.
enum Standing {
    Following,
    /// Leading under `lease`, last renewed at `renewed`.
    Leading {
        lease: i64,
        renewed: Instant,
    },
}

/// Runs the election until shutdown (a leader revokes its lease on the way out, so the next
/// one takes over at once). Nothing to do on the embedded store.
pub(crate) async fn run(mesh: Arc<Mesh>, shutdown: Shutdown) {
    if !matches!(*mesh.store, Store::Etcd(_)) {
        return;
    }
    let mut standing = Standing::Following;
    loop {
        let m = mesh.clone();
        // etcd calls block (up to the request timeout without quorum): off the async workers.
        standing = match tokio::task::spawn_blocking(move || round(&m, standing)).await {
            Ok(next) => next,
            Err(_) => Standing::Following,
        };
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.cancelled() => {
                if let Standing::Leading { lease, .. } = standing {
                    mesh.follow(None);
                    let mesh = mesh.clone();
                    let _ = tokio::task::spawn_blocking(move || revoke(&mesh, lease)).await;
                }
                return;
            }
        }
    }
}

/// Watches the store: other replicas' proxies and telemetry go to [`crate::peers`], API token
/// changes to the API's cache; any other change reloads a follower's machine.
pub(crate) async fn follow_store(mesh: Arc<Mesh>, shutdown: Shutdown) {
    let Store::Etcd(store) = &*mesh.store else {
        return;
    };
    let (tx, mut changes) = tokio::sync::mpsc::channel(64);
    let from = store.etcd.revision().unwrap_or(0);
    store.etcd.watch_prefix(&store.prefix, from, tx);
    // Whatever changed between loading the machine and starting the watch.
    let m = mesh.clone();
    if let Ok(Err(error)) = tokio::task::spawn_blocking(move || crate::peers::load(&m)).await {
        tracing::warn!(%error, "cannot read the other replicas' proxies; the watch brings them");
    }
    reload(&mesh).await;
    loop {
        let first = tokio::select! {
            batch = changes.recv() => match batch {
                Some(batch) => batch,
                None => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let mut batch = first;
        while let Ok(more) = changes.try_recv() {
            batch.extend(more);
        }
        let mut stale = false;
        for change in &batch {
            let key = &change.kv.key;
            if key.starts_with(&store.key("api_tokens/")) {
                mesh.tokens_changed.notify_one();
            } else if !crate::peers::receive(&mesh, &store.prefix, change) && !key.starts_with(&store.key("ledger/")) {
                stale = true;
            }
        }
        if stale {
            reload(&mesh).await;
        }
    }
}

async fn reload(mesh: &Arc<Mesh>) {
    let m = mesh.clone();
    if let Ok(Err(error)) = tokio::task::spawn_blocking(move || m.reload()).await {
        tracing::warn!(%error, "cannot reload the mesh from the store; keeping the last one read");
    }
}

/// One tick of the election.
fn round(mesh: &Mesh, standing: Standing) -> Standing {
    let Store::Etcd(store) = &*mesh.store else {
        return standing;
    };
    match standing {
        Standing::Leading { lease, renewed } => match store.etcd.keep_alive(lease, RENEW_TIMEOUT) {
            Ok(ttl) if ttl > 0 => {
                let renewed = Instant::now();
                mesh.renewed(renewed + STEP_DOWN);
                Standing::Leading { lease, renewed }
            }
            outcome => {
                if renewed.elapsed() < STEP_DOWN && outcome.is_err() {
                    return Standing::Leading { lease, renewed };
                }
                tracing::warn!(replica = %mesh.replica, ?outcome, "lost the leader's lease; stepping down");
                mesh.follow(None);
                store.set_fence(None);
                Standing::Following
            }
        },
        Standing::Following => match try_lead(mesh) {
            Ok(Some(lease)) => Standing::Leading {
                lease,
                renewed: Instant::now(),
            },
            Ok(None) => Standing::Following,
            Err(error) => {
                tracing::debug!(%error, "election round failed");
                mesh.follow(None);
                Standing::Following
            }
        },
    }
}

/// Takes the lead if nobody holds it; returns the lease when elected.
fn try_lead(mesh: &Mesh) -> Result<Option<i64>, crate::store::StoreError> {
    let Store::Etcd(store) = &*mesh.store else {
        return Ok(None);
    };
    let key = store.key("leader");
    if let Some(kv) = store.etcd.get(&key, false)? {
        let leader = serde_json::from_str::<LeaderRecord>(&kv.value).unwrap_or(LeaderRecord {
            replica: kv.value,
            api: None,
        });
        *mesh.leader_api.lock() = leader.api;
        mesh.follow(Some(leader.replica));
        return Ok(None);
    }
    let lease = store.etcd.grant(LEASE_TTL)?;
    let record = serde_json::to_string(&LeaderRecord {
        replica: mesh.replica.clone(),
        api: mesh.api_url.clone(),
    })
    .expect("serializes");
    let (won, created) = store.etcd.txn(
        vec![crate::etcd::mod_is(&key, 0)],
        vec![crate::etcd::put_leased(&key, &record, lease)],
    )?;
    if !won {
        let _ = store.etcd.revoke(lease);
        return Ok(None);
    }
    store.set_fence(Some((key, created)));
    if let Err(error) = mesh.lead(Instant::now() + STEP_DOWN) {
        tracing::error!(%error, "elected but cannot take the mesh over; stepping down");
        store.set_fence(None);
        mesh.follow(None);
        let _ = store.etcd.revoke(lease);
        return Err(error);
    }
    tracing::info!(replica = %mesh.replica, "elected leader");
    Ok(Some(lease))
}

fn revoke(mesh: &Mesh, lease: i64) {
    if let Store::Etcd(store) = &*mesh.store {
        store.set_fence(None);
        if let Err(error) = store.etcd.revoke(lease) {
            tracing::warn!(%error, "cannot revoke the leader's lease; another replica takes over when it lapses");
        }
    }
}

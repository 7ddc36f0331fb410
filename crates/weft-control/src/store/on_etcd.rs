//! The store on etcd (`--store etcd://...`): the same records as the embedded store, one key
//! each under the store prefix, shared by every replica. Keys (numbers zero-padded to 20 digits
//! so that key order is number order):
//!
//! | key | value |
//! | --- | --- |
//! | `P/revisions/N` | a [`Revision`] (JSON) |
//! | `P/meta/next_revision`, `P/meta/stable` | numbers |
//! | `P/intents/SEQ` | an intent record (JSON) |
//! | `P/ledger/N` | an operator action (JSON) |
//! | `P/secrets/NAME`, `P/api_tokens/NAME`, `P/tokens/ID`, `P/state/NAME` | as in redb |
//! | `P/vips/services/NS/NAME` | a service's virtual IP |
//! | `P/vips/addresses/A.B.C.D` | the service (`NS/NAME`) holding that address |
//! | `P/leader` | the leader's replica name, under its lease ([`crate::leader`]) |
//!
//! Every write that depends on what was read is one transaction comparing the keys it read by
//! their etcd revision, so two replicas never both create revision N: the second is refused with
//! [`StoreError::Conflict`]. While this replica leads, its writes also compare the election
//! key's creation revision ([`EtcdStore::fence`]): a deposed leader's write fails.

use super::{Claim, Revision, StoreError, TokenRecord, TokenRefusal, db_err, decode};
use crate::etcd::{self, Etcd, Kv, StoreTls, pb};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use weft_api::{Resource, ResourceKey};

/// How often a write whose compare failed only because of a concurrent unrelated write (the
/// ledger's next number, a reservation) is retried.
const RETRIES: usize = 20;

pub(crate) struct EtcdStore {
    pub(crate) etcd: Etcd,
    /// Every key starts with it; ends with `/`.
    pub(crate) prefix: String,
    /// The etcd revision of `meta/stable` as this replica last read or wrote it: a commit on a
    /// mesh another replica changed since is refused.
    stable_seen: Mutex<i64>,
    /// While leading: the election key and its creation revision, compared by leader writes.
    fence: Mutex<Option<(String, i64)>>,
}

fn number(n: u64) -> String {
    format!("{n:020}")
}

impl EtcdStore {
    pub(crate) fn connect(url: &str, prefix: &str, tls: Option<&StoreTls>) -> Result<Self, StoreError> {
        let etcd = Etcd::connect(url, tls)?;
        let prefix = format!("{}/", prefix.trim_end_matches('/'));
        Ok(Self {
            etcd,
            prefix,
            stable_seen: Mutex::new(0),
            fence: Mutex::new(None),
        })
    }

    pub(crate) fn describe(&self) -> String {
        format!("{} (prefix {})", self.etcd.url, self.prefix)
    }

    pub(crate) fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// Makes every later leader write compare `key`'s creation revision (or stop comparing).
    pub(crate) fn set_fence(&self, fence: Option<(String, i64)>) {
        *self.fence.lock() = fence;
    }

    fn fence_compares(&self) -> Vec<pb::Compare> {
        self.fence
            .lock()
            .iter()
            .map(|(key, created)| etcd::created_at(key, *created))
            .collect()
    }

    /// Why a fenced transaction failed when none of its own compares explain it.
    fn check_fence(&self) -> Result<(), StoreError> {
        let Some((key, created)) = self.fence.lock().clone() else {
            return Ok(());
        };
        match self.etcd.get(&key, false)? {
            Some(kv) if kv.create_revision == created => Ok(()),
            Some(kv) => Err(StoreError::Fenced(format!("{key} now names {}", kv.value))),
            None => Err(StoreError::Fenced(format!("{key} lapsed"))),
        }
    }

    /// Writes `ops` as the leader: fails with [`StoreError::Fenced`] once deposed.
    fn leader_write(&self, ops: Vec<pb::RequestOp>) -> Result<i64, StoreError> {
        let (ok, revision) = self.etcd.txn(self.fence_compares(), ops)?;
        if !ok {
            self.check_fence()?;
            return Err(StoreError::Fenced("the election key changed".into()));
        }
        Ok(revision)
    }

    fn get_number(&self, rest: &str) -> Result<(Option<u64>, i64), StoreError> {
        match self.etcd.get(&self.key(rest), false)? {
            Some(kv) => Ok((Some(kv.value.parse().map_err(db_err)?), kv.mod_revision)),
            None => Ok((None, 0)),
        }
    }

    fn decode_revision(kv: &Kv) -> Result<Revision, StoreError> {
        let n = kv.key.rsplit('/').next().and_then(|n| n.parse().ok()).unwrap_or(0);
        decode(n, &kv.value)
    }

    pub(crate) fn latest(&self) -> Result<Option<Revision>, StoreError> {
        let newest = self.etcd.list(&self.key("revisions/"), Some(1))?;
        newest.first().map(Self::decode_revision).transpose()
    }

    pub(crate) fn get(&self, revision: u64) -> Result<Option<Revision>, StoreError> {
        let kv = self.etcd.get(&self.key(&format!("revisions/{}", number(revision))), true)?;
        kv.as_ref().map(Self::decode_revision).transpose()
    }

    pub(crate) fn history(&self) -> Result<Vec<Revision>, StoreError> {
        self.etcd
            .list(&self.key("revisions/"), None)?
            .iter()
            .map(Self::decode_revision)
            .collect()
    }

    /// Reserves the next revision number: one transaction comparing `meta/next_revision` with
    /// what was read, retried when another replica reserved in between.
    pub(crate) fn reserve(&self) -> Result<u64, StoreError> {
        for _ in 0..RETRIES {
            let (reserved, seen) = self.get_number("meta/next_revision")?;
            let latest = self.latest()?.map(|r| r.revision).unwrap_or(0);
            let next = reserved.unwrap_or(1).max(latest + 1);
            let mut compare = self.fence_compares();
            compare.push(etcd::mod_is(&self.key("meta/next_revision"), seen));
            let (ok, _) = self
                .etcd
                .txn(compare, vec![etcd::put(&self.key("meta/next_revision"), &(next + 1).to_string())])?;
            if ok {
                return Ok(next);
            }
            self.check_fence()?;
        }
        Err(StoreError::Conflict(format!(
            "could not reserve a revision in {RETRIES} tries: other replicas keep reserving"
        )))
    }

    pub(crate) fn stable(&self) -> Result<Option<u64>, StoreError> {
        let (stable, seen) = self.get_number("meta/stable")?;
        *self.stable_seen.lock() = seen;
        Ok(stable)
    }

    /// Records revision `wanted` (or a fresh number when `wanted` is not newer than the latest)
    /// and makes it stable, in one transaction that holds only if nobody created that revision
    /// nor moved `meta/stable` since this replica read it.
    pub(crate) fn commit_at(
        &self,
        wanted: u64,
        summary: String,
        changes: Vec<super::ChangeEntry>,
        resources: &BTreeMap<ResourceKey, Resource>,
    ) -> Result<Revision, StoreError> {
        let latest = self.latest()?.map(|r| r.revision).unwrap_or(0);
        let next = if wanted > latest { wanted } else { self.reserve()? };
        let rev = Revision {
            revision: next,
            time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            summary,
            changes,
            resources: resources.values().cloned().collect(),
        };
        let json = serde_json::to_string(&rev).map_err(db_err)?;
        let key = self.key(&format!("revisions/{}", number(next)));
        for _ in 0..RETRIES {
            let (reserved, reserved_seen) = self.get_number("meta/next_revision")?;
            let stable_seen = *self.stable_seen.lock();
            let mut compare = self.fence_compares();
            compare.push(etcd::mod_is(&key, 0));
            compare.push(etcd::mod_is(&self.key("meta/stable"), stable_seen));
            compare.push(etcd::mod_is(&self.key("meta/next_revision"), reserved_seen));
            let ops = vec![
                etcd::put(&key, &json),
                etcd::put(&self.key("meta/stable"), &next.to_string()),
                etcd::put(&self.key("meta/next_revision"), &reserved.unwrap_or(1).max(next + 1).to_string()),
            ];
            let (ok, revision) = self.etcd.txn(compare, ops)?;
            if ok {
                *self.stable_seen.lock() = revision;
                return Ok(rev);
            }
            if self.etcd.get(&key, false)?.is_some() {
                return Err(StoreError::Conflict(format!(
                    "revision {next} was created by another replica first; this one was not stored"
                )));
            }
            let (stable, now) = self.get_number("meta/stable")?;
            if now != stable_seen {
                return Err(StoreError::Conflict(format!(
                    "another replica made revision {} stable since this one read the mesh; revision {next} was not stored",
                    stable.unwrap_or(0)
                )));
            }
            self.check_fence()?;
        }
        Err(StoreError::Conflict(format!(
            "revision {next} was not stored: other replicas kept reserving"
        )))
    }

    fn get_string(&self, rest: &str) -> Result<Option<String>, StoreError> {
        Ok(self.etcd.get(&self.key(rest), true)?.map(|kv| kv.value))
    }

    fn put_string(&self, rest: &str, value: &str) -> Result<(), StoreError> {
        self.etcd.txn(Vec::new(), vec![etcd::put(&self.key(rest), value)])?;
        Ok(())
    }

    fn values(&self, rest: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.etcd.list(&self.key(rest), None)?.into_iter().map(|kv| kv.value).collect())
    }

    pub(crate) fn secret(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.get_string(&format!("secrets/{name}"))
    }

    /// CA material changes only on the leader (rotation), so the write is fenced.
    pub(crate) fn put_secret(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.leader_write(vec![etcd::put(&self.key(&format!("secrets/{name}")), value)])?;
        Ok(())
    }

    /// Replicas starting at once agree on one root: the first to create it wins.
    pub(crate) fn create_secret(&self, name: &str, value: &str) -> Result<String, StoreError> {
        let key = self.key(&format!("secrets/{name}"));
        let (ok, _) = self.etcd.txn(vec![etcd::mod_is(&key, 0)], vec![etcd::put(&key, value)])?;
        if ok {
            return Ok(value.to_string());
        }
        Ok(self.etcd.get(&key, false)?.map(|kv| kv.value).unwrap_or_else(|| value.to_string()))
    }

    pub(crate) fn vips(&self) -> Result<Vec<(String, Ipv4Addr)>, StoreError> {
        let prefix = self.key("vips/services/");
        let mut out = Vec::new();
        for kv in self.etcd.list(&prefix, None)? {
            let ip = kv.value.parse::<Ipv4Addr>().map_err(db_err)?;
            out.push((kv.key[prefix.len()..].to_string(), ip));
        }
        Ok(out)
    }

    /// Both keys are created in one transaction only if neither exists, so two replicas never
    /// give one address to two services, nor two addresses to one. Not fenced: any replica
    /// plans, so any replica may claim, and the first claim wins.
    pub(crate) fn claim_vip(&self, service: &str, ip: Ipv4Addr) -> Result<Claim, StoreError> {
        let by_service = self.key(&format!("vips/services/{service}"));
        let by_address = self.key(&format!("vips/addresses/{ip}"));
        let compare = vec![etcd::mod_is(&by_service, 0), etcd::mod_is(&by_address, 0)];
        let (ok, _) = self.etcd.txn(
            compare,
            vec![etcd::put(&by_service, &ip.to_string()), etcd::put(&by_address, service)],
        )?;
        if ok {
            return Ok(Claim::Claimed);
        }
        match self.etcd.get(&by_service, false)? {
            Some(kv) => Ok(Claim::Held(kv.value.parse().map_err(db_err)?)),
            None => Ok(Claim::Taken),
        }
    }

    pub(crate) fn state(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.get_string(&format!("state/{name}"))
    }

    /// Freeze and bypass are the leader's to change: fenced.
    pub(crate) fn put_state(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.leader_write(vec![etcd::put(&self.key(&format!("state/{name}")), value)])?;
        Ok(())
    }

    pub(crate) fn api_tokens(&self) -> Result<Vec<String>, StoreError> {
        self.values("api_tokens/")
    }

    pub(crate) fn put_api_token(&self, name: &str, json: &str) -> Result<(), StoreError> {
        self.put_string(&format!("api_tokens/{name}"), json)
    }

    pub(crate) fn delete_api_token(&self, name: &str) -> Result<(), StoreError> {
        self.etcd
            .txn(Vec::new(), vec![etcd::delete(&self.key(&format!("api_tokens/{name}")))])?;
        Ok(())
    }

    /// Intent records are the leader's: fenced.
    pub(crate) fn put_intent(&self, seq: u64, json: &str) -> Result<(), StoreError> {
        self.leader_write(vec![etcd::put(&self.key(&format!("intents/{}", number(seq))), json)])?;
        Ok(())
    }

    pub(crate) fn intents(&self) -> Result<Vec<(u64, String)>, StoreError> {
        let kvs = self.etcd.list(&self.key("intents/"), None)?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| Some((kv.key.rsplit('/').next()?.parse().ok()?, kv.value)))
            .collect())
    }

    /// Appends under the next number: created only if absent, retried when another replica
    /// took that number first.
    pub(crate) fn append_ledger(&self, json: &str) -> Result<(), StoreError> {
        for _ in 0..RETRIES {
            let last = self.etcd.list(&self.key("ledger/"), Some(1))?;
            let n = last
                .first()
                .and_then(|kv| kv.key.rsplit('/').next()?.parse::<u64>().ok())
                .unwrap_or(0);
            let key = self.key(&format!("ledger/{}", number(n + 1)));
            let (ok, _) = self.etcd.txn(vec![etcd::mod_is(&key, 0)], vec![etcd::put(&key, json)])?;
            if ok {
                return Ok(());
            }
        }
        Err(StoreError::Conflict(
            "the ledger entry was not written: other replicas kept appending".into(),
        ))
    }

    pub(crate) fn ledger(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut newest: Vec<String> = self
            .etcd
            .list(&self.key("ledger/"), Some(limit as i64))?
            .into_iter()
            .map(|kv| kv.value)
            .collect();
        newest.reverse();
        Ok(newest)
    }

    pub(crate) fn put_token(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).map_err(db_err)?;
        self.put_string(&format!("tokens/{}", record.id), &json)
    }

    pub(crate) fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        match self.etcd.get(&self.key(&format!("tokens/{id}")), false)? {
            Some(kv) => Ok(Some(serde_json::from_str(&kv.value).map_err(db_err)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.values("tokens/")?
            .iter()
            .map(|v| serde_json::from_str(v).map_err(db_err))
            .collect()
    }

    /// Changes token `id` in one transaction comparing the record's revision with the one read,
    /// so two replicas redeeming its last use never both succeed.
    pub(crate) fn update_token(
        &self,
        id: &str,
        change: impl FnOnce(&mut TokenRecord) -> Result<(), TokenRefusal>,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        let key = self.key(&format!("tokens/{id}"));
        let Some(kv) = self.etcd.get(&key, false)? else {
            return Ok(Err(TokenRefusal::Unknown(id.to_string())));
        };
        let mut record: TokenRecord = serde_json::from_str(&kv.value).map_err(db_err)?;
        if let Err(refused) = change(&mut record) {
            return Ok(Err(refused));
        }
        let json = serde_json::to_string(&record).map_err(db_err)?;
        let (ok, _) = self
            .etcd
            .txn(vec![etcd::mod_is(&key, kv.mod_revision)], vec![etcd::put(&key, &json)])?;
        if !ok {
            return Err(StoreError::Conflict(format!(
                "token {id} was changed by another replica at the same time; try again"
            )));
        }
        Ok(Ok(record))
    }

    pub(crate) fn prune_tokens(&self, before: u64) -> Result<usize, StoreError> {
        let stale: Vec<String> = self.tokens()?.into_iter().filter(|t| t.expires_at < before).map(|t| t.id).collect();
        if stale.is_empty() {
            return Ok(0);
        }
        let ops = stale.iter().map(|id| etcd::delete(&self.key(&format!("tokens/{id}")))).collect();
        self.etcd.txn(Vec::new(), ops)?;
        Ok(stale.len())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A one-member etcd (Debian's etcd-server) on free loopback ports, killed on drop.
    pub(crate) struct OneEtcd {
        child: std::process::Child,
        url: String,
        dir: std::path::PathBuf,
    }

    impl OneEtcd {
        pub(crate) fn start() -> Self {
            let port = |_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
            let (client, peer) = (port(0), port(1));
            let dir = std::env::temp_dir().join(format!("weft-store-etcd-{}-{}", std::process::id(), client.port()));
            let child = std::process::Command::new("/usr/bin/etcd")
                .args(["--data-dir", &dir.display().to_string()])
                .args(["--listen-client-urls", &format!("http://{client}")])
                .args(["--advertise-client-urls", &format!("http://{client}")])
                .args(["--listen-peer-urls", &format!("http://{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
                .args(["--initial-cluster", &format!("default=http://{peer}")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("/usr/bin/etcd runs (Debian's etcd-server; scripts/test installs it)");
            Self {
                child,
                url: format!("etcd://{client}"),
                dir,
            }
        }

        /// A store on it, once etcd answers.
        pub(crate) fn store(&self, prefix: &str) -> EtcdStore {
            let store = EtcdStore::connect(&self.url, prefix, None).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while store.stable().is_err() {
                assert!(Instant::now() < deadline, "etcd at {} never answered", self.url);
                std::thread::sleep(Duration::from_millis(20));
            }
            store
        }
    }

    impl Drop for OneEtcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn empty() -> BTreeMap<ResourceKey, Resource> {
        BTreeMap::new()
    }

    #[test]
    fn two_replicas_racing_for_one_revision_one_wins_the_other_gets_a_conflict() {
        let etcd = OneEtcd::start();
        let (a, b) = (etcd.store("/race"), etcd.store("/race"));
        a.stable().unwrap();
        b.stable().unwrap();
        let winner = a.commit_at(1, "from a".into(), vec![], &empty()).expect("the first commit wins");
        assert_eq!(winner.revision, 1);
        let loser = b
            .commit_at(1, "from b".into(), vec![], &empty())
            .expect_err("the second is refused");
        assert!(matches!(loser, StoreError::Conflict(_)), "{loser}");
        assert!(loser.to_string().contains("another replica made revision 1 stable"), "{loser}");
        assert_eq!(a.get(1).unwrap().unwrap().summary, "from a", "the winner's revision is intact");
        assert_eq!(a.latest().unwrap().unwrap().revision, 1, "and nothing else was stored");

        // Truly at once, from two threads, twenty times: exactly one commit of each number wins.
        for round in 0..20u64 {
            let prefix = format!("/race-{round}");
            let (a, b) = (etcd.store(&prefix), etcd.store(&prefix));
            a.stable().unwrap();
            b.stable().unwrap();
            let start = std::sync::Barrier::new(2);
            let outcomes: Vec<Result<Revision, StoreError>> = std::thread::scope(|s| {
                let racers = [&a, &b].map(|store| {
                    let start = &start;
                    s.spawn(move || {
                        start.wait();
                        store.commit_at(1, "racing".into(), vec![], &empty())
                    })
                });
                racers.map(|r| r.join().unwrap()).into_iter().collect()
            });
            let won = outcomes.iter().filter(|o| o.is_ok()).count();
            assert_eq!(won, 1, "round {round}: {outcomes:?}");
            let lost = outcomes.into_iter().find_map(|o| o.err()).unwrap();
            assert!(matches!(lost, StoreError::Conflict(_)), "round {round}: {lost}");
            assert_eq!(a.history().unwrap().len(), 1, "round {round}: one revision stored");
        }

        // b's view is stale (it read the mesh before revision 1): a commit under a fresh number
        // would silently drop a's change, so it is refused too.
        let stale = b
            .commit_at(2, "stale b".into(), vec![], &empty())
            .expect_err("a stale view is refused");
        assert!(stale.to_string().contains("another replica made revision 1 stable"), "{stale}");
        assert!(b.get(2).unwrap().is_none(), "nothing was stored");
        b.stable().unwrap();
        assert_eq!(
            b.commit_at(2, "fresh b".into(), vec![], &empty()).unwrap().revision,
            2,
            "after reading again it commits"
        );

        // Reservations from both replicas never hand out one number twice.
        let mut numbers: Vec<u64> = (0..10).flat_map(|_| [a.reserve().unwrap(), b.reserve().unwrap()]).collect();
        numbers.sort();
        numbers.dedup();
        assert_eq!(numbers.len(), 20);
    }

    #[test]
    fn a_deposed_leaders_writes_fail() {
        let etcd = OneEtcd::start();
        let store = etcd.store("/fence");
        let leader = store.key("leader");
        let (_, created) = store.etcd.txn(vec![], vec![etcd::put(&leader, "a")]).unwrap();
        store.set_fence(Some((leader.clone(), created)));
        store.put_intent(1, "{}").expect("the leader writes");
        // Another replica's term: the key is created anew.
        store.etcd.txn(vec![], vec![etcd::delete(&leader)]).unwrap();
        store.etcd.txn(vec![], vec![etcd::put(&leader, "b")]).unwrap();
        let refused = store.put_intent(2, "{}").expect_err("the deposed leader's write fails");
        assert!(matches!(refused, StoreError::Fenced(_)), "{refused}");
        assert!(refused.to_string().contains("now names b"), "{refused}");
        assert_eq!(store.intents().unwrap().len(), 1, "nothing was written");
    }
}

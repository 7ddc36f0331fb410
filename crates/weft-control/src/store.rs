//! The control plane's durable state in an embedded redb database under `--data-dir`: the
//! current resources and every revision with the full set of resources it produced, so history
//! survives restarts and any earlier revision can be restored. Revisions are monotonic and never
//! reused: each commit is one write transaction.
//!
//! A data directory that has ever held a store is never re-initialised silently: an empty or
//! unreadable store file, or a missing one beside the state a control plane leaves (`ca.pem`),
//! refuses to open; only `--reinit-store` ([`Store::reinit`]) starts over, keeping the old
//! file under another name.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use weft_api::{Resource, ResourceKey};

pub(crate) mod on_etcd;

const REVISIONS: TableDefinition<u64, &str> = TableDefinition::new("revisions");
/// `next_revision` (numbers are reserved here and never reused) and `stable`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const INTENTS: TableDefinition<u64, &str> = TableDefinition::new("intents");
const LEDGER: TableDefinition<u64, &str> = TableDefinition::new("ledger");
/// The CA's root certificate and key and the token signing key (PEM / base64).
const SECRETS: TableDefinition<&str, &str> = TableDefinition::new("secrets");
/// API tokens by name (JSON records holding the secret's hash, never the secret).
const API_TOKENS: TableDefinition<&str, &str> = TableDefinition::new("api_tokens");
/// Join tokens by id (JSON [`TokenRecord`]); never the token itself.
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");
/// Operator switches that outlive a restart: `freeze` and `bypass` (JSON).
const STATE: TableDefinition<&str, &str> = TableDefinition::new("state");
/// Services' virtual IPs ([`crate::vip`]): `NAMESPACE/NAME` to the address (as a number), and
/// back, so an address is claimed by one service only.
const VIPS: TableDefinition<&str, u32> = TableDefinition::new("vips");
const VIP_OWNERS: TableDefinition<u32, &str> = TableDefinition::new("vip_owners");

/// What [`Store::claim_vip`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The address is the service's now.
    Claimed,
    /// The service already held this address (another replica claimed it first).
    Held(Ipv4Addr),
    /// Another service holds the address.
    Taken,
}

/// The store's file under the data directory.
pub(crate) const STORE_FILE: &str = "weft.redb";
/// Files a control plane writes beside its store once the store is open: finding one without
/// the store means the store was lost, not that the directory is new.
const STATE_FILES: [&str; 1] = ["ca.pem"];
/// What the refusals tell the operator to do.
const REINIT_HINT: &str = "nothing was changed; restore weft.redb from a backup, or start with --reinit-store to begin an empty mesh (a store file there is kept as weft.redb.broken-<unix time>; history, policies and the root CA start over and every proxy must join again)";

/// The store: the embedded redb file (the default) or etcd (`--store etcd://...`), shared by
/// every replica of a highly available control plane.
pub(crate) enum Store {
    Redb(Redb),
    Etcd(on_etcd::EtcdStore),
}

/// The embedded store under `--data-dir`.
pub(crate) struct Redb {
    db: Database,
}

/// One accepted change and the resources it left.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Revision {
    pub(crate) revision: u64,
    /// Unix time, milliseconds.
    pub(crate) time_ms: u64,
    pub(crate) summary: String,
    pub(crate) changes: Vec<ChangeEntry>,
    pub(crate) resources: Vec<Resource>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ChangeEntry {
    /// `created`, `configured`, `unchanged` or `deleted`.
    pub(crate) op: String,
    pub(crate) key: ResourceKey,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {message}")]
    Open { path: String, message: String },
    #[error("the store {path} is unreadable: {problem}; {REINIT_HINT}")]
    Unreadable { path: String, problem: String },
    #[error(
        "the store {path} is missing but {found} beside it shows this directory held a control plane's state, so the store was lost; {REINIT_HINT}"
    )]
    Lost { path: String, found: String },
    #[error("the store {path} is in use by another process (a control plane still running on this data directory?)")]
    InUse { path: String },
    #[error("store: {0}")]
    Db(String),
    #[error("stored revision {revision} is unreadable: {message}")]
    Corrupt { revision: u64, message: String },
    /// etcd did not answer (no quorum, no member reachable): the API answers 503.
    #[error("the store cannot take the change now: {0}")]
    Unavailable(#[from] crate::etcd::EtcdError),
    /// Another replica wrote first: nothing of this write was stored.
    #[error("conflict in the store: {0}")]
    Conflict(String),
    /// This replica lost the leadership it held when it decided the write.
    #[error("this replica is no longer the leader ({0}); nothing was written")]
    Fenced(String),
    /// A change asked of a follower replica: only the leader changes the mesh.
    #[error("this replica is a follower and does not change the mesh: {0}")]
    NotLeader(String),
}

/// What the control plane remembers of a join token it minted: enough to revoke it, count its
/// uses and list it, never the token (whose signature alone proves it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TokenRecord {
    pub(crate) id: String,
    /// `namespace/name`.
    pub(crate) workload: String,
    pub(crate) service_account: String,
    /// Unix seconds.
    pub(crate) created_at: u64,
    /// Unix seconds.
    pub(crate) expires_at: u64,
    /// Certificates it may still be redeemed for in all; `None`: any number until it expires.
    pub(crate) uses_allowed: Option<u32>,
    /// Certificates issued on its strength.
    pub(crate) uses: u32,
    pub(crate) revoked: bool,
}

/// Why a recorded token cannot be used (its signature and expiry aside).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenRefusal {
    #[error("token {0} is not on record")]
    Unknown(String),
    #[error("token {0} was revoked")]
    Revoked(String),
    #[error("token {id} was used for all {allowed} certificate(s) it allows")]
    UsedUp { id: String, allowed: u32 },
}

pub(crate) fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Calls the same method on whichever backend the store is.
macro_rules! either {
    ($store:expr, $backend:ident => $call:expr) => {
        match $store {
            Store::Redb($backend) => $call,
            Store::Etcd($backend) => $call,
        }
    };
}

// === impl Store ===

impl Store {
    /// The embedded store in `dir` (see [`Redb::open`]).
    pub(crate) fn open(dir: &Path) -> Result<Self, StoreError> {
        Ok(Self::Redb(Redb::open(dir)?))
    }

    /// `--reinit-store` (see [`Redb::reinit`]).
    pub(crate) fn reinit(dir: &Path) -> Result<(Self, Option<PathBuf>), StoreError> {
        let (redb, aside) = Redb::reinit(dir)?;
        Ok((Self::Redb(redb), aside))
    }

    /// etcd at `url` (`etcd://HOST:PORT[,HOST:PORT...]`), every key under `prefix`, over TLS
    /// with `tls`.
    pub(crate) fn etcd(url: &str, prefix: &str, tls: Option<&crate::etcd::StoreTls>) -> Result<Self, StoreError> {
        use crate::etcd::EtcdError;
        match on_etcd::EtcdStore::connect(url, prefix, tls) {
            Ok(store) => Ok(Self::Etcd(store)),
            // A bad address or TLS file is a mistake in the flags, not an outage of the store.
            Err(StoreError::Unavailable(e @ (EtcdError::Address { .. } | EtcdError::Tls { .. }))) => Err(StoreError::Open {
                path: url.to_string(),
                message: e.to_string(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Where the store is, for the status and the logs.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Redb(_) => "embedded".into(),
            Self::Etcd(s) => s.describe(),
        }
    }

    pub(crate) fn latest(&self) -> Result<Option<Revision>, StoreError> {
        either!(self, s => s.latest())
    }

    pub(crate) fn get(&self, revision: u64) -> Result<Option<Revision>, StoreError> {
        either!(self, s => s.get(revision))
    }

    pub(crate) fn history(&self) -> Result<Vec<Revision>, StoreError> {
        either!(self, s => s.history())
    }

    pub(crate) fn reserve(&self) -> Result<u64, StoreError> {
        either!(self, s => s.reserve())
    }

    /// Every service's virtual IP, by `NAMESPACE/NAME`.
    pub(crate) fn vips(&self) -> Result<Vec<(String, Ipv4Addr)>, StoreError> {
        either!(self, s => s.vips())
    }

    /// Gives `service` (`NAMESPACE/NAME`) the address `ip` in one transaction, unless it holds
    /// one already or `ip` is another service's.
    pub(crate) fn claim_vip(&self, service: &str, ip: Ipv4Addr) -> Result<Claim, StoreError> {
        either!(self, s => s.claim_vip(service, ip))
    }

    pub(crate) fn stable(&self) -> Result<Option<u64>, StoreError> {
        either!(self, s => s.stable())
    }

    #[cfg(test)]
    pub(crate) fn commit(
        &self,
        summary: String,
        changes: Vec<ChangeEntry>,
        resources: &BTreeMap<ResourceKey, Resource>,
    ) -> Result<Revision, StoreError> {
        let next = self.reserve()?;
        self.commit_at(next, summary, changes, resources)
    }

    pub(crate) fn commit_at(
        &self,
        wanted: u64,
        summary: String,
        changes: Vec<ChangeEntry>,
        resources: &BTreeMap<ResourceKey, Resource>,
    ) -> Result<Revision, StoreError> {
        either!(self, s => s.commit_at(wanted, summary, changes, resources))
    }

    pub(crate) fn secret(&self, name: &str) -> Result<Option<String>, StoreError> {
        either!(self, s => s.secret(name))
    }

    pub(crate) fn put_secret(&self, name: &str, value: &str) -> Result<(), StoreError> {
        either!(self, s => s.put_secret(name, value))
    }

    pub(crate) fn create_secret(&self, name: &str, value: &str) -> Result<String, StoreError> {
        either!(self, s => s.create_secret(name, value))
    }

    pub(crate) fn state(&self, name: &str) -> Result<Option<String>, StoreError> {
        either!(self, s => s.state(name))
    }

    pub(crate) fn put_state(&self, name: &str, value: &str) -> Result<(), StoreError> {
        either!(self, s => s.put_state(name, value))
    }

    pub(crate) fn api_tokens(&self) -> Result<Vec<String>, StoreError> {
        either!(self, s => s.api_tokens())
    }

    pub(crate) fn put_api_token(&self, name: &str, json: &str) -> Result<(), StoreError> {
        either!(self, s => s.put_api_token(name, json))
    }

    pub(crate) fn delete_api_token(&self, name: &str) -> Result<(), StoreError> {
        either!(self, s => s.delete_api_token(name))
    }

    pub(crate) fn put_intent(&self, seq: u64, json: &str) -> Result<(), StoreError> {
        either!(self, s => s.put_intent(seq, json))
    }

    pub(crate) fn intents(&self) -> Result<Vec<(u64, String)>, StoreError> {
        either!(self, s => s.intents())
    }

    pub(crate) fn append_ledger(&self, json: &str) -> Result<(), StoreError> {
        either!(self, s => s.append_ledger(json))
    }

    pub(crate) fn ledger(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        either!(self, s => s.ledger(limit))
    }

    pub(crate) fn put_token(&self, record: &TokenRecord) -> Result<(), StoreError> {
        either!(self, s => s.put_token(record))
    }

    pub(crate) fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        either!(self, s => s.token(id))
    }

    pub(crate) fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        either!(self, s => s.tokens())
    }

    pub(crate) fn update_token(
        &self,
        id: &str,
        change: impl FnOnce(&mut TokenRecord) -> Result<(), TokenRefusal>,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        either!(self, s => s.update_token(id, change))
    }

    pub(crate) fn prune_tokens(&self, before: u64) -> Result<usize, StoreError> {
        either!(self, s => s.prune_tokens(before))
    }
}

// === impl Redb ===

impl Redb {
    /// Opens `DIR/weft.redb`, or creates it in a directory that never held one. Refuses an
    /// empty or unreadable file, and a missing one where a control plane's other state remains.
    pub(crate) fn open(dir: &Path) -> Result<Self, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
            path: dir.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(&e))?;
        let file = dir.join(STORE_FILE);
        let path = file.display().to_string();
        let db = match std::fs::metadata(&file) {
            Ok(meta) if meta.len() == 0 => {
                return Err(StoreError::Unreadable {
                    path,
                    problem: "the file is empty (0 bytes)".into(),
                });
            }
            Ok(_) => Database::open(&file).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse { path: path.clone() },
                other => StoreError::Unreadable {
                    path: path.clone(),
                    problem: other.to_string(),
                },
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let found: Vec<&str> = STATE_FILES.into_iter().filter(|f| dir.join(f).exists()).collect();
                if !found.is_empty() {
                    return Err(StoreError::Lost {
                        path,
                        found: found.join(", "),
                    });
                }
                Database::create(&file).map_err(|e| open_err(&e))?
            }
            Err(e) => return Err(open_err(&e)),
        };
        Self::with_tables(db)
    }

    /// `--reinit-store`: renames `DIR/weft.redb`, whatever it holds, to
    /// `weft.redb.broken-<unix seconds>` (never deletes it) and creates an empty store in its
    /// place. Returns the store and where the old file went, if there was one.
    pub(crate) fn reinit(dir: &Path) -> Result<(Self, Option<PathBuf>), StoreError> {
        let file = dir.join(STORE_FILE);
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
            path: file.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(&e))?;
        let aside = if file.exists() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let aside = dir.join(format!("{STORE_FILE}.broken-{now}"));
            std::fs::rename(&file, &aside).map_err(|e| open_err(&format!("cannot move it aside to {}: {e}", aside.display())))?;
            Some(aside)
        } else {
            None
        };
        let db = Database::create(&file).map_err(|e| open_err(&e))?;
        Ok((Self::with_tables(db)?, aside))
    }

    /// Makes sure every table exists (a new store has none).
    fn with_tables(db: Database) -> Result<Self, StoreError> {
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(REVISIONS).map_err(db_err)?;
        tx.open_table(META).map_err(db_err)?;
        tx.open_table(INTENTS).map_err(db_err)?;
        tx.open_table(LEDGER).map_err(db_err)?;
        tx.open_table(SECRETS).map_err(db_err)?;
        tx.open_table(API_TOKENS).map_err(db_err)?;
        tx.open_table(TOKENS).map_err(db_err)?;
        tx.open_table(STATE).map_err(db_err)?;
        tx.open_table(VIPS).map_err(db_err)?;
        tx.open_table(VIP_OWNERS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    /// The newest revision, or `None` for an empty mesh.
    pub(crate) fn latest(&self) -> Result<Option<Revision>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(REVISIONS).map_err(db_err)?;
        match table.last().map_err(db_err)? {
            Some((k, v)) => Ok(Some(decode(k.value(), v.value())?)),
            None => Ok(None),
        }
    }

    pub(crate) fn get(&self, revision: u64) -> Result<Option<Revision>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(REVISIONS).map_err(db_err)?;
        match table.get(revision).map_err(db_err)? {
            Some(v) => Ok(Some(decode(revision, v.value())?)),
            None => Ok(None),
        }
    }

    /// Every revision, oldest first.
    pub(crate) fn history(&self) -> Result<Vec<Revision>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(REVISIONS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Reserves the next revision number; it is never handed out again.
    pub(crate) fn reserve(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let next = {
            let revisions = tx.open_table(REVISIONS).map_err(db_err)?;
            let latest = revisions.last().map_err(db_err)?.map(|(k, _)| k.value()).unwrap_or(0);
            let mut meta = tx.open_table(META).map_err(db_err)?;
            let reserved = meta.get("next_revision").map_err(db_err)?.map(|v| v.value()).unwrap_or(1);
            let next = reserved.max(latest + 1);
            meta.insert("next_revision", next + 1).map_err(db_err)?;
            next
        };
        tx.commit().map_err(db_err)?;
        Ok(next)
    }

    /// The revision every untreated proxy runs, once one was set.
    pub(crate) fn stable(&self) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let meta = tx.open_table(META).map_err(db_err)?;
        Ok(meta.get("stable").map_err(db_err)?.map(|v| v.value()))
    }

    /// Records `resources` as revision `wanted` (a number reserved earlier) when it is newer than
    /// every committed one, else under a freshly reserved number; makes it stable.
    pub(crate) fn commit_at(
        &self,
        wanted: u64,
        summary: String,
        changes: Vec<ChangeEntry>,
        resources: &BTreeMap<ResourceKey, Resource>,
    ) -> Result<Revision, StoreError> {
        let latest = self.latest()?.map(|r| r.revision).unwrap_or(0);
        let next = if wanted > latest { wanted } else { self.reserve()? };
        let tx = self.db.begin_write().map_err(db_err)?;
        let rev = {
            let mut table = tx.open_table(REVISIONS).map_err(db_err)?;
            let mut meta = tx.open_table(META).map_err(db_err)?;
            meta.insert("stable", next).map_err(db_err)?;
            let reserved = meta.get("next_revision").map_err(db_err)?.map(|v| v.value()).unwrap_or(1);
            if reserved <= next {
                meta.insert("next_revision", next + 1).map_err(db_err)?;
            }
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
            table.insert(next, json.as_str()).map_err(db_err)?;
            rev
        };
        tx.commit().map_err(db_err)?;
        Ok(rev)
    }
}

// === secrets ===

impl Redb {
    pub(crate) fn secret(&self, name: &str) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(SECRETS).map_err(db_err)?;
        Ok(table.get(name).map_err(db_err)?.map(|v| v.value().to_string()))
    }

    pub(crate) fn put_secret(&self, name: &str, value: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(SECRETS).map_err(db_err)?.insert(name, value).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    pub(crate) fn vips(&self) -> Result<Vec<(String, Ipv4Addr)>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(VIPS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (service, ip) = entry.map_err(db_err)?;
            out.push((service.value().to_string(), Ipv4Addr::from(ip.value())));
        }
        Ok(out)
    }

    pub(crate) fn claim_vip(&self, service: &str, ip: Ipv4Addr) -> Result<Claim, StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let claim = {
            let mut vips = tx.open_table(VIPS).map_err(db_err)?;
            let mut owners = tx.open_table(VIP_OWNERS).map_err(db_err)?;
            let held = vips.get(service).map_err(db_err)?.map(|v| Ipv4Addr::from(v.value()));
            if let Some(held) = held {
                Claim::Held(held)
            } else if owners.get(u32::from(ip)).map_err(db_err)?.is_some() {
                Claim::Taken
            } else {
                vips.insert(service, u32::from(ip)).map_err(db_err)?;
                owners.insert(u32::from(ip), service).map_err(db_err)?;
                Claim::Claimed
            }
        };
        tx.commit().map_err(db_err)?;
        Ok(claim)
    }

    /// Stores `value` under `name` unless something is there already; returns what is stored.
    pub(crate) fn create_secret(&self, name: &str, value: &str) -> Result<String, StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let stored = {
            let mut table = tx.open_table(SECRETS).map_err(db_err)?;
            let existing = table.get(name).map_err(db_err)?.map(|v| v.value().to_string());
            match existing {
                Some(existing) => existing,
                None => {
                    table.insert(name, value).map_err(db_err)?;
                    value.to_string()
                }
            }
        };
        tx.commit().map_err(db_err)?;
        Ok(stored)
    }
}

// === operator switches ===

impl Redb {
    pub(crate) fn state(&self, name: &str) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(STATE).map_err(db_err)?;
        Ok(table.get(name).map_err(db_err)?.map(|v| v.value().to_string()))
    }

    pub(crate) fn put_state(&self, name: &str, value: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(STATE).map_err(db_err)?.insert(name, value).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }
}

// === API tokens ===

impl Redb {
    pub(crate) fn api_tokens(&self) -> Result<Vec<String>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(API_TOKENS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            out.push(row.map_err(db_err)?.1.value().to_string());
        }
        Ok(out)
    }

    pub(crate) fn put_api_token(&self, name: &str, json: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(API_TOKENS).map_err(db_err)?.insert(name, json).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    pub(crate) fn delete_api_token(&self, name: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(API_TOKENS).map_err(db_err)?.remove(name).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }
}

// === intents and ledger ===

impl Redb {
    /// Writes an intent's record (JSON) under its queue number.
    pub(crate) fn put_intent(&self, seq: u64, json: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(INTENTS).map_err(db_err)?.insert(seq, json).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    pub(crate) fn intents(&self) -> Result<Vec<(u64, String)>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(INTENTS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push((k.value(), v.value().to_string()));
        }
        Ok(out)
    }

    /// Appends an operator action (JSON) to the ledger.
    pub(crate) fn append_ledger(&self, json: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(LEDGER).map_err(db_err)?;
            let next = table.last().map_err(db_err)?.map(|(k, _)| k.value()).unwrap_or(0) + 1;
            table.insert(next, json).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// The newest `limit` ledger entries, oldest first.
    pub(crate) fn ledger(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(LEDGER).map_err(db_err)?;
        let mut out: Vec<String> = Vec::new();
        for row in table.iter().map_err(db_err)?.rev().take(limit) {
            let (_, v) = row.map_err(db_err)?;
            out.push(v.value().to_string());
        }
        out.reverse();
        Ok(out)
    }
}

// === join tokens ===

impl TokenRecord {
    /// Whether it can still be used: on record, not revoked, uses left.
    pub(crate) fn usable(&self) -> Result<(), TokenRefusal> {
        if self.revoked {
            return Err(TokenRefusal::Revoked(self.id.clone()));
        }
        match self.uses_allowed {
            Some(allowed) if self.uses >= allowed => Err(TokenRefusal::UsedUp {
                id: self.id.clone(),
                allowed,
            }),
            _ => Ok(()),
        }
    }
}

impl Redb {
    pub(crate) fn put_token(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).map_err(db_err)?;
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(TOKENS)
            .map_err(db_err)?
            .insert(record.id.as_str(), json.as_str())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    pub(crate) fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(TOKENS).map_err(db_err)?;
        table
            .get(id)
            .map_err(db_err)?
            .map(|v| serde_json::from_str(v.value()).map_err(db_err))
            .transpose()
    }

    /// Every recorded token, by id.
    pub(crate) fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(TOKENS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            out.push(serde_json::from_str(v.value()).map_err(db_err)?);
        }
        Ok(out)
    }

    /// Changes token `id` with `change` in one write transaction (nothing is written when it
    /// refuses); returns the record as written.
    pub(crate) fn update_token(
        &self,
        id: &str,
        change: impl FnOnce(&mut TokenRecord) -> Result<(), TokenRefusal>,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let outcome = {
            let mut table = tx.open_table(TOKENS).map_err(db_err)?;
            let current: Option<TokenRecord> = table
                .get(id)
                .map_err(db_err)?
                .map(|v| serde_json::from_str(v.value()).map_err(db_err))
                .transpose()?;
            match current {
                None => Err(TokenRefusal::Unknown(id.to_string())),
                Some(mut record) => match change(&mut record) {
                    Ok(()) => {
                        let json = serde_json::to_string(&record).map_err(db_err)?;
                        table.insert(id, json.as_str()).map_err(db_err)?;
                        Ok(record)
                    }
                    Err(refused) => Err(refused),
                },
            }
        };
        if outcome.is_ok() {
            tx.commit().map_err(db_err)?;
        } else {
            tx.abort().map_err(db_err)?;
        }
        Ok(outcome)
    }

    /// Forgets tokens that expired before `before` (unix seconds); returns how many.
    pub(crate) fn prune_tokens(&self, before: u64) -> Result<usize, StoreError> {
        let stale: Vec<String> = self.tokens()?.into_iter().filter(|t| t.expires_at < before).map(|t| t.id).collect();
        if stale.is_empty() {
            return Ok(0);
        }
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(TOKENS).map_err(db_err)?;
            for id in &stale {
                table.remove(id.as_str()).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        Ok(stale.len())
    }
}

fn decode(revision: u64, json: &str) -> Result<Revision, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        revision,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_survive_reopen_and_stay_monotonic() {
        let dir = std::env::temp_dir().join(format!("weft-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let r: Resource = weft_api::resource::parse_resources(
            "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: t}\nspec: {service: a}\n",
            "t",
        )
        .unwrap()
        .remove(0);
        let mut set = BTreeMap::new();
        set.insert(r.key(), r.clone());
        {
            let s = Store::open(&dir).unwrap();
            assert!(s.latest().unwrap().is_none());
            assert_eq!(s.commit("one".into(), vec![], &set).unwrap().revision, 1);
            assert_eq!(s.commit("two".into(), vec![], &BTreeMap::new()).unwrap().revision, 2);
        }
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.latest().unwrap().unwrap().revision, 2);
        assert_eq!(s.get(1).unwrap().unwrap().resources, vec![r]);
        assert_eq!(s.history().unwrap().len(), 2);
        assert_eq!(s.commit("three".into(), vec![], &set).unwrap().revision, 3);
        // Reserved numbers are never reused, even when nothing was committed under them.
        assert_eq!(s.reserve().unwrap(), 4);
        assert_eq!(s.commit("five".into(), vec![], &set).unwrap().revision, 5);
        assert_eq!(
            s.commit_at(4, "late".into(), vec![], &set).unwrap().revision,
            6,
            "an older reservation commits as a new number"
        );
        assert_eq!(s.stable().unwrap(), Some(6));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_that_existed_is_never_reinitialised_silently() {
        let dir = std::env::temp_dir().join(format!("weft-store-reinit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        drop(Store::open(&dir).expect("a fresh directory initialises"));
        let file = dir.join(STORE_FILE);

        std::fs::write(&file, b"").unwrap();
        let refused = Store::open(&dir).err().expect("an empty store is refused").to_string();
        assert!(
            refused.contains(&file.display().to_string()) && refused.contains("empty (0 bytes)") && refused.contains("--reinit-store"),
            "{refused}"
        );
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 0, "the file is untouched");

        std::fs::write(&file, b"not a database").unwrap();
        let refused = Store::open(&dir).err().expect("garbage is refused").to_string();
        assert!(
            refused.contains("is unreadable: ") && refused.contains("--reinit-store"),
            "{refused}"
        );

        std::fs::remove_file(&file).unwrap();
        std::fs::write(dir.join("ca.pem"), "roots").unwrap();
        let refused = Store::open(&dir).err().expect("a lost store is refused").to_string();
        assert!(refused.contains("is missing but ca.pem"), "{refused}");
        assert!(!file.exists(), "nothing was created");

        std::fs::write(&file, b"not a database").unwrap();
        let (store, aside) = Store::reinit(&dir).expect("--reinit-store starts over");
        let aside = aside.expect("the old file was kept");
        assert!(
            aside.file_name().unwrap().to_string_lossy().starts_with("weft.redb.broken-"),
            "{aside:?}"
        );
        assert_eq!(std::fs::read(&aside).unwrap(), b"not a database");
        assert!(store.latest().unwrap().is_none(), "an empty mesh");
        drop(store);
        Store::open(&dir).expect("and it opens from then on");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn token_uses_are_counted_atomically_and_revocation_sticks() {
        let dir = std::env::temp_dir().join(format!("weft-store-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Store::open(&dir).unwrap();
        let record = TokenRecord {
            id: "t1".into(),
            workload: "default/orders".into(),
            service_account: "orders".into(),
            created_at: 100,
            expires_at: 200,
            uses_allowed: Some(2),
            uses: 0,
            revoked: false,
        };
        s.put_token(&record).unwrap();
        let redeem = |r: &mut TokenRecord| {
            r.usable()?;
            r.uses += 1;
            Ok(())
        };
        assert_eq!(s.update_token("t1", redeem).unwrap().unwrap().uses, 1);
        assert_eq!(s.update_token("t1", redeem).unwrap().unwrap().uses, 2);
        assert_eq!(
            s.update_token("t1", redeem).unwrap(),
            Err(TokenRefusal::UsedUp {
                id: "t1".into(),
                allowed: 2
            })
        );
        assert_eq!(s.token("t1").unwrap().unwrap().uses, 2, "a refused use is not counted");
        assert_eq!(s.update_token("nope", redeem).unwrap(), Err(TokenRefusal::Unknown("nope".into())));
        s.put_token(&TokenRecord {
            id: "t2".into(),
            uses_allowed: None,
            expires_at: 300,
            ..record.clone()
        })
        .unwrap();
        s.update_token("t2", |r| {
            r.revoked = true;
            Ok(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(s.update_token("t2", redeem).unwrap(), Err(TokenRefusal::Revoked("t2".into())));
        assert_eq!(s.prune_tokens(250).unwrap(), 1, "t1 expired at 200");
        let left: Vec<String> = s.tokens().unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(left, ["t2"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

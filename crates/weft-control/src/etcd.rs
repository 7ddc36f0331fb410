//! A small etcd v3 client over the generated gRPC code of `proto/etcd.proto` (KV, Watch,
//! Lease), with a blocking face for the store: the control plane's store calls are synchronous
//! (redb's are), so each etcd request runs on a runtime of its own, on its own thread, and the
//! caller waits for the answer as it waits for a disk write. The caller may itself be on any
//! runtime: nothing here blocks one of its tasks on another of its tasks.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Generated protobuf and tonic code for `proto/etcd.proto` (checked in; see weft-test's
/// tests/codegen.rs).
#[allow(clippy::all, missing_docs)]
pub(crate) mod pb {
    include!("gen/etcdserverpb.rs");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};

/// How long one request may take. etcd without quorum holds a write instead of refusing it, so
/// this is also how long a write waits before the control plane answers 503.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Why etcd did not answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {url} did not answer within {REQUEST_TIMEOUT:?} (no quorum, or no member reachable)")]
    Timeout { url: String },
    #[error("etcd at {url}: no member answered (no quorum, or none reachable): {last}")]
    Unreachable { url: String, last: String },
    #[error("etcd at {url}: {message}")]
    Status { url: String, message: String },
    #[error("bad store address {url:?}: {message}")]
    Address { url: String, message: String },
    /// A TLS file given to reach etcd is unreadable or wrong: names the flag, the file and why.
    #[error("{flag} {}: {message}", path.display())]
    Tls {
        flag: &'static str,
        path: PathBuf,
        message: String,
    },
}

/// How to reach etcd over TLS (`--store-ca`, `--store-cert`, `--store-key`).
#[derive(Clone, Debug)]
pub struct StoreTls {
    /// The CA certificates (PEM) etcd's serving certificates chain to.
    pub ca: PathBuf,
    /// A client certificate and its key (PEM), for an etcd run with `--client-cert-auth`.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// One etcd cluster, reached through every member listed in `etcd://HOST:PORT[,HOST:PORT...]`.
pub(crate) struct Etcd {
    /// One channel per member, in the order given.
    members: Arc<Vec<Channel>>,
    /// The member that answered last: tried first next time.
    preferred: Arc<AtomicUsize>,
    /// The address as given, for messages.
    pub(crate) url: String,
    runtime: tokio::runtime::Handle,
    /// Dropped with the client: the runtime's thread then returns and drops the runtime outside
    /// any async context.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// One key and its value as etcd holds it.
#[derive(Clone, Debug)]
pub(crate) struct Kv {
    pub(crate) key: String,
    pub(crate) value: String,
    pub(crate) create_revision: i64,
    pub(crate) mod_revision: i64,
}

// === impl Etcd ===

impl Etcd {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...]` and prepares connections to every member (made
    /// lazily: a member down at start is tried again on each request), over TLS with `tls`.
    pub(crate) fn connect(url: &str, tls: Option<&StoreTls>) -> Result<Self, EtcdError> {
        let bad = |message: &str| EtcdError::Address {
            url: url.to_string(),
            message: message.to_string(),
        };
        let members = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("expected etcd://HOST:PORT[,HOST:PORT...]"))?;
        let connector = match tls {
            Some(tls) => weft_core::tls::Connector::tls(tls.client_config()?),
            None => weft_core::tls::Connector::plaintext(),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoints = Vec::new();
        for member in members.split(',') {
            let (host, port) = member
                .rsplit_once(':')
                .ok_or_else(|| bad(&format!("member {member:?} has no :PORT")))?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad(&format!("member {member:?} is not HOST:PORT")));
            }
            let endpoint = Endpoint::from_shared(format!("{scheme}://{member}"))
                .map_err(|e| bad(&e.to_string()))?
                .connect_timeout(Duration::from_secs(1))
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(2));
            endpoints.push(endpoint);
        }
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("etcd".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime for etcd requests");
                let members: Vec<Channel> =
                    runtime.block_on(async { endpoints.iter().map(|e| e.connect_with_connector_lazy(connector.clone())).collect() });
                let _ = handle_tx.send((runtime.handle().clone(), members));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| bad(&format!("cannot start its thread: {e}")))?;
        let (runtime, members) = handle_rx.recv().map_err(|_| bad("its thread failed to start"))?;
        Ok(Self {
            members: Arc::new(members),
            preferred: Arc::new(AtomicUsize::new(0)),
            url: url.to_string(),
            runtime,
            _stop: stop,
        })
    }

    /// Runs `fut` on the client's runtime and waits for it, at most `within`.
    fn wait_within<T: Send + 'static>(
        &self,
        within: Duration,
        fut: impl Future<Output = Result<T, tonic::Status>> + Send + 'static,
    ) -> Result<T, EtcdError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let _ = tx.send(tokio::time::timeout(within, fut).await);
        });
        match rx.recv() {
            Ok(Ok(Ok(answer))) => Ok(answer),
            Ok(Ok(Err(status))) if status.code() == tonic::Code::DeadlineExceeded => Err(self.timeout()),
            // `call` asks the next member on these: here every member failed so.
            Ok(Ok(Err(status))) if status.code() == tonic::Code::Unavailable => Err(EtcdError::Unreachable {
                url: self.url.clone(),
                last: with_causes(&status),
            }),
            Ok(Ok(Err(status))) => Err(EtcdError::Status {
                url: self.url.clone(),
                message: with_causes(&status),
            }),
            Ok(Err(_)) | Err(_) => Err(self.timeout()),
        }
    }

    /// Sends one request built by `request` to the member that answered last, and to the next
    /// one whenever a member cannot be reached, waiting at most `within` in all.
    fn call<T, F, Fut>(&self, within: Duration, request: F) -> Result<T, EtcdError>
    where
        T: Send + 'static,
        F: Fn(Channel) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, tonic::Status>> + Send,
    {
        let (members, preferred) = (self.members.clone(), self.preferred.clone());
        // A member that neither answers nor refuses (killed mid-connection, cut off) gets its
        // share of the time, then the next one is asked.
        let each = within / members.len() as u32;
        self.wait_within(within, async move {
            let first = preferred.load(Ordering::Relaxed);
            let mut unreachable = None;
            for i in 0..members.len() {
                let at = (first + i) % members.len();
                match tokio::time::timeout(each, request(members[at].clone())).await {
                    Err(_) => unreachable = Some(tonic::Status::deadline_exceeded("no answer")),
                    Ok(Err(status)) if status.code() == tonic::Code::Unavailable => unreachable = Some(status),
                    Ok(answered) => {
                        preferred.store(at, Ordering::Relaxed);
                        return answered;
                    }
                }
            }
            let last = unreachable.map(|s| with_causes(&s)).unwrap_or_default();
            Err(tonic::Status::unavailable(last))
        })
    }

    fn timeout(&self) -> EtcdError {
        EtcdError::Timeout { url: self.url.clone() }
    }

    /// The value at `key`. `serializable` reads answer from the member reached even when it has
    /// lost quorum (reads keep working then); the others are linearizable.
    pub(crate) fn get(&self, key: &str, serializable: bool) -> Result<Option<Kv>, EtcdError> {
        let request = pb::RangeRequest {
            key: key.as_bytes().to_vec(),
            serializable,
            ..Default::default()
        };
        let answer = self.range(request)?;
        Ok(answer.kvs.into_iter().next().map(Kv::from))
    }

    fn range(&self, request: pb::RangeRequest) -> Result<pb::RangeResponse, EtcdError> {
        self.call(REQUEST_TIMEOUT, move |channel| {
            let request = request.clone();
            async move { Ok(pb::kv_client::KvClient::new(channel).range(request).await?.into_inner()) }
        })
    }

    /// etcd's current revision (where a watch that misses nothing starts).
    pub(crate) fn revision(&self) -> Result<i64, EtcdError> {
        let request = pb::RangeRequest {
            key: vec![0],
            count_only: true,
            serializable: true,
            ..Default::default()
        };
        let answer = self.range(request)?;
        Ok(answer.header.map(|h| h.revision).unwrap_or(0))
    }

    /// Every key under `prefix`, in key order (reversed and cut to `limit` when `newest` is set).
    pub(crate) fn list(&self, prefix: &str, newest: Option<i64>) -> Result<Vec<Kv>, EtcdError> {
        let mut request = pb::RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix),
            serializable: true,
            ..Default::default()
        };
        if let Some(limit) = newest {
            request.limit = limit;
            request.sort_order = pb::range_request::SortOrder::Descend as i32;
            request.sort_target = pb::range_request::SortTarget::Key as i32;
        }
        let answer = self.range(request)?;
        Ok(answer.kvs.into_iter().map(Kv::from).collect())
    }

    /// Applies `then` when every compare holds; returns whether it did, and etcd's revision.
    pub(crate) fn txn(&self, compare: Vec<pb::Compare>, then: Vec<pb::RequestOp>) -> Result<(bool, i64), EtcdError> {
        let request = pb::TxnRequest {
            compare,
            success: then,
            failure: Vec::new(),
        };
        let answer = self.call(REQUEST_TIMEOUT, move |channel| {
            let request = request.clone();
            async move { Ok(pb::kv_client::KvClient::new(channel).txn(request).await?.into_inner()) }
        })?;
        Ok((answer.succeeded, answer.header.map(|h| h.revision).unwrap_or(0)))
    }

    /// A lease that lapses `ttl` after its last keep-alive.
    pub(crate) fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let request = pb::LeaseGrantRequest {
            ttl: ttl.as_secs() as i64,
            id: 0,
        };
        let answer = self.call(REQUEST_TIMEOUT, move |channel| async move {
            Ok(pb::lease_client::LeaseClient::new(channel).lease_grant(request).await?.into_inner())
        })?;
        if !answer.error.is_empty() {
            return Err(EtcdError::Status {
                url: self.url.clone(),
                message: answer.error,
            });
        }
        Ok(answer.id)
    }

    pub(crate) fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call(REQUEST_TIMEOUT, move |channel| async move {
            pb::lease_client::LeaseClient::new(channel)
                .lease_revoke(pb::LeaseRevokeRequest { id })
                .await
        })?;
        Ok(())
    }

    /// Renews lease `id` once, waiting at most `within`; returns its remaining TTL in seconds
    /// (0 or less: it is gone).
    pub(crate) fn keep_alive(&self, id: i64, within: Duration) -> Result<i64, EtcdError> {
        let answer = self.call(within, move |channel| async move {
            let request = tokio_stream::once(pb::LeaseKeepAliveRequest { id });
            let mut answers = pb::lease_client::LeaseClient::new(channel)
                .lease_keep_alive(request)
                .await?
                .into_inner();
            answers
                .message()
                .await?
                .ok_or_else(|| tonic::Status::unavailable("the keep-alive stream closed"))
        })?;
        Ok(answer.ttl)
    }

    /// Streams the changes under `prefix` after etcd revision `after` into `changed` (one
    /// message per batch of events), reconnecting from the last revision seen until `changed`
    /// is closed. Runs on the client's runtime.
    pub(crate) fn watch_prefix(&self, prefix: &str, after: i64, changed: tokio::sync::mpsc::Sender<Vec<Change>>) {
        let members = self.members.clone();
        let prefix = prefix.to_string();
        self.runtime.spawn(async move {
            let mut seen = after;
            // Each try goes to the next member: one that is down is left at once.
            let mut member = 0;
            while !changed.is_closed() {
                member = (member + 1) % members.len();
                let request = pb::WatchRequest {
                    request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                        key: prefix.as_bytes().to_vec(),
                        range_end: prefix_end(&prefix),
                        start_revision: seen + 1,
                        ..Default::default()
                    })),
                };
                // The request stream stays open (ending it would end the watch).
                let (keep, held) = tokio::sync::mpsc::channel(1);
                keep.send(request).await.expect("the receiver is held");
                let mut client = pb::watch_client::WatchClient::new(members[member].clone());
                match client.watch(tokio_stream::wrappers::ReceiverStream::new(held)).await {
                    Ok(answers) => {
                        let mut answers = answers.into_inner();
                        while let Ok(Some(answer)) = answers.message().await {
                            let batch: Vec<Change> = answer
                                .events
                                .into_iter()
                                .filter_map(|e| {
                                    let deleted = e.r#type == pb::event::EventType::Delete as i32;
                                    e.kv.map(|kv| Change { kv: kv.into(), deleted })
                                })
                                .collect();
                            if let Some(newest) = batch.iter().map(|c| c.kv.mod_revision).max() {
                                seen = seen.max(newest);
                                if changed.send(batch).await.is_err() {
                                    return;
                                }
                            }
                            if answer.canceled {
                                break;
                            }
                        }
                    }
                    Err(status) => tracing::debug!(%status, "etcd watch failed; retrying"),
                }
                drop(keep);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
}

/// One event of a watch.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub(crate) kv: Kv,
    pub(crate) deleted: bool,
}

impl From<pb::KeyValue> for Kv {
    fn from(kv: pb::KeyValue) -> Self {
        Self {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            value: String::from_utf8_lossy(&kv.value).into_owned(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
        }
    }
}

// === impl StoreTls ===

impl StoreTls {
    /// The TLS client configuration: etcd checked against the CA (its certificate must name the
    /// address dialled), the client certificate presented when there is one, HTTP/2 by ALPN
    /// (gRPC). Every file is read and checked here, at start.
    fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, EtcdError> {
        let ca = read_pem(&self.ca, "--store-ca")?;
        let verifier = weft_core::tls::roots_verifier(&ca, "the CA").map_err(|e| EtcdError::Tls {
            flag: "--store-ca",
            path: self.ca.clone(),
            message: e.to_string(),
        })?;
        let resolver = match &self.client {
            Some((cert, key)) => Some(client_cert(cert, key)?),
            None => None,
        };
        let config = weft_core::tls::client_config(verifier, resolver, &[b"h2"]).map_err(|e| EtcdError::Tls {
            flag: "--store-ca",
            path: self.ca.clone(),
            message: e.to_string(),
        })?;
        Ok(Arc::new(config))
    }
}

fn read_pem(path: &Path, flag: &'static str) -> Result<String, EtcdError> {
    std::fs::read_to_string(path).map_err(|e| EtcdError::Tls {
        flag,
        path: path.to_path_buf(),
        message: format!("cannot read it: {e}"),
    })
}

/// The certificate chain in `cert` with the key in `key`, checked to belong together.
fn client_cert(cert: &Path, key: &Path) -> Result<Arc<dyn rustls::client::ResolvesClientCert>, EtcdError> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let wrong = |flag, path: &Path, message: String| EtcdError::Tls {
        flag,
        path: path.to_path_buf(),
        message,
    };
    let chain = weft_core::tls::certs_from_pem(&read_pem(cert, "--store-cert")?, "the client certificate")
        .map_err(|e| wrong("--store-cert", cert, e.to_string()))?;
    let key_der = PrivateKeyDer::from_pem_slice(read_pem(key, "--store-key")?.as_bytes())
        .map_err(|e| wrong("--store-key", key, format!("no private key in it (PEM): {e}")))?;
    let certified = rustls::sign::CertifiedKey::from_der(chain, key_der, &weft_core::tls::provider())
        .map_err(|e| wrong("--store-key", key, format!("does not go with --store-cert {}: {e}", cert.display())))?;
    Ok(Arc::new(ClientCert(Arc::new(certified))))
}

/// Presents one fixed certificate to etcd.
#[derive(Debug)]
struct ClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A status's message and the errors under it: tonic says only "transport error", the cause
/// (a refused certificate, a closed connection) is in its sources.
fn with_causes(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        text = format!("{text}: {e}");
        cause = e.source();
    }
    text
}

/// The end of the range of every key starting with `prefix`: the prefix with its last byte
/// incremented.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Holds when `key`'s last change was at etcd revision `revision` (0: the key does not exist).
pub(crate) fn mod_is(key: &str, revision: i64) -> pb::Compare {
    pb::Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Mod as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(TargetUnion::ModRevision(revision)),
        range_end: Vec::new(),
    }
}

/// Holds when `key` was created at etcd revision `revision` (a leader's election key: it is
/// created once per term, so a deposed leader's compare fails even if it is re-created).
pub(crate) fn created_at(key: &str, revision: i64) -> pb::Compare {
    pb::Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(TargetUnion::CreateRevision(revision)),
        range_end: Vec::new(),
    }
}

pub(crate) fn put(key: &str, value: &str) -> pb::RequestOp {
    put_leased(key, value, 0)
}

pub(crate) fn put_leased(key: &str, value: &str, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            lease,
            prev_kv: false,
        })),
    }
}

pub(crate) fn delete(key: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })),
    }
}

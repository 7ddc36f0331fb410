//! A simulated fleet for the control-plane benchmark: N proxies as tokio tasks in one process,
//! each with its own gRPC stream (its own TCP connection) to a real control plane. Each dials
//! like a real proxy (TLS for an `https://` URL, trusting only the CA its join token pins, with
//! its own TLS configuration; plaintext for `http://`), registers with its token, subscribes to
//! a service, ACKs every config and delta, and records when each revision reached it.

use crate::http::Client;
use parking_lot::Mutex;
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use weft_api::proto::{self, control_message, distribution_client::DistributionClient, proxy_message};

/// What one simulated proxy holds and saw.
#[derive(Clone, Default)]
struct Held {
    /// When each revision's config arrived first, and its encoded size.
    arrivals: HashMap<u64, (Instant, usize)>,
    /// The revision of the last config it took (sent as `applied_revision` on reconnecting).
    revision: u64,
    /// Streams on which it was sent a whole config: 2 after one reconnection.
    configured_streams: u32,
    /// Endpoints it holds of the service it calls.
    endpoints: usize,
    /// The fewest it held on any stream after its first (none: no second stream yet).
    fewest_later: Option<usize>,
    /// When a whole config arrived on its second stream (after a replica died or restarted).
    reconfigured: Option<Instant>,
}

type Proxies = Arc<Vec<Mutex<Held>>>;

pub struct Fleet {
    proxies: Proxies,
    /// Streams the control plane refused with a hint to come back later.
    told_to_wait: Arc<AtomicUsize>,
    /// Streams that failed for any other reason (each is retried with backoff).
    failures: Arc<AtomicUsize>,
    /// The last of those failures.
    last_failure: Arc<Mutex<Option<String>>>,
    pub started: Instant,
    tasks: tokio::task::JoinSet<()>,
}

#[derive(Debug)]
pub struct Spread {
    /// The first proxy to have it: what the change took before fan-out began.
    pub first: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub reached: usize,
}

impl Spread {
    /// The spread of `d`, one duration per proxy reached.
    fn of(mut d: Vec<Duration>) -> Self {
        d.sort();
        let q = |p: f64| {
            d.get(((p * d.len() as f64).ceil() as usize).clamp(1, d.len().max(1)) - 1)
                .copied()
                .unwrap_or_default()
        };
        Spread {
            first: d.first().copied().unwrap_or_default(),
            p50: q(0.5),
            p99: q(0.99),
            max: d.last().copied().unwrap_or_default(),
            reached: d.len(),
        }
    }
}

/// Join tokens for `n` simulated workloads `default/sim-0..n`, from the API at `api` through
/// `client` (one that trusts the control plane's CA for an `https://` API), minted with the
/// admin API token `bearer`.
pub async fn tokens(client: &Client, api: &str, bearer: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::with_capacity(n);
    let auth = format!("Bearer {bearer}");
    for i in 0..n {
        let body = format!("{{\"workload\": \"default/sim-{i}\", \"serviceAccount\": \"sim\"}}").into_bytes();
        let r = client
            .post(
                &format!("{api}/api/v1/tokens"),
                body,
                &[("content-type", "application/json"), ("authorization", &auth)],
            )
            .await?;
        anyhow::ensure!(r.status == 200, "token: {} {}", r.status, r.text());
        out.push(r.json()["token"].as_str().unwrap_or_default().to_string());
    }
    Ok(out)
}

impl Fleet {
    /// Connects `tokens.len()` proxies, numbered from `first` (token `k` is for `default/sim-{first
    /// + k}`); proxy `i` is an instance of `sim-svc-{i % services}` (subset `v1`) and calls
    /// `calls`.
    ///
    /// Like real proxies they stay connected until [`Fleet::abort`]: a stream that ends is
    /// opened again, after the wait a busy control plane asked for (with jitter) or a jittered
    /// backoff.
    pub async fn connect(grpc: &str, tokens: Vec<String>, first: usize, services: usize, calls: &str) -> anyhow::Result<Self> {
        let n = tokens.len();
        let proxies: Proxies = Arc::new((0..first + n).map(|_| Mutex::default()).collect());
        let told_to_wait = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        let last_failure = Arc::new(Mutex::new(None));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        // Several control-plane replicas (`URL,URL,...`): proxy i dials the i-th, round robin,
        // and the next one whenever a stream fails, as a real proxy given every URL does.
        let urls: Vec<&str> = grpc.split(',').collect();
        for (i, token) in tokens.into_iter().enumerate().map(|(k, t)| (first + k, t)) {
            let mut replicas = Vec::with_capacity(urls.len());
            for k in 0..urls.len() {
                let url = urls[(i + k) % urls.len()];
                // Keepalive PINGs as a real proxy sends them (a busy control plane must answer them).
                let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?
                    .http2_keep_alive_interval(weft_api::CONTROL_KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(weft_api::CONTROL_KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true);
                replicas.push((endpoint, connector(url, &token)?));
            }
            let sim = Sim {
                i,
                replicas,
                token,
                services,
                calls: calls.to_string(),
                proxies: proxies.clone(),
            };
            let (told_to_wait, failures, last_failure) = (told_to_wait.clone(), failures.clone(), last_failure.clone());
            tasks.spawn(async move {
                let (mut failed, mut replica) = (0u32, 0usize);
                // As a real proxy: a stream refused with a hint is opened again on the same
                // connection (no new TLS handshake).
                let mut kept = None;
                loop {
                    let configured = sim.configured_streams();
                    let outcome = sim.run(replica, &mut kept).await;
                    if sim.configured_streams() > configured {
                        failed = 0;
                    }
                    let wait = match outcome {
                        Err(e) if hint(&e).is_some() => {
                            told_to_wait.fetch_add(1, Ordering::Relaxed);
                            hint(&e).expect("checked")
                        }
                        outcome => {
                            if let Err(e) = outcome {
                                failures.fetch_add(1, Ordering::Relaxed);
                                *last_failure.lock() = Some(format!("sim-{}: {e:#}", sim.i));
                            }
                            failed += 1;
                            replica += 1;
                            // As a real proxy: equal jitter under a cap doubling from 100 ms to 5 s.
                            let cap = (100u64 << failed.min(6)).min(5000);
                            Duration::from_millis(rand::random_range(cap / 2..=cap))
                        }
                    };
                    tokio::time::sleep(wait).await;
                }
            });
        }
        Ok(Fleet {
            proxies,
            told_to_wait,
            failures,
            last_failure,
            started,
            tasks,
        })
    }

    /// How long after `since` each proxy received a config of `revision` or later.
    pub async fn spread(&self, revision: u64, since: Instant) -> Spread {
        let d: Vec<Duration> = self
            .proxies
            .iter()
            .filter_map(|p| {
                let p = p.lock();
                p.arrivals
                    .iter()
                    .filter(|(r, _)| **r >= revision)
                    .map(|(_, (t, _))| *t)
                    .min()
                    .map(|t| t.saturating_duration_since(since))
            })
            .collect();
        Spread::of(d)
    }

    /// How many proxies satisfy `check`.
    fn count(&self, check: impl Fn(&Held) -> bool) -> usize {
        self.proxies.iter().filter(|p| check(&p.lock())).count()
    }

    /// How many proxies have a config of `revision` or later.
    pub async fn count_at(&self, revision: u64) -> usize {
        self.count(|p| p.arrivals.keys().any(|r| *r >= revision))
    }

    /// How many proxies were sent a whole config on at least `streams` streams, hold
    /// `revision` or later, and `endpoints` endpoints of the service they call: after a
    /// control-plane restart (`streams` 2), back in sync.
    pub fn count_synced(&self, streams: u32, revision: u64, endpoints: usize) -> usize {
        self.count(|p| p.configured_streams >= streams && p.revision >= revision && p.endpoints == endpoints)
    }

    /// How many of the proxies `which` (by number) have a second stream, hold `revision` or
    /// later and exactly `endpoints` endpoints of the service they call.
    pub fn count_exactly_synced(&self, which: impl Fn(usize) -> bool, revision: u64, endpoints: usize) -> usize {
        self.proxies
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                which(*i) && {
                    let p = p.lock();
                    p.configured_streams >= 2 && p.revision >= revision && p.endpoints == endpoints
                }
            })
            .count()
    }

    /// How many proxies were sent a whole config on at least `streams` streams (after a
    /// control-plane restart, `streams` 2: reconnected and configured again, in sync or not).
    pub fn count_configured_on(&self, streams: u32) -> usize {
        self.count(|p| p.configured_streams >= streams)
    }

    /// The fewest and the most endpoints of the service they call that any proxy holds.
    pub fn endpoints_held(&self) -> (usize, usize) {
        let held: Vec<usize> = self.proxies.iter().map(|p| p.lock().endpoints).collect();
        (held.iter().copied().min().unwrap_or(0), held.iter().copied().max().unwrap_or(0))
    }

    /// The fewest endpoints of the service they call any proxy held on a stream after its
    /// first (after a control-plane restart: 0 would be a proxy left without its endpoints).
    pub fn fewest_endpoints_after_reconnecting(&self) -> Option<usize> {
        self.proxies.iter().filter_map(|p| p.lock().fewest_later).min()
    }

    /// Of the proxies `which` (by number), how long after `since` each was sent a whole config
    /// on a second stream, among those that hold `revision` or later and at least `endpoints`
    /// endpoints of the service they call (none missing): after their replica died, on another.
    pub fn resynced(&self, which: impl Fn(usize) -> bool, revision: u64, endpoints: usize, since: Instant) -> Spread {
        let d: Vec<Duration> = self
            .proxies
            .iter()
            .enumerate()
            .filter(|(i, _)| which(*i))
            .filter_map(|(_, p)| {
                let p = p.lock();
                let synced = p.revision >= revision && p.endpoints >= endpoints;
                p.reconfigured.filter(|_| synced).map(|t| t.saturating_duration_since(since))
            })
            .collect();
        Spread::of(d)
    }

    /// The lowest revision any proxy holds.
    pub fn lowest_revision(&self) -> u64 {
        self.proxies.iter().map(|p| p.lock().revision).min().unwrap_or(0)
    }

    /// Streams refused with a hint to come back later, so far.
    pub fn told_to_wait(&self) -> usize {
        self.told_to_wait.load(Ordering::Relaxed)
    }

    /// Streams that failed otherwise (connect errors, streams ended by the control plane), so far.
    pub fn failures(&self) -> usize {
        self.failures.load(Ordering::Relaxed)
    }

    /// The last stream failure counted in [`Fleet::failures`].
    pub fn last_failure(&self) -> Option<String> {
        self.last_failure.lock().clone()
    }

    /// Encoded size of the config each proxy got for `revision` (the first proxy's).
    pub async fn push_bytes(&self, revision: u64) -> usize {
        self.proxies
            .iter()
            .find_map(|p| p.lock().arrivals.get(&revision).map(|(_, b)| *b))
            .unwrap_or(0)
    }

    pub fn abort(mut self) {
        self.tasks.abort_all();
    }
}

/// The wait a busy control plane asked for, jittered up to a quarter more (as the real proxy
/// does), if that is why the stream failed.
fn hint(error: &anyhow::Error) -> Option<Duration> {
    let status = error.downcast_ref::<tonic::Status>()?;
    let ms: u64 = status.metadata().get(weft_api::RETRY_AFTER_MS)?.to_str().ok()?.parse().ok()?;
    Some(Duration::from_millis(rand::random_range(ms..=ms + ms / 4)))
}

/// How a simulated proxy dials `grpc`: as a real one does, TLS pinned to its token's CA for
/// `https://`, plaintext for `http://`.
fn connector(grpc: &str, token: &str) -> anyhow::Result<weft_core::tls::Connector> {
    if grpc.starts_with("http://") {
        return Ok(weft_core::tls::Connector::plaintext());
    }
    let claims = weft_api::token::peek(token)?;
    let verifier = std::sync::Arc::new(weft_core::tls::PinnedVerifier::new(&claims.ca));
    let config = weft_core::tls::client_config(verifier, None, &[weft_core::tls::ALPN_H2])?;
    Ok(weft_core::tls::Connector::tls(Arc::new(config)))
}

/// One simulated proxy.
struct Sim {
    i: usize,
    /// Every replica, its own first: a failed stream moves it to the next.
    replicas: Vec<(tonic::transport::Endpoint, weft_core::tls::Connector)>,
    token: String,
    services: usize,
    calls: String,
    proxies: Proxies,
}

impl Sim {
    fn held(&self) -> parking_lot::MutexGuard<'_, Held> {
        self.proxies[self.i].lock()
    }

    fn configured_streams(&self) -> u32 {
        self.held().configured_streams
    }

    /// One stream to the `replica`-th replica (counting round from its own), until it ends.
    async fn run(&self, replica: usize, kept: &mut Option<tonic::transport::Channel>) -> anyhow::Result<()> {
        let i = self.i;
        let (endpoint, connector) = &self.replicas[replica % self.replicas.len()];
        let channel = match kept.take() {
            Some(channel) => channel,
            None => endpoint.clone().connect_with_connector(connector.clone()).await?,
        };
        let mut client = DistributionClient::new(channel.clone());
        let (tx, rx) = mpsc::channel::<proto::ProxyMessage>(16);
        // Loopback addresses that nobody dials: the benchmark measures distribution only.
        let inbound = format!("127.0.{}.{}:{}", 1 + i / 60000, 1 + (i / 250) % 250, 10000 + i % 50000);
        let register = proto::Register {
            namespace: "default".into(),
            name: format!("sim-{i}"),
            cluster: format!("cluster-{}", i % 3),
            labels: [
                ("service".to_string(), format!("sim-svc-{}", i % self.services.max(1))),
                ("version".to_string(), "v1".to_string()),
            ]
            .into(),
            inbound_addr: inbound,
            services: vec![self.calls.clone()],
            applied_revision: self.held().revision,
            token: self.token.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        tx.send(proto::ProxyMessage {
            msg: Some(proxy_message::Msg::Register(register)),
        })
        .await?;
        let mut stream = match client.connect(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                if status.metadata().get(weft_api::RETRY_AFTER_MS).is_some() {
                    *kept = Some(channel);
                }
                return Err(status.into());
            }
        };
        let calls = format!("default/{}", self.calls);
        while let Some(msg) = stream.next().await {
            // A whole config or a delta on the last one: either is ACKed. The simulator keeps
            // of a config only its revision and how many endpoints of the service it calls it
            // holds; it measures when each revision arrives and how big its message was.
            let (version, revision, bytes) = match msg?.msg {
                Some(control_message::Msg::Config(cfg)) => {
                    let mut held = self.held();
                    held.configured_streams += 1;
                    if held.configured_streams == 2 {
                        held.reconfigured = Some(Instant::now());
                    }
                    held.endpoints = cfg
                        .services
                        .iter()
                        .filter(|s| s.name == self.calls)
                        .map(|s| s.endpoints.len())
                        .sum();
                    (cfg.version, cfg.revision, cfg.encoded_len())
                }
                Some(control_message::Msg::Delta(delta)) => {
                    let mut held = self.held();
                    for change in delta.endpoints.iter().filter(|c| c.service == calls) {
                        let kept = if change.replace {
                            0
                        } else {
                            held.endpoints - change.removed.len().min(held.endpoints)
                        };
                        held.endpoints = kept + change.added.len();
                    }
                    (delta.version, delta.revision, delta.encoded_len())
                }
                _ => continue,
            };
            {
                let mut held = self.held();
                held.arrivals.entry(revision).or_insert((Instant::now(), bytes));
                held.revision = revision;
                if held.configured_streams >= 2 {
                    held.fewest_later = Some(held.fewest_later.unwrap_or(usize::MAX).min(held.endpoints));
                }
            }
            tx.send(proto::ProxyMessage {
                msg: Some(proxy_message::Msg::Ack(proto::Ack { version, revision })),
            })
            .await?;
        }
        Ok(())
    }
}

/// CPU seconds (user + system) process `pid` has used, from `/proc/PID/stat` (clock ticks of
/// 1/100 s, as on every Linux this runs on).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident memory of a process, bytes (from /proc).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Waits until `check` holds, polling every 10 ms; returns how long it took.
pub async fn until<F, Fut>(within: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while t.elapsed() < within {
        if check().await {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

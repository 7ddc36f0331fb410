//! A simulated fleet for the control-plane benchmark: N proxies as tokio tasks in one process,
//! each with its own gRPC stream (its own TCP connection) to a real control plane. Each dials
//! like a real proxy (TLS for an `https://` URL, trusting only the CA its join token pins, with
//! its own TLS configuration; plaintext for `http://`), registers with its token, subscribes to
//! a service, ACKs every config and delta, and records when each revision reached it.

use crate::http::Client;
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::StreamExt;
use weft_api::proto::{self, control_message, distribution_client::DistributionClient, proxy_message};

/// Per proxy: when each revision's config arrived, and its encoded size.
type Arrivals = Arc<Mutex<Vec<HashMap<u64, (Instant, usize)>>>>;

pub struct Fleet {
    /// Per proxy: when each revision's config arrived, and its encoded size.
    arrivals: Arrivals,
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
    pub async fn connect(grpc: &str, tokens: Vec<String>, first: usize, services: usize, calls: &str) -> anyhow::Result<Self> {
        let n = tokens.len();
        let arrivals = Arc::new(Mutex::new(vec![HashMap::new(); first + n]));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        // Several control-plane replicas (`URL,URL,...`): proxy i dials the i-th, round robin.
        let urls: Vec<&str> = grpc.split(',').collect();
        for (i, token) in tokens.into_iter().enumerate().map(|(k, t)| (first + k, t)) {
            let url = urls[i % urls.len()];
            let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?;
            let connector = connector(url, &token)?;
            let arrivals = arrivals.clone();
            let calls = calls.to_string();
            tasks.spawn(async move {
                // Like a real proxy: reconnect with jittered backoff when the stream cannot be
                // opened (a thousand connects at once can overflow the listen backlog).
                for attempt in 0..8u32 {
                    let run = run_one(
                        i,
                        endpoint.clone(),
                        connector.clone(),
                        token.clone(),
                        services,
                        calls.clone(),
                        arrivals.clone(),
                    );
                    match run.await {
                        Ok(()) => return,
                        Err(e) if attempt == 7 => eprintln!("sim-{i}: {e}"),
                        Err(_) => {
                            let cap = 50u64 << attempt.min(6);
                            tokio::time::sleep(Duration::from_millis(rand::random_range(cap / 2..=cap))).await;
                        }
                    }
                }
            });
        }
        Ok(Fleet { arrivals, started, tasks })
    }

    /// How long after `since` each proxy received a config of `revision` or later.
    pub async fn spread(&self, revision: u64, since: Instant) -> Spread {
        let arrivals = self.arrivals.lock().await;
        let mut d: Vec<Duration> = arrivals
            .iter()
            .filter_map(|a| {
                a.iter()
                    .filter(|(r, _)| **r >= revision)
                    .map(|(_, (t, _))| *t)
                    .min()
                    .map(|t| t.saturating_duration_since(since))
            })
            .collect();
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

    /// How many proxies have a config of `revision` or later.
    pub async fn count_at(&self, revision: u64) -> usize {
        self.arrivals
            .lock()
            .await
            .iter()
            .filter(|a| a.keys().any(|r| *r >= revision))
            .count()
    }

    /// Encoded size of the config each proxy got for `revision` (the first proxy's).
    pub async fn push_bytes(&self, revision: u64) -> usize {
        let arrivals = self.arrivals.lock().await;
        arrivals.iter().find_map(|a| a.get(&revision).map(|(_, b)| *b)).unwrap_or(0)
    }

    pub fn abort(mut self) {
        self.tasks.abort_all();
    }
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

async fn run_one(
    i: usize,
    endpoint: tonic::transport::Endpoint,
    connector: weft_core::tls::Connector,
    token: String,
    services: usize,
    calls: String,
    arrivals: Arrivals,
) -> anyhow::Result<()> {
    let channel = endpoint.connect_with_connector(connector).await?;
    let mut client = DistributionClient::new(channel);
    let (tx, rx) = mpsc::channel::<proto::ProxyMessage>(16);
    // Loopback addresses that nobody dials: the benchmark measures distribution only.
    let inbound = format!("127.0.{}.{}:{}", 1 + i / 60000, 1 + (i / 250) % 250, 10000 + i % 50000);
    let register = proto::Register {
        namespace: "default".into(),
        name: format!("sim-{i}"),
        cluster: format!("cluster-{}", i % 3),
        labels: [
            ("service".to_string(), format!("sim-svc-{}", i % services.max(1))),
            ("version".to_string(), "v1".to_string()),
        ]
        .into(),
        inbound_addr: inbound,
        services: vec![calls],
        applied_revision: 0,
        token,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    tx.send(proto::ProxyMessage {
        msg: Some(proxy_message::Msg::Register(register)),
    })
    .await?;
    let mut stream = client.connect(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    while let Some(msg) = stream.next().await {
        // A whole config or a delta on the last one: either is ACKed (the simulator keeps no
        // config; it measures when each revision arrives and how big its message was).
        let (version, revision, bytes) = match msg?.msg {
            Some(control_message::Msg::Config(cfg)) => (cfg.version, cfg.revision, cfg.encoded_len()),
            Some(control_message::Msg::Delta(delta)) => (delta.version, delta.revision, delta.encoded_len()),
            _ => continue,
        };
        arrivals.lock().await[i].entry(revision).or_insert((Instant::now(), bytes));
        tx.send(proto::ProxyMessage {
            msg: Some(proxy_message::Msg::Ack(proto::Ack { version, revision })),
        })
        .await?;
    }
    Ok(())
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

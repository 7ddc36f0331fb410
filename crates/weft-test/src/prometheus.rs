//! A real Prometheus server (Debian's `prometheus`) scraping targets the test names, and PromQL
//! queries against it.

use crate::http::Client;
use crate::process::{Process, free_addr};
use anyhow::{Context, bail};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const PROMETHEUS: &str = "/usr/bin/prometheus";

pub struct Prometheus {
    pub addr: SocketAddr,
    process: Process,
    dir: PathBuf,
}

/// One scrape job.
pub struct Job {
    pub name: String,
    pub metrics_path: String,
    pub targets: Vec<SocketAddr>,
    /// Scrape over HTTPS, trusting this CA file (and checking the target's address is in the
    /// certificate); plain HTTP when `None`.
    pub ca_file: Option<PathBuf>,
    /// A bearer token to send (the control plane's `/metrics` needs a viewer's).
    pub bearer: Option<String>,
}

impl Job {
    /// Plain HTTP targets (proxies' admin listeners).
    pub fn plain(name: &str, metrics_path: &str, targets: Vec<SocketAddr>) -> Self {
        Self {
            name: name.into(),
            metrics_path: metrics_path.into(),
            targets,
            ca_file: None,
            bearer: None,
        }
    }

    /// The control plane's `/metrics`, over TLS with its CA when it serves TLS.
    pub fn control(name: &str, control: &crate::Control) -> Self {
        Self {
            ca_file: control.tls.then(|| control.ca_file()),
            ..Self::plain(name, "/metrics", vec![control.api])
        }
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `jobs` every second.
    pub async fn start(jobs: &[Job]) -> anyhow::Result<Self> {
        if !std::path::Path::new(PROMETHEUS).exists() {
            bail!("{PROMETHEUS} is missing: scripts/test installs Debian's prometheus");
        }
        let addr = free_addr();
        let dir = std::env::temp_dir().join(format!("weft-prometheus-{}-{}", std::process::id(), addr.port()));
        std::fs::create_dir_all(&dir)?;
        let mut config = String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n");
        for job in jobs {
            let list: Vec<String> = job.targets.iter().map(|t| format!("'{t}'")).collect();
            config.push_str(&format!(
                "  - job_name: {}\n    metrics_path: {}\n    static_configs:\n      - targets: [{}]\n",
                job.name,
                job.metrics_path,
                list.join(", ")
            ));
            if let Some(ca) = &job.ca_file {
                config.push_str(&format!("    scheme: https\n    tls_config:\n      ca_file: '{}'\n", ca.display()));
            }
            if let Some(token) = &job.bearer {
                config.push_str(&format!("    authorization: {{type: Bearer, credentials: '{token}'}}\n"));
            }
        }
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config)?;
        let process = Process::spawn(
            PROMETHEUS,
            "prometheus",
            &[
                format!("--config.file={}", file.display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address={addr}"),
            ],
        );
        let p = Prometheus { addr, process, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = Client::new().get(&format!("http://{addr}/-/ready")).await
                && r.status == 200
            {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!("prometheus did not become ready:\n{}", p.process.log_text());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs an instant PromQL query; returns `data.result`.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Vec<Value>> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let r = Client::new().get(&format!("http://{}/api/v1/query?query={q}", self.addr)).await?;
        let v = r.json();
        if v["status"] != "success" {
            bail!("query {promql}: {v}");
        }
        v["data"]["result"].as_array().cloned().context("no result array")
    }

    /// Runs `promql` until `check` accepts its result, and returns what `check` made of it; fails
    /// after `within` with the last result. For series that need scrapes to cover a window.
    pub async fn wait_for<T>(&self, within: Duration, promql: &str, check: impl Fn(&[Value]) -> Option<T>) -> T {
        let deadline = Instant::now() + within;
        loop {
            let last = self.query(promql).await;
            if let Ok(rows) = &last
                && let Some(v) = check(rows)
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {within:?} on {promql}: last result {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

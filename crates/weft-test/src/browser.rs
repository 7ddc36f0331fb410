//! Headless Chromium for dashboard tests, driven over the W3C WebDriver protocol by Debian's
//! `chromedriver`: a real browser loading the page the control plane serves.

use crate::process::{Process, free_addr};
use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as Legacy;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The binaries Debian's `chromium` and `chromium-driver` install.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    driver: Process,
    addr: SocketAddr,
    session: String,
    client: Legacy<HttpConnector, Full<Bytes>>,
    _profile: TempDir,
}

/// A directory removed on drop (the browser profile).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a `width` x `height` window.
    ///
    /// `trusted_spki`: base64 SHA-256 hashes of the public keys whose certificates the browser
    /// accepts although no CA it knows issued them (`Control::serving_spki`). Chromium trusts
    /// only its own store; a pin on the one serving key is narrower than trusting the mesh CA
    /// (whose workload certificates are also valid for server auth) and far narrower than
    /// `acceptInsecureCerts`. Chromium honours the list only with `--user-data-dir`, which
    /// every session here has.
    pub async fn start(width: u32, height: u32, trusted_spki: &[String]) -> anyhow::Result<Self> {
        for bin in [CHROMEDRIVER, CHROMIUM] {
            if !Path::new(bin).exists() {
                bail!("{bin} is missing: scripts/test installs Debian's chromium and chromium-driver");
            }
        }
        let addr = free_addr();
        let driver = Process::spawn(CHROMEDRIVER, "chromedriver", &[format!("--port={}", addr.port())]);
        let client = Legacy::builder(TokioExecutor::new()).build_http();
        let profile = std::env::temp_dir().join(format!("weft-chromium-{}-{}", std::process::id(), addr.port()));
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
            client,
            _profile: TempDir(profile.clone()),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while b.call("GET", "/status", None).await.is_err() {
            if Instant::now() > deadline {
                bail!("chromedriver did not start on {addr}:\n{}", b.driver.log_text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.display()),
        ];
        if !trusted_spki.is_empty() {
            args.push(format!("--ignore-certificate-errors-spki-list={}", trusted_spki.join(",")));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args}
        }}});
        let created = b.call("POST", "/session", Some(caps)).await.context("new WebDriver session")?;
        b.session = created["sessionId"].as_str().context("no sessionId")?.to_string();
        Ok(b)
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req)).await??;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("WebDriver {method} {path}: {status} {}", v["value"]["message"]);
        }
        Ok(v["value"].clone())
    }

    fn at(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call("POST", &self.at("/url"), Some(json!({"url": url}))).await.map(|_| ())
    }

    /// Runs `script` (a function body) in the page with `args`; returns its value.
    pub async fn eval(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.call("POST", &self.at("/execute/sync"), Some(json!({"script": script, "args": args})))
            .await
    }

    /// The text of the first element matching `css`, or `None`.
    pub async fn text(&self, css: &str) -> anyhow::Result<Option<String>> {
        let v = self
            .eval(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
                json!([css]),
            )
            .await?;
        Ok(v.as_str().map(str::to_string))
    }

    /// How many elements match `css`.
    pub async fn count(&self, css: &str) -> anyhow::Result<usize> {
        let v = self
            .eval("return document.querySelectorAll(arguments[0]).length;", json!([css]))
            .await?;
        Ok(v.as_u64().unwrap_or(0) as usize)
    }

    /// Clicks the first element matching `css` the way a user does (WebDriver element click).
    /// A live page re-renders; an element replaced between finding and clicking is found again.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let mut last = None;
        for _ in 0..5 {
            match self.click_once(css).await {
                Ok(()) => return Ok(()),
                Err(e) if e.to_string().contains("stale element") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("five stale attempts"))
    }

    async fn click_once(&self, css: &str) -> anyhow::Result<()> {
        let found = self
            .call("POST", &self.at("/element"), Some(json!({"using": "css selector", "value": css})))
            .await?;
        let id = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .context("no element id")?
            .to_string();
        self.call("POST", &self.at(&format!("/element/{id}/click")), Some(json!({})))
            .await
            .map(|_| ())
    }

    /// Waits until `check` returns `Some`, polling every 100 ms.
    pub async fn wait_for<T, F, Fut>(&self, within: Duration, what: &str, mut check: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
    {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = check().await? {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("timed out after {within:?} waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG screenshot of the page to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine;
        let v = self.call("GET", &self.at("/screenshot"), None).await?;
        let png = base64::engine::general_purpose::STANDARD.decode(v.as_str().context("no screenshot")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session (and Chromium) before chromedriver goes; best effort.
        if !self.session.is_empty() {
            let url = format!("http://{}/session/{}", self.addr, self.session);
            let _ = std::process::Command::new("curl")
                .args(["-s", "-m", "5", "-X", "DELETE", &url])
                .stdout(std::process::Stdio::null())
                .status();
        }
        self.driver.kill();
    }
}

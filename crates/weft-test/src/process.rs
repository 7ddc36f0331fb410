//! Real `weft` processes: the control plane and proxies, with their logs kept for failures.

use crate::http::Client;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A loopback address free right now, from below the ephemeral range (see
/// [`weft_core::ports::loopback`]: a port the kernel picked could be taken by an outgoing
/// connection before the process meant to bind it did).
pub fn free_addr() -> SocketAddr {
    weft_core::ports::loopback().expect("a free loopback port")
}

/// Descendants of `pid`, from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parents = std::collections::HashMap::<u32, Vec<u32>>::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = after.split(' ').nth(1).unwrap().parse().unwrap();
        parents.entry(ppid).or_default().push(child);
    }
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        for c in parents.get(&p).cloned().unwrap_or_default() {
            out.push(c);
            stack.push(c);
        }
    }
    out
}

/// A child process killed when dropped; its output goes to a log file printed on failure.
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    /// Whether the log outlives the process (a replaced control plane's: see [`Control`]).
    kept: bool,
}

impl Process {
    pub fn spawn(bin: &str, name: &str, args: &[String]) -> Self {
        Self::spawn_env(bin, name, args, &[])
    }

    /// As [`Process::spawn`], with extra environment (secrets such as join tokens go here).
    pub fn spawn_env(bin: &str, name: &str, args: &[String], env: &[(&str, &str)]) -> Self {
        let log = std::env::temp_dir().join(format!(
            "weft-test-{}-{}-{}.log",
            std::process::id(),
            name.replace('/', "_"),
            rand_suffix()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        Self {
            name: name.to_string(),
            child,
            log,
            kept: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; waits up to `within` for a clean exit and returns its status code.
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        self.wait(within)
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    pub fn wait(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill();
        }
        if std::thread::panicking() {
            eprintln!("---- log of {} ({}) ----\n{}", self.name, self.log.display(), self.log_text());
        } else if !self.kept {
            // Kept only for a failure: a whole suite's logs ran to hundreds of files in /tmp.
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

pub(crate) fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A control plane process. It serves TLS unless started with `--insecure-plaintext`; the
/// harness trusts it through the `ca.pem` it writes to its data directory, as the CLI does.
pub struct Control {
    pub process: Process,
    pub api: SocketAddr,
    pub grpc: SocketAddr,
    pub data_dir: PathBuf,
    /// The bootstrap admin API token the control plane wrote to `admin.token`.
    pub admin_token: String,
    /// Whether it serves TLS.
    pub tls: bool,
    bin: String,
    extra: Vec<String>,
    /// The logs of the processes restarts replaced, printed if the test fails later.
    retired: Vec<PathBuf>,
    /// Whether the data directory is this harness's own (made by `start*`, removed when the
    /// control plane is dropped, kept for a failing test) or the caller's (`start_at`).
    owned: bool,
}

impl Drop for Control {
    fn drop(&mut self) {
        self.process.kill();
        let failed = std::thread::panicking();
        for log in &self.retired {
            if failed {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                eprintln!("---- log of control before a restart ({}) ----\n{text}", log.display());
            } else {
                let _ = std::fs::remove_file(log);
            }
        }
        if self.owned && !failed {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

impl Control {
    pub async fn start(bin: &str) -> Self {
        let data_dir = std::env::temp_dir().join(format!("weft-test-data-{}-{}", std::process::id(), rand_suffix()));
        let _ = std::fs::remove_dir_all(&data_dir);
        Self::launch(bin, &data_dir, free_addr(), free_addr(), Vec::new(), false)
            .await
            .owning()
    }

    /// A control plane with extra flags (`--root-cert`, `--cert-ttl`, `--insecure-plaintext`...).
    pub async fn start_with(bin: &str, extra: &[String]) -> Self {
        let data_dir = std::env::temp_dir().join(format!("weft-test-data-{}-{}", std::process::id(), rand_suffix()));
        let _ = std::fs::remove_dir_all(&data_dir);
        Self::launch(bin, &data_dir, free_addr(), free_addr(), extra.to_vec(), false)
            .await
            .owning()
    }

    /// A replica keeping the mesh in etcd at `store` (`etcd://...`), with a data directory of its
    /// own. `admin_token`: the bootstrap token an earlier replica registered (written to this
    /// one's `admin.token`, as an operator copies it), or `None` for the first replica.
    pub async fn start_on_store(bin: &str, store: &str, admin_token: Option<&str>, extra: &[String]) -> Self {
        let data_dir = std::env::temp_dir().join(format!("weft-test-data-{}-{}", std::process::id(), rand_suffix()));
        let _ = std::fs::remove_dir_all(&data_dir);
        if let Some(token) = admin_token {
            std::fs::create_dir_all(&data_dir).unwrap();
            std::fs::write(data_dir.join("admin.token"), token).unwrap();
        }
        let mut extra = extra.to_vec();
        extra.extend(["--store".to_string(), store.to_string()]);
        Self::launch(bin, &data_dir, free_addr(), free_addr(), extra, false).await.owning()
    }

    /// Takes `next`'s place: the same data directory, which the old value must not remove.
    fn replace(&mut self, mut next: Self) {
        next.owned = std::mem::replace(&mut self.owned, false);
        self.process.kept = true;
        next.retired = std::mem::take(&mut self.retired);
        next.retired.push(self.process.log.clone());
        *self = next;
    }

    fn owning(mut self) -> Self {
        self.owned = true;
        self
    }

    pub async fn start_at(bin: &str, data_dir: &Path, api: SocketAddr, grpc: SocketAddr) -> Self {
        Self::launch(bin, data_dir, api, grpc, Vec::new(), true).await
    }

    /// Starts the process; `keep_ports` retries on the same addresses (a restart), otherwise
    /// on fresh ones.
    async fn launch(bin: &str, data_dir: &Path, api: SocketAddr, grpc: SocketAddr, extra: Vec<String>, keep_ports: bool) -> Self {
        let mut args: Vec<String> = [
            "control",
            "--data-dir",
            &data_dir.display().to_string(),
            "--api",
            &api.to_string(),
            "--grpc",
            &grpc.to_string(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().cloned());
        let tls = !extra.iter().any(|a| a == "--insecure-plaintext");
        let mut process = Process::spawn(bin, "control", &args);
        let ca_file = data_dir.join("ca.pem");
        let url = format!("{}://{api}/ready", if tls { "https" } else { "http" });
        // Up when the API answers (over TLS, trusting the CA file it wrote). A port picked by the
        // caller may have been taken before the control plane bound it: fresh ports for a fresh
        // start, the same ones for a restart.
        let up = crate::eventually(Duration::from_secs(30), "control plane API up (or exited)", || {
            let (url, ca_file, running) = (&url, &ca_file, process.is_running());
            async move {
                if !running {
                    return Some(false);
                }
                let client = if tls {
                    Client::trusting(&std::fs::read_to_string(ca_file).ok()?)
                } else {
                    Client::new()
                };
                client.get(url).await.ok().filter(|r| r.status == 200).map(|_| true)
            }
        })
        .await;
        if !up {
            let log = process.log_text();
            assert!(log.contains("cannot bind"), "the control plane exited at start:\n{log}");
            let (api, grpc) = if keep_ports { (api, grpc) } else { (free_addr(), free_addr()) };
            if keep_ports {
                // The old process's sockets may still be closing; this is the only wait for them.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            return Box::pin(Self::launch(bin, data_dir, api, grpc, extra, keep_ports)).await;
        }
        let admin_token = std::fs::read_to_string(data_dir.join("admin.token"))
            .expect("the control plane wrote admin.token")
            .trim()
            .to_string();
        Self {
            process,
            api,
            grpc,
            data_dir: data_dir.to_path_buf(),
            admin_token,
            tls,
            bin: bin.to_string(),
            extra,
            retired: Vec::new(),
            owned: false,
        }
    }

    /// Kills the process and starts a new one on the same addresses and data directory.
    pub async fn restart(&mut self) {
        self.process.kill();
        self.replace(Self::launch(&self.bin, &self.data_dir, self.api, self.grpc, self.extra.clone(), true).await);
    }

    /// Stops the process with SIGTERM, as a rolling restart does, and starts a new one on the
    /// same addresses, data directory and flags once it has exited; returns when the new one
    /// serves. Panics when the old one does not exit cleanly within `within`.
    pub async fn restart_gracefully(&mut self, within: Duration) {
        let code = self.process.terminate(within);
        assert_eq!(
            code,
            Some(0),
            "the control plane exits cleanly on SIGTERM:\n{}",
            self.process.log_text()
        );
        self.replace(Self::launch(&self.bin, &self.data_dir, self.api, self.grpc, self.extra.clone(), true).await);
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme(), self.api)
    }

    pub fn grpc_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.grpc)
    }

    /// The roots the control plane serves from (its `ca.pem`).
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("ca.pem")
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.ca_file()).expect("the control plane wrote ca.pem")
    }

    /// An HTTP client for the API: trusting the CA file, or plaintext for an insecure one.
    pub fn client(&self) -> Client {
        if self.tls {
            Client::trusting(&self.ca_pem())
        } else {
            Client::new()
        }
    }

    /// The CLI pointed at this control plane (`--server`, `--ca-file`) with the admin token,
    /// isolated from the user's own saved login.
    pub fn cli(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.bin);
        cmd.args(["--server", &self.url("")])
            .env("WEFT_API_TOKEN", &self.admin_token)
            .env("WEFT_CONFIG", self.data_dir.join("no-user-config.json"));
        if self.tls {
            cmd.arg("--ca-file").arg(self.ca_file());
        }
        cmd
    }

    /// A gRPC channel to the control stream as a proxy dials it: TLS trusting only the root
    /// whose fingerprint join tokens pin (the first certificate of `ca.pem`), or plaintext.
    pub async fn channel(&self) -> tonic::transport::Channel {
        self.channel_with(|e| e).await
    }

    /// As [`Control::channel`], with the endpoint's settings changed by `endpoint` (a small
    /// HTTP/2 window, for a client that reads slowly).
    pub async fn channel_with(
        &self,
        endpoint: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
    ) -> tonic::transport::Channel {
        let connector = if self.tls {
            let root = weft_core::tls::certs_from_pem(&self.ca_pem(), "ca.pem").expect("ca.pem holds the root");
            let pin = weft_core::tls::PinnedVerifier::new(&weft_core::tls::fingerprint(&root[0]));
            let config = weft_core::tls::client_config(std::sync::Arc::new(pin), None, &[weft_core::tls::ALPN_H2])
                .expect("TLS client configuration");
            weft_core::tls::Connector::tls(std::sync::Arc::new(config))
        } else {
            weft_core::tls::Connector::plaintext()
        };
        endpoint(tonic::transport::Endpoint::from_shared(self.grpc_url()).expect("valid URL"))
            .connect_with_connector(connector)
            .await
            .expect("the control plane's gRPC answers")
    }

    /// Base64 of the SHA-256 of the serving certificate's public key (SPKI), as Chromium's
    /// `--ignore-certificate-errors-spki-list` takes it.
    pub async fn serving_spki(&self) -> String {
        use base64::Engine;
        let tls = self.api_tls().await;
        let leaf = tls.get_ref().1.peer_certificates().expect("a serving certificate")[0].clone();
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).expect("a readable certificate");
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.tbs_certificate.subject_pki.raw);
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    }

    /// A TLS connection to the REST API (HTTP/1.1 by ALPN, trusting `ca.pem`), for a test that
    /// writes its own bytes.
    pub async fn api_tls(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let config = weft_core::tls::client_config(
            weft_core::tls::roots_verifier(&self.ca_pem(), "ca.pem").expect("a CA to trust"),
            None,
            &[weft_core::tls::ALPN_HTTP1],
        )
        .expect("TLS client configuration");
        let tcp = tokio::net::TcpStream::connect(self.api).await.expect("the API listens");
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .expect("TLS handshake with the API")
    }

    /// GET with the admin token; asserts 200.
    pub async fn get(&self, path: &str) -> Value {
        let (status, v) = self.call_as("GET", path, "", &self.admin_token).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// POST with the admin token.
    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.call_as("POST", path, body, &self.admin_token).await
    }

    /// Applies `yaml` (asserting 200) and waits until `caller` runs the revision it made;
    /// returns that revision.
    pub async fn apply_until_run_by(&self, caller: &ProxyHandle, yaml: &str) -> u64 {
        let (status, applied) = self.post("/api/v1/resources", yaml).await;
        assert_eq!(status, 200, "{applied}");
        let rev = applied["revision"].as_u64().expect("a revision");
        crate::eventually(Duration::from_secs(15), "the caller runs the new revision", || async {
            (caller.config_dump().await["config"]["revision"].as_u64() >= Some(rev)).then_some(())
        })
        .await;
        rev
    }

    /// Any call with `token` as the bearer credential (none when empty): status and JSON body.
    pub async fn call_as(&self, method: &str, path: &str, body: &str, token: &str) -> (u16, Value) {
        let r = self.send_as(method, path, body, token).await;
        (r.status, r.json())
    }

    /// `/metrics` as Prometheus text (read with the admin token).
    pub async fn metrics(&self) -> String {
        let r = self.send_as("GET", "/metrics", "", &self.admin_token).await;
        assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
        r.text()
    }

    async fn send_as(&self, method: &str, path: &str, body: &str, token: &str) -> crate::http::Reply {
        let mut req = hyper::Request::builder().method(method).uri(self.url(path));
        if !token.is_empty() {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
            .expect("a valid request");
        self.client().send(req).await.expect("API answers")
    }

    /// An API token with `role` (viewer, operator, admin), created with the admin token.
    pub async fn api_token(&self, name: &str, role: &str) -> String {
        let body = serde_json::json!({"name": name, "role": role}).to_string();
        let (status, v) = self.post("/api/v1/admin/tokens", &body).await;
        assert_eq!(status, 201, "API token {name}: {v}");
        v["token"].as_str().unwrap().to_string()
    }

    /// A join token for `workload` (NS/NAME) with service account `sa`.
    pub async fn token(&self, workload: &str, sa: &str) -> String {
        let body = serde_json::json!({"workload": workload, "serviceAccount": sa}).to_string();
        let (status, v) = self.post("/api/v1/tokens", &body).await;
        assert_eq!(status, 200, "token for {workload}: {v}");
        v["token"].as_str().unwrap().to_string()
    }

    pub fn revision_of(status: &Value) -> u64 {
        status["revision"].as_u64().unwrap()
    }
}

/// A proxy process with its listener addresses.
pub struct ProxyHandle {
    pub process: Process,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub workload: String,
}

impl ProxyHandle {
    /// Starts `weft proxy` for `workload` (NS/NAME) in front of `app`, and waits until ready.
    pub async fn start(bin: &str, control: &Control, workload: &str, cluster: &str, labels: &[(&str, &str)], app: SocketAddr) -> Self {
        let name = workload.rsplit('/').next().unwrap();
        let sa = labels.iter().find(|(k, _)| *k == "service").map(|(_, v)| *v).unwrap_or(name);
        let token = control.token(workload, sa).await;
        Self::start_url(bin, &control.grpc_url(), Some(&token), workload, cluster, labels, app).await
    }

    /// As [`ProxyHandle::start`], with access logs on.
    pub async fn start_logged(
        bin: &str,
        control: &Control,
        workload: &str,
        cluster: &str,
        labels: &[(&str, &str)],
        app: SocketAddr,
    ) -> Self {
        let name = workload.rsplit('/').next().unwrap();
        let token = control.token(workload, name).await;
        let p = Self::spawn_url(
            bin,
            &control.grpc_url(),
            Some(&token),
            workload,
            cluster,
            labels,
            app,
            &[("WEFT_ACCESS_LOG", "1")],
        );
        p.wait_ready().await;
        p
    }

    /// As [`ProxyHandle::start`], against any control-plane gRPC URL (a scripted one, say).
    pub async fn start_url(
        bin: &str,
        control_url: &str,
        token: Option<&str>,
        workload: &str,
        cluster: &str,
        labels: &[(&str, &str)],
        app: SocketAddr,
    ) -> Self {
        Self::start_url_env(bin, control_url, token, workload, cluster, labels, app, &[]).await
    }

    /// As [`ProxyHandle::start_url`], with extra environment for the proxy (options such as
    /// `WEFT_STRIP_HEADERS`).
    #[allow(clippy::too_many_arguments)]
    pub async fn start_url_env(
        bin: &str,
        control_url: &str,
        token: Option<&str>,
        workload: &str,
        cluster: &str,
        labels: &[(&str, &str)],
        app: SocketAddr,
        extra_env: &[(&str, &str)],
    ) -> Self {
        let mut p = Self::spawn_url(bin, control_url, token, workload, cluster, labels, app, extra_env);
        // A port picked may have been taken by a parallel test before the proxy bound it.
        if !p.ready_or_exited().await {
            let log = p.process.log_text();
            assert!(log.contains("cannot bind"), "{workload} exited at start:\n{log}");
            let retry = Self::start_url_env(bin, control_url, token, workload, cluster, labels, app, extra_env);
            return Box::pin(retry).await;
        }
        p
    }

    /// Starts the proxy process on fresh ports without waiting for it to be ready.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_url(
        bin: &str,
        control_url: &str,
        token: Option<&str>,
        workload: &str,
        cluster: &str,
        labels: &[(&str, &str)],
        app: SocketAddr,
        extra_env: &[(&str, &str)],
    ) -> Self {
        let (inbound, outbound, admin) = (free_addr(), free_addr(), free_addr());
        let mut args: Vec<String> = [
            "proxy",
            "--control",
            control_url,
            "--workload",
            workload,
            "--cluster",
            cluster,
            "--app",
            &app.to_string(),
            "--inbound",
            &inbound.to_string(),
            "--outbound",
            &outbound.to_string(),
            "--admin",
            &admin.to_string(),
        ]
        .map(String::from)
        .to_vec();
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        // A plaintext control plane (a scripted one, or --insecure-plaintext) must be asked for.
        if control_url.starts_with("http://") {
            args.push("--insecure-plaintext".into());
        }
        let mut env: Vec<(&str, &str)> = token.map(|t| ("WEFT_TOKEN", t)).into_iter().collect();
        env.extend_from_slice(extra_env);
        let process = Process::spawn_env(bin, workload, &args, &env);
        Self {
            process,
            inbound,
            outbound,
            admin,
            workload: workload.to_string(),
        }
    }

    /// Waits until the proxy is ready (true) or has exited (false).
    async fn ready_or_exited(&mut self) -> bool {
        let client = Client::new();
        let url = format!("http://{}/ready", self.admin);
        let what = format!("{} ready (or exited)", self.workload);
        crate::eventually(Duration::from_secs(30), &what, || {
            let (client, url, running) = (&client, &url, self.process.is_running());
            async move {
                if !running {
                    return Some(false);
                }
                client.get(url).await.ok().filter(|r| r.status == 200).map(|_| true)
            }
        })
        .await
    }

    pub async fn wait_ready(&self) {
        let client = Client::new();
        let url = format!("http://{}/ready", self.admin);
        crate::eventually(Duration::from_secs(30), &format!("{} ready", self.workload), || {
            let (client, url) = (&client, &url);
            async move { client.get(url).await.ok().filter(|r| r.status == 200) }
        })
        .await;
    }

    pub async fn config_dump(&self) -> Value {
        let r = Client::new()
            .get(&format!("http://{}/config_dump", self.admin))
            .await
            .expect("admin answers");
        r.json()
    }

    pub async fn metrics(&self) -> String {
        Client::new()
            .get(&format!("http://{}/metrics", self.admin))
            .await
            .expect("admin answers")
            .text()
    }
}

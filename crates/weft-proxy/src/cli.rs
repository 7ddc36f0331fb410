//! The sidecar's command line, shared by `weft proxy` and the proxy-only `weft-sidecar`
//! executable: the flags, and the config they (or a `--config` file) describe.

use crate::{ProxyConfig, StaticFile, Workload};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// The exit code of a run refused for invalid input (a flag, the static file, a join token).
pub const EXIT_INVALID: u8 = 64;

/// `weft proxy`'s flags.
#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    /// Static config file (no control plane): listeners, workload and services.
    #[arg(long, conflicts_with_all = ["control", "workload", "cluster", "label", "app", "inbound", "outbound", "advertise", "admin", "token", "identity_dir", "insecure_plaintext"])]
    pub config: Option<PathBuf>,
    /// The control plane's gRPC URL, e.g. https://127.0.0.1:7071 (TLS, the CA pinned by the join
    /// token's fingerprint); several replicas' URLs separated by commas: the proxy starts with a
    /// random one and moves to the next when its replica goes away, keeping its config.
    #[arg(long, required_unless_present = "config")]
    pub control: Option<String>,
    /// Allow an http:// --control URL: a control plane run with --insecure-plaintext. The token
    /// and every config cross the network in clear, and the proxy can only prove itself with
    /// its token (no renewal once it expired).
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// NAMESPACE/NAME of the workload this sidecar fronts.
    #[arg(long, required_unless_present = "config")]
    pub workload: Option<String>,
    #[arg(long, required_unless_present = "config")]
    pub cluster: Option<String>,
    /// Workload labels (`service=`, `version=` for subsets), repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    pub label: Vec<(String, String)>,
    /// The app's address.
    #[arg(long, required_unless_present = "config")]
    pub app: Option<SocketAddr>,
    #[arg(long, required_unless_present = "config")]
    pub inbound: Option<SocketAddr>,
    #[arg(long, required_unless_present = "config")]
    pub outbound: Option<SocketAddr>,
    /// The address other proxies dial for this workload (registered with the control plane).
    /// Default: --inbound, or when that is a wildcard (0.0.0.0:PORT) this host's address on
    /// the route to the control plane, with the inbound port.
    #[arg(long, value_name = "ADDR", value_parser = parse_advertise)]
    pub advertise: Option<SocketAddr>,
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Join token (`weft token create`); without one the proxy has no identity and the control
    /// plane refuses it.
    #[arg(long, env = "WEFT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Keeps the workload certificate and its key in DIR (one file, mode 0600), so that a
    /// restarted proxy rejoins with the certificate it held after its join token was used up
    /// or expired.
    #[arg(long, env = "WEFT_IDENTITY_DIR", value_name = "DIR")]
    pub identity_dir: Option<std::path::PathBuf>,
    /// One JSON line per request on standard output.
    #[arg(long, env = "WEFT_ACCESS_LOG", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub access_log: bool,
    /// Percentage of requests written to the access log.
    #[arg(long, default_value_t = 100.0)]
    pub access_log_sample: f64,
    /// OTLP/gRPC endpoint (e.g. http://127.0.0.1:4317) for client and server spans.
    #[arg(long, env = "WEFT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Percentage of new traces sampled; a trace that arrives keeps its own decision.
    #[arg(long, env = "WEFT_TRACE_SAMPLE", default_value_t = 100.0)]
    pub trace_sample: f64,
    /// Opaque TCP: LISTEN=SERVICE forwards every connection to LISTEN to an endpoint of
    /// SERVICE over mTLS, byte for byte. Repeatable.
    #[arg(long = "tcp", env = "WEFT_TCP", value_delimiter = ',', value_parser = parse_tcp)]
    pub tcp: Vec<(SocketAddr, String)>,
    /// A header the inbound listener removes before the app sees a request, besides the identity
    /// headers it always removes (x-weft-*, x-forwarded-client-cert, x-spiffe-id, l5d-*). Any
    /// case; exact names. Repeatable; with --config, added to the file's stripHeaders.
    #[arg(
        long = "strip-header",
        value_name = "NAME",
        env = "WEFT_STRIP_HEADERS",
        value_delimiter = ',',
        value_parser = crate::config::strip_header_name
    )]
    pub strip_header: Vec<http::HeaderName>,
    /// The protocol the app serves: http1, h2 (prior knowledge), or auto (HTTP/2 for gRPC,
    /// HTTP/1.1 for the rest). The sidecars translate from whatever the caller spoke. Default
    /// auto; with --config, overrides the file's appProtocol.
    #[arg(long, env = "WEFT_APP_PROTOCOL", value_name = "PROTOCOL")]
    pub app_protocol: Option<crate::config::AppProtocol>,
    /// How long the inbound listener waits for the app to accept a connection before
    /// answering 503 app-unavailable; default 4s, which outlasts two dropped SYNs (Linux
    /// retransmits after 1 s and 3 s) when the app's listen backlog overflows.
    #[arg(
        long,
        value_name = "DURATION",
        env = "WEFT_APP_CONNECT_TIMEOUT",
        value_parser = crate::config::app_connect_timeout
    )]
    pub app_connect_timeout: Option<std::time::Duration>,
    /// A connection to the inbound, outbound, intercept or admin listener with no request
    /// awaiting its response for this long is closed gracefully (HTTP/2: GOAWAY), as Envoy's
    /// idle timeout does (default 1h, at least 1s). A response still streaming its body is
    /// finished first (the connection closes after it); WebSockets and opaque TCP, once
    /// upgraded, are not limited by it.
    #[arg(long, value_name = "DURATION", env = "WEFT_IDLE_TIMEOUT", value_parser = crate::config::idle_timeout)]
    pub idle_timeout: Option<std::time::Duration>,
}

/// An address another host can dial: not a wildcard, not port 0.
fn parse_advertise(v: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = v.parse().map_err(|_| format!("{v:?} is not a socket address (IP:PORT)"))?;
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(format!("{v:?}: other proxies cannot dial a wildcard address or port 0"));
    }
    Ok(addr)
}

fn parse_tcp(v: &str) -> Result<(SocketAddr, String), String> {
    let (listen, service) = v
        .split_once('=')
        .ok_or_else(|| format!("{v:?} is not LISTEN=SERVICE (e.g. 127.0.0.1:6379=cache)"))?;
    let listen = listen.parse().map_err(|_| format!("{listen:?} is not a socket address"))?;
    if service.is_empty() {
        return Err(format!("{v:?} names no service"));
    }
    Ok((listen, service.to_string()))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("invalid label {s:?}: expected key=value")),
    }
}

/// Threads for the runtime, when `WEFT_THREADS` sets a positive number. Without it a sidecar
/// runs on one (it is one event loop, like Linkerd's proxy and a one-thread HAProxy: no
/// cross-thread wake-ups on the request path, and its CPU cost stays within one core).
pub fn threads_from_env() -> Option<usize> {
    std::env::var("WEFT_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
}

/// A runtime of `threads` worker threads; one is a current-thread runtime, with no
/// work-stealing machinery at all.
pub fn runtime(threads: usize) -> tokio::runtime::Runtime {
    match threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
    .expect("tokio runtime")
}

/// Runs a sidecar until it is signalled to stop; an invalid config or join token ends it with
/// [`EXIT_INVALID`].
pub async fn run(args: ProxyArgs) -> Result<ExitCode, Box<dyn std::error::Error + Send + Sync>> {
    let cfg = match config(args) {
        Ok(cfg) => cfg,
        Err(code) => return Ok(code),
    };
    let shutdown = weft_core::Shutdown::new();
    weft_core::shutdown::install(&shutdown);
    let (_, handle) = match crate::start(cfg, shutdown).await {
        Ok(started) => started,
        Err(e @ crate::StartError::Control(_)) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
        Err(e) => return Err(e.into()),
    };
    handle.await?;
    Ok(ExitCode::SUCCESS)
}

/// The proxy's config from its flags (or its --config file); an invalid one is reported on
/// standard error and comes back as the exit code to end with.
pub fn config(args: ProxyArgs) -> Result<ProxyConfig, ExitCode> {
    if !(0.0..=100.0).contains(&args.access_log_sample) {
        eprintln!(
            "error: --access-log-sample: {} is not a percentage between 0 and 100",
            args.access_log_sample
        );
        return Err(ExitCode::from(2));
    }
    let cfg = match &args.config {
        Some(path) => match StaticFile::load(&path.display().to_string()) {
            Ok(cfg) => ProxyConfig {
                access_log: args.access_log,
                access_log_sample: args.access_log_sample,
                otlp_endpoint: args.otlp_endpoint.clone(),
                trace_sample: args.trace_sample,
                tcp: if args.tcp.is_empty() { cfg.tcp.clone() } else { args.tcp.clone() },
                strip_headers: cfg.strip_headers.iter().chain(&args.strip_header).cloned().collect(),
                app_protocol: args.app_protocol.unwrap_or(cfg.app_protocol),
                app_connect_timeout: args.app_connect_timeout.unwrap_or(cfg.app_connect_timeout),
                idle_timeout: args.idle_timeout.unwrap_or(cfg.idle_timeout),
                ..cfg
            },
            Err(invalid) => {
                eprintln!("error: {invalid}");
                return Err(ExitCode::from(EXIT_INVALID));
            }
        },
        None => {
            let url = args.control.clone().expect("required by clap");
            match url.split_once("://").map(|(scheme, _)| scheme) {
                Some("https") => {}
                Some("http") if args.insecure_plaintext => {}
                Some("http") => {
                    eprintln!(
                        "error: --control {url}: plaintext; control planes serve TLS (https://) unless run with --insecure-plaintext, and then the proxy needs --insecure-plaintext too"
                    );
                    return Err(ExitCode::from(EXIT_INVALID));
                }
                _ => {
                    eprintln!("error: --control {url}: expected an https:// URL");
                    return Err(ExitCode::from(EXIT_INVALID));
                }
            }
            let id = args.workload.expect("required by clap");
            let (namespace, name) = match Workload::parse_id(&id) {
                Ok(v) => v,
                Err(msg) => {
                    eprintln!("error: --workload: {msg}");
                    return Err(ExitCode::from(EXIT_INVALID));
                }
            };
            ProxyConfig {
                workload: Workload {
                    namespace,
                    name,
                    cluster: args.cluster.expect("required"),
                    labels: args.label.into_iter().collect(),
                },
                app: args.app.expect("required"),
                inbound: args.inbound.expect("required"),
                outbound: args.outbound.expect("required"),
                admin: args.admin,
                advertise: args.advertise,
                access_log: args.access_log,
                access_log_sample: args.access_log_sample,
                otlp_endpoint: args.otlp_endpoint.clone(),
                trace_sample: args.trace_sample,
                tcp: args.tcp.clone(),
                strip_headers: args.strip_header.clone(),
                app_protocol: args.app_protocol.unwrap_or_default(),
                app_connect_timeout: args.app_connect_timeout.unwrap_or(crate::config::APP_CONNECT_TIMEOUT),
                idle_timeout: args.idle_timeout.unwrap_or(weft_core::serve::IDLE_TIMEOUT),
                source: crate::Source::Control {
                    url,
                    token: args.token.clone(),
                    identity_dir: args.identity_dir.clone(),
                },
            }
        }
    };
    Ok(cfg)
}

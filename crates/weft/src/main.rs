//! `weft`: the one binary. Runs the control plane, a proxy, the demo app and the local demo
//! mesh, and talks to the control plane's REST API for everything else.

// This crate is the CLI: printing results to stdout is its job.
#![allow(clippy::print_stdout)]
#[macro_use]
mod output;
mod client;
mod commands;
mod demo_app;
mod diff;
mod login;
mod run;
mod up;

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code for invalid configuration (DESIGN.md §5); the sidecar's own command line shares it.
pub const EXIT_INVALID: u8 = weft_proxy::cli::EXIT_INVALID;

#[derive(Parser, Debug)]
#[command(
    name = "weft",
    version,
    about = "weft service mesh: control plane, sidecar proxy, CLI and local demo mesh"
)]
pub struct Cli {
    /// The control plane's REST API [default: the server `weft login` saved, else
    /// https://127.0.0.1:7070].
    #[arg(long, global = true, env = "WEFT_SERVER")]
    pub server: Option<String>,
    /// A file holding the API token to send (else WEFT_API_TOKEN, else the one `weft login`
    /// saved for this server).
    #[arg(long, global = true, env = "WEFT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The mesh CA to trust for an https:// server (PEM; the control plane writes it to ca.pem
    /// in its data directory) [default: the CA `weft login` pinned for this server].
    #[arg(long, global = true, env = "WEFT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    pub output: output::Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the local demo mesh: control plane, six services with sidecars, traffic.
    Up {
        /// Do not start the traffic generator.
        #[arg(long)]
        no_traffic: bool,
        /// REST API and dashboard address.
        #[arg(long, default_value = "127.0.0.1:7070")]
        api: SocketAddr,
        /// Keep the control plane's data here instead of a fresh temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Requests per second the traffic generator sends to mobile-gateway.
        #[arg(long, default_value_t = 50)]
        rps: u32,
        /// A highly available control plane: a three-member etcd and three replicas on
        /// loopback (the first on --api), proxies given all three; needs Debian's etcd-server.
        #[arg(long)]
        ha: bool,
        /// Each workload in a network namespace of its own with `weft run --intercept`: the
        /// demo apps call each other by plain service names (`http://orders-api/`). Linux, root.
        #[arg(long)]
        intercept: bool,
    },
    /// Store a control plane's address (`--server`), its CA and an API token (`--token-file`:
    /// the first admin's `admin.token`, or one from `weft admin token create`) for this user's
    /// later commands. The CA comes from `--ca-file`, or is fetched from the server and pinned by
    /// `--ca-fingerprint` (what `weft control` logs at start and join tokens carry).
    Login {
        /// SHA-256 of the mesh CA's root certificate (hex): the server must prove it holds it.
        #[arg(long)]
        ca_fingerprint: Option<String>,
    },
    /// The API token in use: its name and role.
    Whoami,
    /// API tokens (admin): who may call the REST API, with which role.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Who changed what, from where: every mutating API call.
    Audit {
        /// Only calls within this long, e.g. 1h.
        #[arg(long)]
        since: Option<weft_api::Duration>,
    },
    /// Run the control plane.
    Control {
        #[arg(long, default_value = "weft-data")]
        data_dir: PathBuf,
        /// Serve /metrics without a credential (for a Prometheus that cannot send a token).
        #[arg(long)]
        metrics_open: bool,
        #[arg(long, default_value = "127.0.0.1:7070")]
        api: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:7071")]
        grpc: SocketAddr,
        /// SPIFFE trust domain of workload identities.
        #[arg(long, default_value = "weft.local")]
        trust_domain: String,
        /// Lifetime of workload certificates (proxies renew at half of it; at least 1m).
        #[arg(long, default_value = "24h")]
        cert_ttl: weft_api::Duration,
        /// Your own root (or intermediate) CA certificate, PEM; with --root-key.
        #[arg(long, requires = "root_key")]
        root_cert: Option<PathBuf>,
        /// The key of --root-cert, PEM.
        #[arg(long, requires = "root_cert")]
        root_key: Option<PathBuf>,
        /// Another name or IP address the serving certificate carries (besides localhost,
        /// 127.0.0.1, ::1 and the bound addresses). Repeatable.
        #[arg(long = "san", value_name = "NAME_OR_IP")]
        sans: Vec<String>,
        /// Serve the API and the proxies' gRPC without TLS, for local experiments only: nothing
        /// is encrypted, and proxies cannot renew with their certificates (only with a join
        /// token, so not after it expired). `weft check` warns while it is on.
        #[arg(long)]
        insecure_plaintext: bool,
        /// Start an empty mesh even though --data-dir holds a store (an unreadable one, say):
        /// the old weft.redb is renamed weft.redb.broken-<unix time>, never deleted. History,
        /// policies, tokens and the root CA start over; every proxy must join again.
        #[arg(long)]
        reinit_store: bool,
        /// Keep the mesh in etcd instead of --data-dir, shared by every replica started with
        /// the same value: etcd://HOST:PORT[,HOST:PORT...] (plaintext gRPC to etcd unless --store-ca).
        #[arg(long, value_name = "etcd://HOST:PORT,...", conflicts_with = "reinit_store")]
        store: Option<String>,
        /// Every key this mesh keeps in etcd starts with it, so meshes can share one etcd.
        #[arg(long, default_value = "/weft", requires = "store")]
        store_prefix: String,
        /// Reach etcd over TLS, checking its certificates against the CA certificates (PEM) in
        /// FILE; each member's certificate must name the address given in --store.
        #[arg(long, value_name = "FILE", requires = "store")]
        store_ca: Option<PathBuf>,
        /// The client certificate (PEM) presented to etcd (etcd run with --client-cert-auth);
        /// with --store-key and --store-ca.
        #[arg(long, value_name = "FILE", requires_all = ["store_key", "store_ca"])]
        store_cert: Option<PathBuf>,
        /// The private key (PEM) of --store-cert.
        #[arg(long, value_name = "FILE", requires_all = ["store_cert", "store_ca"])]
        store_key: Option<PathBuf>,
        /// This replica's name among the replicas on one --store (default: its API address).
        #[arg(long, requires = "store")]
        replica: Option<String>,
        /// Proxies registering at once (from their Register until they ACK their first
        /// config). Beyond it a proxy is refused with a hint of when to come back (proxies wait
        /// that long, with jitter), so a cold start or a reconnect storm of thousands is served
        /// at the pace the control plane can take.
        #[arg(long, value_name = "N", default_value_t = weft_control::MAX_REGISTERING, value_parser = clap::value_parser!(u32).range(1..))]
        max_registering: u32,
        /// Close a REST API connection that moves no byte either way for this long (a
        /// kept-alive connection left idle, or one that never sends a request). Server-sent
        /// event streams send a keep-alive comment every 15 s, so they stay.
        #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = api_idle_timeout)]
        api_idle_timeout: weft_api::Duration,
    },
    /// Run a sidecar proxy, driven by the control plane or by a static file.
    Proxy(weft_proxy::cli::ProxyArgs),
    /// Run an app with its sidecar: the sidecar first, the app once the sidecar is ready; the
    /// app's exit code is weft run's. `--intercept` redirects the network namespace's traffic to
    /// the sidecar, so an unmodified app calls services by name.
    Run(Box<run::Args>),
    /// How `weft run` starts its app (internal): see `run::exec_app`.
    #[command(hide = true)]
    RunApp(run::AppArgs),
    /// Run the demo application (an HTTP service that calls others through its sidecar).
    DemoApp(demo_app::Args),
    /// Apply TrafficPolicy / SecurityPolicy resources from a file. Returns once the change is
    /// applied, or at once when it is queued behind another intent (saying which, and what to do).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Wait until the change is applied even when it is queued behind another intent; give
        /// up (exit 1, the change stays queued) after DURATION.
        #[arg(long, value_name = "DURATION", num_args = 0..=1, default_missing_value = "5m")]
        wait: Option<weft_api::Duration>,
    },
    /// Delete the resources named in a file.
    Delete {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List resources, optionally of one kind and name.
    Get {
        /// TrafficPolicy or SecurityPolicy (any case; plural; `tp`, `sp`)
        #[arg(value_parser = commands::resource_kind)]
        kind: Option<String>,
        name: Option<String>,
    },
    /// Show what applying a file would change.
    Diff {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List revisions.
    History,
    /// Restore the resources of an earlier revision (as a new revision).
    Rollback { revision: u64 },
    /// Service cards: traffic, errors, policy revision, mTLS and proxies in sync.
    Status,
    /// A live stream of request metadata (never bodies) to and from SERVICE, as its callers'
    /// and its own sidecars see it. Needs the admin role.
    Tap {
        service: String,
        /// Stop after this many requests.
        #[arg(long)]
        count: Option<u64>,
    },
    /// A live table per destination service and route: rps, success rate, p50, p99 (as the
    /// callers' sidecars measured them over the last 10 s).
    Top {
        /// Print the table once and exit.
        #[arg(long)]
        once: bool,
        /// Refresh period.
        #[arg(long, default_value = "2s")]
        interval: weft_api::Duration,
    },
    /// Intents: staged, SLO-gated changes.
    #[command(subcommand)]
    Intent(IntentCommand),
    /// Onboard SERVICE onto the mesh as an intent: change its mTLS mode, staged over its
    /// instances and judged on their inbound traffic before and after, rolled back by itself
    /// if the service suffers (a caller without a sidecar under strict, say).
    Enable(commands::EnableArgs),
    /// The per-service kill switch: forward without L7 policy.
    Bypass {
        service: String,
        state: commands::OnOff,
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    /// Stop every rollout and pin last-known-good (`on`), or let rollouts run again (`off`).
    Freeze { state: commands::OnOff },
    /// Join tokens: how a proxy proves which workload it is.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The mesh's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Warn about workload certificates or the root that expire soon, proxies out of sync, and
    /// a control plane that runs without TLS.
    Check {
        /// Warn when a workload certificate expires within this long.
        #[arg(long, default_value = "1h")]
        within: weft_api::Duration,
    },
    /// Connected proxies and the revision each applied.
    Proxies,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// API tokens.
    #[command(subcommand)]
    Token(ApiTokenCommand),
}

#[derive(Subcommand, Debug)]
pub enum ApiTokenCommand {
    /// Create a token; prints its secret once, alone on stdout (the store keeps only a hash).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// Lifetime, e.g. 720h; none for no expiry.
        #[arg(long)]
        ttl: Option<weft_api::Duration>,
    },
    /// Every token's name, role and expiry (never secrets).
    List,
    /// Refuse a token from now on.
    Revoke { name: String },
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Trust domain, roots trusted, signing generation and rotation phase.
    Status,
    /// Rotate the root: the new root is trusted everywhere first, then signs, then the old one
    /// is dropped once every workload holds a new certificate. Completes by itself.
    Rotate,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token for one workload; prints the token alone on stdout (`-o json`: with its
    /// id, identity, expiry and uses).
    Create {
        /// NAMESPACE/NAME of the workload.
        #[arg(long)]
        workload: String,
        /// Service account (the last segment of the SPIFFE ID); defaults to the workload name.
        #[arg(long)]
        service_account: Option<String>,
        /// Lifetime. A proxy renews with its certificate, so the token only has to outlive its
        /// start.
        #[arg(long, default_value = "1h")]
        ttl: weft_api::Duration,
        /// Certificates it may be redeemed for (each start of a proxy is one); no limit until it
        /// expires when omitted.
        #[arg(long)]
        uses: Option<u32>,
    },
    /// Every join token on record: id, workload, expiry, uses, state (never the secret).
    List,
    /// Refuse a token from now on (registration and certificates).
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
pub enum IntentCommand {
    /// Queue an intent from a file.
    Submit {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Every intent with its phase.
    List,
    /// One intent: stages, decisions with their numbers, the per-proxy ledger.
    Show { id: String },
    /// Start the next stage of a manual intent (the dashboard's "step").
    Approve { id: String },
    /// Roll an intent back (or cancel it while queued).
    Abort { id: String },
}

/// Threads for the process's runtime: `WEFT_THREADS` when set; otherwise one for a proxy
/// ([`weft_proxy::cli::threads_from_env`] says why), one per core for everything else.
/// `--api-idle-timeout`: a duration of at least one second (shorter would close connections
/// between a client's requests).
fn api_idle_timeout(s: &str) -> Result<weft_api::Duration, String> {
    let d: weft_api::Duration = s.parse().map_err(|e| format!("{e}"))?;
    if d.as_std() < std::time::Duration::from_secs(1) {
        return Err(format!("{s} is shorter than 1s"));
    }
    Ok(d)
}

fn worker_threads(cli: &Cli) -> usize {
    if let Some(n) = weft_proxy::cli::threads_from_env() {
        return n;
    }
    match cli.command {
        Command::Proxy(_) | Command::Run(_) | Command::RunApp(_) => 1,
        _ => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    weft_core::trace::init();
    let runtime = weft_proxy::cli::runtime(worker_threads(&cli));
    let outcome = runtime.block_on(commands::run(cli));
    // The command is done: a task still running (a blocking read of standard input, a
    // connection cut at shutdown) must not keep the process, nor the store's lock, any longer.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// Found from outside: `weft get Foo` listed nothing and exited 0. A kind that is none of
    /// the resource kinds is a usage error (exit 2) naming the value; the known ones, in any
    /// of their spellings, parse.
    #[test]
    fn get_refuses_an_unknown_kind_naming_it() {
        use clap::Parser;
        let Err(err) = super::Cli::try_parse_from(["weft", "get", "Foo"]) else {
            panic!("an unknown kind is refused");
        };
        assert_eq!(err.exit_code(), 2);
        let text = err.to_string();
        assert!(text.contains("\"Foo\"") && text.contains("TrafficPolicy"), "{text}");
        for kind in ["TrafficPolicy", "trafficpolicies", "tp", "SecurityPolicy", "securitypolicy", "sp"] {
            assert!(super::Cli::try_parse_from(["weft", "get", kind, "x"]).is_ok(), "{kind}");
        }
    }
}

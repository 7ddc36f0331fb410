//! `weft run`: an app and its sidecar as one unit, for apps nobody changes.
//!
//! Starts the sidecar in this process, waits until it holds its identity and first config,
//! then starts the app as a child and ends with the app's exit code. When the app exits by
//! itself (a batch job), the sidecar drains and stops. On SIGTERM or SIGINT the order keeps
//! every request in flight: the inbound listener stops accepting and its requests finish,
//! then the app is asked to stop (SIGTERM, SIGKILL after `--app-grace`) while its outbound
//! calls still work, then the outbound side drains.
//!
//! With `--intercept` (Linux, root in the network namespace) the namespace's traffic is
//! redirected to the sidecar by nftables rules ([`weft_proxy::netfilter`]), installed before the
//! app starts and removed when `weft run` ends; the app then calls services by name, and every
//! port it serves is reached through the inbound listener.

use crate::EXIT_INVALID;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;
use weft_core::Shutdown;
use weft_proxy::cli::ProxyArgs;
use weft_proxy::netfilter::{self, PROXY_GID, Rules};

/// How long the sidecar gets to become ready before `weft run` gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// Redirect the network namespace's traffic to the sidecar (nftables; needs root or
    /// CAP_NET_ADMIN): outbound TCP to the intercept listener, DNS to the sidecar's DNS, inbound
    /// TCP to any port but the sidecar's own to the inbound listener. IPv6 is refused both ways.
    #[arg(long)]
    pub intercept: bool,
    /// Where redirected outbound TCP arrives (with --intercept).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15001")]
    pub intercept_listen: SocketAddr,
    /// Where redirected DNS queries arrive, UDP and TCP (with --intercept).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15053")]
    pub dns_listen: SocketAddr,
    /// Destination ports never sniffed: opaque TCP over mTLS at once (server-speaks-first
    /// protocols) [default: 25,587,3306,4444,5432,6379,9300,11211].
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    pub opaque_ports: Option<Vec<u16>>,
    /// Inbound ports left alone: connections to them reach the app directly (IPv6 too).
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone: the app reaches them directly.
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
    /// Outbound destinations (ADDR/PREFIX) left alone: the app reaches them directly.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub skip_cidrs: Vec<(Ipv4Addr, u8)>,
    /// How long the app gets to exit after SIGTERM before it is killed.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub app_grace: weft_api::Duration,
    /// The app and its arguments, after `--`.
    #[arg(id = "command", last = true, required = true, value_name = "APP")]
    pub command: Vec<String>,
}

/// `weft run-app PARENT -- APP ARGS...`: the process `weft run` starts for its app.
#[derive(clap::Args, Debug)]
pub struct AppArgs {
    /// The process id of the `weft run` that started this one.
    pub parent: u32,
    #[arg(id = "command", last = true, required = true, value_name = "APP")]
    pub command: Vec<String>,
}

/// Asks the kernel to SIGKILL this process when `weft run` dies, then becomes the app (the
/// request survives exec). So a `weft run` killed outright (SIGKILL, a crash), which cannot stop
/// its app itself, takes it along instead of leaving it serving with no sidecar in front. (A
/// `pre_exec` hook in `weft run` would save the exec; this workspace forbids unsafe code.)
pub fn exec_app(args: AppArgs) -> ExitCode {
    use std::os::unix::process::CommandExt;
    if let Err(errno) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        eprintln!("error: cannot tie the app to weft run's life ({errno}); the app was not started");
        return ExitCode::from(127);
    }
    // `weft run` died before the request above was made: nobody is left to stop the app.
    if nix::unistd::getppid().as_raw() as u32 != args.parent {
        return ExitCode::from(128 + 9);
    }
    let error = std::process::Command::new(&args.command[0]).args(&args.command[1..]).exec();
    eprintln!("error: cannot start {}: {error}", args.command[0]);
    ExitCode::from(127)
}

fn parse_cidr(v: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = v.split_once('/').unwrap_or((v, "32"));
    let ip = ip
        .parse::<Ipv4Addr>()
        .map_err(|_| format!("{v:?}: {ip:?} is not an IPv4 address"))?;
    match len.parse::<u8>() {
        Ok(len) if len <= 32 => Ok((ip, len)),
        _ => Err(format!("{v:?}: {len:?} is not a prefix length 0-32")),
    }
}

/// Removes the redirect rules when `weft run` ends, however it ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if let Err(error) = netfilter::remove() {
            eprintln!("error: removing the interception rules: {error}");
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = match weft_proxy::cli::config(args.proxy) {
        Ok(cfg) => cfg,
        Err(code) => return Ok(code),
    };
    let app_gid = nix::unistd::getgid();
    let (intercept, _installed) = if args.intercept {
        // The sidecar's sockets are told apart by group: switch before the first is opened.
        if let Err(errno) = nix::unistd::setgid(nix::unistd::Gid::from_raw(PROXY_GID)) {
            eprintln!("error: --intercept: cannot run the sidecar as group {PROXY_GID} ({errno}); interception needs root");
            return Ok(ExitCode::FAILURE);
        }
        let rules = Rules {
            outbound_port: args.intercept_listen.port(),
            dns_port: args.dns_listen.port(),
            inbound_port: cfg.inbound.port(),
            sidecar_ports: [Some(cfg.inbound), cfg.admin].into_iter().flatten().map(|a| a.port()).collect(),
            skip_inbound_ports: args.skip_inbound_ports.clone(),
            skip_outbound_ports: args.skip_outbound_ports.clone(),
            skip_cidrs: args.skip_cidrs.clone(),
        };
        if let Err(error) = rules.install() {
            eprintln!("error: --intercept: the app was not started: {error}");
            return Ok(ExitCode::FAILURE);
        }
        let settings = weft_proxy::intercept::Settings {
            outbound: args.intercept_listen,
            dns: args.dns_listen,
            opaque_ports: args
                .opaque_ports
                .clone()
                .unwrap_or_else(|| weft_proxy::intercept::DEFAULT_OPAQUE_PORTS.to_vec()),
        };
        (Some(settings), Some(Installed))
    } else {
        (None, None)
    };
    let signalled = Shutdown::new();
    weft_core::shutdown::install(&signalled);
    let (inbound, rest) = (Shutdown::new(), Shutdown::new());
    let started = match weft_proxy::start_staged(cfg, inbound.clone(), rest.clone(), intercept).await {
        Ok(started) => started,
        Err(e @ weft_proxy::StartError::Control(_)) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
        Err(e) => return Err(e.into()),
    };
    let ready = async {
        while !started.ready.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        done = tokio::time::timeout(READY_TIMEOUT, ready) => if done.is_err() {
            eprintln!("error: the sidecar was not ready (identity and first config) within {READY_TIMEOUT:?}; the app was not started");
            rest.cancel();
            return Ok(ExitCode::FAILURE);
        },
        _ = signalled.cancelled() => {
            rest.cancel();
            let _ = started.handle.await;
            return Ok(ExitCode::from(128 + 15));
        }
    }
    // The app runs as `weft run-app` first, which ties it to this process's life (exec_app).
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.args(["run-app", &std::process::id().to_string(), "--"]).args(&args.command);
    if args.intercept {
        command.gid(app_gid.as_raw());
    }
    let mut app = match command.spawn() {
        Ok(app) => app,
        Err(error) => {
            eprintln!("error: cannot start {}: {error}", args.command[0]);
            rest.cancel();
            let _ = started.handle.await;
            return Ok(ExitCode::from(127));
        }
    };
    tracing::info!(app = %args.command[0], pid = app.id(), "app started");
    let status = tokio::select! {
        status = app.wait() => status?,
        _ = signalled.cancelled() => {
            inbound.cancel();
            started.inbound_drained.cancelled().await;
            tracing::info!("inbound drained; stopping the app");
            if let Some(pid) = app.id() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
            }
            match tokio::time::timeout(args.app_grace.as_std(), app.wait()).await {
                Ok(status) => status?,
                Err(_) => {
                    tracing::warn!(grace = %args.app_grace, "the app did not exit in time; killed");
                    app.kill().await?;
                    app.wait().await?
                }
            }
        }
    };
    inbound.cancel();
    rest.cancel();
    let _ = started.handle.await;
    Ok(exit_code(status))
}

/// The app's exit code; a signal that ended it becomes 128 + its number, as shells report it.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().or(status.signal().map(|s| 128 + s)).unwrap_or(1);
    ExitCode::from(code.clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cidrs_are_checked() {
        assert_eq!(super::parse_cidr("10.0.0.0/8"), Ok(("10.0.0.0".parse().unwrap(), 8)));
        assert_eq!(super::parse_cidr("198.18.0.5"), Ok(("198.18.0.5".parse().unwrap(), 32)));
        assert!(super::parse_cidr("10.0.0.0/33").unwrap_err().contains("\"33\""));
        assert!(super::parse_cidr("ten/8").unwrap_err().contains("not an IPv4 address"));
    }
}

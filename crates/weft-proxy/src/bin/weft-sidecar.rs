//! `weft-sidecar`: the proxy alone, with the flags of `weft proxy`. It runs the same code as
//! `weft proxy`; what it leaves out is the control plane, CLI and dashboard, whose code pages
//! would otherwise sit among the proxy's: an idle sidecar touches a few megabytes less of its
//! executable (bench/README.md, issue #15).

use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "weft-sidecar", version, about = "weft's sidecar proxy alone: the flags of `weft proxy`")]
struct Cli {
    #[command(flatten)]
    proxy: weft_proxy::cli::ProxyArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    weft_core::trace::init();
    let runtime = weft_proxy::cli::runtime(weft_proxy::cli::threads_from_env().unwrap_or(1));
    let outcome = runtime.block_on(weft_proxy::cli::run(cli.proxy));
    // As `weft proxy`: a task still running at the end must not keep the process.
    runtime.shutdown_timeout(Duration::from_millis(500));
    outcome.unwrap_or_else(|error| {
        eprintln!("error: {error}");
        ExitCode::FAILURE
    })
}

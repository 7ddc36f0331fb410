//! Process shutdown: one token every task watches, triggered by SIGINT, SIGTERM, or (for child
//! processes of `weft up`) the parent going away.

use tokio_util::sync::CancellationToken;

/// Cloneable handle; cancelling it asks every listener to stop accepting and drain.
pub type Shutdown = CancellationToken;

/// Environment variable set by `weft up` on its children: exit when standard input closes,
/// which happens when the parent dies, however it dies.
pub const EXIT_WITH_PARENT_ENV: &str = "WEFT_EXIT_WITH_PARENT";

/// Cancels `shutdown` on SIGINT or SIGTERM, and on parent exit when asked to.
pub fn install(shutdown: &Shutdown) {
    let token = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutting down"),
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = token.cancelled() => {}
        }
        token.cancel();
    });
    if std::env::var_os(EXIT_WITH_PARENT_ENV).is_some() {
        let token = shutdown.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            while let Ok(n) = stdin.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            tracing::info!("parent went away; shutting down");
            token.cancel();
        });
    }
}

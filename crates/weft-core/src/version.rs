//! The build version every component reports: proxies in their Register, replicas in their
//! status, so that `weft check` can flag skew between them.

/// Environment variable that makes a process report another version. For tests only: it lets
/// a test run a proxy that claims to be older or newer than the replicas it talks to.
pub const TEST_OVERRIDE_ENV: &str = "WEFT_TEST_OVERRIDE_VERSION";

/// This build's version, or the one [`TEST_OVERRIDE_ENV`] names.
pub fn version() -> String {
    std::env::var(TEST_OVERRIDE_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
}

//! Where the CLI finds its control plane, the CA to trust and its credential: `--server` /
//! `WEFT_SERVER`, `--ca-file` / `WEFT_CA_FILE`, and a token from `--token-file`,
//! `WEFT_API_TOKEN`; else the per-user file `weft login` writes.
//!
//! The per-user file is `$WEFT_CONFIG`, else `$XDG_CONFIG_HOME/weft/config.json`, else
//! `~/.config/weft/config.json`, mode 0600. Its token and CA are used only for the server they
//! were saved for, so `--server` pointed elsewhere never leaks the token.

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The control plane's REST API when nothing else names one.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7070";

/// What `weft login` saves.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Saved {
    pub server: String,
    pub token: String,
    /// The mesh CA (PEM) pinned at login, trusted for this server.
    #[serde(default)]
    pub ca_pem: Option<String>,
}

/// The server to call and the credential to send it.
#[derive(Clone, Debug)]
pub struct Profile {
    pub server: String,
    pub token: Option<String>,
    /// The roots to trust for an `https://` server, and where they came from (for errors).
    pub ca_pem: Option<String>,
    pub ca_source: String,
}

/// The per-user config file's path.
pub fn config_path() -> anyhow::Result<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = env("WEFT_CONFIG") {
        return Ok(p);
    }
    if let Some(dir) = env("XDG_CONFIG_HOME") {
        return Ok(dir.join("weft").join("config.json"));
    }
    match env("HOME") {
        Some(home) => Ok(home.join(".config").join("weft").join("config.json")),
        None => bail!("no place for the CLI's config: set WEFT_CONFIG, XDG_CONFIG_HOME or HOME"),
    }
}

fn load(path: &Path) -> anyhow::Result<Option<Saved>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{}: not a weft CLI config (rewrite it with `weft login`)", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes the per-user config (mode 0600) and returns where.
pub fn save(saved: &Saved) -> anyhow::Result<PathBuf> {
    let path = config_path()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_private_file(&path, &serde_json::to_string_pretty(saved)?)?;
    Ok(path)
}

/// Writes `text` to `path`, readable by this user only (mode 0600).
pub fn write_private_file(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Reads a token file: the token alone, surrounding whitespace ignored.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path).with_context(|| format!("--token-file {}: cannot read it", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        bail!("--token-file {}: the file is empty", path.display());
    }
    Ok(token.to_string())
}

/// The server, CA and credential for this invocation: flags and environment first, then the
/// saved login (its token and CA only for its own server).
pub fn resolve(server: Option<String>, token_file: Option<&Path>, ca_file: Option<&Path>) -> anyhow::Result<Profile> {
    let path = config_path().ok();
    let saved = match &path {
        Some(path) => load(path)?,
        None => None,
    };
    let server = server
        .or_else(|| saved.as_ref().map(|s| s.server.clone()))
        .unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let saved = saved.filter(|s| same_server(&s.server, &server));
    let token = match token_file {
        Some(path) => Some(read_token_file(path)?),
        None => match std::env::var("WEFT_API_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
            Some(t) => Some(t.trim().to_string()),
            None => saved.as_ref().map(|s| s.token.clone()),
        },
    };
    let (ca_pem, ca_source) = match ca_file {
        Some(file) => (
            Some(std::fs::read_to_string(file).with_context(|| format!("--ca-file {}: cannot read it", file.display()))?),
            file.display().to_string(),
        ),
        None => (
            saved.and_then(|s| s.ca_pem),
            format!(
                "the CA `weft login` saved in {}",
                path.map(|p| p.display().to_string()).unwrap_or_default()
            ),
        ),
    };
    Ok(Profile {
        server,
        token,
        ca_pem,
        ca_source,
    })
}

fn same_server(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_token_goes_only_to_its_own_server() {
        assert!(same_server("https://cp:7070/", "https://cp:7070"));
        assert!(!same_server("https://cp:7070", "https://elsewhere:7070"));
    }
}

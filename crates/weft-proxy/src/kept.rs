//! The workload certificate kept on disk (`--identity-dir`), so that a restarted proxy rejoins
//! on the strength of the certificate it held, as a renewal does: by then its join token may be
//! used up or expired, and without this the proxy would wait for a new token while its app's
//! traffic waits for the proxy.
//!
//! One JSON file, mode 0600, replaced whole (written beside it, then renamed) each time a
//! certificate is installed. A file that cannot be used (unreadable, not this format, a key that
//! does not match its certificate, another workload's, expired, not verifying against the
//! roots kept with it) is ignored with a warning naming the file and why; the proxy then proves
//! itself with its token, as if there were no file.

use crate::identity::Tls;
use base64::Engine;
use rustls_pki_types::PrivateKeyDer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file's name inside the identity directory.
pub(crate) const FILE: &str = "workload-identity.json";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Record {
    identity: String,
    not_after: u64,
    generation: u64,
    chain_pem: String,
    /// The PKCS#8 key, base64 (standard alphabet).
    key_pkcs8: String,
    bundle_pem: String,
}

/// Where the certificate is kept in `dir`.
pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Keeps `tls` in `dir` (created if missing), replacing what was there.
pub(crate) fn save(dir: &Path, tls: &Tls) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (chain_pem, key) = tls.to_keep();
    let record = Record {
        identity: tls.identity.clone(),
        not_after: tls.not_after,
        generation: tls.generation,
        chain_pem,
        key_pkcs8: base64::engine::general_purpose::STANDARD.encode(key),
        bundle_pem: tls.bundle_pem.clone(),
    };
    std::fs::create_dir_all(dir)?;
    let target = path(dir);
    let beside = dir.join(format!(".{FILE}.new"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&beside)?;
    f.write_all(&serde_json::to_vec(&record).expect("a plain record serializes"))?;
    f.sync_all()?;
    std::fs::rename(&beside, &target)
}

/// The certificate kept in `dir` for `workload` (NS/NAME), if there is a usable one; `Err`
/// says why the file there is not.
pub(crate) fn restore(dir: &Path, workload: &str) -> Result<Option<Tls>, String> {
    let text = match std::fs::read(path(dir)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let record: Record = serde_json::from_slice(&text).map_err(|e| format!("not a kept workload certificate: {e}"))?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(record.key_pkcs8.trim())
        .map_err(|e| format!("keyPkcs8: {e}"))?;
    let tls = Tls::new(
        record.identity,
        record.not_after,
        record.generation,
        &record.chain_pem,
        PrivateKeyDer::Pkcs8(key.into()),
        &record.bundle_pem,
    )
    .map_err(|e| e.to_string())?;
    // Its own workload's, and valid now against the roots it came with (expiry included).
    tls.check_issued_to(workload).map_err(|e| e.to_string())?;
    Ok(Some(tls))
}

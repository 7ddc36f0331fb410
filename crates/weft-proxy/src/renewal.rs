//! Obtaining and renewing the workload certificate ([`crate::identity`] holds it): a CSR for a
//! fresh key to the control plane's CA over the control link, proven by the current certificate
//! (presented in the handshake) or else the join token; renewed at half its lifetime on the
//! proxy's [`Clock`], early when the CA signs with a newer root, and retried with capped backoff
//! while the CA is unreachable (the proxy keeps serving with the certificate it holds).

use crate::clock::Clock;
use crate::identity::{IdentityError, Tls, material};
use crate::state::Proxy;
use rustls_pki_types::PrivateKeyDer;
use std::sync::Arc;
use std::time::Duration;
use weft_api::proto::{self, distribution_client::DistributionClient};
use weft_core::Shutdown;

/// Renewal is attempted at this fraction of the certificate's lifetime.
const RENEW_AT: f64 = 0.5;

/// Obtains a certificate for a fresh key: a CSR to the control plane's CA over the control
/// link, proven by the current certificate (presented in the handshake) or else the join token.
/// The result is checked to be this workload's before it is handed back.
pub(crate) async fn certify(proxy: &Proxy) -> Result<Tls, IdentityError> {
    let link = proxy.link.as_ref().expect("control mode");
    let key = rcgen::KeyPair::generate().map_err(material)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(material)?
        .serialize_request(&key)
        .map_err(material)?
        .pem()
        .map_err(material)?;
    let channel = link
        .connect(|e| e.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(5)))
        .await
        .map_err(|e| IdentityError::Unreachable(e.to_string()))?;
    let reply = DistributionClient::new(channel)
        .certify(proto::CertifyRequest {
            token: proxy.local.token.clone().unwrap_or_default(),
            csr_pem: csr,
            workload: proxy.local.workload.id(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => IdentityError::Refused(s.message().to_string()),
            _ => IdentityError::Unreachable(s.message().to_string()),
        })?
        .into_inner();
    let expected = expected_identity(proxy);
    if !expected.matches(&reply.identity) {
        return Err(IdentityError::NotMine {
            got: reply.identity,
            expected: expected.to_string(),
        });
    }
    let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let tls = Tls::new(
        reply.identity,
        reply.not_after_unix,
        reply.generation,
        &reply.cert_chain_pem,
        key,
        &reply.trust_bundle_pem,
    )?;
    tls.check_issued_to(&proxy.local.workload.id())?;
    link.trust(&reply.trust_bundle_pem);
    Ok(tls)
}

/// What the proxy expects its identity to be.
struct Expected {
    namespace: String,
    /// From the join token, when there is one.
    service_account: Option<String>,
    /// The identity held now: a renewal must keep it.
    current: Option<String>,
}

fn expected_identity(proxy: &Proxy) -> Expected {
    Expected {
        namespace: proxy.local.workload.namespace.clone(),
        service_account: proxy
            .local
            .token
            .as_deref()
            .and_then(|t| weft_api::token::peek(t).ok())
            .map(|c| c.sa),
        current: proxy.identity.current_id(),
    }
}

impl Expected {
    fn matches(&self, spiffe_id: &str) -> bool {
        if let Some(current) = &self.current {
            return current == spiffe_id;
        }
        let Some((_, path)) = spiffe_id.strip_prefix("spiffe://").and_then(|r| r.split_once('/')) else {
            return false;
        };
        let Some(sa) = path.strip_prefix(&format!("ns/{}/sa/", self.namespace)) else {
            return false;
        };
        !sa.is_empty() && !sa.contains('/') && self.service_account.as_deref().is_none_or(|want| want == sa)
    }
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.current, &self.service_account) {
            (Some(current), _) => write!(f, "{current}"),
            (None, Some(sa)) => write!(f, "spiffe://*/ns/{}/sa/{sa}", self.namespace),
            (None, None) => write!(f, "spiffe://*/ns/{}/sa/*", self.namespace),
        }
    }
}

/// Keeps the proxy's certificate fresh: renews at half its lifetime, retries with capped
/// backoff, and keeps serving with the current certificate while the CA is unreachable.
pub(crate) async fn run(proxy: Arc<Proxy>, shutdown: Shutdown) {
    let gauge = proxy.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let now = gauge.clock.unix_secs() as i64;
            let left = gauge.identity.tls().map(|t| t.not_after as i64 - now).unwrap_or(0);
            gauge.telemetry.cert_expires_in.set(left);
        }
    });
    let clock = &proxy.clock;
    restore(&proxy);
    let mut failures = 0u32;
    loop {
        let wait = match certify(&proxy).await {
            Ok(tls) => {
                failures = 0;
                let wait = renew_after(tls.not_after, clock);
                tracing::info!(identity = %tls.identity, serial = %tls.serial, renew_in_s = wait.as_secs(), "workload certificate installed");
                keep(&proxy, &tls);
                proxy.identity.install(tls);
                proxy.discovery.ready.certified();
                wait
            }
            Err(error) => {
                failures += 1;
                let left = proxy.identity.tls().map(|t| t.not_after.saturating_sub(clock.unix_secs()));
                tracing::warn!(%error, cert_expires_in_s = ?left, "cannot renew the workload certificate; retrying");
                crate::backoff::reconnect(failures)
            }
        };
        tokio::select! {
            _ = clock.sleep(wait) => {}
            _ = proxy.identity.renew.notified() => tracing::info!("the CA signs with a new root; renewing now"),
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Installs the certificate kept in `--identity-dir` by an earlier run, when it is usable and
/// this proxy's: the first renewal then presents it, so a used-up or expired join token no
/// longer matters, and the proxy serves mTLS with it meanwhile.
fn restore(proxy: &Proxy) {
    let Some(dir) = &proxy.local.identity_dir else { return };
    let file = crate::kept::path(dir);
    let tls = match crate::kept::restore(dir, &proxy.local.workload.id()) {
        Ok(Some(tls)) => tls,
        Ok(None) => return,
        Err(why) => {
            tracing::warn!(file = %file.display(), %why, "ignoring the kept workload certificate; proving this proxy with its join token");
            return;
        }
    };
    let expected = expected_identity(proxy);
    if !expected.matches(&tls.identity) {
        tracing::warn!(file = %file.display(), kept = %tls.identity, %expected, "ignoring the kept workload certificate: not this proxy's identity");
        return;
    }
    if let Some(link) = &proxy.link {
        link.trust(&tls.bundle_pem);
    }
    tracing::info!(identity = %tls.identity, serial = %tls.serial, file = %file.display(), "kept workload certificate installed");
    proxy.identity.install(tls);
    proxy.discovery.ready.certified();
}

/// Keeps a newly installed certificate in `--identity-dir`; a failure is logged and the proxy
/// goes on (only a restart needs the file).
fn keep(proxy: &Proxy, tls: &Tls) {
    let Some(dir) = &proxy.local.identity_dir else { return };
    if let Err(error) = crate::kept::save(dir, tls) {
        tracing::warn!(dir = %dir.display(), %error, "cannot keep the workload certificate; a restart will need a usable join token");
    }
}

/// How long after a certificate valid until `not_after` (unix seconds) is installed to renew
/// it: [`RENEW_AT`] of the lifetime it has left on `clock`, at least a second.
fn renew_after(not_after: u64, clock: &Clock) -> Duration {
    let lifetime = not_after.saturating_sub(clock.unix_secs());
    Duration::from_secs_f64(lifetime as f64 * RENEW_AT).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renewal_waits_half_the_lifetime_on_the_proxys_clock() {
        let clock = Clock::manual();
        let not_after = clock.unix_secs() + 60;
        let wait = renew_after(not_after, &clock);
        assert_eq!(wait, Duration::from_secs(30));
        let renewal = tokio::spawn(clock.sleep(wait));
        clock.advance(Duration::from_secs(29));
        tokio::task::yield_now().await;
        assert!(!renewal.is_finished(), "not before half-life");
        clock.advance(Duration::from_secs(1));
        renewal.await.expect("due at half-life");
        // Installed late (or the clock ran on): the time left counts, and never less than 1 s.
        assert_eq!(renew_after(not_after, &clock), Duration::from_secs(15));
        clock.advance(Duration::from_secs(60));
        assert_eq!(renew_after(not_after, &clock), Duration::from_secs(1));
    }

    #[test]
    fn a_certificate_is_installed_only_for_the_identity_this_workload_expects() {
        let first = Expected {
            namespace: "default".into(),
            service_account: Some("checkout-api".into()),
            current: None,
        };
        assert!(first.matches("spiffe://weft.local/ns/default/sa/checkout-api"));
        for other in [
            "spiffe://weft.local/ns/default/sa/orders",
            "spiffe://weft.local/ns/prod/sa/checkout-api",
            "spiffe://weft.local/ns/default/sa/checkout-api/x",
            "spiffe://weft.local/ns/default/sa/",
            "https://weft.local/ns/default/sa/checkout-api",
        ] {
            assert!(!first.matches(other), "{other}");
        }
        // Without a token's service account, any in its own namespace.
        let tokenless = Expected {
            service_account: None,
            ..first
        };
        assert!(tokenless.matches("spiffe://weft.local/ns/default/sa/anything"));
        assert!(!tokenless.matches("spiffe://weft.local/ns/prod/sa/anything"));
        // A renewal keeps exactly the identity held.
        let renewal = Expected {
            namespace: "default".into(),
            service_account: Some("checkout-api".into()),
            current: Some("spiffe://weft.local/ns/default/sa/checkout-api".into()),
        };
        assert!(renewal.matches("spiffe://weft.local/ns/default/sa/checkout-api"));
        assert!(!renewal.matches("spiffe://other.td/ns/default/sa/checkout-api"));
        assert_eq!(renewal.to_string(), "spiffe://weft.local/ns/default/sa/checkout-api");
    }
}

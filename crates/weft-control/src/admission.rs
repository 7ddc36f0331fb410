//! Who may register on the control stream and be issued a certificate.
//!
//! A workload proves it is `namespace/name` in one of two ways:
//!
//! - its current certificate, presented as the TLS client certificate on the control channel:
//!   the handshake verified it against the mesh's trust bundle, its common name is the workload
//!   the CA issued it to and its SPIFFE ID is in that namespace. This is how a proxy renews and
//!   reconnects for as long as it runs, long after its join token expired.
//! - a join token for exactly that workload: signed by this control plane, not expired, on
//!   record, not revoked and, when it was minted with a use count, with uses left. Each
//!   certificate issued on a token's strength is one use, and a redemption in the ledger (with
//!   the workload, the caller's address and the certificate's serial).
//!
//! With `--insecure-plaintext` there are no client certificates, so tokens are the only proof:
//! a proxy in that mode cannot renew or reconnect once its token expired.

use crate::ca::{CaError, Claims};
use crate::mesh::Mesh;
use crate::store::{StoreError, TokenRecord, TokenRefusal};
use std::net::SocketAddr;
use std::time::Duration;

/// What a connection on the control channel proved in its handshake (a request extension of
/// every gRPC call; see [`crate::serving`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct ControlPeer {
    pub(crate) remote: Option<SocketAddr>,
    pub(crate) local: Option<SocketAddr>,
    /// The client certificate, when one was presented and verified.
    pub(crate) cert: Option<PeerCert>,
}

/// The facts of a verified client certificate the control plane relies on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PeerCert {
    pub(crate) spiffe_id: String,
    /// Its common name: the workload (`namespace/name`) the CA issued it to.
    pub(crate) workload: String,
    /// Hex.
    pub(crate) serial: String,
}

/// How a workload proved itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Proof {
    /// Its current certificate; no token use is counted.
    Certificate { serial: String },
    /// A join token.
    Token(Claims),
}

/// A workload admitted to register or be certified, and the identity it gets.
#[derive(Clone, Debug)]
pub(crate) struct Admitted {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) service_account: String,
    pub(crate) identity: String,
    pub(crate) proof: Proof,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error("{workload}: no proof of identity (a join token, or the workload's certificate as the client certificate)")]
    NoProof { workload: String },
    #[error("{workload}: the client certificate is {presented_spiffe} of workload {presented_workload}, and no join token")]
    OtherCertificate {
        workload: String,
        presented_workload: String,
        presented_spiffe: String,
    },
    #[error("{workload}: {source}")]
    Token { workload: String, source: CaError },
    #[error("{workload}: the token is for workload {token_for}")]
    OtherWorkload { workload: String, token_for: String },
    #[error("{workload}: {source}")]
    Record { workload: String, source: TokenRefusal },
    #[error("invalid workload {0:?}: expected NAMESPACE/NAME")]
    Workload(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

// === impl Refused ===

impl Refused {
    /// A short label for metrics.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Refused::NoProof { .. } => "no-proof",
            Refused::OtherCertificate { .. } => "other-certificate",
            Refused::Token {
                source: CaError::Expired(_),
                ..
            } => "token-expired",
            Refused::Token { .. } => "bad-token",
            Refused::OtherWorkload { .. } => "other-workload",
            Refused::Record {
                source: TokenRefusal::Revoked(_),
                ..
            } => "token-revoked",
            Refused::Record {
                source: TokenRefusal::UsedUp { .. },
                ..
            } => "token-used-up",
            Refused::Record { .. } => "token-unknown",
            Refused::Workload(_) => "invalid-workload",
            Refused::Store(_) => "store",
        }
    }
}

/// A new token's id: 16 random hex digits.
fn token_id() -> String {
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).expect("randomness for a token id");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// === impl PeerCert ===

impl PeerCert {
    /// Reads a (verified) certificate: its one SPIFFE ID, common name and serial.
    pub(crate) fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        let mut uris = san.value.general_names.iter().filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        });
        let spiffe_id = uris.next().filter(|u| u.starts_with("spiffe://"))?;
        if uris.next().is_some() {
            return None;
        }
        let workload = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
        Some(Self {
            spiffe_id,
            workload,
            serial: cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

// === impl Mesh ===

impl Mesh {
    /// Decides whether `namespace/name` proved itself: by the client certificate of `peer`, or
    /// else by `token`. Counts no use; see [`Mesh::redeem`].
    pub(crate) fn admit(&self, peer: Option<&ControlPeer>, namespace: &str, name: &str, token: &str) -> Result<Admitted, Refused> {
        let workload = format!("{namespace}/{name}");
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return Err(Refused::Workload(workload));
        }
        let presented = peer.and_then(|p| p.cert.as_ref());
        if let Some(cert) = presented
            && cert.workload == workload
            && let Some(sa) = cert
                .spiffe_id
                .strip_prefix(&format!("spiffe://{}/ns/{namespace}/sa/", self.ca.trust_domain()))
                .filter(|sa| !sa.is_empty() && !sa.contains('/'))
        {
            return Ok(Admitted {
                namespace: namespace.into(),
                name: name.into(),
                service_account: sa.into(),
                identity: cert.spiffe_id.clone(),
                proof: Proof::Certificate {
                    serial: cert.serial.clone(),
                },
            });
        }
        if token.is_empty() {
            return Err(match presented {
                Some(cert) => Refused::OtherCertificate {
                    workload,
                    presented_workload: cert.workload.clone(),
                    presented_spiffe: cert.spiffe_id.clone(),
                },
                None => Refused::NoProof { workload },
            });
        }
        let claims = self.ca.verify_token(token).map_err(|source| Refused::Token {
            workload: workload.clone(),
            source,
        })?;
        if claims.ns != namespace || claims.name != name {
            return Err(Refused::OtherWorkload {
                workload,
                token_for: claims.workload(),
            });
        }
        let record = self
            .store
            .token(&claims.jti)?
            .ok_or_else(|| TokenRefusal::Unknown(claims.jti.clone()));
        if let Err(source) = record.and_then(|r| r.usable()) {
            return Err(Refused::Record { workload, source });
        }
        Ok(Admitted {
            identity: self.ca.identity(namespace, &claims.sa),
            namespace: namespace.into(),
            name: name.into(),
            service_account: claims.sa.clone(),
            proof: Proof::Token(claims),
        })
    }

    /// Counts one use of the token `admitted` proved itself with, if it still has one, and
    /// records the redemption (workload, source address, certificate serial) in the ledger.
    /// Nothing to do for a workload admitted by its certificate.
    pub(crate) fn redeem(&self, admitted: &Admitted, source: Option<SocketAddr>, serial: &str) -> Result<(), Refused> {
        let Proof::Token(claims) = &admitted.proof else {
            return Ok(());
        };
        let workload = claims.workload();
        self.store
            .update_token(&claims.jti, |r| {
                r.usable()?;
                r.uses += 1;
                Ok(())
            })?
            .map_err(|source| Refused::Record {
                workload: workload.clone(),
                source,
            })?;
        let source = source.map(|a| a.to_string()).unwrap_or_else(|| "unknown".into());
        let entry = serde_json::json!({
            "timeMs": now() * 1000, "actor": format!("workload {workload}"), "action": "token redeemed",
            "subject": workload, "workload": workload, "tokenId": claims.jti, "source": source,
            "serial": serial, "identity": admitted.identity,
        });
        if let Err(error) = self.store.append_ledger(&entry.to_string()) {
            tracing::error!(%error, "cannot write the ledger");
        }
        tracing::info!(workload = %workload, token = %claims.jti, %source, serial, "join token redeemed");
        Ok(())
    }

    /// Mints a join token for `namespace/name` and records it; `uses`: certificates it may be
    /// redeemed for (none: any number until it expires).
    pub(crate) fn create_token(
        &self,
        namespace: &str,
        name: &str,
        service_account: &str,
        ttl: Duration,
        uses: Option<u32>,
    ) -> Result<(String, TokenRecord), StoreError> {
        let id = token_id();
        let (token, claims) = self.ca.create_token(&id, namespace, name, service_account, ttl);
        let record = TokenRecord {
            id,
            workload: claims.workload(),
            service_account: service_account.into(),
            created_at: now(),
            expires_at: claims.exp,
            uses_allowed: uses,
            uses: 0,
            revoked: false,
        };
        self.store.put_token(&record)?;
        Ok((token, record))
    }

    /// Refuses token `id` from now on; `None` when there is no such token.
    pub(crate) fn revoke_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        match self.store.update_token(id, |r| {
            r.revoked = true;
            Ok(())
        })? {
            Ok(record) => {
                tracing::info!(token = %id, workload = %record.workload, "join token revoked");
                Ok(Some(record))
            }
            Err(_) => Ok(None),
        }
    }

    /// Every recorded token (never a secret).
    pub(crate) fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.store.tokens()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Ca;
    use crate::store::Store;

    fn mesh() -> (Mesh, std::path::PathBuf) {
        let mut b = [0u8; 4];
        aws_lc_rs::rand::fill(&mut b).unwrap();
        let dir = std::env::temp_dir().join(format!("weft-admission-{}-{}", std::process::id(), u32::from_le_bytes(b)));
        let store = Store::open(&dir).unwrap();
        let ca = Ca::open(&store, "weft.local", Duration::from_secs(3600), None).unwrap();
        let metrics = crate::metrics::ControlMetrics::register(&mut prometheus_client::registry::Registry::default());
        (Mesh::new(std::sync::Arc::new(store), ca, metrics).unwrap(), dir)
    }

    fn peer_with(spiffe_id: &str, workload: &str) -> ControlPeer {
        ControlPeer {
            remote: Some("127.0.0.1:4000".parse().unwrap()),
            local: None,
            cert: Some(PeerCert {
                spiffe_id: spiffe_id.into(),
                workload: workload.into(),
                serial: "0a".into(),
            }),
        }
    }

    #[test]
    fn a_certificate_proves_exactly_its_own_workload() {
        let (mesh, dir) = mesh();
        let peer = peer_with("spiffe://weft.local/ns/default/sa/checkout-api", "default/checkout-api-v2");
        let admitted = mesh.admit(Some(&peer), "default", "checkout-api-v2", "").unwrap();
        assert_eq!(admitted.identity, "spiffe://weft.local/ns/default/sa/checkout-api");
        assert_eq!(admitted.service_account, "checkout-api");
        assert_eq!(admitted.proof, Proof::Certificate { serial: "0a".into() });
        // Another workload's certificate, another namespace, another trust domain: no.
        for (ns, name, peer) in [
            ("default", "checkout-api-v1", peer.clone()),
            (
                "prod",
                "checkout-api-v2",
                peer_with("spiffe://weft.local/ns/default/sa/checkout-api", "prod/checkout-api-v2"),
            ),
            (
                "default",
                "checkout-api-v2",
                peer_with("spiffe://other.mesh/ns/default/sa/checkout-api", "default/checkout-api-v2"),
            ),
        ] {
            let refused = mesh.admit(Some(&peer), ns, name, "").unwrap_err();
            assert_eq!(refused.reason(), "other-certificate", "{ns}/{name}: {refused}");
        }
        assert_eq!(mesh.admit(None, "default", "web", "").unwrap_err().reason(), "no-proof");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_token_proves_its_workload_while_on_record_and_counts_each_certificate() {
        let (mesh, dir) = mesh();
        let (token, record) = mesh
            .create_token("default", "orders", "orders", Duration::from_secs(60), Some(2))
            .unwrap();
        assert_eq!(mesh.admit(None, "default", "web", &token).unwrap_err().reason(), "other-workload");
        let admitted = mesh.admit(None, "default", "orders", &token).unwrap();
        assert!(matches!(&admitted.proof, Proof::Token(c) if c.jti == record.id));
        let source = Some("127.0.0.1:5000".parse().unwrap());
        mesh.redeem(&admitted, source, "01").unwrap();
        mesh.redeem(&admitted, source, "02").unwrap();
        let refused = mesh.redeem(&admitted, source, "03").unwrap_err();
        assert_eq!(refused.reason(), "token-used-up");
        assert_eq!(mesh.admit(None, "default", "orders", &token).unwrap_err().reason(), "token-used-up");
        let ledger = mesh.ledger(10).unwrap();
        let serials: Vec<&str> = ledger.iter().filter_map(|e| e["serial"].as_str()).collect();
        assert_eq!(serials, ["01", "02"], "one ledger entry per certificate issued");
        assert_eq!(ledger[0]["source"], "127.0.0.1:5000");

        let (other, record) = mesh
            .create_token("default", "orders", "orders", Duration::from_secs(60), None)
            .unwrap();
        assert!(mesh.revoke_token(&record.id).unwrap().is_some_and(|r| r.revoked));
        assert_eq!(mesh.admit(None, "default", "orders", &other).unwrap_err().reason(), "token-revoked");
        assert!(mesh.revoke_token("nope").unwrap().is_none());
        // A certificate for the workload still works without any token.
        let peer = peer_with("spiffe://weft.local/ns/default/sa/orders", "default/orders");
        let by_cert = mesh.admit(Some(&peer), "default", "orders", &other).unwrap();
        assert!(matches!(by_cert.proof, Proof::Certificate { .. }));
        mesh.redeem(&by_cert, source, "04").unwrap();
        assert_eq!(mesh.ledger(10).unwrap().len(), 2, "no redemption without a token");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

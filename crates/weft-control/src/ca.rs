//! The mesh's certificate authority and its join tokens.
//!
//! The root is generated at first start and kept in the store (or loaded from the user's own
//! files). A proxy proves which workload it is with a join token: signed by the control plane
//! (HMAC-SHA256 with a key kept in the store), expiring, valid for one workload. The CA decides
//! the identity from the token, `spiffe://<trust-domain>/ns/<ns>/sa/<service-account>`, and
//! issues a short-lived certificate with exactly that one URI SAN for the key in the CSR; a CSR
//! asking for any other name is refused. Keys never leave the proxy; tokens and keys are never
//! logged.

use crate::store::{Store, StoreError};
use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Shortest certificate lifetime accepted (tests use it to watch rotation).
pub const MIN_LEAF_TTL: Duration = Duration::from_secs(60);

pub struct Ca {
    trust_domain: String,
    leaf_ttl: Duration,
    state: parking_lot::RwLock<Roots>,
    token_key: hmac::Key,
}

/// The signing root, the roots trusted, and where a rotation stands.
struct Roots {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    root_not_after: u64,
    /// Every root proxies must trust (PEM, concatenated).
    bundle_pem: String,
    /// Bumped whenever the bundle changes.
    bundle_epoch: u64,
    /// Bumped whenever the signing root changes; a leaf of an older generation is re-issued.
    generation: u64,
    rotation: Rotation,
    /// The new root while its certificate is being distributed (phase `distributing`).
    next: Option<(String, String)>,
}

/// Root rotation with an overlap bundle: `distributing` (old and new roots trusted, old still
/// signs) until every proxy ACKed the bundle; `reissuing` (the new root signs; proxies renew)
/// until every workload holds a new leaf; then `idle` with the new root alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rotation {
    Idle,
    Distributing,
    Reissuing,
}

/// A snapshot of the CA for the API.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaView {
    pub trust_domain: String,
    pub root_not_after: u64,
    pub roots_trusted: usize,
    pub bundle_epoch: u64,
    pub generation: u64,
    pub rotation: Rotation,
    pub bundle: String,
}

/// What a token says: which workload holds it, and until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub ns: String,
    pub name: String,
    /// Service account: the last segment of the SPIFFE ID.
    pub sa: String,
    /// Expiry, unix seconds.
    pub exp: u64,
}

/// A certificate issued to a workload.
#[derive(Clone, Debug)]
pub struct Issued {
    pub chain_pem: String,
    pub identity: String,
    pub not_after: u64,
    /// The signing root's generation.
    pub generation: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("invalid token: {0}")]
    Token(&'static str),
    #[error("token expired {0} s ago")]
    Expired(u64),
    #[error("refused CSR: {0}")]
    Refused(String),
    #[error("certificate authority: {0}")]
    Internal(String),
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn offset(secs_from_now: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::seconds(secs_from_now)
}

fn internal(e: impl std::fmt::Display) -> CaError {
    CaError::Internal(e.to_string())
}

// === impl Ca ===

impl Ca {
    /// Loads the CA from the store, creating the root (or adopting `user_root`: certificate and
    /// key PEM) and the token key the first time.
    pub fn open(store: &Store, trust_domain: &str, leaf_ttl: Duration, user_root: Option<(String, String)>) -> Result<Self, CaError> {
        if leaf_ttl < MIN_LEAF_TTL {
            return Err(CaError::Internal(format!(
                "certificate lifetime {leaf_ttl:?} is below the minimum of {MIN_LEAF_TTL:?}"
            )));
        }
        let (root_pem, key_pem) = match (user_root, store.secret("root_cert")?, store.secret("root_key")?) {
            (Some((cert, key)), _, _) => (cert, key),
            (None, Some(cert), Some(key)) => (cert, key),
            _ => {
                let pair = new_root(trust_domain)?;
                store.put_secret("root_cert", &pair.0)?;
                store.put_secret("root_key", &pair.1)?;
                tracing::info!(trust_domain, "generated a new root CA");
                pair
            }
        };
        let (issuer, root_not_after) = signer(&root_pem, &key_pem)?;
        let bundle_pem = store.secret("bundle")?.unwrap_or_else(|| root_pem.clone());
        let number = |name: &str| -> Result<u64, CaError> { Ok(store.secret(name)?.and_then(|v| v.parse().ok()).unwrap_or(0)) };
        let next = match (store.secret("next_cert")?, store.secret("next_key")?) {
            (Some(c), Some(k)) => Some((c, k)),
            _ => None,
        };
        let rotation = match store.secret("rotation")?.as_deref() {
            Some("distributing") if next.is_some() => Rotation::Distributing,
            Some("reissuing") => Rotation::Reissuing,
            _ => Rotation::Idle,
        };
        let token_secret = match store.secret("token_key")? {
            Some(k) => URL_SAFE_NO_PAD.decode(k).map_err(internal)?,
            None => {
                let mut k = [0u8; 32];
                aws_lc_rs::rand::fill(&mut k).map_err(|_| CaError::Internal("no randomness".into()))?;
                store.put_secret("token_key", &URL_SAFE_NO_PAD.encode(k))?;
                k.to_vec()
            }
        };
        let roots = Roots {
            issuer,
            root_pem,
            root_not_after,
            bundle_pem,
            bundle_epoch: number("bundle_epoch")?,
            generation: number("generation")?,
            rotation,
            next,
        };
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            leaf_ttl,
            state: parking_lot::RwLock::new(roots),
            token_key: hmac::Key::new(hmac::HMAC_SHA256, &token_secret),
        })
    }

    /// Starts a root rotation: a new root joins the trust bundle; the old one still signs.
    pub fn rotate(&self, store: &Store) -> Result<(), CaError> {
        let mut st = self.state.write();
        if st.rotation != Rotation::Idle {
            return Err(CaError::Busy(format!("a rotation is already {:?}", st.rotation)));
        }
        let (cert, key) = new_root(&self.trust_domain)?;
        let bundle = format!("{}\n{}", st.bundle_pem.trim_end(), cert);
        store.put_secret("next_cert", &cert)?;
        store.put_secret("next_key", &key)?;
        store.put_secret("bundle", &bundle)?;
        store.put_secret("bundle_epoch", &(st.bundle_epoch + 1).to_string())?;
        store.put_secret("rotation", "distributing")?;
        st.bundle_pem = bundle;
        st.bundle_epoch += 1;
        st.next = Some((cert, key));
        st.rotation = Rotation::Distributing;
        tracing::info!(
            bundle_epoch = st.bundle_epoch,
            "root rotation: new root distributed alongside the old"
        );
        Ok(())
    }

    /// Every proxy trusts the new root: it signs from now on, and leaves are re-issued.
    pub fn switch_signer(&self, store: &Store) -> Result<(), CaError> {
        let mut st = self.state.write();
        let Some((cert, key)) = st.next.clone() else { return Ok(()) };
        let (issuer, not_after) = signer(&cert, &key)?;
        store.put_secret("root_cert", &cert)?;
        store.put_secret("root_key", &key)?;
        store.put_secret("generation", &(st.generation + 1).to_string())?;
        store.put_secret("rotation", "reissuing")?;
        st.issuer = issuer;
        st.root_pem = cert;
        st.root_not_after = not_after;
        st.generation += 1;
        st.next = None;
        st.rotation = Rotation::Reissuing;
        tracing::info!(generation = st.generation, "root rotation: the new root signs; workloads renew");
        Ok(())
    }

    /// Every workload holds a leaf of the new root: the old root leaves the bundle.
    pub fn finish_rotation(&self, store: &Store) -> Result<(), CaError> {
        let mut st = self.state.write();
        let bundle = st.root_pem.clone();
        store.put_secret("bundle", &bundle)?;
        store.put_secret("bundle_epoch", &(st.bundle_epoch + 1).to_string())?;
        store.put_secret("rotation", "idle")?;
        st.bundle_pem = bundle;
        st.bundle_epoch += 1;
        st.rotation = Rotation::Idle;
        tracing::info!(
            bundle_epoch = st.bundle_epoch,
            "root rotation finished: the old root is no longer trusted"
        );
        Ok(())
    }

    pub fn rotation(&self) -> Rotation {
        self.state.read().rotation
    }

    pub fn generation(&self) -> u64 {
        self.state.read().generation
    }

    pub fn bundle_epoch(&self) -> u64 {
        self.state.read().bundle_epoch
    }

    pub fn view(&self) -> CaView {
        let st = self.state.read();
        CaView {
            trust_domain: self.trust_domain.clone(),
            root_not_after: st.root_not_after,
            roots_trusted: st.bundle_pem.matches("BEGIN CERTIFICATE").count(),
            bundle_epoch: st.bundle_epoch,
            generation: st.generation,
            rotation: st.rotation,
            bundle: st.bundle_pem.clone(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The SPIFFE ID of a workload's service account.
    pub fn identity(&self, ns: &str, sa: &str) -> String {
        format!("spiffe://{}/ns/{ns}/sa/{sa}", self.trust_domain)
    }

    /// The roots proxies trust.
    pub fn bundle_pem(&self) -> String {
        self.state.read().bundle_pem.clone()
    }

    pub fn root_not_after(&self) -> u64 {
        self.state.read().root_not_after
    }

    /// A join token for one workload: `weft1.<claims>.<signature>`.
    pub fn create_token(&self, ns: &str, name: &str, sa: &str, ttl: Duration) -> String {
        let claims = Claims {
            ns: ns.into(),
            name: name.into(),
            sa: sa.into(),
            exp: now() + ttl.as_secs(),
        };
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let tag = hmac::sign(&self.token_key, format!("weft1.{body}").as_bytes());
        format!("weft1.{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Checks a token's signature and expiry; never echoes the token.
    pub fn verify_token(&self, token: &str) -> Result<Claims, CaError> {
        let mut parts = token.split('.');
        let (Some("weft1"), Some(body), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(CaError::Token("not a weft join token"));
        };
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| CaError::Token("malformed signature"))?;
        hmac::verify(&self.token_key, format!("weft1.{body}").as_bytes(), &sig).map_err(|_| CaError::Token("bad signature"))?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(CaError::Token("malformed claims"))?;
        let t = now();
        if claims.exp <= t {
            return Err(CaError::Expired(t - claims.exp));
        }
        Ok(claims)
    }

    /// Signs the key in `csr_pem` for the workload the token names. The CSR may ask for no
    /// name, or for exactly the identity the token grants; anything else is refused.
    pub fn certify(&self, claims: &Claims, csr_pem: &str) -> Result<Issued, CaError> {
        let identity = self.identity(&claims.ns, &claims.sa);
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::Refused(format!("unreadable CSR: {e}")))?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(u) => u.as_str().to_string(),
                SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
                other => format!("{other:?}"),
            })
            .collect();
        if !(asked.is_empty() || asked == [identity.clone()]) {
            return Err(CaError::Refused(format!(
                "it asks for {asked:?}; the token of {}/{} grants only {identity}",
                claims.ns, claims.name
            )));
        }
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(internal)?;
        params.subject_alt_names = vec![SanType::URI(identity.as_str().try_into().map_err(internal)?)];
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{}/{}", claims.ns, claims.name));
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = offset(-60);
        params.not_after = offset(self.leaf_ttl.as_secs() as i64);
        let roots = self.state.read();
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&roots.issuer)
        .map_err(internal)?;
        Ok(Issued {
            chain_pem: signed.pem(),
            identity,
            not_after: now() + self.leaf_ttl.as_secs(),
            generation: roots.generation,
        })
    }
}

/// A fresh self-signed root (certificate and key PEM), valid for ten years.
fn new_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(internal)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(internal)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
        .distinguished_name
        .push(DnType::CommonName, format!("weft root CA ({trust_domain}) {}", now()));
    params.not_before = offset(-3600);
    params.not_after = offset(10 * 365 * 86_400);
    let cert = params.self_signed(&key).map_err(internal)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The issuer for a root's certificate and key, and the root's expiry.
fn signer(cert_pem: &str, key_pem: &str) -> Result<(Issuer<'static, KeyPair>, u64), CaError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Internal(format!("root key: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CaError::Internal(format!("root certificate: {e}")))?;
    let der = pem_der(cert_pem).ok_or_else(|| CaError::Internal("root certificate is not PEM".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(internal)?;
    Ok((issuer, cert.validity().not_after.timestamp().max(0) as u64))
}

/// The DER of the first PEM block in `pem`.
pub fn pem_der(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (Ca, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("weft-ca-{}-{}", std::process::id(), rand_suffix()));
        let store = Store::open(&dir).unwrap();
        (Ca::open(&store, "weft.local", Duration::from_secs(3600), None).unwrap(), dir)
    }

    fn rand_suffix() -> u32 {
        let mut b = [0u8; 4];
        aws_lc_rs::rand::fill(&mut b).unwrap();
        u32::from_le_bytes(b)
    }

    /// A CSR asking for `sans`: SPIFFE IDs as URI names, anything else as DNS names.
    fn csr(sans: Vec<String>) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans
            .iter()
            .map(|s| {
                if s.starts_with("spiffe://") {
                    SanType::URI(s.as_str().try_into().unwrap())
                } else {
                    SanType::DnsName(s.as_str().try_into().unwrap())
                }
            })
            .collect();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn tokens_are_signed_expiring_and_for_one_workload() {
        let (ca, dir) = ca();
        let token = ca.create_token("default", "orders-api", "orders-api", Duration::from_secs(60));
        let claims = ca.verify_token(&token).unwrap();
        assert_eq!((claims.ns.as_str(), claims.name.as_str()), ("default", "orders-api"));
        let mut forged = token.clone();
        forged.replace_range(10..11, if &token[10..11] == "A" { "B" } else { "A" });
        assert!(ca.verify_token(&forged).is_err());
        assert!(matches!(ca.verify_token("weft1.e30.AAAA"), Err(CaError::Token(_))));
        let expired = ca.create_token("default", "x", "x", Duration::ZERO);
        assert!(matches!(ca.verify_token(&expired), Err(CaError::Expired(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_ca_decides_the_identity_and_refuses_any_other() {
        let (ca, dir) = ca();
        let claims = ca
            .verify_token(&ca.create_token("default", "checkout-api-v2", "checkout-api", Duration::from_secs(60)))
            .unwrap();
        let issued = ca.certify(&claims, &csr(vec![])).unwrap();
        assert_eq!(issued.identity, "spiffe://weft.local/ns/default/sa/checkout-api");
        let der = pem_der(&issued.chain_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| format!("{n}"))
            .collect();
        assert_eq!(sans, ["URI(spiffe://weft.local/ns/default/sa/checkout-api)"]);
        let own = ca.certify(&claims, &csr(vec!["spiffe://weft.local/ns/default/sa/checkout-api".into()]));
        assert!(own.is_ok(), "asking for exactly its own identity is fine: {:?}", own.err());
        let other = ca.certify(&claims, &csr(vec!["spiffe://weft.local/ns/default/sa/payments-svc".into()]));
        assert!(matches!(other, Err(CaError::Refused(_))), "another identity is refused");
        let extra = ca.certify(
            &claims,
            &csr(vec!["spiffe://weft.local/ns/default/sa/checkout-api".into(), "evil.example".into()]),
        );
        assert!(matches!(extra, Err(CaError::Refused(_))), "extra SANs are refused");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_root_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("weft-ca-restart-{}", std::process::id()));
        let root = {
            let store = Store::open(&dir).unwrap();
            Ca::open(&store, "weft.local", Duration::from_secs(3600), None)
                .unwrap()
                .bundle_pem()
                .to_string()
        };
        let store = Store::open(&dir).unwrap();
        assert_eq!(
            Ca::open(&store, "weft.local", Duration::from_secs(3600), None)
                .unwrap()
                .bundle_pem(),
            root
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}

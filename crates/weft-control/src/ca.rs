//! The mesh's certificate authority and its join tokens.
//!
//! The root is generated at first start and kept in the store (or loaded from the user's own
//! files). A proxy proves which workload it is with a join token: signed by the control plane
//! (HMAC-SHA256 with a key kept in the store), expiring, valid for one workload, carrying the
//! fingerprint of the root that signs the control plane's serving certificate (the proxy pins
//! it). The CA decides the identity, `spiffe://<trust-domain>/ns/<ns>/sa/<service-account>`, and
//! issues a short-lived certificate with exactly that one URI SAN (and the workload as its common
//! name) for the key in the CSR; a CSR asking for any other name is refused. Which proof a
//! workload needs (a token, or its current certificate) is [`crate::admission`]'s business. Keys
//! never leave the proxy; tokens and keys are never logged.

use crate::clock::Clock;
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
pub(crate) use weft_api::token::Claims;

/// Shortest certificate lifetime accepted (tests use it to watch rotation).
pub(crate) const MIN_LEAF_TTL: Duration = Duration::from_secs(60);

pub(crate) struct Ca {
    trust_domain: String,
    leaf_ttl: Duration,
    state: parking_lot::RwLock<Roots>,
    token_key: hmac::Key,
    /// What token expiry is checked against.
    clock: Clock,
}

/// The signing root, the roots trusted, and where a rotation stands.
struct Roots {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    /// SHA-256 of the signing root's DER (hex): what join tokens pin.
    root_fingerprint: String,
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
    /// When this replica first knew the bundle it holds.
    bundle_since: std::time::Instant,
}

/// Root rotation with an overlap bundle: `distributing` (old and new roots trusted, old still
/// signs) until every proxy ACKed the bundle; `reissuing` (the new root signs; proxies renew)
/// until every workload holds a new leaf; then `idle` with the new root alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Rotation {
    Idle,
    Distributing,
    Reissuing,
}

/// A snapshot of the CA for the API.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CaView {
    pub(crate) trust_domain: String,
    pub(crate) root_not_after: u64,
    pub(crate) roots_trusted: usize,
    pub(crate) bundle_epoch: u64,
    pub(crate) generation: u64,
    pub(crate) rotation: Rotation,
    pub(crate) bundle: String,
}

/// A certificate issued to a workload.
#[derive(Clone, Debug)]
pub(crate) struct Issued {
    pub(crate) chain_pem: String,
    pub(crate) identity: String,
    pub(crate) not_after: u64,
    /// The signing root's generation.
    pub(crate) generation: u64,
    /// The certificate's serial number, hex.
    pub(crate) serial: String,
}

/// The control plane's own serving certificate.
#[derive(Clone, Debug)]
pub(crate) struct ServingIssued {
    /// The leaf, then the root that signed it (so clients can pin the root by fingerprint).
    pub(crate) chain_pem: String,
    /// The root that signed it: whoever serves it must trust it first.
    pub(crate) root_pem: String,
    pub(crate) not_after: u64,
    pub(crate) generation: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("invalid token: {0}")]
    Token(String),
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

/// A fresh random serial number (positive, 16 bytes) and its hex.
fn serial() -> Result<(rcgen::SerialNumber, String), CaError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| CaError::Internal("no randomness for a serial number".into()))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok((rcgen::SerialNumber::from_slice(&bytes), hex))
}

/// SHA-256 of the first certificate in `pem`, hex.
fn fingerprint_of(pem: &str) -> Result<String, CaError> {
    pem_der(pem)
        .map(|der| weft_core::tls::fingerprint(&der))
        .ok_or_else(|| CaError::Internal("root certificate is not PEM".into()))
}

// === impl Ca ===

impl Ca {
    /// Loads the CA from the store, creating the root (or adopting `user_root`: certificate and
    /// key PEM) and the token key the first time.
    pub(crate) fn open(
        store: &Store,
        trust_domain: &str,
        leaf_ttl: Duration,
        user_root: Option<(String, String)>,
    ) -> Result<Self, CaError> {
        if leaf_ttl < MIN_LEAF_TTL {
            return Err(CaError::Internal(format!(
                "certificate lifetime {leaf_ttl:?} is below the minimum of {MIN_LEAF_TTL:?}"
            )));
        }
        let (root_pem, key_pem) = match (user_root, store.secret("root_cert")?, store.secret("root_key")?) {
            (Some((cert, key)), _, _) => (cert, key),
            (None, Some(cert), Some(key)) => (cert, key),
            _ => {
                // Replicas starting together on a new shared store agree on the first root
                // stored: the pair is one record so a root never meets another's key.
                let pair = new_root(trust_domain)?;
                let joined = format!("{}\n{}", pair.0, pair.1);
                let stored = store.create_secret("root_pair", &joined)?;
                if stored == joined {
                    tracing::info!(trust_domain, "generated a new root CA");
                }
                let (cert, key) = split_pair(&stored)?;
                store.put_secret("root_cert", &cert)?;
                store.put_secret("root_key", &key)?;
                (cert, key)
            }
        };
        let token_secret = match store.secret("token_key")? {
            Some(k) => URL_SAFE_NO_PAD.decode(k).map_err(internal)?,
            None => {
                let mut k = [0u8; 32];
                aws_lc_rs::rand::fill(&mut k).map_err(|_| CaError::Internal("no randomness".into()))?;
                let stored = store.create_secret("token_key", &URL_SAFE_NO_PAD.encode(k))?;
                URL_SAFE_NO_PAD.decode(stored).map_err(internal)?
            }
        };
        let roots = read_roots(store, root_pem, key_pem)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            leaf_ttl,
            state: parking_lot::RwLock::new(roots),
            token_key: hmac::Key::new(hmac::HMAC_SHA256, &token_secret),
            clock: Clock::default(),
        })
    }

    /// Follows a root rotation another replica (the leader) made: once the stored generation,
    /// bundle epoch or rotation phase differs from this replica's, its roots are read again.
    pub(crate) fn reload(&self, store: &Store) -> Result<bool, CaError> {
        let number = |name: &str| -> Result<u64, CaError> { Ok(store.secret(name)?.and_then(|v| v.parse().ok()).unwrap_or(0)) };
        let (generation, epoch) = (number("generation")?, number("bundle_epoch")?);
        let rotation = store.secret("rotation")?.unwrap_or_else(|| "idle".into());
        {
            let st = self.state.read();
            // The rotation's phase too: its last write (back to idle) moves neither number.
            let same_phase = format!("{:?}", st.rotation).eq_ignore_ascii_case(&rotation);
            if generation <= st.generation && epoch <= st.bundle_epoch && same_phase {
                return Ok(false);
            }
        }
        let (Some(cert), Some(key)) = (store.secret("root_cert")?, store.secret("root_key")?) else {
            return Ok(false);
        };
        *self.state.write() = read_roots(store, cert, key)?;
        Ok(true)
    }

    /// The same CA, deciding token expiry by `clock`.
    #[cfg(test)]
    pub(crate) fn with_clock(self, clock: Clock) -> Self {
        Self { clock, ..self }
    }

    /// Unix seconds by the CA's clock. Certificates' own validity is stamped from the real
    /// clock (peers check it against theirs); the clock decides what is policy: token expiry.
    fn now(&self) -> u64 {
        self.clock.unix_ms() / 1000
    }

    /// Starts a root rotation: a new root joins the trust bundle; the old one still signs.
    pub(crate) fn rotate(&self, store: &Store) -> Result<(), CaError> {
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
        st.bundle_since = std::time::Instant::now();
        st.next = Some((cert, key));
        st.rotation = Rotation::Distributing;
        tracing::info!(
            bundle_epoch = st.bundle_epoch,
            "root rotation: new root distributed alongside the old"
        );
        Ok(())
    }

    /// Every proxy trusts the new root: it signs from now on, and leaves are re-issued.
    pub(crate) fn switch_signer(&self, store: &Store) -> Result<(), CaError> {
        let mut st = self.state.write();
        let Some((cert, key)) = st.next.clone() else { return Ok(()) };
        let (issuer, not_after) = signer(&cert, &key)?;
        store.put_secret("root_cert", &cert)?;
        store.put_secret("root_key", &key)?;
        store.put_secret("generation", &(st.generation + 1).to_string())?;
        store.put_secret("rotation", "reissuing")?;
        st.issuer = issuer;
        st.root_fingerprint = fingerprint_of(&cert)?;
        st.root_pem = cert;
        st.root_not_after = not_after;
        st.generation += 1;
        st.next = None;
        st.rotation = Rotation::Reissuing;
        tracing::info!(generation = st.generation, "root rotation: the new root signs; workloads renew");
        Ok(())
    }

    /// Every workload holds a leaf of the new root: the old root leaves the bundle.
    pub(crate) fn finish_rotation(&self, store: &Store) -> Result<(), CaError> {
        let mut st = self.state.write();
        let bundle = st.root_pem.clone();
        store.put_secret("bundle", &bundle)?;
        store.put_secret("bundle_epoch", &(st.bundle_epoch + 1).to_string())?;
        store.put_secret("rotation", "idle")?;
        st.bundle_pem = bundle;
        st.bundle_epoch += 1;
        st.bundle_since = std::time::Instant::now();
        st.rotation = Rotation::Idle;
        tracing::info!(
            bundle_epoch = st.bundle_epoch,
            "root rotation finished: the old root is no longer trusted"
        );
        Ok(())
    }

    /// How long this replica has held the bundle it holds.
    pub(crate) fn bundle_age(&self) -> Duration {
        self.state.read().bundle_since.elapsed()
    }

    pub(crate) fn rotation(&self) -> Rotation {
        self.state.read().rotation
    }

    pub(crate) fn generation(&self) -> u64 {
        self.state.read().generation
    }

    pub(crate) fn bundle_epoch(&self) -> u64 {
        self.state.read().bundle_epoch
    }

    pub(crate) fn view(&self) -> CaView {
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

    pub(crate) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The SPIFFE ID of a workload's service account.
    pub(crate) fn identity(&self, ns: &str, sa: &str) -> String {
        format!("spiffe://{}/ns/{ns}/sa/{sa}", self.trust_domain)
    }

    /// The roots proxies trust.
    pub(crate) fn bundle_pem(&self) -> String {
        self.state.read().bundle_pem.clone()
    }

    /// The bundle with its epoch, read together (a reload swaps both at once).
    pub(crate) fn bundle(&self) -> (u64, String) {
        let st = self.state.read();
        (st.bundle_epoch, st.bundle_pem.clone())
    }

    /// SHA-256 (hex) of the root that signs now: what new join tokens pin.
    pub(crate) fn root_fingerprint(&self) -> String {
        self.state.read().root_fingerprint.clone()
    }

    /// What new join tokens pin: the root that signs now and, during a rotation's distribution,
    /// the root about to sign (comma-separated hex SHA-256). A token minted mid-rotation then
    /// verifies the control plane before and after the new root starts signing.
    pub(crate) fn token_pins(&self) -> String {
        let st = self.state.read();
        match st.next.as_ref().and_then(|(cert, _)| fingerprint_of(cert).ok()) {
            Some(next) => format!("{},{next}", st.root_fingerprint),
            None => st.root_fingerprint.clone(),
        }
    }

    /// A join token for one workload, `weft1.<claims>.<signature>`, with id `jti`. It pins
    /// [`Ca::token_pins`].
    pub(crate) fn create_token(&self, jti: &str, ns: &str, name: &str, sa: &str, ttl: Duration) -> (String, Claims) {
        let claims = Claims {
            jti: jti.into(),
            ns: ns.into(),
            name: name.into(),
            sa: sa.into(),
            exp: self.now() + ttl.as_secs(),
            ca: self.token_pins(),
        };
        let signed = claims.signed_part();
        let tag = hmac::sign(&self.token_key, signed.as_bytes());
        (format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref())), claims)
    }

    /// Checks a token's signature and expiry; never echoes the token. Whether it is still on
    /// record (not revoked, uses left) is the store's to say.
    pub(crate) fn verify_token(&self, token: &str) -> Result<Claims, CaError> {
        let (signed, claims, sig) = weft_api::token::split(token).map_err(|e| CaError::Token(e.to_string()))?;
        hmac::verify(&self.token_key, signed.as_bytes(), &sig).map_err(|_| CaError::Token("bad signature".into()))?;
        let t = self.now();
        if claims.exp <= t {
            return Err(CaError::Expired(t - claims.exp));
        }
        Ok(claims)
    }

    /// Signs the key in `csr_pem` for workload `ns/name` with service account `sa`. The CSR may
    /// ask for no name, or for exactly that identity; anything else is refused.
    pub(crate) fn certify(&self, ns: &str, name: &str, sa: &str, csr_pem: &str) -> Result<Issued, CaError> {
        let identity = self.identity(ns, sa);
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
                "it asks for {asked:?}; workload {ns}/{name} may have only {identity}"
            )));
        }
        let (serial, serial_hex) = serial()?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(internal)?;
        params.subject_alt_names = vec![SanType::URI(identity.as_str().try_into().map_err(internal)?)];
        // The workload, for the control plane to read back from a client certificate.
        params.distinguished_name.push(DnType::CommonName, format!("{ns}/{name}"));
        params.serial_number = Some(serial);
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
            serial: serial_hex,
        })
    }

    /// The control plane's serving certificate for `key`: server-auth only, with exactly `sans`
    /// (DNS names and IP addresses), valid for `ttl`. The chain ends with the signing root.
    pub(crate) fn issue_serving(&self, key: &KeyPair, sans: &[SanType], ttl: Duration) -> Result<ServingIssued, CaError> {
        let (serial, _) = serial()?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(internal)?;
        params.subject_alt_names = sans.to_vec();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("weft control plane ({})", self.trust_domain));
        params.serial_number = Some(serial);
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = offset(-60);
        params.not_after = offset(ttl.as_secs() as i64);
        let roots = self.state.read();
        let leaf = params.signed_by(key, &roots.issuer).map_err(internal)?;
        Ok(ServingIssued {
            chain_pem: format!("{}{}", leaf.pem(), roots.root_pem),
            root_pem: roots.root_pem.clone(),
            not_after: now() + ttl.as_secs(),
            generation: roots.generation,
        })
    }
}

/// A fresh self-signed root (certificate and key PEM), valid for ten years.
/// The signing root `root_pem`/`key_pem` with what the store holds of the trust bundle and of a
/// rotation.
fn read_roots(store: &Store, root_pem: String, key_pem: String) -> Result<Roots, CaError> {
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
    Ok(Roots {
        issuer,
        root_fingerprint: fingerprint_of(&root_pem)?,
        root_pem,
        root_not_after,
        bundle_pem,
        bundle_epoch: number("bundle_epoch")?,
        generation: number("generation")?,
        rotation,
        next,
        bundle_since: std::time::Instant::now(),
    })
}

/// The certificate and key of a `root_pair` record (the certificate's PEM, then the key's).
fn split_pair(pair: &str) -> Result<(String, String), CaError> {
    const END: &str = "-----END CERTIFICATE-----";
    let at = pair
        .find(END)
        .ok_or_else(|| CaError::Internal("the stored root pair holds no certificate".into()))?
        + END.len();
    Ok((format!("{}\n", &pair[..at]), pair[at..].trim_start().to_string()))
}

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
    let der = pem_der(cert_pem).ok_or_else(|| CaError::Internal("root certificate is not PEM".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(internal)?;
    // The certificate and the key are two records a switch of signer writes one after the
    // other: a follower reading between them would sign with the old key under the new name.
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::Internal(
            "root key does not match the root certificate (a switch of signer in progress)".into(),
        ));
    }
    let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CaError::Internal(format!("root certificate: {e}")))?;
    Ok((issuer, cert.validity().not_after.timestamp().max(0) as u64))
}

/// The DER of the first PEM block in `pem`.
pub(crate) fn pem_der(pem: &str) -> Option<Vec<u8>> {
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

    /// A certificate's subject alternative names, as x509-parser prints them.
    fn san_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
        let sans = cert.subject_alternative_name().unwrap().expect("a SAN extension");
        sans.value.general_names.iter().map(|n| format!("{n}")).collect()
    }

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
    fn tokens_are_signed_expiring_and_pin_the_signing_root() {
        let (ca, dir) = ca();
        let (token, made) = ca.create_token("t-1", "default", "orders-api", "orders-api", Duration::from_secs(60));
        let claims = ca.verify_token(&token).unwrap();
        assert_eq!(claims, made);
        assert_eq!((claims.jti.as_str(), claims.workload().as_str()), ("t-1", "default/orders-api"));
        let root_der = pem_der(&ca.bundle_pem()).unwrap();
        assert_eq!(claims.ca, weft_core::tls::fingerprint(&root_der), "the token pins the root");
        assert_eq!(weft_api::token::peek(&token).unwrap().ca, claims.ca, "readable without the key");
        let mut forged = token.clone();
        forged.replace_range(10..11, if &token[10..11] == "A" { "B" } else { "A" });
        assert!(ca.verify_token(&forged).is_err());
        assert!(matches!(ca.verify_token("weft1.e30.AAAA"), Err(CaError::Token(_))));
        let (expired, _) = ca.create_token("t-2", "default", "x", "x", Duration::ZERO);
        assert!(matches!(ca.verify_token(&expired), Err(CaError::Expired(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_token_expires_when_its_ttl_has_passed_on_the_clock() {
        let (ca, dir) = ca();
        let clock = Clock::manual();
        let ca = ca.with_clock(clock.clone());
        let (token, _) = ca.create_token("t-3", "default", "orders-api", "orders-api", Duration::from_secs(600));
        clock.advance(Duration::from_secs(599));
        assert!(ca.verify_token(&token).is_ok(), "valid one second before its expiry");
        clock.advance(Duration::from_secs(61));
        match ca.verify_token(&token) {
            Err(CaError::Expired(ago)) => assert_eq!(ago, 60, "expired a minute ago"),
            other => panic!("expected expiry, got {other:?}"),
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_ca_decides_the_identity_and_refuses_any_other() {
        let (ca, dir) = ca();
        let certify = |sans: Vec<String>| ca.certify("default", "checkout-api-v2", "checkout-api", &csr(sans));
        let issued = certify(vec![]).unwrap();
        assert_eq!(issued.identity, "spiffe://weft.local/ns/default/sa/checkout-api");
        let der = pem_der(&issued.chain_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans = san_names(&cert);
        assert_eq!(sans, ["URI(spiffe://weft.local/ns/default/sa/checkout-api)"]);
        let cn: Vec<&str> = cert.subject().iter_common_name().filter_map(|c| c.as_str().ok()).collect();
        assert_eq!(cn, ["default/checkout-api-v2"], "the workload is the common name");
        assert_eq!(cert.raw_serial_as_string().replace(':', ""), issued.serial);
        assert_ne!(certify(vec![]).unwrap().serial, issued.serial, "serials are not reused");
        let own = certify(vec!["spiffe://weft.local/ns/default/sa/checkout-api".into()]);
        assert!(own.is_ok(), "asking for exactly its own identity is fine: {:?}", own.err());
        let other = certify(vec!["spiffe://weft.local/ns/default/sa/payments-svc".into()]);
        assert!(matches!(other, Err(CaError::Refused(_))), "another identity is refused");
        let extra = certify(vec!["spiffe://weft.local/ns/default/sa/checkout-api".into(), "evil.example".into()]);
        assert!(matches!(extra, Err(CaError::Refused(_))), "extra SANs are refused");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_serving_certificate_names_the_addresses_and_carries_the_root() {
        let (ca, dir) = ca();
        let key = KeyPair::generate().unwrap();
        let sans = [
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ];
        let serving = ca.issue_serving(&key, &sans, Duration::from_secs(3600)).unwrap();
        let chain = weft_core::tls::certs_from_pem(&serving.chain_pem, "chain").unwrap();
        assert_eq!(chain.len(), 2, "leaf and root");
        assert_eq!(weft_core::tls::fingerprint(&chain[1]), ca.root_fingerprint(), "the root tokens pin");
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let names = san_names(&leaf);
        assert_eq!(
            names,
            ["DNSName(localhost)", "IPAddress(7f:00:00:01)"],
            "127.0.0.1, as x509-parser prints it"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A follower reloading while the leader switches signer can read the new root's
    /// certificate and still the old key (two records written in turn): it keeps its roots
    /// until both are the new ones, instead of signing with the old key under the new name.
    #[test]
    fn a_follower_reading_between_the_new_certificate_and_its_key_keeps_its_roots() {
        let dir = std::env::temp_dir().join(format!("weft-ca-switch-{}-{}", std::process::id(), rand_suffix()));
        let store = Store::open(&dir).unwrap();
        let leader = Ca::open(&store, "weft.local", Duration::from_secs(3600), None).unwrap();
        let follower = Ca::open(&store, "weft.local", Duration::from_secs(3600), None).unwrap();
        leader.rotate(&store).unwrap();
        assert!(follower.reload(&store).unwrap());
        let before = follower.root_fingerprint();
        // The switch's first write only, and the generation the follower's reload looks at.
        let next = store.secret("next_cert").unwrap().unwrap();
        store.put_secret("root_cert", &next).unwrap();
        store.put_secret("generation", "1").unwrap();
        let err = follower.reload(&store).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        assert_eq!(follower.root_fingerprint(), before);
        assert_eq!(follower.generation(), 0);
        // The key written: the follower takes the new root.
        store.put_secret("root_key", &store.secret("next_key").unwrap().unwrap()).unwrap();
        assert!(follower.reload(&store).unwrap());
        assert_eq!(follower.root_fingerprint(), fingerprint_of(&next).unwrap());
        drop(store);
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

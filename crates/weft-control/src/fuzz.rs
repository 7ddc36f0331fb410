//! The control plane's entry points for weft's fuzz targets (crate `weft-fuzz` and `fuzz/`),
//! built only with the `fuzz` feature.
//!
//! Each target takes the bytes a peer could send and drives the same private code the control
//! plane runs on them, panicking where that code panics or breaks a stated property. This
//! module is the only door: the CA, the store and the mesh stay private to the crate, so the
//! compiler still reports their dead code. All targets share one store and CA per process
//! (see [`store`]), so a crash replays from its input file alone.

use crate::ca::{Ca, pem_der};
use crate::distribution;
use crate::mesh::Mesh;
use crate::metrics::ControlMetrics;
use crate::store::{Store, TokenRecord};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use prost::Message;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use weft_api::proto::{ProxyMessage, proxy_message::Msg};
use weft_api::token::{Claims, peek, split};
use x509_parser::extensions::GeneralName;

const TRUST_DOMAIN: &str = "weft.local";
/// The id of the join token on record; see [`join_token`].
const TOKEN_ID: &str = "fuzz-token";
/// Not a secret: it signs only the fuzz corpus's tokens, which must verify in any process.
const TOKEN_KEY: &[u8; 32] = b"weft-fuzz-token-key-not-a-secret";
const LEAF_TTL: Duration = Duration::from_secs(3600);
/// Long enough that checked-in tokens never expire.
const TOKEN_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);
const PEM_BEGIN: &str = "-----BEGIN";

/// A `Connect` stream's messages as the control plane receives them (length-delimited
/// `ProxyMessage`s): admission of the Register's token, registration, then each later message
/// as the stream's task applies it; then every view the API serves from them and the config
/// the proxy would be pushed. The stream must open with a Register, as on the wire. Admission's
/// verdict is computed but registration goes ahead whatever it says (as for a proxy admitted by
/// its certificate), so mutated tokens do not hide the rest of the stream from the fuzzer.
pub fn proxy_message(data: &[u8]) {
    let Some(messages) = decode(data) else { return };
    let mut messages = messages.into_iter();
    let Some(Msg::Register(register)) = messages.next().and_then(|m| m.msg) else {
        return;
    };
    let mesh = mesh();
    let identity = match mesh.admit(None, &register.namespace, &register.name, &register.token) {
        Ok(admitted) => admitted.identity,
        Err(_) => mesh.ca.identity(&register.namespace, &register.name),
    };
    let Ok((conn, _id)) = mesh.register(&register, identity) else {
        return;
    };
    for msg in messages.filter_map(|m| m.msg) {
        if distribution::receive(&mesh, conn, msg).is_err() {
            break;
        }
    }
    mesh.status();
    mesh.routes();
    mesh.proxies();
    mesh.config_for(conn);
    mesh.unregister(conn);
}

/// A CSR as DER (wrapped in PEM here, so the fuzzer mutates the structure, not its base64) or,
/// when it starts with `-----BEGIN`, as PEM text, signed by the CA for `default/orders`.
/// Property: whatever the CSR asks, a certificate issued names exactly the identity the CA
/// decided, once, and nothing else.
pub fn csr(data: &[u8]) {
    let pem = if data.starts_with(PEM_BEGIN.as_bytes()) {
        let Ok(text) = std::str::from_utf8(data) else { return };
        text.to_string()
    } else {
        csr_pem(data)
    };
    let ca = ca();
    let Ok(issued) = ca.certify("default", "orders", "orders", &pem) else {
        return;
    };
    let identity = ca.identity("default", "orders");
    assert_eq!(issued.identity, identity);
    let der = pem_der(&issued.chain_pem).expect("the issued chain is PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("the issued certificate parses");
    let sans = cert
        .subject_alternative_name()
        .expect("one SAN extension")
        .expect("a SAN extension");
    let names: Vec<String> = sans
        .value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::URI(uri) => uri.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(names, [identity], "the certificate names other than the decided identity");
}

/// A join token as text: the format a proxy reads and the CA's check of signature and expiry.
/// Properties: readable claims are the claims the token's own signed part encodes (nothing is
/// read from outside it); the control plane accepts a token only with exactly those claims.
pub fn token(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let verified = ca().verify_token(token);
    let Ok((signed, claims, _signature)) = split(token) else {
        assert!(verified.is_err(), "the control plane accepted a token a proxy cannot read");
        return;
    };
    assert!(token.starts_with(signed), "the signed part is not the token's start");
    let reread = peek(&format!("{}.AA", claims.signed_part())).expect("claims written by the code read back");
    assert_eq!(reread, claims, "claims changed through their own encoding");
    if let Ok(accepted) = verified {
        assert_eq!(accepted, claims, "the control plane read other claims than the proxy");
    }
}

/// A join token for `default/orders` that the CA verifies and the store has on record (for
/// seeds: a Register carrying it is admitted all the way).
pub fn join_token() -> String {
    create_token(TOKEN_ID, "default", "orders", TOKEN_TTL)
}

/// A token the CA signs for `ns/name` (service account `name`), with id `jti`.
pub fn create_token(jti: &str, ns: &str, name: &str, ttl: Duration) -> String {
    ca().create_token(jti, ns, name, name, ttl).0
}

/// The claims of `token` if the CA accepts it, or why not.
pub fn verify_token(token: &str) -> Result<Claims, String> {
    ca().verify_token(token).map_err(|e| e.to_string())
}

/// The SPIFFE identity the CA gives `ns/sa`.
pub fn identity(ns: &str, sa: &str) -> String {
    ca().identity(ns, sa)
}

/// The trust bundle the CA hands proxies (PEM).
pub fn bundle_pem() -> String {
    ca().bundle_pem()
}

/// Every length-delimited message of `data`; `None` unless all of it decodes.
fn decode(mut data: &[u8]) -> Option<Vec<ProxyMessage>> {
    let mut messages = Vec::new();
    while !data.is_empty() {
        messages.push(ProxyMessage::decode_length_delimited(&mut data).ok()?);
    }
    Some(messages)
}

/// `der` as a PEM certificate request.
fn csr_pem(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|line| std::str::from_utf8(line).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

/// The process's store, with the fixed token key and the record of [`join_token`]'s token.
/// The root is made fresh per process: only what it signs depends on it, and nothing checked
/// in does.
fn store() -> &'static Arc<Store> {
    static STORE: OnceLock<Arc<Store>> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("weft-fuzz-{}", std::process::id()));
        let store = Store::open(&dir).expect("a store in the temporary directory");
        // The open database lives on without its directory entry; nothing is left behind.
        std::fs::remove_dir_all(&dir).expect("the store's directory is ours to remove");
        store
            .put_secret("token_key", &URL_SAFE_NO_PAD.encode(TOKEN_KEY))
            .expect("the token key is stored");
        store
            .put_token(&TokenRecord {
                id: TOKEN_ID.into(),
                workload: "default/orders".into(),
                service_account: "orders".into(),
                created_at: 0,
                expires_at: u64::MAX,
                uses_allowed: None,
                uses: 0,
                revoked: false,
            })
            .expect("the token record is stored");
        Arc::new(store)
    })
}

/// The process's CA (made once: making a root takes a key generation).
fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(open_ca)
}

/// A fresh control plane on the process's store: no proxy, no telemetry, no resources.
fn mesh() -> Mesh {
    // Loading the CA from the store reads the root made by [`ca`]; no key is generated here.
    ca();
    let metrics = ControlMetrics::register(&mut prometheus_client::registry::Registry::default());
    Mesh::new(store().clone(), open_ca(), metrics).expect("the mesh opens on the fuzz store")
}

fn open_ca() -> Ca {
    Ca::open(store(), TRUST_DOMAIN, LEAF_TTL, None).expect("the CA opens on the fuzz store")
}

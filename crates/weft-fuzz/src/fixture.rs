//! The control plane the targets run against: one store and CA per process, made on first use.
//!
//! The token key is fixed, so join tokens checked into a corpus verify in any process; the
//! store holds the record of one such token ([`TOKEN_ID`], for `default/orders`), so a Register
//! carrying it is admitted all the way. The root is made fresh per process (only what it signs
//! depends on it, and nothing checked in does).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use weft_control::ca::Ca;
use weft_control::mesh::Mesh;
use weft_control::metrics::ControlMetrics;
use weft_control::store::{Store, TokenRecord};

pub const TRUST_DOMAIN: &str = "weft.local";
/// The id of the join token on record; see [`token`].
pub const TOKEN_ID: &str = "fuzz-token";
/// Not a secret: it signs only the fuzz corpus's tokens.
const TOKEN_KEY: &[u8; 32] = b"weft-fuzz-token-key-not-a-secret";
const LEAF_TTL: Duration = Duration::from_secs(3600);
/// Long enough that checked-in tokens never expire.
const TOKEN_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

/// The process's store, with the token key and the token record in it.
pub fn store() -> &'static Arc<Store> {
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
pub fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(open_ca)
}

/// A fresh control plane on the process's store: no proxy, no telemetry, no resources.
pub fn mesh() -> Mesh {
    // Loading the CA from the store reads the root made by [`ca`]; no key is generated here.
    ca();
    let metrics = ControlMetrics::register(&mut prometheus_client::registry::Registry::default());
    Mesh::new(store().clone(), open_ca(), metrics).expect("the mesh opens on the fuzz store")
}

/// A join token for `default/orders` that the fixture's CA verifies and its store has on record.
pub fn token() -> String {
    ca().create_token(TOKEN_ID, "default", "orders", "orders", TOKEN_TTL).0
}

fn open_ca() -> Ca {
    Ca::open(store(), TRUST_DOMAIN, LEAF_TTL, None).expect("the CA opens on the fuzz store")
}

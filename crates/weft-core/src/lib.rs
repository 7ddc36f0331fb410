//! Small glue shared by the proxy, the control plane and the CLI: shutdown and drain, tracing
//! set-up, the HTTP server loop with the mesh's safety limits, the admin endpoints, and TLS on
//! the control channel (the pinned verifier and the connector everyone dials with).
//!
//! It owns no mesh logic and must not depend on weft-proxy or weft-control.

pub mod admin;
pub mod body;
pub mod coalesce;
pub mod framing;
pub mod ports;
pub mod serve;
pub mod shutdown;
pub mod tls;
pub mod trace;
pub mod version;

pub use body::{Body, BoxError, boxed, empty, full};
pub use shutdown::Shutdown;

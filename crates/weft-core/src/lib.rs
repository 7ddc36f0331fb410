//! Small glue shared by the proxy, the control plane and the CLI: shutdown and drain, tracing
//! set-up, the HTTP server loop with the mesh's safety limits, and the admin endpoints.
//!
//! It owns no mesh logic and must not depend on weft-proxy or weft-control.

pub mod admin;
pub mod body;
pub mod framing;
pub mod serve;
pub mod shutdown;
pub mod trace;

pub use body::{Body, BoxError, boxed, empty, full};
pub use shutdown::Shutdown;

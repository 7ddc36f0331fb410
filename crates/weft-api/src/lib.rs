//! weft's resource model, its validation, and the wire protocol between proxies and the control
//! plane.
//!
//! This crate owns the contract types of DESIGN.md §3 (TrafficPolicy, SecurityPolicy, Intent),
//! the strict parser that turns YAML or JSON into them with errors naming file, field and value,
//! and the protobuf messages of the control stream together with their conversion into domain
//! types ([`mesh`]). It must not depend on the proxy or the control plane.

pub mod delta;
pub mod duration;
pub mod error;
pub mod mesh;
pub mod resource;
pub mod telemetry;
pub mod token;

/// Generated protobuf and tonic code for `proto/weft.proto` (checked in; see tests/codegen.rs).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!("gen/weft.v1.rs");
}

/// OTLP/gRPC trace export, from `proto/otlp_trace.proto` (checked in; see tests/codegen.rs).
#[allow(clippy::all, missing_docs)]
pub mod otlp {
    include!("gen/opentelemetry.proto.collector.trace.v1.rs");
}

/// Metadata of a control stream the control plane refused because it was busy registering
/// others: come back after this many milliseconds (proxies add jitter).
pub const RETRY_AFTER_MS: &str = "weft-retry-after-ms";

pub use duration::Duration;
pub use error::{FieldError, Invalid};
pub use resource::{Resource, ResourceKey};

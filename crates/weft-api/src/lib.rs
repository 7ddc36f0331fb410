//! weft's resource model, its validation, and the wire protocol between proxies and the control
//! plane.
//!
//! This crate owns the contract types of DESIGN.md §3 (TrafficPolicy, SecurityPolicy, Intent),
//! the strict parser that turns YAML or JSON into them with errors naming file, field and value,
//! and the protobuf messages of the control stream together with their conversion into domain
//! types ([`mesh`]). It must not depend on the proxy or the control plane.

pub mod codec;
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

/// A proxy sends an HTTP/2 PING on its control stream after this long without a frame from the
/// control plane, and drops the stream when the answer takes longer than
/// [`CONTROL_KEEPALIVE_TIMEOUT`] (then reconnects, keeping its last-known-good config): a silent
/// control plane is left within 30 s, a closed one at once. The control plane pings its proxies
/// at the same pace. Not shorter: a control plane busy with a storm of thousands answers late,
/// and every stream a proxy gives up on re-registers, which the storm then has to serve too (at
/// 2 s / 3 s a stopped control plane lost its proxies' streams after 5 s). The simulated fleet
/// of `bench/control` pings the same way.
pub const CONTROL_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a proxy waits for the control plane to answer a keepalive PING.
pub const CONTROL_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

pub use duration::Duration;
pub use error::{FieldError, Invalid};
pub use resource::{Resource, ResourceKey};

//! weft's fuzz targets as plain functions: one per parser and per wire-to-domain conversion.
//!
//! Each target takes arbitrary bytes, feeds them to the same code the proxy or the control plane
//! runs on input from outside, and panics when that code panics or breaks a stated property.
//! Two drivers call them: `fuzz/` (libFuzzer, coverage-guided, a crate outside the workspace)
//! and this crate's tests, which replay every checked-in corpus and regression file in seconds
//! without libFuzzer. A target holds no state between calls except the control plane's store and
//! CA (one per process, inside [`weft_control::fuzz`]), so a crash replays from its file alone.
//! The control plane's targets reach its code only through that module's byte-taking entry
//! points; its internals stay private. This crate is test tooling:
//! nothing in weft depends on it.

pub mod control_message;
pub mod csr;
pub mod framing;
pub mod host;
pub mod path;
pub mod proxy_message;
pub mod resource;
pub mod route;
pub mod token;

/// A fuzz target: its name (the directory of its corpus, the libFuzzer binary) and its body.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, by name.
pub const TARGETS: [Target; 9] = [
    Target {
        name: "resource",
        run: resource::run,
    },
    Target {
        name: "framing",
        run: framing::run,
    },
    Target {
        name: "path",
        run: path::run,
    },
    Target {
        name: "route",
        run: route::run,
    },
    Target {
        name: "host",
        run: host::run,
    },
    Target {
        name: "token",
        run: token::run,
    },
    Target {
        name: "csr",
        run: csr::run,
    },
    Target {
        name: "proxy_message",
        run: proxy_message::run,
    },
    Target {
        name: "control_message",
        run: control_message::run,
    },
];

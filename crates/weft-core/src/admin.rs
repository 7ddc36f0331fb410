//! The admin endpoints every weft process serves: `/live`, `/ready`, `/metrics`, and
//! `/config_dump` when the component has a config to show.

use crate::{Body, full};
use hyper::{Request, Response, StatusCode, header};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What an admin listener needs from its component.
pub struct Admin {
    pub registry: Arc<Registry>,
    pub ready: Arc<AtomicBool>,
    /// Renders the component's whole config as JSON for `/config_dump`.
    pub config_dump: Option<Box<dyn Fn() -> String + Send + Sync>>,
}

// === impl Admin ===

impl Admin {
    pub fn handle<B>(&self, req: &Request<B>) -> Response<Body> {
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" => {
                if self.ready.load(Ordering::Acquire) {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            "/metrics" => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) => Response::builder()
                        .header(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)
                        .body(full(out))
                        .expect("static response"),
                    Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed\n"),
                }
            }
            "/config_dump" => match &self.config_dump {
                Some(dump) => Response::builder()
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(full(dump()))
                    .expect("static response"),
                None => text(StatusCode::NOT_FOUND, "no config\n"),
            },
            _ => text(StatusCode::NOT_FOUND, "not found: try /live /ready /metrics /config_dump\n"),
        }
    }
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full(body))
        .expect("static response")
}

//! The proxy's one typed config: where it listens, who it is, and where its routes come from
//! (the control plane, or a static file for `weft proxy --config`).

use http::HeaderName;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use weft_api::error::{FieldError, Invalid};
use weft_api::mesh::{MeshConfig, SERVICE_LABEL, ServiceConfig};

/// Connect timeout to the app (`--app-connect-timeout`) by default. Linux retransmits a SYN
/// that got no answer after 1 s and again 2 s later (an app whose listen backlog is full drops
/// SYNs), so 4 s lets a connection through after two dropped SYNs, where 1 s turned one
/// dropped SYN into a 503 while direct clients all got through.
pub const APP_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// The shortest `--idle-timeout` taken: anything shorter would cut connections between two
/// requests of an ordinary client.
const MIN_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub workload: Workload,
    /// The app this sidecar fronts.
    pub app: SocketAddr,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// Address other proxies dial for this workload; defaults to the bound inbound address.
    pub advertise: Option<SocketAddr>,
    /// JSON access log lines on standard output.
    pub access_log: bool,
    /// Percentage of requests logged when access logs are on.
    pub access_log_sample: f64,
    /// OTLP/gRPC endpoint spans are exported to; no tracing without one.
    pub otlp_endpoint: Option<String>,
    /// Percentage of new traces sampled (a trace that arrives keeps its own decision).
    pub trace_sample: f64,
    /// Opaque TCP listeners: each connection goes to an endpoint of the service.
    pub tcp: Vec<(SocketAddr, String)>,
    /// Header names the inbound proxy removes before the app sees a request, besides the
    /// identity headers it always removes (`--strip-header`, `stripHeaders`).
    pub strip_headers: Vec<HeaderName>,
    /// The protocol the inbound listener speaks to the app (`--app-protocol`, `appProtocol`).
    pub app_protocol: AppProtocol,
    /// How long the inbound listener waits for the app to accept a connection
    /// (`--app-connect-timeout`, `appConnectTimeout`).
    pub app_connect_timeout: std::time::Duration,
    /// How long a connection to one of the sidecar's listeners may have no request awaiting
    /// its response before it is closed gracefully (`--idle-timeout`, `idleTimeout`).
    pub idle_timeout: std::time::Duration,
    pub source: Source,
}

/// The HTTP version the app serves, as its workload declares it. The inbound listener speaks
/// this to the app whatever its caller spoke (the sidecars translate), so an HTTP/2 caller
/// reaches an HTTP/1.1-only app and the other way round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 only; gRPC, which needs HTTP/2, is refused with `app-protocol-mismatch`.
    Http1,
    /// HTTP/2 with prior knowledge (h2c) only; Upgrade (WebSocket) is refused.
    H2,
    /// HTTP/2 for gRPC, which needs it, HTTP/1.1 for everything else, which every HTTP app
    /// serves (many do not take h2c).
    #[default]
    Auto,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub cluster: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub enum Source {
    /// gRPC URL of the control plane, e.g. `https://127.0.0.1:7071` (TLS pinned by the join
    /// token's CA fingerprint) or `http://...` (plaintext, `--insecure-plaintext`), and the
    /// join token.
    Control {
        url: String,
        token: Option<String>,
        /// Where the workload certificate is kept across restarts (`--identity-dir`).
        identity_dir: Option<std::path::PathBuf>,
    },
    Static(MeshConfig),
}

/// The file of `weft proxy --config FILE`: listeners, identity and static services.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StaticFile {
    pub workload: String,
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub app: SocketAddr,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// Extra header names the inbound proxy removes (as `--strip-header`).
    #[serde(default)]
    pub strip_headers: Vec<String>,
    /// As `--app-connect-timeout`.
    #[serde(default)]
    pub app_connect_timeout: Option<weft_api::duration::Duration>,
    /// As `--idle-timeout`.
    #[serde(default)]
    pub idle_timeout: Option<weft_api::duration::Duration>,
    #[serde(default)]
    pub app_protocol: AppProtocol,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

/// Names the proxy needs to deliver a request, which therefore cannot be stripped.
const NEEDED_HEADERS: [&str; 6] = ["host", "content-length", "transfer-encoding", "connection", "upgrade", "te"];

/// Reads an app connect timeout (`--app-connect-timeout`, `appConnectTimeout`): a duration
/// such as `4s`, above zero (zero would refuse every request) and at most a minute.
pub fn app_connect_timeout(v: &str) -> Result<std::time::Duration, String> {
    let t: weft_api::duration::Duration = v.parse().map_err(|e| format!("{v:?}: {e}"))?;
    let t = t.as_std();
    if t.is_zero() || t > std::time::Duration::from_secs(60) {
        return Err(format!("{v:?} is not between 1ms and 60s"));
    }
    Ok(t)
}

/// Reads an idle timeout (`--idle-timeout`, `idleTimeout`): a duration such as `1h`, at least
/// 1 s.
pub fn idle_timeout(v: &str) -> Result<std::time::Duration, String> {
    let t: weft_api::duration::Duration = v.parse().map_err(|e| format!("{v:?}: {e}"))?;
    let t = t.as_std();
    if t < MIN_IDLE_TIMEOUT {
        return Err(format!("{v:?} is shorter than {MIN_IDLE_TIMEOUT:?}"));
    }
    Ok(t)
}

/// Reads one extra header name to strip (`--strip-header`, `stripHeaders`): a valid HTTP header
/// name in any case (kept lowercase, as header names compare), exact (no pattern), and not one
/// the proxy needs to deliver the request. The error says what is wrong; the caller names the
/// flag or field and the value.
pub fn strip_header_name(name: &str) -> Result<HeaderName, String> {
    if name.contains('*') {
        return Err("a pattern; give exact header names (the x-weft-* and l5d-* prefixes are always stripped)".into());
    }
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| "not an HTTP header name (one or more of letters, digits and !#$%&'+-.^_`|~)".to_string())?;
    if NEEDED_HEADERS.contains(&parsed.as_str()) {
        return Err("the proxy needs this header to deliver the request, so it cannot be stripped".into());
    }
    Ok(parsed)
}

// === impl Workload ===

impl Workload {
    /// Parses `NS/NAME` (or `NAME`, in namespace `default`).
    pub fn parse_id(id: &str) -> Result<(String, String), String> {
        let (ns, name) = id.split_once('/').unwrap_or(("default", id));
        let ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        };
        if ok(ns) && ok(name) {
            Ok((ns.to_string(), name.to_string()))
        } else {
            Err(format!("invalid workload {id:?}: expected NAMESPACE/NAME"))
        }
    }

    /// The service this workload serves: its `service` label, else its name.
    pub fn service(&self) -> &str {
        self.labels.get(SERVICE_LABEL).map(String::as_str).unwrap_or(&self.name)
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

// === impl AppProtocol ===

impl std::str::FromStr for AppProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "http1" => Ok(AppProtocol::Http1),
            "h2" => Ok(AppProtocol::H2),
            "auto" => Ok(AppProtocol::Auto),
            _ => Err("one of http1, h2, auto".into()),
        }
    }
}

// === impl StaticFile ===

impl StaticFile {
    /// Reads and validates a static proxy file; every problem is reported with the file name.
    pub fn load(path: &str) -> Result<ProxyConfig, Invalid> {
        let text = std::fs::read_to_string(path).map_err(|e| Invalid::one(path, FieldError::new("", "", format!("cannot read: {e}"))))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, source: &str) -> Result<ProxyConfig, Invalid> {
        // A valid file is read straight into its types. Only one that fails pays for the YAML
        // tree, which names the field at fault and the value found there (a thousand services
        // as a tree take several megabytes the allocator keeps after they are freed).
        let file: StaticFile = match serde_saphyr::from_str(text) {
            Ok(file) => file,
            Err(direct) => {
                let value: serde_json::Value = serde_saphyr::from_str(text)
                    .map_err(|e| Invalid::one(source, FieldError::new("", "", format!("not valid YAML: {e}"))))?;
                let _: StaticFile = weft_api::resource::from_value(&value).map_err(|e| Invalid::one(source, e))?;
                return Err(Invalid::one(source, FieldError::new("", "", direct.to_string())));
            }
        };
        let mut errors = Vec::new();
        let (namespace, name) = match Workload::parse_id(&file.workload) {
            Ok(v) => v,
            Err(msg) => {
                errors.push(FieldError::new("workload", &file.workload, msg));
                Default::default()
            }
        };
        let mut strip_headers = Vec::new();
        for (i, name) in file.strip_headers.iter().enumerate() {
            match strip_header_name(name) {
                Ok(h) => strip_headers.push(h),
                Err(msg) => errors.push(FieldError::new(format!("stripHeaders[{i}]"), name, msg)),
            }
        }
        let app_timeout = file.app_connect_timeout.map(|t| t.to_string());
        let app_connect_timeout = match app_timeout.as_deref().map(app_connect_timeout) {
            None => APP_CONNECT_TIMEOUT,
            Some(Ok(t)) => t,
            Some(Err(msg)) => {
                errors.push(FieldError::new("appConnectTimeout", app_timeout.as_deref().unwrap_or(""), msg));
                APP_CONNECT_TIMEOUT
            }
        };
        let idle = file.idle_timeout.map(|t| t.to_string());
        let idle_timeout = match idle.as_deref().map(idle_timeout) {
            None => weft_core::serve::IDLE_TIMEOUT,
            Some(Ok(t)) => t,
            Some(Err(msg)) => {
                errors.push(FieldError::new("idleTimeout", idle.as_deref().unwrap_or(""), msg));
                weft_core::serve::IDLE_TIMEOUT
            }
        };
        let mut services = BTreeMap::new();
        for (i, s) in file.services.into_iter().enumerate() {
            s.validate(&format!("services[{i}]"), &mut errors);
            let key = s.key();
            if services.insert(key.clone(), std::sync::Arc::new(s)).is_some() {
                errors.push(FieldError::new(format!("services[{i}].name"), &key, "service listed twice"));
            }
        }
        if !errors.is_empty() {
            return Err(Invalid::new(source, errors));
        }
        Ok(ProxyConfig {
            workload: Workload {
                namespace,
                name,
                cluster: file.cluster,
                labels: file.labels,
            },
            app: file.app,
            inbound: file.inbound,
            outbound: file.outbound,
            admin: file.admin,
            advertise: None,
            access_log: false,
            access_log_sample: 100.0,
            otlp_endpoint: None,
            trace_sample: 100.0,
            tcp: Vec::new(),
            strip_headers,
            app_protocol: file.app_protocol,
            app_connect_timeout,
            idle_timeout,
            source: Source::Static(MeshConfig {
                services,
                ..Default::default()
            }),
        })
    }
}

/// The addresses a running proxy is bound to (useful when they were `:0`).
#[derive(Clone, Debug)]
pub struct Bound {
    pub inbound: std::net::SocketAddr,
    pub outbound: std::net::SocketAddr,
    pub admin: Option<std::net::SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "workload: default/web\ncluster: a\napp: '127.0.0.1:8080'\ninbound: '127.0.0.1:4143'\noutbound: '127.0.0.1:4140'\nservices:\n  - name: orders\n    endpoints: [{address: '127.0.0.1:9000', cluster: a, labels: {version: v1}}]\n    mtls: 'off'\n    policy: {service: orders, routes: [{name: r, match: {pathPrefix: /api}, timeout: 2s}]}\n";

    #[test]
    fn a_valid_file_is_read_straight_into_its_types() {
        let cfg = StaticFile::parse(GOOD, "web.yaml").expect("valid");
        let Source::Static(mesh) = cfg.source else { panic!("static") };
        let orders = &mesh.services["default/orders"];
        assert_eq!(orders.endpoints[0].labels.get("version"), Some("v1"));
        let route = &orders.policy.as_ref().expect("policy").routes[0];
        assert_eq!(route.timeout.map(|t| t.as_std()), Some(std::time::Duration::from_secs(2)));
    }

    #[test]
    fn an_invalid_file_names_the_file_the_field_and_the_value() {
        let bad = GOOD.replace("timeout: 2s", "timeout: soon");
        let err = StaticFile::parse(&bad, "web.yaml").expect_err("invalid").to_string();
        assert!(
            err.contains("web.yaml") && err.contains("services[0].policy.routes[0].timeout") && err.contains("soon"),
            "{err}"
        );
        let twice = format!("{GOOD}  - name: orders\n");
        let err = StaticFile::parse(&twice, "web.yaml").expect_err("duplicate").to_string();
        assert!(err.contains("services[1].name") && err.contains("listed twice"), "{err}");
    }

    #[test]
    fn the_app_connect_timeout_defaults_past_two_syn_retransmits_and_is_checked() {
        let cfg = StaticFile::parse(GOOD, "web.yaml").expect("valid");
        assert_eq!(cfg.app_connect_timeout, std::time::Duration::from_secs(4));
        let file = GOOD.replace("services:", "appConnectTimeout: 1500ms\nservices:");
        let cfg = StaticFile::parse(&file, "web.yaml").expect("valid");
        assert_eq!(cfg.app_connect_timeout, std::time::Duration::from_millis(1500));
        for bad in ["0s", "2m"] {
            let file = GOOD.replace("services:", &format!("appConnectTimeout: {bad}\nservices:"));
            let err = StaticFile::parse(&file, "web.yaml").expect_err(bad).to_string();
            assert!(
                err.contains("web.yaml") && err.contains("appConnectTimeout") && err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn extra_header_names_to_strip_are_exact_valid_and_not_needed_by_the_proxy() {
        for ok in ["x-internal-user", "X-Tenant-Admin", "x-spiffe-id", "authorization"] {
            let name = strip_header_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(name.as_str(), ok.to_ascii_lowercase());
        }
        for (bad, why) in [
            ("", "not an HTTP header name"),
            ("x user", "not an HTTP header name"),
            ("x-user:", "not an HTTP header name"),
            (":authority", "not an HTTP header name"),
            ("x-caf\u{e9}", "not an HTTP header name"),
            ("x-internal-*", "a pattern"),
            ("Host", "needs this header"),
            ("content-length", "needs this header"),
            ("Transfer-Encoding", "needs this header"),
        ] {
            let err = strip_header_name(bad).expect_err(bad);
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let file = GOOD.replace("services:", "stripHeaders: [X-Internal-User, 'bad name', x-tenant]\nservices:");
        let err = StaticFile::parse(&file, "web.yaml").expect_err("one bad name").to_string();
        assert!(
            err.contains("web.yaml") && err.contains("stripHeaders[1]") && err.contains("bad name") && !err.contains("stripHeaders[0]"),
            "{err}"
        );
        let file = GOOD.replace("services:", "stripHeaders: [X-Internal-User, x-tenant]\nservices:");
        let cfg = StaticFile::parse(&file, "web.yaml").expect("valid names");
        let names: Vec<&str> = cfg.strip_headers.iter().map(|h| h.as_str()).collect();
        assert_eq!(names, ["x-internal-user", "x-tenant"]);
    }
}

//! The resource model of DESIGN.md §3, parsed strictly.
//!
//! Input is YAML or JSON, one or more documents. Each document is read into a generic value
//! first and then into its typed form through `serde_path_to_error`, so every error carries the
//! exact field path; the value at fault is read back from the document. After the types, one
//! `validate()` per kind reports every semantic problem at once.

use crate::duration::Duration;
use crate::error::{FieldError, Invalid};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

pub const API_VERSION: &str = "weft/v1";
pub const DEFAULT_NAMESPACE: &str = "default";

/// A policy resource the control plane stores and distributes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Resource {
    TrafficPolicy(Document<TrafficPolicySpec>),
    SecurityPolicy(Document<SecurityPolicySpec>),
}

/// Any document a user may write: a resource or an intent.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Resource(Resource),
    Intent(Document<IntentSpec>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document<S> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: S,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

/// `kind/namespace/name`: how a resource is addressed in the store and the API.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

// --- TrafficPolicy ---

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub service: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Route {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<RouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// A stream with no body data in either direction for this long is ended (504 when no
    /// response has started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    /// The whole path, exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// A regular expression the whole path must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Header name -> matcher; a plain string matches exactly.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
    /// Query parameter name -> matcher; a plain string matches exactly.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, StringMatch>,
}

/// How a header or query value is matched: `acme` (exact), or one of `{exact: acme}`,
/// `{prefix: ac}`, `{regex: "a.*e"}` (the whole value), `{present: true}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
    Present,
}

impl Serialize for StringMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        if let StringMatch::Exact(v) = self {
            return s.serialize_str(v);
        }
        let mut m = s.serialize_map(Some(1))?;
        match self {
            StringMatch::Prefix(v) => m.serialize_entry("prefix", v)?,
            StringMatch::Regex(v) => m.serialize_entry("regex", v)?,
            _ => m.serialize_entry("present", &true)?,
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        const EXPECTED: &str = "a string, or one of {exact: V}, {prefix: V}, {regex: V}, {present: true}";
        match Value::deserialize(d)? {
            Value::String(v) => Ok(StringMatch::Exact(v)),
            Value::Object(m) if m.len() == 1 => {
                let (k, v) = m.into_iter().next().expect("one entry");
                match (k.as_str(), v) {
                    ("exact", Value::String(v)) => Ok(StringMatch::Exact(v)),
                    ("prefix", Value::String(v)) => Ok(StringMatch::Prefix(v)),
                    ("regex", Value::String(v)) => Ok(StringMatch::Regex(v)),
                    ("present", Value::Bool(true)) => Ok(StringMatch::Present),
                    (k, v) => Err(D::Error::custom(format!("unexpected {k}: {v}; expected {EXPECTED}"))),
                }
            }
            other => Err(D::Error::custom(format!("unexpected {other}; expected {EXPECTED}"))),
        }
    }
}

impl From<&str> for StringMatch {
    fn from(v: &str) -> Self {
        StringMatch::Exact(v.to_string())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backend {
    pub subset: String,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retry {
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<RetryOn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
    /// Also retry requests with non-idempotent methods (POST, PATCH). Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub non_idempotent: bool,
}

/// A retry condition: a named failure, or a status code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RetryOn {
    Status(u16),
    Condition(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries as a percentage of requests.
    pub ratio: f64,
    #[serde(default)]
    pub min_per_second: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    pub percent: f64,
    pub duration: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    pub percent: f64,
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mirror {
    pub subset: String,
    pub percent: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancer {
    #[default]
    P2cEwma,
    RoundRobin,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Most connections to the service's endpoints at once (one multiplexed HTTP/2 connection
    /// per endpoint is used).
    #[serde(default = "ConnectionPool::default_limit")]
    pub max_connections: u32,
    /// Most requests to the service in flight at once (waiting or sent); more answer 503
    /// `pool-full` at once.
    #[serde(default = "ConnectionPool::default_limit")]
    pub max_pending_requests: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// A connection with no request in flight for this long is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
}

impl ConnectionPool {
    pub const DEFAULT_LIMIT: u32 = 1024;

    fn default_limit() -> u32 {
        Self::DEFAULT_LIMIT
    }
}

impl Default for ConnectionPool {
    fn default() -> Self {
        Self {
            max_connections: Self::DEFAULT_LIMIT,
            max_pending_requests: Self::DEFAULT_LIMIT,
            connect_timeout: None,
            idle_timeout: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    pub ejection: Duration,
    pub max_ejected_percent: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
    /// `outbound` (default): each caller's sidecar limits its own requests to the service.
    /// `inbound`: each of the service's sidecars limits what it accepts.
    #[serde(default, skip_serializing_if = "RateLimitAt::is_outbound")]
    pub at: RateLimitAt,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RateLimitAt {
    #[default]
    Outbound,
    Inbound,
}

impl RateLimitAt {
    fn is_outbound(&self) -> bool {
        *self == RateLimitAt::Outbound
    }
}

// --- SecurityPolicy ---

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecurityPolicySpec {
    pub selector: Selector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    pub service: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    Strict,
    Permissive,
    Off,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Authorization {
    #[serde(default)]
    pub mode: AuthzMode,
    #[serde(default)]
    pub default: Action,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AuthzRule>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzMode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzRule {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<AuthzFrom>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<AuthzTo>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzFrom {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzTo {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

// --- Intent ---

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IntentSpec {
    pub title: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    pub change: Change,
    #[serde(default)]
    pub rollout: Rollout,
    #[serde(default)]
    pub slo: Slo,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Change {
    /// Resources to create or replace, kept as written and parsed by [`IntentSpec::resources`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apply: Vec<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete: Vec<ResourceKey>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rollout {
    #[serde(default = "default_stages")]
    pub stages: Vec<Stage>,
    /// How long each stage is observed before it is judged (default 30s).
    #[serde(default = "default_bake")]
    pub bake: Duration,
    #[serde(default)]
    pub mode: RolloutMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutMode {
    #[default]
    Auto,
    Manual,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Slo {
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    #[serde(default = "default_max_error_rate_increase")]
    pub max_error_rate_increase: f64,
    #[serde(default = "default_max_p99_increase")]
    pub max_p99_increase: f64,
    /// Treated requests a stage needs before it is judged either way.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// How sure (percent) the judge must be before it rolls back: the false-rollback rate of a
    /// harmless change is at most `100 - confidence` percent, however often it looks.
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    /// What a stage does when it has not gathered `minRequests` after three bakes.
    #[serde(default)]
    pub on_inconclusive: OnInconclusive,
}

/// What an intent does when a stage cannot gather enough evidence (a quiet service).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInconclusive {
    /// Wait in `awaiting-approval` with the numbers, for a person to decide.
    #[default]
    Hold,
    Rollback,
    Promote,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}
fn default_stages() -> Vec<Stage> {
    vec![Stage::Percent(10.0), Stage::Percent(50.0), Stage::Percent(100.0)]
}
fn default_bake() -> Duration {
    Duration::from_millis(30_000)
}
fn default_max_error_rate() -> f64 {
    1.0
}
fn default_max_error_rate_increase() -> f64 {
    0.5
}
fn default_max_p99_increase() -> f64 {
    20.0
}
fn default_min_requests() -> u64 {
    100
}
fn default_confidence() -> f64 {
    99.0
}

// === parsing ===

/// Parses every document of a YAML or JSON text. `source_name` (a file path, `request body`)
/// is named in every error. Every document is checked; all problems are returned together.
pub fn parse_objects(text: &str, source_name: &str) -> Result<Vec<Object>, Invalid> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text)
        .map_err(|e| Invalid::one(source_name, FieldError::new("", "", format!("not valid YAML or JSON: {e}"))))?;
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    if docs.is_empty() {
        return Err(Invalid::one(source_name, FieldError::new("", "", "no documents")));
    }
    let many = docs.len() > 1;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let prefix = if many { format!("[{i}].") } else { String::new() };
        match object_from_value(doc) {
            Ok(obj) => out.push(obj),
            Err(errs) => errors.extend(errs.into_iter().map(|mut e| {
                e.field = format!("{prefix}{}", e.field);
                e
            })),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(Invalid::new(source_name, errors))
    }
}

/// Parses policy resources only; an intent in the input is an error pointing at `kind`.
pub fn parse_resources(text: &str, source_name: &str) -> Result<Vec<Resource>, Invalid> {
    let objects = parse_objects(text, source_name)?;
    let mut out = Vec::new();
    for obj in objects {
        match obj {
            Object::Resource(r) => out.push(r),
            Object::Intent(_) => {
                return Err(Invalid::one(
                    source_name,
                    FieldError::new("kind", "Intent", "intents are submitted with `weft intent submit`, not applied"),
                ));
            }
        }
    }
    Ok(out)
}

/// What [`parse_resources_leniently`] read: the resources with their field prefixes, and the
/// problems found.
pub type Lenient = (Vec<(String, Resource)>, Vec<FieldError>);

/// Every document that reads as a policy resource, with the prefix its fields are named
/// under (`[i].` when there are several), even when its values fail validation; and every
/// problem found. A caller adds the checks that need the live mesh (subsets that exist) and
/// reports every problem at once instead of the first kind only.
pub fn parse_resources_leniently(text: &str, source_name: &str) -> Result<Lenient, Invalid> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text)
        .map_err(|e| Invalid::one(source_name, FieldError::new("", "", format!("not valid YAML or JSON: {e}"))))?;
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    let many = docs.len() > 1;
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    for (i, doc) in docs.iter().enumerate() {
        let prefix = if many { format!("[{i}].") } else { String::new() };
        let (obj, errs) = object_parts(doc);
        errors.extend(errs.into_iter().map(|mut e| {
            e.field = format!("{prefix}{}", e.field);
            e
        }));
        if let Some(Object::Resource(r)) = obj {
            out.push((prefix, r));
        }
    }
    Ok((out, errors))
}

/// Reads one document (already a generic value) into its typed form and validates it.
pub fn object_from_value(doc: &Value) -> Result<Object, Vec<FieldError>> {
    match object_parts(doc) {
        (Some(obj), errors) if errors.is_empty() => Ok(obj),
        (_, errors) => Err(errors),
    }
}

/// A document's typed form when it has one, even if its values fail validation, and every
/// problem found.
fn object_parts(doc: &Value) -> (Option<Object>, Vec<FieldError>) {
    let Some(map) = doc.as_object() else {
        return (
            None,
            vec![FieldError::new(
                "",
                short(doc),
                "a document must be a mapping with apiVersion, kind, metadata and spec",
            )],
        );
    };
    let mut errors = Vec::new();
    match map.get("apiVersion") {
        Some(Value::String(v)) if v == API_VERSION => {}
        Some(v) => errors.push(FieldError::new("apiVersion", short(v), format!("must be {API_VERSION}"))),
        None => errors.push(FieldError::new("apiVersion", "", format!("missing; must be {API_VERSION}"))),
    }
    let kind = match map.get("kind") {
        Some(Value::String(k)) => k.as_str(),
        Some(v) => {
            errors.push(FieldError::new("kind", short(v), "must be a string"));
            return (None, errors);
        }
        None => {
            errors.push(FieldError::new("kind", "", "missing; one of TrafficPolicy, SecurityPolicy, Intent"));
            return (None, errors);
        }
    };
    let obj = match kind {
        "TrafficPolicy" => typed::<TrafficPolicySpec>(doc).map(|d| {
            d.spec.validate("spec", &mut errors);
            Object::Resource(Resource::TrafficPolicy(d))
        }),
        "SecurityPolicy" => typed::<SecurityPolicySpec>(doc).map(|d| {
            d.spec.validate("spec", &mut errors);
            Object::Resource(Resource::SecurityPolicy(d))
        }),
        "Intent" => typed::<IntentSpec>(doc).map(|d| {
            d.spec.validate("spec", &mut errors);
            Object::Intent(d)
        }),
        other => {
            errors.push(FieldError::new(
                "kind",
                other,
                "unknown kind; one of TrafficPolicy, SecurityPolicy, Intent",
            ));
            return (None, errors);
        }
    };
    match obj {
        Ok(obj) => {
            let meta = match &obj {
                Object::Resource(r) => r.metadata(),
                Object::Intent(d) => &d.metadata,
            };
            // An intent's name is its id (e.g. MESH-201); without one it gets MESH-<n>.
            if matches!(obj, Object::Intent(_)) {
                let id = &meta.name;
                if !id.is_empty() && (id.len() > 63 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')) {
                    errors.push(FieldError::new(
                        "metadata.name",
                        id,
                        "an intent id is 1-63 letters, digits or '-', e.g. MESH-201",
                    ));
                }
            } else {
                check_name("metadata.name", &meta.name, &mut errors);
            }
            check_name("metadata.namespace", &meta.namespace, &mut errors);
            (Some(obj), errors)
        }
        Err(e) => {
            errors.push(e);
            (None, errors)
        }
    }
}

fn typed<S: DeserializeOwned>(doc: &Value) -> Result<Document<S>, FieldError> {
    from_value(doc)
}

/// Deserializes `doc` into `T`; an error names the field's path and the value found there.
pub fn from_value<T: DeserializeOwned>(doc: &Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize::<_, T>(doc).map_err(|e| {
        let at = e.path().to_string();
        let at = if at == "." { String::new() } else { at };
        let found = lookup(doc, e.path()).map(short).unwrap_or_default();
        let message = e.into_inner().to_string();
        // serde names a missing field in its message and points at the map that lacks it:
        // the field named is the missing one (`enabled`, not ``), with no value.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name.to_string());
        match missing {
            Some(name) if at.is_empty() => FieldError::new(name, "", message),
            Some(name) => FieldError::new(format!("{at}.{name}"), "", message),
            None => FieldError::new(at, found, message),
        }
    })
}

/// The value at `path` in `doc`, when the path leads to one.
fn lookup<'a>(doc: &'a Value, path: &serde_path_to_error::Path) -> Option<&'a Value> {
    use serde_path_to_error::Segment;
    let mut at = doc;
    for seg in path.iter() {
        at = match seg {
            Segment::Seq { index } => at.get(*index)?,
            Segment::Map { key } => at.get(key.as_str())?,
            Segment::Enum { .. } | Segment::Unknown => return Some(at),
        };
    }
    Some(at)
}

/// A value as a short one-line string for an error message.
fn short(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.chars().count() > 80 {
        format!("{}...", s.chars().take(77).collect::<String>())
    } else {
        s
    }
}

// === validation ===

const METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
const RETRY_CONDITIONS: [&str; 12] = [
    "connect-failure",
    "refused-stream",
    "reset",
    "5xx",
    "gateway-error",
    "unavailable",
    "cancelled",
    "deadline-exceeded",
    "resource-exhausted",
    "internal",
    "unknown",
    "aborted",
];

/// Checks a mesh name (a service, namespace, resource or cluster name): 1-63 lowercase
/// letters, digits, `-` or `.`, starting and ending with a letter or digit.
pub fn check_name(field: &str, v: &str, errors: &mut Vec<FieldError>) {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !v.starts_with(['-', '.'])
        && !v.ends_with(['-', '.']);
    if !ok {
        errors.push(FieldError::new(
            field,
            v,
            "must be 1-63 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit",
        ));
    }
}

fn check_percent(field: String, v: f64, errors: &mut Vec<FieldError>) {
    if !(0.0..=100.0).contains(&v) || v.is_nan() {
        errors.push(FieldError::new(field, v, "must be a percentage between 0 and 100"));
    }
}

/// Regular expressions match the whole value; they are compiled once here and once per
/// config swap in the proxy, never per request.
pub fn anchored_regex(r: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{r})$")).size_limit(1 << 20).build()
}

fn check_regex(field: String, r: &str, errors: &mut Vec<FieldError>) {
    if let Err(e) = anchored_regex(r) {
        let why = e.to_string();
        let last = why.lines().last().unwrap_or("invalid").trim().to_string();
        errors.push(FieldError::new(field, r, format!("not a valid regular expression: {last}")));
    }
}

fn check_positive(field: String, d: Duration, errors: &mut Vec<FieldError>) {
    if d.0.is_zero() {
        errors.push(FieldError::new(field, d, "must be greater than zero"));
    }
}

fn check_methods(field: &str, methods: &[String], errors: &mut Vec<FieldError>) {
    for (i, m) in methods.iter().enumerate() {
        if !METHODS.contains(&m.as_str()) {
            errors.push(FieldError::new(
                format!("{field}[{i}]"),
                m,
                format!("unknown HTTP method; one of {}", METHODS.join(", ")),
            ));
        }
    }
}

// === impl Resource ===

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::TrafficPolicy(_) => "TrafficPolicy",
            Resource::SecurityPolicy(_) => "SecurityPolicy",
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::TrafficPolicy(d) => &d.metadata,
            Resource::SecurityPolicy(d) => &d.metadata,
        }
    }

    pub fn key(&self) -> ResourceKey {
        let m = self.metadata();
        ResourceKey {
            kind: self.kind().to_string(),
            namespace: m.namespace.clone(),
            name: m.name.clone(),
        }
    }

    /// The service this resource governs.
    pub fn service(&self) -> &str {
        match self {
            Resource::TrafficPolicy(d) => &d.spec.service,
            Resource::SecurityPolicy(d) => &d.spec.selector.service,
        }
    }

    /// Subsets named by the resource, with the field that names each.
    pub fn subsets(&self) -> Vec<(String, String)> {
        match self {
            Resource::TrafficPolicy(d) => d.spec.subsets("spec"),
            Resource::SecurityPolicy(_) => Vec::new(),
        }
    }
}

// === impl ResourceKey ===

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

// === impl TrafficPolicySpec ===

impl TrafficPolicySpec {
    pub fn validate(&self, at: &str, errors: &mut Vec<FieldError>) {
        check_name(&format!("{at}.service"), &self.service, errors);
        for (i, r) in self.routes.iter().enumerate() {
            r.validate(&format!("{at}.routes[{i}]"), errors);
        }
        if let Some(p) = &self.connection_pool {
            if p.max_connections == 0 {
                errors.push(FieldError::new(
                    format!("{at}.connectionPool.maxConnections"),
                    0,
                    "must be at least 1",
                ));
            }
            if p.max_pending_requests == 0 {
                errors.push(FieldError::new(
                    format!("{at}.connectionPool.maxPendingRequests"),
                    0,
                    "must be at least 1",
                ));
            }
            for (field, t) in [("connectTimeout", p.connect_timeout), ("idleTimeout", p.idle_timeout)] {
                if let Some(t) = t {
                    check_positive(format!("{at}.connectionPool.{field}"), t, errors);
                }
            }
        }
        if let Some(o) = &self.outlier_detection {
            if o.consecutive_failures == 0 {
                errors.push(FieldError::new(
                    format!("{at}.outlierDetection.consecutiveFailures"),
                    0,
                    "must be at least 1",
                ));
            }
            check_positive(format!("{at}.outlierDetection.ejection"), o.ejection, errors);
            check_percent(format!("{at}.outlierDetection.maxEjectedPercent"), o.max_ejected_percent, errors);
        }
        for (i, c) in self.failover.iter().enumerate() {
            check_name(&format!("{at}.failover[{i}]"), c, errors);
        }
        if let Some(r) = &self.rate_limit {
            if r.requests_per_second <= 0.0 || r.requests_per_second.is_nan() {
                errors.push(FieldError::new(
                    format!("{at}.rateLimit.requestsPerSecond"),
                    r.requests_per_second,
                    "must be greater than zero",
                ));
            }
            if r.burst == 0 {
                errors.push(FieldError::new(format!("{at}.rateLimit.burst"), 0, "must be at least 1"));
            }
        }
    }

    /// Every subset the policy names, with the field that names it.
    pub fn subsets(&self, at: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            for (j, b) in r.backends.iter().enumerate() {
                out.push((format!("{at}.routes[{i}].backends[{j}].subset"), b.subset.clone()));
            }
            if let Some(m) = &r.mirror {
                out.push((format!("{at}.routes[{i}].mirror.subset"), m.subset.clone()));
            }
        }
        out
    }
}

// === impl Route ===

impl Route {
    fn validate(&self, at: &str, errors: &mut Vec<FieldError>) {
        if let Some(m) = &self.match_ {
            for (field, p) in [("path", &m.path), ("pathPrefix", &m.path_prefix)] {
                if let Some(p) = p
                    && !p.starts_with('/')
                {
                    errors.push(FieldError::new(format!("{at}.match.{field}"), p, "must start with '/'"));
                }
            }
            if let Some(r) = &m.path_regex {
                check_regex(format!("{at}.match.pathRegex"), r, errors);
            }
            for (k, v) in &m.headers {
                if http_header_name_invalid(k) {
                    errors.push(FieldError::new(
                        format!("{at}.match.headers"),
                        k,
                        "not a valid lowercase header name",
                    ));
                }
                if let StringMatch::Regex(r) = v {
                    check_regex(format!("{at}.match.headers.{k}.regex"), r, errors);
                }
            }
            for (k, v) in &m.query {
                if k.is_empty() {
                    errors.push(FieldError::new(format!("{at}.match.query"), k, "must name a parameter"));
                }
                if let StringMatch::Regex(r) = v {
                    check_regex(format!("{at}.match.query.{k}.regex"), r, errors);
                }
            }
            check_methods(&format!("{at}.match.methods"), &m.methods, errors);
        }
        if !self.backends.is_empty() {
            let mut seen = Vec::new();
            for (j, b) in self.backends.iter().enumerate() {
                if b.subset.is_empty() {
                    errors.push(FieldError::new(
                        format!("{at}.backends[{j}].subset"),
                        "",
                        "must name a subset (workload label `version`)",
                    ));
                }
                if seen.contains(&&b.subset) {
                    errors.push(FieldError::new(
                        format!("{at}.backends[{j}].subset"),
                        &b.subset,
                        "named twice in one route",
                    ));
                }
                seen.push(&b.subset);
                if b.weight > 100 {
                    errors.push(FieldError::new(
                        format!("{at}.backends[{j}].weight"),
                        b.weight,
                        "must be between 0 and 100",
                    ));
                }
            }
            let sum: u32 = self.backends.iter().map(|b| b.weight).sum();
            if sum != 100 {
                errors.push(FieldError::new(format!("{at}.backends"), sum, "weights must sum to 100"));
            }
        }
        if let Some(t) = self.timeout {
            check_positive(format!("{at}.timeout"), t, errors);
        }
        if let Some(t) = self.idle_timeout {
            check_positive(format!("{at}.idleTimeout"), t, errors);
        }
        if let Some(r) = &self.retry {
            if r.attempts > 10 {
                errors.push(FieldError::new(format!("{at}.retry.attempts"), r.attempts, "must be at most 10"));
            }
            if let Some(t) = r.per_try_timeout {
                check_positive(format!("{at}.retry.perTryTimeout"), t, errors);
            }
            for (i, on) in r.on.iter().enumerate() {
                let field = format!("{at}.retry.on[{i}]");
                match on {
                    RetryOn::Status(s) if !(100..=599).contains(s) => {
                        errors.push(FieldError::new(field, s, "status must be between 100 and 599"))
                    }
                    RetryOn::Condition(c) if !RETRY_CONDITIONS.contains(&c.as_str()) => errors.push(FieldError::new(
                        field,
                        c,
                        format!("unknown retry condition; a status code or one of {}", RETRY_CONDITIONS.join(", ")),
                    )),
                    _ => {}
                }
            }
            if let Some(b) = &r.budget {
                check_percent(format!("{at}.retry.budget.ratio"), b.ratio, errors);
            }
        }
        if let Some(f) = &self.fault {
            if let Some(d) = &f.delay {
                check_percent(format!("{at}.fault.delay.percent"), d.percent, errors);
                check_positive(format!("{at}.fault.delay.duration"), d.duration, errors);
            }
            if let Some(a) = &f.abort {
                check_percent(format!("{at}.fault.abort.percent"), a.percent, errors);
                if !(200..=599).contains(&a.status) {
                    errors.push(FieldError::new(
                        format!("{at}.fault.abort.status"),
                        a.status,
                        "must be between 200 and 599",
                    ));
                }
            }
        }
        if let Some(m) = &self.mirror {
            check_percent(format!("{at}.mirror.percent"), m.percent, errors);
            if m.subset.is_empty() {
                errors.push(FieldError::new(format!("{at}.mirror.subset"), "", "must name a subset"));
            }
        }
    }
}

fn http_header_name_invalid(k: &str) -> bool {
    k.is_empty()
        || !k
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

// === impl SecurityPolicySpec ===

impl SecurityPolicySpec {
    pub fn validate(&self, at: &str, errors: &mut Vec<FieldError>) {
        check_name(&format!("{at}.selector.service"), &self.selector.service, errors);
        if let Some(a) = &self.authorization {
            for (i, rule) in a.rules.iter().enumerate() {
                let r = format!("{at}.authorization.rules[{i}]");
                if let Some(from) = &rule.from {
                    for (j, id) in from.identities.iter().enumerate() {
                        if !id.starts_with("spiffe://") || id.len() <= "spiffe://".len() {
                            errors.push(FieldError::new(
                                format!("{r}.from.identities[{j}]"),
                                id,
                                "must be a SPIFFE ID (spiffe://trust-domain/ns/NS/sa/SA)",
                            ));
                        }
                    }
                    for (j, ns) in from.namespaces.iter().enumerate() {
                        check_name(&format!("{r}.from.namespaces[{j}]"), ns, errors);
                    }
                }
                if let Some(to) = &rule.to {
                    for (j, p) in to.paths.iter().enumerate() {
                        if !p.starts_with('/') {
                            errors.push(FieldError::new(format!("{r}.to.paths[{j}]"), p, "must start with '/'"));
                        }
                    }
                    check_methods(&format!("{r}.to.methods"), &to.methods, errors);
                }
            }
        }
    }
}

// === impl IntentSpec ===

impl IntentSpec {
    pub fn validate(&self, at: &str, errors: &mut Vec<FieldError>) {
        if self.title.trim().is_empty() {
            errors.push(FieldError::new(format!("{at}.title"), "", "must not be empty"));
        }
        check_name(&format!("{at}.target"), &self.target, errors);
        if let Some(scope) = &self.scope {
            match scope.split_once(':') {
                Some((k, v)) if !k.is_empty() && !v.is_empty() && !http_header_name_invalid(k) => {}
                _ => errors.push(FieldError::new(format!("{at}.scope"), scope, "must be key:value, e.g. tenant:acme")),
            }
        }
        if self.change.apply.is_empty() && self.change.delete.is_empty() {
            errors.push(FieldError::new(
                format!("{at}.change"),
                "",
                "must apply or delete at least one resource",
            ));
        }
        for (i, doc) in self.change.apply.iter().enumerate() {
            let prefix = format!("{at}.change.apply[{i}]");
            match object_from_value(doc) {
                Ok(Object::Resource(_)) => {}
                Ok(Object::Intent(_)) => errors.push(FieldError::new(
                    format!("{prefix}.kind"),
                    "Intent",
                    "an intent cannot apply an intent",
                )),
                Err(errs) => errors.extend(errs.into_iter().map(|mut e| {
                    e.field = if e.field.is_empty() {
                        prefix.clone()
                    } else {
                        format!("{prefix}.{}", e.field)
                    };
                    e
                })),
            }
        }
        stage::check_stages(&format!("{at}.rollout.stages"), &self.rollout.stages, errors);
        check_percent(format!("{at}.slo.maxErrorRate"), self.slo.max_error_rate, errors);
        check_percent(format!("{at}.slo.maxErrorRateIncrease"), self.slo.max_error_rate_increase, errors);
        if self.slo.max_p99_increase < 0.0 || self.slo.max_p99_increase.is_nan() {
            errors.push(FieldError::new(
                format!("{at}.slo.maxP99Increase"),
                self.slo.max_p99_increase,
                "must not be negative",
            ));
        }
        if !(50.0..100.0).contains(&self.slo.confidence) || self.slo.confidence.is_nan() {
            errors.push(FieldError::new(
                format!("{at}.slo.confidence"),
                self.slo.confidence,
                "must be a percentage from 50 up to (not including) 100",
            ));
        }
    }

    /// The resources this intent applies, parsed.
    pub fn resources(&self) -> Result<Vec<Resource>, Vec<FieldError>> {
        self.change
            .apply
            .iter()
            .map(|doc| match object_from_value(doc) {
                Ok(Object::Resource(r)) => Ok(r),
                Ok(Object::Intent(_)) => Err(vec![FieldError::new("kind", "Intent", "an intent cannot apply an intent")]),
                Err(e) => Err(e),
            })
            .collect()
    }
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            stages: default_stages(),
            bake: default_bake(),
            mode: RolloutMode::Auto,
        }
    }
}

impl Default for Slo {
    fn default() -> Self {
        Self {
            max_error_rate: default_max_error_rate(),
            max_error_rate_increase: default_max_error_rate_increase(),
            max_p99_increase: default_max_p99_increase(),
            min_requests: default_min_requests(),
            confidence: default_confidence(),
            on_inconclusive: OnInconclusive::default(),
        }
    }
}

mod stage;
pub use stage::Stage;

#[cfg(test)]
mod tests;

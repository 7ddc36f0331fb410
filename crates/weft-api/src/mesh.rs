//! What one proxy runs on: the services its app calls, their endpoints, and the traffic policy
//! that applies to each. The control plane builds it per proxy and sends it as
//! [`proto::ProxyConfig`]; the proxy converts it back with `TryFrom`, which checks every field
//! and names the one at fault, so a bad push is NACKed and never replaces the last good config.

use crate::error::{FieldError, Invalid};
use crate::proto;
use crate::resource::{MtlsMode, RateLimit, SecurityPolicySpec, TrafficPolicySpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// The workload label that names a subset.
pub const SUBSET_LABEL: &str = "version";
/// The workload label that names the service; defaults to the workload name.
pub const SERVICE_LABEL: &str = "service";

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MeshConfig {
    /// Push sequence on the control stream (0 for a static config).
    pub version: u64,
    /// Mesh policy revision.
    pub revision: u64,
    /// By `NAMESPACE/NAME` ([`ServiceConfig::key`]).
    pub services: BTreeMap<String, Arc<ServiceConfig>>,
    /// Forward without L7 policy (`weft bypass`).
    pub bypass: bool,
    /// The SecurityPolicy for this proxy's own workload (enforced inbound).
    pub security: Option<SecurityPolicySpec>,
    /// Its `namespace/name`.
    pub security_name: String,
    /// The roots to trust (PEM); empty in a static config.
    #[serde(skip)]
    pub trust_bundle: String,
    /// Generation of the CA's signing root.
    pub ca_generation: u64,
    /// The inbound rate limit of this proxy's own service, if its TrafficPolicy sets one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound_rate_limit: Option<RateLimit>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceConfig {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// The TrafficPolicy spec its callers enforce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<TrafficPolicySpec>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub policy_name: String,
    /// The destination's mTLS mode; callers use mTLS unless it is `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// The control plane knows no such service (no workload serves it, no policy names it).
    /// Only the control plane says so: a static file lists the services that exist.
    #[serde(default, skip_deserializing, skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
    /// Its virtual IP ([`virtual_ip`]), which the control plane sends; a static file may set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_ip: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Endpoint {
    pub address: SocketAddr,
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub workload: String,
    /// The SPIFFE ID the endpoint must present over mTLS; empty when it has none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub identity: String,
}

/// An endpoint's labels: a few short pairs, sorted by key in one allocation. (A `BTreeMap`
/// node takes over half a kilobyte however few its entries, for every endpoint of every
/// service a proxy knows.) Reads and writes as a YAML/JSON map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "BTreeMap<String, String>", into = "BTreeMap<String, String>")]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok().map(|i| &*self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        let sorted: BTreeMap<String, String> = pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        Labels::from(sorted)
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Labels(map.into_iter().map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str())).collect())
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(labels: Labels) -> Self {
        labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }
}

fn default_namespace() -> String {
    crate::resource::DEFAULT_NAMESPACE.to_string()
}

// === impl ServiceConfig ===

impl ServiceConfig {
    /// `NAMESPACE/NAME`: how a config keys it and a proxy subscribes to it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Checks what serde cannot: names, and the policy's own validation.
    pub fn validate(&self, at: &str, errors: &mut Vec<FieldError>) {
        if self.name.is_empty() {
            errors.push(FieldError::new(format!("{at}.name"), "", "must not be empty"));
        }
        if let Some(p) = &self.policy {
            p.validate(&format!("{at}.policy"), errors);
            if p.service != self.name {
                errors.push(FieldError::new(
                    format!("{at}.policy.service"),
                    &p.service,
                    format!("must be {:?}, the service it is attached to", self.name),
                ));
            }
        }
    }
}

// === impl Endpoint ===

impl Endpoint {
    pub fn subset(&self) -> Option<&str> {
        self.labels.get(SUBSET_LABEL)
    }
}

// === wire <-> domain ===

impl TryFrom<proto::ProxyConfig> for MeshConfig {
    type Error = Invalid;

    fn try_from(msg: proto::ProxyConfig) -> Result<Self, Invalid> {
        let source = format!("config version {} (revision {})", msg.version, msg.revision);
        let mut errors = Vec::new();
        let mut services = BTreeMap::new();
        for (i, s) in msg.services.into_iter().enumerate() {
            let at = format!("services[{i}]");
            let mut endpoints = Vec::with_capacity(s.endpoints.len());
            for (j, e) in s.endpoints.into_iter().enumerate() {
                match e.address.parse::<SocketAddr>() {
                    Ok(address) => endpoints.push(Endpoint {
                        address,
                        cluster: e.cluster,
                        labels: e.labels.into_iter().collect(),
                        workload: e.workload,
                        identity: e.identity,
                    }),
                    Err(_) => errors.push(FieldError::new(
                        format!("{at}.endpoints[{j}].address"),
                        &e.address,
                        "not a socket address",
                    )),
                }
            }
            let policy = if s.traffic_policy_json.is_empty() {
                None
            } else {
                let mut de = serde_json::Deserializer::from_str(&s.traffic_policy_json);
                match serde_path_to_error::deserialize::<_, TrafficPolicySpec>(&mut de) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        errors.push(FieldError::new(format!("{at}.policy.{}", e.path()), "", e.into_inner().to_string()));
                        None
                    }
                }
            };
            let virtual_ip = match s.virtual_ip.as_str() {
                "" => None,
                v => match v.parse::<Ipv4Addr>() {
                    Ok(ip) if VIRTUAL_IPS.contains(ip) => Some(ip),
                    _ => {
                        errors.push(FieldError::new(format!("{at}.virtualIp"), v, "an IPv4 address in 240.240.0.0/16"));
                        None
                    }
                },
            };
            let mtls = match s.mtls.as_str() {
                "" => None,
                "strict" => Some(MtlsMode::Strict),
                "permissive" => Some(MtlsMode::Permissive),
                "off" => Some(MtlsMode::Off),
                other => {
                    errors.push(FieldError::new(format!("{at}.mtls"), other, "one of strict, permissive, off"));
                    None
                }
            };
            let svc = ServiceConfig {
                name: s.name,
                namespace: if s.namespace.is_empty() { default_namespace() } else { s.namespace },
                endpoints,
                policy,
                policy_name: s.policy_name,
                mtls,
                unknown: s.unknown,
                virtual_ip,
            };
            svc.validate(&at, &mut errors);
            let key = svc.key();
            if services.insert(key.clone(), Arc::new(svc)).is_some() {
                errors.push(FieldError::new(format!("{at}.name"), key, "service listed twice"));
            }
        }
        let security = if msg.security_policy_json.is_empty() {
            None
        } else {
            let mut de = serde_json::Deserializer::from_str(&msg.security_policy_json);
            match serde_path_to_error::deserialize::<_, SecurityPolicySpec>(&mut de) {
                Ok(p) => {
                    p.validate("security", &mut errors);
                    Some(p)
                }
                Err(e) => {
                    errors.push(FieldError::new(format!("security.{}", e.path()), "", e.into_inner().to_string()));
                    None
                }
            }
        };
        let inbound_rate_limit = if msg.inbound_rate_limit_json.is_empty() {
            None
        } else {
            let mut de = serde_json::Deserializer::from_str(&msg.inbound_rate_limit_json);
            match serde_path_to_error::deserialize::<_, RateLimit>(&mut de) {
                Ok(r) if r.requests_per_second > 0.0 && r.burst > 0 => Some(r),
                Ok(r) => {
                    errors.push(FieldError::new(
                        "inboundRateLimit",
                        format!("{} rps, burst {}", r.requests_per_second, r.burst),
                        "rate and burst must be positive",
                    ));
                    None
                }
                Err(e) => {
                    errors.push(FieldError::new(
                        format!("inboundRateLimit.{}", e.path()),
                        "",
                        e.into_inner().to_string(),
                    ));
                    None
                }
            }
        };
        if errors.is_empty() {
            Ok(MeshConfig {
                inbound_rate_limit,
                version: msg.version,
                revision: msg.revision,
                services,
                bypass: msg.bypass,
                security,
                security_name: msg.security_policy_name,
                trust_bundle: msg.trust_bundle_pem,
                ca_generation: msg.ca_generation,
            })
        } else {
            Err(Invalid::new(source, errors))
        }
    }
}

impl From<&ServiceConfig> for proto::Service {
    fn from(s: &ServiceConfig) -> Self {
        proto::Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| proto::Endpoint {
                    address: e.address.to_string(),
                    cluster: e.cluster.clone(),
                    labels: e.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                    workload: e.workload.clone(),
                    identity: e.identity.clone(),
                    // Only the control plane numbers endpoints (for its deltas).
                    key: 0,
                })
                .collect(),
            traffic_policy_json: s
                .policy
                .as_ref()
                .map(|p| serde_json::to_string(p).expect("policy serializes"))
                .unwrap_or_default(),
            policy_name: s.policy_name.clone(),
            mtls: match s.mtls {
                None => String::new(),
                Some(MtlsMode::Strict) => "strict".into(),
                Some(MtlsMode::Permissive) => "permissive".into(),
                Some(MtlsMode::Off) => "off".into(),
            },
            unknown: s.unknown,
            virtual_ip: s.virtual_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            endpoint_version: 0,
        }
    }
}

/// The range services' virtual IPs come from: 240.0.0.0/4 is reserved ("future use", RFC
/// 1112) and never routed, and Istio auto-allocates from the same /16.
pub const VIRTUAL_IPS: VirtualRange = VirtualRange;

/// 240.240.0.0/16.
#[derive(Clone, Copy, Debug)]
pub struct VirtualRange;

impl VirtualRange {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ip.octets()[..2] == [240, 240]
    }
}

/// The address service `namespace/name` is offered first when the control plane allocates it
/// a virtual IP: derived from the name (FNV-1a, 32 bits, folded into the range's 65,534 usable
/// hosts), what releases before allocation handed out, so a service keeps that address unless
/// another holds it. Names collide (1% chance at ~36 services, 50% at ~300): the control plane
/// then gives the next free address, and stores every allocation (weft-control's `vip`).
pub fn virtual_ip(namespace: &str, name: &str) -> Ipv4Addr {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in namespace.bytes().chain([b'/']).chain(name.bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let host = (hash ^ (hash >> 16)) % 65_534 + 1; // 240.240.0.1 ..= 240.240.255.254
    Ipv4Addr::new(240, 240, (host >> 8) as u8, host as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(addr: &str, policy: &str) -> proto::Service {
        proto::Service {
            name: "orders-api".into(),
            namespace: "default".into(),
            endpoints: vec![proto::Endpoint {
                address: addr.into(),
                cluster: "cluster-b".into(),
                labels: [("version".into(), "v1".into())].into(),
                workload: "default/orders-api".into(),
                identity: "spiffe://weft.local/ns/default/sa/orders-api".into(),
                key: 0,
            }],
            traffic_policy_json: policy.into(),
            policy_name: String::new(),
            mtls: "strict".into(),
            unknown: false,
            virtual_ip: String::new(),
            endpoint_version: 0,
        }
    }

    #[test]
    fn wire_config_round_trips_into_domain() {
        let policy = r#"{"service":"orders-api","routes":[{"timeout":"2s"}]}"#;
        let msg = proto::ProxyConfig {
            version: 3,
            revision: 7,
            proxy_id: "p".into(),
            services: vec![service("127.0.0.1:9000", policy)],
            bypass: true,
            security_policy_json: r#"{"selector":{"service":"orders-api"},"mtls":"strict"}"#.into(),
            security_policy_name: "default/orders-strict".into(),
            trust_bundle_pem: "-----BEGIN CERTIFICATE-----".into(),
            ca_generation: 2,
            inbound_rate_limit_json: r#"{"requestsPerSecond":5,"burst":2,"at":"inbound"}"#.into(),
        };
        let cfg = MeshConfig::try_from(msg).unwrap();
        assert_eq!((cfg.version, cfg.revision, cfg.bypass), (3, 7, true));
        assert_eq!(cfg.security.as_ref().unwrap().mtls, Some(crate::resource::MtlsMode::Strict));
        assert_eq!(cfg.security_name, "default/orders-strict");
        let limit = cfg.inbound_rate_limit.as_ref().unwrap();
        assert_eq!((limit.requests_per_second, limit.burst), (5.0, 2));
        assert_eq!((cfg.trust_bundle.as_str(), cfg.ca_generation), ("-----BEGIN CERTIFICATE-----", 2));
        assert_eq!(cfg.services["default/orders-api"].mtls, Some(crate::resource::MtlsMode::Strict));
        assert_eq!(
            cfg.services["default/orders-api"].endpoints[0].identity,
            "spiffe://weft.local/ns/default/sa/orders-api"
        );
        let svc = &cfg.services["default/orders-api"];
        assert_eq!(svc.endpoints[0].subset(), Some("v1"));
        assert_eq!(svc.policy.as_ref().unwrap().routes[0].timeout.unwrap().0.as_millis(), 2000);
        let back = proto::Service::from(svc.as_ref());
        assert_eq!(
            MeshConfig::try_from(proto::ProxyConfig {
                services: vec![back],
                ..Default::default()
            })
            .unwrap()
            .services["default/orders-api"],
            cfg.services["default/orders-api"]
        );
    }

    #[test]
    fn bad_wire_config_names_every_field() {
        let bad_policy = r#"{"service":"orders-api","routes":[{"timeout":"soon"}]}"#;
        let msg = proto::ProxyConfig {
            version: 1,
            revision: 2,
            proxy_id: "p".into(),
            services: vec![service("not-an-addr", bad_policy)],
            ..Default::default()
        };
        let err = MeshConfig::try_from(msg).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.errors.len(), 2, "{text}");
        assert!(
            text.contains("services[0].endpoints[0].address") && text.contains("not-an-addr"),
            "{text}"
        );
        assert!(
            text.contains("services[0].policy.routes[0].timeout") && text.contains("soon"),
            "{text}"
        );
    }

    #[test]
    fn labels_read_and_write_as_a_sorted_map() {
        let labels: Labels = serde_json::from_str(r#"{"version": "v2", "app": "orders", "tier": "web"}"#).unwrap();
        assert_eq!(
            (labels.get("version"), labels.get("app"), labels.get("zone")),
            (Some("v2"), Some("orders"), None)
        );
        assert_eq!(labels.iter().map(|(k, _)| k).collect::<Vec<_>>(), ["app", "tier", "version"]);
        assert_eq!(
            serde_json::to_string(&labels).unwrap(),
            r#"{"app":"orders","tier":"web","version":"v2"}"#
        );
        assert_eq!(
            labels,
            [("version", "v2"), ("tier", "web"), ("app", "orders")].into_iter().collect()
        );
    }

    #[test]
    fn virtual_ips_are_stable_and_in_range() {
        let a = virtual_ip("default", "orders-api");
        assert_eq!(a, virtual_ip("default", "orders-api"));
        assert_ne!(a, virtual_ip("shop", "orders-api"));
        for n in 0..5000 {
            let ip = virtual_ip("default", &format!("svc-{n}"));
            assert!(VIRTUAL_IPS.contains(ip), "{ip}");
            assert!(![[0, 0], [255, 255]].contains(&[ip.octets()[2], ip.octets()[3]]), "{ip}");
        }
    }
}

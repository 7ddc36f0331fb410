//! Resource YAML/JSON ([`weft_api::resource::parse_objects`]): what `weft apply` and the API
//! accept from users.
//!
//! Properties: a refusal names its source; an accepted resource survives the control plane's
//! store (JSON out, [`Resource`] back in) and being applied again as that JSON unchanged,
//! and a TrafficPolicy or SecurityPolicy accepted here is accepted by every proxy it is pushed to
//! (the same JSON inside a `ProxyConfig`, through [`MeshConfig::try_from`]), so a policy the API
//! took is never NACKed for its content.

use weft_api::mesh::MeshConfig;
use weft_api::proto;
use weft_api::resource::{Object, Resource, parse_objects};

const SOURCE: &str = "fuzz.yaml";

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match parse_objects(text, SOURCE) {
        Ok(objects) => {
            for object in objects {
                if let Object::Resource(resource) = object {
                    survives_the_store(&resource);
                    reaches_proxies(&resource);
                }
            }
        }
        Err(invalid) => assert!(
            invalid.to_string().contains(SOURCE) && !invalid.errors.is_empty(),
            "a refusal must name its source and a problem: {invalid}"
        ),
    }
}

fn survives_the_store(resource: &Resource) {
    let json = serde_json::to_string(resource).expect("a resource serializes");
    let stored: Resource = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json} does not read back: {e}"));
    assert_eq!(&stored, resource, "the store changed {json}");
    let reapplied = parse_objects(&json, "stored").unwrap_or_else(|e| panic!("{json} is refused when applied again: {e}"));
    assert!(
        matches!(reapplied.as_slice(), [Object::Resource(r)] if r == resource),
        "applying {json} again changed it"
    );
}

fn reaches_proxies(resource: &Resource) {
    let mut msg = proto::ProxyConfig::default();
    match resource {
        Resource::TrafficPolicy(d) => msg.services.push(proto::Service {
            name: d.spec.service.clone(),
            namespace: d.metadata.namespace.clone(),
            traffic_policy_json: serde_json::to_string(&d.spec).expect("a policy serializes"),
            ..Default::default()
        }),
        Resource::SecurityPolicy(d) => {
            msg.security_policy_json = serde_json::to_string(&d.spec).expect("a policy serializes");
        }
    }
    let config = MeshConfig::try_from(msg).unwrap_or_else(|e| panic!("a proxy refuses a policy the API accepted: {e}"));
    match resource {
        Resource::TrafficPolicy(d) => {
            let service = config.services.values().find(|s| s.name == d.spec.service);
            assert_eq!(service.and_then(|s| s.policy.as_ref()), Some(&d.spec));
        }
        Resource::SecurityPolicy(d) => assert_eq!(config.security.as_ref(), Some(&d.spec)),
    }
}

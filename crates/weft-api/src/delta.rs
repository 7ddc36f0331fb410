//! Config deltas on the control stream: how a proxy (or anything that speaks the stream, like
//! the test harness) applies a [`proto::ConfigDelta`] to the whole config it holds, in wire
//! form. A delta that does not build on what is held is a gap, answered with a Resync.

use crate::proto;

/// `held` with `delta` applied; an error names the gap when `delta` does not build on it (a
/// push missed or refused since, or endpoints on another version).
pub fn apply(held: &proto::ProxyConfig, delta: proto::ConfigDelta) -> Result<proto::ProxyConfig, String> {
    if delta.base_version != held.version {
        return Err(format!("delta on version {}, holding {}", delta.base_version, held.version));
    }
    let mut services = held.services.clone();
    let mut next = match delta.own {
        Some(own) => own,
        None => proto::ProxyConfig {
            services: Vec::new(),
            ..held.clone()
        },
    };
    next.version = delta.version;
    next.revision = delta.revision;
    let key = |s: &proto::Service| format!("{}/{}", s.namespace, s.name);
    services.retain(|s| !delta.removed_services.contains(&key(s)));
    for policy in delta.services {
        match services.iter_mut().find(|s| key(s) == key(&policy)) {
            Some(s) => {
                let endpoints = std::mem::take(&mut s.endpoints);
                *s = proto::Service {
                    endpoints,
                    endpoint_version: s.endpoint_version,
                    ..policy
                };
            }
            None => services.push(proto::Service {
                endpoints: Vec::new(),
                endpoint_version: 0,
                ..policy
            }),
        }
    }
    for change in delta.endpoints {
        let service = services
            .iter_mut()
            .find(|s| key(s) == change.service)
            .ok_or_else(|| format!("endpoints of {}, a service not held", change.service))?;
        if change.replace {
            service.endpoints = change.added;
        } else if service.endpoint_version != change.since {
            return Err(format!(
                "endpoints of {} on version {}, holding {}",
                change.service, change.since, service.endpoint_version
            ));
        } else {
            service.endpoints.retain(|e| !change.removed.contains(&e.key));
            service.endpoints.extend(change.added);
        }
        service.endpoint_version = change.endpoint_version;
    }
    next.services = services;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(key: u64) -> proto::Endpoint {
        proto::Endpoint {
            address: format!("127.0.0.1:{}", 4000 + key),
            key,
            ..Default::default()
        }
    }

    fn held() -> proto::ProxyConfig {
        proto::ProxyConfig {
            version: 3,
            revision: 7,
            proxy_id: "default/web#1".into(),
            services: vec![proto::Service {
                name: "orders".into(),
                namespace: "default".into(),
                endpoints: vec![endpoint(1), endpoint(2)],
                endpoint_version: 10,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_delta_changes_only_what_it_names() {
        let delta = proto::ConfigDelta {
            version: 4,
            base_version: 3,
            revision: 8,
            services: vec![proto::Service {
                name: "orders".into(),
                namespace: "default".into(),
                policy_name: "orders".into(),
                ..Default::default()
            }],
            endpoints: vec![proto::EndpointChange {
                service: "default/orders".into(),
                since: 10,
                endpoint_version: 11,
                added: vec![endpoint(3)],
                removed: vec![1],
                replace: false,
            }],
            ..Default::default()
        };
        let next = apply(&held(), delta).unwrap();
        assert_eq!((next.version, next.revision, next.proxy_id.as_str()), (4, 8, "default/web#1"));
        let orders = &next.services[0];
        assert_eq!(orders.policy_name, "orders", "the policy part is replaced");
        let keys: Vec<u64> = orders.endpoints.iter().map(|e| e.key).collect();
        assert_eq!(keys, [2, 3], "endpoint 1 left, 3 joined, 2 kept");
        assert_eq!(orders.endpoint_version, 11);
    }

    #[test]
    fn a_delta_on_another_version_or_endpoint_version_is_a_gap() {
        let on = |base_version, since| proto::ConfigDelta {
            version: base_version + 1,
            base_version,
            endpoints: vec![proto::EndpointChange {
                service: "default/orders".into(),
                since,
                endpoint_version: since + 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(apply(&held(), on(2, 10)).unwrap_err(), "delta on version 2, holding 3");
        assert_eq!(
            apply(&held(), on(3, 9)).unwrap_err(),
            "endpoints of default/orders on version 9, holding 10"
        );
        assert!(apply(&held(), on(3, 10)).is_ok());
    }
}

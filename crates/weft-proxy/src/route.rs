//! Caller-side routing: which route of a TrafficPolicy a request takes, and which subset it goes
//! to. First match wins; no match (or no policy) is the service's default behaviour: every
//! endpoint, no timeout.

use http::request::Parts;
use std::time::Duration;
use weft_api::resource::{Route, TrafficPolicySpec};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// Name of the matched route (or `default`).
    pub route: String,
    /// Subset the request goes to; `None` balances over every endpoint.
    pub subset: Option<String>,
    pub timeout: Option<Duration>,
    pub failover: Vec<String>,
}

/// Decides the route for a request. `roll` is a uniform number in `0..100` for weighted splits.
pub fn decide(policy: Option<&TrafficPolicySpec>, req: &Parts, roll: u32) -> Decision {
    let Some(policy) = policy else {
        return Decision {
            route: "default".into(),
            ..Default::default()
        };
    };
    let failover = policy.failover.clone();
    let Some((i, route)) = policy.routes.iter().enumerate().find(|(_, r)| matches(r, req)) else {
        return Decision {
            route: "default".into(),
            failover,
            ..Default::default()
        };
    };
    let mut cumulative = 0;
    let subset = route.backends.iter().find_map(|b| {
        cumulative += b.weight;
        (roll < cumulative).then(|| b.subset.clone())
    });
    Decision {
        route: if route.name.is_empty() {
            format!("route-{i}")
        } else {
            route.name.clone()
        },
        subset,
        timeout: route.timeout.map(|t| t.as_std()),
        failover,
    }
}

fn matches(route: &Route, req: &Parts) -> bool {
    let Some(m) = &route.match_ else { return true };
    if let Some(prefix) = &m.path_prefix
        && !req.uri.path().starts_with(prefix.as_str())
    {
        return false;
    }
    if !m.methods.is_empty() && !m.methods.iter().any(|x| x == req.method.as_str()) {
        return false;
    }
    m.headers
        .iter()
        .all(|(k, v)| req.headers.get(k.as_str()).is_some_and(|h| h.as_bytes() == v.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> TrafficPolicySpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn parts(method: &str, path: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn first_match_wins_and_default_otherwise() {
        let p = policy(
            "service: checkout-api\nroutes:\n  - name: acme\n    match: {headers: {x-tenant: acme}, pathPrefix: /api, methods: [GET]}\n    backends: [{subset: v2, weight: 100}]\n  - name: rest\n    timeout: 2s\n",
        );
        let acme = decide(Some(&p), &parts("GET", "/api/x", &[("x-tenant", "acme")]), 50);
        assert_eq!((acme.route.as_str(), acme.subset.as_deref()), ("acme", Some("v2")));
        let post = decide(Some(&p), &parts("POST", "/api/x", &[("x-tenant", "acme")]), 50);
        assert_eq!(post.route, "rest");
        assert_eq!(post.timeout, Some(Duration::from_secs(2)));
        let other = decide(Some(&p), &parts("GET", "/other", &[("x-tenant", "acme")]), 50);
        assert_eq!(other.route, "rest");
        assert_eq!(decide(None, &parts("GET", "/", &[]), 0).route, "default");
    }

    #[test]
    fn weights_split_by_roll() {
        let p = policy("service: c\nroutes:\n  - backends: [{subset: v2, weight: 10}, {subset: v1, weight: 90}]\n");
        let picks: Vec<_> = (0..100)
            .map(|roll| decide(Some(&p), &parts("GET", "/", &[]), roll).subset.unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|s| *s == "v2").count(), 10);
        assert_eq!(picks.iter().filter(|s| *s == "v1").count(), 90);
    }
}

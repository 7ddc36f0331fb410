//! Caller-side routing: which route of a TrafficPolicy a request takes, and which subset it goes
//! to. Routes are compiled once per config swap (regular expressions included); matching a
//! request allocates nothing. First match wins; no match (or no policy) takes the service's
//! default route: every endpoint, no timeout, connect-failure retries only.

use http::HeaderName;
use http::request::Parts;
use regex::Regex;
use std::sync::Arc;
use std::time::Duration;
use weft_api::resource::{Backend, Fault, Mirror, Route, StringMatch, TrafficPolicySpec, anchored_regex};

/// Retries taken when a route has no retry block: connecting failed or the stream was refused,
/// so the request never reached an app and another endpoint is always safe.
pub(crate) const DEFAULT_RETRIES: u32 = 2;
/// Stream idle timeout when a route sets none.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// A route ready to match requests.
#[derive(Debug)]
pub struct CompiledRoute {
    /// Name from the policy, `route-N` when unnamed, `default` when no route matched.
    pub name: Arc<str>,
    matcher: Option<Matcher>,
    pub backends: Vec<Backend>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) idle_timeout: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) fault: Option<Fault>,
    pub(crate) mirror: Option<Mirror>,
}

#[derive(Debug)]
struct Matcher {
    path: Option<String>,
    prefix: Option<String>,
    regex: Option<Regex>,
    methods: Vec<http::Method>,
    headers: Vec<(HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
}

#[derive(Debug)]
enum ValueMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Present,
}

/// What a route retries, and how often.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RetryPolicy {
    /// Retries after the first try.
    pub(crate) retries: u32,
    pub(crate) per_try_timeout: Option<Duration>,
    pub(crate) on: RetryOn,
    /// Retries allowed as a share of requests (0.2 = 20%), plus `min_per_second`.
    pub(crate) budget_ratio: f64,
    pub(crate) budget_min_per_second: u32,
    pub(crate) non_idempotent: bool,
}

/// Retry conditions as flags, plus listed statuses and gRPC codes.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct RetryOn {
    pub(crate) connect_failure: bool,
    pub(crate) refused_stream: bool,
    pub(crate) reset: bool,
    pub(crate) any_5xx: bool,
    pub(crate) gateway_error: bool,
    pub(crate) statuses: Vec<u16>,
    pub(crate) grpc_codes: Vec<u32>,
}

// === impl CompiledRoute ===

impl CompiledRoute {
    /// The route requests take when no policy route matches.
    pub fn default_route() -> Self {
        CompiledRoute {
            name: Arc::from("default"),
            matcher: None,
            backends: Vec::new(),
            timeout: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            retry: RetryPolicy::default(),
            fault: None,
            mirror: None,
        }
    }

    /// Compiles route `i` of a policy. The control plane validated it; a regex that still fails
    /// to compile makes the route match nothing (and says so) rather than everything.
    pub fn compile(i: usize, route: &Route) -> Self {
        let matcher = route.match_.as_ref().map(|m| Matcher {
            path: m.path.clone(),
            prefix: m.path_prefix.clone(),
            regex: m.path_regex.as_deref().map(regex_or_never),
            methods: m.methods.iter().filter_map(|x| x.parse().ok()).collect(),
            headers: m
                .headers
                .iter()
                .filter_map(|(k, v)| Some((HeaderName::from_bytes(k.as_bytes()).ok()?, ValueMatch::from(v))))
                .collect(),
            query: m.query.iter().map(|(k, v)| (k.clone(), ValueMatch::from(v))).collect(),
        });
        CompiledRoute {
            name: if route.name.is_empty() {
                Arc::from(format!("route-{i}"))
            } else {
                Arc::from(route.name.as_str())
            },
            matcher,
            backends: route.backends.clone(),
            timeout: route.timeout.map(|t| t.as_std()),
            idle_timeout: route.idle_timeout.map(|t| t.as_std()).unwrap_or(DEFAULT_IDLE_TIMEOUT),
            retry: route.retry.as_ref().map(RetryPolicy::from).unwrap_or_default(),
            fault: route.fault.clone(),
            mirror: route.mirror.clone(),
        }
    }

    pub(crate) fn matches(&self, req: &Parts) -> bool {
        self.matcher.as_ref().is_none_or(|m| m.matches(req))
    }

    /// The subset for a uniform `roll` in `0..100`; `None` balances over every endpoint.
    pub fn subset(&self, roll: u32) -> Option<&str> {
        let mut cumulative = 0;
        self.backends.iter().find_map(|b| {
            cumulative += b.weight;
            (roll < cumulative).then_some(b.subset.as_str())
        })
    }
}

/// Compiles every route of a policy, in order.
pub fn compile(policy: Option<&TrafficPolicySpec>) -> Vec<CompiledRoute> {
    policy
        .map(|p| p.routes.iter().enumerate().map(|(i, r)| CompiledRoute::compile(i, r)).collect())
        .unwrap_or_default()
}

/// The first route that matches, else `default`.
pub fn decide<'a>(routes: &'a [CompiledRoute], default: &'a CompiledRoute, req: &Parts) -> &'a CompiledRoute {
    routes.iter().find(|r| r.matches(req)).unwrap_or(default)
}

fn regex_or_never(r: &str) -> Regex {
    anchored_regex(r).unwrap_or_else(|error| {
        tracing::error!(regex = r, %error, "route regex does not compile; the route matches nothing");
        Regex::new("[^\\s\\S]").expect("the empty class compiles")
    })
}

impl From<&StringMatch> for ValueMatch {
    fn from(m: &StringMatch) -> Self {
        match m {
            StringMatch::Exact(v) => ValueMatch::Exact(v.clone()),
            StringMatch::Prefix(v) => ValueMatch::Prefix(v.clone()),
            StringMatch::Regex(r) => ValueMatch::Regex(regex_or_never(r)),
            StringMatch::Present => ValueMatch::Present,
        }
    }
}

impl ValueMatch {
    fn test(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (_, None) => false,
            (ValueMatch::Present, Some(_)) => true,
            (ValueMatch::Exact(v), Some(x)) => v == x,
            (ValueMatch::Prefix(v), Some(x)) => x.starts_with(v.as_str()),
            (ValueMatch::Regex(r), Some(x)) => r.is_match(x),
        }
    }
}

impl Matcher {
    fn matches(&self, req: &Parts) -> bool {
        let path = req.uri.path();
        if self.path.as_deref().is_some_and(|p| p != path) {
            return false;
        }
        if self.prefix.as_deref().is_some_and(|p| !path.starts_with(p)) {
            return false;
        }
        if self.regex.as_ref().is_some_and(|r| !r.is_match(path)) {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.contains(&req.method) {
            return false;
        }
        let headers_match = self.headers.iter().all(|(name, m)| {
            // A repeated header matches when any of its values does.
            let mut values = req.headers.get_all(name).iter().peekable();
            if values.peek().is_none() {
                return m.test(None);
            }
            values.any(|v| m.test(v.to_str().ok()))
        });
        if !headers_match {
            return false;
        }
        self.query.iter().all(|(name, m)| {
            let query = req.uri.query().unwrap_or("");
            let value = query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decoded(k).as_deref() == Some(name.as_str())).then(|| percent_decoded(v))
            });
            match value {
                None => m.test(None),
                Some(v) => m.test(Some(v.as_deref().unwrap_or(""))),
            }
        })
    }
}

/// `a%20b+c` -> `a b c`; `None` when the escapes do not form UTF-8. Borrowed when nothing is
/// escaped, so the usual query costs no allocation.
fn percent_decoded(s: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !s.contains(['%', '+']) {
        return Some(std::borrow::Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok().map(std::borrow::Cow::Owned)
}

// === impl RetryPolicy ===

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: DEFAULT_RETRIES,
            per_try_timeout: None,
            on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                ..Default::default()
            },
            budget_ratio: 0.2,
            budget_min_per_second: 10,
            non_idempotent: false,
        }
    }
}

impl From<&weft_api::resource::Retry> for RetryPolicy {
    fn from(r: &weft_api::resource::Retry) -> Self {
        use weft_api::resource::RetryOn as On;
        let mut on = RetryOn::default();
        for c in &r.on {
            match c {
                On::Status(s) => on.statuses.push(*s),
                On::Condition(c) => match c.as_str() {
                    "connect-failure" => on.connect_failure = true,
                    "refused-stream" => on.refused_stream = true,
                    "reset" => on.reset = true,
                    "5xx" => on.any_5xx = true,
                    "gateway-error" => on.gateway_error = true,
                    other => on.grpc_codes.extend(grpc_code(other)),
                },
            }
        }
        let defaults = RetryPolicy::default();
        RetryPolicy {
            retries: r.attempts,
            per_try_timeout: r.per_try_timeout.map(|t| t.as_std()),
            on,
            budget_ratio: r.budget.as_ref().map(|b| b.ratio / 100.0).unwrap_or(defaults.budget_ratio),
            budget_min_per_second: r
                .budget
                .as_ref()
                .map(|b| b.min_per_second)
                .unwrap_or(defaults.budget_min_per_second),
            non_idempotent: r.non_idempotent,
        }
    }
}

impl RetryPolicy {
    /// Whether an answered request should be retried, from its status and (for a gRPC
    /// trailers-only answer) its `grpc-status`.
    pub(crate) fn retry_status(&self, status: u16, grpc_status: Option<u32>) -> bool {
        (self.on.any_5xx && status >= 500)
            || (self.on.gateway_error && matches!(status, 502..=504))
            || self.on.statuses.contains(&status)
            || grpc_status.is_some_and(|c| self.on.grpc_codes.contains(&c))
    }

    /// Whether any condition needs the request to have reached the app (so its method matters).
    pub(crate) fn after_send(&self) -> bool {
        self.on.reset || self.on.any_5xx || self.on.gateway_error || !self.on.statuses.is_empty() || !self.on.grpc_codes.is_empty()
    }
}

/// gRPC status code by its retry-condition name.
pub(crate) fn grpc_code(name: &str) -> Option<u32> {
    Some(match name {
        "cancelled" => 1,
        "unknown" => 2,
        "deadline-exceeded" => 4,
        "resource-exhausted" => 8,
        "aborted" => 10,
        "internal" => 13,
        "unavailable" => 14,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(yaml: &str) -> Vec<CompiledRoute> {
        let p: TrafficPolicySpec = serde_saphyr::from_str(yaml).unwrap();
        compile(Some(&p))
    }

    fn parts(method: &str, path: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn route<'a>(rs: &'a [CompiledRoute], d: &'a CompiledRoute, p: Parts) -> &'a str {
        &decide(rs, d, &p).name
    }

    #[test]
    fn first_match_wins_and_default_otherwise() {
        let rs = routes(
            "service: checkout-api\nroutes:\n  - name: acme\n    match: {headers: {x-tenant: acme}, pathPrefix: /api, methods: [GET]}\n    backends: [{subset: v2, weight: 100}]\n  - name: rest\n    timeout: 2s\n",
        );
        let d = CompiledRoute::default_route();
        let acme = decide(&rs, &d, &parts("GET", "/api/x", &[("x-tenant", "acme")]));
        assert_eq!((&*acme.name, acme.subset(50)), ("acme", Some("v2")));
        let post = decide(&rs, &d, &parts("POST", "/api/x", &[("x-tenant", "acme")]));
        assert_eq!(&*post.name, "rest");
        assert_eq!(post.timeout, Some(Duration::from_secs(2)));
        assert_eq!(route(&rs, &d, parts("GET", "/other", &[("x-tenant", "acme")])), "rest");
        assert_eq!(route(&[], &d, parts("GET", "/", &[])), "default");
    }

    #[test]
    fn paths_headers_and_query_by_every_kind_of_match() {
        let rs = routes(
            r#"
service: s
routes:
  - name: exact
    match: {path: /health}
  - name: regex
    match: {pathRegex: "/users/[0-9]+"}
  - name: header-prefix
    match: {headers: {x-user: {prefix: "beta-"}}}
  - name: header-regex
    match: {headers: {x-order: {regex: "[A-Z]{2}-[0-9]+"}}}
  - name: header-present
    match: {headers: {x-debug: {present: true}}}
  - name: query
    match: {query: {tier: gold, q: {prefix: "a b"}}}
  - name: query-present
    match: {query: {trace: {present: true}}}
"#,
        );
        let d = CompiledRoute::default_route();
        let r = |p| route(&rs, &d, p).to_string();
        assert_eq!(r(parts("GET", "/health", &[])), "exact");
        assert_eq!(r(parts("GET", "/health/x", &[])), "default");
        assert_eq!(r(parts("GET", "/users/42", &[])), "regex");
        assert_eq!(
            r(parts("GET", "/users/42/orders", &[])),
            "default",
            "a regex matches the whole path"
        );
        assert_eq!(r(parts("GET", "/", &[("x-user", "beta-7")])), "header-prefix");
        assert_eq!(r(parts("GET", "/", &[("x-user", "alpha-7")])), "default");
        assert_eq!(r(parts("GET", "/", &[("x-order", "EU-17")])), "header-regex");
        assert_eq!(r(parts("GET", "/", &[("x-order", "eu-17")])), "default");
        assert_eq!(r(parts("GET", "/", &[("x-debug", "")])), "header-present");
        assert_eq!(r(parts("GET", "/x?q=a%20bc&tier=gold", &[])), "query");
        assert_eq!(r(parts("GET", "/x?q=a+b&tier=gold", &[])), "query");
        assert_eq!(r(parts("GET", "/x?tier=gold", &[])), "default", "every query matcher must hold");
        assert_eq!(r(parts("GET", "/x?trace", &[])), "query-present");
        assert_eq!(r(parts("GET", "/x?tracer=1", &[])), "default");
    }

    #[test]
    fn weights_split_by_roll() {
        let rs = routes("service: c\nroutes:\n  - backends: [{subset: v2, weight: 10}, {subset: v1, weight: 90}]\n");
        let picks: Vec<_> = (0..100).map(|roll| rs[0].subset(roll).unwrap()).collect();
        assert_eq!(picks.iter().filter(|s| **s == "v2").count(), 10);
        assert_eq!(picks.iter().filter(|s| **s == "v1").count(), 90);
    }

    #[test]
    fn retry_conditions_compile_to_flags_and_codes() {
        let rs = routes("service: c\nroutes:\n  - retry: {attempts: 3, on: [503, unavailable, gateway-error]}\n");
        let p = &rs[0].retry;
        assert_eq!(p.retries, 3);
        assert!(p.retry_status(503, None) && p.retry_status(504, None) && !p.retry_status(500, None));
        assert!(p.retry_status(200, Some(14)) && !p.retry_status(200, Some(13)));
        assert!(!p.on.connect_failure && p.after_send());
        let d = RetryPolicy::default();
        assert!(d.on.connect_failure && !d.after_send() && d.retries == DEFAULT_RETRIES);
    }
}

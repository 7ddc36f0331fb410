//! Inbound authorization: who may call what on this workload.
//!
//! The request path is normalized once (percent-decoding of unreserved characters, dot-segments
//! resolved, duplicate slashes collapsed; an encoded `/` or `\`, or a raw `\`, is rejected), and
//! that one canonical form is both matched against the rules and forwarded to the app, so no
//! spelling of a denied path can reach it. A path whose `..` would climb above the root has no
//! canonical form and is refused too. The outbound side routes on the same form
//! ([`canonical_uri`]), so a route and a callee's authorization never read one path two ways. A matching deny rule wins, then a matching allow
//! rule, then the policy's default.

use weft_api::resource::{Action, Authorization, AuthzRule};

/// The outcome for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) action: Action,
    /// Index of the deciding rule; `None` when the default decided.
    pub(crate) rule: Option<usize>,
}

/// The canonical form of a request path, or why it is refused.
pub fn normalize(path: &str) -> Result<String, &'static str> {
    if !path.starts_with('/') {
        return Err("the path must start with '/'");
    }
    if path.contains('\\') {
        return Err("'\\' in the path");
    }
    // Bytes, not chars: a raw UTF-8 path (`/café`, which HTTP parsers accept) passes through
    // byte for byte. Only ASCII is ever decoded or rewritten, so the result is still UTF-8.
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = path
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or("a malformed percent-encoding")?;
            let v = u8::from_str_radix(hex, 16).expect("hex checked");
            match v {
                b'/' | b'\\' => return Err("an encoded '/' or '\\' in the path"),
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => decoded.push(v),
                _ => {
                    decoded.push(b'%');
                    decoded.extend_from_slice(hex.to_ascii_uppercase().as_bytes());
                }
            }
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(decoded).expect("UTF-8 in, only ASCII changed");
    let trailing = decoded.ends_with('/') && decoded.len() > 1;
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop().ok_or("'..' climbs above the root")?;
            }
            s => segments.push(s),
        }
    }
    let mut out = format!("/{}", segments.join("/"));
    if trailing && !segments.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// `uri` with its path in canonical form ([`normalize`]) and its query as sent, or why the path
/// has none. A target without a path (`CONNECT`'s authority, `OPTIONS *`) is kept as it is.
pub(crate) fn canonical_uri(uri: &http::Uri) -> Result<http::Uri, &'static str> {
    if uri.path_and_query().is_none_or(|pq| pq.as_str() == "*") {
        return Ok(uri.clone());
    }
    let path = normalize(uri.path())?;
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().map_err(|_| "the canonical path is not a valid URI")?);
    http::Uri::from_parts(parts).map_err(|_| "the canonical path is not a valid URI")
}

/// Decides a request. `peer` is the caller's SPIFFE ID (none over plaintext); `path` is
/// already normalized.
pub(crate) fn evaluate(authz: &Authorization, peer: Option<&str>, method: &str, path: &str) -> Verdict {
    let matching = |action: Action| {
        authz
            .rules
            .iter()
            .position(|r| r.action == action && matches(r, peer, method, path))
    };
    if let Some(i) = matching(Action::Deny) {
        return Verdict {
            action: Action::Deny,
            rule: Some(i),
        };
    }
    if let Some(i) = matching(Action::Allow) {
        return Verdict {
            action: Action::Allow,
            rule: Some(i),
        };
    }
    Verdict {
        action: authz.default,
        rule: None,
    }
}

fn matches(rule: &AuthzRule, peer: Option<&str>, method: &str, path: &str) -> bool {
    if let Some(from) = &rule.from
        && (!from.identities.is_empty() || !from.namespaces.is_empty())
    {
        let Some(peer) = peer else { return false };
        if !from.identities.is_empty() && !from.identities.iter().any(|id| id == "*" || id == peer) {
            return false;
        }
        if !from.namespaces.is_empty() && !namespace_of(peer).is_some_and(|ns| from.namespaces.iter().any(|n| n == ns)) {
            return false;
        }
    }
    if let Some(to) = &rule.to {
        if !to.methods.is_empty() && !to.methods.iter().any(|m| m == method) {
            return false;
        }
        if !to.paths.is_empty() && !to.paths.iter().any(|p| path_matches(p, path)) {
            return false;
        }
    }
    true
}

/// `/api/*` matches everything under `/api/`; anything else matches exactly.
fn path_matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => pattern == path,
    }
}

/// The namespace of `spiffe://<td>/ns/<ns>/sa/<sa>`.
fn namespace_of(spiffe: &str) -> Option<&str> {
    let rest = spiffe.strip_prefix("spiffe://")?;
    let mut parts = rest.split('/').skip(1);
    (parts.next()? == "ns").then(|| parts.next()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_path_has_one_canonical_form() {
        for (raw, canonical) in [
            ("/api/orders", "/api/orders"),
            ("//api///orders", "/api/orders"),
            ("/api/./orders", "/api/orders"),
            ("/public/../api/orders", "/api/orders"),
            ("/%61pi/%6Frders", "/api/orders"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/%2E/orders/", "/api/orders/"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/caf\u{e9}/./men\u{fc}", "/caf\u{e9}/men\u{fc}"),
            ("/", "/"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(canonical), "{raw}");
        }
        let bad = [
            "/admin%2fsecret",
            "/admin%5Csecret",
            "/admin\\secret",
            "/a%zz",
            "/a%4",
            "relative",
            "/../../etc",
            "/api/../../admin",
            "/%2e%2e/admin",
        ];
        for bad in bad {
            assert!(normalize(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn a_target_keeps_its_form_and_query_with_its_path_made_canonical() {
        for (raw, canonical) in [
            ("http://shop/api/%2e%2e/admin?next=/api/../x", "http://shop/admin?next=/api/../x"),
            ("//api/./orders", "/api/orders"),
            ("shop:80", "shop:80"),
            ("*", "*"),
        ] {
            let uri: http::Uri = raw.parse().unwrap();
            assert_eq!(canonical_uri(&uri).map(|u| u.to_string()).as_deref(), Ok(canonical), "{raw}");
        }
        assert!(canonical_uri(&"http://shop/../admin".parse().unwrap()).is_err());
    }

    #[test]
    fn deny_wins_then_allow_then_default() {
        let authz: Authorization = serde_saphyr::from_str(
            "default: deny\nrules:\n  - action: allow\n    from: {identities: [\"spiffe://weft.local/ns/default/sa/mobile-gateway\"], namespaces: [default]}\n    to: {paths: [\"/api/*\"], methods: [GET]}\n  - action: deny\n    to: {paths: [\"/api/admin/*\"]}\n",
        )
        .unwrap();
        let gw = Some("spiffe://weft.local/ns/default/sa/mobile-gateway");
        assert_eq!(
            evaluate(&authz, gw, "GET", "/api/orders"),
            Verdict {
                action: Action::Allow,
                rule: Some(0)
            }
        );
        assert_eq!(
            evaluate(&authz, gw, "GET", "/api/admin/x"),
            Verdict {
                action: Action::Deny,
                rule: Some(1)
            }
        );
        assert_eq!(evaluate(&authz, gw, "POST", "/api/orders").action, Action::Deny);
        assert_eq!(
            evaluate(&authz, Some("spiffe://weft.local/ns/default/sa/other"), "GET", "/api/orders").action,
            Action::Deny
        );
        assert_eq!(
            evaluate(&authz, None, "GET", "/api/orders"),
            Verdict {
                action: Action::Deny,
                rule: None
            },
            "plaintext has no identity"
        );
        assert_eq!(namespace_of("spiffe://weft.local/ns/prod/sa/x"), Some("prod"));
    }
}

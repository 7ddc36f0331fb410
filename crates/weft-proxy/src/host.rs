//! Host names: which mesh service a request's authority names. The forms are the contract of
//! DESIGN.md §8 (#10); anything else is not a mesh name and is refused, never guessed at (taking
//! the first label of `orders.evil.com` sent the request to `orders` in the caller's namespace).
//!
//! Accepted, each with or without `:PORT`, in any case, with or without one trailing dot:
//!
//! | form                                  | service                       |
//! |---------------------------------------|-------------------------------|
//! | `NAME`                                | `NAME` in the caller's namespace |
//! | `NAME.NAMESPACE`                      | `NAME` in `NAMESPACE`         |
//! | `NAME.NAMESPACE.svc`                  | the same                      |
//! | `NAME.NAMESPACE.svc.TRUST_DOMAIN`     | the same (fully qualified)    |
//!
//! `NAME` and `NAMESPACE` are DNS labels (1-63 of `a-z`, `0-9`, `-`, not starting or ending with
//! `-`); `TRUST_DOMAIN` is the mesh's SPIFFE trust domain (`weft control --trust-domain`,
//! `weft.local` by default). IP literals are never mesh names.

use std::fmt;
use std::net::Ipv4Addr;

/// The trust domain a proxy assumes until it holds a certificate that says otherwise (the
/// default of `weft control --trust-domain`).
pub(crate) const DEFAULT_TRUST_DOMAIN: &str = "weft.local";

/// The accepted forms, for the replies that refuse a host.
pub(crate) const FORMS: &str =
    "NAME (in the caller's namespace), NAME.NAMESPACE, NAME.NAMESPACE.svc or NAME.NAMESPACE.svc.TRUST_DOMAIN, each with an optional :PORT";

/// A mesh service: its namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

/// Why an authority names no mesh service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownService {
    /// The authority as the request gave it.
    pub authority: String,
    pub why: Why,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    Empty,
    IpLiteral,
    BadPort,
    BadLabel,
    /// Well-formed labels, but not one of the forms (`orders.evil.com`, another trust domain).
    NotAMeshForm,
}

/// Reads `authority` (a `Host` or `:authority` value) as a mesh service name. `caller_namespace`
/// is where a bare `NAME` lives; `trust_domain` completes the fully qualified form. Whether the
/// service exists is the control plane's to say: this only reads the name.
pub fn resolve(authority: &str, caller_namespace: &str, trust_domain: &str) -> Result<ServiceRef, UnknownService> {
    let refuse = |why| UnknownService {
        authority: authority.to_string(),
        why,
    };
    let host = strip_port(authority).map_err(refuse)?;
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(refuse(Why::Empty));
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return Err(refuse(Why::IpLiteral));
    }
    let mut labels = host.split('.');
    let name = labels.next().unwrap_or_default();
    let namespace = labels.next();
    if !is_label(name) || !namespace.is_none_or(is_label) {
        return Err(refuse(Why::BadLabel));
    }
    let rest: Vec<&str> = labels.collect();
    let qualified = match rest.split_first() {
        None => true,
        Some((svc, domain)) => svc.eq_ignore_ascii_case("svc") && (domain.is_empty() || same_domain(domain, trust_domain)),
    };
    if !qualified {
        return Err(refuse(Why::NotAMeshForm));
    }
    Ok(ServiceRef {
        namespace: namespace.unwrap_or(caller_namespace).to_ascii_lowercase(),
        name: name.to_ascii_lowercase(),
    })
}

/// The host part of `authority`: without a `:PORT` (digits, at most 65535), refusing IPv6
/// literals, bracketed or not.
fn strip_port(authority: &str) -> Result<&str, Why> {
    if authority.starts_with('[') || authority.matches(':').count() > 1 {
        return Err(Why::IpLiteral);
    }
    match authority.split_once(':') {
        None => Ok(authority),
        Some((host, port)) => {
            let valid = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok();
            if valid { Ok(host) } else { Err(Why::BadPort) }
        }
    }
}

/// A DNS label as Kubernetes names are (RFC 1123), in any case.
fn is_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !s.starts_with('-') && !s.ends_with('-')
}

/// Whether the labels `domain` spell `trust_domain`, ignoring case.
fn same_domain(domain: &[&str], trust_domain: &str) -> bool {
    let mut expected = trust_domain.split('.');
    domain
        .iter()
        .all(|label| expected.next().is_some_and(|e| e.eq_ignore_ascii_case(label)))
        && expected.next().is_none()
}

// === impl ServiceRef ===

impl ServiceRef {
    /// How a proxy asks the control plane for it, and how a config keys it: `NAMESPACE/NAME`.
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

// === impl Why ===

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Why::Empty => "it is empty",
            Why::IpLiteral => "an IP address is not a mesh name",
            Why::BadPort => "its port is not a number from 0 to 65535",
            Why::BadLabel => "its name and namespace must be DNS labels (letters, digits and '-')",
            Why::NotAMeshForm => "it is not one of the mesh's forms",
        })
    }
}

impl fmt::Display for UnknownService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "host {:?} names no mesh service ({}); a mesh host is {FORMS}",
            self.authority, self.why
        )
    }
}

impl std::error::Error for UnknownService {}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(authority: &str) -> (String, String) {
        let r = resolve(authority, "shop", "weft.local").unwrap_or_else(|e| panic!("{authority}: {e}"));
        (r.namespace, r.name)
    }

    fn refused(authority: &str) -> Why {
        match resolve(authority, "shop", "weft.local") {
            Ok(r) => panic!("{authority} resolved to {r}"),
            Err(e) => {
                assert_eq!(e.authority, authority);
                e.why
            }
        }
    }

    fn pair(ns: &str, name: &str) -> (String, String) {
        (ns.to_string(), name.to_string())
    }

    #[test]
    fn a_bare_name_is_in_the_callers_namespace() {
        assert_eq!(ok("orders"), pair("shop", "orders"));
        assert_eq!(ok("orders:8080"), pair("shop", "orders"));
        assert_eq!(ok("Orders-API."), pair("shop", "orders-api"));
        assert_eq!(ok("orders.:80"), pair("shop", "orders"));
        assert_eq!(ok("o"), pair("shop", "o"));
        assert_eq!(ok("2fa"), pair("shop", "2fa"), "a label may start with a digit");
    }

    #[test]
    fn a_namespace_names_its_own_namespace() {
        assert_eq!(ok("orders.evil"), pair("evil", "orders"));
        assert_eq!(ok("orders.evil:443"), pair("evil", "orders"));
        assert_eq!(ok("ORDERS.Evil."), pair("evil", "orders"));
        assert_eq!(
            ok("example.com"),
            pair("com", "example"),
            "well-formed; the control plane says it is unknown"
        );
    }

    #[test]
    fn svc_and_the_trust_domain_qualify_the_name() {
        assert_eq!(ok("orders.evil.svc"), pair("evil", "orders"));
        assert_eq!(ok("orders.evil.SVC:8080"), pair("evil", "orders"));
        assert_eq!(ok("orders.evil.svc."), pair("evil", "orders"));
        assert_eq!(ok("orders.evil.svc.weft.local"), pair("evil", "orders"));
        assert_eq!(ok("orders.evil.svc.Weft.Local.:80"), pair("evil", "orders"));
        let other = resolve("orders.evil.svc.corp.example", "shop", "corp.example").unwrap();
        assert_eq!((other.namespace.as_str(), other.name.as_str()), ("evil", "orders"));
    }

    #[test]
    fn other_domains_are_not_mesh_names() {
        assert_eq!(refused("httpbe.evil.com"), Why::NotAMeshForm);
        assert_eq!(refused("orders.evil.svc.cluster.local"), Why::NotAMeshForm);
        assert_eq!(refused("orders.evil.svc.weft"), Why::NotAMeshForm, "a prefix of the trust domain");
        assert_eq!(
            refused("orders.evil.svc.weft.local.evil"),
            Why::NotAMeshForm,
            "the trust domain and more"
        );
        assert_eq!(refused("orders.evil.cluster"), Why::NotAMeshForm);
        assert_eq!(refused("www.example.co.uk"), Why::NotAMeshForm);
    }

    #[test]
    fn ip_literals_are_not_mesh_names() {
        assert_eq!(refused("127.0.0.1"), Why::IpLiteral);
        assert_eq!(refused("10.0.0.7:8080"), Why::IpLiteral);
        assert_eq!(refused("[::1]"), Why::IpLiteral);
        assert_eq!(refused("[::1]:80"), Why::IpLiteral);
        assert_eq!(refused("::1"), Why::IpLiteral);
        assert_eq!(refused("fe80::1:80"), Why::IpLiteral);
    }

    #[test]
    fn malformed_authorities_are_refused() {
        assert_eq!(refused(""), Why::Empty);
        assert_eq!(refused("."), Why::Empty);
        assert_eq!(refused(":80"), Why::Empty);
        assert_eq!(refused("orders:"), Why::BadPort);
        assert_eq!(refused("orders:http"), Why::BadPort);
        assert_eq!(refused("orders:65536"), Why::BadPort);
        assert_eq!(refused("orders:+80"), Why::BadPort);
        assert_eq!(refused("orders:000080"), Why::BadPort);
        assert_eq!(refused("orders..evil"), Why::BadLabel);
        assert_eq!(refused(".orders"), Why::BadLabel);
        assert_eq!(refused("orders.."), Why::BadLabel, "one trailing dot only");
        assert_eq!(refused("-orders"), Why::BadLabel);
        assert_eq!(refused("orders-.evil"), Why::BadLabel);
        assert_eq!(refused("ord_ers"), Why::BadLabel);
        assert_eq!(refused("user@orders"), Why::BadLabel);
        assert_eq!(refused(&"a".repeat(64)), Why::BadLabel);
        assert_eq!(refused("ordérs"), Why::BadLabel);
        assert_eq!(refused("orders evil"), Why::BadLabel);
    }

    /// Every combination of form, port, case and trailing dot resolves to the same service.
    #[test]
    fn every_spelling_of_every_form_resolves_alike() {
        let mut checked = 0;
        for (name, namespace) in [("orders", "evil"), ("a", "b"), ("x-1", "ns-2"), (&*"n".repeat(63), "shop")] {
            let forms = [
                (name.to_string(), "shop"),
                (format!("{name}.{namespace}"), namespace),
                (format!("{name}.{namespace}.svc"), namespace),
                (format!("{name}.{namespace}.svc.weft.local"), namespace),
            ];
            for (host, expected_ns) in &forms {
                for port in ["", ":0", ":80", ":65535"] {
                    for dot in ["", "."] {
                        for upper in [false, true] {
                            let mut authority = format!("{host}{dot}{port}");
                            if upper {
                                authority = authority.to_ascii_uppercase();
                            }
                            let r = resolve(&authority, "shop", "weft.local").unwrap_or_else(|e| panic!("{e}"));
                            assert_eq!((r.namespace.as_str(), r.name.as_str()), (*expected_ns, name), "{authority}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 4 * 4 * 4 * 2 * 2);
    }

    /// Arbitrary input never panics, and whatever resolves is made of DNS labels (a cheap
    /// stand-in for the fuzz target, on a fixed seed so it is the same every run).
    #[test]
    fn arbitrary_authorities_never_panic_and_resolve_only_to_labels() {
        const ALPHABET: &[u8] = b"ab-.:[]09Zz\x00\xc3\xa9@/ ";
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 24) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize]).collect();
            let authority = String::from_utf8_lossy(&bytes);
            if let Ok(r) = resolve(&authority, "shop", "weft.local") {
                assert!(is_label(&r.name) && is_label(&r.namespace), "{authority:?} -> {r}");
                assert_eq!(r.name, r.name.to_ascii_lowercase());
            }
        }
    }

    #[test]
    fn the_refusal_names_the_host_and_the_forms() {
        let e = resolve("httpbe.evil.com", "default", "weft.local").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("\"httpbe.evil.com\"") && text.contains(FORMS), "{text}");
    }
}

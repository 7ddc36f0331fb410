//! Host resolution: the mesh service an outbound request's authority names
//! ([`weft_proxy::host::resolve`]). The input is the `Host` header or `:authority` as sent. What
//! must hold for any input: no panic; an accepted name is made of DNS labels (a-z, 0-9, `-`,
//! 1-63 long) and is named by the authority itself, its namespace either named there too or the
//! caller's; and the answer does not depend on case or on one trailing dot.

use weft_proxy::host::{ServiceRef, resolve};

const CALLER: &str = "callerns";
const TRUST_DOMAIN: &str = "weft.local";

pub fn run(data: &[u8]) {
    let Ok(authority) = std::str::from_utf8(data) else { return };
    let answer = resolve(authority, CALLER, TRUST_DOMAIN);
    let lower = authority.to_ascii_lowercase();
    assert_eq!(
        answer.as_ref().ok(),
        resolve(&lower, CALLER, TRUST_DOMAIN).as_ref().ok(),
        "{authority:?}: case changed the answer"
    );
    let Ok(ServiceRef { namespace, name }) = answer else { return };
    for label in [&namespace, &name] {
        assert!(is_label(label), "{authority:?} resolved to a non-label {label:?}");
    }
    assert!(
        lower.starts_with(&name),
        "{authority:?} resolved to {name:?}, which it does not name"
    );
    assert!(
        namespace == CALLER || lower.contains(&format!(".{namespace}")),
        "{authority:?} resolved to namespace {namespace:?}, neither named nor the caller's"
    );
}

fn is_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

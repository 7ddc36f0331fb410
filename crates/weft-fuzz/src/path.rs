//! Path normalisation ([`weft_proxy::authz::normalize`]): the one canonical form authorization
//! matches and the app receives.
//!
//! Properties: a canonical path starts with `/`, has no `.`/`..` segment and no empty segment
//! (a path climbing above the root has none), and is its own canonical form.

use weft_proxy::authz::normalize;

pub fn run(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let Ok(canonical) = normalize(path) else { return };
    check(path, &canonical);
}

/// Panics unless `canonical` is a canonical form (see the module's properties).
pub fn check(raw: &str, canonical: &str) {
    assert!(canonical.starts_with('/'), "{raw:?} -> {canonical:?} does not start at the root");
    let inner = canonical[1..].strip_suffix('/').unwrap_or(&canonical[1..]);
    if !inner.is_empty() {
        for segment in inner.split('/') {
            assert!(
                !matches!(segment, "" | "." | ".."),
                "{raw:?} -> {canonical:?} keeps the segment {segment:?}"
            );
        }
    }
    assert_eq!(
        normalize(canonical).as_deref(),
        Ok(canonical),
        "{raw:?} -> {canonical:?} is not its own canonical form"
    );
}

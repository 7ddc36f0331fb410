//! Host resolution: the service an outbound request's authority names
//! ([`weft_proxy::service_name`]). The input is the `Host` header or `:authority` as sent; the
//! proxy lowercases it first, as here. Kept thin on purpose: when the resolution becomes a richer
//! function, this target calls that one instead.

pub fn run(data: &[u8]) {
    let Ok(host) = std::str::from_utf8(data) else { return };
    let authority = host.to_ascii_lowercase();
    let service = weft_proxy::service_name(&authority);
    assert!(
        authority.starts_with(service),
        "{authority:?} resolved to {service:?}, which it does not name"
    );
}

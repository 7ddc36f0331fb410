//! Route matching ([`weft_proxy::route`]): a TrafficPolicy compiled as a proxy compiles it, and a
//! request matched against it.
//!
//! The input is a request head, a blank line, then the policy's spec (YAML or JSON):
//!
//! ```text
//! GET /api/orders?tier=gold
//! x-tenant: acme
//!
//! service: orders
//! routes: [...]
//! ```
//!
//! Only specs that pass validation are compiled: a proxy never receives any other. Property: the
//! chosen route's subsets cover exactly the weights it lists.

use weft_api::resource::TrafficPolicySpec;
use weft_proxy::route::{CompiledRoute, compile, decide};

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Some((head, policy)) = text.split_once("\n\n") else { return };
    let Some(request) = request(head) else { return };
    let Ok(spec) = serde_saphyr::from_str::<TrafficPolicySpec>(policy) else {
        return;
    };
    let mut errors = Vec::new();
    spec.validate("spec", &mut errors);
    if !errors.is_empty() {
        return;
    }
    let routes = compile(Some(&spec));
    let default = CompiledRoute::default_route();
    let chosen = decide(&routes, &default, &request);
    let picks = (0..100).filter(|roll| chosen.subset(*roll).is_some()).count();
    let weights: u32 = chosen.backends.iter().map(|b| b.weight).sum();
    assert_eq!(
        picks as u32,
        weights.min(100),
        "route {} picks a subset {picks} times in 100",
        chosen.name
    );
}

/// `METHOD TARGET` then `name: value` lines, as request parts; `None` when http refuses them.
fn request(head: &str) -> Option<http::request::Parts> {
    let mut lines = head.lines();
    let (method, target) = lines.next()?.split_once(' ')?;
    let mut builder = http::Request::builder().method(method).uri(target);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        builder = builder.header(name.trim(), value.trim());
    }
    Some(builder.body(()).ok()?.into_parts().0)
}

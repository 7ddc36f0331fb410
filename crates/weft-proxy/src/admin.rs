//! The admin listener's view of a proxy: metrics, readiness and `/config_dump`.

use crate::state::Proxy;
use std::sync::Arc;

pub(crate) fn admin(proxy: &Arc<Proxy>) -> weft_core::admin::Admin {
    let me = proxy.clone();
    weft_core::admin::Admin {
        registry: proxy.telemetry.registry.clone(),
        ready: proxy.discovery.ready.ready.clone(),
        config_dump: Some(Box::new(move || config_dump(&me))),
    }
}

/// The whole running config as JSON (never secrets).
fn config_dump(proxy: &Proxy) -> String {
    let local = &proxy.local;
    let dump = serde_json::json!({
        "workload": local.workload,
        "service": local.workload.service(),
        "listeners": {
            "inbound": local.bound.inbound,
            "outbound": local.bound.outbound,
            "admin": local.bound.admin,
            "app": local.app,
            "appProtocol": local.app_protocol,
            "advertise": local.advertise,
        },
        "control": proxy.link.as_ref().map(|l| serde_json::json!({
            "url": l.url, "current": l.current_url(), "tls": l.tls(), "pinnedCa": l.pinned(), "trustsBundle": l.trusts_bundle(),
        })),
        "trustHeaders": {
            "stripped": crate::forward::IDENTITY_HEADERS,
            "stripHeaders": local.strip_headers.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
            "identityHeader": crate::forward::CLIENT_CERT,
        },
        "identity": proxy.identity.tls().map(|t| serde_json::json!({"spiffeId": t.identity, "serial": t.serial, "notAfter": t.not_after})),
        "subscriptions": proxy.discovery.subscriptions(),
        "lastNack": *proxy.discovery.last_nack.lock(),
        "config": *proxy.discovery.config(),
    });
    serde_json::to_string_pretty(&dump).expect("config serializes")
}

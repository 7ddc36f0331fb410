//! What the fuzzers found, asserted as behaviour (the crashing inputs themselves are replayed
//! from `fuzz/regressions/` by `replay.rs`).

use weft_api::proto::{self, proxy_message::Msg};
use weft_control::distribution::receive;
use weft_fuzz::fixture;

fn report(requests: u64, errors: u64) -> Msg {
    Msg::Telemetry(proto::TelemetryReport {
        interval_ms: 1000,
        stats: vec![proto::TrafficStats {
            direction: proto::Direction::Outbound as i32,
            service: "payments".into(),
            requests,
            errors,
            route: "default".into(),
            latency_slots: vec![100, 200],
            latency_counts: vec![requests / 2, requests - requests / 2],
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// Found by `proxy_message`: a report with more errors than requests reached `weft top`'s view,
/// whose success count (requests - errors) underflowed: a panic in a debug build, a success
/// rate of about 1.8e19 % in a release build.
#[test]
fn a_telemetry_report_with_more_errors_than_requests_is_refused_and_changes_nothing() {
    let mesh = fixture::mesh();
    let register = proto::Register {
        namespace: "default".into(),
        name: "orders".into(),
        inbound_addr: "127.0.0.1:15006".into(),
        ..Default::default()
    };
    let (conn, _) = mesh.register(&register, mesh.ca.identity("default", "orders")).expect("registered");
    assert_eq!(receive(&mesh, conn, report(10, 11)).ok(), Some(false));
    assert!(mesh.routes().is_empty(), "a contradictory report was recorded: {:?}", mesh.routes());

    receive(&mesh, conn, report(10, 1)).expect("a report is received");
    let routes = mesh.routes();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0].success_rate, Some(90.0));

    // Totals past u64::MAX saturate rather than wrap.
    receive(&mesh, conn, report(u64::MAX, 0)).expect("a report is received");
    receive(&mesh, conn, report(u64::MAX, 0)).expect("a report is received");
    let routes = mesh.routes();
    assert_eq!(routes[0].success_rate, Some(100.0), "{routes:?}");
    assert!(routes[0].p99_ms.is_some_and(f64::is_finite), "{routes:?}");
}

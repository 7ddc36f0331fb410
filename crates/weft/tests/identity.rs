//! End-to-end tests of identity, mTLS and authorization: the real control plane (with a root
//! the test owns, so it can mint good and bad certificates) and real proxies.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use serde_json::Value;
use std::time::{Duration, Instant};
use weft_api::proto::{self, distribution_client::DistributionClient};
use weft_test::apps::EchoServer;
use weft_test::http::Client;
use weft_test::load::Load;
use weft_test::pki::{Pki, mtls_get, tls_server};
use weft_test::{Control, ProxyHandle, eventually, free_addr};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

async fn control_with_root(pki: &Pki, extra: &[&str]) -> Control {
    let dir = std::env::temp_dir().join(format!("weft-pki-{}-{}", std::process::id(), rand::random::<u32>()));
    let (cert, key) = pki.write(&dir);
    let mut args = vec![
        "--root-cert".to_string(),
        cert.display().to_string(),
        "--root-key".into(),
        key.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Control::start_with(BIN, &args).await
}

async fn get_via(proxy: &ProxyHandle, service: &str, method: &str, path: &str) -> weft_test::http::Reply {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", proxy.outbound))
        .header("host", service)
        .body(Full::new(Bytes::new()))
        .unwrap();
    Client::new().send(req).await.expect("outbound answers")
}

async fn apply(control: &Control, yaml: &str) -> u64 {
    let (status, body) = control.post("/api/v1/resources", yaml).await;
    assert_eq!(status, 200, "{body}");
    body["revision"].as_u64().unwrap()
}

async fn on_revision(p: &ProxyHandle, rev: u64) {
    eventually(Duration::from_secs(15), &format!("{} on revision {rev}", p.workload), || async {
        (p.config_dump().await["config"]["revision"] == rev).then_some(())
    })
    .await;
}

const ID_TESTER: &str = "spiffe://weft.local/ns/default/sa/tester";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_between_sidecars_with_strict_permissive_and_bad_certificates() {
    let pki = Pki::new("test root");
    let control = control_with_root(&pki, &[]).await;
    let app = EchoServer::start("orders").await;
    let orders = ProxyHandle::start(BIN, &control, "default/orders", "cluster-a", &[], app.addr).await;
    let web = ProxyHandle::start(BIN, &control, "default/web", "cluster-a", &[], free_addr()).await;
    assert_eq!(get_via(&web, "orders", "GET", "/hello").await.status, 200);
    assert_eq!(
        orders.config_dump().await["identity"]["spiffeId"],
        "spiffe://weft.local/ns/default/sa/orders"
    );
    // Metrics carry both identities: the caller's at the destination, the endpoint's at the caller.
    let inbound = orders.metrics().await;
    assert!(
        inbound.lines().any(|l| l.starts_with("weft_proxy_requests_total{")
            && l.contains(r#"direction="inbound""#)
            && l.contains(r#"peer="spiffe://weft.local/ns/default/sa/web""#)),
        "{inbound}"
    );
    let outbound = web.metrics().await;
    assert!(
        outbound.lines().any(|l| l.starts_with("weft_proxy_requests_total{")
            && l.contains(r#"direction="outbound""#)
            && l.contains(r#"peer="spiffe://weft.local/ns/default/sa/orders""#)),
        "{outbound}"
    );

    // What the orders sidecar accepts over TLS: only certificates of this mesh's CA, in date.
    let good = pki.leaf(ID_TESTER, -60, 3600);
    assert_eq!(mtls_get(orders.inbound, Some(&good), "orders", "/direct").await, Ok(200));
    // A peer's x-weft-app-port counts only at a sidecar that intercepts (and so already fronts
    // every port of its app); this one fronts one declared port, so the declared app answers.
    let other_port = EchoServer::start("other-port").await;
    let before = app.headers.lock().len();
    let head = format!(
        "GET /direct HTTP/1.1\r\nhost: orders\r\nx-weft-app-port: {}\r\n\r\n",
        other_port.addr.port()
    );
    let answer = weft_test::pki::mtls_h1_raw(orders.inbound, &good, &head).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        other_port.headers.lock().len(),
        0,
        "no peer reaches another port of the host through the sidecar"
    );
    assert_eq!(app.headers.lock().len(), before + 1, "the declared app answered");
    for (what, leaf) in [
        ("a foreign CA", Some(Pki::new("foreign root").leaf(ID_TESTER, -60, 3600))),
        ("an expired certificate", Some(pki.leaf(ID_TESTER, -7200, -3600))),
        ("a not-yet-valid certificate", Some(pki.leaf(ID_TESTER, 3600, 7200))),
        ("no client certificate", None),
    ] {
        let outcome = mtls_get(orders.inbound, leaf.as_ref(), "orders", "/direct").await;
        assert!(outcome.is_err(), "{what} must fail the handshake, got {outcome:?}");
    }
    // With TLS 1.3 the client may see the refusal before the server has counted it.
    eventually(Duration::from_secs(15), "four refused handshakes counted", || async {
        let metrics = orders.metrics().await;
        metrics
            .lines()
            .any(|l| l == r#"weft_proxy_inbound_connections_total{transport="mtls",outcome="handshake-failed"} 4"#)
            .then_some(())
    })
    .await;

    // Permissive (the default): plaintext still reaches the app, and status shows the share.
    let plain = |path: &'static str| {
        let inbound = orders.inbound;
        async move {
            Client::new()
                .send(
                    Request::get(format!("http://{inbound}{path}"))
                        .header("host", "orders")
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
        }
    };
    assert_eq!(plain("/plain").await.unwrap().status, 200);
    let svc = eventually(Duration::from_secs(6), "orders' traffic in status", || async {
        let s = control.get("/api/v1/status").await;
        s["services"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == "orders" && v["mtlsShare"].is_number())
            .cloned()
    })
    .await;
    assert_eq!(svc["mtls"], "permissive");
    let share = svc["mtlsShare"].as_f64().unwrap();
    assert!(share > 0.0 && share < 100.0, "mTLS and plaintext both seen: {share}%");

    // Strict: plaintext is refused; the mesh path keeps working over mTLS.
    let rev = apply(
        &control,
        "apiVersion: weft/v1\nkind: SecurityPolicy\nmetadata: {name: orders-strict}\nspec: {selector: {service: orders}, mtls: strict}\n",
    )
    .await;
    on_revision(&orders, rev).await;
    assert!(plain("/plain-again").await.is_err(), "plaintext to a strict inbound is refused");
    assert_eq!(get_via(&web, "orders", "GET", "/still-mtls").await.status, 200);
    let svc = control.get("/api/v1/status").await["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "orders")
        .unwrap()
        .clone();
    assert_eq!(svc["mtls"], "strict");
    assert!(orders.metrics().await.contains(r#"transport="plaintext",outcome="refused-strict""#));

    // `weft check`: fine with 24h certificates; warns when asked to look further ahead.
    eventually(Duration::from_secs(6), "every proxy reported its certificate", || async {
        let proxies = control.get("/api/v1/proxies").await;
        proxies.as_array()?.iter().all(|p| p["certExpiry"].is_number()).then_some(())
    })
    .await;
    let check = |within: &str| control.cli().args(["check", "--within", within]).output().unwrap();
    let ok = check("1h");
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stdout));
    let warn = check("48h");
    let out = String::from_utf8_lossy(&warn.stdout);
    assert_eq!(warn.status.code(), Some(1));
    assert!(out.contains("default/orders#") && out.contains("certificate expires in"), "{out}");
}

/// Registers a workload of `service` at `addr` through the control stream, as a proxy would,
/// and keeps it registered (ACKing every config) until the returned task is dropped.
async fn register_endpoint(control: &Control, workload: &str, service: &str, addr: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    let token = control.token(&format!("default/{workload}"), service).await;
    let register = proto::Register {
        namespace: "default".into(),
        name: workload.into(),
        cluster: "cluster-a".into(),
        labels: [("service".to_string(), service.to_string())].into(),
        inbound_addr: addr.to_string(),
        token,
        ..Default::default()
    };
    weft_test::scripted::proxy(control.channel().await, register, weft_test::scripted::ack).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_must_present_exactly_the_identity_the_control_plane_gave() {
    let pki = Pki::new("test root");
    let control = control_with_root(&pki, &[]).await;
    let web = ProxyHandle::start(BIN, &control, "default/web", "cluster-a", &[], free_addr()).await;
    // An endpoint of "payments" whose server presents another workload's (valid) certificate.
    let impostor = tls_server(pki.leaf("spiffe://weft.local/ns/default/sa/impostor", -60, 3600)).await;
    let _reg = register_endpoint(&control, "payments-1", "payments", impostor).await;
    let r = get_via(&web, "payments", "GET", "/").await;
    assert_eq!(
        (r.status, r.header("x-weft-error").as_deref()),
        (503, Some("upstream-tls-failed")),
        "{}",
        r.text()
    );
    assert!(
        r.text().contains("expected spiffe://weft.local/ns/default/sa/payments"),
        "{}",
        r.text()
    );

    // The same kind of server presenting the right identity is accepted.
    let genuine = tls_server(pki.leaf("spiffe://weft.local/ns/default/sa/billing", -60, 3600)).await;
    let _reg2 = register_endpoint(&control, "billing-1", "billing", genuine).await;
    let r = get_via(&web, "billing", "GET", "/").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "impostor"),
        "the exact SPIFFE ID is what counts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_decides_identities_and_tokens_bind_workloads() {
    let control = Control::start(BIN).await;
    let token = control.token("default/orders", "orders").await;
    let mut client = DistributionClient::new(control.channel().await);
    // A CSR asking for `sans`: SPIFFE IDs as URI names, anything else as DNS names.
    let csr = |sans: Vec<String>| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans
            .iter()
            .map(|s| {
                if s.starts_with("spiffe://") {
                    rcgen::SanType::URI(s.as_str().try_into().unwrap())
                } else {
                    rcgen::SanType::DnsName(s.as_str().try_into().unwrap())
                }
            })
            .collect();
        params.serialize_request(&key).unwrap().pem().unwrap()
    };
    let ok = client
        .certify(proto::CertifyRequest {
            token: token.clone(),
            csr_pem: csr(vec![]),
            workload: "default/orders".into(),
        })
        .await
        .expect("a plain CSR is signed")
        .into_inner();
    assert_eq!(ok.identity, "spiffe://weft.local/ns/default/sa/orders");
    assert!(ok.not_after_unix > 0 && ok.trust_bundle_pem.contains("BEGIN CERTIFICATE"));
    for sans in [
        vec!["spiffe://weft.local/ns/default/sa/payments".to_string()],
        vec![ok.identity.clone(), "evil.example".into()],
    ] {
        let refused = client
            .certify(proto::CertifyRequest {
                token: token.clone(),
                csr_pem: csr(sans.clone()),
                workload: "default/orders".into(),
            })
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{sans:?}: {refused}");
    }
    let bad = client
        .certify(proto::CertifyRequest {
            token: format!("{token}x"),
            csr_pem: csr(vec![]),
            workload: "default/orders".into(),
        })
        .await
        .expect_err("bad token");
    assert_eq!(bad.code(), tonic::Code::Unauthenticated);
    assert!(!bad.message().contains(&token), "a token is never echoed");
    let metrics = control.metrics().await;
    assert!(metrics.lines().any(|l| l == "weft_control_csrs_refused_total 2"), "{metrics}");

    // A proxy without a token cannot even trust the control plane (the token pins its CA): it
    // refuses to start, saying so.
    let mut tokenless = ProxyHandle::spawn_url(BIN, &control.grpc_url(), None, "default/web", "a", &[], free_addr(), &[]);
    assert_eq!(tokenless.process.wait(Duration::from_secs(10)), Some(64));
    let log = tokenless.process.log_text();
    assert!(log.contains("needs the join token"), "{log}");

    // A proxy with another workload's token is refused registration.
    for (token, workload) in [(Some(token.as_str()), "default/web")] {
        let mut proxy = ProxyHandle::spawn_url(BIN, &control.grpc_url(), token, workload, "a", &[], free_addr(), &[]);
        let admin = proxy.admin;
        let p = &mut proxy.process;
        // Until the control plane has refused its stream at least once.
        eventually(Duration::from_secs(15), "the control plane refused the proxy", || async {
            p.log_text().contains("control stream down").then_some(())
        })
        .await;
        assert_eq!(control.get("/api/v1/proxies").await, serde_json::json!([]), "no proxy registered");
        let ready = Client::new()
            .get(&format!("http://{admin}/ready"))
            .await
            .map(|r| r.status)
            .unwrap_or(0);
        assert_eq!(ready, 503, "a proxy without identity is not ready");
        let log = p.log_text();
        assert!(!token.is_some_and(|t| log.contains(t)), "the token never appears in logs");
        p.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_no_spelling_of_a_denied_path_reaches_the_app() {
    let control = Control::start(BIN).await;
    let app = EchoServer::start("orders").await;
    let orders = ProxyHandle::start(BIN, &control, "default/orders", "cluster-a", &[], app.addr).await;
    let web = ProxyHandle::start(BIN, &control, "default/web", "cluster-a", &[], free_addr()).await;
    let other = ProxyHandle::start(BIN, &control, "default/other", "cluster-a", &[], free_addr()).await;
    let policy = |mode: &str| {
        format!(
            "apiVersion: weft/v1\nkind: SecurityPolicy\nmetadata: {{name: orders-authz}}\nspec:\n  selector: {{service: orders}}\n  authorization:\n    mode: {mode}\n    default: deny\n    rules:\n      - action: allow\n        from: {{identities: [\"spiffe://weft.local/ns/default/sa/web\"], namespaces: [default]}}\n        to: {{paths: [\"/api/*\"], methods: [GET]}}\n      - action: deny\n        to: {{paths: [\"/api/admin/*\"]}}\n"
        )
    };
    let rev = apply(&control, &policy("enforce")).await;
    on_revision(&orders, rev).await;
    app.paths.lock().clear();

    let r = get_via(&web, "orders", "GET", "//api//orders?x=1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/api/orders?x=1", "the app gets the canonical path");
    for (who, method, path) in [
        (&other, "GET", "/api/orders"),
        (&web, "POST", "/api/orders"),
        (&web, "GET", "/private"),
    ] {
        let r = get_via(who, "orders", method, path).await;
        assert_eq!(
            (r.status, r.header("x-weft-error").as_deref()),
            (403, Some("authz-denied")),
            "{} {method} {path}",
            who.workload
        );
    }
    for path in [
        "/api/admin/secret",
        "//api//admin/secret",
        "/api/./admin/secret",
        "/api/x/../admin/secret",
        "/api/%61dmin/secret",
        "/api/%2e%2e/api/admin/secret",
        "/api/%2E/admin/secret",
        "/public/../api/admin/secret",
        "/api/admin/../admin/secret",
    ] {
        let r = get_via(&web, "orders", "GET", path).await;
        assert_eq!(
            (r.status, r.header("x-weft-error").as_deref()),
            (403, Some("authz-denied")),
            "{path}"
        );
    }
    for path in ["/api%2fadmin/secret", "/api/admin%2Fsecret", "/api/admin%5csecret"] {
        let r = get_via(&web, "orders", "GET", path).await;
        assert_eq!((r.status, r.header("x-weft-error").as_deref()), (400, Some("bad-path")), "{path}");
    }
    let seen = app.paths.lock().clone();
    assert_eq!(seen, ["/api/orders?x=1"], "only the allowed request reached the app");

    // Audit mode counts would-be denials and denies nothing.
    let rev = apply(&control, &policy("audit")).await;
    on_revision(&orders, rev).await;
    assert_eq!(get_via(&web, "orders", "GET", "/api/admin/secret").await.status, 200);
    let metrics = orders.metrics().await;
    assert!(
        metrics.contains(r#"weft_proxy_authz_decisions_total{decision="audit-deny"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"weft_proxy_authz_decisions_total{decision="deny"} 12"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_at_half_life_and_outlive_a_ca_outage() {
    // 1-minute certificates (the CA's shortest): renewal is due 30 s after issue.
    let mut control = Control::start_with(BIN, &["--cert-ttl".into(), "1m".into()]).await;
    let app = EchoServer::start("orders").await;
    let _orders = ProxyHandle::start(BIN, &control, "default/orders", "cluster-a", &[], app.addr).await;
    let web = ProxyHandle::start(BIN, &control, "default/web", "cluster-a", &[], free_addr()).await;
    let not_after = |d: Value| d["identity"]["notAfter"].as_u64().unwrap();
    let first = not_after(web.config_dump().await);
    assert_eq!(
        get_via(&web, "orders", "GET", "/").await.status,
        200,
        "web knows orders before the CA goes away"
    );
    let load = Load::start(web.outbound, "orders", &[], Duration::from_millis(50));
    // The CA goes away before the renewal point (30 s into a 60 s certificate)...
    control.process.kill();
    let down = Instant::now();
    // The subject: a renewal falling due while the CA is away, in the real processes, so real
    // time passes here (the timing itself is the proxy's unit test, renewal::tests, on a manual
    // clock). No fixed sleep: waits until web's own gauge says its certificate is 2 s past the
    // renewal point (30 s left), so the renewal has been tried and failed.
    eventually(Duration::from_secs(45), "web's certificate past its renewal point", || async {
        let left = weft_test::metric(&web.metrics().await, "weft_proxy_certificate_expires_in_seconds", &[]);
        (left > 0.0 && left <= 28.0).then_some(())
    })
    .await;
    let during = load.stats();
    assert_eq!(during.failed, 0, "no errors while the current certificate is valid: {during:?}");
    assert_eq!(not_after(web.config_dump().await), first, "nothing renewed without the CA");
    // ...and comes back: proxies renew by themselves.
    control.restart().await;
    eventually(Duration::from_secs(15), "renewed after the CA returned", || async {
        (not_after(web.config_dump().await) > first).then_some(())
    })
    .await;
    eprintln!(
        "CA down {:.0} s across the renewal point; renewed once it returned",
        down.elapsed().as_secs_f64()
    );
    let metrics = web.metrics().await;
    assert!(metrics.contains("weft_proxy_certificate_expires_in_seconds"), "{metrics}");
    let stats = load.stop().await;
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert!(stats.ok > 500, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_with_an_overlap_bundle_fails_no_handshake() {
    let control = Control::start(BIN).await;
    let app = EchoServer::start("orders").await;
    let orders = ProxyHandle::start(BIN, &control, "default/orders", "cluster-a", &[], app.addr).await;
    let web = ProxyHandle::start(BIN, &control, "default/web", "cluster-a", &[], free_addr()).await;
    assert_eq!(get_via(&web, "orders", "GET", "/").await.status, 200);
    let load = Load::start(web.outbound, "orders", &[], Duration::from_millis(20));
    let before = control.get("/api/v1/ca").await;
    assert_eq!(
        (before["rotation"].as_str(), before["generation"].as_u64()),
        (Some("idle"), Some(0))
    );
    let old_root = before["bundle"].as_str().unwrap().to_string();

    let (status, started) = control.post("/api/v1/ca/rotate", "").await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(started["rootsTrusted"], 2, "old and new roots are both trusted first: {started}");
    let (status, _) = control.post("/api/v1/ca/rotate", "").await;
    assert_eq!(status, 409, "one rotation at a time");
    // A proxy joining mid-rotation talks to proxies holding either root's leaves.
    let mid = ProxyHandle::start(BIN, &control, "default/mid", "cluster-a", &[], free_addr()).await;
    assert_eq!(get_via(&mid, "orders", "GET", "/").await.status, 200);

    let done = eventually(Duration::from_secs(20), "rotation finished", || async {
        let ca = control.get("/api/v1/ca").await;
        (ca["rotation"] == "idle" && ca["generation"] == 1).then_some(ca)
    })
    .await;
    assert_eq!(done["rootsTrusted"], 1, "the old root is dropped once every leaf is re-issued");
    assert_ne!(done["bundle"].as_str().unwrap(), old_root);
    // A proxy joining now trusts only the new root: every existing workload must present a new leaf.
    let late = ProxyHandle::start(BIN, &control, "default/late", "cluster-a", &[], free_addr()).await;
    assert_eq!(get_via(&late, "orders", "GET", "/").await.status, 200);
    let orders_late = ProxyHandle::start(BIN, &control, "default/orders-2", "cluster-a", &[("service", "orders")], app.addr).await;
    for caller in [&web, &mid] {
        for _ in 0..20 {
            assert_eq!(
                get_via(caller, "orders", "GET", "/after").await.status,
                200,
                "{} after rotation",
                caller.workload
            );
        }
    }
    for p in [&orders, &web, &mid, &late, &orders_late] {
        let m = p.metrics().await;
        let failed = m
            .lines()
            .any(|l| l.starts_with("weft_proxy_inbound_connections_total{") && l.contains(r#"outcome="handshake-failed""#));
        assert!(!failed, "{}: a handshake failed during rotation:\n{m}", p.workload);
        assert!(
            m.contains(r#"transport="mtls",outcome="accepted""#) || p.workload != "default/orders",
            "{m}"
        );
    }
    let stats = load.stop().await;
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert!(stats.ok > 100, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_are_one_json_line_per_request_with_both_identities() {
    let control = Control::start(BIN).await;
    let app = EchoServer::start("orders").await;
    let orders = ProxyHandle::start_logged(BIN, &control, "default/orders", "cluster-a", &[], app.addr).await;
    let web = ProxyHandle::start_logged(BIN, &control, "default/web", "cluster-a", &[], free_addr()).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    // A POST of 1,234 bytes, which the echo app sends back.
    let req = Request::post(format!("http://{}/api/x?q=1", web.outbound))
        .header("host", "orders")
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .body(Full::new(Bytes::from(vec![b'x'; 1234])))
        .unwrap();
    let reply = Client::new().send(req).await.unwrap();
    assert_eq!((reply.status, reply.body.len()), (200, 1234));
    let lines = |p: &ProxyHandle| -> Vec<Value> {
        p.process
            .log_text()
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let (out, inb) = eventually(Duration::from_secs(15), "an access log line at each hop", || async {
        let out = lines(&web)
            .into_iter()
            .find(|l| l["direction"] == "outbound" && l["traceId"] == trace)?;
        let inb = lines(&orders)
            .into_iter()
            .find(|l| l["direction"] == "inbound" && l["traceId"] == trace)?;
        Some((out, inb))
    })
    .await;
    let (web_id, orders_id) = ("spiffe://weft.local/ns/default/sa/web", "spiffe://weft.local/ns/default/sa/orders");
    assert_eq!(
        (out["source"].as_str(), out["destination"].as_str()),
        (Some(web_id), Some(orders_id)),
        "{out}"
    );
    assert_eq!(
        (out["service"].as_str(), out["path"].as_str(), out["status"].as_u64()),
        (Some("orders"), Some("/api/x"), Some(200)),
        "{out}"
    );
    assert_eq!(out["upstream"], orders.inbound.to_string());
    assert_eq!(
        (inb["source"].as_str(), inb["destination"].as_str()),
        (Some(web_id), Some(orders_id)),
        "{inb}"
    );
    assert_eq!(inb["upstream"], app.addr.to_string());
    assert!(
        out["durationMs"].as_f64().unwrap() >= inb["durationMs"].as_f64().unwrap(),
        "the caller's view includes the callee's"
    );
    for line in [&out, &inb] {
        assert_eq!(
            (line["requestBytes"].as_u64(), line["responseBytes"].as_u64()),
            (Some(1234), Some(1234)),
            "{line}"
        );
        assert_eq!(
            (line["method"].as_str(), line["retries"].as_u64()),
            (Some("POST"), Some(0)),
            "{line}"
        );
        assert!(line["totalMs"].as_f64().unwrap() >= line["durationMs"].as_f64().unwrap(), "{line}");
        assert!(line.get("rawPath").is_none(), "a canonical path has no second spelling: {line}");
    }
    // A path spelled to climb out of /api is logged as the path it was routed and authorized
    // on, with the caller's spelling beside it: never as a call under /api.
    let climbing = "5bf92f3577b34da6a3ce929d0e0e4736";
    let req = Request::get(format!("http://{}/api/%2e%2e/admin", web.outbound))
        .header("host", "orders")
        .header("traceparent", format!("00-{climbing}-00f067aa0ba902b7-01"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(Client::new().send(req).await.unwrap().status, 200);
    let (out, inb) = eventually(Duration::from_secs(15), "the climbing request's lines", || async {
        let out = lines(&web)
            .into_iter()
            .find(|l| l["direction"] == "outbound" && l["traceId"] == climbing)?;
        let inb = lines(&orders)
            .into_iter()
            .find(|l| l["direction"] == "inbound" && l["traceId"] == climbing)?;
        Some((out, inb))
    })
    .await;
    assert_eq!(
        (out["path"].as_str(), out["rawPath"].as_str()),
        (Some("/admin"), Some("/api/%2e%2e/admin")),
        "{out}"
    );
    assert_eq!((inb["path"].as_str(), inb.get("rawPath")), (Some("/admin"), None), "{inb}");
    // Without the flag there is no access log at all.
    let quiet = ProxyHandle::start(BIN, &control, "default/quiet", "cluster-a", &[], free_addr()).await;
    let req = Request::get(format!("http://{}/", quiet.outbound))
        .header("host", "orders")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(Client::new().send(req).await.unwrap().status, 200);
    // The request is counted when its response body ends, where a log line would be written.
    eventually(Duration::from_secs(10), "the quiet proxy counted the request", || async {
        let metrics = quiet.metrics().await;
        metrics
            .lines()
            .any(|l| l.starts_with("weft_proxy_requests_total{") && l.contains("direction=\"outbound\""))
            .then_some(())
    })
    .await;
    assert!(lines(&quiet).is_empty(), "access logs are off by default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_rejoins_with_its_kept_certificate_once_its_token_is_used_up() {
    let control = Control::start(BIN).await;
    let app = EchoServer::start("orders").await;
    let _orders = ProxyHandle::start(BIN, &control, "default/orders", "cluster-a", &[], app.addr).await;
    // A single-use join token: redeemed by the first start, refused to any later one.
    let body = serde_json::json!({"workload": "default/web", "serviceAccount": "web", "uses": 1}).to_string();
    let (status, v) = control.post("/api/v1/tokens", &body).await;
    assert_eq!(status, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let dir = control.data_dir.join("web-identity");
    let dir_text = dir.display().to_string();
    let keep = [("WEFT_IDENTITY_DIR", dir_text.as_str())];
    let url = control.grpc_url();
    let mut web = ProxyHandle::start_url_env(BIN, &url, Some(&token), "default/web", "cluster-a", &[], free_addr(), &keep).await;
    let first = web.config_dump().await["identity"].clone();
    use std::os::unix::fs::PermissionsExt;
    let kept = dir.join("workload-identity.json");
    assert_eq!(
        std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777,
        0o600,
        "the key is readable by its owner only"
    );
    web.process.kill();

    // Without the kept certificate the used-up token is all it has, and the CA refuses it.
    let bare = ProxyHandle::spawn_url(BIN, &url, Some(&token), "default/web", "cluster-a", &[], free_addr(), &[]);
    eventually(Duration::from_secs(20), "the used-up token refused", || async {
        bare.process.log_text().contains("the CA refused").then_some(())
    })
    .await;
    drop(bare);

    // With it: ready, renewed on the strength of the kept certificate (a new serial, the same
    // identity), and mTLS to orders works.
    let web = ProxyHandle::start_url_env(BIN, &url, Some(&token), "default/web", "cluster-a", &[], free_addr(), &keep).await;
    eventually(Duration::from_secs(15), "web renewed with its kept certificate", || async {
        let now = web.config_dump().await["identity"].clone();
        (now["serial"] != first["serial"]).then_some(())
    })
    .await;
    assert_eq!(web.config_dump().await["identity"]["spiffeId"], first["spiffeId"]);
    assert!(web.process.log_text().contains("kept workload certificate installed"));
    assert_eq!(get_via(&web, "orders", "GET", "/").await.status, 200);

    // Another workload's kept certificate is ignored, with the file named: that proxy proves
    // itself with its own token and gets its own identity.
    let pay_token = control.token("default/pay", "pay").await;
    let pay = ProxyHandle::start_url_env(BIN, &url, Some(&pay_token), "default/pay", "cluster-a", &[], free_addr(), &keep).await;
    let log = pay.process.log_text();
    assert!(
        log.contains("ignoring the kept workload certificate") && log.contains("workload-identity.json"),
        "{log}"
    );
    assert_eq!(
        pay.config_dump().await["identity"]["spiffeId"],
        "spiffe://weft.local/ns/default/sa/pay"
    );
}

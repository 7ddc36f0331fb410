//! End-to-end tests of the control channel (issue #12, parts 5 and 6): TLS by default with the
//! CA pinned by the join token, proxies that prove themselves with their certificate once their
//! token has expired, and join tokens that are short-lived, countable, revocable, bound to one
//! workload and recorded in the ledger when redeemed. Real control planes, real proxies.

use serde_json::Value;
use std::time::Duration;
use weft_api::proto::{self, distribution_client::DistributionClient};
use weft_test::http::Client;
use weft_test::{Control, ProxyHandle, eventually, free_addr};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

/// A CSR for a fresh key, asking for no name.
fn csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

async fn certify(control: &Control, token: &str, workload: &str) -> Result<proto::CertifyResponse, tonic::Status> {
    DistributionClient::new(control.channel().await)
        .certify(proto::CertifyRequest {
            token: token.to_string(),
            csr_pem: csr(),
            workload: workload.to_string(),
        })
        .await
        .map(|r| r.into_inner())
}

/// The value of the counter `line_prefix` (a metric name with its labels) in `/metrics`.
async fn counter(control: &Control, line_prefix: &str) -> f64 {
    let metrics = control.metrics().await;
    metrics
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Every ledger entry recording a join token's redemption.
async fn redemptions(control: &Control) -> Vec<Value> {
    let ledger = control.get("/api/v1/ledger").await;
    ledger
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "token redeemed")
        .cloned()
        .collect()
}

/// `weft token create ... -o json` against `control`: the token and its id.
fn cli_token(control: &Control, workload: &str, extra: &[&str]) -> (String, String) {
    let out = control
        .cli()
        .args(["-o", "json", "token", "create", "--workload", workload])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (v["token"].as_str().unwrap().into(), v["id"].as_str().unwrap().into())
}

/// `weft token list -o json`, the row of token `id`.
fn cli_token_row(control: &Control, id: &str) -> Value {
    let out = control.cli().args(["-o", "json", "token", "list"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!listed.contains("weft1."), "a token list never holds a secret: {listed}");
    rows.as_array().unwrap().iter().find(|r| r["id"] == id).cloned().expect("listed")
}

async fn ready_status(p: &ProxyHandle) -> u16 {
    Client::new()
        .get(&format!("http://{}/ready", p.admin))
        .await
        .map(|r| r.status)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_whose_token_pins_another_ca_refuses_to_connect_and_says_why() {
    let ours = Control::start(BIN).await;
    let other = Control::start(BIN).await;
    let fingerprint = |c: &Control| weft_core::tls::fingerprint(&weft_core::tls::certs_from_pem(&c.ca_pem(), "ca.pem").unwrap()[0]);
    let (ours_fp, other_fp) = (fingerprint(&ours), fingerprint(&other));
    assert_ne!(ours_fp, other_fp);
    // A token of the other mesh: it pins the other CA, and it is of no use here anyway.
    let token = other.token("default/orders", "orders").await;
    assert_eq!(weft_api::token::peek(&token).unwrap().ca, other_fp);
    let p = ProxyHandle::spawn_url(
        BIN,
        &ours.grpc_url(),
        Some(&token),
        "default/orders",
        "cluster-a",
        &[],
        free_addr(),
        &[],
    );
    let line = eventually(Duration::from_secs(15), "the proxy says why it refuses", || async {
        p.process
            .log_text()
            .lines()
            .find(|l| l.contains("refusing the control plane") && l.contains("pins CA"))
            .map(str::to_string)
    })
    .await;
    assert!(
        line.contains(&format!("pins CA sha256:{other_fp}")) && line.contains(&format!("presented sha256:{ours_fp}")),
        "names both fingerprints: {line}"
    );
    // It sent nothing: the handshake failed before any request.
    assert_eq!(ours.get("/api/v1/proxies").await, serde_json::json!([]));
    assert_eq!(counter(&ours, "weft_control_certificates_issued_total").await, 0.0);
    assert!(redemptions(&ours).await.is_empty());
    assert_eq!(ready_status(&p).await, 503, "no control plane, no certificate, not ready");
    assert!(p.config_dump().await["identity"].is_null());
    eventually(Duration::from_secs(10), "the refused handshakes counted", || async {
        (counter(&ours, r#"weft_control_tls_handshakes_total{listener="grpc",outcome="failed"}"#).await >= 1.0).then_some(())
    })
    .await;
    assert!(!p.process.log_text().contains(&token), "the token never appears in logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_stream_and_the_api_refuse_plaintext_by_default() {
    let control = Control::start(BIN).await;
    let token = control.token("default/orders", "orders").await;
    // A plaintext gRPC client, even with a valid token, gets no certificate.
    let plaintext = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", control.grpc))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        DistributionClient::new(channel)
            .certify(proto::CertifyRequest {
                token: token.clone(),
                csr_pem: csr(),
                workload: "default/orders".into(),
            })
            .await
            .map_err(|e| e.to_string())
    };
    let outcome = plaintext.await;
    assert!(
        outcome.is_err(),
        "plaintext gRPC must get nothing: {:?}",
        outcome.map(|r| r.into_inner().identity)
    );
    // A plaintext HTTP request gets no answer at all (not even an error page).
    let http = Client::new().get(&format!("http://{}/api/v1/status", control.api)).await;
    assert!(http.is_err(), "plaintext HTTP must get no answer: {:?}", http.map(|r| r.status));
    for listener in ["grpc", "api"] {
        let line = format!(r#"weft_control_tls_handshakes_total{{listener="{listener}",outcome="failed"}}"#);
        eventually(
            Duration::from_secs(10),
            &format!("{listener}: a failed handshake counted"),
            || async { (counter(&control, &line).await >= 1.0).then_some(()) },
        )
        .await;
    }
    assert_eq!(counter(&control, "weft_control_certificates_issued_total").await, 0.0);
    assert_eq!(control.get("/api/v1/status").await["controlPlane"]["tls"], true);
    let check = control.cli().arg("check").output().unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(0), "a TLS control plane is fine: {out}");
    assert!(!out.contains("insecure-plaintext"), "{out}");

    // Opting out keeps today's behaviour for local experiments, and `weft check` says so.
    let insecure = Control::start_with(BIN, &["--insecure-plaintext".into()]).await;
    assert!(insecure.url("").starts_with("http://"));
    assert_eq!(insecure.get("/api/v1/status").await["controlPlane"]["tls"], false);
    let proxy = ProxyHandle::start(BIN, &insecure, "default/orders", "cluster-a", &[], free_addr()).await;
    assert_eq!(proxy.config_dump().await["control"]["tls"], false);
    assert_eq!(
        proxy.config_dump().await["identity"]["spiffeId"],
        "spiffe://weft.local/ns/default/sa/orders"
    );
    let check = insecure.cli().arg("check").output().unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{out}");
    assert!(out.contains("warning: the control plane runs with --insecure-plaintext"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_one_workload_used_as_another_gets_nothing() {
    let control = Control::start(BIN).await;
    let token = control.token("default/orders", "orders").await;
    // Straight to the CA: the token is valid, but for orders; a CSR as web gets nothing.
    let refused = certify(&control, &token, "default/web").await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    assert!(
        refused.message().contains("default/web: the token is for workload default/orders"),
        "{}",
        refused.message()
    );
    assert!(!refused.message().contains(&token), "a token is never echoed");
    // A real proxy started as web with orders' token: no registration, no certificate for
    // anyone (before, orders' certificate was installed in web's sidecar).
    let web = ProxyHandle::spawn_url(
        BIN,
        &control.grpc_url(),
        Some(&token),
        "default/web",
        "cluster-a",
        &[],
        free_addr(),
        &[],
    );
    eventually(Duration::from_secs(15), "registration and certificate both refused", || async {
        let log = web.process.log_text();
        (log.contains("control stream down") && log.contains("cannot renew the workload certificate")).then_some(())
    })
    .await;
    assert!(web.config_dump().await["identity"].is_null(), "no certificate installed");
    assert_eq!(ready_status(&web).await, 503);
    assert_eq!(control.get("/api/v1/proxies").await, serde_json::json!([]));
    assert_eq!(counter(&control, "weft_control_certificates_issued_total").await, 0.0);
    assert!(
        counter(&control, r#"weft_control_admissions_refused_total{reason="other-workload"}"#).await >= 3.0,
        "the direct call, the proxy's registration and its certificate request"
    );
    assert!(redemptions(&control).await.is_empty(), "nothing redeemed");
    assert!(!web.process.log_text().contains(&token), "the token never appears in logs");
    // The token itself still works for the workload it names.
    let ok = certify(&control, &token, "default/orders").await.expect("for orders");
    assert_eq!(ok.identity, "spiffe://weft.local/ns/default/sa/orders");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_uses_1_allows_exactly_one_certificate() {
    let control = Control::start(BIN).await;
    let (token, id) = cli_token(&control, "default/orders", &["--uses", "1"]);
    assert_eq!(cli_token_row(&control, &id)["state"], "active");
    let first = certify(&control, &token, "default/orders").await.expect("the one use");
    assert_eq!(first.identity, "spiffe://weft.local/ns/default/sa/orders");
    let second = certify(&control, &token, "default/orders")
        .await
        .expect_err("no second certificate");
    assert_eq!(second.code(), tonic::Code::Unauthenticated);
    assert!(
        second.message().contains(&format!("token {id} was used for all 1 certificate(s)")),
        "{}",
        second.message()
    );
    let row = cli_token_row(&control, &id);
    assert_eq!(
        (row["uses"].as_u64(), row["usesAllowed"].as_u64(), row["state"].as_str()),
        (Some(1), Some(1), Some("used-up")),
        "{row}"
    );
    // A used-up token does not register a workload either.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(proto::ProxyMessage {
        msg: Some(proto::proxy_message::Msg::Register(proto::Register {
            namespace: "default".into(),
            name: "orders".into(),
            inbound_addr: free_addr().to_string(),
            token: token.clone(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let registered = DistributionClient::new(control.channel().await)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let status = registered.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    // One use is all a real proxy needs: its certificate registers and renews it afterwards.
    let (fresh, fresh_id) = cli_token(&control, "default/orders", &["--uses", "1"]);
    let p = ProxyHandle::spawn_url(
        BIN,
        &control.grpc_url(),
        Some(&fresh),
        "default/orders",
        "cluster-a",
        &[],
        free_addr(),
        &[],
    );
    p.wait_ready().await;
    assert_eq!(cli_token_row(&control, &fresh_id)["uses"], 1);
    assert_eq!(counter(&control, "weft_control_certificates_issued_total").await, 2.0);
    eventually(Duration::from_secs(15), "the proxy registered", || async {
        let proxies = control.get("/api/v1/proxies").await;
        (proxies.as_array()?.len() == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_at_once() {
    let control = Control::start(BIN).await;
    let (token, id) = cli_token(&control, "default/orders", &[]);
    certify(&control, &token, "default/orders").await.expect("valid before revocation");
    let out = control.cli().args(["token", "revoke", &id]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("token {id} of default/orders revoked")
    );
    // The very next use is refused: no propagation delay.
    let refused = certify(&control, &token, "default/orders").await.expect_err("revoked");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(
        refused.message().contains(&format!("token {id} was revoked")),
        "{}",
        refused.message()
    );
    assert_eq!(cli_token_row(&control, &id)["state"], "revoked");
    let p = ProxyHandle::spawn_url(
        BIN,
        &control.grpc_url(),
        Some(&token),
        "default/orders",
        "cluster-a",
        &[],
        free_addr(),
        &[],
    );
    eventually(Duration::from_secs(15), "the proxy refused", || async {
        let log = p.process.log_text();
        (log.contains("control stream down") && log.contains("was revoked")).then_some(())
    })
    .await;
    assert_eq!(ready_status(&p).await, 503);
    assert_eq!(control.get("/api/v1/proxies").await, serde_json::json!([]));
    assert!(counter(&control, r#"weft_control_admissions_refused_total{reason="token-revoked"}"#).await >= 2.0);
    let missing = control.cli().args(["token", "revoke", "0000000000000000"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("token 0000000000000000 not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_redemption_is_in_the_ledger_with_workload_source_and_serial() {
    let control = Control::start(BIN).await;
    let token = control.token("default/orders", "orders").await;
    let jti = weft_api::token::peek(&token).unwrap().jti;
    let p = ProxyHandle::start_url(
        BIN,
        &control.grpc_url(),
        Some(&token),
        "default/orders",
        "cluster-a",
        &[],
        free_addr(),
    )
    .await;
    let serial = p.config_dump().await["identity"]["serial"].as_str().unwrap().to_string();
    let entries = redemptions(&control).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    let e = &entries[0];
    assert_eq!(
        (e["workload"].as_str(), e["tokenId"].as_str(), e["serial"].as_str()),
        (Some("default/orders"), Some(jti.as_str()), Some(serial.as_str())),
        "{e}"
    );
    assert_eq!(e["identity"], "spiffe://weft.local/ns/default/sa/orders");
    let source: std::net::SocketAddr = e["source"].as_str().unwrap().parse().expect("an address and port");
    assert_eq!(source.ip().to_string(), "127.0.0.1", "{e}");
    assert!(e["timeMs"].as_u64().unwrap() > 0);
    assert!(!e.to_string().contains(&token), "the ledger never holds the token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_keeps_renewing_and_reconnecting_with_its_certificate_after_its_token_expired() {
    let mut control = Control::start_with(BIN, &["--cert-ttl".into(), "1m".into()]).await;
    let (status, created) = control
        .post("/api/v1/tokens", r#"{"workload": "default/orders", "ttl": "10s"}"#)
        .await;
    assert_eq!(status, 200, "{created}");
    let (token, id) = (
        created["token"].as_str().unwrap().to_string(),
        created["id"].as_str().unwrap().to_string(),
    );
    let p = ProxyHandle::start_url(
        BIN,
        &control.grpc_url(),
        Some(&token),
        "default/orders",
        "cluster-a",
        &[],
        free_addr(),
    )
    .await;
    let identity = |d: Value| {
        (
            d["identity"]["serial"].as_str().unwrap().to_string(),
            d["identity"]["notAfter"].as_u64().unwrap(),
        )
    };
    let (first_serial, first_not_after) = identity(p.config_dump().await);
    eventually(Duration::from_secs(15), "the join token expired", || async {
        (cli_token_row(&control, &id)["state"] == "expired").then_some(())
    })
    .await;
    let expired = certify(&control, &token, "default/orders").await.expect_err("expired");
    assert!(expired.message().contains("token expired"), "{}", expired.message());
    // Renewal at half of the 60 s lifetime, with the certificate as the only proof left.
    let (serial, not_after) = eventually(Duration::from_secs(45), "renewed after the token expired", || async {
        let (serial, not_after) = identity(p.config_dump().await);
        (serial != first_serial).then_some((serial, not_after))
    })
    .await;
    assert!(not_after > first_not_after);
    assert!(
        control
            .process
            .log_text()
            .lines()
            .any(|l| l.contains("certificate issued") && l.contains(&serial) && l.contains("\"certificate\"")),
        "the renewal was proven by the certificate"
    );
    assert_eq!(redemptions(&control).await.len(), 1, "renewals are not token redemptions");
    // The control plane restarts; the proxy registers again with its certificate.
    control.restart().await;
    eventually(Duration::from_secs(20), "the proxy registered again", || async {
        let proxies = control.get("/api/v1/proxies").await;
        let orders = proxies.as_array()?.iter().find(|p| p["workload"] == "default/orders")?.clone();
        (orders["identity"] == "spiffe://weft.local/ns/default/sa/orders").then_some(())
    })
    .await;
    assert_eq!(ready_status(&p).await, 200);
    assert!(
        !control.process.log_text().contains("registration refused"),
        "{}",
        control.process.log_text()
    );
}

/// Writes `bytes` on `io`, then reads until the server closes it or `limit` passes; returns
/// what came and when the close came, if it did.
async fn until_closed<S>(mut io: S, bytes: &[u8], limit: Duration) -> (String, Option<Duration>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    io.write_all(bytes).await.unwrap();
    io.flush().await.unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout_at(tokio::time::Instant::from_std(started + limit), io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Some(started.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break None,
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// Found from outside: a kept-alive REST API connection left idle was held for ever (only a
/// head already begun was timed). With `--api-idle-timeout 20s` a connection that moved no byte
/// for 20 s is closed, one that answered a request first too, while a server-sent-events
/// stream (its keep-alive comment every 15 s moves bytes) stays open past it. A timeout under
/// a second is refused at start, naming the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_api_connection_is_closed_and_an_event_stream_is_not() {
    let out = std::process::Command::new(BIN)
        .args(["control", "--api-idle-timeout", "500ms"])
        .output()
        .expect("weft runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--api-idle-timeout") && stderr.contains("500ms"), "{stderr}");

    let control = Control::start_with(BIN, &["--api-idle-timeout".into(), "20s".into()]).await;
    let auth = format!("authorization: Bearer {}\r\n", control.admin_token);
    let status = format!("GET /api/v1/status HTTP/1.1\r\nhost: 127.0.0.1\r\n{auth}\r\n");
    let events = format!("GET /api/v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\n{auth}\r\n");
    let limit = Duration::from_secs(40);
    let cases: [(&str, Vec<u8>); 2] = [
        ("answered once, then idle", status.into_bytes()),
        ("an event stream", events.into_bytes()),
    ];
    let mut clients = Vec::new();
    for (what, bytes) in cases {
        let io = control.api_tls().await;
        clients.push((what, tokio::spawn(async move { until_closed(io, &bytes, limit).await })));
    }
    let mut outcomes = Vec::new();
    for (what, client) in clients {
        outcomes.push((what, client.await.unwrap()));
    }
    let (got, closed) = &outcomes[0].1;
    assert!(got.starts_with("HTTP/1.1 200"), "answered once: {got}");
    let closed = closed.unwrap_or_else(|| panic!("the idle connection was still open after {limit:?}"));
    assert!(
        closed >= Duration::from_secs(19) && closed < Duration::from_secs(30),
        "the idle connection closed after {closed:?}, want the 20 s idle timeout"
    );
    let (got, closed) = &outcomes[1].1;
    assert!(got.starts_with("HTTP/1.1 200"), "the event stream: {got}");
    assert_eq!(*closed, None, "the event stream was closed after {closed:?}: {got}");
    assert_eq!(control.get("/api/v1/status").await["revision"], 0, "the API still answers");
}

/// Found from outside: past its TLS handshake, a client that sent part of a request head (or
/// nothing) held its REST API connection for ever (axum's server has no head timeout). Such a
/// connection is now closed 10 s after the handshake or the head's first byte, while a
/// server-sent-events stream, whose head came whole, stays open longer than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_request_head_that_never_completes_is_cut_after_10_s() {
    let control = Control::start(BIN).await;
    let limit = Duration::from_secs(30);
    let events = format!(
        "GET /api/v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {}\r\n\r\n",
        control.admin_token
    );
    let cases: [(&str, Vec<u8>, Duration); 3] = [
        ("nothing after the handshake", Vec::new(), limit),
        (
            "a head cut short",
            b"GET /api/v1/status HTTP/1.1\r\nhost: 127.0.0.1\r\n".to_vec(),
            limit,
        ),
        ("an event stream", events.into_bytes(), Duration::from_secs(15)),
    ];
    let mut clients = Vec::new();
    for (what, bytes, limit) in cases {
        let io = control.api_tls().await;
        clients.push((what, tokio::spawn(async move { until_closed(io, &bytes, limit).await })));
    }
    let mut outcomes = Vec::new();
    for (what, client) in clients {
        outcomes.push((what, client.await.unwrap()));
    }
    for (what, (got, closed)) in &outcomes[..2] {
        let closed = closed.unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        assert!(
            closed >= Duration::from_secs(9) && closed < Duration::from_secs(20),
            "{what}: closed after {closed:?}, want the 10 s head timeout"
        );
        assert!(!got.contains(" 200 "), "{what}: answered {got}");
    }
    let (got, closed) = &outcomes[2].1;
    assert!(got.starts_with("HTTP/1.1 200"), "the event stream: {got}");
    assert_eq!(*closed, None, "the event stream was closed after {closed:?}: {got}");
    // The API still answers.
    assert_eq!(control.get("/api/v1/status").await["revision"], 0);
}

//! Who may call the control plane: every route the router serves, called without a credential
//! and with each role, answers as `auth::ACCESS` says; tokens are revoked at once; the dashboard's
//! cookie cannot be used from another site; every mutating call is in the audit trail with its
//! actor; the CLI finds its credential in a flag, the environment or its saved login.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use serde_json::Value;
use std::time::Duration;
use weft_control::auth::{ACCESS, Access, Role};
use weft_test::Control;

const BIN: &str = env!("CARGO_BIN_EXE_weft");

/// A route pattern with harmless values for its parameters.
fn concrete(path: &str) -> String {
    path.replace("{id}", "MESH-404")
        .replace("{service}", "nosuch")
        .replace("{kind}", "TrafficPolicy")
        .replace("{namespace}", "default")
        .replace("{name}", "nosuch")
}

/// Sends one request (over TLS, trusting the control plane's CA) and returns the status and,
/// unless it is an event stream, the body. Event streams (`/events`, `/tap`) never end, so only
/// their status is read.
async fn call(control: &Control, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let mut req = Request::builder().method(method).uri(control.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = control
        .client()
        .open(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .expect("the API answers");
    let status = resp.status().as_u16();
    let streaming = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if streaming {
        return (status, Value::Null);
    }
    use http_body_util::BodyExt;
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_each_role_as_the_access_table_says() {
    let control = Control::start(BIN).await;
    let viewer = control.api_token("t-viewer", "viewer").await;
    let operator = control.api_token("t-operator", "operator").await;
    let callers: [(&str, Option<Role>, String); 4] = [
        ("nobody", None, String::new()),
        ("viewer", Some(Role::Viewer), viewer),
        ("operator", Some(Role::Operator), operator),
        ("admin", Some(Role::Admin), control.admin_token.clone()),
    ];
    // The routes as the router registered them: a route added without a row in ACCESS is
    // refused to everyone and fails here.
    let routes = weft_control::api::registered_routes();
    assert!(routes.len() >= 30, "{} routes", routes.len());
    let mut checked = 0;
    for (method, pattern) in &routes {
        let access = ACCESS
            .iter()
            .find(|(m, p, _)| *m == method.as_str() && p == pattern)
            .map(|(_, _, a)| *a)
            .unwrap_or_else(|| panic!("{method} {pattern} has no access rule"));
        let path = concrete(pattern);
        for (who, role, token) in &callers {
            let auth = bearer(token);
            let headers: Vec<(&str, &str)> = if token.is_empty() { vec![] } else { vec![("authorization", &auth)] };
            let (status, body) = call(&control, method.as_str(), &path, &headers, "").await;
            let needed = match access {
                Access::Open => None,
                Access::Metrics | Access::Role(Role::Viewer) => Some(Role::Viewer),
                Access::Role(r) => Some(r),
            };
            match (needed, role) {
                (None, _) => assert!(
                    ![401, 403].contains(&status),
                    "{method} {path} is open, yet {who} got {status} {body}"
                ),
                (Some(_), None) => {
                    assert_eq!(status, 401, "{method} {path} without a credential: {body}");
                    assert!(
                        body["error"].is_string() && body["hint"].as_str().unwrap().contains("weft admin token create"),
                        "{body}"
                    );
                }
                (Some(n), Some(r)) if *r < n => {
                    assert_eq!(status, 403, "{method} {path} as {who}: {body}");
                    assert_eq!(body["role"], serde_json::to_value(n).unwrap(), "403 names the role needed: {body}");
                }
                (Some(_), Some(_)) => assert!(
                    ![401, 403].contains(&status),
                    "{method} {path} as {who} must pass authorization, got {status} {body}"
                ),
            }
            checked += 1;
        }
    }
    eprintln!("{checked} calls over {} routes answered as the table says", routes.len());
    // An unknown path is not found, for everyone.
    let (status, _) = call(&control, "GET", "/api/v1/nothing-here", &[], "").await;
    assert_eq!(status, 404);
    // No secret reaches the control plane's log.
    let log = control.process.log_text();
    for (_, _, token) in &callers {
        assert!(token.is_empty() || !log.contains(token.as_str()), "a token in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_and_sessions_are_refused_at_once_and_cookies_stay_on_their_site() {
    let control = Control::start(BIN).await;
    let ci = control.api_token("ci", "operator").await;
    let (status, _) = control.call_as("GET", "/api/v1/status", "", &ci).await;
    assert_eq!(status, 200);
    // The dashboard's session: an HttpOnly, SameSite=Strict cookie; the token is not in it.
    let resp = control
        .client()
        .open(
            Request::post(control.url("/api/v1/session"))
                .body(Full::new(Bytes::from(format!("{{\"token\": \"{ci}\"}}"))))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let set_cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Secure"] {
        assert!(set_cookie.contains(attr), "{set_cookie}");
    }
    assert!(!set_cookie.contains(&ci), "the cookie is a session id, not the token");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let host = control.api.to_string();
    let own_origin = format!("https://{host}");
    let freeze = |origin: Option<&'static str>| {
        let (cookie, own_origin) = (cookie.clone(), own_origin.clone());
        let control = &control;
        async move {
            let origin = match origin {
                Some("own") => Some(own_origin),
                Some(o) => Some(o.to_string()),
                None => None,
            };
            let mut headers = vec![("cookie", cookie.as_str())];
            if let Some(o) = &origin {
                headers.push(("origin", o.as_str()));
            }
            call(control, "POST", "/api/v1/freeze", &headers, r#"{"enabled": false}"#).await
        }
    };
    let (status, body) = freeze(Some("https://evil.example")).await;
    assert_eq!(status, 403, "another site's page cannot drive the controls: {body}");
    assert!(body["error"].as_str().unwrap().contains("cross-origin"), "{body}");
    assert_eq!(freeze(None).await.0, 403, "a cookie write without Origin is refused");
    assert_eq!(freeze(Some("own")).await.0, 200, "the dashboard's own page may");
    // Reads with the cookie need no Origin.
    assert_eq!(call(&control, "GET", "/api/v1/status", &[("cookie", &cookie)], "").await.0, 200);

    // Revoked: the token and its sessions are refused on the next call.
    let out = control.cli().args(["admin", "token", "revoke", "ci"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (status, body) = control.call_as("GET", "/api/v1/status", "", &ci).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(call(&control, "GET", "/api/v1/status", &[("cookie", &cookie)], "").await.0, 401);
    // Expired tokens are refused too.
    let (status, v) = control
        .post("/api/v1/admin/tokens", r#"{"name": "brief", "role": "viewer", "ttl": "1s"}"#)
        .await;
    assert_eq!(status, 201, "{v}");
    let brief = v["token"].as_str().unwrap().to_string();
    assert_eq!(control.call_as("GET", "/api/v1/status", "", &brief).await.0, 200);
    let (status, body) = weft_test::eventually(Duration::from_secs(10), "the 1 s token expires", || async {
        let r = control.call_as("GET", "/api/v1/status", "", &brief).await;
        (r.0 == 401).then_some(r)
    })
    .await;
    assert!(body["error"].as_str().unwrap().contains("expired"), "{status} {body}");
    // Bad input changes nothing.
    let (status, body) = control
        .post("/api/v1/admin/tokens", r#"{"name": "Bad Name", "role": "viewer"}"#)
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "name", "{body}");
    let (status, body) = control.post("/api/v1/admin/tokens", r#"{"name": "x", "role": "root"}"#).await;
    assert_eq!(status, 400, "{body}");
    let names: Vec<String> = control
        .get("/api/v1/admin/tokens")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        ["bootstrap-admin", "brief"],
        "the list keeps no secrets and no rejected token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_names_the_actor_of_each_change_and_the_cli_finds_its_credential() {
    let control = Control::start(BIN).await;
    let home = control.data_dir.join("cli-home");
    let config = home.join("weft.json");
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(BIN);
        c.args(args)
            .env("WEFT_CONFIG", &config)
            .env_remove("WEFT_API_TOKEN")
            .env_remove("WEFT_SERVER");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let server = control.url("");
    let ca = control.ca_file();
    let ca = ca.to_str().unwrap();
    // No credential: a clear refusal with the way to get one.
    let out = cli(&["--server", &server, "--ca-file", ca, "status"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no credential") && err.contains("weft login"), "{err}");
    // A CA that did not sign the server's certificate (one saved before a root rotation, say):
    // refused, naming the file and how to trust the current roots.
    let foreign = control.data_dir.join("foreign-ca.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&foreign, params.self_signed(&key).unwrap().pem()).unwrap();
    let out = cli(&["--server", &server, "--ca-file", foreign.to_str().unwrap(), "status"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("UnknownIssuer") && err.contains("foreign-ca.pem") && err.contains("ca.pem from the control plane"),
        "{err}"
    );
    // An admin makes an operator token; it is printed once, alone.
    let out = cli(
        &[
            "--server",
            &server,
            "--ca-file",
            ca,
            "admin",
            "token",
            "create",
            "--name",
            "alice",
            "--role",
            "operator",
        ],
        &[("WEFT_API_TOKEN", &control.admin_token)],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let alice = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(alice.starts_with("weft_") && !alice.contains(' '), "{alice}");
    // `weft login` pins the CA by its fingerprint (a server that cannot prove it is refused),
    // checks the token and saves server, CA and token (0600) for this user.
    let token_file = control.data_dir.join("alice.token");
    std::fs::write(&token_file, format!("{alice}\n")).unwrap();
    let root = weft_core::tls::certs_from_pem(&control.ca_pem(), "ca.pem").unwrap();
    let fingerprint = weft_core::tls::fingerprint(&root[0]);
    let login = |pin: &str| {
        cli(
            &[
                "--server",
                &server,
                "login",
                "--token-file",
                token_file.to_str().unwrap(),
                "--ca-fingerprint",
                pin,
            ],
            &[],
        )
    };
    let wrong = login(&"0".repeat(64));
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("did not prove the CA"), "{err}");
    assert!(!config.exists(), "nothing saved for a server that did not prove its CA");
    let out = cli(&["--server", &server, "login", "--token-file", token_file.to_str().unwrap()], &[]);
    assert!(!out.status.success(), "an https server needs a CA named at login");
    let out = login(&fingerprint);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&config).unwrap().permissions().mode() & 0o777, 0o600);
    let out = cli(&["-o", "json", "whoami"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let me: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((me["name"].as_str(), me["role"].as_str()), (Some("alice"), Some("operator")));
    // The saved token never goes to another server.
    let elsewhere = weft_test::apps::EchoServer::start("elsewhere").await;
    let _ = cli(&["--server", &format!("http://{}", elsewhere.addr), "whoami"], &[]);
    let seen = elsewhere.headers.lock().clone();
    assert_eq!(seen.len(), 1, "the CLI called the other server");
    assert!(
        seen[0].get("authorization").is_none(),
        "the saved token stays with its server: {seen:?}"
    );
    // alice (operator) freezes and unfreezes; she may not apply (admin only); the admin applies.
    for state in ["on", "off"] {
        let out = cli(&["freeze", state], &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let policy = control.data_dir.join("p.yaml");
    std::fs::write(
        &policy,
        "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: orders}\nspec: {service: orders, routes: [{timeout: 2s}]}\n",
    )
    .unwrap();
    let out = cli(&["apply", "-f", policy.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs the admin role") && err.contains("alice"), "{err}");
    let out = control.cli().args(["apply", "-f", policy.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The audit trail: who, with which role, from where, what, and how it ended.
    let out = cli(&["-o", "json", "audit", "--since", "10m"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Value> = serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone();
    let summary: Vec<(String, String, String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["actor"].as_str().unwrap().to_string(),
                r["role"].as_str().unwrap().to_string(),
                r["path"].as_str().unwrap().to_string(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let expect = |actor: &str, role: &str, path: &str, status: u64| {
        assert!(
            summary.contains(&(actor.into(), role.into(), path.into(), status)),
            "{actor} {path} {status} missing from {summary:?}"
        )
    };
    expect("bootstrap-admin", "admin", "/api/v1/admin/tokens", 201);
    expect("alice", "operator", "/api/v1/freeze", 200);
    expect("bootstrap-admin", "admin", "/api/v1/resources", 200);
    assert_eq!(
        summary.iter().filter(|s| s.0 == "alice" && s.2 == "/api/v1/freeze").count(),
        2,
        "both freezes"
    );
    for r in &rows {
        assert!(r["source"].as_str().unwrap().starts_with("127.0.0.1:"), "{r}");
        assert!(!r.to_string().contains(&alice), "no secret in the audit trail: {r}");
    }
    let apply = rows
        .iter()
        .find(|r| r["path"] == "/api/v1/resources" && r["status"] == 200)
        .unwrap();
    assert!(apply["change"].as_str().unwrap().contains("kind: TrafficPolicy"), "{apply}");
    assert_eq!(apply["outcome"]["revision"], 1, "{apply}");
    // The operator actions in the ledger name alice too.
    let ledger = control.get("/api/v1/ledger").await;
    let freeze = ledger
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "freeze on")
        .unwrap()
        .clone();
    assert_eq!(freeze["actor"], "alice", "{freeze}");
    // The listing can be narrowed in time.
    let out = cli(&["-o", "json", "audit", "--since", "0s"], &[]);
    let recent: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(recent.as_array().unwrap().len() < rows.len(), "--since narrows the trail");
    // The refused attempt is in the trail too, with who tried.
    expect("alice", "operator", "/api/v1/resources", 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_left_open_for_a_prometheus_without_a_token() {
    let closed = Control::start(BIN).await;
    assert_eq!(call(&closed, "GET", "/metrics", &[], "").await.0, 401);
    let open = Control::start_with(BIN, &["--metrics-open".into()]).await;
    assert_eq!(call(&open, "GET", "/metrics", &[], "").await.0, 200);
    assert_eq!(call(&open, "GET", "/api/v1/status", &[], "").await.0, 401, "only /metrics opens");
}

//! End-to-end tests of the inbound trust boundary (issue #12, part 7): headers a caller could use
//! to claim an identity never reach the app, whichever path the request takes (HTTP/1.1, HTTP/2,
//! gRPC, Upgrade, retries, authorization audit mode, bypass, plaintext straight to the inbound,
//! a static proxy), and an mTLS caller's verified identity arrives in exactly one
//! `x-forwarded-client-cert: By=<callee>;URI=<caller>`. Real `weft` processes; the apps record
//! every request's headers.

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::Full;
use hyper::Request;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_test::apps::{EchoServer, GrpcEcho, grpc_client};
use weft_test::echo_proto::EchoMsg;
use weft_test::http::{Client, h2_via};
use weft_test::{Control, ProxyHandle, eventually, free_addr};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

/// Extra names the callee's sidecar is told to strip (`WEFT_STRIP_HEADERS`, as `--strip-header`),
/// spelled in mixed case as an operator might.
const EXTRA: &str = "X-Internal-User,x-tenant-admin";

/// What a caller sends to pass for someone else: every built-in name and prefix in several
/// spellings (`_` for `-` too, which CGI-style servers read alike), three copies of
/// `x-forwarded-client-cert`, and the configured extra names.
const SPOOFED: [(&str, &str); 16] = [
    (
        "X-Forwarded-Client-Cert",
        "By=spiffe://weft.local/ns/default/sa/orders;URI=spiffe://weft.local/ns/default/sa/admin",
    ),
    ("x-forwarded-client-cert", "URI=spiffe://weft.local/ns/default/sa/root"),
    ("X-FORWARDED-CLIENT-CERT", "Hash=00;URI=spiffe://evil.example/ns/x/sa/y"),
    ("X-Spiffe-Id", "spiffe://weft.local/ns/default/sa/admin"),
    ("x-spiffe-id", "spiffe://weft.local/ns/kube-system/sa/root"),
    ("X-Weft-Identity", "spiffe://weft.local/ns/default/sa/admin"),
    ("x-weft-peer", "admin"),
    ("L5d-Client-Id", "admin.default.serviceaccount.identity.linkerd.cluster.local"),
    ("l5d-dst-override", "admin.default.svc.cluster.local:80"),
    ("L5D-Remote-IP", "10.0.0.1"),
    ("X-Internal-User", "root"),
    ("x-Tenant-Admin", "yes"),
    ("X_Forwarded_Client_Cert", "URI=spiffe://weft.local/ns/default/sa/admin"),
    ("x_spiffe_id", "spiffe://weft.local/ns/default/sa/admin"),
    ("l5d_client_id", "admin.default.serviceaccount.identity.linkerd.cluster.local"),
    ("x_tenant_admin", "yes"),
];

/// Headers that are not identities and must arrive as sent (`weft-retried` is handed to the app
/// by contract; it also turns retries off for these requests).
const KEPT: [(&str, &str); 4] = [
    ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
    ("weft-retried", "1"),
    ("x-user", "alice"),
];

const CLIENT_CERT: &str = "x-forwarded-client-cert";

/// Whether a (lowercase) header name is one the callee's sidecar must have removed, in any
/// spelling (`_` for `-`); `x-forwarded-client-cert` itself is counted apart.
fn must_be_gone(name: &str) -> bool {
    let dashed = name.replace('_', "-");
    dashed.starts_with("x-weft-")
        || dashed.starts_with("l5d-")
        || dashed == "x-spiffe-id"
        || (dashed == CLIENT_CERT && name != CLIENT_CERT)
        || EXTRA.to_ascii_lowercase().split(',').any(|e| e == dashed)
}

/// Checks the headers an app received: no spoofed name in any spelling, the `kept` headers as
/// sent, and `x-forwarded-client-cert` exactly once with `client_cert`, or absent.
fn assert_trusted(what: &str, h: &HeaderMap, kept: &[(&str, &str)], client_cert: Option<&str>) {
    let leaked: Vec<&str> = h.keys().map(|k| k.as_str()).filter(|k| must_be_gone(k)).collect();
    assert!(leaked.is_empty(), "{what}: {leaked:?} reached the app\n{h:#?}");
    let certs: Vec<&str> = h.get_all(CLIENT_CERT).iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(certs, client_cert.into_iter().collect::<Vec<_>>(), "{what}: {CLIENT_CERT}\n{h:#?}");
    for (k, v) in kept {
        let got: Vec<&[u8]> = h.get_all(*k).iter().map(|v| v.as_bytes()).collect();
        assert_eq!(got, [v.as_bytes()], "{what}: {k} arrives once, as sent\n{h:#?}");
    }
}

/// The headers of every request `app` received for `path`, in order.
fn received(app: &EchoServer, path: &str) -> Vec<HeaderMap> {
    let paths = app.paths.lock();
    let headers = app.headers.lock();
    paths
        .iter()
        .zip(headers.iter())
        .filter(|(p, _)| *p == path)
        .map(|(_, h)| h.clone())
        .collect()
}

/// The one request `app` received for `path`.
fn received_once(app: &EchoServer, path: &str) -> HeaderMap {
    let mut all = received(app, path);
    assert_eq!(all.len(), 1, "{path} reached the app once");
    all.pop().unwrap()
}

fn request(uri: String, host: Option<&str>, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::get(uri);
    if let Some(host) = host {
        b = b.header("host", host);
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

fn spoofed_and_kept() -> Vec<(&'static str, &'static str)> {
    SPOOFED.iter().chain(KEPT.iter()).copied().collect()
}

/// Writes one HTTP/1.1 request with its header names spelled exactly as given on a fresh
/// connection; returns the response head.
async fn raw_h1(addr: SocketAddr, request_line: &str, headers: &[(&str, &str)]) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{request_line}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let read = async {
        while !out.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if tcp.read(&mut b).await.unwrap() == 0 {
                break;
            }
            out.push(b[0]);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("a response head");
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends an upgrade request the inbound must refuse: 403 `upgrade-refused`, and the app sees
/// nothing.
async fn assert_upgrade_refused(addr: SocketAddr, request_line: &str, headers: &[(&str, &str)], app: &EchoServer) {
    let before = app.received();
    let head = raw_h1(addr, request_line, headers).await.to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 403") && head.contains("x-weft-error: upgrade-refused"),
        "{request_line}: {head}"
    );
    assert_eq!(app.received(), before, "{request_line}: nothing reached the app");
}

/// A callee: the sidecar of `name` in front of `app`, told to strip the [`EXTRA`] names too.
async fn callee(control: &Control, name: &str, app: SocketAddr) -> ProxyHandle {
    let workload = format!("default/{name}");
    let token = control.token(&workload, name).await;
    let labels = [("version", "v1")];
    let env = [("WEFT_STRIP_HEADERS", EXTRA)];
    ProxyHandle::start_url_env(BIN, &control.grpc_url(), Some(&token), &workload, "cluster-a", &labels, app, &env).await
}

/// A proxy's own SPIFFE ID, from its `/config_dump`.
async fn spiffe_id(proxy: &ProxyHandle) -> String {
    let dump = proxy.config_dump().await;
    dump["identity"]["spiffeId"]
        .as_str()
        .expect("the proxy holds a certificate")
        .to_string()
}

async fn wait_revision(proxy: &ProxyHandle, rev: u64) {
    eventually(
        Duration::from_secs(15),
        &format!("{} runs revision {rev}", proxy.workload),
        || async { (proxy.config_dump().await["config"]["revision"].as_u64() >= Some(rev)).then_some(()) },
    )
    .await;
}

/// The sum of the samples whose line starts with `line_start`.
fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_never_reach_the_app_over_http1_http2_grpc_upgrade_or_plaintext() {
    let control = Control::start(BIN).await;
    let orders_app = EchoServer::start("orders").await;
    let orders = callee(&control, "orders", orders_app.addr).await;
    let grpc_app = GrpcEcho::start("grpc-echo").await;
    let grpc = callee(&control, "grpc-echo", grpc_app.addr).await;
    let web = ProxyHandle::start(BIN, &control, "default/web", "cluster-a", &[], free_addr()).await;

    let (orders_id, grpc_id, web_id) = (spiffe_id(&orders).await, spiffe_id(&grpc).await, spiffe_id(&web).await);
    assert_eq!(web_id, "spiffe://weft.local/ns/default/sa/web");
    let from_web = format!("By={orders_id};URI={web_id}");
    assert_eq!(
        from_web,
        "By=spiffe://weft.local/ns/default/sa/orders;URI=spiffe://weft.local/ns/default/sa/web"
    );
    let dump = orders.config_dump().await;
    assert_eq!(
        dump["trustHeaders"]["stripHeaders"],
        serde_json::json!(["x-internal-user", "x-tenant-admin"]),
        "{dump}"
    );
    assert_eq!(
        dump["trustHeaders"]["stripped"],
        serde_json::json!(["x-weft-*", "x-forwarded-client-cert", "x-spiffe-id", "l5d-*"])
    );
    let all = spoofed_and_kept();

    // HTTP/1.1 through the caller's sidecar, then mTLS and HTTP/2 between the sidecars.
    let r = Client::new()
        .send(request(format!("http://{}/h1", web.outbound), Some("orders"), &all))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_trusted("HTTP/1.1 via the mesh", &received_once(&orders_app, "/h1"), &KEPT, Some(&from_web));

    // The same with header names spelled on the wire in mixed case.
    let head = raw_h1(
        web.outbound,
        "GET /h1-raw HTTP/1.1",
        &[&[("Host", "orders"), ("Connection", "close")][..], &all].concat(),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_trusted(
        "raw HTTP/1.1 via the mesh",
        &received_once(&orders_app, "/h1-raw"),
        &KEPT,
        Some(&from_web),
    );

    // HTTP/2 from the app; the destination app is spoken to in its declared protocol (auto:
    // HTTP/1.1). gRPC, below, takes HTTP/2 to the app.
    let r = h2_via(web.outbound, request("http://orders/h2".into(), None, &all)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let h2 = received_once(&orders_app, "/h2");
    assert_trusted("HTTP/2 via the mesh", &h2, &KEPT, Some(&from_web));
    assert!(r.text().contains(r#""version":"HTTP/1.1""#), "{}", r.text());

    // gRPC, unary and streaming, with the spoofed names as metadata.
    let mut client = grpc_client(web.outbound, "grpc-echo").await;
    let mut call = tonic::Request::new(EchoMsg {
        payload: b"hi".to_vec(),
        seq: 1,
        server: String::new(),
    });
    for (k, v) in &all {
        let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).unwrap();
        call.metadata_mut().append(key, v.parse().unwrap());
    }
    let metadata = call.metadata().clone();
    assert_eq!(client.unary(call).await.unwrap().into_inner().server, "grpc-echo");
    let mut stream = tonic::Request::new(tokio_stream::iter(vec![EchoMsg {
        payload: b"s".to_vec(),
        seq: 2,
        server: String::new(),
    }]));
    *stream.metadata_mut() = metadata;
    let mut answers = client.stream(stream).await.unwrap().into_inner();
    assert_eq!(answers.message().await.unwrap().unwrap().seq, 2);
    let from_web_to_grpc = format!("By={grpc_id};URI={web_id}");
    let calls = grpc_app.headers.lock().clone();
    assert_eq!(calls.len(), 2, "one unary and one streaming call");
    for (i, h) in calls.iter().enumerate() {
        assert_trusted(&format!("gRPC call {i}"), h, &KEPT, Some(&from_web_to_grpc));
    }

    // An HTTP/1.1 Upgrade (WebSocket) takes its own path: the app answers it 200, and the
    // request it saw is checked like any other.
    let upgrade = [
        &[
            ("Host", "orders"),
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ][..],
        &all,
    ]
    .concat();
    let head = raw_h1(web.outbound, "GET /upgrade HTTP/1.1", &upgrade).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_trusted(
        "Upgrade via the mesh",
        &received_once(&orders_app, "/upgrade"),
        &KEPT,
        Some(&from_web),
    );
    // An h2c upgrade would let the caller speak HTTP/2 to the app past the boundary: refused.
    let h2c = [
        ("Host", "orders"),
        ("Connection", "Upgrade, HTTP2-Settings"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
    ];
    assert_upgrade_refused(web.outbound, "GET /h2c HTTP/1.1", &h2c, &orders_app).await;

    // Everything so far crossed between the sidecars over mTLS.
    let m = orders.metrics().await;
    assert_eq!(
        metric(&m, r#"weft_proxy_inbound_connections_total{transport="plaintext""#),
        0.0,
        "{m}"
    );

    // Plaintext straight to the callee's inbound (permissive mode): none of the spoofed
    // headers and no identity header, over HTTP/1.1 (mixed case on the wire) and HTTP/2.
    let r = Client::new()
        .send(request(format!("http://{}/plain-h1", orders.inbound), Some("orders"), &all))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_trusted("plaintext HTTP/1.1", &received_once(&orders_app, "/plain-h1"), &KEPT, None);
    let head = raw_h1(
        orders.inbound,
        "GET /plain-raw HTTP/1.1",
        &[&[("Host", "orders"), ("Connection", "close")][..], &all].concat(),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_trusted("plaintext raw HTTP/1.1", &received_once(&orders_app, "/plain-raw"), &KEPT, None);
    let r = h2_via(orders.inbound, request(format!("http://{}/plain-h2", orders.inbound), None, &all))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_trusted("plaintext HTTP/2", &received_once(&orders_app, "/plain-h2"), &KEPT, None);
    let head = raw_h1(orders.inbound, "GET /plain-upgrade HTTP/1.1", &upgrade).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_trusted("plaintext Upgrade", &received_once(&orders_app, "/plain-upgrade"), &KEPT, None);
    // Opaque TCP would hand a plaintext caller the app's port to write requests to itself.
    let tcp = [("Host", "orders"), ("Connection", "Upgrade"), ("Upgrade", "weft-tcp")];
    assert_upgrade_refused(orders.inbound, "GET / HTTP/1.1", &tcp, &orders_app).await;
    let m = orders.metrics().await;
    let plaintext = r#"weft_proxy_inbound_connections_total{transport="plaintext",outcome="accepted"}"#;
    assert_eq!(metric(&m, plaintext), 5.0, "one connection per plaintext request\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_with_a_mesh_certificate_and_no_sidecar_is_named_by_its_certificate_alone() {
    use weft_test::pki::{Pki, mtls_h1_raw};
    let pki = Pki::new("test root");
    let dir = std::env::temp_dir().join(format!("weft-trust-pki-{}-{}", std::process::id(), rand::random::<u32>()));
    let (cert, key) = pki.write(&dir);
    let control = Control::start_with(
        BIN,
        &[
            "--root-cert".into(),
            cert.display().to_string(),
            "--root-key".into(),
            key.display().to_string(),
        ],
    )
    .await;
    let orders_app = EchoServer::start("orders").await;
    let orders = callee(&control, "orders", orders_app.addr).await;
    let tester = "spiffe://weft.local/ns/default/sa/tester";
    let leaf = pki.leaf(tester, -60, 3600);
    // Straight to the inbound over mTLS: no caller sidecar removed anything first (`x-weft-*`
    // included), and `Connection` lists the identity header, trying to have the one the inbound
    // sets removed as hop-by-hop.
    let mut head = String::from("GET /direct HTTP/1.1\r\nHost: orders\r\nConnection: X-Forwarded-Client-Cert, x-spiffe-id\r\n");
    for (k, v) in SPOOFED.iter().chain(KEPT.iter()) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let answer = mtls_h1_raw(orders.inbound, &leaf, &head).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let expected = format!("By={};URI={tester}", spiffe_id(&orders).await);
    assert_trusted(
        "mTLS without a sidecar",
        &received_once(&orders_app, "/direct"),
        &KEPT,
        Some(&expected),
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_audit_mode_and_bypass_keep_the_trust_boundary() {
    let control = Control::start(BIN).await;
    let orders_app = EchoServer::start("orders").await;
    let orders = callee(&control, "orders", orders_app.addr).await;
    let web = ProxyHandle::start(BIN, &control, "default/web", "cluster-a", &[], free_addr()).await;
    let from_web = format!("By={};URI={}", spiffe_id(&orders).await, spiffe_id(&web).await);
    let send = |path: &str, extra: &[(&str, &str)]| {
        let mut headers: Vec<(&str, &str)> = SPOOFED.to_vec();
        headers.extend_from_slice(extra);
        let req = request(format!("http://{}{path}", web.outbound), Some("orders"), &headers);
        async move { Client::new().send(req).await }
    };
    assert_eq!(send("/warm", &[]).await.unwrap().status, 200);

    // Authorization in audit mode (every call a would-be denial) and retries on 5xx.
    let policies = [
        "apiVersion: weft/v1\nkind: SecurityPolicy\nmetadata: {name: orders-audit}\nspec:\n  selector: {service: orders}\n  authorization: {mode: audit, default: deny}\n",
        "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: orders-retry}\nspec:\n  service: orders\n  routes:\n    - name: all\n      retry: {attempts: 2, on: [5xx]}\n",
    ];
    for yaml in policies {
        let (status, applied) = control.post("/api/v1/resources", yaml).await;
        assert_eq!(status, 200, "{applied}");
        let rev = applied["revision"].as_u64().expect("a revision");
        wait_revision(&web, rev).await;
        wait_revision(&orders, rev).await;
    }
    // Without `weft-retried`, which would turn the retries off.
    let kept = [KEPT[0], KEPT[1], KEPT[3]];
    let r = send("/retried", &[&kept[..], &[("x-echo-status", "503")]].concat()).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    let tries = received(&orders_app, "/retried");
    assert_eq!(tries.len(), 3, "the first try and two retries reached the app");
    for (i, h) in tries.iter().enumerate() {
        assert_trusted(&format!("try {i}"), h, &kept, Some(&from_web));
        let retried = h.get_all("weft-retried").iter().count();
        assert_eq!(retried, usize::from(i > 0), "try {i} carries weft-retried once if it is a retry");
    }
    let audited = r#"weft_proxy_authz_decisions_total{decision="audit-deny"}"#;
    assert_eq!(
        metric(&orders.metrics().await, audited),
        3.0,
        "each try was audited, and let through"
    );

    // Bypass: no L7 policy at the callers or the service's own sidecar, same boundary.
    let (status, v) = control.post("/api/v1/bypass/orders", r#"{"enabled": true}"#).await;
    assert_eq!(status, 200, "{v}");
    for p in [&orders, &web] {
        eventually(Duration::from_secs(15), &format!("bypass reached {}", p.workload), || async {
            let dump = p.config_dump().await;
            let on = if p.workload == "default/orders" {
                dump["config"]["bypass"] == true
            } else {
                dump["config"]["services"]["default/orders"]["policy"].is_null()
            };
            on.then_some(())
        })
        .await;
    }
    let r = send("/bypassed", &KEPT).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_trusted("bypass", &received_once(&orders_app, "/bypassed"), &KEPT, Some(&from_web));
    assert_eq!(metric(&orders.metrics().await, audited), 3.0, "no authorization ran in bypass");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_proxy_strips_configured_names_and_bad_names_are_refused_naming_flag_or_field() {
    let app = EchoServer::start("static-orders").await;
    let dir = std::env::temp_dir().join(format!("weft-trust-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (inbound, outbound, admin) = (free_addr(), free_addr(), free_addr());
    let file = dir.join("orders.yaml");
    let listeners = format!(
        "workload: default/orders\ncluster: cluster-a\napp: '{}'\ninbound: '{inbound}'\noutbound: '{outbound}'\nadmin: '{admin}'\n",
        app.addr
    );
    std::fs::write(&file, format!("{listeners}stripHeaders: [X-Internal-User]\n")).unwrap();
    let _proxy = weft_test::Process::spawn(
        BIN,
        "static-orders",
        &[
            "proxy".into(),
            "--config".into(),
            file.display().to_string(),
            "--strip-header".into(),
            "x-Tenant-Admin".into(),
        ],
    );
    let http = Client::new();
    let dump = eventually(Duration::from_secs(15), "the static proxy ready", || async {
        http.get(&format!("http://{admin}/ready")).await.ok().filter(|r| r.status == 200)?;
        Some(http.get(&format!("http://{admin}/config_dump")).await.ok()?.json())
    })
    .await;
    assert_eq!(
        dump["trustHeaders"]["stripHeaders"],
        serde_json::json!(["x-internal-user", "x-tenant-admin"]),
        "the file's names and the flag's, lowercase\n{dump}"
    );
    let r = http
        .send(request(format!("http://{inbound}/static"), Some("orders"), &spoofed_and_kept()))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_trusted("static plaintext", &received_once(&app, "/static"), &KEPT, None);

    // A bad name on the command line: clap's usage error, naming the flag and the value.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(BIN).arg("proxy").args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let flags = [
        "--control",
        "http://127.0.0.1:1",
        "--workload",
        "default/x",
        "--cluster",
        "a",
        "--app",
        "127.0.0.1:1",
        "--inbound",
        "127.0.0.1:0",
        "--outbound",
        "127.0.0.1:0",
    ];
    for (bad, why) in [
        ("x user", "not an HTTP header name"),
        ("x-internal-*", "a pattern"),
        ("Host", "needs this header"),
    ] {
        let (code, stderr) = cli(&[&flags[..], &["--strip-header", "x-ok", "--strip-header", bad]].concat());
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.contains("--strip-header") && stderr.contains(&format!("'{bad}'")) && stderr.contains(why),
            "{stderr}"
        );
    }
    // A bad name in the file: exit 64 naming the file, the field and the value; nothing bound.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, format!("{listeners}stripHeaders: [x-ok, 'x-internal-*']\n")).unwrap();
    let (code, stderr) = cli(&["--config", bad.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains(bad.to_str().unwrap())
            && stderr.contains("stripHeaders[1]")
            && stderr.contains("x-internal-*")
            && stderr.contains("a pattern"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

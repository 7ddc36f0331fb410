//! End-to-end tests of how a request names its service (the host forms of DESIGN.md §8, the
//! namespaces they resolve in, `unknown-service` for anything else) and of the protocol a
//! workload declares for its app (an HTTP/1.1-only app and an HTTP/2-only app behind their
//! sidecars). Real `weft` processes as control plane and sidecars, real apps.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::time::Duration;
use weft_test::apps::{EchoServer, GrpcEcho, WsEcho, grpc_client};
use weft_test::echo_proto::EchoMsg;
use weft_test::http::{Client, Reply, h2_via};
use weft_test::{Control, ProxyHandle, eventually, free_addr};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

/// What one request through `proxy` with `host` got: status, `x-weft-error`, the app that
/// answered (`x-echo-server`).
async fn through(proxy: &ProxyHandle, host: &str) -> (String, u16, String, String) {
    let r = send(proxy, host).await;
    let header = |name: &str| r.header(name).unwrap_or_default();
    (host.to_string(), r.status, header("x-weft-error"), header("x-echo-server"))
}

async fn send(proxy: &ProxyHandle, host: &str) -> Reply {
    let req = Request::get(format!("http://{}/", proxy.outbound))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    Client::new().send(req).await.expect("the outbound answers")
}

fn row(host: &str, status: u16, reason: &str, server: &str) -> (String, u16, String, String) {
    (host.to_string(), status, reason.to_string(), server.to_string())
}

async fn workload(control: &Control, id: &str, app: SocketAddr, env: &[(&str, &str)]) -> ProxyHandle {
    let name = id.rsplit('/').next().unwrap();
    let token = control.token(id, name).await;
    ProxyHandle::start_url_env(BIN, &control.grpc_url(), Some(&token), id, "cluster-a", &[], app, env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hosts_resolve_in_their_namespace_and_anything_else_is_unknown() {
    let control = Control::start(BIN).await;
    let (status, v) = control
        .post(
            "/api/v1/resources",
            "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: idle}\nspec:\n  service: idle\n  routes: [{timeout: 2s}]\n",
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let home = EchoServer::start("httpbe-default").await;
    let _home = workload(&control, "default/httpbe", home.addr, &[]).await;
    let client = workload(&control, "default/client", free_addr(), &[]).await;
    let visitor = workload(&control, "evil/visitor", free_addr(), &[]).await;

    // Before evil/httpbe exists: its names are unknown, and nothing falls back to default/httpbe.
    let mut got = Vec::new();
    for host in [
        "httpbe",
        "httpbe:8080",
        "HTTPBE.default.svc.weft.local.",
        "httpbe.evil",
        "httpbe.evil.com",
        "example.com",
        "nosuch.default",
        "127.0.0.1:80",
        "idle",
    ] {
        got.push(through(&client, host).await);
    }
    got.push(through(&visitor, "httpbe").await);
    assert_eq!(
        got,
        [
            row("httpbe", 200, "", "httpbe-default"),
            row("httpbe:8080", 200, "", "httpbe-default"),
            row("HTTPBE.default.svc.weft.local.", 200, "", "httpbe-default"),
            row("httpbe.evil", 404, "unknown-service", ""),
            row("httpbe.evil.com", 404, "unknown-service", ""),
            row("example.com", 404, "unknown-service", ""),
            row("nosuch.default", 404, "unknown-service", ""),
            row("127.0.0.1:80", 404, "unknown-service", ""),
            // Known (a policy names it), no instance: a different answer.
            row("idle", 503, "no-healthy-endpoints", ""),
            row("httpbe", 404, "unknown-service", ""),
        ]
    );
    let refused = send(&client, "httpbe.evil.com").await.text();
    assert!(
        refused.contains("\"httpbe.evil.com\"") && refused.contains("NAME.NAMESPACE.svc.TRUST_DOMAIN"),
        "the refusal names the host and the accepted forms: {refused}"
    );

    // evil/httpbe starts: the same names now reach it, and only it.
    let away = EchoServer::start("httpbe-evil").await;
    let _away = workload(&control, "evil/httpbe", away.addr, &[]).await;
    eventually(Duration::from_secs(15), "httpbe.evil becomes known", || async {
        (through(&client, "httpbe.evil").await.1 == 200).then_some(())
    })
    .await;
    let mut got = Vec::new();
    for host in [
        "httpbe",
        "httpbe.evil",
        "httpbe.evil.svc",
        "httpbe.Evil.svc.weft.local:80",
        "httpbe.evil.com",
    ] {
        got.push(through(&client, host).await);
    }
    for host in ["httpbe", "httpbe.default"] {
        got.push(through(&visitor, host).await);
    }
    assert_eq!(
        got,
        [
            row("httpbe", 200, "", "httpbe-default"),
            row("httpbe.evil", 200, "", "httpbe-evil"),
            row("httpbe.evil.svc", 200, "", "httpbe-evil"),
            row("httpbe.Evil.svc.weft.local:80", 200, "", "httpbe-evil"),
            row("httpbe.evil.com", 404, "unknown-service", ""),
            row("httpbe", 200, "", "httpbe-evil"),
            row("httpbe.default", 200, "", "httpbe-default"),
        ]
    );
}

/// An app that speaks one protocol only: `h2` (prior knowledge) or HTTP/1.1. It echoes the
/// request body, says which version it was spoken to in `x-app-version`, and ends with the
/// trailer `x-body-length` (HTTP/1.1 sends trailers to a caller that says `te: trailers`).
async fn app_speaking(h2: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let version = format!("{:?}", req.version());
                let body = req.into_body().collect().await?.to_bytes();
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-body-length", body.len().into());
                let frames = [Frame::data(body), Frame::trailers(trailers)].map(Ok::<_, std::convert::Infallible>);
                let body = StreamBody::new(tokio_stream::iter(frames));
                let resp = Response::builder()
                    .header("x-app-version", version)
                    .header("trailer", "x-body-length")
                    .body(body)
                    .unwrap();
                Ok::<_, hyper::Error>(resp)
            });
            let io = TokioIo::new(tcp);
            tokio::spawn(async move {
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new().serve_connection(io, service).await
                };
            });
        }
    });
    addr
}

/// A body large enough to cross many HTTP/2 frames and flow-control windows.
fn payload() -> Bytes {
    (0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sidecars_speak_the_protocol_the_app_declares() {
    let control = Control::start(BIN).await;
    let _legacy = workload(&control, "default/legacy", app_speaking(false).await, &[]).await;
    let _modern = workload(&control, "default/modern", app_speaking(true).await, &[("WEFT_APP_PROTOCOL", "h2")]).await;
    let grpc = GrpcEcho::start("grpc-on-http1").await;
    let _grpc = workload(&control, "default/grpc-on-http1", grpc.addr, &[("WEFT_APP_PROTOCOL", "http1")]).await;
    let client = workload(&control, "default/client", free_addr(), &[]).await;
    let body = payload();

    let post = |host: &str| {
        Request::post(format!("http://{host}/upload"))
            .header("content-type", "application/octet-stream")
            .body(Full::new(body.clone()))
            .unwrap()
    };
    let h1_post = |host: &str| {
        Request::post(format!("http://{}/upload", client.outbound))
            .header("host", host)
            .body(Full::new(body.clone()))
            .unwrap()
    };
    let summary = |r: &Reply| {
        (
            r.status,
            r.header("x-weft-error").unwrap_or_default(),
            r.header("x-app-version").unwrap_or_default(),
            r.body == body,
        )
    };
    // h2c caller (HTTP/2 with prior knowledge), two sidecars, an HTTP/1.1-only app (default).
    let r = h2_via(client.outbound, post("legacy")).await.unwrap();
    assert_eq!(summary(&r), (200, String::new(), "HTTP/1.1".into(), true), "{}", r.text());
    // The app's trailers (HTTP/1.1 chunked) reach an HTTP/2 caller that asks for them.
    let (trailers, length) = h2_trailers(client.outbound, "legacy", body.clone()).await;
    assert_eq!(trailers, Some(body.len().to_string()), "{length} bytes came back");
    assert_eq!(length, body.len());
    // HTTP/1.1 caller to the same app, and to an HTTP/2-only app declared `h2`.
    let r = Client::new().send(h1_post("legacy")).await.unwrap();
    assert_eq!(summary(&r), (200, String::new(), "HTTP/1.1".into(), true), "{}", r.text());
    let r = Client::new().send(h1_post("modern")).await.unwrap();
    assert_eq!(summary(&r), (200, String::new(), "HTTP/2.0".into(), true), "{}", r.text());
    let r = h2_via(client.outbound, post("modern")).await.unwrap();
    assert_eq!(summary(&r), (200, String::new(), "HTTP/2.0".into(), true), "{}", r.text());

    // gRPC needs HTTP/2: to an app declared `http1` it is refused plainly, and never reaches it.
    let e = grpc_client(client.outbound, "grpc-on-http1")
        .await
        .unary(EchoMsg {
            payload: b"hi".to_vec(),
            seq: 1,
            server: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.message()), (tonic::Code::Unimplemented, "app-protocol-mismatch"));
    assert_eq!(grpc.headers.lock().len(), 0, "the app saw no call");

    // WebSocket is an HTTP/1.1 Upgrade: it crosses to an app declared `http1`, and an app
    // declared `h2` refuses it plainly.
    let ws = WsEcho::start().await;
    let _chat = workload(&control, "default/chat", ws.addr, &[("WEFT_APP_PROTOCOL", "http1")]).await;
    let _chat2 = workload(&control, "default/chat-h2", ws.addr, &[("WEFT_APP_PROTOCOL", "h2")]).await;
    let (to_http1, to_h2) = (websocket(&client, "chat").await, websocket(&client, "chat-h2").await);
    assert!(to_http1.starts_with("http/1.1 101"), "{to_http1}");
    assert!(
        to_h2.starts_with("http/1.1 501") && to_h2.contains("x-weft-error: app-protocol-mismatch"),
        "{to_h2}"
    );
    assert_eq!(
        ws.upgraded.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "only the http1 app was upgraded"
    );
}

/// POSTs `body` over h2c to `host` through `outbound` with `te: trailers`: the response's
/// `x-body-length` trailer, and how many body bytes came back.
async fn h2_trailers(outbound: SocketAddr, host: &str, body: Bytes) -> (Option<String>, usize) {
    let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("http://{host}/upload"))
        .header("te", "trailers")
        .body(Full::new(body))
        .unwrap();
    let collected = send.send_request(req).await.unwrap().into_body().collect().await.unwrap();
    let trailer = collected
        .trailers()
        .and_then(|t| t.get("x-body-length"))
        .map(|v| v.to_str().unwrap().to_string());
    (trailer, collected.to_bytes().len())
}

/// The response head (lowercase) to a WebSocket handshake for `host` through `proxy`.
async fn websocket(proxy: &ProxyHandle, host: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(proxy.outbound).await.unwrap();
    let handshake = format!(
        "GET /chat HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(handshake.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(tcp.read(&mut b).await.unwrap(), 1, "{}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_app_protocol_is_refused_naming_it() {
    let addr = || free_addr().to_string();
    let out = std::process::Command::new(BIN)
        .args([
            "proxy",
            "--control",
            "http://127.0.0.1:1",
            "--insecure-plaintext",
            "--workload",
            "default/x",
        ])
        .args(["--cluster", "a", "--app", &addr(), "--inbound", &addr(), "--outbound", &addr()])
        .args(["--app-protocol", "h3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--app-protocol") && stderr.contains("h3"), "{stderr}");

    let dir = std::env::temp_dir().join(format!("weft-app-protocol-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.yaml");
    let text = format!(
        "workload: default/x\napp: '{}'\ninbound: '{}'\noutbound: '{}'\nappProtocol: http3\n",
        addr(),
        addr(),
        addr()
    );
    std::fs::write(&file, text).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["proxy", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(file.to_str().unwrap()) && stderr.contains("appProtocol") && stderr.contains("http3"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

//! `weft-sidecar`, the proxy-only executable: it takes the flags of `weft proxy` and runs the
//! same proxy. Its inbound listener hands the app the path it was asked for, and the authority
//! the caller addressed in `Host`, whichever way the caller named it.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::time::Duration;
use weft_test::apps::EchoServer;
use weft_test::free_addr;

const BIN: &str = env!("CARGO_BIN_EXE_weft-sidecar");

fn get(url: &str, host: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::get(url);
    if let Some(host) = host {
        req = req.header(http::header::HOST, host);
    }
    req.body(Full::new(Bytes::new())).unwrap()
}

/// Starts `weft-sidecar` from a static config file in `dir` for workload default/orders in
/// front of `app`, and waits until it is ready; returns the process and its inbound and
/// outbound addresses.
async fn start_sidecar(
    dir: &std::path::Path,
    app: std::net::SocketAddr,
) -> (weft_test::process::Process, std::net::SocketAddr, std::net::SocketAddr) {
    start_sidecar_with(dir, app, "").await
}

/// As [`start_sidecar`], with `extra` (YAML lines) added to the config file.
async fn start_sidecar_with(
    dir: &std::path::Path,
    app: std::net::SocketAddr,
    extra: &str,
) -> (weft_test::process::Process, std::net::SocketAddr, std::net::SocketAddr) {
    let (inbound, outbound, admin) = (free_addr(), free_addr(), free_addr());
    let file = dir.join("orders.yaml");
    let yaml = format!(
        "workload: default/orders\ncluster: a\napp: '{app}'\ninbound: '{inbound}'\noutbound: '{outbound}'\nadmin: '{admin}'\n{extra}services: []\n"
    );
    std::fs::write(&file, yaml).unwrap();
    let sidecar = weft_test::process::Process::spawn(BIN, "sidecar", &["--config".into(), file.display().to_string()]);
    let client = weft_test::http::Client::new();
    weft_test::eventually(Duration::from_secs(20), "the sidecar is ready", || async {
        let ready = client.get(&format!("http://{admin}/ready")).await;
        ready.is_ok_and(|r| r.status == 200).then_some(())
    })
    .await;
    (sidecar, inbound, outbound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_executable_serves_a_static_config_and_refuses_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("weft-sidecar-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let app = EchoServer::start("orders").await;
    let (mut sidecar, inbound, _) = start_sidecar(&dir, app.addr).await;
    let client = weft_test::http::Client::new();

    // Origin form with a Host header; absolute form; HTTP/2 with :authority only.
    let origin = client
        .send(get(&format!("http://{inbound}/a?b=1"), Some("orders.example")))
        .await
        .unwrap();
    let absolute = weft_test::http::via_http_proxy(inbound, get("http://orders.absolute/abs", None))
        .await
        .unwrap();
    let h2 = weft_test::http::h2_via(inbound, get("http://orders.h2/two?x=y", None))
        .await
        .unwrap();
    assert_eq!(
        (origin.status, absolute.status, h2.status),
        (200, 200, 200),
        "{}",
        sidecar.log_text()
    );
    assert_eq!(*app.paths.lock(), ["/a?b=1", "/abs", "/two?x=y"]);
    let hosts: Vec<String> = app
        .headers
        .lock()
        .iter()
        .map(|h| h.get(http::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("").to_string())
        .collect();
    assert_eq!(hosts, ["orders.example", "orders.absolute", "orders.h2"]);
    sidecar.kill();

    // A bad static file: exit 64, naming the file and the field, as `weft proxy` does.
    let bad = dir.join("bad.yaml");
    let yaml = format!(
        "workload: default/x\napp: '{}'\ninbound: '{}'\noutbound: '{}'\nservices:\n  - name: echo\n    endpoints: [{{address: '127.0.0.1:1', weight: 3}}]\n",
        free_addr(),
        free_addr(),
        free_addr()
    );
    std::fs::write(&bad, yaml).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(bad.to_str().unwrap()) && stderr.contains("services[0].endpoints[0]"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// An HTTP/1.1 app that counts the connections it accepts and closes each one after its answer
/// when the path is `/close`.
async fn counting_app() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Relaxed);
            let answer = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let close = req.uri().path() == "/close";
                let mut resp = http::Response::builder();
                if close {
                    resp = resp.header(http::header::CONNECTION, "close");
                }
                resp.body(Full::new(Bytes::from_static(b"ok")))
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), answer);
            tokio::spawn(conn);
        }
    });
    (addr, accepted)
}

/// The inbound listener keeps its HTTP/1.1 connections to the app alive and reuses them: 10
/// requests one after another reach the app on 1 connection. A connection the app closes after
/// its answer is not reused, and the request after it still succeeds on a new one: 5 such
/// requests (the first on the kept-alive connection) take 4 more connections, all answered 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_reuses_its_app_connections_and_replaces_closed_ones() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = std::env::temp_dir().join(format!("weft-sidecar-pool-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (app, accepted) = counting_app().await;
    let (mut sidecar, inbound, _) = start_sidecar(&dir, app).await;
    let client = weft_test::http::Client::new();

    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(client.get(&format!("http://{inbound}/keep")).await.unwrap().status);
    }
    assert_eq!(statuses, [200; 10], "{}", sidecar.log_text());
    assert_eq!(accepted.load(Relaxed), 1, "kept-alive requests reuse one connection");

    statuses.clear();
    for _ in 0..5 {
        statuses.push(client.get(&format!("http://{inbound}/close")).await.unwrap().status);
    }
    assert_eq!(statuses, [200; 5], "{}", sidecar.log_text());
    assert_eq!(accepted.load(Relaxed), 1 + 4, "a connection the app closed is not reused");
    sidecar.kill();
    let _ = std::fs::remove_dir_all(dir);
}

/// Writes `bytes` on a new connection to `addr`, then reads until the sidecar closes it,
/// `limit` passes, or (with `head_only`) an answer's head has come; returns what came and when
/// the close came, if it did.
async fn send_raw(addr: std::net::SocketAddr, bytes: &[u8], limit: Duration, head_only: bool) -> (String, Option<Duration>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Timed from before the connection exists, so no close can be measured early.
    let started = std::time::Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout_at(tokio::time::Instant::from_std(started + limit), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Some(started.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break None,
        }
        if head_only && got.windows(4).any(|w| w == b"\r\n\r\n") {
            break None;
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// Found from outside: a client that sends part of its first request head (or nothing) was
/// kept connected for ever on every listener; it is cut at the 10 s header read timeout. And
/// `CONNECT` reached the app, whose 200 made the sidecar hand the client a tunnel to nowhere:
/// both listeners refuse it, 405 `upgrade-refused`, and the app sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_are_cut_at_the_header_timeout_and_connect_is_refused() {
    let dir = std::env::temp_dir().join(format!("weft-sidecar-slow-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let app = EchoServer::start("orders").await;
    let (mut sidecar, inbound, outbound) = start_sidecar(&dir, app.addr).await;

    // Four slow clients at once, so the test waits out one timeout, not four.
    let limit = Duration::from_secs(30);
    let slow: [(&str, std::net::SocketAddr, &[u8]); 4] = [
        ("inbound, nothing sent", inbound, b""),
        ("inbound, a head cut short", inbound, b"GET / HTTP/1.1\r\nhost: orders\r\n"),
        ("outbound, 3 bytes", outbound, b"GET"),
        (
            "outbound, a head cut short",
            outbound,
            b"GET / HTTP/1.1\r\nhost: orders\r\nx-slow: 1\r\n",
        ),
    ];
    let clients: Vec<_> = slow
        .iter()
        .map(|(what, addr, bytes)| (*what, tokio::spawn(send_raw(*addr, bytes, limit, false))))
        .collect();
    for (what, client) in clients {
        let (got, closed) = client.await.unwrap();
        let closed = closed.unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        assert!(
            closed >= Duration::from_secs(9) && closed < Duration::from_secs(20),
            "{what}: closed after {closed:?}, want the 10 s header read timeout"
        );
        assert!(!got.contains(" 200 "), "{what}: {got}");
    }

    for addr in [inbound, outbound] {
        let (got, _) = send_raw(
            addr,
            b"CONNECT orders:443 HTTP/1.1\r\nhost: orders:443\r\n\r\n",
            Duration::from_secs(10),
            true,
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 405"), "{addr}: {got}\n{}", sidecar.log_text());
        assert!(got.contains("x-weft-error: upgrade-refused"), "{got}");
    }
    assert_eq!(app.received(), 0, "the app saw {:?}", app.paths.lock());
    sidecar.kill();
    let _ = std::fs::remove_dir_all(dir);
}

/// Reads one answer (head and a Content-Length body) from `tcp`; None when the connection ends
/// first.
async fn read_answer(tcp: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + length {
                return Some(head);
            }
        }
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// An HTTP/1.1 app that answers `/slow` after 3 s and anything else at once.
async fn slow_app() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let answer = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                if req.uri().path() == "/slow" {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                http::Response::builder().body(Full::new(Bytes::from_static(b"done")))
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), answer);
            tokio::spawn(conn);
        }
    });
    addr
}

/// Found from outside: an HTTP/2 client that answered the sidecar's PINGs held an idle
/// connection for ever. Each listener now closes a connection gracefully once no request has
/// been in flight for the idle timeout, as Envoy's does. With `idleTimeout: 2s`:
/// - an HTTP/2 connection idle after its answer is ended (GOAWAY) 2-8 s later (before: still
///   open 15 s later), and an HTTP/1.1 one on the outbound likewise (before: 10 s, the header
///   read timeout);
/// - a request the app answers after 3 s is answered whole on a connection idle for 2 s
///   before it: requests in flight are never cut;
/// - a connection with a request every 700 ms for 5 s stays open;
/// - a timeout under 1 s is refused, in the file (exit 64, naming field and value) and as a flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_no_request_in_flight_is_closed_after_the_idle_timeout() {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let dir = std::env::temp_dir().join(format!("weft-sidecar-idle-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let app = slow_app().await;
    let (mut sidecar, inbound, outbound) = start_sidecar_with(&dir, app, "idleTimeout: 2s\n").await;

    // HTTP/2 with prior knowledge, one request, then nothing.
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    let h2_ended = tokio::spawn(async move {
        let _ = conn.await;
        std::time::Instant::now()
    });
    let resp = h2.send_request(get("http://orders.h2/idle", None)).await.unwrap();
    assert_eq!(resp.status(), 200, "{}", sidecar.log_text());
    resp.into_body().collect().await.unwrap();
    let h2_answered = std::time::Instant::now();
    // HTTP/1.1 on the outbound (answered there: no service), then nothing.
    let h1_idle = tokio::spawn(send_raw(
        outbound,
        b"GET /idle HTTP/1.1\r\nhost: orders\r\n\r\n",
        Duration::from_secs(15),
        false,
    ));
    // A slow answer after the connection sat idle for the timeout.
    let slow = tokio::spawn(async move {
        let mut tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tcp.write_all(b"GET /slow HTTP/1.1\r\nhost: orders\r\n\r\n").await.unwrap();
        read_answer(&mut tcp).await
    });
    // A busy connection.
    let mut busy = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let started = std::time::Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(5) {
        busy.write_all(b"GET /busy HTTP/1.1\r\nhost: orders\r\n\r\n").await.unwrap();
        let head = read_answer(&mut busy).await.unwrap_or_else(|| {
            panic!(
                "the busy connection was closed after {:?} and {answered} answers",
                started.elapsed()
            )
        });
        assert!(head.starts_with("http/1.1 200"), "{head}\n{}", sidecar.log_text());
        answered += 1;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert!(answered >= 4, "{answered} answers in 5 s");

    let h2_closed = tokio::time::timeout(Duration::from_secs(15), h2_ended)
        .await
        .map(|ended| ended.unwrap().duration_since(h2_answered));
    let (h1_got, h1_closed) = h1_idle.await.unwrap();
    let slow = slow.await.unwrap();
    let closes = format!("HTTP/2 {h2_closed:?}, HTTP/1.1 {h1_closed:?}");
    assert!(
        h2_closed
            .as_ref()
            .is_ok_and(|c| *c >= Duration::from_millis(1900) && *c < Duration::from_secs(8)),
        "an idle HTTP/2 connection ended {closes} after its answer (Err: still open after 15 s), want about 2 s"
    );
    assert!(h1_got.starts_with("HTTP/1.1 "), "{h1_got}");
    assert!(
        h1_closed.is_some_and(|c| c >= Duration::from_millis(1900) && c < Duration::from_secs(8)),
        "an idle HTTP/1.1 connection: {closes}, want about 2 s"
    );
    let slow = slow.unwrap_or_else(|| panic!("the slow request's connection was closed before its answer\n{}", sidecar.log_text()));
    assert!(slow.starts_with("http/1.1 200"), "{slow}");
    sidecar.kill();

    let bad = dir.join("bad-idle.yaml");
    let yaml = format!(
        "workload: default/x\ncluster: a\napp: '{}'\ninbound: '{}'\noutbound: '{}'\nidleTimeout: 500ms\nservices: []\n",
        free_addr(),
        free_addr(),
        free_addr()
    );
    std::fs::write(&bad, yaml).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("idleTimeout") && stderr.contains("500ms"), "{stderr}");
    let out = std::process::Command::new(BIN)
        .args(["--config", bad.to_str().unwrap(), "--idle-timeout", "0s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--idle-timeout") && stderr.contains("0s"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

//! Sequential request latency through a given address, for bench/: `latency ADDR HOST N`.
//! Prints p50, p90, p99 and p99.9 in microseconds, one request at a time on a kept-alive
//! HTTP/1.1 connection.

// A command-line tool: its result goes to stdout.
#![allow(clippy::print_stdout)]

use std::time::Instant;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (addr, host, n): (String, String, usize) = match &args[..] {
        [_, a, h, n] => (a.clone(), h.clone(), n.parse().expect("N is a number")),
        _ => {
            eprintln!("usage: latency ADDR HOST N");
            std::process::exit(2);
        }
    };
    let client = weft_test::http::Client::new();
    let url = format!("http://{addr}/bench");
    let send = || {
        let req = hyper::Request::get(&url)
            .header("host", host.as_str())
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        client.send(req)
    };
    for _ in 0..200 {
        assert_eq!(send().await.expect("warm-up request").status, 200);
    }
    let mut micros = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let r = send().await.expect("request");
        assert_eq!(r.status, 200, "{}", r.text());
        micros.push(start.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| micros[((p * n as f64) as usize).min(n - 1)];
    println!("p50={:.0} p90={:.0} p99={:.0} p99.9={:.0}", q(0.5), q(0.9), q(0.99), q(0.999));
}

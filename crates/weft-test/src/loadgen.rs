//! The benchmarks' load generator.
//!
//! Open loop at a constant rate with coordinated-omission correction: request `i` is due at
//! `start + i / rate`, whichever connection is free takes the next due request, and a request
//! sent late because every connection was busy has its latency counted from when it was due,
//! not from when it was sent. A stall therefore shows up in every
//! request that should have been sent during it, as a user would see it (the same correction
//! as `oha --latency-correction` and wrk2). Closed loop (as fast as answers come back) measures
//! saturation throughput. HTTP/1.1 on kept-alive connections, or HTTP/2 streams on one
//! connection per worker.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2).
    pub host: String,
    pub path: String,
    pub h2: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub sent: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Latencies in microseconds, sorted (measured requests only, after warm-up).
    pub micros: Vec<u64>,
}

impl Report {
    pub fn rps(&self) -> f64 {
        self.sent as f64 / self.seconds.max(1e-9)
    }

    pub fn quantile(&self, q: f64) -> u64 {
        if self.micros.is_empty() {
            return 0;
        }
        let i = ((q * self.micros.len() as f64).ceil() as usize).clamp(1, self.micros.len()) - 1;
        self.micros[i]
    }

    /// `p50=.. p90=.. p99=.. p99.9=.. max=..` in microseconds.
    pub fn summary(&self) -> String {
        format!(
            "p50={} p90={} p99={} p99.9={} max={} rps={:.0} errors={}",
            self.quantile(0.5),
            self.quantile(0.9),
            self.quantile(0.99),
            self.quantile(0.999),
            self.micros.last().copied().unwrap_or(0),
            self.rps(),
            self.errors
        )
    }
}

/// One kept-alive connection that sends a request and reads the whole answer.
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    async fn open(t: &Target) -> anyhow::Result<Self> {
        let tcp = tokio::net::TcpStream::connect(t.addr).await?;
        tcp.set_nodelay(true)?;
        let io = TokioIo::new(tcp);
        Ok(if t.h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Conn::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Conn::H1(send)
        })
    }

    async fn call(&mut self, t: &Target) -> anyhow::Result<u16> {
        let resp = match self {
            Conn::H1(s) => {
                s.ready().await?;
                let req = Request::get(&t.path).header("host", &t.host).body(Full::new(Bytes::new()))?;
                s.send_request(req).await?
            }
            Conn::H2(s) => {
                s.ready().await?;
                let req = Request::get(format!("http://{}{}", t.host, t.path)).body(Full::new(Bytes::new()))?;
                s.send_request(req).await?
            }
        };
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        Ok(status)
    }
}

/// Constant `rate` over `connections` for `warmup + duration`; reports the `duration` part.
pub async fn constant_rate(t: &Target, rate: f64, connections: usize, warmup: Duration, duration: Duration) -> anyhow::Result<Report> {
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::open(t).await?);
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in conns {
        let (t, next) = (t.clone(), next.clone());
        tasks.spawn(async move {
            let mut micros = Vec::new();
            let (mut sent, mut errors) = (0u64, 0u64);
            loop {
                let i = next.fetch_add(1, Relaxed);
                let due = start + interval.mul_f64(i as f64);
                if due >= end {
                    break;
                }
                // A connection that is free waits for the due time, and the clock starts when the
                // timer fires (the timer's own millisecond granularity is the client's, not the
                // server's). One that is late because its last answer was slow starts the clock
                // at the due time: that wait is what coordinated omission would hide.
                let from = if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await;
                    Instant::now()
                } else {
                    due
                };
                let ok = matches!(conn.call(&t).await, Ok(s) if s < 500);
                if due >= measure_from {
                    sent += 1;
                    errors += u64::from(!ok);
                    micros.push(from.elapsed().as_micros() as u64);
                }
                if !ok {
                    // A broken connection is replaced; the time that takes counts too.
                    if let Ok(c) = Conn::open(&t).await {
                        conn = c;
                    }
                }
            }
            (micros, sent, errors)
        });
    }
    let mut report = Report {
        seconds: duration.as_secs_f64(),
        ..Default::default()
    };
    while let Some(r) = tasks.join_next().await {
        let (micros, sent, errors) = r?;
        report.micros.extend(micros);
        report.sent += sent;
        report.errors += errors;
    }
    report.micros.sort_unstable();
    Ok(report)
}

/// As fast as answers come back, `connections` at once (HTTP/2: each connection carries
/// `streams` requests at once), for `duration`.
pub async fn saturate(t: &Target, connections: usize, streams: usize, duration: Duration) -> anyhow::Result<Report> {
    let end = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let conn = Conn::open(t).await?;
        // HTTP/1.1: one request at a time on the connection. HTTP/2: `streams` lanes, each with
        // its own handle on the one connection.
        let lanes: Vec<Conn> = match conn {
            Conn::H2(send) => (0..streams.max(1)).map(|_| Conn::H2(send.clone())).collect(),
            h1 => vec![h1],
        };
        for mut lane in lanes {
            let t = t.clone();
            tasks.spawn(async move {
                let (mut sent, mut errors) = (0u64, 0u64);
                while Instant::now() < end {
                    let ok = matches!(lane.call(&t).await, Ok(s) if s < 500);
                    sent += 1;
                    errors += u64::from(!ok);
                }
                (sent, errors)
            });
        }
    }
    let mut report = Report {
        seconds: duration.as_secs_f64(),
        ..Default::default()
    };
    while let Some(r) = tasks.join_next().await {
        let (sent, errors) = r?;
        report.sent += sent;
        report.errors += errors;
    }
    Ok(report)
}

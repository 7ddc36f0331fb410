//! Writes the seed inputs of every fuzz target into a corpus directory (`fuzz/corpus` by
//! default): the repository's example resources, real HTTP/1.1 requests, join tokens, CSRs and
//! protobuf messages made by weft's own code. Run it again when a format changes:
//!
//! ```text
//! cargo run -p weft-fuzz --bin weft-fuzz-seeds -- fuzz/corpus
//! ```

use anyhow::Context;
use prost::Message;
use std::path::{Path, PathBuf};
use weft_api::proto::{self, control_message, proxy_message};
use weft_control::fuzz;
use weft_fuzz::proxy_message::encode;

fn main() -> anyhow::Result<()> {
    let root = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| "fuzz/corpus".into());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut seeds = Seeds { root, written: 0 };
    resources(&mut seeds, &repo)?;
    framing(&mut seeds)?;
    paths(&mut seeds)?;
    routes(&mut seeds, &repo)?;
    hosts(&mut seeds)?;
    tokens(&mut seeds)?;
    csrs(&mut seeds)?;
    proxy_messages(&mut seeds)?;
    control_messages(&mut seeds, &repo)?;
    eprintln!("wrote {} seeds under {}", seeds.written, seeds.root.display());
    Ok(())
}

struct Seeds {
    root: PathBuf,
    written: usize,
}

impl Seeds {
    fn write(&mut self, target: &str, name: &str, bytes: impl AsRef<[u8]>) -> anyhow::Result<()> {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("seed-{name}"));
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        self.written += 1;
        Ok(())
    }
}

/// Every YAML file under `examples/`, by file name.
fn examples(repo: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for dir in ["examples/policies", "examples/intents"] {
        for entry in std::fs::read_dir(repo.join(dir)).with_context(|| format!("reading {dir}"))? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            out.push((
                name,
                std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
            ));
        }
    }
    out.sort();
    Ok(out)
}

fn resources(seeds: &mut Seeds, repo: &Path) -> anyhow::Result<()> {
    for (name, text) in examples(repo)? {
        seeds.write("resource", &name, text)?;
    }
    seeds.write(
        "resource",
        "security-policy.json",
        r#"{"apiVersion":"weft/v1","kind":"SecurityPolicy","metadata":{"name":"orders-authz","namespace":"shop"},
"spec":{"selector":{"service":"orders"},"mtls":"strict","authorization":{"mode":"enforce","default":"deny",
"rules":[{"action":"allow","from":{"namespaces":["shop"]},"to":{"paths":["/api/*"],"methods":["GET","POST"]}},
{"action":"deny","to":{"paths":["/api/admin/*"]}}]}}}"#,
    )?;
    seeds.write(
        "resource",
        "two-documents.yaml",
        "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: orders-retry}\nspec:\n  service: orders\n  routes:\n    - match: {pathRegex: \"/orders/[0-9]+\", methods: [GET], query: {tier: {prefix: gold}}}\n      retry: {attempts: 3, perTryTimeout: 500ms, on: [503, unavailable, connect-failure], budget: {ratio: 20, minPerSecond: 5}}\n      fault: {delay: {percent: 5, duration: 100ms}, abort: {percent: 1, status: 503}}\n      mirror: {subset: v2, percent: 10}\n  loadBalancer: round-robin\n  connectionPool: {maxConnections: 100, maxPendingRequests: 50, connectTimeout: 2s}\n  outlierDetection: {consecutiveFailures: 5, ejection: 30s, maxEjectedPercent: 50}\n  rateLimit: {requestsPerSecond: 100, burst: 20}\n---\napiVersion: weft/v1\nkind: SecurityPolicy\nmetadata: {name: orders-permissive}\nspec: {selector: {service: orders}, mtls: permissive}\n",
    )
}

fn framing(seeds: &mut Seeds) -> anyhow::Result<()> {
    let requests: [(&str, &[u8]); 9] = [
        ("get", b"GET /api/orders HTTP/1.1\r\nHost: orders\r\nAccept: */*\r\n\r\n"),
        ("post-length", b"POST /api/orders HTTP/1.1\r\nHost: orders\r\nContent-Length: 13\r\n\r\n{\"id\": 42}\r\n\r\n"),
        (
            "chunked-trailers",
            b"POST /upload HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1A\r\nGET /smuggled HTTP/1.1\r\n\r\n\r\n0\r\nX-Checksum: 1\r\n\r\n",
        ),
        (
            "pipelined",
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        ("length-and-chunked", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("two-lengths", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\ncontent-length: 4\r\n\r\nabcd"),
        ("chunked-not-last", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
        (
            "upgrade",
            b"GET /ws HTTP/1.1\r\nHost: chat\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n\x81\x05hello",
        ),
        ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"),
    ];
    for (i, (name, bytes)) in requests.iter().enumerate() {
        // The first byte seeds how the stream is cut into reads.
        let mut input = vec![(i * 37 % 256) as u8];
        input.extend_from_slice(bytes);
        seeds.write("framing", name, input)?;
    }
    Ok(())
}

fn paths(seeds: &mut Seeds) -> anyhow::Result<()> {
    for (i, path) in [
        "/api/orders",
        "//api///orders/",
        "/public/../api/./orders",
        "/%61pi/%6Frders?x=1",
        "/api/%2e%2e/admin",
        "/../../etc/passwd",
        "/a%20b/%3f/caf\u{e9}",
        "/admin%2fsecret",
    ]
    .iter()
    .enumerate()
    {
        seeds.write("path", &i.to_string(), path)?;
    }
    Ok(())
}

fn routes(seeds: &mut Seeds, repo: &Path) -> anyhow::Result<()> {
    let canary = std::fs::read_to_string(repo.join("examples/policies/checkout-canary.yaml"))?;
    let spec = canary.split_once("spec:\n").map(|(_, s)| s).unwrap_or_default();
    let spec: String = spec.lines().map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l))).collect();
    seeds.write("route", "canary-acme", format!("GET /checkout\nx-tenant: acme\n\n{spec}"))?;
    seeds.write("route", "canary-other", format!("POST /checkout?x=1\n\n{spec}"))?;
    let every_match = "service: s\nroutes:\n  - name: exact\n    match: {path: /health}\n  - name: regex\n    match: {pathRegex: \"/users/[0-9]+\", methods: [GET, HEAD]}\n  - name: header-prefix\n    match: {headers: {x-user: {prefix: \"beta-\"}}}\n    backends: [{subset: v2, weight: 30}, {subset: v1, weight: 70}]\n  - name: header-regex\n    match: {headers: {x-order: {regex: \"[A-Z]{2}-[0-9]+\"}}}\n  - name: header-present\n    match: {headers: {x-debug: {present: true}}}\n  - name: query\n    match: {query: {tier: gold, q: {prefix: \"a b\"}}}\n    retry: {attempts: 2, on: [5xx, reset]}\n";
    for (name, head) in [
        ("exact", "GET /health"),
        ("regex", "HEAD /users/42"),
        ("header", "GET /\nx-user: beta-7\nx-order: EU-17"),
        ("query", "GET /x?q=a%20bc&tier=gold"),
    ] {
        seeds.write("route", name, format!("{head}\n\n{every_match}"))?;
    }
    Ok(())
}

fn hosts(seeds: &mut Seeds) -> anyhow::Result<()> {
    for (i, host) in [
        "orders-api",
        "orders-api:8080",
        "orders-api.shop.svc.weft.local:80",
        "[::1]:8080",
        "127.0.0.1:9000",
        "httpbe.evil.com",
        "Example.COM.",
    ]
    .iter()
    .enumerate()
    {
        seeds.write("host", &i.to_string(), host)?;
    }
    Ok(())
}

fn tokens(seeds: &mut Seeds) -> anyhow::Result<()> {
    let token = fuzz::join_token();
    seeds.write("token", "on-record", &token)?;
    let (signed, _) = token.rsplit_once('.').context("a token has a signature")?;
    seeds.write("token", "bad-signature", format!("{signed}.AAAA"))?;
    let (_, claims, _) = weft_api::token::split(&token)?;
    let other = weft_api::token::Claims {
        ns: "evil".into(),
        ..claims
    };
    seeds.write("token", "unsigned-claims", format!("{}.AA", other.signed_part()))
}

fn csrs(seeds: &mut Seeds) -> anyhow::Result<()> {
    let identity = fuzz::identity("default", "orders");
    let cases: [(&str, Vec<rcgen::SanType>); 4] = [
        ("no-name", vec![]),
        ("identity", vec![rcgen::SanType::URI(identity.as_str().try_into()?)]),
        (
            "other-identity",
            vec![rcgen::SanType::URI("spiffe://weft.local/ns/kube-system/sa/admin".try_into()?)],
        ),
        ("dns-name", vec![rcgen::SanType::DnsName("orders.default.svc".try_into()?)]),
    ];
    for (name, sans) in cases {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = sans;
        let request = params.serialize_request(&key)?;
        seeds.write("csr", &format!("{name}.der"), request.der())?;
    }
    let key = rcgen::KeyPair::generate()?;
    let pem = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    seeds.write("csr", "pem", pem)
}

fn proxy_messages(seeds: &mut Seeds) -> anyhow::Result<()> {
    let msg = |m: proxy_message::Msg| proto::ProxyMessage { msg: Some(m) };
    let register = msg(proxy_message::Msg::Register(proto::Register {
        namespace: "default".into(),
        name: "orders".into(),
        cluster: "cluster-a".into(),
        labels: [("version".to_string(), "v1".to_string()), ("service".into(), "orders".into())].into(),
        inbound_addr: "127.0.0.1:15006".into(),
        services: vec!["payments".into()],
        applied_revision: 3,
        token: fuzz::join_token(),
        // Empty, as from a proxy older than the field: the seed's bytes stay as they were.
        version: String::new(),
    }));
    let latency: Vec<u32> = [2.0, 5.0, 120.0]
        .iter()
        .map(|ms| weft_api::telemetry::slot_of(*ms) as u32)
        .collect();
    let stats = |direction: proto::Direction, service: &str| proto::TrafficStats {
        direction: direction as i32,
        service: service.into(),
        requests: 120,
        errors: 3,
        revision: 3,
        route: "default".into(),
        mtls: 120,
        latency_slots: latency.clone(),
        latency_counts: vec![100, 19, 1],
    };
    let telemetry = msg(proxy_message::Msg::Telemetry(proto::TelemetryReport {
        interval_ms: 1000,
        stats: vec![stats(proto::Direction::Outbound, "payments"), stats(proto::Direction::Inbound, "")],
        cert_not_after_unix: 1_900_000_000,
        cert_generation: 1,
        cost: Some(proto::ProxyCost {
            cpu_micros: 1_250_000,
            resident_bytes: 24 << 20,
            private_bytes: 18 << 20,
            inbound_slots: latency.clone(),
            inbound_counts: vec![100, 19, 1],
            outbound_slots: latency.clone(),
            outbound_counts: vec![90, 9, 1],
        }),
    }));
    let stream = [
        register.clone(),
        msg(proxy_message::Msg::Subscribe(proto::Subscribe {
            services: vec!["payments".into(), "inventory".into()],
        })),
        msg(proxy_message::Msg::Ack(proto::Ack { version: 1, revision: 3 })),
        msg(proxy_message::Msg::Nack(proto::Nack {
            version: 2,
            revision: 4,
            reason: "services[0].endpoints[0].address: not a socket address".into(),
        })),
        telemetry,
        msg(proxy_message::Msg::Tap(proto::TapEvents {
            events: vec![proto::TapEvent {
                taps: vec![1],
                time_ms: 1_700_000_000_000,
                direction: "outbound".into(),
                source: "spiffe://weft.local/ns/default/sa/orders".into(),
                destination: "spiffe://weft.local/ns/default/sa/payments".into(),
                service: "payments".into(),
                route: "default".into(),
                method: "GET".into(),
                authority: "payments:8080".into(),
                path: "/charge".into(),
                status: 200,
                reason: String::new(),
                duration_ms: 4.5,
                upstream: "127.0.0.1:15006".into(),
                proxy: "default/orders".into(),
            }],
        })),
    ];
    seeds.write("proxy_message", "register", encode(&stream[..1]))?;
    seeds.write("proxy_message", "stream", encode(&stream))?;
    seeds.write("proxy_message", "register-twice", encode(&[register.clone(), register]))
}

fn control_messages(seeds: &mut Seeds, repo: &Path) -> anyhow::Result<()> {
    let canary = weft_api::resource::parse_resources(
        &std::fs::read_to_string(repo.join("examples/policies/checkout-canary.yaml"))?,
        "checkout-canary.yaml",
    )?;
    let weft_api::Resource::TrafficPolicy(policy) = &canary[0] else {
        anyhow::bail!("checkout-canary.yaml holds a TrafficPolicy");
    };
    let endpoint = |address: &str, version: &str| proto::Endpoint {
        address: address.into(),
        cluster: "cluster-a".into(),
        labels: [("version".to_string(), version.to_string())].into(),
        workload: "default/checkout-api".into(),
        identity: "spiffe://weft.local/ns/default/sa/checkout-api".into(),
        key: 0,
    };
    let config = proto::ProxyConfig {
        version: 4,
        revision: 9,
        proxy_id: "default/orders#1".into(),
        services: vec![
            proto::Service {
                name: "checkout-api".into(),
                namespace: "default".into(),
                endpoints: vec![endpoint("127.0.0.1:15006", "v1"), endpoint("[::1]:15007", "v2")],
                traffic_policy_json: serde_json::to_string(&policy.spec)?,
                policy_name: "default/checkout-canary".into(),
                mtls: "strict".into(),
                unknown: false,
                virtual_ip: "240.240.1.2".into(),
                endpoint_version: 0,
            },
            proto::Service {
                name: "payments".into(),
                namespace: "default".into(),
                mtls: "off".into(),
                ..Default::default()
            },
        ],
        bypass: false,
        security_policy_json: r#"{"selector":{"service":"orders"},"mtls":"permissive","authorization":{"default":"allow","rules":[{"action":"deny","to":{"paths":["/admin/*"]}}]}}"#.into(),
        security_policy_name: "default/orders".into(),
        trust_bundle_pem: fuzz::bundle_pem(),
        ca_generation: 1,
        inbound_rate_limit_json: r#"{"requestsPerSecond":50,"burst":10,"at":"inbound"}"#.into(),
    };
    let message = |m: control_message::Msg| proto::ControlMessage { msg: Some(m) }.encode_to_vec();
    seeds.write("control_message", "config", message(control_message::Msg::Config(config)))?;
    seeds.write(
        "control_message",
        "taps",
        message(control_message::Msg::Taps(proto::TapList {
            taps: vec![proto::Tap {
                id: 1,
                service: "payments".into(),
            }],
        })),
    )
}

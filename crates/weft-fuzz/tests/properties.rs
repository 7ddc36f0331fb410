//! Properties of the parsers, checked on generated inputs (proptest), where a property says
//! more than "does not panic": what is written and read back is what was meant.

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::time::Duration;
use weft_api::resource::{Route, RouteMatch, StringMatch, TrafficPolicySpec};
use weft_control::fuzz;
use weft_fuzz::{framing, path};
use weft_proxy::authz::normalize;
use weft_proxy::route::{CompiledRoute, compile, decide};

/// One request on a connection: a head and a body framed by length or by chunks.
#[derive(Clone, Debug)]
struct Request {
    method: &'static str,
    path: String,
    body: Vec<u8>,
    /// `Some(sizes)`: chunked, cut into chunks of these sizes (the rest in one last chunk).
    chunks: Option<Vec<usize>>,
}

impl Request {
    /// The request's bytes as a client sends them.
    fn serialize(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(format!("{} {} HTTP/1.1\r\nHost: orders\r\n", self.method, self.path).as_bytes());
        let Some(sizes) = &self.chunks else {
            out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", self.body.len()).as_bytes());
            out.extend_from_slice(&self.body);
            return;
        };
        out.extend_from_slice(b"Transfer-Encoding: gzip, chunked\r\n\r\n");
        let mut rest = &self.body[..];
        for wanted in sizes.iter().copied().chain([usize::MAX]) {
            let size = wanted.min(rest.len());
            if size == 0 {
                continue;
            }
            out.extend_from_slice(format!("{size:X};x=1\r\n").as_bytes());
            out.extend_from_slice(&rest[..size]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[size..];
        }
        out.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
    }
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop::sample::select(vec!["GET", "POST", "PUT"]),
        "/[a-z0-9/]{0,12}",
        // Bodies full of what a confused scanner would take for framing.
        prop::collection::vec(
            prop_oneof![
                any::<u8>().prop_map(|b| vec![b]),
                Just(b"\r\n".to_vec()),
                Just(b"\r\n\r\n".to_vec()),
                Just(b"GET /x HTTP/1.1\r\nContent-Length: 9\r\n".to_vec()),
                Just(b"0\r\n\r\n".to_vec()),
            ],
            0..12,
        )
        .prop_map(|parts| parts.concat()),
        prop::option::of(prop::collection::vec(1usize..20, 0..4)),
    )
        .prop_map(|(method, path, body, chunks)| Request {
            method,
            path,
            body,
            chunks,
        })
}

/// One path segment, including every spelling of `.` and `..` and raw UTF-8.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]{1,3}",
        Just(String::new()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2e".to_string()),
        Just("%2E%2e".to_string()),
        Just(".%2E".to_string()),
        Just("%41%7e".to_string()),
        Just("%25".to_string()),
        Just("%3f".to_string()),
        Just("caf\u{e9}".to_string()),
        Just("\u{1f980}".to_string()),
    ]
}

/// A query value as a client may encode it: every byte as `%XX`, spaces as `+` or `%20`.
fn percent_encoded(value: &str, plus_for_space: bool) -> String {
    value
        .bytes()
        .map(|b| match b {
            b' ' if plus_for_space => "+".to_string(),
            b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
            other => format!("%{other:02x}"),
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// The scanner finds exactly the requests a client wrote, however their bodies look and
    /// however the bytes are cut into reads: after N unambiguous requests, only request N (which
    /// has both Content-Length and Transfer-Encoding) is refused.
    #[test]
    fn the_framing_scanner_finds_the_heads_that_were_written(
        requests in prop::collection::vec(request(), 0..6),
        seed in any::<u8>(),
    ) {
        let mut stream = Vec::new();
        for r in &requests {
            r.serialize(&mut stream);
        }
        stream.extend_from_slice(b"POST /smuggle HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        let verdicts = framing::outcome(&stream, framing::read_sizes(seed), framing::read_sizes(!seed)).verdicts;
        for (i, verdict) in verdicts.iter().enumerate() {
            prop_assert_eq!(verdict.is_some(), i == requests.len(), "request {} of {:?}", i, requests);
        }
    }

    /// A canonical path starts at the root, keeps no `.`, `..` or empty segment, and is its own
    /// canonical form; a path climbing above the root has none (it is refused, not clamped,
    /// so a route and an authorization rule never read it two ways).
    #[test]
    fn path_normalisation_is_idempotent_and_stays_under_the_root(
        segments in prop::collection::vec(segment(), 0..8),
        trailing in any::<bool>(),
    ) {
        let raw = format!("/{}{}", segments.join("/"), if trailing { "/" } else { "" });
        match normalize(&raw) {
            Ok(canonical) => path::check(&raw, &canonical),
            Err(why) => prop_assert_eq!(why, "'..' climbs above the root", "{}", raw),
        }
        let climbed = format!("/..{raw}");
        prop_assert!(normalize(&climbed).is_err(), "{} climbs above the root", climbed);
        let returned = format!("/x/..{raw}");
        prop_assert_eq!(normalize(&returned), normalize(&raw), "{} comes back to the root", returned);
    }

    /// A query matcher sees the value the client encoded, whatever the encoding.
    #[test]
    fn a_query_value_matches_through_its_percent_encoding(
        value in "\\PC{0,12}",
        plus_for_space in any::<bool>(),
    ) {
        let spec = TrafficPolicySpec {
            service: "orders".into(),
            routes: vec![Route {
                name: "tier".into(),
                match_: Some(RouteMatch {
                    query: BTreeMap::from([("tier".to_string(), StringMatch::Exact(value.clone()))]),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let routes = compile(Some(&spec));
        let default = CompiledRoute::default_route();
        let uri = format!("/x?a=1&tier={}&b", percent_encoded(&value, plus_for_space));
        let req = http::Request::get(&uri).body(()).expect("an encoded query is a valid URI").into_parts().0;
        prop_assert_eq!(&*decide(&routes, &default, &req).name, "tier", "{} does not match {:?}", uri, value);
    }

    /// A token carries its claims unchanged to the proxy (unverified) and to the control plane
    /// (verified), and any change to its text is refused.
    #[test]
    fn join_token_claims_read_back_and_any_change_is_refused(
        jti in "[a-z0-9-]{1,12}",
        ns in "\\PC{1,12}",
        name in "\\PC{1,12}",
        flip in any::<prop::sample::Index>(),
    ) {
        let token = fuzz::create_token(&jti, &ns, &name, Duration::from_secs(3600));
        let claims = weft_api::token::peek(&token).expect("a token the CA made reads");
        prop_assert_eq!((claims.jti.as_str(), claims.ns.as_str(), claims.name.as_str()), (jti.as_str(), ns.as_str(), name.as_str()));
        prop_assert_eq!(fuzz::verify_token(&token).ok(), Some(claims));
        let mut changed = token.clone().into_bytes();
        let at = flip.index(changed.len());
        changed[at] = if changed[at] == b'A' { b'B' } else { b'A' };
        let changed = String::from_utf8(changed).expect("tokens are ASCII");
        prop_assert!(fuzz::verify_token(&changed).is_err(), "{} verified after a change at {}", changed, at);
    }
}

use super::*;

const CANARY: &str = r#"
apiVersion: weft/v1
kind: TrafficPolicy
metadata: { name: checkout-canary, namespace: default }
spec:
  service: checkout-api
  routes:
    - name: acme-canary
      match: { headers: { x-tenant: acme }, pathPrefix: /, methods: [GET, POST] }
      backends: [ { subset: v2, weight: 10 }, { subset: v1, weight: 90 } ]
      timeout: 2s
      retry: { attempts: 2, perTryTimeout: 500ms, on: [connect-failure, 503, unavailable],
               budget: { ratio: 20, minPerSecond: 10 } }
      fault: { delay: { percent: 5, duration: 100ms }, abort: { percent: 1, status: 503 } }
      mirror: { subset: v3, percent: 10 }
  loadBalancer: p2c-ewma
  connectionPool: { maxConnections: 1024, maxPendingRequests: 1024 }
  outlierDetection: { consecutiveFailures: 5, ejection: 30s, maxEjectedPercent: 50 }
  failover: [ cluster-a, cluster-b, cluster-c ]
  rateLimit: { requestsPerSecond: 100, burst: 200 }
---
apiVersion: weft/v1
kind: SecurityPolicy
metadata: { name: globex-strict }
spec:
  selector: { service: checkout-api, labels: { tenant: globex } }
  mtls: strict
  authorization:
    mode: enforce
    default: deny
    rules:
      - action: allow
        from: { identities: ["spiffe://weft.local/ns/default/sa/mobile-gateway"], namespaces: [default] }
        to:   { paths: ["/api/*"], methods: [GET] }
"#;

fn errors_of(text: &str) -> Vec<FieldError> {
    parse_objects(text, "policy.yaml").expect_err("must be rejected").errors
}

#[test]
fn the_design_example_parses_whole() {
    let objs = parse_objects(CANARY, "policy.yaml").unwrap();
    assert_eq!(objs.len(), 2);
    let Object::Resource(Resource::TrafficPolicy(tp)) = &objs[0] else {
        panic!("first is a TrafficPolicy")
    };
    assert_eq!(
        tp.spec.routes[0].backends[0],
        Backend {
            subset: "v2".into(),
            weight: 10
        }
    );
    assert_eq!(tp.spec.routes[0].retry.as_ref().unwrap().on[1], RetryOn::Status(503));
    let Object::Resource(sp) = &objs[1] else { panic!() };
    assert_eq!(sp.key().to_string(), "SecurityPolicy/default/globex-strict");
    assert_eq!(tp.spec.subsets("spec").len(), 3);
}

#[test]
fn json_is_accepted_too() {
    let json = r#"{"apiVersion":"weft/v1","kind":"TrafficPolicy","metadata":{"name":"t"},"spec":{"service":"orders-api","routes":[{"timeout":"5s"}]}}"#;
    let r = parse_resources(json, "body").unwrap();
    assert_eq!(r[0].service(), "orders-api");
    assert_eq!(r[0].metadata().namespace, "default");
}

#[test]
fn unknown_field_is_named_with_its_path() {
    let errs = errors_of(
        "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  service: a\n  routes:\n    - timeout: 1s\n      retires: {attempts: 2}\n",
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].field.starts_with("spec.routes[0]"), "{errs:?}");
    assert!(errs[0].message.contains("retires"), "{errs:?}");
}

#[test]
fn bad_duration_names_field_and_value() {
    let errs = errors_of("apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: t}\nspec: {service: a, routes: [{timeout: 5x}]}\n");
    assert_eq!(errs[0].field, "spec.routes[0].timeout");
    assert_eq!(errs[0].value, "5x");
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let errs = errors_of(
        "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: Bad_Name}\nspec:\n  service: a\n  routes:\n    - backends: [{subset: v1, weight: 60}, {subset: v2, weight: 30}]\n      fault: {abort: {percent: 150, status: 503}}\n      match: {methods: [FETCH]}\n",
    );
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert!(fields.contains(&"spec.routes[0].backends"), "{fields:?}");
    assert!(fields.contains(&"spec.routes[0].fault.abort.percent"), "{fields:?}");
    assert!(fields.contains(&"spec.routes[0].match.methods[0]"), "{fields:?}");
    assert!(fields.contains(&"metadata.name"), "{fields:?}");
    let weights = errs.iter().find(|e| e.field == "spec.routes[0].backends").unwrap();
    assert_eq!(weights.value, "90");
}

#[test]
fn documents_are_numbered_in_multi_document_files() {
    let text = format!("{CANARY}\n---\napiVersion: weft/v2\nkind: TrafficPolicy\nmetadata: {{name: x}}\nspec: {{service: a}}\n");
    let errs = errors_of(&text);
    assert_eq!(errs[0].field, "[2].apiVersion");
    assert_eq!(errs[0].value, "weft/v2");
}

#[test]
fn wrong_kind_and_wrong_types_are_rejected() {
    assert_eq!(errors_of("apiVersion: weft/v1\nkind: Gateway\nspec: {}\n")[0].field, "kind");
    let errs = errors_of(
        "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: t}\nspec: {service: a, routes: [{backends: [{subset: v1, weight: lots}]}]}\n",
    );
    assert_eq!(errs[0].field, "spec.routes[0].backends[0].weight");
    assert_eq!(errs[0].value, "lots");
    assert!(parse_objects("a: [unclosed", "f.yaml").is_err());
}

#[test]
fn the_shipped_intents_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/intents");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let objs = parse_objects(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(objs[..], [Object::Intent(_)]), "{}", path.display());
        n += 1;
    }
    assert!(n >= 5, "the seed's four intents and the bad one ship: found {n}");
}

#[test]
fn intents_validate_their_nested_resources() {
    let text = r#"
apiVersion: weft/v1
kind: Intent
metadata: { name: mesh-900 }
spec:
  title: bad
  target: orders-api
  scope: order:7712
  change:
    apply:
      - apiVersion: weft/v1
        kind: TrafficPolicy
        metadata: { name: t }
        spec: { service: orders-api, routes: [ { timeout: never } ] }
  rollout: { stages: [50, 10], bake: 30s, mode: manual }
"#;
    let errs = errors_of(text);
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert!(fields.contains(&"spec.change.apply[0].spec.routes[0].timeout"), "{fields:?}");
    assert!(fields.contains(&"spec.rollout.stages"), "{fields:?}");
}

#[test]
fn slo_confidence_and_on_inconclusive() {
    let intent = |slo: &str| {
        format!(
            "apiVersion: weft/v1\nkind: Intent\nmetadata: {{ name: mesh-901 }}\nspec:\n  title: t\n  target: orders-api\n  change: {{ delete: [{{ kind: TrafficPolicy, namespace: default, name: t }}] }}\n  slo: {slo}\n"
        )
    };
    let objs = parse_objects(&intent("{ maxErrorRate: 1 }"), "f.yaml").unwrap();
    let [Object::Intent(i)] = &objs[..] else { panic!() };
    assert_eq!((i.spec.slo.confidence, i.spec.slo.on_inconclusive), (99.0, OnInconclusive::Hold));
    let objs = parse_objects(&intent("{ confidence: 99.9, onInconclusive: promote }"), "f.yaml").unwrap();
    let [Object::Intent(i)] = &objs[..] else { panic!() };
    assert_eq!((i.spec.slo.confidence, i.spec.slo.on_inconclusive), (99.9, OnInconclusive::Promote));
    for bad in ["100", "40", "-1"] {
        let errs = errors_of(&intent(&format!("{{ confidence: {bad} }}")));
        assert_eq!(errs[0].field, "spec.slo.confidence", "{errs:?}");
        assert_eq!(errs[0].value, bad.trim_start_matches('+'), "{errs:?}");
    }
    let errs = errors_of(&intent("{ onInconclusive: maybe }"));
    assert!(errs[0].field.contains("onInconclusive"), "{errs:?}");
    assert!(
        errs.iter().any(|e| e.to_string().contains("maybe") || e.value.contains("maybe")),
        "{errs:?}"
    );
}

#[test]
fn stages_are_percentages_or_namespaces() {
    let intent = |stages: &str| {
        format!(
            "apiVersion: weft/v1\nkind: Intent\nmetadata: {{ name: mesh-902 }}\nspec:\n  title: t\n  target: orders-api\n  change: {{ delete: [{{ kind: TrafficPolicy, namespace: default, name: t }}] }}\n  rollout: {{ stages: {stages} }}\n"
        )
    };
    let stages_of = |stages: &str| {
        let objs = parse_objects(&intent(stages), "f.yaml").unwrap();
        let [Object::Intent(i)] = &objs[..] else { panic!() };
        i.spec.rollout.stages.clone()
    };
    // The seed's form, the issue's form, and both mixed.
    assert_eq!(stages_of("[50, 100]"), [Stage::Percent(50.0), Stage::Percent(100.0)]);
    let mixed = stages_of("[{namespaces: [team-a, team-b]}, {percent: 50}, 100]");
    assert_eq!(
        mixed,
        [
            Stage::Namespaces(vec!["team-a".into(), "team-b".into()]),
            Stage::Percent(50.0),
            Stage::Percent(100.0)
        ]
    );
    assert_eq!(mixed[0].to_string(), "namespaces team-a, team-b");
    assert_eq!(mixed[1].to_string(), "50%");
    // Stored as written before namespace stages: a percent stage is a bare number.
    assert_eq!(
        serde_json::to_string(&mixed).unwrap(),
        r#"[{"namespaces":["team-a","team-b"]},50.0,100.0]"#
    );
    let field_value = |stages: &str| {
        errors_of(&intent(stages))
            .into_iter()
            .map(|e| (e.field, e.value))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        field_value("[{namespaces: [Team_A]}, 100]"),
        [("spec.rollout.stages[0].namespaces[0]".to_string(), "Team_A".to_string())]
    );
    assert_eq!(
        field_value("[{namespaces: [a]}, {namespaces: [a]}, 100]"),
        [("spec.rollout.stages[1].namespaces[0]".to_string(), "a".to_string())]
    );
    assert_eq!(
        field_value("[{namespaces: []}, 100]"),
        [("spec.rollout.stages[0].namespaces".to_string(), "[]".to_string())]
    );
    // A namespace stage cannot be the last: the rollout must end with every proxy.
    assert_eq!(
        field_value("[50, {namespaces: [a]}]"),
        [("spec.rollout.stages".to_string(), "[50, {namespaces: [a]}]".to_string())]
    );
    let errs = errors_of(&intent("[{team: a}, 100]"));
    assert_eq!(errs[0].field, "spec.rollout.stages[0]", "{errs:?}");
    assert!(errs[0].message.contains("{namespaces: [NAME, ...]}"), "{errs:?}");
}

/// Found from outside: `POST /api/v1/freeze {}` answered `field: ""`. A missing field is the
/// field named, at its path, with no value.
#[test]
fn a_missing_field_is_named_at_its_path() {
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Toggle {
        enabled: bool,
        inner: Option<Inner>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        name: String,
    }
    let err = super::from_value::<Toggle>(&serde_json::json!({})).unwrap_err();
    assert_eq!((err.field.as_str(), err.value.as_str()), ("enabled", ""), "{err:?}");
    assert!(err.message.contains("missing field `enabled`"), "{err:?}");
    let err = super::from_value::<Toggle>(&serde_json::json!({"enabled": true, "inner": {}})).unwrap_err();
    assert_eq!(err.field, "inner.name", "{err:?}");
    let err = super::from_value::<Toggle>(&serde_json::json!({"enabled": "yes"})).unwrap_err();
    assert_eq!((err.field.as_str(), err.value.as_str()), ("enabled", "yes"), "{err:?}");
}

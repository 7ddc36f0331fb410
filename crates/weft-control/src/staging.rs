//! Which proxies a stage treats. A percent stage takes its share of the traffic
//! ([`rollout::choose`]); a namespace stage takes exactly the proxies of its namespaces that the
//! change concerns. Either way a stage keeps every proxy an earlier stage treated: a rollout only
//! grows.

use crate::rollout::{self, Candidate};
use std::collections::BTreeSet;
use weft_api::resource::Stage;

/// A proxy that enforces the change, and the namespace of its workload.
pub(crate) struct Enforcer {
    pub(crate) namespace: String,
    pub(crate) candidate: Candidate,
}

/// What a stage treats: every proxy (the earlier stages' and its own), the ones it adds in
/// rollout order, and the share of the changed services' traffic all of them carry.
#[derive(Debug, PartialEq)]
pub(crate) struct StageChoice {
    pub(crate) treated: BTreeSet<String>,
    pub(crate) added: Vec<String>,
    pub(crate) traffic_share: f64,
}

/// Chooses the proxies `stage` treats among `enforcers`, after the earlier stages' `treated`.
pub(crate) fn choose(stage: &Stage, enforcers: Vec<Enforcer>, treated: &BTreeSet<String>) -> StageChoice {
    match stage {
        Stage::Percent(share) => by_share(*share, enforcers, treated),
        Stage::Namespaces(namespaces) => by_namespace(namespaces, enforcers, treated),
    }
}

/// The last stage (100%) takes every enforcer; any other its share of the traffic.
fn by_share(share: f64, enforcers: Vec<Enforcer>, treated: &BTreeSet<String>) -> StageChoice {
    let candidates: Vec<Candidate> = enforcers.into_iter().map(|e| e.candidate).collect();
    let mut kept = treated.clone();
    if share >= 100.0 {
        kept.extend(candidates.iter().map(|c| c.id.clone()));
    }
    let choice = rollout::choose(candidates, &kept, share);
    kept.extend(choice.added.iter().cloned());
    StageChoice {
        treated: kept,
        added: choice.added,
        traffic_share: choice.traffic_share,
    }
}

/// Exactly the enforcers in `namespaces`, added to what earlier stages treated. Their traffic
/// share is weighed by the same rule as a percent stage's (a zero-percent choice that keeps
/// them), so the two kinds of stage report comparable numbers.
fn by_namespace(namespaces: &[String], enforcers: Vec<Enforcer>, treated: &BTreeSet<String>) -> StageChoice {
    let mut added: Vec<String> = enforcers
        .iter()
        .filter(|e| namespaces.contains(&e.namespace) && !treated.contains(&e.candidate.id))
        .map(|e| e.candidate.id.clone())
        .collect();
    added.sort();
    added.dedup();
    let mut all = treated.clone();
    all.extend(added.iter().cloned());
    let candidates = enforcers.into_iter().map(|e| e.candidate).collect();
    let traffic_share = rollout::choose(candidates, &all, 0.0).traffic_share;
    StageChoice {
        treated: all,
        added,
        traffic_share,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enforcer(namespace: &str, name: &str, requests: u64) -> Enforcer {
        Enforcer {
            namespace: namespace.into(),
            candidate: Candidate {
                id: format!("{namespace}/{name}"),
                cluster: "a".into(),
                requests: Some(requests),
            },
        }
    }

    fn fleet() -> Vec<Enforcer> {
        vec![
            enforcer("team-a", "web", 100),
            enforcer("team-a", "batch", 100),
            enforcer("team-b", "web", 600),
            enforcer("default", "web", 200),
        ]
    }

    #[test]
    fn a_namespace_stage_treats_exactly_its_namespaces() {
        let none = BTreeSet::new();
        let a = choose(&Stage::Namespaces(vec!["team-a".into()]), fleet(), &none);
        assert_eq!(a.added, ["team-a/batch", "team-a/web"]);
        assert_eq!(a.treated, a.added.iter().cloned().collect());
        assert!((a.traffic_share - 20.0).abs() < 1e-9, "{a:?}");
        // Two namespaces: both, and nothing else.
        let ab = choose(&Stage::Namespaces(vec!["team-a".into(), "default".into()]), fleet(), &none);
        assert_eq!(ab.added, ["default/web", "team-a/batch", "team-a/web"]);
        // A namespace no enforcer is in adds nothing.
        let empty = choose(&Stage::Namespaces(vec!["team-z".into()]), fleet(), &none);
        assert!(empty.treated.is_empty() && empty.traffic_share == 0.0, "{empty:?}");
    }

    #[test]
    fn later_stages_keep_the_namespace_s_proxies() {
        let first = choose(&Stage::Namespaces(vec!["team-a".into()]), fleet(), &BTreeSet::new());
        // 50% of the traffic: team-a's 20% stays, and the least that reaches 50% is added.
        let half = choose(&Stage::Percent(50.0), fleet(), &first.treated);
        assert!(first.treated.is_subset(&half.treated), "{half:?}");
        assert_eq!(half.added, ["team-b/web"]);
        assert!((half.traffic_share - 80.0).abs() < 1e-9, "{half:?}");
        let all = choose(&Stage::Percent(100.0), fleet(), &half.treated);
        assert_eq!(all.treated.len(), 4);
        // A namespace stage after a percent stage adds its namespace to what was treated.
        let then = choose(&Stage::Namespaces(vec!["default".into()]), fleet(), &half.treated);
        assert_eq!(then.added, ["default/web"]);
        assert_eq!(then.treated.len(), 4);
    }
}

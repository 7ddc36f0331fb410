//! A rollout stage: a share of the traffic, or the proxies of some namespaces.

use crate::error::FieldError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Value, json};
use std::fmt;

/// One stage of a rollout. Written `50` or `{percent: 50}` (the callers or instances carrying
/// that share of the traffic), or `{namespaces: [team-a]}` (exactly the proxies of those
/// namespaces that the change concerns). Every stage keeps what the earlier ones treated.
#[derive(Clone, Debug, PartialEq)]
pub enum Stage {
    Percent(f64),
    Namespaces(Vec<String>),
}

const FORMS: &str = "must be a percentage (50 or {percent: 50}) or {namespaces: [NAME, ...]}";

// === impl Stage ===

impl Stage {
    /// The percentage of a percent stage.
    pub fn percent(&self) -> Option<f64> {
        match self {
            Stage::Percent(p) => Some(*p),
            Stage::Namespaces(_) => None,
        }
    }

    /// The namespaces of a namespace stage (none for a percent stage).
    pub fn namespaces(&self) -> &[String] {
        match self {
            Stage::Percent(_) => &[],
            Stage::Namespaces(ns) => ns,
        }
    }

    /// Reads one stage from its written form; the error says which forms there are.
    fn from_value(v: Value) -> Result<Self, String> {
        let Value::Object(map) = v else {
            return v.as_f64().map(Stage::Percent).ok_or_else(|| FORMS.to_string());
        };
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        match (keys.as_slice(), map.values().next()) {
            (["percent"], Some(p)) => p.as_f64().map(Stage::Percent).ok_or_else(|| format!("percent {FORMS}")),
            (["namespaces"], Some(Value::Array(ns))) => ns
                .iter()
                .map(|n| n.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(Stage::Namespaces)
                .ok_or_else(|| format!("namespaces {FORMS}")),
            _ => Err(FORMS.to_string()),
        }
    }
}

impl fmt::Display for Stage {
    /// `10%`, or `namespaces team-a, team-b`: how decisions and the ledger name a stage.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Percent(p) => write!(f, "{p}%"),
            Stage::Namespaces(ns) => write!(f, "namespaces {}", ns.join(", ")),
        }
    }
}

impl Serialize for Stage {
    /// A percent stage as a bare number (as every stage was before namespace stages), a
    /// namespace stage as `{namespaces: [...]}`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Stage::Percent(p) => p.serialize(s),
            Stage::Namespaces(ns) => json!({ "namespaces": ns }).serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Stage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Stage::from_value(Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Checks a rollout's stages: percentages in (0, 100] that increase, namespace stages that
/// name at least one valid namespace and none an earlier stage named, and a last stage of 100%.
pub(super) fn check_stages(field: &str, stages: &[Stage], errors: &mut Vec<FieldError>) {
    let percents: Vec<f64> = stages.iter().filter_map(Stage::percent).collect();
    let increasing = percents.windows(2).all(|w| w[0] < w[1]);
    let in_range = percents.iter().all(|p| *p > 0.0 && *p <= 100.0);
    let last = stages.last().and_then(Stage::percent);
    if !increasing || !in_range || last != Some(100.0) {
        errors.push(FieldError::new(
            field,
            written(stages),
            "percentages must increase within (0, 100] and the last stage must be 100",
        ));
    }
    let mut seen = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        let Stage::Namespaces(ns) = stage else { continue };
        let at = format!("{field}[{i}].namespaces");
        if ns.is_empty() {
            errors.push(FieldError::new(&at, "[]", "must name at least one namespace"));
        }
        for (j, n) in ns.iter().enumerate() {
            super::check_name(&format!("{at}[{j}]"), n, errors);
            if seen.contains(&n) {
                errors.push(FieldError::new(
                    format!("{at}[{j}]"),
                    n,
                    "an earlier stage already treats this namespace",
                ));
            }
            seen.push(n);
        }
    }
}

/// The stages as written in YAML's flow style, for error messages: `[{namespaces: [a]}, 100]`.
fn written(stages: &[Stage]) -> String {
    let parts: Vec<String> = stages
        .iter()
        .map(|s| match s {
            Stage::Percent(p) => p.to_string(),
            Stage::Namespaces(ns) => format!("{{namespaces: [{}]}}", ns.join(", ")),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

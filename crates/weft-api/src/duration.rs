//! Durations as users write them: `250ms`, `2s`, `1m`, `1h`, or a sum such as `1m30s`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A non-negative duration written in the resource model's notation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {value:?}: expected a number with a unit (ms, s, m, h), e.g. 250ms, 2s, 1m")]
pub struct ParseDurationError {
    pub value: String,
}

// === impl Duration ===

impl Duration {
    pub fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }

    pub fn as_std(self) -> std::time::Duration {
        self.0
    }
}

impl std::str::FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDurationError { value: s.to_string() };
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(err());
        }
        let mut total = std::time::Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
            if digits == 0 {
                return Err(err());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| err())?;
            rest = &rest[digits..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let part = match &rest[..unit_len] {
                "ms" => std::time::Duration::from_millis(n),
                "s" => std::time::Duration::from_secs(n),
                "m" => std::time::Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
                "h" => std::time::Duration::from_secs(n.checked_mul(3600).ok_or_else(err)?),
                _ => return Err(err()),
            };
            total = total.checked_add(part).ok_or_else(err)?;
            rest = &rest[unit_len..];
        }
        // Written back in its largest exact unit, which may be milliseconds: a total with more
        // milliseconds than a u64 holds would be written as a number no parse reads back.
        if total.as_millis() > u128::from(u64::MAX) {
            return Err(err());
        }
        Ok(Self(total))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            write!(f, "0s")
        } else if ms.is_multiple_of(3_600_000) {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        let ms = |s: &str| s.parse::<Duration>().unwrap().0.as_millis();
        assert_eq!(ms("250ms"), 250);
        assert_eq!(ms("2s"), 2000);
        assert_eq!(ms("1m"), 60_000);
        assert_eq!(ms("1h"), 3_600_000);
        assert_eq!(ms("1m30s"), 90_000);
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        for bad in ["", "5", "s", "5x", "-1s", "1.5s", "2 s", "ms5", "18446744073709551615s1ms"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["250ms", "2s", "1m", "1h", "1500ms", "18446744073709551615ms"] {
            assert_eq!(s.parse::<Duration>().unwrap().to_string(), s);
        }
    }
}

//! Parsers for the compact flag values of the command line: durations (`500ms`, `30s`, `2m`),
//! number lists (`1,4,8`), SLOs (`ttft=500ms,tpot=50ms,e2e=10s`), chain mixes
//! (`base=50,sql=30`) and chain fragments (`sql={"model":"m::sql"}`).
//!
//! clap calls these as value parsers, so a malformed flag is rejected before anything runs,
//! with an error that shows the expected shape.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// A flag value that does not have the expected shape.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "bad duration `{0}`: expected a number and a unit (us, ms, s, m, h), e.g. 500ms or 30s"
    )]
    Duration(String),
    #[error("bad list `{0}`: expected positive numbers separated by commas, e.g. 1,4,8")]
    List(String),
    #[error("bad SLO `{0}`: expected KEY=DURATION pairs with keys ttft, tpot, e2e, e.g. ttft=500ms,tpot=50ms")]
    Slo(String),
    #[error("bad mix `{0}`: expected NAME=WEIGHT pairs with integer weights, e.g. base=50,sql=30")]
    Mix(String),
    #[error("bad chain `{spec}`: expected NAME=JSON where JSON is an object ({reason})")]
    Chain { spec: String, reason: String },
    #[error("bad JSON object `{spec}`: {reason}")]
    Json { spec: String, reason: String },
}

/// Parses `500ms`, `30s`, `1.5s`, `2m`, `1h`, `250us`; a bare number is seconds.
pub fn duration(s: &str) -> Result<Duration, ParseError> {
    let bad = || ParseError::Duration(s.to_string());
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| bad())
}

/// Parses a comma-separated list of positive integers (`1,4,8,16`).
pub fn count_list(s: &str) -> Result<Vec<usize>, ParseError> {
    let items: Result<Vec<usize>, _> = s.split(',').map(|x| x.trim().parse::<usize>()).collect();
    match items {
        Ok(v) if !v.is_empty() && v.iter().all(|&n| n > 0) => Ok(v),
        _ => Err(ParseError::List(s.to_string())),
    }
}

/// Parses a comma-separated list of positive finite numbers (`0.5,1,2`).
pub fn number_list(s: &str) -> Result<Vec<f64>, ParseError> {
    let items: Result<Vec<f64>, _> = s.split(',').map(|x| x.trim().parse::<f64>()).collect();
    match items {
        Ok(v) if !v.is_empty() && v.iter().all(|&r| r.is_finite() && r > 0.0) => Ok(v),
        _ => Err(ParseError::List(s.to_string())),
    }
}

/// Parses percentiles (`50,90,95,99`, each in (0, 100]).
pub fn percentiles(s: &str) -> Result<Vec<f64>, ParseError> {
    let v = number_list(s)?;
    if v.iter().any(|&p| p > 100.0) {
        return Err(ParseError::List(s.to_string()));
    }
    Ok(v)
}

/// Service-level objectives: a request is "good" when it meets every one that is set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    #[serde(serialize_with = "crate::config::opt_ms")]
    pub ttft: Option<Duration>,
    #[serde(serialize_with = "crate::config::opt_ms")]
    pub tpot: Option<Duration>,
    #[serde(serialize_with = "crate::config::opt_ms")]
    pub e2e: Option<Duration>,
}

impl Slo {
    pub fn is_empty(&self) -> bool {
        self.ttft.is_none() && self.tpot.is_none() && self.e2e.is_none()
    }
}

/// Parses `ttft=500ms,tpot=50ms,e2e=10s` (any subset, each key once).
pub fn slo(s: &str) -> Result<Slo, ParseError> {
    let bad = || ParseError::Slo(s.to_string());
    let mut out = Slo::default();
    for pair in s.split(',') {
        let (key, value) = pair.split_once('=').ok_or_else(bad)?;
        let d = duration(value).map_err(|_| bad())?;
        let slot = match key.trim() {
            "ttft" => &mut out.ttft,
            "tpot" => &mut out.tpot,
            "e2e" | "e2el" => &mut out.e2e,
            _ => return Err(bad()),
        };
        if slot.replace(d).is_some() {
            return Err(bad());
        }
    }
    Ok(out)
}

/// One named share of the chain mix.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MixEntry {
    pub name: String,
    pub weight: u32,
}

/// Parses `base=50,sql=30,steer=20`: distinct names, integer weights, at least one positive.
pub fn mix(s: &str) -> Result<Vec<MixEntry>, ParseError> {
    let bad = || ParseError::Mix(s.to_string());
    let mut out: Vec<MixEntry> = Vec::new();
    for pair in s.split(',') {
        let (name, weight) = pair.split_once('=').ok_or_else(bad)?;
        let name = name.trim().to_string();
        let weight: u32 = weight.trim().parse().map_err(|_| bad())?;
        if name.is_empty() || out.iter().any(|e| e.name == name) {
            return Err(bad());
        }
        out.push(MixEntry { name, weight });
    }
    if out.iter().all(|e| e.weight == 0) {
        return Err(bad());
    }
    Ok(out)
}

/// A named request-body fragment (`--chain NAME=JSON`).
#[derive(Debug, Clone, PartialEq)]
pub struct ChainSpec {
    pub name: String,
    pub fragment: Value,
}

/// Parses `NAME={"json": "object"}`; only the first `=` splits, the JSON may contain more.
pub fn chain(s: &str) -> Result<ChainSpec, ParseError> {
    let bad = |reason: &str| ParseError::Chain {
        spec: s.to_string(),
        reason: reason.to_string(),
    };
    let (name, json) = s.split_once('=').ok_or_else(|| bad("no `=`"))?;
    let name = name.trim();
    if name.is_empty() || name == "base" {
        return Err(bad(
            "the name must be non-empty and not `base`, which means no fragment",
        ));
    }
    let fragment = json_object(json).map_err(|e| bad(&e.to_string()))?;
    Ok(ChainSpec {
        name: name.to_string(),
        fragment,
    })
}

/// Parses a JSON object (`--extra-body`).
pub fn json_object(s: &str) -> Result<Value, ParseError> {
    let bad = |reason: String| ParseError::Json {
        spec: s.to_string(),
        reason,
    };
    let v: Value = serde_json::from_str(s).map_err(|e| bad(e.to_string()))?;
    if !v.is_object() {
        return Err(bad("not an object".into()));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_reject_garbage() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "ms", "5 parsecs", "-1s", "1.2.3s"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lists_must_be_positive() {
        assert_eq!(count_list("1,4, 8"), Ok(vec![1, 4, 8]));
        assert!(count_list("1,0").is_err());
        assert!(count_list("").is_err());
        assert_eq!(number_list("0.5,2"), Ok(vec![0.5, 2.0]));
        assert!(number_list("1,inf").is_err());
        assert!(percentiles("50,101").is_err());
        assert_eq!(percentiles("99.9"), Ok(vec![99.9]));
    }

    #[test]
    fn slo_takes_any_subset_once() {
        let s = slo("ttft=500ms,e2e=10s").unwrap();
        assert_eq!(s.ttft, Some(Duration::from_millis(500)));
        assert_eq!(s.tpot, None);
        assert_eq!(s.e2e, Some(Duration::from_secs(10)));
        assert!(slo("ttft=1s,ttft=2s").is_err());
        assert!(slo("latency=1s").is_err());
        assert!(slo("ttft").is_err());
    }

    #[test]
    fn mix_needs_distinct_names_and_a_positive_weight() {
        let m = mix("base=50,sql=30").unwrap();
        assert_eq!(
            m[1],
            MixEntry {
                name: "sql".into(),
                weight: 30
            }
        );
        assert!(mix("a=1,a=2").is_err());
        assert!(mix("a=0").is_err());
        assert!(mix("a=x").is_err());
    }

    #[test]
    fn chain_splits_at_the_first_equals_and_needs_an_object() {
        let c = chain(r#"sql={"model":"m::sql","x":"a=b"}"#).unwrap();
        assert_eq!(c.name, "sql");
        assert_eq!(c.fragment["x"], "a=b");
        assert!(chain("sql=[1]").is_err());
        assert!(chain(r#"base={"a":1}"#).is_err());
        assert!(chain("nojson").is_err());
    }
}

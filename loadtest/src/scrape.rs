//! `--scrape-metrics`: the target's Prometheus `/metrics` text before and after a level, and the
//! increase of every counter it can parse, so server-side figures (tokens, preemptions, queue
//! time sums) can be set against what the client measured.
//!
//! Counters are the series of families typed `counter` (including the `_total` suffix of
//! OpenMetrics names), the `_sum` and `_count` of histograms and summaries, and untyped series
//! ending in `_total`. Gauges are kept in the texts only: their difference means nothing.
//! Histogram `_bucket` series are skipped to keep the summary readable.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

/// What a level's scrape found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scrape {
    #[serde(skip)]
    pub before: String,
    #[serde(skip)]
    pub after: String,
    /// Series (with labels, as written) to its increase over the level.
    pub deltas: BTreeMap<String, f64>,
    /// Why a scrape failed, when it did; the run goes on without it.
    pub error: Option<String>,
}

impl Scrape {
    pub fn new(before: String, after: String) -> Scrape {
        let deltas = counter_deltas(&before, &after);
        Scrape {
            before,
            after,
            deltas,
            error: None,
        }
    }
}

/// The increase of every counter series of `after`. A series missing from `before` counts
/// from zero: exporters create a labelled counter at its first increment.
pub fn counter_deltas(before: &str, after: &str) -> BTreeMap<String, f64> {
    let (b, _) = parse(before);
    let (a, types) = parse(after);
    a.into_iter()
        .filter(|(series, _)| is_counter(series, &types))
        .map(|(series, v)| {
            let old = b.get(&series).copied().unwrap_or(0.0);
            (series, v - old)
        })
        .collect()
}

/// Series values and family types (`# TYPE name type`) of one exposition text.
fn parse(text: &str) -> (HashMap<String, f64>, HashMap<String, String>) {
    let mut values = HashMap::new();
    let mut types = HashMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                types.insert(name.to_string(), kind.to_string());
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The value follows the series, whose labels may hold spaces: split after the `}`.
        let split = match line.rfind('}') {
            Some(close) => close + 1,
            None => line.find(char::is_whitespace).unwrap_or(line.len()),
        };
        let (series, rest) = line.split_at(split);
        if let Some(Ok(v)) = rest.split_whitespace().next().map(str::parse::<f64>) {
            values.insert(series.trim().to_string(), v);
        }
    }
    (values, types)
}

fn is_counter(series: &str, types: &HashMap<String, String>) -> bool {
    let name = series.split('{').next().unwrap_or(series);
    let typed = |family: &str| types.get(family).map(String::as_str);
    if typed(name) == Some("counter") {
        return true;
    }
    if let Some(family) = name.strip_suffix("_total") {
        return matches!(typed(family), Some("counter") | None);
    }
    for suffix in ["_sum", "_count"] {
        if let Some(family) = name.strip_suffix(suffix) {
            return matches!(typed(family), Some("histogram" | "summary"));
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "\
# TYPE graft_requests_total counter
graft_requests_total{route=\"chat\",status=\"200\"} 10
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running 3
# TYPE graft_ttft_seconds histogram
graft_ttft_seconds_bucket{le=\"0.1\"} 4
graft_ttft_seconds_sum 1.5
graft_ttft_seconds_count 10
untyped_things_total 7
# TYPE om_tokens counter
om_tokens_total 100 1700000000
";

    #[test]
    fn counters_get_deltas_and_gauges_do_not() {
        let after = BEFORE
            .replace("} 10", "} 16")
            .replace("running 3", "running 9")
            .replace("_sum 1.5", "_sum 2.25")
            .replace("_count 10", "_count 16")
            .replace("le=\"0.1\"} 4", "le=\"0.1\"} 9")
            .replace("total 7", "total 8")
            .replace("total 100", "total 164");
        let d = counter_deltas(BEFORE, &after);
        assert_eq!(
            d.get("graft_requests_total{route=\"chat\",status=\"200\"}"),
            Some(&6.0)
        );
        assert_eq!(d.get("graft_ttft_seconds_sum"), Some(&0.75));
        assert_eq!(d.get("graft_ttft_seconds_count"), Some(&6.0));
        assert_eq!(d.get("untyped_things_total"), Some(&1.0));
        assert_eq!(d.get("om_tokens_total"), Some(&64.0));
        assert_eq!(d.get("vllm:num_requests_running"), None, "a gauge");
        assert_eq!(
            d.get("graft_ttft_seconds_bucket{le=\"0.1\"}"),
            None,
            "buckets skipped"
        );
    }

    #[test]
    fn labels_with_spaces_and_series_new_in_after_are_handled() {
        let before = "# TYPE x counter\nx{a=\"b c\"} 1\n";
        let after = "# TYPE x counter\nx{a=\"b c\"} 4\nx{a=\"new\"} 2\n";
        let d = counter_deltas(before, after);
        assert_eq!(d.get("x{a=\"b c\"}"), Some(&3.0));
        assert_eq!(
            d.get("x{a=\"new\"}"),
            Some(&2.0),
            "a new series counts from zero"
        );
    }
}

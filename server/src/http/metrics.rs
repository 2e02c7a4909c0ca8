//! Prometheus metrics: request counts and latency histograms recorded as requests pass, load
//! gauges read from [`Engine::stats`](crate::engine::Engine::stats) at scrape time.
//!
//! Each [`Metrics`] owns its own recorder instead of installing a global one, so several apps
//! (the HTTP tests build one per test) never share counters. Besides graft's own `graft_*`
//! series it exports the vLLM-named gauges the Kubernetes Gateway API Inference Extension
//! reads (`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
//! and `vllm:lora_requests_info`, whose labels list the resident adapters and those with
//! waiting requests).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use metrics::{counter, gauge, histogram, with_local_recorder, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusRecorder};

use plugins::{ChainEntry, PluginCounter, PluginInfo, PluginKind};

use crate::engine::{
    EngineStats, HistogramSnapshot, PrefixCacheSnapshot, SpecDecodeSnapshot, StepMetricsSnapshot,
};

pub const REQUESTS_TOTAL: &str = "graft_requests_total";
pub const REQUEST_DURATION: &str = "graft_request_duration_seconds";
pub const TIME_TO_FIRST_TOKEN: &str = "graft_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "graft_inter_token_latency_seconds";
pub const QUEUE_TIME: &str = "graft_request_queue_time_seconds";
pub const PROMPT_TOKENS: &str = "graft_prompt_tokens_total";
pub const GENERATION_TOKENS: &str = "graft_generation_tokens_total";
pub const CANCELLED: &str = "graft_requests_cancelled_total";
pub const RUNNING: &str = "graft_requests_running";
pub const WAITING: &str = "graft_requests_waiting";
pub const KV_USAGE: &str = "graft_kv_cache_usage_ratio";
pub const KV_USED_BYTES: &str = "graft_kv_cache_used_bytes";
/// The standard Prometheus process metric, so RSS can be read against what graft keeps on
/// purpose (KV caches, resident plug-ins).
pub const RESIDENT_BYTES: &str = "process_resident_memory_bytes";
pub const VLLM_RUNNING: &str = "vllm:num_requests_running";
pub const VLLM_WAITING: &str = "vllm:num_requests_waiting";
pub const VLLM_KV_USAGE: &str = "vllm:kv_cache_usage_perc";
pub const PLUGIN_REQUESTS: &str = "graft_plugin_requests_total";
pub const PLUGINS_REGISTERED: &str = "graft_plugins_registered";
pub const PLUGIN_RESIDENT_BYTES: &str = "graft_plugin_resident_bytes";
pub const PLUGIN_BUDGET_BYTES: &str = "graft_plugin_budget_bytes";
pub const VLLM_LORA_INFO: &str = "vllm:lora_requests_info";
pub const STEP_SECONDS: &str = "graft_engine_step_seconds";
pub const STEP_TOKENS: &str = "graft_engine_step_tokens";
pub const VLLM_ITERATION_TOKENS: &str = "vllm:iteration_tokens_total";
pub const SPEC_DRAFTS: &str = "vllm:spec_decode_num_drafts";
pub const SPEC_DRAFT_TOKENS: &str = "vllm:spec_decode_num_draft_tokens";
pub const SPEC_ACCEPTED_TOKENS: &str = "vllm:spec_decode_num_accepted_tokens";
pub const SPEC_ACCEPTED_PER_POS: &str = "vllm:spec_decode_num_accepted_tokens_per_pos";
pub const PREFIX_QUERIES: &str = "vllm:prefix_cache_queries";
pub const PREFIX_HITS: &str = "vllm:prefix_cache_hits";
pub const PREFIX_BYTES: &str = "graft_prefix_cache_bytes";
pub const PREFIX_ENTRIES: &str = "graft_prefix_cache_entries";
pub const VLLM_CACHE_CONFIG: &str = "vllm:cache_config_info";

// Buckets as vLLM's `vllm/v1/metrics/loggers.py`, so dashboards built for vLLM read ours.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// The metrics registry could not be built.
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] BuildError);

/// One app's metrics registry.
pub struct Metrics {
    recorder: PrometheusRecorder,
    /// LoRA adapter name to requests naming it that have not started yet.
    waiting_adapters: Mutex<BTreeMap<String, usize>>,
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let full = |name: &str| Matcher::Full(name.to_string());
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(full(TIME_TO_FIRST_TOKEN), TTFT_BUCKETS)?
            .set_buckets_for_metric(full(INTER_TOKEN_LATENCY), ITL_BUCKETS)?
            .set_buckets_for_metric(full(REQUEST_DURATION), LATENCY_BUCKETS)?
            .set_buckets_for_metric(full(QUEUE_TIME), LATENCY_BUCKETS)?
            .build_recorder();
        let metrics = Self {
            recorder,
            waiting_adapters: Mutex::new(BTreeMap::new()),
        };
        metrics.describe();
        metrics.zero_counters();
        Ok(metrics)
    }

    /// Unlabelled counters are exported as 0 from the start, not from their first event, so a
    /// scraper's `rate()` and `increase()` see the first increment (Prometheus' advice).
    fn zero_counters(&self) {
        self.with(|| {
            for name in [PROMPT_TOKENS, GENERATION_TOKENS, CANCELLED] {
                metrics::counter!(name).absolute(0);
            }
        });
    }

    fn describe(&self) {
        use metrics::{describe_counter, describe_gauge, describe_histogram};
        self.with(|| {
            describe_counter!(
                REQUESTS_TOTAL,
                "HTTP requests by route, status and API key name"
            );
            describe_histogram!(
                REQUEST_DURATION,
                Unit::Seconds,
                "End-to-end generation time"
            );
            describe_histogram!(
                TIME_TO_FIRST_TOKEN,
                Unit::Seconds,
                "Submission to first token"
            );
            describe_histogram!(INTER_TOKEN_LATENCY, Unit::Seconds, "Gap between tokens");
            describe_histogram!(
                QUEUE_TIME,
                Unit::Seconds,
                "Time waiting before the first step"
            );
            describe_counter!(PROMPT_TOKENS, "Prompt tokens of finished generations");
            describe_counter!(GENERATION_TOKENS, "Generated tokens");
            describe_counter!(
                CANCELLED,
                "Generations dropped before finishing (disconnects, request timeouts)"
            );
            describe_gauge!(RUNNING, "Sequences in the running batch");
            describe_gauge!(WAITING, "Sequences in the waiting queue");
            describe_gauge!(KV_USAGE, "KV cache in use, 0..1");
            describe_gauge!(KV_USED_BYTES, "Bytes of KV cache held by running sequences");
            describe_gauge!(
                RESIDENT_BYTES,
                "Resident memory size of the process in bytes"
            );
            describe_gauge!(VLLM_RUNNING, "Same as graft_requests_running (vLLM name)");
            describe_gauge!(VLLM_WAITING, "Same as graft_requests_waiting (vLLM name)");
            describe_gauge!(
                VLLM_KV_USAGE,
                "Same as graft_kv_cache_usage_ratio (vLLM name)"
            );
            describe_counter!(
                PLUGIN_REQUESTS,
                "Requests that ran a plug-in, by type and name"
            );
            describe_gauge!(PLUGINS_REGISTERED, "Registered plug-ins, by type");
            describe_gauge!(
                PLUGIN_RESIDENT_BYTES,
                Unit::Bytes,
                "Plug-in tensors in memory"
            );
            describe_gauge!(PLUGIN_BUDGET_BYTES, Unit::Bytes, "Plug-in memory budget");
            describe_gauge!(
                VLLM_LORA_INFO,
                "LoRA adapters in use (label running_lora_adapters; value: scrape time)"
            );
        });
    }

    /// Runs `f` with this registry as the thread's recorder, so the `metrics` macros inside
    /// record here.
    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        with_local_recorder(&self.recorder, f)
    }

    pub fn request(&self, route: &str, status: u16) {
        self.request_for_key(route, status, None);
    }

    /// A request answered; `key` is the name of the API key that authenticated it. Requests
    /// without one (authentication off, /health, /metrics, 401s) carry no `key` label, which
    /// PromQL reads as `key=""`.
    pub fn request_for_key(&self, route: &str, status: u16, key: Option<&str>) {
        let mut labels = vec![("route", route.to_string()), ("status", status.to_string())];
        if let Some(key) = key {
            labels.push(("key", key.to_string()));
        }
        self.with(|| counter!(REQUESTS_TOTAL, &labels).increment(1));
    }

    pub fn time_to_first_token(&self, d: Duration) {
        self.with(|| histogram!(TIME_TO_FIRST_TOKEN).record(d.as_secs_f64()));
    }

    pub fn inter_token_latency(&self, d: Duration) {
        self.with(|| histogram!(INTER_TOKEN_LATENCY).record(d.as_secs_f64()));
    }

    /// A generation finished: its end-to-end time, queue time and token counts.
    pub fn finished(&self, e2e: Duration, queue: Duration, prompt: usize, generated: usize) {
        self.with(|| {
            histogram!(REQUEST_DURATION).record(e2e.as_secs_f64());
            histogram!(QUEUE_TIME).record(queue.as_secs_f64());
            counter!(PROMPT_TOKENS).increment(prompt as u64);
            counter!(GENERATION_TOKENS).increment(generated as u64);
        });
    }

    /// A request was admitted with these plug-ins in its chain.
    pub fn plugins_used(&self, chain: &[ChainEntry]) {
        self.with(|| {
            for entry in chain {
                let labels = [
                    ("type", entry.kind.name().to_string()),
                    ("name", entry.name.clone()),
                ];
                counter!(PLUGIN_REQUESTS, &labels).increment(1);
            }
        });
    }

    /// A request naming these LoRA adapters is queued (see [`Self::adapters_started`]).
    pub fn adapters_waiting(&self, names: &[String]) {
        let mut waiting = lock(&self.waiting_adapters);
        for name in names {
            *waiting.entry(name.clone()).or_default() += 1;
        }
    }

    /// A request counted by [`Self::adapters_waiting`] produced its first output or ended.
    pub fn adapters_started(&self, names: &[String]) {
        let mut waiting = lock(&self.waiting_adapters);
        for name in names {
            if let Some(n) = waiting.get_mut(name) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    waiting.remove(name);
                }
            }
        }
    }

    /// Plug-in gauges, set from the registry at scrape time. `vllm:lora_requests_info` has
    /// the Gateway API Inference Extension's meaning, valued at the scrape's Unix time as
    /// vLLM's: `running_lora_adapters` the LoRA adapters resident and ready,
    /// `waiting_lora_adapters` those named by requests that have not produced output yet,
    /// `max_lora` how many adapters of the largest registered size the plug-in memory budget
    /// holds (the resident count when no LoRA is registered).
    pub fn plugin_gauges(&self, plugins: &[PluginInfo], (resident, budget): (usize, usize)) {
        let loras: Vec<&PluginInfo> = plugins
            .iter()
            .filter(|p| p.kind == PluginKind::Lora)
            .collect();
        let running: Vec<&str> = loras
            .iter()
            .filter(|p| p.resident)
            .map(|p| p.name.as_str())
            .collect();
        let waiting: Vec<String> = lock(&self.waiting_adapters).keys().cloned().collect();
        let max_lora = match loras.iter().map(|p| p.bytes).max() {
            Some(largest) if largest > 0 => (budget / largest).max(running.len()),
            _ => running.len(),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.with(|| {
            for kind in PluginKind::ALL {
                let n = plugins.iter().filter(|p| p.kind == kind).count();
                gauge!(PLUGINS_REGISTERED, "type" => kind.name()).set(n as f64);
            }
            gauge!(PLUGIN_RESIDENT_BYTES).set(resident as f64);
            gauge!(PLUGIN_BUDGET_BYTES).set(budget as f64);
            let labels = [
                ("running_lora_adapters", running.join(",")),
                ("waiting_lora_adapters", waiting.join(",")),
                ("max_lora", max_lora.to_string()),
            ];
            gauge!(VLLM_LORA_INFO, &labels).set(now);
        });
    }

    /// Plug-ins' own counters ([`plugins::Plugin::counters`]), set from the registry at
    /// scrape time, each labelled with the plug-in's `name`.
    pub fn plugin_counters(&self, counters: &[(String, PluginCounter)]) {
        self.with(|| {
            for (name, c) in counters {
                metrics::describe_counter!(c.metric, c.help);
                let mut labels = vec![("name", name.clone())];
                labels.extend(c.labels.iter().cloned());
                counter!(c.metric, &labels).absolute(c.value);
            }
        });
    }

    pub fn cancelled(&self) {
        self.with(|| counter!(CANCELLED).increment(1));
    }

    /// The Prometheus text exposition, load gauges set from `stats` first and the engine's
    /// step histograms appended (both absent while the model loads).
    pub fn render(&self, stats: Option<EngineStats>, steps: Option<StepMetricsSnapshot>) -> String {
        if let Some(stats) = stats {
            let usage = match stats.kv_capacity_bytes {
                0 => 0.0,
                capacity => stats.kv_used_bytes as f64 / capacity as f64,
            };
            self.with(|| {
                for name in [RUNNING, VLLM_RUNNING] {
                    gauge!(name).set(stats.running as f64);
                }
                for name in [WAITING, VLLM_WAITING] {
                    gauge!(name).set(stats.waiting as f64);
                }
                for name in [KV_USAGE, VLLM_KV_USAGE] {
                    gauge!(name).set(usage);
                }
                gauge!(KV_USED_BYTES).set(stats.kv_used_bytes as f64);
            });
        }
        if let Some(rss) = crate::memory::resident_bytes() {
            self.with(|| gauge!(RESIDENT_BYTES).set(rss as f64));
        }
        let mut text = self.recorder.handle().render();
        if let Some(steps) = steps {
            write_step_histograms(&mut text, &steps);
        }
        text
    }
}

/// The engine's step histograms, which it keeps itself (its thread records without a
/// recorder), in the text exposition format.
fn write_step_histograms(out: &mut String, steps: &StepMetricsSnapshot) {
    let phases = [
        ("phase=\"forward\"", &steps.forward),
        ("phase=\"sampling\"", &steps.sampling),
    ];
    let help = "Engine step wall time: the forward pass, and sampling plus streaming the rows";
    write_histogram(out, STEP_SECONDS, help, &phases);
    let tokens = [("", &steps.tokens)];
    write_histogram(
        out,
        STEP_TOKENS,
        "Tokens fed to the model per engine step",
        &tokens,
    );
    let help = "Same as graft_engine_step_tokens (vLLM name)";
    write_histogram(out, VLLM_ITERATION_TOKENS, help, &tokens);
    write_spec_counters(out, &steps.spec);
    write_prefix_cache(out, &steps.prefix);
}

/// Automatic prefix caching: vLLM's token counters and cache-config info, and what the cache
/// holds.
fn write_prefix_cache(out: &mut String, prefix: &PrefixCacheSnapshot) {
    let help = "Prompt tokens looked up in the prefix cache";
    write_family(
        out,
        PREFIX_QUERIES,
        help,
        "counter",
        &[("", prefix.queries)],
    );
    let help = "Prompt tokens found in the prefix cache";
    write_family(out, PREFIX_HITS, help, "counter", &[("", prefix.hits)]);
    let help = "Bytes the kept prefixes hold";
    write_family(out, PREFIX_BYTES, help, "gauge", &[("", prefix.bytes)]);
    write_family(
        out,
        PREFIX_ENTRIES,
        "Prefixes kept",
        "gauge",
        &[("", prefix.entries)],
    );
    let enabled = if prefix.enabled { "True" } else { "False" };
    let block = crate::engine::PREFIX_BLOCK_TOKENS;
    let labels = format!("block_size=\"{block}\",enable_prefix_caching=\"{enabled}\"");
    let help = "Information of the KV cache configuration";
    write_family(out, VLLM_CACHE_CONFIG, help, "gauge", &[(&labels, 1)]);
}

/// Speculative decoding's counters under vLLM's names.
fn write_spec_counters(out: &mut String, spec: &SpecDecodeSnapshot) {
    let families = [
        (
            SPEC_DRAFTS,
            "Decode rows that fed speculative drafts",
            spec.drafts,
        ),
        (
            SPEC_DRAFT_TOKENS,
            "Speculative draft tokens fed",
            spec.draft_tokens,
        ),
        (
            SPEC_ACCEPTED_TOKENS,
            "Speculative draft tokens accepted",
            spec.accepted_tokens,
        ),
    ];
    for (name, help, value) in families {
        write_family(out, name, help, "counter", &[("", value)]);
    }
    let per_position: Vec<(String, u64)> = spec
        .accepted_per_position
        .iter()
        .enumerate()
        .map(|(position, &value)| (format!("position=\"{position}\""), value))
        .collect();
    let series: Vec<(&str, u64)> = per_position.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    let help = "Speculative draft tokens accepted, per draft position";
    write_family(out, SPEC_ACCEPTED_PER_POS, help, "counter", &series);
}

/// One counter or gauge family: `series` pairs a label set (`a="b"`, or empty) with its value.
/// A counter family `x` exposes `x_total`, as the exposition format has it.
fn write_family(out: &mut String, name: &str, help: &str, kind: &str, series: &[(&str, u64)]) {
    use std::fmt::Write;
    let suffix = if kind == "counter" { "_total" } else { "" };
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in series {
        match labels.is_empty() {
            true => {
                let _ = writeln!(out, "{name}{suffix} {value}");
            }
            false => {
                let _ = writeln!(out, "{name}{suffix}{{{labels}}} {value}");
            }
        }
    }
}

/// One histogram family: `series` pairs a label set (`a="b"`, or empty) with its snapshot.
fn write_histogram(
    out: &mut String,
    name: &str,
    help: &str,
    series: &[(&str, &HistogramSnapshot)],
) {
    use std::fmt::Write;
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (labels, h) in series {
        let sep = if labels.is_empty() { "" } else { "," };
        let infinite = [(f64::INFINITY, h.count)];
        for (bound, count) in h.buckets.iter().chain(&infinite) {
            let le = if bound.is_finite() {
                bound.to_string()
            } else {
                "+Inf".into()
            };
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {count}");
        }
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{labels} {}\n{name}_count{labels} {}",
            h.sum, h.count
        );
    }
}

/// The map behind the lock even if a panicking thread poisoned it: counts stay usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_vllm_gauges_and_histogram_buckets() {
        let m = Metrics::new().expect("metrics");
        m.request("/v1/chat/completions", 200);
        m.time_to_first_token(Duration::from_millis(30));
        let text = m.render(
            Some(EngineStats {
                running: 2,
                waiting: 1,
                kv_used_bytes: 1,
                kv_capacity_bytes: 4,
            }),
            None,
        );
        assert!(text.contains("vllm:num_requests_running 2"), "{text}");
        assert!(text.contains("vllm:num_requests_waiting 1"), "{text}");
        assert!(text.contains("vllm:kv_cache_usage_perc 0.25"), "{text}");
        assert!(text.contains("graft_kv_cache_used_bytes 1\n"), "{text}");
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("graft_time_to_first_token_seconds_bucket{le=\"0.04\"} 1"));
        assert!(
            text.contains("graft_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1")
        );
    }

    #[test]
    fn counters_are_exported_from_zero_before_their_first_event() {
        let text = Metrics::new().expect("metrics").render(None, None);
        for name in [PROMPT_TOKENS, GENERATION_TOKENS, CANCELLED] {
            assert!(text.contains(&format!("\n{name} 0\n")), "{name}: {text}");
        }
    }

    #[test]
    fn step_histograms_are_one_family_each_with_cumulative_buckets() {
        let h = |buckets: Vec<(f64, u64)>, count, sum| HistogramSnapshot {
            buckets,
            count,
            sum,
        };
        let steps = StepMetricsSnapshot {
            forward: h(vec![(0.005, 1), (0.01, 3)], 4, 0.05),
            sampling: h(vec![(0.005, 2), (0.01, 2)], 2, 0.001),
            tokens: h(vec![(1.0, 5), (8.0, 6)], 7, 300.0),
            spec: SpecDecodeSnapshot {
                drafts: 3,
                draft_tokens: 9,
                accepted_tokens: 4,
                accepted_per_position: vec![2, 2, 0],
            },
            prefix: PrefixCacheSnapshot {
                enabled: true,
                queries: 120,
                hits: 64,
                bytes: 4096,
                entries: 2,
            },
        };
        let text = Metrics::new().expect("metrics").render(None, Some(steps));
        for line in [
            "# TYPE graft_engine_step_seconds histogram",
            "graft_engine_step_seconds_bucket{phase=\"forward\",le=\"0.01\"} 3",
            "graft_engine_step_seconds_bucket{phase=\"forward\",le=\"+Inf\"} 4",
            "graft_engine_step_seconds_count{phase=\"sampling\"} 2",
            "graft_engine_step_tokens_bucket{le=\"8\"} 6",
            "graft_engine_step_tokens_sum 300",
            "vllm:iteration_tokens_total_count 7",
            "# TYPE vllm:spec_decode_num_drafts counter",
            "vllm:spec_decode_num_drafts_total 3",
            "vllm:spec_decode_num_draft_tokens_total 9",
            "vllm:spec_decode_num_accepted_tokens_total 4",
            "vllm:spec_decode_num_accepted_tokens_per_pos_total{position=\"1\"} 2",
            "# TYPE vllm:prefix_cache_queries counter",
            "vllm:prefix_cache_queries_total 120",
            "vllm:prefix_cache_hits_total 64",
            "graft_prefix_cache_bytes 4096",
            "graft_prefix_cache_entries 2",
            "vllm:cache_config_info{block_size=\"16\",enable_prefix_caching=\"True\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}: {text}");
        }
        let types = text.matches("# TYPE graft_engine_step_seconds ").count();
        assert_eq!(types, 1, "one family for both phases");
    }

    #[test]
    fn request_counts_carry_the_key_name_when_there_is_one() {
        let m = Metrics::new().expect("metrics");
        m.request_for_key("/v1/models", 200, Some("alice"));
        m.request_for_key("/v1/models", 200, None);
        let text = m.render(None, None);
        let labelled = "graft_requests_total{route=\"/v1/models\",status=\"200\",key=\"alice\"} 1";
        assert!(text.contains(labelled), "{text}");
        let bare = "graft_requests_total{route=\"/v1/models\",status=\"200\"} 1";
        assert!(text.contains(bare), "{text}");
    }

    #[test]
    fn two_registries_do_not_share_counters() {
        let a = Metrics::new().expect("metrics");
        let b = Metrics::new().expect("metrics");
        a.request("/health", 200);
        assert!(!b.render(None, None).contains("route=\"/health\""));
    }

    #[test]
    fn plugin_counters_are_exported_with_the_plugins_name_and_their_own_labels() {
        let m = Metrics::new().expect("metrics");
        let counter = |value| PluginCounter {
            metric: "graft_early_exit_tokens_total",
            help: "Decode tokens that left the model after this layer",
            labels: vec![("layer", "12".into())],
            value,
        };
        m.plugin_counters(&[("ee".into(), counter(3))]);
        m.plugin_counters(&[("ee".into(), counter(7))]);
        let text = m.render(None, None);
        let line = "graft_early_exit_tokens_total{name=\"ee\",layer=\"12\"} 7";
        assert!(text.contains(line), "{text}");
        assert!(
            text.contains("# HELP graft_early_exit_tokens_total Decode tokens"),
            "{text}"
        );
    }

    #[test]
    fn plugin_series_name_the_adapters_in_use() {
        let m = Metrics::new().expect("metrics");
        m.plugins_used(&[ChainEntry {
            kind: PluginKind::Lora,
            name: "sql".into(),
            hash: "sha256:0".into(),
        }]);
        let info = |name: &str, resident| PluginInfo {
            kind: PluginKind::Lora,
            name: name.into(),
            path: "/p".into(),
            hash: "sha256:0".into(),
            source: plugins::Source::Api,
            resident,
            bytes: 30,
            in_use: 0,
        };
        let adapters = ["sql".to_string(), "poem".to_string()];
        m.adapters_waiting(&adapters);
        m.adapters_waiting(&adapters[..1]);
        m.adapters_started(&adapters);
        m.plugin_gauges(&[info("sql", true), info("evicted", false)], (20, 100));
        let text = m.render(None, None);
        assert!(
            text.contains("graft_plugin_requests_total{type=\"lora\",name=\"sql\"} 1"),
            "{text}"
        );
        assert!(text.contains("graft_plugin_resident_bytes 20"), "{text}");
        // Resident: sql; still waiting: sql (twice named, once started); 100 / 30 -> 3.
        assert!(text.contains("vllm:lora_requests_info{running_lora_adapters=\"sql\",waiting_lora_adapters=\"sql\",max_lora=\"3\"}"), "{text}");
    }
}

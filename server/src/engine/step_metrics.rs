//! What each engine step cost, as histograms the engine thread fills and `/metrics` reads.
//!
//! Request-level latencies (TTFT, ITL) say that serving slowed down; these say where: a slow
//! forward pass, slow per-row sampling and streaming, or steps carrying more tokens (prefill
//! chunks) than usual. The engine thread is the only writer, so recording is a few relaxed
//! atomic adds per step and never takes a lock a scrape could hold.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Step-time buckets in seconds: a decode step of the default model on two cores takes a few
/// milliseconds, a 512-token prefill step a few hundred.
pub const STEP_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Tokens-per-step buckets, as vLLM's `vllm:iteration_tokens_total`.
pub const STEP_TOKENS_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// A Prometheus histogram with fixed upper bounds, written by one thread at a time.
#[derive(Debug)]
pub struct AtomicHistogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus one past the last bound for `+Inf`.
    counts: Box<[AtomicU64]>,
    /// `f64` bits of the sum of observations.
    sum: AtomicU64,
}

/// A histogram as read at one moment: cumulative bucket counts, as the exposition wants.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations <= bound)`, bounds ascending; `+Inf` is [`Self::count`].
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Records one observation. Bounds are inclusive (`le`), as in Prometheus.
    /// Only one thread may observe at a time: the sum is read, added to and stored back.
    pub fn observe(&self, value: f64) {
        let bucket = self.bounds.partition_point(|&b| b < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed)) + value;
        self.sum.store(sum.to_bits(), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (&bound, count) in self.bounds.iter().zip(self.counts.iter()) {
            running += count.load(Ordering::Relaxed);
            buckets.push((bound, running));
        }
        let overflow = self.counts[self.bounds.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            buckets,
            count: running + overflow,
            sum: f64::from_bits(self.sum.load(Ordering::Relaxed)),
        }
    }
}

/// Draft positions whose acceptance is counted one by one (`num_speculative_tokens` is at
/// most this).
pub const SPEC_POSITIONS: usize = 16;

/// Speculative decoding's counters, vLLM's `vllm:spec_decode_*` series.
#[derive(Debug, Default)]
pub struct SpecDecodeCounters {
    /// Decode rows that fed at least one draft.
    pub drafts: AtomicU64,
    pub draft_tokens: AtomicU64,
    pub accepted_tokens: AtomicU64,
    /// Per draft position: how often the draft at that position was accepted.
    pub accepted_per_position: [AtomicU64; SPEC_POSITIONS],
}

/// [`SpecDecodeCounters`] as read at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecDecodeSnapshot {
    pub drafts: u64,
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    pub accepted_per_position: Vec<u64>,
}

impl SpecDecodeCounters {
    /// One decode row that fed `drafted` drafts and kept the first `accepted`.
    pub fn record(&self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.drafts.fetch_add(1, Ordering::Relaxed);
        self.draft_tokens
            .fetch_add(drafted as u64, Ordering::Relaxed);
        self.accepted_tokens
            .fetch_add(accepted as u64, Ordering::Relaxed);
        for counter in self.accepted_per_position.iter().take(accepted) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> SpecDecodeSnapshot {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SpecDecodeSnapshot {
            drafts: read(&self.drafts),
            draft_tokens: read(&self.draft_tokens),
            accepted_tokens: read(&self.accepted_tokens),
            accepted_per_position: self.accepted_per_position.iter().map(read).collect(),
        }
    }
}

/// Automatic prefix caching's figures: vLLM's `vllm:prefix_cache_*` counters (in tokens) and
/// what the cache holds.
#[derive(Debug, Default)]
pub struct PrefixCacheCounters {
    pub enabled: AtomicBool,
    /// Prompt tokens of the requests that looked a prefix up.
    pub queries: AtomicU64,
    /// Of those, tokens a kept prefix covered.
    pub hits: AtomicU64,
    pub bytes: AtomicU64,
    pub entries: AtomicU64,
}

/// [`PrefixCacheCounters`] as read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheSnapshot {
    pub enabled: bool,
    pub queries: u64,
    pub hits: u64,
    pub bytes: u64,
    pub entries: u64,
}

impl PrefixCacheCounters {
    /// One lookup for a prompt of `queried` tokens, `hit` of which were found.
    pub fn record(&self, queried: usize, hit: usize) {
        self.queries.fetch_add(queried as u64, Ordering::Relaxed);
        self.hits.fetch_add(hit as u64, Ordering::Relaxed);
    }

    /// What the cache holds now.
    pub fn hold(&self, bytes: usize, entries: usize) {
        self.bytes.store(bytes as u64, Ordering::Relaxed);
        self.entries.store(entries as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> PrefixCacheSnapshot {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PrefixCacheSnapshot {
            enabled: self.enabled.load(Ordering::Relaxed),
            queries: read(&self.queries),
            hits: read(&self.hits),
            bytes: read(&self.bytes),
            entries: read(&self.entries),
        }
    }
}

/// The engine thread's per-step histograms.
#[derive(Debug)]
pub struct StepMetrics {
    /// Wall time of the model's forward pass over the batch.
    pub forward: AtomicHistogram,
    /// Wall time of sampling, detokenizing and sending every row's result.
    pub sampling: AtomicHistogram,
    /// Tokens fed to the model in the step (decode rows plus prompt chunks).
    pub tokens: AtomicHistogram,
    pub spec: SpecDecodeCounters,
    pub prefix: PrefixCacheCounters,
}

/// [`StepMetrics`] as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetricsSnapshot {
    pub forward: HistogramSnapshot,
    pub sampling: HistogramSnapshot,
    pub tokens: HistogramSnapshot,
    pub spec: SpecDecodeSnapshot,
    pub prefix: PrefixCacheSnapshot,
}

impl Default for StepMetrics {
    fn default() -> Self {
        Self {
            forward: AtomicHistogram::new(STEP_SECONDS_BUCKETS),
            sampling: AtomicHistogram::new(STEP_SECONDS_BUCKETS),
            tokens: AtomicHistogram::new(STEP_TOKENS_BUCKETS),
            spec: SpecDecodeCounters::default(),
            prefix: PrefixCacheCounters::default(),
        }
    }
}

impl StepMetrics {
    /// One step that fed `tokens` tokens: its forward pass and, when it got that far, its
    /// sampling.
    pub fn record(&self, tokens: usize, forward: Duration, sampling: Option<Duration>) {
        self.tokens.observe(tokens as f64);
        self.forward.observe(forward.as_secs_f64());
        if let Some(sampling) = sampling {
            self.sampling.observe(sampling.as_secs_f64());
        }
    }

    pub fn snapshot(&self) -> StepMetricsSnapshot {
        StepMetricsSnapshot {
            forward: self.forward.snapshot(),
            sampling: self.sampling.snapshot(),
            tokens: self.tokens.snapshot(),
            spec: self.spec.snapshot(),
            prefix: self.prefix.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        static BOUNDS: &[f64] = &[1.0, 8.0, 16.0];
        let h = AtomicHistogram::new(BOUNDS);
        for v in [1.0, 1.0, 2.0, 8.0, 9.0, 100.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![(1.0, 2), (8.0, 4), (16.0, 5)]);
        assert_eq!(s.count, 6);
        assert_eq!(s.sum, 121.0);
    }

    #[test]
    fn spec_counters_add_drafts_and_accepted_positions() {
        let c = SpecDecodeCounters::default();
        c.record(4, 2);
        c.record(3, 0);
        c.record(0, 0); // no draft fed: not a draft
        c.record(2, 2);
        let s = c.snapshot();
        assert_eq!((s.drafts, s.draft_tokens, s.accepted_tokens), (3, 9, 4));
        assert_eq!(s.accepted_per_position[..3], [2, 2, 0]);
    }

    #[test]
    fn a_step_without_sampling_counts_its_forward_pass_only() {
        let m = StepMetrics::default();
        m.record(
            17,
            Duration::from_millis(4),
            Some(Duration::from_micros(300)),
        );
        m.record(3, Duration::from_millis(2), None);
        let s = m.snapshot();
        assert_eq!(
            (s.forward.count, s.sampling.count, s.tokens.count),
            (2, 1, 2)
        );
        assert_eq!(s.tokens.sum, 20.0);
        assert_eq!(s.tokens.buckets[..3], [(1.0, 0), (8.0, 1), (16.0, 1)]);
        assert!((s.forward.sum - 0.006).abs() < 1e-12, "{}", s.forward.sum);
    }
}

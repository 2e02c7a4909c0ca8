//! Output throughput over time: output tokens per one-second bucket of the phase.
//!
//! A streamed request's tokens are spread over its content chunks (usage count / chunks each,
//! at the time each chunk arrived); a non-streamed request's arrive at its end. Only completed
//! requests count, as in the phase's overall output tokens/s. The last bucket is usually
//! partial and is divided by its actual width.

use std::time::Duration;

use serde::Serialize;

use crate::record::RequestRecord;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// Start of the bucket, seconds from the phase start.
    pub t_s: f64,
    pub output_tok_s: f64,
}

pub fn output_timeline(records: &[RequestRecord], elapsed: Duration) -> Vec<TimelinePoint> {
    let total = elapsed.as_secs_f64();
    let buckets = total.ceil().max(1.0) as usize;
    let mut tokens = vec![0.0; buckets];
    let mut add = |at: Duration, n: f64| {
        let i = (at.as_secs_f64().floor() as usize).min(buckets - 1);
        tokens[i] += n;
    };
    for r in records.iter().filter(|r| r.is_ok()) {
        let Some(n) = r.output_tokens else { continue };
        let times = r.chunk_times();
        if times.is_empty() {
            add(r.start + r.e2e, n as f64);
        } else {
            let each = n as f64 / times.len() as f64;
            times.iter().for_each(|t| add(r.start + *t, each));
        }
    }
    tokens
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let width = (total - i as f64).clamp(f64::MIN_POSITIVE, 1.0);
            TimelinePoint {
                t_s: i as f64,
                output_tok_s: n / width,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::ok;

    #[test]
    fn tokens_land_in_the_second_their_chunk_arrived() {
        // Chunks at 0.5 s, 1.2 s, 1.9 s; usage says 6 tokens: 2 per chunk.
        let r = ok(500, &[700, 700], 1900, 6);
        let mut whole = ok(2200, &[], 2200, 4);
        whole.ttft = None; // a non-stream reply: all 4 at its end, 2.2 s
        let t = output_timeline(&[r, whole], Duration::from_millis(2500));
        let got: Vec<f64> = t.iter().map(|p| p.output_tok_s).collect();
        // The last bucket is half a second wide: 4 tokens in it are 8 tok/s.
        assert_eq!(got, vec![2.0, 4.0, 8.0]);
        assert_eq!(t[2].t_s, 2.0);
    }
}

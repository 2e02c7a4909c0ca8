//! Greedy decoding on the serving model, several prompts per step: the trainer's source of
//! the model's own outputs, and the evaluation's generation with and without early exit.

use std::time::Instant;

use models::{BatchRow, HookCall, Llama, LogitsWanted};

use crate::train::{Progress, Result};

/// Greedy outputs and the time their decode steps took.
#[derive(Debug, Clone)]
pub struct Generation {
    pub outputs: Vec<Vec<u32>>,
    /// Seconds in decode steps: every step after each batch's prefill.
    pub decode_seconds: f64,
}

impl Generation {
    /// Tokens that decode steps produced (the first of each output is the prefill's).
    pub fn decode_tokens(&self) -> usize {
        self.outputs.iter().map(|o| o.len().saturating_sub(1)).sum()
    }
}

/// The greedy continuation of each prompt, at most `max_new` tokens, stopping after any of
/// `stop` (kept in the output), `batch` prompts decoding together, every row with the chain
/// `hooks`, with the time the decode steps took apart from the prefills. Progress: one unit
/// per prompt finished.
pub fn greedy(
    model: &Llama,
    prompts: &[Vec<u32>],
    hooks: &[HookCall],
    max_new: usize,
    stop: &[u32],
    batch: usize,
    progress: &mut dyn Progress,
) -> Result<Generation> {
    let mut generation = Generation {
        outputs: Vec::with_capacity(prompts.len()),
        decode_seconds: 0.0,
    };
    for chunk in prompts.chunks(batch.max(1)) {
        let (outputs, seconds) = greedy_batch(model, chunk, hooks, max_new, stop)?;
        generation.outputs.extend(outputs);
        generation.decode_seconds += seconds;
        progress.advance(chunk.len());
    }
    Ok(generation)
}

fn greedy_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    hooks: &[HookCall],
    max_new: usize,
    stop: &[u32],
) -> Result<(Vec<Vec<u32>>, f64)> {
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut feed: Vec<Vec<u32>> = prompts.to_vec();
    let mut active: Vec<usize> = match max_new {
        0 => Vec::new(),
        _ => (0..prompts.len()).collect(),
    };
    let mut decode_start = None;
    while !active.is_empty() {
        let mut rows: Vec<BatchRow<'_>> = Vec::with_capacity(active.len());
        for (i, cache) in caches.iter_mut().enumerate() {
            if active.contains(&i) {
                rows.push(BatchRow {
                    seq_id: i as u64,
                    tokens: &feed[i],
                    cache,
                    hooks,
                    logits: LogitsWanted::Last,
                });
            }
        }
        let logits = model.forward(&mut rows)?;
        drop(rows);
        let mut still = Vec::with_capacity(active.len());
        for (&i, l) in active.iter().zip(logits) {
            let l = l.ok_or_else(|| models::ModelError::Batch("a row lost its logits".into()))?;
            let next = l.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
            outputs[i].push(next);
            feed[i] = vec![next];
            if !stop.contains(&next) && outputs[i].len() < max_new {
                still.push(i);
            }
        }
        active = still;
        decode_start.get_or_insert_with(Instant::now);
    }
    let seconds = decode_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
    Ok((outputs, seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Quiet;
    use models::tiny::{tiny_config, TinyModel};
    use models::Architecture;

    #[test]
    fn batched_greedy_equals_one_prompt_at_a_time_and_honours_stops() {
        let m = TinyModel::random(tiny_config(Architecture::Llama), 3)
            .unwrap()
            .build(128)
            .unwrap();
        let prompts = vec![vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9]];
        let together = greedy(&m, &prompts, &[], 6, &[], 3, &mut Quiet)
            .unwrap()
            .outputs;
        let alone = greedy(&m, &prompts, &[], 6, &[], 1, &mut Quiet)
            .unwrap()
            .outputs;
        assert_eq!(together, alone);
        assert!(together.iter().all(|o| o.len() == 6));
        // Stopping at a token the first output holds cuts it there, stop token included.
        let stop = together[0][2];
        let cut = greedy(&m, &prompts[..1], &[], 6, &[stop], 1, &mut Quiet)
            .unwrap()
            .outputs;
        let first = together[0].iter().position(|&t| t == stop).unwrap();
        assert_eq!(cut[0], together[0][..=first]);
    }
}

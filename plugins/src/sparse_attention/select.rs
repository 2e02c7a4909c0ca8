//! Which blocks a decoding token reads, from the gate's scores of the closed blocks.

/// How much a request lets a decoding token read per layer and key/value head.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// At most this many tokens of context, in whole blocks (rounded up; the current block
    /// and the sink count in it): the top-scored closed blocks fill what the forced ones
    /// leave.
    Tokens(usize),
    /// Every closed block whose share of the gate's softmax over blocks is above this, beside
    /// the forced ones.
    Threshold(f32),
}

impl Budget {
    /// Whether a context of `blocks` blocks (the current one included) is read whole anyway.
    pub fn covers(&self, blocks: usize, block_size: usize) -> bool {
        match *self {
            Budget::Tokens(t) => blocks <= t.div_ceil(block_size),
            Budget::Threshold(_) => false,
        }
    }
}

/// The blocks one key/value head reads, ascending: the current block `current` (always),
/// block 0 when `sink` (and the budget holds two blocks), and the closed blocks `0..current` that `scores` (one per closed
/// block) and `budget` choose.
pub fn select(
    scores: &[f32],
    current: usize,
    budget: Budget,
    block: usize,
    sink: bool,
) -> Vec<u32> {
    // A one-block budget is the current block alone.
    let sink = sink && current > 0 && !matches!(budget, Budget::Tokens(t) if t <= block);
    let mut chosen: Vec<u32> = match budget {
        Budget::Tokens(t) => {
            let forced = 1 + usize::from(sink);
            let room = t.div_ceil(block).saturating_sub(forced);
            top(scores, room, sink)
        }
        Budget::Threshold(tau) => above(scores, tau, sink),
    };
    if sink {
        chosen.push(0);
    }
    chosen.push(current as u32);
    chosen.sort_unstable();
    chosen.dedup();
    chosen
}

/// The `room` highest-scored blocks (block 0 left out when the sink is forced anyway); ties
/// go to the later block, which the recency of attention favours.
fn top(scores: &[f32], room: usize, skip_first: bool) -> Vec<u32> {
    let first = usize::from(skip_first);
    let mut order: Vec<u32> = (first as u32..scores.len() as u32).collect();
    if room < order.len() {
        order.select_nth_unstable_by(room, |&a, &b| {
            scores[b as usize]
                .total_cmp(&scores[a as usize])
                .then(b.cmp(&a))
        });
        order.truncate(room);
    }
    order
}

/// The blocks whose softmax share is above `tau`.
fn above(scores: &[f32], tau: f32, skip_first: bool) -> Vec<u32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = scores.iter().map(|s| (s - max).exp()).sum();
    let first = usize::from(skip_first);
    (first..scores.len())
        .filter(|&j| (scores[j] - max).exp() / total > tau)
        .map(|j| j as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_budget_takes_the_best_blocks_beside_the_forced_ones() {
        let scores = [0.5, 3.0, -1.0, 2.0, 0.1];
        // 4 blocks of 64: the current (5), the sink (0), then the two best (1, 3).
        assert_eq!(
            select(&scores, 5, Budget::Tokens(256), 64, true),
            [0, 1, 3, 5]
        );
        assert_eq!(
            select(&scores, 5, Budget::Tokens(200), 64, false),
            [0, 1, 3, 5]
        );
        assert_eq!(
            select(&scores, 5, Budget::Tokens(150), 64, false),
            [1, 3, 5]
        );
        assert_eq!(select(&scores, 5, Budget::Tokens(64), 64, true), [5]);
        // A budget of every block reads every block.
        assert_eq!(
            select(&scores, 5, Budget::Tokens(6 * 64), 64, false),
            [0, 1, 2, 3, 4, 5]
        );
        assert!(Budget::Tokens(6 * 64).covers(6, 64));
        assert!(!Budget::Tokens(5 * 64).covers(6, 64));
    }

    #[test]
    fn a_threshold_takes_the_blocks_above_it() {
        // Softmax shares of [0, ln 2, ln 7]: 0.1, 0.2, 0.7.
        let scores = [0.0, 2f32.ln(), 7f32.ln()];
        assert_eq!(
            select(&scores, 3, Budget::Threshold(0.15), 64, false),
            [1, 2, 3]
        );
        assert_eq!(
            select(&scores, 3, Budget::Threshold(0.15), 64, true),
            [0, 1, 2, 3]
        );
        assert_eq!(select(&scores, 3, Budget::Threshold(0.9), 64, false), [3]);
    }

    #[test]
    fn the_first_block_is_only_the_current_one() {
        assert_eq!(select(&[], 0, Budget::Tokens(64), 64, true), [0]);
        assert_eq!(select(&[], 0, Budget::Threshold(0.5), 64, true), [0]);
    }
}

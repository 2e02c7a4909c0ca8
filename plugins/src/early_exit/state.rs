//! What the early-exit hook keeps for one sequence: its tokens (for prompt lookup), the exit
//! layers of its last tokens (SpecEE's online schedule) and the current decode step's
//! candidates and features.

use std::collections::VecDeque;

use models::HookState;

/// Tokens whose exit layers the online schedule follows (the paper's 5).
pub const RECENT: usize = 5;

#[derive(Debug, Default)]
pub struct ExitState {
    /// Every token the sequence has fed, prompt then output.
    pub tokens: Vec<u32>,
    /// Exit layers of the last [`RECENT`] decode tokens that could exit; a token that went
    /// the whole depth counts as the last layer.
    pub recent: VecDeque<usize>,
    /// The decode step in flight, `None` in prefill and verification steps.
    pub step: Option<StepScratch>,
}

/// One decode step's working set.
#[derive(Debug, Default)]
pub struct StepScratch {
    pub candidates: Vec<u32>,
    /// The candidates' LM-head rows, `(k, hidden)`, fetched at the first layer that needs them.
    pub rows: Option<Vec<f32>>,
    /// The candidates' softmax at the previous layer.
    pub p_prev: Option<Vec<f32>>,
    /// The layer whose top token is being checked ([`models::Exit::IfTopIn`]): if the hook is
    /// called again in this step the check failed, else the token left there.
    pub checked_at: Option<usize>,
}

impl ExitState {
    /// Closes the previous decode step: records where its token left (`last_layer` when it
    /// did not).
    pub fn settle(&mut self, last_layer: usize) {
        if let Some(step) = self.step.take() {
            remember(&mut self.recent, step.checked_at.unwrap_or(last_layer));
        }
    }
}

/// Adds a token's exit layer to the last [`RECENT`] ones.
pub fn remember(recent: &mut VecDeque<usize>, layer: usize) {
    recent.push_back(layer);
    while recent.len() > RECENT {
        recent.pop_front();
    }
}

/// SpecEE's schedule: layer `l`'s predictor runs when `l` is an offline layer or within
/// `{e-2, e, e+2}` of the exit layer `e` of one of the last tokens.
pub fn scheduled(l: usize, offline: &[usize], recent: &VecDeque<usize>) -> bool {
    offline.contains(&l) || recent.iter().any(|&e| l == e || l + 2 == e || l == e + 2)
}

impl HookState for ExitState {
    fn allocated_bytes(&self) -> usize {
        let rows = self.step.as_ref().and_then(|s| s.rows.as_ref());
        self.tokens.capacity() * 4 + rows.map_or(0, |r| r.capacity() * 4)
    }

    fn fork(&self) -> models::Result<Box<dyn HookState>> {
        Ok(Box::new(Self {
            tokens: self.tokens.clone(),
            recent: self.recent.clone(),
            step: None,
        }))
    }

    fn truncate(&mut self, len: usize) -> models::Result<()> {
        self.tokens.truncate(len);
        self.step = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settling_records_the_checked_layer_or_the_last_and_keeps_five() {
        let mut s = ExitState::default();
        s.settle(29);
        assert!(s.recent.is_empty(), "no step in flight records nothing");
        for l in [10, 11, 12, 13, 14, 15] {
            s.step = Some(StepScratch {
                checked_at: Some(l),
                ..Default::default()
            });
            s.settle(29);
        }
        s.step = Some(StepScratch::default());
        s.settle(29);
        assert_eq!(Vec::from(s.recent.clone()), [12, 13, 14, 15, 29]);
        s.tokens = vec![1, 2, 3];
        s.truncate(1).unwrap();
        assert_eq!(s.tokens, [1]);
    }
}

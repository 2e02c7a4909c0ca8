//! One sequence's constraint: which tokens may come next, and what it has consumed.

use llguidance::Matcher;

/// A compiled format at the state of one sequence's output so far.
pub struct Constraint {
    matcher: Matcher,
    /// The vocabulary's end token as llguidance knows it: allowed once the output is complete.
    eos: u32,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").finish_non_exhaustive()
    }
}

/// Choices of an `n > 1` request each constrain their own output from the same start.
impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            eos: self.eos,
        }
    }
}

impl Constraint {
    pub(super) fn new(matcher: Matcher, eos: u32) -> Self {
        Self { matcher, eos }
    }

    /// Sets the logits of tokens that cannot come next to -inf. Once the output is complete
    /// only the stop tokens remain (every id in `stop_ids`, not only the trie's end token).
    /// `Err` when the matcher failed (never expected after tokens it allowed).
    pub fn mask(&mut self, logits: &mut [f32], stop_ids: &[u32]) -> Result<(), String> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        let may_stop = allowed.is_allowed(self.eos);
        for (id, logit) in logits.iter_mut().enumerate() {
            let id = id as u32;
            let ok = allowed.is_allowed(id) || (may_stop && stop_ids.contains(&id));
            if !ok {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past a sampled token. A stop token ends the output and is not consumed, nor
    /// is the end token a request with `ignore_eos` goes on sampling once the output is whole.
    pub fn consume(&mut self, token: u32, stop_ids: &[u32]) -> Result<(), String> {
        if token == self.eos || stop_ids.contains(&token) {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }
}

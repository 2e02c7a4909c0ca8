//! The scheduler: which sequences run, and which tokens of each go into the next forward step.
//!
//! Owned by the engine thread and called once per step, after new requests were received and
//! cancelled ones dropped: [`Scheduler::admit`] moves waiting sequences into the running set
//! while `max_running` and the KV budget allow (first come, first served: the head of the
//! queue is never skipped, so a long request cannot starve), then [`Scheduler::plan`] builds
//! the step's batch. Every decoding sequence feeds its one new token; prefilling sequences get
//! chunks of their prompts from what is left of the step's token budget, decode rows first,
//! so a long prompt never stalls the others' token streams (Sarathi-style chunked prefill, as
//! vLLM and TGI do it).
//!
//! Departure from vLLM, for reproducibility: a prompt is always cut at multiples of
//! `prefill_chunk`, and a chunk that does not fit whole in what is left of the budget waits
//! for the next step instead of shrinking. With quantized weights a sequence's logits depend
//! (by up to a logit on the default model) on where its prompt was cut, while they do not
//! depend on the other rows of a step; fixed cuts make a request's output independent of
//! what it was batched with. A chain that needs its whole prompt in one step (a pruning
//! plug-in, `models::Hook::whole_prompt`) gets it uncut when a step can ever hold it. `EngineConfig::validate` keeps room for one whole chunk beside
//! every decode row, so the oldest prefilling sequence always progresses.
//!
//! Like TGI's queue state, this is a plain synchronous struct over anything [`Schedulable`],
//! tested with fake sequences; the engine thread is its only user.

use std::collections::VecDeque;

use models::LogitsWanted;

/// What the scheduler needs to know about a sequence.
pub trait Schedulable {
    fn prompt_len(&self) -> usize;
    /// Tokens the request may generate at most.
    fn max_tokens(&self) -> usize;
    /// Prompt tokens already in the sequence's KV cache.
    fn prefilled(&self) -> usize;
    /// Bytes the sequence's KV cache holds now.
    fn kv_allocated_bytes(&self) -> usize;
    /// Whether every prompt position needs logits (prompt log-probs were asked for).
    fn wants_prompt_logits(&self) -> bool;
    /// Whether every prompt position needs its final hidden state instead (an embedding).
    fn wants_prompt_hidden(&self) -> bool {
        false
    }
    /// Whether the sequence's chain needs its whole prompt in one step
    /// (`models::Hook::whole_prompt`).
    fn whole_prompt(&self) -> bool {
        false
    }
    /// Bytes of plug-in state the sequence's chain expects to hold per position, on top of
    /// the model's keys and values.
    fn state_bytes_per_token(&self) -> usize {
        0
    }
    /// Sequences this one stands for: itself plus the choices of its request that will fork
    /// off it once its prompt is prefilled (each then holds a copy of the cache).
    fn copies(&self) -> usize {
        1
    }
    /// Draft tokens a decoding sequence would feed after its last sampled token in a step
    /// where `decoding` sequences decode.
    fn drafts(&self, _decoding: usize) -> usize {
        0
    }
}

/// Limits the scheduler enforces; see `EngineConfig` for their meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerLimits {
    pub max_running: usize,
    pub max_batch_tokens: usize,
    pub prefill_chunk: usize,
    pub kv_budget_bytes: usize,
    pub kv_bytes_per_token: usize,
    /// Drafts are fed only while at most this many sequences decode in the step (vLLM's
    /// `disable_by_batch_size`): past it the extra positions cost more than they save.
    pub speculation_max_batch: usize,
}

/// One row of a planned step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedRow {
    /// Index into [`Scheduler::running_mut`].
    pub index: usize,
    /// Tokens this row feeds: 1 when decoding (plus the drafts fed with it), a prompt chunk
    /// when prefilling.
    pub tokens: usize,
    pub logits: LogitsWanted,
}

/// Waiting and running sequences.
#[derive(Debug)]
pub struct Scheduler<S> {
    limits: SchedulerLimits,
    waiting: VecDeque<S>,
    /// In admission order, which is also the order prefill chunks are handed out.
    running: Vec<S>,
}

impl<S: Schedulable> Scheduler<S> {
    pub fn new(limits: SchedulerLimits) -> Self {
        Self {
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// Queues a sequence at the back. The bound on waiting sequences is enforced where
    /// requests are submitted, so this never refuses.
    pub fn enqueue(&mut self, seq: S) {
        self.waiting.push_back(seq);
    }

    #[cfg(test)]
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn running(&self) -> &[S] {
        &self.running
    }

    pub fn running_mut(&mut self) -> &mut [S] {
        &mut self.running
    }

    /// KV bytes a sequence may come to hold: its estimate (keys, values and plug-in state,
    /// for itself and the choices still to fork off it), or its allocation once that is larger
    /// (a cache grows by doubling, so it can outgrow the estimate).
    fn kv_claim(&self, seq: &S) -> usize {
        let per_token = self.limits.kv_bytes_per_token + seq.state_bytes_per_token();
        let estimate = (seq.prompt_len() + seq.max_tokens())
            .saturating_mul(per_token)
            .saturating_mul(seq.copies());
        estimate.max(seq.kv_allocated_bytes())
    }

    /// KV bytes claimed by the running sequences.
    pub fn kv_claimed_bytes(&self) -> usize {
        self.running.iter().map(|s| self.kv_claim(s)).sum()
    }

    /// KV bytes the sequence at the head of the queue would claim (0: none waits).
    pub fn next_claim(&self) -> usize {
        self.waiting.front().map_or(0, |s| self.kv_claim(s))
    }

    /// The KV budget the running sequences' claims are checked against.
    pub fn kv_budget_bytes(&self) -> usize {
        self.limits.kv_budget_bytes
    }

    /// Moves sequences from the head of the queue into the running set while the limits
    /// allow; returns how many requests moved (a sequence with choices to fork counts them
    /// all, in running slots too). A sequence whose claim alone exceeds the limits is
    /// admitted when nothing else runs, so it is served (alone) rather than stuck forever.
    pub fn admit(&mut self) -> usize {
        let mut claimed = self.kv_claimed_bytes();
        let mut slots = self.running_slots();
        let mut admitted = 0;
        while let Some(head) = self.waiting.front() {
            let claim = self.kv_claim(head);
            let fits = claimed.saturating_add(claim) <= self.limits.kv_budget_bytes
                && slots + head.copies() <= self.limits.max_running;
            if !fits && !self.running.is_empty() {
                break;
            }
            if let Some(seq) = self.waiting.pop_front() {
                slots += seq.copies();
                admitted += seq.copies();
                self.running.push(seq);
                claimed = claimed.saturating_add(claim);
            }
        }
        admitted
    }

    /// Running slots taken: every running sequence and the choices still to fork off them.
    fn running_slots(&self) -> usize {
        self.running.iter().map(Schedulable::copies).sum()
    }

    /// Adds sequences forked off a running one (the choices of an `n > 1` request), which
    /// were admitted with it.
    pub fn adopt(&mut self, forked: Vec<S>) {
        self.running.extend(forked);
    }

    /// The next step's rows, in running order: one token per decoding sequence (and its
    /// drafts, see [`Self::draft_allowance`]), then prompt chunks within the remaining token
    /// budget. Empty when nothing runs.
    pub fn plan(&self) -> Vec<PlannedRow> {
        let decoding = self
            .running
            .iter()
            .filter(|s| s.prefilled() >= s.prompt_len())
            .count();
        let mut budget = self.limits.max_batch_tokens.saturating_sub(decoding);
        let mut spare_for_drafts = self.draft_allowance(decoding, budget);
        budget -= spare_for_drafts;
        let mut rows = Vec::with_capacity(self.running.len());
        for (index, seq) in self.running.iter().enumerate() {
            let remaining = seq.prompt_len().saturating_sub(seq.prefilled());
            if remaining == 0 {
                let drafts = seq.drafts(decoding).min(spare_for_drafts);
                spare_for_drafts -= drafts;
                rows.push(PlannedRow {
                    index,
                    tokens: 1 + drafts,
                    logits: match drafts {
                        0 => LogitsWanted::Last,
                        _ => LogitsWanted::All,
                    },
                });
                continue;
            }
            let tokens = remaining.min(self.chunk(seq));
            if tokens > budget {
                continue; // a later, shorter final chunk may still fit
            }
            budget -= tokens;
            rows.push(PlannedRow {
                index,
                tokens,
                logits: chunk_logits(seq, tokens == remaining),
            });
        }
        rows
    }

    /// The longest chunk `seq`'s prompt is cut into: `prefill_chunk`, or the whole prompt for a
    /// chain that needs it in one step, when it is not started yet and a step's budget beside
    /// every decode row can hold it (so it never waits for ever).
    fn chunk(&self, seq: &S) -> usize {
        let whole = seq.prompt_len();
        let room = self
            .limits
            .max_batch_tokens
            .saturating_sub(self.limits.max_running);
        match seq.whole_prompt() && seq.prefilled() == 0 && whole <= room {
            true => whole.max(self.limits.prefill_chunk),
            false => self.limits.prefill_chunk,
        }
    }

    /// Token budget the step's drafts may take: none past `speculation_max_batch` decoding
    /// sequences, and never the room one whole prompt chunk needs while a prompt waits, so
    /// drafts never delay a prefill.
    fn draft_allowance(&self, decoding: usize, budget: usize) -> usize {
        if decoding == 0 || decoding > self.limits.speculation_max_batch {
            return 0;
        }
        let prefilling = self.running.iter().any(|s| s.prefilled() < s.prompt_len());
        let reserved = match prefilling {
            true => self
                .running
                .iter()
                .map(|s| self.chunk(s))
                .fold(self.limits.prefill_chunk, usize::max),
            false => 0,
        };
        let wanted: usize = self.running.iter().map(|s| s.drafts(decoding)).sum();
        wanted.min(budget.saturating_sub(reserved))
    }

    /// Removes and returns the running sequences for which `done` says so, keeping the
    /// others in order.
    pub fn take_running(&mut self, mut done: impl FnMut(&S) -> bool) -> Vec<S> {
        let (finished, kept) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| done(s));
        self.running = kept;
        finished
    }

    /// Removes and returns the waiting sequences for which `done` says so.
    pub fn take_waiting(&mut self, mut done: impl FnMut(&S) -> bool) -> Vec<S> {
        let (finished, kept): (Vec<S>, Vec<S>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|s| done(s));
        self.waiting = kept.into();
        finished
    }
}

/// Logits a prefill chunk asks for: every position when prompt log-probs are wanted (each
/// chunk scores its own tokens), else only the last chunk's last position, for sampling.
fn chunk_logits(seq: &impl Schedulable, last_chunk: bool) -> LogitsWanted {
    match (
        seq.wants_prompt_hidden(),
        seq.wants_prompt_logits(),
        last_chunk,
    ) {
        (true, _, _) => LogitsWanted::Hidden,
        (false, true, _) => LogitsWanted::All,
        (false, false, true) => LogitsWanted::Last,
        (false, false, false) => LogitsWanted::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence as the scheduler sees it; `prefilled` is advanced by [`feed`].
    #[derive(Debug, Clone, PartialEq)]
    struct Fake {
        id: usize,
        prompt: usize,
        max_tokens: usize,
        prefilled: usize,
        allocated: usize,
        prompt_logits: bool,
        drafts: usize,
        whole: bool,
    }

    impl Schedulable for Fake {
        fn prompt_len(&self) -> usize {
            self.prompt
        }
        fn max_tokens(&self) -> usize {
            self.max_tokens
        }
        fn prefilled(&self) -> usize {
            self.prefilled
        }
        fn kv_allocated_bytes(&self) -> usize {
            self.allocated
        }
        fn wants_prompt_logits(&self) -> bool {
            self.prompt_logits
        }
        fn drafts(&self, _decoding: usize) -> usize {
            self.drafts
        }
        fn whole_prompt(&self) -> bool {
            self.whole
        }
    }

    fn seq(id: usize, prompt: usize) -> Fake {
        Fake {
            id,
            prompt,
            max_tokens: 10,
            prefilled: 0,
            allocated: 0,
            prompt_logits: false,
            drafts: 0,
            whole: false,
        }
    }

    fn limits() -> SchedulerLimits {
        SchedulerLimits {
            max_running: 4,
            max_batch_tokens: 16,
            prefill_chunk: 8,
            kv_budget_bytes: usize::MAX,
            kv_bytes_per_token: 1,
            speculation_max_batch: 2,
        }
    }

    fn scheduler(limits: SchedulerLimits, seqs: Vec<Fake>) -> Scheduler<Fake> {
        let mut s = Scheduler::new(limits);
        seqs.into_iter().for_each(|q| s.enqueue(q));
        s
    }

    /// Applies a plan as a forward step would: prefill progress advances by the chunk.
    fn feed(s: &mut Scheduler<Fake>, plan: &[PlannedRow]) {
        for row in plan {
            let q = &mut s.running_mut()[row.index];
            if q.prefilled < q.prompt {
                q.prefilled += row.tokens;
            }
        }
    }

    fn rows(plan: &[PlannedRow]) -> Vec<(usize, usize, LogitsWanted)> {
        plan.iter().map(|r| (r.index, r.tokens, r.logits)).collect()
    }

    #[test]
    fn a_long_prompt_is_prefilled_in_chunks_over_several_steps() {
        let mut s = scheduler(limits(), vec![seq(0, 20)]);
        assert_eq!(s.admit(), 1);
        let mut chunks = Vec::new();
        for _ in 0..3 {
            let plan = s.plan();
            chunks.push(rows(&plan));
            feed(&mut s, &plan);
        }
        use LogitsWanted::*;
        assert_eq!(
            chunks,
            vec![vec![(0, 8, None)], vec![(0, 8, None)], vec![(0, 4, Last)]]
        );
        assert_eq!(rows(&s.plan()), vec![(0, 1, Last)], "then it decodes");
    }

    #[test]
    fn decode_rows_come_first_and_prefill_gets_what_is_left() {
        let lim = SchedulerLimits {
            max_batch_tokens: 12,
            ..limits()
        };
        let mut decoding = vec![seq(0, 3), seq(1, 3), seq(2, 3)];
        decoding.iter_mut().for_each(|q| q.prefilled = 3);
        decoding.push(seq(3, 50));
        let mut s = scheduler(lim, decoding);
        s.admit();
        use LogitsWanted::*;
        let expect = vec![(0, 1, Last), (1, 1, Last), (2, 1, Last), (3, 8, None)];
        assert_eq!(rows(&s.plan()), expect);
    }

    fn drafting(id: usize, drafts: usize) -> Fake {
        Fake {
            prefilled: 3,
            drafts,
            ..seq(id, 3)
        }
    }

    /// A chain that prunes image tokens needs its prompt in one step: fed whole where a step
    /// beside every decode row can hold it (16 - 4 = 12 tokens here), in chunks where not.
    #[test]
    fn a_prompt_that_must_be_whole_is_fed_in_one_step_where_a_step_can_hold_it() {
        let whole = |id, prompt| Fake {
            whole: true,
            ..seq(id, prompt)
        };
        let mut s = scheduler(limits(), vec![whole(0, 12), whole(1, 13), seq(2, 12)]);
        s.admit();
        use LogitsWanted::*;
        let plan = s.plan();
        assert_eq!(rows(&plan), vec![(0, 12, Last)]);
        feed(&mut s, &plan);
        assert_eq!(rows(&s.plan()), vec![(0, 1, Last), (1, 8, None)]);
    }

    #[test]
    fn drafts_ride_with_their_decode_row_and_ask_for_every_position() {
        let mut s = scheduler(limits(), vec![drafting(0, 4), drafting(1, 0)]);
        s.admit();
        use LogitsWanted::*;
        assert_eq!(rows(&s.plan()), vec![(0, 5, All), (1, 1, Last)]);
    }

    #[test]
    fn drafts_never_take_the_room_of_a_waiting_prompt_chunk() {
        // 16 tokens: 2 decode rows, one chunk of 8 reserved, 6 left for 2 x 5 drafts.
        let mut s = scheduler(limits(), vec![drafting(0, 5), drafting(1, 5), seq(2, 30)]);
        s.admit();
        use LogitsWanted::*;
        assert_eq!(
            rows(&s.plan()),
            vec![(0, 6, All), (1, 2, All), (2, 8, None)]
        );
    }

    #[test]
    fn past_speculation_max_batch_decode_rows_feed_no_drafts() {
        let seqs = vec![drafting(0, 2), drafting(1, 2), drafting(2, 2)];
        let mut s = scheduler(limits(), seqs.clone());
        s.admit();
        use LogitsWanted::*;
        assert_eq!(
            rows(&s.plan()),
            vec![(0, 1, Last), (1, 1, Last), (2, 1, Last)]
        );
        let wider = SchedulerLimits {
            speculation_max_batch: 3,
            ..limits()
        };
        let mut s = scheduler(wider, seqs);
        s.admit();
        assert_eq!(rows(&s.plan()), vec![(0, 3, All), (1, 3, All), (2, 3, All)]);
    }

    #[test]
    fn a_chunk_never_shrinks_to_fit_so_cuts_do_not_depend_on_other_sequences() {
        let lim = SchedulerLimits {
            max_batch_tokens: 12,
            ..limits()
        };
        let mut s = scheduler(lim, vec![seq(0, 30), seq(1, 30), seq(2, 3)]);
        s.admit();
        use LogitsWanted::*;
        // Seq 1's chunk of 8 does not fit in the 4 left; seq 2's final 3 does.
        assert_eq!(rows(&s.plan()), vec![(0, 8, None), (2, 3, Last)]);
        // Alone, seq 1 is cut at the same places: 8, 16, 24, 30.
        let mut alone = scheduler(lim, vec![seq(1, 30)]);
        alone.admit();
        let mut cuts = Vec::new();
        while alone.running()[0].prefilled < 30 {
            let plan = alone.plan();
            feed(&mut alone, &plan);
            cuts.push(alone.running()[0].prefilled);
        }
        assert_eq!(cuts, vec![8, 16, 24, 30]);
    }

    #[test]
    fn prefill_chunks_share_the_budget_in_admission_order() {
        let mut s = scheduler(limits(), vec![seq(0, 30), seq(1, 30), seq(2, 5)]);
        s.admit();
        use LogitsWanted::*;
        // 16 tokens: 8 + 8, the third waits for the next step.
        assert_eq!(rows(&s.plan()), vec![(0, 8, None), (1, 8, None)]);
    }

    #[test]
    fn prompt_logprobs_ask_for_all_logits_on_every_chunk() {
        let mut q = seq(0, 12);
        q.prompt_logits = true;
        let mut s = scheduler(limits(), vec![q]);
        s.admit();
        let first = s.plan();
        feed(&mut s, &first);
        use LogitsWanted::*;
        assert_eq!(rows(&first), vec![(0, 8, All)]);
        assert_eq!(rows(&s.plan()), vec![(0, 4, All)]);
    }

    #[test]
    fn admission_stops_at_max_running() {
        let seqs = (0..6).map(|i| seq(i, 2)).collect();
        let mut s = scheduler(limits(), seqs);
        assert_eq!(s.admit(), 4);
        assert_eq!((s.running().len(), s.waiting_len()), (4, 2));
        s.take_running(|q| q.id == 1);
        assert_eq!(s.admit(), 1);
        let ids: Vec<usize> = s.running().iter().map(|q| q.id).collect();
        assert_eq!(
            ids,
            vec![0, 2, 3, 4],
            "the freed slot goes to the queue's head"
        );
    }

    #[test]
    fn admission_respects_the_kv_budget_and_never_skips_the_head() {
        // Claims are (prompt + max_tokens) bytes: 20, 50, 12.
        let lim = SchedulerLimits {
            kv_budget_bytes: 55,
            ..limits()
        };
        let mut s = scheduler(lim, vec![seq(0, 10), seq(1, 40), seq(2, 2)]);
        assert_eq!(s.admit(), 1, "20 + 50 > 55");
        assert_eq!(s.kv_claimed_bytes(), 20);
        assert_eq!(
            s.admit(),
            0,
            "seq 2 (12) would fit, but it waits behind seq 1"
        );
        s.take_running(|_| true);
        assert_eq!(s.admit(), 1, "seq 1 runs once seq 0 is done");
    }

    #[test]
    fn real_allocation_beyond_the_estimate_counts_against_the_budget() {
        let lim = SchedulerLimits {
            kv_budget_bytes: 100,
            ..limits()
        };
        let mut s = scheduler(lim, vec![seq(0, 10), seq(1, 10)]);
        assert_eq!(s.admit(), 2);
        s.running_mut()[0].allocated = 70; // grew past its estimate of 20
        s.enqueue(seq(2, 5));
        assert_eq!(s.admit(), 0, "70 + 20 + 15 > 100");
        s.take_running(|q| q.id == 1);
        assert_eq!(s.admit(), 1, "70 + 15 <= 100");
    }

    #[test]
    fn a_request_larger_than_the_budget_runs_alone() {
        let lim = SchedulerLimits {
            kv_budget_bytes: 5,
            ..limits()
        };
        let mut s = scheduler(lim, vec![seq(0, 10), seq(1, 10)]);
        assert_eq!(s.admit(), 1);
        assert_eq!(s.admit(), 0);
        s.take_running(|_| true);
        assert_eq!(s.admit(), 1);
    }

    #[test]
    fn nothing_running_plans_nothing() {
        let s = scheduler(limits(), vec![seq(0, 4)]);
        assert!(
            s.plan().is_empty(),
            "waiting sequences are not planned before admission"
        );
        assert!(!s.is_idle());
    }

    #[test]
    fn take_waiting_drops_only_the_matching_sequences() {
        let mut s = scheduler(limits(), vec![seq(0, 1), seq(1, 1), seq(2, 1)]);
        let gone = s.take_waiting(|q| q.id == 1);
        assert_eq!(gone.len(), 1);
        assert_eq!(s.waiting_len(), 2);
    }
}

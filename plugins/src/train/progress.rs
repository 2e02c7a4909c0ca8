//! How long offline work (training, evaluation) tells its caller how far it got: the
//! command-line shims turn it into progress bars with an ETA and a JSONL log of losses; tests
//! and library callers pass [`Quiet`].

/// Receives a long computation's progress. Every method defaults to ignoring it.
pub trait Progress {
    /// A phase of `total` units of work begins (`name` says what: "activations", "steps").
    fn phase(&mut self, _name: &str, _total: usize) {}

    /// `n` more units of the current phase are done.
    fn advance(&mut self, _n: usize) {}

    /// The losses of training step `step` (0-based), by name.
    fn losses(&mut self, _step: usize, _losses: &[(&'static str, f32)]) {}
}

/// Progress nobody watches.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl Progress for Quiet {}

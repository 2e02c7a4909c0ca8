//! Stop strings: the filter between a sequence's streamed text and what the client sees.
//!
//! Sits at the end of each engine step, after the incremental decoder turned the sampled id
//! into text. A stop string ends generation and is never part of the output, and since text
//! streams out token by token, any tail of the text that could still grow into a stop string
//! is held back until it either completes one (dropped, generation ends) or cannot anymore
//! (released). vLLM and TGI do the same; the held text is at most the longest stop string
//! minus one byte. With vLLM's `include_stop_str_in_output` the matched stop string ends the
//! output instead of being cut off; before `min_tokens` tokens (text pushed unarmed) nothing
//! is looked for or held back.

/// What one push of text produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// No stop string yet; this text is safe to send (may be empty while text is held back).
    Emit(String),
    /// A stop string completed: the text before it (and the stop string itself, when kept)
    /// is the last output; generation ends.
    Matched(String),
}

/// Per-sequence stop-string state.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Whether a matched stop string is part of the output.
    keep: bool,
    /// Text not yet released: a suffix that is a proper prefix of some stop string.
    held: String,
}

impl StopStrings {
    /// Empty stop strings are ignored: they would match before any output. `keep`: a
    /// matched stop string stays at the end of the output.
    pub fn new(stops: &[String], keep: bool) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            keep,
            held: String::new(),
        }
    }

    /// Adds newly decoded text and returns what may go out. Unless `armed`, stop strings are
    /// not looked for and all of the text goes out.
    pub fn push(&mut self, text: &str, armed: bool) -> StopOutcome {
        self.held.push_str(text);
        if !armed {
            return StopOutcome::Emit(std::mem::take(&mut self.held));
        }
        if let Some((at, len)) = self.earliest_match() {
            let end = if self.keep { at + len } else { at };
            let last = self.held[..end].to_string();
            self.held.clear();
            return StopOutcome::Matched(last);
        }
        let keep_from = self.held.len() - self.partial_suffix_len();
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopOutcome::Emit(out)
    }

    /// At the end of generation: the held text (it can no longer complete a stop string),
    /// after pushing `tail` (the decoder's final flush). Returns the text and whether a stop
    /// string matched inside `tail`.
    pub fn finish(&mut self, tail: &str, armed: bool) -> (String, bool) {
        match self.push(tail, armed) {
            StopOutcome::Matched(before) => (before, true),
            StopOutcome::Emit(mut out) => {
                out.push_str(&self.held);
                self.held.clear();
                (out, false)
            }
        }
    }

    /// Byte offset and length of the first stop string occurrence in the held text (the
    /// longest of those starting there). Earlier output was released only when no stop
    /// string could start in it, so searching `held` suffices.
    fn earliest_match(&self) -> Option<(usize, usize)> {
        self.stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s.len())))
            .min_by_key(|&(at, len)| (at, std::cmp::Reverse(len)))
    }

    /// Length of the longest suffix of the held text that is a proper prefix of a stop string.
    fn partial_suffix_len(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let held = self.held.as_str();
        // Candidate starts from the longest possible suffix down, on char boundaries only.
        let min_start = held.len().saturating_sub(longest.saturating_sub(1));
        held.char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= min_start)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&held[i..])))
            .map_or(0, |i| held.len() - i)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn filter(stops: &[&str]) -> StopStrings {
        StopStrings::new(
            &stops.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            false,
        )
    }

    /// Pushes pieces in order; returns everything emitted and whether a stop matched.
    fn run(f: &mut StopStrings, pieces: &[&str]) -> (String, bool) {
        let mut out = String::new();
        for p in pieces {
            match f.push(p, true) {
                StopOutcome::Emit(t) => out.push_str(&t),
                StopOutcome::Matched(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        let (tail, matched) = f.finish("", true);
        out.push_str(&tail);
        (out, matched)
    }

    #[test]
    fn without_stops_everything_passes_at_once() {
        let mut f = filter(&[]);
        assert_eq!(f.push("hello", true), StopOutcome::Emit("hello".into()));
    }

    #[test]
    fn a_possible_prefix_is_held_then_released() {
        let mut f = filter(&["END"]);
        assert_eq!(f.push("abc E", true), StopOutcome::Emit("abc ".into()));
        assert_eq!(f.push("N", true), StopOutcome::Emit(String::new()));
        assert_eq!(f.push("x", true), StopOutcome::Emit("ENx".into()));
    }

    #[test]
    fn a_match_across_pushes_emits_only_the_text_before_it() {
        let mut f = filter(&["END"]);
        assert_eq!(run(&mut f, &["one E", "N", "D two"]), ("one ".into(), true));
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let mut f = filter(&["cd", "b"]);
        assert_eq!(f.push("abcd", true), StopOutcome::Matched("a".into()));
    }

    #[test]
    fn a_held_prefix_that_never_completes_comes_out_at_finish() {
        let mut f = filter(&["STOP"]);
        assert_eq!(run(&mut f, &["go ST"]), ("go ST".into(), false));
    }

    #[test]
    fn finish_matches_inside_the_final_flush() {
        let mut f = filter(&["!!"]);
        assert_eq!(f.push("hi!", true), StopOutcome::Emit("hi".into()));
        assert_eq!(f.finish("!x", true), (String::new(), true));
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries_only() {
        let mut f = filter(&["é!"]);
        assert_eq!(f.push("café", true), StopOutcome::Emit("caf".into()));
        assert_eq!(f.push("?", true), StopOutcome::Emit("é?".into()));
        assert_eq!(
            run(&mut filter(&["é!"]), &["cafxé", "!"]),
            ("cafx".into(), true)
        );
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let mut f = filter(&[""]);
        assert_eq!(f.push("text", true), StopOutcome::Emit("text".into()));
    }

    #[test]
    fn a_stop_string_at_the_very_start_gives_no_output() {
        let mut f = filter(&["\n\n"]);
        assert_eq!(run(&mut f, &["\n", "\nmore"]), (String::new(), true));
    }
}

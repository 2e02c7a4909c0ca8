//! Prompt lookup: draft tokens copied from the sequence itself (Saxena's prompt lookup
//! decoding; vLLM's `ngram` method). When the last `n` tokens occurred earlier in the prompt or
//! the output, the tokens that followed them then are a likely continuation now: quoting,
//! correcting or reformatting a given passage repeats long stretches of it.

/// Up to `k` tokens to follow `tokens`: the longest suffix of `tokens` of length within
/// `[min_n, max_n]` that also occurs earlier (the earliest such occurrence; it may overlap the
/// suffix), and the tokens after that occurrence. Empty when no such suffix recurs. The rule
/// is vLLM's `_find_longest_matched_ngram_and_propose_tokens`, by direct search instead of
/// KMP: `max_n` is small, so this is `O(len * max_n)` compares per step, microseconds at 8k.
pub fn propose(tokens: &[u32], min_n: usize, max_n: usize, k: usize) -> Vec<u32> {
    let len = tokens.len();
    let min_n = min_n.max(1);
    for n in (min_n..=max_n.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        let found = tokens[..len - 1]
            .windows(n)
            .take(len - n)
            .position(|w| w == suffix);
        if let Some(at) = found {
            let start = at + n;
            let end = (start + k).min(len);
            return tokens[start..end].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tokens_after_the_longest_recurring_suffix_are_proposed() {
        // "a b c d | x b c": suffix "b c" recurs at 1; "x b c" does not.
        let t = [1, 2, 3, 4, 9, 2, 3];
        assert_eq!(propose(&t, 1, 3, 4), vec![4, 9, 2, 3]);
        assert_eq!(propose(&t, 1, 3, 2), vec![4, 9]);
        // Only a 1-gram allowed: "3" first occurs at 2, followed by 4.
        assert_eq!(propose(&t, 1, 1, 1), vec![4]);
        // A 3-gram required: none recurs.
        assert!(propose(&t, 3, 3, 4).is_empty());
    }

    #[test]
    fn the_longest_match_wins_over_an_earlier_shorter_one() {
        // "7" alone recurs at 0 (followed by 1), but "5 7" recurs at 3 (followed by 8).
        let t = [7, 1, 0, 5, 7, 8, 0, 5, 7];
        assert_eq!(propose(&t, 1, 2, 1), vec![8]);
        assert_eq!(propose(&t, 1, 1, 1), vec![1]);
    }

    #[test]
    fn the_earliest_occurrence_is_used_and_drafts_stop_at_the_end() {
        // "1 2" at 0 and at 3: the earliest (0) is followed by 3 4 1 2.
        let t = [1, 2, 3, 1, 2, 4, 1, 2];
        assert_eq!(propose(&t, 2, 2, 3), vec![3, 1, 2]);
        // A match near the end leaves fewer than k tokens to copy (overlap allowed).
        let t = [5, 5, 5];
        assert_eq!(propose(&t, 1, 2, 4), vec![5]);
    }

    #[test]
    fn short_or_empty_sequences_propose_nothing() {
        assert!(propose(&[], 1, 3, 4).is_empty());
        assert!(propose(&[1], 1, 3, 4).is_empty());
        assert!(propose(&[1, 2], 1, 3, 4).is_empty());
        assert!(propose(&[1, 2, 1], 1, 3, 0).is_empty());
    }

    /// The rule against vLLM's algorithm written out by brute force: for every n from the
    /// longest down, the first window equal to the suffix, excluding the suffix itself.
    #[test]
    fn agrees_with_a_brute_force_search_on_random_sequences() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 4) as u32
        };
        for _ in 0..500 {
            let len = 1 + (next() as usize * 7 + next() as usize) % 24;
            let t: Vec<u32> = (0..len).map(|_| next()).collect();
            let mut want = Vec::new();
            'n: for n in (1..=3usize).rev() {
                if n >= len {
                    continue;
                }
                for at in 0..len - n {
                    if t[at..at + n] == t[len - n..] {
                        want = t[at + n..(at + n + 3).min(len)].to_vec();
                        break 'n;
                    }
                }
            }
            assert_eq!(propose(&t, 1, 3, 3), want, "{t:?}");
        }
    }
}

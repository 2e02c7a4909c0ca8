//! The candidate tokens a step's predictors score: SpecEE's draft tokens, from sources that
//! cost nothing at run time.
//!
//! The paper drafts with an EAGLE head, whose vocabulary projection on this model would cost
//! as much as the LM head itself (a quarter of a step). Here the candidates for the next
//! token come from (1) prompt lookup: the tokens that followed earlier occurrences of the
//! sequence's last n-gram, longest n first, most recent occurrence first, and (2) a table the
//! trainer learns from the model's own greedy outputs: after token t, the k tokens that most
//! often followed it (a row for every token; tokens never seen get the overall most frequent).

use std::collections::HashMap;

/// After each token, its k most frequent successors in the model's outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftTable {
    k: usize,
    /// `(vocab, k)` row-major.
    rows: Vec<u32>,
}

impl DraftTable {
    /// A table from its `(vocab, k)` rows; `None` when the length is not a multiple of `k`.
    pub fn from_rows(k: usize, rows: Vec<u32>) -> Option<Self> {
        (k > 0 && rows.len().is_multiple_of(k)).then_some(Self { k, rows })
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn vocab(&self) -> usize {
        self.rows.len() / self.k
    }

    pub fn rows(&self) -> &[u32] {
        &self.rows
    }

    /// The k successors of `token` (none for a token outside the table).
    pub fn next(&self, token: u32) -> &[u32] {
        let i = token as usize * self.k;
        self.rows.get(i..i + self.k).unwrap_or(&[])
    }

    /// Counts successors over `sequences` (each a token sequence) and keeps each token's k
    /// most frequent, ties by smaller id; rows with fewer than k are filled from the overall
    /// most frequent tokens, so every row holds k distinct ids.
    pub fn learn<'a>(
        sequences: impl IntoIterator<Item = &'a [u32]>,
        vocab: usize,
        k: usize,
    ) -> Self {
        let mut pairs: HashMap<u32, HashMap<u32, u32>> = HashMap::new();
        let mut overall: HashMap<u32, u32> = HashMap::new();
        for s in sequences {
            for w in s.windows(2) {
                *pairs.entry(w[0]).or_default().entry(w[1]).or_default() += 1;
                *overall.entry(w[1]).or_default() += 1;
            }
        }
        let ranked = |counts: &HashMap<u32, u32>| {
            let mut v: Vec<(u32, u32)> = counts.iter().map(|(&t, &c)| (t, c)).collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            v.into_iter().map(|(t, _)| t).collect::<Vec<u32>>()
        };
        let mut common = ranked(&overall);
        common.extend(
            (0..vocab as u32)
                .filter(|t| !overall.contains_key(t))
                .take(k),
        );
        let mut rows = Vec::with_capacity(vocab * k);
        for token in 0..vocab as u32 {
            let own = pairs.get(&token).map(ranked).unwrap_or_default();
            let mut row: Vec<u32> = Vec::with_capacity(k);
            for t in own.into_iter().chain(common.iter().copied()) {
                if row.len() == k {
                    break;
                }
                if (t as usize) < vocab && !row.contains(&t) {
                    row.push(t);
                }
            }
            rows.extend(row);
        }
        Self { k, rows }
    }
}

/// The k candidates for the token after `tokens`: prompt-lookup successors first (n-grams of
/// length `lookup_max` down to 1), then the table's row for the last token; distinct.
pub fn candidates(tokens: &[u32], table: &DraftTable, lookup_max: usize) -> Vec<u32> {
    let k = table.k();
    let mut out: Vec<u32> = Vec::with_capacity(k);
    let len = tokens.len();
    'lookup: for n in (1..=lookup_max.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        // Occurrences ending before the last token, most recent first.
        for start in (0..len - n).rev() {
            if &tokens[start..start + n] == suffix {
                let next = tokens[start + n];
                if !out.contains(&next) {
                    out.push(next);
                    if out.len() == k {
                        break 'lookup;
                    }
                }
            }
        }
    }
    if let Some(&last) = tokens.last() {
        for &t in table.next(last) {
            if out.len() == k {
                break;
            }
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_each_tokens_most_frequent_successors_and_fills_from_the_commonest() {
        let seqs: [&[u32]; 2] = [&[0, 1, 0, 1, 0, 2], &[3, 1, 3, 1, 3, 2]];
        let t = DraftTable::learn(seqs, 5, 2);
        assert_eq!(t.vocab(), 5);
        // After 0: 1 twice, 2 once. After 1: 0 twice, 3 twice (tie: smaller id first).
        assert_eq!(t.next(0), &[1, 2]);
        assert_eq!(t.next(1), &[0, 3]);
        // 4 never occurs: the overall commonest (1 four times, then 0 and 3 twice each).
        assert_eq!(t.next(4), &[1, 0]);
        // 2 is followed by nothing: filled the same way.
        assert_eq!(t.next(2), &[1, 0]);
        assert!(t.next(9).is_empty());
        for token in 0..5 {
            let row = t.next(token);
            assert!(row[0] != row[1], "{token}: {row:?}");
        }
    }

    #[test]
    fn candidates_take_lookup_successors_before_the_table_without_repeats() {
        let table = DraftTable::from_rows(3, (0..10u32).flat_map(|_| [7, 8, 9]).collect()).unwrap();
        // Last bigram "2 3" occurred at 1 (followed by 4); unigram "3" also at 5 (followed by
        // 6, more recent) and 2 (4 again).
        let t = [1, 2, 3, 4, 0, 3, 6, 2, 3];
        assert_eq!(candidates(&t, &table, 2), vec![4, 6, 7]);
        assert_eq!(candidates(&t, &table, 1), vec![6, 4, 7]);
        // Nothing recurs: the table alone.
        assert_eq!(candidates(&[1, 2], &table, 3), vec![7, 8, 9]);
        assert_eq!(candidates(&[], &table, 3), Vec::<u32>::new());
        // A table successor already proposed by lookup is not repeated.
        let t = [5, 7, 5];
        assert_eq!(candidates(&t, &table, 3), vec![7, 8, 9]);
    }
}

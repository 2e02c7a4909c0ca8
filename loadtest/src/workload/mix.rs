//! Deterministic assignment of requests to chains by ratio (`--mix base=50,sql=30,steer=20`).
//!
//! Weights are reduced by their gcd to a block (5, 3, 2: ten requests); each consecutive block
//! of request indices holds exactly each chain's share, in an order shuffled by the seed and
//! the block number. So any run of whole blocks has the exact ratios (a per-request coin flip
//! would drift by sqrt(n)), the order is not periodic, and request `i` gets the same chain in
//! every level of a sweep and every run with the same seed.

use rand::seq::SliceRandom;

use super::{seeded, Purpose};
use crate::parse::MixEntry;

/// The chain every request gets without `--mix`.
pub const BASE: &str = "base";

#[derive(Debug, Clone)]
pub struct Mix {
    names: Vec<String>,
    /// One block: each chain's index into `names`, repeated by its reduced weight.
    block: Vec<usize>,
    seed: u64,
}

impl Mix {
    /// Zero-weight entries are dropped; an empty mix is all `base`.
    pub fn new(entries: &[MixEntry], seed: u64) -> Mix {
        let entries: Vec<&MixEntry> = entries.iter().filter(|e| e.weight > 0).collect();
        if entries.is_empty() {
            return Mix {
                names: vec![BASE.to_string()],
                block: vec![0],
                seed,
            };
        }
        let g = entries.iter().fold(0, |g, e| gcd(g, e.weight));
        let block = entries
            .iter()
            .enumerate()
            .flat_map(|(i, e)| std::iter::repeat_n(i, (e.weight / g) as usize))
            .collect();
        Mix {
            names: entries.iter().map(|e| e.name.clone()).collect(),
            block,
            seed,
        }
    }

    /// The chain names in mix order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The chain of request `index`.
    pub fn chain(&self, index: u64) -> &str {
        let len = self.block.len() as u64;
        let mut block = self.block.clone();
        block.shuffle(&mut seeded(self.seed, Purpose::Mix, index / len));
        &self.names[block[(index % len) as usize]]
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse;

    fn counts(mix: &Mix, range: std::ops::Range<u64>) -> Vec<usize> {
        mix.names()
            .iter()
            .map(|n| range.clone().filter(|&i| mix.chain(i) == n).count())
            .collect()
    }

    #[test]
    fn whole_blocks_have_exact_ratios() {
        let mix = Mix::new(&parse::mix("base=50,sql=30,steer=20").unwrap(), 7);
        assert_eq!(counts(&mix, 0..10), vec![5, 3, 2]);
        assert_eq!(counts(&mix, 30..130), vec![50, 30, 20]);
    }

    #[test]
    fn assignment_depends_on_seed_and_index_only() {
        let entries = parse::mix("a=1,b=1").unwrap();
        let (x, y, z) = (
            Mix::new(&entries, 1),
            Mix::new(&entries, 1),
            Mix::new(&entries, 2),
        );
        let seq = |m: &Mix| (0..64).map(|i| m.chain(i).to_string()).collect::<Vec<_>>();
        assert_eq!(seq(&x), seq(&y));
        assert_ne!(seq(&x), seq(&z));
        // Not periodic: blocks are shuffled independently, so both orders of (a, b) occur.
        let a_first = (0..32).filter(|k| x.chain(2 * k) == "a").count();
        assert!(a_first > 0 && a_first < 32, "{a_first}");
    }

    #[test]
    fn empty_mix_is_all_base() {
        let mix = Mix::new(&[], 0);
        assert!((0..5).all(|i| mix.chain(i) == BASE));
    }
}

//! Turns the attention hooks' block choices ([`KeyBlocks`]) into what the attention kernel
//! reads: per key/value head, sorted disjoint ranges of cache slots.
//!
//! A hook names blocks; the kernel wants ranges, so adjacent blocks merge into one range (a
//! selection of every block is then the single range `0..slots`, and the kernel takes the
//! same path, bit for bit, as with no selection at all). Several selecting hooks in one chain
//! read the intersection of their choices. A malformed choice (wrong number of heads, blocks
//! out of order or past the cache) is an error naming the hook, never a panic.

use std::ops::Range;

use crate::error::{ModelError, Result};
use crate::hooks::KeyBlocks;

/// Per key/value head, the slot ranges attention reads.
pub(crate) type HeadRanges = Vec<Vec<Range<u32>>>;

/// `blocks` as slot ranges over a cache of `slots` keys with `n_kv` heads.
pub(crate) fn ranges(
    hook: &str,
    blocks: &KeyBlocks,
    n_kv: usize,
    slots: usize,
) -> Result<HeadRanges> {
    let bad = |message: String| ModelError::Hook {
        hook: hook.to_string(),
        message,
    };
    if blocks.per_kv_head.len() != n_kv {
        return Err(bad(format!(
            "selected blocks for {} key/value heads, the model has {n_kv}",
            blocks.per_kv_head.len()
        )));
    }
    if blocks.block_size == 0 {
        return Err(bad("block size 0".into()));
    }
    let size = blocks.block_size;
    let n_blocks = slots.div_ceil(size);
    let mut out = Vec::with_capacity(n_kv);
    for (h, list) in blocks.per_kv_head.iter().enumerate() {
        if !list.windows(2).all(|w| w[0] < w[1]) {
            return Err(bad(format!(
                "blocks of key/value head {h} are not ascending"
            )));
        }
        if let Some(&b) = list.iter().find(|&&b| b as usize >= n_blocks) {
            return Err(bad(format!(
                "block {b} of key/value head {h} is past the {slots} cached keys"
            )));
        }
        let mut head: Vec<Range<u32>> = Vec::new();
        for &b in list {
            let start = b as usize * size;
            let end = (start + size).min(slots);
            match head.last_mut() {
                Some(last) if last.end as usize == start => last.end = end as u32,
                _ => head.push(start as u32..end as u32),
            }
        }
        out.push(head);
    }
    Ok(out)
}

/// The slots both selections read, per head.
pub(crate) fn intersect(a: &HeadRanges, b: &HeadRanges) -> HeadRanges {
    a.iter().zip(b).map(|(x, y)| intersect_head(x, y)).collect()
}

fn intersect_head(a: &[Range<u32>], b: &[Range<u32>]) -> Vec<Range<u32>> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (start, end) = (a[i].start.max(b[j].start), a[i].end.min(b[j].end));
        if start < end {
            out.push(start..end);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(size: usize, heads: &[&[u32]]) -> KeyBlocks {
        KeyBlocks {
            block_size: size,
            per_kv_head: heads.iter().map(|h| h.to_vec()).collect(),
        }
    }

    #[test]
    fn adjacent_blocks_merge_and_the_last_block_is_clipped() -> Result<()> {
        let r = ranges("g", &blocks(4, &[&[0, 1, 2], &[0, 2]]), 2, 10)?;
        assert_eq!(r, vec![vec![0..10], vec![0..4, 8..10]]);
        // Every block selected is one range over every slot: the kernel's dense path.
        let all = ranges("g", &blocks(4, &[&[0, 1, 2]]), 1, 9)?;
        assert_eq!(all, vec![vec![0..9]]);
        Ok(())
    }

    #[test]
    fn malformed_choices_are_errors_naming_the_hook() {
        for (b, n_kv, why) in [
            (blocks(4, &[&[0]]), 2, "key/value heads"),
            (blocks(4, &[&[2, 1]]), 1, "ascending"),
            (blocks(4, &[&[1, 1]]), 1, "ascending"),
            (blocks(4, &[&[3]]), 1, "past"),
            (blocks(0, &[&[0]]), 1, "block size"),
        ] {
            let e = ranges("gate", &b, n_kv, 10).unwrap_err().to_string();
            assert!(e.contains("gate") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn intersection_keeps_what_both_read() {
        let a = vec![vec![0..10, 20..30], vec![0..4]];
        let b = vec![vec![5..25], vec![4..8]];
        assert_eq!(intersect(&a, &b), vec![vec![5..10, 20..25], vec![]]);
    }
}

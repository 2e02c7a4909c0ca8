//! Scaled dot-product attention of one batch row against its own KV cache, with grouped
//! query heads (Ainslie et al., "GQA", arXiv 2305.13245).
//!
//! Query heads are regrouped per key/value head instead of repeating the keys `group` times
//! (`repeat_kv` in transformers): `(n_kv, group * L, d) x (n_kv, d, T)` computes the same
//! scores without copying the cache.
//!
//! On the CPU, with f32 tensors, [`attend`] runs the direct kernel of
//! [`crate::kernels::attention`] instead of candle ops; other devices and dtypes keep the
//! candle-op path ([`attend_ops`]). The tests hold both to the same per-head reference.
//!
//! A sparse-attention plug-in may restrict each key/value head to some of the row's keys
//! ([`HeadKeys`], SeerAttention-R's per-head block selection); the CPU kernel then reads only
//! those, the candle-op path gathers them per key/value head.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
pub(crate) use crate::kernels::attention::QueryPositions;
use crate::kernels::attention::{check_head_keys, RowAttention};
use crate::kernels::SimdPath;

/// Which of a row's `T` keys each key/value head reads: for kv head `h`, `ranges[h]` is a
/// sorted list of disjoint, non-empty half-open ranges of key indices (`0..T`).
///
/// Built by a sparse-attention plug-in (SeerAttention-R's per-head block selection, Gao et
/// al. 2025) from the blocks it keeps; [`attend`] then reads only those keys and values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadKeys {
    pub ranges: Vec<Vec<Range<u32>>>,
}

impl HeadKeys {
    /// Every key for each of `n_kv` heads: the same result as no selection, bit for bit.
    pub fn all(n_kv: usize, t: u32) -> Self {
        let every: Vec<Range<u32>> = (t > 0).then_some(0..t).into_iter().collect();
        Self {
            ranges: vec![every; n_kv],
        }
    }

    /// The keys of whole blocks of `block_size` keys: `blocks[h]` lists, strictly
    /// ascending, the blocks kv head `h` reads out of `t` keys. The last block may be short
    /// (it ends at `t`); adjacent blocks become one range. A block past `t`, a list out of
    /// order or a zero block size is an error.
    pub fn from_blocks(block_size: u32, t: u32, blocks: &[Vec<u32>]) -> Result<Self> {
        if block_size == 0 {
            return Err(bad_selection("block size 0".into()));
        }
        let n_blocks = t.div_ceil(block_size);
        let mut ranges = Vec::with_capacity(blocks.len());
        for (h, list) in blocks.iter().enumerate() {
            let mut head: Vec<Range<u32>> = Vec::with_capacity(list.len());
            let mut prev: Option<u32> = None;
            for &b in list {
                if b >= n_blocks {
                    return Err(bad_selection(format!(
                        "key/value head {h}: block {b} is past the {n_blocks} blocks of {t} keys"
                    )));
                }
                if prev.is_some_and(|p| b <= p) {
                    return Err(bad_selection(format!(
                        "key/value head {h}: blocks {list:?} are not strictly ascending"
                    )));
                }
                prev = Some(b);
                // b < n_blocks, so b * block_size < t and neither bound overflows.
                let lo = b * block_size;
                let hi = lo + block_size.min(t - lo);
                match head.last_mut() {
                    Some(r) if r.end == lo => r.end = hi,
                    _ => head.push(lo..hi),
                }
            }
            ranges.push(head);
        }
        Ok(Self { ranges })
    }

    /// The keys both selections read, per head (several selecting hooks in one chain).
    pub fn intersect(&self, other: &Self) -> Self {
        let ranges = self
            .ranges
            .iter()
            .zip(&other.ranges)
            .map(|(a, b)| intersect_ranges(a, b))
            .collect();
        Self { ranges }
    }

    /// Checks the selection against a layer of `n_kv` key/value heads and `t` keys.
    pub fn check(&self, n_kv: usize, t: usize) -> Result<()> {
        check_head_keys(&self.ranges, n_kv, t).map_err(bad_selection)
    }
}

/// The ranges both sorted, disjoint lists cover.
fn intersect_ranges(a: &[Range<u32>], b: &[Range<u32>]) -> Vec<Range<u32>> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (lo, hi) = (a[i].start.max(b[j].start), a[i].end.min(b[j].end));
        if lo < hi {
            out.push(lo..hi);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The error of a selection that does not fit the layer: a plug-in's fault.
fn bad_selection(message: String) -> ModelError {
    ModelError::Hook {
        hook: "attention selection".into(),
        message,
    }
}

/// Attention for one row.
/// `q`: `(L, n_heads, d)` after RoPE; `k`, `v`: `(n_kv, T, d)`; `key_positions`: the
/// position of each of the `T` keys when a hook selected a subset (`None`: keys are
/// positions `0..T`); `head_keys`: which keys each key/value head reads (`None`: all);
/// `queries`: where the queries sit (a `usize`: the first of consecutive positions). Query `i`
/// of head `h` reads the keys of `head_keys.ranges[h / group]` at positions up to its own;
/// one that reads no key gives zeros. Returns `(L, n_heads * d)`.
pub(crate) fn attend<'p>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_positions: Option<&[u32]>,
    head_keys: Option<&HeadKeys>,
    queries: impl Into<QueryPositions<'p>>,
) -> Result<Tensor> {
    let queries = queries.into();
    let (n_kv, t, _) = k.dims3()?;
    if let Some(n) = queries.count().filter(|&n| n != q.dim(0).unwrap_or(n)) {
        return Err(ModelError::Batch(format!(
            "{n} query positions for {} queries",
            q.dim(0)?
        )));
    }
    if let Some(p) = key_positions.filter(|p| p.len() != t) {
        return Err(ModelError::Batch(format!(
            "{} key positions for {t} keys",
            p.len()
        )));
    }
    if let Some(sel) = head_keys {
        sel.check(n_kv, t)?;
    }
    let cpu = |t: &Tensor, dtypes: &[DType]| t.device().is_cpu() && dtypes.contains(&t.dtype());
    // U8: q8_0 blocks (`KvDtype::Q8_0`), which only the CPU kernel reads.
    let cached = [DType::F32, DType::F16, DType::BF16, DType::U8];
    if cpu(q, &[DType::F32]) && cpu(k, &cached) && cpu(v, &cached) {
        let op = RowAttention {
            key_positions,
            head_keys: head_keys.map(|s| s.ranges.as_slice()),
            queries,
            path: SimdPath::detect(),
        };
        return Ok(q.apply_op3_no_bwd(k, v, &op)?);
    }
    if k.dtype() == DType::U8 || v.dtype() == DType::U8 {
        return Err(ModelError::Batch(
            "a q8_0 KV cache is read by the CPU attention kernel only".into(),
        ));
    }
    // The ops compute in the query's dtype (an f16 or bf16 cache on a GPU is widened here).
    let (k, v) = (&k.to_dtype(q.dtype())?, &v.to_dtype(q.dtype())?);
    attend_ops(q, k, v, key_positions, head_keys, queries)
}

/// [`attend`] from candle ops, on any device and dtype. With a selection, each key/value head
/// gathers its keys, values and their positions and runs [`dense_ops`] with its query heads.
fn attend_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_positions: Option<&[u32]>,
    head_keys: Option<&HeadKeys>,
    queries: QueryPositions<'_>,
) -> Result<Tensor> {
    let Some(sel) = head_keys else {
        return dense_ops(q, k, v, key_positions, queries);
    };
    let (l, n_heads, d) = q.dims3()?;
    let group = n_heads / sel.ranges.len().max(1);
    let mut outs = Vec::with_capacity(sel.ranges.len());
    for (kv, ranges) in sel.ranges.iter().enumerate() {
        let idx: Vec<u32> = ranges.iter().flat_map(|r| r.clone()).collect();
        if idx.is_empty() {
            outs.push(Tensor::zeros((l, group * d), q.dtype(), q.device())?);
            continue;
        }
        let pos: Vec<u32> = match key_positions {
            Some(p) => idx.iter().map(|&j| p[j as usize]).collect(),
            None => idx.clone(),
        };
        let ids = Tensor::new(idx.as_slice(), k.device())?;
        // (T, d) rows of one head are contiguous in the cache, as index_select needs.
        let gather = |x: &Tensor| -> Result<Tensor> {
            Ok(x.get(kv)?.index_select(&ids, 0)?.unsqueeze(0)?) // (1, |idx|, d)
        };
        let qh = q.narrow(1, kv * group, group)?; // (L, group, d)
        outs.push(dense_ops(
            &qh,
            &gather(k)?,
            &gather(v)?,
            Some(&pos),
            queries,
        )?);
    }
    Ok(Tensor::cat(&outs, 1)?)
}

/// Every key of every head from candle ops: batched matmuls over the key/value heads, an
/// additive mask, softmax; queries that see no key give zeros.
fn dense_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_positions: Option<&[u32]>,
    queries: QueryPositions<'_>,
) -> Result<Tensor> {
    let (l, n_heads, d) = q.dims3()?;
    let (n_kv, t, _) = k.dims3()?;
    let group = n_heads / n_kv;
    // (L, n_kv, group, d) -> (n_kv, group, L, d) -> (n_kv, group * L, d)
    let q = q
        .reshape((l, n_kv, group, d))?
        .permute((1, 2, 0, 3))?
        .contiguous()?
        .reshape((n_kv, group * l, d))?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?; // (n_kv, group * L, T)
    let mask = causal_mask(l, t, queries, key_positions, q.device())?;
    let scores = match &mask {
        None => scores,
        Some(m) => scores
            .reshape((n_kv, group, l, t))?
            .broadcast_add(&m.additive)?
            .reshape((n_kv, group * l, t))?,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(&v.contiguous()?)?; // (n_kv, group * L, d)
    let out = match mask.and_then(|m| m.seen) {
        None => out,
        Some(seen) => out
            .reshape((n_kv, group, l, d))?
            .broadcast_mul(&seen.to_dtype(out.dtype())?)?,
    };
    Ok(out
        .reshape((n_kv, group, l, d))?
        .permute((2, 0, 1, 3))?
        .reshape((l, n_heads * d))?)
}

/// Masks of [`causal_mask`].
struct Mask {
    /// `(L, T)`: 0 for a visible key, `-inf` for a hidden one.
    additive: Tensor,
    /// `(L, 1)`: 1 for a query that sees some key, 0 for one that sees none (its mask row is
    /// left at 0 so that its softmax stays finite); `None` when every query sees a key.
    seen: Option<Tensor>,
}

/// Masks hiding keys after each query's position; `None` when no key is hidden (a single
/// decode token sees its whole cache).
fn causal_mask(
    l: usize,
    t: usize,
    queries: QueryPositions<'_>,
    key_positions: Option<&[u32]>,
    device: &Device,
) -> Result<Option<Mask>> {
    let key_pos = |j: usize| key_positions.map_or(j, |p| p[j] as usize);
    // Queries sit at ascending positions; if the first sees every key, all do.
    let max_key = (0..t).map(key_pos).max().unwrap_or(0);
    if t == 0 || max_key <= queries.of(0) {
        return Ok(None);
    }
    let mut mask = vec![0f32; l * t];
    let mut seen = vec![1f32; l];
    for (i, row) in mask.chunks_exact_mut(t).enumerate() {
        if (0..t).all(|j| key_pos(j) > queries.of(i)) {
            seen[i] = 0.0;
            continue;
        }
        for (j, m) in row.iter_mut().enumerate() {
            if key_pos(j) > queries.of(i) {
                *m = f32::NEG_INFINITY;
            }
        }
    }
    let seen = if seen.contains(&0.0) {
        Some(Tensor::from_vec(seen, (l, 1), device)?)
    } else {
        None
    };
    Ok(Some(Mask {
        additive: Tensor::from_vec(mask, (l, t), device)?,
        seen,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    /// Reference, in f64 with plain loops: query `i` of head `h` reads the keys of
    /// `head_keys` (all without one) of kv head `h / group` whose position (`key_positions[j]`
    /// or `j`) is at most query `i`'s position; no such key gives zeros.
    fn reference<'p>(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_positions: Option<&[u32]>,
        head_keys: Option<&HeadKeys>,
        queries: impl Into<QueryPositions<'p>>,
    ) -> Result<Tensor> {
        let queries = queries.into();
        let (l, h, d) = q.dims3()?;
        let (n_kv, t, _) = k.dims3()?;
        let (q, k, v) = (
            q.to_vec3::<f32>()?,
            k.to_vec3::<f32>()?,
            v.to_vec3::<f32>()?,
        );
        let key_pos = |j: usize| key_positions.map_or(j, |p| p[j] as usize);
        let mut out = vec![0f32; l * h * d];
        for (i, o) in out.chunks_exact_mut(h * d).enumerate() {
            for (head, o) in o.chunks_exact_mut(d).enumerate() {
                let kv = head / (h / n_kv);
                let keys: Vec<usize> = match head_keys {
                    None => (0..t).collect(),
                    Some(s) => s.ranges[kv]
                        .iter()
                        .flat_map(|r| r.clone())
                        .map(|j| j as usize)
                        .collect(),
                };
                let keys: Vec<usize> = keys
                    .into_iter()
                    .filter(|&j| key_pos(j) <= queries.of(i))
                    .collect();
                if keys.is_empty() {
                    continue;
                }
                let dot = |j: usize| -> f64 {
                    let s: f64 = (0..d)
                        .map(|c| q[i][head][c] as f64 * k[kv][j][c] as f64)
                        .sum();
                    s / (d as f64).sqrt()
                };
                let scores: Vec<f64> = keys.iter().map(|&j| dot(j)).collect();
                let m = scores.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
                let p: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let sum: f64 = p.iter().sum();
                for (c, o) in o.iter_mut().enumerate() {
                    let x: f64 = keys
                        .iter()
                        .zip(&p)
                        .map(|(&j, p)| p * v[kv][j][c] as f64)
                        .sum();
                    *o = (x / sum) as f32;
                }
            }
        }
        Ok(Tensor::from_vec(out, (l, h * d), &Device::Cpu)?)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
    }

    /// A pruned row: its queries sit at scattered positions (the tokens a pruning hook kept)
    /// and its keys are the kept tokens' after earlier ones; each query reads the keys at or
    /// before its own position, in the kernel and in the candle-op path.
    #[test]
    fn queries_at_scattered_positions_read_the_keys_up_to_their_own() -> Result<()> {
        let kept: Vec<u32> = vec![0, 1, 2, 5, 9, 10, 14, 15];
        let (past, l) = (3usize, kept.len() - 3); // queries: the kept tokens after the third
        let q = randn(&[l, 6, 8], 4);
        let k = randn(&[2, kept.len(), 8], 5);
        let v = randn(&[2, kept.len(), 8], 6);
        let at = QueryPositions::At(&kept[past..]);
        let want = reference(&q, &k, &v, Some(&kept), None, at)?;
        let ours = attend(&q, &k, &v, Some(&kept), None, at)?;
        assert!(max_diff(&ours, &want)? < 1e-5);
        let ops = attend_ops(&q, &k, &v, Some(&kept), None, at)?;
        assert!(max_diff(&ops, &want)? < 1e-5);
        // Query 5 at position 9 differs from a consecutive row's (position 8 there).
        let consecutive = attend(&q, &k, &v, Some(&kept), None, 5)?;
        assert!(max_diff(&consecutive, &ours)? > 1e-3);
        let short = attend(
            &q,
            &k,
            &v,
            Some(&kept),
            None,
            QueryPositions::At(&kept[..2]),
        );
        assert!(
            short.is_err(),
            "positions for fewer queries than the row has"
        );
        Ok(())
    }

    #[test]
    fn grouped_attention_matches_repeated_heads() -> Result<()> {
        for (l, start) in [(1usize, 6usize), (4, 0), (3, 4)] {
            let t = start + l;
            let q = randn(&[l, 6, 8], 1);
            let k = randn(&[2, t, 8], 2);
            let v = randn(&[2, t, 8], 3);
            let want = reference(&q, &k, &v, None, None, start)?;
            let ours = attend(&q, &k, &v, None, None, start)?;
            let diff = max_diff(&ours, &want)?;
            assert!(diff < 1e-5, "L={l} start={start} diff={diff}");
            let ops = attend_ops(&q, &k, &v, None, None, start.into())?;
            let diff = max_diff(&ops, &want)?;
            assert!(diff < 1e-5, "candle ops: L={l} start={start} diff={diff}");
        }
        Ok(())
    }

    /// `(n_kv, T, d)` views of a `(n_kv, T + 9, d)` buffer, as the KV cache hands them out.
    fn cache_view(n_kv: usize, t: usize, d: usize, seed: u64) -> Result<Tensor> {
        Ok(randn(&[n_kv, t + 9, d], seed).narrow(1, 0, t)?)
    }

    /// The CPU kernel against the reference on the default model's head shape (9 query heads
    /// on 3 key/value heads, d = 64): prefill chunks and decode rows, strided cache views,
    /// with and without a hook's key selection.
    #[test]
    fn kernel_matches_reference() -> Result<()> {
        let (n_heads, n_kv, d) = (9, 3, 64);
        for l in [1usize, 3, 17] {
            for t in [1usize, 5, 64, 700] {
                let k = cache_view(n_kv, t, d, 2 + t as u64)?;
                let v = cache_view(n_kv, t, d, 3 + t as u64)?;
                // Larger queries make the softmax peaky, exercising exp's range.
                let q = (randn(&[l, n_heads, d], 1 + l as u64) * 8.0)?;
                assert!(!k.is_contiguous());
                // Keys at 0..T: the row's queries are the last L positions (or, with fewer
                // keys than queries, start at 0); and a row that sees every key.
                for start in [t.saturating_sub(l), t + 2] {
                    let want = reference(&q, &k, &v, None, None, start)?;
                    let ours = attend(&q, &k, &v, None, None, start)?;
                    let diff = max_diff(&ours, &want)?;
                    assert!(diff < 1e-5, "L={l} T={t} start={start} diff={diff}");
                }
                // A hook kept every other position of a 2T cache, plus the row's own.
                let keep: Vec<u32> = (0..t as u32).map(|j| 2 * j).collect();
                let start = (2 * t).saturating_sub(l + 1);
                let want = reference(&q, &k, &v, Some(&keep), None, start)?;
                let ours = attend(&q, &k, &v, Some(&keep), None, start)?;
                let diff = max_diff(&ours, &want)?;
                assert!(diff < 1e-5, "L={l} T={t} kept diff={diff}");
                // The same positions out of order (the kernel then masks key by key).
                let shuffled: Vec<u32> = keep.iter().rev().copied().collect();
                let want = reference(&q, &k, &v, Some(&shuffled), None, start)?;
                let ours = attend(&q, &k, &v, Some(&shuffled), None, start)?;
                let diff = max_diff(&ours, &want)?;
                assert!(diff < 1e-5, "L={l} T={t} unsorted diff={diff}");
            }
        }
        Ok(())
    }

    /// Layouts the cache never produces still work: transposed queries, keys whose last
    /// dimension is strided, a head dimension with no specialised kernel.
    #[test]
    fn kernel_handles_any_layout() -> Result<()> {
        let (l, n_heads, n_kv, d, t) = (3, 4, 2, 24, 40);
        let q = randn(&[n_heads, l, d], 5).transpose(0, 1)?;
        let k = randn(&[n_kv, d, t], 6).transpose(1, 2)?;
        let v = cache_view(n_kv, t, d, 7)?;
        let start = t - l;
        let want = reference(&q, &k, &v, None, None, start)?;
        let diff = max_diff(&attend(&q, &k, &v, None, None, start)?, &want)?;
        assert!(diff < 1e-5, "diff={diff}");
        Ok(())
    }

    /// Per kv head selections over `t` keys that exercise the kernel's edges: 64-key blocks
    /// (every other one, the first and the clipped last, none), ranges of odd lengths at odd
    /// places (so a range starts at an odd place of the score row), everything.
    fn selections(n_kv: usize, t: usize) -> Result<Vec<HeadKeys>> {
        let t32 = t as u32;
        let n_blocks = t32.div_ceil(64);
        let per_head = |h: usize| -> Vec<u32> {
            match h % 3 {
                0 => (0..n_blocks).filter(|b| b % 2 == 1).collect(),
                1 => [0, n_blocks - 1]
                    .into_iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                _ => vec![],
            }
        };
        let blocks: Vec<Vec<u32>> = (0..n_kv).map(per_head).collect();
        let odd: Vec<Vec<std::ops::Range<u32>>> = (0..n_kv)
            .map(|h| {
                [1..4, 5..6, 9..16, 17..40, 41..t32]
                    .into_iter()
                    .map(|r| r.start + h as u32..r.end.min(t32))
                    .filter(|r| !r.is_empty())
                    .collect()
            })
            .collect();
        Ok(vec![
            HeadKeys::from_blocks(64, t32, &blocks)?,
            HeadKeys { ranges: odd },
            HeadKeys::all(n_kv, t32),
        ])
    }

    /// Key positions a row may come with: none (key j at j), every other position of a 2T
    /// cache (sorted), and the same positions reversed (any order); with the row's `start`.
    fn position_cases(t: usize, l: usize) -> Vec<(Option<Vec<u32>>, usize)> {
        let keep: Vec<u32> = (0..t as u32).map(|j| 2 * j).collect();
        let shuffled: Vec<u32> = keep.iter().rev().copied().collect();
        let start = (2 * t).saturating_sub(l + 1);
        vec![
            (None, t.saturating_sub(l)),
            (None, 0),
            (Some(keep.clone()), start),
            (Some(keep), t / 2),
            (Some(shuffled), start),
        ]
    }

    fn bits(x: &Tensor) -> Result<Vec<u32>> {
        Ok(x.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits())
            .collect())
    }

    /// Selecting every key changes no bit, for any key positions and head dimension.
    #[test]
    fn head_keys_all_equals_dense_bit_for_bit() -> Result<()> {
        for (n_heads, n_kv, d) in [(9, 3, 64), (6, 2, 23)] {
            for (l, t) in [(1usize, 1usize), (1, 200), (3, 64), (17, 130)] {
                let k = cache_view(n_kv, t, d, 2)?;
                let v = cache_view(n_kv, t, d, 3)?;
                let q = (randn(&[l, n_heads, d], 1) * 8.0)?;
                let all = HeadKeys::all(n_kv, t as u32);
                for (pos, start) in position_cases(t, l) {
                    let dense = attend(&q, &k, &v, pos.as_deref(), None, start)?;
                    let sel = attend(&q, &k, &v, pos.as_deref(), Some(&all), start)?;
                    assert_eq!(
                        bits(&sel)?,
                        bits(&dense)?,
                        "d={d} L={l} T={t} start={start}"
                    );
                }
            }
        }
        Ok(())
    }

    /// The kernel touches no key or value outside a selection: with every unselected one
    /// poisoned with NaN the output keeps every bit (a dense computation that masked them
    /// afterwards would turn NaN), decode rows and prefill chunks alike, f32 and f16 caches.
    #[test]
    fn unselected_keys_and_values_are_never_read() -> Result<()> {
        let (n_heads, n_kv, d, t) = (9, 3, 64, 300);
        for dtype in [DType::F32, DType::F16] {
            let k = cache_view(n_kv, t, d, 2)?.to_dtype(dtype)?;
            let v = cache_view(n_kv, t, d, 3)?.to_dtype(dtype)?;
            for (l, start) in [(1usize, t - 1), (5, t - 5)] {
                let q = (randn(&[l, n_heads, d], 1) * 8.0)?;
                for sel in selections(n_kv, t)? {
                    let poison = |x: &Tensor| -> Result<Tensor> {
                        let mut rows = x.to_dtype(DType::F32)?.to_vec3::<f32>()?;
                        for (h, head) in rows.iter_mut().enumerate() {
                            for (j, key) in head.iter_mut().enumerate() {
                                if !sel.ranges[h].iter().any(|r| r.contains(&(j as u32))) {
                                    key.fill(f32::NAN);
                                }
                            }
                        }
                        let flat: Vec<f32> = rows.into_iter().flatten().flatten().collect();
                        Ok(Tensor::from_vec(flat, (n_kv, t, d), &Device::Cpu)?.to_dtype(dtype)?)
                    };
                    let clean = attend(&q, &k, &v, None, Some(&sel), start)?;
                    let dirty = attend(&q, &poison(&k)?, &poison(&v)?, None, Some(&sel), start)?;
                    assert_eq!(bits(&dirty)?, bits(&clean)?, "{dtype:?} L={l}");
                }
            }
        }
        Ok(())
    }

    /// A selection gives the bits of the kernel without one run on the gathered keys, values
    /// and positions, one kv head at a time with its query heads.
    #[test]
    fn selection_equals_dense_on_gathered_keys() -> Result<()> {
        for (n_heads, n_kv, d) in [(9, 3, 64), (6, 2, 23)] {
            let group = n_heads / n_kv;
            for (l, t) in [(1usize, 200usize), (1, 1), (3, 64), (17, 130)] {
                let k = cache_view(n_kv, t, d, 2)?;
                let v = cache_view(n_kv, t, d, 3)?;
                let q = (randn(&[l, n_heads, d], 1) * 8.0)?;
                for sel in selections(n_kv, t)? {
                    for (pos, start) in position_cases(t, l) {
                        let ours = attend(&q, &k, &v, pos.as_deref(), Some(&sel), start)?;
                        let mut want = Vec::new();
                        for (kv, ranges) in sel.ranges.iter().enumerate() {
                            let idx: Vec<u32> = ranges.iter().flat_map(|r| r.clone()).collect();
                            let gathered: Vec<u32> = match &pos {
                                Some(p) => idx.iter().map(|&j| p[j as usize]).collect(),
                                None => idx.clone(),
                            };
                            let ids = Tensor::new(idx.as_slice(), &Device::Cpu)?;
                            let gather = |x: &Tensor| -> Result<Tensor> {
                                Ok(x.get(kv)?.index_select(&ids, 0)?.unsqueeze(0)?)
                            };
                            let qh = q.narrow(1, kv * group, group)?;
                            want.push(attend(
                                &qh,
                                &gather(&k)?,
                                &gather(&v)?,
                                Some(&gathered),
                                None,
                                start,
                            )?);
                        }
                        let want = Tensor::cat(&want, 1)?;
                        assert_eq!(
                            bits(&ours)?,
                            bits(&want)?,
                            "d={d} L={l} T={t} start={start} {sel:?}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The kernel and the candle-op path against the f64 reference with per-head selections:
    /// prefill chunks and decode rows, with and without key positions, queries that see no
    /// selected key (zeros), the default model's heads and an odd head dimension.
    #[test]
    fn selection_matches_reference() -> Result<()> {
        for (n_heads, n_kv, d) in [(9, 3, 64), (6, 2, 23)] {
            for (l, t) in [(1usize, 700usize), (1, 5), (4, 64), (17, 130)] {
                let k = cache_view(n_kv, t, d, 4)?;
                let v = cache_view(n_kv, t, d, 5)?;
                let q = (randn(&[l, n_heads, d], 6) * 8.0)?;
                for sel in selections(n_kv, t)? {
                    for (pos, start) in position_cases(t, l) {
                        let want = reference(&q, &k, &v, pos.as_deref(), Some(&sel), start)?;
                        let ours = attend(&q, &k, &v, pos.as_deref(), Some(&sel), start)?;
                        let ops = attend_ops(&q, &k, &v, pos.as_deref(), Some(&sel), start.into())?;
                        for (what, got) in [("kernel", ours), ("candle ops", ops)] {
                            let diff = max_diff(&got, &want)?;
                            assert!(
                                diff < 1e-5,
                                "{what}: d={d} L={l} T={t} start={start} diff={diff} {sel:?}"
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Queries placed before every selected key read nothing and give exactly zero, on both
    /// paths, while later queries of the same chunk read their keys.
    #[test]
    fn query_seeing_no_selected_key_gives_zeros() -> Result<()> {
        let (l, n_heads, n_kv, d, t) = (8, 9, 3, 64, 8);
        let k = cache_view(n_kv, t, d, 2)?;
        let v = cache_view(n_kv, t, d, 3)?;
        let q = randn(&[l, n_heads, d], 1);
        // kv head 0 reads keys 5..8: queries 0..5 (positions 0..5) see none of them.
        let sel = HeadKeys {
            ranges: vec![vec![5..8], vec![0..8], vec![]],
        };
        let want = reference(&q, &k, &v, None, Some(&sel), 0)?;
        for got in [
            attend(&q, &k, &v, None, Some(&sel), 0)?,
            attend_ops(&q, &k, &v, None, Some(&sel), 0.into())?,
        ] {
            let rows = got.to_vec2::<f32>()?;
            for (i, row) in rows.iter().enumerate() {
                assert_eq!(row[..3 * d].iter().all(|&x| x == 0.0), i < 5, "query {i}");
                assert!(
                    row[6 * d..].iter().all(|&x| x == 0.0),
                    "kv head 2 reads nothing"
                );
            }
            assert!(max_diff(&got, &want)? < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn from_blocks_clips_the_last_block_and_merges_neighbours() -> Result<()> {
        let sel = HeadKeys::from_blocks(64, 200, &[vec![0, 1, 3], vec![2], vec![]])?;
        assert_eq!(
            sel.ranges,
            vec![vec![0..128, 192..200], vec![128..192], vec![]]
        );
        assert_eq!(HeadKeys::all(2, 5).ranges, vec![vec![0..5], vec![0..5]]);
        assert_eq!(
            HeadKeys::all(1, 0).ranges,
            vec![Vec::<std::ops::Range<u32>>::new()]
        );
        Ok(())
    }

    /// Selections that do not fit the layer are errors from the constructor or from
    /// [`attend`], never a panic or a read past the cache, on every path.
    #[test]
    fn bad_selections_are_errors() -> Result<()> {
        assert!(
            HeadKeys::from_blocks(64, 200, &[vec![4]]).is_err(),
            "block past T"
        );
        assert!(
            HeadKeys::from_blocks(64, 200, &[vec![2, 1]]).is_err(),
            "unsorted"
        );
        assert!(
            HeadKeys::from_blocks(64, 200, &[vec![1, 1]]).is_err(),
            "repeated"
        );
        assert!(
            HeadKeys::from_blocks(0, 200, &[vec![0]]).is_err(),
            "block size 0"
        );
        assert!(HeadKeys::from_blocks(64, u32::MAX, &[vec![u32::MAX / 64]]).is_ok());
        let (l, n_heads, n_kv, d, t) = (2, 6, 2, 16, 10);
        let k = cache_view(n_kv, t, d, 2)?;
        let v = cache_view(n_kv, t, d, 3)?;
        let q = randn(&[l, n_heads, d], 1);
        let ok: Vec<std::ops::Range<u32>> = std::iter::once(0..3).collect();
        let bad: [Vec<Vec<std::ops::Range<u32>>>; 6] = [
            vec![ok.clone(), vec![8..11]],      // past T
            vec![ok.clone(), vec![5..7, 1..3]], // unsorted
            vec![ok.clone(), vec![1..5, 4..7]], // overlapping
            vec![ok.clone(), vec![4..4]],       // empty range
            vec![ok.clone()],                   // too few heads
            vec![ok.clone(), ok.clone(), ok],   // too many
        ];
        for ranges in bad {
            let sel = HeadKeys { ranges };
            let err = attend(&q, &k, &v, None, Some(&sel), t - l);
            assert!(
                matches!(err, Err(ModelError::Hook { .. })),
                "{sel:?}: {err:?}"
            );
            // The kernel checks on its own too.
            let op = RowAttention {
                key_positions: None,
                head_keys: Some(&sel.ranges),
                queries: QueryPositions::From(t - l),
                path: SimdPath::detect(),
            };
            assert!(q.apply_op3_no_bwd(&k, &v, &op).is_err(), "{sel:?}");
        }
        assert!(
            attend(&q, &k, &v, Some(&[0, 1]), None, t - l).is_err(),
            "short positions"
        );
        Ok(())
    }

    /// Timing of the kernel against the candle-op path on the default model's shapes, for
    /// decode rows at several depths and prefill chunks:
    /// `cargo test --release -p models --lib attention_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn attention_timing() -> Result<()> {
        let (n_heads, n_kv, d) = (9, 3, 64);
        let best_of = |f: &dyn Fn() -> Result<Tensor>, reps: usize| -> Result<f64> {
            let mut best = f64::MAX;
            for _ in 0..reps {
                let t0 = std::time::Instant::now();
                for _ in 0..10 {
                    f()?;
                }
                best = best.min(t0.elapsed().as_secs_f64() / 10.0);
            }
            Ok(best * 1e6)
        };
        for (l, t) in [
            (1, 32),
            (1, 128),
            (1, 512),
            (1, 2048),
            (4, 516),
            (16, 528),
            (64, 576),
            (128, 640),
            (512, 512),
        ] {
            let k = cache_view(n_kv, t, d, 2)?;
            let v = cache_view(n_kv, t, d, 3)?;
            let q = randn(&[l, n_heads, d], 1);
            let start = t - l;
            let reps = if l * t > 10_000 { 5 } else { 50 };
            let ops = best_of(&|| attend_ops(&q, &k, &v, None, None, start.into()), reps)?;
            let ours = best_of(&|| attend(&q, &k, &v, None, None, start), reps)?;
            println!(
                "L={l:4} T={t:5}: candle ops {ops:9.1} us, kernel {ours:9.1} us, x{:.2}",
                ops / ours
            );
        }
        // Decode as the model runs it: 30 layers, each with its own cache, and ~3 MB of
        // weights streamed between them, so keys and values come from L3 or memory.
        let weights: Vec<f32> = vec![1.0; 3 << 18];
        let stream = || weights.iter().sum::<f32>();
        for t in [128usize, 512, 2048] {
            let caches: Vec<(Tensor, Tensor)> = (0..30)
                .map(|s| {
                    Ok((
                        cache_view(n_kv, t, d, 2 * s)?,
                        cache_view(n_kv, t, d, 2 * s + 1)?,
                    ))
                })
                .collect::<Result<_>>()?;
            let q = randn(&[1, n_heads, d], 1);
            let per_token = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| -> Result<f64> {
                let mut best = f64::MAX;
                for _ in 0..20 {
                    let t0 = std::time::Instant::now();
                    let mut x = 0f32;
                    for (k, v) in &caches {
                        x += stream();
                        f(k, v)?;
                    }
                    assert!(x > 0.0);
                    best = best.min(t0.elapsed().as_secs_f64());
                }
                Ok(best * 1e6)
            };
            let base = per_token(&|_, _| Ok(q.clone()))?;
            let ops = per_token(&|k, v| attend_ops(&q, k, v, None, None, (t - 1).into()))? - base;
            let ours = per_token(&|k, v| attend(&q, k, v, None, None, t - 1))? - base;
            println!(
                "30 layers, cold, T={t:5}: candle ops {ops:7.0} us, kernel {ours:7.0} us per token"
            );
        }
        Ok(())
    }

    /// Block-sparse decode against dense on the default model's shapes: one decode row at
    /// depth T = 2048 and 8192, every key, or 1/8 or 1/4 of the 64-key blocks of each kv
    /// head (spread over the row, a different offset per head). "hot": one layer called
    /// again and again; "cold": 30 layers, each with its own cache and weights streamed
    /// between them, as the model runs them. Medians of 15 runs (`CANDLE_NUM_THREADS=1` for
    /// figures that a loaded host does not swamp with thread wake-ups):
    /// `cargo test --release -p models --lib block_sparse_decode_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn block_sparse_decode_timing() -> Result<()> {
        let (n_heads, n_kv, d) = (9, 3, 64);
        let median_us = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            let mut runs = Vec::new();
            for _ in 0..15 {
                let t0 = std::time::Instant::now();
                f()?;
                runs.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            runs.sort_by(f64::total_cmp);
            Ok(runs[runs.len() / 2])
        };
        let q = randn(&[1, n_heads, d], 1);
        // ~3 MB of weights streamed between layers, as in `attention_timing`, so that each
        // layer's keys come from L3 or memory; its own time is subtracted.
        let weights: Vec<f32> = vec![1.0; 3 << 18];
        let stream = || weights.iter().sum::<f32>();
        let base = median_us(&|| {
            for _ in 0..30 {
                assert!(stream() > 0.0);
            }
            Ok(())
        })?;
        for t in [2048usize, 8192] {
            let caches: Vec<(Tensor, Tensor)> = (0..30)
                .map(|s| {
                    Ok((
                        cache_view(n_kv, t, d, 2 * s)?,
                        cache_view(n_kv, t, d, 2 * s + 1)?,
                    ))
                })
                .collect::<Result<_>>()?;
            let n_blocks = (t / 64) as u32;
            let every = |n: u32| -> Result<HeadKeys> {
                let blocks: Vec<Vec<u32>> = (0..n_kv as u32)
                    .map(|h| (0..n_blocks).filter(|b| b % n == h % n).collect())
                    .collect();
                HeadKeys::from_blocks(64, t as u32, &blocks)
            };
            let cases = [
                ("dense", None),
                ("1/4", Some(every(4)?)),
                ("1/8", Some(every(8)?)),
            ];
            let mut line = format!("decode T={t:5}:");
            for (name, sel) in &cases {
                let (k, v) = &caches[0];
                let hot = median_us(&|| {
                    for _ in 0..10 {
                        attend(&q, k, v, None, sel.as_ref(), t - 1)?;
                    }
                    Ok(())
                })? / 10.0;
                let cold = median_us(&|| {
                    for (k, v) in &caches {
                        assert!(stream() > 0.0);
                        attend(&q, k, v, None, sel.as_ref(), t - 1)?;
                    }
                    Ok(())
                })? - base;
                line += &format!("  {name}: hot {hot:6.1} us/layer, cold {cold:7.0} us/30 layers;");
            }
            println!("{line}");
        }
        Ok(())
    }

    #[test]
    fn intersection_keeps_what_both_selections_read() {
        let a = HeadKeys {
            ranges: vec![vec![0..10, 20..30], vec![0..4]],
        };
        let b = HeadKeys {
            ranges: vec![vec![5..25], vec![4..8]],
        };
        assert_eq!(a.intersect(&b).ranges, vec![vec![5..10, 20..25], vec![]]);
    }
}

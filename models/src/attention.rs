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

#[cfg(test)]
use candle_core::D;
use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::kernels::attention::RowAttention;
use crate::kernels::SimdPath;

/// Attention for one row.
/// `q`: `(L, n_heads, d)` after RoPE; `k`, `v`: `(n_kv, T, d)`; `key_positions`: the
/// position of each of the `T` keys when a hook selected a subset (`None`: keys are
/// positions `0..T`); `start`: position of the row's first query.
/// Returns `(L, n_heads * d)`.
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_positions: Option<&[u32]>,
    head_keys: Option<&HeadKeys>,
    start: usize,
) -> Result<Tensor> {
    if let Some(sel) = head_keys {
        return attend_gathered(q, k, v, key_positions, sel, start);
    }
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if f32_cpu(q) && f32_cpu(k) && f32_cpu(v) {
        let op = RowAttention {
            key_positions,
            start,
            path: SimdPath::detect(),
        };
        return Ok(q.apply_op3_no_bwd(k, v, &op)?);
    }
    attend_ops(q, k, v, key_positions, start)
}

/// Which of a row's keys each key/value head reads (TEMPORARY until the kernel reads them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadKeys {
    pub ranges: Vec<Vec<std::ops::Range<u32>>>,
}

fn attend_gathered(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_positions: Option<&[u32]>,
    sel: &HeadKeys,
    start: usize,
) -> Result<Tensor> {
    let (l, n_heads, d) = q.dims3()?;
    let n_kv = k.dim(0)?;
    let group = n_heads / n_kv;
    let mut outs = Vec::new();
    for (h, ranges) in sel.ranges.iter().enumerate() {
        let idx: Vec<u32> = ranges.iter().flat_map(|r| r.clone()).collect();
        let qh = q.narrow(1, h * group, group)?;
        if idx.is_empty() {
            outs.push(Tensor::zeros((l, group * d), q.dtype(), q.device())?);
            continue;
        }
        let pos: Vec<u32> = idx
            .iter()
            .map(|&j| key_positions.map_or(j, |p| p[j as usize]))
            .collect();
        let t = Tensor::new(idx.as_slice(), k.device())?;
        let kh = k.narrow(0, h, 1)?.index_select(&t, 1)?;
        let vh = v.narrow(0, h, 1)?.index_select(&t, 1)?;
        outs.push(attend(&qh, &kh, &vh, Some(&pos), None, start)?);
    }
    let out = Tensor::stack(&outs, 1)?; // (l, n_kv, group*d)
    Ok(out.reshape((l, n_heads * d))?)
}

/// [`attend`] from candle ops: batched matmuls over the key/value heads, an additive mask,
/// softmax. Runs on any device and dtype.
fn attend_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_positions: Option<&[u32]>,
    start: usize,
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
    let scores = match causal_mask(l, t, start, key_positions, q.device())? {
        None => scores,
        Some(mask) => scores
            .reshape((n_kv, group, l, t))?
            .broadcast_add(&mask)?
            .reshape((n_kv, group * l, t))?,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(&v.contiguous()?)?; // (n_kv, group * L, d)
    Ok(out
        .reshape((n_kv, group, l, d))?
        .permute((2, 0, 1, 3))?
        .reshape((l, n_heads * d))?)
}

/// `(L, T)` additive mask hiding keys after each query's position; `None` when no key is
/// hidden (a single decode token sees its whole cache).
fn causal_mask(
    l: usize,
    t: usize,
    start: usize,
    key_positions: Option<&[u32]>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let key_pos = |j: usize| key_positions.map_or(j, |p| p[j] as usize);
    // Query i sits at position start + i; if the first query sees every key, all do.
    let max_key = (0..t).map(key_pos).max().unwrap_or(0);
    if t == 0 || max_key <= start {
        return Ok(None);
    }
    let mut mask = vec![0f32; l * t];
    for i in 0..l {
        for j in 0..t {
            if key_pos(j) > start + i {
                mask[i * t + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Some(Tensor::from_vec(mask, (l, t), device)?))
}

/// Sum over the last dim, used only by tests to check probabilities.
#[cfg(test)]
fn row_sums(x: &Tensor) -> Result<Vec<f32>> {
    Ok(x.sum(D::Minus1)?.flatten_all()?.to_vec1()?)
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

    /// Reference: repeat kv heads, full attention with an explicit loop over heads; key `j`
    /// sits at `key_positions[j]` (or `j`) and is hidden from queries before it.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_positions: Option<&[u32]>,
        start: usize,
    ) -> Result<Tensor> {
        let (l, h, d) = q.dims3()?;
        let (n_kv, t, _) = k.dims3()?;
        let key_pos = |j: usize| key_positions.map_or(j, |p| p[j] as usize);
        let mut outs = Vec::new();
        for head in 0..h {
            let kv = head / (h / n_kv);
            let qh = q.narrow(1, head, 1)?.squeeze(1)?; // (L, d)
            let kh = k.narrow(0, kv, 1)?.squeeze(0)?; // (T, d)
            let vh = v.narrow(0, kv, 1)?.squeeze(0)?;
            let s = (qh.matmul(&kh.t()?)? / (d as f64).sqrt())?;
            let mut m = vec![0f32; l * t];
            for i in 0..l {
                for j in 0..t {
                    if key_pos(j) > start + i {
                        m[i * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
            let s = (s + Tensor::from_vec(m, (l, t), &Device::Cpu)?)?;
            let p = candle_nn::ops::softmax_last_dim(&s)?;
            assert!(row_sums(&p)?.iter().all(|x| (x - 1.0).abs() < 1e-5));
            outs.push(p.matmul(&vh.contiguous()?)?); // (L, d)
        }
        Ok(Tensor::stack(&outs, 1)?.reshape((l, h * d))?)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
    }

    #[test]
    fn grouped_attention_matches_repeated_heads() -> Result<()> {
        for (l, start) in [(1usize, 6usize), (4, 0), (3, 4)] {
            let t = start + l;
            let q = randn(&[l, 6, 8], 1);
            let k = randn(&[2, t, 8], 2);
            let v = randn(&[2, t, 8], 3);
            let want = reference(&q, &k, &v, None, start)?;
            let ours = attend(&q, &k, &v, None, None, start)?;
            let diff = max_diff(&ours, &want)?;
            assert!(diff < 1e-5, "L={l} start={start} diff={diff}");
            let ops = attend_ops(&q, &k, &v, None, start)?;
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
                    let want = reference(&q, &k, &v, None, start)?;
                    let ours = attend(&q, &k, &v, None, None, start)?;
                    let diff = max_diff(&ours, &want)?;
                    assert!(diff < 1e-5, "L={l} T={t} start={start} diff={diff}");
                }
                // A hook kept every other position of a 2T cache, plus the row's own.
                let keep: Vec<u32> = (0..t as u32).map(|j| 2 * j).collect();
                let start = (2 * t).saturating_sub(l + 1);
                let want = reference(&q, &k, &v, Some(&keep), start)?;
                let ours = attend(&q, &k, &v, Some(&keep), None, start)?;
                let diff = max_diff(&ours, &want)?;
                assert!(diff < 1e-5, "L={l} T={t} kept diff={diff}");
                // The same positions out of order (the kernel then masks key by key).
                let shuffled: Vec<u32> = keep.iter().rev().copied().collect();
                let want = reference(&q, &k, &v, Some(&shuffled), start)?;
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
        let want = reference(&q, &k, &v, None, start)?;
        let diff = max_diff(&attend(&q, &k, &v, None, None, start)?, &want)?;
        assert!(diff < 1e-5, "diff={diff}");
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
            let ops = best_of(&|| attend_ops(&q, &k, &v, None, start), reps)?;
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
            let ops = per_token(&|k, v| attend_ops(&q, k, v, None, t - 1))? - base;
            let ours = per_token(&|k, v| attend(&q, k, v, None, None, t - 1))? - base;
            println!(
                "30 layers, cold, T={t:5}: candle ops {ops:7.0} us, kernel {ours:7.0} us per token"
            );
        }
        Ok(())
    }
}

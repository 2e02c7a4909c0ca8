//! Scaled dot-product attention of one batch row against its own KV cache, with grouped
//! query heads (Ainslie et al., "GQA", arXiv 2305.13245).
//!
//! Query heads are regrouped per key/value head instead of repeating the keys `group` times
//! (`repeat_kv` in transformers): `(n_kv, group * L, d) x (n_kv, d, T)` computes the same
//! scores without copying the cache.

#[cfg(test)]
use candle_core::D;
use candle_core::{Device, Tensor};

use crate::error::Result;

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

/// Keys and values of the selected cache positions, `(n_kv, |keep|, d)` each.
pub(crate) fn select_keys(k: &Tensor, v: &Tensor, keep: &[u32]) -> Result<(Tensor, Tensor)> {
    let idx = Tensor::new(keep, k.device())?;
    Ok((k.index_select(&idx, 1)?, v.index_select(&idx, 1)?))
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

    /// Reference: repeat kv heads, full attention with an explicit loop over heads.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, start: usize) -> Result<Tensor> {
        let (l, h, d) = q.dims3()?;
        let (n_kv, t, _) = k.dims3()?;
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
                    if j > start + i {
                        m[i * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
            let s = (s + Tensor::from_vec(m, (l, t), &Device::Cpu)?)?;
            let p = candle_nn::ops::softmax_last_dim(&s)?;
            assert!(row_sums(&p)?.iter().all(|x| (x - 1.0).abs() < 1e-5));
            outs.push(p.matmul(&vh)?); // (L, d)
        }
        Ok(Tensor::stack(&outs, 1)?.reshape((l, h * d))?)
    }

    #[test]
    fn grouped_attention_matches_repeated_heads() -> Result<()> {
        for (l, start) in [(1usize, 6usize), (4, 0), (3, 4)] {
            let t = start + l;
            let q = randn(&[l, 6, 8], 1);
            let k = randn(&[2, t, 8], 2);
            let v = randn(&[2, t, 8], 3);
            let ours = attend(&q, &k, &v, None, start)?;
            let want = reference(&q, &k, &v, start)?;
            let diff = (ours - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "L={l} start={start} diff={diff}");
        }
        Ok(())
    }
}

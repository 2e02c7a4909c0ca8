//! The attention gate of one layer (SeerAttention-R's `AttnGate`, decode form), in plain f32
//! for the decode path: per key/value head it scores the blocks of the cache from the
//! current token's pre-RoPE queries and each block's pooled pre-RoPE keys.
//!
//! With `h` key/value heads, `g` query heads per key/value head, head size `d` and gate width
//! `d_g`:
//! - query branch: the group's `g` query heads concatenated, `(g·d)`, times `W_q[h]`
//!   `(d_g, g·d)`, RMSNorm, RoPE at the token's position;
//! - key branch: a block's keys pooled per channel by max, min and mean, `(3d)`, times
//!   `W_k[h]` `(d_g, 3d)`, RMSNorm, RoPE at the block's first position (the paper's training
//!   positions; the authors' decode code rotates a block closed at position `p` by `p`
//!   instead, a mismatch we do not copy);
//! - score of block `j`: `q_gate · k_gate_j / sqrt(d_g)`; a softmax over blocks gives the
//!   distribution a threshold compares against.
//!
//! The trainer's tensor version of the same arithmetic ([`super::train`]) is tested against
//! this one.

/// The shape every layer's gate shares.
#[derive(Debug, Clone, PartialEq)]
pub struct GateShape {
    pub kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    pub gate_dim: usize,
    pub eps: f64,
    /// RoPE's inverse frequencies over `gate_dim`: `theta^(-2i/d_g)`.
    pub inv_freq: Vec<f32>,
}

impl GateShape {
    pub fn new(kv_heads: usize, group: usize, head_dim: usize, gate_dim: usize) -> Self {
        Self::with_theta(kv_heads, group, head_dim, gate_dim, 10_000.0, 1e-6)
    }

    pub fn with_theta(
        kv_heads: usize,
        group: usize,
        head_dim: usize,
        gate_dim: usize,
        theta: f32,
        eps: f64,
    ) -> Self {
        let inv_freq = (0..gate_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / gate_dim as f32))
            .collect();
        Self {
            kv_heads,
            group,
            head_dim,
            gate_dim,
            eps,
            inv_freq,
        }
    }

    /// Inputs of the query branch per key/value head.
    pub fn query_inputs(&self) -> usize {
        self.group * self.head_dim
    }

    /// Inputs of the key branch per key/value head.
    pub fn key_inputs(&self) -> usize {
        3 * self.head_dim
    }
}

/// One layer's gate weights, row-major as in `gates.safetensors`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerGate {
    /// `(h, d_g, g·d)`.
    pub q_proj: Vec<f32>,
    /// `(h, d_g, 3d)`.
    pub k_proj: Vec<f32>,
    /// `(d_g,)`.
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
}

impl LayerGate {
    pub fn parameters(&self) -> usize {
        self.q_proj.len() + self.k_proj.len() + self.q_norm.len() + self.k_norm.len()
    }

    /// The gate's query per key/value head, `(h, d_g)`, for one token at `position`;
    /// `q`: its pre-RoPE queries `(n_heads, d)`.
    pub fn query(&self, shape: &GateShape, q: &[f32], position: usize) -> Vec<f32> {
        let inputs = shape.query_inputs();
        let mut out = Vec::with_capacity(shape.kv_heads * shape.gate_dim);
        for h in 0..shape.kv_heads {
            // Query heads h*g..(h+1)*g read key/value head h: their concatenation is one slice.
            let x = &q[h * inputs..(h + 1) * inputs];
            let w = &self.q_proj[h * shape.gate_dim * inputs..(h + 1) * shape.gate_dim * inputs];
            out.extend(project(shape, w, x, &self.q_norm, position));
        }
        out
    }

    /// A closed block's compressed key per key/value head, `(h, d_g)`, from its pooled keys
    /// `(h, 3d)` ([`pool`]); `start`: the block's first position.
    pub fn key(&self, shape: &GateShape, pooled: &[f32], start: usize) -> Vec<f32> {
        let inputs = shape.key_inputs();
        let mut out = Vec::with_capacity(shape.kv_heads * shape.gate_dim);
        for h in 0..shape.kv_heads {
            let x = &pooled[h * inputs..(h + 1) * inputs];
            let w = &self.k_proj[h * shape.gate_dim * inputs..(h + 1) * shape.gate_dim * inputs];
            out.extend(project(shape, w, x, &self.k_norm, start));
        }
        out
    }
}

/// `rope(rms_norm(W x) * norm, position)` for one head: `w` is `(d_g, inputs)`.
fn project(shape: &GateShape, w: &[f32], x: &[f32], norm: &[f32], position: usize) -> Vec<f32> {
    let mut y: Vec<f32> = w.chunks_exact(x.len()).map(|row| dot(row, x)).collect();
    let mean_square = y.iter().map(|v| v * v).sum::<f32>() / y.len() as f32;
    let scale = 1.0 / (mean_square + shape.eps as f32).sqrt();
    for (v, n) in y.iter_mut().zip(norm) {
        *v *= scale * n;
    }
    rope(&mut y, &shape.inv_freq, position);
    y
}

/// Rotary embedding in the half-split (`rotate_half`) layout, at `position`.
pub fn rope(x: &mut [f32], inv_freq: &[f32], position: usize) {
    let half = inv_freq.len();
    for (i, &f) in inv_freq.iter().enumerate() {
        // f64 for the angle, as the model's own tables (large positions).
        let angle = (position as f64 * f as f64) as f32;
        let (sin, cos) = angle.sin_cos();
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos - b * sin;
        x[i + half] = b * cos + a * sin;
    }
}

/// `a · b` in 16 independent lanes, so the compiler vectorises it: a decode step projects
/// every gated layer's queries (`h · d_g · g · d` multiply-adds, 37k on the default model),
/// which one serial sum would make cost as much as the attention it saves.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (xs, ys) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in xs.zip(ys) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Pools `n` tokens' keys `(n, h, d)` per head and channel into `(h, 3d)`: `[max, min, mean]`.
pub fn pool(keys: &[f32], heads: usize, head_dim: usize) -> Vec<f32> {
    let width = heads * head_dim;
    let n = keys.len() / width;
    let mut out = vec![0.0; heads * 3 * head_dim];
    for h in 0..heads {
        let o = &mut out[h * 3 * head_dim..(h + 1) * 3 * head_dim];
        let (max, rest) = o.split_at_mut(head_dim);
        let (min, mean) = rest.split_at_mut(head_dim);
        max.fill(f32::NEG_INFINITY);
        min.fill(f32::INFINITY);
        for t in 0..n {
            let k = &keys[t * width + h * head_dim..t * width + (h + 1) * head_dim];
            for c in 0..head_dim {
                max[c] = max[c].max(k[c]);
                min[c] = min[c].min(k[c]);
                mean[c] += k[c];
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f32);
    }
    out
}

/// Block scores of one key/value head: `q_gate · k_j / sqrt(d_g)` for every compressed block
/// `k_j` of `keys` `(blocks, h, d_g)`.
pub fn scores(shape: &GateShape, q_gate: &[f32], keys: &[f32], head: usize) -> Vec<f32> {
    let d = shape.gate_dim;
    let q = &q_gate[head * d..(head + 1) * d];
    let scale = 1.0 / (d as f32).sqrt();
    keys.chunks_exact(shape.kv_heads * d)
        .map(|block| dot(q, &block[head * d..(head + 1) * d]) * scale)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_takes_max_min_and_mean_per_head_and_channel() {
        // Two tokens, two heads, two channels.
        let keys = [1.0, -2.0, 5.0, 0.0, 3.0, 4.0, -1.0, 2.0];
        let p = pool(&keys, 2, 2);
        assert_eq!(
            p,
            vec![3.0, 4.0, 1.0, -2.0, 2.0, 1.0, 5.0, 2.0, -1.0, 0.0, 2.0, 1.0]
        );
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_dot_products_relative() {
        let inv = GateShape::new(1, 1, 2, 4).inv_freq;
        let (mut a, mut b) = (vec![0.3, -1.2, 0.7, 2.0], vec![1.1, 0.4, -0.5, 0.9]);
        let before = {
            let (mut a5, mut b2) = (a.clone(), b.clone());
            rope(&mut a5, &inv, 5);
            rope(&mut b2, &inv, 2);
            dot(&a5, &b2)
        };
        rope(&mut a, &inv, 13);
        rope(&mut b, &inv, 10);
        assert!(
            (dot(&a, &b) - before).abs() < 1e-5,
            "only the distance counts"
        );
        let norm = |x: &[f32]| dot(x, x);
        let mut c = vec![0.3, -1.2, 0.7, 2.0];
        rope(&mut c, &inv, 0);
        assert_eq!(c, vec![0.3, -1.2, 0.7, 2.0]);
        rope(&mut c, &inv, 77);
        assert!((norm(&c) - norm(&[0.3, -1.2, 0.7, 2.0])).abs() < 1e-5);
    }
}

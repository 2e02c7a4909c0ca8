//! SpecEE's per-layer predictor and the features it reads.
//!
//! At layer `l`, with `x = final_norm(h_l)` and `E_D` the LM-head rows of the k candidate
//! tokens: `z = E_D x` (the candidates' logits at this layer), `p = softmax(z)` over the
//! candidates only, `Δp = p - p_prev` with `p_prev` the candidates' `p` at layer `l - 1`.
//! The predictor is `sigmoid(w2 · relu(W1 [z, p, Δp] + b1) + b2)`: the probability that this
//! layer's top token is already the model's final one. (The authors' inference code takes
//! `p_prev` from the previously *scheduled* layer while training used consecutive layers;
//! here both use layer `l - 1`, whose features cost four dot products.)

/// One layer's MLP, on the host: 3k inputs, a few dozen hidden units, microseconds a call.
#[derive(Debug, Clone)]
pub struct Predictor {
    pub inputs: usize,
    /// `(hidden, inputs)` row-major.
    pub fc1_weight: Vec<f32>,
    pub fc1_bias: Vec<f32>,
    /// `(hidden,)`.
    pub fc2_weight: Vec<f32>,
    pub fc2_bias: f32,
}

impl Predictor {
    /// The predicted probability for one feature vector of length `inputs`.
    pub fn probability(&self, features: &[f32]) -> f32 {
        let hidden = self.fc1_bias.len();
        let mut logit = self.fc2_bias;
        for j in 0..hidden {
            let w = &self.fc1_weight[j * self.inputs..(j + 1) * self.inputs];
            let a = self.fc1_bias[j] + dot(w, features);
            logit += self.fc2_weight[j] * a.max(0.0);
        }
        1.0 / (1.0 + (-logit).exp())
    }

    /// Parameters held, for resident-memory accounting.
    pub fn parameters(&self) -> usize {
        self.fc1_weight.len() + self.fc1_bias.len() + self.fc2_weight.len() + 1
    }
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `x * rsqrt(mean(x²) + eps) * weight`: the model's final RMSNorm on one hidden state.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f64) -> Vec<f32> {
    let mean = x.iter().map(|v| (v * v) as f64).sum::<f64>() / x.len().max(1) as f64;
    let scale = (1.0 / (mean + eps).sqrt()) as f32;
    x.iter().zip(weight).map(|(v, w)| v * scale * w).collect()
}

/// The candidates' logits `z = E_D x` for a normed hidden state `x`; `rows` is `E_D`,
/// `(k, hidden)` row-major.
pub fn candidate_logits(rows: &[f32], x: &[f32]) -> Vec<f32> {
    rows.chunks_exact(x.len()).map(|r| dot(r, x)).collect()
}

/// `([z, p, Δp], p)` for the candidates' logits `z` at this layer and their `p` at the layer
/// before (`None`: Δp = 0).
pub fn features(z: &[f32], p_prev: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = z.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    let p: Vec<f32> = e.iter().map(|v| v / sum).collect();
    let mut f = Vec::with_capacity(3 * z.len());
    f.extend_from_slice(z);
    f.extend_from_slice(&p);
    match p_prev {
        Some(prev) => f.extend(p.iter().zip(prev).map(|(a, b)| a - b)),
        None => f.extend(std::iter::repeat_n(0.0, z.len())),
    }
    (f, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_logits_their_softmax_and_its_change() {
        let (f, p) = features(&[1.0, 1.0, 2.0_f32.ln() + 1.0, 1.0], None);
        assert_eq!(&f[..4], &[1.0, 1.0, 2.0_f32.ln() + 1.0, 1.0]);
        let want = [0.2, 0.2, 0.4, 0.2];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{p:?}");
        }
        assert_eq!(&f[8..], &[0.0; 4]);
        let (f2, _) = features(&[0.0; 4], Some(&p));
        for (d, b) in f2[8..].iter().zip(want) {
            assert!((d - (0.25 - b)).abs() < 1e-6, "{f2:?}");
        }
    }

    #[test]
    fn the_mlp_matches_the_formula_written_out() {
        // Two hidden units over two inputs: relu(1·1 + 2·(-1) + 0.5) = 0, relu(3 + 0 - 1) = 2.
        let p = Predictor {
            inputs: 2,
            fc1_weight: vec![1.0, 2.0, 3.0, 0.0],
            fc1_bias: vec![0.5, -1.0],
            fc2_weight: vec![4.0, 0.25],
            fc2_bias: -0.5,
        };
        let got = p.probability(&[1.0, -1.0]);
        let want = 1.0 / (1.0 + (-(0.25f32 * 2.0 - 0.5)).exp());
        assert!((got - want).abs() < 1e-7 && (got - 0.5).abs() < 1e-7);
        assert_eq!(p.parameters(), 9);
    }

    #[test]
    fn rms_norm_scales_to_unit_root_mean_square_times_the_weight() {
        let y = rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0);
        let rms = (12.5f32).sqrt();
        assert!((y[0] - 3.0 / rms).abs() < 1e-6 && (y[1] - 8.0 / rms).abs() < 1e-6);
        assert_eq!(
            candidate_logits(&[1.0, 0.0, 0.0, 1.0], &[2.0, 5.0]),
            [2.0, 5.0]
        );
    }
}

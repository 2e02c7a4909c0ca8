//! AdamW (Loshchilov & Hutter; PyTorch's `torch.optim.AdamW` update) whose moments can be
//! saved and restored, so a long training run resumes from a checkpoint exactly where it
//! stopped (candle's own `AdamW` keeps its moments private).

use std::collections::HashMap;

use candle_core::{backprop::GradStore, Tensor, Var};

use super::{Result, TrainError};

/// Optimizer state for named parameters.
pub struct AdamW {
    params: Vec<(String, Var)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    /// Zero moments; PyTorch's defaults (betas 0.9/0.999, eps 1e-8) and `weight_decay`.
    pub fn new(params: Vec<(String, Var)>, weight_decay: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            first: params
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<Result<_, _>>()?,
            second: params
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<Result<_, _>>()?,
            params,
            steps: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// One update at learning rate `lr`; parameters without a gradient stay as they are.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let (c1, c2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = ((&self.first[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.second[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            (self.first[i], self.second[i]) = (m, v);
        }
        Ok(())
    }

    /// Parameters and moments by name (`param.`, `m.`, `v.` prefixes) and the step count, for
    /// a checkpoint.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, var)) in self.params.iter().enumerate() {
            // A copy: the variable's own storage changes in place at the next step.
            out.insert(format!("param.{name}"), var.as_tensor().copy()?);
            out.insert(format!("m.{name}"), self.first[i].clone());
            out.insert(format!("v.{name}"), self.second[i].clone());
        }
        let steps = Tensor::new(&[self.steps as u32], &candle_core::Device::Cpu)?;
        out.insert("steps".into(), steps);
        Ok(out)
    }

    /// Restores what [`Self::state`] saved; every parameter must be there with its shape.
    pub fn restore(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: String, like: &Tensor| -> Result<Tensor> {
            let t = state
                .get(&key)
                .ok_or_else(|| TrainError::BadOption(format!("the checkpoint has no `{key}`")))?;
            if t.dims() != like.dims() {
                return Err(TrainError::BadOption(format!(
                    "the checkpoint's `{key}` is {:?}, the model's is {:?}",
                    t.dims(),
                    like.dims()
                )));
            }
            Ok(t.to_device(like.device())?)
        };
        for (i, (name, var)) in self.params.iter().enumerate() {
            var.set(&get(format!("param.{name}"), var.as_tensor())?)?;
            self.first[i] = get(format!("m.{name}"), var.as_tensor())?;
            self.second[i] = get(format!("v.{name}"), var.as_tensor())?;
        }
        let steps = state
            .get("steps")
            .ok_or_else(|| TrainError::BadOption("the checkpoint has no `steps`".into()))?;
        self.steps = steps.to_vec1::<u32>()?.first().copied().unwrap_or(0) as usize;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn one_step_matches_the_pytorch_formula_and_a_restored_state_continues_identically() {
        // Minimise sum((w - 3)^2) from w = [0, 1]: the first AdamW step moves each weight by
        // lr (bias-corrected m / sqrt(v) = sign(g)), minus the decay lr * wd * w.
        let w = Var::new(&[0f32, 1.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], 0.1).unwrap();
        let loss = |w: &Var| {
            (w.as_tensor() - 3.0)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        opt.step(&loss(&w).backward().unwrap(), 0.01).unwrap();
        let got = w.as_tensor().to_vec1::<f32>().unwrap();
        let want = [0.0 + 0.01, 1.0 * (1.0 - 0.001) + 0.01];
        for (g, e) in got.iter().zip(want) {
            assert!((g - e).abs() < 1e-5, "{got:?}");
        }
        let saved = opt.state().unwrap();
        opt.step(&loss(&w).backward().unwrap(), 0.01).unwrap();
        let after_two = w.as_tensor().to_vec1::<f32>().unwrap();
        let w2 = Var::new(&[9f32, 9.0], &Device::Cpu).unwrap();
        let mut restored = AdamW::new(vec![("w".into(), w2.clone())], 0.1).unwrap();
        restored.restore(&saved).unwrap();
        assert_eq!(restored.steps(), 1);
        restored.step(&loss(&w2).backward().unwrap(), 0.01).unwrap();
        assert_eq!(w2.as_tensor().to_vec1::<f32>().unwrap(), after_two);
    }
}

//! The values a plug-in file may hold: finite, and small enough that the forward pass stays
//! finite.
//!
//! A NaN in a LoRA factor or a steering direction of 1e30 does not fail at load on its own:
//! the request that uses it gets non-finite logits and, from the sampler, an empty answer
//! with status 200. Every loader checks its tensors here, so such a file is a 400 naming the
//! tensor instead.

use candle_core::{DType, Tensor};

use crate::error::{PluginError, Result};

/// The largest magnitude a plug-in weight may have. Trained adapters, control vectors and
/// controllers hold values of order 1 to 100; 1e6 leaves room for any of them while keeping
/// products over a hidden size of thousands far from f32's overflow at 3.4e38.
pub const MAX_WEIGHT_MAGNITUDE: f32 = 1e6;

/// Checks every value of `tensor` (named `what` in the error) of plug-in `plugin`.
pub fn check_tensor(plugin: &str, what: &str, tensor: &Tensor) -> Result<()> {
    let values = tensor
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    check_values(plugin, what, &values)
}

/// Checks `values` (named `what` in the error) of plug-in `plugin`.
pub fn check_values(plugin: &str, what: &str, values: &[f32]) -> Result<()> {
    let bad = values
        .iter()
        .position(|v| !v.is_finite() || v.abs() > MAX_WEIGHT_MAGNITUDE);
    match bad {
        None => Ok(()),
        Some(i) => Err(PluginError::BadWeights {
            name: plugin.to_string(),
            message: format!(
                "{what} holds {} at index {i}; weights must be finite with magnitude at most {MAX_WEIGHT_MAGNITUDE:e}",
                values[i]
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn non_finite_and_absurd_values_are_named_with_their_index() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -2e6] {
            let err = check_values("p", "direction.3", &[0.5, bad]).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, PluginError::BadWeights { .. }), "{text}");
            assert!(
                text.contains("direction.3") && text.contains("index 1"),
                "{text}"
            );
        }
        assert!(check_values("p", "w", &[0.0, -1e6, 1e6, 3.5]).is_ok());
    }

    #[test]
    fn tensors_of_any_shape_and_dtype_are_checked() {
        let t = Tensor::new(&[[1f32, 2.0], [f32::NAN, 0.0]], &Device::Cpu).unwrap();
        assert!(check_tensor("p", "lora_A", &t).is_err());
        let half = t.to_dtype(DType::BF16).unwrap();
        assert!(check_tensor("p", "lora_A", &half).is_err());
        let ok = Tensor::ones((3, 4), DType::F16, &Device::Cpu).unwrap();
        assert!(check_tensor("p", "lora_A", &ok).is_ok());
    }
}

//! PEFT tensor names in `adapter_model.safetensors`.
//!
//! PEFT saves `base_model.model.model.layers.{N}.self_attn.q_proj.lora_A.weight` (the
//! adapter name `default` stripped; some tools keep it as `lora_A.default.weight`). Every
//! name must parse: an unknown tensor is part of the adapter graft would otherwise drop.

use models::Projection;

/// Which factor of `delta = B A x` a tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// `lora_A`: `(r, in_features)`.
    A,
    /// `lora_B`: `(out_features, r)`.
    B,
}

/// A parsed tensor name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorName {
    pub layer: usize,
    pub projection: Projection,
    pub factor: Factor,
}

impl TensorName {
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
        let rest = rest.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer = layer.parse().ok()?;
        let (parent, rest) = rest.split_once('.')?;
        let (module, rest) = rest.split_once('.')?;
        let projection = projection(parent, module)?;
        let factor = match rest {
            "lora_A.weight" | "lora_A.default.weight" => Factor::A,
            "lora_B.weight" | "lora_B.default.weight" => Factor::B,
            _ => return None,
        };
        Some(Self {
            layer,
            projection,
            factor,
        })
    }

    /// The module path PEFT's patterns match against: `model.layers.3.self_attn.q_proj`.
    pub fn module_path(&self) -> String {
        module_path(self.layer, self.projection)
    }
}

pub fn module_path(layer: usize, projection: Projection) -> String {
    let parent = match projection {
        Projection::Gate | Projection::Up | Projection::Down => "mlp",
        _ => "self_attn",
    };
    format!("model.layers.{layer}.{parent}.{}", projection.hf_name())
}

fn projection(parent: &str, module: &str) -> Option<Projection> {
    let p = match module {
        "q_proj" => Projection::Q,
        "k_proj" => Projection::K,
        "v_proj" => Projection::V,
        "o_proj" => Projection::O,
        "gate_proj" => Projection::Gate,
        "up_proj" => Projection::Up,
        "down_proj" => Projection::Down,
        _ => return None,
    };
    let expected = match p {
        Projection::Gate | Projection::Up | Projection::Down => "mlp",
        _ => "self_attn",
    };
    (parent == expected).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_parse_and_others_do_not() {
        let n = TensorName::parse("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight");
        assert_eq!(
            n,
            Some(TensorName {
                layer: 12,
                projection: Projection::Down,
                factor: Factor::B
            })
        );
        let n = TensorName::parse("model.layers.0.self_attn.k_proj.lora_A.default.weight").unwrap();
        assert_eq!((n.projection, n.factor), (Projection::K, Factor::A));
        assert_eq!(n.module_path(), "model.layers.0.self_attn.k_proj");
        for bad in [
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.bias",
        ] {
            assert_eq!(TensorName::parse(bad), None, "{bad}");
        }
    }
}

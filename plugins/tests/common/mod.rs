//! What the plug-in tests share: the tiny model's config and the base model plug-ins are
//! checked against; for the vision tests the tiny model with its byte-level tokenizer, a
//! ChatML-shaped template, stand-in image tokens and a tiny tower shape, and a trainer over
//! them.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use models::bundle::{LoadOptions, LoadedModel};
use models::chat_template::ChatTemplate;
use models::tiny::{tiny_config, TinyModel};
use models::vision::ImageTokens;
use models::{Architecture, ModelConfig};
use plugins::train::DenseLlama;
use plugins::vision::files;
use plugins::vision::prompt::{image_id, Renderer};
use plugins::vision::tower::TowerShape;
use plugins::vision::train::Trainer;
use plugins::BaseModel;

/// The tiny Llama with `layers` layers.
pub fn tiny_layers(layers: usize) -> ModelConfig {
    ModelConfig {
        num_layers: layers,
        ..tiny_config(Architecture::Llama)
    }
}

/// What plug-ins for a model of config `c` are checked against, on the CPU.
pub fn tiny_base(c: &ModelConfig) -> BaseModel {
    BaseModel {
        id: "tiny".into(),
        config: c.clone(),
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    }
}

pub fn tiny_bundle(dir: &Path) -> LoadedModel {
    let path = dir.join("tiny.gguf");
    TinyModel::random(tiny_config(Architecture::Llama), 3)
        .unwrap()
        .write_gguf_with_tokenizer(&path, GgmlDType::F32)
        .unwrap();
    models::bundle::load(&path, &Device::Cpu, &LoadOptions::default()).unwrap()
}

/// Single characters of the tiny byte-level vocabulary stand in for image tokens.
pub fn tokens() -> ImageTokens {
    ImageTokens {
        around: "{".into(),
        global: "}".into(),
        image: "~".into(),
    }
}

/// ChatML's shape: each turn ends with the end-of-turn token, the reply follows its header.
pub fn chatml_template() -> ChatTemplate {
    let source = "{% for m in messages %}<{{ m.role }}>{{ m.content }}<|endoftext|>{% endfor %}\
                  {% if add_generation_prompt %}<assistant>{% endif %}";
    ChatTemplate::new(source, None, Some("<|endoftext|>".into())).unwrap()
}

pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn shape() -> TowerShape {
    TowerShape {
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        image_size: 32,
        patch_size: 8,
        scale_factor: 2,
    }
}

/// A trainer for a [`shape`] tower on `loaded` (the tiny bundle) rendering with `template`.
pub fn trainer<'a>(
    loaded: &'a LoadedModel,
    dense: &'a DenseLlama,
    template: &'a ChatTemplate,
) -> Trainer<'a> {
    Trainer {
        dense,
        renderer: Renderer {
            tokenizer: &loaded.tokenizer,
            template,
            image_text: tokens().text(shape().tokens()),
        },
        image_id: image_id(&tokens(), &loaded.tokenizer).unwrap(),
        processor: files::processor(shape().image_size),
    }
}

//! The trained vision tower's files against the server's loader, and the training
//! conversations against the chat template, on the tiny model.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use candle_core::Device;
use common::{chatml_template, max_abs_diff, shape, tiny_bundle, tokens};
use models::bundle::LoadedModel;
use models::vision::VisionModel;
use plugins::vision::files::{self, TowerInfo};
use plugins::vision::prompt::{image_id, Renderer};
use plugins::vision::tower::TrainableTower;

fn write_tower(dir: &Path, loaded: &LoadedModel, tokenizer: String) -> TrainableTower {
    let hidden = loaded.model.config.hidden_size;
    let tower = TrainableTower::new(shape(), hidden, 5).unwrap();
    // The folder holds f16 weights; training rounds to them before its last evaluation.
    tower.round_to_f16().unwrap();
    let info = TowerInfo {
        image_tokens: tokens(),
        tokenizer,
        text_hidden_size: hidden,
    };
    let id = image_id(&tokens(), &loaded.tokenizer).unwrap();
    let text = loaded.model.config.hf_json();
    files::write(dir, &tower, id, &info, text, serde_json::json!({})).unwrap();
    tower
}

#[test]
fn the_server_computes_what_training_computed_from_the_written_folder() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = tiny_bundle(dir.path());
    let out = dir.path().join("tower");
    let tower = write_tower(&out, &loaded, loaded.tokenizer.identity());
    let hidden = loaded.model.config.hidden_size;
    let served = VisionModel::attach(&out, &Device::Cpu, hidden, &loaded.tokenizer).unwrap();
    let rgb: Vec<u8> = (0..40 * 24 * 3).map(|i| (i * 37 % 251) as u8).collect();
    let got = served.features(&[(&rgb, 40, 24)]).unwrap();
    let pixels = files::processor(32)
        .pixel_values(&rgb, 40, 24, &Device::Cpu)
        .unwrap();
    let want = tower.forward(&pixels.unsqueeze(0).unwrap()).unwrap();
    assert_eq!(got.dims(), &[4, hidden]);
    let diff = max_abs_diff(&got, &want.squeeze(0).unwrap());
    assert!(diff < 1e-4, "served features differ by {diff}");
    assert_eq!(served.image_prompt(), "{}~~~~{");
}

#[test]
fn a_tower_trained_for_another_tokenizer_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = tiny_bundle(dir.path());
    let out = dir.path().join("tower");
    write_tower(&out, &loaded, "sha256:other".into());
    let hidden = loaded.model.config.hidden_size;
    let err = VisionModel::attach(&out, &Device::Cpu, hidden, &loaded.tokenizer)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("sha256:other"), "{err}");
    assert!(err.contains(&loaded.tokenizer.identity()), "{err}");
}

#[test]
fn conversation_targets_are_each_answer_and_its_end_of_turn() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = tiny_bundle(dir.path());
    let template = chatml_template();
    let renderer = Renderer {
        tokenizer: &loaded.tokenizer,
        template: &template,
        image_text: tokens().text(4),
    };
    let c = renderer
        .conversation(&[("what colour?", "red"), ("how many?", "two")])
        .unwrap();
    let eos = loaded.tokenizer.eos_ids()[0];
    for &(position, target) in &c.targets {
        assert_eq!(c.tokens[position + 1], target);
    }
    let targets: Vec<u32> = c.targets.iter().map(|t| t.1).collect();
    let mut want = loaded.tokenizer.encode("red", false).unwrap();
    want.push(eos);
    want.extend(loaded.tokenizer.encode("two", false).unwrap());
    want.push(eos);
    assert_eq!(targets, want);
    // The first question's prompt is the conversation's beginning, image included.
    let prompt = renderer.question("what colour?").unwrap();
    assert_eq!(&c.tokens[..prompt.len()], prompt.as_slice());
    let image = image_id(&tokens(), &loaded.tokenizer).unwrap();
    assert_eq!(prompt.iter().filter(|&&t| t == image).count(), 4);
}

#[test]
fn a_template_that_does_not_put_the_reply_after_its_prompt_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = tiny_bundle(dir.path());
    // The tiny template's generation prompt is `assistant:`, its rendered reply `assistant: red`.
    let renderer = Renderer {
        tokenizer: &loaded.tokenizer,
        template: loaded.chat_template.as_ref().unwrap(),
        image_text: tokens().text(4),
    };
    let err = renderer.conversation(&[("q?", "red")]).unwrap_err();
    assert!(err.to_string().contains("answer 0"), "{err}");
}

#[test]
fn training_logits_are_the_served_models_with_the_image_spliced_in() {
    use models::vision::{ImagePlacement, ImageSplice};
    use models::{BatchRow, HookCall, LogitsWanted};
    use plugins::train::DenseLlama;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let loaded = tiny_bundle(dir.path());
    let hidden = loaded.model.config.hidden_size;
    let tower = TrainableTower::new(shape(), hidden, 8).unwrap();
    let template = chatml_template();
    let dense = DenseLlama::from_llama(&loaded.model, 256, &Device::Cpu).unwrap();
    let image = image_id(&tokens(), &loaded.tokenizer).unwrap();
    let trainer = common::trainer(&loaded, &dense, &template);
    let c = trainer
        .renderer
        .conversation(&[("what colour?", "red"), ("and?", "blue")])
        .unwrap();
    let rgb: Vec<u8> = (0..32 * 32 * 3).map(|i| (i * 13 % 256) as u8).collect();
    let pixels = trainer
        .processor
        .pixel_values(&rgb, 32, 32, &Device::Cpu)
        .unwrap();
    let features = tower
        .forward(&pixels.unsqueeze(0).unwrap())
        .unwrap()
        .detach();
    let trained = trainer
        .answer_logits(std::slice::from_ref(&c), &features)
        .unwrap();

    let flat = features.squeeze(0).unwrap();
    let placement = ImagePlacement::for_prompt(&c.tokens, image, flat).unwrap();
    let hooks = [HookCall::new(
        Arc::new(ImageSplice::new(image)),
        Arc::new(placement),
    )];
    let mut cache = loaded.model.new_cache();
    let mut rows = [BatchRow {
        seq_id: 0,
        tokens: &c.tokens,
        cache: &mut cache,
        hooks: &hooks,
        logits: LogitsWanted::All,
    }];
    let served = loaded.model.forward(&mut rows).unwrap().remove(0).unwrap();
    let at: Vec<u32> = c.targets.iter().map(|&(p, _)| p as u32).collect();
    let served = served
        .index_select(&candle_core::Tensor::new(at, &Device::Cpu).unwrap(), 0)
        .unwrap();
    let diff = max_abs_diff(&trained, &served);
    assert!(diff < 1e-4, "training and serving logits differ by {diff}");
}

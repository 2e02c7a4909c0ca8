//! The SmolVLM (Idefics3) path against the `transformers` implementation on generated weights
//! (models/tests/fixtures/idefics3_tiny, made by scripts/reference/idefics3_reference.py):
//! the vision tower's image features and the language model's logits over a prompt whose image
//! tokens take those features, in one prefill and in chunks that split the image.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use models::vision::{ImagePlacement, ImageSplice, VisionTower};
use models::{BatchRow, HookCall, Llama, LogitsWanted};
use serde_json::Value;

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    let text =
        std::fs::read_to_string(fixtures().join("idefics3_tiny_reference.json")).expect("fixture");
    serde_json::from_str(&text).expect("json")
}

fn floats(v: &Value) -> Vec<f32> {
    let a = v.as_array().expect("array");
    a.iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn dims(v: &Value) -> Vec<usize> {
    let a = v.as_array().expect("array");
    a.iter()
        .map(|x| x.as_u64().expect("dim") as usize)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

struct Loaded {
    text: Llama,
    tower: VisionTower,
    fixture: Value,
}

fn load() -> Loaded {
    let dir = fixtures().join("idefics3_tiny");
    let text = models::loader::load_model(&dir, &Device::Cpu, 256).expect("text model");
    let hidden = text.config.hidden_size;
    let tower = VisionTower::load(&dir, hidden, &Device::Cpu).expect("vision tower");
    Loaded {
        text,
        tower,
        fixture: reference(),
    }
}

fn pixels(fixture: &Value) -> Tensor {
    let shape = dims(&fixture["pixel_values_shape"]);
    let values = floats(&fixture["pixel_values"]);
    Tensor::from_vec(values, (1, shape[0], shape[1], shape[2]), &Device::Cpu).expect("pixels")
}

fn prompt(fixture: &Value) -> Vec<u32> {
    let a = fixture["input_ids"].as_array().expect("ids");
    a.iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// Every position's logits with the image features spliced in, feeding `chunks` tokens at a
/// time.
fn logits(m: &Loaded, features: &Tensor, chunks: &[usize]) -> Vec<f32> {
    let tokens = prompt(&m.fixture);
    let image_token = m.tower.config().image_token_id;
    let placement =
        ImagePlacement::for_prompt(&tokens, image_token, features.clone()).expect("placement");
    let hooks = [HookCall::new(
        Arc::new(ImageSplice::new(image_token)),
        Arc::new(placement),
    )];
    let mut cache = m.text.new_cache();
    let (mut out, mut at) = (Vec::new(), 0);
    for &n in chunks {
        let mut rows = [BatchRow {
            seq_id: 0,
            tokens: &tokens[at..at + n],
            cache: &mut cache,
            hooks: &hooks,
            logits: LogitsWanted::All,
        }];
        let step = m.text.forward(&mut rows).expect("forward");
        let l = step.into_iter().next().flatten().expect("logits");
        out.extend(
            l.flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("vec"),
        );
        at += n;
    }
    assert_eq!(at, tokens.len());
    out
}

#[test]
fn image_features_match_transformers() {
    let m = load();
    let features = m.tower.encode(&pixels(&m.fixture)).expect("encode");
    assert_eq!(
        features.dims()[1..],
        dims(&m.fixture["image_features_shape"])[..]
    );
    let got = features
        .flatten_all()
        .expect("flat")
        .to_vec1::<f32>()
        .expect("vec");
    let want = floats(&m.fixture["image_features"]);
    let diff = max_diff(&got, &want);
    let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
    eprintln!("image features: max |diff| {diff:.2e} (largest value {scale:.3})");
    assert!(diff < TOLERANCE, "max difference {diff}");
}

#[test]
fn logits_with_the_image_match_transformers_in_any_chunking() {
    let m = load();
    let features = m.tower.encode(&pixels(&m.fixture)).expect("encode");
    let features = features.squeeze(0).expect("one image");
    let want = floats(&m.fixture["logits"]);
    let n = prompt(&m.fixture).len();
    // One prefill; then chunks that split the four image tokens (positions 6..10) 2 + 2.
    for chunks in [vec![n], vec![8, n - 8], vec![1, 6, 1, n - 8]] {
        let got = logits(&m, &features, &chunks);
        let diff = max_diff(&got, &want);
        eprintln!("logits {chunks:?}: max |diff| {diff:.2e}");
        assert!(diff < TOLERANCE, "{chunks:?}: max difference {diff}");
    }
    // Without the features the image tokens keep their own embeddings: the logits differ.
    let mut cache = m.text.new_cache();
    let tokens = prompt(&m.fixture);
    let mut rows = [BatchRow {
        seq_id: 0,
        tokens: &tokens,
        cache: &mut cache,
        hooks: &[],
        logits: LogitsWanted::All,
    }];
    let plain = m.text.forward(&mut rows).expect("forward");
    let plain = plain.into_iter().next().flatten().expect("logits");
    let plain = plain
        .flatten_all()
        .expect("flat")
        .to_vec1::<f32>()
        .expect("vec");
    assert!(max_diff(&plain, &want) > 100.0 * TOLERANCE);
}

#[test]
fn a_placement_must_fit_the_prompt() {
    let m = load();
    let features = m.tower.encode(&pixels(&m.fixture)).expect("encode");
    let features = features.squeeze(0).expect("one image");
    let tokens = prompt(&m.fixture);
    let image_token = m.tower.config().image_token_id;
    let three = features.narrow(0, 0, 3).expect("narrow");
    let e = ImagePlacement::for_prompt(&tokens, image_token, three).expect_err("too few");
    assert!(
        e.to_string()
            .contains("3 image features for 4 image tokens"),
        "{e}"
    );
}

/// The image processor (no splitting) against `Idefics3ImageProcessorPil` on an image it
/// enlarges and one it reduces. Both resample with Lanczos, Pillow in fixed point with 8-bit
/// rounding between its passes, the `image` crate in f32 (one 8-bit level is 2/255 = 0.0078
/// after normalising to [-1, 1]). Measured: mean |difference| 0.0012 (enlarged) and 0.0018
/// (reduced), a fifth of a level; the largest 0.11 (14 levels), where the enlarged image's
/// sharp edges ring.
#[test]
fn preprocessing_matches_the_python_processor_within_resampling_rounding() {
    use models::vision::ImageProcessor;
    let text = std::fs::read_to_string(fixtures().join("idefics3_preprocess_reference.json"))
        .expect("fixture");
    let fixture: Value = serde_json::from_str(&text).expect("json");
    let p = &fixture["processor"];
    let processor = ImageProcessor {
        longest_edge: p["size_longest_edge"].as_u64().expect("edge") as u32,
        image_size: p["max_image_size"].as_u64().expect("size") as u32,
        rescale_factor: 1.0 / 255.0,
        mean: [0.5; 3],
        std: [0.5; 3],
    };
    for case in fixture["cases"].as_array().expect("cases") {
        let (w, h) = (
            case["width"].as_u64().expect("w"),
            case["height"].as_u64().expect("h"),
        );
        let rgb: Vec<u8> = case["rgb"]
            .as_array()
            .expect("rgb")
            .iter()
            .map(|v| v.as_u64().expect("byte") as u8)
            .collect();
        let got = processor
            .pixel_values(&rgb, w as u32, h as u32, &Device::Cpu)
            .expect("pixels");
        assert_eq!(got.dims(), &dims(&case["pixel_values_shape"])[..]);
        let got = got
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        let want = floats(&case["pixel_values"]);
        let mean = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / want.len() as f32;
        let max = max_diff(&got, &want);
        eprintln!("{w}x{h}: mean |diff| {mean:.4}, max {max:.4}");
        assert!(
            mean < 0.005 && max < 0.15,
            "{w}x{h}: mean {mean}, max {max}"
        );
    }
}

#[test]
fn a_vision_language_checkpoint_takes_no_second_tower() {
    let dir = fixtures().join("idefics3_tiny");
    let options = models::bundle::LoadOptions {
        vision: Some(dir.clone()),
        ..Default::default()
    };
    let err = models::bundle::load(&dir, &Device::Cpu, &options)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("has a vision tower of its own"), "{err}");
}

#[test]
fn a_checkpoints_own_tower_is_not_one_to_attach() {
    // SmolVLM's config names no tokenizer: only towers `server train vision` wrote attach.
    let dir = fixtures().join("idefics3_tiny");
    let loaded = models::bundle::load(&dir, &Device::Cpu, &Default::default()).expect("model");
    let hidden = loaded.model.config.hidden_size;
    let err = models::vision::VisionModel::attach(&dir, &Device::Cpu, hidden, &loaded.tokenizer)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("names no tokenizer"), "{err}");
}

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

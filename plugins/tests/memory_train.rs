//! `server train memory`'s pipeline on a tiny seeded model with a character vocabulary, all
//! through files (the real loaders): a memory made of the base's own top layer, sharing the
//! layers below, serves exactly the base; training one on a tiny corpus lowers the perplexity
//! of held-out text from the same source; a run interrupted after a checkpoint resumes to the
//! same weights as an uninterrupted one; test-split documents are refused.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor, D};
use models::bundle::{load, LoadOptions, LoadedModel};
use models::tiny::{tiny_config, TinyModel};
use models::{Architecture, BatchRow, HookCall, Llama, LogitsWanted};
use plugins::files::PluginFiles;
use plugins::memory::corpus::{is_test, Corpus};
use plugins::memory::datastore::Datastore;
use plugins::memory::eval::perplexity;
use plugins::memory::targets::KnnTargets;
use plugins::memory::train::{train, write_memory, MemoryTrainConfig, WeightsFormat};
use plugins::memory::{GraftBlock, MemoryDecoder, TYPE};
use plugins::train::{DenseLlama, Progress, Quiet};
use plugins::{BaseModel, Plugin};
use rand::{Rng, SeedableRng};

const BLOCK: usize = 64;

fn base(dir: &Path) -> LoadedModel {
    let mut config = tiny_config(Architecture::Llama);
    config.num_layers = 3;
    let tiny = TinyModel::random(config, 5).unwrap();
    let path = dir.join("base.gguf");
    tiny.write_gguf_with_tokenizer(&path, GgmlDType::F32)
        .unwrap();
    let options = LoadOptions {
        max_positions: Some(256),
        chat_template: None,
        vision: None,
    };
    load(&path, &Device::Cpu, &options).unwrap()
}

/// Sentences of a small seeded grammar: the structure a memory can learn.
fn text(seed: u64, sentences: usize) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (who, verb, what) = (
        ["the cat", "a dog", "my fox"],
        ["sees", "eats", "likes"],
        ["the fish.", "a bone!", "red hens?"],
    );
    (0..sentences)
        .map(|_| {
            let pick = |n: usize, rng: &mut rand::rngs::StdRng| rng.random_range(0..n);
            let (a, b, c) = (pick(3, &mut rng), pick(3, &mut rng), pick(3, &mut rng));
            format!("{} {} {} ", who[a], verb[b], what[c])
        })
        .collect()
}

/// Training documents (names outside the test split) and one held-out document.
fn corpus_files(dir: &Path) -> (Vec<PathBuf>, PathBuf) {
    let names = (0..).map(|i| format!("doc{i}.txt")).filter(|n| !is_test(n));
    let train: Vec<PathBuf> = names
        .take(3)
        .enumerate()
        .map(|(i, n)| {
            let p = dir.join(n);
            std::fs::write(&p, text(i as u64, 60)).unwrap();
            p
        })
        .collect();
    let held_out = dir.join("held-out.txt");
    std::fs::write(&held_out, text(99, 10)).unwrap(); // within the 256-token context
    (train, held_out)
}

fn config(shared: usize, layers: usize, epochs: usize) -> MemoryTrainConfig {
    MemoryTrainConfig {
        base_layers: (shared..layers).collect(),
        alpha: 0.5,
        lr: 3e-3,
        epochs,
        block_len: BLOCK,
        batch_size: 2,
        seed: 1,
        checkpoint_every: 2,
    }
}

fn graft(shared: usize, lambda: f32) -> GraftBlock {
    GraftBlock {
        kind: TYPE.into(),
        tokenizer_hash: None,
        lambda,
        shared_layers: shared,
        base_layers: None,
    }
}

fn info(m: &Llama) -> BaseModel {
    BaseModel {
        id: "tiny".into(),
        config: m.config.clone(),
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    }
}

/// Log-probabilities of `tokens[1..]` under `model` with `hooks`, in one prefill.
fn logprobs(model: &Llama, hooks: &[HookCall], tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut rows = [BatchRow {
        seq_id: 1,
        tokens,
        cache: &mut cache,
        hooks,
        logits: LogitsWanted::All,
    }];
    let logits = model.forward(&mut rows).unwrap().remove(0).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let next = Tensor::new(&tokens[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let n = tokens.len() - 1;
    logp.narrow(0, 0, n)
        .unwrap()
        .gather(&next, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn memory_call(dir: &Path, m: &Llama, lambda: f64) -> HookCall {
    let memory = MemoryDecoder::load("m", dir, &info(m), &mut PluginFiles::unconfined()).unwrap();
    let params = serde_json::json!({ "lambda": lambda });
    let params = memory.request_params(params.as_object().unwrap()).unwrap();
    HookCall::new(Arc::new(memory), params)
}

fn pipeline(
    loaded: &LoadedModel,
    files: &[PathBuf],
    shared: usize,
) -> (
    Corpus,
    KnnTargets,
    Option<plugins::memory::datastore::SharedInputs>,
) {
    let corpus = Corpus::read(files, &loaded.tokenizer, None, false, &mut Quiet).unwrap();
    let blocks = corpus.blocks(BLOCK);
    let (store, inputs) = Datastore::build(&loaded.model, &blocks, 2, shared, &mut Quiet).unwrap();
    assert_eq!(store.len(), corpus.tokens.len() - 1);
    let (targets, recall) = KnnTargets::build(&store, 8, 4.0, false, &mut Quiet).unwrap();
    assert!(recall.unwrap() > 0.9, "HNSW recall {recall:?}");
    (corpus, targets, inputs)
}

#[test]
fn a_memory_of_the_base_s_own_top_layer_sharing_the_rest_serves_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = base(dir.path());
    let m = &loaded.model;
    let (dense, _) = DenseLlama::trainable_subset(m, &[2], 256, &Device::Cpu).unwrap();
    let out = dir.path().join("m");
    write_memory(&dense, &graft(2, 0.5), WeightsFormat::Safetensors, &out).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 96).collect();
    let plain = logprobs(m, &[], &tokens);
    for lambda in [0.3, 1.0] {
        let mixed = logprobs(m, &[memory_call(&out, m, lambda)], &tokens);
        let diff = plain
            .iter()
            .zip(&mixed)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "λ {lambda}: differs by {diff}");
    }
    // A memory sharing the base's first two layers but holding layer 0's weights is another
    // model: the check above can fail.
    let (wrong, _) = DenseLlama::trainable_subset(m, &[0], 256, &Device::Cpu).unwrap();
    let out = dir.path().join("wrong");
    write_memory(&wrong, &graft(2, 0.5), WeightsFormat::Safetensors, &out).unwrap();
    let mixed = logprobs(m, &[memory_call(&out, m, 1.0)], &tokens);
    let diff = plain
        .iter()
        .zip(&mixed)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff > 1e-2);
}

#[test]
fn training_a_memory_on_a_tiny_corpus_lowers_held_out_perplexity() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = base(dir.path());
    let (train_files, held_out) = corpus_files(dir.path());
    for shared in [0, 2] {
        let (corpus, targets, inputs) = pipeline(&loaded, &train_files, shared);
        let work = dir.path().join(format!("work{shared}"));
        std::fs::create_dir_all(&work).unwrap();
        let cfg = config(shared, 3, 6);
        let model = train(
            &loaded.model,
            &corpus,
            &targets,
            inputs.as_ref(),
            &cfg,
            &work,
            &mut Quiet,
        )
        .unwrap();
        let out = dir.path().join(format!("memory{shared}"));
        write_memory(
            &model,
            &graft(shared, 0.5),
            WeightsFormat::Gguf(GgmlDType::Q8_0),
            &out,
        )
        .unwrap();
        let text = loaded
            .tokenizer
            .encode(&std::fs::read_to_string(&held_out).unwrap(), false)
            .unwrap();
        let base_ppl = perplexity(&logprobs(&loaded.model, &[], &text));
        let call = memory_call(&out, &loaded.model, 0.5);
        let memory_ppl = perplexity(&logprobs(&loaded.model, &[call], &text));
        assert!(
            memory_ppl < 0.7 * base_ppl,
            "shared {shared}: held-out perplexity {memory_ppl:.2} with the memory, {base_ppl:.2} without"
        );
    }
}

/// Stops a run by panicking when step `at` reports its losses.
struct StopAt(usize);

impl Progress for StopAt {
    fn losses(&mut self, step: usize, _: &[(&'static str, f32)]) {
        assert!(step != self.0, "stopped");
    }
}

#[test]
fn an_interrupted_run_resumes_from_its_checkpoint_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = base(dir.path());
    let (train_files, _) = corpus_files(dir.path());
    let (corpus, targets, inputs) = pipeline(&loaded, &train_files, 2);
    let cfg = config(2, 3, 2);
    let weights = |m: &DenseLlama| -> Vec<Vec<f32>> {
        m.named_weights()
            .iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let (once, resumed) = (dir.path().join("once"), dir.path().join("resumed"));
    for d in [&once, &resumed] {
        std::fs::create_dir_all(d).unwrap();
    }
    let whole = train(
        &loaded.model,
        &corpus,
        &targets,
        inputs.as_ref(),
        &cfg,
        &once,
        &mut Quiet,
    )
    .unwrap();
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train(
            &loaded.model,
            &corpus,
            &targets,
            inputs.as_ref(),
            &cfg,
            &resumed,
            &mut StopAt(3),
        )
    }));
    assert!(stopped.is_err());
    let again = train(
        &loaded.model,
        &corpus,
        &targets,
        inputs.as_ref(),
        &cfg,
        &resumed,
        &mut StopAt(1),
    )
    .unwrap();
    assert_eq!(weights(&whole), weights(&again));
}

#[test]
fn training_refuses_a_test_split_document() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = base(dir.path());
    let name = (0..)
        .map(|i| format!("doc{i}.txt"))
        .find(|n| is_test(n))
        .unwrap();
    let path = dir.path().join(&name);
    std::fs::write(&path, "the cat sees the fish.").unwrap();
    let e = Corpus::read(&[path], &loaded.tokenizer, None, false, &mut Quiet).unwrap_err();
    assert!(
        e.to_string().contains("test split") && e.to_string().contains(&name),
        "{e}"
    );
}

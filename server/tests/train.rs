//! `server train lora` and `server train memory` as a user runs them: the real binary on a
//! tiny model file that carries its own tokenizer and chat template. A LoRA run writes the two
//! PEFT files the server loads, one log line per step, its plot and the evaluation line; a
//! memory run writes the memory, its log and plot and resumes in its work folder, and `server
//! eval perplexity` scores it (served, alone, mixed, and the kNN-LM over its datastore); bad
//! invocations fail with a message, not a panic.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use models::tiny::{tiny_config, TinyModel};
use models::Architecture;
use plugins::files::PluginFiles;
use plugins::lora::{LoraAdapter, CONFIG_FILE, WEIGHTS_FILE};
use plugins::BaseModel;
use serde_json::{json, Value};

/// A tiny Llama with the byte-level vocabulary and plain chat template in its metadata.
fn tiny_model(dir: &Path) -> (PathBuf, TinyModel) {
    let path = dir.join("tiny.gguf");
    let tiny = TinyModel::random(tiny_config(Architecture::Llama), 31).unwrap();
    tiny.write_gguf_with_tokenizer(&path, GgmlDType::F32)
        .unwrap();
    (path, tiny)
}

/// Twenty examples, chat and prompt/completion lines alternating: answer in capitals.
fn dataset(dir: &Path) -> PathBuf {
    let words = [
        "apple", "river", "stone", "cloud", "bread", "lamp", "train", "music", "field", "glass",
    ];
    let mut lines = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let chat = json!({"messages": [
            {"role": "user", "content": format!("shout {w}")},
            {"role": "assistant", "content": w.to_uppercase()}]});
        let plain = json!({"prompt": format!("{w} loudly:"), "completion": format!(" {}!", w.to_uppercase()), "n": i});
        lines.extend([chat.to_string(), plain.to_string()]);
    }
    let path = dir.join("data.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_server"))
        .args(["train", "lora"])
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn train_lora_writes_the_peft_files_a_log_line_per_step_and_the_eval_line() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tiny) = tiny_model(dir.path());
    let data = dataset(dir.path());
    let out = dir.path().join("adapter");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let args = [
        "--model",
        &s(&model),
        "--data",
        &s(&data),
        "--out",
        &s(&out),
        "--rank",
        "4",
        "--steps",
        "12",
        "--lr",
        "1e-2",
        "--max-len",
        "64",
        "--eval-every",
        "6",
    ];
    let run = train(&args);
    let (stdout, stderr) = (text(&run.stdout), text(&run.stderr));
    assert!(run.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");

    assert!(out.join(CONFIG_FILE).is_file() && out.join(WEIGHTS_FILE).is_file());
    assert!(out.join("train_loss.svg").is_file());
    let base = BaseModel {
        id: "tiny".into(),
        config: tiny.config.clone(),
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    };
    let adapter =
        LoraAdapter::load("trained", &out, &base, &mut PluginFiles::unconfined()).unwrap();
    assert_eq!(adapter.adapted_modules(), 7 * tiny.config.num_layers);
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(config["base_model_name_or_path"], json!("tiny.gguf"));

    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12, "{log}");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step"], json!(i + 1));
        for key in ["loss", "lr", "tokens", "seconds"] {
            assert!(line[key].is_number(), "step {}: {key} in {line}", i + 1);
        }
    }
    assert!(
        lines[5]["eval_ce"].is_number() && lines[4].get("eval_ce").is_none(),
        "{log}"
    );

    // 20 examples: every tenth is held out.
    let eval = stdout
        .lines()
        .find(|l| l.starts_with("eval: base CE"))
        .unwrap_or_else(|| panic!("no eval line in\n{stdout}\nstderr:\n{stderr}"));
    assert!(
        eval.contains("-> adapter CE") && eval.contains("on 2 held-out examples"),
        "{eval}"
    );
}

#[test]
fn bad_invocations_fail_with_a_message_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tiny_model(dir.path());
    let data = dataset(dir.path());
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("notes.txt"), "keep me").unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // Every failure comes before the output folder is created, so one new name serves all.
    let new = s(&dir.path().join("new"));
    let (model, data, empty, full) = (s(&model), s(&data), s(&empty), s(&full));
    let missing = s(&dir.path().join("missing.jsonl"));
    let cases: [(Vec<&str>, &str); 5] = [
        (
            vec!["--data", &missing, "--out", &new],
            "missing.jsonl does not exist",
        ),
        (vec!["--data", &empty, "--out", &new], "no usable examples"),
        (
            vec!["--data", &data, "--out", &new, "--targets", "q_proj,qkv"],
            "unknown target module `qkv`",
        ),
        (vec!["--data", &data, "--out", &new, "--rank", "0"], "rank"),
        (vec!["--data", &data, "--out", &full], "not empty"),
    ];
    for (args, needle) in cases {
        let run = train(&[&["--model", model.as_str()][..], &args].concat());
        let stderr = text(&run.stderr);
        assert!(!run.status.success(), "{args:?} must fail");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected `{needle}` in\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("full/notes.txt")).unwrap(),
        "keep me"
    );
    assert!(!dir.path().join("new").exists());
}

#[test]
fn train_lora_reads_a_corpus_folder_in_blocks_and_refuses_its_test_split() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tiny_model(dir.path());
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    let name = |test: bool| {
        (0..)
            .map(|i| format!("doc{i}.txt"))
            .find(|n| plugins::memory::corpus::is_test(n) == test)
            .unwrap()
    };
    // 840 bytes, cut to 600 tokens of the byte-level vocabulary: blocks of 64 overlapping by
    // one start every 63 tokens, so 10 blocks; the tenth (tokens 567..600, 32 targets) is held out.
    std::fs::write(corpus.join(name(false)), "the quick brown fox. ".repeat(40)).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = dir.path().join("adapter");
    let args = [
        "--model",
        &s(&model),
        "--corpus",
        &s(&corpus),
        "--max-tokens",
        "600",
        "--out",
        &s(&out),
        "--steps",
        "2",
        "--max-len",
        "64",
    ];
    let run = train(&args);
    let (stdout, stderr) = (text(&run.stdout), text(&run.stderr));
    assert!(run.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.contains("corpus: 600 tokens from 1 documents"),
        "{stderr}"
    );
    assert!(
        stdout.contains("on 1 held-out examples (32 target tokens)"),
        "{stdout}"
    );
    let recorded: Value =
        serde_json::from_slice(&std::fs::read(out.join("training_args.json")).unwrap()).unwrap();
    assert_eq!(recorded["corpus"], json!([s(&corpus)]));
    assert_eq!(recorded["max_tokens"], json!(600));

    std::fs::write(corpus.join(name(true)), "held out").unwrap();
    let again = dir.path().join("again");
    let run = train(&[&args[..6], &["--out", &s(&again)]].concat());
    let stderr = text(&run.stderr);
    assert!(
        !run.status.success() && stderr.contains("belongs to the test split"),
        "{stderr}"
    );
    let both = train(&[
        "--corpus",
        &s(&corpus),
        "--data",
        "x.jsonl",
        "--out",
        &s(&again),
    ]);
    assert!(
        text(&both.stderr).contains("cannot be used with"),
        "{}",
        text(&both.stderr)
    );
}

fn train_memory(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_server"))
        .args(["train", "memory"])
        .args(args)
        .output()
        .unwrap()
}

/// A corpus folder holding `text` as one training document.
fn one_document_corpus(dir: &Path, text: &str) -> PathBuf {
    let corpus = dir.join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    let name = (0..)
        .map(|i| format!("doc{i}.txt"))
        .find(|n| !plugins::memory::corpus::is_test(n))
        .unwrap();
    std::fs::write(corpus.join(name), text).unwrap();
    corpus
}

/// `server train memory` at toy sizes: 300 tokens, blocks of 64, the top layer, 4 neighbours.
fn memory_args(model: &Path, corpus: &Path, out: &Path) -> Vec<String> {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let args = [
        "--model",
        &s(model),
        "--corpus",
        &s(corpus),
        "--out",
        &s(out),
    ];
    let sizes = [
        "--max-tokens",
        "300",
        "--block-len",
        "64",
        "--layers",
        "1",
        "--k",
        "4",
    ];
    args.iter().chain(&sizes).map(|a| a.to_string()).collect()
}

#[test]
fn train_memory_writes_the_memory_its_log_and_plot_and_resumes_only_with_its_settings() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tiny) = tiny_model(dir.path());
    let corpus = one_document_corpus(dir.path(), &"a memory remembers its corpus. ".repeat(20));
    let out = dir.path().join("memory");
    let mut owned = memory_args(&model, &corpus, &out);
    owned.extend(["--format".into(), "safetensors".into()]);
    let args: Vec<&str> = owned.iter().map(String::as_str).collect();
    let run = train_memory(&args);
    let stderr = text(&run.stderr);
    assert!(
        run.status.success(),
        "stdout:\n{}\nstderr:\n{stderr}",
        text(&run.stdout)
    );
    for file in [
        "config.json",
        "model.safetensors",
        "train_log.jsonl",
        "train_loss.svg",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["graft"]["type"], json!("memory_decoder"));
    assert_eq!(
        config["graft"]["shared_layers"],
        json!(tiny.config.num_layers - 1)
    );
    // 300 tokens in blocks of 64 overlapping by one: 5 blocks, one step each.
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 5, "{log}");
    assert!(stderr.contains("datastore: 299 keys built"), "{stderr}");

    // The same settings resume in the work folder (nothing left to build); others are refused.
    let again = train_memory(&[&args[..], &["--overwrite"]].concat());
    let stderr = text(&again.stderr);
    assert!(
        again.status.success() && stderr.contains("resuming the run"),
        "{stderr}"
    );
    assert!(stderr.contains("kNN targets: reusing"), "{stderr}");
    let mut other_k = args.clone();
    let k = other_k.iter().position(|a| *a == "--k").unwrap();
    other_k[k + 1] = "8";
    let other = train_memory(&[&other_k[..], &["--overwrite"]].concat());
    let stderr = text(&other.stderr);
    assert!(
        !other.status.success() && stderr.contains("holds a run with other settings"),
        "{stderr}"
    );
}

#[test]
fn eval_perplexity_scores_base_memory_curve_and_knn_lm_consistently() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tiny_model(dir.path());
    let story = "the cat sat on the mat. the dog sat on the log. ".repeat(12);
    let corpus = one_document_corpus(dir.path(), &story);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let plugins_dir = dir.path().join("plugins");
    let mut args = memory_args(&model, &corpus, &plugins_dir.join("mem"));
    args.extend(["--lr".into(), "1e-2".into()]);
    let trained = train_memory(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(trained.status.success(), "{}", text(&trained.stderr));

    let report_path = dir.path().join("ppl.json");
    let store = plugins_dir.join("mem.work/datastore.safetensors");
    let run = Command::new(env!("CARGO_BIN_EXE_server"))
        .args([
            "eval",
            "perplexity",
            "--model",
            &s(&model),
            "--text",
            &s(&corpus),
        ])
        .args([
            "--skip-tokens",
            "300",
            "--max-tokens",
            "200",
            "--window",
            "64",
        ])
        .args([
            "--stride",
            "32",
            "--plugin-dir",
            &s(&plugins_dir),
            "--plugin",
            "memory:m=mem",
        ])
        .args([
            "--plugins",
            r#"[{"type": "memory", "name": "m"}]"#,
            "--lambdas",
            "0.5",
        ])
        .args([
            "--datastore",
            &s(&store),
            "--knn-k",
            "4",
            "--out",
            &s(&report_path),
        ])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["scored_tokens"], json!(200));
    assert_eq!(report["skip_tokens"], json!(300));
    let rows = report["results"].as_array().unwrap();
    let ppl = |config: &str| {
        rows.iter()
            .find(|r| r["config"].as_str().unwrap().ends_with(config))
            .unwrap_or_else(|| panic!("no `{config}` row in {rows:?}"))["perplexity"]
            .as_f64()
            .unwrap()
    };
    // The memory's config says λ 0.5: served through the engine it is the mixture computed
    // from the base's and the memory's own passes.
    let (served, mixed) = (ppl(r#""m"}]"#), ppl("mixed"));
    assert!(
        (served - mixed).abs() < 1e-3 * mixed,
        "served {served} vs mixed {mixed}"
    );
    // Text the memory never saw but written like its corpus: memory and kNN-LM both beat the
    // random base.
    assert!(
        mixed < ppl("base") && ppl("knn-lm") < ppl("base"),
        "{rows:?}"
    );
}

// --- server train vision / server eval vision -------------------------------------------

fn server(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_server"))
        .args(args)
        .output()
        .unwrap()
}

/// A tower small enough to train in seconds on the default model (the borrowed image tokens
/// are SmolLM2's), a few steps of each phase.
const TINY_VISION: [&str; 16] = [
    "--hidden-size",
    "32",
    "--layers",
    "1",
    "--heads",
    "1",
    "--align-batch",
    "2",
    "--batch",
    "1",
    "--turns",
    "2",
    "--test-questions",
    "3",
    "--align-steps",
    "2",
];

#[test]
fn train_vision_writes_a_tower_the_server_attaches_evaluates_resumes_and_prunes() {
    let Some(model) = models::testing::default_model_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tower");
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec!["train", "vision", "--model", m, "--out", o, "--steps", "1"];
    args.extend(TINY_VISION);
    let run = server(&args);
    assert!(run.status.success(), "{}", text(&run.stderr));
    for file in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "report.json",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["graft"]["info"]["image_tokens"]["image"],
        json!("<empty_output>")
    );
    assert_eq!(config["vision_config"]["hidden_size"], json!(32));
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [0, 1, 2], "one step count across both phases");

    // A non-empty folder is refused without --resume; a run stopped when alignment ended (the
    // checkpoint then says phase 1, no step done) resumes with the answering step alone.
    let again = server(&args);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("--resume"),
        "{}",
        text(&again.stderr)
    );
    let state = out.join("checkpoint/state.json");
    let mut at: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    at["phase"] = json!(1);
    std::fs::write(&state, at.to_string()).unwrap();
    // Other settings than the checkpoint's are refused.
    let mut other = args.clone();
    other.extend(["--resume", "--seed", "9"]);
    let refused = server(&other);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("other settings"),
        "{}",
        text(&refused.stderr)
    );
    args.push("--resume");
    let resumed = server(&args);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        [0, 1, 2, 2],
        "the answering step again, alignment not"
    );

    // A decision module for the tower: the plug-in folder with the learned scorer.
    let module = dir.path().join("prune");
    let trained = server(&[
        "train",
        "vision-prune",
        "--model",
        m,
        "--tower",
        o,
        "--out",
        module.to_str().unwrap(),
        "--steps",
        "2",
        "--batch",
        "1",
        "--test-steps",
        "1",
        "--inner-size",
        "16",
        "--heads",
        "2",
    ]);
    assert!(trained.status.success(), "{}", text(&trained.stderr));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(module.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["scorer"], json!("learned"));
    assert_eq!(config["module"], json!({"inner_size": 16, "num_heads": 2}));
    assert!(module.join("decision.safetensors").exists());
    let log = std::fs::read_to_string(module.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(module.join("report.json")).unwrap())
            .unwrap();
    for scorer in ["random", "learned"] {
        let kl = report["held_out_kl"][scorer].as_f64().unwrap();
        assert!(kl.is_finite() && kl >= 0.0, "{scorer}: {kl}");
    }

    let report = dir.path().join("eval");
    let eval = server(&[
        "eval",
        "vision",
        "--model",
        m,
        "--vision",
        o,
        "--questions",
        "2",
        "--samples",
        "2",
        "--prune-keep",
        "0.5,0.25",
        "--prune-module",
        module.to_str().unwrap(),
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(eval.status.success(), "{}", text(&eval.stderr));
    let lines = std::fs::read_to_string(report.join("samples/questions.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
    assert!(report.join("samples/000.png").exists());
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["questions"], json!(2));
    // Each scorer at each ratio: fewer prefill FLOPs the fewer image tokens stay.
    let pruning = report["pruning"].as_array().unwrap();
    let runs: Vec<(&str, f64)> = pruning
        .iter()
        .map(|r| (r["scorer"].as_str().unwrap(), r["keep"].as_f64().unwrap()))
        .collect();
    let want = [
        ("random", 0.5),
        ("random", 0.25),
        ("attention", 0.5),
        ("attention", 0.25),
        ("learned", 0.5),
        ("learned", 0.25),
    ];
    assert_eq!(runs, want);
    let flops: Vec<f64> = pruning
        .iter()
        .map(|r| r["prefill_flops_ratio"].as_f64().unwrap())
        .collect();
    assert!(1.0 < flops[0] && flops[0] < flops[1], "{flops:?}");
}

//! `server train steer`, `server train controller` and `server eval refusal` as a user runs
//! them: the real binary on a tiny model file with its own tokenizer and chat template. Each
//! writes files the plug-in loaders accept, and bad invocations fail with a message.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use models::tiny::{tiny_config, TinyModel};
use models::Architecture;
use plugins::controller::SteeringController;
use plugins::files::PluginFiles;
use plugins::steer::{ControlVector, SteeringVector};
use plugins::BaseModel;
use serde_json::{json, Value};

fn tiny_model(dir: &Path) -> (PathBuf, BaseModel) {
    let path = dir.join("tiny.gguf");
    let config = models::ModelConfig {
        num_layers: 4,
        ..tiny_config(Architecture::Llama)
    };
    let tiny = TinyModel::random(config, 8).unwrap();
    tiny.write_gguf_with_tokenizer(&path, GgmlDType::F32)
        .unwrap();
    let base = BaseModel {
        id: "tiny".into(),
        config: tiny.config,
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    };
    (path, base)
}

/// Two prompt files in the shared/data/refusal format: "harmful" ones mention knives.
fn prompts(dir: &Path) -> (PathBuf, PathBuf) {
    let make = |name: &str, f: &dyn Fn(usize) -> String| {
        let items: Vec<Value> = (0..16)
            .map(|i| json!({"instruction": f(i), "category": null}))
            .collect();
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_string(&items).unwrap()).unwrap();
        path
    };
    (
        make("harmful.json", &|i| {
            format!("how do i hurt someone with knife number {i}")
        }),
        make("harmless.json", &|i| {
            format!("please tell me about bread recipe {i}")
        }),
    )
}

fn server(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_server"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_steer_writes_a_control_vector_with_unit_directions_and_a_layer_table() {
    let dir = tempfile::tempdir().unwrap();
    let (model, base) = tiny_model(dir.path());
    let (harmful, harmless) = prompts(dir.path());
    let out = dir.path().join("v.gguf");
    let stdout = ok(&server(&[
        "train",
        "steer",
        "--model",
        s(&model),
        "--positive",
        s(&harmful),
        "--negative",
        s(&harmless),
        "--out",
        s(&out),
        "--method",
        "pca",
    ]));
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.trim_start().starts_with(char::is_numeric))
            .count(),
        3,
        "{stdout}"
    );
    let cv = ControlVector::read(&out).unwrap();
    assert_eq!(cv.directions.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    for d in cv.directions.values() {
        let norm: f32 = d.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    }
    SteeringVector::load("v", &out, &base, &mut PluginFiles::unconfined()).unwrap();
}

#[test]
fn train_controller_then_eval_refusal_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (model, base) = tiny_model(dir.path());
    let (harmful, harmless) = prompts(dir.path());
    let ctl = dir.path().join("ctl");
    let stdout = ok(&server(&[
        "train",
        "controller",
        "--model",
        s(&model),
        "--harmful",
        s(&harmful),
        "--harmless",
        s(&harmless),
        "--out",
        s(&ctl),
        "--input-layers",
        "0,1",
        "--steered-layers",
        "1-3",
        "--units",
        "8",
        "--steps",
        "50",
        "--sensitivity-prompts",
        "4",
        "--hold-out-harmful",
        "2",
    ]));
    assert!(stdout.contains("AUROC"), "{stdout}");
    // The held-out prompts are written beside the controller, for evaluation.
    let held: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(ctl.join("held_out_harmful.json")).unwrap())
            .unwrap();
    assert_eq!(held.len(), 2);
    let loaded =
        SteeringController::load("c", &ctl, &base, &mut PluginFiles::unconfined()).unwrap();
    assert_eq!(loaded.config().decay, Some(2.0));
    // One JSON line of losses per MLP step, beside the controller.
    let log = std::fs::read_to_string(ctl.join("train_log.jsonl")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 50);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step"], i);
        for field in ["loss", "strength_loss", "weight_loss"] {
            assert!(line[field].as_f64().unwrap().is_finite(), "{line}");
        }
    }

    let vector = dir.path().join("v.gguf");
    ok(&server(&[
        "train",
        "steer",
        "--model",
        s(&model),
        "--positive",
        s(&harmful),
        "--negative",
        s(&harmless),
        "--out",
        s(&vector),
    ]));
    let (report, plot) = (dir.path().join("r.json"), dir.path().join("r.svg"));
    let stdout = ok(&server(&[
        "eval",
        "refusal",
        "--model",
        s(&model),
        "--harmful",
        s(&harmful),
        "--harmless",
        s(&harmless),
        "--limit",
        "4",
        "--max-tokens",
        "6",
        "--steer",
        s(&vector),
        "--steer-scales",
        "1,2",
        "--controller",
        s(&ctl),
        "--controller-scales",
        "1",
        "--controller-decays",
        "none,4,config",
        "--out",
        s(&report),
        "--plot",
        s(&plot),
    ]));
    assert!(
        stdout.contains("clean refusal") && stdout.contains("degenerate"),
        "{stdout}"
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let configs: Vec<&str> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["config"].as_str().unwrap())
        .collect();
    assert_eq!(
        configs,
        [
            "base",
            "steer",
            "steer",
            "controller",
            "controller",
            "controller"
        ]
    );
    let decays: Vec<&Value> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| &x["decay"])
        .collect();
    // `config` is the trainer's default decay, written to the controller's config.json.
    let two = serde_json::json!(2.0);
    assert_eq!(decays[3..], [&Value::Null, &serde_json::json!(4.0), &two]);
    assert_eq!(r["results"][0]["perplexity_vs_base"], 1.0);
    // Every configuration has each rate with its 95% interval around it.
    for row in r["results"].as_array().unwrap() {
        for set in ["harmful", "harmless"] {
            for rate in ["refusal_rate", "clean_refusal_rate", "degenerate_rate"] {
                let value = row[format!("{set}_{rate}")].as_f64().unwrap();
                let ci = &row[format!("{set}_{rate}_ci95")];
                let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
                assert!(
                    0.0 <= lo && lo <= value && value <= hi && hi <= 1.0,
                    "{row}"
                );
            }
        }
    }
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
}

#[test]
fn bad_invocations_fail_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tiny_model(dir.path());
    let (harmful, harmless) = prompts(dir.path());
    let out = dir.path().join("v.gguf");
    for (args, needle) in [
        (vec!["--method", "lda"], "possible values: mean-diff, pca"),
        (vec!["--layers", "0-2"], "layer 0 is never steered"),
        (vec!["--layers", "1-9"], "--layers must lie within 1-3"),
    ] {
        let mut all = vec![
            "train",
            "steer",
            "--model",
            s(&model),
            "--positive",
            s(&harmful),
            "--negative",
            s(&harmless),
            "--out",
            s(&out),
        ];
        all.extend(args);
        let o = server(&all);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && stderr.contains(needle),
            "{needle}: {stderr}"
        );
    }
    let o = server(&[
        "train",
        "steer",
        "--model",
        s(&model),
        "--positive",
        "/nope.json",
        "--negative",
        s(&harmless),
        "--out",
        s(&out),
    ]);
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("cannot read /nope.json")
    );
}

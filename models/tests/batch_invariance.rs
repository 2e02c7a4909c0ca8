//! A sequence's logits must not depend on what else shares its forward step, bit for bit, on
//! the quantized path the server runs (GGUF Q4_1 matrices through our kernel, Q8_0 through
//! candle's): otherwise a seeded request could sample differently under load.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use models::loader::load_model;
use models::tiny::{tiny_config, TinyModel};
use models::{Architecture, BatchRow, Llama, LogitsWanted};

fn quantized_model(dtype: GgmlDType, dir: &std::path::Path) -> Llama {
    let mut cfg = tiny_config(Architecture::Llama);
    (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) = (256, 512, 64);
    let path = dir.join(format!("{dtype:?}.gguf"));
    TinyModel::random(cfg, 21)
        .expect("tiny")
        .write_gguf(&path, dtype)
        .expect("write");
    load_model(&path, &Device::Cpu, 256).expect("load")
}

fn alone(m: &Llama, prefix: &[u32], tokens: &[u32]) -> Tensor {
    let mut cache = m.new_cache();
    if !prefix.is_empty() {
        let mut b = [BatchRow {
            seq_id: 0,
            tokens: prefix,
            cache: &mut cache,
            hooks: &[],
            logits: LogitsWanted::None,
        }];
        m.forward(&mut b).expect("prefix");
    }
    let mut b = [BatchRow {
        seq_id: 0,
        tokens,
        cache: &mut cache,
        hooks: &[],
        logits: LogitsWanted::All,
    }];
    m.forward(&mut b).expect("alone").remove(0).expect("logits")
}

#[test]
fn quantized_batch_rows_equal_rows_alone_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let m = quantized_model(dtype, dir.path());
        // A decode row after a prefix, a 7-token prefill and another decode row: m = 9 rows
        // in every matmul, against m = 1 and m = 7 alone.
        let (p0, t0) = (vec![3u32, 9, 27], vec![81u32]);
        let (p1, t1) = (vec![], vec![5u32, 10, 15, 20, 25, 30, 35]);
        let (p2, t2) = (vec![50u32, 51], vec![52u32]);
        let mut caches: Vec<_> = (0..3).map(|_| m.new_cache()).collect();
        for (cache, prefix) in caches.iter_mut().zip([&p0, &p1, &p2]) {
            if !prefix.is_empty() {
                let mut b = [BatchRow {
                    seq_id: 0,
                    tokens: prefix,
                    cache,
                    hooks: &[],
                    logits: LogitsWanted::None,
                }];
                m.forward(&mut b).expect("prefix");
            }
        }
        let [c0, c1, c2] = &mut caches[..] else {
            panic!("three caches")
        };
        let mut batch = [
            BatchRow {
                seq_id: 0,
                tokens: &t0,
                cache: c0,
                hooks: &[],
                logits: LogitsWanted::All,
            },
            BatchRow {
                seq_id: 1,
                tokens: &t1,
                cache: c1,
                hooks: &[],
                logits: LogitsWanted::All,
            },
            BatchRow {
                seq_id: 2,
                tokens: &t2,
                cache: c2,
                hooks: &[],
                logits: LogitsWanted::All,
            },
        ];
        let out = m.forward(&mut batch).expect("batch");
        for (i, (p, t)) in [(&p0, &t0), (&p1, &t1), (&p2, &t2)].into_iter().enumerate() {
            let got: Vec<Vec<f32>> = out[i].as_ref().expect("logits").to_vec2().expect("vec");
            let want: Vec<Vec<f32>> = alone(&m, p, t).to_vec2().expect("vec");
            assert!(got == want, "{dtype:?}: row {i} differs when batched");
        }
    }
}

//! Times `kernels::Q4_1Matmul` (and `Q8_0Matmul`) against candle's `QMatMul` on the same
//! weights, for the default model's (SmolLM2-135M) shapes, and prints medians, GFLOP/s and
//! effective weight bandwidth.
//!
//! `--decode` runs only the decode parts (2) and (3), m = 1, without candle's Q4_1 sweep.
//! Part (0) first measures the plain memory read bandwidth on the same threads, the ceiling for
//! decoding.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p models --example q4_1_bench [-- --quick] [--min] [--decode]
//! ```
//!
//! Three parts: (1) each projection shape on its own, at m = 1 (decode) and m = 128 / 512
//! (prefill), weights hot in cache; (2) one decode token's worth of matmuls over 30 distinct
//! layers (66 MB of Q4_1 weights, so they stream from DRAM as in real decoding); (3) the tied
//! 49152 x 576 lm_head, which the GGUF stores as Q8_0, through `Q8_0Matmul` and candle.

#![allow(clippy::unwrap_used)]

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use models::kernels::{Q4_1Matmul, Q8_0Matmul};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

const HIDDEN: usize = 576;
const KV: usize = 192;
const MLP: usize = 1536;
const LAYERS: usize = 30;
const VOCAB: usize = 49152;

fn random(rows: usize, cols: usize, rng: &mut StdRng) -> Result<Tensor> {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1f32..1.0))
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu)
}

/// Seconds per call of `f`, over samples of enough calls to last ~2 ms, for about `budget` in
/// all: the median sample, or with `--min` the fastest one (the better estimate when other
/// processes share the cores).
fn median_secs(budget: Duration, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let t = Instant::now();
    f()?;
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let inner = ((2e-3 / once) as usize).max(1);
    let samples = ((budget.as_secs_f64() / (once * inner as f64)) as usize).clamp(3, 31);
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        for _ in 0..inner {
            f()?;
        }
        times.push(t.elapsed().as_secs_f64() / inner as f64);
    }
    times.sort_by(f64::total_cmp);
    if std::env::args().any(|a| a == "--min") {
        Ok(times[0])
    } else {
        Ok(times[times.len() / 2])
    }
}

fn q4_1_bytes(n: usize, k: usize) -> f64 {
    (n * k / 32 * 20) as f64
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 200 } else { 1000 });
    let mut rng = StdRng::seed_from_u64(0);
    let ours_path = {
        let w = QTensor::quantize(&random(16, 32, &mut rng)?, GgmlDType::Q4_1)?;
        Q4_1Matmul::new(&w)?.path()
    };
    println!(
        "threads: {} (candle pool), q4_1 path: {ours_path:?}",
        candle_core::utils::get_num_threads()
    );

    let buf: Vec<u64> = (0..(256usize << 20) / 8).map(|i| i as u64).collect();
    let t_read = median_secs(budget, || {
        let pool = candle_core::utils::barrier_pool();
        let sums = std::sync::Mutex::new(0u64);
        pool.execute_chunked(64, |range| {
            let chunk = buf.len() / 64;
            let s = buf[range.start * chunk..range.end * chunk]
                .iter()
                .fold(0u64, |a, &v| a.wrapping_add(v));
            if let Ok(mut sums) = sums.lock() {
                *sums = sums.wrapping_add(s);
            }
        });
        std::hint::black_box(sums.into_inner().ok());
        Ok(())
    })?;
    println!(
        "plain memory read bandwidth over 256 MB on the same threads: {:.1} GB/s",
        (buf.len() * 8) as f64 / t_read * 1e-9
    );
    drop(buf);
    let t_pool = median_secs(budget, || {
        candle_core::utils::barrier_pool().execute_chunked(2, |r| {
            std::hint::black_box(r);
        });
        Ok(())
    })?;
    println!("thread pool round trip (empty job): {:.2} us", t_pool * 1e6);

    let stat = if std::env::args().any(|a| a == "--min") {
        "minima"
    } else {
        "medians"
    };
    println!("\n(1) per shape, weights hot in cache; times are {stat}");
    println!(
        "{:<14} {:>5} {:>5} {:>4} | {:>10} {:>8} {:>8} | {:>10} {:>8} | {:>7}",
        "shape", "n", "k", "m", "ours us", "GFLOP/s", "w GB/s", "candle us", "GFLOP/s", "speedup"
    );
    let decode_only = std::env::args().any(|a| a == "--decode");
    let shapes = [
        ("q_proj/o_proj", HIDDEN, HIDDEN),
        ("k_proj/v_proj", KV, HIDDEN),
        ("gate/up_proj", MLP, HIDDEN),
        ("down_proj", HIDDEN, MLP),
    ];
    for &(name, n, k) in shapes.iter().filter(|_| !decode_only) {
        let qt = QTensor::quantize(&random(n, k, &mut rng)?, GgmlDType::Q4_1)?;
        let ours = Q4_1Matmul::new(&qt)?;
        let theirs = QMatMul::from_qtensor(qt)?;
        for &m in &[1usize, 128, 512] {
            let x = random(m, k, &mut rng)?;
            let t_ours = median_secs(budget, || ours.forward(&x).map(|_| ()))?;
            let t_theirs = median_secs(budget, || theirs.forward(&x).map(|_| ()))?;
            let flop = 2.0 * (m * n * k) as f64;
            println!(
                "{:<14} {:>5} {:>5} {:>4} | {:>10.1} {:>8.1} {:>8.1} | {:>10.1} {:>8.1} | {:>6.1}x",
                name,
                n,
                k,
                m,
                t_ours * 1e6,
                flop / t_ours * 1e-9,
                q4_1_bytes(n, k) / t_ours * 1e-9,
                t_theirs * 1e6,
                flop / t_theirs * 1e-9,
                t_theirs / t_ours
            );
        }
    }

    println!("\n(2) one decode token: the 7 projections of {LAYERS} distinct layers, m = 1");
    let layer_shapes = [
        (HIDDEN, HIDDEN),
        (KV, HIDDEN),
        (KV, HIDDEN),
        (HIDDEN, HIDDEN),
        (MLP, HIDDEN),
        (MLP, HIDDEN),
        (HIDDEN, MLP),
    ];
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut bytes = 0.0;
    let mut flop = 0.0;
    for _ in 0..LAYERS {
        for &(n, k) in &layer_shapes {
            let qt = QTensor::quantize(&random(n, k, &mut rng)?, GgmlDType::Q4_1)?;
            ours.push(Q4_1Matmul::new(&qt)?);
            theirs.push(QMatMul::from_qtensor(qt)?);
            bytes += q4_1_bytes(n, k);
            flop += 2.0 * (n * k) as f64;
        }
    }
    let x576 = random(1, HIDDEN, &mut rng)?;
    let x1536 = random(1, MLP, &mut rng)?;
    let input = |k: usize| if k == HIDDEN { &x576 } else { &x1536 };
    let t_ours = median_secs(budget * 2, || {
        for mm in &ours {
            mm.forward(input(mm.k()))?;
        }
        Ok(())
    })?;
    let t_theirs = if decode_only {
        f64::NAN
    } else {
        median_secs(budget * 2, || {
            for (mm, o) in theirs.iter().zip(&ours) {
                mm.forward(input(o.k()))?;
            }
            Ok(())
        })?
    };
    println!(
        "{:.1} MB of Q4_1 weights: ours {:.2} ms ({:.1} GB/s, {:.1} GFLOP/s), candle {:.2} ms, speedup {:.1}x",
        bytes * 1e-6,
        t_ours * 1e3,
        bytes / t_ours * 1e-9,
        flop / t_ours * 1e-9,
        t_theirs * 1e3,
        t_theirs / t_ours
    );
    drop(theirs);
    drop(ours);

    println!("\n(3) tied lm_head {VOCAB} x {HIDDEN} (Q8_0 in the GGUF)");
    let w = random(VOCAB, HIDDEN, &mut rng)?;
    let q8 = QTensor::quantize(&w, GgmlDType::Q8_0)?;
    let q8_bytes = (VOCAB * HIDDEN / 32 * 34) as f64;
    let ours_q8 = Q8_0Matmul::new(&q8)?;
    let theirs_q8 = QMatMul::from_qtensor(q8)?;
    for &m in [1usize, 128].iter().filter(|&&m| m == 1 || !decode_only) {
        let x = random(m, HIDDEN, &mut rng)?;
        let t_ours = median_secs(budget, || ours_q8.forward(&x).map(|_| ()))?;
        let t_theirs = median_secs(budget, || theirs_q8.forward(&x).map(|_| ()))?;
        let flop = 2.0 * (m * VOCAB * HIDDEN) as f64;
        println!(
            "m = {m:>3}: ours {:.0} us ({:.1} GB/s of weights, {:.0} GFLOP/s), candle {:.0} us ({:.1} GB/s, {:.0} GFLOP/s), speedup {:.1}x",
            t_ours * 1e6,
            q8_bytes / t_ours * 1e-9,
            flop / t_ours * 1e-9,
            t_theirs * 1e6,
            q8_bytes / t_theirs * 1e-9,
            flop / t_theirs * 1e-9,
            t_theirs / t_ours
        );
    }
    Ok(())
}

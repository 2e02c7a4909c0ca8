//! Decode-only loop for profiling: 32-token prompt, then N greedy steps.
use models::{BatchRow, LogitsWanted};
fn main() -> anyhow::Result<()> {
    models::threads::pin_cpu_threads(None);
    let path = models::testing::default_model_for_tests().expect("model");
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let m = models::loader::load_model(&path, &candle_core::Device::Cpu, 4096)?;
    let toks: Vec<u32> = (0..32u32).map(|i| (i * 7919) % 49152).collect();
    let mut cache = m.new_cache();
    let mut b = [BatchRow {
        seq_id: 0,
        tokens: &toks,
        cache: &mut cache,
        hooks: &[],
        logits: LogitsWanted::Last,
    }];
    m.forward(&mut b)?;
    let t = std::time::Instant::now();
    for i in 0..steps as u32 {
        let tk = [(i * 31 + 7) % 49152];
        let mut b = [BatchRow {
            seq_id: 0,
            tokens: &tk,
            cache: &mut cache,
            hooks: &[],
            logits: LogitsWanted::Last,
        }];
        let l = m.forward(&mut b)?;
        let _ = l[0].as_ref().map(|t| t.to_vec2::<f32>());
    }
    println!(
        "decode: {:.1} tok/s",
        steps as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}

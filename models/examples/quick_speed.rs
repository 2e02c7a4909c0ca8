use models::{BatchRow, LogitsWanted};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).expect("path");
    let m = models::loader::load_model(path.as_ref(), &candle_core::Device::Cpu, 4096)?;
    let toks: Vec<u32> = (0..512u32).map(|i| (i * 7919) % 49152).collect();
    for _ in 0..2 {
        let mut cache = m.new_cache();
        let t = Instant::now();
        let mut b = [BatchRow {
            seq_id: 0,
            tokens: &toks,
            cache: &mut cache,
            hooks: &[],
            logits: LogitsWanted::Last,
        }];
        m.forward(&mut b)?;
        let pf = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..64u32 {
            let tk = [i + 100];
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
        let dc = t.elapsed().as_secs_f64();
        println!(
            "prefill 512: {:.1} tok/s, decode: {:.1} tok/s",
            512.0 / pf,
            64.0 / dc
        );
    }
    Ok(())
}

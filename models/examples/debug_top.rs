use candle_core::D;
use models::{BatchRow, LogitsWanted};
fn main() -> anyhow::Result<()> {
    let fx: serde_json::Value =
        serde_json::from_str(include_str!("../tests/fixtures/smollm2_reference.json"))?;
    let path = models::testing::default_model_for_tests().expect("model");
    let m = models::loader::load_model(&path, &candle_core::Device::Cpu, 2048)?;
    for p in fx["prompts"].as_array().expect("p") {
        let ids: Vec<u32> = p["prompt_ids"]
            .as_array()
            .expect("a")
            .iter()
            .map(|x| x.as_u64().expect("u") as u32)
            .collect();
        let mut cache = m.new_cache();
        let mut b = [BatchRow {
            seq_id: 0,
            tokens: &ids,
            cache: &mut cache,
            hooks: &[],
            logits: LogitsWanted::Last,
        }];
        let l = m.forward(&mut b)?.remove(0).expect("l");
        let lp: Vec<f32> = candle_nn::ops::log_softmax(&l, D::Minus1)?
            .flatten_all()?
            .to_vec1()?;
        let top: Vec<String> = p["top10"]
            .as_array()
            .expect("t")
            .iter()
            .take(4)
            .map(|e| {
                let id = e[0].as_u64().expect("id") as usize;
                format!(
                    "{id}: ref {:.3} ours {:.3}",
                    e[1].as_f64().expect("f"),
                    lp[id]
                )
            })
            .collect();
        println!("{}: {}", p["name"], top.join(" | "));
    }
    Ok(())
}

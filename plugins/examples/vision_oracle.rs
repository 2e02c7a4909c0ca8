//! The ceiling of `server train vision`'s answering phase (docs/BENCHMARKS.md, "Vision"): the
//! frozen default model reads, in place of an image, the exact word embeddings the tower's
//! summary row is aligned to (`--summary-row`) after 16 freely trained embeddings (a soft
//! prompt), and learns to answer through them with the trainer's own conversations: 2 images
//! x 8 questions per step, AdamW at a constant learning rate. Every `EVAL_EVERY` steps it
//! reports teacher-forced accuracy on the first `QUESTIONS` held-out test questions, by kind
//! (colour, shape, count, side, word), as the tower's report counts them.
//!
//! usage: cargo run --release -p plugins --example vision_oracle -- [STEPS] [QUESTIONS]
//! (defaults 1200 and 200; env LR, default 3e-3; ~2.3 s a step on 2 cores)

use candle_core::{DType, Device, Tensor, Var, D};
use plugins::train::adamw::AdamW;
use plugins::train::DenseLlama;
use plugins::vision::eval::{kind_index, test_question, Accuracy};
use plugins::vision::prompt::{image_id, smollm2_image_tokens, Renderer};
use plugins::vision::train::{TrainOptions, Trainer};
use plugins::vision::{data, files};

const SOFT: usize = 16;
const EVAL_EVERY: usize = 300;

fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: usize| -> usize {
        std::env::args()
            .nth(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (steps, questions) = (arg(1, 1200), arg(2, 200));
    let lr: f64 = std::env::var("LR")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3e-3);
    let path =
        models::testing::default_model_for_tests().ok_or_else(|| anyhow::anyhow!("no model"))?;
    let loaded = models::bundle::load(&path, &Device::Cpu, &Default::default())?;
    let template = loaded
        .chat_template
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no template"))?;
    let dense = DenseLlama::from_llama(&loaded.model, 1024, &Device::Cpu)?;
    let shape = TrainOptions::default().shape;
    let side = shape.image_size / shape.patch_size;
    let tokens = smollm2_image_tokens();
    let trainer = Trainer {
        dense: &dense,
        renderer: Renderer {
            tokenizer: &loaded.tokenizer,
            template,
            image_text: tokens.text(SOFT + side),
        },
        image_id: image_id(&tokens, &loaded.tokenizer)?,
        processor: files::processor(shape.image_size),
    };
    let hidden = loaded.model.config.hidden_size;
    let soft = Var::zeros((1, SOFT, hidden), DType::F32, &Device::Cpu)?;
    // The soft prompt, then the summary row's exact words.
    let features = |samples: &[data::Sample]| -> anyhow::Result<Tensor> {
        let words = trainer.word_targets(shape, true, samples)?;
        let summary = words.narrow(1, shape.tokens() - side, side)?;
        let prompt = soft
            .as_tensor()
            .broadcast_as((samples.len(), SOFT, hidden))?;
        Ok(Tensor::cat(&[&prompt, &summary], 1)?)
    };
    let mut optimizer = AdamW::new(vec![("soft".into(), soft.clone())], 0.0)?;
    for step in 0..steps {
        let samples: Vec<data::Sample> = (0..2)
            .map(|j| data::sample(0, data::Split::Train, (step * 2 + j) as u64))
            .collect();
        let conversations = samples
            .iter()
            .map(|s| {
                let qa: Vec<(&str, &str)> = s
                    .questions
                    .iter()
                    .take(8)
                    .map(|q| (q.text.as_str(), q.answer))
                    .collect();
                trainer.renderer.conversation(&qa)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let logits = trainer.answer_logits(&conversations, &features(&samples)?)?;
        let targets: Vec<u32> = conversations
            .iter()
            .flat_map(|c| c.targets.iter().map(|t| t.1))
            .collect();
        let loss = candle_nn::loss::cross_entropy(&logits, &Tensor::new(targets, &Device::Cpu)?)?;
        optimizer.step(&loss.backward()?, lr)?;
        if (step + 1) % EVAL_EVERY == 0 || step + 1 == steps {
            let mut accuracy = Accuracy::empty();
            for i in 0..questions {
                let (s, q) = test_question(0, i);
                let q = &s.questions[q];
                let c = trainer
                    .renderer
                    .conversation(&[(q.text.as_str(), q.answer)])?;
                let got: Vec<u32> = trainer
                    .answer_logits(
                        std::slice::from_ref(&c),
                        &features(std::slice::from_ref(&s))?,
                    )?
                    .argmax(D::Minus1)?
                    .to_vec1()?;
                let right = got.iter().zip(&c.targets).all(|(g, t)| *g == t.1);
                accuracy.count(kind_index(q.kind), right);
            }
            println!(
                "after {} steps (loss {:.3}):\n{accuracy}",
                step + 1,
                loss.to_scalar::<f32>()?
            );
        }
    }
    Ok(())
}

//! The plug-in runtime on tiny quantized models written to disk (the served weight formats,
//! through the real loader): per-sequence state, the every-token hook, per-head key
//! selection from pre-RoPE queries and keys, and cache truncation. Where the design promises
//! exactness (a selection of every block, re-decoding after a truncation, a k-token
//! verification row), the tests compare bits.

use std::sync::{Arc, Mutex};

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use models::loader::load_model;
use models::rope::Rope;
use models::tiny::{tiny_config, TinyModel};
use models::{
    Architecture, BatchRow, Exit, Hook, HookCall, HookGroup, HookPoints, HookRow, HookState,
    KeyBlocks, KvCache, Llama, LogitsWanted,
};

const MAX_POS: usize = 256;

fn quantized_model(dir: &std::path::Path) -> Llama {
    let mut cfg = tiny_config(Architecture::Llama);
    (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) = (256, 512, 64);
    let path = dir.join("q8_0.gguf");
    TinyModel::random(cfg, 21)
        .expect("tiny")
        .write_gguf(&path, GgmlDType::Q8_0)
        .expect("write");
    load_model(&path, &Device::Cpu, MAX_POS).expect("load")
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + seed * 11 + 5) % 96)
        .collect()
}

fn step(
    m: &Llama,
    cache: &mut KvCache,
    toks: &[u32],
    hooks: &[HookCall],
    logits: LogitsWanted,
) -> Option<Tensor> {
    let mut b = [BatchRow {
        seq_id: 1,
        tokens: toks,
        cache,
        hooks,
        logits,
    }];
    m.forward(&mut b).expect("forward").remove(0)
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).expect("values");
    v.into_iter().map(f32::to_bits).collect()
}

/// What [`Watcher`] keeps per sequence: every (position, token) it was shown, and the
/// positions that were to get logits.
#[derive(Debug, Default, Clone, PartialEq)]
struct Seen {
    tokens: Vec<(usize, u32)>,
    logit_positions: Vec<usize>,
}

impl HookState for Seen {
    fn allocated_bytes(&self) -> usize {
        self.tokens.len() * 16
    }
    fn fork(&self) -> models::Result<Box<dyn HookState>> {
        Ok(Box::new(self.clone()))
    }
    fn truncate(&mut self, len: usize) -> models::Result<()> {
        self.tokens.retain(|&(p, _)| p < len);
        self.logit_positions.retain(|&p| p < len);
        Ok(())
    }
}

/// Records every token of every step in the row's state.
struct Watcher;

impl Hook for Watcher {
    fn name(&self) -> &str {
        "watcher"
    }
    fn points(&self) -> HookPoints {
        HookPoints {
            tokens: true,
            ..Default::default()
        }
    }
    fn new_state(
        &self,
        _: &models::hooks::HookParams,
    ) -> models::Result<Option<Box<dyn HookState>>> {
        Ok(Some(Box::new(Seen::default())))
    }
    fn step_tokens(&self, group: &HookGroup<'_>) -> models::Result<()> {
        for row in &group.rows {
            row.with_state(self.name(), |seen: &mut Seen| {
                let positions = row.positions();
                seen.tokens
                    .extend(positions.clone().zip(row.tokens.iter().copied()));
                let end = positions.end;
                seen.logit_positions.extend(match row.logits {
                    LogitsWanted::None | LogitsWanted::Hidden => 0..0,
                    LogitsWanted::Last => end - 1..end,
                    LogitsWanted::All => positions,
                });
            })?;
        }
        Ok(())
    }
}

fn seen(cache: &KvCache) -> Seen {
    cache
        .plugins()
        .with(|s: &mut Seen| s.clone())
        .expect("watcher state")
}

#[test]
fn the_every_token_hook_sees_what_the_model_sees_in_every_chunking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = quantized_model(dir.path());
    let watch = [HookCall::bare(Arc::new(Watcher))];
    let toks = tokens(20, 1);
    let want: Vec<(usize, u32)> = toks.iter().copied().enumerate().collect();
    for chunks in [&[20][..], &[1; 20], &[7, 1, 12]] {
        let mut cache = m.new_cache();
        let mut at = 0;
        for (i, &c) in chunks.iter().enumerate() {
            // Intermediate prefill chunks ask for no logits; the hook runs for them all the same.
            let last = i + 1 == chunks.len();
            let wanted = if last {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            step(&m, &mut cache, &toks[at..at + c], &watch, wanted);
            at += c;
        }
        let s = seen(&cache);
        assert_eq!(s.tokens, want, "chunks {chunks:?}");
        assert_eq!(s.logit_positions, vec![19], "chunks {chunks:?}");
    }
    // In a batch beside a row without the hook and one with its own state, each row's state
    // holds its own tokens only.
    let (mut a, mut b, mut c) = (m.new_cache(), m.new_cache(), m.new_cache());
    let (ta, tb, tc) = (tokens(5, 2), tokens(3, 3), tokens(4, 4));
    let mut batch = [
        BatchRow {
            seq_id: 1,
            tokens: &ta,
            cache: &mut a,
            hooks: &watch,
            logits: LogitsWanted::All,
        },
        BatchRow {
            seq_id: 2,
            tokens: &tb,
            cache: &mut b,
            hooks: &[],
            logits: LogitsWanted::Last,
        },
        BatchRow {
            seq_id: 3,
            tokens: &tc,
            cache: &mut c,
            hooks: &watch,
            logits: LogitsWanted::None,
        },
    ];
    m.forward(&mut batch).expect("batch");
    assert_eq!(
        seen(&a).tokens,
        ta.iter().copied().enumerate().collect::<Vec<_>>()
    );
    assert_eq!(seen(&a).logit_positions, vec![0, 1, 2, 3, 4]);
    assert_eq!(
        seen(&c).tokens,
        tc.iter().copied().enumerate().collect::<Vec<_>>()
    );
    assert!(b.plugins().is_empty());
}

#[test]
fn plugin_state_is_counted_forked_and_truncated_with_the_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = quantized_model(dir.path());
    let watch = [HookCall::bare(Arc::new(Watcher))];
    let mut bare = m.new_cache();
    let mut cache = m.new_cache();
    let toks = tokens(10, 5);
    step(&m, &mut bare, &toks, &[], LogitsWanted::Last);
    step(&m, &mut cache, &toks, &watch, LogitsWanted::Last);
    // The state's bytes are part of the cache's, which the scheduler and the metrics count.
    assert_eq!(cache.allocated_bytes(), bare.allocated_bytes() + 10 * 16);

    let mut fork = cache.fork().expect("fork");
    step(&m, &mut fork, &[1], &watch, LogitsWanted::Last);
    step(&m, &mut cache, &[2], &watch, LogitsWanted::Last);
    assert_eq!(seen(&fork).tokens.last(), Some(&(10, 1)));
    assert_eq!(
        seen(&cache).tokens.last(),
        Some(&(10, 2)),
        "a fork never shares state"
    );

    cache.truncate(4).expect("truncate");
    assert_eq!(
        seen(&cache).tokens,
        toks[..4].iter().copied().enumerate().collect::<Vec<_>>()
    );
    assert_eq!(cache.len(), 4);
}

/// Reads the blocks `choose(layer, kv head, n_blocks)` of every layer, and records the
/// pre-RoPE keys it was shown at layer 0.
struct Selector {
    block: usize,
    choose: fn(usize, usize, usize) -> Vec<u32>,
    keys: Mutex<Vec<Tensor>>,
}

impl Hook for Selector {
    fn name(&self) -> &str {
        "selector"
    }
    fn points(&self) -> HookPoints {
        HookPoints {
            attention: true,
            ..Default::default()
        }
    }
    fn attention_blocks(
        &self,
        layer: usize,
        _row: &HookRow<'_>,
        q: &Tensor,
        k: &Tensor,
        slots: usize,
    ) -> models::Result<Option<KeyBlocks>> {
        let n_kv = k.dim(1)?;
        assert_eq!(q.dim(0)?, k.dim(0)?);
        if layer == 0 {
            self.keys.lock().expect("lock").push(k.clone());
        }
        let n_blocks = slots.div_ceil(self.block);
        Ok(Some(KeyBlocks {
            block_size: self.block,
            per_kv_head: (0..n_kv)
                .map(|h| (self.choose)(layer, h, n_blocks))
                .collect(),
        }))
    }
}

fn selector(block: usize, choose: fn(usize, usize, usize) -> Vec<u32>) -> Arc<Selector> {
    Arc::new(Selector {
        block,
        choose,
        keys: Mutex::new(Vec::new()),
    })
}

/// A 40-token prompt, then 6 decode steps; the logits of every step.
fn run(m: &Llama, hooks: &[HookCall]) -> Vec<Tensor> {
    let mut cache = m.new_cache();
    let mut out =
        vec![step(m, &mut cache, &tokens(40, 6), hooks, LogitsWanted::All).expect("logits")];
    for t in tokens(6, 7) {
        out.push(step(m, &mut cache, &[t], hooks, LogitsWanted::Last).expect("logits"));
    }
    out
}

#[test]
fn selecting_every_block_per_head_equals_dense_attention_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = quantized_model(dir.path());
    let dense = run(&m, &[]);
    let all = selector(8, |_, _, n| (0..n as u32).collect());
    let selected = run(&m, &[HookCall::bare(all)]);
    for (i, (a, b)) in dense.iter().zip(&selected).enumerate() {
        assert_eq!(bits(a), bits(b), "step {i}");
    }
    // Dropping the first block of one key/value head in one layer changes the output.
    let some = selector(8, |l, h, n| {
        (u32::from(l == 1 && h == 0)..n as u32).collect()
    });
    let changed = run(&m, &[HookCall::bare(some)]);
    assert_ne!(bits(&dense[6]), bits(&changed[6]));
}

#[test]
fn attention_hooks_see_keys_before_rope() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = quantized_model(dir.path());
    let sel = selector(16, |_, _, n| (0..n as u32).collect());
    let mut cache = m.new_cache();
    step(
        &m,
        &mut cache,
        &tokens(9, 8),
        &[HookCall::bare(sel.clone())],
        LogitsWanted::Last,
    );
    let k_pre = sel.keys.lock().expect("lock")[0].clone(); // (9, n_kv, d)
    let rope = Rope::new(&m.config, MAX_POS, &Device::Cpu).expect("rope");
    let positions = Tensor::new(&(0u32..9).collect::<Vec<_>>()[..], &Device::Cpu).expect("pos");
    let (cos, sin) = rope.tables(&positions).expect("tables");
    let rotated = Rope::apply(&k_pre, &cos, &sin)
        .expect("rope")
        .transpose(0, 1)
        .expect("t");
    let (cached, _) = cache.layer_kv(0).expect("read").expect("written");
    assert_eq!(bits(&rotated.contiguous().expect("c")), bits(&cached));
}

#[test]
fn truncation_then_redecoding_equals_never_having_decoded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = quantized_model(dir.path());
    let watch = [HookCall::bare(Arc::new(Watcher))];
    let (prompt, decoded) = (tokens(12, 9), tokens(6, 10));
    let mut cache = m.new_cache();
    step(&m, &mut cache, &prompt, &watch, LogitsWanted::Last);
    let first: Vec<Tensor> = decoded
        .iter()
        .map(|&t| step(&m, &mut cache, &[t], &watch, LogitsWanted::Last).expect("logits"))
        .collect();
    cache.truncate(12 + 2).expect("truncate");
    for (i, &t) in decoded.iter().enumerate().skip(2) {
        let again = step(&m, &mut cache, &[t], &watch, LogitsWanted::Last).expect("logits");
        assert_eq!(bits(&again), bits(&first[i]), "token {i}");
    }
    let all: Vec<u32> = prompt.iter().chain(&decoded).copied().collect();
    assert_eq!(
        seen(&cache).tokens,
        all.iter().copied().enumerate().collect::<Vec<_>>()
    );
}

/// Exits every row after layer 0 without keys and values in the later layers: a drafter.
struct Draft;

impl Hook for Draft {
    fn name(&self) -> &str {
        "draft"
    }
    fn points(&self) -> HookPoints {
        HookPoints {
            early_exit: true,
            ..Default::default()
        }
    }
    fn early_exit(
        &self,
        layer: usize,
        g: &HookGroup<'_>,
        _: &Tensor,
        _: &models::OutputHead<'_>,
    ) -> models::Result<Option<Vec<Exit>>> {
        Ok((layer == 0).then(|| vec![Exit::Skip; g.rows.len()]))
    }
}

#[test]
fn a_verification_row_after_drafts_equals_one_token_steps_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = quantized_model(dir.path());
    let (prompt, next) = (tokens(15, 11), tokens(4, 12));
    // Reference: the four tokens fed one step at a time.
    let mut plain = m.new_cache();
    step(&m, &mut plain, &prompt, &[], LogitsWanted::Last);
    let one_by_one: Vec<Tensor> = next
        .iter()
        .map(|&t| step(&m, &mut plain, &[t], &[], LogitsWanted::Last).expect("logits"))
        .collect();
    // Drafts: the same tokens through layer 0 only, then rejected and verified in one row.
    let mut cache = m.new_cache();
    let draft = [HookCall::bare(Arc::new(Draft))];
    step(&m, &mut cache, &prompt, &[], LogitsWanted::Last);
    for &t in &next {
        step(&m, &mut cache, &[t], &draft, LogitsWanted::Last);
    }
    assert_eq!(cache.layer_len(1), 15, "drafts left no keys in layer 1");
    cache.truncate(15).expect("truncate");
    let verified = step(&m, &mut cache, &next, &[], LogitsWanted::All).expect("logits");
    for (i, want) in one_by_one.iter().enumerate() {
        let got = verified.narrow(0, i, 1).expect("row");
        assert_eq!(bits(&got), bits(want), "draft {i}");
    }
}

/// Replaces the residual stream after every layer and the logits with affine maps of them.
struct Rescale;

impl Hook for Rescale {
    fn name(&self) -> &str {
        "rescale"
    }
    fn points(&self) -> HookPoints {
        HookPoints {
            residual: true,
            logits: true,
            ..Default::default()
        }
    }
    fn residual(&self, _: usize, _: &HookGroup<'_>, h: &Tensor) -> models::Result<Option<Tensor>> {
        Ok(Some(h.affine(1.01, 0.003)?))
    }
    fn logits(&self, _: &HookGroup<'_>, z: &Tensor) -> models::Result<Option<Tensor>> {
        Ok(Some(z.affine(0.9, 0.1)?))
    }
}

#[test]
fn regression_a_replacing_hook_among_rows_without_it_equals_itself_alone_bit_for_bit() {
    // Replacements were written back as `x + (new - old)`, which rounds: a row's result then
    // depended on whether its group held every row of the step.
    let dir = tempfile::tempdir().expect("tempdir");
    let m = quantized_model(dir.path());
    let hooked = [HookCall::bare(Arc::new(Rescale))];
    let (ta, tb) = (tokens(7, 13), tokens(5, 14));
    let mut alone = m.new_cache();
    let want = step(&m, &mut alone, &ta, &hooked, LogitsWanted::All).expect("logits");
    let (mut a, mut b) = (m.new_cache(), m.new_cache());
    let mut batch = [
        BatchRow {
            seq_id: 1,
            tokens: &tb,
            cache: &mut b,
            hooks: &[],
            logits: LogitsWanted::All,
        },
        BatchRow {
            seq_id: 2,
            tokens: &ta,
            cache: &mut a,
            hooks: &hooked,
            logits: LogitsWanted::All,
        },
    ];
    let got = m
        .forward(&mut batch)
        .expect("batch")
        .remove(1)
        .expect("logits");
    assert_eq!(bits(&got), bits(&want));
}

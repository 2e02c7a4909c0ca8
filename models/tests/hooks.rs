//! Hook semantics on a tiny seeded model: hooks act only on the rows whose chain holds them,
//! in chain order, and early exit takes a row's logits from an earlier layer while keeping
//! its cache complete for later steps.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use models::tiny::{tiny_config, TinyModel};
use models::{
    Architecture, BatchRow, Exit, Hook, HookCall, HookGroup, HookPoints, Llama, LogitsWanted,
    OutputHead, Projection,
};

const MAX_POS: usize = 128;

/// Adds a constant to the residual stream after `layer` (a steering vector of all ones).
struct AddAfterLayer {
    layer: usize,
    amount: f64,
}

impl Hook for AddAfterLayer {
    fn name(&self) -> &str {
        "add"
    }
    fn points(&self) -> HookPoints {
        HookPoints {
            residual: true,
            ..Default::default()
        }
    }
    fn residual(
        &self,
        layer: usize,
        _g: &HookGroup<'_>,
        h: &Tensor,
    ) -> models::Result<Option<Tensor>> {
        Ok((layer == self.layer).then(|| (h + self.amount).expect("add")))
    }
}

/// Exits every row after `layer`, as `Exit::Propagate` or `Exit::Skip` say.
struct ExitAfter(usize, Exit);

impl Hook for ExitAfter {
    fn name(&self) -> &str {
        "exit"
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
        _h: &Tensor,
        _head: &OutputHead<'_>,
    ) -> models::Result<Option<Vec<Exit>>> {
        Ok((layer == self.0).then(|| vec![self.1.clone(); g.rows.len()]))
    }
}

/// Adds `x @ ones` to the q projection of layer 0 (a rank-1 adapter).
struct QDelta;

impl Hook for QDelta {
    fn name(&self) -> &str {
        "qdelta"
    }
    fn points(&self) -> HookPoints {
        HookPoints {
            linear: true,
            ..Default::default()
        }
    }
    fn targets(&self, layer: usize, p: Projection) -> bool {
        layer == 0 && p == Projection::Q
    }
    fn linear_delta(
        &self,
        _l: usize,
        _p: Projection,
        _g: &HookGroup<'_>,
        x: &Tensor,
    ) -> models::Result<Option<Tensor>> {
        let ones = Tensor::ones((x.dim(1)?, 32), x.dtype(), x.device())?;
        Ok(Some(x.matmul(&ones)?))
    }
}

fn tiny() -> TinyModel {
    TinyModel::random(tiny_config(Architecture::Llama), 11).expect("tiny")
}

fn last_logits(m: &Llama, tokens: &[u32], hooks: &[HookCall]) -> Tensor {
    let mut cache = m.new_cache();
    let mut b = [BatchRow {
        seq_id: 0,
        tokens,
        cache: &mut cache,
        hooks,
        logits: LogitsWanted::Last,
    }];
    m.forward(&mut b)
        .expect("forward")
        .remove(0)
        .expect("logits")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .max_all()
        .expect("max")
        .to_scalar()
        .expect("scalar")
}

fn batch_of_two(m: &Llama, hooks_a: &[HookCall], hooks_b: &[HookCall]) -> (Tensor, Tensor) {
    let (ta, tb) = ([3u32, 8, 13, 21], [34u32, 55]);
    let (mut ca, mut cb) = (m.new_cache(), m.new_cache());
    let mut batch = [
        BatchRow {
            seq_id: 1,
            tokens: &ta,
            cache: &mut ca,
            hooks: hooks_a,
            logits: LogitsWanted::Last,
        },
        BatchRow {
            seq_id: 2,
            tokens: &tb,
            cache: &mut cb,
            hooks: hooks_b,
            logits: LogitsWanted::Last,
        },
    ];
    let mut out = m.forward(&mut batch).expect("forward");
    (out.remove(0).expect("a"), out.remove(0).expect("b"))
}

#[test]
fn hooks_change_only_the_rows_that_use_them() {
    let m = tiny().build(MAX_POS).expect("build");
    let hooks: [(&str, Arc<dyn Hook>); 2] = [
        (
            "residual",
            Arc::new(AddAfterLayer {
                layer: 0,
                amount: 0.5,
            }),
        ),
        ("linear", Arc::new(QDelta)),
    ];
    for (what, hook) in hooks {
        let chain = [HookCall::bare(hook)];
        let (a, b) = batch_of_two(&m, &chain, &[]);
        let a_alone = last_logits(&m, &[3, 8, 13, 21], &chain);
        let a_plain = last_logits(&m, &[3, 8, 13, 21], &[]);
        let b_alone = last_logits(&m, &[34, 55], &[]);
        assert!(
            max_diff(&a, &a_alone) < 1e-4,
            "{what}: hooked row differs from itself alone"
        );
        assert!(max_diff(&a, &a_plain) > 1e-3, "{what}: hook had no effect");
        assert!(
            max_diff(&b, &b_alone) < 1e-4,
            "{what}: hook leaked into another row"
        );
    }
}

#[test]
fn residual_hooks_compose_in_chain_order() {
    let m = tiny().build(MAX_POS).expect("build");
    let one = HookCall::bare(Arc::new(AddAfterLayer {
        layer: 1,
        amount: 0.25,
    }));
    let two = HookCall::bare(Arc::new(AddAfterLayer {
        layer: 1,
        amount: 0.25,
    }));
    let both = last_logits(&m, &[1, 2, 3], &[one.clone(), two]);
    let once = HookCall::bare(Arc::new(AddAfterLayer {
        layer: 1,
        amount: 0.5,
    }));
    assert!(max_diff(&both, &last_logits(&m, &[1, 2, 3], &[once])) < 1e-5);
    assert!(max_diff(&both, &last_logits(&m, &[1, 2, 3], &[one])) > 1e-3);
}

#[test]
fn early_exit_takes_logits_from_the_exit_layer_and_keeps_the_cache_whole() {
    let full = tiny();
    let m = full.build(MAX_POS).expect("build");
    // The same weights truncated to layer 0 give what exiting after layer 0 must give.
    let mut short = full.clone();
    short.config.num_layers = 1;
    let short = short.build(MAX_POS).expect("short");
    let exit = [HookCall::bare(Arc::new(ExitAfter(0, Exit::Propagate)))];
    let toks = [5u32, 6, 7];
    assert!(
        max_diff(
            &last_logits(&m, &toks, &exit),
            &last_logits(&short, &toks, &[])
        ) < 1e-5
    );

    // After exiting, a later full step must find layer 1's cache filled for every position.
    let mut cache = m.new_cache();
    let mut b = [BatchRow {
        seq_id: 0,
        tokens: &toks,
        cache: &mut cache,
        hooks: &exit,
        logits: LogitsWanted::Last,
    }];
    m.forward(&mut b).expect("exit step");
    let mut b = [BatchRow {
        seq_id: 0,
        tokens: &[9],
        cache: &mut cache,
        hooks: &[],
        logits: LogitsWanted::Last,
    }];
    let next = m
        .forward(&mut b)
        .expect("next step")
        .remove(0)
        .expect("logits");
    assert_eq!(cache.len(), 4);
    assert_eq!(next.dims(), &[1, 96]);
    assert_eq!(cache.layer_positions(1), vec![0, 1, 2, 3]);
    let _ = Device::Cpu;
}

/// The top token of `logits`' last row.
fn top(logits: &Tensor) -> u32 {
    let last = logits.dim(0).expect("dim") - 1;
    logits
        .get(last)
        .expect("row")
        .argmax(0)
        .expect("argmax")
        .to_scalar()
        .expect("top")
}

#[test]
fn a_checked_exit_leaves_only_when_the_layers_top_token_is_a_candidate() {
    let full = tiny();
    let m = full.build(MAX_POS).expect("build");
    let mut short = full.clone();
    short.config.num_layers = 1;
    let short = short.build(MAX_POS).expect("short");
    let (ta, tb) = ([3u32, 8, 13, 21], [34u32, 55]);
    let (early_a, early_b) = (last_logits(&short, &ta, &[]), last_logits(&short, &tb, &[]));
    let (full_a, full_b) = (last_logits(&m, &ta, &[]), last_logits(&m, &tb, &[]));
    assert!(max_diff(&early_a, &full_a) > 1e-3, "the layers must differ");
    let check = |candidates: Vec<u32>| {
        [HookCall::bare(Arc::new(ExitAfter(
            0,
            Exit::IfTopIn(candidates),
        )))]
    };
    let (hit, miss) = (top(&early_a), (top(&early_b) + 1) % 96);
    // Alone: a confirmed check gives the exit layer's logits, a refused one the full model's.
    assert!(max_diff(&last_logits(&m, &ta, &check(vec![7, hit])), &early_a) < 1e-5);
    assert!(max_diff(&last_logits(&m, &tb, &check(vec![miss])), &full_b) < 1e-5);
    // In one batch each row gets what it gets alone.
    let (a, b) = batch_of_two(&m, &check(vec![hit]), &check(vec![miss]));
    assert!(max_diff(&a, &early_a) < 1e-5 && max_diff(&b, &full_b) < 1e-5);
    // A confirmed exit keeps the cache whole, like `Exit::Propagate`.
    let mut cache = m.new_cache();
    let hooks = check(vec![hit]);
    let mut b = [BatchRow {
        seq_id: 0,
        tokens: &ta,
        cache: &mut cache,
        hooks: &hooks,
        logits: LogitsWanted::Last,
    }];
    m.forward(&mut b).expect("exit step");
    assert_eq!(cache.layer_positions(1), vec![0, 1, 2, 3]);
}

#[test]
fn a_skipping_exit_leaves_the_later_layers_without_the_rows_keys() {
    let m = tiny().build(MAX_POS).expect("build");
    let skip = [HookCall::bare(Arc::new(ExitAfter(0, Exit::Skip)))];
    let mut cache = m.new_cache();
    for (tokens, hooks) in [(&[5u32, 6, 7][..], &[][..]), (&[8, 9], &skip), (&[10], &[])] {
        let mut b = [BatchRow {
            seq_id: 0,
            tokens,
            cache: &mut cache,
            hooks,
            logits: LogitsWanted::Last,
        }];
        m.forward(&mut b).expect("step");
    }
    assert_eq!(cache.len(), 6);
    assert_eq!(cache.layer_positions(0), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(cache.layer_positions(1), vec![0, 1, 2, 5]);
    // Layer 1's keys are those of a sequence that never had positions 3 and 4 there: the
    // first three are the prompt's, untouched.
    let mut plain = m.new_cache();
    let mut b = [BatchRow {
        seq_id: 0,
        tokens: &[5, 6, 7],
        cache: &mut plain,
        hooks: &[],
        logits: LogitsWanted::None,
    }];
    m.forward(&mut b).expect("prompt");
    let (k, _) = cache.layer_kv(1).expect("read").expect("written");
    let (k_plain, _) = plain.layer_kv(1).expect("read").expect("written");
    assert_eq!(
        k.narrow(1, 0, 3)
            .expect("narrow")
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("v"),
        k_plain
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("v")
    );
}

/// `LogitsWanted::Hidden` gives every position's final-norm hidden state: the LM head applied
/// to them is the logits `LogitsWanted::All` gives, in one prefill or in chunks.
#[test]
fn hidden_states_are_what_the_lm_head_reads() {
    let m = tiny().build(64).unwrap();
    let prompt: Vec<u32> = (0..9).map(|i| (i * 7 + 3) % 90).collect();
    let run = |chunks: &[usize], wanted: LogitsWanted| -> Vec<Tensor> {
        let mut cache = m.new_cache();
        let (mut at, mut out) = (0, Vec::new());
        for &c in chunks {
            let tokens = &prompt[at..at + c];
            out.push(models::testing::step(&m, &mut cache, tokens, &[], wanted).unwrap());
            at += c;
        }
        out
    };
    let hidden = Tensor::cat(&run(&[4, 5], LogitsWanted::Hidden), 0).unwrap();
    assert_eq!(hidden.dims(), &[9, m.config.hidden_size]);
    let logits = run(&[9], LogitsWanted::All).remove(0);
    let head = m.output_head();
    let ids: Vec<u32> = (0..m.config.vocab_size as u32).collect();
    let rows = Tensor::from_vec(
        head.token_rows(&ids).unwrap(),
        (ids.len(), m.config.hidden_size),
        &Device::Cpu,
    )
    .unwrap();
    let from_hidden = hidden.matmul(&rows.t().unwrap()).unwrap();
    let diff = (from_hidden - logits)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-3, "{diff}");
}

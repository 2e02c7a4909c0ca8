use std::sync::Arc;

use candle_core::{Device, Tensor};
use models::hooks::HookPoints;
use models::tiny::tiny_config;
use models::{Architecture, Hook, HookCall, KvCache, KvDtype, PrefixReuse};

use super::*;

/// A cache whose keys and values at each position are that position's token.
fn cache_of(tokens: &[u32]) -> KvCache {
    let cfg = tiny_config(Architecture::Llama);
    let mut cache = KvCache::new(&cfg, KvDtype::F32, &Device::Cpu);
    let width = cfg.num_kv_heads * cfg.head_dim;
    let values: Vec<f32> = tokens
        .iter()
        .flat_map(|&t| std::iter::repeat_n(t as f32, width))
        .collect();
    let kv = Tensor::from_vec(
        values,
        (tokens.len(), cfg.num_kv_heads, cfg.head_dim),
        &Device::Cpu,
    )
    .and_then(|t| t.transpose(0, 1))
    .expect("kv");
    for layer in 0..cfg.num_layers {
        cache.append(layer, &kv, &kv).expect("append");
    }
    cache.commit(tokens.len());
    cache
}

/// The token each position of a cache's first layer holds.
fn held_tokens(cache: &KvCache) -> Vec<u32> {
    let (k, _) = cache.layer_kv(0).expect("read").expect("layer 0");
    let k = k
        .narrow(0, 0, 1)
        .and_then(|k| k.flatten_all())
        .expect("head 0");
    let head_dim = tiny_config(Architecture::Llama).head_dim;
    let values: Vec<f32> = k.to_vec1().expect("values");
    values.chunks(head_dim).map(|c| c[0] as u32).collect()
}

fn seq(range: std::ops::Range<u32>) -> Vec<u32> {
    range.collect()
}

/// How many of `prompt`'s first `limit` tokens a kept prefix covers (0: none).
fn matched(store: &PrefixCache, key: &ChainKey, prompt: &[u32], limit: usize) -> usize {
    store.find(key, prompt, limit).map_or(0, |f| f.tokens)
}

/// A copy of the longest kept prefix, if any.
fn take(
    store: &mut PrefixCache,
    key: &ChainKey,
    prompt: &[u32],
    limit: usize,
) -> Option<PrefixHit> {
    let found = store.find(key, prompt, limit)?;
    store.take(found).expect("copy")
}

fn base_key() -> ChainKey {
    ChainKey::of(&[]).expect("the base chain is reusable")
}

#[test]
fn a_prompt_reuses_the_longest_kept_prefix_to_the_token() {
    let mut store = PrefixCache::default();
    let a = seq(0..40);
    let b: Vec<u32> = seq(0..20).into_iter().chain(100..120).collect();
    store.insert(base_key(), a.clone(), cache_of(&a));
    store.insert(base_key(), b.clone(), cache_of(&b));
    assert_eq!(store.len(), 2);

    let prompt: Vec<u32> = seq(0..35).into_iter().chain([7, 7, 7]).collect();
    let hit = take(&mut store, &base_key(), &prompt, prompt.len() - 1).expect("hit");
    assert_eq!(hit.tokens, 35);
    assert_eq!(hit.cache.len(), 35);
    assert_eq!(held_tokens(&hit.cache), seq(0..35));

    let prompt: Vec<u32> = seq(0..20).into_iter().chain(100..110).chain([1]).collect();
    assert_eq!(matched(&store, &base_key(), &prompt, prompt.len() - 1), 30);
    // The limit keeps the last prompt token to be fed (its logits start the answer).
    assert_eq!(matched(&store, &base_key(), &a, a.len() - 1), 39);
    // Less than one block in common is no hit.
    let short: Vec<u32> = seq(0..15).into_iter().chain([99; 20]).collect();
    assert_eq!(matched(&store, &base_key(), &short, short.len() - 1), 0);
}

#[test]
fn a_hit_is_a_copy_that_leaves_the_entry_intact() {
    let mut store = PrefixCache::default();
    let a = seq(0..40);
    store.insert(base_key(), a.clone(), cache_of(&a));
    let mut hit = take(&mut store, &base_key(), &a, 39).expect("hit");
    hit.cache.truncate(5).expect("truncate");
    let again = take(&mut store, &base_key(), &a, 39).expect("hit");
    assert_eq!(held_tokens(&again.cache), seq(0..39));
}

#[test]
fn kept_prefixes_that_a_longer_one_covers_are_replaced() {
    let mut store = PrefixCache::default();
    let turn1 = seq(0..40);
    let turn2 = seq(0..70);
    store.insert(base_key(), turn1.clone(), cache_of(&turn1));
    store.insert(base_key(), turn2.clone(), cache_of(&turn2));
    assert_eq!(store.len(), 1, "the first turn is a prefix of the second");
    let bytes = store.bytes();
    // A prefix of what is kept adds nothing.
    store.insert(base_key(), turn1.clone(), cache_of(&turn1));
    assert_eq!((store.len(), store.bytes()), (1, bytes));
    assert_eq!(matched(&store, &base_key(), &turn2, 69), 69);
}

#[test]
fn the_least_recently_used_entries_go_first() {
    let mut store = PrefixCache::default();
    let prompts: Vec<Vec<u32>> = (0..3u32).map(|i| seq(i * 100..i * 100 + 32)).collect();
    for p in &prompts {
        store.insert(base_key(), p.clone(), cache_of(p));
    }
    let each = store.bytes() / 3;
    assert!(take(&mut store, &base_key(), &prompts[0], 31).is_some());
    store.evict_to(2 * each);
    assert_eq!(store.len(), 2);
    assert_eq!(
        matched(&store, &base_key(), &prompts[1], 31),
        0,
        "oldest unused"
    );
    assert_eq!(matched(&store, &base_key(), &prompts[0], 31), 31);
    assert_eq!(matched(&store, &base_key(), &prompts[2], 31), 31);
    store.evict_to(0);
    assert_eq!((store.len(), store.bytes()), (0, 0));
}

/// A hook that answers `prefix_reuse` as told and does nothing else.
struct Declares(PrefixReuse);

impl Hook for Declares {
    fn name(&self) -> &str {
        "declares"
    }

    fn points(&self) -> HookPoints {
        HookPoints::default()
    }

    fn prefix_reuse(&self, _params: &models::hooks::HookParams) -> PrefixReuse {
        self.0.clone()
    }
}

fn call(hook: &Arc<dyn Hook>) -> HookCall {
    HookCall::bare(hook.clone())
}

#[test]
fn prefixes_are_reused_only_under_the_same_keyed_hooks() {
    let adapter: Arc<dyn Hook> = Arc::new(Declares(PrefixReuse::Keyed("scale=1".into())));
    let other_scale: Arc<dyn Hook> = Arc::new(Declares(PrefixReuse::Keyed("scale=0.5".into())));
    let drafter: Arc<dyn Hook> = Arc::new(Declares(PrefixReuse::Neutral));
    let never: Arc<dyn Hook> = Arc::new(Declares(PrefixReuse::Never));
    let key = |chain: &[HookCall]| ChainKey::of(chain);

    let mut store = PrefixCache::default();
    let a = seq(0..40);
    let adapted = key(&[call(&adapter)]).expect("keyed");
    store.insert(adapted.clone(), a.clone(), cache_of(&a));

    assert_eq!(matched(&store, &adapted, &a, 39), 39);
    assert_eq!(
        matched(&store, &base_key(), &a, 39),
        0,
        "not by the base model"
    );
    let other = key(&[call(&other_scale)]).expect("keyed");
    assert_eq!(
        matched(&store, &other, &a, 39),
        0,
        "not by other parameters"
    );
    let with_drafter = key(&[call(&drafter), call(&adapter)]).expect("keyed");
    assert_eq!(
        matched(&store, &with_drafter, &a, 39),
        39,
        "a neutral hook is left out"
    );
    let twice = key(&[call(&adapter), call(&adapter)]).expect("keyed");
    assert_eq!(
        matched(&store, &twice, &a, 39),
        0,
        "the same hook twice is another chain"
    );
    assert!(key(&[call(&adapter), call(&never)]).is_none());

    // The same parameters on another loaded object (a plug-in replaced under its name).
    let reloaded: Arc<dyn Hook> = Arc::new(Declares(PrefixReuse::Keyed("scale=1".into())));
    let reloaded = key(&[call(&reloaded)]).expect("keyed");
    assert_eq!(matched(&store, &reloaded, &a, 39), 0);
}

#[test]
fn a_prompt_only_hook_is_marked() {
    let exit: Arc<dyn Hook> = Arc::new(Declares(PrefixReuse::PromptOnly(String::new())));
    let adapter: Arc<dyn Hook> = Arc::new(Declares(PrefixReuse::Keyed(String::new())));
    assert!(ChainKey::of(&[call(&exit)]).expect("keyed").prompt_only());
    assert!(!ChainKey::of(&[call(&adapter)])
        .expect("keyed")
        .prompt_only());
}

#[test]
fn a_kept_prefix_does_not_keep_its_plug_in_loaded() {
    let adapter: Arc<dyn Hook> = Arc::new(Declares(PrefixReuse::Keyed(String::new())));
    let mut store = PrefixCache::default();
    let a = seq(0..40);
    let key = ChainKey::of(&[call(&adapter)]).expect("keyed");
    store.insert(key.clone(), a.clone(), cache_of(&a));
    assert_eq!(Arc::strong_count(&adapter), 1, "only the test holds it");
    assert_eq!(matched(&store, &key, &a, 39), 39);
    drop(adapter);
    store.evict_to(usize::MAX);
    assert_eq!(
        store.len(),
        0,
        "the unloaded plug-in's prefixes are dropped"
    );
}

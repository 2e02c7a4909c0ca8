use super::*;
use crate::config::{Architecture, RopeScaling};

fn cfg() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        hidden_size: 8,
        intermediate_size: 16,
        num_layers: 2,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 2,
        vocab_size: 10,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 1024,
        tie_word_embeddings: true,
        attention_bias: false,
    }
}

fn kv(values: &[f32]) -> Tensor {
    Tensor::from_vec(values.to_vec(), (1, values.len() / 2, 2), &Device::Cpu).expect("tensor")
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().and_then(|t| t.to_vec1()).expect("values")
}

/// Appends `n` positions whose keys and values are `base + position` to the given layers.
fn feed(cache: &mut KvCache, layers: &[usize], n: usize, base: f32) -> Result<()> {
    let start = cache.len();
    let values: Vec<f32> = (start..start + n)
        .flat_map(|p| [base + p as f32; 2])
        .collect();
    for &l in layers {
        cache.append(l, &kv(&values), &kv(&values))?;
    }
    cache.commit(n);
    Ok(())
}

fn keys(cache: &mut KvCache, layer: usize) -> Result<(Vec<f32>, Option<Vec<u32>>)> {
    // An empty append reads the layer back without adding anything.
    let view = cache.append(layer, &kv(&[]), &kv(&[]))?;
    Ok((flat(&view.k), view.positions.map(<[u32]>::to_vec)))
}

#[test]
fn appends_accumulate_across_growth() -> Result<()> {
    let mut cache = KvCache::new(&cfg(), KvDtype::F32, &Device::Cpu);
    let first: Vec<f32> = (0..2 * 60).map(|i| i as f32).collect();
    for layer in 0..2 {
        cache.append(layer, &kv(&first), &kv(&first))?;
    }
    cache.commit(60);
    // 60 + 10 positions exceed the first allocation of 64 and force a copy.
    let second: Vec<f32> = (0..2 * 10).map(|i| 1000.0 + i as f32).collect();
    let view = cache.append(1, &kv(&second), &kv(&second))?;
    assert_eq!(view.k.dims(), &[1, 70, 2]);
    assert_eq!(view.positions, None);
    let all = flat(&view.k);
    assert_eq!(&all[..120], &first[..]);
    assert_eq!(&all[120..], &second[..]);
    assert!(cache.allocated_bytes() >= 2 * 2 * 70 * 2 * 4);
    Ok(())
}

#[test]
fn uncommitted_positions_are_overwritten() -> Result<()> {
    let mut cache = KvCache::new(&cfg(), KvDtype::F32, &Device::Cpu);
    cache.append(0, &kv(&[1., 2.]), &kv(&[1., 2.]))?;
    let view = cache.append(0, &kv(&[3., 4.]), &kv(&[3., 4.]))?;
    assert_eq!(flat(&view.k), vec![3., 4.]);
    assert_eq!(cache.len(), 0);
    Ok(())
}

#[test]
fn a_failed_step_leaves_nothing_for_a_layer_the_next_step_skips() -> Result<()> {
    let mut cache = KvCache::new(&cfg(), KvDtype::F32, &Device::Cpu);
    feed(&mut cache, &[0, 1], 2, 0.0)?;
    // A step writes layer 1 and fails before committing.
    cache.append(1, &kv(&[9., 9.]), &kv(&[9., 9.]))?;
    cache.discard_pending();
    // The next step skips layer 1.
    feed(&mut cache, &[0], 1, 0.0)?;
    assert_eq!(cache.layer_len(1), 2);
    assert_eq!(cache.layer_positions(1), vec![0, 1]);
    Ok(())
}

#[test]
fn a_layer_that_tokens_skipped_records_its_positions() -> Result<()> {
    let mut cache = KvCache::new(&cfg(), KvDtype::F32, &Device::Cpu);
    feed(&mut cache, &[0, 1], 3, 0.0)?;
    feed(&mut cache, &[0], 2, 0.0)?; // positions 3 and 4 leave layer 1 out
    feed(&mut cache, &[0, 1], 1, 0.0)?; // position 5 is everywhere again
    assert_eq!(cache.len(), 6);
    assert_eq!((cache.layer_len(0), cache.layer_len(1)), (6, 4));
    assert_eq!(cache.layer_positions(1), vec![0, 1, 2, 5]);
    let (k1, p1) = keys(&mut cache, 1)?;
    assert_eq!(k1, vec![0., 0., 1., 1., 2., 2., 5., 5.]);
    assert_eq!(p1, Some(vec![0, 1, 2, 5]));
    let (_, p0) = keys(&mut cache, 0)?;
    assert_eq!(p0, None, "a complete layer keeps the plain layout");
    Ok(())
}

#[test]
fn truncation_cuts_every_layer_back_and_refeeding_gives_the_same_cache() -> Result<()> {
    let mut cache = KvCache::new(&cfg(), KvDtype::F32, &Device::Cpu);
    feed(&mut cache, &[0, 1], 3, 0.0)?;
    feed(&mut cache, &[0], 2, 100.0)?; // drafts: 3 and 4 only in layer 0
    feed(&mut cache, &[0, 1], 1, 100.0)?;
    cache.truncate(3)?;
    assert_eq!(cache.len(), 3);
    assert_eq!((cache.layer_len(0), cache.layer_len(1)), (3, 3));
    assert_eq!(keys(&mut cache, 1)?.1, None, "back to the plain layout");
    feed(&mut cache, &[0, 1], 3, 0.0)?;
    let mut never = KvCache::new(&cfg(), KvDtype::F32, &Device::Cpu);
    feed(&mut never, &[0, 1], 6, 0.0)?;
    for l in 0..2 {
        assert_eq!(keys(&mut cache, l)?, keys(&mut never, l)?, "layer {l}");
    }
    // Truncating past the end changes nothing.
    cache.truncate(100)?;
    assert_eq!(cache.len(), 6);
    Ok(())
}

#[test]
fn a_fork_is_an_independent_copy() -> Result<()> {
    let mut cache = KvCache::new(&cfg(), KvDtype::F32, &Device::Cpu);
    feed(&mut cache, &[0, 1], 3, 0.0)?;
    feed(&mut cache, &[0], 1, 0.0)?;
    let mut fork = cache.fork()?;
    assert_eq!(fork.len(), 4);
    assert_eq!(fork.allocated_bytes(), cache.allocated_bytes());
    feed(&mut fork, &[0, 1], 1, 50.0)?;
    feed(&mut cache, &[0, 1], 1, 70.0)?;
    let (k_fork, p_fork) = keys(&mut fork, 1)?;
    let (k_orig, _) = keys(&mut cache, 1)?;
    assert_eq!(k_fork, vec![0., 0., 1., 1., 2., 2., 54., 54.]);
    assert_eq!(p_fork, Some(vec![0, 1, 2, 4]));
    assert_eq!(k_orig, vec![0., 0., 1., 1., 2., 2., 74., 74.]);
    Ok(())
}

#[test]
fn a_prefix_fork_holds_the_first_positions_and_grows_like_a_fresh_cache() -> Result<()> {
    let mut cache = KvCache::new(&cfg(), KvDtype::F32, &Device::Cpu);
    feed(&mut cache, &[0, 1], 3, 0.0)?;
    feed(&mut cache, &[0], 2, 0.0)?; // positions 3 and 4 leave layer 1 out
    feed(&mut cache, &[0, 1], 2, 0.0)?;
    let mut prefix = cache.fork_prefix(4)?;
    assert_eq!(prefix.len(), 4);
    assert_eq!((prefix.layer_len(0), prefix.layer_len(1)), (4, 3));
    assert_eq!(prefix.layer_positions(1), vec![0, 1, 2]);
    // Sized for what it holds, not for the source's allocation.
    let per_layer = 2 * MIN_CAPACITY * 2 * 4;
    assert_eq!(prefix.allocated_bytes(), 2 * per_layer);
    // The rest of the tokens fed to the prefix give what they give to one fed from scratch
    // the same way.
    feed(&mut prefix, &[0, 1], 3, 0.0)?;
    let mut scratch = KvCache::new(&cfg(), KvDtype::F32, &Device::Cpu);
    feed(&mut scratch, &[0, 1], 3, 0.0)?;
    feed(&mut scratch, &[0], 1, 0.0)?;
    feed(&mut scratch, &[0, 1], 3, 0.0)?;
    for l in 0..2 {
        assert_eq!(keys(&mut prefix, l)?, keys(&mut scratch, l)?, "layer {l}");
    }
    // The source is untouched, and a prefix past its end is all of it.
    assert_eq!(cache.len(), 7);
    assert_eq!(cache.fork_prefix(100)?.len(), 7);
    Ok(())
}

/// A step whose later layer keeps some tokens only (a pruning hook): that layer records the
/// kept positions, the sequence still grows by every token, and truncation and a forked
/// prefix cut it by position.
#[test]
fn appending_at_some_positions_records_them() -> Result<()> {
    let mut cache = KvCache::new(&cfg(), KvDtype::F32, &Device::Cpu);
    let all: Vec<f32> = (0..6).flat_map(|p| [p as f32; 2]).collect();
    cache.append(0, &kv(&all), &kv(&all))?;
    let kept: Vec<f32> = [0.0f32, 3.0, 5.0].iter().flat_map(|&p| [p; 2]).collect();
    cache.append_at(1, &kv(&kept), &kv(&kept), Some(&[0, 3, 5]))?;
    cache.commit(6);
    assert_eq!(cache.len(), 6);
    assert_eq!(cache.layer_positions(0), (0..6).collect::<Vec<u32>>());
    assert_eq!(cache.layer_positions(1), vec![0, 3, 5]);
    feed(&mut cache, &[0, 1], 1, 0.0)?;
    assert_eq!(cache.layer_positions(1), vec![0, 3, 5, 6]);
    assert_eq!(cache.fork_prefix(4)?.layer_positions(1), vec![0, 3]);
    cache.truncate(5)?;
    assert_eq!(cache.layer_positions(1), vec![0, 3]);
    // Positions that are not ascending, or fewer than the new slots, are refused.
    for bad in [&[6u32, 5][..], &[5, 6, 7][..], &[1, 6][..]] {
        let two: Vec<f32> = vec![9.0; 4];
        assert!(
            cache.append_at(1, &kv(&two), &kv(&two), Some(bad)).is_err(),
            "{bad:?}"
        );
    }
    // Every position of the step, listed, is the plain layout.
    let mut plain = KvCache::new(&cfg(), KvDtype::F32, &Device::Cpu);
    plain.append_at(0, &kv(&all), &kv(&all), Some(&[0, 1, 2, 3, 4, 5]))?;
    plain.commit(6);
    assert_eq!(keys(&mut plain, 0)?.1, None);
    Ok(())
}

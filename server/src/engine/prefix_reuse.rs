//! Where the engine thread meets the prefix cache: newly admitted sequences start from the
//! longest prefix that a kept entry or a running sequence holds, and ended sequences leave
//! their caches behind.

use std::ops::Range;

use super::prefix_cache::PrefixCache;
use super::sequence::Sequence;
use super::step_metrics::PrefixCacheCounters;

/// Starts each sequence of `running[admitted]` that has not fed anything from the longest
/// prefix of its prompt held by the prefix cache or by another running sequence (whose
/// committed positions are as good as a kept entry's). A copy that fails leaves the sequence
/// to prefill from scratch.
pub(crate) fn reuse_prefixes(
    store: &mut PrefixCache,
    running: &mut [Sequence],
    admitted: Range<usize>,
    counters: &PrefixCacheCounters,
) {
    for index in admitted {
        let Some((key, prompt, limit)) = running.get(index).and_then(Sequence::prefix_query) else {
            continue;
        };
        let (key, prompt) = (key.clone(), prompt.to_vec());
        let kept = store.find(&key, &prompt, limit);
        let donor = running
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != index)
            .map(|(i, seq)| (i, seq.shared_prefix(&key, &prompt, limit)))
            .max_by_key(|&(_, n)| n)
            .filter(|&(_, n)| n > kept.map_or(0, |f| f.tokens));
        let copy = match (donor, kept) {
            (Some((i, n)), _) => running[i].copy_prefix(n).map(|cache| Some((cache, n))),
            (None, Some(found)) => store
                .take(found)
                .map(|hit| hit.map(|h| (h.cache, h.tokens))),
            (None, None) => Ok(None),
        };
        let hit = match copy {
            Ok(hit) => hit,
            Err(error) => {
                tracing::warn!(%error, "could not copy a cached prefix; prefilling instead");
                None
            }
        };
        let reused = hit.as_ref().map_or(0, |(_, n)| *n);
        counters.record(prompt.len(), reused);
        if let (Some((cache, tokens)), Some(seq)) = (hit, running.get_mut(index)) {
            if let Err(error) = seq.start_from_prefix(cache, tokens) {
                seq.fail(error);
            }
        }
    }
}

/// Keeps what ended sequences (finished or cancelled, not failed) may leave for later
/// requests, then evicts down to `room` bytes.
pub(crate) fn keep_prefixes(store: &mut PrefixCache, ended: Vec<Sequence>, room: usize) {
    for seq in ended {
        if let Some((key, tokens, cache)) = seq.into_kept_prefix() {
            store.insert(key, tokens, cache);
        }
    }
    store.evict_to(room);
}

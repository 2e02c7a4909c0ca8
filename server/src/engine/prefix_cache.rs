//! Automatic prefix caching: the KV caches of finished sequences, kept by a hash of their token
//! prefix, so a later request that starts with the same tokens (the next turn of a chat, a
//! shared system prompt, the same few-shot examples) skips prefilling them.
//!
//! A finished sequence's cache moves here whole (no copy); a hit copies the matched positions
//! into the new sequence's own cache ([`KvCache::fork_prefix`]), so entries are never shared
//! or written to and a hit cannot disturb the entry or another request. Entries are looked up
//! in blocks of [`BLOCK_TOKENS`] tokens: block `i` of a token sequence is known by a hash of
//! the chain's key and tokens `0..(i + 1) * BLOCK_TOKENS` (vLLM's chained block hashes), so a
//! lookup walks the prompt's blocks while some entry holds each; the tokens are then compared
//! (no hash is trusted) and the match extends token by token into the next block.
//!
//! What a prefix holds depends on the plug-in chain that computed it: a prefix is reused only
//! by requests whose chain has the same [`ChainKey`] (see [`models::PrefixReuse`]).
//!
//! Entries count against the engine's KV budget: the worker evicts the least recently used
//! until the running sequences' claims, the next admission's and the entries fit
//! ([`PrefixCache::evict_to`]).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Weak};

use models::{Hook, HookCall, KvCache, PrefixReuse};

/// Tokens per hashed block: prefixes shorter than one block are not reused.
pub const BLOCK_TOKENS: usize = 16;

/// What a prefix computed under a chain may be reused by: the chain's hooks that are not
/// [`PrefixReuse::Neutral`], in order, each with its key. Holds weak references to the hooks:
/// a kept prefix does not keep a plug-in resident (the registry evicts plug-ins nobody
/// uses), yet the allocation behind a weak reference stays reserved, so no other plug-in can
/// take the address in the key while the entry lives.
#[derive(Clone)]
pub(crate) struct ChainKey {
    parts: Vec<(usize, PrefixReuse)>,
    hooks: Vec<Weak<dyn Hook>>,
}

impl ChainKey {
    /// The key of a chain, or `None` when a hook never allows reuse.
    pub fn of(chain: &[HookCall]) -> Option<Self> {
        let mut key = Self {
            parts: Vec::new(),
            hooks: Vec::new(),
        };
        for call in chain {
            match call.hook.prefix_reuse(&call.params) {
                PrefixReuse::Never => return None,
                PrefixReuse::Neutral => {}
                reuse => {
                    let address = Arc::as_ptr(&call.hook) as *const () as usize;
                    key.parts.push((address, reuse));
                    key.hooks.push(Arc::downgrade(&call.hook));
                }
            }
        }
        Some(key)
    }

    /// Whether only prompt positions may be kept (a hook changes what decode steps leave).
    pub fn prompt_only(&self) -> bool {
        self.parts
            .iter()
            .any(|(_, r)| matches!(r, PrefixReuse::PromptOnly(_)))
    }

    /// Whether every hook of the key is still loaded; a prefix under an unloaded plug-in can
    /// never be reused (a reload is another object).
    fn is_live(&self) -> bool {
        self.hooks.iter().all(|h| h.strong_count() > 0)
    }

    fn seed(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.parts.hash(&mut h);
        h.finish()
    }
}

impl PartialEq for ChainKey {
    fn eq(&self, other: &Self) -> bool {
        self.parts == other.parts
    }
}

/// The chained hash of every whole block of `tokens` under `key`.
fn block_hashes(key: &ChainKey, tokens: &[u32]) -> Vec<u64> {
    let mut previous = key.seed();
    tokens
        .chunks_exact(BLOCK_TOKENS)
        .map(|block| {
            let mut h = DefaultHasher::new();
            previous.hash(&mut h);
            block.hash(&mut h);
            previous = h.finish();
            previous
        })
        .collect()
}

/// Tokens two sequences share from the start.
pub(crate) fn common_prefix<'a>(a: impl IntoIterator<Item = &'a u32>, b: &[u32]) -> usize {
    a.into_iter().zip(b).take_while(|(x, y)| x == y).count()
}

struct Entry {
    key: ChainKey,
    /// The tokens whose keys and values `cache` holds, position by position.
    tokens: Vec<u32>,
    cache: KvCache,
    hashes: Vec<u64>,
    bytes: usize,
    last_used: u64,
}

/// A kept prefix that matches a prompt: which entry, and how many tokens it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Found {
    entry: u64,
    pub tokens: usize,
}

/// A prefix found for a prompt: a copy of its cache, and how many tokens it covers.
pub(crate) struct PrefixHit {
    pub cache: KvCache,
    pub tokens: usize,
}

/// The kept prefixes. Owned by the engine thread.
#[derive(Default)]
pub(crate) struct PrefixCache {
    entries: HashMap<u64, Entry>,
    /// Block hash to the entries holding that block.
    index: HashMap<u64, Vec<u64>>,
    next_id: u64,
    clock: u64,
    bytes: usize,
}

impl PrefixCache {
    /// Bytes the entries hold.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The longest kept prefix of `prompt[..limit]` under `key`, at least one block long.
    /// Hashes are chained, so the entries holding the deepest block the prompt shares include
    /// every entry that shares more of it; among those the tokens decide.
    pub fn find(&self, key: &ChainKey, prompt: &[u32], limit: usize) -> Option<Found> {
        let usable = &prompt[..limit.min(prompt.len())];
        let mut deepest = None;
        for hash in block_hashes(key, usable) {
            match self.index.get(&hash) {
                Some(ids) => deepest = Some(ids),
                None => break,
            }
        }
        deepest?
            .iter()
            .filter_map(|id| {
                let e = self.entries.get(id)?;
                let tokens = common_prefix(&e.tokens, usable);
                (e.key == *key).then_some(Found { entry: *id, tokens })
            })
            .max_by_key(|f| f.tokens)
            .filter(|f| f.tokens >= BLOCK_TOKENS)
    }

    /// A copy of a prefix [`PrefixCache::find`] found; marks its entry used. `Ok(None)` if
    /// the entry is gone; `Err` if the copy cannot be made (the request then starts from
    /// scratch).
    pub fn take(&mut self, found: Found) -> models::Result<Option<PrefixHit>> {
        self.clock += 1;
        let Some(entry) = self.entries.get_mut(&found.entry) else {
            return Ok(None);
        };
        entry.last_used = self.clock;
        let cache = entry.cache.fork_prefix(found.tokens)?;
        Ok(Some(PrefixHit {
            cache,
            tokens: found.tokens,
        }))
    }

    /// Keeps `cache`, which holds `tokens`, for requests with `key`. An entry whose tokens
    /// start with all of these makes the new one redundant; entries whose tokens are a prefix
    /// of these are replaced by it.
    pub fn insert(&mut self, key: ChainKey, tokens: Vec<u32>, cache: KvCache) {
        if tokens.len() < BLOCK_TOKENS || cache.len() != tokens.len() {
            return;
        }
        let hashes = block_hashes(&key, &tokens);
        self.clock += 1;
        let covered_by = hashes
            .last()
            .and_then(|h| self.index.get(h))
            .and_then(|ids| {
                ids.iter().copied().find(|id| {
                    self.entries
                        .get(id)
                        .is_some_and(|e| e.key == key && e.tokens.starts_with(&tokens))
                })
            });
        if let Some(e) = covered_by.and_then(|id| self.entries.get_mut(&id)) {
            e.last_used = self.clock;
            return;
        }
        for id in self.prefixes_of(&key, &tokens, &hashes) {
            self.remove(id);
        }
        self.next_id += 1;
        let id = self.next_id;
        for h in &hashes {
            self.index.entry(*h).or_default().push(id);
        }
        let bytes = cache.allocated_bytes();
        self.bytes += bytes;
        self.entries.insert(
            id,
            Entry {
                key,
                tokens,
                cache,
                hashes,
                bytes,
                last_used: self.clock,
            },
        );
    }

    /// Entries under `key` whose tokens are a proper prefix of `tokens`.
    fn prefixes_of(&self, key: &ChainKey, tokens: &[u32], hashes: &[u64]) -> Vec<u64> {
        let mut found = Vec::new();
        for h in hashes {
            for id in self.index.get(h).into_iter().flatten() {
                let Some(e) = self.entries.get(id) else {
                    continue;
                };
                if e.key == *key
                    && e.tokens.len() < tokens.len()
                    && tokens.starts_with(&e.tokens)
                    && !found.contains(id)
                {
                    found.push(*id);
                }
            }
        }
        found
    }

    fn remove(&mut self, id: u64) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        self.bytes -= entry.bytes;
        for h in &entry.hashes {
            if let Some(ids) = self.index.get_mut(h) {
                ids.retain(|x| *x != id);
                if ids.is_empty() {
                    self.index.remove(h);
                }
            }
        }
    }

    /// Drops the entries of unloaded plug-ins, then least recently used entries until at
    /// most `bytes` are held.
    pub fn evict_to(&mut self, bytes: usize) {
        let dead: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.key.is_live())
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.remove(id);
        }
        while self.bytes > bytes {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(id, _)| *id)
            else {
                break;
            };
            self.remove(oldest);
        }
    }
}

#[cfg(test)]
mod tests;

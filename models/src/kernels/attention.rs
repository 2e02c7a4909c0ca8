//! Scaled dot-product attention of one batch row on the CPU, straight from the KV cache.
//!
//! For each query `i` (at position `start + i`, or its own position in a pruned row) and query head `h` (reading key/value head
//! `h / group`, grouped-query attention), the kernel makes two passes over the keys the
//! query may see:
//! 1. scores `s_j = (q · k_j) / sqrt(d)` into a scratch row, and their maximum `m`;
//! 2. `p_j = exp(s_j - m)`, `Σ p_j`, and `o = Σ p_j v_j / Σ p_j`.
//!
//! This is the "safe softmax" (max-subtracted, so no `exp` overflows) of Milakov &
//! Gimelshein, "Online normalizer calculation for softmax" (arXiv 1805.02867), fused with
//! the value sum as in FlashAttention (Dao et al., arXiv 2205.14135). A row of scores is
//! only `T` floats and stays in L1, so the kernel keeps it and needs neither their one-pass
//! online normaliser nor FlashAttention's running rescale of `o`.
//! Keys and values are read in place from the `(n_kv, capacity, d)` cache through the view's
//! [`Layout`]: no copy, no transposed key matrix, no repeated key heads, no mask tensor —
//! a causal query simply stops at its last visible key.
//!
//! Block-sparse selection (SeerAttention-R, Gao et al. 2025, per key/value head): a plug-in
//! may hand the kernel, per key/value head, sorted disjoint ranges of key indices
//! ([`check_head_keys`] rejects anything else before a key is read). A query of head `h` then
//! reads only the keys of `ranges[h / group]` whose position is at most its own: with
//! ascending positions that is a prefix of each range, so the kernel walks the selected
//! ranges up to the first key the query cannot see ([`visible_segments`]) and touches no other
//! key or value — no mask over the whole row, no gathered copy. The selected keys are packed
//! into the score row in order, and the arithmetic follows a key's place in that row, not its
//! index in the cache (softmax lanes, and the even/odd accumulators of the value sum, which
//! may then start on an odd place): a selection gives the same bits as this kernel run
//! without one on the gathered keys, and selecting every key the same bits as no selection.
//! A decode row's cost scales with the keys it selects. Decode on the default model's heads
//! (`attention::tests::block_sparse_decode_timing`, medians of 15, three runs on a shared
//! 2-core AVX2 host, one thread; "cold" is 30 layers with weights streamed between them):
//!
//! | depth | every key | 1/4 of the 64-key blocks | 1/8 |
//! |---|---|---|---|
//! | T = 2048, one layer hot | 188-210 µs | 41-62 µs | 20-29 µs |
//! | T = 2048, 30 layers cold | 8.7-12.2 ms | 2.4-3.5 ms | 1.3-2.0 ms |
//! | T = 8192, one layer hot | 680-970 µs | 173-192 µs | 85-114 µs |
//! | T = 8192, 30 layers cold | 38-42 ms | 11.7-12.1 ms | 6.0-6.8 ms |
//!
//! With two threads, T = 8192 cold: 23-30 ms dense, 7.5 ms at 1/4, 3.6-3.7 ms at 1/8. Short
//! of the ideal 4x and 8x at depth because each 64-key block (16 KiB of keys) is a separate
//! stream for the prefetcher. Without a selection the kernel is as fast as before
//! (one thread, T = 2048 hot: 146-147 µs against 149-150 µs).
//!
//! Why not candle ops: for one decode row they cost a dozen small tensors, a strided `gemm`
//! call and a softmax pass per layer. On the default model at depth 512 (two threads) that
//! was about 65 µs per layer against about 10 µs here with the cache in L2, and 3.6 ms
//! against 0.8 ms per token for 30 layers read from memory; prefill chunks gain 1.5-10x
//! (`attention::tests::attention_timing`).
//!
//! Numerics: f32 throughout. The cache may hold keys and values in f16, bf16 or q8_0 blocks
//! (`--kv-cache-dtype`, [`cached`]): each stored value widens to one f32, by the AVX-512 loads
//! as they read it (heads of 64 or 128 values) or into a scratch block that stays in L1 while
//! the heads of the group take their turns, and the arithmetic that follows is the f32
//! kernel's, bit for bit on the widened values. Half f32's bytes (f16, bf16) or 27% (q8_0, 53%
//! of f16's) cross the memory bus, which is what decode at depth waits on.
//! Dot products accumulate in 16 lanes combined by a fixed tree,
//! `exp` is a Cephes-style polynomial (relative error below 3e-7), and every multiply-add is
//! an explicit `mul_add`. The portable code is compiled for AVX-512, AVX2+FMA and plain
//! targets, and the hand-written score loops of the SIMD paths keep its lane order, so every
//! path gives the same bits. Work is split over (query, head) units, each computed by one
//! thread from its own inputs only, so results depend neither on the thread count nor on the
//! other rows of the batch. A thread walks the heads of its units that share a key/value
//! head together, block by block of keys, so that the cache (about 24 MB per token at depth
//! 512 on the default model, more than the L2 caches) is read from memory once per key/value
//! head rather than once per query head; that sharing only saves loads and changes no bits.

mod cached;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape};

use super::driver::{SimdPath, SyncPtr};
use cached::{Block, Cached, Rows};

const NAME: &str = "row attention";
/// Below this many multiply-adds (summed over all units) a call stays on the calling
/// thread: waking the pool costs a few microseconds.
const PAR_MIN_MACS: usize = 64 * 1024;
/// From this many queries in one call (a prefill chunk), a packed cache that the kernel cannot
/// read in place is widened to f32 once for the call instead of block by block for each
/// query; the bits are the same either way.
const WIDEN_FROM_QUERIES: usize = 8;
/// Lanes of the dot-product accumulators: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// Where a row's queries sit: consecutive positions from the first (every row whose tokens
/// all reach the layer), or one position each, ascending (a row some of whose tokens a
/// pruning hook removed from the layers after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueryPositions<'a> {
    From(usize),
    At(&'a [u32]),
}

impl QueryPositions<'_> {
    /// Position of query `i`.
    #[inline(always)]
    pub(crate) fn of(&self, i: usize) -> usize {
        match self {
            Self::From(start) => start + i,
            Self::At(positions) => positions.get(i).map_or(usize::MAX, |&p| p as usize),
        }
    }

    /// How many queries the positions describe, if they say (`From` fits any count).
    pub(crate) fn count(&self) -> Option<usize> {
        match self {
            Self::From(_) => None,
            Self::At(positions) => Some(positions.len()),
        }
    }
}

impl From<usize> for QueryPositions<'static> {
    fn from(start: usize) -> Self {
        Self::From(start)
    }
}

/// The `CustomOp3` `(q, k, v) -> (L, n_heads * d)`; `q` `(L, n_heads, d)`, `k` and `v`
/// `(n_kv, T, d)`, all f32 with any strides.
pub(crate) struct RowAttention<'a> {
    /// Position of each of the `T` keys (`None`: key `j` is position `j`).
    pub(crate) key_positions: Option<&'a [u32]>,
    /// Per key/value head, the sorted, disjoint ranges of key indices it reads (`None`: all);
    /// see [`check_head_keys`].
    pub(crate) head_keys: Option<&'a [Vec<Range<u32>>]>,
    /// Where the queries sit.
    pub(crate) queries: QueryPositions<'a>,
    pub(crate) path: SimdPath,
}

impl CustomOp3 for RowAttention<'_> {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some(q) = Rows::<f32>::new("q", sq, lq)? else {
            bail!("{NAME}: q must be f32, got {:?}", sq.dtype())
        };
        let (mut k, mut v) = (Cached::new("k", sk, lk)?, Cached::new("v", sv, lv)?);
        let (l, n_heads, d) = q.dims;
        if l >= WIDEN_FROM_QUERIES && k.widen_for_many_queries(self.path) {
            (k, v) = (k.widened(), v.widened());
        }
        let (n_kv, t, _) = k.dims();
        if k.dims().2 != d || v.dims() != k.dims() {
            bail!(
                "{NAME}: q {:?}, k {:?}, v {:?} disagree",
                q.dims,
                k.dims(),
                v.dims()
            )
        }
        if n_kv == 0 || !n_heads.is_multiple_of(n_kv) {
            bail!("{NAME}: {n_heads} query heads for {n_kv} key/value heads")
        }
        if self.key_positions.is_some_and(|p| p.len() != t) {
            bail!("{NAME}: {t} keys but a different number of key positions")
        }
        if let Some(ranges) = self.head_keys {
            if let Err(e) = check_head_keys(ranges, n_kv, t) {
                bail!("{NAME}: {e}")
            }
        }
        let mut out = vec![0f32; l * n_heads * d];
        let args = Args {
            q: &q,
            k: &k,
            v: &v,
            group: n_heads / n_kv,
            keys: Keys::new(self.key_positions, t),
            sel: self.head_keys,
            queries: self.queries,
            scale: 1.0 / (d as f32).sqrt(),
        };
        run(self.path, &args, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((l, n_heads * d))))
    }
}

/// Checks a per-head selection before anything reads through it: one list per key/value head
/// (`n_kv`), each of non-empty ranges, sorted, disjoint, inside `0..t`. An empty list is
/// allowed (the head reads no key). The message says which head and range are at fault.
pub(crate) fn check_head_keys(
    ranges: &[Vec<Range<u32>>],
    n_kv: usize,
    t: usize,
) -> std::result::Result<(), String> {
    if ranges.len() != n_kv {
        return Err(format!(
            "a selection for {} key/value heads, the layer has {n_kv}",
            ranges.len()
        ));
    }
    for (h, list) in ranges.iter().enumerate() {
        let mut prev: Option<&Range<u32>> = None;
        for r in list {
            if r.is_empty() {
                return Err(format!("key/value head {h}: range {r:?} is empty"));
            }
            if let Some(p) = prev.filter(|p| r.start < p.end) {
                return Err(format!(
                    "key/value head {h}: range {r:?} overlaps or precedes {p:?}"
                ));
            }
            if r.end as usize > t {
                return Err(format!(
                    "key/value head {h}: range {r:?} is past the {t} keys"
                ));
            }
            prev = Some(r);
        }
    }
    Ok(())
}

/// Which keys a query may see.
#[derive(Clone, Copy)]
enum Keys<'a> {
    /// Key `j` is at position `j`.
    Dense(usize),
    /// Key `j` is at position `p[j]`, `p` ascending.
    Sorted(&'a [u32]),
    /// Any order: visibility is checked key by key.
    Unsorted(&'a [u32]),
}

impl<'a> Keys<'a> {
    fn new(positions: Option<&'a [u32]>, t: usize) -> Self {
        match positions {
            None => Self::Dense(t),
            Some(p) if p.is_sorted() => Self::Sorted(p),
            Some(p) => Self::Unsorted(p),
        }
    }

    /// The `n` such that keys `0..n` hold every key visible from position `pos` (all of
    /// them visible unless `Unsorted`).
    fn visible(self, pos: usize) -> usize {
        match self {
            Self::Dense(t) => self.visible_in(0..t, pos),
            Self::Sorted(p) | Self::Unsorted(p) => self.visible_in(0..p.len(), pos),
        }
    }

    /// [`Keys::visible`] for keys `r` alone: keys `r.start..r.start + n` hold every key of `r`
    /// visible from `pos`.
    #[inline(always)]
    fn visible_in(self, r: Range<usize>, pos: usize) -> usize {
        match self {
            Self::Dense(_) => r.end.min(pos + 1).saturating_sub(r.start),
            Self::Sorted(p) => p[r].partition_point(|&x| x as usize <= pos),
            Self::Unsorted(p) => p[r]
                .iter()
                .rposition(|&x| x as usize <= pos)
                .map_or(0, |j| j + 1),
        }
    }
}

/// Keys `key..key + len` of one key/value head, sitting at `at..at + len` in a query's row of
/// scores (the row holds only the keys the query reads, in order).
#[derive(Clone, Copy, Debug)]
struct Segment {
    key: usize,
    at: usize,
    len: usize,
}

/// Fills `segs` with the keys of key/value head `kv` that a query at position `pos` reads,
/// in the order of its score row, and returns the row's length. Without a selection that is
/// keys `0..n` ([`Keys::visible`]); with one, the visible prefix of each selected range. For
/// `Keys::Unsorted` the row runs up to the last visible key and [`attend_heads`] masks the
/// hidden keys before it, as the kernel does without a selection.
#[inline(always)]
fn visible_segments(args: &Args<'_>, kv: usize, pos: usize, segs: &mut Vec<Segment>) -> usize {
    segs.clear();
    let Some(sel) = args.sel else {
        let n = args.keys.visible(pos);
        if n > 0 {
            segs.push(Segment {
                key: 0,
                at: 0,
                len: n,
            });
        }
        return n;
    };
    // Ascending positions: a range not seen whole hides every later range.
    let ascending = !matches!(args.keys, Keys::Unsorted(_));
    let (mut at, mut n) = (0, 0);
    for r in &sel[kv] {
        let (key, len) = (r.start as usize, r.len());
        let seen = args.keys.visible_in(key..key + len, pos);
        if seen == 0 && ascending {
            break;
        }
        if seen > 0 {
            n = at + seen;
        }
        segs.push(Segment { key, at, len });
        at += len;
        if seen < len && ascending {
            break;
        }
    }
    segs.truncate(segs.partition_point(|s| s.at < n));
    if let Some(last) = segs.last_mut() {
        last.len = n - last.at;
    }
    n
}

/// `segs` cut into pieces of at most `block` keys (a multiple of 4, for the SIMD score loops).
#[inline(always)]
fn blocks(segs: &[Segment], block: usize) -> impl Iterator<Item = Segment> + '_ {
    segs.iter().flat_map(move |s| {
        (0..s.len).step_by(block).map(move |o| Segment {
            key: s.key + o,
            at: s.at + o,
            len: block.min(s.len - o),
        })
    })
}

/// Everything a unit reads.
struct Args<'a> {
    q: &'a Rows<'a, f32>,
    k: &'a Cached<'a>,
    v: &'a Cached<'a>,
    group: usize,
    keys: Keys<'a>,
    /// Per key/value head, the ranges of keys it reads (`None`: all).
    sel: Option<&'a [Vec<Range<u32>>]>,
    queries: QueryPositions<'a>,
    scale: f32,
}

impl Args<'_> {
    /// The most keys any key/value head reads (the length of a score row).
    fn most_keys(&self) -> usize {
        self.sel.map_or(self.k.dims().1, |sel| {
            sel.iter().map(|r| selected(r)).max().unwrap_or(0)
        })
    }

    /// About how many keys the whole call reads (summed over queries and heads), to decide
    /// whether waking the thread pool pays.
    fn keys_read(&self) -> usize {
        let (l, n_heads, _) = self.q.dims;
        let per_kv: Option<Vec<usize>> = self
            .sel
            .map(|sel| sel.iter().map(|r| selected(r)).collect());
        (0..l)
            .map(|i| {
                let vis = self.keys.visible(self.queries.of(i));
                match &per_kv {
                    None => vis * n_heads,
                    Some(n) => n.iter().map(|&n| n.min(vis)).sum::<usize>() * self.group,
                }
            })
            .sum()
    }
}

/// How many keys `ranges` covers.
fn selected(ranges: &[Range<u32>]) -> usize {
    ranges.iter().map(|r| r.len()).sum()
}

/// Fills `out` (`L * n_heads * d`), one (query, head) unit after another, on the thread pool
/// when there is enough work. Many units (prefill) go out through the pool's shared cursor in
/// chunks of about `units / (8 * threads)`, which evens out causal rows of unequal length.
fn run(path: SimdPath, args: &Args<'_>, out: &mut [f32]) {
    let (l, n_heads, d) = args.q.dims;
    let units = l * n_heads;
    if units == 0 || d == 0 {
        return;
    }
    let macs = 2 * args.keys_read() * d;
    if macs < PAR_MIN_MACS || units == 1 {
        run_units(path, args, 0..units, out);
        return;
    }
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let work = |range: Range<usize>| {
        // SAFETY: the pool hands each unit range to exactly one worker, unit `u`
        // owns `out[u * d..(u + 1) * d]`, so these sub-slices never overlap; `out` holds
        // `units * d` values and outlives the pool call.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(out_ptr.get().add(range.start * d), range.len() * d)
        };
        run_units(path, args, range, dst);
    };
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    // Few units (a decode row has `n_heads`): hand out one contiguous run per thread, so that
    // each thread reads as few key/value heads as possible; handing out single heads would
    // have every thread read every key/value head. `execute_chunked` (not `execute`) also
    // keeps a nested call from a pool worker safe: it then runs inline.
    let run_len = if units < 8 * threads {
        units.div_ceil(threads)
    } else {
        1
    };
    pool.execute_chunked(units.div_ceil(run_len), |runs| {
        work(runs.start * run_len..units.min(runs.end * run_len))
    });
}

/// Units `range` into `dst` (their `range.len() * d` outputs), with `path`'s instructions.
fn run_units(path: SimdPath, args: &Args<'_>, range: Range<usize>, dst: &mut [f32]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `SimdPath` other than `Scalar` only reaches here once its CPU features
        // were detected (see `SimdPath::is_available`); `Avx512Vnni` implies AVX-512F.
        SimdPath::Avx512Vnni => unsafe { units_avx512(args, range, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; `Avx2` implies AVX2 and FMA.
        SimdPath::Avx2 => unsafe { units_avx2(args, range, dst) },
        _ => units(SimdPath::Scalar, args, range, dst),
    }
}

/// [`units`] compiled for AVX-512, which lets the compiler use 16-lane registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn units_avx512(args: &Args<'_>, range: Range<usize>, dst: &mut [f32]) {
    units(SimdPath::Avx512Vnni, args, range, dst)
}

/// [`units`] compiled for AVX2 with FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn units_avx2(args: &Args<'_>, range: Range<usize>, dst: &mut [f32]) {
    units(SimdPath::Avx2, args, range, dst)
}

/// The kernel: units `range`, unit `u` being query `u / n_heads`, head `u % n_heads`.
/// Consecutive units of one query that share a key/value head go together through
/// [`attend_heads`], so those keys and values are read from memory once, not once per head.
/// Everything here is `inline(always)` so that the SIMD wrappers above compile all of it for
/// their instruction sets; only the scores have hand-written versions, which `path` picks
/// (the compiler vectorises the exp and the value sum well, but not a short dot product).
#[inline(always)]
fn units(path: SimdPath, args: &Args<'_>, range: Range<usize>, dst: &mut [f32]) {
    let (_, n_heads, d) = args.q.dims;
    let most = args.group.min(range.len());
    let mut scratch = Scratch {
        scores: vec![0f32; most * args.most_keys()],
        inv: vec![0f32; most],
        acc: vec![0f32; most * 2 * d],
        segs: Vec::new(),
        block: Vec::new(),
    };
    let mut out = dst;
    let mut u = range.start;
    while u < range.end {
        let (i, h0) = (u / n_heads, u % n_heads);
        let kv = h0 / args.group;
        let heads = ((kv + 1) * args.group - h0).min(range.end - u);
        let (mine, rest) = std::mem::take(&mut out).split_at_mut(heads * d);
        attend_heads(path, args, i, h0..h0 + heads, &mut scratch, mine);
        out = rest;
        u += heads;
    }
}

/// Per-call buffers of [`attend_heads`], sized for a whole group of heads.
struct Scratch {
    /// One row of `T` scores (then softmax numerators) per head.
    scores: Vec<f32>,
    /// Per head, `1 / Σ p_j`.
    inv: Vec<f32>,
    /// Per head, the even-key and odd-key accumulators of the value sum, `d` each.
    acc: Vec<f32>,
    /// The keys the current query reads ([`visible_segments`]).
    segs: Vec<Segment>,
    /// A block of keys or values widened to f32, for a packed cache.
    block: Vec<f32>,
}

/// Keys per block of roughly 16 KiB of keys, a multiple of 4 (the SIMD score loops take keys
/// four at a time).
#[inline(always)]
fn keys_per_block(d: usize) -> usize {
    ((4096 / d.max(1)) & !3).max(4)
}

/// Query `i` against key/value head `heads.start / group`, for `heads` (all reading that
/// key/value head), into `out` (`heads.len() * d`). Keys and values are walked in blocks that
/// stay in L1 while every head takes its turn; each head's arithmetic is the same as if it
/// went alone, so how heads are grouped (which follows the thread split) changes no bits.
/// Only the keys of [`visible_segments`] are read; each sits at its place in the score row,
/// which alone decides the arithmetic (lanes of the softmax sum, even/odd value accumulators).
#[inline(always)]
fn attend_heads(
    path: SimdPath,
    args: &Args<'_>,
    i: usize,
    heads: Range<usize>,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let d = args.q.dims.2;
    let kv = heads.start / args.group;
    let pos = args.queries.of(i);
    let n = visible_segments(args, kv, pos, &mut scratch.segs);
    if n == 0 {
        // No visible key (a selection or a hook's positions hid them all): nothing to average.
        out.fill(0.0);
        return;
    }
    let g = heads.len();
    let block = keys_per_block(d);
    let Scratch {
        scores,
        inv,
        acc,
        segs,
        block: converted,
    } = scratch;
    let scores = &mut scores[..g * n];
    let segs: &[Segment] = segs;
    for b in blocks(segs, block) {
        #[cfg(target_arch = "x86_64")]
        if let Some(keys) = args.k.in_place(path, kv, b.key) {
            for (s, h) in scores.chunks_exact_mut(n).zip(heads.clone()) {
                let s = &mut s[b.at..b.at + b.len];
                keys.scores(args.q.row(i, h), args.scale, s);
            }
            continue;
        }
        let keys = args.k.block(kv, b.key, b.len, converted);
        for (s, h) in scores.chunks_exact_mut(n).zip(heads.clone()) {
            let s = &mut s[b.at..b.at + b.len];
            key_scores(path, args.q.row(i, h), keys, args.scale, s);
        }
    }
    let inv = &mut inv[..g];
    for (s, inv) in scores.chunks_exact_mut(n).zip(inv.iter_mut()) {
        if let Keys::Unsorted(p) = args.keys {
            for b in segs {
                for (s, &x) in s[b.at..b.at + b.len].iter_mut().zip(&p[b.key..]) {
                    if x as usize > pos {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
        }
        *inv = 1.0 / softmax_numerators(s);
    }
    let acc = &mut acc[..g * 2 * d];
    acc.fill(0.0);
    for b in blocks(segs, block) {
        // Row places, not key indices, decide which accumulator a key feeds.
        let odd_first = b.at % 2 == 1;
        #[cfg(target_arch = "x86_64")]
        if let Some(values) = args.v.in_place(path, kv, b.key) {
            for (s, acc) in scores.chunks_exact(n).zip(acc.chunks_exact_mut(2 * d)) {
                let (even, odd) = acc.split_at_mut(d);
                values.value_sum(&s[b.at..b.at + b.len], odd_first, even, odd);
            }
            continue;
        }
        let values = args.v.block(kv, b.key, b.len, converted);
        for (s, acc) in scores.chunks_exact(n).zip(acc.chunks_exact_mut(2 * d)) {
            let (even, odd) = acc.split_at_mut(d);
            let p = &s[b.at..b.at + b.len];
            match d {
                64 => value_sum::<64>(p, values, odd_first, even, odd),
                128 => value_sum::<128>(p, values, odd_first, even, odd),
                _ => value_sum_any(p, values, odd_first, even, odd),
            }
        }
    }
    for ((o, acc), &inv) in out
        .chunks_exact_mut(d)
        .zip(acc.chunks_exact(2 * d))
        .zip(inv.iter())
    {
        let (even, odd) = acc.split_at(d);
        for ((o, e), x) in o.iter_mut().zip(even).zip(odd) {
            *o = (e + x) * inv;
        }
    }
}

/// Scores of the keys of `k` (its first `s.len()` rows) against `q`, into `s`.
#[inline(always)]
fn key_scores(path: SimdPath, q: &[f32], k: Block<'_>, scale: f32, s: &mut [f32]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `run_units`: the path's CPU features were detected.
        SimdPath::Avx512Vnni if q.len().is_multiple_of(LANES) => unsafe {
            x86::scores_avx512::<f32>(q, k, scale, s)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdPath::Avx2 if q.len().is_multiple_of(LANES) => unsafe {
            x86::scores_avx2(q, k, scale, s)
        },
        _ => {
            for (j, s) in s.iter_mut().enumerate() {
                *s = dot(q, k.row(j)) * scale;
            }
        }
    }
}

/// `a · b` over `min(len)` values: 16 lane sums of `mul_add`s, a fixed tree, then the tail.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s = hsum(acc);
    for (x, y) in ta.iter().zip(tb) {
        s = x.mul_add(*y, s);
    }
    s
}

/// Sum of 16 lanes in a fixed order (halves, then quarters, ...), the same on every path.
#[inline(always)]
fn hsum(a: [f32; LANES]) -> f32 {
    let mut h = [0f32; 8];
    for l in 0..8 {
        h[l] = a[l] + a[l + 8];
    }
    let mut q = [0f32; 4];
    for l in 0..4 {
        q[l] = h[l] + h[l + 4];
    }
    (q[0] + q[2]) + (q[1] + q[3])
}

/// Replaces scores by `exp(s - max)` and returns their sum (lane-wise, then [`hsum`]).
#[inline(always)]
fn softmax_numerators(s: &mut [f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let chunks = s.chunks_exact(LANES);
    let mut m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    for c in chunks {
        for l in 0..LANES {
            mx[l] = mx[l].max(c[l]);
        }
    }
    // max is exact, so the order of this reduction does not matter.
    m = mx.iter().fold(m, |a, &x| a.max(x));
    let mut acc = [0f32; LANES];
    let mut chunks = s.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_nonpositive(c[l] - m);
            acc[l] += c[l];
        }
    }
    let mut sum = hsum(acc);
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - m);
        sum += *x;
    }
    sum
}

/// `exp(x)` for `x <= 0` (Cephes `expf`: `x = n ln2 + r`, `|r| <= ln2 / 2`, degree-6
/// polynomial for `exp(r)`, `2^n` built in the exponent bits). Branch-free so that it
/// vectorises; relative error below 3e-7 (tested). Inputs below -87 (including the `-inf` of a
/// masked key) give 0, where `exp` is below f32's normal range anyway; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    /// 1.5 * 2^23: adding it rounds to an integer that then sits in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    // ln 2 split in two (Cody-Waite): LN2_HI has 9 significant bits, so `n * LN2_HI` is exact
    // for the |n| <= 126 used here, and LN2_LO carries the rest.
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.0;
    let xc = if x < LO { LO } else { x };
    let t = xc.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let n = t - SHIFT;
    let r = n.mul_add(-LN2_HI, xc);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r) + 1.0;
    // n in [-126, 0] here, so n + 127 is a normal exponent.
    let bits = t
        .to_bits()
        .wrapping_sub(SHIFT.to_bits())
        .wrapping_add(127)
        .wrapping_shl(23);
    let y = y * f32::from_bits(bits);
    if x < LO {
        0.0
    } else {
        y
    }
}

/// Adds `p_j v_j` for the first `p.len()` rows of `v`, alternately into
/// `even` and `odd`, starting with `odd` when `odd_first` (the first key sits at an odd place
/// of the score row). Two sets of accumulators let consecutive multiply-adds run in
/// parallel; for a head dimension known at compile time they live in registers for the whole
/// block.
#[inline(always)]
fn value_sum<const D: usize>(
    p: &[f32],
    v: Block<'_>,
    odd_first: bool,
    even: &mut [f32],
    odd: &mut [f32],
) {
    let mut a0: [f32; D] = std::array::from_fn(|c| even[c]);
    let mut a1: [f32; D] = std::array::from_fn(|c| odd[c]);
    let (mut p, mut j) = (p, 0);
    if let (true, Some((w, rest))) = (odd_first, p.split_first()) {
        let v1 = &v.row(j)[..D];
        for c in 0..D {
            a1[c] = w.mul_add(v1[c], a1[c]);
        }
        (p, j) = (rest, j + 1);
    }
    let mut pairs = p.chunks_exact(2);
    for w in &mut pairs {
        let (v0, v1) = (&v.row(j)[..D], &v.row(j + 1)[..D]);
        for c in 0..D {
            a0[c] = w[0].mul_add(v0[c], a0[c]);
            a1[c] = w[1].mul_add(v1[c], a1[c]);
        }
        j += 2;
    }
    if let [w] = pairs.remainder() {
        let v0 = &v.row(j)[..D];
        for c in 0..D {
            a0[c] = w.mul_add(v0[c], a0[c]);
        }
    }
    even[..D].copy_from_slice(&a0);
    odd[..D].copy_from_slice(&a1);
}

/// [`value_sum`] for any head dimension, accumulating in memory (same arithmetic).
#[inline(always)]
fn value_sum_any(p: &[f32], v: Block<'_>, odd_first: bool, even: &mut [f32], odd: &mut [f32]) {
    for (jj, &w) in p.iter().enumerate() {
        let acc = if (jj + usize::from(odd_first)) % 2 == 0 {
            &mut *even
        } else {
            &mut *odd
        };
        for (a, &x) in acc.iter_mut().zip(v.row(jj)) {
            *a = w.mul_add(x, *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn available_paths() -> Vec<SimdPath> {
        [SimdPath::Avx512Vnni, SimdPath::Avx2, SimdPath::Scalar]
            .into_iter()
            .filter(|p| p.is_available())
            .collect()
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-1000.0), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    /// Every SIMD path gives the scalar path's bits, and splitting the units into ranges (as
    /// the thread pool does, differently for each thread count) changes nothing; with and
    /// without a per-head selection (ranges at odd places, a head reading few keys).
    #[test]
    fn paths_and_splits_agree_bit_for_bit() -> Result<()> {
        let (l, n_heads, n_kv, t) = (5, 6, 2, 150);
        let odd: Vec<Vec<Range<u32>>> = vec![vec![1..4, 9..70, 101..150], vec![3..8]];
        for d in [64, 128, 48, 40] {
            for sel in [None, Some(odd.as_slice())] {
                paths_and_splits_agree(l, n_heads, n_kv, t, d, sel)?;
            }
        }
        Ok(())
    }

    fn paths_and_splits_agree(
        l: usize,
        n_heads: usize,
        n_kv: usize,
        t: usize,
        d: usize,
        sel: Option<&[Vec<Range<u32>>]>,
    ) -> Result<()> {
        let q = Tensor::from_vec(values(l * n_heads * d, 1), (l, n_heads, d), &Device::Cpu)?;
        let k = Tensor::from_vec(values(n_kv * t * d, 2), (n_kv, t, d), &Device::Cpu)?;
        let v = Tensor::from_vec(values(n_kv * t * d, 3), (n_kv, t, d), &Device::Cpu)?;
        let run_op = |path| {
            let op = RowAttention {
                key_positions: None,
                head_keys: sel,
                queries: QueryPositions::From(t - l),
                path,
            };
            q.apply_op3_no_bwd(&k, &v, &op)?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        let want = run_op(SimdPath::Scalar)?;
        for path in available_paths() {
            assert_eq!(run_op(path)?, want, "d={d} {path:?} {sel:?}");
        }
        let (sq, lq) = q.storage_and_layout();
        let (sk, lk) = k.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let (
            candle_core::Storage::Cpu(sq),
            candle_core::Storage::Cpu(sk),
            candle_core::Storage::Cpu(sv),
        ) = (&*sq, &*sk, &*sv)
        else {
            panic!("cpu tensors")
        };
        let (rq, rk, rv) = (
            Rows::<f32>::new("q", sq, lq)?.expect("f32"),
            Cached::new("k", sk, lk)?,
            Cached::new("v", sv, lv)?,
        );
        let args = Args {
            q: &rq,
            k: &rk,
            v: &rv,
            group: n_heads / n_kv,
            keys: Keys::Dense(t),
            sel,
            queries: QueryPositions::From(t - l),
            scale: 1.0 / (d as f32).sqrt(),
        };
        let mut split = vec![0f32; l * n_heads * d];
        let mut u0 = 0;
        for len in [1, 7, 2, 20] {
            let range = u0..u0 + len;
            run_units(
                SimdPath::detect(),
                &args,
                range.clone(),
                &mut split[u0 * d..range.end * d],
            );
            u0 = range.end;
        }
        assert_eq!(u0, l * n_heads);
        assert_eq!(split, want, "d={d} split {sel:?}");
        Ok(())
    }

    /// A packed cache (f16, bf16, q8_0) gives, on every path, the bits the f32 kernel gives
    /// for its values widened to f32: the widening is the same wherever it is done and the
    /// arithmetic is shared. With a selection, and with heads whose keys span several blocks.
    #[test]
    fn a_packed_cache_is_the_f32_kernel_on_its_values() -> Result<()> {
        use crate::kv_cache::KvDtype;
        let (n_heads, n_kv, t) = (6, 2, 1100);
        let odd: Vec<Vec<Range<u32>>> = vec![vec![1..4, 9..700, 801..1100], vec![3..8]];
        // 3 queries read packed blocks (in place on the AVX-512 path for heads of 64 and 128,
        // widened block by block otherwise); WIDEN_FROM_QUERIES or more widen the call.
        let shapes = [
            (64, 3),
            (128, 3),
            (96, 3),
            (40, 3),
            (64, WIDEN_FROM_QUERIES),
        ];
        for dtype in [KvDtype::F16, KvDtype::Bf16, KvDtype::Q8_0] {
            for (d, l) in shapes {
                if dtype == KvDtype::Q8_0 && d % 32 != 0 {
                    continue;
                }
                let q =
                    Tensor::from_vec(values(l * n_heads * d, 4), (l, n_heads, d), &Device::Cpu)?;
                let packed = |seed| -> Result<(Tensor, Tensor)> {
                    let x =
                        Tensor::from_vec(values(n_kv * t * d, seed), (n_kv, t, d), &Device::Cpu)?;
                    let stored = dtype.store(&x).map_err(candle_core::Error::wrap)?;
                    let wide = dtype.load(&stored, d).map_err(candle_core::Error::wrap)?;
                    Ok((stored, wide))
                };
                let ((k8, k32), (v8, v32)) = (packed(5)?, packed(6)?);
                assert_ne!(k8.dtype(), candle_core::DType::F32);
                for sel in [None, Some(odd.as_slice())] {
                    let run_op = |k: &Tensor, v: &Tensor, path| {
                        let op = RowAttention {
                            key_positions: None,
                            head_keys: sel,
                            queries: QueryPositions::From(t - l),
                            path,
                        };
                        q.apply_op3_no_bwd(k, v, &op)?
                            .flatten_all()?
                            .to_vec1::<f32>()
                    };
                    let want = run_op(&k32, &v32, SimdPath::Scalar)?;
                    for path in available_paths() {
                        let got = run_op(&k8, &v8, path)?;
                        assert_eq!(got, want, "{dtype:?} d={d} l={l} {path:?} {sel:?}");
                    }
                }
            }
        }
        Ok(())
    }
}

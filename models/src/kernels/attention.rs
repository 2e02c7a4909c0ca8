//! Scaled dot-product attention of one batch row on the CPU, straight from the KV cache.
//!
//! For each query `i` (at position `start + i`) and query head `h` (reading key/value head
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
//! Numerics: f32 throughout. The cache may hold keys and values in f16 (`--kv-cache-dtype`):
//! each block of keys or values is then converted to f32 once (exactly: every f16 is an f32)
//! into a scratch block that stays in L1 while the heads of the group take their turns, and
//! the arithmetic that follows is the f32 kernel's, bit for bit on the converted values. Half
//! the bytes cross the memory bus, which is what decode at depth waits on.
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

use std::borrow::Cow;
use std::ops::Range;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::driver::{SimdPath, SyncPtr};

const NAME: &str = "row attention";
/// Below this many multiply-adds (summed over all units) a call stays on the calling
/// thread: waking the pool costs a few microseconds.
const PAR_MIN_MACS: usize = 64 * 1024;
/// From this many queries in one call (a prefill chunk), an f16 cache that the kernel cannot
/// read in place is widened to f32 once for the call instead of block by block for each
/// query; the bits are the same either way.
const WIDEN_FROM_QUERIES: usize = 8;
/// Lanes of the dot-product accumulators: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// The `CustomOp3` `(q, k, v) -> (L, n_heads * d)`; `q` `(L, n_heads, d)`, `k` and `v`
/// `(n_kv, T, d)`, all f32 with any strides.
pub(crate) struct RowAttention<'a> {
    /// Position of each of the `T` keys (`None`: key `j` is position `j`).
    pub(crate) key_positions: Option<&'a [u32]>,
    /// Per key/value head, the sorted, disjoint ranges of key indices it reads (`None`: all);
    /// see [`check_head_keys`].
    pub(crate) head_keys: Option<&'a [Vec<Range<u32>>]>,
    /// Position of the first query.
    pub(crate) start: usize,
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
        if l >= WIDEN_FROM_QUERIES && !reads_f16_in_place(self.path, d) {
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
            start: self.start,
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

/// What the cache may store: f32, or f16 read through [`Cached::block`].
trait Elem: Copy + 'static {
    fn of(storage: &CpuStorage) -> Option<&[Self]>;
}

impl Elem for f32 {
    fn of(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F32(data) => Some(data),
            _ => None,
        }
    }
}

impl Elem for f16 {
    fn of(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F16(data) => Some(data),
            _ => None,
        }
    }
}

/// A 3-D tensor read as rows of its last dimension: `row(a, b)` is `x[a, b, ..]`.
struct Rows<'a, E: Elem> {
    data: Cow<'a, [E]>,
    offset: usize,
    strides: (usize, usize),
    dims: (usize, usize, usize),
}

impl<'a, E: Elem> Rows<'a, E> {
    /// Borrows the storage when rows are contiguous (the cache views are), else gathers a
    /// contiguous copy; `None` when the storage holds another type.
    fn new(what: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<Option<Self>> {
        let Some(data) = E::of(storage) else {
            return Ok(None);
        };
        let &[a, b, c] = layout.dims() else {
            bail!("{NAME}: {what} must be 3-D, got {:?}", layout.shape())
        };
        let &[s0, s1, s2] = layout.stride() else {
            bail!("{NAME}: {what} has a bad layout {layout:?}")
        };
        let dims = (a, b, c);
        let offset = layout.start_offset();
        if a * b * c == 0 {
            return Ok(Some(Self {
                data: Cow::Borrowed(&[]),
                offset: 0,
                strides: (0, 0),
                dims,
            }));
        }
        // The last element read; checked once so that row slicing cannot fail later.
        let last = offset + (a - 1) * s0 + (b - 1) * s1 + (c - 1) * s2;
        if last >= data.len() {
            bail!(
                "{NAME}: {what} layout {layout:?} overruns its {} values",
                data.len()
            )
        }
        if s2 == 1 {
            return Ok(Some(Self {
                data: Cow::Borrowed(data),
                offset,
                strides: (s0, s1),
                dims,
            }));
        }
        let mut copy = Vec::with_capacity(a * b * c);
        for i in 0..a {
            for j in 0..b {
                let o = offset + i * s0 + j * s1;
                copy.extend((0..c).map(|x| data[o + x * s2]));
            }
        }
        Ok(Some(Self {
            data: Cow::Owned(copy),
            offset: 0,
            strides: (b * c, c),
            dims,
        }))
    }

    #[inline(always)]
    fn row(&self, a: usize, b: usize) -> &[E] {
        let o = self.offset + a * self.strides.0 + b * self.strides.1;
        &self.data[o..o + self.dims.2]
    }
}

/// Keys or values as the cache holds them.
enum Cached<'a> {
    F32(Rows<'a, f32>),
    F16(Rows<'a, f16>),
}

impl<'a> Cached<'a> {
    fn new(what: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        if let Some(rows) = Rows::new(what, storage, layout)? {
            return Ok(Self::F32(rows));
        }
        if let Some(rows) = Rows::new(what, storage, layout)? {
            return Ok(Self::F16(rows));
        }
        bail!(
            "{NAME}: {what} must be f32 or f16, got {:?}",
            storage.dtype()
        )
    }

    fn dims(&self) -> (usize, usize, usize) {
        match self {
            Self::F32(r) => r.dims,
            Self::F16(r) => r.dims,
        }
    }

    /// Rows `j0..j0 + len` of key/value head `kv` as f32: in place for an f32 cache, else
    /// converted into `scratch`.
    #[inline(always)]
    fn block<'b>(
        &'b self,
        kv: usize,
        j0: usize,
        len: usize,
        scratch: &'b mut Vec<f32>,
    ) -> Block<'b> {
        match self {
            Self::F32(r) => {
                let start = r.offset + kv * r.strides.0 + j0 * r.strides.1;
                Block {
                    data: &r.data[start..],
                    stride: r.strides.1,
                    d: r.dims.2,
                }
            }
            Self::F16(r) => {
                let d = r.dims.2;
                scratch.resize(len * d, 0.0);
                widen_rows(r, kv, j0, scratch);
                Block {
                    data: scratch,
                    stride: d,
                    d,
                }
            }
        }
    }

    /// An f16 cache's rows `j0..` of key/value head `kv` in place (see [`reads_f16_in_place`]), for the AVX-512 loops
    /// that widen 16 values per load (heads of 64 or 128 values); `None` where rows go
    /// through [`Cached::block`].
    #[inline(always)]
    fn in_place_f16(&self, path: SimdPath, kv: usize, j0: usize) -> Option<Block<'_, f16>> {
        match (self, path) {
            (Self::F16(r), path) if reads_f16_in_place(path, r.dims.2) => {
                let start = r.offset + kv * r.strides.0 + j0 * r.strides.1;
                Some(Block {
                    data: &r.data[start..],
                    stride: r.strides.1,
                    d: r.dims.2,
                })
            }
            _ => None,
        }
    }

    /// The same values as f32 rows (a copy for an f16 cache): for calls with many queries,
    /// which would otherwise convert every block once per query.
    fn widened(self) -> Self {
        let Self::F16(r) = self else {
            return self;
        };
        let (a, b, c) = r.dims;
        let mut data = vec![0f32; a * b * c];
        for (kv, out) in data.chunks_exact_mut(b * c).enumerate() {
            widen_rows(&r, kv, 0, out);
        }
        Self::F32(Rows {
            data: Cow::Owned(data),
            offset: 0,
            strides: (b * c, c),
            dims: r.dims,
        })
    }
}

/// Whether `path` reads f16 rows of `d` values in place: the AVX-512 loops, which widen 16
/// values per load, for heads of 64 or 128 values.
#[inline(always)]
fn reads_f16_in_place(path: SimdPath, d: usize) -> bool {
    cfg!(target_arch = "x86_64") && path == SimdPath::Avx512Vnni && matches!(d, 64 | 128)
}

/// Rows `j0..` of key/value head `kv` of an f16 tensor widened into `out` (as many rows as
/// it holds).
#[inline(always)]
fn widen_rows(r: &Rows<'_, f16>, kv: usize, j0: usize, out: &mut [f32]) {
    let d = r.dims.2;
    if r.strides.1 == d {
        // Consecutive rows are one run of memory: one conversion call.
        let start = r.offset + kv * r.strides.0 + j0 * d;
        r.data[start..start + out.len()].convert_to_f32_slice(out);
    } else {
        for (j, row) in (j0..).zip(out.chunks_exact_mut(d)) {
            r.row(kv, j).convert_to_f32_slice(row);
        }
    }
}

/// Consecutive rows (keys or values) of one key/value head; `row(0)` is the first. f32 for
/// the portable arithmetic; f16 where the AVX-512 loops widen rows as they load them.
#[derive(Clone, Copy)]
struct Block<'a, E = f32> {
    data: &'a [E],
    stride: usize,
    d: usize,
}

impl<E> Block<'_, E> {
    #[inline(always)]
    fn row(&self, j: usize) -> &[E] {
        let o = j * self.stride;
        &self.data[o..o + self.d]
    }
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
    start: usize,
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
                let vis = self.keys.visible(self.start + i);
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
    /// A block of keys or values converted to f32, for an f16 cache.
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
    let pos = args.start + i;
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
        if let Some(keys) = args.k.in_place_f16(path, kv, b.key) {
            for (s, h) in scores.chunks_exact_mut(n).zip(heads.clone()) {
                let s = &mut s[b.at..b.at + b.len];
                // SAFETY: `in_place_f16` answers only on the AVX-512 path, whose features
                // were detected.
                unsafe { x86::scores_avx512_f16(args.q.row(i, h), keys, args.scale, s) };
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
        if let Some(values) = args.v.in_place_f16(path, kv, b.key) {
            for (s, acc) in scores.chunks_exact(n).zip(acc.chunks_exact_mut(2 * d)) {
                let (even, odd) = acc.split_at_mut(d);
                let p = &s[b.at..b.at + b.len];
                // SAFETY: as for the keys.
                unsafe {
                    match d {
                        64 => x86::value_sum_f16_avx512::<4>(p, values, odd_first, even, odd),
                        _ => x86::value_sum_f16_avx512::<8>(p, values, odd_first, even, odd),
                    }
                };
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
            x86::scores_avx512(q, k, scale, s)
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

/// Hand-vectorised scores `s_j = (q · k_j) * scale` for `d` a multiple of 16, bit for bit
/// the portable [`dot`]: the same 16 lanes of `mul_add`s and the same reduction tree. Four
/// keys go at a time so that their reductions share shuffles (a 4x4 transpose-and-add)
/// instead of paying a horizontal sum each.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{dot, Block, LANES};
    use half::f16;
    use half::slice::HalfFloatSliceExt;
    use std::arch::x86_64::*;

    /// The AVX-512 scores for rows of `$elem`, loaded 16 values at a time by `$load` (the
    /// row pointer in `$p`): f32 rows as they are, f16 rows widened by the load.
    macro_rules! scores_avx512 {
        ($name:ident, $elem:ty, |$p:ident| $load:expr, $tail:path) => {
            #[target_feature(enable = "avx512f")]
            pub(super) fn $name(q: &[f32], k: Block<'_, $elem>, scale: f32, s: &mut [f32]) {
                let d = q.len();
                assert!(d.is_multiple_of(LANES) && k.d == d);
                let vscale = _mm512_set1_ps(scale);
                // Lane 0 of each 128-bit quarter, where the reduction leaves each key's sum.
                let firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
                let mut quads = s.chunks_exact_mut(4);
                let mut j = 0;
                for out in &mut quads {
                    let rows = [k.row(j), k.row(j + 1), k.row(j + 2), k.row(j + 3)];
                    let mut acc = [_mm512_setzero_ps(); 4];
                    for c in (0..d).step_by(LANES) {
                        // SAFETY: c + 16 <= d, the length of `q` and of every key row.
                        let qv = unsafe { _mm512_loadu_ps(q.as_ptr().add(c)) };
                        for (a, row) in acc.iter_mut().zip(&rows) {
                            // SAFETY: as above.
                            let kv = unsafe {
                                let $p = row.as_ptr().add(c);
                                $load
                            };
                            *a = _mm512_fmadd_ps(qv, kv, *a);
                        }
                    }
                    let r = reduce_quad(acc, firsts, vscale);
                    // SAFETY: `out` holds 4 values.
                    unsafe { _mm_storeu_ps(out.as_mut_ptr(), r) };
                    j += 4;
                }
                for (j, s) in (j..).zip(quads.into_remainder()) {
                    *s = $tail(q, k.row(j)) * scale;
                }
            }
        };
    }

    scores_avx512!(scores_avx512, f32, |p| _mm512_loadu_ps(p), dot);
    scores_avx512!(
        scores_avx512_f16,
        f16,
        |p| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast::<__m256i>())),
        dot_f16
    );

    /// Four keys' 16-lane sums reduced to one score each, times `vscale`, in the portable
    /// [`hsum`](super::hsum)'s order.
    #[target_feature(enable = "avx512f")]
    fn reduce_quad(acc: [__m512; 4], firsts: __m512i, vscale: __m512) -> __m128 {
        // Lanes l + l+8 of two keys at once: [a0..8 b0..8] + [a8..16 b8..16].
        let ab = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(acc[0], acc[1]),
            _mm512_shuffle_f32x4::<0xEE>(acc[0], acc[1]),
        );
        let cd = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(acc[2], acc[3]),
            _mm512_shuffle_f32x4::<0xEE>(acc[2], acc[3]),
        );
        // Then l + l+4, leaving one 128-bit quarter per key: [qa qb qc qd].
        let quarters = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(ab, cd),
            _mm512_shuffle_f32x4::<0xDD>(ab, cd),
        );
        // (q0 + q2) + (q1 + q3) in every lane of each quarter.
        let r = _mm512_add_ps(quarters, _mm512_permute_ps::<0x4E>(quarters));
        let r = _mm512_add_ps(r, _mm512_permute_ps::<0xB1>(r));
        let r = _mm512_mul_ps(_mm512_permutexvar_ps(firsts, r), vscale);
        _mm512_castps512_ps128(r)
    }

    /// [`dot`] of `q` with an f16 row, widened first (at most 512 values).
    fn dot_f16(q: &[f32], row: &[f16]) -> f32 {
        let mut wide = [0f32; 512];
        let wide = &mut wide[..row.len()];
        row.convert_to_f32_slice(wide);
        dot(q, wide)
    }

    /// [`value_sum`](super::value_sum) for an f16 block of `N * 16`-value rows, widened 16
    /// values per load: the same multiply-adds per lane into the same even/odd accumulators
    /// (held in `2 * N` registers), so the same bits.
    #[target_feature(enable = "avx512f")]
    pub(super) fn value_sum_f16_avx512<const N: usize>(
        p: &[f32],
        v: Block<'_, f16>,
        odd_first: bool,
        even: &mut [f32],
        odd: &mut [f32],
    ) {
        assert!(v.d == N * LANES && even.len() >= v.d && odd.len() >= v.d);
        // SAFETY: r < N, so r * 16 + 16 <= d, the length of `even` and `odd`.
        let mut a0: [__m512; N] =
            std::array::from_fn(|r| unsafe { _mm512_loadu_ps(even.as_ptr().add(r * LANES)) });
        let mut a1: [__m512; N] =
            std::array::from_fn(|r| unsafe { _mm512_loadu_ps(odd.as_ptr().add(r * LANES)) });
        let (mut p, mut j) = (p, 0);
        if let (true, Some((w, rest))) = (odd_first, p.split_first()) {
            add_row(&mut a1, *w, v.row(j));
            (p, j) = (rest, j + 1);
        }
        let mut pairs = p.chunks_exact(2);
        for w in &mut pairs {
            add_row(&mut a0, w[0], v.row(j));
            add_row(&mut a1, w[1], v.row(j + 1));
            j += 2;
        }
        if let [w] = pairs.remainder() {
            add_row(&mut a0, *w, v.row(j));
        }
        for r in 0..N {
            // SAFETY: as for the loads.
            unsafe {
                _mm512_storeu_ps(even.as_mut_ptr().add(r * LANES), a0[r]);
                _mm512_storeu_ps(odd.as_mut_ptr().add(r * LANES), a1[r]);
            }
        }
    }

    /// `acc += w * row`, the row widened from f16 (`row` holds `N * 16` values).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn add_row<const N: usize>(acc: &mut [__m512; N], w: f32, row: &[f16]) {
        assert!(row.len() >= N * LANES);
        let w = _mm512_set1_ps(w);
        for (r, a) in acc.iter_mut().enumerate() {
            // SAFETY: r * 16 + 16 <= N * 16 <= the row's length.
            let x =
                unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(row.as_ptr().add(r * LANES).cast())) };
            *a = _mm512_fmadd_ps(w, x, *a);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scores_avx2(q: &[f32], k: Block<'_>, scale: f32, s: &mut [f32]) {
        let d = q.len();
        assert!(d.is_multiple_of(LANES) && k.d == d);
        let vscale = _mm_set1_ps(scale);
        let mut quads = s.chunks_exact_mut(4);
        let mut j = 0;
        for out in &mut quads {
            let rows = [k.row(j), k.row(j + 1), k.row(j + 2), k.row(j + 3)];
            // Lanes 0..8 and 8..16 of each key's accumulator.
            let mut lo = [_mm256_setzero_ps(); 4];
            let mut hi = [_mm256_setzero_ps(); 4];
            for c in (0..d).step_by(LANES) {
                // SAFETY: c + 16 <= d, the length of `q` and of every key row.
                let (q0, q1) = unsafe {
                    let p = q.as_ptr().add(c);
                    (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
                };
                for r in 0..4 {
                    // SAFETY: as above.
                    let (k0, k1) = unsafe {
                        let p = rows[r].as_ptr().add(c);
                        (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
                    };
                    lo[r] = _mm256_fmadd_ps(q0, k0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(q1, k1, hi[r]);
                }
            }
            // Lanes l + l+8, then l + l+4 with two keys per register: [qa qb], [qc qd].
            let h: [__m256; 4] = std::array::from_fn(|r| _mm256_add_ps(lo[r], hi[r]));
            let ab = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(h[0], h[1]),
                _mm256_permute2f128_ps::<0x31>(h[0], h[1]),
            );
            let cd = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(h[2], h[3]),
                _mm256_permute2f128_ps::<0x31>(h[2], h[3]),
            );
            // (q0 + q2) + (q1 + q3) in every lane of each 128-bit half.
            let fold = |x: __m256| {
                let r = _mm256_add_ps(x, _mm256_permute_ps::<0x4E>(x));
                _mm256_add_ps(r, _mm256_permute_ps::<0xB1>(r))
            };
            // [a a a a b b b b], [c c c c d d d d] -> [a c a c b d b d] -> [a b c d].
            let m = _mm256_blend_ps::<0xAA>(fold(ab), fold(cd));
            let r = _mm_unpacklo_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let r = _mm_mul_ps(r, vscale);
            // SAFETY: `out` holds 4 values.
            unsafe { _mm_storeu_ps(out.as_mut_ptr(), r) };
            j += 4;
        }
        for (j, s) in (j..).zip(quads.into_remainder()) {
            *s = dot(q, k.row(j)) * scale;
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
                start: t - l,
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
            start: t - l,
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

    /// An f16 cache gives, on every path, the bits the f32 kernel gives for the same values
    /// (each f16 widened to f32): the conversion is exact and the arithmetic is shared. With a
    /// selection, and with heads whose keys span several blocks.
    #[test]
    fn an_f16_cache_is_the_f32_kernel_on_its_values() -> Result<()> {
        let (n_heads, n_kv, t) = (6, 2, 1100);
        let odd: Vec<Vec<Range<u32>>> = vec![vec![1..4, 9..700, 801..1100], vec![3..8]];
        // 3 queries read f16 blocks (in place on the AVX-512 path for heads of 64 and 128,
        // converted block by block otherwise); WIDEN_FROM_QUERIES or more widen the call.
        for (d, l) in [(64, 3), (128, 3), (40, 3), (64, WIDEN_FROM_QUERIES)] {
            let q = Tensor::from_vec(values(l * n_heads * d, 4), (l, n_heads, d), &Device::Cpu)?;
            let half = |seed| -> Result<Tensor> {
                let x = Tensor::from_vec(values(n_kv * t * d, seed), (n_kv, t, d), &Device::Cpu)?;
                x.to_dtype(candle_core::DType::F16)
            };
            let (k16, v16) = (half(5)?, half(6)?);
            let (k32, v32) = (
                k16.to_dtype(candle_core::DType::F32)?,
                v16.to_dtype(candle_core::DType::F32)?,
            );
            for sel in [None, Some(odd.as_slice())] {
                let run_op = |k: &Tensor, v: &Tensor, path| {
                    let op = RowAttention {
                        key_positions: None,
                        head_keys: sel,
                        start: t - l,
                        path,
                    };
                    q.apply_op3_no_bwd(k, v, &op)?
                        .flatten_all()?
                        .to_vec1::<f32>()
                };
                let want = run_op(&k32, &v32, SimdPath::Scalar)?;
                for path in available_paths() {
                    let got = run_op(&k16, &v16, path)?;
                    assert_eq!(got, want, "d={d} l={l} {path:?} {sel:?}");
                }
            }
        }
        Ok(())
    }
}

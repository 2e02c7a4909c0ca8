//! The keys and values attention reads, as the KV cache stores them ([`KvDtype`]): f32, f16,
//! bf16 or q8_0 blocks, and their widening to f32.
//!
//! Every stored value widens to one f32 (f16 and bf16 exactly; a q8_0 value as `q * scale`,
//! one rounding, the same wherever it is done), so the kernel's arithmetic after the widening
//! is the f32 kernel's on those values, bit for bit, whichever way the rows were read: in
//! place by the AVX-512 loops (16 values widened per load) or converted block by block into
//! a scratch buffer.
//!
//! [`KvDtype`]: crate::kv_cache::KvDtype

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::NAME;
use crate::kernels::SimdPath;
use crate::kv_cache::{dequantize_q8, KvDtype, Q8_BLOCK, Q8_BLOCK_BYTES};

/// An element type of the cache's rows.
pub(super) trait Stored: Copy + 'static {
    /// The storage's values, when it holds this type.
    fn of(storage: &CpuStorage) -> Option<&[Self]>;
    /// Stored elements of a row of `d` values.
    fn row_len(d: usize) -> usize;
    /// The row's values widened to f32 (`out` holds them all).
    fn widen(row: &[Self], out: &mut [f32]);
}

impl Stored for f32 {
    fn of(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F32(data) => Some(data),
            _ => None,
        }
    }
    fn row_len(d: usize) -> usize {
        d
    }
    #[inline(always)]
    fn widen(row: &[Self], out: &mut [f32]) {
        out.copy_from_slice(row)
    }
}

impl Stored for f16 {
    fn of(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F16(data) => Some(data),
            _ => None,
        }
    }
    fn row_len(d: usize) -> usize {
        d
    }
    #[inline(always)]
    fn widen(row: &[Self], out: &mut [f32]) {
        row.convert_to_f32_slice(out)
    }
}

impl Stored for bf16 {
    fn of(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::BF16(data) => Some(data),
            _ => None,
        }
    }
    fn row_len(d: usize) -> usize {
        d
    }
    #[inline(always)]
    fn widen(row: &[Self], out: &mut [f32]) {
        row.convert_to_f32_slice(out)
    }
}

/// `u8`: the bytes of q8_0 blocks (34 per 32 values, see [`crate::kv_cache::KvDtype`]).
impl Stored for u8 {
    fn of(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::U8(data) => Some(data),
            _ => None,
        }
    }
    fn row_len(d: usize) -> usize {
        KvDtype::Q8_0.row_len(d)
    }
    #[inline(always)]
    fn widen(row: &[Self], out: &mut [f32]) {
        dequantize_q8(row, out)
    }
}

/// A 3-D tensor read as rows of its last dimension: `row(a, b)` is `x[a, b, ..]`.
pub(super) struct Rows<'a, E: Stored> {
    data: Cow<'a, [E]>,
    offset: usize,
    strides: (usize, usize),
    /// `(a, b, stored elements per row)`.
    pub(super) dims: (usize, usize, usize),
}

impl<'a, E: Stored> Rows<'a, E> {
    /// Borrows the storage when rows are contiguous (the cache views are), else gathers a
    /// contiguous copy; `None` when the storage holds another type.
    pub(super) fn new(
        what: &str,
        storage: &'a CpuStorage,
        layout: &Layout,
    ) -> Result<Option<Self>> {
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
    pub(super) fn row(&self, a: usize, b: usize) -> &[E] {
        let o = self.offset + a * self.strides.0 + b * self.strides.1;
        &self.data[o..o + self.dims.2]
    }

    /// Rows `j0..` of head `kv`, in place.
    #[inline(always)]
    fn block(&self, kv: usize, j0: usize) -> Block<'_, E> {
        let start = self.offset + kv * self.strides.0 + j0 * self.strides.1;
        Block {
            data: &self.data[start..],
            stride: self.strides.1,
            len: self.dims.2,
        }
    }

    /// Rows `j0..` of head `kv` widened into `out` (as many rows as it holds), `d` values each.
    #[inline(always)]
    fn widen_rows(&self, kv: usize, j0: usize, d: usize, out: &mut [f32]) {
        let len = self.dims.2;
        if self.strides.1 == len {
            // Consecutive rows are one run of memory (and a q8_0 row is whole blocks): one call.
            let start = self.offset + kv * self.strides.0 + j0 * len;
            E::widen(&self.data[start..start + out.len() / d * len], out);
        } else {
            for (j, row) in (j0..).zip(out.chunks_exact_mut(d)) {
                E::widen(self.row(kv, j), row);
            }
        }
    }

    /// All rows as f32 rows of `d` values.
    fn widened(&self, d: usize) -> Rows<'static, f32> {
        let (a, b, _) = self.dims;
        let mut data = vec![0f32; a * b * d];
        for (kv, out) in data.chunks_exact_mut(b * d).enumerate() {
            self.widen_rows(kv, 0, d, out);
        }
        Rows {
            data: Cow::Owned(data),
            offset: 0,
            strides: (b * d, d),
            dims: (a, b, d),
        }
    }
}

/// Consecutive rows (keys or values) of one key/value head, as stored; `row(0)` is the first.
#[derive(Clone, Copy)]
pub(super) struct Block<'a, E = f32> {
    data: &'a [E],
    stride: usize,
    /// Stored elements per row.
    pub(super) len: usize,
}

impl<E> Block<'_, E> {
    #[inline(always)]
    pub(super) fn row(&self, j: usize) -> &[E] {
        let o = j * self.stride;
        &self.data[o..o + self.len]
    }
}

/// Keys or values as the cache holds them.
pub(super) enum Cached<'a> {
    F32(Rows<'a, f32>),
    F16(Rows<'a, f16>),
    Bf16(Rows<'a, bf16>),
    Q8(Rows<'a, u8>),
}

/// A stored block that the AVX-512 loops read in place ([`Cached::in_place`]).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) enum InPlace<'a> {
    F16(Block<'a, f16>),
    Bf16(Block<'a, bf16>),
    Q8(Block<'a, u8>),
}

impl<'a> Cached<'a> {
    pub(super) fn new(what: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        if let Some(rows) = Rows::new(what, storage, layout)? {
            return Ok(Self::F32(rows));
        }
        if let Some(rows) = Rows::new(what, storage, layout)? {
            return Ok(Self::F16(rows));
        }
        if let Some(rows) = Rows::new(what, storage, layout)? {
            return Ok(Self::Bf16(rows));
        }
        let Some(rows) = Rows::<u8>::new(what, storage, layout)? else {
            bail!(
                "{NAME}: {what} must be f32, f16, bf16 or q8_0 bytes, got {:?}",
                storage.dtype()
            )
        };
        if !rows.dims.2.is_multiple_of(Q8_BLOCK_BYTES) {
            bail!(
                "{NAME}: {what} rows of {} bytes are not q8_0 blocks",
                rows.dims.2
            )
        }
        Ok(Self::Q8(rows))
    }

    /// `(n_kv, T, d)`, `d` counting values (not stored elements).
    pub(super) fn dims(&self) -> (usize, usize, usize) {
        match self {
            Self::F32(r) => r.dims,
            Self::F16(r) => r.dims,
            Self::Bf16(r) => r.dims,
            Self::Q8(r) => {
                let (a, b, bytes) = r.dims;
                (a, b, bytes / Q8_BLOCK_BYTES * Q8_BLOCK)
            }
        }
    }

    /// Rows `j0..j0 + len` of key/value head `kv` as f32: in place for an f32 cache, else
    /// widened into `scratch`.
    #[inline(always)]
    pub(super) fn block<'b>(
        &'b self,
        kv: usize,
        j0: usize,
        len: usize,
        scratch: &'b mut Vec<f32>,
    ) -> Block<'b> {
        let d = self.dims().2;
        if let Self::F32(r) = self {
            return r.block(kv, j0);
        }
        scratch.resize(len * d, 0.0);
        match self {
            Self::F32(_) => {}
            Self::F16(r) => r.widen_rows(kv, j0, d, scratch),
            Self::Bf16(r) => r.widen_rows(kv, j0, d, scratch),
            Self::Q8(r) => r.widen_rows(kv, j0, d, scratch),
        }
        Block {
            data: scratch,
            stride: d,
            len: d,
        }
    }

    /// A packed cache's rows `j0..` of key/value head `kv` in place, for the AVX-512 loops
    /// that widen 16 values per load (see [`reads_in_place`]); `None` where rows go through
    /// [`Cached::block`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(super) fn in_place(&self, path: SimdPath, kv: usize, j0: usize) -> Option<InPlace<'_>> {
        if !reads_in_place(path, self.dims().2) {
            return None;
        }
        match self {
            Self::F32(_) => None,
            Self::F16(r) => Some(InPlace::F16(r.block(kv, j0))),
            Self::Bf16(r) => Some(InPlace::Bf16(r.block(kv, j0))),
            Self::Q8(r) => Some(InPlace::Q8(r.block(kv, j0))),
        }
    }

    /// Whether a call with many queries (a prefill chunk) should widen the whole cache first
    /// rather than read it as stored: always for q8_0, whose in-place loads take three more
    /// instructions per 16 values than an f16 load (a 2,048-token prefill about 1.1x faster
    /// widened, one run each); for f16 and bf16 only where the loops cannot read them in place.
    pub(super) fn widen_for_many_queries(&self, path: SimdPath) -> bool {
        match self {
            Self::F32(_) => false,
            Self::Q8(_) => true,
            Self::F16(_) | Self::Bf16(_) => !reads_in_place(path, self.dims().2),
        }
    }

    /// The same values as f32 rows (a copy for a packed cache): for calls with many queries,
    /// which would otherwise widen every block once per query.
    pub(super) fn widened(self) -> Self {
        let d = self.dims().2;
        match self {
            Self::F32(_) => self,
            Self::F16(r) => Self::F32(r.widened(d)),
            Self::Bf16(r) => Self::F32(r.widened(d)),
            Self::Q8(r) => Self::F32(r.widened(d)),
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl InPlace<'_> {
    /// [`x86::scores_avx512`](super::x86::scores_avx512) on these keys.
    #[inline(always)]
    pub(super) fn scores(self, q: &[f32], scale: f32, s: &mut [f32]) {
        use super::x86::scores_avx512;
        // SAFETY: an `InPlace` exists only on the AVX-512 path ([`reads_in_place`]), whose
        // CPU features were detected.
        unsafe {
            match self {
                Self::F16(k) => scores_avx512(q, k, scale, s),
                Self::Bf16(k) => scores_avx512(q, k, scale, s),
                Self::Q8(k) => scores_avx512(q, k, scale, s),
            }
        }
    }

    /// [`x86::value_sum_avx512`](super::x86::value_sum_avx512) over these values (`d` of 64
    /// or 128, as [`reads_in_place`] requires).
    #[inline(always)]
    pub(super) fn value_sum(self, p: &[f32], odd_first: bool, even: &mut [f32], odd: &mut [f32]) {
        use super::x86::value_sum_avx512 as sum;
        let wide = even.len() >= 128;
        // SAFETY: as for the scores.
        unsafe {
            match (self, wide) {
                (Self::F16(v), false) => sum::<_, 4>(p, v, odd_first, even, odd),
                (Self::F16(v), true) => sum::<_, 8>(p, v, odd_first, even, odd),
                (Self::Bf16(v), false) => sum::<_, 4>(p, v, odd_first, even, odd),
                (Self::Bf16(v), true) => sum::<_, 8>(p, v, odd_first, even, odd),
                (Self::Q8(v), false) => sum::<_, 4>(p, v, odd_first, even, odd),
                (Self::Q8(v), true) => sum::<_, 8>(p, v, odd_first, even, odd),
            }
        }
    }
}

/// Whether `path` reads packed rows of `d` values in place: the AVX-512 loops, which widen 16
/// values per load, for heads of 64 or 128 values.
#[inline(always)]
pub(super) fn reads_in_place(path: SimdPath, d: usize) -> bool {
    cfg!(target_arch = "x86_64") && path == SimdPath::Avx512Vnni && matches!(d, 64 | 128)
}

//! A validating walk over a GGUF header, run before candle parses the file.
//!
//! candle's `gguf_file::Content::read` (0.11) caps string and array lengths against the bytes
//! left, but still trusts the rest of the header: `general.alignment = 0` divides by zero when
//! it places the tensor data; a tensor's element count and byte size are multiplied unchecked
//! when the tensor is read (a debug build panics, a release build wraps to a small size and
//! then builds a tensor whose shape promises far more data than it holds, which panics with a
//! capacity overflow on first use); a zero-sized tensor casts an unaligned empty buffer to
//! `f32` blocks; an alignment of an unexpected type (u64, negative i32) is silently replaced by
//! the default, so every tensor is read from the wrong place; repeated keys and tensor names
//! silently overwrite each other. This walker reads the same header (GGUF v1 to v3, as candle
//! does) with every length bounded by the bytes that remain and every size computed with
//! checked arithmetic, keeps nothing but key and tensor names, and names the field at fault:
//! `general.alignment`, ``tensor `direction.3`: dims``, a metadata key. Both GGUF loaders (the
//! model at start-up, llama.cpp control vectors at run time) call it first and hand the file
//! to candle only when it passes.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::GgmlDType;

/// candle's caps (`GGUF_MAX_STRING_LENGTH`, `GGUF_MAX_ARRAY_ELEMENTS`, `GGML_MAX_DIMS`,
/// `GGUF_MAX_VALUE_DEPTH`), so that what passes here also passes there.
const MAX_STRING_LEN: u64 = 1 << 30;
const MAX_ARRAY_LEN: u64 = 1 << 30;
const MAX_DIMS: u64 = 4;
const MAX_DEPTH: u64 = 64;
const DEFAULT_ALIGNMENT: u64 = 32;
const ALIGNMENT_KEY: &str = "general.alignment";

/// A header fault: the field it is in and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct GgufError {
    /// `magic`, `tensor_count`, a metadata key (`general.alignment`), `metadata key #3`,
    /// ``tensor `direction.3`: dims``, ...
    pub field: String,
    pub problem: GgufProblem,
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufProblem {
    #[error("the file ends early: {needed} more bytes needed, {remaining} left")]
    Truncated { needed: u64, remaining: u64 },
    #[error("{value} exceeds the limit of {max}")]
    TooLarge { value: u64, max: u64 },
    #[error("not a GGUF file (magic {0:#010x})")]
    BadMagic(u32),
    #[error("unsupported GGUF version {0} (supported: 1, 2, 3)")]
    UnsupportedVersion(u32),
    #[error("unknown value type {0}")]
    UnknownValueType(u32),
    #[error("boolean byte {0} is neither 0 nor 1")]
    BadBool(u8),
    #[error("appears more than once")]
    Duplicate,
    #[error("must be an unsigned integer, found a {0}")]
    WrongType(&'static str),
    #[error("must be a power of two, found {0}")]
    BadAlignment(i64),
    #[error("a tensor needs at least one dimension")]
    NoDims,
    #[error("dimension {index} is 0")]
    ZeroDim { index: usize },
    #[error("{dims:?} elements of {dtype} do not fit in 64 bits")]
    SizeOverflow { dims: Vec<u64>, dtype: String },
    #[error("unknown ggml type {0}")]
    UnknownDType(u32),
    #[error("ggml type {0} cannot be loaded")]
    UnsupportedDType(String),
    #[error("first dimension {dim} is not a multiple of the {dtype} block size {block}")]
    PartialBlock { dim: u64, dtype: String, block: u64 },
    #[error("offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned { offset: u64, alignment: u64 },
    #[error("{bytes} bytes at offset {offset} do not fit in the {available} bytes of tensor data")]
    PastEnd {
        offset: u64,
        bytes: u64,
        available: u64,
    },
    #[error("read failed: {0}")]
    Io(String),
}

/// What a valid header declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSummary {
    pub version: u32,
    pub metadata: u64,
    pub tensors: u64,
    pub alignment: u64,
    /// Where tensor data starts, as candle computes it (`Content::tensor_data_offset`).
    pub data_offset: u64,
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

fn fault(field: &str, problem: GgufProblem) -> GgufError {
    GgufError {
        field: field.to_string(),
        problem,
    }
}

/// Checks the GGUF header in `bytes` (a whole file).
pub fn check_gguf(bytes: &[u8]) -> Result<GgufSummary> {
    walk(Walker::new(bytes, bytes.len() as u64))
}

/// Checks the GGUF header of the file behind `reader`, bounding every length by the file's
/// size, and leaves `reader` at the start of the file for the real parse.
pub fn check_gguf_reader<R: Read + Seek>(reader: &mut R) -> Result<GgufSummary> {
    let io = |e: std::io::Error| fault("file", GgufProblem::Io(e.to_string()));
    let len = reader.seek(SeekFrom::End(0)).map_err(io)?;
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    let summary = walk(Walker::new(&mut *reader, len));
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    summary
}

/// One tensor's declared place in the data section, checked once the section's start is known.
struct TensorSpan {
    field: String,
    offset: u64,
    bytes: u64,
}

fn walk<R: Read>(mut w: Walker<R>) -> Result<GgufSummary> {
    let magic = w.u32("magic")?;
    // candle accepts the magic in either byte order.
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Err(fault("magic", GgufProblem::BadMagic(magic)));
    }
    let version = w.u32("version")?;
    if !(1..=3).contains(&version) {
        return Err(fault("version", GgufProblem::UnsupportedVersion(version)));
    }
    w.wide = version >= 2;
    let tensors = w.length("tensor_count")?;
    let metadata = w.length("metadata_kv_count")?;
    // The smallest key-value pair and tensor entry, so that absurd counts fail up front.
    let prefix = w.prefix();
    w.fits("tensor_count", tensors, MAX_ARRAY_LEN, prefix + 16)?;
    w.fits("metadata_kv_count", metadata, MAX_ARRAY_LEN, prefix + 5)?;
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut keys = HashSet::new();
    for i in 0..metadata {
        let key = w.name(&format!("metadata key #{i}"))?;
        if !keys.insert(key.clone()) {
            return Err(fault(&key, GgufProblem::Duplicate));
        }
        let ty = w.u32(&key)?;
        match key == ALIGNMENT_KEY {
            true => alignment = w.alignment(ty)?,
            false => w.value(ty, &key, 0)?,
        }
    }
    let mut names = HashSet::new();
    let mut spans = Vec::new();
    for i in 0..tensors {
        let name = w.name(&format!("tensor #{i}: name"))?;
        if !names.insert(name.clone()) {
            return Err(fault(&format!("tensor `{name}`"), GgufProblem::Duplicate));
        }
        spans.push(w.tensor_info(&name)?);
    }
    let data_offset = w.pos.div_ceil(alignment) * alignment;
    let available = w.len.saturating_sub(data_offset);
    for span in &spans {
        check_span(span, alignment, available)?;
    }
    Ok(GgufSummary {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

fn check_span(span: &TensorSpan, alignment: u64, available: u64) -> Result<()> {
    let field = format!("{}: offset", span.field);
    if !span.offset.is_multiple_of(alignment) {
        let problem = GgufProblem::Misaligned {
            offset: span.offset,
            alignment,
        };
        return Err(fault(&field, problem));
    }
    if span.offset > available || span.bytes > available - span.offset {
        let problem = GgufProblem::PastEnd {
            offset: span.offset,
            bytes: span.bytes,
            available,
        };
        return Err(fault(&field, problem));
    }
    Ok(())
}

/// A reader that knows how many bytes remain, so that no length is trusted beyond them.
struct Walker<R> {
    r: R,
    pos: u64,
    len: u64,
    /// GGUF v2 and later write lengths and dimensions as u64, v1 as u32.
    wide: bool,
}

impl<R: Read> Walker<R> {
    fn new(r: R, len: u64) -> Self {
        Self {
            r,
            pos: 0,
            len,
            wide: true,
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn prefix(&self) -> u64 {
        if self.wide {
            8
        } else {
            4
        }
    }

    fn need(&self, field: &str, needed: u64) -> Result<()> {
        let remaining = self.remaining();
        match needed > remaining {
            true => Err(fault(field, GgufProblem::Truncated { needed, remaining })),
            false => Ok(()),
        }
    }

    /// `count` items of at least `min_size` bytes each: within `max` and within the file.
    fn fits(&self, field: &str, count: u64, max: u64, min_size: u64) -> Result<()> {
        if count > max {
            return Err(fault(field, GgufProblem::TooLarge { value: count, max }));
        }
        self.need(field, count.saturating_mul(min_size))
    }

    fn bytes<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        self.need(field, N as u64)?;
        let mut buf = [0u8; N];
        self.r
            .read_exact(&mut buf)
            .map_err(|e| io_fault(field, e))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, field: &str) -> Result<u32> {
        self.bytes(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &str) -> Result<u64> {
        self.bytes(field).map(u64::from_le_bytes)
    }

    /// A string or array length, or a dimension: u64 from v2 on, u32 in v1.
    fn length(&mut self, field: &str) -> Result<u64> {
        match self.wide {
            true => self.u64(field),
            false => self.u32(field).map(u64::from),
        }
    }

    /// Consumes `n` bytes without keeping them.
    fn skip(&mut self, field: &str, n: u64) -> Result<()> {
        self.need(field, n)?;
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())
            .map_err(|e| io_fault(field, e))?;
        if copied != n {
            let problem = GgufProblem::Truncated {
                needed: n,
                remaining: copied,
            };
            return Err(fault(field, problem));
        }
        self.pos += n;
        Ok(())
    }

    fn string_len(&mut self, field: &str) -> Result<u64> {
        let len = self.length(field)?;
        self.fits(field, len, MAX_STRING_LEN, 1)?;
        Ok(len)
    }

    /// A key or tensor name, normalised as candle does (trailing NULs dropped, invalid UTF-8
    /// replaced) so that duplicates are caught as candle would collapse them.
    fn name(&mut self, field: &str) -> Result<String> {
        let len = self.string_len(field)?;
        let mut buf = Vec::new();
        let read = (&mut self.r)
            .take(len)
            .read_to_end(&mut buf)
            .map_err(|e| io_fault(field, e))?;
        if read as u64 != len {
            let problem = GgufProblem::Truncated {
                needed: len,
                remaining: read as u64,
            };
            return Err(fault(field, problem));
        }
        self.pos += len;
        while buf.last() == Some(&0) {
            buf.pop();
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// A metadata value of type `ty` at array nesting `depth`, read and dropped.
    fn value(&mut self, ty: u32, field: &str, depth: u64) -> Result<()> {
        if depth > MAX_DEPTH {
            let problem = GgufProblem::TooLarge {
                value: depth,
                max: MAX_DEPTH,
            };
            return Err(fault(field, problem));
        }
        match ValueKind::from_u32(ty) {
            Some(ValueKind::Bool) => match self.bytes::<1>(field)?[0] {
                0 | 1 => Ok(()),
                b => Err(fault(field, GgufProblem::BadBool(b))),
            },
            Some(ValueKind::Fixed(size)) => self.skip(field, size),
            Some(ValueKind::String) => {
                let len = self.string_len(field)?;
                self.skip(field, len)
            }
            Some(ValueKind::Array) => self.array(field, depth),
            None => Err(fault(field, GgufProblem::UnknownValueType(ty))),
        }
    }

    fn array(&mut self, field: &str, depth: u64) -> Result<()> {
        let ty = self.u32(field)?;
        let kind = ValueKind::from_u32(ty)
            .ok_or_else(|| fault(field, GgufProblem::UnknownValueType(ty)))?;
        let len = self.length(field)?;
        self.fits(field, len, MAX_ARRAY_LEN, kind.min_size(self.prefix()))?;
        // candle checks the depth of every element, numbers included.
        if len > 0 && depth + 1 > MAX_DEPTH {
            let problem = GgufProblem::TooLarge {
                value: depth + 1,
                max: MAX_DEPTH,
            };
            return Err(fault(field, problem));
        }
        match kind {
            // Plain numbers: one bounded skip rather than `len` small reads.
            ValueKind::Fixed(size) => self.skip(field, len * size),
            _ => (0..len).try_for_each(|_| self.value(ty, field, depth + 1)),
        }
    }

    /// `general.alignment`: one of the integer types candle honours (it silently falls back to
    /// 32 for any other), and a power of two (0 divides by zero in candle).
    fn alignment(&mut self, ty: u32) -> Result<u64> {
        let field = ALIGNMENT_KEY;
        let value: i64 = match ty {
            0 => self.bytes::<1>(field)?[0].into(),
            1 => i8::from_le_bytes(self.bytes(field)?).into(),
            2 => u16::from_le_bytes(self.bytes(field)?).into(),
            3 => i16::from_le_bytes(self.bytes(field)?).into(),
            4 => u32::from_le_bytes(self.bytes(field)?).into(),
            5 => i32::from_le_bytes(self.bytes(field)?).into(),
            other => {
                let name = value_type_name(other);
                return Err(fault(field, GgufProblem::WrongType(name)));
            }
        };
        match u64::try_from(value) {
            Ok(a) if a.is_power_of_two() => Ok(a),
            _ => Err(fault(field, GgufProblem::BadAlignment(value))),
        }
    }

    /// One tensor directory entry: dims, type and offset, with its byte size computed checked.
    fn tensor_info(&mut self, name: &str) -> Result<TensorSpan> {
        let field = format!("tensor `{name}`");
        let dims_field = format!("{field}: dims");
        let n_dims = u64::from(self.u32(&dims_field)?);
        if n_dims == 0 {
            return Err(fault(&dims_field, GgufProblem::NoDims));
        }
        self.fits(&dims_field, n_dims, MAX_DIMS, self.prefix())?;
        let mut dims = Vec::new();
        for index in 0..n_dims as usize {
            let d = self.length(&dims_field)?;
            if d == 0 {
                return Err(fault(&dims_field, GgufProblem::ZeroDim { index }));
            }
            dims.push(d);
        }
        let type_field = format!("{field}: type");
        let dtype = ggml_dtype(self.u32(&type_field)?).map_err(|p| fault(&type_field, p))?;
        let bytes = byte_size(&dims, dtype).map_err(|p| fault(&dims_field, p))?;
        let offset = self.u64(&format!("{field}: offset"))?;
        Ok(TensorSpan {
            field,
            offset,
            bytes,
        })
    }
}

fn io_fault(field: &str, e: std::io::Error) -> GgufError {
    fault(field, GgufProblem::Io(e.to_string()))
}

/// The bytes a tensor of `dims` (GGUF order: the first is the innermost) takes, if whole
/// blocks cover its rows and the count fits in 64 bits (candle computes it unchecked).
fn byte_size(dims: &[u64], dtype: GgmlDType) -> Result<u64, GgufProblem> {
    let block = dtype.block_size() as u64;
    let name = format!("{dtype:?}");
    let inner = dims.first().copied().unwrap_or(1);
    if !inner.is_multiple_of(block) {
        let problem = GgufProblem::PartialBlock {
            dim: inner,
            dtype: name,
            block,
        };
        return Err(problem);
    }
    let overflow = || GgufProblem::SizeOverflow {
        dims: dims.to_vec(),
        dtype: format!("{dtype:?}"),
    };
    let elements = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .filter(|&n| usize::try_from(n).is_ok())
        .ok_or_else(overflow)?;
    (elements / block)
        .checked_mul(dtype.type_size() as u64)
        .ok_or_else(overflow)
}

/// The ggml types candle can load from a GGUF file (`ggml_file::qtensor_from_ggml`).
fn ggml_dtype(ty: u32) -> Result<GgmlDType, GgufProblem> {
    use GgmlDType as T;
    Ok(match ty {
        0 => T::F32,
        1 => T::F16,
        2 => T::Q4_0,
        3 => T::Q4_1,
        6 => T::Q5_0,
        7 => T::Q5_1,
        8 => T::Q8_0,
        10 => T::Q2K,
        11 => T::Q3K,
        12 => T::Q4K,
        13 => T::Q5K,
        14 => T::Q6K,
        30 => T::BF16,
        9 => return Err(GgufProblem::UnsupportedDType("Q8_1".into())),
        15 => return Err(GgufProblem::UnsupportedDType("Q8K".into())),
        other => return Err(GgufProblem::UnknownDType(other)),
    })
}

/// How a metadata value type is laid out on disk.
#[derive(Debug, Clone, Copy)]
enum ValueKind {
    /// A number of this many bytes.
    Fixed(u64),
    Bool,
    String,
    Array,
}

impl ValueKind {
    fn from_u32(ty: u32) -> Option<Self> {
        Some(match ty {
            0 | 1 => Self::Fixed(1),
            2 | 3 => Self::Fixed(2),
            4..=6 => Self::Fixed(4),
            10..=12 => Self::Fixed(8),
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            _ => return None,
        })
    }

    /// The fewest bytes one value takes (an empty string or array is its length prefix).
    fn min_size(self, prefix: u64) -> u64 {
        match self {
            Self::Fixed(n) => n,
            Self::Bool => 1,
            Self::String => prefix,
            Self::Array => 4 + prefix,
        }
    }
}

fn value_type_name(ty: u32) -> &'static str {
    match ty {
        6 => "f32",
        7 => "bool",
        8 => "string",
        9 => "array",
        10 => "u64",
        11 => "i64",
        12 => "f64",
        _ => "value of unknown type",
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use candle_core::quantized::gguf_file::{self, Content, Value};
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    use super::*;

    const F32: u32 = 0;
    const U32: u32 = 4;
    const STRING: u32 = 8;
    const ARRAY: u32 = 9;

    /// A GGUF file written byte by byte, so that any field can hold any value.
    struct Gguf {
        version: u32,
        alignment: usize,
        kvs: Vec<(String, u32, Vec<u8>)>,
        tensors: Vec<(String, Vec<u64>, u32, u64)>,
        data: Vec<u8>,
    }

    /// A string value as GGUF v2 and v3 write it.
    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    }

    impl Gguf {
        fn valid() -> Self {
            Self::valid_v(3)
        }

        /// A valid control-vector-like file: two metadata keys and one F32 `(4,)` tensor whose
        /// data ends the file, so that every shorter prefix is truncated.
        fn valid_v(version: u32) -> Self {
            let arch = match version {
                1 => [&13u32.to_le_bytes()[..], b"controlvector"].concat(),
                _ => string("controlvector"),
            };
            Self {
                version,
                alignment: 32,
                kvs: vec![
                    ("general.architecture".into(), STRING, arch),
                    (
                        "controlvector.layer_count".into(),
                        U32,
                        1u32.to_le_bytes().into(),
                    ),
                ],
                tensors: vec![("direction.1".into(), vec![4], F32, 0)],
                data: [1f32, -2.0, 0.5, 4.0]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            }
        }

        fn kv(mut self, key: &str, ty: u32, payload: Vec<u8>) -> Self {
            self.kvs.push((key.into(), ty, payload));
            self
        }

        fn tensor(mut self, dims: Vec<u64>, dtype: u32, offset: u64) -> Self {
            self.tensors[0] = ("direction.1".into(), dims, dtype, offset);
            self
        }

        fn length(&self, out: &mut Vec<u8>, n: u64) {
            match self.version {
                1 => out.extend_from_slice(&(n as u32).to_le_bytes()),
                _ => out.extend_from_slice(&n.to_le_bytes()),
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend_from_slice(&self.version.to_le_bytes());
            self.length(&mut out, self.tensors.len() as u64);
            self.length(&mut out, self.kvs.len() as u64);
            for (key, ty, payload) in &self.kvs {
                self.length(&mut out, key.len() as u64);
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(payload);
            }
            for (name, dims, dtype, offset) in &self.tensors {
                self.length(&mut out, name.len() as u64);
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
                dims.iter().for_each(|&d| self.length(&mut out, d));
                out.extend_from_slice(&dtype.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
            }
            out.resize(out.len().div_ceil(self.alignment) * self.alignment, 0);
            out.extend_from_slice(&self.data);
            out
        }
    }

    /// The check's verdict on `g`, which must be a fault in `field`.
    fn fault_in(g: &Gguf, field: &str) -> GgufProblem {
        match check_gguf(&g.bytes()) {
            Ok(s) => panic!("expected a fault in `{field}`, the check passed: {s:?}"),
            Err(e) => {
                assert_eq!(e.field, field, "{e}");
                e.problem
            }
        }
    }

    /// candle's parse of `bytes` with every tensor read and dequantized: the data offset, or
    /// `None` if candle refuses the file. A panic fails the calling test.
    fn candle_reads(bytes: &[u8]) -> Option<u64> {
        let mut cursor = Cursor::new(bytes);
        let content = Content::read(&mut cursor).ok()?;
        for name in content.tensor_infos.keys() {
            let t = content.tensor(&mut cursor, name, &Device::Cpu).ok()?;
            t.dequantize(&Device::Cpu).ok()?;
        }
        Some(content.tensor_data_offset)
    }

    #[test]
    fn a_valid_file_passes_and_candle_agrees_on_the_data_offset() {
        for version in [1, 2, 3] {
            let bytes = Gguf::valid_v(version).bytes();
            let summary = check_gguf(&bytes).unwrap();
            assert_eq!(summary.version, version);
            assert_eq!((summary.metadata, summary.tensors), (2, 1));
            assert_eq!(candle_reads(&bytes), Some(summary.data_offset));
            let mut reader = Cursor::new(&bytes);
            assert_eq!(check_gguf_reader(&mut reader).unwrap(), summary);
            assert_eq!(reader.position(), 0, "the reader is rewound for candle");
        }
    }

    #[test]
    fn alignment_zero_is_named_instead_of_dividing_by_zero() {
        let g = Gguf::valid().kv(ALIGNMENT_KEY, U32, 0u32.to_le_bytes().into());
        assert_eq!(fault_in(&g, ALIGNMENT_KEY), GgufProblem::BadAlignment(0));
        let g = Gguf::valid().kv(ALIGNMENT_KEY, U32, 48u32.to_le_bytes().into());
        assert_eq!(fault_in(&g, ALIGNMENT_KEY), GgufProblem::BadAlignment(48));
        let g = Gguf::valid().kv(ALIGNMENT_KEY, 5, (-32i32).to_le_bytes().into());
        assert_eq!(fault_in(&g, ALIGNMENT_KEY), GgufProblem::BadAlignment(-32));
        // candle would silently use 32 instead of a u64 alignment.
        let g = Gguf::valid().kv(ALIGNMENT_KEY, 10, 64u64.to_le_bytes().into());
        assert_eq!(fault_in(&g, ALIGNMENT_KEY), GgufProblem::WrongType("u64"));
    }

    #[test]
    fn a_tensor_of_2_pow_62_elements_is_named_instead_of_overflowing() {
        let g = Gguf::valid().tensor(vec![1 << 62], F32, 0);
        let problem = fault_in(&g, "tensor `direction.1`: dims");
        assert!(
            matches!(problem, GgufProblem::SizeOverflow { .. }),
            "{problem}"
        );
        let g = Gguf::valid().tensor(vec![1 << 31, 1 << 31, 1 << 31], F32, 0);
        let problem = fault_in(&g, "tensor `direction.1`: dims");
        assert!(
            matches!(problem, GgufProblem::SizeOverflow { .. }),
            "{problem}"
        );
        // Small enough to count, far too large for the file.
        let g = Gguf::valid().tensor(vec![1 << 40], F32, 0);
        let problem = fault_in(&g, "tensor `direction.1`: offset");
        assert!(matches!(problem, GgufProblem::PastEnd { .. }), "{problem}");
    }

    #[test]
    fn huge_string_and_array_lengths_are_named_before_any_allocation() {
        let g = Gguf::valid().kv("general.name", STRING, (1u64 << 60).to_le_bytes().into());
        let max = MAX_STRING_LEN;
        let too_large = GgufProblem::TooLarge {
            value: 1 << 60,
            max,
        };
        assert_eq!(fault_in(&g, "general.name"), too_large);
        let mut array = U32.to_le_bytes().to_vec();
        array.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let g = Gguf::valid().kv("tokenizer.ggml.scores", ARRAY, array);
        assert_eq!(fault_in(&g, "tokenizer.ggml.scores"), too_large);
        // Under the cap, but more than the file holds.
        let mut array = U32.to_le_bytes().to_vec();
        array.extend_from_slice(&(1u64 << 29).to_le_bytes());
        let g = Gguf::valid().kv("tokenizer.ggml.scores", ARRAY, array);
        let problem = fault_in(&g, "tokenizer.ggml.scores");
        assert!(
            matches!(problem, GgufProblem::Truncated { .. }),
            "{problem}"
        );
        let mut key = Gguf::valid().bytes();
        key[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert_eq!(check_gguf(&key).unwrap_err().field, "metadata key #0");
    }

    #[test]
    fn tensor_directory_faults_are_named() {
        let dims = "tensor `direction.1`: dims";
        let g = Gguf::valid().tensor(vec![4; 1000], F32, 0);
        assert_eq!(
            fault_in(&g, dims),
            GgufProblem::TooLarge {
                value: 1000,
                max: 4
            }
        );
        let g = Gguf::valid().tensor(vec![], F32, 0);
        assert_eq!(fault_in(&g, dims), GgufProblem::NoDims);
        let g = Gguf::valid().tensor(vec![4, 0], F32, 0);
        assert_eq!(fault_in(&g, dims), GgufProblem::ZeroDim { index: 1 });
        let g = Gguf::valid().tensor(vec![10], 8, 0);
        let problem = fault_in(&g, dims);
        assert!(
            matches!(problem, GgufProblem::PartialBlock { dim: 10, .. }),
            "{problem}"
        );
        let ty = "tensor `direction.1`: type";
        let g = Gguf::valid().tensor(vec![4], 99, 0);
        assert_eq!(fault_in(&g, ty), GgufProblem::UnknownDType(99));
        let g = Gguf::valid().tensor(vec![32], 9, 0);
        assert!(matches!(fault_in(&g, ty), GgufProblem::UnsupportedDType(_)));
        let offset = "tensor `direction.1`: offset";
        let g = Gguf::valid().tensor(vec![4], F32, 8);
        let misaligned = GgufProblem::Misaligned {
            offset: 8,
            alignment: 32,
        };
        assert_eq!(fault_in(&g, offset), misaligned);
        for past in [1 << 40, u64::MAX - 31] {
            let g = Gguf::valid().tensor(vec![4], F32, past);
            let problem = fault_in(&g, offset);
            assert!(matches!(problem, GgufProblem::PastEnd { .. }), "{problem}");
        }
    }

    #[test]
    fn metadata_faults_are_named() {
        let g = Gguf::valid().kv("general.architecture", STRING, string("llama"));
        assert_eq!(fault_in(&g, "general.architecture"), GgufProblem::Duplicate);
        let g = Gguf::valid().kv("x", 7, vec![2]);
        assert_eq!(fault_in(&g, "x"), GgufProblem::BadBool(2));
        let g = Gguf::valid().kv("x", 13, vec![0; 8]);
        assert_eq!(fault_in(&g, "x"), GgufProblem::UnknownValueType(13));
        // Arrays nested one level deeper than candle accepts.
        let mut nested = Vec::new();
        for _ in 0..=MAX_DEPTH {
            nested.extend_from_slice(&ARRAY.to_le_bytes());
            nested.extend_from_slice(&1u64.to_le_bytes());
        }
        nested.extend_from_slice(&0u32.to_le_bytes());
        nested.extend_from_slice(&1u64.to_le_bytes());
        nested.push(7);
        let g = Gguf::valid().kv("x", ARRAY, nested);
        assert!(matches!(fault_in(&g, "x"), GgufProblem::TooLarge { .. }));
        let mut g = Gguf::valid();
        g.tensors.push(g.tensors[0].clone());
        assert_eq!(fault_in(&g, "tensor `direction.1`"), GgufProblem::Duplicate);
    }

    #[test]
    fn the_header_itself_is_checked() {
        let g = Gguf {
            version: 4,
            ..Gguf::valid()
        };
        assert_eq!(fault_in(&g, "version"), GgufProblem::UnsupportedVersion(4));
        let mut bytes = Gguf::valid().bytes();
        bytes[..4].copy_from_slice(b"GGML");
        assert_eq!(check_gguf(&bytes).unwrap_err().field, "magic");
        bytes[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        bytes[..4].copy_from_slice(b"GGUF");
        let problem = check_gguf(&bytes).unwrap_err();
        assert_eq!(problem.field, "tensor_count", "{problem}");
    }

    #[test]
    fn every_truncation_is_named() {
        let bytes = Gguf::valid().bytes();
        for cut in 0..bytes.len() {
            let e = check_gguf(&bytes[..cut]).unwrap_err();
            assert!(!e.field.is_empty(), "cut at {cut}: {e}");
            assert!(
                matches!(
                    e.problem,
                    GgufProblem::Truncated { .. } | GgufProblem::PastEnd { .. }
                ),
                "cut at {cut}: {e}"
            );
        }
    }

    /// A richer valid file, written by candle: every metadata type and a quantized tensor.
    fn candle_written() -> Vec<u8> {
        let q = |v: Vec<f32>, dtype| {
            let n = v.len();
            QTensor::quantize(&Tensor::from_vec(v, n, &Device::Cpu).unwrap(), dtype).unwrap()
        };
        let tensors = [
            ("a", q(vec![0.5; 4], GgmlDType::F32)),
            ("b", q((0..32).map(|i| i as f32).collect(), GgmlDType::Q8_0)),
            ("c", q(vec![1.5; 2], GgmlDType::F16)),
        ];
        let md = [
            ("general.architecture", Value::String("llama".into())),
            ("n", Value::U32(7)),
            ("f", Value::F32(0.25)),
            ("b", Value::Bool(true)),
            ("i", Value::I64(-3)),
            ("s", Value::Array(vec![Value::String("x".into()); 3])),
            ("u", Value::Array(vec![Value::U8(1); 5])),
        ];
        let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
        let mut out = Cursor::new(Vec::new());
        gguf_file::write(&mut out, &md, &ts).unwrap();
        out.into_inner()
    }

    #[test]
    fn seeded_mutations_never_panic_the_check_or_candle_after_it() {
        let valid = candle_written();
        let summary = check_gguf(&valid).unwrap();
        assert_eq!(candle_reads(&valid), Some(summary.data_offset));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
        let mut passed = 0;
        for _ in 0..20_000 {
            let mut bytes = valid.clone();
            for _ in 0..rng.random_range(1..=4) {
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..4) {
                    // A length, count or dimension blown up to a huge value.
                    0 if at + 8 <= bytes.len() => {
                        let big = 1u64 << rng.random_range(29..64);
                        bytes[at..at + 8].copy_from_slice(&big.to_le_bytes());
                    }
                    1 => bytes.truncate(at),
                    _ => bytes[at] = rng.random(),
                }
                if bytes.is_empty() {
                    break;
                }
            }
            if check_gguf(&bytes).is_ok() {
                passed += 1;
                assert!(
                    candle_reads(&bytes).is_some(),
                    "candle rejects a checked file"
                );
            }
        }
        // Mutations of tensor data and string contents stay valid: the loop did reach candle.
        assert!(passed > 100, "only {passed} mutated files passed the check");
    }
}

//! Weight matrices built from checkpoint tensors: copied into huge-page-backed memory when
//! the stored dtype is the one wanted, converted otherwise; FP8 blocks dequantized. bf16
//! matrices used with `matmul` are then packed (`Matrix::packed`) into the panel layout of
//! `kernels::cpu::packed`, which the kernels multiply at close to the CPU's peak rate.
//! Every value is checked for NaN and infinities block by block as it is copied or converted
//! (no extra pass over the weights); a bad one is refused naming the tensor and its file.

use crate::ModelError;
use crate::checkpoint::{Checkpoint, TensorView};
use crate::shapes::Spec;
use half::{bf16, f16};
use kernels::cpu::WeightRef;
use kernels::cpu::fp8::DequantTarget;
use kernels::cpu::packed::{PackedRef, pack_into, packed_len};
use memmap2::Mmap;
use safetensors::Dtype;

/// The dtype weight matrices are kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// As stored: f32 stays f32, bf16 stays bf16, f16 becomes f32, FP8 becomes bf16.
    #[default]
    Auto,
    F32,
    Bf16,
}

/// Contiguous typed storage: large buffers live in anonymous memory backed by transparent
/// huge pages where the kernel allows. Streaming gigabytes of weights per token through
/// 4 KiB pages costs a TLB miss every page, enough to lose a sixth of the bandwidth.
#[derive(Debug)]
enum Buf<T> {
    Owned(Vec<T>),
    Huge { map: Mmap, len: usize, _t: std::marker::PhantomData<T> },
}

/// Below this a buffer stays an ordinary Vec.
const HUGE_MIN_BYTES: usize = 1 << 21;

impl<T: bytemuck::Pod> Buf<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            Buf::Huge { map, len, .. } => bytemuck::cast_slice(&map[..len * std::mem::size_of::<T>()]),
        }
    }

    fn new(v: Vec<T>) -> Self {
        let bytes: &[u8] = bytemuck::cast_slice(&v);
        match huge_map(bytes.len()) {
            Some(mut map) => {
                map.copy_from_slice(bytes);
                Self::huge(map, v.len()).unwrap_or(Buf::Owned(v))
            }
            None => Buf::Owned(v),
        }
    }

    fn huge(map: memmap2::MmapMut, len: usize) -> Option<Self> {
        let map = map.make_read_only().ok()?;
        Some(Buf::Huge { map, len, _t: std::marker::PhantomData })
    }
}

impl<T: Float> Buf<T> {
    /// Little-endian bytes of `T`s (as stored in safetensors) copied into huge pages, each
    /// block checked as it is copied; `Err` holds the index of the first non-finite value.
    fn from_le_bytes(bytes: &[u8]) -> Result<Self, usize> {
        let len = bytes.len() / std::mem::size_of::<T>();
        if let Some(mut map) = huge_map(bytes.len()) {
            copy_checked::<T>(bytes, bytemuck::cast_slice_mut(&mut map[..]))?;
            if let Some(buf) = Self::huge(map, len) {
                return Ok(buf);
            }
        }
        let mut v = vec![T::zeroed(); len];
        copy_checked(bytes, &mut v)?;
        Ok(Buf::Owned(v))
    }
}

/// Anonymous memory for a large buffer, backed by huge pages where the kernel allows; `None`
/// for small buffers or when mapping fails (a Vec serves then).
fn huge_map(len: usize) -> Option<memmap2::MmapMut> {
    if len < HUGE_MIN_BYTES || cfg!(target_endian = "big") {
        return None;
    }
    let anon = memmap2::MmapMut::map_anon(len).ok()?;
    // Best effort: without THP the copy still works, with 4 KiB pages.
    let _ = anon.advise(memmap2::Advice::HugePage);
    Some(anon)
}

/// A dtype weights are kept in, with its finiteness test.
trait Float: bytemuck::Pod {
    fn finite(self) -> bool;
}

impl Float for f32 {
    fn finite(self) -> bool {
        self.is_finite()
    }
}

impl Float for bf16 {
    fn finite(self) -> bool {
        self.is_finite()
    }
}

/// Values checked at a time while copying or converting: a block is checked right after it
/// is written, while it is still in the L1 cache, so the check costs no pass over memory.
const CHECK_BLOCK: usize = 4096;

/// Index of the first NaN or infinity in `xs`. The common all-finite case is one branch-free
/// (vectorized) reduction.
fn first_non_finite<T: Float>(xs: &[T]) -> Option<usize> {
    if xs.iter().fold(true, |ok, &x| ok & x.finite()) { None } else { xs.iter().position(|&x| !x.finite()) }
}

/// Copies little-endian `src` into `dst` a block at a time, checking each block as it lands.
fn copy_checked<T: Float>(src: &[u8], dst: &mut [T]) -> Result<(), usize> {
    let size = std::mem::size_of::<T>();
    for (i, (d, s)) in dst.chunks_mut(CHECK_BLOCK).zip(src.chunks(CHECK_BLOCK * size)).enumerate() {
        bytemuck::cast_slice_mut::<T, u8>(d).copy_from_slice(s);
        if let Some(j) = first_non_finite(d) {
            return Err(i * CHECK_BLOCK + j);
        }
    }
    Ok(())
}

/// A `[rows, cols]` weight in PyTorch `Linear` layout.
#[derive(Debug)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    data: MatData,
}

#[derive(Debug)]
enum MatData {
    F32(Buf<f32>),
    Bf16(Buf<bf16>),
    /// bf16 in the packed panel layout (see `Matrix::packed`).
    Packed(Buf<bf16>),
}

impl Matrix {
    pub fn weight(&self) -> WeightRef<'_> {
        match &self.data {
            MatData::F32(b) => WeightRef::F32(b.as_slice()),
            MatData::Bf16(b) => WeightRef::Bf16(b.as_slice()),
            MatData::Packed(b) => WeightRef::Packed(PackedRef::new(b.as_slice(), self.rows, self.cols)),
        }
    }

    /// This matrix with bf16 weights in the packed layout (f32 and packed ones unchanged).
    /// The packed copy goes to huge pages like the original; the original is dropped.
    pub fn packed(self) -> Matrix {
        let WeightRef::Bf16(w) = self.weight() else { return self };
        let mut p = vec![bf16::ZERO; packed_len(self.rows, self.cols)];
        pack_into(w, self.rows, self.cols, &mut p);
        Matrix { rows: self.rows, cols: self.cols, data: MatData::Packed(Buf::new(p)) }
    }

    /// Row `r` widened to f32 (for embeddings).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match self.weight() {
            WeightRef::F32(w) => out.copy_from_slice(&w[r * c..(r + 1) * c]),
            WeightRef::Bf16(w) => out.iter_mut().zip(&w[r * c..(r + 1) * c]).for_each(|(o, v)| *o = v.to_f32()),
            WeightRef::Packed(w) => w.row_f32(r, out),
        }
    }

    /// A matrix of `rows` rows whose element `(i, j)` is `at(i, j)`, in this matrix's dtype.
    fn derive(&self, rows: usize, cols: usize, at: impl Fn(usize, usize) -> usize) -> Matrix {
        let data = match self.weight() {
            WeightRef::F32(w) => MatData::F32(Buf::new((0..rows * cols).map(|x| w[at(x / cols, x % cols)]).collect())),
            WeightRef::Bf16(w) => {
                MatData::Bf16(Buf::new((0..rows * cols).map(|x| w[at(x / cols, x % cols)]).collect()))
            }
            // Unpacked: a derived matrix is packed by its user if wanted.
            WeightRef::Packed(w) => {
                let c = self.cols;
                let at = |x: usize| at(x / cols, x % cols);
                MatData::Bf16(Buf::new((0..rows * cols).map(|x| w.get(at(x) / c, at(x) % c)).collect()))
            }
        };
        Matrix { rows, cols, data }
    }

    /// Rows `range` as a new matrix.
    /// All values row-major as bf16 (exact for bf16-stored weights; f32 ones are rounded).
    #[cfg(feature = "cuda")]
    pub fn to_bf16(&self) -> Vec<bf16> {
        self.to_f32().into_iter().map(bf16::from_f32).collect()
    }

    /// All values row-major as f32.
    #[cfg(feature = "cuda")]
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate().take(self.rows) {
            self.row_f32(r, row);
        }
        out
    }

    pub fn rows_range(&self, range: std::ops::Range<usize>) -> Matrix {
        let c = self.cols;
        self.derive(range.len(), c, |i, j| (range.start + i) * c + j)
    }

    /// The transpose.
    pub fn transposed(&self) -> Matrix {
        let c = self.cols;
        self.derive(self.cols, self.rows, |i, j| j * c + i)
    }

    /// `self` then `other` stacked by rows (same dtype and width).
    pub fn stacked(&self, other: &Matrix) -> Matrix {
        debug_assert_eq!(self.cols, other.cols);
        let data = match (self.weight(), other.weight()) {
            (WeightRef::F32(a), WeightRef::F32(b)) => MatData::F32(Buf::new([a, b].concat())),
            (WeightRef::Bf16(a), WeightRef::Bf16(b)) => MatData::Bf16(Buf::new([a, b].concat())),
            (a, b) => {
                let widen = |w: WeightRef<'_>| -> Vec<f32> {
                    match w {
                        WeightRef::F32(w) => w.to_vec(),
                        WeightRef::Bf16(w) => w.iter().map(|v| v.to_f32()).collect(),
                        WeightRef::Packed(w) => {
                            (0..w.n() * w.k()).map(|x| w.get(x / w.k(), x % w.k()).to_f32()).collect()
                        }
                    }
                };
                MatData::F32(Buf::new([widen(a), widen(b)].concat()))
            }
        };
        Matrix { rows: self.rows + other.rows, cols: self.cols, data }
    }
}

/// Builds weights from a checkpoint, checking names, shapes and dtypes, and every value for
/// NaN and infinities as it is copied or converted.
#[derive(Debug)]
pub struct WeightReader<'a> {
    pub ckpt: &'a Checkpoint,
    pub dtype: WeightDtype,
    pub fp8_block: Option<(usize, usize)>,
}

impl WeightReader<'_> {
    /// The tensor of `spec` if it is present, of its shape and of a dtype this reader takes
    /// (FP8 matrices with a scale grid of the right shape). Reads only the header.
    pub(crate) fn checked(&self, spec: &Spec) -> Result<TensorView<'_>, ModelError> {
        let v = self.shaped(spec)?;
        match v.dtype {
            Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok(v),
            Dtype::F8_E4M3 if spec.is_matrix() => {
                self.float(&self.scale_spec(spec))?;
                Ok(v)
            }
            _ => Err(Self::dtype_err(&v)),
        }
    }

    /// The tensor of `spec`, stored as F32, BF16 or F16.
    fn float(&self, spec: &Spec) -> Result<TensorView<'_>, ModelError> {
        let v = self.shaped(spec)?;
        match v.dtype {
            Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok(v),
            _ => Err(Self::dtype_err(&v)),
        }
    }

    fn shaped(&self, spec: &Spec) -> Result<TensorView<'_>, ModelError> {
        let v = self.ckpt.tensor(&spec.name)?;
        if v.shape != spec.shape {
            return Err(ModelError::Shape {
                path: v.path.into(),
                tensor: spec.name.clone(),
                got: v.shape.to_vec(),
                expected: spec.shape.clone(),
                fields: spec.fields,
            });
        }
        Ok(v)
    }

    fn dtype_err(v: &TensorView<'_>) -> ModelError {
        ModelError::Dtype { path: v.path.into(), tensor: v.name.into(), dtype: format!("{:?}", v.dtype) }
    }

    fn non_finite(v: &TensorView<'_>) -> impl Fn(usize) -> ModelError {
        let (path, tensor) = (v.path.to_path_buf(), v.name.to_owned());
        move |index| ModelError::NonFinite { path: path.clone(), tensor: tensor.clone(), index }
    }

    /// The matrix of `spec` (`[rows, cols]`).
    pub(crate) fn matrix(&self, spec: &Spec) -> Result<Matrix, ModelError> {
        let v = self.checked(spec)?;
        let (rows, cols) = (spec.shape[0], spec.shape[1]);
        let want = match (self.dtype, v.dtype) {
            (WeightDtype::Auto, Dtype::BF16 | Dtype::F8_E4M3) => WeightDtype::Bf16,
            (WeightDtype::Auto, _) => WeightDtype::F32,
            (d, _) => d,
        };
        let bad = Self::non_finite(&v);
        let data = match (v.dtype, want) {
            (Dtype::F32, WeightDtype::F32) => MatData::F32(Buf::from_le_bytes(v.bytes).map_err(bad)?),
            (Dtype::BF16, WeightDtype::Bf16) => MatData::Bf16(Buf::from_le_bytes(v.bytes).map_err(bad)?),
            (Dtype::BF16 | Dtype::F16, WeightDtype::F32) => MatData::F32(Buf::new(convert(&v, |x| x).map_err(bad)?)),
            (Dtype::F32 | Dtype::BF16 | Dtype::F16, _) => {
                MatData::Bf16(Buf::new(convert(&v, bf16::from_f32).map_err(bad)?))
            }
            (Dtype::F8_E4M3, want) => {
                let scales = self.vector(&self.scale_spec(spec))?;
                let block = self.fp8_block.unwrap_or((128, 128));
                match want {
                    WeightDtype::F32 => MatData::F32(Buf::new(dequantize(&v, &scales, cols, block).map_err(bad)?)),
                    _ => MatData::Bf16(Buf::new(dequantize(&v, &scales, cols, block).map_err(bad)?)),
                }
            }
            _ => return Err(Self::dtype_err(&v)),
        };
        Ok(Matrix { rows, cols, data })
    }

    /// The `_scale_inv` grid of an FP8 matrix: one f32 per block.
    fn scale_spec(&self, spec: &Spec) -> Spec {
        let block = self.fp8_block.unwrap_or((128, 128));
        let (rows, cols) = (spec.shape[0], spec.shape[1]);
        Spec::matrix(
            format!("{}_scale_inv", spec.name),
            rows.div_ceil(block.0),
            cols.div_ceil(block.1),
            "the weight's shape in quantization_config.weight_block_size blocks",
        )
    }

    /// Every value of `spec` as f32: norm weights, biases, FP8 scale grids.
    pub(crate) fn vector(&self, spec: &Spec) -> Result<Vec<f32>, ModelError> {
        let v = self.float(spec)?;
        convert(&v, |x| x).map_err(Self::non_finite(&v))
    }
}

/// `v`'s values (F32, BF16 or F16) converted by `to`, each block checked as it is produced.
fn convert<T: Float>(v: &TensorView<'_>, to: impl Fn(f32) -> T) -> Result<Vec<T>, usize> {
    let (size, decode): (usize, fn(&[u8]) -> f32) = match v.dtype {
        Dtype::F32 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::BF16 => (2, |b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::F16 => (2, |b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        _ => unreachable!("callers check the dtype first"),
    };
    let mut out = Vec::with_capacity(v.bytes.len() / size);
    for block in v.bytes.chunks(CHECK_BLOCK * size) {
        let start = out.len();
        out.extend(block.chunks_exact(size).map(|b| to(decode(b))));
        if let Some(j) = first_non_finite(&out[start..]) {
            return Err(start + j);
        }
    }
    Ok(out)
}

/// An FP8 matrix of `cols` columns dequantized a few rows at a time (never crossing a block
/// row, so each call takes one row of `scales`), each piece checked as it is produced.
fn dequantize<T: Float + DequantTarget>(
    v: &TensorView<'_>,
    scales: &[f32],
    cols: usize,
    block: (usize, usize),
) -> Result<Vec<T>, usize> {
    let cols = cols.max(1);
    let mut out = vec![T::zeroed(); v.bytes.len()];
    let scale_cols = cols.div_ceil(block.1);
    let piece_rows = (4 * CHECK_BLOCK / cols).clamp(1, block.0);
    for (br, (w, o)) in v.bytes.chunks(block.0 * cols).zip(out.chunks_mut(block.0 * cols)).enumerate() {
        let srow = &scales[br * scale_cols..(br + 1) * scale_cols];
        for (pi, (w, o)) in w.chunks(piece_rows * cols).zip(o.chunks_mut(piece_rows * cols)).enumerate() {
            kernels::cpu::fp8::dequantize_blocks(w, srow, w.len() / cols, cols, block, o);
            if let Some(j) = first_non_finite(o) {
                return Err(br * block.0 * cols + pi * piece_rows * cols + j);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn copies_are_checked_in_every_block_in_vecs_and_huge_pages() {
        // Below and above the huge-page threshold, a bad value in the first, a middle and
        // the last block.
        for len in [1000, CHECK_BLOCK * 3 + 7, HUGE_MIN_BYTES / 4 + 5] {
            let good: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let buf = Buf::<f32>::from_le_bytes(&le_bytes(&good)).expect("finite");
            assert_eq!(buf.as_slice(), &good[..]);
            for (at, bad) in [(0, f32::NAN), (len / 2, f32::INFINITY), (len - 1, f32::NEG_INFINITY)] {
                let mut v = good.clone();
                v[at] = bad;
                assert_eq!(Buf::<f32>::from_le_bytes(&le_bytes(&v)).err(), Some(at), "len {len}, {bad} at {at}");
            }
        }
        let mut h: Vec<bf16> = (0..5000).map(|i| bf16::from_f32(i as f32)).collect();
        h[4321] = bf16::NAN;
        assert_eq!(Buf::<bf16>::from_le_bytes(bytemuck::cast_slice(&h)).err(), Some(4321));
    }

    #[test]
    fn conversions_check_what_they_produce() {
        let path = std::path::Path::new("model.safetensors");
        let f32s = le_bytes(&[1.0, 2.0, f32::MAX, -3.0]);
        let v = TensorView { name: "w", path, dtype: Dtype::F32, shape: &[4], bytes: &f32s };
        assert_eq!(convert(&v, |x| x).expect("finite"), vec![1.0, 2.0, f32::MAX, -3.0]);
        // f32::MAX is finite, but rounds to infinity in bf16.
        assert_eq!(convert(&v, bf16::from_f32).err(), Some(2));
        let f16s: Vec<u8> = [f16::ONE, f16::INFINITY].iter().flat_map(|x| x.to_le_bytes()).collect();
        let v = TensorView { name: "w", path, dtype: Dtype::F16, shape: &[2], bytes: &f16s };
        assert_eq!(convert(&v, |x| x).err(), Some(1));
    }

    #[test]
    fn fp8_dequantization_is_checked_piece_by_piece() {
        let path = std::path::Path::new("model.safetensors");
        let (rows, cols, block) = (300, 50, (128, 32));
        let mut bytes = vec![0x38u8; rows * cols]; // all 1.0
        let scales = vec![0.5f32; rows.div_ceil(block.0) * cols.div_ceil(block.1)];
        let v = TensorView { name: "w", path, dtype: Dtype::F8_E4M3, shape: &[], bytes: &bytes };
        let out: Vec<bf16> = dequantize(&v, &scales, cols, block).expect("finite");
        assert!(out.iter().all(|x| x.to_f32() == 0.5));
        let at = 260 * cols + 17;
        bytes[at] = 0x7f; // e4m3 NaN
        let v = TensorView { name: "w", path, dtype: Dtype::F8_E4M3, shape: &[], bytes: &bytes };
        assert_eq!(dequantize::<f32>(&v, &scales, cols, block).err(), Some(at));
        // A finite weight times a huge scale overflows.
        bytes[at] = 0x7e; // 448
        let v = TensorView { name: "w", path, dtype: Dtype::F8_E4M3, shape: &[], bytes: &bytes };
        let mut big = scales.clone();
        big[(260 / 128) * 2] = 1e37;
        assert_eq!(dequantize::<f32>(&v, &big, cols, block).err(), Some(at));
    }
}

//! Weight matrices built from checkpoint tensors: copied into huge-page-backed memory when
//! the stored dtype is the one wanted, converted otherwise; FP8 blocks dequantized. bf16
//! matrices used with `matmul` are then packed (`Matrix::packed`) into the panel layout of
//! `kernels::cpu::packed`, which the kernels multiply at close to the CPU's peak rate.

use crate::ModelError;
use crate::checkpoint::{Checkpoint, TensorView};
use crate::shapes::Spec;
use half::{bf16, f16};
use kernels::cpu::WeightRef;
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
        Self::huge_copy(bytemuck::cast_slice(&v)).unwrap_or(Buf::Owned(v))
    }

    /// Little-endian bytes of `T`s (as stored in safetensors) copied into huge pages.
    fn from_le_bytes(bytes: &[u8]) -> Self {
        Self::huge_copy(bytes).unwrap_or_else(|| {
            let mut v = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
            bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
            Buf::Owned(v)
        })
    }

    fn huge_copy(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < HUGE_MIN_BYTES || cfg!(target_endian = "big") {
            return None;
        }
        let mut anon = memmap2::MmapMut::map_anon(bytes.len()).ok()?;
        // Best effort: without THP the copy still works, with 4 KiB pages.
        let _ = anon.advise(memmap2::Advice::HugePage);
        anon.copy_from_slice(bytes);
        let map = anon.make_read_only().ok()?;
        Some(Buf::Huge { map, len: bytes.len() / std::mem::size_of::<T>(), _t: std::marker::PhantomData })
    }
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

/// Builds weights from a checkpoint, checking names, shapes and dtypes.
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

    /// The matrix of `spec` (`[rows, cols]`).
    pub(crate) fn matrix(&self, spec: &Spec) -> Result<Matrix, ModelError> {
        let v = self.checked(spec)?;
        let (rows, cols) = (spec.shape[0], spec.shape[1]);
        let want = match (self.dtype, v.dtype) {
            (WeightDtype::Auto, Dtype::BF16 | Dtype::F8_E4M3) => WeightDtype::Bf16,
            (WeightDtype::Auto, _) => WeightDtype::F32,
            (d, _) => d,
        };
        let data = match (v.dtype, want) {
            (Dtype::F32, WeightDtype::F32) => MatData::F32(Buf::from_le_bytes(v.bytes)),
            (Dtype::BF16, WeightDtype::Bf16) => MatData::Bf16(Buf::from_le_bytes(v.bytes)),
            (Dtype::BF16 | Dtype::F16, WeightDtype::F32) => MatData::F32(Buf::new(to_f32(&v))),
            (Dtype::F32 | Dtype::BF16 | Dtype::F16, _) => {
                MatData::Bf16(Buf::new(to_f32(&v).into_iter().map(bf16::from_f32).collect()))
            }
            (Dtype::F8_E4M3, want) => {
                let scales = self.vector(&self.scale_spec(spec))?;
                let block = self.fp8_block.unwrap_or((128, 128));
                match want {
                    WeightDtype::F32 => {
                        let mut out = vec![0f32; rows * cols];
                        kernels::cpu::fp8::dequantize_blocks(v.bytes, &scales, rows, cols, block, &mut out);
                        MatData::F32(Buf::new(out))
                    }
                    _ => {
                        let mut out = vec![bf16::ZERO; rows * cols];
                        kernels::cpu::fp8::dequantize_blocks(v.bytes, &scales, rows, cols, block, &mut out);
                        MatData::Bf16(Buf::new(out))
                    }
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
        Ok(to_f32(&self.float(spec)?))
    }
}

fn to_f32(v: &TensorView<'_>) -> Vec<f32> {
    match v.dtype {
        Dtype::F32 => v.bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => v.bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => v.bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => unreachable!("callers check the dtype first"),
    }
}

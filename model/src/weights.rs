//! Weight matrices built from checkpoint tensors: copied into huge-page-backed memory when
//! the stored dtype is the one wanted, converted otherwise; FP8 blocks dequantized.

use crate::ModelError;
use crate::checkpoint::{Checkpoint, TensorView};
use half::{bf16, f16};
use kernels::cpu::WeightRef;
use memmap2::Mmap;
use safetensors::Dtype;
use std::sync::Arc;

/// The dtype weight matrices are kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// As stored: f32 stays f32, bf16 stays bf16, f16 becomes f32, FP8 becomes bf16.
    #[default]
    Auto,
    F32,
    Bf16,
}

/// Contiguous typed storage: a Vec, or an anonymous (huge-page) mapping.
#[derive(Debug)]
enum Buf<T> {
    Owned(Vec<T>),
    Mapped { map: Arc<Mmap>, offset: usize, len: usize },
}

impl<T: bytemuck::Pod> Buf<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            Buf::Mapped { map, offset, len } => {
                let bytes = &map[*offset..*offset + len * std::mem::size_of::<T>()];
                bytemuck::cast_slice(bytes)
            }
        }
    }

    /// The tensor's bytes copied into anonymous memory backed by transparent huge pages
    /// where the kernel allows: streaming gigabytes of weights per token through 4 KiB
    /// file pages costs a TLB miss every page, enough to lose a third of the bandwidth.
    fn mapped(view: &TensorView<'_>) -> Option<Self> {
        let size = std::mem::size_of::<T>();
        let len = view.bytes.len();
        if len == 0 {
            return None;
        }
        let mut anon = memmap2::MmapMut::map_anon(len).ok()?;
        // Best effort: without THP the copy still works, with 4 KiB pages.
        let _ = anon.advise(memmap2::Advice::HugePage);
        anon.copy_from_slice(view.bytes);
        let map = anon.make_read_only().ok()?;
        Some(Buf::Mapped { map: Arc::new(map), offset: 0, len: len / size })
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
}

impl Matrix {
    pub fn weight(&self) -> WeightRef<'_> {
        match &self.data {
            MatData::F32(b) => WeightRef::F32(b.as_slice()),
            MatData::Bf16(b) => WeightRef::Bf16(b.as_slice()),
        }
    }

    /// Row `r` widened to f32 (for embeddings).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match self.weight() {
            WeightRef::F32(w) => out.copy_from_slice(&w[r * c..(r + 1) * c]),
            WeightRef::Bf16(w) => out.iter_mut().zip(&w[r * c..(r + 1) * c]).for_each(|(o, v)| *o = v.to_f32()),
        }
    }

    /// A new matrix from a subset of rows, in this matrix's dtype.
    pub fn gather_rows(&self, rows: impl Iterator<Item = usize>) -> Matrix {
        let c = self.cols;
        match self.weight() {
            WeightRef::F32(w) => {
                let v: Vec<f32> = rows.flat_map(|r| w[r * c..(r + 1) * c].iter().copied()).collect();
                Matrix { rows: v.len() / c, cols: c, data: MatData::F32(Buf::Owned(v)) }
            }
            WeightRef::Bf16(w) => {
                let v: Vec<bf16> = rows.flat_map(|r| w[r * c..(r + 1) * c].iter().copied()).collect();
                Matrix { rows: v.len() / c, cols: c, data: MatData::Bf16(Buf::Owned(v)) }
            }
        }
    }

    /// The transpose, in this matrix's dtype.
    pub fn transposed(&self) -> Matrix {
        let (r, c) = (self.rows, self.cols);
        match self.weight() {
            WeightRef::F32(w) => {
                let v = (0..c * r).map(|i| w[(i % r) * c + i / r]).collect();
                Matrix { rows: c, cols: r, data: MatData::F32(Buf::Owned(v)) }
            }
            WeightRef::Bf16(w) => {
                let v = (0..c * r).map(|i| w[(i % r) * c + i / r]).collect();
                Matrix { rows: c, cols: r, data: MatData::Bf16(Buf::Owned(v)) }
            }
        }
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
    fn view(&self, name: &str, expected: &[usize]) -> Result<TensorView<'_>, ModelError> {
        let v = self.ckpt.tensor(name)?;
        if v.shape != expected {
            return Err(ModelError::Shape {
                path: v.path.into(),
                tensor: name.into(),
                got: v.shape.to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(v)
    }

    fn dtype_err(v: &TensorView<'_>) -> ModelError {
        ModelError::Dtype { path: v.path.into(), tensor: v.name.into(), dtype: format!("{:?}", v.dtype) }
    }

    /// A `[rows, cols]` matrix named `name`.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, ModelError> {
        let v = self.view(name, &[rows, cols])?;
        let want = match (self.dtype, v.dtype) {
            (WeightDtype::Auto, Dtype::BF16 | Dtype::F8_E4M3) => WeightDtype::Bf16,
            (WeightDtype::Auto, _) => WeightDtype::F32,
            (d, _) => d,
        };
        let data = match (v.dtype, want) {
            (Dtype::F32, WeightDtype::F32) => MatData::F32(Buf::mapped(&v).unwrap_or_else(|| Buf::Owned(to_f32(&v)))),
            (Dtype::BF16, WeightDtype::Bf16) => {
                MatData::Bf16(Buf::mapped(&v).unwrap_or_else(|| Buf::Owned(v.bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect())))
            }
            (Dtype::BF16 | Dtype::F16, WeightDtype::F32) => MatData::F32(Buf::Owned(to_f32(&v))),
            (Dtype::F32 | Dtype::BF16 | Dtype::F16, _) => {
                MatData::Bf16(Buf::Owned(to_f32(&v).into_iter().map(bf16::from_f32).collect()))
            }
            (Dtype::F8_E4M3, want) => {
                let scales = self.fp8_scales(name, rows, cols)?;
                let block = self.fp8_block.unwrap_or((128, 128));
                match want {
                    WeightDtype::F32 => {
                        let mut out = vec![0f32; rows * cols];
                        kernels::cpu::fp8::dequantize_blocks(v.bytes, &scales, rows, cols, block, &mut out);
                        MatData::F32(Buf::Owned(out))
                    }
                    _ => {
                        let mut out = vec![bf16::ZERO; rows * cols];
                        kernels::cpu::fp8::dequantize_blocks(v.bytes, &scales, rows, cols, block, &mut out);
                        MatData::Bf16(Buf::Owned(out))
                    }
                }
            }
            _ => return Err(Self::dtype_err(&v)),
        };
        Ok(Matrix { rows, cols, data })
    }

    fn fp8_scales(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>, ModelError> {
        let block = self.fp8_block.unwrap_or((128, 128));
        let scale_name = format!("{name}_scale_inv");
        if !self.ckpt.contains(&scale_name) {
            return Err(ModelError::MissingTensor { dir: self.ckpt.dir().into(), tensor: scale_name });
        }
        let s = self.view(&scale_name, &[rows.div_ceil(block.0), cols.div_ceil(block.1)])?;
        match s.dtype {
            Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok(to_f32(&s)),
            _ => Err(Self::dtype_err(&s)),
        }
    }

    /// A 1-D f32 vector (norm weights, biases).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let v = self.view(name, &[len])?;
        match v.dtype {
            Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok(to_f32(&v)),
            _ => Err(Self::dtype_err(&v)),
        }
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

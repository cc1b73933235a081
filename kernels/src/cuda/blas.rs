//! bf16 GEMMs on cuBLAS with f32 accumulation and f32 output, in the row-major
//! `out[m, n] = x[m, k] · w[n, k]ᵀ` convention of `crate::cpu::matmul`.
//!
//! cuBLAS is column-major: a row-major `[r, c]` matrix is its column-major transpose, so
//! `outᵀ[n, m] = op(w)[n, k] · xᵀ[k, m]` is computed with `w` transposed (or not, for weights
//! stored `[k, n]`).

use super::gpu::{Dev, Gpu};
use crate::KernelError;
use cudarc::cublas::result::{gemm_ex, gemm_strided_batched_ex};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use half::bf16;
use std::ffi::c_void;

/// How the weight of a GEMM is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[n, k]`, PyTorch `Linear` layout (rows are outputs).
    OutIn,
    /// `[k, n]`.
    InOut,
}

/// One strided-batched GEMM: for `b < batch`,
/// `out[b][m, n] = x[b][m, k] · w[b]` with each operand's rows `ld` apart and batches
/// `stride` apart (all in elements).
#[derive(Debug, Clone, Copy)]
pub struct BatchedGemm {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub x: Dev<bf16>,
    pub ldx: usize,
    pub stride_x: usize,
    pub w: Dev<bf16>,
    pub w_layout: WeightLayout,
    pub stride_w: usize,
    pub out: Dev<f32>,
    pub ldo: usize,
    pub stride_o: usize,
}

fn int(v: usize) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| KernelError::UnsupportedShape(format!("GEMM dimension {v} does not fit a 32-bit int")))
}

fn blas_err(e: cudarc::cublas::result::CublasError) -> KernelError {
    KernelError::Cuda { what: "cuBLAS GEMM".into(), detail: e.to_string() }
}

impl Gpu {
    /// `out[m, n] = x[m, k] · w[n, k]ᵀ` (bf16 in, f32 accumulate and out).
    pub fn gemm(
        &self,
        x: Dev<bf16>,
        m: usize,
        k: usize,
        w: Dev<bf16>,
        n: usize,
        out: Dev<f32>,
    ) -> Result<(), KernelError> {
        assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "gemm shapes");
        self.gemm_ex(x.ptr, w.ptr, cudaDataType::CUDA_R_16BF, m, k, n, out)
    }

    /// `out[m, n] = x[m, k] · w[n, k]ᵀ` in full f32 (no TF32): the MoE router's logits, whose
    /// top-k must not flip against the CPU engine's.
    pub fn gemm_f32(
        &self,
        x: Dev<f32>,
        m: usize,
        k: usize,
        w: Dev<f32>,
        n: usize,
        out: Dev<f32>,
    ) -> Result<(), KernelError> {
        assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "gemm shapes");
        self.gemm_ex(x.ptr, w.ptr, cudaDataType::CUDA_R_32F, m, k, n, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_ex(
        &self,
        x: u64,
        w: u64,
        dtype: cudaDataType,
        m: usize,
        k: usize,
        n: usize,
        out: Dev<f32>,
    ) -> Result<(), KernelError> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (mi, ki, ni) = (int(m)?, int(k)?, int(n)?);
        self.bind()?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: callers checked the ranges; the handle is bound to this GPU's stream.
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha as *const f32).cast::<c_void>(),
                w as *const c_void,
                dtype,
                ki,
                x as *const c_void,
                dtype,
                ki,
                (&beta as *const f32).cast::<c_void>(),
                out.ptr as *mut c_void,
                cudaDataType::CUDA_R_32F,
                ni,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err)
    }

    /// A strided-batched GEMM (per-head projections of MLA).
    pub fn gemm_batched(&self, g: &BatchedGemm) -> Result<(), KernelError> {
        if g.batch == 0 || g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let last = g.batch - 1;
        assert!(last * g.stride_x + (g.m - 1) * g.ldx + g.k <= g.x.len(), "batched gemm x");
        assert!(last * g.stride_o + (g.m - 1) * g.ldo + g.n <= g.out.len(), "batched gemm out");
        assert!(last * g.stride_w + g.n * g.k <= g.w.len(), "batched gemm w");
        let (transa, lda) = match g.w_layout {
            WeightLayout::OutIn => (cublasOperation_t::CUBLAS_OP_T, g.k),
            WeightLayout::InOut => (cublasOperation_t::CUBLAS_OP_N, g.n),
        };
        self.bind()?;
        let (alpha, beta) = (1f32, 0f32);
        let stride = |v: usize| i64::try_from(v).map_err(|_| KernelError::UnsupportedShape(format!("stride {v}")));
        // SAFETY: ranges checked above; the handle is bound to this GPU's stream.
        unsafe {
            gemm_strided_batched_ex(
                *self.blas.handle(),
                transa,
                cublasOperation_t::CUBLAS_OP_N,
                int(g.n)?,
                int(g.m)?,
                int(g.k)?,
                (&alpha as *const f32).cast::<c_void>(),
                g.w.ptr as *const c_void,
                cudaDataType::CUDA_R_16BF,
                int(lda)?,
                stride(g.stride_w)?,
                g.x.ptr as *const c_void,
                cudaDataType::CUDA_R_16BF,
                int(g.ldx)?,
                stride(g.stride_x)?,
                (&beta as *const f32).cast::<c_void>(),
                g.out.ptr as *mut c_void,
                cudaDataType::CUDA_R_32F,
                int(g.ldo)?,
                stride(g.stride_o)?,
                int(g.batch)?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err)
    }
}

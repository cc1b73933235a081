//! The CUDA backend (feature `cuda`): cudarc with dynamic loading, so building and the CPU
//! tests need no CUDA installation. cuBLAS runs the bf16 GEMMs; our own kernels (CUDA C in
//! `kernels/cuda/`) are compiled by NVRTC when a GPU is opened. One Rust file per op family
//! (`ops_*.rs`) mirrors one `.cu` file.

mod blas;
mod gpu;
mod launch;
mod ops_cache;
mod ops_elementwise;
mod ops_fp8;
mod ops_mla;
mod ops_moe;
mod ops_norm;
mod ops_rope;
mod ops_router;
pub mod source;

pub use blas::{BatchedGemm, WeightLayout};
pub use gpu::{Dev, DeviceBuf, Gpu};
pub use ops_mla::{MAX_KV_LORA_RANK, MAX_ROPE_DIM, MlaArgs, context_splits};
pub use ops_router::{MAX_EXPERT_GROUPS, MAX_ROUTED_EXPERTS};

//! The CUDA backend (feature `cuda`): cudarc with dynamic loading, so building and the CPU
//! tests need no CUDA installation. cuBLAS runs the bf16 GEMMs; our own kernels (CUDA C in
//! `kernels/cuda/`) are compiled by NVRTC when a GPU is opened.

mod blas;
mod gpu;
mod ops;
pub mod source;

pub use blas::{BatchedGemm, WeightLayout};
pub use gpu::{Dev, DeviceBuf, Gpu};
pub use ops::{MAX_EXPERT_GROUPS, MAX_KV_LORA_RANK, MAX_ROPE_DIM, MAX_ROUTED_EXPERTS, MlaArgs};

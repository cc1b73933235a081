//! Pure compute for ExpertMesh: the numerical ops of a DeepSeek-V3 forward pass.
//!
//! No async runtime, no networking, no files: slices in, slices out. Every op has a plain
//! reference implementation (`reference` functions, written for clarity) and a fast path that
//! is tested against it. The CPU backend always builds; CUDA lives behind the `cuda` feature.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
mod error;

pub use device::Device;
pub use error::KernelError;
pub use half::bf16;

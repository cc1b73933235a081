//! CPU kernels. One op family per file; each has a `reference` implementation.

pub mod activation;
pub mod bandwidth;
pub mod fp8;
pub mod matmul;
#[cfg(target_arch = "x86_64")]
mod matmul_avx512;
#[cfg(target_arch = "x86_64")]
mod matmul_avx512_kernels;
pub mod mla;
pub mod norm;
mod out_ptr;
pub mod packed;
#[cfg(target_arch = "x86_64")]
mod packed_avx512;
pub mod rope;
pub mod router;

pub use matmul::{Precision, WeightRef, matmul};
pub use packed::{PackedBf16, PackedRef};

#[cfg(test)]
pub(crate) mod test_util;

//! CPU kernels. One op family per file; each has a `reference` implementation.

pub mod activation;
pub mod fp8;
pub mod matmul;
pub mod mla;
pub mod norm;
pub mod rope;
pub mod router;

pub use matmul::{Precision, WeightRef, matmul};

#[cfg(test)]
pub(crate) mod test_util;

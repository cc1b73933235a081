//! Shared pieces of the kernel launch wrappers (one file per op family, `ops_*.rs`): each
//! checks shapes against the device ranges, then launches once on the GPU's stream.

use crate::KernelError;
use cudarc::driver::LaunchConfig;

pub(super) const THREADS: u32 = 256;
/// Grid-stride kernels never need more blocks than this to fill a GPU.
const MAX_BLOCKS: usize = 8192;

pub(super) fn int(v: usize, what: &str) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| KernelError::UnsupportedShape(format!("{what} = {v} does not fit a 32-bit int")))
}

/// A grid-stride launch over `n` elements.
pub(super) fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row.
pub(super) fn per_row(rows: usize, threads: u32) -> Result<LaunchConfig, KernelError> {
    let rows = u32::try_from(rows).map_err(|_| KernelError::UnsupportedShape(format!("{rows} rows")))?;
    Ok(LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// `rows` rows of `width` values every `stride` fit in `len` values.
pub(super) fn fits(len: usize, rows: usize, stride: usize, width: usize) -> bool {
    rows == 0 || ((rows - 1) * stride + width <= len && width <= stride)
}

//! The paged latent (MLA) cache: per layer, fixed-size blocks of token rows
//! `[c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)]` in f32, handed out from a free list.
//!
//! Invariant: a block belongs to at most one sequence; blocks return to the free list only
//! through [`LatentCache::free`], called once when a sequence is released.

use crate::EngineError;
use crate::kv::{LayerRows, VALUE_BYTES};
use kernels::cpu::mla::PagedLatent;

/// Cache geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLayout {
    pub num_layers: usize,
    /// Values per token per layer (`kv_lora_rank + qk_rope_head_dim`).
    pub latent_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
    pub num_blocks: usize,
}

impl CacheLayout {
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Bytes of one token's cache across all layers in the transfer format.
    pub fn bytes_per_token(&self) -> usize {
        self.latent_dim * self.num_layers * VALUE_BYTES
    }

    /// f32 values of one layer's rows. Refused when block ids (u32) cannot name every block,
    /// or when the size of all layers overflows: checked before anything is allocated.
    pub fn values_per_layer(&self) -> Result<usize, EngineError> {
        let tokens = self.num_blocks.saturating_mul(self.block_size);
        let refuse = |reason: String| Err(EngineError::CacheSize { tokens, reason });
        if self.num_blocks > u32::MAX as usize {
            return refuse(format!("{} blocks of {} tokens exceed 2^32 blocks", self.num_blocks, self.block_size));
        }
        let per_layer = self.num_blocks.checked_mul(self.block_size).and_then(|t| t.checked_mul(self.latent_dim));
        match per_layer.filter(|v| v.checked_mul(self.num_layers).and_then(|v| v.checked_mul(4)).is_some()) {
            Some(v) => Ok(v),
            None => {
                refuse(format!("its size ({} layers of {}-value rows) overflows", self.num_layers, self.latent_dim))
            }
        }
    }
}

/// Cache storage for all layers plus the block allocator.
#[derive(Debug)]
pub struct LatentCache {
    layout: CacheLayout,
    layers: Vec<Vec<f32>>,
    free: Vec<u32>,
}

/// One sequence's cache, layer by layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceCacheExport {
    pub num_tokens: usize,
    pub latent_dim: usize,
    /// `layers[l]` holds layer `l`'s `num_tokens` rows; the MTP layer's last, when the
    /// sequence has them.
    pub layers: Vec<LayerRows>,
    /// The MTP layer's output at the last cached position (empty without one).
    pub mtp_hidden: Vec<f32>,
}

impl LatentCache {
    /// The rows of every layer, zeroed, and the allocator. A layout too large to address or to
    /// allocate is refused with [`EngineError::CacheSize`], never an allocation abort.
    pub fn new(layout: CacheLayout) -> Result<Self, EngineError> {
        let per_layer = layout.values_per_layer()?;
        let mut layers = Vec::with_capacity(layout.num_layers);
        for _ in 0..layout.num_layers {
            layers.push(try_zeroed(per_layer).ok_or_else(|| EngineError::CacheSize {
                tokens: layout.num_blocks * layout.block_size,
                reason: format!(
                    "allocating {:.2} GiB for its rows failed",
                    (per_layer * 4) as f64 * layout.num_layers as f64 / f64::from(1u32 << 30)
                ),
            })?);
        }
        Ok(LatentCache { layout, layers, free: Self::free_list(layout)? })
    }

    /// The block allocator alone, for a cache whose rows live elsewhere (GPU memory).
    pub fn allocator_only(layout: CacheLayout) -> Result<Self, EngineError> {
        layout.values_per_layer()?;
        Ok(LatentCache { layout, layers: Vec::new(), free: Self::free_list(layout)? })
    }

    /// Every block id, popped from the end: low ids are handed out first.
    fn free_list(layout: CacheLayout) -> Result<Vec<u32>, EngineError> {
        let mut free = Vec::new();
        free.try_reserve_exact(layout.num_blocks).map_err(|_| EngineError::CacheSize {
            tokens: layout.num_blocks * layout.block_size,
            reason: format!("allocating the free list of {} blocks failed", layout.num_blocks),
        })?;
        // values_per_layer checked that every id fits a u32.
        free.extend((0..layout.num_blocks as u32).rev());
        Ok(free)
    }

    pub fn layout(&self) -> CacheLayout {
        self.layout
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Takes `n` blocks, or none if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }

    pub fn free(&mut self, blocks: &[u32]) {
        self.free.extend(blocks.iter().rev());
    }

    /// Layer `layer` for the attention kernel; `rank + rope_dim` must equal `latent_dim`.
    pub fn view(&self, layer: usize, rank: usize, rope_dim: usize) -> PagedLatent<'_> {
        debug_assert_eq!(rank + rope_dim, self.layout.latent_dim);
        PagedLatent { data: &self.layers[layer], block_size: self.layout.block_size, rank, rope_dim }
    }

    fn row_range(&self, table: &[u32], t: usize) -> std::ops::Range<usize> {
        let bs = self.layout.block_size;
        let row = table[t / bs] as usize * bs + t % bs;
        row * self.layout.latent_dim..(row + 1) * self.layout.latent_dim
    }

    pub fn write_row(&mut self, layer: usize, table: &[u32], t: usize, row: &[f32]) {
        let r = self.row_range(table, t);
        self.layers[layer][r].copy_from_slice(row);
    }

    /// Copies one layer of tokens `[0, num_tokens)` out.
    pub fn export_layer(&self, layer: usize, table: &[u32], num_tokens: usize) -> LayerRows {
        let mut out = Vec::with_capacity(num_tokens * self.layout.latent_dim);
        for t in 0..num_tokens {
            out.extend_from_slice(&self.layers[layer][self.row_range(table, t)]);
        }
        LayerRows::new(layer, self.layout.latent_dim, out).expect("the cache holds whole rows")
    }

    /// Writes `rows` (of this cache's width) into the sequence's blocks, which must hold them.
    pub fn import_layer(&mut self, table: &[u32], rows: &LayerRows) {
        debug_assert_eq!(rows.latent_dim(), self.layout.latent_dim);
        for (t, row) in rows.data().chunks_exact(self.layout.latent_dim).enumerate() {
            let r = self.row_range(table, t);
            self.layers[rows.layer()][r].copy_from_slice(row);
        }
    }
}

/// `n` zeroed f32s, or `None` when the allocator refuses (where `vec![0.0; n]` would abort the
/// process). Zeroed memory is mapped lazily, as for `vec!`.
fn try_zeroed(n: usize) -> Option<Vec<f32>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(n).ok()?;
    // SAFETY: `layout` has a non-zero size. A non-null block from the global allocator with the
    // layout of `n` f32s, all bits zero (which is 0.0), is what `Vec::from_raw_parts` takes
    // with length and capacity `n`.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<f32>();
        if p.is_null() { None } else { Some(Vec::from_raw_parts(p, n, n)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_free_and_round_trip_rows() {
        let layout = CacheLayout { num_layers: 2, latent_dim: 3, block_size: 2, num_blocks: 4 };
        let mut c = LatentCache::new(layout).unwrap();
        let a = c.allocate(3).unwrap();
        assert_eq!(c.free_blocks(), 1);
        assert!(c.allocate(2).is_none());
        for t in 0..5 {
            c.write_row(1, &a, t, &[t as f32, 1.0, 2.0]);
        }
        let rows = c.export_layer(1, &a, 5);
        assert_eq!((rows.layer(), rows.num_tokens(), rows.data()[3]), (1, 5, 1.0));
        c.free(&a);
        let b = c.allocate(3).unwrap();
        c.import_layer(&b, &rows);
        assert_eq!(c.export_layer(1, &b, 5), rows);
    }
}

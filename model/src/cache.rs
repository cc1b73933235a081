//! The paged latent (MLA) cache: per layer, fixed-size blocks of token rows
//! `[c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)]` in f32, handed out from a free list.
//!
//! Invariant: a block belongs to at most one sequence; blocks return to the free list only
//! through [`LatentCache::free`], called once when a sequence is released.

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
    /// `layers[l]` holds layer `l`'s `num_tokens` rows.
    pub layers: Vec<LayerRows>,
}

impl LatentCache {
    pub fn new(layout: CacheLayout) -> Self {
        let per_layer = layout.num_blocks * layout.block_size * layout.latent_dim;
        LatentCache {
            layout,
            layers: (0..layout.num_layers).map(|_| vec![0f32; per_layer]).collect(),
            // Pop from the end: hand out low block ids first.
            free: (0..layout.num_blocks as u32).rev().collect(),
        }
    }

    /// The block allocator alone, for a cache whose rows live elsewhere (GPU memory).
    pub fn allocator_only(layout: CacheLayout) -> Self {
        LatentCache { layout, layers: Vec::new(), free: (0..layout.num_blocks as u32).rev().collect() }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_free_and_round_trip_rows() {
        let layout = CacheLayout { num_layers: 2, latent_dim: 3, block_size: 2, num_blocks: 4 };
        let mut c = LatentCache::new(layout);
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

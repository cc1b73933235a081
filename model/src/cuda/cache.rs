//! The paged latent cache in device memory: per layer `[num_blocks * block_size, latent_dim]`
//! f32, the block allocator staying on the host (`crate::cache::LatentCache`). Export and
//! import move one sequence's rows of one layer as [`LayerRows`].

use crate::cache::CacheLayout;
use crate::kv::LayerRows;
use kernels::KernelError;
use kernels::cuda::{DeviceBuf, Gpu};
use std::sync::Arc;

#[derive(Debug)]
pub(crate) struct GpuCache {
    gpu: Arc<Gpu>,
    pub(crate) layers: Vec<DeviceBuf<f32>>,
    pub(crate) layout: CacheLayout,
}

/// The cache row of position `t` of the sequence with `table`.
pub(crate) fn slot(table: &[u32], block_size: usize, t: usize) -> u32 {
    table[t / block_size] * block_size as u32 + (t % block_size) as u32
}

impl GpuCache {
    pub(crate) fn new(gpu: Arc<Gpu>, layout: CacheLayout) -> Result<Self, KernelError> {
        let per_layer = layout.num_blocks * layout.block_size * layout.latent_dim;
        let layers = (0..layout.num_layers).map(|_| gpu.zeros::<f32>(per_layer)).collect::<Result<_, _>>()?;
        Ok(GpuCache { gpu, layers, layout })
    }

    pub(crate) fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.len() * 4).sum()
    }

    fn slots(&self, table: &[u32], num_tokens: usize) -> Vec<u32> {
        (0..num_tokens).map(|t| slot(table, self.layout.block_size, t)).collect()
    }

    /// Tokens `[0, num_tokens)` of one layer.
    pub(crate) fn export_layer(
        &self,
        layer: usize,
        table: &[u32],
        num_tokens: usize,
    ) -> Result<LayerRows, KernelError> {
        let width = self.layout.latent_dim;
        let slots = self.gpu.upload(&self.slots(table, num_tokens))?;
        let rows = self.gpu.scratch::<f32>(num_tokens * width)?;
        self.gpu.gather_cache_rows(self.layers[layer].dev(), slots.dev(), rows.dev(), width)?;
        let values = self.gpu.read(rows.dev())?;
        Ok(LayerRows::new(layer, width, values).expect("the gather wrote whole rows"))
    }

    /// Writes `rows` (of this cache's width) into the sequence's blocks, which must hold them.
    pub(crate) fn import_layer(&mut self, table: &[u32], rows: &LayerRows) -> Result<(), KernelError> {
        let width = self.layout.latent_dim;
        debug_assert_eq!(rows.latent_dim(), width);
        let slots = self.gpu.upload(&self.slots(table, rows.num_tokens()))?;
        let values = self.gpu.upload(rows.data())?;
        self.gpu.scatter_rows(self.layers[rows.layer()].dev(), slots.dev(), values.dev(), width, width)?;
        self.gpu.synchronize()
    }
}

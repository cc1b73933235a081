//! The model on an NVIDIA GPU (feature `cuda`): the host model's weights copied to device
//! memory once, the paged latent cache in device memory, and the same batched forward pass as
//! `crate::forward` built from `kernels::cuda` (cuBLAS bf16 GEMMs with f32 accumulation,
//! NVRTC kernels for the rest). Activations between GEMMs are f32; GEMM inputs are rounded to
//! bf16, so the CPU reference for it is the engine at `Precision::Bf16Activations`.

mod cache;
mod forward;
mod weights;

pub(crate) use cache::GpuCache;
pub(crate) use forward::GpuForwardError;
pub(crate) use weights::GpuWeights;

use crate::EngineError;
use crate::backend::LayerExports;
use crate::cache::CacheLayout;
use crate::experts::ExpertBackend;
use crate::forward::Model;
use kernels::KernelError;
use kernels::cuda::Gpu;
use std::sync::Arc;

/// Weights and cache of one model on one GPU.
#[derive(Debug)]
pub(crate) struct GpuModel {
    pub(crate) weights: GpuWeights,
    pub(crate) cache: GpuCache,
}

impl GpuModel {
    /// Opens GPU `ordinal`, copies `model` (and `experts`, when they live in this process)
    /// there and allocates a cache of `layout`.
    pub(crate) fn new(
        ordinal: usize,
        model: &Model,
        experts: &dyn ExpertBackend,
        layout: CacheLayout,
    ) -> Result<Self, KernelError> {
        let gpu = Gpu::open(ordinal)?;
        let weights = GpuWeights::upload(&gpu, model, experts.as_local())?;
        let cache = GpuCache::new(gpu.clone(), layout)?;
        let (total, free) = gpu.memory()?;
        tracing::info!(
            device = %gpu.name(),
            weights_gib = weights.bytes() as f64 / f64::from(1u32 << 30),
            cache_gib = cache.bytes() as f64 / f64::from(1u32 << 30),
            free_gib = free as f64 / f64::from(1u32 << 30),
            total_gib = total as f64 / f64::from(1u32 << 30),
            "model_on_gpu"
        );
        Ok(GpuModel { weights, cache })
    }

    pub(crate) fn gpu(&self) -> &Arc<Gpu> {
        self.weights.gpu()
    }

    /// The CUDA ordinal of the device.
    pub(crate) fn ordinal(&self) -> usize {
        self.gpu().ordinal()
    }

    /// Writes whole rows of one layer (as exported) into a sequence's blocks.
    pub(crate) fn import_layer(&mut self, table: &[u32], rows: &crate::kv::LayerRows) -> Result<(), EngineError> {
        self.cache.import_layer(table, rows).map_err(|e| EngineError::Device(e.to_string()))
    }

    /// Tokens `[0, num_tokens)` of one layer of a sequence's rows.
    pub(crate) fn export_layer(
        &self,
        layer: usize,
        table: &[u32],
        num_tokens: usize,
    ) -> Result<crate::kv::LayerRows, EngineError> {
        self.cache.export_layer(layer, table, num_tokens).map_err(|e| EngineError::Device(e.to_string()))
    }
}

impl GpuModel {
    /// [`crate::forward::Model::forward`] on the GPU; with `exports`, each layer's rows of the
    /// listed sequences are handed out as soon as they are in the cache.
    pub(crate) fn run(
        &mut self,
        model: &Model,
        segments: &[crate::Segment<'_>],
        experts: &dyn ExpertBackend,
        exports: Option<LayerExports<'_, '_>>,
    ) -> Result<crate::ForwardOutput, EngineError> {
        let (c, scale) = (&model.config, model.scale);
        let result = match exports {
            None => self.weights.forward(c, scale, &mut self.cache, segments, experts, None),
            Some((tables, sink)) => {
                let mut hook = |layer: usize, cache: &GpuCache| -> Result<(), KernelError> {
                    for &(id, blocks, n) in tables {
                        sink(id, cache.export_layer(layer, blocks, n)?);
                    }
                    Ok(())
                };
                self.weights.forward(c, scale, &mut self.cache, segments, experts, Some(&mut hook))
            }
        };
        result.map_err(|e| match e {
            GpuForwardError::Experts(x) => EngineError::Experts(x),
            GpuForwardError::Kernel(k) => EngineError::Device(k.to_string()),
        })
    }
}

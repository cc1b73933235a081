//! The engine's one device seam: where the forward pass runs and a sequence's cache rows
//! live. The engine holds a [`Backend`] and calls it; only this module tells the CPU from a
//! GPU. Without the `cuda` feature the GPU variant holds an uninhabited stand-in
//! (`cuda_off.rs`), so this code has no `cfg` and a GPU is refused with a clear error.

use crate::EngineError;
use crate::cache::{CacheLayout, LatentCache};
use crate::cuda::GpuModel;
use crate::engine::SeqId;
use crate::experts::ExpertBackend;
use crate::forward::{ForwardOutput, LayerHook, Model, Pass, Segment};
use crate::kv::LayerRows;
use kernels::Device;

/// The CPU hook that hands each finished layer of the listed sequences to the sink.
fn export_hook<'a, 'b>((tables, sink): LayerExports<'a, 'b>) -> impl FnMut(usize, &LatentCache) + Send {
    move |layer: usize, cache: &LatentCache| {
        for &(id, blocks, n) in tables {
            sink(id, cache.export_layer(layer, blocks, n));
        }
    }
}

/// What a forward pass exports per layer as soon as the layer's rows are in the cache:
/// `(sequence, block table, tokens)` of each sequence to export, and the sink.
pub(crate) type LayerExports<'a, 'b> = (&'a [(SeqId, &'a [u32], usize)], &'a mut crate::engine::LayerSink<'b>);

#[derive(Debug)]
pub(crate) enum Backend {
    /// The forward pass on the rayon pool; rows in the engine's [`LatentCache`].
    Cpu,
    /// Weights and cache rows in GPU memory; the engine's [`LatentCache`] is only the block
    /// allocator.
    Gpu(Box<GpuModel>),
}

impl Backend {
    /// The backend for `device` and the engine's cache for `layout` (rows and allocator on
    /// the CPU; the allocator alone for a GPU, whose rows are allocated there). The layout is
    /// checked before anything is allocated from it.
    pub(crate) fn open(
        device: Device,
        model: &Model,
        experts: &dyn ExpertBackend,
        layout: CacheLayout,
    ) -> Result<(Self, LatentCache), EngineError> {
        match device {
            Device::Cpu => Ok((Backend::Cpu, LatentCache::new(layout)?)),
            Device::Cuda(ordinal) => {
                let cache = LatentCache::allocator_only(layout)?;
                let gpu =
                    GpuModel::new(ordinal, model, experts, layout).map_err(|e| EngineError::Device(e.to_string()))?;
                Ok((Backend::Gpu(Box::new(gpu)), cache))
            }
        }
    }

    pub(crate) fn device(&self) -> Device {
        match self {
            Backend::Cpu => Device::Cpu,
            Backend::Gpu(gpu) => Device::Cuda(gpu.ordinal()),
        }
    }

    /// Runs `segments` through `model`, their rows written into the cache; with `exports`,
    /// each layer's rows of the listed sequences are handed out as soon as they are there;
    /// with `hidden`, every token's final-normed hidden state comes back too (CPU only: a GPU
    /// engine runs no MTP layer and never asks).
    pub(crate) fn forward(
        &mut self,
        model: &Model,
        cache: &mut LatentCache,
        segments: &[Segment<'_>],
        experts: &dyn ExpertBackend,
        exports: Option<LayerExports<'_, '_>>,
        hidden: bool,
    ) -> Result<ForwardOutput, EngineError> {
        match self {
            Backend::Gpu(gpu) => gpu.run(model, segments, experts, exports),
            Backend::Cpu => {
                let mut hook = exports.map(export_hook);
                let on_layer = hook.as_mut().map(|h| h as &mut LayerHook<'_>);
                Ok(model.forward_with(cache, segments, experts, Pass { trace: None, on_layer, hidden })?)
            }
        }
    }

    /// The MTP layer over `segments` ([`Model::mtp_forward`]), exporting its rows as
    /// [`Backend::forward`] does. CPU only: a GPU engine is opened without the MTP layer.
    pub(crate) fn mtp_forward(
        &mut self,
        model: &Model,
        cache: &mut LatentCache,
        segments: &[Segment<'_>],
        prev: &[f32],
        experts: &dyn ExpertBackend,
        exports: Option<LayerExports<'_, '_>>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        match self {
            Backend::Gpu(_) => Err(EngineError::Device("the MTP layer does not run on the GPU engine".into())),
            Backend::Cpu => {
                let mut hook = exports.map(export_hook);
                let on_layer = hook.as_mut().map(|h| h as &mut LayerHook<'_>);
                Ok(model.mtp_forward(cache, segments, prev, experts, on_layer)?)
            }
        }
    }

    /// Writes one layer of a sequence's rows (as exported) into its blocks.
    pub(crate) fn import_layer(
        &mut self,
        cache: &mut LatentCache,
        blocks: &[u32],
        rows: &LayerRows,
    ) -> Result<(), EngineError> {
        match self {
            Backend::Cpu => {
                cache.import_layer(blocks, rows);
                Ok(())
            }
            Backend::Gpu(gpu) => gpu.import_layer(blocks, rows),
        }
    }

    /// Tokens `[0, num_tokens)` of one layer of a sequence's rows.
    pub(crate) fn export_layer(
        &self,
        cache: &LatentCache,
        layer: usize,
        blocks: &[u32],
        num_tokens: usize,
    ) -> Result<LayerRows, EngineError> {
        match self {
            Backend::Cpu => Ok(cache.export_layer(layer, blocks, num_tokens)),
            Backend::Gpu(gpu) => gpu.export_layer(layer, blocks, num_tokens),
        }
    }
}

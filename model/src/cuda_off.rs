//! The GPU model's stand-in in builds without the `cuda` feature: it cannot be created (a
//! GPU is refused with `KernelError::CudaNotBuilt`), so the engine's GPU arms type-check
//! and never run.

use crate::EngineError;
use crate::backend::LayerExports;
use crate::cache::CacheLayout;
use crate::experts::ExpertBackend;
use crate::forward::{ForwardOutput, Model, Segment};
use crate::kv::LayerRows;
use kernels::{Device, KernelError};

/// Uninhabited: no value exists, so every method below is unreachable.
#[derive(Debug)]
pub(crate) enum GpuModel {}

impl GpuModel {
    pub(crate) fn new(
        ordinal: usize,
        _model: &Model,
        _experts: &dyn ExpertBackend,
        _layout: CacheLayout,
    ) -> Result<Self, KernelError> {
        Err(KernelError::CudaNotBuilt(Device::Cuda(ordinal).to_string()))
    }

    pub(crate) fn ordinal(&self) -> usize {
        match *self {}
    }

    pub(crate) fn run(
        &mut self,
        _model: &Model,
        _segments: &[Segment<'_>],
        _experts: &dyn ExpertBackend,
        _exports: Option<LayerExports<'_, '_>>,
    ) -> Result<ForwardOutput, EngineError> {
        match *self {}
    }

    pub(crate) fn import_layer(&mut self, _table: &[u32], _rows: &LayerRows) -> Result<(), EngineError> {
        match *self {}
    }

    pub(crate) fn export_layer(
        &self,
        _layer: usize,
        _table: &[u32],
        _num_tokens: usize,
    ) -> Result<LayerRows, EngineError> {
        match *self {}
    }
}

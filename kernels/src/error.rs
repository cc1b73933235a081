//! Errors a kernel call can return (shape mismatches are caller bugs and panic in debug only).

/// What can go wrong selecting or running a kernel backend.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KernelError {
    #[error("unknown device {0:?}: expected \"cpu\" or \"cuda:N\"")]
    UnknownDevice(String),
    #[error("device {0} requested but this build has no CUDA support (rebuild with the `cuda` feature)")]
    CudaNotBuilt(String),
}

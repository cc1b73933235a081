//! Errors a kernel call can return (shape mismatches are caller bugs and panic in debug only).

/// What can go wrong selecting or running a kernel backend.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KernelError {
    #[error("unknown device {0:?}: expected \"cpu\" or \"cuda:N\"")]
    UnknownDevice(String),
    #[error("device {0} requested but this build has no CUDA support (rebuild with the `cuda` feature)")]
    CudaNotBuilt(String),
    /// A CUDA shared library could not be loaded (no driver, or the toolkit library is not on
    /// the loader's path).
    #[error("device {device} requested but {library} could not be loaded: {hint}")]
    CudaLibraryMissing { device: String, library: &'static str, hint: &'static str },
    #[error("device cuda:{ordinal} requested but this machine has {count} CUDA device(s)")]
    NoSuchGpu { ordinal: usize, count: usize },
    #[error("CUDA {what} failed: {detail}")]
    Cuda { what: String, detail: String },
    #[error("compiling the CUDA kernels with NVRTC failed:\n{0}")]
    KernelCompile(String),
    #[error("the CUDA kernels do not support this model shape: {0}")]
    UnsupportedShape(String),
}

impl KernelError {
    /// True when the machine simply has no usable NVIDIA GPU (as opposed to a GPU that failed).
    pub fn is_no_gpu(&self) -> bool {
        matches!(
            self,
            KernelError::CudaNotBuilt(_) | KernelError::CudaLibraryMissing { .. } | KernelError::NoSuchGpu { .. }
        )
    }
}

//! The compute device an engine runs on.

use crate::KernelError;
use std::fmt;
use std::str::FromStr;

/// Where the forward pass runs. CPU is the reference and the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl FromStr for Device {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        let ordinal = match s.strip_prefix("cuda") {
            Some("") => 0,
            Some(rest) => rest
                .strip_prefix(':')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| KernelError::UnknownDevice(s.to_owned()))?,
            None => return Err(KernelError::UnknownDevice(s.to_owned())),
        };
        let device = Device::Cuda(ordinal);
        if cfg!(feature = "cuda") { Ok(device) } else { Err(KernelError::CudaNotBuilt(device.to_string())) }
    }
}

impl Device {
    /// Whether this device can be used here, checked cheaply before anything is loaded onto
    /// it (for CUDA: the libraries load and the ordinal exists).
    pub fn check(self) -> Result<(), KernelError> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => crate::cuda::Gpu::check(ordinal),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(KernelError::CudaNotBuilt(self.to_string())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert!(matches!("gpu".parse::<Device>(), Err(KernelError::UnknownDevice(_))));
        assert!(matches!("cuda:x".parse::<Device>(), Err(KernelError::UnknownDevice(_))));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = "cuda:1".parse::<Device>().unwrap_err();
        assert_eq!(err, KernelError::CudaNotBuilt("cuda:1".into()));
        assert!(err.to_string().contains("`cuda` feature"));
    }
}

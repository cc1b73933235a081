//! One NVIDIA GPU: its context, the stream every kernel runs on, a cuBLAS handle and the
//! NVRTC-compiled kernel module. Memory is handed around as [`DeviceBuf`] (owning) and
//! [`Dev`] (a typed, bounds-checked device range, copied freely like a pointer).

use super::source::{ENTRY_POINTS, arch_for, compile_ptx};
use crate::KernelError;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

/// An open GPU with the kernels loaded. All work is ordered on one stream.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    name: String,
    compute_capability: (i32, i32),
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .finish()
    }
}

pub(super) fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> KernelError + '_ {
    move |e| KernelError::Cuda { what: what.to_owned(), detail: e.to_string() }
}

impl Gpu {
    /// Whether GPU `ordinal` can be opened, without opening it: the driver, cuBLAS and NVRTC
    /// libraries load (cudarc panics on a missing library, so this never lets it try) and the
    /// device exists. Cheap: serving binaries call it before loading a checkpoint.
    pub fn check(ordinal: usize) -> Result<(), KernelError> {
        let device = format!("cuda:{ordinal}");
        // SAFETY: these only try to open the libraries by their candidate names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(KernelError::CudaLibraryMissing {
                device,
                library: "libcuda.so (the NVIDIA driver)",
                hint: "this machine has no NVIDIA driver, or its libraries are not on the loader's path; use --device cpu",
            });
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(KernelError::CudaLibraryMissing {
                device,
                library: "libcublas.so.12",
                hint: "install CUDA 12's cuBLAS (the toolkit, or the `nvidia-cublas-cu12` Python wheel) and put it on LD_LIBRARY_PATH",
            });
        }
        if !super::source::nvrtc_available() {
            return Err(KernelError::CudaLibraryMissing {
                device,
                library: "libnvrtc.so.12",
                hint: "install CUDA 12's NVRTC (the toolkit, or the `nvidia-cuda-nvrtc-cu12` Python wheel) and put it on LD_LIBRARY_PATH",
            });
        }
        let count = match CudaContext::device_count() {
            Ok(n) => usize::try_from(n).unwrap_or(0),
            Err(e) if e.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => 0,
            Err(e) => return Err(cuda_err("driver initialisation")(e)),
        };
        if ordinal >= count {
            return Err(KernelError::NoSuchGpu { ordinal, count });
        }
        Ok(())
    }

    /// Opens GPU `ordinal` (after [`Gpu::check`]), compiles the kernels for its architecture
    /// and loads them.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>, KernelError> {
        Self::check(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("creating the context"))?;
        let compute_capability = ctx.compute_capability().map_err(cuda_err("reading the compute capability"))?;
        let name = ctx.name().map_err(cuda_err("reading the device name"))?;
        let ptx = compile_ptx(arch_for(compute_capability)?)?;
        let module = ctx.load_module(ptx).map_err(cuda_err("loading the kernel module"))?;
        let mut functions = HashMap::new();
        for &f in ENTRY_POINTS {
            functions.insert(f, module.load_function(f).map_err(cuda_err(f))?);
        }
        // One stream orders everything: per-buffer events would only cost time.
        // SAFETY: no buffer of this context is shared with another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| KernelError::Cuda { what: "creating the cuBLAS handle".into(), detail: e.to_string() })?;
        tracing::info!(ordinal, %name, cc = ?compute_capability, "cuda_device_opened");
        Ok(Arc::new(Gpu { ctx, stream, blas, functions, name, compute_capability }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Total and free device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize), KernelError> {
        let (free, total) = self.ctx.mem_get_info().map_err(cuda_err("reading memory use"))?;
        Ok((total, free))
    }

    /// Makes this GPU's context current on the calling thread (the engine runs on another
    /// thread than the one that opened it). Launches through cudarc do this themselves; raw
    /// copies and cuBLAS calls need it first.
    pub(super) fn bind(&self) -> Result<(), KernelError> {
        self.ctx.bind_to_thread().map_err(cuda_err("binding the context to this thread"))
    }

    pub(super) fn function(&self, name: &'static str) -> &CudaFunction {
        // Every entry point was loaded by `open`.
        &self.functions[name]
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.bind()?;
        self.stream.synchronize().map_err(cuda_err("synchronising the stream"))
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<DeviceBuf<T>, KernelError> {
        let slice = self.stream.alloc_zeros(len.max(1)).map_err(cuda_err("allocating device memory"))?;
        Ok(DeviceBuf { slice, len })
    }

    /// Device memory whose contents are undefined until written: per-call scratch that kernels
    /// fill completely before anything reads it (saves the memset of [`Gpu::zeros`]).
    pub fn scratch<T: DeviceRepr>(&self, len: usize) -> Result<DeviceBuf<T>, KernelError> {
        // SAFETY: uninitialised device memory is only ever garbage values, never host UB;
        // callers write every element before reading it.
        let slice = unsafe { self.stream.alloc::<T>(len.max(1)) }.map_err(cuda_err("allocating device memory"))?;
        Ok(DeviceBuf { slice, len })
    }

    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, host: &[T]) -> Result<DeviceBuf<T>, KernelError> {
        if host.is_empty() {
            return self.zeros(0);
        }
        let slice = self.stream.clone_htod(host).map_err(cuda_err("copying to the device"))?;
        Ok(DeviceBuf { slice, len: host.len() })
    }

    /// Copies `host` into `dst` (same length) and waits, so `host` may be dropped after.
    pub fn write<T: DeviceRepr>(&self, dst: Dev<T>, host: &[T]) -> Result<(), KernelError> {
        assert_eq!(dst.len, host.len(), "write: length mismatch");
        if host.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `dst` is a live range of `host.len()` elements of T (bounds checked when made).
        unsafe { cudarc::driver::result::memcpy_htod_async(dst.ptr, host, self.stream.cu_stream()) }
            .map_err(cuda_err("copying to the device"))?;
        self.synchronize()
    }

    /// Copies a device range to the host (waits for queued work first).
    pub fn read<T: DeviceRepr + Default + Clone>(&self, src: Dev<T>) -> Result<Vec<T>, KernelError> {
        let mut out = vec![T::default(); src.len];
        if out.is_empty() {
            return Ok(out);
        }
        self.bind()?;
        // SAFETY: `src` is a live range of `out.len()` elements of T.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut out, src.ptr, self.stream.cu_stream()) }
            .map_err(cuda_err("copying to the host"))?;
        self.synchronize()?;
        Ok(out)
    }

    /// Device-to-device copy of equal-length ranges.
    pub fn copy<T>(&self, src: Dev<T>, dst: Dev<T>) -> Result<(), KernelError> {
        assert_eq!(src.len, dst.len, "copy: length mismatch");
        if src.len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both are live ranges of `len` elements of T.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst.ptr,
                src.ptr,
                src.len * std::mem::size_of::<T>(),
                self.stream.cu_stream(),
            )
        }
        .map_err(cuda_err("copying on the device"))
    }
}

/// Device memory owned by the holder.
pub struct DeviceBuf<T> {
    slice: CudaSlice<T>,
    len: usize,
}

impl<T> std::fmt::Debug for DeviceBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuf<{}>[{}]", std::any::type_name::<T>(), self.len)
    }
}

impl<T> DeviceBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer as a device range.
    pub fn dev(&self) -> Dev<T> {
        let (ptr, _sync) = self.slice.device_ptr(self.slice.stream());
        Dev { ptr, len: self.len, _t: PhantomData }
    }
}

/// A typed range of device memory: a pointer and a length, checked when narrowed. The
/// buffer it points into must outlive every kernel launched on it (the engine owns them all).
pub struct Dev<T> {
    pub(super) ptr: u64,
    len: usize,
    _t: PhantomData<T>,
}

impl<T> Clone for Dev<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Dev<T> {}

impl<T> std::fmt::Debug for Dev<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dev<{}>[{:#x}; {}]", std::any::type_name::<T>(), self.ptr, self.len)
    }
}

impl<T> Dev<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `[start, start + len)`.
    pub fn range(self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.len, "device range {start}+{len} outside {}", self.len);
        Dev { ptr: self.ptr + (start * std::mem::size_of::<T>()) as u64, len, _t: PhantomData }
    }

    /// Elements from `start` to the end.
    pub fn from(self, start: usize) -> Self {
        assert!(start <= self.len, "device offset {start} outside {}", self.len);
        self.range(start, self.len - start)
    }
}

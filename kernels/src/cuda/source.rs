//! The CUDA C sources of the kernels (kept in `kernels/cuda/`) and their NVRTC compilation.
//!
//! The sources include no CUDA header, so compiling them needs only libnvrtc: at start-up on
//! a GPU machine, and in CI on machines without a GPU (every kernel is compiled to PTX there,
//! so a syntax or type error fails the build's tests).

use crate::KernelError;
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

const PRELUDE: (&str, &str) = ("prelude.cuh", include_str!("../../cuda/prelude.cuh"));

/// Every `.cu` file, in the order they are concatenated after the prelude.
pub const SOURCES: &[(&str, &str)] = &[
    ("norm.cu", include_str!("../../cuda/norm.cu")),
    ("rope.cu", include_str!("../../cuda/rope.cu")),
    ("elementwise.cu", include_str!("../../cuda/elementwise.cu")),
    ("router.cu", include_str!("../../cuda/router.cu")),
    ("fp8.cu", include_str!("../../cuda/fp8.cu")),
    ("cache.cu", include_str!("../../cuda/cache.cu")),
    ("mla.cu", include_str!("../../cuda/mla.cu")),
    ("moe.cu", include_str!("../../cuda/moe.cu")),
];

/// Every kernel entry point the Rust side launches.
pub const ENTRY_POINTS: &[&str] = &[
    "rms_norm_f32",
    "rope_f32",
    "silu_mul_bf16",
    "f32_to_bf16_n",
    "add_f32",
    "embed_bf16",
    "gather_rows_bf16",
    "moe_combine_f32",
    "route_tokens",
    "dequant_fp8_bf16",
    "scatter_rows_f32",
    "gather_rows_f32",
    "mla_attend_f32",
    "mla_combine_f32",
    "moe_gemv_bf16",
];

/// The one translation unit: the prelude, then every source, each under a `#line` directive
/// so compiler messages name the right file and line.
pub fn program() -> String {
    let mut src = String::new();
    for (name, text) in std::iter::once(&PRELUDE).chain(SOURCES) {
        src.push_str(&format!("#line 1 \"{name}\"\n"));
        src.push_str(text);
        src.push('\n');
    }
    src
}

/// Whether libnvrtc can be loaded (loading it when absent would panic inside cudarc).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to open the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles every kernel to PTX for a virtual architecture such as `compute_90`.
pub fn compile_ptx(arch: &'static str) -> Result<cudarc::nvrtc::Ptx, KernelError> {
    compile(program(), arch)
}

/// Compiles one CUDA C translation unit to PTX; a compile error carries NVRTC's log.
pub fn compile(src: String, arch: &'static str) -> Result<cudarc::nvrtc::Ptx, KernelError> {
    if !nvrtc_available() {
        return Err(KernelError::CudaLibraryMissing {
            device: format!("NVRTC ({arch})"),
            library: "libnvrtc.so.12",
            hint: "install the CUDA toolkit or the `nvidia-cuda-nvrtc-cu12` Python wheel and put its lib directory on LD_LIBRARY_PATH",
        });
    }
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some("expertmesh_kernels.cu".into()),
        // IEEE division and square root, no flush-to-zero: the CPU engine is the reference.
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        ..Default::default()
    };
    compile_ptx_with_opts(src, opts).map_err(|e| KernelError::KernelCompile(compile_log(&e)))
}

fn compile_log(e: &cudarc::nvrtc::CompileError) -> String {
    match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
        other => other.to_string(),
    }
}

/// The virtual architecture to compile for on a device of compute capability `(major, minor)`.
pub fn arch_for(cc: (i32, i32)) -> Result<&'static str, KernelError> {
    Ok(match cc {
        (9, _) => "compute_90",
        (8, 9) => "compute_89",
        (8, 6..) => "compute_86",
        (8, _) => "compute_80",
        (10.., _) => "compute_90",
        (major, minor) => {
            return Err(KernelError::UnsupportedShape(format!(
                "compute capability {major}.{minor}: the kernels need 8.0 (Ampere) or newer"
            )));
        }
    })
}

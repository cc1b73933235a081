//! Every CUDA kernel compiles to PTX with NVRTC, on any machine (no GPU needed): a syntax or
//! type error in `kernels/cuda/*.cu` fails here. Needs libnvrtc on the loader's path
//! (`tools/test.sh` installs the `nvidia-cuda-nvrtc-cu12` wheel and sets LD_LIBRARY_PATH).
#![cfg(feature = "cuda")]

use kernels::KernelError;
use kernels::cuda::source::{ENTRY_POINTS, compile, compile_ptx, nvrtc_available};

fn require_nvrtc() {
    assert!(
        nvrtc_available(),
        "libnvrtc.so.12 is not loadable: install the `nvidia-cuda-nvrtc-cu12` wheel (tools/requirements-test.txt) \
         and put its lib directory on LD_LIBRARY_PATH, as tools/test.sh does"
    );
}

#[test]
fn every_kernel_compiles_for_ampere_and_hopper() {
    require_nvrtc();
    for arch in ["compute_80", "compute_90"] {
        let ptx = compile_ptx(arch).unwrap_or_else(|e| panic!("{arch}: {e}")).to_src();
        assert!(ptx.contains(&format!(".target sm_{}", &arch["compute_".len()..])), "{arch}: no target line");
        for name in ENTRY_POINTS {
            assert!(ptx.contains(&format!(".entry {name}(")), "{arch}: entry point {name} missing from the PTX");
        }
    }
}

#[test]
fn a_broken_kernel_is_reported_with_the_compiler_log() {
    require_nvrtc();
    let src = "#line 1 \"broken.cu\"\nextern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }\n";
    match compile(src.into(), "compute_90") {
        Err(KernelError::KernelCompile(log)) => {
            assert!(log.contains("broken.cu") && log.contains("undefined_name"), "{log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

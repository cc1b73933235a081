//! Throughput of `kernels::cpu::matmul` on the DeepSeek-V2-Lite shapes the engine runs, for
//! every weight dtype / precision path, next to the measured DRAM read bandwidth.
//!
//! `cargo run -p kernels --release --example matmul_bench [-- --quick]`
//!
//! Each shape rotates through enough copies of its weights (>= 256 MiB) that calls read
//! DRAM, not the last-level cache, as a model with many layers and experts does. Calls are
//! made from a rayon worker (as an engine running its forward pass inside the pool would),
//! which avoids a thread hand-off per call. Columns: median time per call, GFLOP/s and
//! weight GB/s from it; at m = 1 also weight GB/s as a fraction of the read bandwidth
//! measured just before the shape (best of 3 passes over 256 MiB): from the median call
//! (`%bw med`) and from the best call (`%bw best`; on a shared, noisy machine short calls
//! can catch quieter moments than the bandwidth passes did, so this one can exceed 100%).

use kernels::bf16;
use kernels::cpu::bandwidth::measure_read_bandwidth;
use kernels::cpu::matmul::{Precision, WeightRef, matmul};
use kernels::cpu::packed::{PackedBf16, PackedRef};
use std::time::Instant;

/// (name, k, n): the projections of the benchmark model (`expert_up`, `dense_up`: gate and
/// up stacked, as the model runs them).
const SHAPES: [(&str, usize, usize); 7] = [
    ("q_proj", 2048, 3072),
    ("kv_a_proj", 2048, 576),
    ("expert_up", 2048, 2816),
    ("expert_down", 1408, 2048),
    ("dense_up", 2048, 21888),
    ("dense_down", 10944, 2048),
    ("lm_head", 2048, 102400),
];
const MS: [usize; 4] = [1, 8, 32, 128];
/// Minimum weight bytes a shape rotates through (well beyond a 32 MiB L3).
const ROTATE_BYTES: usize = 256 << 20;
/// (name, weight layout, precision); layout 0 = f32, 1 = bf16 rows, 2 = bf16 packed.
const PATHS: [(&str, u8, Precision); 5] = [
    ("bf16 Exact", 1, Precision::Exact),
    ("packed Exact", 2, Precision::Exact),
    ("bf16 Bf16Act", 1, Precision::Bf16Activations),
    ("packed Bf16Act", 2, Precision::Bf16Activations),
    ("f32 Exact", 0, Precision::Exact),
];

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only SUBSTR`: paths or shapes whose name contains SUBSTR (repeatable).
    let args: Vec<String> = std::env::args().collect();
    let only: Vec<String> = args.windows(2).filter(|w| w[0] == "--only").map(|w| w[1].clone()).collect();
    // Run on a pool worker; `scope` returns when the closure does.
    rayon::scope(|_| bench(quick, &only));
}

fn bench(quick: bool, only: &[String]) {
    #[cfg(target_arch = "x86_64")]
    println!(
        "threads {}, avx512f {}, avx512bw {}, avx512bf16 {}",
        rayon::current_num_threads(),
        is_x86_feature_detected!("avx512f"),
        is_x86_feature_detected!("avx512bw"),
        is_x86_feature_detected!("avx512bf16"),
    );
    let bw = measure_read_bandwidth(if quick { 256 << 20 } else { 1 << 30 }, 5);
    println!("measured DRAM read bandwidth (best of 5 passes over 1 GiB): {bw:.1} GB/s\n");
    println!(
        "{:<12} {:>6} {:>6} {:<13} {:>4} {:>10} {:>8} {:>6} {:>6} {:>8} {:>9}",
        "shape", "k", "n", "path", "m", "us/call", "GFLOP/s", "GB/s", "bw", "%bw med", "%bw best"
    );
    let mut seed = 0x1234_5678u64;
    for (name, k, n) in SHAPES {
        let base: Vec<f32> = (0..n * k).map(|_| next(&mut seed) * (k as f32).powf(-0.5)).collect();
        let x: Vec<f32> = (0..128 * k).map(|_| next(&mut seed)).collect();
        for (path, layout, precision) in PATHS {
            if !only.is_empty() && !only.iter().any(|o| path.contains(o.as_str()) || name.contains(o.as_str())) {
                continue;
            }
            let bf = layout != 0;
            let bw = measure_read_bandwidth(256 << 20, 3);
            let wbytes = n * k * if bf { 2 } else { 4 };
            let copies = ROTATE_BYTES.div_ceil(wbytes).max(1);
            let (wb, wf): (Vec<Vec<bf16>>, Vec<Vec<f32>>) = if bf {
                let mut one: Vec<bf16> = base.iter().map(|&v| bf16::from_f32(v)).collect();
                if layout == 2 {
                    one = PackedBf16::pack(&one, n, k).data;
                }
                ((0..copies).map(|_| one.clone()).collect(), Vec::new())
            } else {
                (Vec::new(), (0..copies).map(|_| base.clone()).collect())
            };
            let weights = |c: usize| match layout {
                0 => WeightRef::F32(&wf[c % copies]),
                1 => WeightRef::Bf16(&wb[c % copies]),
                _ => WeightRef::Packed(PackedRef::new(&wb[c % copies], n, k)),
            };
            for m in MS {
                let mut out = vec![0f32; m * n];
                matmul(&x[..m * k], m, k, weights(copies - 1), n, &mut out, precision);
                let (min_s, min_calls) = if quick { (0.05, 3) } else { (0.3, copies.max(5)) };
                let start = Instant::now();
                let mut times = Vec::new();
                while times.len() < min_calls || start.elapsed().as_secs_f64() < min_s {
                    let t = Instant::now();
                    matmul(&x[..m * k], m, k, weights(times.len()), n, &mut out, precision);
                    times.push(t.elapsed().as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                let s = times[times.len() / 2];
                let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
                let gbs = wbytes as f64 / s / 1e9;
                let (bws, med, best) = if m == 1 {
                    let best = wbytes as f64 / times[0] / 1e9;
                    (format!("{bw:.1}"), format!("{:.0}%", 100.0 * gbs / bw), format!("{:.0}%", 100.0 * best / bw))
                } else {
                    Default::default()
                };
                println!(
                    "{name:<12} {k:>6} {n:>6} {path:<13} {m:>4} {:>10.1} {gflops:>8.1} {gbs:>6.1} {bws:>6} {med:>8} {best:>9}",
                    s * 1e6
                );
            }
        }
    }
}

/// Uniform in [-1, 1) from a 64-bit LCG (benchmark data needs no quality).
fn next(s: &mut u64) -> f32 {
    *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

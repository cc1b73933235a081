//! Compute rate of `matmul` with cache-resident weights (best of 200 calls), row-major vs
//! packed bf16, both precisions: the kernels' own ceiling, without DRAM in the way (see
//! `matmul_bench` for the model shapes streamed from memory). Run it with
//! `RAYON_NUM_THREADS=1` for per-core figures.
//!
//! `cargo run -p kernels --release --example matmul_peak`
use kernels::bf16;
use kernels::cpu::matmul::{Precision, WeightRef, matmul};
use kernels::cpu::packed::PackedBf16;
use std::time::Instant;
fn main() {
    rayon::scope(|_| {
        for &(m, k, n) in &[(128usize, 1024usize, 96usize), (32, 2048, 96), (8, 2048, 192), (128, 2048, 480)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            let w: Vec<bf16> = (0..n * k).map(|i| bf16::from_f32(((i * 104729) % 1000) as f32 / 1e5)).collect();
            let p = PackedBf16::pack(&w, n, k);
            for prec in [Precision::Bf16Activations, Precision::Exact] {
                for (name, wr) in [("rows", WeightRef::Bf16(&w)), ("packed", WeightRef::Packed(p.as_ref()))] {
                    let mut out = vec![0f32; m * n];
                    let mut best = f64::MAX;
                    for _ in 0..200 {
                        let t = Instant::now();
                        matmul(&x, m, k, wr, n, &mut out, prec);
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    println!(
                        "m={m} k={k} n={n} {prec:?} {name}: best {:.1} GFLOP/s",
                        2.0 * (m * n * k) as f64 / best / 1e9
                    );
                }
            }
        }
    });
}

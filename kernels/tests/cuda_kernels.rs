//! Every CUDA kernel against its CPU reference. Runs where a GPU is present; elsewhere each
//! test prints why it was skipped (the PTX of every kernel is still compiled by `cuda_ptx`).
#![cfg(feature = "cuda")]

use half::bf16;
use kernels::cpu::rope::{RopeTable, Yarn};
use kernels::cpu::router::{RouterConfig, RouterKind, route};
use kernels::cpu::{Precision, WeightRef, matmul};
use kernels::cuda::{BatchedGemm, Gpu, MlaArgs, WeightLayout};
use std::io::Write;
use std::sync::Arc;

fn gpu() -> Option<Arc<Gpu>> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) if e.is_no_gpu() => {
            // Straight to stderr: the test harness captures `println!`/`eprintln!`.
            let _ = writeln!(std::io::stderr(), "skipped: no usable NVIDIA GPU here ({e})");
            None
        }
        Err(e) => panic!("a GPU is present but could not be opened: {e}"),
    }
}

/// xorshift64*: deterministic test data without a dependency.
struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        (v as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: gpu {g} vs cpu {w}");
    }
}

fn bf16s(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

#[test]
fn opening_a_missing_gpu_is_an_error_not_a_panic() {
    // On a machine without a driver this is the library error; with GPUs, ordinal 4096 does
    // not exist.
    let err = Gpu::open(4096).expect_err("no such GPU");
    assert!(err.is_no_gpu(), "{err}");
}

#[test]
fn rms_norm_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(1);
    let (rows, dim, stride) = (7, 96, 128);
    let x = r.vec(rows * stride);
    let w = r.vec(dim);
    let mut want = Vec::new();
    for row in x.chunks_exact(stride) {
        let mut v = row[..dim].to_vec();
        kernels::cpu::norm::rms_norm(&mut v, &w, 1e-6);
        want.extend(v);
    }
    let (dx, dw, dout) = (g.upload(&x).unwrap(), g.upload(&w).unwrap(), g.zeros::<f32>(rows * dim).unwrap());
    g.rms_norm(dx.dev(), stride, dw.dev(), dout.dev(), dim, rows, 1e-6).unwrap();
    assert_close(&g.read(dout.dev()).unwrap(), &want, 1e-5, "rms_norm");
}

#[test]
fn rope_matches_the_cpu_in_both_layouts_with_yarn() {
    let Some(g) = gpu() else { return };
    let yarn = Yarn {
        factor: 40.0,
        original_max_position_embeddings: 4096.0,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: Some(1.0),
        mscale_all_dim: Some(0.707),
        attention_factor: None,
        truncate: true,
    };
    let mut r = Rng(2);
    let (tokens, heads, dim) = (5, 3, 64);
    let positions: Vec<u32> = vec![0, 1, 17, 4095, 70000];
    for interleave in [false, true] {
        let table = RopeTable::new(dim, 10000.0, Some(&yarn), interleave);
        let stride = heads * (dim + 8);
        let x = r.vec(tokens * stride);
        let mut want = x.clone();
        let (mut cos, mut sin) = (vec![0f32; dim / 2], vec![0f32; dim / 2]);
        for (t, &p) in positions.iter().enumerate() {
            table.cos_sin(p as usize, &mut cos, &mut sin);
            for h in 0..heads {
                let o = t * stride + h * (dim + 8) + 8;
                table.apply(&mut want[o..o + dim], &cos, &sin);
            }
        }
        let dx = g.upload(&x).unwrap();
        let (dpos, dfreq) = (g.upload(&positions).unwrap(), g.upload(table.inv_freq()).unwrap());
        g.rope(dx.dev().from(8), stride, dim + 8, heads, dpos.dev(), dfreq.dev(), table.attention_factor(), interleave)
            .unwrap();
        assert_close(&g.read(dx.dev()).unwrap(), &want, 2e-5, "rope");
    }
}

#[test]
fn silu_gate_add_embed_gather_and_combine_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(3);
    let (rows, inter) = (6, 40);
    let gu = r.vec(rows * 2 * inter);
    let mut want = Vec::new();
    for row in gu.chunks_exact(2 * inter) {
        let mut a = row[..inter].to_vec();
        kernels::cpu::activation::silu_mul(&mut a, &row[inter..]);
        want.extend(a.iter().map(|&v| bf16::from_f32(v).to_f32()));
    }
    let (dgu, dact) = (g.upload(&gu).unwrap(), g.zeros::<bf16>(rows * inter).unwrap());
    g.silu_mul(dgu.dev(), dact.dev(), rows, inter).unwrap();
    let got: Vec<f32> = g.read(dact.dev()).unwrap().iter().map(|v| v.to_f32()).collect();
    assert_close(&got, &want, 1e-2, "silu_mul");

    let (a, b) = (r.vec(1000), r.vec(1000));
    let (da, db) = (g.upload(&a).unwrap(), g.upload(&b).unwrap());
    g.add(da.dev(), db.dev()).unwrap();
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_eq!(g.read(da.dev()).unwrap(), sum, "add");

    let hidden = 24;
    let table = bf16s(&r.vec(10 * hidden));
    let ids = [3u32, 0, 9, 3];
    let (dt, di, de) = (g.upload(&table).unwrap(), g.upload(&ids).unwrap(), g.zeros::<f32>(4 * hidden).unwrap());
    g.embed(dt.dev(), di.dev(), de.dev(), hidden).unwrap();
    let want: Vec<f32> =
        ids.iter().flat_map(|&i| table[i as usize * hidden..][..hidden].iter().map(|v| v.to_f32())).collect();
    assert_eq!(g.read(de.dev()).unwrap(), want, "embed");

    let x = r.vec(4 * hidden);
    let src = [2u32, 2, 0, 3, 1];
    let (dx, ds, dg) = (g.upload(&x).unwrap(), g.upload(&src).unwrap(), g.zeros::<bf16>(5 * hidden).unwrap());
    g.gather_rows_bf16(dx.dev(), ds.dev(), dg.dev(), hidden).unwrap();
    let want: Vec<bf16> = src.iter().flat_map(|&i| bf16s(&x[i as usize * hidden..][..hidden])).collect();
    assert_eq!(g.read(dg.dev()).unwrap(), want, "gather");

    // Two tokens, k = 2, over three expert-output rows.
    let eo = r.vec(3 * hidden);
    let (rows_of, w) = ([0u32, 2, 1, 2], [0.25f32, 1.5, -0.5, 2.0]);
    let (deo, dr, dw, dout) = (
        g.upload(&eo).unwrap(),
        g.upload(&rows_of).unwrap(),
        g.upload(&w).unwrap(),
        g.zeros::<f32>(2 * hidden).unwrap(),
    );
    g.moe_combine(deo.dev(), dr.dev(), dw.dev(), 2, dout.dev(), hidden).unwrap();
    let mut want = vec![0f32; 2 * hidden];
    for t in 0..2 {
        for s in 0..2 {
            for i in 0..hidden {
                want[t * hidden + i] += eo[rows_of[t * 2 + s] as usize * hidden + i] * w[t * 2 + s];
            }
        }
    }
    assert_close(&g.read(dout.dev()).unwrap(), &want, 1e-6, "combine");
}

#[test]
fn gemms_match_the_cpu_with_bf16_activations() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(4);
    let (m, k, n) = (9, 160, 72);
    let x = bf16s(&r.vec(m * k));
    let w = bf16s(&r.vec(n * k));
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let mut want = vec![0f32; m * n];
    matmul(&xf, m, k, WeightRef::Bf16(&w), n, &mut want, Precision::Bf16Activations);
    let (dx, dw, dout) = (g.upload(&x).unwrap(), g.upload(&w).unwrap(), g.zeros::<f32>(m * n).unwrap());
    g.gemm(dx.dev(), m, k, dw.dev(), n, dout.dev()).unwrap();
    assert_close(&g.read(dout.dev()).unwrap(), &want, 1e-4, "gemm");

    // Per-head projections: x rows interleave heads ([m, heads, k]); weights [heads, k, n]
    // (InOut) or [heads, n, k] (OutIn).
    let heads = 3;
    let xs = bf16s(&r.vec(m * heads * k));
    let ws = bf16s(&r.vec(heads * k * n));
    for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
        let mut want = vec![0f32; m * heads * n];
        for h in 0..heads {
            let xh: Vec<f32> = (0..m).flat_map(|i| xs[(i * heads + h) * k..][..k].iter().map(|v| v.to_f32())).collect();
            let wh = &ws[h * k * n..(h + 1) * k * n];
            let wt: Vec<bf16> = match layout {
                WeightLayout::OutIn => wh.to_vec(),
                WeightLayout::InOut => (0..n).flat_map(|j| (0..k).map(move |kk| wh[kk * n + j])).collect(),
            };
            let mut oh = vec![0f32; m * n];
            matmul(&xh, m, k, WeightRef::Bf16(&wt), n, &mut oh, Precision::Bf16Activations);
            for i in 0..m {
                want[(i * heads + h) * n..][..n].copy_from_slice(&oh[i * n..][..n]);
            }
        }
        let (dx, dw, dout) = (g.upload(&xs).unwrap(), g.upload(&ws).unwrap(), g.zeros::<f32>(m * heads * n).unwrap());
        g.gemm_batched(&BatchedGemm {
            batch: heads,
            m,
            k,
            n,
            x: dx.dev(),
            ldx: heads * k,
            stride_x: k,
            w: dw.dev(),
            w_layout: layout,
            stride_w: k * n,
            out: dout.dev(),
            ldo: heads * n,
            stride_o: n,
        })
        .unwrap();
        assert_close(&g.read(dout.dev()).unwrap(), &want, 1e-4, &format!("batched gemm {layout:?}"));
    }
}

#[test]
fn device_side_expert_gemv_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(8);
    // Three experts stacked; 2 tokens x top-2 pairs; k = 40 (8-aligned) and 20 (not).
    let (experts, n, top_k) = (3, 24, 2);
    for k in [40, 20] {
        let w = bf16s(&r.vec(experts * n * k));
        let x = bf16s(&r.vec(2 * k));
        let ids = [2u32, 0, 1, 2];
        let mut want = vec![0f32; ids.len() * n];
        for (p, &e) in ids.iter().enumerate() {
            let xf: Vec<f32> = x[(p / top_k) * k..][..k].iter().map(|v| v.to_f32()).collect();
            let we = &w[e as usize * n * k..][..n * k];
            matmul(&xf, 1, k, WeightRef::Bf16(we), n, &mut want[p * n..(p + 1) * n], Precision::Bf16Activations);
        }
        let (dw, di, dx) = (g.upload(&w).unwrap(), g.upload(&ids).unwrap(), g.upload(&x).unwrap());
        let dout = g.zeros::<f32>(ids.len() * n).unwrap();
        g.moe_gemv(dw.dev(), di.dev(), dx.dev(), top_k, dout.dev(), n, k).unwrap();
        assert_close(&g.read(dout.dev()).unwrap(), &want, 1e-4, &format!("moe_gemv k={k}"));
    }
}

#[test]
fn routers_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(5);
    let tokens = 33;
    let configs = [
        (RouterKind::SigmoidNoAuxTc, 256, 8, 8, 4, true, 2.5),
        (RouterKind::SigmoidNoAuxTc, 64, 6, 1, 1, false, 1.0),
        (RouterKind::SoftmaxGreedy, 64, 6, 1, 1, false, 1.0),
        (RouterKind::SoftmaxGroupLimited, 160, 6, 8, 3, false, 16.0),
    ];
    for (kind, e, top_k, n_group, topk_group, norm, scale) in configs {
        let cfg = RouterConfig {
            kind,
            n_experts: e,
            top_k,
            n_group,
            topk_group,
            norm_topk_prob: norm,
            routed_scaling_factor: scale,
        };
        let logits: Vec<f32> = r.vec(tokens * e).iter().map(|v| v * 4.0).collect();
        let bias: Vec<f32> = r.vec(e).iter().map(|v| v * 0.1).collect();
        let bias_used = kind == RouterKind::SigmoidNoAuxTc;
        let (mut ids, mut w) = (vec![0u32; tokens * top_k], vec![0f32; tokens * top_k]);
        for t in 0..tokens {
            route(
                &cfg,
                &logits[t * e..(t + 1) * e],
                bias_used.then_some(&bias[..]),
                &mut ids[t * top_k..(t + 1) * top_k],
                &mut w[t * top_k..(t + 1) * top_k],
            );
        }
        let (dl, db) = (g.upload(&logits).unwrap(), g.upload(&bias).unwrap());
        let (di, dw) = (g.zeros::<u32>(tokens * top_k).unwrap(), g.zeros::<f32>(tokens * top_k).unwrap());
        g.route(&cfg, dl.dev(), bias_used.then(|| db.dev()), di.dev(), dw.dev()).unwrap();
        assert_eq!(g.read(di.dev()).unwrap(), ids, "{kind:?} ids");
        assert_close(&g.read(dw.dev()).unwrap(), &w, 1e-5, &format!("{kind:?} weights"));
    }
}

#[test]
fn fp8_dequantization_matches_the_cpu_exactly() {
    let Some(g) = gpu() else { return };
    let (rows, cols, block): (usize, usize, _) = (130, 300, (128, 128));
    let w: Vec<u8> = (0..rows * cols).map(|i| (i * 37 % 256) as u8).collect();
    let scales: Vec<f32> = (0..rows.div_ceil(128) * cols.div_ceil(128)).map(|i| 0.5 + i as f32).collect();
    let mut want = vec![bf16::ZERO; rows * cols];
    kernels::cpu::fp8::dequantize_blocks(&w, &scales, rows, cols, block, &mut want);
    let (dw, ds, dout) = (g.upload(&w).unwrap(), g.upload(&scales).unwrap(), g.zeros::<bf16>(rows * cols).unwrap());
    g.dequant_fp8(dw.dev(), ds.dev(), rows, cols, block, dout.dev()).unwrap();
    let got = g.read(dout.dev()).unwrap();
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "[{i}] gpu {a} cpu {b}");
    }
}

#[test]
fn paged_attention_matches_the_cpu_for_decode_and_prefill_tokens() {
    let Some(g) = gpu() else { return };
    // Sequence A decoding at 37 positions, sequence B's prompt tokens 0..5 (causal: token j
    // sees j + 1 rows); scattered blocks.
    let queries: Vec<(u32, u32)> = std::iter::once((0, 37)).chain((0..5).map(|j| (3, j + 1))).collect();
    attention_case(&g, 20, vec![5, 1, 9, 20, 2], &queries, 24);
}

#[test]
fn split_contexts_merge_to_the_cpu_result() {
    let Some(g) = gpu() else { return };
    // One decode token over 1000 rows (split over blocks), and a second over 3 rows whose
    // later parts are empty.
    let table: Vec<u32> = (0..63).rev().collect();
    assert!(kernels::cuda::context_splits(2, 1, 1000) > 1, "this case must split");
    attention_case(&g, 16, [table, vec![70]].concat(), &[(0, 1000), (63, 3)], 72);
}

/// Attention of `queries` (table offset, context length) against the CPU reference.
fn attention_case(g: &Gpu, heads: usize, tables: Vec<u32>, queries: &[(u32, u32)], blocks: usize) {
    let mut r = Rng(6);
    let (rank, dr, bs) = (512, 64, 16);
    let width = rank + dr;
    let cache = r.vec(blocks * bs * width);
    let tokens = queries.len();
    let q_lat = r.vec(tokens * heads * rank);
    let q_pe = r.vec(tokens * heads * dr);
    let scale = 0.07;
    let view = kernels::cpu::mla::PagedLatent { data: &cache, block_size: bs, rank, rope_dim: dr };
    let mut want = vec![0f32; tokens * heads * rank];
    let mut scratch = Vec::new();
    for (i, &(off, n_ctx)) in queries.iter().enumerate() {
        kernels::cpu::mla::attend(
            view,
            &tables[off as usize..],
            n_ctx as usize,
            &q_lat[i * heads * rank..(i + 1) * heads * rank],
            &q_pe[i * heads * dr..(i + 1) * heads * dr],
            scale,
            heads,
            &mut scratch,
            &mut want[i * heads * rank..(i + 1) * heads * rank],
        );
    }
    let offsets: Vec<u32> = queries.iter().map(|q| q.0).collect();
    let lens: Vec<u32> = queries.iter().map(|q| q.1).collect();
    let (dc, dt, doff, dlen) = (
        g.upload(&cache).expect("gpu call"),
        g.upload(&tables).expect("gpu call"),
        g.upload(&offsets).expect("gpu call"),
        g.upload(&lens).expect("gpu call"),
    );
    let (dq, dp, dout) = (
        g.upload(&q_lat).expect("gpu call"),
        g.upload(&q_pe).expect("gpu call"),
        g.zeros::<f32>(tokens * heads * rank).expect("gpu call"),
    );
    g.mla_attend(&MlaArgs {
        cache: dc.dev(),
        block_size: bs,
        tables: dt.dev(),
        table_offsets: doff.dev(),
        ctx_lens: dlen.dev(),
        q_lat: dq.dev(),
        q_pe: dp.dev(),
        pe_token_stride: heads * dr,
        pe_head_stride: dr,
        out: dout.dev(),
        tokens,
        heads,
        rank,
        rope_dim: dr,
        scale,
        max_ctx: lens.iter().copied().max().unwrap_or(0) as usize,
    })
    .expect("gpu call");
    assert_close(&g.read(dout.dev()).expect("gpu call"), &want, 1e-4, "mla");
}

#[test]
fn cache_rows_scatter_and_gather_round_trip() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(7);
    let (width, slots) = (40, vec![7u32, 0, 12, 3]);
    let rows = r.vec(slots.len() * (width + 4));
    let (dc, ds, dr) = (g.zeros::<f32>(16 * width).unwrap(), g.upload(&slots).unwrap(), g.upload(&rows).unwrap());
    g.scatter_rows(dc.dev(), ds.dev(), dr.dev(), width + 4, width).unwrap();
    let out = g.zeros::<f32>(slots.len() * width).unwrap();
    g.gather_cache_rows(dc.dev(), ds.dev(), out.dev(), width).unwrap();
    let want: Vec<f32> = rows.chunks_exact(width + 4).flat_map(|c| c[..width].to_vec()).collect();
    assert_eq!(g.read(out.dev()).unwrap(), want);
}

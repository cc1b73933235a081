//! The V3 and V2 MoE routers (`router.cu`); reference `crate::cpu::router`.

use super::gpu::{Dev, Gpu, cuda_err};
use super::launch::int;
use crate::KernelError;
use crate::cpu::router::{RouterConfig, RouterKind};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Limits compiled into `router.cu`.
pub const MAX_ROUTED_EXPERTS: usize = 512;
pub const MAX_EXPERT_GROUPS: usize = 64;

impl Gpu {
    /// Routes `logits: [tokens, n_experts]` as [`crate::cpu::router::route`] does, writing
    /// `top_k` ascending ids and weights per token.
    pub fn route(
        &self,
        cfg: &RouterConfig,
        logits: Dev<f32>,
        bias: Option<Dev<f32>>,
        ids: Dev<u32>,
        weights: Dev<f32>,
    ) -> Result<(), KernelError> {
        let e = cfg.n_experts;
        if e > MAX_ROUTED_EXPERTS || cfg.n_group > MAX_EXPERT_GROUPS {
            return Err(KernelError::UnsupportedShape(format!(
                "{e} routed experts in {} groups (the router kernel takes at most {MAX_ROUTED_EXPERTS} in {MAX_EXPERT_GROUPS})",
                cfg.n_group
            )));
        }
        assert!(e > 0 && logits.len().is_multiple_of(e), "route logits");
        let tokens = logits.len() / e;
        assert!(ids.len() == tokens * cfg.top_k && weights.len() == ids.len(), "route outputs");
        if tokens == 0 {
            return Ok(());
        }
        let kind: i32 = match cfg.kind {
            RouterKind::SigmoidNoAuxTc => 0,
            RouterKind::SoftmaxGreedy => 1,
            RouterKind::SoftmaxGroupLimited => 2,
        };
        let bias_ptr = bias.map_or(0, |b| {
            assert_eq!(b.len(), e, "route bias");
            b.ptr
        });
        let (t, ee, k, g, kg) = (
            int(tokens, "tokens")?,
            int(e, "experts")?,
            int(cfg.top_k, "top_k")?,
            int(cfg.n_group, "n_group")?,
            int(cfg.topk_group, "topk_group")?,
        );
        let norm = i32::from(cfg.norm_topk_prob);
        let scaling = cfg.routed_scaling_factor;
        let mut b = self.stream.launch_builder(self.function("route_tokens"));
        b.arg(&logits.ptr).arg(&bias_ptr).arg(&t).arg(&ee).arg(&kind).arg(&k).arg(&g).arg(&kg).arg(&norm).arg(&scaling);
        b.arg(&ids.ptr).arg(&weights.ptr);
        let threads = 64u32;
        let cfg = LaunchConfig {
            grid_dim: (tokens.div_ceil(threads as usize) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types match the kernel; ranges checked above.
        unsafe { b.launch(cfg) }.map_err(cuda_err("route_tokens"))?;
        Ok(())
    }
}

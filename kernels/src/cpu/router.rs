//! MoE routers: which experts each token visits and with what weight.
//!
//! V3 (`noaux_tc`): `s = sigmoid(logits)`; choose on `s + bias`; groups scored by the sum of
//! their two best; keep `topk_group` groups (experts of other groups can never win: -inf);
//! weights gathered from `s`, normalized if asked, always times the scaling factor.
//! V2: `s = softmax(logits)`; `greedy` or `group_limited_greedy` (groups scored by their max,
//! experts of other groups score 0, as transformers masks them); no normalization.
//! Outputs are sorted by expert id so results are deterministic.

/// How scores are made from router logits, and how groups are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterKind {
    /// DeepSeek-V3: sigmoid scores, bias for selection only, groups by sum of top-2.
    SigmoidNoAuxTc,
    /// DeepSeek-V2 `greedy`: softmax scores, plain top-k.
    SoftmaxGreedy,
    /// DeepSeek-V2 `group_limited_greedy`: softmax scores, groups by their max score.
    SoftmaxGroupLimited,
}

/// Router shape and post-processing.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    pub kind: RouterKind,
    pub n_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

/// Routes one token: `logits` has `n_experts` values (f32), `bias` is the V3
/// `e_score_correction_bias`. Writes `top_k` expert ids (ascending) and their weights.
pub fn route(cfg: &RouterConfig, logits: &[f32], bias: Option<&[f32]>, ids: &mut [u32], weights: &mut [f32]) {
    let e = cfg.n_experts;
    assert_eq!(logits.len(), e);
    assert_eq!(ids.len(), cfg.top_k);
    let mut scores = logits.to_vec();
    match cfg.kind {
        RouterKind::SigmoidNoAuxTc => scores.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
        RouterKind::SoftmaxGreedy | RouterKind::SoftmaxGroupLimited => super::activation::softmax(&mut scores),
    }
    let mut choice: Vec<f32> = match (cfg.kind, bias) {
        (RouterKind::SigmoidNoAuxTc, Some(b)) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        _ => scores.clone(),
    };
    let grouped = match cfg.kind {
        RouterKind::SoftmaxGreedy => false,
        RouterKind::SigmoidNoAuxTc | RouterKind::SoftmaxGroupLimited => cfg.n_group > 1,
    };
    if grouped {
        let per = e / cfg.n_group;
        let group_scores: Vec<f32> = choice
            .chunks_exact(per)
            .map(|g| match cfg.kind {
                RouterKind::SigmoidNoAuxTc => top_values(g, 2.min(per)).iter().sum(),
                _ => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            })
            .collect();
        let keep = top_indices(&group_scores, cfg.topk_group);
        let masked = match cfg.kind {
            RouterKind::SigmoidNoAuxTc => f32::NEG_INFINITY,
            _ => 0.0,
        };
        for (gi, g) in choice.chunks_exact_mut(per).enumerate() {
            if !keep.contains(&gi) {
                g.iter_mut().for_each(|v| *v = masked);
            }
        }
    }
    let mut chosen = top_indices(&choice, cfg.top_k);
    chosen.sort_unstable();
    let mut sum = 0f32;
    // V3 weighs with the unbiased scores; V2 with the (masked) scores it chose on, as
    // transformers' topk over the masked scores returns.
    let weight_of = |x: usize| if cfg.kind == RouterKind::SigmoidNoAuxTc { scores[x] } else { choice[x] };
    for (slot, &x) in chosen.iter().enumerate() {
        ids[slot] = x as u32;
        weights[slot] = weight_of(x);
        sum += weights[slot];
    }
    let normalize = cfg.norm_topk_prob && cfg.kind == RouterKind::SigmoidNoAuxTc;
    let norm = if normalize { 1.0 / (sum + 1e-20) } else { 1.0 };
    for w in weights.iter_mut() {
        *w = *w * norm * cfg.routed_scaling_factor;
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn top_values(v: &[f32], k: usize) -> Vec<f32> {
    top_indices(v, k).into_iter().map(|i| v[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3(n_group: usize, topk_group: usize, norm: bool) -> RouterConfig {
        RouterConfig {
            kind: RouterKind::SigmoidNoAuxTc,
            n_experts: 8,
            top_k: 2,
            n_group,
            topk_group,
            norm_topk_prob: norm,
            routed_scaling_factor: 2.0,
        }
    }

    #[test]
    fn v3_bias_selects_but_does_not_weight() {
        let logits = [0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 2.0];
        let bias = [0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let (mut ids, mut w) = ([0u32; 2], [0f32; 2]);
        route(&v3(1, 1, false), &logits, Some(&bias), &mut ids, &mut w);
        assert_eq!(ids, [1, 5]);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert!((w[0] - sig(0.0) * 2.0).abs() < 1e-6);
        assert!((w[1] - sig(3.0) * 2.0).abs() < 1e-6);
    }

    #[test]
    fn v3_group_limit_excludes_weak_groups_and_normalizes() {
        // Groups of 2: {0,1} {2,3} {4,5} {6,7}; group {6,7} has the single best expert but
        // {0,1} and {2,3} have better top-2 sums.
        let logits = [2.0, 2.0, 1.5, 1.5, -3.0, -3.0, 4.0, -6.0];
        let (mut ids, mut w) = ([0u32; 2], [0f32; 2]);
        route(&v3(4, 2, true), &logits, None, &mut ids, &mut w);
        assert_eq!(ids, [0, 1]);
        assert!((w[0] + w[1] - 2.0).abs() < 1e-6, "normalized then scaled by 2");
    }

    #[test]
    fn v3_masked_experts_never_win_even_over_negative_scores() {
        // Kept group {0,1} has negative choice scores; masked experts are -inf in V3.
        let logits = [0.0; 8];
        let bias = [-1.0, -1.0, -1.0, -1.0, -2.0, -2.0, -2.0, -2.0];
        let (mut ids, mut w) = ([0u32; 2], [0f32; 2]);
        route(&v3(4, 1, false), &logits, Some(&bias), &mut ids, &mut w);
        assert_eq!(ids, [0, 1]);
    }

    #[test]
    fn v2_masked_experts_score_zero() {
        let cfg = RouterConfig {
            kind: RouterKind::SoftmaxGroupLimited,
            n_experts: 4,
            top_k: 3,
            n_group: 2,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        };
        let (mut ids, mut w) = ([0u32; 3], [0f32; 3]);
        route(&cfg, &[5.0, 4.0, 0.0, 0.0], None, &mut ids, &mut w);
        assert_eq!(ids, [0, 1, 2], "the third pick is a masked expert at score 0, lowest index");
        assert_eq!(w[2], 0.0);
        assert!(w[0] + w[1] < 1.0, "V2 ignores norm_topk_prob, as transformers does");
    }

    #[test]
    fn v2_greedy_uses_softmax_scores() {
        let cfg = RouterConfig {
            kind: RouterKind::SoftmaxGreedy,
            n_experts: 4,
            top_k: 2,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
        };
        let logits = [1.0, 3.0, 0.0, 2.0];
        let (mut ids, mut w) = ([0u32; 2], [0f32; 2]);
        route(&cfg, &logits, None, &mut ids, &mut w);
        assert_eq!(ids, [1, 3]);
        let z: f32 = logits.iter().map(|v: &f32| v.exp()).sum();
        assert!((w[0] - 3f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn v2_group_limited_scores_groups_by_max() {
        let cfg = RouterConfig {
            kind: RouterKind::SoftmaxGroupLimited,
            n_experts: 8,
            top_k: 2,
            n_group: 4,
            topk_group: 1,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
        };
        let logits = [2.0, 2.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0];
        let (mut ids, mut w) = ([0u32; 2], [0f32; 2]);
        route(&cfg, &logits, None, &mut ids, &mut w);
        assert_eq!(ids, [2, 3], "group {{2,3}} holds the max; its other expert comes second");
    }
}

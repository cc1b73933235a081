//! Token sampling: greedy, temperature, top-k, top-p, seeded per sequence.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// How a sequence picks its next token and when it stops.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the `k` most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1.0 = no limit).
    pub top_p: f32,
    /// Seed of the sequence's generator; `None` draws one.
    pub seed: Option<u64>,
    pub max_new_tokens: usize,
    /// Generation stops after emitting any of these (the model's EOS when empty).
    pub stop_token_ids: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            max_new_tokens: 16,
            stop_token_ids: Vec::new(),
        }
    }
}

/// What a random draw of a sequence is for. A draw is keyed by (seed, index of the generated
/// token it decides, purpose), so the tokens depend only on the seed and the logits: a
/// sequence moved to another worker, or rerun after a failure, draws exactly what it would
/// have drawn where it started, with or without speculation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// Sampling a token from the target model's distribution.
    Token = 0,
    /// Sampling a draft from the MTP layer's distribution.
    Draft = 1,
    /// The uniform number that accepts or rejects a draft.
    Accept = 2,
    /// Sampling the replacement of a rejected draft from the residual distribution.
    Residual = 3,
}

/// How drafts are verified. Only [`AcceptRule::Rejection`] is lossless; the other exists so a
/// test can show that the statistical check catches a subtly wrong rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AcceptRule {
    /// Accept draft d with probability min(1, p(d)/q(d)); else sample from the normalised
    /// max(0, p − q).
    #[default]
    Rejection,
    /// Wrong on purpose, for tests only: a rejected draft is replaced by a sample from p
    /// itself, which over-weights the tokens the draft favours.
    ResampleFromTarget,
}

/// A token drafted for verification, and the distribution it was drawn from (`None` when
/// greedy: the draft is the argmax).
#[derive(Debug, Clone)]
pub struct Draft {
    pub token: u32,
    dist: Option<Dist>,
}

/// A sparse distribution: candidate ids, most likely first, with probabilities summing to 1.
#[derive(Debug, Clone)]
struct Dist {
    ids: Vec<u32>,
    probs: Vec<f32>,
}

impl Dist {
    fn prob(&self, token: u32) -> f32 {
        self.ids.iter().position(|&t| t == token).map_or(0.0, |i| self.probs[i])
    }

    /// The candidate where the running sum of `weights` (over `ids`) passes `u * total`.
    fn pick(ids: &[u32], weights: &[f32], u: f32) -> u32 {
        let z: f32 = weights.iter().sum();
        let u = u * z;
        let mut cum = 0.0;
        for (i, p) in weights.iter().enumerate() {
            cum += p;
            if u < cum {
                return ids[i];
            }
        }
        ids[weights.len() - 1]
    }
}

/// A sequence's sampler: its parameters and seed.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(random_seed);
        Sampler { params, seed }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    fn greedy(&self) -> bool {
        self.params.temperature == 0.0
    }

    /// A uniform number in [0, 1) for generated token `index` and `purpose` (24 bits: exact
    /// in f32). The `Token` draw of index n is ChaCha8 stream n of the seed, as it always was.
    fn uniform(&self, index: u64, purpose: Draw) -> f32 {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index);
        rng.set_word_pos(u128::from(purpose as u32) << 32);
        (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }

    /// Candidates after temperature, top-k and top-p, most likely first, and their
    /// (unnormalised after top-p) weights.
    fn candidates(&self, logits: &[f32]) -> (Vec<u32>, Vec<f32>) {
        let inv_t = 1.0 / self.params.temperature;
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            let keep = probs.iter().position(|p| {
                cum += p;
                cum >= self.params.top_p
            });
            probs.truncate(keep.map_or(probs.len(), |k| k + 1));
        }
        (cand[..probs.len()].iter().map(|c| c.0).collect(), probs)
    }

    fn dist(&self, logits: &[f32]) -> Dist {
        let (ids, mut probs) = self.candidates(logits);
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        Dist { ids, probs }
    }

    /// Picks generated token `index` from `logits`.
    pub fn sample(&self, logits: &[f32], index: u64) -> u32 {
        if self.greedy() {
            return argmax(logits);
        }
        let (ids, probs) = self.candidates(logits);
        Dist::pick(&ids, &probs, self.uniform(index, Draw::Token))
    }

    /// Drafts generated token `index` from the MTP layer's `logits`, after the same
    /// temperature, top-k and top-p as the target.
    pub fn draft(&self, logits: &[f32], index: u64) -> Draft {
        if self.greedy() {
            return Draft { token: argmax(logits), dist: None };
        }
        let dist = self.dist(logits);
        let token = Dist::pick(&dist.ids, &dist.probs, self.uniform(index, Draw::Draft));
        Draft { token, dist: Some(dist) }
    }

    /// Verifies `draft` for generated token `index` against the target's `logits`: `Ok` when
    /// accepted, else the token to emit instead. Greedy: accepted iff it is the argmax.
    /// Sampling: accepted with probability min(1, p(d)/q(d)), else replaced by a sample of
    /// the normalised max(0, p − q); the emitted token then follows p exactly.
    pub fn verify(&self, logits: &[f32], draft: &Draft, index: u64, rule: AcceptRule) -> Result<(), u32> {
        let Some(q) = &draft.dist else {
            let target = argmax(logits);
            return if target == draft.token { Ok(()) } else { Err(target) };
        };
        let p = self.dist(logits);
        let (pd, qd) = (p.prob(draft.token), q.prob(draft.token));
        if self.uniform(index, Draw::Accept) * qd < pd {
            return Ok(());
        }
        let u = self.uniform(index, Draw::Residual);
        let residual: Vec<f32> = match rule {
            AcceptRule::Rejection => {
                // q over the whole vocabulary: one pass, not a search per candidate of p.
                let mut dense = vec![0f32; logits.len()];
                for (&t, &qt) in q.ids.iter().zip(&q.probs) {
                    dense[t as usize] = qt;
                }
                p.ids.iter().zip(&p.probs).map(|(&t, &pt)| (pt - dense[t as usize]).max(0.0)).collect()
            }
            AcceptRule::ResampleFromTarget => p.probs.clone(),
        };
        // p == q up to rounding leaves no residual mass: p itself is then the answer.
        let weights = if residual.iter().sum::<f32>() > 0.0 { &residual } else { &p.probs };
        Err(Dist::pick(&p.ids, weights, u))
    }
}

/// Index of the largest logit; ties go to the lowest index.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The `n` largest logits, largest first (ties: lower id first).
pub fn top_logits(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let n = n.min(v.len());
    if n == 0 {
        return Vec::new();
    }
    v.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// A seed from the clock and the process's hash keys (for requests that gave none).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: usize, p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature: t, top_k: k, top_p: p, seed: Some(seed), ..Default::default() }
    }

    #[test]
    fn greedy_takes_argmax_lowest_on_ties() {
        let s = Sampler::new(params(0.0, 0, 1.0, 1));
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, 0.0], 0), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_limits_choices() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let s = Sampler::new(params(1.0, 3, 1.0, seed));
            (0..64).map(|i| s.sample(&logits, i)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let top3: Vec<u32> = top_logits(&logits, 3).iter().map(|x| x.0).collect();
        assert!(draw(7).iter().all(|t| top3.contains(t)));
        assert!(draw(7).iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }

    #[test]
    fn draws_are_keyed_by_index_and_purpose() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let s = Sampler::new(params(1.0, 0, 1.0, 11));
        let all: Vec<u32> = (0..20).map(|i| s.sample(&logits, i)).collect();
        let again = Sampler::new(params(1.0, 0, 1.0, 11));
        let rest: Vec<u32> = (7..20).map(|i| again.sample(&logits, i)).collect();
        assert_eq!(rest, all[7..]);
        let u: Vec<f32> = [Draw::Token, Draw::Draft, Draw::Accept, Draw::Residual].map(|d| s.uniform(3, d)).to_vec();
        assert!(u.iter().enumerate().all(|(i, a)| u[i + 1..].iter().all(|b| a != b)), "{u:?}");
    }

    #[test]
    fn rejection_sampling_follows_the_target() {
        // p and q over 4 tokens; the emitted token must follow p whatever q drafts.
        let (p, q) = ([2.0f32, 1.0, 0.0, -1.0], [-1.0f32, 0.0, 2.0, 1.0]);
        let n = 40_000u64;
        let emitted = |rule| {
            let mut counts = [0u64; 4];
            for seed in 0..n {
                let s = Sampler::new(params(1.0, 0, 1.0, seed));
                let d = s.draft(&q, 0);
                let t = s.verify(&p, &d, 0, rule).map_or_else(|t| t, |()| d.token);
                counts[t as usize] += 1;
            }
            counts
        };
        let z: f32 = p.iter().map(|v| v.exp()).sum();
        let chi2 = |counts: [u64; 4]| {
            p.iter()
                .zip(counts)
                .map(|(v, c)| {
                    let e = n as f64 * f64::from(v.exp() / z);
                    (c as f64 - e).powi(2) / e
                })
                .sum::<f64>()
        };
        // 3 degrees of freedom: P(chi2 > 16.27) = 0.001.
        assert!(chi2(emitted(AcceptRule::Rejection)) < 16.27);
        assert!(chi2(emitted(AcceptRule::ResampleFromTarget)) > 16.27);
    }

    #[test]
    fn greedy_verification_accepts_only_the_argmax() {
        let s = Sampler::new(params(0.0, 0, 1.0, 1));
        let d = s.draft(&[0.0, 5.0, 1.0], 4);
        assert_eq!(d.token, 1);
        assert_eq!(s.verify(&[0.0, 5.0, 1.0], &d, 4, AcceptRule::Rejection), Ok(()));
        assert_eq!(s.verify(&[0.0, 1.0, 5.0], &d, 4, AcceptRule::Rejection), Err(2));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // p(0) ≈ 0.88: with top_p 0.5 only token 0 remains.
        let s = Sampler::new(params(1.0, 0, 0.5, 3));
        assert!((0..100).all(|i| s.sample(&[3.0, 1.0, 0.0, -1.0], i) == 0));
    }

    #[test]
    fn top_logits_sorted_descending() {
        assert_eq!(top_logits(&[0.5, 2.0, -1.0, 2.0], 3), vec![(1, 2.0), (3, 2.0), (0, 0.5)]);
    }
}

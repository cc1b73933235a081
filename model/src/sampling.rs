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

/// A sequence's sampler state.
///
/// The `n`-th draw of a sequence uses ChaCha8 stream `n` of its seed, so the tokens depend
/// only on (seed, logits, index): a sequence moved to another worker after `n` tokens
/// ([`Sampler::resume`]) draws exactly what it would have drawn where it started.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    drawn: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self::resume(params, 0)
    }

    /// A sampler that has already drawn `drawn` tokens.
    pub fn resume(params: SamplingParams, drawn: u64) -> Self {
        let seed = params.seed.unwrap_or_else(random_seed);
        Sampler { params, seed, drawn }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(self.drawn);
        self.drawn += 1;
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
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
        let z: f32 = probs.iter().sum();
        let u = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 * z;
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if u < cum {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
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
        let mut s = Sampler::new(params(0.0, 0, 1.0, 1));
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, 0.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_limits_choices() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 3, 1.0, seed));
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let top3: Vec<u32> = top_logits(&logits, 3).iter().map(|x| x.0).collect();
        assert!(draw(7).iter().all(|t| top3.contains(t)));
        assert!(draw(7).iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }

    #[test]
    fn resumed_sampler_continues_the_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut whole = Sampler::new(params(1.0, 0, 1.0, 11));
        let all: Vec<u32> = (0..20).map(|_| whole.sample(&logits)).collect();
        let mut tail = Sampler::resume(params(1.0, 0, 1.0, 11), 7);
        let rest: Vec<u32> = (7..20).map(|_| tail.sample(&logits)).collect();
        assert_eq!(rest, all[7..]);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // p(0) ≈ 0.88: with top_p 0.5 only token 0 remains.
        let mut s = Sampler::new(params(1.0, 0, 0.5, 3));
        assert!((0..100).all(|_| s.sample(&[3.0, 1.0, 0.0, -1.0]) == 0));
    }

    #[test]
    fn top_logits_sorted_descending() {
        assert_eq!(top_logits(&[0.5, 2.0, -1.0, 2.0], 3), vec![(1, 2.0), (3, 2.0), (0, 0.5)]);
    }
}

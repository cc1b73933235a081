//! The synthetic workload: length distributions, prompt ids and Poisson arrival times, all
//! a pure function of the seed. Request `i` draws from its own ChaCha stream (`i`), so it is
//! the same whatever order or task builds it; arrivals use a stream no request index reaches.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Stream of the arrival-time generator (request indices are below `--requests`, a u64 that
/// never gets this high in practice).
const ARRIVAL_STREAM: u64 = u64::MAX;

/// A distribution of token counts, always >= 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LenDist {
    /// Always `N` (`fixed:N`).
    Fixed(u32),
    /// Uniform over `lo..=hi` (`uniform:A-B`).
    Uniform { lo: u32, hi: u32 },
    /// `round(mean + std * z)`, z standard normal, clamped to `1..=u32::MAX`
    /// (`normal:MEAN,STD`).
    Normal { mean: f64, std: f64 },
}

impl FromStr for LenDist {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("length distribution {s:?} must be fixed:N, uniform:A-B or normal:MEAN,STD"))?;
        let count = |v: &str| -> Result<u32, String> {
            let n: u32 = v.trim().parse().map_err(|e| format!("{v:?} in {s:?} is not a token count: {e}"))?;
            if n == 0 {
                return Err(format!("{s:?}: lengths must be >= 1"));
            }
            Ok(n)
        };
        let real = |v: &str| -> Result<f64, String> {
            let x: f64 = v.trim().parse().map_err(|e| format!("{v:?} in {s:?} is not a number: {e}"))?;
            if !x.is_finite() {
                return Err(format!("{s:?}: {v} is not finite"));
            }
            Ok(x)
        };
        match kind {
            "fixed" => Ok(Self::Fixed(count(rest)?)),
            "uniform" => {
                let (a, b) = rest.split_once('-').ok_or_else(|| format!("{s:?} must be uniform:A-B"))?;
                let (lo, hi) = (count(a)?, count(b)?);
                if lo > hi {
                    return Err(format!("{s:?}: A must be <= B"));
                }
                Ok(Self::Uniform { lo, hi })
            }
            "normal" => {
                let (m, d) = rest.split_once(',').ok_or_else(|| format!("{s:?} must be normal:MEAN,STD"))?;
                let (mean, std) = (real(m)?, real(d)?);
                if std < 0.0 {
                    return Err(format!("{s:?}: STD must be >= 0"));
                }
                Ok(Self::Normal { mean, std })
            }
            other => Err(format!("unknown length distribution {other:?} in {s:?} (fixed, uniform or normal)")),
        }
    }
}

impl fmt::Display for LenDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "fixed:{n}"),
            Self::Uniform { lo, hi } => write!(f, "uniform:{lo}-{hi}"),
            Self::Normal { mean, std } => write!(f, "normal:{mean},{std}"),
        }
    }
}

impl LenDist {
    pub fn sample(&self, rng: &mut impl RngCore) -> u32 {
        match *self {
            Self::Fixed(n) => n,
            Self::Uniform { lo, hi } => lo + below(rng, u64::from(hi - lo) + 1) as u32,
            Self::Normal { mean, std } => {
                let x = (mean + std * standard_normal(rng)).round();
                // `as` saturates high; NaN cannot occur (both inputs are finite).
                x.max(1.0) as u32
            }
        }
    }

    /// The largest value `sample` can return, when bounded in practice.
    pub fn max(&self) -> Option<u32> {
        match *self {
            Self::Fixed(n) => Some(n),
            Self::Uniform { hi, .. } => Some(hi),
            Self::Normal { .. } => None,
        }
    }
}

/// One request of the workload, before it is put on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    pub prompt: Vec<u32>,
    pub max_new_tokens: u32,
    /// The request's sampler seed (matters only when temperature > 0).
    pub sampler_seed: u64,
}

/// What the workload needs from the model and the command line.
#[derive(Debug, Clone)]
pub struct WorkloadParams {
    pub seed: u64,
    pub prompt_len: LenDist,
    pub output_len: LenDist,
    /// Prompt ids are drawn from `0..vocab` minus `excluded`.
    pub vocab: u32,
    /// Ids never put in a prompt (the model's EOS ids).
    pub excluded: Vec<u32>,
    /// prompt + max_new_tokens is kept within this; 0 means no limit.
    pub context_length: u32,
}

/// Builds request `i` of the workload on demand (nothing is held per request).
#[derive(Debug, Clone)]
pub struct Workload {
    seed: u64,
    prompt_len: LenDist,
    output_len: LenDist,
    /// Sorted, distinct, all `< vocab`.
    excluded: Vec<u32>,
    /// Ids available for prompts: `vocab - excluded.len()`, >= 1.
    num_allowed: u32,
    context_length: u32,
}

impl Workload {
    /// Checks that prompts can be drawn and that bounded lengths fit the context.
    pub fn new(p: WorkloadParams) -> Result<Self, String> {
        let mut excluded: Vec<u32> = p.excluded.into_iter().filter(|&id| id < p.vocab).collect();
        excluded.sort_unstable();
        excluded.dedup();
        let num_allowed = p.vocab - excluded.len() as u32;
        if num_allowed == 0 {
            return Err(format!("vocab {} has no id left for prompts once EOS ids are excluded", p.vocab));
        }
        if p.context_length > 0 {
            if p.context_length < 2 {
                return Err(format!("context_length {} leaves no room for a prompt and a token", p.context_length));
            }
            if let (Some(a), Some(b)) = (p.prompt_len.max(), p.output_len.max())
                && u64::from(a) + u64::from(b) > u64::from(p.context_length)
            {
                return Err(format!(
                    "--prompt-len {} + --output-len {} can reach {} tokens, over the model's context_length {}",
                    p.prompt_len,
                    p.output_len,
                    u64::from(a) + u64::from(b),
                    p.context_length
                ));
            }
        }
        Ok(Self {
            seed: p.seed,
            prompt_len: p.prompt_len,
            output_len: p.output_len,
            excluded,
            num_allowed,
            context_length: p.context_length,
        })
    }

    /// Request `index`: the same for the same seed and index. Unbounded (normal) lengths are
    /// clamped so that prompt + max_new_tokens fits the context.
    pub fn request(&self, index: u64) -> RequestSpec {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index);
        let mut prompt_len = self.prompt_len.sample(&mut rng);
        let mut max_new_tokens = self.output_len.sample(&mut rng);
        if self.context_length > 0 {
            prompt_len = prompt_len.min(self.context_length - 1);
            max_new_tokens = max_new_tokens.min(self.context_length - prompt_len);
        }
        let sampler_seed = rng.next_u64();
        let prompt = (0..prompt_len).map(|_| self.prompt_id(&mut rng)).collect();
        RequestSpec { prompt, max_new_tokens, sampler_seed }
    }

    /// Uniform over the allowed ids: draw a rank among them, then step over each excluded
    /// id at or below it (ascending, so every skip is seen).
    fn prompt_id(&self, rng: &mut impl RngCore) -> u32 {
        let mut id = below(rng, u64::from(self.num_allowed)) as u32;
        for &e in &self.excluded {
            if e <= id {
                id += 1;
            } else {
                break;
            }
        }
        id
    }
}

/// The stop id for `--ignore-eos`: the largest id below `vocab` that is not an EOS id.
pub fn ignore_eos_stop_id(vocab: u32, eos: &[u32]) -> Option<u32> {
    (0..vocab).rev().find(|id| !eos.contains(id))
}

/// Poisson arrival offsets from the start of the run: exponential gaps of mean `1/rate`.
#[derive(Debug)]
pub struct Arrivals {
    rng: ChaCha8Rng,
    rate: f64,
    /// Seconds since the start of the first arrival not yet returned.
    next_s: f64,
}

impl Arrivals {
    /// The first request goes at time 0; `rate` is requests per second (> 0).
    pub fn new(seed: u64, rate: f64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(ARRIVAL_STREAM);
        Self { rng, rate, next_s: 0.0 }
    }
}

impl Iterator for Arrivals {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let at = Duration::from_secs_f64(self.next_s);
        // 1 - u is in (0, 1], so ln is finite.
        self.next_s += -(1.0 - unit_f64(&mut self.rng)).ln() / self.rate;
        Some(at)
    }
}

/// Uniform in `0..n` (n >= 1), unbiased (Lemire's multiply with rejection).
fn below(rng: &mut impl RngCore, n: u64) -> u64 {
    debug_assert!(n >= 1);
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(n);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// Uniform in `[0, 1)` with 53 random bits.
fn unit_f64(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Box-Muller; one of the pair is dropped (lengths are drawn once per request).
fn standard_normal(rng: &mut impl RngCore) -> f64 {
    let u1 = 1.0 - unit_f64(rng); // (0, 1]
    let u2 = unit_f64(rng);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: usize = 20_000;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(42)
    }

    fn mean_std(xs: &[f64]) -> (f64, f64) {
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64;
        (m, v.sqrt())
    }

    fn params(prompt: &str, output: &str) -> WorkloadParams {
        WorkloadParams {
            seed: 7,
            prompt_len: prompt.parse().unwrap(),
            output_len: output.parse().unwrap(),
            vocab: 1000,
            excluded: vec![1],
            context_length: 4096,
        }
    }

    #[test]
    fn parses_and_prints() {
        assert_eq!("fixed:12".parse(), Ok(LenDist::Fixed(12)));
        assert_eq!("uniform:3-9".parse(), Ok(LenDist::Uniform { lo: 3, hi: 9 }));
        assert_eq!("uniform:5-5".parse(), Ok(LenDist::Uniform { lo: 5, hi: 5 }));
        assert_eq!("normal:100,20.5".parse(), Ok(LenDist::Normal { mean: 100.0, std: 20.5 }));
        for bad in [
            "",
            "12",
            "fixed:",
            "fixed:0",
            "fixed:-3",
            "fixed:x",
            "uniform:9-3",
            "uniform:0-3",
            "uniform:5",
            "normal:10",
            "normal:10,-1",
            "normal:inf,1",
            "zipf:3",
        ] {
            assert!(bad.parse::<LenDist>().is_err(), "{bad:?} should not parse");
        }
        for s in ["fixed:12", "uniform:3-9", "normal:100,20.5"] {
            assert_eq!(s.parse::<LenDist>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn fixed_is_fixed() {
        let mut r = rng();
        assert!((0..100).all(|_| LenDist::Fixed(17).sample(&mut r) == 17));
    }

    #[test]
    fn uniform_respects_bounds_and_mean() {
        let d = LenDist::Uniform { lo: 10, hi: 20 };
        let mut r = rng();
        let xs: Vec<u32> = (0..N).map(|_| d.sample(&mut r)).collect();
        assert!(xs.iter().all(|&x| (10..=20).contains(&x)));
        // Every value shows up, about N/11 times each (std of a count ~ 41).
        for v in 10..=20 {
            let c = xs.iter().filter(|&&x| x == v).count();
            assert!((1600..2050).contains(&c), "value {v} drawn {c} times");
        }
        let (m, _) = mean_std(&xs.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
        assert!((m - 15.0).abs() < 0.1, "mean {m}");
    }

    #[test]
    fn normal_has_its_mean_and_std_and_is_clamped() {
        let d = LenDist::Normal { mean: 200.0, std: 30.0 };
        let mut r = rng();
        let xs: Vec<f64> = (0..N).map(|_| f64::from(d.sample(&mut r))).collect();
        let (m, s) = mean_std(&xs);
        assert!((m - 200.0).abs() < 1.0, "mean {m}");
        assert!((s - 30.0).abs() < 1.0, "std {s}");

        let d = LenDist::Normal { mean: 2.0, std: 50.0 };
        let xs: Vec<u32> = (0..N).map(|_| d.sample(&mut r)).collect();
        assert!(xs.iter().all(|&x| x >= 1));
        // About half of the mass is below 1 and lands on 1.
        let ones = xs.iter().filter(|&&x| x == 1).count();
        assert!((9000..11000).contains(&ones), "{ones} clamped to 1");

        let d = LenDist::Normal { mean: 64.0, std: 0.0 };
        assert!((0..100).all(|_| d.sample(&mut r) == 64));
    }

    #[test]
    fn below_is_uniform_and_in_range() {
        let mut r = rng();
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            counts[below(&mut r, 7) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9500..10500).contains(&c)), "{counts:?}");
        assert!((0..100).all(|_| below(&mut r, 1) == 0));
    }

    #[test]
    fn requests_are_deterministic_per_index() {
        let w = Workload::new(params("uniform:5-50", "normal:30,10")).unwrap();
        let w2 = Workload::new(params("uniform:5-50", "normal:30,10")).unwrap();
        // Same index, any order, any instance: same request.
        assert_eq!(w.request(3), w2.request(3));
        let later = w.request(9);
        assert_eq!(w.request(9), later);
        assert_ne!(w.request(3), w.request(4));
        let other_seed = Workload::new(WorkloadParams { seed: 8, ..params("uniform:5-50", "normal:30,10") }).unwrap();
        assert_ne!(w.request(3), other_seed.request(3));
        for i in 0..500 {
            let r = w.request(i);
            assert!((5..=50).contains(&r.prompt.len()));
            assert!(r.max_new_tokens >= 1);
            assert!(r.prompt.iter().all(|&id| id < 1000 && id != 1));
        }
    }

    #[test]
    fn prompt_ids_cover_the_vocab_except_eos() {
        let w = Workload::new(WorkloadParams {
            seed: 1,
            prompt_len: LenDist::Fixed(1000),
            output_len: LenDist::Fixed(1),
            vocab: 10,
            // Out of range and duplicate ids are ignored.
            excluded: vec![9, 0, 4, 4, 12],
            context_length: 0,
        })
        .unwrap();
        let mut counts = [0usize; 10];
        for i in 0..20 {
            for id in w.request(i).prompt {
                counts[id as usize] += 1;
            }
        }
        // 20_000 draws over 7 ids: ~2857 each.
        for (id, &c) in counts.iter().enumerate() {
            if [0, 4, 9].contains(&id) {
                assert_eq!(c, 0, "EOS id {id} drawn");
            } else {
                assert!((2600..3100).contains(&c), "id {id} drawn {c} times");
            }
        }
    }

    #[test]
    fn lengths_fit_the_context() {
        let err = Workload::new(WorkloadParams { context_length: 100, ..params("fixed:90", "uniform:1-20") });
        assert!(err.unwrap_err().contains("context_length 100"));
        let w =
            Workload::new(WorkloadParams { context_length: 100, ..params("normal:90,40", "normal:50,40") }).unwrap();
        for i in 0..500 {
            let r = w.request(i);
            assert!(!r.prompt.is_empty() && r.max_new_tokens >= 1);
            assert!(r.prompt.len() + r.max_new_tokens as usize <= 100);
        }
        assert!(
            Workload::new(WorkloadParams { excluded: (0..1000).collect(), ..params("fixed:1", "fixed:1") }).is_err()
        );
    }

    #[test]
    fn stop_id_for_ignore_eos() {
        assert_eq!(ignore_eos_stop_id(100, &[1, 2]), Some(99));
        assert_eq!(ignore_eos_stop_id(100, &[99, 98]), Some(97));
        assert_eq!(ignore_eos_stop_id(1, &[0]), None);
    }

    #[test]
    fn arrivals_are_poisson() {
        let rate = 4.0;
        let times: Vec<f64> = Arrivals::new(3, rate).take(N + 1).map(|d| d.as_secs_f64()).collect();
        assert_eq!(times[0], 0.0);
        assert!(times.windows(2).all(|w| w[1] >= w[0]));
        let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
        let (m, s) = mean_std(&gaps);
        // Exponential: mean = std = 1/rate.
        assert!((m - 0.25).abs() < 0.01, "mean gap {m}");
        assert!((s - 0.25).abs() < 0.01, "gap std {s}");
        let again: Vec<f64> = Arrivals::new(3, rate).take(10).map(|d| d.as_secs_f64()).collect();
        assert_eq!(again, times[..10]);
    }
}

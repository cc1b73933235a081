//! The engine's command-line flags, defined once for every binary that runs the model (the
//! prefill and decode workers, `expertmesh up`, and the subsets of the expert worker,
//! `expertmesh generate` and `engine-bench`), with their one conversion to [`EngineSetup`].
//!
//! They live here, behind the `clap` feature, because every one of those binaries depends on
//! this crate and none may depend on another service; the crate itself stays free of clap
//! for library users.

use std::path::PathBuf;

use clap::ValueEnum;

use crate::engine::EngineOptions;
use crate::serving::EngineSetup;
use crate::weights::WeightDtype;

/// `--dtype`: how weight matrices are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Auto,
    F32,
    Bf16,
}

impl From<DtypeArg> for WeightDtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::Auto => WeightDtype::Auto,
            DtypeArg::F32 => WeightDtype::F32,
            DtypeArg::Bf16 => WeightDtype::Bf16,
        }
    }
}

/// `--precision`: activation precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    Exact,
    Bf16,
}

impl From<PrecisionArg> for kernels::cpu::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Exact => kernels::cpu::Precision::Exact,
            PrecisionArg::Bf16 => kernels::cpu::Precision::Bf16Activations,
        }
    }
}

/// Which checkpoint, and how its weights and activations are kept: everything an expert
/// worker takes (it computes on the CPU and holds no cache), and what `expertmesh generate`
/// and `engine-bench` take besides a device (they size their cache to the work they run).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ModelArgs {
    /// Checkpoint directory (HuggingFace layout); default: the embedded default model.
    #[arg(long = "model", value_name = "MODEL", env = "EXPERTMESH_MODEL")]
    pub dir: Option<PathBuf>,
    /// Dtype weights are kept in (auto: as stored, FP8 dequantized to bf16).
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
    /// exact: f32 activations (matches transformers); bf16: activations rounded to bf16 for
    /// bf16 dot products (faster when compute-bound).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Exact)]
    pub precision: PrecisionArg,
}

impl ModelArgs {
    pub fn weight_dtype(&self) -> WeightDtype {
        self.dtype.into()
    }

    pub fn precision(&self) -> kernels::cpu::Precision {
        self.precision.into()
    }
}

/// The flags of a process that serves with the engine: the model, the compute device and
/// the latent cache.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct EngineArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Compute device: cpu, or cuda:N (an NVIDIA GPU; the CUDA engine rounds GEMM inputs to
    /// bf16, as `--precision bf16` does on the CPU).
    #[arg(long, env = "EXPERTMESH_DEVICE", default_value = "cpu")]
    pub device: kernels::Device,
    /// Latent cache size in tokens (all sequences together).
    #[arg(long, env = "EXPERTMESH_CACHE_TOKENS", default_value_t = 32768)]
    pub cache_tokens: usize,
    /// Tokens per cache block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub block_size: u32,
    #[command(flatten)]
    pub speculation: SpeculationArgs,
}

/// `--speculative-tokens`: for every binary that decodes (and the prefill worker, which
/// prepares the MTP layer's state for its decode workers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct SpeculationArgs {
    /// Tokens the model's MTP layer drafts per sequence and decode step, verified by the
    /// model in the same step (lossless); 0 turns speculative decoding off. A prefill worker
    /// with > 0 runs the MTP layer over prompts for the decode workers. Ignored, with a
    /// warning, for a model without an MTP layer and on a GPU.
    #[arg(long, env = "EXPERTMESH_SPECULATIVE_TOKENS", default_value_t = DEFAULT_SPECULATIVE_TOKENS,
        value_parser = clap::value_parser!(u32).range(0..=MAX_SPECULATIVE_TOKENS))]
    pub speculative_tokens: u32,
}

/// `--speculative-tokens` by default: off. Measured on CPU (docs/BENCHMARKS.md), verifying a
/// draft costs more than its expected gain at every batch size: a second token of a sequence
/// reads its own routed experts, and on a small model the MTP layer is a large share of a step.
pub const DEFAULT_SPECULATIVE_TOKENS: u32 = 0;
/// Past a few drafts, the chance that all are accepted is too small to pay for verifying them.
pub const MAX_SPECULATIVE_TOKENS: i64 = 8;

/// A flag value out of range; names the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{flag} {value}: {reason}")]
pub struct FlagError {
    pub flag: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl EngineArgs {
    /// Checks what clap's parsers cannot (zero, one flag against another), before the model
    /// loads.
    pub fn validate(&self) -> Result<(), FlagError> {
        if self.cache_tokens == 0 {
            return Err(FlagError { flag: "cache-tokens", value: "0".into(), reason: "must be >= 1" });
        }
        if self.block_size as usize > self.cache_tokens {
            return Err(FlagError {
                flag: "block-size",
                value: self.block_size.to_string(),
                reason: "must not exceed --cache-tokens",
            });
        }
        Ok(())
    }

    /// The engine these flags ask for.
    pub fn setup(&self) -> EngineSetup {
        EngineSetup {
            weight_dtype: self.model.weight_dtype(),
            precision: self.model.precision(),
            options: EngineOptions {
                cache_tokens: self.cache_tokens,
                block_size: self.block_size as usize,
                device: self.device,
                speculative_tokens: self.speculation.speculative_tokens as usize,
                accept_rule: crate::sampling::AcceptRule::Rejection,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn parse(args: &[&str]) -> Result<EngineArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("worker").chain(args.iter().copied())).map(|c| c.engine)
    }

    #[test]
    fn defaults_and_setup() {
        let args = parse(&[]).expect("parses");
        assert_eq!(args.model, ModelArgs { dir: None, dtype: DtypeArg::Auto, precision: PrecisionArg::Exact });
        assert_eq!((args.device, args.cache_tokens, args.block_size), (kernels::Device::Cpu, 32768, 16));
        assert_eq!(args.speculation.speculative_tokens, DEFAULT_SPECULATIVE_TOKENS);
        args.validate().expect("defaults validate");
        let setup = parse(&["--dtype", "bf16", "--precision", "bf16", "--cache-tokens", "64", "--block-size", "8"])
            .expect("parses")
            .setup();
        assert_eq!(setup.weight_dtype, WeightDtype::Bf16);
        assert_eq!(setup.precision, kernels::cpu::Precision::Bf16Activations);
        assert_eq!((setup.options.cache_tokens, setup.options.block_size), (64, 8));
    }

    #[test]
    fn out_of_range_values_name_the_flag() {
        let e = parse(&["--block-size", "0"]).expect_err("0 is out of range");
        assert!(e.to_string().contains("--block-size"), "{e}");
        parse(&["--block-size", "1025"]).expect_err("1025 is out of range");
        let e = parse(&["--speculative-tokens", "9"]).expect_err("9 is out of range");
        assert!(e.to_string().contains("--speculative-tokens"), "{e}");
        let e = parse(&["--cache-tokens", "0"]).expect("parses").validate().expect_err("refused");
        assert_eq!(e.to_string(), "--cache-tokens 0: must be >= 1");
        let e = parse(&["--cache-tokens", "8", "--block-size", "16"]).expect("parses").validate().expect_err("refused");
        assert_eq!(e.flag, "block-size");
    }
}

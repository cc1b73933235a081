//! The prefill worker's one config struct: flags (and their `EXPERTMESH_*` variables) merged
//! by clap, validated once by [`PrefillConfig::validate`] before anything starts.

use std::path::PathBuf;

use clap::ValueEnum;

/// Largest `--kv-chunk-bytes`: a chunk plus its framing must stay below the 4 MiB message
/// limit of the decode worker's server ([`cluster_core::serve::DEFAULT_MAX_MESSAGE_BYTES`]).
pub const MAX_KV_CHUNK_BYTES: usize = 3 * 1024 * 1024;

/// The prefill worker's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PrefillConfig {
    #[command(flatten)]
    pub node: cluster_core::node::NodeArgs,
    /// Checkpoint directory; default: the embedded default model.
    #[arg(long, env = "EXPERTMESH_MODEL")]
    pub model: Option<PathBuf>,
    /// Dtype weights are kept in.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
    /// exact: f32 activations; bf16: activations rounded to bf16 for bf16 dot products.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Exact)]
    pub precision: PrecisionArg,
    /// Compute device: cpu, or cuda:N (an NVIDIA GPU; the CUDA engine rounds GEMM inputs to
    /// bf16, as `--precision bf16` does on the CPU).
    #[arg(long, env = "EXPERTMESH_DEVICE", default_value = "cpu")]
    pub device: kernels::Device,
    /// Most prompt tokens in one prefill batch (a longer prompt runs alone).
    #[arg(long, default_value_t = 4096)]
    pub max_batch_tokens: u32,
    /// Tokens of latent cache for the prompts being prefilled.
    #[arg(long, default_value_t = 32768)]
    pub cache_tokens: usize,
    /// Tokens per cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Prompts waiting for prefill; beyond this a request is refused (RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 256)]
    pub queue_capacity: usize,
    /// Most cache bytes per KvLayer message sent to a decode worker (whole rows; at least
    /// one row per message).
    #[arg(long, default_value_t = 1024 * 1024)]
    pub kv_chunk_bytes: usize,
    /// Retries of a cache push after a transport failure (connection refused or lost).
    #[arg(long, default_value_t = 3)]
    pub transfer_retries: u32,
    /// Run routed experts on the cluster's expert workers instead of loading them here.
    #[arg(long, env = "EXPERTMESH_REMOTE_EXPERTS")]
    pub remote_experts: bool,
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Auto,
    F32,
    Bf16,
}

impl From<DtypeArg> for model::WeightDtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::Auto => model::WeightDtype::Auto,
            DtypeArg::F32 => model::WeightDtype::F32,
            DtypeArg::Bf16 => model::WeightDtype::Bf16,
        }
    }
}

/// `--precision`.
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

/// A flag value out of range; names the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{flag} {value}: {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl PrefillConfig {
    /// Checks every range once, before the model loads.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |flag, value: &dyn std::fmt::Display, reason| Err(ConfigError { flag, value: value.to_string(), reason });
        if self.max_batch_tokens == 0 {
            return bad("max-batch-tokens", &self.max_batch_tokens, "must be >= 1");
        }
        if self.cache_tokens == 0 {
            return bad("cache-tokens", &self.cache_tokens, "must be >= 1");
        }
        if self.block_size == 0 {
            return bad("block-size", &self.block_size, "must be >= 1");
        }
        if self.block_size > self.cache_tokens {
            return bad("block-size", &self.block_size, "must not exceed --cache-tokens");
        }
        if self.queue_capacity == 0 {
            return bad("queue-capacity", &self.queue_capacity, "must be >= 1");
        }
        if u32::try_from(self.queue_capacity).is_err() {
            return bad("queue-capacity", &self.queue_capacity, "must fit in 32 bits");
        }
        if self.kv_chunk_bytes == 0 {
            return bad("kv-chunk-bytes", &self.kv_chunk_bytes, "must be >= 1");
        }
        if self.kv_chunk_bytes > MAX_KV_CHUNK_BYTES {
            return bad(
                "kv-chunk-bytes",
                &self.kv_chunk_bytes,
                "must be <= 3 MiB (3145728) to fit gRPC's 4 MiB message limit",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        config: PrefillConfig,
    }

    fn parse(args: &[&str]) -> PrefillConfig {
        Cli::try_parse_from(std::iter::once("prefill-worker").chain(args.iter().copied())).expect("parses").config
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]);
        assert_eq!(c.dtype, DtypeArg::Auto);
        assert_eq!(c.precision, PrecisionArg::Exact);
        assert_eq!((c.max_batch_tokens, c.cache_tokens, c.block_size), (4096, 32768, 16));
        assert_eq!((c.queue_capacity, c.kv_chunk_bytes, c.transfer_retries), (256, 1 << 20, 3));
        c.validate().expect("defaults validate");
    }

    #[test]
    fn out_of_range_values_name_the_flag() {
        let e = parse(&["--kv-chunk-bytes", "4000000"]).validate().unwrap_err();
        assert_eq!(e.flag, "kv-chunk-bytes");
        assert!(e.to_string().starts_with("--kv-chunk-bytes 4000000:"), "{e}");
        assert_eq!(parse(&["--queue-capacity", "0"]).validate().unwrap_err().flag, "queue-capacity");
        assert_eq!(parse(&["--block-size", "0"]).validate().unwrap_err().flag, "block-size");
        parse(&["--kv-chunk-bytes", "3145728", "--dtype", "bf16", "--precision", "bf16"])
            .validate()
            .expect("3 MiB is allowed");
    }
}

//! The prefill worker's one config struct: flags (and their `EXPERTMESH_*` variables) merged
//! by clap, validated once by [`PrefillConfig::validate`] before anything starts.

/// Largest `--kv-chunk-bytes`: a chunk plus its framing must stay below the 4 MiB message
/// limit of the decode worker's server ([`cluster_core::serve::DEFAULT_MAX_MESSAGE_BYTES`]).
pub const MAX_KV_CHUNK_BYTES: usize = 3 * 1024 * 1024;

/// The prefill worker's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PrefillConfig {
    #[command(flatten)]
    pub node: cluster_core::node::NodeArgs,
    // The model, device and cache (the cache holds the prompts being prefilled).
    #[command(flatten)]
    pub engine: model::args::EngineArgs,
    /// Most prompt tokens in one prefill batch (a longer prompt runs alone).
    #[arg(long, default_value_t = 4096)]
    pub max_batch_tokens: u32,
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

/// A flag value out of range; names the flag.
pub type ConfigError = model::args::FlagError;

impl PrefillConfig {
    /// Checks every range once, before the model loads.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |flag, value: &dyn std::fmt::Display, reason| Err(ConfigError { flag, value: value.to_string(), reason });
        self.engine.validate()?;
        if self.max_batch_tokens == 0 {
            return bad("max-batch-tokens", &self.max_batch_tokens, "must be >= 1");
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
        assert_eq!(c.engine.model.dtype, model::args::DtypeArg::Auto);
        assert_eq!(c.engine.model.precision, model::args::PrecisionArg::Exact);
        assert_eq!((c.max_batch_tokens, c.engine.cache_tokens, c.engine.block_size), (4096, 32768, 16));
        assert_eq!((c.queue_capacity, c.kv_chunk_bytes, c.transfer_retries), (256, 1 << 20, 3));
        c.validate().expect("defaults validate");
    }

    #[test]
    fn out_of_range_values_name_the_flag() {
        let e = parse(&["--kv-chunk-bytes", "4000000"]).validate().unwrap_err();
        assert_eq!(e.flag, "kv-chunk-bytes");
        assert!(e.to_string().starts_with("--kv-chunk-bytes 4000000:"), "{e}");
        assert_eq!(parse(&["--queue-capacity", "0"]).validate().unwrap_err().flag, "queue-capacity");
        assert_eq!(parse(&["--cache-tokens", "8"]).validate().unwrap_err().flag, "block-size");
        parse(&["--kv-chunk-bytes", "3145728", "--dtype", "bf16", "--precision", "bf16"])
            .validate()
            .expect("3 MiB is allowed");
    }
}

//! Which slots a worker hosts and how their weights are loaded: the static `--shard` set, and
//! loading a list of experts from the checkpoint kept open for the worker's lifetime. Loading
//! is blocking work: it runs on a blocking thread, never on the runtime or the compute thread.

use crate::shard::Shard;
use model::serving::ExpertCheckpoint;
use model::{ExpertId, ExpertWeights, ModelConfig, ModelError};
use placement::SlotKey;
use std::collections::BTreeSet;
use tokio_util::sync::CancellationToken;

/// Every routed (layer, expert) of the model that `shard` hosts.
pub fn shard_slots(config: &ModelConfig, shard: Shard) -> BTreeSet<SlotKey> {
    let n = config.n_routed_experts;
    config
        .moe_layers()
        .into_iter()
        .flat_map(|layer| (0..n as u32).map(move |expert| SlotKey { layer, expert }))
        .filter(|s| shard.hosts(s.layer, s.expert, n))
        .collect()
}

/// Why slots could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading layer {layer} expert {expert}: {source}")]
    Model {
        layer: usize,
        expert: u32,
        #[source]
        source: ModelError,
    },
    #[error("loading was cancelled")]
    Cancelled,
}

/// Loads `slots` in order; stops between experts once `cancel` fires. Blocking.
pub fn load_slots(
    ckpt: &ExpertCheckpoint,
    slots: &[SlotKey],
    cancel: &CancellationToken,
) -> Result<Vec<ExpertWeights>, LoadError> {
    let mut loaded = Vec::with_capacity(slots.len());
    for &SlotKey { layer, expert } in slots {
        if cancel.is_cancelled() {
            return Err(LoadError::Cancelled);
        }
        let weights =
            ckpt.load(layer, ExpertId(expert)).map_err(|source| LoadError::Model { layer, expert, source })?;
        loaded.push(weights);
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_slots_cover_the_moe_layers_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        model::default_model::ensure(dir.path()).expect("generate");
        let ckpt = ExpertCheckpoint::open(Some(dir.path().to_path_buf()), model::WeightDtype::Auto).expect("open");
        let c = ckpt.config();
        let all = shard_slots(c, Shard::default());
        assert_eq!(all.len(), c.moe_layers().len() * c.n_routed_experts);
        let parts: Vec<_> = (0..3).map(|index| shard_slots(c, Shard { index, count: 3 })).collect();
        assert_eq!(parts.iter().map(BTreeSet::len).sum::<usize>(), all.len());
        assert_eq!(parts.iter().flatten().copied().collect::<BTreeSet<_>>(), all);

        let some: Vec<SlotKey> = parts[1].iter().take(2).copied().collect();
        let loaded = load_slots(&ckpt, &some, &CancellationToken::new()).expect("loads");
        let got: Vec<SlotKey> = loaded.iter().map(|w| SlotKey { layer: w.layer(), expert: w.expert().0 }).collect();
        assert_eq!(got, some);
        let cancelled = CancellationToken::new();
        cancelled.cancel();
        assert!(matches!(load_slots(&ckpt, &some, &cancelled), Err(LoadError::Cancelled)));
        let bad = [SlotKey { layer: 0, expert: 0 }];
        assert!(matches!(load_slots(&ckpt, &bad, &CancellationToken::new()), Err(LoadError::Model { layer: 0, .. })));
    }
}

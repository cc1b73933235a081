//! Which live worker takes which chunk of a new placement. EPLB decides the chunks (the
//! replicas each worker position holds) but not which process fills each position; giving
//! every chunk to the worker that already hosts most of it keeps experts where they are
//! loaded, so a switch moves only what changed (a dead worker's experts, not everyone's).

use std::collections::{BTreeMap, BTreeSet};

use cluster_core::WorkerId;
use placement::{PlacementSpec, SlotKey};

/// `spec` with its workers reordered so each chunk of slots goes to the worker of
/// `previous` already hosting most of it (greedy on the largest overlap; ties to the lower
/// chunk, then the lower worker id). The chunks, so the balance, are unchanged.
pub fn keep_slots_in_place(mut spec: PlacementSpec, previous: &PlacementSpec) -> PlacementSpec {
    // Chunk i: what position i holds (workers are distinct, so slots_of names one position).
    let chunks: Vec<BTreeSet<SlotKey>> = spec.workers.iter().map(|w| spec.slots_of(w)).collect();
    let hosted: BTreeMap<&WorkerId, BTreeSet<SlotKey>> =
        spec.workers.iter().map(|w| (w, previous.slots_of(w))).collect();
    let mut pairs: Vec<(usize, usize, &WorkerId)> = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        for (w, slots) in &hosted {
            pairs.push((c.intersection(slots).count(), i, w));
        }
    }
    // Largest overlap first; then lower chunk, then lower worker id (deterministic).
    pairs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(b.2)));
    let mut order: Vec<Option<WorkerId>> = vec![None; chunks.len()];
    let mut taken = BTreeSet::new();
    for (_, i, w) in pairs {
        if order[i].is_none() && !taken.contains(w) {
            taken.insert(w.clone());
            order[i] = Some(w.clone());
        }
    }
    spec.workers = order.into_iter().map(|w| w.expect("as many workers as chunks, each taken once")).collect();
    spec
}

/// Expert loads a switch from `previous` to `spec` costs: slots workers must load.
pub fn slots_to_load(spec: &PlacementSpec, previous: Option<&PlacementSpec>) -> usize {
    spec.workers
        .iter()
        .map(|w| {
            let now = spec.slots_of(w);
            match previous {
                Some(p) => now.difference(&p.slots_of(w)).count(),
                None => now.len(),
            }
        })
        .sum()
}

//! Plain logic of a remote expert call: the slot table (which workers host each
//! (layer, expert), round-robin over replicas), splitting a batch into one part per worker,
//! and gathering the parts' outputs back into the caller's row order.

use model::{ExpertBatch, ExpertError, ExpertGroup, ExpertId};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Hosts of every known (layer, expert) slot, workers named by `K`.
#[derive(Debug)]
pub struct SlotTable<K> {
    hosts: HashMap<(usize, u32), Vec<K>>,
    next: AtomicUsize,
}

impl<K: Clone + Ord> SlotTable<K> {
    /// Builds the table from each worker's hosted `(layer, expert)` slots.
    pub fn new<'a>(workers: impl IntoIterator<Item = (&'a K, &'a [(usize, u32)])>) -> Self
    where
        K: 'a,
    {
        let mut hosts: HashMap<(usize, u32), Vec<K>> = HashMap::new();
        for (worker, slots) in workers {
            for &slot in slots {
                hosts.entry(slot).or_default().push(worker.clone());
            }
        }
        hosts.values_mut().for_each(|v| v.sort());
        SlotTable { hosts, next: AtomicUsize::new(0) }
    }

    /// A host of `expert` in `layer`: round-robin when several host it.
    pub fn pick(&self, layer: usize, expert: ExpertId) -> Option<K> {
        let hosts = self.hosts.get(&(layer, expert.0))?;
        match hosts.len() {
            0 => None,
            1 => Some(hosts[0].clone()),
            n => Some(hosts[self.next.fetch_add(1, Ordering::Relaxed) % n].clone()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

/// The share of a batch one worker runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Part<K> {
    pub worker: K,
    pub groups: Vec<ExpertGroup>,
    /// `[Σ num_tokens, hidden]`, rows in `groups` order.
    pub inputs: Vec<f32>,
    /// First row, in the caller's batch, of each group of `groups`.
    pub rows: Vec<usize>,
}

/// Splits `batch` into one part per hosting worker (ordered by worker); `host` names the
/// worker of each group. A group without host fails the whole batch.
pub fn split<K: Clone + Ord>(
    batch: &ExpertBatch<'_>,
    mut host: impl FnMut(ExpertId) -> Option<K>,
) -> Result<Vec<Part<K>>, ExpertError> {
    let h = batch.hidden;
    if batch.inputs.len() != batch.num_rows() * h {
        return Err(ExpertError::Malformed(format!("{} rows of width {h} expected", batch.num_rows())));
    }
    let mut parts: BTreeMap<K, Part<K>> = BTreeMap::new();
    let mut row = 0;
    for g in batch.groups {
        let worker = host(g.expert).ok_or(ExpertError::NotHosted { layer: batch.layer, expert: g.expert.0 })?;
        let part = parts.entry(worker.clone()).or_insert_with(|| Part { worker, groups: Vec::new(), inputs: Vec::new(), rows: Vec::new() });
        part.groups.push(*g);
        part.rows.push(row);
        part.inputs.extend_from_slice(&batch.inputs[row * h..(row + g.num_tokens) * h]);
        row += g.num_tokens;
    }
    Ok(parts.into_values().collect())
}

/// Copies each part's `outputs` (rows in the part's group order) to the caller's rows.
pub fn gather<K>(parts: &[Part<K>], outputs: &[Vec<f32>], hidden: usize, out: &mut [f32]) -> Result<(), ExpertError> {
    if parts.len() != outputs.len() {
        return Err(ExpertError::Malformed(format!("{} parts but {} outputs", parts.len(), outputs.len())));
    }
    for (part, got) in parts.iter().zip(outputs) {
        if got.len() != part.inputs.len() {
            return Err(ExpertError::Malformed(format!("{} output values for {} inputs", got.len(), part.inputs.len())));
        }
        let mut at = 0;
        for (g, &row) in part.groups.iter().zip(&part.rows) {
            let n = g.num_tokens * hidden;
            let dst = out
                .get_mut(row * hidden..row * hidden + n)
                .ok_or_else(|| ExpertError::Malformed(format!("row {row} is outside the outputs")))?;
            dst.copy_from_slice(&got[at..at + n]);
            at += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(expert: u32, num_tokens: usize) -> ExpertGroup {
        ExpertGroup { expert: ExpertId(expert), num_tokens }
    }

    /// A fake expert: output = input * (expert + 1), so misplaced rows are caught.
    fn fake_run(part: &Part<&'static str>, hidden: usize) -> Vec<f32> {
        let mut out = Vec::new();
        let mut at = 0;
        for g in &part.groups {
            let n = g.num_tokens * hidden;
            out.extend(part.inputs[at..at + n].iter().map(|v| v * (g.expert.0 + 1) as f32));
            at += n;
        }
        out
    }

    #[test]
    fn split_then_gather_restores_caller_order() {
        let hidden = 3;
        let groups = [group(0, 2), group(1, 1), group(2, 3), group(3, 1)];
        let rows: usize = groups.iter().map(|g| g.num_tokens).sum();
        let inputs: Vec<f32> = (0..rows * hidden).map(|v| v as f32).collect();
        let batch = ExpertBatch { layer: 1, hidden, groups: &groups, inputs: &inputs };
        // Experts 0 and 2 on "a", 1 and 3 on "b".
        let parts = split(&batch, |e| Some(if e.0 % 2 == 0 { "a" } else { "b" })).expect("all hosted");
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].worker, "a");
        assert_eq!(parts[0].groups, vec![group(0, 2), group(2, 3)]);
        assert_eq!(parts[0].rows, vec![0, 3]);
        assert_eq!(parts[1].rows, vec![2, 6]);
        assert_eq!(parts[0].inputs.len() + parts[1].inputs.len(), inputs.len());

        let outputs: Vec<Vec<f32>> = parts.iter().map(|p| fake_run(p, hidden)).collect();
        let mut out = vec![0f32; inputs.len()];
        gather(&parts, &outputs, hidden, &mut out).expect("shapes match");
        let mut want = Vec::new();
        let mut row = 0;
        for g in &groups {
            for r in row..row + g.num_tokens {
                want.extend(inputs[r * hidden..(r + 1) * hidden].iter().map(|v| v * (g.expert.0 + 1) as f32));
            }
            row += g.num_tokens;
        }
        assert_eq!(out, want);
    }

    #[test]
    fn unhosted_expert_fails_the_batch() {
        let groups = [group(0, 1), group(5, 1)];
        let inputs = vec![0f32; 4];
        let batch = ExpertBatch { layer: 2, hidden: 2, groups: &groups, inputs: &inputs };
        let err = split(&batch, |e| (e.0 == 0).then_some("a")).unwrap_err();
        assert!(matches!(err, ExpertError::NotHosted { layer: 2, expert: 5 }), "{err}");
    }

    #[test]
    fn gather_rejects_short_outputs() {
        let groups = [group(0, 2)];
        let inputs = vec![1f32; 4];
        let batch = ExpertBatch { layer: 0, hidden: 2, groups: &groups, inputs: &inputs };
        let parts = split(&batch, |_| Some("a")).expect("hosted");
        let mut out = vec![0f32; 4];
        assert!(matches!(gather(&parts, &[vec![0f32; 2]], 2, &mut out), Err(ExpertError::Malformed(_))));
    }

    #[test]
    fn replicas_are_picked_round_robin() {
        let (a, b) = ("a", "b");
        let slots_a = [(0usize, 1u32), (0, 2)];
        let slots_b = [(0usize, 1u32)];
        let table = SlotTable::new([(&a, &slots_a[..]), (&b, &slots_b[..])]);
        let picks: Vec<_> = (0..4).map(|_| table.pick(0, ExpertId(1)).expect("hosted")).collect();
        assert_eq!(picks, vec!["a", "b", "a", "b"]);
        assert_eq!(table.pick(0, ExpertId(2)), Some("a"));
        assert_eq!(table.pick(1, ExpertId(2)), None);
    }
}

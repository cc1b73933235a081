//! Plain logic of a remote expert call: the slot table (which workers host each
//! (layer, expert)), splitting a batch's groups over the hosts of their experts (a group's
//! tokens in near-equal contiguous chunks over its usable replicas, the first host rotating),
//! and gathering each part's outputs back into the caller's row order.
//!
//! Rows are independent, so where a row runs never changes its output: the caller's result
//! is the same as sending every group whole to one host.

use model::{ExpertBatch, ExpertError, ExpertGroup, ExpertId};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Hosts of every known (layer, expert) slot, workers named by `K`.
#[derive(Debug)]
pub struct SlotTable<K> {
    hosts: HashMap<(usize, u32), Vec<K>>,
}

impl<K: Clone + Ord> SlotTable<K> {
    /// Builds the table from each worker's hosted `(layer, expert)` slots (what `GetSlots`
    /// reports): one host entry per worker, in worker order.
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
        SlotTable { hosts }
    }

    /// Builds the table from a placement's replicas: one host entry per physical slot, so a
    /// worker holding two replicas of an expert gets two shares of its tokens.
    pub fn from_replicas(replicas: impl IntoIterator<Item = ((usize, u32), Vec<K>)>) -> Self {
        SlotTable { hosts: replicas.into_iter().filter(|(_, hosts)| !hosts.is_empty()).collect() }
    }

    /// The hosts of `expert` in `layer` (empty when nobody hosts it).
    pub fn hosts(&self, layer: usize, expert: ExpertId) -> &[K] {
        self.hosts.get(&(layer, expert.0)).map_or(&[], Vec::as_slice)
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

/// `group.num_tokens` rows of the caller's batch, from row `row` on, all for `group.expert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub row: usize,
    pub group: ExpertGroup,
}

/// The batch's groups as pieces, after checking that `inputs` and `outputs_len` fit them.
pub fn pieces(batch: &ExpertBatch<'_>, outputs_len: usize) -> Result<Vec<Piece>, ExpertError> {
    let want = batch.num_rows() * batch.hidden;
    if batch.inputs.len() != want || outputs_len != want {
        return Err(ExpertError::Malformed(format!(
            "{} rows of width {} expected ({} input and {outputs_len} output values)",
            batch.num_rows(),
            batch.hidden,
            batch.inputs.len()
        )));
    }
    let mut row = 0;
    Ok(batch
        .groups
        .iter()
        .map(|&group| {
            let piece = Piece { row, group };
            row += group.num_tokens;
            piece
        })
        .collect())
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

impl<K> Part<K> {
    /// The caller's rows this part carries (to send them again elsewhere).
    pub fn pieces(&self) -> impl Iterator<Item = Piece> + '_ {
        self.groups.iter().zip(&self.rows).map(|(&group, &row)| Piece { row, group })
    }

    /// Appends `num_tokens` rows from caller row `row` for `expert`, extending the last
    /// group when it continues it (two chunks of one group landing on the same worker).
    fn push(&mut self, expert: ExpertId, row: usize, num_tokens: usize, inputs: &[f32], hidden: usize) {
        self.inputs.extend_from_slice(&inputs[row * hidden..(row + num_tokens) * hidden]);
        if let (Some(last), Some(&start)) = (self.groups.last_mut(), self.rows.last())
            && last.expert == expert
            && start + last.num_tokens == row
        {
            last.num_tokens += num_tokens;
            return;
        }
        self.groups.push(ExpertGroup { expert, num_tokens });
        self.rows.push(row);
    }
}

/// A split: one part per worker (ordered by worker), and the pieces nobody hosts.
#[derive(Debug, Clone, PartialEq)]
pub struct Split<K> {
    pub parts: Vec<Part<K>>,
    pub unhosted: Vec<Piece>,
}

/// Splits `pieces` of the caller's `inputs` (`[rows, hidden]`) over their experts' hosts.
///
/// A piece of n tokens whose expert has r usable hosts goes to min(n, r) of them in
/// near-equal contiguous chunks (the first chunks one token longer), chunk k to usable host
/// `(start + k) % r`, where `start` comes from `turn` (one step per piece, so single-token
/// pieces round-robin). Hosts for which `usable` is false are skipped unless every host is
/// unusable; then all are tried (a call that fails is retried later). Pieces must lie
/// inside `inputs`.
pub fn split<'t, K: Clone + Ord + 't>(
    pieces: &[Piece],
    inputs: &[f32],
    hidden: usize,
    hosts: impl Fn(ExpertId) -> &'t [K],
    usable: impl Fn(&K) -> bool,
    turn: &AtomicUsize,
) -> Split<K> {
    let mut parts: BTreeMap<K, Part<K>> = BTreeMap::new();
    let mut unhosted = Vec::new();
    let mut live: Vec<&K> = Vec::new();
    for piece in pieces {
        let expert = piece.group.expert;
        let all = hosts(expert);
        if all.is_empty() || piece.group.num_tokens == 0 {
            if piece.group.num_tokens > 0 {
                unhosted.push(*piece);
            }
            continue;
        }
        live.clear();
        live.extend(all.iter().filter(|k| usable(k)));
        if live.is_empty() {
            live.extend(all);
        }
        let start = turn.fetch_add(1, Ordering::Relaxed);
        for (host, offset, len) in chunks(piece.group.num_tokens, live.len(), start) {
            let worker = live[host];
            let part = parts.entry(worker.clone()).or_insert_with(|| Part {
                worker: worker.clone(),
                groups: Vec::new(),
                inputs: Vec::new(),
                rows: Vec::new(),
            });
            part.push(expert, piece.row + offset, len, inputs, hidden);
        }
    }
    Split { parts: parts.into_values().collect(), unhosted }
}

/// `(host index, first token, tokens)` of each chunk of `n` tokens over `r` hosts:
/// min(n, r) contiguous chunks whose lengths differ by at most one, chunk k on host
/// `(start + k) % r`.
pub fn chunks(n: usize, r: usize, start: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let m = n.min(r);
    let (base, extra) = (n.checked_div(m).unwrap_or(0), n.checked_rem(m).unwrap_or(0));
    let mut offset = 0;
    (0..m).map(move |k| {
        let len = base + usize::from(k < extra);
        let chunk = ((start + k) % r, offset, len);
        offset += len;
        chunk
    })
}

/// Copies one part's outputs (rows in the part's group order) to the caller's rows. Does
/// not read `part.inputs` (the sender may have taken them).
pub fn gather_part<K>(part: &Part<K>, got: &[f32], hidden: usize, out: &mut [f32]) -> Result<(), ExpertError> {
    let want = part.groups.iter().map(|g| g.num_tokens).sum::<usize>() * hidden;
    if got.len() != want {
        return Err(ExpertError::Malformed(format!("{} output values for {want} inputs", got.len())));
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

    /// What a local run of the whole batch gives.
    fn reference(groups: &[ExpertGroup], inputs: &[f32], hidden: usize) -> Vec<f32> {
        let mut want = Vec::new();
        let mut row = 0;
        for g in groups {
            for r in row..row + g.num_tokens {
                want.extend(inputs[r * hidden..(r + 1) * hidden].iter().map(|v| v * (g.expert.0 + 1) as f32));
            }
            row += g.num_tokens;
        }
        want
    }

    fn batch_inputs(groups: &[ExpertGroup], hidden: usize) -> Vec<f32> {
        let rows: usize = groups.iter().map(|g| g.num_tokens).sum();
        (0..rows * hidden).map(|v| v as f32).collect()
    }

    /// Runs every part with `fake_run` and gathers.
    fn run_all(split: &Split<&'static str>, hidden: usize, len: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; len];
        for part in &split.parts {
            gather_part(part, &fake_run(part, hidden), hidden, &mut out).expect("shapes match");
        }
        out
    }

    #[test]
    fn split_then_gather_restores_caller_order() {
        let hidden = 3;
        let groups = [group(0, 2), group(1, 1), group(2, 3), group(3, 1)];
        let inputs = batch_inputs(&groups, hidden);
        let batch = ExpertBatch { layer: 1, hidden, groups: &groups, inputs: &inputs };
        let pieces = pieces(&batch, inputs.len()).expect("well formed");
        // Experts 0 and 2 on "a", 1 and 3 on "b".
        let (a, b) = (["a"], ["b"]);
        let split = split(
            &pieces,
            &inputs,
            hidden,
            |e| if e.0 % 2 == 0 { &a[..] } else { &b[..] },
            |_| true,
            &AtomicUsize::new(0),
        );
        assert!(split.unhosted.is_empty());
        assert_eq!(split.parts.len(), 2);
        assert_eq!(split.parts[0].worker, "a");
        assert_eq!(split.parts[0].groups, vec![group(0, 2), group(2, 3)]);
        assert_eq!(split.parts[0].rows, vec![0, 3]);
        assert_eq!(split.parts[1].rows, vec![2, 6]);
        assert_eq!(run_all(&split, hidden, inputs.len()), reference(&groups, &inputs, hidden));
    }

    #[test]
    fn chunks_are_contiguous_near_equal_and_rotate() {
        let c: Vec<_> = chunks(7, 3, 0).collect();
        assert_eq!(c, vec![(0, 0, 3), (1, 3, 2), (2, 5, 2)]);
        let c: Vec<_> = chunks(7, 3, 4).collect();
        assert_eq!(c, vec![(1, 0, 3), (2, 3, 2), (0, 5, 2)]);
        // Fewer tokens than hosts: one token each on the first n hosts from `start`.
        let c: Vec<_> = chunks(2, 5, 4).collect();
        assert_eq!(c, vec![(4, 0, 1), (0, 1, 1)]);
        assert_eq!(chunks(0, 3, 0).count(), 0);
        for (n, r) in [(1, 1), (5, 2), (64, 7), (3, 8)] {
            let c: Vec<_> = chunks(n, r, 0).collect();
            assert_eq!(c.len(), n.min(r));
            assert_eq!(c.iter().map(|x| x.2).sum::<usize>(), n);
            let (lo, hi) = (c.iter().map(|x| x.2).min(), c.iter().map(|x| x.2).max());
            assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{n} over {r}: {c:?}");
        }
    }

    #[test]
    fn replicated_groups_spread_over_hosts_and_order_is_restored() {
        let hidden = 2;
        let groups = [group(4, 5), group(1, 1), group(4, 1), group(2, 7)];
        let inputs = batch_inputs(&groups, hidden);
        let batch = ExpertBatch { layer: 0, hidden, groups: &groups, inputs: &inputs };
        let pieces = pieces(&batch, inputs.len()).expect("well formed");
        let (abc, b) = (["a", "b", "c"], ["b"]);
        let hosts = |e: ExpertId| if e.0 == 1 { &b[..] } else { &abc[..] };
        let split = split(&pieces, &inputs, hidden, hosts, |_| true, &AtomicUsize::new(0));
        let tokens = |w: &str| -> usize {
            split.parts.iter().filter(|p| p.worker == w).flat_map(|p| &p.groups).map(|g| g.num_tokens).sum()
        };
        // Group 0 (5 tokens, start a): a2 b2 c1; group 1 on b; group 2 (1 token, start c):
        // c; group 3 (7 tokens, start a): a3 b2 c2.
        assert_eq!((tokens("a"), tokens("b"), tokens("c")), (5, 5, 4));
        assert_eq!(run_all(&split, hidden, inputs.len()), reference(&groups, &inputs, hidden));
    }

    #[test]
    fn single_token_groups_round_robin() {
        let groups = [group(0, 1)];
        let inputs = vec![1f32; 2];
        let hosts = ["a", "b", "c"];
        let turn = AtomicUsize::new(0);
        let piece = [Piece { row: 0, group: groups[0] }];
        let picks: Vec<_> =
            (0..4).map(|_| split(&piece, &inputs, 2, |_| &hosts[..], |_| true, &turn).parts[0].worker).collect();
        assert_eq!(picks, vec!["a", "b", "c", "a"]);
    }

    #[test]
    fn dead_hosts_are_skipped_while_another_exists() {
        let groups = [group(0, 4), group(1, 2)];
        let inputs = batch_inputs(&groups, 1);
        let pieces = [Piece { row: 0, group: groups[0] }, Piece { row: 4, group: groups[1] }];
        let (ab, a) = (["a", "b"], ["a"]);
        let hosts = |e: ExpertId| if e.0 == 0 { &ab[..] } else { &a[..] };
        // "a" is down: expert 0 goes whole to "b"; expert 1 has no other host, so "a" is tried.
        let split = split(&pieces, &inputs, 1, hosts, |w| *w != "a", &AtomicUsize::new(0));
        assert_eq!(split.parts.len(), 2);
        assert_eq!((split.parts[0].worker, &split.parts[0].groups[..]), ("a", &[group(1, 2)][..]));
        assert_eq!((split.parts[1].worker, &split.parts[1].groups[..]), ("b", &[group(0, 4)][..]));
        assert_eq!(run_all(&split, 1, inputs.len()), reference(&groups, &inputs, 1));
    }

    #[test]
    fn a_failed_part_is_split_again_over_the_remaining_hosts() {
        let hidden = 2;
        let groups = [group(0, 3), group(1, 4), group(2, 1)];
        let inputs = batch_inputs(&groups, hidden);
        let batch = ExpertBatch { layer: 0, hidden, groups: &groups, inputs: &inputs };
        let all = pieces(&batch, inputs.len()).expect("well formed");
        let ab = ["a", "b"];
        let turn = AtomicUsize::new(0);
        let first = split(&all, &inputs, hidden, |_| &ab[..], |_| true, &turn);
        let mut out = vec![f32::NAN; inputs.len()];
        // "a" answers; "b" fails and its rows go to "a" alone.
        let (ok, failed): (Vec<_>, Vec<_>) = first.parts.iter().partition(|p| p.worker == "a");
        gather_part(ok[0], &fake_run(ok[0], hidden), hidden, &mut out).expect("shapes match");
        let retry: Vec<Piece> = failed.iter().flat_map(|p| p.pieces()).collect();
        assert!(!retry.is_empty());
        let second = split(&retry, &inputs, hidden, |_| &ab[..], |w| *w != "b", &turn);
        assert_eq!(second.parts.len(), 1);
        assert_eq!(second.parts[0].worker, "a");
        let part = &second.parts[0];
        gather_part(part, &fake_run(part, hidden), hidden, &mut out).expect("shapes match");
        assert_eq!(out, reference(&groups, &inputs, hidden));
    }

    #[test]
    fn adjacent_chunks_on_one_worker_merge() {
        // Two replicas of expert 0 on "a" (two physical slots) and one on "b".
        let table = SlotTable::from_replicas([((0, 0), vec!["a", "a", "b"])]);
        let inputs = vec![0f32; 6];
        let piece = [Piece { row: 0, group: group(0, 6) }];
        let split = split(&piece, &inputs, 1, |e| table.hosts(0, e), |_| true, &AtomicUsize::new(0));
        assert_eq!(split.parts[0].groups, vec![group(0, 4)]);
        assert_eq!(split.parts[0].rows, vec![0]);
        assert_eq!(split.parts[1].groups, vec![group(0, 2)]);
        assert_eq!(split.parts[1].rows, vec![4]);
    }

    #[test]
    fn unhosted_pieces_are_set_aside() {
        let groups = [group(0, 1), group(5, 2)];
        let inputs = vec![0f32; 6];
        let batch = ExpertBatch { layer: 2, hidden: 2, groups: &groups, inputs: &inputs };
        let all = pieces(&batch, inputs.len()).expect("well formed");
        let a = ["a"];
        let split = split(&all, &inputs, 2, |e| if e.0 == 0 { &a[..] } else { &[] }, |_| true, &AtomicUsize::new(0));
        assert_eq!(split.parts.len(), 1);
        assert_eq!(split.unhosted, vec![Piece { row: 1, group: group(5, 2) }]);
    }

    #[test]
    fn malformed_batches_and_short_outputs_are_rejected() {
        let groups = [group(0, 2)];
        let inputs = vec![1f32; 4];
        let batch = ExpertBatch { layer: 0, hidden: 2, groups: &groups, inputs: &inputs };
        assert!(matches!(pieces(&batch, 3), Err(ExpertError::Malformed(_))));
        assert!(matches!(pieces(&ExpertBatch { inputs: &inputs[..3], ..batch }, 4), Err(ExpertError::Malformed(_))));
        let all = pieces(&batch, 4).expect("well formed");
        let a = ["a"];
        let split = split(&all, &inputs, 2, |_| &a[..], |_| true, &AtomicUsize::new(0));
        let mut out = vec![0f32; 4];
        assert!(matches!(gather_part(&split.parts[0], &[0f32; 2], 2, &mut out), Err(ExpertError::Malformed(_))));
    }

    #[test]
    fn discovery_table_lists_each_worker_once() {
        let (a, b) = ("a", "b");
        let slots_a = [(0usize, 1u32), (0, 2)];
        let slots_b = [(0usize, 1u32)];
        let table = SlotTable::new([(&b, &slots_b[..]), (&a, &slots_a[..])]);
        assert_eq!(table.hosts(0, ExpertId(1)), &["a", "b"]);
        assert_eq!(table.hosts(0, ExpertId(2)), &["a"]);
        assert!(table.hosts(1, ExpertId(2)).is_empty());
    }
}

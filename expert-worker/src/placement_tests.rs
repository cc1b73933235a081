//! Unit tests of the placement decisions (`placement.rs`).

use super::*;
use ::placement::CurrentPlacement;
use ::placement::keys;

fn w(id: &str) -> WorkerId {
    WorkerId::new(id).expect("valid")
}

fn cluster() -> ClusterName {
    ClusterName::new("c").expect("valid")
}

fn shape() -> ModelShape {
    ModelShape { moe_layers: [1, 2, 3].into_iter().collect(), num_experts: 4 }
}

fn k(layer: usize, expert: u32) -> SlotKey {
    SlotKey { layer, expert }
}

fn set(slots: &[SlotKey]) -> BTreeSet<SlotKey> {
    slots.iter().copied().collect()
}

/// Two workers, two slots each per layer, layers 1 and 2.
fn spec(version: u64, workers: [&str; 2], phy2log: [[u32; 4]; 2]) -> PlacementSpec {
    PlacementSpec {
        version: PlacementVersion(version),
        workers: workers.iter().map(|id| w(id)).collect(),
        layers: vec![1, 2],
        num_experts: 4,
        phy2log: phy2log.iter().map(|row| row.to_vec()).collect(),
        reason: "test".into(),
        ratio_before: 1.0,
        ratio_after: 1.0,
        created_unix_ms: 0,
    }
}

/// A put of a key and its value.
type Put = (String, Vec<u8>);

fn put_spec(s: &PlacementSpec) -> Put {
    (keys::placement_spec_key(&cluster(), s.version), serde_json::to_vec(s).expect("serializes"))
}

fn put_current(version: u64) -> Put {
    let value = serde_json::to_vec(&CurrentPlacement { version: PlacementVersion(version) }).expect("serializes");
    (keys::placement_current_key(&cluster()), value)
}

/// Worker `a`'s view after `puts`.
fn view(puts: Vec<Put>) -> PlacementView {
    let mut v = PlacementView::new(cluster(), w("a"), shape());
    for p in puts {
        put(&mut v, p);
    }
    v
}

fn put(v: &mut PlacementView, (key, value): Put) -> bool {
    v.apply(&key, Some(&value))
}

fn versions(v: &PlacementView) -> Vec<PlacementVersion> {
    v.specs().map(|s| s.version).collect()
}

#[test]
fn apply_keeps_valid_specs_and_the_current_pointer() {
    let s1 = spec(1, ["a", "b"], [[0, 1, 2, 3], [3, 2, 1, 0]]);
    let mut v = view(vec![put_spec(&s1)]);
    assert_eq!(versions(&v), vec![PlacementVersion(1)]);
    assert_eq!(v.target(), Target { current: None, newest: Some(PlacementVersion(1)) });

    // current names a version whose spec is unknown: no current spec yet.
    put(&mut v, put_current(2));
    assert_eq!(v.current(), Some(PlacementVersion(2)));
    assert!(versions(&v).is_empty(), "specs older than current are dropped");
    assert_eq!(v.target(), Target { current: None, newest: None });
    put(&mut v, put_spec(&s1));
    assert!(versions(&v).is_empty(), "an outdated spec is ignored");
    let s2 = spec(2, ["a", "b"], [[0, 1, 2, 3], [0, 1, 2, 3]]);
    put(&mut v, put_spec(&s2));
    assert_eq!(v.target(), Target { current: Some(PlacementVersion(2)), newest: Some(PlacementVersion(2)) });
    assert!(v.names(&w("a")) && !v.names(&w("z")));

    v.apply(&keys::placement_current_key(&cluster()), None);
    assert_eq!(v.current(), None);
    v.apply(&keys::placement_spec_key(&cluster(), PlacementVersion(2)), None);
    // With no current version every spec the store still holds counts, the previous one too.
    assert_eq!(versions(&v), vec![PlacementVersion(1)]);
    v.apply(&keys::placement_spec_key(&cluster(), PlacementVersion(1)), None);
    assert!(versions(&v).is_empty());
}

#[test]
fn apply_refuses_invalid_specs_and_reports_own_ready_deletions() {
    let c = cluster();
    let mut bad_shape = spec(1, ["a", "b"], [[0, 1, 2, 2], [3, 2, 1, 0]]);
    let mut v = view(vec![put_spec(&bad_shape)]);
    assert!(versions(&v).is_empty(), "expert 3 missing from layer 1");
    bad_shape.phy2log[0] = vec![0, 1, 2, 3];
    bad_shape.layers = vec![0, 1];
    put(&mut v, put_spec(&bad_shape));
    assert!(versions(&v).is_empty(), "layer 0 is dense");
    let value = serde_json::to_vec(&spec(3, ["a", "b"], [[0, 1, 2, 3], [3, 2, 1, 0]])).expect("serializes");
    put(&mut v, (keys::placement_spec_key(&c, PlacementVersion(4)), value));
    assert!(versions(&v).is_empty(), "version 3 under key 4");
    put(&mut v, (keys::placement_spec_key(&c, PlacementVersion(5)), b"{".to_vec()));
    let ok = spec(6, ["a", "b"], [[0, 1, 2, 3], [3, 2, 1, 0]]);
    put(&mut v, put_spec(&ok));
    assert_eq!(versions(&v).len(), 1);
    let mut eight_experts = ok.clone();
    eight_experts.num_experts = 8;
    eight_experts.phy2log = vec![(0..8).collect(), (0..8).collect()];
    put(&mut v, put_spec(&eight_experts));
    assert!(versions(&v).is_empty(), "a spec replaced by an unusable one is dropped");
    put(&mut v, (keys::placement_current_key(&c), b"7".to_vec()));
    assert_eq!(v.current(), None, "current must be a CurrentPlacement document");

    let mine = keys::placement_ready_key(&c, PlacementVersion(6), &w("a"));
    let theirs = keys::placement_ready_key(&c, PlacementVersion(6), &w("b"));
    v.apply(&mine, None);
    assert_eq!(v.take_lost_marks(), vec![PlacementVersion(6)]);
    assert!(v.take_lost_marks().is_empty(), "taken once");
    v.apply(&theirs, None);
    v.apply(&mine, Some(b"{}"));
    v.apply("/expertmesh/c/placement/x", Some(b""));
    assert!(v.take_lost_marks().is_empty());
}

#[test]
fn a_fresh_worker_loads_the_newest_spec_and_marks_it_ready() {
    let s1 = spec(1, ["a", "b"], [[0, 1, 2, 3], [3, 2, 1, 0]]);
    let v = view(vec![put_spec(&s1)]);
    let a = w("a");
    let load = slots_to_load(&BTreeSet::new(), &v, &a);
    assert_eq!(load, vec![k(1, 0), k(1, 1), k(2, 2), k(2, 3)]);
    assert!(marks_due(&BTreeSet::new(), &v, &a, &BTreeSet::new()).is_empty(), "nothing hosted yet");
    let hosted = set(&load);
    assert!(slots_to_load(&hosted, &v, &a).is_empty());
    assert_eq!(marks_due(&hosted, &v, &a, &BTreeSet::new()), vec![(PlacementVersion(1), ReadyMark { slots: 4 })]);
    assert!(marks_due(&hosted, &v, &a, &[PlacementVersion(1)].into_iter().collect()).is_empty());
    // A worker the spec does not name loads nothing and is never marked ready.
    let z = w("z");
    assert!(slots_to_load(&BTreeSet::new(), &v, &z).is_empty());
    assert!(marks_due(&BTreeSet::new(), &v, &z, &BTreeSet::new()).is_empty());
}

#[test]
fn a_two_phase_switch_loads_first_and_releases_after_current_moves() {
    let a = w("a");
    let s1 = spec(1, ["a", "b"], [[0, 1, 2, 3], [3, 2, 1, 0]]);
    let s2 = spec(2, ["a", "b"], [[1, 2, 0, 3], [3, 2, 1, 0]]);
    let mut v = view(vec![put_spec(&s1), put_current(1)]);
    let mut hosted = set(&slots_to_load(&BTreeSet::new(), &v, &a));
    assert_eq!(hosted, s1.slots_of(&a));
    assert!(slots_to_release(&hosted, &v, PlacementVersion(1), &a, true).is_empty());

    // Phase 1: spec 2 appears; a loads what it lacks and keeps serving version 1.
    put(&mut v, put_spec(&s2));
    assert_eq!(v.target(), Target { current: Some(PlacementVersion(1)), newest: Some(PlacementVersion(2)) });
    let load = slots_to_load(&hosted, &v, &a);
    assert_eq!(load, vec![k(1, 2)]);
    hosted.extend(load);
    let marked = [PlacementVersion(1)].into_iter().collect();
    assert_eq!(marks_due(&hosted, &v, &a, &marked), vec![(PlacementVersion(2), ReadyMark { slots: 4 })]);
    assert!(slots_to_release(&hosted, &v, PlacementVersion(1), &a, true).is_empty(), "version 1 still in force");

    // Phase 2: current moves to 2; (1, 0) is in neither 2 nor a newer spec.
    put(&mut v, put_current(2));
    assert_eq!(slots_to_release(&hosted, &v, PlacementVersion(2), &a, true), vec![k(1, 0)]);
    // A spec 3 seen before the release delay ends keeps what it needs.
    let s3 = spec(3, ["a", "b"], [[0, 1, 2, 3], [3, 2, 1, 0]]);
    put(&mut v, put_spec(&s3));
    assert!(slots_to_release(&hosted, &v, PlacementVersion(2), &a, true).is_empty());
    // Unknown spec, or a worker no placement has named: nothing is released.
    assert!(slots_to_release(&hosted, &v, PlacementVersion(9), &a, true).is_empty());
    assert!(slots_to_release(&hosted, &v, PlacementVersion(2), &a, false).is_empty());
}

#[test]
fn static_slots_go_once_a_placement_names_the_worker_elsewhere() {
    let a = w("a");
    // Started with --shard: hosts every expert of layers 1 and 2.
    let hosted: BTreeSet<SlotKey> = [1, 2].into_iter().flat_map(|l| (0..4).map(move |e| k(l, e))).collect();
    let s1 = spec(1, ["a", "b"], [[0, 1, 2, 3], [3, 2, 1, 0]]);
    let v = view(vec![put_spec(&s1), put_current(1)]);
    assert!(slots_to_load(&hosted, &v, &a).is_empty(), "the shard already holds a's slots");
    assert_eq!(marks_due(&hosted, &v, &a, &BTreeSet::new()), vec![(PlacementVersion(1), ReadyMark { slots: 4 })]);
    assert_eq!(
        slots_to_release(&hosted, &v, PlacementVersion(1), &a, v.names(&a)),
        vec![k(1, 2), k(1, 3), k(2, 0), k(2, 1)]
    );
    // A worker left out of the placement releases everything once it has followed one.
    let dropped = view(vec![put_spec(&spec(2, ["b", "c"], [[0, 1, 2, 3], [3, 2, 1, 0]])), put_current(2)]);
    assert_eq!(slots_to_release(&hosted, &dropped, PlacementVersion(2), &a, true).len(), hosted.len());
    assert!(slots_to_release(&hosted, &dropped, PlacementVersion(2), &a, dropped.names(&a)).is_empty());
}

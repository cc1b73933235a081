//! Unit tests of the placement decisions (`placement.rs`).

use super::*;

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

fn put_spec(s: &PlacementSpec) -> WatchEvent {
    WatchEvent::Put {
        key: keys::placement_spec_key(&cluster(), s.version),
        value: serde_json::to_vec(s).expect("serializes"),
    }
}

fn put_current(version: u64) -> WatchEvent {
    let value = serde_json::to_vec(&CurrentPlacement { version: PlacementVersion(version) }).expect("serializes");
    WatchEvent::Put { key: keys::placement_current_key(&cluster()), value }
}

fn view(events: Vec<WatchEvent>) -> PlacementView {
    let mut v = PlacementView::default();
    for e in events {
        v.apply(&cluster(), &w("a"), &shape(), e);
    }
    v
}

#[test]
fn apply_keeps_valid_specs_and_the_current_pointer() {
    let s1 = spec(1, ["a", "b"], [[0, 1, 2, 3], [3, 2, 1, 0]]);
    let mut v = view(vec![put_spec(&s1)]);
    assert!(!v.synced);
    assert_eq!(v.specs.keys().copied().collect::<Vec<_>>(), vec![PlacementVersion(1)]);
    v.apply(&cluster(), &w("a"), &shape(), WatchEvent::Synced);
    assert!(v.synced);
    assert_eq!(v.target(), Target { current: None, newest: Some(PlacementVersion(1)) });

    // current names a version whose spec is unknown: no current spec yet.
    v.apply(&cluster(), &w("a"), &shape(), put_current(2));
    assert_eq!(v.current, Some(PlacementVersion(2)));
    assert!(v.specs.is_empty(), "specs older than current are dropped");
    assert_eq!(v.target(), Target { current: None, newest: None });
    v.apply(&cluster(), &w("a"), &shape(), put_spec(&s1));
    assert!(v.specs.is_empty(), "an outdated spec is ignored");
    let s2 = spec(2, ["a", "b"], [[0, 1, 2, 3], [0, 1, 2, 3]]);
    v.apply(&cluster(), &w("a"), &shape(), put_spec(&s2));
    assert_eq!(v.target(), Target { current: Some(PlacementVersion(2)), newest: Some(PlacementVersion(2)) });
    assert!(v.names(&w("a")) && !v.names(&w("z")));

    let key = keys::placement_current_key(&cluster());
    v.apply(&cluster(), &w("a"), &shape(), WatchEvent::Delete { key });
    assert_eq!(v.current, None);
    let key = keys::placement_spec_key(&cluster(), PlacementVersion(2));
    v.apply(&cluster(), &w("a"), &shape(), WatchEvent::Delete { key });
    assert!(v.specs.is_empty());
}

#[test]
fn apply_refuses_invalid_specs_and_reports_own_ready_deletions() {
    let c = cluster();
    let mut bad_shape = spec(1, ["a", "b"], [[0, 1, 2, 2], [3, 2, 1, 0]]);
    let mut v = view(vec![put_spec(&bad_shape)]);
    assert!(v.specs.is_empty(), "expert 3 missing from layer 1");
    bad_shape.phy2log[0] = vec![0, 1, 2, 3];
    bad_shape.layers = vec![0, 1];
    v.apply(&c, &w("a"), &shape(), put_spec(&bad_shape));
    assert!(v.specs.is_empty(), "layer 0 is dense");
    let value = serde_json::to_vec(&spec(3, ["a", "b"], [[0, 1, 2, 3], [3, 2, 1, 0]])).expect("serializes");
    v.apply(&c, &w("a"), &shape(), WatchEvent::Put { key: keys::placement_spec_key(&c, PlacementVersion(4)), value });
    assert!(v.specs.is_empty(), "version 3 under key 4");
    let key = keys::placement_spec_key(&c, PlacementVersion(5));
    v.apply(&c, &w("a"), &shape(), WatchEvent::Put { key, value: b"{".to_vec() });
    let fewer_experts = ModelShape { num_experts: 8, ..shape() };
    let ok = spec(6, ["a", "b"], [[0, 1, 2, 3], [3, 2, 1, 0]]);
    v.apply(&c, &w("a"), &shape(), put_spec(&ok));
    assert_eq!(v.specs.len(), 1);
    v.apply(&c, &w("a"), &fewer_experts, put_spec(&ok));
    assert!(v.specs.is_empty(), "a spec replaced by an unusable one is dropped");
    let key = keys::placement_current_key(&c);
    v.apply(&c, &w("a"), &shape(), WatchEvent::Put { key, value: b"7".to_vec() });
    assert_eq!(v.current, None, "current must be a CurrentPlacement document");

    let mine = keys::placement_ready_key(&c, PlacementVersion(6), &w("a"));
    let theirs = keys::placement_ready_key(&c, PlacementVersion(6), &w("b"));
    assert_eq!(
        v.apply(&c, &w("a"), &shape(), WatchEvent::Delete { key: mine.clone() }),
        Seen::OwnReadyDeleted(PlacementVersion(6))
    );
    assert_eq!(v.apply(&c, &w("a"), &shape(), WatchEvent::Delete { key: theirs }), Seen::Nothing);
    assert_eq!(v.apply(&c, &w("a"), &shape(), WatchEvent::Put { key: mine, value: b"{}".to_vec() }), Seen::Nothing);
    let foreign = WatchEvent::Put { key: "/expertmesh/c/placement/x".into(), value: vec![] };
    assert_eq!(v.apply(&c, &w("a"), &shape(), foreign), Seen::Nothing);
}

#[test]
fn a_fresh_worker_loads_the_newest_spec_and_marks_it_ready() {
    let s1 = spec(1, ["a", "b"], [[0, 1, 2, 3], [3, 2, 1, 0]]);
    let v = view(vec![put_spec(&s1), WatchEvent::Synced]);
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
    let mut v = view(vec![put_spec(&s1), put_current(1), WatchEvent::Synced]);
    let mut hosted = set(&slots_to_load(&BTreeSet::new(), &v, &a));
    assert_eq!(hosted, s1.slots_of(&a));
    assert!(slots_to_release(&hosted, &v, PlacementVersion(1), &a, true).is_empty());

    // Phase 1: spec 2 appears; a loads what it lacks and keeps serving version 1.
    v.apply(&cluster(), &a, &shape(), put_spec(&s2));
    assert_eq!(v.target(), Target { current: Some(PlacementVersion(1)), newest: Some(PlacementVersion(2)) });
    let load = slots_to_load(&hosted, &v, &a);
    assert_eq!(load, vec![k(1, 2)]);
    hosted.extend(load);
    let marked = [PlacementVersion(1)].into_iter().collect();
    assert_eq!(marks_due(&hosted, &v, &a, &marked), vec![(PlacementVersion(2), ReadyMark { slots: 4 })]);
    assert!(slots_to_release(&hosted, &v, PlacementVersion(1), &a, true).is_empty(), "version 1 still in force");

    // Phase 2: current moves to 2; (1, 0) is in neither 2 nor a newer spec.
    v.apply(&cluster(), &a, &shape(), put_current(2));
    assert_eq!(slots_to_release(&hosted, &v, PlacementVersion(2), &a, true), vec![k(1, 0)]);
    // A spec 3 seen before the release delay ends keeps what it needs.
    let s3 = spec(3, ["a", "b"], [[0, 1, 2, 3], [3, 2, 1, 0]]);
    v.apply(&cluster(), &a, &shape(), put_spec(&s3));
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
    let v = view(vec![put_spec(&s1), put_current(1), WatchEvent::Synced]);
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

//! Unit tests of the placement decisions: aggregation, triggers, worker counts.

use super::*;

fn w(id: &str) -> WorkerId {
    WorkerId::new(id).expect("valid")
}

fn shape() -> ModelShape {
    ModelShape { layers: vec![1, 2], num_experts: 8, num_groups: 2 }
}

fn policy() -> Policy {
    Policy {
        redundant_slots: 4,
        nodes: 1,
        period: Duration::from_secs(600),
        skew_threshold: 1.3,
        min_interval: Duration::from_secs(30),
        min_improvement: 0.05,
        min_tokens_per_s: 1.0,
        worker_tokens_per_s: 1000.0,
        target_utilization: 0.5,
        initial_settle: Duration::from_secs(3),
        expected_workers: None,
    }
}

fn workers(n: usize) -> BTreeSet<WorkerId> {
    (0..n).map(|i| w(&format!("e{i}"))).collect()
}

/// Expert 0 of every layer carries most of the load.
fn skewed() -> Vec<Vec<f64>> {
    vec![vec![800.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]; 2]
}

fn report(worker: &str, layers: Vec<usize>, rates: Vec<Vec<f64>>) -> LoadReport {
    LoadReport {
        worker: w(worker),
        layers,
        num_experts: 8,
        tokens_per_s: rates,
        window_ms: 1000,
        total_tokens: 0,
        placement_version: None,
        updated_unix_ms: 0,
    }
}

#[test]
fn aggregate_sums_reports_by_model_layer() {
    let a = report("a", vec![1, 2], vec![vec![1.0; 8], vec![2.0; 8]]);
    let b = report("b", vec![2], vec![vec![3.0; 8]]);
    let mut foreign = report("c", vec![1], vec![vec![9.0; 4]]);
    foreign.num_experts = 4;
    let total = aggregate(&shape(), &[&a, &b, &foreign]);
    assert_eq!(total, vec![vec![1.0; 8], vec![5.0; 8]]);
}

#[test]
fn slots_round_up_to_the_workers() {
    assert_eq!(num_slots(8, 4, 3), 12);
    assert_eq!(num_slots(8, 4, 5), 15);
    assert_eq!(num_slots(256, 32, 32), 288);
    assert_eq!(num_slots(16, 0, 3), 18);
}

#[test]
fn first_placement_is_initial_and_uniform() {
    let live = workers(3);
    let load = vec![vec![0.0; 8]; 2];
    let seen = Observed { live: &live, current: None, load: &load, since_last: None, settling: Duration::from_secs(3) };
    let r = decide(&shape(), &policy(), &seen, PlacementVersion(1)).expect("plans").expect("rebalances");
    assert_eq!(r.reason, Reason::Initial);
    r.spec.validate().expect("valid spec");
    assert_eq!(r.spec.phy2log[0].len(), 12);
    assert_eq!(r.spec.workers.len(), 3);
    assert_eq!(r.spec.version, PlacementVersion(1));
}

#[test]
fn skew_triggers_a_rebalance_that_replicates_the_hot_expert() {
    let live = workers(4);
    let idle = vec![vec![0.0; 8]; 2];
    let first = plan(&shape(), &policy(), &idle, &live.iter().cloned().collect::<Vec<_>>(), PlacementVersion(1))
        .expect("plans");
    let load = skewed();
    let before = max_mean_ratio(&load, &first);
    assert!(before > 1.3, "uniform placement under skew: {before}");
    let seen = Observed {
        live: &live,
        current: Some(&first),
        load: &load,
        since_last: Some(Duration::from_secs(60)),
        settling: Duration::ZERO,
    };
    let r = decide(&shape(), &policy(), &seen, PlacementVersion(2)).expect("plans").expect("rebalances");
    assert_eq!(r.reason, Reason::Skew);
    assert!(r.spec.ratio_after < before, "{} !< {before}", r.spec.ratio_after);
    assert!((r.spec.ratio_before - before).abs() < 1e-12);
    let hot_replicas = r.spec.phy2log[0].iter().filter(|&&e| e == 0).count();
    assert!(hot_replicas > 1, "hot expert has {hot_replicas} replicas");

    // Too soon after the last one: nothing, even under skew.
    let soon = Observed { since_last: Some(Duration::from_secs(5)), ..seen };
    assert_eq!(decide(&shape(), &policy(), &soon, PlacementVersion(2)).expect("plans"), None);

    // Once rebalanced, the same load gives no further gain: nothing.
    let settled = Observed { current: Some(&r.spec), since_last: Some(Duration::from_secs(60)), ..seen };
    assert_eq!(decide(&shape(), &policy(), &settled, PlacementVersion(3)).expect("plans"), None);
}

#[test]
fn a_dead_worker_forces_a_placement_without_it_at_once() {
    let live = workers(3);
    let idle = vec![vec![0.0; 8]; 2];
    let first = plan(&shape(), &policy(), &idle, &live.iter().cloned().collect::<Vec<_>>(), PlacementVersion(4))
        .expect("plans");
    let mut left = live.clone();
    left.remove(&w("e1"));
    let seen = Observed {
        live: &left,
        current: Some(&first),
        load: &idle,
        since_last: Some(Duration::ZERO),
        settling: Duration::ZERO,
    };
    let r = decide(&shape(), &policy(), &seen, PlacementVersion(5)).expect("plans").expect("rebalances");
    assert_eq!(r.reason, Reason::WorkerLeft);
    let mut survivors = r.spec.workers.clone();
    survivors.sort();
    assert_eq!(survivors, vec![w("e0"), w("e2")]);
    // The survivors keep what they can: fewer loads than filling the positions in id order.
    let in_id_order = PlacementSpec { workers: survivors, ..r.spec.clone() };
    let kept = crate::assign::slots_to_load(&r.spec, Some(&first));
    let naive = crate::assign::slots_to_load(&in_id_order, Some(&first));
    assert!(kept <= naive, "{kept} loads with reordering, {naive} without");
    for row in &r.spec.phy2log {
        let present: BTreeSet<u32> = row.iter().copied().collect();
        assert_eq!(present.len(), 8, "every expert keeps a live replica");
    }
}

#[test]
fn the_first_placement_waits_for_the_settle_time_or_the_expected_workers() {
    let one = workers(1);
    let idle = vec![vec![0.0; 8]; 2];
    let seen = Observed { live: &one, current: None, load: &idle, since_last: None, settling: Duration::from_secs(1) };
    assert_eq!(decide(&shape(), &policy(), &seen, PlacementVersion(1)).expect("plans"), None, "settling");
    let expecting_two = Policy { expected_workers: Some(2), ..policy() };
    assert_eq!(decide(&shape(), &expecting_two, &seen, PlacementVersion(1)).expect("plans"), None);

    // The expected workers are live: no need to wait any longer.
    let two = workers(2);
    let both = Observed { live: &two, ..seen };
    let r = decide(&shape(), &expecting_two, &both, PlacementVersion(1)).expect("plans").expect("places");
    assert_eq!((r.reason, r.spec.workers.len()), (Reason::Initial, 2));

    // The settle time is over: whoever is live gets the placement.
    let settled = Observed { settling: Duration::from_secs(3), ..seen };
    let r = decide(&shape(), &expecting_two, &settled, PlacementVersion(1)).expect("plans").expect("places");
    assert_eq!((r.reason, r.spec.workers.clone()), (Reason::Initial, vec![w("e0")]));
    let r = decide(&shape(), &policy(), &settled, PlacementVersion(1)).expect("plans").expect("places");
    assert_eq!(r.reason, Reason::Initial);
}

#[test]
fn a_new_worker_gets_a_share_at_once_and_the_others_keep_theirs() {
    let three = workers(3);
    let idle = vec![vec![0.0; 8]; 2];
    let first = plan(&shape(), &policy(), &idle, &three.iter().cloned().collect::<Vec<_>>(), PlacementVersion(1))
        .expect("plans");
    let four = workers(4);
    // Idle, young placement: neither load nor the period would move anything.
    for load in [idle.clone(), vec![vec![10.0; 8]; 2]] {
        let seen = Observed {
            live: &four,
            current: Some(&first),
            load: &load,
            since_last: Some(Duration::from_secs(1)),
            settling: Duration::ZERO,
        };
        let r = decide(&shape(), &policy(), &seen, PlacementVersion(2)).expect("plans").expect("rebalances");
        assert_eq!(r.reason, Reason::WorkerJoined);
        r.spec.validate().expect("valid spec");
        let mut named = r.spec.workers.clone();
        named.sort();
        assert_eq!(named, four.iter().cloned().collect::<Vec<_>>());
        assert!(!r.spec.slots_of(&w("e3")).is_empty(), "the new worker hosts experts");
        // Least movement: no more loads than filling the positions in id order.
        let in_id_order = PlacementSpec { workers: named, ..r.spec.clone() };
        let kept = crate::assign::slots_to_load(&r.spec, Some(&first));
        let naive = crate::assign::slots_to_load(&in_id_order, Some(&first));
        assert!(kept <= naive, "{kept} loads with reordering, {naive} without");
    }

    // Once placed, the same membership changes nothing.
    let idle = vec![vec![0.0; 8]; 2];
    let joined = plan(&shape(), &policy(), &idle, &four.iter().cloned().collect::<Vec<_>>(), PlacementVersion(2))
        .expect("plans");
    let seen =
        Observed { live: &four, current: Some(&joined), load: &idle, since_last: None, settling: Duration::ZERO };
    assert_eq!(decide(&shape(), &policy(), &seen, PlacementVersion(3)).expect("plans"), None);
}

#[test]
fn idle_clusters_are_left_alone() {
    let live = workers(2);
    let idle = vec![vec![0.0; 8]; 2];
    let first = plan(&shape(), &policy(), &idle, &live.iter().cloned().collect::<Vec<_>>(), PlacementVersion(1))
        .expect("plans");
    let seen = Observed { live: &live, current: Some(&first), load: &idle, since_last: None, settling: Duration::ZERO };
    assert_eq!(decide(&shape(), &policy(), &seen, PlacementVersion(2)).expect("plans"), None);
    let none = BTreeSet::new();
    let nobody = Observed { live: &none, ..seen };
    assert!(matches!(decide(&shape(), &policy(), &nobody, PlacementVersion(2)), Err(PlanError::NoWorkers)));
}

#[test]
fn reassignment_keeps_chunks_with_their_hosts() {
    let live = workers(3);
    let order: Vec<WorkerId> = live.iter().cloned().collect();
    let first = plan(&shape(), &policy(), &skewed(), &order, PlacementVersion(1)).expect("plans");
    // The same chunks with the workers listed the other way round: reassignment restores
    // each chunk to its host, so nothing needs loading.
    let reversed = PlacementSpec { workers: order.iter().rev().cloned().collect(), ..first.clone() };
    let restored = crate::assign::keep_slots_in_place(reversed.clone(), &first);
    assert_eq!(crate::assign::slots_to_load(&restored, Some(&first)), 0);
    assert!(crate::assign::slots_to_load(&reversed, Some(&first)) > 0);
    assert_eq!(restored.phy2log, first.phy2log, "chunks unchanged");
}

#[test]
fn desired_workers_follow_the_load() {
    let p = policy(); // 1000 tokens/s per worker at 50%: 500 each
    assert_eq!(desired_workers(&p, 0.0), 1);
    assert_eq!(desired_workers(&p, 500.0), 1);
    assert_eq!(desired_workers(&p, 501.0), 2);
    assert_eq!(desired_workers(&p, 4_900.0), 10);
    assert_eq!(desired_workers(&p, f64::INFINITY), u32::MAX);
}

#[test]
fn nodes_that_do_not_divide_the_workers_fall_back_to_one() {
    let p = Policy { nodes: 2, ..policy() };
    let three: Vec<WorkerId> = workers(3).into_iter().collect();
    let spec = plan(&shape(), &p, &skewed(), &three, PlacementVersion(1)).expect("falls back to one node");
    spec.validate().expect("valid");
}

//! `expertmesh eplb`: the placement for a load table, as JSON, and clear errors.

use std::process::Command;

fn eplb(load: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("load.json");
    std::fs::write(&path, load).expect("write load");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_expertmesh"));
    cmd.arg("eplb").arg("--load").arg(&path).args(args);
    cmd.output().expect("run expertmesh eplb")
}

#[test]
fn prints_a_consistent_placement_and_the_hot_expert_gains_replicas() {
    // Two layers, 8 experts in 4 groups; expert 3 of layer 0 and expert 6 of layer 1 are hot.
    let load = "[[1,1,1,90,1,1,1,1],[2,2,2,2,2,2,60,2]]";
    let out = eplb(load, &["--replicas", "12", "--groups", "4", "--nodes", "2", "--workers", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["policy"], "Hierarchical");
    for (layer, hot) in [(0, 3), (1, 6)] {
        let logcnt: Vec<u64> = serde_json::from_value(v["logcnt"][layer].clone()).expect("logcnt");
        assert_eq!(logcnt.iter().sum::<u64>(), 12, "replica counts sum to the slots");
        assert!(logcnt[hot] > 1, "layer {layer}: the hot expert has replicas: {logcnt:?}");
        let phy2log: Vec<usize> = serde_json::from_value(v["phy2log"][layer].clone()).expect("phy2log");
        for (slot, &e) in phy2log.iter().enumerate() {
            let replicas: Vec<i64> = serde_json::from_value(v["log2phy"][layer][e].clone()).expect("log2phy");
            assert!(replicas.contains(&(slot as i64)), "log2phy inverts phy2log");
        }
        let after = v["max_mean_ratio"][layer].as_f64().expect("ratio");
        let before = v["max_mean_ratio_before"][layer].as_f64().expect("ratio before");
        assert!(after < before, "layer {layer}: max/mean {after} after vs {before} before");
        assert_eq!(v["worker_load"][layer].as_array().expect("loads").len(), 4);
    }
}

#[test]
fn bad_inputs_are_named() {
    let out = eplb("[[1,2,3,4]]", &["--replicas", "6", "--groups", "2", "--nodes", "1", "--workers", "4"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("num_replicas 6") && err.contains("num_workers 4"), "{err}");
    let out = eplb("{\"not\": \"a table\"}", &["--replicas", "4", "--groups", "1", "--nodes", "1", "--workers", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected a JSON array of layers"));
}

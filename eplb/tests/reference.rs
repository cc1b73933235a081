//! Bit-for-bit agreement with DeepSeek's `eplb.py` run under PyTorch: every case of
//! `reference/eplb_reference.json` (made by `reference/gen_reference.py`) must give the same
//! phy2log, log2phy and logcnt. The fixture is sensitive to tie order: with a stable sort in
//! place of the introsort port, 44 of its 79 cases differ.

use eplb::{Placement, Policy, rebalance};
use serde::Deserialize;

/// The fixture's `sorts` are checked by the unit tests of `src/introsort.rs`.
#[derive(Debug, Deserialize)]
struct Fixture {
    torch_version: String,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_gpus: usize,
    hierarchical: bool,
    weight: Vec<Vec<f64>>,
    phy2log: Vec<Vec<usize>>,
    logcnt: Vec<Vec<usize>>,
    /// log2phy with each expert's row cut to its `logcnt` live entries.
    log2phy_trimmed: Vec<Vec<Vec<i64>>>,
}

fn fixture() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/eplb_reference.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {path}: {e}"))
}

fn expected(case: &Case) -> Placement {
    let width = case.num_replicas - case.weight[0].len() + 1;
    let log2phy = case
        .log2phy_trimmed
        .iter()
        .map(|layer| {
            layer
                .iter()
                .map(|row| {
                    let mut padded = row.clone();
                    padded.resize(width, -1);
                    padded
                })
                .collect()
        })
        .collect();
    Placement { phy2log: case.phy2log.clone(), log2phy, logcnt: case.logcnt.clone() }
}

#[test]
fn matches_torch_reference() {
    let fixture = fixture();
    assert!(fixture.cases.len() >= 50, "fixture lost its cases");
    let mut failures = Vec::new();
    for case in &fixture.cases {
        assert_eq!(
            Policy::for_topology(case.num_groups, case.num_nodes) == Policy::Hierarchical,
            case.hierarchical,
            "{}: policy choice",
            case.name
        );
        let got = rebalance(&case.weight, case.num_replicas, case.num_groups, case.num_nodes, case.num_gpus)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let want = expected(case);
        let differing: Vec<&str> = [
            ("phy2log", got.phy2log == want.phy2log),
            ("log2phy", got.log2phy == want.log2phy),
            ("logcnt", got.logcnt == want.logcnt),
        ]
        .into_iter()
        .filter_map(|(what, same)| (!same).then_some(what))
        .collect();
        if !differing.is_empty() {
            failures.push(format!("{}: {} differ", case.name, differing.join(", ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from torch {}:\n{}",
        failures.len(),
        fixture.cases.len(),
        fixture.torch_version,
        failures.join("\n")
    );
}

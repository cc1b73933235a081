#!/usr/bin/env python3
"""Generate `eplb_reference.json`: DeepSeek EPLB outputs computed with PyTorch on the CPU.

The Rust crate must reproduce these bit for bit (phy2log, log2phy, logcnt), ties included.

    python3 eplb/tests/reference/gen_reference.py     # needs torch (any recent CPU build)

Two parts:
- `cases`: rebalance_experts on random, tie-heavy and degenerate inputs over a spread of
  (experts, groups, nodes, gpus, replicas) shapes, V3's included. `log2phy` is stored trimmed
  to each expert's `logcnt` live entries; the script asserts that the rest of every row is -1
  and the Rust test re-pads it to `num_replicas - num_experts + 1`.
- `sorts`: `tensor.sort(-1, descending=True).indices` on tie-heavy arrays. torch's CPU sort
  (stable=False) is libstdc++ `std::sort` (introsort), which is *not* stable past 16
  elements; the Rust port (`eplb/src/introsort.rs`) is checked against these directly,
  including adversarial inputs that drive introsort into its heapsort fallback.

Weights are float32 values written as JSON doubles, so they round-trip exactly. Integer
loads (token counts) make group sums exact in any summation order; float loads exercise the
f32 arithmetic, where torch's SIMD `sum` could in principle round a group total differently
from the Rust one (see the crate docs), which only matters for totals within an ulp.
"""

import json
import os
import platform
import sys
from typing import Tuple

import torch

# ---------------------------------------------------------------------------------------
# The reference algorithm. Same tensor operations as deepseek-ai/EPLB `eplb.py` (MIT
# license), current upstream: global policy = hierarchical with one group and one node,
# log2phy width = num_redundant_experts + 1. Keep every op as upstream has it: the point of
# this file is torch's exact float32 arithmetic and tie order.
# ---------------------------------------------------------------------------------------


def balanced_packing(weight: torch.Tensor, num_packs: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """[X, n] weights -> (pack index, rank in pack), each pack taking exactly n / num_packs."""
    num_layers, num_items = weight.shape
    assert num_items % num_packs == 0
    per_pack = num_items // num_packs
    if per_pack == 1:
        pack_index = torch.arange(num_items, dtype=torch.int64).expand(weight.shape)
        return pack_index, torch.zeros_like(weight, dtype=torch.int64)

    order = weight.float().sort(-1, descending=True).indices.cpu()
    pack_index = torch.full_like(weight, fill_value=-1, dtype=torch.int64, device="cpu")
    rank_in_pack = torch.full_like(pack_index, fill_value=-1)
    for row in range(num_layers):
        # Python int 0 at first, then 0-d float32 tensors: accumulation is float32.
        pack_weights = [0] * num_packs
        pack_items = [0] * num_packs
        for item in order[row]:
            # min() keeps the first of equal keys: ties go to the lowest pack index.
            pack = min((p for p in range(num_packs) if pack_items[p] < per_pack),
                       key=pack_weights.__getitem__)
            pack_index[row, item] = pack
            rank_in_pack[row, item] = pack_items[pack]
            pack_weights[pack] += weight[row, item]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_phy: int):
    """[X, num_log] -> (phy2log [X, num_phy], replica rank [X, num_phy], logcnt [X, num_log])."""
    n, num_log = weight.shape
    assert num_phy >= num_log
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(n, 1)
    rank = torch.zeros(n, num_phy, dtype=torch.int64)
    logcnt = torch.ones(n, num_log, dtype=torch.int64)
    rows = torch.arange(n, dtype=torch.int64)
    for slot in range(num_log, num_phy):
        hottest = (weight / logcnt).max(dim=-1).indices  # first maximum on ties
        phy2log[:, slot] = hottest
        rank[:, slot] = logcnt[rows, hottest]
        logcnt[rows, hottest] += 1
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand(perm.shape))
    return inv


def rebalance_experts_hierarchical(weight, num_physical_experts, num_groups, num_nodes, num_gpus):
    num_layers, num_logical_experts = weight.shape
    assert num_logical_experts % num_groups == 0
    group_size = num_logical_experts // num_groups
    assert num_groups % num_nodes == 0
    groups_per_node = num_groups // num_nodes
    assert num_gpus % num_nodes == 0
    assert num_physical_experts % num_gpus == 0
    phy_experts_per_gpu = num_physical_experts // num_gpus

    # 1. Pack groups onto nodes.
    tokens_per_group = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack_index, group_rank_in_pack = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack_index * groups_per_node + group_rank_in_pack) * group_size).unsqueeze(-1)
                + torch.arange(group_size, dtype=torch.int64)).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # 2. Replicate within each node: rows are (layer, node).
    tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, num_logical_experts // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes)

    # 3. Pack each node's physical experts onto its GPUs.
    tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack_index * phy_experts_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    pphy2mlog = (pphy2mlog.view(num_layers, num_nodes, -1)
                 + torch.arange(0, num_logical_experts, num_logical_experts // num_nodes).view(1, -1, 1)
                 ).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    num_layers, num_logical_experts = weight.shape
    weight = weight.float().cpu()
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    maxlogcnt = num_replicas - num_logical_experts + 1
    log2phy = torch.full((num_layers, num_logical_experts, maxlogcnt), -1, dtype=torch.int64)
    log2phy.view(num_layers, -1).scatter_(
        -1, phy2log * maxlogcnt + phyrank,
        torch.arange(num_replicas, dtype=torch.int64).expand(num_layers, -1))
    return phy2log, log2phy, logcnt


# ---------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------

def make_weight(dist: str, layers: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    if dist == "ties":  # four distinct values: ties everywhere
        return torch.randint(0, 4, (layers, experts), generator=gen).float()
    if dist == "counts":  # skewed integer token counts (heavy tail)
        u = torch.rand(layers, experts, generator=gen)
        return torch.floor(50.0 / (u + 0.01) ** 1.2).float()
    if dist == "float":  # non-integer float32 loads
        return (torch.rand(layers, experts, generator=gen) * 100.0).float()
    if dist == "pow2":  # w / cnt collides exactly with other experts' loads
        return (2.0 ** torch.randint(0, 7, (layers, experts), generator=gen)).float()
    if dist == "zeros":
        return torch.zeros(layers, experts)
    if dist == "equal":
        return torch.full((layers, experts), 7.0)
    if dist == "one_hot":  # a single hot expert per layer
        w = torch.ones(layers, experts)
        w[torch.arange(layers), torch.randint(0, experts, (layers,), generator=gen)] = 1000.0
        return w
    raise ValueError(dist)


ALL = ["ties", "counts", "float", "pow2", "zeros", "equal", "one_hot"]
BIG = ["ties", "counts", "float", "pow2"]

# name, layers, experts, groups, nodes, gpus, replicas, distributions
CONFIGS = [
    ("tiny_hier", 4, 8, 4, 2, 4, 12, ALL),            # hierarchical, 2 groups per node
    ("tiny_global", 4, 8, 4, 3, 6, 12, ALL),          # 4 % 3 != 0: global policy
    ("groups_eq_nodes", 3, 16, 4, 4, 8, 24, ALL),     # one group per node: packing shortcut
    ("one_slot_per_gpu", 3, 8, 2, 2, 12, 12, ALL),    # R == W: GPU packing shortcut
    ("no_redundancy", 3, 16, 4, 2, 4, 16, ALL),       # R == E
    ("single_node", 3, 32, 4, 1, 8, 40, ALL),         # hierarchical with one node
    ("many_replicas", 3, 4, 2, 1, 4, 20, ALL),        # log2phy width 17
    ("wide_pack", 2, 64, 1, 1, 2, 128, ALL),          # 64 items per pack: long sorts
    ("mid", 3, 64, 8, 2, 8, 80, ALL),
    ("v3_ep32", 2, 256, 8, 4, 32, 288, BIG),          # V3, 4 nodes x 8 GPUs: hierarchical
    ("v3_ep144", 2, 256, 8, 18, 144, 288, BIG),       # 8 % 18 != 0: global
    ("v3_ep64", 2, 256, 8, 8, 64, 320, BIG),          # one group per node
    ("v3_ep16", 2, 256, 8, 2, 16, 288, BIG),
]


# ---------------------------------------------------------------------------------------
# A port of libstdc++ std::sort, used only to build adversarial ("median-of-3 killer")
# inputs that push introsort into its heapsort fallback; torch's own output is recorded.
# ---------------------------------------------------------------------------------------

class _HeapCount:
    hits = 0


def _std_sort(v, comp):
    n = len(v)
    if n:
        _introsort_loop(v, 0, n, 2 * (n.bit_length() - 1), comp)
        _final_insertion_sort(v, 0, n, comp)


def _introsort_loop(v, first, last, depth, comp):
    while last - first > 16:
        if depth == 0:
            _HeapCount.hits += 1
            _heap_sort(v, first, last, comp)
            return
        depth -= 1
        mid = first + (last - first) // 2
        a, b, c = first + 1, mid, last - 1
        if comp(v[a], v[b]):
            s = b if comp(v[b], v[c]) else (c if comp(v[a], v[c]) else a)
        else:
            s = a if comp(v[a], v[c]) else (c if comp(v[b], v[c]) else b)
        v[first], v[s] = v[s], v[first]
        lo, hi = first + 1, last
        while True:
            while comp(v[lo], v[first]):
                lo += 1
            hi -= 1
            while comp(v[first], v[hi]):
                hi -= 1
            if not lo < hi:
                break
            v[lo], v[hi] = v[hi], v[lo]
            lo += 1
        _introsort_loop(v, lo, last, depth, comp)
        last = lo


def _final_insertion_sort(v, first, last, comp):
    for i in range(first + 1, last):
        val, j = v[i], i
        while j > first and comp(val, v[j - 1]):
            v[j] = v[j - 1]
            j -= 1
        v[j] = val


def _heap_sort(v, first, last, comp):
    n = last - first
    for parent in range((n - 2) // 2, -1, -1):
        _adjust_heap(v, first, parent, n, v[first + parent], comp)
    while last - first > 1:
        last -= 1
        val, v[last] = v[last], v[first]
        _adjust_heap(v, first, 0, last - first, val, comp)


def _adjust_heap(v, first, hole, n, val, comp):
    top = second = hole
    while second < (n - 1) // 2:
        second = 2 * (second + 1)
        if comp(v[first + second], v[first + second - 1]):
            second -= 1
        v[first + hole] = v[first + second]
        hole = second
    if n % 2 == 0 and second == (n - 2) // 2:
        second = 2 * (second + 1)
        v[first + hole] = v[first + second - 1]
        hole = second - 1
    parent = (hole - 1) // 2
    while hole > top and comp(v[first + parent], val):
        v[first + hole] = v[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    v[first + hole] = val


def killer_input(n: int):
    """McIlroy's adversary against median-of-3 quicksort, run on the port above."""
    gas = n
    val = [gas] * n
    state = {"solid": 0, "candidate": 0}

    def freeze(x):
        val[x] = state["solid"]
        state["solid"] += 1

    def comp(a, b):  # a sorts before b iff val[a] < val[b]
        x, y = a[1], b[1]
        if val[x] == gas and val[y] == gas:
            freeze(x if x == state["candidate"] else y)
        if val[x] == gas:
            state["candidate"] = x
        elif val[y] == gas:
            state["candidate"] = y
        return val[x] < val[y]

    _std_sort([(0, i) for i in range(n)], comp)
    return [float(n - val[i]) for i in range(n)]  # descending in weight == ascending in val


def sort_cases(gen: torch.Generator):
    cases = []
    for n in [1, 2, 15, 16, 17, 18, 31, 33, 64, 100, 144, 257, 288, 1000]:
        for k in ([2, 5, 1_000_000] if n < 1000 else [2]):
            w = torch.randint(0, k, (n,), generator=gen).float()
            cases.append({"name": f"random_n{n}_k{k}", "values": w.tolist()})
    for n in [300, 1000]:
        base = killer_input(n)
        for coarsen in [1, 2, 8]:
            vals = [float(int(x) // coarsen) for x in base]
            _HeapCount.hits = 0
            _std_sort([(x, i) for i, x in enumerate(vals)], lambda a, b: a[0] > b[0])
            cases.append({"name": f"killer_n{n}_c{coarsen}", "values": vals,
                          "heapsort_fallbacks": _HeapCount.hits})
    for case in cases:
        case["indices"] = torch.tensor(case["values"], dtype=torch.float32).sort(
            -1, descending=True).indices.tolist()
    return cases


def main() -> None:
    out_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eplb_reference.json")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(20250301)

    cases = []
    for name, layers, experts, groups, nodes, gpus, replicas, dists in CONFIGS:
        for dist in dists:
            weight = make_weight(dist, layers, experts, gen)
            phy2log, log2phy, logcnt = rebalance_experts(weight, replicas, groups, nodes, gpus)
            trimmed = []
            for layer in range(layers):
                rows = []
                for expert in range(experts):
                    row = log2phy[layer, expert].tolist()
                    cnt = int(logcnt[layer, expert])
                    assert all(x >= 0 for x in row[:cnt]) and all(x == -1 for x in row[cnt:])
                    rows.append(row[:cnt])
                trimmed.append(rows)
            cases.append({
                "name": f"{name}/{dist}",
                "num_replicas": replicas, "num_groups": groups, "num_nodes": nodes,
                "num_gpus": gpus,
                "hierarchical": groups % nodes == 0,
                "weight": weight.tolist(),
                "phy2log": phy2log.tolist(),
                "logcnt": logcnt.tolist(),
                "log2phy_trimmed": trimmed,
            })

    fixture = {
        "generator": "eplb/tests/reference/gen_reference.py",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cases": cases,
        "sorts": sort_cases(gen),
    }
    with open(out_path, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {out_path}: {len(cases)} cases, {len(fixture['sorts'])} sorts", file=sys.stderr)


if __name__ == "__main__":
    main()

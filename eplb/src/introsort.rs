//! Descending argsort that orders ties exactly as `torch.sort(-1, descending=True)` on the CPU.
//!
//! The reference sorts with torch's default `stable=False`, which on the CPU is libstdc++
//! `std::sort` (introsort) over (value, index) pairs compared by value alone. Introsort is not
//! stable past 16 elements, so equal loads come out in an order only the same algorithm
//! reproduces; that order decides which pack gets which item, so a stable sort would give a
//! different placement whenever loads tie (integer token counts, replicas of one expert).
//! This is a line-by-line port of libstdc++'s `__introsort_loop`, `__final_insertion_sort` and
//! heapsort fallback (`__partial_sort` with `middle == last`), checked against torch on
//! random, tie-heavy and adversarial inputs (`tests/reference.rs`).

/// Below this many elements introsort leaves a range to the final insertion sort
/// (libstdc++ `_S_threshold`).
const THRESHOLD: usize = 16;

/// One element: the key and its original position.
type Item = (f32, usize);

/// `comp(a, b)` of torch's `KeyValueCompDesc` without NaNs: `a` sorts before `b` iff greater.
#[inline]
fn before(a: &Item, b: &Item) -> bool {
    a.0 > b.0
}

/// Indices of `values` sorted by value descending, ties in torch's (unstable) order.
///
/// Callers guarantee no NaN (loads are validated); NaNs would not panic but would not match
/// torch, which sorts them first.
pub(crate) fn argsort_desc(values: &[f32]) -> Vec<usize> {
    let mut items: Vec<Item> = values.iter().copied().zip(0..).collect();
    std_sort(&mut items);
    items.into_iter().map(|(_, idx)| idx).collect()
}

fn std_sort(v: &mut [Item]) {
    let n = v.len();
    if n == 0 {
        return;
    }
    // std::__lg(n) * 2
    let depth_limit = 2 * (usize::BITS - 1 - n.leading_zeros()) as usize;
    introsort_loop(v, 0, n, depth_limit);
    final_insertion_sort(v, 0, n);
}

fn introsort_loop(v: &mut [Item], first: usize, mut last: usize, mut depth_limit: usize) {
    while last - first > THRESHOLD {
        if depth_limit == 0 {
            heap_sort(v, first, last);
            return;
        }
        depth_limit -= 1;
        let cut = unguarded_partition_pivot(v, first, last);
        introsort_loop(v, cut, last, depth_limit);
        last = cut;
    }
}

fn unguarded_partition_pivot(v: &mut [Item], first: usize, last: usize) -> usize {
    let mid = first + (last - first) / 2;
    move_median_to_first(v, first, first + 1, mid, last - 1);
    unguarded_partition(v, first + 1, last, first)
}

fn move_median_to_first(v: &mut [Item], result: usize, a: usize, b: usize, c: usize) {
    let median = if before(&v[a], &v[b]) {
        if before(&v[b], &v[c]) {
            b
        } else if before(&v[a], &v[c]) {
            c
        } else {
            a
        }
    } else if before(&v[a], &v[c]) {
        a
    } else if before(&v[b], &v[c]) {
        c
    } else {
        b
    };
    v.swap(result, median);
}

/// Hoare partition around `v[pivot]` (which lies outside `[first, last)`). Unguarded: the
/// median-of-three leaves an element on each side that stops the scans.
fn unguarded_partition(v: &mut [Item], mut first: usize, mut last: usize, pivot: usize) -> usize {
    loop {
        while before(&v[first], &v[pivot]) {
            first += 1;
        }
        last -= 1;
        while before(&v[pivot], &v[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        v.swap(first, last);
        first += 1;
    }
}

fn final_insertion_sort(v: &mut [Item], first: usize, last: usize) {
    if last - first > THRESHOLD {
        insertion_sort(v, first, first + THRESHOLD);
        // Unguarded: introsort left the range's first element (in sort order) among the
        // first THRESHOLD positions, so the scan below never runs past `first`.
        for i in first + THRESHOLD..last {
            unguarded_linear_insert(v, i);
        }
    } else {
        insertion_sort(v, first, last);
    }
}

fn insertion_sort(v: &mut [Item], first: usize, last: usize) {
    if first == last {
        return;
    }
    for i in first + 1..last {
        if before(&v[i], &v[first]) {
            v[first..=i].rotate_right(1);
        } else {
            unguarded_linear_insert(v, i);
        }
    }
}

fn unguarded_linear_insert(v: &mut [Item], mut last: usize) {
    let val = v[last];
    let mut next = last - 1;
    while before(&val, &v[next]) {
        v[last] = v[next];
        last = next;
        next -= 1;
    }
    v[last] = val;
}

/// `std::__partial_sort(first, last, last)`: make_heap, then sort_heap.
fn heap_sort(v: &mut [Item], first: usize, mut last: usize) {
    let len = last - first;
    if len >= 2 {
        let mut parent = (len - 2) / 2;
        loop {
            let value = v[first + parent];
            adjust_heap(v, first, parent, len, value);
            if parent == 0 {
                break;
            }
            parent -= 1;
        }
    }
    while last - first > 1 {
        last -= 1;
        let value = v[last];
        v[last] = v[first];
        adjust_heap(v, first, 0, last - first, value);
    }
}

fn adjust_heap(v: &mut [Item], first: usize, mut hole: usize, len: usize, value: Item) {
    let top = hole;
    let mut second = hole;
    while second < (len - 1) / 2 {
        second = 2 * (second + 1);
        if before(&v[first + second], &v[first + second - 1]) {
            second -= 1;
        }
        v[first + hole] = v[first + second];
        hole = second;
    }
    if len & 1 == 0 && second == (len - 2) / 2 {
        second = 2 * (second + 1);
        v[first + hole] = v[first + second - 1];
        hole = second - 1;
    }
    // std::__push_heap
    while hole > top {
        let parent = (hole - 1) / 2;
        if !before(&v[first + parent], &value) {
            break;
        }
        v[first + hole] = v[first + parent];
        hole = parent;
    }
    v[first + hole] = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_sorted_desc(values: &[f32], order: &[usize]) -> bool {
        order.windows(2).all(|w| values[w[0]] >= values[w[1]])
    }

    fn is_permutation(order: &[usize]) -> bool {
        let mut seen = vec![false; order.len()];
        order.iter().all(|&i| i < seen.len() && !std::mem::replace(&mut seen[i], true))
    }

    #[test]
    fn short_inputs_are_stable() {
        // Up to 16 elements std::sort is a plain insertion sort: equal keys keep their order.
        let values = [1.0, 3.0, 1.0, 3.0, 2.0, 1.0];
        assert_eq!(argsort_desc(&values), vec![1, 3, 4, 0, 2, 5]);
        assert_eq!(argsort_desc(&[]), Vec::<usize>::new());
        assert_eq!(argsort_desc(&[5.0]), vec![0]);
    }

    #[test]
    fn seventeen_equal_keys_are_not_stable() {
        // Partitioning swaps equal keys: this is torch's order for 17 zeros
        // (`torch.zeros(17).sort(descending=True).indices`), not 0..17.
        let order = argsort_desc(&[0.0; 17]);
        assert_eq!(order, vec![8, 16, 15, 14, 13, 12, 11, 10, 9, 0, 7, 6, 5, 4, 3, 2, 1]);
    }

    #[test]
    fn sorts_descending_and_permutes() {
        for n in [17, 100, 1000] {
            let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32).collect();
            let order = argsort_desc(&values);
            assert!(is_permutation(&order));
            assert!(is_sorted_desc(&values, &order));
        }
    }

    /// torch's own order on random, tie-heavy and adversarial inputs, recorded by
    /// `tests/reference/gen_reference.py`; some reach the heapsort fallback.
    #[test]
    fn matches_torch_sort_fixture() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/eplb_reference.json");
        let text = std::fs::read_to_string(path).expect("fixture is committed");
        let fixture: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
        let sorts = fixture["sorts"].as_array().expect("fixture has sorts");
        assert!(sorts.len() >= 40);
        let mut fallbacks = 0;
        for case in sorts {
            let values: Vec<f32> = serde_json::from_value(case["values"].clone()).expect("values");
            let want: Vec<usize> = serde_json::from_value(case["indices"].clone()).expect("indices");
            assert_eq!(argsort_desc(&values), want, "{}", case["name"]);
            fallbacks += case["heapsort_fallbacks"].as_u64().unwrap_or(0);
        }
        assert!(fallbacks > 0, "no fixture case reaches the heapsort fallback");
    }

    #[test]
    fn heapsort_fallback_sorts() {
        let mut v: Vec<Item> = (0..50).map(|i| (((i * 31) % 17) as f32, i)).collect();
        heap_sort(&mut v, 3, 45);
        assert!(v[3..45].windows(2).all(|w| w[0].0 >= w[1].0));
    }
}

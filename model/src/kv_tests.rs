//! Tests of the KV codec: the transfer format, a round-trip property over random shapes and
//! chunk sizes, and one test per way a push can be refused.

use super::*;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use std::collections::VecDeque;

/// A cache of 1024 tokens with the push's row geometry.
fn layout_for(shape: KvShape) -> CacheLayout {
    CacheLayout { num_layers: shape.num_layers, latent_dim: shape.latent_dim, block_size: 16, num_blocks: 64 }
}

const SHAPE: KvShape = KvShape { num_tokens: 5, latent_dim: 2, num_layers: 3 };

fn rows(layer: usize, shape: KvShape) -> LayerRows {
    let data = (0..shape.num_tokens * shape.latent_dim).map(|i| (i + 100 * layer) as f32).collect();
    LayerRows::new(layer, shape.latent_dim, data).expect("whole rows")
}

fn header(shape: KvShape) -> KvPart {
    KvPart::Header { request_id: 42, shape }
}

fn commit() -> KvCommit {
    KvCommit {
        tokens: vec![1, 2, 3, 4, 5, 9],
        prompt_len: 5,
        prompt_logits_top: vec![(9, 1.5)],
        mtp_hidden: Vec::new(),
    }
}

fn chunk(layer: usize, first_token: usize, num_rows: usize) -> KvPart {
    KvPart::Layer(LayerChunk { layer, first_token, data: vec![0; num_rows * SHAPE.row_bytes()] })
}

/// A reassembly of SHAPE that took the header and `parts`, each accepted.
fn after(parts: Vec<KvPart>) -> Reassembly {
    let mut r = Reassembly::new(layout_for(SHAPE));
    r.accept(header(SHAPE)).expect("header");
    for p in parts {
        r.accept(p).expect("accepted");
    }
    r
}

/// Uniform in `[0, n)` (the modulo bias is irrelevant here).
fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn the_transfer_format_is_whole_little_endian_f32_rows() {
    let rows = LayerRows::new(2, 2, vec![1.0, -2.5, 0.0, f32::MAX, -0.0, 3.25]).expect("3 rows");
    assert_eq!((rows.layer(), rows.num_tokens(), rows.latent_dim(), rows.wire_bytes()), (2, 3, 2, 24));
    // 17 bytes hold two 8-byte rows.
    let chunks: Vec<LayerChunk> = chunk_layer(&rows, 17).collect();
    let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    assert_eq!(
        chunks,
        [
            LayerChunk { layer: 2, first_token: 0, data: le(&[1.0, -2.5, 0.0, f32::MAX]) },
            LayerChunk { layer: 2, first_token: 2, data: le(&[-0.0, 3.25]) },
        ]
    );
    assert_eq!(&chunks[0].data[..4], &[0, 0, 0x80, 0x3f], "1.0 little-endian");
    // A limit under one row still sends one row per chunk.
    assert_eq!(chunk_layer(&rows, 1).map(|c| c.first_token).collect::<Vec<_>>(), [0, 1, 2]);
    let empty = LayerRows::new(0, 4, Vec::new()).expect("no rows");
    assert_eq!(chunk_layer(&empty, 100).count(), 0);
}

#[test]
fn chunking_then_reassembly_is_the_identity() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x6b76);
    for case in 0..400 {
        let shape = KvShape {
            num_tokens: 1 + below(&mut rng, 70),
            latent_dim: 1 + below(&mut rng, 12),
            num_layers: 1 + below(&mut rng, 5),
        };
        let row_bytes = shape.row_bytes();
        // From under one row to more than a whole layer.
        let max_bytes = 1 + below(&mut rng, shape.layer_bytes() + 2 * row_bytes);
        let per_chunk = (max_bytes / row_bytes).max(1);
        let what = format!("case {case}: {shape:?}, chunks of at most {max_bytes} bytes");
        let layers: Vec<LayerRows> = (0..shape.num_layers)
            .map(|l| {
                let data = (0..shape.num_tokens * shape.latent_dim).map(|_| f32::from_bits(rng.next_u32())).collect();
                LayerRows::new(l, shape.latent_dim, data).expect("whole rows")
            })
            .collect();
        let mut queues: Vec<VecDeque<LayerChunk>> =
            layers.iter().map(|r| chunk_layer(r, max_bytes).collect()).collect();
        for (l, q) in queues.iter().enumerate() {
            assert_eq!(q.len(), shape.num_tokens.div_ceil(per_chunk), "{what}: layer {l} in the fewest chunks");
            let mut next = 0;
            for c in q {
                assert_eq!((c.layer, c.first_token), (l, next), "{what}: in order, no gap");
                assert!(c.data.len().is_multiple_of(row_bytes), "{what}: whole rows");
                assert!(c.data.len() <= per_chunk * row_bytes, "{what}: within the limit");
                next += c.data.len() / row_bytes;
            }
            assert_eq!(next, shape.num_tokens, "{what}: every row");
        }
        // Each layer's chunks in order, the layers interleaved at random.
        let mut parts = vec![KvPart::Header { request_id: case, shape }];
        loop {
            let open: Vec<usize> = (0..queues.len()).filter(|&l| !queues[l].is_empty()).collect();
            if open.is_empty() {
                break;
            }
            let l = open[below(&mut rng, open.len())];
            parts.extend(queues[l].pop_front().map(KvPart::Layer));
        }
        parts.push(KvPart::Commit(commit()));

        let mut r = Reassembly::new(layout_for(shape));
        let mut got: Vec<Option<LayerRows>> = vec![None; shape.num_layers];
        let mut committed = false;
        for part in parts {
            match r.accept(part).unwrap_or_else(|e| panic!("{what}: {e}")) {
                Received::Header { request_id, shape: s } => {
                    assert_eq!((request_id, s), (case, shape), "{what}");
                    assert_eq!(r.request_id(), Some(case));
                }
                Received::Partial => {}
                Received::Layer { request_id, rows } => {
                    assert_eq!(request_id, case);
                    assert!(got[rows.layer()].is_none(), "{what}: layer {} handed out twice", rows.layer());
                    let layer = rows.layer();
                    got[layer] = Some(rows);
                }
                Received::Commit { request_id, commit: c } => {
                    assert_eq!((request_id, c), (case, commit()), "{what}");
                    committed = true;
                }
            }
        }
        assert!(committed, "{what}");
        assert_eq!(r.finish(), Ok(shape.total_bytes()), "{what}");
        for (want, got) in layers.iter().zip(&got) {
            let got = got.as_ref().unwrap_or_else(|| panic!("{what}: layer {} never completed", want.layer()));
            assert_eq!((got.layer(), got.latent_dim()), (want.layer(), want.latent_dim()), "{what}");
            assert_eq!(bits(got.data()), bits(want.data()), "{what}: layer {} bit for bit", want.layer());
        }
    }
}

#[test]
fn rows_must_be_whole() {
    assert_eq!(LayerRows::new(3, 4, vec![0.0; 6]), Err(KvError::RowWidth { layer: 3, values: 6, latent_dim: 4 }));
    assert_eq!(LayerRows::new(0, 0, Vec::new()), Err(KvError::RowWidth { layer: 0, values: 0, latent_dim: 0 }));
    let e = LayerRows::new(3, 4, vec![0.0; 6]).expect_err("partial row").to_string();
    assert!(e.contains("layer 3") && e.contains("6 values"), "{e}");
}

#[test]
fn a_layer_of_the_wrong_shape_is_not_part_of_the_push() {
    SHAPE.check(&rows(2, SHAPE)).expect("a whole layer");
    assert_eq!(SHAPE.check(&rows(3, SHAPE)), Err(KvError::NoSuchLayer { layer: 3, num_layers: 3 }));
    let short = KvShape { num_tokens: 4, ..SHAPE };
    assert_eq!(
        SHAPE.check(&rows(1, short)),
        Err(KvError::WrongRows { layer: 1, num_tokens: 4, latent_dim: 2, want_tokens: 5, want_dim: 2 })
    );
    let wide = LayerRows::new(1, 5, vec![0.0; 10]).expect("two rows of 5");
    assert_eq!(
        SHAPE.check(&wide),
        Err(KvError::WrongRows { layer: 1, num_tokens: 2, latent_dim: 5, want_tokens: 5, want_dim: 2 })
    );
}

#[test]
fn a_push_must_start_with_its_header() {
    for first in [chunk(0, 0, 1), KvPart::Commit(commit())] {
        let mut r = Reassembly::new(layout_for(SHAPE));
        assert_eq!(r.accept(first), Err(KvError::NoHeader));
        assert_eq!(r.request_id(), None);
    }
    assert_eq!(KvError::NoHeader.to_string(), "the stream must start with a KvHeader");
}

#[test]
fn a_second_header_is_refused() {
    let mut r = after(vec![chunk(0, 0, 1)]);
    assert_eq!(r.accept(header(SHAPE)), Err(KvError::SecondHeader));
}

#[test]
fn a_header_of_another_model_is_refused() {
    for (num_layers, latent_dim) in [(5, 2), (1, 2), (3, 3)] {
        let mut r = Reassembly::new(layout_for(SHAPE));
        let shape = KvShape { num_layers, latent_dim, ..SHAPE };
        assert_eq!(
            r.accept(header(shape)),
            Err(KvError::ShapeMismatch { num_layers, latent_dim, want_layers: 3, want_dim: 2 })
        );
    }
    let e = KvError::ShapeMismatch { num_layers: 5, latent_dim: 2, want_layers: 3, want_dim: 2 }.to_string();
    assert_eq!(e, "cache shape 5 layers x 2 does not match this model's 3 x 2");
}

#[test]
fn values_round_trip_and_partial_values_are_refused() {
    let values = [1.5f32, -0.0, f32::MAX];
    assert_eq!(decode("v", &encode(&values)).map(|v| bits(&v)), Ok(bits(&values)));
    let e = decode("KvCommit.mtp_hidden", &[0; 6]).expect_err("6 bytes");
    assert_eq!(e.to_string(), "KvCommit.mtp_hidden: 6 bytes are not whole little-endian f32 values");
}

/// One layer more is a sender's MTP layer that this side does not keep: received, counted
/// and dropped. One layer fewer is left to the engine (a push without the MTP layer).
#[test]
fn an_mtp_layer_more_or_less_is_accepted() {
    let more = KvShape { num_layers: 4, ..SHAPE };
    let mut r = Reassembly::new(layout_for(SHAPE));
    r.accept(header(more)).expect("one layer more");
    for layer in 0..4 {
        let got = r.accept(KvPart::Layer(chunk_layer(&rows(layer, more), usize::MAX).next().expect("a chunk")));
        match got.expect("accepted") {
            Received::Layer { rows, .. } => assert!(rows.layer() < 3),
            Received::Partial => assert_eq!(layer, 3, "only the extra layer is dropped"),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(r.accept(KvPart::Commit(commit())), Ok(Received::Commit { .. })));
    assert_eq!(r.finish(), Ok(4 * more.layer_bytes() as u64));
    let mut r = Reassembly::new(layout_for(SHAPE));
    r.accept(header(KvShape { num_layers: 2, ..SHAPE })).expect("one layer fewer");
}

#[test]
fn a_header_without_tokens_is_refused() {
    let mut r = Reassembly::new(layout_for(SHAPE));
    assert_eq!(r.accept(header(KvShape { num_tokens: 0, ..SHAPE })), Err(KvError::NoTokens));
}

#[test]
fn a_header_beyond_the_cache_is_refused_before_any_allocation() {
    let mut r = Reassembly::new(layout_for(SHAPE));
    let huge = KvShape { num_tokens: usize::MAX / 2, ..SHAPE };
    assert_eq!(r.accept(header(huge)), Err(KvError::TooManyTokens { num_tokens: usize::MAX / 2, capacity: 1024 }));
    let mut r = Reassembly::new(layout_for(SHAPE));
    r.accept(header(KvShape { num_tokens: 1024, ..SHAPE })).expect("the whole cache");
}

#[test]
fn a_chunk_of_a_layer_the_model_lacks_is_refused() {
    let mut r = after(vec![]);
    assert_eq!(r.accept(chunk(3, 0, 1)), Err(KvError::NoSuchLayer { layer: 3, num_layers: 3 }));
}

#[test]
fn a_layer_sent_twice_is_refused() {
    let mut r = after(vec![chunk(1, 0, 5)]);
    assert_eq!(r.accept(chunk(1, 0, 5)), Err(KvError::DuplicateLayer { layer: 1 }));
    assert_eq!(r.accept(chunk(1, 5, 1)), Err(KvError::DuplicateLayer { layer: 1 }));
}

#[test]
fn a_chunk_out_of_order_is_refused() {
    // A gap: the chunk of tokens 2.. while 0..2 is missing.
    let mut r = after(vec![]);
    assert_eq!(r.accept(chunk(0, 2, 1)), Err(KvError::OutOfOrder { layer: 0, first_token: 2, expected: 0 }));
    // A chunk repeated.
    let mut r = after(vec![chunk(0, 0, 2)]);
    assert_eq!(r.accept(chunk(0, 0, 2)), Err(KvError::OutOfOrder { layer: 0, first_token: 0, expected: 2 }));
}

#[test]
fn a_chunk_of_partial_rows_is_refused() {
    let mut r = after(vec![]);
    let part = KvPart::Layer(LayerChunk { layer: 2, first_token: 0, data: vec![0; 12] });
    assert_eq!(r.accept(part), Err(KvError::PartialRow { layer: 2, bytes: 12, row_bytes: 8 }));
}

#[test]
fn more_rows_than_announced_are_refused() {
    let mut r = after(vec![]);
    assert_eq!(r.accept(chunk(0, 0, 6)), Err(KvError::TooManyRows { layer: 0, num_tokens: 5 }));
    let mut r = after(vec![chunk(0, 0, 3)]);
    assert_eq!(r.accept(chunk(0, 3, 3)), Err(KvError::TooManyRows { layer: 0, num_tokens: 5 }));
}

#[test]
fn a_commit_before_every_row_arrived_is_refused() {
    // Layer 0 whole, layer 1 missing its last chunk, layer 2 never sent.
    let mut r = after(vec![chunk(0, 0, 5), chunk(1, 0, 3)]);
    assert_eq!(r.accept(KvPart::Commit(commit())), Err(KvError::MissingRows { layer: 1, received: 3, num_tokens: 5 }));
    let mut r = after(vec![chunk(0, 0, 5), chunk(1, 0, 5)]);
    assert_eq!(r.accept(KvPart::Commit(commit())), Err(KvError::MissingRows { layer: 2, received: 0, num_tokens: 5 }));
    r.accept(chunk(2, 0, 5)).expect("the last layer");
    assert_eq!(r.accept(KvPart::Commit(commit())), Ok(Received::Commit { request_id: 42, commit: commit() }));
}

#[test]
fn nothing_follows_the_commit() {
    let mut r = after(vec![chunk(0, 0, 5), chunk(1, 0, 5), chunk(2, 0, 5), KvPart::Commit(commit())]);
    assert_eq!(r.finish(), Ok(3 * 40));
    assert_eq!(r.accept(chunk(0, 0, 1)), Err(KvError::AfterCommit));
    assert_eq!(r.accept(header(SHAPE)), Err(KvError::AfterCommit));
}

#[test]
fn a_stream_that_ends_before_the_commit_is_incomplete() {
    assert_eq!(Reassembly::new(layout_for(SHAPE)).finish(), Err(KvError::NoCommit));
    let r = after(vec![chunk(0, 0, 5), chunk(1, 0, 5), chunk(2, 0, 5)]);
    assert_eq!(r.finish(), Err(KvError::NoCommit));
    assert_eq!(r.bytes_received(), 3 * 40);
}

#[test]
fn partial_chunks_complete_a_layer_exactly_once() {
    let mut r = after(vec![]);
    let want = rows(1, SHAPE);
    let mut out = Vec::new();
    for c in chunk_layer(&want, 16) {
        out.push(r.accept(KvPart::Layer(c)).expect("in order"));
    }
    assert_eq!(out, [Received::Partial, Received::Partial, Received::Layer { request_id: 42, rows: want }]);
}

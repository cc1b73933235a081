//! Speculative decoding with the checkpoint's MTP layer against transformers and against
//! decoding without it: the MTP layer's logits (transformers' `MtpModel`), greedy tokens
//! identical with 1..3 drafts alone and batched, the draft/accept counts a teacher-forced
//! pass predicts, and sampling that follows the target distribution (a chi-square test that
//! passes for rejection sampling and fails for a subtly wrong acceptance rule).

mod common;

use common::{AllOk, expected, load};
use model::{
    AcceptRule, CacheLayout, Engine, EngineOptions, ExpertBackend, LatentCache, LogitsWanted, Model, Pass,
    SamplingParams, Segment, SeqId, WeightDtype,
};
use std::collections::HashMap;
use std::sync::Arc;

const MTP_FIXTURES: [&str; 2] = ["v3_mtp", "default_model"];

fn options(speculative_tokens: usize) -> EngineOptions {
    EngineOptions { cache_tokens: 4096, block_size: 4, speculative_tokens, ..EngineOptions::default() }
}

/// Greedy for exactly `n` tokens (no stop token can end it early).
fn greedy(n: usize, vocab: usize) -> SamplingParams {
    SamplingParams { max_new_tokens: n, stop_token_ids: vec![vocab as u32], ..SamplingParams::default() }
}

/// Runs every prompt to completion in one batch; the generated tokens and the summed
/// (drafted, accepted) counts per sequence.
fn run_batch(engine: &mut Engine, prompts: &[Vec<u32>], params: &[SamplingParams]) -> Vec<(Vec<u32>, usize, usize)> {
    let ids: Vec<SeqId> = (0..prompts.len() as u64).map(|i| SeqId(1000 + i)).collect();
    for ((id, p), params) in ids.iter().zip(prompts).zip(params) {
        engine.add_sequence(*id, p.clone(), params.clone(), 0).expect("add");
    }
    let mut counts = vec![(0, 0); ids.len()];
    let mut running: Vec<SeqId> = Vec::new();
    for out in engine.prefill(&ids).all_ok("prefill") {
        if out.finish.is_none() {
            running.push(out.seq);
        }
    }
    while !running.is_empty() {
        let outs = engine.decode_step(&running).all_ok("decode");
        for out in &outs {
            let i = (out.seq.0 - 1000) as usize;
            assert!(out.tokens.len() <= out.accepted_tokens + 1 && out.accepted_tokens <= out.draft_tokens);
            counts[i].0 += out.draft_tokens;
            counts[i].1 += out.accepted_tokens;
        }
        running = outs.iter().filter(|o| o.finish.is_none()).map(|o| o.seq).collect();
    }
    ids.iter()
        .zip(counts)
        .map(|(id, (d, a))| {
            let tokens = engine.generated(*id).expect("sequence").to_vec();
            engine.release(*id).expect("release");
            (tokens, d, a)
        })
        .collect()
}

/// The MTP layer's logits at every prompt position, as the engine computes them: the main
/// model's final-normed hidden states, then the MTP layer over (h_i, prompt[i + 1]).
fn mtp_logits(model: &Model, experts: &dyn ExpertBackend, prompt: &[u32]) -> Vec<f32> {
    let c = &model.config;
    let layout =
        CacheLayout { num_layers: c.num_hidden_layers + 1, latent_dim: c.latent_dim(), block_size: 4, num_blocks: 64 };
    let mut cache = LatentCache::new(layout).expect("cache");
    let mut table = cache.allocate(layout.blocks_for(prompt.len())).expect("blocks");
    table.reverse();
    let seg = Segment { tokens: prompt, start_pos: 0, block_table: &table, logits: LogitsWanted::Last };
    let out =
        model.forward_with(&mut cache, &[seg], experts, Pass { hidden: true, ..Pass::default() }).expect("forward");
    let n = prompt.len() - 1;
    let h = c.hidden_size;
    let seg = Segment { tokens: &prompt[1..], start_pos: 0, block_table: &table, logits: LogitsWanted::All };
    let rows = model.mtp_forward(&mut cache, &[seg], &out.hidden[0][..n * h], experts, None).expect("mtp");
    model.mtp_logits(&rows[0], n)
}

#[test]
fn the_mtp_layer_matches_transformers() {
    for name in MTP_FIXTURES {
        let (model, experts) = load(name, WeightDtype::F32);
        assert!(model.has_mtp(), "{name} has an MTP layer");
        let vocab = model.config.vocab_size;
        for (ci, case) in expected(name).cases.iter().enumerate() {
            let mtp = case.mtp.as_ref().expect("MTP fixtures record the MTP layer");
            let logits = mtp_logits(&model, experts.as_ref(), &case.prompt_ids);
            let am: Vec<u32> = logits.chunks_exact(vocab).map(model::sampling::argmax).collect();
            assert_eq!(am, mtp.argmax, "{name} case {ci}: MTP argmax per position");
            for p in &mtp.logits {
                let row = &logits[p.position * vocab..(p.position + 1) * vocab];
                let err = row.iter().zip(&p.values).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err <= 1e-4, "{name} case {ci}: MTP logits at {} differ by {err}", p.position);
            }
        }
    }
}

#[test]
fn greedy_tokens_with_speculation_equal_those_without() {
    for name in MTP_FIXTURES {
        for dtype in [WeightDtype::F32, WeightDtype::Auto] {
            let (model, experts) = load(name, dtype);
            let vocab = model.config.vocab_size;
            let cases = expected(name).cases;
            let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
            let n = cases[0].greedy.len();
            let params = vec![greedy(n, vocab); prompts.len()];
            let mut plain = common::engine(&model, &experts, options(0));
            let want: Vec<Vec<u32>> = prompts
                .iter()
                .map(|p| run_batch(&mut plain, std::slice::from_ref(p), &params[..1]).remove(0).0)
                .collect();
            if dtype == WeightDtype::F32 {
                let greedy: Vec<Vec<u32>> = cases.iter().map(|c| c.greedy.clone()).collect();
                assert_eq!(want, greedy, "{name}: greedy tokens against transformers");
            }
            for k in 1..=3 {
                let mut spec = common::engine(&model, &experts, options(k));
                let mut accepted = 0;
                for (p, want) in prompts.iter().zip(&want) {
                    let (got, _, a) = run_batch(&mut spec, std::slice::from_ref(p), &params[..1]).remove(0);
                    assert_eq!(&got, want, "{name} {dtype:?}: {k} speculative tokens, alone");
                    accepted += a;
                }
                assert!(name != "default_model" || accepted > 0, "{name} {dtype:?}: some drafts are accepted");
                // Batched, with different lengths (some sequences run out of room to draft).
                let mixed: Vec<SamplingParams> = (0..prompts.len()).map(|i| greedy(n - 5 * i, vocab)).collect();
                let got = run_batch(&mut spec, &prompts, &mixed);
                for (i, (g, _, _)) in got.iter().enumerate() {
                    assert_eq!(g[..], want[i][..n - 5 * i], "{name} {dtype:?}: {k} speculative tokens, batched");
                }
            }
        }
    }
}

/// A sequence imported without MTP rows decodes without speculation beside sequences that
/// speculate; with its MTP rows and state it speculates from its first step.
#[test]
fn sequences_that_do_not_speculate_share_the_batch() {
    let (model, experts) = load("default_model", WeightDtype::Auto);
    let vocab = model.config.vocab_size;
    let prompts: Vec<Vec<u32>> = expected("default_model").cases.iter().map(|c| c.prompt_ids.clone()).collect();
    let n = 24;
    let mut plain = common::engine(&model, &experts, options(0));
    let want = run_batch(&mut plain, &prompts, &vec![greedy(n, vocab); prompts.len()]);
    let mut spec = common::engine(&model, &experts, options(2));
    // Prefilled elsewhere: by an engine without the MTP layer, and by one with it.
    let mut imported = Vec::new();
    for (from, id) in [(&mut plain, SeqId(1)), (&mut common::engine(&model, &experts, options(2)), SeqId(2))] {
        from.add_sequence(id, prompts[0].clone(), greedy(n, vocab), 0).expect("add");
        let first = from.prefill(&[id]).all_ok("prefill")[0].tokens[0];
        let export = from.export_cache(id).expect("export");
        from.release(id).expect("release");
        let tokens: Vec<u32> = prompts[0].iter().copied().chain([first]).collect();
        spec.import_sequence(id, tokens, prompts[0].len(), greedy(n, vocab), &export).expect("import");
        imported.push(id);
    }
    spec.add_sequence(SeqId(3), prompts[1].clone(), greedy(n, vocab), 0).expect("add");
    spec.prefill(&[SeqId(3)]).all_ok("prefill");
    let ids = [SeqId(1), SeqId(2), SeqId(3)];
    let mut drafted = HashMap::new();
    let mut running = ids.to_vec();
    while !running.is_empty() {
        let outs = spec.decode_step(&running).all_ok("decode");
        for o in &outs {
            *drafted.entry(o.seq).or_insert(0) += o.draft_tokens;
        }
        running = outs.iter().filter(|o| o.finish.is_none()).map(|o| o.seq).collect();
    }
    assert_eq!(drafted[&SeqId(1)], 0, "no MTP rows: no drafts");
    assert!(drafted[&SeqId(2)] > 0 && drafted[&SeqId(3)] > 0);
    assert_eq!(spec.generated(SeqId(1)).expect("seq"), &want[0].0[..]);
    assert_eq!(spec.generated(SeqId(2)).expect("seq"), &want[0].0[..]);
    assert_eq!(spec.generated(SeqId(3)).expect("seq"), &want[1].0[..]);
}

/// An MTP state of the wrong size or with non-finite values is refused, and the reservation
/// freed: the push is bad, not the engine.
#[test]
fn a_bad_mtp_state_in_an_import_is_refused() {
    let (model, experts) = load("default_model", WeightDtype::Auto);
    let vocab = model.config.vocab_size;
    let prompt = expected("default_model").cases[0].prompt_ids.clone();
    let mut from = common::engine(&model, &experts, options(1));
    from.add_sequence(SeqId(1), prompt.clone(), greedy(8, vocab), 0).expect("add");
    let first = from.prefill(&[SeqId(1)]).all_ok("prefill")[0].tokens[0];
    let good = from.export_cache(SeqId(1)).expect("export");
    assert_eq!(good.mtp_hidden.len(), model.config.hidden_size);
    let tokens: Vec<u32> = prompt.iter().copied().chain([first]).collect();
    let mut to = common::engine(&model, &experts, options(1));
    let free = to.free_blocks();
    for bad in [vec![0.5; 3], vec![f32::NAN; model.config.hidden_size]] {
        let export = model::SequenceCacheExport { mtp_hidden: bad, ..good.clone() };
        let e = to.import_sequence(SeqId(2), tokens.clone(), prompt.len(), greedy(8, vocab), &export);
        let e = e.expect_err("a bad MTP state").to_string();
        assert!(e.contains("MTP state"), "{e}");
        assert_eq!(to.free_blocks(), free, "the reservation is returned");
    }
    to.import_sequence(SeqId(2), tokens, prompt.len(), greedy(8, vocab), &good).expect("the good one imports");
}

/// With one draft per step: a draft made by the MTP layer at position i is accepted iff its
/// argmax over the teacher-forced sequence (transformers' MtpModel) equals token i + 2; the
/// next draft is at i + 2 when accepted, else at i + 1; no draft for a token beyond
/// max_new_tokens.
#[test]
fn draft_and_accept_counts_follow_the_teacher_forced_mtp() {
    for name in MTP_FIXTURES {
        let (model, experts) = load(name, WeightDtype::F32);
        let vocab = model.config.vocab_size;
        let mut engine = common::engine(&model, &experts, options(1));
        let (mut total_drafts, mut total_accepted) = (0, 0);
        for (ci, case) in expected(name).cases.iter().enumerate() {
            let mtp = case.mtp.as_ref().expect("MTP fixtures record the MTP layer");
            let seq: Vec<u32> = case.prompt_ids.iter().chain(&case.greedy).copied().collect();
            let (p, n) = (case.prompt_ids.len(), case.greedy.len());
            let (mut want_drafts, mut want_accepted, mut i) = (0, 0, p - 1);
            // The draft at i predicts token i + 2, generated token i + 2 - p; it is made while
            // i + 2 - p tokens exist, only when at least two more are allowed.
            while n - (i + 2 - p) >= 2 {
                want_drafts += 1;
                if mtp.argmax_over_greedy[i] == seq[i + 2] {
                    want_accepted += 1;
                    i += 2;
                } else {
                    i += 1;
                }
            }
            let (got, drafts, accepted) =
                run_batch(&mut engine, std::slice::from_ref(&case.prompt_ids), &[greedy(n, vocab)]).remove(0);
            assert_eq!(got, case.greedy, "{name} case {ci}: greedy tokens");
            assert_eq!((drafts, accepted), (want_drafts, want_accepted), "{name} case {ci}: (drafted, accepted)");
            total_drafts += drafts;
            total_accepted += accepted;
        }
        // The fixture's MTP layer is random (it drafts nothing the model then says); the trained
        // model's drafts are often right, and not always.
        if name == "default_model" {
            assert!(total_accepted > 0 && total_accepted < total_drafts, "{name}: {total_accepted}/{total_drafts}");
        }
    }
}

/// How often each (first, second) generated token pair comes out of `seeds`, sampling at
/// temperature 1 with `speculative_tokens` drafts verified by `rule`.
fn pair_counts(
    model: &Arc<Model>,
    experts: &Arc<dyn ExpertBackend>,
    prompt: &[u32],
    speculative_tokens: usize,
    rule: AcceptRule,
    seeds: std::ops::Range<u64>,
) -> HashMap<(u32, u32), u64> {
    let opts = EngineOptions { accept_rule: rule, ..options(speculative_tokens) };
    let mut engine = common::engine(model, experts, opts);
    let mut counts = HashMap::new();
    let seeds: Vec<u64> = seeds.collect();
    for chunk in seeds.chunks(64) {
        let params: Vec<SamplingParams> = chunk
            .iter()
            .map(|&seed| SamplingParams {
                temperature: 1.0,
                top_k: 4,
                seed: Some(seed),
                max_new_tokens: 3,
                stop_token_ids: vec![model.config.vocab_size as u32],
                ..SamplingParams::default()
            })
            .collect();
        let prompts = vec![prompt.to_vec(); chunk.len()];
        for (tokens, _, _) in run_batch(&mut engine, &prompts, &params) {
            *counts.entry((tokens[0], tokens[1])).or_insert(0) += 1;
        }
    }
    counts
}

/// Two samples of equal size from the same distribution? Pearson's chi-square over the
/// categories seen at least 10 times in both together (the rest pooled): the statistic and
/// its 0.1% critical value (Wilson–Hilferty), so a correct sampler fails it 1 time in 1000.
fn chi_square(a: &HashMap<(u32, u32), u64>, b: &HashMap<(u32, u32), u64>) -> (f64, f64) {
    let keys: std::collections::BTreeSet<_> = a.keys().chain(b.keys()).collect();
    let (mut stat, mut df, mut rest) = (0.0, 0usize, (0u64, 0u64));
    for k in keys {
        let (x, y) = (a.get(k).copied().unwrap_or(0), b.get(k).copied().unwrap_or(0));
        if x + y >= 10 {
            stat += (x as f64 - y as f64).powi(2) / (x + y) as f64;
            df += 1;
        } else {
            rest = (rest.0 + x, rest.1 + y);
        }
    }
    if rest.0 + rest.1 > 0 {
        stat += (rest.0 as f64 - rest.1 as f64).powi(2) / (rest.0 + rest.1) as f64;
        df += 1;
    }
    let d = (df - 1) as f64;
    let z = 3.090; // the 99.9% quantile of the standard normal
    let critical = d * (1.0 - 2.0 / (9.0 * d) + z * (2.0 / (9.0 * d)).sqrt()).powi(3);
    (stat, critical)
}

#[test]
fn sampling_with_speculation_follows_the_target_distribution() {
    let (model, experts) = load("default_model", WeightDtype::Auto);
    let prompt = &expected("default_model").cases[0].prompt_ids;
    let n = 4096;
    let plain = pair_counts(&model, &experts, prompt, 0, AcceptRule::Rejection, 0..n);
    let spec = pair_counts(&model, &experts, prompt, 1, AcceptRule::Rejection, n..2 * n);
    let (stat, critical) = chi_square(&plain, &spec);
    eprintln!("rejection sampling: chi-square {stat:.1}, critical value {critical:.1}");
    assert!(stat < critical, "rejection sampling: chi-square {stat:.1} >= {critical:.1}");
    // The same test catches a rule that replaces a rejected draft with a sample of p itself.
    let wrong = pair_counts(&model, &experts, prompt, 1, AcceptRule::ResampleFromTarget, n..2 * n);
    let (stat, critical) = chi_square(&plain, &wrong);
    eprintln!("wrong rule: chi-square {stat:.1}, critical value {critical:.1}");
    assert!(stat > critical, "a wrong acceptance rule: chi-square {stat:.1} <= {critical:.1}");
}

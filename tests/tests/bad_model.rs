//! Bad weights through real processes: workers given a checkpoint holding NaN exit non-zero
//! naming the tensor; with a checkpoint whose activations overflow for one token, a request
//! holding it fails with FAILED_PRECONDITION (on the decode worker's local prefill and on a
//! prefill worker alike) while the requests beside it stream their tokens, and `expertmesh
//! generate` exits with the error instead of printing token 0.

use cluster_tests::binaries::{
    DECODE_WORKER, EXPERT_WORKER, PREFILL_WORKER, base_env, binary, default_model_dir, parse_reference, run_cli,
};
use cluster_tests::grpc::{BOS, Streams, expect_code, ids_request};
use cluster_tests::{Cluster, ClusterSpec, Etcd, Process, secs};
use std::path::Path;
use tonic::Code;

/// The token whose activations overflow in [`poisoned_model`].
const POISON: u32 = 90;
const HIDDEN: usize = 256;
const VOCAB: usize = 6144;

/// A copy of the default model whose weights `edit` changes (bf16 values, by tensor name).
async fn edited_model(edit: impl FnOnce(&mut Weights)) -> tempfile::TempDir {
    let from = default_model_dir().await;
    let to = tempfile::Builder::new().prefix("bad-model-").tempdir().expect("temp dir");
    for entry in std::fs::read_dir(&from).expect("model dir") {
        let entry = entry.expect("dir entry");
        std::fs::copy(entry.path(), to.path().join(entry.file_name())).expect("copy model file");
    }
    let path = to.path().join("model.safetensors");
    let mut weights = Weights(std::fs::read(&path).expect("read weights"));
    edit(&mut weights);
    std::fs::write(&path, weights.0).expect("write weights");
    to
}

/// A safetensors file's bytes, edited in place (no dependency on a safetensors crate: the
/// format is an 8-byte header length, a JSON header, then the data).
struct Weights(Vec<u8>);

impl Weights {
    /// The bytes of bf16 tensor `name`.
    fn bf16(&mut self, name: &str) -> &mut [u8] {
        let n = u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes")) as usize;
        let header: serde_json::Value = serde_json::from_slice(&self.0[8..8 + n]).expect("safetensors header");
        let t = &header[name];
        assert_eq!(t["dtype"], "BF16", "{name}");
        let at = |i: usize| t["data_offsets"][i].as_u64().expect("data offsets") as usize;
        let (start, end) = (8 + n + at(0), 8 + n + at(1));
        &mut self.0[start..end]
    }

    /// Sets element `index` of bf16 tensor `name` to `value` (exactly representable).
    fn set(&mut self, name: &str, index: usize, value: f32) {
        let bits = (value.to_bits() >> 16) as u16;
        assert_eq!(f32::from_bits(u32::from(bits) << 16).to_bits(), value.to_bits(), "{value} is not a bf16 value");
        self.bf16(name)[index * 2..][..2].copy_from_slice(&bits.to_le_bytes());
    }
}

const BF16_NAN: f32 = f32::from_bits(0x7fc0_0000);

/// The default model changed so that only [`POISON`] overflows (the construction of the
/// model crate's engine test): POISON is the one token with a nonzero first hidden coordinate
/// (column 0 of the embedding is zero elsewhere, and layer 0's attention writes nothing
/// there), and layer 0's post-attention norm scales that coordinate by about 1e30, so its
/// dense MLP overflows. Every other token computes finite values. POISON's head row is zero,
/// so greedy decoding never picks it.
async fn poisoned_model() -> tempfile::TempDir {
    edited_model(|w| {
        for row in 0..VOCAB {
            w.set("model.embed_tokens.weight", row * HIDDEN, if row == POISON as usize { 1.0 } else { 0.0 });
        }
        for col in 0..HIDDEN {
            w.set("model.layers.0.self_attn.o_proj.weight", col, 0.0);
            w.set("lm_head.weight", POISON as usize * HIDDEN + col, 0.0);
        }
        w.set("model.layers.0.post_attention_layernorm.weight", 0, f32::from_bits(0x7149_0000)); // ~1e30
    })
    .await
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

#[tokio::test]
async fn workers_given_nan_weights_exit_naming_the_tensor() {
    let embed = "model.embed_tokens.weight";
    let expert = "model.layers.2.mlp.experts.3.down_proj.weight";
    let nan_embed =
        edited_model(|w| w.bf16(embed).chunks_exact_mut(2).for_each(|b| b.copy_from_slice(&[0xc0, 0x7f]))).await;
    let nan_expert = edited_model(|w| w.set(expert, 7, BF16_NAN)).await;
    let etcd = Etcd::start().await;
    let logs = tempfile::Builder::new().prefix("cluster-tests-bad-model-").tempdir().expect("log dir");
    let cases: [(&str, &Path, &str, &[&str]); 3] = [
        (PREFILL_WORKER, nan_embed.path(), embed, &[]),
        (DECODE_WORKER, nan_embed.path(), embed, &[]),
        (EXPERT_WORKER, nan_expert.path(), expert, &["--shard", "0/1"]),
    ];
    for (worker, model, tensor, extra) in cases {
        let args: Vec<String> = ["--etcd", &etcd.endpoint(), "--cluster", "nan", "--listen", "127.0.0.1:0"]
            .into_iter()
            .chain(["--worker-id", worker, "--model", path_str(model)])
            .chain(extra.iter().copied())
            .map(String::from)
            .collect();
        let mut p = Process::spawn(worker, &binary(worker), &args, &base_env(), logs.path());
        let status = p.wait_exit(secs(120)).await;
        let log = p.log_tail(30);
        eprintln!("{worker}: {status}: {}", log.lines().last().unwrap_or(""));
        assert!(!status.success(), "{worker} started on a checkpoint holding NaN:\n{log}");
        for part in [tensor, "model.safetensors", "non-finite"] {
            assert!(log.contains(part), "{worker}'s error does not name {part:?}:\n{log}");
        }
        assert!(!log.contains("panicked"), "{worker} panicked:\n{log}");
    }
}

#[tokio::test]
async fn a_request_whose_logits_overflow_fails_alone_with_a_clear_status() {
    let model = poisoned_model().await;
    let dir = path_str(model.path());
    // `expertmesh generate` exits with the error instead of printing token 0.
    let out = run_cli(&["generate", "--model", dir, "--prompt-ids", "0,72,90", "--max-new-tokens", "4"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("generate on the poison: {}: {}", out.status, stderr.trim());
    assert!(
        !out.status.success(),
        "generate succeeded on overflowing logits: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("not finite"), "generate's error: {stderr}");
    assert!(!stderr.contains("panicked"), "generate panicked: {stderr}");

    // Healthy prompts on the same weights: their reference, then the cluster must match it.
    let max_new = 6;
    let healthy: [Vec<u32>; 2] = [vec![BOS, 72, 105], vec![BOS, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107]];
    let mut expected = Vec::new();
    for prompt in &healthy {
        let ids = prompt.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let out = run_cli(&["generate", "--json", "--model", dir, "--prompt-ids", &ids, "--max-new-tokens", "6"]).await;
        assert!(out.status.success(), "reference of {ids}: {}", String::from_utf8_lossy(&out.stderr));
        let r = parse_reference(&String::from_utf8_lossy(&out.stdout)).expect("reference JSON");
        assert!(!r.generated_ids.contains(&POISON), "the reference of {ids} reaches the poison");
        expected.push(r.generated_ids);
    }

    // Prompts of up to 4 tokens are prefilled by the decode worker itself; longer ones by the
    // prefill worker: the poison goes down both paths.
    let model_args = ["--model", dir];
    let mut cluster = Cluster::start(
        "poison",
        ClusterSpec::new(1, 1)
            .prefill_args(&model_args)
            .decode_args(&model_args)
            .router_args(&["--local-prefill-max-tokens", "4"]),
    )
    .await;
    let poisoned = [vec![BOS, 72, POISON], vec![BOS, 84, 104, 101, 32, POISON, 117, 105, 99, 107]];
    let requests =
        [&healthy[0], &poisoned[0], &healthy[1], &poisoned[1]].into_iter().map(|p| ids_request(p, max_new)).collect();
    let results = Streams::start(&cluster.router_url(), requests).await.finish(secs(120)).await;
    for (i, want) in [(0, &expected[0]), (2, &expected[1])] {
        let r = &results[i];
        assert!(r.error.is_none(), "healthy stream {i} failed: {:?}\n{}", r.error, cluster.log_tails(20));
        let got: Vec<u32> = r.chunks.iter().map(|c| c.id).collect();
        assert_eq!(&got, want, "healthy stream {i}");
    }
    for (i, path) in [(1, "the decode worker's local prefill"), (3, "the prefill worker")] {
        let r = &results[i];
        let status = r.error.as_ref().unwrap_or_else(|| panic!("poisoned stream {i} ({path}) did not fail"));
        eprintln!("poisoned, through {path}: {:?}: {}", status.code(), status.message());
        expect_code(status, &[Code::FailedPrecondition]).unwrap_or_else(|e| panic!("through {path}: {e}"));
        assert!(status.message().contains("not finite"), "through {path}: {}", status.message());
        assert!(r.chunks.is_empty(), "through {path}: tokens before the failure: {:?}", r.chunks);
    }
    cluster.wait_idle(secs(30)).await;
}

//! Workers on a GPU (`--device cuda:N`): a worker asked for a GPU it cannot use exits at once
//! with the reason (every machine); with a GPU, a cluster whose prefill and decode workers
//! run the CUDA engine streams exactly what `expertmesh generate --device cuda:0` generates
//! (skipped, with the reason printed, where no GPU is present).

use cluster_tests::binaries::{base_env, binary, reference_on};
use cluster_tests::grpc::{Streams, ids_request, test_prompts};
use cluster_tests::{Cluster, ClusterSpec, secs};
use std::io::Write;

const MAX_NEW: u32 = 12;

#[tokio::test]
async fn a_worker_asked_for_an_unusable_gpu_exits_before_loading_the_model() {
    for worker in ["prefill-worker", "decode-worker"] {
        let out = tokio::time::timeout(
            secs(60),
            tokio::process::Command::new(binary(worker))
                .args(["--device", "cuda:4096", "--listen", "127.0.0.1:0", "--etcd", "http://127.0.0.1:1"])
                .envs(base_env())
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{worker} did not exit within 60 s"))
        .unwrap_or_else(|e| panic!("cannot run {worker}: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{worker}: {}: {}", out.status, stderr.lines().last().unwrap_or(""));
        assert!(!out.status.success(), "{worker} started on cuda:4096");
        assert!(stderr.contains("cuda:4096"), "{worker} did not name the device: {stderr}");
        assert!(!stderr.contains("panicked"), "{worker} panicked: {stderr}");
        assert!(!stderr.contains("loading_progress"), "{worker} loaded the model before checking the device: {stderr}");
    }
}

#[tokio::test]
async fn gpu_workers_stream_what_the_gpu_engine_generates() {
    let prompt = &test_prompts(1, 11)[0];
    let expected = match reference_on(prompt, MAX_NEW, "cuda:0").await {
        Ok(r) => r,
        Err(reason) if reason.contains("could not be loaded") || reason.contains("CUDA device(s)") => {
            // Straight to stderr: the test harness captures `println!`/`eprintln!`.
            let _ = writeln!(std::io::stderr(), "skipped: no usable NVIDIA GPU here ({})", reason.trim());
            return;
        }
        Err(reason) => panic!("expertmesh generate --device cuda:0 failed: {reason}"),
    };
    let gpu = ["--device", "cuda:0"];
    let cluster = Cluster::start("gpu", ClusterSpec::new(1, 1).prefill_args(&gpu).decode_args(&gpu)).await;
    let results =
        Streams::start(&cluster.router_url(), vec![ids_request(prompt, MAX_NEW)]).await.finish(secs(120)).await;
    let r = &results[0];
    assert!(r.error.is_none(), "stream failed: {:?}\n{}", r.error, cluster.log_tails(20));
    let got: Vec<u32> = r.chunks.iter().map(|c| c.id).collect();
    assert_eq!(got, expected.generated_ids, "GPU cluster vs GPU engine");
}

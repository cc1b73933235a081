//! The real prefill worker in-process (default model, in-memory store, 127.0.0.1:0) against
//! a small in-test decode worker that records what PushKv receives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use cluster_core::{MemoryStore, Role, Store, StoreConfig, keys};
use model::serving::{EngineSetup, open_engine};
use model::{EngineOptions, LayerRows, SamplingParams, SeqId, SequenceCacheExport, WeightDtype};
use prefill_worker::{PrefillConfig, Ready};
use proto::internal::decode_server::{Decode, DecodeServer};
use proto::internal::prefill_client::PrefillClient;
use proto::internal::{
    AdmitRequest, DecodeEvent, KvChunk, LoadRequest, PrefillRequest, PushKvReply, ReleaseReply, ReleaseRequest,
    Sampling, WorkerLoad, kv_chunk,
};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

const LATENT_DIM: usize = 80;
/// The default model's 4 layers and its MTP layer (the worker runs it: `start_worker` passes
/// --speculative-tokens 1).
const NUM_LAYERS: usize = 5;
const VOCAB: u32 = 6144;

// ---------------------------------------------------------------- the prefill worker

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    config: PrefillConfig,
}

struct Worker {
    ready: Ready,
    store: MemoryStore,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    client: PrefillClient<Channel>,
}

async fn start_worker(extra: &[&str]) -> Worker {
    // Speculating decode workers get the MTP layer's rows and state too.
    let base = ["prefill-worker", "--listen", "127.0.0.1:0", "--cluster", "test", "--speculative-tokens", "1"];
    let args = base.into_iter().chain(extra.iter().copied());
    let config = Cli::try_parse_from(args).expect("flags parse").config;
    let store = MemoryStore::new();
    let shutdown = CancellationToken::new();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(prefill_worker::run(config, StoreConfig::Memory(store.clone()), shutdown.clone(), tx));
    let ready = rx.await.expect("the worker becomes ready");
    let client = PrefillClient::connect(format!("http://{}", ready.addr)).await.expect("connects");
    Worker { ready, store, shutdown, task, client }
}

impl Worker {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("run task").expect("run returns Ok");
    }
}

// ---------------------------------------------------------------- the in-test decode worker

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Accept,
    /// Reads the header, answers NOT_FOUND.
    NotFound,
    /// The first call reads two chunks then answers UNAVAILABLE; later calls accept.
    UnavailableOnce,
    /// Reads everything, never answers; notes when the call is dropped.
    Hang,
}

#[derive(Debug, Default)]
struct Recorded {
    /// Chunks of each PushKv call, in order.
    calls: Mutex<Vec<Vec<KvChunk>>>,
    /// Calls whose handler was dropped before answering.
    dropped: Mutex<usize>,
    changed: Notify,
}

#[derive(Debug)]
struct Receiver {
    mode: Mode,
    rec: Arc<Recorded>,
}

struct DropFlag(Arc<Recorded>, bool);

impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            *self.0.dropped.lock().expect("not poisoned") += 1;
            self.0.changed.notify_waiters();
        }
    }
}

#[tonic::async_trait]
impl Decode for Receiver {
    type AdmitStream = tokio_stream::Empty<Result<DecodeEvent, Status>>;

    async fn admit(&self, _: Request<AdmitRequest>) -> Result<Response<Self::AdmitStream>, Status> {
        Err(Status::unimplemented("test receiver"))
    }

    async fn push_kv(&self, request: Request<Streaming<KvChunk>>) -> Result<Response<PushKvReply>, Status> {
        let index = {
            let mut calls = self.rec.calls.lock().expect("not poisoned");
            calls.push(Vec::new());
            calls.len() - 1
        };
        let mut flag = DropFlag(self.rec.clone(), false);
        let mut stream = request.into_inner();
        let limit = match self.mode {
            Mode::NotFound => 1,
            Mode::UnavailableOnce if index == 0 => 2,
            _ => usize::MAX,
        };
        let mut bytes = 0u64;
        let mut read = 0;
        while read < limit {
            let Some(chunk) = stream.message().await? else { break };
            if let Some(kv_chunk::Part::Layer(l)) = &chunk.part {
                bytes += l.data.len() as u64;
            }
            self.rec.calls.lock().expect("not poisoned")[index].push(chunk);
            self.rec.changed.notify_waiters();
            read += 1;
        }
        self.rec.changed.notify_waiters();
        let answer = match self.mode {
            Mode::NotFound => Err(Status::not_found("no reservation for this request")),
            Mode::UnavailableOnce if index == 0 => Err(Status::unavailable("decode worker restarting")),
            Mode::Hang => std::future::pending().await,
            _ => Ok(Response::new(PushKvReply { bytes_received: bytes })),
        };
        flag.1 = true;
        answer
    }

    async fn release(&self, _: Request<ReleaseRequest>) -> Result<Response<ReleaseReply>, Status> {
        Err(Status::unimplemented("test receiver"))
    }

    async fn get_load(&self, _: Request<LoadRequest>) -> Result<Response<WorkerLoad>, Status> {
        Err(Status::unimplemented("test receiver"))
    }
}

struct DecodeStub {
    addr: String,
    rec: Arc<Recorded>,
    stop: CancellationToken,
}

impl Drop for DecodeStub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start_decode(mode: Mode) -> DecodeStub {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let addr = listener.local_addr().expect("bound").to_string();
    let rec = Arc::new(Recorded::default());
    let stop = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .add_service(DecodeServer::new(Receiver { mode, rec: rec.clone() }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.clone().cancelled_owned());
    tokio::spawn(server);
    DecodeStub { addr, rec, stop }
}

impl DecodeStub {
    fn calls(&self) -> Vec<Vec<KvChunk>> {
        self.rec.calls.lock().expect("not poisoned").clone()
    }

    /// Waits (on notifications, not sleeps) until `cond` holds.
    async fn wait_for(&self, cond: impl Fn(&Self) -> bool) {
        loop {
            let notified = self.rec.changed.notified();
            if cond(self) {
                return;
            }
            tokio::time::timeout(Duration::from_secs(30), notified).await.expect("condition reached in time");
        }
    }
}

// ---------------------------------------------------------------- requests and reference

fn greedy() -> Sampling {
    Sampling { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 5, max_new_tokens: 16, stop_token_ids: vec![] }
}

fn request(id: u64, prompt: Vec<u32>, decode: &str) -> PrefillRequest {
    PrefillRequest {
        request_id: id,
        prompt_ids: prompt,
        sampling: Some(greedy()),
        prompt_logits_top: 0,
        decode_addr: decode.into(),
    }
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 7 + salt * 13 + 1) % 256).collect()
}

struct Reference {
    token: u32,
    cache: SequenceCacheExport,
    logits_top: Vec<(u32, f32)>,
}

/// What `model::Engine` gives in-process for each prompt alone (greedy).
async fn reference(prompts: Vec<Vec<u32>>, logits_top: usize) -> Vec<Reference> {
    tokio::task::spawn_blocking(move || {
        let setup = EngineSetup {
            weight_dtype: WeightDtype::Auto,
            precision: kernels::cpu::Precision::Exact,
            options: EngineOptions { cache_tokens: 32768, block_size: 16, speculative_tokens: 1, ..Default::default() },
        };
        let mut engine = open_engine(None, setup, &|_| {}).expect("default model loads").engine;
        let params = SamplingParams { seed: Some(5), max_new_tokens: 16, ..SamplingParams::default() };
        prompts
            .into_iter()
            .map(|p| {
                engine.add_sequence(SeqId(1), p, params.clone(), logits_top).expect("admitted");
                let out = engine.prefill(&[SeqId(1)]).expect("prefills").remove(0).expect("finite logits");
                let cache = engine.export_cache(SeqId(1)).expect("exports");
                engine.release(SeqId(1)).expect("releases");
                Reference { token: out.tokens[0], cache, logits_top: out.prompt_logits_top }
            })
            .collect()
    })
    .await
    .expect("reference thread")
}

/// The transfer format of a layer: its rows as little-endian f32.
fn wire(rows: &LayerRows) -> Vec<u8> {
    rows.data().iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Reassembles one PushKv call: header fields, each layer's bytes, and the commit.
struct Received {
    header: proto::internal::KvHeader,
    layers: Vec<Vec<u8>>,
    commit: proto::internal::KvCommit,
}

fn reassemble(call: &[KvChunk], max_chunk_rows: usize) -> Received {
    let part = |c: &KvChunk| c.part.clone().expect("every chunk has a part");
    let kv_chunk::Part::Header(header) = part(&call[0]) else { panic!("first chunk must be the header") };
    let kv_chunk::Part::Commit(commit) = part(call.last().expect("non-empty")) else {
        panic!("last chunk must be the commit")
    };
    let row = header.latent_dim as usize * 4;
    let mut layers = vec![Vec::new(); header.num_layers as usize];
    for c in &call[1..call.len() - 1] {
        let kv_chunk::Part::Layer(l) = part(c) else { panic!("middle chunks must be layers") };
        let layer = &mut layers[l.layer as usize];
        assert_eq!(l.first_token as usize * row, layer.len(), "chunks of a layer come in order, whole rows");
        assert_eq!(l.data.len() % row, 0, "whole rows");
        assert!(l.data.len() / row <= max_chunk_rows, "chunk within --kv-chunk-bytes");
        layer.extend_from_slice(&l.data);
    }
    Received { header, layers, commit }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_matches_the_in_process_engine_and_streams_the_cache() {
    // 1000-byte chunks hold 3 rows of 320 bytes: a 37-token layer comes in 13 chunks.
    let mut worker = start_worker(&["--kv-chunk-bytes", "1000"]).await;
    let decode = start_decode(Mode::Accept).await;
    let prompts = vec![prompt(37, 1), prompt(1, 2), prompt(200, 3)];
    let want = reference(prompts.clone(), 5).await;
    for (i, (p, want)) in prompts.iter().zip(&want).enumerate() {
        let mut req = request(100 + i as u64, p.clone(), &decode.addr);
        req.prompt_logits_top = 5;
        let reply = worker.client.prefill(req).await.expect("prefill succeeds").into_inner();
        assert_eq!(reply.first_token, want.token, "prompt {i}");
        let per_layer = p.len() * LATENT_DIM * 4;
        assert_eq!(reply.kv_bytes, (per_layer * NUM_LAYERS) as u64);
        assert!(reply.queue_s >= 0.0 && reply.compute_s > 0.0 && reply.transfer_s >= 0.0);

        let calls = decode.calls();
        assert_eq!(calls.len(), i + 1, "one push per request, no retries");
        let got = reassemble(&calls[i], 3);
        assert_eq!(got.header.request_id, 100 + i as u64);
        assert_eq!(got.header.num_tokens as usize, p.len());
        assert_eq!((got.header.latent_dim as usize, got.header.num_layers as usize), (LATENT_DIM, NUM_LAYERS));
        for (l, bytes) in got.layers.iter().enumerate() {
            assert_eq!(bytes.len(), per_layer, "prompt {i} layer {l}");
            assert_eq!(bytes, &wire(&want.cache.layers[l]), "prompt {i} layer {l} equals export_cache");
        }
        let mut tokens = p.clone();
        tokens.push(want.token);
        assert_eq!(got.commit.tokens, tokens);
        assert_eq!(got.commit.prompt_len as usize, p.len());
        let top: Vec<(u32, f32)> = got.commit.prompt_logits_top.iter().map(|l| (l.id, l.logit)).collect();
        assert_eq!(top, want.logits_top);
        let mtp: Vec<u8> = want.cache.mtp_hidden.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(!mtp.is_empty() && got.commit.mtp_hidden == mtp, "the MTP layer's state travels with the commit");
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_prompts_all_get_their_first_token() {
    let worker = start_worker(&["--max-batch-tokens", "64"]).await;
    let decode = start_decode(Mode::Accept).await;
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(10 + 7 * i, i as u32)).collect();
    let want = reference(prompts.clone(), 0).await;
    let calls = prompts.iter().enumerate().map(|(i, p)| {
        let mut client = worker.client.clone();
        let req = request(i as u64, p.clone(), &decode.addr);
        async move { client.prefill(req).await }
    });
    let replies = futures_join_all(calls).await;
    for (i, (reply, want)) in replies.into_iter().zip(&want).enumerate() {
        let reply = reply.expect("prefill succeeds").into_inner();
        assert_eq!(reply.first_token, want.token, "prompt {i}");
        assert_eq!(reply.kv_bytes as usize, prompts[i].len() * LATENT_DIM * 4 * NUM_LAYERS);
    }
    assert_eq!(decode.calls().len(), prompts.len());
    worker.stop().await;
}

/// Joins futures without another dependency: each on a task, awaited in order.
async fn futures_join_all<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_refusal_reaches_the_caller_and_is_not_retried() {
    let mut worker = start_worker(&[]).await;
    let decode = start_decode(Mode::NotFound).await;
    let err = worker.client.prefill(request(9, prompt(20, 0), &decode.addr)).await.expect_err("refused");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains(&decode.addr), "names the decode worker: {}", err.message());
    assert!(err.message().contains("no reservation"), "says why: {}", err.message());
    assert_eq!(decode.calls().len(), 1, "not retried");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_push_is_retried_whole() {
    let mut worker = start_worker(&[]).await;
    let decode = start_decode(Mode::UnavailableOnce).await;
    let p = prompt(30, 4);
    let want = reference(vec![p.clone()], 0).await;
    let reply =
        worker.client.prefill(request(3, p.clone(), &decode.addr)).await.expect("succeeds after a retry").into_inner();
    assert_eq!(reply.first_token, want[0].token);
    let calls = decode.calls();
    assert_eq!(calls.len(), 2);
    let got = reassemble(&calls[1], usize::MAX);
    for (l, bytes) in got.layers.iter().enumerate() {
        assert_eq!(bytes, &wire(&want[0].cache.layers[l]), "layer {l} resent in full");
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_decode_worker_is_unavailable() {
    let mut worker = start_worker(&["--transfer-retries", "1"]).await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        l.local_addr().expect("bound").to_string()
    };
    let err = worker.client.prefill(request(4, prompt(5, 0), &closed)).await.expect_err("unreachable");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&closed) && err.message().contains("2 attempt"), "{}", err.message());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_arguments_naming_the_field() {
    let mut worker = start_worker(&[]).await;
    let decode = start_decode(Mode::Accept).await;
    let cases: Vec<(PrefillRequest, &str)> = vec![
        (request(1, vec![], &decode.addr), "prompt_ids"),
        (request(1, vec![1, VOCAB, 2], &decode.addr), "prompt_ids"),
        (request(1, prompt(4090, 0), &decode.addr), "prompt_ids"),
        (
            PrefillRequest { sampling: Some(Sampling { top_p: 0.0, ..greedy() }), ..request(1, vec![1], &decode.addr) },
            "top_p",
        ),
        (
            PrefillRequest {
                sampling: Some(Sampling { max_new_tokens: 0, ..greedy() }),
                ..request(1, vec![1], &decode.addr)
            },
            "max_new_tokens",
        ),
        (PrefillRequest { sampling: None, ..request(1, vec![1], &decode.addr) }, "sampling"),
        (request(1, vec![1], ""), "decode_addr"),
        (request(1, vec![1], "http://bad host:1"), "decode_addr"),
    ];
    for (req, field) in cases {
        let err = worker.client.prefill(req).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    assert!(decode.calls().is_empty(), "nothing was pushed");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_cancels_abandons_the_transfer() {
    let mut worker = start_worker(&[]).await;
    let decode = start_decode(Mode::Hang).await;
    let call = worker.client.prefill(request(8, prompt(16, 0), &decode.addr));
    tokio::select! {
        r = call => panic!("the hanging decode worker never answers: {r:?}"),
        // The whole cache (header, 4 layers, commit) arrived: now the caller gives up.
        () = decode.wait_for(|d| d.calls().first().is_some_and(|c| c.len() == 2 + NUM_LAYERS)) => {}
    }
    decode.wait_for(|d| *d.rec.dropped.lock().expect("not poisoned") == 1).await;
    // The stream closes before the worker's bookkeeping of the abandoned request is
    // settled: poll its load until it is idle, within a bound.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let load = worker.client.get_load(LoadRequest {}).await.expect("load").into_inner();
        let counts = (load.running_sequences, load.waiting_sequences, load.queued_tokens);
        if counts == (0, 0, 0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the abandoned request still counts: {counts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_reports_load_and_deregisters_on_shutdown() {
    let mut worker = start_worker(&["--cache-tokens", "4096", "--block-size", "32"]).await;
    let cluster = cluster_core::ClusterName::new("test").expect("valid");
    let key = keys::worker_key(&cluster, Role::Prefill, &worker.ready.worker_id);
    let value = worker.store.get(&key).await.expect("store").expect("registered");
    let info: cluster_core::WorkerInfo = serde_json::from_slice(&value).expect("worker info");
    assert_eq!(info.address, worker.ready.addr.to_string());
    assert_eq!((info.capacity.max_sequences, info.capacity.max_batch_tokens), (256, 4096));

    let load = worker.client.get_load(LoadRequest {}).await.expect("load").into_inner();
    assert_eq!(load.worker_id, worker.ready.worker_id.as_str());
    assert_eq!((load.total_blocks, load.block_size, load.free_blocks), (128, 32, 128));
    assert_eq!((load.running_sequences, load.waiting_sequences, load.queued_tokens), (0, 0, 0));

    let store = worker.store.clone();
    worker.stop().await;
    assert!(store.get(&key).await.expect("store").is_none(), "deregistered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_that_overflow_the_cache_wait_for_the_next_batch() {
    // 4 blocks of 16 tokens: one 40-token prompt (3 blocks with its sampled token) at a
    // time, though the batch budget would take them all.
    let mut worker = start_worker(&["--cache-tokens", "64"]).await;
    let decode = start_decode(Mode::Accept).await;
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(40, 10 + i)).collect();
    let want = reference(prompts.clone(), 0).await;
    let calls = prompts.iter().enumerate().map(|(i, p)| {
        let mut client = worker.client.clone();
        let req = request(50 + i as u64, p.clone(), &decode.addr);
        async move { client.prefill(req).await }
    });
    for (i, (reply, want)) in futures_join_all(calls).await.into_iter().zip(&want).enumerate() {
        assert_eq!(reply.expect("prefill succeeds").into_inner().first_token, want.token, "prompt {i}");
    }
    // A prompt that could never fit this worker's cache is refused at once.
    let err = worker.client.prefill(request(60, prompt(64, 0), &decode.addr)).await.expect_err("too large");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("cache blocks"), "{}", err.message());
    // A reply can reach the caller before the engine thread has published the blocks its
    // batch freed: poll the load until every block is free, within a bound.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let load = worker.client.get_load(LoadRequest {}).await.expect("load").into_inner();
        if load.free_blocks == load.total_blocks {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "every sequence should be released: {} of {} blocks free",
            load.free_blocks,
            load.total_blocks
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_work_finish_and_refuses_new_work() {
    let mut worker = start_worker(&[]).await;
    let decode = start_decode(Mode::Accept).await;
    let mut client = worker.client.clone();
    let req = request(70, prompt(300, 1), &decode.addr);
    let running = tokio::spawn(async move { client.prefill(req).await });
    // Shut down once the push has started; the request still completes.
    decode.wait_for(|d| !d.calls().is_empty()).await;
    worker.shutdown.cancel();
    let reply = running.await.expect("task").expect("the running prefill completes during the drain");
    assert_eq!(reply.into_inner().kv_bytes as usize, 300 * LATENT_DIM * 4 * NUM_LAYERS);
    worker.task.await.expect("run task").expect("run returns Ok");
    let after = worker.client.prefill(request(71, prompt(3, 1), &decode.addr)).await.expect_err("stopped");
    assert_eq!(after.code(), Code::Unavailable, "{after:?}");
}

//! Driving the router: connect and read the model (failing fast), build the workload, send
//! it open loop (Poisson arrivals) or closed loop (fixed concurrency), and time each
//! `Generate` stream on the client. The only module that touches protobuf types.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use proto::v1::generate_request::Prompt;
use proto::v1::generate_response::Event;
use proto::v1::generation_client::GenerationClient;
use proto::v1::{GenerateRequest, ModelInfo, ModelInfoRequest, SamplingParams, TokenIds};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::args::{Args, Config, Load};
use crate::report::{Report, RunFacts};
use crate::stats::{Completion, Failure, Record, Speculation, Stats};
use crate::workload::{Arrivals, RequestSpec, Workload, WorkloadParams, ignore_eos_stop_id};

/// HTTP/2 keepalive, so that a dead router fails requests instead of hanging them.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

type Client = GenerationClient<Channel>;

/// The binary: parse, validate, connect, run, print. Exit status 1 when startup fails or
/// no measured request completed, 0 otherwise (failures are results, in the report).
pub async fn main(args: Args) -> ExitCode {
    match run(args).await {
        Ok(Finished { report, json }) => {
            let out = if json { report.to_json() } else { report.to_table() };
            println!("{}", out.trim_end());
            if report.requests_ok == 0 {
                eprintln!("loadgen: no measured request completed");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug)]
struct Finished {
    report: Report,
    json: bool,
}

async fn run(args: Args) -> anyhow::Result<Finished> {
    let config = args.into_config()?;
    let clients = connect(&config.addr, config.connections, config.connect_timeout).await?;
    let info = model_info(clients[0].clone(), &config.addr, config.connect_timeout).await?;
    let shared = Arc::new(Shared::new(&config, &info)?);
    eprintln!(
        "loadgen: {} at {} (vocab {}, context {}): {} requests, {}",
        info.model_type,
        config.addr,
        info.vocab_size,
        info.context_length,
        config.requests,
        match config.load {
            Load::Rate(r) => format!("{r} req/s open loop"),
            Load::Concurrency(c) => format!("concurrency {c}"),
        }
    );

    let cancel = CancellationToken::new();
    let signals = tokio::spawn(stop_on_ctrl_c(cancel.clone()));
    let driven = match config.load {
        Load::Rate(rate) => open_loop(&clients, &shared, config.requests, config.seed, rate, &cancel).await,
        Load::Concurrency(c) => closed_loop(&clients, &shared, config.requests, c, &cancel).await,
    };
    signals.abort();
    let Driven { records, sent } = driven?;

    let measured: Vec<&Record> = records.iter().filter(|(i, _)| *i >= config.warmup).map(|(_, r)| r).collect();
    let stats = Stats::from_records(measured, &config.slo);
    let facts = RunFacts {
        model_type: info.model_type,
        vocab: shared.vocab,
        requests_sent: sent,
        interrupted: cancel.is_cancelled(),
    };
    Ok(Finished { report: Report::new(&config, facts, &stats), json: config.json })
}

/// One connection per `n`, each established now so that a wrong or dead address fails here.
async fn connect(addr: &str, n: u32, timeout: Duration) -> anyhow::Result<Vec<Client>> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let endpoint = Endpoint::from_shared(url)
        .with_context(|| format!("--addr {addr:?} is not HOST:PORT or a URL"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let mut clients = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| anyhow!("router at {addr} unreachable: no connection within {timeout:?}"))?
            .map_err(|e| anyhow::Error::new(e).context(format!("router at {addr} unreachable")))?;
        clients.push(GenerationClient::new(channel));
    }
    Ok(clients)
}

async fn model_info(mut client: Client, addr: &str, timeout: Duration) -> anyhow::Result<ModelInfo> {
    let mut request = tonic::Request::new(ModelInfoRequest {});
    request.set_timeout(timeout);
    let reply = tokio::time::timeout(timeout, client.get_model_info(request))
        .await
        .map_err(|_| anyhow!("GetModelInfo on router at {addr} got no answer within {timeout:?}"))?
        .map_err(|s| anyhow!("GetModelInfo on router at {addr} failed: {:?}: {}", s.code(), s.message()))?;
    Ok(reply.into_inner())
}

/// First Ctrl-C: stop sending and let requests in flight finish (their deadline bounds the
/// wait). Second: quit at once.
async fn stop_on_ctrl_c(cancel: CancellationToken) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    eprintln!("loadgen: stopping; waiting for requests in flight (Ctrl-C again to quit)");
    cancel.cancel();
    if tokio::signal::ctrl_c().await.is_ok() {
        std::process::exit(130);
    }
}

/// Read-only state every request task uses.
#[derive(Debug)]
struct Shared {
    workload: Workload,
    /// Prompt ids are drawn below this.
    vocab: u32,
    temperature: f32,
    /// Empty (the model's EOS ids) unless --ignore-eos.
    stop_token_ids: Vec<u32>,
    request_timeout: Duration,
    /// Start of the run; record times are offsets from it.
    t0: Instant,
}

impl Shared {
    fn new(config: &Config, info: &ModelInfo) -> anyhow::Result<Self> {
        ensure!(info.vocab_size >= 2, "the router reports vocab_size {}", info.vocab_size);
        let vocab = match config.vocab {
            Some(v) if v > info.vocab_size => {
                bail!("--vocab {v} exceeds the model's vocab_size {}", info.vocab_size)
            }
            Some(v) => v,
            None => info.vocab_size,
        };
        let stop_token_ids = if config.ignore_eos {
            let id = ignore_eos_stop_id(info.vocab_size, &info.eos_token_ids)
                .context("--ignore-eos: every id of the vocabulary is an EOS id")?;
            vec![id]
        } else {
            Vec::new()
        };
        let workload = Workload::new(WorkloadParams {
            seed: config.seed,
            prompt_len: config.prompt_len,
            output_len: config.output_len,
            vocab,
            excluded: info.eos_token_ids.clone(),
            context_length: info.context_length,
        })
        .map_err(|e| anyhow!(e))?;
        Ok(Self {
            workload,
            vocab,
            temperature: config.temperature,
            stop_token_ids,
            request_timeout: config.request_timeout,
            t0: Instant::now(),
        })
    }

    fn to_proto(&self, spec: RequestSpec) -> GenerateRequest {
        GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds { ids: spec.prompt })),
            sampling: Some(SamplingParams {
                max_new_tokens: Some(spec.max_new_tokens),
                temperature: Some(self.temperature),
                top_p: None,
                top_k: 0,
                seed: Some(spec.sampler_seed),
                stop_token_ids: self.stop_token_ids.clone(),
            }),
            prompt_logits_top: 0,
        }
    }
}

/// Records by request index (not in index order), and how many requests were started.
#[derive(Debug)]
struct Driven {
    records: Vec<(u64, Record)>,
    sent: u64,
}

/// Sends request `i` at the i-th Poisson arrival whatever is in flight, until `n` are sent or
/// `cancel` fires, then waits for all of them.
async fn open_loop(
    clients: &[Client],
    shared: &Arc<Shared>,
    n: u64,
    seed: u64,
    rate: f64,
    cancel: &CancellationToken,
) -> anyhow::Result<Driven> {
    let mut tasks = JoinSet::new();
    let mut records = Vec::with_capacity(n as usize);
    let mut sent = 0;
    for (index, at) in (0..n).zip(Arrivals::new(seed, rate)) {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            () = sleep_until(shared.t0 + at) => {}
        }
        let mut client = clients[(index % clients.len() as u64) as usize].clone();
        let shared = Arc::clone(shared);
        tasks.spawn(async move { (index, send_one(&mut client, &shared, index).await) });
        sent += 1;
        while let Some(done) = tasks.try_join_next() {
            records.push(done.context("request task failed")?);
        }
    }
    while let Some(done) = tasks.join_next().await {
        records.push(done.context("request task failed")?);
    }
    Ok(Driven { records, sent })
}

/// `concurrency` workers, each sending the next unsent request when its previous one ends.
async fn closed_loop(
    clients: &[Client],
    shared: &Arc<Shared>,
    n: u64,
    concurrency: u32,
    cancel: &CancellationToken,
) -> anyhow::Result<Driven> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for w in 0..concurrency as usize {
        let mut client = clients[w % clients.len()].clone();
        let (shared, next, cancel) = (Arc::clone(shared), Arc::clone(&next), cancel.clone());
        tasks.spawn(async move {
            let mut mine = Vec::new();
            while !cancel.is_cancelled() {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= n {
                    break;
                }
                mine.push((index, send_one(&mut client, &shared, index).await));
            }
            mine
        });
    }
    let mut records = Vec::with_capacity(n as usize);
    while let Some(done) = tasks.join_next().await {
        records.extend(done.context("request worker failed")?);
    }
    let sent = next.load(Ordering::Relaxed).min(n);
    Ok(Driven { records, sent })
}

/// Builds request `index`, sends it and times its stream, bounded by the request timeout.
async fn send_one(client: &mut Client, shared: &Shared, index: u64) -> Record {
    let spec = shared.workload.request(index);
    let input_tokens = spec.prompt.len() as u32;
    let mut request = tonic::Request::new(shared.to_proto(spec));
    request.set_timeout(shared.request_timeout);
    let start = Instant::now();
    let outcome = tokio::time::timeout(shared.request_timeout, stream(client, request, start))
        .await
        .unwrap_or(Err(Failure::Status(tonic::Code::DeadlineExceeded)));
    let end = Instant::now();
    Record { start: start - shared.t0, end: end - shared.t0, input_tokens, outcome }
}

/// Reads the stream to its end: tokens, the Summary, then the trailers (status). Per token
/// only the clock is read; the message itself is what tonic allocates.
async fn stream(
    client: &mut Client,
    request: tonic::Request<GenerateRequest>,
    start: Instant,
) -> Result<Completion, Failure> {
    let status = |s: tonic::Status| Failure::Status(s.code());
    let mut stream = client.generate(request).await.map_err(status)?.into_inner();
    let mut first: Option<Instant> = None;
    let mut last = start;
    let mut tokens: u32 = 0;
    let mut summary_at: Option<Instant> = None;
    let mut speculation = Speculation::default();
    while let Some(message) = stream.message().await.map_err(status)? {
        match message.event {
            Some(Event::Token(_)) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                tokens += 1;
            }
            Some(Event::Summary(s)) => {
                summary_at = Some(Instant::now());
                if let Some(s) = s.speculative {
                    speculation = Speculation {
                        draft_tokens: s.draft_tokens,
                        accepted_tokens: s.accepted_tokens,
                        draft_steps: s.draft_steps,
                    };
                }
            }
            None => {}
        }
    }
    let summary_at = summary_at.ok_or(Failure::IncompleteStream)?;
    let first = first.ok_or(Failure::NoTokens)?;
    Ok(Completion {
        ttft: first - start,
        e2e: summary_at - start,
        output_tokens: tokens,
        first_to_last: last - first,
        speculation,
    })
}

#[cfg(test)]
mod tests;

//! The driver against a fake router on 127.0.0.1:0: counts, token totals, warmup, failures
//! by code and the --ignore-eos stop id, in both loop shapes.

use std::pin::Pin;

use clap::Parser;
use proto::v1::generation_server::{Generation, GenerationServer};
use proto::v1::{GenerateResponse, GenerateUnaryResponse, Summary, TokenChunk, TokenizeRequest, TokenizeResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use std::collections::BTreeMap;

use super::*;

const VOCAB: u32 = 1000;
const EOS: u32 = 1;
/// Requests asking for this many tokens are refused, to exercise failure accounting.
const REFUSED_LEN: u32 = 3;
const TOKEN_GAP: Duration = Duration::from_millis(2);

#[derive(Debug)]
struct FakeRouter;

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Generation for FakeRouter {
    type GenerateStream = EventStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<EventStream>, Status> {
        let r = request.into_inner();
        let Some(Prompt::TokenIds(TokenIds { ids })) = r.prompt else {
            return Err(Status::invalid_argument("prompt must be token ids"));
        };
        if ids.iter().any(|&id| id >= VOCAB || id == EOS) {
            return Err(Status::invalid_argument("prompt id out of range or EOS"));
        }
        let sampling = r.sampling.ok_or_else(|| Status::invalid_argument("sampling missing"))?;
        if !(sampling.stop_token_ids.is_empty() || sampling.stop_token_ids == [VOCAB - 1]) {
            return Err(Status::invalid_argument(format!("stop ids {:?}", sampling.stop_token_ids)));
        }
        let n = sampling.max_new_tokens.ok_or_else(|| Status::invalid_argument("max_new_tokens missing"))?;
        if n == REFUSED_LEN {
            return Err(Status::resource_exhausted("busy"));
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for index in 0..n {
                tokio::time::sleep(TOKEN_GAP).await;
                let chunk = TokenChunk { index, id: 7, text: "x".into(), prompt_logits_top: vec![] };
                let _ = tx.send(Ok(GenerateResponse { event: Some(Event::Token(chunk)) })).await;
            }
            let summary = Summary { completion_tokens: n, prompt_tokens: ids.len() as u32, ..Default::default() };
            let _ = tx.send(Ok(GenerateResponse { event: Some(Event::Summary(summary)) })).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn generate_unary(&self, _: Request<GenerateRequest>) -> Result<Response<GenerateUnaryResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn tokenize(&self, _: Request<TokenizeRequest>) -> Result<Response<TokenizeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get_model_info(&self, _: Request<ModelInfoRequest>) -> Result<Response<ModelInfo>, Status> {
        Ok(Response::new(ModelInfo {
            model_type: "fake".into(),
            vocab_size: VOCAB,
            context_length: 4096,
            eos_token_ids: vec![EOS],
            ..Default::default()
        }))
    }
}

/// Serves the fake router until the test's runtime ends; returns its address.
async fn start_fake() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // Without TCP_NODELAY, Nagle plus delayed ACKs bunch the tokens into 40 ms bursts (and
    // the builder's tcp_nodelay is ignored by serve_with_incoming: set it on the incoming).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GenerationServer::new(FakeRouter))
            .serve_with_incoming(incoming),
    );
    addr
}

/// What the fake router does with request `i` of the same workload.
fn expected(warmup: u64, n: u64) -> (u64, u64, u64) {
    let w = Workload::new(WorkloadParams {
        seed: 5,
        prompt_len: "uniform:1-20".parse().unwrap(),
        output_len: "uniform:1-6".parse().unwrap(),
        vocab: VOCAB,
        excluded: vec![EOS],
        context_length: 4096,
    })
    .unwrap();
    let (mut ok, mut failed, mut tokens) = (0, 0, 0);
    for i in warmup..n {
        let r = w.request(i);
        if r.max_new_tokens == REFUSED_LEN {
            failed += 1;
        } else {
            ok += 1;
            tokens += u64::from(r.max_new_tokens);
        }
    }
    (ok, failed, tokens)
}

async fn drive(addr: &str, load: &[&str]) -> Report {
    let mut argv = vec![
        "loadgen",
        "--addr",
        addr,
        "--requests",
        "40",
        "--warmup",
        "5",
        "--seed",
        "5",
        "--prompt-len",
        "uniform:1-20",
        "--output-len",
        "uniform:1-6",
        "--ignore-eos",
        "--connections",
        "2",
        "--tpot-slo-ms",
        "1000",
    ];
    argv.extend_from_slice(load);
    run(Args::parse_from(argv)).await.unwrap().report
}

#[tokio::test]
async fn closed_and_open_loop_against_a_fake_router() {
    let addr = start_fake().await;
    let (ok, failed, tokens) = expected(5, 40);
    assert!(failed > 0 && ok > 0, "the seed should give both outcomes");
    for load in [&["--concurrency", "4"][..], &["--rate", "500"][..]] {
        let r = drive(&addr, load).await;
        assert_eq!((r.requests_sent, r.requests_measured), (40, 35), "{load:?}");
        assert_eq!((r.requests_ok, r.requests_failed), (ok, failed), "{load:?}");
        assert_eq!(r.failed_by_code, BTreeMap::from([("RESOURCE_EXHAUSTED", failed)]));
        assert_eq!(r.output_tokens, tokens);
        assert_eq!(r.model_type, "fake");
        // Tokens are 2 ms apart on the server.
        let tpot = r.tpot_ms.unwrap();
        assert!(tpot.p50 >= 1.9, "tpot {tpot:?}");
        assert!(r.ttft_ms.unwrap().p50 >= 1.9);
        // Generous SLOs: every completed request is good.
        assert_eq!(r.slo_met, ok);
        assert!(r.goodput_rps > 0.0 && r.duration_s > 0.0);
        assert!(!r.interrupted);
    }
}

#[tokio::test]
async fn startup_errors_name_the_address() {
    // A port nothing listens on: bind one, then free it.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().to_string();
    let err = run(Args::parse_from(["loadgen", "--addr", &addr, "--concurrency", "1"])).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&addr) && msg.contains("unreachable"), "{msg}");

    let fake = start_fake().await;
    let err = run(Args::parse_from(["loadgen", "--addr", &fake, "--rate", "1", "--vocab", "5000"])).await.unwrap_err();
    assert!(format!("{err:#}").contains("vocab_size 1000"), "{err:#}");
    let err = run(Args::parse_from([
        "loadgen",
        "--addr",
        &fake,
        "--rate",
        "1",
        "--prompt-len",
        "fixed:4000",
        "--output-len",
        "fixed:100",
    ]))
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("context_length 4096"), "{err:#}");
}

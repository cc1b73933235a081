//! Tests of the push/retry logic against a scripted in-memory sink.

use super::*;
use model::kv::LayerChunk;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::mpsc::error::TrySendError;

/// What the fake decode worker does on one call.
#[derive(Debug, Clone)]
enum Behaviour {
    Accept,
    /// Reads this many parts, then fails.
    FailAfter(usize, PushFailure),
    /// Reads every part and never answers.
    Hang,
}

#[derive(Debug, Default)]
struct FakeSink {
    script: Mutex<VecDeque<Behaviour>>,
    calls: Arc<Mutex<Vec<Vec<KvPart>>>>,
    /// Set when a call's future was dropped before it finished.
    cancelled: Arc<Mutex<usize>>,
}

impl FakeSink {
    fn new(script: Vec<Behaviour>) -> Arc<Self> {
        Arc::new(FakeSink { script: Mutex::new(script.into()), ..Default::default() })
    }

    fn calls(&self) -> Vec<Vec<KvPart>> {
        self.calls.lock().unwrap().clone()
    }
}

struct OnDrop(Arc<Mutex<usize>>, bool);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if !self.1 {
            *self.0.lock().unwrap() += 1;
        }
    }
}

impl KvSink for FakeSink {
    fn addr(&self) -> &str {
        "fake:1"
    }

    fn push(&self, mut parts: mpsc::Receiver<KvPart>) -> BoxFuture<'static, Result<u64, PushFailure>> {
        let behaviour = self.script.lock().unwrap().pop_front().unwrap_or(Behaviour::Accept);
        let calls = self.calls.clone();
        let index = {
            let mut c = calls.lock().unwrap();
            c.push(Vec::new());
            c.len() - 1
        };
        let guard = OnDrop(self.cancelled.clone(), false);
        Box::pin(async move {
            // Moved whole: the guard must live as long as the call.
            let mut guard = guard;
            let limit = match &behaviour {
                Behaviour::FailAfter(n, _) => *n,
                _ => usize::MAX,
            };
            let mut bytes = 0u64;
            let mut read = 0;
            while read < limit {
                let Some(part) = parts.recv().await else { break };
                if let KvPart::Layer(LayerChunk { data, .. }) = &part {
                    bytes += data.len() as u64;
                }
                calls.lock().unwrap()[index].push(part);
                read += 1;
            }
            let result = match behaviour {
                Behaviour::Accept => Ok(bytes),
                Behaviour::FailAfter(_, f) => Err(f),
                Behaviour::Hang => std::future::pending().await,
            };
            guard.1 = true;
            result
        })
    }
}

const SHAPE: KvShape = KvShape { num_tokens: 5, latent_dim: 2, num_layers: 3 };

fn settings(retries: u32) -> TransferSettings {
    // 16-byte chunks: two 8-byte rows each, so a 40-byte layer is 3 chunks.
    TransferSettings { chunk_bytes: 16, retries, backoff: Duration::from_millis(1) }
}

fn layer_rows(layer: usize) -> LayerRows {
    let data = (0..SHAPE.num_tokens * SHAPE.latent_dim).map(|i| (i + 100 * layer) as f32).collect();
    LayerRows::new(layer, SHAPE.latent_dim, data).unwrap()
}

/// The rows as the decode worker must receive them: little-endian f32.
fn wire(rows: &LayerRows) -> Vec<u8> {
    rows.data().iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn commit() -> KvCommit {
    KvCommit {
        tokens: vec![1, 2, 3, 4, 5, 9],
        prompt_len: 5,
        prompt_logits_top: vec![(9, 1.5)],
        mtp_hidden: vec![0.5, -1.0],
    }
}

struct Started {
    events: mpsc::Sender<SeqEvent>,
    reply: oneshot::Receiver<Result<PrefillOutcome, PrefillError>>,
    task: tokio::task::JoinHandle<()>,
    abort: CancellationToken,
}

fn start(sink: Arc<FakeSink>, settings: TransferSettings) -> Started {
    let (events, rx) = mpsc::channel(event_capacity(SHAPE.num_layers));
    let (reply_tx, reply) = oneshot::channel();
    let abort = CancellationToken::new();
    let task = tokio::spawn(run(Transfer {
        request_id: 42,
        sink,
        shape: SHAPE,
        settings,
        queue: Duration::from_millis(3),
        events: rx,
        reply: reply_tx,
        abort: abort.clone(),
        parent: tracing::Span::none(),
    }));
    Started { events, reply, task, abort }
}

fn send_all(events: &mpsc::Sender<SeqEvent>, order: &[usize]) {
    for &l in order {
        events.try_send(SeqEvent::Layer(layer_rows(l))).unwrap();
    }
    events.try_send(SeqEvent::Done { commit: commit(), first_token: 9, compute: Duration::from_millis(7) }).unwrap();
}

/// Checks one call's parts: header, then per layer (in `order`) whole chunks, then commit.
fn check_call(parts: &[KvPart], order: &[usize]) {
    assert_eq!(parts[0], KvPart::Header { request_id: 42, shape: SHAPE });
    let mut rest = &parts[1..];
    for &l in order {
        let want = wire(&layer_rows(l));
        let mut got = Vec::new();
        for expect_first in [0, 2, 4] {
            match &rest[0] {
                KvPart::Layer(LayerChunk { layer, first_token, data }) => {
                    assert_eq!((*layer, *first_token), (l, expect_first));
                    got.extend_from_slice(data);
                }
                other => panic!("expected a layer chunk, got {other:?}"),
            }
            rest = &rest[1..];
        }
        assert_eq!(got, want);
    }
    assert_eq!(rest, [KvPart::Commit(commit())]);
}

#[tokio::test]
async fn pushes_layers_in_arrival_order_then_commits() {
    let sink = FakeSink::new(vec![Behaviour::Accept]);
    let s = start(sink.clone(), settings(3));
    send_all(&s.events, &[2, 0, 1]);
    let outcome = s.reply.await.unwrap().unwrap();
    assert_eq!(outcome.first_token, 9);
    assert_eq!(outcome.kv_bytes, 3 * 40);
    assert_eq!((outcome.queue, outcome.compute), (Duration::from_millis(3), Duration::from_millis(7)));
    let calls = sink.calls();
    assert_eq!(calls.len(), 1);
    check_call(&calls[0], &[2, 0, 1]);
}

#[tokio::test]
async fn header_goes_out_before_any_layer_is_ready() {
    let sink = FakeSink::new(vec![Behaviour::Accept]);
    let s = start(sink.clone(), settings(0));
    // Wait (on a condition) until the header arrived while no layer was given yet.
    while sink.calls().first().is_none_or(|c| c.is_empty()) {
        tokio::task::yield_now().await;
    }
    assert_eq!(sink.calls()[0].len(), 1);
    s.events.try_send(SeqEvent::Layer(layer_rows(0))).unwrap();
    while sink.calls()[0].len() < 4 {
        tokio::task::yield_now().await;
    }
    send_all(&s.events, &[1, 2]);
    s.reply.await.unwrap().unwrap();
    check_call(&sink.calls()[0], &[0, 1, 2]);
}

#[tokio::test]
async fn transport_failure_retries_the_whole_push() {
    let broken = PushFailure::Transport("connection reset".into());
    let sink = FakeSink::new(vec![Behaviour::FailAfter(5, broken.clone()), Behaviour::FailAfter(0, broken)]);
    let s = start(sink.clone(), settings(2));
    send_all(&s.events, &[0, 1, 2]);
    let outcome = s.reply.await.unwrap().unwrap();
    assert_eq!(outcome.kv_bytes, 120);
    let calls = sink.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[0].len(), 5);
    check_call(&calls[2], &[0, 1, 2]);
}

#[tokio::test]
async fn transport_failures_give_unreachable_after_the_retries() {
    let broken = PushFailure::Transport("connection refused".into());
    let sink = FakeSink::new(vec![Behaviour::FailAfter(0, broken.clone()); 3]);
    let s = start(sink.clone(), settings(2));
    send_all(&s.events, &[0, 1, 2]);
    match s.reply.await.unwrap() {
        Err(PrefillError::Transfer(TransferError::Unreachable { addr, attempts: 3, reason })) => {
            assert_eq!(addr, "fake:1");
            assert!(reason.contains("connection refused"), "{reason}");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert_eq!(sink.calls().len(), 3);
}

#[tokio::test]
async fn a_refusal_is_not_retried() {
    let gone = PushFailure::Refused { code: tonic::Code::NotFound, message: "no reservation 42".into() };
    let sink = FakeSink::new(vec![Behaviour::FailAfter(1, gone)]);
    let s = start(sink.clone(), settings(3));
    // The refusal comes before any layer: the caller hears it at once.
    match s.reply.await.unwrap() {
        Err(PrefillError::Transfer(TransferError::Refused {
            code: tonic::Code::NotFound,
            request_id: 42,
            message,
            ..
        })) => {
            assert!(message.contains("no reservation"));
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_eq!(sink.calls().len(), 1);
    s.task.await.unwrap();
    // Later layers meet a closed channel, which the engine thread ignores.
    assert!(matches!(s.events.try_send(SeqEvent::Layer(layer_rows(0))), Err(TrySendError::Closed(_))));
}

#[tokio::test]
async fn engine_failure_cancels_the_push_and_reaches_the_caller() {
    let sink = FakeSink::new(vec![Behaviour::Accept]);
    let s = start(sink.clone(), settings(3));
    s.events.try_send(SeqEvent::Layer(layer_rows(0))).unwrap();
    s.events.try_send(SeqEvent::Failed(PrefillError::Engine("boom".into()))).unwrap();
    assert!(matches!(s.reply.await.unwrap(), Err(PrefillError::Engine(m)) if m == "boom"));
    s.task.await.unwrap();
    assert_eq!(*sink.cancelled.lock().unwrap(), 1);
}

#[tokio::test]
async fn a_caller_that_goes_away_abandons_the_push() {
    let sink = FakeSink::new(vec![Behaviour::Hang]);
    let s = start(sink.clone(), settings(3));
    send_all(&s.events, &[0, 1, 2]);
    // Wait until the whole push is out and unanswered, then the caller goes away.
    while sink.calls().first().is_none_or(|c| !matches!(c.last(), Some(KvPart::Commit(_)))) {
        tokio::task::yield_now().await;
    }
    drop(s.reply);
    s.task.await.unwrap();
    assert_eq!(*sink.cancelled.lock().unwrap(), 1);
}

#[tokio::test]
async fn abort_answers_shutting_down() {
    let sink = FakeSink::new(vec![Behaviour::Hang]);
    let s = start(sink.clone(), settings(3));
    send_all(&s.events, &[0, 1, 2]);
    s.abort.cancel();
    assert!(matches!(s.reply.await.unwrap(), Err(PrefillError::ShuttingDown)));
}

#[tokio::test]
async fn a_layer_of_the_wrong_shape_fails_the_transfer() {
    let sink = FakeSink::new(vec![Behaviour::Accept]);
    let s = start(sink.clone(), settings(3));
    let short = LayerRows::new(1, SHAPE.latent_dim, vec![0.0; 8]).unwrap();
    s.events.try_send(SeqEvent::Layer(short)).unwrap();
    match s.reply.await.unwrap() {
        Err(PrefillError::Engine(m)) => assert!(m.contains("layer 1 has 4 rows of 2; expected 5 rows"), "{m}"),
        other => panic!("expected an engine error, got {other:?}"),
    }
}

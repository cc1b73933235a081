//! Importing one pushed cache: the parts a [`KvSource`] yields go through the model's KV
//! codec (`model::kv::Reassembly`), each layer into the engine as soon as it is whole, and
//! the commit makes the sequence runnable.
//!
//! The wire is behind [`KvSource`] (implemented in `grpc`), the mirror of the prefill
//! worker's `KvSink`, so this module sees only domain types.

use cluster_core::BoxFuture;
use model::kv::{KvError, KvPart, Reassembly, Received};
use model::{CacheLayout, SeqId};

use crate::engine_thread::{CallError, EngineHandle};

/// The receiving end of one cache push.
pub trait KvSource: Send {
    /// The next part as the prefill worker sent it; `None` once it closed the stream.
    fn next_part(&mut self) -> BoxFuture<'_, Result<Option<KvPart>, tonic::Status>>;
}

/// Why an import ended before its commit was applied.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Reading the stream failed: the sender went away or sent something undecodable.
    #[error(transparent)]
    Source(tonic::Status),
    /// The parts do not form a cache of this worker's model.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// The engine refused a layer or the commit, or its thread is busy or gone.
    #[error(transparent)]
    Call(#[from] CallError),
}

/// Imports one push into the engine; returns the layer bytes received. `span` gets the
/// request id and the bytes.
pub async fn import(
    source: &mut dyn KvSource,
    layout: CacheLayout,
    engine: &EngineHandle,
    span: &tracing::Span,
) -> Result<u64, ImportError> {
    let mut reassembly = Reassembly::new(layout);
    while let Some(part) = source.next_part().await.map_err(ImportError::Source)? {
        match reassembly.accept(part)? {
            Received::Header { request_id, .. } => {
                span.record("request_id", request_id);
            }
            Received::Partial => {}
            Received::Layer { request_id, rows } => {
                let id = SeqId(request_id);
                engine.import_layer(id, rows).await?;
            }
            Received::Commit { request_id, commit } => {
                engine.commit(SeqId(request_id), commit).await?;
                // Answer at once: what may follow the commit is not read.
                break;
            }
        }
    }
    let bytes = reassembly.finish()?;
    span.record("bytes", bytes);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_thread::{Reservation, SeqEvent, spawn_engine};
    use model::EngineError;
    use model::kv::{KvCommit, KvShape, chunk_layer};
    use model::serving::{EngineSetup, open_engine};
    use model::{Engine, EngineOptions, LayerRows, SamplingParams, WeightDtype};
    use std::collections::VecDeque;

    /// Parts from memory, then the end of the stream or a transport error.
    struct Scripted {
        parts: VecDeque<KvPart>,
        then: Option<tonic::Status>,
    }

    impl Scripted {
        fn new(parts: Vec<KvPart>) -> Self {
            Scripted { parts: parts.into(), then: None }
        }
    }

    impl KvSource for Scripted {
        fn next_part(&mut self) -> BoxFuture<'_, Result<Option<KvPart>, tonic::Status>> {
            let next = match self.parts.pop_front() {
                Some(part) => Ok(Some(part)),
                None => self.then.take().map_or(Ok(None), Err),
            };
            Box::pin(std::future::ready(next))
        }
    }

    fn engine() -> Engine {
        let setup = EngineSetup {
            weight_dtype: WeightDtype::Auto,
            precision: kernels::cpu::Precision::Exact,
            // Speculating: the push carries the MTP layer's rows and state too.
            options: EngineOptions { cache_tokens: 1024, block_size: 16, speculative_tokens: 2, ..Default::default() },
        };
        open_engine(None, setup, &|_| {}).expect("the default model loads").engine
    }

    fn params() -> SamplingParams {
        SamplingParams { temperature: 0.8, seed: Some(3), max_new_tokens: 6, ..Default::default() }
    }

    async fn run(parts: Vec<KvPart>, layout: CacheLayout, engine: &EngineHandle) -> Result<u64, ImportError> {
        import(&mut Scripted::new(parts), layout, engine, &tracing::Span::none()).await
    }

    #[tokio::test]
    async fn a_pushed_cache_decodes_as_it_would_in_place() {
        let prompt: Vec<u32> = (1..30).collect();
        // In place: prefill, the cache as the prefill left it, then every token.
        let mut local = engine();
        let id = SeqId(1);
        local.add_sequence(id, prompt.clone(), params(), 0).unwrap();
        let step = |out: Vec<Result<model::StepOutput, EngineError>>| out.into_iter().next().unwrap().unwrap();
        let mut out = step(local.prefill(&[id]).unwrap());
        let first = out.tokens[0];
        let export = local.export_cache(id).unwrap();
        let mut accepted = 0;
        while out.finish.is_none() {
            out = step(local.decode_step(&[id]).unwrap());
            accepted += out.accepted_tokens;
        }
        assert!(accepted > 0, "the test should exercise accepted drafts");
        let want = local.generated(id).unwrap().to_vec();

        let decode = engine();
        let layout = decode.cache_layout();
        let (handle, thread) = spawn_engine(
            decode,
            crate::engine_thread::EngineSettings { max_batch: 8, stall_timeout: std::time::Duration::from_secs(60) },
        )
        .unwrap();
        let id = SeqId(9);
        let reservation = Reservation {
            id,
            prompt_tokens: prompt.len(),
            params: params(),
            local_prefill: None,
            trace: String::new(),
        };
        let (_, mut tokens) = handle.reserve(reservation).await.unwrap();
        // Chunks of three rows, the layers last to first.
        let shape = KvShape { num_tokens: prompt.len(), latent_dim: layout.latent_dim, num_layers: layout.num_layers };
        let mut parts = vec![KvPart::Header { request_id: id.0, shape }];
        for rows in export.layers.iter().rev() {
            parts.extend(chunk_layer(rows, 3 * shape.row_bytes()).map(KvPart::Layer));
        }
        let mut all = prompt.clone();
        all.push(first);
        parts.push(KvPart::Commit(KvCommit {
            tokens: all,
            prompt_len: prompt.len(),
            prompt_logits_top: Vec::new(),
            mtp_hidden: export.mtp_hidden.clone(),
        }));
        assert_eq!(run(parts, layout, &handle).await.unwrap(), shape.total_bytes());
        let mut got = Vec::new();
        while let Some(event) = tokens.recv().await {
            match event {
                SeqEvent::Token { id, .. } => got.push(id),
                SeqEvent::Finished(..) => break,
                SeqEvent::Failed(m) | SeqEvent::Rejected(m) => panic!("decode failed: {m}"),
                SeqEvent::Stalled { .. } => panic!("the test reads every event"),
            }
        }
        assert_eq!(got, want, "sampled tokens after the move");
        drop(handle);
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn a_bad_push_ends_the_import_with_its_fault() {
        let decode = engine();
        let layout = decode.cache_layout();
        let (handle, thread) = spawn_engine(
            decode,
            crate::engine_thread::EngineSettings { max_batch: 8, stall_timeout: std::time::Duration::from_secs(60) },
        )
        .unwrap();
        let dim = layout.latent_dim;
        let shape = KvShape { num_tokens: 4, latent_dim: dim, num_layers: layout.num_layers };
        let header = KvPart::Header { request_id: 5, shape };
        let rows = LayerRows::new(0, dim, vec![0.5; 4 * dim]).unwrap();
        let layer = || chunk_layer(&rows, usize::MAX).map(KvPart::Layer);

        // Nothing reserved for request 5: its first whole layer is refused by the engine.
        let parts = std::iter::once(header.clone()).chain(layer()).collect();
        match run(parts, layout, &handle).await {
            Err(ImportError::Call(CallError::Engine(EngineError::UnknownSequence(5)))) => {}
            other => panic!("expected an unknown sequence, got {other:?}"),
        }
        // A cache of another model.
        let wide = KvShape { latent_dim: dim + 1, ..shape };
        match run(vec![KvPart::Header { request_id: 5, shape: wide }], layout, &handle).await {
            Err(ImportError::Kv(KvError::ShapeMismatch { latent_dim, .. })) => assert_eq!(latent_dim, dim + 1),
            other => panic!("expected a shape mismatch, got {other:?}"),
        }
        // The stream ends before the commit.
        match run(vec![header.clone()], layout, &handle).await {
            Err(ImportError::Kv(KvError::NoCommit)) => {}
            other => panic!("expected a missing commit, got {other:?}"),
        }
        // A transport error comes out as it went in.
        let mut source = Scripted { parts: vec![header].into(), then: Some(tonic::Status::cancelled("sender gone")) };
        match import(&mut source, layout, &handle, &tracing::Span::none()).await {
            Err(ImportError::Source(s)) => assert_eq!((s.code(), s.message()), (tonic::Code::Cancelled, "sender gone")),
            other => panic!("expected the stream's error, got {other:?}"),
        }
        drop(handle);
        thread.join().unwrap();
    }
}

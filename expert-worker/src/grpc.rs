//! The Expert gRPC service: the only module that touches protobuf types. Each `Run` stream
//! is served by one tracked task that decodes a request, waits for the compute thread and
//! answers, so replies leave in request order.

use crate::compute::{ComputeError, ComputeHandle};
use crate::counters::LoadCounters;
use model::{ExpertGroup, ExpertId};
use proto::expert::expert_server::{Expert, ExpertServer};
use proto::expert::{self as pb, expert_reply};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

/// Replies buffered per stream before the serving task waits for the client to read.
const REPLY_BUFFER: usize = 4;

/// Largest Expert message either way: one MoE layer's rows for this worker (a 4096-token
/// prefill of a 7168-wide model at top-8 is ~940 MiB in total, spread over the workers).
/// The client (`expert-client`) uses the same limit.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

pub type Server = ExpertServer<ExpertService>;

/// What reflection lists for this worker.
pub const DESCRIBED: cluster_core::serve::Described<'static> = cluster_core::serve::Described {
    descriptor_set: proto::FILE_DESCRIPTOR_SET,
    services: &["expertmesh.expert.v1.Expert"],
};

#[derive(Debug)]
pub struct ExpertService {
    pub compute: ComputeHandle,
    pub counters: Arc<LoadCounters>,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
}

pub fn server(service: ExpertService) -> Server {
    ExpertServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A request that cannot be run; answered on the stream, which stays open.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("inputs hold {bytes} bytes; {rows} rows of width {hidden} need {want}")]
    Shape { bytes: usize, rows: usize, hidden: usize, want: usize },
    #[error(transparent)]
    Compute(#[from] ComputeError),
}

#[tonic::async_trait]
impl Expert for ExpertService {
    type RunStream = ReceiverStream<Result<pb::ExpertReply, Status>>;

    async fn run(&self, request: Request<Streaming<pb::ExpertRequest>>) -> Result<Response<Self::RunStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(REPLY_BUFFER);
        let compute = self.compute.clone();
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            loop {
                let next = tokio::select! {
                    next = requests.message() => next,
                    _ = shutdown.cancelled() => return,
                };
                let reply = match next {
                    Ok(Some(req)) => Ok(answer(&compute, req).await),
                    Ok(None) => return,
                    Err(status) => {
                        tracing::debug!(%status, "expert_stream_closed");
                        return;
                    }
                };
                if tx.send(reply).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_slots(&self, _: Request<pb::SlotsRequest>) -> Result<Response<pb::Slots>, Status> {
        let slots =
            self.compute.hosted().into_iter().map(|s| pb::Slot { layer: s.layer as u32, expert: s.expert }).collect();
        Ok(Response::new(pb::Slots { slots }))
    }

    async fn get_load(&self, _: Request<pb::ExpertLoadRequest>) -> Result<Response<pb::ExpertLoad>, Status> {
        // Cumulative tokens of the slots hosted now (the load report covers every slot).
        let slots = self
            .compute
            .hosted()
            .into_iter()
            .map(|s| pb::SlotLoad { layer: s.layer as u32, expert: s.expert, tokens: self.counters.tokens(s) })
            .collect();
        Ok(Response::new(pb::ExpertLoad { slots, requests: self.counters.requests() }))
    }
}

async fn answer(compute: &ComputeHandle, req: pb::ExpertRequest) -> pb::ExpertReply {
    let seq = req.seq;
    let span = tracing::info_span!("expert_compute", layer = req.layer, groups = req.groups.len());
    cluster_core::trace::parent_from(&req.traceparent, &span);
    let result = match tracing::Instrument::instrument(run(compute, req), span).await {
        Ok(outputs) => expert_reply::Result::Outputs(outputs.iter().flat_map(|v| v.to_le_bytes()).collect()),
        Err(e) => expert_reply::Result::Error(e.to_string()),
    };
    pb::ExpertReply { seq, result: Some(result) }
}

async fn run(compute: &ComputeHandle, req: pb::ExpertRequest) -> Result<Vec<f32>, RequestError> {
    let (layer, hidden) = (req.layer as usize, req.hidden as usize);
    let groups: Vec<ExpertGroup> = req
        .groups
        .iter()
        .map(|g| ExpertGroup { expert: ExpertId(g.expert), num_tokens: g.num_tokens as usize })
        .collect();
    let rows: usize = groups.iter().map(|g| g.num_tokens).sum();
    let want = rows * hidden * 4;
    if req.inputs.len() != want {
        return Err(RequestError::Shape { bytes: req.inputs.len(), rows, hidden, want });
    }
    let inputs = req.inputs.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(compute.run(layer, hidden, groups, inputs).await?)
}

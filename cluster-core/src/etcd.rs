//! `EtcdStore`: the `Store` over etcd (etcd-client 0.21, tokio). Maps etcd/gRPC failures to
//! `StoreError` by status code, and runs prefix watches that reconnect and resync.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;

use crate::store::{BoxFuture, KeyValue, LeaseId, Store, StoreError, WATCH_CHANNEL_CAPACITY, WatchEvent, ttl_secs};
use crate::sync::Delivered;

/// Upper bound on one unary call (connect included); an unreachable server gives
/// `Unavailable` after this rather than a hang.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings detect a silently dead server (no FIN) within interval + timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Watch retry back-off after a failed (re)connect, doubling up to the max.
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Store over an etcd cluster. Cloning shares the connection and the task set.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore").field("tasks", &self.tasks).finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (e.g. `http://127.0.0.1:2379`). The channel reconnects by
    /// itself after a server restart; calls made while it is down fail with `Unavailable`.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let client = with_timeout("connect", Client::connect(endpoints, Some(options))).await?;
        Ok(Self { client, tasks: TaskTracker::new(), cancel: CancellationToken::new() })
    }

    /// Stops every watch task (their channels close) and waits for them.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Maps an etcd-client error by gRPC code: transient ones are `Unavailable`.
fn map_err(op: &'static str, err: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    let reason = err.to_string();
    match err {
        E::GRpcStatus(status) => match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::Unknown
            | Code::ResourceExhausted => StoreError::Unavailable { op, reason },
            _ => StoreError::Rejected { op, reason },
        },
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => {
            StoreError::Unavailable { op, reason }
        }
        _ => StoreError::Rejected { op, reason },
    }
}

/// Like [`map_err`], but etcd's `NotFound` on a lease call means the lease is gone.
fn map_lease_err(op: &'static str, lease: LeaseId, err: etcd_client::Error) -> StoreError {
    match &err {
        etcd_client::Error::GRpcStatus(status) if status.code() == Code::NotFound => StoreError::LeaseExpired(lease),
        _ => map_err(op, err),
    }
}

async fn with_timeout<T>(
    op: &'static str,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    with_timeout_map(op, call, |e| map_err(op, e)).await
}

async fn with_timeout_map<T>(
    op: &'static str,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
    map: impl FnOnce(etcd_client::Error) -> StoreError,
) -> Result<T, StoreError> {
    match tokio::time::timeout(OP_TIMEOUT, call).await {
        Ok(result) => result.map_err(map),
        Err(_) => Err(StoreError::Unavailable { op, reason: format!("no answer within {OP_TIMEOUT:?}") }),
    }
}

fn key_string(op: &'static str, key: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(key.to_vec()).map_err(|e| StoreError::Rejected { op, reason: format!("non-UTF-8 key: {e}") })
}

/// Whether etcd still has `lease` (it answers TTL -1 for an unknown lease).
async fn lease_exists(client: &mut Client, lease: LeaseId) -> Result<bool, StoreError> {
    let resp = with_timeout_map("lease_time_to_live", client.lease_time_to_live(lease.0, None), |e| {
        map_lease_err("lease_time_to_live", lease, e)
    })
    .await;
    match resp {
        Ok(resp) => Ok(resp.ttl() > 0),
        Err(StoreError::LeaseExpired(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads the prefix; returns its contents and the revision they are at.
async fn snapshot(client: &mut Client, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
    let resp = with_timeout("get_prefix", client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let kvs = resp
        .kvs()
        .iter()
        .map(|kv| Ok(KeyValue { key: key_string("get_prefix", kv.key())?, value: kv.value().to_vec() }))
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok((kvs, revision))
}

/// Why one watch session ended.
enum SessionEnd {
    /// The consumer dropped its receiver or the store shut down: stop for good.
    Stopped,
    /// The connection or the server-side watch was lost: back off, resync, resume.
    Lost(StoreError),
}

/// Sends `event` unless the consumer is gone or the store shuts down.
async fn deliver(tx: &mpsc::Sender<WatchEvent>, cancel: &CancellationToken, event: WatchEvent) -> bool {
    tokio::select! {
        sent = tx.send(event) => sent.is_ok(),
        _ = cancel.cancelled() => false,
    }
}

/// One session: snapshot at revision R, deliver the difference, stream events after R.
async fn watch_session(
    client: &mut Client,
    prefix: &str,
    delivered: &mut Delivered,
    tx: &mpsc::Sender<WatchEvent>,
    cancel: &CancellationToken,
    backoff: &mut Duration,
) -> SessionEnd {
    let (kvs, revision) = match snapshot(client, prefix).await {
        Ok(snap) => snap,
        Err(e) => return SessionEnd::Lost(e),
    };
    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut stream = match with_timeout("watch", client.watch(prefix, Some(options))).await {
        Ok(stream) => stream,
        Err(e) => return SessionEnd::Lost(e),
    };
    for event in delivered.resync(kvs) {
        if !deliver(tx, cancel, event).await {
            return SessionEnd::Stopped;
        }
    }
    *backoff = WATCH_BACKOFF_MIN;
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            _ = tx.closed() => return SessionEnd::Stopped,
            _ = cancel.cancelled() => return SessionEnd::Stopped,
        };
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => {
                return SessionEnd::Lost(StoreError::Unavailable { op: "watch", reason: "stream ended".into() });
            }
            Err(e) => return SessionEnd::Lost(map_err("watch", e)),
        };
        if response.canceled() || response.compact_revision() > 0 {
            let reason = format!("server cancelled the watch: {}", response.cancel_reason());
            return SessionEnd::Lost(StoreError::Unavailable { op: "watch", reason });
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let key = match key_string("watch", kv.key()) {
                Ok(key) => key,
                Err(e) => {
                    tracing::warn!(error = %e, "watch_skip_key");
                    continue;
                }
            };
            let event = match event.event_type() {
                EventType::Put => WatchEvent::Put { key, value: kv.value().to_vec() },
                EventType::Delete => WatchEvent::Delete { key },
            };
            delivered.apply(&event);
            if !deliver(tx, cancel, event).await {
                return SessionEnd::Stopped;
            }
        }
    }
}

async fn run_watch(mut client: Client, prefix: String, tx: mpsc::Sender<WatchEvent>, cancel: CancellationToken) {
    let mut delivered = Delivered::default();
    let mut backoff = WATCH_BACKOFF_MIN;
    loop {
        match watch_session(&mut client, &prefix, &mut delivered, &tx, &cancel, &mut backoff).await {
            SessionEnd::Stopped => return,
            SessionEnd::Lost(error) => {
                tracing::warn!(%prefix, %error, retry_in = ?backoff, "watch_lost");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = tx.closed() => return,
            _ = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
    }
}

impl Store for EtcdStore {
    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            with_timeout("put", client.put(key, value, None)).await.map(drop)
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let resp = with_timeout("get", client.get(key, None)).await?;
            Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
        })
    }

    fn get_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<KeyValue>, StoreError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            snapshot(&mut client, prefix).await.map(|(kvs, _)| kvs)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let resp = with_timeout("delete", client.delete(key, None)).await?;
            Ok(resp.deleted() > 0)
        })
    }

    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let resp = with_timeout("grant_lease", client.lease_grant(ttl_secs(ttl), None)).await?;
            Ok(LeaseId(resp.id()))
        })
    }

    fn put_with_lease<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let options = PutOptions::new().with_lease(lease.0);
            let call = client.put(key, value, Some(options));
            with_timeout_map("put_with_lease", call, |e| map_lease_err("put_with_lease", lease, e)).await.map(drop)
        })
    }

    fn create_with_lease<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let txn = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease.0)))])
                .or_else([TxnOp::get(key, None)]);
            let call = client.txn(txn);
            let resp =
                with_timeout_map("create_with_lease", call, |e| map_lease_err("create_with_lease", lease, e)).await?;
            if resp.succeeded() {
                return Ok(true);
            }
            // Refused: ours anyway if an earlier attempt created it and its answer was lost.
            let held_by_us = resp.op_responses().into_iter().any(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => get.kvs().iter().any(|kv| kv.lease() == lease.0),
                _ => false,
            });
            Ok(held_by_us)
        })
    }

    fn put_fenced<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        guard: &'a str,
        lease: LeaseId,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let txn = Txn::new()
                .when([Compare::lease(guard, CompareOp::Equal, lease.0)])
                .and_then([TxnOp::put(key, value, None)]);
            let resp = with_timeout("put_fenced", client.txn(txn)).await?;
            Ok(resp.succeeded())
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<Duration, StoreError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let map = |e| map_lease_err("keep_alive", lease, e);
            // Opening the stream sends one keep-alive and reads its answer; etcd-client reports
            // a lease etcd does not know (TTL 0) as `LeaseKeepAliveError`, which also covers
            // a broken stream, so ask the lease's TTL to tell the two apart.
            match with_timeout_map("keep_alive", client.lease_keep_alive(lease.0), map).await {
                Ok(_) => {}
                Err(StoreError::Unavailable { .. }) if !lease_exists(&mut client, lease).await? => {
                    return Err(StoreError::LeaseExpired(lease));
                }
                Err(e) => return Err(e),
            }
            // The granted TTL, which the refresh just restored.
            let resp = with_timeout_map("keep_alive", client.lease_time_to_live(lease.0, None), map).await?;
            match resp.granted_ttl() {
                ttl if ttl > 0 && resp.ttl() > 0 => Ok(Duration::from_secs(ttl.unsigned_abs())),
                _ => Err(StoreError::LeaseExpired(lease)),
            }
        })
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let call = client.lease_revoke(lease.0);
            match with_timeout_map("revoke", call, |e| map_lease_err("revoke", lease, e)).await {
                Ok(_) | Err(StoreError::LeaseExpired(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    fn watch_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<mpsc::Receiver<WatchEvent>, StoreError>> {
        Box::pin(async move {
            if self.cancel.is_cancelled() {
                return Err(StoreError::Closed);
            }
            let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
            self.tasks.spawn(run_watch(self.client.clone(), prefix.to_owned(), tx, self.cancel.clone()));
            Ok(rx)
        })
    }
}

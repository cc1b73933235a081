//! Running a gRPC server the way every process of the cluster does: bound on a given
//! address, with standard health checking (`grpc.health.v1`) and server reflection next to
//! the role's own services, stopped by a cancellation token.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// Largest message a server or client accepts by default (4 MiB, gRPC's usual limit).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// HTTP/2 flow-control windows: large enough that a latent-cache transfer is not throttled
/// by round trips (the defaults are 64 KiB).
pub const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
pub const CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;

/// HTTP/2 keepalive: a peer that stops answering pings is dropped within interval + timeout.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {err}")]
    Bind { addr: String, err: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
}

/// Binds `addr` (port 0 picks a free one) and returns the listener and the bound address.
pub async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), ServeError> {
    let listener = TcpListener::bind(addr).await.map_err(|err| ServeError::Bind { addr: addr.to_string(), err })?;
    let local = listener.local_addr().map_err(|err| ServeError::Bind { addr: addr.to_string(), err })?;
    Ok((listener, local))
}

/// The health reporter of a running server: services are marked serving once the process
/// is ready, and not serving while it drains.
pub type HealthReporter = tonic_health::server::HealthReporter;

/// The role's services, for reflection: the encoded `FileDescriptorSet` that defines them
/// and their full names (only these are listed).
#[derive(Debug, Clone, Copy)]
pub struct Described<'a> {
    pub descriptor_set: &'a [u8],
    pub services: &'a [&'a str],
}

/// Serves `routes` plus health and reflection on `listener` until `shutdown` is cancelled;
/// in-flight calls then finish. `health` receives the reporter before serving starts.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    described: Described<'_>,
    health: impl FnOnce(HealthReporter),
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    health(reporter);
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(described.descriptor_set)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for name in described.services {
            b = b.with_service_name(*name);
        }
        b
    };
    let reflection = builder().build_v1().map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_alpha = builder().build_v1alpha().map_err(|e| ServeError::Reflection(e.to_string()))?;
    let routes = routes.add_service(health_service).add_service(reflection).add_service(reflection_alpha);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Accepted connections with Nagle's algorithm off (the server builder's `tcp_nodelay` only
/// applies to listeners it binds itself); small messages would otherwise wait on delayed ACKs.
fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// A client channel to `addr` (`host:port` or a URL), connected lazily, with the same
/// keepalive as the servers so a dead peer is noticed.
pub fn channel(addr: &str, connect_timeout: Duration) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Ok(tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Cancels `token` on SIGINT or SIGTERM (the first one starts a graceful drain).
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let term = async {
            #[cfg(unix)]
            if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                s.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutdown_signal");
        token.cancel();
    });
}

/// The line a process prints on stdout once it serves and is registered, so scripts and the
/// test harness can wait for it: `{"event":"ready","role":"decode","worker_id":"...","addr":"127.0.0.1:PORT"}`.
pub fn announce_ready(ready: &Ready) {
    let line = serde_json::json!({
        "event": "ready",
        "role": ready.role.as_str(),
        "worker_id": ready.worker_id.as_str(),
        "addr": ready.addr.to_string(),
    });
    println!("{line}");
}

/// What a role's `run` reports once it serves and is registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub role: crate::Role,
    /// The id the worker registered under.
    pub worker_id: crate::WorkerId,
    /// The bound gRPC address.
    pub addr: SocketAddr,
}

//! Logging and distributed tracing. Logs go to stderr (`RUST_LOG`); with an OTLP endpoint
//! (`--otlp-endpoint` or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`) spans are also exported
//! over OTLP/gRPC, batched (`OTEL_BSP_*`), named by `OTEL_SERVICE_NAME` (default: the role).
//! Without an endpoint no OpenTelemetry layer is installed: spans cost what `tracing` costs.
//!
//! W3C trace context crosses every gRPC hop: [`inject`] puts the current span's context into
//! request metadata (`traceparent`), [`extract_into`] makes an incoming context the parent
//! of a span; [`traceparent`] / [`parent_from`] do the same through a message field, for
//! calls on a long-lived stream.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Default log filter: our info, the transport's warnings.
const DEFAULT_LOG_FILTER: &str = "info,h2=warn,tower=warn,hyper=warn";

/// The tracing flags every serving binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct TracingArgs {
    /// Export spans over OTLP/gRPC to this collector (e.g. http://otel-collector:4317); off
    /// when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans; default: the role.
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,
}

/// Flushes and stops the exporter when dropped (keep it alive until `main` returns).
#[derive(Debug)]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("trace export shutdown: {e}");
        }
    }
}

/// The exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot export traces to {endpoint}: {reason}")]
pub struct TracingError {
    pub endpoint: String,
    pub reason: String,
}

impl TracingArgs {
    /// Installs logging, and span export when an endpoint is set. Call once, inside the
    /// tokio runtime (the exporter's gRPC channel lives on it).
    pub fn init(&self, role: &str) -> Result<TracingGuard, TracingError> {
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)));
        let Some(endpoint) = self.otlp_endpoint.clone().filter(|e| !e.is_empty()) else {
            let _ = tracing_subscriber::registry().with(logs).try_init();
            return Ok(TracingGuard { provider: None });
        };
        let err = |reason: String| TracingError { endpoint: endpoint.clone(), reason };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| err(e.to_string()))?;
        let name = self.otel_service_name.clone().unwrap_or_else(|| role.to_string());
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(name).build();
        let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        // Only our spans: the exporter's own gRPC calls (h2, tonic, tower, hyper) would
        // otherwise be traced and exported, forever.
        let spans = tracing_opentelemetry::layer().with_tracer(provider.tracer("expertmesh")).with_filter(
            tracing_subscriber::filter::filter_fn(|meta| {
                let target = meta.target();
                meta.is_span()
                    && *meta.level() <= tracing::Level::INFO
                    && !["h2", "tonic", "tower", "hyper", "opentelemetry"].iter().any(|t| target.starts_with(t))
            }),
        );
        let _ = tracing_subscriber::registry().with(logs).with(spans).try_init();
        tracing::info!(%endpoint, "trace_export_enabled");
        Ok(TracingGuard { provider: Some(provider) })
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), value.parse()) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Puts `span`'s context into outgoing request metadata (`traceparent`).
pub fn inject(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(metadata)));
}

/// Makes the context in incoming `metadata` (if any) the parent of `span`.
pub fn extract_into(metadata: &tonic::metadata::MetadataMap, span: &tracing::Span) {
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// `span`'s context as a W3C `traceparent` value (empty when not exported).
pub fn traceparent(span: &tracing::Span) -> String {
    let mut carrier = HashMap::new();
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent").unwrap_or_default()
}

/// The span context a W3C `traceparent` value names (`None` when empty or invalid).
fn context_from(traceparent: &str) -> Option<opentelemetry::Context> {
    if traceparent.is_empty() {
        return None;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes a W3C `traceparent` value the parent of `span` (nothing when empty or invalid).
pub fn parent_from(traceparent: &str, span: &tracing::Span) {
    if let Some(cx) = context_from(traceparent) {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the span whose context is the W3C `traceparent` value (batch spans link
/// to the requests they serve).
pub fn link_to(traceparent: &str, span: &tracing::Span) {
    if let Some(cx) = context_from(traceparent) {
        span.add_link(cx.span().span_context().clone());
    }
}

/// The trace id of `span` in hex, or `None` when spans are not exported.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

//! Tracing set-up. Logs always go to stderr (filter: `RUST_LOG`, default
//! `info`). Spans are exported over OTLP/gRPC only when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` variable is set (Jaeger listens on 4317);
//! the exporter also honours the other standard `OTEL_EXPORTER_OTLP_*`
//! variables. The W3C trace-context propagator is installed either way so
//! that `traceparent` headers pass through services that do not export.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Keeps the exporter alive; flushes pending spans when dropped.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(Err(err)) = self.provider.take().map(|p| p.shutdown()) {
            eprintln!("telemetry: span exporter shutdown failed: {err}");
        }
    }
}

/// Installs logging and, if configured, OTLP span export for `service`.
pub fn init(service: &'static str) -> anyhow::Result<TelemetryGuard> {
    let provider = if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name(service).build())
                .build(),
        )
    } else {
        None
    };
    install(service, provider)
}

/// Installs logging and the given tracer provider (tests use an in-memory
/// exporter this way).
pub fn init_with_provider(
    service: &'static str,
    provider: SdkTracerProvider,
) -> anyhow::Result<TelemetryGuard> {
    install(service, Some(provider))
}

fn install(
    service: &'static str,
    provider: Option<SdkTracerProvider>,
) -> anyhow::Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()?;
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    Ok(TelemetryGuard { provider })
}

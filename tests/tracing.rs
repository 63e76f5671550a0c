//! One HTTP request is one trace across ingress, scheduler and session-state:
//! the W3C trace context travels in NATS headers. Spans are captured with the
//! OpenTelemetry SDK's in-memory exporter (this file is its own test process,
//! because the tracing subscriber is global).

use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use std::time::{Duration, Instant};
use tether_universe::{Options, Universe};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_services() -> anyhow::Result<()> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let _guard = tether_telemetry::init_with_provider("tether-tests", provider)?;

    let u = Universe::start(Options::default()).await?;
    let r = u.chat(Some("traced"), "follow me", 4).await?;
    assert_eq!(r.status, 200, "{}", r.text());

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let spans = exporter.get_finished_spans()?;
        let trace_of = |name: &str| {
            spans
                .iter()
                .filter(|s| s.name == name)
                .map(|s| s.span_context.trace_id())
                .collect::<Vec<_>>()
        };
        let ingress = trace_of("ingress.call");
        if let Some(trace) = ingress.first() {
            let scheduler = trace_of("scheduler.route");
            let state = trace_of("session_state.apply");
            // Both lifecycle events (dispatched, finished) reach session-state.
            if scheduler.contains(trace) && state.iter().filter(|t| *t == trace).count() >= 2 {
                assert_eq!(ingress.len(), 1);
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "spans never formed one trace: {:?}",
            spans
                .iter()
                .map(|s| (s.name.to_string(), s.span_context.trace_id()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

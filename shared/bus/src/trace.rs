//! W3C trace context (`traceparent`, `tracestate`) carried in NATS headers,
//! so that one client request is one trace across services.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use std::str::FromStr;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Propagator output is ASCII without CR/LF; `from_str` checks anyway,
        // and a value it refuses is dropped rather than allowed to panic.
        if let Ok(value) = async_nats::HeaderValue::from_str(&value) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the current span's trace context into `headers`.
pub fn inject_context(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers));
    });
}

/// Reads a trace context from a message's headers (an empty context if none).
pub fn extract_context(headers: Option<&HeaderMap>) -> opentelemetry::Context {
    match headers {
        Some(h) => {
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(h)))
        }
        None => opentelemetry::Context::new(),
    }
}

/// Makes `span` a child of the trace carried by `msg`, if any, and gives it
/// OpenTelemetry's messaging attributes for processing a message from NATS
/// (declare `otel.kind = "server"` or `"consumer"` on the span itself).
pub fn follow(span: &tracing::Span, msg: &async_nats::Message) {
    if msg.headers.is_some() {
        let _ = span.set_parent(extract_context(msg.headers.as_ref()));
    }
    span.set_attribute("messaging.system", "nats");
    span.set_attribute("messaging.operation.type", "process");
    span.set_attribute("messaging.destination.name", msg.subject.to_string());
}

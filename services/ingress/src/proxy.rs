//! Forwarding a call to its engine. The request is sent with the client's
//! content type and the current trace context (`traceparent`, which vLLM
//! and SGLang can continue); the response comes back as a stream.

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::Full;
use hyper::body::Incoming;
use opentelemetry::propagation::Injector;
use std::time::Duration;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::errors::ApiError;
use crate::request::Endpoint;
use crate::service::App;

struct HttpInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HttpInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            header::HeaderName::from_bytes(key.as_bytes()),
            header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

pub async fn forward(
    app: &App,
    engine: usize,
    endpoint: Endpoint,
    body: Bytes,
    timeout: Duration,
) -> Result<http::Response<Incoming>, (ApiError, &'static str)> {
    let e = &app.fleet.engines[engine];
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(e.endpoint(endpoint.path()))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|err| {
            (
                ApiError::engine_failed(format!("engine {} has a bad URL: {err}", e.name)),
                "connect",
            )
        })?;
    // The engine call: an HTTP client span (OpenTelemetry HTTP and GenAI
    // conventions); the engine may continue it from `traceparent`.
    let span = tracing::info_span!(
        "engine.call",
        otel.name = "POST",
        otel.kind = "client",
        http.request.method = "POST",
        url.full = %req.uri(),
        server.address = req.uri().host().unwrap_or_default(),
        http.response.status_code = tracing::field::Empty,
        gen_ai.operation.name = match endpoint {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "text_completion",
        },
        gen_ai.provider.name = match e.kind {
            tether_fleet::EngineKind::Vllm => "vllm",
            tether_fleet::EngineKind::Sglang => "sglang",
            tether_fleet::EngineKind::Openai => "openai",
        },
        tether.engine = e.name.as_str(),
    );
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HttpInjector(req.headers_mut()))
    });
    let sent = tokio::time::timeout(timeout, app.client.request(req))
        .instrument(span.clone())
        .await;
    if let Ok(Ok(resp)) = &sent {
        span.record("http.response.status_code", resp.status().as_u16());
    }
    match sent {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(err)) => Err((
            ApiError::engine_failed(format!("engine {} failed: {err}", e.name)),
            "connect",
        )),
        Err(_) => Err((
            ApiError::engine_failed(format!(
                "engine {} sent no response headers within {:.1} s",
                e.name,
                timeout.as_secs_f64()
            )),
            "timeout",
        )),
    }
}

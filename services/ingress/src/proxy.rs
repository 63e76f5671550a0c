//! Forwarding a call to its engine. The request is sent with the client's
//! content type and the current trace context (`traceparent`, which vLLM
//! and SGLang can continue); the response comes back as a stream.

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::Full;
use hyper::body::Incoming;
use opentelemetry::propagation::Injector;
use std::time::Duration;
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
) -> Result<http::Response<Incoming>, ApiError> {
    let e = &app.fleet.engines[engine];
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(e.endpoint(endpoint.path()))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|err| {
            ApiError::engine_failed(format!("engine {} has a bad URL: {err}", e.name))
        })?;
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HttpInjector(req.headers_mut()))
    });
    match tokio::time::timeout(
        Duration::from_secs(app.engine_timeout_secs),
        app.client.request(req),
    )
    .await
    {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(err)) => Err(ApiError::engine_failed(format!(
            "engine {} failed: {err}",
            e.name
        ))),
        Err(_) => Err(ApiError::engine_failed(format!(
            "engine {} did not answer in time",
            e.name
        ))),
    }
}

//! Forwarding a call to its engine. The request is sent with the client's
//! content type and the current trace context (`traceparent`, which vLLM
//! and SGLang can continue); the response comes back as a stream, whose
//! first frame may be read ahead ([`Primed`]).

use bytes::{Buf, Bytes};
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use opentelemetry::propagation::Injector;
use std::pin::Pin;
use std::task::{Context, Poll};
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

/// An engine's response body, its first frame perhaps read ahead: a stream
/// is handed to the client only once it has started.
pub struct Primed {
    first: Option<Frame<Bytes>>,
    rest: Incoming,
}

/// Why a stream did not start.
pub enum FirstFrame {
    /// No frame within the bound.
    Late,
    /// The body failed before its first frame.
    Broken(hyper::Error),
}

impl Primed {
    /// The body as it comes, nothing read ahead.
    pub fn new(rest: Incoming) -> Self {
        Self { first: None, rest }
    }

    /// Reads the body's first frame within `within` (an empty body is
    /// started too: it simply ends).
    pub async fn first_frame(mut rest: Incoming, within: Duration) -> Result<Self, FirstFrame> {
        match tokio::time::timeout(within, rest.frame()).await {
            Err(_) => Err(FirstFrame::Late),
            Ok(Some(Err(err))) => Err(FirstFrame::Broken(err)),
            Ok(first) => Ok(Self {
                first: first.and_then(Result::ok),
                rest,
            }),
        }
    }
}

impl Body for Primed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        match this.first.take() {
            Some(frame) => Poll::Ready(Some(Ok(frame))),
            None => Pin::new(&mut this.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.size_hint();
        let ahead = self
            .first
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |d| d.remaining() as u64);
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ahead);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}

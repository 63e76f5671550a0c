//! The HTTP routes.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use opentelemetry::propagation::Extractor;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_protocol::{Outcome, SessionKey, SessionQuery, SessionView, shard_of};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::errors::ApiError;
use crate::request::{CallBody, Endpoint};
use crate::routing::route;
use crate::service::App;
use crate::session::{in_namespace, session_key_salted};
use crate::tracker::{CallInfo, TrackedBody, Tracker};

pub async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    call(app, Endpoint::Chat, headers, body).await
}

pub async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    call(app, Endpoint::Completions, headers, body).await
}

struct HttpExtractor<'a>(&'a HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

async fn call(app: Arc<App>, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    // The HTTP server span (OpenTelemetry HTTP and GenAI conventions) with
    // Tether's attributes. The session appears only as its hash: never the
    // raw key, never prompt text.
    let span = tracing::info_span!(
        "ingress.call",
        otel.name = %format_args!("POST {}", endpoint.path()),
        otel.kind = "server",
        http.request.method = "POST",
        http.route = endpoint.path(),
        url.path = endpoint.path(),
        http.response.status_code = tracing::field::Empty,
        gen_ai.request.model = tracing::field::Empty,
        engine = tracing::field::Empty,
        call_id = tracing::field::Empty,
        tether.session.hash = tracing::field::Empty,
        tether.route.reason = tracing::field::Empty,
        tether.route.fallback = tracing::field::Empty,
        tether.level = tracing::field::Empty,
        tether.queue.wait_seconds = tracing::field::Empty,
    );
    // Continue the client's trace if it sent one.
    if headers.contains_key("traceparent") {
        let parent =
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&HttpExtractor(&headers)));
        let _ = span.set_parent(parent);
    }
    // With API keys configured, the key names the call's tenant.
    let tenant = match &app.keys {
        None => None,
        Some(keys) => match keys.tenant(&headers) {
            Ok(t) => Some(t),
            Err(err) => {
                span.record("http.response.status_code", err.status.as_u16());
                app.metrics
                    .calls
                    .get_or_create(&crate::metrics::call_labels("client_error", None))
                    .inc();
                return err.into_response();
            }
        },
    };
    let answer = handle(app.clone(), endpoint, headers, body, tenant.clone())
        .instrument(span.clone())
        .await;
    let status = match &answer {
        Ok(resp) => resp.status(),
        Err(err) => err.status,
    };
    span.record("http.response.status_code", status.as_u16());
    match answer {
        Ok(resp) => resp,
        Err(err) if err.counted => err.into_response(),
        Err(err) => {
            let outcome = if err.status.is_server_error() {
                "error"
            } else {
                "client_error"
            };
            app.metrics
                .calls
                .get_or_create(&crate::metrics::call_labels(outcome, tenant.as_deref()))
                .inc();
            err.into_response()
        }
    }
}

async fn handle(
    app: Arc<App>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
    tenant: Option<Arc<str>>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    // `_budget` keeps the body's bytes counted until the call is answered.
    let (raw, _budget) = read_body(&app, body).await?;
    let call = CallBody::parse(endpoint, raw)?;
    // The key as the client knows it, and as the bus does (in the tenant's namespace).
    let client_key = session_key_salted(
        &headers,
        &app.session_headers,
        &app.session_field,
        &call,
        &app.session_salt,
    )?;
    let key = in_namespace(tenant.as_deref(), client_key.clone())?;
    let call_id = app.next_call_id();
    let span = tracing::Span::current();
    span.record(
        "tether.session.hash",
        tracing::field::display(format_args!("{:016x}", key.hash())),
    );
    span.record("call_id", call_id);
    span.record("gen_ai.request.model", call.model.as_str());

    // A program: the client says so, or the session runs calls in parallel.
    let parallel = app.programs.enter(key.hash());
    let program = parallel
        || app
            .program_headers
            .iter()
            .any(|h| headers.contains_key(h.as_str()));
    let mut r = match route(&app, call_id, &key, &call, program).await {
        Ok(r) => r,
        Err(e) => {
            app.programs.leave(key.hash());
            return Err(e);
        }
    };
    span.record("tether.route.reason", r.reason.as_str());
    span.record(
        "tether.route.fallback",
        r.reason == tether_protocol::RouteReason::Fallback,
    );
    span.record("tether.level", r.level);
    // From here the scheduler counts the call: every path reports its end.
    let mut tracker = Tracker::new(
        app.clone(),
        CallInfo {
            call_id,
            session_hash: key.hash(),
            session_key: key.as_str().to_owned(),
            engine: r.engine,
            inherited_cst: r.inherited_cst,
            level: r.level,
            arrived,
            stream: call.stream,
            prompt_estimate: u32::try_from(call.raw_len() / 4).unwrap_or(u32::MAX),
            span: span.clone(),
            tenant: tenant.clone(),
        },
    );
    let crate::dispatch::Answered {
        engine,
        parts,
        body: incoming,
    } = crate::dispatch::run(
        &app,
        call_id,
        key.hash(),
        endpoint,
        &call,
        &mut r,
        &mut tracker,
    )
    .await?;
    app.metrics
        .time_to_headers
        .observe(arrived.elapsed().as_secs_f64());
    app.recent.set(key.hash(), engine);
    let e = &app.fleet.engines[engine];
    let (body, headers): (Body, &[http::header::HeaderName]) = if parts.status.is_success() {
        let headers = &[http::header::CONTENT_TYPE, http::header::CACHE_CONTROL];
        (Body::new(TrackedBody::new(incoming, tracker)), headers)
    } else {
        // The engine refused the request (4xx): its error is the client's to see.
        let bytes = crate::dispatch::error_body(incoming).await;
        tracker.finish(Outcome::EngineError);
        (Body::from(bytes), &[http::header::CONTENT_TYPE])
    };
    let mut out = Response::new(body);
    *out.status_mut() = parts.status;
    for name in headers {
        copy_header(&parts.headers, out.headers_mut(), name.clone());
    }
    tether_headers(
        out.headers_mut(),
        &e.name,
        &client_key,
        r.level,
        r.reason.as_str(),
    );
    Ok(out)
}

fn copy_header(from: &http::HeaderMap, to: &mut http::HeaderMap, name: http::header::HeaderName) {
    if let Some(v) = from.get(&name) {
        to.insert(name, v.clone());
    }
}

fn tether_headers(
    h: &mut http::HeaderMap,
    engine: &str,
    key: &SessionKey,
    level: u8,
    reason: &str,
) {
    if let Ok(v) = HeaderValue::from_str(engine) {
        h.insert("x-tether-engine", v);
    }
    // Keys are validated free of control characters; non-ASCII goes out as obs-text.
    if let Ok(v) = HeaderValue::from_bytes(key.as_str().as_bytes()) {
        h.insert("x-tether-session", v);
    }
    h.insert("x-tether-priority", HeaderValue::from(u16::from(level)));
    if let Ok(v) = HeaderValue::from_str(reason) {
        h.insert("x-tether-route", v);
    }
}

/// Reads the request body: at most `max_body_bytes`, within the body-read
/// timeout, and only while the bytes buffered over all calls stay within
/// their bound (503 + Retry-After beyond). The returned permit holds the
/// body's share of that bound; drop it with the body.
async fn read_body(
    app: &App,
    mut body: Body,
) -> Result<(Bytes, Option<tokio::sync::OwnedSemaphorePermit>), ApiError> {
    let limit = app.max_body_bytes;
    let read = async {
        let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|err| {
                ApiError::bad_request(
                    "invalid_body",
                    format!("could not read the request body: {err}"),
                )
            })?;
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            if buf.len() + chunk.len() > limit {
                return Err(ApiError::too_large(limit));
            }
            let n = u32::try_from(chunk.len()).map_err(|_| ApiError::too_large(limit))?;
            match app.body_budget.clone().try_acquire_many_owned(n) {
                Ok(p) => match &mut held {
                    Some(h) => h.merge(p),
                    None => held = Some(p),
                },
                Err(_) => {
                    app.metrics.body_busy.inc();
                    return Err(ApiError::busy());
                }
            }
            buf.extend_from_slice(&chunk);
        }
        Ok((buf.freeze(), held))
    };
    match app.body_read_timeout {
        None => read.await,
        Some(t) => tokio::time::timeout(t, read).await.unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "body_timeout",
                format!("the request body did not arrive within {} s", t.as_secs()),
            ))
        }),
    }
}

pub async fn models(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    if let Some(keys) = &app.keys {
        keys.tenant(&headers)?;
    }
    let data: Vec<serde_json::Value> = app
        .fleet
        .models()
        .into_iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "tether"}))
        .collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data})))
}

/// `GET /v1/tether/sessions/{key}`: the system's view of one session, from
/// the shard that owns it. With API keys configured it needs a key, and
/// shows only that key's tenant's sessions.
pub async fn session(
    State(app): State<Arc<App>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = match &app.keys {
        Some(keys) => Some(keys.tenant(&headers)?),
        None => None,
    };
    let client_key = SessionKey::explicit(&key)
        .map_err(|e| ApiError::bad_request("invalid_session_key", e.to_string()))?;
    let key = in_namespace(tenant.as_deref(), client_key.clone())?;
    let shard = shard_of(key.hash(), app.shards);
    let view: SessionView = app
        .bus
        .request(
            app.bus.subjects.session(shard),
            &SessionQuery {
                session_key: key.as_str().to_owned(),
            },
            Duration::from_secs(2),
        )
        .await
        .map_err(|e| {
            ApiError::unavailable(
                "session_state_unavailable",
                format!("session state is unavailable: {e}"),
            )
        })?;
    let Some(r) = view.record else {
        return Err(ApiError::not_found(
            "session_not_found",
            format!("no session {:?}", client_key.as_str()),
        ));
    };
    Ok(Json(serde_json::json!({
        "session": client_key.as_str(),
        "hash": format!("{:016x}", r.hash),
        "shard": view.shard,
        "critical_path_service_s": r.cst,
        "attained_service_s": r.attained,
        "wait_s": r.wait,
        "requests": r.requests,
        "in_flight": r.in_flight,
        "in_flight_calls": view.in_flight_calls,
        "affinity": r.affinity,
        "last_active_ms": r.last_active_ms,
        "version": r.version,
    })))
}

pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        "no such route",
    )
}

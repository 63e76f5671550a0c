//! The HTTP surface: `/v1/chat/completions` and `/v1/completions` (whole or
//! streamed as SSE), `/v1/models`, `/health`, `/metrics`. Every response
//! carries `x-engine-name`. Handlers hand requests to the engine task and
//! relay its tokens; a client that goes away drops its receiver, which
//! aborts its sequence.

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tether_telemetry::Shutdown;
use tokio::sync::mpsc;

use crate::actor::{EngineHandle, Event, spawn};
use crate::config::SimConfig;
use crate::engine::{Request, Usage};
use crate::metrics::Metrics;
use crate::openai::{self, ApiError, Completion, Kind, Meta};
use crate::tokens::tokenize;

/// Request bodies up to this size are read (axum's default, 2 MB, is less
/// than a prompt of `max_model_len` words can take).
const MAX_BODY: usize = 64 << 20;

struct App {
    cfg: SimConfig,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    ids: AtomicU64,
}

/// Serves the simulator on `listener` (with `TCP_NODELAY`) until `shutdown`
/// completes. Each call owns its engine and metrics: several can run in
/// one process.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: SimConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let stop = Shutdown::new();
    let trip = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trip.cancel();
    });
    let metrics = Arc::new(Metrics::new(&config));
    let kv_events = match crate::kv_events::start(&config, stop.clone()).await {
        Ok(Some((tx, bound))) => {
            tracing::info!(events = %bound.events, replay = ?bound.replay, "publishing KV cache events");
            Some(tx)
        }
        Ok(None) => None,
        Err(e) => {
            stop.cancel();
            return Err(e);
        }
    };
    let engine = spawn(config.clone(), metrics.clone(), stop.clone(), kv_events);
    let app = Arc::new(App {
        cfg: config,
        engine,
        metrics,
        ids: AtomicU64::new(1),
    });
    tether_telemetry::serve_http(listener, router(app), stop).await?;
    Ok(())
}

fn router(app: Arc<App>) -> Router {
    let name =
        HeaderValue::from_str(&app.cfg.name).unwrap_or_else(|_| HeaderValue::from_static("sim"));
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/kv_cache/blocks", get(cached_blocks))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            error(ApiError {
                status: StatusCode::NOT_FOUND,
                code: "not_found",
                message: "no such route".into(),
            })
        })
        .with_state(app)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(move |mut r: Response| {
            let name = name.clone();
            async move {
                r.headers_mut().insert("x-engine-name", name);
                r
            }
        }))
}

fn error(e: ApiError) -> Response {
    (e.status, Json(e.body())).into_response()
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let data: Vec<Value> = app
        .cfg
        .models
        .iter()
        .map(|m| {
            json!({"id": m, "object": "model", "created": 0, "owned_by": app.cfg.name,
            "max_model_len": app.cfg.max_model_len})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
}

/// vLLM's `POST /reset_prefix_cache`: 200 when the cache was dropped (an
/// `AllBlocksCleared` event follows), 409 while sequences hold blocks.
async fn reset_prefix_cache(State(app): State<Arc<App>>) -> Response {
    if app.engine.reset_prefix_cache().await {
        (StatusCode::OK, Json(json!({"reset": true}))).into_response()
    } else {
        error(ApiError {
            status: StatusCode::CONFLICT,
            code: "cache_in_use",
            message: "sequences hold KV blocks; the prefix cache was not reset".into(),
        })
    }
}

/// `GET /kv_cache/blocks`: `{"blocks": [hash, …]}`, every cached block's
/// hash (engine-sim only: lets a test compare a router's index with it).
async fn cached_blocks(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"blocks": app.engine.cached_blocks().await}))
}

async fn chat(State(app): State<Arc<App>>, body: Bytes) -> Response {
    complete(app, Kind::Chat, body).await.unwrap_or_else(error)
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    complete(app, Kind::Completion, body)
        .await
        .unwrap_or_else(error)
}

async fn complete(app: Arc<App>, kind: Kind, body: Bytes) -> Result<Response, ApiError> {
    let req = Completion::parse(kind, &body, &app.cfg)?;
    let prompt = tokenize(&req.prompt);
    // Absent, max_tokens is the default, capped by what the context leaves.
    let max_tokens = req.max_tokens.unwrap_or_else(|| {
        app.cfg
            .default_max_tokens
            .min(app.cfg.max_model_len.saturating_sub(prompt.len()))
            .max(1)
    });
    app.metrics.count_priority(req.priority);
    let rx = app
        .engine
        .submit(Request {
            prompt,
            max_tokens,
            priority: req.priority,
        })
        .await?;
    let meta = Meta {
        id: format!(
            "{}-{}-{}",
            kind.id_prefix(),
            app.cfg.name,
            app.ids.fetch_add(1, Ordering::Relaxed)
        ),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: req.model,
        engine: app.cfg.name.clone(),
        kind,
    };
    if req.stream {
        Ok(stream_response(meta, rx, req.include_usage))
    } else {
        whole_response(meta, rx).await
    }
}

async fn whole_response(
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token(w) => {
                if !text.is_empty() {
                    text.push(' ');
                }
                text.push_str(w);
            }
            Event::Done(usage) => {
                return Ok(Json(openai::response(&meta, &text, &usage)).into_response());
            }
        }
    }
    Err(crate::engine::AddError::Stopped.into())
}

fn sse(v: &Value) -> Vec<u8> {
    format!("data: {v}\n\n").into_bytes()
}

/// An SSE stream: one chunk per token, sent as soon as the engine produces
/// it; then a chunk with the finish reason, the usage chunk if asked for,
/// and `data: [DONE]`.
fn stream_response(
    meta: Meta,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> Response {
    struct S {
        meta: Meta,
        rx: mpsc::UnboundedReceiver<Event>,
        index: usize,
        done: bool,
        include_usage: bool,
    }
    let state = S {
        meta,
        rx,
        index: 0,
        done: false,
        include_usage,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let out = match s.rx.recv().await? {
            Event::Token(w) => {
                s.index += 1;
                sse(&openai::token_chunk(&s.meta, s.index - 1, w))
            }
            Event::Done(u) => {
                s.done = true;
                end_of_stream(&s.meta, s.include_usage.then_some(&u))
            }
        };
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(out)), s))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn end_of_stream(meta: &Meta, usage: Option<&Usage>) -> Vec<u8> {
    let mut out = sse(&openai::finish_chunk(meta));
    if let Some(u) = usage {
        out.extend(sse(&openai::usage_chunk(meta, u)));
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}

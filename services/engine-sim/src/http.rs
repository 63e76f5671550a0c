//! The OpenAI-compatible HTTP surface: `/v1/chat/completions` and
//! `/v1/completions` (streamed as SSE or not, `usage` with
//! `prompt_tokens_details.cached_tokens`, `stream_options.include_usage`),
//! `/v1/models`, `/health`, `/metrics`. Every answer carries
//! `x-engine-name`.
//!
//! A chat prompt is its messages in order, each rendered as
//! `<|role|> content` on its own line, then tokenised (see [`crate::tokens`]).
//! The answer always has exactly `max_tokens` tokens (`finish_reason:
//! "length"`), as with vLLM's `ignore_eos`.

use axum::body::{Body, Bytes};
use axum::extract::State;
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
use crate::tokens::tokenize;

struct App {
    cfg: SimConfig,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    ids: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// Serves the simulator on `listener` (with `TCP_NODELAY`) until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: SimConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let stop = Shutdown::new();
    let trip = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trip.cancel();
    });
    let model = config
        .models
        .first()
        .cloned()
        .unwrap_or_else(|| "tether-sim".into());
    let metrics = Arc::new(Metrics::new(&config.name, &model, config.max_num_seqs));
    let engine = spawn(config.clone(), metrics.clone(), stop.clone());
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
        .route("/metrics", get(metrics))
        .with_state(app)
        .layer(axum::middleware::map_response(move |mut r: Response| {
            let name = name.clone();
            async move {
                r.headers_mut().insert("x-engine-name", name);
                r
            }
        }))
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({"error": {"message": message.into(), "type": "invalid_request_error", "code": code, "param": null}});
    (status, Json(body)).into_response()
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let data: Vec<Value> = app
        .cfg
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": app.cfg.name}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

async fn chat(State(app): State<Arc<App>>, body: Bytes) -> Response {
    complete(app, Kind::Chat, body).await
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    complete(app, Kind::Completion, body).await
}

fn content_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn prompt_of(kind: Kind, req: &Value) -> Result<String, &'static str> {
    match kind {
        Kind::Chat => {
            let Some(messages) = req.get("messages").and_then(Value::as_array) else {
                return Err("`messages` must be an array");
            };
            let mut text = String::new();
            for m in messages {
                let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
                text.push_str(&format!("<|{role}|> {}\n", content_text(m.get("content"))));
            }
            Ok(text)
        }
        Kind::Completion => match req.get("prompt") {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Array(a)) => Ok(a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n")),
            _ => Err("`prompt` must be a string"),
        },
    }
}

async fn complete(app: Arc<App>, kind: Kind, body: Bytes) -> Response {
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "body must be a JSON object",
            );
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("invalid JSON: {e}"),
            );
        }
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if !app.cfg.serves(&model) {
        return error(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("model {model:?} is not served here"),
        );
    }
    let prompt = match prompt_of(kind, &req) {
        Ok(p) => p,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "missing_required_parameter", msg),
    };
    let max_tokens = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64)
        .map_or(app.cfg.default_max_tokens, |n| {
            usize::try_from(n).unwrap_or(usize::MAX)
        });
    if max_tokens == 0 {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_value",
            "max_tokens must be at least 1",
        );
    }
    let priority = req.get("priority").and_then(Value::as_i64).unwrap_or(0);
    app.metrics.count_priority(priority);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let request = Request {
        prompt: tokenize(&prompt),
        max_tokens,
        priority,
    };
    let rx = match app.engine.submit(request).await {
        Ok(rx) => rx,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()),
    };
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        app.ids.fetch_add(1, Ordering::Relaxed)
    );
    let meta = Meta {
        id,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model,
        engine: app.cfg.name.clone(),
        kind,
    };
    if stream {
        stream_response(meta, rx, include_usage)
    } else {
        whole_response(meta, rx).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    engine: String,
    kind: Kind,
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

async fn whole_response(meta: Meta, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    let mut usage = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token(w) => {
                if !text.is_empty() {
                    text.push(' ');
                }
                text.push_str(w);
            }
            Event::Done(u) => {
                usage = Some(u);
                break;
            }
        }
    }
    let Some(usage) = usage else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "engine_stopped",
            "the engine stopped",
        );
    };
    let choice = match meta.kind {
        Kind::Chat => {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        }
        Kind::Completion => json!({"index": 0, "text": text, "finish_reason": "length"}),
    };
    Json(json!({
        "id": meta.id,
        "object": if meta.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.engine,
        "choices": [choice],
        "usage": usage_json(&usage),
    }))
    .into_response()
}

fn chunk(meta: &Meta, index: usize, word: &str) -> Bytes {
    let text = if index == 0 {
        word.to_owned()
    } else {
        format!(" {word}")
    };
    let finish_reason = Value::Null;
    let choice = match meta.kind {
        Kind::Chat => {
            let delta = if index == 0 {
                json!({"role": "assistant", "content": text})
            } else {
                json!({"content": text})
            };
            json!({"index": 0, "delta": delta, "finish_reason": finish_reason})
        }
        Kind::Completion => json!({"index": 0, "text": text, "finish_reason": finish_reason}),
    };
    let object = if meta.kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let body = json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "system_fingerprint": meta.engine, "choices": [choice]});
    Bytes::from(format!("data: {body}\n\n"))
}

/// The last chunk of a stream: no new text, the finish reason.
fn finish_chunk(meta: &Meta) -> Bytes {
    let choice = match meta.kind {
        Kind::Chat => json!({"index": 0, "delta": {}, "finish_reason": "length"}),
        Kind::Completion => json!({"index": 0, "text": "", "finish_reason": "length"}),
    };
    let object = if meta.kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let body = json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "system_fingerprint": meta.engine, "choices": [choice]});
    Bytes::from(format!("data: {body}\n\n"))
}

fn stream_response(
    meta: Meta,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> Response {
    // Each token goes out as soon as the engine produces it; the finish
    // reason follows in a last chunk with an empty delta, as OpenAI does.
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
        match s.rx.recv().await {
            Some(Event::Token(w)) => {
                let out = chunk(&s.meta, s.index, w);
                s.index += 1;
                Some((Ok::<Bytes, std::convert::Infallible>(out), s))
            }
            Some(Event::Done(u)) => {
                let mut out = Vec::new();
                out.extend_from_slice(&finish_chunk(&s.meta));
                if s.include_usage {
                    let object = if s.meta.kind == Kind::Chat {
                        "chat.completion.chunk"
                    } else {
                        "text_completion"
                    };
                    let body = json!({"id": s.meta.id, "object": object, "created": s.meta.created, "model": s.meta.model,
                        "system_fingerprint": s.meta.engine, "choices": [], "usage": usage_json(&u)});
                    out.extend_from_slice(format!("data: {body}\n\n").as_bytes());
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                s.done = true;
                Some((Ok(Bytes::from(out)), s))
            }
            None => None,
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

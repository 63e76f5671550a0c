//! `tether-instant-backend`: an OpenAI-compatible engine that answers every
//! call at once with a fixed completion, for measuring what a router adds
//! (`just bench-overhead`). It serves:
//!
//! - `POST /v1/chat/completions` and `/v1/completions`: a fixed completion,
//!   or with `"stream": true` an SSE stream of one content chunk, a final
//!   chunk with usage, and `data: [DONE]`;
//! - `GET /v1/models`: the configured model;
//! - `GET /health`: 200;
//! - `GET /metrics`: vLLM's load gauges, all zero (routers that scrape see
//!   an idle engine).
//!
//! It reads the request body (so the router's upload is paid for) but never
//! parses more than it must to tell streaming from not.

use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(about = "An OpenAI-compatible backend that answers every call at once")]
struct Args {
    /// Listen address.
    #[arg(long, env = "TETHER_INSTANT_LISTEN", default_value = "127.0.0.1:8190")]
    listen: SocketAddr,
    /// The model it reports and accepts.
    #[arg(long, env = "TETHER_INSTANT_MODEL", default_value = "tether-sim")]
    model: String,
    /// Name reported in `x-engine-name`.
    #[arg(long, env = "TETHER_INSTANT_NAME", default_value = "instant")]
    name: String,
}

struct Canned {
    completion: Bytes,
    stream: Bytes,
    models: Bytes,
    metrics: Bytes,
    name: http::HeaderValue,
}

impl Canned {
    fn new(a: &Args) -> anyhow::Result<Self> {
        let model = serde_json::Value::String(a.model.clone());
        let completion = serde_json::json!({
            "id": "cmpl-instant",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 16, "completion_tokens": 1, "total_tokens": 17},
        });
        let chunk = serde_json::json!({
            "id": "cmpl-instant", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": null}],
        });
        let last = serde_json::json!({
            "id": "cmpl-instant", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 16, "completion_tokens": 1, "total_tokens": 17},
        });
        let stream = format!("data: {chunk}\n\ndata: {last}\n\ndata: [DONE]\n\n");
        let models = serde_json::json!({
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "tether"}],
        });
        let metrics = [
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:gpu_cache_usage_perc",
            "vllm:kv_cache_usage_perc",
        ]
        .iter()
        .map(|m| format!("# TYPE {m} gauge\n{m}{{model_name=\"{}\"}} 0\n", a.model))
        .collect::<String>();
        Ok(Self {
            completion: Bytes::from(serde_json::to_vec(&completion)?),
            stream: Bytes::from(stream),
            models: Bytes::from(serde_json::to_vec(&models)?),
            metrics: Bytes::from(metrics),
            name: http::HeaderValue::from_str(&a.name)?,
        })
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// Whether a JSON body asks for a stream (`"stream": true`, any spacing).
fn wants_stream(body: &[u8]) -> bool {
    let Some(at) = body.windows(8).position(|w| w == b"\"stream\"") else {
        return false;
    };
    body[at + 8..]
        .iter()
        .skip_while(|b| b.is_ascii_whitespace() || **b == b':')
        .take(4)
        .eq(b"true".iter())
}

async fn serve(
    canned: Arc<Canned>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let mut r = match (method, path.as_str()) {
        (Method::POST, "/v1/chat/completions" | "/v1/completions") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return Ok(reply(
                        StatusCode::BAD_REQUEST,
                        "application/json",
                        Bytes::from_static(
                            br#"{"error":{"message":"unreadable body","type":"invalid_request_error"}}"#,
                        ),
                    ));
                }
            };
            if wants_stream(&body) {
                reply(StatusCode::OK, "text/event-stream", canned.stream.clone())
            } else {
                reply(
                    StatusCode::OK,
                    "application/json",
                    canned.completion.clone(),
                )
            }
        }
        (Method::GET, "/v1/models") => {
            reply(StatusCode::OK, "application/json", canned.models.clone())
        }
        (Method::GET, "/health") => reply(StatusCode::OK, "text/plain", Bytes::new()),
        (Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            canned.metrics.clone(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "application/json",
            Bytes::from_static(
                br#"{"error":{"message":"no such route","type":"invalid_request_error"}}"#,
            ),
        ),
    };
    r.headers_mut().insert("x-engine-name", canned.name.clone());
    Ok(r)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let canned = Arc::new(Canned::new(&args)?);
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!(
        "tether-instant-backend listening on {}",
        listener.local_addr()?
    );
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                // Out of descriptors and the like: keep serving the others.
                Err(_) => continue,
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let canned = canned.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| serve(canned.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::wants_stream;

    #[test]
    fn tells_streaming_calls() {
        assert!(wants_stream(br#"{"stream": true, "model": "m"}"#));
        assert!(wants_stream(br#"{"model":"m","stream":true}"#));
        assert!(!wants_stream(br#"{"model":"m","stream":false}"#));
        assert!(!wants_stream(br#"{"model":"m"}"#));
    }
}

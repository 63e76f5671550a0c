//! One streamed chat call and what it measured. Latencies are wall times
//! multiplied by the time scale, i.e. simulated seconds when the engines run
//! scaled (`--time-scale` on both sides).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

use crate::chunk::StreamState;
use crate::sse::SseDecoder;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// hyper-util's pooled HTTP/1 client, `TCP_NODELAY` on.
pub fn http_client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(c)
}

/// `base` + `/v1/chat/completions` (`/chat/completions` if `base` already
/// ends in `/v1`).
pub fn completions_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1") {
        format!("{base}/chat/completions")
    } else {
        format!("{base}/v1/chat/completions")
    }
}

/// One call's record (a line of `calls.jsonl`). Times in simulated seconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CallRecord {
    pub session: String,
    /// The step (turn) of the session, from 0.
    pub step: usize,
    /// The call within the step's fan-out, from 0.
    pub branch: usize,
    /// The request's line in the timestamp-sorted trace (Mooncake only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_index: Option<usize>,
    /// Sent, seconds after the run's start.
    pub sent_at: f64,
    /// Seconds spent waiting for `--concurrency-limit` before sending.
    #[serde(default)]
    pub queued: f64,
    /// Send lag: how late the replayer released the call's step against
    /// its plan (session start, think time or pause over), seconds — the
    /// replayer's own delay, e.g. a machine that cannot keep up.
    #[serde(default)]
    pub lag: f64,
    #[serde(default)]
    pub max_tokens: u32,
    /// HTTP status; 0 when no response arrived.
    pub status: u16,
    /// Time to first token.
    pub ttft: Option<f64>,
    /// Time per output token after the first: (e2e − ttft) / (completion_tokens − 1).
    pub tpot: Option<f64>,
    /// Sent → stream ended.
    pub e2e: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    /// `x-tether-engine`, when a Tether ingress answered.
    pub engine: Option<String>,
    pub error: Option<String>,
    /// The answer text (kept for the session's history, not written).
    #[serde(skip)]
    pub answer: String,
}

/// Where and how to call.
pub struct Target<'a> {
    pub client: &'a HttpClient,
    pub url: &'a str,
    pub model: &'a str,
    pub session_header: &'a str,
    /// More headers that carry the session id too.
    pub extra_session_headers: &'a [String],
    pub time_scale: f64,
    /// Wall-clock limit of one call.
    pub timeout: Option<Duration>,
}

/// The request body of a streamed chat call.
pub fn request_body(model: &str, messages: &[Value], max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

/// Sends one call and reads its stream to the end. Never fails: problems
/// are in the record's `error`.
pub async fn call(
    t: &Target<'_>,
    session: &str,
    messages: &[Value],
    max_tokens: u32,
) -> CallRecord {
    let mut rec = CallRecord {
        session: session.to_owned(),
        max_tokens,
        ..CallRecord::default()
    };
    let body = request_body(t.model, messages, max_tokens);
    let mut req = http::Request::post(t.url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "text/event-stream")
        .header(t.session_header, session);
    for h in t.extra_session_headers {
        req = req.header(h.as_str(), session);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string())));
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            rec.error = Some(format!("bad request: {e}"));
            return rec;
        }
    };
    let started = Instant::now();
    let mut st = StreamState::default();
    let fut = exchange(t.client, req, &mut rec, &mut st, started);
    match t.timeout {
        None => fut.await,
        Some(limit) => {
            if tokio::time::timeout(limit, fut).await.is_err() {
                rec.error = Some(format!(
                    "timed out after {:.3} s",
                    limit.as_secs_f64() * t.time_scale
                ));
            }
        }
    }
    let scale = t.time_scale;
    rec.e2e = started.elapsed().as_secs_f64() * scale;
    rec.ttft = st.first_token.map(|s| s * scale);
    if let Some(u) = st.usage {
        rec.prompt_tokens = u.prompt_tokens;
        rec.completion_tokens = u.completion_tokens;
        rec.cached_tokens = u.cached_tokens;
    }
    if rec.error.is_none() && (200..300).contains(&rec.status) {
        if let Some(e) = st.error {
            rec.error = Some(format!("stream error: {e}"));
        } else if !st.done {
            rec.error = Some("stream ended without [DONE]".to_owned());
        }
    }
    if let Some(ttft) = rec.ttft
        && rec.completion_tokens > 1
    {
        rec.tpot = Some((rec.e2e - ttft) / (rec.completion_tokens - 1) as f64);
    }
    rec.answer = st.answer;
    rec
}

async fn exchange(
    client: &HttpClient,
    req: http::Request<Full<Bytes>>,
    rec: &mut CallRecord,
    st: &mut StreamState,
    started: Instant,
) {
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => {
            rec.error = Some(error_chain(&e));
            return;
        }
    };
    rec.status = resp.status().as_u16();
    rec.engine = resp
        .headers()
        .get("x-tether-engine")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let ok = resp.status().is_success();
    let mut body = resp.into_body();
    let mut sse = SseDecoder::new();
    let mut error_body = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                rec.error = Some(error_chain(&e));
                return;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if !ok {
            if error_body.len() < 4096 {
                error_body.extend_from_slice(&data);
            }
            continue;
        }
        let at = started.elapsed().as_secs_f64();
        for ev in sse.push(&data) {
            st.on_event(&ev, at);
        }
    }
    if let Some(ev) = sse.finish() {
        st.on_event(&ev, started.elapsed().as_secs_f64());
    }
    if !ok {
        let text = String::from_utf8_lossy(&error_body);
        rec.error = Some(format!(
            "HTTP {}: {}",
            rec.status,
            text.chars().take(300).collect::<String>()
        ));
    }
}

/// An error and its sources, `: `-separated (hyper's top-level messages
/// alone say little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_bodies() {
        assert_eq!(
            completions_url("http://h:1/"),
            "http://h:1/v1/chat/completions"
        );
        assert_eq!(
            completions_url("http://h:1/v1"),
            "http://h:1/v1/chat/completions"
        );
        let b = request_body("m", &[json!({"role": "user", "content": "hi"})], 7);
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["max_tokens"], 7);
        assert_eq!(b["model"], "m");
        assert_eq!(b["messages"][0]["content"], "hi");
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_record() {
        // Bind then drop: a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = http_client();
        let url = completions_url(&format!("http://127.0.0.1:{port}"));
        let t = Target {
            client: &client,
            url: &url,
            model: "m",
            session_header: "x-session-id",
            extra_session_headers: &[],
            time_scale: 1.0,
            timeout: Some(Duration::from_secs(5)),
        };
        let r = call(&t, "s", &[], 4).await;
        assert_eq!(r.status, 0);
        assert!(r.error.is_some());
        assert_eq!((r.ttft, r.tpot), (None, None));
    }
}

//! One streamed chat call and what it measured. Latencies are wall times
//! multiplied by the time scale, i.e. simulated seconds when the engines run
//! scaled (`--time-scale` on both sides).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(c)
}

/// One call's record (a line of `calls.jsonl`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CallRecord {
    pub session: String,
    pub step: usize,
    pub branch: usize,
    /// Sent at, seconds after the run's start (simulated).
    pub sent_at: f64,
    pub status: u16,
    pub ttft: Option<f64>,
    pub tpot: Option<f64>,
    pub e2e: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub engine: Option<String>,
    pub error: Option<String>,
    #[serde(skip)]
    pub answer: String,
}

pub struct Target<'a> {
    pub client: &'a HttpClient,
    pub base_url: &'a str,
    pub model: &'a str,
    pub session_header: &'a str,
    pub time_scale: f64,
}

/// Splits complete SSE events off `buf`; returns their `data:` payloads.
pub fn take_events(buf: &mut Vec<u8>) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
        let event: Vec<u8> = buf.drain(..pos + 2).collect();
        for line in String::from_utf8_lossy(&event).lines() {
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.trim().to_owned());
            }
        }
    }
    out
}

pub async fn call(
    t: &Target<'_>,
    session: &str,
    messages: &[Value],
    max_tokens: u32,
) -> CallRecord {
    let mut rec = CallRecord {
        session: session.to_owned(),
        ..CallRecord::default()
    };
    let body = json!({
        "model": t.model, "messages": messages, "max_tokens": max_tokens, "ignore_eos": true,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let started = Instant::now();
    let scale = t.time_scale;
    let req = http::Request::post(format!(
        "{}/v1/chat/completions",
        t.base_url.trim_end_matches('/')
    ))
    .header("content-type", "application/json")
    .header(t.session_header, session)
    .body(Full::new(Bytes::from(body.to_string())));
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            rec.error = Some(e.to_string());
            return rec;
        }
    };
    let resp = match t.client.request(req).await {
        Ok(r) => r,
        Err(e) => {
            rec.error = Some(e.to_string());
            rec.e2e = started.elapsed().as_secs_f64() * scale;
            return rec;
        }
    };
    rec.status = resp.status().as_u16();
    rec.engine = resp
        .headers()
        .get("x-tether-engine")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut error_body = String::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                rec.error = Some(e.to_string());
                break;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if rec.status != 200 {
            error_body.push_str(&String::from_utf8_lossy(&data));
            continue;
        }
        buf.extend_from_slice(&data);
        for ev in take_events(&mut buf) {
            if ev == "[DONE]" {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&ev) else {
                continue;
            };
            if let Some(text) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
            {
                if rec.ttft.is_none() && !text.is_empty() {
                    rec.ttft = Some(started.elapsed().as_secs_f64() * scale);
                }
                rec.answer.push_str(text);
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                rec.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                rec.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
                rec.cached_tokens = u
                    .pointer("/prompt_tokens_details/cached_tokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
            }
        }
    }
    rec.e2e = started.elapsed().as_secs_f64() * scale;
    if rec.status != 200 && rec.error.is_none() {
        rec.error = Some(format!(
            "HTTP {}: {}",
            rec.status,
            error_body.chars().take(200).collect::<String>()
        ));
    }
    if let (Some(ttft), n) = (rec.ttft, rec.completion_tokens)
        && n > 1
    {
        rec.tpot = Some((rec.e2e - ttft) / (n - 1) as f64);
    }
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_sse_events() {
        let mut buf = b"data: {\"a\":1}\n\ndata: [DONE]\n\ndata: {\"par".to_vec();
        assert_eq!(
            take_events(&mut buf),
            vec!["{\"a\":1}".to_owned(), "[DONE]".to_owned()]
        );
        assert_eq!(buf, b"data: {\"par");
    }
}

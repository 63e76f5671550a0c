//! The HTTP surface end to end: `serve` on a loopback port, a plain hyper
//! client (and a raw socket where a client must vanish). No assertion here
//! depends on wall-clock timing; waits for a state poll with a generous
//! deadline.
// A test file: its helpers panic on failure as the tests do.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use tether_engine_sim::{SimConfig, serve};
use tether_testkit::http::{self as th, HttpClient, Method};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PATIENCE: Duration = Duration::from_secs(30);

struct Sim {
    base: String,
    addr: std::net::SocketAddr,
    client: HttpClient,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Sim {
    async fn start(cfg: SimConfig) -> Sim {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, cfg, async move {
            let _ = stopped.await;
        }));
        Sim {
            base: format!("http://{addr}"),
            addr,
            client: th::client(),
            stop: Some(stop),
            task,
        }
    }

    /// A fast sim: 1000 simulated seconds per wall second.
    async fn fast(name: &str) -> Sim {
        Sim::start(SimConfig {
            time_scale: 1000.0,
            ..SimConfig::named(name)
        })
        .await
    }

    async fn post(&self, path: &str, body: &Value) -> th::Reply {
        th::post_json(&self.client, &format!("{}{path}", self.base), &[], body)
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> th::Reply {
        th::get(&self.client, &format!("{}{path}", self.base))
            .await
            .unwrap()
    }

    /// `/metrics` as series → value, checking every line's syntax.
    async fn metrics(&self) -> HashMap<String, f64> {
        let reply = self.get("/metrics").await;
        assert_eq!(reply.status, 200);
        parse_exposition(&reply.text())
    }

    async fn metric(&self, series: &str) -> f64 {
        let m = self.metrics().await;
        *m.get(series)
            .unwrap_or_else(|| panic!("no series {series} in {m:?}"))
    }

    /// Polls until `series` has `value`.
    async fn wait_for(&self, series: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if self.metric(series).await == value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} never became {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let done = tokio::time::timeout(PATIENCE, self.task).await;
        assert!(
            matches!(done, Ok(Ok(Ok(())))),
            "serve did not stop cleanly: {done:?}"
        );
    }
}

fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name = series.split('{').next().unwrap_or_default();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        assert!(
            !series.contains('{') || series.ends_with('}'),
            "bad labels in {line:?}"
        );
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.insert(series.to_owned(), value);
    }
    out
}

fn labels(name: &str) -> String {
    format!("model_name=\"tether-sim\",engine=\"{name}\"")
}

/// A user message of `n` distinct words.
fn words(n: usize, salt: &str) -> String {
    (0..n)
        .map(|i| format!("{salt}{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn chat(content: &str, max_tokens: u64) -> Value {
    json!({"model": "tether-sim", "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}]})
}

/// Splits an SSE body into its `data:` payloads.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn non_streaming_chat_reports_usage_and_cached_tokens() {
    let sim = Sim::fast("sim-a").await;
    // `<|user|>` plus 40 words: 41 tokens.
    let body = chat(&words(40, "w"), 5);
    let first = sim.post("/v1/chat/completions", &body).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-engine-name"), Some("sim-a"));
    let v = first.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "tether-sim");
    assert_eq!(v["system_fingerprint"], "sim-a");
    assert!(v["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(v["created"].as_u64().is_some());
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap().to_owned();
    assert_eq!(content.split_whitespace().count(), 5);
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 41, "completion_tokens": 5, "total_tokens": 46,
            "prompt_tokens_details": {"cached_tokens": 0}})
    );

    // The same prompt again: its two full blocks of 16 are cached.
    let again = sim.post("/v1/chat/completions", &body).await.json();
    assert_eq!(again["usage"]["prompt_tokens_details"]["cached_tokens"], 32);
    assert_eq!(again["choices"][0]["message"]["content"], content.as_str());

    let l = labels("sim-a");
    let m = sim.metrics().await;
    assert_eq!(m[&format!("vllm:prefix_cache_queries_total{{{l}}}")], 82.0);
    assert_eq!(m[&format!("vllm:prefix_cache_hits_total{{{l}}}")], 32.0);
    assert_eq!(m[&format!("vllm:prompt_tokens_total{{{l}}}")], 82.0);
    assert_eq!(m[&format!("vllm:generation_tokens_total{{{l}}}")], 10.0);
    assert_eq!(m[&format!("vllm:num_requests_running{{{l}}}")], 0.0);
    assert_eq!(m[&format!("vllm:num_requests_waiting{{{l}}}")], 0.0);
    assert_eq!(m[&format!("tether_sim_max_num_seqs{{{l}}}")], 256.0);
    assert_eq!(
        m[&format!("vllm:e2e_request_latency_seconds_count{{{l}}}")],
        2.0
    );
    assert_eq!(
        m[&format!("vllm:time_to_first_token_seconds_count{{{l}}}")],
        2.0
    );
    assert!(m.contains_key(&format!("vllm:kv_cache_usage_perc{{{l}}}")));
    assert!(m.contains_key(&format!("vllm:num_preemptions_total{{{l}}}")));
    assert!(m.contains_key(&format!(
        "vllm:request_queue_time_seconds_bucket{{{l},le=\"+Inf\"}}"
    )));
    assert!(m.contains_key(&format!("vllm:time_per_output_token_seconds_sum{{{l}}}")));
    sim.shutdown().await;
}

#[tokio::test]
async fn completions_models_and_health() {
    let sim = Sim::fast("sim-b").await;
    let r = sim
        .post(
            "/v1/completions",
            &json!({"model": "tether-sim", "prompt": "one two three", "max_tokens": 3, "ignore_eos": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap().split(' ').count(),
        3
    );
    assert_eq!(v["usage"]["prompt_tokens"], 3);

    // No max_tokens: the default, 16.
    let v = sim
        .post("/v1/completions", &json!({"prompt": "one two three"}))
        .await
        .json();
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert_eq!(v["model"], "tether-sim");

    let models = sim.get("/v1/models").await;
    assert_eq!(models.status, 200);
    assert_eq!(models.header("x-engine-name"), Some("sim-b"));
    assert_eq!(models.json()["data"][0]["id"], "tether-sim");
    let health = sim.get("/health").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.header("x-engine-name"), Some("sim-b"));
    let missing = sim.get("/nowhere").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("x-engine-name"), Some("sim-b"));
    sim.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let sim = Sim::start(SimConfig {
        time_scale: 1000.0,
        max_model_len: 64,
        ..SimConfig::named("sim-c")
    })
    .await;
    let url = format!("{}/v1/chat/completions", sim.base);
    let r = th::fetch(&sim.client, Method::POST, &url, &[], "{\"model\": ")
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-engine-name"), Some("sim-c"));
    assert!(r.header("content-type").is_some_and(|c| c.contains("json")));
    let e = &r.json()["error"];
    assert_eq!(e["type"], "invalid_request_error");
    assert_eq!(e["code"], "invalid_json");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));

    let r = sim
        .post("/v1/chat/completions", &json!({"model": "tether-sim"}))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "missing_required_parameter");

    let r = sim.post("/v1/chat/completions", &chat("hi", 0)).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_value");

    let mut other = chat("hi", 1);
    other["model"] = json!("gpt-9");
    let r = sim.post("/v1/chat/completions", &other).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");

    let r = sim
        .post("/v1/chat/completions", &chat(&words(60, "x"), 10))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");

    // The engine still serves after all that.
    let r = sim.post("/v1/chat/completions", &chat("hi", 2)).await;
    assert_eq!(r.status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_stream_sends_each_token_then_finish_usage_and_done() {
    let sim = Sim::fast("sim-d").await;
    let mut body = chat(&words(20, "s"), 4);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = th::send(
        &sim.client,
        Method::POST,
        &format!("{}/v1/chat/completions", sim.base),
        &[],
        serde_json::to_vec(&body).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("x-engine-name").as_deref(), Some("sim-d"));
    assert!(header("content-type").is_some_and(|c| c.starts_with("text/event-stream")));

    // Read frame by frame: the first complete event arrives before [DONE].
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut done_when_first_event_complete = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(data) = frame.data_ref() {
            text.push_str(std::str::from_utf8(data).unwrap());
        }
        if done_when_first_event_complete.is_none() && text.contains("\n\n") {
            done_when_first_event_complete = Some(text.contains("[DONE]"));
        }
    }
    assert_eq!(done_when_first_event_complete, Some(false));

    let events = sse_events(&text);
    assert_eq!(events.len(), 4 + 3, "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..6]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut content = String::new();
    for (i, c) in chunks[..4].iter().enumerate() {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["system_fingerprint"], "sim-d");
        assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
        let delta = &c["choices"][0]["delta"];
        if i == 0 {
            assert_eq!(delta["role"], "assistant");
        }
        content.push_str(delta["content"].as_str().unwrap());
    }
    assert_eq!(content.split(' ').count(), 4);
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[5]["choices"], json!([]));
    assert_eq!(chunks[5]["usage"]["completion_tokens"], 4);
    assert_eq!(chunks[5]["usage"]["prompt_tokens"], 21);
    assert_eq!(chunks[5]["usage"]["total_tokens"], 25);

    // The same prompt whole gives the same text.
    let whole = sim
        .post("/v1/chat/completions", &chat(&words(20, "s"), 4))
        .await
        .json();
    assert_eq!(whole["choices"][0]["message"]["content"], content.as_str());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_completion_stream_without_usage() {
    let sim = Sim::fast("sim-e").await;
    let r = sim
        .post(
            "/v1/completions",
            &json!({"prompt": "a b c", "max_tokens": 3, "stream": true}),
        )
        .await;
    assert_eq!(r.status, 200);
    let events = sse_events(&r.text());
    assert_eq!(events.len(), 3 + 2, "{events:?}");
    for e in &events[..4] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "text_completion");
        assert!(c.get("usage").is_none());
    }
    assert_eq!(events[4], "[DONE]");
    sim.shutdown().await;
}

/// At real time, a long answer takes seconds: a stream's first token is
/// there long before its last, and a client that leaves frees its seat.
#[tokio::test]
async fn streams_are_incremental_and_a_vanished_client_is_aborted() {
    let sim = Sim::start(SimConfig::named("sim-f")).await;
    let l = labels("sim-f");
    let running = format!("vllm:num_requests_running{{{l}}}");
    let mut body = chat("tell me everything", 5000);
    body["stream"] = json!(true);
    let resp = th::send(
        &sim.client,
        Method::POST,
        &format!("{}/v1/chat/completions", sim.base),
        &[],
        serde_json::to_vec(&body).unwrap(),
    )
    .await
    .unwrap();
    let mut body = resp.into_body();
    let first: Bytes = loop {
        let frame = body.frame().await.unwrap().unwrap();
        if let Ok(data) = frame.into_data() {
            break data;
        }
    };
    assert!(std::str::from_utf8(&first).unwrap().starts_with("data: {"));
    // 5000 tokens take half a minute of (simulated = wall) time; it is still going.
    assert_eq!(sim.metric(&running).await, 1.0);
    drop(body);
    sim.wait_for(&running, 0.0).await;

    // The same for a whole answer, the client a raw socket that closes.
    let payload = serde_json::to_vec(&chat("and more", 5000)).unwrap();
    let mut tcp = tokio::net::TcpStream::connect(sim.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        payload.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&payload).await.unwrap();
    sim.wait_for(&running, 1.0).await;
    drop(tcp);
    sim.wait_for(&running, 0.0).await;
    assert_eq!(
        sim.metric(&format!("vllm:e2e_request_latency_seconds_count{{{l}}}"))
            .await,
        0.0,
        "nothing finished"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn sims_in_one_process_keep_their_own_state() {
    let a = Sim::fast("sim-g").await;
    let b = Sim::fast("sim-h").await;
    let r = a.post("/v1/chat/completions", &chat("hello", 3)).await;
    assert_eq!(r.header("x-engine-name"), Some("sim-g"));
    let gen_a = format!("vllm:generation_tokens_total{{{}}}", labels("sim-g"));
    let gen_b = format!("vllm:generation_tokens_total{{{}}}", labels("sim-h"));
    assert_eq!(a.metric(&gen_a).await, 3.0);
    assert_eq!(b.metric(&gen_b).await, 0.0);
    a.shutdown().await;
    // b still serves after a stopped.
    let r = b.post("/v1/chat/completions", &chat("hello", 2)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-engine-name"), Some("sim-h"));
    b.shutdown().await;
}

#[tokio::test]
async fn an_invalid_config_is_refused() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = SimConfig {
        block_size: 0,
        ..SimConfig::named("bad")
    };
    assert!(serve(listener, cfg, async {}).await.is_err());
}

//! Runs whole workloads against a small in-test OpenAI-compatible server
//! that answers every chat completion with a short SSE stream and a usage
//! chunk, and serves prefix-cache counters on `/metrics`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::HeaderValue;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tether_loadgen::{
    AgentArgs, CallRecord, ChatArgs, LoadgenConfig, MooncakeArgs, SessionRecord, StepDist, Summary,
    Workload, run,
};

/// A request the server saw.
#[derive(Clone, Debug)]
struct Seen {
    session: Option<String>,
    /// `x-claude-code-session-id`, if sent.
    program: Option<String>,
    body: Value,
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    /// Counters served on /metrics: (hits, queries), in words.
    hits: u64,
    queries: u64,
}

const ANSWER: [&str; 3] = ["hello", " world", " again"];

fn words(messages: &Value) -> u64 {
    messages
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            m["content"]
                .as_str()
                .unwrap_or("")
                .split_whitespace()
                .count() as u64
        })
        .sum()
}

fn sse(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/metrics" {
        let s = lock(&state);
        let text = format!(
            "# TYPE vllm:prefix_cache_hits counter\n\
             vllm:prefix_cache_hits_total{{model_name=\"tether-sim\",engine=\"a\"}} {}\n\
             vllm:prefix_cache_hits_total{{model_name=\"tether-sim\",engine=\"b\"}} 1000\n\
             vllm:prefix_cache_queries_total{{model_name=\"tether-sim\"}} {}\n",
            s.hits,
            s.queries + 1000
        );
        return Ok(Response::new(Full::new(Bytes::from(text)).boxed()));
    }
    if path != "/v1/chat/completions" {
        let mut resp = Response::new(Full::new(Bytes::new()).boxed());
        *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
        return Ok(resp);
    }
    let session = req
        .headers()
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let program = req
        .headers()
        .get("x-claude-code-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let prompt_tokens = words(&body["messages"]);
    {
        let mut s = lock(&state);
        s.queries += prompt_tokens;
        s.hits += prompt_tokens / 2;
        s.seen.push(Seen {
            session,
            program,
            body: body.clone(),
        });
    }
    let chunk = |delta: Value| {
        json!({"id": "c1", "object": "chat.completion.chunk", "model": body["model"],
               "choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
    };
    let mut events = vec![sse(&chunk(json!({"role": "assistant", "content": ""})))];
    events.extend(ANSWER.iter().map(|w| sse(&chunk(json!({"content": w})))));
    events.push(sse(
        &json!({"id": "c1", "object": "chat.completion.chunk", "choices": [],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": ANSWER.len(),
                  "total_tokens": prompt_tokens + ANSWER.len() as u64,
                  "prompt_tokens_details": {"cached_tokens": prompt_tokens / 2}}}),
    ));
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let stream = futures::stream::iter(
        events
            .into_iter()
            .map(|b| Ok::<_, Infallible>(Frame::data(b))),
    );
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert("x-tether-engine", HeaderValue::from_static("engine-a"));
    Ok(resp)
}

async fn serve() -> std::io::Result<(SocketAddr, Arc<Mutex<State>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(Mutex::new(State::default()));
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(req, st.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((addr, state))
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn out_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("tether-loadgen-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn chat_config(addr: SocketAddr) -> LoadgenConfig {
    let mut chat = ChatArgs::default();
    chat.synth.sessions = 2;
    chat.synth.rate = 1000.0;
    chat.synth.prompt_min = 5;
    chat.synth.prompt_max = 8;
    chat.synth.answer_min = 3;
    chat.synth.answer_max = 3;
    chat.turns = 2;
    chat.think_secs = 0.0;
    let mut config = LoadgenConfig::new(Workload::Chat(chat));
    config.common.base_url = format!("http://{addr}");
    config
}

fn lines<T: serde::de::DeserializeOwned>(path: PathBuf) -> anyhow::Result<Vec<T>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

#[tokio::test]
async fn chat_sessions_carry_their_history() {
    let (addr, state) = serve().await.unwrap();
    let dir = out_dir("chat");
    let mut config = chat_config(addr);
    config.common.out = Some(dir.clone());
    config.common.label = "chat-test".into();
    let summary = run(config).await.unwrap();

    assert_eq!(summary.label, "chat-test");
    assert_eq!(summary.workload, "chat");
    assert_eq!(summary.calls, 4);
    assert_eq!(summary.errors, 0, "{:?}", summary.error_samples);
    assert_eq!(summary.sessions, 2);
    assert_eq!(summary.sessions_complete, 2);
    assert_eq!(summary.ttft.count, 4);
    assert_eq!(summary.tpot.count, 4);
    assert_eq!(summary.e2e.count, 4);
    assert_eq!(summary.session_completion.count, 2);
    assert_eq!(summary.output_tokens, 12);
    assert_eq!(summary.cache_hit_rate, None);

    // What the server saw: two sessions of two turns; the second turn
    // re-sends the first question and its answer.
    let seen = lock(&state).seen.clone();
    assert_eq!(seen.len(), 4);
    let mut by_session: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for s in &seen {
        assert_eq!(s.program, None);
        let b = &s.body;
        assert_eq!(b["model"], "tether-sim");
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["max_tokens"], 3);
        by_session
            .entry(s.session.clone().expect("x-session-id"))
            .or_default()
            .push(b["messages"].clone());
    }
    assert_eq!(by_session.len(), 2);
    for turns in by_session.values_mut() {
        assert_eq!(turns.len(), 2);
        turns.sort_by_key(|m| m.as_array().map_or(0, Vec::len));
        let first = turns[0].as_array().unwrap();
        let second = turns[1].as_array().unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0]["role"], "user");
        assert_eq!(second.len(), 3);
        assert_eq!(second[0], first[0]);
        assert_eq!(second[1]["role"], "assistant");
        assert_eq!(second[1]["content"], ANSWER.concat());
        assert_eq!(second[2]["role"], "user");
        assert_ne!(second[2]["content"], first[0]["content"]);
    }

    // The files.
    let calls: Vec<CallRecord> = lines(dir.join("calls.jsonl")).unwrap();
    assert_eq!(calls.len(), 4);
    for c in &calls {
        assert_eq!(c.status, 200);
        assert_eq!(c.engine.as_deref(), Some("engine-a"));
        assert_eq!(c.completion_tokens, 3);
        assert!(c.cached_tokens > 0);
        assert!(c.ttft.is_some() && c.tpot.is_some() && c.error.is_none());
    }
    let steps: Vec<usize> = calls.iter().map(|c| c.step).collect();
    assert_eq!(steps.iter().filter(|s| **s == 1).count(), 2);
    let sessions: Vec<SessionRecord> = lines(dir.join("sessions.jsonl")).unwrap();
    assert_eq!(sessions.len(), 2);
    assert!(
        sessions
            .iter()
            .all(|s| s.calls == 2 && s.complete && s.output_tokens == 6)
    );
    let written: Summary =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    // (serde_json reads floats back to within an ulp or so.)
    assert_eq!(
        (
            written.calls,
            written.errors,
            written.sessions,
            written.ttft.count
        ),
        (4, 0, 2, 4)
    );
    assert!((written.ttft.p90 - summary.ttft.p90).abs() < 1e-12);
    assert!((written.session_completion.mean - summary.session_completion.mean).abs() < 1e-12);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_request_budget_cuts_sessions() {
    let (addr, state) = serve().await.unwrap();
    let mut config = chat_config(addr);
    config.common.max_requests = 3;
    let summary = run(config).await.unwrap();
    assert_eq!(summary.calls, 3);
    assert_eq!(summary.errors, 0);
    assert_eq!(summary.sessions, 2);
    assert_eq!(summary.sessions_complete, 1);
    assert_eq!(lock(&state).seen.len(), 3);
}

#[tokio::test]
async fn a_mooncake_trace_with_engine_counters() {
    let (addr, state) = serve().await.unwrap();
    let dir = out_dir("mooncake");
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.jsonl");
    std::fs::write(
        &trace,
        "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 3, \"hash_ids\": [1, 2]}\n\
         {\"timestamp\": 20, \"input_length\": 100, \"output_length\": 3, \"hash_ids\": [9]}\n\
         {\"timestamp\": 10, \"input_length\": 700, \"output_length\": 3, \"hash_ids\": [1, 2, 3]}\n",
    )
    .unwrap();
    let mut m = MooncakeArgs::new(&trace);
    m.speedup = 100.0;
    let mut config = LoadgenConfig::new(Workload::Mooncake(m));
    config.common.base_url = format!("http://{addr}/v1");
    config.common.engine_metrics = vec![format!("http://{addr}")];
    let summary = run(config).await.unwrap();
    assert_eq!(summary.calls, 3);
    assert_eq!(summary.errors, 0, "{:?}", summary.error_samples);
    assert_eq!(summary.sessions, 2);
    assert_eq!(summary.cache_engines, 1);
    assert_eq!(summary.cache_queries, Some(1400.0));
    assert_eq!(summary.cache_hit_rate, Some(0.5));

    let seen = lock(&state).seen.clone();
    let by_len: BTreeMap<u64, Option<String>> = seen
        .iter()
        .map(|s| (words(&s.body["messages"]), s.session.clone()))
        .collect();
    // Every prompt has exactly input_length words; the request extending
    // [1, 2] is in that request's session.
    assert_eq!(
        by_len.keys().copied().collect::<Vec<_>>(),
        vec![100, 600, 700]
    );
    assert_eq!(by_len[&600], by_len[&700]);
    assert_ne!(by_len[&600], by_len[&100]);
    assert!(seen.iter().all(|s| s.body["max_tokens"] == 3));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn agent_programs_share_system_prompts_and_join_their_branches() {
    let (addr, state) = serve().await.unwrap();
    let mut agent = AgentArgs::default();
    agent.synth.sessions = 6;
    agent.synth.rate = 1000.0;
    agent.synth.prompt_min = 3;
    agent.synth.prompt_max = 5;
    agent.synth.answer_min = 3;
    agent.synth.answer_max = 3;
    agent.steps = 2;
    agent.step_dist = StepDist::Fixed;
    agent.fanout = 2;
    agent.tool_pause_secs = 0.01;
    agent.system_prompts = 2;
    agent.system_prompt_words = 20;
    let mut config = LoadgenConfig::new(Workload::Agent(agent));
    config.common.base_url = format!("http://{addr}");
    config.common.extra_session_headers = vec!["x-claude-code-session-id".into()];
    let summary = run(config).await.unwrap();
    assert_eq!((summary.calls, summary.errors), (24, 0));
    assert_eq!(summary.session_completion.count, 6);
    assert_eq!(summary.send_lag.count, 24);
    assert!(summary.send_lag_max >= 0.0);

    let seen = lock(&state).seen.clone();
    let mut systems = std::collections::BTreeSet::new();
    let mut by_session: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for s in &seen {
        assert_eq!(s.program, s.session);
        let messages = s.body["messages"].as_array().unwrap().clone();
        assert_eq!(messages[0]["role"], "system");
        systems.insert(messages[0]["content"].as_str().unwrap().to_owned());
        by_session
            .entry(s.session.clone().expect("x-session-id"))
            .or_default()
            .push(Value::Array(messages));
    }
    // Two prompts in the pool, shared by six programs; one per program.
    assert_eq!(systems.len(), 2);
    assert_eq!(by_session.len(), 6);
    for calls in by_session.values() {
        let opening: Vec<&Value> = calls.iter().map(|m| &m[0]).collect();
        assert!(opening.windows(2).all(|w| w[0] == w[1]));
        // Step 1 carries the system prompt, then both branches of step 0
        // with their answers (the join), then its own message.
        let longest = calls.iter().map(|m| m.as_array().unwrap().len()).max();
        assert_eq!(longest, Some(1 + 4 + 1));
    }
}
